-- ringcast: a topic's counters and the stream entries from an offset on, in
-- one atomic read (a follower or a lookup never mixes two incarnations).
-- KEYS: 1 counters hash, 2 stream
-- ARGV: 1 the generation the caller holds ('' = none), 2 the offset to read from
-- Returns {counters (HGETALL), entries}: entries from ARGV[2] when the stored
-- generation is the caller's, else all of them (none for a placeholder or a
-- tombstone).
local fields = redis.call('HGETALL', KEYS[1])
local h = {}
for i = 1, #fields, 2 do
  h[fields[i]] = fields[i + 1]
end
if not h.gen or h.deleted then
  return {fields, {}}
end
local from = 1
if h.gen == ARGV[1] then
  from = tonumber(ARGV[2])
end
if from >= tonumber(h.next or '1') then
  return {fields, {}}
end
return {fields, redis.call('XRANGE', KEYS[2], from, '+')}
