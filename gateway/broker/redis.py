"""The Redis engine: many stateless gateways behaving as one service.

Publishing is one Lua call (offset, history, state, owner, PUBLISH). Fan-in
uses one dedicated pub/sub connection per gateway, subscribed only to the
channels its clients watch; SUBSCRIBE/UNSUBSCRIBE requests made in the same
event-loop turn go out as one command, so a reconnect storm of thousands of
clients costs a handful of round trips.

Outages: the reader reconnects with capped, jittered exponential backoff,
re-subscribes everything and, before handing over anything it received
meanwhile, awaits the node's `on_resubscribed` for those channels, which
closes each gap from the history (or reports the epoch change): the engine
never re-reads history itself (gateway.core.recovery).

A network that lies is expected too. Which channel is subscribed is kept by
a state machine (`subscriptions.py`) that matches every reply to the
command it answers, so timeouts, retries and interleaved unsubscribes
cannot leave a channel confirmed to the node but unsubscribed in Redis. A
pub/sub connection silent for `stall_seconds` (a stall: no FIN, no RST)
makes the engine not ready at once, and is dropped after three times that.
A periodic audit compares the connection's own subscription count in Redis
(`CLIENT LIST ID`) with the table, and on drift counts it and reconnects,
which re-subscribes everything and has the node close each channel's gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import hiredis
import orjson
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError, ResponseError

from gateway.broker import redis_pipe
from gateway.broker.base import PublishItem
from gateway.broker.redis_pipe import RedisPipe, bulk
from gateway.broker.redis_pubsub import read_replies
from gateway.broker.redis_scripts import PUBLISH, READ, Keys
from gateway.broker.redis_streams import (
    IDEMPOTENCY_TTL,
    OWNER_TTL,
    RedisStreams,
    json_str,
    publication,
)
from gateway.broker.subscriptions import Released, SubscriptionTable
from gateway.cluster.connect import COMMAND_TIMEOUT, connect, describe, stop
from gateway.protocol.channels import Namespace
from gateway.protocol.errors import BrokerUnavailable, ProtocolError
from gateway.protocol.publication import Publication, new_epoch

log = logging.getLogger("herald.redis")

BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
# The pub/sub connection is pinged every third of this when idle; silent for
# this long it is stalled (not ready), for three times this long it is dropped.
STALL_SECONDS = 3.0
AUDIT_SECONDS = 30.0
# Channels whose constant publish-script arguments are kept encoded (cleared when full).
PARTS_CACHE = 10_000
_PUBLISH_KEYS = 5
_PUBLISH_ARGS = _PUBLISH_KEYS + 13  # keys + ARGV of PUBLISH
_OWNER_TTL = bulk(OWNER_TTL)
_NO_KEY_TTL = bulk(0)
# The publish script's keys and arguments in one formatting step (the hot
# path of every publish): head (four keys), the idempotency key, channel
# (pubsub, channel json), event, data, time, meta, middle (history size, ttl,
# state flag), owner, owner ttl, epoch, idempotency ttl.
_BULK = b"$%d\r\n%b\r\n"
_PUBLISH_ARGV = (
    b"%b" + _BULK + b"%b" + _BULK * 4 + b"%b" + _BULK + b"%b" + _BULK + b"%b"
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBroker(RedisStreams):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "herald:",
        timeout: float = COMMAND_TIMEOUT,
        stall_seconds: float = STALL_SECONDS,
        audit_seconds: float = AUDIT_SECONDS,
        idempotency_ttl: float = IDEMPOTENCY_TTL,
    ) -> None:
        super().__init__(connect(url, timeout), Keys(prefix))
        self.url = url
        self.timeout = timeout
        self.stall_seconds = stall_seconds
        self.audit_seconds = audit_seconds
        self._idem_ttl = bulk(max(1, int(idempotency_ttl)))
        # Publishes and reads: batched per round trip on a connection of their own.
        self._pipe = RedisPipe(self.client, timeout)
        self._publish = self._pipe.script(PUBLISH, _PUBLISH_KEYS)
        self._read_script = self._pipe.script(READ, 3)
        self._parts: dict[str, tuple[Namespace, bytes, bytes, bytes, bytes]] = {}
        # Channels the hub wants, and their pub/sub state.
        self._subs = SubscriptionTable()
        self._wanted = self._subs.wanted
        self._flush_scheduled = False
        self._conn: Connection | None = None
        self._client_id: int | None = None  # the pub/sub connection's, for the audit
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._last_read = 0.0
        self._stalled = False
        self._parser = hiredis.Reader()
        self._backlog: list[Any] = []
        self._auditor: asyncio.Task[None] | None = None
        # Why the pub/sub connection last failed ("" while it is up).
        self.last_error = ""

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._run_reader(), name="herald-redis-reader")
        if self.audit_seconds > 0:
            self._auditor = asyncio.create_task(self._audit_loop(), name="herald-redis-audit")
        try:
            await asyncio.wait_for(self._connected.wait(), self.timeout)
        except TimeoutError:
            log.warning("redis not reachable at start (%s); serving as not ready and retrying",
                        self.last_error or "no answer")

    async def close(self) -> None:
        self._closing = True
        for task in (self._reader, self._auditor):
            if task is not None:
                await stop(task)
        if self._conn is not None:
            await self._conn.disconnect()
        await self._pipe.close()
        await self.client.aclose()

    @property
    def ready(self) -> bool:
        """Connected, resynchronised, and heard from within `stall_seconds`."""
        return self._connected.is_set() and not self._stalled

    # -- commands ----------------------------------------------------------

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
        # Batched with every other publish of this loop turn (see RedisPipe).
        item = PublishItem(namespace, channel, event, data, owner, meta, idempotency_key)
        now = time.time()
        reply = self._submit(item, repr(now).encode(), new_epoch().encode())
        return publication(item, now, await reply)

    async def publish_many(
        self, items: Sequence[PublishItem]
    ) -> list[Publication | ProtocolError | BrokerUnavailable]:
        # All queued before the first is sent: one write, the items' order.
        # One time and one candidate epoch for the batch (made in the same
        # instant): the epoch only names a channel's stream if this publish
        # creates it, and epochs are compared per channel, never across.
        now = time.time()
        stamp, epoch = repr(now).encode(), new_epoch().encode()
        sent = [self._submit(item, stamp, epoch) for item in items]
        results: list[Publication | ProtocolError | BrokerUnavailable] = []
        for item, reply in zip(items, sent, strict=True):
            try:
                results.append(publication(item, now, await reply))
            except (ProtocolError, BrokerUnavailable) as exc:
                results.append(exc)
        return results

    def _submit(self, item: PublishItem, stamp: bytes, epoch: bytes) -> asyncio.Future[Any]:
        """Queue one call of the publish script (`stamp`: its time, `epoch`: the
        candidate epoch, both encoded); returns its reply."""
        head, where, middle, idem_prefix = self._script_parts(item.namespace, item.channel)
        key = item.idempotency_key
        if key is None:
            idem, idem_ttl = idem_prefix, _NO_KEY_TTL
        else:
            idem, idem_ttl = idem_prefix + key.encode(), self._idem_ttl
        event = orjson.dumps(item.event)  # a JSON string, as the record stores it
        data = orjson.dumps(item.data)
        meta = orjson.dumps(item.meta) if item.meta else b"{}"
        owner = item.owner.encode() if item.owner else b""
        args = _PUBLISH_ARGV % (
            head, len(idem), idem, where, len(event), event, len(data), data, len(stamp), stamp,
            len(meta), meta, middle, len(owner), owner, _OWNER_TTL, len(epoch), epoch, idem_ttl,
        )
        return self._pipe.submit(self._publish.call(_PUBLISH_ARGS, args))

    def _script_parts(
        self, namespace: Namespace, channel: str
    ) -> tuple[bytes, bytes, bytes, bytes]:
        """The publish script's keys and arguments that are the same for every
        publication of a channel, encoded once (see PUBLISH for their order),
        and the prefix of its idempotency keys."""
        cached = self._parts.get(channel)
        if cached is not None and cached[0] is namespace:
            return cached[1], cached[2], cached[3], cached[4]
        k = self.keys
        head = b"".join(bulk(v) for v in (
            k.meta(channel), k.stream(channel), k.state(channel), k.owner(channel),
        ))
        where = bulk(k.pubsub(channel)) + bulk(json_str(channel))
        middle = b"".join(bulk(v) for v in (
            namespace.history_size, max(1, int(namespace.history_ttl)),
            "1" if namespace.state else "0",
        ))
        if len(self._parts) >= PARTS_CACHE:
            self._parts.clear()
        idem_prefix = k.idempotency(channel, "").encode()
        self._parts[channel] = (namespace, head, where, middle, idem_prefix)
        return head, where, middle, idem_prefix

    # -- reads (batched like the publishes) ------------------------------------

    async def _read_channel(
        self, namespace: Namespace, channel: str, mode: str, since: int, limit: int
    ) -> list[Any]:
        # A connect storm's recoveries: thousands of these at once, a few round
        # trips on the pipe instead of one pooled connection each.
        k = self.keys
        parts = (k.meta(channel), k.stream(channel), k.state(channel),
                 mode, new_epoch(), max(1, int(namespace.history_ttl)), since, limit)
        return await self._pipe.call(self._read_script.call(len(parts),
                                                            b"".join(map(bulk, parts))))

    async def owner(self, channel: str) -> str | None:
        value = await self._pipe.call(redis_pipe.command("GET", self.keys.owner(channel)))
        return value.decode() if value is not None else None

    # -- subscriptions (batched) ---------------------------------------------

    async def subscribe(self, channels: list[str]) -> None:
        """Returns once Redis confirmed every channel (see `subscriptions.py` for when)."""
        if not self._connected.is_set():
            raise BrokerUnavailable("redis pub/sub is not connected")
        if self._stalled:
            raise BrokerUnavailable("redis pub/sub is not answering")
        loop = asyncio.get_running_loop()
        waits = [(c, fut) for c in channels if (fut := self._subs.want(c, loop)) is not None]
        if not waits:
            return
        self._schedule_flush()
        # One deadline around plain awaits of this call's own waiters: no
        # task (`wait_for`), gather or shield per subscribe on a connect storm.
        # Each waiter is this call's alone, so a timeout or a cancel that
        # cancels it loses nothing; `finally` takes it off the table.
        try:
            async with asyncio.timeout(self.timeout):
                for _, fut in waits:
                    await fut
        except TimeoutError:
            raise BrokerUnavailable("redis did not confirm the subscription") from None
        except Released as exc:
            raise BrokerUnavailable(str(exc)) from None
        finally:
            for channel, fut in waits:
                self._subs.forget_waiter(channel, fut)

    async def unsubscribe(self, channels: list[str]) -> None:
        for channel in channels:
            self._subs.release(channel)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send what this loop turn's subscribes and unsubscribes changed, as two commands."""
        self._flush_scheduled = False
        conn = self._conn
        if conn is None or not self._subs.live:
            return  # the reconnect re-subscribes everything wanted, then flushes
        subs, unsubs = self._subs.commands()
        for command, channels in (("SUBSCRIBE", subs), ("UNSUBSCRIBE", unsubs)):
            if channels:
                self._write(conn, command, *map(self.keys.pubsub, channels))

    def _write(self, conn: Connection, *args: Any) -> None:
        """Queue one command on the pub/sub connection, synchronously.

        No await, so commands reach the socket in the order they were
        decided, which is the order Redis answers them in: the subscription
        table relies on it. A broken connection is the reader's to notice.
        """
        writer = conn._writer  # redis-py's StreamWriter for this connection
        if writer is not None and not writer.is_closing():
            writer.writelines(conn.pack_command(*args))

    # -- the reader ----------------------------------------------------------

    async def _run_reader(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                await self._connect_pubsub()
                attempt = 0
                self.last_error = ""
                await self._read_loop()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError, BrokerUnavailable) as exc:
                # With its cause (a TLS failure says why), once per streak of
                # failures and whenever the reason changes, not at every retry.
                why = describe(exc)
                if self._connected.is_set():
                    log.warning("redis pub/sub lost: %s", why)
                elif why != self.last_error:
                    log.warning("redis pub/sub cannot connect (retrying with backoff): %s", why)
                self.last_error = why
                self.reconnects += 1
            except Exception:
                # Never let the reader die: a dead reader is a silent outage.
                log.exception("redis pub/sub reader failed; reconnecting")
                self.reconnects += 1
            finally:
                self._connected.clear()
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.disconnect()
                    self._conn = None
            if self._closing:
                return
            # Full jitter: spreads a fleet's reconnects after a Redis restart.
            delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
            attempt += 1
            await asyncio.sleep(delay)

    async def _connect_pubsub(self) -> None:
        # redis-py opens the connection (TLS, AUTH/ACL, Sentinel discovery);
        # from then on this engine reads the socket itself (see _read_chunk).
        conn = self.client.connection_pool.make_connection()
        await conn.connect()
        self._conn = conn
        self._parser = hiredis.Reader()
        self._backlog = []
        self._stalled = False
        self._client_id = await self._own_id(conn)
        wanted = self._subs.reconnected()
        names = [self.keys.pubsub(c) for c in wanted]
        if names:
            self._write(conn, "SUBSCRIBE", *names)
            pending = set(names)
            while pending:
                for reply in await asyncio.wait_for(self._read_chunk(conn), self.timeout):
                    if reply[0] == b"subscribe":
                        pending.discard(reply[1].decode())
                        self._on_subscription_reply(reply)
                    else:
                        self._backlog.append(reply)  # handed over after the resync
        if wanted:
            # Fan-in of these channels was interrupted: the node closes their gaps
            # before anything received since is handed over.
            await self._on_resubscribed(wanted)
        self._connected.set()
        self._subs.go_live()
        self._flush()  # what was released while connecting

    async def _read_chunk(self, conn: Connection) -> list[Any]:
        """Every complete reply in the next socket chunk (`redis_pubsub.read_replies`)."""
        return await read_replies(conn, self._parser)

    async def _own_id(self, conn: Connection) -> int | None:
        """The connection's CLIENT ID, which the audit looks itself up by (None: not allowed)."""
        try:
            await conn.send_command("CLIENT", "ID")
            return int(await asyncio.wait_for(conn.read_response(), self.timeout))
        except ResponseError as exc:
            log.warning("CLIENT ID refused (%s): the subscription audit is off", exc)
            return None

    def _on_subscription_reply(self, reply: Any) -> None:
        name = reply[1].decode()
        prefix = self.keys.pubsub_prefix
        if name.startswith(prefix):
            self._subs.reply(reply[0] == b"subscribe", name[len(prefix):])

    async def _read_loop(self) -> None:
        """Read pub/sub messages until the connection fails.

        Reads carry no per-call timeout (that is a timer armed and cancelled
        per message, a measurable share of the cost at thousands a second);
        a separate watchdog pings the connection and drops it when it goes
        silent, which makes this read fail and the reader reconnect.
        """
        conn = self._conn
        assert conn is not None
        self._last_read = time.monotonic()
        watchdog = asyncio.create_task(self._watchdog(conn))
        try:
            backlog, self._backlog = self._backlog, []
            self._handle(backlog)
            while True:
                replies = await self._read_chunk(conn)
                self._last_read = time.monotonic()
                if self._stalled:
                    self._stalled = False
                    log.warning("redis pub/sub answering again: ready")
                self._handle(replies)
        finally:
            watchdog.cancel()
            self._subs.disconnected()

    def _handle(self, replies: list[Any]) -> None:
        prefix = self.keys.pubsub_prefix
        plen = len(prefix)
        wanted = self._wanted
        on_publication = self._on_publication
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                log.warning("redis pub/sub error: %s", reply)
                continue
            kind = reply[0]
            if kind == b"message":
                name = reply[1].decode()
                if name.startswith(prefix):
                    self.messages_in += 1
                    if name[plen:] in wanted:
                        try:
                            pub = Publication.from_json(reply[2])
                        except ValueError as exc:
                            self.bad_records.drop(reply[2], exc)
                            continue
                        on_publication(pub)
            elif kind == b"subscribe" or kind == b"unsubscribe":
                self._on_subscription_reply(reply)

    async def _watchdog(self, conn: Connection) -> None:
        """PING the pub/sub connection when idle; report a stall, then drop the connection.

        A stalled link (no FIN, no RST: a partition, a frozen peer) is not a
        closed one: without this the engine would look ready until TCP gave
        up, minutes later. Silent for `stall_seconds`, the engine is not
        ready (so `/readyz` fails and subscribes answer `unavailable` at
        once); silent for three times that, the connection is dropped and
        the reader reconnects and resynchronises.
        """
        interval = self.stall_seconds / 3
        while True:
            await asyncio.sleep(interval)
            silent = time.monotonic() - self._last_read
            if silent > 3 * self.stall_seconds:
                log.warning("redis pub/sub silent for %.1fs; reconnecting", silent)
                await conn.disconnect()
                return
            if silent > self.stall_seconds and not self._stalled:
                self._stalled = True
                self.stalls += 1
                log.warning("redis pub/sub silent for %.1fs: not ready", silent)
            if silent >= interval:
                self._write(conn, "PING")

    # -- the audit ------------------------------------------------------------

    async def _audit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.audit_seconds)
            try:
                await self.audit()
            except (BrokerUnavailable, RedisError) as exc:
                log.debug("subscription audit skipped: %s", exc)

    async def audit(self) -> int:
        """Compare this connection's subscriptions in Redis with the table; repair drift.

        Redis's own count for the pub/sub connection (`CLIENT LIST ID`,
        field `sub`) must equal what the table says it holds whenever nothing
        is in flight. If not, whatever the cause, the difference is counted
        (`herald_broker_subscription_drift`) and the connection dropped: the
        reconnect subscribes exactly what is wanted and the node closes every
        gap. Returns the drift found (0 when in step, or when the table moved
        while it looked: the next audit looks again).
        """
        conn, subs = self._conn, self._subs
        if conn is None or self._client_id is None or not subs.live or not subs.quiescent:
            return 0
        mark = subs.sent
        listing = await self._cmd(
            self.client.execute_command("CLIENT", "LIST", "ID", str(self._client_id))
        )
        if conn is not self._conn or not subs.live or subs.sent != mark or not subs.quiescent:
            return 0
        fields = dict(item.split("=", 1) for item in _text(listing).split() if "=" in item)
        if "sub" not in fields:
            return 0  # the connection is gone: the reader is reconnecting anyway
        held, expected = int(fields["sub"]), subs.expected()
        if held == expected:
            return 0
        drift = abs(held - expected)
        self.drift += drift
        log.warning(
            "redis holds %d subscriptions for this gateway, which expects %d; resubscribing",
            held, expected,
        )
        await conn.disconnect()
        return drift
