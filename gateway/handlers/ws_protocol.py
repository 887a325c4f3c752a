"""A WebSocket connection after its upgrade: one asyncio protocol on the socket.

Tornado parses the upgrade request (routing, trusted proxies, admission,
Origin: `handlers.websocket`); from the 101 on, a connection is one object
on the event loop's own transport. No IOStream, HTTP connection, request,
handler or read coroutine is kept per connection, which is most of what an
idle connection used to cost, and under uvloop every write is libuv's C
path. This module is the RFC 6455 mechanics only, in the spirit of
Tornado's handler/protocol split: framing (`protocol.ws_frames`), ping and
pong, the close handshake, write pausing for the outbox, and reading at
the pace the application handles messages. What a message means is the
subclass's (`opened`, `on_message`, `on_pong`, `on_close`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import socket
from collections import deque
from typing import cast

from tornado.iostream import IOStream

from gateway.core.outbox import SOFT_LIMIT
from gateway.protocol.errors import CloseCode
from gateway.protocol.ws_frames import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameError,
    FrameReader,
    close_code,
    close_frame,
    ws_frame,
)

log = logging.getLogger("herald.ws")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# How long a peer has to answer our close frame (and to read what is still
# buffered for it) before the socket is dropped: a peer that never reads
# cannot hold a closed connection open.
CLOSE_TIMEOUT = 5.0
# Messages read ahead of the one being handled; past it, reading pauses (the
# kernel's buffer, then TCP, push back on a client that floods).
INBOX_LIMIT = 32


def accept_key(key: str) -> str:
    """`Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (§4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def valid_key(key: str) -> bool:
    """A `Sec-WebSocket-Key` is 16 random bytes, base64-encoded (§4.1)."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def take_socket(stream: IOStream) -> tuple[socket.socket, bytes]:
    """Take the socket of a detached, flushed IOStream, and what it read past the request.

    A client may send its first frames with the handshake; Tornado has read
    them into its buffer. The stream is marked closed so that nothing it
    still has scheduled touches the socket, which now belongs to the
    transport.
    """
    if stream._state is not None:  # private: no public way to hand a socket on
        stream.io_loop.remove_handler(stream.socket)
        stream._state = None
    early = bytes(stream._read_buffer[: stream._read_buffer_size])
    sock = stream.socket
    stream._closed = True
    return sock, early


class WebSocketConnection(asyncio.Protocol):
    """One upgraded connection: RFC 6455 on an asyncio transport."""

    __slots__ = (
        "_abort_timer",
        "_close_received",
        "_close_sent",
        "_drain_waiter",
        "_early",
        "_inbox",
        "_paused_reading",
        "_pending_pong",
        "_reader",
        "_task",
        "close_code",
        "transport",
    )

    def __init__(self, max_message: int, early: bytes = b"") -> None:
        self._reader = FrameReader(max_message)
        self._early = early
        self.transport: asyncio.Transport | None = None
        # The peer's close code (None: it gave none, or never closed).
        self.close_code: int | None = None
        self._close_sent = False
        self._close_received = False
        self._abort_timer: asyncio.TimerHandle | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._inbox: deque[bytes | str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._paused_reading = False
        self._pending_pong: bytes | None = None

    # -- what a subclass says ----------------------------------------------

    async def opened(self) -> None:
        """The upgrade is done; messages wait until this returns."""

    async def on_message(self, message: str | bytes) -> None:
        """One whole message (text as str); the next waits until this returns."""

    def on_ping(self) -> None:
        """The peer pinged (it is answered already)."""

    def on_pong(self) -> None:
        """The peer answered a ping."""

    def on_close(self) -> None:
        """The connection is gone (once, whoever closed it)."""

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio's API without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        # Past the high mark the outbox queues (and conflates); see gateway.core.outbox.
        self.transport.set_write_buffer_limits(high=SOFT_LIMIT, low=SOFT_LIMIT // 4)
        self._task = asyncio.ensure_future(self._run(opening=True))
        early, self._early = self._early, b""
        if early:
            self.data_received(early)

    def data_received(self, data: bytes) -> None:
        if self._close_received:
            return
        try:
            items = self._reader.feed(data)
        except FrameError as exc:
            self._fail(exc.code, exc.reason)
            return
        for opcode, payload in items:
            if opcode < OP_CLOSE:
                if self._close_sent:
                    continue  # closing: requests are no longer handled
                inbox = self._inbox
                if inbox is None:
                    inbox = self._inbox = deque()
                inbox.append(payload)
            elif opcode == OP_PING:
                assert isinstance(payload, bytes)
                if not self._close_sent:
                    self._pong(payload)
                self.on_ping()
            elif opcode == OP_PONG:
                self.on_pong()
            else:
                assert isinstance(payload, bytes)
                self._peer_closed(payload)
                return
        inbox = self._inbox
        if inbox:
            if self._task is None:
                self._task = asyncio.ensure_future(self._run(opening=False))
            if len(inbox) >= INBOX_LIMIT and not self._paused_reading:
                self._paused_reading = True
                self.transport.pause_reading()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        if self._drain_waiter is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        pong, self._pending_pong = self._pending_pong, None
        if pong is not None and not self._close_sent:
            self.write_raw(ws_frame(OP_PONG, pong))
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection closed"))
        self._inbox = None
        self._close_sent = True
        self.on_close()

    # -- reading at the application's pace -------------------------------

    async def _run(self, opening: bool) -> None:
        """Open, then handle what was read, one message at a time, in order."""
        try:
            if opening:
                await self.opened()
            while self._inbox and not self._close_sent:
                await self.on_message(self._inbox.popleft())
        except Exception:
            log.exception("websocket handler failed")
            self.close(CloseCode.INTERNAL, "internal error")
        finally:
            self._task = None
        # Everything read is handled (or dropped by a close): an idle connection
        # keeps no empty deque, and the next read starts a new run.
        self._inbox = None
        if self._paused_reading and not self._close_sent:
            self._paused_reading = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    # -- writing -----------------------------------------------------------

    def write_raw(self, frame: bytes) -> None:
        """Put a frame on the transport now (control frames; the outbox for the rest)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(frame)

    def drained(self) -> asyncio.Future[None]:
        """Resolves once the transport's buffer is back under its low mark."""
        waiter = self._drain_waiter
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            waiter.set_result(None)
        return waiter

    def _pong(self, payload: bytes) -> None:
        """Answer a ping; while the peer is not reading, only its newest one.

        Pongs skip the outbox (they must not wait behind publications), so
        a client that pings without reading would otherwise grow the
        transport's buffer without bound. RFC 6455 §5.5.3 lets an endpoint
        answer only the most recent of several pings.
        """
        if self._drain_waiter is None:
            self.write_raw(ws_frame(OP_PONG, payload))
        else:
            self._pending_pong = payload

    def ping(self) -> None:
        if not self._close_sent:
            self.write_raw(ws_frame(OP_PING, b""))

    # -- closing -----------------------------------------------------------

    def close(self, code: int, reason: str = "") -> None:
        """Start the close handshake: our close frame, then the peer's, within CLOSE_TIMEOUT."""
        if self._close_sent:
            return
        self._close_sent = True
        self._inbox = None
        self.write_raw(close_frame(code, reason))
        self._arm_abort()
        if self._paused_reading and self.transport is not None:
            # Requests are dropped from now on, but the peer's close frame must be read.
            self._paused_reading = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection now, without a close handshake."""
        if self.transport is not None:
            self.transport.abort()

    def _peer_closed(self, payload: bytes) -> None:
        try:
            code = close_code(payload)
        except FrameError as exc:
            self._fail(exc.code, exc.reason)
            return
        self.close_code = code
        self._close_received = True
        if not self._close_sent:
            # Echo the peer's code (§5.5.1); the server closes the TCP connection (§7.1.1).
            self.close(code if code is not None else CloseCode.NORMAL)
        self._inbox = None
        if self.transport is not None:
            self.transport.close()

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: say why, and close without waiting (§7.1.7)."""
        self.close(code, reason)
        self._close_received = True
        if self.transport is not None:
            self.transport.close()

    def _arm_abort(self) -> None:
        if self._abort_timer is None and self.transport is not None:
            loop = asyncio.get_running_loop()
            self._abort_timer = loop.call_later(CLOSE_TIMEOUT, self.transport.abort)

    @property
    def closing(self) -> bool:
        """Our close frame is sent (or the connection is gone): nothing more is written."""
        return self._close_sent
