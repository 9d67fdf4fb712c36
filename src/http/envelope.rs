//! The JSON envelope of an event, shared by SSE `data:` and history.
//!
//! `{"topic", "type", "version", "offset", "ts", "headers": {..}, "data"}`:
//! `data` is the payload inline when it is JSON, a string when it is UTF-8,
//! and base64 (with `"encoding": "base64"`) otherwise. Epochs are written as
//! decimal strings everywhere in JSON: they are 64-bit and JavaScript numbers
//! are not.

use base64::Engine as _;
use serde_json::json;
use serde_json::value::RawValue;

use crate::engine::{Event, Gap};

/// Writes the envelope of `event` on `topic` as one line of JSON.
pub(crate) fn event_json(topic: &str, event: &Event) -> String {
    let mut out = Vec::with_capacity(event.payload.len() + 128);
    write_event(&mut out, topic, event);
    // Only JSON text (escaped strings, valid raw JSON) was written.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends the envelope of `event` on `topic` to `out` as JSON text, with
/// no intermediate `Value` tree.
pub(crate) fn write_event(out: &mut Vec<u8>, topic: &str, event: &Event) {
    out.extend_from_slice(b"{\"topic\":");
    write_str(out, topic);
    out.extend_from_slice(b",\"type\":");
    write_str(out, &event.event_type);
    out.extend_from_slice(
        format!(
            ",\"version\":{},\"offset\":{},\"ts\":{},\"headers\":{{",
            event.version, event.offset, event.timestamp_ms
        )
        .as_bytes(),
    );
    for (i, (k, v)) in event.headers.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        write_str(out, v);
    }
    out.extend_from_slice(b"},\"data\":");
    match payload_data(&event.payload) {
        Data::Json(raw) => {
            // Valid JSON holds a line break only as whitespace between
            // tokens (never raw inside a string), and an SSE data line must
            // not hold one: dropping CR and LF keeps the value and one line.
            out.extend(raw.get().bytes().filter(|b| !matches!(b, b'\n' | b'\r')));
        }
        Data::Text(s) => write_str(out, s),
        Data::Base64(s) => {
            write_str(out, &s);
            out.extend_from_slice(b",\"encoding\":\"base64\"");
        }
    }
    out.push(b'}');
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

enum Data<'a> {
    Json(&'a RawValue),
    Text(&'a str),
    Base64(String),
}

fn payload_data(payload: &[u8]) -> Data<'_> {
    if let Ok(raw) = serde_json::from_slice::<&RawValue>(payload) {
        return Data::Json(raw);
    }
    match std::str::from_utf8(payload) {
        Ok(s) => Data::Text(s),
        Err(_) => Data::Base64(base64::engine::general_purpose::STANDARD.encode(payload)),
    }
}

/// The JSON body of an `event: gap`.
pub(crate) fn gap_json(gap: &Gap) -> String {
    json!({
        "topic": gap.topic,
        "type": gap.event_type,
        "reason": gap.reason.as_str(),
        "epoch": gap.epoch.to_string(),
        "requested": gap.requested,
        "first_available": gap.first_available,
        "current": gap.current,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use serde_json::Value;

    use super::*;

    fn event(payload: &'static [u8]) -> Event {
        Event::new(
            3,
            2,
            1_700_000_000_000,
            Arc::from("created"),
            vec![("user-id".into(), "u1".into())],
            Bytes::from_static(payload),
        )
    }

    #[test]
    fn json_payloads_are_inline_text_is_a_string_and_binary_is_base64() {
        let v: Value = serde_json::from_str(&event_json("t", &event(b"{\"a\":\n 1}"))).unwrap();
        assert_eq!(v["data"], json!({"a": 1}));
        assert_eq!(v["headers"]["user-id"], "u1");
        assert_eq!(
            (v["offset"].as_u64(), v["version"].as_u64()),
            (Some(3), Some(2))
        );
        assert!(v.get("encoding").is_none());
        let v: Value = serde_json::from_str(&event_json("t", &event(b"hello there"))).unwrap();
        assert_eq!(v["data"], "hello there");
        let v: Value = serde_json::from_str(&event_json("t", &event(b"\xff\x00"))).unwrap();
        assert_eq!(
            (v["data"].as_str(), v["encoding"].as_str()),
            (Some("/wA="), Some("base64"))
        );
    }

    #[test]
    fn envelopes_are_one_line() {
        assert!(!event_json("t", &event(b"[1,\n2]")).contains('\n'));
        assert!(!event_json("t", &event(b"line\nbreak")).contains('\n'));
        assert!(!event_json("t", &event(b"{\"a\":\r\n\"x\\ny\"}")).contains('\n'));
    }

    #[test]
    fn raw_json_keeps_its_value_and_strings_their_escapes() {
        let v: Value = serde_json::from_str(&event_json(
            "t",
            &event(b" {\"s\": \"a\\nb\",\r\n \"n\": [1, 2.5]} "),
        ))
        .unwrap();
        assert_eq!(v["data"], json!({"s": "a\nb", "n": [1, 2.5]}));
    }
}
