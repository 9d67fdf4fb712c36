//! The binary TCP front end: accept loop, connection limit and connection
//! rate limit.
//!
//! Each connection is served by [`connection`]: a reader that decodes and
//! dispatches frames, one pump task per subscription, and a writer that
//! coalesces every pending frame into one write; [`pattern`] serves the
//! subscriptions over every topic matching a pattern. [`access`] holds what the
//! front end adds to [`crate::auth`]: the `Hello` admission, the wire form of
//! refusals, and their downgrade for protocol version 1 clients.
//! [`compress`] is the payload compression a client may negotiate in
//! `HelloExt`: payloads decoded on ingest, compressed once per event on
//! delivery.

mod access;
mod compress;
mod connection;
mod outbound;
mod pattern;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ringcast_protocol::{ErrorCode, ServerMessage};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::Config;
use crate::conns::Registry;
use crate::engine::Engine;

/// Limits and timings of the TCP front end.
#[derive(Debug, Clone)]
pub struct TcpSettings {
    /// Most connections at once.
    pub max_connections: usize,
    /// Largest frame body accepted.
    pub max_frame: usize,
    /// Largest payload of one event (announced in `Welcome`).
    pub max_payload: u64,
    /// Most subscriptions per connection.
    pub max_subscriptions: usize,
    /// Idle interval for heartbeats; silence for three of them drops a peer.
    pub heartbeat: Duration,
    /// How long a new connection has to send `Hello`.
    pub hello_timeout: Duration,
    /// Frames (or frame batches) queued for one connection's writer.
    pub outbound_queue: usize,
    /// Publishes awaiting their ack per connection before reading pauses.
    pub max_in_flight: usize,
    /// Payload bytes of publishes awaiting their ack per connection before
    /// reading pauses.
    pub max_in_flight_bytes: u64,
    /// Bytes queued for a connection's writer that the peer has not read.
    pub max_outbound_bytes: usize,
    /// Most payload bytes in one history reply.
    pub max_history_bytes: usize,
    /// A started frame must arrive whole within this.
    pub read_timeout: Duration,
    /// Most topics and patterns one subscription names (a pattern
    /// subscription names one).
    pub max_stream_topics: usize,
    /// Most topics one pattern subscription may bring in; 0 turns pattern
    /// subscriptions off.
    pub max_pattern_matches: usize,
    /// Whether payload compression offered in `HelloExt` is taken.
    pub compression: bool,
    /// The smallest payload compressed, whatever the client offers.
    pub compression_min_size: u32,
}

impl TcpSettings {
    /// Settings taken from a daemon config.
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_connections: config.limits.max_tcp_connections,
            max_frame: crate::config::usize_bytes(config.limits.max_frame),
            max_payload: config.limits.max_payload.as_u64(),
            max_subscriptions: config.limits.max_subscriptions_per_connection,
            heartbeat: config.server.heartbeat,
            hello_timeout: Duration::from_secs(10),
            outbound_queue: 256,
            max_in_flight: 4096,
            max_in_flight_bytes: config.limits.max_in_flight_bytes.as_u64(),
            max_outbound_bytes: crate::config::usize_bytes(config.limits.max_outbound_bytes),
            max_history_bytes: crate::config::usize_bytes(config.limits.max_history_bytes),
            read_timeout: config.server.read_timeout,
            max_stream_topics: config.limits.max_stream_topics,
            max_pattern_matches: config.limits.max_pattern_matches,
            compression: config.server.tcp_compression,
            compression_min_size: u32::try_from(config.server.tcp_compression_min_size.as_u64())
                .unwrap_or(u32::MAX),
        }
    }
}

/// Most refused connections being told why at once (see [`serve`]).
const MAX_REFUSALS_IN_FLIGHT: usize = 256;

/// Serves connections from `listener` until `shutdown` is cancelled; every
/// task it starts is tracked by `tracker`. `kill` drops connections at once
/// without telling clients (a crash, for tests). Each admitted connection is
/// listed in `conns`.
#[allow(clippy::too_many_arguments)] // the broker's shared state, then the lifecycle
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    auth: Arc<Auth>,
    conns: Registry,
    settings: TcpSettings,
    shutdown: CancellationToken,
    kill: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    // Refusals say why before closing, which takes a task and up to a
    // second or two per socket: bounded, so that a flood of refused
    // connections cannot hold more sockets than this; beyond it a refused
    // connection is closed at once, without a word.
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let settings = Arc::new(settings);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = kill.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                // Before a permit or a session: a flood costs a small task.
                if let Err(limited) = auth.limits().check_connect(peer.ip()) {
                    let wait = limited.retry_after();
                    tracing::debug!(%peer, ?wait, "connection refused: connection rate limit");
                    let rate = auth.config().rate.connections_per_second;
                    if let Ok(slot) = refusals.clone().try_acquire_owned() {
                        tracker.spawn(async move {
                            access::refuse_rate_limited(stream, peer, wait, rate).await;
                            drop(slot);
                        });
                    }
                    continue;
                }
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let conn = connection::Connection::new(
                            engine.clone(),
                            auth.clone(),
                            conns.clone(),
                            settings.clone(),
                            peer,
                            shutdown.clone(),
                            kill.clone(),
                            tracker.clone(),
                        );
                        tracker.spawn(async move {
                            conn.run(stream).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!(%peer, limit = settings.max_connections, "connection refused: too many connections");
                        crate::metrics::refused("max_tcp_connections");
                        if let Ok(slot) = refusals.clone().try_acquire_owned() {
                            let limit = settings.max_connections;
                            tracker.spawn(async move {
                                refuse(stream, peer, limit).await;
                                drop(slot);
                            });
                        }
                    }
                }
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn refuse(stream: TcpStream, peer: SocketAddr, limit: usize) {
    let msg = ServerMessage::Error {
        request_id: None,
        code: ErrorCode::TooManyConnections,
        message: format!("too many connections (limit {limit})"),
    };
    access::say_and_close(stream, &msg).await;
    tracing::debug!(%peer, "refused connection closed");
}
