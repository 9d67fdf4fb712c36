//! `report`: turns the JSON lines of a `benches/compare.sh` run into the one
//! comparison table (Markdown) and the list of targets met or missed.
//!
//! Rows pair a ringcast result with a peer result by their `label`s, which
//! `benches/compare.sh` assigns (`<scenario>.<system>[.<setting>]`). A row
//! whose two results are both absent (e.g. `--quick` skipped it) is left
//! out; a row with one side absent shows `n/a`.

use std::collections::HashMap;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::common::Record;

/// What a row compares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Metric {
    /// Publish throughput (`msgs_per_s`), higher is better.
    Publish,
    /// Delivered msgs/s plus server CPU per delivered message.
    Fanout,
    /// p99 latency, lower is better.
    P99,
    /// Catch-up events/s, higher is better.
    Resume,
    /// SSE RSS per connection against a fixed target (KiB).
    SseRss,
    /// Consumer group: acked events/s plus server CPU per acked event.
    Group,
}

struct Row {
    scenario: String,
    ours: String,
    peer_name: String,
    peer: String,
    metric: Metric,
}

fn row(scenario: String, ours: String, peer_name: &str, peer: String, metric: Metric) -> Row {
    Row {
        scenario,
        ours,
        peer_name: peer_name.to_owned(),
        peer,
        metric,
    }
}

