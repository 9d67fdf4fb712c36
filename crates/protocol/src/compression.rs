//! Payload compression (protocol version 5), negotiated by `HelloExt` and
//! `WelcomeExt`.
//!
//! On a connection whose `WelcomeExt` names a codec, every event payload —
//! of `Publish`, `PublishBatch`, `Append`, `Event`, `Delivery` and
//! `History` — starts with a codec marker byte, so that raw and compressed
//! payloads mix freely:
//!
//! ```text
//! 00 <the payload's bytes>                                   raw
//! 01 <original length: u32, big-endian> <one LZ4 block>      LZ4
//! ```
//!
//! The `bytes` length in front counts the marker (and the LZ4 header). A
//! sender compresses a payload of at least the negotiated `min_size` when
//! that makes it smaller, and sends it raw otherwise; a receiver takes both
//! at any size. Decoding is bounded: the declared length is checked against
//! a limit before anything is allocated, and the block must decompress to
//! exactly that many bytes. Nothing here panics, whatever the input.
//! Connections that did not negotiate compression carry payloads as they
//! are, without a marker.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::ProtocolError;
use crate::hot::{body_len, put_event_fields, EventRef};
use crate::messages::{Codec, ErrorCode};

/// Bytes before the LZ4 block of a compressed payload: the marker and the
/// original length.
pub const LZ4_HEADER_LEN: usize = 5;

/// Why a payload with a codec marker could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// No marker: on a compressed connection even an empty payload is one
    /// byte (`00`).
    #[error("the payload lacks its codec marker (an empty payload is the one byte 00)")]
    Empty,
    /// A marker that is neither `00` nor the connection's codec.
    #[error("payload codec marker {0:#04x} is neither 00 (raw) nor the codec negotiated on this connection")]
    UnexpectedCodec(u8),
    /// The payload is, or declares to be, larger than allowed.
    #[error("the payload is {declared} bytes uncompressed; the limit is {max}")]
    TooLarge {
        /// Its (declared) uncompressed length.
        declared: usize,
        /// The limit.
        max: usize,
    },
    /// The LZ4 header (marker and original length) is cut short.
    #[error("the compressed payload is shorter than its 5-byte header")]
    Truncated,
    /// The block is malformed, or does not hold the declared length.
    #[error("corrupt LZ4 block: {0}")]
    Corrupt(String),
}

impl PayloadError {
    /// The error code a request carrying this payload is refused with:
    /// `PayloadTooLarge` for a payload over the limit, `InvalidRequest`
    /// otherwise. The connection lives on.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            PayloadError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
            _ => ErrorCode::InvalidRequest,
        }
    }
}

/// Whether `payload` is worth compressing with `codec` under `min_size`.
fn worth_trying(codec: Codec, min_size: usize, payload: &[u8]) -> bool {
    codec == Codec::LZ4 && payload.len() >= min_size && u32::try_from(payload.len()).is_ok()
}

/// Appends `payload` as the `bytes` field of a connection with compression
/// on: the `u64` length, then the marked payload — LZ4-compressed when
/// `codec` is LZ4, the payload has at least `min_size` bytes and
/// compression makes it smaller; raw (`00` + the bytes) otherwise. The
/// block is compressed straight into `dst`.
pub fn put_payload(codec: Codec, min_size: usize, payload: &[u8], dst: &mut BytesMut) {
    if worth_trying(codec, min_size, payload) {
        let field_at = dst.len();
        let bound = lz4_flex::block::get_maximum_output_size(payload.len());
        dst.reserve(8 + LZ4_HEADER_LEN + bound);
        dst.put_u64(0);
        dst.put_u8(Codec::LZ4.0);
        // `worth_trying` checked that the length fits.
        dst.put_u32(payload.len() as u32);
        let block_at = dst.len();
        dst.resize(block_at + bound, 0);
        match lz4_flex::block::compress_into(payload, &mut dst[block_at..]) {
            Ok(n) if LZ4_HEADER_LEN + n < 1 + payload.len() => {
                dst.truncate(block_at + n);
                let field = (LZ4_HEADER_LEN + n) as u64;
                dst[field_at..field_at + 8].copy_from_slice(&field.to_be_bytes());
                return;
            }
            // It did not shrink (or could not be compressed): raw.
            _ => dst.truncate(field_at),
        }
    }
    dst.reserve(9 + payload.len());
    dst.put_u64(1 + payload.len() as u64);
    dst.put_u8(Codec::NONE.0);
    dst.extend_from_slice(payload);
}

