//! `ringcastd` itself, as a child process: systemd notifications, graceful
//! and abrupt shutdown, config errors and the start log line.
//!
//! Every daemon listens on port 0 and reports its addresses through the
//! systemd notification socket (`READY=1` + `STATUS=serving tcp=… http=…`),
//! which these tests bind themselves; so readiness is an awaited event, not a
//! guess.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{hello, ringcastd, write_msg, Frames, RawClient};
use ringcast_protocol::{Ack, ClientMessage, ErrorCode, NewEvent, ServerMessage, Start};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixDatagram};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch, Semaphore};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Awaits `f`, failing the test with `what` after `secs` seconds.
async fn before<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs}s waiting for {what}"),
    }
}

// ---------------------------------------------------------------------------
// The daemon as a child process.
// ---------------------------------------------------------------------------

/// What to start: a data dir plus extra environment and flags.
struct Launch {
    data_dir: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl Launch {
    fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            env: Vec::new(),
            args: Vec::new(),
        }
    }

    fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Spawns the daemon and waits for `READY=1`.
    async fn start(self) -> Daemon {
        let notify_dir = tempfile::tempdir().unwrap();
        let socket_path = notify_dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
        let mut cmd = ringcastd();
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--tcp-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(&self.args)
            .env("NOTIFY_SOCKET", &socket_path)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ringcastd");
        let pid = child.id().expect("a running child has a pid");
        let (tx, stderr) = mpsc::unbounded_channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        // Drained at all times, so a chatty daemon never blocks on a full pipe.
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Daemon {
            child,
            pid,
            notify,
            _notify_dir: notify_dir,
            datagrams: Vec::new(),
            stderr,
            stderr_seen: Vec::new(),
            tcp: "0.0.0.0:0".parse().unwrap(),
            http: "0.0.0.0:0".parse().unwrap(),
            status: BTreeMap::new(),
        };
        let ready = daemon.await_ready().await;
        let status = ready
            .lines()
            .find_map(|l| l.strip_prefix("STATUS="))
            .unwrap_or_else(|| panic!("READY=1 came without STATUS=: {ready:?}"));
        let mut words = status.split_whitespace();
        assert_eq!(words.next(), Some("serving"), "status {status:?}");
        daemon.status = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        daemon.tcp = daemon
            .status_value("tcp")
            .parse()
            .expect("tcp= is an address");
        daemon.http = daemon
            .status_value("http")
            .parse()
            .expect("http= is an address");
        daemon
    }
}

struct Daemon {
    child: Child,
    pid: u32,
    notify: UnixDatagram,
    _notify_dir: tempfile::TempDir,
    /// Every notification received so far, in order.
    datagrams: Vec<String>,
    stderr: mpsc::UnboundedReceiver<String>,
    /// Every stderr line read so far, in order.
    stderr_seen: Vec<String>,
    tcp: SocketAddr,
    http: SocketAddr,
    /// The key=value words of the `READY=1` datagram's `STATUS=`.
    status: BTreeMap<String, String>,
}

impl Daemon {
    fn status_value(&self, key: &str) -> &str {
        self.status
            .get(key)
            .unwrap_or_else(|| panic!("STATUS= has no {key}=: {:?}", self.status))
    }

    /// The next notification datagram; fails if the daemon exits first.
    async fn next_datagram(&mut self, secs: u64, what: &str) -> String {
        let mut buf = vec![0u8; 4096];
        let received = tokio::select! {
            // Datagrams sent before an exit are still delivered.
            biased;
            r = self.notify.recv(&mut buf) => r.expect("receive a notification"),
            status = self.child.wait() => {
                let lines = self.drain_stderr().await;
                panic!("ringcastd exited ({status:?}) while waiting for {what}; stderr:\n{}", lines.join("\n"))
            }
            _ = tokio::time::sleep(Duration::from_secs(secs)) => {
                panic!("no notification within {secs}s while waiting for {what}; got so far: {:?}", self.datagrams)
            }
        };
        let text = String::from_utf8(buf[..received].to_vec()).expect("notifications are UTF-8");
        self.datagrams.push(text.clone());
        text
    }

    /// Receives notifications until one has `state` as one of its lines.
    async fn await_notification(&mut self, state: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).as_secs() + 1;
            let d = self.next_datagram(left, state).await;
            if d.lines().any(|l| l == state) {
                return d;
            }
        }
    }

    async fn await_ready(&mut self) -> String {
        self.await_notification("READY=1", 120).await
    }

    /// Sends `signal` (e.g. `TERM`) to the daemon with kill(1).
    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -{signal} {} failed", self.pid);
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the daemon to exit, within `secs`.
    async fn exit(&mut self, secs: u64) -> ExitStatus {
        match tokio::time::timeout(Duration::from_secs(secs), self.child.wait()).await {
            Ok(status) => status.expect("wait for ringcastd"),
            Err(_) => {
                let _ = self.child.start_kill();
                let lines = self.drain_stderr().await;
                panic!(
                    "ringcastd did not exit within {secs}s; stderr:\n{}",
                    lines.join("\n")
                )
            }
        }
    }

    /// SIGTERM, then the exit status (which must come within `secs`).
    async fn stop(&mut self, secs: u64) -> ExitStatus {
        self.signal("TERM");
        self.exit(secs).await
    }

    /// Reads stderr until a line contains `needle`; returns that line.
    async fn await_log(&mut self, needle: &str, secs: u64) -> String {
        let wait = async {
            loop {
                match self.stderr.recv().await {
                    Some(line) => {
                        self.stderr_seen.push(line.clone());
                        if line.contains(needle) {
                            return line;
                        }
                    }
                    None => panic!(
                        "stderr ended before a line with {needle:?}:\n{}",
                        self.stderr_seen.join("\n")
                    ),
                }
            }
        };
        before(secs, needle, wait).await
    }

    /// Every stderr line (the rest is read once the daemon has exited).
    async fn drain_stderr(&mut self) -> Vec<String> {
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(5), self.stderr.recv()).await
        {
            self.stderr_seen.push(line);
        }
        self.stderr_seen.clone()
    }
}

