//! Shared by the integration tests: one sample of every message kind (the
//! source of `tests/vectors.txt`) and proptest strategies for every type.

#![allow(dead_code)] // each test binary uses its own part of this module

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use ringcast_protocol::{
    decode_body, encode_frame, Ack, AppendAck, AppendEvent, ClientMessage, Codec,
    CompressionChoice, CompressionOffer, ErrorCode, GapReason, GroupOptions, GroupStart, Headers,
    NewEvent, ProtocolError, ServerMessage, SettleAction, Start, TopicPosition, TopicSummary,
    WireConnSubscription, WireConnection, WireEvent, WireGap, WireGroupInfo, WireMember,
    WirePending, WireTopicInfo, PROTOCOL_VERSION,
};

/// A message of either direction, so both can share one list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyMessage {
    Client(ClientMessage),
    Server(ServerMessage),
}

impl AnyMessage {
    /// The full frame (length prefix and body).
    pub fn frame(&self) -> Vec<u8> {
        let mut buf = BytesMut::new();
        match self {
            AnyMessage::Client(m) => encode_frame(m, &mut buf),
            AnyMessage::Server(m) => encode_frame(m, &mut buf),
        }
        .expect("sample messages encode");
        buf.to_vec()
    }

    /// Decodes a body as a message of the same direction as `self`.
    pub fn decode_like(&self, body: &[u8]) -> Result<AnyMessage, ProtocolError> {
        match self {
            AnyMessage::Client(_) => decode_body(body).map(AnyMessage::Client),
            AnyMessage::Server(_) => decode_body(body).map(AnyMessage::Server),
        }
    }
}

/// The variant name (the crate's exhaustive `kind`), used to check that
/// every variant has a sample and so a test vector.
pub fn client_variant(m: &ClientMessage) -> &'static str {
    m.kind()
}

/// See [`client_variant`].
pub fn server_variant(m: &ServerMessage) -> &'static str {
    m.kind()
}

/// Every variant of `Start`, exhaustively (see [`client_variant`]).
pub fn start_variant(s: &Start) -> &'static str {
    match s {
        Start::Live => "Live",
        Start::Earliest => "Earliest",
        Start::AfterOffset { .. } => "AfterOffset",
        Start::AfterVersions { .. } => "AfterVersions",
    }
}

/// Every variant of `GapReason`, exhaustively (see [`client_variant`]).
pub fn gap_reason_variant(r: GapReason) -> &'static str {
    match r {
        GapReason::Retention => "Retention",
        GapReason::EpochChanged => "EpochChanged",
        GapReason::SlowConsumer => "SlowConsumer",
    }
}

/// Every variant of `GroupStart`, exhaustively (see [`client_variant`]).
pub fn group_start_variant(s: &GroupStart) -> &'static str {
    match s {
        GroupStart::Earliest => "Earliest",
        GroupStart::Live => "Live",
        GroupStart::AfterOffset(_) => "AfterOffset",
    }
}

/// Every variant of `SettleAction`, exhaustively (see [`client_variant`]).
pub fn settle_action_variant(a: &SettleAction) -> &'static str {
    match a {
        SettleAction::Ack => "Ack",
        SettleAction::Nack(_) => "Nack",
        SettleAction::InProgress => "InProgress",
        SettleAction::Term(_) => "Term",
    }
}

const EPOCH: u64 = 0x0123_4567_89ab_cdef;

/// The membership id of the group samples (the subscriptions use 1).
const MEMBERSHIP: u64 = 2;

fn sample_options(start: GroupStart, dead_letter_topic: Option<&str>) -> GroupOptions {
    GroupOptions {
        start,
        ack_wait_ms: 30_000,
        max_deliver: 5,
        backoff_ms: vec![1_000, 5_000],
        max_ack_pending: 1_000,
        dead_letter_topic: dead_letter_topic.map(str::to_owned),
    }
}

fn create_group(request_id: u64, start: GroupStart, update: bool) -> ClientMessage {
    ClientMessage::CreateGroup {
        request_id,
        topic: "orders".to_owned(),
        group: "workers".to_owned(),
        options: sample_options(start, update.then_some("orders.failed")),
        update,
    }
}

fn settle(action: SettleAction) -> ClientMessage {
    ClientMessage::Settle {
        request_id: 16,
        subscription_id: MEMBERSHIP,
        offsets: vec![42],
        action,
    }
}

fn sample_group_info() -> WireGroupInfo {
    WireGroupInfo {
        topic: "orders".to_owned(),
        group: "workers".to_owned(),
        options: sample_options(GroupStart::Earliest, None),
        dead_letter_topic: "orders.dlq".to_owned(),
        epoch: EPOCH,
        ack_floor: 41,
        next_offset: 44,
        last_offset: 52,
        lag: 9,
        pending: 2,
        in_flight: 1,
        oldest_pending_ms: 1_500,
        members: vec![WireMember {
            consumer: "w1".to_owned(),
            sessions: 1,
            in_flight: 1,
            max_in_flight: 10,
            idle_ms: 20,
        }],
        delivered: 4,
        redelivered: 1,
        acked: 1,
        dead_lettered: 0,
        lost: 0,
        pending_sample: vec![
            WirePending {
                offset: 42,
                attempt: 2,
                consumer: Some("w1".to_owned()),
                due_in_ms: 28_500,
                first_delivered_ms: 1_700_000_000_042,
            },
            WirePending {
                offset: 43,
                attempt: 1,
                consumer: None,
                due_in_ms: 1_000,
                first_delivered_ms: 1_700_000_000_043,
            },
        ],
    }
}

