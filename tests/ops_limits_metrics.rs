//! Operations against an in-process broker: `/metrics` as Prometheus text
//! and its counters moving as events flow, a stalled subscriber's bounded
//! cost, and every configured limit refused as documented and counted.
//!
//! The metrics recorder is process-global, shared by every broker in this
//! binary, so each test holds [`METRICS`] and compares deltas of scrapes
//! taken under it, never absolute values.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytesize::ByteSize;
use common::{
    config, expect_error, hello, start, subscribe_live as subscribe, within, write_msg, Frames,
    RawClient,
};
use futures::StreamExt;
use ringcast::broker::Broker;
use ringcast::config::{Config, Durability};
use ringcast_protocol::{ClientMessage, ErrorCode, GapReason, NewEvent, ServerMessage, Start};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, MutexGuard, Semaphore};

/// Serialises the tests of this binary, so that metric deltas are theirs alone.
static METRICS: Mutex<()> = Mutex::const_new(());

async fn exclusive_metrics() -> MutexGuard<'static, ()> {
    METRICS.lock().await
}

// ---------------------------------------------------------------------------
// A minimal Prometheus text-format parser.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape of `/metrics`.
#[derive(Debug)]
struct Scrape {
    /// `# TYPE` per metric family.
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses `{a="x",b="y\"z"}` starting at the `{`; returns the labels and the rest.
fn parse_labels(s: &str, line: &str) -> (BTreeMap<String, String>, String) {
    let mut labels = BTreeMap::new();
    let mut chars = s.strip_prefix('{').unwrap().chars().peekable();
    loop {
        while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek() == Some(&'}') {
            chars.next();
            break;
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert!(
            valid_metric_name(&name),
            "bad label name {name:?} in {line:?}"
        );
        assert_eq!(
            chars.next(),
            Some('"'),
            "label value not quoted in {line:?}"
        );
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => panic!("bad escape {other:?} in {line:?}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        }
        assert!(
            labels.insert(name.clone(), value).is_none(),
            "label {name} twice in {line:?}"
        );
    }
    (labels, chars.collect())
}

/// Parses the text exposition format, failing the test on any malformed
/// line, a sample without a `# TYPE`, or an inconsistent histogram.
fn parse_prometheus(text: &str) -> Scrape {
    let mut types = HashMap::new();
    let mut helps = HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    assert!(valid_metric_name(name), "{line:?}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "unknown type in {line:?}"
                    );
                    assert!(
                        types.insert(name.to_owned(), kind.to_owned()).is_none(),
                        "two TYPE lines for {name}"
                    );
                }
                (Some("HELP"), Some(name), _) => {
                    assert!(valid_metric_name(name), "{line:?}");
                    assert!(
                        helps.insert(name.to_owned(), ()).is_none(),
                        "two HELP lines for {name}"
                    );
                }
                _ => {} // any other comment
            }
            continue;
        }
        assert!(
            !line.starts_with('#'),
            "a comment without a space: {line:?}"
        );
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = &line[..name_end];
        assert!(valid_metric_name(name), "bad metric name in {line:?}");
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..], line)
        } else {
            (BTreeMap::new(), line[name_end..].to_owned())
        };
        let mut fields = rest.split_whitespace();
        let value: f64 = fields
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad value in {line:?}"));
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"));
        }
        assert!(fields.next().is_none(), "trailing text in {line:?}");
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    let scrape = Scrape { types, samples };
    for s in &scrape.samples {
        let family = scrape.family(&s.name);
        assert!(
            scrape.types.contains_key(family),
            "sample {} has no # TYPE",
            s.name
        );
    }
    scrape.check_histograms();
    scrape
}

