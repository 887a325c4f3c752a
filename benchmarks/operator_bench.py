"""The operator's timings: failover, scale-up and scale-down, the rebalancing curve.

    python -m benchmarks.operator_bench --quick     # one round each, about 1.5 minutes
    python -m benchmarks.operator_bench             # 3 rounds (medians), about 4 minutes

What is real and what is not:

- **failover** and **scaling** run real `herald-operator run` processes (kopf)
  against the enforcing API-server stand-in of the operator tests
  (`tests/operator_harness.py`: the chart's rendered RBAC on every request,
  CRD pruning, the owner-reference rule) and a real redis-server holding the
  node registry. The gateways are their registry records, written in the
  contract's format (`write_node`) as a gateway writes them every 2 s, and
  `FleetController` plays the ReplicaSet controller: no kubelet runs here.
- **failover**: two peered replicas (`--peering`, priorities 200 and 100,
  `--interval 1`); the active one is SIGKILLed and the spec changed at once;
  measured until the standby logs that it resumed and until the change is
  rolled out. While both are alive the standby must have reconciled
  nothing.
- **scaling**: a load step from 0 to 450 connections at 100 per replica
  (2 -> 5 replicas, `scaleUp.maxStep` 2 per 1 s), then down to 120 (-> 2,
  `scaleDown.stabilizationWindowSeconds` 6, 1 step per 1 s), at a 1 s and a
  10 s reconcile interval.
- **rebalancing** is simulated: the operator's real decision function
  (`herald_operator.rebalance.plan_shed`, what the reconcile pass calls) on
  a modelled fleet of 4 gateways (200 clients on two of them; shed clients
  land on a random gateway 3 s later; each gateway's record is up to 2 s
  old), at 1 s and 10 s intervals for 120 s. Real shed commands reaching real
  gateways are exercised by tests/test_operator_kmock.py and
  tests/test_redis_cluster.py, not timed here.

A measurement, never a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from benchmarks.procs import free_port, stop_on_sigterm
from herald_operator.rebalance import NodeLoad, imbalance, plan_shed
from tests.conftest import RedisProcess
from tests.operator_harness import (
    GATEWAYS,
    Api,
    FleetController,
    OperatorProcess,
    gateway,
    gateway_path,
    kube_server,
    ns_path,
    write_node,
)


async def until(check: Any, bound: float, step: float = 0.05) -> float | None:
    """Seconds until `check()` is truthy, or None after `bound` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < bound:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(step)
    return None


async def deployment(api: Api) -> dict[str, Any] | None:
    return await api.get(ns_path("apps/v1", "deployments", "gw"))


async def replicas(api: Api) -> int | None:
    deploy = await deployment(api)
    return None if deploy is None else deploy["spec"]["replicas"]


# -- failover ---------------------------------------------------------------------


