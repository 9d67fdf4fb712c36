//! Conversions between engine values and wire messages.

use ringcast_protocol as proto;

use crate::conns::ConnInfo;
use crate::engine::{
    Ack, EngineError, Event, Gap, GapReason, GroupConfig, GroupInfo, GroupStart, NewEvent, Settle,
    Start, TopicInfo,
};

pub(crate) fn start(s: proto::Start) -> Start {
    match s {
        proto::Start::Live => Start::Live,
        proto::Start::Earliest => Start::Earliest,
        proto::Start::AfterOffset { epoch, offset } => Start::AfterOffset { epoch, offset },
        proto::Start::AfterVersions { epoch, versions } => Start::AfterVersions { epoch, versions },
    }
}

pub(crate) fn new_event(e: proto::NewEvent) -> NewEvent {
    append_event(e.into())
}

pub(crate) fn append_event(e: proto::AppendEvent) -> NewEvent {
    NewEvent {
        event_type: e.event_type,
        headers: e.headers,
        payload: e.payload,
        idempotency_key: e.idempotency_key,
    }
}

pub(crate) fn append_ack(a: Ack) -> proto::AppendAck {
    proto::AppendAck {
        epoch: a.epoch,
        offset: a.offset,
        version: a.version,
        duplicate: a.duplicate,
    }
}

pub(crate) fn ack(a: Ack) -> proto::Ack {
    proto::Ack {
        epoch: a.epoch,
        offset: a.offset,
        version: a.version,
    }
}

pub(crate) fn connection(c: ConnInfo) -> proto::WireConnection {
    proto::WireConnection {
        id: c.id,
        kind: c.kind.as_str().to_owned(),
        peer: c.peer.to_string(),
        subject: c.subject,
        since_ms: c.since_ms,
        delivered: c.delivered,
        subscriptions: c.subscriptions,
    }
}

pub(crate) fn event(topic: &str, e: &Event) -> proto::WireEvent {
    proto::WireEvent {
        topic: topic.to_owned(),
        offset: e.offset,
        event_type: e.event_type.to_string(),
        version: e.version,
        timestamp_ms: e.timestamp_ms,
        headers: e.headers.clone(),
        payload: e.payload.clone(),
    }
}

/// The engine's event as the protocol's borrowed `WireEvent`.
pub(crate) fn event_ref<'a>(topic: &'a str, e: &'a Event) -> proto::EventRef<'a> {
    proto::EventRef {
        topic,
        offset: e.offset,
        event_type: &e.event_type,
        version: e.version,
        timestamp_ms: e.timestamp_ms,
        headers: &e.headers,
        payload: &e.payload,
    }
}

pub(crate) fn gap(g: Gap) -> proto::WireGap {
    proto::WireGap {
        topic: g.topic,
        event_type: g.event_type,
        reason: match g.reason {
            GapReason::Retention => proto::GapReason::Retention,
            GapReason::EpochChanged => proto::GapReason::EpochChanged,
            GapReason::SlowConsumer => proto::GapReason::SlowConsumer,
        },
        epoch: g.epoch,
        requested: g.requested,
        first_available: g.first_available,
        current: g.current,
    }
}

pub(crate) fn info(i: TopicInfo) -> proto::WireTopicInfo {
    proto::WireTopicInfo {
        name: i.name,
        epoch: i.epoch,
        first_offset: i.first_offset,
        last_offset: i.last_offset,
        versions: i.versions,
        max_events: i.retention.max_events,
        max_age_ms: i
            .retention
            .max_age
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        max_bytes: i.retention.max_bytes,
        retained_events: i.retained_events,
        retained_bytes: i.retained_bytes,
        subscribers: u32::try_from(i.subscribers).unwrap_or(u32::MAX),
        sealed: i.sealed,
    }
}

