//! Several brokers sharing their topics through one real `redis-server`
//! (`[cluster] backend = "redis"`): one gapless offset sequence per topic
//! whichever node publishes, every event delivered by every node in offset
//! order, exact resume on any node (TCP and SSE), no acknowledged event lost
//! to a `kill -9` of a node or of an AOF-always Redis, a new epoch (and
//! `epoch_changed` gaps) when Redis loses its data, fast, retryable
//! failures while Redis is down or hung, and retention, seals, idempotency
//! keys, late nodes and lost notifications across nodes.
//!
//! The brokers' logs go to each test's captured output (`RUST_LOG`, default
//! `warn`), shown when it fails.
//!
//! Every test starts its own `redis-server` (`common::redis`) and its own
//! brokers (in process, or `ringcastd` children); every wait is bounded and
//! awaits an event, never a fixed sleep.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::redis::{Persistence, RedisServer};
use common::sdk::{expect_events, next};
use common::sse::{SseEvent, SseParser};
use common::within;
use reqwest::StatusCode;
use ringcast::broker::Broker;
use ringcast::config::{Backend, Config, Durability};
use ringcast_client::{
    new_event, Ack, Client, ClientOptions, Delivery, Error, GapReason, NewEventExt, PendingAck,
    Subscription, WireEvent, WireGap,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixDatagram;
use tokio::process::Child;
use tokio::sync::watch;

/// How long any one expected message or reply may take (they take
/// milliseconds; this is for a loaded machine).
const WAIT: u64 = 30;

/// How long a node may take to publish again after Redis came back.
const RECOVERY_SECS: u64 = 60;

// ---------------------------------------------------------------------------
// Nodes: in-process brokers on one Redis.
// ---------------------------------------------------------------------------

/// A broker config on the Redis backend: loopback port 0, node `node_id`.
fn cluster_config(dir: &Path, redis: &RedisServer, node_id: &str) -> Config {
    let mut config = common::config(dir, Durability::Memory);
    config.cluster.backend = Backend::Redis;
    config.cluster.redis_url = redis.url();
    config.cluster.node_id = node_id.into();
    // Short, so that a node that missed a notification catches up quickly.
    config.cluster.resync_interval = Duration::from_millis(500);
    config
}

/// One in-process broker of the cluster.
struct Node {
    name: String,
    broker: Broker,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(redis: &RedisServer, name: &str) -> Node {
        Node::start_with(redis, name, |_| {}).await
    }

    async fn start_with(redis: &RedisServer, name: &str, tweak: impl FnOnce(&mut Config)) -> Node {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let mut config = cluster_config(dir.path(), redis, name);
        tweak(&mut config);
        config.validate().expect("the test config is valid");
        let broker = within(WAIT, common::start(config)).await;
        Node {
            name: name.into(),
            broker,
            http: http_client(),
            _dir: dir,
        }
    }

    fn tcp(&self) -> SocketAddr {
        self.broker.tcp_addr()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.broker.http_addr())
    }

    async fn client(&self) -> Client {
        connect(self.tcp()).await
    }

    /// An SSE stream on `path` with extra request headers.
    async fn sse(&self, path: &str, headers: &[(&str, &str)]) -> SseStream {
        SseStream::open(&self.http, self.url(path), headers).await
    }
}

/// The brokers' logs (warnings by default, `RUST_LOG` to change it) go to
/// the test's captured output, shown when it fails.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client")
}

/// Options for a client that reconnects quickly.
fn client_options(addr: SocketAddr) -> ClientOptions {
    ClientOptions::new(addr.to_string())
        .with_client_name("cluster-test")
        .with_reconnect_backoff(Duration::from_millis(5), Duration::from_millis(100))
        .with_request_timeout(Duration::from_secs(20))
}

async fn connect(addr: SocketAddr) -> Client {
    within(WAIT, Client::connect_with(client_options(addr)))
        .await
        .expect("client connects")
}

// ---------------------------------------------------------------------------
// Publishing and reading through the SDK.
// ---------------------------------------------------------------------------

/// What a publisher sent and the ack it got.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Acked {
    event_type: String,
    payload: String,
    ack: Ack,
}

/// `(offset, type, version, payload)` of an event, as published or seen.
type Seen = (u64, String, u64, String);

impl Acked {
    fn seen(&self) -> Seen {
        (
            self.ack.offset,
            self.event_type.clone(),
            self.ack.version,
            self.payload.clone(),
        )
    }
}

fn seen_of(e: &WireEvent) -> Seen {
    (
        e.offset,
        e.event_type.clone(),
        e.version,
        String::from_utf8(e.payload.to_vec()).expect("test payloads are UTF-8"),
    )
}

/// Queues every `(type, payload)` in order (pipelined) and awaits the acks.
async fn publish_pipelined(
    client: &Client,
    topic: &str,
    events: &[(String, String)],
) -> Vec<Acked> {
    let mut pending = Vec::with_capacity(events.len());
    for (event_type, payload) in events {
        let queued = within(
            WAIT,
            client.queue_publish(topic, new_event(event_type.clone(), payload.clone())),
        )
        .await
        .unwrap_or_else(|e| panic!("queue {payload}: {e}"));
        pending.push(queued);
    }
    let mut acked = Vec::with_capacity(events.len());
    for ((event_type, payload), ack) in events.iter().zip(pending) {
        let ack = within(WAIT, ack)
            .await
            .unwrap_or_else(|e| panic!("publish {payload}: {e}"));
        acked.push(Acked {
            event_type: event_type.clone(),
            payload: payload.clone(),
            ack,
        });
    }
    acked
}

/// `count` events of type `tick` with payloads `{prefix}{n}` for n from `first`.
fn ticks(prefix: &str, first: u64, count: u64) -> Vec<(String, String)> {
    (first..first + count)
        .map(|n| ("tick".to_owned(), format!("{prefix}{n}")))
        .collect()
}

/// Publishes one event, retrying retryable failures (and timeouts) with
/// backoff until `secs` have passed. A fixed idempotency key makes a retry of
/// an attempt that was stored after all return the original ack.
async fn publish_retrying(
    client: &Client,
    topic: &str,
    event_type: &str,
    payload: &str,
    secs: u64,
) -> Acked {
    let key = format!("retry-{topic}-{payload}");
    publish_keyed_retrying(client, topic, event_type, payload, &key, secs).await
}

