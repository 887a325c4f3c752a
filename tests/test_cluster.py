"""Many gateway processes, one real Redis: one service, nothing lost.

Every gateway here is a real `herald serve` process; clients are real
WebSocket clients that hop between them.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from gateway.broker.memory import MemoryBroker  # noqa: F401 - documents the other engine
from gateway.broker.redis import RedisBroker
from gateway.sdk.publisher import HttpPublisher, RedisPublisher
from tests.conftest import API_KEY, GatewayProcess, WsClient, api_headers, token

BIG_HISTORY = orjson.dumps({"public": {"history_size": 5000}}).decode()


async def connect(
    gw: GatewayProcess, sub: str, *, wait: float = 10.0, **claims: Any
) -> WsClient:
    conn = await websockets.connect(
        gw.ws_url, additional_headers={"Authorization": f"Bearer {token(sub, **claims)}"},
        max_queue=None, open_timeout=wait,
    )
    client = WsClient(conn)
    await client.expect("connected", wait)
    await client.expect("subscribed", wait)
    return client


async def http_json(url: str, **kwargs: Any) -> tuple[int, Any]:
    try:
        resp = await AsyncHTTPClient().fetch(url, **kwargs)
    except HTTPClientError as exc:
        assert exc.response is not None
        return exc.code, orjson.loads(exc.response.body)
    return resp.code, orjson.loads(resp.body)


async def wait_until(predicate: Any, timeout: float = 15.0, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(every)


async def test_a_publication_on_one_gateway_reaches_subscribers_on_all(redis_url, spawn_gateway):
    gws = [spawn_gateway(f"gw-{i}", HERALD_REDIS_URL=redis_url) for i in range(3)]
    clients = [await connect(gw, f"u{i}") for i, gw in enumerate(gws)]
    for c in clients:
        assert (await c.request({"type": "subscribe", "channel": "public:news"}))["type"] == (
            "subscribed"
        )
    async with HttpPublisher(gws[0].url, API_KEY) as pub:
        pos = await pub.publish("public:news", "headline", {"title": "hello"})
    for c in clients:
        msg = await c.expect("message")
        assert (msg["epoch"], msg["offset"], msg["data"]) == (
            pos["epoch"], pos["offset"], {"title": "hello"},
        )
    for c in clients:
        await c.close()


async def test_clients_hopping_between_gateways_get_every_message_once_in_order(
    redis_url, spawn_gateway
):
    """Property-style: random disconnects and reconnects to another gateway."""
    rng = random.Random(20261122)
    gws = [
        spawn_gateway(f"gw-{i}", HERALD_REDIS_URL=redis_url, HERALD_NAMESPACES=BIG_HISTORY)
        for i in range(3)
    ]
    total = 2000
    channel = "public:stream"
    done = asyncio.Event()

    async def viewer(name: str) -> list[int]:
        seen: list[int] = []
        epoch: str | None = None
        hops = 0
        gw = rng.choice(gws)
        while True:
            client = await connect(gw, name)
            req: dict[str, Any] = {"type": "subscribe", "channel": channel}
            if epoch is not None:
                req["since"] = {"epoch": epoch, "offset": seen[-1] if seen else 0}
            reply = await client.request(req)
            assert reply["type"] == "subscribed", reply
            if epoch is not None:
                assert reply["recovered"] is True, reply
            epoch = reply["epoch"]
            budget = rng.randint(50, 400)
            while budget and not (seen and seen[-1] == total):
                msg = await client.expect("message", timeout=20)
                seen.append(msg["offset"])
                budget -= 1
            await client.close()
            if seen and seen[-1] == total:
                return seen
            hops += 1
            gw = rng.choice([g for g in gws if g is not gw])  # always another gateway
            await asyncio.sleep(rng.uniform(0, 0.05))

    viewers = [asyncio.create_task(viewer(f"viewer-{i}")) for i in range(8)]
    await asyncio.sleep(0.5)
    publishers = [HttpPublisher(gw.url, API_KEY) for gw in gws]
    for i in range(total):
        await publishers[i % 3].publish(channel, "tick", {"i": i})
    for p in publishers:
        await p.close()
    done.set()
    results = await asyncio.wait_for(asyncio.gather(*viewers), 120)
    for seen in results:
        assert seen == list(range(seen[0], total + 1))  # exactly once, in order, no gap
        assert seen[0] == 1 or seen[0] > 1  # joined at the start or later, never mid-gap


async def test_redis_killed_and_restarted_clients_stay_and_refetch_state(
    redis_process, redis_url, spawn_gateway
):
    gws = [spawn_gateway(f"gw-{i}", HERALD_REDIS_URL=redis_url) for i in range(2)]
    async with RedisPublisher(redis_url) as pub:
        await pub.register_job("j1", "alice")
        await pub.job_progress("j1", "alice", "processing", 10, stage="download")
    clients = [await connect(gw, "alice") for gw in gws]
    for c in clients:
        reply = await c.request({"type": "subscribe", "channel": "job:j1"})
        assert reply["state"]["progress"]["progress"] == 10
        old_epoch = reply["epoch"]

    redis_process.stop()

    async def not_ready() -> bool:
        codes = [(await http_json(f"{gw.url}/readyz"))[0] for gw in gws]
        return all(code == 503 for code in codes)

    await wait_until(not_ready)
    # Publishing during the outage is refused with `unavailable`, not lost silently.
    code, body = await http_json(
        f"{gws[0].url}/api/v1/publish", method="POST", headers=api_headers(),
        body=orjson.dumps({"channel": "job:j1", "event": "progress", "data": {}}),
    )
    assert (code, body["error"]) == (503, "unavailable")
    # Subscribing is refused the same way, and the connection stays open.
    err = await clients[0].request({"type": "subscribe", "channel": "public:x", "id": 7})
    assert (err["type"], err["code"], err["id"]) == ("error", "unavailable", 7)
    assert (await clients[0].request({"type": "ping"}))["type"] == "pong"

    redis_process.start()  # empty: every channel's history is gone

    async def ready() -> bool:
        codes = [(await http_json(f"{gw.url}/readyz"))[0] for gw in gws]
        return all(code == 200 for code in codes)

    await wait_until(ready, timeout=30)
    # Each client is told its channel lost its history: a new epoch, refetch state.
    for c in clients:
        reset = await c.expect("subscribed", timeout=15)
        assert reset["channel"] in {"job:j1", "user:alice"}
        while reset["channel"] != "job:j1":
            reset = await c.expect("subscribed", timeout=15)
        assert reset["recovered"] is False
        assert reset["epoch"] != old_epoch
    async with RedisPublisher(redis_url) as pub:
        await pub.register_job("j1", "alice")
        for pct in (20, 30, 40):
            await pub.job_progress("j1", "alice", "processing", pct)
    for c in clients:
        got = []
        while len(got) < 3:
            msg = await c.recv(timeout=10)
            if msg["type"] == "message" and msg["channel"] == "job:j1":
                got.append(msg["data"]["progress"])
        assert got == [20, 30, 40]  # nothing after the restart is lost
        await c.close()


async def test_a_gateway_killed_with_sigkill_its_clients_resume_on_another(
    redis_url, spawn_gateway
):
    a = spawn_gateway("gw-a", HERALD_REDIS_URL=redis_url)
    b = spawn_gateway("gw-b", HERALD_REDIS_URL=redis_url)
    client = await connect(a, "bob")
    reply = await client.request({"type": "subscribe", "channel": "public:feed"})
    epoch = reply["epoch"]
    async with RedisPublisher(redis_url) as pub:
        for i in range(5):
            await pub.publish("public:feed", "tick", {"i": i})
        last = [(await client.expect("message"))["offset"] for _ in range(5)][-1]
        a.signal(signal.SIGKILL)
        code = await client.closed()
        assert code in (None, 1006)  # the process died: no close frame
        for i in range(5, 12):
            await pub.publish("public:feed", "tick", {"i": i})
    client = await connect(b, "bob")
    reply = await client.request(
        {"type": "subscribe", "channel": "public:feed", "since": {"epoch": epoch, "offset": last}}
    )
    assert reply["recovered"] is True
    replayed = [(await client.expect("message"))["data"]["i"] for _ in range(7)]
    assert replayed == list(range(5, 12))
    await client.close()


async def test_each_gateway_receives_only_its_own_clients_channels(redis_url, spawn_gateway):
    a = spawn_gateway("gw-a", HERALD_REDIS_URL=redis_url)
    b = spawn_gateway("gw-b", HERALD_REDIS_URL=redis_url)
    ca = await connect(a, "ann", channels=["dash:a*"])
    cb = await connect(b, "ben", channels=["dash:b*"])
    for c, ch in ((ca, "dash:a1"), (ca, "dash:a2"), (cb, "dash:b1")):
        assert (await c.request({"type": "subscribe", "channel": ch}))["type"] == "subscribed"
    r = aioredis.Redis.from_url(redis_url)
    watched = sorted(c.decode() for c in await r.pubsub_channels("herald:pub:*"))
    assert watched == [
        "herald:pub:dash:a1", "herald:pub:dash:a2", "herald:pub:dash:b1",
        "herald:pub:user:ann", "herald:pub:user:ben",
    ]
    async with RedisPublisher(redis_url) as pub:
        for i in range(10):
            await pub.publish("dash:a1", "m", {"i": i})
            await pub.publish("dash:b1", "m", {"i": i})
            await pub.publish("dash:c1", "m", {"i": i})  # nobody watches it
    for c in (ca, cb):
        for _ in range(10):
            await c.expect("message")
    stats_a = (await http_json(f"{a.url}/api/v1/stats", headers=api_headers()))[1]
    stats_b = (await http_json(f"{b.url}/api/v1/stats", headers=api_headers()))[1]
    assert stats_a["broker_messages_in"] == 10
    assert stats_b["broker_messages_in"] == 10
    await r.aclose()
    await ca.close()
    await cb.close()


async def test_registry_agrees_with_real_connection_counts(redis_url, spawn_gateway):
    a = spawn_gateway("gw-a", HERALD_REDIS_URL=redis_url)
    b = spawn_gateway("gw-b", HERALD_REDIS_URL=redis_url)
    on_a = [await connect(a, f"a{i}") for i in range(7)]
    on_b = [await connect(b, f"b{i}") for i in range(3)]
    changed = time.time()

    async def counts_after(moment: float) -> dict[str, int] | None:
        code, body = await http_json(f"{a.url}/api/v1/cluster", headers=api_headers())
        assert code == 200
        nodes = {n["node"]: n for n in body["nodes"]}
        if set(nodes) != {"gw-a", "gw-b"} or any(n["updated"] < moment for n in nodes.values()):
            return None  # no write since the change yet: within one heartbeat there is
        return {k: n["connections"] for k, n in nodes.items()}

    async def settled() -> bool:
        return await counts_after(changed) is not None

    await wait_until(settled, timeout=10)
    assert await counts_after(changed) == {"gw-a": 7, "gw-b": 3}
    for c in on_a[:2]:
        await c.close()
    await asyncio.sleep(0.2)
    changed = time.time()
    await wait_until(settled, timeout=10)
    assert await counts_after(changed) == {"gw-a": 5, "gw-b": 3}
    b.signal(signal.SIGTERM)  # a clean exit leaves the registry at once
    b.wait()
    _, body = await http_json(f"{a.url}/api/v1/cluster", headers=api_headers())
    assert [n["node"] for n in body["nodes"]] == ["gw-a"]
    for c in on_a[2:] + on_b:
        await c.close()


async def test_a_hot_channel_with_5000_subscribers_gets_everything(redis_url, spawn_gateway):
    gw = spawn_gateway("gw-hot", HERALD_REDIS_URL=redis_url)
    sem = asyncio.Semaphore(100)

    async def viewer(i: int) -> WsClient:
        async with sem:  # generous waits: 5,000 clients share the CPU with the gateway
            c = await connect(gw, f"v{i}", wait=60)
            reply = await c.request({"type": "subscribe", "channel": "public:hot"}, 60)
            assert reply["type"] == "subscribed"
            return c

    clients = await asyncio.gather(*(viewer(i) for i in range(5000)))
    async with RedisPublisher(redis_url) as pub:
        for i in range(10):
            await pub.publish("public:hot", "tick", {"i": i})

    async def drain(c: WsClient) -> list[int]:
        return [(await c.expect("message", timeout=120))["data"]["i"] for _ in range(10)]

    received = await asyncio.gather(*(drain(c) for c in clients))
    assert all(r == list(range(10)) for r in received)
    await asyncio.gather(*(c.close() for c in clients))


async def test_subscribes_in_one_loop_turn_go_to_redis_as_one_command(redis_url):
    broker = RedisBroker(redis_url)
    await broker.start()
    r = aioredis.Redis.from_url(redis_url)
    await r.config_resetstat()
    await asyncio.gather(*(broker.subscribe([f"user:u{i}"]) for i in range(1000)))
    stats = await r.info("commandstats")
    assert stats["cmdstat_subscribe"]["calls"] == 1
    assert len(await r.pubsub_channels("herald:pub:*")) == 1000
    await broker.close()
    await r.aclose()


async def test_publish_survives_a_script_cache_flush(redis_url):
    async with RedisPublisher(redis_url) as pub:
        first = await pub.publish("public:x", "m", {})
        r = aioredis.Redis.from_url(redis_url)
        await r.script_flush()  # as after a Redis restart or failover: NOSCRIPT
        second = await pub.publish("public:x", "m", {})
        await r.aclose()
    assert second["offset"] == first["offset"] + 1
