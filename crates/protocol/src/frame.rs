//! Frames: a 4-byte big-endian body length, then the body, which is exactly
//! one bincode-encoded message.
//!
//! # Bincode configuration
//! One configuration, fixed for the protocol's lifetime:
//! `bincode::config::standard().with_big_endian().with_fixed_int_encoding()`.
//! Integers are fixed width and big-endian, lengths and counts are `u64`,
//! enum tags are `u32` — see `docs/protocol.md` for the full layout. Decoding
//! additionally sets a byte `limit` (see [`decode_body`]) so that a length
//! field can never make the decoder allocate far more than the body holds.

use std::fmt;
use std::marker::PhantomData;

use bincode::config::{BigEndian, Configuration, Fixint, NoLimit};
use bincode::error::DecodeError;
use bytes::{Buf, BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::messages::ErrorCode;

/// Bytes before each frame body: its length as a big-endian `u32`.
pub const FRAME_HEADER_LEN: usize = 4;

/// Default largest frame body, in bytes (16 MiB), that [`FrameDecoder`] accepts.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Most bytes [`FrameDecoder::decode`] reserves ahead in the buffer for a
/// frame's body: the buffer grows with the bytes that actually arrive, never
/// to the announced length up front (a peer announcing a large frame and
/// trickling it would otherwise pin that much memory per connection).
pub const RESERVE_STEP: usize = 64 * 1024;

/// The largest body the 4-byte length prefix can describe.
const MAX_ENCODABLE_BODY: usize = u32::MAX as usize;

/// The protocol's bincode configuration, without a decode limit.
pub(crate) type WireConfig = Configuration<BigEndian, Fixint, NoLimit>;

/// The protocol's bincode configuration (see the module docs).
pub(crate) const fn wire_config() -> WireConfig {
    bincode::config::standard()
        .with_big_endian()
        .with_fixed_int_encoding()
}

/// Why bytes could not be turned into a message, or a message into a frame.
///
/// These are protocol errors, independent of the broker's domain errors; the
/// server maps them to an [`ErrorCode`] with [`ProtocolError::error_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A frame's length prefix (or an encoded body) exceeds the allowed maximum.
    #[error("frame body of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// The body length that was announced or produced.
        len: usize,
        /// The maximum in force.
        max: usize,
    },
    /// The body is not a valid encoding of the expected message type.
    #[error("undecodable frame body: {reason}")]
    Malformed {
        /// What the decoder tripped over.
        reason: String,
    },
    /// The body holds a complete message followed by extra bytes.
    #[error("frame body has {extra} trailing bytes after the message")]
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
    /// The stream ended part way through a frame.
    #[error("stream ended inside a frame ({buffered} of {expected} bytes received)")]
    Truncated {
        /// Bytes of the frame (header included) that arrived.
        buffered: usize,
        /// Bytes of the frame (header included) that were expected.
        expected: usize,
    },
    /// A message could not be serialized (not expected for this crate's types).
    #[error("message could not be encoded: {reason}")]
    Encode {
        /// The serializer's complaint.
        reason: String,
    },
}

impl ProtocolError {
    /// The wire error code the server reports for this error before closing.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::BadFrame,
        }
    }
}

