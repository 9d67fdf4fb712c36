//! Payload compression on TCP connections (protocol version 5; the bytes
//! are [`ringcast_protocol::compression`]'s): the choice answering a
//! `HelloExt` ([`choose`]), payloads decoded on ingest ([`unpack`]), and
//! payloads encoded on delivery ([`put_event`], [`pack`]).
//!
//! The engine, SSE, HTTP and connections without compression only ever see
//! plain payloads: decompressed on ingest, compressed on delivery. An event
//! fanned out to many compressed subscribers is compressed once: its
//! compressed `Event` frame is built like the plain shared one
//! ([`Encoding::TcpLz4`], charged to the ring) and patched per subscriber.

use bytes::{Bytes, BytesMut};
use metrics::Counter;
use ringcast_protocol::compression as codec;
use ringcast_protocol::{Codec, CompressionChoice, CompressionOffer, ErrorCode};

use super::connection::{put_event_frame, shared_event_frame};
use super::wire;
use crate::engine::{Encoding, Event, Subscription};

/// The payload compression in force on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Compression {
    /// The codec (never [`Codec::NONE`]).
    pub(crate) codec: Codec,
    /// Payloads of at least this many bytes are compressed when that
    /// shrinks them; smaller ones go raw behind their marker.
    pub(crate) min_size: usize,
}

impl Compression {
    /// The compression a `WelcomeExt` announced; `None` when off.
    pub(crate) fn from_choice(choice: CompressionChoice) -> Option<Self> {
        choice.is_on().then(|| Compression {
            codec: choice.codec,
            min_size: usize::try_from(choice.min_size).unwrap_or(usize::MAX),
        })
    }
}

/// What a `HelloExt` offer gets when the server has compression `enabled`:
/// the first codec offered that the server speaks (LZ4), with the larger of
/// the client's threshold and the server's `floor`; else off.
pub(crate) fn choose(offer: &CompressionOffer, enabled: bool, floor: u32) -> CompressionChoice {
    match offer.codecs.iter().find(|&&c| c == Codec::LZ4) {
        Some(&codec) if enabled => CompressionChoice {
            codec,
            min_size: offer.min_size.max(floor),
        },
        _ => CompressionChoice::OFF,
    }
}

/// The payload counters of one direction, added up locally and handed to
/// the registry once per batch (a pump's hand-off, a request).
pub(crate) struct Meter {
    plain: Counter,
    wire: Counter,
    runs: Counter,
    pending_plain: u64,
    pending_wire: u64,
}

impl Meter {
    /// Counters for payloads received (`in`, counting decompressions) or
    /// sent (`out`, counting compressions).
    pub(crate) fn new(direction: &'static str) -> Self {
        let op = if direction == "in" {
            "decompress"
        } else {
            "compress"
        };
        Meter {
            plain: metrics::counter!(crate::metrics::TCP_PAYLOAD_PLAIN_BYTES, "direction" => direction),
            wire: metrics::counter!(crate::metrics::TCP_PAYLOAD_WIRE_BYTES, "direction" => direction),
            runs: metrics::counter!(crate::metrics::TCP_CODEC_RUNS, "op" => op),
            pending_plain: 0,
            pending_wire: 0,
        }
    }

    fn add(&mut self, plain: usize, wire: usize) {
        self.pending_plain += plain as u64;
        self.pending_wire += wire as u64;
    }

    fn ran(&self) {
        self.runs.increment(1);
    }

    /// Hands what was added up to the registry.
    pub(crate) fn flush(&mut self) {
        if self.pending_plain > 0 || self.pending_wire > 0 {
            self.plain
                .increment(std::mem::take(&mut self.pending_plain));
            self.wire.increment(std::mem::take(&mut self.pending_wire));
        }
    }
}