/// `payload` as it goes on a connection with compression on (without the
/// `u64` length): see [`put_payload`].
pub fn encode_payload(codec: Codec, min_size: usize, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    put_payload(codec, min_size, payload, &mut b);
    b.freeze().slice(8..)
}

/// Appends `event` as one `ServerMessage::Event` frame for a connection
/// with compression on: [`encode_event_frame`](crate::encode_event_frame)
/// with the payload written by [`put_payload`].
///
/// Fails, leaving `dst` as it was, only if the body would not fit the
/// `u32` length prefix.
pub fn encode_event_frame(
    subscription_id: u64,
    event: &EventRef<'_>,
    codec: Codec,
    min_size: usize,
    dst: &mut BytesMut,
) -> Result<(), ProtocolError> {
    let start = dst.len();
    // Raw it is one byte longer; compressed, `put_payload` reserves more.
    dst.reserve(event.frame_len() + 1);
    dst.put_u32(0);
    put_event_fields(subscription_id, event, dst);
    put_payload(codec, min_size, event.payload, dst);
    match body_len(dst.len() - start) {
        Ok(len) => {
            dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            dst.truncate(start);
            Err(e)
        }
    }
}

/// The uncompressed length a marked payload declares (raw: its length less
/// the marker), read without decompressing anything — for checking what a
/// whole request will take before decoding any of it.
pub fn declared_len(codec: Codec, wire: &[u8]) -> Result<usize, PayloadError> {
    match wire.first() {
        None => Err(PayloadError::Empty),
        Some(0) => Ok(wire.len() - 1),
        Some(&m) if m == codec.0 && codec == Codec::LZ4 => {
            let header = wire
                .get(1..LZ4_HEADER_LEN)
                .and_then(|h| <[u8; 4]>::try_from(h).ok())
                .ok_or(PayloadError::Truncated)?;
            Ok(usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX))
        }
        Some(&m) => Err(PayloadError::UnexpectedCodec(m)),
    }
}

