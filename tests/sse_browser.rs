//! A real browser against the SSE bridge: headless Chromium (Debian's
//! `chromium` and `chromium-driver` packages), driven over W3C WebDriver,
//! keeps a plain `EventSource` connected while the broker is killed and
//! restarted, and must end up with every event exactly once, in order.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver`:
//!
//! ```text
//! apt-get install -y chromium chromium-driver
//! ```
//!
//! The test is opt-in, so that `cargo test` passes on a machine with only
//! Rust: it runs when `RINGCAST_BROWSER_TESTS=1` (`.ci/run` installs the
//! browser and sets it), and then fails loudly if the browser is missing.
//! Without the variable it prints that it was skipped.
//!
//! The page is served from a port of its own, so it is another origin than
//! the broker: the broker lists it in `server.cors_origins`. With auth on,
//! the page server also hands out short-lived tokens at `/token` (as a
//! site's backend would), and the page renews them on `token_expired`.
//!
//! The multi-topic tests keep one `EventSource` on `GET /v1/events` over
//! two named topics and a pattern. For the crash, the browser reaches the
//! broker through a [`Gate`], a relay the test shuts before the kill: the
//! browser's reconnect waits in it while the broker restarts and every
//! topic moves on, so "published while the browser was away" is certain,
//! not a race with `retry:`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use common::{config, start};
use ringcast::broker::Broker;
use ringcast::config::{Config, Durability};
use ringcast::engine::NewEvent;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const OPT_IN_VAR: &str = "RINGCAST_BROWSER_TESTS";
const PAGE: &str = include_str!("browser/page.html");
/// How long the browser may take to reach each awaited state.
const WAIT: Duration = Duration::from_secs(60);

/// `None` (skip) unless `RINGCAST_BROWSER_TESTS=1`; then panics with
/// install instructions when the browser is missing.
fn browser_available() -> Option<()> {
    if !std::env::var(OPT_IN_VAR).is_ok_and(|v| v == "1") {
        eprintln!(
            "skipping the real-browser SSE test (set {OPT_IN_VAR}=1 to run it; .ci/run does)"
        );
        return None;
    }
    for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: the real-browser SSE test needs Debian's `chromium` and \
             `chromium-driver` packages (apt-get install -y chromium chromium-driver; \
             missing here: {package}). Unset {OPT_IN_VAR} to skip it."
        );
    }
    Some(())
}

/// A running chromedriver with one browser session; quits both on drop,
/// also when the test fails.
struct Browser {
    driver: Child,
    driver_addr: SocketAddr,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch() -> Self {
        let port = {
            let l = StdListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().unwrap().port()
        };
        let driver_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let profile = tempfile::tempdir().unwrap();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut browser = Self {
            driver,
            driver_addr,
            session: String::new(),
            http,
            _profile: profile,
        };
        browser.wait_for_driver().await;
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--no-first-run".into(),
            format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let created = browser
            .command(
                reqwest::Method::POST,
                "/session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                }}}),
            )
            .await;
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {created}"))
            .to_owned();
        browser
    }

