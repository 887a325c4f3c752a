"""Faults between a gateway and Redis, injected by a real TCP proxy (tests/faultproxy.py).

The network lies in the ways the chaos runs found: it goes silent without
closing (stall), drops connections with a reset, or slows down. Nothing a
client was told it has may be lost, silently or otherwise.
"""

from __future__ import annotations

import socket

import redis.asyncio as aioredis


async def numsub(redis_url: str, channel: str) -> int:
    """How many pub/sub connections Redis itself has for a Herald channel."""
    client = aioredis.from_url(redis_url)
    try:
        [(_, count)] = await client.pubsub_numsub(f"herald:pub:{channel}")
        return int(count)
    finally:
        await client.aclose()


# -- the proxy itself ------------------------------------------------------------


def test_the_proxy_forwards_stalls_heals_and_resets(fault_proxy):
    with socket.create_connection(("127.0.0.1", fault_proxy.port), timeout=5) as s:
        s.sendall(b"PING\r\n")
        assert s.recv(16) == b"+PONG\r\n"
        fault_proxy.stall()
        s.sendall(b"PING\r\n")
        s.settimeout(0.3)
        try:
            got = s.recv(16)
        except TimeoutError:
            got = b""
        assert got == b""  # silence, and the socket is still open
        fault_proxy.heal()
        s.settimeout(5)
        assert s.recv(16) == b"+PONG\r\n"  # what the stall held back, delivered
        assert fault_proxy.reset() == 1
        try:
            data = s.recv(16)
            assert data == b"", data
            reset = False
        except ConnectionResetError:
            reset = True
        assert reset  # an RST, not a clean FIN
    assert fault_proxy.stats.bytes_up == 12 and fault_proxy.stats.bytes_down == 14
    assert fault_proxy.stats.connections == 1 and fault_proxy.stats.resets == 1