impl Scrape {
    /// The family a sample name belongs to (`x_bucket` → `x` for histograms).
    fn family<'a>(&self, name: &'a str) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if matches!(
                    self.types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                ) {
                    return base;
                }
            }
        }
        name
    }

    /// Buckets are cumulative, end at `+Inf`, and `+Inf` equals `_count`.
    fn check_histograms(&self) {
        for (family, kind) in &self.types {
            if kind != "histogram" {
                continue;
            }
            let bucket = format!("{family}_bucket");
            let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
            for s in self.samples.iter().filter(|s| s.name == bucket) {
                let mut labels = s.labels.clone();
                let le = labels.remove("le").expect("a bucket has le");
                let le: f64 = le.parse().unwrap_or_else(|_| panic!("bad le {le:?}"));
                series.entry(labels).or_default().push((le, s.value));
            }
            for (labels, buckets) in series {
                assert!(
                    buckets
                        .windows(2)
                        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                    "{family}{labels:?}: buckets are sorted and cumulative: {buckets:?}"
                );
                let (le, inf) = *buckets.last().unwrap();
                assert!(le.is_infinite(), "{family}: the last bucket is +Inf");
                let count = self
                    .samples
                    .iter()
                    .find(|s| s.name == format!("{family}_count") && s.labels == labels)
                    .unwrap_or_else(|| panic!("{family}{labels:?} has no _count"));
                assert_eq!(count.value, inf, "{family}: +Inf bucket equals _count");
            }
        }
    }

    /// The value of the sample with exactly these labels; 0 when absent
    /// (a counter or gauge nobody touched yet).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or(0.0)
    }

    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    fn type_of(&self, family: &str) -> Option<&str> {
        self.types.get(family).map(String::as_str)
    }
}

async fn scrape(broker: &Broker) -> Scrape {
    let response = reqwest::get(format!("http://{}/metrics", broker.http_addr()))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    parse_prometheus(&response.text().await.unwrap())
}

// ---------------------------------------------------------------------------
// Clients.
// ---------------------------------------------------------------------------

fn publish(request_id: u64, topic: &str, payload: Bytes) -> ClientMessage {
    ClientMessage::Publish {
        request_id,
        topic: topic.into(),
        event_type: "tick".into(),
        headers: vec![],
        payload,
    }
}

/// A connected, welcomed TCP client whose kernel receive buffer is small, so
/// that not reading backs the server up quickly.
async fn small_buffer_client(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stream = socket.connect(addr).await.expect("connect");
    write_msg(&mut stream, &hello()).await.unwrap();
    let mut frames = Frames::new(&mut stream);
    match within(20, frames.next()).await {
        Some(ServerMessage::Welcome { .. }) => {}
        other => panic!("expected welcome, got {other:?}"),
    }
    stream
}

async fn expect_published(c: &mut RawClient, request_id: u64) -> u64 {
    match c.recv().await {
        Some(ServerMessage::Published {
            request_id: r,
            results,
        }) if r == request_id => results[0].offset,
        other => panic!("expected the ack of {request_id}, got {other:?}"),
    }
}

/// The connection is still usable: a ping gets its pong.
async fn assert_alive(c: &mut RawClient, request_id: u64) {
    c.send(&ClientMessage::Ping { request_id }).await;
    match c.recv().await {
        Some(ServerMessage::Pong { request_id: r }) => assert_eq!(r, request_id),
        other => panic!("expected a pong, got {other:?}"),
    }
}

/// A `text/event-stream` response, read block by block.
struct Sse {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<Bytes>> + Send>>,
    text: String,
}

impl Sse {
    async fn open(http: SocketAddr, path: &str) -> Self {
        let response = reqwest::get(format!("http://{http}{path}"))
            .await
            .expect("GET SSE");
        assert_eq!(response.status(), 200);
        Self {
            body: Box::pin(response.bytes_stream()),
            text: String::new(),
        }
    }

    /// The `event:` name of the next block with data.
    async fn next_event(&mut self) -> String {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let event = block
                    .lines()
                    .find_map(|l| l.strip_prefix("event:"))
                    .map(|e| e.trim().to_owned());
                if block.lines().any(|l| l.starts_with("data:")) {
                    return event.unwrap_or_else(|| "message".into());
                }
                continue;
            }
            let chunk = within(20, self.body.next())
                .await
                .expect("the stream stays open")
                .expect("the stream reads");
            self.text
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }
}

