//! Wire message types.
//!
//! Every type here is plain serde data so that bincode's serde path can lay it
//! out (no `flatten`, no `skip*`, no internally tagged enums). Structs are
//! encoded as their fields in declaration order; enums as a `u32` variant
//! index (the *tag*, in declaration order) followed by the variant's fields.
//! So **order is the protocol**: never reorder fields or variants, add new
//! variants only at the end, and bump [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION)
//! on any change. `docs/protocol.md` documents each type byte by byte.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Event headers: small string pairs (correlation id, causation id, user id…),
/// kept in the order the publisher sent them; duplicate names are allowed.
///
/// # Wire
/// `u64` count, then per pair the name and the value as strings.
pub type Headers = Vec<(String, String)>;

/// A message sent by a client to the server.
///
/// # Wire
/// `u32` tag (the variant's position, shown on each variant), then its fields
/// in order. The first frame of a connection must be [`ClientMessage::Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Tag 0. Opens the session; answered by `Welcome`, or by `Error` and a close.
    Hello {
        /// The [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) the client speaks.
        protocol_version: u16,
        /// Free-form client identification for logs (e.g. `"ringcast-rs/0.1"`).
        client_name: String,
        /// Credentials when the server requires them: a JWT (three
        /// base64url parts joined by `.`) or an API key. Absent (or empty)
        /// means anonymous.
        credentials: Option<String>,
    },
    /// Tag 1. Appends one event to a topic; answered by `Published` with one ack.
    Publish {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Topic name (1–255 bytes of `[A-Za-z0-9._:-]`).
        topic: String,
        /// Event type; versions are counted per (topic, type).
        event_type: String,
        /// Event headers.
        headers: Headers,
        /// Opaque payload (JSON by convention).
        payload: Bytes,
    },
    /// Tag 2. Appends several events to one topic, in order; answered by
    /// `Published` with one ack per event, in the same order. If any event is
    /// invalid, none is appended.
    PublishBatch {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Topic name.
        topic: String,
        /// The events, in the order they are to be appended.
        events: Vec<NewEvent>,
    },
    /// Tag 3. Starts a subscription; answered by `Subscribed`, then events are
    /// pushed as `Event`, `Gap` and `End` carrying `subscription_id`.
    Subscribe {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Client-chosen id, unique among this connection's live subscriptions.
        subscription_id: u64,
        /// Topic name.
        topic: String,
        /// Event types to receive; empty means all types.
        types: Vec<String>,
        /// Where the subscription starts.
        start: Start,
    },
    /// Tag 4. Ends a subscription; answered by `Unsubscribed`.
    Unsubscribe {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// The subscription to end.
        subscription_id: u64,
    },
    /// Tag 5. Reads retained events (one page); answered by `ServerMessage::History`.
    History {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Topic name.
        topic: String,
        /// Return events with an offset greater than this (0 = from the start).
        after: u64,
        /// Event types to return; empty means all types.
        types: Vec<String>,
        /// Most events to return; the server may cap it further.
        limit: u32,
    },
    /// Tag 6. Lists topics; answered by `Topics`.
    ListTopics {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
    },
    /// Tag 7. Describes one topic; answered by `ServerMessage::TopicInfo`.
    TopicInfo {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Topic name.
        topic: String,
    },
    /// Tag 8. Seals a topic (no more publishes; subscribers get `End`);
    /// answered by `Ok`.
    Seal {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Topic name.
        topic: String,
    },
    /// Tag 9. Deletes a topic and its history; answered by `Ok`.
    Delete {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Topic name.
        topic: String,
    },
    /// Tag 10. Liveness probe; answered by `Pong`.
    Ping {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
    },
    /// Tag 11 (protocol version 2). Replaces the connection's credentials,
    /// typically with a fresh token before the current one expires; answered
    /// by `Refreshed`, or by `Error` (the old credentials then stay in force).
    /// The new credentials must name the same subject. Subscriptions the new
    /// grants no longer cover are ended first, each with an `Unsubscribed`
    /// carrying this request's id.
    Refresh {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// The new credentials (a JWT or an API key).
        credentials: String,
    },
    /// Tag 12 (protocol version 3). Appends one or more events to one topic
    /// atomically, with publish guarantees: per-event idempotency keys and
    /// an expected position. Answered by `Appended` (one ack per event, in
    /// order, each saying whether it repeated a stored key), by
    /// `PositionMismatch`, or by `Error`; if anything is invalid, nothing
    /// is appended.
    Append {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Topic name.
        topic: String,
        /// The events, in the order they are to be appended (at least one).
        events: Vec<AppendEvent>,
        /// Append only if the topic's last offset is this (0 = no event was
        /// ever appended); checked atomically with the append.
        expected_offset: Option<u64>,
        /// Append only if the last version of the events' type is this (0 =
        /// none yet); every event must then have the same type.
        expected_version: Option<u64>,
    },
    /// Tag 13 (protocol version 4). Creates a consumer group (idempotent;
    /// with `update`, an existing group takes the new settings, all but
    /// its start); answered by `GroupInfo`.
    CreateGroup {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Topic name.
        topic: String,
        /// Group name (the topic-name alphabet, 1–255 bytes).
        group: String,
        /// The group's settings.
        options: GroupOptions,
        /// Change an existing group's settings instead of leaving them.
        update: bool,
    },
    /// Tag 14 (protocol version 4). Joins a consumer group as `consumer`;
    /// answered by `Joined`, then deliveries are pushed as `Delivery` (and
    /// lost work as `Gap`) carrying `subscription_id`, at most
    /// `max_in_flight` unsettled at once.
    JoinGroup {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Client-chosen id, unique among this connection's live
        /// subscriptions and group memberships.
        subscription_id: u64,
        /// Topic name.
        topic: String,
        /// Group name.
        group: String,
        /// Consumer (member) name; sessions with the same name share its
        /// pending work.
        consumer: String,
        /// Most deliveries this member holds unsettled (0 = the group's
        /// `max_ack_pending`).
        max_in_flight: u32,
        /// Create the group with these settings when it does not exist;
        /// absent = it must exist.
        create: Option<GroupOptions>,
    },
    /// Tag 15 (protocol version 4). Leaves a group cleanly: what this
    /// member holds is redelivered at once; answered by `Unsubscribed`.
    LeaveGroup {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// The membership's subscription id.
        subscription_id: u64,
    },
    /// Tag 16 (protocol version 4). Settles deliveries of a membership by
    /// offset; answered by `Settled`.
    Settle {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// The membership's subscription id.
        subscription_id: u64,
        /// The deliveries' offsets.
        offsets: Vec<u64>,
        /// What to do with them.
        action: SettleAction,
    },
    /// Tag 17 (protocol version 4). Describes a group; answered by `GroupInfo`.
    GroupInfo {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Topic name.
        topic: String,
        /// Group name.
        group: String,
    },
    /// Tag 18 (protocol version 4). Lists a topic's groups; answered by `Groups`.
    ListGroups {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Topic name.
        topic: String,
    },
    /// Tag 19 (protocol version 4). Deletes a group and its pending work;
    /// answered by `Ok`.
    DeleteGroup {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Topic name.
        topic: String,
        /// Group name.
        group: String,
    },
    /// Tag 20 (protocol version 4). Publishes the group's dead letters back
    /// to its topic (each once); answered by `Redriven`.
    Redrive {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Topic name.
        topic: String,
        /// Group name.
        group: String,
    },
    /// Tag 21 (protocol version 5). Lists the broker's live client
    /// connections (TCP and SSE) with their subscriptions; answered by
    /// `Connections`. Needs the admin grant on every topic.
    ListConnections {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// List connections with an id greater than this (0 = from the first).
        after: u64,
        /// Most connections wanted (0 = the server's page size); the server
        /// may return fewer.
        limit: u32,
    },
    /// Tag 22 (protocol version 5). Closes one client connection the way a
    /// broker shutdown does (its client reconnects and resumes); answered by
    /// `Ok`, or by `Error` (`ConnectionNotFound`). Needs the admin grant on
    /// every topic.
    CloseConnection {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// The connection's id, as listed by `Connections`.
        connection_id: u64,
    },
    /// Tag 23 (protocol version 5). Starts one subscription over every
    /// topic matching `pattern`, now and later; answered by
    /// `PatternSubscribed` (the topics it starts with), then pushes
    /// `TopicJoined` (a topic starts later), `Event`, `Gap` and `End` (one
    /// topic ended; the subscription goes on), and `SubscriptionEnded`
    /// (the subscription itself is over), each carrying `subscription_id`.
    SubscribePattern {
        /// Client-chosen id, echoed in the reply.
        request_id: u64,
        /// Client-chosen id, unique among this connection's live
        /// subscriptions and group memberships.
        subscription_id: u64,
        /// Topic pattern: topic-name bytes plus `*` (any run, also empty)
        /// and `?` (one byte).
        pattern: String,
        /// Event types to receive; empty means all types.
        types: Vec<String>,
        /// Where the topics matching now start: `Live` or `Earliest` (else
        /// `InvalidStart`). Topics that start matching later, and every
        /// topic of a resume, start from their first event.
        start: Start,
        /// Absent for a new subscription; present (even empty) to resume
        /// one: each topic listed continues after its position, every other
        /// matching topic from its first event.
        positions: Option<Vec<TopicPosition>>,
    },
    /// Tag 24 (protocol version 5). Opens the session like `Hello`, and
    /// offers payload compression; answered by `WelcomeExt` (which says
    /// whether compression is on), or by `Error` and a close. Only as the
    /// first frame, naming version 5 or later.
    HelloExt {
        /// The [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) the client
        /// speaks (at least 5).
        protocol_version: u16,
        /// Free-form client identification for logs.
        client_name: String,
        /// Credentials, as in `Hello`.
        credentials: Option<String>,
        /// The payload compression the client can do.
        compression: CompressionOffer,
    },
}

