"""End to end: the operator scales real `herald serve` processes and no client loses a message.

kmock is the Kubernetes API; `FleetController` turns the Deployment's replica
count into real gateway processes on loopback (sharing a real Redis) and
stops the pods the operator marked cheapest first, with SIGTERM (drain);
a round-robin "Service" in the test hands each (re)connecting client to a live
gateway. Real WebSocket clients watch one job channel while a publisher sends
to it; load makes the operator scale 1 -> 3 (and rebalance), then 3 -> 1.
Every client must end with every message since it subscribed, in order, once.
The timeline is printed (run with `-s` to see it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import websockets

from gateway.security.auth import mint_token
from tests.conftest import API_KEY, SECRET, free_port
from tests.operator_harness import (
    GATEWAYS,
    NAMESPACE,
    FleetController,
    OperatorProcess,
    kube_server,
    ns_path,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

JOB = "e2e"
CHANNEL = f"job:{JOB}"
CLIENTS = 50
KEEP = 15
PUBLISH_EVERY = 0.1


class Gateways:
    """Real gateway processes per pod, and a round-robin Service over the live ones."""

    def __init__(self, redis_url: str, tmp: Path) -> None:
        self.redis_url, self.tmp = redis_url, tmp
        self.ports: dict[str, int] = {}
        self.live: list[str] = []
        self.exit_codes: dict[str, int | None] = {}
        self._rr = itertools.count()

    def _start(self, pod: str, port: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, "HERALD_HOST": "127.0.0.1", "HERALD_PORT": str(port),
               "HERALD_NODE_ID": pod, "POD_NAME": pod, "POD_IP": "127.0.0.1",
               "HERALD_REDIS_URL": self.redis_url, "HERALD_JWT_SECRET": SECRET,
               "HERALD_API_KEY": API_KEY, "HERALD_ENV": "production",
               "HERALD_DRAIN_SECONDS": "2", "HERALD_DEMO": "false",
               "HERALD_STATE_DIR": str(self.tmp / pod), "HERALD_LOG_LEVEL": "WARNING"}
        with open(self.tmp / f"{pod}.log", "wb") as log:
            return subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT)

    async def spawn(self, pod: str) -> subprocess.Popen[bytes]:
        """Start and wait for /readyz; restart on a new port if the chosen one got taken
        meanwhile (as a kubelet would restart the container)."""
        for _attempt in range(3):
            port = free_port()
            proc = self._start(pod, port)
            if await self._ready(proc, port):
                self.ports[pod] = port
                self.live.append(pod)
                return proc
        raise AssertionError((self.tmp / f"{pod}.log").read_text())

    async def _ready(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as rsp:
                        if rsp.status == 200:
                            return True
                if proc.poll() is not None:
                    return False
                await asyncio.sleep(0.05)
        proc.kill()
        return False

    async def stop(self, pod: str, proc: subprocess.Popen[bytes]) -> None:
        """Endpoints first (no new clients), then SIGTERM: the gateway drains and exits."""
        if pod in self.live:
            self.live.remove(pod)
        proc.send_signal(signal.SIGTERM)
        for _ in range(200):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        else:
            proc.kill()
            proc.wait()
        self.exit_codes[pod] = proc.returncode

    def pick(self) -> int | None:
        if not self.live:
            return None
        return self.ports[self.live[next(self._rr) % len(self.live)]]


class Client:
    """A WebSocket client that follows `reconnect` and resumes with `since`."""

    def __init__(self, index: int, gateways: Gateways) -> None:
        self.token = mint_token(SECRET, f"viewer-{index}", channels=[CHANNEL])
        self.gateways = gateways
        self.offsets: list[int] = []
        self.start: int | None = None
        self.epoch: str | None = None
        self.epochs_lost = 0
        self.reconnects = 0
        self.trace: list[str] = []  # what happened to this client, for a failure message
        self.connected = asyncio.Event()
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        while True:
            port = self.gateways.pick()
            delay = 0.05
            if port is not None:
                try:
                    delay = await self._session(port)
                except (OSError, websockets.WebSocketException) as exc:
                    self.trace.append(f"{port}: {type(exc).__name__}")
            await asyncio.sleep(delay)

    async def _session(self, port: int) -> float:
        async with websockets.connect(
                f"ws://127.0.0.1:{port}/ws",
                additional_headers={"Authorization": f"Bearer {self.token}"}) as ws:
            request: dict[str, Any] = {"type": "subscribe", "channel": CHANNEL, "id": 1}
            last = self.offsets[-1] if self.offsets else self.start
            if self.epoch is not None and last is not None:
                request["since"] = {"epoch": self.epoch, "offset": last}
            await ws.send(orjson.dumps(request).decode())
            self.trace.append(f"{port}: connected")
            async for raw in ws:
                msg = orjson.loads(raw)
                if msg["type"] not in ("message", "connected"):
                    self.trace.append(f"{port}: {msg['type']} {msg.get('code', '')}")
                if msg["type"] == "subscribed" and msg.get("channel") == CHANNEL:
                    if self.epoch is not None and msg["epoch"] != self.epoch:
                        self.epochs_lost += 1
                    self.epoch = msg["epoch"]
                    if self.start is None:
                        self.start = msg["offset"]
                    self.connected.set()
                elif msg["type"] == "message" and msg["channel"] == CHANNEL:
                    self.offsets.append(msg["offset"])
                elif msg["type"] == "reconnect":
                    self.reconnects += 1
                    return min(msg.get("after_ms", 100), 3000) / 1000
        self.trace.append(f"{port}: closed {ws.close_code}")
        return 0.05

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def check(self, last: int | None = None) -> None:
        """Contiguous, in order, no duplicate; up to `last` when given."""
        assert self.start is not None
        expected = list(range(self.start + 1, self.start + 1 + len(self.offsets)))
        assert self.offsets == expected, (self.start, self.offsets[:20])
        if last is not None:
            assert self.offsets and self.offsets[-1] == last


class Publisher:
    def __init__(self, gateways: Gateways) -> None:
        self.gateways = gateways
        self.last: int | None = None
        self.count = 0
        self.stopping = False  # finish the publish in flight, then stop: `last` stays exact
        self.task: asyncio.Task[None] | None = None

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": f"apikey {API_KEY}"}
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                port = self.gateways.pick()
                if port is not None:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.post(f"http://127.0.0.1:{port}{path}", json=body,
                                             headers=headers) as rsp:
                            if rsp.status == 200:
                                return await rsp.json()
                await asyncio.sleep(0.05)
        raise AssertionError(f"no gateway accepted {path}")

    async def run(self) -> None:
        while not self.stopping:
            reply = await self.call("/api/v1/publish", {"channel": CHANNEL, "event": "tick",
                                                        "data": {"n": self.count}})
            self.last, self.count = reply["offset"], self.count + 1
            await asyncio.sleep(PUBLISH_EVERY)


def registry_connections(client: redis.Redis) -> dict[str, int]:
    now = time.time()
    ids = client.zrangebyscore("herald:nodes", now - 10, "+inf")
    out = {}
    for node in ids:
        raw = client.get(b"herald:node:" + node)
        if raw:
            out[node.decode()] = orjson.loads(raw)["connections"]
    return out


async def test_operator_scales_real_gateways_and_no_client_loses_a_message(
        redis_url: str, tmp_path: Path) -> None:
    rclient = redis.Redis.from_url(redis_url)
    timeline: list[tuple[float, str, int, int, dict[str, int], int]] = []
    phase = "start"
    async with kube_server() as api:
        gateways = Gateways(redis_url, tmp_path)
        operator = OperatorProcess(api, tmp_path, "--standalone", "--interval", "1",
                                   "--metrics-port", "0", redis_url=redis_url)
        clients: list[Client] = []
        publisher = Publisher(gateways)
        started = time.monotonic()

        async def sample() -> None:
            while True:
                deploy = await api.get(ns_path("apps/v1", "deployments", "gw")) or {}
                replicas = (deploy.get("spec") or {}).get("replicas", 0)
                timeline.append((time.monotonic() - started, phase, replicas,
                                 len(gateways.live), registry_connections(rclient),
                                 publisher.count))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample())
        try:
            async with FleetController(api, "gw", gateways.spawn, gateways.stop) as fleet:
                await api.post(GATEWAYS, {
                    "apiVersion": "herald.io/v1alpha1", "kind": "RealtimeGateway",
                    "metadata": {"name": "gw", "namespace": NAMESPACE},
                    "spec": {"image": "herald:test", "redis": {"url": redis_url},
                             "minReplicas": 1, "maxReplicas": 3,
                             "targetConnectionsPerReplica": 20,
                             "scaleUp": {"maxStep": 2, "periodSeconds": 1},
                             "scaleDown": {"stabilizationWindowSeconds": 4, "step": 1,
                                           "periodSeconds": 1},
                             "drainSeconds": 2,
                             "rebalancing": {"enabled": True, "threshold": 0.2,
                                             "maxShedPerSecond": 10}}})
                await wait_for(lambda: _true(len(gateways.live) == 1), "the first gateway",
                               proc=operator)
                await publisher.call("/api/v1/jobs", {"job": JOB, "owner": "publisher"})
                publisher.task = asyncio.create_task(publisher.run())

                phase = "load"
                clients = [Client(i, gateways) for i in range(CLIENTS)]
                await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in clients)),
                                       30)
                await wait_for(lambda: _true(len(gateways.live) == 3), "3 gateways",
                               timeout=60, proc=operator)
                phase = "rebalance"

                async def balanced():
                    counts = registry_connections(rclient)
                    return len(counts) == 3 and min(counts.values()) >= 10
                await wait_for(balanced, "connections spread over the 3 gateways",
                               timeout=60, proc=operator)

                phase = "unload"
                leaving, staying = clients[KEEP:], clients[:KEEP]
                for client in leaving:
                    await client.close()
                await wait_for(lambda: _true(len(gateways.live) == 1), "back to 1 gateway",
                               timeout=90, proc=operator)
                phase = "settle"
                await asyncio.sleep(2)
                publisher.stopping = True
                await publisher.task
                last = publisher.last
                try:
                    await wait_for(lambda: _true(all(c.offsets and c.offsets[-1] == last
                                                     for c in staying)),
                                   "every staying client to catch up", timeout=30)
                except AssertionError:
                    lagging = [(c.offsets[-1:], c.trace[-6:]) for c in staying
                               if not c.offsets or c.offsets[-1] != last]
                    raise AssertionError(f"last={last} live={gateways.live} "
                                         f"ports={gateways.ports} lagging={lagging}") from None
                removed = list(fleet.removed)
                sampler.cancel()
        finally:
            sampler.cancel()
            for client in clients:
                await client.close()
            if publisher.task is not None:
                publisher.task.cancel()
            await operator.stop()

    _print_timeline(timeline)
    for client in leaving:
        client.check()
    for client in staying:
        client.check(last)
    assert sum(c.epochs_lost for c in clients) == 0
    assert sum(c.reconnects for c in clients) > 0, "nobody was moved: no rebalance, no drain"
    assert len(removed) == 2 and all(gateways.exit_codes[p] == 0 for p in removed), \
        (removed, gateways.exit_codes)
    assert max(row[2] for row in timeline) == 3
    print(f"\n{publisher.count} messages published; {CLIENTS} clients, {KEEP} to the end; "
          f"{sum(c.reconnects for c in clients)} reconnects asked by gateways; "
          f"pods removed {removed}")


async def _true(value: bool) -> bool:
    return value


def _print_timeline(timeline: list[tuple[float, str, int, int, dict[str, int], int]]) -> None:
    print("\n  t(s)  phase      replicas  live  connections per gateway        published")
    for t, phase, replicas, live, conns, published in timeline:
        per = " ".join(f"{k}={v}" for k, v in sorted(conns.items()))
        print(f"{t:6.1f}  {phase:<10} {replicas:>8}  {live:>4}  {per:<30} {published:>9}")
