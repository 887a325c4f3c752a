"""Many connections' deadlines (token expiry) on one event-loop timer.

An asyncio timer per connection costs about half a KiB on an idle
connection (the handle, uvloop's libuv timer, a copy of the context); a
heap entry costs a tenth of that. Cancelling only blanks the entry, so it
is O(1); blanks are dropped when they reach the top, or all at once when
they are most of the heap.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable

# An entry: [when (wall clock), sequence, callback or None once cancelled].
Entry = list

_sequence = itertools.count()
log = logging.getLogger("herald.deadlines")


class Deadlines:
    __slots__ = ("_blank", "_heap", "_timer", "_timer_at")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._blank = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        return len(self._heap) - self._blank

    def at(self, when: float, callback: Callable[[], None]) -> Entry:
        """Call `callback` at wall-clock time `when` (at once if it has passed)."""
        entry: Entry = [when, next(_sequence), callback]
        heapq.heappush(self._heap, entry)
        if self._timer is None or when < self._timer_at:
            self._arm()
        return entry

    def cancel(self, entry: Entry) -> None:
        if entry[2] is not None:
            entry[2] = None
            self._blank += 1
            if self._blank > 64 and self._blank * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._blank = 0

    def clear(self) -> None:
        """Forget every deadline (the node is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap = []
        self._blank = 0

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self._blank -= 1
        if not heap:
            return
        self._timer_at = heap[0][0]
        delay = max(0.0, self._timer_at - time.time())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        heap = self._heap
        now = time.time()
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            callback = entry[2]
            if callback is None:
                self._blank -= 1
                continue
            entry[2] = None
            try:
                callback()
            except Exception:
                log.exception("deadline callback failed")
        self._arm()
