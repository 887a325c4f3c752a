"""The bare-Tornado baseline: what a plain Tornado WebSocket server does for the same job.

    BENCH_PORT=... BENCH_REDIS_URL=... BENCH_SECRET=... python -m benchmarks.tornado_server

The floor a hand-written Tornado service reaches on this machine, run in the
same benchmark as Herald and python-socketio: a `WebSocketHandler` that
verifies the JWT in the Authorization header (HS256, `sub` and `exp`
required), speaks the subset of Herald's protocol the generator uses
(`connected`, the automatic `subscribed` of `user:<sub>`, `subscribe` ->
`subscribed`, `message`), and fans in from the same Redis pub/sub channels
Herald's publish script writes to (`herald:pub:<channel>`, subscribed while
a local client watches). Each publication's client frame is built once and
the same bytes written to every subscriber's stream (like Herald, unlike
Tornado's `write_message`, which frames per connection). Nothing else: no
offsets kept, no recovery, no flow-control bound, no rate limits, no
metrics; on the stock asyncio loop, as Tornado runs by default.
`GET /stats` answers `{"broker_messages_in": N}`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
from typing import Any

import jwt
import orjson
import redis.asyncio as aioredis
from tornado.iostream import StreamClosedError
from tornado.web import Application, RequestHandler
from tornado.websocket import WebSocketHandler

PREFIX = "herald:pub:"
_ids = itertools.count(1)


def text_frame(payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", 0x81, size) + payload
    if size <= 0xFFFF:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


class Fanout:
    """channel -> local sockets; one Redis pub/sub connection for all of them."""

    def __init__(self, redis_url: str) -> None:
        self.client = aioredis.from_url(redis_url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.rooms: dict[str, set[Socket]] = {}
        self.messages_in = 0
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Connected (and read) before the first client: concurrent first
        # subscribes would each open a connection of their own.
        await self.pubsub.subscribe(PREFIX + "-")
        self._reader = asyncio.create_task(self._read())

    async def join(self, sock: Socket, channel: str) -> None:
        room = self.rooms.get(channel)
        if room is None:
            room = self.rooms[channel] = set()
            await self.pubsub.subscribe(PREFIX + channel)
        room.add(sock)

    def leave(self, sock: Socket) -> None:
        for channel in sock.channels:
            room = self.rooms.get(channel)
            if room is not None:
                room.discard(sock)

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
            frame = text_frame(orjson.dumps({
                "type": "message", "channel": rec["c"], "event": rec["e"],
                "epoch": rec["p"], "offset": rec["o"], "data": rec["d"],
            }))
            for sock in tuple(room):
                sock.send_frame(frame)


class Socket(WebSocketHandler):
    fanout: Fanout
    secret: str

    def initialize(self, fanout: Fanout, secret: str) -> None:
        self.fanout, self.secret = fanout, secret
        self.channels: list[str] = []

    def check_origin(self, origin: str) -> bool:
        return True

    async def get(self, *args: Any, **kwargs: Any) -> None:
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        try:
            if scheme.lower() != "bearer":
                raise jwt.InvalidTokenError("no bearer token")
            self.claims = jwt.decode(token, self.secret, algorithms=["HS256"],
                                     options={"require": ["sub", "exp"]})
        except jwt.PyJWTError:
            self.set_status(401)
            self.finish()
            return
        await super().get(*args, **kwargs)

    async def open(self, *args: Any, **kwargs: Any) -> None:
        self.send_json({"type": "connected", "client": f"c{next(_ids)}"})
        await self._subscribe(f"user:{self.claims['sub']}", None)

    async def on_message(self, message: str | bytes) -> None:
        msg = orjson.loads(message)
        if msg.get("type") == "subscribe":
            await self._subscribe(str(msg["channel"]), msg.get("id"))

    async def _subscribe(self, channel: str, rid: Any) -> None:
        await self.fanout.join(self, channel)
        self.channels.append(channel)
        reply: dict[str, Any] = {"type": "subscribed", "channel": channel, "epoch": "",
                                 "offset": 0}
        if rid is not None:
            reply["id"] = rid
        self.send_json(reply)

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send_frame(text_frame(orjson.dumps(obj)))

    def send_frame(self, frame: bytes) -> None:
        conn = self.ws_connection
        if conn is None or conn.stream.closed():
            return
        try:
            conn.stream.write(frame)
        except StreamClosedError:
            pass

    def on_close(self) -> None:
        self.fanout.leave(self)


class Stats(RequestHandler):
    def initialize(self, fanout: Fanout) -> None:
        self.fanout = fanout

    def get(self) -> None:
        self.write({"broker_messages_in": self.fanout.messages_in})


class Ready(RequestHandler):
    def get(self) -> None:
        self.write({"ready": True})


async def main() -> None:
    fanout = Fanout(os.environ["BENCH_REDIS_URL"])
    await fanout.start()
    app = Application([
        (r"/ws", Socket, {"fanout": fanout, "secret": os.environ["BENCH_SECRET"]}),
        (r"/stats", Stats, {"fanout": fanout}),
        (r"/readyz", Ready),
    ])
    # The same accept backlog as Herald's.
    app.listen(int(os.environ["BENCH_PORT"]), "127.0.0.1", backlog=4096)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
