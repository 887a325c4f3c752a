"""The Postgres change feed: rows/s it drains and the lag it adds.

    python -m benchmarks.feed_bench --quick     # about 30 s
    python -m benchmarks.feed_bench             # about 2 minutes

One throwaway PostgreSQL (Debian's, as the tests start it), one gateway
(`python -m gateway serve`, embedded engine) and `herald feed postgres`
(`python -m gateway feed postgres`), all on loopback. Two phases:

- **drain**: `--rows` updates of 1,000 jobs are committed with the feed
  stopped, then the feed starts; rows/s = rows / time from the feed process
  being up (its metrics port open) until the outbox is empty. Baseline in
  the same run: the same job updates sent straight to the gateway with
  `HttpPublisher.job_progress` (concurrent, so batched), the ceiling for
  any publisher of that gateway.
- **lag**: the feed running, a writer commits `--rate` updates/s of 50 jobs
  for `--seconds`; a WebSocket subscriber of those 50 job channels stamps
  each arrival. Lag = arrival - the writer's clock as it sent the UPDATE
  (autocommit; carried in the row's `message`), so it is the whole path: trigger,
  notify, feed, HTTP publish, gateway fan-out. p50/p95/p99/max printed,
  with the feed's own `herald_feed_lag_seconds` (insert -> Herald took it).

Every figure is a measurement on a shared machine, never a test: rerun and
compare in the same run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import psycopg
import websockets

from benchmarks.procs import API_KEY, free_port
from gateway.feed.postgres import outbox_sql
from gateway.sdk.publisher import HttpPublisher
from gateway.security.auth import mint_token
from tests.pg import start_postgres

SECRET = "bench-secret-0123456789abcdef0123456789"
OWNER = "feed-bench"
BATCH = 1000  # the feed's default --batch
JOBS_SQL = """
CREATE TABLE jobs (id text PRIMARY KEY, user_id text, status text NOT NULL DEFAULT 'queued',
                   progress numeric NOT NULL DEFAULT 0, stage text, message text);
