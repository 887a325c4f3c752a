"""Offset bookkeeping: what a client must see to know nothing was lost.

Herald numbers every publication of a channel: `offset` grows by exactly 1
within an `epoch` (PROTOCOL.md §2). A client that remembers the last offset
it saw per channel can therefore tell, from the next frame alone, whether
it lost messages (a jump), got one twice (no progress) or the channel's
history was reset (a new epoch). This module is that bookkeeping and
nothing else, so it is tested without a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    OK = "ok"
    LOST = "lost"  # offsets skipped: `missing` says how many
    DUPLICATE = "duplicate"  # an offset at or below the last one seen
    EPOCH_RESET = "epoch reset"  # a new epoch: history gone, offsets restart
    UNTRACKED = "untracked"  # a message on a channel we hold no position for


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    missing: int = 0


@dataclass(slots=True)
class Position:
    epoch: str
    offset: int


class OffsetTracker:
    """The last (epoch, offset) seen per channel, kept across reconnections."""

    def __init__(self) -> None:
        self._positions: dict[str, Position] = {}

    def position(self, channel: str) -> Position | None:
        """Where a resubscribe should resume (`since`), or None if never subscribed."""
        return self._positions.get(channel)

    def reset(self, channel: str, epoch: str, offset: int) -> None:
        """A fresh subscription: the stream starts after `offset` of `epoch`."""
        self._positions[channel] = Position(epoch, offset)

    def resumed(self, channel: str, epoch: str, offset: int, recovered: bool) -> Outcome:
        """A resubscription with `since` was answered.

        `recovered: true` means the replay that follows continues exactly
        after our position, so nothing changes here. `false` means the
        server could not replay: every offset between ours and its current
        one (same epoch) was lost to this client; a new epoch means the
        history itself is gone (the count is unknowable).
        """
        known = self._positions.get(channel)
        if recovered and known is not None:
            return Outcome(Verdict.OK)
        self._positions[channel] = Position(epoch, offset)
        if known is None:
            return Outcome(Verdict.OK)
        if known.epoch != epoch:
            return Outcome(Verdict.EPOCH_RESET)
        missing = offset - known.offset
        return Outcome(Verdict.LOST, missing) if missing > 0 else Outcome(Verdict.OK)

    def message(self, channel: str, epoch: str, offset: int) -> Outcome:
        """Judge one `message` frame and move the channel's position."""
        known = self._positions.get(channel)
        if known is None:
            return Outcome(Verdict.UNTRACKED)
        if epoch != known.epoch:
            known.epoch, known.offset = epoch, offset
            return Outcome(Verdict.EPOCH_RESET)
        expected = known.offset + 1
        if offset < expected:
            return Outcome(Verdict.DUPLICATE)
        known.offset = offset
        if offset > expected:
            return Outcome(Verdict.LOST, offset - expected)
        return Outcome(Verdict.OK)
