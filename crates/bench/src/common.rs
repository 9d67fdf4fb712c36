//! What every scenario shares: process statistics from `/proc`, clocks,
//! payloads, the result record, and one publisher / subscriber abstraction
//! over the five targets (each driven through its real client library).

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Map, Value};

/// The system under test, and the client used to drive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// ringcastd through the `ringcast-client` SDK (binary TCP protocol).
    Ringcast,
    /// Redis PUBLISH / SUBSCRIBE through the `redis` crate.
    RedisPubsub,
    /// Redis Streams (XADD / XREAD) through the `redis` crate.
    RedisStreams,
    /// NATS core publish / subscribe through `async-nats`.
    NatsCore,
    /// NATS JetStream (file-storage stream) through `async-nats`.
    NatsJetstream,
}

impl Target {
    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Target::Ringcast => "ringcast",
            Target::RedisPubsub => "redis-pubsub",
            Target::RedisStreams => "redis-streams",
            Target::NatsCore => "nats-core",
            Target::NatsJetstream => "nats-jetstream",
        }
    }
}

// ---------------------------------------------------------------- clocks

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since the first call in this process (a monotonic clock
/// shared by the publisher and the subscribers, which live in this process).
pub fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------- /proc

/// Kernel clock ticks per second for `/proc/<pid>/stat` times. Linux fixes
/// `USER_HZ` at 100 for user space on every architecture this runs on.
const USER_HZ: f64 = 100.0;

/// utime + stime of a process, in seconds (10 ms resolution).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// The CPU time of this process, in seconds.
pub fn self_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// Resident set size of a process, in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Reads ringcast's `/metrics` (Prometheus text) over plain HTTP/1.0 and
/// returns the sum of the samples of `metric` (every label set; 0 when it
/// has none yet), or `None` when the page could not be read.
/// `http` may be a comma-separated list (the nodes of a cluster): the sum
/// over all of them, `None` when one could not be read.
pub async fn scrape(http: &str, metric: &str) -> Option<f64> {
    let mut total = 0.0;
    for one in http.split(',') {
        total += scrape_one(one, metric).await?;
    }
    Some(total)
}

async fn scrape_one(http: &str, metric: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(http).await.ok()?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()??;
    if !text.starts_with("HTTP/1.") || !text.contains(" 200 ") {
        return None;
    }
    // A counter appears on its first increment: absent means zero.
    let mut total = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            total += v;
        }
    }
    Some(total)
}

/// The ringcast counter of messages written to subscribers (TCP and SSE).
const DELIVERIES: &str = "ringcast_deliveries_total";

/// CPU time of the server (if its pid is known) and of this client over a
/// measured interval; for ringcast with `--metrics-addr`, also the
/// deliveries the broker counted (which exposes redeliveries). With several
/// server pids (the nodes of a cluster), the server figures are their sum,
/// and each node's own is reported beside; a backend pid (the Redis that
/// the nodes share) is measured apart.
pub struct CpuMeter {
    server_pids: Vec<u32>,
    server_starts: Vec<Option<f64>>,
    backend: Option<(u32, Option<f64>)>,
    client_start: f64,
    metrics: Option<(String, f64)>,
}

impl CpuMeter {
    /// Starts measuring.
    pub async fn start(server_pid: Option<u32>, metrics_addr: Option<&str>) -> Self {
        Self::start_nodes(
            &server_pid.into_iter().collect::<Vec<_>>(),
            None,
            metrics_addr,
        )
        .await
    }

    /// Starts measuring every node of `server_pids` and the `backend`.
    pub async fn start_nodes(
        server_pids: &[u32],
        backend: Option<u32>,
        metrics_addr: Option<&str>,
    ) -> Self {
        let metrics = match metrics_addr {
            Some(a) => scrape(a, DELIVERIES).await.map(|v| (a.to_owned(), v)),
            None => None,
        };
        CpuMeter {
            server_pids: server_pids.to_vec(),
            server_starts: server_pids.iter().map(|&p| cpu_seconds(p)).collect(),
            backend: backend.map(|p| (p, cpu_seconds(p))),
            client_start: self_cpu_seconds(),
            metrics,
        }
    }

