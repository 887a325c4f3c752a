"""OpenTelemetry traces, configured only by the standard `OTEL_*` variables.

One trace follows a publication from the HTTP publish (or a Python
publisher) through the engine to the delivery on every gateway. The
publisher's span context travels as a W3C `traceparent` in the
publication's `meta`, which both engines store and fan out with it, so a
gateway that receives the publication from Redis continues the same trace.

Tracing is on only when `OTEL_TRACES_EXPORTER` names an exporter or an
OTLP endpoint is given (`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`). Otherwise
`setup` installs nothing: no SDK provider, no exporter, no thread, and the
hot paths test the module-level `enabled` flag before building anything.

The publishers (`gateway.sdk.publisher`) run in the caller's process and use
the OpenTelemetry API whatever `enabled` says: they continue the caller's
current trace when the application configured an SDK, and cost next to
nothing (a non-recording span, nothing injected) when it did not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config import ConfigError

if TYPE_CHECKING:
    from gateway.protocol.publication import Publication

log = logging.getLogger("herald.tracing")

# The hot paths read this before doing any tracing work at all.
enabled = False

TRACER_NAME = "herald"
_tracer = trace.get_tracer(TRACER_NAME)
# Publications always carry W3C trace context (whatever OTEL_PROPAGATORS
# says for HTTP): it is part of the stored record every gateway reads.
_w3c = TraceContextTextMapPropagator()
_provider: Any = None

EXPORTERS = ("otlp", "console", "none")
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
            "parentbased_always_off", "parentbased_traceidratio")
OTLP_PROTOCOL = "http/protobuf"

T = TypeVar("T")


# -- configuration --------------------------------------------------------


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the `OTEL_*` variables ask for traces at all.

    The OpenTelemetry default exporter is `otlp`, but a gateway started with
    no `OTEL_*` variable must not try to send spans to a collector nobody
    runs: it takes an exporter name or an endpoint to turn tracing on.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = env.get("OTEL_TRACES_EXPORTER")
    if names is not None and names.strip():
        return any(n.strip().lower() not in ("", "none") for n in names.split(","))
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    names = [n for n in names if n and n != "none"] or ["otlp"]
    unknown = sorted(set(names) - set(EXPORTERS))
    if unknown:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER: unsupported exporter {', '.join(unknown)} "
            f"(supported: {', '.join(EXPORTERS)})"
        )
    if "otlp" in names:
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or OTLP_PROTOCOL
        ).strip()
        if protocol != OTLP_PROTOCOL:
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported "
                f"(only {OTLP_PROTOCOL}, port 4318)"
            )
    return names


def _check_sampler(env: Mapping[str, str]) -> None:
    """Refuse what the SDK would only warn about: a typo'd 1% sampler must not trace 100%."""
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return
    if name not in SAMPLERS:
        raise ConfigError(
            f"OTEL_TRACES_SAMPLER: unknown sampler {name!r} (supported: {', '.join(SAMPLERS)})"
        )
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if name.endswith("traceidratio") and arg:
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: {arg!r} is not a ratio between 0 and 1")


def setup(node_id: str, env: Mapping[str, str] | None = None) -> bool:
    """Install the SDK provider and exporters the `OTEL_*` variables ask for.

    Returns whether tracing is on. Raises `ConfigError` (one clear line) for
    an exporter or protocol this build cannot serve. The sampler
    (`OTEL_TRACES_SAMPLER[_ARG]`), batching (`OTEL_BSP_*`), resource
    (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) and OTLP details
    (`OTEL_EXPORTER_OTLP_*`: endpoint, headers, timeout, compression) are
    read by the SDK itself from the process environment, so they mean exactly
    what its documentation says; `env` only decides whether and what to export.
    """
    global enabled, _provider
    env = os.environ if env is None else env
    if not wanted(env):
        return False
    names = _exporter_names(env)
    _check_sampler(env)

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    detected = Resource.create()
    defaults: dict[str, str] = {}
    if str(detected.attributes.get("service.name", "")).startswith("unknown_service"):
        defaults["service.name"] = "herald"
    # The SDK makes up a UUID; the node id is the name operators see everywhere else.
    if "service.instance.id" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        defaults["service.instance.id"] = node_id
    provider = TracerProvider(resource=detected.merge(Resource(defaults)))
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    enabled = True
    log.info(
        "tracing on: exporters %s, sampler %s",
        ",".join(names),
        provider.sampler.get_description(),
    )
    return True


def shutdown() -> None:
    """Flush the spans still batched and stop the exporters (on exit)."""
    global enabled, _provider
    if _provider is not None:
        _provider.shutdown()
    _provider = None
    enabled = False


# -- trace context in publications -------------------------------------------


