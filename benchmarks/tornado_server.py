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
metrics; on the stock asyncio loop, as Tornado runs by default. The JWT
check, the frames and the Redis fan-in are `benchmarks.baseline`'s, shared
with the picows floor (`benchmarks.picows_server`).
`GET /stats` answers `{"broker_messages_in": N}`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import jwt
import orjson
from tornado.iostream import StreamClosedError
from tornado.web import Application, RequestHandler
from tornado.websocket import WebSocketHandler

from benchmarks.baseline import Fanout, bearer_claims, connected_frame, subscribed_frame


class Socket(WebSocketHandler):
    fanout: Fanout
    secret: str

    def initialize(self, fanout: Fanout, secret: str) -> None:
        self.fanout, self.secret = fanout, secret
        self.channels: list[str] = []

    def check_origin(self, origin: str) -> bool:
        return True

    async def get(self, *args: Any, **kwargs: Any) -> None:
        try:
            self.claims = bearer_claims(self.request.headers.get("Authorization", ""),
                                        self.secret)
        except jwt.PyJWTError:
            self.set_status(401)
            self.finish()
            return
        await super().get(*args, **kwargs)

    async def open(self, *args: Any, **kwargs: Any) -> None:
        self.send_frame(connected_frame())
        await self._subscribe(f"user:{self.claims['sub']}", None)

    async def on_message(self, message: str | bytes) -> None:
        msg = orjson.loads(message)
        if msg.get("type") == "subscribe":
            await self._subscribe(str(msg["channel"]), msg.get("id"))

    async def _subscribe(self, channel: str, rid: Any) -> None:
        await self.fanout.join(self, channel)
        self.send_frame(subscribed_frame(channel, rid))

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
        self.write(self.fanout.stats())


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
