//! The engine's consumer-group API (see `group.rs` for the state and its
//! rules): create, join, fetch, ack/nack/in-progress/term, dead letters,
//! redrive, persistence through the writer, and the one ticker task that
//! fires every group's deadlines.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::event::NewEvent;
use super::group::{
    self, DeadLetter, Fetched, Group, GroupConfig, GroupInfo, GroupRecord, GroupState, Settled,
    DLQ_ATTEMPTS, DLQ_EPOCH, DLQ_GROUP, DLQ_OFFSET, DLQ_REASON, DLQ_TOPIC,
};
use super::log::{GroupWrite, Step};
use super::topic::{Registry, Topic};
use super::writer::{Done, Request};
use super::{Engine, EngineError, Inner};

/// Longest wait of one fetch.
pub const MAX_FETCH_WAIT: Duration = Duration::from_secs(60);
/// Most events one fetch hands out.
pub const MAX_FETCH: usize = 1000;
/// Most offsets in one ack, nack, in-progress or term.
pub const MAX_SETTLE: usize = 10_000;
/// The ticker wakes at least this often (dead letters to retry, changed
/// groups to store, idle members to forget).
const TICK: Duration = Duration::from_secs(1);

/// One way to settle deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Done: never delivered again.
    Ack,
    /// Failed: redeliver after the delay (at most 24 h; or the group's backoff).
    Nack(Option<Duration>),
    /// Still working: the deadline moves a whole `ack_wait` on.
    InProgress,
    /// Give up now: append it to the dead-letter topic with this reason.
    Term(String),
}

/// A TCP member's session in a group: fetch with [`next`](Self::next);
/// dropping it is a disconnect (its events wait for their deadlines),
/// [`leave`](Self::leave) a clean leave (they are redelivered at once).
#[derive(Debug)]
pub struct GroupMember {
    engine: Engine,
    group: Arc<Group>,
    consumer: Arc<str>,
    left: bool,
}

impl GroupMember {
    /// A handle settling this group's deliveries without looking the group
    /// up by name again (for the TCP session holding the membership).
    pub fn settler(&self) -> GroupSettler {
        GroupSettler {
            engine: self.engine.clone(),
            group: self.group.clone(),
        }
    }

    /// The group's topic.
    pub fn topic(&self) -> &str {
        &self.group.topic.name
    }

    /// Waits for work and hands out up to `max` events (within the
    /// member's room and the group's `max_ack_pending`).
    pub async fn next(&self, max: usize) -> Result<Fetched, EngineError> {
        self.engine
            .wait_fetch(&self.group, &self.consumer, max, None)
            .await
    }

    /// Leaves cleanly: what this consumer holds is redelivered at once.
    pub fn leave(mut self) {
        self.left = true;
        self.release(true);
    }

    fn release(&self, clean: bool) {
        let woke = self
            .group
            .state
            .lock()
            .leave(&self.consumer, clean, Instant::now());
        if woke {
            self.group.notify.notify_waiters();
        }
    }
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        if !self.left {
            self.release(false);
        }
    }
}

/// Settles deliveries of one group (see [`Engine::settle`]), resolved once.
#[derive(Debug, Clone)]
pub struct GroupSettler {
    engine: Engine,
    group: Arc<Group>,
}

impl GroupSettler {
    /// Applies the settle now; the returned future resolves once it is
    /// stored (a `term`: once its dead letters are appended).
    pub fn settle(&self, offsets: &[u64], how: Settle) -> Result<PendingSettle, EngineError> {
        self.engine.start_settle(&self.group, offsets, how)
    }
}

/// The writer's word that a group change is stored.
type Stored = oneshot::Receiver<Result<(), EngineError>>;

/// A settle applied to its group, waiting for its store: small and
/// unboxed in the common case (ack, nack, in-progress).
pub enum PendingSettle {
    /// Nothing to wait for.
    Ready(Settled),
    /// Waiting for the writer to store the change.
    Stored {
        /// The counts to answer with.
        settled: Settled,
        /// Resolves once the pass holding the change is stored.
        stored: Stored,
    },
    /// A `term`: dead letters to append, then the store.
    Boxed(Pin<Box<dyn Future<Output = Result<Settled, EngineError>> + Send>>),
}

impl std::fmt::Debug for PendingSettle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingSettle")
    }
}

