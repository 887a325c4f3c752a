"""The durable embedded engine: what one process keeps across a restart, and its file.

In-process tests reopen a real SQLite file; the end-to-end tests kill a real
`herald serve` (SIGKILL and SIGTERM) in the middle of a publication stream,
start it again on the same state directory, and check that a client resumes
with `recovered: true` and every offset.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from typing import Any

import orjson
import pytest
import websockets
from tornado.httpclient import AsyncHTTPClient

from gateway.broker.durable import DurableBroker
from gateway.broker.store import STORE_FILE, StoreError
from gateway.protocol.channels import Access, Namespace
from gateway.protocol.errors import BrokerUnavailable
from tests.conftest import api_headers, token

JOB = Namespace("job", Access.OWNER, history_size=5, history_ttl=3600, state=True)
USER = Namespace("user", Access.USER, history_size=100, history_ttl=3600)
SHORT = Namespace("public", Access.AUTHENTICATED, history_size=10, history_ttl=10)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def reopened(broker: DurableBroker, clock: Any = None) -> DurableBroker:
    await broker.close()
    again = DurableBroker(broker.path, **({"clock": clock} if clock else {}))
    await again.start()
    return again


def rows(path, table: str, channel: str) -> int:
    with sqlite3.connect(path) as db:
        query = f"SELECT count(*) FROM {table} WHERE channel = ?"
        return db.execute(query, (channel,)).fetchone()[0]


async def test_a_restart_keeps_epochs_offsets_history_state_and_owners(tmp_path):
    broker = DurableBroker(tmp_path / STORE_FILE)
    await broker.start()
    for i in range(8):
        await broker.publish(JOB, "job:1", "progress", {"p": i}, owner="alice",
                             meta={"traceparent": "00-ab-cd-01"})
    await broker.publish(JOB, "job:1", "log", {"line": "x"})
    notes = [await broker.publish(USER, "user:a", "note", {"i": i}) for i in range(3)]
    keyed = await broker.publish(USER, "user:k", "note", {}, idempotency_key="retry-1")
    empty = await broker.snapshot(USER, "user:quiet")  # an epoch fixed by a read alone
    await broker.register_owner("job:2", "bob")
    before = await broker.history(JOB, "job:1", None, 100)

    broker = await reopened(broker)
    try:
        after = await broker.history(JOB, "job:1", None, 100)
        assert (after.epoch, after.offset) == (before.epoch, before.offset) == (before.epoch, 9)
        assert [p.to_record() for p in after.publications] == [
            p.to_record() for p in before.publications
        ]
        assert [p.offset for p in after.publications] == [5, 6, 7, 8, 9]  # the cap, kept
        assert (await broker.history(JOB, "job:1", 4, 100)).complete
        snap = await broker.snapshot(JOB, "job:1")
        assert snap.state == {"progress": {"p": 7}, "log": {"line": "x"}}
        user = await broker.history(USER, "user:a", 1, 100)
        assert [(p.epoch, p.offset, p.data) for p in user.publications] == [
            (n.epoch, n.offset, n.data) for n in notes[1:]
        ]
        quiet = await broker.snapshot(USER, "user:quiet")
        assert (quiet.epoch, quiet.offset) == (empty.epoch, 0)
        assert (await broker.owner("job:1"), await broker.owner("job:2")) == ("alice", "bob")
        with pytest.raises(Exception, match="another owner"):
            await broker.register_owner("job:2", "mallory")
        # A retry after an unknown outcome, across the restart, still publishes nothing.
        again = await broker.publish(USER, "user:k", "note", {}, idempotency_key="retry-1")
        assert again.duplicate and (again.epoch, again.offset) == (keyed.epoch, keyed.offset)
        # Offsets go on from where they were, in the same epoch.
        nxt = await broker.publish(JOB, "job:1", "progress", {"p": 9})
        assert (nxt.epoch, nxt.offset) == (before.epoch, 10)
    finally:
        await broker.close()
    # The file holds what memory holds: the capped history, not every publication.
    assert rows(tmp_path / STORE_FILE, "history", "job:1") == 5


async def test_what_expired_while_down_comes_back_with_a_new_epoch(tmp_path):
    clock = Clock()
    broker = DurableBroker(tmp_path / STORE_FILE, clock=clock)
    await broker.start()
    old = await broker.publish(SHORT, "public:feed", "tick", {})
    await broker.publish(USER, "user:a", "note", {})
    clock.now += 11  # past public's 10 s history TTL, within user's hour
    broker = await reopened(broker, clock)
    try:
        snap = await broker.snapshot(SHORT, "public:feed")
        assert snap.epoch != old.epoch and snap.offset == 0
        assert (await broker.snapshot(USER, "user:a")).offset == 1
    finally:
        await broker.close()
    assert rows(tmp_path / STORE_FILE, "history", "public:feed") == 0  # deleted at load


async def test_a_new_epoch_replaces_the_old_history_on_disk(tmp_path):
    clock = Clock()
    broker = DurableBroker(tmp_path / STORE_FILE, clock=clock)
    await broker.start()
    for _ in range(4):
        await broker.publish(SHORT, "public:feed", "tick", {})
    clock.now += 11
    fresh = await broker.publish(SHORT, "public:feed", "tick", {"new": True})
    broker = await reopened(broker, clock)
    try:
        hist = await broker.history(SHORT, "public:feed", None, 100)
        assert (hist.epoch, [p.data for p in hist.publications]) == (fresh.epoch, [{"new": True}])
    finally:
        await broker.close()
    assert rows(tmp_path / STORE_FILE, "history", "public:feed") == 1


async def test_publications_reach_subscribers_only_once_committed(tmp_path):
    """Fan-in follows the commit: a subscriber never holds an offset the file lacks."""
    broker = DurableBroker(tmp_path / STORE_FILE)
    seen: list[int] = []
    on_disk: list[int] = []

    def on_pub(pub) -> None:
        seen.append(pub.offset)
        with sqlite3.connect(tmp_path / STORE_FILE) as db:
            on_disk.append(db.execute(
                "SELECT max(offset) FROM history WHERE channel = 'user:a'").fetchone()[0])

    async def resubscribed(channels: list[str]) -> None:
        return None

    broker.bind(on_pub, resubscribed)
    await broker.start()
    try:
        await broker.subscribe(["user:a"])
        # A burst in one loop turn: one transaction, fanned in afterwards in order.
        await asyncio.gather(*(broker.publish(USER, "user:a", "n", {"i": i}) for i in range(50)))
        assert seen == list(range(1, 51))
        assert all(top is not None and top >= off for off, top in zip(seen, on_disk, strict=True))
        assert broker.commits <= 3
    finally:
        await broker.close()


async def test_a_full_disk_turns_the_engine_unready_and_loses_nothing(tmp_path):
    """SQLite's own page limit makes commits fail for real (SQLITE_FULL): the publish that
    hit it reports `unavailable` (outcome unknown), new ones are refused, and once space is
    back the held publication commits and reaches the subscriber, in order."""
    broker = DurableBroker(tmp_path / STORE_FILE)
    seen: list[Any] = []

    async def resubscribed(channels: list[str]) -> None:
        return None

    broker.bind(seen.append, resubscribed)
    await broker.start()
    try:
        await broker.subscribe(["user:a"])
        await broker.publish(USER, "user:a", "n", {"i": 0})
        pages = broker._store._conn.execute("PRAGMA page_count").fetchone()[0]
        broker._store._conn.execute(f"PRAGMA max_page_count={pages}")
        with pytest.raises(BrokerUnavailable, match="full"):
            await broker.publish(USER, "user:a", "n", {"i": 1, "pad": "x" * 20000})
        assert not broker.ready and broker.store_errors == 1
        with pytest.raises(BrokerUnavailable):
            await broker.publish(USER, "user:a", "n", {"i": 2})
        assert [p.data["i"] for p in seen] == [0]  # nothing delivered that is not on disk
        broker._store._conn.execute("PRAGMA max_page_count=1073741823")
        for _ in range(100):
            if broker.ready:
                break
            await asyncio.sleep(0.05)
        assert broker.ready
        assert [p.data["i"] for p in seen] == [0, 1]
        nxt = await broker.publish(USER, "user:a", "n", {"i": 2})
        assert nxt.offset == 3
    finally:
        await broker.close()
    again = DurableBroker(tmp_path / STORE_FILE)
    await again.start()
    try:
        hist = await again.history(USER, "user:a", None, 100)
        assert [p.data["i"] for p in hist.publications] == [0, 1, 2]
    finally:
        await again.close()


async def test_a_second_process_on_the_same_file_is_refused(tmp_path):
    first = DurableBroker(tmp_path / STORE_FILE)
    await first.start()
    try:
        with pytest.raises(StoreError, match="in use by another herald process"):
            await DurableBroker(tmp_path / STORE_FILE).start()
    finally:
        await first.close()
    again = DurableBroker(tmp_path / STORE_FILE)  # released on close (and by the kernel on kill)
    await again.start()
    await again.close()


async def test_a_store_of_another_version_is_refused(tmp_path):
    with sqlite3.connect(tmp_path / STORE_FILE) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="store version 99"):
        await DurableBroker(tmp_path / STORE_FILE).start()


# -- a real `herald serve`, killed mid-stream -----------------------------------------------


async def publish_http(url: str, channel: str, i: int) -> dict[str, Any] | None:
    """One publish; the answer, or None when the outcome is unknown (the gateway died)."""
    try:
        resp = await AsyncHTTPClient().fetch(
            url + "/api/v1/publish", method="POST", headers=api_headers(), request_timeout=5,
            body=orjson.dumps({"channel": channel, "event": "tick", "data": {"i": i}}),
        )
    except Exception:  # refused, reset or 503 while it dies: outcome unknown
        return None
    return orjson.loads(resp.body)


async def wait_up(url: str) -> None:
    for _ in range(200):
        try:
            if (await AsyncHTTPClient().fetch(url + "/readyz", raise_error=False)).code == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    pytest.fail("gateway did not become ready")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_a_killed_gateway_restarts_and_a_client_recovers_every_offset(
    spawn_gateway, tmp_path, sig
):
    env = {"HERALD_ENGINE": "durable", "HERALD_STATE_DIR": str(tmp_path),
           "HERALD_DRAIN_SECONDS": "0"}
    gw = spawn_gateway("gw-durable", **env)
    await wait_up(gw.url)
    channel = "system:stream"
    acked: list[dict[str, Any]] = []
    received: list[dict[str, Any]] = []
    async with websockets.connect(gw.ws_url) as conn:
        await conn.send(orjson.dumps({"type": "auth", "token": token("viewer")}).decode())
        assert orjson.loads(await conn.recv())["type"] == "connected"
        await conn.recv()  # own user: channel
        await conn.send(orjson.dumps({"type": "subscribe", "channel": channel}).decode())
        sub = orjson.loads(await conn.recv())
        assert sub["type"] == "subscribed"

        async def publisher() -> None:
            for i in range(400):
                answer = await publish_http(gw.url, channel, i)
                if answer is None:
                    return
                acked.append(answer)

        task = asyncio.ensure_future(publisher())
        while len(received) < 30:
            msg = orjson.loads(await asyncio.wait_for(conn.recv(), 10))
            if msg["type"] == "message":
                received.append(msg)
        gw.signal(sig)  # mid-stream: the publisher is still going
        await asyncio.wait_for(task, 30)
        try:
            async for raw in conn:  # whatever was delivered before the end
                msg = orjson.loads(raw)
                if msg["type"] == "message":
                    received.append(msg)
        except websockets.ConnectionClosed:
            pass
    gw.wait(30)
    assert 30 <= len(acked) < 400, "the kill did not land mid-stream"

    again = spawn_gateway("gw-durable", HERALD_PORT=str(gw.port), **env)
    await wait_up(again.url)
    last = received[-1]
    async with websockets.connect(again.ws_url) as conn:
        await conn.send(orjson.dumps({"type": "auth", "token": token("viewer")}).decode())
        assert orjson.loads(await conn.recv())["type"] == "connected"
        await conn.recv()
        since = {"epoch": last["epoch"], "offset": last["offset"]}
        await conn.send(orjson.dumps(
            {"type": "subscribe", "channel": channel, "since": since}).decode())
        sub = orjson.loads(await asyncio.wait_for(conn.recv(), 10))
        assert sub["type"] == "subscribed" and sub["recovered"] is True, sub
        assert sub["epoch"] == last["epoch"] == acked[0]["epoch"]
        top = sub["offset"]
        assert top >= acked[-1]["offset"]  # every acknowledged publish survived
        while not received or received[-1]["offset"] < top:
            received.append(orjson.loads(await asyncio.wait_for(conn.recv(), 10)))
        after = await publish_http(again.url, channel, 999)
        assert after is not None and after["offset"] == top + 1
        live = orjson.loads(await asyncio.wait_for(conn.recv(), 10))
        assert (live["offset"], live["data"]) == (top + 1, {"i": 999})
    offsets = [m["offset"] for m in received]
    assert offsets == list(range(1, top + 1))  # every offset, once, in order
    assert [m["data"]["i"] for m in received] == list(range(top))
    assert all(m["epoch"] == last["epoch"] for m in received)
