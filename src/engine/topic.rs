//! One topic: its retention ring, counters, epoch and lifecycle flags.
//!
//! The ring holds only *committed* events (acknowledged under the durability
//! mode), with contiguous offsets, so a subscriber's cursor is an index.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::watch;

use super::event::Event;
use super::settings::Retention;

/// Offset and per-type version counters of a topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// The offset the next event gets.
    pub next_offset: u64,
    /// The last version assigned per type.
    pub versions: HashMap<Arc<str>, u64>,
}

impl Counters {
    /// Counters of a topic whose history just started.
    pub fn new() -> Self {
        Self {
            next_offset: 1,
            versions: HashMap::new(),
        }
    }

    /// Assigns offset and version to one event of `event_type`, returning
    /// them with the interned type name.
    pub fn assign(&mut self, event_type: &str) -> (u64, u64, Arc<str>) {
        let offset = self.next_offset;
        self.next_offset += 1;
        let (name, version) = match self.versions.get_key_value(event_type) {
            Some((name, v)) => (name.clone(), v + 1),
            None => (Arc::<str>::from(event_type), 1),
        };
        self.versions.insert(name.clone(), version);
        (offset, version, name)
    }
}

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
    /// Committed counters: `next_offset - 1` is the last committed offset.
    pub counters: Counters,
    /// Publishes are refused (set at once by `seal`).
    pub sealed: bool,
    /// When the seal was committed, in ms; subscribers at the end get `End`.
    pub sealed_at_ms: Option<u64>,
    /// The topic was deleted; subscribers get `End` at once.
    pub deleted: bool,
    /// Count this topic's events under its own metric label.
    pub metered: bool,
    /// Bytes retained over all topics; this ring's share is kept in it.
    pub global_bytes: Arc<AtomicU64>,
}

impl Drop for TopicState {
    fn drop(&mut self) {
        self.global_bytes
            .fetch_sub(self.ring_bytes, Ordering::Relaxed);
    }
}

impl TopicState {
    /// A topic whose history starts now.
    pub fn new(epoch: u64, retention: Retention, global_bytes: Arc<AtomicU64>) -> Self {
        Self {
            epoch,
            generation: super::new_epoch(),
            retention,
            ring: VecDeque::new(),
            ring_bytes: 0,
            counters: Counters::new(),
            sealed: false,
            sealed_at_ms: None,
            deleted: false,
            metered: false,
            global_bytes,
        }
    }

    /// Empties the ring, releasing its bytes.
    pub fn clear_ring(&mut self) {
        self.global_bytes
            .fetch_sub(self.ring_bytes, Ordering::Relaxed);
        self.ring_bytes = 0;
        self.ring.clear();
    }

    /// Adds an event to the back of the ring (no trimming).
    pub fn push_back(&mut self, event: Arc<Event>) {
        let size = event.retained_size();
        self.ring_bytes += size;
        self.global_bytes.fetch_add(size, Ordering::Relaxed);
        self.ring.push_back(event);
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

    /// Appends committed events (assigned in order) and trims to retention.
    pub fn push(&mut self, events: impl IntoIterator<Item = Arc<Event>>, now_ms: u64) {
        for event in events {
            // Memory mode assigns on these counters directly; the store
            // writer assigns on its own and they advance here, at commit.
            if event.offset >= self.counters.next_offset {
                self.counters.next_offset = event.offset + 1;
                match self.counters.versions.get_mut(&*event.event_type) {
                    Some(v) => *v = event.version,
                    None => {
                        self.counters
                            .versions
                            .insert(event.event_type.clone(), event.version);
                    }
                }
            }
            self.push_back(event);
        }
        self.trim(now_ms);
    }

    /// Drops events from the front while any retention bound is exceeded.
    /// Returns how many were dropped.
    pub fn trim(&mut self, now_ms: u64) -> usize {
        let r = self.retention;
        let oldest_kept = r
            .max_age
            .map(|age| now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)));
        let mut dropped = 0;
        while let Some(front) = self.ring.front() {
            let too_many = self.ring.len() as u64 > r.max_events;
            let too_big = self.ring_bytes > r.max_bytes;
            let too_old = oldest_kept.is_some_and(|t| front.timestamp_ms < t);
            if !(too_many || too_big || too_old) {
                break;
            }
            let size = front.retained_size();
            self.ring_bytes -= size;
            self.global_bytes.fetch_sub(size, Ordering::Relaxed);
            self.ring.pop_front();
            dropped += 1;
        }
        dropped
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
}

impl Topic {
    /// Wraps a state into a shared topic.
    pub fn new(name: Arc<str>, state: TopicState, now_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            name,
            state: RwLock::new(state),
            notify: watch::Sender::new(0),
            subscribers: AtomicUsize::new(0),
            last_activity_ms: AtomicU64::new(now_ms),
        })
    }

    /// Wakes every subscriber to look at the state again.
    pub fn wake(&self) {
        self.notify.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records activity for idle expiry.
    pub fn touch(&self, now_ms: u64) {
        self.last_activity_ms.store(now_ms, Ordering::Relaxed);
    }
}
