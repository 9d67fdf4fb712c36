#!/usr/bin/env bash
# Side-by-side: a baseline ringcastd (BASE_BIN) vs this tree's (CUR_BIN), and
# Redis pub/sub as the peer, in one run, same machine, same client. Needs
# release builds (cargo build --release --bin ringcastd --bin ringcast-bench)
# and redis-server on PATH.
set -u
B=${BENCH_BIN:-target/release/ringcast-bench}
OUT=/tmp/side.jsonl; : > $OUT
run_ringcast() { # label binary mode
  d=$(mktemp -d)
  RINGCAST_TOPICS_MAX_EVENTS=200000 RINGCAST_TOPICS_MAX_BYTES=1GiB RINGCAST_LIMITS_MAX_RETAINED_BYTES=8GiB \
  RINGCAST_LOG_FILTER=warn $2 --durability $3 --data-dir $d --tcp-listen 127.0.0.1:17500 --http-listen 127.0.0.1:17501 >/dev/null 2>&1 &
  pid=$!; sleep 1.5
  $B --target ringcast --addr 127.0.0.1:17500 --server-pid $pid --metrics-addr 127.0.0.1:17501 --label $1 --out $OUT --repeat 3 "${@:4}" 2>&1 | tail -n 1
  kill $pid; wait $pid 2>/dev/null; rm -rf $d
}
for round in 1 2; do
for v in base:${BASE_BIN:?path to a ringcastd built at the baseline commit} cur:${CUR_BIN:-target/release/ringcastd}; do
  l=${v%%:*}; bin=${v#*:}
  run_ringcast "$l.mem.pub128" $bin memory publish --n 200000 --payload 128 --window 1024
  run_ringcast "$l.fsync.pub4k" $bin fsync publish --n 30000 --payload 4096 --window 1024
  run_ringcast "$l.mem.fanout100" $bin memory fanout --subscribers 100 --n 20000 --payload 128 --window 1024
done
d=$(mktemp -d); redis-server --port 17600 --bind 127.0.0.1 --dir $d --save '' --appendonly no >/dev/null 2>&1 & rp=$!; sleep 1
$B --target redis-pubsub --addr 127.0.0.1:17600 --server-pid $rp --label redis.fanout100 --out $OUT --repeat 3 fanout --subscribers 100 --n 20000 --payload 128 --window 1024 2>&1 | tail -n 1
$B --target redis-pubsub --addr 127.0.0.1:17600 --server-pid $rp --label redis.pub128 --out $OUT --repeat 3 publish --n 200000 --payload 128 --window 1024 2>&1 | tail -n 1
kill $rp; rm -rf $d
done