/// A payload compression codec, by its one-byte id — the marker byte that
/// starts a payload compressed with it (see [`crate::compression`]).
/// Unknown ids in an offer are ignored, so a codec added later needs no
/// new message.
///
/// # Wire
/// One `u8`: 0 none (a raw payload), 1 LZ4 (block format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Codec(pub u8);

impl Codec {
    /// No compression: in `WelcomeExt`, compression is off; as a payload
    /// marker, the payload's bytes follow as they are.
    pub const NONE: Codec = Codec(0);
    /// LZ4, block format (no frame, no checksum): a payload marker `01`,
    /// the original length as a `u32`, then one LZ4 block.
    pub const LZ4: Codec = Codec(1);

    /// The codec's name (`none`, `lz4`; `codec-<id>` for an unknown one).
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Codec::NONE => "none".into(),
            Codec::LZ4 => "lz4".into(),
            Codec(id) => format!("codec-{id}").into(),
        }
    }
}

/// What payload compression a client offers in `HelloExt`.
///
/// # Wire
/// `codecs` (`u64` count, then one `u8` per codec, in the client's order of
/// preference), `min_size` (u32), in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressionOffer {
    /// Codecs the client can decompress, most preferred first.
    pub codecs: Vec<Codec>,
    /// The smallest payload, in bytes, worth compressing.
    pub min_size: u32,
}

