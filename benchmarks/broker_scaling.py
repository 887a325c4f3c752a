"""Does the broker tier scale out? The same gateways and generator on 1 and on 3 shards.

    python -m benchmarks.broker_scaling --quick    # about 2 minutes
    python -m benchmarks.broker_scaling            # about 6 minutes

In one run, on fresh servers each time:

1. Throughput. A Redis Cluster of 1 master (every slot), then one of 3
   masters; on each, the same gateway processes (`redis+cluster://`, pinned
   to core 0), the same generator (`benchmarks.loadgen`, many `public:`
   channels with a few viewers each, spread over the gateways) and the same
   publisher (`benchmarks.publisher`: the gateways' publish script ending in
   SPUBLISH, sent to each channel's master). The publication rate is stepped
   up until p99 passes 250 ms or a delivery is lost; the best passing step
   is each figure, and their ratio (3 shards / 1 shard) is printed.
2. Added latency of a sharded delivery: one fixed, moderate rate on the
   single-Redis engine (`redis://`) and on the 3-master cluster; p50 and
   p99 publish-to-client for both, and the difference.

Redis, the generator and the publisher share core 1. On a machine where that
core, not a Redis process, is the limit, the ratio shows what sharding costs
rather than what it gains: read it with the CPU figures printed per step. A
measurement, never a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.procs import SECRET, Cluster, Redis, pin_self_to_client_core
from benchmarks.rpc import Worker
from benchmarks.steps import Rig, describe, run_step, settle
from benchmarks.workloads import load_note
from tests.redis_cluster import RedisCluster


@dataclass
class Sizes:
    channels: int
    viewers: int
    gateways: int
    rates: list[int]  # publications/s tried
    step_s: float
    latency_rate: int
    latency_s: float

    @classmethod
    def full(cls) -> Sizes:
        return cls(1000, 2, 2, [1000, *range(2000, 20001, 2000), 24000, 28000],
                   step_s=5.0, latency_rate=1000, latency_s=10.0)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(200, 2, 2, [1000, 3000, 6000, 9000, 12000], step_s=2.0,
                   latency_rate=1000, latency_s=4.0)


@dataclass
class ShardRig(Rig):
    """The rig with every Redis process of the broker tier in the CPU figures."""

    more_redis: list[int] = field(default_factory=list)

    def pids(self, cluster: Cluster) -> dict[str, int]:
        named = super().pids(cluster)
        named.update({f"redis-{i + 1}": pid for i, pid in enumerate(self.more_redis)})
        return named


class Broker:
    """One broker tier under test: a URL, its processes, and how to stop it."""

    def __init__(self, name: str, url: str, pids: list[int], stop: Any) -> None:
        self.name, self.url, self.pids, self.stop = name, url, pids, stop

    @classmethod
    def cluster(cls, masters: int, root: Path) -> Broker:
        rc = RedisCluster(root / f"c{masters}", masters=masters, replicas=0)
        rc.start()
        pids = [n.proc.pid for n in rc.nodes if n.proc is not None]
        return cls(f"cluster x{masters}", rc.url, pids, rc.stop)

    @classmethod
    def single(cls) -> Broker:
        redis = Redis.start()
        return cls("single redis", redis.url, [redis.pid], redis.stop)


async def measure(gen: Worker, pub: Worker, broker: Broker, sizes: Sizes, logdir: Path,
                  rates: list[int], duration: float) -> list[dict[str, Any]]:
    """Gateways on `broker`, clients subscribed, then one step per rate (stops at a failure)."""
    rig = ShardRig(gen, pub, broker.pids[0], broker.pids[1:])
    # `Cluster` wants a Redis for its environment; the broker's URL overrides it.
    holder = Redis(0, None, "")  # type: ignore[arg-type]
    gws = Cluster("herald", holder, logdir, extra_env={"HERALD_REDIS_URL": broker.url})
    await asyncio.to_thread(gws.start, sizes.gateways)
    channels = [f"public:scale-{i}" for i in range(sizes.channels)]
    conns = [{"u": f"v{v}-{i}", "g": (i + v) % sizes.gateways, "c": [channel]}
             for v in range(sizes.viewers) for i, channel in enumerate(channels)]
    steps = []
    try:
        await pub.call("setup", mode="herald", redis_url=broker.url, owners={})
        opened = await gen.call("open", mode="herald", secret=SECRET, ports=gws.ports,
                                conns=conns)
        print(f"  {broker.name}: {opened['opened']} connections, "
              f"{opened['subscriptions']} subscriptions"
              + (f"; FAILED {opened['failed']}: {opened['failures']}" if opened["failed"] else ""),
              flush=True)
        await gen.call("reset")
        await settle(gws)
        warm = await run_step(rig, gws, channels, rates[0], 1.0)
        print(f"    warm-up (not counted): {describe(warm)}", flush=True)
        for rate in rates:
            step = await run_step(rig, gws, channels, rate, duration)
            step["publications_per_s"] = step["delivered_per_s"] / sizes.viewers
            steps.append(step)
            print(f"    {rate:>6}/s: {describe(step)}", flush=True)
            if not step["passed"]:
                break
            await settle(gws)
    finally:
        await gen.call("close_all")
        gws.stop()
    return steps


def best(steps: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in steps if s["passed"]]
    return max(good, key=lambda s: s["delivered_per_s"]) if good else steps[0]


async def run(args: argparse.Namespace) -> None:
    pin_self_to_client_core()
    sizes = Sizes.quick() if args.quick else Sizes.full()
    logdir = Path(tempfile.mkdtemp(prefix="herald-broker-bench-"))
    print(f"broker tier scaling ({'quick' if args.quick else 'full'}); {os.cpu_count()} cores, "
          f"{platform.python_version()}, {load_note()}; {sizes.gateways} gateways, "
          f"{sizes.channels} channels x {sizes.viewers} viewers; logs in {logdir}", flush=True)
    gen = await Worker.start("benchmarks.loadgen", "generator")
    pub = await Worker.start("benchmarks.publisher", "publisher")
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    try:
        for masters in (1, 3):
            broker = await asyncio.to_thread(Broker.cluster, masters, logdir)
            try:
                print(f"throughput, {broker.name}:", flush=True)
                steps = await measure(gen, pub, broker, sizes, logdir, sizes.rates, sizes.step_s)
                results[f"shards{masters}"] = best(steps)
            finally:
                broker.stop()
        for make in (Broker.single, lambda: Broker.cluster(3, logdir / "lat")):
            broker = await asyncio.to_thread(make)
            try:
                print(f"latency at {sizes.latency_rate}/s, {broker.name}:", flush=True)
                steps = await measure(gen, pub, broker, sizes, logdir, [sizes.latency_rate],
                                      sizes.latency_s)
                results[broker.name] = steps[0]
            finally:
                broker.stop()
    finally:
        await gen.stop()
        await pub.stop()
    one, three = results["shards1"], results["shards3"]
    single, sharded = results["single redis"], results["cluster x3"]
    mark = {True: "", False: " (FAILED: lowest step shown)"}
    print(f"\nresults ({time.monotonic() - started:.0f}s, {load_note()} at the end):")
    print(f"  publications/s carried, 1 shard : {one['publications_per_s']:>9,.0f}"
          f"  (p99 {one['p99_ms']:.1f} ms){mark[one['passed']]}")
    print(f"  publications/s carried, 3 shards: {three['publications_per_s']:>9,.0f}"
          f"  (p99 {three['p99_ms']:.1f} ms){mark[three['passed']]}")
    ratio = three["publications_per_s"] / max(one["publications_per_s"], 1e-9)
    print(f"  ratio 3 shards / 1 shard        : {ratio:>9.2f}")
    print(f"  latency at {sizes.latency_rate}/s, single Redis  : p50 {single['p50_ms']:6.2f} ms"
          f"  p99 {single['p99_ms']:6.2f} ms")
    print(f"  latency at {sizes.latency_rate}/s, 3-shard cluster: p50 {sharded['p50_ms']:6.2f} ms"
          f"  p99 {sharded['p99_ms']:6.2f} ms")
    print(f"  added by sharded delivery       : p50 {sharded['p50_ms'] - single['p50_ms']:+6.2f} ms"
          f"  p99 {sharded['p99_ms'] - single['p99_ms']:+6.2f} ms")


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
