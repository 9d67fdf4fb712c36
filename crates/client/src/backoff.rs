//! Reconnect backoff: exponential, capped, with full jitter.
//!
//! The n-th consecutive failed attempt (from 0) sleeps a uniformly random
//! duration in `[0, min(cap, base · 2^n)]` ("full jitter", as in the AWS
//! architecture blog's comparison): clients that lost the same broker at the
//! same moment spread their reconnects instead of arriving together.

use std::time::Duration;

use rand::Rng;

/// Backoff state for one run of reconnect attempts.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next sleep, drawn with `rng`; each call counts one more attempt.
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let bound = ceiling(self.base, self.cap, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        full_jitter(bound, rng)
    }

    /// Back to the first attempt (after a successful handshake).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts counted since the last reset.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// `min(cap, base · 2^attempt)`, without overflowing.
pub(crate) fn ceiling(base: Duration, cap: Duration, attempt: u32) -> Duration {
    2u32.checked_pow(attempt)
        .and_then(|factor| base.checked_mul(factor))
        .map_or(cap, |d| d.min(cap))
}

/// A uniformly random duration in `[0, bound]`.
pub(crate) fn full_jitter(bound: Duration, rng: &mut impl Rng) -> Duration {
    let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const BASE: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(30);

    #[test]
    fn ceiling_doubles_from_base_until_the_cap() {
        assert_eq!(ceiling(BASE, CAP, 0), Duration::from_millis(100));
        assert_eq!(ceiling(BASE, CAP, 1), Duration::from_millis(200));
        assert_eq!(ceiling(BASE, CAP, 4), Duration::from_millis(1600));
        assert_eq!(ceiling(BASE, CAP, 8), Duration::from_millis(25_600));
        assert_eq!(ceiling(BASE, CAP, 9), CAP);
    }

    #[test]
    fn ceiling_stays_at_the_cap_for_huge_attempt_counts() {
        for attempt in [31, 32, 33, 64, 1_000, u32::MAX] {
            assert_eq!(ceiling(BASE, CAP, attempt), CAP, "attempt {attempt}");
        }
        assert_eq!(ceiling(Duration::MAX, CAP, 1), CAP);
    }

    #[test]
    fn every_delay_lies_between_zero_and_the_attempts_ceiling() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(BASE, CAP);
        for attempt in 0..40 {
            let bound = ceiling(BASE, CAP, attempt);
            let delay = backoff.next_delay(&mut rng);
            assert!(delay <= bound, "attempt {attempt}: {delay:?} > {bound:?}");
        }
        assert_eq!(backoff.attempts(), 40);
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        let mut rng = StdRng::seed_from_u64(42);
        let bound = Duration::from_secs(1);
        let delays: Vec<Duration> = (0..2_000).map(|_| full_jitter(bound, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= bound));
        // Full jitter, not "half + jitter": both ends of the range are used.
        assert!(delays.iter().any(|d| *d < Duration::from_millis(50)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(950)));
        let mean = delays.iter().sum::<Duration>() / delays.len() as u32;
        assert!(
            mean > Duration::from_millis(400) && mean < Duration::from_millis(600),
            "{mean:?}"
        );
    }

    #[test]
    fn reset_starts_again_from_the_base() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut backoff = Backoff::new(BASE, CAP);
        for _ in 0..10 {
            backoff.next_delay(&mut rng);
        }
        backoff.reset();
        assert_eq!(backoff.attempts(), 0);
        assert!(backoff.next_delay(&mut rng) <= BASE);
    }

    #[test]
    fn zero_bounds_give_zero_delays() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(backoff.next_delay(&mut rng), Duration::ZERO);
    }
}
