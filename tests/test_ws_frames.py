"""RFC 6455 framing (gateway.protocol.ws_frames): what a client's bytes become, or why not.

Pure functions on bytes, so every rule of §5 a server must enforce is
checked here one by one; tests/test_ws_transport.py checks the same rules
end to end on a live gateway.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol.errors import CloseCode
from gateway.protocol.ws_frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameReader,
    close_code,
    close_frame,
    unmask,
    ws_frame,
)


def client_frame(
    payload: bytes, opcode: int = OP_TEXT, fin: bool = True, masked: bool = True, rsv: int = 0
) -> bytes:
    """A frame as a browser sends it: masked with a random key."""
    first = (0x80 if fin else 0) | rsv | opcode
    size = len(payload)
    bit = 0x80 if masked else 0
    if size < 126:
        head = struct.pack("!BB", first, bit | size)
    elif size <= 0xFFFF:
        head = struct.pack("!BBH", first, bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, bit | 127, size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def refused(reader: FrameReader, data: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        reader.feed(data)
    return info.value


def test_a_text_message_comes_as_str_and_a_binary_one_as_bytes():
    reader = FrameReader(1024)
    data = client_frame('{"type":"ping","é":1}'.encode()) + client_frame(b"\x00\x01", OP_BINARY)
    assert reader.feed(data) == [(OP_TEXT, '{"type":"ping","é":1}'), (OP_BINARY, b"\x00\x01")]


@given(st.binary(max_size=70_000), st.integers(min_value=1, max_value=9_000))
def test_any_split_of_the_bytes_gives_the_same_message(payload, step):
    """TCP may cut anywhere; 16- and 64-bit lengths included."""
    reader = FrameReader(1 << 20)
    data = client_frame(payload, OP_BINARY)
    out = []
    for i in range(0, len(data), step):
        out += reader.feed(data[i:i + step])
    assert out == [(OP_BINARY, payload)]


def test_a_frame_a_byte_at_a_time_is_read_without_copying_it_over_and_over():
    reader = FrameReader(1 << 16)
    data = client_frame(b"x" * 60_000)
    out = []
    for i in range(len(data)):
        out += reader.feed(data[i:i + 1])
    assert out == [(OP_TEXT, "x" * 60_000)]


def test_a_fragmented_message_is_joined_and_a_control_frame_may_come_between():
    reader = FrameReader(1024)
    data = (
        client_frame(b'{"type":', OP_TEXT, fin=False)
        + client_frame(b"hi", OP_PING)
        + client_frame(b'"ping"', OP_CONTINUATION, fin=False)
        + client_frame(b"}", OP_CONTINUATION)
    )
    assert reader.feed(data) == [(OP_PING, b"hi"), (OP_TEXT, '{"type":"ping"}')]


def test_limits_hold_for_a_whole_message_and_are_checked_from_the_header():
    reader = FrameReader(100)
    assert reader.feed(client_frame(b"a" * 100)) == [(OP_TEXT, "a" * 100)]
    # Only the header of a 101-byte frame: refused before its payload is read.
    head = client_frame(b"a" * 101)[:6]
    assert refused(FrameReader(100), head).code == CloseCode.TOO_LARGE
    # Fragments that add up past the bound.
    reader = FrameReader(100)
    reader.feed(client_frame(b"a" * 60, fin=False))
    error = refused(reader, client_frame(b"a" * 41, OP_CONTINUATION))
    assert (error.code, error.reason) == (CloseCode.TOO_LARGE, "message too big")


@pytest.mark.parametrize(
    ("data", "code", "why"),
    [
        (client_frame(b"{}", masked=False), CloseCode.PROTOCOL_ERROR, "masked"),
        (client_frame(b"{}", rsv=0x40), CloseCode.PROTOCOL_ERROR, "reserved bits"),
        (client_frame(b"{}", opcode=0x3), CloseCode.PROTOCOL_ERROR, "unknown opcode 3"),
        (client_frame(b"x" * 126, OP_PING), CloseCode.PROTOCOL_ERROR, "control frames"),
        (client_frame(b"", OP_PING, fin=False), CloseCode.PROTOCOL_ERROR, "control frames"),
        (client_frame(b"x", OP_CONTINUATION), CloseCode.PROTOCOL_ERROR, "continuation outside"),
        (client_frame(b"\xff\xfe"), CloseCode.INVALID_DATA, "UTF-8"),
        (
            client_frame(b"a", fin=False) + client_frame(b"b"),
            CloseCode.PROTOCOL_ERROR,
            "inside a fragmented",
        ),
        (
            client_frame(b"\xe2\x82", fin=False) + client_frame(b"\xac\xff", OP_CONTINUATION),
            CloseCode.INVALID_DATA,
            "UTF-8",
        ),
    ],
)
def test_each_violation_names_its_close_code_and_why(data, code, why):
    error = refused(FrameReader(1024), data)
    assert error.code == code and why in error.reason


def test_utf8_split_across_fragments_is_valid():
    reader = FrameReader(1024)
    euro = "€".encode()
    data = client_frame(euro[:1], fin=False) + client_frame(euro[1:], OP_CONTINUATION)
    assert reader.feed(data) == [(OP_TEXT, "€")]


def test_close_codes_the_peer_may_and_may_not_send():
    assert close_code(b"") is None
    assert close_code(struct.pack("!H", 1000) + b"bye") == 1000
    assert close_code(struct.pack("!H", 4001)) == 4001
    for bad in (999, 1005, 1006, 1015, 5000):
        with pytest.raises(FrameError):
            close_code(struct.pack("!H", bad))
    with pytest.raises(FrameError):
        close_code(b"\x03")
    with pytest.raises(FrameError) as info:
        close_code(struct.pack("!H", 1000) + b"\xff")
    assert info.value.code == CloseCode.INVALID_DATA


def test_our_frames_are_unmasked_and_a_close_reason_fits_a_control_frame():
    assert ws_frame(OP_PONG, b"hi") == b"\x8a\x02hi"
    assert ws_frame(OP_TEXT, b"x" * 200)[:4] == b"\x81\x7e\x00\xc8"
    assert ws_frame(OP_TEXT, b"x" * 70_000)[:2] == b"\x81\x7f"
    frame = close_frame(4008, "é" * 100)
    assert frame[0] == 0x80 | OP_CLOSE and frame[1] <= 125
    assert close_code(frame[2:]) == 4008  # still valid UTF-8 after the cut


@given(st.binary(min_size=4, max_size=4), st.binary(max_size=300))
def test_unmask_is_the_xor_of_section_5_3(key, data):
    assert unmask(key, data) == bytes(b ^ key[i % 4] for i, b in enumerate(data))
