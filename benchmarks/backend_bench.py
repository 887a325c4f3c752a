"""What the application-facing features cost: the subscribe hook, and presence.

    python -m benchmarks.backend_bench --quick     # about a minute and a half
    python -m benchmarks.backend_bench             # larger sizes, a few minutes

In one run, on fresh servers each time (one Herald gateway pinned to core 0
with `taskset -c 0`, everything else on core 1, a redis-server of its own):

1. **Subscribe, hook off vs on.** `job:` channels, each subscribed once and
   unsubscribed again by `--conns` concurrent WebSocket clients. Off: the
   owner of every job is recorded first (`POST /api/v1/jobs`) and the
   gateway checks it in Redis. On: the namespace has `subscribe_hook` and a
   backend (benchmarks/hook_backend.py, core 1, accepts everything) decides.
   Figures: median and p99 subscribe latency (send to `subscribed`), and
   subscribes per gateway CPU-second.
2. **Presence's cost on delivery: W1 with presence off vs on**
   (benchmarks/workloads.py's W1 broadcast, the same generator and
   publisher as the cluster benchmark), `presence: true` on the `public`
   namespace for the second run. Figures: the best passing W1 step's
   deliveries/s and deliveries per gateway CPU-second.

Ratios (on / off) are printed at the end. A measurement, never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import websockets
from tornado.httpclient import AsyncHTTPClient

from benchmarks.procs import (
    API_KEY,
    SECRET,
    Cluster,
    Proc,
    Redis,
    cpu_seconds,
    free_port,
    pin_self_to_client_core,
)
from benchmarks.rpc import ROOT, Worker
from benchmarks.steps import Rig
from benchmarks.workloads import Bench, Sizes, load_note
from gateway.security.auth import mint_token


@dataclass
class EnvBench(Bench):
    """The cluster benchmark's workloads, on gateways with extra settings."""

    extra_env: dict[str, str] = field(default_factory=dict)

    async def cluster(self, system: str, count: int) -> Cluster:
        self.redis.flushall()
        cluster = Cluster(system, self.redis, self.logdir, dict(self.extra_env))
        await asyncio.to_thread(cluster.start, count)
        return cluster


def start_backend(logdir: Path) -> Proc:
    port = free_port()
    log = logdir / "hook-backend.log"
    popen = subprocess.Popen([sys.executable, "-m", "benchmarks.hook_backend", str(port)],
                             cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    proc = Proc("hook-backend", port, popen, log)
    proc.wait_ready("/readyz")
    return proc


async def register(url: str, jobs: list[str], owner: str) -> None:
    http = AsyncHTTPClient()
    headers = {"Authorization": f"apikey {API_KEY}", "Content-Type": "application/json"}
    for start in range(0, len(jobs), 50):
        await asyncio.gather(*(
            http.fetch(url + "/api/v1/jobs", method="POST", headers=headers,
                       body=orjson.dumps({"job": job, "owner": owner}))
            for job in jobs[start:start + 50]
        ))


async def subscribe_loop(port: int, conn: int, per_conn: int, owner: str) -> list[float]:
    """One client: subscribe and unsubscribe `per_conn` fresh job channels in turn."""
    tok = mint_token(SECRET, owner, ttl=3600)
    latencies = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws",
                                  additional_headers={"Authorization": f"Bearer {tok}"}) as ws:
        for _ in range(2):  # connected, own user channel
            await ws.recv()
        for k in range(per_conn):
            channel = f"job:b-{conn}-{k}"
            started = time.perf_counter()
            await ws.send(orjson.dumps({"type": "subscribe", "channel": channel, "id": k}).decode())
            reply = orjson.loads(await ws.recv())
            latencies.append(time.perf_counter() - started)
            if reply.get("type") != "subscribed":
                raise RuntimeError(f"subscribe refused: {reply}")
            await ws.send(orjson.dumps({"type": "unsubscribe", "channel": channel}).decode())
            await ws.recv()
    return latencies


