//! One TCP connection: handshake, a reader that decodes and dispatches
//! frames, one pump task per subscription, and a coalescing writer.
//!
//! Backpressure: every outbound chunk is charged to the connection's byte
//! budget ([`Outbound`], `max_outbound_bytes`) before it is queued, and the
//! writer releases it once written. A peer that reads slowly exhausts it; its
//! subscription pumps then stop pulling from the engine, fall behind the ring
//! and get `gap(slow_consumer)` — nobody else waits. Publishes are queued to
//! the engine in arrival order and their acks awaited concurrently
//! (pipelining), up to `max_in_flight` publishes and `max_in_flight_bytes`
//! payload bytes; beyond either, reading pauses.
//!
//! Hostile peers: before `hello` only frames of [`HELLO_MAX_FRAME`] bytes are
//! accepted, the read buffer grows with the bytes that arrive (never to an
//! announced length), and a frame that has started must arrive whole within
//! `read_timeout`.
//!
//! Access control ([`super::access`]): `hello` authenticates once and the
//! session keeps the [`Principal`]; each request is then checked with one
//! pattern match against its grant before the engine is asked anything, so a
//! refusal says nothing about whether the topic exists. The token's expiry is
//! one timer in the read loop (moved only by `refresh`); at expiry the
//! session stops its pumps, delivers pending acks and closes with
//! `token_expired`.
//!
//! Registry ([`crate::conns`]): a connection is listed once its `hello` is
//! accepted, each subscription once it starts (a pattern subscription as
//! one entry named by its pattern); pumps record position and counts once
//! per hand-off.
//!
//! Pattern subscriptions (`SubscribePattern`) are served by
//! [`super::pattern`]: one engine multi-topic subscription and one pump
//! per subscription, like a single-topic one. An operator's close (`DELETE
//! /v1/connections/{id}`, `CloseConnection`) ends the session as a broker
//! shutdown does — pending acks, then `Shutdown` — so the client reconnects
//! and resumes exactly.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use ringcast_protocol::{
    encode_frame, ClientMessage, ErrorCode, FrameDecoder, ProtocolError, ServerMessage,
    TopicSummary, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::access;
use super::compress::{self, Compression, Meter};
use super::outbound::Outbound;
use super::pattern::{self, PatternAccess, PatternRequest};
use super::{wire, TcpSettings};
use crate::auth::{Action, Auth, Kind, Limited, Principal};
use crate::conns::{ConnGuard, ConnKind, Registry, SubHandle};
use crate::engine::{
    Ack, Delivery, Engine, EngineError, Event, Expected, GroupMember, GroupSettler, PendingPublish,
    PendingSettle, Settled, Subscription,
};

/// Most bytes of frames a pump encodes before handing them to the writer.
const PUMP_CHUNK: usize = 64 * 1024;
/// Most events in one history reply.
const MAX_HISTORY: usize = 1_000;
/// Largest frame accepted before `hello`: a hello is tiny, and an
/// unauthenticated peer must not make the broker buffer megabytes.
const HELLO_MAX_FRAME: usize = 64 * 1024;
/// Read buffer of a connection before its handshake; it grows afterwards.
const HELLO_BUFFER: usize = 4 * 1024;
/// Read buffer reserved once the handshake is done, for pipelined requests.
const READ_BUFFER: usize = 64 * 1024;
/// Most connections in one `Connections` page.
const MAX_CONNECTIONS_PAGE: usize = 1_000;

/// Why the read side stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The peer closed, vanished or broke the protocol; nothing more to say.
    Closed,
    /// The broker is shutting down gracefully: drain acks, say goodbye.
    Shutdown,
    /// An operator closed this connection: drain acks, say goodbye, as for
    /// a shutdown (the client reconnects and resumes).
    Evicted,
    /// The broker was killed: drop everything at once.
    Killed,
}

/// A connection before it starts: what it needs from the server.
pub(crate) struct Connection {
    engine: Engine,
    auth: Arc<Auth>,
    conns: Registry,
    settings: Arc<TcpSettings>,
    peer: SocketAddr,
    shutdown: CancellationToken,
    kill: CancellationToken,
    tracker: TaskTracker,
}

struct Pump {
    /// The subscribed topic, checked again when the credentials change.
    topic: String,
    /// For a group membership: its settle handle, and whether the pump is
    /// to leave the group cleanly (a `LeaveGroup`) when cancelled.
    group: Option<(GroupSettler, Arc<AtomicBool>)>,
    /// For a pattern subscription (`topic` is then the pattern): the
    /// grants its topics are checked against, and the topics it delivers.
    pattern: Option<PatternAccess>,
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

/// A settle (ack, nack, …) awaiting its store, tagged with its request.
struct Settling {
    request_id: u64,
    pending: PendingSettle,
}

impl Future for Settling {
    type Output = (u64, Result<Settled, EngineError>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.request_id;
        Pin::new(&mut self.pending).poll(cx).map(|r| (id, r))
    }
}

/// A publish awaiting its ack, tagged with its request, payload size and
/// the reply it gets.
struct InFlight {
    request_id: u64,
    bytes: u64,
    reply: AckReply,
    acks: PendingPublish,
}

/// How a publish is answered: `Published` (`Publish`, `PublishBatch`) or
/// `Appended` (`Append`, with the duplicate flag per ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckReply {
    Published,
    Appended,
}

/// A finished publish: request id, payload bytes, reply kind, outcome.
type Acked = (u64, u64, AckReply, Result<Vec<Ack>, EngineError>);

impl Future for InFlight {
    type Output = Acked;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (id, bytes, reply) = (self.request_id, self.bytes, self.reply);
        Pin::new(&mut self.acks)
            .poll(cx)
            .map(|r| (id, bytes, reply, r))
    }
}

/// The state of a running connection's read side.
struct Session<'a> {
    conn: &'a Connection,
    out: mpsc::Sender<Bytes>,
    /// The byte budget of everything queued for the writer.
    outbound: Arc<Outbound>,
    /// Most bytes handed to the writer at once (a pump's chunk, replies).
    chunk: usize,
    /// Replies encoded but not yet handed to the writer: replies to one read
    /// of pipelined requests go to the writer together.
    replies: BytesMut,
    pumps: HashMap<u64, Pump>,
    in_flight: FuturesUnordered<InFlight>,
    /// Settles of group deliveries awaiting their store, answered as they
    /// complete; they count against `max_in_flight` like publishes.
    settling: FuturesUnordered<Settling>,
    /// Payload bytes of the publishes in `in_flight`.
    in_flight_bytes: u64,
    /// The protocol version of this connection, from `hello` (until then the
    /// oldest one): nothing newer is ever sent to the peer.
    version: u16,
    /// Who the peer is: set by `hello`, replaced by `refresh`.
    principal: Option<Principal>,
    /// When the session ends unless refreshed (the token's `exp` plus the
    /// leeway); `None` = never.
    expires_at: Option<Instant>,
    /// The connection's entry in the registry, from `welcome` on.
    registered: Option<ConnGuard>,
    /// The payload compression a `HelloExt` negotiated, with the counters
    /// of what this session decodes and encodes itself (pumps keep their
    /// own); `None`: plain payloads.
    packing: Option<Packing>,
}

/// A session's payload compression and its counters.
struct Packing {
    compression: Compression,
    received: Meter,
    sent: Meter,
}

impl Connection {
    #[allow(clippy::too_many_arguments)] // the broker's shared state, then the lifecycle
    pub(crate) fn new(
        engine: Engine,
        auth: Arc<Auth>,
        conns: Registry,
        settings: Arc<TcpSettings>,
        peer: SocketAddr,
        shutdown: CancellationToken,
        kill: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            engine,
            auth,
            conns,
            settings,
            peer,
            shutdown,
            kill,
            tracker,
        }
    }

    /// Serves the connection until it closes.
    pub(crate) async fn run(self, stream: TcpStream) {
        let peer = self.peer;
        let (rd, wr) = stream.into_split();
        let (out, out_rx) = mpsc::channel::<Bytes>(self.settings.outbound_queue);
        let outbound = Arc::new(Outbound::new(self.settings.max_outbound_bytes));
        let writer_done = CancellationToken::new();
        let writer = self.tracker.spawn(write_loop(
            wr,
            out_rx,
            outbound.clone(),
            self.settings.heartbeat,
            writer_done.clone(),
            self.kill.clone(),
        ));
        tracing::debug!(%peer, "connection opened");
        let connections = metrics::gauge!(crate::metrics::CONNECTIONS, "transport" => "tcp");
        connections.increment(1.0);
        let mut session = Session {
            conn: &self,
            out,
            outbound,
            // A chunk over the whole budget would always wait for an empty queue.
            chunk: PUMP_CHUNK.min(self.settings.max_outbound_bytes).max(1),
            replies: BytesMut::new(),
            pumps: HashMap::new(),
            in_flight: FuturesUnordered::new(),
            settling: FuturesUnordered::new(),
            in_flight_bytes: 0,
            version: MIN_PROTOCOL_VERSION,
            principal: None,
            expires_at: None,
            registered: None,
            packing: None,
        };
        let stop = session.read_loop(rd, &writer_done).await;
        match stop {
            Stop::Shutdown => {
                session
                    .say_goodbye("the broker is shutting down; reconnect with backoff")
                    .await
            }
            Stop::Evicted => {
                session
                    .say_goodbye("closed by an administrator; reconnect to resume")
                    .await
            }
            Stop::Closed | Stop::Killed => {}
        }
        for pump in session.pumps.values() {
            pump.cancel.cancel();
        }
        // Dropping the last sender lets the writer flush what is queued and exit.
        drop(session);
        if stop != Stop::Killed {
            let _ = tokio::time::timeout(self.write_timeout(), writer).await;
        }
        connections.decrement(1.0);
        tracing::debug!(%peer, ?stop, "connection closed");
    }

    fn write_timeout(&self) -> Duration {
        (self.settings.heartbeat * 3).max(Duration::from_secs(1))
    }
}