    /// Stops measuring and writes `server_cpu_s`, `client_cpu_s` and, with
    /// `per` messages, `server_cpu_us_per_msg` into the record (and
    /// `server_deliveries` when metrics are read).
    pub async fn finish(&self, rec: &mut Record, per: u64) {
        self.finish_nodes(rec, per, None).await;
    }

    /// [`finish`](Self::finish), and with several nodes each node's CPU
    /// (`server_cpu_s_nodes`) and CPU per message (`server_cpu_us_per_msg_nodes`:
    /// over `per_node[i]` messages when given, else over `per`); with a
    /// backend, `backend_cpu_s` and `backend_cpu_us_per_msg` (over `per`).
    pub async fn finish_nodes(&self, rec: &mut Record, per: u64, per_node: Option<&[u64]>) {
        let client = self_cpu_seconds() - self.client_start;
        let nodes: Option<Vec<f64>> = self
            .server_pids
            .iter()
            .zip(&self.server_starts)
            .map(|(&pid, start)| Some(cpu_seconds(pid)? - (*start)?))
            .collect();
        let nodes = nodes.filter(|n| !n.is_empty());
        rec.set("client_cpu_s", round(client, 3));
        let per_us = |cpu: f64, per: u64| round(cpu * 1e6 / per as f64, 3);
        if let Some(nodes) = &nodes {
            let server: f64 = nodes.iter().sum();
            rec.set("server_cpu_s", round(server, 3));
            if per > 0 {
                rec.set("server_cpu_us_per_msg", per_us(server, per));
            }
            if nodes.len() > 1 {
                rec.set(
                    "server_cpu_s_nodes",
                    nodes.iter().map(|&c| round(c, 3)).collect::<Vec<_>>(),
                );
                let each: Vec<f64> = nodes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| {
                        let n = per_node.and_then(|p| p.get(i).copied()).unwrap_or(per);
                        if n > 0 {
                            per_us(c, n)
                        } else {
                            0.0
                        }
                    })
                    .collect();
                rec.set("server_cpu_us_per_msg_nodes", each);
            }
        }
        if let Some((pid, Some(start))) = self.backend {
            if let Some(end) = cpu_seconds(pid) {
                rec.set("backend_cpu_s", round(end - start, 3));
                if per > 0 {
                    rec.set("backend_cpu_us_per_msg", per_us(end - start, per));
                }
            }
        }
        if let Some((addr, before)) = &self.metrics {
            if let Some(after) = scrape(addr, DELIVERIES).await {
                rec.set("server_deliveries", after - before);
            }
        }
    }
}

// ---------------------------------------------------------------- storage

