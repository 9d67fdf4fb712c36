//! The storage seam: a [`Log`] backend assigns positions and persists; the
//! engine plans passes and commits their outcome (ring push, ack, wake) in
//! one place above it.
//!
//! A pass is a list of [`Step`]s in queue order. [`Log::persist`] either
//! applies the whole pass — assigning offsets and versions on its own
//! counters, making it durable under the durability mode — and returns one
//! [`Outcome`] per step, or fails as a whole and leaves no trace: its
//! counters are as before, and nothing of the pass becomes visible later
//! (not even after a restart). Refusing a single step (an append to a
//! sealed topic) is an outcome, not a failure.
//!
//! Backends: [`MemoryLog`] (no disk; persists inline under the topic lock)
//! and `store::SledLog` (group commit on the writer thread). A distributed
//! backend implements the same trait: positions come from the backend,
//! never from the engine.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;

use super::dedup::{self, Expected, Original, Window};
use super::event::{Event, NewEvent};
use super::EngineError;

/// One incarnation of a topic as the engine names it to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopicId {
    /// The topic name.
    pub name: Arc<str>,
    /// Random id of this incarnation (a delete and re-create gets another).
    pub generation: u64,
    /// The epoch events of this incarnation carry.
    pub epoch: u64,
}

/// One step of a pass.
#[derive(Debug)]
pub(crate) enum Step {
    /// Assign positions to the events (in order) and store them.
    Append {
        /// The topic.
        topic: TopicId,
        /// The events as published.
        events: Vec<NewEvent>,
        /// The position the append requires, checked atomically with it.
        expect: Expected,
        /// The topic's dedup window in ms (0 = keys are ignored).
        window_ms: u64,
        /// The topic's next offset as the engine held it when queueing (a
        /// shared backend returns what other nodes appended from there on).
        known_next: u64,
        /// The topic's `max_events` (a shared backend trims to it).
        max_events: u64,
    },
    /// Persist the topic's seal after every earlier append.
    Seal {
        /// The topic.
        topic: TopicId,
    },
    /// Remove the topic and its stored events.
    Delete {
        /// The topic.
        topic: TopicId,
    },
    /// Drop stored events below `first_retained` (the ring was trimmed).
    Trim {
        /// The topic.
        topic: TopicId,
        /// The first offset the ring still holds.
        first_retained: u64,
        /// The topic's next offset (a shared backend stores a topic
        /// created before its first event, never one holding events).
        next_offset: u64,
    },
    /// Make everything before it durable.
    Sync,
    /// Store (or remove) consumer group records; the writer fills in the
    /// groups changed since the last pass when it plans the pass.
    Groups {
        /// The records, in order.
        writes: Vec<GroupWrite>,
    },
    /// Forget idempotency keys older than their topic's window.
    Expire,
}

/// One consumer group record for the log to store (`Some`) or remove.
#[derive(Debug)]
pub(crate) struct GroupWrite {
    /// The group's topic.
    pub topic: Arc<str>,
    /// The group's name.
    pub group: Arc<str>,
    /// The engine's encoding of the group; `None` removes it.
    pub value: Option<Vec<u8>>,
}

/// What a step came to, once its pass is persisted.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The new events with their assigned positions, and the events of
    /// the request that repeated a key: `(index in the request, original)`.
    Appended {
        /// New events, in request order.
        events: Vec<Arc<Event>>,
        /// Repeats, by index; empty for most appends.
        repeats: Vec<(usize, Original)>,
        /// What a shared backend adds (`None` for a local one).
        shared: Option<Box<Shared>>,
    },
    /// The seal is stored, with its time.
    Sealed(u64),
    /// Done (delete, trim, sync).
    Done,
    /// This step alone was refused; the rest of the pass stands.
    Refused(EngineError),
}

