//! Pattern subscriptions: one [`PatternSubscription`] over every topic a
//! pattern matches (`orders.*`), now and later, that survives reconnects.
//!
//! The connection task keeps a [`PatternResume`] per pattern subscription:
//! per topic, the position `(epoch, offset, ended)` of what was handed to
//! the caller. The broker names each topic's epoch once — in
//! `PatternSubscribed`, or in `TopicJoined` before the first delivery of a
//! topic that joins later — and every event of the topic after it is of
//! that epoch until a gap says otherwise. A resumed `SubscribePattern`
//! carries every position: each topic continues exactly after it, and a
//! topic the client never heard of (created while it was away, or whose
//! `TopicJoined` was lost with the connection) joins from its first event.

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use ringcast_protocol::{Start, TopicPosition, WireEvent, WireGap};

use crate::client::Client;
use crate::connection::{take_terminal, Push, TerminalSlot};
use crate::error::Result;
use crate::queue::PushReceiver;
use crate::subscription::Delivery;

/// One topic's bookkeeping in the connection task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TopicState {
    /// Epoch of `offset`.
    epoch: u64,
    /// Every event of `epoch` up to it was handed to the caller (or
    /// reported lost by a gap).
    offset: u64,
    ended: bool,
    /// Epoch of the events arriving now (from `PatternSubscribed`,
    /// `TopicJoined`, then gaps).
    stream: u64,
}

/// What handing one push to the caller changes in a [`PatternResume`];
/// computed when the push is routed, applied once it is in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    Event {
        topic: String,
        epoch: u64,
        offset: u64,
    },
    /// A whole-topic gap: delivery goes on after `current` of `epoch`; epoch
    /// 0 means the topic is gone (forget it).
    Gap {
        topic: String,
        epoch: u64,
        current: u64,
    },
    End {
        topic: String,
        last_offset: u64,
    },
}

/// Resume bookkeeping of one pattern subscription (pure, no I/O).
#[derive(Debug, Clone)]
pub(crate) struct PatternResume {
    /// `Live` or `Earliest`: where the first subscription starts.
    start: Start,
    /// `None` until the broker confirmed once (or the caller gave
    /// positions): until then a `SubscribePattern` is a new subscription.
    topics: Option<BTreeMap<String, TopicState>>,
}

impl PatternResume {
    pub(crate) fn new(start: Start, positions: Option<Vec<TopicPosition>>) -> Self {
        let topics = positions.map(|list| {
            list.into_iter()
                .map(|p| (p.topic.clone(), state_of(&p)))
                .collect()
        });
        PatternResume { start, topics }
    }

    /// The start of the next `SubscribePattern`.
    pub(crate) fn start(&self) -> Start {
        self.start.clone()
    }

    /// The positions of the next `SubscribePattern`: absent for a new
    /// subscription, every topic's for a resume.
    pub(crate) fn positions(&self) -> Option<Vec<TopicPosition>> {
        let topics = self.topics.as_ref()?;
        Some(
            topics
                .iter()
                .map(|(topic, s)| TopicPosition {
                    topic: topic.clone(),
                    epoch: s.epoch,
                    offset: s.offset,
                    ended: s.ended,
                })
                .collect(),
        )
    }

    /// The broker confirmed with these topics. A topic already known keeps
    /// the position it was resumed from (a gap follows if the broker must
    /// move it); a new one takes the broker's. Topics the broker does not
    /// list are no longer members (gone, or no longer readable): forgotten.
    pub(crate) fn on_subscribed(&mut self, listed: &[TopicPosition]) {
        let known = self.topics.take().unwrap_or_default();
        let topics = listed
            .iter()
            .map(|p| {
                let state = match known.get(&p.topic) {
                    Some(s) => TopicState {
                        stream: p.epoch,
                        ..*s
                    },
                    None => state_of(p),
                };
                (p.topic.clone(), state)
            })
            .collect();
        self.topics = Some(topics);
    }

    /// A topic joined after `PatternSubscribed` and starts at `p`.
    pub(crate) fn on_joined(&mut self, p: &TopicPosition) {
        self.topics
            .get_or_insert_with(BTreeMap::new)
            .insert(p.topic.clone(), state_of(p));
    }

    /// The epoch of the events of `topic` arriving now, if known.
    pub(crate) fn epoch(&self, topic: &str) -> Option<u64> {
        Some(self.topics.as_ref()?.get(topic)?.stream)
    }

