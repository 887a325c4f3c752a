"""Presence: who is subscribed to a channel across every gateway, and join/leave.

Its own small interface beside the stream (the `Broker`), as centrifuge keeps
its PresenceManager apart from its Broker: a namespace without `presence`
never touches it, and the per-publication path knows nothing of it.

- `join(channel, member, limit)` records a subscriber (at most `limit` per
  channel) and announces `join` to every gateway watching the channel;
- `leave(channel, member)` removes it and announces `leave`;
- `members(channel)` reads the list;
- `watch(channel)` / `unwatch(channel)` (reference counted) ask for the
  channel's join/leave events, delivered to the callback given to `bind`.

Two implementations: `MemoryPresence` here (one process) and
`RedisPresence` (gateway/broker/redis_presence.py), whose entries expire
unless their gateway refreshes them, so a killed gateway's clients leave.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.broker.bad_records import BadRecords
from gateway.protocol import wire

JOIN, LEAVE = "join", "leave"


@dataclass(frozen=True, slots=True)
class Member:
    """One subscription of one client, as presence lists it."""

    client: str
    user: str
    since: float  # when the client connected (unix seconds)
    info: Any = None  # from the token's `info` claim or the connect hook

    def to_record(self) -> bytes:
        record: dict[str, Any] = {"c": self.client, "u": self.user, "s": self.since}
        if self.info is not None:
            record["i"] = self.info
        return orjson.dumps(record)

    @classmethod
    def from_record(cls, raw: bytes | str) -> Member:
        """Raises `ValueError` for what is not a member record (see `from_dict`)."""
        return cls.from_dict(orjson.loads(raw))

    @classmethod
    def from_dict(cls, r: Any) -> Member:
        """Raises `ValueError` for what is not a member: presence records are read
        from Redis, where anything may have written (`BadRecords`)."""
        try:
            member = cls(r["c"], r["u"], r["s"], r.get("i"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a member record ({exc!r})") from None
        if not (type(member.client) is type(member.user) is str
                and type(member.since) in (float, int)):
            raise ValueError("not a member record (a field of the wrong type)")
        return member

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "client": self.client,
            "user": self.user,
            "since": wire.now_iso(self.since),
        }
        if self.info is not None:
            out["info"] = self.info
        return out


# (kind: "join" | "leave", channel, member)
PresenceCallback = Callable[[str, str, Member], None]


class PresenceUnavailable(Exception):
    """The presence store cannot be reached (Redis down)."""


class Presence(abc.ABC):
    def __init__(self) -> None:
        self._on_event: PresenceCallback = lambda kind, channel, member: None
        self._watchers: dict[str, int] = {}
        self.bad_records = BadRecords("presence record")

    def bind(self, on_event: PresenceCallback) -> None:
        self._on_event = on_event

    async def start(self) -> None:  # noqa: B027 - optional for an implementation
        """Open connections, start background refreshing (if the store needs it)."""

    async def close(self) -> None:  # noqa: B027 - optional for an implementation
        """Stop; a closing gateway's members leave (best effort)."""

    @abc.abstractmethod
    async def join(self, channel: str, member: Member, limit: int) -> bool:
        """Record `member`; False when the channel already lists `limit` members."""

    @abc.abstractmethod
    async def leave(self, channel: str, member: Member) -> None:
        """Remove `member` (nothing if it was not listed)."""

    @abc.abstractmethod
    async def members(self, channel: str) -> list[Member]:
        """Everyone listed, across the cluster."""

    async def watch(self, channel: str) -> None:
        count = self._watchers.get(channel, 0)
        self._watchers[channel] = count + 1
        if count == 0:
            await self._listen(channel)

    async def unwatch(self, channel: str) -> None:
        count = self._watchers.get(channel, 0)
        if count <= 1:
            if self._watchers.pop(channel, None) is not None:
                await self._unlisten(channel)
        else:
            self._watchers[channel] = count - 1

    def watched(self, channel: str) -> bool:
        return channel in self._watchers

    async def _listen(self, channel: str) -> None:  # noqa: B027 - optional for an implementation
        """Start receiving the channel's events (first watcher)."""

    async def _unlisten(self, channel: str) -> None:  # noqa: B027 - optional for an implementation
        """Stop receiving them (last watcher gone)."""

    def _emit(self, kind: str, channel: str, member: Member) -> None:
        if channel in self._watchers:
            self._on_event(kind, channel, member)


class MemoryPresence(Presence):
    """One process: a dict per channel, events handed over on the next loop turn."""

    def __init__(self) -> None:
        super().__init__()
        self._channels: dict[str, dict[str, Member]] = {}

    async def join(self, channel: str, member: Member, limit: int) -> bool:
        members = self._channels.setdefault(channel, {})
        if member.client in members:
            return True
        if len(members) >= limit:
            return False
        members[member.client] = member
        self._later(JOIN, channel, member)
        return True

    async def leave(self, channel: str, member: Member) -> None:
        members = self._channels.get(channel)
        if members is None or members.pop(member.client, None) is None:
            return
        if not members:
            del self._channels[channel]
        self._later(LEAVE, channel, member)

    async def members(self, channel: str) -> list[Member]:
        return list(self._channels.get(channel, {}).values())

    def _later(self, kind: str, channel: str, member: Member) -> None:
        # Like the Redis one, never inside the caller's own join/leave.
        asyncio.get_running_loop().call_soon(self._emit, kind, channel, member)
