//! Payload compression on a connection that negotiated it (`HelloExt` and
//! `WelcomeExt`, protocol version 5; the bytes are
//! [`ringcast_protocol::compression`]'s): every payload of a request is
//! marked, and compressed when that pays, on its way out; every payload of
//! an `Event`, `Delivery` or `History` is unmarked, and decompressed, on
//! its way in. Callers only ever see plain payloads.

use bytes::Bytes;
use ringcast_protocol::compression::{decode_payload, encode_payload, PayloadError};
use ringcast_protocol::{
    ClientMessage, Codec, CompressionChoice, CompressionOffer, ServerMessage, WireEvent,
};

use crate::Compression;

/// The `HelloExt` offer for `compression`; `None`: a plain `Hello`.
pub(crate) fn offer(compression: Compression) -> Option<CompressionOffer> {
    match compression {
        Compression::None => None,
        Compression::Lz4 { min_size } => Some(CompressionOffer {
            codecs: vec![Codec::LZ4],
            min_size,
        }),
    }
}

/// The compression a `WelcomeExt` put in force.
pub(crate) fn in_force(choice: CompressionChoice) -> Compression {
    match choice.codec {
        Codec::LZ4 => Compression::Lz4 {
            min_size: choice.min_size,
        },
        _ => Compression::None,
    }
}

/// The payload compression of one connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Packing {
    codec: Codec,
    min_size: usize,
    /// The most a payload from the broker may decompress to.
    max_len: usize,
}

impl Packing {
    /// For a connection with `compression` in force; `None` when off.
    /// Payloads from the broker are held to `max_len` bytes.
    pub(crate) fn new(compression: Compression, max_len: usize) -> Option<Self> {
        match compression {
            Compression::None => None,
            Compression::Lz4 { min_size } => Some(Packing {
                codec: Codec::LZ4,
                min_size: usize::try_from(min_size).unwrap_or(usize::MAX),
                max_len,
            }),
        }
    }

    fn wire(&self, payload: &Bytes) -> Bytes {
        encode_payload(self.codec, self.min_size, payload)
    }

    /// `msg` with its payloads as they go on this connection, when it
    /// carries any (`None`: send `msg` as it is). The caller keeps `msg`
    /// itself, plain, for a resend on another connection.
    pub(crate) fn pack(&self, msg: &ClientMessage) -> Option<ClientMessage> {
        if !matches!(
            msg,
            ClientMessage::Publish { .. }
                | ClientMessage::PublishBatch { .. }
                | ClientMessage::Append { .. }
        ) {
            return None;
        }
        let mut wire = msg.clone();
        match &mut wire {
            ClientMessage::Publish { payload, .. } => *payload = self.wire(payload),
            ClientMessage::PublishBatch { events, .. } => {
                for e in events {
                    e.payload = self.wire(&e.payload);
                }
            }
            ClientMessage::Append { events, .. } => {
                for e in events {
                    e.payload = self.wire(&e.payload);
                }
            }
            _ => {}
        }
        Some(wire)
    }

    /// Replaces the marked payloads of `msg` by the plain ones. An error
    /// means the broker sent a payload that cannot be read.
    pub(crate) fn unpack(&self, msg: &mut ServerMessage) -> Result<(), PayloadError> {
        match msg {
            ServerMessage::Event { event, .. } | ServerMessage::Delivery { event, .. } => {
                self.unpack_event(event)
            }
            ServerMessage::History { events, .. } => {
                events.iter_mut().try_for_each(|e| self.unpack_event(e))
            }
            _ => Ok(()),
        }
    }

    fn unpack_event(&self, event: &mut WireEvent) -> Result<(), PayloadError> {
        let wire = std::mem::take(&mut event.payload);
        event.payload = decode_payload(self.codec, wire, self.max_len)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringcast_protocol::AppendEvent;

    #[test]
    fn a_packed_append_unpacks_to_the_original_payloads() {
        let packing = Packing::new(Compression::Lz4 { min_size: 64 }, 1 << 20).unwrap();
        let big = Bytes::from(br#"{"status":"shipped"}"#.repeat(50));
        let msg = ClientMessage::Append {
            request_id: 1,
            topic: "t".into(),
            events: vec![
                AppendEvent {
                    event_type: "e".into(),
                    headers: vec![],
                    payload: big.clone(),
                    idempotency_key: Some("k".into()),
                },
                AppendEvent {
                    event_type: "e".into(),
                    headers: vec![],
                    payload: Bytes::from_static(b"small"),
                    idempotency_key: None,
                },
            ],
            expected_offset: Some(3),
            expected_version: None,
        };
        let Some(ClientMessage::Append { events, .. }) = packing.pack(&msg) else {
            panic!("an append");
        };
        assert_eq!(events[0].payload[0], 1, "compressed");
        assert!(events[0].payload.len() < big.len() / 4);
        assert_eq!(&events[1].payload[..], b"\x00small");
        assert_eq!(events[0].idempotency_key.as_deref(), Some("k"));
        // What the broker would push back.
        let mut history = ServerMessage::History {
            request_id: 1,
            events: events
                .into_iter()
                .map(|e| WireEvent {
                    topic: "t".into(),
                    offset: 1,
                    event_type: e.event_type,
                    version: 1,
                    timestamp_ms: 0,
                    headers: e.headers,
                    payload: e.payload,
                })
                .collect(),
            next_after: 2,
            first_available: 1,
        };
        packing.unpack(&mut history).unwrap();
        let ServerMessage::History { events, .. } = history else {
            unreachable!()
        };
        assert_eq!(events[0].payload, big);
        assert_eq!(&events[1].payload[..], b"small");
        assert!(packing
            .pack(&ClientMessage::Ping { request_id: 1 })
            .is_none());
    }

    #[test]
    fn a_payload_over_the_limit_from_the_broker_is_an_error() {
        let packing = Packing::new(Compression::lz4(), 100).unwrap();
        let mut msg = ServerMessage::Event {
            subscription_id: 1,
            event: WireEvent {
                topic: "t".into(),
                offset: 1,
                event_type: "e".into(),
                version: 1,
                timestamp_ms: 0,
                headers: vec![],
                payload: encode_payload(Codec::LZ4, 0, &[b'a'; 101]),
            },
        };
        assert!(matches!(
            packing.unpack(&mut msg),
            Err(PayloadError::TooLarge { declared: 101, .. })
        ));
    }
}
