-- ringcast: seal a topic (see docs/cluster.md).
-- KEYS: 1 counters hash, 2 stream, 3 set of topic names
-- ARGV: 1 generation, 2 epoch, 3 now ms, 4 topic, 5 notification channel
-- Returns the time of the seal (the first one's, if it was sealed before),
-- or -1 when Redis holds no such topic (deleted, or lost: the follower
-- starts its new history; nothing is re-created here).
local m = KEYS[1]
local h = redis.call('HMGET', m, 'gen', 'deleted', 'sealed', 'placeholder')
if not h[1] or h[2] then
  return -1
elseif h[3] then
  return tonumber(h[3])
elseif h[4] then
  promote_placeholder(ARGV[4])
end
redis.call('HSET', m, 'sealed', ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[4])
return tonumber(ARGV[3])