/// Decodes the marked payloads of one request in place. Before anything is
/// decompressed, each declared length is held to `max_payload` and their
/// sum to `max_total` (so that a request never decompresses to more than
/// an uncompressed one could carry); a payload that cannot be read refuses
/// the whole request. The error is the code and message to answer it with.
pub(crate) fn unpack(
    c: Compression,
    payloads: &mut [&mut Bytes],
    max_payload: usize,
    max_total: usize,
    meter: &mut Meter,
) -> Result<(), (ErrorCode, String)> {
    let refuse = |i: usize, e: codec::PayloadError| (e.error_code(), format!("payload {i}: {e}"));
    let mut total = 0usize;
    for (i, p) in payloads.iter().enumerate() {
        let declared = codec::declared_len(c.codec, p).map_err(|e| refuse(i, e))?;
        if declared > max_payload {
            let max = max_payload;
            return Err(refuse(i, codec::PayloadError::TooLarge { declared, max }));
        }
        total = total.saturating_add(declared);
    }
    if total > max_total {
        return Err((
            ErrorCode::InvalidRequest,
            format!("the payloads of one request decompress to {total} bytes; at most {max_total} (max_frame)"),
        ));
    }
    for (i, p) in payloads.iter_mut().enumerate() {
        let wire = std::mem::take(&mut **p);
        let wire_len = wire.len();
        if wire.first() != Some(&Codec::NONE.0) {
            meter.ran();
        }
        **p = codec::decode_payload(c.codec, wire, max_payload).map_err(|e| refuse(i, e))?;
        meter.add(p.len(), wire_len);
    }
    meter.flush();
    Ok(())
}

/// `payload` as it goes on a connection with compression `c` (marked, and
/// compressed when at least `min_size` and that shrinks it), for messages
/// built one at a time (`History`, `Delivery`).
pub(crate) fn pack(c: Compression, payload: &[u8], meter: &mut Meter) -> Bytes {
    if payload.len() >= c.min_size {
        meter.ran();
    }
    let wire = codec::encode_payload(c.codec, c.min_size, payload);
    meter.add(payload.len(), wire.len());
    wire
}

/// Appends the `Event` frame of `event` (of `topic`) for `subscription_id`
/// on a connection with `packing` — its compression and the pump's counters
/// (`None`: plain payloads). The frame
/// is copied from the event's shared one — built once for every subscriber
/// of the same kind, compressed once for all compressed ones — when `sub`
/// says other live subscribers take it too, or it exists already; else it
/// is encoded straight into `buf` (a replayed event, a lone subscriber).
pub(crate) fn put_event(
    buf: &mut BytesMut,
    subscription_id: u64,
    topic: &str,
    event: &Event,
    sub: Option<&Subscription>,
    packing: Option<(Compression, &mut Meter)>,
) {
    let Some((c, meter)) = packing else {
        match sub {
            Some(sub) if event.cached(Encoding::Tcp).is_some() || sub.shares(event) => {
                let frame = sub.encoded(event, Encoding::Tcp, || shared_event_frame(topic, event));
                put_event_frame(buf, subscription_id, frame);
            }
            _ => {
                if let Err(err) = ringcast_protocol::encode_event_frame(
                    subscription_id,
                    &wire::event_ref(topic, event),
                    buf,
                ) {
                    tracing::error!(error = %err, "cannot encode an event");
                }
            }
        }
        return;
    };
    // The frame depends on whether this connection's threshold lets the
    // payload be compressed, not on the threshold itself: two shared frames
    // serve every compressed connection.
    let (which, min_size) = if event.payload.len() >= c.min_size {
        (Encoding::TcpLz4, 0)
    } else {
        (Encoding::TcpMarked, usize::MAX)
    };
    let before = buf.len();
    match sub {
        Some(sub) if event.cached(which).is_some() || sub.shares(event) => {
            let frame = sub.encoded(event, which, || {
                if min_size == 0 {
                    meter.ran();
                }
                shared_compressed_frame(topic, event, c.codec, min_size)
            });
            put_event_frame(buf, subscription_id, frame);
        }
        _ => {
            if min_size == 0 {
                meter.ran();
            }
            let event = wire::event_ref(topic, event);
            if let Err(err) =
                codec::encode_event_frame(subscription_id, &event, c.codec, min_size, buf)
            {
                tracing::error!(error = %err, "cannot encode an event");
            }
        }
    }
    // The frame less its payload field is the plain frame less the payload.
    let head = wire::event_ref(topic, event).frame_len() - event.payload.len();
    meter.add(
        event.payload.len(),
        (buf.len() - before).saturating_sub(head),
    );
}

