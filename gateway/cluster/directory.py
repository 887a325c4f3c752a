"""The node registry and the control channel: one small interface, two implementations.

Kept apart from the engine contract (gateway.broker) because its users are
not the same: the registry writer and `/api/v1/cluster` on the gateway side,
the operator on the other, which must not import engines. `MemoryDirectory`
serves a single process; `RedisDirectory` (gateway.cluster.redis) a fleet.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable

from gateway.cluster.control import Command
from gateway.cluster.record import TTL, NodeRecord

ControlHandler = Callable[[Command], None]


class Directory(abc.ABC):
    """Every method may raise `BrokerUnavailable` (the shared store cannot answer)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; in-process directories have nothing to do."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop listening and disconnect."""

    @abc.abstractmethod
    async def write(self, record: NodeRecord, ttl: float = TTL) -> None:
        """Publish this node's record; it counts for `ttl` seconds unless written again."""

    @abc.abstractmethod
    async def remove(self, node_id: str) -> None:
        """Leave at once (clean shutdown) instead of waiting for the TTL."""

    @abc.abstractmethod
    async def read(self, now: float | None = None) -> list[NodeRecord]:
        """Every node whose record is fresh (`NodeRecord.fresh`), in no particular order."""

    @abc.abstractmethod
    async def send(self, node_id: str, command: Command) -> None:
        """Deliver a command to a node's control channel (none listening: dropped)."""

    @abc.abstractmethod
    def listen(self, node_id: str, handler: ControlHandler) -> None:
        """Hand every command sent to `node_id` to `handler` from now on."""


class MemoryDirectory(Directory):
    """One process's registry: itself, and whoever shares this object in tests."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._records: dict[str, tuple[NodeRecord, float]] = {}
        self._handlers: dict[str, ControlHandler] = {}

    async def write(self, record: NodeRecord, ttl: float = TTL) -> None:
        self._records[record.node] = (record, self._clock() + ttl)

    async def remove(self, node_id: str) -> None:
        self._records.pop(node_id, None)

    async def read(self, now: float | None = None) -> list[NodeRecord]:
        now = self._clock() if now is None else now
        return [r for r, expires in self._records.values() if expires > now and r.fresh(now)]

    async def send(self, node_id: str, command: Command) -> None:
        handler = self._handlers.get(node_id)
        if handler is not None:
            handler(command)

    def listen(self, node_id: str, handler: ControlHandler) -> None:
        self._handlers[node_id] = handler


def create_directory(redis_url: str | None, prefix: str = "herald:") -> Directory:
    """The Redis directory when the fleet shares a Redis, else this process's own."""
    if redis_url:
        from gateway.cluster.redis import RedisDirectory

        return RedisDirectory(redis_url, prefix=prefix)
    return MemoryDirectory()
