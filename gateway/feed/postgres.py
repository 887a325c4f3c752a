"""`herald feed postgres`: follow the outbox table and publish each change.

The loop (one active feed per database: a session advisory lock makes a
second instance a hot standby that takes over when the first one dies):

1. read the oldest rows of `herald_outbox` (`--batch`, in id order);
2. map each (mapping.py); a bad row is counted, logged with its key and
   moved to `herald_outbox_dead` in step 4;
3. publish the rest through the Python publisher with the idempotency key
   `feed:<id>`: rows of different channels concurrently, a channel's rows one
   after the other in id order. A retryable failure (Herald unavailable) stops
   that channel for this round, so nothing overtakes it;
4. delete what was published (and move the bad rows) in one transaction.

A crash between 3 and 4 republishes those rows: Herald sees their keys again
and answers `duplicate` instead of publishing twice. Rows are deleted rather
than tracked by a high-water mark because ids are handed out at insert time,
not commit time: a transaction that commits late with a lower id would
otherwise be skipped. For one jobs row the trigger's ids follow the commit
order (the row lock orders the updates), so id order is commit order per row.

Wake-ups: `LISTEN herald_outbox` (the trigger notifies), and a poll every
`--poll-interval` seconds in case a notification was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

import orjson
import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from psycopg.rows import tuple_row
from psycopg.types.json import set_json_loads

from gateway.config import ConfigError
from gateway.feed.mapping import (
    JobsMapping,
    JobUpdate,
    Mapped,
    OutboxRow,
    Unmappable,
    in_channel_order,
    retryable,
)
from gateway.sdk.publisher import Publisher, PublishError

log = logging.getLogger("herald.feed")

# pg_advisory_lock key: "herald feed" (any constant shared by every feed instance).
LOCK_KEY = 0x68657261_6C64
NOTIFY_CHANNEL = "herald_outbox"
SELECT = (
    "SELECT id, table_name, op, row_data, created_at FROM herald_outbox ORDER BY id LIMIT %s"
)
BURY = (
    "INSERT INTO herald_outbox_dead (id, table_name, op, row_data, created_at, reason) "
    "SELECT id, table_name, op, row_data, created_at, %s FROM herald_outbox WHERE id = %s "
    "ON CONFLICT (id) DO NOTHING"
)
DELETE = "DELETE FROM herald_outbox WHERE id = ANY(%s)"


class FeedMetrics:
    """The feed's Prometheus metrics (its own registry: it is not a gateway)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rows = Counter(
            "herald_feed_rows", "Outbox rows handled, by outcome (published, duplicate, skipped)",
            ["outcome"], registry=self.registry,
        )
        self.errors = Counter(
            "herald_feed_errors", "Failures that made the feed retry (publish codes, database)",
            ["reason"], registry=self.registry,
        )
        self.lag = Histogram(
            "herald_feed_lag_seconds", "From a row's insert (its commit, near enough) to "
            "Herald taking its publication",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.last_lag = Gauge(
            "herald_feed_last_lag_seconds", "Lag of the last row published", registry=self.registry
        )
        self.active = Gauge(
            "herald_feed_active", "1 while this feed holds the lock and follows the outbox, "
            "0 while it waits as a standby (or for the database)", registry=self.registry,
        )
        for outcome in ("published", "duplicate", "skipped"):
            self.rows.labels(outcome)


@dataclasses.dataclass(frozen=True)
class FeedOptions:
    dsn: str
    mapping: JobsMapping = dataclasses.field(default_factory=JobsMapping)
    batch: int = 1000
    poll_interval: float = 1.0
    backoff_max: float = 10.0
    standby_interval: float = 1.0  # how often a standby tries to take the lock


@dataclasses.dataclass
class _Round:
    """What one round decided: rows to delete, rows to bury (with why), and whether to back off."""

    done: list[int] = dataclasses.field(default_factory=list)
    dead: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    retry: bool = False


class PostgresFeed:
    def __init__(
        self, options: FeedOptions, publisher: Publisher, metrics: FeedMetrics | None = None
    ) -> None:
        self.options = options
        self.publisher = publisher
        self.metrics = metrics or FeedMetrics()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._failures = 0  # database failures in a row (backoff)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Follow the outbox until `stop()`; database outages are retried with backoff."""
        while not self._stop.is_set():
            try:
                await self._session()
                return
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self.metrics.active.set(0)
                self.metrics.errors.labels("database").inc()
                self._failures += 1
                delay = min(self.options.backoff_max, 0.2 * 2 ** min(self._failures, 10))
                log.warning("feed: database unavailable (%s); retrying in %.1f s", exc, delay)
                await self._sleep(delay)

    async def _session(self) -> None:
        opts = self.options
        async with await psycopg.AsyncConnection.connect(
            opts.dsn, autocommit=True, row_factory=tuple_row
        ) as conn:
            set_json_loads(orjson.loads, conn)  # row_data: the C parser, not json's
            if not await self._take_lock(conn):
                return  # stopped while a standby
            self._failures = 0
            self.metrics.active.set(1)
            log.info("feed: active, following herald_outbox")
            listener = asyncio.create_task(self._listen())
            try:
                backoff = 0
                while not self._stop.is_set():
                    self._wake.clear()
                    handled, retry = await self._round(conn)
                    if retry:
                        backoff += 1
                        await self._sleep(min(opts.backoff_max, 0.1 * 2 ** min(backoff, 10)))
                    elif handled < opts.batch:
                        backoff = 0
                        await self._idle()
                    else:
                        backoff = 0
            finally:
                self.metrics.active.set(0)
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def _take_lock(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Become the active feed (True), or wait as a standby until stopped (False).

        A try-lock in a loop rather than a blocking `pg_advisory_lock`: a
        standby must still hear SIGTERM. The lock is the session's, so it goes
        when the active feed's connection does (exit, crash, SIGKILL).
        """
        waiting = False
        while not self._stop.is_set():
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY])
            row = await cur.fetchone()
            if row is not None and row[0]:
                return True
            if not waiting:
                log.info("feed: another feed is active; standing by")
                waiting = True
            await self._sleep(self.options.standby_interval)
        return False

    async def _listen(self) -> None:
        """Set the wake event on every outbox notification (a separate connection)."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.options.dsn, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    async for _ in conn.notifies():
                        self._wake.set()
            except (psycopg.OperationalError, psycopg.InterfaceError):
                await asyncio.sleep(1.0)  # the poll covers the gap

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.options.poll_interval)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _round(self, conn: psycopg.AsyncConnection[Any]) -> tuple[int, bool]:
        """One batch: read, map, publish, then delete what is settled. -> (rows read, retry?)."""
        cur = await conn.execute(SELECT, [self.options.batch])
        rows = [OutboxRow(*r) for r in await cur.fetchall()]
        if not rows:
            return 0, False
        outcome = _Round()
        mapped: list[Mapped] = []
        for row in rows:
            try:
                mapped.append((row, self.options.mapping.map(row)))
            except Unmappable as exc:
                self._bad(outcome, row, exc.reason)

        async def publish_group(group: list[Mapped]) -> None:
            for row, update in group:
                if not await self._publish(outcome, row, update):
                    return  # retry later; nothing of this channel overtakes it

        # Every channel at once (bounded by --batch): the publisher batches
        # concurrent publishes into one request per round trip.
        await asyncio.gather(*(publish_group(g) for g in in_channel_order(mapped)))
        if outcome.done or outcome.dead:
            async with conn.transaction():
                for row_id, reason in outcome.dead:
                    await conn.execute(BURY, [reason, row_id])
                await conn.execute(DELETE, [outcome.done + [i for i, _ in outcome.dead]])
        return len(rows), outcome.retry

    async def _publish(self, outcome: _Round, row: OutboxRow, update: JobUpdate) -> bool:
        """Publish one row; False when it must be retried (Herald unwell)."""
        try:
            reply = await self.publisher.job_progress(
                update.job_id, update.owner, update.status, update.progress,
                stage=update.stage, message=update.message, idempotency_key=row.key,
            )
        except PublishError as exc:
            if retryable(exc.code):
                self.metrics.errors.labels(exc.code).inc()
                if not outcome.retry:
                    log.warning("feed: %s not published (%s: %s); retrying",
                                row.key, exc.code, exc.message)
                outcome.retry = True
                return False
            self._bad(outcome, row, f"{exc.code}: {exc.message}")
            return True
        self.metrics.rows.labels("duplicate" if reply.get("duplicate") else "published").inc()
        lag = max(0.0, time.time() - row.created_at.timestamp())
        self.metrics.lag.observe(lag)
        self.metrics.last_lag.set(lag)
        outcome.done.append(row.id)
        return True

    def _bad(self, outcome: _Round, row: OutboxRow, reason: str) -> None:
        self.metrics.rows.labels("skipped").inc()
        log.error("feed: bad row %s (table %s, %s) skipped: %s",
                  row.key, row.table, row.op, reason)
        outcome.dead.append((row.id, reason[:1000]))


async def run_feed(
    options: FeedOptions,
    publisher: Publisher,
    metrics: FeedMetrics,
    metrics_address: tuple[str, int] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (a clean stop: the current round finishes first).

    The metrics server starts once the signal handlers are in place, so a
    process that answers /metrics also stops cleanly on SIGTERM. Raises
    ConfigError when the metrics port cannot be bound.
    """
    import signal

    from prometheus_client import start_http_server

    feed = PostgresFeed(options, publisher, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, feed.stop)
    if metrics_address is not None:
        host, port = metrics_address
        try:
            start_http_server(port, host, registry=metrics.registry)
        except OSError as exc:
            raise ConfigError(f"metrics port {port}: {exc}") from None
    try:
        await feed.run()
    finally:
        await publisher.close()


def outbox_sql() -> str:
    """The outbox table, dead-letter table and trigger functions (outbox.sql)."""
    from importlib.resources import files

    return (files("gateway.feed") / "outbox.sql").read_text()
