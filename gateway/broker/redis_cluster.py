"""The Redis Cluster engine: the broker tier scales out by adding shards.

Storage is the single-node engine's (`RedisStreams`): every key of a channel
carries the hash tag `{channel}`, so each publish or read is one script on
the channel's slot, routed by redis-py's cluster client (which follows
MOVED/ASK and re-reads the slot map on its own). The publish script ends
with `SPUBLISH` on the channel's sharded pub/sub name, in the same slot.

Fan-in is sharded pub/sub: one `PubSubLink` (`SSUBSCRIBE`) per shard master
that owns channels this gateway's clients watch, so a gateway receives only
its own clients' channels and no publication crosses the cluster bus.

A channel leaves its link when the link's connection dies (the master was
killed or partitioned) or when the server pushes `sunsubscribe` (its slot
moved). It is then "orphaned": the slot map is read again, the channel is
subscribed on whichever master owns its slot now (with backoff while none
does), and once it is live again the node is told (`on_resubscribed`) so
core recovery closes the gap from history. Before that, a channel whose
shard changed master is fenced: if the new master's stream does not hold
what this gateway already delivered (writes lost to asynchronous
replication), the channel gets a new epoch and every client is told to
resync instead of receiving other publications under offsets it has seen.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection
from redis.crc import key_slot
from redis.exceptions import RedisError

from gateway.broker.base import PublishItem
from gateway.broker.redis_pubsub import STALL_SECONDS, PubSubLink
from gateway.broker.redis_scripts import FENCE, SPUBLISH, Keys
from gateway.broker.redis_streams import (
    IDEMPOTENCY_TTL,
    OWNER_TTL,
    UNAVAILABLE,
    RedisStreams,
    json_str,
    publication,
)
from gateway.cluster.connect import (
    COMMAND_TIMEOUT,
    LINK_ERRORS,
    POOL_SIZE,
    connect_cluster,
    stop,
)
from gateway.protocol.channels import Namespace
from gateway.protocol.errors import BrokerUnavailable, ProtocolError
from gateway.protocol.publication import Publication, new_epoch

log = logging.getLogger("herald.redis")

HEALTH_INTERVAL = 1.0
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
# Placing orphans retries faster: a failover is over in a couple of seconds,
# and each try is one CLUSTER SLOTS and one connect.
PLACE_BACKOFF_CAP = 1.0
HOLD_MAX = 10_000  # live publications held per channel during one resync


class RedisClusterBroker(RedisStreams):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "herald:",
        stall_seconds: float = STALL_SECONDS,
        idempotency_ttl: float = IDEMPOTENCY_TTL,
    ) -> None:
        super().__init__(connect_cluster(url), Keys(prefix))
        self.stall_seconds = stall_seconds
        self.idempotency_ttl = max(1, int(idempotency_ttl))
        self._publish = self.client.register_script(SPUBLISH)
        self._fence = self.client.register_script(FENCE)
        self._in_flight = asyncio.Semaphore(POOL_SIZE)
        self._wanted: set[str] = set()
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._live: set[str] = set()  # wanted and confirmed on their shard's link
        # Fan-in: one link per shard master (by node name), and where each
        # wanted channel is subscribed; orphans wait for a master.
        self._links: dict[str, PubSubLink] = {}
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._placed: dict[str, str] = {}
        self._orphans: set[str] = set()
        self._placer: asyncio.Task[None] | None = None
        self._attempt = 0
        # Channels whose fan-in was interrupted, until they are live again;
        # then batched into one `on_resubscribed` call per loop turn.
        self._interrupted: set[str] = set()
        self._recovered: set[str] = set()
        self._report_scheduled = False
        # Live publications of resyncing channels, held until the node closed the gap.
        self._held: dict[str, list[Publication]] = {}
        # Epochs the fence found lost, per channel: their stragglers are dropped.
        self._superseded: dict[str, str] = {}
        # The last publication delivered per channel, for the fence.
        self._last: dict[str, tuple[str, int, float]] = {}
        self._topology = False
        self._healthy = False
        self._healthy_event = asyncio.Event()
        self._health: asyncio.Task[None] | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()

    async def publish(
        self,
        namespace: Namespace,
        channel: str,
        event: str,
        data: Any,
        *,
        owner: str | None = None,
        meta: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Publication:
        """The shared publish script (ending in SPUBLISH), on the channel's slot."""
        item = PublishItem(namespace, channel, event, data, owner, meta, idempotency_key)
        now = time.time()
        k = self.keys
        reply = await self._cmd(self._publish(
            keys=[k.meta(channel), k.stream(channel), k.state(channel), k.owner(channel),
                  k.idempotency(channel, idempotency_key or "")],
            args=[
                k.shard_pubsub(channel), json_str(channel), json_str(event), orjson.dumps(data),
                repr(now), orjson.dumps(meta or {}), namespace.history_size,
                max(1, int(namespace.history_ttl)), "1" if namespace.state else "0",
                owner or "", OWNER_TTL, new_epoch(),
                self.idempotency_ttl if idempotency_key is not None else 0,
            ],
        ))
        return publication(item, now, reply)

    async def publish_many(
        self, items: Sequence[PublishItem]
    ) -> list[Publication | ProtocolError | BrokerUnavailable]:
        """Each channel's items in order, the channels side by side (on their own slots)."""
        results: dict[int, Publication | ProtocolError | BrokerUnavailable] = {}
        by_channel: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_channel.setdefault(item.channel, []).append(i)

        async def in_order(indexes: list[int]) -> None:
            for i in indexes:
                it = items[i]
                try:
                    results[i] = await self.publish(
                        it.namespace, it.channel, it.event, it.data, owner=it.owner,
                        meta=it.meta, idempotency_key=it.idempotency_key,
                    )
                except (ProtocolError, BrokerUnavailable) as exc:
                    results[i] = exc

        await asyncio.gather(*(in_order(ix) for ix in by_channel.values()))
        return [results[i] for i in range(len(items))]  # every item answered, in order

    async def _cmd(self, awaitable: Any) -> Any:
        """A command, queued while POOL_SIZE are in flight.

        redis-py's cluster client fails a command at once when a node's pool
        is exhausted (MaxConnectionsError) instead of waiting as the
        single-node engine's blocking pool does; a connect storm must queue,
        not answer `unavailable`.
        """
        async with self._in_flight:
            return await super()._cmd(awaitable)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._health = asyncio.create_task(self._run_health(), name="herald-cluster-health")
        try:
            await asyncio.wait_for(self._until_ready(), COMMAND_TIMEOUT)
        except TimeoutError:
            log.warning("redis cluster not reachable at start; serving as not ready and retrying")

    async def _until_ready(self) -> None:
        await self._healthy_event.wait()

    async def close(self) -> None:
        self._closing = True
        tasks = [t for t in (self._health, self._placer) if t is not None]
        tasks += list(self._runs.values()) + list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            await stop(task)
        await self.client.aclose()

    @property
    def ready(self) -> bool:
        """Every shard master answers, and every watched channel is subscribed."""
        return (
            self._healthy
            and not self._orphans
            and all(link.live and not link.stalled
                    for link in self._links.values() if link.names)
        )

    async def ping(self) -> None:
        await self._cmd(self.client.ping())

    async def _run_health(self) -> None:
        """PING every master each second; re-read the slot map while one fails."""
        while not self._closing:
            ok = False
            try:
                if not self._topology:
                    await self._refresh()
                    self._topology = True
                masters = self.client.get_primaries()
                await asyncio.wait_for(
                    asyncio.gather(*(node.execute_command("PING") for node in masters)),
                    COMMAND_TIMEOUT,
                )
                ok = bool(masters)
            except Exception as exc:  # the health loop never dies: it is what /readyz reads
                if self._healthy:
                    log.warning("redis cluster unhealthy: %s", exc)
                self._topology = False
            self._healthy = ok
            if ok:
                self._healthy_event.set()
            await asyncio.sleep(HEALTH_INTERVAL)

    async def _refresh(self) -> None:
        """Read the slot map again (the client's first use sets it up entirely)."""
        await self.client.initialize()  # a no-op once initialised
        await self.client.nodes_manager.initialize()

    # -- subscriptions ---------------------------------------------------------------

    async def subscribe(self, channels: list[str]) -> None:
        if not self._healthy:
            raise BrokerUnavailable("redis cluster is not reachable")
        loop = asyncio.get_running_loop()
        waits = []
        for channel in channels:
            self._wanted.add(channel)
            if channel in self._live:
                continue  # confirmed already
            fut = self._confirm.get(channel)
            if fut is None:
                fut = self._confirm[channel] = loop.create_future()
                if channel not in self._placed and channel not in self._orphans:
                    self._place(channel)
            waits.append(fut)
        if not waits:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*map(asyncio.shield, waits)), COMMAND_TIMEOUT)
        except TimeoutError:
            raise BrokerUnavailable("redis cluster did not confirm the subscription") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # (An unsubscribe cancelled the confirmation this call waited for.)
            raise BrokerUnavailable("unsubscribed before redis confirmed it") from None

    async def unsubscribe(self, channels: list[str]) -> None:
        for channel in channels:
            self._wanted.discard(channel)
            self._last.pop(channel, None)
            self._interrupted.discard(channel)
            self._orphans.discard(channel)
            self._held.pop(channel, None)
            self._superseded.pop(channel, None)
            self._live.discard(channel)
            fut = self._confirm.pop(channel, None)
            if fut is not None and not fut.done():
                fut.cancel()
            node = self._placed.pop(channel, None)
            link = self._links.get(node) if node else None
            if link is not None:
                link.remove([self.keys.shard_pubsub(channel)])
                if not link.names:
                    asyncio.get_running_loop().call_soon(self._retire, node, link)

    def _retire(self, node: str, link: PubSubLink) -> None:
        """Close a shard's link once no watched channel is left on it."""
        if self._links.get(node) is link and not link.names:
            del self._links[node]
            run = self._runs.pop(node, None)
            if run is not None:
                run.cancel()

    def _place(self, channel: str) -> None:
        """Subscribe a wanted channel on the master that owns its slot now."""
        name = self.keys.shard_pubsub(channel)
        try:
            node = self.client.nodes_manager.get_node_from_slot(key_slot(name.encode()))
        except (*UNAVAILABLE, LookupError):  # (a slot map being rebuilt lacks the slot)
            self._orphan([channel], interrupted=False)
            return
        link = self._links.get(node.name)
        if link is None:
            link = self._links[node.name] = PubSubLink(
                _opener(node),
                sharded=True,
                on_message=self._on_message,
                on_confirmed=self._on_confirmed,
                on_dropped=self._on_dropped,
                stall_seconds=self.stall_seconds,
                on_stall=self._count_stall,
            )
            self._runs[node.name] = asyncio.create_task(
                self._run_link(node.name, link), name=f"herald-cluster-link-{node.name}"
            )
        self._placed[channel] = node.name
        link.add([name])

    def _count_stall(self) -> None:
        self.stalls += 1

    async def _run_link(self, node: str, link: PubSubLink) -> None:
        try:
            await link.run()
        except asyncio.CancelledError:
            raise
        except (RedisError, TimeoutError, *LINK_ERRORS) as exc:
            log.warning("redis cluster pub/sub to %s lost: %s", node, exc)
        except Exception:
            # Never let a link die quietly: its channels would go silent.
            log.exception("redis cluster pub/sub to %s failed", node)
        finally:
            if self._links.get(node) is link:
                del self._links[node]
                self._runs.pop(node, None)
            if not self._closing and link.names:
                self.reconnects += 1
                self._orphan([self.keys.shard_channel(n) for n in link.names], interrupted=True)

    def _on_dropped(self, names: list[str]) -> None:
        """The server took these names away (slot moved, or a refused subscribe)."""
        self._orphan([self.keys.shard_channel(n) for n in names], interrupted=True)

    def _orphan(self, channels: list[str], *, interrupted: bool) -> None:
        for channel in channels:
            if channel not in self._wanted:
                continue
            self._placed.pop(channel, None)
            self._orphans.add(channel)
            if interrupted and channel in self._live:
                self._interrupted.add(channel)  # it was live: the node must close a gap
            self._live.discard(channel)
        if self._orphans and (self._placer is None or self._placer.done()):
            self._placer = asyncio.create_task(self._run_placer(), name="herald-cluster-placer")

    async def _run_placer(self) -> None:
        """Re-read the slot map and place every orphan, backing off while that fails."""
        while self._orphans and not self._closing:
            if self._attempt:
                cap = min(PLACE_BACKOFF_CAP, BACKOFF_BASE * 2**self._attempt)
                await asyncio.sleep(random.uniform(cap / 2, cap))
            self._attempt += 1
            try:
                await self._refresh()
            except Exception as exc:  # whatever it is, the orphans stay and are tried again
                log.info("redis cluster slot map not readable yet: %s", exc)
                continue
            batch, self._orphans = self._orphans, set()
            for channel in batch:
                if channel in self._wanted and channel not in self._placed:
                    self._place(channel)

    # -- fan-in ------------------------------------------------------------------

    def _on_confirmed(self, name: str) -> None:
        channel = self.keys.shard_channel(name)
        self._attempt = 0
        if channel not in self._wanted:
            return
        self._live.add(channel)
        fut = self._confirm.pop(channel, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
        if channel in self._interrupted:
            self._interrupted.discard(channel)
            self._held.setdefault(channel, [])
            self._resync(channel)

    def _resync(self, channel: str) -> None:
        """Queue a live-again channel for the node's gap-closing (batched per loop turn)."""
        self._recovered.add(channel)
        if not self._report_scheduled:
            self._report_scheduled = True
            asyncio.get_running_loop().call_soon(self._report)

    def _report(self) -> None:
        self._report_scheduled = False
        batch, self._recovered = list(self._recovered), set()
        task = asyncio.ensure_future(self._resubscribed(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resubscribed(self, channels: list[str]) -> None:
        """Fence, let the node close the gaps, then hand over what arrived meanwhile.

        Publications received for these channels since they were subscribed
        again are held until the node has read their history, as the
        contract asks; when the node cannot read it now (BrokerUnavailable)
        it is asked again, with backoff, for as long as the channels are wanted.
        """
        attempt = 0
        while not self._closing:
            channels = [c for c in channels if c in self._wanted]
            try:
                await asyncio.gather(*(self._fence_channel(c) for c in channels if c in self._last))
                await self._on_resubscribed(channels)
                break
            except BrokerUnavailable as exc:
                log.warning("resync of %d channels failed (%s); retrying", len(channels), exc)
            except Exception:
                log.exception("resync of %d channels failed", len(channels))
                break
            attempt += 1
            cap = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
            await asyncio.sleep(random.uniform(cap / 2, cap))
        for channel in channels:
            if channel not in self._recovered:  # (else still held, for the next round)
                for pub in self._held.pop(channel, ()):
                    self._deliver(pub)

    async def _fence_channel(self, channel: str) -> None:
        epoch, offset, at = self._last[channel]
        k = self.keys
        after = await self._cmd(
            self._fence(keys=[k.meta(channel), k.stream(channel)],
                        args=[epoch, offset, repr(at), new_epoch()])
        )
        if after.decode() != epoch:
            log.warning("%s lost publications in a failover: epoch %s -> %s",
                        channel, epoch, after.decode() or "(new)")
            # What the new master published in the lost epoch must not reach
            # clients after they were told of the new one.
            self._superseded[channel] = epoch
            held = self._held.get(channel)
            if held:
                held[:] = [p for p in held if p.epoch != epoch]

    def _on_message(self, name: bytes, payload: bytes) -> None:
        self.messages_in += 1
        channel = self.keys.shard_channel(name.decode())
        if channel not in self._wanted:
            return
        try:
            pub = Publication.from_json(payload)
        except ValueError as exc:
            self.bad_records.drop(payload, exc)
            return
        if self._superseded and self._superseded.get(channel) == pub.epoch:
            return  # an epoch the fence closed
        held = self._held.get(channel)
        if held is None:
            self._deliver(pub)
        elif len(held) < HOLD_MAX:
            held.append(pub)
        else:
            # Too much arrived during one resync: drop it and resync again
            # afterwards, which reads the dropped ones from the history.
            held.clear()
            self._resync(channel)

    def _deliver(self, pub: Publication) -> None:
        self._last[pub.channel] = (pub.epoch, pub.offset, pub.time)
        self._on_publication(pub)

def _opener(node: ClusterNode) -> Callable[[], Awaitable[Connection]]:
    """A dedicated connection to one node, opened by redis-py (TLS, AUTH/ACL)."""

    async def open_connection() -> Connection:
        conn = node.connection_class(**node.connection_kwargs)
        await conn.connect()
        return conn

    return open_connection
