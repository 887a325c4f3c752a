"""Local fan-out: which connections of this node watch which channel.

The hub holds the broker subscription of a channel exactly while it has a
local subscriber (reference counted by the set of subscribers), and hands
each publication to them. A subscriber that is still recovering buffers
live publications, so the node can replay history first and then go live
with no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.broker.base import Broker
from gateway.protocol.errors import BrokerUnavailable
from gateway.protocol.publication import Position, Publication

Push = Callable[[Publication], object]


class Subscriber(Protocol):
    """A connection that can receive publications (WebSocket, SSE)."""

    def push(self, pub: Publication) -> object:
        """Write one publication to the transport (the fan-out's only per-delivery call)."""
        ...

    def advance(self, channel: str, position: Position) -> None:
        """The client holds everything up to `position`; live delivery starts there."""
        ...

    def reached(self, channel: str, position: Position) -> None:
        """It was streamed live up to `position` and now stops (it recovers again)."""
        ...

    def send_json(self, message: dict[str, Any]) -> None: ...


@dataclass(slots=True, eq=False)
class _Channel:
    """One channel's local subscribers: streaming live, or still recovering."""

    channel: str
    # Live subscribers and how to write to each: the fan-out loop calls these
    # and nothing else. Insertion-ordered: subscribe order is delivery order.
    live: dict[Subscriber, Push] = field(default_factory=dict)
    # Recovering subscribers and the live publications that arrived meanwhile,
    # and those whose buffer hit its bound. Both are None while empty, which
    # is nearly always: a channel of one idle subscriber keeps only `live`.
    recovering: dict[Subscriber, list[Publication]] | None = None
    overflowed: set[Subscriber] | None = None
    # The last position this node dispatched (or, before any publication, read):
    # what an overlap is dropped against, and where a resync starts from.
    position: Position | Publication | None = None

    def __contains__(self, sub: Subscriber) -> bool:
        return sub in self.live or (self.recovering is not None and sub in self.recovering)

    def __len__(self) -> int:
        return len(self.live) + len(self.recovering or ())

    def subscribers(self) -> list[Subscriber]:
        return [*self.live, *(self.recovering or ())]

    def start_recovering(self, sub: Subscriber) -> None:
        if self.recovering is None:
            self.recovering = {}
        self.recovering[sub] = []
        self.clear_overflow(sub)

    def stop_recovering(self, sub: Subscriber) -> list[Publication] | None:
        """What was buffered for `sub` (None: it was not recovering)."""
        if self.recovering is None:
            return None
        buffered = self.recovering.pop(sub, None)
        if not self.recovering:
            self.recovering = None
        return buffered

    def clear_overflow(self, sub: Subscriber) -> bool:
        """Whether `sub` had overflowed its recovery buffer (and no longer counts as such)."""
        if self.overflowed is None or sub not in self.overflowed:
            return False
        self.overflowed.discard(sub)
        if not self.overflowed:
            self.overflowed = None
        return True


class Hub:
    def __init__(self, broker: Broker, recovery_buffer: int = 10000) -> None:
        self._broker = broker
        self._recovery_buffer = recovery_buffer
        self._channels: dict[str, _Channel] = {}
        # channel -> the broker subscription in flight; later subscribers wait on it.
        self._pending: dict[str, asyncio.Future[None]] = {}
        self.subscription_count = 0

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def position(self, channel: str) -> Position | Publication | None:
        """Where this node stands in a held channel (None: not held, or nothing known yet)."""
        ch = self._channels.get(channel)
        return ch.position if ch is not None else None

    def note(self, channel: str, position: Position, *, reset: bool = False) -> None:
        """A position read for a held channel: where it stands until a publication moves it.

        Only the first read counts (a later one may be ahead of publications
        still in flight), unless `reset` says the history was lost: then
        every live subscriber is re-based to `position` (the caller tells
        each client so) and must get all that follows it, so a skip left by
        a replay that already read into the new epoch is dropped too.
        """
        ch = self._channels.get(channel)
        if ch is None:
            return
        if reset:
            ch.position = position
            for sub in ch.live:
                ch.live[sub] = sub.push
        elif ch.position is None:
            ch.position = position

    def counts(self) -> dict[str, int]:
        """Local subscribers per held channel (the server API's channel listing)."""
        return {name: len(ch) for name, ch in self._channels.items()}

    def subscribers_of(self, channel: str) -> list[Subscriber]:
        ch = self._channels.get(channel)
        return ch.subscribers() if ch is not None else []

    def _recover(self, ch: _Channel, sub: Subscriber) -> None:
        """Put `sub` in recovering state (a live one re-subscribing recovers again)."""
        if sub not in ch:
            self.subscription_count += 1
        if ch.live.pop(sub, None) is not None and ch.position is not None:
            # What it was written live ends here: its replay must not repeat it.
            sub.reached(ch.channel, Position(ch.position.epoch, ch.position.offset))
        ch.start_recovering(sub)

    async def add(self, sub: Subscriber, channel: str) -> None:
        """Register `sub` in recovering state; returns once the broker feeds the channel."""
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._channels[channel] = _Channel(channel)
            self._recover(ch, sub)
            ready = self._pending[channel] = asyncio.get_running_loop().create_future()
            try:
                await self._broker.subscribe([channel])
                ready.set_result(None)
            except BaseException as exc:
                ready.set_exception(exc)
                ready.exception()  # retrieved: waiters re-raise it themselves
                if self._abandon(ch, channel):
                    await self._release(channel)
                raise
            finally:
                if self._pending.get(channel) is ready:
                    del self._pending[channel]
            return
        self._recover(ch, sub)
        pending = self._pending.get(channel)
        if pending is not None:
            try:
                await asyncio.shield(pending)
            except BaseException:
                self._discard(sub, channel)
                raise

    def _abandon(self, ch: _Channel, channel: str) -> bool:
        """A first subscribe failed: the channel is not fed, so nobody in it stays.

        Whoever joined while it was pending fails with it (they re-raise the
        same error); none may stay behind believing the channel live, and a
        later subscribe starts over. True if the broker subscription, still
        the hub's, must be released; False when the subscribers had all left
        already (their removal released it) and a retry may hold it anew.
        """
        if self._channels.get(channel) is not ch:
            return False
        self.subscription_count -= len(ch)
        del self._channels[channel]
        return True

    async def _release(self, channel: str) -> None:
        """Drop the broker subscription of a failed first subscribe (best effort).

        A confirmation that arrives late must not leave it held for nobody;
        and a retry that comes meanwhile is the engine's to get right (it
        subscribes again after this release, see broker/subscriptions.py).
        """
        try:
            await self._broker.unsubscribe([channel])
        except BrokerUnavailable:
            pass

    def go_live(self, sub: Subscriber, channel: str, after: Position) -> bool:
        """End recovery: deliver what was buffered past `after`, then stream live.

        `after` is where the subscriber's replay (or state) left it. False
        when the buffer overflowed during recovery: the caller must close the
        connection (4008) so the client recovers again, since handing it a
        stream with a hole would be losing messages silently.
        """
        ch = self._channels.get(channel)
        buffered = ch.stop_recovering(sub) if ch is not None else None
        if ch is None or buffered is None:
            return True
        last = ch.position
        if last is None or last.epoch != after.epoch or last.offset < after.offset:
            # The replay may have read past what this node has dispatched:
            # those publications are still in flight from the engine and are
            # skipped once, for this subscriber only.
            ch.live[sub] = _skip_until(ch, sub, after)
        else:
            ch.live[sub] = sub.push
        if ch.clear_overflow(sub):
            return False
        for pub in buffered:
            if pub.offset > after.offset:
                sub.push(pub)
        return True

    async def remove(self, sub: Subscriber, channel: str) -> None:
        if self._discard(sub, channel):
            await self._broker.unsubscribe([channel])

    def _discard(self, sub: Subscriber, channel: str) -> bool:
        """Forget one subscription; True when the channel has no subscriber left."""
        ch = self._channels.get(channel)
        if ch is None or sub not in ch:
            return False
        ch.live.pop(sub, None)
        ch.stop_recovering(sub)
        ch.clear_overflow(sub)
        self.subscription_count -= 1
        if ch:
            return False
        del self._channels[channel]
        return True

    def dispatch(self, pub: Publication) -> int:
        """Hand one publication to every local subscriber; returns how many were live.

        The hot path of fan-out: one flat pass calling each live
        subscriber's writer (a tuple of them, so a subscriber that closes
        meanwhile cannot disturb it), and the recovering ones, usually none,
        buffer it. A publication at or before the channel's last position is
        an overlap and goes nowhere; that check, made once here, is why the
        writers need none of their own.
        """
        ch = self._channels.get(pub.channel)
        if ch is None:
            return 0
        last = ch.position
        if last is not None and last.epoch == pub.epoch and pub.offset <= last.offset:
            return 0  # already dispatched (an overlap after a resync)
        ch.position = pub
        if ch.recovering:
            bound = self._recovery_buffer
            for sub, buffered in ch.recovering.items():
                if len(buffered) < bound:
                    buffered.append(pub)
                else:
                    if ch.overflowed is None:
                        ch.overflowed = set()
                    ch.overflowed.add(sub)
        live = tuple(ch.live.values())
        for push in live:
            push(pub)
        return len(live)


def _skip_until(ch: _Channel, sub: Subscriber, mark: Position) -> Push:
    """A writer that drops publications up to `mark` (the subscriber's replay had
    them), then puts the subscriber's plain writer in its place."""
    push = sub.push

    def push_past(pub: Publication) -> object:
        if pub.epoch == mark.epoch and pub.offset <= mark.offset:
            return False
        if ch.live.get(sub) is push_past:
            ch.live[sub] = push
        return push(pub)

    return push_past
