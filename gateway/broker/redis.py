"""The Redis engine: many stateless gateways behaving as one service.

Publishing is one Lua call (offset, history, state, owner, PUBLISH). Fan-in
uses one dedicated pub/sub connection per gateway, subscribed only to the
channels its clients watch; SUBSCRIBE/UNSUBSCRIBE requests made in the same
event-loop turn go out as one command, so a reconnect storm of thousands of
clients costs a handful of round trips.

Outages: the reader reconnects with capped, jittered exponential backoff,
re-subscribes everything and, before handing over anything it received
meanwhile, awaits the node's `on_resubscribed` for those channels, which
closes each gap from the history (or reports the epoch change): the engine
never re-reads history itself (gateway.core.recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import hiredis
import orjson
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.broker.base import Broker
from gateway.broker.redis_scripts import PUBLISH, READ, Keys
from gateway.cluster.connect import COMMAND_TIMEOUT, connect
from gateway.protocol.channels import Namespace
from gateway.protocol.errors import BrokerUnavailable, ProtocolError
from gateway.protocol.publication import History, Publication, Snapshot, new_epoch

log = logging.getLogger("herald.redis")

OWNER_TTL = 7 * 86400
PING_INTERVAL = 5.0
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
READ_CHUNK = 256 * 1024


def _json_str(value: str) -> str:
    return orjson.dumps(value).decode()


def _decode(entries: list[Any], horizon: float) -> list[Publication]:
    """Stream entries -> publications, dropping the ones older than the history age."""
    pubs = []
    for _id, fields in entries:
        pub = Publication.from_record(orjson.loads(fields[1]))  # the one field, `r`
        if pub.time >= horizon:
            pubs.append(pub)
    return pubs


class RedisBroker(Broker):
    def __init__(self, url: str, *, prefix: str = "herald:") -> None:
        super().__init__()
        self.url = url
        self.keys = Keys(prefix)
        self.client = connect(url)
        self._publish = self.client.register_script(PUBLISH)
        self._read = self.client.register_script(READ)
        # Channels the hub wants.
        self._wanted: set[str] = set()
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._batch_sub: set[str] = set()
        self._batch_unsub: set[str] = set()
        self._flush_scheduled = False
        self._conn: Connection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_read = 0.0
        self._parser = hiredis.Reader()
        self._backlog: list[Any] = []

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._run_reader(), name="herald-redis-reader")
        try:
            await asyncio.wait_for(self._connected.wait(), COMMAND_TIMEOUT)
        except TimeoutError:
            log.warning("redis not reachable at start; serving as not ready and retrying")

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._conn is not None:
            await self._conn.disconnect()
        await self.client.aclose()

    @property
    def ready(self) -> bool:
        return self._connected.is_set()

    # -- commands ----------------------------------------------------------

    async def ping(self) -> None:
        await self._cmd(self.client.ping())

    async def _cmd(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from None

    async def publish(
        self,
        namespace: Namespace,
        channel: str,
        event: str,
        data: Any,
        *,
        owner: str | None = None,
        meta: dict[str, str] | None = None,
    ) -> Publication:
        now = time.time()
        k = self.keys
        result = await self._cmd(
            self._publish(
                keys=[k.meta(channel), k.stream(channel), k.state(channel), k.owner(channel)],
                args=[
                    k.pubsub(channel),
                    _json_str(channel),
                    _json_str(event),
                    orjson.dumps(data),
                    repr(now),
                    orjson.dumps(meta or {}),
                    namespace.history_size,
                    max(1, int(namespace.history_ttl)),
                    "1" if namespace.state else "0",
                    owner or "",
                    OWNER_TTL,
                    new_epoch(),
                ],
            )
        )
        if result[0] == b"forbidden":
            raise ProtocolError("forbidden", f"{channel} belongs to another owner")
        return Publication(
            channel, event, data, result[0].decode(), int(result[1]), now, meta or {}
        )

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
        pubs = _decode(entries, time.time() - namespace.history_ttl)
        cut = len(pubs) > limit
        pubs = pubs[:limit]
        if since is None:
            complete = not cut
        else:
            first = pubs[0].offset if pubs else offset + 1
            complete = since <= offset and first <= since + 1 and not cut
        return History(epoch.decode(), offset, pubs, complete)

    async def snapshot(self, namespace: Namespace, channel: str) -> Snapshot:
        epoch, offset, flat = await self._read_channel(namespace, channel, "state", -1, 0)
        state = {orjson.loads(flat[i]): orjson.loads(flat[i + 1]) for i in range(0, len(flat), 2)}
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

    # -- subscriptions (batched) ---------------------------------------------

    async def subscribe(self, channels: list[str]) -> None:
        if not self._connected.is_set():
            raise BrokerUnavailable("redis pub/sub is not connected")
        loop = asyncio.get_running_loop()
        waits = []
        for channel in channels:
            self._wanted.add(channel)
            self._batch_unsub.discard(channel)
            fut = self._confirm.get(channel)
            if fut is None:
                fut = self._confirm[channel] = loop.create_future()
                self._batch_sub.add(channel)
            waits.append(fut)
        self._schedule_flush()
        try:
            await asyncio.wait_for(asyncio.gather(*map(asyncio.shield, waits)), COMMAND_TIMEOUT)
        except TimeoutError:
            raise BrokerUnavailable("redis did not confirm the subscription") from None

    async def unsubscribe(self, channels: list[str]) -> None:
        for channel in channels:
            self._wanted.discard(channel)
            if channel in self._batch_sub:
                self._batch_sub.discard(channel)
                fut = self._confirm.pop(channel, None)
                if fut is not None and not fut.done():
                    fut.cancel()
            else:
                self._batch_unsub.add(channel)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        conn = self._conn
        if conn is None or not self._connected.is_set():
            return  # the reconnect re-subscribes everything wanted
        subs = [self.keys.pubsub(c) for c in self._batch_sub]
        unsubs = [self.keys.pubsub(c) for c in self._batch_unsub if c not in self._wanted]
        self._batch_sub.clear()
        self._batch_unsub.clear()
        for command, names in (("SUBSCRIBE", subs), ("UNSUBSCRIBE", unsubs)):
            if names:
                self._spawn(self._send(conn, command, names))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, conn: Connection, command: str, names: list[str]) -> None:
        try:
            await conn.send_command(command, *names)
        except (RedisError, OSError) as exc:
            log.warning("%s failed: %s; the reader will reconnect", command, exc)
            await conn.disconnect()

    # -- the reader ----------------------------------------------------------

    async def _run_reader(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                await self._connect_pubsub()
                attempt = 0
                await self._read_loop()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError, BrokerUnavailable) as exc:
                if self._connected.is_set():
                    log.warning("redis pub/sub lost: %s", exc)
                self.reconnects += 1
            except Exception:
                # Never let the reader die: a dead reader is a silent outage.
                log.exception("redis pub/sub reader failed; reconnecting")
                self.reconnects += 1
            finally:
                self._connected.clear()
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.disconnect()
                    self._conn = None
            if self._closing:
                return
            # Full jitter: spreads a fleet's reconnects after a Redis restart.
            delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
            attempt += 1
            await asyncio.sleep(delay)

    async def _connect_pubsub(self) -> None:
        # redis-py opens the connection (TLS, AUTH/ACL, Sentinel discovery);
        # from then on this engine reads the socket itself (see _read_chunk).
        conn = self.client.connection_pool.make_connection()
        await conn.connect()
        self._conn = conn
        self._parser = hiredis.Reader()
        self._backlog = []
        wanted = list(self._wanted)
        names = [self.keys.pubsub(c) for c in wanted]
        self._batch_sub.clear()
        self._batch_unsub.clear()
        if names:
            await conn.send_command("SUBSCRIBE", *names)
            pending = set(names)
            while pending:
                for reply in await asyncio.wait_for(self._read_chunk(conn), COMMAND_TIMEOUT):
                    if reply[0] == b"subscribe":
                        pending.discard(reply[1].decode())
                    else:
                        self._backlog.append(reply)  # handed over after the resync
        if wanted:
            # Fan-in of these channels was interrupted: the node closes their gaps
            # before anything received since is handed over.
            await self._on_resubscribed(wanted)
        self._connected.set()
        for channel in list(self._wanted):
            self._confirmed(channel)

    async def _read_chunk(self, conn: Connection) -> list[Any]:
        """Every complete reply in the next chunk from the socket.

        One await per TCP read, however many messages it holds, instead of
        one task switch and one timer per message through redis-py's
        `read_response`: at thousands of publications a second that is most
        of the per-publication cost. The subscribed connection only ever
        carries pub/sub replies, so nothing here is another caller's answer.
        """
        reader = conn._reader  # redis-py's StreamReader for this connection
        if reader is None:
            raise RedisConnectionError("pub/sub connection closed")
        data = await reader.read(READ_CHUNK)
        if not data:
            raise RedisConnectionError("pub/sub connection closed by the server")
        parser = self._parser
        parser.feed(data)
        replies = []
        while (reply := parser.gets()) is not False:
            replies.append(reply)
        return replies

    def _confirmed(self, channel: str) -> None:
        fut = self._confirm.pop(channel, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _read_loop(self) -> None:
        """Read pub/sub messages until the connection fails.

        Reads carry no per-call timeout (that is a timer armed and cancelled
        per message, a measurable share of the cost at thousands a second);
        a separate watchdog pings the connection and drops it when it goes
        silent, which makes this read fail and the reader reconnect.
        """
        conn = self._conn
        assert conn is not None
        self._last_read = time.monotonic()
        watchdog = asyncio.create_task(self._watchdog(conn))
        try:
            backlog, self._backlog = self._backlog, []
            self._handle(backlog)
            while True:
                replies = await self._read_chunk(conn)
                self._last_read = time.monotonic()
                self._handle(replies)
        finally:
            watchdog.cancel()

    def _handle(self, replies: list[Any]) -> None:
        prefix = self.keys.pubsub_prefix
        plen = len(prefix)
        wanted = self._wanted
        on_publication = self._on_publication
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                log.warning("redis pub/sub error: %s", reply)
                continue
            kind = reply[0]
            if kind == b"message":
                name = reply[1].decode()
                if name.startswith(prefix):
                    self.messages_in += 1
                    if name[plen:] in wanted:
                        on_publication(Publication.from_record(orjson.loads(reply[2])))
            elif kind == b"subscribe":
                self._confirmed(reply[1].decode()[plen:])

    async def _watchdog(self, conn: Connection) -> None:
        """PING the pub/sub connection when idle; drop it after 3 silent intervals."""
        while True:
            await asyncio.sleep(PING_INTERVAL)
            if time.monotonic() - self._last_read > 3 * PING_INTERVAL:
                log.warning("redis pub/sub connection silent; reconnecting")
                await conn.disconnect()
                return
            try:
                await conn.send_command("PING")
            except (RedisError, OSError):
                await conn.disconnect()
                return
