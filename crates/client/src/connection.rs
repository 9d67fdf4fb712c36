//! The connection task: the one owner of the socket.
//!
//! [`Client`](crate::Client) handles talk to it through a command channel.
//! Per connection it runs one `select!` loop that
//! - encodes commands into a write buffer that is flushed with one write per
//!   wakeup, so pipelined requests coalesce into few syscalls;
//! - decodes frames as they arrive and routes replies by `request_id` (a map
//!   of oneshot senders) and pushes by `subscription_id`, handing each
//!   subscription what one socket read brought in one batch
//!   ([`queue`](crate::queue));
//! - sends `Ping` after `heartbeat_ms` without sending, and declares the
//!   broker dead after `3 × heartbeat_ms` without receiving.
//!
//! When the connection is lost it fails the requests in flight with
//! [`Error::ConnectionLost`], reconnects with capped exponential backoff and
//! full jitter, re-handshakes, re-subscribes every live subscription from its
//! [`Resume`] position under the same subscription id, then sends the
//! requests that were issued meanwhile.
//!
//! Credentials: each connection's `Hello` carries the options' credentials,
//! or a fresh token from the [`TokenProvider`](crate::TokenProvider). With a
//! provider and a JWT, the task refreshes the token on the live connection
//! before it expires (`Refresh`); when the broker closes the connection with
//! `TokenExpired` anyway, it reconnects with a fresh token and resumes as
//! after any loss. Without a provider, `TokenExpired` — like `Unauthorized`
//! and `Forbidden` — is final: the task ends and every subscription and later
//! call fails with [`Error::Refused`].
//!
//! A subscription's queue is bounded. When it is full the task *pauses* that
//! subscription instead of buffering more or stopping to read the socket
//! (which would hold up every other subscription and reply on the
//! connection): it unsubscribes at the broker and drops what still arrives
//! for it; once the caller has drained half the queue it subscribes again,
//! under a fresh wire id, from the subscription's [`Resume`] position. The
//! broker replays what it still retains and reports the rest as a gap, so a
//! slow consumer costs memory neither here nor at the broker, and never
//! receives a duplicate or misses something silently.
//!
//! A pattern subscription is a subscription whose `Subscribe` is a
//! `SubscribePattern`: its entry keeps a [`PatternResume`] (every topic's
//! position, each topic's epoch learned from `PatternSubscribed` or
//! `TopicJoined`) instead of a [`Resume`], an `End` ends one of its topics
//! only, and `SubscriptionEnded` ends it with the broker's error. Pausing,
//! reconnects and refreshes treat it as any subscription: it is subscribed
//! again with every position.
//!
//! Consumer-group memberships live beside the subscriptions, in the same id
//! space. Their queues need no pausing: the broker pushes at most the
//! membership's `max_in_flight` unsettled deliveries. After a reconnect the
//! task joins each membership again under the same id and consumer name
//! before it sends what waited, so a `Settle` for a delivery of the old
//! connection reaches the broker through the membership's new session (the
//! broker settles by topic, group and offset, whichever session took it).
//! Acks, in-progress and terms in flight at a loss are sent again on the next
//! connection (a repeat only counts as `already_done`); nacks are not, since a
//! repeat could nack the redelivery another member holds by then.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use ringcast_protocol::{
    decode_server_body, encode_frame, ClientMessage, ErrorCode, FrameDecoder, GroupOptions,
    ProtocolError, ServerMessage, Start, TopicPosition, WireEvent, WireGap, FRAME_HEADER_LEN,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep, sleep_until, timeout, Instant, Sleep};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::compress::{self, Packing};
use crate::error::{code_name, Error, Result};
use crate::options::{ClientOptions, Compression};
use crate::pattern::{self, PatternResume};
use crate::resume::{Effect, Resume};
use crate::token::{self, TokenFuture};
use crate::ServerInfo;

/// Stop taking commands while this much is waiting to be written: callers
/// then wait in the (bounded) command channel, which is the backpressure.
const WRITE_HIGH_WATER: usize = 1024 * 1024;
/// Commands handled per wakeup before writing, to bound latency.
const COMMAND_BATCH: usize = 128;
/// Bytes read per read call at least.
const READ_CHUNK: usize = 64 * 1024;
/// How long `close` waits for queued frames to be written.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

pub(crate) use crate::queue::PushSender;

/// Where a subscription's terminal error is left for its [`Subscription`](crate::Subscription).
pub(crate) type TerminalSlot = Arc<Mutex<Option<Error>>>;

/// The error that ended a subscription (`Closed` when none was left).
pub(crate) fn take_terminal(slot: &TerminalSlot) -> Error {
    slot.lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or(Error::Closed)
}

/// Why the client stopped for good, when the broker ended it (shared with
/// the handles, so that later calls fail with the same error).
pub(crate) type FatalSlot = Arc<OnceLock<Fatal>>;

/// A final refusal by the broker: `Unauthorized`, `Forbidden`, or
/// `TokenExpired` without a token provider.
#[derive(Debug, Clone)]
pub(crate) struct Fatal {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl Fatal {
    pub(crate) fn error(&self) -> Error {
        Error::Refused {
            code: self.code,
            message: self.message.clone(),
            retry_after: None,
        }
    }
}

/// When a `Refreshed` says the session ends.
pub(crate) type ExpiresAt = Option<SystemTime>;

/// One item of a subscription's queue.
#[derive(Debug)]
pub(crate) enum Push {
    /// An event, with the epoch it belongs to.
    Event { epoch: u64, event: WireEvent },
    /// A gap.
    Gap(WireGap),
    /// The topic was sealed (or deleted); nothing follows.
    End { topic: String, last_offset: u64 },
}

/// One item of a group membership's queue.
#[derive(Debug)]
pub(crate) enum GroupPush {
    /// A delivery: settle it by its offset.
    Job { attempt: u32, event: WireEvent },
    /// Work the group lost (retention) before it was done.
    Gap(WireGap),
}

/// The task's end of a membership's queue. Unbounded: the broker bounds
/// what it pushes by the membership's `max_in_flight`.
pub(crate) type GroupSender = mpsc::UnboundedSender<GroupPush>;

/// What a membership is: where, and as whom.
#[derive(Debug, Clone)]
pub(crate) struct JoinSpec {
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) consumer: String,
    pub(crate) max_in_flight: u32,
    pub(crate) create: Option<GroupOptions>,
}

/// The broker's answer to a subscription's first `Subscribe` (or
/// `SubscribePattern`: then `topics`, the positions the task resumes from).
#[derive(Debug, Clone)]
pub(crate) struct Subscribed {
    pub(crate) epoch: u64,
    pub(crate) next_offset: u64,
    pub(crate) topics: Vec<TopicPosition>,
}

/// What a [`Client`](crate::Client) asks of the task.
pub(crate) enum Command {
    /// Send `msg` (whose request id is `id`) and hand back the reply;
    /// `resend`: send it again on the next connection if this one drops
    /// before the reply (only for requests a repeat cannot harm).
    Request {
        id: u64,
        msg: ClientMessage,
        reply: oneshot::Sender<Result<ServerMessage>>,
        resend: bool,
    },
    /// Start a subscription and keep it alive across reconnects.
    Subscribe {
        /// The client-side id, also its first wire id.
        sub_id: u64,
        /// The topic, or the pattern of a pattern subscription.
        topic: String,
        types: Vec<String>,
        start: Start,
        /// For a pattern subscription: its resume bookkeeping.
        pattern: Option<PatternResume>,
        tx: PushSender,
        terminal: TerminalSlot,
        ready: oneshot::Sender<Result<Subscribed>>,
    },
    /// Join a consumer group and keep the membership across reconnects;
    /// `ready` gets the topic's epoch from `Joined`.
    Join {
        /// The client-side id, also its wire id on every connection.
        sub_id: u64,
        spec: JoinSpec,
        tx: GroupSender,
        terminal: TerminalSlot,
        ready: oneshot::Sender<Result<u64>>,
    },
    /// End a subscription (or leave a group cleanly), answering once the
    /// broker confirmed.
    Unsubscribe {
        sub_id: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Replace the connection's credentials (and those of later reconnects).
    Refresh {
        credentials: String,
        reply: oneshot::Sender<Result<ExpiresAt>>,
    },
    /// Close the connection for good.
    Close { reply: oneshot::Sender<()> },
}

impl Command {
    /// Whether the caller stopped waiting (timed out), so it need not be sent.
    fn abandoned(&self) -> bool {
        match self {
            Command::Request { reply, .. } => reply.is_closed(),
            Command::Subscribe { ready, .. } => ready.is_closed(),
            Command::Join { ready, .. } => ready.is_closed(),
            Command::Unsubscribe { reply, .. } => reply.is_closed(),
            Command::Refresh { reply, .. } => reply.is_closed(),
            Command::Close { .. } => false,
        }
    }
}

/// An established, handshaken connection.
pub(crate) struct Conn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    rbuf: BytesMut,
    decoder: FrameDecoder<ServerMessage>,
    info: ServerInfo,
    /// The credentials its `Hello` carried.
    credentials: Option<String>,
}