/// The payload compression a server chose, in `WelcomeExt`.
///
/// # Wire
/// `codec` (u8; 0 = none), `min_size` (u32), in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressionChoice {
    /// The codec both sides compress with; [`Codec::NONE`]: compression is
    /// off and payloads carry no marker.
    pub codec: Codec,
    /// Both sides compress payloads of at least this many bytes (when that
    /// shrinks them): the client's `min_size`, or the server's floor if
    /// higher.
    pub min_size: u32,
}

impl CompressionChoice {
    /// Compression off.
    pub const OFF: CompressionChoice = CompressionChoice {
        codec: Codec::NONE,
        min_size: 0,
    };

    /// Whether payloads carry a codec marker on this connection.
    pub fn is_on(&self) -> bool {
        self.codec != Codec::NONE
    }
}

/// Where one topic of a pattern subscription stands (see
/// [`ClientMessage::SubscribePattern`]).
///
/// # Wire
/// `topic` (string), `epoch`, `offset` (u64), `ended` (bool), in that order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TopicPosition {
    /// Topic name.
    pub topic: String,
    /// The topic's epoch the offset belongs to (0: the topic is gone).
    pub epoch: u64,
    /// The last offset delivered (or skipped by a gap); 0 before the first.
    pub offset: u64,
    /// The topic ended (sealed, or deleted) at that offset: nothing more
    /// comes from this epoch of it.
    pub ended: bool,
}

/// Where a new consumer group starts reading its topic.
///
/// # Wire
/// `u32` tag: 0 `Earliest`, 1 `Live`, 2 `AfterOffset` followed by a `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupStart {
    /// Tag 0. Every retained event.
    Earliest,
    /// Tag 1. Only events published after the group was created.
    Live,
    /// Tag 2. Events with an offset greater than this one.
    AfterOffset(u64),
}

/// A consumer group's settings.
///
/// # Wire
/// `start`, `ack_wait_ms` (u64), `max_deliver` (u32), `backoff_ms`
/// (`u64` count then `u64`s), `max_ack_pending` (u32),
/// `dead_letter_topic` (option of string), in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupOptions {
    /// Where the group starts (at creation only).
    pub start: GroupStart,
    /// Milliseconds a delivery may stay unsettled before it is redelivered.
    pub ack_wait_ms: u64,
    /// Deliveries per event before it is dead-lettered.
    pub max_deliver: u32,
    /// Delay before redelivery after attempt *n* failed (`backoff_ms[n-1]`,
    /// the last one repeating); empty = at once.
    pub backoff_ms: Vec<u64>,
    /// Most events handed out and not done over the whole group.
    pub max_ack_pending: u32,
    /// Where given-up events are appended; absent = `<topic>.dlq`.
    pub dead_letter_topic: Option<String>,
}

impl Default for GroupOptions {
    /// The broker's defaults: earliest, 30 s, 5 deliveries, no backoff,
    /// 1,000 pending, `<topic>.dlq`.
    fn default() -> Self {
        Self {
            start: GroupStart::Earliest,
            ack_wait_ms: 30_000,
            max_deliver: 5,
            backoff_ms: Vec::new(),
            max_ack_pending: 1000,
            dead_letter_topic: None,
        }
    }
}

/// How to settle group deliveries.
///
/// # Wire
/// `u32` tag: 0 `Ack`, 1 `Nack` + option of `u64` delay in ms,
/// 2 `InProgress`, 3 `Term` + reason string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SettleAction {
    /// Tag 0. Done: never delivered again.
    Ack,
    /// Tag 1. Failed: redeliver after this delay (absent = the group's backoff).
    Nack(Option<u64>),
    /// Tag 2. Still working: the deadline moves a whole `ack_wait` on.
    InProgress,
    /// Tag 3. Give up now: dead-letter with this reason.
    Term(String),
}

/// One member of a group in a [`WireGroupInfo`].
///
/// # Wire
/// `consumer` (string), `sessions`, `in_flight`, `max_in_flight` (u32),
/// `idle_ms` (u64), in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMember {
    /// Consumer name.
    pub consumer: String,
    /// Live TCP sessions under this name (0 for HTTP workers).
    pub sessions: u32,
    /// Deliveries it holds unsettled.
    pub in_flight: u32,
    /// Most deliveries it may hold.
    pub max_in_flight: u32,
    /// Milliseconds since it last fetched, settled or joined.
    pub idle_ms: u64,
}

/// A consumer group's state and counters.
///
/// # Wire
/// The fields in declaration order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGroupInfo {
    /// Topic name.
    pub topic: String,
    /// Group name.
    pub group: String,
    /// Its settings.
    pub options: GroupOptions,
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
    /// Events not yet handed out.
    pub lag: u64,
    /// Events handed out and not done.
    pub pending: u64,
    /// Of those, held by a member now.
    pub in_flight: u64,
    /// Age of the oldest pending event, in ms.
    pub oldest_pending_ms: u64,
    /// Members.
    pub members: Vec<WireMember>,
    /// Deliveries, first ones and redeliveries.
    pub delivered: u64,
    /// Redeliveries.
    pub redelivered: u64,
    /// Events acked.
    pub acked: u64,
    /// Events appended to the dead-letter topic.
    pub dead_lettered: u64,
    /// Events lost to retention before they were done.
    pub lost: u64,
    /// The oldest pending events (up to 100), lowest offset first.
    pub pending_sample: Vec<WirePending>,
}

/// One pending event of a group in a [`WireGroupInfo`].
///
/// # Wire
/// `offset` (u64), `attempt` (u32), `consumer` (option of string),
/// `due_in_ms`, `first_delivered_ms` (u64), in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WirePending {
    /// The event's offset.
    pub offset: u64,
    /// Deliveries so far.
    pub attempt: u32,
    /// The member holding it, when it is in flight.
    pub consumer: Option<String>,
    /// Milliseconds until its deadline (in flight) or redelivery (waiting).
    pub due_in_ms: u64,
    /// When it was first delivered, in ms since the Unix epoch.
    pub first_delivered_ms: u64,
}

