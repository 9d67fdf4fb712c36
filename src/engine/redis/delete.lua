-- ringcast: delete a topic's incarnation, leaving a tombstone that tells the
-- other nodes (see docs/cluster.md). Only the incarnation the caller names:
-- a node that is behind (or a second expiry of a sealed topic) never
-- deletes a newer one.
-- KEYS: 1 counters hash, 2 stream, 3 set of topic names
-- ARGV: 1 generation, 2 topic, 3 notification channel, 4 tombstone lifetime ms
-- Returns 1 if it deleted, 0 if Redis holds another incarnation or none.
local m = KEYS[1]
local h = redis.call('HMGET', m, 'gen', 'deleted')
if h[1] ~= ARGV[1] or h[2] then
  return 0
end
redis.call('DEL', KEYS[2], m)
redis.call('HSET', m, 'gen', ARGV[1], 'deleted', 1)
redis.call('PEXPIRE', m, ARGV[4])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
