"""Slow consumers: conflated, bounded, closed with 4008, and whole again on resume.

The slow client is a raw socket with a 4 KiB receive buffer that stops
reading, next to a fast `websockets` client on the same channel.
"""

from __future__ import annotations

import asyncio
import itertools

import orjson
import pytest

from gateway.sdk.publisher import HttpPublisher
from tests.conftest import API_KEY, token
from tests.rawws import RawWs

# The WebSocket transport is the event loop's: test it on herald serve's loop too.
pytestmark = pytest.mark.both_loops

NAMESPACES = orjson.dumps({"job": {"history_size": 2000}}).decode()
BOUND = 1024 * 1024


async def test_a_slow_reader_is_conflated_bounded_closed_and_recovers(make_gateway, ws_client):
    gw = await make_gateway(
        namespaces=NAMESPACES, send_buffer_bytes=BOUND, send_buffer_messages=500
    )
    async with HttpPublisher(gw.url, API_KEY) as pub:
        await pub.register_job("J", "owner")
        grant = {"channels": ["job:J"]}
        fast = await ws_client(gw, token("fast", **grant))
        reply = await fast.request({"type": "subscribe", "channel": "job:J"})
        epoch = reply["epoch"]

        slow = await asyncio.to_thread(
            RawWs, gw.port, {"Authorization": f"Bearer {token('slow', **grant)}"}, 4096
        )
        assert slow.status == 101
        slow.send_json({"type": "subscribe", "channel": "job:J", "id": 1})
        await asyncio.sleep(0.2)

        blob = "x" * 8000  # ~8 KB a message: the slow socket fills after a few
        total = 600
        logs = 1000
        final = total + total // 50 + logs

        async def read_fast() -> list[int]:
            return [(await fast.expect("message"))["offset"] for _ in range(final)]

        fast_reader = asyncio.create_task(read_fast())
        peak_pending = 0
        for i in range(1, total + 1):
            await pub.job_progress("J", "owner", "processing", i / total * 100, message=blob)
            if i % 50 == 0:
                await pub.publish("job:J", "log", {"line": i})  # not conflatable
            pending = [s.pending_bytes for s in gw.node.sessions if s.claims.sub == "slow"]
            peak_pending = max([peak_pending, *pending])
        # Conflation keeps a slow job viewer alive: it is still connected, and
        # when it reads it gets the newest progress, with jumps in the offsets.
        assert any(s.claims.sub == "slow" for s in gw.node.sessions)
        seen = await asyncio.to_thread(slow.read_messages_until, "job:J", total + total // 50)
        got = [m["offset"] for m in seen if m["type"] == "message"]
        assert got == sorted(set(got))  # ordered, no duplicate
        assert any(b - a > 1 for a, b in itertools.pairwise(got))  # conflation shows
        assert len(got) < total + total // 50
        progress = [m for m in seen if m.get("event") == "progress"]
        assert progress[-1]["data"]["progress"] == 100.0  # the newest state always arrives
        # Events that cannot be conflated pile up past the bound (the kernel's
        # own socket buffers take up to 4 MiB first): closed with 4008.
        for i in range(logs):
            await pub.publish("job:J", "log", {"line": i, "text": blob})

        # The fast client got every publication, in order, meanwhile.
        assert await fast_reader == list(range(1, final + 1))

    metrics = gw.node.metrics
    assert metrics.registry.get_sample_value("herald_messages_conflated_total") > 0
    assert metrics.registry.get_sample_value("herald_slow_consumers_total") == 1
    dropped = metrics.registry.get_sample_value(
        "herald_messages_dropped_total", {"reason": "slow_consumer"}
    )
    assert dropped > 0
    assert peak_pending <= BOUND  # memory for the slow client never passed its bound

    # It reads again: what was written before the bound, in order, then 4008.
    messages, code = await asyncio.to_thread(slow.read_until_close)
    slow.close()
    assert code == 4008
    more = [m["offset"] for m in messages if m["type"] == "message"]
    assert more == list(range(got[-1] + 1, got[-1] + 1 + len(more)))  # no gap before the cut
    last = more[-1] if more else got[-1]

    # It comes back with `since` and gets everything after what it saw.
    again = await ws_client(gw, token("slow", **grant))
    reply = await again.request(
        {"type": "subscribe", "channel": "job:J", "since": {"epoch": epoch, "offset": last}}
    )
    assert reply["recovered"] is True
    recovered = [(await again.expect("message"))["offset"] for _ in range(final - last)]
    assert recovered == list(range(last + 1, final + 1))
