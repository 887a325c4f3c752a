"""The node registry and control channel over Redis (keys in gateway.cluster.keys).

Control commands arrive on a pub/sub connection of their own, opened by
redis-py and re-opened with backoff when it fails: they are rare, so none
of the engine's fan-in tuning applies, and a control outage never touches
delivery.

On a Redis Cluster URL the same keys and commands work: the record write is
a pipeline redis-py splits per slot, the read an MGET per slot
(`mget_nonatomic`; a record that expires between the index read and the
MGET is skipped either way), and control commands are plain PUBLISH, which
the cluster carries to every node, so the listener may subscribe on any
node; it re-reads the slot map before each (re)subscribe, so a failed node
is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import orjson
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from gateway.cluster import control
from gateway.cluster.connect import (
    LINK_ERRORS,
    connect,
    describe,
    refresh_slots,
    stop,
    unavailable,
)
from gateway.cluster.directory import ControlHandler, Directory
from gateway.cluster.keys import RegistryKeys
from gateway.cluster.record import TTL, NodeRecord

log = logging.getLogger("herald.cluster")

# The sorted set forgets nodes silent for this long (their keys expired long before).
FORGET_AFTER = 3600.0
BACKOFF_CAP = 5.0


class RedisDirectory(Directory):
    def __init__(self, url: str, *, prefix: str = "herald:") -> None:
        self.keys = RegistryKeys(prefix)
        self.client = connect(url)
        self._cluster = isinstance(self.client, RedisCluster)
        self._handlers: dict[str, ControlHandler] = {}
        self._listener: asyncio.Task[None] | None = None

    async def _cmd(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, RedisClusterException, *LINK_ERRORS) as exc:
            raise unavailable(exc) from None

    async def write(self, record: NodeRecord, ttl: float = TTL) -> None:
        k = self.keys
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(k.node(record.node), orjson.dumps(record.to_dict()), px=int(ttl * 1000))
            pipe.zadd(k.nodes, {record.node: record.updated})
            pipe.zremrangebyscore(k.nodes, "-inf", record.updated - FORGET_AFTER)
            await self._cmd(pipe.execute())

    async def remove(self, node_id: str) -> None:
        k = self.keys
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.delete(k.node(node_id))
            pipe.zrem(k.nodes, node_id)
            await self._cmd(pipe.execute())

    async def read(self, now: float | None = None) -> list[NodeRecord]:
        now = time.time() if now is None else now
        k = self.keys
        ids = await self._cmd(self.client.zrangebyscore(k.nodes, now - TTL, "+inf"))
        if not ids:
            return []
        keys = [k.node(i.decode()) for i in ids]
        mget = self.client.mget_nonatomic if self._cluster else self.client.mget
        values = await self._cmd(mget(keys))
        records = []
        for value in values:
            if value is None:
                continue  # expired between the two reads: gone
            try:
                record = NodeRecord.parse(orjson.loads(value))
            except ValueError:
                log.warning("ignoring a malformed registry entry")
                continue
            if record.fresh(now):
                records.append(record)
        return records

    async def send(self, node_id: str, command: control.Command) -> None:
        await self._cmd(self.client.publish(self.keys.control(node_id), control.encode(command)))

    def listen(self, node_id: str, handler: ControlHandler) -> None:
        self._handlers[self.keys.control(node_id)] = handler
        if self._listener is not None:
            self._listener.cancel()  # resubscribes with the new channel too
        self._listener = asyncio.create_task(self._listen(), name="herald-control")

    async def close(self) -> None:
        if self._listener is not None:
            await stop(self._listener)
            self._listener = None
        await self.client.aclose()

    async def _listen(self) -> None:
        attempt = 0
        while True:
            pubsub = None
            try:
                await refresh_slots(self.client)
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(*self._handlers)
                attempt = 0
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self._deliver(message["channel"].decode(), message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, RedisClusterException, *LINK_ERRORS) as exc:
                log.warning("control channel lost: %s; reconnecting", describe(exc))
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, 0.1 * 2**attempt)))

    def _deliver(self, name: str, raw: bytes) -> None:
        handler = self._handlers.get(name)
        if handler is None:
            return
        try:
            command = control.decode(raw)
        except ValueError as exc:
            log.warning("control: refused a command (%s): %r", exc, raw[:200])
            return
        try:
            handler(command)
        except Exception:
            log.exception("control command failed: %r", command)
