"""Encoding and decoding of protocol frames.

orjson everywhere; each publication is encoded once per node (see
`Publication.ws_frame` and `sse_frame`) and those bytes are what every
subscriber receives.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.protocol.errors import ProtocolError
from gateway.protocol.ws_frames import OP_TEXT, ws_frame

# The formatted second of the last timestamp: publications come many per second,
# and `strftime(gmtime())` is most of the cost of formatting one.
_second: tuple[int, str] = (-1, "")


def now_iso(ts: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds, as in the protocol's examples."""
    global _second
    ts = time.time() if ts is None else ts
    whole = int(ts)
    cached, seconds = _second
    if cached != whole:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, seconds)
    return f"{seconds}.{int((ts - whole) * 1000):03d}Z"


def encode(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj)


def json_depth_ok(value: Any, limit: int) -> bool:
    """Iterative depth check: a recursive one is the very stack overflow it guards."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item)
    return True


def decode_request(raw: str | bytes, max_depth: int) -> dict[str, Any]:
    """Parse one client frame into a dict, or raise `bad_request` saying why."""
    if isinstance(raw, bytes):
        raise ProtocolError("bad_request", "binary frames are not accepted; send JSON text")
    try:
        # orjson refuses nesting deeper than 1024 and invalid UTF-8 on its own.
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_request", f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "a frame must be a JSON object")
    if not json_depth_ok(obj, max_depth):
        raise ProtocolError("bad_request", f"JSON nested deeper than {max_depth}")
    return obj


def request_id(obj: dict[str, Any]) -> str | int | None:
    rid = obj.get("id")
    if rid is None or (isinstance(rid, str | int) and not isinstance(rid, bool)):
        return rid
    raise ProtocolError("bad_request", "id must be a string or an integer")


def ws_text_frame(payload: bytes) -> bytes:
    """A complete server-to-client WebSocket text frame (RFC 6455 §5.2).

    Server frames are unmasked and Herald negotiates no compression, so the
    same bytes are valid on every connection: build once, write to all.
    """
    return ws_frame(OP_TEXT, payload)


def sse_event_id(channel: str, epoch: str, offset: int) -> str:
    """An SSE event id: what `Last-Event-ID` brings back to resume from."""
    return f"{channel}|{epoch}|{offset}"


def sse_frame(payload: bytes, eid: str | None = None) -> bytes:
    """One SSE event; the JSON never contains a raw newline, so one `data:` line is enough."""
    head = b"id: " + eid.encode() + b"\n" if eid is not None else b""
    return head + b"data: " + payload + b"\n\n"
