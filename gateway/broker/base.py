"""The engine contract: the stream of each channel, and nothing else.

An engine owns what must be shared between gateways — offsets, history,
state snapshots, job owners — and the fan-in of publications to the node.
It knows nothing of connections (the hub does the local fan-out), nor of the
node registry and control channel (`gateway.cluster.Directory`), nor of how
a gap is closed after an outage (`gateway.core.recovery`): an engine only
reports what it knows, that its fan-in of some channels was interrupted and
is live again. encode's `broadcaster` and centrifuge's `Broker` are the
models: a small interface the node does not look inside.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.broker.bad_records import BadRecords
from gateway.protocol.channels import Namespace
from gateway.protocol.errors import BrokerUnavailable, ProtocolError
from gateway.protocol.publication import History, Publication, Snapshot

__all__ = ["Broker", "BrokerUnavailable", "OnPublication", "OnResubscribed", "PublishItem"]

OnPublication = Callable[[Publication], None]
OnResubscribed = Callable[[list[str]], Awaitable[None]]


async def _nothing(channels: list[str]) -> None:
    return None


@dataclass(frozen=True, slots=True)
class PublishItem:
    """One publication to make: the arguments of `Broker.publish`, as a value for a batch."""

    namespace: Namespace
    channel: str
    event: str
    data: Any
    owner: str | None = None
    meta: dict[str, str] | None = None
    idempotency_key: str | None = None


class Broker(abc.ABC):
    """Shared streams and fan-in. Every method may raise `BrokerUnavailable`."""

    def __init__(self) -> None:
        self._on_publication: OnPublication = lambda pub: None
        self._on_resubscribed: OnResubscribed = _nothing
        # Publications received by fan-in (from Redis, or locally): the proof
        # that a node only receives what its own clients watch.
        self.messages_in = 0
        self.reconnects = 0
        # Fan-in connections found silent (stalled), and subscriptions found
        # out of step with the engine by its audit (then repaired).
        self.stalls = 0
        self.drift = 0
        # Records in the engine that Herald did not write (each one dropped).
        self.bad_records = BadRecords("Redis record")

    def bind(self, on_publication: OnPublication, on_resubscribed: OnResubscribed) -> None:
        """Wire the engine to its node.

        `on_publication` gets every publication of a subscribed channel, in
        offset order per channel (an overlap after a reconnect is possible;
        the node drops what it already has). `on_resubscribed(channels)` is
        awaited when fan-in of those channels was interrupted (a reconnect, a
        failover) and is live again, before any publication received since
        is handed over, so the node can close the gap first.
        """
        self._on_publication = on_publication
        self._on_resubscribed = on_resubscribed

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; engines without a connection have nothing to do."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect and release resources."""

    @property
    def ready(self) -> bool:
        return True

    async def ping(self) -> None:  # noqa: B027 - engines with a server override it
        """One round trip to the engine's server (measured by the registry loop)."""

    @abc.abstractmethod
    async def publish(
        self,
        namespace: Namespace,
        channel: str,
        event: str,
        data: Any,
        *,
        owner: str | None = None,
        meta: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Publication:
        """Append atomically: next offset, history, state, owner check, fan-in.

        Raises `ProtocolError("forbidden")` when `owner` differs from the
        recorded owner of a job channel. With `idempotency_key`, a key this
        channel already applied within the engine's dedupe window publishes
        nothing and returns the original position with `duplicate=True`; the
        check and the append are one atomic step.
        """

    async def publish_many(
        self, items: Sequence[PublishItem]
    ) -> list[Publication | ProtocolError | BrokerUnavailable]:
        """Publish in order (items on one channel take offsets in the items' order).

        One result per item, in order: its publication, or the error it alone
        failed with (`ProtocolError` such as `forbidden`; `BrokerUnavailable`
        when the outcome is unknown). Nothing is raised for one item's failure.
        Engines with a server send the whole list in one round trip.
        """
        results: list[Publication | ProtocolError | BrokerUnavailable] = []
        for it in items:
            try:
                results.append(await self.publish(
                    it.namespace, it.channel, it.event, it.data, owner=it.owner, meta=it.meta,
                    idempotency_key=it.idempotency_key,
                ))
            except (ProtocolError, BrokerUnavailable) as exc:
                results.append(exc)
        return results

    @abc.abstractmethod
    async def subscribe(self, channels: list[str]) -> None:
        """Start receiving publications of these channels (first local subscriber)."""

    @abc.abstractmethod
    async def unsubscribe(self, channels: list[str]) -> None:
        """Stop receiving them (last local subscriber gone)."""

    @abc.abstractmethod
    async def history(
        self, namespace: Namespace, channel: str, since: int | None, limit: int
    ) -> History:
        """Publications with offset > `since` (all kept ones when None), oldest first.

        `complete` is True when nothing between `since` and the current offset
        is missing from the result (history reached back and `limit` did not cut).
        """

    @abc.abstractmethod
    async def snapshot(self, namespace: Namespace, channel: str) -> Snapshot:
        """The channel's position and, for state namespaces, the latest data per event."""

    @abc.abstractmethod
    async def owner(self, channel: str) -> str | None:
        """The recorded owner of a job channel, or None."""

    @abc.abstractmethod
    async def register_owner(self, channel: str, owner: str) -> None:
        """Record an owner; `forbidden` if another one is recorded already."""
