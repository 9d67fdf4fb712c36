//! Pattern subscriptions (`SubscribePattern`, protocol version 5): one
//! subscription over every topic a pattern matches, now and later, served
//! by the engine's [`MultiSubscription`].
//!
//! What this adds to the engine: the request's checks ([`selection`]), the
//! wire form of each member's position ([`positions`]), the grants shared
//! with the session so that a `Refresh` applies to topics joining later
//! ([`PatternAccess`]), and the pump ([`pattern_pump`]) that pushes
//! `TopicJoined` before the first delivery of every topic joining after
//! `PatternSubscribed` — events carry no epoch, so that is how the client
//! learns the epoch it resumes that topic with.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use ringcast_protocol::{encode_frame, ErrorCode, ServerMessage, TopicPosition};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::compress::{self, Compression, Meter};
use super::connection::send_charged;
use super::outbound::Outbound;
use super::wire;
use crate::auth::{Action, Principal, TopicPattern};
use crate::conns::SubHandle;
use crate::engine::{
    Delivery, Member, MultiDelivery, MultiSubscription, Position, Selection, Start,
};

/// How often a pattern pump drops ended members whose topic is gone (a
/// sealed topic after `sealed_ttl`), so that a long-lived subscription's
/// positions do not grow with every topic it ever saw.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A `SubscribePattern` as the session hands it over.
pub(crate) struct PatternRequest {
    pub(crate) pattern: String,
    pub(crate) types: Vec<String>,
    pub(crate) start: ringcast_protocol::Start,
    pub(crate) positions: Option<Vec<TopicPosition>>,
}

/// The limits a pattern subscription is held to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PatternLimits {
    /// `limits.max_stream_topics`: one pattern must fit.
    pub(crate) max_stream_topics: usize,
    /// `limits.max_pattern_matches`: 0 turns patterns off.
    pub(crate) max_pattern_matches: usize,
}

/// What the session and a pattern pump share: the grants that decide
/// which topics may join (replaced by a `Refresh`) and the topics being
/// delivered now (which the refreshed grants must still cover).
#[derive(Debug, Clone)]
pub(crate) struct PatternAccess {
    grants: Arc<RwLock<Principal>>,
    topics: Arc<Mutex<HashSet<Arc<str>>>>,
}

impl PatternAccess {
    pub(crate) fn new(principal: Principal) -> Self {
        Self {
            grants: Arc::new(RwLock::new(principal)),
            topics: Arc::default(),
        }
    }

    /// Whether the grants let the subscription read `topic`.
    fn allows(&self, topic: &str) -> bool {
        self.grants.read().may(Action::Subscribe, topic)
    }

    /// Puts `principal`'s grants in force for topics joining from now on,
    /// then says whether they cover every topic being delivered. Both in
    /// this order, so that a topic the pump announces meanwhile is either
    /// checked by the pump against the new grants or seen here.
    pub(crate) fn refresh(&self, principal: &Principal) -> bool {
        *self.grants.write() = principal.clone();
        self.topics
            .lock()
            .iter()
            .all(|t| principal.may(Action::Subscribe, t))
    }

    /// Records that `topic` is delivered from now on, unless the grants
    /// in force no longer cover it (a `Refresh` since it joined).
    fn announce(&self, topic: &Arc<str>) -> bool {
        let mut topics = self.topics.lock();
        if !self.allows(topic) {
            return false;
        }
        topics.insert(topic.clone());
        true
    }

    fn ended(&self, topic: &str) {
        self.topics.lock().remove(topic);
    }
}

/// The engine's selection for `request`, or the error that answers it.
pub(crate) fn selection(
    request: PatternRequest,
    limits: PatternLimits,
    access: &PatternAccess,
) -> Result<Selection, (ErrorCode, String)> {
    if limits.max_pattern_matches == 0 || limits.max_stream_topics == 0 {
        return Err((
            ErrorCode::TooManyTopics,
            "pattern subscriptions are off on this broker (limits.max_pattern_matches = 0)".into(),
        ));
    }
    let pattern = match TopicPattern::compile(&request.pattern, None) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err((
                ErrorCode::InvalidTopic,
                format!(
                    "topic pattern {:?}: {{sub}} is for grants, not subscriptions",
                    request.pattern
                ),
            ))
        }
        Err(e) => return Err((ErrorCode::InvalidTopic, e.to_string())),
    };
    let fresh = match request.start {
        ringcast_protocol::Start::Live => Start::Live,
        ringcast_protocol::Start::Earliest => Start::Earliest,
        other => {
            return Err((
                ErrorCode::InvalidStart,
                format!(
                "a pattern subscription starts Live or Earliest (resume it with positions), not {}",
                match other {
                    ringcast_protocol::Start::AfterOffset { .. } => "AfterOffset",
                    _ => "AfterVersions",
                }
            ),
            ))
        }
    };
    let resumed = request.positions.is_some();
    let listed = request.positions.unwrap_or_default();
    if listed.len() > limits.max_pattern_matches {
        return Err((
            ErrorCode::TooManyTopics,
            format!(
                "{} positions, more than the {} topics a pattern may match (limits.max_pattern_matches)",
                listed.len(),
                limits.max_pattern_matches
            ),
        ));
    }
    let mut positions = HashMap::with_capacity(listed.len());
    for p in listed {
        if let Err(e) = crate::engine::validate_topic(&p.topic) {
            return Err((wire::error_code(&e), format!("positions: {e}")));
        }
        let position = Position {
            epoch: p.epoch,
            offset: p.offset,
            ended: p.ended,
        };
        positions.insert(p.topic, position);
    }
    let filter = access.clone();
    Ok(Selection {
        topics: Vec::new(),
        patterns: vec![pattern],
        types: request.types,
        positions,
        fresh,
        resumed,
        max_matches: limits.max_pattern_matches,
        allow: Arc::new(move |topic: &str| filter.allows(topic)),
    })
}

