//! The topic log engine: the in-process API that every front end calls.
//!
//! `publish` → (store writer: assign, persist, group-commit) → topic ring →
//! subscription cursors. See `docs/architecture.md` for the data flow.

mod consume;
mod dedup;
mod event;
mod files;
mod group;
mod log;
mod multi;
mod redis;
mod settings;
mod store;
mod subscription;
mod topic;
mod writer;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::mapref::entry::Entry;
use tokio::sync::{oneshot, Semaphore};

pub use self::redis::RedisOptions;
pub use consume::{
    GroupMember, GroupSettler, PendingSettle, Settle, MAX_FETCH, MAX_FETCH_WAIT, MAX_SETTLE,
};
pub use dedup::{Expected, MAX_KEY_LEN};
pub(crate) use event::Encoding;
pub use event::{Ack, Delivery, Event, Gap, GapReason, NewEvent, Start};
pub use group::{
    valid_group_name, Fetched, GroupConfig, GroupDelivery, GroupInfo, GroupStart, MemberInfo,
    PendingInfo, Settled, DLQ_ATTEMPTS, DLQ_EPOCH, DLQ_GROUP, DLQ_OFFSET, DLQ_REASON, DLQ_TOPIC,
};
pub use log::Health;
pub use multi::{Member, MultiDelivery, MultiSubscription, Position, Selection, TopicFilter};
pub use settings::{Durability, Retention, TopicOverride, TopicsConfig};
pub use store::{Faults, RecoveryReport};
pub use subscription::Subscription;

use log::{Log, MemoryLog, Outcome, Step, TopicImage};
use topic::{Registry, Topic, TopicState};
use writer::{Done, Request};

/// Longest topic name or event type, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Most headers on one event.
pub const MAX_HEADERS: usize = 64;
/// Most bytes of header keys and values on one event.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Why an engine call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The topic name is empty, too long or has a character outside `[A-Za-z0-9._:-]`.
    #[error("invalid topic name {0:?}: 1-255 bytes of A-Z a-z 0-9 . _ : -")]
    InvalidTopic(String),
    /// The event type is empty, too long or has a character outside `[A-Za-z0-9._:-]`.
    #[error("invalid event type {0:?}: 1-255 bytes of A-Z a-z 0-9 . _ : -")]
    InvalidType(String),
    /// Headers exceed the count or size limit, or a key is empty.
    #[error("invalid headers: {0}")]
    InvalidHeaders(String),
    /// The payload is larger than allowed.
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// The payload's size.
        size: usize,
        /// The limit.
        max: u64,
    },
    /// A batch with no events.
    #[error("a batch must hold at least one event")]
    EmptyBatch,
    /// The topic does not exist (and auto-create is off, or it is a read).
    #[error("topic {0:?} not found")]
    TopicNotFound(String),
    /// The topic is sealed: it takes no more events.
    #[error("topic {0:?} is sealed")]
    TopicSealed(String),
    /// Creating the topic would exceed `max_topics`.
    #[error("too many topics (limit {0})")]
    TooManyTopics(usize),
    /// The patterns of a subscription match more topics than it may hold.
    #[error("the patterns match more than {0} topics (limits.max_pattern_matches); narrow them")]
    TooManyMatches(usize),
    /// Retained bytes over all topics reached `max_retained_bytes`.
    #[error("the broker's retained-bytes limit of {0} bytes is reached; retry later")]
    OverCapacity(u64),
    /// The start position cannot be honoured (e.g. an offset in the future).
    #[error("invalid start: {0}")]
    InvalidStart(String),
    /// The request is inconsistent in itself (e.g. an expected version on a
    /// batch of several types).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An idempotency key is empty, too long, has a control character, or
    /// appears twice in one batch.
    #[error("invalid idempotency key: {0}")]
    InvalidKey(String),
    /// The expected position of the append does not hold: nothing was
    /// stored. The current values let the caller reload and retry.
    #[error("position mismatch: the topic's last offset is {current_offset}, the type's last version is {current_version}")]
    PositionMismatch {
        /// The topic's last offset now (0 = no event yet).
        current_offset: u64,
        /// The last version of the batch's event type now (0 = none yet).
        current_version: u64,
    },
    /// The store failed; the operation did not happen.
    #[error("storage error: {0}")]
    Storage(String),
    /// A write or fsync failed recently: writes are refused until the
    /// store has repaired itself (it retries on its own). Retry later.
    #[error("storage unavailable, publish not stored (retry later): {0}")]
    StorageUnavailable(String),
    /// The engine is closing.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The consumer group does not exist (`topic/group`).
    #[error("consumer group {0:?} not found")]
    GroupNotFound(String),
    /// A group name is empty, too long or has a character outside `[A-Za-z0-9._:-]`.
    #[error("invalid group name {0:?}: 1-255 bytes of A-Z a-z 0-9 . _ : -")]
    InvalidGroup(String),
    /// Creating the group would exceed `max_groups`.
    #[error("too many consumer groups (limit {0})")]
    TooManyGroups(usize),
    /// A `retain_until_acked` topic holds `max_bytes` that some group has
    /// not acked yet: the publish is refused until the groups catch up.
    #[error("topic {topic:?} retains {max_bytes} bytes not yet acked by its consumer groups; retry later")]
    TopicFull {
        /// The topic.
        topic: String,
        /// Its `max_bytes`.
        max_bytes: u64,
    },
}

/// Engine-wide limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of one event, in bytes.
    pub max_payload: u64,
    /// Most topics alive at once.
    pub max_topics: usize,
    /// Most bytes retained in memory over all topics; publishes beyond it
    /// are refused until retention frees room.
    pub max_retained_bytes: u64,
    /// Most topics created by a subscribe alone (no event yet) at once.
    pub max_ephemeral_topics: usize,
    /// Most consumer groups over all topics.
    pub max_groups: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: 1024 * 1024,
            max_topics: 100_000,
            max_retained_bytes: 1024 * 1024 * 1024,
            max_ephemeral_topics: 10_000,
            max_groups: 10_000,
        }
    }
}

