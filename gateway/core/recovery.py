"""Closing gaps: the one rule for resuming a channel, and its use after an engine outage.

A client that subscribes with `since` and a node whose engine reconnected
ask the same question — what happened in this channel after (epoch, offset)?
— and get the same answer from `resume`: the publications after it when the
history still holds all of them in the same epoch; else `recovered: false`,
with every publication of the new epoch when its history is complete from
offset 1 (a Redis restart: nothing acknowledged since is lost), or the
channel's snapshot when it is not. Engines only report that their fan-in was
interrupted (`Broker.bind`'s `on_resubscribed`); they never re-read history
on their own, so a new engine gets gap-closing for free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.broker.base import Broker
from gateway.core.hub import Hub
from gateway.protocol import frames
from gateway.protocol.channels import Namespace, Namespaces
from gateway.protocol.publication import Position, Publication
from gateway.telemetry.metrics import Metrics

log = logging.getLogger("herald.recovery")


@dataclass(slots=True)
class Resume:
    """Where a (re)subscription starts: the position, and what to send first."""

    epoch: str
    offset: int
    # None for a plain subscribe; True/False when a `since` was asked for.
    recovered: bool | None
    # Publications to send after the reply, oldest first: those after `since`
    # (recovered), or the whole new epoch from offset 1 (not recovered).
    publications: list[Publication] = field(default_factory=list)
    # The channel's snapshot when the client must refetch (None when recovered).
    state: dict[str, Any] | None = None

    @property
    def start(self) -> Position:
        """Where a client stands once it has the reply and nothing after it: the
        offset before the first publication that follows (SSE's event id)."""
        if self.publications:
            return Position(self.epoch, self.publications[0].offset - 1)
        return Position(self.epoch, self.offset)

    @property
    def replays_epoch(self) -> bool:
        """Not recovered, yet the new epoch's history follows in full."""
        return self.recovered is False and bool(self.publications)

    def frame(self, ns: Namespace, channel: str) -> dict[str, Any]:
        """The `subscribed` frame this resume answers with.

        When the new epoch is replayed from offset 1, the frame stands at its
        start (offset 0, empty state): a client resets to it, as for any
        `recovered: false`, and the publications that follow rebuild the rest.
        """
        offset, state = self.offset, self.state
        if self.replays_epoch:
            offset, state = 0, {}
        return frames.subscribed(
            channel, self.epoch, offset, recovered=self.recovered,
            state=state if ns.state and state is not None else None,
        )


async def resume(
    broker: Broker, ns: Namespace, channel: str, since: tuple[str, int] | None
) -> Resume:
    """The one history-or-snapshot rule (PROTOCOL.md §2, Recovery)."""
    if since is not None:
        epoch, offset = since
        limit = max(ns.history_size, 1)
        hist = await broker.history(ns, channel, offset, limit)
        if hist.epoch == epoch and hist.complete:
            return Resume(hist.epoch, hist.offset, True, hist.publications)
        if hist.epoch != epoch:
            # Another epoch: if its history is whole from offset 1, send all of it.
            fresh = await broker.history(ns, channel, 0, limit)
            if fresh.complete and fresh.publications and fresh.epoch == hist.epoch:
                return Resume(fresh.epoch, fresh.offset, False, fresh.publications)
        snap = await broker.snapshot(ns, channel)
        return Resume(snap.epoch, snap.offset, False, state=snap.state)
    snap = await broker.snapshot(ns, channel)
    return Resume(snap.epoch, snap.offset, None, state=snap.state)


class Recovery:
    """Resynchronises every held channel after the engine's fan-in was interrupted."""

    def __init__(
        self,
        broker: Broker,
        hub: Hub,
        namespaces: Namespaces,
        metrics: Metrics,
        deliver: Callable[[Publication], None],
    ) -> None:
        self._broker = broker
        self._hub = hub
        self._namespaces = namespaces
        self._metrics = metrics
        self._deliver = deliver

    async def on_resubscribed(self, channels: list[str]) -> None:
        """Close each channel's gap from the last position this node dispatched.

        Runs before the engine hands over anything it received meanwhile;
        an overlap with those is dropped by the hub's position check. A
        channel whose history was lost is reported to its subscribers.
        May raise `BrokerUnavailable`: the engine then retries the whole
        resync, from the same positions (they only move on dispatch).
        """
        count = 0
        for channel in channels:
            position = self._hub.position(channel)
            if position is None:
                continue
            ns = self._namespaces.of(channel)
            found = await resume(self._broker, ns, channel, (position.epoch, position.offset))
            if found.recovered:
                for pub in found.publications:
                    self._deliver(pub)
            else:
                self._reset(ns, channel, found)
            count += 1
        if count:
            log.info("engine fan-in resumed; %d channels resynchronised", count)

    def _reset(self, ns: Namespace, channel: str, found: Resume) -> None:
        """The engine lost this channel's history: every subscriber is told.

        Sent as an unsolicited `subscribed` with `recovered: false`, the same
        answer a client gets for a `since` that no longer resolves, so client
        code has one path for both. When the new epoch's history is complete
        the frame stands at offset 0 and its publications are delivered next,
        through the hub like live ones; else the snapshot is all there is.
        """
        reply = found.frame(ns, channel)
        position = Position(found.epoch, reply["offset"])
        self._hub.note(channel, position, reset=True)
        self._metrics.recovered.labels("false").inc()
        for sub in self._hub.subscribers_of(channel):
            sub.send_json(reply)
            sub.advance(channel, position)
        for pub in found.publications:
            self._deliver(pub)
