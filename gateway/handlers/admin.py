"""The server API (API key): act on a user's connections anywhere in the cluster,
and list channels and users with their counts (docs/protocol.md, section 9)."""

from __future__ import annotations

from typing import Any

from gateway.cluster import control
from gateway.core.admin import MAX_LIMIT, MAX_REASON
from gateway.handlers.base import JsonHandler
from gateway.protocol.channels import MAX_CHANNEL_BYTES, validate_channel
from gateway.protocol.errors import ProtocolError
from gateway.telemetry import audit

MAX_NAME = 255


def _optional_text(body: dict[str, Any], key: str, limit: int) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= limit:
        raise ProtocolError("bad_request", f"{key} must be a string of 1-{limit} characters")
    return value


class UserActionHandler(JsonHandler):
    """POST /api/v1/users/{user}/(disconnect|unsubscribe|subscribe)."""

    async def post(self, user: str, verb: str) -> None:
        self.require_api_key()
        body = self.json_body()
        if not isinstance(body, dict):
            raise ProtocolError("bad_request", "body must be a JSON object")
        client = _optional_text(body, "client", 64)
        action: control.Action
        if verb == "disconnect":
            reconnect = body.get("reconnect", False)
            if not isinstance(reconnect, bool):
                raise ProtocolError("bad_request", "reconnect must be true or false")
            reason = _optional_text(body, "reason", MAX_REASON) or "disconnected by the server"
            action = control.Disconnect(user, client, reason, reconnect)
        else:
            channel = validate_channel(body.get("channel"))
            kind = control.Unsubscribe if verb == "unsubscribe" else control.Subscribe
            action = kind(user, channel, client)
        gathered = await self.node.admin.run(action)
        per_node = {
            node: (r.get("connections", 0) if isinstance(r, dict) else 0)
            for node, r in gathered["results"].items()
        }
        errors = {
            node: r for node, r in gathered["results"].items()
            if isinstance(r, dict) and "error" in r
        }
        reply = {
            "user": user,
            "connections": sum(per_node.values()),
            "nodes": per_node,
            "missing": gathered["missing"],
        }
        if errors:
            reply["errors"] = errors
        audit.event(f"admin.{verb}", user=user, client=client, address=self.request.remote_ip,
              connections=reply["connections"], missing=gathered["missing"],
              **{k: v for k, v in body.items() if k in ("channel", "reason", "reconnect")})
        self.write_json(reply)


class ListingHandler(JsonHandler):
    """GET /api/v1/channels and /api/v1/users: `?pattern=job:*&cursor=<last name>&limit=100`."""

    kind: type[control.ListChannels | control.ListUsers]
    item: tuple[str, str]

    async def get(self) -> None:
        self.require_api_key()
        pattern = self.get_query_argument("pattern", "*")
        cursor = self.get_query_argument("cursor", "")
        if not pattern or len(pattern) > MAX_CHANNEL_BYTES or len(cursor) > MAX_NAME:
            raise ProtocolError("bad_request", "pattern and cursor are at most 255 characters")
        raw = self.get_query_argument("limit", "100")
        try:
            limit = int(raw)
        except ValueError:
            raise ProtocolError("bad_request", "limit must be an integer") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise ProtocolError("bad_request", f"limit must be 1-{MAX_LIMIT}")
        found = await self.node.admin.listing(self.kind, pattern, cursor, limit)
        name, count = self.item
        plural = self.kind.name
        audit.event(f"admin.{plural}", address=self.request.remote_ip, pattern=pattern)
        self.write_json({
            plural: [{name: n, count: c} for n, c in found["items"]],
            "next": found["next"],
            "missing": found["missing"],
        })


class ChannelsHandler(ListingHandler):
    kind = control.ListChannels
    item = ("channel", "subscribers")


class UsersHandler(ListingHandler):
    kind = control.ListUsers
    item = ("user", "connections")
