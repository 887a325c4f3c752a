"""Every bound on a connection, and the clear answer a client gets when it crosses it.

A bad request never closes the connection by itself (PROTOCOL.md §2); abuse
(oversized frames, sustained flooding, a client that stops reading) does.
"""

from __future__ import annotations

import orjson
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from gateway.protocol.errors import CloseCode
from tests.conftest import api_headers, token
from tests.support import http, publish

# The WebSocket transport is the event loop's: test it on herald serve's loop too.
pytestmark = pytest.mark.both_loops


async def still_open(client) -> None:
    assert (await client.request({"type": "ping", "id": "alive"}))["type"] == "pong"


async def test_frame_over_max_frame_bytes_closes_1009(make_gateway, ws_client):
    gw = await make_gateway(max_frame_bytes=1024)
    client = await ws_client(gw, token())
    await client.send({"type": "ping", "pad": "x" * 900})  # under the bound: fine
    assert (await client.expect("pong"))["type"] == "pong"
    await client.send({"type": "ping", "pad": "x" * 2000})
    assert await client.closed() == CloseCode.TOO_LARGE


async def test_too_many_subscriptions(make_gateway, ws_client):
    """Past max_subscriptions (own user: channel included) -> too_many_subscriptions."""
    gw = await make_gateway(max_subscriptions=3)
    client = await ws_client(gw, token())
    for channel in ("system:1", "system:2"):
        assert (await client.request({"type": "subscribe", "channel": channel}))[
            "type"] == "subscribed"
    err = await client.request({"type": "subscribe", "channel": "system:3", "id": 1})
    assert err["code"] == "too_many_subscriptions" and "at most 3" in err["message"]
    # Re-subscribing a channel it already has is not a new subscription.
    again = await client.request({"type": "subscribe", "channel": "system:1"})
    assert again["type"] == "subscribed"
    await client.request({"type": "unsubscribe", "channel": "system:1"})
    assert (await client.request({"type": "subscribe", "channel": "system:3"}))[
        "type"] == "subscribed"
    assert gw.node.hub.subscription_count == 3


async def test_rate_limit_then_abuse_closes_4029(make_gateway, ws_client):
    """Over the bucket -> `rate_limited` errors; more than rate_abuse_limit of them -> 4029."""
    gw = await make_gateway(rate_per_second=0.001, rate_burst=3, rate_abuse_limit=2)
    client = await ws_client(gw, token())
    for n in range(3):
        assert (await client.request({"type": "ping", "id": n}))["type"] == "pong"
    for _ in range(2):
        err = await client.request({"type": "ping"})
        assert err["type"] == "error" and err["code"] == "rate_limited"
        assert "slow down" in err["message"]
    await client.send({"type": "ping"})
    err = await client.expect("error")
    assert err["code"] == "rate_limited"
    assert await client.closed() == CloseCode.RATE_LIMIT


async def test_rate_limit_alone_keeps_the_connection(make_gateway, ws_client):
    gw = await make_gateway(rate_per_second=0.001, rate_burst=1, rate_abuse_limit=50)
    client = await ws_client(gw, token())
    await client.request({"type": "ping"})
    assert (await client.request({"type": "ping"}))["code"] == "rate_limited"
    # The connection is still there: publications keep flowing to it.
    await publish(gw, "user:user-1", "still", {})
    assert (await client.expect("message"))["event"] == "still"


async def test_json_nested_too_deep_is_bad_request(make_gateway, ws_client):
    gw = await make_gateway(max_json_depth=4)
    client = await ws_client(gw, token())
    ok = {"type": "ping", "a": {"b": {"c": 1}}}  # depth 3
    assert (await client.request(ok))["type"] == "pong"
    deep = {"type": "ping", "a": {"b": {"c": {"d": {}}}}}  # depth 5
    err = await client.request(deep)
    assert err["code"] == "bad_request" and "nested deeper than 4" in err["message"]
    await client.conn.send("[" * 5000 + "]" * 5000)  # beyond any parser's own limit
    assert (await client.expect("error"))["code"] == "bad_request"
    await still_open(client)


async def test_binary_frame_is_bad_request_and_connection_stays(gateway, ws_client):
    client = await ws_client(gateway, token())
    await client.conn.send(orjson.dumps({"type": "ping"}))  # bytes -> a binary frame
    err = await client.expect("error")
    assert err["code"] == "bad_request" and "binary" in err["message"]
    await still_open(client)


