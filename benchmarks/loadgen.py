"""The load generator: thousands of WebSocket clients in one process (picows on uvloop).

Run by the conductor as `python -m benchmarks.loadgen` (requests on stdin,
see `benchmarks.rpc`). picows parses frames in C and hands each one to a
Python callback, so one core holds tens of thousands of connections and
well over 100k deliveries/s: the gateway, not the generator, is measured
(the conductor prints this process's CPU to show it).

Two framings over the same client:
- `herald`: Herald's protocol (PROTOCOL.md §2), JWT in the Authorization
  header, `subscribe` requests, position from each message's `offset`;
- `sio`: just enough Engine.IO 4 / Socket.IO 5 for python-socketio:
  `0{open}` -> `40` connect, `42["event",data]` events, `421[...]` /
  `431[...]` acknowledgements, ping `2` -> pong `3`; position from the
  payload's own `seq` (Socket.IO has no offsets).

Latency is publish-to-deliver: receive time minus `data.ts`, the
publisher's `time.time()` when it sent the message (same machine, same clock).
"""

from __future__ import annotations

import asyncio
import gc
import resource
import time
from array import array
from collections import Counter
from typing import Any

import jwt
import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from benchmarks import rpc

TEXT = WSMsgType.TEXT
CLOSE = WSMsgType.CLOSE
loads = orjson.loads
now = time.time


# Parsed publications by their frame bytes: a broadcast to 2,000 connections is
# parsed once, not 2,000 times (bounded: cleared when full).
PARSED: dict[bytes, tuple[str, int, float]] = {}
PARSED_MAX = 50_000


def remember(payload: bytes, seen: tuple[str, int, float]) -> None:
    if len(PARSED) >= PARSED_MAX:
        PARSED.clear()
    PARSED[payload] = seen


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[rank]


class Stats:
    """What one step received: counts, positions, latencies."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.received = 0
        self.gaps = 0
        self.dups = 0
        self.last_at = 0.0
        self.latencies = array("d")
        self.errors: Counter[str] = Counter()
        self.closes: Counter[int] = Counter()

    def record(self, client: Client, channel: str, position: int, ts: float) -> None:
        """One delivered message; a jump in `position` is a gap, a repeat a duplicate."""
        at = now()
        last = client.last.get(channel)
        if last is not None:
            if position <= last:
                self.dups += 1
                return
            if position > last + 1:
                self.gaps += position - last - 1
        client.last[channel] = position
        self.received += 1
        self.last_at = at
        self.latencies.append(at - ts)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "received": self.received,
            "gaps": self.gaps,
            "dups": self.dups,
            "last_at": self.last_at,
            "p50_ms": percentile(lat, 50) * 1000,
            "p99_ms": percentile(lat, 99) * 1000,
            "max_ms": (lat[-1] if lat else 0.0) * 1000,
            "errors": dict(self.errors),
            "closes": {str(k): v for k, v in self.closes.items()},
        }


class Client(WSListener):
    """One connection; subclasses speak a framing."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.last: dict[str, int] = {}
        self.closed = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == TEXT:
            self.on_text(frame.get_payload_as_bytes())
        elif kind == CLOSE:
            self.stats.closes[frame.get_close_code().value] += 1
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        for fut in (self.ready, *self.pending.values()):
            if not fut.done():
                fut.set_exception(ConnectionError("disconnected"))

    def on_text(self, payload: bytes) -> None:
        raise NotImplementedError

    def _settle(self, key: int, error: str | None = None) -> None:
        fut = self.pending.pop(key, None)
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(RuntimeError(error))

    def subscribe(self, key: int, channel: str) -> asyncio.Future[None]:
        fut = self.pending[key] = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.send(TEXT, self.subscribe_frame(key, channel))
        return fut

    def subscribe_frame(self, key: int, channel: str) -> bytes:
        raise NotImplementedError


