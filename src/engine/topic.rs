//! One topic: its retention ring, counters, epoch and lifecycle flags.
//!
//! The ring holds only *committed* events (acknowledged under the durability
//! mode), with contiguous offsets, so a subscriber's cursor is an index.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::watch;

use super::event::Event;
use super::log::Counters;
use super::settings::Retention;

/// The mutable part of a topic, behind one lock.
#[derive(Debug)]
pub(crate) struct TopicState {
    /// Random id of this history of the topic.
    pub epoch: u64,
    /// Random id of this incarnation in storage (keys its records); unlike
    /// the epoch it survives an epoch rotation.
    pub generation: u64,
    /// Effective retention settings.
    pub retention: Retention,
    /// Committed, retained events; offsets contiguous.
    pub ring: VecDeque<Arc<Event>>,
    /// Sum of `retained_size` over the ring.
    pub ring_bytes: u64,
    /// Front-end encodings built for the ring's events (each event's share
    /// in its `charged`).
    pub cache_bytes: u64,
    /// Events of the latest commit: trimming never goes below them, so a
    /// subscriber that was up to date gets all of them.
    pub protected: usize,
    /// Committed counters: `next_offset - 1` is the last committed offset.
    pub counters: Counters,
    /// Publishes are refused (set at once by `seal`).
    pub sealed: bool,
    /// When the seal was committed, in ms; subscribers at the end get `End`.
    pub sealed_at_ms: Option<u64>,
    /// The topic was deleted; subscribers get `End` at once.
    pub deleted: bool,
    /// A delete is being persisted: publishes wait for its outcome.
    pub deleting: bool,
    /// Created by a subscribe alone and holding no event yet: never
    /// stored, and removed with its last subscriber.
    pub ephemeral: bool,
    /// Count this topic's events under its own metric label.
    pub metered: bool,
    /// Bytes retained over all topics; this ring's share is kept in it.
    pub global_bytes: Arc<AtomicU64>,
    /// With `retain_until_acked`: the lowest offset some group has not
    /// done yet; trimming stops there (`u64::MAX` = nothing pinned).
    pub pin: u64,
    /// The epoch this topic had while it was a placeholder that a shared
    /// backend then replaced by the stored topic: its subscribers had seen
    /// nothing, so their gap only names the new epoch and they continue
    /// where they were instead of jumping to the end.
    pub adopted_from: Option<u64>,
}

/// A random incarnation id.
pub(crate) fn new_generation() -> u64 {
    super::new_epoch()
}

impl Drop for TopicState {
    fn drop(&mut self) {
        self.global_bytes
            .fetch_sub(self.ring_bytes + self.cache_bytes, Ordering::Relaxed);
    }
}

impl TopicState {
    /// A topic whose history starts now.
    pub fn new(epoch: u64, retention: Retention, global_bytes: Arc<AtomicU64>) -> Self {
        Self {
            epoch,
            generation: new_generation(),
            retention,
            ring: VecDeque::new(),
            ring_bytes: 0,
            cache_bytes: 0,
            protected: 0,
            counters: Counters::new(),
            sealed: false,
            sealed_at_ms: None,
            deleted: false,
            deleting: false,
            ephemeral: false,
            metered: false,
            global_bytes,
            pin: u64::MAX,
            adopted_from: None,
        }
    }

    /// Adds an event to the back of the ring (no trimming).
    pub fn push_back(&mut self, event: Arc<Event>) {
        let size = event.retained_size();
        self.ring_bytes += size;
        self.global_bytes.fetch_add(size, Ordering::Relaxed);
        self.ring.push_back(event);
    }

    /// Bytes the ring holds: its events and the encodings built for them.
    pub fn retained_bytes(&self) -> u64 {
        self.ring_bytes + self.cache_bytes
    }

