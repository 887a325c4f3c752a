"""Keys and Lua scripts of the Redis engine: the shared data layout, in one place.

Everything a channel has lives under keys sharing the hash tag `{channel}`,
so on Redis Cluster one script touches one slot:

    {prefix}{<channel>}:meta    hash   epoch, offset           (TTL = history ttl)
    {prefix}{<channel>}:stream  stream one entry per publication, id `<offset>-1`,
                                field `r` = the encoded record  (capped, TTL)
    {prefix}{<channel>}:state   hash   event -> latest data     (state namespaces)
    {prefix}{<channel>}:owner   string the job's owner          (7 days)
    {prefix}{<channel>}:idem:<key>  string `epoch:offset` of the publish that
                                applied idempotency key <key>   (dedupe window)
    {prefix}pub:<channel>       pub/sub channel carrying the records (one Redis)
    {prefix}{<channel>}:pub     sharded pub/sub channel (Redis Cluster: SPUBLISH
                                from the script must stay in the keys' slot)

The record is built inside the script by concatenation, never by decoding
the publisher's JSON: numbers survive byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "herald:"

    def meta(self, channel: str) -> str:
        return f"{self.prefix}{{{channel}}}:meta"

    def stream(self, channel: str) -> str:
        return f"{self.prefix}{{{channel}}}:stream"

    def state(self, channel: str) -> str:
        return f"{self.prefix}{{{channel}}}:state"

    def owner(self, channel: str) -> str:
        return f"{self.prefix}{{{channel}}}:owner"

    def idempotency(self, channel: str, key: str) -> str:
        return f"{self.prefix}{{{channel}}}:idem:{key}"

    def pubsub(self, channel: str) -> str:
        return f"{self.prefix}pub:{channel}"

    @property
    def pubsub_prefix(self) -> str:
        return f"{self.prefix}pub:"

    def shard_pubsub(self, channel: str) -> str:
        return f"{self.prefix}{{{channel}}}:pub"

    def shard_channel(self, name: str) -> str:
        """The channel of a `shard_pubsub` name (the engine only sees its own names)."""
        return name[len(self.prefix) + 1 : -5]


# Shared by both scripts: the channel's epoch, starting a fresh one (and
# clearing leftovers of an expired one) when the meta hash is gone.
_EPOCH = """
local function current_epoch(meta, stream, state, candidate, ttl)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    redis.call('DEL', stream, state)
    redis.call('HSET', meta, 'epoch', candidate, 'offset', 0)
    redis.call('EXPIRE', meta, ttl)
    epoch = candidate
  end
  return epoch
end
"""

# KEYS: meta, stream, state, owner, idempotency key (`...:idem:` when none)
# ARGV: pubsub channel, channel json, event json, data json, time, meta json,
#       history size, ttl, state flag, owner ('' = none), owner ttl, epoch candidate,
#       idempotency ttl (0 = no key)
# -> {epoch, offset} | {'forbidden', owner} | {'duplicate', 'epoch:offset'}
# (Called with 4 keys and 12 arguments, it publishes without a key, as before.)
_PUBLISH = (
    _EPOCH
    + """
local idem_ttl = tonumber(ARGV[13] or '0')
if idem_ttl > 0 then
  local applied = redis.call('GET', KEYS[5])
  if applied then
    return {'duplicate', applied}
  end
end
local owner = ARGV[10]
if owner ~= '' then
  local recorded = redis.call('GET', KEYS[4])
  if recorded and recorded ~= owner then
    return {'forbidden', recorded}
  end
  redis.call('SET', KEYS[4], owner, 'EX', tonumber(ARGV[11]))
end
local ttl = tonumber(ARGV[8])
local epoch = current_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[12], ttl)
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
redis.call('EXPIRE', KEYS[1], ttl)
local record = '{"c":' .. ARGV[2] .. ',"e":' .. ARGV[3] .. ',"p":"' .. epoch ..
  '","o":' .. offset .. ',"t":' .. ARGV[5] .. ',"m":' .. ARGV[6] .. ',"d":' .. ARGV[4] .. '}'
local size = tonumber(ARGV[7])
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-1', 'r', record)
  redis.call('EXPIRE', KEYS[2], ttl)
end
if ARGV[9] == '1' then
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ttl)
end
redis.call('{publish}', ARGV[1], record)
if idem_ttl > 0 then
  redis.call('SET', KEYS[5], epoch .. ':' .. offset, 'EX', idem_ttl)
end
return {epoch, offset}
"""
)
# One script text, two fan-ins: PUBLISH on one Redis, SPUBLISH (sharded
# pub/sub, the channel's own slot) on Redis Cluster.
PUBLISH = _PUBLISH.replace("{publish}", "PUBLISH")
SPUBLISH = _PUBLISH.replace("{publish}", "SPUBLISH")

# KEYS: meta, stream, state
# ARGV: mode ('history' | 'state'), epoch candidate, ttl, since (-1 = all), limit
# history -> {epoch, offset, entries...}   (entries are [id, [field, record]])
# state   -> {epoch, offset, {event, data, ...}}
READ = (
    _EPOCH
    + """
local epoch = current_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[2], tonumber(ARGV[3]))
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset'))
if ARGV[1] == 'state' then
  return {epoch, offset, redis.call('HGETALL', KEYS[3])}
end
local since = tonumber(ARGV[4])
local start = '-'
if since >= 0 then start = (since + 1) .. '-0' end
return {epoch, offset, redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', tonumber(ARGV[5]))}
"""
)

# After a shard's master was replaced, did the channel lose publications this
# gateway already delivered (asynchronous replication)? If the stream ends
# before the last delivered offset, or holds another publication there, the
# history is not the one clients saw: a new epoch says so to every client.
# KEYS: meta, stream
# ARGV: delivered epoch, delivered offset, its time (as in the record), epoch candidate
# -> the channel's epoch afterwards
FENCE = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch or epoch ~= ARGV[1] then
  return epoch or ''
end
local last = tonumber(ARGV[2])
local lost = tonumber(redis.call('HGET', KEYS[1], 'offset')) < last
if not lost then
  local entry = redis.call('XRANGE', KEYS[2], last .. '-1', last .. '-1')
  if #entry == 1 and not string.find(entry[1][2][2], '"t":' .. ARGV[3] .. ',', 1, true) then
    lost = true
  end
end
if lost then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[4])
  redis.call('DEL', KEYS[2])
  return ARGV[4]
end
return epoch
"""