/// Bytes a process caused to be written to storage so far:
/// `write_bytes − cancelled_write_bytes` of `/proc/<pid>/io`. The kernel
/// charges `write_bytes` to the task that dirties a page (or submits direct
/// I/O), when it dirties it, so deferred writeback still counts for the
/// server; `cancelled_write_bytes` takes back dirty pages that were
/// truncated before they reached the disk. Unlike `wchar`, socket writes
/// are not in it. (On tmpfs nothing is ever written back: 0.)
pub fn storage_written(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| -> Option<u64> {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(field("write_bytes:")?.saturating_sub(field("cancelled_write_bytes:")?))
}

/// Space allocated on disk to everything under `dir`: the sum of
/// `st_blocks × 512` of every file, recursively (what `du` reports), each
/// hard-linked file once; symbolic links are not followed. Files removed
/// while the walk runs are skipped; `None` when `dir` cannot be read.
pub fn disk_usage(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::symlink_metadata(dir).ok()?;
    let mut total = root.blocks() * 512;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut first = true;
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(_) if !first => continue, // removed meanwhile
            Err(_) => return None,
        };
        first = false;
        for entry in entries.flatten() {
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Some(total)
}

/// The storage cost of a publish run (`--data-dir` with `--server-pid`):
/// the server's writes to storage over the measured publish, and its disk
/// usage and RSS over the whole run, against the payload it published and
/// the payload it retains.
pub struct StorageMeter {
    pid: u32,
    dir: std::path::PathBuf,
    disk_before: Option<u64>,
    rss_before: Option<u64>,
    written_before: Option<u64>,
}

/// How long the server's write counter must stay still to count as settled
/// (above ringcast's 200 ms `interval` flush and sled's own 500 ms flush),
/// and the longest wait for it.
const SETTLE_QUIET: Duration = Duration::from_millis(700);
const SETTLE_MAX: Duration = Duration::from_secs(4);

impl StorageMeter {
    /// Takes the disk-usage and RSS baselines: call it just before the
    /// warm-up, on a fresh topic / stream. `None` unless both the pid and
    /// the data directory are known.
    pub fn start(pid: Option<u32>, dir: Option<&std::path::Path>) -> Option<Self> {
        let (pid, dir) = (pid?, dir?);
        Some(StorageMeter {
            pid,
            dir: dir.to_path_buf(),
            disk_before: disk_usage(dir),
            rss_before: rss_kib(pid),
            written_before: None,
        })
    }

    /// Waits until the server has stopped writing (its write counter still
    /// for [`SETTLE_QUIET`], at most [`SETTLE_MAX`]) and returns the counter.
    /// A broker in `interval` mode, or sled's own flusher, writes what was
    /// published a few hundred ms later: settling after the warm-up keeps
    /// the warm-up's deferred writes out of the measured interval, settling
    /// after the measured publish keeps its own in. Untimed.
    async fn settle(&self) -> Option<u64> {
        let started = Instant::now();
        let mut last = storage_written(self.pid)?;
        let mut still_since = Instant::now();
        while started.elapsed() < SETTLE_MAX && still_since.elapsed() < SETTLE_QUIET {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = storage_written(self.pid)?;
            if now != last {
                last = now;
                still_since = Instant::now();
            }
        }
        Some(last)
    }

    /// After the warm-up, right before the measured publish: settles and
    /// takes the write-counter baseline.
    pub async fn begin_measured(&mut self) {
        self.written_before = self.settle().await;
    }

    /// After the measured publish (and its CPU figures): settles, then
    /// writes into the record
    /// - `disk_write_bytes`, `write_amp`: bytes the server wrote to storage
    ///   over the measured publish ÷ `measured_payload` (its payload bytes);
    /// - `disk_bytes` (growth of the data directory over the run, warm-up
    ///   included), `disk_bytes_total`, `disk_per_retained`;
    /// - `rss_delta_bytes`, `rss_per_retained` (VmRSS growth over the run);
    /// - `retained_events`, `retained_payload_bytes`.
    ///
    /// Disk and RSS are deltas, not totals: a data directory and a server
    /// process serve several rows (128 B then 4 KiB, and `--repeat` runs on
    /// fresh topics), so what this run added is set against what this run
    /// leaves retained, `retained_events × payload`. Both can come out low
    /// (or negative) when the server frees older data meanwhile (segment
    /// reuse, compaction) and high when it preallocates.
    pub async fn finish(
        self,
        rec: &mut Record,
        measured_payload: u64,
        retained_events: u64,
        payload_size: u64,
    ) {
        let written_after = self.settle().await;
        let retained = retained_events * payload_size;
        let per = |bytes: f64, of: u64| {
            if of > 0 {
                Value::from(round(bytes / of as f64, 3))
            } else {
                Value::Null
            }
        };
        rec.set("retained_events", retained_events);
        rec.set("retained_payload_bytes", retained);
        if let (Some(a), Some(b)) = (written_after, self.written_before) {
            let w = a.saturating_sub(b);
            rec.set("disk_write_bytes", w);
            rec.set("write_amp", per(w as f64, measured_payload));
        }
        let disk_after = disk_usage(&self.dir);
        if let Some(after) = disk_after {
            rec.set("disk_bytes_total", after);
        }
        if let (Some(after), Some(before)) = (disk_after, self.disk_before) {
            let d = after as i64 - before as i64;
            rec.set("disk_bytes", d);
            rec.set("disk_per_retained", per(d as f64, retained));
        }
        if let (Some(after), Some(before)) = (rss_kib(self.pid), self.rss_before) {
            let d = (after as i64 - before as i64) * 1024;
            rec.set("rss_delta_bytes", d);
            rec.set("rss_per_retained", per(d as f64, retained));
        }
    }
}

/// Rounds to `digits` decimals (for readable JSON).
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

// ---------------------------------------------------------------- results

/// One scenario's result: a flat JSON object, printed as one line.
#[derive(Debug, Default)]
pub struct Record(pub Map<String, Value>);

impl Record {
    /// A record with the fields every result has.
    pub fn new(scenario: &str, target: Target, label: &str) -> Self {
        let mut r = Record::default();
        r.set("scenario", scenario);
        r.set("target", target.name());
        r.set("label", label);
        r
    }

    /// Sets a field.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.0.insert(key.to_owned(), value.into());
    }

    /// Reads a numeric field.
    pub fn num(&self, key: &str) -> Option<f64> {
        self.0.get(key).and_then(Value::as_f64)
    }
}

