"""This node's entry in the cluster registry, written every `record.INTERVAL` seconds.

The entry (gateway.cluster.record) carries connection counts, message
rates and the draining flag; it expires after `record.TTL`, so a gateway
that dies simply drops out. The operator scales on these figures and
`GET /api/v1/cluster` shows them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from gateway.broker.base import Broker
from gateway.cluster.directory import Directory
from gateway.cluster.record import INTERVAL, TTL, NodeRecord
from gateway.protocol.errors import BrokerUnavailable
from gateway.telemetry.metrics import Metrics

log = logging.getLogger("herald.registry")


class RegistryWriter:
    def __init__(
        self,
        node_id: str,
        directory: Directory,
        broker: Broker,
        metrics: Metrics,
        stats: Callable[[], dict[str, Any]],
        interval: float = INTERVAL,
        ttl: float = TTL,
    ) -> None:
        self.node_id = node_id
        self.directory = directory
        self.broker = broker
        self.metrics = metrics
        self.stats = stats
        self.interval = interval
        self.ttl = ttl
        self._last: tuple[float, int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def record(self) -> NodeRecord:
        """This node's registry entry, with rates over the last interval."""
        stats = self.stats()
        now = time.monotonic()
        counts = (stats["messages_in"], stats["messages_out"], stats["broker_messages_in"])
        rates = [0.0, 0.0, 0.0]
        if self._last is not None:
            elapsed = max(now - self._last[0], 1e-6)
            rates = [(c - p) / elapsed for c, p in zip(counts, self._last[1:], strict=True)]
        self._last = (now, *counts)
        return NodeRecord(
            node=self.node_id,
            pod=os.environ.get("POD_NAME", ""),
            ip=os.environ.get("POD_IP", ""),
            connections=stats["connections"],
            subscriptions=stats["subscriptions"],
            channels=stats["channels"],
            msgs_in_per_s=round(rates[0], 2),
            msgs_out_per_s=round(rates[1], 2),
            broker_msgs_in_per_s=round(rates[2], 2),
            draining=stats["draining"],
            ready=stats["ready"],
            updated=time.time(),
        )

    async def write_once(self) -> None:
        started = time.perf_counter()
        await self.broker.ping()
        self.metrics.broker_roundtrip.observe(time.perf_counter() - started)
        await self.directory.write(self.record(), self.ttl)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="herald-registry")

    async def _run(self) -> None:
        while True:
            try:
                await self.write_once()
            except BrokerUnavailable as exc:
                log.debug("registry write skipped: %s", exc)
            except Exception:
                log.exception("registry write failed")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        """Leave the registry at once so the operator stops counting this node."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            await self.directory.remove(self.node_id)
        except BrokerUnavailable:
            pass
