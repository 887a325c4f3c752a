"""What tracing costs a gateway: delivered messages/s with tracing off, on at 100% and at 1%.

    python benchmarks/tracing_overhead.py [--subscribers 300] [--messages 500] [--rounds 3]

One real redis-server and, per run, one `herald serve` process (Redis
engine) on loopback. `--subscribers` raw WebSocket clients (they only count
frames) sit on one channel; this process publishes `--messages` messages
with `RedisPublisher` and times until every subscriber has every one. The
three modes differ only in `OTEL_*` variables:

- off:  none set (no SDK provider, no exporter);
- 100%: OTLP/HTTP to a receiver in this process, `OTEL_TRACES_SAMPLER=traceidratio`, arg 1;
- 1%:   the same with arg 0.01.

Rounds interleave the modes (off, 100%, 1%, off, ...) so that the machine's
drift hits them alike; the median round is printed, with the gateway's CPU
per delivery (from /proc) which is steadier than wall time on a shared
machine. Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_gateway import FrameCounter, connect_many, cpu_seconds, free_port  # noqa: E402

from gateway.sdk.publisher import RedisPublisher  # noqa: E402
from gateway.security.auth import mint_token  # noqa: E402
from tests.conftest import RedisProcess  # noqa: E402
from tests.otlp_receiver import OtlpReceiver  # noqa: E402

SECRET = "bench-secret-0123456789abcdef0123456789"
CHANNEL = "user:bench"  # every client's own channel: subscribed on connect
MODES = {"off": None, "100%": "1", "1%": "0.01"}


def start_gateway(redis_url: str, otel: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERALD_", "OTEL_"))}
    env.update(
        HERALD_HOST="127.0.0.1", HERALD_PORT=str(port), HERALD_REDIS_URL=redis_url,
        HERALD_JWT_SECRET=SECRET, HERALD_API_KEY="bench-key", HERALD_DEMO="false",
        HERALD_LOG_LEVEL="WARNING", HERALD_DRAIN_SECONDS="1", HERALD_IP_CONNECT_RATE="100000",
        HERALD_IP_CONNECT_BURST="100000", HERALD_MAX_CONNECTIONS_PER_USER="100000",
        HERALD_STATE_DIR=tempfile.mkdtemp(prefix="herald-bench-"), **otel,
    )
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("gateway did not start")


async def one_run(args: argparse.Namespace, redis_url: str, otel: dict[str, str]
                  ) -> tuple[float, float]:
    """(deliveries per second, gateway CPU microseconds per delivery)."""
    proc, port = start_gateway(redis_url, otel)
    clients: list[FrameCounter] = []
    try:
        clients = await connect_many(port, mint_token(SECRET, "bench"), args.subscribers)
        async with RedisPublisher(redis_url) as pub:
            await pub.publish(CHANNEL, "warm", {})  # first Lua load, first fan-out
            await asyncio.gather(*(c.until_texts(3) for c in clients))
            target = 3 + args.messages
            cpu_before = cpu_seconds(proc.pid)
            started = time.perf_counter()
            receivers = asyncio.gather(*(c.until_texts(target) for c in clients))
            for n in range(args.messages):
                await pub.publish(CHANNEL, "tick", {"n": n, "pad": "x" * 100})
            await receivers
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(proc.pid) - cpu_before
    finally:
        for c in clients:
            c.close()
        proc.terminate()  # it flushes its last spans to the receiver in this loop: keep it turning
        await asyncio.to_thread(proc.wait, 60)
    deliveries = args.subscribers * args.messages
    return deliveries / elapsed, cpu * 1e6 / deliveries


async def run(args: argparse.Namespace, redis_url: str) -> None:
    receiver = OtlpReceiver()
    receiver.start()
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    spans: dict[str, int] = dict.fromkeys(MODES, 0)
    for _ in range(args.rounds):
        for mode, ratio in MODES.items():
            otel = {}
            if ratio is not None:
                otel = {"OTEL_TRACES_EXPORTER": "otlp",
                        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                        "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": ratio}
            before = len(receiver.named("herald.deliver"))
            results[mode].append(await one_run(args, redis_url, otel))
            spans[mode] += len(receiver.named("herald.deliver")) - before
    receiver.stop()
    print(f"{args.subscribers} subscribers on one channel, {args.messages} messages per run "
          f"(RedisPublisher), {args.rounds} rounds; one herald serve process + redis-server; "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cores shared by everything")
    base = statistics.median(r[0] for r in results["off"])
    for mode, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"tracing {mode:>4}: {rate:>9,.0f} deliveries/s (median; runs "
              f"{', '.join(f'{r[0]:,.0f}' for r in runs)}), {rate / base:6.1%} of off; "
              f"gateway CPU {cpu:.2f} us/delivery (runs {', '.join(f'{r[1]:.1f}' for r in runs)}); "
              f"delivery spans exported: {spans[mode]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=300)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisProcess(free_port(), Path(tmp))
        redis.start()
        try:
            asyncio.run(run(args, redis.url))
        finally:
            redis.stop()


if __name__ == "__main__":
    main()
