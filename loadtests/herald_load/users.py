"""Locust users: WebSocket viewers of several kinds, and HTTP publishers.

A viewer holds one connection for its whole life, reconnecting (and
resuming with `since`) when the server closes it, as a real client does;
its task loop waits on the connection and does its periodic duty (ping,
token refresh, or a deliberate reconnect for churn). Publishers put
`sent_at` (unix seconds) in every payload; viewers turn it into the
publish-to-deliver latency of each message.
"""

from __future__ import annotations

import itertools
import random
import time
from typing import Any, ClassVar

import gevent
from locust import FastHttpUser, User, constant, constant_throughput, task
from locust.runners import WorkerRunner

from .api import api_headers, channel_position, ensure_jobs
from .connection import IDLE, HeraldConnection
from .options import Config, config_of
from .redis_publish import BridgeError, RedisBridge
from .report import (
    DUPLICATE,
    EPOCH_RESET,
    LOST,
    SKIPPED,
    WS,
    Reporter,
    ms_since,
    namespace,
)
from .tokens import TokenSource
from .tracker import OffsetTracker, Verdict

_viewer_numbers = itertools.count()
_tokens: dict[int, TokenSource] = {}
_cycles: dict[tuple[str, ...], itertools.cycle[str]] = {}

MAX_BACKOFF = 10.0
SLOW_RCVBUF = 4096


def global_number(environment: Any) -> int:
    """A number unique across the workers of a run, spreading viewers evenly over jobs."""
    local = next(_viewer_numbers)
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        workers = max(1, int(getattr(environment.parsed_options, "expect_workers", 1) or 1))
        return local * workers + runner.worker_index
    return local


def token_source(config: Config) -> TokenSource:
    key = id(config)
    if key not in _tokens:
        _tokens.clear()
        _tokens[key] = TokenSource(config)
    return _tokens[key]


def round_robin(channels: list[str]) -> str:
    """The next channel for this process's publishers, which share one rotation."""
    key = tuple(channels)
    if key not in _cycles:
        _cycles[key] = itertools.cycle(channels)
    return next(_cycles[key])


