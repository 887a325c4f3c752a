"""Does the broker tier scale out? The same gateways and generator on 1 and on 3 shards.

    python -m benchmarks.broker_scaling --quick    # about 1 minute, one round
    python -m benchmarks.broker_scaling            # about 8 minutes, 3 alternated rounds

In one run, on fresh servers each time, in alternated rounds (the median is
reported):

1. Throughput. A Redis Cluster of 1 master (every slot), then one of 3
   masters; on each, the same gateway processes (`redis+cluster://`, pinned
   to core 0), the same generator (`benchmarks.loadgen`, many `public:`
   channels with one viewer each, spread over the gateways) and the same
   publisher (`benchmarks.publisher`: the gateways' publish script ending in
   SPUBLISH, sent to each channel's master). The publication rate is stepped
   up until a delivery is lost or less than 90% of the offer is delivered
   as it comes; the best carried step is each figure, with the Redis CPU it
   cost (over the tier, and on the busiest master: what bounds the tier),
   and the ratios 3 shards / 1 shard of both.
2. Added latency of a sharded delivery: one fixed, moderate rate on the
   single-Redis engine (`redis://`) and on the 3-master cluster; p50 and
   p99 publish-to-client for both, and the difference.

Redis, the generator and the publisher share core 1, the gateways core 0.
On such a machine the gateways saturate long before one Redis does, so the
end-to-end ratio shows what sharding costs, not what it gains; the busiest
master's CPU per publication shows the broker tier's own headroom. A
measurement, never a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.procs import SECRET, Cluster, Redis, pin_self_to_client_core, stop_on_sigterm
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
        return cls(1000, 1, 2, [2000, 4000, 8000, 12000, 15000, 18000, 21000, 25000, 30000],
                   step_s=5.0, latency_rate=1000, latency_s=10.0)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(200, 1, 2, [1000, 3000, 6000, 9000, 12000], step_s=2.0,
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
            if not carried(step):
                break
            await settle(gws)
    finally:
        await gen.call("close_all")
        gws.stop()
    return steps


def carried(step: dict[str, Any]) -> bool:
    """The step's offer was carried: nothing lost, and at least 90% delivered as it came."""
    return step["lost"] == 0 and step["delivered_per_s"] >= 0.9 * step["offered_per_s"]


def best(steps: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in steps if carried(s)]
    return max(good, key=lambda s: s["delivered_per_s"]) if good else steps[0]


def median(steps: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The step with the median `key` (the lower middle one of an even count)."""
    ordered = sorted(steps, key=lambda s: s[key])
    return ordered[(len(ordered) - 1) // 2]


def redis_load(step: dict[str, Any]) -> tuple[float, float]:
    """(Redis CPU-seconds per 1,000 publications over the tier, on its busiest process)."""
    cpu = {k: v for k, v in step["cpu"].items() if k.startswith("redis") and ":" not in k}
    rate = max(step["publish_rate"], 1e-9)
    return 10 * sum(cpu.values()) / rate, 10 * max(cpu.values()) / rate


async def run(args: argparse.Namespace) -> None:
    pin_self_to_client_core()
    sizes = Sizes.quick() if args.quick else Sizes.full()
    logdir = Path(tempfile.mkdtemp(prefix="herald-broker-bench-"))
    print(f"broker tier scaling ({'quick' if args.quick else 'full'}); {os.cpu_count()} cores, "
          f"{platform.python_version()}, {load_note()}; {sizes.gateways} gateways, "
          f"{sizes.channels} channels x {sizes.viewers} viewers; logs in {logdir}", flush=True)
    gen = await Worker.start("benchmarks.loadgen", "generator")
    pub = await Worker.start("benchmarks.publisher", "publisher")
    runs: dict[str, list[dict[str, Any]]] = {}
    started = time.monotonic()
    try:
        # Alternated rounds: on a shared machine the neighbours' load drifts,
        # and the median of alternated runs is fairer than one run each.
        for round_no in range(args.rounds):
            order = (1, 3) if round_no % 2 == 0 else (3, 1)
            for masters in order:
                broker = await asyncio.to_thread(Broker.cluster, masters, logdir / f"r{round_no}")
                try:
                    print(f"round {round_no + 1}, throughput, {broker.name}:", flush=True)
                    steps = await measure(gen, pub, broker, sizes, logdir, sizes.rates,
                                          sizes.step_s)
                    runs.setdefault(f"shards{masters}", []).append(best(steps))
                finally:
                    broker.stop()
            makers = [("single redis", Broker.single),
                      ("cluster x3", lambda r=round_no: Broker.cluster(3, logdir / f"l{r}"))]
            for name, make in makers if round_no % 2 == 0 else makers[::-1]:
                broker = await asyncio.to_thread(make)
                try:
                    print(f"round {round_no + 1}, latency at {sizes.latency_rate}/s, "
                          f"{broker.name}:", flush=True)
                    steps = await measure(gen, pub, broker, sizes, logdir, [sizes.latency_rate],
                                          sizes.latency_s)
                    runs.setdefault(name, []).append(steps[0])
                finally:
                    broker.stop()
    finally:
        await gen.stop()
        await pub.stop()
    results = {name: median(steps, "publications_per_s") for name, steps in runs.items()
               if name.startswith("shards")}
    for name in ("single redis", "cluster x3"):
        # Latency: the median p50 and the median p99, each over the rounds.
        results[name] = {q: median(runs[name], q)[q] for q in ("p50_ms", "p99_ms")}
    one, three = results["shards1"], results["shards3"]
    single, sharded = results["single redis"], results["cluster x3"]
    mark = {True: "", False: " (NOT carried: lowest step shown)"}
    print(f"\nresults, median of {args.rounds} round(s) ({time.monotonic() - started:.0f}s, "
          f"{load_note()} at the end):")
    for name, step in (("1 shard ", one), ("3 shards", three)):
        total, busiest = redis_load(step)
        print(f"  publications/s carried, {name}: {step['publications_per_s']:>8,.0f}"
              f"  (p50 {step['p50_ms']:.1f} ms, p99 {step['p99_ms']:.1f} ms; Redis "
              f"{total:.3f} CPU-s per 1,000 over the tier, {busiest:.3f} on the busiest "
              f"master: at most {1000 / max(busiest, 1e-9):,.0f}/s before a master saturates)"
              f"{mark[carried(step)]}")
    ratio = three["publications_per_s"] / max(one["publications_per_s"], 1e-9)
    headroom = redis_load(one)[1] / max(redis_load(three)[1], 1e-9)
    print(f"  ratio 3 shards / 1 shard: {ratio:.2f} end to end; {headroom:.2f} in what the "
          f"busiest master can take")
    print(f"  latency at {sizes.latency_rate}/s, single Redis   : p50 {single['p50_ms']:6.2f} ms"
          f"  p99 {single['p99_ms']:7.2f} ms")
    print(f"  latency at {sizes.latency_rate}/s, 3-shard cluster: p50 {sharded['p50_ms']:6.2f} ms"
          f"  p99 {sharded['p99_ms']:7.2f} ms")
    print(f"  added by the sharded delivery  : p50 {sharded['p50_ms'] - single['p50_ms']:+6.2f} ms"
          f"  p99 {sharded['p99_ms'] - single['p99_ms']:+7.2f} ms")



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 1 minute)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="alternated rounds, the median reported (default 3; --quick 1)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    stop_on_sigterm()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
