"""Gateways on a real Redis Cluster: sharded fan-in, failover, resharding.

Every gateway is a real `herald serve` process on `redis+cluster://`; the
cluster is six real `redis-server` processes (tests/redis_cluster.py);
clients are real WebSocket clients. Faults are real: a master SIGKILLed
(its replica promoted), a slot moved with its keys, a whole shard down.

What must hold through each: no HTTP 500 (a publish answers 200 or 503
`unavailable`), no client socket dropped, and per client and channel either
every offset exactly once, or an unsolicited `subscribed` with
`recovered: false` (the epoch changed) before the next offsets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import websockets
from redis.crc import key_slot
from tornado.httpclient import AsyncHTTPClient

from gateway.broker.presence import Member
from gateway.broker.redis_cluster import RedisClusterBroker
from gateway.broker.redis_presence import RedisPresence
from gateway.broker.redis_scripts import SPUBLISH, Keys
from gateway.cluster.connect import connect
from gateway.protocol.channels import Access, Namespace
from herald_operator.registry import Registry
from tests.conftest import GatewayProcess, WsClient, api_headers, token
from tests.redis_cluster import RedisCluster, command

KEYS = Keys()


def slot_of(channel: str) -> int:
    return key_slot(KEYS.shard_pubsub(channel).encode())


def channels_per_shard(cluster: RedisCluster, per_shard: int, prefix: str) -> dict[int, list[str]]:
    """`per_shard` public channels on each master, by master port."""
    found: dict[int, list[str]] = {m.port: [] for m in cluster.masters()}
    i = 0
    while any(len(v) < per_shard for v in found.values()):
        channel = f"public:{prefix}-{i}"
        port = cluster.owner_port(slot_of(channel))
        if len(found[port]) < per_shard:
            found[port].append(channel)
        i += 1
    return found


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.1)


async def publish(gw: GatewayProcess, channel: str, n: int) -> tuple[int, Any]:
    body = orjson.dumps({"channel": channel, "event": "n", "data": {"n": n}})
    resp = await AsyncHTTPClient().fetch(
        f"{gw.url}/api/v1/publish", method="POST", headers=api_headers(), body=body,
        raise_error=False, request_timeout=15,
    )
    return resp.code, orjson.loads(resp.body) if resp.body else None


class Watcher:
    """A real WebSocket client that checks every channel's sequence as it arrives."""

    def __init__(self, client: WsClient, name: str) -> None:
        self.client = client
        self.name = name
        self.position: dict[str, tuple[str, int]] = {}
        self.resets: dict[str, int] = {}
        self.new_epochs: dict[str, int] = {}
        self.faults: list[str] = []
        self.closed = False
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, gw: GatewayProcess, name: str, channels: list[str]) -> Watcher:
        conn = await websockets.connect(
            gw.ws_url, additional_headers={"Authorization": f"Bearer {token(name)}"},
            max_queue=None,
        )
        client = WsClient(conn)
        await client.expect("connected")
        await client.expect("subscribed")  # its own user: channel
        watcher = cls(client, name)
        for i, channel in enumerate(channels):
            reply = await client.request({"type": "subscribe", "channel": channel, "id": i + 1})
            assert reply["type"] == "subscribed", reply
            watcher.position[channel] = (reply["epoch"], reply["offset"])
        watcher._task = asyncio.create_task(watcher._read())
        return watcher

    async def _read(self) -> None:
        try:
            async for raw in self.client.conn:
                msg = orjson.loads(raw)
                channel = msg.get("channel")
                if channel not in self.position:
                    continue
                if msg["type"] == "subscribed" and msg.get("recovered") is False:
                    # Told the history was lost: start again from this position.
                    self.resets[channel] = self.resets.get(channel, 0) + 1
                    if msg["epoch"] != self.position[channel][0]:
                        self.new_epochs[channel] = self.new_epochs.get(channel, 0) + 1
                    self.position[channel] = (msg["epoch"], msg["offset"])
                elif msg["type"] == "message":
                    epoch, offset = self.position[channel]
                    if msg["epoch"] != epoch:
                        self.faults.append(f"{channel}: epoch {msg['epoch']} without a reset")
                    elif msg["offset"] != offset + 1:
                        kind = "duplicate" if msg["offset"] <= offset else "gap"
                        self.faults.append(f"{channel}: {kind} {offset} -> {msg['offset']}")
                    self.position[channel] = (msg["epoch"], msg["offset"])
        except websockets.ConnectionClosed:
            pass
        self.closed = True

    async def close(self) -> None:
        await self.client.close()
        if self._task is not None:
            await self._task


