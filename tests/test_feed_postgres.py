"""`herald feed postgres` against a real PostgreSQL (Debian's, started by the
suite) and real gateway processes.

- the mapping: a jobs row -> `job:{id}` progress owned by its user, the
  idempotency key `feed:<outbox id>`, bad rows named with their reason;
- bad rows (no owner, too big, another table, another owner) are counted,
  logged with their key, kept in `herald_outbox_dead`, and the feed goes on;
- Herald down: rows wait and are retried (errors counted), nothing lost;
- 10,000 updates of 100 jobs while the feed is SIGKILLed and restarted twice:
  every update reaches its channel exactly once (the gateway applies each
  `Idempotency-Key` once), in commit order per row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tornado.httpclient import AsyncHTTPClient

from gateway.feed.mapping import JobsMapping, OutboxRow, Unmappable, retryable
from gateway.feed.postgres import outbox_sql
from tests.conftest import API_KEY, GatewayProcess, free_port, gateway_env, token
from tests.support import http

JOBS_SQL = """
CREATE TABLE jobs (
    id text PRIMARY KEY,
    user_id text,
    status text NOT NULL DEFAULT 'queued',
    progress numeric NOT NULL DEFAULT 0,
    stage text,
    message text
);
CREATE TRIGGER herald_outbox AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION herald_outbox_capture();
CREATE TABLE notes (id int PRIMARY KEY, body text);
CREATE TRIGGER herald_outbox AFTER INSERT OR UPDATE ON notes
    FOR EACH ROW EXECUTE FUNCTION herald_outbox_capture();
