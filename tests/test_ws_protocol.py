"""`/ws` message by message (PROTOCOL.md §2): every message type, request ids, errors.

Each test drives a real in-process gateway with a real `websockets` client.
"""

from __future__ import annotations

import asyncio
import socket
import time

import orjson
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from gateway.protocol.errors import CloseCode
from tests.conftest import token
from tests.support import publish, register_job

# The WebSocket transport is the event loop's: test it on herald serve's loop too.
pytestmark = pytest.mark.both_loops


async def test_connected_describes_the_connection(gateway, ws_client):
    """`connected` carries client, node, user, heartbeat, expires and timestamp."""
    client = await ws_client(gateway, token("alice", ttl=600), handshake=False)
    connected = await client.expect("connected")
    assert connected["client"].startswith("c-")
    assert connected["node"] == "gw-test"
    assert connected["user"] == "alice"
    assert connected["heartbeat"] == 25
    assert abs(connected["expires"] - (time.time() + 600)) < 10
    assert connected["timestamp"].endswith("Z")
    own = await client.expect("subscribed")
    assert own["channel"] == "user:alice"
    assert "id" not in own  # nobody asked for it: Herald's automatic subscription
    assert isinstance(own["epoch"], str) and own["offset"] == 0


async def test_client_ids_are_unique_per_connection(gateway, ws_client):
    a = await ws_client(gateway, token("alice"), handshake=False)
    b = await ws_client(gateway, token("alice"), handshake=False)
    assert (await a.expect("connected"))["client"] != (await b.expect("connected"))["client"]


async def test_ping_gets_pong_with_echoed_id(gateway, ws_client):
    client = await ws_client(gateway, token())
    pong = await client.request({"type": "ping", "id": 6})
    assert pong["type"] == "pong" and pong["id"] == 6 and pong["timestamp"].endswith("Z")
    pong = await client.request({"type": "ping", "id": "abc"})
    assert pong["id"] == "abc"
    pong = await client.request({"type": "ping"})
    assert "id" not in pong


async def test_subscribe_message_unsubscribe_cycle(gateway, ws_client):
    client = await ws_client(gateway, token())
    sub = await client.request({"type": "subscribe", "channel": "system:news", "id": 2})
    assert sub == {
        "type": "subscribed", "id": 2, "channel": "system:news",
        "epoch": sub["epoch"], "offset": 0,
    }
    pos = await publish(gateway, "system:news", "notice", {"text": "hi"})
    msg = await client.expect("message")
    assert msg["channel"] == "system:news" and msg["event"] == "notice"
    assert msg["data"] == {"text": "hi"}
    assert msg["epoch"] == pos["epoch"] == sub["epoch"]  # Herald extension: epoch in messages
    assert msg["offset"] == 1 and msg["timestamp"].endswith("Z")
    unsub = await client.request({"type": "unsubscribe", "channel": "system:news", "id": 5})
    assert unsub == {"type": "unsubscribed", "id": 5, "channel": "system:news"}
    await publish(gateway, "system:news", "notice", {"text": "after"})
    await publish(gateway, "user:user-1", "marker", {})
    # After unsubscribing, the next thing received is the marker on the own channel.
    assert (await client.expect("message"))["event"] == "marker"


async def test_offsets_count_up_by_one(gateway, ws_client):
    client = await ws_client(gateway, token())
    await client.request({"type": "subscribe", "channel": "public:ticks"})
    for n in range(5):
        await publish(gateway, "public:ticks", "tick", n)
    offsets = [(await client.expect("message"))["offset"] for _ in range(5)]
    assert offsets == [1, 2, 3, 4, 5]


async def test_job_id_shorthand_subscribes_job_channel(gateway, ws_client):
    await register_job(gateway, "550e8400", "user-1")
    client = await ws_client(gateway, token())
    sub = await client.request({"type": "subscribe", "data": {"jobId": "550e8400"}, "id": 4})
    assert sub["type"] == "subscribed" and sub["channel"] == "job:550e8400" and sub["id"] == 4
    assert sub["state"] == {}  # job: channels carry a state snapshot


