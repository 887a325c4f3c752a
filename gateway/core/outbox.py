"""A connection's outgoing path, bounded: the one flow-control policy of every transport.

While the client keeps up, frames go straight to the socket (the fast path:
no queue, no allocation). Once the socket's own buffer passes `SOFT_LIMIT`,
frames wait in a queue that is drained as the socket empties. In that queue
a newer `progress` publication of a state channel replaces the older pending
one (conflation: the client sees the offset jump, and the state is exact).
Past the byte or message bound the connection is closed (4008) and the
client recovers by offset: no slow client grows memory without bound or
holds up the others.
"""

from __future__ import annotations

import itertools
from asyncio import Future
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from tornado.iostream import IOStream, StreamClosedError

from gateway.protocol.publication import Publication
from gateway.telemetry.metrics import Metrics

# Above this many unsent bytes in the socket buffer, frames queue (and may conflate).
SOFT_LIMIT = 64 * 1024

_keys = itertools.count()


class Outbox:
    # One per connection: slots keep the idle connection's footprint small
    # (no per-instance __dict__).
    __slots__ = (
        "_conflatable",
        "_max_bytes",
        "_max_messages",
        "_metrics",
        "_on_overflow",
        "_queue",
        "_queued_bytes",
        "_raw",
        "_stream",
        "_waiting",
        "_write",
        "closed",
    )

    def __init__(
        self,
        stream: IOStream,
        *,
        write: Callable[[bytes], Future[None]] | None = None,
        max_bytes: int,
        max_messages: int,
        metrics: Metrics,
        conflatable: Callable[[Publication], bool],
        on_overflow: Callable[[], None],
    ) -> None:
        self._stream = stream
        # Raw frames by default (WebSocket); SSE passes its chunked HTTP writer.
        self._write = write or stream.write
        # Direct socket sends only for raw frames on a plain (non-TLS) stream.
        self._raw = write is None and type(stream) is IOStream
        self._max_bytes = max_bytes
        self._max_messages = max_messages
        self._metrics = metrics
        self._conflatable = conflatable
        self._on_overflow = on_overflow
        # key -> frame; a conflatable publication's key is its channel, so a
        # newer one replaces it (and moves to the back, keeping offsets ordered).
        self._queue: OrderedDict[Any, bytes] = OrderedDict()
        self._queued_bytes = 0
        self._waiting = False
        self.closed = False

    @property
    def pending_bytes(self) -> int:
        """Bytes not yet on the wire: the queue plus the socket's own buffer."""
        if self._stream.closed():
            return self._queued_bytes
        return self._queued_bytes + len(self._stream._write_buffer)  # no public accessor

    def send(self, frame: bytes, pub: Publication | None = None) -> bool:
        """Send one frame (of `pub`, if it is a publication); False if the connection is done.

        The fan-out's hot path, once per delivery: the common case (nothing
        queued, the socket's buffer empty) is a few attribute reads and one
        `send` system call.
        """
        stream = self._stream
        if self._queue or self.closed:
            return not (self.closed or stream._closed) and self._enqueue(frame, pub)
        # Tornado drops the buffer when the stream closes; its size without
        # the method call of len() (no public accessor for either).
        buffer = stream._write_buffer
        if buffer is None or stream._closed:
            return False
        pending = buffer._size
        if pending == 0 and self._raw:
            # Nothing queued anywhere: hand the bytes to the kernel ourselves,
            # skipping IOStream's per-write Future. Whatever the kernel does
            # not take goes through IOStream as usual, so order is kept.
            try:
                sent = stream.socket.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # let IOStream see the error and close the stream
            if sent == len(frame):
                return True
            frame = frame[sent:]
        elif pending >= SOFT_LIMIT:
            return self._enqueue(frame, pub)
        try:
            self._write(frame)
        except StreamClosedError:
            self.closed = True
            return False
        return True

    async def writable(self) -> None:
        """Wait until the socket has taken what it was given (paced replays).

        A recovery replay can be far larger than the bound; written in one
        go it would close the very client it is meant to repair.
        """
        while not self.closed and not self._stream.closed() and self.pending_bytes > SOFT_LIMIT:
            try:
                await self._write(b"")
            except StreamClosedError:
                self.closed = True

    def _enqueue(self, frame: bytes, pub: Publication | None) -> bool:
        key: Any = next(_keys)
        if pub is not None and self._conflatable(pub):
            key = ("conflate", pub.channel)
            old = self._queue.pop(key, None)
            if old is not None:
                self._queued_bytes -= len(old)
                self._metrics.conflated.inc()
        self._queue[key] = frame
        self._queued_bytes += len(frame)
        if len(self._queue) > self._max_messages or self.pending_bytes > self._max_bytes:
            self._overflow()
            return False
        if not self._waiting:
            self._wait_for_drain()
        return True

    def _wait_for_drain(self) -> None:
        self._waiting = True
        try:
            # An empty write resolves once everything written so far is flushed.
            self._write(b"").add_done_callback(self._drained)
        except StreamClosedError:
            self.closed = True

    def _drained(self, future: Any) -> None:
        self._waiting = False
        if future.exception() is not None or self.closed:
            self.closed = True
            return
        stream = self._stream
        while self._queue and len(stream._write_buffer) < SOFT_LIMIT:
            _, frame = self._queue.popitem(last=False)
            self._queued_bytes -= len(frame)
            try:
                self._write(frame)
            except StreamClosedError:
                self.closed = True
                return
        if self._queue:
            self._wait_for_drain()

    def _overflow(self) -> None:
        """Over the bound: every queued publication is dropped for this client (it
        will recover them by offset), and it is closed as a slow consumer."""
        self._metrics.dropped.labels("slow_consumer").inc(len(self._queue))
        self._metrics.slow_consumers.inc()
        self._queue.clear()
        self._queued_bytes = 0
        self.closed = True
        self._on_overflow()