    /// Polls chromedriver's `/status` until it is ready (the awaited event:
    /// the driver has no other way to say it is listening).
    async fn wait_for_driver(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let url = format!("http://{}/status", self.driver_addr);
            if let Ok(r) = self.http.get(&url).send().await {
                if let Ok(v) = r.json::<Value>().await {
                    if v["value"]["ready"] == true {
                        return;
                    }
                }
            }
            if let Ok(Some(status)) = self.driver.try_wait() {
                panic!("{CHROMEDRIVER} exited early: {status}");
            }
            assert!(Instant::now() < deadline, "chromedriver never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a WebDriver command and returns its `value`.
    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("http://{}{path}", self.driver_addr);
        let response =
            tokio::time::timeout(WAIT, self.http.request(method, &url).json(&body).send())
                .await
                .unwrap_or_else(|_| panic!("WebDriver {path} timed out"))
                .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"));
        let status = response.status();
        let reply: Value = response.json().await.expect("WebDriver replies JSON");
        assert!(
            status.is_success(),
            "WebDriver {path} failed: {status} {reply}"
        );
        reply["value"].clone()
    }

    async fn navigate(&self, url: &str) {
        let path = format!("/session/{}/url", self.session);
        self.command(reqwest::Method::POST, &path, json!({ "url": url }))
            .await;
    }

    /// Runs `script` (a function body) in the page and returns its result.
    async fn execute(&self, script: &str) -> Value {
        let path = format!("/session/{}/execute/sync", self.session);
        self.command(
            reqwest::Method::POST,
            &path,
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// What the page recorded so far.
    async fn state(&self) -> PageState {
        let v = self
            .execute(
                "return {received: window.received, counts: window.counts, \
                 readyState: window.es.readyState, gaps: window.gaps, \
                 ended: window.ended, failed: window.failed, log: window.log};",
            )
            .await;
        PageState {
            offsets: v["received"]
                .as_array()
                .expect("window.received")
                .iter()
                .map(|e| e["offset"].as_u64().expect("offset"))
                .collect(),
            ids: v["received"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["lastEventId"].as_str().unwrap_or_default().to_owned())
                .collect(),
            topics: v["received"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["topic"].as_str().unwrap_or_default().to_owned())
                .collect(),
            raw: v,
        }
    }

    /// Polls the page until `done` holds. Polling the browser is the awaited
    /// event here: the page cannot call the test back.
    async fn wait_until(&self, what: &str, done: impl Fn(&PageState) -> bool) -> PageState {
        let deadline = Instant::now() + WAIT;
        loop {
            let state = self.state().await;
            if done(&state) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "the browser never reached: {what}; page state: {}",
                state.raw
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session so chromedriver closes Chromium, then stops
        // chromedriver itself. Blocking on purpose: drop cannot await.
        if !self.session.is_empty() {
            let _ = blocking_delete(self.driver_addr, &format!("/session/{}", self.session));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A plain HTTP/1.1 DELETE over a std socket, for use in `Drop`.
fn blocking_delete(addr: SocketAddr, path: &str) -> std::io::Result<()> {
    let mut s = StdStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "DELETE {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    Ok(())
}

/// A snapshot of `window.received` and friends.
struct PageState {
    offsets: Vec<u64>,
    ids: Vec<String>,
    /// The topic of each event in `offsets` (from its `data`).
    topics: Vec<String>,
    raw: Value,
}

impl PageState {
    fn count(&self, kind: &str) -> u64 {
        self.raw["counts"][kind].as_u64().unwrap_or(0)
    }

    fn ready_state(&self) -> u64 {
        self.raw["readyState"].as_u64().unwrap_or(u64::MAX)
    }

    /// The offsets received of each topic, in arrival order.
    fn by_topic(&self) -> BTreeMap<&str, Vec<u64>> {
        let mut by_topic: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (topic, offset) in self.topics.iter().zip(&self.offsets) {
            by_topic.entry(topic).or_default().push(*offset);
        }
        by_topic
    }

    /// The topics of the `end` events received, in arrival order.
    fn ended(&self) -> Vec<&str> {
        self.raw["ended"]
            .as_array()
            .map(|ended| ended.iter().filter_map(|e| e["topic"].as_str()).collect())
            .unwrap_or_default()
    }
}

/// The page server's token endpoint: each `/token` request waits for a
/// permit the test hands out, then mints a token for subject `browser` that
/// may read `browser*` topics for `ttl_secs` — as the body, or as the
/// `ringcast_token` cookie with `?cookie=1`.
#[derive(Clone)]
struct Tokens {
    permits: Arc<tokio::sync::Semaphore>,
    issued: Arc<AtomicUsize>,
    ttl_secs: i64,
}

impl Tokens {
    fn new(ttl_secs: i64) -> Self {
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(0)),
            issued: Arc::new(AtomicUsize::new(0)),
            ttl_secs,
        }
    }

    /// Lets `n` more `/token` requests through.
    fn allow(&self, n: usize) {
        self.permits.add_permits(n);
    }

    fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    cookie: Option<String>,
}

async fn mint(
    State(tokens): State<Tokens>,
    Query(q): Query<TokenQuery>,
) -> axum::response::Response {
    tokens
        .permits
        .acquire()
        .await
        .expect("the semaphore is never closed")
        .forget();
    tokens.issued.fetch_add(1, Ordering::SeqCst);
    let token = common::auth::token("browser", &["browser*"], tokens.ttl_secs);
    let no_store = ("cache-control", "no-store".to_owned());
    if q.cookie.is_some() {
        // Cookies do not tell ports apart: set for 127.0.0.1 here, sent to
        // the broker on its own port too.
        let cookie = format!("ringcast_token={token}; Path=/; SameSite=Lax; HttpOnly");
        return ([no_store, ("set-cookie", cookie)], "cookie set").into_response();
    }
    ([no_store], token).into_response()
}

/// Serves the test page (and `/token`) on an ephemeral port of its own:
/// not by ringcast, which the test kills.
async fn serve_page(tokens: Tokens) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/token", get(mint))
        .with_state(tokens);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Lets the page at `page` (another origin: its own port) read from the broker.
fn allow_page(config: &mut Config, page: SocketAddr) {
    config.server.cors_origins = vec![format!("http://{page}")];
}

async fn publish_tokens(broker: &Broker, topic: &str, offsets: std::ops::RangeInclusive<u64>) {
    for n in offsets {
        let ack = broker
            .engine()
            .publish(topic, NewEvent::new("token", json!({ "n": n }).to_string()))
            .await
            .expect("publish");
        assert_eq!(ack.offset, n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_event_source_resumes_across_a_broker_crash_and_stops_at_the_end() {
    if browser_available().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Durability::Fsync);
    let page = serve_page(Tokens::new(0)).await;
    allow_page(&mut config, page);
    let broker = start(config.clone()).await;
    let topic = "browser";
    publish_tokens(&broker, topic, 1..=5).await;
    let epoch = broker.engine().info(topic).unwrap().epoch;

    let src = format!(
        "http://{}/v1/topics/{topic}/events?earliest=true",
        broker.http_addr()
    );
    let browser = Browser::launch().await;
    browser
        .navigate(&format!(
            "http://{page}/?types=token&src={}",
            encode_component(&src)
        ))
        .await;

    // Replay, then live while connected.
    browser
        .wait_until("the 5 retained events", |s| s.offsets.len() >= 5)
        .await;
    publish_tokens(&broker, topic, 6..=10).await;
    browser
        .wait_until("the 5 live events", |s| s.offsets.len() >= 10)
        .await;

    // A crash; nothing is published while the broker is down. It comes back
    // on the same addresses, so the browser's own reconnect reaches it.
    let (http_addr, tcp_addr) = (broker.http_addr(), broker.tcp_addr());
    broker.kill().await;
    config.server.http_listen = http_addr;
    config.server.tcp_listen = tcp_addr;
    let broker = start(config).await;
    assert_eq!(
        broker.engine().info(topic).unwrap().epoch,
        epoch,
        "the epoch survives the restart"
    );
    publish_tokens(&broker, topic, 11..=15).await;
    broker.engine().seal(topic).await.expect("seal");

    let state = browser
        .wait_until("the end event", |s| s.count("end") >= 1)
        .await;
    assert_eq!(
        state.offsets,
        (1..=15).collect::<Vec<_>>(),
        "every offset exactly once, in order; page state: {}",
        state.raw
    );
    let ids: Vec<String> = (1..=15).map(|o| format!("{epoch}:{o}")).collect();
    assert_eq!(state.ids, ids, "lastEventId is <epoch>:<offset>");
    assert_eq!(state.count("gap"), 0, "no gap: {}", state.raw);
    assert!(
        state.count("ready") >= 2,
        "the browser reconnected on its own: {}",
        state.raw
    );

    // After `end` the browser reconnects with the last id once more, gets
    // 204 and stops for good (EventSource.CLOSED).
    let state = browser
        .wait_until("EventSource closed by 204", |s| s.ready_state() == 2)
        .await;
    assert_eq!(state.offsets.len(), 15, "{}", state.raw);
    drop(browser);
    broker.shutdown().await.expect("clean shutdown");
}

/// The page subscribes with a token valid for 2 s (by `mode`: `query` or
/// `cookie`), which expires mid-stream; the page renews it from `/token` and
/// resumes with `?last_event_id=`. Events published while it has no token
/// (the test holds `/token` back) arrive after the renewal, and every offset
/// arrives exactly once, in order.
async fn a_browser_renews_its_token_and_resumes_exactly(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new(2);
    let page = serve_page(tokens.clone()).await;
    let mut config = common::auth::hs256_config(config(dir.path(), Durability::Memory), dir.path());
    allow_page(&mut config, page);
    let broker = start(config).await;
    let topic = format!("browser-{mode}");
    publish_tokens(&broker, &topic, 1..=3).await;

    let src = format!(
        "http://{}/v1/topics/{topic}/events?earliest=true",
        broker.http_addr()
    );
    let browser = Browser::launch().await;
    tokens.allow(1);
    browser
        .navigate(&format!(
            "http://{page}/?types=token&renew=/token&auth={mode}&src={}",
            encode_component(&src)
        ))
        .await;
    browser
        .wait_until("the 3 retained events", |s| s.offsets.len() >= 3)
        .await;
    publish_tokens(&broker, &topic, 4..=5).await;
    browser
        .wait_until("the 2 live events", |s| s.offsets.len() >= 5)
        .await;

    // The token expires; the page asks for a new one, which the test holds
    // back while more events are published.
    browser
        .wait_until("token_expired", |s| s.count("expired") >= 1)
        .await;
    assert_eq!(tokens.issued(), 1);
    publish_tokens(&broker, &topic, 6..=8).await;
    tokens.allow(1);
    let state = browser
        .wait_until("the events published while it had no token", |s| {
            s.offsets.len() >= 8
        })
        .await;
    assert!(state.count("renewed") >= 1, "{}", state.raw);

    // From now on every renewal is served at once.
    tokens.allow(1000);
    publish_tokens(&broker, &topic, 9..=10).await;
    broker.engine().seal(&topic).await.expect("seal");
    let state = browser
        .wait_until("the end event", |s| s.count("end") >= 1)
        .await;
    assert_eq!(
        state.offsets,
        (1..=10).collect::<Vec<_>>(),
        "every offset exactly once, in order, across the expiry; page state: {}",
        state.raw
    );
    assert_eq!(state.count("gap"), 0, "{}", state.raw);
    assert!(state.count("expired") >= 1, "{}", state.raw);
    drop(browser);
    broker.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_renews_an_expired_query_token_and_misses_nothing() {
    if browser_available().is_none() {
        return;
    }
    a_browser_renews_its_token_and_resumes_exactly("query").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_renews_an_expired_cookie_and_misses_nothing() {
    if browser_available().is_none() {
        return;
    }
    a_browser_renews_its_token_and_resumes_exactly("cookie").await;
}

/// A TCP relay in front of the broker's HTTP port that the test can shut.
/// A connection accepted while it is shut waits, its request pending, until
/// it opens again: so the test, not a timer, decides when the browser's own
/// reconnect reaches the broker. It keeps the head of every request it
/// passes on, to show what the browser sent.
struct Gate {
    addr: SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    heads: Arc<Mutex<Vec<String>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// An open gate to `upstream`.
    async fn to(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, rx) = tokio::sync::watch::channel(true);
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let kept = heads.clone();
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                tokio::spawn(relay(down, upstream, rx.clone(), kept.clone()));
            }
        });
        Self {
            addr,
            open,
            heads,
            accept,
        }
    }

    /// Holds every connection from now on until [`open`](Self::open).
    fn shut(&self) {
        self.open.send_replace(false);
    }

    fn open(&self) {
        self.open.send_replace(true);
    }

    /// The heads of the requests passed on so far, in order.
    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One connection through a [`Gate`]: reads the request head, waits until
/// the gate is open, then relays both ways until either side closes (the
/// broker's kill closes the browser's side too, as without the gate).
async fn relay(
    mut down: tokio::net::TcpStream,
    upstream: SocketAddr,
    mut open: tokio::sync::watch::Receiver<bool>,
    heads: Arc<Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match down.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let opened = open.wait_for(|open| *open).await.is_ok();
    if !opened {
        return;
    }
    // Refused while the broker is down: dropping the browser's side is the
    // network error it would have had without the gate.
    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    heads
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    if up.write_all(&head).await.is_ok() {
        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    }
}

/// The value of header `name` in a request head.
fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

/// Where a topic stands in a `/v1/events` id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IdPosition {
    epoch: u64,
    offset: u64,
    ended: bool,
}

/// The bytes of an id still to read.
struct IdBytes<'a>(&'a [u8]);

impl IdBytes<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        assert!(self.0.len() >= n, "the id is cut short");
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    /// LEB128: 7 bits a byte, low first.
    fn varint(&mut self) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return v;
            }
        }
        panic!("a varint of more than 64 bits");
    }