class HeraldClient(Client):
    """Ready once `connected` and the automatic `subscribed` of its own `user:` channel came."""

    def on_text(self, payload: bytes) -> None:
        # A publication's frame is the same bytes on every connection: parse it once.
        seen = PARSED.get(payload)
        if seen is not None:
            self.stats.record(self, *seen)
            return
        msg = loads(payload)
        kind = msg["type"]
        if kind == "message":
            seen = (msg["channel"], msg["offset"], msg["data"]["ts"])
            remember(payload, seen)
            self.stats.record(self, *seen)
        elif kind == "subscribed":
            self.last[msg["channel"]] = msg["offset"]
            if "id" in msg:
                self._settle(msg["id"])
            elif not self.ready.done():
                self.ready.set_result(None)
        elif kind == "error":
            self.stats.errors[f"{msg['code']}: {msg.get('message', '')[:60]}"] += 1
            if "id" in msg:
                self._settle(msg["id"], msg["code"])
            elif not self.ready.done():
                self.ready.set_exception(RuntimeError(msg["code"]))

    def subscribe_frame(self, key: int, channel: str) -> bytes:
        return orjson.dumps({"type": "subscribe", "channel": channel, "id": key})


class SioClient(Client):
    """Engine.IO open -> Socket.IO connect; events carry `{"ch", "seq", "ts", ...}`."""

    def on_text(self, payload: bytes) -> None:
        seen = PARSED.get(payload)
        if seen is not None:
            self.stats.record(self, *seen)
            return
        head = payload[:2]
        if head == b"42":
            event, data = loads(payload[2:])
            if event == "message":
                seen = (data["ch"], data["seq"], data["ts"])
                remember(payload, seen)
                self.stats.record(self, *seen)
        elif payload == b"2":  # Engine.IO ping from the server
            assert self.transport is not None
            self.transport.send(TEXT, b"3")
        elif head == b"43":
            digits = payload[2:].split(b"[", 1)[0]
            self._settle(int(digits))
        elif head == b"40":
            if not self.ready.done():
                self.ready.set_result(None)
        elif head == b"44":
            self.stats.errors["connect_error"] += 1
            if not self.ready.done():
                self.ready.set_exception(RuntimeError(payload.decode(errors="replace")))
        elif payload[:1] == b"0":  # Engine.IO open: connect the default namespace
            assert self.transport is not None
            self.transport.send(TEXT, b"40")

    def subscribe_frame(self, key: int, channel: str) -> bytes:
        return b"42" + str(key).encode() + orjson.dumps(["subscribe", channel])


FRAMINGS: dict[str, type[Client]] = {"herald": HeraldClient, "sio": SioClient}
RETRIES = 3  # subscribe attempts after an `unavailable`
PATHS = {"herald": "/ws", "sio": "/socket.io/?EIO=4&transport=websocket"}