/// Everything the engine needs to start.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Directory of the sled database (unused in memory mode).
    pub data_dir: PathBuf,
    /// Acknowledgement policy.
    pub durability: Durability,
    /// Fsync period of `interval` mode.
    pub flush_interval: Duration,
    /// Retention defaults and overrides.
    pub topics: TopicsConfig,
    /// Engine-wide limits.
    pub limits: Limits,
    /// Most payload bytes queued for the store writer before publishers wait.
    pub max_queued_bytes: u64,
    /// How often age trimming and topic expiry run.
    pub maintenance_interval: Duration,
    /// Topics counted under their own metric label.
    pub metered_topics: Vec<String>,
    /// Share every topic with other nodes through Redis instead of storing
    /// them here (`durability` and `data_dir` are then unused).
    pub cluster: Option<RedisOptions>,
    /// Storage faults to inject (tests of the failure rules).
    #[doc(hidden)]
    pub faults: Option<Arc<Faults>>,
    /// The clock publishes are stamped (and dedup windows measured) by.
    #[doc(hidden)]
    pub clock: Clock,
}

/// The engine's wall clock: system time plus an offset that only tests
/// move (to expire dedup windows without waiting for them).
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct Clock {
    skew_ms: Arc<AtomicU64>,
}

impl Clock {
    /// Moves this clock (and every engine using it) `by` into the future.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.skew_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Milliseconds since the Unix epoch, as this clock tells them.
    pub fn now_ms(&self) -> u64 {
        now_ms().saturating_add(self.skew_ms.load(Ordering::Relaxed))
    }
}

impl EngineOptions {
    /// In-memory options with default retention, for tests and benches.
    pub fn memory() -> Self {
        Self {
            data_dir: PathBuf::new(),
            durability: Durability::Memory,
            flush_interval: Duration::from_millis(200),
            topics: TopicsConfig::default(),
            limits: Limits::default(),
            max_queued_bytes: 64 * 1024 * 1024,
            maintenance_interval: Duration::from_secs(1),
            metered_topics: Vec::new(),
            cluster: None,
            faults: None,
            clock: Clock::default(),
        }
    }

    /// The state of a topic whose history under `epoch` starts now, with
    /// its configured retention and metering.
    fn new_state(&self, name: &str, epoch: u64, global_bytes: &Arc<AtomicU64>) -> TopicState {
        let mut state =
            TopicState::new(epoch, self.topics.retention_for(name), global_bytes.clone());
        state.metered = self.metered_topics.iter().any(|m| m == name);
        state
    }

    /// Persistent options under `dir` with `durability`, default retention.
    pub fn persistent(dir: impl Into<PathBuf>, durability: Durability) -> Self {
        Self {
            data_dir: dir.into(),
            durability,
            ..Self::memory()
        }
    }
}

/// The acks of a queued publish; resolves once the batch is acknowledged
/// under the durability mode.
#[derive(Debug)]
#[must_use = "a publish is acknowledged only when this resolves"]
pub struct PendingPublish {
    pending: Pending,
    started: std::time::Instant,
    ack_seconds: metrics::Histogram,
}

#[derive(Debug)]
enum Pending {
    Ready(Option<Vec<Ack>>),
    Waiting(oneshot::Receiver<Result<Vec<Ack>, EngineError>>),
}

impl PendingPublish {
    /// The acks, if the publish was acknowledged already (memory mode), so
    /// a front end can answer without waiting.
    pub fn take_ready(&mut self) -> Option<Result<Vec<Ack>, EngineError>> {
        match &mut self.pending {
            Pending::Ready(acks) => {
                let acks = acks.take()?;
                self.ack_seconds.record(self.started.elapsed());
                Some(Ok(acks))
            }
            Pending::Waiting(_) => None,
        }
    }
}

impl Future for PendingPublish {
    type Output = Result<Vec<Ack>, EngineError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match &mut self.pending {
            Pending::Ready(acks) => Poll::Ready(acks.take().ok_or(EngineError::ShuttingDown)),
            Pending::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(EngineError::ShuttingDown))),
        };
        if result.is_ready() {
            self.ack_seconds.record(self.started.elapsed());
        }
        result
    }
}

/// A page of retained events, as answered by [`Engine::history`].
#[derive(Debug, Clone)]
pub struct History {
    /// The topic's epoch.
    pub epoch: u64,
    /// Matching events, in offset order.
    pub events: Vec<Arc<Event>>,
    /// Pass as `after` to get the next page.
    pub next_after: u64,
    /// The first retained offset (events before it are gone).
    pub first_available: u64,
    /// The last committed offset.
    pub last_offset: u64,
}

/// A topic as listed by [`Engine::topics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSummary {
    /// The name.
    pub name: String,
    /// The current epoch.
    pub epoch: u64,
    /// The last committed offset.
    pub last_offset: u64,
    /// Whether publishes are refused.
    pub sealed: bool,
}

/// Everything known about one topic, as answered by [`Engine::info`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// The name.
    pub name: String,
    /// The current epoch.
    pub epoch: u64,
    /// The first retained offset (`last_offset + 1` when none is retained).
    pub first_offset: u64,
    /// The last committed offset (0 before the first event).
    pub last_offset: u64,
    /// Current version per type, sorted by type.
    pub versions: Vec<(String, u64)>,
    /// Effective retention settings.
    pub retention: Retention,
    /// Events in the ring.
    pub retained_events: u64,
    /// Bytes in the ring.
    pub retained_bytes: u64,
    /// Live subscriptions.
    pub subscribers: usize,
    /// Whether publishes are refused.
    pub sealed: bool,
}

/// Engine-wide gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Topics alive.
    pub topics: u64,
    /// Events retained over all rings.
    pub retained_events: u64,
    /// Bytes retained over all rings.
    pub retained_bytes: u64,
    /// Live subscriptions over all topics.
    pub subscribers: u64,
}

