//! Compressed SSE streams against the real broker: `Accept-Encoding: gzip`
//! and `br` get a compressed body, smaller on the wire than the same stream
//! in plain text, that decodes event by event as the bytes arrive, and an
//! event published to an idle stream decodes at once, long before the next
//! heartbeat could push it out of a buffering compressor.
//!
//! The client is `reqwest` with its own decompression off, so the test sees
//! the bytes on the wire (less the HTTP/1.1 chunk framing).

mod common;

use std::io::Write;
use std::time::Duration;

use brotli::enc::StandardAlloc;
use common::{config, within};
use reqwest::StatusCode;
use ringcast::broker::Broker;
use ringcast::config::Durability;
use serde_json::json;

/// Longer than any wait below: a heartbeat never pushes an event out here.
const HEARTBEAT: Duration = Duration::from_secs(60);
/// How long an event published to an idle stream may take to decode.
const PROMPT: Duration = Duration::from_secs(10);
const EVENTS: u64 = 40;
const PATH: &str = "/v1/topics/orders/events?earliest=true";

struct Api {
    _broker: Broker,
    http: reqwest::Client,
    base: String,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), Durability::Memory);
        config.server.heartbeat = HEARTBEAT;
        config.validate().expect("test config is valid");
        let broker = common::start(config).await;
        let base = format!("http://{}", broker.http_addr());
        // Without these a dependency enabling reqwest's decompression would
        // hide the encoded bytes.
        let http = reqwest::Client::builder()
            .no_proxy()
            .no_gzip()
            .no_brotli()
            .no_deflate()
            .build()
            .expect("HTTP client");
        Self {
            _broker: broker,
            http,
            base,
            _dir: dir,
        }
    }

    /// Publishes an `order.created` event for order `n`.
    async fn publish(&self, n: u64) {
        let body = json!({
            "id": format!("o-{n}"),
            "customer": format!("c-{}", n * 13 % 71),
            "amount": (n * 37 % 500) as f64 + 0.5,
            "currency": "EUR",
            "items": [{"sku": format!("SKU-{}", 1000 + n % 97), "qty": n % 5 + 1}],
        });
        let (status, ack) = common::http::send_json(
            self.http
                .post(format!(
                    "{}/v1/topics/orders/events?type=order.created",
                    self.base
                ))
                .body(body.to_string()),
            20,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "publish refused: {ack}");
    }

    /// Opens the SSE stream with `Accept-Encoding: accept` (none if `None`).
    async fn open(&self, accept: Option<&str>) -> Stream {
        let mut request = self
            .http
            .get(format!("{}{PATH}", self.base))
            .header("accept", "text/event-stream");
        if let Some(accept) = accept {
            request = request.header("accept-encoding", accept);
        }
        let response = within(20, request.send()).await.expect("SSE request sent");
        assert_eq!(response.status(), StatusCode::OK);
        let encoding = response
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            encoding.as_deref(),
            accept,
            "Content-Encoding of a stream asked with Accept-Encoding {accept:?} \
             (the SSE handler must build its response with http::compress::sse_response)"
        );
        // Other layers (CORS) add Vary lines of their own.
        let vary: Vec<&str> = response
            .headers()
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert!(
            vary.iter()
                .flat_map(|v| v.split(','))
                .any(|name| name.trim().eq_ignore_ascii_case("accept-encoding")),
            "Vary: {vary:?} (the SSE handler must build its response with \
             http::compress::sse_response)"
        );
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Stream {
            decoder: accept.map(Decoder::new),
            response,
            wire: 0,
            text: Vec::new(),
        }
    }
}

/// An SSE response read chunk by chunk, decoded as the chunks arrive.
struct Stream {
    response: reqwest::Response,
    decoder: Option<Decoder>,
    /// Body bytes received (compressed, if it is).
    wire: usize,
    /// The SSE text decoded so far.
    text: Vec<u8>,
}

impl Stream {
    /// Reads until the decoded text holds `n` complete `order.created`
    /// events; never sleeps, only awaits bytes.
    async fn until_events(&mut self, n: usize) {
        while count_events(&self.text) < n {
            let chunk = self
                .response
                .chunk()
                .await
                .expect("body read")
                .expect("the stream stays open");
            self.wire += chunk.len();
            match &mut self.decoder {
                Some(d) => self.text.extend(d.feed(&chunk)),
                None => self.text.extend_from_slice(&chunk),
            }
        }
    }
}

