//! The hot messages, written and read without serde: the `Event` push
//! (one per delivered event), and the `Append` request with its `Appended`
//! and `Published` replies (one per publish).
//!
//! The bytes are exactly those of [`encode_frame`] and [`decode_body`] (the
//! variant's tag, then the fields in `docs/protocol.md` order); the tests
//! check that against the serde path, byte for byte. Decoding is a fast path
//! only: anything it does not recognise (another message, a malformed body)
//! goes to [`decode_body`], so errors are the same as ever.
//!
//! [`encode_frame`]: crate::encode_frame

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{decode_body, ProtocolError, FRAME_HEADER_LEN};
use crate::messages::{Ack, AppendAck, AppendEvent, ClientMessage, ServerMessage, WireEvent};

/// `ServerMessage::Published`'s tag (its position in the enum).
const PUBLISHED_TAG: u32 = 1;
/// `ServerMessage::Event`'s tag.
const EVENT_TAG: u32 = 4;
/// `ServerMessage::Appended`'s tag.
const APPENDED_TAG: u32 = 17;
/// `ClientMessage::Append`'s tag.
const APPEND_TAG: u32 = 12;

/// A [`WireEvent`] borrowed from wherever its parts live (the broker's
/// ring), for [`encode_event_frame`].
#[derive(Debug, Clone, Copy)]
pub struct EventRef<'a> {
    /// Topic name.
    pub topic: &'a str,
    /// Offset in the topic.
    pub offset: u64,
    /// Event type.
    pub event_type: &'a str,
    /// Version within (topic, type).
    pub version: u64,
    /// Broker-assigned time, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Event headers.
    pub headers: &'a [(String, String)],
    /// Opaque payload.
    pub payload: &'a [u8],
}

impl EventRef<'_> {
    /// Bytes of the whole `Event` frame, length prefix included.
    pub fn frame_len(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| 16 + k.len() + v.len())
            .sum();
        FRAME_HEADER_LEN
            + 4 // tag
            + 8 // subscription_id
            + 8 + self.topic.len()
            + 8 // offset
            + 8 + self.event_type.len()
            + 8 // version
            + 8 // timestamp_ms
            + 8 + headers
            + 8 + self.payload.len()
    }
}

/// Appends `event` as one `ServerMessage::Event` frame for
/// `subscription_id`: the bytes [`encode_frame`](crate::encode_frame) writes
/// for the owned message, with one reservation and no intermediate values.
///
/// Fails, leaving `dst` as it was, only if the body would not fit the
/// `u32` length prefix.
pub fn encode_event_frame(
    subscription_id: u64,
    event: &EventRef<'_>,
    dst: &mut BytesMut,
) -> Result<(), ProtocolError> {
    let len = event.frame_len();
    dst.reserve(len);
    dst.put_u32(body_len(len)?);
    put_event_fields(subscription_id, event, dst);
    put_bytes(dst, event.payload);
    Ok(())
}

/// Writes an `Event` body up to its payload: the tag, the subscription id
/// and every field of the event before `payload`.
pub(crate) fn put_event_fields(subscription_id: u64, event: &EventRef<'_>, dst: &mut BytesMut) {
    dst.put_u32(EVENT_TAG);
    dst.put_u64(subscription_id);
    put_bytes(dst, event.topic.as_bytes());
    dst.put_u64(event.offset);
    put_bytes(dst, event.event_type.as_bytes());
    dst.put_u64(event.version);
    dst.put_u64(event.timestamp_ms);
    dst.put_u64(event.headers.len() as u64);
    for (k, v) in event.headers {
        put_bytes(dst, k.as_bytes());
        put_bytes(dst, v.as_bytes());
    }
}

/// Appends a `ServerMessage::Appended` frame with one `AppendAck` per
/// event of the `Append` it answers.
pub fn encode_appended_frame(
    request_id: u64,
    acks: impl ExactSizeIterator<Item = AppendAck>,
    dst: &mut BytesMut,
) -> Result<(), ProtocolError> {
    encode_acks_frame(APPENDED_TAG, request_id, acks, 25, dst, |dst, a| {
        dst.put_u64(a.epoch);
        dst.put_u64(a.offset);
        dst.put_u64(a.version);
        dst.put_u8(u8::from(a.duplicate));
    })
}

