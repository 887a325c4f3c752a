"""A small real HTTP/1.1 client for `text/event-stream`, over asyncio sockets.

Tornado's and urllib's clients deliver a response when it ends; an event
stream never does. This one reads the chunked body as it arrives and parses
SSE events (`id:`, `data:`, comments), which is all the tests need, and it
can also *not* read, to play a slow consumer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class SseEvent:
    id: str | None = None
    data: Any = None
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    @property
    def type(self) -> str | None:
        return self.data.get("type") if isinstance(self.data, dict) else None


class SseStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""  # the whole body of a non-stream (error) response
        self._buffer = b""
        self._chunked = False
        self.ended = False

    @classmethod
    async def open(
        cls, port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0
    ) -> SseStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        stream = cls(reader, writer)
        await asyncio.wait_for(stream._read_head(), timeout)
        return stream

    async def _read_head(self) -> None:
        status = await self.reader.readline()
        self.status = int(status.split()[1])
        while True:
            line = (await self.reader.readline()).decode().strip()
            if not line:
                break
            key, _, value = line.partition(":")
            self.headers[key.strip().lower()] = value.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        if not self.headers.get("content-type", "").startswith("text/event-stream"):
            length = int(self.headers.get("content-length", "0"))
            self.body = await self.reader.readexactly(length) if length else await self._chunk()

    def json(self) -> Any:
        return orjson.loads(self.body)

    async def _chunk(self) -> bytes:
        """The next piece of body; b"" when the response ended."""
        if not self._chunked:
            return await self.reader.read(65536)
        size_line = await self.reader.readline()
        if not size_line:
            return b""
        size = int(size_line.strip().split(b";")[0], 16)
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def event(self, timeout: float = 5.0) -> SseEvent:
        """The next event (or comment block); raises EOFError when the stream ended."""
        return await asyncio.wait_for(self._event(), timeout)

    async def _event(self) -> SseEvent:
        while b"\n\n" not in self._buffer:
            chunk = await self._chunk()
            if not chunk:
                self.ended = True
                raise EOFError("stream ended")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\n\n", 1)
        event = SseEvent()
        data: list[bytes] = []
        for line in raw.split(b"\n"):
            if line.startswith(b":"):
                event.comments.append(line[1:].strip().decode())
            elif line.startswith(b"id:"):
                event.id = line[3:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
            elif line.startswith(b"retry:"):
                event.retry = int(line[6:].strip())
        if data:
            event.data = orjson.loads(b"\n".join(data))
        return event

    async def expect(self, kind: str, timeout: float = 5.0) -> SseEvent:
        """The next data event, skipping comments and `retry`; it must be of type `kind`."""
        while True:
            ev = await self.event(timeout)
            if ev.data is None:
                continue
            assert ev.type == kind, f"expected {kind}, got {ev.data}"
            return ev

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
