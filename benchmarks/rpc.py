"""JSON lines between the conductor and its worker processes (generator, publisher).

Each worker is its own process so that its CPU can be measured apart from
the gateway's and the conductor's. The conductor writes one request per
line on the worker's stdin (`{"op": ..., ...}`) and reads exactly one reply
line from its stdout (`{"ok": true, ...}` or `{"ok": false, "error": ...}`).
Workers log to stderr only: stdout is the channel.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
ROOT = Path(__file__).resolve().parent.parent
LINE_LIMIT = 64 * 1024 * 1024  # replies carry per-channel counts: allow big lines


class WorkerError(RuntimeError):
    """A worker answered a request with an error (its traceback is the message)."""


class Worker:
    """The conductor's handle on one worker process (`python -m <module>`)."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, module: str, name: str) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            cwd=ROOT, limit=LINE_LIMIT,
        )
        return cls(proc, name)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(orjson.dumps({"op": op, **args}) + b"\n")
            await self.proc.stdin.drain()
            line = await self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"{self.name} exited (code {await self.proc.wait()})")
        reply = orjson.loads(line)
        if not reply.get("ok"):
            raise WorkerError(f"{self.name} {op}: {reply.get('error')}")
        return reply

    async def stop(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def serve(handlers: dict[str, Handler]) -> None:
    """The worker side: answer requests from stdin until it closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    while line := await reader.readline():
        request = orjson.loads(line)
        try:
            reply = await handlers[request.pop("op")](request)
            reply["ok"] = True
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        out.write(orjson.dumps(reply) + b"\n")
        out.flush()
