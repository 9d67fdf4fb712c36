//! Arbitrary bytes as a client stream, cut into chunks at points the input
//! chooses: the decoder never panics, agrees with decoding the whole stream
//! at once, and never reserves far more than the bytes it was given.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringcast_protocol::{ClientMessage, FrameDecoder, ProtocolError, RESERVE_STEP};

/// Feeds `chunks`, draining messages after each; stops at the first error.
fn feed(chunks: &[&[u8]], max_frame: usize) -> Result<Vec<ClientMessage>, ProtocolError> {
    let mut decoder = FrameDecoder::<ClientMessage>::new(max_frame);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        fed += chunk.len();
        while let Some(msg) = decoder.decode(&mut buf)? {
            out.push(msg);
        }
        // Growth follows the bytes that arrived, never an announced length.
        assert!(
            buf.capacity() <= 2 * (fed + RESERVE_STEP),
            "capacity {} after {fed} bytes",
            buf.capacity()
        );
    }
    if let Some(msg) = decoder.decode_eof(&mut buf)? {
        out.push(msg);
    }
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size and the frame limit; the rest is the stream.
    let Some((&knobs, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(knobs & 0x3f) + 1;
    let max_frame = if knobs & 0x40 == 0 {
        4 * 1024 * 1024
    } else {
        256
    };
    let chunks: Vec<&[u8]> = stream.chunks(chunk).collect();
    assert_eq!(feed(&chunks, max_frame), feed(&[stream], max_frame));
});