/// The topic log engine. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Arc<Registry>,
    options: EngineOptions,
    log: Arc<dyn Log>,
    /// Requests to the writer thread (queued backends only). The writer
    /// ends after a `Close`, or when this sender is dropped.
    writer: Option<std::sync::mpsc::Sender<Request>>,
    writer_thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The Redis backend, for lookups of topics this node does not hold.
    shared: Option<Arc<redis::RedisLog>>,
    /// Byte budget of the writer queue, in KiB units.
    queue: Arc<Semaphore>,
    /// Units the queue holds in all (no request asks for more).
    queue_total: u32,
    recovered_events: u64,
    recovery: RecoveryReport,
    global_bytes: Arc<AtomicU64>,
    metrics: EngineMetrics,
    closed: std::sync::atomic::AtomicBool,
    janitor: parking_lot::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// The consumer-group ticker task is running.
    ticker: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("topics", &self.inner.registry.topics.len())
            .field("durability", &self.inner.options.durability)
            .finish()
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A random epoch id (never 0, so 0 can mean "no epoch" in clients).
pub(crate) fn new_epoch() -> u64 {
    loop {
        // getrandom only fails without an OS entropy source; fall back to
        // the clock rather than refuse to create topics.
        let e = getrandom::u64().unwrap_or_else(|_| now_ms().wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if e != 0 {
            return e;
        }
    }
}

/// Metric handles the hot paths use, looked up once (a lookup per publish
/// hashes the key in the registry).
#[derive(Clone)]
pub(crate) struct EngineMetrics {
    pub published: metrics::Counter,
    pub ack_seconds: metrics::Histogram,
    pub flush_seconds: metrics::Histogram,
}

impl EngineMetrics {
    pub(crate) fn new() -> Self {
        Self {
            published: metrics::counter!(crate::metrics::PUBLISHED),
            ack_seconds: metrics::histogram!(crate::metrics::ACK_SECONDS),
            flush_seconds: metrics::histogram!(crate::metrics::FLUSH_SECONDS),
        }
    }
}

/// Counts appended events, under the topic's own label when it is metered.
pub(crate) fn count_published(m: &EngineMetrics, topic: &str, metered: bool, n: usize) {
    m.published.increment(n as u64);
    if metered {
        metrics::counter!(crate::metrics::PUBLISHED, "topic" => topic.to_owned())
            .increment(n as u64);
    }
}

/// Whether `c` may appear in a topic name or event type.
pub fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && s.chars().all(is_topic_char)
}

/// Checks a topic name: 1-255 bytes of `[A-Za-z0-9._:-]`.
pub fn validate_topic(name: &str) -> Result<(), EngineError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(EngineError::InvalidTopic(name.chars().take(300).collect()))
    }
}

/// Checks what the publish guarantees need of a batch: keys of 1 to
/// [`MAX_KEY_LEN`] bytes without control characters, none twice in the
/// batch; an expected version only for a batch of one event type (the
/// version it names is that type's).
fn validate_guarantees(events: &[NewEvent], expect: Expected) -> Result<(), EngineError> {
    let mut keys = 0;
    for key in events.iter().filter_map(|e| e.idempotency_key.as_deref()) {
        keys += 1;
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(EngineError::InvalidKey(format!(
                "{} bytes, expected 1 to {MAX_KEY_LEN}",
                key.len()
            )));
        }
        if key.chars().any(char::is_control) {
            return Err(EngineError::InvalidKey(
                "control characters are not allowed".into(),
            ));
        }
    }
    if keys > 1 {
        let mut seen = std::collections::HashSet::with_capacity(keys);
        for key in events.iter().filter_map(|e| e.idempotency_key.as_deref()) {
            if !seen.insert(key) {
                return Err(EngineError::InvalidKey(format!(
                    "{:?} appears twice in one batch",
                    key.chars().take(MAX_KEY_LEN).collect::<String>()
                )));
            }
        }
    }
    if expect.version.is_some() && events.iter().any(|e| e.event_type != events[0].event_type) {
        return Err(EngineError::InvalidRequest(
            "expected_version needs every event of the batch to have the same type".into(),
        ));
    }
    Ok(())
}

/// Queue budget units: one per KiB of payload, at least one per request.
fn queue_units(bytes: u64, total: u32) -> u32 {
    u32::try_from(bytes / 1024 + 1)
        .unwrap_or(u32::MAX)
        .min(total)
}

/// What every engine-owned topic must have acknowledged: the truth a
/// backend repairs itself against. Ephemeral topics were never stored.
pub(crate) fn committed(registry: &Registry) -> Vec<TopicImage> {
    registry
        .topics
        .iter()
        .filter_map(|t| {
            let s = t.state.read();
            (!s.ephemeral && !s.deleted).then(|| TopicImage {
                id: t.id(&s),
                counters: s.counters.clone(),
                sealed_at_ms: s.sealed_at_ms,
                events: s.ring.iter().cloned().collect(),
            })
        })
        .collect()
}

/// Commits appended events to a topic whose state lock is held: ring push
/// (and trim), counters, metrics. Returns the acks and whether the ring
/// was trimmed (its stored events need pruning).
fn commit_events(
    m: &EngineMetrics,
    topic: &Topic,
    state: &mut TopicState,
    shared: Option<Box<log::Shared>>,
    events: Vec<Arc<Event>>,
    repeats: Vec<(usize, dedup::Original)>,
    now: u64,
) -> (Vec<Ack>, bool) {
    // With a shared backend: the incarnation appended to, and whether this
    // node's topic still is the one the append was queued for (else the
    // follower moved it on: the acks stand, the events come with it).
    let (before, epoch, commit) = match shared {
        Some(shared) => {
            let (generation, epoch) = shared.incarnation;
            let current = state.generation == shared.queued || state.generation == generation;
            if current {
                state.switch_incarnation(generation, epoch);
            }
            (shared.before, epoch, current)
        }
        None => (Vec::new(), state.epoch, true),
    };
    let fresh = events.iter().map(|e| Ack {
        epoch,
        offset: e.offset,
        version: e.version,
        duplicate: false,
    });
    let acks = if repeats.is_empty() {
        fresh.collect()
    } else {
        metrics::counter!(crate::metrics::DUPLICATES).increment(repeats.len() as u64);
        let mut fresh = fresh;
        let mut repeats = repeats.into_iter().peekable();
        let mut acks = Vec::with_capacity(events.len() + repeats.len());
        loop {
            let i = acks.len();
            if let Some((_, o)) = repeats.next_if(|(at, _)| *at == i) {
                acks.push(Ack {
                    epoch,
                    offset: o.offset,
                    version: o.version,
                    duplicate: true,
                });
            } else if let Some(a) = fresh.next() {
                acks.push(a);
            } else {
                break;
            }
        }
        acks
    };
    if !commit || (events.is_empty() && before.is_empty()) {
        return (acks, false);
    }
    let first = state.first_offset();
    count_published(m, &topic.name, state.metered, events.len());
    // Its first event makes the topic a real one.
    topic.clear_ephemeral(state);
    state.push(before.into_iter().chain(events), now);
    topic.touch(now);
    (acks, state.first_offset() != first)
}

/// What one committed append hands back to its publisher.
pub(crate) type AppendReply = (
    oneshot::Sender<Result<Vec<Ack>, EngineError>>,
    Vec<Arc<Event>>,
    Vec<(usize, dedup::Original)>,
    Option<Box<log::Shared>>,
);

