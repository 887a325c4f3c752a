"""Engines behind the `Broker` contract (`base.py`); `create_broker` picks one from settings."""

from __future__ import annotations

from gateway.broker.base import Broker
from gateway.broker.presence import MemoryPresence, Presence
from gateway.config import Settings


def create_broker(settings: Settings) -> Broker:
    """The engine `settings.broker_engine` names (`HERALD_ENGINE`, else by `HERALD_REDIS_URL`)."""
    if settings.broker_engine == "redis":
        from gateway.broker.redis import RedisBroker

        return RedisBroker(
            settings.redis_url,
            prefix=settings.redis_prefix,
            timeout=settings.redis_timeout,
            stall_seconds=settings.redis_stall_seconds,
            audit_seconds=settings.redis_audit_seconds,
            idempotency_ttl=settings.idempotency_ttl,
        )
    from gateway.broker.memory import MemoryBroker

    return MemoryBroker(idempotency_ttl=settings.idempotency_ttl)


def create_presence(settings: Settings) -> Presence:
    """The presence store beside the engine: Redis when the engine is, else in-process."""
    if settings.broker_engine == "redis":
        from gateway.broker.redis_presence import RedisPresence
        from gateway.cluster.connect import connect

        return RedisPresence(
            connect(settings.redis_url), prefix=settings.redis_prefix, ttl=settings.presence_ttl
        )
    return MemoryPresence()