impl Future for PendingSettle {
    type Output = Result<Settled, EngineError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            PendingSettle::Ready(settled) => Poll::Ready(Ok(*settled)),
            PendingSettle::Stored { settled, stored } => {
                let settled = *settled;
                Pin::new(stored).poll(cx).map(|r| match r {
                    Ok(Ok(())) => Ok(settled),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(EngineError::ShuttingDown),
                })
            }
            PendingSettle::Boxed(f) => f.as_mut().poll(cx),
        }
    }
}

/// A `term` reason as stored: at most [`group::MAX_REASON`] bytes (cut at
/// a character boundary), `terminated` when empty.
fn term_reason(reason: &str) -> String {
    let mut cut = reason.len().min(group::MAX_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    if cut == 0 {
        "terminated".into()
    } else {
        reason[..cut].to_owned()
    }
}

/// Refuses a consumer name new to a group that has [`group::MAX_MEMBERS`].
fn admit(s: &GroupState, consumer: &str) -> Result<(), EngineError> {
    if s.knows(consumer) || s.members_len() < group::MAX_MEMBERS {
        return Ok(());
    }
    Err(EngineError::InvalidRequest(format!(
        "the group has {} consumers already; reuse a consumer name (idle ones are forgotten after 2 x max(ack_wait, 60 s))",
        group::MAX_MEMBERS
    )))
}

fn group_err(topic: &str, group: &str) -> EngineError {
    EngineError::GroupNotFound(format!("{topic}/{group}"))
}

fn check_names(topic: &str, group: &str) -> Result<(), EngineError> {
    super::validate_topic(topic)?;
    if !group::valid_group_name(group) {
        return Err(EngineError::InvalidGroup(group.chars().take(300).collect()));
    }
    Ok(())
}

fn check_consumer(consumer: &str) -> Result<(), EngineError> {
    if group::valid_group_name(consumer) {
        Ok(())
    } else {
        Err(EngineError::InvalidRequest(format!(
            "invalid consumer name {:?}: 1-255 bytes of A-Z a-z 0-9 . _ : -",
            consumer.chars().take(300).collect::<String>()
        )))
    }
}

impl Engine {
    fn group(&self, topic: &str, group: &str) -> Result<Arc<Group>, EngineError> {
        check_names(topic, group)?;
        self.inner
            .registry
            .groups
            .get(&(Arc::from(topic), Arc::from(group)))
            .map(|g| g.value().clone())
            .filter(|g| !g.deleted.load(Ordering::Acquire))
            .ok_or_else(|| group_err(topic, group))
    }

    /// Creates the group (or, with `update`, changes an existing group's
    /// settings; its start applies only at creation). Idempotent. The topic
    /// must exist unless `topics.auto_create` is on.
    pub async fn create_group(
        &self,
        topic: &str,
        group: &str,
        config: GroupConfig,
        update: bool,
    ) -> Result<GroupInfo, EngineError> {
        let g = self.ensure_group(topic, group, config, update)?;
        self.persist_group(&g).await?;
        self.group_info(topic, group)
    }

    fn ensure_group(
        &self,
        topic: &str,
        group: &str,
        config: GroupConfig,
        update: bool,
    ) -> Result<Arc<Group>, EngineError> {
        check_names(topic, group)?;
        self.check_groups_supported()?;
        config.validate().map_err(EngineError::InvalidRequest)?;
        if config.dead_letter_topic_for(topic) == topic {
            return Err(EngineError::InvalidRequest(
                "dead_letter_topic must be another topic than the group's own".into(),
            ));
        }
        self.ensure_ticker();
        if let Ok(g) = self.group(topic, group) {
            if update {
                let mut s = g.state.lock();
                let start = s.config.start;
                s.config = GroupConfig { start, ..config };
                drop(s);
                self.mark_dirty(&g);
                g.notify.notify_waiters();
            }
            return Ok(g);
        }
        let max = self.inner.options.limits.max_groups;
        if self.inner.registry.groups.len() >= max {
            crate::metrics::refused("max_groups");
            return Err(EngineError::TooManyGroups(max));
        }
        let t = match self.get(topic) {
            Ok(t) => t,
            Err(_) if self.inner.options.topics.auto_create => {
                self.create(topic)?;
                self.get(topic)?
            }
            Err(e) => return Err(e),
        };
        let key = (t.name.clone(), Arc::<str>::from(group));
        let g = {
            let mut s = t.state.write();
            if s.deleted || s.deleting {
                return Err(EngineError::TopicNotFound(topic.to_owned()));
            }
            t.clear_ephemeral(&mut s);
            match self.inner.registry.groups.entry(key.clone()) {
                dashmap::mapref::entry::Entry::Occupied(e) => return Ok(e.get().clone()),
                dashmap::mapref::entry::Entry::Vacant(e) => {
                    let state = GroupState::new(config, &s, self.inner.options.clock.now_ms());
                    let g = Arc::new(Group {
                        topic: t.clone(),
                        name: key.1.clone(),
                        state: parking_lot::Mutex::new(state),
                        notify: tokio::sync::Notify::new(),
                        dirty: Default::default(),
                        deleted: Default::default(),
                    });
                    t.groups.fetch_add(1, Ordering::AcqRel);
                    e.insert(g.clone());
                    g
                }
            }
        };
        // Its topic is stored from now on (even before its first event).
        self.queue_trim(&t);
        self.mark_dirty(&g);
        self.refresh_pin(&t);
        tracing::info!(topic, group, "consumer group created");
        Ok(g)
    }

    /// The group's state and counters.
    pub fn group_info(&self, topic: &str, group: &str) -> Result<GroupInfo, EngineError> {
        let g = self.group(topic, group)?;
        Ok(info_of(&g, self.inner.options.clock.now_ms()))
    }

    /// Every group of `topic`, by name.
    pub fn groups(&self, topic: &str) -> Result<Vec<GroupInfo>, EngineError> {
        super::validate_topic(topic)?;
        let now_ms = self.inner.options.clock.now_ms();
        let mut list: Vec<GroupInfo> = self
            .live_groups(|g| &*g.topic.name == topic)
            .iter()
            .map(|g| info_of(g, now_ms))
            .collect();
        if list.is_empty() {
            self.get(topic)?;
        }
        list.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(list)
    }

    /// Every group of every topic (for metrics), by topic and name.
    pub fn all_groups(&self) -> Vec<GroupInfo> {
        let now_ms = self.inner.options.clock.now_ms();
        let mut list: Vec<GroupInfo> = self
            .live_groups(|_| true)
            .iter()
            .map(|g| info_of(g, now_ms))
            .collect();
        list.sort_by(|a, b| (&a.topic, &a.group).cmp(&(&b.topic, &b.group)));
        list
    }

    /// Whether some group of `t` has not done every event of it.
    pub(crate) fn groups_unfinished(&self, t: &Arc<Topic>) -> bool {
        let last = t.state.read().last_offset();
        self.live_groups(|g| Arc::ptr_eq(&g.topic, t))
            .iter()
            .any(|g| g.state.lock().first_undone() <= last)
    }

    /// The groups not deleted that `keep` selects. Collected first, so that
    /// no map shard is locked while a group's or a topic's lock is taken
    /// (`ensure_group` takes a shard under a topic's lock).
    fn live_groups(&self, keep: impl Fn(&Group) -> bool) -> Vec<Arc<Group>> {
        self.inner
            .registry
            .groups
            .iter()
            .map(|e| e.value().clone())
            .filter(|g| !g.deleted.load(Ordering::Acquire) && keep(g))
            .collect()
    }

    /// Deletes the group: its pending work is forgotten, waiting members
    /// get `GroupNotFound`.
    pub async fn delete_group(&self, topic: &str, group: &str) -> Result<(), EngineError> {
        let g = self.group(topic, group)?;
        self.remove_group(&g);
        self.store_group_removal(&g).await?;
        tracing::info!(topic, group, "consumer group deleted");
        Ok(())
    }

    fn remove_group(&self, g: &Arc<Group>) {
        if g.deleted.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner
            .registry
            .groups
            .remove_if(&(g.topic.name.clone(), g.name.clone()), |_, v| {
                Arc::ptr_eq(v, g)
            });
        g.topic.groups.fetch_sub(1, Ordering::AcqRel);
        g.notify.notify_waiters();
        self.refresh_pin(&g.topic);
    }

    async fn store_group_removal(&self, g: &Group) -> Result<(), EngineError> {
        if self.inner.log.inline() {
            return Ok(());
        }
        let (ack, rx) = oneshot::channel();
        self.send(Request::Step {
            step: Step::Groups {
                writes: vec![GroupWrite {
                    topic: g.topic.name.clone(),
                    group: g.name.clone(),
                    value: None,
                }],
            },
            done: Done::Sync { ack },
            permit: None,
        })?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Joins `consumer` to the group for pushed deliveries (TCP). With
    /// `create`, a missing group is created with those settings (the topic
    /// too, when `topics.auto_create` is on); without, it must exist.
    pub async fn join_group(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        max_in_flight: u32,
        create: Option<GroupConfig>,
    ) -> Result<GroupMember, EngineError> {
        self.check_open()?;
        check_consumer(consumer)?;
        let g = match create {
            Some(config) => {
                let g = self.ensure_group(topic, group, config, false)?;
                self.persist_group(&g).await?;
                g
            }
            None => self.group(topic, group)?,
        };
        self.ensure_ticker();
        let consumer: Arc<str> = Arc::from(consumer);
        {
            let mut s = g.state.lock();
            admit(&s, &consumer)?;
            s.join(&consumer, max_in_flight, Instant::now());
        }
        Ok(GroupMember {
            engine: self.clone(),
            group: g,
            consumer,
            left: false,
        })
    }

    /// Hands up to `max` events to `consumer` (an HTTP worker), waiting up
    /// to `wait` for work; `max_in_flight` (0 = the group's limit) bounds
    /// what the consumer holds.
    pub async fn fetch(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
        max_in_flight: u32,
    ) -> Result<Fetched, EngineError> {
        self.check_open()?;
        check_consumer(consumer)?;
        let g = self.group(topic, group)?;
        self.ensure_ticker();
        let consumer: Arc<str> = Arc::from(consumer);
        {
            let mut s = g.state.lock();
            admit(&s, &consumer)?;
            s.set_room(&consumer, max_in_flight);
        }
        let deadline = Instant::now() + wait.min(MAX_FETCH_WAIT);
        self.wait_fetch(&g, &consumer, max.clamp(1, MAX_FETCH), Some(deadline))
            .await
    }

    async fn wait_fetch(
        &self,
        g: &Arc<Group>,
        consumer: &Arc<str>,
        max: usize,
        deadline: Option<Instant>,
    ) -> Result<Fetched, EngineError> {
        loop {
            if g.deleted.load(Ordering::Acquire) {
                return Err(group_err(&g.topic.name, &g.name));
            }
            self.check_open()?;
            let mut changed = g.topic.notify.subscribe();
            let notified = g.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (mut fetched, next_timer) = {
                let mut s = g.state.lock();
                let t = g.topic.state.read();
                let f = s.fetch(
                    &t,
                    consumer,
                    max,
                    Instant::now(),
                    self.inner.options.clock.now_ms(),
                );
                (f, s.next_timer())
            };
            if !fetched.is_empty() {
                for gap in &mut fetched.gaps {
                    gap.topic = g.topic.name.to_string();
                }
                self.mark_dirty(g);
                // Other waiting members: the deadlines just set may be
                // earlier than the ones they sleep for, and there may be
                // more work than this member had room for.
                g.notify.notify_waiters();
                if !fetched.gaps.is_empty() {
                    self.refresh_pin(&g.topic);
                }
                return Ok(fetched);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                return Ok(fetched);
            }
            let wake = match (next_timer, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = changed.changed() => if r.is_err() {
                    // The topic is gone, and its groups with it.
                    return Err(group_err(&g.topic.name, &g.name));
                },
                () = &mut notified => {}
                () = sleep => {}
            }
        }
    }

    /// Settles `offsets` of the group's deliveries. Resolves once the
    /// change is stored (acks are durable under the durability mode when
    /// this returns); a `term` resolves once the dead letters are appended.
    pub async fn settle(
        &self,
        topic: &str,
        group: &str,
        offsets: &[u64],
        how: Settle,
    ) -> Result<Settled, EngineError> {
        let g = self.group(topic, group)?;
        self.start_settle(&g, offsets, how)?.await
    }

    /// Applies a settle to `g` now and returns the wait for its store.
    fn start_settle(
        &self,
        g: &Arc<Group>,
        offsets: &[u64],
        how: Settle,
    ) -> Result<PendingSettle, EngineError> {
        self.check_open()?;
        if offsets.len() > MAX_SETTLE {
            return Err(EngineError::InvalidRequest(format!(
                "at most {MAX_SETTLE} offsets per request"
            )));
        }
        if let Settle::Nack(Some(delay)) = &how {
            if *delay > group::MAX_ACK_WAIT {
                return Err(EngineError::InvalidRequest(
                    "a nack delay is at most 24 h".into(),
                ));
            }
        }
        if g.deleted.load(Ordering::Acquire) {
            return Err(group_err(&g.topic.name, &g.name));
        }
        let now = Instant::now();
        let (settled, floor_moved, unblocked) = {
            let mut s = g.state.lock();
            let floor = s.first_undone();
            let settled = match &how {
                Settle::Ack => s.ack(offsets),
                Settle::Nack(delay) => s.nack(offsets, *delay, now),
                Settle::InProgress => s.in_progress(offsets, now),
                Settle::Term(reason) => s.term(offsets, &term_reason(reason)),
            };
            (settled, s.first_undone() != floor, s.take_unblocked())
        };
        if settled.applied == 0 && settled.already_done == 0 {
            return Ok(PendingSettle::Ready(settled));
        }
        // A repeated ack waits for the store too: the first one's pass may
        // not be stored yet (or failed and is being redone), and the reply
        // must mean "stored" either way.
        // Waiting members care only about work becoming available: a
        // nack's redelivery, or room at a member's or the group's limit.
        if unblocked || matches!(how, Settle::Nack(_)) {
            g.notify.notify_waiters();
        }
        if floor_moved {
            self.refresh_pin(&g.topic);
        }
        if matches!(how, Settle::Term(_)) {
            let (engine, g) = (self.clone(), g.clone());
            return Ok(PendingSettle::Boxed(Box::pin(async move {
                engine.flush_dead(&g).await;
                engine.persist_group(&g).await?;
                Ok(settled)
            })));
        }
        Ok(match self.queue_group_store(g)? {
            Some(stored) => PendingSettle::Stored { settled, stored },
            None => PendingSettle::Ready(settled),
        })
    }

    /// Republishes the group's dead letters (from its dead-letter topic,
    /// those naming this topic and group) to the topic, each once: an
    /// idempotency key per dead letter makes a repeated redrive within the
    /// topic's dedup window store nothing twice. Returns how many were
    /// published (repeats not counted).
    pub async fn redrive(&self, topic: &str, group: &str) -> Result<u64, EngineError> {
        let g = self.group(topic, group)?;
        let dlq = g.state.lock().config.dead_letter_topic_for(topic);
        let mut after = 0;
        let mut count = 0;
        loop {
            let page = match self.history(&dlq, after, &[], 500) {
                Ok(p) => p,
                Err(EngineError::TopicNotFound(_)) => return Ok(0),
                Err(e) => return Err(e),
            };
            if page.events.is_empty() {
                return Ok(count);
            }
            for e in &page.events {
                let header = |name: &str| {
                    e.headers
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                };
                if header(DLQ_TOPIC) != Some(topic) || header(DLQ_GROUP) != Some(group) {
                    continue;
                }
                let headers = e
                    .headers
                    .iter()
                    .filter(|(k, _)| !k.starts_with("ringcast-dlq-"))
                    .cloned()
                    .collect();
                let event = NewEvent {
                    event_type: e.event_type.to_string(),
                    headers,
                    payload: e.payload.clone(),
                    idempotency_key: Some(format!("redrive:{dlq}:{:x}:{}", page.epoch, e.offset)),
                };
                let ack = self.publish(topic, event).await?;
                if !ack.duplicate {
                    count += 1;
                }
            }
            after = page.next_after;
        }
    }

    /// Appends the group's dead letters to its dead-letter topic (created
    /// if need be); a failed append is retried by the ticker.
    async fn flush_dead(&self, g: &Arc<Group>) {
        let (letters, dlq, generation) = {
            let mut s = g.state.lock();
            let t = g.topic.state.read();
            (
                s.take_dead(&t),
                s.config.dead_letter_topic_for(&g.topic.name),
                s.generation,
            )
        };
        if letters.is_empty() {
            return;
        }
        let epoch = g.topic.state.read().epoch;
        if !self.inner.registry.topics.contains_key(dlq.as_str()) {
            if let Err(e) = self.create(&dlq) {
                tracing::warn!(topic = %g.topic.name, group = %g.name, dlq, error = %e, "cannot create the dead-letter topic; retrying");
            }
        }
        // Appended in batches (one group commit each); the first failure
        // leaves it and every later letter for the ticker's next round, with
        // one warning, so a sealed or full dead-letter topic costs one
        // refused append per round, not one per letter.
        let mut failed: Option<EngineError> = None;
        for chunk in letters.chunks(DEAD_LETTER_BATCH) {
            if failed.is_none() {
                let events = chunk
                    .iter()
                    .map(|d| dead_letter(g, d, epoch, generation))
                    .collect();
                if let Err(e) = self.publish_batch(&dlq, events).await {
                    failed = Some(e);
                }
            }
            let ok = failed.is_none();
            let mut s = g.state.lock();
            for d in chunk {
                s.dead_lettered(d.offset, ok);
            }
            drop(s);
            if ok {
                for d in chunk {
                    tracing::info!(topic = %g.topic.name, group = %g.name, offset = d.offset, attempts = d.attempt, reason = d.reason, dlq, "event dead-lettered");
                }
            }
        }
        if let Some(e) = failed {
            tracing::warn!(topic = %g.topic.name, group = %g.name, dlq, error = %e, "dead letters not appended; retrying");
        }
        self.mark_dirty(g);
        self.refresh_pin(&g.topic);
        g.notify.notify_waiters();
    }

    /// Queues the group for the writer's next pass (at most once until then).
    fn mark_dirty(&self, g: &Arc<Group>) {
        if !self.inner.log.inline() && g.touch() {
            self.inner.registry.dirty_groups.lock().push(g.clone());
        }
    }

    /// Marks the group changed and waits until the writer stored it.
    async fn persist_group(&self, g: &Arc<Group>) -> Result<(), EngineError> {
        match self.queue_group_store(g)? {
            Some(stored) => stored.await.map_err(|_| EngineError::ShuttingDown)?,
            None => Ok(()),
        }
    }

    /// Marks the group changed and asks the writer to store it; the
    /// receiver says when it is (`None`: nothing to store, memory mode).
    fn queue_group_store(&self, g: &Arc<Group>) -> Result<Option<Stored>, EngineError> {
        if self.inner.log.inline() {
            return Ok(None);
        }
        self.mark_dirty(g);
        let (ack, rx) = oneshot::channel();
        self.send(Request::Step {
            step: Step::Groups { writes: Vec::new() },
            done: Done::Sync { ack },
            permit: None,
        })?;
        Ok(Some(rx))
    }

    /// With `retain_until_acked`, moves the topic's pin to the lowest offset
    /// a group has not done (trimming what that frees).
    fn refresh_pin(&self, t: &Arc<Topic>) {
        if !t.state.read().retention.retain_until_acked {
            return;
        }
        let pin = self
            .live_groups(|g| Arc::ptr_eq(&g.topic, t))
            .iter()
            .map(|g| g.state.lock().first_undone())
            .min()
            .unwrap_or(u64::MAX);
        let trimmed = {
            let mut s = t.state.write();
            let before = s.pin;
            s.pin = pin;
            pin > before && s.trim(self.inner.options.clock.now_ms()) > 0
        };
        if trimmed {
            self.queue_trim(t);
            t.wake();
        }
    }

    /// Starts the ticker task once, on the current runtime.
    pub(crate) fn ensure_ticker(&self) {
        if self.inner.ticker.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(ticker(Arc::downgrade(&self.inner)));
            }
            Err(_) => self.inner.ticker.store(false, Ordering::Release),
        }
    }

    /// Installs the groups a backend recovered; records of another topic
    /// incarnation (or unreadable ones) are removed.
    pub(crate) fn install_groups(&self, records: Vec<(String, String, Vec<u8>)>) {
        let now = Instant::now();
        let now_ms = self.inner.options.clock.now_ms();
        let mut stale = Vec::new();
        for (topic, name, bytes) in records {
            let record: Option<GroupRecord> =
                bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
                    .ok()
                    .map(|(r, _)| r);
            let t = self
                .inner
                .registry
                .topics
                .get(topic.as_str())
                .map(|t| t.clone());
            match (record, t) {
                (Some(r), Some(t)) if r.generation == t.state.read().generation => {
                    let mut state = GroupState::from_record(r, now, now_ms);
                    let forgot = state.fit_to(t.state.read().next_offset());
                    if forgot > 0 {
                        tracing::warn!(
                            topic,
                            group = name,
                            forgot,
                            "the topic came back shorter than its consumer group saw it (unclean stop in interval mode); the group continues from the topic's end"
                        );
                    }
                    let g = Arc::new(Group {
                        topic: t.clone(),
                        name: Arc::from(name.as_str()),
                        state: parking_lot::Mutex::new(state),
                        notify: tokio::sync::Notify::new(),
                        dirty: Default::default(),
                        deleted: Default::default(),
                    });
                    t.groups.fetch_add(1, Ordering::AcqRel);
                    self.inner
                        .registry
                        .groups
                        .insert((t.name.clone(), g.name.clone()), g);
                }
                (record, _) => {
                    if record.is_none() {
                        tracing::error!(
                            topic,
                            group = name,
                            "a consumer group record cannot be decoded; removing it"
                        );
                    }
                    stale.push(GroupWrite {
                        topic: Arc::from(topic.as_str()),
                        group: Arc::from(name.as_str()),
                        value: None,
                    });
                }
            }
        }
        let topics: Vec<Arc<Topic>> = self
            .inner
            .registry
            .topics
            .iter()
            .filter(|t| {
                t.groups.load(Ordering::Acquire) > 0 || t.state.read().retention.retain_until_acked
            })
            .map(|t| t.clone())
            .collect();
        for t in &topics {
            self.refresh_pin(t);
        }
        if !stale.is_empty() {
            let _ = self.send(Request::Step {
                step: Step::Groups { writes: stale },
                done: Done::Trim,
                permit: None,
            });
        }
        if !self.inner.registry.groups.is_empty() {
            self.ensure_ticker();
        }
    }

    /// Forgets the groups of a deleted topic.
    pub(crate) fn drop_groups_of(registry: &Registry, topic: &Arc<Topic>) {
        let gone: Vec<Arc<Group>> = registry
            .groups
            .iter()
            .filter(|e| Arc::ptr_eq(&e.value().topic, topic))
            .map(|e| e.value().clone())
            .collect();
        for g in gone {
            g.deleted.store(true, Ordering::Release);
            registry
                .groups
                .remove_if(&(topic.name.clone(), g.name.clone()), |_, v| {
                    Arc::ptr_eq(v, &g)
                });
            g.notify.notify_waiters();
        }
        topic.groups.store(0, Ordering::Release);
    }
}

