//! Shared by the fake-broker tests: a scripted broker on a loopback port that
//! speaks the real protocol codec, and its side of one connection.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use ringcast_client::{ClientOptions, WireEvent};
use ringcast_protocol::{ClientMessage, ServerCodec, ServerMessage, PROTOCOL_VERSION};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::codec::Framed;

/// Upper bound for anything a test waits for; generous for a loaded CI box.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct FakeBroker {
    pub listener: TcpListener,
    pub heartbeat_ms: u32,
}

impl FakeBroker {
    pub async fn start() -> Self {
        Self::with_heartbeat(0).await
    }

    pub async fn with_heartbeat(heartbeat_ms: u32) -> Self {
        FakeBroker {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            heartbeat_ms,
        }
    }

    pub fn addr(&self) -> String {
        self.listener.local_addr().unwrap().to_string()
    }

    /// Fast reconnects, so tests do not wait on backoff.
    pub fn options(&self) -> ClientOptions {
        ClientOptions::new(self.addr())
            .with_reconnect_backoff(Duration::from_millis(5), Duration::from_millis(20))
            .with_request_timeout(WAIT)
    }

    /// Accepts a connection and reads nothing from it yet.
    pub async fn accept_connection(&self) -> Peer {
        let (stream, _) = timeout(WAIT, self.listener.accept())
            .await
            .expect("no connection")
            .unwrap();
        Peer {
            framed: Framed::new(stream, ServerCodec::default()),
        }
    }
}

/// The broker's side of one connection.
pub struct Peer {
    pub framed: Framed<TcpStream, ServerCodec>,
}

impl Peer {
    pub async fn recv(&mut self) -> ClientMessage {
        timeout(WAIT, self.framed.next())
            .await
            .expect("no frame from the client")
            .expect("the client closed the connection")
            .expect("undecodable frame")
    }

    pub async fn send(&mut self, msg: ServerMessage) {
        self.framed.send(msg).await.unwrap();
    }

    /// Answers the client's `Hello`.
    pub async fn welcome(&mut self, heartbeat_ms: u32) {
        self.send(ServerMessage::Welcome {
            server_version: "fake".into(),
            protocol_version: PROTOCOL_VERSION,
            max_frame: 1 << 20,
            max_payload: 1 << 16,
            max_subscriptions: 16,
            heartbeat_ms,
        })
        .await;
    }
}

/// An `orders` event at `offset`, its version the offset too.
pub fn event(offset: u64) -> WireEvent {
    WireEvent {
        topic: "orders".into(),
        offset,
        event_type: "created".into(),
        version: offset,
        timestamp_ms: 1_700_000_000_000 + offset,
        headers: vec![],
        payload: Bytes::from(format!("{{\"n\":{offset}}}")),
    }
}
