"""Who may open a connection: per-IP attempt rate and per-user connection cap.

Both are checked before any work is spent on a connection: the IP rate at
the HTTP upgrade (429, nothing allocated), the user cap right after the
token is verified. The per-IP table is bounded (least recently seen IPs are
forgotten first), so a spoofed-address flood cannot grow it without limit.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from gateway.security.ratelimit import TokenBucket

MAX_TRACKED_IPS = 100_000


class IpRateLimiter:
    def __init__(self, rate: float, burst: int, max_ips: int = MAX_TRACKED_IPS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_ips = max_ips
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, ip: str) -> bool:
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(ip)
        if bucket is None:
            bucket = self._buckets[ip] = TokenBucket(self.rate, self.burst)
            if len(self._buckets) > self.max_ips:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(ip)
        return bucket.take()


class UserConnections:
    """Open connections per user (`sub`), against a cap (0 = no cap)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._counts: Counter[str] = Counter()

    def add(self, user: str) -> bool:
        if self.cap and self._counts[user] >= self.cap:
            return False
        self._counts[user] += 1
        return True

    def remove(self, user: str) -> None:
        self._counts[user] -= 1
        if self._counts[user] <= 0:
            del self._counts[user]

    def count(self, user: str) -> int:
        return self._counts.get(user, 0)
