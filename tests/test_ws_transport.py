"""The WebSocket connection after the upgrade (gateway.handlers.ws_protocol), on the wire.

A raw client over a plain socket sends what browsers send and what they
must not; each case gets its RFC 6455 answer, and a bystander on the same
gateway is still served.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time

import orjson
import pytest

from gateway.core.outbox import SOFT_LIMIT
from gateway.handlers.ws_protocol import CLOSE_TIMEOUT, accept_key
from tests.conftest import token
from tests.rawws import RawWs
from tests.test_abuse import assert_still_served
from tests.test_ws_frames import client_frame

# The WebSocket transport is the event loop's: test it on herald serve's loop too.
pytestmark = pytest.mark.both_loops


def handshake(port: int, extra: str = "") -> tuple[bytes, str]:
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token('early')}\r\n{extra}\r\n"
    )
    return head.encode(), key


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def test_a_request_sent_with_the_handshake_is_answered(make_gateway, ws_client):
    """A client may send frames right behind its upgrade request, in the same
    packet; the gateway read them with the request and must not lose them."""
    gw = await make_gateway()

    def run() -> tuple[bytes, list[dict]]:
        head, _ = handshake(gw.port)
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.settimeout(10)
            s.sendall(head + client_frame(b'{"type":"ping","id":"early"}'))
            response, rest = read_response(s)
            raw = RawWs.__new__(RawWs)
            raw.sock, raw._buf = s, rest
            messages = [orjson.loads(raw.read_frame()[1]) for _ in range(3)]
            return response, messages

    response, messages = await asyncio.to_thread(run)
    assert response.startswith(b"HTTP/1.1 101")
    types = sorted(m["type"] for m in messages)
    assert types == ["connected", "pong", "subscribed"]
    assert next(m for m in messages if m["type"] == "pong")["id"] == "early"


def test_the_accept_key_is_rfc_6455s():
    # The worked example of RFC 6455 §1.3.
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


async def test_a_fragmented_request_with_a_ping_between_its_parts(make_gateway, ws_client):
    gw = await make_gateway()
    raw = await asyncio.to_thread(RawWs, gw.port, {"Authorization": f"Bearer {token('frag')}"})

    def run() -> list[tuple[int, bytes]]:
        frames = [raw.read_frame() for _ in range(2)]  # connected, subscribed
        raw.send_frame(b'{"type":"ping",', fin=False)
        raw.send_frame(b"are you there", opcode=0x9)
        raw.send_frame(b'"id":7}', opcode=0x0)
        return [*frames, raw.read_frame(), raw.read_frame()]

    frames = await asyncio.to_thread(run)
    assert frames[2] == (0xA, b"are you there")  # the pong echoes the ping's payload
    assert frames[3][0] == 0x1 and orjson.loads(frames[3][1])["id"] == 7
    raw.close()


async def test_an_unmasked_frame_is_closed_1002_saying_why(make_gateway, ws_client):
    gw = await make_gateway()
    bystander = await ws_client(gw, token("bystander"))
    raw = await asyncio.to_thread(RawWs, gw.port, {"Authorization": f"Bearer {token('bare')}"})
    await asyncio.to_thread(raw.sock.sendall, client_frame(b'{"type":"ping"}', masked=False))
    messages, code = await asyncio.to_thread(raw.read_until_close)
    assert code == 1002
    assert [m["type"] for m in messages] == ["connected", "subscribed"]  # no pong
    raw.close()
    await assert_still_served(gw, bystander)


async def test_a_client_close_is_echoed_and_the_server_ends_the_tcp_connection(make_gateway):
    gw = await make_gateway()
    raw = await asyncio.to_thread(RawWs, gw.port, {"Authorization": f"Bearer {token('bye')}"})

    def run() -> tuple[int, bytes, bytes]:
        raw.read_frame(), raw.read_frame()
        raw.send_frame(struct.pack("!H", 4321) + b"done", opcode=0x8)
        opcode, payload = raw.read_frame()
        raw.sock.settimeout(5)
        return opcode, payload, raw.sock.recv(10)

    opcode, payload, after = await asyncio.to_thread(run)
    assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 4321
    assert after == b""  # §7.1.1: the server closes the TCP connection first
    raw.close()


async def test_a_peer_that_never_answers_our_close_is_dropped_after_the_close_timeout(
    make_gateway,
):
    gw = await make_gateway(auth_timeout=0.2)
    raw = await asyncio.to_thread(RawWs, gw.port)  # no token: closed 4001 after 0.2 s

    def run() -> tuple[tuple[int, bytes], float]:
        frame = raw.read_frame()  # the error, then the close frame
        while frame[0] != 0x8:
            frame = raw.read_frame()
        started = time.monotonic()
        raw.sock.settimeout(CLOSE_TIMEOUT + 10)
        assert raw.sock.recv(10) == b""  # never answered, and dropped
        return frame, time.monotonic() - started

    (_, payload), waited = await asyncio.to_thread(run)
    assert struct.unpack("!H", payload[:2])[0] == 4001
    assert waited < CLOSE_TIMEOUT + 5
    raw.close()


async def test_a_burst_of_requests_past_the_read_ahead_is_answered_in_order(make_gateway):
    """Reading pauses past INBOX_LIMIT messages read ahead; nothing is lost by it."""
    gw = await make_gateway(rate_per_second=10_000, rate_burst=10_000)
    raw = await asyncio.to_thread(RawWs, gw.port, {"Authorization": f"Bearer {token('burst')}"})

    def run() -> list[object]:
        raw.read_frame(), raw.read_frame()
        burst = b"".join(
            client_frame(orjson.dumps({"type": "ping", "id": i})) for i in range(300)
        )
        raw.sock.sendall(burst)
        return [orjson.loads(raw.read_frame()[1])["id"] for _ in range(300)]

    assert await asyncio.to_thread(run) == list(range(300))
    raw.close()


async def test_a_client_that_pings_without_reading_cannot_grow_the_write_buffer(
    make_gateway, ws_client
):
    """Pongs skip the outbox, so a ping flood from a client that does not read
    must not queue a pong per ping: once the socket's buffer is full, only the
    newest ping is answered when the client reads again (RFC 6455 §5.5.3)."""
    gw = await make_gateway()
    bystander = await ws_client(gw, token("bystander"))
    raw = await asyncio.to_thread(
        RawWs, gw.port, {"Authorization": f"Bearer {token('pinger')}"}, 4096
    )
    count = 100_000
    # A zero masking key leaves the payload as it is: cheap to build, still a masked frame.
    flood = b"".join(
        struct.pack("!BB", 0x89, 0x80 | 125) + b"\0\0\0\0" + f"{i:08d}".encode().ljust(125, b".")
        for i in range(count)
    )
    for _ in range(500):  # the session registers once the token is verified
        pinger = [s for s in gw.node.sessions if s.claims.sub == "pinger"]
        if pinger:
            break
        await asyncio.sleep(0.01)
    (session,) = pinger
    transport = session.handler.transport
    largest = 0
    sent = asyncio.ensure_future(asyncio.to_thread(raw.sock.sendall, flood))
    for _ in range(100_000):  # bounded: the flood takes well under a second per 10,000
        largest = max(largest, transport.get_write_buffer_size())
        if sent.done():
            break
        await asyncio.sleep(0.001)
    await sent

    def read_pongs() -> list[int]:
        seen = []
        for _ in range(count + 10):
            opcode, payload = raw.read_frame()
            if opcode == 0xA:
                seen.append(int(payload[:8]))
                if seen[-1] == count - 1:
                    break
        return seen

    seen = await asyncio.to_thread(read_pongs)
    assert largest <= SOFT_LIMIT + 256  # one high mark, not 13 MB of pongs
    assert seen == sorted(set(seen))  # in order, none twice
    assert seen[-1] == count - 1  # the newest ping is answered
    assert len(seen) < count  # the ones in between were folded into it
    raw.send_json({"type": "ping", "id": "after"})
    reply = await asyncio.to_thread(raw.read_frame)
    assert orjson.loads(reply[1])["id"] == "after"
    raw.close()
    await assert_still_served(gw, bystander)


async def test_upgrade_requests_that_are_not_websocket_13_get_http_answers(make_gateway):
    gw = await make_gateway()

    def ask(extra_head: bytes, drop: bytes = b"") -> bytes:
        head, _ = handshake(gw.port)
        if drop:
            head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.startswith(drop))
        head = head.replace(b"Sec-WebSocket-Version: 13", extra_head) if extra_head else head
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.settimeout(10)
            s.sendall(head)
            return read_response(s)[0]

    assert (await asyncio.to_thread(ask, b"Sec-WebSocket-Version: 8")).startswith(
        b"HTTP/1.1 426"
    )
    refusal = await asyncio.to_thread(ask, b"Sec-WebSocket-Version: 8")
    assert b"sec-websocket-version: 13" in refusal.lower()  # the version it speaks
    assert (await asyncio.to_thread(ask, b"", b"Sec-WebSocket-Key")).startswith(b"HTTP/1.1 400")
    assert (await asyncio.to_thread(ask, b"", b"Upgrade:")).startswith(b"HTTP/1.1 400")
    bad_key = b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ="
    assert (await asyncio.to_thread(ask, bad_key, b"Sec-WebSocket-Key")).startswith(
        b"HTTP/1.1 400"
    )
