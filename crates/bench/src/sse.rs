//! `sse` (ringcast only): many concurrent SSE connections over raw
//! HTTP/1.1: the server's RSS per connection, how long a broadcast takes to
//! reach them all, and, with `--events`, what a stream of events costs per
//! event delivered: bytes on the wire and broker CPU, in each content coding
//! asked for (`--encoding identity,gzip,br`), over one topic or over N
//! through the multi-topic endpoint (`--topics N`).
//!
//! The client is deliberately minimal: it sends one GET, reads the status
//! line and headers, de-chunks the body when it is chunked, decodes it when
//! it is compressed, and splits it into SSE events (`event:` / `id:` /
//! `data:` lines, a blank line ends an event). It reads the socket itself so
//! that what it counts is what came over the wire (compressed, with the
//! chunk framing), and decodes with its own decoders (see [`crate::decode`])
//! to check that every streamed event arrived exactly as published.
//!
//! The stream phase (`--events N`): one publisher sends N events, `--batch`
//! per publish (one atomic batch reaches a stream together, as one chunk)
//! every `--interval-ms`, round-robin over the topics. It is measured from
//! just before the first publish until every connection has every event:
//! socket bytes read by all connections, and the broker's utime + stime
//! (`/proc/<pid>/stat`, which includes taking the publishes: the same work
//! in every coding), each over the events delivered. Then the topics are
//! sealed, so that every stream ends and a compressed one is checked to its
//! end (gzip: its CRC-32 and length).
//!
//! Several codings run side by side: each run opens fresh connections on
//! fresh topics, the codings take turns (identity, gzip, br, identity, ...)
//! `--repeat` times, and each coding's median run (by broker CPU per event)
//! is reported with its ratios to identity's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use crate::common::{
    cpu_seconds, now_ns, round, rss_kib, self_cpu_seconds, CpuMeter, Record, Target,
};
use crate::decode::{Coding, Decoder};
use crate::scenarios::{latency_histogram, put_percentiles};
use crate::Common;

/// Incremental decoder of an HTTP/1.1 response into SSE events.
pub struct SseParser {
    buf: Vec<u8>,
    headers_done: bool,
    chunked: bool,
    /// Bytes left in the current chunk (chunked mode).
    chunk_left: usize,
    /// Waiting for the CRLF that ends a chunk's data.
    chunk_crlf: bool,
    /// The data of the chunk being read.
    chunk: Vec<u8>,
    /// The response's `Content-Encoding`.
    coding: Coding,
    decoder: Decoder,
    /// Decoded body not yet split into events.
    text: Vec<u8>,
    event: String,
    id: String,
    data: String,
    /// Body chunks read whole.
    chunks: u64,
    /// Body bytes decoded.
    text_bytes: u64,
    /// The body's end (its last, empty chunk) was read.
    ended: bool,
}

impl Default for SseParser {
    fn default() -> Self {
        Self {
            buf: Vec::new(),
            headers_done: false,
            chunked: false,
            chunk_left: 0,
            chunk_crlf: false,
            chunk: Vec::new(),
            coding: Coding::Identity,
            decoder: Decoder::new(Coding::Identity),
            text: Vec::new(),
            event: String::new(),
            id: String::new(),
            data: String::new(),
            chunks: 0,
            text_bytes: 0,
            ended: false,
        }
    }
}

/// One parsed SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (empty = "message").
    pub event: String,
    /// `id:`.
    pub id: String,
    /// `data:` lines joined by '\n'.
    pub data: String,
}

impl SseParser {
    /// Feeds bytes; returns the events completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>> {
        self.buf.extend_from_slice(bytes);
        if !self.headers_done {
            let Some(end) = find(&self.buf, b"\r\n\r\n") else {
                if self.buf.len() > 64 * 1024 {
                    bail!("response headers over 64 KiB");
                }
                return Ok(Vec::new());
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
            let status = head.lines().next().unwrap_or_default().to_owned();
            if !status.starts_with("http/1.1 200") {
                bail!("SSE request answered {status:?}");
            }
            let header = |name: &str| {
                head.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .map(str::trim)
            };
            self.chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
            self.coding = Coding::from_header(header("content-encoding").unwrap_or(""))?;
            self.decoder = Decoder::new(self.coding);
            self.buf.drain(..end + 4);
            self.headers_done = true;
        }
        self.dechunk()?;
        Ok(self.events())
    }

