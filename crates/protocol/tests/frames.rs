//! Frame-level behaviour on good and bad input, message by message.

mod common;

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use common::{samples, AnyMessage};
use ringcast_protocol::{
    decode_body, encode_frame, ClientMessage, ErrorCode, FrameDecoder, ProtocolError,
    ServerMessage, DEFAULT_MAX_FRAME, FRAME_HEADER_LEN,
};

/// Runs a frame decoder of the sample's direction over `buf`.
fn decode_frame_like(
    sample: &AnyMessage,
    buf: &mut BytesMut,
    eof: bool,
) -> Result<Option<AnyMessage>, ProtocolError> {
    match sample {
        AnyMessage::Client(_) => {
            let mut d = FrameDecoder::<ClientMessage>::default();
            if eof {
                d.decode_eof(buf)
            } else {
                d.decode(buf)
            }
            .map(|m| m.map(AnyMessage::Client))
        }
        AnyMessage::Server(_) => {
            let mut d = FrameDecoder::<ServerMessage>::default();
            if eof {
                d.decode_eof(buf)
            } else {
                d.decode(buf)
            }
            .map(|m| m.map(AnyMessage::Server))
        }
    }
}

fn frame_with_body(body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(u32::try_from(body.len()).unwrap());
    buf.put_slice(body);
    buf
}

#[test]
fn every_sample_round_trips_through_encode_frame_and_frame_decoder() {
    for (name, msg) in samples() {
        let frame = msg.frame();
        let body_len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(body_len, frame.len() - FRAME_HEADER_LEN, "{name}: prefix");
        let mut buf = BytesMut::from(&frame[..]);
        let decoded = decode_frame_like(&msg, &mut buf, false).unwrap();
        assert_eq!(decoded.as_ref(), Some(&msg), "{name}");
        assert!(buf.is_empty());
        assert_eq!(
            msg.decode_like(&frame[4..]).unwrap(),
            msg,
            "{name}: decode_body"
        );
    }
}

#[test]
fn encode_frame_appends_after_existing_bytes() {
    let mut buf = BytesMut::from(&b"ab"[..]);
    encode_frame(&ServerMessage::Heartbeat, &mut buf).unwrap();
    assert_eq!(&buf[..], &[b'a', b'b', 0, 0, 0, 4, 0, 0, 0, 13]);
}

#[test]
fn every_truncated_body_fails_with_an_error() {
    for (name, msg) in samples() {
        let frame = msg.frame();
        let body = &frame[FRAME_HEADER_LEN..];
        for cut in 0..body.len() {
            let err = msg.decode_like(&body[..cut]).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Malformed { .. }),
                "{name} cut at {cut}: {err:?}"
            );
            // The same truncated body, framed correctly, is a decode error too.
            let mut buf = frame_with_body(&body[..cut]);
            assert!(
                decode_frame_like(&msg, &mut buf, false).is_err(),
                "{name}@{cut}"
            );
            assert!(buf.is_empty(), "the bad frame is consumed");
        }
    }
}

#[test]
fn every_truncated_frame_waits_for_more_then_fails_at_end_of_stream() {
    for (name, msg) in samples() {
        let frame = msg.frame();
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            assert_eq!(
                decode_frame_like(&msg, &mut buf, false),
                Ok(None),
                "{name}@{cut}"
            );
            let mut buf = BytesMut::from(&frame[..cut]);
            let at_eof = decode_frame_like(&msg, &mut buf, true);
            if cut == 0 {
                assert_eq!(at_eof, Ok(None), "clean end between frames");
            } else {
                assert!(
                    matches!(at_eof, Err(ProtocolError::Truncated { .. })),
                    "{name}@{cut}: {at_eof:?}"
                );
            }
        }
    }
}

#[test]
fn frames_split_at_every_byte_decode_in_order() {
    let all = samples();
    let client: Vec<_> = all
        .iter()
        .filter_map(|(_, m)| match m {
            AnyMessage::Client(c) => Some(c.clone()),
            AnyMessage::Server(_) => None,
        })
        .collect();
    let mut stream = BytesMut::new();
    for msg in &client {
        encode_frame(msg, &mut stream).unwrap();
    }
    for split in 0..=stream.len() {
        let mut decoder = FrameDecoder::<ClientMessage>::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in [&stream[..split], &stream[split..]] {
            buf.extend_from_slice(chunk);
            while let Some(msg) = decoder.decode(&mut buf).unwrap() {
                out.push(msg);
            }
        }
        assert_eq!(out, client, "split at {split}");
        assert!(decoder.is_at_boundary());
    }
}