"""


# -- the mapping (pure) -------------------------------------------------------------


def row(data: Any, *, table: str = "jobs", op: str = "UPDATE", id: int = 7) -> OutboxRow:
    return OutboxRow(id, table, op, data, datetime.now(UTC))


def test_a_jobs_row_maps_to_its_job_channel():
    update = JobsMapping().map(row({"id": 42, "user_id": "u-1", "status": "processing",
                                    "progress": 45.5, "stage": "encode", "message": None}))
    assert update.channel == "job:42"
    assert (update.job_id, update.owner, update.status, update.progress) == (
        "42", "u-1", "processing", 45.5)
    assert (update.stage, update.message) == ("encode", None)
    assert row({}, id=7).key == "feed:7"
    mapping = JobsMapping(table="tasks", owner_column="owner")
    assert mapping.map(row({"id": "t", "owner": "o", "status": "queued", "progress": None},
                           table="tasks")).progress == 0


@pytest.mark.parametrize(("change", "reason"), [
    (row({"id": 1, "user_id": "u", "status": "x"}, table="notes"), "no mapping for table"),
    (row({"id": 1, "user_id": "u", "status": "x"}, op="DELETE"), "DELETE is not published"),
    (row(["not", "an", "object"]), "not a JSON object"),
    (row({"user_id": "u", "status": "x"}), "no id"),
    (row({"id": "", "user_id": "u", "status": "x"}), "no id"),
    (row({"id": 1, "status": "x"}), "no owner"),
    (row({"id": 1, "user_id": "u"}), "no status"),
    (row({"id": 1, "user_id": "u", "status": "x", "progress": "45"}), "not a number"),
    (row({"id": 1, "user_id": "u", "status": "x", "progress": True}), "not a number"),
    (row({"id": 1, "user_id": "u", "status": "x", "message": "m" * 5000}), "too big"),
])
def test_bad_rows_are_unmappable_with_a_reason(change, reason):
    with pytest.raises(Unmappable) as info:
        JobsMapping(max_bytes=4096).map(change)
    assert reason in info.value.reason


def test_what_is_retried():
    assert retryable("unavailable") and retryable("rate_limited") and retryable("internal")
    assert not retryable("forbidden") and not retryable("message_too_large")
    assert not retryable("bad_request")


# -- a real database, real gateways, a real feed process ------------------------------


@dataclasses.dataclass
class FeedProcess:
    """`herald feed postgres` as a subprocess; its log goes to a file we read."""

    env: dict[str, str]
    metrics_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "feed", "postgres", "--batch", "200",
                 "--poll-interval", "0.2", "--metrics-port", str(self.metrics_port),
                 "--metrics-host", "127.0.0.1"],
                env=self.env, stdout=subprocess.DEVNULL, stderr=out,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            resp = await AsyncHTTPClient().fetch(
                f"http://127.0.0.1:{self.metrics_port}/metrics", raise_error=False)
        except OSError:
            return out  # not listening yet
        for line in (resp.body or b"").decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


@pytest.fixture
def database(postgres_dsn: str) -> str:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(outbox_sql())
        conn.execute(outbox_sql())  # idempotent: safe to run on every deploy
        conn.execute(JOBS_SQL)
    return postgres_dsn


@pytest.fixture
def herald(database: str, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """`herald(**env)` -> (gateway, feed factory), both real processes."""
    started: list[Any] = []

    def make(**env: str) -> tuple[GatewayProcess, Callable[[], FeedProcess]]:
        port = free_port()
        gw = GatewayProcess("gw-feed", port, gateway_env(HERALD_PORT=str(port), **env))
        gw.start()
        started.append(gw)

        def feed() -> FeedProcess:
            feed_env = gateway_env(HERALD_FEED_DSN=database, HERALD_FEED_URL=gw.url,
                                   HERALD_API_KEY=API_KEY, HERALD_LOG_LEVEL="INFO", **env)
            proc = FeedProcess(feed_env, free_port(), tmp_path / "feed.log")
            proc.start()
            started.append(proc)
            return proc

        return gw, feed

    yield make
    for proc in started:
        proc.kill() if isinstance(proc, FeedProcess) else proc.stop()


async def until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def sql(dsn: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params or None)
        return cur.fetchall() if cur.description else []


async def history(gw: GatewayProcess, channel: str, user: str) -> list[dict[str, Any]]:
    status, body = await http(gw, "GET", f"/api/v1/channels/{channel}/history?since=0&limit=1000",
                              headers={"Authorization": f"Bearer {token(user)}"})
    assert status == 200, body
    return body["messages"]


async def test_bad_rows_are_counted_logged_kept_and_skipped(herald, database):
    gw, start_feed = herald(HERALD_MAX_PUBLISH_BYTES="4096")
    sql(database, "INSERT INTO jobs (id, user_id) VALUES ('owned', 'alice')")
    feed = start_feed()
    await until(lambda: sql(database, "SELECT count(*) FROM herald_outbox")[0][0] == 0,
                what="the first row published")
    bad = [
        "INSERT INTO jobs (id, user_id, status) VALUES ('orphan', NULL, 'queued')",
        "INSERT INTO jobs (id, user_id, message) VALUES ('big', 'bob', repeat('x', 5000))",
        "INSERT INTO notes (id, body) VALUES (1, 'not a job')",
        "UPDATE jobs SET user_id = 'mallory', progress = 10 WHERE id = 'owned'",  # forbidden
    ]
    for statement in bad:
        sql(database, statement)
    sql(database, "UPDATE jobs SET user_id = 'alice', status = 'processing', progress = 50 "
                  "WHERE id = 'owned'")
    await until(lambda: sql(database, "SELECT count(*) FROM herald_outbox")[0][0] == 0,
                what="the outbox drained")
    messages = await history(gw, "job:owned", "alice")
    assert [m["data"]["progress"] for m in messages] == [0, 50]  # the feed went on
    dead = sql(database, "SELECT id, reason FROM herald_outbox_dead ORDER BY id")
    reasons = [reason for _, reason in dead]
    assert len(dead) == 4
    assert "no owner" in reasons[0] and "too big" in reasons[1]
    assert "no mapping for table 'notes'" in reasons[2] and reasons[3].startswith("forbidden")
    figures = await feed.metrics()
    assert figures['herald_feed_rows_total{outcome="skipped"}'] == 4
    assert figures['herald_feed_rows_total{outcome="published"}'] == 2
    log = feed.log.read_text()
    for row_id, _ in dead:
        assert f"feed:{row_id}" in log  # logged with its key


async def test_herald_down_rows_wait_and_nothing_is_lost(herald, database, redis_url):
    gw, start_feed = herald(HERALD_REDIS_URL=redis_url)
    feed = start_feed()
    sql(database, "INSERT INTO jobs (id, user_id) VALUES ('w1', 'carol')")
    await until(lambda: sql(database, "SELECT count(*) FROM herald_outbox")[0][0] == 0,
                what="published")
    gw.stop()
    for n in range(1, 6):
        sql(database, "UPDATE jobs SET status = 'processing', progress = %s WHERE id = 'w1'", n)
    await until(lambda: _errors(feed), what="an unavailable error counted")
    assert sql(database, "SELECT count(*) FROM herald_outbox")[0][0] == 5  # waiting, not dropped
    gw.start()
    await until(lambda: sql(database, "SELECT count(*) FROM herald_outbox")[0][0] == 0,
                timeout=60, what="the backlog published")
    messages = await history(gw, "job:w1", "carol")
    assert [m["data"]["progress"] for m in messages] == [0, 1, 2, 3, 4, 5]


async def _errors(feed: FeedProcess) -> bool:
    figures = await feed.metrics()
    return figures.get('herald_feed_errors_total{reason="unavailable"}', 0) > 0


JOBS = 100
UPDATES = 100  # per job: 10,000 updates
BLOCKED_DELETE = """SELECT count(*) FROM pg_stat_activity
    WHERE query LIKE 'DELETE FROM herald_outbox%' AND wait_event_type = 'Lock'"""


async def test_ten_thousand_updates_exactly_once_in_order_across_two_feed_kills(
    herald, database
):
    gw, start_feed = herald(HERALD_NAMESPACES='{"job": {"history_size": 300}}')
    owners = {f"j{i}": f"u{i % 5}" for i in range(JOBS)}
    with psycopg.connect(database, autocommit=True) as conn:
        for job, owner in owners.items():
            conn.execute("INSERT INTO jobs (id, user_id) VALUES (%s, %s)", (job, owner))
    written = 0

    def writer() -> None:
        nonlocal written
        rng = random.Random(18)
        with psycopg.connect(database, autocommit=True) as conn:
            for k in range(1, UPDATES + 1):
                order = list(owners)
                rng.shuffle(order)
                for job in order:  # one transaction each
                    conn.execute(
                        "UPDATE jobs SET progress = %s, status = %s, stage = %s, message = %s "
                        "WHERE id = %s",
                        (k, "completed" if k == UPDATES else "processing", f"stage {k // 25}",
                         f"update {k}", job))
                    written += 1

    feed = start_feed()
    writing = asyncio.create_task(asyncio.to_thread(writer))
    # Kill 1, at the worst moment: Herald has applied a round the feed has not
    # deleted yet. Rows held by another transaction's row locks make the feed's
    # DELETE wait after its publish; SIGKILL it there, then let go.
    await until(lambda: written >= 3000, timeout=120, what="3000 updates")
    feed.kill()
    await until(lambda: sql(database, "SELECT count(*) FROM herald_outbox")[0][0] >= 200,
                timeout=60, what="a backlog")
    with psycopg.connect(database) as locker:
        held = len(locker.execute("SELECT id FROM herald_outbox FOR UPDATE").fetchall())
        feed = start_feed()
        await until(lambda: sql(database, BLOCKED_DELETE)[0][0] == 1, timeout=60,
                    what="the feed's DELETE waiting after its publish")
        feed.kill()
        locker.rollback()
    feed = start_feed()
    # Kill 2: wherever the feed is.
    await until(lambda: written >= 7000, timeout=120, what="7000 updates")
    feed.kill()
    feed = start_feed()
    await writing
    await until(lambda: sql(database, "SELECT count(*) FROM herald_outbox")[0][0] == 0,
                timeout=120, what="the outbox drained")
    assert sql(database, "SELECT count(*) FROM herald_outbox_dead")[0][0] == 0

    expected = list(range(UPDATES + 1))  # the insert (progress 0), then each update once
    for job, owner in owners.items():
        messages = await history(gw, f"job:{job}", owner)
        # Rows published but not yet deleted at a kill went out again with their
        # key, and the gateway applied them once: no loss, no repeat, commit order.
        assert [m["data"]["progress"] for m in messages] == expected, job
        assert [m["offset"] for m in messages] == list(range(1, UPDATES + 2)), job
    for owner in sorted(set(owners.values())):
        notes = [m["data"]["jobId"] for m in await history(gw, f"user:{owner}", owner)
                 if m["event"] == "notification"]
        assert sorted(notes) == sorted(j for j, o in owners.items() if o == owner), owner
    _, text = await http(gw, "GET", "/metrics")
    duplicates = next(float(line.split()[-1]) for line in text.splitlines()
                      if line.startswith("herald_publications_duplicate_total"))
    assert duplicates >= min(held, 200)  # the killed round did come again, and was dropped


async def test_one_active_feed_the_other_takes_over_and_sigterm_stops_cleanly(herald, database):
    gw, start_feed = herald()
    sql(database, "INSERT INTO jobs (id, user_id) VALUES ('s1', 'dave')")
    first = start_feed()
    await until(lambda: sql(database, "SELECT count(*) FROM herald_outbox")[0][0] == 0,
                what="the first feed active")
    second = start_feed()  # finds the advisory lock taken: a hot standby
    await until(lambda: _gauge(second, "herald_feed_active", 0), what="the standby up")
    assert await _gauge(first, "herald_feed_active", 1)
    for n in (1, 2):
        sql(database, "UPDATE jobs SET status = 'processing', progress = %s WHERE id = 's1'", n)
    await until(lambda: sql(database, "SELECT count(*) FROM herald_outbox")[0][0] == 0,
                what="published by the active feed")
    assert (await second.metrics())['herald_feed_rows_total{outcome="published"}'] == 0

    assert first.proc is not None and second.proc is not None
    first.proc.terminate()  # SIGTERM: the round finishes, the process exits 0
    assert await asyncio.to_thread(first.proc.wait, 20) == 0
    await until(lambda: _gauge(second, "herald_feed_active", 1), what="the standby took over")
    sql(database, "UPDATE jobs SET status = 'completed', progress = 100 WHERE id = 's1'")
    await until(lambda: sql(database, "SELECT count(*) FROM herald_outbox")[0][0] == 0,
                what="published by the new active feed")
    assert (await second.metrics())['herald_feed_rows_total{outcome="published"}'] == 1
    messages = await history(gw, "job:s1", "dave")
    assert [m["data"]["progress"] for m in messages] == [0, 1, 2, 100]

    third = start_feed()  # a standby hears SIGTERM too
    await until(lambda: _gauge(third, "herald_feed_active", 0), what="another standby up")
    assert third.proc is not None
    third.proc.terminate()
    assert await asyncio.to_thread(third.proc.wait, 20) == 0


async def _gauge(feed: FeedProcess, name: str, value: float) -> bool:
    return (await feed.metrics()).get(name) == value


async def test_database_restart_the_feed_reconnects_and_goes_on(tmp_path):
    from tests.pg import start_postgres

    pg, tmp = start_postgres(free_port())  # a cluster of its own: this test stops it
    port = free_port()
    gw = GatewayProcess("gw-feed-db", port, gateway_env(HERALD_PORT=str(port)))
    feed: FeedProcess | None = None
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(outbox_sql())
            conn.execute(JOBS_SQL)
            conn.execute("INSERT INTO jobs (id, user_id) VALUES ('db1', 'erin')")
        gw.start()
        feed = FeedProcess(gateway_env(HERALD_FEED_DSN=pg.dsn, HERALD_FEED_URL=gw.url,
                                       HERALD_API_KEY=API_KEY), free_port(), tmp_path / "feed.log")
        feed.start()
        await until(lambda: sql(pg.dsn, "SELECT count(*) FROM herald_outbox")[0][0] == 0,
                    what="published")
        await asyncio.to_thread(pg.stop)
        await until(lambda: _database_errors(feed), what="the outage counted")
        assert feed.proc is not None and feed.proc.poll() is None  # still running
        await asyncio.to_thread(pg.start)
        sql(pg.dsn, "UPDATE jobs SET status = 'completed', progress = 100 WHERE id = 'db1'")
        await until(lambda: sql(pg.dsn, "SELECT count(*) FROM herald_outbox")[0][0] == 0,
                    timeout=60, what="published after the restart")
        messages = await history(gw, "job:db1", "erin")
        assert [m["data"]["progress"] for m in messages] == [0, 100]
    finally:
        if feed is not None:
            feed.kill()
        gw.stop()
        pg.stop()
        tmp.cleanup()


async def _database_errors(feed: FeedProcess) -> bool:
    figures = await feed.metrics()
    return figures.get('herald_feed_errors_total{reason="database"}', 0) > 0