/// One event of a [`ClientMessage::PublishBatch`].
///
/// # Wire
/// `event_type` (string), `headers`, `payload` (bytes), in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Event type.
    pub event_type: String,
    /// Event headers.
    pub headers: Headers,
    /// Opaque payload.
    pub payload: Bytes,
}

/// One event of a [`ClientMessage::Append`].
///
/// # Wire
/// `event_type` (string), `headers`, `payload` (bytes), `idempotency_key`
/// (option of string), in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendEvent {
    /// Event type.
    pub event_type: String,
    /// Event headers.
    pub headers: Headers,
    /// Opaque payload.
    pub payload: Bytes,
    /// 1–128 bytes, no control characters: within the topic's dedup window
    /// an event with a key already stored is not stored again, and its ack
    /// is the original's (with `duplicate` set). Unique within a request.
    pub idempotency_key: Option<String>,
}

impl From<NewEvent> for AppendEvent {
    /// The same event, without an idempotency key.
    fn from(event: NewEvent) -> Self {
        AppendEvent {
            event_type: event.event_type,
            headers: event.headers,
            payload: event.payload,
            idempotency_key: None,
        }
    }
}

/// Where a subscription starts.
///
/// # Wire
/// `u32` tag: 0 `Live`, 1 `Earliest`, 2 `AfterOffset`, 3 `AfterVersions`,
/// then the variant's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Start {
    /// Tag 0. Only events published after the subscription.
    Live,
    /// Tag 1. Every retained event, then live.
    Earliest,
    /// Tag 2. Events with an offset greater than `offset` in history `epoch`
    /// (a resume); another epoch or a trimmed range yields a `Gap`.
    AfterOffset {
        /// The topic epoch the offset belongs to.
        epoch: u64,
        /// The last offset the client has seen.
        offset: u64,
    },
    /// Tag 3. Per event type, events with a version greater than the given
    /// one; types not named start live.
    AfterVersions {
        /// The topic epoch the versions belong to.
        epoch: u64,
        /// `(event type, last version seen)` pairs.
        versions: Vec<(String, u64)>,
    },
}