def may_record() -> bool:
    """Whether a publisher's span could mean anything: an SDK is installed, or
    the caller is inside a trace whose context a publication should carry.

    With neither, a producer span is a non-recording no-op that still costs a
    context switch and a propagator call per publish (a third of a batched
    publish's CPU), so the publishers skip it.
    """
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return True
    return trace.get_current_span().get_span_context().is_valid


def inject_meta(meta: dict[str, str] | None) -> dict[str, str]:
    """`meta` plus the current span's `traceparent` (and `tracestate`), when there is one."""
    carrier = dict(meta or {})
    _w3c.inject(carrier)
    return carrier


def context_from_meta(meta: Mapping[str, str]) -> otel_context.Context | None:
    """The publisher's span context carried by a publication, if any."""
    if "traceparent" not in meta:
        return None
    return _w3c.extract(meta)


# -- the spans ----------------------------------------------------------------


@contextlib.contextmanager
def producer_span(channel: str, event: str) -> Iterator[Span]:
    """The engine publish: its context is what the publication carries to every gateway."""
    with _tracer.start_as_current_span(
        "herald.publish",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "herald",
            "messaging.operation.type": "send",
            "messaging.destination.name": channel,
            "herald.event": event,
        },
    ) as span:
        yield span


def published(span: Span, pub: Publication) -> None:
    """Name the publication a producer span made (its place in the channel)."""
    if span.is_recording():
        span.set_attribute("messaging.message.id", f"{pub.epoch}:{pub.offset}")
        span.set_attribute("herald.offset", pub.offset)


def deliver(pub: Publication, dispatch: Callable[[Publication], int]) -> int:
    """Run the local fan-out of one publication inside a delivery span.

    One span per publication per gateway (not per connection), a child of
    the publisher's span when the publication carries a `traceparent`.
    """
    arrived = time.time()
    with _tracer.start_as_current_span(
        "herald.deliver", context=context_from_meta(pub.meta), kind=SpanKind.CONSUMER
    ) as span:
        recipients = dispatch(pub)
        # Attributes only for sampled spans: at 1% the other 99% build nothing.
        if span.is_recording():
            span.set_attributes(
                {
                    "messaging.system": "herald",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": pub.channel,
                    "messaging.message.id": f"{pub.epoch}:{pub.offset}",
                    "herald.event": pub.event,
                    "herald.offset": pub.offset,
                    "herald.queue_delay_ms": round(max(0.0, arrived - pub.time) * 1000, 3),
                    "herald.recipients": recipients,
                }
            )
        return recipients


@contextlib.contextmanager
def subscribe_span(channel: str, transport: str, since: bool) -> Iterator[Span]:
    """A subscribe, with the recovery outcome set by `recovery` inside it."""
    with _tracer.start_as_current_span(
        "herald.subscribe",
        attributes={
            "messaging.destination.name": channel,
            "herald.transport": transport,
            "herald.recovery.requested": since,
        },
    ) as span:
        yield span


def recovery(recovered: bool, size: int) -> None:
    """Record on the current (subscribe) span whether `since` resolved, and how much it replays."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("herald.recovered", recovered)
        span.set_attribute("herald.recovery.size", size)


async def auth_span(verify: Awaitable[T], transport: str, client: str) -> T:
    """A connection's token check, as its own span (once per connection or refresh)."""
    if not enabled:
        return await verify
    with _tracer.start_as_current_span(
        "herald.auth", attributes={"herald.transport": transport, "herald.client": client}
    ) as span:
        try:
            return await verify
        except Exception as exc:
            span.set_attribute("error.type", getattr(exc, "code", type(exc).__name__))
            raise


def start_server_span(method: str, route: str, headers: Mapping[str, str]) -> Span:
    """An HTTP server span continuing the caller's `traceparent` (any OTEL_PROPAGATORS)."""
    return _tracer.start_span(
        f"{method} {route}",
        context=propagate.extract(headers),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "http.route": route},
    )


def end_server_span(span: Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


@contextlib.contextmanager
def client_span(method: str, url: str, headers: dict[str, str]) -> Iterator[Span]:
    """An HTTP client span whose context goes out in `headers` (the Python publisher)."""
    with _tracer.start_as_current_span(
        f"{method}",
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": method, "url.full": url},
    ) as span:
        propagate.inject(headers)
        yield span


def attach(span: Span) -> object:
    """Make `span` current until `detach` (for spans that outlive one `with` block)."""
    return otel_context.attach(trace.set_span_in_context(span))


def detach(token: object) -> None:
    otel_context.detach(token)  # type: ignore[arg-type]


# -- logs -----------------------------------------------------------------------


class TraceLogFilter(logging.Filter):
    """Put the current span's trace and span ids on every record (for JsonFormatter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = trace.format_trace_id(ctx.trace_id)
            record.span_id = trace.format_span_id(ctx.span_id)
        return True