fn rows() -> Vec<Row> {
    use Metric::*;
    let mut rows = Vec::new();
    for p in [128, 4096] {
        let size = if p == 128 { "128 B" } else { "4 KiB" };
        let ours = |mode: &str| format!("publish{p}.ringcast.{mode}");
        let peer = |name: &str| format!("publish{p}.{name}");
        let scen = |what: &str| format!("publish {size}, {what} (msg/s, higher is better)");
        rows.push(row(
            scen("ringcast fsync"),
            ours("fsync"),
            "Redis XADD, appendfsync always",
            peer("redis-xadd.always"),
            Publish,
        ));
        rows.push(row(
            scen("ringcast interval"),
            ours("interval"),
            "Redis XADD, appendfsync everysec",
            peer("redis-xadd.everysec"),
            Publish,
        ));
        rows.push(row(
            scen("ringcast fsync"),
            ours("fsync"),
            "JetStream, file storage",
            peer("jetstream"),
            Publish,
        ));
        rows.push(row(
            scen("ringcast interval"),
            ours("interval"),
            "JetStream, file storage",
            peer("jetstream"),
            Publish,
        ));
        rows.push(row(
            scen("ringcast memory"),
            ours("memory"),
            "NATS core (publish + flush)",
            peer("nats-core"),
            Publish,
        ));
        rows.push(row(
            scen("ringcast memory"),
            ours("memory"),
            "Redis PUBLISH (no AOF)",
            peer("redis-publish"),
            Publish,
        ));
    }
    for s in [1, 10, 100, 1000] {
        let scen = format!(
            "fan-out, {s} subscriber{} (delivered msg/s; server CPU per delivery)",
            if s == 1 { "" } else { "s" }
        );
        rows.push(row(
            scen.clone(),
            format!("fanout{s}.ringcast"),
            "Redis pub/sub",
            format!("fanout{s}.redis"),
            Fanout,
        ));
        rows.push(row(
            scen,
            format!("fanout{s}.ringcast"),
            "NATS core",
            format!("fanout{s}.nats"),
            Fanout,
        ));
    }
    let scen =
        "fan-out, 100 subscribers, SDK `subscription_buffer` 1024 (the default before this round)"
            .to_owned();
    rows.push(row(
        scen.clone(),
        "fanout100.ringcast.buf1k".into(),
        "Redis pub/sub",
        "fanout100.redis".into(),
        Fanout,
    ));
    rows.push(row(
        scen,
        "fanout100.ringcast.buf1k".into(),
        "NATS core",
        "fanout100.nats".into(),
        Fanout,
    ));
    let scen = "publish→receive p99 at 10,000 msg/s (lower is better)".to_owned();
    rows.push(row(
        scen.clone(),
        "latency.ringcast".into(),
        "Redis pub/sub",
        "latency.redis".into(),
        P99,
    ));
    rows.push(row(
        scen,
        "latency.ringcast".into(),
        "NATS core",
        "latency.nats".into(),
        P99,
    ));
    let scen = "resume: catch up 100,000 missed events (events/s)".to_owned();
    rows.push(row(
        scen.clone(),
        "resume.ringcast".into(),
        "Redis Streams XREAD",
        "resume.redis".into(),
        Resume,
    ));
    rows.push(row(
        scen,
        "resume.ringcast".into(),
        "JetStream ordered consumer",
        "resume.jetstream".into(),
        Resume,
    ));
    let scen = "resume, SDK `subscription_buffer` 1024 (the default before this round) (events/s)"
        .to_owned();
    rows.push(row(
        scen.clone(),
        "resume.ringcast.buf1k".into(),
        "Redis Streams XREAD",
        "resume.redis".into(),
        Resume,
    ));
    rows.push(row(
        scen,
        "resume.ringcast.buf1k".into(),
        "JetStream ordered consumer",
        "resume.jetstream".into(),
        Resume,
    ));
    for w in [1, 4] {
        let scen = format!(
            "consumer group, {w} worker{}, ack each (acked events/s; server CPU per ack)",
            if w == 1 { "" } else { "s" }
        );
        for mode in ["fsync", "interval", "memory"] {
            for (peer_name, peer) in [
                ("Redis XREADGROUP + XACK, appendfsync everysec", "redis"),
                (
                    "JetStream pull consumer, AckExplicit, file storage",
                    "jetstream",
                ),
            ] {
                rows.push(row(
                    format!("{scen}, ringcast {mode}"),
                    format!("group{w}.ringcast.{mode}"),
                    peer_name,
                    format!("group{w}.{peer}"),
                    Group,
                ));
            }
        }
    }
    // The cost of access control: the same broker with every client
    // holding an HS256 token, against no auth, in the same run.
    rows.push(row(
        "publish 128 B, ringcast memory, every client with an HS256 token (CPU/msg ratio = the cost of auth)".into(),
        "publish128.ringcast.memory.auth".into(),
        "ringcast memory, no auth",
        "publish128.ringcast.memory".into(),
        Publish,
    ));
    rows.push(row(
        "fan-out, 10 subscribers, every client with an HS256 token".into(),
        "fanout10.ringcast.auth".into(),
        "ringcast, no auth",
        "fanout10.ringcast".into(),
        Fanout,
    ));
    rows.push(row(
        "SSE: server RSS per idle connection".into(),
        "sse.ringcast".into(),
        "target",
        String::new(),
        SseRss,
    ));
    rows
}

/// `12.3k`, `1.23M`.
fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn us(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1} ms", x / 1000.0)
    } else {
        format!("{x:.0} µs")
    }
}

fn lost_note(r: &Record, expected_key: &str) -> String {
    match (r.num("lost"), r.num(expected_key)) {
        (Some(lost), Some(exp)) if lost > 0.0 && exp > 0.0 => {
            format!(", **lost {lost:.0} ({:.2}%)**", lost * 100.0 / exp)
        }
        _ => String::new(),
    }
}

/// ringcast: the broker counted more deliveries than the client kept (the
/// SDK dropped and re-requested them).
fn redelivery_note(r: &Record, kept_key: &str) -> String {
    match (r.num("server_deliveries"), r.num(kept_key)) {
        (Some(sent), Some(kept)) if kept > 0.0 && sent > kept * 1.05 => {
            format!(", **broker sent {:.1}× the events kept**", sent / kept)
        }
        _ => String::new(),
    }
}

