"""One measured step: publish at a rate for a while, let deliveries drain, read every figure.

CPU is read from /proc for every process before and after (gateways,
generator, publisher, redis-server); messages in from Redis from each
server's stats; latency, losses and closes from the generator.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.procs import Cluster, cpu_seconds, wait_seconds
from benchmarks.rpc import Worker

DRAIN_STALL = 2.0  # no new delivery for this long: the rest is lost
DRAIN_CAP = 15.0  # at most this long after the publisher stops
P99_LIMIT_MS = 250.0


@dataclass
class Rig:
    """The client side of a run: generator, publisher, redis-server's pid."""

    gen: Worker
    pub: Worker
    redis_pid: int

    def pids(self, cluster: Cluster) -> dict[str, int]:
        named = {f"gateway-{i}": pid for i, pid in enumerate(cluster.pids)}
        named.update(generator=self.gen.pid, publisher=self.pub.pid, redis=self.redis_pid)
        return named


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each process, and `<name>:wait`, its seconds waiting for a CPU."""
    snap = {name: cpu_seconds(pid) for name, pid in pids.items()}
    snap.update({f"{name}:wait": wait_seconds(pid) for name, pid in pids.items()})
    return snap


def cpu_percent(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    return {name: 100 * (after[name] - before[name]) / wall for name in before}


def gateway_share(cpu: dict[str, float], suffix: str = "") -> float:
    """Summed over the gateways: CPU % (or, with suffix ':wait', waiting-for-CPU %)."""
    return sum(v for k, v in cpu.items()
               if k.startswith("gateway") and k.endswith(suffix) and (suffix or ":" not in k))


async def drain(gen: Worker, expected: int) -> None:
    """Wait until every expected delivery came, or deliveries stopped, or the cap."""
    start = last_change = time.monotonic()
    seen = -1
    while True:
        received = (await gen.call("count"))["received"]
        if received >= expected:
            return
        now = time.monotonic()
        if received != seen:
            seen, last_change = received, now
        elif now - last_change > DRAIN_STALL or now - start > DRAIN_CAP:
            return
        await asyncio.sleep(0.05)


async def settle(cluster: Cluster, idle_percent: float = 10.0, cap: float = 30.0) -> float:
    """Wait until the servers are idle (after a failed step they may still be
    flushing its backlog), so the next step does not inherit it. Returns the wait."""
    start = time.monotonic()
    while time.monotonic() - start < cap:
        before = sum(cpu_seconds(pid) for pid in cluster.pids)
        await asyncio.sleep(0.5)
        busy = sum(cpu_seconds(pid) for pid in cluster.pids) - before
        if 100 * busy / 0.5 < idle_percent * len(cluster.pids):
            break
    return time.monotonic() - start


async def run_step(
    rig: Rig, cluster: Cluster, channels: list[str], rate: float, duration: float
) -> dict[str, Any]:
    """Publish `rate` messages/s over `channels` for `duration` s; every figure of the step."""
    await rig.gen.call("reset")
    pids = rig.pids(cluster)
    in0 = await asyncio.to_thread(cluster.messages_in)
    cpu0, t0 = cpu_snapshot(pids), time.time()
    pub = await rig.pub.call("run", channels=channels, rate=rate, duration=duration)
    expected = (await rig.gen.call("expect", published=pub["published"]))["expected"]
    await drain(rig.gen, expected)
    cpu1, t1 = cpu_snapshot(pids), time.time()
    in1 = await asyncio.to_thread(cluster.messages_in)
    s = await rig.gen.call("summary")
    gw_cpu = gateway_share(cpu1) - gateway_share(cpu0)  # seconds, all gateways
    # Deliveries over the time they took: from the first publish to the last delivery.
    span = max((s["last_at"] or t1) - pub["start"], 1e-9)
    step = {
        "rate": rate,
        "offered_per_s": expected / duration,
        "delivered_per_s": s["received"] / span,
        "received": s["received"],
        "expected": expected,
        "lost": s["missing"],
        "gaps": s["gaps"],
        "dups": s["dups"],
        "closes": s["closes"],
        "errors": s["errors"],
        "open": s["open"],
        "p50_ms": s["p50_ms"],
        "p99_ms": s["p99_ms"],
        "max_ms": s["max_ms"],
        "published": pub["sent"],
        "publish_errors": pub["errors"],
        "publish_rate": pub["achieved_rate"],
        "cpu": cpu_percent(cpu0, cpu1, t1 - t0),
        # Deliveries per second of gateway CPU: what one core of its own would
        # carry at this load, a figure the neighbours on a shared machine barely move.
        "per_gateway_cpu_s": s["received"] / max(gw_cpu, 1e-9),
        # Gateway CPU per delivery and per publication read from Redis (every
        # gateway reads each publication of a channel its clients watch).
        "us_per_delivery": 1e6 * gw_cpu / max(s["received"], 1),
        "us_per_publication": 1e6 * gw_cpu / max(sum(b - a for a, b in zip(in0, in1,
                                                                           strict=True)), 1),
        "messages_in": [b - a for a, b in zip(in0, in1, strict=True)],
    }
    step["passed"] = passed(step)
    return step


def passed(step: dict[str, Any]) -> bool:
    """p99 within the limit, nothing lost, nobody closed."""
    return (step["p99_ms"] <= P99_LIMIT_MS and step["lost"] == 0
            and not step["closes"] and step["received"] > 0)


def describe(step: dict[str, Any]) -> str:
    cpu = step["cpu"]
    gw = "+".join(f"{v:.0f}" for k, v in cpu.items() if k.startswith("gateway") and ":" not in k)
    return (
        f"offered {step['offered_per_s']:>9,.0f}/s delivered {step['delivered_per_s']:>9,.0f}/s "
        f"p50 {step['p50_ms']:7.1f} p99 {step['p99_ms']:7.1f} max {step['max_ms']:7.1f} ms "
        f"lost {step['lost']} closes {sum(step['closes'].values())} "
        f"(published {step['publish_rate']:,.0f}/s) | "
        f"{step['per_gateway_cpu_s']:,.0f}/gateway-CPU-s "
        f"({step['us_per_delivery']:.1f} us/delivery, "
        f"{step['us_per_publication']:.1f} us/publication) | cpu% gw {gw} "
        f"(waiting for a CPU {gateway_share(cpu, ':wait'):.0f}) "
        f"gen {cpu['generator']:.0f} (waiting {cpu['generator:wait']:.0f}) "
        f"pub {cpu['publisher']:.0f} redis {cpu['redis']:.0f}"
        f" | in from redis {step['messages_in']}"
    )
