"""The pub/sub subscription table: what the node wants, what was sent, what Redis confirmed.

Pure bookkeeping, no I/O (the engine sends what `commands()` decides and
feeds back every reply), so the rules can be read, and tested, on their own.

Each channel is in one of three states:

- `PENDING`: wanted, and Redis has not yet confirmed a SUBSCRIBE sent after
  the last UNSUBSCRIBE (one may be queued for the next flush, or in flight);
- `CONFIRMED`: wanted, and Redis confirmed it, with nothing in flight after;
- `RELEASING`: no longer wanted, and Redis may still be subscribed (an
  UNSUBSCRIBE queued or in flight).

Redis answers the commands of one connection in order, so every reply is
matched to the oldest command in flight for its channel. A waiter (a
`subscribe` call) is only resolved when the channel's last command in flight
has been answered and was a SUBSCRIBE: a late confirmation of a SUBSCRIBE
that an UNSUBSCRIBE followed is not a success. That rule is what closes the
silent loss of issue 16, where a timed-out subscribe's confirmation answered
its retry while the UNSUBSCRIBE of the failed attempt won in Redis.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

SUBSCRIBE = True
UNSUBSCRIBE = False


class State(enum.Enum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    RELEASING = "releasing"


class Released(Exception):
    """The channel was unsubscribed while a subscribe waited for its confirmation."""


@dataclass(slots=True, eq=False)
class _Entry:
    wanted: bool = False
    # What Redis has confirmed for this channel on this connection.
    in_redis: bool = False
    # Commands sent and not yet answered, oldest first (SUBSCRIBE / UNSUBSCRIBE):
    # rarely more than two, so a list (an empty deque is ten times its size,
    # and there is one entry per channel of every idle connection).
    inflight: list[bool] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def will_be(self) -> bool:
        """Subscribed in Redis once every command sent is processed."""
        return self.inflight[-1] if self.inflight else self.in_redis

    @property
    def state(self) -> State | None:
        if self.wanted:
            return State.CONFIRMED if self.in_redis and not self.inflight else State.PENDING
        return State.RELEASING if self.will_be or self.inflight else None


class SubscriptionTable:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        # Channels wanted (PENDING or CONFIRMED): what fan-in dispatches.
        self.wanted: set[str] = set()
        self._dirty: set[str] = set()
        self._inflight = 0
        # Commands sent since the start: the audit's way to see that none
        # was sent while it looked.
        self.sent = 0
        # Set while the connection is up and resynchronised: waiters are only
        # resolved then (a confirmation read while connecting waits for it).
        self.live = False

    # -- intents --------------------------------------------------------------

    def state(self, channel: str) -> State | None:
        entry = self._entries.get(channel)
        return entry.state if entry is not None else None

    def want(self, channel: str, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None] | None:
        """The node wants `channel`: None if Redis confirmed it already, else a waiter."""
        entry = self._entries.get(channel)
        if entry is None:
            entry = self._entries[channel] = _Entry()
        entry.wanted = True
        self.wanted.add(channel)
        if entry.state is State.CONFIRMED and self.live:
            return None
        fut: asyncio.Future[None] = loop.create_future()
        entry.waiters.append(fut)
        self._dirty.add(channel)
        return fut

    def forget_waiter(self, channel: str, fut: asyncio.Future[None]) -> None:
        """A subscribe gave up (timeout): its waiter goes, the intent stays until released."""
        entry = self._entries.get(channel)
        if entry is not None and fut in entry.waiters:
            entry.waiters.remove(fut)

    def release(self, channel: str) -> None:
        """The node no longer wants `channel`; a subscribe still waiting fails."""
        entry = self._entries.get(channel)
        if entry is None:
            return
        entry.wanted = False
        self.wanted.discard(channel)
        self._fail(entry, Released(f"{channel} was unsubscribed before redis confirmed it"))
        self._dirty.add(channel)

    # -- the engine's side ----------------------------------------------------

    def commands(self) -> tuple[list[str], list[str]]:
        """What to send now: (SUBSCRIBE these, UNSUBSCRIBE these), marked in flight.

        Only what changes Redis's state is sent: a channel wanted and
        released in one loop turn sends nothing; one released and wanted
        again before its UNSUBSCRIBE was answered sends a new SUBSCRIBE,
        whose answer is the one that confirms it.
        """
        subs: list[str] = []
        unsubs: list[str] = []
        for channel in self._dirty:
            entry = self._entries.get(channel)
            if entry is None:
                continue
            if entry.wanted and not entry.will_be:
                subs.append(channel)
                self._send(entry, SUBSCRIBE)
            elif not entry.wanted and entry.will_be:
                unsubs.append(channel)
                self._send(entry, UNSUBSCRIBE)
            else:
                self._settle(channel, entry)
        self._dirty.clear()
        return subs, unsubs

    def reconnected(self) -> list[str]:
        """A new connection: Redis holds nothing; every wanted channel is sent again.

        Returns the channels to SUBSCRIBE (marked in flight); released ones
        are simply forgotten, and waiters keep waiting for the new answers.
        """
        self.live = False
        self._inflight = 0
        self._dirty.clear()
        for channel in list(self._entries):
            entry = self._entries[channel]
            entry.inflight.clear()
            entry.in_redis = False
            if not entry.wanted:
                del self._entries[channel]
        channels = list(self.wanted)
        for channel in channels:
            self._send(self._entries[channel], SUBSCRIBE)
        return channels

    def reply(self, subscribed: bool, channel: str) -> None:
        """Redis answered a SUBSCRIBE (`subscribed`) or an UNSUBSCRIBE of `channel`."""
        entry = self._entries.get(channel)
        if entry is None or not entry.inflight:
            return  # nothing of ours asked for it
        self._inflight -= 1
        del entry.inflight[0]
        if not entry.inflight:
            entry.in_redis = subscribed
        self._settle(channel, entry)

    def go_live(self) -> None:
        """The connection is resynchronised: resolve every channel Redis confirmed."""
        self.live = True
        for channel, entry in list(self._entries.items()):
            self._settle(channel, entry)

    def disconnected(self) -> None:
        self.live = False

    # -- the audit's view -----------------------------------------------------

    @property
    def quiescent(self) -> bool:
        """Nothing in flight, nothing queued: Redis's count must equal `expected()`."""
        return self._inflight == 0 and not self._dirty

    def expected(self) -> int:
        """Subscriptions Redis should hold for this table (once quiescent)."""
        return sum(1 for e in self._entries.values() if e.will_be)

    def held(self) -> list[str]:
        return [c for c, e in self._entries.items() if e.state is State.CONFIRMED]

    # -- internals ------------------------------------------------------------

    def _send(self, entry: _Entry, kind: bool) -> None:
        entry.inflight.append(kind)
        self._inflight += 1
        self.sent += 1

    def _settle(self, channel: str, entry: _Entry) -> None:
        state = entry.state
        if state is State.CONFIRMED and self.live:
            for fut in entry.waiters:
                if not fut.done():
                    fut.set_result(None)
            entry.waiters.clear()
        elif state is None:
            self._fail(entry, Released(f"{channel} was unsubscribed"))
            del self._entries[channel]

    @staticmethod
    def _fail(entry: _Entry, exc: Exception) -> None:
        for fut in entry.waiters:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: the waiter re-raises it itself
        entry.waiters.clear()
