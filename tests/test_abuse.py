"""Abuse: each case gets its documented answer, and a bystander keeps being served.

Every test keeps one well-behaved client (the bystander) connected next to
the abuser and checks at the end that it still gets a live publication.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import orjson
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado.httpclient import AsyncHTTPClient

from tests.conftest import WsClient, api_headers, token
from tests.rawws import RawWs

# The WebSocket transport is the event loop's: test it on herald serve's loop too.
pytestmark = pytest.mark.both_loops


async def publish(gw, channel: str, data: object) -> None:
    body = {"channel": channel, "event": "note", "data": data}
    await AsyncHTTPClient().fetch(
        f"{gw.url}/api/v1/publish", method="POST", headers=api_headers(), body=orjson.dumps(body)
    )


async def assert_still_served(gw, bystander: WsClient, sub: str = "bystander") -> None:
    await publish(gw, f"user:{sub}", {"still": "here"})
    msg = await bystander.expect("message")
    assert msg["data"] == {"still": "here"}


async def test_connection_attempts_over_the_ip_rate_get_429(make_gateway, ws_client):
    gw = await make_gateway(ip_connect_rate=0.01, ip_connect_burst=3)
    bystander = await ws_client(gw, token("bystander"))  # attempt 1
    await ws_client(gw, token("a"))  # 2
    await ws_client(gw, token("b"))  # 3
    with pytest.raises(websockets.InvalidStatus) as exc:
        await websockets.connect(
            f"ws://127.0.0.1:{gw.port}/ws",
            additional_headers={"Authorization": f"Bearer {token('c')}"},
        )
    assert exc.value.response.status_code == 429
    assert orjson.loads(exc.value.response.body)["error"] == "rate_limited"
    refused = gw.node.metrics.registry.get_sample_value(
        "herald_connections_refused_total", {"reason": "ip_rate"}
    )
    assert refused == 1
    await assert_still_served(gw, bystander)


async def test_connections_past_the_per_user_cap_get_rate_limited_4029(make_gateway, ws_client):
    gw = await make_gateway(max_connections_per_user=2)
    bystander = await ws_client(gw, token("bystander"))
    first = await ws_client(gw, token("greedy"))
    await ws_client(gw, token("greedy"))
    third = await ws_client(gw, token("greedy"), handshake=False)
    err = await third.expect("error")
    assert err["code"] == "rate_limited"
    assert await third.closed() == 4029
    # Closing one frees a slot.
    await first.close()
    await asyncio.sleep(0.1)
    again = await ws_client(gw, token("greedy"), handshake=False)
    assert (await again.recv())["type"] == "connected"
    await assert_still_served(gw, bystander)


async def test_a_slowloris_handshake_is_cut_after_the_handshake_timeout(make_gateway, ws_client):
    gw = await make_gateway(handshake_timeout=0.5)
    bystander = await ws_client(gw, token("bystander"))

    def dribble() -> float:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.settimeout(10)
            s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # ...and never the rest
            assert s.recv(1024) == b""  # the server hung up
        return time.monotonic() - started

    assert await asyncio.to_thread(dribble) < 10
    await assert_still_served(gw, bystander)


async def test_a_subscribe_flood_is_rate_limited_then_closed_4029(make_gateway, ws_client):
    gw = await make_gateway(rate_per_second=5, rate_burst=5, rate_abuse_limit=10)
    bystander = await ws_client(gw, token("bystander"))
    flooder = await ws_client(gw, token("flooder"))
    for i in range(100):
        kind = "subscribe" if i % 2 == 0 else "unsubscribe"
        try:
            await flooder.send({"type": kind, "channel": "public:x", "id": i})
        except websockets.ConnectionClosed:
            break
    codes = []
    try:
        while True:
            codes.append((await flooder.recv())["type"])
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 4029
    assert "error" in codes
    await assert_still_served(gw, bystander)


async def test_invalid_utf8_text_frame_fails_the_connection(make_gateway, ws_client):
    """RFC 6455 §8.1: invalid UTF-8 fails the connection, closed 1007 (invalid data)."""
    gw = await make_gateway()
    bystander = await ws_client(gw, token("bystander"))
    raw = await asyncio.to_thread(
        RawWs, gw.port, {"Authorization": f"Bearer {token('mangler')}"}
    )
    await asyncio.to_thread(raw.send_frame, b'{"type":"ping","x":"\xff\xfe"}')
    messages, code = await asyncio.to_thread(raw.read_until_close)
    assert code == 1007  # said why, and no 1011 or reply to the request
    assert [m["type"] for m in messages] == ["connected", "subscribed"]
    raw.close()
    await assert_still_served(gw, bystander)


async def test_a_frame_of_exactly_the_limit_is_read_and_one_more_byte_is_1009(
    make_gateway, ws_client
):
    gw = await make_gateway(max_frame_bytes=1024)
    bystander = await ws_client(gw, token("bystander"))
    client = await ws_client(gw, token("big"))
    padding = "x" * (1024 - len('{"type":"ping","id":1,"p":""}'))
    exact = '{"type":"ping","id":1,"p":"' + padding + '"}'
    assert len(exact.encode()) == 1024
    await client.conn.send(exact)
    assert (await client.recv())["type"] == "pong"
    await client.conn.send(exact[:-2] + 'x"}')
    assert await client.closed() == 1009
    await assert_still_served(gw, bystander)


# -- fuzzing a live gateway ------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
requests = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "unsubscribe", "ping", "auth", "nope", ""])},
    optional={
        "channel": st.text(max_size=40) | json_values,
        "id": json_values,
        "since": json_values,
        "data": json_values,
        "token": st.text(max_size=50),
    },
)
frames = (
    requests.map(json.dumps)  # stdlib: big integers too, which orjson refuses to read
    | json_values.map(json.dumps)
    | st.text(max_size=200)
    | st.binary(max_size=200)
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(frames, min_size=1, max_size=8))
def test_arbitrary_frames_never_get_1011_or_break_the_gateway(fuzz_gateway, batch):
    """Whatever arrives, the answer is a documented message or close code, never 1011."""
    port, loop = fuzz_gateway

    async def one_connection() -> None:
        conn = await websockets.connect(
            f"ws://127.0.0.1:{port}/ws",
            additional_headers={"Authorization": f"Bearer {token('fuzzer')}"},
        )
        try:
            for frame in batch:
                await conn.send(frame)
            await conn.send(orjson.dumps({"type": "ping", "id": "end"}).decode())
            while True:
                msg = orjson.loads(await asyncio.wait_for(conn.recv(), 5))
                assert msg["type"] in {
                    "connected", "subscribed", "unsubscribed", "pong", "error", "authenticated"
                }
                if msg["type"] == "error":
                    assert msg["code"] != "internal", msg
                if msg.get("id") == "end" and msg["type"] == "pong":
                    break
        except websockets.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            assert code in {None, 1000, 4001, 4029}, code  # auth with a junk token: 4001
        finally:
            await conn.close()

    asyncio.run_coroutine_threadsafe(one_connection(), loop).result(30)


@pytest.fixture(scope="module")
def fuzz_gateway():
    """One gateway on its own loop in a thread, shared by every hypothesis example."""
    import threading

    from tests.conftest import base_settings

    loop = asyncio.new_event_loop()
    ready: dict[str, object] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        from gateway.server import start_gateway

        gw = loop.run_until_complete(start_gateway(base_settings(rate_per_second=1000,
                                                                 rate_burst=1000)))
        ready["gw"] = gw
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while "gw" not in ready:
        time.sleep(0.01)
    gw = ready["gw"]
    yield gw.port, loop
    internal = gw.node.metrics.registry.get_sample_value("herald_errors_total",
                                                        {"code": "internal"})
    assert not internal  # no request ever hit an unexpected exception
    asyncio.run_coroutine_threadsafe(gw.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
