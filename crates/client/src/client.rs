//! The [`Client`] handle and its requests.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ringcast_protocol::{
    Ack, AppendAck, AppendEvent, ClientMessage, GroupOptions, NewEvent, ServerMessage,
    SettleAction, Start, TopicSummary, WireConnection, WireEvent, WireGroupInfo, WireTopicInfo,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, timeout_at, Instant, Sleep};

use crate::connection::{self, Command, FatalSlot, JoinSpec, Subscribed, Task};
use crate::consumer::{ConsumeOptions, Consumer, Settled};
use crate::error::{Error, Result};
use crate::options::ClientOptions;
use crate::pattern::{PatternResume, PatternSubscribeBuilder, PatternSubscription};
use crate::subscription::Subscription;

/// Commands buffered between the handles and the connection task; callers
/// wait (within their request timeout) when it is full.
const COMMAND_QUEUE: usize = 1024;

/// What the broker announced in `Welcome` on the current connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// The broker's software version.
    pub server_version: String,
    /// The protocol version in use.
    pub protocol_version: u16,
    /// Largest frame body the broker accepts; larger requests fail locally
    /// with [`Error::Protocol`] instead of costing the connection.
    pub max_frame: u32,
    /// Largest event payload the broker accepts.
    pub max_payload: u32,
    /// Most subscriptions per connection.
    pub max_subscriptions: u32,
    /// The broker's heartbeat interval in milliseconds (0 = none).
    pub heartbeat_ms: u32,
    /// The payload compression in force on this connection: what the
    /// options offered, as the broker took it (its threshold may be
    /// higher), or [`Compression::None`](crate::Compression::None).
    pub compression: crate::Compression,
}

/// One page of a topic's history, from [`Client::history`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// Events in increasing offset order.
    pub events: Vec<WireEvent>,
    /// Pass as `after` to read the next page.
    pub next_after: u64,
    /// The oldest offset the broker still retains.
    pub first_available: u64,
}

/// A [`NewEvent`] with no headers.
///
/// ```
/// use ringcast_client::{new_event, NewEventExt};
/// let event = new_event("created", r#"{"id":1}"#).header("trace", "t1");
/// assert_eq!(event.headers, vec![("trace".to_owned(), "t1".to_owned())]);
/// ```
pub fn new_event(event_type: impl Into<String>, payload: impl Into<Bytes>) -> NewEvent {
    NewEvent {
        event_type: event_type.into(),
        headers: Vec::new(),
        payload: payload.into(),
    }
}

/// Builder-style additions to [`NewEvent`] and [`AppendEvent`].
///
/// ```
/// use ringcast_client::{new_event, NewEventExt};
/// let event = new_event("paid", "{}").header("trace", "t1").key("order-17-paid");
/// assert_eq!(event.idempotency_key.as_deref(), Some("order-17-paid"));
/// ```
pub trait NewEventExt {
    /// Appends a header (names may repeat; order is kept).
    fn header(self, name: impl Into<String>, value: impl Into<String>) -> Self;
    /// The event with this idempotency key (1–128 bytes, no control
    /// characters) instead of a random one: within the topic's dedup window
    /// the broker stores an event with a given key at most once.
    fn key(self, key: impl Into<String>) -> AppendEvent;
}

impl NewEventExt for NewEvent {
    fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn key(self, key: impl Into<String>) -> AppendEvent {
        AppendEvent::from(self).key(key)
    }
}

impl NewEventExt for AppendEvent {
    fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn key(mut self, key: impl Into<String>) -> AppendEvent {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// What an append expects of its topic, checked by the broker atomically
/// with it ([`Client::publish_expecting`]).
///
/// ```
/// use ringcast_client::Expected;
/// let new_stream = Expected::offset(0); // only into an empty topic
/// let after_v3 = Expected::version(3); // only if the type's last version is 3
/// assert_eq!(new_stream.offset, Some(0));
/// assert_eq!(after_v3.version, Some(3));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expected {
    /// The topic's last offset must be this (0 = no event was ever published).
    pub offset: Option<u64>,
    /// The last version of the batch's event type must be this (0 = none
    /// yet); the batch must then hold one event type.
    pub version: Option<u64>,
}

impl Expected {
    /// Expects the topic's last offset to be `offset`.
    pub fn offset(offset: u64) -> Self {
        Expected {
            offset: Some(offset),
            version: None,
        }
    }

