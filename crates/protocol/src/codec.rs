//! `tokio_util::codec` adapters over the frame codec (feature `codec`).
//!
//! A thin wrapper: [`FrameCodec`] decodes with [`FrameDecoder`] and encodes
//! with [`encode_frame`], checking outgoing bodies against the same
//! `max_frame`.

use std::fmt;
use std::marker::PhantomData;

use bytes::BytesMut;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{encode_frame, FrameDecoder, ProtocolError, FRAME_HEADER_LEN};
use crate::messages::{ClientMessage, ServerMessage};

/// The server's codec: reads [`ClientMessage`]s, writes [`ServerMessage`]s.
pub type ServerCodec = FrameCodec<ClientMessage, ServerMessage>;

/// The client's codec: reads [`ServerMessage`]s, writes [`ClientMessage`]s.
pub type ClientCodec = FrameCodec<ServerMessage, ClientMessage>;

/// Error of the tokio adapters: the transport failed, or the bytes did.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Reading or writing the underlying stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes were not a valid frame or message.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// A `tokio_util` codec reading frames of `In` and writing frames of `Out`.
pub struct FrameCodec<In, Out> {
    decoder: FrameDecoder<In>,
    _out: PhantomData<fn(Out)>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec accepting and producing bodies of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            decoder: FrameDecoder::new(max_frame),
            _out: PhantomData,
        }
    }

    /// The largest body, in bytes, accepted in either direction.
    pub fn max_frame(&self) -> usize {
        self.decoder.max_frame()
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    /// A codec with [`DEFAULT_MAX_FRAME`](crate::DEFAULT_MAX_FRAME).
    fn default() -> Self {
        FrameCodec {
            decoder: FrameDecoder::default(),
            _out: PhantomData,
        }
    }
}

impl<In, Out> Clone for FrameCodec<In, Out> {
    fn clone(&self) -> Self {
        FrameCodec {
            decoder: self.decoder.clone(),
            _out: PhantomData,
        }
    }
}

impl<In, Out> fmt::Debug for FrameCodec<In, Out> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameCodec")
            .field("decoder", &self.decoder)
            .finish()
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        Ok(self.decoder.decode(src)?)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        Ok(self.decoder.decode_eof(src)?)
    }
}

impl<In, Out: Serialize> Encoder<&Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: &Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        let start = dst.len();
        encode_frame(item, dst)?;
        let len = dst.len() - start - FRAME_HEADER_LEN;
        if len > self.max_frame() {
            dst.truncate(start);
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: self.max_frame(),
            }
            .into());
        }
        Ok(())
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        Encoder::<&Out>::encode(self, &item, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codec_reads_client_frames_and_writes_server_frames() {
        let mut client = ClientCodec::default();
        let mut server = ServerCodec::default();
        let mut wire = BytesMut::new();
        client
            .encode(ClientMessage::Ping { request_id: 3 }, &mut wire)
            .unwrap();
        assert_eq!(
            server.decode(&mut wire).unwrap(),
            Some(ClientMessage::Ping { request_id: 3 })
        );
        server
            .encode(&ServerMessage::Pong { request_id: 3 }, &mut wire)
            .unwrap();
        assert_eq!(
            client.decode_eof(&mut wire).unwrap(),
            Some(ServerMessage::Pong { request_id: 3 })
        );
        assert!(client.decode_eof(&mut wire).unwrap().is_none());
    }

    #[test]
    fn encoder_refuses_a_body_over_max_frame_and_leaves_the_buffer_unchanged() {
        let mut codec = ServerCodec::new(8);
        let mut wire = BytesMut::from(&b"xy"[..]);
        let err = codec
            .encode(
                ServerMessage::Shutdown {
                    reason: "bye".into(),
                },
                &mut wire,
            )
            .unwrap_err();
        assert!(matches!(
            err,
            CodecError::Protocol(ProtocolError::FrameTooLarge { len: 15, max: 8 })
        ));
        assert_eq!(&wire[..], b"xy");
    }

    #[test]
    fn decode_eof_inside_a_frame_is_a_truncation_error() {
        let mut codec = ServerCodec::default();
        let mut wire = BytesMut::from(&[0u8, 0, 0, 12, 0, 0][..]);
        assert!(matches!(
            codec.decode_eof(&mut wire),
            Err(CodecError::Protocol(ProtocolError::Truncated {
                buffered: 6,
                expected: 16
            }))
        ));
    }
}