@pytest.mark.parametrize(
    "channel",
    ["nocolon", "ns:", ":name", "sp ace:x", "job:a/b", "job:ä", "x:" + "a" * 254, "", 7, None,
     ["system:a"]],
    ids=["no-colon", "empty-name", "empty-namespace", "space", "slash", "non-ascii",
         "256-bytes", "empty", "number", "null", "list"],
)
async def test_bad_channel_names_are_bad_request(gateway, ws_client, channel):
    client = await ws_client(gateway, token())
    err = await client.request({"type": "subscribe", "channel": channel, "id": 1})
    assert err["type"] == "error" and err["code"] == "bad_request", err
    await still_open(client)


async def test_channel_of_255_bytes_is_accepted(gateway, ws_client):
    client = await ws_client(gateway, token())
    channel = "system:" + "a" * 248
    assert len(channel) == 255
    assert (await client.request({"type": "subscribe", "channel": channel}))[
        "type"] == "subscribed"


# -- Origin allow-list (cross-site WebSocket hijacking) ------------------------------


async def connect_from(gw, origin: str):
    return await websockets.connect(
        f"ws://127.0.0.1:{gw.port}/ws", origin=origin,
        additional_headers={"Authorization": f"Bearer {token()}"},
    )


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example.net", "http://app.example.com", "https://example.org",
     "https://a.example.org.evil.net", "null"],
    ids=["other-site", "wrong-scheme", "bare-domain-for-wildcard", "suffix-trick", "null"],
)
async def test_disallowed_origin_is_refused_at_handshake_403(make_gateway, origin):
    gw = await make_gateway(
        allowed_origins=["https://app.example.com", "https://*.example.org"]
    )
    with pytest.raises(InvalidStatus) as err:
        await connect_from(gw, origin)
    assert err.value.response.status_code == 403


@pytest.mark.parametrize(
    "origin", ["https://app.example.com", "https://APP.example.com/", "https://a.example.org",
               "https://deep.a.example.org"],
)
async def test_allowed_and_wildcard_origins_connect(make_gateway, origin):
    gw = await make_gateway(
        allowed_origins=["https://app.example.com", "https://*.example.org"]
    )
    conn = await connect_from(gw, origin)
    try:
        assert orjson.loads(await conn.recv())["type"] == "connected"
    finally:
        await conn.close()


async def test_default_allows_same_host_only(gateway):
    conn = await connect_from(gateway, f"http://127.0.0.1:{gateway.port}")
    await conn.close()
    with pytest.raises(InvalidStatus) as err:
        await connect_from(gateway, "http://evil.example.net")
    assert err.value.response.status_code == 403


async def test_star_allows_any_origin(make_gateway):
    gw = await make_gateway(allowed_origins=["*"])
    conn = await connect_from(gw, "https://anything.example.net")
    await conn.close()


# -- slow consumers --------------------------------------------------------------------


async def test_client_that_stops_reading_is_closed_4008(make_gateway, ws_client):
    """Outgoing data past send_buffer_bytes for one client -> close 4008 (slow consumer);
    other clients are unaffected."""
    gw = await make_gateway(send_buffer_bytes=256 * 1024)
    # max_queue=1: the client library stops reading the socket once one message waits.
    slow = await ws_client(gw, token("slow"), max_queue=1)
    fast = await ws_client(gw, token("fast"))
    await slow.request({"type": "subscribe", "channel": "public:firehose"})
    await fast.request({"type": "subscribe", "channel": "public:firehose"})
    body = orjson.dumps({"channel": "public:firehose", "event": "blob", "data": "x" * 200_000})
    dropped = 0.0
    for n in range(1000):
        status, _ = await http(gw, "POST", "/api/v1/publish", raw=body, headers=api_headers())
        assert status == 200
        assert (await fast.expect("message"))["offset"] == n + 1
        dropped = gw.node.metrics.registry.get_sample_value(
            "herald_messages_dropped_total", {"reason": "slow_consumer"}) or 0.0
        if dropped:
            break
    assert dropped >= 1
    assert await slow.closed(timeout=10) == CloseCode.SLOW_CONSUMER
    await still_open(fast)
