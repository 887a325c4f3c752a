"""The operator as a platform team meets it: failover, scaling and rebalancing times.

    python -m benchmarks.operator_bench --quick   # ~3 min: 1 failover round, 1 s interval
    python -m benchmarks.operator_bench           # ~9 min: 3 rounds, 1 s and 10 s

What is real and what stands in (nothing else is simulated):

- real: `herald-operator run` processes (kopf), `redis-server` (the node
  registry and control channel), `herald serve` gateway processes (they
  write their own registry records every 2 s and obey `shed` by sending
  `reconnect`), WebSocket clients (tests/test_operator_e2e.py's `Client`:
  they follow `reconnect` to whatever gateway the "Service" hands them);
- stand-ins: the Kubernetes API is tests/operator_harness.py's enforcing
  kmock (the chart's RBAC, the CRD's schema); the ReplicaSet controller and
  kubelet are its `FleetController` (a gateway process per pod, SIGTERM on
  removal, lowest pod-deletion-cost first); the Service is a round-robin pick
  over the live gateways (what kube-proxy's IPVS `rr` mode does). A started
  "pod" is ready in about a second (no image pull, no scheduling).

Figures:

1. Failover: two peered replicas (`--peering`, `--peering-lifetime` 6 s);
   while both live, the standby's reconcile counter (its /metrics) must stay
   at 0; then the active one is SIGKILLed and a spec change made at once:
   seconds until the Deployment shows it (the standby acted). Median of rounds.
2. Scale-up after a load step (clients connect to one gateway; target 30 per
   replica): seconds until the registry shows the load, the operator sets the
   Deployment's replicas, and every new gateway is ready. Scale-down after
   most clients leave: seconds to the first step down and to the minimum,
   next to the configured stabilisation window.
3. Rebalancing: after the scale-up the new gateways are empty; imbalance
   (the operator's own `imbalance()`: max |count - mean| / mean, from the
   registry records) every second for 2 minutes, with every `shed` command
   seen on the control channel. It must end below 20 % and not oscillate
   (never back above 20 % once below it). The spec's threshold is 15 %: the
   operator stops once *within* its threshold, so with 20 % it may stop at
   exactly 20 % (36/28/28/28 in one run), not below.

A measurement, never a test: nothing is asserted; it prints what it saw.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis
import redis.asyncio as aioredis

from benchmarks.procs import Redis
from herald_operator.rebalance import imbalance
from tests.conftest import free_port
from tests.operator_harness import (
    GATEWAYS,
    NAMESPACE,
    Api,
    FleetController,
    OperatorProcess,
    gateway_path,
    kube_server,
    ns_path,
)
from tests.test_operator_e2e import JOB, Client, Gateways, Publisher, registry_connections

THRESHOLD = 0.15  # the spec's rebalancing.threshold: stops once within it
BAR = 0.2  # what the run must end below (issue 14)
TARGET = 30  # connections per replica
MAX_REPLICAS = 4


@dataclass
class Sizes:
    rounds: int
    intervals: list[float]
    clients: int
    keep: int
    observe_s: float
    down_window: int
    down_period: int

    @classmethod
    def full(cls) -> Sizes:
        return cls(3, [1.0, 10.0], 120, 20, 120.0, 30, 10)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(1, [1.0], 120, 20, 45.0, 15, 5)


def gateway_body(redis_url: str, sizes: Sizes | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "herald.io/v1alpha1", "kind": "RealtimeGateway",
        "metadata": {"name": "gw", "namespace": NAMESPACE},
        "spec": {"image": "herald:bench", "redis": {"url": redis_url}, "drainSeconds": 2}}
    if sizes is not None:
        body["spec"].update({
            "minReplicas": 1, "maxReplicas": MAX_REPLICAS, "targetConnectionsPerReplica": TARGET,
            "scaleDown": {"stabilizationWindowSeconds": sizes.down_window, "step": 1,
                          "periodSeconds": sizes.down_period},
            "rebalancing": {"enabled": True, "threshold": THRESHOLD, "maxShedPerSecond": 20}})
    body["spec"].update(spec)
    return body


async def replicas(api: Api) -> int:
    deploy = await api.get(ns_path("apps/v1", "deployments", "gw")) or {}
    return int((deploy.get("spec") or {}).get("replicas") or 0)


async def until(check: Any, limit: float, step: float = 0.1) -> float | None:
    """Seconds until `check()` is truthy (polled every `step`), None after `limit` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(step)
    return None


async def reconciles(port: int) -> float:
    """The operator's own count of reconcile passes (its Prometheus endpoint)."""
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}/metrics") as rsp:
        text = await rsp.text()
    return sum(float(m) for m in re.findall(
        r'^herald_operator_reconciles_total\{[^}]*\} (\S+)$', text, re.M))


# -- 1. failover ------------------------------------------------------------------------