/// Every member's position as `PatternSubscribed` lists it, by name; the
/// members still delivering are recorded in `access`.
pub(crate) fn positions(multi: &MultiSubscription, access: &PatternAccess) -> Vec<TopicPosition> {
    let mut topics: Vec<TopicPosition> = multi
        .members()
        .map(|m| {
            if m.subscription().is_some() {
                access.topics.lock().insert(m.name.clone());
            }
            topic_position(&m.name, m.position)
        })
        .collect();
    topics.sort_unstable_by(|a, b| a.topic.cmp(&b.topic));
    topics
}

fn topic_position(topic: &str, p: Position) -> TopicPosition {
    TopicPosition {
        topic: topic.to_owned(),
        epoch: p.epoch,
        offset: p.offset,
        ended: p.ended,
    }
}

/// Moves a pattern subscription's deliveries to the connection's writer, as
/// [`pump`](super::connection) does for one topic (chunks of up to `chunk`
/// bytes, shared event frames, pulling only while the connection's budget
/// has room), and:
/// - pushes `TopicJoined` before the first delivery of a topic that was
///   not in `PatternSubscribed` (`live` maps the engine's member index to
///   the topics announced and not ended);
/// - ends the whole subscription with `SubscriptionEnded` when the pattern
///   comes to match too many topics, or a topic joins that refreshed
///   grants no longer cover;
/// - prunes ended members of gone topics now and then.
///
/// The registry knows the subscription as one entry named by the pattern:
/// each hand-off adds its events there. With `compression`, payloads are
/// marked and compressed (see [`compress`]).
#[allow(clippy::too_many_arguments)] // the subscription, the writer, how it stops, the registry, the payloads
pub(crate) async fn pattern_pump(
    mut multi: MultiSubscription,
    subscription_id: u64,
    out: mpsc::Sender<Bytes>,
    outbound: Arc<Outbound>,
    chunk: usize,
    cancel: CancellationToken,
    access: PatternAccess,
    registered: Option<SubHandle>,
    compression: Option<Compression>,
) {
    let mut packing = compression.map(|c| (c, Meter::new("out")));
    // The topics of `PatternSubscribed` still delivering: the client knows them.
    let mut live: HashMap<usize, Arc<str>> = indexed(&multi)
        .into_iter()
        .filter(|(_, m)| m.subscription().is_some())
        .map(|(i, m)| (i, m.name.clone()))
        .collect();
    let mut buf = BytesMut::new();
    let delivered = metrics::counter!(crate::metrics::DELIVERED, "transport" => "tcp");
    let cancelled = cancel.cancelled();
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    prune.reset();
    tokio::pin!(cancelled);
    loop {
        let first = tokio::select! {
            biased;
            _ = &mut cancelled => return,
            _ = prune.tick() => {
                if multi.prune() {
                    live.retain(|&i, name| multi.member(i).is_some_and(|m| m.name == *name));
                }
                continue;
            }
            d = async {
                outbound.room().await.ok()?;
                multi.recv().await
            } => d,
        };
        let Some(mut delivery) = first else { return };
        let mut events = 0;
        let mut ended = false;
        loop {
            let step = put(
                &multi,
                &mut live,
                &access,
                subscription_id,
                delivery,
                &mut buf,
                packing.as_mut().map(|(c, m)| (*c, m)),
            );
            match step {
                Step::Event => events += 1,
                Step::Other => {}
                Step::Over => {
                    ended = true;
                    break;
                }
            }
            if buf.len() >= chunk {
                break;
            }
            match multi.try_recv() {
                Some(d) => delivery = d,
                None => break,
            }
        }
        delivered.increment(events);
        if let Some((_, m)) = &mut packing {
            m.flush();
        }
        if let Some(r) = &registered {
            r.advance(0, 0, events);
        }
        let frames = buf.split().freeze();
        tokio::select! {
            biased;
            _ = &mut cancelled => return,
            r = send_charged(&out, &outbound, frames) => if r.is_err() { return },
        }
        if ended {
            return;
        }
    }
}