fn cell(r: &Record, metric: Metric) -> String {
    let mut s = cell_figures(r, metric);
    if let Some(spread) = r.num("spread") {
        let runs =
            r.0.get("runs")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
        s.push_str(&format!(
            " (median of {runs}, spread {:.0}%)",
            spread * 100.0
        ));
    }
    s
}

fn cell_figures(r: &Record, metric: Metric) -> String {
    let n = |k: &str| r.num(k).unwrap_or(f64::NAN);
    match metric {
        Metric::Publish => {
            let mut s = format!("{} msg/s", si(n("msgs_per_s")));
            if let Some(cpu) = r.num("server_cpu_us_per_msg") {
                s.push_str(&format!(", {cpu:.2} µs CPU/msg"));
            }
            s
        }
        Metric::Fanout => {
            let mut s = format!("{} msg/s", si(n("msgs_per_s")));
            if let Some(cpu) = r.num("server_cpu_us_per_msg") {
                s.push_str(&format!(", {cpu:.2} µs CPU/msg"));
            }
            s + &lost_note(r, "expected") + &redelivery_note(r, "delivered")
        }
        Metric::P99 => format!(
            "p99 {} (p50 {}, p99.9 {}){}",
            us(n("p99_us")),
            us(n("p50_us")),
            us(n("p999_us")),
            lost_note(r, "sent")
        ),
        Metric::Resume => format!(
            "{} events/s{}",
            si(n("events_per_s")),
            redelivery_note(r, "received")
        ),
        Metric::Group => {
            let mut s = format!("{} acked/s", si(n("events_per_s")));
            if let Some(cpu) = r.num("server_cpu_us_per_msg") {
                s.push_str(&format!(", {cpu:.2} µs CPU/ack"));
            }
            match (r.num("acked"), r.num("n")) {
                (Some(a), Some(n)) if a < n => s.push_str(&format!(", **acked {a:.0} of {n:.0}**")),
                _ => {}
            }
            if let Some(k) = r.num("redelivered_seen").filter(|k| *k > 0.0) {
                s.push_str(&format!(", {k:.0} redelivered"));
            }
            s
        }
        Metric::SseRss => format!(
            "{:.2} KiB/conn at {} conns; broadcast p99 {}",
            n("rss_per_conn_kib"),
            si(n("connections")),
            us(n("p99_us"))
        ),
    }
}

/// The main figure of a record and whether higher is better.
fn figure(r: &Record, metric: Metric) -> Option<f64> {
    match metric {
        Metric::Publish | Metric::Fanout => r.num("msgs_per_s"),
        Metric::P99 => r.num("p99_us"),
        Metric::Resume | Metric::Group => r.num("events_per_s"),
        Metric::SseRss => r.num("rss_per_conn_kib"),
    }
}

/// SSE target: at most this many KiB of server RSS per idle connection.
const SSE_TARGET_KIB: f64 = 10.0;
/// Resume target: events/s.
const RESUME_TARGET: f64 = 1_000_000.0;

fn load(path: &str) -> Result<HashMap<String, Record>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let rec = Record(map);
        if let Some(label) = rec.0.get("label").and_then(Value::as_str) {
            out.insert(label.to_owned(), rec);
        }
    }
    Ok(out)
}