    /// Expects the last version of the events' type to be `version`.
    pub fn version(version: u64) -> Self {
        Expected {
            offset: None,
            version: Some(version),
        }
    }
}

/// A fresh random idempotency key: 16 random bytes in hex.
fn random_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// `events` with a random key where none was given.
fn keyed(events: Vec<AppendEvent>) -> Vec<AppendEvent> {
    events
        .into_iter()
        .map(|mut e| {
            if e.idempotency_key.is_none() {
                e.idempotency_key = Some(random_key());
            }
            e
        })
        .collect()
}

/// State shared by every clone of a [`Client`] and its subscriptions.
pub(crate) struct Inner {
    pub(crate) options: ClientOptions,
    pub(crate) cmd_tx: mpsc::Sender<Command>,
    pub(crate) drop_tx: mpsc::UnboundedSender<u64>,
    request_ids: Arc<AtomicU64>,
    /// Shared with the task, which takes fresh wire ids from it.
    sub_ids: Arc<AtomicU64>,
    info_rx: watch::Receiver<ServerInfo>,
    /// Set when the broker refused the client for good.
    fatal: FatalSlot,
}

impl Inner {
    /// What a call gets once the connection task is gone.
    pub(crate) fn gone(&self) -> Error {
        self.fatal.get().map_or(Error::Closed, |f| f.error())
    }
}

/// A connection to a ringcast broker.
///
/// Cheap to clone (an `Arc` inside); every clone shares one TCP connection,
/// owned by a background task, and may be used from many tasks at once.
/// Requests are pipelined: each call sends at once, without waiting for the
/// replies to earlier ones.
///
/// # Reconnects
/// When the connection drops (EOF, I/O error, a broker silent for three
/// heartbeats, or the broker's `Shutdown`), the client reconnects by itself
/// with capped exponential backoff and full jitter, and resumes every
/// [`Subscription`] exactly after the last event it delivered: no duplicate,
/// no hole, and a [`Delivery::Gap`](crate::Delivery::Gap) only when the
/// broker no longer has what was missed.
///
/// Publishes in flight when the connection drops are sent again on the new
/// connection, in their original order: every event carries an idempotency
/// key (a random one unless the caller gave one), so the broker stores it
/// exactly once however often it is sent, and the ack is the original's.
/// This holds while the retry comes within the topic's `dedup_window` (2
/// minutes by default; keep [`ClientOptions::request_timeout`] below it).
/// Other requests in flight fail with [`Error::ConnectionLost`] and are not
/// retried: they may or may not have taken effect. Requests issued
/// while the client is reconnecting wait for the new connection, up to
/// [`ClientOptions::request_timeout`].
///
/// # Credentials
/// `Hello` carries [`ClientOptions::credentials`] (a JWT or an API key), or a
/// fresh token from [`ClientOptions::token_provider`] on every connection.
/// Replace a token before it expires with [`refresh`](Self::refresh); with a
/// provider the client does so by itself, and if the broker still closes the
/// connection with `TokenExpired`, it reconnects with a fresh token and
/// resumes every subscription exactly (no event lost or repeated). Without a
/// provider, an expired token, like `Unauthorized` or `Forbidden` from the
/// broker at connect, stops the client: every subscription ends and every
/// call fails with [`Error::Refused`]. A request over a rate limit fails with
/// [`Error::RetryLater`], carrying how long to wait.
///
/// The background task ends when [`close`](Self::close) is called or when the
/// last clone and the last subscription are dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.options.addr)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the broker at `addr` (`host:port`) with default options.
    ///
    /// The first connection is not retried: if the broker cannot be reached
    /// or refuses the handshake, this fails ([`Error::Io`],
    /// [`Error::Handshake`], [`Error::Timeout`]). Later losses are repaired
    /// in the background.
    pub async fn connect(addr: impl Into<String>) -> Result<Client> {
        Client::connect_with(ClientOptions::new(addr)).await
    }

