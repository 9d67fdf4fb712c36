//! Shared test harness: a real broker on ephemeral loopback ports with a
//! temporary data dir, and a raw protocol client for byte-level tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use ringcast::broker::Broker;
use ringcast::config::{Config, Durability};
use ringcast_protocol::{
    encode_frame, ClientMessage, FrameDecoder, ServerMessage, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