/// Prints the table and the targets.
pub fn run(path: &str) -> Result<()> {
    let results = load(path)?;
    println!("| scenario | ringcast | peer | peer figure | ratio ringcast/peer |");
    println!("| --- | --- | --- | --- | --- |");
    for r in rows() {
        let ours = results.get(&r.ours);
        let peer = results.get(&r.peer);
        if r.metric == Metric::SseRss {
            let Some(o) = ours else { continue };
            let ratio = figure(o, r.metric)
                .map(|v| format!("{:.2}× of target", v / SSE_TARGET_KIB))
                .unwrap_or_else(|| "n/a".into());
            println!(
                "| {} | {} | target | ≤ {SSE_TARGET_KIB} KiB/conn | {ratio} |",
                r.scenario,
                cell(o, r.metric)
            );
            continue;
        }
        if ours.is_none() && peer.is_none() {
            continue;
        }
        let ratio = match (
            ours.and_then(|o| figure(o, r.metric)),
            peer.and_then(|p| figure(p, r.metric)),
        ) {
            (Some(a), Some(b)) if b > 0.0 => {
                let mut s = format!("{:.2}×", a / b);
                if matches!(r.metric, Metric::Fanout | Metric::Publish | Metric::Group) {
                    if let (Some(ca), Some(cb)) = (
                        ours.and_then(|o| o.num("server_cpu_us_per_msg")),
                        peer.and_then(|p| p.num("server_cpu_us_per_msg")),
                    ) {
                        if cb > 0.0 {
                            s.push_str(&format!(" (CPU/msg {:.2}×)", ca / cb));
                        }
                    }
                }
                s
            }
            _ => "n/a".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            r.scenario,
            ours.map(|o| cell(o, r.metric))
                .unwrap_or_else(|| "n/a".into()),
            r.peer_name,
            peer.map(|p| cell(p, r.metric))
                .unwrap_or_else(|| "n/a".into()),
            ratio
        );
    }
    println!();
    println!("Targets:");
    let ratio = |a: &str, b: &str, key: &str| ratio_of(&results, a, b, key);
    let verdict = |name: String, r: Option<f64>, higher: bool| match r {
        Some(r) => {
            let met = if higher { r >= 1.0 } else { r <= 1.0 };
            let by = if higher {
                (r - 1.0) * 100.0
            } else {
                (1.0 - r) * 100.0
            };
            println!(
                "- {name}: {:.2}× — {}",
                r,
                if met {
                    format!("met (by {by:.0}%)")
                } else {
                    format!("MISSED (by {:.0}%)", -by)
                }
            );
        }
        None => println!("- {name}: not measured"),
    };
    for p in [128, 4096] {
        for (mode, peer, name) in [
            ("interval", "redis-xadd.everysec", "Redis XADD everysec"),
            ("fsync", "redis-xadd.everysec", "Redis XADD everysec"),
            ("fsync", "jetstream", "JetStream file"),
            ("interval", "jetstream", "JetStream file"),
        ] {
            verdict(
                format!("persisted publish {p} B, ringcast {mode} ≥ {name}"),
                ratio(
                    &format!("publish{p}.ringcast.{mode}"),
                    &format!("publish{p}.{peer}"),
                    "msgs_per_s",
                ),
                true,
            );
        }
    }
    verdict(
        "fan-out with 100 subscribers ≥ Redis pub/sub (delivered msg/s)".into(),
        ratio("fanout100.ringcast", "fanout100.redis", "msgs_per_s"),
        true,
    );
    verdict(
        "p99 at 10,000 msg/s ≤ Redis pub/sub's".into(),
        ratio("latency.ringcast", "latency.redis", "p99_us"),
        false,
    );
    match results.get("sse.ringcast") {
        Some(r) => verdict(
            format!(
                "{} idle SSE connections at ≤ {SSE_TARGET_KIB} KiB RSS each ({:.2} KiB)",
                r.num("connections").unwrap_or(0.0),
                r.num("rss_per_conn_kib").unwrap_or(f64::NAN)
            ),
            r.num("rss_per_conn_kib").map(|v| v / SSE_TARGET_KIB),
            false,
        ),
        None => println!("- SSE RSS per connection: not measured"),
    }
    for w in [1, 4] {
        for mode in ["fsync", "interval"] {
            for (peer, name) in [
                ("redis", "Redis XREADGROUP + XACK (everysec)"),
                ("jetstream", "JetStream pull consumer (file)"),
            ] {
                verdict(
                    format!(
                        "consumer group, {w} worker{}, ringcast {mode} ≥ {name} (acked events/s)",
                        if w == 1 { "" } else { "s" }
                    ),
                    ratio(
                        &format!("group{w}.ringcast.{mode}"),
                        &format!("group{w}.{peer}"),
                        "events_per_s",
                    ),
                    true,
                );
            }
        }
    }
    match results.get("resume.ringcast") {
        Some(r) => verdict(
            format!(
                "resume ≥ 1,000,000 events/s ({} events/s)",
                si(r.num("events_per_s").unwrap_or(0.0))
            ),
            r.num("events_per_s").map(|v| v / RESUME_TARGET),
            true,
        ),
        None => println!("- resume: not measured"),
    }
    issue15_targets(&results);
    storage(&results);
    sse_compression(&results);
    cluster(&results);
    Ok(())
}

