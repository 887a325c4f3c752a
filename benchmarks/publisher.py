"""The publisher: messages at a controlled rate, in its own process.

Run by the conductor as `python -m benchmarks.publisher` (requests on stdin,
see `benchmarks.rpc`).

- `herald`: the gateways' own Lua publish script (`gateway.broker.redis_scripts.PUBLISH`),
  called by EVALSHA through a redis-py pipeline: one round trip per batch
  instead of one per message, so the publisher is never what limits a run.
  Job owners are registered first with `RedisPublisher.register_job`.
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

import orjson
import redis.asyncio as aioredis
import uvloop

from benchmarks import rpc
from gateway.broker.base import new_epoch
from gateway.broker.redis import OWNER_TTL
from gateway.broker.redis_scripts import PUBLISH, Keys
from gateway.channels import Namespaces

EVENT = "progress"
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


class HeraldSink:
    """EVALSHA of the gateways' publish script, batched in a pipeline."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.url = redis_url
        self.client = aioredis.from_url(redis_url)
        self.keys = Keys(prefix)
        self.namespaces = Namespaces.from_config("")
        self.sha = ""
        self._static: dict[str, tuple[list[Any], list[Any]]] = {}

    async def setup(self, owners: dict[str, str]) -> None:
        from gateway.publisher import RedisPublisher

        self.sha = await self.client.script_load(PUBLISH)
        if owners:
            pub = RedisPublisher(self.url, prefix=self.keys.prefix)
            try:
                for job, owner in owners.items():
                    await pub.register_job(job, owner)
            finally:
                await pub.close()

    def _parts(self, channel: str) -> tuple[list[Any], list[Any]]:
        """Keys and the fixed arguments of the script for one channel (see RedisBroker.publish)."""
        parts = self._static.get(channel)
        if parts is None:
            k, ns = self.keys, self.namespaces.of(channel)
            keys = [k.meta(channel), k.stream(channel), k.state(channel), k.owner(channel)]
            head = [k.pubsub(channel), orjson.dumps(channel), orjson.dumps(EVENT)]
            tail = [ns.history_size, max(1, int(ns.history_ttl)), "1" if ns.state else "0",
                    "", OWNER_TTL, new_epoch()]
            parts = self._static[channel] = (keys, [head, tail])
        return parts

    async def send(self, batch: list[tuple[str, int]]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for channel, seq in batch:
            keys, (head, tail) = self._parts(channel)
            data = payload(channel, seq)
            pipe.evalsha(self.sha, 4, *keys, *head, orjson.dumps(data), repr(data["ts"]),
                         b"{}", *tail)
        replies = await pipe.execute(raise_on_error=False)
        return sum(1 for r in replies if isinstance(r, Exception) or r[0] == b"forbidden")

    async def close(self) -> None:
        await self.client.aclose()


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


class Publisher:
    def __init__(self) -> None:
        self.sink: HeraldSink | SioSink | None = None
        self.seq: dict[str, int] = {}

    async def setup(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.sink is not None:
            await self.sink.close()
        if req["mode"] == "herald":
            self.sink = HeraldSink(req["redis_url"], req.get("prefix", "herald:"))
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
            if due <= sent:
                await asyncio.sleep(min(0.005, (sent + 1) / rate - (time.time() - start)))
                continue
            batch = []
            for _ in range(due - sent):
                channel = next(order)
                seq = self.seq[channel] = self.seq.get(channel, 0) + 1
                published[channel] = published.get(channel, 0) + 1
                batch.append((channel, seq))
            errors += await self.sink.send(batch)
            sent = due
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
