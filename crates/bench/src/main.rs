//! `ringcast-bench`: runs one workload against one target through that
//! target's real client and prints one JSON line of results (stdout) and one
//! human line (stderr). `benches/compare.sh` starts the servers and runs the
//! whole side-by-side suite; `ringcast-bench report` renders its table.
//!
//! ```text
//! ringcast-bench --target ringcast --addr 127.0.0.1:7411 --server-pid 123 \
//!     --label publish128.ringcast.fsync publish --n 200000 --payload 128
//! ```

mod common;
mod decode;
mod groups;
mod report;
mod scenarios;
mod sse;

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use common::{Record, Target};

#[derive(Debug, Parser)]
#[command(name = "ringcast-bench", version, about)]
struct Args {
    /// System under test.
    #[arg(long, global = true, value_enum, default_value = "ringcast")]
    target: Target,
    /// `host:port` of the target (ringcast: its TCP listener). A
    /// comma-separated list (the nodes of a cluster): publish's publishers
    /// and fanout's subscribers take them round-robin (fanout's publisher
    /// the first); every other scenario uses the first.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:7411"
    )]
    addr: Vec<String>,
    /// Server process id: CPU time (utime+stime) and RSS are read from
    /// /proc/<pid> before and after the measured part. A comma-separated
    /// list (the nodes of a cluster): publish and fanout report the sum,
    /// and each node's own figure (`server_cpu_us_per_msg_nodes`); every
    /// other scenario measures the first.
    #[arg(long, global = true, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Process id of a store the servers share (the Redis of ringcast's
    /// redis backend): publish and fanout report its CPU apart
    /// (`backend_cpu_us_per_msg`).
    #[arg(long, global = true)]
    backend_pid: Option<u32>,
    /// Publish and fanout: wait this long after the measured part before
    /// reading CPU times, so that work the servers finish after the last
    /// ack (a cluster node following the others' appends) is counted; not
    /// part of the elapsed time.
    #[arg(long, global = true, default_value_t = 0)]
    cpu_settle_ms: u64,
    /// The server's data directory. With `--server-pid`, `publish` also
    /// reports its storage cost: bytes the server wrote to storage
    /// (`/proc/<pid>/io`) per payload byte published, and the growth of this
    /// directory's disk usage and of the server's RSS per payload byte
    /// retained.
    #[arg(long, global = true)]
    data_dir: Option<std::path::PathBuf>,
    /// Label stored in the result (the report pairs rows by label).
    #[arg(long, global = true, default_value = "")]
    label: String,
    /// Topic / subject / key prefix.
    #[arg(long, global = true, default_value = "bench")]
    dest: String,
    /// ringcast SDK deliveries buffered per subscription (the SDK's default).
    #[arg(long, global = true, default_value_t = 16_384)]
    sub_buffer: usize,
    /// ringcast only: `host:port` of its HTTP listener; the broker's own
    /// delivery counter (`/metrics`) is then reported as `server_deliveries`.
    /// A comma-separated list (the nodes of a cluster): counters are summed.
    #[arg(long, global = true)]
    metrics_addr: Option<String>,
    /// Redis Streams / JetStream: keep at most this many entries per stream
    /// (`XADD MAXLEN ~ N`, `max_msgs`), as ringcast's `topics.max_events`
    /// does; 0 = unbounded.
    #[arg(long, global = true, default_value_t = 0)]
    retain: u64,
    /// Runs of publish / fanout / resume / group, and of sse with `--events`
    /// (fresh topics each); the median run is reported, with every run's
    /// figure in `runs`.
    #[arg(long, global = true, default_value_t = 1)]
    repeat: usize,
    /// Also append the JSON line to this file.
    #[arg(long, global = true)]
    out: Option<std::path::PathBuf>,
    /// ringcast only: credentials (a JWT or an API key) every client sends
    /// in its hello.
    #[arg(long, global = true)]
    token: Option<String>,
    /// ringcast only: payload compression every SDK client offers in its
    /// hello: `none`, `lz4` (payloads from 1 KiB) or `lz4:BYTES`. With
    /// `--metrics-addr`, publish and fanout report the broker's wire bytes
    /// per message (`wire_in_per_msg`, `wire_out_per_msg`).
    #[arg(long, global = true, default_value = "none")]
    compression: String,
    /// What publish and fanout payloads hold: `fill` (one repeated byte),
    /// `json` (JSON records, as compressible as real events) or `random`
    /// (incompressible).
    #[arg(long, global = true, value_enum, default_value = "fill")]
    payload_kind: common::PayloadKind,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Pipelined publish throughput.
    Publish {
        /// Messages (after an untimed warm-up of n/20, at most 5,000).
        #[arg(long, default_value_t = 100_000)]
        n: u64,
        /// Payload bytes.
        #[arg(long, default_value_t = 128)]
        payload: usize,
        /// Publishes in flight (unacknowledged) at once, per publisher.
        #[arg(long, default_value_t = 1024)]
        window: usize,
        /// Publishers, each on its own connection (round-robin over
        /// `--addr`), publishing n / P each into the same topic at once;
        /// the rate is the aggregate of acknowledged messages.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
    },
    /// S subscribers (one connection each) on one topic, one publisher.
    Fanout {
        /// Subscribers.
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        /// Messages published.
        #[arg(long, default_value_t = 10_000)]
        n: u64,
        /// Payload bytes.
        #[arg(long, default_value_t = 128)]
        payload: usize,
        /// Publishes in flight at once.
        #[arg(long, default_value_t = 1024)]
        window: usize,
        /// Give up when no delivery happened for this long (seconds).
        #[arg(long, default_value_t = 3.0)]
        idle_s: f64,
    },
    /// Publish→receive latency at a paced rate, one subscriber.
    Latency {
        /// Messages per second.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        /// Measured seconds.
        #[arg(long, default_value_t = 10.0)]
        duration_s: f64,
        /// Unmeasured warm-up seconds before.
        #[arg(long, default_value_t = 1.0)]
        warmup_s: f64,
        /// Payload bytes (at least 9: timestamp + flag).
        #[arg(long, default_value_t = 128)]
        payload: usize,
    },
    /// A reader that missed `n` events catches up from the beginning.
    Resume {
        /// Events stored before the reader starts.
        #[arg(long, default_value_t = 100_000)]
        n: u64,
        /// Payload bytes.
        #[arg(long, default_value_t = 128)]
        payload: usize,
        /// Redis Streams: entries per XREAD.
        #[arg(long, default_value_t = 1000)]
        page: usize,
    },
    /// Consumer group: `n` events stored first, then W workers take them
    /// through a group and ack each one; acked events/s.
    Group {
        /// Events published (untimed) and then consumed.
        #[arg(long, default_value_t = 100_000)]
        n: u64,
        /// Workers, each on its own connection.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Payload bytes.
        #[arg(long, default_value_t = 128)]
        payload: usize,
        /// Per worker: ringcast `max_in_flight`, Redis `XREADGROUP COUNT`,
        /// JetStream messages per pull batch.
        #[arg(long, default_value_t = 256)]
        batch: usize,
    },
    /// ringcast only: N idle SSE connections, RSS per connection, broadcast
    /// delivery; with `--events`, wire bytes and broker CPU per event
    /// streamed, per content coding.
    Sse {
        /// `host:port` of ringcast's HTTP listener.
        #[arg(long, default_value = "127.0.0.1:7480")]
        http_addr: String,
        /// Concurrent SSE connections.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Events broadcast to all of them, one at a time.
        #[arg(long, default_value_t = 5)]
        broadcasts: u64,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 256)]
        open_concurrency: usize,
        /// Content codings to ask for (`Accept-Encoding`), comma-separated.
        /// Several run side by side, taking turns `--repeat` times on fresh
        /// connections and topics: one result each, labelled
        /// `<label>.<coding>`, with ratios to identity.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "identity")]
        encoding: Vec<decode::Coding>,
        /// Topics: 1 streams `GET /v1/topics/{topic}/events`; N > 1 one
        /// `GET /v1/events?topic=..` stream over N topics, published
        /// round-robin.
        #[arg(long, default_value_t = 1)]
        topics: usize,
        /// Events streamed after the broadcasts, paced, each checked on
        /// arrival: wire bytes and broker CPU per event delivered (0: none).
        #[arg(long, default_value_t = 0)]
        events: u64,
        /// Streamed events per publish: one atomic batch, which reaches each
        /// stream as one chunk.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Milliseconds between publishes of the stream.
        #[arg(long, default_value_t = 3.0)]
        interval_ms: f64,
        /// Events published to each topic before the connections open, so
        /// that offsets are those of a topic with a history: a multi-topic
        /// id holds each topic's offset in 1 byte below 64, 2 below 8,192,
        /// 3 from there to about a million.
        #[arg(long, default_value_t = 1)]
        prefill: u64,
    },
    /// ringcast only: N connections each holding a partial 4 MiB frame and
    /// N subscribers that never read, while publishing; server RSS before/after.
    Halfopen {
        /// Connections of each kind.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Events published while they are open.
        #[arg(long, default_value_t = 2_000)]
        n: u64,
        /// Payload bytes.
        #[arg(long, default_value_t = 16 * 1024)]
        payload: usize,
    },
    /// Renders the comparison table from a file of JSON result lines.
    Report {
        /// The results file (one JSON object per line).
        results: String,
    },
}

