"""The audit log: who authenticated, who was refused, who did what, as JSON lines.

`event(name, **fields)` is the one way to write an audit event, from any
layer above this one: authentication successes and failures, token
refreshes, forbidden subscribes, API-key failures, admin actions. Events
go to the `herald.audit` logger at INFO, which `configure_logging` keeps
on whatever `HERALD_LOG_LEVEL` says (an audit trail that a log level can
switch off is not one), and the JSON formatter writes their fields as
top-level keys beside `time`, `level`, `logger`, `message` and, inside a
traced request, `trace_id`.

Fields, by convention: `subject` (the verified `sub`; never for a failed
authentication, whose claims are the caller's word), `client` (connection
id), `address` (the client address, after trusted proxies), `transport`,
`reason` (the error code and message), `channel`. Never a token or a key:
`event` refuses field names that would hold one.
"""

from __future__ import annotations

import logging
from typing import Any

LOGGER = "herald.audit"
log = logging.getLogger(LOGGER)

# Field names that would carry a credential: refused, so none slips in by accident.
_SECRET_FIELDS = frozenset({"token", "jwt", "key", "api_key", "apikey", "secret", "password",
                            "authorization"})
# Keys the formatter writes itself: an event's fields may not shadow them.
_RESERVED = frozenset({"time", "level", "logger", "message", "trace_id", "span_id"})


def event(name: str, **fields: Any) -> None:
    """Write one audit event; fields that are None are left out."""
    bad = (_SECRET_FIELDS | _RESERVED) & fields.keys()
    if bad:
        raise ValueError(f"audit fields {sorted(bad)} are not allowed")
    record = {"event": name, **{k: v for k, v in fields.items() if v is not None}}
    log.info(name, extra={"audit": record})
