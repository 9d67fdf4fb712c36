//! Daemon configuration: one serde struct per TOML section, defaults, env
//! overrides and validation.
//!
//! Precedence, lowest first: built-in defaults, the TOML file, environment
//! variables `RINGCAST_<SECTION>_<KEY>`, command-line flags (applied by the
//! binary). Every error names the offending key in one line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

pub use crate::engine::{Durability, Retention, TopicOverride, TopicsConfig};

/// The default configuration file, shipped as `config/ringcast.toml` and
/// embedded so `ringcastd --print-config` can show it.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/ringcast.toml");

/// The config sections, as they appear in TOML and in variable names.
const SECTIONS: &[&str] = &[
    "server", "storage", "topics", "log", "limits", "metrics", "auth", "cluster",
];

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "RINGCAST_";

/// A configuration problem, always naming the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path that failed.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key has the wrong type or is unknown.
    #[error("{0}")]
    Parse(String),
    /// A key has a value of the right type that makes no sense.
    #[error("invalid config: {key}: {message}")]
    Invalid {
        /// Dotted key path, e.g. `topics.max_events`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listeners.
    pub server: ServerConfig,
    /// Where and how durably events are stored.
    pub storage: StorageConfig,
    /// Retention and lifecycle defaults for topics.
    pub topics: TopicsConfig,
    /// Log filter and format.
    pub log: LogConfig,
    /// Engine-wide limits.
    pub limits: LimitsConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// Credentials, grants and rate limits.
    pub auth: crate::auth::AuthConfig,
    /// Which engine backend holds the topics: this node's sled store, or
    /// Redis shared by several nodes.
    pub cluster: ClusterConfig,
}

/// `[cluster]`: the engine backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `local` (sled under `storage.data_dir`) or `redis` (shared by nodes).
    pub backend: Backend,
    /// The Redis server of the `redis` backend (`redis://[:password@]host:port[/db]`).
    pub redis_url: String,
    /// This node's name in logs and metrics; empty: host name and process id.
    pub node_id: String,
    /// Prefix of every Redis key and channel ringcast uses (several
    /// clusters may share one Redis under different prefixes).
    pub key_prefix: String,
    /// Longest wait for one Redis command (connect, publish pass, read):
    /// past it the command fails and publishes are refused until Redis answers.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How often a node re-reads the counters of the topics it holds, to
    /// catch a notification lost while its subscription to Redis was down.
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
}

/// The engine backend `[cluster] backend` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// This node alone, stored in sled (`[storage]`).
    #[default]
    Local,
    /// Several nodes sharing topics in Redis.
    Redis,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Local,
            redis_url: "redis://127.0.0.1:6379/".into(),
            node_id: String::new(),
            key_prefix: "ringcast".into(),
            command_timeout: Duration::from_secs(2),
            resync_interval: Duration::from_secs(30),
        }
    }
}

/// `[metrics]`: what `/metrics` labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Topics whose events are also counted under a `topic` label (others
    /// only in the totals, so label cardinality stays bounded).
    #[serde(deserialize_with = "string_list")]
    pub topics: Vec<String>,
}

