"""Reading the gateways' node registry and sending them control commands.

Everything here is the gateway↔operator contract of `gateway.cluster` —
key names, the record format, the staleness window, the command encoding —
used as is, so the operator and the gateways cannot disagree, and the
operator never imports the gateway's engines. An empty answer means "no
data", never "no load": the policy holds its replicas on it.
"""

from __future__ import annotations

from gateway.cluster.control import Shed
from gateway.cluster.record import NodeRecord
from gateway.cluster.redis import RedisDirectory
from gateway.protocol.errors import BrokerUnavailable

__all__ = ["NodeStats", "Registry", "RegistryPool", "RegistryUnavailable"]

# What the scaler reads of each gateway: the cluster's node record.
NodeStats = NodeRecord


class RegistryUnavailable(Exception):
    """Redis could not be read; the caller holds its replicas."""


class Registry:
    """One Redis client per (url, prefix); cheap to keep for the operator's life."""

    def __init__(self, url: str, prefix: str) -> None:
        self.directory = RedisDirectory(url, prefix=prefix)

    async def nodes(self, now: float | None = None) -> list[NodeRecord]:
        try:
            return await self.directory.read(now)
        except BrokerUnavailable as exc:
            raise RegistryUnavailable(str(exc)) from None

    async def shed(self, node: str, count: int) -> None:
        try:
            await self.directory.send(node, Shed(int(count)))
        except BrokerUnavailable as exc:
            raise RegistryUnavailable(str(exc)) from None

    async def close(self) -> None:
        await self.directory.close()


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
