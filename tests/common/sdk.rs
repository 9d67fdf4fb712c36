//! Reading a Rust SDK subscription in tests: the next delivery, or exactly
//! the events at given offsets, failing the test on anything else.

use std::ops::RangeInclusive;

use ringcast_client::{Delivery, Subscription, WireEvent};

use super::within;

/// The next delivery, failing the test on an error, an end of the stream
/// without `End`, or 30 seconds of silence.
pub async fn next(sub: &mut Subscription) -> Delivery {
    match within(30, sub.next_delivery()).await {
        Some(Ok(delivery)) => delivery,
        Some(Err(e)) => panic!("subscription failed: {e}"),
        None => panic!("subscription ended without End"),
    }
}

/// Reads events and asserts their offsets are exactly `offsets`, in order.
pub async fn expect_events(sub: &mut Subscription, offsets: RangeInclusive<u64>) -> Vec<WireEvent> {
    let mut events = Vec::new();
    for offset in offsets {
        match next(sub).await {
            Delivery::Event(event) => {
                assert_eq!(
                    event.offset, offset,
                    "expected offset {offset}, got {event:?}"
                );
                events.push(event);
            }
            other => panic!("expected the event at offset {offset}, got {other:?}"),
        }
    }
    events
}