    /// What delivering `event` changes, or `None` if it repeats one
    /// already delivered (to be dropped).
    pub(crate) fn effect_of_event(&self, event: &WireEvent) -> Option<Effect> {
        // A topic the broker never named is delivered but not recorded
        // (epoch 0): it cannot be resumed by offset.
        let state = self.topics.as_ref().and_then(|t| t.get(&event.topic));
        if let Some(s) = state {
            if s.epoch == s.stream && event.offset <= s.offset {
                return None;
            }
        }
        Some(Effect::Event {
            topic: event.topic.clone(),
            epoch: state.map_or(0, |s| s.stream),
            offset: event.offset,
        })
    }

    /// What delivering `gap` changes (`None` for a per-type gap, which a
    /// pattern subscription never gets: it starts by offsets).
    pub(crate) fn effect_of_gap(gap: &WireGap) -> Option<Effect> {
        gap.event_type.is_none().then(|| Effect::Gap {
            topic: gap.topic.clone(),
            epoch: gap.epoch,
            current: gap.current,
        })
    }

    /// Records that a push with this effect reached the caller's queue.
    pub(crate) fn apply(&mut self, effect: Effect) {
        let topics = self.topics.get_or_insert_with(BTreeMap::new);
        match effect {
            Effect::Event {
                topic,
                epoch,
                offset,
            } => {
                if let Some(s) = topics.get_mut(&topic) {
                    s.epoch = epoch;
                    s.offset = offset;
                }
            }
            Effect::Gap {
                topic, epoch: 0, ..
            } => {
                topics.remove(&topic);
            }
            Effect::Gap {
                topic,
                epoch,
                current,
            } => {
                topics.insert(
                    topic,
                    TopicState {
                        epoch,
                        offset: current,
                        ended: false,
                        stream: epoch,
                    },
                );
            }
            Effect::End { topic, last_offset } => {
                if let Some(s) = topics.get_mut(&topic) {
                    s.epoch = s.stream;
                    s.offset = s.offset.max(last_offset);
                    s.ended = true;
                }
            }
        }
    }
}

fn state_of(p: &TopicPosition) -> TopicState {
    TopicState {
        epoch: p.epoch,
        offset: p.offset,
        ended: p.ended,
        stream: p.epoch,
    }
}

/// A live subscription over every topic matching a pattern, created by
/// [`Client::subscribe_pattern`].
///
/// It is a [`Stream`] of `Result<Delivery>` (also readable with
/// [`next_delivery`](Self::next_delivery)), each naming its topic:
/// - `Ok(Delivery::Event | Delivery::Gap)` of any matching topic — in
///   offset order per topic, with no order between topics;
/// - `Ok(Delivery::End)` when one topic was sealed (or deleted): only that
///   topic is over, the subscription goes on with the others (and with
///   topics created later);
/// - a [`Delivery::Gap`] with `epoch` 0 says a topic the subscription
///   resumed is gone: nothing more comes from it;
/// - an `Err` is terminal and is followed by `None`: [`Error::Closed`]
///   after [`Client::close`], [`Error::Server`] when the broker ended the
///   subscription (`TooManyTopics`: the pattern matches more topics than
///   the broker's `limits.max_pattern_matches`; `Forbidden`: refreshed
///   credentials no longer cover a matching topic) or refused to resume it.
///
/// Reconnects are invisible: every topic resumes exactly after the last
/// event delivered of it, and topics created meanwhile are delivered from
/// their first event. Dropping the subscription unsubscribes.
#[derive(Debug)]
pub struct PatternSubscription {
    client: Client,
    id: u64,
    pattern: String,
    positions: BTreeMap<String, TopicPosition>,
    rx: PushReceiver,
    terminal: TerminalSlot,
    done: bool,
}

impl PatternSubscription {
    pub(crate) fn new(
        client: Client,
        id: u64,
        pattern: String,
        topics: Vec<TopicPosition>,
        rx: PushReceiver,
        terminal: TerminalSlot,
    ) -> Self {
        PatternSubscription {
            client,
            id,
            pattern,
            positions: topics.into_iter().map(|p| (p.topic.clone(), p)).collect(),
            rx,
            terminal,
            done: false,
        }
    }

    /// The client-chosen subscription id (unique per client).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The pattern.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Where `topic` stands: its epoch and the last offset delivered to
    /// the caller (or skipped to by a gap), whether it ended. `None` for
    /// a topic nothing was delivered of and that was not among the first
    /// matches.
    pub fn position(&self, topic: &str) -> Option<&TopicPosition> {
        self.positions.get(topic)
    }