/// `[limits]`: engine-wide limits, each refused with a clear error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest payload of one event.
    pub max_payload: ByteSize,
    /// Most topics alive at once.
    pub max_topics: usize,
    /// Largest TCP frame body accepted.
    pub max_frame: ByteSize,
    /// Most TCP connections at once.
    pub max_tcp_connections: usize,
    /// Most subscriptions on one TCP connection.
    pub max_subscriptions_per_connection: usize,
    /// Most SSE connections at once; one more is answered with 503.
    pub max_sse_connections: usize,
    /// Most bytes retained in memory over all topics; publishes beyond it
    /// are refused until retention frees room.
    pub max_retained_bytes: ByteSize,
    /// Most HTTP connections at once (SSE streams included); more are closed
    /// at accept.
    pub max_http_connections: usize,
    /// Most HTTP requests (SSE streams excluded) handled at once; more are
    /// answered 503.
    pub max_http_requests: usize,
    /// Most bytes queued for one TCP connection or SSE stream that its peer
    /// has not read yet; a subscription that would exceed it stops pulling,
    /// falls behind the ring and gets `gap(slow_consumer)`.
    pub max_outbound_bytes: ByteSize,
    /// Most payload bytes of one TCP connection's publishes awaiting their
    /// ack; reading from the connection pauses beyond it.
    pub max_in_flight_bytes: ByteSize,
    /// Most payload bytes in one history page (TCP and HTTP); a page ends
    /// early and `next_after` says where to continue.
    pub max_history_bytes: ByteSize,
    /// Most topics that exist only because a subscribe created them (no
    /// event yet); each goes with its last subscriber and is never stored.
    pub max_ephemeral_topics: usize,
    /// Most consumer groups over all topics.
    pub max_groups: usize,
    /// Most topics and patterns named by one SSE stream or TCP pattern
    /// subscription; more are refused (HTTP 400).
    pub max_stream_topics: usize,
    /// Most topics the patterns of one SSE stream or TCP subscription may
    /// bring in; more are refused at the start, and end the stream later.
    pub max_pattern_matches: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let engine = crate::engine::Limits::default();
        Self {
            max_payload: ByteSize::b(engine.max_payload),
            max_topics: engine.max_topics,
            max_frame: ByteSize::mib(4),
            max_tcp_connections: 10_000,
            max_subscriptions_per_connection: 1_000,
            max_sse_connections: 10_000,
            max_retained_bytes: ByteSize::b(engine.max_retained_bytes),
            max_http_connections: 10_000,
            max_http_requests: 1_024,
            max_outbound_bytes: ByteSize::kib(256),
            max_in_flight_bytes: ByteSize::mib(16),
            max_history_bytes: ByteSize::mib(4),
            max_ephemeral_topics: engine.max_ephemeral_topics,
            max_groups: engine.max_groups,
            max_stream_topics: 64,
            max_pattern_matches: 1_000,
        }
    }
}

impl LimitsConfig {
    /// The engine's view of these limits.
    pub fn engine(&self) -> crate::engine::Limits {
        crate::engine::Limits {
            max_payload: self.max_payload.as_u64(),
            max_topics: self.max_topics,
            max_retained_bytes: self.max_retained_bytes.as_u64(),
            max_ephemeral_topics: self.max_ephemeral_topics,
            max_groups: self.max_groups,
        }
    }
}

/// A size as a `usize`, saturating (sizes are validated well below it).
pub(crate) fn usize_bytes(size: ByteSize) -> usize {
    usize::try_from(size.as_u64()).unwrap_or(usize::MAX)
}

/// `[server]`: network listeners.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the binary TCP protocol listener.
    pub tcp_listen: SocketAddr,
    /// Address of the HTTP listener (SSE bridge, REST API, health, metrics).
    pub http_listen: SocketAddr,
    /// Idle interval after which TCP heartbeats and SSE comments are sent;
    /// a TCP peer silent for three intervals is dropped.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Longest graceful shutdown before the daemon exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Origins (`https://app.example`) whose pages may read cross-origin:
    /// SSE, history, topic info and list, with credentials (cookies). `"*"`
    /// allows any origin, without credentials. Empty: same-origin only.
    /// From the environment: a comma-separated list.
    #[serde(deserialize_with = "string_list")]
    pub cors_origins: Vec<String>,
    /// Origins whose pages may also write cross-origin: publish, seal,
    /// delete (and read, as if listed in `cors_origins`). Empty (the
    /// default): writes from another origin are refused with 403 whatever
    /// their content type. `"*"` is not accepted.
    #[serde(deserialize_with = "string_list")]
    pub cors_write_origins: Vec<String>,
    /// Host names (without port) a loopback HTTP listener accepts in `Host`
    /// besides `localhost`, `127.0.0.1` and `[::1]` (DNS rebinding
    /// defence); `"*"` accepts any. Not checked on other listeners.
    #[serde(deserialize_with = "string_list")]
    pub allowed_hosts: Vec<String>,
    /// A TCP frame or an HTTP request (headers and body) that has started
    /// must arrive whole within this; a slower peer is cut off.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Take the LZ4 payload compression a TCP client offers in `HelloExt`
    /// (the client asks; off, every connection carries plain payloads).
    pub tcp_compression: bool,
    /// The smallest payload compressed on a TCP connection, whatever
    /// smaller threshold the client offers.
    pub tcp_compression_min_size: ByteSize,
}

/// A list of strings, also accepted as one comma-separated string (the
/// form environment variables take).
fn string_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<String>),
        One(String),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            tcp_listen: SocketAddr::from(([127, 0, 0, 1], 7411)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            heartbeat: Duration::from_secs(15),
            shutdown_timeout: Duration::from_secs(10),
            cors_origins: Vec::new(),
            cors_write_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            read_timeout: Duration::from_secs(30),
            tcp_compression: true,
            tcp_compression_min_size: ByteSize::b(128),
        }
    }
}

