"""Lua scripts: every multi-step change to a stream runs atomically inside Redis.

Times come from Redis' own clock (``TIME``), so producers and consumers on hosts with skewed clocks
agree on when a delayed entry is due. Delayed entries are ``cmsgpack``-packed field lists in a sorted
set scored by due time (ms), with a unique tag as the first element so equal messages stay distinct.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS[1] sorted set. ARGV[1] delay ms, then per record: field count n, unique tag, n fields.
SEND_DELAYED = (
    _NOW_MS
    + """
local due = now_ms() + tonumber(ARGV[1])
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local member = {ARGV[i + 1]}
  for j = i + 2, i + 1 + n do member[#member + 1] = ARGV[j] end
  redis.call('ZADD', KEYS[1], due, cmsgpack.pack(member))
  i = i + 2 + n
end
return 1
"""
)

# Settle a pending entry by storing a new one first and acking the old one second (nack, nack with
# delay, dead-letter). Does nothing (returns 0) unless the entry is still pending for this consumer: a
# retried call cannot store a second copy, and a consumer whose lock expired cannot settle the entry
# another consumer has reclaimed (and is handling) since.
# KEYS[1] source stream, KEYS[2] target stream, KEYS[3] target sorted set (delayed).
# ARGV[1] group, ARGV[2] entry id, ARGV[3] '1' to XDEL the source entry, ARGV[4] delay ms, ARGV[5] consumer,
# ARGV[6..] fields.
SETTLE = (
    _NOW_MS
    + """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[5]) == 0 then return 0 end
local delay = tonumber(ARGV[4])
if delay > 0 then
  local member = {KEYS[1] .. '/' .. ARGV[2]}
  for i = 6, #ARGV do member[#member + 1] = ARGV[i] end
  redis.call('ZADD', KEYS[3], now_ms() + delay, cmsgpack.pack(member))
else
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 6))
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
return 1
"""
)

# Extend a consumer's lock on an entry: XCLAIM it to itself with min-idle 0 (which resets its idle time),
# but only while it is still pending for that consumer. XCLAIM alone would take the entry back from a
# consumer that reclaimed it after this one's lock expired, and both would handle it.
# KEYS[1] stream. ARGV[1] group, ARGV[2] entry id, ARGV[3] consumer. Returns 1 when extended, else 0.
EXTEND = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3]) == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""

# Move due delayed entries into their streams (first key of each pair into the second).
_MOVE_DUE = """
local function move_due(zset, stream, limit)
  local due = redis.call('ZRANGEBYSCORE', zset, '-inf', now_ms(), 'LIMIT', 0, limit)
  for _, member in ipairs(due) do
    local fields = cmsgpack.unpack(member)
    redis.call('XADD', stream, '*', unpack(fields, 2))
    redis.call('ZREM', zset, member)
  end
  return #due