pub(crate) fn error_code(e: &EngineError) -> proto::ErrorCode {
    use proto::ErrorCode as C;
    match e {
        EngineError::InvalidTopic(_) => C::InvalidTopic,
        EngineError::InvalidType(_) => C::InvalidType,
        EngineError::InvalidHeaders(_)
        | EngineError::EmptyBatch
        | EngineError::InvalidRequest(_)
        | EngineError::InvalidKey(_) => C::InvalidRequest,
        EngineError::PositionMismatch { .. } => C::PositionMismatch,
        EngineError::PayloadTooLarge { .. } => C::PayloadTooLarge,
        EngineError::TopicNotFound(_) => C::TopicNotFound,
        EngineError::TopicSealed(_) => C::TopicSealed,
        EngineError::TooManyTopics(_) => C::TooManyTopics,
        EngineError::OverCapacity(_) | EngineError::TopicFull { .. } => C::OverCapacity,
        EngineError::TooManyGroups(_) => C::TooManyTopics,
        EngineError::GroupNotFound(_) => C::GroupNotFound,
        EngineError::InvalidGroup(_) => C::InvalidRequest,
        EngineError::InvalidStart(_) => C::InvalidStart,
        EngineError::TooManyMatches(_) => C::TooManyTopics,
        EngineError::Storage(_) | EngineError::StorageUnavailable(_) => C::Internal,
        EngineError::ShuttingDown => C::ShuttingDown,
    }
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn group_config(o: proto::GroupOptions) -> GroupConfig {
    use std::time::Duration;
    GroupConfig {
        start: match o.start {
            proto::GroupStart::Earliest => GroupStart::Earliest,
            proto::GroupStart::Live => GroupStart::Live,
            proto::GroupStart::AfterOffset(n) => GroupStart::AfterOffset(n),
        },
        ack_wait: Duration::from_millis(o.ack_wait_ms),
        max_deliver: o.max_deliver,
        backoff: o
            .backoff_ms
            .into_iter()
            .map(Duration::from_millis)
            .collect(),
        max_ack_pending: o.max_ack_pending,
        dead_letter_topic: o.dead_letter_topic,
    }
}

pub(crate) fn group_options(c: &GroupConfig) -> proto::GroupOptions {
    proto::GroupOptions {
        start: match c.start {
            GroupStart::Earliest => proto::GroupStart::Earliest,
            GroupStart::Live => proto::GroupStart::Live,
            GroupStart::AfterOffset(n) => proto::GroupStart::AfterOffset(n),
        },
        ack_wait_ms: ms(c.ack_wait),
        max_deliver: c.max_deliver,
        backoff_ms: c.backoff.iter().map(|d| ms(*d)).collect(),
        max_ack_pending: c.max_ack_pending,
        dead_letter_topic: c.dead_letter_topic.clone(),
    }
}

pub(crate) fn settle(a: proto::SettleAction) -> Settle {
    match a {
        proto::SettleAction::Ack => Settle::Ack,
        proto::SettleAction::Nack(delay) => {
            Settle::Nack(delay.map(std::time::Duration::from_millis))
        }
        proto::SettleAction::InProgress => Settle::InProgress,
        proto::SettleAction::Term(reason) => Settle::Term(reason),
    }
}

pub(crate) fn group_info(i: GroupInfo) -> proto::WireGroupInfo {
    proto::WireGroupInfo {
        topic: i.topic,
        group: i.group,
        options: group_options(&i.config),
        dead_letter_topic: i.dead_letter_topic,
        epoch: i.epoch,
        ack_floor: i.ack_floor,
        next_offset: i.next_offset,
        last_offset: i.last_offset,
        lag: i.lag,
        pending: i.pending,
        in_flight: i.in_flight,
        oldest_pending_ms: i.oldest_pending_ms,
        members: i
            .members
            .into_iter()
            .map(|m| proto::WireMember {
                consumer: m.consumer,
                sessions: m.sessions,
                in_flight: m.in_flight,
                max_in_flight: m.max_in_flight,
                idle_ms: m.idle_ms,
            })
            .collect(),
        delivered: i.delivered,
        redelivered: i.redelivered,
        acked: i.acked,
        dead_lettered: i.dead_lettered,
        lost: i.lost,
        pending_sample: i
            .pending_sample
            .into_iter()
            .map(|p| proto::WirePending {
                offset: p.offset,
                attempt: p.attempt,
                consumer: p.consumer,
                due_in_ms: p.due_in_ms,
                first_delivered_ms: p.first_delivered_ms,
            })
            .collect(),
    }
}

/// A `ServerMessage::Delivery` (tag 20) serialized straight from the
/// engine's shared event: the same bytes as the owned message, without
/// copying the topic, type and headers for every delivery.
pub(crate) struct DeliveryRef<'a> {
    pub subscription_id: u64,
    pub attempt: u32,
    pub topic: &'a str,
    pub event: &'a Event,
    /// The payload as it goes on the wire: the event's, or marked (and
    /// compressed) on a connection with compression on.
    pub payload: &'a [u8],
}

