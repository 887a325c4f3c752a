"""What the hand-written baseline servers share: the JWT check, the frames, the Redis fan-in.

`benchmarks.tornado_server` (bare Tornado) and `benchmarks.picows_server`
(picows + uvloop, the floor) do the same job on different stacks, so the
job is written once here and only the transport differs; python-socketio
(`benchmarks.sio_server`) brings its own Redis manager and framing and
takes only the JWT check. The Redis side listens to the pub/sub channels
Herald's publish script writes (`herald:pub:<channel>`, subscribed while a
local client watches) and builds each publication's client frame once,
writing the same bytes to every subscriber.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from typing import Any, Protocol

import jwt
import orjson
import redis.asyncio as aioredis

PREFIX = "herald:pub:"
_ids = itertools.count(1)


def bearer_claims(authorization: str, secret: str) -> dict[str, Any]:
    """The claims of an `Authorization: Bearer <JWT>` header (HS256, `sub` and `exp`
    required); raises `jwt.PyJWTError` on anything else."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        raise jwt.InvalidTokenError("no bearer token")
    return jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["sub", "exp"]})


def text_frame(payload: bytes) -> bytes:
    """A server-to-client (unmasked) WebSocket text frame."""
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", 0x81, size) + payload
    if size <= 0xFFFF:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


def json_frame(obj: dict[str, Any]) -> bytes:
    return text_frame(orjson.dumps(obj))


def connected_frame() -> bytes:
    return json_frame({"type": "connected", "client": f"c{next(_ids)}"})


def subscribed_frame(channel: str, rid: Any) -> bytes:
    reply: dict[str, Any] = {"type": "subscribed", "channel": channel, "epoch": "", "offset": 0}
    if rid is not None:
        reply["id"] = rid
    return json_frame(reply)


class Subscriber(Protocol):
    channels: list[str]

    def send_frame(self, frame: bytes) -> None: ...


class Fanout:
    """channel -> local subscribers; one Redis pub/sub connection for all of them."""

    def __init__(self, redis_url: str) -> None:
        self.client = aioredis.from_url(redis_url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.rooms: dict[str, set[Subscriber]] = {}
        self.messages_in = 0
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Connected (and read) before the first client: concurrent first
        # subscribes would each open a connection of their own.
        await self.pubsub.subscribe(PREFIX + "-")
        self._reader = asyncio.create_task(self._read())

    async def join(self, sub: Subscriber, channel: str) -> None:
        room = self.rooms.get(channel)
        if room is None:
            room = self.rooms[channel] = set()
            await self.pubsub.subscribe(PREFIX + channel)
        room.add(sub)
        sub.channels.append(channel)

    def leave(self, sub: Subscriber) -> None:
        for channel in sub.channels:
            room = self.rooms.get(channel)
            if room is not None:
                room.discard(sub)

    def stats(self) -> dict[str, int]:
        """What the conductor reads from `GET /stats`."""
        return {"broker_messages_in": self.messages_in}

    async def _read(self) -> None:
        while True:
            msg = await self.pubsub.get_message(timeout=None)
            if msg is None or msg["type"] != "message":
                continue
            self.messages_in += 1
            rec = orjson.loads(msg["data"])
            room = self.rooms.get(rec["c"])
            if not room:
                continue
            frame = json_frame({
                "type": "message", "channel": rec["c"], "event": rec["e"],
                "epoch": rec["p"], "offset": rec["o"], "data": rec["d"],
            })
            for sub in tuple(room):
                sub.send_frame(frame)
