"""Error and close codes of the wire protocol (PROTOCOL.md §2), in one place."""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "token_expired",
    "forbidden",
    "not_found",
    "rate_limited",
    "too_many_subscriptions",
    "message_too_large",
    "unavailable",
    "internal",
]

# HTTP status for each error code, for the HTTP API and the fallbacks.
HTTP_STATUS: dict[str, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "token_expired": 401,
    "forbidden": 403,
    "not_found": 404,
    "rate_limited": 429,
    "too_many_subscriptions": 429,
    "message_too_large": 413,
    "unavailable": 503,
    "internal": 500,
}


class CloseCode:
    NORMAL = 1000
    PROTOCOL_ERROR = 1002  # the client broke RFC 6455's framing
    INVALID_DATA = 1007  # a text frame that is not UTF-8
    TOO_LARGE = 1009
    INTERNAL = 1011
    RESTARTING = 1012
    OVERLOADED = 1013
    UNAUTHORIZED = 4001
    HEARTBEAT_TIMEOUT = 4002  # the peer answered no ping for a whole interval
    DISCONNECTED = 4003  # by the server API: do not reconnect
    SLOW_CONSUMER = 4008
    RATE_LIMIT = 4029


class ProtocolError(Exception):
    """A request the server refuses; becomes an `error` frame or an HTTP error."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


class BrokerUnavailable(Exception):
    """A shared engine (Redis) cannot answer now; clients get `unavailable`.

    Defined with the protocol because every layer that talks to Redis raises
    it — the engines and the cluster registry alike — and the node turns it
    into the protocol's `unavailable`.
    """
