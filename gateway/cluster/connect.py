"""Opening a Redis client from a Herald URL, for the engine and the registry alike.

One place for the URL forms (`redis://`, `rediss://` for TLS, ACL users,
`redis+sentinel://`), timeouts and pool bounds, so the gateway's engine and
the operator reach Redis the same way.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, unquote, urlparse

import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.protocol.errors import BrokerUnavailable

log = logging.getLogger("herald.redis")

COMMAND_TIMEOUT = 5.0
POOL_SIZE = 64


def connect(url: str, timeout: float = COMMAND_TIMEOUT) -> aioredis.Redis:
    """A client for `redis://`, `rediss://` (TLS), or `redis+sentinel://`.

    Sentinel form: `redis+sentinel://[user:password@]host1:port1,host2:port2/<master>[/db]`
    (`?sentinel_password=...` if the sentinels need their own password).
    """
    if url.startswith("redis+sentinel://"):
        from redis.asyncio.sentinel import Sentinel

        parsed = urlparse(url)
        netloc = parsed.netloc.rpartition("@")[2]
        hosts = []
        for item in netloc.split(","):
            host, _, port = item.partition(":")
            hosts.append((host, int(port or 26379)))
        parts = [p for p in parsed.path.split("/") if p]
        if not parts:
            raise ValueError("redis+sentinel:// URL needs the master name as its path")
        query = parse_qs(parsed.query)
        sentinel_kwargs = {}
        if "sentinel_password" in query:
            sentinel_kwargs["password"] = query["sentinel_password"][0]
        sentinel = Sentinel(
            hosts,
            sentinel_kwargs=sentinel_kwargs,
            username=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            db=int(parts[1]) if len(parts) > 1 else 0,
            socket_timeout=timeout,
            protocol=2,
        )
        return sentinel.master_for(parts[0])
    # A bounded pool: a connect storm queues for a connection instead of
    # opening thousands of sockets to Redis.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        protocol=2,  # pub/sub replies as plain arrays, which _read_chunk parses
        max_connections=POOL_SIZE,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return aioredis.Redis(connection_pool=pool)


def unavailable(exc: BaseException) -> BrokerUnavailable:
    """The `BrokerUnavailable` a Redis failure becomes, without Redis's address.

    redis-py's messages name the host and port ("Timeout reading from
    10.0.3.7:6379"); they reach clients and publishers as the `unavailable`
    message, and the internal address is none of their business. The
    detail goes to this process's log instead.
    """
    log.debug("redis call failed: %s", describe(exc))
    if isinstance(exc, RedisTimeoutError | TimeoutError):
        return BrokerUnavailable("redis did not answer in time")
    return BrokerUnavailable("redis is unreachable")


def describe(exc: BaseException) -> str:
    """An error with its causes, for logs: redis-py wraps the reason a TLS
    handshake or a connect failed (`SSLCertVerificationError: certificate
    verify failed...`) in a bare `ConnectionError`."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        text = str(current)
        parts.append(f"{type(current).__name__}: {text}" if text else type(current).__name__)
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)
