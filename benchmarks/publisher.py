"""The publisher: messages at a controlled rate, in its own process.

Run by the conductor as `python -m benchmarks.publisher` (requests on stdin,
see `benchmarks.rpc`).

- `herald`: the gateways' own Lua publish script (`gateway.broker.redis_scripts.PUBLISH`),
  loaded with redis-py and called by EVALSHA with the same keys and
  arguments as `RedisBroker.publish`, batched on a bare RESP connection (one
  round trip per batch, a few us of CPU per message), so the publisher is
  not what limits a run. Job owners are registered first with
  `RedisPublisher.register_job`.
- `herald` on a `redis+cluster://` URL: the same script ending in SPUBLISH,
  one bare connection per master, each command sent to its channel's slot.
- `http`: Herald's HTTP publish API on one gateway, for the embedded engines
  (memory, durable), which have no Redis to publish into.
- `sio`: python-socketio's `AsyncRedisManager(write_only=True).emit(..., room=channel)`,
  the way a Socket.IO backend publishes from outside the server, one emit
  after the other (in order, as Herald's pipeline is).

Every payload is a ~200-byte progress update carrying `ch` (its channel),
`seq` (its number in that channel) and `ts` (`time.time()` when sent).
"""

from __future__ import annotations

import asyncio
import itertools
import resource
import time
from typing import Any
from urllib.parse import urlparse

import orjson
import redis.asyncio as aioredis
import uvloop
from redis.crc import key_slot

from benchmarks import rpc
from gateway.broker.redis import OWNER_TTL
from gateway.broker.redis_scripts import PUBLISH, SPUBLISH, Keys
from gateway.protocol.channels import Namespaces
from gateway.protocol.publication import new_epoch

EVENT = "progress"
TICK = 0.002
# Padding that brings the JSON payload to about 200 bytes.
MESSAGE = "Running model inference on batch; " + "x" * 36


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def payload(channel: str, seq: int) -> dict[str, Any]:
    return {
        "ch": channel,
        "status": "processing",
        "progress": seq % 100,
        "stage": "inference",
        "message": MESSAGE,
        "seq": seq,
        "ts": time.time(),
    }


class Resp:
    """A bare RESP connection: batches of pre-encoded commands, replies read back.

    redis-py spends 60-100 us of CPU per pipelined EVALSHA here; encoding the
    commands ourselves (most of each is the same bytes for a channel) brings
    that to a few us, so the publisher, which shares core 1 with the
    generator and Redis, does not become what a run measures.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, url: str) -> Resp:
        parsed = urlparse(url)
        reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port or 6379)
        return cls(reader, writer)

    @staticmethod
    def encode(*args: bytes) -> bytes:
        return b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)

    async def batch(self, commands: list[bytes]) -> list[Any]:
        self.writer.write(b"".join(commands))
        return [await self.reply() for _ in commands]

    async def reply(self) -> Any:
        line = await self.reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"*":
            return [await self.reply() for _ in range(int(rest))]
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else (await self.reader.readexactly(size + 2))[:-2]
        if kind == b":":
            return int(rest)
        if kind == b"-":
            return RuntimeError(rest.decode())
        return rest

    def close(self) -> None:
        self.writer.close()


class HeraldSink:
    """EVALSHA of the gateways' publish script, one batch per round trip."""

    script = PUBLISH

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.url = redis_url
        self.keys = Keys(prefix)
        self.namespaces = Namespaces.from_config("")
        self.resp: Resp | None = None
        self.sha = b""
        self._static: dict[str, tuple[bytes, bytes]] = {}

    def fanout(self, channel: str) -> str:
        return self.keys.pubsub(channel)

    async def setup(self, owners: dict[str, str]) -> None:
        from gateway.sdk.publisher import RedisPublisher

        client = aioredis.from_url(self.url)
        try:
            self.sha = (await client.script_load(self.script)).encode()
        finally:
            await client.aclose()
        if owners:
            pub = RedisPublisher(self.url, prefix=self.keys.prefix)
            try:
                pending = list(owners.items())
                for start in range(0, len(pending), 50):  # 50 at a time: the pool's size
                    await asyncio.gather(*(pub.register_job(job, owner)
                                           for job, owner in pending[start:start + 50]))
            finally:
                await pub.close()
        self.resp = await Resp.connect(self.url)

    def _parts(self, channel: str) -> tuple[bytes, bytes]:
        """The encoded command around the data and time (arguments as in RedisBroker.publish)."""
        parts = self._static.get(channel)
        if parts is None:
            k, ns = self.keys, self.namespaces.of(channel)
            head = Resp.encode(
                b"EVALSHA", self.sha, b"4",
                *(key.encode() for key in
                  (k.meta(channel), k.stream(channel), k.state(channel), k.owner(channel))),
                self.fanout(channel).encode(), orjson.dumps(channel), orjson.dumps(EVENT),
            )
            tail = Resp.encode(
                b"{}", str(ns.history_size).encode(), str(max(1, int(ns.history_ttl))).encode(),
                b"1" if ns.state else b"0", b"", str(OWNER_TTL).encode(), new_epoch().encode(),
            )
            parts = self._static[channel] = (b"*19\r\n" + head, tail)
        return parts

    def command(self, channel: str, seq: int) -> bytes:
        head, tail = self._parts(channel)
        data = payload(channel, seq)
        return head + Resp.encode(orjson.dumps(data), repr(data["ts"]).encode()) + tail

    async def send(self, batch: list[tuple[str, int]]) -> int:
        assert self.resp is not None
        replies = await self.resp.batch([self.command(ch, seq) for ch, seq in batch])
        return errors(replies)

    async def close(self) -> None:
        if self.resp is not None:
            self.resp.close()