async def failover(redis_url: str, tmp: Path, rounds: int) -> dict[str, Any]:
    """A chain of peered replicas, priorities falling: each round starts a new standby
    under the active one, checks it stays idle, SIGKILLs the active one."""
    out: dict[str, Any] = {"seconds": [], "resumed": [], "standby_passes": [],
                           "active_passes": []}
    async with kube_server() as api:
        await api.post(ns_path("kopf.dev/v1", "kopfpeerings"), {
            "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "herald"}})

        def start(priority: int) -> tuple[OperatorProcess, int]:
            port = free_port()
            return OperatorProcess(api, tmp, "--peering", "herald", "--priority", str(priority),
                                   "--interval", "1", "--metrics-port", str(port),
                                   redis_url=redis_url), port

        procs: list[OperatorProcess] = []
        active, active_port = start(1000)
        procs.append(active)
        try:
            await api.post(GATEWAYS, gateway_body(redis_url, autoscale=False, replicas=1))
            assert await until(lambda: replicas(api), 30) is not None, active.log_tail()
            for n in range(rounds):
                standby, standby_port = start(500 - n)
                procs.append(standby)
                await until(lambda s=standby: _logged(s, "Pausing operations"), 30)
                await asyncio.sleep(2)  # the standby sees the peering and stays paused
                before = (await reconciles(active_port), await reconciles(standby_port))
                await asyncio.sleep(5)  # both alive: only the active one may reconcile
                after = (await reconciles(active_port), await reconciles(standby_port))
                out["active_passes"].append(after[0] - before[0])
                out["standby_passes"].append(after[1] - before[1])
                image = f"herald:failover-{n}"
                active.proc.kill()
                killed = time.monotonic()
                active.proc.wait()
                await api.patch(gateway_path("gw"), {"spec": {"image": image}})

                resumed: list[float] = []

                async def acted(image: str = image, standby: OperatorProcess = standby,
                                resumed: list[float] = resumed, killed: float = killed) -> bool:
                    if not resumed and "Resuming operations" in standby.log_tail(10**6):
                        resumed.append(time.monotonic() - killed)
                    deploy = await api.get(ns_path("apps/v1", "deployments", "gw"))
                    return deploy["spec"]["template"]["spec"]["containers"][0]["image"] == image
                await until(acted, 60)
                out["seconds"].append(time.monotonic() - killed)
                out["resumed"].append(resumed[0] if resumed else None)
                active, active_port = standby, standby_port
        finally:
            for proc in procs:
                await proc.stop()
    return out


async def _logged(proc: OperatorProcess, text: str) -> bool:
    return text in proc.log_tail(10**6)


# -- 2 and 3. scaling and rebalancing on real gateways ------------------------------------

@dataclass
class FleetRun:
    interval: float
    load_connected: float = 0.0  # seconds for the clients to connect
    seen: float | None = None  # load step -> the registry shows it
    decided: float | None = None  # load step -> Deployment replicas set
    ready: float | None = None  # load step -> every new gateway ready
    curve: list[tuple[float, dict[str, int], float]] = field(default_factory=list)
    sheds: list[tuple[float, str, int]] = field(default_factory=list)
    reconnects: int = 0
    first_step_down: float | None = None
    at_min: float | None = None


async def fleet(redis_url: str, tmp: Path, sizes: Sizes, interval: float) -> FleetRun:
    run = FleetRun(interval)
    rclient = redis.Redis.from_url(redis_url)
    rclient.flushall()
    control = aioredis.Redis.from_url(redis_url).pubsub()
    await control.psubscribe("herald:control:*")
    clients: list[Client] = []
    async with kube_server() as api:
        gateways = Gateways(redis_url, tmp / f"gw-{interval:g}")
        gateways.tmp.mkdir()
        operator = OperatorProcess(api, tmp, "--standalone", "--interval", str(interval),
                                   "--metrics-port", "0", redis_url=redis_url)
        try:
            async with FleetController(api, "gw", gateways.spawn, gateways.stop):
                await api.post(GATEWAYS, gateway_body(redis_url, sizes))
                assert await until(lambda: _true(len(gateways.live) == 1), 60) is not None, \
                    operator.log_tail()
                await Publisher(gateways).call("/api/v1/jobs", {"job": JOB, "owner": "bench"})

                # The load step: every client lands on the one gateway.
                started = time.monotonic()
                clients = [Client(i, gateways) for i in range(sizes.clients)]
                await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in clients)),
                                       60)
                step = time.monotonic()
                run.load_connected = step - started
                wanted = min(MAX_REPLICAS, -(-sizes.clients // TARGET))
                run.seen = await until(lambda: _true(
                    sum(registry_connections(rclient).values()) >= sizes.clients), 30)
                run.decided = _since(step, await until(
                    lambda: _is(replicas(api), wanted), 120))
                run.ready = _since(step, await until(
                    lambda: _true(len(gateways.live) == wanted), 120))

                # The rebalancing curve, from when the new gateways are up.
                t0 = time.monotonic()
                while (elapsed := time.monotonic() - t0) < sizes.observe_s:
                    counts = {k: v for k, v in registry_connections(rclient).items()
                              if k in gateways.live}
                    run.curve.append((elapsed, counts, imbalance(counts.values())))
                    await _drain_control(control, run, t0)
                    await asyncio.sleep(1.0)
                run.reconnects = sum(c.reconnects for c in clients)

                # The load leaves: scale down after the window, step by step.
                for client in clients[sizes.keep:]:
                    await client.close()
                drop = time.monotonic()
                run.first_step_down = await until(lambda: _below(replicas(api), wanted),
                                                  sizes.down_window + 120, 0.2)
                run.at_min = _since(drop, await until(lambda: _is(replicas(api), 1),
                                                      sizes.down_window + 180, 0.2))
        finally:
            for client in clients:
                await client.close()
            await operator.stop()
            await control.aclose()
    return run


def _since(start: float, took: float | None) -> float | None:
    return None if took is None else time.monotonic() - start


async def _drain_control(control: Any, run: FleetRun, t0: float) -> None:
    while (message := await control.get_message(timeout=0.01)) is not None:
        if message["type"] == "pmessage":
            command = orjson.loads(message["data"])
            if command.get("cmd") == "shed":
                node = message["channel"].decode().rsplit(":", 1)[-1]
                run.sheds.append((time.monotonic() - t0, node, int(command["count"])))


async def _true(value: bool) -> bool:
    return value


async def _is(value: Any, want: int) -> bool:
    return await value == want


async def _below(value: Any, limit: int) -> bool:
    return await value < limit


# -- report -----------------------------------------------------------------------------

def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_failover(out: dict[str, Any]) -> None:
    seconds = [s for s in out["seconds"] if s is not None]
    print("\n1. Failover (2 peered replicas, --interval 1, --peering-lifetime 6, SIGKILL)")
    print("   round  kill->standby resumed  kill->change rolled out  "
          "passes in 5 s both alive: active / standby")
    for i, took in enumerate(out["seconds"]):
        print(f"   {i + 1:>5}  {_fmt(out['resumed'][i]):>21}  {_fmt(took):>23}  "
              f"{out['active_passes'][i]:>6.0f} / {out['standby_passes'][i]:.0f}")
    if seconds:
        print(f"   median kill->acting: {statistics.median(seconds):.1f} s; standby passes "
              f"while both alive: {sum(out['standby_passes']):.0f} (no double reconcile)")


def print_fleet(run: FleetRun, sizes: Sizes) -> None:
    print(f"\n2-3. Interval {run.interval:g} s: {sizes.clients} clients, target {TARGET} per "
          f"replica, min 1 max {MAX_REPLICAS}; threshold {THRESHOLD:.0%}, shed <= 20/s; "
          f"scale-down window {sizes.down_window} s, 1 per {sizes.down_period} s")
    print(f"   load step: clients connected in {run.load_connected:.1f} s; after it: "
          f"registry shows it {_fmt(run.seen)} s, Deployment replicas set "
          f"{_fmt(run.decided)} s, all gateways ready {_fmt(run.ready)} s")
    print("   t(s)  imbalance  connections per gateway (registry)   sheds since last row")
    shed_rows = list(run.sheds)
    inside_at = None
    worst_after = 0.0
    for t, counts, off in run.curve:
        now = [f"{n}-{c}" for at, n, c in shed_rows if at <= t]
        shed_rows = [s for s in shed_rows if s[0] > t]
        per = " ".join(f"{c:>3}" for _, c in sorted(counts.items()))
        print(f"   {t:5.0f}  {off:8.0%}   {per:<36} {' '.join(now)}")
        if off < BAR and inside_at is None:
            inside_at = t
        elif inside_at is not None:
            worst_after = max(worst_after, off)
    final = run.curve[-1][2] if run.curve else float("nan")
    moved = sum(c for _, _, c in run.sheds)
    after = [s for s in run.sheds if inside_at is not None and s[0] > inside_at]
    print(f"   below {BAR:.0%} after {_fmt(inside_at)} s; final {final:.0%}; worst after "
          f"that {worst_after:.0%}; {len(run.sheds)} shed commands moving {moved} clients "
          f"({len(after)} after going below {BAR:.0%}); {run.reconnects} reconnects seen "
          "by clients")
    print(f"   load leaves ({sizes.clients} -> {sizes.keep} clients): first step down after "
          f"{_fmt(run.first_step_down)} s, at 1 replica after {_fmt(run.at_min)} s")


async def main_async(sizes: Sizes) -> None:
    # Every client comes from 127.0.0.1: the per-IP connect rate is a production guard.
    os.environ.update(HERALD_IP_CONNECT_RATE="1000000", HERALD_IP_CONNECT_BURST="1000000")
    server = Redis.start()
    tmp = Path(tempfile.mkdtemp(prefix="herald-opbench-"))
    try:
        print_failover(await failover(server.url, tmp, sizes.rounds))
        for interval in sizes.intervals:
            print_fleet(await fleet(server.url, tmp, sizes, interval), sizes)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 failover round, 1 s interval")
    args = parser.parse_args()
    asyncio.run(main_async(Sizes.quick() if args.quick else Sizes.full()))


if __name__ == "__main__":
    main()
