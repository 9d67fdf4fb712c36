//! A subscription: a cursor into a topic's ring.
//!
//! Replay and live are one mechanism — the cursor reads committed events
//! from the ring until it reaches the end, then waits for the next commit —
//! so there is no window between "history" and "live" in which an event can
//! be lost or seen twice. A subscriber holds no events of its own beyond one
//! small batch: when it falls behind the ring it gets `gap(slow_consumer)`
//! and jumps to live.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

use super::event::{Delivery, Encoding, Event, Gap, GapReason, Start};
use super::topic::{Topic, TopicState};
use super::{now_ms, EngineError};

/// Most deliveries taken from the ring per lock acquisition.
const BATCH: usize = 256;
/// Most ring entries examined per lock acquisition (bounds lock hold time
/// when a type filter skips most events).
const SCAN: usize = 4096;

/// Per-type resume state of an `after_versions` start, active until the
/// cursor reaches `live_from`.
#[derive(Debug)]
struct Resume {
    /// Deliver an event of a named type only above this version.
    after: HashMap<String, u64>,
    /// From this offset on, every (filtered) event is delivered.
    live_from: u64,
}

/// A stream of [`Delivery`] for one subscriber. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    topic: Arc<Topic>,
    types: Option<Vec<String>>,
    cursor: u64,
    resume: Option<Resume>,
    epoch: u64,
    start_offset: u64,
    live_offset: u64,
    queue: VecDeque<Delivery>,
    rx: watch::Receiver<u64>,
    finished: bool,
}

impl Subscription {
    /// Registers a subscriber on `topic`, resolving `start` under the
    /// topic's lock so that the first delivery continues exactly from it.
    pub(crate) fn open(
        topic: Arc<Topic>,
        types: Vec<String>,
        start: Start,
    ) -> Result<Self, EngineError> {
        let types = (!types.is_empty()).then_some(types);
        let wants = |t: &str| wanted(&types, t);
        // Subscribe to notifications before reading the state: a commit
        // after this point is seen either in the state or as a change.
        let rx = topic.notify.subscribe();
        let state = topic.state.read();
        if state.deleted {
            // Removed (an ephemeral topic's last subscriber just left, or a
            // delete): the engine looks the topic up again.
            return Err(EngineError::TopicNotFound(topic.name.to_string()));
        }
        let mut queue = VecDeque::new();
        let live = state.next_offset();
        let whole_gap = |reason, requested: u64| Gap {
            topic: topic.name.to_string(),
            event_type: None,
            reason,
            epoch: state.epoch,
            requested,
            first_available: state.first_offset(),
            current: state.last_offset(),
        };
        let mut resume = None;
        let mut after_offset = |offset: u64, filter: Option<Resume>| {
            if offset > state.last_offset() || filter.as_ref().is_some_and(|r| r.live_from > live) {
                return Err(EngineError::InvalidStart(format!(
                    "offset {offset} is beyond the last offset {} of epoch {}",
                    state.last_offset(),
                    state.epoch
                )));
            }
            if offset + 1 < state.first_offset() {
                // For a filtered replay, whether the trimmed events would
                // have passed the version filter is no longer known: a gap,
                // not a guess.
                queue.push_back(Delivery::Gap(whole_gap(GapReason::Retention, offset)));
                return Ok(live);
            }
            resume = filter.filter(|r| offset + 1 < r.live_from);
            Ok(offset + 1)
        };
        let cursor = match start {
            Start::Live => live,
            Start::Earliest => state.first_offset(),
            Start::AfterOffset { epoch, offset }
            | Start::AfterOffsetVersions { epoch, offset, .. }
                if epoch != state.epoch =>
            {
                queue.push_back(Delivery::Gap(whole_gap(GapReason::EpochChanged, offset)));
                live
            }
            Start::AfterOffset { offset, .. } => after_offset(offset, None)?,
            Start::AfterOffsetVersions {
                offset,
                versions,
                live_from,
                ..
            } => after_offset(
                offset,
                Some(Resume {
                    after: versions.into_iter().filter(|(t, _)| wants(t)).collect(),
                    live_from,
                }),
            )?,
            Start::AfterVersions { epoch, .. } if epoch != state.epoch => {
                queue.push_back(Delivery::Gap(whole_gap(GapReason::EpochChanged, 0)));
                live
            }
            Start::AfterVersions { versions, .. } => {
                let (cursor, after) =
                    resolve_versions(&topic.name, &state, versions, &wants, &mut queue)?;
                if cursor < live {
                    resume = Some(Resume {
                        after,
                        live_from: live,
                    });
                }
                cursor
            }
        };
        let epoch = state.epoch;
        // Counted under the lock: an ephemeral topic is released under its
        // write lock only when it has no subscriber.
        topic.subscribers.fetch_add(1, Ordering::AcqRel);
        drop(state);
        for d in &queue {
            if let Delivery::Gap(g) = d {
                metrics::counter!(crate::metrics::GAPS, "reason" => g.reason.as_str()).increment(1);
                tracing::warn!(topic = %topic.name, reason = g.reason.as_str(), event_type = ?g.event_type, "resume gap");
            }
        }
        topic.touch(now_ms());
        Ok(Self {
            topic,
            types,
            cursor,
            resume,
            epoch,
            start_offset: cursor,
            live_offset: live,
            queue,
            rx,
            finished: false,
        })
    }

