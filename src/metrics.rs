//! Prometheus metrics, recorded through the `metrics` facade and exported by
//! `metrics-exporter-prometheus` at `GET /metrics`.
//!
//! Label values are bounded: transports, gap reasons, limit names, and topic
//! names only for topics listed in `[metrics] topics`.
//!
//! Consumer groups are not recorded on the hot path: [`render_groups`]
//! computes their series from the engine's group reports at scrape time.
//! Every family has one unlabelled series over all groups; the groups of
//! topics listed in `[metrics] topics` also get their own series, labelled
//! `{topic, group}` (as for published events, the label set stays bounded
//! by configuration, not by what clients create).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Open connections, by `transport` (`tcp`, `sse`).
pub const CONNECTIONS: &str = "ringcast_connections";
/// Requests refused by a limit, by `limit`.
pub const REFUSED: &str = "ringcast_limit_refusals_total";
/// Events appended (acknowledged), by topic for listed topics only.
pub const PUBLISHED: &str = "ringcast_events_published_total";
/// Published events that repeated an idempotency key (answered with the
/// original ack, not stored).
pub const DUPLICATES: &str = "ringcast_duplicate_publishes_total";
/// Appends refused because their expected position did not hold.
pub const POSITION_MISMATCHES: &str = "ringcast_position_mismatches_total";
/// Events delivered to subscribers, by `transport`.
pub const DELIVERED: &str = "ringcast_deliveries_total";
/// Bytes received from clients, by `transport`.
pub const BYTES_IN: &str = "ringcast_bytes_in_total";
/// Bytes sent to clients, by `transport`.
pub const BYTES_OUT: &str = "ringcast_bytes_out_total";
/// Gaps sent, by `reason`.
pub const GAPS: &str = "ringcast_gaps_total";
/// Subscribers that fell behind the ring.
pub const SLOW_CONSUMERS: &str = "ringcast_slow_consumer_events_total";
/// Events retained over all rings.
pub const RETAINED_EVENTS: &str = "ringcast_retained_events";
/// Bytes retained over all rings.
pub const RETAINED_BYTES: &str = "ringcast_retained_bytes";
/// Topics alive.
pub const TOPICS: &str = "ringcast_topics";
/// Live subscriptions over all topics.
pub const SUBSCRIPTIONS: &str = "ringcast_subscriptions";
/// Duration of a storage write + flush (+ fsync), seconds.
pub const FLUSH_SECONDS: &str = "ringcast_storage_flush_seconds";
/// Time from a publish being queued to its ack, seconds.
pub const ACK_SECONDS: &str = "ringcast_publish_ack_seconds";
/// Passes the store failed to write or fsync (each refused, then repaired).
pub const STORAGE_ERRORS: &str = "ringcast_storage_errors_total";
/// Topics recovery found damaged (they got a new epoch).
pub const DAMAGED_TOPICS: &str = "ringcast_recovery_damaged_topics_total";
/// Events this node took from Redis that other nodes appended (redis backend).
pub const CLUSTER_APPLIED: &str = "ringcast_cluster_applied_events_total";
/// Topics whose history Redis lost, restarted under a new epoch by this
/// node (redis backend).
pub const CLUSTER_NEW_EPOCHS: &str = "ringcast_cluster_new_epochs_total";
/// 1 while the store accepts writes, 0 while it repairs itself.
pub const STORAGE_WRITABLE: &str = "ringcast_storage_writable";
/// Bytes handed to connections' writers that their peers have not read yet,
/// by `transport`.
pub const OUTBOUND_QUEUED_BYTES: &str = "ringcast_outbound_queued_bytes";

/// Event payloads on TCP connections with compression on, in bytes before
/// compression, by `direction` (`in`: publishes, `out`: events, deliveries
/// and history).
pub const TCP_PAYLOAD_PLAIN_BYTES: &str = "ringcast_tcp_compression_plain_bytes_total";
/// The same payloads in bytes as they went on the wire (codec marker and
/// header included), by `direction`; plain minus wire is what compression
/// saved.
pub const TCP_PAYLOAD_WIRE_BYTES: &str = "ringcast_tcp_compression_wire_bytes_total";
/// Payloads the broker ran the codec on, by `op` (`compress`: once per
/// event however many subscribers get it, `decompress`: per payload
/// received compressed).
pub const TCP_CODEC_RUNS: &str = "ringcast_tcp_compression_runs_total";

