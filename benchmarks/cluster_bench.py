"""Herald's cluster benchmark: Redis + N gateway processes + a C-accelerated load generator.

    python -m benchmarks.cluster_bench --quick      # small sizes, about a minute
    python -m benchmarks.cluster_bench              # full sizes, about 10 minutes

Starts its own redis-server on a free loopback port, then for each workload
(W1 broadcast, W2 job fan-out, W3 idle, two gateways with disjoint
channels) starts fresh servers pinned to core 0 (`taskset -c 0`) — Herald
gateways (`python -m gateway serve`), then python-socketio servers, then
bare Tornado servers (`benchmarks.tornado_server`), then the floor, the same
job on picows + uvloop (`benchmarks.picows_server`) — and drives all with
the same generator (`benchmarks.loadgen`, picows on uvloop) and publisher
(`benchmarks.publisher`), each in its own process on core 1. Prints each
step as it goes and a final table with every figure for each system and
Herald's ratio to each baseline, then the send floor (`benchmarks.send_floor`:
CPU µs the kernel charges one `socket.send` of a W1 frame, at W1's light
step rate and back to back). A measurement, never a
test: nothing is asserted and it exits 0 when it ran to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import orjson

from benchmarks import report, send_floor
from benchmarks.procs import Redis, pin_self_to_client_core, stop_on_sigterm
from benchmarks.rpc import Worker
from benchmarks.steps import Rig
from benchmarks.workloads import Bench, Sizes, load_note

WORKLOADS = ("w1", "w2", "w3", "pair")
SYSTEMS = ("herald", "sio", "tornado", "picows")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--gateways", type=int, default=1,
                        help="gateway processes for W1-W3 (default 1; all on core 0)")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help=f"comma-separated workloads to run (default {','.join(WORKLOADS)})")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated: herald, sio, tornado, picows (default all four)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="also sample the gateway with py-spy: W1/W2 at their best "
                             "rate, W3's connects (a second, profiled pass)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="the gateways' HERALD_EVENT_LOOP (default auto: uvloop)")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"--only: unknown workloads {sorted(unknown)}")
    if set(args.systems.split(",")) - set(SYSTEMS):
        parser.error("--systems: herald, sio, tornado and/or picows")
    if args.gateways < 1:
        parser.error("--gateways must be >= 1")
    return args


async def run(args: argparse.Namespace) -> dict:
    pin_self_to_client_core()
    logdir = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    sizes = Sizes.quick() if args.quick else Sizes.full()
    print(f"herald cluster benchmark ({'quick' if args.quick else 'full'}); "
          f"{os.cpu_count()} cores, {platform.python_version()}, {load_note()}; "
          f"server logs in {logdir}", flush=True)
    redis = await asyncio.to_thread(Redis.start)
    gen = await Worker.start("benchmarks.loadgen", "generator")
    pub = await Worker.start("benchmarks.publisher", "publisher")
    bench = Bench(Rig(gen, pub, redis.pid), redis, sizes, logdir, args.gateways,
                  args.profile, {"HERALD_EVENT_LOOP": args.event_loop})
    started = time.monotonic()
    try:
        for name in args.only.split(","):
            for system in args.systems.split(","):
                await getattr(bench, name)(system)
        if "w1" in args.only.split(","):
            # The kernel's share of one delivery, on the same machine in the same run.
            floor = await asyncio.to_thread(send_floor.run_pinned, sizes.w1_conns,
                                            sizes.rates[0] / sizes.w1_conns, sizes.step_s)
            bench.results["send_floor"] = floor
            print(send_floor.describe(floor), flush=True)
    finally:
        await gen.stop()
        await pub.stop()
        redis.stop()
    bench.results["meta"] = {
        "mode": "quick" if args.quick else "full",
        "seconds": time.monotonic() - started,
        "load_after": load_note(),
        "gateways": args.gateways,
        "event_loop": args.event_loop,
    }
    return bench.results



def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stop_on_sigterm()
    results = asyncio.run(run(args))
    meta = results["meta"]
    print(f"\nresults ({meta['mode']}, {meta['gateways']} gateway(s) for W1-W3, "
          f"event loop {meta['event_loop']}, "
          f"{meta['seconds']:.0f}s, {meta['load_after']} at the end):")
    systems = tuple(args.systems.split(","))
    print(report.render(report.build(results, systems), report.head(systems)))
    if "send_floor" in results:
        print(send_floor.describe(results["send_floor"]))
    if args.json:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
