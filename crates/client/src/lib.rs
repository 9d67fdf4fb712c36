//! Rust client for the ringcast pub/sub broker.
//!
//! A [`Client`] holds one TCP connection to the broker (protocol:
//! `docs/protocol.md`), pipelines requests over it, and repairs it by itself:
//! after a drop it reconnects with capped exponential backoff and full
//! jitter, and resumes every [`Subscription`] exactly after the last event it
//! delivered. The caller sees no duplicate and no hole — only a
//! [`Delivery::Gap`] when the broker no longer has what was missed, which
//! means "refetch your state".
//!
//! # Example
//! ```no_run
//! use ringcast_client::{Client, Delivery};
//!
//! # async fn demo() -> ringcast_client::Result<()> {
//! let client = Client::connect("127.0.0.1:7411").await?;
//!
//! let ack = client.publish("orders", "created", r#"{"id":1}"#).await?;
//! println!("appended at offset {} (epoch {})", ack.offset, ack.epoch);
//!
//! let mut orders = client.subscribe("orders").types(["created"]).earliest().send().await?;
//! while let Some(delivery) = orders.next_delivery().await {
//!     match delivery? {
//!         Delivery::Event(event) => println!("{} v{}", event.event_type, event.version),
//!         Delivery::Gap(gap) => println!("missed events ({:?}): refetch", gap.reason),
//!         Delivery::End { .. } => break,
//!     }
//! }
//! client.close().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`Client`] (`client.rs`): the cloneable handle; one method per request,
//!   [`SubscribeBuilder`], [`PendingAck`] for ordered pipelined publishing.
//! - [`Subscription`] (`subscription.rs`): a `Stream` of [`Delivery`].
//! - [`PatternSubscription`] (`pattern.rs`): the same over every topic
//!   matching a pattern, with per-topic resume bookkeeping.
//! - [`Consumer`] (`consumer.rs`): a consumer-group membership, a `Stream`
//!   of [`Job`]s to settle (and gaps for lost work); [`ConsumeOptions`].
//! - `connection.rs`: the background task that owns the socket — a
//!   coalescing writer, a reader routing replies by request id and pushes by
//!   subscription id, heartbeats, and the reconnect loop.
//! - `queue.rs`: a subscription's delivery queue, bounded in events and
//!   handed over one batch per socket read (one wake-up per read, not per
//!   event).
//! - `resume.rs`: per-subscription bookkeeping that picks the `Start` of a
//!   resumed `Subscribe` and drops duplicates.
//! - `compress.rs`: payload compression on a connection that negotiated it
//!   ([`Compression`]): publishes packed on the way out, events unpacked on
//!   the way in.
//! - `backoff.rs`: exponential backoff with full jitter.
//! - `token.rs`: the [`TokenProvider`], reading a JWT's `exp`, when to refresh.
//! - [`ClientOptions`] (`options.rs`) and [`Error`] (`error.rs`).
//! - `bin/ringcast/`: the `ringcast` command-line client, built on this SDK.
//!
//! # Delivery guarantees
//! Within one subscription, events arrive in increasing offset order, each at
//! most once, across reconnects; anything skipped is announced by a gap.
//! A consumer that falls behind its buffer is paused and resumed the same way
//! (see [`ClientOptions::subscription_buffer`]), so one slow subscription
//! never holds up the others or the replies on the shared connection.
//!
//! Publishes are exactly once into the log: every event gets an idempotency
//! key (random, or the caller's: [`NewEventExt::key`]), and a publish in
//! flight when the connection drops is sent again on the next one with the
//! same key, so the broker stores it once and the caller gets the original
//! ack (within the topic's dedup window). For
//! event-sourced writers, [`Client::publish_expecting`] appends only if the
//! topic (or the event type) is still where the writer last saw it.

//! # Consumer groups
//! [`Client::consume`] joins a topic's consumer group as a named member and
//! returns a [`Consumer`]: each event goes to one member at a time as a
//! [`Job`], to [`ack`](Job::ack), [`nack`](Job::nack),
//! [`in_progress`](Job::in_progress) or [`term`](Job::term); one not settled
//! within the group's `ack_wait` is redelivered with a higher
//! [`attempt`](Job::attempt). Work the group lost to retention arrives as
//! [`ConsumerItem::Gap`], never silently. After a reconnect the member joins
//! again under the same name, jobs already handed out can still be settled,
//! and an ack cut off before its answer is sent again (a repeat counts as
//! `already_done`). [`Client::create_group`], [`Client::group_info`],
//! [`Client::groups`], [`Client::delete_group`] and [`Client::redrive`]
//! manage groups.
//!
//! # Pattern subscriptions
//! [`Client::subscribe_pattern`] subscribes to every topic matching a
//! pattern (`orders.*`), including topics created later (from their first
//! event). Deliveries name their topic; an `End` ends only that topic. The
//! client keeps each topic's position and resumes every topic exactly
//! after a reconnect, topics created while it was away from their first
//! event.
//!
//! # Connections
//! [`Client::connections`] lists the broker's live connections (TCP and
//! SSE) with each subscription's position and lag; [`Client::close_connection`]
//! closes one, which its client sees as a broker shutdown: it reconnects and
//! resumes. Both need the admin grant on every topic.
//!
//! # Access control
//! When the broker requires credentials, set a JWT or an API key with
//! [`ClientOptions::with_credentials`], or a [`TokenProvider`] with
//! [`ClientOptions::with_token_provider`]: the client then asks it for a
//! fresh token on every (re)connect, refreshes a JWT on the live connection
//! before its `exp` ([`Client::refresh`] does it by hand), and when the
//! broker closes the connection with `TokenExpired` anyway, reconnects and
//! resumes every subscription exactly. `Unauthorized` and `Forbidden` at
//! connect, and `TokenExpired` without a provider, are final
//! ([`Error::Refused`]); a rate limit is [`Error::RetryLater`] with the time
//! to wait. [`Error::is_retryable`] tells which errors are worth retrying.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backoff;
mod client;
mod compress;
mod connection;
mod consumer;
mod error;
mod options;
mod pattern;
mod queue;
mod resume;
mod subscription;
mod token;

pub use client::{
    new_event, Client, Expected, HistoryPage, NewEventExt, PendingAck, ServerInfo, SubscribeBuilder,
};
pub use consumer::{ConsumeOptions, Consumer, ConsumerItem, Job, Settled, DEFAULT_MAX_IN_FLIGHT};
pub use error::{code_name, Error, Result};
pub use options::{ClientOptions, Compression, DEFAULT_ADDR};
pub use pattern::{PatternSubscribeBuilder, PatternSubscription};
pub use subscription::{Delivery, Subscription};
pub use token::{TokenFuture, TokenProvider};

pub use bytes::Bytes;
pub use ringcast_protocol::{
    Ack, AppendAck, AppendEvent, ErrorCode, GapReason, GroupOptions, GroupStart, Headers, NewEvent,
    Start, TopicPosition, TopicSummary, WireConnSubscription, WireConnection, WireEvent, WireGap,
    WireGroupInfo, WireMember, WirePending, WireTopicInfo, PROTOCOL_VERSION,
};
