#!/usr/bin/env bash
# Side-by-side benchmark of ringcast against Redis and NATS (see BENCHMARKS.md).
#
#   benches/compare.sh            # full suite, under 15 minutes on 2 cores
#   benches/compare.sh --quick    # smaller N, fewer rows, under 3 minutes (once built)
#   benches/compare.sh --auth     # only the cost of access control: ringcast memory
#                                 # with and without HS256 tokens (no peers needed)
#   benches/compare.sh --groups   # only the consumer-group rows (ringcast fsync,
#                                 # interval, memory; Redis Streams; JetStream)
#                                 # (combine with --quick for the small size)
#   benches/compare.sh --persist  # only the persisted publish rows (ringcast fsync,
#                                 # interval; Redis XADD always, everysec; JetStream
#                                 # file), with their storage cost: write
#                                 # amplification, disk and RSS per retained byte
#                                 # (combine with --quick for the small size)
#   benches/compare.sh --sse      # only the SSE row (ringcast alone, about a minute):
#                                 # server RSS per idle SSE connection and broadcast
#                                 # delivery at 10,000 connections (--quick: 1,000).
#                                 # With BASELINE_RINGCASTD=<a ringcastd built before a
#                                 # change>, the same row for that binary first, in the
#                                 # same run (BASELINE_BENCH: a ringcast-bench that
#                                 # speaks its protocol, when it differs).
#   benches/compare.sh --typescript  # only the TypeScript client beside the Rust SDK:
#                                 # publish (128 B, 4 KiB) and resume through each,
#                                 # alternating, on one ringcastd (memory), with
#                                 # throughput and client/broker CPU per event
#                                 # (needs Node >= 20; builds clients/typescript)
#   benches/compare.sh --cluster  # only ringcast's redis backend beside its local
#                                 # one, about 6 minutes (--quick: under 3): publish
#                                 # 128 B from 3 pipelined publishers (local memory,
#                                 # interval, fsync; redis backend with 1 node, and
#                                 # with 3 nodes, one publisher on each), and fan-out
#                                 # to 100 subscribers spread over the nodes from one
#                                 # publisher on node 1 (local memory; redis 1 and 3
#                                 # nodes): aggregate msg/s, ringcastd CPU per event
#                                 # (all nodes, and per node), and the CPU of the
#                                 # shared redis-server (--save "" --appendonly yes
#                                 # --appendfsync everysec, fresh for each cluster)
#
# Installs redis-server and nats-server if absent (Debian packages), builds
# ringcastd and ringcast-bench in release, starts every server on loopback
# on free ports with a fresh temp directory, runs each scenario through the
# system's real client (ringcast-bench), stops everything it started, and
# prints one Markdown table plus the targets met or missed. Servers that
# store (ringcast fsync/interval, Redis with AOF, JetStream) are benchmarked
# with --data-dir: their publish rows also report the storage cost (a
# "Storage cost of persisted publish" section after the targets).
#
# Environment: BENCH_TMPDIR (where data dirs go; default: mktemp's, i.e.
# $TMPDIR or /tmp — put it on the disk you want to measure), CARGO_TARGET_DIR.
set -euo pipefail
# Debian installs nats-server in /usr/sbin, which a non-root PATH may lack.
PATH=$PATH:/usr/sbin:/sbin

QUICK=0 AUTH_ONLY=0 GROUPS_ONLY=0 PERSIST_ONLY=0 SSE_ONLY=0 TS_ONLY=0 CLUSTER_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --auth) AUTH_ONLY=1 ;;
        --groups) GROUPS_ONLY=1 ;;
        --persist) PERSIST_ONLY=1 ;;
        --sse) SSE_ONLY=1 ;;
        --typescript) TS_ONLY=1 ;;
        --cluster) CLUSTER_ONLY=1 ;;
        -h | --help)
            sed -n '2,50p' "$0"
            exit 0
            ;;
        *)
            echo "compare.sh: unknown argument $arg (use --quick, --auth, --groups, --persist, --sse, --typescript, --cluster or nothing)" >&2
            exit 2
            ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# ---------------------------------------------------------------- sizes
