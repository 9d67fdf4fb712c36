#!/usr/bin/env bash
# TCP payload compression (issue 12), side by side in one run: publish and
# fan-out through the ringcast SDK without and with LZ4, for a compressible
# JSON payload and an incompressible one. Reports, per row, the broker's
# wire bytes per message (its socket counters on /metrics) and its CPU per
# message (/proc/<pid>/stat), and prints the Markdown table of
# BENCHMARKS.md ("TCP compression").
#
#   benches/compression.sh            # 4 KiB payloads, 3 runs per row (median)
#   benches/compression.sh --quick    # fewer messages, 1 run per row
#
# ringcastd runs in memory mode (no storage: the figures are the protocol's
# and the codec's), on loopback, with the client on the same cores.
# Environment: PAYLOAD (bytes, default 4096), CARGO_TARGET_DIR.
set -euo pipefail

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h | --help)
            sed -n '2,14p' "$0"
            exit 0
            ;;
        *)
            echo "compression.sh: unknown argument $arg (use --quick or nothing)" >&2
            exit 2
            ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PAYLOAD=${PAYLOAD:-4096}
if ((QUICK)); then
    PUB_N=20000 FAN_SUBS=10 FAN_N=2000 REPEAT=1
else
    PUB_N=300000 FAN_SUBS=10 FAN_N=50000 REPEAT=3
fi

echo "== building ringcastd and ringcast-bench (release)" >&2
cargo build --release --quiet -p ringcast --bin ringcastd
cargo build --release --quiet -p ringcast-bench
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RINGCASTD=$TARGET_DIR/release/ringcastd
BENCH=$TARGET_DIR/release/ringcast-bench

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ringcast-compression.XXXXXX")
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
SRV_PID=
cleanup() {
    if [[ -n $SRV_PID ]]; then
        kill -TERM "$SRV_PID" 2>/dev/null || true
        wait "$SRV_PID" 2>/dev/null || true
    fi
    [[ -s $RESULTS ]] && cp "$RESULTS" "$TARGET_DIR/compression-results.jsonl"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
}

wait_port() {
    local i
    for ((i = 0; i < 300; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$SRV_PID" 2>/dev/null || { echo "ringcastd exited" >&2; return 1; }
        sleep 0.1
    done
    return 1
}

TCP=$(free_port)
HTTP=$(free_port)
while [[ $HTTP == "$TCP" ]]; do HTTP=$(free_port); done
RINGCAST_LOG_FILTER=warn \
    RINGCAST_TOPICS_MAX_EVENTS=20000 \
    RINGCAST_TOPICS_MAX_BYTES=1GiB \
    RINGCAST_LIMITS_MAX_RETAINED_BYTES=8GiB \
    "$RINGCASTD" --durability memory --data-dir "$WORK/data" \
    --tcp-listen "127.0.0.1:$TCP" --http-listen "127.0.0.1:$HTTP" \
    >>"$WORK/ringcastd.log" 2>&1 &
SRV_PID=$!
wait_port "$TCP"
wait_port "$HTTP"
echo "== ringcastd --durability memory (pid $SRV_PID, 127.0.0.1:$TCP)" >&2

bench() {
    local label=$1
    shift
    "$BENCH" --target ringcast --addr "127.0.0.1:$TCP" --server-pid "$SRV_PID" \
        --metrics-addr "127.0.0.1:$HTTP" --repeat "$REPEAT" --out "$RESULTS" \
        --dest "$(printf 'c%05d' $((RANDOM % 100000)))" --label "$label" "$@" >/dev/null
}

# Without and with compression next to each other, per payload kind, so
# that drift over the run touches both alike.
for kind in json random; do
    for comp in none lz4; do
        bench "publish.$kind.$comp" --payload-kind "$kind" --compression "$comp" \
            publish --n "$PUB_N" --payload "$PAYLOAD"
    done
    for comp in none lz4; do
        bench "fanout.$kind.$comp" --payload-kind "$kind" --compression "$comp" \
            fanout --subscribers "$FAN_SUBS" --n "$FAN_N" --payload "$PAYLOAD"
    done
done

# The table: per scenario and payload, the plain row, the LZ4 row, and
# LZ4 / plain for wire bytes and CPU.
echo
echo "| scenario | payload | compression | msgs/s | wire bytes in / msg | wire bytes out / msg | broker CPU µs / msg | client CPU µs / msg |"
echo "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"
jq -r --arg size "$PAYLOAD" '
    (if .scenario == "publish" then .n else .delivered end) as $per
    | "| \(.scenario) | \(.payload_kind) \($size) B | \(.label | split(".") | .[2]) | \(.msgs_per_s) | \(.wire_in_per_msg) | \(.wire_out_per_msg) | \(.server_cpu_us_per_msg) | \(.client_cpu_s * 1e7 / $per | round / 10) |"' "$RESULTS"
echo
echo "| scenario | payload | wire bytes (the payload direction) LZ4 / plain | broker CPU / msg LZ4 / plain |"
echo "| --- | --- | ---: | ---: |"
jq -rs --arg size "$PAYLOAD" '
    group_by(.scenario + .payload_kind)[]
    | (map(select(.label | endswith(".none")))[0]) as $p
    | (map(select(.label | endswith(".lz4")))[0]) as $z
    | (if $p.scenario == "publish" then "wire_in_per_msg" else "wire_out_per_msg" end) as $k
    | "| \($p.scenario) | \($p.payload_kind) \($size) B | \(($z[$k] / $p[$k] * 1000 | round) / 1000) | \(($z.server_cpu_us_per_msg / $p.server_cpu_us_per_msg * 100 | round) / 100) |"
' "$RESULTS"
