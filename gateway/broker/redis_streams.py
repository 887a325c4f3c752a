"""What both Redis engines do the same way: a channel's keys, read and written by script.

Every key of a channel shares the hash tag `{channel}` (`redis_scripts.Keys`),
so each call runs on one slot: on Redis Cluster, redis-py's cluster client
routes it by its keys and follows MOVED/ASK. History, snapshots and owners
are read here for both engines, and the publish script's reply is decoded
here; the engines differ in how they send the publish script (the
single-node engine batches it on a connection of its own) and in how they
receive publications (one `SUBSCRIBE` connection, or one `SSUBSCRIBE` link
per shard).
"""

from __future__ import annotations

import time
from typing import Any

import hiredis
import orjson
from redis.exceptions import AskError, ClusterError, RedisClusterException, TryAgainError

from gateway.broker.base import Broker, PublishItem
from gateway.broker.redis_scripts import READ, Keys
from gateway.cluster.connect import LINK_ERRORS, unavailable
from gateway.protocol.channels import Namespace
from gateway.protocol.errors import BrokerUnavailable, ProtocolError
from gateway.protocol.publication import History, Publication, Snapshot, new_epoch

OWNER_TTL = 7 * 86400
IDEMPOTENCY_TTL = 600.0  # default dedupe window (HERALD_IDEMPOTENCY_TTL)

# Errors that mean "Redis cannot answer now": the caller gets `unavailable`
# (a publisher retries), never a 500. The cluster ones are a failover or a
# slot move that outlasted redis-py's own redirects and retries.
UNAVAILABLE = (
    *LINK_ERRORS,  # uvloop's RuntimeError on a reset connection among them
    ClusterError,
    AskError,
    TryAgainError,
    RedisClusterException,
)


def json_str(value: str) -> str:
    return orjson.dumps(value).decode()


def publication(item: PublishItem, now: float, reply: Any) -> Publication:
    """The publish script's reply as the publication it made (or the original, or an error)."""
    if isinstance(reply, hiredis.ReplyError | Exception):
        raise BrokerUnavailable(f"publish script failed: {reply}")
    if reply[0] == b"forbidden":
        raise ProtocolError("forbidden", f"{item.channel} belongs to another owner")
    if reply[0] == b"duplicate":
        epoch, _, offset = reply[1].decode().rpartition(":")
        return Publication(
            item.channel, item.event, item.data, epoch, int(offset), now, item.meta or {},
            duplicate=True,
        )
    return Publication(
        item.channel, item.event, item.data, reply[0].decode(), int(reply[1]), now,
        item.meta or {},
    )


class RedisStreams(Broker):
    """History, snapshots and owners over a Redis or a Redis Cluster client."""

    def __init__(self, client: Any, keys: Keys) -> None:
        super().__init__()
        self.client = client
        self.keys = keys
        self._read = client.register_script(READ)

    def _decode(self, entries: list[Any], horizon: float) -> tuple[list[Publication], bool]:
        """Stream entries -> publications, dropping the ones older than the history age.

        Also says whether a bad record was dropped: the history then has a
        hole, and must not be reported complete.
        """
        pubs = []
        damaged = False
        for _id, fields in entries:
            try:
                pub = Publication.from_json(fields[1])  # the one field, `r`
            except (ValueError, IndexError) as exc:
                self.bad_records.drop(fields, exc)
                damaged = True
                continue
            if pub.time >= horizon:
                pubs.append(pub)
        return pubs, damaged

    async def _cmd(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except UNAVAILABLE as exc:
            raise unavailable(exc) from None

    async def ping(self) -> None:
        await self._cmd(self.client.ping())

    async def _read_channel(
        self, namespace: Namespace, channel: str, mode: str, since: int, limit: int
    ) -> list[Any]:
        k = self.keys
        return await self._cmd(
            self._read(
                keys=[k.meta(channel), k.stream(channel), k.state(channel)],
                args=[mode, new_epoch(), max(1, int(namespace.history_ttl)), since, limit],
            )
        )

    async def history(
        self, namespace: Namespace, channel: str, since: int | None, limit: int
    ) -> History:
        start = -1 if since is None else since
        epoch, offset, entries = await self._read_channel(
            namespace, channel, "history", start, limit + 1
        )
        offset = int(offset)
        pubs, damaged = self._decode(entries, time.time() - namespace.history_ttl)
        cut = len(pubs) > limit
        pubs = pubs[:limit]
        if since is None:
            complete = not cut and not damaged
        else:
            first = pubs[0].offset if pubs else offset + 1
            complete = since <= offset and first <= since + 1 and not cut and not damaged
        return History(epoch.decode(), offset, pubs, complete)

    async def snapshot(self, namespace: Namespace, channel: str) -> Snapshot:
        epoch, offset, flat = await self._read_channel(namespace, channel, "state", -1, 0)
        state = {}
        for i in range(0, len(flat), 2):  # event (a JSON string) -> its latest data
            try:
                event = orjson.loads(flat[i])
                if type(event) is not str:
                    raise ValueError("a state entry whose event is not a string")
                state[event] = orjson.loads(flat[i + 1])
            except ValueError as exc:
                self.bad_records.drop(flat[i + 1], exc)
        return Snapshot(epoch.decode(), int(offset), state)

    async def owner(self, channel: str) -> str | None:
        value = await self._cmd(self.client.get(self.keys.owner(channel)))
        return value.decode() if value is not None else None

    async def register_owner(self, channel: str, owner: str) -> None:
        key = self.keys.owner(channel)
        # SET NX first; if someone holds it, it must be the same owner.
        created = await self._cmd(self.client.set(key, owner, ex=OWNER_TTL, nx=True))
        if created:
            return
        recorded = await self.owner(channel)
        if recorded is not None and recorded != owner:
            raise ProtocolError("forbidden", f"{channel} belongs to another owner")
        await self._cmd(self.client.set(key, owner, ex=OWNER_TTL))
