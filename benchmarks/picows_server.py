"""The floor: the bare Tornado server's job on picows (Cython WebSocket) and uvloop.

    BENCH_PORT=... BENCH_REDIS_URL=... BENCH_SECRET=... python -m benchmarks.picows_server

What a hand-written server on the fastest Python stack at hand reaches on
this machine, run in the same benchmark as Herald, python-socketio and bare
Tornado: exactly `benchmarks.tornado_server`'s duties (the JWT in the
Authorization header, HS256, `sub` and `exp` required, a bad one answered
401; `connected`, the automatic `subscribed` of `user:<sub>`, `subscribe` ->
`subscribed`, `message`; the same Redis fan-in with each publication's frame
built once, all from `benchmarks.baseline`), with picows parsing the HTTP
upgrade and the client's frames in C and the prebuilt frame bytes written
straight to the uvloop transport of every subscriber. Nothing else: no
offsets kept, no recovery, no flow-control bound, no rate limits, no
metrics. `GET /stats` answers `{"broker_messages_in": N}` and `GET /readyz`
`{"ready": true}` (picows answers plain HTTP requests from the same factory).
"""

from __future__ import annotations

import asyncio
import os
from http import HTTPStatus
from typing import Any

import jwt
import orjson
import uvloop
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from benchmarks.baseline import Fanout, bearer_claims, connected_frame, subscribed_frame


class Socket(WSListener):
    """One connection: its channels and the transport its frames go to."""

    def __init__(self, fanout: Fanout, claims: dict[str, Any]) -> None:
        self.fanout, self.claims = fanout, claims
        self.channels: list[str] = []
        self.transport: asyncio.Transport | None = None
        # Subscribes run one after another per connection, so replies keep request order.
        self._last: asyncio.Future[None] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport.underlying_transport
        self.send_frame(connected_frame())
        self._subscribe(f"user:{self.claims['sub']}", None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        if frame.msg_type is not WSMsgType.TEXT:
            return
        msg = orjson.loads(frame.get_payload_as_bytes())
        if msg.get("type") == "subscribe":
            self._subscribe(str(msg["channel"]), msg.get("id"))

    def _subscribe(self, channel: str, rid: Any) -> None:
        self._last = asyncio.ensure_future(self._join(self._last, channel, rid))

    async def _join(self, before: asyncio.Future[None] | None, channel: str, rid: Any) -> None:
        if before is not None:
            await before
        await self.fanout.join(self, channel)
        self.send_frame(subscribed_frame(channel, rid))

    def send_frame(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.transport = None
        self.fanout.leave(self)


def _json_response(status: HTTPStatus, obj: dict[str, Any]) -> WSUpgradeResponseWithListener:
    body, headers = orjson.dumps(obj), {"Content-Type": "application/json"}
    response = (WSUpgradeResponse.create_ok_response(body, headers) if status == HTTPStatus.OK
                else WSUpgradeResponse.create_error_response(status, body, headers))
    return WSUpgradeResponseWithListener(response, None)


def listener_factory(fanout: Fanout, secret: str) -> Any:
    def factory(request: WSUpgradeRequest) -> Socket | WSUpgradeResponseWithListener | None:
        path = request.path.partition(b"?")[0]
        if path == b"/ws":
            try:
                claims = bearer_claims(request.headers.get("Authorization", ""), secret)
            except jwt.PyJWTError:
                return _json_response(HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"})
            return Socket(fanout, claims)
        if path == b"/stats":
            return _json_response(HTTPStatus.OK, fanout.stats())
        if path == b"/readyz":
            return _json_response(HTTPStatus.OK, {"ready": True})
        return None
    return factory


async def main() -> None:
    fanout = Fanout(os.environ["BENCH_REDIS_URL"])
    await fanout.start()
    # The same accept backlog as Herald's.
    server = await ws_create_server(
        listener_factory(fanout, os.environ["BENCH_SECRET"]), "127.0.0.1",
        int(os.environ["BENCH_PORT"]), backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
