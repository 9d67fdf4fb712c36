//! JSON rendering of what the broker returns.
//!
//! Events use the same envelope as the SSE bridge: `topic`, `type`,
//! `version`, `offset`, `ts`, `headers`, `data` — the payload inline when it
//! is JSON, else a string when it is UTF-8, else base64 with
//! `"encoding":"base64"`. `epoch` is added so that a line is enough to resume
//! with `--after-offset EPOCH:OFFSET`.

use ringcast_client::{
    Ack, AppendAck, GapReason, GroupOptions, GroupStart, TopicSummary, WireConnection, WireEvent,
    WireGap, WireGroupInfo, WirePending, WireTopicInfo,
};
use serde_json::{json, Map, Value};

/// The payload as JSON `data`, plus the `encoding` to announce, if any.
pub fn payload(bytes: &[u8]) -> (Value, Option<&'static str>) {
    if let Ok(value) = serde_json::from_slice::<Value>(bytes) {
        return (value, None);
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => (Value::String(text.to_owned()), None),
        Err(_) => (Value::String(base64(bytes)), Some("base64")),
    }
}

/// Headers as a JSON object (a repeated name keeps its last value).
fn headers(pairs: &[(String, String)]) -> Value {
    let map: Map<String, Value> = pairs
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    Value::Object(map)
}

/// One event line.
pub fn event(event: &WireEvent, epoch: u64) -> Value {
    let (data, encoding) = payload(&event.payload);
    let mut out = json!({
        "topic": event.topic,
        "type": event.event_type,
        "version": event.version,
        "offset": event.offset,
        "epoch": epoch,
        "ts": event.timestamp_ms,
        "headers": headers(&event.headers),
        "data": data,
    });
    if let Some(encoding) = encoding {
        out["encoding"] = Value::String(encoding.to_owned());
    }
    out
}

/// A gap reason as written in docs and by the SSE bridge.
pub fn reason(reason: GapReason) -> &'static str {
    match reason {
        GapReason::Retention => "retention",
        GapReason::EpochChanged => "epoch_changed",
        GapReason::SlowConsumer => "slow_consumer",
    }
}

/// A gap line: `{"gap":{...}}`.
pub fn gap(gap: &WireGap) -> Value {
    json!({
        "gap": {
            "topic": gap.topic,
            "type": gap.event_type,
            "reason": reason(gap.reason),
            "epoch": gap.epoch,
            "requested": gap.requested,
            "first_available": gap.first_available,
            "current": gap.current,
        }
    })
}

/// An end line: `{"end":{...}}`.
pub fn end(topic: &str, last_offset: u64) -> Value {
    json!({ "end": { "topic": topic, "last_offset": last_offset } })
}

/// An ack line.
pub fn ack(ack: &Ack) -> Value {
    json!({ "epoch": ack.epoch, "offset": ack.offset, "version": ack.version })
}

/// An ack line that says whether the event was a duplicate.
pub fn append_ack(ack: &AppendAck) -> Value {
    json!({
        "epoch": ack.epoch,
        "offset": ack.offset,
        "version": ack.version,
        "duplicate": ack.duplicate,
    })
}

/// One topic of `topics`.
pub fn topic_summary(t: &TopicSummary) -> Value {
    json!({
        "name": t.name,
        "epoch": t.epoch,
        "last_offset": t.last_offset,
        "sealed": t.sealed,
    })
}

/// The `info` object.
pub fn topic_info(info: &WireTopicInfo) -> Value {
    let versions: Map<String, Value> = info
        .versions
        .iter()
        .map(|(t, v)| (t.clone(), Value::from(*v)))
        .collect();
    json!({
        "name": info.name,
        "epoch": info.epoch,
        "first_offset": info.first_offset,
        "last_offset": info.last_offset,
        "versions": versions,
        "max_events": info.max_events,
        "max_age_ms": info.max_age_ms,
        "max_bytes": info.max_bytes,
        "retained_events": info.retained_events,
        "retained_bytes": info.retained_bytes,
        "subscribers": info.subscribers,
        "sealed": info.sealed,
    })
}

/// One job line of `group consume`: the event line plus `attempt`.
pub fn job(e: &WireEvent, epoch: u64, attempt: u32) -> Value {
    let mut line = event(e, epoch);
    line["attempt"] = Value::from(attempt);
    line
}