async def publish_through(
    gws: list[GatewayProcess], channels: list[str], rounds: int,
    fault: Callable[[], Awaitable[None]] | None = None, fault_at: int = 0,
) -> tuple[dict[str, tuple[str, int]], dict[int, int]]:
    """Publish `rounds` times to every channel (round-robin over gateways), retrying 503s.

    Returns the last position published per channel, and HTTP statuses seen.
    """
    last: dict[str, tuple[str, int]] = {}
    statuses: dict[int, int] = {}
    fault_task: asyncio.Task[None] | None = None
    for n in range(rounds):
        if fault is not None and n == fault_at:
            fault_task = asyncio.create_task(fault())
        for i, channel in enumerate(channels):
            gw = gws[(n + i) % len(gws)]
            for _attempt in range(100):
                status, reply = await publish(gw, channel, n)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    last[channel] = (reply["epoch"], reply["offset"])
                    break
                assert status == 503, (status, reply)
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"publishing to {channel} stayed unavailable")
        await asyncio.sleep(0.01)
    if fault_task is not None:
        await fault_task
    return last, statuses


async def settled(watchers: list[Watcher], last: dict[str, tuple[str, int]]) -> None:
    """Every watcher ends where the publisher ended, on every channel it watches."""

    async def done() -> bool:
        return all(w.position[c] == last[c] for w in watchers for c in w.position if c in last)

    try:
        await wait_until(done, timeout=20)
    except pytest.fail.Exception:
        behind = {w.name: {c: (w.position[c], last[c]) for c in w.position
                           if c in last and w.position[c] != last[c]} for w in watchers}
        pytest.fail(f"clients did not catch up: {behind}")


async def spawn_on(spawn_gateway: Callable[..., GatewayProcess], url: str, count: int
                   ) -> list[GatewayProcess]:
    """`count` gateways on the cluster, each ready (its engine has the slot map)."""
    gws = [spawn_gateway(f"gw-c{i}", HERALD_REDIS_URL=url) for i in range(count)]
    for gw in gws:
        async def is_ready(gw: GatewayProcess = gw) -> bool:
            return (await ready(gw))[0] == 200
        await wait_until(is_ready, timeout=15)
    return gws


async def test_three_gateways_deliver_across_shards_and_each_shard_carries_only_watched_channels(
    redis_cluster, redis_cluster_url, spawn_gateway
):
    gws = await spawn_on(spawn_gateway, redis_cluster_url, 3)
    shards = channels_per_shard(redis_cluster, 2, "across")
    every = [c for chans in shards.values() for c in chans]
    watched = every[:-1]  # one channel nobody watches
    watchers = [await Watcher.connect(gw, f"w{i}", watched) for i, gw in enumerate(gws)]
    last, statuses = await publish_through(gws, every, rounds=5)
    assert statuses == {200: 5 * len(every)}
    await settled(watchers, last)
    assert all(not w.faults and not w.resets for w in watchers), [w.faults for w in watchers]

    # Sharded fan-in: each master holds exactly the channels some client watches.
    users = {KEYS.shard_pubsub(f"user:w{i}") for i in range(3)}
    for port, chans in shards.items():
        on_shard = redis_cluster.shard_channels(port)
        expected = {KEYS.shard_pubsub(c) for c in chans if c in watched}
        assert on_shard - users == expected, (port, on_shard)
    assert KEYS.shard_pubsub(every[-1]) not in set().union(
        *(redis_cluster.shard_channels(p) for p in shards))

    # A channel no client watches any more leaves its shard.
    for w in watchers:
        await w.client.send({"type": "unsubscribe", "channel": watched[0]})

    async def gone() -> bool:
        port = redis_cluster.owner_port(slot_of(watched[0]))
        return KEYS.shard_pubsub(watched[0]) not in redis_cluster.shard_channels(port)

    await wait_until(gone, timeout=10)
    for w in watchers:
        await w.close()


