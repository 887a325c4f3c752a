"""A fault-injecting TCP proxy for tests: the network between a gateway and Redis, lying.

It listens on a free loopback port and forwards every connection to a real
server (a `redis-server`, a cluster node). The test that owns it decides
what the network does:

- `stall()`: nothing is forwarded either way, sockets stay open (a partition
  that neither end can see: no FIN, no RST, just silence);
- `heal()`: forwarding resumes, with what was held back delivered in order;
- `reset()`: every open connection is aborted with a TCP RST (SO_LINGER 0)
  on both sides, the way a middlebox or a crashed host drops it;
- `slow(delay)`: each chunk waits `delay` seconds before it is forwarded.

It runs its own event loop in a daemon thread, so it behaves the same under
a synchronous test, an asyncio test (whose loop it never blocks), and for
gateway subprocesses. Every control method is thread-safe and returns once
the change is in effect. Memory is bounded: each direction of a connection
holds at most one chunk while stalled; the kernel's socket buffers push back
on the sender beyond that, as a real stalled link does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHUNK = 64 * 1024
MAX_CONNECTIONS = 2048


@dataclass
class ProxyStats:
    """What went through: bytes per direction, connections, faults injected."""

    connections: int = 0  # accepted, ever
    active: int = 0
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    resets: int = 0  # connections aborted by reset()
    faults: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """`FaultProxy(port).start()`; `proxy.url` is the address to give the gateway."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.stats = ProxyStats()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="faultproxy")
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None
        self._delay = 0.0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start)
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # -- faults ----------------------------------------------------------------

    def stall(self) -> None:
        """Stop forwarding both ways; every socket stays open."""
        self._count("stall")
        self._call(self._set_flowing, False)

    def heal(self) -> None:
        """Forward again at full speed (what a stall held back goes first)."""
        self._call(self._heal)

    def slow(self, delay: float) -> None:
        """Hold every chunk `delay` seconds before forwarding it (0 = full speed)."""
        if delay:
            self._count("slow")
        self._call(self._set_delay, delay)

    def reset(self) -> int:
        """Abort every open connection with a TCP RST on both sides; how many."""
        self._count("reset")
        return self._call(self._reset)

    def active(self) -> int:
        return self._call(lambda: len(self._links))

    # -- the loop's side -------------------------------------------------------

    def _count(self, fault: str) -> None:
        self.stats.faults[fault] = self.stats.faults.get(fault, 0) + 1

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset()
        if self._server is not None:
            await self._server.wait_closed()

    def _set_flowing(self, on: bool) -> None:
        assert self._flowing is not None
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    def _set_delay(self, delay: float) -> None:
        self._delay = max(0.0, delay)

    def _heal(self) -> None:
        self._delay = 0.0
        self._set_flowing(True)

    def _reset(self) -> int:
        links = list(self._links)
        for link in links:
            self._abort(link)
        self.stats.resets += len(links)
        return len(links)

    def _abort(self, link: _Link) -> None:
        for task in link.tasks:
            task.cancel()
        for writer in (link.client, link.server):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._drop(link)

    def _drop(self, link: _Link) -> None:
        if link in self._links:
            self._links.discard(link)
            self.stats.active = len(self._links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        if len(self._links) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()  # the server is down: the client sees a reset
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        self.stats.active = len(self._links)
        link.tasks = [
            asyncio.ensure_future(self._pump(reader, up_writer, link, up=True)),
            asyncio.ensure_future(self._pump(up_reader, writer, link, up=False)),
        ]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    link: _Link, *, up: bool) -> None:
        """Copy one direction, one chunk at a time, honouring stall and delay."""
        assert self._flowing is not None
        try:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                if self._delay:
                    await asyncio.sleep(self._delay)
                    await self._flowing.wait()  # a stall during the delay holds it too
                dst.write(data)
                await dst.drain()
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            return
        # One side closed: close both, as a real connection would end.
        if link in self._links:
            for task in link.tasks:
                if task is not asyncio.current_task():
                    task.cancel()
            for writer in (link.client, link.server):
                writer.close()
            self._drop(link)