def errors(replies: list[Any]) -> int:
    return sum(1 for r in replies if not isinstance(r, list) or r[0] == b"forbidden")


class HeraldClusterSink(HeraldSink):
    """The same on Redis Cluster: SPUBLISH script, one connection per master, routed by slot.

    (Static slot map: the benchmark does not reshard while it runs.)
    """

    script = SPUBLISH

    def __init__(self, redis_url: str, prefix: str) -> None:
        super().__init__(redis_url, prefix)
        self.shards: dict[int, Resp] = {}  # slot -> the connection to its master
        self.conns: list[Resp] = []

    def fanout(self, channel: str) -> str:
        return self.keys.shard_pubsub(channel)

    async def setup(self, owners: dict[str, str]) -> None:
        from gateway.cluster.connect import connect_cluster

        client = connect_cluster(self.url)
        try:
            await client.initialize()
            by_node: dict[str, Resp] = {}
            for node in client.get_primaries():
                resp = await Resp.connect(f"redis://{node.host}:{node.port}")
                by_node[node.name] = resp
                self.conns.append(resp)
                [sha] = await resp.batch([b"*3\r\n" + Resp.encode(
                    b"SCRIPT", b"LOAD", self.script.encode())])
                self.sha = sha
            for slot in range(16384):
                self.shards[slot] = by_node[client.nodes_manager.get_node_from_slot(slot).name]
        finally:
            await client.aclose()

    async def send(self, batch: list[tuple[str, int]]) -> int:
        per_shard: dict[int, list[bytes]] = {}
        for channel, seq in batch:
            resp = self.shards[key_slot(self.keys.meta(channel).encode())]
            per_shard.setdefault(id(resp), []).append(self.command(channel, seq))
        conns = {id(c): c for c in self.conns}
        replies = await asyncio.gather(*(conns[k].batch(v) for k, v in per_shard.items()))
        return sum(errors(r) for r in replies)

    async def close(self) -> None:
        for resp in self.conns:
            resp.close()


class SioSink:
    """python-socketio's write-only Redis manager, one emit per message."""

    def __init__(self, redis_url: str) -> None:
        import socketio

        self.manager = socketio.AsyncRedisManager(redis_url, write_only=True)

    async def setup(self, owners: dict[str, str]) -> None:
        return None

    async def send(self, batch: list[tuple[str, int]]) -> int:
        # One after the other: emits in parallel take different Redis
        # connections and may reach Redis out of order (seen as losses).
        errors = 0
        for ch, seq in batch:
            try:
                await self.manager.emit("message", payload(ch, seq), room=ch, namespace="/")
            except Exception:
                errors += 1
        return errors

    async def close(self) -> None:
        if self.manager.redis is not None:
            await self.manager.redis.aclose()


