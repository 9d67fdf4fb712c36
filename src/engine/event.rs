//! The values that flow through the engine: events, acks, starts, gaps.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

/// A published event as retained in a topic's ring. Shared by every
/// subscriber through an `Arc`; the payload is never copied per subscriber.
#[derive(Debug)]
pub struct Event {
    /// Position in the topic, from 1, +1 per event, never reused.
    pub offset: u64,
    /// Position among the topic's events of this type, from 1.
    pub version: u64,
    /// Milliseconds since the Unix epoch, assigned by the broker.
    pub timestamp_ms: u64,
    /// The event's type (same alphabet as topic names).
    pub event_type: Arc<str>,
    /// Small string map: correlation id, causation id, user id, ...
    pub headers: Vec<(String, String)>,
    /// Opaque bytes; JSON by convention.
    pub payload: Bytes,
    /// Its front-end encodings, allocated on the first one built (most
    /// retained events never get one: 16 bytes each instead of 80).
    encodings: OnceLock<Box<Encodings>>,
    /// Bytes of those encodings charged to the ring holding the event
    /// (0 once it left the ring); changed under the topic's lock.
    pub(crate) charged: AtomicU64,
}

/// The shared encodings of one event.
#[derive(Debug, Default)]
struct Encodings {
    /// The event encoded once for all TCP subscribers (a whole `Event`
    /// frame with subscription id 0, patched per subscriber).
    tcp_frame: OnceLock<Bytes>,
    /// The SSE message (`id:`, `event:`, `data:` envelope), built once for
    /// all SSE subscribers.
    sse_data: OnceLock<Bytes>,
    /// The TCP `Event` frame for connections with LZ4 compression on: the
    /// payload compressed once for all of them (`Encoding::TcpLz4`).
    tcp_lz4_frame: OnceLock<Bytes>,
    /// The TCP `Event` frame for connections with compression on, the
    /// payload raw behind its marker (`Encoding::TcpMarked`).
    tcp_marked_frame: OnceLock<Bytes>,
}

impl Encodings {
    fn cell(&self, which: Encoding) -> &OnceLock<Bytes> {
        match which {
            Encoding::Tcp => &self.tcp_frame,
            Encoding::Sse => &self.sse_data,
            Encoding::TcpLz4 => &self.tcp_lz4_frame,
            Encoding::TcpMarked => &self.tcp_marked_frame,
        }
    }
}

/// Which front-end encoding of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// The TCP `Event` frame.
    Tcp,
    /// The SSE message.
    Sse,
    /// The TCP `Event` frame with its payload LZ4-compressed (or raw behind
    /// its marker when that does not shrink it), for connections that
    /// negotiated compression.
    TcpLz4,
    /// The TCP `Event` frame with its payload raw behind its marker, for
    /// connections that negotiated compression with a larger threshold.
    TcpMarked,
}

impl Clone for Event {
    /// The same event as a new value: outside any ring, with no front-end
    /// encodings (they would otherwise count nowhere).
    fn clone(&self) -> Self {
        Self::new(
            self.offset,
            self.version,
            self.timestamp_ms,
            self.event_type.clone(),
            self.headers.clone(),
            self.payload.clone(),
        )
    }
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.offset == other.offset
            && self.version == other.version
            && self.timestamp_ms == other.timestamp_ms
            && self.event_type == other.event_type
            && self.headers == other.headers
            && self.payload == other.payload
    }
}

impl Eq for Event {}