    /// The topic's epoch when the subscription started.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The offset the subscription started reading at.
    pub fn start_offset(&self) -> u64 {
        self.start_offset
    }

    /// The offset the next published event gets, as of subscribing: events
    /// before it are replay, from it on live.
    pub fn live_offset(&self) -> u64 {
        self.live_offset
    }

    /// A receiver that changes whenever the topic commits something (for
    /// waiting on many subscriptions at once, see `MultiSubscription`).
    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.rx.clone()
    }

    /// Whether the topic was deleted (rather than sealed).
    pub(crate) fn deleted(&self) -> bool {
        self.topic.state.read().deleted
    }

    /// The topic name.
    pub fn topic(&self) -> &str {
        &self.topic.name
    }

    /// The shared `which` encoding of `event` (built by `build` on first
    /// use), charged to the topic's retained bytes when this call built it.
    pub(crate) fn encoded<'e>(
        &self,
        event: &'e Event,
        which: Encoding,
        build: impl FnOnce() -> Bytes,
    ) -> &'e Bytes {
        let (bytes, built) = event.encoding(which, build);
        if let Some(n) = built {
            self.topic.charge_encoding(event, n);
        }
        bytes
    }

    /// Whether a front end should build the shared encoding of `event`
    /// (see [`encoded`](Self::encoded)) rather than encode it for this
    /// subscriber alone: only for a live event of a topic with other
    /// subscribers, who get the same event at about the same time. A
    /// replayed event, or the only subscriber's, is cheaper encoded straight
    /// into the subscriber's buffer: no allocation, no topic write lock, no
    /// cached bytes kept in the ring.
    pub(crate) fn shares(&self, event: &Event) -> bool {
        event.offset >= self.live_offset && self.topic.subscribers.load(Ordering::Relaxed) > 1
    }

    /// The next delivery, waiting for one if needed; `None` after `End`.
    pub async fn recv(&mut self) -> Option<Delivery> {
        loop {
            if let Some(d) = self.try_recv() {
                return Some(d);
            }
            if self.finished {
                return None;
            }
            // The sender lives in the topic we hold, so this cannot fail;
            // treat it as an end all the same.
            if self.rx.changed().await.is_err() {
                self.finished = true;
            }
        }
    }

    /// The next delivery if one is ready now, without waiting.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        loop {
            if let Some(d) = self.queue.pop_front() {
                return Some(d);
            }
            if self.finished {
                return None;
            }
            self.rx.borrow_and_update();
            if !self.fill() {
                return self.queue.pop_front();
            }
        }
    }

    /// Turns the subscription into a `Stream` of deliveries.
    pub fn into_stream(self) -> impl Stream<Item = Delivery> + Send + 'static {
        futures_util::stream::unfold(
            self,
            |mut sub| async move { sub.recv().await.map(|d| (d, sub)) },
        )
    }

    /// Reads from the ring into the queue. Returns true when it stopped
    /// early (scan budget) and should be called again without waiting.
    fn fill(&mut self) -> bool {
        // Disjoint borrows: the topic's lock guard lives beside the mutable
        // cursor and queue (no Arc clone of the topic per fill).
        let Self {
            topic,
            types,
            cursor,
            resume,
            queue,
            finished,
            epoch,
            ..
        } = self;
        let state = topic.state.read();
        let end_now = |queue: &mut VecDeque<Delivery>, finished: &mut bool| {
            queue.push_back(Delivery::End {
                last_offset: state.last_offset(),
            });
            *finished = true;
        };
        if state.deleted {
            end_now(queue, finished);
            return false;
        }
        if state.epoch != *epoch {
            // A shared backend replaced the topic's history (re-created on
            // another node, or lost by the backend): the client learns the
            // new epoch from the gap (events carry none on the wire).
            let requested = cursor.saturating_sub(1);
            if state.adopted_from == Some(*epoch) {
                // A placeholder this subscription saw nothing of became the
                // stored topic: continue in it from where it stands now.
                *cursor = (*cursor).max(state.first_offset());
            } else {
                *cursor = state.next_offset();
                *resume = None;
                tracing::warn!(topic = %topic.name, "the topic's history was replaced: gap(epoch_changed)");
            }
            queue.push_back(Delivery::Gap(Gap {
                topic: topic.name.to_string(),
                event_type: None,
                reason: GapReason::EpochChanged,
                epoch: state.epoch,
                requested,
                first_available: state.first_offset(),
                current: *cursor - 1,
            }));
            metrics::counter!(crate::metrics::GAPS, "reason" => "epoch_changed").increment(1);
            *epoch = state.epoch;
        }
        let first = state.first_offset();
        if *cursor < first {
            // Continue from the newest retained event this subscription
            // wants, so that the gap is always followed by an event (a
            // subscriber jumped to the very end that is still slow would
            // otherwise get gap after gap and nothing else).
            let end = state.next_offset();
            let mut resume_at = end;
            for offset in (first..end).rev().take(SCAN) {
                if state
                    .get(offset)
                    .is_some_and(|e| wanted(types, &e.event_type))
                {
                    resume_at = offset;
                    break;
                }
            }
            queue.push_back(Delivery::Gap(Gap {
                topic: topic.name.to_string(),
                event_type: None,
                reason: GapReason::SlowConsumer,
                epoch: state.epoch,
                requested: *cursor - 1,
                first_available: first,
                current: resume_at - 1,
            }));
            *cursor = resume_at;
            *resume = None;
            metrics::counter!(crate::metrics::GAPS, "reason" => "slow_consumer").increment(1);
            metrics::counter!(crate::metrics::SLOW_CONSUMERS).increment(1);
            tracing::warn!(topic = %topic.name, "subscriber fell behind the ring: gap(slow_consumer)");
        }
        let end = state.next_offset();
        let mut scanned = 0;
        while *cursor < end && queue.len() < BATCH {
            if scanned == SCAN {
                return true;
            }
            scanned += 1;
            // Offsets in the ring are contiguous and cursor >= first.
            let Some(event) = state.get(*cursor) else {
                break;
            };
            *cursor += 1;
            if !wanted(types, &event.event_type) {
                continue;
            }
            if let Some(r) = resume {
                if event.offset < r.live_from {
                    match r.after.get(&*event.event_type) {
                        Some(v) if event.version > *v => {}
                        _ => continue,
                    }
                }
            }
            queue.push_back(Delivery::Event(event.clone()));
        }
        if resume.as_ref().is_some_and(|r| *cursor >= r.live_from) {
            *resume = None;
        }
        if *cursor >= end && state.is_ended() {
            end_now(queue, finished);
        }
        false
    }
}