fn headers() -> Headers {
    vec![("trace".to_owned(), "t1".to_owned())]
}

fn event(offset: u64) -> WireEvent {
    WireEvent {
        topic: "orders".to_owned(),
        offset,
        event_type: "created".to_owned(),
        version: offset,
        timestamp_ms: 1_700_000_000_000 + offset,
        headers: headers(),
        payload: Bytes::from_static(br#"{"id":1}"#),
    }
}

fn subscribe(start: Start) -> ClientMessage {
    ClientMessage::Subscribe {
        request_id: 3,
        subscription_id: 1,
        topic: "orders".to_owned(),
        types: vec!["created".to_owned()],
        start,
    }
}

fn gap(reason: GapReason, event_type: Option<&str>) -> ServerMessage {
    ServerMessage::Gap {
        subscription_id: 1,
        gap: WireGap {
            topic: "orders".to_owned(),
            event_type: event_type.map(str::to_owned),
            reason,
            epoch: EPOCH,
            requested: 10,
            first_available: 42,
            current: 50,
        },
    }
}

/// One sample per message kind, named `client.<Variant>[.<detail>]` or
/// `server.<Variant>[.<detail>]`; the names are the keys of `vectors.txt`.
pub fn samples() -> Vec<(&'static str, AnyMessage)> {
    use AnyMessage::{Client as C, Server as S};
    vec![
        (
            "client.Hello",
            C(ClientMessage::Hello {
                protocol_version: PROTOCOL_VERSION,
                client_name: "rc".to_owned(),
                credentials: Some("tok".to_owned()),
            }),
        ),
        (
            "client.Hello.NoCredentials",
            C(ClientMessage::Hello {
                protocol_version: PROTOCOL_VERSION,
                client_name: "rc".to_owned(),
                credentials: None,
            }),
        ),
        (
            "client.HelloExt",
            C(ClientMessage::HelloExt {
                protocol_version: PROTOCOL_VERSION,
                client_name: "rc".to_owned(),
                credentials: None,
                compression: CompressionOffer {
                    codecs: vec![Codec::LZ4],
                    min_size: 1024,
                },
            }),
        ),
        (
            "client.Publish",
            C(ClientMessage::Publish {
                request_id: 1,
                topic: "orders".to_owned(),
                event_type: "created".to_owned(),
                headers: headers(),
                payload: Bytes::from_static(br#"{"id":1}"#),
            }),
        ),
        (
            // On a connection with compression on: the payload is marked,
            // here LZ4 (docs/protocol.md, "Payload compression").
            "client.Publish.Lz4",
            C(ClientMessage::Publish {
                request_id: 1,
                topic: "orders".to_owned(),
                event_type: "created".to_owned(),
                headers: Vec::new(),
                payload: Bytes::from(
                    hex::decode("0100000033af7b2274657874223a22610100106061616161227d")
                        .expect("hex"),
                ),
            }),
        ),
        (
            "client.PublishBatch",
            C(ClientMessage::PublishBatch {
                request_id: 2,
                topic: "orders".to_owned(),
                events: vec![
                    NewEvent {
                        event_type: "created".to_owned(),
                        headers: Vec::new(),
                        payload: Bytes::from_static(b"a"),
                    },
                    NewEvent {
                        event_type: "paid".to_owned(),
                        headers: headers(),
                        payload: Bytes::new(),
                    },
                ],
            }),
        ),
        ("client.Subscribe.Live", C(subscribe(Start::Live))),
        ("client.Subscribe.Earliest", C(subscribe(Start::Earliest))),
        (
            "client.Subscribe.AfterOffset",
            C(subscribe(Start::AfterOffset {
                epoch: EPOCH,
                offset: 41,
            })),
        ),
        (
            "client.Subscribe.AfterVersions",
            C(subscribe(Start::AfterVersions {
                epoch: EPOCH,
                versions: vec![("created".to_owned(), 7), ("paid".to_owned(), 2)],
            })),
        ),
        (
            "client.Unsubscribe",
            C(ClientMessage::Unsubscribe {
                request_id: 4,
                subscription_id: 1,
            }),
        ),
        (
            "client.History",
            C(ClientMessage::History {
                request_id: 5,
                topic: "orders".to_owned(),
                after: 0,
                types: Vec::new(),
                limit: 100,
            }),
        ),
        (
            "client.ListTopics",
            C(ClientMessage::ListTopics { request_id: 6 }),
        ),
        (
            "client.TopicInfo",
            C(ClientMessage::TopicInfo {
                request_id: 7,
                topic: "orders".to_owned(),
            }),
        ),
        (
            "client.Seal",
            C(ClientMessage::Seal {
                request_id: 8,
                topic: "orders".to_owned(),
            }),
        ),
        (
            "client.Delete",
            C(ClientMessage::Delete {
                request_id: 9,
                topic: "orders".to_owned(),
            }),
        ),
        ("client.Ping", C(ClientMessage::Ping { request_id: 10 })),
        (
            "client.Refresh",
            C(ClientMessage::Refresh {
                request_id: 11,
                credentials: "tok2".to_owned(),
            }),
        ),
        (
            "client.Append",
            C(ClientMessage::Append {
                request_id: 12,
                topic: "orders".to_owned(),
                events: vec![
                    AppendEvent {
                        event_type: "created".to_owned(),
                        headers: headers(),
                        payload: Bytes::from_static(b"a"),
                        idempotency_key: Some("k1".to_owned()),
                    },
                    AppendEvent {
                        event_type: "created".to_owned(),
                        headers: Vec::new(),
                        payload: Bytes::new(),
                        idempotency_key: None,
                    },
                ],
                expected_offset: Some(50),
                expected_version: None,
            }),
        ),
        (
            "client.CreateGroup",
            C(create_group(13, GroupStart::Earliest, false)),
        ),
        (
            "client.CreateGroup.Live",
            C(create_group(13, GroupStart::Live, true)),
        ),
        (
            "client.CreateGroup.AfterOffset",
            C(create_group(13, GroupStart::AfterOffset(41), false)),
        ),
        (
            "client.JoinGroup",
            C(ClientMessage::JoinGroup {
                request_id: 14,
                subscription_id: MEMBERSHIP,
                topic: "orders".to_owned(),
                group: "workers".to_owned(),
                consumer: "w1".to_owned(),
                max_in_flight: 10,
                create: None,
            }),
        ),
        (
            "client.JoinGroup.Create",
            C(ClientMessage::JoinGroup {
                request_id: 14,
                subscription_id: MEMBERSHIP,
                topic: "orders".to_owned(),
                group: "workers".to_owned(),
                consumer: "w1".to_owned(),
                max_in_flight: 0,
                create: Some(GroupOptions::default()),
            }),
        ),
        (
            "client.LeaveGroup",
            C(ClientMessage::LeaveGroup {
                request_id: 15,
                subscription_id: MEMBERSHIP,
            }),
        ),
        ("client.Settle.Ack", C(settle(SettleAction::Ack))),
        (
            "client.Settle.Nack",
            C(settle(SettleAction::Nack(Some(500)))),
        ),
        (
            "client.Settle.NackWithBackoff",
            C(settle(SettleAction::Nack(None))),
        ),
        (
            "client.Settle.InProgress",
            C(settle(SettleAction::InProgress)),
        ),
        (
            "client.Settle.Term",
            C(settle(SettleAction::Term("bad input".to_owned()))),
        ),
        (
            "client.GroupInfo",
            C(ClientMessage::GroupInfo {
                request_id: 17,
                topic: "orders".to_owned(),
                group: "workers".to_owned(),
            }),
        ),
        (
            "client.ListGroups",
            C(ClientMessage::ListGroups {
                request_id: 18,
                topic: "orders".to_owned(),
            }),
        ),
        (
            "client.DeleteGroup",
            C(ClientMessage::DeleteGroup {
                request_id: 19,
                topic: "orders".to_owned(),
                group: "workers".to_owned(),
            }),
        ),
        (
            "client.Redrive",
            C(ClientMessage::Redrive {
                request_id: 20,
                topic: "orders".to_owned(),
                group: "workers".to_owned(),
            }),
        ),
        (
            "client.ListConnections",
            C(ClientMessage::ListConnections {
                request_id: 21,
                after: 0,
                limit: 100,
            }),
        ),
        (
            "client.CloseConnection",
            C(ClientMessage::CloseConnection {
                request_id: 22,
                connection_id: 7,
            }),
        ),
        (
            "client.SubscribePattern",
            C(ClientMessage::SubscribePattern {
                request_id: 23,
                subscription_id: PATTERN_SUBSCRIPTION,
                pattern: "orders.*".to_owned(),
                types: vec![],
                start: Start::Live,
                positions: None,
            }),
        ),
        (
            "client.SubscribePattern.Resume",
            C(ClientMessage::SubscribePattern {
                request_id: 24,
                subscription_id: PATTERN_SUBSCRIPTION,
                pattern: "orders.*".to_owned(),
                types: vec!["created".to_owned()],
                start: Start::Live,
                positions: Some(vec![
                    sample_position("orders.eu", 42, false),
                    sample_position("orders.us", 7, true),
                ]),
            }),
        ),
        (
            "server.Welcome",
            S(ServerMessage::Welcome {
                server_version: "0.1.0".to_owned(),
                protocol_version: PROTOCOL_VERSION,
                max_frame: 16 * 1024 * 1024,
                max_payload: 1024 * 1024,
                max_subscriptions: 1024,
                heartbeat_ms: 15_000,
            }),
        ),
        (
            "server.WelcomeExt",
            S(ServerMessage::WelcomeExt {
                server_version: "0.1.0".to_owned(),
                protocol_version: PROTOCOL_VERSION,
                max_frame: 16 * 1024 * 1024,
                max_payload: 1024 * 1024,
                max_subscriptions: 1024,
                heartbeat_ms: 15_000,
                compression: CompressionChoice {
                    codec: Codec::LZ4,
                    min_size: 1024,
                },
            }),
        ),
        (
            "server.WelcomeExt.Off",
            S(ServerMessage::WelcomeExt {
                server_version: "0.1.0".to_owned(),
                protocol_version: PROTOCOL_VERSION,
                max_frame: 16 * 1024 * 1024,
                max_payload: 1024 * 1024,
                max_subscriptions: 1024,
                heartbeat_ms: 15_000,
                compression: CompressionChoice::OFF,
            }),
        ),
        (
            "server.Published",
            S(ServerMessage::Published {
                request_id: 2,
                results: vec![
                    Ack {
                        epoch: EPOCH,
                        offset: 51,
                        version: 8,
                    },
                    Ack {
                        epoch: EPOCH,
                        offset: 52,
                        version: 3,
                    },
                ],
            }),
        ),
        (
            "server.Subscribed",
            S(ServerMessage::Subscribed {
                request_id: 3,
                subscription_id: 1,
                epoch: EPOCH,
                next_offset: 51,
            }),
        ),
        (
            "server.Unsubscribed",
            S(ServerMessage::Unsubscribed {
                request_id: 4,
                subscription_id: 1,
            }),
        ),
        (
            "server.Event",
            S(ServerMessage::Event {
                subscription_id: 1,
                event: event(42),
            }),
        ),
        (
            // On a connection with compression on, a payload below
            // `min_size` (or that LZ4 cannot shrink) goes raw, marked 00.
            "server.Event.Raw",
            S(ServerMessage::Event {
                subscription_id: 1,
                event: WireEvent {
                    payload: Bytes::from_static(b"\x00{\"id\":1}"),
                    ..event(42)
                },
            }),
        ),
        ("server.Gap.Retention", S(gap(GapReason::Retention, None))),
        (
            "server.Gap.EpochChanged",
            S(gap(GapReason::EpochChanged, None)),
        ),
        (
            "server.Gap.SlowConsumer",
            S(gap(GapReason::SlowConsumer, Some("created"))),
        ),
        (
            "server.End",
            S(ServerMessage::End {
                subscription_id: 1,
                topic: "orders".to_owned(),
                last_offset: 52,
            }),
        ),
        (
            "server.History",
            S(ServerMessage::History {
                request_id: 5,
                events: vec![event(42), event(43)],
                next_after: 43,
                first_available: 42,
            }),
        ),
        (
            "server.Topics",
            S(ServerMessage::Topics {
                request_id: 6,
                topics: vec![TopicSummary {
                    name: "orders".to_owned(),
                    epoch: EPOCH,
                    last_offset: 52,
                    sealed: false,
                }],
            }),
        ),
        (
            "server.TopicInfo",
            S(ServerMessage::TopicInfo {
                request_id: 7,
                info: WireTopicInfo {
                    name: "orders".to_owned(),
                    epoch: EPOCH,
                    first_offset: 42,
                    last_offset: 52,
                    versions: vec![("created".to_owned(), 8), ("paid".to_owned(), 3)],
                    max_events: 10_000,
                    max_age_ms: 86_400_000,
                    max_bytes: 64 * 1024 * 1024,
                    retained_events: 11,
                    retained_bytes: 512,
                    subscribers: 2,
                    sealed: true,
                },
            }),
        ),
        ("server.Ok", S(ServerMessage::Ok { request_id: 8 })),
        ("server.Pong", S(ServerMessage::Pong { request_id: 10 })),
        (
            "server.Error",
            S(ServerMessage::Error {
                request_id: Some(1),
                code: ErrorCode::TopicSealed,
                message: "sealed".to_owned(),
            }),
        ),
        (
            "server.Error.Fatal",
            S(ServerMessage::Error {
                request_id: None,
                code: ErrorCode::UnsupportedVersion,
                message: "v9".to_owned(),
            }),
        ),
        ("server.Heartbeat", S(ServerMessage::Heartbeat)),
        (
            "server.Shutdown",
            S(ServerMessage::Shutdown {
                reason: "bye".to_owned(),
            }),
        ),
        (
            "server.Error.TokenExpired",
            S(ServerMessage::Error {
                request_id: None,
                code: ErrorCode::TokenExpired,
                message: "expired".to_owned(),
            }),
        ),
        (
            "server.Error.Forbidden",
            S(ServerMessage::Error {
                request_id: Some(3),
                code: ErrorCode::Forbidden,
                message: "no".to_owned(),
            }),
        ),
        (
            "server.Refreshed",
            S(ServerMessage::Refreshed {
                request_id: 11,
                expires_at_ms: 1_700_000_060_000,
            }),
        ),
        (
            "server.RetryLater",
            S(ServerMessage::RetryLater {
                request_id: Some(1),
                code: ErrorCode::RateLimited,
                message: "slow down".to_owned(),
                retry_after_ms: 250,
            }),
        ),
        (
            "server.RetryLater.Connection",
            S(ServerMessage::RetryLater {
                request_id: None,
                code: ErrorCode::RateLimited,
                message: "later".to_owned(),
                retry_after_ms: 1000,
            }),
        ),
        (
            "server.Appended",
            S(ServerMessage::Appended {
                request_id: 12,
                results: vec![
                    AppendAck {
                        epoch: EPOCH,
                        offset: 44,
                        version: 7,
                        duplicate: true,
                    },
                    AppendAck {
                        epoch: EPOCH,
                        offset: 51,
                        version: 8,
                        duplicate: false,
                    },
                ],
            }),
        ),
        (
            "server.PositionMismatch",
            S(ServerMessage::PositionMismatch {
                request_id: 12,
                message: "moved".to_owned(),
                current_offset: 52,
                current_version: 8,
            }),
        ),
        (
            "server.Joined",
            S(ServerMessage::Joined {
                request_id: 14,
                subscription_id: MEMBERSHIP,
                epoch: EPOCH,
            }),
        ),
        (
            "server.Delivery",
            S(ServerMessage::Delivery {
                subscription_id: MEMBERSHIP,
                attempt: 1,
                event: event(42),
            }),
        ),
        (
            "server.Settled",
            S(ServerMessage::Settled {
                request_id: 16,
                applied: 1,
                already_done: 0,
                unknown: 0,
            }),
        ),
        (
            "server.GroupInfo",
            S(ServerMessage::GroupInfo {
                request_id: 17,
                info: sample_group_info(),
            }),
        ),
        (
            "server.Groups",
            S(ServerMessage::Groups {
                request_id: 18,
                groups: vec![sample_group_info()],
            }),
        ),
        (
            "server.Redriven",
            S(ServerMessage::Redriven {
                request_id: 20,
                count: 3,
            }),
        ),
        (
            "server.Gap.Group",
            S(ServerMessage::Gap {
                subscription_id: MEMBERSHIP,
                gap: WireGap {
                    topic: "orders".to_owned(),
                    event_type: None,
                    reason: GapReason::Retention,
                    epoch: EPOCH,
                    requested: 43,
                    first_available: 48,
                    current: 52,
                },
            }),
        ),
        (
            "server.Error.GroupNotFound",
            S(ServerMessage::Error {
                request_id: Some(14),
                code: ErrorCode::GroupNotFound,
                message: "orders/workers".to_owned(),
            }),
        ),
        (
            "server.Connections",
            S(ServerMessage::Connections {
                request_id: 21,
                connections: vec![sample_connection()],
                next_after: 0,
            }),
        ),
        (
            "server.Error.ConnectionNotFound",
            S(ServerMessage::Error {
                request_id: Some(22),
                code: ErrorCode::ConnectionNotFound,
                message: "7".to_owned(),
            }),
        ),
        (
            "server.PatternSubscribed",
            S(ServerMessage::PatternSubscribed {
                request_id: 23,
                subscription_id: PATTERN_SUBSCRIPTION,
                topics: vec![sample_position("orders.eu", 42, false)],
            }),
        ),
        (
            "server.TopicJoined",
            S(ServerMessage::TopicJoined {
                subscription_id: PATTERN_SUBSCRIPTION,
                position: sample_position("orders.us", 0, false),
            }),
        ),
        (
            "server.SubscriptionEnded",
            S(ServerMessage::SubscriptionEnded {
                subscription_id: PATTERN_SUBSCRIPTION,
                code: ErrorCode::TooManyTopics,
                message: "orders.* matches more than 1000 topics".to_owned(),
            }),
        ),
    ]
}

/// The id of the pattern subscription samples.
const PATTERN_SUBSCRIPTION: u64 = 3;

fn sample_position(topic: &str, offset: u64, ended: bool) -> TopicPosition {
    TopicPosition {
        topic: topic.to_owned(),
        epoch: EPOCH,
        offset,
        ended,
    }
}

/// A TCP connection with one plain subscription and one group membership.
fn sample_connection() -> WireConnection {
    WireConnection {
        id: 7,
        kind: "tcp".to_owned(),
        peer: "10.0.0.5:51234".to_owned(),
        subject: Some("u1".to_owned()),
        since_ms: 1_700_000_000_000,
        delivered: 12,
        subscriptions: vec![
            WireConnSubscription {
                topic: "orders".to_owned(),
                subscription_id: Some(1),
                group: None,
                epoch: EPOCH,
                position: 42,
                lag: 8,
                delivered: 10,
            },
            WireConnSubscription {
                topic: "orders".to_owned(),
                subscription_id: Some(MEMBERSHIP),
                group: Some("workers".to_owned()),
                epoch: EPOCH,
                position: 44,
                lag: 6,
                delivered: 2,
            },
        ],
    }
}

// ---- proptest strategies ------------------------------------------------

/// Short strings with any Unicode scalar values.
pub fn text() -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..12).prop_map(|chars| chars.into_iter().collect())
}

