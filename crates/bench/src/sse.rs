//! `sse` (ringcast only): many concurrent SSE connections over raw
//! HTTP/1.1, the server's RSS per connection, and how long a broadcast takes
//! to reach them all.
//!
//! The client is deliberately minimal: it sends one GET, reads the status
//! line and headers, de-chunks the body when it is chunked, and splits it
//! into SSE events (`event:` / `id:` / `data:` lines, a blank line ends an
//! event). Nothing else of HTTP or SSE is needed here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use crate::common::{round, rss_kib, CpuMeter, Record, Target};
use crate::scenarios::{latency_histogram, put_percentiles};
use crate::Common;

/// Incremental decoder of an HTTP/1.1 response into SSE events.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    headers_done: bool,
    chunked: bool,
    /// Bytes left in the current chunk (chunked mode).
    chunk_left: usize,
    /// Waiting for the CRLF that ends a chunk's data.
    chunk_crlf: bool,
    body: Vec<u8>,
    event: String,
    id: String,
    data: String,
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
            self.chunked = head
                .lines()
                .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
            self.buf.drain(..end + 4);
            self.headers_done = true;
        }
        self.dechunk()?;
        Ok(self.events())
    }

    fn dechunk(&mut self) -> Result<()> {
        if !self.chunked {
            self.body.append(&mut self.buf);
            return Ok(());
        }
        loop {
            if self.chunk_left > 0 {
                let take = self.chunk_left.min(self.buf.len());
                if take == 0 {
                    return Ok(());
                }
                self.body.extend(self.buf.drain(..take));
                self.chunk_left -= take;
                if self.chunk_left == 0 {
                    self.chunk_crlf = true;
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
                bail!("the server ended the SSE stream");
            }
            self.chunk_left = size;
        }
    }

    fn events(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(eol) = self.body.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.body.drain(..=eol).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
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
        out
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One SSE connection: reports `ready`, then the offset of every `bcast`
/// event with the instant it arrived.
async fn connection(
    http: String,
    path: String,
    ready: Arc<AtomicUsize>,
    all_ready: Arc<Notify>,
    target: usize,
    arrivals: mpsc::UnboundedSender<(u64, Instant)>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<()> {
    // The permit (bounded connect concurrency) is held until `ready`.
    let mut permit = Some(permit);
    let mut stream = TcpStream::connect(&http).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {http}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut parser = SseParser::default();
    let mut buf = vec![0u8; 2048];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the server closed the SSE connection");
        }
        let at = Instant::now();
        for ev in parser.feed(&buf[..n])? {
            match ev.event.as_str() {
                "ready" => {
                    drop(permit.take());
                    if ready.fetch_add(1, Ordering::AcqRel) + 1 == target {
                        all_ready.notify_one();
                    }
                }
                "bcast" => {
                    let offset = ev
                        .id
                        .split_once(':')
                        .and_then(|(_, o)| o.parse().ok())
                        .unwrap_or(0);
                    let _ = arrivals.send((offset, at));
                }
                _ => {}
            }
        }
    }
}

/// Runs the SSE scenario.
pub async fn run(
    c: &Common,
    http: &str,
    connections: usize,
    broadcasts: u64,
    open_concurrency: usize,
) -> Result<Record> {
    if c.target != Target::Ringcast {
        bail!("sse runs against ringcast only");
    }
    let topic = format!("{}.sse", c.dest);
    let client = crate::common::ringcast_connect(c.addr.as_str()).await?;
    // Create the topic and let the server settle before the baseline.
    client.publish(topic.as_str(), "warm", "{}").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = c.server_pid.and_then(rss_kib);

    let ready = Arc::new(AtomicUsize::new(0));
    let all_ready = Arc::new(Notify::new());
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let failed = Arc::new(AtomicUsize::new(0));
    let path = format!("/v1/topics/{topic}/events");
    let opened = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(open_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        // Bounded connect concurrency: do not overflow the accept backlog.
        let permit = gate.clone().acquire_owned().await?;
        let (http, path, ready, all_ready, tx, failed) = (
            http.to_owned(),
            path.clone(),
            ready.clone(),
            all_ready.clone(),
            arrivals_tx.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let conn = connection(http, path, ready, all_ready, connections, tx, permit);
            if let Err(e) = conn.await {
                if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("sse connection: {e:#}");
                }
            }
        }));
    }
    drop(arrivals_tx);
    let wait = Duration::from_secs(60);
    let all = tokio::time::timeout(wait, async {
        while ready.load(Ordering::Acquire) < connections {
            tokio::select! {
                _ = all_ready.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if ready.load(Ordering::Acquire) + failed.load(Ordering::Relaxed) >= connections {
                break;
            }
        }
    })
    .await;
    let open_s = opened.elapsed().as_secs_f64();
    let n_ready = ready.load(Ordering::Acquire);
    if all.is_err() || n_ready < connections {
        for t in &tasks {
            t.abort();
        }
        bail!(
            "only {n_ready} of {connections} SSE connections became ready ({} failed) in {open_s:.1} s",
            failed.load(Ordering::Relaxed)
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
    for _ in 0..broadcasts {
        let t0 = Instant::now();
        let ack = client
            .publish(topic.as_str(), "bcast", r#"{"bench":true}"#)
            .await?;
        sent_at.insert(ack.offset, t0);
        let mut per = latency_histogram();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while (per.len() as usize) < connections {
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
    rec.set("connections", connections);
    rec.set("open_s", round(open_s, 3));
    rec.set("broadcasts", broadcasts);
    rec.set("received", received);
    rec.set(
        "lost",
        (broadcasts * connections as u64).saturating_sub(received),
    );
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        rec.set("rss_before_kib", b);
        rec.set("rss_after_kib", a);
        rec.set(
            "rss_per_conn_kib",
            round(a.saturating_sub(b) as f64 / connections as f64, 2),
        );
    }
    put_percentiles(&mut rec, &h);
    rec.set(
        "broadcast_complete_ms",
        round(worst.value_at_quantile(0.5) as f64 / 1e6, 2),
    );
    cpu.finish(&mut rec, received).await;
    for t in tasks {
        t.abort();
    }
    Ok(rec)
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
        for split in 0..wire.len() {
            let mut p = SseParser::default();
            let mut events = p.feed(&wire.as_bytes()[..split]).unwrap();
            events.extend(p.feed(&wire.as_bytes()[split..]).unwrap());
            assert_eq!(events.len(), 2, "split at {split}");
            assert_eq!(events[0].event, "ready");
            assert_eq!(events[0].id, "7:0");
            assert_eq!(events[1].event, "bcast");
            assert_eq!(events[1].data, "x\ny");
        }
    }

    #[test]
    fn refuses_a_non_200_answer() {
        let mut p = SseParser::default();
        assert!(p.feed(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").is_err());
    }
}
