"""End-to-end OpenTelemetry traces across real gateway processes and a real OTLP receiver.

The gateways are `herald serve` subprocesses sharing one real redis-server,
configured only by the standard `OTEL_*` variables; their OTLP/HTTP
exporter posts protobuf to `tests.otlp_receiver` on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from gateway.broker.redis import RedisBroker
from gateway.protocol.channels import Namespaces
from gateway.telemetry import tracing
from tests.conftest import API_KEY, api_headers, gateway_env, token
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support import http
from tests.test_cluster import connect, wait_until

DEFAULT_OTLP_PORT = 4318  # where an exporter left at the OpenTelemetry defaults would send


@pytest.fixture(autouse=True)
def no_inherited_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test passes reaches a gateway: gateway_env() keeps OTEL_* of this process."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    rx = OtlpReceiver()
    rx.start()
    yield rx
    rx.stop()


def otel_env(rx: OtlpReceiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": "herald-test",
        **extra,
    }


def new_traceparent() -> tuple[str, str, str]:
    """(header, trace id, parent span id) of a caller's sampled span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def publish(gw: Any, channel: str, traceparent: str | None) -> dict[str, Any]:
    headers = api_headers()
    if traceparent is not None:
        headers["traceparent"] = traceparent
    status, body = await http(
        gw, "POST", "/api/v1/publish", {"channel": channel, "event": "hello", "data": {"n": 1}},
        headers,
    )
    assert status == 200, body
    return body