/// Requests refused by access control, by `transport` and `code`
/// (`unauthorized`, `token_expired`, `forbidden`, `origin_not_allowed`,
/// `host_not_allowed`).
pub const AUTH_REFUSED: &str = "ringcast_auth_refusals_total";
/// Requests refused by a rate limit, by `limit` (`publish`, `connections`,
/// `sse_per_credential`).
pub const RATE_LIMITED: &str = "ringcast_rate_limited_total";

/// Consumer groups alive.
pub const GROUPS: &str = "ringcast_groups";
/// Events of a group's topic not yet handed out.
pub const GROUP_LAG: &str = "ringcast_group_lag";
/// Events handed out and not yet done (acked, dead-lettered or lost).
pub const GROUP_PENDING: &str = "ringcast_group_pending";
/// Pending events held by a member now.
pub const GROUP_IN_FLIGHT: &str = "ringcast_group_in_flight";
/// Age of the oldest pending event since its first delivery, seconds.
pub const GROUP_OLDEST_PENDING: &str = "ringcast_group_oldest_pending_age_seconds";
/// Deliveries, first ones and redeliveries.
pub const GROUP_DELIVERED: &str = "ringcast_group_delivered_total";
/// Redeliveries.
pub const GROUP_REDELIVERED: &str = "ringcast_group_redelivered_total";
/// Events acked.
pub const GROUP_ACKED: &str = "ringcast_group_acked_total";
/// Events appended to a dead-letter topic.
pub const GROUP_DEAD_LETTERED: &str = "ringcast_group_dead_lettered_total";
/// Events lost to retention before they were done.
pub const GROUP_LOST: &str = "ringcast_group_lost_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// The process-wide Prometheus handle, installing the recorder on first use.
/// Several brokers in one process (tests) share it.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("latency buckets are non-empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(CONNECTIONS, "Open client connections by transport.");
    describe_counter!(
        REFUSED,
        "Requests or connections refused by a configured limit."
    );
    describe_counter!(PUBLISHED, "Events appended and acknowledged.");
    describe_counter!(
        DUPLICATES,
        "Published events that repeated an idempotency key within the dedup window; not stored again."
    );
    describe_counter!(
        POSITION_MISMATCHES,
        "Appends refused because their expected offset or version did not hold."
    );
    describe_counter!(
        AUTH_REFUSED,
        "Requests or connections refused by access control, by transport and code."
    );
    describe_counter!(
        RATE_LIMITED,
        "Requests or connections refused by a rate limit, by limit."
    );
    describe_counter!(
        STORAGE_ERRORS,
        "Storage passes that failed to write or fsync; their publishes were refused."
    );
    describe_counter!(
        CLUSTER_APPLIED,
        "Events the follower applied from Redis: other nodes' appends (redis backend)."
    );
    describe_counter!(
        CLUSTER_NEW_EPOCHS,
        "Topics whose history Redis lost (missing or behind what this node saw acknowledged); each got a new epoch."
    );
    describe_counter!(
        DAMAGED_TOPICS,
        "Topics that recovery found damaged or short; each got a new epoch."
    );
    describe_gauge!(
        STORAGE_WRITABLE,
        "1 while the store accepts writes, 0 while it repairs itself after an error."
    );
    describe_counter!(DELIVERED, "Events delivered to subscribers.");
    describe_counter!(BYTES_IN, Unit::Bytes, "Bytes received from clients.");
    describe_counter!(BYTES_OUT, Unit::Bytes, "Bytes sent to clients.");
    describe_counter!(
        TCP_PAYLOAD_PLAIN_BYTES,
        Unit::Bytes,
        "Payload bytes before compression on TCP connections with compression on, by direction."
    );
    describe_counter!(
        TCP_PAYLOAD_WIRE_BYTES,
        Unit::Bytes,
        "The same payloads as sent on the wire (marker and header included), by direction."
    );
    describe_counter!(
        TCP_CODEC_RUNS,
        "Payloads compressed (once per event for all subscribers) or decompressed, by op."
    );
    describe_counter!(GAPS, "Gap messages sent to subscribers, by reason.");
    describe_counter!(
        SLOW_CONSUMERS,
        "Subscribers that fell behind the retention ring."
    );
    describe_gauge!(
        RETAINED_EVENTS,
        "Events retained in memory over all topics."
    );
    describe_gauge!(
        RETAINED_BYTES,
        Unit::Bytes,
        "Bytes retained in memory over all topics."
    );
    describe_gauge!(TOPICS, "Topics alive.");
    describe_gauge!(SUBSCRIPTIONS, "Live subscriptions over all topics.");
    describe_histogram!(
        FLUSH_SECONDS,
        Unit::Seconds,
        "Storage batch write and flush time."
    );
    describe_histogram!(
        ACK_SECONDS,
        Unit::Seconds,
        "Time from publish to acknowledgement."
    );
    describe_gauge!(
        OUTBOUND_QUEUED_BYTES,
        Unit::Bytes,
        "Bytes queued for connections' writers that their peers have not read yet."
    );
}