class Generator:
    def __init__(self) -> None:
        self.stats = Stats()
        self.clients: list[Client] = []
        # channel -> how many open clients subscribed to it (for the expected count)
        self.subscribers: Counter[str] = Counter()
        self.expected = 0
        self.retries = 0

    async def open(self, req: dict[str, Any]) -> dict[str, Any]:
        """Open `conns` (each: user `u`, server index `g`, channels `c`), then subscribe.

        Tokens are minted before the clock starts; the connect phase ends when
        every client is ready (authenticated by the server), so its rate is
        authenticated connects per second.
        """
        mode, secret = req["mode"], req["secret"]
        self.retries = 0
        urls = [f"ws://127.0.0.1:{port}{PATHS[mode]}" for port in req["ports"]]
        conns = req["conns"]
        exp = int(time.time()) + 7200
        tokens = [jwt.encode({"sub": c["u"], "exp": exp}, secret, algorithm="HS256")
                  for c in conns]
        framing = FRAMINGS[mode]
        sem = asyncio.Semaphore(req.get("concurrency", 200))
        failures: Counter[str] = Counter()

        async def one(i: int) -> Client | None:
            async with sem:
                try:
                    _, client = await ws_connect(
                        lambda: framing(self.stats), urls[conns[i]["g"]],
                        extra_headers={"Authorization": f"Bearer {tokens[i]}"},
                        websocket_handshake_timeout=60,
                    )
                    await asyncio.wait_for(client.ready, 60)
                    return client
                except Exception as exc:
                    failures[type(exc).__name__ + ": " + str(exc)[:80]] += 1
                    return None

        cpu0, t0 = cpu_seconds(), time.perf_counter()
        opened = await asyncio.gather(*(one(i) for i in range(len(conns))))
        connect_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        waits = []
        new = []
        for spec, client in zip(conns, opened, strict=True):
            if client is None:
                continue
            new.append(client)
            for key, channel in enumerate(spec["c"]):
                waits.append(self._subscribed(client, key, channel))
        results = await asyncio.gather(*waits)
        for channel in results:
            if channel.startswith("!"):
                failures["subscribe " + channel[1:]] += 1
            else:
                self.subscribers[channel] += 1
        self.clients += new
        gc.collect()
        gc.freeze()  # the clients live for the whole step: keep them out of every collection
        return {
            "opened": len(new),
            "failed": sum(failures.values()),
            "failures": dict(failures.most_common(5)),
            "connect_s": connect_s,
            "connects_per_s": len(new) / connect_s if connect_s else 0.0,
            "subscribe_s": time.perf_counter() - t1,
            "subscriptions": sum(self.subscribers.values()),
            "subscribe_retries": self.retries,
            "errors": dict(self.stats.errors),
            "cpu_s": cpu_seconds() - cpu0,
        }

    async def _subscribed(self, client: Client, key: int, channel: str) -> str:
        """Subscribe like a real client: an `unavailable` is retried after a pause."""
        for attempt in range(RETRIES + 1):
            try:
                await asyncio.wait_for(client.subscribe(key, channel), 60)
                return channel
            except RuntimeError as exc:
                if str(exc) != "unavailable" or attempt == RETRIES:
                    return f"!{type(exc).__name__}: {exc}"[:80]
                self.retries += 1
                await asyncio.sleep(1 + attempt)
            except Exception as exc:
                return f"!{type(exc).__name__}: {exc}"[:80]
        raise AssertionError("unreachable")

    async def reset(self, req: dict[str, Any]) -> dict[str, Any]:
        self.stats.reset()
        return {"cpu_s": cpu_seconds()}

    async def expect(self, req: dict[str, Any]) -> dict[str, Any]:
        """How many deliveries the published counts mean, for the clients subscribed."""
        published: dict[str, int] = req["published"]
        self.expected = sum(n * self.subscribers[ch] for ch, n in published.items())
        return {"expected": self.expected}

    async def count(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"received": self.stats.received, "last_at": self.stats.last_at}

    async def summary(self, req: dict[str, Any]) -> dict[str, Any]:
        out = self.stats.summary()
        out["expected"] = self.expected
        out["missing"] = max(0, self.expected - self.stats.received)
        out["open"] = sum(1 for c in self.clients if not c.closed)
        out["cpu_s"] = cpu_seconds()
        return out

    async def close_all(self, req: dict[str, Any]) -> dict[str, Any]:
        for client in self.clients:
            if client.transport is not None and not client.closed:
                client.transport.disconnect(graceful=False)
        await asyncio.sleep(0.2)
        gc.unfreeze()
        self.clients.clear()
        self.subscribers.clear()
        PARSED.clear()
        self.stats.reset()
        gc.collect()
        return {"cpu_s": cpu_seconds()}


async def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gen = Generator()
    await rpc.serve({
        "open": gen.open,
        "reset": gen.reset,
        "expect": gen.expect,
        "count": gen.count,
        "summary": gen.summary,
        "close_all": gen.close_all,
    })


if __name__ == "__main__":
    uvloop.run(main())