/// The `Delivery` variant's tag (its position in `ServerMessage`).
const DELIVERY_TAG: u32 = 20;

impl serde::Serialize for DeliveryRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStructVariant;
        let mut v = s.serialize_struct_variant("ServerMessage", DELIVERY_TAG, "Delivery", 3)?;
        v.serialize_field("subscription_id", &self.subscription_id)?;
        v.serialize_field("attempt", &self.attempt)?;
        v.serialize_field(
            "event",
            &EventRef {
                topic: self.topic,
                event: self.event,
                payload: self.payload,
            },
        )?;
        v.end()
    }
}

/// A `WireEvent` borrowed from the engine's event (same field order), with
/// the payload as it goes on the wire.
struct EventRef<'a> {
    topic: &'a str,
    event: &'a Event,
    payload: &'a [u8],
}

impl serde::Serialize for EventRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let e = self.event;
        let mut v = s.serialize_struct("WireEvent", 7)?;
        v.serialize_field("topic", self.topic)?;
        v.serialize_field("offset", &e.offset)?;
        v.serialize_field("event_type", &*e.event_type)?;
        v.serialize_field("version", &e.version)?;
        v.serialize_field("timestamp_ms", &e.timestamp_ms)?;
        v.serialize_field("headers", &e.headers)?;
        v.serialize_field("payload", serde_bytes::Bytes::new(self.payload))?;
        v.end()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::{Bytes, BytesMut};
    use ringcast_protocol::{encode_frame, ServerMessage};

    use super::*;

    #[test]
    fn the_protocol_and_the_engine_agree_on_group_defaults() {
        // Two crates spell the defaults (the protocol's for SDKs, the
        // engine's for HTTP and config); they must not drift apart.
        assert_eq!(
            group_config(ringcast_protocol::GroupOptions::default()),
            GroupConfig::default()
        );
    }

    #[test]
    fn a_borrowed_delivery_encodes_as_the_owned_message() {
        let event = Event::new(
            9,
            4,
            1_700_000_000_000,
            Arc::from("created"),
            vec![("k".into(), "v".into()), ("trace".into(), "t-1".into())],
            Bytes::from_static(b"{\"a\":1}"),
        );
        for (sid, attempt) in [(0, 1), (7, 3), (u64::MAX, u32::MAX)] {
            let mut borrowed = BytesMut::new();
            encode_frame(
                &DeliveryRef {
                    subscription_id: sid,
                    attempt,
                    topic: "orders",
                    event: &event,
                    payload: &event.payload,
                },
                &mut borrowed,
            )
            .unwrap();
            let mut owned = BytesMut::new();
            encode_frame(
                &ServerMessage::Delivery {
                    subscription_id: sid,
                    attempt,
                    event: super::event("orders", &event),
                },
                &mut owned,
            )
            .unwrap();
            assert_eq!(borrowed, owned, "subscription {sid}, attempt {attempt}");
        }
    }
}