/// Appends a `ServerMessage::Published` frame with one `Ack` per event of
/// the `Publish` or `PublishBatch` it answers.
pub fn encode_published_frame(
    request_id: u64,
    acks: impl ExactSizeIterator<Item = Ack>,
    dst: &mut BytesMut,
) -> Result<(), ProtocolError> {
    encode_acks_frame(PUBLISHED_TAG, request_id, acks, 24, dst, |dst, a| {
        dst.put_u64(a.epoch);
        dst.put_u64(a.offset);
        dst.put_u64(a.version);
    })
}

/// A reply frame of `tag`: the request id, then the acks (`ack_len` bytes
/// each, written by `put`) as a length-prefixed list.
fn encode_acks_frame<A>(
    tag: u32,
    request_id: u64,
    acks: impl ExactSizeIterator<Item = A>,
    ack_len: usize,
    dst: &mut BytesMut,
    put: impl Fn(&mut BytesMut, A),
) -> Result<(), ProtocolError> {
    let len = FRAME_HEADER_LEN + 4 + 8 + 8 + acks.len() * ack_len;
    dst.reserve(len);
    dst.put_u32(body_len(len)?);
    dst.put_u32(tag);
    dst.put_u64(request_id);
    dst.put_u64(acks.len() as u64);
    for a in acks {
        put(dst, a);
    }
    Ok(())
}

pub(crate) fn body_len(len: usize) -> Result<u32, ProtocolError> {
    let body = len - FRAME_HEADER_LEN;
    u32::try_from(body).map_err(|_| ProtocolError::FrameTooLarge {
        len: body,
        max: u32::MAX as usize,
    })
}

fn put_bytes(dst: &mut BytesMut, b: &[u8]) {
    dst.put_u64(b.len() as u64);
    dst.extend_from_slice(b);
}

/// Decodes a server frame body (without the length prefix), reading an
/// `Event` or `Appended` by hand and anything else through
/// [`decode_body`]. For
/// [`FrameDecoder::decode_with`](crate::FrameDecoder::decode_with).
pub fn decode_server_body(body: &[u8]) -> Result<ServerMessage, ProtocolError> {
    let fast = match body.first_chunk::<4>().map(|t| u32::from_be_bytes(*t)) {
        Some(EVENT_TAG) => decode_event_body(body),
        Some(APPENDED_TAG) => decode_appended_body(body),
        _ => None,
    };
    match fast {
        Some(msg) => Ok(msg),
        None => decode_body(body),
    }
}

/// Decodes a client frame body (without the length prefix), reading an
/// `Append` by hand and anything else through [`decode_body`]. For
/// [`FrameDecoder::decode_with`](crate::FrameDecoder::decode_with).
pub fn decode_client_body(body: &[u8]) -> Result<ClientMessage, ProtocolError> {
    let fast = match body.first_chunk::<4>().map(|t| u32::from_be_bytes(*t)) {
        Some(APPEND_TAG) => decode_append_body(body),
        _ => None,
    };
    match fast {
        Some(msg) => Ok(msg),
        None => decode_body(body),
    }
}

/// An `Event` body, or `None` when it is not exactly one well-formed
/// `Event`.
fn decode_event_body(body: &[u8]) -> Option<ServerMessage> {
    let mut r = Reader(body);
    if r.u32()? != EVENT_TAG {
        return None;
    }
    let subscription_id = r.u64()?;
    let topic = r.string()?;
    let offset = r.u64()?;
    let event_type = r.string()?;
    let version = r.u64()?;
    let timestamp_ms = r.u64()?;
    let headers = r.headers()?;
    let payload = Bytes::copy_from_slice(r.bytes()?);
    r.end()?;
    Some(ServerMessage::Event {
        subscription_id,
        event: WireEvent {
            topic,
            offset,
            event_type,
            version,
            timestamp_ms,
            headers,
            payload,
        },
    })
}

