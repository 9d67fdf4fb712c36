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

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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
                 readyState: window.es.readyState, log: window.log};",
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
    raw: Value,
}

impl PageState {
    fn count(&self, kind: &str) -> u64 {
        self.raw["counts"][kind].as_u64().unwrap_or(0)
    }

    fn ready_state(&self) -> u64 {
        self.raw["readyState"].as_u64().unwrap_or(u64::MAX)
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