/// [`publish_retrying`] with the idempotency key `key`.
async fn publish_keyed_retrying(
    client: &Client,
    topic: &str,
    event_type: &str,
    payload: &str,
    key: &str,
    secs: u64,
) -> Acked {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut backoff = Duration::from_millis(25);
    let mut failures = Vec::new();
    loop {
        let event = new_event(event_type.to_owned(), payload.to_owned()).key(key);
        let attempt = tokio::time::timeout(
            Duration::from_secs(WAIT),
            client.publish_event(topic, event),
        )
        .await;
        match attempt {
            Ok(Ok(ack)) => {
                return Acked {
                    event_type: event_type.into(),
                    payload: payload.into(),
                    ack,
                }
            }
            Ok(Err(e)) if e.is_retryable() || matches!(e, Error::Timeout) => {
                failures.push(e.to_string());
            }
            Ok(Err(e)) => panic!(
                "publish of {payload} failed with a non-retryable error: {e} \
                 (earlier failures: {failures:?})"
            ),
            Err(_) => panic!("a publish of {payload} hung for {WAIT}s"),
        }
        assert!(
            Instant::now() < deadline,
            "publishes still fail after {secs}s; failures: {failures:?}"
        );
        // Backoff between retries (not a synchronisation: the loop ends on
        // the first success).
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// The next delivery, which must be a gap.
async fn expect_gap(sub: &mut Subscription) -> WireGap {
    match next(sub).await {
        Delivery::Gap(gap) => gap,
        other => panic!("expected a gap, got {other:?}"),
    }
}

/// Reads `count` events (no gap, no end) and returns what they were.
async fn read_events(sub: &mut Subscription, count: usize) -> Vec<Seen> {
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        match next(sub).await {
            Delivery::Event(e) => got.push(seen_of(&e)),
            other => panic!(
                "expected only events, got {other:?} after {} events",
                got.len()
            ),
        }
    }
    got
}

/// Every retained event of `topic` on the node `client` is connected to,
/// paged with `History`.
async fn history(client: &Client, topic: &str) -> Vec<Seen> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = within(WAIT, client.history(topic, after, &[], 1_000))
            .await
            .expect("history");
        if page.events.is_empty() {
            return all;
        }
        all.extend(page.events.iter().map(seen_of));
        assert!(page.next_after > after, "history moves on");
        after = page.next_after;
    }
}

/// The topic's info on the node `client` is connected to.
async fn info(client: &Client, topic: &str) -> ringcast_client::WireTopicInfo {
    within(WAIT, client.info(topic)).await.expect("topic info")
}

