"""Running one gateway process: bind, serve, stop cleanly on a signal."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from gateway.app import make_app
from gateway.config import ConfigError, Settings
from gateway.core.node import Node
from gateway.protocol.errors import CloseCode

log = logging.getLogger("herald.server")

# Allocations between young-generation collections (CPython's default: 700).
GC_THRESHOLD_YOUNG = 50_000


@dataclass
class RunningGateway:
    """A started gateway: its node, HTTP server and the port it listens on."""

    node: Node
    server: HTTPServer
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def drain_and_stop(self) -> None:
        """SIGTERM: not ready at once, clients moved away over the drain window, then exit."""
        await self.node.drain()
        await self.stop()

    async def stop(self) -> None:
        self.server.stop()
        for session in list(self.node.sessions):
            session.close(CloseCode.RESTARTING, "server restarting")
        await asyncio.sleep(0)
        await self.server.close_all_connections()
        await self.node.close()


async def start_gateway(settings: Settings, node: Node | None = None) -> RunningGateway:
    """Start a gateway on `settings.host:settings.port` (port 0 picks a free one).

    The port is bound before anything else starts, so a port in use fails at
    once with a `ConfigError` naming it, before the engine opens its store or
    its Redis connections.
    """
    sockets = _bind(settings)
    node = node or Node(settings)
    try:
        await node.start()
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    app = make_app(node)
    # No xheaders: the client address is decided by HeraldApplication (trusted proxies only).
    # Bodies are buffered before any handler (or API-key check) runs: bound them.
    # Up to 8x max_publish_bytes a too-large body gets the JSON 413; beyond, a bare 400.
    server = HTTPServer(
        app, idle_connection_timeout=settings.handshake_timeout, body_timeout=30,
        max_body_size=settings.max_publish_bytes * 8,
    )
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    return RunningGateway(node, server, port)


def _bind(settings: Settings) -> list[socket.socket]:
    try:
        return bind_sockets(settings.port, settings.host, family=socket.AF_INET, backlog=4096)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port}: {reason} "
            "(choose another with --port or HERALD_PORT)"
        ) from None


def tune_gc() -> None:
    """Keep the cyclic GC from dominating a gateway that holds many connections.

    Each connection is a few hundred long-lived container objects; with the
    default thresholds a connect storm at 20,000 connections spent 44 % of
    its CPU rescanning them (py-spy, benchmarks/README.md). Collecting young
    objects less often, and freezing everything that exists once the server
    is up (modules, app, node: never garbage), cuts that work while still
    collecting the cycles that closed connections leave behind.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_YOUNG, 20, 20)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `herald serve` runs on (`HERALD_EVENT_LOOP`); None is asyncio's own.

    uvloop (libuv) spends less CPU per socket operation than the stock
    selector loop, which is most of a gateway's work; `asyncio` stays as the
    fallback where uvloop is not installed, and on request.
    """
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ConfigError("HERALD_EVENT_LOOP=uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def run(settings: Settings, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `main()` to the end on the configured event loop."""
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        runner.run(main())


async def serve_forever(
    settings: Settings, announce: Callable[[int], None] | None = None
) -> None:
    """Run until SIGINT/SIGTERM; `announce(port)` once listening (the CLI's banner)."""
    gateway = await start_gateway(settings)
    tune_gc()
    if announce is not None:
        announce(gateway.port)
    log.info("herald gateway %s listening on %s:%d", settings.node_id, settings.host, gateway.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining %d connections over %.1fs", len(gateway.node.sessions),
             settings.drain_seconds)
    # A second signal stops at once.
    drain = asyncio.ensure_future(gateway.drain_and_stop())
    stop.clear()
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait([drain, waiter], return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        log.warning("second signal: stopping without finishing the drain")
        drain.cancel()
        await gateway.stop()
    waiter.cancel()
    log.info("stopped")
