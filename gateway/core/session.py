"""What every client connection has, whatever its transport (WebSocket, SSE).

A session is what the hub fans out to: it knows who the client is, what it
watches, and the last offset it was sent per channel, so a re-subscribe
with `since` on the same connection never repeats a message.
"""

from __future__ import annotations

import abc
import time
from typing import Any, ClassVar

from gateway.core.outbox import Outbox
from gateway.protocol.errors import CloseCode
from gateway.protocol.publication import Position, Publication
from gateway.security.auth import Claims


class Session(abc.ABC):
    transport: ClassVar[str]
    # One per connection, idle for hours: no per-instance __dict__.
    __slots__ = (
        "_live_from",
        "_sent",
        "address",
        "claims",
        "connected_at",
        "granted",
        "id",
        "last_active",
        "subscriptions",
    )

    def __init__(self, client_id: str, claims: Claims) -> None:
        self.id = client_id
        self.claims = claims
        # What a connect hook granted (core.backend.Grant); most connections have none.
        self.granted: Any = None
        self.subscriptions: set[str] = set()
        # Per channel, how far this connection was written before it last
        # went live (replay end) or stopped (a re-subscribe), and where live
        # delivery began: the range a re-subscribe's replay must not repeat.
        self._sent: dict[str, Position] = {}
        self._live_from: dict[str, Position] = {}
        # The client's address (after trusted proxies), for audit events.
        self.address = ""
        self.last_active = time.monotonic()
        self.connected_at = time.time()  # presence's `since`

    def touch(self) -> None:
        """The client sent something; shedding prefers the least recently active."""
        self.last_active = time.monotonic()

    def advance(self, channel: str, position: Position) -> None:
        """The client now holds everything up to `position` (replay or state)."""
        self._sent[channel] = position
        self._live_from[channel] = position

    def forget(self, channel: str) -> None:
        """Unsubscribed: what was sent no longer counts (a later `since` is honoured in
        full), and the memory goes with it, however many channels a client cycles through."""
        self._sent.pop(channel, None)
        self._live_from.pop(channel, None)

    def already_sent(self, pub: Publication) -> bool:
        """Written on this connection since its (re)subscription went live."""
        start = self._live_from.get(pub.channel)
        last = self._sent.get(pub.channel)
        return (
            start is not None
            and last is not None
            and start.epoch == pub.epoch == last.epoch
            and start.offset < pub.offset <= last.offset
        )

    def reached(self, channel: str, position: Position) -> None:
        """It was written live up to `position` and recovers again (a re-subscribe):
        its replay skips that range (`already_sent`). The hub tells it, so the
        fan-out never records anything per delivery."""
        last = self._sent.get(channel)
        if last is None or last.epoch != position.epoch or last.offset < position.offset:
            self._sent[channel] = position

    @abc.abstractmethod
    def push(self, pub: Publication) -> bool:
        """Write `pub` on the transport; False if it was not (connection gone).

        The hub's hot path, once per delivery, so no awaiting and no
        bookkeeping here: the hub has already dropped overlaps and what a
        replay covered.
        """

    @abc.abstractmethod
    def send_json(self, message: dict[str, Any]) -> None:
        """Send one control message (subscribed, error, pong...)."""

    def send_subscribed(self, reply: dict[str, Any], start: Position) -> None:
        """Send a subscribe's `subscribed` reply; `start` is where the client
        stands once it has the reply and none of the replay that follows."""
        self.send_json(reply)

    @abc.abstractmethod
    def close(self, code: int, reason: str) -> None:
        """Close the connection with a protocol close code."""

    @property
    def outbox(self) -> Outbox | None:
        """The connection's bounded outgoing path (None before it is set up)."""
        return None

    @property
    def pending_bytes(self) -> int:
        """Bytes queued for this client and not yet on the wire."""
        outbox = self.outbox
        return outbox.pending_bytes if outbox is not None else 0

    async def writable(self) -> None:
        """Return once the transport can take more without growing its buffer."""
        outbox = self.outbox
        if outbox is not None:
            await outbox.writable()

    def overflowed(self) -> None:
        """Too much arrived while it recovered: close so it recovers by offset."""
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