impl Session<'_> {
    async fn read_loop(&mut self, mut rd: OwnedReadHalf, writer_done: &CancellationToken) -> Stop {
        let settings = self.conn.settings.clone();
        let mut buf = BytesMut::with_capacity(HELLO_BUFFER);
        let hello_max = settings.max_frame.min(HELLO_MAX_FRAME);
        let mut decoder = FrameDecoder::<ClientMessage>::new(hello_max);

        // Handshake: the first frame must be a hello of our version.
        let hello_deadline = Instant::now() + settings.hello_timeout;
        let hello = loop {
            match decoder.decode(&mut buf) {
                Ok(Some(msg)) => break msg,
                Ok(None) => {}
                Err(ProtocolError::FrameTooLarge { len, .. }) => {
                    crate::metrics::refused("hello_max_frame");
                    return self
                        .fatal(
                            ErrorCode::FrameTooLarge,
                            format!("a frame before hello may have at most {hello_max} bytes; this one announces {len}"),
                        )
                        .await;
                }
                Err(e) => return self.fatal(e.error_code(), e.to_string()).await,
            }
            tokio::select! {
                _ = self.conn.kill.cancelled() => return Stop::Killed,
                _ = self.conn.shutdown.cancelled() => {
                    return self.fatal(ErrorCode::ShuttingDown, "the broker is shutting down".into()).await
                }
                _ = tokio::time::sleep_until(hello_deadline) => {
                    return self.fatal(ErrorCode::BadHello, "no hello within the handshake timeout".into()).await
                }
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return Stop::Closed,
                    Ok(_) => {}
                },
            }
        };
        let (protocol_version, client_name, credentials, offer) = match hello {
            ClientMessage::Hello {
                protocol_version,
                client_name,
                credentials,
            } => (protocol_version, client_name, credentials, None),
            ClientMessage::HelloExt {
                protocol_version,
                client_name,
                credentials,
                compression,
            } => (
                protocol_version,
                client_name,
                credentials,
                Some(compression),
            ),
            _ => {
                return self
                    .fatal(ErrorCode::BadHello, "the first frame must be hello".into())
                    .await;
            }
        };
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&protocol_version) {
            return self
                .fatal(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "protocol version {protocol_version} is not supported (server speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})"
                    ),
                )
                .await;
        }
        self.version = protocol_version;
        if offer.is_some() && protocol_version < 5 {
            return self
                .fatal(
                    ErrorCode::BadHello,
                    format!("HelloExt needs protocol version 5; it names {protocol_version}"),
                )
                .await;
        }
        let peer = self.conn.peer;
        let principal = match access::admit(&self.conn.auth, credentials.as_deref(), peer.ip()) {
            Ok(principal) => principal,
            Err((code, message)) => {
                tracing::warn!(%peer, client = %client_name, ?code, %message, "connection refused by access control");
                return self.fatal(code, message).await;
            }
        };
        tracing::debug!(%peer, client = %client_name, version = protocol_version, subject = ?principal.subject(), "hello");
        self.expires_at = principal.deadline();
        self.principal = Some(principal);
        let server_version: String = env!("CARGO_PKG_VERSION").into();
        let max_frame = u32::try_from(settings.max_frame).unwrap_or(u32::MAX);
        let max_payload = u32::try_from(settings.max_payload).unwrap_or(u32::MAX);
        let max_subscriptions = u32::try_from(settings.max_subscriptions).unwrap_or(u32::MAX);
        let heartbeat_ms = u32::try_from(settings.heartbeat.as_millis()).unwrap_or(u32::MAX);
        let welcome = match offer {
            // A `Hello` of any version: the `Welcome` it always got.
            None => ServerMessage::Welcome {
                server_version,
                protocol_version,
                max_frame,
                max_payload,
                max_subscriptions,
                heartbeat_ms,
            },
            Some(offer) => {
                let choice =
                    compress::choose(&offer, settings.compression, settings.compression_min_size);
                tracing::debug!(%peer, codec = %choice.codec.name(), min_size = choice.min_size, "payload compression negotiated");
                self.packing = Compression::from_choice(choice).map(|compression| Packing {
                    compression,
                    received: Meter::new("in"),
                    sent: Meter::new("out"),
                });
                ServerMessage::WelcomeExt {
                    server_version,
                    protocol_version,
                    max_frame,
                    max_payload,
                    max_subscriptions,
                    heartbeat_ms,
                    compression: choice,
                }
            }
        };
        // Listed before the peer can see its `Welcome`.
        let subject = self
            .principal
            .as_ref()
            .and_then(|p| p.subject())
            .map(str::to_owned);
        let registered = self.conn.conns.register(ConnKind::Tcp, peer, subject);
        let evicted = registered.closed().cancelled_owned();
        self.registered = Some(registered);
        if self.send(&welcome).await.is_err() || self.flush().await.is_err() {
            return Stop::Closed;
        }

        // The hello decoder stopped at a frame boundary, right after hello.
        decoder = FrameDecoder::new(settings.max_frame);
        buf.reserve(READ_BUFFER);

        let dead_after = settings.heartbeat * 3;
        let mut deadline = Instant::now() + dead_after;
        let bytes_in = metrics::counter!(crate::metrics::BYTES_IN, "transport" => "tcp");
        // Created once, not per iteration: each creation registers a waiter
        // or a timer, which is measurable per pipelined request.
        let killed = self.conn.kill.cancelled();
        let shutting_down = self.conn.shutdown.cancelled();
        let writer_gone = writer_done.cancelled();
        let silence = tokio::time::sleep_until(deadline);
        // When the frame being received must be complete: set when one
        // starts, cleared when one completes or while reading is paused (the
        // wait is then ours, not the peer's). Bytes arriving do not extend it,
        // so a trickling peer cannot keep a large partial frame alive.
        let mut frame_deadline: Option<Instant> = None;
        let frame_timer = tokio::time::sleep_until(Instant::now() + settings.read_timeout);
        // The session's end: armed at `expires_at`, moved when a refresh
        // changes it (compared once per wakeup, not per frame).
        let mut expiry_armed = self.expires_at;
        let expiry = tokio::time::sleep_until(expiry_armed.unwrap_or_else(Instant::now));
        tokio::pin!(
            killed,
            shutting_down,
            evicted,
            writer_gone,
            silence,
            frame_timer,
            expiry
        );
        loop {
            let mut decoded = false;
            while self.may_read() {
                // Appends (most frames of a busy publisher) are read by hand.
                match decoder.decode_with(&mut buf, ringcast_protocol::decode_client_body) {
                    Ok(Some(msg)) => {
                        decoded = true;
                        if let Err(stop) = self.dispatch(msg).await {
                            return stop;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        if e.error_code() == ErrorCode::FrameTooLarge {
                            crate::metrics::refused("max_frame");
                        }
                        return self.fatal(e.error_code(), e.to_string()).await;
                    }
                }
            }
            if self.flush().await.is_err() {
                return Stop::Closed;
            }
            if self.expires_at != expiry_armed {
                expiry_armed = self.expires_at;
                if let Some(at) = expiry_armed {
                    expiry.as_mut().reset(at);
                }
            }
            let can_read = self.may_read();
            let partial = !buf.is_empty() || !decoder.is_at_boundary();
            if decoded || !(partial && can_read) {
                frame_deadline = None;
            }
            if partial && can_read && frame_deadline.is_none() {
                frame_deadline = Some(Instant::now() + settings.read_timeout);
            }
            tokio::select! {
                biased;
                _ = &mut killed => return Stop::Killed,
                _ = &mut shutting_down => return Stop::Shutdown,
                _ = &mut evicted => {
                    let id = self.registered.as_ref().map(ConnGuard::id);
                    tracing::info!(peer = %self.conn.peer, connection = ?id, "connection closed by an administrator");
                    return Stop::Evicted;
                }
                _ = &mut writer_gone => return Stop::Closed,
                // Before reading: a peer that never stops sending must not
                // outlive its token.
                _ = &mut expiry, if expiry_armed.is_some() => return self.expire().await,
                Some(acked) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    if self.acked(acked).await.is_err() {
                        return Stop::Closed;
                    }
                }
                Some((request_id, settled)) = self.settling.next(), if !self.settling.is_empty() => {
                    if self.reply_settled(request_id, settled).await.is_err() {
                        return Stop::Closed;
                    }
                }
                r = rd.read_buf(&mut buf), if can_read => match r {
                    Ok(0) => {
                        if !buf.is_empty() {
                            tracing::debug!(peer = %self.conn.peer, buffered = buf.len(), "peer closed mid-frame");
                        }
                        return Stop::Closed;
                    }
                    Ok(n) => {
                        bytes_in.increment(n as u64);
                        deadline = Instant::now() + dead_after;
                    }
                    Err(e) => {
                        tracing::debug!(peer = %self.conn.peer, error = %e, "read failed");
                        return Stop::Closed;
                    }
                },
                _ = &mut silence => {
                    if Instant::now() < deadline {
                        silence.as_mut().reset(deadline);
                        continue;
                    }
                    tracing::info!(peer = %self.conn.peer, "peer silent for three heartbeats; closing");
                    return Stop::Closed;
                }
                // Reset lazily, like `silence`: the timer is moved only when
                // it fires, not every time a frame starts.
                _ = &mut frame_timer, if frame_deadline.is_some() => {
                    let due = frame_deadline.unwrap_or_else(Instant::now);
                    if Instant::now() < due {
                        frame_timer.as_mut().reset(due);
                        continue;
                    }
                    crate::metrics::refused("read_timeout");
                    let timeout = settings.read_timeout;
                    let buffered = buf.len();
                    tracing::info!(peer = %self.conn.peer, ?timeout, buffered, "frame not complete within the read timeout");
                    return self
                        .fatal(
                            ErrorCode::BadFrame,
                            format!("a frame did not arrive whole within the read timeout ({timeout:?})"),
                        )
                        .await;
                }
            }
        }
    }

    /// Whether to decode and read more requests: not while too many
    /// publishes, or too many of their payload bytes, await their acks. One
    /// publish of any size goes when none is in flight.
    fn may_read(&self) -> bool {
        let settings = &self.conn.settings;
        self.in_flight.len() + self.settling.len() < settings.max_in_flight
            && (self.in_flight.is_empty() || self.in_flight_bytes < settings.max_in_flight_bytes)
    }

    /// Replies to a publish whose acks arrived.
    async fn acked(&mut self, (request_id, bytes, reply, result): Acked) -> Result<(), Stop> {
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
        self.reply_publish(request_id, reply, result).await
    }

    /// Handles one request. `Err` closes the connection.
    async fn dispatch(&mut self, msg: ClientMessage) -> Result<(), Stop> {
        let engine = &self.conn.engine;
        match msg {
            ClientMessage::Hello { .. } | ClientMessage::HelloExt { .. } => {
                return Err(self
                    .fatal(ErrorCode::BadHello, "hello was already received".into())
                    .await);
            }
            ClientMessage::Publish {
                request_id,
                topic,
                event_type,
                headers,
                payload,
            } => {
                let mut payload = payload;
                if !self.granted(request_id, Action::Publish, &topic).await?
                    || !self.within_rate(request_id, 1).await?
                    || !self
                        .unpack(request_id, std::iter::once(&mut payload))
                        .await?
                {
                    return Ok(());
                }
                let event = wire::new_event(ringcast_protocol::NewEvent {
                    event_type,
                    headers,
                    payload,
                });
                self.start_publish(
                    request_id,
                    &topic,
                    vec![event],
                    Expected::default(),
                    AckReply::Published,
                )
                .await?;
            }
            ClientMessage::PublishBatch {
                request_id,
                topic,
                events,
            } => {
                let mut events = events;
                if !self.granted(request_id, Action::Publish, &topic).await?
                    || !self.within_rate(request_id, events.len()).await?
                    || !self
                        .unpack(request_id, events.iter_mut().map(|e| &mut e.payload))
                        .await?
                {
                    return Ok(());
                }
                let events = events.into_iter().map(wire::new_event).collect();
                self.start_publish(
                    request_id,
                    &topic,
                    events,
                    Expected::default(),
                    AckReply::Published,
                )
                .await?;
            }
            ClientMessage::Append {
                request_id,
                topic,
                events,
                expected_offset,
                expected_version,
            } => {
                self.require_version(3, "Append").await?;
                let mut events = events;
                if !self.granted(request_id, Action::Publish, &topic).await?
                    || !self.within_rate(request_id, events.len()).await?
                    || !self
                        .unpack(request_id, events.iter_mut().map(|e| &mut e.payload))
                        .await?
                {
                    return Ok(());
                }
                let events = events.into_iter().map(wire::append_event).collect();
                let expect = Expected {
                    offset: expected_offset,
                    version: expected_version,
                };
                self.start_publish(request_id, &topic, events, expect, AckReply::Appended)
                    .await?;
            }
            ClientMessage::Subscribe {
                request_id,
                subscription_id,
                topic,
                types,
                start,
            } => {
                if self.granted(request_id, Action::Subscribe, &topic).await? {
                    self.subscribe(request_id, subscription_id, topic, types, start)
                        .await?;
                }
            }
            ClientMessage::SubscribePattern {
                request_id,
                subscription_id,
                pattern,
                types,
                start,
                positions,
            } => {
                self.require_version(5, "SubscribePattern").await?;
                let request = PatternRequest {
                    pattern,
                    types,
                    start,
                    positions,
                };
                self.subscribe_pattern(request_id, subscription_id, request)
                    .await?;
            }
            ClientMessage::Unsubscribe {
                request_id,
                subscription_id,
            } => match self.pumps.remove(&subscription_id) {
                Some(pump) => {
                    pump.cancel.cancel();
                    // No push may follow the reply: wait for the pump to stop.
                    let _ = pump.handle.await;
                    self.reply(ServerMessage::Unsubscribed {
                        request_id,
                        subscription_id,
                    })
                    .await?;
                }
                None => {
                    self.error(
                        request_id,
                        ErrorCode::UnknownSubscription,
                        format!("no subscription {subscription_id} on this connection"),
                    )
                    .await?;
                }
            },
            ClientMessage::History {
                request_id,
                topic,
                after,
                types,
                limit,
            } => {
                if !self.granted(request_id, Action::Subscribe, &topic).await? {
                    return Ok(());
                }
                let limit = usize::try_from(limit)
                    .unwrap_or(MAX_HISTORY)
                    .min(MAX_HISTORY);
                let max_bytes = self.conn.settings.max_history_bytes;
                match engine.history_page(&topic, after, &types, limit, max_bytes) {
                    Ok(page) => {
                        // Keep the reply well inside the frame limit too (the
                        // engine bounds payload only); the first event always
                        // goes, so that paging makes progress.
                        let frame_budget = self.conn.settings.max_frame / 2;
                        let mut size = 0;
                        let mut events = Vec::with_capacity(page.events.len());
                        let mut next_after = page.next_after;
                        for e in &page.events {
                            let len = e.retained_size() as usize + topic.len();
                            if !events.is_empty() && size + len > frame_budget {
                                next_after = events
                                    .last()
                                    .map_or(after, |e: &ringcast_protocol::WireEvent| e.offset);
                                break;
                            }
                            size += len;
                            let mut event = wire::event(&topic, e);
                            if let Some(p) = &mut self.packing {
                                event.payload =
                                    compress::pack(p.compression, &e.payload, &mut p.sent);
                            }
                            events.push(event);
                        }
                        if let Some(p) = &mut self.packing {
                            p.sent.flush();
                        }
                        self.reply(ServerMessage::History {
                            request_id,
                            events,
                            next_after,
                            first_available: page.first_available,
                        })
                        .await?;
                    }
                    Err(e) => self.engine_error(request_id, e).await?,
                }
            }
            ClientMessage::ListTopics { request_id } => {
                // Only what the grants name: a listing must not reveal topics
                // the client could not otherwise learn of.
                let visible = self.principal.clone().filter(|_| self.conn.auth.enabled());
                let topics = engine
                    .topics()
                    .into_iter()
                    .filter(|t| visible.as_ref().is_none_or(|p| p.may_see(&t.name)))
                    .map(|t| TopicSummary {
                        name: t.name,
                        epoch: t.epoch,
                        last_offset: t.last_offset,
                        sealed: t.sealed,
                    })
                    .collect();
                self.reply(ServerMessage::Topics { request_id, topics })
                    .await?;
            }
            ClientMessage::TopicInfo { request_id, topic } => {
                if !self.granted(request_id, Action::Subscribe, &topic).await? {
                    return Ok(());
                }
                match self.conn.engine.info(&topic) {
                    Ok(info) => {
                        self.reply(ServerMessage::TopicInfo {
                            request_id,
                            info: wire::info(info),
                        })
                        .await?;
                    }
                    Err(e) => self.engine_error(request_id, e).await?,
                }
            }
            ClientMessage::Seal { request_id, topic } => {
                if !self.granted(request_id, Action::Admin, &topic).await? {
                    return Ok(());
                }
                match self.conn.engine.seal(&topic).await {
                    Ok(()) => self.reply(ServerMessage::Ok { request_id }).await?,
                    Err(e) => self.engine_error(request_id, e).await?,
                }
            }
            ClientMessage::Delete { request_id, topic } => {
                if !self.granted(request_id, Action::Admin, &topic).await? {
                    return Ok(());
                }
                match self.conn.engine.delete(&topic).await {
                    Ok(()) => self.reply(ServerMessage::Ok { request_id }).await?,
                    Err(e) => self.engine_error(request_id, e).await?,
                }
            }
            ClientMessage::Ping { request_id } => {
                self.reply(ServerMessage::Pong { request_id }).await?;
            }
            ClientMessage::Refresh {
                request_id,
                credentials,
            } => {
                self.require_version(2, "Refresh").await?;
                self.refresh(request_id, &credentials).await?;
            }
            ClientMessage::CreateGroup {
                request_id,
                topic,
                group,
                options,
                update,
            } => {
                self.require_version(4, "CreateGroup").await?;
                // Creating a missing group is consuming; changing one is admin.
                let action = if update {
                    Action::Admin
                } else {
                    Action::Subscribe
                };
                if self.granted(request_id, action, &topic).await?
                    && self.may_dead_letter(request_id, &options).await?
                {
                    let created = engine
                        .create_group(&topic, &group, wire::group_config(options), update)
                        .await;
                    self.reply_group_info(request_id, created).await?;
                }
            }
            ClientMessage::JoinGroup {
                request_id,
                subscription_id,
                topic,
                group,
                consumer,
                max_in_flight,
                create,
            } => {
                self.require_version(4, "JoinGroup").await?;
                let may_create = match &create {
                    Some(options) => self.may_dead_letter(request_id, options).await?,
                    None => true,
                };
                if may_create && self.granted(request_id, Action::Subscribe, &topic).await? {
                    let create = create.map(wire::group_config);
                    self.join_group(
                        request_id,
                        subscription_id,
                        (topic, group, consumer),
                        max_in_flight,
                        create,
                    )
                    .await?;
                }
            }
            ClientMessage::LeaveGroup {
                request_id,
                subscription_id,
            } => {
                self.require_version(4, "LeaveGroup").await?;
                match self.pumps.remove(&subscription_id) {
                    Some(pump) if pump.group.is_some() => {
                        if let Some((_, clean)) = &pump.group {
                            clean.store(true, Ordering::Release);
                        }
                        pump.cancel.cancel();
                        let _ = pump.handle.await;
                        self.reply(ServerMessage::Unsubscribed {
                            request_id,
                            subscription_id,
                        })
                        .await?;
                    }
                    other => {
                        if let Some(pump) = other {
                            self.pumps.insert(subscription_id, pump);
                        }
                        self.error(
                            request_id,
                            ErrorCode::GroupNotFound,
                            format!("no group membership {subscription_id} on this connection"),
                        )
                        .await?;
                    }
                }
            }
            ClientMessage::Settle {
                request_id,
                subscription_id,
                offsets,
                action,
            } => {
                self.require_version(4, "Settle").await?;
                let settler = self
                    .pumps
                    .get(&subscription_id)
                    .and_then(|p| Some(p.group.as_ref()?.0.clone()));
                let Some(settler) = settler else {
                    return self
                        .error(
                            request_id,
                            ErrorCode::GroupNotFound,
                            format!("no group membership {subscription_id} on this connection"),
                        )
                        .await;
                };
                match settler.settle(&offsets, wire::settle(action)) {
                    Ok(pending) => self.settling.push(Settling {
                        request_id,
                        pending,
                    }),
                    Err(e) => self.engine_error(request_id, e).await?,
                }
            }
            ClientMessage::GroupInfo {
                request_id,
                topic,
                group,
            } => {
                self.require_version(4, "GroupInfo").await?;
                if self.granted(request_id, Action::Subscribe, &topic).await? {
                    let info = engine.group_info(&topic, &group);
                    self.reply_group_info(request_id, info).await?;
                }
            }
            ClientMessage::ListGroups { request_id, topic } => {
                self.require_version(4, "ListGroups").await?;
                if self.granted(request_id, Action::Subscribe, &topic).await? {
                    match engine.groups(&topic) {
                        Ok(groups) => {
                            let groups = groups.into_iter().map(wire::group_info).collect();
                            self.reply(ServerMessage::Groups { request_id, groups })
                                .await?;
                        }
                        Err(e) => self.engine_error(request_id, e).await?,
                    }
                }
            }
            ClientMessage::DeleteGroup {
                request_id,
                topic,
                group,
            } => {
                self.require_version(4, "DeleteGroup").await?;
                if self.granted(request_id, Action::Admin, &topic).await? {
                    match engine.delete_group(&topic, &group).await {
                        Ok(()) => self.reply(ServerMessage::Ok { request_id }).await?,
                        Err(e) => self.engine_error(request_id, e).await?,
                    }
                }
            }
            ClientMessage::Redrive {
                request_id,
                topic,
                group,
            } => {
                self.require_version(4, "Redrive").await?;
                if self.granted(request_id, Action::Admin, &topic).await? {
                    match engine.redrive(&topic, &group).await {
                        Ok(count) => {
                            self.reply(ServerMessage::Redriven { request_id, count })
                                .await?;
                        }
                        Err(e) => self.engine_error(request_id, e).await?,
                    }
                }
            }
            ClientMessage::ListConnections {
                request_id,
                after,
                limit,
            } => {
                self.require_version(5, "ListConnections").await?;
                if self
                    .granted_everywhere(request_id, "list connections")
                    .await?
                {
                    self.list_connections(request_id, after, limit).await?;
                }
            }
            ClientMessage::CloseConnection {
                request_id,
                connection_id,
            } => {
                self.require_version(5, "CloseConnection").await?;
                if self
                    .granted_everywhere(request_id, "close connections")
                    .await?
                {
                    // Not awaited: the connection may be this one, which
                    // answers first and then says goodbye.
                    match self.conn.conns.close(connection_id) {
                        Some(_) => {
                            tracing::info!(peer = %self.conn.peer, connection_id, "closing a connection on request");
                            self.reply(ServerMessage::Ok { request_id }).await?;
                        }
                        None => {
                            self.error(
                                request_id,
                                ErrorCode::ConnectionNotFound,
                                format!("no live connection {connection_id}"),
                            )
                            .await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Answers one page of `ListConnections`: at most `limit` connections
    /// (and about half a frame) after id `after`, lags filled in.
    async fn list_connections(
        &mut self,
        request_id: u64,
        after: u64,
        limit: u32,
    ) -> Result<(), Stop> {
        let limit = match usize::try_from(limit) {
            Ok(0) | Err(_) => MAX_CONNECTIONS_PAGE,
            Ok(n) => n.min(MAX_CONNECTIONS_PAGE),
        };
        // One more than asked, to know whether another page follows.
        let mut page = self.conn.conns.page(after, limit + 1);
        let mut more = page.len() > limit;
        page.truncate(limit);
        crate::conns::fill_lag(&self.conn.engine, &mut page);
        // Keep the reply well inside the frame limit; the first connection
        // always goes, so that paging makes progress.
        let budget = self.conn.settings.max_frame / 2;
        let mut size = 0;
        let mut connections = Vec::with_capacity(page.len());
        for c in page {
            let len = 96
                + c.subject.as_ref().map_or(0, String::len)
                + c.subscriptions
                    .iter()
                    .map(|s| 80 + s.topic.len() + s.group.as_ref().map_or(0, String::len))
                    .sum::<usize>();
            if !connections.is_empty() && size + len > budget {
                more = true;
                break;
            }
            size += len;
            connections.push(wire::connection(c));
        }
        let next_after = match connections.last() {
            Some(last) if more => last.id,
            _ => 0,
        };
        self.reply(ServerMessage::Connections {
            request_id,
            connections,
            next_after,
        })
        .await
    }

    /// Dead letters are appended by the broker: a group naming its own
    /// dead-letter topic needs the publish grant there.
    async fn may_dead_letter(
        &mut self,
        request_id: u64,
        options: &ringcast_protocol::GroupOptions,
    ) -> Result<bool, Stop> {
        match &options.dead_letter_topic {
            Some(dlq) => self.granted(request_id, Action::Publish, dlq).await,
            None => Ok(true),
        }
    }

    async fn reply_group_info(
        &mut self,
        request_id: u64,
        info: Result<crate::engine::GroupInfo, EngineError>,
    ) -> Result<(), Stop> {
        match info {
            Ok(info) => {
                self.reply(ServerMessage::GroupInfo {
                    request_id,
                    info: wire::group_info(info),
                })
                .await
            }
            Err(e) => self.engine_error(request_id, e).await,
        }
    }

    async fn reply_settled(
        &mut self,
        request_id: u64,
        settled: Result<Settled, EngineError>,
    ) -> Result<(), Stop> {
        match settled {
            Ok(s) => {
                self.reply(ServerMessage::Settled {
                    request_id,
                    applied: s.applied,
                    already_done: s.already_done,
                    unknown: s.unknown,
                })
                .await
            }
            Err(e) => self.engine_error(request_id, e).await,
        }
    }

    /// Joins a group and starts the pump pushing its deliveries.
    async fn join_group(
        &mut self,
        request_id: u64,
        subscription_id: u64,
        (topic, group, consumer): (String, String, String),
        max_in_flight: u32,
        create: Option<crate::engine::GroupConfig>,
    ) -> Result<(), Stop> {
        if !self
            .room_for_subscription(request_id, subscription_id)
            .await?
        {
            return Ok(());
        }
        let member = match self
            .conn
            .engine
            .join_group(&topic, &group, &consumer, max_in_flight, create)
            .await
        {
            Ok(m) => m,
            Err(e) => return self.engine_error(request_id, e).await,
        };
        let epoch = self
            .conn
            .engine
            .info(&topic)
            .map(|i| i.epoch)
            .unwrap_or_default();
        // Listed before the client can see its `Joined`.
        let registered = self
            .registered
            .as_ref()
            .map(|r| r.tcp_subscription(subscription_id, &topic, Some(&group), epoch, 0));
        self.reply(ServerMessage::Joined {
            request_id,
            subscription_id,
            epoch,
        })
        .await?;
        self.flush().await?;
        let cancel = CancellationToken::new();
        let clean = Arc::new(AtomicBool::new(false));
        let settler = member.settler();
        let handle = self.conn.tracker.spawn(group_pump(
            member,
            subscription_id,
            self.out.clone(),
            self.outbound.clone(),
            self.chunk,
            cancel.clone(),
            clean.clone(),
            registered,
            self.compression(),
        ));
        tracing::debug!(peer = %self.conn.peer, topic, group, consumer, subscription_id, "joined a consumer group");
        self.pumps.insert(
            subscription_id,
            Pump {
                topic,
                group: Some((settler, clean)),
                pattern: None,
                cancel,
                handle,
            },
        );
        Ok(())
    }

    /// Whether a new subscription or membership `subscription_id` may
    /// start; if not, answers the request with why.
    async fn room_for_subscription(
        &mut self,
        request_id: u64,
        subscription_id: u64,
    ) -> Result<bool, Stop> {
        self.pumps.retain(|_, p| !p.handle.is_finished());
        if self.pumps.contains_key(&subscription_id) {
            self.error(
                request_id,
                ErrorCode::DuplicateSubscription,
                format!("subscription id {subscription_id} is already in use"),
            )
            .await?;
            return Ok(false);
        }
        let max = self.conn.settings.max_subscriptions;
        if self.pumps.len() >= max {
            tracing::warn!(peer = %self.conn.peer, limit = max, "subscription refused: too many on one connection");
            crate::metrics::refused("max_subscriptions_per_connection");
            self.error(
                request_id,
                ErrorCode::TooManySubscriptions,
                format!("at most {max} subscriptions per connection"),
            )
            .await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Refuses a message this connection's protocol version does not have
    /// as a server of that version would answer its unknown tag: `BadFrame`
    /// and a close.
    async fn require_version(&mut self, min: u16, message: &str) -> Result<(), Stop> {
        if self.version >= min {
            return Ok(());
        }
        let why = format!(
            "{message} needs protocol version {min}; this connection speaks {}",
            self.version
        );
        Err(self.fatal(ErrorCode::BadFrame, why).await)
    }

    /// Whether the principal may do `action` on `topic`; if not, answers
    /// the request with the refusal (`unauthorized` for anonymous clients,
    /// else `forbidden`). One pattern match, before the engine is asked
    /// anything: the answer is the same whether the topic exists or not.
    async fn granted(
        &mut self,
        request_id: u64,
        action: Action,
        topic: &str,
    ) -> Result<bool, Stop> {
        let denied = match &self.principal {
            Some(p) if p.may(action, topic) => return Ok(true),
            Some(p) => p.refusal(action, topic),
            // Requests are dispatched only after hello set the principal.
            None => return Err(self.fatal(ErrorCode::BadHello, "no hello".into()).await),
        };
        crate::metrics::auth_refused("tcp", denied.code());
        tracing::debug!(peer = %self.conn.peer, request_id, action = action.as_str(), %denied, "request refused by access control");
        self.error(request_id, access::code(&denied), denied.to_string())
            .await?;
        Ok(false)
    }

    /// Whether the principal holds the admin grant on every topic, which
    /// broker-wide requests need (`what` names the request in the refusal);
    /// if not, answers the request with the refusal.
    async fn granted_everywhere(&mut self, request_id: u64, what: &str) -> Result<bool, Stop> {
        let denied = match &self.principal {
            Some(p) if p.may_everywhere(Action::Admin) => return Ok(true),
            Some(p) => p.refusal_everywhere(Action::Admin, what),
            None => return Err(self.fatal(ErrorCode::BadHello, "no hello".into()).await),
        };
        crate::metrics::auth_refused("tcp", denied.code());
        tracing::debug!(peer = %self.conn.peer, request_id, %denied, "request refused by access control");
        self.error(request_id, access::code(&denied), denied.to_string())
            .await?;
        Ok(false)
    }

    /// Takes `events` publishes from the principal's rate budget; if it is
    /// spent, answers `RetryLater` (or `InvalidRequest` for a batch larger
    /// than the whole burst). A refused request stores nothing.
    async fn within_rate(&mut self, request_id: u64, events: usize) -> Result<bool, Stop> {
        let Some(principal) = &self.principal else {
            return Err(self.fatal(ErrorCode::BadHello, "no hello".into()).await);
        };
        let n = u32::try_from(events).unwrap_or(u32::MAX);
        let limited = match self.conn.auth.limits().check_publish(principal, n) {
            Ok(()) => return Ok(true),
            Err(limited) => limited,
        };
        tracing::debug!(peer = %self.conn.peer, request_id, events, ?limited, "publish refused by the rate limit");
        match limited {
            Limited::RetryAfter(wait) => {
                let rate = self.conn.auth.config().rate.publish_per_second;
                let message = format!(
                    "publish rate limit reached ({rate} events per second for these credentials); retry after {} ms",
                    access::retry_after_ms(wait)
                );
                self.retry_later(request_id, ErrorCode::RateLimited, message, wait)
                    .await?;
            }
            Limited::TooLarge { requested, burst } => {
                self.error(
                    request_id,
                    ErrorCode::InvalidRequest,
                    format!(
                        "a batch of {requested} events exceeds auth.rate.publish_burst ({burst})"
                    ),
                )
                .await?;
            }
        }
        Ok(false)
    }

    /// On a connection with compression on, decodes a request's marked
    /// payloads in place; when one cannot be read (or they would
    /// decompress to more than `max_payload` each, `max_frame` together),
    /// answers the request with why, and nothing of it is stored.
    async fn unpack<'p>(
        &mut self,
        request_id: u64,
        payloads: impl Iterator<Item = &'p mut Bytes>,
    ) -> Result<bool, Stop> {
        let Some(p) = &mut self.packing else {
            return Ok(true);
        };
        let settings = &self.conn.settings;
        let max_payload = usize::try_from(settings.max_payload).unwrap_or(usize::MAX);
        let mut payloads: Vec<&mut Bytes> = payloads.collect();
        let unpacked = compress::unpack(
            p.compression,
            &mut payloads,
            max_payload,
            settings.max_frame,
            &mut p.received,
        );
        match unpacked {
            Ok(()) => Ok(true),
            Err((code, message)) => {
                tracing::debug!(peer = %self.conn.peer, request_id, %message, "publish refused: a payload cannot be read");
                self.error(request_id, code, message).await?;
                Ok(false)
            }
        }
    }

    /// Replaces the credentials: same subject and kind, or nothing changes.
    /// Subscriptions the new grants do not cover end first, each with an
    /// `Unsubscribed` carrying the refresh's request id.
    async fn refresh(&mut self, request_id: u64, credentials: &str) -> Result<(), Stop> {
        let auth = self.conn.auth.clone();
        let Some(current) = self.principal.clone() else {
            return Err(self.fatal(ErrorCode::BadHello, "no hello".into()).await);
        };
        let refused = match auth.authenticate(Some(credentials), Some(self.conn.peer.ip())) {
            Err(denied) => Some((denied.code(), access::code(&denied), denied.to_string())),
            Ok(_) if !auth.enabled() => None,
            Ok(new) if new.kind() == Kind::Anonymous => Some((
                "unauthorized",
                ErrorCode::Unauthorized,
                "refresh needs credentials: a JWT or an API key".into(),
            )),
            Ok(new) if new.kind() != current.kind() || new.subject() != current.subject() => {
                Some((
                    "forbidden",
                    ErrorCode::Forbidden,
                    "refresh must keep the same subject; reconnect to change identity".into(),
                ))
            }
            Ok(new) if !new.has_any_grant() => Some((
                "forbidden",
                ErrorCode::Forbidden,
                "the new credentials grant nothing; the old ones stay in force".into(),
            )),
            Ok(new) => {
                self.end_uncovered(request_id, &new).await?;
                self.expires_at = new.deadline();
                let expires_at_ms = access::expires_at_ms(&new);
                tracing::debug!(peer = %self.conn.peer, subject = ?new.subject(), expires_at_ms, "credentials refreshed");
                self.principal = Some(new);
                return self
                    .reply(ServerMessage::Refreshed {
                        request_id,
                        expires_at_ms,
                    })
                    .await;
            }
        };
        match refused {
            Some((metric, code, message)) => {
                crate::metrics::auth_refused("tcp", metric);
                tracing::info!(peer = %self.conn.peer, ?code, %message, "refresh refused; the old credentials stay in force");
                self.error(request_id, code, message).await
            }
            // Auth is off: every client may do everything, forever.
            None => {
                self.reply(ServerMessage::Refreshed {
                    request_id,
                    expires_at_ms: 0,
                })
                .await
            }
        }
    }

    /// Ends every subscription `principal` may not read, telling the client
    /// with `Unsubscribed { request_id, .. }` for each.
    async fn end_uncovered(&mut self, request_id: u64, principal: &Principal) -> Result<(), Stop> {
        self.pumps.retain(|_, p| !p.handle.is_finished());
        let mut ended: Vec<u64> = self
            .pumps
            .iter()
            .filter(|(_, p)| match &p.pattern {
                // Its topics, and the grants checked for those joining later.
                Some(access) => !access.refresh(principal),
                None => !principal.may(Action::Subscribe, &p.topic),
            })
            .map(|(id, _)| *id)
            .collect();
        ended.sort_unstable();
        for subscription_id in ended {
            if let Some(pump) = self.pumps.remove(&subscription_id) {
                pump.cancel.cancel();
                // No push may follow the `Unsubscribed`.
                let _ = pump.handle.await;
                tracing::info!(peer = %self.conn.peer, topic = %pump.topic, subscription_id, "subscription ended: the refreshed credentials do not cover it");
                self.reply(ServerMessage::Unsubscribed {
                    request_id,
                    subscription_id,
                })
                .await?;
            }
        }
        Ok(())
    }

    /// The token expired without a refresh: stop pushing, deliver the acks
    /// of publishes already taken, then say why and close.
    async fn expire(&mut self) -> Stop {
        crate::metrics::auth_refused("tcp", "token_expired");
        tracing::info!(peer = %self.conn.peer, subject = ?self.principal.as_ref().and_then(|p| p.subject()), "token expired; closing the connection");
        for pump in self.pumps.values() {
            pump.cancel.cancel();
        }
        for (_, pump) in self.pumps.drain() {
            let _ = pump.handle.await;
        }
        self.drain_acks().await;
        self.fatal(
            ErrorCode::TokenExpired,
            "the token expired; reconnect with a fresh token, or send refresh before it expires"
                .into(),
        )
        .await
    }

    async fn start_publish(
        &mut self,
        request_id: u64,
        topic: &str,
        events: Vec<crate::engine::NewEvent>,
        expect: Expected,
        reply: AckReply,
    ) -> Result<(), Stop> {
        let bytes = events.iter().map(|e| e.payload.len() as u64).sum();
        match self
            .conn
            .engine
            .start_publish_expecting(topic, events, expect)
            .await
        {
            Ok(mut acks) => {
                // Already acknowledged (memory mode): answer without queueing.
                if let Some(result) = acks.take_ready() {
                    return self.reply_publish(request_id, reply, result).await;
                }
                self.in_flight_bytes += bytes;
                self.in_flight.push(InFlight {
                    request_id,
                    bytes,
                    reply,
                    acks,
                });
                Ok(())
            }
            Err(e) => self.engine_error(request_id, e).await,
        }
    }

    async fn reply_publish(
        &mut self,
        request_id: u64,
        reply: AckReply,
        result: Result<Vec<Ack>, EngineError>,
    ) -> Result<(), Stop> {
        // Written by hand, straight from the engine's acks: one reply per
        // publish is the hottest thing the broker encodes.
        let encoded = match (result, reply) {
            (Ok(acks), AckReply::Published) => ringcast_protocol::encode_published_frame(
                request_id,
                acks.into_iter().map(wire::ack),
                &mut self.replies,
            ),
            (Ok(acks), AckReply::Appended) => ringcast_protocol::encode_appended_frame(
                request_id,
                acks.into_iter().map(wire::append_ack),
                &mut self.replies,
            ),
            (Err(e), _) => return self.engine_error(request_id, e).await,
        };
        encoded.map_err(|_| Stop::Closed)?;
        if self.replies.len() >= self.chunk {
            self.flush().await?;
        }
        Ok(())
    }

    async fn subscribe(
        &mut self,
        request_id: u64,
        subscription_id: u64,
        topic: String,
        types: Vec<String>,
        start: ringcast_protocol::Start,
    ) -> Result<(), Stop> {
        if !self
            .room_for_subscription(request_id, subscription_id)
            .await?
        {
            return Ok(());
        }
        let sub = match self
            .conn
            .engine
            .subscribe(&topic, types, wire::start(start))
        {
            Ok(sub) => sub,
            Err(e) => return self.engine_error(request_id, e).await,
        };
        // Listed before the client can see its `Subscribed`.
        let registered = self.registered.as_ref().map(|r| {
            let position = sub.start_offset().saturating_sub(1);
            r.tcp_subscription(subscription_id, &topic, None, sub.epoch(), position)
        });
        self.reply(ServerMessage::Subscribed {
            request_id,
            subscription_id,
            epoch: sub.epoch(),
            next_offset: sub.live_offset(),
        })
        .await?;
        // `Subscribed` must reach the writer before the first push.
        self.flush().await?;
        let cancel = CancellationToken::new();
        let handle = self.conn.tracker.spawn(pump(
            sub,
            subscription_id,
            self.out.clone(),
            self.outbound.clone(),
            self.chunk,
            cancel.clone(),
            registered,
            self.compression(),
        ));
        tracing::debug!(peer = %self.conn.peer, topic, subscription_id, "subscribed");
        self.pumps.insert(
            subscription_id,
            Pump {
                topic,
                group: None,
                pattern: None,
                cancel,
                handle,
            },
        );
        Ok(())
    }

    /// Starts a pattern subscription: its checks, the engine's
    /// [`MultiSubscription`](crate::engine::MultiSubscription) over what
    /// the principal may read, `PatternSubscribed`, then its pump.
    async fn subscribe_pattern(
        &mut self,
        request_id: u64,
        subscription_id: u64,
        request: PatternRequest,
    ) -> Result<(), Stop> {
        let Some(principal) = self.principal.clone() else {
            return Err(self.fatal(ErrorCode::BadHello, "no hello".into()).await);
        };
        if !self
            .room_for_subscription(request_id, subscription_id)
            .await?
        {
            return Ok(());
        }
        let settings = &self.conn.settings;
        let limits = pattern::PatternLimits {
            max_stream_topics: settings.max_stream_topics,
            max_pattern_matches: settings.max_pattern_matches,
        };
        let name = request.pattern.clone();
        let access = PatternAccess::new(principal);
        let selection = match pattern::selection(request, limits, &access) {
            Ok(selection) => selection,
            Err((code, message)) => return self.error(request_id, code, message).await,
        };
        let multi = match self.conn.engine.subscribe_many(selection) {
            Ok(multi) => multi,
            Err(e) => return self.engine_error(request_id, e).await,
        };
        let topics = pattern::positions(&multi, &access);
        // Listed before the client can see its `PatternSubscribed`.
        let registered = self
            .registered
            .as_ref()
            .map(|r| r.tcp_subscription(subscription_id, &name, None, 0, 0));
        let matched = topics.len();
        self.reply(ServerMessage::PatternSubscribed {
            request_id,
            subscription_id,
            topics,
        })
        .await?;
        // `PatternSubscribed` must reach the writer before the first push.
        self.flush().await?;
        let cancel = CancellationToken::new();
        let handle = self.conn.tracker.spawn(pattern::pattern_pump(
            multi,
            subscription_id,
            self.out.clone(),
            self.outbound.clone(),
            self.chunk,
            cancel.clone(),
            access.clone(),
            registered,
            self.compression(),
        ));
        tracing::debug!(peer = %self.conn.peer, pattern = name, matched, subscription_id, "subscribed to a pattern");
        self.pumps.insert(
            subscription_id,
            Pump {
                topic: name,
                group: None,
                pattern: Some(access),
                cancel,
                handle,
            },
        );
        Ok(())
    }

    /// On graceful shutdown (or an operator's close): deliver the acks of
    /// publishes already queued, then tell the client to reconnect (and
    /// resume) elsewhere or later.
    async fn say_goodbye(&mut self, reason: &str) {
        if !self.drain_acks().await {
            return;
        }
        let _ = self
            .send(&ServerMessage::Shutdown {
                reason: reason.into(),
            })
            .await;
        let _ = self.flush().await;
    }

    /// Answers the publishes still awaiting their acks (for up to the write
    /// timeout); `false` when the writer is gone.
    async fn drain_acks(&mut self) -> bool {
        let deadline = Instant::now() + self.conn.write_timeout();
        while let Ok(Some(acked)) = tokio::time::timeout_at(deadline, self.in_flight.next()).await {
            if self.acked(acked).await.is_err() {
                return false;
            }
        }
        while let Ok(Some((request_id, settled))) =
            tokio::time::timeout_at(deadline, self.settling.next()).await
        {
            if self.reply_settled(request_id, settled).await.is_err() {
                return false;
            }
        }
        true
    }

    /// The payload compression in force, for the pumps.
    fn compression(&self) -> Option<Compression> {
        self.packing.as_ref().map(|p| p.compression)
    }

    /// Queues a reply; it reaches the writer at the next [`flush`](Self::flush)
    /// (or at once when the queue is large).
    async fn send(&mut self, msg: &ServerMessage) -> Result<(), Stop> {
        encode_frame(msg, &mut self.replies).map_err(|_| Stop::Closed)?;
        if self.replies.len() >= self.chunk {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hands queued replies to the writer.
    async fn flush(&mut self) -> Result<(), Stop> {
        if self.replies.is_empty() {
            return Ok(());
        }
        let frames = self.replies.split().freeze();
        send_charged(&self.out, &self.outbound, frames)
            .await
            .map_err(|_| Stop::Closed)
    }

    async fn reply(&mut self, msg: ServerMessage) -> Result<(), Stop> {
        self.send(&msg).await
    }

    async fn error(
        &mut self,
        request_id: u64,
        code: ErrorCode,
        message: String,
    ) -> Result<(), Stop> {
        self.send(&access::error(
            self.version,
            Some(request_id),
            code,
            message,
        ))
        .await
    }

    /// Answers a request that succeeds if retried after `wait`.
    async fn retry_later(
        &mut self,
        request_id: u64,
        code: ErrorCode,
        message: String,
        wait: Duration,
    ) -> Result<(), Stop> {
        self.send(&access::retry_later(
            self.version,
            Some(request_id),
            code,
            message,
            wait,
        ))
        .await
    }

    async fn engine_error(&mut self, request_id: u64, e: EngineError) -> Result<(), Stop> {
        tracing::debug!(peer = %self.conn.peer, request_id, error = %e, "request refused");
        if let EngineError::PositionMismatch {
            current_offset,
            current_version,
        } = e
        {
            if self.version >= 3 {
                return self
                    .reply(ServerMessage::PositionMismatch {
                        request_id,
                        message: e.to_string(),
                        current_offset,
                        current_version,
                    })
                    .await;
            }
        }
        self.error(request_id, wire::error_code(&e), e.to_string())
            .await
    }

    /// Sends a connection-level error; the connection then closes.
    async fn fatal(&mut self, code: ErrorCode, message: String) -> Stop {
        tracing::info!(peer = %self.conn.peer, ?code, %message, "closing connection on protocol error");
        let _ = self
            .send(&access::error(self.version, None, code, message))
            .await;
        let _ = self.flush().await;
        Stop::Closed
    }
}

/// Moves deliveries of one subscription to the connection's writer,
/// encoding several (up to `chunk` bytes) per hand-off: each event straight
/// into the chunk, or copied from its shared frame when several live
/// subscribers take it (`Subscription::shares`). It pulls from the
/// subscription only while the connection's budget has room, so a peer that
/// does not read leaves the subscription behind in the ring (where it costs
/// nothing and later yields one `gap(slow_consumer)`), not in our buffers.
/// Each hand-off is recorded in `registered` (position, events). With
/// `compression`, payloads are marked and compressed (see [`compress`]).
#[allow(clippy::too_many_arguments)] // the subscription, the writer, how it stops, the registry, the payloads
async fn pump(
    mut sub: Subscription,
    subscription_id: u64,
    out: mpsc::Sender<Bytes>,
    outbound: Arc<Outbound>,
    chunk: usize,
    cancel: CancellationToken,
    registered: Option<SubHandle>,
    compression: Option<Compression>,
) {
    let topic = sub.topic().to_owned();
    let mut packing = compression.map(|c| (c, Meter::new("out")));
    let mut epoch = sub.epoch();
    let mut position = sub.start_offset().saturating_sub(1);
    let mut buf = BytesMut::new();
    let delivered = metrics::counter!(crate::metrics::DELIVERED, "transport" => "tcp");
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        let first = tokio::select! {
            biased;
            _ = &mut cancelled => return,
            d = async {
                outbound.room().await.ok()?;
                sub.recv().await
            } => d,
        };
        let Some(mut delivery) = first else { return };
        let mut ended = false;
        // Counted per hand-off, not per event: one shared atomic bumped by
        // every pump for every event is a contended cache line.
        let mut events = 0;
        loop {
            ended |= matches!(delivery, Delivery::End { .. });
            let msg = match delivery {
                Delivery::Event(e) => {
                    events += 1;
                    position = e.offset;
                    compress::put_event(
                        &mut buf,
                        subscription_id,
                        &topic,
                        &e,
                        Some(&sub),
                        packing.as_mut().map(|(c, m)| (*c, m)),
                    );
                    None
                }
                Delivery::Gap(g) => {
                    epoch = g.epoch;
                    // A whole-topic gap counts in offsets; delivery goes on after `current`.
                    if g.event_type.is_none() {
                        position = g.current;
                    }
                    Some(ServerMessage::Gap {
                        subscription_id,
                        gap: wire::gap(g),
                    })
                }
                Delivery::End { last_offset } => Some(ServerMessage::End {
                    subscription_id,
                    topic: topic.clone(),
                    last_offset,
                }),
            };
            if let Some(msg) = msg {
                if let Err(e) = encode_frame(&msg, &mut buf) {
                    tracing::error!(error = %e, "cannot encode a delivery");
                }
            }
            if ended || buf.len() >= chunk {
                break;
            }
            match sub.try_recv() {
                Some(d) => delivery = d,
                None => break,
            }
        }
        delivered.increment(events);
        if let Some((_, m)) = &mut packing {
            m.flush();
        }
        // Before the hand-off, so that the listing has it by the time the
        // client has the events.
        if let Some(r) = &registered {
            r.advance(epoch, position, events);
        }
        let frames = buf.split().freeze();
        tokio::select! {
            biased;
            _ = &mut cancelled => return,
            r = send_charged(&out, &outbound, frames) => if r.is_err() { return },
        }
        if ended {
            return;
        }
    }
}

/// Most deliveries a group pump takes from the engine at once.
const GROUP_BATCH: usize = 256;

/// Pushes a group member's deliveries (and gaps for lost work) to the
/// connection's writer. It takes work only while the connection's budget
/// has room; the engine bounds what the member holds unsettled. Cancelled
/// with `clean` set, the member leaves cleanly (its events are redelivered
/// at once); otherwise, as on a disconnect, they wait for their deadlines.
/// Each fetch is recorded in `registered` (highest offset, deliveries).
/// With `compression`, payloads are marked and compressed (one member gets
/// each delivery: nothing to share).
#[allow(clippy::too_many_arguments)] // the membership, the writer, how it stops, the registry, the payloads
async fn group_pump(
    member: GroupMember,
    subscription_id: u64,
    out: mpsc::Sender<Bytes>,
    outbound: Arc<Outbound>,
    chunk: usize,
    cancel: CancellationToken,
    clean: Arc<AtomicBool>,
    registered: Option<SubHandle>,
    compression: Option<Compression>,
) {
    let topic = member.topic().to_owned();
    let mut packing = compression.map(|c| (c, Meter::new("out")));
    let mut highest = 0;
    let delivered = metrics::counter!(crate::metrics::DELIVERED, "transport" => "tcp_group");
    let mut buf = BytesMut::new();
    'pump: loop {
        let fetched = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            f = async {
                outbound.room().await.ok()?;
                Some(member.next(GROUP_BATCH).await)
            } => f,
        };
        let fetched = match fetched {
            Some(Ok(f)) => f,
            Some(Err(EngineError::GroupNotFound(_))) => {
                // The group (or its topic) was deleted: the membership is
                // over, and the member is told so.
                let end = ServerMessage::End {
                    subscription_id,
                    topic: topic.clone(),
                    last_offset: 0,
                };
                if encode_frame(&end, &mut buf).is_ok() {
                    let _ = send_charged(&out, &outbound, buf.split().freeze()).await;
                }
                break;
            }
            // The connection is closing.
            _ => break,
        };
        delivered.increment(fetched.deliveries.len() as u64);
        if let Some(r) = &registered {
            let epoch = fetched.gaps.last().map(|g| g.epoch);
            highest = fetched
                .deliveries
                .iter()
                .map(|d| d.event.offset)
                .fold(highest, u64::max);
            r.advance(
                epoch.unwrap_or_else(|| r.epoch()),
                highest,
                fetched.deliveries.len() as u64,
            );
        }
        for gap in fetched.gaps {
            let msg = ServerMessage::Gap {
                subscription_id,
                gap: wire::gap(gap),
            };
            if let Err(e) = encode_frame(&msg, &mut buf) {
                tracing::error!(error = %e, "cannot encode a gap");
            }
        }
        for d in fetched.deliveries {
            let packed = packing
                .as_mut()
                .map(|(c, m)| compress::pack(*c, &d.event.payload, m));
            let msg = wire::DeliveryRef {
                subscription_id,
                attempt: d.attempt,
                topic: &topic,
                event: &d.event,
                payload: packed.as_deref().unwrap_or(&d.event.payload),
            };
            if let Err(e) = encode_frame(&msg, &mut buf) {
                tracing::error!(error = %e, "cannot encode a delivery");
            }
            if buf.len() >= chunk {
                let frames = buf.split().freeze();
                if send_charged(&out, &outbound, frames).await.is_err() {
                    break 'pump;
                }
            }
        }
        if let Some((_, m)) = &mut packing {
            m.flush();
        }
        if !buf.is_empty() {
            let frames = buf.split().freeze();
            if send_charged(&out, &outbound, frames).await.is_err() {
                break;
            }
        }
    }
    if clean.load(Ordering::Acquire) {
        member.leave();
    }
}

/// Hands `frames` to the writer, charged to the byte budget. The channel
/// slot is taken first and the send follows the charge with no await in
/// between, so a caller cancelled while waiting (an unsubscribed pump)
/// never leaves bytes charged that the writer will not release.
pub(super) async fn send_charged(
    out: &mpsc::Sender<Bytes>,
    outbound: &Outbound,
    frames: Bytes,
) -> Result<(), ()> {
    let slot = out.reserve().await.map_err(|_| ())?;
    outbound.charge(frames.len()).await.map_err(|_| ())?;
    slot.send(frames);
    Ok(())
}

/// Byte range of the subscription id in an encoded `Event` frame: after the
/// 4-byte length and the 4-byte variant tag (`docs/protocol.md`).
const SUBSCRIPTION_ID_AT: std::ops::Range<usize> = 8..16;

/// The `Event` frame of `event` with subscription id 0: encoded once per
/// event and shared by every TCP subscriber, each copy patching the id.
pub(super) fn shared_event_frame(topic: &str, event: &Event) -> Bytes {
    let event = wire::event_ref(topic, event);
    let mut b = BytesMut::with_capacity(event.frame_len());
    if let Err(e) = ringcast_protocol::encode_event_frame(0, &event, &mut b) {
        tracing::error!(error = %e, "cannot encode an event");
    }
    b.freeze()
}

/// Appends the shared `frame` of an event for `subscription_id`.
pub(super) fn put_event_frame(buf: &mut BytesMut, subscription_id: u64, frame: &Bytes) {
    if frame.len() < SUBSCRIPTION_ID_AT.end {
        return;
    }
    buf.extend_from_slice(&frame[..SUBSCRIPTION_ID_AT.start]);
    buf.extend_from_slice(&subscription_id.to_be_bytes());
    buf.extend_from_slice(&frame[SUBSCRIPTION_ID_AT.end..]);
}

/// Writes every chunk with as few `writev` calls as the socket allows,
/// without first copying them into one buffer; empties `chunks`.
async fn write_all_vectored(
    wr: &mut OwnedWriteHalf,
    chunks: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    use bytes::Buf;
    use std::io::IoSlice;
    const MAX_SLICES: usize = 64;
    let mut first = 0;
    loop {
        while first < chunks.len() && chunks[first].is_empty() {
            first += 1;
        }
        if first == chunks.len() {
            break;
        }
        let slices: Vec<IoSlice<'_>> = chunks[first..]
            .iter()
            .take(MAX_SLICES)
            .map(|c| IoSlice::new(c))
            .collect();
        let mut written = wr.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let chunk = &mut chunks[first];
            let n = written.min(chunk.len());
            chunk.advance(n);
            written -= n;
            if chunk.is_empty() {
                first += 1;
            }
        }
    }
    chunks.clear();
    Ok(())
}

/// Writes queued frames, many per syscall; sends a heartbeat when idle.
/// A write stalled for three heartbeats means a dead or stuck peer.
async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Bytes>,
    outbound: Arc<Outbound>,
    heartbeat: Duration,
    done: CancellationToken,
    kill: CancellationToken,
) {
    let _done = done.drop_guard();
    // However the writer ends, whoever waits for budget gives up.
    struct CloseOnDrop(Arc<Outbound>);
    impl Drop for CloseOnDrop {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = CloseOnDrop(outbound.clone());
    let mut heartbeat_frame = BytesMut::new();
    if encode_frame(&ServerMessage::Heartbeat, &mut heartbeat_frame).is_err() {
        return;
    }
    let heartbeat_frame = heartbeat_frame.freeze();
    let stall = (heartbeat * 3).max(Duration::from_secs(1));
    let mut frames: Vec<Bytes> = Vec::with_capacity(256);
    let bytes_out = metrics::counter!(crate::metrics::BYTES_OUT, "transport" => "tcp");
    let killed = kill.cancelled();
    tokio::pin!(killed);
    loop {
        let received = tokio::select! {
            biased;
            _ = &mut killed => return,
            r = tokio::time::timeout(heartbeat, rx.recv_many(&mut frames, 256)) => r,
        };
        // Every received chunk was charged; the heartbeat was not.
        let charged: usize = frames.iter().map(Bytes::len).sum();
        let mut written = charged;
        match received {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => {
                frames.push(heartbeat_frame.clone());
                written += heartbeat_frame.len();
            }
        }
        bytes_out.increment(written as u64);
        let write = write_all_vectored(&mut wr, &mut frames);
        let result = tokio::select! {
            biased;
            _ = &mut killed => return,
            r = tokio::time::timeout(stall, write) => r,
        };
        frames.clear();
        match result {
            Ok(Ok(())) => outbound.release(charged),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                return;
            }
            Err(_) => {
                tracing::info!("peer has not read for three heartbeats; closing");
                return;
            }
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_hand_off_cancelled_while_the_queue_is_full_leaves_nothing_charged() {
        let (out, mut rx) = mpsc::channel::<Bytes>(1);
        out.send(Bytes::from_static(b"queued")).await.unwrap();
        let outbound = Arc::new(Outbound::new(1024));
        let waiting = tokio::spawn({
            let (out, outbound) = (out.clone(), outbound.clone());
            async move { send_charged(&out, &outbound, Bytes::from(vec![0u8; 100])).await }
        });
        // The channel is full, so the hand-off is parked; cancel it there
        // (what an Unsubscribe does to a pump).
        tokio::task::yield_now().await;
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        assert_eq!(outbound.queued(), 0, "a cancelled hand-off charged bytes");
        assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"queued"));
        send_charged(&out, &outbound, Bytes::from(vec![0u8; 100]))
            .await
            .unwrap();
        assert_eq!(outbound.queued(), 100);
    }

    #[test]
    fn a_shared_event_frame_patched_per_subscriber_equals_a_direct_encoding() {
        let event = Event::new(
            7,
            3,
            1_700_000_000_000,
            Arc::from("created"),
            vec![("k".into(), "v".into())],
            Bytes::from_static(b"{\"a\":1}"),
        );
        for sid in [0, 1, u64::MAX, 0x0102_0304_0506_0708] {
            let mut patched = BytesMut::new();
            put_event_frame(&mut patched, sid, &shared_event_frame("orders", &event));
            let mut direct = BytesMut::new();
            encode_frame(
                &ServerMessage::Event {
                    subscription_id: sid,
                    event: wire::event("orders", &event),
                },
                &mut direct,
            )
            .unwrap();
            assert_eq!(patched, direct, "subscription id {sid}");
        }
    }
}
