//! Consumer groups: durable, named per topic, at-least-once work
//! distribution with acks, redelivery, backoff and dead letters.
//!
//! A group is a cursor (`next`: the first offset never handed out), an ack
//! floor (every offset ≤ `floor` is done), the done ranges above the floor
//! and the pending entries (handed out, not yet done). Every offset below
//! `next` is either done or pending; `max_ack_pending` bounds the pending
//! ones. Events are read from the topic's ring, never copied: a pending
//! event that retention took before it was done is reported once as a gap.
//!
//! Time is tokio's (`tokio::time::Instant`), so tests can drive it with
//! `tokio::time::pause`; one engine-wide task (the group ticker in
//! `engine/mod.rs`) fires the deadlines of every group, not a task per event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::event::{Event, Gap, GapReason};
use super::topic::{Topic, TopicState};

/// Header naming the topic a dead letter came from.
pub const DLQ_TOPIC: &str = "ringcast-dlq-topic";
/// Header naming the dead letter's offset in its original topic.
pub const DLQ_OFFSET: &str = "ringcast-dlq-offset";
/// Header naming the group that gave the event up.
pub const DLQ_GROUP: &str = "ringcast-dlq-group";
/// Header with the number of deliveries the group made.
pub const DLQ_ATTEMPTS: &str = "ringcast-dlq-attempts";
/// Header with the last reason (`max_deliver`, or the `term` reason).
pub const DLQ_REASON: &str = "ringcast-dlq-reason";
/// Header with the original topic's epoch.
pub const DLQ_EPOCH: &str = "ringcast-dlq-epoch";
/// Most consumer names a group knows at once (a new one beyond is refused).
pub const MAX_MEMBERS: usize = 1024;
/// Most lost ranges a group holds for its members (see `push_gap`).
const MAX_GAPS: usize = 1024;
/// Longest `term` reason kept, in bytes.
pub const MAX_REASON: usize = 1024;

/// Where a new group starts reading its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum GroupStart {
    /// Every retained event.
    #[default]
    Earliest,
    /// Only events published after the group was created.
    Live,
    /// Events with an offset greater than this one.
    AfterOffset(u64),
}

/// The settings of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupConfig {
    /// Where the group starts (used only when it is created).
    pub start: GroupStart,
    /// How long a delivery may stay unacked before it is redelivered.
    pub ack_wait: Duration,
    /// Deliveries per event before it goes to the dead-letter topic.
    pub max_deliver: u32,
    /// Delay before redelivery after attempt *n* fails (`backoff[n-1]`,
    /// the last entry repeating); empty = redeliver at once.
    pub backoff: Vec<Duration>,
    /// Most events pending (handed out, not done) at once over the group;
    /// at the limit it stops handing out new events.
    pub max_ack_pending: u32,
    /// Where given-up events go; `None` = `<topic>.dlq`.
    pub dead_letter_topic: Option<String>,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            start: GroupStart::Earliest,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            backoff: Vec::new(),
            max_ack_pending: 1000,
            dead_letter_topic: None,
        }
    }
}

/// Upper bounds a group's settings are checked against.
pub const MAX_ACK_PENDING: u32 = 100_000;
/// Longest `ack_wait` accepted.
pub const MAX_ACK_WAIT: Duration = Duration::from_secs(24 * 3600);
/// Most `backoff` entries.
pub const MAX_BACKOFF_STEPS: usize = 64;

impl GroupConfig {
    /// Checks the settings; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.ack_wait < Duration::from_millis(10) || self.ack_wait > MAX_ACK_WAIT {
            return Err("ack_wait must be between 10 ms and 24 h".into());
        }
        if self.max_deliver == 0 {
            return Err("max_deliver must be at least 1".into());
        }
        if self.max_ack_pending == 0 || self.max_ack_pending > MAX_ACK_PENDING {
            return Err(format!(
                "max_ack_pending must be between 1 and {MAX_ACK_PENDING}"
            ));
        }
        if self.backoff.len() > MAX_BACKOFF_STEPS {
            return Err(format!("at most {MAX_BACKOFF_STEPS} backoff steps"));
        }
        if self.backoff.iter().any(|d| *d > MAX_ACK_WAIT) {
            return Err("a backoff step is longer than 24 h".into());
        }
        if let Some(t) = &self.dead_letter_topic {
            super::validate_topic(t).map_err(|e| format!("dead_letter_topic: {e}"))?;
        }
        Ok(())
    }

    /// The dead-letter topic of a group on `topic`.
    pub fn dead_letter_topic_for(&self, topic: &str) -> String {
        match &self.dead_letter_topic {
            Some(t) => t.clone(),
            None => {
                let mut t = format!("{topic}.dlq");
                // A topic name near the length limit keeps its suffix.
                if t.len() > super::MAX_NAME_LEN {
                    t.replace_range(super::MAX_NAME_LEN - 4..t.len() - 4, "");
                }
                t
            }
        }
    }

    /// The delay before redelivering after attempt `attempt` failed.
    fn backoff_after(&self, attempt: u32) -> Duration {
        let i = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(i)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::ZERO)
    }
}

/// One event handed to a member.
#[derive(Debug, Clone)]
pub struct GroupDelivery {
    /// The event.
    pub event: Arc<Event>,
    /// 1 for the first delivery, +1 per redelivery.
    pub attempt: u32,
}