/// The `Event` frame of `event` with subscription id 0 for connections with
/// compression on, its payload compressed under `min_size` (0: whenever
/// that shrinks it; `usize::MAX`: never): built once per event, patched per
/// subscriber.
fn shared_compressed_frame(topic: &str, event: &Event, codec: Codec, min_size: usize) -> Bytes {
    let event = wire::event_ref(topic, event);
    let mut b = BytesMut::with_capacity(event.frame_len() + 1);
    if let Err(e) = codec::encode_event_frame(0, &event, codec, min_size, &mut b) {
        tracing::error!(error = %e, "cannot encode an event");
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ringcast_protocol::{decode_body, ServerMessage};

    use super::*;

    const LZ4: Compression = Compression {
        codec: Codec::LZ4,
        min_size: 64,
    };

    #[test]
    fn the_server_takes_lz4_with_the_larger_threshold_or_nothing() {
        let offer = |codecs: Vec<Codec>, min_size| CompressionOffer { codecs, min_size };
        let lz4 = |min_size| CompressionChoice {
            codec: Codec::LZ4,
            min_size,
        };
        assert_eq!(choose(&offer(vec![Codec::LZ4], 10), true, 128), lz4(128));
        assert_eq!(choose(&offer(vec![Codec::LZ4], 4096), true, 128), lz4(4096));
        // Unknown codecs are passed over, in the client's order.
        assert_eq!(
            choose(&offer(vec![Codec(7), Codec::LZ4], 0), true, 0),
            lz4(0)
        );
        assert_eq!(
            choose(&offer(vec![Codec(7)], 0), true, 0),
            CompressionChoice::OFF
        );
        assert_eq!(choose(&offer(vec![], 0), true, 0), CompressionChoice::OFF);
        assert_eq!(
            choose(&offer(vec![Codec::LZ4], 0), false, 0),
            CompressionChoice::OFF
        );
    }

    #[test]
    fn a_request_decompressing_to_more_than_the_total_is_refused_before_any_is() {
        let big = codec::encode_payload(Codec::LZ4, 0, &[b'a'; 1000]);
        assert_eq!(big[0], 1);
        let (mut a, mut b) = (big.clone(), big.clone());
        let mut meter = Meter::new("in");
        let err = unpack(LZ4, &mut [&mut a, &mut b], 1000, 1999, &mut meter).unwrap_err();
        assert_eq!(err.0, ErrorCode::InvalidRequest);
        // Untouched: still the compressed bytes.
        assert_eq!((a.clone(), b.clone()), (big.clone(), big.clone()));
        unpack(LZ4, &mut [&mut a, &mut b], 1000, 2000, &mut meter).unwrap();
        assert_eq!(a, vec![b'a'; 1000]);
        let mut over = big;
        let err = unpack(LZ4, &mut [&mut over], 999, 1 << 20, &mut meter).unwrap_err();
        assert_eq!(err.0, ErrorCode::PayloadTooLarge);
        let mut unmarked = Bytes::new();
        let err = unpack(LZ4, &mut [&mut unmarked], 999, 1 << 20, &mut meter).unwrap_err();
        assert_eq!(err.0, ErrorCode::InvalidRequest);
        assert!(err.1.starts_with("payload 0: "), "{}", err.1);
    }

    #[test]
    fn an_event_is_encoded_alike_shared_or_straight() {
        let event = Event::new(
            7,
            3,
            1_700_000_000_000,
            Arc::from("created"),
            vec![("k".into(), "v".into())],
            Bytes::from(b"{\"a\":1}".repeat(40)),
        );
        for c in [
            LZ4,
            Compression {
                codec: Codec::LZ4,
                min_size: 1 << 20,
            },
        ] {
            let mut meter = Meter::new("out");
            let mut direct = BytesMut::new();
            put_event(
                &mut direct,
                5,
                "orders",
                &event,
                None,
                Some((c, &mut meter)),
            );
            let min_size = if event.payload.len() >= c.min_size {
                0
            } else {
                usize::MAX
            };
            let mut patched = BytesMut::new();
            put_event_frame(
                &mut patched,
                5,
                &shared_compressed_frame("orders", &event, c.codec, min_size),
            );
            assert_eq!(direct, patched);
            let Ok(ServerMessage::Event { event: wire, .. }) =
                decode_body::<ServerMessage>(&direct[4..])
            else {
                panic!("an event frame");
            };
            assert_eq!(wire.payload[0] == 1, c.min_size == 64);
            let plain = codec::decode_payload(c.codec, wire.payload, 1 << 20).unwrap();
            assert_eq!(plain, event.payload);
        }
    }
}