    /// The coding the response came in (identity until its head is read).
    pub fn coding(&self) -> Coding {
        self.coding
    }

    /// Whether the body ended, and ended as its coding requires.
    pub fn ended(&mut self) -> Option<bool> {
        self.ended.then(|| self.decoder.finished())
    }

    /// Decodes `data` (a whole chunk, or what came of an unchunked body).
    fn decode(&mut self, data: &[u8]) -> Result<()> {
        let before = self.text.len();
        self.decoder.feed(data, &mut self.text)?;
        self.text_bytes += (self.text.len() - before) as u64;
        Ok(())
    }

    fn dechunk(&mut self) -> Result<()> {
        if !self.chunked {
            let body = std::mem::take(&mut self.buf);
            return self.decode(&body);
        }
        loop {
            if self.ended {
                // Trailers, if any, are of no interest.
                self.buf.clear();
                return Ok(());
            }
            if self.chunk_left > 0 {
                let take = self.chunk_left.min(self.buf.len());
                if take == 0 {
                    return Ok(());
                }
                self.chunk.extend(self.buf.drain(..take));
                self.chunk_left -= take;
                if self.chunk_left == 0 {
                    self.chunk_crlf = true;
                    // A chunk is decoded whole: the broker flushes its coder
                    // at the end of each, so it decodes at once.
                    let chunk = std::mem::take(&mut self.chunk);
                    self.decode(&chunk)?;
                    self.chunk = chunk;
                    self.chunk.clear();
                    self.chunks += 1;
                }
                continue;
            }
            if self.chunk_crlf {
                if self.buf.len() < 2 {
                    return Ok(());
                }
                self.buf.drain(..2);
                self.chunk_crlf = false;
                continue;
            }
            let Some(eol) = find(&self.buf, b"\r\n") else {
                return Ok(());
            };
            let line = String::from_utf8_lossy(&self.buf[..eol]).into_owned();
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .with_context(|| format!("bad chunk size line {line:?}"))?;
            self.buf.drain(..eol + 2);
            if size == 0 {
                self.ended = true;
            }
            self.chunk_left = size;
        }
    }

