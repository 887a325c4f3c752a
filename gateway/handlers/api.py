"""The HTTP API (PROTOCOL.md §3-5): publishing, reads, and the node's figures."""

from __future__ import annotations

from typing import Any

from gateway.core.backend import Caller
from gateway.core.publishing import (
    PublishRequest,
    check_data,
    parse_batch,
    parse_event,
    parse_owner,
)
from gateway.handlers.base import JsonHandler
from gateway.protocol.channels import validate_channel
from gateway.protocol.errors import ProtocolError
from gateway.protocol.publication import History, Publication

MAX_BROADCAST = 1000
MAX_HISTORY_LIMIT = 1000


def position(pub: Publication) -> dict[str, Any]:
    reply: dict[str, Any] = {"channel": pub.channel, "epoch": pub.epoch, "offset": pub.offset}
    if pub.duplicate:
        reply["duplicate"] = True
    return reply


class PublishHandler(JsonHandler):
    """POST /api/v1/publish (API key): one publication, or a batch of them.

    A batch (`{"publications": [...]}`, PROTOCOL.md) answers 200 with one
    result per item in request order; an item's error does not fail the others.
    """

    span_route = "/api/v1/publish"

    async def post(self) -> None:
        self.require_api_key()
        body = self.json_body()
        max_bytes = self.node.settings.max_publish_bytes
        key = self.request.headers.get("Idempotency-Key")
        if isinstance(body, dict) and "publications" in body:
            if key is not None:
                raise ProtocolError(
                    "bad_request", "a batch takes an idempotency_key per item, not the header"
                )
            results = await self.node.publish_many(parse_batch(body["publications"], max_bytes))
            self.write_json({"results": [
                position(r) if isinstance(r, Publication)
                else {"error": r.code, "message": r.message}
                for r in results
            ]})
            return
        pub = await self.node.publish(PublishRequest.parse(body, max_bytes, key))
        self.write_json(position(pub))


class BroadcastHandler(JsonHandler):
    """POST /api/v1/broadcast (API key): one event to many channels."""

    span_route = "/api/v1/broadcast"

    async def post(self) -> None:
        self.require_api_key()
        body = self.json_body()
        if not isinstance(body, dict):
            raise ProtocolError("bad_request", "body must be a JSON object")
        channels = body.get("channels")
        if not isinstance(channels, list) or not channels or len(channels) > MAX_BROADCAST:
            raise ProtocolError("bad_request", f"channels must be a list of 1-{MAX_BROADCAST}")
        names = list(dict.fromkeys(validate_channel(c) for c in channels))
        event = parse_event(body.get("event", "message"))
        data = check_data(body.get("data"), self.node.settings.max_publish_bytes)
        results = []
        for channel in names:
            pub = await self.node.publish(PublishRequest(channel, event, data))
            results.append(position(pub))
        self.write_json({"publications": results})


class JobsHandler(JsonHandler):
    """POST /api/v1/jobs (API key): record a job's owner before it publishes."""

    async def post(self) -> None:
        self.require_api_key()
        body = self.json_body()
        if not isinstance(body, dict):
            raise ProtocolError("bad_request", "body must be a JSON object")
        job = body.get("job")
        if not isinstance(job, str | int) or isinstance(job, bool) or job == "":
            raise ProtocolError("bad_request", "job must be a non-empty string")
        channel = validate_channel(f"job:{job}")
        owner = parse_owner(body.get("owner"))
        if owner is None:
            raise ProtocolError("bad_request", "owner is required")
        await self.node.register_job(channel, owner)
        self.write_json({"job": str(job), "channel": channel, "owner": owner})


class StateHandler(JsonHandler):
    """GET /api/v1/channels/{channel}/state (API key, or JWT and subscribe rules)."""

    async def get(self, channel: str) -> None:
        claims = await self.require_reader()
        snap = await self.node.read_state(claims, channel)
        self.write_json(
            {"channel": channel, "epoch": snap.epoch, "offset": snap.offset, "state": snap.state}
        )


class HistoryHandler(JsonHandler):
    """GET /api/v1/channels/{channel}/history?since=N&limit=M (API key, or JWT and
    subscribe rules)."""

    async def get(self, channel: str) -> None:
        claims = await self.require_reader()
        since = self._int_arg("since", None, 0)
        limit = self._int_arg("limit", 100, 1)
        limit = min(limit if limit is not None else 100, MAX_HISTORY_LIMIT)
        hist: History = await self.node.read_history(claims, channel, since, limit)
        self.write_json(
            {
                "channel": channel,
                "epoch": hist.epoch,
                "offset": hist.offset,
                "complete": hist.complete,
                "messages": [p.message() for p in hist.publications],
            }
        )

    def _int_arg(self, name: str, default: int | None, minimum: int) -> int | None:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ProtocolError("bad_request", f"{name} must be an integer") from None
        if value < minimum:
            raise ProtocolError("bad_request", f"{name} must be >= {minimum}")
        return value


class PresenceHandler(JsonHandler):
    """GET /api/v1/channels/{channel}/presence (API key, or JWT and subscribe rules)."""

    async def get(self, channel: str) -> None:
        claims = await self.require_reader()
        clients = await self.node.read_presence(claims, channel)
        self.write_json({"channel": channel, "count": len(clients), "clients": clients})


class ClientPublishHandler(JsonHandler):
    """POST /api/v1/channels/{channel}/publish (JWT): a client publish, as over /ws."""

    span_route = "/api/v1/channels/{channel}/publish"

    async def post(self, channel: str) -> None:
        claims = await self.require_user()
        body = self.json_body()
        if not isinstance(body, dict):
            raise ProtocolError("bad_request", "body must be a JSON object")
        caller = Caller(claims.sub, "http")
        pub = await self.node.client_publish(
            claims, caller, channel, body.get("event", "message"), body.get("data")
        )
        self.write_json(position(pub))


class RpcHandler(JsonHandler):
    """POST /api/v1/rpc (JWT): a client RPC, answered by the backend's RPC hook."""

    span_route = "/api/v1/rpc"

    async def post(self) -> None:
        claims = await self.require_user()
        body = self.json_body()
        if not isinstance(body, dict):
            raise ProtocolError("bad_request", "body must be a JSON object")
        result = await self.node.rpc(
            Caller(claims.sub, "http"), body.get("method"), body.get("params")
        )
        self.write_json({"result": result})


class StatsHandler(JsonHandler):
    """GET /api/v1/stats: this node's figures (API key: they reveal load)."""

    def get(self) -> None:
        self.require_api_key()
        self.write_json(self.node.stats())


class ClusterHandler(JsonHandler):
    """GET /api/v1/cluster: every live node, from the shared registry (API key)."""

    async def get(self) -> None:
        self.require_api_key()
        nodes = await self.node.cluster()
        self.write_json(
            {
                "nodes": nodes,
                "connections": sum(n.get("connections", 0) for n in nodes),
            }
        )