/// The complete `order.created` messages in SSE text (the prelude may
/// differ between two streams).
fn events(text: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(text);
    let complete = text.rfind("\n\n").map_or("", |end| &text[..end]);
    complete
        .split("\n\n")
        .filter(|block| block.lines().any(|l| l == "event: order.created"))
        .map(str::to_owned)
        .collect()
}

fn count_events(text: &[u8]) -> usize {
    events(text).len()
}

/// Decodes a compressed body as it arrives.
enum Decoder {
    Gzip(Box<flate2::write::GzDecoder<Vec<u8>>>),
    Brotli(Box<brotli::BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>>),
}

impl Decoder {
    fn new(coding: &str) -> Self {
        match coding {
            "gzip" => Decoder::Gzip(Box::new(flate2::write::GzDecoder::new(Vec::new()))),
            "br" => Decoder::Brotli(Box::new(brotli::BrotliState::new(
                StandardAlloc::default(),
                StandardAlloc::default(),
                StandardAlloc::default(),
            ))),
            other => panic!("no decoder for {other}"),
        }
    }

    /// What `bytes` complete, decoded.
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        match self {
            Decoder::Gzip(d) => {
                d.write_all(bytes).expect("gzip decodes");
                d.flush().expect("gzip decodes");
                std::mem::take(d.get_mut())
            }
            Decoder::Brotli(state) => {
                let mut out = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                let (mut available_in, mut in_offset, mut total) = (bytes.len(), 0, 0);
                loop {
                    let (mut available_out, mut out_offset) = (buf.len(), 0);
                    let result = brotli::BrotliDecompressStream(
                        &mut available_in,
                        &mut in_offset,
                        bytes,
                        &mut available_out,
                        &mut out_offset,
                        &mut buf,
                        &mut total,
                        state,
                    );
                    out.extend_from_slice(&buf[..out_offset]);
                    match result {
                        brotli::BrotliResult::NeedsMoreOutput => continue,
                        brotli::BrotliResult::ResultFailure => panic!("brotli decode failed"),
                        _ => return out,
                    }
                }
            }
        }
    }
}

/// The whole check for one coding.
async fn compressed_stream_is_smaller_decodes_as_it_arrives_and_flushes_each_event(coding: &str) {
    let api = Api::start().await;
    for n in 1..=EVENTS {
        api.publish(n).await;
    }
    let mut plain = api.open(None).await;
    within(20, plain.until_events(EVENTS as usize)).await;
    let mut compressed = api.open(Some(coding)).await;
    within(20, compressed.until_events(EVENTS as usize)).await;

    // The same text, in fewer bytes.
    assert_eq!(
        events(&compressed.text),
        events(&plain.text),
        "{coding}: the decoded events are the plain ones"
    );
    assert!(
        compressed.wire < plain.wire,
        "{coding}: {} bytes compressed, {} plain",
        compressed.wire,
        plain.wire
    );
    println!(
        "{coding}: {} bytes on the wire for {} bytes of SSE ({:.2})",
        compressed.wire,
        plain.wire,
        compressed.wire as f64 / plain.wire as f64
    );

    // Both streams are idle now. An event published to them decodes from
    // the bytes received so far, well before the next heartbeat.
    api.publish(EVENTS + 1).await;
    tokio::time::timeout(PROMPT, compressed.until_events(EVENTS as usize + 1))
        .await
        .unwrap_or_else(|_| {
            panic!("{coding}: an event to an idle stream did not decode within {PROMPT:?}")
        });
    within(20, plain.until_events(EVENTS as usize + 1)).await;
    assert_eq!(
        events(&compressed.text),
        events(&plain.text),
        "{coding}: the late event decodes as sent"
    );
    let text = String::from_utf8_lossy(&compressed.text);
    assert!(!text.contains(": hb"), "{coding}: a heartbeat came first");
}

#[tokio::test]
async fn a_gzip_stream_is_smaller_decodes_as_it_arrives_and_flushes_each_event() {
    compressed_stream_is_smaller_decodes_as_it_arrives_and_flushes_each_event("gzip").await;
}

#[tokio::test]
async fn a_brotli_stream_is_smaller_decodes_as_it_arrives_and_flushes_each_event() {
    compressed_stream_is_smaller_decodes_as_it_arrives_and_flushes_each_event("br").await;
}
