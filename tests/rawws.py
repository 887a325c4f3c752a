"""A raw WebSocket client over a plain socket, for tests that need to misbehave.

Library clients read eagerly and frame correctly; this one can stop reading
(a tiny receive buffer makes a slow consumer), send malformed frames, or
hang mid-handshake (slowloris).
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from typing import Any

import orjson


class RawWs:
    def __init__(self, port: int, headers: dict[str, str] | None = None, rcvbuf: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(10)
        self._buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /ws HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self._buf:
            chunk = self.sock.recv(1024)
            if not chunk:
                raise ConnectionError("closed during handshake")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ")[1])

    def send_frame(self, payload: bytes, opcode: int = 0x1, fin: bool = True) -> None:
        mask = os.urandom(4)
        size = len(payload)
        first = (0x80 if fin else 0) | opcode
        if size < 126:
            header = struct.pack("!BB", first, 0x80 | size)
        elif size <= 0xFFFF:
            header = struct.pack("!BBH", first, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send_frame(orjson.dumps(obj))

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame from the server (unmasked)."""
        first, second = self._read(2)
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", self._read(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", self._read(8))
        return first & 0x0F, self._read(size)

    def read_messages_until(self, channel: str, offset: int) -> list[dict[str, Any]]:
        """Text messages up to and including `offset` of `channel`."""
        messages: list[dict[str, Any]] = []
        while True:
            opcode, payload = self.read_frame()
            if opcode != 0x1:
                continue
            msg = orjson.loads(payload)
            messages.append(msg)
            if msg.get("channel") == channel and msg.get("offset") == offset:
                return messages

    def read_until_close(self) -> tuple[list[dict[str, Any]], int | None]:
        """Every text message until the close frame, and the close code (None: no frame)."""
        messages: list[dict[str, Any]] = []
        try:
            while True:
                opcode, payload = self.read_frame()
                if opcode == 0x1:
                    messages.append(orjson.loads(payload))
                elif opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    return messages, code
        except (ConnectionError, OSError):
            return messages, None

    def close(self) -> None:
        self.sock.close()