/// What a backend shared by several nodes adds to an append's outcome.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The incarnation `(generation, epoch)` appended to: another node may
    /// have created the topic first, or the backend started a new history;
    /// the engine switches its topic to it before committing.
    pub incarnation: (u64, u64),
    /// Events other nodes appended right before these that the engine may
    /// not hold yet: committed first, so the ring stays contiguous.
    pub before: Vec<Arc<Event>>,
    /// The generation the append was queued for: if the engine's topic has
    /// moved to another since (the follower applied a newer one), the
    /// outcome is acknowledged but not committed (the follower brings it).
    pub queued: u64,
}

/// A topic's whole state as one side hands it to the other: what a backend
/// recovered (for the engine to install), or what the engine acknowledged
/// (the truth a backend repairs itself against).
#[derive(Debug)]
pub(crate) struct TopicImage {
    /// Name, generation, epoch (possibly rotated by recovery).
    pub id: TopicId,
    /// Next offset and last version per type.
    pub counters: Counters,
    /// When it was sealed, if it was.
    pub sealed_at_ms: Option<u64>,
    /// The retained events, in offset order, contiguous, ending right
    /// before `counters.next_offset`.
    pub events: Vec<Arc<Event>>,
}

/// Whether a backend accepts writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Writes are accepted.
    Ok,
    /// A write or fsync failed; writes are refused until the backend has
    /// repaired itself (it retries on its own).
    Degraded(String),
}

/// A storage backend.
pub(crate) trait Log: Send + Sync + 'static {
    /// Whether `persist` does no I/O, so the engine may run a one-step pass
    /// inline under the topic's lock instead of queueing it to the writer.
    fn inline(&self) -> bool;

    /// Applies a pass atomically (see the module docs); `now_ms` stamps
    /// appended events.
    fn persist(&self, steps: &mut [Step], now_ms: u64) -> Result<Vec<Outcome>, EngineError>;

    /// Whether writes are accepted now.
    fn health(&self) -> Health;

    /// After a failure: tries once to bring the store back in line with
    /// what was acknowledged (`committed`). Ok when writes can resume.
    fn repair(&self, committed: &[TopicImage]) -> Result<(), EngineError>;

    /// Makes everything durable and marks a clean stop. Nothing may follow.
    fn close(&self, committed: &[TopicImage]) -> Result<(), EngineError>;
}

/// Offset and per-type version counters of one topic incarnation: a backend
/// assigns on its own; the engine's topic state keeps the committed ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// The offset the next event gets.
    pub next_offset: u64,
    /// The last version assigned per type.
    pub versions: FastMap<Arc<str>, u64>,
}

/// A hash map for the hot paths (a lookup per event or per publish):
/// foldhash, randomly seeded per map, instead of SipHash.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

impl Counters {
    /// Counters of a topic whose history just started.
    pub fn new() -> Self {
        Self {
            next_offset: 1,
            versions: FastMap::default(),
        }
    }

    /// Counters continuing from stored ones.
    pub fn from_parts(next_offset: u64, versions: &[(String, u64)]) -> Self {
        Self {
            next_offset: next_offset.max(1),
            versions: versions
                .iter()
                .map(|(t, v)| (Arc::<str>::from(t.as_str()), *v))
                .collect(),
        }
    }

    /// Assigns positions to `events` stamped `now_ms`, taking them.
    pub fn assign(&mut self, events: &mut Vec<NewEvent>, now_ms: u64) -> Vec<Arc<Event>> {
        events
            .drain(..)
            .map(|e| {
                let offset = self.next_offset;
                self.next_offset += 1;
                let (name, version) = match self.versions.get_key_value(e.event_type.as_str()) {
                    Some((name, v)) => (name.clone(), v + 1),
                    None => (Arc::<str>::from(e.event_type.as_str()), 1),
                };
                self.versions.insert(name.clone(), version);
                Arc::new(Event::new(
                    offset, version, now_ms, name, e.headers, e.payload,
                ))
            })
            .collect()
    }

    /// The versions as a sorted list.
    pub fn version_list(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .versions
            .iter()
            .map(|(t, v)| (t.to_string(), *v))
            .collect();
        v.sort();
        v
    }
}