// ---------------------------------------------------------------------------
// Raw protocol and HTTP over a socket.
// ---------------------------------------------------------------------------

/// `GET path` with HTTP/1.1 over a fresh connection: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("HTTP connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("HTTP write");
    let mut response = Vec::new();
    before(20, "an HTTP response", s.read_to_end(&mut response))
        .await
        .expect("HTTP read");
    let text = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

/// Every retained event of `topic`, paged with `History`: offset -> (type, version).
async fn retained(addr: SocketAddr, topic: &str) -> (u64, BTreeMap<u64, (String, u64)>) {
    let mut c = RawClient::handshake(addr).await;
    c.send(&ClientMessage::TopicInfo {
        request_id: 1,
        topic: topic.into(),
    })
    .await;
    let (epoch, last_offset) = match c.recv().await {
        Some(ServerMessage::TopicInfo { info, .. }) => (info.epoch, info.last_offset),
        other => panic!("expected topic info of {topic}, got {other:?}"),
    };
    let mut events = BTreeMap::new();
    let mut after = 0;
    for request_id in 2.. {
        c.send(&ClientMessage::History {
            request_id,
            topic: topic.into(),
            after,
            types: vec![],
            limit: 1_000,
        })
        .await;
        match c.recv().await {
            Some(ServerMessage::History {
                request_id: r,
                events: page,
                next_after,
                ..
            }) => {
                assert_eq!(r, request_id);
                if page.is_empty() {
                    break;
                }
                for e in page {
                    assert!(e.offset > after, "history goes forward");
                    events.insert(e.offset, (e.event_type, e.version));
                }
                after = next_after;
            }
            other => panic!("expected history, got {other:?}"),
        }
    }
    assert_eq!(
        events.keys().next_back().copied().unwrap_or(0),
        last_offset,
        "history of {topic} reaches the last offset"
    );
    (epoch, events)
}

/// An acknowledged publish.
#[derive(Debug, Clone)]
struct Acked {
    topic: String,
    event_type: String,
    ack: Ack,
}

/// Checks that every acknowledged event is retained by the daemon at
/// `addr`, at its offset, with its type and version, in the same epoch.
async fn assert_all_retained(addr: SocketAddr, acked: &[Acked]) {
    let mut by_topic: HashMap<&str, Vec<&Acked>> = HashMap::new();
    for a in acked {
        by_topic.entry(&a.topic).or_default().push(a);
    }
    for (topic, acks) in by_topic {
        let (epoch, events) = retained(addr, topic).await;
        for a in acks {
            assert_eq!(a.ack.epoch, epoch, "{topic} kept its epoch");
            match events.get(&a.ack.offset) {
                Some((t, v)) => assert_eq!(
                    (t.as_str(), *v),
                    (a.event_type.as_str(), a.ack.version),
                    "{topic} offset {} has the acknowledged type and version",
                    a.ack.offset
                ),
                None => panic!(
                    "acknowledged event {topic}@{} is missing after restart ({} retained)",
                    a.ack.offset,
                    events.len()
                ),
            }
        }
    }
}

/// How a pipelined publisher's connection ended.
#[derive(Debug)]
struct PublisherEnd {
    acked: Vec<Acked>,
    saw_shutdown: bool,
}