/// Commits consecutive appends of one pass to one topic under one lock of
/// its state (a pass of pipelined publishes holds hundreds), then answers
/// their publishers in order. The same as [`commit`] for each, once.
pub(crate) fn commit_appends(
    m: &EngineMetrics,
    topic: &Arc<Topic>,
    run: &mut Vec<AppendReply>,
    now: u64,
    dirty: &mut log::FastMap<Arc<str>, Arc<Topic>>,
) {
    let mut answers = Vec::with_capacity(run.len());
    let mut trimmed = false;
    {
        let mut state = topic.state.write();
        for (ack, events, repeats, shared) in run.drain(..) {
            let (acks, t) = commit_events(m, topic, &mut state, shared, events, repeats, now);
            trimmed |= t;
            answers.push((ack, acks));
        }
    }
    if trimmed {
        dirty.insert(topic.name.clone(), topic.clone());
    }
    for (ack, acks) in answers {
        let _ = ack.send(Ok(acks));
        writer::settle(topic);
    }
}

/// Commits one step's outcome: the single place where a persisted change
/// becomes visible. Returns the topic to wake.
pub(crate) fn commit(
    m: &EngineMetrics,
    done: Done,
    outcome: Outcome,
    now: u64,
    dirty: &mut log::FastMap<Arc<str>, Arc<Topic>>,
) -> Option<Arc<Topic>> {
    match (done, outcome) {
        (
            Done::Append { topic, ack },
            Outcome::Appended {
                events,
                repeats,
                shared,
            },
        ) => {
            commit_appends(
                m,
                &topic,
                &mut vec![(ack, events, repeats, shared)],
                now,
                dirty,
            );
            Some(topic)
        }
        (Done::Seal { topic, ack }, Outcome::Sealed(at)) => {
            {
                let mut s = topic.state.write();
                s.sealed = true;
                s.sealed_at_ms = Some(at);
            }
            let _ = ack.send(Ok(()));
            Some(topic)
        }
        (Done::Delete { topic, ack }, Outcome::Done) => {
            finish_delete(&topic);
            let _ = ack.send(Ok(()));
            Some(topic)
        }
        (done, Outcome::Refused(e)) => {
            fail(done, &e);
            None
        }
        (Done::Sync { ack }, _) => {
            let _ = ack.send(Ok(()));
            None
        }
        (Done::Trim, Outcome::Done) => None,
        (done, outcome) => {
            // A backend answering a step with another step's outcome is a
            // bug in the backend; refuse rather than guess.
            tracing::error!(?outcome, "storage answered a step with the wrong outcome");
            fail(
                done,
                &EngineError::Storage("internal: mismatched outcome".into()),
            );
            None
        }
    }
}

/// Refuses one step's completion with `e`.
pub(crate) fn fail(done: Done, e: &EngineError) {
    match done {
        Done::Append { topic, ack } => {
            let _ = ack.send(Err(e.clone()));
            writer::settle(&topic);
        }
        Done::Seal { ack, .. } | Done::Sync { ack } => {
            let _ = ack.send(Err(e.clone()));
        }
        Done::Delete { topic, ack } => {
            topic.state.write().deleting = false;
            topic.wake();
            let _ = ack.send(Err(e.clone()));
        }
        Done::Trim => {}
    }
}

/// Makes a persisted delete visible: subscribers end, the name is free.
fn finish_delete(topic: &Arc<Topic>) {
    {
        let mut s = topic.state.write();
        s.deleted = true;
        s.deleting = false;
        topic.clear_ephemeral(&mut s);
    }
    if let Some(registry) = topic.registry.upgrade() {
        Engine::drop_groups_of(&registry, topic);
        registry
            .topics
            .remove_if(&topic.name, |_, t| Arc::ptr_eq(t, topic));
    }
    topic.wake();
    tracing::info!(topic = %topic.name, "topic deleted");
}

impl Engine {
    /// Opens the engine: in memory, or recovering every topic from sled.
    /// Starts the writer and the maintenance thread.
    pub fn open(options: EngineOptions) -> Result<Self, EngineError> {
        let global_bytes = Arc::new(AtomicU64::new(0));
        let registry = Arc::new(Registry::default());
        let mut shared = None;
        let (log, recovered, recovery, groups): (Arc<dyn Log>, _, _, _) = match options.durability {
            _ if options.cluster.is_some() => {
                let opened = redis::RedisLog::open(options.cluster.as_ref().expect("checked"))?;
                let log = Arc::new(opened);
                shared = Some(log.clone());
                (
                    log as Arc<dyn Log>,
                    Vec::new(),
                    RecoveryReport::default(),
                    Vec::new(),
                )
            }
            Durability::Memory => (
                Arc::new(MemoryLog::new()),
                Vec::new(),
                RecoveryReport::default(),
                Vec::new(),
            ),
            durability => {
                let topics = options.topics.clone();
                let opened = store::SledLog::open(
                    &options.data_dir,
                    durability,
                    options.flush_interval,
                    options.faults.clone(),
                    &move |name: &str| topics.retention_for(name).dedup_window_ms(),
                    options.clock.now_ms(),
                )?;
                (opened.log, opened.topics, opened.report, opened.groups)
            }
        };
        let now = options.clock.now_ms();
        let mut recovered_events = 0;
        let mut trimmed_at_open = Vec::new();
        for r in recovered {
            let name = r.id.name.clone();
            let mut state = options.new_state(&name, r.id.epoch, &global_bytes);
            state.generation = r.id.generation;
            state.counters = r.counters;
            state.sealed_at_ms = r.sealed_at_ms;
            state.sealed = r.sealed_at_ms.is_some();
            let stored = r.events.len();
            for e in r.events {
                state.push_back(e);
            }
            if state.retention.retain_until_acked {
                // Nothing goes before the groups are back and say what
                // they have done (`install_groups` moves the pin).
                state.pin = 0;
            }
            state.trim(now);
            recovered_events += state.ring.len() as u64;
            let topic = Topic::new(name.clone(), state, now, Arc::downgrade(&registry));
            if topic.state.read().ring.len() < stored {
                trimmed_at_open.push(topic.clone());
            }
            registry.topics.insert(name, topic);
        }
        let queue_units_total = u32::try_from((options.max_queued_bytes / 1024).max(64))
            .unwrap_or(u32::MAX >> 4)
            .min(u32::MAX >> 4);
        let metrics = EngineMetrics::new();
        let (writer, writer_thread) = if log.inline() {
            (None, None)
        } else {
            let (tx, rx) = std::sync::mpsc::channel();
            let w = writer::Writer {
                log: log.clone(),
                registry: registry.clone(),
                metrics: metrics.clone(),
                clock: options.clock.clone(),
            };
            let handle = std::thread::Builder::new()
                .name("ringcast-writer".into())
                .spawn(move || w.run(rx))
                .map_err(|e| EngineError::Storage(format!("cannot start the writer: {e}")))?;
            (Some(tx), Some(handle))
        };
        let inner = Arc::new(Inner {
            registry,
            options,
            log,
            writer,
            writer_thread: parking_lot::Mutex::new(writer_thread),
            shared,
            queue: Arc::new(Semaphore::new(queue_units_total as usize)),
            queue_total: queue_units_total,
            recovered_events,
            recovery,
            global_bytes,
            metrics,
            closed: std::sync::atomic::AtomicBool::new(false),
            janitor: parking_lot::Mutex::new(None),
            ticker: std::sync::atomic::AtomicBool::new(false),
        });
        let engine = Self { inner };
        if let Some(log) = &engine.inner.shared {
            // Every topic Redis holds, before the node serves anyone.
            redis::follow(&engine, log)?;
        }
        engine.install_groups(groups);
        for t in trimmed_at_open {
            engine.queue_trim(&t);
        }
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let weak = Arc::downgrade(&engine.inner);
        let interval = engine.inner.options.maintenance_interval;
        std::thread::Builder::new()
            .name("ringcast-janitor".into())
            .spawn(move || janitor(weak, stop_rx, interval))
            .map_err(|e| EngineError::Storage(format!("cannot start maintenance thread: {e}")))?;
        *engine.inner.janitor.lock() = Some(stop_tx);
        Ok(engine)
    }