async fn post(http: SocketAddr, path: &str, body: Vec<u8>) -> (reqwest::StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{http}{path}"))
        .body(body)
        .send()
        .await
        .expect("POST");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

fn memory_config(dir: &tempfile::TempDir, configure: impl FnOnce(&mut Config)) -> Config {
    let mut c = config(dir.path(), Durability::Memory);
    configure(&mut c);
    c
}

// ---------------------------------------------------------------------------
// /metrics.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_counters_move_as_events_flow() {
    let _metrics = exclusive_metrics().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(config(dir.path(), Durability::Fsync)).await;
    const N: u64 = 20;
    const PAYLOAD: usize = 100;

    let mut subscriber = RawClient::handshake(broker.tcp_addr()).await;
    subscriber.send(&subscribe(1, 1, "flow")).await;
    assert!(matches!(
        subscriber.recv().await,
        Some(ServerMessage::Subscribed { .. })
    ));
    let mut sse = Sse::open(broker.http_addr(), "/v1/topics/flow/events").await;
    assert_eq!(sse.next_event().await, "ready");
    let mut publisher = RawClient::handshake(broker.tcp_addr()).await;
    let before = scrape(&broker).await;

    for request_id in 1..=N {
        publisher
            .send(&publish(
                request_id,
                "flow",
                Bytes::from(vec![b'7'; PAYLOAD]),
            ))
            .await;
    }
    for request_id in 1..=N {
        expect_published(&mut publisher, request_id).await;
    }
    for _ in 0..N {
        assert!(matches!(
            subscriber.recv().await,
            Some(ServerMessage::Event { .. })
        ));
        assert_eq!(sse.next_event().await, "tick");
    }
    let after = scrape(&broker).await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);

    assert_eq!(
        after.type_of("ringcast_events_published_total"),
        Some("counter")
    );
    assert_eq!(delta("ringcast_events_published_total", &[]), N as f64);
    assert_eq!(
        delta("ringcast_deliveries_total", &[("transport", "tcp")]),
        N as f64
    );
    assert_eq!(
        delta("ringcast_deliveries_total", &[("transport", "sse")]),
        N as f64
    );
    assert_eq!(after.type_of("ringcast_connections"), Some("gauge"));
    assert!(after.get("ringcast_connections", &[("transport", "tcp")]) >= 2.0);
    assert!(after.get("ringcast_connections", &[("transport", "sse")]) >= 1.0);
    assert!(
        delta("ringcast_bytes_in_total", &[("transport", "tcp")]) >= (N as usize * PAYLOAD) as f64,
        "every published payload came in over TCP"
    );
    assert!(
        delta("ringcast_bytes_out_total", &[("transport", "tcp")]) >= (N as usize * PAYLOAD) as f64,
        "every delivered payload went out over TCP"
    );
    assert!(
        delta("ringcast_bytes_out_total", &[("transport", "sse")]) >= (N as usize * PAYLOAD) as f64
    );

    assert_eq!(
        after.type_of("ringcast_publish_ack_seconds"),
        Some("histogram")
    );
    assert!(
        after
            .samples
            .iter()
            .filter(|s| s.name == "ringcast_publish_ack_seconds_bucket")
            .count()
            > 2,
        "ack latency has buckets"
    );
    assert_eq!(delta("ringcast_publish_ack_seconds_count", &[]), N as f64);
    assert_eq!(
        after.type_of("ringcast_storage_flush_seconds"),
        Some("histogram")
    );
    assert!(
        delta("ringcast_storage_flush_seconds_count", &[]) >= 1.0,
        "fsync mode times its flushes"
    );
    assert_eq!(after.type_of("ringcast_retained_events"), Some("gauge"));
    assert_eq!(after.get("ringcast_retained_events", &[]), N as f64);
    assert_eq!(after.type_of("ringcast_topics"), Some("gauge"));
    assert_eq!(after.get("ringcast_topics", &[]), 1.0);
    assert_eq!(after.find("ringcast_subscriptions", &[]), Some(2.0));
    assert!(after.get("ringcast_retained_bytes", &[]) >= (N as usize * PAYLOAD) as f64);
}