/// Whether the type filter (`None` = every type) lets `event_type` through.
fn wanted(types: &Option<Vec<String>>, event_type: &str) -> bool {
    types
        .as_ref()
        .is_none_or(|ts| ts.iter().any(|t| t == event_type))
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let left = self.topic.subscribers.fetch_sub(1, Ordering::AcqRel) - 1;
        self.topic.touch(now_ms());
        if left == 0 {
            self.topic.release_if_unused();
        }
    }
}

/// Resolves an `after_versions` start: per named type, either the offset of
/// its first missed event, or a per-type gap (then that type starts live).
/// Returns the cursor and the per-type thresholds.
fn resolve_versions(
    topic: &str,
    state: &TopicState,
    versions: Vec<(String, u64)>,
    wants: &impl Fn(&str) -> bool,
    queue: &mut VecDeque<Delivery>,
) -> Result<(u64, HashMap<String, u64>), EngineError> {
    let mut after: HashMap<String, u64> = HashMap::new();
    for (t, v) in versions {
        if !wants(&t) {
            continue;
        }
        let current = state.version_of(&t);
        if v > current {
            return Err(EngineError::InvalidStart(format!(
                "version {v} of type {t:?} is beyond its current version {current} in epoch {}",
                state.epoch
            )));
        }
        after.insert(t, v);
    }
    // One pass over the ring: first retained version and first missed
    // offset per named type that is behind.
    let mut first_version: HashMap<&str, u64> = HashMap::new();
    let mut first_missed: HashMap<&str, u64> = HashMap::new();
    let behind = after
        .iter()
        .filter(|(t, v)| **v < state.version_of(t))
        .count();
    if behind > 0 {
        for event in &state.ring {
            let Some((t, v)) = after.get_key_value(&*event.event_type) else {
                continue;
            };
            first_version.entry(t.as_str()).or_insert(event.version);
            if event.version > *v {
                first_missed.entry(t.as_str()).or_insert(event.offset);
                if first_missed.len() == behind {
                    break;
                }
            }
        }
    }
    let mut cursor = state.next_offset();
    let mut gaps = Vec::new();
    for (t, v) in &after {
        let current = state.version_of(t);
        if *v == current {
            continue;
        }
        match (first_version.get(t.as_str()), first_missed.get(t.as_str())) {
            (Some(first), Some(offset)) if *first <= v + 1 => cursor = cursor.min(*offset),
            (first, _) => gaps.push((
                t.clone(),
                *v,
                first.copied().unwrap_or(current + 1),
                current,
            )),
        }
    }
    gaps.sort();
    for (t, requested, first_available, current) in gaps {
        queue.push_back(Delivery::Gap(Gap {
            topic: topic.to_owned(),
            event_type: Some(t.clone()),
            reason: GapReason::Retention,
            epoch: state.epoch,
            requested,
            first_available,
            current,
        }));
        // After the gap this type continues live.
        after.insert(t, current);
    }
    Ok((cursor, after))
}
