"""The publish rules shared by every way in: HTTP API, node, direct publisher.

Validation, size bounds and the terminal-job notification live here once, so
a publication means the same whether it came over HTTP or straight from a
worker next to Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.broker.base import Broker
from gateway.protocol.channels import Access, Namespaces, validate_channel
from gateway.protocol.errors import ProtocolError
from gateway.protocol.publication import TERMINAL_JOB_EVENTS, Publication
from gateway.telemetry import tracing

EVENT_MAX = 64


@dataclass(frozen=True, slots=True)
class PublishRequest:
    channel: str
    event: str
    data: Any
    owner: str | None = None

    @classmethod
    def parse(cls, body: Any, max_bytes: int) -> PublishRequest:
        if not isinstance(body, dict):
            raise ProtocolError("bad_request", "body must be a JSON object")
        channel = validate_channel(body.get("channel"))
        return cls(
            channel,
            parse_event(body.get("event", "message")),
            check_data(body.get("data"), max_bytes),
            parse_owner(body.get("owner")),
        )


def parse_event(event: Any) -> str:
    if not isinstance(event, str) or not event or len(event) > EVENT_MAX:
        raise ProtocolError("bad_request", f"event must be a string of 1-{EVENT_MAX} characters")
    return event


def parse_owner(owner: Any) -> str | None:
    if owner is None:
        return None
    if not isinstance(owner, str) or not owner:
        raise ProtocolError("bad_request", "owner must be a non-empty string")
    return owner


def check_data(data: Any, max_bytes: int) -> Any:
    size = len(orjson.dumps(data))
    if size > max_bytes:
        raise ProtocolError("message_too_large", f"data is {size} bytes; the limit is {max_bytes}")
    return data


def job_status(event: str, data: Any) -> str | None:
    """The terminal status a job publication announces, if any."""
    if event in TERMINAL_JOB_EVENTS:
        return event
    status = data.get("status") if isinstance(data, dict) else None
    return status if status in TERMINAL_JOB_EVENTS else None


async def publish(
    broker: Broker,
    namespaces: Namespaces,
    req: PublishRequest,
    meta: dict[str, str] | None = None,
    *,
    trace: bool = False,
) -> Publication:
    """Publish one request; a terminal job event also notifies `user:{owner}`.

    With `trace`, the publish is a producer span (a child of the caller's
    current span) whose W3C `traceparent` goes into `meta`, so every
    gateway's delivery joins the same trace.
    """
    if not trace:
        return await _publish(broker, namespaces, req, meta)
    with tracing.producer_span(req.channel, req.event) as span:
        pub = await _publish(broker, namespaces, req, tracing.inject_meta(meta))
        tracing.published(span, pub)
        return pub


async def _publish(
    broker: Broker,
    namespaces: Namespaces,
    req: PublishRequest,
    meta: dict[str, str] | None,
) -> Publication:
    namespace = namespaces.of(req.channel)
    if req.owner is not None and namespace.access is not Access.OWNER:
        # Recorded anyway, it would make a later publish with another owner `forbidden`.
        raise ProtocolError("bad_request", f"owner applies to job channels, not {req.channel}")
    pub = await broker.publish(
        namespace, req.channel, req.event, req.data, owner=req.owner, meta=meta
    )
    if req.channel.startswith("job:"):
        status = job_status(req.event, req.data)
        if status is not None:
            owner = req.owner or await broker.owner(req.channel)
            if owner is not None:
                await notify_owner(broker, namespaces, owner, req, status, pub, meta)
    return pub


async def notify_owner(
    broker: Broker,
    namespaces: Namespaces,
    owner: str,
    req: PublishRequest,
    status: str,
    pub: Publication,
    meta: dict[str, str] | None,
) -> None:
    channel = f"user:{owner}"
    job_id = req.channel.partition(":")[2]
    message = req.data.get("message") if isinstance(req.data, dict) else None
    data = {
        "kind": "job",
        "jobId": job_id,
        "channel": req.channel,
        "status": status,
        "message": message,
        "offset": pub.offset,
    }
    await broker.publish(namespaces.of(channel), channel, "notification", data, meta=meta)