/// The outcome of a refused or applied append, for a backend's `persist`.
pub(crate) fn append_outcome(
    result: Result<dedup::Applied, dedup::Mismatch>,
) -> (Outcome, Vec<(Arc<str>, Original)>) {
    match result {
        Ok(a) => (
            Outcome::Appended {
                events: a.events,
                repeats: a.repeats,
                shared: None,
            },
            a.keyed,
        ),
        Err(m) => {
            metrics::counter!(crate::metrics::POSITION_MISMATCHES).increment(1);
            (
                Outcome::Refused(EngineError::PositionMismatch {
                    current_offset: m.current_offset,
                    current_version: m.current_version,
                }),
                Vec::new(),
            )
        }
    }
}

/// What the memory log keeps of a topic.
#[derive(Debug)]
struct MemTopic {
    generation: u64,
    counters: Counters,
    sealed_at_ms: Option<u64>,
    /// Idempotency keys within the window, and the window last used.
    keys: Window,
    window_ms: u64,
}

/// The `memory` durability backend: counters only, no disk. Runs inline.
#[derive(Debug, Default)]
pub(crate) struct MemoryLog {
    topics: DashMap<Arc<str>, MemTopic>,
}

impl MemoryLog {
    /// An empty memory log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state of this incarnation of the topic, fresh if none or another
    /// generation's is held.
    fn incarnation(&self, id: &TopicId) -> dashmap::mapref::one::RefMut<'_, Arc<str>, MemTopic> {
        let fresh = || MemTopic {
            generation: id.generation,
            counters: Counters::new(),
            sealed_at_ms: None,
            keys: Window::default(),
            window_ms: 0,
        };
        let mut t = self.topics.entry(id.name.clone()).or_insert_with(fresh);
        if t.generation != id.generation {
            *t = fresh();
        }
        t
    }
}

impl Log for MemoryLog {
    fn inline(&self) -> bool {
        true
    }

    fn persist(&self, steps: &mut [Step], now_ms: u64) -> Result<Vec<Outcome>, EngineError> {
        let mut outcomes = Vec::with_capacity(steps.len());
        for step in steps.iter_mut() {
            let outcome = match step {
                Step::Append {
                    topic,
                    events,
                    expect,
                    window_ms,
                    ..
                } => {
                    let mut t = self.incarnation(topic);
                    if t.sealed_at_ms.is_some() {
                        Outcome::Refused(EngineError::TopicSealed(topic.name.to_string()))
                    } else {
                        let t = &mut *t;
                        let window = *window_ms;
                        let keys = &t.keys;
                        let result =
                            dedup::append(&mut t.counters, events, *expect, window, now_ms, |k| {
                                keys.get(k, now_ms, window)
                            });
                        let (outcome, keyed) = append_outcome(result);
                        t.window_ms = window;
                        for (key, original) in keyed {
                            t.keys.insert(key, original);
                        }
                        outcome
                    }
                }
                Step::Expire => {
                    for mut t in self.topics.iter_mut() {
                        let window = t.window_ms;
                        t.keys.expire(now_ms, window);
                    }
                    Outcome::Done
                }
                Step::Seal { topic } => {
                    let mut t = self.incarnation(topic);
                    Outcome::Sealed(*t.sealed_at_ms.get_or_insert(now_ms))
                }
                Step::Delete { topic } => {
                    self.topics
                        .remove_if(&topic.name, |_, t| t.generation == topic.generation);
                    Outcome::Done
                }
                Step::Trim { .. } | Step::Sync | Step::Groups { .. } => Outcome::Done,
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    fn health(&self) -> Health {
        Health::Ok
    }

    fn repair(&self, _committed: &[TopicImage]) -> Result<(), EngineError> {
        Ok(())
    }

    fn close(&self, _committed: &[TopicImage]) -> Result<(), EngineError> {
        Ok(())
    }
}
