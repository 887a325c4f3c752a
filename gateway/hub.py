"""Local fan-out: which connections of this node watch which channel.

The hub holds the broker subscription of a channel exactly while it has a
local subscriber (reference counted by the set of subscribers), and hands
each publication to them. A subscriber that is still recovering buffers
live publications, so the node can replay history first and then go live
with no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from gateway.broker.base import Broker, Position, Publication


class Subscriber(Protocol):
    """A connection that can receive publications (WebSocket, SSE)."""

    def deliver(self, pub: Publication) -> None: ...

    def advance(self, channel: str, position: Position) -> None: ...

    def send_json(self, message: dict[str, Any]) -> None: ...


class Hub:
    def __init__(self, broker: Broker, recovery_buffer: int = 10000) -> None:
        self._broker = broker
        self._recovery_buffer = recovery_buffer
        # channel -> subscriber -> None when live, else the publications
        # that arrived while it recovers. Insertion order = subscribe order.
        self._channels: dict[str, dict[Subscriber, list[Publication] | None]] = {}
        # channel -> the broker subscription in flight; later subscribers wait on it.
        self._pending: dict[str, asyncio.Future[None]] = {}
        # (subscriber, channel) whose recovery buffer hit its bound.
        self._overflowed: set[tuple[Subscriber, str]] = set()
        self.subscription_count = 0

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def channels(self) -> list[str]:
        return list(self._channels)

    def subscribers(self, channel: str) -> int:
        return len(self._channels.get(channel, ()))

    def subscribers_of(self, channel: str) -> list[Subscriber]:
        return list(self._channels.get(channel, ()))

    async def add(self, sub: Subscriber, channel: str) -> None:
        """Register `sub` in recovering state; returns once the broker feeds the channel."""
        subs = self._channels.get(channel)
        if subs is None:
            subs = self._channels[channel] = {}
            subs[sub] = []
            self.subscription_count += 1
            ready = self._pending[channel] = asyncio.get_running_loop().create_future()
            try:
                await self._broker.subscribe([channel])
                ready.set_result(None)
            except BaseException as exc:
                ready.set_exception(exc)
                ready.exception()  # retrieved: waiters re-raise it themselves
                self._discard(sub, channel)
                raise
            finally:
                self._pending.pop(channel, None)
            return
        if sub not in subs:
            self.subscription_count += 1
        subs[sub] = []  # a live one re-subscribing recovers again
        pending = self._pending.get(channel)
        if pending is not None:
            try:
                await asyncio.shield(pending)
            except BaseException:
                self._discard(sub, channel)
                raise

    def go_live(self, sub: Subscriber, channel: str, after: int) -> bool:
        """End recovery: deliver what was buffered past offset `after`, then stream live.

        False when the buffer overflowed during recovery: the caller must
        close the connection (4008) so the client recovers again, since
        handing it a stream with a hole would be losing messages silently.
        """
        subs = self._channels.get(channel)
        if subs is None or sub not in subs:
            return True
        buffered = subs[sub]
        subs[sub] = None
        if (sub, channel) in self._overflowed:
            self._overflowed.discard((sub, channel))
            return False
        for pub in buffered or ():
            if pub.offset > after:
                sub.deliver(pub)
        return True

    async def remove(self, sub: Subscriber, channel: str) -> None:
        if self._discard(sub, channel):
            await self._broker.unsubscribe([channel])

    def _discard(self, sub: Subscriber, channel: str) -> bool:
        """Forget one subscription; True when the channel has no subscriber left."""
        subs = self._channels.get(channel)
        if subs is None or sub not in subs:
            return False
        del subs[sub]
        self._overflowed.discard((sub, channel))
        self.subscription_count -= 1
        if subs:
            return False
        del self._channels[channel]
        return True

    def dispatch(self, pub: Publication) -> int:
        """Hand one publication to every local subscriber; returns how many were live."""
        subs = self._channels.get(pub.channel)
        if not subs:
            return 0
        live = 0
        for sub, buffered in list(subs.items()):
            if buffered is None:
                sub.deliver(pub)
                live += 1
            elif len(buffered) < self._recovery_buffer:
                buffered.append(pub)
            else:
                self._overflowed.add((sub, pub.channel))
        return live
