"""Redis commands batched per round trip, on a connection of their own.

The Redis engine's publishes and reads go through here: every command made
while the previous batch is on the wire (and everything made in the same
event-loop turn as the first) goes out as one write, and the replies come
back parsed by hiredis in one pass. redis-py's own client costs tens of
microseconds of Python per command and one pooled connection per command
in flight; under a connect storm of thousands of clients, each reading its
channels' position, the pool ran dry ("No connection available"). Here a
storm costs a few round trips, and one publisher process carries tens of
thousands of publications a second. redis-py still opens the connection
(TLS, AUTH/ACL, Sentinel discovery).

One batch in flight at a time on one connection (`Batcher`): Redis runs
the commands in the order they were made, which is the order of offsets in
every channel.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from gateway.broker.batching import Batcher
from gateway.cluster.connect import LINK_ERRORS, unavailable
from gateway.protocol.errors import BrokerUnavailable

MAX_BATCH = 1000
MAX_BATCH_BYTES = 1024 * 1024
READ_CHUNK = 256 * 1024
_EVALSHA = b"$7\r\nEVALSHA\r\n$40\r\n"


def bulk(value: bytes | str | int) -> bytes:
    """One RESP bulk string: how every argument of a command goes on the wire."""
    raw = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%b\r\n" % (len(raw), raw)


def command(*parts: bytes | str | int) -> bytes:
    """A whole command (`command("GET", key)`) as the bytes that go on the wire."""
    return b"*%d\r\n%b" % (len(parts), b"".join(bulk(p) for p in parts))


class Script:
    """A Lua script called by EVALSHA through a pipe (loaded again on NOSCRIPT)."""

    def __init__(self, source: str, keys: int) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest().encode()
        self._head = _EVALSHA + self.sha + b"\r\n" + bulk(keys)

    def call(self, count: int, args: bytes) -> bytes:
        """The EVALSHA command; `args` is `count` bulk strings, the keys first."""
        return b"*%d\r\n%b%b" % (3 + count, self._head, args)


class RedisPipe:
    """`pipe.submit(cmd)` queues one encoded command, batched with its neighbours."""

    def __init__(self, client: aioredis.Redis, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._scripts: dict[bytes, Script] = {}
        self._conn: Connection | None = None
        self._parser = hiredis.Reader()
        self._batcher: Batcher[Any] = Batcher(self._send, MAX_BATCH, MAX_BATCH_BYTES)

    def script(self, source: str, keys: int) -> Script:
        """A script this pipe may call (and reload when Redis lost it)."""
        script = Script(source, keys)
        self._scripts[script.sha] = script
        return script

    def submit(self, cmd: bytes) -> asyncio.Future[Any]:
        """Queue one command; the future is its reply (an error reply is a
        `hiredis.ReplyError` value), or raises `BrokerUnavailable` when the
        batch's outcome is unknown."""
        return self._batcher.submit(cmd)

    async def call(self, cmd: bytes) -> Any:
        """`submit` and wait; an error reply raises `BrokerUnavailable`."""
        reply = await self._batcher.submit(cmd)
        if isinstance(reply, hiredis.ReplyError):
            raise BrokerUnavailable(f"redis refused: {reply}")
        return reply

    @property
    def stats(self) -> tuple[int, int]:
        """(batches sent, commands in them)."""
        return self._batcher.batches, self._batcher.items

    async def close(self) -> None:
        await self._batcher.close()
        await self._drop()

    async def _send(self, commands: list[bytes]) -> list[Any]:
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._roundtrip(commands)
                retry = [i for i, r in enumerate(replies) if _noscript(r)]
                if retry:
                    # Redis restarted or its script cache was flushed: load, send those again
                    # (a NOSCRIPT call ran nothing, so sending it again cannot double it).
                    shas = dict.fromkeys(_sha_of(commands[i]) for i in retry)
                    await self._roundtrip([command("SCRIPT", "LOAD", self._scripts[sha].source)
                                           for sha in shas])
                    again = await self._roundtrip([commands[i] for i in retry])
                    for i, reply in zip(retry, again, strict=True):
                        replies[i] = reply
                return replies
        except (TimeoutError, RedisError, *LINK_ERRORS) as exc:
            # Outcome unknown for the whole batch: the caller retries (with its
            # idempotency key) or reports `unavailable`.
            await self._drop()
            raise unavailable(exc) from None

    async def _roundtrip(self, commands: list[bytes]) -> list[Any]:
        conn = self._conn
        if conn is None:
            conn = self._client.connection_pool.make_connection()
            await conn.connect()
            self._conn = conn
            self._parser = hiredis.Reader()
        writer, reader = conn._writer, conn._reader  # redis-py's streams for this connection
        if writer is None or reader is None:
            raise OSError("redis connection closed")
        writer.write(b"".join(commands))
        await writer.drain()
        parser, replies, want = self._parser, [], len(commands)
        while len(replies) < want:
            data = await reader.read(READ_CHUNK)
            if not data:
                raise OSError("redis closed the connection")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                replies.append(reply)
        return replies

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()


def _noscript(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


def _sha_of(cmd: bytes) -> bytes:
    """The script of an EVALSHA command (the only command that answers NOSCRIPT)."""
    start = cmd.index(_EVALSHA) + len(_EVALSHA)
    return cmd[start:start + 40]