    fn position(&mut self) -> IdPosition {
        let v = self.varint();
        let epoch = u64::from_le_bytes(self.take(8).try_into().unwrap());
        IdPosition {
            epoch,
            offset: v >> 1,
            ended: v & 1 == 1,
        }
    }
}

/// Reads a `/v1/events` id from outside, by its documented layout (see
/// `src/http/stream_id.rs`): the position of every topic it holds, for a
/// stream over the named topics `named` and patterns whose literal
/// prefixes are `prefixes`, both in URL order.
fn stream_positions(id: &str, named: &[&str], prefixes: &[&str]) -> HashMap<String, IdPosition> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(id)
        .unwrap_or_else(|e| panic!("id {id:?} is not base64url: {e}"));
    let mut r = IdBytes(&bytes);
    assert_eq!(r.take(1), [1], "format 1: {id:?}");
    r.take(4); // CRC-32 of the selection
    let mut positions: HashMap<String, IdPosition> = named
        .iter()
        .map(|t| (t.to_string(), r.position()))
        .collect();
    while !r.0.is_empty() {
        let pattern = usize::try_from(r.varint()).unwrap();
        let len = usize::try_from(r.varint()).unwrap();
        let suffix = std::str::from_utf8(r.take(len)).expect("a UTF-8 name");
        let name = format!("{}{suffix}", prefixes[pattern]);
        let position = r.position();
        assert!(
            positions.insert(name, position).is_none(),
            "a topic twice in {id:?}"
        );
    }
    positions
}

