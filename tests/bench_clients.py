"""Fan-out figures for the SSE fallback next to the WebSocket, printed, never asserted.

    python -m tests.bench_clients [--streams 200] [--messages 200]

Starts one `herald serve` process (memory engine) on loopback, opens N SSE
streams and N WebSocket connections (in this process) on one `system:`
channel, publishes M messages over HTTP, and reports how long until every
connection had every message, as deliveries per second per transport.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import orjson
import websockets
from tornado.httpclient import AsyncHTTPClient

from gateway.security.auth import mint_token
from tests.sse_client import SseStream

SECRET = "bench-secret-0123456789abcdef0123456789"
API_KEY = "bench-api-key"


def start_gateway(port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update(HERALD_HOST="127.0.0.1", HERALD_PORT=str(port), HERALD_JWT_SECRET=SECRET,
               HERALD_API_KEY=API_KEY, HERALD_DEMO="false", HERALD_LOG_LEVEL="WARNING",
               HERALD_MAX_SUBSCRIPTIONS="8", HERALD_ENGINE="memory")
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env)


async def wait_up(port: int) -> None:
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise SystemExit("gateway did not start")


async def sse_reader(port: int, tok: str, want: int, ready: asyncio.Event) -> None:
    stream = await SseStream.open(port, "/sse?channel=system:bench",
                                  {"Authorization": f"Bearer {tok}"})
    subscribed = 0
    got = 0
    while got < want:
        ev = await stream.event(60)
        if ev.type == "subscribed":
            subscribed += 1
            if subscribed == 2:
                ready.set()
        elif ev.type == "message":
            got += 1
    await stream.close()


async def ws_reader(port: int, tok: str, want: int, ready: asyncio.Event) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None,
                                  additional_headers={"Authorization": f"Bearer {tok}"}) as ws:
        await ws.send(orjson.dumps({"type": "subscribe", "channel": "system:bench"}).decode())
        got = 0
        while got < want:
            msg = orjson.loads(await ws.recv())
            if msg["type"] == "subscribed" and msg["channel"] == "system:bench":
                ready.set()
            elif msg["type"] == "message":
                got += 1


async def run(transport: str, port: int, streams: int, messages: int) -> float:
    tok = mint_token(SECRET, "bench")
    reader = sse_reader if transport == "sse" else ws_reader
    readies = [asyncio.Event() for _ in range(streams)]
    tasks = [asyncio.ensure_future(reader(port, tok, messages, r)) for r in readies]
    await asyncio.gather(*(r.wait() for r in readies))
    http = AsyncHTTPClient()
    headers = {"Authorization": f"apikey {API_KEY}"}
    body = orjson.dumps({"channel": "system:bench", "event": "tick", "data": {"x": "y" * 100}})
    started = time.perf_counter()
    for _ in range(messages):
        await http.fetch(f"http://127.0.0.1:{port}/api/v1/publish", method="POST",
                         headers=headers, body=body)
    await asyncio.gather(*tasks)
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    port = 18700 + os.getpid() % 200
    proc = start_gateway(port)
    try:
        await wait_up(port)
        for transport in ("ws", "sse"):
            took = await run(transport, port, args.streams, args.messages)
            total = args.streams * args.messages
            print(f"{transport:>3}: {args.streams} connections x {args.messages} messages = "
                  f"{total} deliveries in {took:.2f}s -> {total / took:,.0f} deliveries/s")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