// ---------------------------------------------------------------- payloads

/// A payload of `size` bytes whose first 8 bytes hold `stamp` (big-endian)
/// and whose 9th byte is `flag`; the rest is filler.
pub fn stamped(size: usize, stamp: u64, flag: u8) -> Bytes {
    let mut v = vec![b'x'; size.max(9)];
    v[..8].copy_from_slice(&stamp.to_be_bytes());
    v[8] = flag;
    Bytes::from(v)
}

/// Reads the stamp and flag written by [`stamped`].
pub fn read_stamp(p: &[u8]) -> Option<(u64, u8)> {
    let stamp = u64::from_be_bytes(p.get(..8)?.try_into().ok()?);
    Some((stamp, *p.get(8)?))
}

// ---------------------------------------------------------------- connections

/// A redis URL for `host:port` (or the URL itself).
pub fn redis_url(addr: &str) -> String {
    if addr.starts_with("redis://") {
        addr.to_owned()
    } else {
        format!("redis://{addr}/")
    }
}

/// The redis crate's async defaults (500 ms response timeout, 1 s connect
/// timeout) are too short for a deep pipeline against a server that fans
/// each PUBLISH out to 1,000 subscribers on a loaded 2-core machine.
pub fn redis_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(60)))
        .set_connection_timeout(Some(Duration::from_secs(30)))
}

/// Converts a topic-style name (`bench.x`) to what each system accepts.
pub fn stream_name(dest: &str) -> String {
    // JetStream stream names may not contain '.', '*', '>' or spaces.
    dest.replace(['.', '-'], "_").to_uppercase()
}

/// A publishing connection to one target.
#[derive(Clone)]
pub enum Publisher {
    /// ringcast SDK client.
    Ringcast(ringcast_client::Client),
    /// Redis multiplexed connection; `streams` picks XADD over PUBLISH.
    Redis {
        /// The connection (cheap to clone; requests are pipelined).
        conn: redis::aio::MultiplexedConnection,
        /// XADD (true) or PUBLISH (false).
        streams: bool,
        /// XADD: `MAXLEN ~ retain` when non-zero.
        retain: u64,
    },
    /// NATS core client.
    Nats(async_nats::Client),
    /// JetStream context.
    JetStream {
        /// The context.
        js: async_nats::jetstream::Context,
        /// The stream's `max_msgs` when non-zero.
        retain: u64,
    },
}

