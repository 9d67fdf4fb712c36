-- ringcast: delete a topic, leaving a tombstone that tells the other nodes
-- (see docs/cluster.md).
-- KEYS: 1 counters hash, 2 stream, 3 set of topic names
-- ARGV: 1 generation, 2 topic, 3 notification channel, 4 tombstone lifetime ms
local m = KEYS[1]
local gen = redis.call('HGET', m, 'gen') or ARGV[1]
redis.call('DEL', KEYS[2], m)
redis.call('HSET', m, 'gen', gen, 'deleted', 1)
redis.call('PEXPIRE', m, ARGV[4])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