/// The systems of the cluster rows (`benches/compare.sh --cluster`): label
/// suffix and name, in table order; the first is the baseline of the ratios.
const CLUSTER_SYSTEMS: [(&str, &str); 6] = [
    ("local.memory", "ringcast local, memory"),
    ("local.interval", "ringcast local, interval"),
    ("local.fsync", "ringcast local, fsync"),
    ("local", "ringcast local, memory"),
    ("redis1", "ringcast redis backend, 1 node"),
    ("redis3", "ringcast redis backend, 3 nodes"),
];

/// "Cluster": the `cluster.<scenario>.<system>` results, each scenario's
/// systems side by side: throughput, ringcastd CPU per message (all nodes
/// together, and each node's own), the shared Redis's CPU per message, and
/// the throughput over the first system's. Printed only when there is one
/// (last, so that `compare.sh --cluster` can cut it out).
fn cluster(results: &HashMap<String, Record>) {
    let mut scenarios: Vec<&str> = results
        .keys()
        .filter_map(|l| l.strip_prefix("cluster."))
        .filter_map(|l| l.split_once('.').map(|(s, _)| s))
        .collect();
    if scenarios.is_empty() {
        return;
    }
    scenarios.sort_by_key(|s| (!s.starts_with("publish"), s.to_string()));
    scenarios.dedup();
    println!();
    println!(
        "Cluster: ringcast's redis backend beside the local backend (Redis: redis-server \
         --save \"\" --appendonly yes --appendfsync everysec; CPU per event published, or per \
         delivery; per node: publish over every event, fan-out over the node's own deliveries):"
    );
    println!();
    println!(
        "| scenario | system | throughput | ringcastd µs CPU/msg (all nodes) | per node \
         | redis-server µs CPU/msg | × first row (throughput) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for scen in scenarios {
        let mut base = None;
        for (suffix, system) in CLUSTER_SYSTEMS {
            let Some(r) = results.get(&format!("cluster.{scen}.{suffix}")) else {
                continue;
            };
            let n = |k: &str| r.num(k).unwrap_or(f64::NAN);
            let nodes = r.num("nodes").unwrap_or(1.0);
            let what = match r.0.get("scenario").and_then(Value::as_str) {
                Some("fanout") => format!(
                    "fan-out {} B, {} subscribers over {nodes} node(s), 1 publisher on node 1 \
                     (delivered msg/s)",
                    n("payload"),
                    n("subscribers")
                ),
                _ => format!(
                    "publish {} B, {} publishers over {nodes} node(s), window {} each \
                     (acked msg/s)",
                    n("payload"),
                    r.num("publishers").unwrap_or(1.0),
                    n("window")
                ),
            };
            let mut throughput = format!("{} msg/s", si(n("msgs_per_s")));
            if let Some(spread) = r.num("spread") {
                let runs =
                    r.0.get("runs")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len);
                throughput.push_str(&format!(
                    " (median of {runs}, spread {:.0}%)",
                    spread * 100.0
                ));
            }
            throughput += &(lost_note(r, "expected") + &redelivery_note(r, "delivered"));
            let per_node =
                r.0.get("server_cpu_us_per_msg_nodes")
                    .and_then(Value::as_array)
                    .map(|v| {
                        v.iter()
                            .filter_map(Value::as_f64)
                            .enumerate()
                            .map(|(i, x)| format!("n{}: {x:.2}", i + 1))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_else(|| "—".into());
            let figure = r.num("msgs_per_s");
            let base_fig = *base.get_or_insert(figure);
            let ratio = match (figure, base_fig) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
                _ => "n/a".into(),
            };
            let opt = |k: &str| r.num(k).map_or("n/a".into(), |v| format!("{v:.2}"));
            println!(
                "| {what} | {system}{} | {throughput} | {} | {per_node} | {} | {ratio} |",
                if suffix.starts_with("redis") {
                    " (Redis AOF everysec)"
                } else {
                    ""
                },
                opt("server_cpu_us_per_msg"),
                opt("backend_cpu_us_per_msg"),
            );
        }
    }
}