    /// Every topic's position, by name: what to pass to
    /// [`PatternSubscribeBuilder::resume_from`] to resume in another
    /// process (topics missing from it start from their first event).
    pub fn positions(&self) -> Vec<TopicPosition> {
        self.positions.values().cloned().collect()
    }

    /// The next delivery, waiting for one; `None` once the subscription is
    /// over (after a terminal error).
    pub async fn next_delivery(&mut self) -> Option<Result<Delivery>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// Ends the subscription, waiting for the broker's confirmation (or the
    /// request timeout). Deliveries already buffered are discarded.
    pub async fn unsubscribe(mut self) -> Result<()> {
        self.done = true;
        self.client.end_subscription(self.id).await
    }

    fn record(&mut self, topic: &str, epoch: u64, offset: u64, ended: bool) {
        match self.positions.get_mut(topic) {
            Some(p) => {
                p.epoch = epoch;
                p.offset = offset;
                p.ended = ended;
            }
            None => {
                self.positions.insert(
                    topic.to_owned(),
                    TopicPosition {
                        topic: topic.to_owned(),
                        epoch,
                        offset,
                        ended,
                    },
                );
            }
        }
    }
}

impl Stream for PatternSubscription {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let push = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(push) => push,
        };
        let delivery = match push {
            Some(Push::Event { epoch, event }) => {
                self.record(&event.topic, epoch, event.offset, false);
                Ok(Delivery::Event(event))
            }
            Some(Push::Gap(gap)) => {
                if gap.event_type.is_none() {
                    if gap.epoch == 0 {
                        self.positions.remove(&gap.topic);
                    } else {
                        self.record(&gap.topic, gap.epoch, gap.current, false);
                    }
                }
                Ok(Delivery::Gap(gap))
            }
            Some(Push::End { topic, last_offset }) => {
                if let Some(p) = self.positions.get_mut(&topic) {
                    p.offset = p.offset.max(last_offset);
                    p.ended = true;
                }
                Ok(Delivery::End { topic, last_offset })
            }
            None => {
                self.done = true;
                Err(take_terminal(&self.terminal))
            }
        };
        Poll::Ready(Some(delivery))
    }
}

impl Drop for PatternSubscription {
    fn drop(&mut self) {
        // Harmless when it already ended: the task ignores unknown ids.
        let _ = self.client.inner().drop_tx.send(self.id);
    }
}

/// Configures a pattern subscription; created by
/// [`Client::subscribe_pattern`].
///
/// ```no_run
/// # async fn demo(client: ringcast_client::Client) -> ringcast_client::Result<()> {
/// use ringcast_client::Delivery;
///
/// let mut orders = client.subscribe_pattern("orders.*").earliest().send().await?;
/// while let Some(delivery) = orders.next_delivery().await {
///     match delivery? {
///         Delivery::Event(e) => println!("{} #{}: {}", e.topic, e.offset, e.event_type),
///         Delivery::Gap(gap) => println!("{}: missed events, refetch", gap.topic),
///         Delivery::End { topic, .. } => println!("{topic} is complete"),
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a subscription starts only with .send().await"]
pub struct PatternSubscribeBuilder {
    pub(crate) client: Client,
    pub(crate) pattern: String,
    pub(crate) types: Vec<String>,
    pub(crate) start: Start,
    pub(crate) positions: Option<Vec<TopicPosition>>,
    pub(crate) buffer: usize,
}

impl PatternSubscribeBuilder {
    /// Receives only events of these types (default: all types).
    pub fn types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.types = types.into_iter().map(Into::into).collect();
        self
    }

    /// The topics matching now deliver only events published from now on
    /// (the default). Topics that start matching later are delivered from
    /// their first event either way.
    pub fn live(mut self) -> Self {
        self.start = Start::Live;
        self
    }

    /// The topics matching now deliver every retained event, then live.
    pub fn earliest(mut self) -> Self {
        self.start = Start::Earliest;
        self
    }

    /// Resumes from positions saved from [`PatternSubscription::positions`]
    /// (in another process): each topic continues after its position, and
    /// every other matching topic is delivered from its first event.
    pub fn resume_from(mut self, positions: impl IntoIterator<Item = TopicPosition>) -> Self {
        self.positions = Some(positions.into_iter().collect());
        self
    }

    /// Deliveries buffered for this subscription (default
    /// [`ClientOptions::subscription_buffer`](crate::ClientOptions::subscription_buffer)).
    pub fn buffer(mut self, deliveries: usize) -> Self {
        self.buffer = deliveries;
        self
    }

    /// Subscribes, waiting for the broker's confirmation.
    pub async fn send(self) -> Result<PatternSubscription> {
        let client = self.client.clone();
        client.start_pattern_subscription(self).await
    }
}