impl Conn {
    pub(crate) fn info(&self) -> &ServerInfo {
        &self.info
    }
}

/// Connects to `options.addr` and performs the `Hello` / `Welcome` handshake
/// within `options.connect_timeout`, with a fresh token from the options'
/// provider, or else `credentials`.
pub(crate) async fn connect(options: &ClientOptions, credentials: Option<String>) -> Result<Conn> {
    match timeout(options.connect_timeout, connect_inner(options, credentials)).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout),
    }
}

async fn connect_inner(options: &ClientOptions, credentials: Option<String>) -> Result<Conn> {
    let credentials = match &options.token_provider {
        Some(provider) => Some(provider.fetch().await.map_err(Error::TokenProvider)?),
        None => credentials,
    };
    let stream = TcpStream::connect(&options.addr).await?;
    // Requests are small and latency matters; coalescing is done by the writer.
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut out = BytesMut::new();
    let hello = match compress::offer(options.compression) {
        None => ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: options.client_name.clone(),
            credentials: credentials.clone(),
        },
        Some(compression) => ClientMessage::HelloExt {
            protocol_version: PROTOCOL_VERSION,
            client_name: options.client_name.clone(),
            credentials: credentials.clone(),
            compression,
        },
    };
    encode_frame(&hello, &mut out)?;
    wr.write_all(&out).await?;
    let mut decoder = FrameDecoder::new(options.max_frame);
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if let Some(msg) = decoder.decode(&mut rbuf)? {
            let info = match msg {
                ServerMessage::Welcome {
                    server_version,
                    protocol_version,
                    max_frame,
                    max_payload,
                    max_subscriptions,
                    heartbeat_ms,
                } => ServerInfo {
                    server_version,
                    protocol_version,
                    max_frame,
                    max_payload,
                    max_subscriptions,
                    heartbeat_ms,
                    compression: Compression::None,
                },
                ServerMessage::WelcomeExt {
                    server_version,
                    protocol_version,
                    max_frame,
                    max_payload,
                    max_subscriptions,
                    heartbeat_ms,
                    compression,
                } => ServerInfo {
                    server_version,
                    protocol_version,
                    max_frame,
                    max_payload,
                    max_subscriptions,
                    heartbeat_ms,
                    compression: compress::in_force(compression),
                },
                ServerMessage::Error { code, message, .. } => {
                    return Err(Error::Refused {
                        code,
                        message,
                        retry_after: None,
                    })
                }
                ServerMessage::RetryLater {
                    code,
                    message,
                    retry_after_ms,
                    ..
                } => {
                    return Err(Error::Refused {
                        code,
                        message,
                        retry_after: Some(Duration::from_millis(retry_after_ms)),
                    })
                }
                ServerMessage::Shutdown { reason } => {
                    return Err(Error::Handshake(format!(
                        "the broker is shutting down: {reason}"
                    )))
                }
                other => {
                    return Err(Error::Handshake(format!(
                        "expected Welcome, got {}",
                        other.kind()
                    )))
                }
            };
            if info.protocol_version != PROTOCOL_VERSION {
                return Err(Error::Handshake(format!(
                    "the broker speaks protocol version {}, this client {PROTOCOL_VERSION}",
                    info.protocol_version
                )));
            }
            return Ok(Conn {
                rd,
                wr,
                rbuf,
                decoder,
                info,
                credentials,
            });
        }
        rbuf.reserve(READ_CHUNK);
        if rd.read_buf(&mut rbuf).await? == 0 {
            return Err(Error::Handshake(
                "the broker closed the connection before answering Hello".into(),
            ));
        }
    }
}

/// What a request in flight is waiting for.
enum Pending {
    /// A caller waits for the reply. `resend`: the request, when it is safe
    /// to send again on the next connection if this one drops (an `Append`
    /// whose every event has an idempotency key).
    Reply {
        reply: oneshot::Sender<Result<ServerMessage>>,
        resend: Option<ClientMessage>,
    },
    /// A caller's `unsubscribe` waits for `Unsubscribed`.
    Unsubscribe(oneshot::Sender<Result<()>>),
    /// A `Subscribe` for this (client-side) subscription id.
    Subscribe(u64),
    /// A `JoinGroup` for this membership id.
    Join(u64),
    /// A `Refresh` with these credentials; `reply` is `None` for the task's
    /// own (proactive) refreshes.
    Refresh {
        credentials: String,
        reply: Option<oneshot::Sender<Result<ExpiresAt>>>,
    },
    /// Nobody waits (heartbeat pings, unsubscribes nobody asked for).
    Ignore,
}

/// The task's view of one live subscription.
struct SubEntry {
    /// The topic, or the pattern of a pattern subscription.
    topic: String,
    types: Vec<String>,
    /// Unused by a pattern subscription, which keeps `pattern` instead.
    resume: Resume,
    /// For a pattern subscription: every topic's position.
    pattern: Option<PatternResume>,
    tx: PushSender,
    terminal: TerminalSlot,
    /// The caller's `subscribe`, until the first `Subscribed`.
    ready: Option<oneshot::Sender<Result<Subscribed>>>,
    /// The id the broker knows it by: the client-side id, until a pause.
    wire_id: u64,
    /// Whether pushes are taken: from `Subscribed` until a pause or a loss.
    accepting: bool,
    /// While paused: dropping it cancels the task waiting for queue room.
    paused: Option<oneshot::Sender<()>>,
    /// Pushes taken from the socket read being processed, handed to the
    /// queue in one send when the read is done (see [`Task::flush_batches`]).
    batch: Vec<Push>,
}

impl SubEntry {
    #[allow(clippy::too_many_arguments)] // what it reads, where it starts, its queue and waiter
    fn new(
        sub_id: u64,
        topic: String,
        types: Vec<String>,
        start: Start,
        pattern: Option<PatternResume>,
        tx: PushSender,
        terminal: TerminalSlot,
        ready: oneshot::Sender<Result<Subscribed>>,
    ) -> Self {
        SubEntry {
            topic,
            types,
            resume: Resume::new(start),
            pattern,
            tx,
            terminal,
            ready: Some(ready),
            wire_id: sub_id,
            accepting: false,
            paused: None,
            batch: Vec::new(),
        }
    }

    /// Ends the subscription with an error the caller will see last.
    fn fail(self, error: Error) {
        let mut slot = self.terminal.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(error);
        // Dropping `self.tx` closes the queue after what it holds.
    }
}

/// The task's view of one group membership.
struct GroupEntry {
    spec: JoinSpec,
    tx: GroupSender,
    terminal: TerminalSlot,
    /// The caller's `consume`, until the first `Joined`.
    ready: Option<oneshot::Sender<Result<u64>>>,
    /// Whether pushes are taken: from `Joined` until the connection is lost.
    accepting: bool,
}

impl GroupEntry {
    fn new(
        spec: JoinSpec,
        tx: GroupSender,
        terminal: TerminalSlot,
        ready: oneshot::Sender<Result<u64>>,
    ) -> Self {
        GroupEntry {
            spec,
            tx,
            terminal,
            ready: Some(ready),
            accepting: false,
        }
    }

    /// Ends the membership with an error the caller will see last.
    fn fail(self, error: Error) {
        let mut slot = self.terminal.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(error);
    }

    /// Hands the error to whoever waits: the caller's `consume` before the
    /// first `Joined`, the consumer's stream after.
    fn fail_or_refuse(mut self, error: Error) {
        match self.ready.take() {
            Some(ready) => {
                let _ = ready.send(Err(error));
            }
            None => self.fail(error),
        }
    }
}