/// What one fetch hands out: deliveries, and gaps for work retention took.
#[derive(Debug, Default)]
pub struct Fetched {
    /// The topic's epoch.
    pub epoch: u64,
    /// Events, redeliveries first, then new ones in offset order.
    pub deliveries: Vec<GroupDelivery>,
    /// Work lost to retention before it was done (each reported once, to
    /// one member): `requested` is the offset before the lost range,
    /// `first_available` the one after it.
    pub gaps: Vec<Gap>,
}

impl Fetched {
    /// Whether nothing was handed out.
    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty() && self.gaps.is_empty()
    }
}

/// What became of the offsets of an ack, nack, in-progress or term.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// Offsets the request applied to.
    pub applied: u64,
    /// Offsets already done (acked, dead-lettered or lost): nothing to do.
    pub already_done: u64,
    /// Offsets never handed out (or, for a nack or in-progress, not in
    /// flight): ignored.
    pub unknown: u64,
}

/// One member of a group, as [`GroupInfo`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// The consumer name.
    pub consumer: String,
    /// Live TCP sessions joined under this name (0 for HTTP workers).
    pub sessions: u32,
    /// Events it holds unacked.
    pub in_flight: u32,
    /// Most events it may hold.
    pub max_in_flight: u32,
    /// Milliseconds since it last fetched, acked or joined.
    pub idle_ms: u64,
}

/// One pending event, as [`GroupInfo`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingInfo {
    /// The event's offset.
    pub offset: u64,
    /// Deliveries so far.
    pub attempt: u32,
    /// The member holding it, if it is in flight.
    pub consumer: Option<String>,
    /// Milliseconds until its deadline (in flight) or its redelivery (waiting).
    pub due_in_ms: u64,
    /// When it was first delivered, in ms since the Unix epoch.
    pub first_delivered_ms: u64,
}

/// A group's state and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The topic.
    pub topic: String,
    /// The group's name.
    pub group: String,
    /// Its settings.
    pub config: GroupConfig,
    /// The dead-letter topic it uses.
    pub dead_letter_topic: String,
    /// The topic's epoch.
    pub epoch: u64,
    /// Every offset at or below it is done.
    pub ack_floor: u64,
    /// The next offset never handed out.
    pub next_offset: u64,
    /// The topic's last offset.
    pub last_offset: u64,
    /// Events not yet handed out (`last_offset + 1 - next_offset`).
    pub lag: u64,
    /// Events handed out and not done.
    pub pending: u64,
    /// Of those, held by a member now.
    pub in_flight: u64,
    /// Age of the oldest pending event (since its first delivery), in ms.
    pub oldest_pending_ms: u64,
    /// Members.
    pub members: Vec<MemberInfo>,
    /// Deliveries (first ones and redeliveries).
    pub delivered: u64,
    /// Redeliveries.
    pub redelivered: u64,
    /// Events acked.
    pub acked: u64,
    /// Events appended to the dead-letter topic.
    pub dead_lettered: u64,
    /// Events lost to retention before they were done.
    pub lost: u64,
    /// The oldest pending events (up to 100).
    pub pending_sample: Vec<PendingInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Held by `consumer` until `deadline`.
    InFlight {
        consumer: Arc<str>,
        deadline: Instant,
    },
    /// To be redelivered at `due`.
    Waiting { due: Instant },
    /// To be redelivered now (in `ready`).
    Ready,
    /// To be appended to the dead-letter topic (`publishing` while it is).
    Dead { reason: String, publishing: bool },
}

#[derive(Debug, Clone)]
struct Entry {
    attempt: u32,
    first_ms: u64,
    state: State,
}

#[derive(Debug, Default)]
struct Member {
    sessions: u32,
    in_flight: u32,
    max_in_flight: u32,
    seen: Option<Instant>,
}

/// Counters of a group (persisted with it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stats {
    pub delivered: u64,
    pub redelivered: u64,
    pub acked: u64,
    pub dead_lettered: u64,
    pub lost: u64,
}

/// Disjoint, non-adjacent inclusive ranges of done offsets above the floor.
#[derive(Debug, Default, Clone)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn contains(&self, o: u64) -> bool {
        self.0.range(..=o).next_back().is_some_and(|(_, &e)| e >= o)
    }

    fn insert(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e.saturating_add(1) >= start {
                start = s;
                end = end.max(e);
                self.0.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.0.range(start..).next() {
            if s > end.saturating_add(1) {
                break;
            }
            end = end.max(e);
            self.0.remove(&s);
        }
        self.0.insert(start, end);
    }

    /// Takes the range starting right after `floor`, if any: the new floor.
    fn absorb(&mut self, floor: u64) -> u64 {
        match self.0.remove(&(floor + 1)) {
            Some(end) => end,
            None => floor,
        }
    }
}

/// A dead letter to append: the event, its attempts and why.
#[derive(Debug)]
pub(crate) struct DeadLetter {
    pub offset: u64,
    pub attempt: u32,
    pub reason: String,
    pub event: Arc<Event>,
}

