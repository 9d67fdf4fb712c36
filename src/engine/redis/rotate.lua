-- ringcast: start a new history of a topic whose stored state is behind what
-- a node saw acknowledged (Redis lost writes): a new epoch, offsets from 1,
-- never an offset given out twice in one epoch (see docs/cluster.md).
-- KEYS: 1 counters hash, 2 stream, 3 set of topic names
-- ARGV: 1 generation seen, 2 next offset seen, 3 new generation, 4 new epoch,
--       5 topic, 6 notification channel
-- Returns 1 if it started a new history, 0 if the stored state is not behind.
local m = KEYS[1]
local h = redis.call('HMGET', m, 'gen', 'next', 'deleted')
if h[1] and (h[1] ~= ARGV[1] or h[3] or tonumber(h[2]) >= tonumber(ARGV[2])) then
  return 0
end
store_incarnation(ARGV[5], ARGV[3], ARGV[4])
redis.call('PUBLISH', ARGV[6], ARGV[5])
return 1
