"""The embedded engine: everything in this process, nothing to install.

Its semantics match the Redis engine's so the same tests hold for both:
offsets count up by one per publication within an epoch, history is capped
by size and age, an idle channel expires after its history TTL (and comes
back with a new epoch), job owners are recorded once.

Every change to a channel or an owner goes through `_changed` /
`_owner_changed`, and every publication to fan-in through `_fan_in`: no-ops
here, the write-through points of the durable engine (`durable.py`), which
keeps these same structures and persists them.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from gateway.broker.base import Broker
from gateway.protocol.channels import Namespace
from gateway.protocol.errors import ProtocolError
from gateway.protocol.publication import History, Publication, Snapshot, new_epoch

OWNER_TTL = 7 * 86400.0
# Channels the embedded engine holds at most (each with its capped history).
MAX_CHANNELS = 100_000
# How far past the oldest channels eviction looks for one nobody watches.
EVICTION_SCAN = 100
IDEMPOTENCY_TTL = 600.0
# Idempotency keys held at most; past it the oldest go first (counted).
MAX_IDEMPOTENCY_KEYS = 100_000


@dataclass(slots=True)
class _Stream:
    epoch: str
    offset: int = 0
    expires: float = 0.0
    history: deque[Publication] = field(default_factory=deque)
    state: dict[str, Any] = field(default_factory=dict)


class MemoryBroker(Broker):
    def __init__(
        self,
        clock: Any = time.time,
        max_channels: int = MAX_CHANNELS,
        *,
        idempotency_ttl: float = IDEMPOTENCY_TTL,
        max_idempotency_keys: int = MAX_IDEMPOTENCY_KEYS,
    ) -> None:
        super().__init__()
        self._clock = clock
        self._max_channels = max_channels
        self._idempotency_ttl = idempotency_ttl
        self._max_keys = max_idempotency_keys
        # (channel, key) -> (epoch, offset, expires), oldest first.
        self._applied: OrderedDict[tuple[str, str], tuple[str, int, float]] = OrderedDict()
        self.keys_evicted = 0
        # Oldest first (insertion order), for eviction past the bound.
        self._streams: dict[str, _Stream] = {}
        self.evicted = 0
        self._owners: dict[str, tuple[str, float]] = {}
        self._subscribed: set[str] = set()
        self._last_sweep = 0.0

    def _stream(self, namespace: Namespace, channel: str, now: float) -> _Stream:
        """The live stream of a channel; a missing or expired one starts a new epoch.

        Reads create it too, so a subscriber that saw (epoch, 0) before the
        first publication still recovers from it.
        """
        stream = self._streams.get(channel)
        if stream is None or stream.expires <= now:
            if stream is None and len(self._streams) >= self._max_channels:
                self._make_room(now)
            stream = _Stream(epoch=new_epoch(), expires=now + namespace.history_ttl)
            self._streams[channel] = stream
            self._changed(channel)
        return stream

    def _make_room(self, now: float) -> None:
        """Past the channel bound: drop expired channels, else the oldest unwatched one.

        Reads create channels too, so without a bound a client cycling
        through made-up `public:` names would grow this engine for an hour
        (the history TTL) at its full request rate. An evicted channel comes
        back with a new epoch: its clients see it, nothing is lost silently.
        """
        self._last_sweep = 0.0
        self._sweep(now)
        if len(self._streams) < self._max_channels:
            return
        for i, channel in enumerate(self._streams):
            if channel not in self._subscribed or i >= EVICTION_SCAN:
                break
        del self._streams[channel]
        self._changed(channel)
        self.evicted += 1

    def _sweep(self, now: float) -> None:
        """Drop expired channels and owners, at most once a second, so memory stays bounded."""
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for channel in [c for c, s in self._streams.items() if s.expires <= now]:
            del self._streams[channel]
            self._changed(channel)
        for channel in [c for c, (_, exp) in self._owners.items() if exp <= now]:
            del self._owners[channel]
            self._owner_changed(channel)
        applied = self._applied
        while applied and next(iter(applied.values()))[2] <= now:
            applied.popitem(last=False)

    def _trim(self, namespace: Namespace, channel: str, stream: _Stream, now: float) -> None:
        history = stream.history
        kept = len(history)
        while len(history) > namespace.history_size:
            history.popleft()
        horizon = now - namespace.history_ttl
        while history and history[0].time < horizon:
            history.popleft()
        if len(history) != kept:
            self._changed(channel)

    # -- write-through points (the durable engine overrides them) -------------

    def _changed(self, channel: str) -> None:
        """A channel's stream was created, appended to, trimmed or dropped."""

    def _owner_changed(self, channel: str) -> None:
        """A channel's owner was recorded, refreshed or expired."""

    def _fan_in(self, pub: Publication) -> None:
        """Hand a publication of a subscribed channel to the node."""
        if pub.channel in self._subscribed:
            self.messages_in += 1
            self._on_publication(pub)

    async def publish(
        self,
        namespace: Namespace,
        channel: str,
        event: str,
        data: Any,
        *,
        owner: str | None = None,
        meta: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Publication:
        now = self._clock()
        self._sweep(now)
        if idempotency_key is not None:
            seen = self._applied.get((channel, idempotency_key))
            if seen is not None and seen[2] > now:
                return Publication(
                    channel, event, data, seen[0], seen[1], now, meta or {}, duplicate=True
                )
        if owner is not None:
            self._record_owner(channel, owner, now)
        stream = self._stream(namespace, channel, now)
        stream.offset += 1
        if idempotency_key is not None:
            self._remember(channel, idempotency_key, stream.epoch, stream.offset, now)
        stream.expires = now + namespace.history_ttl
        pub = Publication(channel, event, data, stream.epoch, stream.offset, now, meta or {})
        if namespace.history_size > 0:
            stream.history.append(pub)
            self._trim(namespace, channel, stream, now)
        if namespace.state:
            stream.state[event] = data
        self._changed(channel)
        self._fan_in(pub)
        return pub

    def _remember(self, channel: str, key: str, epoch: str, offset: int, now: float) -> None:
        """Keep an applied key for the dedupe window (expiring in order: one TTL for all)."""
        self._applied[(channel, key)] = (epoch, offset, now + self._idempotency_ttl)
        if len(self._applied) > self._max_keys:
            self._applied.popitem(last=False)
            self.keys_evicted += 1

    async def subscribe(self, channels: list[str]) -> None:
        self._subscribed.update(channels)

    async def unsubscribe(self, channels: list[str]) -> None:
        self._subscribed.difference_update(channels)

    async def history(
        self, namespace: Namespace, channel: str, since: int | None, limit: int
    ) -> History:
        now = self._clock()
        stream = self._stream(namespace, channel, now)
        self._trim(namespace, channel, stream, now)
        kept = [p for p in stream.history if since is None or p.offset > since]
        first = kept[0].offset if kept else stream.offset + 1
        reaches = since is None or (first <= since + 1 and since <= stream.offset)
        cut = len(kept) > limit
        return History(stream.epoch, stream.offset, kept[:limit], reaches and not cut)

    async def snapshot(self, namespace: Namespace, channel: str) -> Snapshot:
        stream = self._stream(namespace, channel, self._clock())
        return Snapshot(stream.epoch, stream.offset, dict(stream.state))

    async def owner(self, channel: str) -> str | None:
        entry = self._owners.get(channel)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def register_owner(self, channel: str, owner: str) -> None:
        self._record_owner(channel, owner, self._clock())

    def _record_owner(self, channel: str, owner: str, now: float) -> None:
        entry = self._owners.get(channel)
        if entry is not None and entry[1] > now and entry[0] != owner:
            raise ProtocolError("forbidden", f"{channel} belongs to another owner")
        self._owners[channel] = (owner, now + OWNER_TTL)
        self._owner_changed(channel)
