-- ringcast: append a batch to one topic, atomically (see docs/cluster.md).
-- KEYS: 1 counters hash, 2 stream, 3 set of topic names,
--       4.. the idempotency key entries of the keyed events
-- ARGV: 1 generation, 2 epoch (the caller's incarnation),
--       3 generation, 4 epoch (fresh ones, should a new history start),
--       5 the next offset the caller holds, 6 dedup window ms, 7 now ms,
--       8 expected offset ('' = none), 9 expected version ('' = none),
--       10 max_events, 11 topic, 12 notification channel, 13 event count,
--       14 the calling node's token (notifications name it),
--       then 4 per event: type, key index into KEYS (0 = none), headers, payload
-- Returns {'ok', generation, epoch, first offset, {versions}, {repeats},
--          {entries before}} | {'sealed'} | {'mismatch', offset, version}
-- Nothing is written before every check passed; `next` is written before
-- the entries, so a failure half way leaves a hole, never a stuck topic.
local m, s = KEYS[1], KEYS[2]
local known = tonumber(ARGV[5])
local h = redis.call('HMGET', m, 'gen', 'epoch', 'next', 'deleted', 'sealed', 'placeholder')
local gen, epoch, nxt = h[1], h[2], tonumber(h[3])
-- A new history replaces whatever is stored (written below, after the checks).
local creating = false
local function create(g, e)
  creating = true
  gen, epoch, nxt = g, e, 1
  h[5] = false
end
if not gen then
  -- Missing while the caller holds events: Redis lost them. A new history
  -- (new epoch), never an offset given out twice in one epoch. The caller's
  -- own incarnation only when it holds nothing of it.
  if known > 1 then create(ARGV[3], ARGV[4]) else create(ARGV[1], ARGV[2]) end
elseif h[4] then
  -- Deleted: a publish creates the topic anew, never under the deleted
  -- incarnation or one the caller already holds events of.
  if gen == ARGV[1] or known > 1 then create(ARGV[3], ARGV[4]) else create(ARGV[1], ARGV[2]) end
elseif gen == ARGV[1] and nxt < known then
  -- Redis is behind what the caller saw acknowledged (lost writes).
  create(ARGV[3], ARGV[4])
end
if h[5] then
  return {'sealed'}
end
local n = tonumber(ARGV[13])
local window = tonumber(ARGV[6])
local now = ARGV[7]
-- Repeats: stored keys of this incarnation, and keys repeated within this
-- call (merged requests); the latter are resolved once assigned.
local repeats, fresh, in_call, later = {}, {}, {}, {}
for i = 0, n - 1 do
  local base = 15 + i * 4
  local ki = tonumber(ARGV[base + 1])
  local repeated = false
  if ki > 0 and window > 0 then
    local key = KEYS[ki]
    if in_call[key] then
      repeated = true
      table.insert(later, {i, key})
    elseif not creating then
      local v = redis.call('GET', key)
      if v then
        local g, o, ver, at = string.match(v, '^(%S+) (%d+) (%d+) (%d+)$')
        if g == gen then
          repeated = true
          table.insert(repeats, {i, tonumber(o), tonumber(ver), tonumber(at)})
        end
      end
    end
    if not repeated then
      in_call[key] = true
    end
  end
  if not repeated then
    table.insert(fresh, base)
  end
end
local from = known
if gen ~= ARGV[1] then from = 1 end
local function before()
  if not creating and from < nxt then
    return redis.call('XRANGE', s, from, nxt - 1)
  end
  return {}
end
if #fresh == 0 then
  return {'ok', gen, epoch, nxt, {}, repeats, before()}
end
if ARGV[8] ~= '' or ARGV[9] ~= '' then
  local cur_off = nxt - 1
  local cur_ver = 0
  if not creating then
    cur_ver = tonumber(redis.call('HGET', m, 'v:' .. ARGV[15]) or '0')
  end
  if (ARGV[8] ~= '' and tonumber(ARGV[8]) ~= cur_off)
    or (ARGV[9] ~= '' and tonumber(ARGV[9]) ~= cur_ver) then
    return {'mismatch', cur_off, cur_ver}
  end
end
-- Every check passed: write.
local prior = before()
if creating then
  store_incarnation(ARGV[11], gen, epoch)
elseif h[6] then
  -- A subscribe's placeholder: its first event makes it a stored topic.
  promote_placeholder(ARGV[11])
end
redis.call('HSET', m, 'next', nxt + #fresh)
local versions = {}
local assigned = {}
local off = nxt
for _, base in ipairs(fresh) do
  local t = ARGV[base]
  local v = redis.call('HINCRBY', m, 'v:' .. t, 1)
  local id = string.format('%d-0', off)
  if ARGV[base + 2] ~= '' then
    redis.call('XADD', s, 'MAXLEN', ARGV[10], id, 't', t, 'v', v, 'ts', now, 'h', ARGV[base + 2], 'p', ARGV[base + 3])
  else
    redis.call('XADD', s, 'MAXLEN', ARGV[10], id, 't', t, 'v', v, 'ts', now, 'p', ARGV[base + 3])
  end
  local ki = tonumber(ARGV[base + 1])
  if ki > 0 and window > 0 then
    redis.call('SET', KEYS[ki], gen .. ' ' .. string.format('%d %d ', off, v) .. now, 'PX', window)
    assigned[KEYS[ki]] = {off, v}
  end
  table.insert(versions, v)
  off = off + 1
end
for _, r in ipairs(later) do
  local a = assigned[r[2]]
  table.insert(repeats, {r[1], a[1], a[2], tonumber(now)})
end
table.sort(repeats, function(x, y) return x[1] < y[1] end)
redis.call('PUBLISH', ARGV[12], ARGV[14] .. ' ' .. ARGV[11])
return {'ok', gen, epoch, nxt, versions, repeats, prior}
