"""The node: one gateway process's engine, hub, auth, rules and figures.

Handlers (WebSocket, SSE, HTTP) are thin: they parse and reply. What a
subscribe or a publish *means* is decided here, once for every transport.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gateway.broker import create_broker, create_presence
from gateway.broker.base import Broker
from gateway.broker.presence import PresenceUnavailable
from gateway.cluster import control
from gateway.cluster.directory import Directory, create_directory
from gateway.config import Settings
from gateway.core import publishing
from gateway.core.admin import Admin
from gateway.core.backend import BackendCalls, Caller
from gateway.core.deadlines import Deadlines
from gateway.core.heartbeat import Heartbeat
from gateway.core.hub import Hub
from gateway.core.outbox import Outbox, Sink
from gateway.core.presence import PresenceTracker
from gateway.core.recovery import Recovery, resume
from gateway.core.registry import RegistryWriter
from gateway.protocol import frames
from gateway.protocol.channels import Access, Namespace, Namespaces, claim_allows, validate_channel
from gateway.protocol.errors import BrokerUnavailable, CloseCode, ProtocolError
from gateway.protocol.publication import History, Position, Publication, Snapshot
from gateway.security.admission import Admission, Refused
from gateway.security.auth import Authenticator, Claims
from gateway.telemetry import audit, tracing
from gateway.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from gateway.core.session import Session

log = logging.getLogger("herald.node")

# A replay pauses for the socket to drain past this many pending bytes.
REPLAY_PACE_BYTES = 64 * 1024


def parse_since(since: Any) -> tuple[str, int] | None:
    if since is None:
        return None
    if (
        not isinstance(since, dict)
        or not isinstance(since.get("epoch"), str)
        or not isinstance(since.get("offset"), int)
        or isinstance(since.get("offset"), bool)
        or since["offset"] < 0
    ):
        raise ProtocolError("bad_request", "since must be {epoch: string, offset: integer >= 0}")
    return since["epoch"], since["offset"]


class Node:
    def __init__(
        self,
        settings: Settings,
        broker: Broker | None = None,
        directory: Directory | None = None,
    ) -> None:
        self.settings = settings
        self.id = settings.node_id
        self.broker = broker or create_broker(settings)
        self.directory = directory or create_directory(settings.redis_url, settings.redis_prefix)
        self.namespaces = Namespaces.from_config(settings.namespaces)
        self.hub = Hub(self.broker, recovery_buffer=settings.send_buffer_messages)
        self.metrics = Metrics()
        self.recovery = Recovery(
            self.broker, self.hub, self.namespaces, self.metrics, self._on_publication
        )
        self.broker.bind(self._on_publication, self.recovery.on_resubscribed)
        self.auth = Authenticator(settings)
        self.sessions: set[Session] = set()
        self.draining = False
        self.started = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.registry = RegistryWriter(
            self.id, self.directory, self.broker, self.metrics, self.stats
        )
        self.heartbeat = Heartbeat(self.sessions, settings.heartbeat)
        # Every connection's token expiry, on one timer (see core.deadlines).
        self.deadlines = Deadlines()
        self.admission = Admission(
            settings.ip_connect_rate, settings.ip_connect_burst, settings.max_connections_per_user
        )
        self.backend = BackendCalls(settings, self.namespaces, self.metrics)
        self.admin = Admin(self)
        # Only a node with a presence namespace opens a presence store.
        self.presence: PresenceTracker | None = None
        if any(ns.presence for ns in self.namespaces):
            self.presence = PresenceTracker(create_presence(settings), self.hub, self.metrics)
        self.metrics.bind(self._scrape)  # last: the first scrape reads all of the above

    def _on_publication(self, pub: Publication) -> None:
        if tracing.enabled:
            delivered = tracing.deliver(pub, self.hub.dispatch)
        else:
            delivered = self.hub.dispatch(pub)
        if delivered:
            self.metrics.messages_out.inc(delivered)
        self.metrics.delivery_latency.observe(max(0.0, time.time() - pub.time))

    def bad_records(self) -> int:
        """Records from the engine that were not Herald's, dropped (publications, presence)."""
        count = self.broker.bad_records.count
        if self.presence is not None:
            count += self.presence.store.bad_records.count
        return count

    def _scrape(self) -> dict[str, float]:
        return {
            "up": float(self.broker.ready),
            "reconnects": float(self.broker.reconnects),
            "stalls": float(self.broker.stalls),
            "drift": float(self.broker.drift),
            "bad_records": float(self.bad_records()),
            "messages_in": float(self.broker.messages_in),
            "draining": float(self.draining),
        }

    async def start(self) -> None:
        await self.broker.start()
        if self.presence is not None:
            await self.presence.store.start()
        await self.directory.start()
        self.directory.listen(self.id, self._on_control)
        self.registry.start()
        self.heartbeat.start()

    async def close(self) -> None:
        await self.heartbeat.stop()
        self.deadlines.clear()
        await self.registry.stop()
        if self.presence is not None:
            await self.presence.store.close()
        self.backend.close()
        await self.directory.close()
        await self.broker.close()

    # -- shedding and draining ----------------------------------------------

    def _on_control(self, command: control.Command) -> None:
        """Commands on this node's control channel: the operator's, the server API's."""
        if isinstance(command, control.Request):
            self.admin.on_request(command)
        elif isinstance(command, control.Reply):
            self.admin.on_reply(command)
        elif isinstance(command, control.Shed):
            log.info("control: shedding %d connections", command.count)
            self.spawn(self.shed(command.count, "rebalance"))
        else:
            log.info("control: draining")
            self.spawn(self.drain())

    async def shed(self, count: int, reason: str, window: float = 1.0) -> int:
        """Ask `count` clients (least recently active first) to reconnect elsewhere.

        Each gets `reconnect` with a jittered `after_ms`, then close 1012; the
        closes are spread over `window` seconds so they do not arrive at the
        other gateways as one herd.
        """
        victims = sorted(self.sessions, key=lambda s: s.last_active)[:count]
        if not victims:
            return 0
        step = window / len(victims)
        for i, session in enumerate(victims):
            after_ms = int(random.uniform(0.5, 1.5) * min(5000, 500 + step * 1000 * i))
            session.send_json(frames.reconnect(reason, after_ms))
            session.close(CloseCode.RESTARTING, reason)
            self.metrics.shed.labels(reason).inc()
            if step and i + 1 < len(victims):
                await asyncio.sleep(step)
        return len(victims)

    async def drain(self, window: float | None = None) -> None:
        """Turn not-ready and move every client away within the drain window."""
        if self.draining:
            return
        self.draining = True
        window = self.settings.drain_seconds if window is None else window
        # Leave a fifth of the window for the last closes to flush.
        await self.shed(len(self.sessions), "draining", window * 0.8)

    @property
    def ready(self) -> bool:
        return self.broker.ready and not self.draining

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a clean-up task from synchronous code, keeping a reference until done."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def outbox(
        self,
        sink: Sink,
        drained: Callable[[], asyncio.Future[None]],
        on_overflow: Callable[[], None],
    ) -> Outbox:
        """A bounded outgoing path for a new connection, with this node's limits."""
        return Outbox(
            sink,
            drained,
            max_bytes=self.settings.send_buffer_bytes,
            max_messages=self.settings.send_buffer_messages,
            metrics=self.metrics,
            conflatable=self.conflatable,
            on_overflow=on_overflow,
        )

    def conflatable(self, pub: Publication) -> bool:
        """Only a job's `progress` is superseded by a newer one; every other event counts."""
        return pub.event == "progress" and self.namespaces.of(pub.channel).state

    def connected(self, session: Session, rid: str | int | None = None) -> dict[str, Any]:
        """The `connected` frame every transport opens with."""
        return frames.connected(
            client=session.id,
            node=self.id,
            user=session.claims.sub,
            heartbeat=int(self.settings.heartbeat),
            expires=int(session.claims.exp),
            transport=session.transport,
            rid=rid,
        )

    def new_client_id(self) -> str:
        return "c-" + secrets.token_hex(6)

    # -- permissions ------------------------------------------------------

    async def authorize(
        self, claims: Claims, channel: object, caller: Caller | None = None
    ) -> Namespace:
        """The channel's namespace if `claims` may read it; else `forbidden`/`not_found`.

        In a `subscribe_hook` namespace the backend decides (admins and the
        `channels` claim still pass without asking it); `caller` names the
        connection for the hook (None: an HTTP read).
        """
        channel = validate_channel(channel)
        ns = self.namespaces.of(channel)
        if ns.subscribe_hook:
            if not (claims.admin or claim_allows(claims.channels, channel)):
                await self.backend.may_subscribe(caller or Caller(claims.sub, "http"), channel)
            return ns
        if ns.access is Access.OWNER:
            owner = await self._call(self.broker.owner(channel))
            if owner is None:
                raise ProtocolError("not_found", f"{channel} has no recorded owner")
            if owner == claims.sub:
                return ns
        elif ns.access is Access.USER and channel.partition(":")[2] == claims.sub:
            return ns
        elif ns.access is Access.AUTHENTICATED:
            return ns
        if claims.admin or claim_allows(claims.channels, channel):
            return ns
        raise ProtocolError("forbidden", f"not allowed to subscribe to {channel}")

    def audit_refused(self, session: Session, channel: object, exc: ProtocolError,
                      event: str) -> None:
        """An audit event for a subscription refused (or revoked) by the rules."""
        if exc.code == "forbidden":
            audit.event(event, subject=session.claims.sub, client=session.id,
                        address=session.address, transport=session.transport,
                        channel=str(channel), reason=exc.message)

    # -- subscriptions ----------------------------------------------------

    async def subscribe(
        self,
        session: Session,
        channel: str,
        since: tuple[str, int] | None,
        rid: str | int | None,
        *,
        check: bool = True,
        join_leave: bool = False,
    ) -> None:
        """Subscribe, reply `subscribed`, replay what was missed, then go live."""
        if not tracing.enabled:
            return await self._subscribe(session, channel, since, rid, check, join_leave)
        with tracing.subscribe_span(str(channel), session.transport, since is not None):
            return await self._subscribe(session, channel, since, rid, check, join_leave)

    async def _subscribe(
        self,
        session: Session,
        channel: str,
        since: tuple[str, int] | None,
        rid: str | int | None,
        check: bool,
        join_leave: bool,
    ) -> None:
        """The subscribe itself (`subscribe` may wrap it in a span).

        The hub buffers live publications from before the history read, and
        `go_live` drops the ones the replay already covered: that is the
        whole no-gap, no-duplicate guarantee, for both engines.
        """
        if check:
            try:
                ns = await self.authorize(session.claims, channel, Caller.of(session))
            except ProtocolError as exc:
                self.audit_refused(session, channel, exc, "subscribe.forbidden")
                raise
        else:
            ns = self.namespaces.of(channel)
        if join_leave and not ns.join_leave:
            raise ProtocolError("bad_request", f"join_leave is not enabled for {channel}")
        already = channel in session.subscriptions
        if not already:
            self.check_subscriptions(len(session.subscriptions) + 1)
        session.subscriptions.add(channel)
        try:
            await self._call(self.hub.add(session, channel))
            found = await self._call(resume(self.broker, ns, channel, since))
        except BaseException:
            if not already:
                session.subscriptions.discard(channel)
                await self.hub.remove(session, channel)
            raise
        position = Position(found.epoch, found.offset)
        self.hub.note(channel, position)
        if found.recovered is not None:
            self.metrics.recovered.labels(str(found.recovered).lower()).inc()
            if tracing.enabled:
                tracing.recovery(found.recovered, len(found.publications))
        reply = found.frame(ns, channel)
        if rid is not None:
            reply["id"] = rid
        if ns.presence and self.presence is not None:
            # Listed before `subscribed` goes out: a client that has the reply is in presence.
            await self.presence.subscribed(session, ns, channel, join_leave)
            if channel not in session.subscriptions:  # closed or unsubscribed meanwhile
                await self.presence.unsubscribed(session, channel)
        session.send_subscribed(reply, found.start)
        for pub in found.publications:
            # A re-subscribe on the same connection skips what it already wrote live.
            if not session.already_sent(pub):
                session.push(pub)
                if session.pending_bytes > REPLAY_PACE_BYTES:
                    await session.writable()  # live ones wait in the hub meanwhile
        session.advance(channel, position)
        if not self.hub.go_live(session, channel, position):
            self.metrics.dropped.labels("recovery_overflow").inc()
            session.overflowed()

    async def unsubscribe(self, session: Session, channel: str) -> None:
        session.subscriptions.discard(channel)
        session.forget(channel)
        if self.presence is not None:
            await self.presence.unsubscribed(session, channel)
        await self.hub.remove(session, channel)

    def check_open(self, ip: str) -> None:
        """Before a WebSocket upgrade or an SSE stream: `Refused` while draining or
        past the address's attempt rate, counted by reason."""
        try:
            self.admission.at_open(ip, draining=self.draining)
        except Refused as exc:
            self.metrics.refused.labels(exc.reason).inc()
            raise

    def admit(self, session: Session) -> None:
        """Count a newly authenticated connection, or refuse it past the user's cap."""
        try:
            self.admission.admit(session.claims.sub)
        except Refused as exc:
            self.metrics.refused.labels(exc.reason).inc()
            raise
        self.sessions.add(session)

    def check_subscriptions(self, count: int) -> None:
        """The one bound on subscriptions per connection (WebSocket and SSE alike)."""
        if count > self.settings.max_subscriptions:
            raise ProtocolError(
                "too_many_subscriptions",
                f"at most {self.settings.max_subscriptions} subscriptions per connection",
            )

    async def drop_session(self, session: Session) -> None:
        """Forget a closed connection's subscriptions; a dead broker must not leak them."""
        if session in self.sessions:
            self.sessions.discard(session)
            self.admission.release(session.claims.sub)
        if self.presence is not None:
            await self.presence.closed(session)
        for channel in list(session.subscriptions):
            session.subscriptions.discard(channel)
            try:
                await self.hub.remove(session, channel)
            except BrokerUnavailable:
                pass

    # -- publishing and reads ---------------------------------------------

    async def publish(
        self, req: publishing.PublishRequest, meta: dict[str, str] | None = None
    ) -> Publication:
        started = time.perf_counter()
        pub = await self._call(
            publishing.publish(self.broker, self.namespaces, req, meta, trace=tracing.enabled)
        )
        self.metrics.publish_latency.observe(time.perf_counter() - started)
        if pub.duplicate:
            self.metrics.duplicates.inc()
        else:
            self.metrics.publications.inc()
        return pub

    async def publish_many(
        self,
        reqs: list[publishing.PublishRequest | ProtocolError],
        meta: dict[str, str] | None = None,
    ) -> list[Publication | ProtocolError]:
        """A batch (`parse_batch`'s output) in one engine call; one result per item.

        An item's error stays in its place (counted like a single publish's);
        an outage is `unavailable` for the items it hit.
        """
        started = time.perf_counter()
        results = await publishing.publish_many(
            self.broker, self.namespaces, reqs, meta, trace=tracing.enabled
        )
        self.metrics.publish_latency.observe(time.perf_counter() - started)
        out: list[Publication | ProtocolError] = []
        for res in results:
            if isinstance(res, BrokerUnavailable):
                res = ProtocolError("unavailable", f"broker unavailable: {res}")
            if isinstance(res, ProtocolError):
                self.metrics.errors.labels(res.code).inc()
            elif res.duplicate:
                self.metrics.duplicates.inc()
            else:
                self.metrics.publications.inc()
            out.append(res)
        return out

    async def client_publish(
        self, claims: Claims, caller: Caller, channel: object, event: Any, data: Any
    ) -> Publication:
        """A publish from a client: where the namespace allows it, by someone allowed
        to subscribe there, through the publish hook when one is configured."""
        ns = await self.authorize(claims, channel, caller)
        channel = str(channel)
        if not ns.client_publish:
            raise ProtocolError("forbidden", f"clients may not publish to {channel}")
        event = publishing.parse_event(event)
        max_bytes = self.settings.max_publish_bytes
        data = publishing.check_data(data, max_bytes)
        data = publishing.check_data(
            await self.backend.publish(caller, channel, event, data), max_bytes
        )
        return await self.publish(publishing.PublishRequest(channel, event, data))

    async def rpc(self, caller: Caller, method: Any, params: Any) -> Any:
        """A client's request to the backend (the RPC hook), answered by its result."""
        return await self.backend.rpc(caller, method, params)

    async def read_presence(self, claims: Claims | None, channel: str) -> list[dict[str, Any]]:
        """Who is subscribed to `channel` across the cluster (`claims` None: API key)."""
        ns = await self._readable(claims, channel)
        if not ns.presence or self.presence is None:
            raise ProtocolError("not_found", f"presence is not enabled for {channel}")
        try:
            members = await self.presence.store.members(channel)
        except PresenceUnavailable as exc:
            raise ProtocolError("unavailable", f"presence unavailable: {exc}") from None
        return [m.to_json() for m in sorted(members, key=lambda m: (m.since, m.client))]

    async def _readable(self, claims: Claims | None, channel: str) -> Namespace:
        """A read's namespace: any channel for the API key (`claims` None), else the
        subscribe rules."""
        if claims is None:
            return self.namespaces.of(validate_channel(channel))
        return await self.authorize(claims, channel)

    async def read_state(self, claims: Claims | None, channel: str) -> Snapshot:
        ns = await self._readable(claims, channel)
        return await self._call(self.broker.snapshot(ns, channel))

    async def read_history(
        self, claims: Claims | None, channel: str, since: int | None, limit: int
    ) -> History:
        ns = await self._readable(claims, channel)
        return await self._call(self.broker.history(ns, channel, since, limit))

    async def cluster(self) -> list[dict[str, Any]]:
        records = await self._call(self.directory.read())
        return [r.to_dict() for r in sorted(records, key=lambda r: r.node)]

    async def register_job(self, channel: str, owner: str) -> None:
        await self._call(self.broker.register_owner(channel, owner))

    async def _call(self, awaitable: Any) -> Any:
        """Await an engine call, turning an outage into the protocol's `unavailable`."""
        try:
            return await awaitable
        except BrokerUnavailable as exc:
            raise ProtocolError("unavailable", f"broker unavailable: {exc}") from None

    # -- figures ----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        by_transport: dict[str, int] = {}
        for session in self.sessions:
            by_transport[session.transport] = by_transport.get(session.transport, 0) + 1
        return {
            "node": self.id,
            "engine": type(self.broker).__name__,
            # `uvloop` or `asyncio` (HERALD_EVENT_LOOP).
            "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0],
            "ready": self.ready,
            "draining": self.draining,
            "uptime": round(time.time() - self.started, 3),
            "connections": len(self.sessions),
            "connections_by_transport": by_transport,
            "subscriptions": self.hub.subscription_count,
            "channels": self.hub.channel_count,
            "messages_in": self._sample("herald_messages_in_total"),
            "messages_out": self._sample("herald_messages_out_total"),
            "publications": self._sample("herald_publications_total"),
            "broker_messages_in": self.broker.messages_in,
        }

    def _sample(self, name: str) -> int:
        return int(self.metrics.registry.get_sample_value(name) or 0)
