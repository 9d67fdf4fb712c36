//! 1,000 concurrent SSE connections receive one broadcast, each exactly
//! once and in order; and what one connection costs in memory.
//!
//! Sized for a 2-core machine in debug mode. The clients are raw
//! `TcpStream`s with a hand-written HTTP/1.1 GET and a chunked-body decoder:
//! much lighter than an HTTP client library, so the memory figure stays
//! close to the broker's own cost. Run with `--nocapture` to see it.

mod common;

use std::time::{Duration, Instant};

use common::{config, ensure_open_files, start, within};
use futures::stream::{self, StreamExt};
use ringcast::config::Durability;
use ringcast::engine::NewEvent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECTIONS: usize = 1_000;
const EVENTS: u64 = 20;
const TOPIC: &str = "broadcast";
/// Connections being opened at once (the listen backlog is 1,024).
const OPENING_AT_ONCE: usize = 100;

/// Decodes a `Transfer-Encoding: chunked` body incrementally.
#[derive(Default)]
struct Dechunker {
    state: ChunkState,
    line: Vec<u8>,
    done: bool,
}

#[derive(Default, Clone, Copy)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataEnd(u8),
    Trailer,
}

impl Dechunker {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < input.len() && !self.done {
            match self.state {
                ChunkState::Size | ChunkState::Trailer => {
                    let b = input[i];
                    i += 1;
                    if b != b'\n' {
                        self.line.push(b);
                        continue;
                    }
                    let line = String::from_utf8(std::mem::take(&mut self.line))
                        .expect("chunk framing is ASCII");
                    let line = line.trim_end_matches('\r');
                    if matches!(self.state, ChunkState::Trailer) {
                        self.done = line.is_empty();
                        continue;
                    }
                    let size = line.split(';').next().unwrap_or_default().trim();
                    let size = usize::from_str_radix(size, 16)
                        .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                    self.state = if size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    let n = left.min(input.len() - i);
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    self.state = if n == left {
                        ChunkState::DataEnd(2)
                    } else {
                        ChunkState::Data(left - n)
                    };
                }
                ChunkState::DataEnd(left) => {
                    i += 1;
                    self.state = if left == 1 {
                        ChunkState::Size
                    } else {
                        ChunkState::DataEnd(left - 1)
                    };
                }
            }
        }
    }
}

/// One SSE block: its `event:` and `id:` fields.
#[derive(Debug, Clone, PartialEq)]
struct Block {
    event: String,
    id: Option<String>,
}

/// A minimal SSE reader over a raw socket: enough to tell `ready`, events
/// (by their `<epoch>:<offset>` id) and `end` apart.
struct Client {
    stream: TcpStream,
    dechunker: Dechunker,
    body: Vec<u8>,
    event: Option<String>,
    id: Option<String>,
}

