"""The engine interface every broker implements, and the data it moves.

A broker owns what must be shared between gateways: offsets, history, state
snapshots, job owners, and the fan-in of publications. It knows nothing of
connections; the hub does the local fan-out. Two engines implement it:
`memory` (one process) and `redis` (a cluster of gateways).
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import wire
from gateway.channels import Namespace

TERMINAL_JOB_EVENTS = frozenset({"completed", "failed", "cancelled"})


def new_epoch() -> str:
    return secrets.token_urlsafe(6)


@dataclass(slots=True, eq=False)
class Publication:
    """One message in one channel, with its place (epoch, offset) in the history."""

    channel: str
    event: str
    data: Any
    epoch: str
    offset: int
    time: float
    meta: dict[str, str] = field(default_factory=dict)
    _json: bytes | None = None
    _ws: bytes | None = None

    def message(self) -> dict[str, Any]:
        return {
            "type": "message",
            "channel": self.channel,
            "event": self.event,
            "epoch": self.epoch,
            "offset": self.offset,
            "data": self.data,
            "timestamp": wire.now_iso(self.time),
        }

    @property
    def json(self) -> bytes:
        """The client frame's JSON, built once however many receive it."""
        if self._json is None:
            self._json = wire.encode(self.message())
        return self._json

    @property
    def ws_frame(self) -> bytes:
        """The whole WebSocket text frame (header + payload), built once per node."""
        if self._ws is None:
            self._ws = wire.ws_text_frame(self.json)
        return self._ws

    def to_record(self) -> dict[str, Any]:
        """Storage form, shared by the engines' history and pub/sub payloads."""
        return {
            "c": self.channel,
            "e": self.event,
            "d": self.data,
            "p": self.epoch,
            "o": self.offset,
            "t": self.time,
            "m": self.meta,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Publication:
        return cls(rec["c"], rec["e"], rec["d"], rec["p"], rec["o"], rec["t"], rec.get("m") or {})


@dataclass(slots=True)
class Position:
    """Where a channel's stream stands: a client resumes from one of these."""

    epoch: str
    offset: int


@dataclass(slots=True)
class History:
    """Publications after a position, and whether they close the gap completely."""

    epoch: str
    offset: int
    publications: list[Publication]
    complete: bool


@dataclass(slots=True)
class Snapshot:
    epoch: str
    offset: int
    state: dict[str, Any]


class Broker(abc.ABC):
    """Shared state and fan-in. Every method may raise `BrokerUnavailable`."""

    def __init__(self) -> None:
        self._on_publication: Callable[[Publication], None] = lambda pub: None

    def set_handler(self, handler: Callable[[Publication], None]) -> None:
        """Where publications of subscribed channels go (the node's hub)."""
        self._on_publication = handler

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; engines without a connection have nothing to do."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect and release resources."""

    @property
    def ready(self) -> bool:
        return True

    @abc.abstractmethod
    async def publish(
        self,
        namespace: Namespace,
        channel: str,
        event: str,
        data: Any,
        *,
        owner: str | None = None,
        meta: dict[str, str] | None = None,
    ) -> Publication:
        """Append atomically: next offset, history, state, owner check, fan-in.

        Raises `ProtocolError("forbidden")` when `owner` differs from the
        recorded owner of a job channel.
        """

    @abc.abstractmethod
    async def subscribe(self, channels: list[str]) -> None:
        """Start receiving publications of these channels (first local subscriber)."""

    @abc.abstractmethod
    async def unsubscribe(self, channels: list[str]) -> None:
        """Stop receiving them (last local subscriber gone)."""

    @abc.abstractmethod
    async def history(
        self, namespace: Namespace, channel: str, since: int | None, limit: int
    ) -> History:
        """Publications with offset > `since` (all kept ones when None), oldest first.

        `complete` is True when nothing between `since` and the current offset
        is missing from the result (history reached back and `limit` did not cut).
        """

    @abc.abstractmethod
    async def snapshot(self, namespace: Namespace, channel: str) -> Snapshot:
        """The channel's position and, for state namespaces, the latest data per event."""

    @abc.abstractmethod
    async def owner(self, channel: str) -> str | None:
        """The recorded owner of a job channel, or None."""

    @abc.abstractmethod
    async def register_owner(self, channel: str, owner: str) -> None:
        """Record an owner; `forbidden` if another one is recorded already."""


class BrokerUnavailable(Exception):
    """The engine cannot answer now (Redis down); clients get `unavailable`."""