async def failover_round(tmp: Path, redis_url: str) -> dict[str, Any]:
    async with kube_server() as api:
        await api.post(ns_path("kopf.dev/v1", "kopfpeerings"), {
            "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "herald"}})

        def start(priority: int) -> OperatorProcess:
            return OperatorProcess(api, tmp, "--peering", "herald", "--priority", str(priority),
                                   "--interval", "1", "--metrics-port", "0", redis_url=redis_url)

        leader = start(200)
        standby: OperatorProcess | None = None
        try:
            async def logged(proc: OperatorProcess, text: str) -> bool:
                return text in proc.log_tail(10**6)

            if await until(lambda: logged(leader, "Resuming operations"), 30) is None:
                raise RuntimeError("the leader never started:\n" + leader.log_tail())
            standby = start(100)

            async def standby_registered() -> bool:
                peering = await api.get(ns_path("kopf.dev/v1", "kopfpeerings", "herald"))
                return any(p.get("priority") == 100 for p in
                           (peering.get("status") or {}).values() if isinstance(p, dict))
            await until(standby_registered, 30)
            await api.post(GATEWAYS, gateway())
            await until(lambda: deployment(api), 30)
            await asyncio.sleep(2)  # both alive for a few intervals
            double = "reconcile" in standby.log_tail(10**6)

            killed = time.monotonic()
            leader.proc.kill()
            leader.proc.wait()
            await api.patch(gateway_path("gw"), {"spec": {"image": "herald:failover"}})
            resumed = await until(lambda: logged(standby, "Resuming operations"), 60)

            async def rolled_out() -> bool:
                deploy = await deployment(api)
                return bool(deploy) and deploy["spec"]["template"]["spec"]["containers"][0][
                    "image"] == "herald:failover"
            await until(rolled_out, 60)
            return {"resumed_s": resumed, "rolled_out_s": time.monotonic() - killed,
                    "double_reconcile": double}
        finally:
            await leader.stop()
            if standby is not None:
                await standby.stop()


# -- scaling ----------------------------------------------------------------------


async def scaling_round(tmp: Path, redis_url: str, interval: int) -> dict[str, float | None]:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    async with kube_server() as api:
        proc = OperatorProcess(api, tmp, "--standalone", "--interval", str(interval),
                               "--metrics-port", "0", redis_url=redis_url)
        try:
            await api.post(GATEWAYS, gateway())
            async with FleetController(api, "gw") as fleet:
                async def pods_are(n: int) -> bool:
                    return len(await fleet.pods()) == n
                await until(lambda: pods_are(2), 60)

                def load(total: int) -> Any:
                    async def write_and_check(target: int) -> bool:
                        pods = sorted(p["metadata"]["name"] for p in await fleet.pods())
                        for i, pod in enumerate(pods):
                            write_node(client, pod, total // len(pods)
                                       + (1 if i < total % len(pods) else 0))
                        return await replicas(api) == target
                    return write_and_check

                step = load(450)
                up = await until(lambda: step(5), 120, step=0.5)  # records rewritten each check
                step = load(120)
                down = await until(lambda: step(2), 180, step=0.5)
                return {"up_s": up, "down_s": down}
        finally:
            await proc.stop()


# -- rebalancing (simulated fleet, real decision) -----------------------------------


def rebalancing_curve(interval: float, seed: int = 7, seconds: float = 120.0,
                      threshold: float = 0.2, rate: int = 20) -> dict[str, Any]:
    rng = random.Random(seed)
    counts = {"a": 100, "b": 100, "c": 0, "d": 0}
    in_flight: list[tuple[float, int]] = []
    written = {n: (0.0, c) for n, c in counts.items()}
    last_shed: float | None = None
    now, moved, sheds = 0.0, 0, 0
    curve: list[tuple[float, float]] = []
    reentered = 0  # times it went back above the tolerance after being inside it
    inside = False
    while now <= seconds:
        for when, count in [f for f in in_flight if f[0] <= now]:
            for _ in range(count):
                counts[rng.choice(list(counts))] += 1
            in_flight.remove((when, count))
        for n in counts:
            if now - written[n][0] >= 2.0:
                written[n] = (now, counts[n])
        if int(now * 10) % int(interval * 10) == 0:
            plan = plan_shed([NodeLoad(n, c, updated=t) for n, (t, c) in written.items()],
                             now, last_shed, threshold, rate)
            for node, count in plan.shed.items():
                counts[node] -= count
                in_flight.append((now + 3.0, count))
                moved += count
            if plan.shed:
                last_shed, sheds = now, sheds + 1
        off = imbalance(counts.values())
        if off <= threshold and not in_flight:
            inside = True
        elif inside and off > threshold:
            reentered, inside = reentered + 1, False
        if int(now * 10) % 100 == 0:
            curve.append((now, off))
        now = round(now + 0.1, 1)
    return {"curve": curve, "moved": moved, "sheds": sheds, "reentered": reentered,
            "final": imbalance(counts.values()), "counts": dict(counts)}


# -- the run -------------------------------------------------------------------------


def _median(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    missing = len(values) - len(got)
    text = f"{statistics.median(got):.1f} s" if got else "-"
    return text + (f" ({missing} of {len(values)} timed out)" if missing else "")


async def run(args: argparse.Namespace) -> None:
    rounds = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="herald-opbench-") as tmp_dir:
        tmp = Path(tmp_dir)
        redis_proc = RedisProcess(free_port(), tmp)
        redis_proc.start()
        try:
            print(f"operator benchmark ({'quick' if args.quick else 'full'}, {rounds} round(s))")
            fails = [await failover_round(tmp, redis_proc.url) for _ in range(rounds)]
            print("failover (2 peered replicas, --peering-lifetime 6 s, SIGKILL of the active):")
            print(f"  standby resumed after   {_median([f['resumed_s'] for f in fails])}"
                  f"   (rounds: {', '.join(_fmt(f['resumed_s']) for f in fails)})")
            print(f"  change rolled out after {_median([f['rolled_out_s'] for f in fails])}")
            print(f"  rounds where the standby reconciled while the leader lived: "
                  f"{sum(f['double_reconcile'] for f in fails)} of {rounds}")
            for interval in (1, 10):
                scale = [await scaling_round(tmp, redis_proc.url, interval)
                         for _ in range(rounds)]
                print(f"scaling at --interval {interval} s (450 connections at 100/replica, "
                      f"then 120; window 6 s):")
                print(f"  2 -> 5 replicas after the load step: "
                      f"{_median([s['up_s'] for s in scale])}")
                print(f"  5 -> 2 replicas after the drop:      "
                      f"{_median([s['down_s'] for s in scale])}")
        finally:
            redis_proc.stop()
    print("rebalancing, simulated fleet with the operator's real plan_shed "
          "(maxShedPerSecond 20; the spec's default tolerance 20 %, and 15 %):")
    for threshold, interval in ((0.2, 1.0), (0.2, 10.0), (0.15, 1.0), (0.15, 10.0)):
        r = rebalancing_curve(interval, threshold=threshold)
        curve = " ".join(f"{t:.0f}s:{off:.0%}" for t, off in r["curve"])
        print(f"  tolerance {threshold:.0%}, interval {interval:.0f} s: {curve}")
        print(f"    final imbalance {r['final']:.1%} {r['counts']}, moved {r['moved']} clients "
              f"in {r['sheds']} sheds, went back above the tolerance {r['reentered']} times")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of each")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