/// The topics of the multi-topic tests: two named ones and a pattern (its
/// literal prefix is what an id stores names after).
const ALPHA: &str = "browser.alpha";
const BETA: &str = "browser.beta";
const ORDERS: &str = "browser.orders.*";
const ORDERS_PREFIX: &str = "browser.orders.";
/// Matches of `ORDERS`: stored before the page connects, created while it
/// is connected, created while it is away.
const EU: &str = "browser.orders.eu";
const US: &str = "browser.orders.us";
const APAC: &str = "browser.orders.apac";

/// A `/v1/events` URL on `addr` over `named` topics and `ORDERS`, from the
/// earliest retained event.
fn many_src(addr: SocketAddr, named: &[&str]) -> String {
    let mut src = format!("http://{addr}/v1/events?");
    for topic in named {
        src += &format!("topic={topic}&");
    }
    src + &format!("topic={ORDERS}&earliest=true")
}

/// The epoch of each of `topics` now.
fn epochs<'t>(broker: &Broker, topics: &[&'t str]) -> HashMap<&'t str, u64> {
    topics
        .iter()
        .map(|t| (*t, broker.engine().info(t).expect("a stored topic").epoch))
        .collect()
}

/// Each topic with the offsets 1..=n it should have delivered.
fn offsets_up_to<'t>(last: &[(&'t str, u64)]) -> BTreeMap<&'t str, Vec<u64>> {
    last.iter().map(|(t, n)| (*t, (1..=*n).collect())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_browser_event_source_over_many_topics_resumes_each_exactly_across_a_broker_crash() {
    if browser_available().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Durability::Fsync);
    let page = serve_page(Tokens::new(0)).await;
    allow_page(&mut config, page);
    let broker = start(config.clone()).await;
    let gate = Gate::to(broker.http_addr()).await;
    for topic in [ALPHA, BETA, EU] {
        publish_tokens(&broker, topic, 1..=3).await;
    }
    let before = epochs(&broker, &[ALPHA, BETA, EU]);

    let src = many_src(gate.addr, &[ALPHA, BETA]);
    let browser = Browser::launch().await;
    browser
        .navigate(&format!(
            "http://{page}/?types=token&src={}",
            encode_component(&src)
        ))
        .await;

    // Replay of the three stored topics, then live, with a topic the
    // pattern matches created while the page is connected.
    browser
        .wait_until("the 9 retained events", |s| s.offsets.len() >= 9)
        .await;
    for topic in [ALPHA, BETA, EU] {
        publish_tokens(&broker, topic, 4..=6).await;
    }
    publish_tokens(&broker, US, 1..=3).await;
    let connected = browser
        .wait_until("the 12 live events", |s| s.offsets.len() >= 21)
        .await;

    // A crash, with the gate shut: the browser's reconnect waits in it
    // while the broker comes back on the same addresses.
    gate.shut();
    let (http_addr, tcp_addr) = (broker.http_addr(), broker.tcp_addr());
    broker.kill().await;
    browser
        .wait_until("the browser saw the connection drop", |s| {
            s.count("error") >= 1
        })
        .await;
    config.server.http_listen = http_addr;
    config.server.tcp_listen = tcp_addr;
    let broker = start(config).await;
    assert_eq!(
        epochs(&broker, &[ALPHA, BETA, EU]),
        before,
        "the epochs survive the restart"
    );

    // Every topic moves on while the browser is away, and another topic the
    // pattern matches is created: it is not in the browser's last id.
    for topic in [ALPHA, BETA, EU] {
        publish_tokens(&broker, topic, 7..=9).await;
    }
    publish_tokens(&broker, US, 4..=6).await;
    publish_tokens(&broker, APAC, 1..=3).await;
    let away = browser.state().await;
    assert_eq!(
        (away.offsets.len(), away.count("ready")),
        (21, 1),
        "the gate held the browser's reconnect back: {}",
        away.raw
    );
    gate.open();
    browser
        .wait_until("the 15 events published while it was away", |s| {
            s.offsets.len() >= 36
        })
        .await;
    let heads = gate.heads();
    assert!(heads.len() >= 2, "a connection and a reconnect: {heads:?}");
    assert_eq!(header(&heads[0], "last-event-id"), None, "{}", heads[0]);
    assert_eq!(
        header(&heads[1], "last-event-id"),
        connected.ids.last().map(String::as_str),
        "the browser resumed on its own with the id of the last event it had"
    );

    // Live again on every topic, then each ends.
    for topic in [ALPHA, BETA, EU] {
        publish_tokens(&broker, topic, 10..=12).await;
    }
    publish_tokens(&broker, US, 7..=9).await;
    publish_tokens(&broker, APAC, 4..=6).await;
    let topics = [ALPHA, BETA, EU, US, APAC];
    for topic in topics {
        broker.engine().seal(topic).await.expect("seal");
    }
    let state = browser
        .wait_until("an end event for each topic", |s| s.ended().len() >= 5)
        .await;

    assert_eq!(
        state.by_topic(),
        offsets_up_to(&[(ALPHA, 12), (BETA, 12), (EU, 12), (US, 9), (APAC, 6)]),
        "every event of every topic exactly once, in offset order; page state: {}",
        state.raw
    );
    assert_eq!(state.count("gap"), 0, "no gap: {}", state.raw);
    let mut ended = state.ended();
    ended.sort_unstable();
    let mut all = topics.to_vec();
    all.sort_unstable();
    assert_eq!(ended, all, "one end per topic: {}", state.raw);
    assert!(
        state.count("ready") >= 2,
        "the browser reconnected on its own: {}",
        state.raw
    );

    // Each event's id holds its own topic at its offset (and the epoch),
    // so a reconnect after any of them resumes that topic right after it.
    let epochs = epochs(&broker, &topics);
    for ((topic, offset), id) in state.topics.iter().zip(&state.offsets).zip(&state.ids) {
        let positions = stream_positions(id, &[ALPHA, BETA], &[ORDERS_PREFIX]);
        let expected = IdPosition {
            epoch: epochs[topic.as_str()],
            offset: *offset,
            ended: false,
        };
        assert_eq!(
            positions.get(topic.as_str()),
            Some(&expected),
            "the id of {topic} offset {offset}: {positions:?}"
        );
    }
    drop(browser);
    broker.shutdown().await.expect("clean shutdown");
}