#[test]
fn trailing_bytes_after_a_message_are_rejected() {
    for (name, msg) in samples() {
        let frame = msg.frame();
        let mut body = frame[FRAME_HEADER_LEN..].to_vec();
        body.push(0);
        assert_eq!(
            msg.decode_like(&body),
            Err(ProtocolError::TrailingBytes { extra: 1 }),
            "{name}"
        );
        let mut buf = frame_with_body(&body);
        assert_eq!(
            decode_frame_like(&msg, &mut buf, false),
            Err(ProtocolError::TrailingBytes { extra: 1 })
        );
    }
}

#[test]
fn unknown_enum_tags_are_rejected_at_every_level() {
    // Top level: ClientMessage has 24 variants, ServerMessage 29.
    assert!(decode_body::<ClientMessage>(&24u32.to_be_bytes()).is_err());
    assert!(decode_body::<ClientMessage>(&u32::MAX.to_be_bytes()).is_err());
    assert!(decode_body::<ServerMessage>(&29u32.to_be_bytes()).is_err());

    // Nested: rewrite the inner tag of a valid sample to one past the last variant.
    let sample = |name: &str| {
        samples()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
            .frame()[FRAME_HEADER_LEN..]
            .to_vec()
    };
    // Subscribe: tag, request_id, subscription_id, topic "orders", types ["created"], start tag.
    let mut subscribe = sample("client.Subscribe.Live");
    let start_at = subscribe.len() - 4;
    assert_eq!(subscribe[start_at..], [0, 0, 0, 0]);
    subscribe[start_at..].copy_from_slice(&4u32.to_be_bytes());
    assert!(decode_body::<ClientMessage>(&subscribe).is_err());

    // Gap: tag, subscription_id, topic "orders", event_type None, reason tag, ...
    let mut gap = sample("server.Gap.Retention");
    let reason_at = 4 + 8 + 8 + 6 + 1;
    assert_eq!(gap[reason_at..reason_at + 4], [0, 0, 0, 0]);
    gap[reason_at..reason_at + 4].copy_from_slice(&3u32.to_be_bytes());
    assert!(decode_body::<ServerMessage>(&gap).is_err());

    // Settle: tag, request_id, subscription_id, offsets [42], action tag.
    let mut settle = sample("client.Settle.Ack");
    let action_at = settle.len() - 4;
    assert_eq!(settle[action_at..], [0, 0, 0, 0]);
    settle[action_at..].copy_from_slice(&4u32.to_be_bytes());
    assert!(decode_body::<ClientMessage>(&settle).is_err());

    // CreateGroup: tag, request_id, topic "orders", group "workers", start tag, ...
    let mut create = sample("client.CreateGroup");
    let start_at = 4 + 8 + 8 + 6 + 8 + 7;
    assert_eq!(create[start_at..start_at + 4], [0, 0, 0, 0]);
    create[start_at..start_at + 4].copy_from_slice(&3u32.to_be_bytes());
    assert!(decode_body::<ClientMessage>(&create).is_err());

    // Error: tag, request_id Some(1), code, ...
    let mut error = sample("server.Error");
    let code_at = 4 + 1 + 8;
    assert_eq!(
        error[code_at..code_at + 4],
        ErrorCode::TopicSealed.as_u32().to_be_bytes()
    );
    error[code_at..code_at + 4].copy_from_slice(&(ErrorCode::ALL.len() as u32).to_be_bytes());
    assert!(decode_body::<ServerMessage>(&error).is_err());
}

#[test]
fn an_empty_body_is_malformed() {
    assert!(matches!(
        decode_body::<ClientMessage>(&[]),
        Err(ProtocolError::Malformed { .. })
    ));
}

