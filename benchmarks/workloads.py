"""The workloads, each run the same way against Herald and against python-socketio.

- W1 broadcast: every connection in one `public:` channel; the publish rate
  is stepped up until p99 passes 250 ms (or a message is lost).
- W2 job fan-out: 1,000 `job:` channels x 5 viewers (the viewers' tokens are
  the job owners', registered before anyone subscribes); stepped the same
  way, after 5,000 deliveries/s held for the latency figure (on fresh servers).
- W3 idle: many connections and nothing else: memory per connection and
  authenticated connects per second.
- Two gateways whose clients watch disjoint job channels: what each reads
  from Redis.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import profile
from benchmarks.procs import SECRET, Cluster, Redis, rss_kib
from benchmarks.steps import Rig, cpu_snapshot, describe, gateway_share, run_step, settle

# Generator framing and publisher per system: the bare Tornado and picows servers speak Herald's.
MODES = {"herald": "herald", "sio": "sio", "tornado": "herald", "picows": "herald"}


@dataclass
class Sizes:
    w1_conns: int
    w2_jobs: int
    w3_conns: int
    pair_jobs: int  # per gateway, in the two-gateway run
    rates: list[int]  # deliveries/s tried by the stepped workloads
    step_s: float
    fixed_rate: int = 5000
    fixed_s: float = 10.0
    pair_rate: int = 4000
    viewers: int = 5
    warmup_s: float = 2.0

    @classmethod
    def full(cls) -> Sizes:
        rates = [*range(5000, 60001, 5000), 70000, 80000, 100000, 120000]
        return cls(2000, 1000, 19500, 200, rates, step_s=5.0)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(200, 100, 1000, 20, [5000, 20000, 40000, 60000], step_s=2.0,
                   fixed_s=3.0, pair_rate=2000, warmup_s=1.0)


@dataclass
class Bench:
    rig: Rig
    redis: Redis
    sizes: Sizes
    logdir: Path
    gateways: int = 1
    profile_dir: Path | None = None
    # Extra HERALD_* settings for the gateways (e.g. HERALD_EVENT_LOOP).
    herald_env: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def say(self, text: str) -> None:
        print(text, flush=True)

    async def cluster(self, system: str, count: int) -> Cluster:
        self.redis.flushall()
        cluster = Cluster(system, self.redis, self.logdir, dict(self.herald_env))
        await asyncio.to_thread(cluster.start, count)
        return cluster

    def publisher_setup(self, system: str, cluster: Cluster) -> dict[str, Any]:
        """How the publisher reaches the servers: straight into Redis here."""
        return {"mode": MODES[system], "redis_url": self.redis.url}

    async def open(self, system: str, cluster: Cluster, conns: list[dict[str, Any]],
                   owners: dict[str, str] | None = None) -> dict[str, Any]:
        await self.rig.pub.call("setup", **self.publisher_setup(system, cluster),
                                owners=owners or {})
        opened = await self.rig.gen.call("open", mode=MODES.get(system, "herald"), secret=SECRET,
                                         ports=cluster.ports, conns=conns)
        self.say(f"  {system}: {opened['opened']} connections in {opened['connect_s']:.1f}s "
                 f"({opened['connects_per_s']:,.0f}/s), {opened['subscriptions']} "
                 f"subscriptions in {opened['subscribe_s']:.1f}s"
                 + (f" ({opened['subscribe_retries']} retried after an error)"
                    if opened["subscribe_retries"] else "")
                 + (f"; FAILED {opened['failed']}: {opened['failures']}" if opened["failed"]
                    else "")
                 + (f"; server errors {opened['errors']}" if opened["errors"] else ""))
        await self.rig.gen.call("reset")
        await settle(cluster)  # the connect storm's after-effects are not the first step's
        return opened

    async def finish(self, cluster: Cluster) -> None:
        await self.rig.gen.call("close_all")
        cluster.stop()

    async def warm_up(self, cluster: Cluster, channels: list[str], per_message: int) -> None:
        """A short step at the lowest rate, not counted: first-publication costs land here."""
        warm = await run_step(self.rig, cluster, channels, self.sizes.rates[0] / per_message,
                              self.sizes.warmup_s)
        self.say(f"    warm-up (not counted): {describe(warm)}")

    async def stepped(self, system: str, cluster: Cluster, channels: list[str],
                      per_message: int) -> dict[str, Any]:
        """Step the rate up; the best passing step is the workload's figure."""
        steps = []
        for rate in self.sizes.rates:
            step = await run_step(self.rig, cluster, channels, rate / per_message,
                                  self.sizes.step_s)
            steps.append(step)
            self.say(f"    {describe(step)}")
            if not step["passed"]:
                break
        good = [s for s in steps if s["passed"]]
        # Nothing passed: the first (lowest) step stands, marked as failed in the table.
        best = max(good, key=lambda s: s["delivered_per_s"]) if good else steps[0]
        return {"best": best, "failed_at": steps[-1] if not steps[-1]["passed"] else None,
                "steps": steps}

    # -- the workloads -----------------------------------------------------

    async def w1(self, system: str) -> None:
        n = self.sizes.w1_conns
        self.say(f"W1 broadcast: {system}, {n} connections in one channel")
        cluster = await self.cluster(system, self.gateways)
        channel = "public:bench-w1"
        conns = [{"u": f"w1-{i}", "g": i % self.gateways, "c": [channel]} for i in range(n)]
        try:
            opened = await self.open(system, cluster, conns)
            await self.warm_up(cluster, [channel], opened["opened"])
            result = await self.stepped(system, cluster, [channel], opened["opened"])
            if self.profile_dir is not None and system == "herald":
                await settle(cluster)
                await self.profiled(cluster, [channel], result["best"]["rate"], "w1")
        finally:
            await self.finish(cluster)
        self.results.setdefault("W1", {})[system] = result

    def w2_conns(self, jobs: range, gateway_of: Any) -> tuple[list[dict[str, Any]], dict]:
        conns = []
        for v in range(self.sizes.viewers):
            for j in jobs:
                conns.append({"u": f"owner-{j}", "g": gateway_of(v * len(jobs) + j, j),
                              "c": [f"job:bench-{j}"]})
        owners = {f"bench-{j}": f"owner-{j}" for j in jobs}
        return conns, owners

    async def w2(self, system: str) -> None:
        jobs = range(self.sizes.w2_jobs)
        self.say(f"W2 job fan-out: {system}, {len(jobs)} job channels x "
                 f"{self.sizes.viewers} viewers")
        cluster = await self.cluster(system, self.gateways)
        conns, owners = self.w2_conns(jobs, lambda i, j: i % self.gateways)
        channels = [f"job:bench-{j}" for j in jobs]
        try:
            await self.open(system, cluster, conns, owners)
            await self.warm_up(cluster, channels, self.sizes.viewers)
            # The fixed rate first, on fresh servers: not after an overloaded step.
            self.say(f"  fixed {self.sizes.fixed_rate:,}/s for {self.sizes.fixed_s:.0f}s:")
            fixed = await run_step(self.rig, cluster, channels,
                                   self.sizes.fixed_rate / self.sizes.viewers,
                                   self.sizes.fixed_s)
            self.say(f"    {describe(fixed)}")
            self.say("  stepped:")
            result = await self.stepped(system, cluster, channels, self.sizes.viewers)
            result["fixed"] = fixed
            if self.profile_dir is not None and system == "herald":
                await settle(cluster)
                await self.profiled(cluster, channels, result["best"]["rate"], "w2")
        finally:
            await self.finish(cluster)
        self.results.setdefault("W2", {})[system] = result

    async def w3(self, system: str) -> None:
        n = self.sizes.w3_conns
        self.say(f"W3 idle: {system}, {n} connections")
        cluster = await self.cluster(system, self.gateways)
        # Each connection: its automatic `user:` channel and one job channel of its own.
        conns = [{"u": f"w3-{i}", "g": i % self.gateways, "c": [f"job:w3-{i}"]}
                 for i in range(n)]
        owners = {f"w3-{i}": f"w3-{i}" for i in range(n)}
        try:
            await asyncio.sleep(1)
            before = [rss_kib(pid) for pid in cluster.pids]
            cpu0 = self.rig_cpu(cluster)
            opened = await self.open(system, cluster, conns, owners)
            cpu1 = self.rig_cpu(cluster)
            gw_cpu_s = gateway_share(cpu1) - gateway_share(cpu0)
            await asyncio.sleep(2)
            after = [rss_kib(pid) for pid in cluster.pids]
            wall = opened["connect_s"]
            result = {
                "connections": opened["opened"],
                "failed": opened["failed"],
                "connects_per_s": opened["connects_per_s"],
                "per_gateway_cpu_s": opened["opened"] / max(gw_cpu_s, 1e-9),
                "rss_before_kib": before,
                "rss_after_kib": after,
                "kib_per_conn": (sum(after) - sum(before)) / max(opened["opened"], 1),
                "cpu": {k: 100 * (cpu1[k] - cpu0[k]) / wall for k in cpu0},
            }
            self.say(f"    {result['kib_per_conn']:.1f} KiB/connection "
                     f"(RSS {sum(before) / 1024:.0f} -> {sum(after) / 1024:.0f} MiB), "
                     f"{result['connects_per_s']:,.0f} connects/s "
                     f"({result['per_gateway_cpu_s']:,.0f}/gateway-CPU-s); cpu% during connects "
                     + " ".join(f"{k} {v:.0f}" for k, v in result["cpu"].items()))
        finally:
            await self.finish(cluster)
        self.results.setdefault("W3", {})[system] = result
        if self.profile_dir is not None and system == "herald":
            await self.profiled_connects(conns, owners, wall)

    def rig_cpu(self, cluster: Cluster) -> dict[str, float]:
        return cpu_snapshot(self.rig.pids(cluster))

    async def pair(self, system: str) -> None:
        """Two servers, disjoint job channels: what each one reads from Redis."""
        k = self.sizes.pair_jobs
        self.say(f"Two servers: {system}, {k} job channels x {self.sizes.viewers} viewers each")
        cluster = await self.cluster(system, 2)
        jobs = range(2 * k)
        conns, owners = self.w2_conns(jobs, lambda i, j: 0 if j < k else 1)
        channels = [f"job:bench-{j}" for j in jobs]
        try:
            await self.open(system, cluster, conns, owners)
            step = await run_step(self.rig, cluster, channels,
                                  self.sizes.pair_rate / self.sizes.viewers, self.sizes.step_s)
            self.say(f"    {describe(step)}")
        finally:
            await self.finish(cluster)
        self.results.setdefault("pair", {})[system] = step

    async def profiled(self, cluster: Cluster, channels: list[str], rate: float,
                       name: str) -> None:
        """The best passing rate (publications/s) again, py-spy sampling the first gateway."""
        assert self.profile_dir is not None
        duration = max(self.sizes.step_s, 10.0)
        out = self.profile_dir / f"{name}.txt"
        spy = await profile.start(cluster.pids[0], duration, out)
        t0 = time.monotonic()
        step = await run_step(self.rig, cluster, channels, rate, duration)
        await profile.finish(spy, max(0.0, duration + 5 - (time.monotonic() - t0)))
        self.say(f"  profiled step ({name}): {describe(step)}")
        self.report_profile(name, out)

    async def profiled_connects(self, conns: list[dict], owners: dict[str, str],
                                seconds: float) -> None:
        """W3's connects again, on a fresh gateway, py-spy sampling it while they open."""
        assert self.profile_dir is not None
        out = self.profile_dir / "w3.txt"
        cluster = await self.cluster("herald", self.gateways)
        try:
            await asyncio.sleep(1)
            spy = await profile.start(cluster.pids[0], max(seconds, 5.0), out)
            opened = await self.open("herald", cluster, conns, owners)
            await profile.finish(spy, 10.0)
        finally:
            await self.finish(cluster)
        self.say(f"  profiled connects (w3): {opened['opened']:,} in {opened['connect_s']:.1f} s")
        self.report_profile("w3", out)

    def report_profile(self, name: str, out: Path) -> None:
        top = profile.top_functions(out)
        self.results.setdefault("profile", {})[name] = top
        for line in profile.format_top(top):
            self.say(f"    {line}")


def load_note() -> str:
    """`uptime`'s load averages: the machine is shared, say how busy it was."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"
