//! The outbound byte budget of one connection.
//!
//! Everything handed to a connection's writer (subscription chunks and
//! replies) is charged here first and released by the writer once written,
//! so a peer that stops reading costs at most `max_outbound_bytes` (plus one
//! chunk) of queued frames. Accounting is per chunk, never per event: one
//! compare-and-swap to charge, one subtraction to release.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// The writer is gone: nothing charged now would ever be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// Bytes queued for one connection's writer, bounded by `max`.
pub(crate) struct Outbound {
    queued: AtomicUsize,
    max: usize,
    closed: AtomicBool,
    released: Notify,
    /// The sum over every TCP connection, for `/metrics`.
    gauge: metrics::Gauge,
}

impl Outbound {
    /// An empty budget of `max` bytes.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            max,
            closed: AtomicBool::new(false),
            released: Notify::new(),
            gauge: metrics::gauge!(crate::metrics::OUTBOUND_QUEUED_BYTES, "transport" => "tcp"),
        }
    }

    /// Bytes charged and not yet written.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Charges `n` bytes if they fit, or if nothing is queued: a chunk larger
    /// than the whole budget must still go, alone, or it would wait forever.
    fn try_charge(&self, n: usize) -> bool {
        let mut q = self.queued.load(Ordering::Acquire);
        loop {
            if q != 0 && q.saturating_add(n) > self.max {
                return false;
            }
            match self.queued.compare_exchange_weak(
                q,
                q.saturating_add(n),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.gauge.increment(n as f64);
                    return true;
                }
                Err(now) => q = now,
            }
        }
    }

    fn has_room(&self) -> bool {
        let q = self.queued.load(Ordering::Acquire);
        q == 0 || q < self.max
    }

    /// Waits until `check` holds, waking on every release.
    async fn wait_until(&self, mut check: impl FnMut() -> bool) -> Result<(), Closed> {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(Closed);
            }
            if check() {
                return Ok(());
            }
            // Registered before the re-check, so a release in between is seen.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                return Err(Closed);
            }
            if check() {
                return Ok(());
            }
            released.await;
        }
    }

    /// Charges `n` bytes, waiting for the writer to release enough.
    pub(crate) async fn charge(&self, n: usize) -> Result<(), Closed> {
        self.wait_until(|| self.try_charge(n)).await
    }

    /// Waits until some budget is free: a pump calls it before pulling from
    /// its subscription, so that while the peer does not read it pulls
    /// nothing and falls behind the ring instead of buffering.
    pub(crate) async fn room(&self) -> Result<(), Closed> {
        self.wait_until(|| self.has_room()).await
    }

    /// The writer wrote `n` charged bytes.
    pub(crate) fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.queued.fetch_sub(n, Ordering::AcqRel);
        self.gauge.decrement(n as f64);
        self.released.notify_waiters();
    }

    /// The writer stopped: every waiter gives up.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.released.notify_waiters();
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        // Frames dropped unwritten (closed connection) leave the sum too.
        let left = *self.queued.get_mut();
        if left > 0 {
            self.gauge.decrement(left as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_chunk_larger_than_the_budget_goes_alone_when_nothing_is_queued() {
        let budget = Outbound::new(100);
        budget.charge(1_000).await.unwrap();
        assert_eq!(budget.queued(), 1_000);
        assert!(!budget.try_charge(1));
        budget.release(1_000);
        assert!(budget.try_charge(60));
        assert!(budget.try_charge(40));
        assert!(!budget.try_charge(1));
    }

    #[tokio::test]
    async fn a_charge_waits_for_a_release_and_close_wakes_every_waiter() {
        let budget = Arc::new(Outbound::new(100));
        budget.charge(80).await.unwrap();
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.charge(50).await }
        });
        let room = tokio::spawn({
            let budget = budget.clone();
            async move {
                budget.charge(20).await.unwrap();
                budget.room().await
            }
        });
        // `room` charged 20, so nothing is free until a release.
        tokio::time::timeout(Duration::from_secs(10), async {
            while budget.queued() != 100 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert!(!waiter.is_finished());
        budget.release(80);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(budget.queued(), 70);
        assert_eq!(room.await.unwrap(), Ok(()));
        budget.charge(30).await.unwrap();
        let blocked = tokio::spawn({
            let budget = budget.clone();
            async move { budget.charge(1).await }
        });
        budget.close();
        assert_eq!(blocked.await.unwrap(), Err(Closed));
    }
}
