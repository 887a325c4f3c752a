"""Presence on Redis: entries that expire unless their gateway keeps them alive.

Per channel, under the channel's hash tag (one Redis Cluster slot):

    {prefix}{<channel>}:presence      hash  client id -> member record
    {prefix}{<channel>}:presence-exp  zset  client id -> expiry (Redis clock, ms)
    {prefix}presence:<channel>        pub/sub: {"k": "join"|"leave", "m": record}

Each gateway re-asserts its own members every `ttl / 3` seconds (one script
call per channel, pipelined). A member whose gateway stopped refreshing
(SIGKILL, partition) is removed by the next script that touches the channel
— any gateway's refresh of it, any read — which also announces its `leave`.
So a killed gateway's clients leave presence within `ttl + ttl / 3` of its
last refresh, as long as some gateway still has a subscriber there (a read
removes them at once regardless). Expiry uses Redis's clock (`TIME`), not
the gateways', so skewed clocks cannot keep a member alive.

On Redis Cluster the same scripts run in each channel's slot; events are
plain PUBLISHes, which the cluster carries to every node, so the events
connection may subscribe on any node.

Join/leave events travel on a pub/sub connection of this class's own,
subscribed only to the channels local subscribers asked events for, apart
from the stream's fan-in connection (nothing of the engine's subscribe state
machine is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from gateway.broker.presence import JOIN, LEAVE, Member, Presence, PresenceUnavailable
from gateway.cluster.connect import LINK_ERRORS, describe, refresh_slots, stop, unavailable

log = logging.getLogger("herald.presence")

DEFAULT_TTL = 15.0
# Expired members removed per script call at most (the rest go on the next).
EXPIRE_BATCH = 1000
RECONNECT_DELAY = 1.0
REFRESH_CONCURRENCY = 64

# Removes expired members and announces their leave. KEYS: hash, zset; ARGV[1]: events.
_EXPIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, EXPIRE_BATCH)
for _, client in ipairs(dead) do
  local record = redis.call('HGET', KEYS[1], client)
  redis.call('HDEL', KEYS[1], client)
  redis.call('ZREM', KEYS[2], client)
  if record then
    redis.call('PUBLISH', ARGV[1], '{"k":"leave","m":' .. record .. '}')
  end
end
""".replace("EXPIRE_BATCH", str(EXPIRE_BATCH))

# Joins or keeps alive this gateway's members of one channel.
# KEYS: hash, zset; ARGV: events, ttl ms, limit, then client, record pairs.
# Returns one status per member: 1 joined, 0 already there, -1 channel full.
SYNC = _EXPIRE + """
local ttl = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local out = {}
for i = 4, #ARGV, 2 do
  local client, record = ARGV[i], ARGV[i + 1]
  if redis.call('ZSCORE', KEYS[2], client) then
    redis.call('ZADD', KEYS[2], 'XX', now + ttl, client)
    out[#out + 1] = 0
  elseif redis.call('HLEN', KEYS[1]) >= limit then
    out[#out + 1] = -1
  else
    redis.call('HSET', KEYS[1], client, record)
    redis.call('ZADD', KEYS[2], now + ttl, client)
    redis.call('PUBLISH', ARGV[1], '{"k":"join","m":' .. record .. '}')
    out[#out + 1] = 1
  end
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return out
"""

# KEYS: hash, zset; ARGV: events, client.
LEAVE_SCRIPT = """
local record = redis.call('HGET', KEYS[1], ARGV[2])
if record then
  redis.call('HDEL', KEYS[1], ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('PUBLISH', ARGV[1], '{"k":"leave","m":' .. record .. '}')
end
return record and 1 or 0
"""

READ = _EXPIRE + """
return redis.call('HVALS', KEYS[1])
"""