async def run_fault(
    redis_cluster: RedisCluster, url: str, spawn_gateway: Callable[..., GatewayProcess],
    fault: Fault,
) -> tuple[list[Watcher], list[str]]:
    """Clients on two gateways watch channels on every shard while a fault hits one shard.

    `fault(channels of the shard)` makes the fault for the shard's slot.
    Returns the watchers and the channels of the shard that was hit.
    """
    gws = await spawn_on(spawn_gateway, url, 2)
    shards = channels_per_shard(redis_cluster, 2, "fault")
    every = [c for chans in shards.values() for c in chans]
    hit = next(iter(shards.values()))
    target = slot_of(hit[0])
    watchers = [await Watcher.connect(gw, f"f{i}", every) for i, gw in enumerate(gws)]

    async def strike() -> None:
        await fault(hit)(target)

    last, statuses = await publish_through(gws, every, rounds=40, fault=strike, fault_at=10)
    assert set(statuses) <= {200, 503}, statuses  # never a 500
    await settled(watchers, last)
    for w in watchers:
        assert not w.faults, w.faults  # no silent gap, no duplicate, no unannounced epoch
        assert not w.closed  # no socket dropped
    # Each gateway's fan-in follows the shard's new owner.
    port = redis_cluster.owner_port(target)
    assert KEYS.shard_pubsub(every[0]) in redis_cluster.shard_channels(port)
    # ...and its readiness follows within a few health rounds (each PINGs every
    # master once a second), not necessarily by the time the last message lands.
    async def all_ready() -> bool:
        return all([(await ready(gw))[0] == 200 for gw in gws])

    await wait_until(all_ready, timeout=15)
    return watchers, hit


Fault = Callable[[list[str]], Callable[[int], Awaitable[None]]]


def in_thread(helper: Callable[[int], Any]) -> Fault:
    """A blocking fixture helper (kill, migrate) as a fault for `run_fault`."""
    def make(hit: list[str]) -> Callable[[int], Awaitable[None]]:
        async def fault(slot: int) -> None:
            await asyncio.to_thread(helper, slot)
        return fault
    return make


async def ready(gw: GatewayProcess) -> tuple[int, Any]:
    resp = await AsyncHTTPClient().fetch(f"{gw.url}/readyz", raise_error=False)
    return resp.code, orjson.loads(resp.body)


async def test_a_master_killed_mid_publish_loses_nothing_silently(
    redis_cluster, redis_cluster_url, spawn_gateway
):
    watchers, _ = await run_fault(redis_cluster, redis_cluster_url, spawn_gateway,
                                  in_thread(redis_cluster.kill_master))
    for w in watchers:
        await w.close()


# The publish script, minus replication: what a master acknowledged and
# delivered but had not yet shipped to its replica when it died.
UNREPLICATED = "redis.set_repl(redis.REPL_NONE)\n" + SPUBLISH


async def test_writes_lost_in_a_failover_are_reported_by_epoch_not_replaced_silently(
    redis_cluster, redis_cluster_url, spawn_gateway
):
    """The promoted replica lacks publications clients already had: they are told to resync.

    Asynchronous replication loses such writes by chance; here they are made
    on purpose (the gateways' publish script with replication off), then the
    master is SIGKILLed for real and its replica promoted.
    """
    lossy = RedisClusterBroker(redis_cluster_url)
    lossy._publish = lossy.client.register_script(UNREPLICATED)
    public = Namespace("public", Access.AUTHENTICATED, history_size=100, history_ttl=300)

    def losing_writes(hit: list[str]) -> Callable[[int], Awaitable[None]]:
        async def fault(slot: int) -> None:
            for channel in hit:
                for n in range(3):
                    await lossy.publish(public, channel, "n", {"lost": n})
            await asyncio.to_thread(redis_cluster.kill_master, slot)
        return fault

    try:
        watchers, hit = await run_fault(redis_cluster, redis_cluster_url, spawn_gateway,
                                        losing_writes)
    finally:
        await lossy.close()
    # (`run_fault` checked that nothing arrived under a new epoch unannounced.)
    # Each channel of the failed shard went to a new epoch, and every client was told.
    for w in watchers:
        assert all(w.new_epochs.get(c, 0) >= 1 for c in hit), (w.name, w.resets, hit)
        await w.close()