async def test_subscribe_twice_is_idempotent(gateway, ws_client):
    client = await ws_client(gateway, token())
    await client.request({"type": "subscribe", "channel": "system:a"})
    again = await client.request({"type": "subscribe", "channel": "system:a"})
    assert again["type"] == "subscribed"
    await publish(gateway, "system:a", "x", 1)
    await publish(gateway, "user:user-1", "marker", {})
    assert (await client.expect("message"))["channel"] == "system:a"
    assert (await client.expect("message"))["event"] == "marker"  # delivered once, not twice


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        ({"type": "launch"}, "unknown message type"),
        ({"id": 1}, "unknown message type"),
        ({"type": "ping", "id": 1.5}, "id must be"),
        ({"type": "ping", "id": True}, "id must be"),
        ({"type": "subscribe"}, "channel must be"),
        ({"type": "subscribe", "data": {"jobId": "a b"}}, "channel may only"),
        ({"type": "unsubscribe", "channel": 5}, "channel must be"),
        ({"type": "subscribe", "channel": "system:a", "since": 3}, "since must be"),
        ({"type": "subscribe", "channel": "system:a", "since": {"epoch": "e"}}, "since must be"),
        ({"type": "subscribe", "channel": "system:a",
          "since": {"epoch": "e", "offset": -1}}, "since must be"),
    ],
)
async def test_bad_requests_get_bad_request_and_keep_connection(
    gateway, ws_client, request_, says
):
    """Each malformed request -> `error` `bad_request` naming the problem; still open."""
    client = await ws_client(gateway, token())
    err = await client.request(request_)
    assert err["type"] == "error" and err["code"] == "bad_request"
    assert says in err["message"]
    assert err["timestamp"].endswith("Z")
    assert (await client.request({"type": "ping"}))["type"] == "pong"


@pytest.mark.parametrize("raw", ["not json", "[1,2]", "42", '"text"', "{\"type\":"])
async def test_non_object_frames_get_bad_request(gateway, ws_client, raw):
    """Invalid JSON or a JSON value that is not an object -> `bad_request`; still open."""
    client = await ws_client(gateway, token())
    await client.conn.send(raw)
    err = await client.expect("error")
    assert err["code"] == "bad_request"
    assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_error_echoes_request_id(gateway, ws_client):
    client = await ws_client(gateway, token())
    err = await client.request({"type": "subscribe", "channel": "user:bob", "id": "r-9"})
    assert err["type"] == "error" and err["id"] == "r-9" and err["code"] == "forbidden"


async def test_unsubscribe_unknown_channel_is_not_found(gateway, ws_client):
    client = await ws_client(gateway, token())
    err = await client.request({"type": "unsubscribe", "channel": "system:never", "id": 1})
    assert err["code"] == "not_found" and "not subscribed" in err["message"]


async def test_own_channel_can_be_unsubscribed_and_resubscribed(gateway, ws_client):
    client = await ws_client(gateway, token())
    assert (await client.request({"type": "unsubscribe", "channel": "user:user-1"}))[
        "type"] == "unsubscribed"
    again = await client.request({"type": "subscribe", "channel": "user:user-1"})
    assert again["type"] == "subscribed"


async def test_unusable_sub_still_connects_and_says_why(gateway, ws_client):
    """A `sub` that makes no valid channel name: connected, then `bad_request` for user:{sub}."""
    client = await ws_client(gateway, token("has space"), handshake=False)
    assert (await client.expect("connected"))["user"] == "has space"
    err = await client.expect("error")
    assert err["code"] == "bad_request"
    assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_client_close_is_normal_and_frees_subscriptions(gateway, ws_client):
    client = await ws_client(gateway, token())
    await client.request({"type": "subscribe", "channel": "system:a"})
    assert gateway.node.hub.subscription_count == 2
    await client.conn.close(1000)
    assert client.conn.close_code == 1000
    for _ in range(100):
        if gateway.node.hub.subscription_count == 0:
            break
        await asyncio.sleep(0.01)
    assert gateway.node.hub.subscription_count == 0
    assert not gateway.node.sessions


