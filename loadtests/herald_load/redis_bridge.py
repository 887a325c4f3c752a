"""Direct-Redis publishing for the load test, run outside Locust's gevent loop.

Locust runs on gevent; `gateway.sdk.publisher.RedisPublisher` is asyncio, and
asyncio must not run inside Locust's tasks. So this small program runs the
publisher in a process and event loop of its own, and a Locust publisher
talks to it over its stdin/stdout: one JSON line per request, one per reply.
Pacing and statistics stay on the Locust side, which times each round trip.

    python redis_bridge.py REDIS_URL PREFIX
    > {"op": "publish", "channel": "job:lt-0", "event": "progress", "data": {}, "owner": "lt-owner"}
    < {"ok": true, "channel": "job:lt-0", "epoch": "...", "offset": 42}
    > {"op": "register", "job": "lt-0", "owner": "lt-owner"}
    < {"ok": true}
    > {"op": "ping"}
    < {"ok": true}
    (a refusal: {"ok": false, "error": "forbidden: ..."})

It needs Herald installed (`pip install -e '.[loadtest]'`): the publications
go through the very code a gateway runs, Lua script included.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson

from gateway.sdk.publisher import PublishError, RedisPublisher


async def serve(url: str, prefix: str) -> None:
    loop = asyncio.get_running_loop()
    publisher = RedisPublisher(url, prefix=prefix)
    try:
        while line := await loop.run_in_executor(None, sys.stdin.buffer.readline):
            reply = await handle(publisher, orjson.loads(line))
            sys.stdout.buffer.write(orjson.dumps(reply) + b"\n")
            sys.stdout.buffer.flush()
    finally:
        await publisher.close()


async def handle(publisher: RedisPublisher, request: dict[str, Any]) -> dict[str, Any]:
    try:
        if request.get("op") == "ping":
            return {"ok": True}
        if request.get("op") == "register":
            await publisher.register_job(request["job"], request["owner"])
            return {"ok": True}
        position = await publisher.publish(
            request["channel"], request["event"], request["data"], owner=request.get("owner")
        )
        return {"ok": True, **position}
    except PublishError as exc:
        return {"ok": False, "error": str(exc)}
    except (KeyError, TypeError) as exc:
        return {"ok": False, "error": f"bad_request: {exc!r}"}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: redis_bridge.py REDIS_URL PREFIX")
    asyncio.run(serve(sys.argv[1], sys.argv[2]))