/// The mutable part of a group.
#[derive(Debug)]
pub(crate) struct GroupState {
    pub config: GroupConfig,
    /// The topic incarnation the group belongs to.
    pub generation: u64,
    pub created_ms: u64,
    next: u64,
    floor: u64,
    done: Ranges,
    pending: BTreeMap<u64, Entry>,
    /// `(when, offset)`: in-flight deadlines and waiting due times; stale
    /// entries (the state moved on) are skipped when they fire.
    timers: BTreeSet<(Instant, u64)>,
    /// Offsets to redeliver now, lowest first.
    ready: BTreeSet<u64>,
    members: HashMap<Arc<str>, Member>,
    /// Gaps not yet handed to a member.
    gaps: Vec<(u64, u64)>,
    pub stats: Stats,
    /// Dead-letter offsets (state `Dead`, not publishing).
    dead: BTreeSet<u64>,
    /// Room opened for a member that may be waiting for it: a holder at
    /// its `max_in_flight`, or the group at `max_ack_pending`, lost one.
    unblocked: bool,
}

/// A group: its state, and the waiters for work.
#[derive(Debug)]
pub(crate) struct Group {
    pub topic: Arc<Topic>,
    pub name: Arc<str>,
    pub state: parking_lot::Mutex<GroupState>,
    /// Woken when work may be available (acks, nacks, timers, joins).
    pub notify: Notify,
    /// Changed since it was last handed to the store.
    pub dirty: AtomicBool,
    /// The group (or its topic) was deleted.
    pub deleted: AtomicBool,
}

impl GroupState {
    /// A new group on a topic whose state is `topic`.
    pub fn new(config: GroupConfig, topic: &TopicState, now_ms: u64) -> Self {
        let next = match config.start {
            GroupStart::Earliest => topic.first_offset(),
            GroupStart::Live => topic.next_offset(),
            GroupStart::AfterOffset(o) => o.saturating_add(1).min(topic.next_offset()),
        }
        .max(1);
        Self {
            config,
            generation: topic.generation,
            created_ms: now_ms,
            next,
            floor: next - 1,
            done: Ranges::default(),
            pending: BTreeMap::new(),
            timers: BTreeSet::new(),
            ready: BTreeSet::new(),
            members: HashMap::new(),
            gaps: Vec::new(),
            stats: Stats::default(),
            dead: BTreeSet::new(),
            unblocked: false,
        }
    }

    /// The first offset not yet done: what `retain_until_acked` keeps.
    pub fn first_undone(&self) -> u64 {
        self.floor + 1
    }

    /// The earliest timer, if any.
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// Whether dead letters wait to be appended.
    pub fn has_dead(&self) -> bool {
        !self.dead.is_empty()
    }

    fn is_done(&self, o: u64) -> bool {
        o <= self.floor || self.done.contains(o)
    }

    fn mark_done(&mut self, o: u64) {
        self.clear_timer(o);
        self.unblocked |= self.pending.len() >= self.config.max_ack_pending as usize;
        self.pending.remove(&o);
        self.ready.remove(&o);
        self.dead.remove(&o);
        self.mark_range_done(o, o);
    }

    fn mark_range_done(&mut self, start: u64, end: u64) {
        if end <= self.floor {
            return;
        }
        let start = start.max(self.floor + 1);
        if start == self.floor + 1 {
            self.floor = end;
        } else {
            self.done.insert(start, end);
        }
        loop {
            let f = self.done.absorb(self.floor);
            if f == self.floor {
                break;
            }
            self.floor = f;
        }
        // Ranges now at or below the floor cannot exist: they would have
        // been absorbed (ranges are non-adjacent and above the floor).
    }

    fn member(&mut self, consumer: &Arc<str>) -> &mut Member {
        let default_max = self.config.max_ack_pending;
        self.members
            .entry(consumer.clone())
            .or_insert_with(|| Member {
                max_in_flight: default_max,
                ..Member::default()
            })
    }

    /// Removes the timer of entry `o` (its deadline or due time), so that
    /// `timers` holds one entry per in-flight or waiting event and never
    /// grows with stale ones. Call before the entry's state changes.
    fn clear_timer(&mut self, o: u64) {
        let at = match self.pending.get(&o).map(|e| &e.state) {
            Some(State::InFlight { deadline, .. }) => *deadline,
            Some(State::Waiting { due }) => *due,
            _ => return,
        };
        self.timers.remove(&(at, o));
    }

    /// Queues a lost range for the next fetch, merged with the previous
    /// one when they touch (one gap per contiguous loss).
    /// At most [`MAX_GAPS`] are held: beyond, the last one is widened to
    /// cover the new loss too (reporting the done offsets between them as
    /// lost as well: too much, never too little).
    fn push_gap(&mut self, from: u64, to: u64) {
        let full = self.gaps.len() >= MAX_GAPS;
        if let Some(last) = self.gaps.last_mut() {
            if last.1.checked_add(1) == Some(from) || full {
                last.1 = last.1.max(to);
                return;
            }
        }
        self.gaps.push((from, to));
    }

    /// The entry at `o` leaves the in-flight state: its holder gets room.
    fn leave_flight(&mut self, o: u64) {
        let holder = match self.pending.get(&o).map(|e| &e.state) {
            Some(State::InFlight { consumer, .. }) => consumer.clone(),
            _ => return,
        };
        if let Some(m) = self.members.get_mut(&holder) {
            self.unblocked |= m.in_flight >= m.max_in_flight;
            m.in_flight = m.in_flight.saturating_sub(1);
        }
    }

    /// Whether room opened for a waiting member since the last call.
    pub fn take_unblocked(&mut self) -> bool {
        std::mem::take(&mut self.unblocked)
    }

