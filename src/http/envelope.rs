//! The JSON envelope of an event, shared by SSE `data:` and history.
//!
//! `{"topic", "type", "version", "offset", "ts", "headers": {..}, "data"}`:
//! `data` is the payload inline when it is JSON, a string when it is UTF-8,
//! and base64 (with `"encoding": "base64"`) otherwise. Epochs are written as
//! decimal strings everywhere in JSON: they are 64-bit and JavaScript numbers
//! are not.

use base64::Engine as _;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::engine::{Event, Gap};

/// Writes the envelope of `event` on `topic` as one line of JSON.
pub(crate) fn event_json(topic: &str, event: &Event) -> String {
    let headers: Map<String, Value> = event
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let mut envelope = json!({
        "topic": topic,
        "type": &*event.event_type,
        "version": event.version,
        "offset": event.offset,
        "ts": event.timestamp_ms,
        "headers": headers,
    });
    let map = envelope
        .as_object_mut()
        .expect("json! of an object literal is an object");
    match payload_data(&event.payload) {
        Data::Json(raw) => {
            // Re-serialised compactly: raw JSON may hold newlines, and an SSE
            // data line must not.
            let value: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
            map.insert("data".into(), value);
        }
        Data::Text(s) => {
            map.insert("data".into(), Value::String(s.to_owned()));
        }
        Data::Base64(s) => {
            map.insert("data".into(), Value::String(s));
            map.insert("encoding".into(), Value::String("base64".into()));
        }
    }
    envelope.to_string()
}

/// The envelope as a JSON value (for history pages).
pub(crate) fn event_value(topic: &str, event: &Event) -> Value {
    serde_json::from_str(&event_json(topic, event)).unwrap_or(Value::Null)
}

enum Data<'a> {
    Json(Box<RawValue>),
    Text(&'a str),
    Base64(String),
}

fn payload_data(payload: &[u8]) -> Data<'_> {
    if let Ok(raw) = serde_json::from_slice::<Box<RawValue>>(payload) {
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
    }
}