/// `[storage]`: the sled store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory holding the sled database.
    pub data_dir: PathBuf,
    /// Acknowledgement policy: `fsync`, `interval` or `memory`.
    pub durability: Durability,
    /// How often `interval` mode fsyncs.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Most payload bytes queued for the store writer; publishers wait
    /// beyond it (backpressure instead of an unbounded queue).
    pub max_queued_bytes: ByteSize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            durability: Durability::Fsync,
            flush_interval: Duration::from_millis(200),
            max_queued_bytes: ByteSize::mib(64),
        }
    }
}

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `[log]`: tracing filter and output format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `RUST_LOG`-style filter; the `RUST_LOG` variable wins when set.
    pub filter: String,
    /// `pretty` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            format: LogFormat::Pretty,
        }
    }
}

impl Config {
    /// The engine's options under this config.
    pub fn engine_options(&self) -> crate::engine::EngineOptions {
        crate::engine::EngineOptions {
            data_dir: self.storage.data_dir.clone(),
            durability: self.storage.durability,
            flush_interval: self.storage.flush_interval,
            topics: self.topics.clone(),
            limits: self.limits.engine(),
            max_queued_bytes: self.storage.max_queued_bytes.as_u64(),
            maintenance_interval: Duration::from_secs(1),
            metered_topics: self.metrics.topics.clone(),
            cluster: match self.cluster.backend {
                Backend::Local => None,
                Backend::Redis => Some(crate::engine::RedisOptions {
                    url: self.cluster.redis_url.clone(),
                    node_id: if self.cluster.node_id.is_empty() {
                        default_node_id()
                    } else {
                        self.cluster.node_id.clone()
                    },
                    key_prefix: self.cluster.key_prefix.clone(),
                    command_timeout: self.cluster.command_timeout,
                    resync_interval: self.cluster.resync_interval,
                }),
            },
            faults: None,
            clock: crate::engine::Clock::default(),
        }
    }

