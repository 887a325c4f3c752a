"""Token buckets: the one bound on how fast a client may send."""

from __future__ import annotations

import time


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; one token per request."""

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class AbuseCounter:
    """Refusals within a sliding window; past `limit` the client is abusive."""

    __slots__ = ("_clock", "_count", "_start", "limit", "window")

    def __init__(self, limit: int, window: float = 10.0, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.limit = limit
        self.window = window
        self._clock = clock
        self._start = clock()
        self._count = 0

    def record(self) -> bool:
        """Count one refusal; True when the client crossed the line."""
        now = self._clock()
        if now - self._start > self.window:
            self._start = now
            self._count = 0
        self._count += 1
        return self._count > self.limit
