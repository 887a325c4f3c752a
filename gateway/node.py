"""The node: one gateway process's engine, hub, auth, rules and figures.

Handlers (WebSocket, SSE, HTTP) are thin: they parse and reply. What a
subscribe or a publish *means* is decided here, once for every transport.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from gateway import publishing
from gateway.auth import Authenticator, Claims
from gateway.broker import create_broker
from gateway.broker.base import Broker, BrokerUnavailable, History, Publication, Snapshot
from gateway.channels import Access, Namespace, Namespaces, claim_allows, validate_channel
from gateway.config import Settings
from gateway.errors import ProtocolError
from gateway.hub import Hub
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from gateway.session import Session

log = logging.getLogger("herald.node")


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
    def __init__(self, settings: Settings, broker: Broker | None = None) -> None:
        self.settings = settings
        self.id = settings.node_id
        self.broker = broker or create_broker(settings)
        self.namespaces = Namespaces.from_config(settings.namespaces)
        self.hub = Hub(self.broker, recovery_buffer=settings.send_buffer_messages)
        self.metrics = Metrics()
        self.broker.set_handler(self._on_publication)
        self.auth = Authenticator(settings)
        self.sessions: set[Session] = set()
        self.draining = False
        self.started = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()

    def _on_publication(self, pub: Publication) -> None:
        delivered = self.hub.dispatch(pub)
        if delivered:
            self.metrics.messages_out.inc(delivered)

    async def start(self) -> None:
        await self.broker.start()

    async def close(self) -> None:
        await self.broker.close()

    @property
    def ready(self) -> bool:
        return self.broker.ready and not self.draining

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a clean-up task from synchronous code, keeping a reference until done."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def new_client_id(self) -> str:
        return "c-" + secrets.token_hex(6)

    # -- permissions ------------------------------------------------------

    async def authorize(self, claims: Claims, channel: object) -> Namespace:
        """The channel's namespace if `claims` may read it; else `forbidden`/`not_found`."""
        channel = validate_channel(channel)
        ns = self.namespaces.of(channel)
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

    # -- subscriptions ----------------------------------------------------

    async def subscribe(
        self,
        session: Session,
        channel: str,
        since: tuple[str, int] | None,
        rid: str | int | None,
        *,
        check: bool = True,
    ) -> None:
        """Subscribe, reply `subscribed`, replay what was missed, then go live.

        The hub buffers live publications from before the history read, and
        `go_live` drops the ones the replay already covered: that is the
        whole no-gap, no-duplicate guarantee, for both engines.
        """
        ns = await self.authorize(session.claims, channel) if check else self.namespaces.of(channel)
        already = channel in session.subscriptions
        if not already and len(session.subscriptions) >= self.settings.max_subscriptions:
            raise ProtocolError(
                "too_many_subscriptions",
                f"at most {self.settings.max_subscriptions} subscriptions per connection",
            )
        session.subscriptions.add(channel)
        try:
            await self._call(self.hub.add(session, channel))
            reply, replay = await self._position(ns, channel, since, session.delivered(channel))
        except BaseException:
            if not already:
                session.subscriptions.discard(channel)
                await self.hub.remove(session, channel)
            raise
        if rid is not None:
            reply["id"] = rid
        session.send_json(reply)
        for pub in replay:
            session.deliver(pub)
        if not self.hub.go_live(session, channel, reply["offset"]):
            self.metrics.dropped.labels("recovery_overflow").inc()
            session.overflowed()

    async def _position(
        self, ns: Namespace, channel: str, since: tuple[str, int] | None, seen: int | None
    ) -> tuple[dict[str, Any], list[Publication]]:
        reply: dict[str, Any] = {"type": "subscribed", "channel": channel}
        replay: list[Publication] = []
        position: History | Snapshot
        if since is not None:
            epoch, offset = since
            if seen is not None:
                offset = max(offset, seen)  # already sent on this connection
            position = await self._call(
                self.broker.history(ns, channel, offset, max(ns.history_size, 1))
            )
            recovered = position.epoch == epoch and position.complete
            reply["recovered"] = recovered
            self.metrics.recovered.labels(str(recovered).lower()).inc()
            if recovered:
                replay = position.publications
            else:
                position = await self._call(self.broker.snapshot(ns, channel))
        else:
            position = await self._call(self.broker.snapshot(ns, channel))
        reply["epoch"] = position.epoch
        reply["offset"] = position.offset
        if isinstance(position, Snapshot) and ns.state:
            reply["state"] = position.state
        return reply, replay

    async def unsubscribe(self, session: Session, channel: str) -> None:
        session.subscriptions.discard(channel)
        await self.hub.remove(session, channel)

    async def drop_session(self, session: Session) -> None:
        """Forget a closed connection's subscriptions; a dead broker must not leak them."""
        self.sessions.discard(session)
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
        pub = await self._call(publishing.publish(self.broker, self.namespaces, req, meta))
        self.metrics.publish_latency.observe(time.perf_counter() - started)
        self.metrics.publications.inc()
        return pub

    async def read_state(self, claims: Claims, channel: str) -> Snapshot:
        ns = await self.authorize(claims, channel)
        return await self._call(self.broker.snapshot(ns, channel))

    async def read_history(
        self, claims: Claims, channel: str, since: int | None, limit: int
    ) -> History:
        ns = await self.authorize(claims, channel)
        return await self._call(self.broker.history(ns, channel, since, limit))

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
        }

    def _sample(self, name: str) -> int:
        return int(self.metrics.registry.get_sample_value(name) or 0)
