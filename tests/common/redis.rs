//! A real `redis-server` for the cluster tests: one per test, on an
//! ephemeral loopback port, in its own temporary directory, started,
//! killed and started again on the same port (so an append-only file is
//! replayed), plus a minimal RESP client for the odd direct command.
//!
//! Readiness is awaited by polling `PING` until it answers `+PONG`, never by
//! a fixed sleep. `redis-server` must be installed (CI installs it); the
//! binary is `$REDIS_SERVER`, else `redis-server` on the `PATH`, else
//! `/usr/bin/redis-server`.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long a start (including an AOF replay) may take before the test fails.
const START_SECS: u64 = 30;

/// What the server keeps across a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// `appendonly yes`, `appendfsync always`: every write is on disk before
    /// Redis answers it, so a `kill -9` loses nothing it acknowledged.
    AofAlways,
    /// No AOF and no RDB snapshots: a restart starts empty.
    None,
}

/// A running (or stopped) `redis-server` child process.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    persistence: Persistence,
    child: Option<Child>,
    /// How many times it was started (for the log file names).
    starts: u32,
}

/// Whether the Redis tests run here: with `RINGCAST_REDIS_TESTS=1` (as
/// `.ci/run` sets) they must, and a missing `redis-server` fails them; without
/// it they run when a `redis-server` is found and are skipped (with a note)
/// on a machine that has none, so `cargo test` passes with only Rust.
pub fn available() -> bool {
    if std::env::var("RINGCAST_REDIS_TESTS").is_ok_and(|v| v == "1") {
        redis_server_binary();
        return true;
    }
    let found = std::env::var_os("REDIS_SERVER").is_some()
        || std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|d| d.join("redis-server").is_file())
        })
        || Path::new("/usr/bin/redis-server").is_file();
    if !found {
        eprintln!(
            "skipping: no redis-server here (install it, or set RINGCAST_REDIS_TESTS=1 to make its absence fail; .ci/run does)"
        );
    }
    found
}