impl IntoFuture for PatternSubscribeBuilder {
    type Output = Result<PatternSubscription>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<PatternSubscription>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use bytes::Bytes;
    use ringcast_protocol::GapReason;

    /// The positions as a map: name → (epoch, offset, ended).
    fn as_map(r: &PatternResume) -> HashMap<String, (u64, u64, bool)> {
        r.positions()
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.topic, (p.epoch, p.offset, p.ended)))
            .collect()
    }

    fn position(topic: &str, epoch: u64, offset: u64, ended: bool) -> TopicPosition {
        TopicPosition {
            topic: topic.into(),
            epoch,
            offset,
            ended,
        }
    }

    fn event(topic: &str, offset: u64) -> WireEvent {
        WireEvent {
            topic: topic.into(),
            offset,
            event_type: "t".into(),
            version: offset,
            timestamp_ms: 0,
            headers: vec![],
            payload: Bytes::new(),
        }
    }

    fn gap(topic: &str, epoch: u64, current: u64) -> WireGap {
        WireGap {
            topic: topic.into(),
            event_type: None,
            reason: GapReason::Retention,
            epoch,
            requested: 0,
            first_available: 0,
            current,
        }
    }

    fn deliver(r: &mut PatternResume, e: &WireEvent) -> bool {
        match r.effect_of_event(e) {
            Some(effect) => {
                r.apply(effect);
                true
            }
            None => false,
        }
    }

    #[test]
    fn a_new_subscription_sends_no_positions_until_the_broker_confirmed_it() {
        let mut r = PatternResume::new(Start::Earliest, None);
        assert_eq!(r.positions(), None);
        r.on_subscribed(&[]);
        assert_eq!(r.positions(), Some(vec![]), "a resume, even with no topic");
    }

    #[test]
    fn each_topic_resumes_after_its_last_delivered_event_in_its_epoch() {
        let mut r = PatternResume::new(Start::Live, None);
        r.on_subscribed(&[position("a", 7, 3, false)]);
        assert!(deliver(&mut r, &event("a", 4)));
        r.on_joined(&position("b", 9, 0, false));
        assert!(deliver(&mut r, &event("b", 1)));
        assert!(deliver(&mut r, &event("b", 2)));
        assert_eq!(r.epoch("b"), Some(9));
        assert_eq!(
            as_map(&r),
            HashMap::from([("a".into(), (7, 4, false)), ("b".into(), (9, 2, false))])
        );
    }

    #[test]
    fn a_resume_keeps_its_own_position_where_the_broker_lists_another_epoch() {
        let mut r = PatternResume::new(Start::Live, Some(vec![position("a", 7, 5, false)]));
        // Recreated while away: the broker lists the new epoch, then a gap.
        r.on_subscribed(&[position("a", 8, 0, false)]);
        assert_eq!(as_map(&r)["a"], (7, 5, false));
        assert_eq!(r.epoch("a"), Some(8));
        r.apply(PatternResume::effect_of_gap(&gap("a", 8, 2)).unwrap());
        assert!(deliver(&mut r, &event("a", 3)));
        assert_eq!(as_map(&r)["a"], (8, 3, false));
    }

    #[test]
    fn repeats_are_dropped_and_ends_and_vanished_topics_are_recorded() {
        let mut r = PatternResume::new(Start::Live, None);
        r.on_subscribed(&[position("a", 7, 3, false), position("b", 9, 10, false)]);
        assert!(!deliver(&mut r, &event("a", 3)), "a repeat");
        r.apply(Effect::End {
            topic: "a".into(),
            last_offset: 3,
        });
        r.apply(PatternResume::effect_of_gap(&gap("b", 0, 0)).unwrap());
        assert_eq!(as_map(&r), HashMap::from([("a".into(), (7, 3, true))]));
        // Not listed again (removed after sealed_ttl): forgotten.
        r.on_subscribed(&[]);
        assert_eq!(r.positions(), Some(vec![]));
    }
}
