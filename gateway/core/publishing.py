"""The publish rules shared by every way in: HTTP API, node, direct publisher.

Validation, size bounds and the terminal-job notification live here once, so
a publication means the same whether it came over HTTP or straight from a
worker next to Redis.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.broker.base import Broker, PublishItem
from gateway.protocol.channels import Access, Namespaces, validate_channel
from gateway.protocol.errors import BrokerUnavailable, ProtocolError
from gateway.protocol.publication import TERMINAL_JOB_EVENTS, Publication
from gateway.telemetry import tracing

EVENT_MAX = 64
# Publications in one batch (`POST /api/v1/publish` with `publications`, `publish_many`).
MAX_BATCH = 1000
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


@dataclass(frozen=True, slots=True)
class PublishRequest:
    channel: str
    event: str
    data: Any
    owner: str | None = None
    # A retry with the same key within the dedupe window publishes nothing
    # and answers the original position (PROTOCOL.md, idempotent publishing).
    idempotency_key: str | None = None

    @classmethod
    def parse(cls, body: Any, max_bytes: int, idempotency_key: str | None = None) -> PublishRequest:
        """A request from a JSON body; `idempotency_key` is the header's, if any.

        The key may come as the `Idempotency-Key` header or the body field
        `idempotency_key`; both at once must agree.
        """
        if not isinstance(body, dict):
            raise ProtocolError("bad_request", "body must be a JSON object")
        channel = validate_channel(body.get("channel"))
        key = parse_idempotency_key(body.get("idempotency_key"))
        header = parse_idempotency_key(idempotency_key)
        if key is not None and header is not None and key != header:
            raise ProtocolError("bad_request", "Idempotency-Key and idempotency_key differ")
        return cls(
            channel,
            parse_event(body.get("event", "message")),
            check_data(body.get("data"), max_bytes),
            parse_owner(body.get("owner")),
            key or header,
        )


def parse_idempotency_key(key: Any) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not IDEMPOTENCY_KEY.fullmatch(key):
        raise ProtocolError(
            "bad_request", "idempotency key must be 1-128 characters of A-Z a-z 0-9 _ . : -"
        )
    return key


def parse_batch(
    items: Any, max_bytes: int
) -> list[PublishRequest | ProtocolError]:
    """A batch's items, each parsed by the single-publish rules or its own error."""
    if not isinstance(items, list) or not items or len(items) > MAX_BATCH:
        raise ProtocolError("bad_request", f"publications must be a list of 1-{MAX_BATCH}")
    parsed: list[PublishRequest | ProtocolError] = []
    for item in items:
        try:
            parsed.append(PublishRequest.parse(item, max_bytes))
        except ProtocolError as exc:
            parsed.append(exc)
        except TypeError as exc:  # data orjson cannot encode (Python callers)
            parsed.append(ProtocolError("bad_request", f"data is not JSON-serialisable: {exc}"))
    return parsed


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
    if not trace or not tracing.may_record():
        return await _publish(broker, namespaces, req, meta)
    with tracing.producer_span(req.channel, req.event) as span:
        pub = await _publish(broker, namespaces, req, tracing.inject_meta(meta))
        tracing.published(span, pub)
        return pub


async def publish_many(
    broker: Broker,
    namespaces: Namespaces,
    reqs: Sequence[PublishRequest | ProtocolError],
    meta: dict[str, str] | None = None,
    *,
    trace: bool = False,
) -> list[Publication | ProtocolError | BrokerUnavailable]:
    """Publish a batch with one engine call; one result per request, in order.

    `reqs` may hold the errors `parse_batch` found: they stay in their place.
    A request that fails (`bad_request` owner rule, `forbidden`, outcome
    unknown) gets its error in its place; the others are published. Requests
    on one channel take offsets in the requests' order.
    """
    if trace and tracing.may_record():
        # A producer span per publication, each queued in this same loop
        # turn (no await before the engine call), so the engine still sends
        # them as one batch in this order.
        calls = [_failed(req) if isinstance(req, ProtocolError)
                 else publish(broker, namespaces, req, meta, trace=True) for req in reqs]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        return [_outcome(o) for o in outcomes]
    results: list[Any] = [None] * len(reqs)
    items: list[PublishItem] = []
    where: list[int] = []
    for i, req in enumerate(reqs):
        if isinstance(req, ProtocolError):
            results[i] = req
            continue
        try:
            items.append(_item(namespaces, req, meta))
            where.append(i)
        except ProtocolError as exc:
            results[i] = exc
    for i, result in zip(where, await broker.publish_many(items), strict=True):
        results[i] = result
    # Terminal job events notify their owners (few in a batch): after the
    # batch, as a single publish does after its own.
    notes = [
        (i, _notify_if_terminal(broker, namespaces, req, result, meta))
        for i, (req, result) in enumerate(zip(reqs, results, strict=True))
        if isinstance(result, Publication)
        and isinstance(req, PublishRequest)
        and req.channel.startswith("job:")
        and job_status(req.event, req.data) is not None
    ]
    if notes:
        outcomes = await asyncio.gather(*(n for _, n in notes), return_exceptions=True)
        for (i, _), outcome in zip(notes, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                results[i] = _outcome(outcome)
    return results


async def _failed(exc: ProtocolError) -> ProtocolError:
    return exc


def _outcome(result: Any) -> Publication | ProtocolError | BrokerUnavailable:
    if isinstance(result, Publication | ProtocolError | BrokerUnavailable):
        return result
    raise result


def _item(
    namespaces: Namespaces, req: PublishRequest, meta: dict[str, str] | None
) -> PublishItem:
    namespace = namespaces.of(req.channel)
    if req.owner is not None and namespace.access is not Access.OWNER:
        # Recorded anyway, it would make a later publish with another owner `forbidden`.
        raise ProtocolError("bad_request", f"owner applies to job channels, not {req.channel}")
    return PublishItem(
        namespace, req.channel, req.event, req.data, req.owner, meta, req.idempotency_key
    )


async def _publish(
    broker: Broker,
    namespaces: Namespaces,
    req: PublishRequest,
    meta: dict[str, str] | None,
) -> Publication:
    it = _item(namespaces, req, meta)
    pub = await broker.publish(
        it.namespace, it.channel, it.event, it.data, owner=it.owner, meta=it.meta,
        idempotency_key=it.idempotency_key,
    )
    # A duplicate still notifies: the first attempt may have failed between
    # the two publishes, and the notification's own key makes it exactly once.
    if req.channel.startswith("job:"):
        await _notify_if_terminal(broker, namespaces, req, pub, meta)
    return pub


async def _notify_if_terminal(
    broker: Broker,
    namespaces: Namespaces,
    req: PublishRequest,
    pub: Publication,
    meta: dict[str, str] | None,
) -> None:
    status = job_status(req.event, req.data)
    if status is not None:
        owner = req.owner or await broker.owner(req.channel)
        if owner is not None:
            await notify_owner(broker, namespaces, owner, req, status, pub, meta)


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
    key = f"{req.idempotency_key}:notify" if req.idempotency_key else None
    await broker.publish(
        namespaces.of(channel), channel, "notification", data, meta=meta, idempotency_key=key
    )