pub fn payload() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

pub fn header_list() -> impl Strategy<Value = Headers> {
    vec((text(), text()), 0..4)
}

pub fn versions() -> impl Strategy<Value = Vec<(String, u64)>> {
    vec((text(), any::<u64>()), 0..4)
}

pub fn start() -> impl Strategy<Value = Start> {
    prop_oneof![
        Just(Start::Live),
        Just(Start::Earliest),
        (any::<u64>(), any::<u64>())
            .prop_map(|(epoch, offset)| Start::AfterOffset { epoch, offset }),
        (any::<u64>(), versions())
            .prop_map(|(epoch, versions)| Start::AfterVersions { epoch, versions }),
    ]
}

pub fn new_event() -> impl Strategy<Value = NewEvent> {
    (text(), header_list(), payload()).prop_map(|(event_type, headers, payload)| NewEvent {
        event_type,
        headers,
        payload,
    })
}

pub fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        (any::<u16>(), text(), option::of(text())).prop_map(
            |(protocol_version, client_name, credentials)| ClientMessage::Hello {
                protocol_version,
                client_name,
                credentials,
            }
        ),
        (any::<u64>(), text(), text(), header_list(), payload()).prop_map(
            |(request_id, topic, event_type, headers, payload)| ClientMessage::Publish {
                request_id,
                topic,
                event_type,
                headers,
                payload,
            }
        ),
        (any::<u64>(), text(), vec(new_event(), 0..4)).prop_map(|(request_id, topic, events)| {
            ClientMessage::PublishBatch {
                request_id,
                topic,
                events,
            }
        }),
        (
            any::<u64>(),
            any::<u64>(),
            text(),
            vec(text(), 0..4),
            start()
        )
            .prop_map(|(request_id, subscription_id, topic, types, start)| {
                ClientMessage::Subscribe {
                    request_id,
                    subscription_id,
                    topic,
                    types,
                    start,
                }
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(request_id, subscription_id)| {
            ClientMessage::Unsubscribe {
                request_id,
                subscription_id,
            }
        }),
        (
            any::<u64>(),
            text(),
            any::<u64>(),
            vec(text(), 0..4),
            any::<u32>()
        )
            .prop_map(
                |(request_id, topic, after, types, limit)| ClientMessage::History {
                    request_id,
                    topic,
                    after,
                    types,
                    limit,
                }
            ),
        any::<u64>().prop_map(|request_id| ClientMessage::ListTopics { request_id }),
        (any::<u64>(), text())
            .prop_map(|(request_id, topic)| ClientMessage::TopicInfo { request_id, topic }),
        (any::<u64>(), text())
            .prop_map(|(request_id, topic)| ClientMessage::Seal { request_id, topic }),
        (any::<u64>(), text())
            .prop_map(|(request_id, topic)| ClientMessage::Delete { request_id, topic }),
        any::<u64>().prop_map(|request_id| ClientMessage::Ping { request_id }),
        (any::<u64>(), text()).prop_map(|(request_id, credentials)| ClientMessage::Refresh {
            request_id,
            credentials
        }),
        (
            any::<u64>(),
            text(),
            vec(append_event(), 0..4),
            option::of(any::<u64>()),
            option::of(any::<u64>()),
        )
            .prop_map(
                |(request_id, topic, events, expected_offset, expected_version)| {
                    ClientMessage::Append {
                        request_id,
                        topic,
                        events,
                        expected_offset,
                        expected_version,
                    }
                }
            ),
        (any::<u64>(), text(), text(), group_options(), any::<bool>()).prop_map(
            |(request_id, topic, group, options, update)| ClientMessage::CreateGroup {
                request_id,
                topic,
                group,
                options,
                update,
            }
        ),
        (
            any::<u64>(),
            any::<u64>(),
            (text(), text(), text()),
            any::<u32>(),
            option::of(group_options()),
        )
            .prop_map(
                |(request_id, subscription_id, (topic, group, consumer), max_in_flight, create)| {
                    ClientMessage::JoinGroup {
                        request_id,
                        subscription_id,
                        topic,
                        group,
                        consumer,
                        max_in_flight,
                        create,
                    }
                }
            ),
        (any::<u64>(), any::<u64>()).prop_map(|(request_id, subscription_id)| {
            ClientMessage::LeaveGroup {
                request_id,
                subscription_id,
            }
        }),
        (
            any::<u64>(),
            any::<u64>(),
            vec(any::<u64>(), 0..6),
            settle_action()
        )
            .prop_map(|(request_id, subscription_id, offsets, action)| {
                ClientMessage::Settle {
                    request_id,
                    subscription_id,
                    offsets,
                    action,
                }
            }),
        (any::<u64>(), text(), text()).prop_map(|(request_id, topic, group)| {
            ClientMessage::GroupInfo {
                request_id,
                topic,
                group,
            }
        }),
        (any::<u64>(), text())
            .prop_map(|(request_id, topic)| ClientMessage::ListGroups { request_id, topic }),
        (any::<u64>(), text(), text()).prop_map(|(request_id, topic, group)| {
            ClientMessage::DeleteGroup {
                request_id,
                topic,
                group,
            }
        }),
        (any::<u64>(), text(), text()).prop_map(|(request_id, topic, group)| {
            ClientMessage::Redrive {
                request_id,
                topic,
                group,
            }
        }),
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(request_id, after, limit)| {
            ClientMessage::ListConnections {
                request_id,
                after,
                limit,
            }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(request_id, connection_id)| {
            ClientMessage::CloseConnection {
                request_id,
                connection_id,
            }
        }),
        (
            (any::<u64>(), any::<u64>()),
            text(),
            vec(text(), 0..3),
            start(),
            option::of(vec(topic_position(), 0..3)),
        )
            .prop_map(
                |((request_id, subscription_id), pattern, types, start, positions)| {
                    ClientMessage::SubscribePattern {
                        request_id,
                        subscription_id,
                        pattern,
                        types,
                        start,
                        positions,
                    }
                }
            ),
        (
            any::<u16>(),
            text(),
            option::of(text()),
            compression_offer()
        )
            .prop_map(
                |(protocol_version, client_name, credentials, compression)| {
                    ClientMessage::HelloExt {
                        protocol_version,
                        client_name,
                        credentials,
                        compression,
                    }
                }
            ),
    ]
}