/// "SSE compression": every `sse` result with a stream phase (`--events`),
/// by label: wire bytes and broker CPU per event delivered, each with its
/// ratio to identity from the same run. Printed only when there is one.
fn sse_compression(results: &HashMap<String, Record>) {
    let mut rows: Vec<(&String, &Record)> = results
        .iter()
        .filter(|(_, r)| r.num("wire_bytes_per_event").is_some())
        .collect();
    if rows.is_empty() {
        return;
    }
    rows.sort_by(|a, b| a.0.cmp(b.0));
    println!();
    println!("SSE compression (per event delivered; ratios to identity of the same run):");
    println!();
    println!(
        "| label | coding | topics | events/chunk | wire bytes/event | × identity \
         | broker µs CPU/event | × identity | runs (µs CPU/event) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (label, r) in rows {
        let n = |k: &str| r.num(k).unwrap_or(f64::NAN);
        let ratio = |k: &str| r.num(k).map_or("n/a".into(), |v| format!("{v:.2}×"));
        let runs =
            r.0.get("runs")
                .and_then(Value::as_array)
                .map(|v| {
                    v.iter()
                        .filter_map(Value::as_f64)
                        .map(|x| format!("{x:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
        println!(
            "| {label} | {} | {} | {:.1} | {:.1} | {} | {:.2} | {} | {runs} |",
            r.0.get("coding").and_then(Value::as_str).unwrap_or("?"),
            n("topics"),
            n("events_per_chunk"),
            n("wire_bytes_per_event"),
            ratio("wire_vs_identity"),
            n("server_cpu_us_per_event"),
            ratio("cpu_vs_identity"),
        );
    }
}

/// `key` of the result labelled `a` over the same of `b`.
fn ratio_of(results: &HashMap<String, Record>, a: &str, b: &str, key: &str) -> Option<f64> {
    Some(results.get(a)?.num(key)? / results.get(b)?.num(key)?)
}

/// The targets of issue 15 (persisted and memory publish, fan-out CPU,
/// resume), each a ratio against its goal, from the same run.
fn issue15_targets(results: &HashMap<String, Record>) {
    let ratio = |a: &str, b: &str, key: &str| ratio_of(results, a, b, key);
    println!();
    println!("Issue 15 targets (ratio ringcast / peer; goal):");
    let goal = |name: &str, r: Option<f64>, goal: f64, higher: bool| {
        let Some(r) = r else {
            println!("- {name}: not measured");
            return;
        };
        let met = if higher { r >= goal } else { r <= goal };
        let sign = if higher { "≥" } else { "≤" };
        println!(
            "- {name}: {r:.2}× (goal {sign} {goal}×) — {}",
            if met { "met" } else { "MISSED" }
        );
    };
    let msgs = "msgs_per_s";
    let cpu = "server_cpu_us_per_msg";
    goal(
        "128 B, interval vs Redis XADD everysec (msg/s)",
        ratio(
            "publish128.ringcast.interval",
            "publish128.redis-xadd.everysec",
            msgs,
        ),
        1.0,
        true,
    );
    goal(
        "128 B, fsync vs Redis XADD always (msg/s)",
        ratio(
            "publish128.ringcast.fsync",
            "publish128.redis-xadd.always",
            msgs,
        ),
        1.5,
        true,
    );
    goal(
        "4 KiB, interval vs Redis XADD everysec (msg/s)",
        ratio(
            "publish4096.ringcast.interval",
            "publish4096.redis-xadd.everysec",
            msgs,
        ),
        1.0,
        true,
    );
    goal(
        "4 KiB, interval vs JetStream file (msg/s)",
        ratio(
            "publish4096.ringcast.interval",
            "publish4096.jetstream",
            msgs,
        ),
        1.0,
        true,
    );
    goal(
        "4 KiB, fsync vs JetStream file (msg/s)",
        ratio("publish4096.ringcast.fsync", "publish4096.jetstream", msgs),
        1.0,
        true,
    );
    goal(
        "128 B, memory vs Redis PUBLISH (msg/s)",
        ratio(
            "publish128.ringcast.memory",
            "publish128.redis-publish",
            msgs,
        ),
        1.0,
        true,
    );
    goal(
        "fan-out, 1 subscriber, server CPU per delivery vs Redis pub/sub",
        ratio("fanout1.ringcast", "fanout1.redis", cpu),
        1.0,
        false,
    );
    goal(
        "fan-out, 1 subscriber, server CPU per delivery vs NATS core",
        ratio("fanout1.ringcast", "fanout1.nats", cpu),
        1.0,
        false,
    );
    goal(
        "fan-out, 10 subscribers, server CPU per delivery vs NATS core",
        ratio("fanout10.ringcast", "fanout10.nats", cpu),
        1.0,
        false,
    );
    goal(
        "resume of 100,000 missed events vs 1 M events/s",
        results
            .get("resume.ringcast")
            .and_then(|r| r.num("events_per_s"))
            .map(|v| v / RESUME_TARGET),
        1.0,
        true,
    );
}

/// Goals of issue 15 for persisted publish (ringcast; peers for reference).
const WRITE_AMP_GOAL: f64 = 1.5;
const DISK_GOAL: f64 = 1.5;
const RSS_GOAL: f64 = 1.3;

/// Below this (× the payload), a peer's storage figure is noise: no ratio.
const MIN_DENOMINATOR: f64 = 0.05;

/// The persisted publish rows: label suffix and system.
const PERSISTED: [(&str, &str); 5] = [
    ("ringcast.fsync", "ringcast fsync"),
    ("ringcast.interval", "ringcast interval"),
    ("redis-xadd.always", "Redis XADD, appendfsync always"),
    ("redis-xadd.everysec", "Redis XADD, appendfsync everysec"),
    ("jetstream", "JetStream, file storage"),
];

/// ringcast row, peer row: the pairs of the main table.
const PERSISTED_PAIRS: [(&str, &str); 4] = [
    ("ringcast.fsync", "redis-xadd.always"),
    ("ringcast.interval", "redis-xadd.everysec"),
    ("ringcast.fsync", "jetstream"),
    ("ringcast.interval", "jetstream"),
];

/// The storage figures of a publish record, in table order.
const STORAGE_KEYS: [(&str, &str, f64); 3] = [
    ("write_amp", "disk_write_bytes", WRITE_AMP_GOAL),
    ("disk_per_retained", "disk_bytes", DISK_GOAL),
    ("rss_per_retained", "rss_delta_bytes", RSS_GOAL),
];

/// `12.3 MiB`.
fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / 1_048_576.0)
}

/// A storage ratio with the bytes behind it, in bold when over its goal.
fn storage_cell(r: &Record, key: &str, bytes_key: &str, goal: f64) -> String {
    match r.num(key) {
        Some(v) => {
            let v_s = if v > goal {
                format!("**{v:.2}×**")
            } else {
                format!("{v:.2}×")
            };
            match r.num(bytes_key) {
                Some(b) => format!("{v_s} ({})", mib(b)),
                None => v_s,
            }
        }
        None => "n/a".into(),
    }
}

/// "Storage cost of persisted publish": per persisted publish row, what the
/// server wrote to storage per payload byte published, and what its data
/// directory and its RSS grew by per payload byte retained; then ringcast
/// over each peer. Printed only when some row was measured with
/// `--data-dir` (so `--groups` and `--auth` output is unchanged).
fn storage(results: &HashMap<String, Record>) {
    let measured = |label: &str| {
        results
            .get(label)
            .filter(|r| r.num("retained_payload_bytes").is_some())
    };
    let sizes = [(128, "128 B"), (4096, "4 KiB")];
    let any = sizes.iter().any(|(p, _)| {
        PERSISTED
            .iter()
            .any(|(l, _)| measured(&format!("publish{p}.{l}")).is_some())
    });
    if !any {
        return;
    }
    println!();
    println!(
        "Storage cost of persisted publish (goals for ringcast: write amplification ≤ \
         {WRITE_AMP_GOAL}×, disk ≤ {DISK_GOAL}× and RSS ≤ {RSS_GOAL}× the retained payload; \
         above a goal in bold):"
    );
    println!();
    println!(
        "| system | payload | msg/s | write amplification (written ÷ published) \
         | disk ÷ retained | RSS ÷ retained | retained payload |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (p, size) in sizes {
        for (label, system) in PERSISTED {
            let Some(r) = measured(&format!("publish{p}.{label}")) else {
                continue;
            };
            let cells: Vec<String> = STORAGE_KEYS
                .iter()
                .map(|(k, b, goal)| storage_cell(r, k, b, *goal))
                .collect();
            println!(
                "| {system} | {size} | {} msg/s | {} | {} | {} | {} events, {} |",
                si(r.num("msgs_per_s").unwrap_or(f64::NAN)),
                cells[0],
                cells[1],
                cells[2],
                si(r.num("retained_events").unwrap_or(f64::NAN)),
                mib(r.num("retained_payload_bytes").unwrap_or(f64::NAN))
            );
        }
    }
    println!();
    println!("Ratios ringcast / peer (below 1 is better):");
    println!();
    println!(
        "| payload | ringcast | peer | write amplification | disk ÷ retained | RSS ÷ retained |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let name = |label: &'static str| -> &'static str {
        PERSISTED
            .iter()
            .find(|(l, _)| *l == label)
            .map_or(label, |(_, n)| *n)
    };
    for (p, size) in sizes {
        for (ours, peer) in PERSISTED_PAIRS {
            let (o, q) = (
                measured(&format!("publish{p}.{ours}")),
                measured(&format!("publish{p}.{peer}")),
            );
            if o.is_none() && q.is_none() {
                continue;
            }
            let ratios: Vec<String> = STORAGE_KEYS
                .iter()
                .map(
                    |(k, _, _)| match (o.and_then(|o| o.num(k)), q.and_then(|q| q.num(k))) {
                        // A peer figure about zero (e.g. a Go heap reusing what the
                        // previous row freed) gives no meaningful ratio.
                        (Some(a), Some(b)) if b >= MIN_DENOMINATOR => format!("{:.2}×", a / b),
                        (Some(_), Some(_)) => format!("n/a (peer < {MIN_DENOMINATOR}×)"),
                        _ => "n/a".into(),
                    },
                )
                .collect();
            println!(
                "| {size} | {} | {} | {} | {} | {} |",
                name(ours),
                name(peer),
                ratios[0],
                ratios[1],
                ratios[2]
            );
        }
    }
}
