//! One subscription over many topics: named topics and topic patterns.
//!
//! Each member topic has a [`Subscription`] of its own, so replay, gaps and
//! ends are exactly those of a single-topic subscription; this type merges
//! them fairly (round robin over the members with something ready) and
//! keeps every member's position (epoch, last offset delivered), from which
//! a front end builds the id a client resumes every topic with.
//!
//! Patterns: the topics matching one when it opens join as the start says
//! (or at their resume position); a topic stored later (created, or its
//! first event) that matches joins from its first event. Ephemeral topics
//! (created by a subscribe, never published to) are not joined until they
//! hold an event, so a pattern stream never keeps one alive.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use futures_util::stream::{BoxStream, SelectAll};
use futures_util::StreamExt;
use tokio::sync::{broadcast, watch};

use super::event::{Delivery, Gap, GapReason, Start};
use super::subscription::Subscription;
use super::{valid_name, validate_topic, Engine, EngineError};
use crate::auth::TopicPattern;

/// Who may read a topic a pattern matches (topics the caller may not read
/// are left out of the stream).
pub type TopicFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Where one member topic of a multi-topic subscription stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The topic's epoch the offset belongs to.
    pub epoch: u64,
    /// The last offset delivered (or skipped), 0 before the first.
    pub offset: u64,
    /// The topic ended (sealed or deleted) at that position.
    pub ended: bool,
}

/// What a multi-topic subscription reads and where it starts.
pub struct Selection {
    /// Named topics, in the order the client gave them (duplicates dropped).
    pub topics: Vec<String>,
    /// Topic patterns (see [`TopicPattern`]), in the client's order.
    pub patterns: Vec<TopicPattern>,
    /// Event types to deliver; empty = all.
    pub types: Vec<String>,
    /// Resume positions by topic name; a topic without one starts at `fresh`
    /// (or, for a pattern match when `resumed`, at its first event).
    pub positions: HashMap<String, Position>,
    /// Start of a topic without a position: [`Start::Live`] or [`Start::Earliest`].
    pub fresh: Start,
    /// The positions are a resume: a pattern match missing from them was
    /// stored after they were taken, so it starts from its first event.
    pub resumed: bool,
    /// Most topics the patterns may bring in (ended ones included).
    pub max_matches: usize,
    /// Which pattern matches the caller may read.
    pub allow: TopicFilter,
}

/// What [`MultiSubscription::recv`] hands out.
#[derive(Debug)]
pub enum MultiDelivery {
    /// A delivery of member `member` (see [`MultiSubscription::member`]).
    Topic {
        /// The member it belongs to.
        member: usize,
        /// The delivery, as a single-topic subscription gives it.
        delivery: Delivery,
    },
    /// The patterns match more than `max_matches` topics: the subscription
    /// ends here (a resume is refused the same way, explicitly).
    TooManyMatches {
        /// The limit.
        limit: usize,
    },
}

/// One member topic.
#[derive(Debug)]
pub struct Member {
    /// The topic's name.
    pub name: Arc<str>,
    /// Index of the pattern that brought it in; `None` for a named topic.
    pub pattern: Option<usize>,
    /// Its position (what the client has).
    pub position: Position,
    sub: Option<Subscription>,
}

/// A subscription over named topics and patterns (see the module docs).
/// Dropping it unsubscribes from every member.
pub struct MultiSubscription {
    engine: Engine,
    types: Vec<String>,
    patterns: Vec<TopicPattern>,
    allow: TopicFilter,
    max_matches: usize,
    /// Members by index; named topics first, at their index in the selection.
    members: Vec<Option<Member>>,
    free: Vec<usize>,
    by_name: HashMap<Arc<str>, usize>,
    /// Members that may have a delivery ready, in turn.
    ready: VecDeque<usize>,
    /// Yields a member's index when its topic committed something.
    wakes: SelectAll<BoxStream<'static, usize>>,
    /// Names of topics stored since the last look (patterns only).
    created: Option<broadcast::Receiver<Arc<str>>>,
    /// Deliveries decided at open (gaps of topics gone while away).
    pending: VecDeque<(usize, Delivery)>,
    pattern_members: usize,
    overflowed: bool,
    overflow_told: bool,
}

