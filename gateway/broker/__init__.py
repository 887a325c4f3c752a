"""Engines behind the `Broker` interface; `create_broker` picks one from settings."""

from __future__ import annotations

from gateway.broker.base import Broker, BrokerUnavailable, History, Publication, Snapshot
from gateway.config import Settings

__all__ = ["Broker", "BrokerUnavailable", "History", "Publication", "Snapshot", "create_broker"]


def create_broker(settings: Settings) -> Broker:
    """The memory engine unless a Redis URL is configured."""
    if settings.redis_url:
        from gateway.broker.redis import RedisBroker

        return RedisBroker(settings.redis_url, prefix=settings.redis_prefix)
    from gateway.broker.memory import MemoryBroker

    return MemoryBroker()
