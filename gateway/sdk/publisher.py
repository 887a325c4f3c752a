"""The Python publisher: how a backend or worker sends live updates to Herald.

`Publisher` is the transport-free interface (and the one place that knows
what a job-progress message looks like); `HttpPublisher` speaks the HTTP API
of PROTOCOL.md §3. Another transport (a direct Redis publisher) only has to
implement `publish` and `register_job`.

    async with HttpPublisher("http://herald:8080", api_key) as pub:
        await pub.register_job("550e8400", owner="user-123")
        await pub.job_progress("550e8400", "user-123", "processing", 45, stage="inference")

Every failure raises `PublishError` carrying the protocol's error code
(`forbidden`, `message_too_large`, `unavailable`...), so callers branch on
codes, not on transport details. `unavailable` means the outcome is
unknown (the publish may have been applied): retry it with the same
`idempotency_key=` and it is published at most once.

Both publishers start or continue the caller's current OpenTelemetry trace
(when the application configured an SDK): `HttpPublisher` sends it as a W3C
`traceparent` header, `RedisPublisher` puts it in the publication's meta.
Every gateway's delivery of the publication joins that trace.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from gateway.protocol.errors import BrokerUnavailable, ProtocolError
from gateway.telemetry import tracing

if TYPE_CHECKING:
    from gateway.protocol.publication import Publication

__all__ = ["HttpPublisher", "PublishError", "Publisher", "RedisPublisher"]


def _as_bodies(items: Iterable[Mapping[str, Any]]) -> list[Any]:
    """`publish_many` items as the HTTP batch's JSON objects."""
    bodies = []
    for item in items:
        if not isinstance(item, Mapping):
            raise PublishError("bad_request", "each publication must be a mapping")
        bodies.append(item if isinstance(item, dict) else dict(item))
    return bodies


