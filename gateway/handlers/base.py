"""What every HTTP handler shares: JSON in and out, errors, the two kinds of auth."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from tornado.web import RequestHandler

from gateway.core.node import Node
from gateway.protocol import frames
from gateway.protocol.errors import HTTP_STATUS, ProtocolError
from gateway.security.auth import Claims
from gateway.telemetry import tracing

log = logging.getLogger("herald.http")

TOKEN_COOKIE = "herald_token"


class JsonHandler(RequestHandler):
    node: Node
    transport = "http"  # what audit events name (SSE: "sse")
    # Handlers worth a trace (publishing) name their route; the rest make no span.
    span_route: str | None = None
    _span: Any = None
    _span_token: object = None

    def initialize(self, node: Node) -> None:
        self.node = node

    def prepare(self) -> None:
        """Open the request's server span, current until `on_finish`.

        Tornado runs `prepare`, the method and `finish` in one task, so the
        span is the parent of everything the request does, and the access
        log line (written by `finish`) carries its trace id.
        """
        if tracing.enabled and self.span_route is not None:
            self._span = tracing.start_server_span(
                self.request.method or "", self.span_route, self.request.headers
            )
            self._span_token = tracing.attach(self._span)

    def on_finish(self) -> None:
        if self._span is not None:
            tracing.end_server_span(self._span, self.get_status())
            tracing.detach(self._span_token)
            self._span = None

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(obj))

    def write_problem(self, exc: ProtocolError) -> None:
        self.node.metrics.errors.labels(exc.code).inc()
        self.write_json(frames.problem(exc.code, exc.message), HTTP_STATUS[exc.code])

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ProtocolError):
            self.write_problem(exc)
            return
        code = "bad_request" if status_code < 500 else "internal"
        if status_code == 404:
            code = "not_found"
        self.write_json(frames.problem(code, self._reason), status_code)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ProtocolError):
            return  # an answered client error, not a server fault
        super().log_exception(typ, value, tb)

    def json_body(self) -> Any:
        limit = self.node.settings.max_publish_bytes * 4
        if len(self.request.body) > limit:
            raise ProtocolError("message_too_large", f"body over {limit} bytes")
        try:
            return orjson.loads(self.request.body)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError("bad_request", f"invalid JSON: {exc}") from None

    def audit_context(self) -> dict[str, Any]:
        """Who is asking, for audit events: address and request."""
        return {"address": self.request.remote_ip, "transport": self.transport,
                "path": self.request.path}

    def require_api_key(self) -> None:
        if not self.node.auth.check_api_key(
            self.request.headers.get("Authorization"), **self.audit_context()
        ):
            raise ProtocolError("unauthorized", "send 'Authorization: apikey <key>'")

    async def require_reader(self) -> Claims | None:
        """A backend's API key (None: it may read any channel) or a user's JWT."""
        header = self.request.headers.get("Authorization", "")
        if header.partition(" ")[0].lower() == "apikey":
            self.require_api_key()
            return None
        return await self.require_user()

    async def require_user(self) -> Claims:
        """A JWT from the Authorization header, the `token` query argument or a cookie."""
        header = self.request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        token: str | None = value.strip() if scheme.lower() == "bearer" else None
        if not token and self.node.settings.allow_query_token:
            token = self.get_query_argument("token", None)
        if not token:
            token = self.get_cookie(TOKEN_COOKIE)
        return await self.node.auth.verify(token, **self.audit_context())