/// The payload a marked `wire` payload stands for, on a connection whose
/// codec is `codec`: a raw one without its marker (no copy), a compressed
/// one decompressed — at most `max_len` bytes, checked before anything is
/// allocated, and exactly the length it declares.
pub fn decode_payload(codec: Codec, wire: Bytes, max_len: usize) -> Result<Bytes, PayloadError> {
    let declared = declared_len(codec, &wire)?;
    if declared > max_len {
        return Err(PayloadError::TooLarge {
            declared,
            max: max_len,
        });
    }
    if wire.first() == Some(&Codec::NONE.0) {
        return Ok(wire.slice(1..));
    }
    let mut out = vec![0u8; declared];
    match lz4_flex::block::decompress_into(&wire[LZ4_HEADER_LEN..], &mut out) {
        Ok(n) if n == declared => Ok(Bytes::from(out)),
        Ok(n) => Err(PayloadError::Corrupt(format!(
            "the block holds {n} bytes, not the {declared} declared"
        ))),
        Err(e) => Err(PayloadError::Corrupt(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::frame::{decode_body, FRAME_HEADER_LEN};
    use crate::messages::ServerMessage;

    fn json(n: usize) -> Vec<u8> {
        let mut s = String::from("[");
        let mut i = 0;
        while s.len() < n {
            s.push_str(&format!(
                r#"{{"id":{i},"status":"shipped","customer":"c-{}"}},"#,
                i % 7
            ));
            i += 1;
        }
        s.truncate(n);
        s.into_bytes()
    }

    #[test]
    fn a_compressible_payload_is_lz4_and_reads_back() {
        let plain = json(4096);
        let wire = encode_payload(Codec::LZ4, 256, &plain);
        assert_eq!(wire[0], 1);
        assert_eq!(&wire[1..5], &4096u32.to_be_bytes());
        assert!(wire.len() < plain.len() / 3, "{} bytes", wire.len());
        let back = decode_payload(Codec::LZ4, wire, 4096).unwrap();
        assert_eq!(back, plain);
    }

    #[test]
    fn a_small_or_incompressible_payload_goes_raw_with_its_marker() {
        let small = json(100);
        let wire = encode_payload(Codec::LZ4, 256, &small);
        assert_eq!(wire[0], 0);
        assert_eq!(&wire[1..], &small[..]);
        // Bytes that do not repeat: LZ4 cannot shrink them.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let wire = encode_payload(Codec::LZ4, 256, &noise);
        assert_eq!(wire[0], 0);
        assert_eq!(wire.len(), noise.len() + 1);
        assert_eq!(decode_payload(Codec::LZ4, wire, 4096).unwrap(), noise);
        // An empty payload is the marker alone.
        assert_eq!(&encode_payload(Codec::LZ4, 0, b"")[..], &[0]);
        assert_eq!(
            decode_payload(Codec::LZ4, Bytes::from_static(&[0]), 0).unwrap(),
            Bytes::new()
        );
    }

    #[test]
    fn a_raw_payload_is_read_without_a_copy() {
        let wire = Bytes::from(vec![0, 1, 2, 3]);
        let plain = decode_payload(Codec::LZ4, wire.clone(), 16).unwrap();
        assert_eq!(plain, &[1, 2, 3][..]);
        assert_eq!(plain.as_ptr(), wire[1..].as_ptr());
    }

    /// The marked payload of the protocol doc's LZ4 example (the
    /// `client.Publish.Lz4` vector), and what it stands for.
    const DOC_LZ4: &str = "0100000033af7b2274657874223a22610100106061616161227d";
    const DOC_PLAIN: &str = r#"{"text":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#;

    #[test]
    fn the_lz4_example_of_the_protocol_doc_reads_back() {
        assert_eq!(DOC_PLAIN.len(), 0x33);
        let wire = Bytes::from(hex::decode(DOC_LZ4).unwrap());
        assert_eq!(declared_len(Codec::LZ4, &wire), Ok(51));
        let plain = decode_payload(Codec::LZ4, wire, 51).unwrap();
        assert_eq!(plain, DOC_PLAIN.as_bytes());
    }

    #[test]
    fn a_declared_length_over_the_limit_is_refused_before_allocating() {
        let mut wire = vec![1];
        wire.extend_from_slice(&u32::MAX.to_be_bytes());
        wire.extend_from_slice(&[0x1f, 0]);
        let err = decode_payload(Codec::LZ4, Bytes::from(wire), 1 << 20).unwrap_err();
        assert_eq!(
            err,
            PayloadError::TooLarge {
                declared: u32::MAX as usize,
                max: 1 << 20
            }
        );
        assert_eq!(err.error_code(), ErrorCode::PayloadTooLarge);
        let raw = Bytes::from(vec![0; 11]);
        assert!(matches!(
            decode_payload(Codec::LZ4, raw, 9),
            Err(PayloadError::TooLarge { declared: 10, .. })
        ));
    }

    #[test]
    fn a_lying_or_corrupt_block_is_an_error() {
        let plain = json(2048);
        let wire = encode_payload(Codec::LZ4, 0, &plain).to_vec();
        // Declares one byte more than the block holds.
        let mut longer = wire.clone();
        longer[1..5].copy_from_slice(&2049u32.to_be_bytes());
        let err = decode_payload(Codec::LZ4, Bytes::from(longer), 1 << 20).unwrap_err();
        assert!(matches!(err, PayloadError::Corrupt(_)), "{err}");
        assert_eq!(err.error_code(), ErrorCode::InvalidRequest);
        // Declares one byte fewer: the block overruns it.
        let mut shorter = wire.clone();
        shorter[1..5].copy_from_slice(&2047u32.to_be_bytes());
        assert!(matches!(
            decode_payload(Codec::LZ4, Bytes::from(shorter), 1 << 20),
            Err(PayloadError::Corrupt(_))
        ));
        // Cut anywhere: an error, never a panic.
        for cut in 0..wire.len() {
            let r = decode_payload(Codec::LZ4, Bytes::copy_from_slice(&wire[..cut]), 1 << 20);
            assert!(r.is_err(), "cut at {cut}");
        }
        assert_eq!(
            decode_payload(Codec::LZ4, Bytes::new(), 1),
            Err(PayloadError::Empty)
        );
        assert_eq!(
            decode_payload(Codec::LZ4, Bytes::from_static(&[1, 0, 0]), 8),
            Err(PayloadError::Truncated)
        );
        assert_eq!(
            decode_payload(Codec::LZ4, Bytes::from_static(&[7, 1]), 8),
            Err(PayloadError::UnexpectedCodec(7))
        );
        // LZ4 on a connection that negotiated another codec.
        assert_eq!(
            decode_payload(Codec(9), Bytes::from(wire), 1 << 20),
            Err(PayloadError::UnexpectedCodec(1))
        );
    }

    #[test]
    fn a_compressed_event_frame_is_an_event_with_the_marked_payload() {
        let headers = vec![("trace".to_owned(), "t1".to_owned())];
        let payload = json(3000);
        let event = EventRef {
            topic: "orders",
            offset: 42,
            event_type: "created",
            version: 7,
            timestamp_ms: 1_700_000_000_042,
            headers: &headers,
            payload: &payload,
        };
        for (min_size, compressed) in [(0, true), (3000, true), (3001, false)] {
            let mut frame = BytesMut::from(&b"xy"[..]);
            encode_event_frame(9, &event, Codec::LZ4, min_size, &mut frame).unwrap();
            let frame = frame.split_off(2);
            let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
            assert_eq!(len, frame.len() - FRAME_HEADER_LEN);
            let ServerMessage::Event {
                subscription_id,
                event: wire,
            } = decode_body::<ServerMessage>(&frame[FRAME_HEADER_LEN..]).unwrap()
            else {
                panic!("not an event");
            };
            assert_eq!(subscription_id, 9);
            assert_eq!((wire.topic.as_str(), wire.offset), ("orders", 42));
            assert_eq!(wire.headers, headers);
            assert_eq!(wire.payload[0] == 1, compressed, "min_size {min_size}");
            assert_eq!(wire.payload, encode_payload(Codec::LZ4, min_size, &payload));
            let plain = decode_payload(Codec::LZ4, wire.payload, payload.len()).unwrap();
            assert_eq!(plain, payload);
        }
    }

    /// The codec's own cost per payload (BENCHMARKS.md, "TCP compression"):
    /// `cargo test --release -p ringcast-protocol --lib figures -- --ignored --nocapture`.
    #[test]
    #[ignore = "prints measurements"]
    fn figures() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        // The JSON of ringcast-bench's `--payload-kind json`.
        let mut text = String::from("[");
        let mut i = 0u64;
        while text.len() < 4096 {
            text.push_str(&format!(
                r#"{{"order":{},"status":"{}","customer":"cust-{:04}","total":{}.{:02}}},"#,
                1_000_000 + i * 37,
                ["created", "paid", "shipped", "delivered"][(i % 4) as usize],
                i * 7919 % 10_000,
                i * 131 % 5000,
                i % 100
            ));
            i += 1;
        }
        text.truncate(4096);
        let records = text.into_bytes();
        for (name, plain) in [("json 4 KiB", records), ("random 4 KiB", random)] {
            const N: u32 = 20_000;
            let started = std::time::Instant::now();
            let mut wire = Bytes::new();
            for _ in 0..N {
                wire = encode_payload(Codec::LZ4, 0, std::hint::black_box(&plain));
            }
            let encode = started.elapsed() / N;
            let started = std::time::Instant::now();
            for _ in 0..N {
                let p = decode_payload(Codec::LZ4, std::hint::black_box(wire.clone()), 1 << 20);
                assert_eq!(p.map(|p| p.len()), Ok(plain.len()));
            }
            let decode = started.elapsed() / N;
            println!(
                "{name}: {} -> {} bytes ({:.3}), encode {encode:?}, decode {decode:?} per payload",
                plain.len(),
                wire.len(),
                wire.len() as f64 / plain.len() as f64
            );
        }
    }

    proptest! {
        #[test]
        fn any_payload_round_trips_at_any_threshold(
            payload in prop_oneof![
                vec(any::<u8>(), 0..2000),
                vec(prop::sample::select(b"ab{}\":,0123".to_vec()), 0..4000),
            ],
            min_size in 0usize..3000,
        ) {
            let wire = encode_payload(Codec::LZ4, min_size, &payload);
            prop_assert!(wire.len() <= payload.len() + 1);
            prop_assert_eq!(wire[0] == 1, wire.len() < payload.len() + 1);
            if payload.len() < min_size {
                prop_assert_eq!(wire[0], 0);
            }
            prop_assert_eq!(declared_len(Codec::LZ4, &wire), Ok(payload.len()));
            let back = decode_payload(Codec::LZ4, wire, payload.len()).unwrap();
            prop_assert_eq!(&back[..], &payload[..]);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            wire in vec(any::<u8>(), 0..300),
            lz4 in any::<bool>(),
            max_len in 0usize..100_000,
        ) {
            let mut wire = wire;
            if lz4 && !wire.is_empty() {
                wire[0] = 1;
            }
            if let Ok(plain) = decode_payload(Codec::LZ4, Bytes::from(wire), max_len) {
                prop_assert!(plain.len() <= max_len);
            }
        }
    }
}