class RedisPresence(Presence):
    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        prefix: str = "herald:",
        ttl: float = DEFAULT_TTL,
    ) -> None:
        super().__init__()
        self._client = client
        self._prefix = prefix
        self.ttl = ttl
        self._sync = client.register_script(SYNC)
        self._leave = client.register_script(LEAVE_SCRIPT)
        self._read = client.register_script(READ)
        # This gateway's members, re-asserted every ttl / 3; and their limits.
        self._local: dict[str, dict[str, Member]] = {}
        self._limits: dict[str, int] = {}
        self._pubsub: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self.refresh_failures = 0

    def _keys(self, channel: str) -> list[str]:
        base = f"{self._prefix}{{{channel}}}:presence"
        return [base, base + "-exp"]

    def _events(self, channel: str) -> str:
        return f"{self._prefix}presence:{channel}"

    async def _cmd(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, RedisClusterException, *LINK_ERRORS) as exc:
            # Redis's own message names its address: clients get the generic one.
            raise PresenceUnavailable(str(unavailable(exc))) from None

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._refresh_loop(), name="herald-presence-refresh"),
            asyncio.create_task(self._event_loop(), name="herald-presence-events"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            await stop(task)
        self._tasks = []
        # A clean stop: this gateway's members leave now, not after the TTL.
        for channel, members in list(self._local.items()):
            for member in list(members.values()):
                with contextlib.suppress(PresenceUnavailable):
                    await self.leave(channel, member)
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
            self._pubsub = None

    # -- members -------------------------------------------------------------

    async def join(self, channel: str, member: Member, limit: int) -> bool:
        status = await self._cmd(self._run_sync(channel, [member], limit))
        if status[0] < 0:
            return False
        self._local.setdefault(channel, {})[member.client] = member
        self._limits[channel] = limit
        return True

    def _run_sync(self, channel: str, members: list[Member], limit: int) -> Any:
        args: list[Any] = [self._events(channel), int(self.ttl * 1000), limit]
        for m in members:
            args += [m.client, m.to_record()]
        return self._sync(keys=self._keys(channel), args=args)

    async def leave(self, channel: str, member: Member) -> None:
        local = self._local.get(channel)
        if local is not None:
            local.pop(member.client, None)
            if not local:
                del self._local[channel]
                self._limits.pop(channel, None)
        await self._cmd(
            self._leave(keys=self._keys(channel), args=[self._events(channel), member.client])
        )

    async def members(self, channel: str) -> list[Member]:
        records = await self._cmd(
            self._read(keys=self._keys(channel), args=[self._events(channel)])
        )
        members = []
        for raw in records:
            try:
                members.append(Member.from_record(raw))
            except ValueError as exc:
                self.bad_records.drop(raw, exc)
        return members

    async def refresh(self) -> None:
        """Re-assert every local member (and expire others'): one script call per
        channel, `REFRESH_CONCURRENCY` at a time (on Redis Cluster each goes to
        its channel's slot)."""
        # A snapshot: joins and leaves may change the dicts while this awaits.
        batch = [(c, list(m.values()), self._limits[c]) for c, m in self._local.items()]
        for start in range(0, len(batch), REFRESH_CONCURRENCY):
            await self._cmd(asyncio.gather(*(
                self._run_sync(channel, members, limit)
                for channel, members, limit in batch[start:start + REFRESH_CONCURRENCY]
            )))

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.refresh()
            except PresenceUnavailable as exc:
                self.refresh_failures += 1
                log.warning("presence refresh failed: %s", exc)

    # -- join/leave events ---------------------------------------------------

    async def _listen(self, channel: str) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.subscribe(self._events(channel))

    async def _unlisten(self, channel: str) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(self._events(channel))

    async def _event_loop(self) -> None:
        """Read events; after any error start over on a fresh connection and
        subscribe every watched channel again."""
        skip = len(self._prefix) + len("presence:")
        while True:
            pubsub = None
            try:
                # A fresh slot map; a plain PUBLISH reaches every node, so any will do.
                await refresh_slots(self._client)
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                # Set first: a watch from now on subscribes itself.
                self._pubsub = pubsub
                await pubsub.subscribe(
                    f"{self._prefix}presence-keepalive", *[self._events(c) for c in self._watchers]
                )
                while True:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    channel = msg["channel"].decode()[skip:]
                    try:
                        event = orjson.loads(msg["data"])
                        kind = event["k"] if type(event) is dict else None
                        if kind not in (JOIN, LEAVE):
                            raise ValueError(f"not a presence event (kind {kind!r})")
                        member = Member.from_dict(event["m"])
                    except (ValueError, KeyError) as exc:
                        self.bad_records.drop(msg["data"], exc)
                        continue
                    self._emit(kind, channel, member)
            except (RedisError, RedisClusterException, *LINK_ERRORS) as exc:
                log.warning("presence events connection lost: %s", describe(exc))
            except Exception:  # a bug must not end join/leave for good: log, start over
                log.exception("presence events reader failed")
            finally:
                self._pubsub = None
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            await asyncio.sleep(RECONNECT_DELAY)