/// Counts a request refused by access control on `transport` with `code`.
pub fn auth_refused(transport: &'static str, code: &'static str) {
    metrics::counter!(AUTH_REFUSED, "transport" => transport, "code" => code).increment(1);
}

/// Counts a refusal by `limit` (e.g. `max_tcp_connections`).
pub fn refused(limit: &'static str) {
    metrics::counter!(REFUSED, "limit" => limit).increment(1);
}

/// Appends the consumer-group families to a Prometheus text exposition
/// (`out`, as rendered by [`handle`]): for each, one unlabelled series
/// over `groups` (a sum; the oldest age for the age gauge), and one series
/// labelled `{topic, group}` per group whose topic is `metered`. The
/// counters are the groups' own (persisted with them); the totals count
/// live groups only, so deleting a group lowers them.
pub fn render_groups(
    out: &mut String,
    groups: &[crate::engine::GroupInfo],
    metered: impl Fn(&str) -> bool,
) {
    use crate::engine::GroupInfo;
    use std::fmt::Write as _;

    type Value = fn(&GroupInfo) -> f64;
    let families: [(&str, &str, &str, Value); 9] = [
        (GROUP_LAG, "gauge", "Events of the group's topic not yet handed out.", |g| g.lag as f64),
        (GROUP_PENDING, "gauge", "Events handed out and not yet done (bounded by max_ack_pending).", |g| g.pending as f64),
        (GROUP_IN_FLIGHT, "gauge", "Pending events held by a member now.", |g| g.in_flight as f64),
        (GROUP_OLDEST_PENDING, "gauge", "Age of the oldest pending event since its first delivery; the unlabelled series is the oldest over all groups.", |g| g.oldest_pending_ms as f64 / 1000.0),
        (GROUP_DELIVERED, "counter", "Group deliveries, first ones and redeliveries.", |g| g.delivered as f64),
        (GROUP_REDELIVERED, "counter", "Group redeliveries (ack_wait expired, nack, member gone).", |g| g.redelivered as f64),
        (GROUP_ACKED, "counter", "Events acked by group members.", |g| g.acked as f64),
        (GROUP_DEAD_LETTERED, "counter", "Events a group appended to its dead-letter topic.", |g| g.dead_lettered as f64),
        (GROUP_LOST, "counter", "Events retention took before the group was done with them.", |g| g.lost as f64),
    ];
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {GROUPS} Consumer groups alive.");
    let _ = writeln!(out, "# TYPE {GROUPS} gauge");
    let _ = writeln!(out, "{GROUPS} {}", groups.len());
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let total = if name == GROUP_OLDEST_PENDING {
            groups.iter().map(value).fold(0.0, f64::max)
        } else {
            groups.iter().map(value).sum()
        };
        let _ = writeln!(out, "{name} {total}");
        for g in groups.iter().filter(|g| metered(&g.topic)) {
            let _ = writeln!(
                out,
                "{name}{{topic=\"{}\",group=\"{}\"}} {}",
                label(&g.topic),
                label(&g.group),
                value(g)
            );
        }
    }
}

/// A label value escaped for the text format (names of topics and groups
/// hold none of these characters; the escaping is a safeguard).
fn label(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(['\\', '"', '\n']) {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        v.into()
    }
}
