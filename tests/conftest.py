"""Shared fixtures: real servers on loopback, real clients. No mocks.

- `redis_url`: a real `redis-server` on a free port, one per test session
  (flushed between tests).
- `redis_cluster_url`: a real Redis Cluster (6 `redis-server` processes,
  3 masters with a replica each), one per test session (healed and flushed
  between tests); `redis_cluster` kills, restarts and reshards it.
- `make_gateway`: starts in-process Tornado gateways on free ports.
- `ws_client`: connects a real WebSocket client (the `websockets` library).

In-process tests run on the stock asyncio loop; a module marked `both_loops`
runs on uvloop too, which is what `herald serve` runs on: the WebSocket
transport's writes, pauses and buffer sizes are uvloop's own code there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop
import websockets
from websockets.asyncio.client import ClientConnection

from gateway.config import Settings
from gateway.security.auth import mint_token
from gateway.server import RunningGateway, start_gateway
from tests.faultproxy import FaultProxy
from tests.redis_cluster import RedisCluster

SECRET = "test-secret-0123456789abcdef0123456789"
API_KEY = "test-api-key"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.get_closest_marker("both_loops") is not None:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}  # one factory: test ids unchanged


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_settings(**overrides: Any) -> Settings:
    """In-process gateway settings: the memory engine (or redis with a URL) unless a test
    asks for another, so no test writes to the user's state directory."""
    settings = Settings(
        host="127.0.0.1",
        port=0,
        node_id="gw-test",
        jwt_secret=SECRET,
        api_key=API_KEY,
        heartbeat=25.0,
        ip_connect_rate=0.0,
    )
    overrides.setdefault("engine", "redis" if overrides.get("redis_url") else "memory")
    return dataclasses.replace(settings, **overrides)


def token(sub: str = "user-1", **kwargs: Any) -> str:
    return mint_token(SECRET, sub, **kwargs)


def api_headers() -> dict[str, str]:
    return {"Authorization": f"apikey {API_KEY}", "Content-Type": "application/json"}


class WsClient:
    """A thin test wrapper over a real `websockets` connection: JSON in, JSON out."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn

    async def send(self, obj: dict[str, Any]) -> None:
        await self.conn.send(orjson.dumps(obj).decode())

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.conn.recv(), timeout)
        return orjson.loads(raw)

    async def expect(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """Next message, which must be of type `kind` (fails loudly otherwise)."""
        msg = await self.recv(timeout)
        assert msg["type"] == kind, f"expected {kind}, got {msg}"
        return msg

    async def request(self, obj: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        await self.send(obj)
        return await self.recv(timeout)

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the server to close; returns the close code."""
        try:
            while True:
                await asyncio.wait_for(self.conn.recv(), timeout)
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None

    async def close(self) -> None:
        await self.conn.close()


@pytest.fixture
async def make_gateway() -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    started: list[RunningGateway] = []

    async def make(**overrides: Any) -> RunningGateway:
        gw = await start_gateway(base_settings(**overrides))
        started.append(gw)
        return gw

    yield make
    for gw in started:
        await gw.stop()


@pytest.fixture
async def gateway(make_gateway: Callable[..., Awaitable[RunningGateway]]) -> RunningGateway:
    return await make_gateway()


@pytest.fixture
async def ws_client() -> AsyncIterator[Callable[..., Awaitable[WsClient]]]:
    """`await ws_client(gw, token=..., handshake=True)` -> WsClient after `connected`."""
    clients: list[WsClient] = []

    async def connect(
        gw: RunningGateway,
        tok: str | None = None,
        *,
        path: str = "/ws",
        headers: dict[str, str] | None = None,
        handshake: bool = True,
        **kwargs: Any,
    ) -> WsClient:
        hdrs = dict(headers or {})
        if tok is not None:
            hdrs["Authorization"] = f"Bearer {tok}"
        conn = await websockets.connect(
            f"ws://127.0.0.1:{gw.port}{path}", additional_headers=hdrs, **kwargs
        )
        client = WsClient(conn)
        clients.append(client)
        if handshake and tok is not None:
            await client.expect("connected")
            await client.expect("subscribed")  # its own user:{sub} channel
        return client

    yield connect
    for client in clients:
        await client.close()


