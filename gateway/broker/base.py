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

from gateway.protocol import wire
from gateway.protocol.channels import UNCONFIGURED, Namespace

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
    _sse: bytes | None = None

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

    @property
    def sse_frame(self) -> bytes:
        """The whole SSE event (id and data), built once per node like `ws_frame`."""
        if self._sse is None:
            eid = wire.sse_event_id(self.channel, self.epoch, self.offset)
            self._sse = wire.sse_frame(self.json, eid)
        return self._sse

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
        self._on_reset: Callable[[str, Snapshot], None] = lambda channel, snap: None
        self._namespace_of: Callable[[str], Namespace] = lambda channel: UNCONFIGURED
        # Publications received by fan-in (from Redis, or locally): the proof
        # that a node only receives what its own clients watch.
        self.messages_in = 0
        self.reconnects = 0

    def set_handlers(
        self,
        on_publication: Callable[[Publication], None],
        on_reset: Callable[[str, Snapshot], None],
        namespace_of: Callable[[str], Namespace],
    ) -> None:
        """Wire the engine to its node.

        `on_publication` gets every publication of a subscribed channel, in
        offset order; `on_reset` is told when a subscribed channel's history
        was lost (new epoch) so its subscribers can refetch state;
        `namespace_of` gives the history bounds of a channel the engine
        re-reads on its own (after a reconnect).
        """
        self._on_publication = on_publication
        self._on_reset = on_reset
        self._namespace_of = namespace_of

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; engines without a connection have nothing to do."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect and release resources."""

    @property
    def ready(self) -> bool:
        return True

    async def ping(self) -> None:  # noqa: B027 - engines with a server override it
        """One round trip to the engine's server (measured by the registry loop)."""

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

    # -- the node registry and control channel ---------------------------------

    @abc.abstractmethod
    async def write_node(self, node_id: str, stats: dict[str, Any], ttl: float) -> None:
        """Publish this node's figures for the operator and `/api/v1/cluster`."""

    @abc.abstractmethod
    async def remove_node(self, node_id: str) -> None:
        """Leave the registry at once (clean shutdown), instead of waiting for the TTL."""

    @abc.abstractmethod
    async def read_nodes(self) -> list[dict[str, Any]]:
        """Every live node's last figures."""

    @abc.abstractmethod
    def add_control(self, node_id: str, handler: Callable[[dict[str, Any]], None]) -> None:
        """Deliver commands sent to `node_id` (shed, drain) to `handler`."""

    @abc.abstractmethod
    async def send_control(self, node_id: str, command: dict[str, Any]) -> None:
        """Send a command to a node (the operator's side of the control channel)."""


class BrokerUnavailable(Exception):
    """The engine cannot answer now (Redis down); clients get `unavailable`."""