    /// Moves entry `o` (not in flight any more) towards its next delivery
    /// after attempt failure: dead when its attempts are spent, else
    /// waiting `delay` (or the backoff), or ready.
    fn retry(&mut self, o: u64, delay: Option<Duration>, now: Instant, why: &str) {
        let Some(e) = self.pending.get(&o) else {
            return;
        };
        let attempt = e.attempt;
        let state = if attempt >= self.config.max_deliver {
            self.dead.insert(o);
            State::Dead {
                reason: why.to_owned(),
                publishing: false,
            }
        } else {
            // Checked at the API (`MAX_ACK_WAIT`); clamped again so that
            // no delay can overflow the instant below.
            let delay = delay
                .unwrap_or_else(|| self.config.backoff_after(attempt))
                .min(MAX_ACK_WAIT);
            if delay.is_zero() {
                self.ready.insert(o);
                State::Ready
            } else {
                let due = now + delay;
                self.timers.insert((due, o));
                State::Waiting { due }
            }
        };
        if let Some(e) = self.pending.get_mut(&o) {
            e.state = state;
        }
    }

    /// Fires every timer due at `now`. Returns whether work became
    /// available (to wake members) or dead letters are waiting.
    pub fn fire(&mut self, now: Instant) -> bool {
        let mut woke = false;
        while let Some(&(t, o)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            match self.pending.get(&o).map(|e| e.state.clone()) {
                Some(State::InFlight { deadline, .. }) if deadline == t => {
                    self.leave_flight(o);
                    self.retry(o, None, now, "max_deliver");
                    woke = true;
                }
                Some(State::Waiting { due }) if due == t => {
                    self.ready.insert(o);
                    if let Some(e) = self.pending.get_mut(&o) {
                        e.state = State::Ready;
                    }
                    woke = true;
                }
                _ => {}
            }
        }
        woke || !self.dead.is_empty()
    }

    /// Hands up to `max` events to `consumer` (within its room and the
    /// group's `max_ack_pending`): redeliveries first, then new events.
    pub fn fetch(
        &mut self,
        topic: &TopicState,
        consumer: &Arc<str>,
        max: usize,
        now: Instant,
        now_ms: u64,
    ) -> Fetched {
        self.fire(now);
        let mut out = Fetched {
            epoch: topic.epoch,
            ..Fetched::default()
        };
        let ack_wait = self.config.ack_wait;
        let member = self.member(consumer);
        member.seen = Some(now);
        let room = member.max_in_flight.saturating_sub(member.in_flight) as usize;
        let max = max.min(room);
        let first = topic.first_offset();
        let mut handed = 0u32;
        while out.deliveries.len() < max {
            let Some(o) = self.ready.pop_first() else {
                break;
            };
            match topic.get(o) {
                Some(event) => {
                    let deadline = now + ack_wait;
                    let Some(e) = self.pending.get_mut(&o) else {
                        continue;
                    };
                    e.attempt += 1;
                    e.state = State::InFlight {
                        consumer: consumer.clone(),
                        deadline,
                    };
                    let attempt = e.attempt;
                    self.timers.insert((deadline, o));
                    self.stats.redelivered += 1;
                    handed += 1;
                    out.deliveries.push(GroupDelivery {
                        event: event.clone(),
                        attempt,
                    });
                }
                None => {
                    // Retention took it before it was done.
                    self.stats.lost += 1;
                    self.push_gap(o, o);
                    self.mark_done(o);
                }
            }
        }
        let cap = self.config.max_ack_pending as usize;
        while out.deliveries.len() < max && self.pending.len() < cap {
            if self.next >= topic.next_offset() {
                break;
            }
            if self.next < first {
                let (from, to) = (self.next, first - 1);
                self.stats.lost += to - from + 1;
                self.push_gap(from, to);
                self.mark_range_done(from, to);
                self.next = first;
                continue;
            }
            let Some(event) = topic.get(self.next) else {
                break;
            };
            let o = self.next;
            self.next += 1;
            let deadline = now + ack_wait;
            self.pending.insert(
                o,
                Entry {
                    attempt: 1,
                    first_ms: now_ms,
                    state: State::InFlight {
                        consumer: consumer.clone(),
                        deadline,
                    },
                },
            );
            self.timers.insert((deadline, o));
            handed += 1;
            out.deliveries.push(GroupDelivery {
                event: event.clone(),
                attempt: 1,
            });
        }
        self.stats.delivered += u64::from(handed);
        if let Some(m) = self.members.get_mut(consumer) {
            m.in_flight += handed;
        }
        let last = topic.last_offset();
        for (from, to) in self.gaps.drain(..) {
            out.gaps.push(Gap {
                topic: String::new(),
                event_type: None,
                reason: GapReason::Retention,
                epoch: topic.epoch,
                requested: from - 1,
                first_available: to + 1,
                current: last,
            });
        }
        out
    }

    /// Acks `offsets`: each is done for the group.
    pub fn ack(&mut self, offsets: &[u64]) -> Settled {
        let mut s = Settled::default();
        for &o in offsets {
            if self.pending.contains_key(&o) {
                self.leave_flight(o);
                self.mark_done(o);
                self.stats.acked += 1;
                s.applied += 1;
            } else if self.is_done(o) {
                s.already_done += 1;
            } else {
                s.unknown += 1;
            }
        }
        s
    }

