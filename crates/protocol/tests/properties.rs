//! Property tests: every message survives a round trip, and no input — whole
//! bodies or a stream in arbitrary chunks — makes the decoder panic.

mod common;

use bytes::BytesMut;
use common::{any_message, client_message, server_message};
use proptest::collection::vec;
use proptest::prelude::*;
use ringcast_protocol::{
    decode_body, decode_client_body, decode_server_body, encode_frame, ClientMessage, FrameDecoder,
    ProtocolError, ServerMessage, DEFAULT_MAX_FRAME,
};

/// A piece of a hostile stream: a valid frame of either direction, a small
/// length prefix with arbitrary body bytes, or plain garbage.
fn segment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any_message().prop_map(|m| m.frame()),
        (0u32..96, vec(any::<u8>(), 0..96)).prop_map(|(len, body)| {
            let mut v = len.to_be_bytes().to_vec();
            v.extend_from_slice(&body);
            v
        }),
        vec(any::<u8>(), 0..16),
    ]
}

/// Cuts `stream` at the given points (clamped and sorted) into chunks.
fn split(stream: &[u8], cuts: &[prop::sample::Index]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
    points.push(0);
    points.push(stream.len());
    points.sort_unstable();
    points
        .windows(2)
        .map(|w| stream[w[0]..w[1]].to_vec())
        .collect()
}

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

    #[test]
    fn hostile_streams_split_anywhere_decode_exactly_as_the_whole_stream(
        segments in vec(segment(), 0..8),
        cuts in vec(any::<prop::sample::Index>(), 0..12),
        max_frame in prop_oneof![Just(DEFAULT_MAX_FRAME), 0usize..256],
    ) {
        let stream = segments.concat();
        let chunks = split(&stream, &cuts);
        let whole = [stream.clone()];
        prop_assert_eq!(
            feed(&mut FrameDecoder::<ClientMessage>::new(max_frame), &chunks),
            feed(&mut FrameDecoder::<ClientMessage>::new(max_frame), &whole)
        );
        prop_assert_eq!(
            feed(&mut FrameDecoder::<ServerMessage>::new(max_frame), &chunks),
            feed(&mut FrameDecoder::<ServerMessage>::new(max_frame), &whole)
        );
    }

    #[test]
    fn the_hot_paths_decode_every_server_message_as_decode_body_does(
        msg in server_message(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut frame = BytesMut::new();
        encode_frame(&msg, &mut frame).unwrap();
        let mut body = frame[4..].to_vec();
        prop_assert_eq!(decode_server_body(&body), Ok(msg));
        for (at, byte) in flips {
            let i = at.index(body.len());
            body[i] = byte;
        }
        prop_assert_eq!(decode_server_body(&body), decode_body::<ServerMessage>(&body));
        let short = &body[..cut.index(body.len() + 1)];
        prop_assert_eq!(decode_server_body(short), decode_body::<ServerMessage>(short));
    }

    #[test]
    fn the_hot_paths_decode_every_client_message_as_decode_body_does(
        msg in client_message(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut frame = BytesMut::new();
        encode_frame(&msg, &mut frame).unwrap();
        let mut body = frame[4..].to_vec();
        prop_assert_eq!(decode_client_body(&body), Ok(msg));
        for (at, byte) in flips {
            let i = at.index(body.len());
            body[i] = byte;
        }
        prop_assert_eq!(decode_client_body(&body), decode_body::<ClientMessage>(&body));
        let short = &body[..cut.index(body.len() + 1)];
        prop_assert_eq!(decode_client_body(short), decode_body::<ClientMessage>(short));
    }

    #[test]
    fn arbitrary_hot_bodies_decode_on_the_fast_paths_as_decode_body_does(
        tag in prop_oneof![Just(4u32), Just(17u32)],
        rest in vec(any::<u8>(), 0..256),
    ) {
        let mut body = tag.to_be_bytes().to_vec();
        body.extend_from_slice(&rest);
        prop_assert_eq!(decode_server_body(&body), decode_body::<ServerMessage>(&body));
        let mut body = 12u32.to_be_bytes().to_vec();
        body.extend_from_slice(&rest);
        prop_assert_eq!(decode_client_body(&body), decode_body::<ClientMessage>(&body));
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_tag_never_panic_either_direction(
        tag in 0u32..32,
        rest in vec(any::<u8>(), 0..2048),
    ) {
        let mut body = tag.to_be_bytes().to_vec();
        body.extend_from_slice(&rest);
        let _ = decode_body::<ClientMessage>(&body);
        let _ = decode_body::<ServerMessage>(&body);
    }
}

/// Hostile inputs found by the attack run or by fuzzing, kept as regression
/// tests (see `fuzz/README.md`): each decodes to an error or a message.
#[test]
fn fuzz_regressions_never_panic() {
    const CASES: &[&[u8]] = &[
        // A 4 MiB frame announced, then a few bytes: must not reserve 4 MiB.
        &[0x00, 0x40, 0x00, 0x00, 1, 2, 3],
    ];
    for case in CASES {
        let chunks = [case.to_vec()];
        let _ = feed(&mut FrameDecoder::<ClientMessage>::default(), &chunks);
        let _ = feed(&mut FrameDecoder::<ServerMessage>::default(), &chunks);
        let _ = decode_body::<ClientMessage>(case);
        let _ = decode_body::<ServerMessage>(case);
    }
}