/// An `Appended` body, or `None` when it is not exactly one well-formed
/// `Appended`.
fn decode_appended_body(body: &[u8]) -> Option<ServerMessage> {
    let mut r = Reader(body);
    if r.u32()? != APPENDED_TAG {
        return None;
    }
    let request_id = r.u64()?;
    let n = r.count(25)?;
    let mut results = Vec::with_capacity(n);
    for _ in 0..n {
        results.push(AppendAck {
            epoch: r.u64()?,
            offset: r.u64()?,
            version: r.u64()?,
            duplicate: r.bool()?,
        });
    }
    r.end()?;
    Some(ServerMessage::Appended {
        request_id,
        results,
    })
}

/// An `Append` body, or `None` when it is not exactly one well-formed
/// `Append`.
fn decode_append_body(body: &[u8]) -> Option<ClientMessage> {
    let mut r = Reader(body);
    if r.u32()? != APPEND_TAG {
        return None;
    }
    let request_id = r.u64()?;
    let topic = r.string()?;
    // An event takes at least 8 + 8 + 8 + 1 bytes.
    let n = r.count(25)?;
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        let event_type = r.string()?;
        let headers = r.headers()?;
        let payload = Bytes::copy_from_slice(r.bytes()?);
        let idempotency_key = match r.u8()? {
            0 => None,
            1 => Some(r.string()?),
            _ => return None,
        };
        events.push(AppendEvent {
            event_type,
            headers,
            payload,
            idempotency_key,
        });
    }
    let expected_offset = r.option_u64()?;
    let expected_version = r.option_u64()?;
    r.end()?;
    Some(ClientMessage::Append {
        request_id,
        topic,
        events,
        expected_offset,
        expected_version,
    })
}