fn info_of(g: &Group, now_ms: u64) -> GroupInfo {
    let s = g.state.lock();
    let t = g.topic.state.read();
    s.info(&g.topic.name, &g.name, &t, Instant::now(), now_ms)
}

/// Hands the writer the records of every group changed since its last
/// pass (called by the writer when a pass holds a `Groups` step).
pub(crate) fn take_dirty_records(
    registry: &Registry,
    now_ms: u64,
) -> (Vec<GroupWrite>, Vec<Arc<Group>>) {
    let groups = std::mem::take(&mut *registry.dirty_groups.lock());
    let now = Instant::now();
    let mut writes = Vec::with_capacity(groups.len());
    for g in &groups {
        g.dirty.store(false, Ordering::Release);
        if g.deleted.load(Ordering::Acquire) {
            continue;
        }
        let record = g.state.lock().record(now, now_ms);
        match bincode::serde::encode_to_vec(&record, bincode::config::standard()) {
            Ok(bytes) => writes.push(GroupWrite {
                topic: g.topic.name.clone(),
                group: g.name.clone(),
                value: Some(bytes),
            }),
            Err(e) => {
                tracing::error!(group = %g.name, error = %e, "cannot encode a consumer group")
            }
        }
    }
    (writes, groups)
}

/// Drops the removals of group records whose name a live group holds
/// again (deleted, then created anew before the removal's pass): that
/// group's record goes into this pass instead, so a removal queued before
/// the re-creation cannot delete the new group's record.
pub(crate) fn drop_stale_removals(registry: &Registry, steps: &mut [Step]) {
    let mut revived = Vec::new();
    for step in steps.iter_mut() {
        let Step::Groups { writes } = step else {
            continue;
        };
        writes.retain(|w| {
            if w.value.is_some() {
                return true;
            }
            let key = (w.topic.clone(), w.group.clone());
            match registry.groups.get(&key).map(|g| g.value().clone()) {
                Some(g) if !g.deleted.load(Ordering::Acquire) => {
                    revived.push(g);
                    false
                }
                _ => true,
            }
        });
    }
    if !revived.is_empty() {
        redirty(registry, revived);
    }
}