class PublishError(Exception):
    """A publication Herald refused or could not take.

    `code` is one of the protocol's error codes (`bad_request`, `unauthorized`,
    `forbidden`, `not_found`, `message_too_large`, `unavailable`, `internal`...);
    `status` is the HTTP status when there was an HTTP answer, else None.
    """

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class Publisher(abc.ABC):
    """Publish to Herald channels, whatever the transport underneath."""

    @abc.abstractmethod
    async def publish(
        self, channel: str, event: str, data: Any, *, owner: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Publish one event; returns `{"channel", "epoch", "offset"}`.

        `owner` on a `job:` channel records the job's owner if none is
        recorded yet, and is refused (`forbidden`) if another one is.
        `idempotency_key` (PROTOCOL.md, idempotent publishing): a retry with
        the same key publishes nothing new; after `unavailable`, retry with it.
        """

    async def publish_many(
        self, items: Iterable[Mapping[str, Any]]
    ) -> list[dict[str, Any] | PublishError]:
        """Publish many events at once, in order; one result per item, in the items' order.

        Each item is `{"channel", "event", "data", "owner"?, "idempotency_key"?}` as in `publish`.
        An item that fails gets its `PublishError` in its place in the list
        (it is not raised) and the others go on: the caller sees which ones
        to retry. Items on the same channel take offsets in the items' order.
        Concurrent `publish` calls are batched the same way on their own;
        this is the form for a backend that has a list in hand.
        """
        calls = []
        for item in items:
            if not isinstance(item, Mapping):
                raise PublishError("bad_request", "each item must be a mapping")
            calls.append(self.publish(
                item.get("channel"), item.get("event", "message"), item.get("data"),
                owner=item.get("owner"), idempotency_key=item.get("idempotency_key"),
            ))
        # Every call queues its publish before the first one is sent (no call
        # awaits anything earlier), so the batch keeps the items' order.
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, PublishError):
                raise result
        return results  # type: ignore[return-value]

    async def broadcast(
        self, channels: Iterable[str], event: str, data: Any
    ) -> list[dict[str, Any]]:
        """Publish the same event to several channels; one position per channel."""
        return [await self.publish(channel, event, data) for channel in dict.fromkeys(channels)]

    @abc.abstractmethod
    async def register_job(self, job_id: str, owner: str) -> None:
        """Record who owns `job:{job_id}` so the owner may subscribe before any progress."""

    async def job_progress(
        self,
        job_id: str,
        user_id: str,
        status: str,
        progress: float,
        stage: str | None = None,
        message: str | None = None,
        *,
        queue_position: int | None = None,
        eta: float | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Publish a `progress` event on `job:{job_id}` owned by `user_id`.

        A terminal status (`completed`, `failed`, `cancelled`) is also
        delivered to `user:{user_id}` as a `notification` by the server, so a
        user who closed the job's page still hears how it ended.
        `queue_position` (1 = next to start) and `eta` (seconds until the job
        is expected to finish) follow the job-channel convention of
        docs/client.md; they are sent only when given.
        """
        if not isinstance(status, str) or not status:
            raise PublishError("bad_request", "status must be a non-empty string")
        if isinstance(progress, bool) or not isinstance(progress, int | float):
            raise PublishError("bad_request", "progress must be a number")
        if queue_position is not None and (
            isinstance(queue_position, bool) or not isinstance(queue_position, int)
            or queue_position < 1
        ):
            raise PublishError("bad_request", "queue_position must be an integer >= 1")
        if eta is not None and (
            isinstance(eta, bool) or not isinstance(eta, int | float) or not 0 <= eta < 1e9
        ):
            raise PublishError("bad_request", "eta must be a number of seconds >= 0")
        data: dict[str, Any] = {
            "jobId": job_id,
            "status": status,
            "progress": progress,
            "stage": stage,
            "message": message,
        }
        if queue_position is not None:
            data["queue_position"] = queue_position
        if eta is not None:
            data["eta"] = eta
        return await self.publish(
            f"job:{job_id}", "progress", data, owner=user_id, idempotency_key=idempotency_key
        )

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the transport's resources."""

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class HttpPublisher(Publisher):
    """The HTTP API client (`POST /api/v1/publish`, `/broadcast`, `/jobs`).

    Concurrent `publish` calls are batched: those made while a request is
    on its way go out together as one `POST /api/v1/publish` with a
    `publications` list (at most 1000 items or `max_batch_bytes` of JSON),
    one request in flight, so the order of calls is kept. A call alone goes
    as the single form.

    The API key travels in the `Authorization` header, never in the URL.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        max_batch_bytes: int = 512 * 1024,
    ) -> None:
        from gateway.broker.batching import Batcher
        from gateway.core.publishing import MAX_BATCH

        self._base = base_url.rstrip("/")
        self._headers = {
            "Authorization": f"apikey {api_key}",
            "Content-Type": "application/json",
        }
        self._timeout = timeout
        # A client of our own: closing it must not close the loop's shared one.
        self._client = AsyncHTTPClient(force_instance=True)
        self._batcher: Batcher[dict[str, Any]] = Batcher(
            self._send_batch, MAX_BATCH, max_batch_bytes
        )

    async def publish(
        self, channel: str, event: str, data: Any, *, owner: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"channel": channel, "event": event, "data": data}
        if owner is not None:
            body["owner"] = owner
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key  # the body form: batch items carry it too
        if tracing.may_record():
            # Its own request, so the caller's trace context goes with it.
            return await self._post("/api/v1/publish", _encode(body))
        return await self._batcher.submit(_encode(body))

    async def publish_many(
        self, items: Iterable[Mapping[str, Any]]
    ) -> list[dict[str, Any] | PublishError]:
        futures = []
        for body in _as_bodies(items):
            try:
                futures.append(self._batcher.submit(_encode(body)))
            except PublishError as exc:
                futures.append(_done(exc))
        out: list[dict[str, Any] | PublishError] = []
        for fut in futures:
            try:
                out.append(await fut)
            except PublishError as exc:
                out.append(exc)
        return out

    async def broadcast(
        self, channels: Iterable[str], event: str, data: Any
    ) -> list[dict[str, Any]]:
        body = {"channels": list(channels), "event": event, "data": data}
        reply = await self._post("/api/v1/broadcast", _encode(body))
        return list(reply["publications"])

    async def register_job(self, job_id: str, owner: str) -> None:
        await self._post("/api/v1/jobs", _encode({"job": job_id, "owner": owner}))

    async def close(self) -> None:
        await self._batcher.close()
        self._client.close()

    async def _send_batch(self, bodies: list[bytes]) -> list[dict[str, Any] | BaseException]:
        if len(bodies) == 1:
            try:
                return [await self._post("/api/v1/publish", bodies[0])]
            except PublishError as exc:
                return [exc]
        payload = b'{"publications":[' + b",".join(bodies) + b"]}"
        reply = await self._post("/api/v1/publish", payload)
        return [
            r if "error" not in r else PublishError(str(r["error"]), str(r.get("message", "")))
            for r in reply["results"]
        ]

    async def _post(self, path: str, payload: bytes) -> dict[str, Any]:
        headers = dict(self._headers)
        url = self._base + path
        with tracing.client_span("POST", url, headers) as span:
            request = HTTPRequest(
                url, method="POST", headers=headers, body=payload, request_timeout=self._timeout
            )
            try:
                response = await self._client.fetch(request)
            except HTTPClientError as exc:
                span.set_attribute("http.response.status_code", exc.code)
                raise _error_from(exc) from None
            except OSError as exc:
                raise PublishError("unavailable", f"cannot reach Herald: {exc}") from None
            span.set_attribute("http.response.status_code", response.code)
        return orjson.loads(response.body)


def _encode(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError as exc:
        raise PublishError("bad_request", f"data is not JSON-serialisable: {exc}") from None


def _done(exc: BaseException) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut


def _error_from(exc: HTTPClientError) -> PublishError:
    """Turn an HTTP error into the protocol's code, read from Herald's error body."""
    response = exc.response
    if response is None:  # timeout or connection failure (599)
        return PublishError("unavailable", f"cannot reach Herald: {exc.message}")
    try:
        problem = orjson.loads(response.body or b"")
        return PublishError(str(problem["error"]), str(problem["message"]), exc.code)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        code = "internal" if exc.code >= 500 else "bad_request"
        return PublishError(code, f"HTTP {exc.code}: {exc.message}", exc.code)


class RedisPublisher(Publisher):
    """Straight to Redis with the gateways' own Lua script: no HTTP hop.

    For workers that live next to Redis. Validation, size bounds, owner
    checks and terminal-job notifications are the very code the gateway runs
    (`gateway.core.publishing`), so a publication means the same either way.

        async with RedisPublisher("redis://redis:6379/0") as pub:
            await pub.job_progress("550e8400", "user-123", "processing", 45)
    """

    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = "herald:",
        namespaces: str = "",
        max_publish_bytes: int = 262144,
        idempotency_ttl: float = 600.0,
    ) -> None:
        from gateway.broker import redis_engine
        from gateway.protocol.channels import Namespaces

        self._broker = redis_engine(redis_url, prefix=prefix, idempotency_ttl=idempotency_ttl)
        self._namespaces = Namespaces.from_config(namespaces)
        self._max_bytes = max_publish_bytes

    @classmethod
    def from_env(cls) -> RedisPublisher:
        """Configured by the gateway's own `HERALD_*` variables."""
        from gateway.config import Settings

        settings = Settings.from_env()
        if not settings.redis_url:
            raise PublishError("bad_request", "HERALD_REDIS_URL is not set")
        return cls(
            settings.redis_url,
            prefix=settings.redis_prefix,
            namespaces=settings.namespaces,
            max_publish_bytes=settings.max_publish_bytes,
            idempotency_ttl=settings.idempotency_ttl,
        )

    async def publish(
        self, channel: str, event: str, data: Any, *, owner: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        from gateway.core import publishing

        body = {"channel": channel, "event": event, "data": data, "owner": owner,
                "idempotency_key": idempotency_key}
        try:
            req = publishing.PublishRequest.parse(body, self._max_bytes)
            pub = await publishing.publish(self._broker, self._namespaces, req, trace=True)
        except _ENGINE_ERRORS as exc:
            raise _publish_error(exc) from None
        return _position(pub)

    async def publish_many(
        self, items: Iterable[Mapping[str, Any]]
    ) -> list[dict[str, Any] | PublishError]:
        from gateway.core import publishing

        bodies = _as_bodies(items)
        results: list[Any] = []
        for start in range(0, len(bodies), publishing.MAX_BATCH):
            reqs = publishing.parse_batch(bodies[start:start + publishing.MAX_BATCH],
                                          self._max_bytes)
            results += await publishing.publish_many(
                self._broker, self._namespaces, reqs, trace=True
            )
        return [_publish_error(res) if isinstance(res, Exception) else _position(res)
                for res in results]

    async def register_job(self, job_id: str, owner: str) -> None:
        from gateway.protocol.channels import validate_channel

        try:
            await self._broker.register_owner(validate_channel(f"job:{job_id}"), owner)
        except _ENGINE_ERRORS as exc:
            raise _publish_error(exc) from None

    async def close(self) -> None:
        await self._broker.close()


# What the engine side raises that a caller gets as a `PublishError`.
_ENGINE_ERRORS = (ProtocolError, BrokerUnavailable, TypeError)


def _publish_error(exc: ProtocolError | BrokerUnavailable | TypeError) -> PublishError:
    """An engine-side failure (raised, or one of `publish_many`'s results) as
    the `PublishError` callers branch on.

    A plain function in an `except`, not a context manager around the call:
    `publish` is the per-call hot path of auto-batched publishing.
    """
    if isinstance(exc, ProtocolError):
        return PublishError(exc.code, exc.message)
    if isinstance(exc, BrokerUnavailable):
        return PublishError("unavailable", f"redis unavailable: {exc}")
    return PublishError("bad_request", f"data is not JSON-serialisable: {exc}")


def _position(pub: Publication) -> dict[str, Any]:
    """A publication's answer, as the HTTP API gives it (`duplicate` for a repeated key)."""
    reply: dict[str, Any] = {"channel": pub.channel, "epoch": pub.epoch, "offset": pub.offset}
    if pub.duplicate:
        reply["duplicate"] = True
    return reply