    /// Loads the config: defaults, then `path` (if given), then the
    /// `RINGCAST_*` variables among `env`; validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>().map_err(|e| {
                    ConfigError::Parse(one_line(&format!("{}: {e}", path.display())))
                })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, env)?;
        let config = Self::from_table(table)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no env, no validation); used by tests and `--print-config`.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Parse(one_line(&e.to_string())))?;
        Self::from_table(table)
    }

    fn from_table(table: toml::Table) -> Result<Self, ConfigError> {
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Parse(one_line(&format!(
                "invalid config: {key}: {}",
                e.into_inner()
            )))
        })
    }

    /// Checks values that have the right type but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.storage.data_dir.as_os_str().is_empty()
            && self.storage.durability != Durability::Memory
        {
            return Err(ConfigError::invalid(
                "storage.data_dir",
                "must not be empty",
            ));
        }
        if self.storage.durability == Durability::Interval && self.storage.flush_interval.is_zero()
        {
            return Err(ConfigError::invalid(
                "storage.flush_interval",
                "must be greater than 0 in interval mode",
            ));
        }
        self.validate_cluster()?;
        validate_retention("topics", self.topics.max_events, self.topics.max_bytes)?;
        for (i, o) in self.topics.overrides.iter().enumerate() {
            let key = format!("topics.override[{i}]");
            if o.pattern.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{key}.pattern"),
                    "must not be empty",
                ));
            }
            if let Some(bad) = o
                .pattern
                .chars()
                .find(|c| !(crate::engine::is_topic_char(*c) || *c == '*' || *c == '?'))
            {
                return Err(ConfigError::invalid(
                    format!("{key}.pattern"),
                    format!("{bad:?} can never match a topic name (allowed: A-Z a-z 0-9 . _ : - and the wildcards * ?)"),
                ));
            }
            validate_retention(
                &key,
                o.max_events.unwrap_or(1),
                o.max_bytes.unwrap_or(ByteSize::b(1)),
            )?;
        }
        if self.limits.max_payload.as_u64() == 0 {
            return Err(ConfigError::invalid(
                "limits.max_payload",
                "must be at least 1 byte",
            ));
        }
        if self.limits.max_frame.as_u64()
            < self.limits.max_payload.as_u64().saturating_add(64 * 1024)
        {
            return Err(ConfigError::invalid(
                "limits.max_frame",
                "must be at least limits.max_payload + 64KiB (room for type, topic and headers)",
            ));
        }
        if self.limits.max_frame.as_u64() > u64::from(u32::MAX) {
            return Err(ConfigError::invalid(
                "limits.max_frame",
                "must be below 4GiB",
            ));
        }
        for (key, value) in [
            (
                "limits.max_tcp_connections",
                self.limits.max_tcp_connections,
            ),
            (
                "limits.max_subscriptions_per_connection",
                self.limits.max_subscriptions_per_connection,
            ),
            ("limits.max_stream_topics", self.limits.max_stream_topics),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        for (key, value) in [
            (
                "limits.max_http_connections",
                self.limits.max_http_connections,
            ),
            ("limits.max_http_requests", self.limits.max_http_requests),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        for (key, value) in [
            ("limits.max_outbound_bytes", self.limits.max_outbound_bytes),
            (
                "limits.max_in_flight_bytes",
                self.limits.max_in_flight_bytes,
            ),
            ("limits.max_history_bytes", self.limits.max_history_bytes),
            ("storage.max_queued_bytes", self.storage.max_queued_bytes),
        ] {
            if value.as_u64() < 64 * 1024 {
                return Err(ConfigError::invalid(key, "must be at least 64KiB"));
            }
        }
        if self.server.read_timeout < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "server.read_timeout",
                "must be at least 100ms",
            ));
        }
        if self.server.heartbeat < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                "server.heartbeat",
                "must be at least 10ms",
            ));
        }
        for (key, list, star) in [
            ("server.cors_origins", &self.server.cors_origins, true),
            (
                "server.cors_write_origins",
                &self.server.cors_write_origins,
                false,
            ),
        ] {
            for (i, origin) in list.iter().enumerate() {
                if origin == "*" && star {
                    continue;
                }
                if !valid_origin(origin) {
                    return Err(ConfigError::invalid(
                        format!("{key}[{i}]"),
                        format!(
                            "{origin:?} is not an origin (scheme://host[:port], no path){}",
                            if star {
                                ""
                            } else {
                                "; \"*\" is not allowed for writes"
                            }
                        ),
                    ));
                }
            }
        }
        for (i, host) in self.server.allowed_hosts.iter().enumerate() {
            if host != "*"
                && (host.is_empty() || host.contains(['/', ' ', ':']) && !host.starts_with('['))
            {
                return Err(ConfigError::invalid(
                    format!("server.allowed_hosts[{i}]"),
                    format!("{host:?} is not a host name (no scheme, no port)"),
                ));
            }
        }
        self.auth
            .validate()
            .map_err(|(key, message)| ConfigError::invalid(key, message))?;
        if self.limits.max_topics == 0 {
            return Err(ConfigError::invalid(
                "limits.max_topics",
                "must be at least 1",
            ));
        }
        if self
            .log
            .filter
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(ConfigError::invalid(
                "log.filter",
                format!("{:?} is not a valid filter", self.log.filter),
            ));
        }
        Ok(())
    }
}

impl Config {
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if c.backend != Backend::Redis {
            return Ok(());
        }
        if let Err(e) = redis::Client::open(c.redis_url.as_str()) {
            return Err(ConfigError::invalid(
                "cluster.redis_url",
                format!("{:?} is not a Redis URL: {e}", c.redis_url),
            ));
        }
        if c.key_prefix.is_empty() || c.key_prefix.contains(['{', '}', ' ']) {
            return Err(ConfigError::invalid(
                "cluster.key_prefix",
                "must be non-empty, without braces or spaces",
            ));
        }
        if c.command_timeout < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                "cluster.command_timeout",
                "must be at least 10ms",
            ));
        }
        if c.resync_interval < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "cluster.resync_interval",
                "must be at least 100ms",
            ));
        }
        Ok(())
    }
}

/// A node name from the host name and the process id.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "node".into());
    format!("{host}-{}", std::process::id())
}

fn validate_retention(
    section: &str,
    max_events: u64,
    max_bytes: ByteSize,
) -> Result<(), ConfigError> {
    if max_events == 0 {
        return Err(ConfigError::invalid(
            format!("{section}.max_events"),
            "must be at least 1",
        ));
    }
    if max_bytes.as_u64() == 0 {
        return Err(ConfigError::invalid(
            format!("{section}.max_bytes"),
            "must be at least 1 byte",
        ));
    }
    Ok(())
}

