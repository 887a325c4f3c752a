"""The core's parts in isolation, beside the black-box suite: hub, outbox, recovery.

Real parts only: the engines are the real memory engine and a real
redis-server, the outbox writes to a real socket pair through the event
loop's transport under a WebSocket connection's protocol, and the
subscribers are plain recording objects that implement the hub's
`Subscriber` protocol (what a session is to the hub).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.broker.base import Broker
from gateway.broker.memory import MemoryBroker
from gateway.broker.redis import RedisBroker
from gateway.broker.redis_scripts import Keys
from gateway.core.hub import Hub
from gateway.core.outbox import SOFT_LIMIT, Outbox
from gateway.core.recovery import Recovery
from gateway.handlers.ws_protocol import WebSocketConnection
from gateway.protocol.channels import Access, Namespace, Namespaces
from gateway.protocol.publication import Position, Publication
from gateway.protocol.wire import ws_text_frame
from gateway.telemetry.metrics import Metrics

# The WebSocket transport is the event loop's: test it on herald serve's loop too.
pytestmark = pytest.mark.both_loops

JOB = Namespace("job", Access.OWNER, history_size=50, history_ttl=3600, state=True)
USER = Namespace("user", Access.USER, history_size=50, history_ttl=3600)
NAMESPACES = Namespaces([JOB, USER])


class Recording:
    """A subscriber that keeps what the hub hands it."""

    def __init__(self) -> None:
        self.delivered: list[Publication] = []
        self.frames: list[dict[str, Any]] = []
        self.positions: dict[str, Position] = {}
        self.reached_at: dict[str, Position] = {}

    def push(self, pub: Publication) -> bool:
        self.delivered.append(pub)
        return True

    def advance(self, channel: str, position: Position) -> None:
        self.positions[channel] = position

    def reached(self, channel: str, position: Position) -> None:
        self.reached_at[channel] = position

    def send_json(self, message: dict[str, Any]) -> None:
        self.frames.append(message)

    def offsets(self) -> list[int]:
        return [p.offset for p in self.delivered]


# Where a subscriber stands before any publication (no epoch known yet).
START = Position("", 0)


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


# -- the hub: live and recovering subscribers -------------------------------


async def test_a_recovering_subscriber_buffers_and_goes_live_past_its_replay():
    broker = MemoryBroker()
    hub = Hub(broker)
    broker.bind(hub.dispatch, lambda channels: asyncio.sleep(0))
    live, joining = Recording(), Recording()
    await hub.add(live, "user:a")
    assert hub.go_live(live, "user:a", START)
    for i in range(2):
        await broker.publish(USER, "user:a", "n", {"i": i})
    await hub.add(joining, "user:a")  # recovering: its replay is being read
    for i in range(2, 5):
        await broker.publish(USER, "user:a", "n", {"i": i})
    assert live.offsets() == [1, 2, 3, 4, 5]
    assert joining.offsets() == []  # buffered, not delivered, while recovering
    # Its replay covered up to offset 3: only 4 and 5 come from the buffer.
    assert hub.go_live(joining, "user:a", Position(live.delivered[0].epoch, 3))
    assert joining.offsets() == [4, 5]
    await broker.publish(USER, "user:a", "n", {"i": 5})
    assert live.offsets()[-1] == joining.offsets()[-1] == 6
    assert hub.subscription_count == 2 and hub.channel_count == 1


async def test_a_recovery_buffer_past_its_bound_makes_go_live_fail():
    broker = MemoryBroker()
    hub = Hub(broker, recovery_buffer=3)
    broker.bind(hub.dispatch, lambda channels: asyncio.sleep(0))
    slow = Recording()
    await hub.add(slow, "user:a")
    for i in range(5):
        await broker.publish(USER, "user:a", "n", {"i": i})
    assert hub.go_live(slow, "user:a", START) is False  # the caller closes it (4008)
    assert slow.offsets() == []  # never a stream with a hole


async def test_an_overlap_at_or_before_the_channel_position_goes_nowhere():
    hub = Hub(MemoryBroker())
    sub = Recording()
    await hub.add(sub, "user:a")
    hub.go_live(sub, "user:a", START)
    pub = Publication("user:a", "n", {}, "ep", 7, 0.0)
    assert hub.dispatch(pub) == 1
    assert hub.dispatch(Publication("user:a", "n", {}, "ep", 7, 0.0)) == 0
    assert hub.dispatch(Publication("user:a", "n", {}, "ep", 6, 0.0)) == 0
    # Another epoch is never an overlap.
    assert hub.dispatch(Publication("user:a", "n", {}, "other", 1, 0.0)) == 1
    assert sub.offsets() == [7, 1]


def _pub(offset: int, epoch: str = "ep") -> Publication:
    return Publication("user:a", "n", {}, epoch, offset, 0.0)


async def test_a_replay_ahead_of_the_fan_in_skips_what_is_still_in_flight_once():
    hub = Hub(MemoryBroker())
    early, late = Recording(), Recording()
    await hub.add(early, "user:a")
    hub.go_live(early, "user:a", START)
    hub.dispatch(_pub(1))
    await hub.add(late, "user:a")
    # Its history read returned up to offset 3; 2 and 3 are still on their way live.
    assert hub.go_live(late, "user:a", Position("ep", 3))
    for offset in (2, 3, 4, 5):
        hub.dispatch(_pub(offset))
    assert early.offsets() == [1, 2, 3, 4, 5]
    assert late.offsets() == [4, 5]  # never 2 or 3 twice
    # Past its mark it is on the plain writer, like everyone else.
    assert hub._channels["user:a"].live[late] == late.push


async def test_another_epoch_is_never_skipped_as_covered_by_a_replay():
    hub = Hub(MemoryBroker())
    sub = Recording()
    await hub.add(sub, "user:a")
    hub.note("user:a", Position("ep", 1))
    assert hub.go_live(sub, "user:a", Position("ep", 3))
    hub.dispatch(_pub(2, epoch="new"))  # the stream was reset: a new epoch starts at 1
    assert [(p.epoch, p.offset) for p in sub.delivered] == [("new", 2)]


async def test_a_reset_re_bases_a_subscriber_whose_replay_read_into_the_new_epoch():
    # Redis restarted empty: a client subscribed meanwhile and its replay read
    # the new epoch's offset 1 before this node's fan-in resynchronised. The
    # reset then tells it "offset 0 of the new epoch", so offset 1 must come
    # again (the chaos test's `gap 0 -> 2` when it did not).
    hub = Hub(MemoryBroker())
    sub = Recording()
    await hub.add(sub, "user:a")
    hub.note("user:a", Position("old", 7))
    assert hub.go_live(sub, "user:a", Position("new", 1))
    hub.note("user:a", Position("new", 0), reset=True)
    for offset in (1, 2):
        hub.dispatch(_pub(offset, epoch="new"))
    assert [(p.epoch, p.offset) for p in sub.delivered] == [("new", 1), ("new", 2)]


async def test_a_live_subscriber_that_recovers_again_is_told_how_far_it_was_written():
    hub = Hub(MemoryBroker())
    sub = Recording()
    await hub.add(sub, "user:a")
    hub.go_live(sub, "user:a", START)
    for offset in (1, 2, 3):
        hub.dispatch(_pub(offset))
    await hub.add(sub, "user:a")  # a re-subscribe with `since`: its replay skips 1-3
    assert sub.reached_at == {"user:a": Position("ep", 3)}
    hub.dispatch(_pub(4))
    assert sub.offsets() == [1, 2, 3]  # recovering: buffered, not written


async def test_the_last_subscriber_gone_releases_the_engine_subscription():
    broker = MemoryBroker()
    hub = Hub(broker)
    a, b = Recording(), Recording()
    await hub.add(a, "user:a")
    await hub.add(b, "user:a")
    await hub.remove(a, "user:a")
    assert "user:a" in broker._subscribed
    await hub.remove(b, "user:a")
    assert "user:a" not in broker._subscribed
    assert hub.position("user:a") is None and hub.subscription_count == 0


# -- the outbox: bounds and conflation, on a real socket --------------------


class Pair:
    """A connected socket pair: the outbox writes one end, the test reads the other."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.theirs.setblocking(False)
        # The connection's own protocol on the event loop's transport, as a gateway has it.
        self.conn = WebSocketConnection(1 << 16)

    async def start(self) -> None:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: self.conn, self.ours)

    async def drain(self, deadline: float = 5.0) -> bytes:
        """Read until the outbox has nothing left to send."""
        out = bytearray()
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        idle = 0
        while loop.time() < end and idle < 20:
            try:
                chunk = self.theirs.recv(1 << 16)
            except BlockingIOError:
                chunk = b""
            if chunk:
                out += chunk
                idle = 0
            else:
                idle += 1
            await asyncio.sleep(0.01)
        return bytes(out)

    def close(self) -> None:
        self.conn.abort()
        self.theirs.close()


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = Pair()
    await p.start()
    yield p
    p.close()