async def subscribe_run(redis: Redis, logdir: Path, backend: Proc | None, conns: int,
                        per_conn: int) -> dict[str, Any]:
    redis.flushall()
    env: dict[str, str] = {}
    if backend is not None:
        env = {"HERALD_NAMESPACES": orjson.dumps({"job": {"subscribe_hook": True}}).decode(),
               "HERALD_HOOK_URL": f"http://127.0.0.1:{backend.port}/herald",
               "HERALD_HOOK_SUBSCRIBE_PATH": "subscribe",
               "HERALD_HOOK_CONCURRENCY": str(max(64, conns))}
    cluster = Cluster("herald", redis, logdir, env)
    await asyncio.to_thread(cluster.start, 1)
    try:
        port, pid = cluster.ports[0], cluster.pids[0]
        if backend is None:
            jobs = [f"b-{c}-{k}" for c in range(conns) for k in range(per_conn)]
            await register(f"http://127.0.0.1:{port}", jobs, "bench-owner")
        await asyncio.sleep(1.0)  # the registration's after-effects are not measured
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        runs = await asyncio.gather(*(subscribe_loop(port, c, per_conn, "bench-owner")
                                      for c in range(conns)))
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
    finally:
        cluster.stop()
    latencies = sorted(x for run in runs for x in run)
    total = len(latencies)
    return {
        "subscribes": total,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(total - 1, int(total * 0.99))] * 1000,
        "per_s": total / (t1 - t0),
        "per_gateway_cpu_s": total / max(cpu1 - cpu0, 1e-9),
    }


def _ratio(on: float, off: float) -> str:
    return f"{on / off:.2f}" if off else "-"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pin_self_to_client_core()
    logdir = Path(tempfile.mkdtemp(prefix="herald-backend-bench-"))
    sizes = Sizes.quick() if args.quick else Sizes.full()
    conns, per_conn = (20, 50) if args.quick else (50, 100)
    print(f"herald backend benchmark ({'quick' if args.quick else 'full'}); {os.cpu_count()} "
          f"cores, {platform.python_version()}, {load_note()}; logs in {logdir}", flush=True)
    redis = await asyncio.to_thread(Redis.start)
    backend = start_backend(logdir)
    results: dict[str, Any] = {}
    try:
        for mode in ("off", "on"):
            r = await subscribe_run(redis, logdir, backend if mode == "on" else None, conns,
                                    per_conn)
            results.setdefault("subscribe", {})[mode] = r
            print(f"subscribe, hook {mode}: {r['subscribes']} subscribes, p50 "
                  f"{r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms, {r['per_s']:,.0f}/s, "
                  f"{r['per_gateway_cpu_s']:,.0f} per gateway CPU-s", flush=True)
        gen = await Worker.start("benchmarks.loadgen", "generator")
        pub = await Worker.start("benchmarks.publisher", "publisher")
        try:
            presence = {"public": {"access": "authenticated", "presence": True,
                                   "presence_limit": 100_000}}
            for mode, env in (("off", {}),
                              ("on", {"HERALD_NAMESPACES": orjson.dumps(presence).decode()})):
                print(f"W1 with presence {mode}", flush=True)
                bench = EnvBench(Rig(gen, pub, redis.pid), redis, sizes, logdir, 1,
                                 extra_env=env)
                await bench.w1("herald")
                results.setdefault("w1", {})[mode] = bench.results["W1"]["herald"]
        finally:
            await gen.stop()
            await pub.stop()
    finally:
        backend.stop()
        redis.stop()
    s, w1 = results["subscribe"], results["w1"]
    w = {mode: r["best"] for mode, r in w1.items()}
    # The same offered load in both runs: the highest rate both passed (else the first).
    passed = [{st["rate"]: st for st in w1[m]["steps"] if st["passed"]} for m in ("off", "on")]
    rates = sorted(set(passed[0]) & set(passed[1]))
    same = ({m: passed[i][rates[-1]] for i, m in enumerate(("off", "on"))} if rates
            else {m: w1[m]["steps"][0] for m in ("off", "on")})
    print(f"\nresults ({'quick' if args.quick else 'full'}, {load_note()} at the end):")
    rows = [
        ("subscribe p50 latency (ms)", s["off"]["p50_ms"], s["on"]["p50_ms"]),
        ("subscribe p99 latency (ms)", s["off"]["p99_ms"], s["on"]["p99_ms"]),
        ("subscribes/s", s["off"]["per_s"], s["on"]["per_s"]),
        ("subscribes per gateway CPU-s", s["off"]["per_gateway_cpu_s"],
         s["on"]["per_gateway_cpu_s"]),
        ("W1 best passing deliveries/s", w["off"]["delivered_per_s"],
         w["on"]["delivered_per_s"]),
        (f"W1 at {same['off']['offered_per_s']:,.0f}/s: deliveries/gw CPU-s",
         same["off"]["per_gateway_cpu_s"], same["on"]["per_gateway_cpu_s"]),
        ("W1 at that rate: p99 (ms)", same["off"]["p99_ms"], same["on"]["p99_ms"]),
    ]
    print(f"{'figure':40} {'off':>12} {'on':>12} {'on/off':>8}")
    for name, off, on in rows:
        print(f"{name:40} {off:12,.2f} {on:12,.2f} {_ratio(on, off):>8}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    if args.json:
        with contextlib.suppress(OSError):
            args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
