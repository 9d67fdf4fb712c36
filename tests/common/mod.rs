//! Shared test harness: a real broker on ephemeral loopback ports with a
//! temporary data dir, and a raw protocol client for byte-level tests.
#![allow(dead_code)]

pub mod auth;
pub mod engine;
pub mod http;
pub mod redis;
pub mod sdk;
pub mod sse;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use ringcast::broker::Broker;
use ringcast::config::{Config, Durability};
use ringcast_protocol::{
    encode_frame, ClientMessage, FrameDecoder, ServerMessage, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A `ringcastd` command (the binary these tests were built with) with a
/// clean environment: no inherited `RINGCAST_*`, `RUST_LOG`, systemd or
/// journald variables, so only what a test sets counts; `RUST_LOG=info`,
/// stdin closed, killed with its handle.
pub fn ringcastd() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringcastd"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("RINGCAST_")
            || matches!(
                key.as_str(),
                "RUST_LOG" | "NOTIFY_SOCKET" | "WATCHDOG_USEC" | "WATCHDOG_PID" | "JOURNAL_STREAM"
            )
        {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info");
    cmd.stdin(std::process::Stdio::null());
    cmd.kill_on_drop(true);
    cmd
}

/// A config listening on port 0 on loopback, storing under `dir`.
pub fn config(dir: &Path, durability: Durability) -> Config {
    let mut config = Config::default();
    config.server.tcp_listen = "127.0.0.1:0".parse().unwrap();
    config.server.http_listen = "127.0.0.1:0".parse().unwrap();
    config.storage.data_dir = dir.to_owned();
    config.storage.durability = durability;
    config
}

/// Starts a broker with `config`.
pub async fn start(config: Config) -> Broker {
    Broker::start(config).await.expect("broker starts")
}

/// A broker in memory mode with default settings, plus its temp dir guard.
pub async fn memory_broker() -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(config(dir.path(), Durability::Memory)).await;
    (broker, dir)
}

/// A `Subscribe` starting live, all types.
pub fn subscribe_live(request_id: u64, subscription_id: u64, topic: &str) -> ClientMessage {
    ClientMessage::Subscribe {
        request_id,
        subscription_id,
        topic: topic.into(),
        types: vec![],
        start: ringcast_protocol::Start::Live,
    }
}

/// The text of `GET url` (a broker's `/metrics`), within 20 seconds.
pub async fn fetch_text(http: &reqwest::Client, url: String) -> String {
    within(20, async {
        http.get(url)
            .send()
            .await
            .expect("GET")
            .text()
            .await
            .expect("body text")
    })
    .await
}

/// Awaits `f` or fails the test after `secs` seconds.
pub async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("timed out waiting")
}

/// A client speaking raw frames, for byte-level protocol tests.
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
    decoder: FrameDecoder<ServerMessage>,
}

