-- ringcast: the incarnation of a topic a subscribe names before anyone
-- published to it, so that every node hands out the same epoch for it
-- (see docs/cluster.md). A placeholder is not listed among the stored topics
-- and expires unless an append, seal or create makes it a stored topic.
-- KEYS: 1 counters hash, 2 stream
-- ARGV: 1 generation, 2 epoch (used if none is stored), 3 placeholder lifetime ms
-- Returns the counters hash (HGETALL) as it stands.
local m = KEYS[1]
local h = redis.call('HMGET', m, 'gen', 'deleted', 'placeholder')
if not h[1] or h[2] then
  redis.call('DEL', KEYS[2], m)
  redis.call('HSET', m, 'gen', ARGV[1], 'epoch', ARGV[2], 'next', 1, 'placeholder', 1)
  redis.call('PEXPIRE', m, ARGV[3])
elseif h[3] then
  redis.call('PEXPIRE', m, ARGV[3])
end
return redis.call('HGETALL', m)
