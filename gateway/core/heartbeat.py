"""WebSocket liveness: one timer for the whole node, not one task per connection.

Every `interval` seconds each authenticated WebSocket gets a ping; one that
has not answered the previous ping (with a pong or any frame at all) is
closed. Tornado's own per-connection ping task costs a Task and a coroutine
frame per connection (about 1.5 KiB each) and a timer wake-up per
connection per interval; this costs one wake-up per interval, in chunks so
a node with 20,000 connections never stalls its loop.
"""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 1000


class Heartbeat:
    def __init__(self, sessions: set, interval: float) -> None:  # type: ignore[type-arg]
        self._sessions = sessions
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="herald-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            targets = [s for s in self._sessions if hasattr(s, "heartbeat")]
            for i, session in enumerate(targets):
                session.heartbeat()
                if i % CHUNK == CHUNK - 1:
                    await asyncio.sleep(0)