impl RawClient {
    /// Connects without a handshake.
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self {
            stream,
            buf: BytesMut::new(),
            decoder: FrameDecoder::new(64 * 1024 * 1024),
        }
    }

    /// Connects and completes the handshake.
    pub async fn handshake(addr: SocketAddr) -> Self {
        let mut c = Self::connect(addr).await;
        c.send(&ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: "raw-test".into(),
            credentials: None,
        })
        .await;
        match c.recv().await {
            Some(ServerMessage::Welcome { .. }) => c,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &ClientMessage) {
        let mut buf = BytesMut::new();
        encode_frame(msg, &mut buf).unwrap();
        self.stream.write_all(&buf).await.expect("write");
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next message other than a heartbeat; `None` when the server
    /// closed the connection.
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        within(20, async {
            loop {
                match self
                    .decoder
                    .decode(&mut self.buf)
                    .expect("server frame decodes")
                {
                    Some(ServerMessage::Heartbeat) => continue,
                    Some(msg) => return Some(msg),
                    None => {}
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// The next message including heartbeats.
    pub async fn recv_any(&mut self) -> Option<ServerMessage> {
        within(20, async {
            loop {
                if let Some(msg) = self.decoder.decode(&mut self.buf).expect("decodes") {
                    return Some(msg);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// Asserts the server closes the connection (after any messages).
    pub async fn expect_closed(&mut self) {
        if let Some(msg) = self.recv().await {
            panic!("expected the connection to close, got {msg:?}");
        }
    }
}

/// Makes sure this process may hold `needed` open files, raising the soft
/// limit to the hard one with util-linux `prlimit` when it is lower.
pub fn ensure_open_files(needed: u64) {
    fn limits() -> (u64, u64) {
        let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("Max open files in /proc/self/limits");
        let mut numbers = line.split_whitespace().skip(3).map(|n| match n {
            "unlimited" => u64::MAX,
            n => n.parse().expect("a number"),
        });
        (numbers.next().unwrap(), numbers.next().unwrap())
    }
    let (soft, hard) = limits();
    if soft < needed && hard >= needed {
        let _ = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard}:{hard}"))
            .status();
    }
    let (soft, hard) = limits();
    assert!(
        soft >= needed,
        "this test needs {needed} open files, but the limit is {soft} (hard {hard}); \
         raise it, e.g. `ulimit -n 4096`, before running it"
    );
}

/// A loopback TCP proxy, so that tests can cut a client's connection to the
/// broker without touching the broker.
pub mod proxy {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    /// Listens on `127.0.0.1:0` and forwards every accepted connection to
    /// a target address. Dropping it stops it and drops every connection.
    pub struct Proxy {
        addr: SocketAddr,
        shared: Arc<Shared>,
        accept: JoinHandle<()>,
    }

    #[derive(Default)]
    struct Shared {
        state: Mutex<State>,
        accepted: AtomicUsize,
    }

    #[derive(Default)]
    struct State {
        /// While set, new connections are accepted and closed at once.
        paused: bool,
        /// One task per proxied connection; aborting it drops both sockets.
        links: Vec<JoinHandle<()>>,
    }

    impl Proxy {
        /// Starts forwarding to `target`.
        pub async fn start(target: SocketAddr) -> Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
            let addr = listener.local_addr().expect("proxy address");
            let shared = Arc::new(Shared::default());
            let accept = tokio::spawn(accept_loop(listener, target, shared.clone()));
            Proxy {
                addr,
                shared,
                accept,
            }
        }

        /// Where clients connect.
        pub fn addr(&self) -> SocketAddr {
            self.addr
        }

        /// Connections forwarded so far (refused ones not counted).
        pub fn connections(&self) -> usize {
            self.shared.accepted.load(Ordering::SeqCst)
        }

        /// Drops every current proxied connection at once and keeps
        /// accepting; returns how many were open. Once it returns, nothing
        /// more is forwarded on them.
        pub async fn cut(&self) -> usize {
            let links = std::mem::take(&mut self.state().links);
            drop_links(links).await
        }

        /// Cuts every connection and closes new ones as soon as they are
        /// accepted, until [`resume`](Self::resume); returns how many were cut.
        pub async fn pause(&self) -> usize {
            let links = {
                let mut state = self.state();
                state.paused = true;
                std::mem::take(&mut state.links)
            };
            drop_links(links).await
        }

        /// Forwards new connections again.
        pub fn resume(&self) {
            self.state().paused = false;
        }

        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.accept.abort();
            for link in self.state().links.drain(..) {
                link.abort();
            }
        }
    }

    async fn drop_links(links: Vec<JoinHandle<()>>) -> usize {
        let open = links.iter().filter(|l| !l.is_finished()).count();
        for link in &links {
            link.abort();
        }
        // Awaiting them means their sockets are closed.
        for link in links {
            let _ = link.await;
        }
        open
    }

    async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
        loop {
            let client = match listener.accept().await {
                Ok((client, _)) => client,
                Err(_) => {
                    tokio::task::yield_now().await;
                    continue;
                }
            };
            // Decided under the lock, so that a cut or a pause never misses
            // a connection accepted just before it.
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.paused {
                drop(client);
                continue;
            }
            shared.accepted.fetch_add(1, Ordering::SeqCst);
            state.links.retain(|l| !l.is_finished());
            state.links.push(tokio::spawn(forward(client, target)));
        }
    }

    async fn forward(mut client: TcpStream, target: SocketAddr) {
        let Ok(mut upstream) = TcpStream::connect(target).await else {
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

/// Writes one client message as a frame.
pub async fn write_msg<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &ClientMessage,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    encode_frame(msg, &mut buf).expect("encode");
    w.write_all(&buf).await
}

/// Server messages from the read half of a connection.
pub struct Frames<R> {
    rd: R,
    buf: BytesMut,
    decoder: FrameDecoder<ServerMessage>,
}

impl<R: AsyncRead + Unpin> Frames<R> {
    pub fn new(rd: R) -> Self {
        Self {
            rd,
            buf: BytesMut::new(),
            decoder: FrameDecoder::new(64 * 1024 * 1024),
        }
    }

    /// The next message other than a heartbeat; `None` once the connection
    /// is closed (or reset).
    pub async fn next(&mut self) -> Option<ServerMessage> {
        loop {
            match self
                .decoder
                .decode(&mut self.buf)
                .expect("server frames decode")
            {
                Some(ServerMessage::Heartbeat) => continue,
                Some(msg) => return Some(msg),
                None => {}
            }
            match self.rd.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

/// A hello of the current protocol version.
pub fn hello() -> ClientMessage {
    ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_name: "ringcast-test".into(),
        credentials: None,
    }
}

/// Asserts the next message is an error with this request id and code.
pub async fn expect_error(
    c: &mut RawClient,
    request_id: Option<u64>,
    code: ringcast_protocol::ErrorCode,
) {
    match c.recv().await {
        Some(ServerMessage::Error {
            request_id: r,
            code: got,
            message,
        }) => {
            assert_eq!((r, got), (request_id, code), "message: {message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}
