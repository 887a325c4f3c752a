"""Channel names, namespaces and who may subscribe to what.

Access is denied unless a rule allows it: the namespace's own rule (owner,
admin role, any authenticated user) or the token's `channels` claim. A
namespace that is not configured has no rule, so only the claim can open it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

from gateway.protocol.errors import ProtocolError

MAX_CHANNEL_BYTES = 255
_CHANNEL_RE = re.compile(r"[A-Za-z0-9_\-:.@=]+")


class Access(StrEnum):
    """Who a namespace lets subscribe (besides admins and the `channels` claim)."""

    USER = "user"  # only the user named after the colon (user:{sub})
    OWNER = "owner"  # only the recorded owner (job:{id})
    ADMIN = "admin"  # only tokens with the admin role
    AUTHENTICATED = "authenticated"  # any valid token
    CLAIM = "claim"  # nobody but admins, unless the channels claim grants it


@dataclass(frozen=True)
class Namespace:
    name: str
    access: Access
    history_size: int = 100
    history_ttl: float = 3600.0
    state: bool = False
    # Subscribe access decided by the backend's subscribe hook (docs/hooks.md).
    subscribe_hook: bool = False
    # Clients may publish here (those allowed to subscribe; through the publish hook if set).
    client_publish: bool = False
    # Who is subscribed, across the cluster, at most `presence_limit` per channel;
    # and whether subscribers may ask for join/leave events.
    presence: bool = False
    presence_limit: int = 1000
    join_leave: bool = False


BUILTIN_NAMESPACES: tuple[Namespace, ...] = (
    Namespace("user", Access.USER, history_size=100, history_ttl=86400.0),
    Namespace("job", Access.OWNER, history_size=100, history_ttl=3600.0, state=True),
    Namespace("admin", Access.ADMIN, history_size=100, history_ttl=3600.0),
    Namespace("system", Access.AUTHENTICATED, history_size=20, history_ttl=3600.0),
    Namespace("public", Access.AUTHENTICATED, history_size=20, history_ttl=3600.0),
)

# Channels in namespaces nobody configured: reachable only through the claim.
UNCONFIGURED = Namespace("", Access.CLAIM, history_size=20, history_ttl=3600.0)


def validate_channel(channel: object) -> str:
    """Return the channel name or raise `bad_request` saying what is wrong."""
    if not isinstance(channel, str) or not channel:
        raise ProtocolError("bad_request", "channel must be a non-empty string")
    # Length first, counted in characters: any non-ASCII one fails the pattern below,
    # so for a valid name characters are bytes (and a lone surrogate cannot crash encode()).
    if len(channel) > MAX_CHANNEL_BYTES:
        raise ProtocolError("bad_request", f"channel longer than {MAX_CHANNEL_BYTES} bytes")
    if not _CHANNEL_RE.fullmatch(channel):
        raise ProtocolError("bad_request", "channel may only contain A-Z a-z 0-9 _ - : . @ =")
    namespace, sep, rest = channel.partition(":")
    if not sep or not namespace or not rest:
        raise ProtocolError("bad_request", "channel must be 'namespace:name'")
    return channel


def own_channel(sub: str) -> str:
    """The `user:{sub}` channel every connection is subscribed to on its own.

    Not validated: a token's `sub` may make no valid channel name, and then
    the connection works without it (each transport says so its own way).
    """
    return f"user:{sub}"


def _checked(ns: Namespace) -> Namespace:
    """A namespace whose options have the right types, so a typo fails at start-up."""
    if not _CHANNEL_RE.fullmatch(ns.name) or ":" in ns.name:
        raise ValueError(f"namespace name {ns.name!r} is not valid")
    size, ttl = ns.history_size, ns.history_ttl
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{ns.name}: history_size must be an integer >= 0")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0:
        raise ValueError(f"{ns.name}: history_ttl must be a number of seconds > 0")
    for flag in ("state", "subscribe_hook", "client_publish", "presence", "join_leave"):
        if not isinstance(getattr(ns, flag), bool):
            raise ValueError(f"{ns.name}: {flag} must be true or false")
    limit = ns.presence_limit
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"{ns.name}: presence_limit must be an integer >= 1")
    if ns.join_leave and not ns.presence:
        raise ValueError(f"{ns.name}: join_leave needs presence")
    return ns


class Namespaces:
    """The configured namespaces, looked up by a channel's prefix."""

    def __init__(self, namespaces: Iterable[Namespace]) -> None:
        self._by_name = {ns.name: ns for ns in namespaces}

    @classmethod
    def from_config(cls, raw: str) -> Namespaces:
        """Built-ins, overridden or extended by `HERALD_NAMESPACES` (JSON object).

        Example: `{"dashboard": {"access": "authenticated", "history_size": 50}}`.
        """
        merged = {ns.name: ns for ns in BUILTIN_NAMESPACES}
        if raw.strip():
            try:
                spec = json.loads(raw)
                for name, opts in spec.items():
                    base = merged.get(name, Namespace(name, Access.CLAIM))
                    if "access" in opts:
                        opts = {**opts, "access": Access(opts["access"])}
                    merged[name] = _checked(replace(base, name=name, **opts))
            except (ValueError, TypeError, AttributeError) as exc:
                raise ValueError(f"HERALD_NAMESPACES is not valid: {exc}") from None
        return cls(merged.values())

    def of(self, channel: str) -> Namespace:
        return self._by_name.get(channel.partition(":")[0], UNCONFIGURED)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_name.values())


def claim_allows(patterns: Iterable[str], channel: str) -> bool:
    """True when an exact name or a `*` glob of the token's channels claim matches.

    Only `*` is a wildcard (any run of characters, `:` included); every other
    character matches itself, so a grant can never widen by accident.
    """
    for pattern in patterns:
        if pattern == channel:
            return True
        if "*" in pattern and re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), channel):
            return True
    return False
