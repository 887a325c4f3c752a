"""A real OTLP/HTTP trace receiver on loopback: what a collector does, minus the collector.

`POST /v1/traces` with a protobuf `ExportTraceServiceRequest` body (gzip or
not), decoded with `opentelemetry-proto`; every span is kept as a flat
`ReceivedSpan`. Used by tests/test_tracing.py and benchmarks/tracing_overhead.py.
"""

from __future__ import annotations

import gzip
import socket
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

SPAN_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer",
              5: "consumer"}


@dataclass
class ReceivedSpan:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int = 0


@dataclass
class OtlpReceiver:
    """Collects every exported span; `requests` counts the export calls."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    port: int = 0
    _server: HTTPServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> None:
        app = Application([(r"/v1/traces", _TracesHandler, {"receiver": self})])
        self._server = HTTPServer(app)
        sockets = bind_sockets(port, "127.0.0.1", family=socket.AF_INET)
        self._server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def in_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]

    def take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            name=span.name,
                            kind=SPAN_KINDS.get(span.kind, str(span.kind)),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes=_attributes(span.attributes),
                            resource=resource,
                            status_code=span.status.code,
                        )
                    )
        self.requests += 1


class _TracesHandler(RequestHandler):
    def initialize(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def post(self) -> None:
        if self.request.headers.get("Content-Type") != "application/x-protobuf":
            self.set_status(415)
            return
        body = self.request.body
        if self.request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.receiver.take(body)
        self.set_header("Content-Type", "application/x-protobuf")
        self.write(ExportTraceServiceResponse().SerializeToString())


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}
