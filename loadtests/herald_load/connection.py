"""One WebSocket to Herald, on `websocket-client` (plain sockets gevent patches).

Locust runs users as greenlets, so everything here blocks cooperatively:
no asyncio. Each connection has one reader greenlet that owns the socket's
input; the user's greenlet sends requests and waits on the reply its id
names. Frames are handled in arrival order by the reader, which is what
makes offset tracking exact: a `subscribed` reply is applied before any
message that follows it.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import gevent
import orjson
import websocket
from gevent.event import AsyncResult, Event

from .report import WS, Reporter, ms_since, namespace

log = logging.getLogger("herald.loadtest")

ABNORMAL = 1006  # no close frame: the TCP connection just ended
IDLE = 4900  # ours, never on the wire: nothing arrived for idle_timeout seconds

FrameHandler = Callable[[dict[str, Any], float, int], None]


class RequestFailed(Exception):
    """Herald answered a request with an `error` frame (or not at all)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class HeraldConnection:
    """Connect, authenticate, request/reply by id, and hand every other frame on.

    `on_frame(msg, received_at, size)` gets `message` and `subscribed`
    frames (the latter before its requester wakes up); `closed` is set when
    the connection ends for any reason, with `close_code` saying how.
    """

    def __init__(
        self,
        url: str,
        token: str,
        reporter: Reporter,
        on_frame: FrameHandler,
        *,
        auth_mode: str = "header",
        idle_timeout: float = 60.0,
        request_timeout: float = 10.0,
        read_delay: float = 0.0,
        rcvbuf: int | None = None,
    ) -> None:
        self.url = url
        self._token = token
        self._report = reporter
        self._on_frame = on_frame
        self._auth_mode = auth_mode
        self._idle_timeout = idle_timeout
        self._request_timeout = request_timeout
        self._read_delay = read_delay
        self._rcvbuf = rcvbuf
        self._ids = itertools.count(1)
        self._pending: dict[int, AsyncResult] = {}
        self._ws: websocket.WebSocket | None = None
        self._reader: gevent.Greenlet | None = None
        self.closed = Event()
        self.close_code: int | None = None
        # True when we ended it (or never got it open): nothing to report as a close.
        self.closed_locally = False
        self.reconnect_after: float | None = None  # the server asked us to come back
        self.connected: dict[str, Any] = {}

    # -- opening ------------------------------------------------------------

    def open(self) -> bool:
        """Connect and authenticate; reports `ws connect`. False (reported) on failure."""
        started = time.perf_counter()
        sockopt = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        if self._rcvbuf:
            sockopt.append((socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf))
        ws = websocket.WebSocket(sockopt=sockopt, skip_utf8_validation=True)
        header = [f"Authorization: Bearer {self._token}"] if self._auth_mode == "header" else []
        try:
            ws.connect(self.url, header=header, timeout=self._request_timeout, suppress_origin=True)
            if self._auth_mode == "message":
                ws.send(orjson.dumps({"type": "auth", "token": self._token}).decode())
            first = orjson.loads(ws.recv())
        except websocket.WebSocketBadStatusException as exc:
            self._fail_open(ws, started, refusal(exc))
            return False
        except (OSError, websocket.WebSocketException, orjson.JSONDecodeError) as exc:
            self._fail_open(ws, started, f"{type(exc).__name__}: {exc}")
            return False
        if first.get("type") != "connected":
            self._fail_open(ws, started, f"{first.get('code')}: {first.get('message')}")
            return False
        self._report.record(WS, "connect", ms_since(started))
        self.connected = first
        self._ws = ws
        ws.settimeout(self._idle_timeout)
        self._reader = gevent.spawn(self._read_loop)
        return True

    def _fail_open(self, ws: websocket.WebSocket, started: float, why: str) -> None:
        self._report.record(WS, "connect", ms_since(started), failure=why)
        ws.shutdown()
        self.closed_locally = True
        self.close_code = ABNORMAL
        self.closed.set()

    # -- requests -----------------------------------------------------------

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send `message` with a fresh id and wait for the frame that echoes it."""
        rid = next(self._ids)
        waiter = self._pending[rid] = AsyncResult()
        try:
            self.send({**message, "id": rid})
            reply = waiter.get(timeout=self._request_timeout)
        except gevent.Timeout:
            raise RequestFailed("timeout", f"no reply in {self._request_timeout}s") from None
        except (OSError, websocket.WebSocketException) as exc:
            raise RequestFailed("closed", str(exc)) from None
        finally:
            self._pending.pop(rid, None)
        if reply.get("type") == "error":
            raise RequestFailed(str(reply.get("code")), str(reply.get("message")))
        return reply

    def subscribe(self, channel: str, since: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Subscribe (resuming from `since`); reports the round trip. None on failure."""
        name = ("resubscribe " if since else "subscribe ") + namespace(channel)
        message: dict[str, Any] = {"type": "subscribe", "channel": channel}
        if since is not None:
            message["since"] = since
        started = time.perf_counter()
        try:
            reply = self.request(message)
        except RequestFailed as exc:
            self._report.record(WS, name, ms_since(started), failure=f"{channel}: {exc}")
            return None
        self._report.record(WS, name, ms_since(started))
        return reply

    def ping(self) -> None:
        started = time.perf_counter()
        try:
            self.request({"type": "ping"})
        except RequestFailed as exc:
            self._report.record(WS, "ping", ms_since(started), failure=str(exc))
            return
        self._report.record(WS, "ping", ms_since(started))

    def refresh(self, token: str) -> None:
        """Send a fresh token on the open connection (PROTOCOL.md §2: same `sub`)."""
        started = time.perf_counter()
        try:
            self.request({"type": "auth", "token": token})
        except RequestFailed as exc:
            self._report.record(WS, "refresh token", ms_since(started), failure=str(exc))
            return
        self._report.record(WS, "refresh token", ms_since(started))

    def send(self, message: dict[str, Any]) -> None:
        if self._ws is None:
            raise websocket.WebSocketConnectionClosedException("not connected")
        self._ws.send(orjson.dumps(message).decode())

    # -- reading ------------------------------------------------------------

    def _read_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        code = ABNORMAL
        try:
            while True:
                opcode, frame = ws.recv_data_frame(True)
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    received = time.time()
                    self._dispatch(orjson.loads(frame.data), received, len(frame.data))
                    if self._read_delay:
                        gevent.sleep(self._read_delay)
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    data = frame.data or b""
                    code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
                    return
        except websocket.WebSocketTimeoutException:
            code = IDLE
        except (OSError, websocket.WebSocketException, orjson.JSONDecodeError):
            code = ABNORMAL
        except Exception as exc:
            # A bug on our side must not pass for a server close: say so.
            log.exception("frame handling failed on %s", self.url)
            self._report.record(WS, "load test error", failure=repr(exc))
        finally:
            self._ended(code)

    def _dispatch(self, msg: dict[str, Any], received: float, size: int) -> None:
        kind = msg.get("type")
        if kind in {"message", "subscribed"}:
            self._on_frame(msg, received, size)
        elif kind == "reconnect":
            self.reconnect_after = float(msg.get("after_ms") or 0) / 1000
        rid = msg.get("id")
        waiter = self._pending.get(rid) if isinstance(rid, int) else None
        if waiter is not None:
            waiter.set(msg)
        elif kind == "error":
            self._report.record(
                WS, f"error {msg.get('code')}", failure=str(msg.get("message"))
            )

    def _ended(self, code: int) -> None:
        if self.close_code is None:
            self.close_code = code
        for waiter in self._pending.values():
            waiter.set({"type": "error", "code": "closed", "message": f"closed ({code})"})
        self.closed.set()
        if self._ws is not None:
            self._ws.shutdown()

    # -- closing ------------------------------------------------------------

    def close(self) -> None:
        """Close on our side: `closed_locally`, so the user reports no close for it."""
        self.closed_locally = True
        if self.close_code is None:
            self.close_code = 1000
        ws = self._ws
        if ws is not None and ws.connected:
            try:
                ws.send_close(websocket.STATUS_NORMAL)
            except (OSError, websocket.WebSocketException):
                pass
        if self._reader is not None:
            self._reader.kill(block=False)
        if ws is not None:
            ws.shutdown()
        self.closed.set()



def refusal(exc: websocket.WebSocketBadStatusException) -> str:
    """`HTTP 429 rate_limited: ...` from a refused upgrade, without its dates.

    Locust groups failures by their text: a message carrying the response's
    Date header would make one row per second instead of one per cause.
    """
    detail = ""
    try:
        body = orjson.loads(exc.resp_body or b"")
        detail = f" {body.get('error')}: {body.get('message')}"
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        pass
    return f"HTTP {exc.status_code}{detail}"