    /// Gives in-flight `offsets` back for redelivery after `delay` (or the
    /// backoff); an event whose attempts are spent goes to the dead letters.
    pub fn nack(&mut self, offsets: &[u64], delay: Option<Duration>, now: Instant) -> Settled {
        let mut s = Settled::default();
        for &o in offsets {
            match self.pending.get(&o).map(|e| &e.state) {
                Some(State::InFlight { .. }) => {
                    self.leave_flight(o);
                    self.clear_timer(o);
                    self.retry(o, delay, now, "nacked");
                    s.applied += 1;
                }
                Some(_) => s.unknown += 1,
                None if self.is_done(o) => s.already_done += 1,
                None => s.unknown += 1,
            }
        }
        s
    }

    /// Extends the deadline of in-flight `offsets` by a whole `ack_wait`.
    pub fn in_progress(&mut self, offsets: &[u64], now: Instant) -> Settled {
        let mut s = Settled::default();
        let deadline = now + self.config.ack_wait;
        for &o in offsets {
            let done = self.is_done(o);
            match self.pending.get_mut(&o) {
                Some(Entry {
                    state: State::InFlight { deadline: d, .. },
                    ..
                }) => {
                    let old = std::mem::replace(d, deadline);
                    self.timers.remove(&(old, o));
                    self.timers.insert((deadline, o));
                    s.applied += 1;
                }
                Some(_) => s.unknown += 1,
                None if done => s.already_done += 1,
                None => s.unknown += 1,
            }
        }
        s
    }

    /// Dead-letters `offsets` now, with `reason`.
    pub fn term(&mut self, offsets: &[u64], reason: &str) -> Settled {
        let mut s = Settled::default();
        for &o in offsets {
            match self.pending.get(&o).map(|e| &e.state) {
                Some(State::Dead { .. }) => s.already_done += 1,
                Some(_) => {
                    self.leave_flight(o);
                    self.clear_timer(o);
                    self.ready.remove(&o);
                    self.dead.insert(o);
                    if let Some(e) = self.pending.get_mut(&o) {
                        e.state = State::Dead {
                            reason: reason.to_owned(),
                            publishing: false,
                        };
                    }
                    s.applied += 1;
                }
                None if self.is_done(o) => s.already_done += 1,
                None => s.unknown += 1,
            }
        }
        s
    }

    /// Takes the dead letters to append (marking them as being appended);
    /// those retention already took are lost (and reported as a gap).
    pub fn take_dead(&mut self, topic: &TopicState) -> Vec<DeadLetter> {
        let mut out = Vec::new();
        for o in std::mem::take(&mut self.dead) {
            let Some(entry) = self.pending.get_mut(&o) else {
                continue;
            };
            let State::Dead { reason, publishing } = &mut entry.state else {
                continue;
            };
            match topic.get(o) {
                Some(event) => {
                    *publishing = true;
                    out.push(DeadLetter {
                        offset: o,
                        attempt: entry.attempt,
                        reason: reason.clone(),
                        event: event.clone(),
                    });
                }
                None => {
                    self.stats.lost += 1;
                    self.push_gap(o, o);
                    self.mark_done(o);
                }
            }
        }
        out
    }

    /// The dead letter at `o` was appended (`ok`) or must be tried again.
    pub fn dead_lettered(&mut self, o: u64, ok: bool) {
        let Some(Entry {
            state: State::Dead { publishing, .. },
            ..
        }) = self.pending.get_mut(&o)
        else {
            return;
        };
        if ok {
            self.mark_done(o);
            self.stats.dead_lettered += 1;
        } else {
            *publishing = false;
            self.dead.insert(o);
        }
    }

    /// A TCP session of `consumer` joins, allowed `max_in_flight` events.
    pub fn join(&mut self, consumer: &Arc<str>, max_in_flight: u32, now: Instant) {
        let m = self.member(consumer);
        m.sessions += 1;
        if max_in_flight > 0 {
            m.max_in_flight = max_in_flight;
        }
        m.seen = Some(now);
    }

    /// Sets the room of an HTTP worker (0 = the group's `max_ack_pending`).
    pub fn set_room(&mut self, consumer: &Arc<str>, max_in_flight: u32) {
        let cap = self.config.max_ack_pending;
        let m = self.member(consumer);
        m.max_in_flight = if max_in_flight == 0 {
            cap
        } else {
            max_in_flight
        };
    }