/// Most dead letters appended in one batch.
const DEAD_LETTER_BATCH: usize = 256;

/// The dead letter of `d` for `g`'s dead-letter topic: the original type,
/// payload and headers (as many as fit beside ours), our headers, and an
/// idempotency key per group incarnation and offset.
fn dead_letter(g: &Group, d: &DeadLetter, epoch: u64, generation: u64) -> NewEvent {
    let mut headers = d.event.headers.clone();
    let ours = [
        (DLQ_TOPIC, g.topic.name.to_string()),
        (DLQ_OFFSET, d.offset.to_string()),
        (DLQ_GROUP, g.name.to_string()),
        (DLQ_ATTEMPTS, d.attempt.to_string()),
        (DLQ_REASON, d.reason.clone()),
        (DLQ_EPOCH, epoch.to_string()),
    ];
    let extra: usize = ours.iter().map(|(k, v)| k.len() + v.len()).sum();
    // The original headers go along while they fit the limits.
    while headers.len() + ours.len() > super::MAX_HEADERS
        || headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
            + extra
            > super::MAX_HEADER_BYTES
    {
        headers.pop();
    }
    headers.extend(ours.into_iter().map(|(k, v)| (k.to_owned(), v)));
    NewEvent {
        event_type: d.event.event_type.to_string(),
        headers,
        payload: d.event.payload.clone(),
        idempotency_key: Some(format!("dlq:{}:{generation:x}:{}", g.name, d.offset)),
    }
}