    /// Consumer groups live in this node's store: refused on the shared
    /// Redis backend (a worker could not move between nodes).
    fn check_groups_supported(&self) -> Result<(), EngineError> {
        if self.inner.options.cluster.is_some() {
            return Err(EngineError::InvalidRequest(
                "consumer groups are not available with the redis cluster backend yet; use backend = \"local\"".into(),
            ));
        }
        Ok(())
    }

    /// The durability mode in use.
    pub fn durability(&self) -> Durability {
        self.inner.options.durability
    }

    /// Events rebuilt from disk at open.
    pub fn recovered_events(&self) -> u64 {
        self.inner.recovered_events
    }

    /// What recovery found damaged (those topics got new epochs).
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    /// Whether the store accepts writes now (readiness).
    pub fn health(&self) -> Health {
        if self.inner.closed.load(Ordering::Acquire) {
            return Health::Degraded("the broker is shutting down".into());
        }
        self.inner.log.health()
    }

    fn send(&self, request: Request) -> Result<(), EngineError> {
        let writer = self
            .inner
            .writer
            .as_ref()
            .ok_or(EngineError::ShuttingDown)?;
        writer.send(request).map_err(|_| EngineError::ShuttingDown)
    }

    fn queue_trim(&self, topic: &Arc<Topic>) {
        if self.inner.log.inline() {
            return;
        }
        let step = {
            let s = topic.state.read();
            if s.ephemeral || s.deleted {
                return;
            }
            Step::Trim {
                topic: topic.id(&s),
                first_retained: s.first_offset(),
                next_offset: s.next_offset(),
            }
        };
        let _ = self.send(Request::Step {
            step,
            done: Done::Trim,
            permit: None,
        });
    }

    /// Lets the log forget idempotency keys older than their window (on the
    /// writer, after what is queued, for a queued backend).
    fn expire_keys(&self, now: u64) {
        if self.inner.log.inline() {
            if let Err(e) = self.inner.log.persist(&mut [Step::Expire], now) {
                tracing::warn!(error = %e, "expiring idempotency keys failed");
            }
            return;
        }
        let _ = self.send(Request::Step {
            step: Step::Expire,
            done: Done::Trim,
            permit: None,
        });
    }

    /// Publishes one event; resolves once it is acknowledged under the
    /// durability mode.
    pub async fn publish(&self, topic: &str, event: NewEvent) -> Result<Ack, EngineError> {
        let mut acks = self.publish_batch(topic, vec![event]).await?;
        acks.pop().ok_or(EngineError::EmptyBatch)
    }