/// `bincode` writer appending straight into the frame buffer.
struct BytesMutWriter<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for BytesMutWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Appends `msg` to `dst` as one frame (length prefix, then body).
///
/// Fails only if the body would not fit the `u32` length prefix; `dst` is then
/// left as it was. Checking the peer's `max_frame` is the caller's job (the
/// `codec` feature's encoder does it).
pub fn encode_frame<M: Serialize>(msg: &M, dst: &mut BytesMut) -> Result<(), ProtocolError> {
    let start = dst.len();
    dst.put_u32(0); // placeholder, patched once the body length is known
    let encoded = bincode::serde::encode_into_writer(msg, BytesMutWriter(dst), wire_config());
    let body_len = dst.len() - start - FRAME_HEADER_LEN;
    let result = match encoded {
        Err(e) => Err(ProtocolError::Encode {
            reason: e.to_string(),
        }),
        Ok(()) => u32::try_from(body_len).map_err(|_| ProtocolError::FrameTooLarge {
            len: body_len,
            max: MAX_ENCODABLE_BODY,
        }),
    };
    match result {
        Ok(len) => {
            dst[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            dst.truncate(start);
            Err(e)
        }
    }
}

/// Decodes one message from a complete frame body (without the length prefix).
///
/// The body must hold exactly one message: leftover bytes are
/// [`ProtocolError::TrailingBytes`]. Decoding is bounded: bincode's byte
/// `limit` is the smallest of 64 KiB, 1 MiB, 16 MiB, 256 MiB or 4 GiB that
/// covers the body, so a length field claiming more (say a string of 2^60
/// bytes) fails before any buffer is allocated, and no single string or byte
/// field allocates more than 16 × the body length (at least 64 KiB) before
/// the read runs out. Sequence counts never preallocate more than serde's
/// 1 MiB cautious size hint.
pub fn decode_body<M: DeserializeOwned>(body: &[u8]) -> Result<M, ProtocolError> {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    let decoded = match body.len() {
        len if len <= 64 * KIB => decode_with_limit::<M, { 64 * KIB }>(body),
        len if len <= MIB => decode_with_limit::<M, MIB>(body),
        len if len <= 16 * MIB => decode_with_limit::<M, { 16 * MIB }>(body),
        len if len <= 256 * MIB => decode_with_limit::<M, { 256 * MIB }>(body),
        len if len <= MAX_ENCODABLE_BODY => decode_with_limit::<M, MAX_ENCODABLE_BODY>(body),
        len => {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: MAX_ENCODABLE_BODY,
            })
        }
    };
    match decoded {
        Ok((msg, used)) if used == body.len() => Ok(msg),
        Ok((_, used)) => Err(ProtocolError::TrailingBytes {
            extra: body.len() - used,
        }),
        Err(DecodeError::LimitExceeded) => Err(ProtocolError::Malformed {
            reason: "a length field claims more bytes than the body holds".to_owned(),
        }),
        Err(e) => Err(ProtocolError::Malformed {
            reason: e.to_string(),
        }),
    }
}

fn decode_with_limit<M: DeserializeOwned, const LIMIT: usize>(
    body: &[u8],
) -> Result<(M, usize), DecodeError> {
    bincode::serde::decode_from_slice(body, wire_config().with_limit::<LIMIT>())
}

/// Where a [`FrameDecoder`] is within the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a 4-byte length prefix.
    Head,
    /// The prefix was read (and removed from the buffer); waiting for this
    /// many body bytes.
    Body(usize),
}

/// Incremental frame decoder: feed it the bytes read so far, get messages out.
///
/// Usable without tokio (the `codec` feature wraps it for `tokio_util`). The
/// length prefix is checked against `max_frame` before any body byte is
/// buffered, so a huge prefix fails at once, and the buffer is grown at most
/// [`RESERVE_STEP`] bytes ahead of what arrived, never to the announced length. After
/// [`ProtocolError::FrameTooLarge`] the stream cannot be resynchronised
/// (every later call repeats the error) and should be closed; after a
/// malformed body the decoder is back at a frame boundary.
pub struct FrameDecoder<M> {
    max_frame: usize,
    state: State,
    _msg: PhantomData<fn() -> M>,
}

impl<M> FrameDecoder<M> {
    /// A decoder accepting bodies of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            max_frame,
            state: State::Head,
            _msg: PhantomData,
        }
    }

    /// The largest body, in bytes, this decoder accepts.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Whether the decoder is between frames (no partial frame consumed).
    pub fn is_at_boundary(&self) -> bool {
        self.state == State::Head
    }
}

