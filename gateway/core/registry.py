"""The node registry: each gateway's live figures, shared through the engine.

Every `INTERVAL` seconds a gateway writes its connection count, message
rates and draining flag under a key that expires after `TTL`; a gateway that
dies simply drops out. The operator scales on these figures, and
`GET /api/v1/cluster` shows them. The record's fields are a contract with
the operator (docs/operations.md lists them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from gateway.broker.base import BrokerUnavailable

if TYPE_CHECKING:
    from gateway.core.node import Node

log = logging.getLogger("herald.registry")

INTERVAL = 2.0
TTL = 10.0


class RegistryWriter:
    def __init__(self, node: Node, interval: float = INTERVAL, ttl: float = TTL) -> None:
        self.node = node
        self.interval = interval
        self.ttl = ttl
        self._last: tuple[float, int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def record(self) -> dict[str, Any]:
        """This node's registry entry, with rates over the last interval."""
        node = self.node
        stats = node.stats()
        now = time.monotonic()
        counts = (stats["messages_in"], stats["messages_out"], stats["broker_messages_in"])
        rates = [0.0, 0.0, 0.0]
        if self._last is not None:
            elapsed = max(now - self._last[0], 1e-6)
            rates = [(c - p) / elapsed for c, p in zip(counts, self._last[1:], strict=True)]
        self._last = (now, *counts)
        return {
            "node": node.id,
            "pod": os.environ.get("POD_NAME", ""),
            "ip": os.environ.get("POD_IP", ""),
            "connections": stats["connections"],
            "subscriptions": stats["subscriptions"],
            "channels": stats["channels"],
            "msgs_in_per_s": round(rates[0], 2),
            "msgs_out_per_s": round(rates[1], 2),
            "broker_msgs_in_per_s": round(rates[2], 2),
            "draining": node.draining,
            "ready": node.ready,
            "updated": time.time(),
        }

    async def write_once(self) -> None:
        broker = self.node.broker
        started = time.perf_counter()
        await broker.ping()
        self.node.metrics.broker_roundtrip.observe(time.perf_counter() - started)
        await broker.write_node(self.node.id, self.record(), self.ttl)

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
            await self.node.broker.remove_node(self.node.id)
        except BrokerUnavailable:
            pass