/// Publishes to `topic` over one connection, up to 64 in flight, until the
/// server closes it; every ack is counted in `progress`.
async fn publish_until_closed(
    addr: SocketAddr,
    topic: String,
    types: [&'static str; 2],
    progress: Arc<watch::Sender<u64>>,
) -> PublisherEnd {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    write_msg(&mut stream, &hello()).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut frames = Frames::new(rd);
    match frames.next().await {
        Some(ServerMessage::Welcome { .. }) => {}
        other => panic!("expected welcome, got {other:?}"),
    }
    let window = Arc::new(Semaphore::new(64));
    let sent: Arc<SentTypes> = Arc::default();
    let writer = {
        let (window, sent, topic) = (window.clone(), sent.clone(), topic.clone());
        tokio::spawn(async move {
            for request_id in 1u64.. {
                let Ok(permit) = window.acquire().await else {
                    return;
                };
                permit.forget();
                let event_type = types[(request_id % 2) as usize];
                sent.record(request_id, event_type);
                let msg = ClientMessage::Publish {
                    request_id,
                    topic: topic.clone(),
                    event_type: event_type.into(),
                    headers: vec![],
                    payload: Bytes::from(format!("{{\"n\":{request_id}}}")),
                };
                if write_msg(&mut wr, &msg).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut end = PublisherEnd {
        acked: Vec::new(),
        saw_shutdown: false,
    };
    let read = async {
        while let Some(msg) = frames.next().await {
            match msg {
                ServerMessage::Published {
                    request_id,
                    results,
                } => {
                    assert!(
                        !end.saw_shutdown,
                        "an ack ({request_id}) came after the Shutdown frame"
                    );
                    assert_eq!(results.len(), 1);
                    end.acked.push(Acked {
                        topic: topic.clone(),
                        event_type: sent.type_of(request_id).into(),
                        ack: results[0],
                    });
                    window.add_permits(1);
                    progress.send_modify(|n| *n += 1);
                }
                ServerMessage::Error {
                    request_id: Some(_),
                    code: ErrorCode::ShuttingDown,
                    ..
                } => window.add_permits(1),
                ServerMessage::Shutdown { reason } => {
                    assert!(!end.saw_shutdown, "a second Shutdown frame");
                    assert!(!reason.is_empty());
                    end.saw_shutdown = true;
                }
                other => panic!("unexpected message while publishing: {other:?}"),
            }
        }
    };
    before(60, "the publisher's connection to close", read).await;
    window.close();
    let _ = writer.await;
    end
}

/// Which type each request id was published with (the writer and the reader
/// are different tasks).
#[derive(Default)]
struct SentTypes(std::sync::Mutex<HashMap<u64, &'static str>>);

impl SentTypes {
    fn record(&self, request_id: u64, event_type: &'static str) {
        self.0.lock().unwrap().insert(request_id, event_type);
    }

    fn type_of(&self, request_id: u64) -> &'static str {
        self.0
            .lock()
            .unwrap()
            .get(&request_id)
            .copied()
            .unwrap_or_else(|| panic!("an ack for request {request_id}, never sent"))
    }
}

/// Removes ANSI colour sequences (`ESC [ … m`) from a log line.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// systemd.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn ready_is_notified_once_both_listeners_serve_and_stopping_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let mut d = Launch::new(data.path()).start().await;

    // At the moment READY=1 arrives, both listeners answer.
    assert!(d.status.contains_key("topics") && d.status.contains_key("events"));
    let _client = before(20, "a TCP welcome", RawClient::handshake(d.tcp)).await;
    let (status, body) = http_get(d.http, "/readyz").await;
    assert_eq!(status, 200, "readyz: {body}");
    assert!(body.contains("ready"), "{body}");
    let (status, _) = http_get(d.http, "/healthz").await;
    assert_eq!(status, 200);
    let ready_at = d.datagrams.len() - 1;
    assert!(
        d.datagrams[..ready_at]
            .iter()
            .all(|g| !g.lines().any(|l| l == "READY=1")),
        "READY=1 is sent once: {:?}",
        d.datagrams
    );

    d.signal("TERM");
    let stopping = d.await_notification("STOPPING=1", 30).await;
    assert!(stopping.contains("STATUS="), "{stopping:?}");
    let status = d.exit(30).await;
    assert_eq!(status.code(), Some(0), "a graceful stop exits 0");
    assert!(
        d.datagrams.iter().all(|g| !g.contains("WATCHDOG=1")),
        "no watchdog pings unless systemd asks: {:?}",
        d.datagrams
    );
}

/// systemd may stop a unit the moment it is ready (`systemctl restart`
/// twice in a row); that stop must be as graceful as any other. Several
/// rounds, because a missing handler only loses a race.
#[tokio::test]
async fn sigterm_right_after_ready_is_a_graceful_stop() {
    for round in 0..20 {
        let data = tempfile::tempdir().unwrap();
        let mut d = Launch::new(data.path()).start().await;
        d.signal("TERM");
        let status = d.exit(30).await;
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: SIGTERM right after READY=1 ended ringcastd with {status} \
             (a signal handler installed after READY=1?)"
        );
        // Sent before the exit, so already queued on the socket.
        d.await_notification("STOPPING=1", 5).await;
    }
}

#[tokio::test]
async fn the_watchdog_is_pinged_when_systemd_asks_for_it() {
    let data = tempfile::tempdir().unwrap();
    let mut d = Launch::new(data.path())
        .env("WATCHDOG_USEC", "200000")
        .start()
        .await;
    for _ in 0..3 {
        d.await_notification("WATCHDOG=1", 10).await;
    }
    assert_eq!(d.stop(30).await.code(), Some(0));
}

// ---------------------------------------------------------------------------
// Shutdown.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_acknowledged_event_and_exits_0_in_time() {
    let data = tempfile::tempdir().unwrap();
    let launch = || {
        Launch::new(data.path())
            .arg("--durability")
            .arg("fsync")
            .env("RINGCAST_SERVER_SHUTDOWN_TIMEOUT", "5s")
            .env("RINGCAST_TOPICS_MAX_EVENTS", "1000000")
    };
    let mut d = launch().start().await;
    let (progress, mut acks) = watch::channel(0u64);
    let progress = Arc::new(progress);
    let publishers: Vec<_> = (0..4)
        .map(|i| {
            let topic = format!("load-{}", i % 2);
            tokio::spawn(publish_until_closed(
                d.tcp,
                topic,
                ["created", "paid"],
                progress.clone(),
            ))
        })
        .collect();
    before(120, "500 acks", acks.wait_for(|n| *n >= 500))
        .await
        .unwrap();

    d.signal("TERM");
    let signalled = Instant::now();
    let status = d.exit(60).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "a graceful stop exits 0");
    assert!(
        took < Duration::from_secs(5 + 5),
        "exited {took:?} after SIGTERM; shutdown_timeout is 5s"
    );
    let mut acked = Vec::new();
    for p in publishers {
        let end = p.await.expect("publisher task");
        assert!(
            end.saw_shutdown,
            "every connected client is told with a Shutdown frame before the close"
        );
        acked.extend(end.acked);
    }
    assert!(acked.len() >= 500);

    let mut d = launch().start().await;
    assert_all_retained(d.tcp, &acked).await;
    assert_eq!(d.stop(30).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_with_130_and_storage_recovers() {
    let data = tempfile::tempdir().unwrap();
    let launch = || {
        Launch::new(data.path())
            .arg("--durability")
            .arg("fsync")
            // A graceful stop waits (up to 3 heartbeats) for a client that
            // does not read: long enough that only the second signal ends it.
            .env("RINGCAST_SERVER_HEARTBEAT", "60s")
            .env("RINGCAST_SERVER_SHUTDOWN_TIMEOUT", "300s")
    };
    let mut d = launch().start().await;

    // A subscriber with a tiny receive buffer that never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(d.tcp).await.expect("connect");
    write_msg(&mut stalled, &hello()).await.unwrap();
    write_msg(
        &mut stalled,
        &ClientMessage::Subscribe {
            request_id: 1,
            subscription_id: 1,
            topic: "big".into(),
            types: vec![],
            start: Start::Live,
        },
    )
    .await
    .unwrap();
    {
        let mut frames = Frames::new(&mut stalled);
        assert!(matches!(
            frames.next().await,
            Some(ServerMessage::Welcome { .. })
        ));
        assert!(matches!(
            frames.next().await,
            Some(ServerMessage::Subscribed { .. })
        ));
    }

    // 16 MiB published: far more than the socket buffers hold.
    let mut publisher = RawClient::handshake(d.tcp).await;
    let batch = |request_id| ClientMessage::PublishBatch {
        request_id,
        topic: "big".into(),
        events: (0..32)
            .map(|_| NewEvent {
                event_type: "chunk".into(),
                headers: vec![],
                payload: Bytes::from(vec![b'x'; 16 * 1024]),
            })
            .collect(),
    };
    let mut acked = Vec::new();
    for request_id in 1..=32 {
        publisher.send(&batch(request_id)).await;
        match publisher.recv().await {
            Some(ServerMessage::Published { results, .. }) => {
                acked.extend(results.into_iter().map(|ack| Acked {
                    topic: "big".into(),
                    event_type: "chunk".into(),
                    ack,
                }))
            }
            other => panic!("expected acks, got {other:?}"),
        }
    }

    d.signal("TERM");
    d.await_notification("STOPPING=1", 30).await;
    assert!(
        d.still_running(),
        "the graceful stop is held open by the stalled client"
    );
    d.signal("TERM");
    let signalled = Instant::now();
    let status = d.exit(30).await;
    assert_eq!(status.code(), Some(130), "the second signal exits with 130");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "the second signal exits at once, not after {:?}",
        signalled.elapsed()
    );
    drop(stalled);

    let mut d = launch().start().await;
    assert_eq!(
        d.status_value("events"),
        acked.len().to_string(),
        "every acknowledged event is recovered"
    );
    assert_all_retained(d.tcp, &acked).await;
    assert_eq!(d.stop(30).await.code(), Some(0));
}

// ---------------------------------------------------------------------------
// Config errors and flags.
// ---------------------------------------------------------------------------

/// Runs `ringcastd` to completion: (exit status, stdout, stderr lines).
async fn run_to_end(cmd: &mut Command) -> (ExitStatus, String, Vec<String>) {
    let out = before(60, "ringcastd to exit", cmd.output())
        .await
        .expect("run ringcastd");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 stdout");
    let stderr = String::from_utf8(out.stderr).expect("UTF-8 stderr");
    (
        out.status,
        stdout,
        stderr.lines().map(str::to_owned).collect(),
    )
}

/// Asserts that `cmd` fails with exactly one stderr line naming `key`.
async fn assert_fails_naming(cmd: &mut Command, key: &str) {
    let (status, _, stderr) = run_to_end(cmd).await;
    assert!(!status.success(), "{key}: expected a failure, got {status}");
    assert_eq!(
        stderr.len(),
        1,
        "{key}: exactly one stderr line: {stderr:#?}"
    );
    assert!(
        stderr[0].contains(key),
        "the error names {key:?}: {:?}",
        stderr[0]
    );
}

#[tokio::test]
async fn a_bad_config_is_one_stderr_line_naming_the_key_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let with_config = |path: &Path| {
        let mut cmd = ringcastd();
        cmd.arg("--config").arg(path).arg("--data-dir").arg(&data);
        cmd
    };

    let bad_value = file("bad-value.toml", "[topics]\nmax_events = \"many\"\n");
    assert_fails_naming(&mut with_config(&bad_value), "topics.max_events").await;

    let unknown = file("unknown.toml", "[server]\nlisten_tcp = \"127.0.0.1:1\"\n");
    assert_fails_naming(&mut with_config(&unknown), "server.listen_tcp").await;

    let nonsense = file("nonsense.toml", "[limits]\nmax_frame = \"1KiB\"\n");
    assert_fails_naming(&mut with_config(&nonsense), "limits.max_frame").await;

    let not_toml = file("not-toml.toml", "[topics\nmax_events = 1\n");
    assert_fails_naming(&mut with_config(&not_toml), "not-toml.toml").await;

    let mut bad_env = ringcastd();
    bad_env
        .arg("--data-dir")
        .arg(&data)
        .env("RINGCAST_TOPICS_MAX_EVENTS", "lots");
    assert_fails_naming(&mut bad_env, "topics.max_events").await;

    let mut bad_flag = ringcastd();
    bad_flag.args(["--durability", "sometimes"]);
    assert_fails_naming(&mut bad_flag, "--durability").await;

    let mut unknown_flag = ringcastd();
    unknown_flag.arg("--tcp-listne");
    assert_fails_naming(&mut unknown_flag, "--tcp-listne").await;

    assert!(!data.exists(), "a refused config touches no data dir");
}

#[tokio::test]
async fn print_config_prints_the_shipped_config_and_check_config_accepts_it() {
    let shipped_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ringcast.toml");
    let shipped = std::fs::read_to_string(&shipped_path).unwrap();

    let (status, stdout, stderr) = run_to_end(ringcastd().arg("--print-config")).await;
    assert!(status.success(), "{stderr:?}");
    assert_eq!(
        stdout, shipped,
        "--print-config prints config/ringcast.toml"
    );

    let dir = tempfile::tempdir().unwrap();
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &stdout).unwrap();
    for path in [&shipped_path, &printed] {
        let (status, stdout, stderr) =
            run_to_end(ringcastd().arg("--check-config").arg("--config").arg(path)).await;
        assert!(status.success(), "{}: {stderr:?}", path.display());
        assert_eq!(stdout.trim(), "config ok");
    }
}

