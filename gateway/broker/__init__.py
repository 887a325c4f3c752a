"""Engines behind the `Broker` contract (`base.py`); `create_broker` picks one from settings."""

from __future__ import annotations

from gateway.broker.base import Broker
from gateway.broker.presence import MemoryPresence, Presence
from gateway.cluster.connect import is_cluster_url
from gateway.config import Settings, state_dir


def create_broker(settings: Settings) -> Broker:
    """The engine `settings.broker_engine` names (`HERALD_ENGINE`, else by `HERALD_REDIS_URL`)."""
    if settings.broker_engine == "redis":
        return redis_engine(
            settings.redis_url,
            prefix=settings.redis_prefix,
            timeout=settings.redis_timeout,
            stall_seconds=settings.redis_stall_seconds,
            audit_seconds=settings.redis_audit_seconds,
            idempotency_ttl=settings.idempotency_ttl,
        )
    if settings.broker_engine == "durable":
        from gateway.broker.durable import DurableBroker
        from gateway.broker.store import STORE_FILE

        return DurableBroker(state_dir(settings) / STORE_FILE, synchronous=settings.durable_sync,
                             idempotency_ttl=settings.idempotency_ttl)
    from gateway.broker.memory import MemoryBroker

    return MemoryBroker(idempotency_ttl=settings.idempotency_ttl)


def redis_engine(url: str, *, prefix: str = "herald:", **options: float) -> Broker:
    """The Redis engine for a URL: Redis Cluster for `redis+cluster://` (or
    `rediss+cluster://`), else one Redis (plain, TLS or Sentinel).

    `options`: timeout, stall_seconds, audit_seconds, idempotency_ttl. The
    cluster engine takes stall_seconds (for each shard's link) and
    idempotency_ttl; it checks every master's health itself instead of an audit.
    """
    if is_cluster_url(url):
        from gateway.broker.redis_cluster import RedisClusterBroker

        wanted = ("stall_seconds", "idempotency_ttl")
        return RedisClusterBroker(url, prefix=prefix,
                                  **{k: v for k, v in options.items() if k in wanted})
    from gateway.broker.redis import RedisBroker

    return RedisBroker(url, prefix=prefix, **options)


def create_presence(settings: Settings) -> Presence:
    """The presence store beside the engine: Redis when the engine is, else in-process."""
    if settings.broker_engine == "redis":
        from gateway.broker.redis_presence import RedisPresence
        from gateway.cluster.connect import connect

        return RedisPresence(
            connect(settings.redis_url), prefix=settings.redis_prefix, ttl=settings.presence_ttl
        )
    return MemoryPresence()
