"""One Lua script called many times per round trip, on a connection of its own.

The Redis engine's publishes go through here: every publish made while the
previous batch is on the wire goes out as one write of EVALSHA commands,
and the replies come back parsed by hiredis in one pass. redis-py's own
pipeline costs tens of microseconds of Python per command (packing, a
coroutine and a callback per reply); this costs a few, so one publisher
process carries tens of thousands of publications a second. redis-py still
opens the connection (TLS, AUTH/ACL, Sentinel discovery).

One batch in flight at a time on one connection (`Batcher`): Redis runs
the calls in the order they were made, which is the order of offsets in
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

MAX_BATCH = 1000
MAX_BATCH_BYTES = 1024 * 1024
READ_CHUNK = 256 * 1024


def bulk(value: bytes | str | int) -> bytes:
    """One RESP bulk string: how every argument of a command goes on the wire."""
    raw = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%b\r\n" % (len(raw), raw)


class ScriptPipe:
    """`pipe.submit(n, args)` queues one EVALSHA of `script`, batched with its neighbours.

    The caller encodes the keys and arguments (`bulk`), so the parts that
    are the same for every call on a channel are encoded once and kept.
    """

    def __init__(self, client: aioredis.Redis, script: str, keys: int, timeout: float) -> None:
        self._client = client
        self._script = script
        self._timeout = timeout
        self._keys = keys
        sha = hashlib.sha1(script.encode()).hexdigest().encode()
        self._head = bulk(b"EVALSHA") + bulk(sha) + bulk(keys)
        self._conn: Connection | None = None
        self._parser = hiredis.Reader()
        self._batcher: Batcher[Any] = Batcher(self._send, MAX_BATCH, MAX_BATCH_BYTES)

    def submit(self, count: int, args: bytes) -> asyncio.Future[Any]:
        """Queue one call: `args` is `count` bulk strings, the keys first.

        The future is the script's reply (a script error is a
        `hiredis.ReplyError` value), or raises `BrokerUnavailable` when the
        batch's outcome is unknown.
        """
        return self._batcher.submit(b"*%d\r\n%b%b" % (3 + count, self._head, args))

    @property
    def stats(self) -> tuple[int, int]:
        """(batches sent, calls in them)."""
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
                    await self._roundtrip([_load(self._script)])
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


def _load(script: str) -> bytes:
    return b"*3\r\n" + bulk(b"SCRIPT") + bulk(b"LOAD") + bulk(script)