class Viewer(User):
    """A WebSocket client watching `channels()`, checking every offset it receives."""

    abstract = True
    wait_time = constant(0)  # the task itself waits on the connection
    slow: ClassVar[bool] = False
    expected_closes: ClassVar[frozenset[int]] = frozenset()

    config: Config
    conn: HeraldConnection | None

    def on_start(self) -> None:
        self.config = config_of(self.environment)
        self.report = Reporter(self.environment, slow=self.slow)
        self.tracker = OffsetTracker()
        self.tokens = token_source(self.config)
        self.number = global_number(self.environment)
        self.sub = f"{self.config.prefix}-viewer-{self.number}"
        self.watching = self.channels()
        self.conn = None
        self.backoff = 0.0
        self.refresh_at: float | None = None  # unix time the token is due for renewal
        self._resuming: set[str] = set()
        self._messages = 0
        self.prepare()
        self.reconnect()

    # -- what a kind of viewer changes --------------------------------------

    def channels(self) -> list[str]:
        return [self.config.broadcast_channel]

    def claims_channels(self) -> list[str] | None:
        return None

    def prepare(self) -> None:
        """Anything the server must know before we subscribe."""

    def interval(self) -> float:
        return self.config.ping_interval

    def tick(self, conn: HeraldConnection) -> None:
        """Periodic duty on a live connection: refresh the token when due, ping."""
        self.refresh_if_due(conn)
        conn.ping()

    def new_token(self) -> str:
        self.token, self.refresh_at = self.tokens.token(self.sub, self.claims_channels())
        return self.token

    def refresh_if_due(self, conn: HeraldConnection) -> None:
        """Renew a minted token in place at 80 % of its life, as a real client does."""
        if self.refresh_at is not None and time.time() >= self.refresh_at:
            conn.refresh(self.new_token())

    def until_next_duty(self) -> float:
        """Until the next periodic duty: the kind's interval, or the token's renewal."""
        if self.refresh_at is None:
            return self.interval()
        return max(0.0, min(self.interval(), self.refresh_at - time.time()))

    # -- the connection's life ---------------------------------------------------

    def connect(self) -> bool:
        """Open, then subscribe each channel (resuming where we were, if we were)."""
        conn = HeraldConnection(
            self.config.ws_url,
            self.new_token(),
            self.report,
            self.on_frame,
            auth_mode=self.config.ws_auth,
            idle_timeout=self.config.idle_timeout,
            read_delay=self.config.slow_delay if self.slow else 0.0,
            rcvbuf=SLOW_RCVBUF if self.slow else None,
        )
        self.conn = conn
        if not conn.open():
            return False
        for channel in self.watching:
            position = self.tracker.position(channel)
            since = None
            if position is not None:
                since = {"epoch": position.epoch, "offset": position.offset}
                self._resuming.add(channel)
            if conn.subscribe(channel, since) is None:
                self._resuming.discard(channel)
                conn.close()  # retried with backoff by the task loop
                return False
        return True

    @task
    def watch(self) -> None:
        conn = self.conn
        if conn is None or conn.closed.is_set():
            self._closed(conn)
            return
        if not conn.closed.wait(self.until_next_duty()):
            self.tick(conn)

    def _closed(self, conn: HeraldConnection | None) -> None:
        """Report how the server ended the connection, wait as a polite client would,
        reconnect."""
        delay = self.backoff
        if conn is not None and not conn.closed_locally:
            code = conn.close_code
            asked = conn.reconnect_after is not None
            expected = asked or code in self.expected_closes
            name = "close idle" if code == IDLE else f"close {code}"
            self.report.record(
                WS, name, failure=None if expected else f"connection ended with {code}"
            )
            if conn.reconnect_after is not None:
                delay = conn.reconnect_after
        self.conn = None
        if delay:
            gevent.sleep(delay)
        self.reconnect()

    def reconnect(self) -> None:
        """Connect; after a failure the next attempt backs off (jittered, up to 10 s)."""
        if self.connect():
            self.backoff = 0.0
        else:
            self.backoff = min(MAX_BACKOFF, max(0.5, self.backoff * 2)) * random.uniform(0.8, 1.2)

    def on_stop(self) -> None:
        if self.config.drain_timeout > 0:
            conn = self.conn
            if conn is None or conn.closed.is_set():
                # Down at the end (its gateway gone, or between two tries): one
                # last try, as a real client would still be reconnecting; a
                # resume recovers what it missed, which is no loss.
                self.conn = None
                conn = self.conn if self.connect() else None
            self.drain(conn)
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def drain(self, conn: HeraldConnection | None) -> None:
        """At the end, wait for what the server has published to arrive, then judge.

        Without this, the loss of a channel's last messages would go unseen
        (no later offset reveals the gap). Herald's current position of each
        channel is read over HTTP (from --host); every offset up to it must
        arrive within --drain-timeout, else the missing ones are counted like
        any gap. A viewer that could not reconnect (`conn` None) waits for
        nothing: everything it has not seen is missing. A position that
        cannot be read is a failed `GET channel state` row, never a silent 0.
        """
        targets = {}
        for channel in self.watching:
            position = channel_position(self.config, self.token, channel, self.report)
            if position is not None:
                targets[channel] = position
        deadline = time.monotonic() + self.config.drain_timeout
        while conn is not None and time.monotonic() < deadline and not conn.closed.is_set():
            if not any(self._behind(channel, *target) for channel, target in targets.items()):
                return
            gevent.sleep(0.05)
        why = "not there at the end" if conn is not None else "disconnected at the end"
        for channel, (epoch, offset) in targets.items():
            missing = self._behind(channel, epoch, offset)
            if missing:
                self._missed(missing, f"{channel} up to offset {offset}, {why}")

    def _behind(self, channel: str, epoch: str, offset: int) -> int:
        """How many offsets up to `offset` of `epoch` this viewer has not seen yet."""
        seen = self.tracker.position(channel)
        if seen is None or seen.epoch != epoch:
            return 0  # never subscribed, or reset: nothing to hold this stream to
        return max(0, offset - seen.offset)

    # -- frames -----------------------------------------------------------------

    def on_frame(self, msg: dict[str, Any], received: float, size: int) -> None:
        channel = msg.get("channel")
        epoch = msg.get("epoch")
        offset = msg.get("offset")
        if not isinstance(channel, str) or not isinstance(offset, int):
            return
        if msg.get("type") == "subscribed":
            if channel in self._resuming:
                self._resuming.discard(channel)
                outcome = self.tracker.resumed(
                    channel, str(epoch), offset, bool(msg.get("recovered"))
                )
                self._judge(outcome.verdict, outcome.missing, channel)
            else:
                self.tracker.reset(channel, str(epoch), offset)
            return
        self._messages += 1
        if self.config.simulate_loss and self._messages % self.config.simulate_loss == 0:
            return  # --simulate-loss: as if this frame never arrived
        outcome = self.tracker.message(channel, str(epoch), offset)
        if outcome.verdict is Verdict.DUPLICATE:
            self._judge(outcome.verdict, 1, channel, offset)
            return
        self._judge(outcome.verdict, outcome.missing, channel, offset)
        event = str(msg.get("event"))
        data = msg.get("data")
        sent_at = data.get("sent_at") if isinstance(data, dict) else None
        if isinstance(sent_at, int | float):
            self.report.delivered(event, max(0.0, (received - sent_at) * 1000), size)
        else:
            self.report.delivered(f"{event} (untimed)", 0.0, size)

    def _missed(self, count: int, where: str) -> None:
        """Offsets this viewer never got: lost, or skipped if it is a slow consumer.

        Named by viewer: the publisher's side of a loss shows as failed
        `publish` rows, the viewers' side here, so a run says who missed what.
        """
        if self.slow:
            self.report.check(SKIPPED, count, f"viewer {self.sub}: {count} offsets {where}",
                              failure=False)
        else:
            self.report.check(LOST, count, f"viewer {self.sub}: {count} offsets missing {where}")

    def _judge(self, verdict: Verdict, count: int, channel: str, offset: int = -1) -> None:
        where = f"{channel} at offset {offset}" if offset >= 0 else f"{channel} on resubscribe"
        if verdict is Verdict.LOST and count > 0:
            self._missed(count, f"before {where}")
        elif verdict is Verdict.DUPLICATE:
            self.report.check(DUPLICATE, 1, f"offset received twice: {where}")
        elif verdict is Verdict.EPOCH_RESET:
            self.report.check(EPOCH_RESET, 1, f"new epoch: {where}")
        elif verdict is Verdict.UNTRACKED:
            self.report.check("untracked", 1, f"message before subscribed: {where}")


