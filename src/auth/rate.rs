//! Rate limits per credential and per IP, on `governor`'s GCRA.
//!
//! Time comes from `tokio::time`, so tests drive it with
//! `tokio::time::pause()` / `advance()` instead of sleeping.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::Clock;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use super::Principal;

/// `[auth.rate]`: rate limits. `0` turns a limit off.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateConfig {
    /// Events per second one credential may publish (anonymous clients: per
    /// IP), over TCP and HTTP together; `0` = unlimited.
    pub publish_per_second: u32,
    /// Events a credential may publish at once above its rate; at least the
    /// largest batch it sends (`0` = same as `publish_per_second`).
    pub publish_burst: u32,
    /// New connections per second from one IP (TCP and HTTP); `0` = unlimited.
    pub connections_per_second: u32,
    /// Connections one IP may open at once above its rate (`0` = same as
    /// `connections_per_second`).
    pub connection_burst: u32,
    /// Most SSE streams open at once for one credential (anonymous clients:
    /// per IP); `0` = unlimited (`limits.max_sse_connections` still holds).
    pub sse_per_credential: u32,
}

/// Why a rate limit refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Over the rate: the same request succeeds after this long.
    RetryAfter(Duration),
    /// The request alone is larger than the burst: it can never succeed.
    TooLarge {
        /// The request's size (events).
        requested: u32,
        /// The burst it exceeds.
        burst: u32,
    },
}

impl Limited {
    /// The retry-after to announce (a too-large request gets none: zero).
    pub fn retry_after(&self) -> Duration {
        match self {
            Limited::RetryAfter(d) => *d,
            Limited::TooLarge { .. } => Duration::ZERO,
        }
    }
}

/// `wait` in whole milliseconds, rounded up (a client retrying after them
/// must not come back early) and at least 1: what `retry_after_ms` says on
/// every front end.
pub fn retry_after_ms(wait: Duration) -> u64 {
    u64::try_from(wait.as_nanos().div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// `wait` in whole seconds, rounded up and at least 1: an HTTP
/// `Retry-After` header (RFC 9110 delay-seconds).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// A `governor` clock reading `tokio::time::Instant`, so a paused test
/// runtime controls it.
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        Self {
            base: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.base)
    }
}

type Keyed<K> = RateLimiter<
    K,
    DefaultKeyedStateStore<K>,
    TokioClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;

struct Limiter<K: Hash + Eq + Clone> {
    limiter: Keyed<K>,
    clock: TokioClock,
    burst: u32,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    fn new(per_second: u32, burst: u32) -> Option<Self> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        let clock = TokioClock::default();
        let quota = Quota::per_second(rate).allow_burst(burst);
        Some(Self {
            limiter: RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock.clone()),
            clock,
            burst: burst.get(),
        })
    }

    fn check(&self, key: &K, n: u32) -> Result<(), Limited> {
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        match self.limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Limited::RetryAfter(
                not_until.wait_time_from(self.clock.now()),
            )),
            Err(_) => Err(Limited::TooLarge {
                requested: n.get(),
                burst: self.burst,
            }),
        }
    }

    fn housekeeping(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.limiter.len()
    }
}

/// Every rate limit of one broker, shared by its front ends.
pub struct RateLimits {
    publish: Option<Limiter<Arc<str>>>,
    connect: Option<Limiter<IpAddr>>,
    sse_per_credential: usize,
    sse_open: Arc<DashMap<Arc<str>, usize>>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("publish", &self.publish.as_ref().map(|l| l.burst))
            .field("connect", &self.connect.as_ref().map(|l| l.burst))
            .field("sse_per_credential", &self.sse_per_credential)
            .finish()
    }
}

impl RateLimits {
    /// Limits under `config`.
    pub fn new(config: &RateConfig) -> Self {
        Self {
            publish: Limiter::new(config.publish_per_second, config.publish_burst),
            connect: Limiter::new(config.connections_per_second, config.connection_burst),
            sse_per_credential: config.sse_per_credential as usize,
            sse_open: Arc::new(DashMap::new()),
        }
    }

    /// Takes `events` publishes from `who`'s budget, or says when to retry.
    pub fn check_publish(&self, who: &Principal, events: u32) -> Result<(), Limited> {
        let Some(limiter) = &self.publish else {
            return Ok(());
        };
        let r = limiter.check(who.rate_key(), events);
        if r.is_err() {
            metrics::counter!(crate::metrics::RATE_LIMITED, "limit" => "publish").increment(1);
        }
        r
    }

    /// Takes one new connection from `ip`'s budget, or says when to retry.
    pub fn check_connect(&self, ip: IpAddr) -> Result<(), Limited> {
        let Some(limiter) = &self.connect else {
            return Ok(());
        };
        let r = limiter.check(&ip, 1);
        if r.is_err() {
            metrics::counter!(crate::metrics::RATE_LIMITED, "limit" => "connections").increment(1);
        }
        r
    }

    /// Opens one SSE stream for `who`, held until the slot drops; refused
    /// when `who` already has `sse_per_credential` open.
    pub fn sse_slot(&self, who: &Principal) -> Result<SseSlot, usize> {
        let key: Arc<str> = who.rate_key().clone();
        if self.sse_per_credential > 0 {
            let mut open = self.sse_open.entry(key.clone()).or_insert(0);
            if *open >= self.sse_per_credential {
                drop(open);
                metrics::counter!(crate::metrics::RATE_LIMITED, "limit" => "sse_per_credential")
                    .increment(1);
                return Err(self.sse_per_credential);
            }
            *open += 1;
        }
        Ok(SseSlot {
            key,
            open: (self.sse_per_credential > 0).then(|| self.sse_open.clone()),
        })
    }

    /// Forgets credentials and IPs whose budget is full again, so the maps
    /// hold only recent clients; run it periodically.
    pub fn housekeeping(&self) {
        if let Some(l) = &self.publish {
            l.housekeeping();
        }
        if let Some(l) = &self.connect {
            l.housekeeping();
        }
        self.sse_open.retain(|_, open| *open > 0);
    }

    /// Clients (credentials and IPs) currently tracked, for tests and stats.
    pub fn tracked(&self) -> usize {
        self.publish.as_ref().map_or(0, Limiter::len)
            + self.connect.as_ref().map_or(0, Limiter::len)
            + self.sse_open.len()
    }
}

/// One open SSE stream counted against its credential; dropping it frees
/// the slot.
#[derive(Debug)]
pub struct SseSlot {
    key: Arc<str>,
    open: Option<Arc<DashMap<Arc<str>, usize>>>,
}

impl Drop for SseSlot {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            if let Some(mut n) = open.get_mut(&self.key) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_rounded_up_to_whole_milliseconds() {
        assert_eq!(retry_after_ms(Duration::ZERO), 1);
        assert_eq!(retry_after_ms(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_ms(Duration::from_micros(999_001)), 1000);
        assert_eq!(retry_after_ms(Duration::from_millis(250)), 250);
        assert_eq!(retry_after_ms(Duration::MAX), u64::MAX);
    }

    #[test]
    fn retry_after_secs_is_rounded_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
