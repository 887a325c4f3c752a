"""Reading the gateways' node registry and sending control commands, over Redis.

The layout is the gateway's (`gateway.broker.redis_scripts.Keys`): every
gateway writes `{prefix}node:{id}` (JSON, short TTL) and its heartbeat time
in the `{prefix}nodes` sorted set. Only entries refreshed within
`STALE_AFTER` seconds count: a gateway that stopped writing is gone, and the
policy treats an empty answer as "no data", never as "no load".
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.broker.redis import connect
from gateway.broker.redis_scripts import Keys

log = logging.getLogger("herald.operator.registry")

STALE_AFTER = 10.0


class RegistryUnavailable(Exception):
    """Redis could not be read; the caller holds its replicas."""


@dataclass(frozen=True)
class NodeStats:
    node: str
    pod: str
    connections: int
    subscriptions: int
    msgs_in_per_s: float
    msgs_out_per_s: float
    draining: bool
    ready: bool
    updated: float

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> NodeStats:
        def number(key: str) -> float:
            value = float(raw.get(key) or 0)
            return value if math.isfinite(value) and value >= 0 else 0.0

        return cls(
            node=str(raw["node"]),
            pod=str(raw.get("pod") or ""),
            connections=int(number("connections")),
            subscriptions=int(number("subscriptions")),
            msgs_in_per_s=number("msgs_in_per_s"),
            msgs_out_per_s=number("msgs_out_per_s"),
            draining=bool(raw.get("draining", False)),
            ready=bool(raw.get("ready", True)),
            updated=number("updated"),
        )

    @property
    def name(self) -> str:
        """The pod this node runs in (node ids are pod names in the operator's Deployments)."""
        return self.pod or self.node


class Registry:
    """One Redis client per (url, prefix); cheap to keep for the operator's life."""

    def __init__(self, url: str, prefix: str) -> None:
        self.keys = Keys(prefix)
        self.client: aioredis.Redis = connect(url)

    async def nodes(self, now: float | None = None) -> list[NodeStats]:
        now = time.time() if now is None else now
        try:
            ids = await self.client.zrangebyscore(self.keys.nodes, now - STALE_AFTER, "+inf")
            keys = [self.keys.node(i.decode()) for i in ids]
            values = await self.client.mget(keys) if keys else []
        except (RedisError, OSError) as exc:
            raise RegistryUnavailable(f"{type(exc).__name__}: {exc}") from None
        nodes = []
        for value in values:
            if value is None:
                continue  # expired between the two reads: gone
            try:
                stats = NodeStats.parse(orjson.loads(value))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed registry entry")
                continue
            if stats.updated >= now - STALE_AFTER:
                nodes.append(stats)
        return nodes

    async def shed(self, node: str, count: int) -> None:
        await self._control(node, {"cmd": "shed", "count": int(count)})

    async def _control(self, node: str, command: dict[str, Any]) -> None:
        try:
            await self.client.publish(self.keys.control(node), orjson.dumps(command))
        except (RedisError, OSError) as exc:
            raise RegistryUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        await self.client.aclose()


class RegistryPool:
    """Registries by (url, prefix), so many RealtimeGateways share clients."""

    def __init__(self) -> None:
        self._registries: dict[tuple[str, str], Registry] = {}

    def get(self, url: str, prefix: str) -> Registry:
        key = (url, prefix)
        if key not in self._registries:
            self._registries[key] = Registry(url, prefix)
        return self._registries[key]

    async def close(self) -> None:
        for registry in self._registries.values():
            await registry.close()
        self._registries.clear()
