"""What the durable embedded engine costs: W2 on one gateway, memory engine vs durable, one run.

    python -m benchmarks.durable_bench --quick            # about two minutes
    python -m benchmarks.durable_bench                    # full W2 sizes
    python -m benchmarks.durable_bench --quick --full     # also HERALD_DURABLE_SYNC=full

W2 (job fan-out: job channels x 5 viewers, owners registered first) from
`benchmarks.workloads`, run the same way for each engine on a fresh
`python -m gateway serve` pinned to core 0, with `HERALD_ENGINE=memory`,
then `durable` (its file in a fresh state directory); the generator and
the publisher on core 1 as in the cluster benchmark. Embedded engines have
no Redis to publish into, so the publisher uses the gateway's HTTP API
(`benchmarks.publisher.HttpSink`) for every engine: the ratio compares
like with like. Prints each step, then one table with every figure per
engine and the ratio durable/memory. A measurement, never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.procs import API_KEY, Cluster, Redis, pin_self_to_client_core, stop_on_sigterm
from benchmarks.rpc import Worker
from benchmarks.steps import Rig
from benchmarks.workloads import Bench, Sizes, load_note


class EmbeddedBench(Bench):
    """W2 against one gateway on an embedded engine, published to over HTTP."""

    engines: dict[str, dict[str, str]]

    async def cluster(self, system: str, count: int) -> Cluster:
        env = {"HERALD_STATE_DIR": tempfile.mkdtemp(prefix=f"{system}-", dir=self.logdir),
               **self.engines[system]}
        cluster = Cluster("herald", self.redis, self.logdir, extra_env=env)
        await asyncio.to_thread(cluster.start, count)
        return cluster

    def publisher_setup(self, system: str, cluster: Cluster) -> dict[str, Any]:
        return {"mode": "http", "url": f"http://127.0.0.1:{cluster.ports[0]}",
                "api_key": API_KEY}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--full", action="store_true",
                        help="also the durable engine with HERALD_DURABLE_SYNC=full")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pin_self_to_client_core()
    logdir = Path(tempfile.mkdtemp(prefix="herald-durable-bench-"))
    sizes = Sizes.quick() if args.quick else Sizes.full()
    engines = {"memory": {"HERALD_ENGINE": "memory"},
               "durable": {"HERALD_ENGINE": "durable", "HERALD_DURABLE_SYNC": "normal"}}
    if args.full:
        engines["durable-full"] = {"HERALD_ENGINE": "durable", "HERALD_DURABLE_SYNC": "full"}
    print(f"herald durable-engine benchmark ({'quick' if args.quick else 'full'}); "
          f"{os.cpu_count()} cores, {platform.python_version()}, {load_note()}; "
          f"server logs in {logdir}", flush=True)
    redis = await asyncio.to_thread(Redis.start)  # idle: the rig's figures read its CPU too
    gen = await Worker.start("benchmarks.loadgen", "generator")
    pub = await Worker.start("benchmarks.publisher", "publisher")
    bench = EmbeddedBench(Rig(gen, pub, redis.pid), redis, sizes, logdir)
    bench.engines = engines
    try:
        for system in engines:
            await bench.w2(system)
    finally:
        await gen.stop()
        await pub.stop()
        redis.stop()
    return bench.results["W2"]


def table(results: dict[str, Any]) -> str:
    base = results["memory"]
    out = []
    for name in [n for n in results if n != "memory"]:
        rows = []
        for label, key in (("W2 best (p99<250ms)", "best"), ("W2 fixed 5,000/s", "fixed")):
            steps = {name: results[name][key], "memory": base[key]}
            rows += [r for r in report.step_rows(label, steps, {}, systems=(name, "memory"))
                     if "from Redis" not in r[0]]
        out.append(report.render(rows, head=("figure", name, "memory", f"{name}/memory", "")))
    return "\n\n".join(out)



def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stop_on_sigterm()
    results = asyncio.run(run(args))
    print(f"\nresults ({load_note()} at the end):")
    print(table(results))


if __name__ == "__main__":
    main()