#[test]
fn a_huge_length_prefix_is_rejected_before_any_body_is_buffered() {
    let mut decoder = FrameDecoder::<ClientMessage>::default();
    let mut buf = BytesMut::with_capacity(8);
    buf.put_u32(u32::MAX);
    let capacity = buf.capacity();
    assert_eq!(
        decoder.decode(&mut buf),
        Err(ProtocolError::FrameTooLarge {
            len: u32::MAX as usize,
            max: DEFAULT_MAX_FRAME
        })
    );
    assert_eq!(
        buf.capacity(),
        capacity,
        "nothing was reserved for the body"
    );
    // The stream cannot be resynchronised: the error repeats.
    assert!(decoder.decode(&mut buf).is_err());
    assert_eq!(
        decoder.decode(&mut buf).unwrap_err().error_code(),
        ErrorCode::FrameTooLarge
    );
}

#[test]
fn a_body_of_exactly_max_frame_is_accepted_and_one_more_byte_is_not() {
    let ping = {
        let mut b = BytesMut::new();
        encode_frame(&ClientMessage::Ping { request_id: 1 }, &mut b).unwrap();
        b
    };
    let body_len = ping.len() - FRAME_HEADER_LEN;

    let mut at_limit = FrameDecoder::<ClientMessage>::new(body_len);
    let mut buf = ping.clone();
    assert_eq!(
        at_limit.decode(&mut buf),
        Ok(Some(ClientMessage::Ping { request_id: 1 }))
    );

    let mut below = FrameDecoder::<ClientMessage>::new(body_len - 1);
    let mut buf = ping.clone();
    assert_eq!(
        below.decode(&mut buf),
        Err(ProtocolError::FrameTooLarge {
            len: body_len,
            max: body_len - 1
        })
    );
}

#[test]
fn after_a_malformed_body_the_decoder_reads_the_next_frame() {
    let mut buf = frame_with_body(&[0, 0, 0, 99]);
    encode_frame(&ClientMessage::Ping { request_id: 2 }, &mut buf).unwrap();
    let mut decoder = FrameDecoder::<ClientMessage>::default();
    let err = decoder.decode(&mut buf).unwrap_err();
    assert_eq!(err.error_code(), ErrorCode::BadFrame);
    assert!(decoder.is_at_boundary());
    assert_eq!(
        decoder.decode(&mut buf),
        Ok(Some(ClientMessage::Ping { request_id: 2 }))
    );
}

/// Bodies whose length fields claim 2^60 items or bytes.
fn hostile_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let huge = (1u64 << 60).to_be_bytes();
    let mut out = Vec::new();

    // ServerMessage::History (tag 7): request_id, then events count 2^60.
    let mut history = 7u32.to_be_bytes().to_vec();
    history.extend_from_slice(&1u64.to_be_bytes());
    history.extend_from_slice(&huge);
    out.push(("history events count", history));

    // ClientMessage::Publish (tag 1): request_id, topic length 2^60.
    let mut topic = 1u32.to_be_bytes().to_vec();
    topic.extend_from_slice(&1u64.to_be_bytes());
    topic.extend_from_slice(&huge);
    out.push(("publish topic length", topic));

    // ClientMessage::Publish: request_id, topic "t", type "e", headers count 2^60.
    let mut headers = 1u32.to_be_bytes().to_vec();
    headers.extend_from_slice(&1u64.to_be_bytes());
    headers.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, b't']);
    headers.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, b'e']);
    headers.extend_from_slice(&huge);
    out.push(("publish headers count", headers));

    // ClientMessage::Publish: ..., headers empty, payload length 2^60.
    let mut payload = 1u32.to_be_bytes().to_vec();
    payload.extend_from_slice(&1u64.to_be_bytes());
    payload.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, b't']);
    payload.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, b'e']);
    payload.extend_from_slice(&[0; 8]);
    payload.extend_from_slice(&huge);
    out.push(("publish payload length", payload));

    // Every string/byte length at u64::MAX too (beyond usize on 32-bit).
    let mut max = 1u32.to_be_bytes().to_vec();
    max.extend_from_slice(&1u64.to_be_bytes());
    max.extend_from_slice(&u64::MAX.to_be_bytes());
    out.push(("publish topic length u64::MAX", max));
    out
}

#[test]
fn length_fields_claiming_two_to_the_sixty_fail_fast() {
    for (what, body) in hostile_bodies() {
        let started = Instant::now();
        let client = decode_body::<ClientMessage>(&body);
        let server = decode_body::<ServerMessage>(&body);
        assert!(client.is_err() && server.is_err(), "{what}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{what} took {:?}",
            started.elapsed()
        );
    }
}