/// Why a connection's loop returned.
enum Exit {
    /// The connection is gone; reconnect.
    Lost(String),
    /// The broker refused us for good; stop.
    Fatal(Fatal),
    /// `close()` was called.
    Closed(oneshot::Sender<()>),
    /// Every `Client` and `Subscription` was dropped.
    Dropped,
}

/// The state the connection task keeps across connections.
pub(crate) struct Task {
    options: ClientOptions,
    cmd_rx: mpsc::Receiver<Command>,
    drop_rx: mpsc::UnboundedReceiver<u64>,
    /// Paused subscriptions whose queue has room again.
    room_tx: mpsc::UnboundedSender<u64>,
    room_rx: mpsc::UnboundedReceiver<u64>,
    request_ids: Arc<AtomicU64>,
    sub_ids: Arc<AtomicU64>,
    info_tx: watch::Sender<ServerInfo>,
    pending: HashMap<u64, Pending>,
    /// By client-side id, ordered so that re-subscribing keeps the callers' order.
    subs: BTreeMap<u64, SubEntry>,
    /// Wire id → client-side id.
    wire: HashMap<u64, u64>,
    /// Group memberships by id (the same on the wire, on every connection).
    groups: BTreeMap<u64, GroupEntry>,
    /// Requests issued while disconnected, sent after the next handshake.
    waiting: VecDeque<Command>,
    /// Subscriptions whose `batch` holds pushes of the current read.
    batched: Vec<u64>,
    /// The capacity a batch starts with in the current read: about its
    /// share of the events buffered, so that it rarely grows (each growth
    /// copies the whole batch).
    batch_hint: usize,
    wbuf: BytesMut,
    max_frame_out: usize,
    /// The payload compression of the current connection; `None`: plain.
    packing: Option<Packing>,
    backoff: Backoff,
    /// Credentials for the next `Hello` without a token provider: the
    /// options', then the last ones a `Refresh` put in force.
    credentials: Option<String>,
    /// When the credentials in force expire (a JWT's `exp`), if known.
    token_exp: Option<SystemTime>,
    /// When to refresh them (with a token provider), if at all.
    refresh_at: Option<Instant>,
    /// The least the next reconnect waits: what the broker asked for.
    retry_after: Option<Duration>,
    fatal: FatalSlot,
}

impl Task {
    pub(crate) fn new(
        options: ClientOptions,
        cmd_rx: mpsc::Receiver<Command>,
        drop_rx: mpsc::UnboundedReceiver<u64>,
        request_ids: Arc<AtomicU64>,
        sub_ids: Arc<AtomicU64>,
        info_tx: watch::Sender<ServerInfo>,
        fatal: FatalSlot,
    ) -> Self {
        let backoff = Backoff::new(
            options.reconnect_base_backoff,
            options.reconnect_max_backoff,
        );
        let (room_tx, room_rx) = mpsc::unbounded_channel();
        Task {
            credentials: options.credentials.clone(),
            token_exp: None,
            refresh_at: None,
            retry_after: None,
            fatal,
            options,
            cmd_rx,
            drop_rx,
            room_tx,
            room_rx,
            request_ids,
            sub_ids,
            info_tx,
            pending: HashMap::new(),
            subs: BTreeMap::new(),
            wire: HashMap::new(),
            groups: BTreeMap::new(),
            waiting: VecDeque::new(),
            batched: Vec::new(),
            batch_hint: 0,
            wbuf: BytesMut::new(),
            max_frame_out: usize::MAX,
            packing: None,
            backoff,
        }
    }

    /// Runs until the client is closed or dropped, starting on `conn`.
    pub(crate) async fn run(mut self, conn: Conn) {
        let mut conn = Some(conn);
        loop {
            let current = match conn.take() {
                Some(c) => c,
                None => match self.reconnect().await {
                    Ok(c) => c,
                    Err(exit) => return self.finish(exit).await,
                },
            };
            match self.session(current).await {
                Exit::Lost(reason) => {
                    warn!(addr = %self.options.addr, %reason, "connection to the broker lost; reconnecting");
                    self.fail_in_flight();
                }
                exit => return self.finish(exit).await,
            }
        }
    }