    /// Publishes events atomically in order: the batch is validated as a
    /// whole before any event is appended.
    pub async fn publish_batch(
        &self,
        topic: &str,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Ack>, EngineError> {
        self.start_publish(topic, events).await?.await
    }

    /// Validates and queues a batch, in call order, and returns a future of
    /// its acks. Front ends use it to pipeline: publishes from one
    /// connection are appended in the order they were started while their
    /// acks are awaited concurrently. Waits (backpressure) while the
    /// writer's queue holds `max_queued_bytes`.
    pub async fn start_publish(
        &self,
        topic: &str,
        events: Vec<NewEvent>,
    ) -> Result<PendingPublish, EngineError> {
        self.start_publish_expecting(topic, events, Expected::default())
            .await
    }

    /// Publishes a batch only if `expect` holds (the topic's last offset,
    /// the type's last version), atomically with the append; otherwise
    /// nothing is stored and the error carries the current values.
    pub async fn publish_expecting(
        &self,
        topic: &str,
        events: Vec<NewEvent>,
        expect: Expected,
    ) -> Result<Vec<Ack>, EngineError> {
        self.start_publish_expecting(topic, events, expect)
            .await?
            .await
    }

    /// [`start_publish`](Self::start_publish) with an expected position
    /// (see [`publish_expecting`](Self::publish_expecting)).
    pub async fn start_publish_expecting(
        &self,
        topic: &str,
        events: Vec<NewEvent>,
        expect: Expected,
    ) -> Result<PendingPublish, EngineError> {
        self.check_open()?;
        validate_topic(topic)?;
        if events.is_empty() {
            return Err(EngineError::EmptyBatch);
        }
        validate_guarantees(&events, expect)?;
        // An existing topic already knows its settings; matching override
        // patterns per publish would compile them each time.
        let retention = match self.inner.registry.topics.get(topic) {
            Some(t) => t.state.read().retention,
            None => self.inner.options.topics.retention_for(topic),
        };
        let window_ms = retention.dedup_window_ms();
        let mut bytes = 0;
        // What the ring will count for them (`Event::retained_size`), for
        // the `retain_until_acked` cap.
        let mut retained = 0;
        for e in &events {
            self.validate_event(e, &retention)?;
            bytes += e.payload.len() as u64;
            retained += event::retained_size_of(e);
        }
        let cap = self.inner.options.limits.max_retained_bytes;
        if self.inner.global_bytes.load(Ordering::Relaxed) + bytes > cap {
            crate::metrics::refused("max_retained_bytes");
            return Err(EngineError::OverCapacity(cap));
        }
        if let Health::Degraded(why) = self.inner.log.health() {
            return Err(EngineError::StorageUnavailable(why));
        }
        let started = std::time::Instant::now();
        let inline = self.inner.log.inline();
        let permit = if inline {
            None
        } else {
            let units = queue_units(bytes, self.inner.queue_total);
            Some(
                self.inner
                    .queue
                    .clone()
                    .acquire_many_owned(units)
                    .await
                    .map_err(|_| EngineError::ShuttingDown)?,
            )
        };
        let mut events = Some(events);
        loop {
            let t = self.get_or_create(topic, self.inner.options.topics.auto_create, false)?;
            if inline {
                let now = self.inner.options.clock.now_ms();
                let mut state = t.state.write();
                if state.deleted {
                    continue;
                }
                if state.sealed {
                    return Err(EngineError::TopicSealed(topic.to_owned()));
                }
                if state.pinned_full(retained) {
                    crate::metrics::refused("retain_until_acked");
                    return Err(EngineError::TopicFull {
                        topic: topic.to_owned(),
                        max_bytes: state.retention.max_bytes,
                    });
                }
                let mut steps = [Step::Append {
                    topic: t.id(&state),
                    events: events.take().unwrap_or_default(),
                    expect,
                    window_ms,
                    known_next: state.next_offset(),
                    max_events: state.retention.max_events,
                }];
                let outcome = self.inner.log.persist(&mut steps, now)?.pop();
                return match outcome {
                    Some(Outcome::Appended {
                        events,
                        repeats,
                        shared,
                    }) => {
                        let (acks, _) = commit_events(
                            &self.inner.metrics,
                            &t,
                            &mut state,
                            shared,
                            events,
                            repeats,
                            now,
                        );
                        drop(state);
                        t.wake_watched();
                        Ok(PendingPublish {
                            pending: Pending::Ready(Some(acks)),
                            started,
                            ack_seconds: self.inner.metrics.ack_seconds.clone(),
                        })
                    }
                    Some(Outcome::Refused(e)) => Err(e),
                    _ => Err(EngineError::Storage("internal: mismatched outcome".into())),
                };
            }
            let (ack, rx) = oneshot::channel();
            {
                // Checked and queued under the lock so that a seal or
                // delete is ordered after every publish it let through.
                let state = t.state.read();
                if state.deleted {
                    continue;
                }
                if state.sealed {
                    return Err(EngineError::TopicSealed(topic.to_owned()));
                }
                if state.pinned_full(retained) {
                    crate::metrics::refused("retain_until_acked");
                    return Err(EngineError::TopicFull {
                        topic: topic.to_owned(),
                        max_bytes: state.retention.max_bytes,
                    });
                }
                if !state.deleting {
                    t.pending.fetch_add(1, Ordering::AcqRel);
                    let request = Request::Step {
                        step: Step::Append {
                            topic: t.id(&state),
                            events: events.take().unwrap_or_default(),
                            expect,
                            window_ms,
                            known_next: state.next_offset(),
                            max_events: state.retention.max_events,
                        },
                        done: Done::Append {
                            topic: t.clone(),
                            ack,
                        },
                        permit,
                    };
                    if let Err(e) = self.send(request) {
                        drop(state);
                        writer::settle(&t);
                        return Err(e);
                    }
                    return Ok(PendingPublish {
                        pending: Pending::Waiting(rx),
                        started,
                        ack_seconds: self.inner.metrics.ack_seconds.clone(),
                    });
                }
            }
            // A delete is being persisted: its outcome decides whether this
            // publish goes to the old topic or re-creates it. Subscribed
            // before the state is read again, so a delete persisted after
            // that read is seen (no receiver on the path of every publish).
            let mut changed = t.notify.subscribe();
            if t.state.read().deleting {
                let _ = changed.changed().await;
            }
        }
    }

    fn check_open(&self) -> Result<(), EngineError> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(EngineError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    fn validate_event(&self, e: &NewEvent, retention: &Retention) -> Result<(), EngineError> {
        if !valid_name(&e.event_type) {
            return Err(EngineError::InvalidType(
                e.event_type.chars().take(300).collect(),
            ));
        }
        let max = self
            .inner
            .options
            .limits
            .max_payload
            .min(retention.max_bytes);
        if e.payload.len() as u64 > max {
            crate::metrics::refused("max_payload");
            return Err(EngineError::PayloadTooLarge {
                size: e.payload.len(),
                max,
            });
        }
        if e.headers.len() > MAX_HEADERS {
            return Err(EngineError::InvalidHeaders(format!(
                "{} headers, at most {MAX_HEADERS}",
                e.headers.len()
            )));
        }
        let bytes: usize = e.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > MAX_HEADER_BYTES {
            return Err(EngineError::InvalidHeaders(format!(
                "{bytes} bytes, at most {MAX_HEADER_BYTES}"
            )));
        }
        if e.headers.iter().any(|(k, _)| k.is_empty()) {
            return Err(EngineError::InvalidHeaders("empty header name".into()));
        }
        Ok(())
    }

    /// Creates `name` if it does not exist (regardless of `auto_create`).
    pub fn create(&self, name: &str) -> Result<(), EngineError> {
        validate_topic(name)?;
        let t = self.get_or_create(name, true, false)?;
        t.clear_ephemeral(&mut t.state.write());
        // Persist the topic (its epoch) even before its first event.
        self.queue_trim(&t);
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Arc<Topic>, EngineError> {
        if let Some(t) = self.inner.registry.topics.get(name) {
            return Ok(t.value().clone());
        }
        match self.load_shared(name, false) {
            Some(redis::Loaded::Stored(t)) => Ok(t),
            _ => Err(EngineError::TopicNotFound(name.to_owned())),
        }
    }

    /// The topic `name`, created if `create`; `ephemeral` when a subscribe
    /// creates it (not stored, gone with its last subscriber).
    fn get_or_create(
        &self,
        name: &str,
        create: bool,
        ephemeral: bool,
    ) -> Result<Arc<Topic>, EngineError> {
        self.check_open()?;
        let registry = &self.inner.registry;
        if let Some(t) = registry.topics.get(name) {
            return Ok(t.value().clone());
        }
        // A topic another node created that this one has not heard of yet;
        // for a subscribe, the placeholder every node will agree on.
        let mut incarnation = None;
        match self.load_shared(name, false) {
            Some(redis::Loaded::Stored(t)) => return Ok(t),
            Some(redis::Loaded::Placeholder(generation, epoch)) => {
                incarnation = Some((generation, epoch));
            }
            None => {}
        }
        if !create {
            return Err(EngineError::TopicNotFound(name.to_owned()));
        }
        let max = self.inner.options.limits.max_topics;
        if registry.topics.len() >= max {
            crate::metrics::refused("max_topics");
            return Err(EngineError::TooManyTopics(max));
        }
        let max_ephemeral = self.inner.options.limits.max_ephemeral_topics;
        if ephemeral && registry.ephemeral.load(Ordering::Acquire) >= max_ephemeral {
            crate::metrics::refused("max_ephemeral_topics");
            return Err(EngineError::TooManyTopics(max_ephemeral));
        }
        if ephemeral && incarnation.is_none() {
            // Within the limits: claim the placeholder every node agrees on.
            match self.load_shared(name, true) {
                Some(redis::Loaded::Stored(t)) => return Ok(t),
                Some(redis::Loaded::Placeholder(generation, epoch)) => {
                    incarnation = Some((generation, epoch));
                }
                None => {}
            }
        }
        let incarnation = incarnation.unwrap_or_else(|| (topic::new_generation(), new_epoch()));
        Ok(self.register(name, incarnation, ephemeral))
    }

    /// The topic `name`: the one registered, or a new one of incarnation
    /// `(generation, epoch)`, registered now (no limit is checked here).
    fn register(&self, name: &str, (generation, epoch): (u64, u64), ephemeral: bool) -> Arc<Topic> {
        let registry = &self.inner.registry;
        let name: Arc<str> = Arc::from(name);
        match registry.topics.entry(name.clone()) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => {
                let mut state =
                    self.inner
                        .options
                        .new_state(&name, epoch, &self.inner.global_bytes);
                state.generation = generation;
                state.ephemeral = ephemeral;
                if ephemeral {
                    registry.ephemeral.fetch_add(1, Ordering::AcqRel);
                }
                let topic = Topic::new(name.clone(), state, now_ms(), Arc::downgrade(registry));
                e.insert(topic.clone());
                if !ephemeral {
                    registry.announce(&name);
                }
                tracing::debug!(topic = %name, ephemeral, "topic created");
                topic
            }
        }
    }

    /// Subscribes to `topic` (created when `auto_create` is on — as an
    /// ephemeral topic, stored only once an event is published to it), with
    /// an optional type filter (empty = all types) and a start position.
    pub fn subscribe(
        &self,
        topic: &str,
        types: Vec<String>,
        start: Start,
    ) -> Result<Subscription, EngineError> {
        validate_topic(topic)?;
        if let Some(bad) = types.iter().find(|t| !valid_name(t)) {
            return Err(EngineError::InvalidType(bad.chars().take(300).collect()));
        }
        loop {
            let t = self.get_or_create(topic, self.inner.options.topics.auto_create, true)?;
            let fresh = t.state.read().ephemeral;
            self.catch_up(&t, &start);
            match Subscription::open(t.clone(), types.clone(), start.clone()) {
                // Removed between lookup and open: look it up again.
                Err(EngineError::TopicNotFound(_)) if t.state.read().deleted => continue,
                Err(e) => {
                    if fresh {
                        t.release_if_unused();
                    }
                    return Err(e);
                }
                Ok(sub) => return Ok(sub),
            }
        }
    }

    /// Up to `limit` retained events with offset > `after` (of the given
    /// types; empty = all), for paginated reads.
    pub fn history(
        &self,
        topic: &str,
        after: u64,
        types: &[String],
        limit: usize,
    ) -> Result<History, EngineError> {
        self.history_page(topic, after, types, limit, usize::MAX)
    }

    /// [`history`](Self::history) with at most `max_bytes` of payload in
    /// the page (but at least one event, so paging always moves on);
    /// `next_after` says where to continue.
    pub fn history_page(
        &self,
        topic: &str,
        after: u64,
        types: &[String],
        limit: usize,
        max_bytes: usize,
    ) -> Result<History, EngineError> {
        validate_topic(topic)?;
        let t = self.get(topic)?;
        let state = t.state.read();
        let first = state.first_offset();
        let mut offset = after.saturating_add(1).max(first);
        let mut events = Vec::new();
        let mut bytes = 0usize;
        while events.len() < limit {
            let Some(e) = state.get(offset) else { break };
            if types.is_empty() || types.iter().any(|x| **x == *e.event_type) {
                bytes = bytes.saturating_add(e.payload.len());
                if bytes > max_bytes && !events.is_empty() {
                    break;
                }
                events.push(e.clone());
            }
            offset += 1;
        }
        Ok(History {
            epoch: state.epoch,
            events,
            next_after: offset - 1,
            first_available: first,
            last_offset: state.last_offset(),
        })
    }

    /// Every live topic, sorted by name.
    pub fn topics(&self) -> Vec<TopicSummary> {
        let mut list: Vec<TopicSummary> = self
            .inner
            .registry
            .topics
            .iter()
            .map(|t| {
                let s = t.state.read();
                TopicSummary {
                    name: t.name.to_string(),
                    epoch: s.epoch,
                    last_offset: s.last_offset(),
                    sealed: s.sealed,
                }
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Epoch, offsets, versions, retention and subscriber count of `topic`.
    pub fn info(&self, topic: &str) -> Result<TopicInfo, EngineError> {
        validate_topic(topic)?;
        let t = self.get(topic)?;
        let s = t.state.read();
        Ok(TopicInfo {
            name: topic.to_owned(),
            epoch: s.epoch,
            first_offset: s.first_offset(),
            last_offset: s.last_offset(),
            versions: s.counters.version_list(),
            retention: s.retention,
            retained_events: s.ring.len() as u64,
            retained_bytes: s.retained_bytes(),
            subscribers: t.subscribers.load(Ordering::Relaxed),
            sealed: s.sealed,
        })
    }

    /// Seals `topic`: once persisted, publishes are refused; subscribers
    /// get `End` after the last event; the topic is removed after
    /// `sealed_ttl`. Publishes queued before the seal are stored.
    pub async fn seal(&self, topic: &str) -> Result<(), EngineError> {
        self.check_open()?;
        validate_topic(topic)?;
        let t = self.get(topic)?;
        if self.inner.log.inline() {
            let now = self.inner.options.clock.now_ms();
            {
                let mut s = t.state.write();
                let mut steps = [Step::Seal { topic: t.id(&s) }];
                if let Some(Outcome::Sealed(at)) = self.inner.log.persist(&mut steps, now)?.pop() {
                    s.sealed = true;
                    s.sealed_at_ms = Some(at);
                }
            }
            t.wake();
            return Ok(());
        }
        let (ack, rx) = oneshot::channel();
        {
            // Queued under the lock: ordered after every publish let through.
            let s = t.state.read();
            self.send(Request::Step {
                step: Step::Seal { topic: t.id(&s) },
                done: Done::Seal {
                    topic: t.clone(),
                    ack,
                },
                permit: None,
            })?;
        }
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Deletes `topic` and its stored events once the deletion is
    /// persisted. Subscribers get `End`; a later publish re-creates it with
    /// a new epoch, offsets from 1. Publishes during the deletion wait for it.
    pub async fn delete(&self, topic: &str) -> Result<(), EngineError> {
        self.check_open()?;
        validate_topic(topic)?;
        let t = self.get(topic)?;
        match self.start_delete(&t, true)? {
            Some(rx) => rx.await.map_err(|_| EngineError::ShuttingDown)?,
            None => Ok(()),
        }
    }

    /// Queues the deletion of `t` (or does it at once in memory).
    fn start_delete(
        &self,
        t: &Arc<Topic>,
        wait: bool,
    ) -> Result<Option<oneshot::Receiver<Result<(), EngineError>>>, EngineError> {
        if self.inner.log.inline() {
            {
                let s = t.state.read();
                let mut steps = [Step::Delete { topic: t.id(&s) }];
                self.inner.log.persist(&mut steps, now_ms())?;
            }
            finish_delete(t);
            return Ok(None);
        }
        let mut s = t.state.write();
        if s.deleted {
            return Err(EngineError::TopicNotFound(t.name.to_string()));
        }
        if s.ephemeral {
            // Never stored: nothing to persist.
            drop(s);
            finish_delete(t);
            return Ok(None);
        }
        s.deleting = true;
        let (ack, rx) = oneshot::channel();
        let request = Request::Step {
            step: Step::Delete { topic: t.id(&s) },
            done: Done::Delete {
                topic: t.clone(),
                ack,
            },
            permit: None,
        };
        if let Err(e) = self.send(request) {
            s.deleting = false;
            return Err(e);
        }
        Ok(wait.then_some(rx))
    }

    /// Gauges over all topics.
    pub fn stats(&self) -> EngineStats {
        let mut stats = EngineStats::default();
        for t in self.inner.registry.topics.iter() {
            let s = t.state.read();
            stats.topics += 1;
            stats.retained_events += s.ring.len() as u64;
            stats.retained_bytes += s.retained_bytes();
            stats.subscribers += t.subscribers.load(Ordering::Relaxed) as u64;
        }
        stats
    }

    /// Waits until everything acknowledged so far is on stable storage
    /// (a no-op in memory mode).
    pub async fn sync(&self) -> Result<(), EngineError> {
        if self.inner.log.inline() {
            return Ok(());
        }
        let (ack, rx) = oneshot::channel();
        self.send(Request::Step {
            step: Step::Sync,
            done: Done::Sync { ack },
            permit: None,
        })?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Runs age trimming and topic expiry as of `now`; the maintenance
    /// thread calls it every `maintenance_interval`. Exposed so tests can
    /// drive time.
    #[doc(hidden)]
    pub fn maintain_at(&self, now: SystemTime) {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        maintain(self, now);
    }

    /// Refuses new publishes, commits everything queued (every publish
    /// that will ever be acknowledged is acknowledged before the clean
    /// marker), fsyncs and marks the store clean.
    pub async fn close(&self) -> Result<(), EngineError> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.janitor.lock().take();
        if self.inner.log.inline() {
            return Ok(());
        }
        // What the groups changed last goes into the final pass.
        let _ = self.send(Request::Step {
            step: Step::Groups { writes: Vec::new() },
            done: Done::Trim,
            permit: None,
        });
        let (ack, rx) = oneshot::channel();
        let sent = self.send(Request::Close { ack });
        let result = match sent {
            Ok(()) => rx.await.map_err(|_| EngineError::ShuttingDown)?,
            Err(_) => Ok(()),
        };
        let handle = self.inner.writer_thread.lock().take();
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|e| EngineError::Storage(format!("close task failed: {e}")))?
                .map_err(|_| EngineError::Storage("the writer thread panicked".into()))?;
        }
        result
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer once it committed what is queued.
        drop(self.writer.take());
        if let Some(handle) = self.writer_thread.lock().take() {
            let _ = handle.join();
        }
    }
}

fn janitor(inner: Weak<Inner>, stop: std::sync::mpsc::Receiver<()>, interval: Duration) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(interval) {
        let Some(inner) = inner.upgrade() else { return };
        let engine = Engine { inner };
        maintain(&engine, engine.inner.options.clock.now_ms());
    }
}

fn maintain(engine: &Engine, now: u64) {
    let topics: Vec<Arc<Topic>> = engine
        .inner
        .registry
        .topics
        .iter()
        .map(|t| t.value().clone())
        .collect();
    for t in topics {
        let (trimmed, expired) = {
            let mut s = t.state.write();
            if s.deleting || s.deleted {
                continue;
            }
            // Or trimmed in between to make room for an encoding.
            let trimmed = s.trim(now) > 0 || t.needs_prune.swap(false, Ordering::AcqRel);
            let r = s.retention;
            let ttl_ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            let sealed_out = s
                .sealed_at_ms
                .is_some_and(|at| now >= at.saturating_add(ttl_ms(r.sealed_ttl)));
            // Activity is per node with a shared backend: one node's idle
            // topic may be busy on another, so only a local one expires.
            let idle_out = engine.inner.options.cluster.is_none()
                && r.idle_ttl.is_some_and(|ttl| {
                    t.subscribers.load(Ordering::Relaxed) == 0
                        && t.groups.load(Ordering::Relaxed) == 0
                        && t.pending.load(Ordering::Relaxed) == 0
                        && now
                            >= t.last_activity_ms
                                .load(Ordering::Relaxed)
                                .saturating_add(ttl_ms(ttl))
                });
            (trimmed, sealed_out || idle_out)
        };
        // A sealed topic stays while a consumer group has work left in it:
        // removing it would drop that work unreported.
        let expired =
            expired && (t.groups.load(Ordering::Acquire) == 0 || !engine.groups_unfinished(&t));
        if expired {
            match engine.start_delete(&t, false) {
                Ok(_) => tracing::info!(topic = %t.name, "topic expired"),
                Err(e) => tracing::warn!(topic = %t.name, error = %e, "topic expiry failed"),
            }
        } else if trimmed {
            engine.queue_trim(&t);
            t.wake();
        }
    }
    engine.expire_keys(now);
}
