-- ringcast: drop a topic's events below the first one retention keeps; stores
-- a topic created before its first event (see docs/cluster.md).
-- KEYS: 1 counters hash, 2 stream, 3 set of topic names
-- ARGV: 1 generation, 2 epoch, 3 first retained offset, 4 topic,
--       5 notification channel, 6 the next offset the caller holds
local m = KEYS[1]
local h = redis.call('HMGET', m, 'gen', 'deleted', 'placeholder')
if not h[1] or (h[2] and h[1] ~= ARGV[1]) then
  -- Only a topic that holds nothing yet is stored here (an explicit
  -- create, also over another incarnation's tombstone); a missing one with
  -- events is Redis's loss: the follower starts its new history.
  if tonumber(ARGV[6]) > 1 then
    return 0
  end
  store_incarnation(ARGV[4], ARGV[1], ARGV[2])
  redis.call('PUBLISH', ARGV[5], ARGV[4])
  return 0
end
if h[2] or h[1] ~= ARGV[1] then
  return 0
end
if h[3] then
  -- A placeholder created explicitly: now a stored topic.
  promote_placeholder(ARGV[4])
  redis.call('PUBLISH', ARGV[5], ARGV[4])
end
return redis.call('XTRIM', KEYS[2], 'MINID', ARGV[3])
