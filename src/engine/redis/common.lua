-- ringcast: helpers shared by the scripts (prepended to each; see mod.rs).
-- KEYS[1] is always the topic's counters hash, KEYS[2] its stream and
-- KEYS[3] the set of stored topic names.

-- Stores a new incarnation of `topic` with no event yet, replacing whatever
-- was stored (another incarnation, a tombstone, a placeholder).
local function store_incarnation(topic, gen, epoch)
  redis.call('DEL', KEYS[2], KEYS[1])
  redis.call('HSET', KEYS[1], 'gen', gen, 'epoch', epoch, 'next', 1)
  redis.call('SADD', KEYS[3], topic)
end

-- Makes a subscribe's placeholder of `topic` a stored topic: it stays.
local function promote_placeholder(topic)
  redis.call('HDEL', KEYS[1], 'placeholder')
  redis.call('PERSIST', KEYS[1])
  redis.call('SADD', KEYS[3], topic)
end