impl<M: DeserializeOwned> FrameDecoder<M> {
    /// Decodes the next message from the front of `buf`, consuming its bytes.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold a whole frame (call
    /// again after reading more), an error for an oversize or undecodable frame.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<M>, ProtocolError> {
        self.decode_with(buf, decode_body)
    }

    /// Like [`decode`](Self::decode), with `body` turning the frame body
    /// into the message: a fast path for a hot message (such as
    /// [`decode_server_body`](crate::decode_server_body)) that must decode
    /// exactly what [`decode_body`] would.
    pub fn decode_with(
        &mut self,
        buf: &mut BytesMut,
        body: impl FnOnce(&[u8]) -> Result<M, ProtocolError>,
    ) -> Result<Option<M>, ProtocolError> {
        let len = match self.state {
            State::Body(len) => len,
            State::Head => {
                if buf.len() < FRAME_HEADER_LEN {
                    return Ok(None);
                }
                let mut prefix = [0u8; FRAME_HEADER_LEN];
                prefix.copy_from_slice(&buf[..FRAME_HEADER_LEN]);
                // A u32 fits usize on every target we build for; saturating
                // keeps the check meaningful (and panic-free) anywhere else.
                let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
                if len > self.max_frame {
                    return Err(ProtocolError::FrameTooLarge {
                        len,
                        max: self.max_frame,
                    });
                }
                buf.advance(FRAME_HEADER_LEN);
                self.state = State::Body(len);
                len
            }
        };
        if buf.len() < len {
            // Room for the next read, bounded (see RESERVE_STEP), and only
            // once half of it is used: `reserve` doubles the allocation.
            let want = (len - buf.len()).min(RESERVE_STEP);
            if buf.capacity() - buf.len() < want.div_ceil(2) {
                buf.reserve(want);
            }
            return Ok(None);
        }
        let frame = buf.split_to(len);
        self.state = State::Head;
        body(&frame).map(Some)
    }

    /// Like [`decode`](Self::decode), for when the stream has ended: a clean
    /// end between frames is `Ok(None)`, an end inside a frame is
    /// [`ProtocolError::Truncated`].
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<M>, ProtocolError> {
        if let Some(msg) = self.decode(buf)? {
            return Ok(Some(msg));
        }
        match self.state {
            State::Head if buf.is_empty() => Ok(None),
            State::Head => Err(ProtocolError::Truncated {
                buffered: buf.len(),
                expected: FRAME_HEADER_LEN,
            }),
            State::Body(len) => Err(ProtocolError::Truncated {
                buffered: FRAME_HEADER_LEN + buf.len(),
                expected: FRAME_HEADER_LEN + len,
            }),
        }
    }
}

impl<M> Default for FrameDecoder<M> {
    /// A decoder with [`DEFAULT_MAX_FRAME`].
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_FRAME)
    }
}

impl<M> Clone for FrameDecoder<M> {
    fn clone(&self) -> Self {
        FrameDecoder {
            max_frame: self.max_frame,
            state: self.state,
            _msg: PhantomData,
        }
    }
}

impl<M> fmt::Debug for FrameDecoder<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("max_frame", &self.max_frame)
            .field("state", &self.state)
            .finish()
    }
}

#[cfg(test)]
mod layout_tests;

#[cfg(test)]
mod reserve_tests {
    use bytes::BufMut;

    use super::*;
    use crate::messages::ClientMessage;

    #[test]
    fn a_frame_announcing_4_mib_reserves_only_a_bounded_step_for_its_body() {
        let mut decoder = FrameDecoder::<ClientMessage>::new(8 * 1024 * 1024);
        let mut buf = BytesMut::new();
        buf.put_u32(4 * 1024 * 1024);
        buf.extend_from_slice(b"abcdefgh");
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert!(!decoder.is_at_boundary());
        assert!(
            buf.capacity() <= 2 * RESERVE_STEP,
            "the buffer grew to {} bytes for 8 bytes received",
            buf.capacity()
        );
        // Trickled on, it grows with what arrives, not to the announced size.
        for _ in 0..100 {
            buf.extend_from_slice(&[0u8; 100]);
            assert_eq!(decoder.decode(&mut buf), Ok(None));
        }
        assert!(buf.capacity() <= 2 * RESERVE_STEP, "{}", buf.capacity());
    }

    #[test]
    fn a_large_frame_arriving_in_pieces_still_decodes() {
        let msg = ClientMessage::Publish {
            request_id: 1,
            topic: "t".into(),
            event_type: "e".into(),
            headers: vec![],
            payload: bytes::Bytes::from(vec![7u8; 3 * RESERVE_STEP + 5]),
        };
        let mut wire = BytesMut::new();
        encode_frame(&msg, &mut wire).unwrap();
        let mut decoder = FrameDecoder::<ClientMessage>::new(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::new();
        let mut got = None;
        for piece in wire.chunks(10_000) {
            buf.extend_from_slice(piece);
            if let Some(m) = decoder.decode(&mut buf).unwrap() {
                got = Some(m);
            }
        }
        assert_eq!(got, Some(msg));
        assert!(buf.is_empty());
    }
}
