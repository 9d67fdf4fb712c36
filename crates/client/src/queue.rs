//! A subscription's delivery queue: bounded in events, handed over in
//! batches.
//!
//! The connection task decodes a whole socket read (hundreds of events
//! during a catch-up) before the consumer runs, so it hands each
//! subscription one batch per read: one channel send, and at most one
//! wake-up of the consumer, per read instead of per event. The consumer
//! drains a batch locally, without touching the channel.
//!
//! The bound counts events, as [`ClientOptions::subscription_buffer`]
//! documents: the task asks [`PushSender::has_room`] before it takes an
//! event into a batch, and the consumer gives room back for the items it
//! handed out, once per drained batch or per sixteenth of the bound
//! (whichever comes first), not per item: the count is shared by two
//! threads. A paused subscription (see [`connection`](crate::connection))
//! waits in [`PushSender::room`] until the consumer has drained it down to
//! a threshold, so it learns of the room at most a sixteenth late.
//!
//! [`ClientOptions::subscription_buffer`]: crate::ClientOptions::subscription_buffer

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::sync::{mpsc, Notify};

use crate::connection::Push;

/// What both ends share.
#[derive(Debug)]
struct Shared {
    /// Items sent (in batches) and not yet handed to the caller.
    queued: AtomicUsize,
    /// The most items queued at once.
    capacity: usize,
    /// Whether a [`PushSender::room`] waits: only then does the consumer
    /// notify when it gives room back.
    waiting: AtomicBool,
    room: Notify,
}

/// The connection task's end of a subscription's queue.
#[derive(Debug)]
pub(crate) struct PushSender {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Vec<Push>>,
}

/// The subscription's end: hands out one item at a time from the batch
/// taken last.
#[derive(Debug)]
pub(crate) struct PushReceiver {
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Vec<Push>>,
    batch: std::vec::IntoIter<Push>,
    /// Items handed out whose room was not given back yet.
    taken: usize,
    /// Give room back at least every this many items.
    step: usize,
}

/// A queue of at most `capacity` items (at least 1).
pub(crate) fn queue(capacity: usize) -> (PushSender, PushReceiver) {
    let capacity = capacity.max(1);
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        capacity,
        waiting: AtomicBool::new(false),
        room: Notify::new(),
    });
    let (tx, rx) = mpsc::unbounded_channel();
    (
        PushSender {
            shared: shared.clone(),
            tx,
        },
        PushReceiver {
            shared,
            rx,
            batch: Vec::new().into_iter(),
            taken: 0,
            step: (capacity / 16).max(1),
        },
    )
}

impl PushSender {
    /// The most items the queue holds.
    pub(crate) fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Whether one more item fits beside `pending` items not yet sent.
    pub(crate) fn has_room(&self, pending: usize) -> bool {
        self.shared.queued.load(Ordering::Acquire) + pending < self.shared.capacity
    }

    /// Whether the subscription was dropped.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Hands a batch to the subscription (which must have room for it, see
    /// [`has_room`](Self::has_room)); `Err` when it was dropped.
    pub(crate) fn send(&self, batch: Vec<Push>) -> Result<(), Vec<Push>> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len();
        self.shared.queued.fetch_add(n, Ordering::AcqRel);
        self.tx.send(batch).map_err(|e| {
            self.shared.queued.fetch_sub(n, Ordering::AcqRel);
            e.0
        })
    }

    /// Waits until at most `threshold` items are queued. Owns what it
    /// needs, so that it can wait in a task of its own.
    pub(crate) fn room(&self, threshold: usize) -> impl std::future::Future<Output = ()> + 'static {
        /// Stops the consumer's notifications however the wait ends.
        struct Waiting(Arc<Shared>);
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.waiting.store(false, Ordering::SeqCst);
            }
        }
        let waiting = Waiting(self.shared.clone());
        async move {
            let shared = &*waiting.0;
            // Set before the check, so that room given back in between is
            // not missed (the consumer notifies only while it is set).
            shared.waiting.store(true, Ordering::SeqCst);
            loop {
                let notified = shared.room.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if shared.queued.load(Ordering::SeqCst) <= threshold {
                    return;
                }
                notified.await;
            }
        }
    }
}

impl PushReceiver {
    /// The next item, waiting for a batch if the last one is drained;
    /// `None` once the sender is gone and everything was handed out.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Push>> {
        loop {
            if let Some(push) = self.batch.next() {
                self.taken += 1;
                if self.taken >= self.step || self.batch.len() == 0 {
                    self.give_back();
                }
                return Poll::Ready(Some(push));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(batch) => self.batch = batch.into_iter(),
                None => return Poll::Ready(None),
            }
        }
    }

    /// The room of the items handed out is free again.
    fn give_back(&mut self) {
        let n = std::mem::take(&mut self.taken);
        self.shared.queued.fetch_sub(n, Ordering::SeqCst);
        if self.shared.waiting.load(Ordering::SeqCst) {
            self.shared.room.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use futures_util::FutureExt;

    use super::*;

    fn end(n: u64) -> Push {
        Push::End {
            topic: "t".into(),
            last_offset: n,
        }
    }

    fn offset(p: Option<Push>) -> Option<u64> {
        match p? {
            Push::End { last_offset, .. } => Some(last_offset),
            _ => None,
        }
    }

    async fn next(rx: &mut PushReceiver) -> Option<u64> {
        offset(poll_fn(|cx| rx.poll_recv(cx)).await)
    }

    #[tokio::test]
    async fn items_come_out_in_order_and_room_is_given_back_per_sixteenth_or_batch() {
        let (tx, mut rx) = queue(32);
        let batch = |from: u64, n: u64| (from..from + n).map(end).collect::<Vec<_>>();
        tx.send(batch(1, 29)).unwrap();
        assert!(tx.has_room(2));
        assert!(!tx.has_room(3));
        tx.send(batch(30, 3)).unwrap();
        assert!(!tx.has_room(0));
        // A step is 32 / 16 = 2 items.
        assert_eq!(next(&mut rx).await, Some(1));
        assert!(!tx.has_room(0), "one item is less than a step");
        assert_eq!(next(&mut rx).await, Some(2));
        assert!(tx.has_room(1));
        assert!(!tx.has_room(2));
        for offset in 3..=29 {
            assert_eq!(next(&mut rx).await, Some(offset));
        }
        // The drained batch gave back its odd last item too.
        assert!(tx.has_room(28));
        assert!(!tx.has_room(29));
        for offset in 30..=32 {
            assert_eq!(next(&mut rx).await, Some(offset));
        }
        assert!(tx.has_room(31));
        drop(tx);
        assert!(poll_fn(|cx| rx.poll_recv(cx)).await.is_none());
    }

    #[tokio::test]
    async fn room_waits_until_the_consumer_drained_down_to_the_threshold() {
        let (tx, mut rx) = queue(4);
        tx.send(vec![end(1), end(2), end(3), end(4)]).unwrap();
        let room = tx.room(2);
        tokio::pin!(room);
        assert!(room.as_mut().now_or_never().is_none());
        assert_eq!(next(&mut rx).await, Some(1));
        assert!(room.as_mut().now_or_never().is_none());
        assert_eq!(next(&mut rx).await, Some(2));
        assert!(room.as_mut().now_or_never().is_some());
        assert!(!tx.shared.waiting.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_send_to_a_dropped_subscription_fails_and_takes_no_room() {
        let (tx, rx) = queue(2);
        drop(rx);
        assert!(tx.is_closed());
        assert!(tx.send(vec![end(1)]).is_err());
        assert!(tx.has_room(1));
    }
}
