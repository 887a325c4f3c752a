"""Client addresses: `X-Forwarded-For` / `X-Real-IP` believed only from `HERALD_TRUSTED_PROXIES`.

Before, any client could send a random `X-Forwarded-For` with each upgrade
and never meet the per-IP connect limit (400 upgrades: 193 x 429 without the
header, none with it).
"""

from __future__ import annotations

import asyncio
import base64
import os
import random

import pytest
from tornado.httputil import HTTPHeaders

from gateway.config import ConfigError, Settings
from gateway.security.proxies import TrustedProxies

ATTEMPTS = 400
BURST = 100


async def upgrade(port: int, headers: dict[str, str]) -> int:
    """One real WebSocket upgrade request; the HTTP status it got."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /ws HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
            "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        status = await asyncio.wait_for(reader.readline(), 10)
        return int(status.split()[1])
    finally:
        writer.close()


def random_ip() -> str:
    return ".".join(str(random.randint(1, 254)) for _ in range(4))


async def refusals(gw, headers) -> int:
    """How many of ATTEMPTS parallel upgrades got 429; `headers()` makes each one's."""
    gate = asyncio.Semaphore(50)

    async def one() -> int:
        async with gate:
            return await upgrade(gw.port, headers())

    statuses = await asyncio.gather(*(one() for _ in range(ATTEMPTS)))
    assert set(statuses) <= {101, 429}, set(statuses)
    return statuses.count(429)


async def test_a_random_forwarded_for_from_an_untrusted_address_changes_nothing(make_gateway):
    limits = {"ip_connect_rate": 0.01, "ip_connect_burst": BURST}
    plain = await refusals(await make_gateway(**limits), dict)
    spoofed = await refusals(
        await make_gateway(**limits),
        lambda: {"X-Forwarded-For": random_ip(), "X-Real-IP": random_ip()},
    )
    assert plain == spoofed == ATTEMPTS - BURST


async def test_a_trusted_proxy_is_believed_read_from_the_right(make_gateway):
    limits = {"ip_connect_rate": 0.01, "ip_connect_burst": BURST,
              "trusted_proxies": ["127.0.0.0/8"]}
    # Every upgrade forwarded for another client: none is over its own limit.
    assert await refusals(await make_gateway(**limits),
                          lambda: {"X-Forwarded-For": random_ip()}) == 0
    # One client putting a random address in front of what the proxy appended
    # is still one client.
    assert await refusals(
        await make_gateway(**limits),
        lambda: {"X-Forwarded-For": f"{random_ip()}, 203.0.113.9"},
    ) == ATTEMPTS - BURST


def test_client_ip_rules():
    proxies = TrustedProxies(Settings(trusted_proxies=["10.0.0.0/8", "::1"]).trusted_networks)

    def ip(peer: str, **headers: str) -> str:
        return proxies.client_ip(peer, HTTPHeaders({k.replace("_", "-"): v
                                                    for k, v in headers.items()}))

    assert ip("198.51.100.1", X_Forwarded_For="1.2.3.4") == "198.51.100.1"  # not a proxy
    assert ip("10.1.1.1", X_Forwarded_For="1.2.3.4") == "1.2.3.4"
    assert ip("10.1.1.1", X_Forwarded_For="6.6.6.6, 1.2.3.4, 10.2.2.2") == "1.2.3.4"
    assert ip("10.1.1.1", X_Forwarded_For="10.3.3.3, 10.2.2.2") == "10.3.3.3"
    assert ip("10.1.1.1", X_Forwarded_For="1.2.3.4, junk") == "10.1.1.1"
    assert ip("10.1.1.1", X_Real_IP="1.2.3.4") == "1.2.3.4"
    assert ip("10.1.1.1", X_Real_IP="not-an-ip") == "10.1.1.1"
    assert ip("::1", X_Forwarded_For="2001:db8::7") == "2001:db8::7"
    assert TrustedProxies(()).client_ip("10.1.1.1", HTTPHeaders({"X-Real-IP": "1.2.3.4"})) \
        == "10.1.1.1"


def test_a_malformed_cidr_fails_at_start_up():
    with pytest.raises(ConfigError, match="HERALD_TRUSTED_PROXIES"):
        Settings.from_env({"HERALD_TRUSTED_PROXIES": "10.0.0.0/8, 10.0.0/33"})