/// A message sent by the server to a client.
///
/// # Wire
/// `u32` tag (the variant's position, shown on each variant), then its fields
/// in order. Replies echo the request's `request_id`; pushed messages
/// (`Event`, `Gap`, `End`, `Delivery`, `TopicJoined`, `SubscriptionEnded`)
/// carry the client's `subscription_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Tag 0. Accepts the `Hello`; announces the server's limits.
    Welcome {
        /// Server software version (e.g. `"0.1.0"`).
        server_version: String,
        /// The protocol version the server speaks on this connection.
        protocol_version: u16,
        /// Largest frame body, in bytes, the server accepts.
        max_frame: u32,
        /// Largest event payload, in bytes, the server accepts.
        max_payload: u32,
        /// Most concurrent subscriptions per connection.
        max_subscriptions: u32,
        /// The server sends `Heartbeat` after this many idle milliseconds.
        heartbeat_ms: u32,
    },
    /// Tag 1. Acks a `Publish` (one ack) or `PublishBatch` (one per event, in order).
    Published {
        /// The request's id.
        request_id: u64,
        /// Where each event landed.
        results: Vec<Ack>,
    },
    /// Tag 2. Confirms a `Subscribe`; pushes for it may follow at once.
    Subscribed {
        /// The request's id.
        request_id: u64,
        /// The subscription's id, as the client chose it.
        subscription_id: u64,
        /// The topic's current epoch.
        epoch: u64,
        /// The offset the next published event will get.
        next_offset: u64,
    },
    /// Tag 3. Confirms an `Unsubscribe`; no push for it follows.
    Unsubscribed {
        /// The request's id.
        request_id: u64,
        /// The ended subscription.
        subscription_id: u64,
    },
    /// Tag 4. Pushes one event to a subscription.
    Event {
        /// The subscription it is for.
        subscription_id: u64,
        /// The event.
        event: WireEvent,
    },
    /// Tag 5. Pushes a gap: events the subscription should have seen are no
    /// longer available; delivery continues live after it.
    Gap {
        /// The subscription it is for.
        subscription_id: u64,
        /// What was lost.
        gap: WireGap,
    },
    /// Tag 6. Pushes the end of a sealed topic; the subscription is over.
    /// For a pattern subscription (version 5) only `topic` ended (sealed or
    /// deleted); the subscription goes on with the others.
    End {
        /// The subscription it is for.
        subscription_id: u64,
        /// Topic name.
        topic: String,
        /// The topic's last offset.
        last_offset: u64,
    },
    /// Tag 7. One page of history for `ClientMessage::History`.
    History {
        /// The request's id.
        request_id: u64,
        /// Events in increasing offset order.
        events: Vec<WireEvent>,
        /// Pass as `after` to read the next page.
        next_after: u64,
        /// The oldest offset still retained.
        first_available: u64,
    },
    /// Tag 8. Answers `ListTopics`.
    Topics {
        /// The request's id.
        request_id: u64,
        /// One summary per topic.
        topics: Vec<TopicSummary>,
    },
    /// Tag 9. Answers `ClientMessage::TopicInfo`.
    TopicInfo {
        /// The request's id.
        request_id: u64,
        /// The topic's description.
        info: WireTopicInfo,
    },
    /// Tag 10. Success without data, for `Seal` and `Delete`.
    Ok {
        /// The request's id.
        request_id: u64,
    },
    /// Tag 11. Answers `Ping`.
    Pong {
        /// The request's id.
        request_id: u64,
    },
    /// Tag 12. A request failed (`request_id` set; the connection lives on) or
    /// the connection is being closed (`request_id` absent; see
    /// [`ErrorCode::is_fatal`]).
    Error {
        /// The failed request's id, when the error answers one.
        request_id: Option<u64>,
        /// Machine-readable cause.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Tag 13. Sent when the connection has been idle for `heartbeat_ms`.
    Heartbeat,
    /// Tag 14. The server is going away; the connection closes after it.
    Shutdown {
        /// Why (e.g. `"server shutting down"`).
        reason: String,
    },
    /// Tag 15 (protocol version 2). Accepts a `Refresh`: the new credentials
    /// are in force.
    Refreshed {
        /// The request's id.
        request_id: u64,
        /// When the session ends unless refreshed again, in milliseconds since
        /// the Unix epoch (the token's `exp` plus the server's leeway); `0` =
        /// never.
        expires_at_ms: u64,
    },
    /// Tag 16 (protocol version 2). Like `Error`, but the same request (or
    /// connection) succeeds if retried after `retry_after_ms`: sent for
    /// [`ErrorCode::RateLimited`]. With `request_id` absent it is
    /// connection-level and the server closes the connection after it.
    RetryLater {
        /// The refused request's id; absent for a refused connection.
        request_id: Option<u64>,
        /// Machine-readable cause.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
        /// Milliseconds to wait before retrying (at least 1).
        retry_after_ms: u64,
    },
    /// Tag 17 (protocol version 3). Acks an `Append`: one per event, in order.
    Appended {
        /// The request's id.
        request_id: u64,
        /// Where each event landed (or had landed, for a duplicate).
        results: Vec<AppendAck>,
    },
    /// Tag 18 (protocol version 3). An `Append`'s expected position did not
    /// hold: nothing was appended. Carries the current values, so that the
    /// writer can reload and retry. (Error code `PositionMismatch`.)
    PositionMismatch {
        /// The request's id.
        request_id: u64,
        /// Human-readable detail.
        message: String,
        /// The topic's last offset now (0 = none).
        current_offset: u64,
        /// The last version of the request's first event type now (0 = none).
        current_version: u64,
    },
    /// Tag 19 (protocol version 4). Accepts a `JoinGroup`; deliveries for
    /// it may follow at once.
    Joined {
        /// The request's id.
        request_id: u64,
        /// The membership's id, as the client chose it.
        subscription_id: u64,
        /// The topic's epoch.
        epoch: u64,
    },
    /// Tag 20 (protocol version 4). Pushes one group delivery: settle it by
    /// its offset with `Settle`.
    Delivery {
        /// The membership it is for.
        subscription_id: u64,
        /// 1 for the first delivery, +1 per redelivery.
        attempt: u32,
        /// The event.
        event: WireEvent,
    },
    /// Tag 21 (protocol version 4). Answers `Settle`: how many offsets the
    /// action applied to, were already done, or were not known.
    Settled {
        /// The request's id.
        request_id: u64,
        /// Offsets the action applied to.
        applied: u64,
        /// Offsets already done (acked, dead-lettered or lost).
        already_done: u64,
        /// Offsets never handed out, or not in flight for a nack or
        /// in-progress.
        unknown: u64,
    },
    /// Tag 22 (protocol version 4). Answers `CreateGroup` and `GroupInfo`.
    GroupInfo {
        /// The request's id.
        request_id: u64,
        /// The group.
        info: WireGroupInfo,
    },
    /// Tag 23 (protocol version 4). Answers `ListGroups`.
    Groups {
        /// The request's id.
        request_id: u64,
        /// The topic's groups, by name.
        groups: Vec<WireGroupInfo>,
    },
    /// Tag 24 (protocol version 4). Answers `Redrive`.
    Redriven {
        /// The request's id.
        request_id: u64,
        /// Dead letters published back to the topic (repeats not counted).
        count: u64,
    },
    /// Tag 25 (protocol version 5). One page of `ListConnections`.
    Connections {
        /// The request's id.
        request_id: u64,
        /// Live connections, in increasing id order.
        connections: Vec<WireConnection>,
        /// Pass as `after` to read the next page; 0 when this is the last.
        next_after: u64,
    },
    /// Tag 26 (protocol version 5). Confirms a `SubscribePattern`; pushes
    /// for it may follow at once.
    PatternSubscribed {
        /// The request's id.
        request_id: u64,
        /// The subscription's id, as the client chose it.
        subscription_id: u64,
        /// The topics it starts with, each at the position before its
        /// first delivery (ended ones included), by name.
        topics: Vec<TopicPosition>,
    },
    /// Tag 27 (protocol version 5). Pushed when a topic joins a pattern
    /// subscription after `PatternSubscribed` (it was created, or got its
    /// first event, or was deleted and created again), before anything of
    /// it: the client learns its epoch to resume it by.
    TopicJoined {
        /// The subscription it is for.
        subscription_id: u64,
        /// The topic and where it starts (`offset` 0: its first event).
        position: TopicPosition,
    },
    /// Tag 28 (protocol version 5). Pushes the end of a pattern
    /// subscription as a whole (e.g. its pattern came to match more than
    /// the server's limit); no push for it follows and the id is free.
    SubscriptionEnded {
        /// The subscription it is for.
        subscription_id: u64,
        /// Machine-readable cause.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Tag 29 (protocol version 5). Accepts a `HelloExt`: the fields of
    /// `Welcome`, then the payload compression in force on the connection.
    WelcomeExt {
        /// Server software version (e.g. `"0.1.0"`).
        server_version: String,
        /// The protocol version the server speaks on this connection.
        protocol_version: u16,
        /// Largest frame body, in bytes, the server accepts.
        max_frame: u32,
        /// Largest event payload, in bytes, the server accepts (before
        /// compression).
        max_payload: u32,
        /// Most concurrent subscriptions per connection.
        max_subscriptions: u32,
        /// The server sends `Heartbeat` after this many idle milliseconds.
        heartbeat_ms: u32,
        /// The payload compression in force ([`CompressionChoice::OFF`]
        /// when the server took none of the codecs offered).
        compression: CompressionChoice,
    },
}

/// One live client connection in a [`ServerMessage::Connections`] listing.
///
/// # Wire
/// `id` (u64), `kind`, `peer` (strings), `subject` (option of string),
/// `since_ms`, `delivered` (u64), `subscriptions` (`u64` count, then each
/// [`WireConnSubscription`]), in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireConnection {
    /// The broker-unique connection id (never reused while the broker runs).
    pub id: u64,
    /// The front end: `tcp` or `sse` (other values may come later).
    pub kind: String,
    /// The peer's address, `ip:port`.
    pub peer: String,
    /// The credential's subject (token `sub` or API key name); absent when
    /// access control is off or the credential names none.
    pub subject: Option<String>,
    /// When the connection was registered, in ms since the Unix epoch.
    pub since_ms: u64,
    /// Events delivered on it so far, over all its subscriptions.
    pub delivered: u64,
    /// Its live subscriptions.
    pub subscriptions: Vec<WireConnSubscription>,
}

