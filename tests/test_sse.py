"""`GET /sse` (PROTOCOL.md §4) over real HTTP connections to a real gateway.

Ids on every event, `Last-Event-ID` and `since` resume exactly like a
WebSocket `since`, permission problems are HTTP errors before the stream,
heartbeats are comments, tokens expire, and a client that stops reading is
cut at the send-buffer bound instead of growing the gateway's memory.
"""

from __future__ import annotations

import asyncio

from tests.conftest import token
from tests.sse_client import SseStream
from tests.support import publish, register_job


def bearer(sub: str = "alice", **kwargs) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, **kwargs)}"}


async def open_stream(gw, query: str, headers: dict[str, str] | None = None) -> SseStream:
    stream = await SseStream.open(gw.port, f"/sse?{query}", headers)
    assert stream.status == 200, stream.body
    assert stream.headers["content-type"].startswith("text/event-stream")
    first = await stream.event()
    assert first.retry is not None  # EventSource's reconnect delay comes first
    connected = await stream.expect("connected")
    assert connected.data["transport"] == "sse"
    own = await stream.expect("subscribed")  # the automatic user:{sub} channel
    assert own.data["channel"] == f"user:{connected.data['user']}"
    return stream


async def test_events_carry_channel_epoch_offset_ids(gateway):
    await register_job(gateway, "j1", "alice")
    stream = await open_stream(gateway, "channel=job:j1", bearer())
    sub = await stream.expect("subscribed")
    assert sub.data["channel"] == "job:j1"
    assert sub.id == f"job:j1|{sub.data['epoch']}|0"
    assert gateway.node.stats()["connections_by_transport"] == {"sse": 1}
    for n in (1, 2):
        await publish(gateway, "job:j1", "progress", {"n": n})
    for n in (1, 2):
        ev = await stream.expect("message")
        assert ev.id == f"job:j1|{sub.data['epoch']}|{n}"
        assert ev.data["offset"] == n and ev.data["data"] == {"n": n}
        assert ev.data["epoch"] == sub.data["epoch"]
    await stream.close()


async def test_last_event_id_resumes_like_since(gateway):
    await register_job(gateway, "j1", "alice")
    stream = await open_stream(gateway, "channel=job:j1", bearer())
    await stream.expect("subscribed")
    for n in range(1, 4):
        await publish(gateway, "job:j1", "progress", {"n": n})
    seen = [(await stream.expect("message")).id for _ in range(3)]
    await stream.close()
    for n in range(4, 7):  # published while the client was away
        await publish(gateway, "job:j1", "progress", {"n": n})

    resumed = await open_stream(
        gateway, "channel=job:j1", {**bearer(), "Last-Event-ID": seen[1]}
    )
    sub = await resumed.expect("subscribed")
    assert sub.data["recovered"] is True
    offsets = [(await resumed.expect("message")).data["offset"] for _ in range(4)]
    assert offsets == [3, 4, 5, 6]  # from just after Last-Event-ID, no gap, no repeat
    await publish(gateway, "job:j1", "progress", {"n": 7})
    assert (await resumed.expect("message")).data["offset"] == 7  # then live
    await resumed.close()


async def test_since_per_channel_resumes_every_channel(gateway):
    epochs = {}
    for job, count in (("a", 4), ("b", 4)):
        await register_job(gateway, job, "alice")
        for n in range(1, count + 1):
            epochs[job] = (await publish(gateway, f"job:{job}", "progress", {"n": n}))["epoch"]
    query = f"channel=job:a&channel=job:b&since=job:a|{epochs['a']}|2&since=job:b|{epochs['b']}|3"
    stream = await open_stream(gateway, query, bearer())
    got = []
    for _ in range(5):
        ev = await stream.event()
        got.append((ev.type, ev.data["channel"], ev.data.get("recovered", ev.data["offset"])))
    assert got == [
        ("subscribed", "job:a", True), ("message", "job:a", 3), ("message", "job:a", 4),
        ("subscribed", "job:b", True), ("message", "job:b", 4),
    ]
    await stream.close()


async def test_unknown_epoch_gets_recovered_false_and_the_new_epoch(gateway):
    await register_job(gateway, "j1", "alice")
    pos = await publish(gateway, "job:j1", "progress", {"progress": 40})
    stream = await open_stream(
        gateway, "channel=job:j1", {**bearer(), "Last-Event-ID": "job:j1|gone|7"}
    )
    sub = await stream.expect("subscribed")
    assert sub.data["recovered"] is False
    assert (sub.data["offset"], sub.data["state"]) == (0, {})  # the epoch's start...
    assert sub.id == f"job:j1|{pos['epoch']}|0"
    message = await stream.expect("message")  # ...and all of it, since it is complete
    assert (message.data["offset"], message.data["data"]) == (1, {"progress": 40})
    await stream.close()