#[tokio::test]
async fn only_topics_listed_in_the_metrics_config_get_a_topic_label() {
    let _metrics = exclusive_metrics().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(memory_config(&dir, |c| {
        c.metrics.topics = vec!["ops.listed".into()];
    }))
    .await;
    let before = scrape(&broker).await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    for request_id in 1..=3 {
        c.send(&publish(
            request_id,
            "ops.listed",
            Bytes::from_static(b"{}"),
        ))
        .await;
        expect_published(&mut c, request_id).await;
    }
    for request_id in 4..=5 {
        c.send(&publish(
            request_id,
            "ops.unlisted",
            Bytes::from_static(b"{}"),
        ))
        .await;
        expect_published(&mut c, request_id).await;
    }
    let after = scrape(&broker).await;
    let listed = [("topic", "ops.listed")];
    assert_eq!(
        after.get("ringcast_events_published_total", &listed)
            - before.get("ringcast_events_published_total", &listed),
        3.0
    );
    assert_eq!(
        after.get("ringcast_events_published_total", &[])
            - before.get("ringcast_events_published_total", &[]),
        5.0,
        "the total counts every topic"
    );
    let leaked: Vec<_> = after
        .samples
        .iter()
        .filter(|s| s.labels.values().any(|v| v == "ops.unlisted"))
        .collect();
    assert!(
        leaked.is_empty(),
        "an unlisted topic became a label: {leaked:?}"
    );
}

// ---------------------------------------------------------------------------
// Slow consumers.
// ---------------------------------------------------------------------------

const EVENTS: u64 = 50_000;
const BATCH: u64 = 50;

/// Publishes `EVENTS` events of 1 KiB to `topic` in batches, several
/// batches in flight; after every ack calls `check`. Returns the last offset.
async fn publish_all(addr: SocketAddr, topic: &str, mut check: impl FnMut()) -> u64 {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    write_msg(&mut stream, &hello()).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut frames = Frames::new(rd);
    assert!(matches!(
        frames.next().await,
        Some(ServerMessage::Welcome { .. })
    ));
    let window = Arc::new(Semaphore::new(16));
    let batches = EVENTS / BATCH;
    let writer = {
        let (window, topic) = (window.clone(), topic.to_owned());
        tokio::spawn(async move {
            for request_id in 1..=batches {
                window.acquire().await.unwrap().forget();
                let events = (0..BATCH)
                    .map(|_| NewEvent {
                        event_type: "blob".into(),
                        headers: vec![],
                        payload: Bytes::from(vec![b'z'; 1024]),
                    })
                    .collect();
                let msg = ClientMessage::PublishBatch {
                    request_id,
                    topic: topic.clone(),
                    events,
                };
                write_msg(&mut wr, &msg)
                    .await
                    .expect("the publisher can write");
            }
            wr
        })
    };
    let mut last_offset = 0;
    let mut slowest_ack = Duration::ZERO;
    let mut previous = Instant::now();
    for _ in 0..batches {
        let msg = tokio::time::timeout(Duration::from_secs(30), frames.next())
            .await
            .expect("acks keep coming while a subscriber is stalled");
        match msg {
            Some(ServerMessage::Published { results, .. }) => {
                assert_eq!(results.len() as u64, BATCH);
                last_offset = last_offset.max(results.last().unwrap().offset);
            }
            other => panic!("expected acks, got {other:?}"),
        }
        slowest_ack = slowest_ack.max(previous.elapsed());
        previous = Instant::now();
        window.add_permits(1);
        check();
    }
    let _wr = writer.await.unwrap();
    assert!(
        slowest_ack < Duration::from_secs(10),
        "the publisher was held up for {slowest_ack:?}"
    );
    last_offset
}

