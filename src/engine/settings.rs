//! Settings the engine owns: durability modes and topic retention, with
//! their serde forms (the daemon's `[storage]` and `[topics]` sections
//! deserialize straight into them, so the engine never imports the config).

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use wildmatch::WildMatch;

/// When a publish is acknowledged relative to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Ack after the write is fsynced; concurrent publishes share one fsync.
    #[default]
    Fsync,
    /// Ack after the write; fsync every `flush_interval`.
    Interval,
    /// No disk at all; a restart starts every topic over with a new epoch.
    Memory,
}

impl std::str::FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fsync" => Ok(Self::Fsync),
            "interval" => Ok(Self::Interval),
            "memory" => Ok(Self::Memory),
            other => Err(format!(
                "unknown durability {other:?} (expected fsync, interval or memory)"
            )),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fsync => "fsync",
            Self::Interval => "interval",
            Self::Memory => "memory",
        })
    }
}

/// `[topics]`: retention and lifecycle defaults, with per-pattern overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicsConfig {
    /// Most events a topic retains.
    pub max_events: u64,
    /// Oldest event a topic retains; `0s` means no age limit.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Most bytes a topic retains: events and the encodings built for them.
    pub max_bytes: ByteSize,
    /// How long a sealed topic stays readable before it is removed.
    #[serde(with = "humantime_serde")]
    pub sealed_ttl: Duration,
    /// Drop a topic with no publish and no subscriber for this long; `0s` = never.
    #[serde(with = "humantime_serde")]
    pub idle_ttl: Duration,
    /// How long a publish's idempotency key is remembered: a repeat within
    /// it returns the original ack and stores nothing; `0s` = keys are ignored.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Create a topic on its first publish or subscribe (and a consumer
    /// group on its first join).
    pub auto_create: bool,
    /// Keep events until every consumer group of the topic is done with
    /// them; at `max_bytes` publishes are refused with `over_capacity`.
    pub retain_until_acked: bool,
    /// Per-topic overrides, first matching pattern wins.
    #[serde(rename = "override")]
    pub overrides: Vec<TopicOverride>,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            max_events: 10_000,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: ByteSize::mib(64),
            sealed_ttl: Duration::from_secs(300),
            idle_ttl: Duration::ZERO,
            dedup_window: Duration::from_secs(120),
            auto_create: true,
            retain_until_acked: false,
            overrides: Vec::new(),
        }
    }
}

/// `[[topics.override]]`: settings for topics whose name matches `pattern`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TopicOverride {
    /// Glob over topic names: `*` any run, `?` one character.
    pub pattern: String,
    /// Overrides `topics.max_events`.
    pub max_events: Option<u64>,
    /// Overrides `topics.max_age`.
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Overrides `topics.max_bytes`.
    pub max_bytes: Option<ByteSize>,
    /// Overrides `topics.sealed_ttl`.
    #[serde(with = "humantime_serde")]
    pub sealed_ttl: Option<Duration>,
    /// Overrides `topics.idle_ttl`.
    #[serde(with = "humantime_serde")]
    pub idle_ttl: Option<Duration>,
    /// Overrides `topics.dedup_window`.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Option<Duration>,
    /// Overrides `topics.retain_until_acked`.
    pub retain_until_acked: Option<bool>,
}

/// The effective retention and lifecycle settings of one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most events retained (at least 1).
    pub max_events: u64,
    /// Oldest event retained; `None` = no age limit.
    pub max_age: Option<Duration>,
    /// Most bytes retained.
    pub max_bytes: u64,
    /// Removal delay after sealing.
    pub sealed_ttl: Duration,
    /// Idle expiry; `None` = never.
    pub idle_ttl: Option<Duration>,
    /// How long idempotency keys are remembered; zero = not at all.
    pub dedup_window: Duration,
    /// Events stay until every consumer group is done with them.
    pub retain_until_acked: bool,
}

impl Retention {
    /// The dedup window in milliseconds.
    pub fn dedup_window_ms(&self) -> u64 {
        u64::try_from(self.dedup_window.as_millis()).unwrap_or(u64::MAX)
    }
}

impl TopicsConfig {
    /// The settings of `topic`: the first override whose pattern matches,
    /// falling back key by key to the `[topics]` defaults.
    pub fn retention_for(&self, topic: &str) -> Retention {
        let o = self
            .overrides
            .iter()
            .find(|o| WildMatch::new(&o.pattern).matches(topic));
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Retention {
            max_events: o.and_then(|o| o.max_events).unwrap_or(self.max_events),
            max_age: nonzero(o.and_then(|o| o.max_age).unwrap_or(self.max_age)),
            max_bytes: o
                .and_then(|o| o.max_bytes)
                .unwrap_or(self.max_bytes)
                .as_u64(),
            sealed_ttl: o.and_then(|o| o.sealed_ttl).unwrap_or(self.sealed_ttl),
            idle_ttl: nonzero(o.and_then(|o| o.idle_ttl).unwrap_or(self.idle_ttl)),
            dedup_window: o.and_then(|o| o.dedup_window).unwrap_or(self.dedup_window),
            retain_until_acked: o
                .and_then(|o| o.retain_until_acked)
                .unwrap_or(self.retain_until_acked),
        }
    }
}
