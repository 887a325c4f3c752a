"""`GET /ws`: the WebSocket transport of the protocol (PROTOCOL.md §2).

Two parts, as in Tornado's handler/protocol split. `WebSocketUpgrade` is
an ordinary request handler: admission, the upgrade headers, Origin, the
101, then it hands the socket to the event loop and is gone.
`GatewayWebSocket` is the connection from then on, one object on an
asyncio transport (`handlers.ws_protocol` does RFC 6455): connected-
unauthenticated (only `auth` and `ping` are accepted, for at most
`auth_timeout` seconds), then authenticated (everything). Every frame goes
through the connection's outbox: publications are framed once per node,
and control replies share the same ordered path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast
from urllib.parse import urlparse

from tornado.web import RequestHandler

from gateway.core.backend import Caller, regrant
from gateway.core.deadlines import Entry
from gateway.core.node import Node, parse_since
from gateway.core.outbox import Outbox
from gateway.core.session import Session
from gateway.handlers.ws_protocol import WebSocketConnection, accept_key, take_socket, valid_key
from gateway.protocol import frames, wire
from gateway.protocol.channels import own_channel, validate_channel
from gateway.protocol.errors import HTTP_STATUS, CloseCode, ProtocolError
from gateway.protocol.publication import Publication
from gateway.security.auth import Claims
from gateway.security.ratelimit import AbuseCounter, TokenBucket
from gateway.telemetry import tracing

log = logging.getLogger("herald.ws")

# RPCs one connection may have waiting on the backend at once.
MAX_RPCS_IN_FLIGHT = 16


def origin_allowed(origin: str, host: str, allowed: list[str]) -> bool:
    """Deny cross-site WebSocket hijacking: an Origin must be listed (or same host).

    Entries are full origins (`https://app.example.com`), `*.` wildcards for
    subdomains (`https://*.example.com`) or `*` for any.
    """
    if "*" in allowed:
        return True
    parsed = urlparse(origin)
    if not allowed:
        return parsed.netloc.lower() == host.lower()
    origin = origin.lower().rstrip("/")
    for entry in allowed:
        entry = entry.lower().rstrip("/")
        if entry == origin:
            return True
        scheme, sep, rest = entry.partition("://*.")
        if sep and parsed.scheme == scheme and parsed.netloc.endswith("." + rest):
            return True
    return False


class WsSession(Session):
    transport = "ws"
    __slots__ = ("_outbox", "handler")

    def __init__(self, handler: GatewayWebSocket, client_id: str, claims: Claims) -> None:
        super().__init__(client_id, claims)
        self.handler = handler
        assert handler.outbox is not None
        self._outbox = handler.outbox

    def push(self, pub: Publication) -> bool:
        # The fan-out's hot path: straight to the outbox, which is marked
        # closed as soon as the connection closes (see close).
        return self._outbox.send(pub.ws_frame, pub)

    def send_json(self, message: dict[str, Any]) -> None:
        self.handler.write_frame(wire.ws_text_frame(wire.encode(message)))

    def close(self, code: int, reason: str) -> None:
        self.handler.close(code, reason)

    @property
    def outbox(self) -> Outbox | None:
        return self._outbox

    def heartbeat(self) -> None:
        self.handler.heartbeat()


class WebSocketUpgrade(RequestHandler):
    """The HTTP side of `/ws`: check the upgrade request, answer 101, hand the socket on.

    Refusals are HTTP answers before the upgrade (the same statuses
    Tornado's WebSocketHandler gives): admission (draining, an address's
    attempt rate) with the HTTP API's error body, then 400 for a request
    that is no WebSocket upgrade, 403 for a foreign Origin, 426 for
    another protocol version.
    """

    node: Node

    def initialize(self, node: Node) -> None:
        self.node = node

    async def get(self) -> None:
        node = self.node
        headers = self.request.headers
        try:
            node.check_open(self.request.remote_ip or "")
        except ProtocolError as exc:
            self.set_status(HTTP_STATUS[exc.code])
            self.finish(frames.problem(exc.code, exc.message))
            return
        if headers.get("Upgrade", "").lower() != "websocket":
            self._refuse(400, 'Can "Upgrade" only to "WebSocket".')
            return
        connection = {part.strip().lower() for part in headers.get("Connection", "").split(",")}
        if "upgrade" not in connection:
            self._refuse(400, '"Connection" must be "Upgrade".')
            return
        origin = headers.get("Origin")
        if origin is not None and not origin_allowed(
            origin, self.request.host, node.settings.allowed_origins
        ):
            self._refuse(403, "Cross origin websockets not allowed")
            return
        if headers.get("Sec-WebSocket-Version") != "13":
            self.set_header("Sec-WebSocket-Version", "13")
            self._refuse(426, "Upgrade Required")
            return
        key = headers.get("Sec-WebSocket-Key", "")
        if not valid_key(key):
            self._refuse(400, "Missing/Invalid WebSocket headers")
            return
        token = self._handshake_token()
        address = self.request.remote_ip or ""
        # No extension (a per-connection deflate would forbid writing one
        # pre-built frame to all) and no subprotocol.
        self.clear_header("Content-Type")
        self.set_status(101)
        self.set_header("Upgrade", "websocket")
        self.set_header("Connection", "Upgrade")
        self.set_header("Sec-WebSocket-Accept", accept_key(key))
        self.finish()
        stream = self.detach()
        try:
            await stream.write(b"")  # the 101 is on the wire (almost always already)
        except OSError:
            return  # the client left mid-handshake
        sock, early = take_socket(stream)
        conn = GatewayWebSocket(node, token, address, early)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, sock)
        except OSError:
            sock.close()

    def _refuse(self, status: int, why: str) -> None:
        self.set_status(status)
        self.finish(why)

    def _handshake_token(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        query = self.get_query_argument("token", None)
        if query is None:
            return None
        if not self.node.settings.allow_query_token:
            return ""  # the connection refuses it, saying why
        return query


class GatewayWebSocket(WebSocketConnection):
    """One client's connection after the upgrade: authentication, then its requests."""

    __slots__ = (
        "_abuse",
        "_awaiting_pong",
        "_bucket",
        "_expiry",
        "_gone",
        "_our_close_code",
        "_rpcs",
        "_timers",
        "_token",
        "_unauthenticated",
        "address",
        "client_id",
        "node",
        "outbox",
        "session",
    )

    def __init__(self, node: Node, token: str | None, address: str, early: bytes) -> None:
        super().__init__(node.settings.max_frame_bytes, early)
        self.node = node
        self._token = token  # from the handshake; dropped once used
        self.address = address
        self.client_id = node.new_client_id()
        self.session: WsSession | None = None
        settings = node.settings
        self._bucket = TokenBucket(settings.rate_per_second, settings.rate_burst)
        self._abuse = AbuseCounter(settings.rate_abuse_limit)
        self._timers: list[asyncio.TimerHandle] = []
        self._expiry: Entry | None = None  # in the node's Deadlines
        self._our_close_code: int | None = None
        self.outbox: Outbox | None = None  # once the transport is there
        self._unauthenticated = False
        self._awaiting_pong = False
        self._gone = False
        self._rpcs = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The outbox writes to the transport itself: nothing in between.
        # (uvloop's transports implement asyncio's API without subclassing it.)
        self.outbox = self.node.outbox(
            cast(asyncio.Transport, transport), self.drained, self._slow_consumer
        )
        super().connection_made(transport)

    async def opened(self) -> None:
        self.node.metrics.connects.labels("ws").inc()
        token, self._token = self._token, None
        if token == "":
            self._fail_auth(ProtocolError("unauthorized", "query-string tokens are disabled"))
            return
        if token is not None:
            await self._authenticate(token, None)
            return
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self.node.settings.auth_timeout, self._auth_timed_out))
        self._unauthenticated = True
        self.node.metrics.unauthenticated.inc()

    def _slow_consumer(self) -> None:
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer")

    def _auth_timed_out(self) -> None:
        if self.session is None:
            self._fail_auth(ProtocolError("unauthorized", "no auth message within the timeout"))

    # -- authentication ---------------------------------------------------

    async def _authenticate(self, token: object, rid: str | int | None) -> None:
        try:
            verified = self.node.auth.verify(
                token, refresh=self.session is not None, client=self.client_id,
                address=self.address, transport="ws",
            )
            claims = await tracing.auth_span(verified, "ws", self.client_id)
        except ProtocolError as exc:
            self._fail_auth(exc, rid)
            return
        if self.session is not None:
            await self._refresh(claims, rid)
            return
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._left_unauthenticated()
        session = WsSession(self, self.client_id, claims)
        session.address = self.address
        try:
            extra = await self.node.backend.connect(session)
        except ProtocolError as exc:
            # Refused by the backend: credentials (4001); backend down: try later (1013).
            self._send_error(exc, rid)
            busy = exc.code == "unavailable"
            self.close(CloseCode.OVERLOADED if busy else CloseCode.UNAUTHORIZED, exc.code)
            return
        if self._gone:
            return  # the client left while the backend was asked
        try:
            self.node.admit(session)
        except ProtocolError as exc:
            self._send_error(exc, rid)
            self.close(CloseCode.RATE_LIMIT, "too many connections")
            return
        self.session = session
        self.node.metrics.connections.labels("ws").inc()
        self._schedule_expiry(session.claims)
        connected = self.node.connected(self.session)
        if rid is not None:
            connected["id"] = rid
        self.session.send_json(connected)
        await self._subscribe_own_channel(claims.sub)
        for channel in extra:
            await self._server_subscribe(channel)

    async def _subscribe_own_channel(self, sub: str) -> None:
        await self._server_subscribe(own_channel(sub))

    async def _server_subscribe(self, channel: str) -> None:
        """A subscription the server makes (own channel, connect hook): no id, no check."""
        if self.session is None:
            return
        try:
            validate_channel(channel)
            await self.node.subscribe(self.session, channel, None, None, check=False)
        except ProtocolError as exc:
            # A `sub` that makes no valid channel name, or a broker outage:
            # the connection still works, and the client is told why.
            self._send_error(exc, None)

    async def _refresh(self, claims: Claims, rid: str | int | None) -> None:
        assert self.session is not None
        if claims.sub != self.session.claims.sub:
            self._fail_auth(
                ProtocolError("unauthorized", "a refreshed token must keep its sub"), rid
            )
            return
        self.session.claims = regrant(self.session, claims)
        self._schedule_expiry(claims)
        await self._recheck_subscriptions(claims)
        reply: dict[str, Any] = {"type": "authenticated", "expires": int(claims.exp)}
        if rid is not None:
            reply["id"] = rid
        self.session.send_json(reply)

    async def _recheck_subscriptions(self, claims: Claims) -> None:
        """A refreshed token may grant less (a role or a channels grant removed).

        Each subscription is authorized again; one the new token no longer
        allows is dropped and reported as an `error` naming its channel. An
        engine outage is no reason to drop one, so `unavailable` keeps it.
        """
        session = self.session
        assert session is not None
        for channel in sorted(session.subscriptions - {own_channel(claims.sub)}):
            try:
                await self.node.authorize(claims, channel, Caller.of(session))
            except ProtocolError as exc:
                if exc.code == "unavailable" or self.session is not session:
                    continue
                await self.node.unsubscribe(session, channel)
                self.node.audit_refused(session, channel, exc, "subscribe.revoked")
                self.node.metrics.errors.labels(exc.code).inc()
                session.send_json(
                    frames.error(
                        exc.code,
                        f"{exc.message}; unsubscribed after the token refresh",
                        channel=channel,
                    )
                )

    def _schedule_expiry(self, claims: Claims) -> None:
        deadlines = self.node.deadlines
        if self._expiry is not None:
            deadlines.cancel(self._expiry)
        self._expiry = deadlines.at(claims.exp, self._token_expired)

    def _token_expired(self) -> None:
        if self.session is not None and self.node.backend.hooks.enabled("refresh"):
            self.node.spawn(self._refresh_by_hook(self.session))
            return
        self._fail_auth(ProtocolError("token_expired", "token expired; send a fresh auth"))

    async def _refresh_by_hook(self, session: WsSession) -> None:
        """The token expired: the backend's refresh hook may extend the connection."""
        try:
            expires = await self.node.backend.refresh(session)
        except ProtocolError as exc:
            if self.session is session:
                self._fail_auth(ProtocolError("token_expired", f"token expired: {exc.message}"))
            return
        if self.session is session and expires is not None:
            self._schedule_expiry(session.claims)
            session.send_json({"type": "authenticated", "expires": int(expires)})

    def _fail_auth(self, exc: ProtocolError, rid: str | int | None = None) -> None:
        self._send_error(exc, rid)
        self.close(CloseCode.UNAUTHORIZED, exc.code)

    # -- requests ---------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        node = self.node
        node.metrics.messages_in.inc()
        self._awaiting_pong = False  # any frame proves the peer alive
        if self.session is not None:
            self.session.touch()
        rid: str | int | None = None
        try:
            if not self._bucket.take():
                if self._abuse.record():
                    self._send_error(ProtocolError("rate_limited", "too many requests"), None)
                    self.close(CloseCode.RATE_LIMIT, "rate limit abuse")
                    return
                raise ProtocolError("rate_limited", "too many requests; slow down")
            request = wire.decode_request(message, node.settings.max_json_depth)
            rid = wire.request_id(request)
            await self._handle(request, rid)
        except ProtocolError as exc:
            self._send_error(exc, rid)
        except Exception:
            log.exception("request failed on %s", self.client_id)
            self._send_error(ProtocolError("internal", "internal error"), rid)

    async def _handle(self, request: dict[str, Any], rid: str | int | None) -> None:
        kind = request.get("type")
        if kind == "ping":
            self._reply({"type": "pong", "timestamp": wire.now_iso()}, rid)
            return
        if kind == "auth":
            await self._authenticate(request.get("token"), rid)
            return
        session = self.session
        if session is None:
            self._fail_auth(ProtocolError("unauthorized", "authenticate first"), rid)
            return
        if kind == "subscribe":
            channel = request.get("channel")
            data = request.get("data")
            if channel is None and isinstance(data, dict) and "jobId" in data:
                channel = f"job:{data['jobId']}"
            since = parse_since(request.get("since"))
            join_leave = request.get("join_leave", False)
            if not isinstance(join_leave, bool):
                raise ProtocolError("bad_request", "join_leave must be true or false")
            await self.node.subscribe(
                session, validate_channel(channel), since, rid, join_leave=join_leave
            )
        elif kind == "unsubscribe":
            channel = validate_channel(request.get("channel"))
            if channel not in session.subscriptions:
                raise ProtocolError("not_found", f"not subscribed to {channel}")
            await self.node.unsubscribe(session, channel)
            self._reply({"type": "unsubscribed", "channel": channel}, rid)
        elif kind == "publish":
            pub = await self.node.client_publish(
                session.claims, Caller.of(session), request.get("channel"),
                request.get("event", "message"), request.get("data"),
            )
            self._reply(
                {"type": "published", "channel": pub.channel, "epoch": pub.epoch,
                 "offset": pub.offset},
                rid,
            )
        elif kind == "rpc":
            self._start_rpc(session, request, rid)
        else:
            raise ProtocolError("bad_request", f"unknown message type {kind!r}")

    def _start_rpc(
        self, session: WsSession, request: dict[str, Any], rid: str | int | None
    ) -> None:
        """Run an RPC beside the connection's other requests (its reply echoes the id),
        at most `MAX_RPCS_IN_FLIGHT` at a time per connection."""
        if rid is None:
            raise ProtocolError("bad_request", "an rpc needs an id")
        if self._rpcs >= MAX_RPCS_IN_FLIGHT:
            raise ProtocolError("rate_limited", f"at most {MAX_RPCS_IN_FLIGHT} rpcs in flight")
        self._rpcs += 1
        self.node.spawn(self._rpc(session, request, rid))

    async def _rpc(self, session: WsSession, request: dict[str, Any], rid: str | int) -> None:
        try:
            result = await self.node.rpc(
                Caller.of(session), request.get("method"), request.get("params")
            )
            self._reply({"type": "rpc", "result": result}, rid)
        except ProtocolError as exc:
            self._send_error(exc, rid)
        except Exception:
            log.exception("rpc failed on %s", self.client_id)
            self._send_error(ProtocolError("internal", "internal error"), rid)
        finally:
            self._rpcs -= 1

    def _reply(self, message: dict[str, Any], rid: str | int | None) -> None:
        if rid is not None:
            message["id"] = rid
        self.write_frame(wire.ws_text_frame(wire.encode(message)))

    def _send_error(self, exc: ProtocolError, rid: str | int | None) -> None:
        self.node.metrics.errors.labels(exc.code).inc()
        self._reply(frames.error(exc.code, exc.message), rid)

    # -- writing and closing ----------------------------------------------

    def write_frame(self, frame: bytes, pub: Publication | None = None) -> bool:
        """Send one pre-built frame through the connection's bounded outbox."""
        if self.outbox is None or self.closing:
            return False
        return self.outbox.send(frame, pub)

    def close(self, code: int, reason: str = "") -> None:
        """Close with a protocol close code; counted under it unless the peer closed first."""
        if self.closing:
            return
        if not self._close_received:
            self._our_close_code = code
        if self.outbox is not None:
            self.outbox.closed = True  # nothing more after our close frame
        super().close(code, reason)

    def heartbeat(self) -> None:
        """Called by the node's Heartbeat each interval: ping, or close a dead peer."""
        if self._awaiting_pong:
            self.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
            return
        self._awaiting_pong = True
        self.ping()

    def on_pong(self) -> None:
        self._awaiting_pong = False

    def on_ping(self) -> None:
        self._awaiting_pong = False  # a peer that pings us is alive too

    def _left_unauthenticated(self) -> None:
        if self._unauthenticated:
            self._unauthenticated = False
            self.node.metrics.unauthenticated.dec()

    def on_close(self) -> None:
        self._gone = True
        if self.outbox is not None:
            self.outbox.closed = True
        self._left_unauthenticated()
        for timer in self._timers:
            timer.cancel()
        if self._expiry is not None:
            self.node.deadlines.cancel(self._expiry)
            self._expiry = None
        code = self._our_close_code or self.close_code or 1006
        self.node.metrics.disconnects.labels(str(code)).inc()
        if self.session is not None:
            self.node.metrics.connections.labels("ws").dec()
            session, self.session = self.session, None
            self.node.spawn(self.node.drop_session(session))
