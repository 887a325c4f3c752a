"""The `Broker` contract, run against both engines: they must be interchangeable.

The memory engine runs in-process; the durable engine in-process on a real
SQLite file in the test's tmp_path; the Redis engine against a real
redis-server; the Redis Cluster engine against a real 3-master cluster.
Each test states a promise of the interface.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.broker.base import Broker, PublishItem
from gateway.broker.durable import DurableBroker
from gateway.broker.memory import MemoryBroker
from gateway.broker.redis import RedisBroker
from gateway.broker.redis_cluster import RedisClusterBroker
from gateway.broker.store import STORE_FILE
from gateway.protocol.channels import Access, Namespace
from gateway.protocol.errors import ProtocolError
from gateway.protocol.publication import Publication

JOB = Namespace("job", Access.OWNER, history_size=5, history_ttl=3600, state=True)
USER = Namespace("user", Access.USER, history_size=100, history_ttl=3600)
SHORT = Namespace("public", Access.AUTHENTICATED, history_size=10, history_ttl=1)


class Recorder:
    def __init__(self) -> None:
        self.pubs: list[Publication] = []
        # Each time the engine said its fan-in of these channels resumed.
        self.resubscribed: list[list[str]] = []
        self.arrived = asyncio.Event()

    def on_pub(self, pub: Publication) -> None:
        self.pubs.append(pub)
        self.arrived.set()

    async def on_resubscribed(self, channels: list[str]) -> None:
        # What the engine had handed over when it asked: nothing received
        # since the interruption may come before the gap is closed.
        self.resubscribed.append(sorted(channels))
        self.pubs_at_resubscribe = len(self.pubs)

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async def until() -> None:
            while len(self.pubs) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(until(), timeout)


@pytest.fixture(params=["memory", "durable", "redis", "cluster"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Broker, Recorder]]:
    if request.param == "memory":
        broker: Broker = MemoryBroker()
    elif request.param == "durable":
        broker = DurableBroker(request.getfixturevalue("tmp_path") / STORE_FILE)
    elif request.param == "redis":
        broker = RedisBroker(request.getfixturevalue("redis_url"))
    else:
        broker = RedisClusterBroker(request.getfixturevalue("redis_cluster_url"))
    rec = Recorder()
    broker.bind(rec.on_pub, rec.on_resubscribed)
    await broker.start()
    yield broker, rec
    await broker.close()


async def test_offsets_count_up_by_one_within_an_epoch(engine):
    broker, _ = engine
    pubs = [await broker.publish(USER, "user:a", "note", {"i": i}) for i in range(5)]
    assert [p.offset for p in pubs] == [1, 2, 3, 4, 5]
    assert len({p.epoch for p in pubs}) == 1
    other = await broker.publish(USER, "user:b", "note", {})
    assert other.offset == 1  # offsets are per channel


async def test_a_read_before_the_first_publish_fixes_the_epoch(engine):
    broker, _ = engine
    snap = await broker.snapshot(USER, "user:new")
    assert snap.offset == 0
    pub = await broker.publish(USER, "user:new", "note", {})
    assert (pub.epoch, pub.offset) == (snap.epoch, 1)


async def test_history_after_an_offset_is_complete_and_ordered(engine):
    broker, _ = engine
    for i in range(4):
        await broker.publish(USER, "user:a", "note", {"i": i})
    hist = await broker.history(USER, "user:a", 1, 100)
    assert [p.offset for p in hist.publications] == [2, 3, 4]
    assert [p.data["i"] for p in hist.publications] == [1, 2, 3]
    assert hist.complete and hist.offset == 4


async def test_history_capped_by_size_is_incomplete_for_an_old_offset(engine):
    broker, _ = engine
    for i in range(8):
        await broker.publish(JOB, "job:1", "progress", {"p": i})
    hist = await broker.history(JOB, "job:1", 0, 100)
    assert [p.offset for p in hist.publications] == [4, 5, 6, 7, 8]  # the newest 5
    assert not hist.complete
    assert (await broker.history(JOB, "job:1", 3, 100)).complete


async def test_history_cut_by_limit_is_incomplete(engine):
    broker, _ = engine
    for i in range(4):
        await broker.publish(USER, "user:a", "note", {"i": i})
    hist = await broker.history(USER, "user:a", 0, 2)
    assert [p.offset for p in hist.publications] == [1, 2]
    assert not hist.complete


async def test_an_offset_from_the_future_is_not_recoverable(engine):
    broker, _ = engine
    await broker.publish(USER, "user:a", "note", {})
    assert not (await broker.history(USER, "user:a", 7, 100)).complete


async def test_state_keeps_the_latest_data_per_event(engine):
    broker, _ = engine
    await broker.publish(JOB, "job:1", "progress", {"p": 1})
    await broker.publish(JOB, "job:1", "log", {"line": "x"})
    await broker.publish(JOB, "job:1", "progress", {"p": 2, "big": 12345678901234567890})
    snap = await broker.snapshot(JOB, "job:1")
    assert snap.offset == 3
    assert snap.state == {"progress": {"p": 2, "big": 12345678901234567890}, "log": {"line": "x"}}
    assert (await broker.snapshot(USER, "user:a")).state == {}  # no state namespace


async def test_owner_is_recorded_once_and_a_different_one_is_forbidden(engine):
    broker, _ = engine
    assert await broker.owner("job:9") is None
    await broker.publish(JOB, "job:9", "progress", {}, owner="alice")
    assert await broker.owner("job:9") == "alice"
    await broker.publish(JOB, "job:9", "progress", {}, owner="alice")  # same owner: fine
    with pytest.raises(ProtocolError) as exc:
        await broker.publish(JOB, "job:9", "progress", {}, owner="mallory")
    assert exc.value.code == "forbidden"
    with pytest.raises(ProtocolError):
        await broker.register_owner("job:9", "mallory")
    # A refused publish took no offset.
    assert (await broker.snapshot(JOB, "job:9")).offset == 2


async def test_expired_history_starts_a_new_epoch(engine):
    broker, _ = engine
    first = await broker.publish(SHORT, "public:x", "tick", {})
    await asyncio.sleep(2.2)  # past the namespace's 1 s history TTL
    second = await broker.publish(SHORT, "public:x", "tick", {})
    assert second.epoch != first.epoch
    assert second.offset == 1
    # A client holding (first.epoch, 1) sees another epoch: it cannot recover.
    assert (await broker.history(SHORT, "public:x", 1, 10)).epoch == second.epoch


async def test_only_subscribed_channels_are_fanned_in(engine):
    broker, rec = engine
    await broker.subscribe(["user:a"])
    await broker.publish(USER, "user:b", "note", {"skip": True})
    await broker.publish(USER, "user:a", "note", {"n": 1})
    await rec.wait_for(1)
    await broker.unsubscribe(["user:a"])
    await asyncio.sleep(0.1)
    await broker.publish(USER, "user:a", "note", {"n": 2})
    await broker.publish(USER, "user:a", "note", {"n": 3})
    await asyncio.sleep(0.2)
    assert [p.data for p in rec.pubs] == [{"n": 1}]
    assert broker.messages_in == 1


async def test_an_idempotency_key_applies_once_per_channel(engine):
    broker, rec = engine
    await broker.subscribe(["user:k"])
    first = await broker.publish(USER, "user:k", "note", {"n": 1}, idempotency_key="op-1")
    again = await broker.publish(USER, "user:k", "note", {"n": 1}, idempotency_key="op-1")
    assert not first.duplicate and again.duplicate
    assert (again.epoch, again.offset) == (first.epoch, first.offset)
    other = await broker.publish(USER, "user:k", "note", {"n": 2}, idempotency_key="op-2")
    elsewhere = await broker.publish(USER, "user:j", "note", {}, idempotency_key="op-1")
    assert other.offset == 2 and not other.duplicate
    assert elsewhere.offset == 1 and not elsewhere.duplicate  # keys are per channel
    await rec.wait_for(2)
    await asyncio.sleep(0.1)
    assert [p.data for p in rec.pubs] == [{"n": 1}, {"n": 2}]  # the duplicate went nowhere
    hist = await broker.history(USER, "user:k", 0, 10)
    assert [p.offset for p in hist.publications] == [1, 2]


async def test_the_memory_engine_holds_a_bounded_number_of_channels():
    """Reads create channels, so a flood of made-up names must not grow it for ever."""
    broker = MemoryBroker(max_channels=50)
    await broker.subscribe(["public:watched"])
    await broker.publish(SHORT, "public:watched", "tick", {})
    for i in range(200):
        await broker.snapshot(SHORT, f"public:made-up-{i}")
    assert len(broker._streams) <= 50
    assert broker.evicted == 151
    # The watched channel, the oldest of all, was passed over: its history is intact.
    assert (await broker.history(SHORT, "public:watched", 0, 10)).offset == 1


async def test_an_interrupted_fan_in_is_reported_before_anything_received_since(redis_url):
    """The Redis engine's reconnect: `on_resubscribed` names every wanted channel,
    and is awaited before the publications that arrive on the new connection."""
    import redis.asyncio as aioredis

    broker = RedisBroker(redis_url)
    rec = Recorder()
    broker.bind(rec.on_pub, rec.on_resubscribed)
    await broker.start()
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await broker.subscribe(["user:x", "user:y"])
        await broker.publish(USER, "user:x", "note", {"n": 1})
        await rec.wait_for(1)
        assert rec.resubscribed == []  # the first connect resumes nothing
        await admin.client_kill_filter(_type="pubsub")
        for _ in range(100):
            if rec.resubscribed and broker.ready:
                break
            await asyncio.sleep(0.05)
        assert rec.resubscribed == [["user:x", "user:y"]]
        assert rec.pubs_at_resubscribe == 1
        await broker.publish(USER, "user:y", "note", {"n": 2})
        await rec.wait_for(2)
        assert broker.reconnects == 1
    finally:
        await admin.aclose()
        await broker.close()


async def test_the_memory_engine_fans_in_synchronously_and_never_resubscribes():
    broker = MemoryBroker()
    rec = Recorder()
    broker.bind(rec.on_pub, rec.on_resubscribed)
    await broker.subscribe(["user:a"])
    for i in range(3):
        await broker.publish(USER, "user:a", "note", {"i": i})
    assert len(rec.pubs) == 3 and rec.resubscribed == []


async def test_publish_many_keeps_order_and_fails_items_alone(engine):
    broker, _ = engine
    await broker.register_owner("job:pm", "alice")
    items = [PublishItem(USER, f"user:p{i % 2}", "n", {"i": i}) for i in range(6)]
    items.insert(3, PublishItem(JOB, "job:pm", "progress", {}, owner="mallory"))
    results = await broker.publish_many(items)
    assert isinstance(results[3], ProtocolError) and results[3].code == "forbidden"
    pubs = [r for r in results if isinstance(r, Publication)]
    assert [(p.channel, p.offset, p.data["i"]) for p in pubs] == [
        ("user:p0", 1, 0), ("user:p1", 1, 1), ("user:p0", 2, 2),
        ("user:p1", 2, 3), ("user:p0", 3, 4), ("user:p1", 3, 5),
    ]
    hist = await broker.history(USER, "user:p0", None, 10)
    assert [p.data["i"] for p in hist.publications] == [0, 2, 4]


# -- what the Redis engines do with a record that is not a publication -----------------

NOT_RECORDS = [
    b"not json",
    b"[1, 2]",
    b'{"c":"user:bad"}',  # fields missing
    b'{"c":"user:bad","e":"n","d":1,"p":"x","o":"2","t":1.0,"m":{}}',  # offset a string
    b'{"c":"user:bad","e":"n","d":1,"p":"x","o":2,"t":"now","m":{}}',  # time a string
]


@pytest.mark.parametrize("engine", ["redis", "cluster"], indirect=True)
async def test_a_record_that_is_not_a_publication_is_counted_and_dropped(engine):
    """Anything that can write to Redis can put bytes where records go. Each bad
    one costs itself, counted (`bad_records`): the fan-in connection stays up,
    the publications around it arrive, and a history with one in it is
    reported incomplete (its offset is a hole), never passed off as whole."""
    broker, rec = engine
    assert isinstance(broker, RedisBroker | RedisClusterBroker)
    k = broker.keys
    channel = "user:bad"
    await broker.subscribe([channel])
    await broker.publish(USER, channel, "n", {"n": 1})
    await rec.wait_for(1)
    for raw in NOT_RECORDS:  # on the fan-in channel
        if isinstance(broker, RedisClusterBroker):
            await broker.client.spublish(k.shard_pubsub(channel), raw)
        else:
            await broker.client.publish(k.pubsub(channel), raw)
    # And one in the history, where offset 2 would be.
    await broker.client.xadd(k.stream(channel), {"r": b"not json"}, id="2-1")
    await broker.client.hincrby(k.meta(channel), "offset", 1)
    await broker.publish(USER, channel, "n", {"n": 3})
    await rec.wait_for(2)
    assert [(p.offset, p.data) for p in rec.pubs] == [(1, {"n": 1}), (3, {"n": 3})]
    assert broker.bad_records.count == len(NOT_RECORDS)
    assert broker.reconnects == 0 and rec.resubscribed == []
    hist = await broker.history(USER, channel, 1, 10)
    assert [p.offset for p in hist.publications] == [3] and not hist.complete
    assert broker.bad_records.count == len(NOT_RECORDS) + 1
    whole = await broker.history(USER, channel, 2, 10)  # after the hole: whole again
    assert [p.offset for p in whole.publications] == [3] and whole.complete


@pytest.mark.parametrize("engine", ["redis", "cluster"], indirect=True)
async def test_a_state_entry_that_is_not_herald_s_is_left_out_of_the_snapshot(engine):
    broker, _ = engine
    assert isinstance(broker, RedisBroker | RedisClusterBroker)
    channel = "job:bad-state"
    await broker.publish(JOB, channel, "progress", {"pct": 40})
    state_key = broker.keys.state(channel)
    await broker.client.hset(state_key, '"stage"', b"not json")
    await broker.client.hset(state_key, "[1]", b"{}")  # an event that is not a string
    snap = await broker.snapshot(JOB, channel)
    assert snap.state == {"progress": {"pct": 40}} and snap.offset == 1
    assert broker.bad_records.count == 2
