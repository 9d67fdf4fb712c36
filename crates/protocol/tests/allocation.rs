//! Decoding hostile bodies allocates little: a length field cannot make the
//! decoder reserve what the body does not hold. Own test binary, because it
//! installs a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ringcast_protocol::{
    decode_body, decode_client_body, decode_server_body, ClientMessage, ServerMessage,
};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only records the sizes asked for.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn body(prefix: &[u8], claim: u64) -> Vec<u8> {
    let mut body = prefix.to_vec();
    body.extend_from_slice(&claim.to_be_bytes());
    body
}

/// Decodes with the largest single allocation recorded, the only test in this
/// binary so no other thread allocates meanwhile.
#[test]
fn hostile_length_fields_never_allocate_more_than_a_mebibyte() {
    let publish_head: Vec<u8> = [&1u32.to_be_bytes()[..], &1u64.to_be_bytes()[..]].concat();
    let history_head: Vec<u8> = [&7u32.to_be_bytes()[..], &1u64.to_be_bytes()[..]].concat();
    let publish_payload_head: Vec<u8> = [
        &publish_head[..],
        &[0, 0, 0, 0, 0, 0, 0, 1, b't'],
        &[0, 0, 0, 0, 0, 0, 0, 1, b'e'],
        &[0; 8],
    ]
    .concat();

    // The hand-written hot paths (`Append`, `Event`, `Appended`).
    let append_head: Vec<u8> = [
        &12u32.to_be_bytes()[..],
        &1u64.to_be_bytes()[..],
        &[0, 0, 0, 0, 0, 0, 0, 1, b't'],
    ]
    .concat();
    let event_head: Vec<u8> = [&4u32.to_be_bytes()[..], &1u64.to_be_bytes()[..]].concat();
    let appended_head: Vec<u8> = [&17u32.to_be_bytes()[..], &1u64.to_be_bytes()[..]].concat();

    for claim in [1u64 << 60, u64::MAX, 1 << 32, 1 << 24, 100_000, 60_000] {
        let cases = [
            ("topic", body(&publish_head, claim), true),
            ("payload", body(&publish_payload_head, claim), true),
            ("events", body(&history_head, claim), false),
            ("hot topic", body(&event_head, claim), false),
            ("hot events", body(&append_head, claim), true),
            ("hot acks", body(&appended_head, claim), false),
        ];
        for (what, bytes, client) in cases {
            let hot = what.starts_with("hot");
            let what = if hot && what != "hot topic" {
                "events"
            } else {
                what.trim_start_matches("hot ")
            };
            LARGEST.store(0, Ordering::Relaxed);
            let failed = match (client, hot) {
                (true, false) => decode_body::<ClientMessage>(&bytes).is_err(),
                (false, false) => decode_body::<ServerMessage>(&bytes).is_err(),
                (true, true) => decode_client_body(&bytes).is_err(),
                (false, true) => decode_server_body(&bytes).is_err(),
            };
            let largest = LARGEST.load(Ordering::Relaxed);
            assert!(failed, "{what} claiming {claim}");
            // Strings and bytes: at most the 64 KiB decode limit for a body
            // this small. Sequences: serde's cautious 1 MiB preallocation.
            let bound = if what == "events" { 1 << 20 } else { 64 << 10 };
            assert!(
                largest <= bound,
                "{what} claiming {claim} allocated {largest} bytes at once"
            );
            if what != "events" && claim == 60_000 {
                // Within the 64 KiB limit the buffer is allocated before the
                // read fails: proof that the counter sees these allocations.
                assert!(largest >= 60_000, "{what}: counter saw {largest}");
            }
        }
    }
}