impl Event {
    /// An event with its broker-assigned positions.
    pub fn new(
        offset: u64,
        version: u64,
        timestamp_ms: u64,
        event_type: Arc<str>,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Self {
        Self {
            offset,
            version,
            timestamp_ms,
            event_type,
            headers,
            payload,
            encodings: OnceLock::new(),
            charged: AtomicU64::new(0),
        }
    }

    /// The shared `which` encoding of this event, built by `build` on first
    /// use; the length is returned along when this call built it, for the
    /// caller to charge to the ring (see `Subscription::encoded`).
    pub(crate) fn encoding(
        &self,
        which: Encoding,
        build: impl FnOnce() -> Bytes,
    ) -> (&Bytes, Option<u64>) {
        let cell = self.encodings.get_or_init(Box::default).cell(which);
        let mut built = None;
        let bytes = cell.get_or_init(|| {
            let b = build();
            built = Some(b.len() as u64);
            b
        });
        (bytes, built)
    }

    /// The shared `which` encoding of this event, if one was built.
    pub(crate) fn cached(&self, which: Encoding) -> Option<&Bytes> {
        self.encodings.get()?.cell(which).get()
    }

    /// Bytes this event counts against `max_bytes`: payload, type, headers
    /// and a fixed per-event overhead for the struct itself. Its front-end
    /// encodings are counted apart, once built (`TopicState::cache_bytes`).
    pub fn retained_size(&self) -> u64 {
        retained_size(self.payload.len(), &self.event_type, &self.headers)
    }
}

/// Bytes an event of this payload length, type and headers is charged.
fn retained_size(payload: usize, event_type: &str, headers: &[(String, String)]) -> u64 {
    const OVERHEAD: usize = 64;
    let headers: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    (payload + event_type.len() + headers + OVERHEAD) as u64
}

/// What [`Event::retained_size`] will be for `e` once it is stored.
pub(crate) fn retained_size_of(e: &NewEvent) -> u64 {
    retained_size(e.payload.len(), &e.event_type, &e.headers)
}

/// An event as a publisher hands it in: the broker assigns the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The event's type.
    pub event_type: String,
    /// Small string map carried with the event.
    pub headers: Vec<(String, String)>,
    /// Opaque bytes.
    pub payload: Bytes,
    /// Makes a retry safe: within the topic's dedup window a publish with
    /// a key already stored returns the original ack and stores nothing.
    pub idempotency_key: Option<String>,
}

impl NewEvent {
    /// An event of `event_type` with `payload`, no headers and no key.
    pub fn new(event_type: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            event_type: event_type.into(),
            headers: Vec::new(),
            payload: payload.into(),
            idempotency_key: None,
        }
    }

    /// Sets the idempotency key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }
}

/// What a publisher gets back per event once it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The topic's epoch the event belongs to.
    pub epoch: u64,
    /// The event's offset.
    pub offset: u64,
    /// The event's version within its type.
    pub version: u64,
    /// The publish repeated an idempotency key: nothing was stored, and
    /// this is the original's position.
    pub duplicate: bool,
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Only events published after the subscription.
    Live,
    /// Every retained event, then live.
    Earliest,
    /// Events with offset greater than `offset` in `epoch`.
    AfterOffset {
        /// The epoch the client's offset belongs to.
        epoch: u64,
        /// The last offset the client has.
        offset: u64,
    },
    /// Per named type, events with a greater version; other types start live.
    AfterVersions {
        /// The epoch the client's versions belong to.
        epoch: u64,
        /// The last version the client has, per type.
        versions: Vec<(String, u64)>,
    },
    /// Events with offset greater than `offset` in `epoch`; below
    /// `live_from` only those of the named types above their version. Resumes
    /// an `AfterVersions` stream cut during its replay exactly where it was.
    AfterOffsetVersions {
        /// The epoch the client's position belongs to.
        epoch: u64,
        /// The last offset the client has.
        offset: u64,
        /// The versions the original `AfterVersions` start named, per type.
        versions: Vec<(String, u64)>,
        /// Where the original stream's replay ended (its live offset).
        live_from: u64,
    },
}

/// Why a subscriber is told it missed events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GapReason {
    /// What the client asked for is older than the retained window.
    Retention,
    /// The client's position belongs to another epoch of the topic.
    EpochChanged,
    /// The subscriber fell behind the ring while connected.
    SlowConsumer,
}

impl GapReason {
    /// The reason as written in docs, logs and the SSE bridge.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retention => "retention",
            Self::EpochChanged => "epoch_changed",
            Self::SlowConsumer => "slow_consumer",
        }
    }
}

/// The one explicit message that replaces events a subscriber cannot get.
/// After it the subscription continues live.
///
/// For a whole-topic gap (`event_type` is `None`) the positions are offsets;
/// for a per-type gap (resume by versions) they are versions of that type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The topic.
    pub topic: String,
    /// The type the gap is about, or `None` for the whole topic.
    pub event_type: Option<String>,
    /// Why events were missed.
    pub reason: GapReason,
    /// The topic's current epoch.
    pub epoch: u64,
    /// The last position the client had (what it asked to resume after).
    pub requested: u64,
    /// The first position still retained (`current + 1` when none is).
    pub first_available: u64,
    /// The latest position; the subscription continues after it.
    pub current: u64,
}

/// One item of a subscription's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// An event.
    Event(Arc<Event>),
    /// Events were missed; refetch state, the stream continues live.
    Gap(Gap),
    /// The topic was sealed (after its last event) or deleted; nothing follows.
    End {
        /// The topic's last offset.
        last_offset: u64,
    },
}