/// Polls the topic's info on the node `client` is connected to until it
/// reports `epoch` and `last_offset` (a node learns of another node's
/// publishes within its notification latency), and returns it.
async fn await_info(
    client: &Client,
    topic: &str,
    epoch: u64,
    last_offset: u64,
    node: &str,
) -> ringcast_client::WireTopicInfo {
    let deadline = Instant::now() + Duration::from_secs(WAIT);
    loop {
        let i = info(client, topic).await;
        if (i.epoch, i.last_offset) == (epoch, last_offset) {
            return i;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} still reports epoch {} and last offset {} after {WAIT}s, \
             expected epoch {epoch} and last offset {last_offset}",
            i.epoch,
            i.last_offset
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The acks sorted by offset, as `Seen`.
fn by_offset(acked: &[Acked]) -> Vec<Seen> {
    let mut seen: Vec<Seen> = acked.iter().map(Acked::seen).collect();
    seen.sort();
    seen
}

// ---------------------------------------------------------------------------
// SSE.
// ---------------------------------------------------------------------------

/// An open SSE response, read event by event (heartbeats skipped).
struct SseStream {
    response: reqwest::Response,
    parser: SseParser,
    queue: VecDeque<SseEvent>,
    closed: bool,
    /// The id of the last message taken with `next` (what a browser that
    /// stopped after dispatching it would send as `Last-Event-ID`).
    last_id: String,
}

impl SseStream {
    async fn open(http: &reqwest::Client, url: String, headers: &[(&str, &str)]) -> SseStream {
        let mut request = http.get(&url).header("accept", "text/event-stream");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = within(WAIT, request.send())
            .await
            .expect("SSE request sent");
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "SSE request {url} refused"
        );
        SseStream {
            response,
            parser: SseParser::default(),
            queue: VecDeque::new(),
            closed: false,
            last_id: String::new(),
        }
    }

    /// What a browser would send as `Last-Event-ID` on reconnect, having
    /// dispatched the messages taken so far.
    fn last_event_id(&self) -> String {
        self.last_id.clone()
    }

    async fn next(&mut self) -> Option<SseEvent> {
        let e = self.next_unrecorded().await?;
        if let Some(id) = &e.id {
            self.last_id = id.clone();
        }
        Some(e)
    }

    async fn next_unrecorded(&mut self) -> Option<SseEvent> {
        within(WAIT, async {
            loop {
                if let Some(e) = self.queue.pop_front() {
                    return Some(e);
                }
                if self.closed {
                    return None;
                }
                match self.response.chunk().await {
                    Ok(Some(bytes)) => self.parser.feed_events(&bytes, &mut self.queue),
                    Ok(None) | Err(_) => self.closed = true,
                }
            }
        })
        .await
    }

    async fn expect(&mut self, kind: &str) -> SseEvent {
        let e = self
            .next()
            .await
            .unwrap_or_else(|| panic!("SSE stream closed while waiting for `{kind}`"));
        assert_eq!(e.event, kind, "unexpected SSE message {e:?}");
        e
    }

    /// The `ready` message every stream starts with.
    async fn ready(&mut self) -> Value {
        self.expect("ready").await.json()
    }

    /// Reads `count` events (no control message) and returns what they were.
    async fn read_events(&mut self, count: usize) -> Vec<Seen> {
        let mut got = Vec::with_capacity(count);
        while got.len() < count {
            let e = self.next().await.unwrap_or_else(|| {
                panic!("SSE stream closed after {} of {count} events", got.len())
            });
            assert!(
                !e.is_control(),
                "expected an event, got {e:?} after {} events",
                got.len()
            );
            got.push(sse_seen(&e));
        }
        got
    }
}

fn sse_seen(e: &SseEvent) -> Seen {
    let json = e.json();
    (
        json["offset"].as_u64().expect("offset"),
        json["type"].as_str().expect("type").to_owned(),
        json["version"].as_u64().expect("version"),
        json["data"]
            .as_str()
            .unwrap_or_else(|| panic!("test payloads are text: {json}"))
            .to_owned(),
    )
}

/// `offsets` of `seen`, for messages.
fn offsets(seen: &[Seen]) -> Vec<u64> {
    seen.iter().map(|s| s.0).collect()
}

// ---------------------------------------------------------------------------
// 1. One gapless sequence, whichever node publishes.
// ---------------------------------------------------------------------------

/// Publishers on every node publish `per_node` events each, concurrently,
/// alternating two types; subscribers (SDK on the first and the last node,
/// SSE on the second) subscribed before the first publish.
async fn one_gapless_sequence(names: &[&str], per_node: u64) {
    const TOPIC: &str = "orders";
    let redis = RedisServer::start(Persistence::None).await;
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(Node::start(&redis, name).await);
    }
    let total = per_node * names.len() as u64;

    let first = nodes[0].client().await;
    let last = nodes[nodes.len() - 1].client().await;
    let mut subs = Vec::new();
    for client in [&first, &last] {
        let sub = within(WAIT, client.subscribe(TOPIC).live().send())
            .await
            .expect("subscribed before the topic exists");
        subs.push(sub);
    }
    let mut sse = nodes[1]
        .sse(&format!("/v1/topics/{TOPIC}/events"), &[])
        .await;
    sse.ready().await;

    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut sub| {
            tokio::spawn(async move { (read_events(&mut sub, total as usize).await, sub) })
        })
        .collect();
    let sse_reader = tokio::spawn(async move { sse.read_events(total as usize).await });

    let mut publishers = Vec::new();
    for node in &nodes {
        let client = node.client().await;
        let name = node.name.clone();
        publishers.push(tokio::spawn(async move {
            let events: Vec<(String, String)> = (0..per_node)
                .map(|i| {
                    let t = if i % 2 == 0 { "created" } else { "paid" };
                    (t.to_owned(), format!("{name}-{i}"))
                })
                .collect();
            publish_pipelined(&client, TOPIC, &events).await
        }));
    }
    let mut acked = Vec::new();
    for (node, publisher) in nodes.iter().zip(publishers) {
        let mine = within(120, publisher).await.expect("publisher task");
        assert!(
            mine.windows(2).all(|w| w[0].ack.offset < w[1].ack.offset),
            "one client's pipelined events are appended in its order (node {})",
            node.name
        );
        acked.extend(mine);
    }

    // One epoch, offsets exactly 1..=total, each once.
    let epochs: BTreeSet<u64> = acked.iter().map(|a| a.ack.epoch).collect();
    assert_eq!(epochs.len(), 1, "one epoch across nodes: {epochs:?}");
    let epoch = *epochs.iter().next().unwrap();
    let expected = by_offset(&acked);
    assert_eq!(
        offsets(&expected),
        (1..=total).collect::<Vec<_>>(),
        "the acks of every node together are exactly offsets 1..={total}"
    );
    // Per type, versions 1..=count in offset order.
    let mut versions: HashMap<&str, Vec<u64>> = HashMap::new();
    for (_, t, v, _) in &expected {
        versions.entry(t.as_str()).or_default().push(*v);
    }
    for (t, vs) in &versions {
        assert_eq!(
            *vs,
            (1..=vs.len() as u64).collect::<Vec<_>>(),
            "versions of {t} in offset order"
        );
    }
    assert_eq!(versions.len(), 2);

    // Every subscriber, on every node, saw the same sequence.
    for (reader, where_) in readers.into_iter().zip([names[0], names[names.len() - 1]]) {
        let (got, sub) = within(120, reader).await.expect("reader task");
        assert_eq!(got, expected, "the TCP subscriber on node {where_}");
        assert_eq!(sub.epoch(), epoch, "node {where_}");
    }
    let got = within(120, sse_reader).await.expect("SSE reader task");
    assert_eq!(got, expected, "the SSE subscriber on node {}", names[1]);

    // Every node reports the same topic.
    for node in &nodes {
        let client = node.client().await;
        let i = await_info(&client, TOPIC, epoch, total, &node.name).await;
        let mut v = i.versions.clone();
        v.sort();
        assert_eq!(
            v,
            vec![
                ("created".to_owned(), versions["created"].len() as u64),
                ("paid".to_owned(), versions["paid"].len() as u64)
            ],
            "node {}",
            node.name
        );
        assert_eq!(
            history(&client, TOPIC).await,
            expected,
            "node {}",
            node.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_one_gapless_sequence() {
    if !common::redis::available() {
        return;
    }
    one_gapless_sequence(&["a", "b"], 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_gapless_sequence() {
    if !common::redis::available() {
        return;
    }
    one_gapless_sequence(&["a", "b", "c"], 300).await;
}

// ---------------------------------------------------------------------------
// 2. Resume on another node.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_cut_from_a_resumes_on_b() {
    if !common::redis::available() {
        return;
    }
    const TOPIC: &str = "feed";
    let redis = RedisServer::start(Persistence::None).await;
    let a = Node::start(&redis, "a").await;
    let b = Node::start(&redis, "b").await;
    let c = Node::start(&redis, "c").await;
    let publisher = c.client().await;
    let mut acked = publish_pipelined(&publisher, TOPIC, &ticks("t", 1, 20)).await;
    let epoch = acked[0].ack.epoch;

    let mut on_a = a
        .sse(&format!("/v1/topics/{TOPIC}/events?earliest=true"), &[])
        .await;
    on_a.ready().await;
    let seen = on_a.read_events(8).await;
    assert_eq!(seen, by_offset(&acked)[..8].to_vec());
    let last = on_a.last_event_id();
    assert!(
        last.starts_with(&format!("{epoch}:")),
        "the id {last:?} names the epoch {epoch}"
    );
    drop(on_a);

    acked.extend(publish_pipelined(&publisher, TOPIC, &ticks("t", 21, 12)).await);
    let mut on_b = b
        .sse(
            &format!("/v1/topics/{TOPIC}/events"),
            &[("last-event-id", &last)],
        )
        .await;
    on_b.ready().await;
    let resumed = on_b.read_events(24).await;
    assert_eq!(
        resumed,
        by_offset(&acked)[8..].to_vec(),
        "exactly the missed events 9..=32, in order"
    );
    // Nothing else was queued: the next event is the next one published.
    let marker = publish_retrying(&a.client().await, TOPIC, "marker", "m33", WAIT).await;
    assert_eq!(marker.ack.offset, 33);
    assert_eq!(on_b.read_events(1).await, vec![marker.seen()]);

    // A browser that stopped after offset 20 resumes on C, the publishing
    // node: 21..=33, nothing before, nothing twice.
    let mut on_c = c
        .sse(
            &format!("/v1/topics/{TOPIC}/events"),
            &[("last-event-id", &format!("{epoch}:20"))],
        )
        .await;
    on_c.ready().await;
    assert_eq!(
        on_c.read_events(13).await,
        by_offset(&acked)[20..]
            .iter()
            .cloned()
            .chain([marker.seen()])
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_cut_from_a_resumes_on_b_while_c_publishes() {
    if !common::redis::available() {
        return;
    }
    const TOPIC: &str = "feed";
    let redis = RedisServer::start(Persistence::None).await;
    let a = Node::start(&redis, "a").await;
    let b = Node::start(&redis, "b").await;
    let c = Node::start(&redis, "c").await;
    let publisher = c.client().await;
    let mut acked = publish_pipelined(&publisher, TOPIC, &ticks("t", 1, 20)).await;

    let on_a = a.client().await;
    let mut sub = within(WAIT, on_a.subscribe(TOPIC).earliest().send())
        .await
        .unwrap();
    let seen: Vec<Seen> = expect_events(&mut sub, 1..=8)
        .await
        .iter()
        .map(seen_of)
        .collect();
    assert_eq!(seen, by_offset(&acked)[..8].to_vec());
    let (epoch, last) = (sub.epoch(), sub.last_offset().expect("saw events"));
    assert_eq!((epoch, last), (acked[0].ack.epoch, 8));
    drop(sub);
    within(WAIT, on_a.close()).await.unwrap();

    // C keeps publishing while the client resumes on B: the resume's replay
    // and its live part must join without a hole or a duplicate.
    acked.extend(publish_pipelined(&publisher, TOPIC, &ticks("t", 21, 12)).await);
    let more = tokio::spawn(async move {
        let acked = publish_pipelined(&publisher, TOPIC, &ticks("t", 33, 300)).await;
        (acked, publisher)
    });
    let on_b = b.client().await;
    let mut sub = within(WAIT, on_b.subscribe(TOPIC).after_offset(epoch, last).send())
        .await
        .unwrap();
    let resumed = read_events(&mut sub, 324).await;
    let (later, publisher) = within(120, more).await.unwrap();
    acked.extend(later);
    assert_eq!(
        resumed,
        by_offset(&acked)[8..].to_vec(),
        "exactly the missed events, then live, in order"
    );
    let marker = publish_retrying(&publisher, TOPIC, "marker", "m333", WAIT).await;
    assert_eq!(marker.ack.offset, 333);
    assert_eq!(read_events(&mut sub, 1).await, vec![marker.seen()]);
    assert_eq!(sub.epoch(), epoch);
}

// ---------------------------------------------------------------------------
// 3. ringcastd children: kill -9 of a node.
// ---------------------------------------------------------------------------

/// A `ringcastd` child on the Redis backend, ready (it reported `READY=1`
/// with its addresses on a notification socket this test bound).
struct Daemon {
    child: Child,
    tcp: SocketAddr,
    http: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    async fn start(redis: &RedisServer, name: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ringcast.toml");
        std::fs::write(
            &config,
            format!(
                "[cluster]\nbackend = \"redis\"\nredis_url = \"{}\"\nnode_id = \"{name}\"\n\
                 resync_interval = \"500ms\"\n",
                redis.url()
            ),
        )
        .unwrap();
        let data = dir.path().join("data");
        let socket_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
        let mut cmd = common::ringcastd();
        cmd.arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--tcp-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .env("NOTIFY_SOCKET", &socket_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ringcastd");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("stderr is piped");
        let lines = stderr.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                lines.lock().unwrap().push(line);
            }
        });
        let mut buf = vec![0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let received = tokio::select! {
                biased;
                r = notify.recv(&mut buf) => r.expect("receive a notification"),
                status = child.wait() => panic!(
                    "ringcastd {name} exited ({status:?}) before READY=1; stderr:\n{}",
                    stderr.lock().unwrap().join("\n")
                ),
                _ = tokio::time::sleep(left) => panic!(
                    "ringcastd {name} not ready within 120s; stderr:\n{}",
                    stderr.lock().unwrap().join("\n")
                ),
            };
            let text = String::from_utf8_lossy(&buf[..received]).into_owned();
            if text.lines().any(|l| l == "READY=1") {
                break text
                    .lines()
                    .find_map(|l| l.strip_prefix("STATUS="))
                    .unwrap_or_else(|| panic!("READY=1 without STATUS=: {text:?}"))
                    .to_owned();
            }
        };
        let words: BTreeMap<&str, &str> = status
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        Daemon {
            child,
            tcp: words["tcp"].parse().expect("tcp= is an address"),
            http: words["http"].parse().expect("http= is an address"),
            stderr,
            _dir: dir,
        }
    }

    /// SIGKILL, and reaped.
    async fn kill_9(&mut self) {
        self.child.start_kill().expect("SIGKILL ringcastd");
        within(WAIT, self.child.wait())
            .await
            .expect("reap ringcastd");
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

/// Every event of `topic` through `GET /v1/topics/{topic}/history`, paged:
/// the epoch (as the API writes it) and the events.
async fn http_history(http: &reqwest::Client, base: &str, topic: &str) -> (String, Vec<Seen>) {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = common::http::send_json(
            http.get(format!(
                "{base}/v1/topics/{topic}/history?after={after}&limit=1000"
            )),
            WAIT,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "history: {page}");
        let epoch = page["epoch"].as_str().expect("epoch").to_owned();
        let events = page["events"].as_array().expect("events");
        if events.is_empty() {
            return (epoch, all);
        }
        for e in events {
            all.push((
                e["offset"].as_u64().unwrap(),
                e["type"].as_str().unwrap().to_owned(),
                e["version"].as_u64().unwrap(),
                e["data"].as_str().expect("text payload").to_owned(),
            ));
        }
        after = page["next_after"].as_u64().expect("next_after");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_with_kill_9_loses_nothing_acked() {
    if !common::redis::available() {
        return;
    }
    const TOPIC: &str = "ledger";
    let redis = RedisServer::start(Persistence::AofAlways).await;
    let mut a = Daemon::start(&redis, "a").await;
    let b = Daemon::start(&redis, "b").await;

    // The topic exists (one event, through B); a subscriber on B from its
    // start, and one on A that will lose its node.
    let watcher = connect(b.tcp).await;
    let seed = publish_retrying(&watcher, TOPIC, "seed", "seed", WAIT).await;
    assert_eq!(seed.ack.offset, 1);
    let mut on_b = within(WAIT, watcher.subscribe(TOPIC).earliest().send())
        .await
        .unwrap();
    let reader_a = connect(a.tcp).await;
    let mut on_a = within(WAIT, reader_a.subscribe(TOPIC).earliest().send())
        .await
        .unwrap();

    // A publisher on A, pipelined 16 deep, until its node dies.
    let publisher =
        Client::connect_with(client_options(a.tcp).with_request_timeout(Duration::from_secs(3)))
            .await
            .unwrap();
    let (progress_tx, mut progress) = watch::channel(0usize);
    let publishing = tokio::spawn(async move {
        let mut acked: Vec<Acked> = Vec::new();
        let mut window: VecDeque<(String, PendingAck)> = VecDeque::new();
        let mut failed = None;
        for n in 1.. {
            let payload = format!("p{n}");
            match publisher
                .queue_publish(TOPIC, new_event("entry", payload.clone()))
                .await
            {
                Ok(pending) => window.push_back((payload, pending)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            if window.len() >= 16 {
                let (payload, pending) = window.pop_front().unwrap();
                match pending.await {
                    Ok(ack) => {
                        acked.push(Acked {
                            event_type: "entry".into(),
                            payload,
                            ack,
                        });
                        progress_tx.send_replace(acked.len());
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        // What was in flight when the node died: acked or not, recorded.
        for (payload, pending) in window {
            if let Ok(ack) = pending.await {
                acked.push(Acked {
                    event_type: "entry".into(),
                    payload,
                    ack,
                });
            }
        }
        (acked, failed)
    });
    within(60, progress.wait_for(|n| *n >= 150))
        .await
        .expect("the publisher made progress");
    // Some events were read on A before it dies.
    let before_kill = read_events(&mut on_a, 50).await;
    a.kill_9().await;
    let (acked, failed) = within(60, publishing).await.unwrap();
    eprintln!(
        "{} events acked by node A before kill -9; the publisher stopped with {failed:?}",
        acked.len()
    );
    assert!(acked.len() >= 150);
    assert!(failed.is_some(), "publishing stopped because A died");
    let epoch = acked[0].ack.epoch;
    assert!(acked.iter().all(|a| a.ack.epoch == epoch));

    // One publish on B: Redis gives it the offset after everything stored
    // so far (acked by A or not), so B's history must reach it.
    let marker = publish_retrying(&watcher, TOPIC, "marker", "b0", WAIT).await;
    assert_eq!(marker.ack.epoch, epoch);
    await_info(&watcher, TOPIC, epoch, marker.ack.offset, "b").await;

    // Every acked event is on B, once, where its ack said.
    let http = http_client();
    let (http_epoch, stored) = http_history(&http, &format!("http://{}", b.http), TOPIC).await;
    assert_eq!(http_epoch, epoch.to_string(), "B serves the same history");
    let last = stored.last().expect("B has events").0;
    assert_eq!(stored.last(), Some(&marker.seen()), "B's marker is last");
    assert_eq!(
        offsets(&stored),
        (1..=last).collect::<Vec<_>>(),
        "B's history is gapless"
    );
    let stored_at: HashMap<u64, &Seen> = stored.iter().map(|s| (s.0, s)).collect();
    for a in &acked {
        assert_eq!(
            stored_at.get(&a.ack.offset).copied(),
            Some(&a.seen()),
            "acked event {} on B",
            a.payload
        );
    }
    let payloads: BTreeSet<&str> = stored.iter().map(|s| s.3.as_str()).collect();
    assert_eq!(payloads.len(), stored.len(), "no event stored twice");
    let max_acked = acked.iter().map(|a| a.ack.offset).max().unwrap();
    assert!(last >= max_acked);
    let sdk_history = history(&watcher, TOPIC).await;
    assert_eq!(sdk_history, stored, "TCP history on B agrees");

    // The client that was reading on A resumes on B exactly.
    let a_last = before_kill.last().unwrap().0;
    assert_eq!(offsets(&before_kill), (1..=50).collect::<Vec<_>>());
    let resumer = connect(b.tcp).await;
    let mut resumed = within(
        WAIT,
        resumer.subscribe(TOPIC).after_offset(epoch, a_last).send(),
    )
    .await
    .unwrap();
    let rest = read_events(&mut resumed, (last - a_last) as usize).await;
    assert_eq!(rest, stored[a_last as usize..].to_vec());

    // B goes on from there, without reusing an offset.
    let after = publish_pipelined(&watcher, TOPIC, &ticks("b", 1, 5)).await;
    for (a, offset) in after.iter().zip(last + 1..) {
        assert_eq!((a.ack.epoch, a.ack.offset), (epoch, offset));
    }
    assert_eq!(
        read_events(&mut resumed, 5).await,
        by_offset(&after),
        "the resumed subscriber gets what B publishes next"
    );
    // The live subscriber on B saw everything, in order.
    let mut everything = stored.clone();
    everything.extend(by_offset(&after));
    let got = read_events(&mut on_b, everything.len()).await;
    assert_eq!(got, everything, "B's live subscriber; B log:\n{}", b.log());
}

// ---------------------------------------------------------------------------
// 4.–6. Redis restarts and outages.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_with_aof_always_loses_nothing() {
    if !common::redis::available() {
        return;
    }
    const TOPIC: &str = "durable";
    let mut redis = RedisServer::start(Persistence::AofAlways).await;
    let a = Node::start(&redis, "a").await;
    let b = Node::start(&redis, "b").await;
    let on_a = a.client().await;
    let on_b = b.client().await;
    let mut acked = publish_pipelined(&on_a, TOPIC, &ticks("p", 1, 100)).await;
    let epoch = acked[0].ack.epoch;
    // Subscribers from the topic's start, which stay connected across the
    // restart.
    let mut sub = within(WAIT, on_b.subscribe(TOPIC).earliest().send())
        .await
        .unwrap();
    let mut sse = a
        .sse(&format!("/v1/topics/{TOPIC}/events?earliest=true"), &[])
        .await;
    sse.ready().await;
    assert_eq!(offsets(&by_offset(&acked)), (1..=100).collect::<Vec<_>>());
    assert_eq!(read_events(&mut sub, 100).await, by_offset(&acked));
    assert_eq!(sse.read_events(100).await, by_offset(&acked));

    redis.restart().await;

    let first = publish_retrying(&on_a, TOPIC, "tick", "p101", RECOVERY_SECS).await;
    assert_eq!(
        (first.ack.epoch, first.ack.offset),
        (epoch, 101),
        "offsets go on from the last ack, in the same epoch"
    );
    acked.push(first);
    acked.push(publish_retrying(&on_b, TOPIC, "tick", "p102", RECOVERY_SECS).await);
    acked.extend(publish_pipelined(&on_a, TOPIC, &ticks("p", 103, 48)).await);
    acked.extend(publish_pipelined(&on_b, TOPIC, &ticks("p", 151, 50)).await);
    let expected = by_offset(&acked);
    assert_eq!(offsets(&expected), (1..=200).collect::<Vec<_>>());
    assert!(acked.iter().all(|a| a.ack.epoch == epoch));

    // The subscribers live across the restart got everything, in order.
    assert_eq!(read_events(&mut sub, 100).await, expected[100..].to_vec());
    assert_eq!(sse.read_events(100).await, expected[100..].to_vec());
    assert_eq!(sub.epoch(), epoch);
    // Both nodes hold every acked event once.
    assert_eq!(history(&on_a, TOPIC).await, expected, "history on A");
    assert_eq!(history(&on_b, TOPIC).await, expected, "history on B");
    for (name, client) in [("a", &on_a), ("b", &on_b)] {
        let i = await_info(client, TOPIC, epoch, 200, name).await;
        assert_eq!(i.versions, vec![("tick".to_owned(), 200)], "node {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_without_persistence_gives_epoch_changed() {
    if !common::redis::available() {
        return;
    }
    const TOPIC: &str = "volatile";
    let mut redis = RedisServer::start(Persistence::None).await;
    let a = Node::start(&redis, "a").await;
    let b = Node::start(&redis, "b").await;
    let on_a = a.client().await;
    let on_b = b.client().await;
    let old = publish_pipelined(&on_a, TOPIC, &ticks("old", 1, 10)).await;
    let old_epoch = old[0].ack.epoch;
    // Subscribers from the topic's start, which stay connected across the
    // restart.
    let mut sub = within(WAIT, on_b.subscribe(TOPIC).earliest().send())
        .await
        .unwrap();
    let mut sse = a
        .sse(&format!("/v1/topics/{TOPIC}/events?earliest=true"), &[])
        .await;
    sse.ready().await;
    assert_eq!(read_events(&mut sub, 10).await, by_offset(&old));
    assert_eq!(sse.read_events(10).await, by_offset(&old));

    redis.restart().await;

    let mut new = vec![publish_retrying(&on_a, TOPIC, "tick", "new1", RECOVERY_SECS).await];
    let new_epoch = new[0].ack.epoch;
    assert_ne!(
        new_epoch, old_epoch,
        "Redis lost the topic: its history restarted under a new epoch (first ack {:?})",
        new[0].ack
    );
    new.push(publish_retrying(&on_b, TOPIC, "tick", "new2", RECOVERY_SECS).await);
    new.extend(publish_pipelined(&on_a, TOPIC, &ticks("new", 3, 3)).await);
    new.extend(publish_pipelined(&on_b, TOPIC, &ticks("new", 6, 3)).await);
    assert!(
        new.iter().all(|n| n.ack.epoch == new_epoch),
        "one new epoch: {new:?}"
    );
    let expected = by_offset(&new);
    let first_new = expected[0].0;
    assert_eq!(
        offsets(&expected),
        (first_new..first_new + 8).collect::<Vec<_>>(),
        "the new history is gapless"
    );

    // Both nodes report the new epoch and every new event (within their
    // notification latency).
    for (name, client) in [("a", &on_a), ("b", &on_b)] {
        await_info(client, TOPIC, new_epoch, expected[7].0, name).await;
    }

    // The live TCP subscriber on B: one epoch_changed gap, then only events
    // of the new epoch, in order; never an offset of the new history under
    // the old epoch.
    let gap = expect_gap(&mut sub).await;
    assert_eq!(
        (gap.reason, gap.epoch, gap.event_type.clone()),
        (GapReason::EpochChanged, new_epoch, None),
        "{gap:?}"
    );
    assert_eq!(sub.epoch(), new_epoch);
    let rest: Vec<Seen> = expected
        .iter()
        .filter(|s| s.0 > gap.current)
        .cloned()
        .collect();
    assert_eq!(
        read_events(&mut sub, rest.len()).await,
        rest,
        "after {gap:?}"
    );

    // The live SSE stream on A: the same.
    let gap = sse.expect("gap").await.json();
    assert_eq!(gap["reason"], "epoch_changed", "{gap}");
    assert_eq!(gap["epoch"], new_epoch.to_string(), "{gap}");
    let current = gap["current"].as_u64().expect("current");
    let rest: Vec<Seen> = expected.iter().filter(|s| s.0 > current).cloned().collect();
    assert_eq!(sse.read_events(rest.len()).await, rest, "after {gap}");

    // Resumes that name the old epoch, on either node: a gap, then live.
    for (name, client) in [("a", &on_a), ("b", &on_b)] {
        let mut resumed = within(
            WAIT,
            client.subscribe(TOPIC).after_offset(old_epoch, 10).send(),
        )
        .await
        .unwrap();
        let gap = expect_gap(&mut resumed).await;
        assert_eq!(
            (gap.reason, gap.epoch, gap.requested),
            (GapReason::EpochChanged, new_epoch, 10),
            "node {name}: {gap:?}"
        );
        assert_eq!(gap.current, expected[7].0, "node {name}: {gap:?}");
    }
    let mut stale = b
        .sse(
            &format!("/v1/topics/{TOPIC}/events"),
            &[("last-event-id", &format!("{old_epoch}:10"))],
        )
        .await;
    stale.ready().await;
    let gap = stale.expect("gap").await.json();
    assert_eq!(gap["reason"], "epoch_changed", "{gap}");
    assert_eq!(gap["epoch"], new_epoch.to_string(), "{gap}");

    // History holds only the new epoch's events.
    let (epoch, stored) = http_history(&b.http, &b.url(""), TOPIC).await;
    assert_eq!(epoch, new_epoch.to_string());
    assert_eq!(stored, expected);
    assert_eq!(history(&on_a, TOPIC).await, expected);

    let next_ack = publish_retrying(&on_b, TOPIC, "tick", "new9", WAIT).await;
    assert_eq!(
        (next_ack.ack.epoch, next_ack.ack.offset),
        (new_epoch, expected[7].0 + 1)
    );
    assert_eq!(read_events(&mut sub, 1).await, vec![next_ack.seen()]);
    assert_eq!(stale.read_events(1).await, vec![next_ack.seen()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_publishes_fail_fast_subscribers_survive() {
    if !common::redis::available() {
        return;
    }
    const TOPIC: &str = "outage";
    let mut redis = RedisServer::start(Persistence::AofAlways).await;
    let a = Node::start(&redis, "a").await;
    let b = Node::start(&redis, "b").await;
    let on_a = a.client().await;
    // The TCP subscriber goes through a proxy, to count its connections.
    let proxy = Proxy::start(b.tcp()).await;
    let watcher = connect(proxy.addr()).await;
    let mut acked = publish_pipelined(&on_a, TOPIC, &ticks("p", 1, 5)).await;
    let epoch = acked[0].ack.epoch;
    // Subscribers from the topic's start, which stay connected across the
    // outage.
    let mut sub = within(WAIT, watcher.subscribe(TOPIC).earliest().send())
        .await
        .unwrap();
    let mut sse = b
        .sse(&format!("/v1/topics/{TOPIC}/events?earliest=true"), &[])
        .await;
    sse.ready().await;
    assert_eq!(read_events(&mut sub, 5).await, by_offset(&acked));
    assert_eq!(sse.read_events(5).await, by_offset(&acked));

    redis.kill().await;

    // A publish fails fast, with a retryable error, over TCP…
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(WAIT),
        on_a.publish(TOPIC, "tick", "lost"),
    )
    .await
    .expect("a publish while Redis is down does not hang");
    let took = started.elapsed();
    match outcome {
        Ok(ack) => panic!("a publish succeeded while Redis was down: {ack:?}"),
        Err(e) => {
            assert!(e.is_retryable(), "the error is retryable: {e:?}");
            assert!(
                !matches!(e, Error::Timeout),
                "the broker answered, the client did not time out"
            );
        }
    }
    assert!(
        took < Duration::from_secs(10),
        "the publish failed after {took:?}, not within a few seconds"
    );
    // …and over HTTP, on the other node: 503 storage_unavailable.
    let started = Instant::now();
    let (status, body) = common::http::send_json(
        b.http
            .post(b.url(&format!("/v1/topics/{TOPIC}/events?type=tick")))
            .body("lost"),
        WAIT,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "storage_unavailable", "{body}");
    assert!(took < Duration::from_secs(10), "HTTP publish took {took:?}");
    // A node that cannot write says so to its load balancer.
    await_readyz(&b, StatusCode::SERVICE_UNAVAILABLE).await;

    redis.start_again().await;

    acked.push(publish_retrying(&on_a, TOPIC, "tick", "p6", RECOVERY_SECS).await);
    acked.push(publish_retrying(&watcher, TOPIC, "tick", "p7", RECOVERY_SECS).await);
    acked.extend(publish_pipelined(&on_a, TOPIC, &ticks("p", 8, 3)).await);
    let expected = by_offset(&acked);
    assert_eq!(
        offsets(&expected),
        (1..=10).collect::<Vec<_>>(),
        "nothing published during the outage was stored; offsets go on"
    );
    assert!(acked.iter().all(|a| a.ack.epoch == epoch), "{acked:?}");

    // Both subscribers, connected across the outage, get the rest.
    assert_eq!(read_events(&mut sub, 5).await, expected[5..].to_vec());
    assert_eq!(sse.read_events(5).await, expected[5..].to_vec());
    assert_eq!(
        proxy.connections(),
        1,
        "the TCP subscriber stayed on its one connection through the outage"
    );
    await_readyz(&a, StatusCode::OK).await;
    await_readyz(&b, StatusCode::OK).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_fails_publishes_within_the_command_timeout() {
    if !common::redis::available() {
        return;
    }
    const TOPIC: &str = "hung";
    let redis = RedisServer::start(Persistence::AofAlways).await;
    let a = Node::start(&redis, "a").await;
    let b = Node::start(&redis, "b").await;
    let on_a = a.client().await;
    let on_b = b.client().await;
    let mut acked = publish_pipelined(&on_a, TOPIC, &ticks("p", 1, 3)).await;
    let epoch = acked[0].ack.epoch;
    let mut sub = within(WAIT, on_b.subscribe(TOPIC).earliest().send())
        .await
        .unwrap();
    assert_eq!(read_events(&mut sub, 3).await, by_offset(&acked));

    // Redis accepts connections but answers nothing.
    redis.freeze();
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(WAIT),
        on_a.publish_event(TOPIC, new_event("tick", "p4").key("hung-p4")),
    )
    .await;
    let took = started.elapsed();
    // Thawed before asserting, so that a failure leaves no stopped process.
    let outcome = outcome.unwrap_or_else(|_| {
        redis.thaw();
        panic!("a publish to a hung Redis still had no answer after {WAIT}s")
    });
    redis.thaw();
    match &outcome {
        Ok(ack) => panic!("a publish succeeded while Redis was hung: {ack:?}"),
        Err(e) => assert!(e.is_retryable(), "the error is retryable: {e:?}"),
    }
    assert!(
        took < Duration::from_secs(10),
        "the publish failed after {took:?}: not within the 2s command timeout (plus slack)"
    );

    // The failed attempt may have been stored after all (Redis ran it once
    // thawed); its retry with the same key answers the original ack, so the
    // event is stored exactly once, at offset 4.
    let retried =
        publish_keyed_retrying(&on_a, TOPIC, "tick", "p4", "hung-p4", RECOVERY_SECS).await;
    assert_eq!((retried.ack.epoch, retried.ack.offset), (epoch, 4));
    acked.push(retried);
    let stored = history(&on_a, TOPIC).await;
    assert_eq!(stored, by_offset(&acked), "p4 stored once");
    // The subscriber on B, connected throughout, gets it.
    assert_eq!(read_events(&mut sub, 1).await, stored[3..].to_vec());
    await_info(&on_b, TOPIC, epoch, 4, "b").await;
}

/// Polls `GET /readyz` on `node` until it answers `status`.
async fn await_readyz(node: &Node, status: StatusCode) {
    let deadline = Instant::now() + Duration::from_secs(WAIT);
    loop {
        let (got, body) = common::http::send_json(node.http.get(node.url("/readyz")), WAIT).await;
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz of node {} still answers {got} {body} after {WAIT}s, expected {status}",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Seal and idempotency keys across nodes.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_on_one_node_ends_the_topic_on_every_node() {
    if !common::redis::available() {
        return;
    }
    const TOPIC: &str = "stream";
    let redis = RedisServer::start(Persistence::None).await;
    let a = Node::start(&redis, "a").await;
    let b = Node::start(&redis, "b").await;
    let on_a = a.client().await;
    let on_b = b.client().await;
    let acked = publish_pipelined(&on_a, TOPIC, &ticks("t", 1, 3)).await;
    let mut sub = within(WAIT, on_b.subscribe(TOPIC).earliest().send())
        .await
        .unwrap();
    let mut sse = b
        .sse(&format!("/v1/topics/{TOPIC}/events?earliest=true"), &[])
        .await;
    sse.ready().await;
    assert_eq!(read_events(&mut sub, 3).await, by_offset(&acked));
    assert_eq!(sse.read_events(3).await, by_offset(&acked));

    within(WAIT, on_a.seal(TOPIC)).await.expect("sealed on A");
    match next(&mut sub).await {
        Delivery::End { topic, last_offset } => {
            assert_eq!((topic.as_str(), last_offset), (TOPIC, 3))
        }
        other => panic!("expected End on B, got {other:?}"),
    }
    assert!(within(WAIT, sub.next_delivery()).await.is_none());
    let end = sse.expect("end").await.json();
    assert_eq!(end["last_offset"], 3, "{end}");

    // B refuses publishes to the sealed topic (within its notification
    // latency it may still try, and Redis refuses).
    match within(WAIT, on_b.publish(TOPIC, "tick", "t4")).await {
        Err(e) => assert_eq!(
            e.code(),
            Some(ringcast_client::ErrorCode::TopicSealed),
            "{e:?}"
        ),
        Ok(ack) => panic!("a publish to a sealed topic was stored: {ack:?}"),
    }
    assert!(
        await_info(&on_b, TOPIC, acked[0].ack.epoch, 3, "b")
            .await
            .sealed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_retried_on_another_node_answers_the_original_ack() {
    if !common::redis::available() {
        return;
    }
    const TOPIC: &str = "payments";
    let redis = RedisServer::start(Persistence::None).await;
    let a = Node::start(&redis, "a").await;
    let b = Node::start(&redis, "b").await;
    let on_a = a.client().await;
    let first = within(
        WAIT,
        on_a.publish_event(TOPIC, new_event("paid", "pay-1").key("order-17-paid")),
    )
    .await
    .unwrap();
    let other = within(WAIT, on_a.publish(TOPIC, "paid", "pay-2"))
        .await
        .unwrap();
    assert_eq!((first.offset, other.offset), (1, 2));

    // The client retries the first publish through B (its ack was lost).
    let (status, ack) = common::http::send_json(
        b.http
            .post(b.url(&format!("/v1/topics/{TOPIC}/events?type=paid")))
            .header("idempotency-key", "order-17-paid")
            .body("pay-1"),
        WAIT,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack["duplicate"], true, "{ack}");
    assert_eq!(
        (
            ack["epoch"].clone(),
            ack["offset"].clone(),
            ack["version"].clone()
        ),
        (
            Value::String(first.epoch.to_string()),
            Value::from(1),
            Value::from(1)
        ),
        "{ack}"
    );
    let on_b = b.client().await;
    let again = within(
        WAIT,
        on_b.publish_event(TOPIC, new_event("paid", "pay-1").key("order-17-paid")),
    )
    .await
    .unwrap();
    assert_eq!(again, first, "the SDK gets the original ack from B too");
    let i = await_info(&on_b, TOPIC, first.epoch, 2, "b").await;
    assert_eq!(i.versions, vec![("paid".to_owned(), 2)]);
    assert_eq!(
        offsets(&history(&on_b, TOPIC).await),
        vec![1, 2],
        "stored once"
    );
}

// ---------------------------------------------------------------------------
// 7. Retention.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_below_what_redis_retains_gets_a_retention_gap() {
    if !common::redis::available() {
        return;
    }
    const TOPIC: &str = "short";
    const PREFIX: &str = "rc-retention-test";
    let redis = RedisServer::start(Persistence::None).await;
    let tweak = |c: &mut Config| {
        c.topics.max_events = 10;
        c.cluster.key_prefix = PREFIX.into();
    };
    let a = Node::start_with(&redis, "a", tweak).await;
    let b = Node::start_with(&redis, "b", tweak).await;
    let on_a = a.client().await;
    let on_b = b.client().await;
    let acked = publish_pipelined(&on_a, TOPIC, &ticks("p", 1, 50)).await;
    let epoch = acked[0].ack.epoch;
    let expected = by_offset(&acked);

    let mut resumed = within(WAIT, on_b.subscribe(TOPIC).after_offset(epoch, 5).send())
        .await
        .unwrap();
    let gap = expect_gap(&mut resumed).await;
    assert_eq!(
        (gap.reason, gap.epoch, gap.requested),
        (GapReason::Retention, epoch, 5),
        "{gap:?}"
    );
    assert!(
        gap.first_available > 6 && gap.current >= gap.first_available && gap.current <= 50,
        "{gap:?}"
    );
    assert!(
        gap.current - gap.first_available <= 9,
        "at most 10 events retained: {gap:?}"
    );
    // Within retention: exactly the rest, no gap.
    let mut within_window = within(WAIT, on_b.subscribe(TOPIC).after_offset(epoch, 45).send())
        .await
        .unwrap();
    assert_eq!(
        read_events(&mut within_window, 5).await,
        expected[45..].to_vec()
    );
    // SSE on B, too.
    let mut sse = b
        .sse(
            &format!("/v1/topics/{TOPIC}/events"),
            &[("last-event-id", &format!("{epoch}:5"))],
        )
        .await;
    sse.ready().await;
    let sse_gap = sse.expect("gap").await.json();
    assert_eq!(sse_gap["reason"], "retention", "{sse_gap}");
    assert_eq!(sse_gap["requested"], 5, "{sse_gap}");

    // Then live, everywhere. B may have been behind Redis when it answered
    // (notification latency): what follows the first gap is events, each at
    // the position after the last one, or more retention gaps; never a
    // silent skip. Read until the event published now.
    let next_ack = publish_retrying(&on_a, TOPIC, "tick", "p51", WAIT).await;
    assert_eq!(next_ack.ack.offset, 51);
    let mut all = expected.clone();
    all.push(next_ack.seen());
    let mut position = gap.current;
    loop {
        match next(&mut resumed).await {
            Delivery::Event(e) => {
                assert_eq!(
                    e.offset,
                    position + 1,
                    "a silent skip after {position}: {e:?}"
                );
                assert_eq!(seen_of(&e), all[e.offset as usize - 1]);
                position = e.offset;
                if position == 51 {
                    break;
                }
            }
            Delivery::Gap(g) => {
                assert_eq!(
                    (g.reason, g.requested),
                    (GapReason::Retention, position),
                    "{g:?}"
                );
                assert!(g.current > position, "{g:?}");
                position = g.current;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        read_events(&mut within_window, 1).await,
        vec![next_ack.seen()]
    );
    let mut position = sse_gap["current"].as_u64().expect("current");
    loop {
        let e = sse.next().await.expect("the SSE stream stays open");
        let json = e.json();
        match e.event.as_str() {
            "gap" => {
                assert_eq!(json["reason"], "retention", "{json}");
                assert_eq!(json["requested"], position, "{json}");
                position = json["current"].as_u64().expect("current");
            }
            _ if !e.is_control() => {
                let seen = sse_seen(&e);
                assert_eq!(
                    seen.0,
                    position + 1,
                    "a silent skip after {position}: {e:?}"
                );
                assert_eq!(seen, all[seen.0 as usize - 1]);
                position = seen.0;
                if position == 51 {
                    break;
                }
            }
            _ => panic!("unexpected {e:?}"),
        }
    }

    // Every key lives under the configured prefix.
    let keys = redis.keys("*").await;
    assert!(!keys.is_empty());
    assert!(
        keys.iter().all(|k| k.starts_with(PREFIX)),
        "keys outside the prefix {PREFIX}: {keys:?}"
    );
}

// ---------------------------------------------------------------------------
// Nodes joining late, lost notifications, no Redis at start.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_later_serves_the_existing_topics_exactly() {
    if !common::redis::available() {
        return;
    }
    const TOPIC: &str = "late";
    let redis = RedisServer::start(Persistence::None).await;
    let a = Node::start(&redis, "a").await;
    let on_a = a.client().await;
    let acked = publish_pipelined(&on_a, TOPIC, &ticks("p", 1, 40)).await;
    let epoch = acked[0].ack.epoch;

    let c = Node::start(&redis, "c").await;
    let on_c = c.client().await;
    let i = await_info(&on_c, TOPIC, epoch, 40, "c").await;
    assert_eq!(i.versions, vec![("tick".to_owned(), 40)]);
    assert_eq!(history(&on_c, TOPIC).await, by_offset(&acked));
    let mut sub = within(WAIT, on_c.subscribe(TOPIC).after_offset(epoch, 25).send())
        .await
        .unwrap();
    assert_eq!(sub.epoch(), epoch);
    assert_eq!(
        read_events(&mut sub, 15).await,
        by_offset(&acked)[25..].to_vec()
    );
    let next_ack = publish_retrying(&on_c, TOPIC, "tick", "p41", WAIT).await;
    assert_eq!((next_ack.ack.epoch, next_ack.ack.offset), (epoch, 41));
    assert_eq!(read_events(&mut sub, 1).await, vec![next_ack.seen()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_a_node_that_lags_behind_redis_is_exact() {
    if !common::redis::available() {
        return;
    }
    // A client saw the last event on A and reconnects to B at once: B may
    // not have heard of that offset yet (notification latency). The resume
    // must still be exact: no error, nothing twice, nothing missing.
    let redis = RedisServer::start(Persistence::None).await;
    let a = Node::start(&redis, "a").await;
    let b = Node::start(&redis, "b").await;
    let on_a = a.client().await;
    let on_b = b.client().await;
    let mut subs = Vec::new();
    for k in 0..5 {
        let topic = format!("lag{k}");
        let acked = publish_pipelined(&on_a, &topic, &ticks("p", 1, 100)).await;
        let epoch = acked[0].ack.epoch;
        let sub = within(WAIT, on_b.subscribe(&topic).after_offset(epoch, 100).send())
            .await
            .unwrap_or_else(|e| {
                panic!("resume of {topic} on B after offset 100 (acked on A): {e}")
            });
        assert_eq!(sub.epoch(), epoch);
        subs.push((topic, epoch, sub));
    }
    for (topic, epoch, mut sub) in subs {
        let next_ack = publish_retrying(&on_a, &topic, "tick", "p101", WAIT).await;
        assert_eq!((next_ack.ack.epoch, next_ack.ack.offset), (epoch, 101));
        assert_eq!(
            read_events(&mut sub, 1).await,
            vec![next_ack.seen()],
            "{topic}: only the event after the resume point"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_notification_connections_lose_no_event() {
    if !common::redis::available() {
        return;
    }
    const TOPIC: &str = "notified";
    let redis = RedisServer::start(Persistence::None).await;
    let a = Node::start(&redis, "a").await;
    let b = Node::start(&redis, "b").await;
    let on_a = a.client().await;
    let on_b = b.client().await;
    let mut acked = publish_pipelined(&on_a, TOPIC, &ticks("p", 1, 5)).await;
    let epoch = acked[0].ack.epoch;
    let mut sub = within(WAIT, on_b.subscribe(TOPIC).earliest().send())
        .await
        .unwrap();
    assert_eq!(read_events(&mut sub, 5).await, by_offset(&acked));

    // Every node's pub/sub connection is cut: notifications published until
    // a node subscribes again are lost; the events are not.
    let killed = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert!(
        matches!(killed, common::redis::Reply::Integer(n) if n >= 2),
        "each node had a pub/sub connection: {killed:?}"
    );
    acked.extend(publish_pipelined(&on_a, TOPIC, &ticks("p", 6, 20)).await);
    assert_eq!(
        read_events(&mut sub, 20).await,
        by_offset(&acked)[5..].to_vec(),
        "B delivers what A published while B's notifications were cut"
    );
    await_info(&on_b, TOPIC, epoch, 25, "b").await;
    // And notifications work again afterwards.
    acked.push(publish_retrying(&on_a, TOPIC, "tick", "p26", WAIT).await);
    assert_eq!(
        read_events(&mut sub, 1).await,
        by_offset(&acked)[25..].to_vec()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ringcastd_without_redis_exits_with_an_error_naming_the_url() {
    if !common::redis::available() {
        return;
    }
    // A port nothing listens on: a Redis that was started and killed.
    let mut redis = RedisServer::start(Persistence::None).await;
    redis.kill().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ringcast.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\nbackend = \"redis\"\nredis_url = \"{}\"\nnode_id = \"x\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let mut cmd = common::ringcastd();
    cmd.arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--tcp-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let output = within(60, cmd.output()).await.expect("run ringcastd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "ringcastd without Redis exited {:?}; stderr:\n{stderr}",
        output.status
    );
    assert!(
        stderr.contains(&format!("127.0.0.1:{}", redis.port())),
        "the error names the Redis URL; stderr:\n{stderr}"
    );
}
