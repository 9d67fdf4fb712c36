//! Property tests: every message survives a round trip, and no input — whole
//! bodies or a stream in arbitrary chunks — makes the decoder panic.

mod common;

use bytes::BytesMut;
use common::{any_message, client_message, server_message};
use proptest::collection::vec;
use proptest::prelude::*;
use ringcast_protocol::{
    decode_body, encode_frame, ClientMessage, FrameDecoder, ProtocolError, ServerMessage,
};

/// Feeds `chunks` to a frame decoder, draining messages after each one.
fn feed<M: serde::de::DeserializeOwned>(
    decoder: &mut FrameDecoder<M>,
    chunks: &[Vec<u8>],
) -> Result<Vec<M>, ProtocolError> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let Some(msg) = decoder.decode(&mut buf)? {
            out.push(msg);
        }
    }
    if let Some(msg) = decoder.decode_eof(&mut buf)? {
        out.push(msg);
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn client_messages_round_trip(msg in client_message()) {
        let mut buf = BytesMut::new();
        encode_frame(&msg, &mut buf).unwrap();
        prop_assert_eq!(decode_body::<ClientMessage>(&buf[4..]), Ok(msg.clone()));
        let mut decoder = FrameDecoder::<ClientMessage>::default();
        prop_assert_eq!(decoder.decode(&mut buf), Ok(Some(msg)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn server_messages_round_trip(msg in server_message()) {
        let mut buf = BytesMut::new();
        encode_frame(&msg, &mut buf).unwrap();
        prop_assert_eq!(decode_body::<ServerMessage>(&buf[4..]), Ok(msg.clone()));
        let mut decoder = FrameDecoder::<ServerMessage>::default();
        prop_assert_eq!(decoder.decode(&mut buf), Ok(Some(msg)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn a_stream_of_messages_in_arbitrary_chunks_decodes_in_order(
        msgs in vec(client_message(), 0..6),
        cuts in vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut stream = BytesMut::new();
        for msg in &msgs {
            encode_frame(msg, &mut stream).unwrap();
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.push(0);
        points.push(stream.len());
        points.sort_unstable();
        let chunks: Vec<Vec<u8>> =
            points.windows(2).map(|w| stream[w[0]..w[1]].to_vec()).collect();
        let mut decoder = FrameDecoder::<ClientMessage>::default();
        prop_assert_eq!(feed(&mut decoder, &chunks), Ok(msgs));
    }

    #[test]
    fn decode_body_never_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..256)) {
        let _ = decode_body::<ClientMessage>(&bytes);
        let _ = decode_body::<ServerMessage>(&bytes);
    }

    #[test]
    fn decode_body_never_panics_on_mutated_valid_bodies(
        msg in any_message(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let frame = msg.frame();
        let mut body = frame[4..].to_vec();
        for (at, byte) in flips {
            let i = at.index(body.len());
            body[i] = byte;
        }
        let _ = msg.decode_like(&body);
    }

    #[test]
    fn frame_decoder_never_panics_on_arbitrary_chunks(
        chunks in vec(vec(any::<u8>(), 0..64), 0..8),
        max_frame in 0usize..512,
    ) {
        let _ = feed(&mut FrameDecoder::<ClientMessage>::new(max_frame), &chunks);
        let _ = feed(&mut FrameDecoder::<ServerMessage>::new(max_frame), &chunks);
    }

    #[test]
    fn frame_decoder_never_panics_on_small_length_prefixes_and_garbage(
        len in 0u32..128,
        body in vec(any::<u8>(), 0..160),
        split in any::<prop::sample::Index>(),
    ) {
        let mut stream = len.to_be_bytes().to_vec();
        stream.extend_from_slice(&body);
        let at = split.index(stream.len() + 1);
        let chunks = [stream[..at].to_vec(), stream[at..].to_vec()];
        let _ = feed(&mut FrameDecoder::<ClientMessage>::default(), &chunks);
        let _ = feed(&mut FrameDecoder::<ServerMessage>::default(), &chunks);
    }
}