/// One subscription of a [`WireConnection`].
///
/// # Wire
/// `topic` (string), `subscription_id` (option of u64), `group` (option of
/// string), `epoch`, `position`, `lag`, `delivered` (u64), in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireConnSubscription {
    /// Topic name.
    pub topic: String,
    /// The client's subscription id (TCP); absent for an SSE stream.
    pub subscription_id: Option<u64>,
    /// The consumer group, for a group membership.
    pub group: Option<String>,
    /// The epoch its position belongs to.
    pub epoch: u64,
    /// The last offset delivered (or skipped by a gap).
    pub position: u64,
    /// The topic's last offset minus `position` (the whole last offset
    /// when the topic's epoch changed since).
    pub lag: u64,
    /// Events delivered on it so far.
    pub delivered: u64,
}

/// Where one published event landed.
///
/// # Wire
/// `epoch`, `offset`, `version`: three `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ack {
    /// The topic's epoch.
    pub epoch: u64,
    /// The event's offset in the topic.
    pub offset: u64,
    /// The event's version within its (topic, type).
    pub version: u64,
}

/// Where one event of an `Append` landed.
///
/// # Wire
/// `epoch`, `offset`, `version` (three `u64`), `duplicate` (bool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AppendAck {
    /// The topic's epoch.
    pub epoch: u64,
    /// The event's offset in the topic.
    pub offset: u64,
    /// The event's version within its (topic, type).
    pub version: u64,
    /// The event repeated an idempotency key stored within the dedup
    /// window: nothing was stored, and this is where the original landed.
    pub duplicate: bool,
}

impl From<AppendAck> for Ack {
    /// The position alone, without the duplicate flag.
    fn from(a: AppendAck) -> Self {
        Ack {
            epoch: a.epoch,
            offset: a.offset,
            version: a.version,
        }
    }
}

/// An event as delivered to subscribers and history readers.
///
/// # Wire
/// `topic`, `offset`, `event_type`, `version`, `timestamp_ms`, `headers`,
/// `payload`, in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEvent {
    /// Topic name.
    pub topic: String,
    /// Offset in the topic (from 1, +1 per event).
    pub offset: u64,
    /// Event type.
    pub event_type: String,
    /// Version within (topic, type) (from 1, +1 per event of that type).
    pub version: u64,
    /// Broker-assigned time, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Event headers.
    pub headers: Headers,
    /// Opaque payload.
    pub payload: Bytes,
}

/// Why a subscription skipped events.
///
/// # Wire
/// `u32` tag: 0 `Retention`, 1 `EpochChanged`, 2 `SlowConsumer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GapReason {
    /// Tag 0. The events were trimmed or expired by retention.
    Retention,
    /// Tag 1. The client named another epoch: the topic's history restarted.
    EpochChanged,
    /// Tag 2. The subscriber fell behind and the ring overwrote unsent events.
    SlowConsumer,
}

/// What a [`ServerMessage::Gap`] reports missing.
///
/// # Wire
/// `topic`, `event_type` (option of string), `reason`, `epoch`, `requested`,
/// `first_available`, `current`, in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGap {
    /// Topic name.
    pub topic: String,
    /// The event type whose versions have the gap, or `None` for the whole
    /// topic (then the numbers below are offsets, else versions of that type).
    pub event_type: Option<String>,
    /// Why the events are missing.
    pub reason: GapReason,
    /// The topic's current epoch.
    pub epoch: u64,
    /// The offset (or version) after which the client asked to resume.
    pub requested: u64,
    /// The first offset (or version) still available.
    pub first_available: u64,
    /// The current (latest) offset (or version); delivery continues after it.
    pub current: u64,
}

/// One line of a [`ServerMessage::Topics`] listing.
///
/// # Wire
/// `name`, `epoch`, `last_offset`, `sealed` (bool), in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSummary {
    /// Topic name.
    pub name: String,
    /// Current epoch.
    pub epoch: u64,
    /// Offset of the last event (0 when none was ever published).
    pub last_offset: u64,
    /// Whether the topic is sealed.
    pub sealed: bool,
}