// ---------------------------------------------------------------------------
// The start log line.
// ---------------------------------------------------------------------------

async fn publish_some(addr: SocketAddr) {
    let mut c = RawClient::handshake(addr).await;
    for (request_id, topic) in [(1, "a"), (2, "a"), (3, "b")] {
        c.send(&ClientMessage::Publish {
            request_id,
            topic: topic.into(),
            event_type: "t".into(),
            headers: vec![],
            payload: Bytes::from_static(b"{}"),
        })
        .await;
        assert!(matches!(
            c.recv().await,
            Some(ServerMessage::Published { .. })
        ));
    }
}

#[tokio::test]
async fn the_start_line_names_version_listeners_data_dir_durability_and_recovered_counts() {
    let data = tempfile::tempdir().unwrap();
    let mut d = Launch::new(data.path()).start().await;
    publish_some(d.tcp).await;
    assert_eq!(d.stop(30).await.code(), Some(0));

    let mut d = Launch::new(data.path()).start().await;
    let line = strip_ansi(&d.await_log("ringcastd started", 30).await);
    for part in [
        VERSION.to_owned(),
        format!("tcp={}", d.tcp),
        format!("http={}", d.http),
        format!("data_dir={}", data.path().display()),
        "durability=fsync".to_owned(),
        "topics=2".to_owned(),
        "events=3".to_owned(),
    ] {
        assert!(line.contains(&part), "{part:?} missing from {line:?}");
    }
    assert!(line.contains("INFO"), "{line:?}");
    assert_eq!(
        (d.status_value("topics"), d.status_value("events")),
        ("2", "3")
    );
    assert_eq!(d.stop(30).await.code(), Some(0));
}