/// A group's start: `"earliest"`, `"live"` or `{"after_offset": N}`.
fn group_start(start: GroupStart) -> Value {
    match start {
        GroupStart::Earliest => json!("earliest"),
        GroupStart::Live => json!("live"),
        GroupStart::AfterOffset(n) => json!({ "after_offset": n }),
    }
}

/// A group's settings.
pub fn group_options(o: &GroupOptions) -> Value {
    json!({
        "start": group_start(o.start),
        "ack_wait_ms": o.ack_wait_ms,
        "max_deliver": o.max_deliver,
        "backoff_ms": o.backoff_ms,
        "max_ack_pending": o.max_ack_pending,
        "dead_letter_topic": o.dead_letter_topic,
    })
}

/// One pending event of a group.
pub fn pending(p: &WirePending) -> Value {
    json!({
        "offset": p.offset,
        "attempt": p.attempt,
        "consumer": p.consumer,
        "due_in_ms": p.due_in_ms,
        "first_delivered_ms": p.first_delivered_ms,
    })
}

/// A group, without its pending sample (`group ls`).
pub fn group_summary(g: &WireGroupInfo) -> Value {
    let members: Vec<Value> = g
        .members
        .iter()
        .map(|m| {
            json!({
                "consumer": m.consumer,
                "sessions": m.sessions,
                "in_flight": m.in_flight,
                "max_in_flight": m.max_in_flight,
                "idle_ms": m.idle_ms,
            })
        })
        .collect();
    json!({
        "topic": g.topic,
        "group": g.group,
        "options": group_options(&g.options),
        "dead_letter_topic": g.dead_letter_topic,
        "epoch": g.epoch,
        "ack_floor": g.ack_floor,
        "next_offset": g.next_offset,
        "last_offset": g.last_offset,
        "lag": g.lag,
        "pending": g.pending,
        "in_flight": g.in_flight,
        "oldest_pending_ms": g.oldest_pending_ms,
        "members": members,
        "delivered": g.delivered,
        "redelivered": g.redelivered,
        "acked": g.acked,
        "dead_lettered": g.dead_lettered,
        "lost": g.lost,
    })
}

/// A group with its oldest pending events (`group info`, `group create`).
pub fn group_info(g: &WireGroupInfo) -> Value {
    let mut out = group_summary(g);
    out["pending_sample"] = Value::Array(g.pending_sample.iter().map(pending).collect());
    out
}

/// Standard base64 with padding (RFC 4648 §4).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> shift & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A connection of `ringcast conns --json`.
pub fn connection(c: &WireConnection) -> Value {
    let subscriptions: Vec<Value> = c
        .subscriptions
        .iter()
        .map(|s| {
            json!({
                "topic": s.topic,
                "subscription_id": s.subscription_id,
                "group": s.group,
                "epoch": s.epoch,
                "position": s.position,
                "lag": s.lag,
                "delivered": s.delivered,
            })
        })
        .collect();
    json!({
        "id": c.id,
        "kind": c.kind,
        "peer": c.peer,
        "subject": c.subject,
        "since_ms": c.since_ms,
        "delivered": c.delivered,
        "subscriptions": subscriptions,
    })
}

/// `ringcast conns` as a table: one row per connection, then one indented
/// row per subscription (`#id` for TCP, `group:` for a membership).
pub fn connections_table(list: &[WireConnection], now_ms: u64) -> String {
    let mut rows: Vec<[String; 7]> = vec![[
        "ID".into(),
        "KIND".into(),
        "PEER".into(),
        "SUBJECT".into(),
        "AGE".into(),
        "DELIVERED".into(),
        "SUBS".into(),
    ]];
    let mut subs: Vec<Vec<String>> = vec![Vec::new()];
    for c in list {
        rows.push([
            c.id.to_string(),
            c.kind.clone(),
            c.peer.clone(),
            c.subject.clone().unwrap_or_else(|| "-".into()),
            age(now_ms.saturating_sub(c.since_ms)),
            c.delivered.to_string(),
            c.subscriptions.len().to_string(),
        ]);
        subs.push(
            c.subscriptions
                .iter()
                .map(|s| {
                    let id = s
                        .subscription_id
                        .map_or(String::new(), |id| format!(" #{id}"));
                    let group = s
                        .group
                        .as_ref()
                        .map_or(String::new(), |g| format!(" group:{g}"));
                    format!(
                        "  {}{id}{group}  position {}  lag {}  delivered {}",
                        s.topic, s.position, s.lag, s.delivered
                    )
                })
                .collect(),
        );
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (row, subs) in rows.iter().zip(&subs) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        for line in subs {
            out.push_str(line);
            out.push('\n');
        }
    }
    if list.is_empty() {
        out.push_str("(no connections)\n");
    }
    out
}

