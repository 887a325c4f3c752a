"""The publication and where a channel's stream stands: the types every layer shares.

A `Publication` carries its place in the history (epoch, offset) and builds
each wire form lazily and at most once per node, however many connections
receive it: the JSON (`json`), the whole WebSocket frame (`ws_frame`) and
the SSE event (`sse_frame`).
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.protocol import wire

TERMINAL_JOB_EVENTS = frozenset({"completed", "failed", "cancelled"})
_NUMBER = (float, int)


_random = random.Random()  # seeded from os.urandom, per process


def new_epoch() -> str:
    """A fresh epoch: 48 random bits, URL-safe (a candidate is made on every
    publish, hence a seeded PRNG rather than a system call per publish)."""
    return base64.urlsafe_b64encode(_random.getrandbits(48).to_bytes(6, "big")).decode()


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
    # True when an idempotency key matched an earlier publish: this is that
    # publish's position, and nothing was published now (never dispatched).
    duplicate: bool = False
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
        """Storage form (the durable engine's rows); `from_record` reads it back."""
        return {"c": self.channel, "e": self.event, "d": self.data, "p": self.epoch,
                "o": self.offset, "t": self.time, "m": self.meta}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Publication:
        return cls(rec["c"], rec["e"], rec["d"], rec["p"], rec["o"], rec["t"], rec.get("m") or {})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Publication:
        """A publication from the Redis engine's record (the publish script's JSON).

        Raises `ValueError` for bytes that are not one. Whatever can PUBLISH
        or XADD to Redis can put bytes where records go; a bad one must cost
        that record (counted by the engine), not the fan-in connection or a
        later comparison of offsets in the hub.
        """
        try:
            pub = cls.from_record(orjson.loads(raw))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a publication record ({exc!r})") from None
        if (
            type(pub.channel) is type(pub.event) is type(pub.epoch) is str
            and type(pub.offset) is int
            and type(pub.time) in _NUMBER
            and type(pub.meta) is dict
        ):
            return pub
        raise ValueError("not a publication record (a field of the wrong type)")


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