    /// Charges `n` bytes of a front-end encoding built for `event`, first
    /// trimming the ring so that it stays within `max_bytes` with them (never
    /// below the latest commit). An event no longer in the ring is not
    /// charged: its encoding goes with the last subscriber holding it.
    /// Returns whether the ring was trimmed.
    pub fn charge_encoding(&mut self, event: &Event, n: u64, now_ms: u64) -> bool {
        let in_ring = |s: &Self| {
            s.get(event.offset)
                .is_some_and(|e| std::ptr::eq(&**e, event))
        };
        if !in_ring(self) {
            return false;
        }
        let trimmed = self.trim_to(now_ms, self.retention.max_bytes.saturating_sub(n)) > 0;
        if in_ring(self) {
            event
                .charged
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            self.cache_bytes += n;
            self.global_bytes.fetch_add(n, Ordering::Relaxed);
        }
        trimmed
    }

    /// Offset after the last committed event.
    pub fn next_offset(&self) -> u64 {
        self.counters.next_offset
    }

    /// The last committed offset (0 when none yet).
    pub fn last_offset(&self) -> u64 {
        self.counters.next_offset - 1
    }

    /// The first retained offset, or `next_offset` when nothing is retained.
    pub fn first_offset(&self) -> u64 {
        self.ring
            .front()
            .map_or(self.counters.next_offset, |e| e.offset)
    }

    /// The retained event at `offset`, if any.
    pub fn get(&self, offset: u64) -> Option<&Arc<Event>> {
        let first = self.ring.front()?.offset;
        let index = usize::try_from(offset.checked_sub(first)?).ok()?;
        self.ring.get(index)
    }

    /// Appends committed events (assigned in order) and trims to retention,
    /// but never below the events of this very commit: a subscriber that
    /// was up to date gets all of them, however large the batch.
    ///
    /// With a shared backend the same event can arrive twice (a node's own
    /// commit and its follower) and events trimmed in the backend before
    /// this node read them leave a hole: an event already held is skipped,
    /// and a hole empties the ring first (what lies below is gone, and a
    /// subscriber there gets its gap). Neither happens with one node.
    pub fn push(&mut self, events: impl IntoIterator<Item = Arc<Event>>, now_ms: u64) {
        let mut pushed = 0;
        for event in events {
            if event.offset < self.counters.next_offset {
                continue;
            }
            if event.offset > self.counters.next_offset {
                self.clear_ring();
            }
            pushed += 1;
            self.counters.next_offset = event.offset + 1;
            match self.counters.versions.get_mut(&*event.event_type) {
                Some(v) => *v = event.version,
                None => {
                    self.counters
                        .versions
                        .insert(event.event_type.clone(), event.version);
                }
            }
            self.push_back(event);
        }
        self.protected = pushed;
        self.trim(now_ms);
    }

    /// Makes this topic the incarnation `generation` of a shared backend
    /// (created first on another node, or a new history after the backend
    /// lost writes): its events go; subscribers get `gap(epoch_changed)`
    /// (continuing where they were if the topic held nothing yet: see
    /// `adopted_from`).
    pub fn switch_incarnation(&mut self, generation: u64, epoch: u64) {
        if self.generation == generation {
            return;
        }
        let blank = self.ring.is_empty() && self.counters.next_offset == 1;
        self.adopted_from = blank.then_some(self.epoch);
        self.clear_ring();
        self.counters = Counters::new();
        self.generation = generation;
        self.epoch = epoch;
        self.sealed = false;
        self.sealed_at_ms = None;
    }

    /// Drops every retained event (a shared backend moved past them).
    pub fn clear_ring(&mut self) {
        while self.pop_front() {}
        self.protected = 0;
    }

    /// Drops the first retained event and its share of the byte counts.
    fn pop_front(&mut self) -> bool {
        let Some(front) = self.ring.pop_front() else {
            return false;
        };
        let charged = front.charged.swap(0, Ordering::Relaxed);
        let size = front.retained_size();
        self.ring_bytes -= size;
        self.cache_bytes -= charged;
        self.global_bytes
            .fetch_sub(size + charged, Ordering::Relaxed);
        true
    }