/// Reads big-endian fixed-width fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take().map(u8::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_be_bytes)
    }

    fn bool(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn option_u64(&mut self) -> Option<Option<u64>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.u64()?)),
            _ => None,
        }
    }

    /// A list length, refused (before anything is allocated for it) when
    /// the rest cannot hold that many items of at least `min` bytes.
    fn count(&mut self, min: usize) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n <= self.0.len() / min).then_some(n)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u64()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (b, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(b)
    }

    fn string(&mut self) -> Option<String> {
        std::str::from_utf8(self.bytes()?).ok().map(str::to_owned)
    }

    fn headers(&mut self) -> Option<Vec<(String, String)>> {
        let n = self.count(16)?;
        let mut headers = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.string()?;
            let v = self.string()?;
            headers.push((k, v));
        }
        Some(headers)
    }

    /// Whether the whole body was read.
    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::encode_frame;

    fn owned(subscription_id: u64, e: &EventRef<'_>) -> ServerMessage {
        ServerMessage::Event {
            subscription_id,
            event: WireEvent {
                topic: e.topic.into(),
                offset: e.offset,
                event_type: e.event_type.into(),
                version: e.version,
                timestamp_ms: e.timestamp_ms,
                headers: e.headers.to_vec(),
                payload: Bytes::copy_from_slice(e.payload),
            },
        }
    }

    fn serde_frame(msg: &ServerMessage) -> BytesMut {
        let mut b = BytesMut::new();
        encode_frame(msg, &mut b).unwrap();
        b
    }

    #[test]
    fn an_event_frame_is_the_worked_example_of_the_protocol_doc() {
        let headers = vec![("trace".to_owned(), "t1".to_owned())];
        let event = EventRef {
            topic: "orders",
            offset: 42,
            event_type: "created",
            version: 42,
            timestamp_ms: 1_700_000_000_042,
            headers: &headers,
            payload: br#"{"id":1}"#,
        };
        let mut frame = BytesMut::new();
        encode_event_frame(1, &event, &mut frame).unwrap();
        // `server.Event` in tests/vectors.txt.
        let expected = "0000007000000004000000000000000100000000000000066f7264657273000000000000002a000000000000000763726561746564000000000000002a0000018bcfe5682a0000000000000001000000000000000574726163650000000000000002743100000000000000087b226964223a317d";
        assert_eq!(hex::encode(&frame), expected);
        assert_eq!(frame.len(), event.frame_len());
        assert_eq!(
            decode_server_body(&frame[FRAME_HEADER_LEN..]).unwrap(),
            owned(1, &event)
        );
    }

    #[test]
    fn an_event_truncated_at_any_byte_fails_as_the_serde_path_does() {
        let headers = vec![("k".to_owned(), "v".to_owned())];
        let event = EventRef {
            topic: "t",
            offset: 1,
            event_type: "e",
            version: 1,
            timestamp_ms: 2,
            headers: &headers,
            payload: b"xyz",
        };
        let mut frame = BytesMut::new();
        encode_event_frame(7, &event, &mut frame).unwrap();
        let body = &frame[FRAME_HEADER_LEN..];
        for cut in 0..body.len() {
            assert_eq!(
                decode_server_body(&body[..cut]),
                decode_body::<ServerMessage>(&body[..cut]),
                "cut at {cut}"
            );
            assert!(decode_server_body(&body[..cut]).is_err());
        }
        let mut long = body.to_vec();
        long.push(0);
        assert_eq!(
            decode_server_body(&long),
            Err(ProtocolError::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn other_messages_and_bad_utf8_go_through_the_serde_path() {
        let pong = serde_frame(&ServerMessage::Pong { request_id: 3 });
        assert_eq!(
            decode_server_body(&pong[FRAME_HEADER_LEN..]),
            Ok(ServerMessage::Pong { request_id: 3 })
        );
        let event = EventRef {
            topic: "t",
            offset: 1,
            event_type: "e",
            version: 1,
            timestamp_ms: 2,
            headers: &[],
            payload: b"",
        };
        let mut frame = BytesMut::new();
        encode_event_frame(7, &event, &mut frame).unwrap();
        // The topic's one byte (after length, tag, id and the topic length).
        frame[FRAME_HEADER_LEN + 4 + 8 + 8] = 0xff;
        let body = &frame[FRAME_HEADER_LEN..];
        assert!(decode_server_body(body).is_err());
        assert_eq!(decode_server_body(body), decode_body::<ServerMessage>(body));
    }

    #[test]
    fn a_header_count_the_body_cannot_hold_is_refused_without_allocating() {
        let event = EventRef {
            topic: "t",
            offset: 1,
            event_type: "e",
            version: 1,
            timestamp_ms: 2,
            headers: &[],
            payload: b"",
        };
        let mut frame = BytesMut::new();
        encode_event_frame(7, &event, &mut frame).unwrap();
        // The header count follows tag, id, topic, offset, type, version, ts.
        let at = FRAME_HEADER_LEN + 4 + 8 + 9 + 8 + 9 + 8 + 8;
        frame[at..at + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        let body = &frame[FRAME_HEADER_LEN..];
        assert!(decode_event_body(body).is_none());
        assert!(decode_server_body(body).is_err());
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![".{0,12}", "[a-z.]{0,40}"]
    }

    proptest! {
        #[test]
        fn the_hand_written_frame_equals_the_serde_frame_and_reads_back(
            subscription_id in any::<u64>(),
            topic in text(),
            offset in any::<u64>(),
            event_type in text(),
            version in any::<u64>(),
            timestamp_ms in any::<u64>(),
            headers in vec((text(), text()), 0..4),
            payload in vec(any::<u8>(), 0..300),
        ) {
            let event = EventRef {
                topic: &topic,
                offset,
                event_type: &event_type,
                version,
                timestamp_ms,
                headers: &headers,
                payload: &payload,
            };
            let mut frame = BytesMut::new();
            encode_event_frame(subscription_id, &event, &mut frame).unwrap();
            let msg = owned(subscription_id, &event);
            prop_assert_eq!(&frame, &serde_frame(&msg));
            prop_assert_eq!(frame.len(), event.frame_len());
            prop_assert_eq!(decode_server_body(&frame[FRAME_HEADER_LEN..]).unwrap(), msg);
        }
    }
}