fn bounded_config(dir: &tempfile::TempDir, heartbeat: Duration) -> Config {
    memory_config(dir, |c| {
        c.topics.max_events = 1000;
        c.topics.max_bytes = ByteSize::mib(2);
        c.server.heartbeat = heartbeat;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_costs_bounded_memory_then_gets_a_slow_consumer_gap() {
    let _metrics = exclusive_metrics().await;
    let dir = tempfile::tempdir().unwrap();
    // Heartbeats far apart: the stalled peer is not dropped, it falls behind.
    let broker = start(bounded_config(&dir, Duration::from_secs(120))).await;
    let before = scrape(&broker).await;

    let mut stalled = small_buffer_client(broker.tcp_addr()).await;
    write_msg(&mut stalled, &subscribe(1, 1, "firehose"))
        .await
        .unwrap();
    let mut frames = Frames::new(stalled);
    let next_offset = match frames.next().await {
        Some(ServerMessage::Subscribed { next_offset, .. }) => next_offset,
        other => panic!("expected subscribed, got {other:?}"),
    };

    let engine = broker.engine().clone();
    let (mut most_events, mut most_bytes) = (0, 0);
    let last = publish_all(broker.tcp_addr(), "firehose", || {
        let info = engine.info("firehose").unwrap();
        most_events = most_events.max(info.retained_events);
        most_bytes = most_bytes.max(info.retained_bytes);
    })
    .await;
    assert_eq!(last, EVENTS);
    assert!(most_events <= 1000, "{most_events} events retained");
    assert!(
        most_bytes <= ByteSize::mib(2).as_u64(),
        "{most_bytes} bytes retained"
    );
    let reported = scrape(&broker).await;
    assert!(reported.get("ringcast_retained_events", &[]) <= 1000.0);
    assert!(reported.get("ringcast_retained_bytes", &[]) <= ByteSize::mib(2).as_u64() as f64);

    // The stalled subscriber now reads what was queued for it: runs of
    // contiguous events, each run ended by a slow-consumer gap after which
    // delivery resumes live; then the next event published.
    let mut publisher = RawClient::handshake(broker.tcp_addr()).await;
    publisher
        .send(&publish(1, "firehose", Bytes::from_static(b"{}")))
        .await;
    expect_published(&mut publisher, 1).await;
    let mut expected = next_offset;
    let mut gaps = 0;
    while expected <= EVENTS + 1 {
        match within(30, frames.next()).await {
            Some(ServerMessage::Event { event, .. }) => {
                assert_eq!(event.offset, expected, "no event is skipped without a gap");
                expected += 1;
            }
            Some(ServerMessage::Gap { gap, .. }) => {
                assert_eq!(gap.reason, GapReason::SlowConsumer, "{gap:?}");
                assert_eq!(gap.event_type, None);
                assert_eq!(
                    gap.requested,
                    expected - 1,
                    "the gap starts after the last delivered"
                );
                assert!(
                    gap.first_available > expected,
                    "something was skipped: {gap:?}"
                );
                assert!(gap.current >= gap.first_available, "{gap:?}");
                gaps += 1;
                expected = gap.current + 1;
            }
            other => panic!("expected events and gaps, got {other:?}"),
        }
    }
    assert!(
        gaps >= 1,
        "the stalled subscriber was told it missed events"
    );

    let after = scrape(&broker).await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    assert_eq!(
        delta("ringcast_slow_consumer_events_total", &[]),
        gaps as f64
    );
    assert_eq!(
        delta("ringcast_gaps_total", &[("reason", "slow_consumer")]),
        gaps as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_for_three_heartbeats_is_closed_and_publishers_go_on() {
    let _metrics = exclusive_metrics().await;
    let dir = tempfile::tempdir().unwrap();
    let heartbeat = Duration::from_millis(100);
    let broker = start(bounded_config(&dir, heartbeat)).await;

    let mut stalled = small_buffer_client(broker.tcp_addr()).await;
    write_msg(&mut stalled, &subscribe(1, 1, "firehose"))
        .await
        .unwrap();
    let (rd, mut wr) = stalled.into_split();
    let mut frames = Frames::new(rd);
    assert!(matches!(
        frames.next().await,
        Some(ServerMessage::Subscribed { .. })
    ));
    // It keeps talking (so it is not dropped for silence) but never reads.
    let pinger = tokio::spawn(async move {
        let mut tick = tokio::time::interval(heartbeat / 2);
        for request_id in 1.. {
            tick.tick().await;
            if write_msg(&mut wr, &ClientMessage::Ping { request_id })
                .await
                .is_err()
            {
                return;
            }
        }
    });

    let engine = broker.engine().clone();
    let mut most_events = 0;
    publish_all(broker.tcp_addr(), "firehose", || {
        most_events = most_events.max(engine.info("firehose").unwrap().retained_events);
    })
    .await;
    assert!(most_events <= 1000, "{most_events} events retained");

    // Still not reading: the server gives up on the stalled writes and
    // closes, which the pinger notices as a failed write.
    within(30, pinger)
        .await
        .expect("the pinger ends when the server closes");

    // What was already in flight can still be read (events, perhaps a gap
    // from falling behind before the stall), then the close.
    let drained = async {
        loop {
            match frames.next().await {
                None => return,
                Some(ServerMessage::Event { .. } | ServerMessage::Pong { .. }) => {}
                Some(ServerMessage::Gap { gap, .. }) => {
                    assert_eq!(gap.reason, GapReason::SlowConsumer, "{gap:?}")
                }
                Some(other) => panic!("expected events then the close, got {other:?}"),
            }
        }
    };
    within(30, drained).await;
}

// ---------------------------------------------------------------------------
// Limits.
// ---------------------------------------------------------------------------

/// Runs `refuse` and asserts it added exactly `n` refusals of `limit`.
async fn assert_refusals(
    broker: &Broker,
    limit: &str,
    n: f64,
    refuse: impl std::future::Future<Output = ()>,
) {
    let labels = [("limit", limit)];
    let before = scrape(broker).await;
    refuse.await;
    let after = scrape(broker).await;
    assert_eq!(
        after.get("ringcast_limit_refusals_total", &labels)
            - before.get("ringcast_limit_refusals_total", &labels),
        n,
        "ringcast_limit_refusals_total{{limit=\"{limit}\"}}"
    );
}

#[tokio::test]
async fn tcp_connections_over_the_limit_get_too_many_connections_then_close_and_are_counted() {
    let _metrics = exclusive_metrics().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(memory_config(&dir, |c| c.limits.max_tcp_connections = 2)).await;
    let mut first = RawClient::handshake(broker.tcp_addr()).await;
    let _second = RawClient::handshake(broker.tcp_addr()).await;
    assert_refusals(&broker, "max_tcp_connections", 1.0, async {
        let mut third = RawClient::connect(broker.tcp_addr()).await;
        expect_error(&mut third, None, ErrorCode::TooManyConnections).await;
        third.expect_closed().await;
    })
    .await;
    assert_alive(&mut first, 1).await;
}

#[tokio::test]
async fn sse_connections_over_the_limit_get_503_and_are_counted() {
    let _metrics = exclusive_metrics().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(memory_config(&dir, |c| c.limits.max_sse_connections = 1)).await;
    let mut first = Sse::open(broker.http_addr(), "/v1/topics/t/events").await;
    assert_eq!(first.next_event().await, "ready");
    assert_refusals(&broker, "max_sse_connections", 1.0, async {
        let response = reqwest::get(format!("http://{}/v1/topics/t/events", broker.http_addr()))
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        let body: Value = response.json().await.expect("a JSON error");
        assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
    })
    .await;
}

#[tokio::test]
async fn topics_over_the_limit_are_refused_with_too_many_topics_and_counted() {
    let _metrics = exclusive_metrics().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(memory_config(&dir, |c| c.limits.max_topics = 2)).await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    for (request_id, topic) in [(1, "one"), (2, "two")] {
        c.send(&publish(request_id, topic, Bytes::from_static(b"{}")))
            .await;
        expect_published(&mut c, request_id).await;
    }
    assert_refusals(&broker, "max_topics", 1.0, async {
        c.send(&publish(3, "three", Bytes::from_static(b"{}")))
            .await;
        expect_error(&mut c, Some(3), ErrorCode::TooManyTopics).await;
    })
    .await;
    assert_alive(&mut c, 4).await;
    c.send(&publish(5, "one", Bytes::from_static(b"{}"))).await;
    expect_published(&mut c, 5).await;
}

#[tokio::test]
async fn subscriptions_over_the_per_connection_limit_are_refused_and_counted() {
    let _metrics = exclusive_metrics().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(memory_config(&dir, |c| {
        c.limits.max_subscriptions_per_connection = 2
    }))
    .await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    for id in 1..=2 {
        c.send(&subscribe(id, id, "s")).await;
        assert!(matches!(
            c.recv().await,
            Some(ServerMessage::Subscribed { .. })
        ));
    }
    assert_refusals(&broker, "max_subscriptions_per_connection", 1.0, async {
        c.send(&subscribe(3, 3, "s")).await;
        expect_error(&mut c, Some(3), ErrorCode::TooManySubscriptions).await;
    })
    .await;
    assert_alive(&mut c, 4).await;
    // Another connection has its own allowance.
    let mut other = RawClient::handshake(broker.tcp_addr()).await;
    other.send(&subscribe(1, 1, "s")).await;
    assert!(matches!(
        other.recv().await,
        Some(ServerMessage::Subscribed { .. })
    ));
}

#[tokio::test]
async fn payloads_over_the_limit_are_refused_over_tcp_and_http_and_counted() {
    let _metrics = exclusive_metrics().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(memory_config(&dir, |c| {
        c.limits.max_payload = ByteSize::kib(1)
    }))
    .await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    c.send(&publish(1, "p", Bytes::from(vec![b'x'; 1024])))
        .await;
    expect_published(&mut c, 1).await;
    assert_refusals(&broker, "max_payload", 2.0, async {
        c.send(&publish(2, "p", Bytes::from(vec![b'x'; 1025])))
            .await;
        expect_error(&mut c, Some(2), ErrorCode::PayloadTooLarge).await;
        let (status, body) = post(
            broker.http_addr(),
            "/v1/topics/p/events?type=tick",
            vec![b'x'; 1025],
        )
        .await;
        assert_eq!(status, 413);
        assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
        assert_alive(&mut c, 3).await;
    })
    .await;
}

#[tokio::test]
async fn frames_over_the_limit_get_frame_too_large_then_close_and_are_counted() {
    let _metrics = exclusive_metrics().await;
    let dir = tempfile::tempdir().unwrap();
    let max_frame = 1024 + 64 * 1024;
    let broker = start(memory_config(&dir, |c| {
        c.limits.max_payload = ByteSize::kib(1);
        c.limits.max_frame = ByteSize::b(max_frame);
    }))
    .await;
    let mut c = RawClient::connect(broker.tcp_addr()).await;
    c.send(&hello()).await;
    match c.recv().await {
        Some(ServerMessage::Welcome {
            max_frame: announced,
            max_payload,
            ..
        }) => assert_eq!((u64::from(announced), max_payload), (max_frame, 1024)),
        other => panic!("expected welcome, got {other:?}"),
    }
    assert_refusals(&broker, "max_frame", 1.0, async {
        // Only the length prefix: the server refuses before buffering a body.
        c.send_raw(&(max_frame as u32 + 1).to_be_bytes()).await;
        expect_error(&mut c, None, ErrorCode::FrameTooLarge).await;
        c.expect_closed().await;
    })
    .await;
}

#[tokio::test]
async fn publishes_over_the_retained_bytes_limit_are_refused_over_tcp_and_http_and_counted() {
    let _metrics = exclusive_metrics().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(memory_config(&dir, |c| {
        c.limits.max_retained_bytes = ByteSize::kib(8)
    }))
    .await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    let kib = || Bytes::from(vec![b'r'; 1024]);
    let mut accepted = 0;
    assert_refusals(&broker, "max_retained_bytes", 2.0, async {
        for request_id in 1..=100 {
            c.send(&publish(request_id, "full", kib())).await;
            match c.recv().await {
                Some(ServerMessage::Published { .. }) => accepted += 1,
                Some(ServerMessage::Error {
                    request_id: Some(r),
                    code: ErrorCode::OverCapacity,
                    ..
                }) => {
                    assert_eq!(r, request_id);
                    break;
                }
                other => panic!("expected an ack or OverCapacity, got {other:?}"),
            }
        }
        assert!(
            (1..8).contains(&accepted),
            "{accepted} KiB accepted under an 8 KiB limit"
        );
        let (status, body) = post(
            broker.http_addr(),
            "/v1/topics/full/events?type=tick",
            vec![b'r'; 1024],
        )
        .await;
        assert_eq!(status, 503);
        assert_eq!(body["error"]["code"], "over_capacity", "{body}");
    })
    .await;
    assert_alive(&mut c, 1_000).await;

    // Room freed (here by deleting the topic) is room to publish again.
    c.send(&ClientMessage::Delete {
        request_id: 1_001,
        topic: "full".into(),
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Ok { request_id: 1_001 })
    ));
    c.send(&publish(1_002, "full", kib())).await;
    expect_published(&mut c, 1_002).await;
}

#[tokio::test]
async fn front_end_encodings_count_as_retained_bytes_until_their_event_is_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(memory_config(&dir, |c| c.topics.max_events = 2)).await;
    let engine = broker.engine().clone();
    const SIZE: u64 = 64 * 1024;
    let big = Bytes::from(vec![b'x'; SIZE as usize]);
    let retained = |engine: &ringcast::engine::Engine| {
        let topic = engine.info("enc").unwrap().retained_bytes;
        assert_eq!(
            engine.stats().retained_bytes,
            topic,
            "the global total agrees"
        );
        topic
    };
    engine
        .publish("enc", ringcast::engine::NewEvent::new("t", "{}"))
        .await
        .unwrap();
    let small = retained(&engine);
    assert!(small < 1024, "{small}");

    // Two live TCP subscribers make the broker build the event's frame,
    // once for both (a replay, or a sole subscriber, gets it encoded straight
    // into its own buffer, which the ring does not keep).
    let mut tcp = Vec::new();
    for id in 1..=2 {
        let mut c = RawClient::handshake(broker.tcp_addr()).await;
        c.send(&ClientMessage::Subscribe {
            request_id: id,
            subscription_id: id,
            topic: "enc".into(),
            types: vec![],
            start: Start::Live,
        })
        .await;
        match c.recv().await {
            Some(ServerMessage::Subscribed { .. }) => {}
            other => panic!("expected subscribed, got {other:?}"),
        }
        tcp.push(c);
    }
    engine
        .publish("enc", ringcast::engine::NewEvent::new("t", big))
        .await
        .unwrap();
    for c in &mut tcp {
        match c.recv().await {
            Some(ServerMessage::Event { event, .. }) => assert_eq!(event.offset, 2),
            other => panic!("expected the event, got {other:?}"),
        }
    }
    let with_tcp = retained(&engine);
    assert!(
        (small + 2 * SIZE..small + 2 * SIZE + 2048).contains(&with_tcp),
        "payload and one TCP frame counted: {small} -> {with_tcp}"
    );

    // An SSE stream makes it build the SSE message too.
    let mut sse = Sse::open(broker.http_addr(), "/v1/topics/enc/events?earliest=true").await;
    assert_eq!(sse.next_event().await, "ready");
    // The small event, then the big one.
    assert_eq!(sse.next_event().await, "t");
    assert_eq!(sse.next_event().await, "t");
    let with_sse = retained(&engine);
    assert!(
        with_sse >= with_tcp + SIZE,
        "SSE message counted: {with_tcp} -> {with_sse}"
    );

    // Once the event leaves the ring, neither encoding counts any more.
    drop(tcp);
    drop(sse);
    for _ in 0..2 {
        engine
            .publish("enc", ringcast::engine::NewEvent::new("t", "{}"))
            .await
            .unwrap();
    }
    let after = retained(&engine);
    assert!(after < 1024, "only the two small events remain: {after}");
    broker.shutdown().await.unwrap();
}