/// How the page's handlers for `error` (token_expired), `gap` and `end`
/// work on a stream over several topics: its token expires; while it has
/// none, a named topic is deleted and re-created; the renewed stream
/// resumes with one gap for that topic (epoch_changed), then the new
/// topic from its first event, every other event exactly once, and ends
/// with one `end` per topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_over_many_topics_renews_its_token_and_reports_a_gap_and_each_end() {
    if browser_available().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::new(2);
    let page = serve_page(tokens.clone()).await;
    let mut config = common::auth::hs256_config(config(dir.path(), Durability::Memory), dir.path());
    allow_page(&mut config, page);
    let broker = start(config).await;
    for topic in [ALPHA, EU] {
        publish_tokens(&broker, topic, 1..=3).await;
    }
    let old_epoch = epochs(&broker, &[ALPHA])[ALPHA];

    let src = many_src(broker.http_addr(), &[ALPHA]);
    let browser = Browser::launch().await;
    tokens.allow(1);
    browser
        .navigate(&format!(
            "http://{page}/?types=token&renew=/token&auth=query&src={}",
            encode_component(&src)
        ))
        .await;
    browser
        .wait_until("the 6 retained events", |s| s.offsets.len() >= 6)
        .await;

    // The token expires; while the page waits for a new one, ALPHA is
    // deleted and re-created (a new epoch) and both topics move on.
    browser
        .wait_until("token_expired", |s| s.count("expired") >= 1)
        .await;
    assert_eq!(tokens.issued(), 1);
    broker.engine().delete(ALPHA).await.expect("delete");
    publish_tokens(&broker, ALPHA, 1..=2).await;
    publish_tokens(&broker, EU, 4..=5).await;
    let new_epoch = epochs(&broker, &[ALPHA])[ALPHA];
    assert_ne!(new_epoch, old_epoch);
    tokens.allow(1);
    let state = browser
        .wait_until(
            "the gap and the events published while it had no token",
            |s| s.count("gap") >= 1 && s.offsets.len() >= 10,
        )
        .await;
    assert!(state.count("renewed") >= 1, "{}", state.raw);
    let gap = &state.raw["gaps"][0];
    assert_eq!(
        (gap["topic"].as_str(), gap["reason"].as_str()),
        (Some(ALPHA), Some("epoch_changed")),
        "{}",
        state.raw
    );
    // The gap's id moves ALPHA to the new epoch, before its first event
    // (which follows), so a reconnect after it neither repeats the gap nor
    // skips the new topic's events.
    let at_gap = stream_positions(
        gap["lastEventId"].as_str().expect("the gap has an id"),
        &[ALPHA],
        &[ORDERS_PREFIX],
    );
    assert_eq!(
        at_gap[ALPHA],
        IdPosition {
            epoch: new_epoch,
            offset: 0,
            ended: false
        },
        "{at_gap:?}"
    );

    tokens.allow(1000);
    publish_tokens(&broker, ALPHA, 3..=4).await;
    publish_tokens(&broker, EU, 6..=6).await;
    for topic in [ALPHA, EU] {
        broker.engine().seal(topic).await.expect("seal");
    }
    let state = browser
        .wait_until("an end event for each topic", |s| s.ended().len() >= 2)
        .await;
    let mut expected = offsets_up_to(&[(EU, 6)]);
    // The old epoch's 1..=3, then the gap, then the new epoch's from its
    // first.
    expected.insert(ALPHA, vec![1, 2, 3, 1, 2, 3, 4]);
    assert_eq!(state.by_topic(), expected, "{}", state.raw);
    assert_eq!(state.count("gap"), 1, "{}", state.raw);
    let mut ended = state.ended();
    ended.sort_unstable();
    assert_eq!(ended, [ALPHA, EU], "{}", state.raw);
    assert_eq!(state.raw["failed"], json!([]), "{}", state.raw);
    drop(browser);
    broker.shutdown().await.expect("clean shutdown");
}

