"""One builder per server frame, so every transport sends the same shapes.

WebSocket and SSE carry the same frames (SSE as `data:` JSON); HTTP answers
errors with the `problem` body. Fields follow PROTOCOL.md §2; optional ones
are left out when absent rather than sent as null.
"""

from __future__ import annotations

from typing import Any

from gateway.protocol.wire import now_iso

RequestId = str | int | None


def error(
    code: str, message: str, *, rid: RequestId = None, channel: str | None = None
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "error",
        "code": code,
        "message": message,
        "timestamp": now_iso(),
    }
    if channel is not None:
        frame["channel"] = channel
    if rid is not None:
        frame["id"] = rid
    return frame


def problem(code: str, message: str) -> dict[str, Any]:
    """The JSON body of an HTTP error (API, fallbacks, refused upgrades)."""
    return {"error": code, "message": message, "timestamp": now_iso()}


def connected(
    *,
    client: str,
    node: str,
    user: str,
    heartbeat: int,
    expires: int,
    transport: str,
    rid: RequestId = None,
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "connected",
        "client": client,
        "node": node,
        "user": user,
        "heartbeat": heartbeat,
        "expires": expires,
        "transport": transport,
        "timestamp": now_iso(),
    }
    if rid is not None:
        frame["id"] = rid
    return frame


def subscribed(
    channel: str,
    epoch: str,
    offset: int,
    *,
    recovered: bool | None = None,
    state: dict[str, Any] | None = None,
    rid: RequestId = None,
) -> dict[str, Any]:
    """`recovered` is present only when the client asked to resume (`since`)
    or the server reports lost history on its own; `state` only for state
    namespaces when the client must refetch."""
    frame: dict[str, Any] = {"type": "subscribed", "channel": channel}
    if recovered is not None:
        frame["recovered"] = recovered
    frame["epoch"] = epoch
    frame["offset"] = offset
    if state is not None:
        frame["state"] = state
    if rid is not None:
        frame["id"] = rid
    return frame


def reconnect(reason: str, after_ms: int) -> dict[str, Any]:
    return {"type": "reconnect", "reason": reason, "after_ms": after_ms}
