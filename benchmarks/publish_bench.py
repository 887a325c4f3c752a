"""The publisher benchmark: publications/s and CPU per publish, Redis and HTTP paths.

    python -m benchmarks.publish_bench --quick     # about 30 s
    python -m benchmarks.publish_bench             # about 2 minutes

Runs in one process pinned to core 1 (the publisher under test) with its own
redis-server (core 1) and, for the HTTP path, one gateway (`python -m
gateway serve`, `taskset -c 0`). Every mode publishes the same ~200-byte
progress updates round-robin over 100 `job:` channels whose owners are
registered first, then checks in Redis that every channel's offset grew by
exactly what was sent to it (nothing lost, nothing doubled). In the same run,
two baselines: the gateways' publish script called by EVALSHA on a bare,
hand-encoded RESP connection (the floor for a Python publisher of this
script: `benchmarks.publisher.HeraldSink`), and python-socketio's
`AsyncRedisManager(write_only=True).emit`, one after the other, the way a
Socket.IO backend publishes. A measurement, never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from benchmarks.procs import API_KEY, Cluster, Redis, cpu_seconds, pin_self_to_client_core
from benchmarks.publisher import HeraldSink, SioSink, payload
from benchmarks.workloads import load_note
from gateway.sdk.publisher import HttpPublisher, RedisPublisher

CHANNELS = [f"job:pb-{i}" for i in range(100)]
OWNER = "bench-user"
WINDOW = 1000  # publications in flight at once (concurrent and batch modes)


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def items(start: int, count: int) -> list[tuple[str, int]]:
    n = len(CHANNELS)
    return [(CHANNELS[i % n], i // n + 1) for i in range(start, start + count)]


async def offsets(url: str) -> int:
    client = aioredis.from_url(url)
    try:
        total = 0
        for ch in CHANNELS:
            value = await client.hget(f"herald:{{{ch}}}:meta", "offset")
            total += int(value or 0)
        return total
    finally:
        await client.aclose()


Run = Callable[[list[tuple[str, int]]], Awaitable[None]]


async def sequential(pub: Any, batch: list[tuple[str, int]]) -> None:
    for ch, seq in batch:
        await pub.publish(ch, "progress", payload(ch, seq), owner=OWNER)


async def concurrent(pub: Any, batch: list[tuple[str, int]]) -> None:
    await asyncio.gather(*(pub.publish(ch, "progress", payload(ch, seq), owner=OWNER)
                           for ch, seq in batch))


async def many(pub: Any, batch: list[tuple[str, int]]) -> None:
    await pub.publish_many([{"channel": ch, "event": "progress", "data": payload(ch, seq),
                             "owner": OWNER} for ch, seq in batch])


async def measure(name: str, run: Run, count: int, chunk: int, url: str,
                  gateway_pid: int | None, redis_pid: int, check: bool = True) -> dict[str, Any]:
    before = await offsets(url) if check else 0
    gw0 = cpu_seconds(gateway_pid) if gateway_pid else 0.0
    rd0 = cpu_seconds(redis_pid)
    cpu0, t0 = self_cpu(), time.perf_counter()
    for start in range(0, count, chunk):
        await run(items(start, min(chunk, count - start)))
    wall, cpu = time.perf_counter() - t0, self_cpu() - cpu0
    row = {
        "mode": name,
        "count": count,
        "per_s": count / wall,
        "publisher_us": cpu / count * 1e6,
        "per_publisher_cpu_s": count / max(cpu, 1e-9),
        "redis_us": (cpu_seconds(redis_pid) - rd0) / count * 1e6,
        "gateway_us": (cpu_seconds(gateway_pid) - gw0) / count * 1e6 if gateway_pid else None,
        "landed": (await offsets(url) - before) if check else None,
    }
    gw = f"{row['gateway_us']:7.1f}" if row["gateway_us"] is not None else "      -"
    landed = "-" if row["landed"] is None else f"{row['landed']:,}"
    print(f"  {name:<44} {row['per_s']:>9,.0f}/s  publisher {row['publisher_us']:6.1f} us"
          f"  ({row['per_publisher_cpu_s']:>8,.0f}/CPU-s)  gateway {gw} us"
          f"  redis {row['redis_us']:5.1f} us  landed {landed}/{count:,}", flush=True)
    return row


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    pin_self_to_client_core()
    count = 5000 if args.quick else 50000
    http_count = 2000 if args.quick else 20000
    print(f"publisher benchmark ({'quick' if args.quick else 'full'}); {os.cpu_count()} cores, "
          f"{load_note()}; publisher and redis-server on core 1, gateway on core 0", flush=True)
    redis = await asyncio.to_thread(Redis.start)
    rows: list[dict[str, Any]] = []
    cluster = Cluster("herald", redis, Path(tempfile.mkdtemp(prefix="herald-pubbench-")))
    try:
        rp = RedisPublisher(redis.url)
        for ch in CHANNELS:
            await rp.register_job(ch.partition(":")[2], OWNER)
        # Warm-up: script loaded, connections open.
        await sequential(rp, items(0, 200))
        print("Redis path (RedisPublisher):", flush=True)
        rows.append(await measure("publish, awaited one at a time", lambda b: sequential(rp, b),
                                  min(count, 5000), WINDOW, redis.url, None, redis.pid))
        rows.append(await measure(f"publish, {WINDOW} concurrent (gather)",
                                  lambda b: concurrent(rp, b), count, WINDOW, redis.url, None,
                                  redis.pid))
        if hasattr(rp, "publish_many"):
            rows.append(await measure(f"publish_many, {WINDOW} a call", lambda b: many(rp, b),
                                      count, WINDOW, redis.url, None, redis.pid))
        await rp.close()

        print("baselines in the same run:", flush=True)
        floor = HeraldSink(redis.url, "herald:")
        await floor.setup({})

        async def floor_run(b: list[tuple[str, int]]) -> None:
            await floor.send(b)

        rows.append(await measure(f"floor: publish script over bare RESP, {WINDOW} a batch",
                                  floor_run, count, WINDOW, redis.url, None, redis.pid))
        await floor.close()
        sio = SioSink(redis.url)

        async def sio_run(b: list[tuple[str, int]]) -> None:
            await sio.send(b)

        rows.append(await measure("python-socketio emit, one at a time", sio_run,
                                  min(count, 5000), WINDOW, redis.url, None, redis.pid,
                                  check=False))
        await sio.close()

        print("HTTP path (HttpPublisher -> one gateway on core 0):", flush=True)
        await asyncio.to_thread(cluster.start, 1)
        gw = cluster.servers[0]
        hp = HttpPublisher(f"http://127.0.0.1:{gw.port}", API_KEY)
        await sequential(hp, items(0, 100))
        rows.append(await measure("publish, awaited one at a time", lambda b: sequential(hp, b),
                                  min(http_count, 2000), WINDOW, redis.url, gw.pid, redis.pid))
        rows.append(await measure("publish, 64 concurrent requests", lambda b: concurrent(hp, b),
                                  http_count, 64, redis.url, gw.pid, redis.pid))
        if hasattr(hp, "publish_many"):
            rows.append(await measure("publish_many, 100 a request", lambda b: many(hp, b),
                                      http_count * 5, 100, redis.url, gw.pid, redis.pid))
            rows.append(await measure("publish_many, 1000 a request", lambda b: many(hp, b),
                                      http_count * 5, 1000, redis.url, gw.pid, redis.pid))
        await hp.close()
    finally:
        cluster.stop()
        redis.stop()
    print(f"done; {load_note()} at the end", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (about 30 s)")
    parser.add_argument("--uvloop", action="store_true",
                        help="run the publisher on uvloop (default: the stock asyncio loop)")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