    fn next_request_id(&self) -> u64 {
        self.request_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Fails what was in flight on a lost connection, except the requests
    /// that may be sent again: those go first, in their original order, to
    /// the next connection. Subscriptions stay.
    fn fail_in_flight(&mut self) {
        let mut again = Vec::new();
        for (id, pending) in self.pending.drain() {
            match pending {
                Pending::Reply {
                    reply,
                    resend: Some(msg),
                } if !reply.is_closed() => again.push((id, msg, reply)),
                Pending::Reply { reply, .. } => {
                    let _ = reply.send(Err(Error::ConnectionLost));
                }
                // The subscription is gone with the connection anyway.
                Pending::Unsubscribe(reply) => {
                    let _ = reply.send(Ok(()));
                }
                Pending::Refresh { reply, .. } => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(Error::ConnectionLost));
                    }
                }
                Pending::Subscribe(_) | Pending::Join(_) | Pending::Ignore => {}
            }
        }
        if !again.is_empty() {
            debug!(
                requests = again.len(),
                "requests in flight go again (publishes with their idempotency keys, settles)"
            );
        }
        // Request ids grow in sending order.
        again.sort_unstable_by_key(|(id, ..)| std::cmp::Reverse(*id));
        for (id, msg, reply) in again {
            self.waiting.push_front(Command::Request {
                id,
                msg,
                reply,
                resend: true,
            });
        }
        self.wbuf.clear();
        for sub in self.subs.values_mut() {
            sub.accepting = false;
        }
        for membership in self.groups.values_mut() {
            membership.accepting = false;
        }
    }

    async fn finish(mut self, exit: Exit) {
        let fatal = match &exit {
            Exit::Fatal(fatal) => {
                warn!(addr = %self.options.addr, code = %code_name(fatal.code), message = %fatal.message, "the broker refused this client; stopping");
                let _ = self.fatal.set(fatal.clone());
                Some(fatal.clone())
            }
            _ => None,
        };
        let error = || fatal.as_ref().map_or(Error::Closed, Fatal::error);
        let closed = matches!(exit, Exit::Closed(_) | Exit::Fatal(_));
        for (_, pending) in self.pending.drain() {
            match pending {
                Pending::Reply { reply, .. } => {
                    let _ = reply.send(Err(error()));
                }
                Pending::Unsubscribe(reply) => {
                    let _ = reply.send(Ok(()));
                }
                Pending::Refresh { reply, .. } => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(error()));
                    }
                }
                Pending::Subscribe(_) | Pending::Join(_) | Pending::Ignore => {}
            }
        }
        for cmd in self.waiting.drain(..) {
            fail_command(cmd, error);
        }
        // Dropping the entries closes the queues; an empty terminal slot
        // reads as `Error::Closed`.
        for (_, mut sub) in std::mem::take(&mut self.subs) {
            match sub.ready.take() {
                Some(ready) => {
                    let _ = ready.send(Err(error()));
                }
                None if fatal.is_some() => sub.fail(error()),
                None => {}
            }
        }
        for (_, mut membership) in std::mem::take(&mut self.groups) {
            match membership.ready.take() {
                Some(ready) => {
                    let _ = ready.send(Err(error()));
                }
                None if fatal.is_some() => membership.fail(error()),
                None => {}
            }
        }
        if closed {
            // Commands that raced with close.
            self.cmd_rx.close();
            while let Ok(cmd) = self.cmd_rx.try_recv() {
                fail_command(cmd, error);
            }
        }
        if let Exit::Closed(reply) = exit {
            debug!("client closed");
            let _ = reply.send(());
        }
    }

    /// Reconnects with backoff, handling commands meanwhile.
    async fn reconnect(&mut self) -> Result<Conn, Exit> {
        loop {
            // ThreadRng is not Send: take it afresh, never across an await.
            let delay = self.backoff.next_delay(&mut rand::rng());
            // The broker said when (a rate limit): not before that.
            let delay = delay.max(self.retry_after.take().unwrap_or_default());
            let attempt = self.backoff.attempts();
            debug!(?delay, attempt, "reconnecting after backoff");
            let options = self.options.clone();
            let credentials = self.credentials.clone();
            let attempt_fut = async move {
                sleep(delay).await;
                connect(&options, credentials).await
            };
            tokio::pin!(attempt_fut);
            loop {
                tokio::select! {
                    result = &mut attempt_fut => match result {
                        Ok(conn) => {
                            info!(addr = %self.options.addr, attempt, "reconnected to the broker");
                            self.backoff.reset();
                            return Ok(conn);
                        }
                        Err(Error::Refused { code, message, retry_after }) => {
                            if let Some(fatal) = self.final_refusal(code, &message) {
                                return Err(Exit::Fatal(fatal));
                            }
                            debug!(addr = %self.options.addr, attempt, code = %code_name(code), %message, "reconnect refused");
                            self.retry_after = retry_after;
                            break;
                        }
                        Err(e) => {
                            // Debug, not warn: with a fast first backoff a
                            // restart costs several attempts; the loss itself
                            // was logged once.
                            debug!(addr = %self.options.addr, attempt, error = %e, "reconnect failed");
                            break;
                        }
                    },
                    cmd = self.cmd_rx.recv() => match cmd {
                        None => return Err(Exit::Dropped),
                        Some(Command::Close { reply }) => return Err(Exit::Closed(reply)),
                        Some(cmd) => self.handle_offline(cmd),
                    },
                    Some(sub_id) = self.drop_rx.recv() => {
                        // Without a connection there is no one to tell.
                        self.forget(sub_id);
                        self.groups.remove(&sub_id);
                    }
                    Some(sub_id) = self.room_rx.recv() => {
                        // Subscribed again with the others on the next connection.
                        self.unpause(sub_id);
                    }
                }
            }
        }
    }

    /// Handles a command while no connection is up.
    fn handle_offline(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe {
                sub_id,
                topic,
                types,
                start,
                pattern,
                tx,
                terminal,
                ready,
            } => {
                // Subscribed on the next connection with the others.
                let entry =
                    SubEntry::new(sub_id, topic, types, start, pattern, tx, terminal, ready);
                self.wire.insert(entry.wire_id, sub_id);
                self.subs.insert(sub_id, entry);
            }
            Command::Join {
                sub_id,
                spec,
                tx,
                terminal,
                ready,
            } => {
                // Joined on the next connection with the others.
                self.groups
                    .insert(sub_id, GroupEntry::new(spec, tx, terminal, ready));
            }
            Command::Unsubscribe { sub_id, reply } => {
                self.forget(sub_id);
                self.groups.remove(&sub_id);
                let _ = reply.send(Ok(()));
            }
            Command::Refresh { credentials, reply } => {
                // The next Hello carries them; the Refresh sent after it
                // confirms them.
                self.credentials = Some(credentials.clone());
                self.waiting
                    .push_back(Command::Refresh { credentials, reply });
            }
            cmd => {
                if self.waiting.len() >= COMMAND_BATCH {
                    self.waiting.retain(|c| !c.abandoned());
                }
                self.waiting.push_back(cmd);
            }
        }
    }

    /// Serves one connection until it ends.
    async fn session(&mut self, mut conn: Conn) -> Exit {
        debug!(server = ?conn.info, "connected to the broker");
        let heartbeat = (conn.info.heartbeat_ms > 0)
            .then(|| Duration::from_millis(conn.info.heartbeat_ms.into()));
        self.max_frame_out = usize::try_from(conn.info.max_frame).unwrap_or(usize::MAX);
        // A payload never decompresses to more than the broker takes (or,
        // for events retained under an older limit, than a frame holds).
        let max_payload = usize::try_from(conn.info.max_payload).unwrap_or(usize::MAX);
        self.packing = Packing::new(
            conn.info.compression,
            max_payload.max(self.options.max_frame),
        );
        self.info_tx.send_replace(conn.info.clone());
        let hb = heartbeat.unwrap_or(Duration::from_secs(3600));
        let mut ping_at: Pin<Box<Sleep>> = Box::pin(sleep_until(Instant::now() + hb));
        let mut dead_at: Pin<Box<Sleep>> = Box::pin(sleep_until(Instant::now() + hb * 3));
        self.token_exp = conn.credentials.as_deref().and_then(token::expiry);
        self.refresh_at = self.next_refresh();
        // Moved only when `refresh_at` changes (a refresh), not per frame.
        let mut refresh_armed = self.refresh_at;
        let mut refresh_timer: Pin<Box<Sleep>> =
            Box::pin(sleep_until(refresh_armed.unwrap_or_else(Instant::now)));
        // A token being fetched for a proactive refresh.
        let mut fetching: Option<TokenFuture> = None;

        // Re-subscribe every live subscription (paused ones when they have
        // room), then send what waited.
        let sub_ids: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, sub)| sub.paused.is_none())
            .map(|(id, _)| *id)
            .collect();
        for sub_id in sub_ids {
            self.send_subscribe(sub_id);
        }
        // Memberships before the waiting requests: settles among them need
        // the membership on this connection.
        let group_ids: Vec<u64> = self.groups.keys().copied().collect();
        for id in group_ids {
            self.send_join(id);
        }
        let waiting = std::mem::take(&mut self.waiting);
        // A caller that stopped waiting was told `Timeout`: its request must
        // not be sent behind its back.
        for cmd in waiting.into_iter().filter(|c| !c.abandoned()) {
            if let Some(exit) = self.handle_command(cmd) {
                return self.close_conn(conn, exit).await;
            }
        }
        // Frames that arrived with the Welcome.
        if let Err(exit) = self.process_buffered(&mut conn) {
            return exit;
        }

        loop {
            conn.rbuf.reserve(READ_CHUNK);
            if self.refresh_at != refresh_armed {
                refresh_armed = self.refresh_at;
                if let Some(at) = refresh_armed {
                    refresh_timer.as_mut().reset(at);
                }
            }
            tokio::select! {
                () = &mut refresh_timer, if refresh_armed.is_some() && fetching.is_none() => {
                    self.refresh_at = None;
                    if let Some(provider) = &self.options.token_provider {
                        debug!("fetching a token to refresh the one in force");
                        fetching = Some(provider.fetch());
                    }
                }
                fetched = poll_token(&mut fetching), if fetching.is_some() => {
                    fetching = None;
                    self.send_proactive_refresh(fetched);
                }
                read = conn.rd.read_buf(&mut conn.rbuf) => match read {
                    Ok(0) => return Exit::Lost("the broker closed the connection".into()),
                    Err(e) => return Exit::Lost(format!("read failed: {e}")),
                    Ok(_) => {
                        if let Some(hb) = heartbeat {
                            dead_at.as_mut().reset(Instant::now() + hb * 3);
                        }
                        if let Err(exit) = self.process_buffered(&mut conn) {
                            return exit;
                        }
                    }
                },
                written = conn.wr.write_buf(&mut self.wbuf), if !self.wbuf.is_empty() => match written {
                    Ok(0) => return Exit::Lost("write returned zero bytes".into()),
                    Err(e) => return Exit::Lost(format!("write failed: {e}")),
                    Ok(_) => {
                        if let Some(hb) = heartbeat {
                            ping_at.as_mut().reset(Instant::now() + hb);
                        }
                    }
                },
                cmd = self.cmd_rx.recv(), if self.wbuf.len() < WRITE_HIGH_WATER => {
                    let Some(cmd) = cmd else {
                        return self.close_conn(conn, Exit::Dropped).await;
                    };
                    if let Some(exit) = self.handle_command(cmd) {
                        return self.close_conn(conn, exit).await;
                    }
                    // Take what else is queued, so it leaves in one write.
                    for _ in 1..COMMAND_BATCH {
                        if self.wbuf.len() >= WRITE_HIGH_WATER {
                            break;
                        }
                        let Ok(cmd) = self.cmd_rx.try_recv() else { break };
                        if let Some(exit) = self.handle_command(cmd) {
                            return self.close_conn(conn, exit).await;
                        }
                    }
                }
                Some(sub_id) = self.drop_rx.recv() => self.drop_subscription(sub_id),
                Some(sub_id) = self.room_rx.recv() => {
                    if self.unpause(sub_id) {
                        self.send_subscribe(sub_id);
                    }
                }
                () = &mut ping_at, if heartbeat.is_some() => {
                    let id = self.next_request_id();
                    if self.encode(&ClientMessage::Ping { request_id: id }).is_ok() {
                        self.pending.insert(id, Pending::Ignore);
                    }
                    ping_at.as_mut().reset(Instant::now() + hb);
                }
                () = &mut dead_at, if heartbeat.is_some() => {
                    // The timer may only look expired because this task could
                    // not run (a blocked runtime): data waiting in the socket
                    // proves the broker alive.
                    match conn.rd.try_read_buf(&mut conn.rbuf) {
                        Ok(0) => return Exit::Lost("the broker closed the connection".into()),
                        Ok(_) => {
                            dead_at.as_mut().reset(Instant::now() + hb * 3);
                            if let Err(exit) = self.process_buffered(&mut conn) {
                                return exit;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            return Exit::Lost(format!(
                                "no frame from the broker for {:?} (3 heartbeats)",
                                hb * 3
                            ));
                        }
                        Err(e) => return Exit::Lost(format!("read failed: {e}")),
                    }
                }
            }
        }
    }

    /// Flushes what is queued (briefly) and closes the socket.
    async fn close_conn(&mut self, mut conn: Conn, exit: Exit) -> Exit {
        if matches!(exit, Exit::Closed(_)) {
            let flush = async {
                conn.wr.write_all_buf(&mut self.wbuf).await?;
                conn.wr.shutdown().await
            };
            let _ = timeout(CLOSE_FLUSH, flush).await;
        }
        exit
    }

    /// Handles a command on a live connection; `Some` ends the session.
    fn handle_command(&mut self, cmd: Command) -> Option<Exit> {
        match cmd {
            Command::Request {
                id,
                msg,
                reply,
                resend,
            } => match self.encode(&msg) {
                Ok(()) => {
                    let resend = resend.then_some(msg);
                    self.pending.insert(id, Pending::Reply { reply, resend });
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Subscribe {
                sub_id,
                topic,
                types,
                start,
                pattern,
                tx,
                terminal,
                ready,
            } => {
                let entry =
                    SubEntry::new(sub_id, topic, types, start, pattern, tx, terminal, ready);
                self.wire.insert(entry.wire_id, sub_id);
                self.subs.insert(sub_id, entry);
                self.send_subscribe(sub_id);
            }
            Command::Join {
                sub_id,
                spec,
                tx,
                terminal,
                ready,
            } => {
                self.groups
                    .insert(sub_id, GroupEntry::new(spec, tx, terminal, ready));
                self.send_join(sub_id);
            }
            Command::Unsubscribe { sub_id, reply } if self.groups.contains_key(&sub_id) => {
                self.groups.remove(&sub_id);
                let id = self.next_request_id();
                match self.encode(&ClientMessage::LeaveGroup {
                    request_id: id,
                    subscription_id: sub_id,
                }) {
                    Ok(()) => {
                        self.pending.insert(id, Pending::Unsubscribe(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Unsubscribe { sub_id, reply } => {
                let Some(sub) = self.forget(sub_id) else {
                    // Already over (End, error, or never started).
                    let _ = reply.send(Ok(()));
                    return None;
                };
                if sub.paused.is_some() {
                    // The broker no longer has it.
                    let _ = reply.send(Ok(()));
                    return None;
                }
                let id = self.next_request_id();
                match self.encode(&ClientMessage::Unsubscribe {
                    request_id: id,
                    subscription_id: sub.wire_id,
                }) {
                    Ok(()) => {
                        self.pending.insert(id, Pending::Unsubscribe(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Refresh { credentials, reply } => {
                self.send_refresh(credentials, Some(reply));
            }
            Command::Close { reply } => return Some(Exit::Closed(reply)),
        }
        None
    }

    /// Sends `Refresh`; `reply` is `None` for the task's own refreshes.
    fn send_refresh(
        &mut self,
        credentials: String,
        reply: Option<oneshot::Sender<Result<ExpiresAt>>>,
    ) {
        let id = self.next_request_id();
        match self.encode(&ClientMessage::Refresh {
            request_id: id,
            credentials: credentials.clone(),
        }) {
            Ok(()) => {
                self.pending
                    .insert(id, Pending::Refresh { credentials, reply });
            }
            Err(e) => match reply {
                Some(reply) => {
                    let _ = reply.send(Err(e));
                }
                None => warn!(error = %e, "cannot send a token refresh"),
            },
        }
    }

    /// The token provider answered a proactive refresh.
    fn send_proactive_refresh(&mut self, fetched: Result<String, String>) {
        match fetched {
            Ok(token) => self.send_refresh(token, None),
            Err(reason) => {
                warn!(%reason, "the token provider failed; retrying the refresh");
                self.refresh_at = Some(self.refresh_retry());
            }
        }
    }

    /// When to refresh the credentials in force: with a token provider and
    /// proactive refresh on, before their `exp`.
    fn next_refresh(&self) -> Option<Instant> {
        if self.options.token_provider.is_none() || !self.options.proactive_refresh {
            return None;
        }
        let exp = self.token_exp?;
        let lifetime = exp
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Some(Instant::now() + token::refresh_delay(lifetime))
    }

    /// When to try a failed proactive refresh again: soon, well before the
    /// expiry when there is time for that (else the broker's `TokenExpired`
    /// and a reconnect take over).
    fn refresh_retry(&self) -> Instant {
        let left = self
            .token_exp
            .and_then(|exp| exp.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::ZERO);
        Instant::now() + (left / 4).clamp(Duration::from_millis(200), Duration::from_secs(5))
    }

    /// Whether a connection-level refusal is final: `Unauthorized` and
    /// `Forbidden` always (new credentials are needed, not retries),
    /// `TokenExpired` without a token provider to get a fresh one.
    fn final_refusal(&self, code: ErrorCode, message: &str) -> Option<Fatal> {
        let is_final = match code {
            ErrorCode::Unauthorized | ErrorCode::Forbidden => true,
            ErrorCode::TokenExpired => self.options.token_provider.is_none(),
            _ => false,
        };
        is_final.then(|| Fatal {
            code,
            message: message.to_owned(),
        })
    }

    /// A connection-level error from the broker (it closes the connection).
    fn connection_error(
        &mut self,
        code: ErrorCode,
        message: String,
        retry_after: Option<Duration>,
    ) -> Exit {
        if let Some(fatal) = self.final_refusal(code, &message) {
            return Exit::Fatal(fatal);
        }
        self.retry_after = retry_after;
        Exit::Lost(format!(
            "the broker closed the connection: {message} ({})",
            code_name(code)
        ))
    }

    /// The broker ended subscription `wire_id` (its refreshed grants do not
    /// cover it): the caller sees `Forbidden` as its last item.
    fn ended_by_broker(&mut self, wire_id: u64) {
        let Some(&sub_id) = self.wire.get(&wire_id) else {
            return;
        };
        let Some(mut sub) = self.forget(sub_id) else {
            return;
        };
        let error = Error::Server {
            code: ErrorCode::Forbidden,
            message: format!(
                "the refreshed credentials do not grant subscribe on {:?}; the broker ended the subscription",
                sub.topic
            ),
        };
        warn!(sub_id, topic = %sub.topic, "subscription ended by the broker after a credential refresh");
        match sub.ready.take() {
            Some(ready) => {
                let _ = ready.send(Err(error));
            }
            None => sub.fail(error),
        }
    }

    /// Removes a subscription from the task's books, handing what its
    /// batch holds to its queue first (it precedes whatever ends it).
    fn forget(&mut self, sub_id: u64) -> Option<SubEntry> {
        let mut sub = self.subs.remove(&sub_id)?;
        self.wire.remove(&sub.wire_id);
        // A dropped subscription's queue refuses it; nothing is lost then.
        let _ = sub.tx.send(std::mem::take(&mut sub.batch));
        Some(sub)
    }

    /// Sends `Subscribe` for a known subscription, from its resume position.
    fn send_subscribe(&mut self, sub_id: u64) {
        let Some(sub) = self.subs.get(&sub_id) else {
            return;
        };
        let id = self.next_request_id();
        let msg = match &sub.pattern {
            Some(pattern) => {
                let positions = pattern.positions();
                debug!(sub_id, wire_id = sub.wire_id, pattern = %sub.topic, resume = ?positions.as_ref().map(Vec::len), "subscribing to a pattern");
                ClientMessage::SubscribePattern {
                    request_id: id,
                    subscription_id: sub.wire_id,
                    pattern: sub.topic.clone(),
                    types: sub.types.clone(),
                    start: pattern.start(),
                    positions,
                }
            }
            None => {
                let start = sub.resume.start();
                debug!(sub_id, wire_id = sub.wire_id, topic = %sub.topic, ?start, "subscribing");
                ClientMessage::Subscribe {
                    request_id: id,
                    subscription_id: sub.wire_id,
                    topic: sub.topic.clone(),
                    types: sub.types.clone(),
                    start,
                }
            }
        };
        match self.encode(&msg) {
            Ok(()) => {
                self.pending.insert(id, Pending::Subscribe(sub_id));
            }
            Err(e) => {
                if let Some(mut sub) = self.forget(sub_id) {
                    match sub.ready.take() {
                        Some(ready) => {
                            let _ = ready.send(Err(e));
                        }
                        None => sub.fail(e),
                    }
                }
            }
        }
    }

    /// A `Subscription` was dropped (or a membership's consumer and last
    /// job): forget it and tell the broker.
    fn drop_subscription(&mut self, sub_id: u64) {
        if self.groups.remove(&sub_id).is_some() {
            self.send_leave(sub_id);
            return;
        }
        let Some(sub) = self.forget(sub_id) else {
            return;
        };
        if sub.paused.is_none() {
            self.send_unsubscribe(sub.wire_id);
        }
    }

    /// Leaves a group cleanly, nobody waiting for the answer: what the
    /// membership still holds is redelivered at once.
    fn send_leave(&mut self, id: u64) {
        let request_id = self.next_request_id();
        debug!(membership = id, "leaving the group");
        if self
            .encode(&ClientMessage::LeaveGroup {
                request_id,
                subscription_id: id,
            })
            .is_ok()
        {
            self.pending.insert(request_id, Pending::Ignore);
        }
    }

    /// Sends `JoinGroup` for a known membership, under its own id.
    fn send_join(&mut self, id: u64) {
        let Some(membership) = self.groups.get(&id) else {
            return;
        };
        let spec = &membership.spec;
        debug!(membership = id, topic = %spec.topic, group = %spec.group, consumer = %spec.consumer, "joining the group");
        let request_id = self.next_request_id();
        let msg = ClientMessage::JoinGroup {
            request_id,
            subscription_id: id,
            topic: spec.topic.clone(),
            group: spec.group.clone(),
            consumer: spec.consumer.clone(),
            max_in_flight: spec.max_in_flight,
            create: spec.create.clone(),
        };
        match self.encode(&msg) {
            Ok(()) => {
                self.pending.insert(request_id, Pending::Join(id));
            }
            Err(e) => {
                if let Some(membership) = self.groups.remove(&id) {
                    membership.fail_or_refuse(e);
                }
            }
        }
    }

    fn on_joined(&mut self, id: u64, epoch: u64) {
        let Some(membership) = self.groups.get_mut(&id) else {
            // Left meanwhile; its LeaveGroup is on its way.
            return;
        };
        debug!(membership = id, epoch, "joined");
        membership.accepting = true;
        // The group exists now: a re-join after a reconnect must not create
        // it again if an admin deleted it meanwhile.
        membership.spec.create = None;
        if let Some(ready) = membership.ready.take() {
            if ready.send(Ok(epoch)).is_err() {
                // The caller gave up waiting: nobody will read this one.
                self.drop_subscription(id);
            }
        }
    }

    fn on_join_failed(&mut self, id: u64, error: Error) {
        let Some(membership) = self.groups.remove(&id) else {
            return;
        };
        if membership.ready.is_none() {
            warn!(membership = id, topic = %membership.spec.topic, group = %membership.spec.group, %error, "joining the group again failed; the consumer ends");
        }
        membership.fail_or_refuse(error);
    }

    /// Hands a delivery or a group gap to its membership's queue.
    fn route_job(&mut self, id: u64, push: GroupPush) {
        let Some(membership) = self.groups.get(&id) else {
            return;
        };
        if !membership.accepting {
            return;
        }
        // A closed queue: the consumer was dropped while jobs of it live
        // on. What the broker pushes meanwhile stays held by this member
        // until the membership ends (then it is redelivered at once).
        let _ = membership.tx.send(push);
    }

    fn send_unsubscribe(&mut self, wire_id: u64) {
        let id = self.next_request_id();
        if self
            .encode(&ClientMessage::Unsubscribe {
                request_id: id,
                subscription_id: wire_id,
            })
            .is_ok()
        {
            self.pending.insert(id, Pending::Ignore);
        }
    }

    /// The caller's queue of `sub_id` is full: stop its delivery at the
    /// broker until the caller has drained half of it.
    fn pause(&mut self, sub_id: u64) {
        let Some(sub) = self.subs.get_mut(&sub_id) else {
            return;
        };
        debug!(sub_id, topic = %sub.topic, "subscription queue full; pausing it");
        sub.accepting = false;
        let wire_id = sub.wire_id;
        let (cancel, cancelled) = oneshot::channel::<()>();
        sub.paused = Some(cancel);
        let room_tx = self.room_tx.clone();
        // Half the queue, so that a resumed subscription has room to run
        // before it fills again.
        let capacity = sub.tx.capacity();
        let room = sub.tx.room(capacity - (capacity / 2).max(1));
        tokio::spawn(async move {
            tokio::select! {
                // Dropping the entry (close, unsubscribe) drops `cancel`.
                _ = cancelled => {}
                () = room => {
                    let _ = room_tx.send(sub_id);
                }
            }
        });
        self.wire.remove(&wire_id);
        self.send_unsubscribe(wire_id);
    }

    /// A paused subscription has room again: give it a fresh wire id, so
    /// that nothing still in flight for the old one is mistaken for the new.
    /// Returns whether it was paused (then the caller subscribes it anew).
    fn unpause(&mut self, sub_id: u64) -> bool {
        let Some(sub) = self.subs.get_mut(&sub_id) else {
            return false;
        };
        if sub.paused.take().is_none() {
            return false;
        }
        let wire_id = self.sub_ids.fetch_add(1, Ordering::Relaxed);
        sub.wire_id = wire_id;
        self.wire.insert(wire_id, sub_id);
        debug!(sub_id, wire_id, "resuming a paused subscription");
        true
    }

    /// Appends one frame to the write buffer, refusing one the broker would
    /// reject as too large (which would cost the whole connection).
    fn encode(&mut self, msg: &ClientMessage) -> Result<()> {
        let start = self.wbuf.len();
        // Packed for this connection only: a resend on the next one (which
        // may not compress) starts again from the plain message.
        let packed = self.packing.and_then(|p| p.pack(msg));
        encode_frame(packed.as_ref().unwrap_or(msg), &mut self.wbuf)?;
        let len = self.wbuf.len() - start - FRAME_HEADER_LEN;
        if len > self.max_frame_out {
            self.wbuf.truncate(start);
            return Err(Error::Protocol(ProtocolError::FrameTooLarge {
                len,
                max: self.max_frame_out,
            }));
        }
        Ok(())
    }

    /// Decodes and dispatches every whole frame in the read buffer, then
    /// hands each subscription what it got in one batch.
    fn process_buffered(&mut self, conn: &mut Conn) -> Result<(), Exit> {
        // An event frame is about 100 bytes plus its payload.
        self.batch_hint = (conn.rbuf.len() / 128 / self.subs.len().max(1)).clamp(4, 1024);
        let result = loop {
            // Events (nearly every frame) are read by hand, the rest by serde.
            match conn.decoder.decode_with(&mut conn.rbuf, decode_server_body) {
                Ok(Some(mut msg)) => {
                    if let Some(packing) = &self.packing {
                        if let Err(e) = packing.unpack(&mut msg) {
                            break Err(Exit::Lost(format!(
                                "unreadable payload in a {} from the broker: {e}",
                                msg.kind()
                            )));
                        }
                    }
                    if let Err(exit) = self.dispatch(msg) {
                        break Err(exit);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    break Err(Exit::Lost(format!(
                        "undecodable frame from the broker: {e}"
                    )))
                }
            }
        };
        // Also when the connection ends here: what was batched is in the
        // resume positions already, so it must reach the callers.
        self.flush_batches();
        result
    }

    /// Sends every subscription's batch to its queue: one send (and at most
    /// one wake-up of the consumer) per subscription per socket read.
    fn flush_batches(&mut self) {
        for sub_id in std::mem::take(&mut self.batched) {
            let Some(sub) = self.subs.get_mut(&sub_id) else {
                // Forgotten meanwhile, which flushed it.
                continue;
            };
            if sub.tx.send(std::mem::take(&mut sub.batch)).is_err() {
                self.drop_subscription(sub_id);
            }
        }
    }

    /// Routes one message from the broker; `Err` ends the connection.
    fn dispatch(&mut self, msg: ServerMessage) -> Result<(), Exit> {
        match msg {
            ServerMessage::Joined {
                request_id,
                subscription_id,
                epoch,
            } => {
                self.pending.remove(&request_id);
                self.on_joined(subscription_id, epoch);
            }
            ServerMessage::Delivery {
                subscription_id,
                attempt,
                event,
            } => self.route_job(subscription_id, GroupPush::Job { attempt, event }),
            ServerMessage::Gap {
                subscription_id,
                gap,
            } if self.groups.contains_key(&subscription_id) => {
                warn!(
                    membership = subscription_id,
                    topic = %gap.topic,
                    requested = gap.requested,
                    first_available = gap.first_available,
                    "group gap: work was lost before it was done"
                );
                self.route_job(subscription_id, GroupPush::Gap(gap));
            }
            ServerMessage::End {
                subscription_id, ..
            } if self.groups.contains_key(&subscription_id) => {
                // The broker ended the membership: its group or topic is gone.
                if let Some(membership) = self.groups.remove(&subscription_id) {
                    let message = format!(
                        "the broker ended the membership in {}/{} (the group or the topic was deleted)",
                        membership.spec.topic, membership.spec.group
                    );
                    membership.fail_or_refuse(Error::Server {
                        code: ErrorCode::GroupNotFound,
                        message,
                    });
                }
            }
            ServerMessage::Event {
                subscription_id,
                event,
            } => self.route_event(subscription_id, event),
            ServerMessage::Gap {
                subscription_id,
                gap,
            } => {
                if let Some(sub_id) = self.accepting(subscription_id) {
                    warn!(
                        sub_id,
                        topic = %gap.topic,
                        reason = ?gap.reason,
                        requested = gap.requested,
                        first_available = gap.first_available,
                        current = gap.current,
                        "gap: events were missed"
                    );
                    let record = match self.subs.get(&sub_id).map(|s| s.pattern.is_some()) {
                        Some(true) => PatternResume::effect_of_gap(&gap).map(Record::Pattern),
                        _ => Some(Record::Single(Resume::effect_of_gap(&gap))),
                    };
                    self.deliver(sub_id, Push::Gap(gap), record.unwrap_or(Record::Nothing));
                }
            }
            ServerMessage::End {
                subscription_id,
                topic,
                last_offset,
            } => {
                if let Some(sub_id) = self.accepting(subscription_id) {
                    let record = match self.subs.get(&sub_id).map(|s| s.pattern.is_some()) {
                        // One topic of a pattern subscription: the others go on.
                        Some(true) => Record::Pattern(pattern::Effect::End {
                            topic: topic.clone(),
                            last_offset,
                        }),
                        _ => Record::End,
                    };
                    debug!(sub_id, %topic, last_offset, "subscription ended");
                    self.deliver(sub_id, Push::End { topic, last_offset }, record);
                }
            }
            ServerMessage::PatternSubscribed {
                request_id,
                subscription_id,
                topics,
            } => {
                self.pending.remove(&request_id);
                self.on_pattern_subscribed(subscription_id, &topics);
            }
            ServerMessage::TopicJoined {
                subscription_id,
                position,
            } => {
                if let Some(sub_id) = self.accepting(subscription_id) {
                    if let Some(pattern) =
                        self.subs.get_mut(&sub_id).and_then(|s| s.pattern.as_mut())
                    {
                        debug!(sub_id, topic = %position.topic, epoch = position.epoch, "a topic joined the pattern subscription");
                        pattern.on_joined(&position);
                    }
                }
            }
            ServerMessage::SubscriptionEnded {
                subscription_id,
                code,
                message,
            } => {
                if let Some(sub_id) = self.accepting(subscription_id) {
                    if let Some(sub) = self.forget(sub_id) {
                        warn!(sub_id, pattern = %sub.topic, code = %code_name(code), %message, "the broker ended the subscription");
                        sub.fail(Error::Server { code, message });
                    }
                }
            }
            ServerMessage::Subscribed {
                request_id,
                subscription_id,
                epoch,
                next_offset,
            } => {
                self.pending.remove(&request_id);
                self.on_subscribed(subscription_id, epoch, next_offset);
            }
            ServerMessage::Error {
                request_id: None,
                code,
                message,
            } => return Err(self.connection_error(code, message, None)),
            ServerMessage::RetryLater {
                request_id: None,
                code,
                message,
                retry_after_ms,
            } => {
                let wait = Duration::from_millis(retry_after_ms);
                return Err(self.connection_error(code, message, Some(wait)));
            }
            ServerMessage::Error {
                request_id: Some(id),
                code,
                message,
            } => self.request_failed(id, Error::Server { code, message }),
            ServerMessage::RetryLater {
                request_id: Some(id),
                code,
                message,
                retry_after_ms,
            } => self.request_failed(
                id,
                Error::RetryLater {
                    code,
                    message,
                    retry_after: Duration::from_millis(retry_after_ms),
                },
            ),
            ServerMessage::Unsubscribed {
                request_id,
                subscription_id,
            } => match self.pending.get(&request_id) {
                // A refresh whose new grants do not cover this subscription.
                Some(Pending::Refresh { .. }) => self.ended_by_broker(subscription_id),
                Some(Pending::Unsubscribe(_) | Pending::Ignore) => {
                    if let Some(Pending::Unsubscribe(reply)) = self.pending.remove(&request_id) {
                        let _ = reply.send(Ok(()));
                    }
                }
                _ => debug!(request_id, "Unsubscribed for a request nobody waits for"),
            },
            ServerMessage::Refreshed {
                request_id,
                expires_at_ms,
            } => {
                if let Some(Pending::Refresh { credentials, reply }) =
                    self.pending.remove(&request_id)
                {
                    self.token_exp = token::expiry(&credentials);
                    self.credentials = Some(credentials);
                    self.refresh_at = self.next_refresh();
                    let expires_at = (expires_at_ms > 0)
                        .then(|| UNIX_EPOCH + Duration::from_millis(expires_at_ms));
                    debug!(?expires_at, "credentials refreshed");
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(expires_at));
                    }
                }
            }
            ServerMessage::Heartbeat => {}
            ServerMessage::Shutdown { reason } => {
                info!(%reason, "the broker sent Shutdown");
                return Err(Exit::Lost(format!("broker shutdown ({reason})")));
            }
            ServerMessage::Welcome { .. } | ServerMessage::WelcomeExt { .. } => {
                return Err(Exit::Lost("unexpected second Welcome".into()));
            }
            ServerMessage::PositionMismatch {
                request_id,
                message,
                current_offset,
                current_version,
            } => self.request_failed(
                request_id,
                Error::PositionMismatch {
                    message,
                    current_offset,
                    current_version,
                },
            ),
            reply @ (ServerMessage::Published { .. }
            | ServerMessage::Appended { .. }
            | ServerMessage::History { .. }
            | ServerMessage::Topics { .. }
            | ServerMessage::TopicInfo { .. }
            | ServerMessage::Ok { .. }
            | ServerMessage::Pong { .. }
            | ServerMessage::Settled { .. }
            | ServerMessage::GroupInfo { .. }
            | ServerMessage::Groups { .. }
            | ServerMessage::Redriven { .. }
            | ServerMessage::Connections { .. }) => {
                let id = reply_request_id(&reply);
                match self.pending.remove(&id) {
                    Some(Pending::Reply { reply: tx, .. }) => {
                        let _ = tx.send(Ok(reply));
                    }
                    Some(Pending::Ignore) => {}
                    Some(other) => {
                        // Put back whatever waited for something else.
                        self.pending.insert(id, other);
                        debug!(
                            request_id = id,
                            kind = reply.kind(),
                            "reply of an unexpected kind"
                        );
                    }
                    None => {
                        debug!(
                            request_id = id,
                            kind = reply.kind(),
                            "reply for a request nobody waits for"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// A request failed with `error`.
    fn request_failed(&mut self, id: u64, error: Error) {
        match self.pending.remove(&id) {
            Some(Pending::Reply { reply, .. }) => {
                let _ = reply.send(Err(error));
            }
            Some(Pending::Unsubscribe(reply)) => {
                // Unknown to the broker means unsubscribed all the same.
                let _ = reply.send(Ok(()));
            }
            Some(Pending::Subscribe(sub_id)) => self.on_subscribe_failed(sub_id, error),
            Some(Pending::Join(id)) => self.on_join_failed(id, error),
            Some(Pending::Refresh {
                reply: Some(reply), ..
            }) => {
                let _ = reply.send(Err(error));
            }
            Some(Pending::Refresh { reply: None, .. }) => {
                // The credentials in force stay; try again before they expire.
                warn!(%error, "the broker refused a token refresh; retrying");
                self.refresh_at = Some(self.refresh_retry());
            }
            Some(Pending::Ignore) | None => {
                debug!(request_id = id, %error, "error for a request nobody waits for");
            }
        }
    }

    /// The client-side id of the subscription a push for `wire_id` is for,
    /// if it takes pushes now (not paused, not awaiting `Subscribed`).
    fn accepting(&self, wire_id: u64) -> Option<u64> {
        let sub_id = *self.wire.get(&wire_id)?;
        self.subs
            .get(&sub_id)
            .is_some_and(|sub| sub.accepting)
            .then_some(sub_id)
    }

    fn on_subscribed(&mut self, wire_id: u64, epoch: u64, next_offset: u64) {
        let Some(&sub_id) = self.wire.get(&wire_id) else {
            // Dropped meanwhile; its unsubscribe is on its way.
            return;
        };
        let Some(sub) = self.subs.get_mut(&sub_id) else {
            return;
        };
        debug!(sub_id, wire_id, topic = %sub.topic, epoch, next_offset, "subscribed");
        sub.accepting = true;
        sub.resume.on_subscribed(epoch, next_offset);
        if let Some(ready) = sub.ready.take() {
            let subscribed = Subscribed {
                epoch,
                next_offset,
                topics: Vec::new(),
            };
            if ready.send(Ok(subscribed)).is_err() {
                // The caller gave up waiting: nobody will read this one.
                self.drop_subscription(sub_id);
            }
        }
    }

    fn on_subscribe_failed(&mut self, sub_id: u64, error: Error) {
        let Some(mut sub) = self.forget(sub_id) else {
            return;
        };
        match sub.ready.take() {
            Some(ready) => {
                let _ = ready.send(Err(error));
            }
            None => {
                warn!(sub_id, topic = %sub.topic, %error, "re-subscribing failed; the subscription ends");
                sub.fail(error);
            }
        }
    }

    fn route_event(&mut self, wire_id: u64, event: WireEvent) {
        let Some(sub_id) = self.accepting(wire_id) else {
            return;
        };
        let Some(sub) = self.subs.get(&sub_id) else {
            return;
        };
        if sub.pattern.is_some() {
            return self.route_pattern_event(sub_id, event);
        }
        let Some(epoch) = sub.resume.epoch() else {
            return;
        };
        match sub.resume.effect_of_event(&event) {
            Some(effect) => {
                self.deliver(sub_id, Push::Event { epoch, event }, Record::Single(effect))
            }
            None => debug!(sub_id, offset = event.offset, "dropped a duplicate event"),
        }
    }

    /// An event of a pattern subscription: recorded under its topic.
    fn route_pattern_event(&mut self, sub_id: u64, event: WireEvent) {
        let Some(pattern) = self.subs.get(&sub_id).and_then(|s| s.pattern.as_ref()) else {
            return;
        };
        match pattern.effect_of_event(&event) {
            Some(effect) => {
                let epoch = pattern.epoch(&event.topic).unwrap_or_default();
                self.deliver(
                    sub_id,
                    Push::Event { epoch, event },
                    Record::Pattern(effect),
                );
            }
            None => {
                debug!(sub_id, topic = %event.topic, offset = event.offset, "dropped a duplicate event")
            }
        }
    }

    fn on_pattern_subscribed(&mut self, wire_id: u64, topics: &[TopicPosition]) {
        let Some(&sub_id) = self.wire.get(&wire_id) else {
            // Dropped meanwhile; its unsubscribe is on its way.
            return;
        };
        let Some(sub) = self.subs.get_mut(&sub_id) else {
            return;
        };
        let Some(pattern) = &mut sub.pattern else {
            return;
        };
        debug!(sub_id, wire_id, pattern = %sub.topic, topics = topics.len(), "subscribed to a pattern");
        pattern.on_subscribed(topics);
        sub.accepting = true;
        if let Some(ready) = sub.ready.take() {
            let subscribed = Subscribed {
                epoch: 0,
                next_offset: 0,
                topics: pattern.positions().unwrap_or_default(),
            };
            if ready.send(Ok(subscribed)).is_err() {
                // The caller gave up waiting: nobody will read this one.
                self.drop_subscription(sub_id);
            }
        }
    }

    /// Takes a push into its subscription's batch (handed to the queue when
    /// the socket read is processed) and records it for resuming
    /// ([`Record::End`] ends the subscription); pauses the subscription when
    /// its queue is full.
    fn deliver(&mut self, sub_id: u64, push: Push, record: Record) {
        let Some(sub) = self.subs.get_mut(&sub_id) else {
            return;
        };
        if sub.tx.is_closed() {
            self.drop_subscription(sub_id);
            return;
        }
        if !sub.tx.has_room(sub.batch.len()) {
            // Not taken, so not in the resume position: it comes again (or
            // as part of a gap) when the subscription resumes.
            self.pause(sub_id);
            return;
        }
        if sub.batch.is_empty() {
            self.batched.push(sub_id);
            sub.batch.reserve(self.batch_hint);
        }
        sub.batch.push(push);
        match record {
            Record::Single(effect) => sub.resume.apply(effect),
            Record::Pattern(effect) => {
                if let Some(pattern) = &mut sub.pattern {
                    pattern.apply(effect);
                }
            }
            Record::Nothing => {}
            // `End`: the broker freed the id; nothing follows.
            Record::End => {
                self.forget(sub_id);
            }
        }
    }
}

/// What delivering a push changes in its subscription's resume state.
enum Record {
    /// A push of a single-topic subscription.
    Single(Effect),
    /// A push of a pattern subscription (its `End` ends one topic only).
    Pattern(pattern::Effect),
    /// Nothing to record (a per-type gap of a pattern subscription).
    Nothing,
    /// The end of a single-topic subscription: it is over.
    End,
}

/// Awaits the token being fetched (never resolves when there is none).
async fn poll_token(fetching: &mut Option<TokenFuture>) -> Result<String, String> {
    match fetching {
        Some(fetch) => fetch.await,
        None => std::future::pending().await,
    }
}

fn reply_request_id(msg: &ServerMessage) -> u64 {
    match msg {
        ServerMessage::Published { request_id, .. }
        | ServerMessage::Appended { request_id, .. }
        | ServerMessage::Subscribed { request_id, .. }
        | ServerMessage::Unsubscribed { request_id, .. }
        | ServerMessage::History { request_id, .. }
        | ServerMessage::Topics { request_id, .. }
        | ServerMessage::TopicInfo { request_id, .. }
        | ServerMessage::Ok { request_id }
        | ServerMessage::Pong { request_id }
        | ServerMessage::Joined { request_id, .. }
        | ServerMessage::Settled { request_id, .. }
        | ServerMessage::GroupInfo { request_id, .. }
        | ServerMessage::Groups { request_id, .. }
        | ServerMessage::Redriven { request_id, .. }
        | ServerMessage::Connections { request_id, .. }
        | ServerMessage::PatternSubscribed { request_id, .. } => *request_id,
        ServerMessage::Error { request_id, .. } => request_id.unwrap_or(0),
        _ => 0,
    }
}

fn fail_command(cmd: Command, error: impl Fn() -> Error) {
    match cmd {
        Command::Request { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Command::Subscribe { ready, .. } => {
            let _ = ready.send(Err(error()));
        }
        Command::Join { ready, .. } => {
            let _ = ready.send(Err(error()));
        }
        Command::Unsubscribe { reply, .. } => {
            let _ = reply.send(Ok(()));
        }
        Command::Refresh { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Command::Close { reply } => {
            let _ = reply.send(());
        }
    }
}
