"""The reference: python-socketio (AsyncServer + AsyncRedisManager on aiohttp).

    BENCH_PORT=... BENCH_REDIS_URL=... BENCH_SECRET=... python -m benchmarks.sio_server

Set up as a Socket.IO user would for the same job, and given the same work
Herald does per connection where Socket.IO has an equivalent: the JWT in
the Authorization header is verified (HS256, `sub` and `exp` required) and
a bad one refused; a `subscribe` event joins the room named like the
channel (no ownership check: Socket.IO has no such rule). `GET /stats`
answers `{"broker_messages_in": N}`, the messages its manager read from
Redis, the figure Herald's /api/v1/stats gives.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import jwt
import socketio
from aiohttp import web

from benchmarks.baseline import bearer_claims


class CountingRedisManager(socketio.AsyncRedisManager):
    """AsyncRedisManager that counts what it reads from Redis."""

    messages_in = 0

    async def _listen(self) -> AsyncIterator[Any]:
        async for message in super()._listen():
            self.messages_in += 1
            yield message


def make_app(redis_url: str, secret: str) -> web.Application:
    manager = CountingRedisManager(redis_url)
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=manager,
                               logger=False, engineio_logger=False)
    app = web.Application()
    sio.attach(app)

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        try:
            bearer_claims(environ.get("HTTP_AUTHORIZATION", ""), secret)
        except jwt.PyJWTError as exc:
            raise socketio.exceptions.ConnectionRefusedError("unauthorized") from exc

    @sio.on("subscribe")
    async def subscribe(sid: str, channel: str) -> bool:
        await sio.enter_room(sid, channel)
        return True

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"broker_messages_in": manager.messages_in})

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    app.router.add_get("/stats", stats)
    app.router.add_get("/readyz", ready)
    return app


def main() -> None:
    app = make_app(os.environ["BENCH_REDIS_URL"], os.environ["BENCH_SECRET"])
    # The same accept backlog as Herald's, so a connect storm meets the same queue.
    web.run_app(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]),
                backlog=4096, print=None, access_log=None)


if __name__ == "__main__":
    main()