/// A topic's state and settings, answering `ClientMessage::TopicInfo`.
///
/// # Wire
/// The fields in declaration order: `name`, `epoch`, `first_offset`,
/// `last_offset`, `versions`, `max_events`, `max_age_ms`, `max_bytes`,
/// `retained_events`, `retained_bytes`, `subscribers`, `sealed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTopicInfo {
    /// Topic name.
    pub name: String,
    /// Current epoch.
    pub epoch: u64,
    /// Offset of the oldest retained event (`last_offset + 1` when none is retained).
    pub first_offset: u64,
    /// Offset of the last event (0 when none was ever published).
    pub last_offset: u64,
    /// `(event type, current version)` for every type ever published.
    pub versions: Vec<(String, u64)>,
    /// Retention bound on the number of events (0 = unbounded).
    pub max_events: u64,
    /// Retention bound on event age in milliseconds (0 = unbounded).
    pub max_age_ms: u64,
    /// Retention bound on retained payload bytes (0 = unbounded).
    pub max_bytes: u64,
    /// Events currently retained.
    pub retained_events: u64,
    /// Bytes currently retained.
    pub retained_bytes: u64,
    /// Live subscriptions on the topic.
    pub subscribers: u32,
    /// Whether the topic is sealed.
    pub sealed: bool,
}

/// Machine-readable cause of a [`ServerMessage::Error`].
///
/// # Wire
/// A `u32` tag equal to the variant's position, which is also its numeric
/// code (`code as u32`); the table in `docs/protocol.md` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u32)]
pub enum ErrorCode {
    /// Code 0: A frame could not be decoded (fatal).
    BadFrame = 0,
    /// Code 1: The first frame was not a valid `Hello`, or `Hello` came twice (fatal).
    BadHello = 1,
    /// Code 2: The `Hello` named a protocol version the server does not speak (fatal).
    UnsupportedVersion = 2,
    /// Code 3: A topic name is empty, too long, or has a forbidden byte.
    InvalidTopic = 3,
    /// Code 4: An event type is empty or otherwise invalid.
    InvalidType = 4,
    /// Code 5: An event payload exceeds `max_payload`.
    PayloadTooLarge = 5,
    /// Code 6: A frame exceeds `max_frame` (fatal).
    FrameTooLarge = 6,
    /// Code 7: The topic does not exist (and is not auto-created for this request).
    TopicNotFound = 7,
    /// Code 8: The topic is sealed: publishes are refused.
    TopicSealed = 8,
    /// Code 9: The connection already has `max_subscriptions` subscriptions.
    TooManySubscriptions = 9,
    /// Code 10: The server is at its connection limit (fatal, in place of `Welcome`).
    TooManyConnections = 10,
    /// Code 11: The server is at its topic limit; the topic was not created.
    TooManyTopics = 11,
    /// Code 12: No live subscription has this id.
    UnknownSubscription = 12,
    /// Code 13: A live subscription already has this id.
    DuplicateSubscription = 13,
    /// Code 14: The subscription's start is invalid (e.g. an offset or version ahead
    /// of the topic's current one in the same epoch).
    InvalidStart = 14,
    /// Code 15: The server failed (e.g. storage error); the request may be retried.
    Internal = 15,
    /// Code 16: The server is shutting down and refuses new work (closes when
    /// answering `Hello`; a `Shutdown` message precedes the close otherwise).
    ShuttingDown = 16,
    /// Code 17: Missing or invalid credentials: closes when answering
    /// `Hello`; with `request_id` set, an anonymous client asked for something
    /// only credentials can grant.
    Unauthorized = 17,
    /// Code 18: The request is well-formed but invalid (an empty batch, bad
    /// headers); the connection lives on.
    InvalidRequest = 18,
    /// Code 19: The broker's memory limit for retained events is reached;
    /// retry later. The connection lives on.
    OverCapacity = 19,
    /// Code 20 (protocol version 2): The token has expired. Sent with
    /// `request_id` absent when answering `Hello` or when the connection's
    /// token expires (then the connection closes); answering a `Refresh`
    /// whose new token has expired, with `request_id` set.
    TokenExpired = 20,
    /// Code 21 (protocol version 2): Authenticated, but the credentials do
    /// not grant this action on this topic (or a `Refresh` tried to change
    /// identity). Says nothing about whether the topic exists.
    Forbidden = 21,
    /// Code 22 (protocol version 2): A rate limit refused the request (or the
    /// connection); sent in `RetryLater` with the time to wait.
    RateLimited = 22,
    /// Code 23 (protocol version 3): An `Append`'s expected offset or
    /// version did not hold; sent in `PositionMismatch` with the current
    /// values. Nothing was appended.
    PositionMismatch = 23,
    /// Code 24 (protocol version 4): The consumer group (or the membership
    /// named by a subscription id) does not exist.
    GroupNotFound = 24,
    /// Code 25 (protocol version 5): No live connection has this id (it
    /// closed, or never existed).
    ConnectionNotFound = 25,
}

impl ErrorCode {
    /// Every code, in tag order (`ALL[n] as u32 == n`).
    pub const ALL: [ErrorCode; 26] = [
        ErrorCode::BadFrame,
        ErrorCode::BadHello,
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidTopic,
        ErrorCode::InvalidType,
        ErrorCode::PayloadTooLarge,
        ErrorCode::FrameTooLarge,
        ErrorCode::TopicNotFound,
        ErrorCode::TopicSealed,
        ErrorCode::TooManySubscriptions,
        ErrorCode::TooManyConnections,
        ErrorCode::TooManyTopics,
        ErrorCode::UnknownSubscription,
        ErrorCode::DuplicateSubscription,
        ErrorCode::InvalidStart,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
        ErrorCode::Unauthorized,
        ErrorCode::InvalidRequest,
        ErrorCode::OverCapacity,
        ErrorCode::TokenExpired,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::PositionMismatch,
        ErrorCode::GroupNotFound,
        ErrorCode::ConnectionNotFound,
    ];