class HttpSink:
    """Herald's HTTP API (`POST /api/v1/publish`): the only way into an embedded engine.

    Keep-alive connections, each with its share of a batch pipelined (written
    at once, answers read in order), so the publisher's own HTTP cost stays a
    few us per message and the gateway's HTTP handling is what is measured.
    A gateway answers one connection's requests one after the other, so the
    connections bound the publishes in flight (each waits for the durable
    engine's commit): enough of them that the commit is latency, not a cap.
    """

    CONNECTIONS = 16

    def __init__(self, url: str, api_key: str) -> None:
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.auth = f"apikey {api_key}".encode()
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def _request(self, path: bytes, body: bytes) -> bytes:
        return (b"POST %s HTTP/1.1\r\nHost: bench\r\nAuthorization: %s\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (path, self.auth, len(body), body))

    async def setup(self, owners: dict[str, str]) -> None:
        self.conns = [await asyncio.open_connection(self.host, self.port)
                      for _ in range(self.CONNECTIONS)]
        jobs = [self._request(b"/api/v1/jobs", orjson.dumps({"job": job, "owner": owner}))
                for job, owner in owners.items()]
        for start in range(0, len(jobs), 100):
            errors = await self._exchange(self.conns[0], jobs[start:start + 100])
            if errors:
                raise RuntimeError(f"registering job owners: {errors} refused")

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                        requests: list[bytes]) -> int:
        reader, writer = conn
        writer.write(b"".join(requests))
        errors = 0
        for _ in requests:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
            size = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    size = int(line.split(b":", 1)[1])
            await reader.readexactly(size)
        return errors

    async def send(self, batch: list[tuple[str, int]]) -> int:
        shares: list[list[bytes]] = [[] for _ in self.conns]
        for channel, seq in batch:
            body = orjson.dumps({"channel": channel, "event": EVENT,
                                 "data": payload(channel, seq)})
            # One channel always on one connection: its publications stay in order.
            shares[hash(channel) % len(self.conns)].append(self._request(b"/api/v1/publish", body))
        results = await asyncio.gather(*(self._exchange(conn, reqs)
                                         for conn, reqs in zip(self.conns, shares, strict=True)
                                         if reqs))
        return sum(results)

    async def close(self) -> None:
        for _, writer in self.conns:
            writer.close()
        self.conns = []


class Publisher:
    def __init__(self) -> None:
        self.sink: HeraldSink | SioSink | HttpSink | None = None
        self.seq: dict[str, int] = {}

    async def setup(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.sink is not None:
            await self.sink.close()
        if req["mode"] == "herald":
            sink = HeraldClusterSink if "+cluster://" in req["redis_url"] else HeraldSink
            self.sink = sink(req["redis_url"], req.get("prefix", "herald:"))
        elif req["mode"] == "http":
            self.sink = HttpSink(req["url"], req["api_key"])
        else:
            self.sink = SioSink(req["redis_url"])
        await self.sink.setup(req.get("owners") or {})
        return {}

    async def run(self, req: dict[str, Any]) -> dict[str, Any]:
        """Publish `rate` messages/s for `duration` s, round-robin over `channels`."""
        assert self.sink is not None
        channels: list[str] = req["channels"]
        rate, duration = float(req["rate"]), float(req["duration"])
        total = max(1, round(rate * duration))
        order = itertools.cycle(channels)
        published: dict[str, int] = {}
        errors = sent = 0
        cpu0 = cpu_seconds()
        start = time.time()
        while sent < total:
            due = min(total, int((time.time() - start) * rate) + 1)
            if due > sent:
                batch = []
                for _ in range(due - sent):
                    channel = next(order)
                    seq = self.seq[channel] = self.seq.get(channel, 0) + 1
                    published[channel] = published.get(channel, 0) + 1
                    batch.append((channel, seq))
                errors += await self.sink.send(batch)
                sent = due
            # A tick between batches: fewer, larger batches (each message's `ts`
            # is taken when it is sent, so the tick adds nothing to its latency).
            await asyncio.sleep(TICK)
        end = time.time()
        return {
            "published": published,
            "sent": sent,
            "errors": errors,
            "start": start,
            "end": end,
            "achieved_rate": sent / max(end - start, 1e-9),
            "cpu_s": cpu_seconds() - cpu0,
        }


async def main() -> None:
    pub = Publisher()
    await rpc.serve({"setup": pub.setup, "run": pub.run})


if __name__ == "__main__":
    uvloop.run(main())
