//! ringcast wire protocol: the message types spoken over TCP and the frame
//! codec that carries them. A pure codec — no I/O, no async — shared by the
//! broker and the client SDK.
//!
//! The byte-level specification, written so that an SDK in another language
//! can be built from it alone, is `docs/protocol.md`; the hex test vectors in
//! `crates/protocol/tests/vectors.txt` are checked against this crate.
//!
//! # Layout
//! - [`messages`]: [`ClientMessage`] (client → server), [`ServerMessage`]
//!   (server → client) and the plain structs and enums inside them. Variant
//!   order is the wire tag: new variants go at the end, and any change bumps
//!   [`PROTOCOL_VERSION`].
//! - [`frame`]: the frame layout (4-byte big-endian body length, then one
//!   bincode-encoded message), the single bincode configuration,
//!   [`encode_frame`], [`decode_body`], the incremental [`FrameDecoder`] and
//!   [`ProtocolError`].
//! - [`hot`]: the hot messages — `Event`, `Append`, `Appended`, `Published`
//!   — written and read by hand ([`encode_event_frame`],
//!   [`decode_server_body`], [`decode_client_body`], …), byte for byte what
//!   the serde path gives.
//! - [`compression`]: payload compression (version 5): the codec marker
//!   every payload carries on a connection that negotiated it, LZ4 blocks,
//!   bounded decoding.
//! - `codec` (feature `codec`): `tokio_util::codec` adapters over [`frame`].
//!
//! # Example
//! ```
//! use bytes::BytesMut;
//! use ringcast_protocol::{encode_frame, ClientMessage, FrameDecoder};
//!
//! let mut wire = BytesMut::new();
//! encode_frame(&ClientMessage::Ping { request_id: 7 }, &mut wire).unwrap();
//! assert_eq!(&wire[..], &[0, 0, 0, 12, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 7]);
//!
//! let mut decoder = FrameDecoder::<ClientMessage>::default();
//! let msg = decoder.decode(&mut wire).unwrap();
//! assert_eq!(msg, Some(ClientMessage::Ping { request_id: 7 }));
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "codec")]
pub mod codec;
pub mod compression;
pub mod frame;
pub mod hot;
pub mod messages;

#[cfg(feature = "codec")]
pub use codec::{ClientCodec, CodecError, FrameCodec, ServerCodec};
pub use compression::PayloadError;
pub use frame::{
    decode_body, encode_frame, FrameDecoder, ProtocolError, DEFAULT_MAX_FRAME, FRAME_HEADER_LEN,
    RESERVE_STEP,
};
pub use hot::{
    decode_client_body, decode_server_body, encode_appended_frame, encode_event_frame,
    encode_published_frame, EventRef,
};
pub use messages::{
    Ack, AppendAck, AppendEvent, ClientMessage, Codec, CompressionChoice, CompressionOffer,
    ErrorCode, GapReason, GroupOptions, GroupStart, Headers, NewEvent, ServerMessage, SettleAction,
    Start, TopicPosition, TopicSummary, WireConnSubscription, WireConnection, WireEvent, WireGap,
    WireGroupInfo, WireMember, WirePending, WireTopicInfo,
};

/// Version of this wire protocol, sent in `Hello` and `Welcome`.
///
/// Bumped on any change to the bytes on the wire, including a new variant.
/// Version 2 added `Refresh`, `Refreshed`, `RetryLater` and the error codes
/// `TokenExpired`, `Forbidden` and `RateLimited` (access control).
/// Version 3 added `Append`, `Appended`, `PositionMismatch` and the error
/// code `PositionMismatch` (idempotency keys and expected positions).
/// Version 4 added consumer groups: `CreateGroup`, `JoinGroup`,
/// `LeaveGroup`, `Settle`, `GroupInfo`, `ListGroups`, `DeleteGroup`,
/// `Redrive`, `Joined`, `Delivery`, `Settled`, `GroupInfo`, `Groups`,
/// `Redriven` and the error code `GroupNotFound`.
/// Version 5 added connection management: `ListConnections`,
/// `CloseConnection`, `Connections` and the error code `ConnectionNotFound`;
/// and pattern subscriptions: `SubscribePattern`, `PatternSubscribed`,
/// `TopicJoined`, `SubscriptionEnded`; and payload compression: `HelloExt`,
/// `WelcomeExt` and the codec marker of payloads on a connection that
/// negotiated it.
pub const PROTOCOL_VERSION: u16 = 5;

/// The oldest protocol version a current server still accepts in `Hello`.
/// It answers such a client in that version: never with a message or an
/// error code the version lacks (see [`ErrorCode::for_version`]).
pub const MIN_PROTOCOL_VERSION: u16 = 1;