class BroadcastViewer(Viewer):
    """Watches the run's one public channel (storm, broadcast)."""


class JobViewer(Viewer):
    """Watches one job; viewer n watches job n mod J, so each job gets K = users/J viewers."""

    def channels(self) -> list[str]:
        jobs = self.config.job_ids()
        self.job = jobs[self.number % len(jobs)]
        return [f"job:{self.job}"]

    def claims_channels(self) -> list[str] | None:
        return [f"job:{self.config.prefix}-*"]

    def prepare(self) -> None:
        ensure_jobs(self.config, [self.job], self.report)


class ChurnViewer(JobViewer):
    """Drops its connection every ~churn-interval and resumes with `since`."""

    def interval(self) -> float:
        return self.config.churn_interval * random.uniform(0.5, 1.5)

    def tick(self, conn: HeraldConnection) -> None:
        conn.close()
        self.conn = None
        self.connect()


class SlowViewer(JobViewer):
    """Reads slowly through a tiny receive buffer; its deliveries are `deliver-slow` rows.

    Offsets it misses are `skipped (slow)`, not `lost`: a gateway may
    conflate a slow client's progress updates or close it (4008) and let
    it recover, by design. What the scenario checks is that the normal
    viewers of the same jobs are unaffected.
    """

    slow = True
    expected_closes = frozenset({4008})

    def tick(self, conn: HeraldConnection) -> None:
        """No ping: its reply waits behind the backlog and would time out by design."""
        self.refresh_if_due(conn)


class Publisher(FastHttpUser):
    """Publishes to `targets()` through the HTTP API at --rate per channel, shared by
    --publishers users (round-robin over the channels)."""

    abstract = True
    event: ClassVar[str] = "message"
    config: Config

    def on_start(self) -> None:
        self.config = config_of(self.environment)
        self.report = Reporter(self.environment)
        self.headers = api_headers(self.config)
        self.pad = "x" * self.config.payload_bytes
        self.seq = 0
        total = self.config.rate * len(self.targets())
        self._pace = constant_throughput(total / self.config.publishers)
        self.bridge: RedisBridge | None = None
        if self.config.publish_via == "redis":
            started = time.perf_counter()
            self.bridge = RedisBridge(self.config.redis_url, self.config.redis_prefix)
            why = self.bridge.ready()
            self.report.record("REDIS", "start publisher", ms_since(started), failure=why)
        self.prepare()

    def on_stop(self) -> None:
        if self.bridge is not None:
            self.bridge.close()
            self.bridge = None

    def wait_time(self) -> float:
        return self._pace(self)

    def targets(self) -> list[str]:
        return [self.config.broadcast_channel]

    def prepare(self) -> None:
        """Anything to set up before the first publication."""

    def body(self, channel: str) -> dict[str, Any]:
        return {"channel": channel, "event": self.event, "data": self.data(channel)}

    def data(self, channel: str) -> dict[str, Any]:
        return {"seq": self.seq}

    @task
    def publish(self) -> None:
        channel = round_robin(self.targets())
        self.seq += 1
        body = self.body(channel)
        if self.pad:
            body["data"]["pad"] = self.pad
        name = f"publish {namespace(channel)}"
        body["data"]["sent_at"] = time.time()
        if self.bridge is None:
            self.client.post("/api/v1/publish", json=body, headers=self.headers, name=name)
            return
        started = time.perf_counter()
        try:
            reply = self.bridge.call({"op": "publish", **body})
            failure = None if reply.get("ok") else str(reply.get("error"))
        except BridgeError as exc:
            failure = str(exc)
        self.report.record("REDIS", name, ms_since(started), failure=failure)


class BroadcastPublisher(Publisher):
    """Dashboard-like `metrics` events on the run's public channel."""

    event = "metrics"


class JobPublisher(Publisher):
    """`progress` events on the J jobs, as a worker reporting job progress would."""

    event = "progress"

    def targets(self) -> list[str]:
        return [f"job:{job}" for job in self.config.job_ids()]

    def prepare(self) -> None:
        ensure_jobs(self.config, self.config.job_ids(), self.report)

    def body(self, channel: str) -> dict[str, Any]:
        return {**super().body(channel), "owner": self.config.owner}

    def data(self, channel: str) -> dict[str, Any]:
        return {
            "jobId": channel.partition(":")[2],
            "status": "processing",
            "progress": self.seq % 100,
            "stage": "load-test",
        }