pub fn codec() -> impl Strategy<Value = Codec> {
    any::<u8>().prop_map(Codec)
}

pub fn compression_offer() -> impl Strategy<Value = CompressionOffer> {
    (vec(codec(), 0..4), any::<u32>())
        .prop_map(|(codecs, min_size)| CompressionOffer { codecs, min_size })
}

pub fn compression_choice() -> impl Strategy<Value = CompressionChoice> {
    (codec(), any::<u32>()).prop_map(|(codec, min_size)| CompressionChoice { codec, min_size })
}

pub fn topic_position() -> impl Strategy<Value = TopicPosition> {
    (text(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(topic, epoch, offset, ended)| {
        TopicPosition {
            topic,
            epoch,
            offset,
            ended,
        }
    })
}

pub fn group_start() -> impl Strategy<Value = GroupStart> {
    prop_oneof![
        Just(GroupStart::Earliest),
        Just(GroupStart::Live),
        any::<u64>().prop_map(GroupStart::AfterOffset),
    ]
}

pub fn group_options() -> impl Strategy<Value = GroupOptions> {
    (
        group_start(),
        any::<u64>(),
        any::<u32>(),
        vec(any::<u64>(), 0..4),
        any::<u32>(),
        option::of(text()),
    )
        .prop_map(
            |(start, ack_wait_ms, max_deliver, backoff_ms, max_ack_pending, dead_letter_topic)| {
                GroupOptions {
                    start,
                    ack_wait_ms,
                    max_deliver,
                    backoff_ms,
                    max_ack_pending,
                    dead_letter_topic,
                }
            },
        )
}

pub fn settle_action() -> impl Strategy<Value = SettleAction> {
    prop_oneof![
        Just(SettleAction::Ack),
        option::of(any::<u64>()).prop_map(SettleAction::Nack),
        Just(SettleAction::InProgress),
        text().prop_map(SettleAction::Term),
    ]
}

pub fn wire_member() -> impl Strategy<Value = WireMember> {
    (
        text(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(consumer, sessions, in_flight, max_in_flight, idle_ms)| WireMember {
                consumer,
                sessions,
                in_flight,
                max_in_flight,
                idle_ms,
            },
        )
}

pub fn wire_pending() -> impl Strategy<Value = WirePending> {
    (
        any::<u64>(),
        any::<u32>(),
        option::of(text()),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(offset, attempt, consumer, due_in_ms, first_delivered_ms)| WirePending {
                offset,
                attempt,
                consumer,
                due_in_ms,
                first_delivered_ms,
            },
        )
}

pub fn wire_group_info() -> impl Strategy<Value = WireGroupInfo> {
    (
        (text(), text(), group_options(), text()),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        vec(wire_member(), 0..3),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        ),
        vec(wire_pending(), 0..3),
    )
        .prop_map(
            |(
                (topic, group, options, dead_letter_topic),
                (epoch, ack_floor, next_offset, last_offset),
                (lag, pending, in_flight, oldest_pending_ms),
                members,
                (delivered, redelivered, acked, dead_lettered, lost),
                pending_sample,
            )| WireGroupInfo {
                topic,
                group,
                options,
                dead_letter_topic,
                epoch,
                ack_floor,
                next_offset,
                last_offset,
                lag,
                pending,
                in_flight,
                oldest_pending_ms,
                members,
                delivered,
                redelivered,
                acked,
                dead_lettered,
                lost,
                pending_sample,
            },
        )
}

pub fn append_event() -> impl Strategy<Value = AppendEvent> {
    (text(), header_list(), payload(), option::of(text())).prop_map(
        |(event_type, headers, payload, idempotency_key)| AppendEvent {
            event_type,
            headers,
            payload,
            idempotency_key,
        },
    )
}

pub fn append_ack() -> impl Strategy<Value = AppendAck> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
        |(epoch, offset, version, duplicate)| AppendAck {
            epoch,
            offset,
            version,
            duplicate,
        },
    )
}

