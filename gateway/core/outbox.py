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

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from gateway.protocol.publication import Publication
from gateway.telemetry.metrics import Metrics

# Above this many unsent bytes in the transport's buffer, frames queue (and may conflate).
SOFT_LIMIT = 64 * 1024

_keys = itertools.count()


class Sink(Protocol):
    """Where frames go: an asyncio transport (WebSocket) or SSE's chunked response.

    The two methods the hot path calls are an asyncio transport's own, so a
    WebSocket's outbox writes to the event loop's transport with nothing in
    between (under uvloop, C all the way to `send`).
    """

    def write(self, data: bytes) -> None: ...

    def get_write_buffer_size(self) -> int: ...


class Outbox:
    # One per connection: slots keep the idle connection's footprint small
    # (no per-instance __dict__).
    __slots__ = (
        "_conflatable",
        "_drained",
        "_max_bytes",
        "_max_messages",
        "_metrics",
        "_on_overflow",
        "_queue",
        "_queued_bytes",
        "_sink",
        "_waiting",
        "closed",
    )

    def __init__(
        self,
        sink: Sink,
        drained: Callable[[], asyncio.Future[None]],
        *,
        max_bytes: int,
        max_messages: int,
        metrics: Metrics,
        conflatable: Callable[[Publication], bool],
        on_overflow: Callable[[], None],
    ) -> None:
        self._sink = sink
        # A future that resolves once the sink's buffer is back under its low
        # mark (at once when it is not over the high one); fails if it closed.
        self._drained = drained
        self._max_bytes = max_bytes
        self._max_messages = max_messages
        self._metrics = metrics
        self._conflatable = conflatable
        self._on_overflow = on_overflow
        # key -> frame; a conflatable publication's key is its channel, so a
        # newer one replaces it (and moves to the back, keeping offsets ordered).
        self._queue: OrderedDict[Any, bytes] | None = None
        self._queued_bytes = 0
        self._waiting = False
        # Set by the connection when it closes (or sends its close frame):
        # nothing is written after that.
        self.closed = False

    @property
    def pending_bytes(self) -> int:
        """Bytes not yet on the wire: the queue plus the transport's own buffer."""
        return self._queued_bytes + self._sink.get_write_buffer_size()

    def send(self, frame: bytes, pub: Publication | None = None) -> bool:
        """Send one frame (of `pub`, if it is a publication); False if the connection is done.

        The fan-out's hot path, once per delivery: the common case (nothing
        queued, the transport's buffer under the mark) is two calls on the
        transport, the second of which is the `send` itself.
        """
        if self._queue or self.closed:
            return not self.closed and self._enqueue(frame, pub)
        sink = self._sink
        if sink.get_write_buffer_size() > SOFT_LIMIT:
            return self._enqueue(frame, pub)
        sink.write(frame)
        return True

    async def writable(self) -> None:
        """Wait until the transport has taken what it was given (paced replays).

        A recovery replay can be far larger than the bound; written in one
        go it would close the very client it is meant to repair.
        """
        while not self.closed and self.pending_bytes > SOFT_LIMIT:
            waiter = self._drained()
            if waiter.done():
                await asyncio.sleep(0.01)  # over the mark by the queue alone: let it drain
                continue
            try:
                await waiter
            except (ConnectionError, OSError):
                self.closed = True

    def _enqueue(self, frame: bytes, pub: Publication | None) -> bool:
        queue = self._queue
        if queue is None:
            queue = self._queue = OrderedDict()
        key: Any = next(_keys)
        if pub is not None and self._conflatable(pub):
            key = ("conflate", pub.channel)
            old = queue.pop(key, None)
            if old is not None:
                self._queued_bytes -= len(old)
                self._metrics.conflated.inc()
        queue[key] = frame
        self._queued_bytes += len(frame)
        if len(queue) > self._max_messages or self.pending_bytes > self._max_bytes:
            self._overflow()
            return False
        if not self._waiting:
            self._waiting = True
            self._drained().add_done_callback(self._on_drained)
        return True

    def _on_drained(self, future: asyncio.Future[None]) -> None:
        self._waiting = False
        if future.cancelled() or future.exception() is not None or self.closed:
            self.closed = True
            return
        queue = self._queue
        sink = self._sink
        while queue and sink.get_write_buffer_size() <= SOFT_LIMIT:
            _, frame = queue.popitem(last=False)
            self._queued_bytes -= len(frame)
            sink.write(frame)
        if queue:
            self._waiting = True
            self._drained().add_done_callback(self._on_drained)
        else:
            self._queue = None  # an idle connection keeps no empty queue

    def _overflow(self) -> None:
        """Over the bound: every queued publication is dropped for this client (it
        will recover them by offset), and it is closed as a slow consumer."""
        queue = self._queue or {}
        self._metrics.dropped.labels("slow_consumer").inc(len(queue))
        self._metrics.slow_consumers.inc()
        self._queue = None
        self._queued_bytes = 0
        self.closed = True
        self._on_overflow()