/// A duration in ms as `4s`, `12m`, `3h`, `2d`.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringcast_client::Bytes;

    fn wire_event(payload: &'static [u8]) -> WireEvent {
        WireEvent {
            topic: "orders".into(),
            offset: 7,
            event_type: "created".into(),
            version: 3,
            timestamp_ms: 1_700_000_000_000,
            headers: vec![("trace".into(), "t1".into())],
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn json_payloads_are_inlined() {
        assert_eq!(payload(br#"{"id":1}"#), (json!({"id": 1}), None));
        assert_eq!(payload(b" [1, 2] "), (json!([1, 2]), None));
        assert_eq!(payload(b"42"), (json!(42), None));
        assert_eq!(payload(br#""quoted""#), (json!("quoted"), None));
    }

    #[test]
    fn utf8_payloads_that_are_not_json_become_strings() {
        assert_eq!(payload(b"hello world"), (json!("hello world"), None));
        assert_eq!(payload("héllo".as_bytes()), (json!("héllo"), None));
        assert_eq!(payload(b""), (json!(""), None));
        assert_eq!(payload(b"{not json"), (json!("{not json"), None));
    }

    #[test]
    fn binary_payloads_become_base64() {
        assert_eq!(
            payload(&[0xff, 0x00, 0xfe]),
            (json!("/wD+"), Some("base64"))
        );
    }

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn an_event_line_has_the_sse_envelope_fields() {
        let line = event(&wire_event(br#"{"id":1}"#), 99);
        assert_eq!(
            line,
            json!({
                "topic": "orders", "type": "created", "version": 3, "offset": 7,
                "epoch": 99, "ts": 1_700_000_000_000u64,
                "headers": {"trace": "t1"}, "data": {"id": 1}
            })
        );
        let binary = event(&wire_event(&[0x80]), 99);
        assert_eq!(binary["data"], json!("gA=="));
        assert_eq!(binary["encoding"], json!("base64"));
    }

    #[test]
    fn large_epochs_are_printed_exactly() {
        let line = event(&wire_event(b"{}"), u64::MAX).to_string();
        assert!(line.contains("\"epoch\":18446744073709551615"), "{line}");
    }

    #[test]
    fn gaps_and_ends_are_wrapped_in_their_kind() {
        let g = WireGap {
            topic: "orders".into(),
            event_type: None,
            reason: GapReason::EpochChanged,
            epoch: 5,
            requested: 10,
            first_available: 1,
            current: 3,
        };
        assert_eq!(
            gap(&g),
            json!({"gap": {"topic": "orders", "type": null, "reason": "epoch_changed",
                "epoch": 5, "requested": 10, "first_available": 1, "current": 3}})
        );
        assert_eq!(
            end("orders", 12),
            json!({"end": {"topic": "orders", "last_offset": 12}})
        );
    }

    #[test]
    fn a_job_line_is_the_event_line_with_its_attempt() {
        let line = job(&wire_event(b"{}"), 4, 2);
        assert_eq!(line["attempt"], json!(2));
        assert_eq!(line["offset"], json!(7));
        assert_eq!(line["epoch"], json!(4));
    }

    #[test]
    fn group_settings_name_their_units() {
        let o = GroupOptions {
            start: GroupStart::AfterOffset(9),
            backoff_ms: vec![1000, 5000],
            ..GroupOptions::default()
        };
        assert_eq!(
            group_options(&o),
            json!({"start": {"after_offset": 9}, "ack_wait_ms": 30000, "max_deliver": 5,
                "backoff_ms": [1000, 5000], "max_ack_pending": 1000, "dead_letter_topic": null})
        );
        assert_eq!(group_start(GroupStart::Live), json!("live"));
    }

    #[test]
    fn acks_are_epoch_offset_version() {
        let line = ack(&Ack {
            epoch: 1,
            offset: 2,
            version: 3,
        })
        .to_string();
        assert_eq!(line, r#"{"epoch":1,"offset":2,"version":3}"#);
    }
}