#[tokio::test]
async fn json_log_format_writes_one_json_object_per_line() {
    let data = tempfile::tempdir().unwrap();
    let mut d = Launch::new(data.path())
        .env("RINGCAST_LOG_FORMAT", "json")
        .start()
        .await;
    d.await_log("ringcastd started", 30).await;
    publish_some(d.tcp).await;
    assert_eq!(d.stop(30).await.code(), Some(0));
    let lines = d.drain_stderr().await;
    let objects: Vec<Value> = lines
        .iter()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}"));
            assert!(v.is_object(), "{l:?} is not an object");
            v
        })
        .collect();
    let started = objects
        .iter()
        .find(|o| o["fields"]["message"] == "ringcastd started")
        .expect("a start line");
    let fields = &started["fields"];
    assert_eq!(started["level"], "INFO");
    assert_eq!(fields["version"], VERSION);
    assert_eq!(fields["tcp"], d.tcp.to_string());
    assert_eq!(fields["http"], d.http.to_string());
    assert_eq!(fields["data_dir"], data.path().display().to_string());
    assert_eq!(fields["durability"], "fsync");
    assert_eq!(
        (fields["topics"].as_u64(), fields["events"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(
        objects
            .iter()
            .any(|o| o["fields"]["message"] == "shutting down"),
        "the stop is logged as JSON too"
    );
}

// ---------------------------------------------------------------------------
// Access control: secure by default, key rotation by SIGHUP.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_non_loopback_listener_without_auth_is_refused_with_one_line_saying_how() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut open = ringcastd();
    open.arg("--data-dir").arg(&data).args([
        "--tcp-listen",
        "0.0.0.0:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    let (status, _, stderr) = run_to_end(&mut open).await;
    assert_eq!(
        status.code(),
        Some(2),
        "a refused config exits 2: {stderr:?}"
    );
    assert_eq!(stderr.len(), 1, "exactly one line: {stderr:#?}");
    for needle in [
        "0.0.0.0:0",
        "server.tcp_listen",
        "[auth]",
        "auth.allow_anonymous_remote = true",
    ] {
        assert!(stderr[0].contains(needle), "{needle:?} in {:?}", stderr[0]);
    }
    assert!(!data.exists(), "a refused config touches no data dir");

    // The explicit opt-out, and auth itself, both make the same listener fine.
    let mut opted = ringcastd();
    opted
        .arg("--data-dir")
        .arg(&data)
        .args(["--tcp-listen", "0.0.0.0:0", "--check-config"])
        .env("RINGCAST_AUTH_ALLOW_ANONYMOUS_REMOTE", "true");
    let (status, stdout, stderr) = run_to_end(&mut opted).await;
    assert!(status.success(), "opted out: {stderr:?}");
    assert_eq!(stdout.trim(), "config ok");
    let secret = dir.path().join("jwt.secret");
    std::fs::write(&secret, common::auth::SECRET).unwrap();
    let config = dir.path().join("auth.toml");
    std::fs::write(
        &config,
        format!(
            "[auth.jwt]\nsecret_file = {:?}\n",
            secret.display().to_string()
        ),
    )
    .unwrap();
    let mut with_auth = ringcastd();
    with_auth
        .arg("--config")
        .arg(&config)
        .args(["--http-listen", "0.0.0.0:0", "--check-config"]);
    let (status, _, stderr) = run_to_end(&mut with_auth).await;
    assert!(status.success(), "with [auth.jwt]: {stderr:?}");
}

#[tokio::test]
async fn an_unreadable_key_file_is_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("auth.toml");
    std::fs::write(
        &config,
        "[auth.jwt]\njwks_file = \"/nonexistent/jwks.json\"\n",
    )
    .unwrap();
    let mut cmd = ringcastd();
    cmd.arg("--config").arg(&config).arg("--check-config");
    assert_fails_naming(&mut cmd, "auth.jwt.jwks_file").await;
}

/// Hello with `token`: `Ok(())` on Welcome, else the error code.
async fn hello_with(addr: SocketAddr, token: &str) -> Result<(), ErrorCode> {
    let mut c = RawClient::connect(addr).await;
    c.send(&ClientMessage::Hello {
        protocol_version: ringcast_protocol::PROTOCOL_VERSION,
        client_name: "daemon-test".into(),
        credentials: Some(token.into()),
    })
    .await;
    match before(10, "the hello reply", c.recv()).await {
        Some(ServerMessage::Welcome { .. }) => Ok(()),
        Some(ServerMessage::Error { code, .. }) => Err(code),
        other => panic!("expected Welcome or Error, got {other:?}"),
    }
}

#[tokio::test]
async fn sighup_rotates_jwks_keys_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    common::auth::write_jwks(&jwks, &[("old", "rsa.key")]);
    let config = dir.path().join("auth.toml");
    std::fs::write(
        &config,
        format!("[auth.jwt]\njwks_file = {:?}\n", jwks.display().to_string()),
    )
    .unwrap();
    let mut daemon = Launch::new(&dir.path().join("data"))
        .arg("--config")
        .arg(config.to_str().unwrap())
        .start()
        .await;
    let claims = serde_json::json!({
        "sub": "u1",
        "exp": ringcast::auth::unix_now() + 600,
        "ringcast": {"subscribe": ["*"]},
    });
    let old = common::auth::rs256("rsa.key", Some("old"), &claims);
    let new = common::auth::rs256("rsa2.key", Some("new"), &claims);
    assert_eq!(hello_with(daemon.tcp, &old).await, Ok(()));
    assert_eq!(
        hello_with(daemon.tcp, &new).await,
        Err(ErrorCode::Unauthorized)
    );

    common::auth::write_jwks(&jwks, &[("new", "rsa2.key")]);
    daemon.signal("HUP");
    daemon.await_log("JWT keys reloaded", 10).await;
    assert_eq!(
        hello_with(daemon.tcp, &new).await,
        Ok(()),
        "the new key works"
    );
    assert_eq!(
        hello_with(daemon.tcp, &old).await,
        Err(ErrorCode::Unauthorized),
        "the removed key's tokens are refused"
    );

    // A broken file keeps the keys in use, and the daemon keeps serving.
    std::fs::write(&jwks, "{ not json").unwrap();
    daemon.signal("HUP");
    daemon.await_log("keeping the JWT keys in use", 10).await;
    assert_eq!(hello_with(daemon.tcp, &new).await, Ok(()));
    assert!(daemon.stop(30).await.success());
}

// ---------------------------------------------------------------------------
// Exactly once across kill -9
// ---------------------------------------------------------------------------

/// An `Append` of one event whose payload is its key.
fn keyed_append(request_id: u64) -> ClientMessage {
    let key = format!("key-{request_id}");
    ClientMessage::Append {
        request_id,
        topic: "once".into(),
        events: vec![ringcast_protocol::AppendEvent {
            event_type: "e".into(),
            headers: Vec::new(),
            payload: Bytes::from(key.clone()),
            idempotency_key: Some(key),
        }],
        expected_offset: None,
        expected_version: None,
    }
}

/// The next `Appended`, as (request id, offset, duplicate).
async fn appended(c: &mut RawClient) -> (u64, u64, bool) {
    match c.recv().await {
        Some(ServerMessage::Appended {
            request_id,
            results,
        }) if results.len() == 1 => (request_id, results[0].offset, results[0].duplicate),
        other => panic!("expected Appended, got {other:?}"),
    }
}

#[tokio::test]
async fn keyed_retries_after_kill_9_in_fsync_mode_store_each_event_once() {
    const SENT: u64 = 300;
    const READ: u64 = 100;
    let data = tempfile::tempdir().unwrap();
    let launch = || Launch::new(data.path()).arg("--durability").arg("fsync");
    let mut d = launch().start().await;
    let mut c = RawClient::handshake(d.tcp).await;
    for id in 1..=SENT {
        c.send(&keyed_append(id)).await;
    }
    // Some acks read; the rest in flight when the broker dies.
    let mut acked = BTreeMap::new();
    for _ in 0..READ {
        let (id, offset, duplicate) = appended(&mut c).await;
        assert!(!duplicate);
        acked.insert(id, offset);
    }
    d.signal("KILL");
    d.exit(30).await;

    let d = launch().start().await;
    let mut c = RawClient::handshake(d.tcp).await;
    // The publisher retries everything it was not sure of, and more.
    for id in 1..=SENT {
        c.send(&keyed_append(id)).await;
    }
    let mut offsets = BTreeMap::new();
    for _ in 0..SENT {
        let (id, offset, duplicate) = appended(&mut c).await;
        if let Some(&before) = acked.get(&id) {
            assert!(
                duplicate,
                "request {id}, acked before the kill, stored again"
            );
            assert_eq!(offset, before, "request {id} answered with another offset");
        }
        offsets.insert(id, offset);
    }
    // One event per key, in request order.
    let in_order: Vec<u64> = offsets.values().copied().collect();
    assert_eq!(in_order, (1..=SENT).collect::<Vec<_>>());
    c.send(&ClientMessage::History {
        request_id: 1,
        topic: "once".into(),
        after: 0,
        types: Vec::new(),
        limit: 1_000,
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::History { events, .. }) => {
            let payloads: Vec<String> = events
                .iter()
                .map(|e| String::from_utf8(e.payload.to_vec()).unwrap())
                .collect();
            let want: Vec<String> = (1..=SENT).map(|id| format!("key-{id}")).collect();
            assert_eq!(payloads, want);
        }
        other => panic!("expected History, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Consumer groups across kill -9
// ---------------------------------------------------------------------------

/// What the workers of the kill -9 test saw, over every round.
#[derive(Debug, Default)]
struct GroupLog {
    /// (round, offset) of every delivery, to either worker.
    delivered: Vec<(u32, u64)>,
    /// Offset → the round in which its ack was confirmed (first time).
    confirmed: BTreeMap<u64, u32>,
}

/// The log and a wakeup for whoever waits on a count of confirmed acks.
#[derive(Debug, Default)]
struct Shared {
    log: std::sync::Mutex<GroupLog>,
    changed: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, GroupLog> {
        self.log.lock().unwrap()
    }

    fn confirm(&self, offsets: impl IntoIterator<Item = u64>, round: u32) {
        let mut log = self.lock();
        for o in offsets {
            log.confirmed.entry(o).or_insert(round);
        }
        drop(log);
        self.changed.notify_waiters();
    }

    /// Waits until `done(log)` holds.
    async fn until(&self, done: impl Fn(&GroupLog) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.lock()) {
                return;
            }
            changed.await;
        }
    }
}

type SharedLog = Arc<Shared>;

/// A TCP member: acks every delivery; records deliveries and confirmed
/// acks until the connection ends.
async fn tcp_group_worker(addr: SocketAddr, round: u32, log: SharedLog) {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return;
    };
    let (rd, mut wr) = stream.into_split();
    let mut frames = Frames::new(rd);
    if write_msg(&mut wr, &hello()).await.is_err() {
        return;
    }
    let join = ClientMessage::JoinGroup {
        request_id: 1,
        subscription_id: 1,
        topic: "jobs".into(),
        group: "work".into(),
        consumer: "tcp-worker".into(),
        max_in_flight: 16,
        create: None,
    };
    if write_msg(&mut wr, &join).await.is_err() {
        return;
    }
    let mut settles: HashMap<u64, u64> = HashMap::new();
    let mut next_request = 2;
    while let Some(msg) = frames.next().await {
        match msg {
            ServerMessage::Delivery { event, .. } => {
                log.lock().delivered.push((round, event.offset));
                let settle = ClientMessage::Settle {
                    request_id: next_request,
                    subscription_id: 1,
                    offsets: vec![event.offset],
                    action: ringcast_protocol::SettleAction::Ack,
                };
                settles.insert(next_request, event.offset);
                next_request += 1;
                if write_msg(&mut wr, &settle).await.is_err() {
                    return;
                }
            }
            ServerMessage::Settled { request_id, .. } => {
                if let Some(offset) = settles.remove(&request_id) {
                    log.confirm([offset], round);
                }
            }
            ServerMessage::Joined { .. }
            | ServerMessage::Heartbeat
            | ServerMessage::Welcome { .. } => {}
            other => panic!("TCP group worker got {other:?}"),
        }
    }
}

/// An HTTP worker: fetches, records, acks, until the broker goes away.
async fn http_group_worker(addr: SocketAddr, round: u32, log: SharedLog) {
    let http = reqwest::Client::new();
    let base = format!("http://{addr}/v1/topics/jobs/groups/work");
    loop {
        let fetched = http
            .post(format!("{base}/fetch"))
            .json(&serde_json::json!({"consumer": "http-worker", "max": 8, "wait_ms": 500}))
            .send()
            .await;
        let Ok(response) = fetched else { return };
        if !response.status().is_success() {
            return;
        }
        let Ok(body) = response.json::<Value>().await else {
            return;
        };
        let offsets: Vec<u64> = body["events"]
            .as_array()
            .expect("fetch answers events")
            .iter()
            .map(|e| e["offset"].as_u64().expect("an event has an offset"))
            .collect();
        if offsets.is_empty() {
            continue;
        }
        log.lock()
            .delivered
            .extend(offsets.iter().map(|o| (round, *o)));
        let acked = http
            .post(format!("{base}/ack"))
            .json(&serde_json::json!({ "offsets": offsets }))
            .send()
            .await;
        match acked {
            Ok(r) if r.status().is_success() => log.confirm(offsets, round),
            _ => return,
        }
    }
}

/// Acks over HTTP, one by one, every offset delivered and not confirmed;
/// confirms those the group has (applied, or already done).
async fn reack_unconfirmed(addr: SocketAddr, round: u32, log: &Shared) {
    let offsets: Vec<u64> = {
        let l = log.lock();
        let mut o: Vec<u64> = l
            .delivered
            .iter()
            .map(|(_, o)| *o)
            .filter(|o| !l.confirmed.contains_key(o))
            .collect();
        o.sort_unstable();
        o.dedup();
        o
    };
    let http = reqwest::Client::new();
    for offset in offsets {
        let response = http
            .post(format!("http://{addr}/v1/topics/jobs/groups/work/ack"))
            .json(&serde_json::json!({ "offsets": [offset] }))
            .send()
            .await
            .expect("the re-ack reaches the broker");
        assert!(
            response.status().is_success(),
            "re-ack: {}",
            response.status()
        );
        let counts: Value = response.json().await.unwrap();
        // `unknown`: the kill took the record of its hand-out too; it is
        // not done, and will be delivered again.
        if counts["unknown"] == 0 {
            log.confirm([offset], round);
        }
    }
}

/// Publishes `count` events to `jobs` over TCP and waits for their acks.
async fn publish_jobs(addr: SocketAddr, count: usize) {
    let mut c = RawClient::handshake(addr).await;
    c.send(&ClientMessage::PublishBatch {
        request_id: 1,
        topic: "jobs".into(),
        events: (0..count)
            .map(|i| NewEvent {
                event_type: "job".into(),
                headers: Vec::new(),
                payload: Bytes::from(format!("job {i}")),
            })
            .collect(),
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::Published { results, .. }) => assert_eq!(results.len(), count),
        other => panic!("expected Published, got {other:?}"),
    }
}

/// The group's (ack floor, pending) over TCP.
async fn group_progress(addr: SocketAddr) -> (u64, u64) {
    let mut c = RawClient::handshake(addr).await;
    c.send(&ClientMessage::GroupInfo {
        request_id: 1,
        topic: "jobs".into(),
        group: "work".into(),
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::GroupInfo { info, .. }) => (info.ack_floor, info.pending),
        other => panic!("expected GroupInfo, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_workers_over_tcp_and_http_lose_nothing_across_kill_9_in_fsync_mode() {
    const BATCH: usize = 150;
    const KILLS: u32 = 3;
    let data = tempfile::tempdir().unwrap();
    let launch = || Launch::new(data.path()).arg("--durability").arg("fsync");
    let log: SharedLog = Arc::default();
    let mut total = 0u64;
    let mut d = launch().start().await;
    {
        let mut c = RawClient::handshake(d.tcp).await;
        c.send(&ClientMessage::CreateGroup {
            request_id: 1,
            topic: "jobs".into(),
            group: "work".into(),
            options: ringcast_protocol::GroupOptions {
                ack_wait_ms: 2_000,
                max_deliver: 1_000,
                ..Default::default()
            },
            update: false,
        })
        .await;
        assert!(matches!(
            c.recv().await,
            Some(ServerMessage::GroupInfo { .. })
        ));
    }
    for round in 0..=KILLS {
        // Work keeps arriving while the workers consume.
        // As a client that lost ack replies does: ack again what was
        // delivered and not confirmed (the kill may have taken the reply,
        // or the ack); a stored one answers `already_done`.
        reack_unconfirmed(d.http, round, &log).await;
        publish_jobs(d.tcp, BATCH).await;
        total += BATCH as u64;
        let workers = [
            tokio::spawn(tcp_group_worker(d.tcp, round, log.clone())),
            tokio::spawn(http_group_worker(d.http, round, log.clone())),
        ];
        if round < KILLS {
            // Kill once this round confirmed some acks, with more in flight.
            let target = BATCH / 3;
            let confirmed_now =
                |l: &GroupLog| l.confirmed.values().filter(|r| **r == round).count();
            before(
                60,
                "acks confirmed in the round",
                log.until(|l| confirmed_now(l) >= target),
            )
            .await;
            d.signal("KILL");
            d.exit(30).await;
            for w in workers {
                before(30, "workers see the broker gone", w).await.unwrap();
            }
            d = launch().start().await;
        } else {
            let all = total as usize;
            before(
                120,
                "every job acked",
                log.until(|l| l.confirmed.len() == all),
            )
            .await;
            // A confirmed ack is a stored one: the group agrees.
            assert_eq!(group_progress(d.tcp).await, (total, 0));
            for w in workers {
                w.abort();
            }
        }
    }
    assert!(d.stop(30).await.success());
    let log = log.lock();
    // None lost: every job's ack was confirmed.
    let missing: Vec<u64> = (1..=total)
        .filter(|o| !log.confirmed.contains_key(o))
        .collect();
    assert!(missing.is_empty(), "never acked: {missing:?}");
    // Nothing acked is delivered again after a restart: duplicates only
    // for events unacked at a kill.
    for &(round, offset) in &log.delivered {
        let acked_in = log.confirmed[&offset];
        assert!(
            round <= acked_in,
            "offset {offset}, acked in round {acked_in}, delivered again in round {round}"
        );
    }
    let delivered: std::collections::HashSet<u64> = log.delivered.iter().map(|(_, o)| *o).collect();
    assert_eq!(delivered.len() as u64, total);
}