/// Every member with its index (as [`MultiDelivery::Topic`] names it).
fn indexed(multi: &MultiSubscription) -> Vec<(usize, &Member)> {
    let total = multi.members().count();
    let mut found = Vec::with_capacity(total);
    // Each member has an index; the free ones in between are few.
    let mut index = 0;
    while found.len() < total {
        if let Some(m) = multi.member(index) {
            found.push((index, m));
        }
        index += 1;
    }
    found
}

/// What one delivery came to.
enum Step {
    Event,
    Other,
    /// The subscription is over.
    Over,
}

/// Appends the frames of one delivery (and the `TopicJoined` before it
/// when its topic is new here); `packing` as for [`compress::put_event`].
fn put(
    multi: &MultiSubscription,
    live: &mut HashMap<usize, Arc<str>>,
    access: &PatternAccess,
    subscription_id: u64,
    delivery: MultiDelivery,
    buf: &mut BytesMut,
    packing: Option<(Compression, &mut Meter)>,
) -> Step {
    let (index, delivery) = match delivery {
        MultiDelivery::Topic { member, delivery } => (member, delivery),
        MultiDelivery::TooManyMatches { limit } => {
            tracing::warn!(
                subscription_id,
                limit,
                "pattern subscription ended: its pattern matches too many topics"
            );
            end(
                buf,
                subscription_id,
                ErrorCode::TooManyTopics,
                format!(
                    "the pattern now matches more than {limit} topics (limits.max_pattern_matches); narrow it"
                ),
            );
            return Step::Over;
        }
    };
    let member = multi.member(index);
    let name = match live.get(&index) {
        Some(name) => name.clone(),
        // Deleted before anything of it went out: the client never knew it.
        None if member.is_none() => return Step::Other,
        None => {
            let Some(m) = member else { return Step::Other };
            let name = m.name.clone();
            // A topic gone while away (no subscription, one gap of epoch
            // 0): the client drops its position, nothing joins.
            let vanished = m.subscription().is_none() && !matches!(delivery, Delivery::End { .. });
            if !vanished {
                if !access.announce(&name) {
                    tracing::info!(subscription_id, topic = %name, "pattern subscription ended: the refreshed credentials do not cover a topic it matches");
                    end(
                        buf,
                        subscription_id,
                        ErrorCode::Forbidden,
                        format!("the credentials in force do not grant subscribe on {name:?}, which the pattern matches"),
                    );
                    return Step::Over;
                }
                let before = match &delivery {
                    Delivery::Event(e) => e.offset.saturating_sub(1),
                    Delivery::Gap(g) => g.requested,
                    Delivery::End { last_offset } => *last_offset,
                };
                let joined = ServerMessage::TopicJoined {
                    subscription_id,
                    position: TopicPosition {
                        topic: name.to_string(),
                        epoch: m.position.epoch,
                        offset: before,
                        ended: false,
                    },
                };
                encode(&joined, buf);
                live.insert(index, name.clone());
            }
            name
        }
    };
    match delivery {
        Delivery::Event(e) => {
            let sub = member.and_then(|m| m.subscription());
            compress::put_event(buf, subscription_id, &name, &e, sub, packing);
            return Step::Event;
        }
        Delivery::Gap(g) => {
            tracing::debug!(subscription_id, topic = %g.topic, reason = g.reason.as_str(), "pattern subscription gap");
            let msg = ServerMessage::Gap {
                subscription_id,
                gap: wire::gap(g),
            };
            encode(&msg, buf);
        }
        Delivery::End { last_offset } => {
            live.remove(&index);
            access.ended(&name);
            let msg = ServerMessage::End {
                subscription_id,
                topic: name.to_string(),
                last_offset,
            };
            encode(&msg, buf);
        }
    }
    Step::Other
}

fn end(buf: &mut BytesMut, subscription_id: u64, code: ErrorCode, message: String) {
    let msg = ServerMessage::SubscriptionEnded {
        subscription_id,
        code,
        message,
    };
    encode(&msg, buf);
}

fn encode(msg: &ServerMessage, buf: &mut BytesMut) {
    if let Err(e) = encode_frame(msg, buf) {
        tracing::error!(error = %e, kind = msg.kind(), "cannot encode a pattern subscription push");
    }
}
