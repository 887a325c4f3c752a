"""Which client address to believe: the socket's, unless a trusted proxy vouches for another.

`X-Forwarded-For` and `X-Real-IP` are only words a client sends; believed
from anyone, one header bypasses every per-IP limit. They are believed only
when the connection comes from an address in `HERALD_TRUSTED_PROXIES` (an
ingress controller, a load balancer), and then `X-Forwarded-For` is read
from the right, skipping the trusted hops, so a client cannot put a chosen
address in front of what its proxy appended. Empty (the default) trusts no
one: the socket's peer address is the client's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from tornado.httputil import HTTPHeaders, HTTPServerRequest

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


class TrustedProxies:
    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)

    def trusts(self, address: str) -> bool:
        ip = _ip(address)
        return ip is not None and any(ip in net for net in self.networks)

    def client_ip(self, peer: str, headers: HTTPHeaders) -> str:
        """The client's address: `peer` itself unless `peer` is a trusted proxy."""
        if not self.networks or not self.trusts(peer):
            return peer
        forwarded = headers.get("X-Forwarded-For")
        if forwarded:
            hops = [hop.strip() for hop in forwarded.split(",")]
            for hop in reversed(hops):
                if _ip(hop) is None:
                    return peer  # a malformed chain: believe none of it
                if not self.trusts(hop):
                    return hop
            return hops[0]  # every hop is one of ours: the first is the client
        real = headers.get("X-Real-IP")
        if real and _ip(real) is not None:
            return real.strip()
        return peer

    def apply(self, request: HTTPServerRequest) -> None:
        """Set `remote_ip` (and `protocol`, from `X-Forwarded-Proto`) before any handler runs."""
        peer = request.remote_ip or ""
        if not self.networks or not self.trusts(peer):
            return
        request.remote_ip = self.client_ip(peer, request.headers)
        proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
        if proto in ("http", "https"):
            request.protocol = proto