impl Publisher {
    /// Connects to `addr` (`host:port`, or a redis URL). `window` bounds
    /// JetStream's outstanding acks; `retain` (0 = unbounded) caps what a
    /// Redis stream (`XADD MAXLEN ~`) or a JetStream stream (`max_msgs`)
    /// keeps, like ringcast's `topics.max_events`.
    pub async fn connect(target: Target, addr: &str, window: usize, retain: u64) -> Result<Self> {
        Ok(match target {
            Target::Ringcast => Publisher::Ringcast(
                ringcast_connect(addr)
                    .await
                    .with_context(|| format!("connecting to ringcast at {addr}"))?,
            ),
            Target::RedisPubsub | Target::RedisStreams => {
                let client = redis::Client::open(redis_url(addr))?;
                let conn = client
                    .get_multiplexed_async_connection_with_config(&redis_config())
                    .await
                    .with_context(|| format!("connecting to redis at {addr}"))?;
                Publisher::Redis {
                    conn,
                    streams: target == Target::RedisStreams,
                    retain,
                }
            }
            Target::NatsCore => Publisher::Nats(nats_connect(addr).await?),
            Target::NatsJetstream => {
                let client = nats_connect(addr).await?;
                let js = async_nats::jetstream::ContextBuilder::new()
                    .max_ack_inflight(window.max(1))
                    .backpressure_on_inflight(true)
                    .timeout(Duration::from_secs(30))
                    .build(client);
                Publisher::JetStream { js, retain }
            }
        })
    }

