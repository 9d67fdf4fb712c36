//! HTTP for the tests: a request's status and JSON body through `reqwest`,
//! and raw HTTP/1.1 over a `TcpStream` for tests that need what a client
//! library hides: exact bytes, foreign `Host` headers, closes.
#![allow(dead_code)]

use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::within;

/// Sends `request`, waiting at most `secs` seconds: the status and the JSON
/// body (`Null` when the body is empty).
pub async fn send_json(request: reqwest::RequestBuilder, secs: u64) -> (StatusCode, Value) {
    within(secs, async {
        let response = request.send().await.expect("request sent");
        let status = response.status();
        let body = response.bytes().await.expect("body read");
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!("body {:?} is not JSON: {e}", String::from_utf8_lossy(&body))
            })
        };
        (status, value)
    })
    .await
}

/// A raw HTTP/1.1 response: status, head (status line and headers), body.
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body {:?} is not JSON: {e}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads one response whose server closes the connection after it.
pub async fn read_closing_response(stream: &mut TcpStream) -> RawResponse {
    let mut bytes = Vec::new();
    within(20, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    parse_response(&bytes)
}

/// Splits raw response bytes into a [`RawResponse`].
pub fn parse_response(bytes: &[u8]) -> RawResponse {
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(bytes)));
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    RawResponse {
        status,
        head,
        body: bytes[split + 4..].to_vec(),
    }
}

/// Reads one keep-alive response with a `Content-Length` body.
pub async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut bytes = Vec::new();
    within(20, async {
        let mut buf = [0u8; 8192];
        loop {
            if let Some(split) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&bytes[..split]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if bytes.len() >= split + 4 + len {
                    return;
                }
            }
            let n = stream.read(&mut buf).await.expect("response read");
            assert!(n > 0, "connection closed mid-response: {bytes:?}");
            bytes.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    parse_response(&bytes)
}

/// Asserts that the server sends nothing more on `stream` and closes it
/// (end of stream or a reset).
pub async fn expect_closed_after_response(stream: &mut TcpStream) {
    let mut buf = [0u8; 8192];
    if let Ok(n @ 1..) = within(20, stream.read(&mut buf)).await {
        panic!(
            "more after the response: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
}