impl std::fmt::Debug for MultiSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiSubscription")
            .field("members", &self.by_name.len())
            .field("patterns", &self.patterns.len())
            .finish()
    }
}

fn wake_stream(member: usize, rx: watch::Receiver<u64>) -> BoxStream<'static, usize> {
    futures_util::stream::unfold(rx, move |mut rx| async move {
        rx.changed().await.ok()?;
        Some((member, rx))
    })
    .boxed()
}

impl Engine {
    /// Subscribes to every topic of `selection` (see [`MultiSubscription`]).
    /// A named topic is looked up (or created) as [`subscribe`](Self::subscribe)
    /// does; a resume position it cannot honour is an error, as there.
    pub fn subscribe_many(&self, selection: Selection) -> Result<MultiSubscription, EngineError> {
        let Selection {
            topics,
            patterns,
            types,
            positions,
            fresh,
            resumed,
            max_matches,
            allow,
        } = selection;
        for t in &topics {
            validate_topic(t)?;
        }
        if let Some(bad) = types.iter().find(|t| !valid_name(t)) {
            return Err(EngineError::InvalidType(bad.chars().take(300).collect()));
        }
        // Before the scan: a topic stored while we scan is seen in one of both.
        let created = (!patterns.is_empty()).then(|| self.inner.registry.created.subscribe());
        let mut multi = MultiSubscription {
            engine: self.clone(),
            types,
            patterns,
            allow,
            max_matches,
            members: Vec::new(),
            free: Vec::new(),
            by_name: HashMap::new(),
            ready: VecDeque::new(),
            wakes: SelectAll::new(),
            created,
            pending: VecDeque::new(),
            pattern_members: 0,
            overflowed: false,
            overflow_told: false,
        };
        for name in topics {
            if multi.by_name.contains_key(name.as_str()) {
                continue;
            }
            let name: Arc<str> = Arc::from(name);
            let member = match positions.get(&*name) {
                // A named topic's end is final for the stream, as on a
                // single-topic stream (a topic of that name created since is
                // another topic: a pattern follows those, a name does not).
                Some(p) if p.ended => Member {
                    name,
                    pattern: None,
                    position: *p,
                    sub: None,
                },
                Some(p) => match multi.engine.stored(&name) {
                    // The topic did not exist yet: from its first event.
                    _ if p.epoch == 0 => {
                        let start = match multi.engine.stored(&name) {
                            Some((topic, epoch)) => Start::AfterOffset {
                                epoch,
                                offset: topic.state.read().first_offset() - 1,
                            },
                            None => Start::Earliest,
                        };
                        multi.open_named(name, start, Position::default())?
                    }
                    Some((topic, epoch)) if epoch != p.epoch => {
                        let start = multi.restarted(&name, p, &topic, epoch);
                        multi.open_named(name, start, Position::default())?
                    }
                    _ => {
                        let start = Start::AfterOffset {
                            epoch: p.epoch,
                            offset: p.offset,
                        };
                        multi.open_named(name, start, *p)?
                    }
                },
                None => multi.open_named(name, fresh.clone(), Position::default())?,
            };
            multi.insert(member);
        }
        if multi.patterns.is_empty() {
            return Ok(multi);
        }
        // Pattern members with a resume position first, whether their topic
        // still exists or not.
        let mut resumes: Vec<(&String, &Position)> = positions
            .iter()
            .filter(|(name, _)| !multi.by_name.contains_key(name.as_str()))
            .collect();
        resumes.sort();
        for (name, p) in resumes {
            let Some(pattern) = multi.pattern_of(name) else {
                continue;
            };
            let name: Arc<str> = Arc::from(name.as_str());
            let topic = multi.engine.stored(&name);
            let member = match topic {
                Some((_, epoch)) if p.ended && epoch == p.epoch => Member {
                    name,
                    pattern: Some(pattern),
                    position: *p,
                    sub: None,
                },
                // Ended, and gone or re-created: the scan brings a new one in.
                _ if p.ended => continue,
                Some((topic, epoch)) => {
                    let (start, position) = if epoch == p.epoch {
                        let start = Start::AfterOffset {
                            epoch,
                            offset: p.offset,
                        };
                        (start, *p)
                    } else {
                        let start = multi.restarted(&name, p, &topic, epoch);
                        (start, Position::default())
                    };
                    match multi.open_stored(&name, start) {
                        Ok(Some(sub)) => Member {
                            position: multi.start_position(&sub, position),
                            name,
                            pattern: Some(pattern),
                            sub: Some(sub),
                        },
                        Ok(None) => multi.vanished(name, pattern, p),
                        Err(e) => return Err(e),
                    }
                }
                None => multi.vanished(name, pattern, p),
            };
            multi.insert_pattern(member)?;
        }
        let first_event = if resumed { None } else { Some(fresh.clone()) };
        for name in multi.engine.topic_names() {
            multi.join(name, first_event.clone())?;
        }
        Ok(multi)
    }