/// Arguments every scenario uses.
#[derive(Clone)]
pub struct Common {
    target: Target,
    /// The first of `addrs`.
    addr: String,
    /// Every `--addr`.
    addrs: Vec<String>,
    /// The first of `server_pids`.
    server_pid: Option<u32>,
    /// Every `--server-pid`.
    server_pids: Vec<u32>,
    backend_pid: Option<u32>,
    cpu_settle: Duration,
    data_dir: Option<std::path::PathBuf>,
    label: String,
    dest: String,
    sub_buffer: usize,
    metrics_addr: Option<String>,
    retain: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Scenario::Report { results } = &args.scenario {
        return match report::run(results) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringcast-bench: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    common::now_ns(); // fix the clock base
    common::set_token(args.token.clone());
    common::set_compression(&args.compression)?;
    common::set_payload_kind(args.payload_kind);
    let c = Common {
        target: args.target,
        addr: args.addr.first().cloned().unwrap_or_default(),
        addrs: args.addr.clone(),
        server_pid: args.server_pid.first().copied(),
        server_pids: args.server_pid.clone(),
        backend_pid: args.backend_pid,
        cpu_settle: Duration::from_millis(args.cpu_settle_ms),
        data_dir: args.data_dir.clone(),
        label: if args.label.is_empty() {
            args.target.name().to_owned()
        } else {
            args.label.clone()
        },
        dest: args.dest.clone(),
        sub_buffer: args.sub_buffer,
        metrics_addr: args.metrics_addr.clone(),
        retain: args.retain,
    };
    // Throughput scenarios may run several times (fresh topics each time);
    // the run with the median figure is reported, with every run's figure.
    // Everything else in the record comes from that same run: a publish
    // row's storage figures (`write_amp`, `disk_per_retained`,
    // `rss_per_retained`) are the median-rate run's own, not medians of
    // their own, so that they describe the run whose rate is shown.
    if let Scenario::Sse {
        ref http_addr,
        connections,
        broadcasts,
        open_concurrency,
        ref encoding,
        topics,
        events,
        batch,
        interval_ms,
        prefill,
    } = args.scenario
    {
        // Its own runs: the codings take turns, one result each.
        let options = sse::Options {
            http: http_addr.clone(),
            connections,
            broadcasts,
            open_concurrency,
            codings: encoding.clone(),
            topics,
            events,
            batch,
            interval: Duration::from_secs_f64(interval_ms.max(0.001) / 1e3),
            prefill,
            repeat: args.repeat,
        };
        for rec in sse::run(&c, &options).await? {
            emit(&rec, args.out.as_deref())?;
        }
        return Ok(());
    }
    let (repeat, key) = match &args.scenario {
        Scenario::Publish { .. } | Scenario::Fanout { .. } => (args.repeat.max(1), "msgs_per_s"),
        Scenario::Resume { .. } | Scenario::Group { .. } => (args.repeat.max(1), "events_per_s"),
        _ => (1, ""),
    };
    let mut runs = Vec::with_capacity(repeat);
    for i in 0..repeat {
        let mut c = c.clone();
        if repeat > 1 {
            c.dest = format!("{}.run{i}", c.dest);
        }
        runs.push(run_once(&c, &args.scenario).await?);
    }
    let rec = median_run(runs, key);
    emit(&rec, args.out.as_deref())
}

/// The run whose `key` is the median, with `runs` (every run's figure) and
/// `spread` ((max − min) / median) added.
fn median_run(mut runs: Vec<Record>, key: &str) -> Record {
    if runs.len() == 1 {
        return runs.pop().expect("one run");
    }
    let fig = |r: &Record| r.num(key).unwrap_or(0.0);
    runs.sort_by(|a, b| fig(a).total_cmp(&fig(b)));
    let figures: Vec<f64> = runs.iter().map(fig).collect();
    let mid = runs.len() / 2;
    let mut rec = runs.swap_remove(mid);
    let median = figures[mid];
    if median > 0.0 {
        let spread = (figures[figures.len() - 1] - figures[0]) / median;
        rec.set("spread", common::round(spread, 3));
    }
    rec.set("runs", figures);
    rec
}

async fn run_once(c: &Common, scenario: &Scenario) -> Result<Record> {
    Ok(match *scenario {
        Scenario::Publish {
            n,
            payload,
            window,
            publishers,
        } => scenarios::publish(c, n, payload, window, publishers.max(1)).await?,
        Scenario::Fanout {
            subscribers,
            n,
            payload,
            window,
            idle_s,
        } => {
            scenarios::fanout(
                c,
                subscribers,
                n,
                payload,
                window,
                Duration::from_secs_f64(idle_s),
            )
            .await?
        }
        Scenario::Latency {
            rate,
            duration_s,
            warmup_s,
            payload,
        } => {
            scenarios::latency(
                c,
                rate,
                Duration::from_secs_f64(duration_s),
                Duration::from_secs_f64(warmup_s),
                payload.max(9),
            )
            .await?
        }
        Scenario::Resume { n, payload, page } => scenarios::resume(c, n, payload, page).await?,
        Scenario::Group {
            n,
            workers,
            payload,
            batch,
        } => groups::group(c, n, workers, payload, batch).await?,
        Scenario::Sse { .. } => unreachable!("run by sse::run"),
        Scenario::Halfopen {
            connections,
            n,
            payload,
        } => scenarios::halfopen(c, connections, n, payload).await?,
        Scenario::Report { .. } => unreachable!("handled in main"),
    })
}

/// Prints the JSON line (stdout, and `out` if given) and a human line (stderr).
fn emit(rec: &Record, out: Option<&std::path::Path>) -> Result<()> {
    let line = serde_json::to_string(&rec.0)?;
    println!("{line}");
    if let Some(path) = out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{line}")?;
    }
    let s = |k: &str| rec.0.get(k).map(|v| v.to_string()).unwrap_or_default();
    let n = |k: &str| rec.num(k).unwrap_or(f64::NAN);
    let human = match s("scenario").trim_matches('"') {
        "publish" => {
            let mut h = format!("{:.0} msg/s, {:.1} MiB/s", n("msgs_per_s"), n("mib_per_s"));
            if rec.num("retained_payload_bytes").is_some() {
                h.push_str(&format!(
                    "; write amplification {:.2}×, disk {:.2}× and RSS {:.2}× the retained payload",
                    n("write_amp"),
                    n("disk_per_retained"),
                    n("rss_per_retained")
                ));
            }
            h
        }
        "fanout" => format!(
            "{} subs: {:.0} delivered msg/s, {} of {} delivered, server {:.2} µs CPU/msg",
            s("subscribers"),
            n("msgs_per_s"),
            s("delivered"),
            s("expected"),
            n("server_cpu_us_per_msg")
        ),
        "latency" => format!(
            "p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs ({} samples, {} lost)",
            n("p50_us"),
            n("p99_us"),
            n("p999_us"),
            n("max_us"),
            s("samples"),
            s("lost")
        ),
        "resume" => format!("{:.0} events/s", n("events_per_s")),
        "group" => format!(
            "{} workers: {:.0} acked events/s ({} of {}), server {:.2} µs CPU/ack, client {} CPU-s",
            s("workers"),
            n("events_per_s"),
            s("acked"),
            s("n"),
            n("server_cpu_us_per_msg"),
            s("client_cpu_s")
        ),
        "sse" => {
            let mut h = format!(
                "{} connections: {:.2} KiB RSS each",
                s("connections"),
                n("rss_per_conn_kib")
            );
            if n("broadcasts") > 0.0 {
                h.push_str(&format!("; broadcast p99 {:.0} µs", n("p99_us")));
            }
            if rec.num("wire_bytes_per_event").is_some() {
                let vs = |k: &str| {
                    rec.num(k)
                        .map(|r| format!(" ({r:.3}× identity)"))
                        .unwrap_or_default()
                };
                h.push_str(&format!(
                    "; {} over {} topic(s), {:.1} events/chunk: {:.1} B/event on the wire{}, \
                     broker {:.2} µs CPU/event{}",
                    s("coding").trim_matches('"'),
                    s("topics"),
                    n("events_per_chunk"),
                    n("wire_bytes_per_event"),
                    vs("wire_vs_identity"),
                    n("server_cpu_us_per_event"),
                    vs("cpu_vs_identity")
                ));
            }
            h
        }
        "halfopen" => format!(
            "{} partial + {} stalled connections: server RSS {} -> {} KiB",
            s("partial_open"),
            s("stalled_open"),
            s("rss_before_kib"),
            s("rss_after_kib")
        ),
        _ => String::new(),
    };
    eprintln!(
        "{} {} [{}]: {human}",
        s("scenario").trim_matches('"'),
        s("target").trim_matches('"'),
        s("label").trim_matches('"')
    );
    Ok(())
}