    /// Makes `dest` empty and ready: deletes a Redis stream key, (re)creates
    /// a JetStream file stream bound to subject `dest`. ringcast topics are
    /// created on first use; callers pick fresh names.
    pub async fn prepare(&self, dest: &str) -> Result<()> {
        match self {
            Publisher::Redis {
                conn,
                streams: true,
                ..
            } => {
                let mut c = conn.clone();
                let _: () = redis::cmd("DEL").arg(dest).query_async(&mut c).await?;
            }
            Publisher::JetStream { js, retain } => {
                let name = stream_name(dest);
                let _ = js.delete_stream(&name).await;
                js.create_stream(async_nats::jetstream::stream::Config {
                    name,
                    subjects: vec![dest.to_owned()],
                    storage: async_nats::jetstream::stream::StorageType::File,
                    max_messages: if *retain > 0 { *retain as i64 } else { -1 },
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("creating JetStream stream for {dest}: {e}"))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Publishes `n` messages to `dest`, keeping at most `window` publishes
    /// in flight (unacknowledged), and returns once every one is
    /// acknowledged (NATS core: flushed through a PING/PONG round trip).
    pub async fn publish_n(
        &self,
        dest: &str,
        n: u64,
        window: usize,
        payload: &Bytes,
    ) -> Result<()> {
        let window = window.max(1);
        match self {
            Publisher::Ringcast(client) => {
                let mut pending = VecDeque::with_capacity(window);
                for _ in 0..n {
                    if pending.len() >= window {
                        let ack: ringcast_client::PendingAck = pending.pop_front().expect("full");
                        ack.await?;
                    }
                    let event = ringcast_client::new_event("b", payload.clone());
                    pending.push_back(client.queue_publish(dest, event).await?);
                }
                for ack in pending {
                    ack.await?;
                }
            }
            Publisher::Redis {
                conn,
                streams,
                retain,
            } => {
                // Pipelines of up to 64 commands, window/64 of them in flight
                // on the multiplexed connection: how the redis crate is used
                // for throughput.
                let chunk = window.min(64);
                let pipes = (window / chunk).max(1);
                let mut inflight = VecDeque::with_capacity(pipes);
                let mut sent = 0u64;
                while sent < n {
                    if inflight.len() >= pipes {
                        let h: tokio::task::JoinHandle<redis::RedisResult<()>> =
                            inflight.pop_front().expect("full");
                        h.await??;
                    }
                    let k = (n - sent).min(chunk as u64);
                    let mut pipe = redis::pipe();
                    for _ in 0..k {
                        if *streams {
                            let cmd = pipe.cmd("XADD").arg(dest);
                            if *retain > 0 {
                                cmd.arg("MAXLEN").arg("~").arg(*retain);
                            }
                            cmd.arg("*").arg("d").arg(&payload[..]);
                        } else {
                            pipe.cmd("PUBLISH").arg(dest).arg(&payload[..]);
                        }
                        pipe.ignore();
                    }
                    let mut c = conn.clone();
                    inflight.push_back(tokio::spawn(async move { pipe.query_async(&mut c).await }));
                    sent += k;
                }
                for h in inflight {
                    h.await??;
                }
            }
            Publisher::Nats(client) => {
                for _ in 0..n {
                    client.publish(dest.to_owned(), payload.clone()).await?;
                }
                client.flush().await?;
            }
            Publisher::JetStream { js, .. } => {
                let mut pending = VecDeque::with_capacity(window);
                for _ in 0..n {
                    if pending.len() >= window {
                        let ack: async_nats::jetstream::context::PublishAckFuture =
                            pending.pop_front().expect("full");
                        ack.await?;
                    }
                    pending.push_back(js.publish(dest.to_owned(), payload.clone()).await?);
                }
                for ack in pending {
                    ack.await?;
                }
            }
        }
        Ok(())
    }

    /// Sends one message without waiting for its ack (acks, where there are
    /// any, are awaited by `acks`, a background drain).
    pub async fn fire(&self, dest: &str, payload: Bytes, acks: &AckDrain) -> Result<()> {
        match self {
            Publisher::Ringcast(client) => {
                let ack = client
                    .queue_publish(dest, ringcast_client::new_event("b", payload))
                    .await?;
                acks.push(Box::pin(async move {
                    ack.await.map(|_| ()).map_err(Into::into)
                }));
            }
            Publisher::Redis {
                conn,
                streams,
                retain,
            } => {
                let mut cmd = if *streams {
                    let mut c = redis::cmd("XADD");
                    c.arg(dest);
                    if *retain > 0 {
                        c.arg("MAXLEN").arg("~").arg(*retain);
                    }
                    c.arg("*").arg("d");
                    c
                } else {
                    let mut c = redis::cmd("PUBLISH");
                    c.arg(dest);
                    c
                };
                cmd.arg(&payload[..]);
                let mut c = conn.clone();
                // The multiplexed connection sends a request only when its
                // future is polled: spawn it so it goes out now.
                let h = tokio::spawn(async move { cmd.query_async::<()>(&mut c).await });
                acks.push(Box::pin(async move { Ok(h.await??) }));
            }
            Publisher::Nats(client) => client.publish(dest.to_owned(), payload).await?,
            Publisher::JetStream { js, .. } => {
                let ack = js.publish(dest.to_owned(), payload).await?;
                acks.push(Box::pin(async move {
                    ack.await.map(|_| ()).map_err(Into::into)
                }));
            }
        }
        Ok(())
    }
}

type AckFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// Awaits acks in the background, in order, counting failures.
pub struct AckDrain {
    tx: tokio::sync::mpsc::UnboundedSender<AckFuture>,
    task: tokio::task::JoinHandle<u64>,
}

impl AckDrain {
    /// Starts the drain task.
    pub fn start() -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<AckFuture>();
        let task = tokio::spawn(async move {
            let mut failures = 0u64;
            while let Some(f) = rx.recv().await {
                if let Err(e) = f.await {
                    if failures == 0 {
                        eprintln!("publish failed: {e:#}");
                    }
                    failures += 1;
                }
            }
            failures
        });
        AckDrain { tx, task }
    }

    fn push(&self, f: AckFuture) {
        let _ = self.tx.send(f);
    }

    /// Waits for every ack; returns the number of failed publishes.
    pub async fn finish(self) -> u64 {
        drop(self.tx);
        self.task.await.unwrap_or(u64::MAX)
    }
}

/// Connects an async-nats client with settings fit for a benchmark.
pub async fn nats_connect(addr: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        // Buffer deep enough that a subscriber task briefly descheduled on
        // a 2-core machine does not drop messages client-side.
        .subscription_capacity(1 << 20)
        .connect(addr)
        .await
        .with_context(|| format!("connecting to nats at {addr}"))
}

/// What a subscriber yields.
pub enum Item {
    /// A message (its payload).
    Msg(Bytes),
    /// A gap announced by the broker (ringcast only): `n` events skipped.
    Gap(u64),
}

/// A subscribing connection (one per subscriber).
pub enum Subscriber {
    /// ringcast subscription (it holds its client).
    Ringcast(ringcast_client::Subscription),
    /// Redis pub/sub message stream.
    Redis(redis::aio::PubSubStream),
    /// NATS core subscription.
    Nats {
        /// The subscription.
        sub: async_nats::Subscriber,
        /// Kept alive for as long as the subscription.
        _client: async_nats::Client,
    },
}

impl Subscriber {
    /// Connects and subscribes (live) to `dest`; returns once the server
    /// confirmed the subscription.
    pub async fn connect(target: Target, addr: &str, dest: &str, buffer: usize) -> Result<Self> {
        Ok(match target {
            Target::Ringcast => {
                let client = ringcast_connect(addr).await?;
                let sub = client.subscribe(dest).live().buffer(buffer).send().await?;
                Subscriber::Ringcast(sub)
            }
            Target::RedisPubsub => {
                let client = redis::Client::open(redis_url(addr))?;
                let mut ps = client.get_async_pubsub().await?;
                ps.subscribe(dest).await?;
                Subscriber::Redis(ps.into_on_message())
            }
            Target::NatsCore => {
                let client = nats_connect(addr).await?;
                let sub = client.subscribe(dest.to_owned()).await?;
                // SUB is not acknowledged: a PING/PONG proves it was processed.
                client.flush().await?;
                Subscriber::Nats {
                    sub,
                    _client: client,
                }
            }
            t => bail!("{} has no live subscriber in this harness", t.name()),
        })
    }

    /// The next message; `None` when the subscription ended.
    pub async fn next(&mut self) -> Option<Item> {
        match self {
            Subscriber::Ringcast(sub) => match sub.next_delivery().await? {
                Ok(ringcast_client::Delivery::Event(e)) => Some(Item::Msg(e.payload)),
                Ok(ringcast_client::Delivery::Gap(g)) => {
                    Some(Item::Gap(g.current.saturating_sub(g.requested)))
                }
                Ok(ringcast_client::Delivery::End { .. }) => None,
                Err(e) => {
                    eprintln!("ringcast subscription failed: {e}");
                    None
                }
            },
            Subscriber::Redis(s) => s
                .next()
                .await
                .map(|m| Item::Msg(Bytes::copy_from_slice(m.get_payload_bytes()))),
            Subscriber::Nats { sub, .. } => sub.next().await.map(|m| Item::Msg(m.payload)),
        }
    }
}

/// Runs `f` for `0..n` with at most `concurrency` in flight; collects the
/// results in index order.
pub async fn bounded<T, F, Fut>(n: usize, concurrency: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    futures::stream::iter(0..n)
        .map(f)
        .buffered(concurrency.max(1))
        .collect()
        .await
}

static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Sets the credentials every ringcast client of this run sends (`--token`).
pub fn set_token(token: Option<String>) {
    let _ = TOKEN.set(token);
}

/// Connects a ringcast SDK client, with `--token` and `--compression`
/// when given.
pub async fn ringcast_connect(addr: &str) -> ringcast_client::Result<ringcast_client::Client> {
    let mut options = ringcast_client::ClientOptions::new(addr);
    if let Some(token) = TOKEN.get().and_then(Option::as_ref) {
        options = options.with_credentials(token.clone());
    }
    if let Some(&compression) = COMPRESSION.get() {
        options = options.with_compression(compression);
    }
    ringcast_client::Client::connect_with(options).await
}

static COMPRESSION: std::sync::OnceLock<ringcast_client::Compression> = std::sync::OnceLock::new();

/// Sets the payload compression every ringcast client of this run offers
/// (`--compression`: `none`, `lz4` or `lz4:BYTES`).
pub fn set_compression(spec: &str) -> Result<()> {
    use ringcast_client::Compression;
    let compression = match spec.split_once(':') {
        None if spec == "none" => Compression::None,
        None if spec == "lz4" => Compression::lz4(),
        Some(("lz4", n)) => Compression::Lz4 {
            min_size: n.parse().with_context(|| format!("--compression {spec}"))?,
        },
        _ => bail!("--compression {spec}: expected none, lz4 or lz4:BYTES"),
    };
    let _ = COMPRESSION.set(compression);
    Ok(())
}

/// What publish and fanout payloads hold (`--payload-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PayloadKind {
    /// One byte repeated (`x`): the historical default; compresses to
    /// almost nothing, so not a fair compression figure.
    Fill,
    /// JSON records (`{"order":…,"status":…,"customer":…,"total":…}`),
    /// about as compressible as real application events.
    Json,
    /// Pseudo-random bytes: nothing to compress.
    Random,
}

impl PayloadKind {
    /// The name recorded in results.
    pub fn name(self) -> &'static str {
        match self {
            PayloadKind::Fill => "fill",
            PayloadKind::Json => "json",
            PayloadKind::Random => "random",
        }
    }
}

static PAYLOAD_KIND: std::sync::OnceLock<PayloadKind> = std::sync::OnceLock::new();

/// Sets what [`payload`] makes (`--payload-kind`).
pub fn set_payload_kind(kind: PayloadKind) {
    let _ = PAYLOAD_KIND.set(kind);
}

/// A payload of `size` bytes of the run's `--payload-kind`.
pub fn payload(size: usize) -> Bytes {
    match PAYLOAD_KIND.get().copied().unwrap_or(PayloadKind::Fill) {
        PayloadKind::Fill => Bytes::from(vec![b'x'; size]),
        PayloadKind::Json => {
            let mut s = String::with_capacity(size + 96);
            s.push('[');
            let mut i = 0u64;
            while s.len() < size {
                s.push_str(&format!(
                    r#"{{"order":{},"status":"{}","customer":"cust-{:04}","total":{}.{:02}}},"#,
                    1_000_000 + i * 37,
                    ["created", "paid", "shipped", "delivered"][(i % 4) as usize],
                    i * 7919 % 10_000,
                    i * 131 % 5000,
                    i % 100
                ));
                i += 1;
            }
            s.truncate(size);
            Bytes::from(s)
        }
        PayloadKind::Random => {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ size as u64;
            (0..size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect()
        }
    }
}

/// ringcast's counters of bytes read from and written to clients.
const BYTES_IN: &str = "ringcast_bytes_in_total";
const BYTES_OUT: &str = "ringcast_bytes_out_total";

/// Bytes the broker read and wrote on its sockets over a measured interval
/// (ringcast with `--metrics-addr`): what compression saves on the wire.
pub struct WireMeter {
    metrics: Option<(String, f64, f64)>,
}

impl WireMeter {
    /// Starts measuring.
    pub async fn start(metrics_addr: Option<&str>) -> Self {
        let metrics = match metrics_addr {
            Some(a) => match (scrape(a, BYTES_IN).await, scrape(a, BYTES_OUT).await) {
                (Some(i), Some(o)) => Some((a.to_owned(), i, o)),
                _ => None,
            },
            None => None,
        };
        WireMeter { metrics }
    }

    /// Stops measuring and writes `wire_in_per_msg` and `wire_out_per_msg`
    /// (bytes the broker read and wrote, per `per` messages) into the record.
    pub async fn finish(&self, rec: &mut Record, per: u64) {
        let Some((addr, i0, o0)) = &self.metrics else {
            return;
        };
        if let (Some(i1), Some(o1)) = (scrape(addr, BYTES_IN).await, scrape(addr, BYTES_OUT).await)
        {
            let per = per.max(1) as f64;
            rec.set("wire_in_per_msg", round((i1 - i0) / per, 1));
            rec.set("wire_out_per_msg", round((o1 - o0) / per, 1));
        }
        if let Some(&c) = COMPRESSION.get() {
            rec.set("compression", format!("{c:?}"));
        }
        rec.set(
            "payload_kind",
            PAYLOAD_KIND
                .get()
                .copied()
                .unwrap_or(PayloadKind::Fill)
                .name(),
        );
    }
}