async def test_the_subscribed_event_id_is_the_position_before_the_replay(gateway):
    """A stream cut during the replay must resume from where the replay stood, not
    from the channel's latest offset (which would skip the rest of the replay)."""
    await register_job(gateway, "j2", "alice")
    for n in range(1, 5):
        pos = await publish(gateway, "job:j2", "progress", {"n": n})
    stream = await open_stream(
        gateway, "channel=job:j2", {**bearer(), "Last-Event-ID": f"job:j2|{pos['epoch']}|1"}
    )
    sub = await stream.expect("subscribed")
    assert sub.data["recovered"] is True and sub.data["offset"] == 4
    assert sub.id == f"job:j2|{pos['epoch']}|1"
    assert [(await stream.expect("message")).id for _ in range(3)] == [
        f"job:j2|{pos['epoch']}|{n}" for n in (2, 3, 4)
    ]
    await stream.close()


async def test_refusals_are_http_errors_before_the_stream(gateway):
    await register_job(gateway, "mine", "alice")
    cases = [
        # (query, headers, status, code)
        ("channel=job:mine", {}, 401, "unauthorized"),  # no token at all
        ("channel=job:mine", {"Authorization": "Bearer nope"}, 401, "unauthorized"),
        ("channel=user:bob", bearer(), 403, "forbidden"),  # another user's channel
        ("channel=job:nobody", bearer(), 404, "not_found"),  # no recorded owner
        ("channel=bad%20name", bearer(), 400, "bad_request"),
        ("channel=job:mine", {**bearer(), "Last-Event-ID": "job:mine|e"}, 400, "bad_request"),
        ("channel=job:mine&since=job:mine|e|x", bearer(), 400, "bad_request"),
        ("channel=job:mine", bearer(ttl=-60), 401, "token_expired"),
    ]
    for query, headers, status, code in cases:
        stream = await SseStream.open(gateway.port, f"/sse?{query}", headers)
        assert (stream.status, stream.json()["error"]) == (status, code), query
        assert stream.headers["content-type"] == "application/json"
        await stream.close()
    assert gateway.node.stats()["connections"] == 0


async def test_too_many_channels_is_refused(make_gateway):
    gw = await make_gateway(max_subscriptions=2)
    stream = await SseStream.open(
        gw.port, "/sse?channel=system:a&channel=system:b", bearer()
    )  # + user:alice = 3
    assert (stream.status, stream.json()["error"]) == (429, "too_many_subscriptions")
    await stream.close()


async def test_query_token_and_cookie(make_gateway):
    gw = await make_gateway()
    stream = await open_stream(gw, f"channel=system:news&token={token('alice')}")
    await stream.close()
    stream = await open_stream(gw, "channel=system:news", {"Cookie": f"herald_token={token()}"})
    await stream.close()
    strict = await make_gateway(allow_query_token=False)
    refused = await SseStream.open(strict.port, f"/sse?channel=system:news&token={token()}")
    assert (refused.status, refused.json()["error"]) == (401, "unauthorized")
    await refused.close()


async def test_heartbeats_are_comments(make_gateway):
    gw = await make_gateway(heartbeat=0.2)
    stream = await open_stream(gw, "channel=system:news", bearer())
    await stream.expect("subscribed")
    ev = await stream.event(timeout=5)
    assert ev.data is None and ev.comments == ["heartbeat"]
    await stream.close()


async def test_expired_token_ends_the_stream(gateway):
    stream = await open_stream(gateway, "channel=system:news", bearer(ttl=1))
    await stream.expect("subscribed")
    err = await stream.expect("error", timeout=10)
    assert err.data["code"] == "token_expired"
    closed = await stream.expect("closed")
    assert closed.data["code"] == 4001
    try:
        await stream.event()
        raise AssertionError("the stream should have ended")
    except EOFError:
        pass
    await stream.close()


async def test_draining_gateway_refuses_new_streams(gateway):
    gateway.node.draining = True
    stream = await SseStream.open(gateway.port, "/sse?channel=system:news", bearer())
    assert (stream.status, stream.json()["error"]) == (503, "unavailable")
    await stream.close()


async def test_server_stop_tells_the_client_to_come_back(make_gateway):
    gw = await make_gateway()
    stream = await open_stream(gw, "channel=system:news", bearer())
    await stream.expect("subscribed")
    await gw.stop()
    closed = await stream.expect("closed")
    assert closed.data["code"] == 1012


async def test_a_client_that_stops_reading_is_cut_at_the_buffer_bound(make_gateway):
    gw = await make_gateway(send_buffer_bytes=256 * 1024)
    stream = await open_stream(gw, "channel=system:flood", bearer())
    await stream.expect("subscribed")
    # Stop reading: the kernel's socket buffers fill, then the gateway's.
    big = {"blob": "x" * 200_000}
    dropped = gw.node.metrics.dropped.labels("slow_consumer")
    for _ in range(400):
        await publish(gw, "system:flood", "blob", big)
        if dropped._value.get() >= 1:
            break
    assert dropped._value.get() == 1
    assert await _gone(gw)
    await stream.close()


async def _gone(gw) -> bool:
    for _ in range(100):
        if gw.node.stats()["connections"] == 0:
            return True
        await asyncio.sleep(0.02)
    return False