impl Client {
    /// Connects, sends the GET and reads the response head; the body that
    /// follows is chunked.
    async fn open(addr: std::net::SocketAddr) -> Self {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET /v1/topics/{TOPIC}/events HTTP/1.1\r\nHost: {addr}\r\n\
             Accept: text/event-stream\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut head = Vec::new();
        let mut buf = [0u8; 2048];
        let body_start = loop {
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut buf).await.expect("read head");
            assert!(n > 0, "connection closed in the response head");
            head.extend_from_slice(&buf[..n]);
        };
        let mut client = Self {
            stream,
            dechunker: Dechunker::default(),
            body: Vec::new(),
            event: None,
            id: None,
        };
        let text = String::from_utf8_lossy(&head[..body_start]).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 200"), "refused: {text}");
        assert!(text.contains("transfer-encoding: chunked"), "{text}");
        client.dechunker.feed(&head[body_start..], &mut client.body);
        client
    }

    /// The next SSE block; `None` when the body or the connection ended.
    async fn next(&mut self) -> Option<Block> {
        let mut buf = [0u8; 2048];
        loop {
            if let Some(block) = self.parse() {
                return Some(block);
            }
            if self.dechunker.done {
                return None;
            }
            let n = self.stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.dechunker.feed(&buf[..n], &mut self.body);
        }
    }

    fn parse(&mut self) -> Option<Block> {
        while let Some(end) = self.body.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.body.drain(..=end).collect();
            let line = String::from_utf8(line).expect("UTF-8 stream");
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if let Some(event) = self.event.take() {
                    return Some(Block {
                        event,
                        id: self.id.take(),
                    });
                }
                self.id = None;
            } else if let Some(v) = line.strip_prefix("event:") {
                self.event = Some(v.trim_start().to_owned());
            } else if let Some(v) = line.strip_prefix("id:") {
                self.id = Some(v.trim_start().to_owned());
            }
            // Comments (heartbeats), `data:` and `retry:` are not needed
            // here: every block ringcast sends names its event.
        }
        None
    }

    /// Reads until `ready`, which the broker sends once subscribed.
    async fn ready(mut self) -> Self {
        let block = self.next().await.expect("stream closed before ready");
        assert_eq!(block.event, "ready", "{block:?}");
        self
    }

    /// Reads until `end`; returns the offsets of the events in between.
    async fn offsets_until_end(mut self) -> Vec<u64> {
        let mut offsets = Vec::new();
        loop {
            let block = self.next().await.expect("stream closed before end");
            match block.event.as_str() {
                "end" => return offsets,
                "tick" => {
                    let id = block.id.expect("events carry an id");
                    let (_, offset) = id.split_once(':').expect("<epoch>:<offset>");
                    offsets.push(offset.parse().expect("numeric offset"));
                }
                other => panic!("unexpected {other} in the broadcast: {block:?}"),
            }
        }
    }
}

/// `VmRSS` of this process (broker and clients alike) in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sse_connections_each_receive_every_broadcast_event_once_in_order() {
    ensure_open_files(2 * CONNECTIONS as u64 + 256);
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Durability::Memory);
    // No heartbeat noise during the test.
    config.server.heartbeat = Duration::from_secs(600);
    let broker = start(config).await;
    broker.engine().create(TOPIC).expect("create topic");
    let addr = broker.http_addr();

    let rss_before = rss_kib();
    let clients: Vec<Client> = within(
        120,
        stream::iter(0..CONNECTIONS)
            .map(|_| async move { Client::open(addr).await.ready().await })
            .buffer_unordered(OPENING_AT_ONCE)
            .collect(),
    )
    .await;
    let rss_after = rss_kib();
    assert_eq!(clients.len(), CONNECTIONS);
    assert_eq!(
        broker.engine().info(TOPIC).unwrap().subscribers,
        CONNECTIONS,
        "every connection is subscribed"
    );
    let per_connection = rss_after.saturating_sub(rss_before) as f64 / CONNECTIONS as f64;
    println!(
        "RSS per SSE connection ≈ {per_connection:.1} KiB (upper bound: broker and client \
         sides in one process; {rss_before} KiB before, {rss_after} KiB after {CONNECTIONS} \
         connections; opened in {:.1?})",
        started.elapsed()
    );

    let readers: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(c.offsets_until_end()))
        .collect();
    for n in 1..=EVENTS {
        let ack = broker
            .engine()
            .publish(TOPIC, NewEvent::new("tick", format!("{{\"n\":{n}}}")))
            .await
            .expect("publish");
        assert_eq!(ack.offset, n);
    }
    broker.engine().seal(TOPIC).await.expect("seal");

    let want: Vec<u64> = (1..=EVENTS).collect();
    for (i, reader) in readers.into_iter().enumerate() {
        let got = within(120, reader).await.expect("reader task");
        assert_eq!(got, want, "connection {i} got a wrong sequence");
    }
    println!(
        "{CONNECTIONS} connections × {EVENTS} events delivered in {:.1?} in all",
        started.elapsed()
    );
    broker.shutdown().await.expect("clean shutdown");
}