    fn events(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(len) = self.text[start..].iter().position(|&b| b == b'\n') {
            let raw = &self.text[start..start + len];
            start += len + 1;
            let line = String::from_utf8_lossy(raw);
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                if !self.event.is_empty() || !self.data.is_empty() {
                    out.push(SseEvent {
                        event: std::mem::take(&mut self.event),
                        id: std::mem::take(&mut self.id),
                        data: std::mem::take(&mut self.data),
                    });
                }
                continue;
            }
            if line.starts_with(':') {
                continue; // comment (heartbeat)
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.event = value.to_owned(),
                "id" => self.id = value.to_owned(),
                "data" => {
                    if !self.data.is_empty() {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                }
                _ => {}
            }
        }
        self.text.drain(..start);
        out
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The first `"key":<digits>` in `json`: an envelope's own `offset` (it
/// precedes the payload), a stream payload's `seq`.
fn json_u64(json: &str, key: &str) -> Option<u64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits = json[at..].bytes().take_while(u8::is_ascii_digit).count();
    json[at..at + digits].parse().ok()
}

// ---------------------------------------------------------------- payloads

/// The event type of streamed events.
const STREAM_TYPE: &str = "bench.order";

/// SplitMix64: the values of payload `seq`, reproducible from `seq` alone.
fn mix(seq: u64, k: u64) -> u64 {
    let mut z = seq
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(k.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The payload of streamed event `seq`: an order as a shop might publish
/// it, about 200 bytes of JSON whose keys and enumerations repeat from event
/// to event while ids, amounts and times vary (an id of 48 random bits).
pub fn order(seq: u64) -> String {
    const TIER: [&str; 4] = ["bronze", "silver", "gold", "platinum"];
    const STATUS: [&str; 5] = ["created", "paid", "packed", "shipped", "delivered"];
    const CURRENCY: [&str; 3] = ["EUR", "USD", "GBP"];
    const CHANNEL: [&str; 4] = ["web", "ios", "android", "store"];
    let pick = |k: u64, n: usize| (mix(seq, k) % n as u64) as usize;
    let cents = 500 + mix(seq, 5) % 49_500;
    // 2025-03-14T09:00:00Z plus about 40 ms per event.
    let ms = seq * 40 + mix(seq, 9) % 40;
    let (s, ms) = (ms / 1000, ms % 1000);
    format!(
        concat!(
            r#"{{"seq":{},"order_id":"ord_{:012x}","customer":{{"id":"cus_{:05}","tier":"{}"}},"#,
            r#""status":"{}","total":{{"amount":"{}.{:02}","currency":"{}"}},"items":{},"#,
            r#""channel":"{}","placed_at":"2025-03-14T{:02}:{:02}:{:02}.{:03}Z"}}"#
        ),
        seq,
        mix(seq, 1) & 0xffff_ffff_ffff,
        mix(seq, 2) % 20_000,
        TIER[pick(3, TIER.len())],
        STATUS[pick(4, STATUS.len())],
        cents / 100,
        cents % 100,
        CURRENCY[pick(6, CURRENCY.len())],
        1 + mix(seq, 7) % 9,
        CHANNEL[pick(8, CHANNEL.len())],
        9 + s / 3600,
        s / 60 % 60,
        s % 60,
        ms
    )
}

// ---------------------------------------------------------------- connections

/// What the connections of one run share with it.
struct Shared {
    /// Connections that got their `ready` event.
    ready: AtomicUsize,
    all_ready: Notify,
    failed: AtomicUsize,
    /// Bytes read from the sockets (all of them: head, framing, body).
    wire: AtomicU64,
    /// Body bytes after decoding.
    text: AtomicU64,
    /// Body chunks.
    chunks: AtomicU64,
    /// Payloads of the streamed events, by `seq`.
    payloads: Vec<String>,
    /// When each streamed event was published (`now_ns`); 0 = not yet.
    sent_ns: Vec<AtomicU64>,
    /// Streamed events received intact, each connection's first copy.
    received: AtomicU64,
    /// Streamed events received twice, or unlike what was published.
    wrong: AtomicU64,
    /// The first wrong event seen, for the error.
    first_wrong: Mutex<Option<String>>,
    progress: Notify,
    /// Publish → decoded, every streamed event on every connection.
    latency: Mutex<Histogram<u64>>,
    /// Streams whose body ended (after the seal): properly, or not (a
    /// compressed stream that stopped before its end).
    ended: AtomicUsize,
    ended_unfinished: AtomicUsize,
}

impl Shared {
    fn new(events: u64) -> Self {
        Self {
            ready: AtomicUsize::new(0),
            all_ready: Notify::new(),
            failed: AtomicUsize::new(0),
            wire: AtomicU64::new(0),
            text: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            payloads: (0..events).map(order).collect(),
            sent_ns: (0..events).map(|_| AtomicU64::new(0)).collect(),
            received: AtomicU64::new(0),
            wrong: AtomicU64::new(0),
            first_wrong: Mutex::new(None),
            progress: Notify::new(),
            latency: Mutex::new(latency_histogram()),
            ended: AtomicUsize::new(0),
            ended_unfinished: AtomicUsize::new(0),
        }
    }

    fn wrong(&self, what: String) {
        self.wrong.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_wrong.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(what);
        self.progress.notify_one();
    }

    /// Checks one streamed event against what was published.
    fn check(&self, ev: &SseEvent, seen: &mut [bool], at_ns: u64) {
        let Some(seq) = json_u64(&ev.data, "seq").filter(|&s| s < seen.len() as u64) else {
            return self.wrong(format!("event without a known seq: {:.200}", ev.data));
        };
        let i = seq as usize;
        // The envelope ends with `"data":<payload>}`.
        let intact = ev
            .data
            .strip_suffix('}')
            .and_then(|d| d.strip_suffix(self.payloads[i].as_str()))
            .is_some_and(|d| d.ends_with("\"data\":"));
        if !intact {
            return self.wrong(format!("event {seq} arrived altered: {:.300}", ev.data));
        }
        if std::mem::replace(&mut seen[i], true) {
            return self.wrong(format!("event {seq} arrived twice"));
        }
        let sent = self.sent_ns[i].load(Ordering::Acquire);
        if sent > 0 {
            let ns = at_ns.saturating_sub(sent).max(1_000);
            let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
            let _ = h.record(ns);
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        self.progress.notify_one();
    }
}

/// One SSE connection's request.
struct Request {
    http: String,
    path: String,
    coding: Coding,
    connections: usize,
}

/// One SSE connection: reports `ready`, sends the offset of every `bcast`
/// event with the instant it arrived, checks every streamed event, and
/// counts what it reads.
async fn connection(
    req: Arc<Request>,
    shared: Arc<Shared>,
    arrivals: mpsc::UnboundedSender<(u64, Instant)>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<()> {
    // The permit (bounded connect concurrency) is held until `ready`.
    let mut permit = Some(permit);
    let mut stream = TcpStream::connect(&req.http).await?;
    let accept = match req.coding {
        Coding::Identity => String::new(),
        coding => format!("Accept-Encoding: {}\r\n", coding.name()),
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n{accept}\r\n",
        req.path, req.http
    );
    stream.write_all(request.as_bytes()).await?;
    let mut parser = SseParser::default();
    let mut seen = vec![false; shared.payloads.len()];
    let mut buf = vec![0u8; 16 * 1024];
    let (mut text, mut chunks) = (0, 0);
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the server closed the SSE connection");
        }
        let at = Instant::now();
        let at_ns = now_ns();
        shared.wire.fetch_add(n as u64, Ordering::Relaxed);
        let events = parser.feed(&buf[..n])?;
        shared
            .text
            .fetch_add(parser.text_bytes - text, Ordering::Relaxed);
        shared
            .chunks
            .fetch_add(parser.chunks - chunks, Ordering::Relaxed);
        (text, chunks) = (parser.text_bytes, parser.chunks);
        for ev in events {
            match ev.event.as_str() {
                "ready" => {
                    if parser.coding() != req.coding {
                        bail!(
                            "asked for {}, the broker answered in {}",
                            req.coding.name(),
                            parser.coding().name()
                        );
                    }
                    drop(permit.take());
                    if shared.ready.fetch_add(1, Ordering::AcqRel) + 1 == req.connections {
                        shared.all_ready.notify_one();
                    }
                }
                "bcast" => {
                    let offset = json_u64(&ev.data, "offset").unwrap_or(0);
                    let _ = arrivals.send((offset, at));
                }
                STREAM_TYPE => shared.check(&ev, &mut seen, at_ns),
                _ => {}
            }
        }
        if let Some(finished) = parser.ended() {
            let counter = if finished {
                &shared.ended
            } else {
                &shared.ended_unfinished
            };
            counter.fetch_add(1, Ordering::AcqRel);
            shared.progress.notify_one();
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------- the scenario

/// What the `sse` scenario runs (see the CLI for each).
pub struct Options {
    /// `host:port` of the HTTP listener.
    pub http: String,
    /// Connections per run.
    pub connections: usize,
    /// Events broadcast one at a time (latency).
    pub broadcasts: u64,
    /// Connections being opened at once.
    pub open_concurrency: usize,
    /// Codings, each run in turn.
    pub codings: Vec<Coding>,
    /// 1: the single-topic endpoint; more: `/v1/events` over that many.
    pub topics: usize,
    /// Events of the stream phase (0: none).
    pub events: u64,
    /// Streamed events per publish.
    pub batch: usize,
    /// Time between publishes.
    pub interval: Duration,
    /// Events published to each topic before the connections open.
    pub prefill: u64,
    /// Runs of each coding (stream phase only).
    pub repeat: usize,
}

/// Runs the SSE scenario: one result per coding.
pub async fn run(c: &Common, o: &Options) -> Result<Vec<Record>> {
    if c.target != Target::Ringcast {
        bail!("sse runs against ringcast only");
    }
    let mut codings: Vec<Coding> = Vec::new();
    for &coding in &o.codings {
        if !codings.contains(&coding) {
            codings.push(coding);
        }
    }
    if codings.is_empty() {
        codings.push(Coding::Identity);
    }
    // Only a stream runs repeatedly: a run of the idle-connection figures
    // alone (`benches/compare.sh`, 10,000 connections) stays one run.
    let repeat = if o.events > 0 { o.repeat.max(1) } else { 1 };
    // A stream run seals its topics: every run gets topics of its own.
    let fresh = o.events > 0 || codings.len() > 1;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut runs: HashMap<Coding, Vec<Record>> = HashMap::new();
    for r in 0..repeat {
        for (i, &coding) in codings.iter().enumerate() {
            let mut c = c.clone();
            if fresh {
                // Names of one length: the topic is in every event.
                c.dest = format!("{}.{stamp}.r{r}c{i}", c.dest);
            }
            if codings.len() > 1 {
                c.label = format!("{}.{}", c.label, coding.name());
            }
            let rec = run_once(&c, o, coding).await?;
            if repeat * codings.len() > 1 {
                eprintln!(
                    "  run {} {}: {:.1} B/event, {:.2} µs broker CPU/event",
                    r + 1,
                    coding.name(),
                    rec.num("wire_bytes_per_event").unwrap_or(f64::NAN),
                    rec.num("server_cpu_us_per_event").unwrap_or(f64::NAN)
                );
            }
            runs.entry(coding).or_default().push(rec);
        }
    }
    let key = if o.events > 0 {
        "server_cpu_us_per_event"
    } else {
        "rss_per_conn_kib"
    };
    let mut out: Vec<Record> = codings
        .iter()
        .filter_map(|coding| runs.remove(coding))
        .map(|runs| crate::median_run(runs, key))
        .collect();
    let identity = codings
        .iter()
        .position(|&c| c == Coding::Identity)
        .map(|i| {
            let r = &out[i];
            (
                r.num("wire_bytes_per_event"),
                r.num("server_cpu_us_per_event"),
            )
        });
    if let Some((wire, cpu)) = identity {
        for rec in &mut out {
            for (key, base, ratio_key) in [
                ("wire_bytes_per_event", wire, "wire_vs_identity"),
                ("server_cpu_us_per_event", cpu, "cpu_vs_identity"),
            ] {
                if let (Some(v), Some(b)) = (rec.num(key), base) {
                    if b > 0.0 {
                        rec.set(ratio_key, round(v / b, 3));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// One run: fresh connections, in one coding.
async fn run_once(c: &Common, o: &Options, coding: Coding) -> Result<Record> {
    let base = format!("{}.sse", c.dest);
    let topics: Vec<String> = if o.topics <= 1 {
        vec![base]
    } else {
        (0..o.topics).map(|i| format!("{base}.t{i}")).collect()
    };
    let client = crate::common::ringcast_connect(c.addr.as_str()).await?;
    // Create the topics (and give them a history, which lengthens the
    // offsets in event ids), then let the server settle before the baseline.
    for t in &topics {
        let mut left = o.prefill.max(1);
        while left > 0 {
            let n = left.min(1000);
            let warm = (0..n).map(|_| ringcast_client::new_event("warm", "{}"));
            client.publish_batch(t.as_str(), warm.collect()).await?;
            left -= n;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = c.server_pid.and_then(rss_kib);

    let path = if topics.len() == 1 {
        format!("/v1/topics/{}/events", topics[0])
    } else {
        let query: Vec<String> = topics.iter().map(|t| format!("topic={t}")).collect();
        format!("/v1/events?{}", query.join("&"))
    };
    let req = Arc::new(Request {
        http: o.http.clone(),
        path,
        coding,
        connections: o.connections,
    });
    let shared = Arc::new(Shared::new(o.events));
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let opened = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(o.open_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(o.connections);
    for _ in 0..o.connections {
        // Bounded connect concurrency: do not overflow the accept backlog.
        let permit = gate.clone().acquire_owned().await?;
        let (req, shared, tx) = (req.clone(), shared.clone(), arrivals_tx.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = connection(req, shared.clone(), tx, permit).await {
                if shared.failed.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("sse connection: {e:#}");
                }
                shared.all_ready.notify_one();
                shared.progress.notify_one();
            }
        }));
    }
    drop(arrivals_tx);
    let abort = |tasks: &[tokio::task::JoinHandle<()>]| tasks.iter().for_each(|t| t.abort());
    let wait = Duration::from_secs(60);
    let all = tokio::time::timeout(wait, async {
        while shared.ready.load(Ordering::Acquire) < o.connections {
            tokio::select! {
                _ = shared.all_ready.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            let settled =
                shared.ready.load(Ordering::Acquire) + shared.failed.load(Ordering::Relaxed);
            if settled >= o.connections {
                break;
            }
        }
    })
    .await;
    let open_s = opened.elapsed().as_secs_f64();
    let n_ready = shared.ready.load(Ordering::Acquire);
    if all.is_err() || n_ready < o.connections {
        abort(&tasks);
        bail!(
            "only {n_ready} of {} SSE connections became ready ({} failed) in {open_s:.1} s",
            o.connections,
            shared.failed.load(Ordering::Relaxed)
        );
    }
    // Let allocations settle, then read the server's RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = c.server_pid.and_then(rss_kib);

    // Broadcasts: one event at a time, each to every connection.
    let cpu = CpuMeter::start(c.server_pid, c.metrics_addr.as_deref()).await;
    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
    let mut h = latency_histogram();
    let mut worst = latency_histogram();
    let mut received = 0u64;
    for _ in 0..o.broadcasts {
        let t0 = Instant::now();
        let ack = client
            .publish(topics[0].as_str(), "bcast", r#"{"bench":true}"#)
            .await?;
        sent_at.insert(ack.offset, t0);
        let mut per = latency_histogram();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while (per.len() as usize) < o.connections {
            match tokio::time::timeout_at(deadline, arrivals.recv()).await {
                Ok(Some((offset, at))) => {
                    if let Some(t) = sent_at.get(&offset) {
                        let ns = at.saturating_duration_since(*t).as_nanos() as u64;
                        let _ = h.record(ns.max(1_000));
                        if offset == ack.offset {
                            let _ = per.record(ns.max(1_000));
                        }
                        received += 1;
                    }
                }
                _ => break,
            }
        }
        let _ = worst.record(per.max().max(1_000));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut rec = Record::new("sse", c.target, &c.label);
    rec.set("connections", o.connections);
    rec.set("coding", coding.name());
    rec.set("topics", topics.len());
    rec.set("open_s", round(open_s, 3));
    rec.set("broadcasts", o.broadcasts);
    rec.set("received", received);
    rec.set(
        "lost",
        (o.broadcasts * o.connections as u64).saturating_sub(received),
    );
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        rec.set("rss_before_kib", b);
        rec.set("rss_after_kib", a);
        rec.set(
            "rss_per_conn_kib",
            round(a.saturating_sub(b) as f64 / o.connections as f64, 2),
        );
    }
    put_percentiles(&mut rec, &h);
    rec.set(
        "broadcast_complete_ms",
        round(worst.value_at_quantile(0.5) as f64 / 1e6, 2),
    );
    cpu.finish(&mut rec, received).await;
    if o.events > 0 {
        let streamed = stream(c, o, &client, &topics, &shared, &mut rec).await;
        abort(&tasks);
        streamed?;
    }
    abort(&tasks);
    Ok(rec)
}

/// The stream phase (see the module docs); writes its figures into `rec`.
async fn stream(
    c: &Common,
    o: &Options,
    client: &ringcast_client::Client,
    topics: &[String],
    shared: &Shared,
    rec: &mut Record,
) -> Result<()> {
    let batch = o.batch.max(1);
    let expected = o.events * o.connections as u64;
    let wire0 = shared.wire.load(Ordering::Acquire);
    let text0 = shared.text.load(Ordering::Acquire);
    let chunks0 = shared.chunks.load(Ordering::Acquire);
    let client0 = self_cpu_seconds();
    let server0 = c.server_pid.and_then(cpu_seconds);
    let started = Instant::now();

    let mut tick = tokio::time::interval(o.interval);
    // A late publish does not make the next ones bunch up into one chunk.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut k = 0usize;
    while seq < o.events {
        tick.tick().await;
        let topic = topics[k % topics.len()].as_str();
        k += 1;
        let end = (seq + batch as u64).min(o.events);
        let now = now_ns();
        for s in seq..end {
            shared.sent_ns[s as usize].store(now, Ordering::Release);
        }
        let events: Vec<_> = (seq..end)
            .map(|s| ringcast_client::new_event(STREAM_TYPE, shared.payloads[s as usize].clone()))
            .collect();
        client.publish_batch(topic, events).await?;
        seq = end;
    }
    let published_s = started.elapsed().as_secs_f64();

    // Until every connection has every event (or nothing arrives for 10 s).
    let mut last = (0, Instant::now());
    loop {
        let got = shared.received.load(Ordering::Acquire) + shared.wrong.load(Ordering::Acquire);
        if got >= expected || shared.failed.load(Ordering::Relaxed) > 0 {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::select! {
            _ = shared.progress.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let server = match (c.server_pid.and_then(cpu_seconds), server0) {
        (Some(end), Some(start)) => Some(end - start),
        _ => None,
    };
    let client_cpu = self_cpu_seconds() - client0;
    let wire = shared.wire.load(Ordering::Acquire) - wire0;
    let text = shared.text.load(Ordering::Acquire) - text0;
    let chunks = shared.chunks.load(Ordering::Acquire) - chunks0;
    let delivered = shared.received.load(Ordering::Acquire);
    let wrong = shared.wrong.load(Ordering::Acquire);

    // End every stream: a compressed one is then checked to its end.
    for t in topics {
        client.seal(t.as_str()).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.ended.load(Ordering::Acquire)
        + shared.ended_unfinished.load(Ordering::Acquire)
        + shared.failed.load(Ordering::Relaxed)
        < o.connections
        && Instant::now() < deadline
    {
        tokio::select! {
            _ = shared.progress.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let ended = shared.ended.load(Ordering::Acquire);

    let per = |x: f64| round(x / delivered.max(1) as f64, 3);
    rec.set("events", o.events);
    rec.set("batch", batch);
    rec.set("interval_ms", round(o.interval.as_secs_f64() * 1e3, 3));
    rec.set("stream_published_s", round(published_s, 3));
    rec.set("stream_s", round(elapsed_s, 3));
    rec.set("delivered", delivered);
    rec.set("stream_lost", expected.saturating_sub(delivered + wrong));
    rec.set("stream_wrong", wrong);
    rec.set("streams_ended", ended);
    rec.set("wire_bytes", wire);
    rec.set("wire_bytes_per_event", per(wire as f64));
    rec.set("text_bytes_per_event", per(text as f64));
    rec.set(
        "events_per_chunk",
        round(delivered as f64 / chunks.max(1) as f64, 2),
    );
    if let Some(server) = server {
        rec.set("stream_server_cpu_s", round(server, 3));
        rec.set("server_cpu_us_per_event", per(server * 1e6));
    }
    rec.set("client_cpu_us_per_event", per(client_cpu * 1e6));
    {
        let h = shared.latency.lock().unwrap_or_else(|p| p.into_inner());
        let us = |q: f64| round(h.value_at_quantile(q) as f64 / 1e3, 1);
        rec.set("stream_p50_us", us(0.5));
        rec.set("stream_p99_us", us(0.99));
    }
    if wrong > 0 || delivered < expected || ended < o.connections {
        let first = shared
            .first_wrong
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        bail!(
            "stream check failed: {delivered} of {expected} events delivered intact, {wrong} wrong, \
             {ended} of {} streams ended properly ({} before their coded end, {} failed) {first}",
            o.connections,
            shared.ended_unfinished.load(Ordering::Acquire),
            shared.failed.load(Ordering::Relaxed),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_chunked_sse_response_split_anywhere() {
        let body = "retry: 2000\nevent: ready\nid: 7:0\ndata: {\"a\":1}\n\n: hb\n\nevent: bcast\nid: 7:1\ndata: x\ndata: y\n\n";
        let mut wire = String::from(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        for part in [&body[..30], &body[30..]] {
            wire.push_str(&format!("{:x}\r\n{part}\r\n", part.len()));
        }
        wire.push_str("0\r\n\r\n");
        for split in 0..wire.len() {
            let mut p = SseParser::default();
            let mut events = p.feed(&wire.as_bytes()[..split]).unwrap();
            events.extend(p.feed(&wire.as_bytes()[split..]).unwrap());
            assert_eq!(events.len(), 2, "split at {split}");
            assert_eq!(events[0].event, "ready");
            assert_eq!(events[0].id, "7:0");
            assert_eq!(events[1].event, "bcast");
            assert_eq!(events[1].data, "x\ny");
            assert_eq!(p.chunks, 2);
            assert_eq!(p.ended(), Some(true));
        }
    }

    #[test]
    fn decodes_a_gzip_response_and_sees_its_end() {
        // `event: a\ndata: 1\n\n` then the end, gzip (Python zlib, sync
        // flush), in two chunks.
        let first = [
            0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x4a, 0x2d, 0x4b, 0xcd,
            0x2b, 0xb1, 0x52, 0x48, 0xe4, 0x4a, 0x49, 0x2c, 0x49, 0xb4, 0x52, 0x30, 0xe4, 0xe2,
            0x02, 0x00, 0x00, 0x00, 0xff, 0xff,
        ];
        let last = [0x03, 0x00, 0x78, 0x7e, 0x22, 0xa9, 0x12, 0x00, 0x00, 0x00];
        let mut wire =
            b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_vec();
        for chunk in [&first[..], &last[..]] {
            wire.extend(format!("{:x}\r\n", chunk.len()).bytes());
            wire.extend(chunk);
            wire.extend(b"\r\n");
        }
        wire.extend(b"0\r\n\r\n");
        let mut p = SseParser::default();
        let events = p.feed(&wire).unwrap();
        assert_eq!(p.coding(), Coding::Gzip);
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].event.as_str(), events[0].data.as_str()),
            ("a", "1")
        );
        assert_eq!(p.ended(), Some(true));
    }

    #[test]
    fn refuses_a_non_200_answer() {
        let mut p = SseParser::default();
        assert!(p.feed(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").is_err());
    }

    #[test]
    fn order_payloads_are_json_of_about_200_bytes_and_differ() {
        for seq in [0, 1, 999, 123_456] {
            let p = order(seq);
            let v: serde_json::Value = serde_json::from_str(&p).unwrap();
            assert_eq!(v["seq"], seq);
            assert!((180..=230).contains(&p.len()), "{} bytes: {p}", p.len());
        }
        assert_ne!(order(1)[10..], order(2)[10..]);
    }

    #[test]
    fn reads_the_first_number_of_a_key() {
        let env = r#"{"topic":"t","offset":17,"data":{"seq":5,"offset":3}}"#;
        assert_eq!(json_u64(env, "offset"), Some(17));
        assert_eq!(json_u64(env, "seq"), Some(5));
        assert_eq!(json_u64(env, "nope"), None);
    }
}