pub fn wire_event() -> impl Strategy<Value = WireEvent> {
    (
        text(),
        any::<u64>(),
        text(),
        any::<u64>(),
        any::<u64>(),
        header_list(),
        payload(),
    )
        .prop_map(
            |(topic, offset, event_type, version, timestamp_ms, headers, payload)| WireEvent {
                topic,
                offset,
                event_type,
                version,
                timestamp_ms,
                headers,
                payload,
            },
        )
}

pub fn gap_reason() -> impl Strategy<Value = GapReason> {
    prop_oneof![
        Just(GapReason::Retention),
        Just(GapReason::EpochChanged),
        Just(GapReason::SlowConsumer),
    ]
}

pub fn wire_gap() -> impl Strategy<Value = WireGap> {
    (
        text(),
        option::of(text()),
        gap_reason(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(topic, event_type, reason, epoch, requested, first_available, current)| WireGap {
                topic,
                event_type,
                reason,
                epoch,
                requested,
                first_available,
                current,
            },
        )
}

pub fn ack() -> impl Strategy<Value = Ack> {
    (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(epoch, offset, version)| Ack {
        epoch,
        offset,
        version,
    })
}

pub fn topic_summary() -> impl Strategy<Value = TopicSummary> {
    (text(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
        |(name, epoch, last_offset, sealed)| TopicSummary {
            name,
            epoch,
            last_offset,
            sealed,
        },
    )
}

pub fn wire_topic_info() -> impl Strategy<Value = WireTopicInfo> {
    (
        (text(), any::<u64>(), any::<u64>(), any::<u64>(), versions()),
        (any::<u64>(), any::<u64>(), any::<u64>()),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<bool>()),
    )
        .prop_map(
            |(
                (name, epoch, first_offset, last_offset, versions),
                (max_events, max_age_ms, max_bytes),
                (retained_events, retained_bytes, subscribers, sealed),
            )| WireTopicInfo {
                name,
                epoch,
                first_offset,
                last_offset,
                versions,
                max_events,
                max_age_ms,
                max_bytes,
                retained_events,
                retained_bytes,
                subscribers,
                sealed,
            },
        )
}

pub fn error_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

pub fn server_message() -> impl Strategy<Value = ServerMessage> {
    prop_oneof![
        (
            text(),
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(
                |(
                    server_version,
                    protocol_version,
                    max_frame,
                    max_payload,
                    max_subscriptions,
                    heartbeat_ms,
                )| ServerMessage::Welcome {
                    server_version,
                    protocol_version,
                    max_frame,
                    max_payload,
                    max_subscriptions,
                    heartbeat_ms,
                }
            ),
        (any::<u64>(), vec(ack(), 0..4)).prop_map(|(request_id, results)| {
            ServerMessage::Published {
                request_id,
                results,
            }
        }),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(request_id, subscription_id, epoch, next_offset)| ServerMessage::Subscribed {
                request_id,
                subscription_id,
                epoch,
                next_offset,
            }
        ),
        (any::<u64>(), any::<u64>()).prop_map(|(request_id, subscription_id)| {
            ServerMessage::Unsubscribed {
                request_id,
                subscription_id,
            }
        }),
        (any::<u64>(), wire_event()).prop_map(|(subscription_id, event)| ServerMessage::Event {
            subscription_id,
            event
        }),
        (any::<u64>(), wire_gap()).prop_map(|(subscription_id, gap)| ServerMessage::Gap {
            subscription_id,
            gap
        }),
        (any::<u64>(), text(), any::<u64>()).prop_map(|(subscription_id, topic, last_offset)| {
            ServerMessage::End {
                subscription_id,
                topic,
                last_offset,
            }
        }),
        (
            any::<u64>(),
            vec(wire_event(), 0..3),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(request_id, events, next_after, first_available)| {
                ServerMessage::History {
                    request_id,
                    events,
                    next_after,
                    first_available,
                }
            }),
        (any::<u64>(), vec(topic_summary(), 0..4))
            .prop_map(|(request_id, topics)| ServerMessage::Topics { request_id, topics }),
        (any::<u64>(), wire_topic_info())
            .prop_map(|(request_id, info)| ServerMessage::TopicInfo { request_id, info }),
        any::<u64>().prop_map(|request_id| ServerMessage::Ok { request_id }),
        any::<u64>().prop_map(|request_id| ServerMessage::Pong { request_id }),
        (option::of(any::<u64>()), error_code(), text()).prop_map(|(request_id, code, message)| {
            ServerMessage::Error {
                request_id,
                code,
                message,
            }
        }),
        Just(ServerMessage::Heartbeat),
        text().prop_map(|reason| ServerMessage::Shutdown { reason }),
        (any::<u64>(), any::<u64>()).prop_map(|(request_id, expires_at_ms)| {
            ServerMessage::Refreshed {
                request_id,
                expires_at_ms,
            }
        }),
        (option::of(any::<u64>()), error_code(), text(), any::<u64>()).prop_map(
            |(request_id, code, message, retry_after_ms)| ServerMessage::RetryLater {
                request_id,
                code,
                message,
                retry_after_ms,
            }
        ),
        (any::<u64>(), vec(append_ack(), 0..4)).prop_map(|(request_id, results)| {
            ServerMessage::Appended {
                request_id,
                results,
            }
        }),
        (any::<u64>(), text(), any::<u64>(), any::<u64>()).prop_map(
            |(request_id, message, current_offset, current_version)| {
                ServerMessage::PositionMismatch {
                    request_id,
                    message,
                    current_offset,
                    current_version,
                }
            }
        ),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(request_id, subscription_id, epoch)| ServerMessage::Joined {
                request_id,
                subscription_id,
                epoch,
            }
        ),
        (any::<u64>(), any::<u32>(), wire_event()).prop_map(|(subscription_id, attempt, event)| {
            ServerMessage::Delivery {
                subscription_id,
                attempt,
                event,
            }
        }),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(request_id, applied, already_done, unknown)| ServerMessage::Settled {
                request_id,
                applied,
                already_done,
                unknown,
            }
        ),
        (any::<u64>(), wire_group_info())
            .prop_map(|(request_id, info)| ServerMessage::GroupInfo { request_id, info }),
        (any::<u64>(), vec(wire_group_info(), 0..3))
            .prop_map(|(request_id, groups)| ServerMessage::Groups { request_id, groups }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(request_id, count)| ServerMessage::Redriven { request_id, count }),
        (any::<u64>(), vec(wire_connection(), 0..3), any::<u64>()).prop_map(
            |(request_id, connections, next_after)| ServerMessage::Connections {
                request_id,
                connections,
                next_after,
            }
        ),
        (any::<u64>(), any::<u64>(), vec(topic_position(), 0..3)).prop_map(
            |(request_id, subscription_id, topics)| ServerMessage::PatternSubscribed {
                request_id,
                subscription_id,
                topics,
            }
        ),
        (any::<u64>(), topic_position()).prop_map(|(subscription_id, position)| {
            ServerMessage::TopicJoined {
                subscription_id,
                position,
            }
        }),
        (any::<u64>(), error_code(), text()).prop_map(|(subscription_id, code, message)| {
            ServerMessage::SubscriptionEnded {
                subscription_id,
                code,
                message,
            }
        }),
        (
            text(),
            any::<u16>(),
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
            compression_choice(),
        )
            .prop_map(
                |(
                    server_version,
                    protocol_version,
                    (max_frame, max_payload, max_subscriptions, heartbeat_ms),
                    compression,
                )| ServerMessage::WelcomeExt {
                    server_version,
                    protocol_version,
                    max_frame,
                    max_payload,
                    max_subscriptions,
                    heartbeat_ms,
                    compression,
                }
            ),
    ]
}

pub fn wire_conn_subscription() -> impl Strategy<Value = WireConnSubscription> {
    (
        text(),
        option::of(any::<u64>()),
        option::of(text()),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(topic, subscription_id, group, (epoch, position, lag, delivered))| {
                WireConnSubscription {
                    topic,
                    subscription_id,
                    group,
                    epoch,
                    position,
                    lag,
                    delivered,
                }
            },
        )
}

pub fn wire_connection() -> impl Strategy<Value = WireConnection> {
    (
        any::<u64>(),
        (text(), text(), option::of(text())),
        (any::<u64>(), any::<u64>()),
        vec(wire_conn_subscription(), 0..3),
    )
        .prop_map(
            |(id, (kind, peer, subject), (since_ms, delivered), subscriptions)| WireConnection {
                id,
                kind,
                peer,
                subject,
                since_ms,
                delivered,
                subscriptions,
            },
        )
}

pub fn any_message() -> impl Strategy<Value = AnyMessage> {
    prop_oneof![
        client_message().prop_map(AnyMessage::Client),
        server_message().prop_map(AnyMessage::Server),
    ]
}