def outbox(pair: Pair, metrics: Metrics, overflows: list[int], **bounds: int) -> Outbox:
    assert pair.conn.transport is not None
    return Outbox(
        pair.conn.transport,
        pair.conn.drained,
        max_bytes=bounds.get("max_bytes", 1 << 20),
        max_messages=bounds.get("max_messages", 1000),
        metrics=metrics,
        conflatable=lambda pub: pub.event == "progress" and pub.channel.startswith("job:"),
        on_overflow=lambda: overflows.append(1),
    )


def progress(offset: int, size: int = 100) -> Publication:
    return Publication("job:1", "progress", {"p": offset, "pad": "x" * size}, "ep", offset, 0.0)


def fill_socket(box: Outbox) -> None:
    """Write past the soft limit so that the next frames queue in the outbox."""
    filler = ws_text_frame(b"f" * 1024)
    for _ in range(4 * SOFT_LIMIT // 1024):
        if box.pending_bytes > SOFT_LIMIT:
            return
        assert box.send(filler)
    raise AssertionError("the socket never filled")


async def test_a_newer_progress_replaces_the_queued_one_and_the_client_sees_the_jump(pair):
    metrics, overflows = Metrics(), []
    box = outbox(pair, metrics, overflows)
    fill_socket(box)
    sent = [progress(i) for i in range(1, 6)]
    for pub in sent:
        assert box.send(ws_text_frame(pub.json), pub)
    other = Publication("job:1", "note", {"keep": True}, "ep", 6, 0.0)
    assert box.send(ws_text_frame(other.json), other)  # not conflatable: kept
    assert metric(metrics, "herald_messages_conflated_total") == 4
    data = await pair.drain()
    assert b'"p":5' in data and b'"keep":true' in data
    assert all(f'"p":{i},'.encode() not in data for i in range(1, 5))
    assert data.index(b'"p":5') < data.index(b'"keep":true')  # order kept
    assert overflows == [] and box.pending_bytes == 0


async def test_past_the_message_bound_the_client_is_closed_and_the_drops_counted(pair):
    metrics, overflows = Metrics(), []
    box = outbox(pair, metrics, overflows, max_messages=3)
    fill_socket(box)
    notes = [Publication("job:1", "note", {"i": i}, "ep", i, 0.0) for i in range(1, 5)]
    results = [box.send(ws_text_frame(p.json), p) for p in notes]
    assert results == [True, True, True, False]
    assert overflows == [1] and box.closed
    assert metric(metrics, "herald_messages_dropped_total", reason="slow_consumer") == 4
    assert metric(metrics, "herald_slow_consumers_total") == 1
    assert box.send(b"late") is False  # nothing after the close


async def test_past_the_byte_bound_the_client_is_closed(pair):
    metrics, overflows = Metrics(), []
    box = outbox(pair, metrics, overflows, max_bytes=SOFT_LIMIT + 64 * 1024)
    fill_socket(box)
    big = Publication("job:1", "note", {"pad": "y" * 80_000}, "ep", 1, 0.0)
    assert box.send(ws_text_frame(big.json), big) is False
    assert overflows == [1]


# -- recovery: closing a gap after an interrupted fan-in, on both engines ---


class Gate:
    """Stands between the engine's fan-in and the hub: closed, it loses what passes."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.open = True

    def __call__(self, pub: Publication) -> None:
        if self.open:
            self.hub.dispatch(pub)


@pytest.fixture(params=["memory", "redis"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    if request.param == "memory":
        broker: Broker = MemoryBroker()
    else:
        broker = RedisBroker(request.getfixturevalue("redis_url"))
    await broker.start()
    yield broker
    await broker.close()


async def wired(engine: Broker) -> tuple[Hub, Recovery, Gate, Metrics]:
    hub = Hub(engine)
    metrics = Metrics()
    gate = Gate(hub)
    recovery = Recovery(engine, hub, NAMESPACES, metrics, gate)
    engine.bind(gate, recovery.on_resubscribed)
    return hub, recovery, gate, metrics


async def wait_offsets(sub: Recording, count: int) -> None:
    for _ in range(200):
        if len(sub.delivered) >= count:
            return
        await asyncio.sleep(0.01)


async def test_publications_missed_during_an_interruption_are_replayed_in_order(engine):
    hub, recovery, gate, metrics = await wired(engine)
    channel = f"user:gap-{id(hub)}"
    sub = Recording()
    await hub.add(sub, channel)
    snap = await engine.snapshot(USER, channel)
    hub.note(channel, Position(snap.epoch, snap.offset))
    hub.go_live(sub, channel, Position(snap.epoch, snap.offset))
    await engine.publish(USER, channel, "n", {"i": 1})
    await wait_offsets(sub, 1)
    gate.open = False  # the fan-in is interrupted: these never arrive live
    for i in range(2, 5):
        await engine.publish(USER, channel, "n", {"i": i})
    await asyncio.sleep(0.1)
    gate.open = True
    await recovery.on_resubscribed([channel])
    assert sub.offsets() == [1, 2, 3, 4]
    await recovery.on_resubscribed([channel])  # a second resync finds nothing new
    assert sub.offsets() == [1, 2, 3, 4]
    assert sub.frames == [] and metric(metrics, "herald_recoveries_total", recovered="false") == 0


async def test_a_lost_history_is_reported_as_an_epoch_change(engine, request):
    hub, recovery, _, metrics = await wired(engine)
    channel = f"job:lost-{id(hub)}"
    sub = Recording()
    await hub.add(sub, channel)
    hub.go_live(sub, channel, START)
    first = await engine.publish(JOB, channel, "progress", {"p": 10})
    await wait_offsets(sub, 1)
    # The engine loses the channel (a Redis restart without persistence; an expiry).
    if isinstance(engine, MemoryBroker):
        del engine._streams[channel]
    else:
        import redis.asyncio as aioredis

        admin = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
        keys = Keys()
        await admin.delete(keys.meta(channel), keys.stream(channel), keys.state(channel))
        await admin.aclose()
    await recovery.on_resubscribed([channel])
    (frame,) = sub.frames
    assert frame["type"] == "subscribed" and frame["recovered"] is False
    assert frame["channel"] == channel and frame["epoch"] != first.epoch
    assert sub.positions[channel].epoch == frame["epoch"]
    assert hub.position(channel).epoch == frame["epoch"]
    assert metric(metrics, "herald_recoveries_total", recovered="false") == 1
