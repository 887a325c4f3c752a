"""SIGTERM on a loaded gateway: every client is told, moved, and loses nothing."""

from __future__ import annotations

import asyncio
import signal
import time

import orjson
import websockets

from gateway.sdk.publisher import HttpPublisher
from tests.conftest import API_KEY, WsClient
from tests.test_cluster import BIG_HISTORY, connect, http_json

DRAIN = 3.0


async def test_sigterm_drains_every_client_to_another_gateway_with_nothing_lost(
    redis_url, spawn_gateway
):
    env = {"HERALD_REDIS_URL": redis_url, "HERALD_NAMESPACES": BIG_HISTORY,
           "HERALD_DRAIN_SECONDS": str(DRAIN)}
    a = spawn_gateway("gw-a", **env)
    b = spawn_gateway("gw-b", **env)
    channel = "public:load"
    clients = [await connect(a, f"u{i}") for i in range(40)]
    epoch = ""
    for c in clients:
        epoch = (await c.request({"type": "subscribe", "channel": channel}))["epoch"]

    stop = asyncio.Event()
    published = 0

    async def publisher() -> None:
        nonlocal published
        async with HttpPublisher(b.url, API_KEY) as pub:
            while not stop.is_set():
                await pub.publish(channel, "tick", {"n": published})
                published += 1
                await asyncio.sleep(0.005)

    async def until_closed(c: WsClient) -> tuple[list[int], dict | None, int | None]:
        offsets: list[int] = []
        last_control = None
        try:
            while True:
                msg = orjson.loads(await c.conn.recv())
                if msg["type"] == "message":
                    offsets.append(msg["offset"])
                else:
                    last_control = msg
        except websockets.ConnectionClosed as exc:
            return offsets, last_control, exc.rcvd.code if exc.rcvd else None

    pub_task = asyncio.create_task(publisher())
    readers = [asyncio.create_task(until_closed(c)) for c in clients]
    await asyncio.sleep(0.5)
    started = time.monotonic()
    a.signal(signal.SIGTERM)
    # Not ready at once, while it drains.
    assert (await http_json(f"{a.url}/readyz"))[0] == 503
    results = await asyncio.gather(*readers)
    assert a.wait(timeout=DRAIN + 5) == 0
    exited_after = time.monotonic() - started

    for offsets, control, code in results:
        assert code == 1012
        assert control is not None and control["type"] == "reconnect"
        assert control["reason"] == "draining" and control["after_ms"] > 0
        assert offsets == list(range(offsets[0], offsets[-1] + 1))  # no gap while on A

    # Every client comes back on B where it left off, while publishing goes on.
    resumed = []
    for offsets, _, _ in results:
        c = await connect(b, "resumer")
        reply = await c.request(
            {"type": "subscribe", "channel": channel,
             "since": {"epoch": epoch, "offset": offsets[-1]}}
        )
        assert reply["recovered"] is True
        resumed.append((c, offsets))
    stop.set()
    await pub_task
    for c, before in resumed:
        after = []
        while not after or after[-1] < published:
            after.append((await c.expect("message", timeout=10))["offset"])
        assert before + after == list(range(before[0], published + 1))  # nothing lost
        await c.close()
    assert exited_after < DRAIN + 5
