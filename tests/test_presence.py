"""The presence contract on both implementations, and Redis expiry of a dead gateway."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncIterator, Callable

import orjson
import pytest

from gateway.broker.presence import Member, MemoryPresence, Presence
from gateway.broker.redis_presence import RedisPresence
from gateway.cluster import connect as links
from gateway.cluster.connect import connect as redis_connect
from tests.conftest import api_headers, token
from tests.support import http
from tests.test_cluster import connect, http_json, wait_until


@pytest.fixture(params=["memory", "redis", "cluster"])
async def make_presence(request) -> AsyncIterator[Callable[..., Presence]]:
    made: list[Presence] = []
    shared = MemoryPresence()
    url = {"redis": "redis_url", "cluster": "redis_cluster_url"}.get(request.param)
    url = request.getfixturevalue(url) if url else ""

    async def make(ttl: float = 3.0) -> Presence:
        if request.param == "memory":
            return shared  # one process: every "gateway" shares it
        p = RedisPresence(redis_connect(url), ttl=ttl)
        await p.start()
        made.append(p)
        return p

    yield make
    for p in made:
        await p.close()


def events_of(p: Presence) -> list[tuple[str, str, str]]:
    seen: list[tuple[str, str, str]] = []
    p.bind(lambda kind, channel, m: seen.append((kind, channel, m.client)))
    return seen


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_join_list_leave_and_events_across_instances(make_presence):
    a, b = await make_presence(), await make_presence()
    seen = events_of(b)
    await b.watch("room:1")
    await asyncio.sleep(0.1)  # the watch's SUBSCRIBE is on the wire
    m1 = Member("c-1", "alice", 1700000000.5, {"name": "Alice"})
    m2 = Member("c-2", "bob", 1700000001.0)
    assert await a.join("room:1", m1, 10)
    assert await a.join("room:1", m1, 10)  # again: no second entry, no second event
    assert await a.join("room:1", m2, 10)
    assert await a.join("room:2", Member("c-3", "carol", 1.0), 10)  # not watched
    listed = await b.members("room:1")
    assert sorted(listed, key=lambda m: m.client) == [m1, m2]
    await a.leave("room:1", m1)
    await a.leave("room:1", m1)  # twice: one event
    await until(lambda: len(seen) == 3)
    await asyncio.sleep(0.1)
    assert seen == [("join", "room:1", "c-1"), ("join", "room:1", "c-2"),
                    ("leave", "room:1", "c-1")]
    assert [m.client for m in await a.members("room:1")] == ["c-2"]
    await b.unwatch("room:1")
    await a.leave("room:1", m2)
    await asyncio.sleep(0.1)
    assert len(seen) == 3  # no longer watched


async def test_a_channel_lists_at_most_its_limit(make_presence):
    p = await make_presence()
    assert await p.join("room:x", Member("c-1", "u", 1.0), 2)
    assert await p.join("room:x", Member("c-2", "u", 1.0), 2)
    assert not await p.join("room:x", Member("c-3", "u", 1.0), 2)
    assert len(await p.members("room:x")) == 2


async def test_a_reader_that_loses_its_cancellation_is_cancelled_again(redis_url):
    # What CI saw: the events reader went on polling Redis after close()
    # cancelled it, and close() waited on it until the test timed out. Here
    # a real reader loop swallows the first cancellation the same way.
    client = redis_connect(redis_url)
    cancels = 0

    async def reader() -> None:
        nonlocal cancels
        pubsub = client.pubsub()
        await pubsub.subscribe("herald:test-stop")
        try:
            while True:
                try:
                    await pubsub.get_message(timeout=5.0)
                except asyncio.CancelledError:
                    cancels += 1
                    if cancels > 1:
                        raise
        finally:
            await pubsub.aclose()

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.1)
    await asyncio.wait_for(links.stop(task), 3)
    assert task.cancelled() and cancels == 2
    await client.aclose()


async def test_a_task_that_never_stops_is_left_with_a_warning_not_waited_for(
    monkeypatch, caplog
):
    monkeypatch.setattr(links, "STOP_ATTEMPTS", 3)
    monkeypatch.setattr(links, "STOP_WAIT", 0.05)
    done = asyncio.Event()

    async def stubborn() -> None:
        while not done.is_set():
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                pass

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    await asyncio.wait_for(links.stop(task), 2)
    assert not task.done()
    assert "task stubborn did not stop after 3 cancellations" in caplog.text
    done.set()
    task.cancel()
    await asyncio.wait({task}, timeout=2)


@pytest.mark.parametrize("url_fixture", ["redis_url", "redis_cluster_url"])
async def test_a_redis_gateway_that_stops_refreshing_loses_its_members(request, url_fixture):
    url = request.getfixturevalue(url_fixture)
    alive = RedisPresence(redis_connect(url), ttl=0.6)
    dead = RedisPresence(redis_connect(url), ttl=0.6)
    await alive.start()
    await dead.start()
    seen = events_of(alive)
    await alive.watch("room:k")
    await alive.join("room:k", Member("c-live", "u1", 1.0), 10)
    await dead.join("room:k", Member("c-dead", "u2", 1.0), 10)
    for task in dead._tasks:  # the process dies: no refresh, no leave
        task.cancel()
    await asyncio.sleep(0.3)
    assert {m.client for m in await alive.members("room:k")} == {"c-live", "c-dead"}
    # Within ttl + ttl/3 the survivor's refresh expires it and announces the leave.
    await until(lambda: ("leave", "room:k", "c-dead") in seen, timeout=0.6 * 4 / 3 + 1.0)
    assert [m.client for m in await alive.members("room:k")] == ["c-live"]
    assert ("leave", "room:k", "c-live") not in seen  # the live one is kept alive
    await alive.close()


async def test_a_presence_record_that_is_not_one_costs_only_itself(redis_url):
    """Bytes on a presence events channel or in a channel's member hash that
    Herald did not write: each is dropped and counted, the events reader keeps
    reading (before, it restarted and lost the events of the next second),
    and the listing shows the members that are members."""
    store = RedisPresence(redis_connect(redis_url), ttl=3.0)
    await store.start()
    try:
        seen = events_of(store)
        await store.watch("room:bad")
        await asyncio.sleep(0.1)  # the watch's SUBSCRIBE is on the wire
        raw = redis_connect(redis_url)
        for junk in (b"not json", b'{"k":"join","m":{"c":1}}', b'{"m":{}}'):
            await raw.publish(store._events("room:bad"), junk)
        await raw.hset(store._keys("room:bad")[0], "c-junk", b"[]")
        await store.join("room:bad", Member("c-ok", "u", 1.0), 10)
        await until(lambda: len(seen) == 1)
        assert seen == [("join", "room:bad", "c-ok")]
        assert [m.client for m in await store.members("room:bad")] == ["c-ok"]
        assert store.bad_records.count == 4
        await raw.aclose()
    finally:
        await store.close()


# -- through gateways ---------------------------------------------------------

ROOMS = orjson.dumps({"room": {"access": "authenticated", "presence": True, "join_leave": True,
                               "presence_limit": 500}}).decode()


async def test_presence_and_join_leave_on_one_gateway(make_gateway, ws_client):
    gw = await make_gateway(namespaces=ROOMS)
    watcher = await ws_client(gw, token("w", extra={"info": {"name": "Watcher"}}))
    reply = await watcher.request(
        {"type": "subscribe", "channel": "room:1", "join_leave": True, "id": 1})
    assert reply["type"] == "subscribed", reply
    other = await ws_client(gw, token("o"))
    await other.request({"type": "subscribe", "channel": "room:1", "id": 2})
    joined = await watcher.expect("join")  # the other's join; not its own
    assert joined == {"type": "join", "channel": "room:1", "client": joined["client"],
                      "user": "o"}
    status, body = await http(gw, "GET", "/api/v1/channels/room:1/presence", None, api_headers())
    assert status == 200 and body["count"] == 2, body
    by_user = {c["user"]: c for c in body["clients"]}
    assert by_user["w"]["info"] == {"name": "Watcher"} and "info" not in by_user["o"]
    assert by_user["o"]["client"] == joined["client"] and by_user["o"]["since"].endswith("Z")
    # a JWT allowed to subscribe reads it too
    status, body = await http(gw, "GET", "/api/v1/channels/room:1/presence", None,
                              {"Authorization": f"Bearer {token('x')}"})
    assert (status, body["count"]) == (200, 2)
    await other.request({"type": "unsubscribe", "channel": "room:1", "id": 3})
    left = await watcher.expect("leave")
    assert (left["user"], left["client"]) == ("o", joined["client"])
    await other.request({"type": "subscribe", "channel": "room:1", "id": 4})
    assert (await watcher.expect("join"))["user"] == "o"
    await other.close()
    assert (await watcher.expect("leave"))["user"] == "o"
    status, body = await http(gw, "GET", "/api/v1/channels/room:1/presence", None, api_headers())
    assert [c["user"] for c in body["clients"]] == ["w"]


async def test_presence_is_off_unless_the_namespace_enables_it(make_gateway, ws_client):
    gw = await make_gateway(namespaces=ROOMS)
    client = await ws_client(gw, token("u"))
    reply = await client.request(
        {"type": "subscribe", "channel": "public:x", "join_leave": True, "id": 1})
    assert (reply["type"], reply["code"]) == ("error", "bad_request")
    status, body = await http(gw, "GET", "/api/v1/channels/public:x/presence", None,
                              api_headers())
    assert (status, body["error"]) == (404, "not_found")
    status, body = await http(gw, "GET", "/api/v1/channels/room:1/presence")
    assert (status, body["error"]) == (401, "unauthorized")
    plain = await make_gateway()
    assert plain.node.presence is None  # no presence namespace: no store at all


async def test_presence_across_three_gateways_and_a_killed_one(redis_url, spawn_gateway):
    ttl = 1.5
    env = {"HERALD_REDIS_URL": redis_url, "HERALD_NAMESPACES": ROOMS,
           "HERALD_PRESENCE_TTL": str(ttl)}
    gws = [spawn_gateway(f"gw-{i}", **env) for i in range(3)]
    watcher = await connect(gws[0], "watcher")
    assert (await watcher.request({"type": "subscribe", "channel": "room:k",
                                   "join_leave": True, "id": 1}))["type"] == "subscribed"
    others = []
    for i, gw in enumerate([gws[1], gws[2], gws[2]]):
        c = await connect(gw, f"u{i}")
        await c.request({"type": "subscribe", "channel": "room:k", "id": 1})
        others.append(c)
    joins = {(await watcher.expect("join"))["user"] for _ in range(3)}
    assert joins == {"u0", "u1", "u2"}  # seen on gw-0, joined on gw-1 and gw-2
    status, body = await http_json(gws[1].url + "/api/v1/channels/room:k/presence",
                                   headers=api_headers())
    assert (status, body["count"]) == (200, 4)
    await others[0].close()  # a clean leave on gw-1
    assert (await watcher.expect("leave"))["user"] == "u0"
    gws[2].signal(signal.SIGKILL)  # u1, u2 never say goodbye
    killed = time.monotonic()
    bound = ttl * 4 / 3
    leaves = {(await watcher.expect("leave", timeout=bound + 3.0))["user"] for _ in range(2)}
    assert leaves == {"u1", "u2"}
    assert time.monotonic() - killed < bound + 3.0  # the documented bound, plus scheduling
    _, body = await http_json(gws[0].url + "/api/v1/channels/room:k/presence",
                              headers=api_headers())
    assert [c["user"] for c in body["clients"]] == ["watcher"]


async def test_presence_counts_stay_exact_under_200_clients_churning(redis_url, spawn_gateway):
    rng = random.Random(13)
    env = {"HERALD_REDIS_URL": redis_url, "HERALD_NAMESPACES": ROOMS}
    gws = [spawn_gateway(f"gw-{i}", **env) for i in range(3)]
    clients = await asyncio.gather(*(connect(gws[i % 3], f"c{i}") for i in range(200)))
    subscribed: set[int] = set()

    async def toggle(i: int) -> None:
        kind = "unsubscribe" if i in subscribed else "subscribe"
        reply = await clients[i].request({"type": kind, "channel": "room:churn", "id": 1})
        assert reply["type"] == kind + "d", reply
        (subscribed.discard if kind == "unsubscribe" else subscribed.add)(i)

    for _ in range(4):  # rounds of concurrent subscribes and unsubscribes
        picks = rng.sample(range(200), 120)
        await asyncio.gather(*(toggle(i) for i in picks))
        for gw in gws:
            status, body = await http_json(gw.url + "/api/v1/channels/room:churn/presence",
                                           headers=api_headers())
            assert status == 200 and body["count"] == len(subscribed)
            assert {c["user"] for c in body["clients"]} == {f"c{i}" for i in subscribed}
    gone = rng.sample(sorted(subscribed), 30)
    await asyncio.gather(*(clients[i].close() for i in gone))
    subscribed -= set(gone)

    async def settled() -> bool:
        _, body = await http_json(gws[0].url + "/api/v1/channels/room:churn/presence",
                                  headers=api_headers())
        return body["count"] == len(subscribed)

    await wait_until(settled, timeout=10)
    await asyncio.gather(*(c.close() for i, c in enumerate(clients) if i not in gone))