# REPEAT: runs of each publish / fanout / resume row; the median is reported.
if ((QUICK)); then
    N128=50000 N4K=10000
    FANOUT=("1:50000" "100:5000")
    LAT_S=3
    SSE_N=1000
    GROUP_N=50000
    REPEAT=1
else
    N128=1000000 N4K=100000
    # subscribers:messages — 0.5M to 3M deliveries per row
    FANOUT=("1:500000" "10:100000" "100:20000" "1000:3000")
    LAT_S=10
    SSE_N=10000
    GROUP_N=100000
    REPEAT=3
fi
# --cluster: messages per publish row and subscribers:messages of the
# fan-out rows, for the local backend and the redis one; publishers (spread
# over the nodes); publishes in flight per publisher (every row alike,
# 1024 like WINDOW by default).
if ((QUICK)); then
    CLUSTER_N=50000 CLUSTER_FAN=100:2000
    CLUSTER_REDIS_N=50000 CLUSTER_REDIS_FAN=100:2000
else
    CLUSTER_N=500000 CLUSTER_FAN=100:20000
    CLUSTER_REDIS_N=200000 CLUSTER_REDIS_FAN=100:10000
fi
CLUSTER_PUBLISHERS=3
CLUSTER_WINDOW=${CLUSTER_WINDOW:-1024}
# Consumer groups: workers per row; per worker, jobs in flight (ringcast
# max_in_flight), entries per XREADGROUP (COUNT), messages per JetStream pull.
GROUP_WORKERS=(1 4)
GROUP_BATCH=256
RESUME_N=100000
WINDOW=1024
# Retention, the same everywhere: ringcast topics.max_events, Redis
# XADD MAXLEN ~, JetStream max_msgs. Steady-state publishing then includes
# trimming on every system. (ringcast's default is 10,000; resume needs
# 100,000.)
RETAIN=200000

# ---------------------------------------------------------------- limits
# The SSE row holds SSE_N sockets in the client and in the server, the
# 1000-subscriber row 2000: raise the descriptor limit for both (inherited).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < SSE_N + 256)); then
    echo "compare.sh: ulimit -n is $(ulimit -n); SSE row reduced" >&2
    SSE_N=$(($(ulimit -n) - 256))
fi

# ---------------------------------------------------------------- peers
if ((!AUTH_ONLY && !SSE_ONLY && !TS_ONLY)) && { ! command -v redis-server >/dev/null || ! command -v nats-server >/dev/null; }; then
    SUDO=()
    if (($(id -u) != 0)); then SUDO=(sudo); fi
    echo "== installing redis-server and nats-server" >&2
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server nats-server >/dev/null
fi
REDIS_SERVER=$(command -v redis-server || echo redis-server)
NATS_SERVER=$(command -v nats-server || echo nats-server)

# ---------------------------------------------------------------- build
echo "== building ringcastd, ringcast and ringcast-bench (release)" >&2
cargo build --release --quiet -p ringcast --bin ringcastd
cargo build --release --quiet -p ringcast-client --bin ringcast
cargo build --release --quiet -p ringcast-bench
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RINGCASTD=$TARGET_DIR/release/ringcastd
BENCH=$TARGET_DIR/release/ringcast-bench
RINGCAST_CLI=$TARGET_DIR/release/ringcast

# ---------------------------------------------------------------- lifecycle
WORK=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/ringcast-compare.XXXXXX")
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
STARTED=()

stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do stop_pid "$pid"; done
    if [[ -s $RESULTS ]]; then
        mkdir -p "$TARGET_DIR"
        cp "$RESULTS" "$TARGET_DIR/compare-results.jsonl"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port below the ephemeral range (so that no client socket
# of this run can take it meanwhile), not used by this run yet.
USED_PORTS=" "
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 12000))
        [[ $USED_PORTS == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS+="$p "
            echo "$p"
            return
        fi
    done
}

wait_port() {
    local port=$1 pid=$2 i
    for ((i = 0; i < 300; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "compare.sh: server $pid exited before listening on $port" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "compare.sh: nothing listening on $port after 30 s" >&2
    return 1
}

# SRV_DIR: the running server's data directory, empty when it stores
# nothing (ringcast memory, Redis without AOF, NATS core); bench() passes it
# as --data-dir, which adds the storage cost to publish rows.
SRV_PID= SRV_ADDR= SRV_HTTP= SRV_DIR=
stop_server() {
    stop_pid "$SRV_PID"
    local keep=() pid
    for pid in "${STARTED[@]}"; do [[ $pid == "$SRV_PID" ]] || keep+=("$pid"); done
    STARTED=("${keep[@]}")
    SRV_PID= SRV_DIR=
}

# ringcastd in one durability mode, fresh data dir. Retention is raised so
# that every scenario's events stay in the ring (resume needs 100,000; the
# default max_events is 10,000), and the connection limits cover the SSE
# and 1000-subscriber rows.
start_ringcast() {
    local mode=$1 config=${2:-} tcp http dir extra=()
    [[ -n $config ]] && extra=(--config "$config")
    tcp=$(free_port)
    http=$(free_port)
    dir=$WORK/ringcast-$mode-$RANDOM
    RINGCAST_LOG_FILTER=warn \
        RINGCAST_TOPICS_MAX_EVENTS=$RETAIN \
        RINGCAST_TOPICS_MAX_BYTES=1GiB \
        RINGCAST_LIMITS_MAX_RETAINED_BYTES=8GiB \
        RINGCAST_LIMITS_MAX_TCP_CONNECTIONS=20000 \
        RINGCAST_LIMITS_MAX_SSE_CONNECTIONS=20000 \
        "$RINGCASTD" "${extra[@]}" --durability "$mode" --data-dir "$dir" \
        --tcp-listen "127.0.0.1:$tcp" --http-listen "127.0.0.1:$http" \
        >>"$WORK/ringcastd.log" 2>&1 &
    SRV_PID=$!
    STARTED+=("$SRV_PID")
    wait_port "$tcp" "$SRV_PID"
    wait_port "$http" "$SRV_PID"
    SRV_ADDR=127.0.0.1:$tcp
    SRV_HTTP=127.0.0.1:$http
    SRV_DIR=$dir
    [[ $mode == memory ]] && SRV_DIR=
    echo "== ringcastd --durability $mode (pid $SRV_PID, $SRV_ADDR)" >&2
}

# redis-server: no RDB snapshots; AOF with the given appendfsync, or none.
start_redis() {
    local fsync=$1 port dir args
    port=$(free_port)
    dir=$WORK/redis-$fsync-$RANDOM
    mkdir -p "$dir"
    args=(--port "$port" --bind 127.0.0.1 --dir "$dir" --save '' --daemonize no
        --logfile "$WORK/redis.log" --maxclients 20000)
    if [[ $fsync == none ]]; then
        args+=(--appendonly no)
    else
        args+=(--appendonly yes --appendfsync "$fsync")
    fi
    "$REDIS_SERVER" "${args[@]}" &
    SRV_PID=$!
    STARTED+=("$SRV_PID")
    wait_port "$port" "$SRV_PID"
    SRV_ADDR=127.0.0.1:$port
    SRV_DIR=$dir
    [[ $fsync == none ]] && SRV_DIR=
    echo "== redis-server appendfsync=$fsync (pid $SRV_PID, $SRV_ADDR)" >&2
}

# nats-server: core only, or with JetStream (file store in a fresh dir).
start_nats() {
    local js=$1 port dir= args
    port=$(free_port)
    args=(-a 127.0.0.1 -p "$port" -l "$WORK/nats.log")
    if [[ $js == js ]]; then
        dir=$WORK/nats-$RANDOM
        mkdir -p "$dir"
        args+=(-js -sd "$dir")
    fi
    "$NATS_SERVER" "${args[@]}" &
    SRV_PID=$!
    STARTED+=("$SRV_PID")
    wait_port "$port" "$SRV_PID"
    SRV_ADDR=127.0.0.1:$port
    SRV_DIR=$dir
    echo "== nats-server ${js} (pid $SRV_PID, $SRV_ADDR)" >&2
}

# A cluster of ringcastd nodes on one fresh redis-server (no RDB, AOF
# everysec), [cluster] backend = "redis" in each node's TOML config:
# SRV_ADDR, SRV_HTTP and SRV_PID list every node (comma-separated, as
# ringcast-bench takes them), REDIS_PID is the Redis.
REDIS_PID=
start_cluster() { # nodes
    local nodes=$1 i port dir prefix addrs=() https=() pids=()
    port=$(free_port)
    dir=$WORK/redis-cluster-$RANDOM
    mkdir -p "$dir"
    "$REDIS_SERVER" --port "$port" --bind 127.0.0.1 --dir "$dir" --save '' --daemonize no \
        --logfile "$WORK/redis.log" --maxclients 20000 --appendonly yes --appendfsync everysec &
    REDIS_PID=$!
    STARTED+=("$REDIS_PID")
    wait_port "$port" "$REDIS_PID"
    prefix=bench$RANDOM
    for ((i = 1; i <= nodes; i++)); do
        printf '[cluster]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:%s/"\nnode_id = "n%s"\nkey_prefix = "%s"\n' \
            "$port" "$i" "$prefix" >"$WORK/cluster-n$i.toml"
        start_ringcast memory "$WORK/cluster-n$i.toml"
        addrs+=("$SRV_ADDR") https+=("$SRV_HTTP") pids+=("$SRV_PID")
    done
    SRV_ADDR=$(IFS=,; echo "${addrs[*]}")
    SRV_HTTP=$(IFS=,; echo "${https[*]}")
    SRV_PID=$(IFS=,; echo "${pids[*]}")
    SRV_DIR=
    echo "== cluster of $nodes ringcastd (pids $SRV_PID) on redis-server appendfsync=everysec (pid $REDIS_PID, 127.0.0.1:$port)" >&2
}

stop_cluster() {
    local pid keep=() all=" ${SRV_PID//,/ } $REDIS_PID "
    for pid in ${SRV_PID//,/ } $REDIS_PID; do stop_pid "$pid"; done
    for pid in "${STARTED[@]}"; do [[ $all == *" $pid "* ]] || keep+=("$pid"); done
    STARTED=("${keep[@]}")
    SRV_PID= SRV_DIR= REDIS_PID=
}

FAILED=0
# bench TARGET LABEL SCENARIO ARGS... — one ringcast-bench run; a failure is
# reported and counted, and the suite goes on.
bench() {
    local target=$1 label=$2
    shift 2
    local extra=()
    [[ $target == ringcast ]] && extra+=(--metrics-addr "$SRV_HTTP")
    [[ -n $SRV_DIR ]] && extra+=(--data-dir "$SRV_DIR")
    if ! "$BENCH" --target "$target" --addr "$SRV_ADDR" --server-pid "$SRV_PID" \
        --label "$label" --repeat "$REPEAT" --retain "$RETAIN" --out "$RESULTS" \
        "${extra[@]}" "$@" >/dev/null; then
        echo "compare.sh: FAILED: $label ($*)" >&2
        FAILED=$((FAILED + 1))
    fi
}

publish_pair() { # target label-prefix label-suffix
    bench "$1" "publish128.$2" publish --n "$N128" --payload 128 --window "$WINDOW"
    bench "$1" "publish4096.$2" publish --n "$N4K" --payload 4096 --window "$WINDOW"
}

fanout_rows() { # target label-system
    local spec s m
    for spec in "${FANOUT[@]}"; do
        s=${spec%%:*} m=${spec##*:}
        bench "$1" "fanout$s.$2" fanout --subscribers "$s" --n "$m" --payload 128 --window "$WINDOW"
    done
}

# N events stored, then W workers ack each through a consumer group
# (ringcast: pipelined Job::ack; Redis: XREADGROUP + one XACK per entry;
# JetStream: durable pull consumer, AckExplicit, ack() per message).
group_rows() { # target label-system
    local w
    for w in "${GROUP_WORKERS[@]}"; do
        bench "$1" "group$w.$2" group --n "$GROUP_N" --workers "$w" --payload 128 --batch "$GROUP_BATCH"
    done
}

# The same broker with access control on: HS256 tokens checked once per
# connection (hello), grants matched once per request.
auth_rows() {
    local spec token
    head -c 48 /dev/urandom | base64 >"$WORK/jwt.secret"
    printf '[auth.jwt]\nsecret_file = "%s"\n' "$WORK/jwt.secret" >"$WORK/auth.toml"
    token=$("$RINGCAST_CLI" token --secret-file "$WORK/jwt.secret" --sub bench \
        --publish '*' --subscribe '*' --ttl 1h)
    start_ringcast memory "$WORK/auth.toml"
    bench ringcast publish128.ringcast.memory.auth --token "$token" \
        publish --n "$N128" --payload 128 --window "$WINDOW"
    for spec in "${FANOUT[@]}"; do
        [[ ${spec%%:*} == 10 ]] || continue
        bench ringcast fanout10.ringcast.auth --token "$token" \
            fanout --subscribers 10 --n "${spec##*:}" --payload 128 --window "$WINDOW"
    done
    stop_server
}

# The SSE row: SSE_N idle SSE connections on a fresh broker (a clean RSS
# baseline), then broadcasts to all of them.
sse_row() { # label
    start_ringcast memory
    bench ringcast "$1" sse --http-addr "$SRV_HTTP" --connections "$SSE_N" --broadcasts 5
    stop_server
}

BEGIN=$(date +%s)

if ((TS_ONLY)); then
    # The same scenarios through the Rust SDK (ringcast-bench) and the
    # TypeScript client (clients/typescript/bench/bench.mjs), alternating on
    # one broker, each row the median of REPEAT runs.
    echo "== building clients/typescript" >&2
    (cd clients/typescript && { [[ -d node_modules ]] || npm ci --silent; } && npx tsc -p tsconfig.json)
    ts_bench() { # label scenario args...
        local label=$1
        shift
        if ! node clients/typescript/bench/bench.mjs "$@" --addr "$SRV_ADDR" --server-pid "$SRV_PID" \
            --label "$label" --repeat "$REPEAT" --out "$RESULTS" >/dev/null; then
            echo "compare.sh: FAILED: $label ($*)" >&2
            FAILED=$((FAILED + 1))
        fi
    }
    start_ringcast memory
    for payload in 128 4096; do
        n=$N128
        [[ $payload == 4096 ]] && n=$N4K
        bench ringcast "rust.publish$payload" publish --n "$n" --payload "$payload" --window "$WINDOW"
        ts_bench "ts.publish$payload" publish --n "$n" --payload "$payload" --window "$WINDOW"
    done
    rn=$((N128 < 100000 ? N128 : 100000)) # within RETAIN: a resume without a gap
    bench ringcast rust.resume128 resume --n "$rn" --payload 128
    ts_bench ts.resume128 resume --n "$rn" --payload 128
    stop_server
    echo "== $(nproc) cores, load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    node clients/typescript/bench/bench.mjs table "$RESULTS"
    exit $((FAILED > 0))
fi

if ((CLUSTER_ONLY)); then
    # Each row the median of REPEAT runs (fresh topics each). CPU is read
    # 250 ms after the last ack or delivery, so that what a node does after
    # it (following the other nodes' appends) is counted.
    settle=(--cpu-settle-ms 250)
    cluster_publish() { # label-system messages [bench options]
        local label=$1 n=$2
        shift 2
        bench ringcast "cluster.publish128.$label" "${settle[@]}" "$@" \
            publish --n "$n" --payload 128 --window "$CLUSTER_WINDOW" --publishers "$CLUSTER_PUBLISHERS"
    }
    cluster_fanout() { # label-system subscribers:messages [bench options]
        local label=$1 spec=$2
        shift 2
        bench ringcast "cluster.fanout${spec%%:*}.$label" "${settle[@]}" "$@" \
            fanout --subscribers "${spec%%:*}" --n "${spec##*:}" --payload 128 --window "$CLUSTER_WINDOW"
    }
    start_ringcast memory
    cluster_publish local.memory "$CLUSTER_N"
    cluster_fanout local "$CLUSTER_FAN"
    stop_server
    for mode in interval fsync; do
        start_ringcast "$mode"
        cluster_publish "local.$mode" "$CLUSTER_N"
        stop_server
    done
    for nodes in 1 3; do
        start_cluster "$nodes"
        cluster_publish "redis$nodes" "$CLUSTER_REDIS_N" --backend-pid "$REDIS_PID"
        cluster_fanout "redis$nodes" "$CLUSTER_REDIS_FAN" --backend-pid "$REDIS_PID"
        stop_cluster
    done
    echo "== $(nproc) cores, $("$REDIS_SERVER" --version | grep -o 'v=[0-9.]*'), $(($(date +%s) - BEGIN)) s$( ((QUICK)) && echo ' (--quick)')," \
        "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    "$BENCH" report "$RESULTS" | sed -n '/^Cluster:/,$p'
    exit $((FAILED > 0))
fi

if ((SSE_ONLY)); then
    if [[ -n ${BASELINE_RINGCASTD:-} ]]; then
        BUILT_RINGCASTD=$RINGCASTD BUILT_BENCH=$BENCH
        RINGCASTD=$BASELINE_RINGCASTD BENCH=${BASELINE_BENCH:-$BENCH}
        sse_row sse.ringcast.baseline
        RINGCASTD=$BUILT_RINGCASTD BENCH=$BUILT_BENCH
    fi
    sse_row sse.ringcast
    echo "== $(nproc) cores, load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    "$BENCH" report "$RESULTS" | grep -E '^\| (scenario|---)|SSE'
    if [[ -n ${BASELINE_RINGCASTD:-} ]]; then
        kib() { grep -F "\"label\":\"$1\"" "$RESULTS" | grep -o '"rss_per_conn_kib":[0-9.]*' | cut -d: -f2; }
        echo
        echo "RSS per idle SSE connection: $(kib sse.ringcast) KiB ($RINGCASTD)," \
            "$(kib sse.ringcast.baseline) KiB ($BASELINE_RINGCASTD)"
    fi
    exit $((FAILED > 0))
fi

if ((AUTH_ONLY)); then
    # Back to back in one run (each row the median of REPEAT runs).
    FANOUT=("10:100000")
    start_ringcast memory
    bench ringcast publish128.ringcast.memory publish --n "$N128" --payload 128 --window "$WINDOW"
    fanout_rows ringcast ringcast
    stop_server
    auth_rows
    "$BENCH" report "$RESULTS" | grep -E '^\| (scenario|---)|HS256'
    exit $((FAILED > 0))
fi

if ((GROUPS_ONLY)); then
    # Consumer groups only, every system in one run, the peers with the
    # settings of the publish rows (Redis AOF everysec, JetStream file).
    for mode in fsync interval memory; do
        start_ringcast "$mode"
        group_rows ringcast "ringcast.$mode"
        stop_server
    done
    start_redis everysec
    group_rows redis-streams redis
    stop_server
    start_nats js
    group_rows nats-jetstream jetstream
    stop_server
    echo "== $(nproc) cores, load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    "$BENCH" report "$RESULTS" | grep -E '^\| (scenario|---)|consumer group|^Targets'
    exit $((FAILED > 0))
fi

if ((PERSIST_ONLY)); then
    # The persisted publish rows only, back to back, each with its storage
    # cost; the main table's publish rows, their targets, and the storage
    # section.
    for mode in fsync interval; do
        start_ringcast "$mode"
        publish_pair ringcast "ringcast.$mode"
        stop_server
    done
    for fsync in always everysec; do
        start_redis "$fsync"
        publish_pair redis-streams "redis-xadd.$fsync"
        stop_server
    done
    start_nats js
    publish_pair nats-jetstream jetstream
    stop_server
    echo "== $(nproc) cores, load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    "$BENCH" report "$RESULTS" | awk '
        /^$/ && part == 0 { part = 1 }
        /^Storage cost/ { part = 2 }
        part != 1 || /^$/ || /^Targets:/ || /persisted publish/'
    exit $((FAILED > 0))
fi

# ---------------------------------------------------------------- ringcast
start_ringcast fsync
publish_pair ringcast ringcast.fsync
group_rows ringcast ringcast.fsync
stop_server

start_ringcast interval
publish_pair ringcast ringcast.interval
group_rows ringcast ringcast.interval
bench ringcast resume.ringcast resume --n "$RESUME_N" --payload 128
bench ringcast resume.ringcast.buf1k --dest bench1k --sub-buffer 1024 resume --n "$RESUME_N" --payload 128
stop_server

start_ringcast memory
publish_pair ringcast ringcast.memory
group_rows ringcast ringcast.memory
fanout_rows ringcast ringcast
# The SDK pauses a subscription whose queue (default 16,384; 1,024 before)
# fills and re-subscribes it later: the same row with the old, shallow queue
# shows what that costs.
for spec in "${FANOUT[@]}"; do
    [[ ${spec%%:*} == 100 ]] || continue
    bench ringcast fanout100.ringcast.buf1k --dest bench1k --sub-buffer 1024 \
        fanout --subscribers 100 --n "${spec##*:}" --payload 128 --window "$WINDOW"
done
bench ringcast latency.ringcast latency --rate 10000 --duration-s "$LAT_S" --payload 128
stop_server

auth_rows
sse_row sse.ringcast

# ---------------------------------------------------------------- Redis
start_redis always
publish_pair redis-streams redis-xadd.always
stop_server

start_redis everysec
publish_pair redis-streams redis-xadd.everysec
bench redis-streams resume.redis resume --n "$RESUME_N" --payload 128 --page 1000
group_rows redis-streams redis
stop_server

start_redis none
publish_pair redis-pubsub redis-publish
fanout_rows redis-pubsub redis
bench redis-pubsub latency.redis latency --rate 10000 --duration-s "$LAT_S" --payload 128
stop_server

# ---------------------------------------------------------------- NATS
start_nats js
publish_pair nats-jetstream jetstream
bench nats-jetstream resume.jetstream resume --n "$RESUME_N" --payload 128
group_rows nats-jetstream jetstream
stop_server

start_nats core
publish_pair nats-core nats-core
fanout_rows nats-core nats
bench nats-core latency.nats latency --rate 10000 --duration-s "$LAT_S" --payload 128
stop_server

# ---------------------------------------------------------------- report
END=$(date +%s)
echo >&2
echo "== $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)," \
    "$("$REDIS_SERVER" --version | grep -o 'v=[0-9.]*'), nats-server $("$NATS_SERVER" --version | grep -o '[0-9][0-9.]*$')," \
    "$((END - BEGIN)) s$( ((QUICK)) && echo ' (--quick)'), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$BENCH" report "$RESULTS"
echo >&2
echo "== results: $TARGET_DIR/compare-results.jsonl" >&2
((FAILED == 0)) || echo "== $FAILED scenario(s) FAILED (see above)" >&2
exit $((FAILED > 0))