    /// Every topic's name now (a copy: joining one takes map locks).
    fn topic_names(&self) -> Vec<Arc<str>> {
        self.inner
            .registry
            .topics
            .iter()
            .map(|t| t.key().clone())
            .collect()
    }

    /// The stored (non-ephemeral, not deleted) topic `name` and its epoch.
    fn stored(&self, name: &str) -> Option<(Arc<super::topic::Topic>, u64)> {
        let t = self.inner.registry.topics.get(name)?.value().clone();
        let s = t.state.read();
        let epoch = (!s.ephemeral && !s.deleted).then_some(s.epoch)?;
        drop(s);
        Some((t, epoch))
    }
}

impl Member {
    /// Its subscription; `None` once it ended.
    pub(crate) fn subscription(&self) -> Option<&Subscription> {
        self.sub.as_ref()
    }
}

impl MultiSubscription {
    /// The member at `index` (as [`MultiDelivery::Topic`] names it).
    pub fn member(&self, index: usize) -> Option<&Member> {
        self.members.get(index)?.as_ref()
    }

    /// One past the highest member index (indices below may be free).
    pub fn member_slots(&self) -> usize {
        self.members.len()
    }

    /// Every member, in index order (named topics first, in their order).
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().flatten()
    }

    /// The patterns, as the selection gave them.
    pub fn patterns(&self) -> &[TopicPattern] {
        &self.patterns
    }

    /// Whether nothing more can come: every member ended and no pattern
    /// can bring in another.
    pub fn finished(&self) -> bool {
        (self.patterns.is_empty() || self.overflowed)
            && self.pending.is_empty()
            && self.members().all(|m| m.sub.is_none())
    }

    /// The next delivery, waiting for one; `None` once [`finished`](Self::finished).
    pub async fn recv(&mut self) -> Option<MultiDelivery> {
        loop {
            if let Some(d) = self.try_recv() {
                return Some(d);
            }
            if self.finished() {
                return None;
            }
            let (wakes, created) = (&mut self.wakes, &mut self.created);
            let woke = tokio::select! {
                Some(member) = wakes.next() => Ok(member),
                c = async {
                    match created {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => Err(c),
            };
            match woke {
                Ok(member) => self.ready.push_back(member),
                Err(c) => self.on_created(c),
            }
        }
    }

    /// The next delivery if one is ready now, without waiting.
    pub fn try_recv(&mut self) -> Option<MultiDelivery> {
        if let Some((member, delivery)) = self.pending.pop_front() {
            return Some(MultiDelivery::Topic { member, delivery });
        }
        // Topics stored since the last look join before anything is read.
        while let Some(rx) = &mut self.created {
            match rx.try_recv() {
                Ok(name) => self.on_created(Ok(name)),
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    self.on_created(Err(broadcast::error::RecvError::Lagged(n)))
                }
                Err(broadcast::error::TryRecvError::Closed) => self.created = None,
            }
        }
        if self.overflowed {
            if !std::mem::replace(&mut self.overflow_told, true) {
                return Some(MultiDelivery::TooManyMatches {
                    limit: self.max_matches,
                });
            }
            return None;
        }
        while let Some(index) = self.ready.pop_front() {
            let Some(m) = self.members.get_mut(index).and_then(Option::as_mut) else {
                continue;
            };
            let Some(sub) = &mut m.sub else { continue };
            let Some(delivery) = sub.try_recv() else {
                continue;
            };
            match &delivery {
                Delivery::Event(e) => {
                    m.position.epoch = sub.epoch();
                    m.position.offset = e.offset;
                }
                Delivery::Gap(g) => {
                    m.position.epoch = g.epoch;
                    m.position.offset = g.current;
                }
                Delivery::End { last_offset } => {
                    m.position.offset = m.position.offset.max(*last_offset);
                    m.position.ended = true;
                    let gone = m.sub.take().is_some_and(|s| s.deleted());
                    if gone && m.pattern.is_some() {
                        // Deleted: a topic of that name stored since (its
                        // notice may have come while this one still had
                        // events to hand out) is a new one, joined from its
                        // first event.
                        let name = m.name.clone();
                        if let Err(e) = self.join(name, None) {
                            tracing::warn!(error = %e, "a re-created topic could not be joined");
                        }
                    }
                    return Some(MultiDelivery::Topic {
                        member: index,
                        delivery,
                    });
                }
            }
            // Its turn again after the others that are ready.
            self.ready.push_back(index);
            return Some(MultiDelivery::Topic {
                member: index,
                delivery,
            });
        }
        None
    }

    /// Drops ended pattern members whose topic is gone (a sealed topic
    /// after `sealed_ttl`), so a long-lived stream's positions do not grow
    /// with every topic it ever saw. Returns whether any was dropped.
    pub fn prune(&mut self) -> bool {
        let gone: Vec<usize> = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let m = m.as_ref()?;
                (m.pattern.is_some()
                    && m.sub.is_none()
                    && self
                        .engine
                        .stored(&m.name)
                        .is_none_or(|(_, epoch)| epoch != m.position.epoch))
                .then_some(i)
            })
            .collect();
        for &i in &gone {
            self.remove(i);
        }
        !gone.is_empty()
    }

    fn open_named(
        &self,
        name: Arc<str>,
        start: Start,
        position: Position,
    ) -> Result<Member, EngineError> {
        let sub = self.engine.subscribe(&name, self.types.clone(), start)?;
        Ok(Member {
            position: self.start_position(&sub, position),
            name,
            pattern: None,
            sub: Some(sub),
        })
    }

    /// Where a new subscription stands before its first delivery.
    fn start_position(&self, sub: &Subscription, resumed: Position) -> Position {
        if resumed.epoch == sub.epoch() {
            return resumed;
        }
        if self.engine.stored(sub.topic()).is_none() {
            // A placeholder a subscribe created (no event yet, gone with
            // its subscribers): no epoch of it is worth resuming. Epoch 0
            // resumes from the first event of whatever topic exists then.
            return Position::default();
        }
        // Its first delivery (a gap, if any) moves it on.
        Position {
            epoch: sub.epoch(),
            offset: sub.start_offset().saturating_sub(1),
            ended: false,
        }
    }

    /// A subscription on the stored topic `name`; `None` when it is gone.
    fn open_stored(&self, name: &str, start: Start) -> Result<Option<Subscription>, EngineError> {
        let Some((topic, epoch)) = self.engine.stored(name) else {
            return Ok(None);
        };
        let start = match start {
            // From its first event: offset 0 of the epoch it has now.
            Start::AfterOffset {
                epoch: 0,
                offset: 0,
            } => Start::AfterOffset { epoch, offset: 0 },
            other => other,
        };
        self.engine.catch_up(&topic, &start);
        match Subscription::open(topic, self.types.clone(), start) {
            Ok(sub) => Ok(Some(sub)),
            Err(EngineError::TopicNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A pattern member with a position whose topic is gone: one gap says
    /// so, then it is dropped.
    fn vanished(&mut self, name: Arc<str>, pattern: usize, p: &Position) -> Member {
        let member = Member {
            name: name.clone(),
            pattern: Some(pattern),
            position: Position {
                epoch: 0,
                offset: 0,
                ended: true,
            },
            sub: None,
        };
        let gap = Gap {
            topic: name.to_string(),
            event_type: None,
            reason: GapReason::EpochChanged,
            epoch: 0,
            requested: p.offset,
            first_available: 0,
            current: 0,
        };
        metrics::counter!(crate::metrics::GAPS, "reason" => GapReason::EpochChanged.as_str())
            .increment(1);
        // Its index is known once inserted; patched in `insert`.
        self.pending.push_back((usize::MAX, Delivery::Gap(gap)));
        member
    }

    /// A topic re-created since `p` was taken: one gap says what is lost,
    /// then it starts from the first retained event of the new epoch.
    fn restarted(
        &mut self,
        name: &str,
        p: &Position,
        topic: &super::topic::Topic,
        epoch: u64,
    ) -> Start {
        let first = topic.state.read().first_offset();
        let gap = Gap {
            topic: name.to_owned(),
            event_type: None,
            reason: GapReason::EpochChanged,
            epoch,
            requested: p.offset,
            first_available: first,
            current: first - 1,
        };
        metrics::counter!(crate::metrics::GAPS, "reason" => GapReason::EpochChanged.as_str())
            .increment(1);
        // Its index is known once inserted; patched in `insert`.
        self.pending.push_back((usize::MAX, Delivery::Gap(gap)));
        Start::AfterOffset {
            epoch,
            offset: first - 1,
        }
    }

    fn pattern_of(&self, name: &str) -> Option<usize> {
        if !(self.allow)(name) {
            return None;
        }
        self.patterns.iter().position(|p| p.matches(name))
    }

    /// Brings in `name` if a pattern matches it and it is not a member:
    /// at `start`, or from its first event when `None`.
    fn join(&mut self, name: Arc<str>, start: Option<Start>) -> Result<(), EngineError> {
        if let Some(&i) = self.by_name.get(&name) {
            let m = self.members[i].as_ref().expect("indexed members exist");
            let renewed = m.sub.is_none()
                && m.pattern.is_some()
                && self
                    .engine
                    .stored(&name)
                    .is_some_and(|(_, epoch)| epoch != m.position.epoch);
            if !renewed {
                return Ok(());
            }
            // Ended, and stored again since: a new topic of the same name.
            self.remove(i);
        }
        let Some(pattern) = self.pattern_of(&name) else {
            return Ok(());
        };
        let start = start.unwrap_or(Start::AfterOffset {
            epoch: 0,
            offset: 0,
        });
        let Some(sub) = self.open_stored(&name, start)? else {
            return Ok(());
        };
        let member = Member {
            position: self.start_position(&sub, Position::default()),
            name,
            pattern: Some(pattern),
            sub: Some(sub),
        };
        self.insert_pattern(member)
    }

    fn on_created(&mut self, created: Result<Arc<str>, broadcast::error::RecvError>) {
        let joined = match created {
            Ok(name) => self.join(name, None),
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Missed some: look at every topic (members are skipped).
                let names = self.engine.topic_names();
                names.into_iter().try_for_each(|n| self.join(n, None))
            }
            Err(broadcast::error::RecvError::Closed) => {
                self.created = None;
                Ok(())
            }
        };
        match joined {
            Ok(()) => {}
            Err(EngineError::TooManyMatches(_)) => {
                self.overflowed = true;
                self.created = None;
            }
            Err(e) => tracing::warn!(error = %e, "a topic matching a pattern could not be joined"),
        }
    }

    fn insert_pattern(&mut self, member: Member) -> Result<(), EngineError> {
        if self.pattern_members >= self.max_matches {
            return Err(EngineError::TooManyMatches(self.max_matches));
        }
        self.pattern_members += 1;
        self.insert(member);
        Ok(())
    }

    fn insert(&mut self, member: Member) -> usize {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.members.push(None);
                self.members.len() - 1
            }
        };
        if let Some(sub) = &member.sub {
            self.wakes.push(wake_stream(index, sub.watch()));
            self.ready.push_back(index);
        }
        self.by_name.insert(member.name.clone(), index);
        self.members[index] = Some(member);
        for (i, _) in self.pending.iter_mut() {
            if *i == usize::MAX {
                *i = index;
            }
        }
        index
    }

    fn remove(&mut self, index: usize) {
        if let Some(m) = self.members[index].take() {
            self.by_name.remove(&m.name);
            if m.pattern.is_some() {
                self.pattern_members -= 1;
            }
            self.free.push(index);
        }
    }
}
