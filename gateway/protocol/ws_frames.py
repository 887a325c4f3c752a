"""RFC 6455 framing, server side: the client's frames in, ours out. Pure: bytes only.

The reader is what a connection keeps between reads: usually nothing (a
client's frames arrive whole), a partial frame or message otherwise. It
checks what §5 requires of a client (every frame masked, no reserved bits
without an extension, control frames short and unfragmented, continuations
only inside a message, text valid UTF-8) and the gateway's own bound on a
message's size, checked from the header before the payload is read.
Server frames are unmasked (§5.1) and Herald negotiates no extension, so
one built frame is valid on every connection.
"""

from __future__ import annotations

import struct

from gateway.protocol.errors import CloseCode

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_DATA = (OP_TEXT, OP_BINARY)
_CONTROL = (OP_CLOSE, OP_PING, OP_PONG)
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class FrameError(Exception):
    """The client broke the framing; the connection closes with `code`, saying `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One complete, unfragmented server frame (§5.2)."""
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        return struct.pack("!BB", first, size) + payload
    if size <= 0xFFFF:
        return struct.pack("!BBH", first, 126, size) + payload
    return struct.pack("!BBQ", first, 127, size) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit a control frame's 125 bytes (§5.5)."""
    data = reason.encode()[:123].decode(errors="ignore").encode()
    return ws_frame(OP_CLOSE, _U16.pack(code) + data)


def close_code(payload: bytes) -> int | None:
    """The status code of a received close frame (None: it gave none, §7.1.5)."""
    if not payload:
        return None
    if len(payload) == 1:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "a close frame's code is two bytes")
    (code,) = _U16.unpack_from(payload)
    if not (1000 <= code <= 4999) or code in (1004, 1005, 1006, 1015):
        raise FrameError(CloseCode.PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(CloseCode.INVALID_DATA, "a close reason must be UTF-8") from None
    return code


def unmask(mask: bytes, data: bytes) -> bytes:
    """XOR with the 4-byte key (§5.3), as one big-integer operation rather than a byte loop."""
    size = len(data)
    if not size:
        return b""
    key = (mask * ((size + 3) >> 2))[:size]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


class FrameReader:
    """Turns the bytes of one connection into messages and control frames, in order."""

    __slots__ = ("_buffer", "_max_size", "_message", "_message_opcode", "_message_size")

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._buffer: bytearray | None = None  # a partial frame, between reads
        # A fragmented message in progress: its opcode and its parts so far.
        self._message_opcode = 0
        self._message: list[bytes] | None = None
        self._message_size = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes | str]]:
        """Every whole message and control frame `data` completes, in order.

        A text message comes as its `str`, a binary one or a control frame's
        payload as bytes. Raises FrameError at the first violation; what came
        before it is lost with the connection, which is what §7.1.7 asks. A
        partial frame waits in a bytearray that grows in place, so a frame
        sent a byte at a time costs no more than one sent whole.
        """
        buffer = self._buffer
        if buffer is not None:
            buffer += data
            data = buffer  # type: ignore[assignment]
        out: list[tuple[int, bytes | str]] = []
        pos = 0
        end = len(data)
        max_size = self._max_size
        while end - pos >= 2:
            first = data[pos]
            second = data[pos + 1]
            opcode = first & 0x0F
            if first & 0x70:
                raise FrameError(CloseCode.PROTOCOL_ERROR, "reserved bits set without an extension")
            if not second & 0x80:
                raise FrameError(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
            size = second & 0x7F
            head = pos + 2
            if size == 126:
                if end - head < 2:
                    break
                (size,) = _U16.unpack_from(data, head)
                head += 2
            elif size == 127:
                if end - head < 8:
                    break
                (size,) = _U64.unpack_from(data, head)
                head += 8
            fin = first & 0x80
            if opcode in _CONTROL:
                if not fin or size > 125:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "control frames are short and whole")
            elif opcode in _DATA:
                if self._message is not None:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "a message inside a fragmented one")
                if size > max_size:
                    raise FrameError(CloseCode.TOO_LARGE, "message too big")
            elif opcode == OP_CONTINUATION:
                if self._message is None:
                    raise FrameError(CloseCode.PROTOCOL_ERROR, "a continuation outside a message")
                if self._message_size + size > max_size:
                    raise FrameError(CloseCode.TOO_LARGE, "message too big")
            else:
                raise FrameError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode}")
            stop = head + 4 + size
            if stop > end:
                break
            payload = unmask(data[head:head + 4], data[head + 4:stop])
            pos = stop
            if opcode in _CONTROL:
                out.append((opcode, payload))
            elif opcode == OP_CONTINUATION:
                assert self._message is not None
                self._message.append(payload)
                self._message_size += size
                if fin:
                    out.append(self._finish(self._message_opcode, b"".join(self._message)))
            elif fin:
                out.append(self._finish(opcode, payload))
            else:
                self._message_opcode = opcode
                self._message = [payload]
                self._message_size = size
        if pos >= end:
            self._buffer = None
        elif buffer is not None:
            del buffer[:pos]
        else:
            self._buffer = bytearray(data[pos:])
        return out

    def _finish(self, opcode: int, payload: bytes) -> tuple[int, bytes | str]:
        self._message = None
        self._message_size = 0
        if opcode != OP_TEXT:
            return opcode, payload
        try:
            return opcode, payload.decode()
        except UnicodeDecodeError:
            raise FrameError(CloseCode.INVALID_DATA, "text frames must be UTF-8") from None
