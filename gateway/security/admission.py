"""Who may open a connection: one check for every transport (WebSocket, SSE).

Two moments, both before any work is spent on the client: at the request
(`at_open`: not while draining, and the per-IP attempt rate — the HTTP
upgrade or the SSE request is refused with nothing allocated), and right
after the token is verified (`admit`: the per-user connection cap). The
per-IP table is bounded (least recently seen addresses are forgotten first),
so a flood from spoofed addresses cannot grow it without limit.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.security.ratelimit import TokenBucket

MAX_TRACKED_IPS = 100_000


class Refused(ProtocolError):
    """A connection turned away; `reason` labels `herald_connections_refused_total`."""

    def __init__(self, code: ErrorCode, message: str, reason: str) -> None:
        super().__init__(code, message)
        self.reason = reason


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


class Admission:
    def __init__(self, ip_rate: float, ip_burst: int, user_cap: int) -> None:
        self.ips = IpRateLimiter(ip_rate, ip_burst)
        self.users = UserConnections(user_cap)

    def at_open(self, ip: str, *, draining: bool) -> None:
        """Before the upgrade or the stream: refuse while draining or past the IP's rate."""
        if draining:
            # The load balancer retries elsewhere.
            raise Refused("unavailable", "draining; reconnect to another gateway", "draining")
        if not self.ips.allow(ip):
            raise Refused(
                "rate_limited", "too many connection attempts from this address", "ip_rate"
            )

    def admit(self, user: str) -> None:
        """Count an authenticated connection, or refuse it past the user's cap."""
        if not self.users.add(user):
            raise Refused(
                "rate_limited", f"{user} already has {self.users.cap} connections", "user_cap"
            )

    def release(self, user: str) -> None:
        self.users.remove(user)