end
"""

# Claim entries idle for at least the visibility timeout (their consumer died or is too slow).
# Returns {id, deliveries including this one, fields} per claimed entry (XCLAIM counts this delivery).
_RECLAIM = """
local function reclaim(stream, group, consumer, min_idle, count)
  local pending = redis.call('XPENDING', stream, group, 'IDLE', min_idle, '-', '+', count)
  if #pending == 0 then return {} end
  local ids, counts = {}, {}
  for i, p in ipairs(pending) do
    ids[i] = p[1]
    counts[p[1]] = p[4]
  end
  local out = {}
  for _, e in ipairs(redis.call('XCLAIM', stream, group, consumer, min_idle, unpack(ids))) do
    if e and e[2] then out[#out + 1] = {e[1], counts[e[1]] + 1, e[2]} end
  end
  return out
end
"""

# Trim a fan-out stream below the oldest entry any group still needs: its oldest pending entry, or
# (when nothing is pending) its last delivered id. Entries a slower group has not read or not acked are
# never removed. With no groups at all nobody can receive what is there, so everything goes.
_TRIM_SHARED = """
local function older(a, b)
  local ams, aseq = string.match(a, '(%d+)-(%d+)')
  local bms, bseq = string.match(b, '(%d+)-(%d+)')
  ams, bms = tonumber(ams), tonumber(bms)
  if ams ~= bms then return ams < bms end
  return tonumber(aseq) < tonumber(bseq)
end
local function trim_shared(stream)
  if redis.call('EXISTS', stream) == 0 then return 0 end
  local floor = nil
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    local low = info['last-delivered-id']
    if tonumber(info['pending']) > 0 then low = redis.call('XPENDING', stream, info['name'])[2] end
    if floor == nil or older(low, floor) then floor = low end
  end
  if floor == nil then return redis.call('XTRIM', stream, 'MAXLEN', 0) end
  return redis.call('XTRIM', stream, 'MINID', floor)
end
"""

# Remove consumers of a group that hold nothing and have not been seen for a long time (receivers of
# processes that died). A live consumer removed this way is re-created by its next read.
_PRUNE_CONSUMERS = """
local function prune_consumers(stream, group, idle_ms)
  local removed = 0
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
    local info = {}
    for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
    if tonumber(info['pending']) == 0 and tonumber(info['idle']) > idle_ms then
      redis.call('XGROUP', 'DELCONSUMER', stream, group, info['name'])
      removed = removed + 1
    end
  end
  return removed
end
"""

# A receiver's periodic housekeeping in one round trip.
# KEYS: n (sorted set, stream) mover pairs, then the stream to reclaim from, then the stream to trim.
# ARGV[1] n, ARGV[2] most entries to move per pair, ARGV[3] group, ARGV[4] consumer,
# ARGV[5] visibility timeout ms, ARGV[6] most entries to reclaim, ARGV[7] '1' to trim the last key,
# ARGV[8] > 0: prune the reclaim stream's consumers that hold nothing and were unseen that long (ms).
# Returns {largest number moved from one set, reclaimed entries, entries trimmed}.
MAINTAIN = (
    _NOW_MS
    + _MOVE_DUE
    + _RECLAIM
    + _TRIM_SHARED
    + _PRUNE_CONSUMERS
    + """
local n = tonumber(ARGV[1])
local moved = 0
for i = 1, n do moved = math.max(moved, move_due(KEYS[2 * i - 1], KEYS[2 * i], tonumber(ARGV[2]))) end
local claimed = reclaim(KEYS[2 * n + 1], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]))
local trimmed = 0
if ARGV[7] == '1' then trimmed = trim_shared(KEYS[2 * n + 2]) end
if tonumber(ARGV[8]) > 0 then prune_consumers(KEYS[2 * n + 1], ARGV[3], tonumber(ARGV[8])) end
return {moved, claimed, trimmed}
"""
)

# Create a topic stream (empty) if it does not exist, without touching an existing one.
ENSURE_STREAM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '0', '*', 'msgbus', 'created')
return 1
"""

# Remove this receiver's consumer from each stream's group, but only when it holds no pending entry
# (deleting a consumer drops its pending entries, which would lose them). ARGV[1] group, ARGV[2] consumer.
FORGET_CONSUMER = """
local removed = 0
for _, key in ipairs(KEYS) do
  local ok, p = pcall(redis.call, 'XPENDING', key, ARGV[1], '-', '+', 1, ARGV[2])
  if ok and #p == 0 then
    redis.call('XGROUP', 'DELCONSUMER', key, ARGV[1], ARGV[2])
    removed = removed + 1
  end
end
return removed
"""


# ordering=per_key: one round of a receiver's partition leases. Registers it as a live member of the group (pruning
# members unseen for a lease), renews the leases it holds, hands over those beyond its fair share (ceil(partitions /
# members)) once nothing of them is pending for it, and takes free ones up to its share, starting at its own offset.
# KEYS[1] members sorted set, then n lease keys, then the n partition streams (same order).
# ARGV[1] consumer, ARGV[2] lease ms, ARGV[3] group, ARGV[4] '1' to take free partitions, ARGV[5] start offset.
# Returns {share, {1-based indexes of the partitions it holds, ascending}}: it reads the first `share` of them.
LEASES = (
    _NOW_MS
    + """
local n = (#KEYS - 1) / 2
local me, lease = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
redis.call('ZADD', KEYS[1], now, me)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - lease)
redis.call('PEXPIRE', KEYS[1], lease * 10)
local share = math.ceil(n / redis.call('ZCARD', KEYS[1]))
local owned = {}
for i = 1, n do
  if redis.call('GET', KEYS[1 + i]) == me then owned[#owned + 1] = i end
end
local kept = {}
for j, i in ipairs(owned) do
  if j > share and #redis.call('XPENDING', KEYS[1 + n + i], ARGV[3], '-', '+', 1, me) == 0 then
    redis.call('DEL', KEYS[1 + i])
  else
    redis.call('PEXPIRE', KEYS[1 + i], lease)
    kept[#kept + 1] = i
  end
end
if ARGV[4] == '1' then
  local start = tonumber(ARGV[5])
  for k = 0, n - 1 do
    if #kept >= share then break end
    local i = (start + k) % n + 1
    if redis.call('GET', KEYS[1 + i]) ~= me and redis.call('SET', KEYS[1 + i], me, 'NX', 'PX', lease) then
      kept[#kept + 1] = i
    end
  end
end
table.sort(kept)
return {share, kept}
"""
)