    /// Drops events from the front while any retention bound is exceeded,
    /// keeping the latest commit (age still applies to it). Returns how many
    /// were dropped.
    pub fn trim(&mut self, now_ms: u64) -> usize {
        self.trim_to(now_ms, self.retention.max_bytes)
    }

    /// [`trim`](Self::trim) with `max_bytes` in place of the retention's.
    fn trim_to(&mut self, now_ms: u64, max_bytes: u64) -> usize {
        let r = self.retention;
        let oldest_kept = r
            .max_age
            .map(|age| now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)));
        let mut dropped = 0;
        let pin = if r.retain_until_acked {
            self.pin
        } else {
            u64::MAX
        };
        while let Some(front) = self.ring.front() {
            if front.offset >= pin {
                break;
            }
            let protected = self.ring.len() <= self.protected;
            let too_many = !protected && self.ring.len() as u64 > r.max_events;
            let too_big = !protected && self.retained_bytes() > max_bytes;
            let too_old = oldest_kept.is_some_and(|t| front.timestamp_ms < t);
            if !(too_many || too_big || too_old) {
                break;
            }
            self.pop_front();
            dropped += 1;
        }
        dropped
    }

    /// Whether `bytes` more would exceed `max_bytes` even after trimming
    /// everything below the pin: `retain_until_acked` then refuses them.
    pub fn pinned_full(&self, bytes: u64) -> bool {
        let max = self.retention.max_bytes;
        let over = (self.retained_bytes() + bytes).saturating_sub(max);
        if !self.retention.retain_until_acked || over == 0 {
            return false;
        }
        let mut freeable = 0;
        for e in &self.ring {
            if e.offset >= self.pin || freeable >= over {
                break;
            }
            freeable += e.retained_size() + e.charged.load(Ordering::Relaxed);
        }
        freeable < over
    }

    /// The current version of `event_type` (0 when none was published).
    pub fn version_of(&self, event_type: &str) -> u64 {
        self.counters.versions.get(event_type).copied().unwrap_or(0)
    }

    /// Whether subscribers at the end of the ring are done.
    pub fn is_ended(&self) -> bool {
        self.deleted || self.sealed_at_ms.is_some()
    }
}

/// A topic: shared by the engine map, the store writer and subscriptions.
#[derive(Debug)]
pub(crate) struct Topic {
    /// The topic name.
    pub name: Arc<str>,
    /// Ring, counters, flags.
    pub state: RwLock<TopicState>,
    /// Bumped after each commit or lifecycle change; wakes subscribers.
    pub notify: watch::Sender<u64>,
    /// Live subscriptions.
    pub subscribers: AtomicUsize,
    /// Last publish or subscription change, ms since the Unix epoch.
    pub last_activity_ms: AtomicU64,
    /// The ring was trimmed outside a commit (to make room for an
    /// encoding): its stored events need pruning at the next maintenance.
    pub needs_prune: std::sync::atomic::AtomicBool,
    /// Publishes queued and not yet committed or refused (an ephemeral
    /// topic is not removed under them).
    pub pending: AtomicUsize,
    /// Consumer groups on the topic (it is never idle-expired while it has one).
    pub groups: AtomicUsize,
    /// Where the topic is registered, to remove it when ephemeral.
    pub registry: std::sync::Weak<Registry>,
}

/// The engine's topic map, shared with topics so that an ephemeral one can
/// remove itself when its last subscriber leaves.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Every live topic by name.
    pub topics: dashmap::DashMap<Arc<str>, Arc<Topic>>,
    /// How many of them are ephemeral.
    pub ephemeral: AtomicUsize,
    /// Every consumer group by (topic, group).
    pub groups: dashmap::DashMap<(Arc<str>, Arc<str>), Arc<super::group::Group>>,
    /// Groups changed since the writer last stored them.
    pub dirty_groups: parking_lot::Mutex<Vec<Arc<super::group::Group>>>,
    /// Names of topics as they become stored (see [`Registry::announce`]).
    pub created: Announcer,
}

