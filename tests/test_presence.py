"""The presence contract on both implementations, and Redis expiry of a dead gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.broker.presence import Member, MemoryPresence, Presence
from gateway.broker.redis_presence import RedisPresence
from gateway.cluster.connect import connect


@pytest.fixture(params=["memory", "redis"])
async def make_presence(request, redis_url) -> AsyncIterator[Callable[..., Presence]]:
    made: list[Presence] = []
    shared = MemoryPresence()

    async def make(ttl: float = 3.0) -> Presence:
        if request.param == "memory":
            return shared  # one process: every "gateway" shares it
        p = RedisPresence(connect(redis_url), ttl=ttl)
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


async def test_a_redis_gateway_that_stops_refreshing_loses_its_members(redis_url):
    alive = RedisPresence(connect(redis_url), ttl=0.6)
    dead = RedisPresence(connect(redis_url), ttl=0.6)
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