    /// The numeric code, equal to the wire tag.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// The code with this number, if any.
    pub fn from_u32(code: u32) -> Option<ErrorCode> {
        Self::ALL.get(usize::try_from(code).ok()?).copied()
    }

    /// Whether an error with this code always closes the connection.
    ///
    /// These codes mean the stream or the session cannot go on; the server
    /// sends them with `request_id: None` and closes. Independently of the
    /// code, *any* `Error` without a `request_id` is connection-level and is
    /// followed by a close (e.g. `Unauthorized` or `ShuttingDown` answering
    /// `Hello`); an `Error` with a `request_id` answers that request only.
    pub const fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::BadFrame
                | ErrorCode::BadHello
                | ErrorCode::UnsupportedVersion
                | ErrorCode::FrameTooLarge
                | ErrorCode::TooManyConnections
        )
    }

    /// Whether the same request (or connection attempt) may succeed when
    /// retried later, unchanged: the cause is a transient condition of the
    /// server (`Internal`, `ShuttingDown`, `TooManyConnections`,
    /// `OverCapacity`, `RateLimited`), not of the request. Back off first;
    /// `RetryLater` says for how long. `TokenExpired` is not in the list: it
    /// needs new credentials, not patience.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Internal
                | ErrorCode::ShuttingDown
                | ErrorCode::TooManyConnections
                | ErrorCode::OverCapacity
                | ErrorCode::RateLimited
        )
    }

    /// The protocol version that introduced this code.
    pub const fn introduced_in(self) -> u16 {
        match self {
            ErrorCode::TokenExpired | ErrorCode::Forbidden | ErrorCode::RateLimited => 2,
            ErrorCode::PositionMismatch => 3,
            ErrorCode::GroupNotFound => 4,
            ErrorCode::ConnectionNotFound => 5,
            _ => 1,
        }
    }

    /// The code to send to a peer speaking protocol `version`: codes newer
    /// than the peer are replaced by the closest one it knows —
    /// `TokenExpired` and `Forbidden` by `Unauthorized`, `RateLimited` by
    /// `OverCapacity` (both "retry later" and "refused", as a version 1 client
    /// understood them), `PositionMismatch`, `GroupNotFound` and
    /// `ConnectionNotFound` by `InvalidRequest`.
    pub const fn for_version(self, version: u16) -> ErrorCode {
        if self.introduced_in() <= version {
            return self;
        }
        match self {
            ErrorCode::RateLimited => ErrorCode::OverCapacity,
            ErrorCode::PositionMismatch
            | ErrorCode::GroupNotFound
            | ErrorCode::ConnectionNotFound => ErrorCode::InvalidRequest,
            _ => ErrorCode::Unauthorized,
        }
    }
}

impl ClientMessage {
    /// The variant's name, for errors and logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "Hello",
            Self::Publish { .. } => "Publish",
            Self::PublishBatch { .. } => "PublishBatch",
            Self::Subscribe { .. } => "Subscribe",
            Self::Unsubscribe { .. } => "Unsubscribe",
            Self::History { .. } => "History",
            Self::ListTopics { .. } => "ListTopics",
            Self::TopicInfo { .. } => "TopicInfo",
            Self::Seal { .. } => "Seal",
            Self::Delete { .. } => "Delete",
            Self::Ping { .. } => "Ping",
            Self::Refresh { .. } => "Refresh",
            Self::Append { .. } => "Append",
            Self::CreateGroup { .. } => "CreateGroup",
            Self::JoinGroup { .. } => "JoinGroup",
            Self::LeaveGroup { .. } => "LeaveGroup",
            Self::Settle { .. } => "Settle",
            Self::GroupInfo { .. } => "GroupInfo",
            Self::ListGroups { .. } => "ListGroups",
            Self::DeleteGroup { .. } => "DeleteGroup",
            Self::Redrive { .. } => "Redrive",
            Self::ListConnections { .. } => "ListConnections",
            Self::CloseConnection { .. } => "CloseConnection",
            Self::SubscribePattern { .. } => "SubscribePattern",
            Self::HelloExt { .. } => "HelloExt",
        }
    }
}

impl ServerMessage {
    /// The variant's name, for errors and logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Welcome { .. } => "Welcome",
            Self::Published { .. } => "Published",
            Self::Subscribed { .. } => "Subscribed",
            Self::Unsubscribed { .. } => "Unsubscribed",
            Self::Event { .. } => "Event",
            Self::Gap { .. } => "Gap",
            Self::End { .. } => "End",
            Self::History { .. } => "History",
            Self::Topics { .. } => "Topics",
            Self::TopicInfo { .. } => "TopicInfo",
            Self::Ok { .. } => "Ok",
            Self::Pong { .. } => "Pong",
            Self::Error { .. } => "Error",
            Self::Heartbeat => "Heartbeat",
            Self::Shutdown { .. } => "Shutdown",
            Self::Refreshed { .. } => "Refreshed",
            Self::RetryLater { .. } => "RetryLater",
            Self::Appended { .. } => "Appended",
            Self::PositionMismatch { .. } => "PositionMismatch",
            Self::Joined { .. } => "Joined",
            Self::Delivery { .. } => "Delivery",
            Self::Settled { .. } => "Settled",
            Self::GroupInfo { .. } => "GroupInfo",
            Self::Groups { .. } => "Groups",
            Self::Redriven { .. } => "Redriven",
            Self::Connections { .. } => "Connections",
            Self::PatternSubscribed { .. } => "PatternSubscribed",
            Self::TopicJoined { .. } => "TopicJoined",
            Self::SubscriptionEnded { .. } => "SubscriptionEnded",
            Self::WelcomeExt { .. } => "WelcomeExt",
        }
    }
}
