"""`GET /sse`: the Server-Sent Events fallback (PROTOCOL.md §4).

For clients whose proxies break WebSockets. It is a second transport over
the same `Node` API as `/ws` (authorize, subscribe, drop_session), so the
permission and recovery rules exist once. Differences that come from HTTP:

- every problem found before the stream starts (no token, a bad, forbidden
  or unknown channel, too many channels) is an HTTP error with the usual
  JSON body, so an `EventSource` never half-opens on a refused request;
- each event is one protocol frame (`connected`, `subscribed`, `message`,
  `error`, `reconnect`) as JSON in `data:`, with the default event type, so
  a client parses SSE and WebSocket frames with the same code;
- `id: <channel>|<epoch>|<offset>` on every `subscribed` and `message`, and
  a reconnecting EventSource's `Last-Event-ID` resumes that channel exactly
  like `since`. One stream has one Last-Event-ID, so a multi-channel client
  also passes `since=<channel>|<epoch>|<offset>` per channel (client.js
  does);
- heartbeats are SSE comments, which EventSource ignores but proxies see;
- the outgoing buffer is bounded like a WebSocket's: past
  `send_buffer_bytes` the stream is cut and the client resumes by offset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from asyncio import Future
from typing import Any

from gateway.core.backend import Caller
from gateway.core.outbox import Outbox
from gateway.core.session import Session
from gateway.handlers.base import JsonHandler
from gateway.protocol import frames, wire
from gateway.protocol.channels import own_channel, validate_channel
from gateway.protocol.errors import CloseCode, ProtocolError
from gateway.protocol.publication import Position, Publication
from gateway.security.auth import Claims

log = logging.getLogger("herald.sse")

RETRY_MS = 2000  # EventSource's own reconnect delay, sent once per stream


def parse_position(raw: str, what: str) -> tuple[str, tuple[str, int]]:
    """`channel|epoch|offset` -> (channel, (epoch, offset)), or `bad_request` saying why."""
    parts = raw.split("|")
    if len(parts) != 3 or not parts[1]:
        raise ProtocolError("bad_request", f"{what} must be 'channel|epoch|offset'")
    channel, epoch, offset = parts
    if not offset.isdigit():
        raise ProtocolError("bad_request", f"{what}: offset must be an integer >= 0")
    return validate_channel(channel), (epoch, int(offset))


class SseSession(Session):
    transport = "sse"
    __slots__ = ("handler",)

    def __init__(self, handler: SseHandler, client_id: str, claims: Claims) -> None:
        super().__init__(client_id, claims)
        self.handler = handler

    def push(self, pub: Publication) -> bool:
        return self.handler.write_event(pub.sse_frame, pub)

    def send_json(self, message: dict[str, Any]) -> None:
        eid = None
        if message.get("type") == "subscribed":
            eid = wire.sse_event_id(message["channel"], message["epoch"], message["offset"])
        self.handler.write_event(wire.sse_frame(wire.encode(message), eid))

    def send_subscribed(self, reply: dict[str, Any], start: Position) -> None:
        # The event id is what a reconnecting EventSource resumes from: the
        # position before the replay that follows, not the channel's latest
        # offset (a stream cut mid-replay would skip the rest of it).
        eid = wire.sse_event_id(reply["channel"], start.epoch, start.offset)
        self.handler.write_event(wire.sse_frame(wire.encode(reply), eid))

    def close(self, code: int, reason: str) -> None:
        self.handler.end_stream(code, reason)

    @property
    def outbox(self) -> Outbox | None:
        return self.handler.outbox


class _ChunkSink:
    """The outbox's sink over Tornado's chunked response: a chunk, then a flush.

    Each event goes out as soon as it is written (an EventSource shows what
    it has); what the socket has not taken waits in the IOStream's buffer,
    whose size is the outbox's measure of a slow client.
    """

    __slots__ = ("_handler",)

    def __init__(self, handler: SseHandler) -> None:
        self._handler = handler

    def write(self, data: bytes) -> None:
        handler = self._handler
        if handler._finished or handler.request.connection.stream.closed():
            return  # the stream ended: the handler's close path stops the session
        handler.write(data)
        handler.flush()

    def get_write_buffer_size(self) -> int:
        stream = self._handler.request.connection.stream
        buffer = stream._write_buffer  # no public accessor; None once closed
        return 0 if stream.closed() or buffer is None else len(buffer)

    def drained(self) -> Future[None]:
        """An empty flush resolves once everything written so far is on the wire."""
        return self._handler.flush()


class SseHandler(JsonHandler):
    """One EventSource stream: checks first, then `connected`, subscriptions, live events."""

    transport = "sse"

    def initialize(self, node: Any) -> None:
        super().initialize(node)
        self.session: SseSession | None = None
        self._done = asyncio.Event()
        self._close_code: int | None = None
        self.outbox: Outbox | None = None

    async def get(self) -> None:
        node = self.node
        # Like /ws: refused before the stream, so the client goes elsewhere.
        node.check_open(self.request.remote_ip or "")
        session = SseSession(self, node.new_client_id(), await self.require_user())
        session.address = self.request.remote_ip or ""
        extra = await node.backend.connect(session)  # refused: the backend's status
        plan = await self._plan(session)
        plan += [(c, None) for c in extra if c not in dict(plan)]
        self.session = session
        claims = session.claims
        node.admit(session)  # past the user's cap: 429 before the stream starts
        # Everything was checked: from here on, problems are events, not statuses.
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("X-Accel-Buffering", "no")  # nginx: do not buffer the stream
        self.write(f"retry: {RETRY_MS}\n\n")
        self.flush()
        sink = _ChunkSink(self)
        self.outbox = node.outbox(sink, sink.drained, self._slow_consumer)
        node.metrics.connects.labels("sse").inc()
        node.metrics.connections.labels("sse").inc()
        try:
            session.send_json(node.connected(session))
            for channel, since in plan:
                if self._done.is_set():
                    break
                try:
                    await node.subscribe(session, channel, since, None, check=False)
                except ProtocolError as exc:
                    self._send_error(exc, channel)
            await self._stream(claims)
        finally:
            node.metrics.connections.labels("sse").dec()
            node.metrics.disconnects.labels(str(self._close_code or 1000)).inc()
            self.session = None
            await node.drop_session(session)
        if not self._finished and not self.request.connection.stream.closed():
            self.finish()

    async def _plan(self, session: SseSession) -> list[tuple[str, tuple[str, int] | None]]:
        """Validate and authorize every channel; each one's `since`, if any."""
        node = self.node
        claims = session.claims
        names = [validate_channel(c) for c in self.get_query_arguments("channel")]
        try:
            own = validate_channel(own_channel(claims.sub))
        except ProtocolError:
            own = ""  # a sub that makes no channel name: no automatic channel
        channels = list(dict.fromkeys(([own] if own else []) + names))
        if not channels:
            raise ProtocolError("bad_request", "name at least one channel")
        node.check_subscriptions(len(channels))
        since: dict[str, tuple[str, int]] = {}
        for raw in self.get_query_arguments("since"):
            channel, position = parse_position(raw, "since")
            since[channel] = position
        last = self.request.headers.get("Last-Event-ID", "").strip()
        if last:
            # The newest position this stream delivered: it wins for its channel.
            channel, position = parse_position(last, "Last-Event-ID")
            since[channel] = position
        for channel in channels:
            if channel != own:
                await node.authorize(claims, channel, Caller.of(session))
        return [(c, since.get(c)) for c in channels]

    async def _stream(self, claims: Claims) -> None:
        """Heartbeat until the client leaves, the token expires or the node closes us."""
        heartbeat = max(self.node.settings.heartbeat, 0.05)
        while not self._done.is_set():
            left = claims.exp - time.time()
            if left <= 0:
                why = "token expired; reconnect"
                session = self.session
                try:
                    if session is not None and await self.node.backend.refresh(session):
                        claims = session.claims  # the refresh hook extended it
                        continue
                except ProtocolError as exc:
                    why = f"token expired: {exc.message}"
                self._send_error(ProtocolError("token_expired", why))
                self.end_stream(CloseCode.UNAUTHORIZED, "token expired")
                return
            try:
                await asyncio.wait_for(self._done.wait(), min(heartbeat, left))
            except TimeoutError:
                self.write_event(b": heartbeat\n\n")

    def _send_error(self, exc: ProtocolError, channel: str | None = None) -> None:
        self.node.metrics.errors.labels(exc.code).inc()
        self.write_event(wire.sse_frame(wire.encode(frames.error(exc.code, exc.message,
                                                                 channel=channel))))

    # -- writing and closing ----------------------------------------------

    def write_event(self, frame: bytes, pub: Publication | None = None) -> bool:
        """Send one event through the stream's bounded outbox (shared with WebSocket)."""
        if self._done.is_set() or self._finished or self.outbox is None:
            return False
        if not self.outbox.send(frame, pub):
            self._done.set()
            return False
        return True

    def _slow_consumer(self) -> None:
        """Past the outbox's bound: cut the stream; the client resumes by Last-Event-ID."""
        self._close_code = CloseCode.SLOW_CONSUMER
        self._done.set()
        self.request.connection.stream.close()

    def end_stream(self, code: int, reason: str) -> None:
        """Close on purpose: tell the client why (a `closed` event), then end the response."""
        if self._done.is_set():
            return
        self.write_event(
            wire.sse_frame(wire.encode({"type": "closed", "code": code, "reason": reason}))
        )
        self._close_code = code
        self._done.set()

    def on_connection_close(self) -> None:
        if self.outbox is not None:
            self.outbox.closed = True
        if self._close_code is None:
            self._close_code = 1001  # the client went away
        self._done.set()