/// Applies `RINGCAST_<SECTION>_<KEY>=value` over the parsed file. The value
/// is read as a TOML value when it parses as one (numbers, booleans, arrays),
/// otherwise as a string.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    // Sorted so that errors are deterministic.
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    for (var, raw) in vars {
        let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        // Variables of other ringcast programs (the CLI's RINGCAST_SERVER,
        // test switches) share the prefix: only config sections count.
        let Some((section, key)) = rest.split_once('_') else {
            continue;
        };
        if !SECTIONS.contains(&section) {
            continue;
        }
        let value = parse_env_value(&raw);
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = entry else {
            return Err(ConfigError::invalid(section, "must be a table"));
        };
        section_table.insert(key.to_owned(), value);
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    #[derive(Deserialize)]
    struct Probe {
        v: toml::Value,
    }
    match toml::from_str::<Probe>(&format!("v = {raw}")) {
        Ok(p) => p.v,
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

/// `scheme://host[:port]`, as browsers send in `Origin`.
fn valid_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && !rest.is_empty()
        && !rest.contains(['/', ' ', '?', '#'])
        && axum::http::HeaderValue::from_str(origin).is_ok()
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_config_equals_the_defaults() {
        let shipped = Config::from_toml(DEFAULT_CONFIG_TOML).expect("shipped config parses");
        assert_eq!(shipped, Config::default());
        shipped.validate().expect("defaults are valid");
    }

    #[test]
    fn env_overrides_file_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[topics]\nmax_events = 7\nmax_age = \"1h\"\n").unwrap();
        let c = Config::load(
            Some(&path),
            env(&[
                ("RINGCAST_TOPICS_MAX_EVENTS", "5"),
                ("RINGCAST_STORAGE_DURABILITY", "memory"),
                ("UNRELATED", "x"),
                ("RINGCAST_SERVER", "10.0.0.1:7411"),
                ("RINGCAST_CREDENTIALS", "secret"),
                ("RINGCAST_SKIP_BROWSER", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(c.topics.max_events, 5);
        assert_eq!(c.topics.max_age, Duration::from_secs(3600));
        assert_eq!(c.storage.durability, Durability::Memory);
        let c = Config::load(
            None,
            env(&[(
                "RINGCAST_SERVER_CORS_ORIGINS",
                "https://a.example, https://b.example",
            )]),
        )
        .unwrap();
        assert_eq!(
            c.server.cors_origins,
            vec!["https://a.example", "https://b.example"]
        );
    }

    #[test]
    fn errors_name_the_key_in_one_line() {
        type Case = (&'static str, Vec<(String, String)>, &'static str);
        let cases: Vec<Case> = vec![
            (
                "[topics]\nmax_events = \"many\"\n",
                vec![],
                "topics.max_events",
            ),
            ("[topics]\nmax_events = 0\n", vec![], "topics.max_events"),
            (
                "[storage]\ndurability = \"sometimes\"\n",
                vec![],
                "storage.durability",
            ),
            (
                "[server]\ntcp_listen = \"nowhere\"\n",
                vec![],
                "server.tcp_listen",
            ),
            ("[topics]\nbogus = 1\n", vec![], "bogus"),
            (
                "",
                env(&[("RINGCAST_TOPICS_MAX_AGE", "soon")]),
                "topics.max_age",
            ),
            ("", env(&[("RINGCAST_TOPICS_NOPE", "1")]), "topics.nope"),
            (
                "[[topics.override]]\npattern = \"a/b*\"\n",
                vec![],
                "topics.override[0].pattern",
            ),
            // Found by tests/config_fuzz.rs: an overflow in validate().
            (
                "",
                env(&[("RINGCAST_LIMITS_MAX_PAYLOAD", "20000000000000m")]),
                "limits.max_frame",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (i, (text, env, key)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("{i}.toml"));
            std::fs::write(&path, text).unwrap();
            let err = Config::load(Some(&path), env).unwrap_err().to_string();
            assert!(err.contains(key), "case {i}: {err:?} does not name {key}");
            assert!(!err.contains('\n'), "case {i}: {err:?} is not one line");
        }
    }

    #[test]
    fn first_matching_override_wins_key_by_key() {
        let c = Config::from_toml(
            r#"
            [topics]
            max_events = 100
            [[topics.override]]
            pattern = "division-*"
            max_events = 5
            [[topics.override]]
            pattern = "division-a"
            max_events = 9
            max_bytes = "1KiB"
            "#,
        )
        .unwrap();
        let r = c.topics.retention_for("division-a");
        assert_eq!(r.max_events, 5);
        assert_eq!(r.max_bytes, 64 * 1024 * 1024);
        assert_eq!(c.topics.retention_for("other").max_events, 100);
        assert_eq!(c.topics.retention_for("other").idle_ttl, None);
    }
}