# -- a real redis-server ------------------------------------------------------


@dataclasses.dataclass
class RedisProcess:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--maxclients", "20000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        pytest.fail("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisProcess]:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisProcess(free_port(), Path(tmp))
        server.start()
        yield server
        server.stop()


@pytest.fixture
def redis_url(redis_process: RedisProcess) -> str:
    """A clean database on the session's redis-server (restarted if a test killed it)."""
    if redis_process.proc is None or redis_process.proc.poll() is not None:
        redis_process.proc = None
        redis_process.start()
    with socket.create_connection(("127.0.0.1", redis_process.port)) as s:
        s.sendall(b"FLUSHALL\r\n")
        s.recv(16)
    return redis_process.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A real Redis Cluster (3 masters, 1 replica each), started once per session."""
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RedisCluster(Path(tmp))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisCluster) -> str:
    """The session's cluster, whole again (nodes a test killed restarted) and flushed."""
    dead = [n.port for n in redis_cluster.nodes if not n.alive]
    if dead:
        redis_cluster.restart(*dead)
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def fault_proxy(redis_url: str, redis_process: RedisProcess) -> Iterator[FaultProxy]:
    """A fault-injecting TCP proxy in front of the session's (flushed) redis-server;
    give a gateway `fault_proxy.url` and stall, reset or slow its link to Redis."""
    with FaultProxy(redis_process.port) as proxy:
        yield proxy


# -- gateway processes (`herald serve` for real) --------------------------------


@dataclasses.dataclass
class GatewayProcess:
    """A `herald serve` subprocess on a free loopback port."""

    node_id: str
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    # Where its stderr (the JSON log lines) goes, for tests that read them.
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> None:
        stderr: Any = None if os.environ.get("HERALD_TEST_GATEWAY_LOGS") else subprocess.DEVNULL
        if self.log_path is not None:
            stderr = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        if self.log_path is not None:
            stderr.close()  # the child has its own copy
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"gateway {self.node_id} exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"gateway {self.node_id} did not start")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def gateway_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update(
        HERALD_HOST="127.0.0.1",
        HERALD_JWT_SECRET=SECRET,
        HERALD_API_KEY=API_KEY,
        HERALD_DEMO="false",
        HERALD_LOG_LEVEL="WARNING",
        # Every test client comes from 127.0.0.1: the per-IP rate would throttle
        # the suite itself. Its own tests (test_abuse.py) turn it on.
        HERALD_IP_CONNECT_RATE="0",
    )
    env.update(overrides)
    # The memory engine unless the test names one (or gives Redis): never the user's state dir.
    env.setdefault("HERALD_ENGINE", "redis" if env.get("HERALD_REDIS_URL") else "memory")
    return env


@pytest.fixture
def spawn_gateway() -> Iterator[Callable[..., GatewayProcess]]:
    """`spawn_gateway(node_id, **HERALD_env)` -> a started `herald serve` process."""
    started: list[GatewayProcess] = []

    def spawn(node_id: str, log_path: Path | None = None, **env: str) -> GatewayProcess:
        port = int(env.pop("HERALD_PORT", 0)) or free_port()  # a given port: a restart
        gw = GatewayProcess(
            node_id, port, gateway_env(HERALD_PORT=str(port), HERALD_NODE_ID=node_id, **env),
            log_path=log_path,
        )
        gw.start()
        started.append(gw)
        return gw

    yield spawn
    for gw in started:
        gw.stop()


# -- a real application backend behind the hooks --------------------------------


@pytest.fixture
async def backend() -> AsyncIterator[Any]:
    """A started `tests.backend_app.Backend` (its rules set per test)."""
    from tests.backend_app import Backend

    app = await Backend().start()
    yield app
    await app.stop()


# -- a real PostgreSQL (Debian's), for the change feed ----------------------------


@pytest.fixture(scope="session")
def postgres_process() -> Iterator[Any]:
    from tests.pg import start_postgres

    server, tmp = start_postgres(free_port())
    try:
        yield server
    finally:
        server.stop()
        tmp.cleanup()


@pytest.fixture
def postgres_dsn(postgres_process: Any) -> str:
    """A fresh database on the session's PostgreSQL server."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_process.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres_process.dsn.rsplit("/", 1)[0] + f"/{name}"
