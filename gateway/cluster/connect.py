"""Opening a Redis client from a Herald URL, for the engine and the registry alike.

One place for the URL forms (`redis://`, `rediss://` for TLS, ACL users,
`redis+sentinel://`, `redis+cluster://` and `rediss+cluster://`), timeouts
and pool bounds, so the gateway's engines and the operator reach Redis the
same way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.protocol.errors import BrokerUnavailable

log = logging.getLogger("herald.redis")

COMMAND_TIMEOUT = 5.0
POOL_SIZE = 64
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# What a Redis call raises when the link fails. RuntimeError is among them:
# under uvloop, a write to a connection the peer reset ("unable to perform
# operation on <TCPTransport closed=True>") raises it instead of an OSError,
# and redis-py passes it on (after dropping the connection); uncaught it was
# a 500 with a traceback instead of `unavailable`.
LINK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, RuntimeError)


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def connect(url: str, timeout: float = COMMAND_TIMEOUT) -> aioredis.Redis | RedisCluster:
    """A client for `redis://`, `rediss://` (TLS), `redis+sentinel://`, or a cluster URL.

    Sentinel form: `redis+sentinel://[user:password@]host1:port1,host2:port2/<master>[/db]`
    (`?sentinel_password=...` if the sentinels need their own password).
    Cluster form: see `connect_cluster`.
    """
    if is_cluster_url(url):
        return connect_cluster(url, timeout)
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


def connect_cluster(url: str, timeout: float = COMMAND_TIMEOUT) -> RedisCluster:
    """A cluster client for `redis+cluster://[user:pass@]host:port,host:port[/?opts]`.

    `rediss+cluster://` speaks TLS; the query takes redis-py's URL options
    (`ssl_cert_reqs`, `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, ...), as
    `rediss://` does for one Redis. The hosts are seeds: the client learns
    the whole cluster (and every later change) from them. redis-py's cluster
    pools do not block when full, so callers bound their own commands in
    flight (`POOL_SIZE`); the pools leave room above that for health checks.
    """
    parsed = urlparse(url)
    if parsed.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL (scheme {parsed.scheme!r})")
    creds, _, hostlist = parsed.netloc.rpartition("@")
    seeds = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a Redis Cluster URL lists host:port seeds, not {item!r}")
        seeds.append(ClusterNode(unquote(host), int(port)))
    if parsed.path.strip("/"):
        raise ValueError("Redis Cluster has no databases: drop the /<db> path")
    # redis-py's own parser for the credentials and the TLS options.
    single = "rediss://" if parsed.scheme == "rediss+cluster" else "redis://"
    single += f"{creds}@" if creds else ""
    single += f"{seeds[0].host}:{seeds[0].port}"
    single += f"/?{parsed.query}" if parsed.query else ""
    kwargs = parse_url(single)
    for key in ("host", "port", "db", "path"):
        kwargs.pop(key, None)
    if kwargs.pop("connection_class", None) is SSLConnection:
        kwargs["ssl"] = True
    return RedisCluster(
        startup_nodes=seeds,
        protocol=2,  # pub/sub replies as plain arrays, which the engines parse
        max_connections=POOL_SIZE + 8,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        **kwargs,
    )


async def refresh_slots(client: aioredis.Redis | RedisCluster) -> None:
    """Before opening plain pub/sub on a cluster client: a fresh slot map.

    redis-py's cluster pub/sub picks its node from the client's slot map,
    which is empty before first use and stale after a failover; a one-node
    client has nothing to do. (Plain PUBLISH reaches every node of a
    cluster, so any node serves a listener.)
    """
    if isinstance(client, RedisCluster):
        await client.initialize()  # a no-op once initialised
        await client.nodes_manager.initialize()


# How often, and how long each time, `stop` cancels a reader task that runs on.
STOP_ATTEMPTS = 20
STOP_WAIT = 0.25


async def stop(task: asyncio.Task[Any]) -> None:
    """Cancel a task that reads from Redis and wait until it has ended.

    Once is not always enough: a cancellation can be lost inside redis-py's
    read (CI saw a presence events reader go on polling after `cancel()`,
    and `close()` wait on it until the test timed out). So it is cancelled
    again while it runs, `STOP_ATTEMPTS` times at most, and then left
    behind with a warning rather than waited for forever. Whatever it
    raised on the way out (a link error) is logged, not raised: it is
    stopping.
    """
    for _ in range(STOP_ATTEMPTS):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_WAIT)
    if not task.done():
        log.warning("task %s did not stop after %d cancellations", task.get_name(), STOP_ATTEMPTS)
    elif not task.cancelled() and task.exception() is not None:
        log.debug("task %s ended with %r while stopping", task.get_name(), task.exception())