/// Tells pattern subscriptions about topics as they become stored.
#[derive(Debug)]
pub(crate) struct Announcer(tokio::sync::broadcast::Sender<Arc<str>>);

impl Default for Announcer {
    fn default() -> Self {
        // A pattern stream that misses more rescans every topic.
        Self(tokio::sync::broadcast::Sender::new(1024))
    }
}

impl Announcer {
    /// A receiver of the names announced from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.0.subscribe()
    }
}

impl Registry {
    /// Announces that `name` is now a stored topic (created, or its first
    /// event): pattern subscriptions join it. Costs nothing without any.
    pub fn announce(&self, name: &Arc<str>) {
        if self.created.0.receiver_count() > 0 {
            let _ = self.created.0.send(name.clone());
        }
    }
}

impl Topic {
    /// Wraps a state into a shared topic.
    pub fn new(
        name: Arc<str>,
        state: TopicState,
        now_ms: u64,
        registry: std::sync::Weak<Registry>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            state: RwLock::new(state),
            notify: watch::Sender::new(0),
            subscribers: AtomicUsize::new(0),
            last_activity_ms: AtomicU64::new(now_ms),
            needs_prune: std::sync::atomic::AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            groups: AtomicUsize::new(0),
            registry,
        })
    }

    /// Ends the topic's ephemeral status (its first event, an explicit
    /// create, a delete), under its write lock.
    pub fn clear_ephemeral(&self, state: &mut TopicState) {
        if std::mem::replace(&mut state.ephemeral, false) {
            if let Some(registry) = self.registry.upgrade() {
                registry.ephemeral.fetch_sub(1, Ordering::AcqRel);
                if !state.deleted {
                    registry.announce(&self.name);
                }
            }
        }
    }

    /// Removes the topic if it is ephemeral and nobody uses it any more:
    /// no subscriber, no queued publish.
    pub fn release_if_unused(self: &Arc<Self>) {
        let mut state = self.state.write();
        if !state.ephemeral
            || state.deleted
            || self.subscribers.load(Ordering::Acquire) > 0
            || self.pending.load(Ordering::Acquire) > 0
        {
            return;
        }
        state.deleted = true;
        self.clear_ephemeral(&mut state);
        drop(state);
        if let Some(registry) = self.registry.upgrade() {
            registry
                .topics
                .remove_if(&self.name, |_, t| Arc::ptr_eq(t, self));
        }
        tracing::debug!(topic = %self.name, "ephemeral topic released");
    }

    /// Charges an encoding built for `event` to the ring (trimming to make
    /// room; see [`TopicState::charge_encoding`]).
    pub fn charge_encoding(&self, event: &Event, n: u64) {
        if self
            .state
            .write()
            .charge_encoding(event, n, super::now_ms())
        {
            self.needs_prune.store(true, Ordering::Release);
        }
    }

    /// The topic's identity for the storage log.
    pub fn id(&self, state: &TopicState) -> super::log::TopicId {
        super::log::TopicId {
            name: self.name.clone(),
            generation: state.generation,
            epoch: state.epoch,
        }
    }

    /// Wakes every subscriber to look at the state again.
    pub fn wake(&self) {
        self.notify.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// [`wake`](Self::wake), skipped when nobody watches the topic (no
    /// subscription or waiting group member holds a receiver): a publish to
    /// a topic nobody reads then takes no notification locks. Call it after
    /// the commit's write lock: a receiver that could have missed the commit
    /// subscribed before its own read of the state, so before that lock.
    pub fn wake_watched(&self) {
        if self.notify.receiver_count() > 0 {
            self.wake();
        }
    }

    /// Records activity for idle expiry.
    pub fn touch(&self, now_ms: u64) {
        self.last_activity_ms.store(now_ms, Ordering::Relaxed);
    }
}