    /// A session of `consumer` ends. On a clean leave of its last session
    /// its in-flight events are redelivered at once; otherwise they wait
    /// for their deadlines. Returns whether work became available.
    pub fn leave(&mut self, consumer: &str, clean: bool, now: Instant) -> bool {
        let Some(m) = self.members.get_mut(consumer) else {
            return false;
        };
        m.sessions = m.sessions.saturating_sub(1);
        m.seen = Some(now);
        if m.sessions > 0 || !clean {
            return false;
        }
        let held: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, e)| matches!(&e.state, State::InFlight { consumer: c, .. } if &**c == consumer))
            .map(|(o, _)| *o)
            .collect();
        for &o in &held {
            self.leave_flight(o);
            self.clear_timer(o);
            // Handed back at once, but still an attempt spent: an event
            // whose worker dies on it every time ends in the dead letters.
            self.retry(o, Some(Duration::ZERO), now, "max_deliver");
        }
        !held.is_empty()
    }

    /// Whether `consumer` is a member already.
    pub fn knows(&self, consumer: &str) -> bool {
        self.members.contains_key(consumer)
    }

    /// How many consumer names the group knows.
    pub fn members_len(&self) -> usize {
        self.members.len()
    }

    /// Forgets members with no session, nothing in flight and no activity
    /// for `idle`.
    pub fn forget_idle(&mut self, now: Instant, idle: Duration) {
        self.members.retain(|_, m| {
            m.sessions > 0
                || m.in_flight > 0
                || m.seen
                    .is_some_and(|s| now.saturating_duration_since(s) < idle)
        });
    }

    /// The report for [`GroupInfo`].
    pub fn info(
        &self,
        topic_name: &str,
        group: &str,
        topic: &TopicState,
        now: Instant,
        now_ms: u64,
    ) -> GroupInfo {
        let in_flight = self
            .pending
            .values()
            .filter(|e| matches!(e.state, State::InFlight { .. }))
            .count() as u64;
        let oldest = self.pending.values().map(|e| e.first_ms).min();
        let mut members: Vec<MemberInfo> = self
            .members
            .iter()
            .map(|(c, m)| MemberInfo {
                consumer: c.to_string(),
                sessions: m.sessions,
                in_flight: m.in_flight,
                max_in_flight: m.max_in_flight,
                idle_ms: m.seen.map_or(0, |s| ms(now.saturating_duration_since(s))),
            })
            .collect();
        members.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        let pending_sample = self
            .pending
            .iter()
            .take(100)
            .map(|(o, e)| {
                let (consumer, due) = match &e.state {
                    State::InFlight { consumer, deadline } => {
                        (Some(consumer.to_string()), Some(*deadline))
                    }
                    State::Waiting { due } => (None, Some(*due)),
                    State::Ready | State::Dead { .. } => (None, None),
                };
                PendingInfo {
                    offset: *o,
                    attempt: e.attempt,
                    consumer,
                    due_in_ms: due.map_or(0, |d| ms(d.saturating_duration_since(now))),
                    first_delivered_ms: e.first_ms,
                }
            })
            .collect();
        let last = topic.last_offset();
        GroupInfo {
            topic: topic_name.to_owned(),
            group: group.to_owned(),
            dead_letter_topic: self.config.dead_letter_topic_for(topic_name),
            config: self.config.clone(),
            epoch: topic.epoch,
            ack_floor: self.floor,
            next_offset: self.next,
            last_offset: last,
            lag: (last + 1).saturating_sub(self.next),
            pending: self.pending.len() as u64,
            in_flight,
            oldest_pending_ms: oldest.map_or(0, |t| now_ms.saturating_sub(t)),
            members,
            delivered: self.stats.delivered,
            redelivered: self.stats.redelivered,
            acked: self.stats.acked,
            dead_lettered: self.stats.dead_lettered,
            lost: self.stats.lost,
            pending_sample,
        }
    }

    /// The persisted form; deadlines become wall-clock times.
    pub fn record(&self, now: Instant, now_ms: u64) -> GroupRecord {
        let wall = |t: Instant| {
            if t >= now {
                now_ms.saturating_add(ms(t - now))
            } else {
                now_ms.saturating_sub(ms(now - t))
            }
        };
        GroupRecord {
            generation: self.generation,
            created_ms: self.created_ms,
            config: StoredConfig::from(&self.config),
            next: self.next,
            floor: self.floor,
            done: self.done.0.iter().map(|(s, e)| (*s, *e)).collect(),
            pending: self
                .pending
                .iter()
                .map(|(o, e)| {
                    let (kind, due_ms, consumer, reason) = match &e.state {
                        State::InFlight { consumer, deadline } => {
                            (0u8, wall(*deadline), consumer.to_string(), String::new())
                        }
                        State::Waiting { due } => (1, wall(*due), String::new(), String::new()),
                        State::Ready => (2, now_ms, String::new(), String::new()),
                        State::Dead { reason, .. } => (3, now_ms, String::new(), reason.clone()),
                    };
                    StoredPending {
                        offset: *o,
                        attempt: e.attempt,
                        first_ms: e.first_ms,
                        kind,
                        due_ms,
                        consumer,
                        reason,
                    }
                })
                .collect(),
            stats: self.stats,
            gaps: self.gaps.clone(),
        }
    }

    /// Fits a recovered group to its topic, whose next offset is
    /// `next_offset`. After an unclean stop in `interval` mode the topic
    /// can come back shorter than the group saw it (with a new epoch):
    /// offsets at or past its end will name new events, so the group's
    /// cursor, floor and pending work are cut back to it. Returns how many
    /// offsets the group forgot.
    pub fn fit_to(&mut self, next_offset: u64) -> u64 {
        let next_offset = next_offset.max(1);
        if self.next <= next_offset {
            return 0;
        }
        let forgot = self.next - next_offset;
        self.next = next_offset;
        self.floor = self.floor.min(next_offset - 1);
        let done: Vec<(u64, u64)> = self.done.0.iter().map(|(a, b)| (*a, *b)).collect();
        self.done = Ranges::default();
        for (a, b) in done {
            if a < next_offset {
                self.done.insert(a, b.min(next_offset - 1));
            }
        }
        let cut: Vec<u64> = self.pending.range(next_offset..).map(|(o, _)| *o).collect();
        for o in cut {
            self.leave_flight(o);
            self.pending.remove(&o);
            self.ready.remove(&o);
            self.dead.remove(&o);
        }
        self.timers.retain(|(_, o)| *o < next_offset);
        self.gaps.retain(|(a, _)| *a < next_offset);
        for g in &mut self.gaps {
            g.1 = g.1.min(next_offset - 1);
        }
        forgot
    }

    /// The state a record describes, as of `now` / `now_ms`.
    pub fn from_record(r: GroupRecord, now: Instant, now_ms: u64) -> Self {
        let mut s = Self {
            config: r.config.into(),
            generation: r.generation,
            created_ms: r.created_ms,
            next: r.next.max(1),
            floor: r.floor.min(r.next.saturating_sub(1)),
            done: Ranges::default(),
            pending: BTreeMap::new(),
            timers: BTreeSet::new(),
            ready: BTreeSet::new(),
            members: HashMap::new(),
            gaps: Vec::new(),
            stats: r.stats,
            dead: BTreeSet::new(),
            unblocked: false,
        };
        for (a, b) in r.gaps {
            if a <= b {
                s.push_gap(a, b);
            }
        }
        for (a, b) in r.done {
            if a > s.floor && a <= b && b < s.next {
                s.done.insert(a, b);
            }
        }
        // Deadlines and due times are at most `MAX_ACK_WAIT` ahead; a
        // record (or a clock) saying otherwise must not overflow `now + d`.
        let instant =
            |wall: u64| now + Duration::from_millis(wall.saturating_sub(now_ms)).min(MAX_ACK_WAIT);
        for p in r.pending {
            if p.offset <= s.floor || p.offset >= s.next || s.done.contains(p.offset) {
                continue;
            }
            let state = match p.kind {
                0 => {
                    let deadline = instant(p.due_ms);
                    s.timers.insert((deadline, p.offset));
                    let consumer: Arc<str> = Arc::from(p.consumer.as_str());
                    s.member(&consumer).in_flight += 1;
                    State::InFlight { consumer, deadline }
                }
                1 => {
                    let due = instant(p.due_ms);
                    s.timers.insert((due, p.offset));
                    State::Waiting { due }
                }
                3 => {
                    s.dead.insert(p.offset);
                    State::Dead {
                        reason: p.reason,
                        publishing: false,
                    }
                }
                _ => {
                    s.ready.insert(p.offset);
                    State::Ready
                }
            };
            s.pending.insert(
                p.offset,
                Entry {
                    attempt: p.attempt.max(1),
                    first_ms: p.first_ms,
                    state,
                },
            );
        }
        // An offset below `next` that is neither done nor pending was handed
        // out in a pass that a crash lost: hand it out again. Only the holes
        // between the done ranges are walked (pending ones and such), not
        // every offset above the floor.
        let mut holes = Vec::new();
        let mut from = s.floor + 1;
        for (&a, &b) in s.done.0.iter().chain(std::iter::once((&s.next, &s.next))) {
            holes.push(from..a.min(s.next));
            from = b.saturating_add(1);
        }
        for o in holes.into_iter().flatten() {
            if let std::collections::btree_map::Entry::Vacant(slot) = s.pending.entry(o) {
                slot.insert(Entry {
                    attempt: 0,
                    first_ms: now_ms,
                    state: State::Ready,
                });
                s.ready.insert(o);
            }
        }
        s
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A group's settings as stored (durations in ms).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredConfig {
    start: GroupStart,
    ack_wait_ms: u64,
    max_deliver: u32,
    backoff_ms: Vec<u64>,
    max_ack_pending: u32,
    dead_letter_topic: Option<String>,
}