async def test_a_slot_migrated_mid_publish_loses_nothing_silently(
    redis_cluster, redis_cluster_url, spawn_gateway
):
    watchers, _ = await run_fault(redis_cluster, redis_cluster_url, spawn_gateway,
                                  in_thread(redis_cluster.migrate_slot))
    # A migration moves the keys with the slot: no epoch changes, nothing to resync.
    assert all(not w.resets for w in watchers), [w.resets for w in watchers]
    for w in watchers:
        await w.close()


async def test_readyz_reflects_a_dead_shard(redis_cluster, redis_cluster_url, spawn_gateway):
    gw = (await spawn_on(spawn_gateway, redis_cluster_url, 1))[0]

    async def is_ready(want: bool) -> bool:
        code, body = await ready(gw)
        return (code == 200) == want and body["broker"] == want

    await wait_until(lambda: is_ready(True))
    dead = redis_cluster.kill_shard(0)
    await wait_until(lambda: is_ready(False), timeout=10)
    redis_cluster.restart(*dead)
    await wait_until(lambda: is_ready(True), timeout=20)


async def test_the_operator_reads_a_clustered_fleet_and_sheds_through_it(
    redis_cluster_url, spawn_gateway
):
    """Registry and control channel on the cluster: the operator's own reader, real gateways."""
    gws = await spawn_on(spawn_gateway, redis_cluster_url, 2)
    watchers = [await Watcher.connect(gws[0], f"o{i}", []) for i in range(2)]
    registry = Registry(redis_cluster_url, "herald:")
    try:
        async def both_listed() -> bool:
            nodes = {n.node: n for n in await registry.nodes()}
            return set(nodes) == {"gw-c0", "gw-c1"} and nodes["gw-c0"].connections == 2

        await wait_until(both_listed, timeout=15)
        await registry.shed("gw-c0", 1)

        async def one_shed() -> bool:
            return sum(w.closed for w in watchers) == 1

        await wait_until(one_shed, timeout=10)
    finally:
        await registry.close()
    for w in watchers:
        await w.close()


async def test_a_connect_storm_queues_for_the_cluster_instead_of_failing(
    redis_cluster_url, spawn_gateway
):
    """300 clients at once: more commands than a node's pool holds, all served.

    redis-py's cluster pools fail at once when full instead of waiting; the
    engine queues its commands, so every client gets its own channel.
    """
    gw = (await spawn_on(spawn_gateway, redis_cluster_url, 1))[0]

    async def one(i: int) -> WsClient:
        conn = await websockets.connect(
            gw.ws_url, additional_headers={"Authorization": f"Bearer {token(f's{i}')}"},
            open_timeout=30,
        )
        client = WsClient(conn)
        await client.expect("connected", 30)
        await client.expect("subscribed", 30)
        return client

    clients = await asyncio.gather(*(one(i) for i in range(300)))
    for client in clients:
        await client.close()


async def test_presence_refreshes_on_a_cluster_even_where_a_master_lacks_its_script(
    redis_cluster, redis_cluster_url
):
    """The cluster client refuses scripts in a pipeline, and cannot load one there either."""
    presence = RedisPresence(connect(redis_cluster_url), ttl=3.0)
    other = RedisPresence(connect(redis_cluster_url), ttl=3.0)
    await presence.start()
    await other.start()
    seen: list[tuple[str, str, str]] = []
    other.bind(lambda kind, channel, m: seen.append((kind, channel, m.client)))
    try:
        await other.watch("room:f")
        # Join/leave events cross the cluster (plain PUBLISH reaches every node).
        for i in range(100):
            await presence.join("room:f", Member(f"p-{i}", "probe", 1.0), 10)
            await asyncio.sleep(0.05)
            if seen:
                break
        assert seen and seen[0][0] == "join"
        for master in redis_cluster.masters():
            assert command(master.port, "SCRIPT", "FLUSH") == "OK"
        await presence.refresh()  # raised before: scripts refused in a cluster pipeline
        assert "p-0" in {m.client for m in await other.members("room:f")}
    finally:
        await presence.close()
        await other.close()