    /// Connects with explicit [`ClientOptions`]; see [`connect`](Self::connect).
    pub async fn connect_with(options: ClientOptions) -> Result<Client> {
        let conn = connection::connect(&options, options.credentials.clone()).await?;
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (drop_tx, drop_rx) = mpsc::unbounded_channel();
        let (info_tx, info_rx) = watch::channel(conn.info().clone());
        let request_ids = Arc::new(AtomicU64::new(1));
        let sub_ids = Arc::new(AtomicU64::new(1));
        let fatal = FatalSlot::default();
        let task = Task::new(
            options.clone(),
            cmd_rx,
            drop_rx,
            request_ids.clone(),
            sub_ids.clone(),
            info_tx,
            fatal.clone(),
        );
        tokio::spawn(task.run(conn));
        Ok(Client {
            inner: Arc::new(Inner {
                options,
                cmd_tx,
                drop_tx,
                request_ids,
                sub_ids,
                info_rx,
                fatal,
            }),
        })
    }

    /// The options this client was created with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// What the broker announced on the most recent connection.
    pub fn server_info(&self) -> ServerInfo {
        self.inner.info_rx.borrow().clone()
    }

    /// Publishes one event without headers and waits for its ack.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<Ack> {
        self.publish_event(topic, new_event(event_type, payload))
            .await
    }

    /// Publishes one event (with headers, and maybe an idempotency key: see
    /// [`NewEventExt::key`]) and waits for its ack.
    pub async fn publish_event(
        &self,
        topic: impl Into<String>,
        event: impl Into<AppendEvent>,
    ) -> Result<Ack> {
        self.queue_publish(topic, event).await?.await
    }

    /// Queues one event for publishing and returns once it is queued, with a
    /// [`PendingAck`] to await for the ack.
    ///
    /// Events queued by successive calls are sent, and so appended, in call
    /// order, while their acks are awaited concurrently: the way to publish a
    /// stream of events in order at full speed.
    ///
    /// Dropping the [`PendingAck`] does not cancel the publish, except while
    /// the client is reconnecting: an event still waiting for the new
    /// connection when its ack is dropped (or times out) is not sent.
    ///
    /// ```no_run
    /// # async fn demo(client: ringcast_client::Client) -> ringcast_client::Result<()> {
    /// use ringcast_client::new_event;
    /// let mut acks = Vec::new();
    /// for i in 0..1000 {
    ///     acks.push(client.queue_publish("ticks", new_event("tick", i.to_string())).await?);
    /// }
    /// for ack in acks {
    ///     println!("{:?}", ack.await?);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn queue_publish(
        &self,
        topic: impl Into<String>,
        event: impl Into<AppendEvent>,
    ) -> Result<PendingAck> {
        let reply = self
            .send_append(topic.into(), vec![event.into()], Expected::default())
            .await?;
        Ok(PendingAck { reply })
    }

    /// Queues `events` as one `Append`, each with a key (random where the
    /// caller gave none), sent again on the next connection if this one
    /// drops before the reply.
    async fn send_append(
        &self,
        topic: String,
        events: Vec<AppendEvent>,
        expected: Expected,
    ) -> Result<PendingReply> {
        let events = keyed(events);
        self.send_request_with(true, |request_id| ClientMessage::Append {
            request_id,
            topic,
            events,
            expected_offset: expected.offset,
            expected_version: expected.version,
        })
        .await
    }

    /// Publishes several events to one topic atomically (all or none), in
    /// order, and returns one ack per event. An empty batch returns no acks
    /// without asking the broker.
    pub async fn publish_batch<E: Into<AppendEvent>>(
        &self,
        topic: impl Into<String>,
        events: Vec<E>,
    ) -> Result<Vec<Ack>> {
        let acks = self
            .publish_expecting(topic, events, Expected::default())
            .await?;
        Ok(acks.into_iter().map(Ack::from).collect())
    }

    /// Appends `events` to `topic` atomically, only if `expected` holds —
    /// for event-sourced writers (`Expected::offset(0)`: only into a new
    /// topic; `Expected::version(v)`: only if nobody appended this type
    /// since version `v`). Returns one ack per event, in order, each saying
    /// whether it was a duplicate of an event already stored with its key.
    ///
    /// If another writer got there first, nothing is stored and the call
    /// fails with [`Error::PositionMismatch`], carrying the current offset
    /// and version. An empty batch returns no acks
    /// without asking the broker.
    ///
    /// ```no_run
    /// # async fn demo(client: ringcast_client::Client) -> ringcast_client::Result<()> {
    /// use ringcast_client::{new_event, Error, Expected};
    /// match client
    ///     .publish_expecting("cart-7", vec![new_event("item_added", "{}")], Expected::version(4))
    ///     .await
    /// {
    ///     Ok(acks) => println!("now at version {}", acks[0].version),
    ///     Err(Error::PositionMismatch { current_version, .. }) => {
    ///         println!("someone else wrote version {current_version}; reload and retry")
    ///     }
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn publish_expecting<E: Into<AppendEvent>>(
        &self,
        topic: impl Into<String>,
        events: Vec<E>,
        expected: Expected,
    ) -> Result<Vec<AppendAck>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let count = events.len();
        let events = events.into_iter().map(Into::into).collect();
        let reply = self.send_append(topic.into(), events, expected).await?;
        let acks = append_acks(reply.await?)?;
        if acks.len() != count {
            return Err(Error::UnexpectedReply(format!(
                "{} acks for a batch of {count}",
                acks.len()
            )));
        }
        Ok(acks)
    }

    /// Starts building a subscription to `topic`; finish with
    /// [`SubscribeBuilder::send`] (or `.await` the builder).
    ///
    /// By default it receives every type, starting live.
    pub fn subscribe(&self, topic: impl Into<String>) -> SubscribeBuilder {
        SubscribeBuilder {
            client: self.clone(),
            topic: topic.into(),
            types: Vec::new(),
            start: Start::Live,
            buffer: self.inner.options.subscription_buffer,
        }
    }

    /// Starts building a subscription to every topic matching `pattern`
    /// (`*`: any run of topic characters, `?`: one), now and later; finish
    /// with [`PatternSubscribeBuilder::send`] (or `.await` the builder).
    ///
    /// By default it receives every type; the topics matching now start
    /// live, those that start matching later from their first event. Each
    /// delivery names its topic; an `End` ends only its topic. Topics the
    /// credentials may not read are left out. Needs a broker of protocol
    /// version 5.
    pub fn subscribe_pattern(&self, pattern: impl Into<String>) -> PatternSubscribeBuilder {
        PatternSubscribeBuilder {
            client: self.clone(),
            pattern: pattern.into(),
            types: Vec::new(),
            start: Start::Live,
            positions: None,
            buffer: self.inner.options.subscription_buffer,
        }
    }

    /// Reads one page of retained events with an offset greater than `after`
    /// (0 = from the oldest), of the given types (empty = all), at most
    /// `limit` of them (the broker may return fewer).
    pub async fn history(
        &self,
        topic: impl Into<String>,
        after: u64,
        types: &[&str],
        limit: u32,
    ) -> Result<HistoryPage> {
        let topic = topic.into();
        let types = types.iter().map(|t| (*t).to_owned()).collect();
        match self
            .request(|request_id| ClientMessage::History {
                request_id,
                topic,
                after,
                types,
                limit,
            })
            .await?
        {
            ServerMessage::History {
                events,
                next_after,
                first_available,
                ..
            } => Ok(HistoryPage {
                events,
                next_after,
                first_available,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Lists the broker's topics.
    pub async fn topics(&self) -> Result<Vec<TopicSummary>> {
        match self
            .request(|request_id| ClientMessage::ListTopics { request_id })
            .await?
        {
            ServerMessage::Topics { topics, .. } => Ok(topics),
            other => Err(unexpected(&other)),
        }
    }

    /// Describes one topic.
    pub async fn info(&self, topic: impl Into<String>) -> Result<WireTopicInfo> {
        let topic = topic.into();
        match self
            .request(|request_id| ClientMessage::TopicInfo { request_id, topic })
            .await?
        {
            ServerMessage::TopicInfo { info, .. } => Ok(info),
            other => Err(unexpected(&other)),
        }
    }

    /// Seals a topic: publishes are refused from now on, and subscribers get
    /// [`Delivery::End`](crate::Delivery::End) after its last event.
    pub async fn seal(&self, topic: impl Into<String>) -> Result<()> {
        let topic = topic.into();
        self.expect_ok(|request_id| ClientMessage::Seal { request_id, topic })
            .await
    }

    /// Deletes a topic and its history; re-creating it starts a new epoch.
    pub async fn delete(&self, topic: impl Into<String>) -> Result<()> {
        let topic = topic.into();
        self.expect_ok(|request_id| ClientMessage::Delete { request_id, topic })
            .await
    }

    /// Lists the broker's live connections (TCP and SSE), with each
    /// subscription's position and lag, following every page. Needs the
    /// admin grant on every topic (`Forbidden` otherwise).
    pub async fn connections(&self) -> Result<Vec<WireConnection>> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .request(|request_id| ClientMessage::ListConnections {
                    request_id,
                    after,
                    limit: 0,
                })
                .await?;
            match page {
                ServerMessage::Connections {
                    connections,
                    next_after,
                    ..
                } => {
                    all.extend(connections);
                    // A next page must move on, or the listing is over.
                    if next_after <= after {
                        return Ok(all);
                    }
                    after = next_after;
                }
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// Closes the broker's connection `id` (from [`connections`](Self::connections))
    /// as a broker shutdown would: its client reconnects and resumes. An
    /// unknown id is [`ErrorCode::ConnectionNotFound`](crate::ErrorCode).
    /// Needs the admin grant on every topic.
    pub async fn close_connection(&self, id: u64) -> Result<()> {
        self.expect_ok(|request_id| ClientMessage::CloseConnection {
            request_id,
            connection_id: id,
        })
        .await
    }

    /// Joins consumer group `group` of `topic` as `options.consumer` and
    /// returns the membership: a stream of [`Job`](crate::Job)s — each event
    /// to one member of the group at a time, to settle with `ack`, `nack`,
    /// `in_progress` or `term` — and of gaps for work the group lost.
    ///
    /// The group must exist unless [`ConsumeOptions::create`] is set. The
    /// membership survives reconnects (see [`Consumer`]); it ends with
    /// [`Consumer::leave`], or when the consumer and its jobs are dropped.
    ///
    /// ```no_run
    /// # async fn demo(client: ringcast_client::Client) -> ringcast_client::Result<()> {
    /// use ringcast_client::{ConsumeOptions, ConsumerItem, GroupOptions};
    /// let options = ConsumeOptions::new("mailer-1").create(GroupOptions::default());
    /// let mut jobs = client.consume("emails", "mailer", options).await?;
    /// while let Some(item) = jobs.next().await {
    ///     match item? {
    ///         ConsumerItem::Job(job) => {
    ///             println!("sending {} (attempt {})", job.offset(), job.attempt());
    ///             job.ack().await?;
    ///         }
    ///         ConsumerItem::Gap(gap) => eprintln!("lost work up to {}", gap.first_available - 1),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn consume(
        &self,
        topic: impl Into<String>,
        group: impl Into<String>,
        options: ConsumeOptions,
    ) -> Result<Consumer> {
        let deadline = Instant::now() + self.inner.options.request_timeout;
        let id = self.inner.sub_ids.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let terminal = Arc::default();
        let (ready, ready_rx) = oneshot::channel();
        let spec = JoinSpec {
            topic: topic.into(),
            group: group.into(),
            consumer: options.consumer,
            max_in_flight: options.max_in_flight,
            create: options.create,
        };
        let cmd = Command::Join {
            sub_id: id,
            spec: spec.clone(),
            tx,
            terminal: Arc::clone(&terminal),
            ready,
        };
        self.enqueue(cmd, deadline).await?;
        let epoch = match timeout_at(deadline, ready_rx).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(self.inner.gone()),
            Err(_) => return Err(Error::Timeout),
        };
        Ok(Consumer::new(
            self.clone(),
            id,
            spec.topic,
            spec.group,
            spec.consumer,
            epoch,
            rx,
            terminal,
        ))
    }

    /// Settles `offsets` through membership `id`. An ack is sent again on
    /// the next connection if this one drops first (a repeat counts as
    /// `already_done`); a nack, in-progress or term is not, since the
    /// offset may meanwhile be another member's redelivery.
    pub(crate) async fn settle(
        &self,
        id: u64,
        offsets: Vec<u64>,
        action: SettleAction,
    ) -> Result<Settled> {
        let resend = matches!(action, SettleAction::Ack);
        let reply = self
            .send_request_with(resend, |request_id| ClientMessage::Settle {
                request_id,
                subscription_id: id,
                offsets,
                action,
            })
            .await?;
        match reply.await? {
            ServerMessage::Settled {
                applied,
                already_done,
                unknown,
                ..
            } => Ok(Settled {
                applied,
                already_done,
                unknown,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates consumer group `group` of `topic` with `options` and returns
    /// it. Idempotent: an existing group is returned unchanged, unless
    /// `update` is set, which gives it the new settings (all but `start`;
    /// needs the `admin` grant).
    pub async fn create_group(
        &self,
        topic: impl Into<String>,
        group: impl Into<String>,
        options: GroupOptions,
        update: bool,
    ) -> Result<WireGroupInfo> {
        let (topic, group) = (topic.into(), group.into());
        self.group_reply(|request_id| ClientMessage::CreateGroup {
            request_id,
            topic,
            group,
            options,
            update,
        })
        .await
    }

    /// Describes a consumer group: settings, position, lag, pending work
    /// (with the oldest pending events), members and counters.
    pub async fn group_info(
        &self,
        topic: impl Into<String>,
        group: impl Into<String>,
    ) -> Result<WireGroupInfo> {
        let (topic, group) = (topic.into(), group.into());
        self.group_reply(|request_id| ClientMessage::GroupInfo {
            request_id,
            topic,
            group,
        })
        .await
    }

    /// Lists the consumer groups of `topic`, by name.
    pub async fn groups(&self, topic: impl Into<String>) -> Result<Vec<WireGroupInfo>> {
        let topic = topic.into();
        match self
            .request(|request_id| ClientMessage::ListGroups { request_id, topic })
            .await?
        {
            ServerMessage::Groups { groups, .. } => Ok(groups),
            other => Err(unexpected(&other)),
        }
    }

    /// Deletes a consumer group and its pending work (needs `admin`). Its
    /// members get no more jobs; their consumers end with `group_not_found`
    /// when they next join (after a reconnect), or when the broker ends the
    /// membership with `End`.
    pub async fn delete_group(
        &self,
        topic: impl Into<String>,
        group: impl Into<String>,
    ) -> Result<()> {
        let (topic, group) = (topic.into(), group.into());
        self.expect_ok(|request_id| ClientMessage::DeleteGroup {
            request_id,
            topic,
            group,
        })
        .await
    }

    /// Publishes the group's dead letters back to its topic, each once (needs
    /// `admin`); returns how many were published (repeats not counted).
    pub async fn redrive(&self, topic: impl Into<String>, group: impl Into<String>) -> Result<u64> {
        let (topic, group) = (topic.into(), group.into());
        match self
            .request(|request_id| ClientMessage::Redrive {
                request_id,
                topic,
                group,
            })
            .await?
        {
            ServerMessage::Redriven { count, .. } => Ok(count),
            other => Err(unexpected(&other)),
        }
    }

    async fn group_reply(&self, build: impl FnOnce(u64) -> ClientMessage) -> Result<WireGroupInfo> {
        match self.request(build).await? {
            ServerMessage::GroupInfo { info, .. } => Ok(info),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends `Ping` and returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration> {
        let started = Instant::now();
        match self
            .request(|request_id| ClientMessage::Ping { request_id })
            .await?
        {
            ServerMessage::Pong { .. } => Ok(started.elapsed()),
            other => Err(unexpected(&other)),
        }
    }

    /// Replaces the connection's credentials with `credentials` (typically a
    /// fresh token before the current one expires) and returns when the
    /// session now ends (`None`: never). Later reconnects use them too.
    ///
    /// The broker requires the same subject (`Forbidden` otherwise); on any
    /// refusal the old credentials stay in force. Subscriptions the new
    /// grants do not cover are ended by the broker: each yields
    /// [`Error::Server`] with code `Forbidden` as its last item.
    ///
    /// With a [`token provider`](ClientOptions::with_token_provider) there is
    /// no need to call this: the client refreshes by itself.
    pub async fn refresh(&self, credentials: impl Into<String>) -> Result<Option<SystemTime>> {
        let deadline = Instant::now() + self.inner.options.request_timeout;
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Refresh {
            credentials: credentials.into(),
            reply,
        };
        self.enqueue(cmd, deadline).await?;
        match timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.inner.gone()),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Closes the connection for every clone of this client: queued frames
    /// are flushed (for up to a second), requests still in flight fail with
    /// [`Error::Closed`], subscriptions end with [`Error::Closed`], and later
    /// calls fail with [`Error::Closed`]. Closing twice is fine.
    pub async fn close(&self) -> Result<()> {
        let (reply, done) = oneshot::channel();
        if self
            .inner
            .cmd_tx
            .send(Command::Close { reply })
            .await
            .is_ok()
        {
            let _ = done.await;
        }
        Ok(())
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Ends subscription (or group membership) `sub_id` and waits for the
    /// broker's confirmation, within the request timeout.
    pub(crate) async fn end_subscription(&self, sub_id: u64) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Unsubscribe { sub_id, reply };
        let deadline = Instant::now() + self.inner.options.request_timeout;
        self.enqueue(cmd, deadline).await?;
        match timeout_at(deadline, rx).await {
            Ok(result) => result.unwrap_or(Err(Error::Closed)),
            Err(_) => Err(Error::Timeout),
        }
    }

    async fn expect_ok(&self, build: impl FnOnce(u64) -> ClientMessage) -> Result<()> {
        match self.request(build).await? {
            ServerMessage::Ok { .. } => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn request(&self, build: impl FnOnce(u64) -> ClientMessage) -> Result<ServerMessage> {
        self.send_request(build).await?.await
    }

    /// Queues a request and returns the future of its reply; both steps
    /// share one deadline.
    async fn send_request(&self, build: impl FnOnce(u64) -> ClientMessage) -> Result<PendingReply> {
        self.send_request_with(false, build).await
    }

    /// [`send_request`](Self::send_request), saying whether the request is
    /// sent again on the next connection when this one drops first.
    async fn send_request_with(
        &self,
        resend: bool,
        build: impl FnOnce(u64) -> ClientMessage,
    ) -> Result<PendingReply> {
        let deadline = Instant::now() + self.inner.options.request_timeout;
        let id = self.inner.request_ids.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Request {
            id,
            msg: build(id),
            reply,
            resend,
        };
        self.enqueue(cmd, deadline).await?;
        Ok(PendingReply {
            rx,
            deadline: Box::pin(sleep_until(deadline)),
        })
    }

    async fn enqueue(&self, cmd: Command, deadline: Instant) -> Result<()> {
        match timeout_at(deadline, self.inner.cmd_tx.send(cmd)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(self.inner.gone()),
            Err(_) => Err(Error::Timeout),
        }
    }

    pub(crate) async fn start_subscription(
        &self,
        topic: String,
        types: Vec<String>,
        start: Start,
        buffer: usize,
    ) -> Result<Subscription> {
        let deadline = Instant::now() + self.inner.options.request_timeout;
        let sub_id = self.inner.sub_ids.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crate::queue::queue(buffer);
        let terminal = Arc::default();
        let (ready, ready_rx) = oneshot::channel();
        let cmd = Command::Subscribe {
            sub_id,
            topic: topic.clone(),
            types,
            start,
            pattern: None,
            tx,
            terminal: Arc::clone(&terminal),
            ready,
        };
        self.enqueue(cmd, deadline).await?;
        let Subscribed {
            epoch, next_offset, ..
        } = match timeout_at(deadline, ready_rx).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(self.inner.gone()),
            Err(_) => return Err(Error::Timeout),
        };
        Ok(Subscription::new(
            self.clone(),
            sub_id,
            topic,
            epoch,
            next_offset,
            rx,
            terminal,
        ))
    }

    pub(crate) async fn start_pattern_subscription(
        &self,
        builder: PatternSubscribeBuilder,
    ) -> Result<PatternSubscription> {
        let deadline = Instant::now() + self.inner.options.request_timeout;
        let sub_id = self.inner.sub_ids.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crate::queue::queue(builder.buffer);
        let terminal = Arc::default();
        let (ready, ready_rx) = oneshot::channel();
        let resume = PatternResume::new(builder.start.clone(), builder.positions);
        let cmd = Command::Subscribe {
            sub_id,
            topic: builder.pattern.clone(),
            types: builder.types,
            start: builder.start,
            pattern: Some(resume),
            tx,
            terminal: Arc::clone(&terminal),
            ready,
        };
        self.enqueue(cmd, deadline).await?;
        let Subscribed { topics, .. } = match timeout_at(deadline, ready_rx).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(self.inner.gone()),
            Err(_) => return Err(Error::Timeout),
        };
        Ok(PatternSubscription::new(
            self.clone(),
            sub_id,
            builder.pattern,
            topics,
            rx,
            terminal,
        ))
    }
}

fn unexpected(msg: &ServerMessage) -> Error {
    Error::UnexpectedReply(format!("got {}", msg.kind()))
}

/// The acks of an `Appended` reply.
fn append_acks(msg: ServerMessage) -> Result<Vec<AppendAck>> {
    match msg {
        ServerMessage::Appended { results, .. } => Ok(results),
        other => Err(unexpected(&other)),
    }
}

/// The reply to a queued request, with the request's deadline.
struct PendingReply {
    rx: oneshot::Receiver<Result<ServerMessage>>,
    deadline: Pin<Box<Sleep>>,
}

impl Future for PendingReply {
    type Output = Result<ServerMessage>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(result) = Pin::new(&mut self.rx).poll(cx) {
            // A dropped sender means the connection task is gone.
            return Poll::Ready(result.unwrap_or(Err(Error::Closed)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Error::Timeout)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The ack of an event queued with [`Client::queue_publish`]; resolves to
/// the [`Ack`], or to an error (including [`Error::Timeout`] after the
/// request timeout, counted from when it was queued).
#[must_use = "the publish may fail; await the ack to know"]
pub struct PendingAck {
    reply: PendingReply,
}

impl std::fmt::Debug for PendingAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAck").finish_non_exhaustive()
    }
}

impl Future for PendingAck {
    type Output = Result<Ack>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.reply).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(reply)) => {
                Poll::Ready(append_acks(reply).and_then(|acks| match acks.as_slice() {
                    [ack] => Ok(Ack::from(*ack)),
                    _ => Err(Error::UnexpectedReply(format!(
                        "{} acks for one event",
                        acks.len()
                    ))),
                }))
            }
        }
    }
}

/// Configures a subscription; created by [`Client::subscribe`].
///
/// ```no_run
/// # async fn demo(client: ringcast_client::Client) -> ringcast_client::Result<()> {
/// let subscription = client
///     .subscribe("orders")
///     .types(["created", "paid"])
///     .earliest()
///     .send()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a subscription starts only with .send().await"]
pub struct SubscribeBuilder {
    client: Client,
    topic: String,
    types: Vec<String>,
    start: Start,
    buffer: usize,
}

impl SubscribeBuilder {
    /// Receives only events of these types (default: all types).
    pub fn types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Where to start (default [`Start::Live`]).
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// Only events published from now on (the default).
    pub fn live(self) -> Self {
        self.start(Start::Live)
    }

    /// Every retained event, then live.
    pub fn earliest(self) -> Self {
        self.start(Start::Earliest)
    }

    /// Events after `offset` of history `epoch` (a resume); a gap first if
    /// some are no longer retained or the epoch changed.
    pub fn after_offset(self, epoch: u64, offset: u64) -> Self {
        self.start(Start::AfterOffset { epoch, offset })
    }

    /// Per type, events with a version greater than the given one; types not
    /// named start live.
    pub fn after_versions<I, S>(self, epoch: u64, versions: I) -> Self
    where
        I: IntoIterator<Item = (S, u64)>,
        S: Into<String>,
    {
        let versions = versions.into_iter().map(|(t, v)| (t.into(), v)).collect();
        self.start(Start::AfterVersions { epoch, versions })
    }

    /// Deliveries buffered for this subscription (default
    /// [`ClientOptions::subscription_buffer`], which explains what happens
    /// when it is full).
    pub fn buffer(mut self, deliveries: usize) -> Self {
        self.buffer = deliveries;
        self
    }

    /// Subscribes, waiting for the broker's confirmation.
    pub async fn send(self) -> Result<Subscription> {
        self.client
            .start_subscription(self.topic, self.types, self.start, self.buffer)
            .await
    }
}

impl IntoFuture for SubscribeBuilder {
    type Output = Result<Subscription>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Subscription>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}
