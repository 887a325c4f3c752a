"""Calls made close together go out as one batch, in the order they were made.

Publishing one message per round trip costs a system call, a wake-up and a
task switch per message, which is most of a publisher's CPU. A `Batcher`
collects every call made while the previous batch is on the wire (and
everything made in the same event-loop turn as the first), sends them
with one `send` call, and hands each caller its own result. Only one batch
is ever in flight, so two calls made in order run in that order on the
server: the per-channel order that publishing promises.

Used by the Redis engine (one pipelined write of script calls per batch)
and by `HttpPublisher` (one `POST /api/v1/publish` with a list per batch).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

R = TypeVar("R")

# `send` gets the encoded calls and returns one entry per call, in order: a
# result, or the exception that call alone failed with. Raising fails every
# call of the batch.
Send = Callable[[list[bytes]], Awaitable[list[R | BaseException]]]


class Batcher(Generic[R]):
    """Queue of encoded calls; one `send` per batch, one batch in flight.

    A batch holds at most `max_items` calls and, past its first call, at
    most `max_bytes` of them (a bound on one write and on the reply to wait for).
    """

    def __init__(self, send: Send[R], max_items: int, max_bytes: int) -> None:
        self._send = send
        self._max = max_items
        self._max_bytes = max_bytes
        self._items: list[bytes] = []
        self._futures: list[asyncio.Future[R]] = []
        self._task: asyncio.Task[None] | None = None
        # Batches sent and items in them (the figures say how well batching works).
        self.batches = 0
        self.items = 0

    async def call(self, item: bytes) -> R:
        return await self.submit(item)

    def submit(self, item: bytes) -> asyncio.Future[R]:
        """Queue one call; its future resolves when its batch has been answered."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append(item)
        self._futures.append(fut)
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="herald-batcher")
        return fut

    async def _drain(self) -> None:
        try:
            while self._items:
                n = self._count()
                items, self._items = self._items[:n], self._items[n:]
                futures, self._futures = self._futures[:n], self._futures[n:]
                self.batches += 1
                self.items += len(items)
                try:
                    results = await self._send(items)
                except asyncio.CancelledError:
                    _fail(futures, asyncio.CancelledError())
                    raise
                except Exception as exc:
                    _fail(futures, exc)
                    continue
                for fut, result in zip(futures, results, strict=True):
                    if fut.done():
                        continue  # the caller gave up waiting; the call ran anyway
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        finally:
            self._task = None

    def _count(self) -> int:
        """How many queued calls the next batch takes."""
        size, n, limit = 0, 0, min(self._max, len(self._items))
        while n < limit:
            size += len(self._items[n])
            if n and size > self._max_bytes:
                break
            n += 1
        return n

    async def close(self) -> None:
        """Stop sending; calls still queued fail with `CancelledError`."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        _fail(self._futures, asyncio.CancelledError())
        self._items, self._futures = [], []


def _fail(futures: list[asyncio.Future[R]], exc: BaseException) -> None:
    for fut in futures:
        if not fut.done():
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
