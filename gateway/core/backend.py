"""What the node asks the application's backend, and what it makes of the answers.

`core.hooks` carries a call (timeout, bounds, breaker); this module says what
each hook is sent and how its `result` changes a connection, a subscribe or
a publication (docs/hooks.md is the contract). Every hook request carries
`client`, `user`, `transport` and `node`; the trace context goes as the
`traceparent` header.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import orjson

from gateway.config import ConfigError, Settings
from gateway.core.hooks import HookFailed, Hooks, result_object
from gateway.protocol.channels import Namespaces, validate_channel
from gateway.protocol.errors import ProtocolError
from gateway.security.auth import MAX_INFO_BYTES, Claims

if TYPE_CHECKING:
    from gateway.core.session import Session
    from gateway.telemetry.metrics import Metrics

METHOD_MAX = 128
# Channels a connect hook may subscribe a connection to, at most.
MAX_HOOK_CHANNELS = 64


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who a hook call is about: a connection, or an HTTP request (no client id)."""

    user: str
    transport: str
    client: str | None = None

    @classmethod
    def of(cls, session: Session) -> Caller:
        return cls(session.claims.sub, session.transport, session.id)


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """What a connect hook added to a connection's token, kept across token refreshes."""

    roles: frozenset[str]
    channels: tuple[str, ...]
    info: Any = None


def regrant(session: Session, claims: Claims) -> Claims:
    """`claims` (a connection's new token) plus what its connect hook granted."""
    grant = session.granted
    if grant is None:
        return claims
    return dataclasses.replace(
        claims,
        roles=claims.roles | grant.roles,
        channels=claims.channels + grant.channels,
        info=claims.info if grant.info is None else grant.info,
    )


def parse_method(method: Any) -> str:
    if not isinstance(method, str) or not 1 <= len(method) <= METHOD_MAX:
        raise ProtocolError("bad_request", f"method must be a string of 1-{METHOD_MAX} characters")
    return method


class BackendCalls:
    def __init__(self, settings: Settings, namespaces: Namespaces, metrics: Metrics) -> None:
        self.hooks = Hooks(settings, metrics)
        self._node_id = settings.node_id
        for ns in namespaces:
            if ns.subscribe_hook and not self.hooks.enabled("subscribe"):
                raise ConfigError(
                    f"namespace {ns.name!r} has subscribe_hook but HERALD_HOOK_URL / "
                    "HERALD_HOOK_SUBSCRIBE_PATH are not set"
                )

    def close(self) -> None:
        self.hooks.close()

    def _request(self, caller: Caller, **fields: Any) -> dict[str, Any]:
        return {
            "client": caller.client,
            "user": caller.user,
            "transport": caller.transport,
            "node": self._node_id,
            **fields,
        }

    async def connect(self, session: Session) -> list[str]:
        """Ask the connect hook; apply its grants and info; the channels it adds.

        A rejection raises the backend's error (the handler closes with 4001);
        a failure raises `unavailable` (the handler closes with 1013).
        """
        if not self.hooks.enabled("connect"):
            return []
        claims = session.claims
        request = self._request(
            Caller.of(session), roles=sorted(claims.roles), channels=list(claims.channels),
            info=claims.info,
        )
        channels, session.granted = await self.hooks.call("connect", request, _connect_result)
        session.claims = regrant(session, claims)
        return channels

    async def refresh(self, session: Session) -> float | None:
        """The new expiry the refresh hook grants, or None without a refresh hook."""
        if not self.hooks.enabled("refresh"):
            return None
        request = self._request(Caller.of(session), expires=int(session.claims.exp))
        expires = await self.hooks.call("refresh", request, _refresh_result)
        session.claims = dataclasses.replace(session.claims, exp=expires)
        return expires

    async def may_subscribe(self, caller: Caller, channel: str) -> None:
        """The subscribe hook's decision; returns when it allows, raises when not."""
        await self.hooks.call(
            "subscribe", self._request(caller, channel=channel),
            lambda result: result_object("subscribe", result, {}),
        )

    async def publish(self, caller: Caller, channel: str, event: str, data: Any) -> Any:
        """The data to publish: as sent, or as the publish hook rewrote it."""
        if not self.hooks.enabled("publish"):
            return data
        result = await self.hooks.call(
            "publish", self._request(caller, channel=channel, event=event, data=data),
            lambda result: result_object("publish", result, {}),
        )
        return result.get("data", data)

    async def rpc(self, caller: Caller, method: Any, params: Any) -> Any:
        method = parse_method(method)
        if not self.hooks.enabled("rpc"):
            raise ProtocolError("not_found", "no RPC hook is configured")
        return await self.hooks.call("rpc", self._request(caller, method=method, params=params))


def _connect_result(result: Any) -> tuple[list[str], Grant]:
    """The connect hook's result: the channels to add, and what it grants."""
    r = result_object("connect", result, {"channels": list, "grants": list, "roles": list})
    for key in ("channels", "grants", "roles"):
        if not all(isinstance(v, str) for v in r.get(key, [])):
            raise HookFailed("connect", "malformed", f"result.{key} must be strings")
    if len(orjson.dumps(r.get("info"))) > MAX_INFO_BYTES:
        raise HookFailed("connect", "malformed", f"result.info over {MAX_INFO_BYTES} bytes")
    channels = [validate_channel(c) for c in r.get("channels", [])]
    if len(channels) > MAX_HOOK_CHANNELS:
        raise HookFailed("connect", "malformed", f"more than {MAX_HOOK_CHANNELS} channels")
    grant = Grant(frozenset(r.get("roles", [])), tuple(r.get("grants", [])), r.get("info"))
    return channels, grant


def _refresh_result(result: Any) -> float:
    """The refresh hook's new expiry: unix seconds, in the future."""
    expires = result_object("refresh", result, {"expires": (int, float)}).get("expires")
    if expires is None or isinstance(expires, bool) or expires <= time.time():
        raise HookFailed("refresh", "malformed", "result.expires must be a future unix time")
    return float(expires)
