"""One Redis pub/sub socket, read the fast way; shared by the Redis engines.

A `PubSubLink` carries a set of pub/sub names on one connection to one
server: plain `SUBSCRIBE` for the single-node engine, sharded `SSUBSCRIBE`
for the cluster engine (one link per shard). What it does well, once:

- subscribe/unsubscribe requests made in one event-loop turn go out as one
  write (on a cluster, one `SSUBSCRIBE` per hash slot, since a sharded
  subscribe may not span slots);
- every reply in a socket chunk is parsed by hiredis and handled in one loop,
  one await per TCP read instead of one task switch per message;
- no per-read timeout: a watchdog PINGs an idle socket, reports it stalled
  when silent for `stall_seconds` and drops it after three times that.

A link lives for one connection (`run` returns or raises when it ends); its
owner decides whether to run it again on the same server (single node) or
to move its names to other servers (cluster). Names the server takes away —
a `sunsubscribe` it pushes when a slot moves, or a rejected subscribe
(`MOVED`, `CLUSTERDOWN`) — are handed to `on_dropped`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import hiredis
from redis.asyncio.connection import Connection
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.cluster.connect import LINK_ERRORS

log = logging.getLogger("herald.redis")

STALL_SECONDS = 3.0
CONFIRM_TIMEOUT = 5.0
READ_CHUNK = 256 * 1024


async def read_replies(conn: Connection, parser: hiredis.Reader) -> list[Any]:
    """Every complete reply in the next chunk from a subscribed connection.

    One await per TCP read, however many messages it holds, instead of one
    task switch and one timer per message through redis-py's
    `read_response`: at thousands of publications a second that is most of
    the per-publication cost. A subscribed connection only ever carries
    pub/sub replies, so nothing here is another caller's answer. Both Redis
    engines read their pub/sub sockets with this.
    """
    reader = conn._reader  # redis-py's StreamReader for this connection
    if reader is None:
        raise RedisConnectionError("pub/sub connection closed")
    data = await reader.read(READ_CHUNK)
    if not data:
        raise RedisConnectionError("pub/sub connection closed by the server")
    parser.feed(data)
    replies = []
    while (reply := parser.gets()) is not False:
        replies.append(reply)
    return replies


class PubSubLink:
    """A set of pub/sub names on one socket to one server."""

    def __init__(
        self,
        open_connection: Callable[[], Awaitable[Connection]],
        *,
        sharded: bool,
        on_message: Callable[[bytes, bytes], None],
        on_confirmed: Callable[[str], None],
        on_dropped: Callable[[list[str]], None],
        stall_seconds: float = STALL_SECONDS,
        on_stall: Callable[[], None] = lambda: None,
    ) -> None:
        self._open = open_connection
        self.sharded = sharded
        self._sub, self._unsub = ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else (
            "SUBSCRIBE", "UNSUBSCRIBE")
        self._message = b"smessage" if sharded else b"message"
        self._on_message = on_message
        self._on_confirmed = on_confirmed
        self._on_dropped = on_dropped
        self._stall_seconds = stall_seconds
        self.stalled = False  # silent for longer than `stall_seconds`
        self._on_stall = on_stall
        self.names: set[str] = set()  # what this socket should carry
        self.live = False  # connected and every name at connect confirmed
        self._conn: Connection | None = None
        self._parser = hiredis.Reader()
        self._batch_sub: set[str] = set()
        self._batch_unsub: set[str] = set()
        self._flush_scheduled = False
        # Subscribe commands in flight, oldest first, with the names not yet
        # confirmed: an error reply belongs to the oldest one (replies keep
        # the order of commands on one connection).
        self._inflight: collections.deque[tuple[str, set[str]]] = collections.deque()
        self._last_read = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- what the socket carries ------------------------------------------------

    def add(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.names:
                self.names.add(name)
                self._batch_unsub.discard(name)
                self._batch_sub.add(name)
        self._schedule_flush()

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self.names:
                self.names.discard(name)
                if name in self._batch_sub:
                    self._batch_sub.discard(name)
                else:
                    self._batch_unsub.add(name)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        conn = self._conn
        if conn is None or not self.live:
            return  # the next connect subscribes everything in `names`
        subs, self._batch_sub = self._batch_sub, set()
        unsubs = {n for n in self._batch_unsub if n not in self.names}
        self._batch_unsub = set()
        commands = self._commands(self._unsub, unsubs) + self._commands(self._sub, subs)
        if commands:
            self._spawn(self._send(conn, commands))

    def _commands(self, verb: str, names: set[str]) -> list[tuple[str, ...]]:
        """One command for all names, or one per hash slot when sharded."""
        if not names:
            return []
        if not self.sharded:
            groups = [names]
        else:
            by_slot: dict[int, set[str]] = {}
            for name in names:
                by_slot.setdefault(key_slot(name.encode()), set()).add(name)
            groups = list(by_slot.values())
        commands = []
        for group in groups:
            self._inflight.append((verb, set(group)))
            commands.append((verb, *group))
        return commands

    async def _send(self, conn: Connection, commands: list[tuple[str, ...]]) -> None:
        try:
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        except (RedisError, *LINK_ERRORS) as exc:
            log.warning("%s failed: %s; reconnecting", commands[0][0], exc)
            await conn.disconnect()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one connection's life ----------------------------------------------------

    async def run(self) -> None:
        """Connect, subscribe every name, then read until the connection fails (raises)."""
        conn = await self._open()
        self._conn = conn
        self._parser = hiredis.Reader()
        self._inflight.clear()
        self._batch_sub.clear()
        self._batch_unsub.clear()
        try:
            backlog: list[Any] = []
            if self.names:
                commands = self._commands(self._sub, set(self.names))
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                while self._inflight:
                    replies = await asyncio.wait_for(self._read_chunk(conn), CONFIRM_TIMEOUT)
                    backlog.extend(replies)
                    # Only confirmations and errors now; messages wait until live.
                    self._handle([r for r in replies if not self._is_message(r)])
            self.live = True
            self._handle([r for r in backlog if self._is_message(r)])
            self._flush()  # what was asked for while connecting
            await self._read_loop(conn)
        finally:
            self.live = False
            self._conn = None
            with contextlib.suppress(Exception):
                await conn.disconnect()

    def _is_message(self, reply: Any) -> bool:
        return isinstance(reply, list) and reply[0] == self._message

    async def _read_chunk(self, conn: Connection) -> list[Any]:
        return await read_replies(conn, self._parser)

    async def _read_loop(self, conn: Connection) -> None:
        self._last_read = time.monotonic()
        watchdog = asyncio.create_task(self._watchdog(conn))
        try:
            while True:
                replies = await self._read_chunk(conn)
                self._last_read = time.monotonic()
                if self.stalled:
                    self.stalled = False
                    log.warning("redis pub/sub answering again: ready")
                self._handle(replies)
        finally:
            watchdog.cancel()

    async def _watchdog(self, conn: Connection) -> None:
        """PING when idle; a stall (silent for `stall_seconds`) is reported, then dropped.

        The single-node engine's rule: silent for the bound, the link is
        `stalled` (its owner reports not ready); silent for three times it,
        the connection is dropped and `run` ends.
        """
        interval = self._stall_seconds / 3
        while True:
            await asyncio.sleep(interval)
            silent = time.monotonic() - self._last_read
            if silent > 3 * self._stall_seconds:
                log.warning("redis pub/sub silent for %.1fs; reconnecting", silent)
                await conn.disconnect()
                return
            if silent > self._stall_seconds and not self.stalled:
                self.stalled = True
                self._on_stall()
                log.warning("redis pub/sub silent for %.1fs: not ready", silent)
            if silent >= interval:
                try:
                    await conn.send_command("PING", check_health=False)
                except (RedisError, *LINK_ERRORS):
                    await conn.disconnect()
                    return

    # -- replies ---------------------------------------------------------------

    def _handle(self, replies: list[Any]) -> None:
        message = self._message
        on_message = self._on_message
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                self._rejected(reply)
                continue
            kind = reply[0]
            if kind == message:
                on_message(reply[1], reply[2])
            elif kind in (b"subscribe", b"ssubscribe"):
                name = reply[1].decode()
                self._settle(name, self._sub)
                if name in self.names:
                    self._on_confirmed(name)
            elif kind in (b"unsubscribe", b"sunsubscribe"):
                name = reply[1].decode()
                if not self._settle(name, self._unsub) and name in self.names:
                    # Not our request: the server took it (its slot moved away).
                    self.names.discard(name)
                    self._on_dropped([name])

    def _settle(self, name: str, verb: str) -> bool:
        """Strike a confirmed name off the oldest command of that verb; False if none had it."""
        for kind, pending in self._inflight:
            if kind == verb and name in pending:
                pending.discard(name)
                break
        else:
            return False
        while self._inflight and not self._inflight[0][1]:
            self._inflight.popleft()
        return True

    def _rejected(self, error: hiredis.ReplyError) -> None:
        """An error answers the oldest command in flight (MOVED, CROSSSLOT, CLUSTERDOWN...)."""
        if not self._inflight:
            log.warning("redis pub/sub error: %s", error)
            return
        verb, pending = self._inflight.popleft()
        if verb == self._sub:
            dropped = [n for n in pending if n in self.names]
            self.names.difference_update(dropped)
            log.info("%s refused (%s); moving %d names", verb, error, len(dropped))
            if dropped:
                self._on_dropped(dropped)