impl From<&GroupConfig> for StoredConfig {
    fn from(c: &GroupConfig) -> Self {
        Self {
            start: c.start,
            ack_wait_ms: ms(c.ack_wait),
            max_deliver: c.max_deliver,
            backoff_ms: c.backoff.iter().map(|d| ms(*d)).collect(),
            max_ack_pending: c.max_ack_pending,
            dead_letter_topic: c.dead_letter_topic.clone(),
        }
    }
}

impl From<StoredConfig> for GroupConfig {
    fn from(c: StoredConfig) -> Self {
        Self {
            start: c.start,
            ack_wait: Duration::from_millis(c.ack_wait_ms),
            max_deliver: c.max_deliver.max(1),
            backoff: c
                .backoff_ms
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            max_ack_pending: c.max_ack_pending.max(1),
            dead_letter_topic: c.dead_letter_topic,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredPending {
    offset: u64,
    attempt: u32,
    first_ms: u64,
    /// 0 in flight, 1 waiting, 2 ready, 3 dead.
    kind: u8,
    due_ms: u64,
    consumer: String,
    reason: String,
}

/// A group as stored: everything but its members.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GroupRecord {
    pub generation: u64,
    created_ms: u64,
    config: StoredConfig,
    next: u64,
    floor: u64,
    done: Vec<(u64, u64)>,
    pending: Vec<StoredPending>,
    stats: Stats,
    /// Lost ranges not yet reported to a member: stored, so that a crash
    /// before the next fetch does not make the loss silent.
    gaps: Vec<(u64, u64)>,
}

impl Group {
    /// Marks the group changed; returns whether it was clean before (the
    /// caller then queues it for the store).
    pub fn touch(&self) -> bool {
        !self.dirty.swap(true, Ordering::AcqRel)
    }
}

/// Checks a group or consumer name: the topic-name alphabet, 1–255 bytes.
pub fn valid_group_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= super::MAX_NAME_LEN && name.chars().all(super::is_topic_char)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_ranges_merge_and_are_absorbed_by_the_floor() {
        let mut r = Ranges::default();
        r.insert(5, 6);
        r.insert(8, 9);
        assert!(r.contains(5) && r.contains(9) && !r.contains(7));
        r.insert(7, 7);
        assert_eq!(r.0.len(), 1);
        assert_eq!(r.absorb(4), 9);
        assert!(r.0.is_empty());
    }

    #[test]
    fn backoff_repeats_its_last_step() {
        let c = GroupConfig {
            backoff: vec![Duration::from_secs(1), Duration::from_secs(5)],
            ..GroupConfig::default()
        };
        assert_eq!(c.backoff_after(1), Duration::from_secs(1));
        assert_eq!(c.backoff_after(2), Duration::from_secs(5));
        assert_eq!(c.backoff_after(9), Duration::from_secs(5));
        assert_eq!(GroupConfig::default().backoff_after(1), Duration::ZERO);
    }

    fn topic_with(n: u64) -> TopicState {
        let retention = super::super::TopicsConfig::default().retention_for("t");
        let mut t = TopicState::new(1, retention, Default::default());
        let events = (1..=n).map(|o| {
            Arc::new(Event::new(
                o,
                o,
                0,
                Arc::from("e"),
                Vec::new(),
                bytes::Bytes::new(),
            ))
        });
        t.push(events, 0);
        t
    }

    /// A topic of `n` events, a new group on it with the default settings,
    /// a consumer name and the instant the test acts at.
    fn setup(n: u64) -> (TopicState, GroupState, Arc<str>, Instant) {
        let topic = topic_with(n);
        let g = GroupState::new(GroupConfig::default(), &topic, 0);
        (topic, g, Arc::from("w"), Instant::now())
    }

    #[test]
    fn settled_entries_leave_no_timers_behind() {
        let (topic, mut g, w, now) = setup(1005);
        for round in 0..10u64 {
            let f = g.fetch(&topic, &w, 100, now, 0);
            let offsets: Vec<u64> = f.deliveries.iter().map(|d| d.event.offset).collect();
            assert_eq!(offsets.len(), 100);
            // Acks, nacks (waiting on a delay), terms and a clean leave all
            // change an entry's state: none may leave a stale timer.
            g.nack(&offsets[..10], Some(Duration::from_secs(60)), now);
            g.term(&offsets[10..20], "x");
            g.ack(&offsets[20..]);
            g.ack(&offsets[..10]);
            assert_eq!(g.timers.len(), 0, "round {round}");
            assert!(g.take_dead(&topic).len() == 10);
            for o in &offsets[10..20] {
                g.dead_lettered(*o, true);
            }
            assert_eq!(g.pending.len(), 0);
        }
        let f = g.fetch(&topic, &w, 5, now, 0);
        assert_eq!(g.timers.len(), 5);
        g.join(&w, 0, now);
        assert!(g.leave("w", true, now));
        assert_eq!(g.timers.len(), 0);
        assert_eq!(g.ready.len(), f.deliveries.len());
    }

    #[test]
    fn lost_neighbours_are_reported_as_one_gap() {
        let mut g = GroupState::new(GroupConfig::default(), &topic_with(1), 0);
        g.push_gap(1, 1);
        g.push_gap(2, 2);
        g.push_gap(3, 9);
        g.push_gap(12, 12);
        assert_eq!(g.gaps, vec![(1, 9), (12, 12)]);
    }

    #[test]
    fn recovery_hands_out_again_what_a_lost_pass_had_handed_out() {
        let (topic, mut g, w, now) = setup(10);
        g.fetch(&topic, &w, 10, now, 0);
        g.ack(&[1, 2, 5, 6, 9]);
        let mut record = g.record(now, 0);
        // As if the record of a later pass was lost: 3 and 8 are missing.
        record.pending.retain(|p| p.offset != 3 && p.offset != 8);
        let back = GroupState::from_record(record, now, 0);
        assert_eq!(back.floor, 2);
        assert_eq!(back.ready.iter().copied().collect::<Vec<_>>(), vec![3, 8]);
        assert_eq!(back.pending.len(), 5);
        assert_eq!(back.timers.len(), 3);
    }

    #[test]
    fn a_group_ahead_of_its_recovered_topic_is_cut_back_to_its_end() {
        let (topic, mut g, w, now) = setup(10);
        g.fetch(&topic, &w, 10, now, 0);
        g.ack(&[1, 2, 3, 5, 8, 9]);
        // The topic came back with 6 events: offsets 7.. will be new ones.
        assert_eq!(g.fit_to(7), 4);
        assert_eq!((g.next, g.floor), (7, 3));
        assert!(g.done.contains(5) && !g.done.contains(8));
        assert_eq!(g.pending.keys().copied().collect::<Vec<_>>(), vec![4, 6]);
        assert_eq!(g.timers.len(), 2);
        assert_eq!(g.members[&w].in_flight, 2);
        assert_eq!(g.fit_to(7), 0);
    }

    #[test]
    fn a_record_with_a_far_deadline_does_not_overflow() {
        let (topic, mut g, w, now) = setup(1);
        g.fetch(&topic, &w, 1, now, 0);
        let mut record = g.record(now, 0);
        record.pending[0].due_ms = u64::MAX;
        let back = GroupState::from_record(record, now, 0);
        assert_eq!(back.next_timer(), Some(now + MAX_ACK_WAIT));
    }

    #[test]
    fn a_long_topic_name_keeps_the_dlq_suffix_within_the_limit() {
        let topic = "t".repeat(255);
        let dlq = GroupConfig::default().dead_letter_topic_for(&topic);
        assert_eq!(dlq.len(), 255);
        assert!(dlq.ends_with(".dlq"));
    }
}
