"""Engines behind the `Broker` contract (`base.py`); `create_broker` picks one from settings."""

from __future__ import annotations

from gateway.broker.base import Broker
from gateway.config import Settings


def create_broker(settings: Settings) -> Broker:
    """The engine `settings.broker_engine` names (`HERALD_ENGINE`, else by `HERALD_REDIS_URL`)."""
    if settings.broker_engine == "redis":
        from gateway.broker.redis import RedisBroker

        return RedisBroker(settings.redis_url, prefix=settings.redis_prefix)
    from gateway.broker.memory import MemoryBroker

    return MemoryBroker()
