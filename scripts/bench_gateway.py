"""A first quick measurement of one gateway process (memory engine); prints figures.

    python scripts/bench_gateway.py [--subscribers 1000] [--messages 200] [--idle 2000]

It starts `herald serve` as its own process on a free loopback port with a
throw-away state directory, then from this process:

1. opens `--idle` authenticated WebSocket connections and reads the gateway's
   resident memory (/proc/PID/status VmRSS) before and after: memory per idle
   connection;
2. subscribes `--subscribers` connections to one channel, publishes
   `--messages` messages over the HTTP API, and times until every subscriber
   has every message: deliveries per second (subscribers x messages / time).

The clients are raw sockets that only count frames, so that the client side
(Python too) does not hide the gateway's own speed; it still shares the
machine's cores with the gateway, so the figure is a floor. Nothing is
asserted: this is a measurement, not a test. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def herald(*args: str, env: dict[str, str]) -> str:
    cmd = [sys.executable, "-m", "gateway", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                          cwd=HERE).stdout.strip()


class FrameCounter:
    """A raw WebSocket client that counts server text frames without decoding them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.texts = 0
        self.last_payload = b""

    @classmethod
    async def connect(cls, port: int, token: str) -> FrameCounter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
             f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head.decode(errors="replace"))
        return cls(reader, writer)

    async def frame(self) -> tuple[int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        size = b1 & 0x7F
        if size == 126:
            size = int.from_bytes(await self.reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await self.reader.readexactly(8), "big")
        payload = await self.reader.readexactly(size)
        opcode = b0 & 0x0F
        if opcode == 0x9:  # answer the heartbeat ping (masked pong, as a client must)
            self.writer.write(b"\x8a\x80\x00\x00\x00\x00")
        return opcode, payload

    async def until_texts(self, count: int) -> None:
        while self.texts < count:
            opcode, payload = await self.frame()
            if opcode == 0x1:
                self.texts += 1
                self.last_payload = payload

    def send_text(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        assert len(data) < 126
        self.writer.write(bytes([0x81, 0x80 | len(data)]) + mask + masked)

    def close(self) -> None:
        self.writer.close()


async def publish(port: int, key: str, body: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = json.dumps(body).encode()
    writer.write(
        (f"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {key}\r\n"
         f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
         "Connection: close\r\n\r\n").encode() + raw
    )
    reply = await reader.read()
    writer.close()
    if not reply.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(reply[:200].decode(errors="replace"))


async def connect_many(port: int, token: str, count: int) -> list[FrameCounter]:
    clients = []
    for start in range(0, count, 200):  # in batches: a backlog-friendly ramp
        batch = [FrameCounter.connect(port, token) for _ in range(min(200, count - start))]
        clients += await asyncio.gather(*batch)
    # connected + the automatic subscribed for user:{sub}
    await asyncio.gather(*(c.until_texts(2) for c in clients))
    return clients


def start_gateway() -> tuple[subprocess.Popen[bytes], int, str, str]:
    """`herald serve` in its own process; returns it, its port, a token and the API key."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update(HERALD_STATE_DIR=tempfile.mkdtemp(prefix="herald-bench-"),
               HERALD_LOG_LEVEL="WARNING", HERALD_RATE_BURST="1000000", HERALD_DEMO="false",
               HERALD_IP_CONNECT_RATE="0", HERALD_MAX_CONNECTIONS_PER_USER="0",
               HERALD_ENGINE="memory")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    token = herald("token", "--sub", "bench", "--ttl", "3600", env=env)
    return proc, port, token, herald("api-key", env=env)


async def run(args: argparse.Namespace, proc: subprocess.Popen[bytes], port: int, token: str,
              key: str) -> None:
    print(f"herald serve pid {proc.pid} on :{port} (memory engine), python "
          f"{sys.version.split()[0]}, {os.cpu_count()} cores shared by gateway and clients")
    before = rss_kib(proc.pid)
    idle = await connect_many(port, token, args.idle)
    await asyncio.sleep(0.5)
    after = rss_kib(proc.pid)
    per_conn = (after - before) * 1024 / args.idle
    print(f"idle connections: {args.idle}; gateway RSS {before / 1024:.1f} MiB -> "
          f"{after / 1024:.1f} MiB; {per_conn / 1024:.1f} KiB per idle connection")

    subs = idle[: args.subscribers]
    for c in subs:
        c.send_text({"type": "subscribe", "channel": "public:bench"})
    await asyncio.gather(*(c.until_texts(3) for c in subs))
    target = 3 + args.messages
    cpu_before = cpu_seconds(proc.pid)
    started = time.perf_counter()
    receivers = asyncio.gather(*(c.until_texts(target) for c in subs))
    for n in range(args.messages):
        await publish(port, key, {"channel": "public:bench", "event": "tick",
                                  "data": {"n": n, "pad": "x" * args.size}})
    await receivers
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(proc.pid) - cpu_before
    deliveries = args.subscribers * args.messages
    last = json.loads(subs[-1].last_payload)
    assert last["offset"] == args.messages, last
    print(f"fan-out: {args.messages} messages x {args.subscribers} subscribers = "
          f"{deliveries} deliveries in {elapsed:.2f} s -> {deliveries / elapsed:,.0f} "
          f"deliveries/s ({args.messages / elapsed:,.0f} publications/s, "
          f"~{args.size + 120} B frames); gateway CPU {cpu:.2f} s -> "
          f"{deliveries / max(cpu, 1e-9):,.0f} deliveries per gateway CPU second")
    for c in idle:
        c.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--size", type=int, default=100, help="padding bytes per message")
    args = parser.parse_args()
    args.idle = max(args.idle, args.subscribers)
    proc, port, token, key = start_gateway()
    try:
        asyncio.run(run(args, proc, port, token, key))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
