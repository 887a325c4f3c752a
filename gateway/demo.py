"""A simulated worker for the demo page: realistic jobs moving through stages.

It exists so that `herald serve` with no configuration shows something
moving at `/`. It publishes through the node like any publisher (the same
rules, the same terminal-job notifications to `user:demo`), only with an
embedded engine and never in production. It starts when the demo page asks
for its token and stops by itself once no client has been connected for a
while, so an idle or test gateway publishes nothing.

What it publishes follows the conventions of docs/client.md, so a real
backend can drive the same page: `queue_position` and `eta` on job
channels, a `job` event on `user:{id}` for each new job, and a flat object
of figures as `metrics` on `admin:metrics` (the page's admin panel).

Its jobs live in this process. After a restart (the durable engine keeps
channels and owners, so the page's cards stay valid) the jobs that were
running are finished as `cancelled` with the reason, found from the
`job` announcements kept in `user:demo`'s history: a card never shows
"processing" for a job nobody runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.broker.memory import MemoryBroker
from gateway.core.node import Node
from gateway.core.publishing import PublishRequest
from gateway.protocol.errors import ProtocolError

log = logging.getLogger("herald.demo")

DEMO_USER = "demo"
METRICS_CHANNEL = "admin:metrics"
IDLE_STOP = 60.0  # seconds without any connection before the worker rests
QUEUE_MAX = 2  # jobs waiting for a worker slot, beyond those running
METRICS_EVERY = 2.0
TERMINAL = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class Stage:
    name: str
    message: Callable[[float, random.Random], str]  # fraction of the stage done -> text
    weight: float  # share of the job's progress bar


@dataclass(frozen=True)
class Recipe:
    title: str
    stages: tuple[Stage, ...]
    failures: tuple[tuple[str, str], ...]  # (stage, message) it may fail with


def _of(total: int, unit: str) -> Callable[[float, random.Random], str]:
    return lambda f, _r: f"{int(f * total):,} of {total:,} {unit}"


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "Transcode launch-video.mp4",
        (
            Stage("uploading", lambda f, _r: f"Receiving upload ({int(f * 412)} of 412 MB)", 1),
            Stage("transcoding", lambda f, _r: f"Encoding 1080p H.264, frame {int(f * 7200):,} "
                  "of 7,200", 4),
            Stage("thumbnails", lambda f, _r: "Generating preview thumbnails", 1),
            Stage("publishing", lambda f, _r: "Pushing renditions to the CDN", 1),
        ),
        (("transcoding", "Encoder ran out of memory on the 4K source"),),
    ),
    Recipe(
        "Train churn model",
        (
            Stage("preparing", lambda f, _r: "Loading 1.2M customer rows", 1),
            Stage("training", lambda f, r: f"Epoch {max(1, int(f * 10))} of 10, loss "
                  f"{0.9 - 0.6 * f + r.uniform(-0.02, 0.02):.3f}", 5),
            Stage("evaluating", lambda f, _r: "Scoring the holdout set", 1),
        ),
        (("evaluating", "Holdout AUC 0.61 is below the 0.70 threshold"),),
    ),
    Recipe(
        "Import customers.csv",
        (
            Stage("validating", lambda f, _r: "Checking columns and encodings", 1),
            Stage("importing", _of(48000, "rows imported"), 4),
            Stage("indexing", lambda f, _r: "Rebuilding the search index", 1),
        ),
        (("importing", "Row 1,532: invalid email address 'jane@'"),),
    ),
    Recipe(
        "Monthly revenue report",
        (
            Stage("querying", lambda f, _r: "Aggregating 31 days of orders", 2),
            Stage("rendering", lambda f, _r: f"Rendering page {max(1, int(f * 24))} of 24", 2),
            Stage("sending", lambda f, _r: "Emailing the finance team", 1),
        ),
        (("sending", "The mail server refused the connection"),),
    ),
)


class DemoWorker:
    """Keeps a few jobs running for `user`, each through its recipe's stages."""

    def __init__(
        self,
        node: Node,
        user: str = DEMO_USER,
        concurrency: int = 3,
        speed: float = 1.0,
        fail_rate: float = 0.25,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.user = user
        self.concurrency = concurrency
        self.speed = speed
        self.fail_rate = fail_rate
        self.rng = rng or random.Random()
        self.recent: deque[str] = deque(maxlen=8)
        self._numbers = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._waiting: list[str] = []  # job ids in queue order
        self._running = 0
        self._step_s = 0.75 / speed  # mean seconds per progress step, for the ETA
        self.counts = {"completed": 0, "failed": 0, "cancelled": 0}
        self._recovered = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def ensure_running(self) -> None:
        if not self.running:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        for task in [self._task, *self._jobs]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _run(self) -> None:
        idle_since: float | None = None
        last_metrics = 0.0
        if not self._recovered:
            self._recovered = True
            await self._finish_interrupted()
        try:
            while True:
                now = time.monotonic()
                if self.node.draining:
                    return
                if self.node.sessions:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since > IDLE_STOP:
                    log.info("demo worker: no clients for %.0fs, resting", IDLE_STOP)
                    return
                if len(self._jobs) < self.concurrency + QUEUE_MAX:
                    job = asyncio.ensure_future(self._job())
                    self._jobs.add(job)
                    job.add_done_callback(self._jobs.discard)
                if now - last_metrics >= METRICS_EVERY:
                    last_metrics = now
                    await self._publish(METRICS_CHANNEL, "metrics", self.metrics(), None)
                await asyncio.sleep(self.rng.uniform(1.0, 2.5) / self.speed)
        finally:
            for job in list(self._jobs):
                job.cancel()

    def metrics(self) -> dict[str, float]:
        """The figures of the `admin:metrics` convention: a flat object, name -> number."""
        stats = self.node.stats()
        return {
            "jobs_running": self._running,
            "jobs_queued": len(self._waiting),
            "jobs_completed": self.counts["completed"],
            "jobs_failed": self.counts["failed"],
            "jobs_cancelled": self.counts["cancelled"],
            "connections": stats["connections"],
            "messages_out": stats["messages_out"],
        }

    async def _finish_interrupted(self) -> None:
        """Jobs announced before this process started and never finished: cancel them.

        Only an engine that kept them (the durable one) has any; they died
        with the previous process, so say so instead of leaving them frozen.
        """
        try:
            hist = await self.node.read_history(None, f"user:{self.user}", None, 100)
        except ProtocolError:
            return
        announced = [p.data for p in hist.publications
                     if p.event == "job" and isinstance(p.data, dict) and p.data.get("jobId")]
        for data in announced:
            job_id = str(data["jobId"])
            channel = f"job:{job_id}"
            try:
                state = (await self.node.read_state(None, channel)).state
            except ProtocolError:
                continue
            self.recent.append(job_id)
            if not state or any(event in state for event in TERMINAL):
                continue
            last = state.get("progress") or {}
            self.counts["cancelled"] += 1
            await self._publish(channel, "cancelled", {
                "jobId": job_id, "title": data.get("title"), "status": "cancelled",
                "progress": last.get("progress", 0), "stage": last.get("stage"),
                "message": "Stopped: the gateway restarted while this simulated job ran",
            }, self.user)

    def _eta(self, remaining_steps: float) -> float:
        return round(remaining_steps * self._step_s, 1)

    async def _queue_updates(self) -> None:
        """Every waiting job's position (1 = next to start) and a rough ETA."""
        for position, job_id in enumerate(self._waiting, 1):
            await self._publish(f"job:{job_id}", "progress", {
                "jobId": job_id, "status": "queued", "progress": 0, "stage": "queued",
                "message": f"Waiting for a worker ({position} in line)",
                "queue_position": position, "eta": self._eta(12 * (1 + position)),
            }, self.user)

    async def _publish(self, channel: str, event: str, data: Any, owner: str | None) -> None:
        try:
            await self.node.publish(PublishRequest(channel, event, data, owner))
        except ProtocolError as exc:  # e.g. the engine is briefly unavailable
            log.warning("demo publish to %s failed: %s", channel, exc.message)

    async def _job(self) -> None:
        recipe = self.rng.choice(RECIPES)
        job_id = f"demo-{next(self._numbers)}-{secrets.token_hex(2)}"
        channel = f"job:{job_id}"
        base = {"jobId": job_id, "title": recipe.title}
        await self.node.register_job(channel, self.user)
        self.recent.append(job_id)
        self._waiting.append(job_id)
        # Tell the user's page there is a new job to watch, then where it stands in line.
        await self._publish(
            f"user:{self.user}", "job", {**base, "kind": "job", "status": "queued"}, None
        )
        await self._queue_updates()
        try:
            async with self._slots:
                self._waiting.remove(job_id)
                await self._queue_updates()
                self._running += 1
                try:
                    status = await self._work(recipe, channel, base)
                finally:
                    self._running -= 1
                self.counts[status] += 1
        finally:
            if job_id in self._waiting:
                self._waiting.remove(job_id)

    async def _work(self, recipe: Recipe, channel: str, base: dict[str, Any]) -> str:
        fail_at = None
        if self.rng.random() < self.fail_rate:
            fail_at = self.rng.choice(recipe.failures)
        plan = [(stage, max(2, int(stage.weight * self.rng.uniform(2.5, 4.0))))
                for stage in recipe.stages]
        left = sum(steps for _, steps in plan)
        total = sum(s.weight for s in recipe.stages)
        done = 0.0
        for stage, steps in plan:
            for step in range(1, steps + 1):
                await asyncio.sleep(self.rng.uniform(0.4, 1.1) / self.speed)
                left -= 1
                fraction = step / steps
                progress = int(100 * (done + stage.weight * fraction) / total)
                if fail_at and fail_at[0] == stage.name and fraction >= 0.5:
                    await self._publish(
                        channel, "failed",
                        {**base, "status": "failed", "progress": progress,
                         "stage": stage.name, "message": fail_at[1]}, self.user,
                    )
                    return "failed"
                await self._publish(
                    channel, "progress",
                    {**base, "status": "processing", "progress": min(progress, 99),
                     "stage": stage.name, "message": stage.message(fraction, self.rng),
                     "eta": self._eta(left)},
                    self.user,
                )
            done += stage.weight
        await self._publish(
            channel, "completed",
            {**base, "status": "completed", "progress": 100, "stage": "done",
             "message": f"{recipe.title} finished"}, self.user,
        )
        return "completed"


_workers: weakref.WeakKeyDictionary[Node, DemoWorker] = weakref.WeakKeyDictionary()


def demo_enabled(node: Node) -> bool:
    """The demo page and its token: development only, and only if not switched off."""
    settings = node.settings
    return settings.demo and not settings.production and bool(settings.jwt_secret)


def worker_for(node: Node) -> DemoWorker | None:
    """The node's demo worker, started if needed; None unless the engine is embedded
    (memory or durable: with Redis, other processes are the publishers)."""
    if not demo_enabled(node) or not isinstance(node.broker, MemoryBroker):
        return None
    worker = _workers.get(node)
    if worker is None:
        worker = _workers[node] = DemoWorker(node)
    worker.ensure_running()
    return worker


async def stop_worker(node: Node) -> None:
    """Stop the node's demo worker, if it has one (tests, embedding applications)."""
    worker = _workers.pop(node, None)
    if worker is not None:
        await worker.stop()