async def test_server_stop_closes_clients_with_1012(make_gateway, ws_client):
    """Stopping the gateway closes every connection with 1012 (restarting)."""
    gw = await make_gateway()
    client = await ws_client(gw, token())
    await gw.stop()
    assert await client.closed() == CloseCode.RESTARTING


def _raw_ws_handshake(port: int, tok: str) -> socket.socket:
    """A bare TCP WebSocket client that never answers the server's pings."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {tok}\r\n\r\n"
        ).encode()
    )
    return sock


def _server_opcodes_until_close(sock: socket.socket) -> list[int]:
    """Read the 101 response, then the server's frames (opcodes) up to its close frame."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed during the handshake"
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    opcodes: list[int] = []
    while True:
        while len(buf) < 4:
            chunk = sock.recv(65536)
            if not chunk:
                return opcodes  # closed without a close frame
            buf += chunk
        opcode, size, start = buf[0] & 0x0F, buf[1] & 0x7F, 2
        if size == 126:
            size, start = int.from_bytes(buf[2:4], "big"), 4
        while len(buf) < start + size:
            chunk = sock.recv(65536)
            if not chunk:
                return opcodes
            buf += chunk
        opcodes.append(opcode)
        buf = buf[start + size:]
        if opcode == 0x8:
            return opcodes


async def test_heartbeat_closes_a_dead_peer(make_gateway):
    """A peer that never answers WebSocket pings gets pings, then the server's close."""
    gw = await make_gateway(heartbeat=0.3)
    sock = _raw_ws_handshake(gw.port, token())
    try:
        opcodes = await asyncio.to_thread(_server_opcodes_until_close, sock)
    finally:
        sock.close()
    assert 0x9 in opcodes  # at least one ping went unanswered
    assert opcodes[-1] == 0x8  # and the server closed the connection
    for _ in range(200):
        if not gw.node.sessions:
            break
        await asyncio.sleep(0.01)
    assert not gw.node.sessions
    # Counted as what it is (4002), not as a normal close (1000).
    registry = gw.node.metrics.registry
    assert registry.get_sample_value("herald_disconnects_total", {"code": "4002"}) == 1
    assert registry.get_sample_value("herald_disconnects_total", {"code": "1000"}) is None


async def test_heartbeat_keeps_a_live_peer(make_gateway, ws_client):
    """A client that answers pings (websockets does) outlives several heartbeats."""
    gw = await make_gateway(heartbeat=0.5)
    client = await ws_client(gw, token())
    await asyncio.sleep(1.7)  # three pings answered
    assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_drain_sends_reconnect_then_closes_1012(make_gateway, ws_client):
    """A drain tells each client `reconnect` (reason, jittered after_ms), then closes 1012."""
    gw = await make_gateway()
    client = await ws_client(gw, token())
    await gw.node.drain(window=0.0)
    msg = await client.expect("reconnect")
    assert msg["reason"] == "draining"
    assert isinstance(msg["after_ms"], int) and msg["after_ms"] >= 0
    assert await client.closed() == CloseCode.RESTARTING
    assert not gw.node.ready


async def test_draining_gateway_refuses_new_websockets_with_503(make_gateway):
    """While draining, /ws answers 503 with the usual error body, so the client goes elsewhere."""
    gw = await make_gateway()
    await gw.node.drain(window=0.0)
    with pytest.raises(InvalidStatus) as err:
        await websockets.connect(f"ws://127.0.0.1:{gw.port}/ws")
    response = err.value.response
    assert response.status_code == 503
    body = orjson.loads(response.body)
    assert body["error"] == "unavailable" and body["timestamp"].endswith("Z")