CREATE TRIGGER herald_outbox AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION herald_outbox_capture();
"""


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    out.update(HERALD_HOST="127.0.0.1", HERALD_JWT_SECRET=SECRET, HERALD_API_KEY=API_KEY,
               HERALD_DEMO="false", HERALD_LOG_LEVEL="WARNING", HERALD_IP_CONNECT_RATE="0",
               HERALD_STATE_DIR=tempfile.mkdtemp(prefix="herald-feed-bench-"), **extra)
    return out


def wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def count(dsn: str, table: str = "herald_outbox") -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]


def write_updates(dsn: str, jobs: list[str], rows: int) -> None:
    """`rows` updates round-robin over `jobs`, one transaction each."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(rows):
            conn.execute("UPDATE jobs SET status = 'processing', progress = %s, message = %s "
                         "WHERE id = %s", (i // len(jobs) % 100, f"n{i}", jobs[i % len(jobs)]))


async def drained(dsn: str, within: float) -> None:
    deadline = time.monotonic() + within
    while count(dsn) > 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"the outbox did not drain in {within:.0f} s")
        await asyncio.sleep(0.05)


async def drain(dsn: str, feed_env: dict[str, str], rows: int) -> float:
    """Rows/s of a feed started on a backlog of `rows` committed updates."""
    jobs = [f"d{i}" for i in range(1000)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO jobs (id, user_id) VALUES (%s, %s)",
                            [(j, OWNER) for j in jobs])
    await asyncio.to_thread(write_updates, dsn, jobs, rows)
    backlog = count(dsn)
    metrics_port = free_port()
    feed = start_feed(feed_env, metrics_port)
    wait_port(metrics_port)  # the process is up (imports done): the clock starts here
    start = time.perf_counter()
    try:
        await drained(dsn, 600)
        elapsed = time.perf_counter() - start
    finally:
        feed.terminate()
        feed.wait(20)
    return backlog / elapsed


async def direct(url: str, rows: int) -> float:
    """The same job updates straight from HttpPublisher: the gateway's ceiling."""
    jobs = [f"p{i}" for i in range(1000)]
    async with HttpPublisher(url, API_KEY) as pub:
        start = time.perf_counter()
        window = 1000
        for base in range(0, rows, window):
            await asyncio.gather(*(
                pub.job_progress(jobs[i % len(jobs)], OWNER, "processing", i // len(jobs) % 100,
                                 message=f"n{i}")
                for i in range(base, min(rows, base + window))))
        return rows / (time.perf_counter() - start)


def start_gateway(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve"],
                            env=env(HERALD_PORT=str(port)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_feed(feed_env: dict[str, str], metrics_port: int = 0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "feed", "postgres", "--poll-interval", "0.5",
         "--batch", str(BATCH),
         "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"],
        env=feed_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def lag(dsn: str, feed_env: dict[str, str], gw_port: int, rate: int,
              seconds: float) -> tuple[list[float], dict[str, float]]:
    jobs = [f"l{i}" for i in range(50)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for j in jobs:
            conn.execute("INSERT INTO jobs (id, user_id) VALUES (%s, %s)", (j, OWNER))
    metrics_port = free_port()
    feed = start_feed(feed_env, metrics_port)
    wait_port(metrics_port)
    await drained(dsn, 60)  # the inserts published: the jobs have their owner
    lags: list[float] = []
    total = int(rate * seconds)
    tok = mint_token(SECRET, OWNER)
    try:
        async with websockets.connect(f"ws://127.0.0.1:{gw_port}/ws",
                                      additional_headers={"Authorization": f"Bearer {tok}"}) as ws:
            await ws.recv()  # connected
            await ws.recv()  # subscribed user:
            for i, j in enumerate(jobs):
                frame = {"type": "subscribe", "channel": f"job:{j}", "id": i}
                await ws.send(orjson.dumps(frame).decode())
            subscribed = 0
            while subscribed < len(jobs):
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                if frame.get("type") == "error":
                    raise SystemExit(f"subscribe refused: {frame}")
                subscribed += frame.get("type") == "subscribed"
            writer = threading.Thread(target=paced_writer, args=(dsn, jobs, rate, total))
            writer.start()
            deadline = time.monotonic() + seconds + 60
            while len(lags) < total and time.monotonic() < deadline:
                try:
                    raw = await asyncio.wait_for(ws.recv(), 5)
                except TimeoutError:
                    continue
                now = time.time()
                frame = orjson.loads(raw)
                if frame.get("type") == "message" and frame["event"] == "progress":
                    lags.append(now - float(frame["data"]["message"]))
            writer.join()
        figures = scrape(metrics_port)
    finally:
        feed.terminate()
        feed.wait(20)
    return lags, figures


def paced_writer(dsn: str, jobs: list[str], rate: int, total: int) -> None:
    """`rate` updates/s, each its own transaction, carrying the writer's clock."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        start = time.perf_counter()
        for i in range(total):
            pause = start + i / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            conn.execute("UPDATE jobs SET status = 'processing', progress = %s, message = %s "
                         "WHERE id = %s", (i % 100, repr(time.time()), jobs[i % len(jobs)]))


def scrape(port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5,000 rows, 10 s of lag")
    parser.add_argument("--rows", type=int, help="backlog rows to drain (default 50,000)")
    parser.add_argument("--rate", type=int, default=200, help="updates/s in the lag phase")
    parser.add_argument("--seconds", type=float, help="length of the lag phase (default 30)")
    args = parser.parse_args()
    rows = args.rows or (5000 if args.quick else 50000)
    seconds = args.seconds or (10.0 if args.quick else 30.0)

    pg, tmp = start_postgres(free_port())
    gw_port = free_port()
    gw = start_gateway(gw_port)
    try:
        wait_port(gw_port)
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(outbox_sql())
            conn.execute(JOBS_SQL)
        url = f"http://127.0.0.1:{gw_port}"
        feed_env = env(HERALD_FEED_DSN=pg.dsn, HERALD_FEED_URL=url)
        print(f"feed_bench: {rows} rows to drain, then {args.rate} updates/s for {seconds:.0f} s")
        ceiling = await direct(url, rows)
        rate = await drain(pg.dsn, feed_env, rows)
        print(f"drain: {rate:,.0f} rows/s through the feed; "
              f"{ceiling:,.0f} updates/s straight from HttpPublisher (same gateway, same run): "
              f"{rate / ceiling:.0%} of it")
        lags, figures = await lag(pg.dsn, feed_env, gw_port, args.rate, seconds)
        if lags:
            ms = [x * 1000 for x in lags]
            print(f"lag at {args.rate} updates/s (commit -> WebSocket subscriber), "
                  f"{len(ms)} of {int(args.rate * seconds)} received: "
                  f"p50 {statistics.median(ms):.1f} ms, p95 {pct(ms, 0.95):.1f} ms, "
                  f"p99 {pct(ms, 0.99):.1f} ms, max {max(ms):.1f} ms")
        n = figures.get("herald_feed_lag_seconds_count", 0)
        if n:
            mean = figures["herald_feed_lag_seconds_sum"] / n * 1000
            print(f"feed's own herald_feed_lag_seconds (outbox insert -> Herald took it): "
                  f"mean {mean:.1f} ms over {n:.0f} rows")
        print(f"dead rows: {count(pg.dsn, 'herald_outbox_dead')}")
    finally:
        gw.kill()
        gw.wait()
        pg.stop()
        tmp.cleanup()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    asyncio.run(main())