/// Queues `groups` for the next pass again (theirs failed).
pub(crate) fn redirty(registry: &Registry, groups: Vec<Arc<Group>>) {
    let mut dirty = registry.dirty_groups.lock();
    for g in groups {
        if g.touch() {
            dirty.push(g);
        }
    }
}

/// Marks every group changed (after a repair, the store may lack passes).
pub(crate) fn redirty_all(registry: &Registry) {
    let all: Vec<Arc<Group>> = registry.groups.iter().map(|e| e.value().clone()).collect();
    redirty(registry, all);
}

/// The one task firing every group's deadlines, appending dead letters,
/// storing changed groups and forgetting idle members.
async fn ticker(inner: Weak<Inner>) {
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else { return };
            if inner.closed.load(Ordering::Acquire) {
                return;
            }
            let engine = Engine { inner };
            let now = Instant::now();
            let groups: Vec<Arc<Group>> = engine
                .inner
                .registry
                .groups
                .iter()
                .map(|e| e.value().clone())
                .collect();
            let mut next = now + TICK;
            for g in groups {
                let (woke, dead, timer) = {
                    let mut s = g.state.lock();
                    let woke = s.fire(now);
                    let idle = s.config.ack_wait.max(Duration::from_secs(60)) * 2;
                    s.forget_idle(now, idle);
                    (woke, s.has_dead(), s.next_timer())
                };
                if woke {
                    engine.mark_dirty(&g);
                    g.notify.notify_waiters();
                }
                if dead {
                    // Its own task: appends wait for the writer, and the
                    // other groups' deadlines must not wait for them. A
                    // letter being appended is not taken twice.
                    let engine = engine.clone();
                    tokio::spawn(async move { engine.flush_dead(&g).await });
                }
                if let Some(t) = timer {
                    next = next.min(t.max(now));
                }
            }
            if !engine.inner.registry.dirty_groups.lock().is_empty() {
                let _ = engine.send(Request::Step {
                    step: Step::Groups { writes: Vec::new() },
                    done: Done::Trim,
                    permit: None,
                });
            }
            next
        };
        tokio::time::sleep_until(next).await;
    }
}