/// `encodeURIComponent` for the characters a URL here can contain.
fn encode_component(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An operator closes the page's stream (`DELETE /v1/connections/{id}`):
/// the page is told `shutdown`, its `EventSource` reconnects on its own with
/// the last event id, and every event — those published while it was
/// reconnecting included — arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_stream_closed_by_an_operator_resumes_by_itself() {
    if browser_available().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Durability::Memory);
    let page = serve_page(Tokens::new(0)).await;
    allow_page(&mut config, page);
    let broker = start(config).await;
    publish_tokens(&broker, ALPHA, 1..=3).await;
    publish_tokens(&broker, EU, 1..=3).await;

    let src = many_src(broker.http_addr(), &[ALPHA]);
    let browser = Browser::launch().await;
    browser
        .navigate(&format!(
            "http://{page}/?types=token&src={}",
            encode_component(&src)
        ))
        .await;
    browser
        .wait_until("the 6 retained events", |s| s.offsets.len() >= 6)
        .await;

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://{}/v1/connections", broker.http_addr());
    let listed: Value = http.get(&base).send().await.unwrap().json().await.unwrap();
    let sse: Vec<&Value> = listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "sse")
        .collect();
    assert_eq!(sse.len(), 1, "{listed}");
    let id = sse[0]["id"].as_u64().unwrap();
    let closed = http
        .delete(format!("{base}/{id}"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(closed, reqwest::StatusCode::NO_CONTENT);
    // Published at once: the page is reconnecting (its `retry:` is 2 s).
    publish_tokens(&broker, ALPHA, 4..=5).await;
    publish_tokens(&broker, EU, 4..=5).await;

    let state = browser
        .wait_until("the events published after the close", |s| {
            s.offsets.len() >= 10
        })
        .await;
    assert!(state.count("shutdown") >= 1, "told shutdown: {}", state.raw);
    assert!(state.count("ready") >= 2, "reconnected: {}", state.raw);
    assert_eq!(
        state.by_topic(),
        offsets_up_to(&[(ALPHA, 5), (EU, 5)]),
        "every event exactly once: {}",
        state.raw
    );
    assert_eq!(state.count("gap"), 0, "{}", state.raw);
    drop(browser);
    broker.shutdown().await.expect("clean shutdown");
}