def only(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [(s.name, s.resource.get("service.instance.id")) for s in spans]
    return found[0]


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            if isinstance(entry, dict):
                lines.append(entry)
    return lines


def access_log(text: str, path: str) -> dict[str, Any]:
    found = [
        e for e in json_lines(text) if e["logger"] == "tornado.access" and path in e["message"]
    ]
    assert len(found) == 1, text
    return found[0]


async def test_one_http_publish_is_one_trace_through_two_gateway_processes(
    redis_url: str, spawn_gateway: Any, receiver: OtlpReceiver
) -> None:
    env = otel_env(receiver)
    gw_a = spawn_gateway("gw-a", HERALD_REDIS_URL=redis_url, **env)
    gw_b = spawn_gateway("gw-b", HERALD_REDIS_URL=redis_url, **env)
    clients = [await connect(gw_a, "u1"), await connect(gw_b, "u1"), await connect(gw_b, "u1")]

    header, trace_id, caller_span = new_traceparent()
    pos = await publish(gw_a, "user:u1", header)
    for client in clients:
        msg = await client.expect("message")
        assert msg["offset"] == pos["offset"]

    async def all_four() -> bool:
        return len(receiver.in_trace(trace_id)) >= 4

    await wait_until(all_four)
    spans = receiver.in_trace(trace_id)
    assert sorted(s.name for s in spans) == [
        "POST /api/v1/publish", "herald.deliver", "herald.deliver", "herald.publish"
    ]
    server = only(spans, "POST /api/v1/publish")
    engine = only(spans, "herald.publish")
    deliveries = {s.resource["service.instance.id"]: s for s in spans if s.name == "herald.deliver"}

    # The caller's traceparent -> HTTP server span -> engine publish -> one delivery per gateway.
    assert (server.kind, server.parent_span_id) == ("server", caller_span)
    assert server.resource["service.instance.id"] == "gw-a"
    assert server.attributes["http.response.status_code"] == 200
    assert (engine.kind, engine.parent_span_id) == ("producer", server.span_id)
    assert engine.attributes["messaging.destination.name"] == "user:u1"
    assert engine.attributes["herald.offset"] == pos["offset"]
    assert set(deliveries) == {"gw-a", "gw-b"}
    for node, recipients in (("gw-a", 1), ("gw-b", 2)):
        span = deliveries[node]
        assert (span.kind, span.parent_span_id) == ("consumer", engine.span_id)
        assert span.attributes["herald.recipients"] == recipients
        assert span.attributes["herald.queue_delay_ms"] >= 0
        assert span.attributes["messaging.message.id"] == f"{pos['epoch']}:{pos['offset']}"
        assert span.resource["service.name"] == "herald-test"

    # What carried the trace between processes: the stored publication's meta.
    broker = RedisBroker(redis_url)
    try:
        history = await broker.history(Namespaces.from_config("").of("user:u1"), "user:u1", 0, 10)
    finally:
        await broker.close()
    meta = history.publications[-1].meta
    assert meta["traceparent"] == f"00-{trace_id}-{engine.span_id}-01"

    # Connect/auth and subscribe spans, with the recovery a `since` asks for.
    assert len(receiver.named("herald.auth")) >= 3
    late = await connect(gw_b, "u2", channels=["user:u1"])
    reply = await late.request(
        {"type": "subscribe", "channel": "user:u1", "id": 7,
         "since": {"epoch": pos["epoch"], "offset": pos["offset"] - 1}}
    )
    assert reply["recovered"] is True
    assert (await late.expect("message"))["offset"] == pos["offset"]

    def recovering() -> list[ReceivedSpan]:
        return [s for s in receiver.named("herald.subscribe")
                if s.attributes.get("herald.recovery.requested")]

    async def recovery_span() -> bool:
        return bool(recovering())

    await wait_until(recovery_span)
    [sub] = recovering()
    assert sub.attributes["messaging.destination.name"] == "user:u1"
    assert sub.attributes["herald.recovered"] is True
    assert sub.attributes["herald.recovery.size"] == 1
    assert sub.resource["service.instance.id"] == "gw-b"


PUBLISHER_SCRIPT = """
import asyncio, os, sys
from opentelemetry import trace
from gateway.telemetry import tracing
from gateway.sdk.publisher import HttpPublisher, RedisPublisher

async def main():
    tracing.setup("worker")
    tracer = trace.get_tracer("worker")
    async with RedisPublisher(os.environ["REDIS"]) as pub:
        with tracer.start_as_current_span("worker.redis"):
            await pub.publish("user:u1", "via-redis", {})
    async with HttpPublisher(os.environ["GATEWAY"], os.environ["KEY"]) as pub:
        with tracer.start_as_current_span("worker.http"):
            await pub.publish("user:u1", "via-http", {})
    tracing.shutdown()

asyncio.run(main())
"""


async def test_the_python_publishers_continue_the_callers_trace(
    redis_url: str, spawn_gateway: Any, receiver: OtlpReceiver
) -> None:
    gw = spawn_gateway("gw-p", HERALD_REDIS_URL=redis_url, **otel_env(receiver))
    client = await connect(gw, "u1")
    env = {**gateway_env(), **otel_env(receiver, OTEL_SERVICE_NAME="worker"),
           "REDIS": redis_url, "GATEWAY": gw.url, "KEY": API_KEY}
    worker = await asyncio.create_subprocess_exec(sys.executable, "-c", PUBLISHER_SCRIPT, env=env)
    assert await worker.wait() == 0
    assert (await client.expect("message"))["event"] == "via-redis"
    assert (await client.expect("message"))["event"] == "via-http"

    def trace_of(root: str) -> list[ReceivedSpan]:
        [caller] = receiver.named(root)
        return receiver.in_trace(caller.trace_id)

    async def both_delivered() -> bool:
        roots = ("worker.redis", "worker.http")
        if any(len(receiver.named(root)) != 1 for root in roots):
            return False
        return all(any(s.name == "herald.deliver" for s in trace_of(root)) for root in roots)

    await wait_until(both_delivered)
    # RedisPublisher: caller -> herald.publish (in the worker) -> delivery on the gateway.
    spans = trace_of("worker.redis")
    caller, engine = only(spans, "worker.redis"), only(spans, "herald.publish")
    deliver = only(spans, "herald.deliver")
    assert engine.parent_span_id == caller.span_id
    assert engine.resource["service.name"] == "worker"
    assert (deliver.parent_span_id, deliver.resource["service.instance.id"]) == (
        engine.span_id, "gw-p")
    # HttpPublisher: caller -> POST (client) -> gateway server span -> publish -> delivery.
    spans = trace_of("worker.http")
    caller, post = only(spans, "worker.http"), only(spans, "POST")
    server, engine = only(spans, "POST /api/v1/publish"), only(spans, "herald.publish")
    assert (post.kind, post.parent_span_id) == ("client", caller.span_id)
    assert server.parent_span_id == post.span_id
    assert engine.parent_span_id == server.span_id
    assert only(spans, "herald.deliver").parent_span_id == engine.span_id


async def test_the_json_log_line_of_a_traced_request_carries_its_trace_and_span_ids(
    spawn_gateway: Any, receiver: OtlpReceiver, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HERALD_TEST_GATEWAY_LOGS", "1")  # the gateway's stderr is captured
    gw = spawn_gateway("gw-log", HERALD_LOG_LEVEL="INFO", **otel_env(receiver))
    header, trace_id, _ = new_traceparent()
    await publish(gw, "public:news", header)

    async def exported() -> bool:
        return any(s.name == "POST /api/v1/publish" for s in receiver.in_trace(trace_id))

    await wait_until(exported)
    server = only(receiver.in_trace(trace_id), "POST /api/v1/publish")
    line = access_log(capfd.readouterr().err, "/api/v1/publish")
    assert line["message"].startswith("200 POST /api/v1/publish")
    assert (line["trace_id"], line["span_id"]) == (trace_id, server.span_id)


def default_otlp_port_free() -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", DEFAULT_OTLP_PORT))
        except OSError:
            return False
    return True


async def test_with_no_otel_variable_nothing_is_traced_and_the_gateway_works(
    redis_url: str, spawn_gateway: Any, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A receiver on OTLP's default port catches an exporter created by mistake.
    rx = OtlpReceiver()
    free = default_otlp_port_free()
    if free:
        rx.start(DEFAULT_OTLP_PORT)
    monkeypatch.setenv("HERALD_TEST_GATEWAY_LOGS", "1")
    gw = spawn_gateway("gw-plain", HERALD_REDIS_URL=redis_url, HERALD_LOG_LEVEL="INFO")
    client = await connect(gw, "u1")
    header, _, _ = new_traceparent()
    pos = await publish(gw, "user:u1", header)
    assert (await client.expect("message"))["offset"] == pos["offset"]
    await client.close()

    gw.signal(signal.SIGTERM)  # a graceful exit would flush any batched span
    assert gw.wait() == 0
    rx.stop()
    if free:
        assert rx.requests == 0 and rx.spans == []
    line = access_log(capfd.readouterr().err, "/api/v1/publish")
    assert "trace_id" not in line and "span_id" not in line
    broker = RedisBroker(redis_url)
    try:
        history = await broker.history(Namespaces.from_config("").of("user:u1"), "user:u1", 0, 10)
    finally:
        await broker.close()
    assert history.publications[-1].meta == {}  # no traceparent travels


async def test_an_exporter_named_none_turns_tracing_off(
    spawn_gateway: Any, receiver: OtlpReceiver
) -> None:
    gw = spawn_gateway("gw-none", **otel_env(receiver, OTEL_TRACES_EXPORTER="none"))
    client = await connect(gw, "u1")
    pos = await publish(gw, "user:u1", new_traceparent()[0])
    assert (await client.expect("message"))["offset"] == pos["offset"]
    await client.close()
    gw.signal(signal.SIGTERM)
    assert gw.wait() == 0
    assert receiver.requests == 0 and receiver.spans == []


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "unsupported exporter jaeger"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
         "'grpc' is not supported"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "traceidratoi"},
         "unknown sampler 'traceidratoi'"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "traceidratio",
          "OTEL_TRACES_SAMPLER_ARG": "1%"}, "'1%' is not a ratio between 0 and 1"),
    ],
)
def test_an_exporter_this_build_cannot_serve_stops_serve_with_one_line(
    env: dict[str, str], says: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", "0"],
        env=gateway_env(**env), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("herald: OTEL_")
    assert says in result.stderr


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console,none"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_which_otel_variables_turn_tracing_on(env: dict[str, str], on: bool) -> None:
    assert tracing.wanted(env) is on


def test_setup_with_no_otel_variable_installs_nothing() -> None:
    from opentelemetry import trace

    assert tracing.setup("gw-x", {}) is False
    assert tracing.enabled is False
    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"


async def test_hook_calls_carry_the_trace_context(spawn_gateway, receiver, backend):
    """An RPC over HTTP with the caller's traceparent: the backend's hook request
    continues that trace (the same trace id, a new parent span: the hook call's)."""
    gw = spawn_gateway("gw-hooks", **otel_env(receiver), **backend.env(hook_connect_path=""))
    header, trace_id, parent = new_traceparent()
    status, body = await http(
        gw, "POST", "/api/v1/rpc", {"method": "echo", "params": [1]},
        {"Authorization": f"Bearer {token('u1')}", "traceparent": header},
    )
    assert (status, body) == (200, {"result": [1]})
    sent = backend.calls["rpc"][0].headers["traceparent"]
    _version, sent_trace, sent_span, _flags = sent.split("-")
    assert sent_trace == trace_id and sent_span != parent
