//! Arbitrary bytes as one frame body, decoded as each direction's message:
//! never a panic, and whatever decodes re-encodes to the same body.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringcast_protocol::{decode_body, encode_frame, ClientMessage, ServerMessage};

fuzz_target!(|body: &[u8]| {
    if let Ok(msg) = decode_body::<ClientMessage>(body) {
        let mut frame = BytesMut::new();
        encode_frame(&msg, &mut frame).expect("a decoded message encodes");
        assert_eq!(&frame[4..], body, "decoding is canonical");
    }
    if let Ok(msg) = decode_body::<ServerMessage>(body) {
        let mut frame = BytesMut::new();
        encode_frame(&msg, &mut frame).expect("a decoded message encodes");
        assert_eq!(&frame[4..], body, "decoding is canonical");
    }
});
