"""Logging: JSON lines for machines (one object per record), no secrets in them."""

from __future__ import annotations

import logging
import sys

import orjson

from gateway.telemetry import audit
from gateway.telemetry.tracing import TraceLogFilter


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("trace_id", "span_id"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        fields = getattr(record, "audit", None)
        if fields:
            entry.update(fields)  # audit events: their fields as top-level keys
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    # Records logged inside a span (a traced request) carry its ids.
    handler.addFilter(TraceLogFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The audit trail is not a verbosity level: it stays on at WARNING too.
    logging.getLogger(audit.LOGGER).setLevel(logging.INFO)
    # Tornado's access log carries query strings, which may hold `?token=`.
    logging.getLogger("tornado.access").addFilter(_redact_tokens)


def _redact_tokens(record: logging.LogRecord) -> bool:
    if record.args and isinstance(record.args, tuple):
        record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
    record.msg = _redact(str(record.msg))
    return True


def _redact(text: str) -> str:
    import re

    return re.sub(r"(token=)[^&\s]+", r"\1[redacted]", text)
