"""The node's side of presence: which local subscriptions are listed, who gets join/leave.

The store (`gateway.broker.presence`) knows members across the cluster; this
keeps, per local connection, the channels it is listed in and the channels
it asked join/leave events of, so an unsubscribe or a closed connection
leaves exactly what it joined. Only sessions in a presence namespace appear
here: a node without one pays nothing, per connection or per publication.

A store outage never fails a subscribe: the member is kept locally and
listed again by the store's next refresh (Redis), and the miss is counted
in `herald_presence_errors_total`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from gateway.broker.presence import Member, Presence, PresenceUnavailable
from gateway.protocol.channels import Namespace

if TYPE_CHECKING:
    from gateway.core.hub import Hub
    from gateway.core.session import Session
    from gateway.telemetry.metrics import Metrics

log = logging.getLogger("herald.presence")


def member_of(session: Session) -> Member:
    return Member(session.id, session.claims.sub, session.connected_at, session.claims.info)


class PresenceTracker:
    def __init__(self, store: Presence, hub: Hub, metrics: Metrics) -> None:
        self.store = store
        self._hub = hub
        self._metrics = metrics
        self._listed: dict[Session, set[str]] = {}
        self._watching: dict[Session, set[str]] = {}
        store.bind(self._on_event)

    async def subscribed(self, session: Session, ns: Namespace, channel: str, events: bool) -> None:
        """After a subscribe in a presence namespace: list it, and watch if asked."""
        if events and channel not in self._watching.get(session, ()):
            self._watching.setdefault(session, set()).add(channel)
            await self._guard("watch", self.store.watch(channel))
        if channel in self._listed.get(session, ()):
            return
        self._listed.setdefault(session, set()).add(channel)
        joined = await self._guard("join", self.store.join(channel, member_of(session),
                                                             ns.presence_limit))
        if joined is False:
            self._metrics.presence_full.inc()

    async def unsubscribed(self, session: Session, channel: str) -> None:
        watching = self._watching.get(session)
        if watching is not None and channel in watching:
            watching.discard(channel)
            if not watching:
                del self._watching[session]
            await self._guard("unwatch", self.store.unwatch(channel))
        listed = self._listed.get(session)
        if listed is not None and channel in listed:
            listed.discard(channel)
            if not listed:
                del self._listed[session]
            await self._guard("leave", self.store.leave(channel, member_of(session)))

    async def closed(self, session: Session) -> None:
        channels = self._listed.get(session, set()) | self._watching.get(session, set())
        for channel in list(channels):
            await self.unsubscribed(session, channel)

    async def _guard(self, what: str, call: Any) -> Any:
        try:
            return await call
        except PresenceUnavailable as exc:
            self._metrics.presence_errors.labels(what).inc()
            log.warning("presence %s failed: %s", what, exc)
            return None

    def _on_event(self, kind: str, channel: str, member: Member) -> None:
        """A join or leave anywhere in the cluster: to the local subscribers who asked."""
        frame = {"type": kind, "channel": channel, "client": member.client, "user": member.user}
        for sub in self._hub.subscribers_of(channel):
            # Not its own join or leave: it knows, and the order would depend on the store.
            if channel in self._watching.get(sub, ()) and sub.id != member.client:  # type: ignore
                sub.send_json(dict(frame))
                self._metrics.presence_events.inc()