/// The `redis-server` binary, or a panic that says how to get one.
pub fn redis_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("REDIS_SERVER") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "REDIS_SERVER={} is not a file; the cluster tests need a real redis-server",
            path.display()
        );
        return path;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("redis-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let fallback = PathBuf::from("/usr/bin/redis-server");
    assert!(
        fallback.is_file(),
        "redis-server is not installed (not on PATH, not at /usr/bin/redis-server): \
         the cluster tests start a real Redis. Install it (e.g. `apt-get install redis-server`) \
         or point REDIS_SERVER at the binary."
    );
    fallback
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

impl RedisServer {
    /// Starts a server with `persistence` on a fresh port and waits until it
    /// answers `PING`.
    pub async fn start(persistence: Persistence) -> RedisServer {
        let dir = tempfile::tempdir().expect("a temp dir for redis");
        let mut server = RedisServer {
            port: 0,
            dir,
            persistence,
            child: None,
            starts: 0,
        };
        // A port picked free may be taken by someone else before Redis binds
        // it: then Redis exits, and another port is tried.
        let mut last_error = String::new();
        for _ in 0..10 {
            server.port = free_port();
            match server.try_start().await {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start on any of 10 ports; last error: {last_error}");
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port it listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's working directory (AOF and logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What it keeps across restarts.
    pub fn persistence(&self) -> Persistence {
        self.persistence
    }

    /// Whether the process is running (started and not stopped).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("try_wait redis-server").is_none(),
            None => false,
        }
    }

    /// Kills the server with SIGKILL (no shutdown save, no AOF rewrite) and
    /// reaps it; the port is free when this returns.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The listening socket closes with the process; wait until nothing
        // answers on the port any more.
        let deadline = Instant::now() + Duration::from_secs(START_SECS);
        while TcpStream::connect(self.addr()).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "something still answers on {} after redis-server was killed",
                self.addr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the server again on the same port with the same directory
    /// (an AOF, if any, is replayed) and waits until it answers `PING`.
    pub async fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "start_again on a running redis-server"
        );
        // The port was freed by our kill; retry a few times in case the
        // kernel is slow to let it go.
        let mut last_error = String::new();
        for _ in 0..20 {
            match self.try_start().await {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "redis-server did not start again on port {}: {last_error}",
            self.port
        );
    }

    /// Stops the process with SIGSTOP: it keeps its connections open but
    /// answers nothing (a hung Redis) until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Lets a [`freeze`](Self::freeze)d process run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server is running").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// `kill -9`, then [`start_again`](Self::start_again).
    pub async fn restart(&mut self) {
        self.kill().await;
        self.start_again().await;
    }

    /// The server log of the current (or last) run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("redis-{start}.log"))
    }

    async fn try_start(&mut self) -> Result<(), String> {
        self.starts += 1;
        let log = self.log_path(self.starts);
        let mut cmd = Command::new(redis_server_binary());
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--protected-mode", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(["--save", ""]);
        match self.persistence {
            Persistence::AofAlways => {
                cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
            }
            Persistence::None => {
                cmd.args(["--appendonly", "no"]);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", redis_server_binary().display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(START_SECS);
        loop {
            if !self.is_running() {
                self.child = None;
                return Err(format!(
                    "redis-server exited at start; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            if let Ok(Ok(reply)) =
                tokio::time::timeout(Duration::from_secs(2), command_at(self.addr(), &["PING"]))
                    .await
            {
                if reply == Reply::Status("PONG".into()) {
                    return Ok(());
                }
                // `-LOADING` while the AOF is replayed: keep polling.
            }
            if Instant::now() >= deadline {
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(format!(
                    "redis-server did not answer PING within {START_SECS}s; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends one command and returns its reply (panics on I/O errors).
    pub async fn command(&self, args: &[&str]) -> Reply {
        tokio::time::timeout(Duration::from_secs(10), command_at(self.addr(), args))
            .await
            .expect("redis answers within 10s")
            .unwrap_or_else(|e| panic!("redis command {args:?}: {e}"))
    }

    /// The keys matching `pattern` (`KEYS`; fine for a test's few keys).
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        match self.command(&["KEYS", pattern]).await {
            Reply::Array(items) => items
                .into_iter()
                .map(|i| match i {
                    Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
                    other => panic!("KEYS item {other:?}"),
                })
                .collect(),
            other => panic!("KEYS reply {other:?}"),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
    Nil,
}

/// Connects to `addr`, sends `args` as a RESP array, reads one reply.
pub async fn command_at(addr: SocketAddr, args: &[&str]) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request).await?;
    let mut reader = BufReader::new(stream);
    read_reply(&mut reader).await
}

fn read_reply<'a>(
    r: &'a mut BufReader<TcpStream>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Reply>> + Send + 'a>> {
    Box::pin(async move {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches("\r\n").to_owned();
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, line.clone());
        let (kind, rest) = line.split_at(1.min(line.len()));
        Ok(match kind {
            "+" => Reply::Status(rest.to_owned()),
            "-" => Reply::Error(rest.to_owned()),
            ":" => Reply::Integer(rest.parse().map_err(|_| bad())?),
            "$" => {
                let len: i64 = rest.parse().map_err(|_| bad())?;
                if len < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut buf = vec![0u8; len as usize + 2];
                    r.read_exact(&mut buf).await?;
                    buf.truncate(len as usize);
                    Reply::Bulk(Some(buf))
                }
            }
            "*" => {
                let len: i64 = rest.parse().map_err(|_| bad())?;
                if len < 0 {
                    Reply::Nil
                } else {
                    let mut items = Vec::with_capacity(len as usize);
                    for _ in 0..len {
                        items.push(read_reply(r).await?);
                    }
                    Reply::Array(items)
                }
            }
            _ => return Err(bad()),
        })
    })
}