# ordering=per_key: a new leaseholder takes over a partition's pending entries (its predecessor died, stopped or
# handed it over), oldest first: they come before anything unread. Only the first pending entry of each key can
# have reached a handler (the rest waited behind it in the predecessor's hold), so only that one counts a delivery
# (XCLAIM); the others are claimed with JUSTID, which leaves their count alone. Entries deleted meanwhile are acked.
# KEYS[1] partition stream. ARGV[1] group, ARGV[2] consumer, ARGV[3] most entries.
# Returns {id, deliveries including this one, fields} per entry.
TAKE_OVER = """
local out, seen = {}, {}
for _, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[3]))) do
  local id = p[1]
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #e == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], id)
  else
    local fields, key = e[1][2], nil
    for i = 1, #fields, 2 do if fields[i] == 'key' then key = fields[i + 1] end end
    if key == nil or not seen[key] then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
      out[#out + 1] = {id, p[4] + 1, fields}
    else
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
      out[#out + 1] = {id, p[4], fields}
    end
    if key ~= nil then seen[key] = true end
  end
end
return out
"""

# ordering=per_key: deliver nacked entries of a partition again, in place (a copy at the tail would pass the key's
# later messages): XCLAIM counts the delivery. Only entries still pending for this consumer (its lease may have
# gone to another meanwhile). KEYS[1] partition stream. ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids.
# Returns {id, deliveries including this one, fields} per entry.
REDELIVER = """
local out = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then
    local e = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i])
    if e[1] and e[1][2] then out[#out + 1] = {ARGV[i], p[1][4] + 1, e[1][2]} end
  end
end
return out
"""

# ordering=per_key: extend a partition lease while it is this consumer's. KEYS[1] lease. ARGV[1] consumer, ARGV[2] ms.
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# ordering=per_key: leave the group's members and give up every lease this consumer holds (stop, close): the next
# leaseholder takes over what is pending at once instead of after the lease expires.
# KEYS[1] members, KEYS[2..] lease keys. ARGV[1] consumer.
RELEASE_LEASES = """
redis.call('ZREM', KEYS[1], ARGV[1])
local released = 0
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    released = released + 1
  end
end
return released
"""

# ordering=per_key: a leaseholder's periodic care of one partition: trim it below what every group still needs (a
# topic's partition) and remove consumers of the group that hold nothing and were unseen that long.
# KEYS[1] partition stream. ARGV[1] '1' to trim, ARGV[2] group, ARGV[3] idle ms.
TIDY_PARTITION = (
    _TRIM_SHARED
    + _PRUNE_CONSUMERS
    + """
local trimmed = 0
if ARGV[1] == '1' then trimmed = trim_shared(KEYS[1]) end
prune_consumers(KEYS[1], ARGV[2], tonumber(ARGV[3]))
return trimmed
"""
)


class Scripts:
    """The Lua scripts registered on one client (EVALSHA, reloaded by redis-py after a restart)."""

    def __init__(self, client: Redis) -> None:
        self.send_delayed: AsyncScript = client.register_script(SEND_DELAYED)
        self.settle: AsyncScript = client.register_script(SETTLE)
        self.extend: AsyncScript = client.register_script(EXTEND)
        self.maintain: AsyncScript = client.register_script(MAINTAIN)
        self.ensure_stream: AsyncScript = client.register_script(ENSURE_STREAM)
        self.forget_consumer: AsyncScript = client.register_script(FORGET_CONSUMER)
        self.leases: AsyncScript = client.register_script(LEASES)
        self.take_over: AsyncScript = client.register_script(TAKE_OVER)
        self.redeliver: AsyncScript = client.register_script(REDELIVER)
        self.renew_lease: AsyncScript = client.register_script(RENEW_LEASE)
        self.release_leases: AsyncScript = client.register_script(RELEASE_LEASES)
        self.tidy_partition: AsyncScript = client.register_script(TIDY_PARTITION)
