"""Records read from the engine that are not what Herald wrote.

Anything that can write to Redis can put bytes where Herald's records go (a
publication on a fan-in channel or in a stream, a state entry, a presence
member or event). A bad one must cost only itself: dropped, counted (the
node exports the sum as `herald_broker_bad_records_total`), and logged now
and then, never every time (a steady trickle would flood the log), never by
ending a reader.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("herald.redis")

LOG_SECONDS = 10.0


class BadRecords:
    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self._logged = -LOG_SECONDS

    def drop(self, raw: object, why: Exception) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._logged >= LOG_SECONDS:
            self._logged = now
            head = bytes(raw[:80]) if isinstance(raw, bytes | bytearray) else repr(raw)[:80]
            log.warning("dropped a %s that Herald did not write (%d so far): %s; it starts %r",
                        self.what, self.count, why, head)
