//! The first request of each HTTP connection is read by ringcast itself
//! (`src/http/h1.rs`): an event stream is written without hyper, anything
//! else is handed to hyper. What a client sees must not change: long and
//! split heads, hyper's limits, keep-alive and pipelining, the end of a
//! stream, a client that goes away.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::auth::{claims, hs256, hs256_config};
use common::http::{parse_response, read_response};
use common::{config, start, within};
use ringcast::broker::Broker;
use ringcast::config::{Config, Durability};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A memory broker with `tweak` applied, and topic `t` created.
async fn broker(tweak: impl FnOnce(&mut Config, &std::path::Path)) -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Durability::Memory);
    tweak(&mut config, dir.path());
    let broker = start(config).await;
    broker.engine().create("t").expect("create topic");
    (broker, dir)
}

/// Connects and sends `request`, in pieces of `piece` bytes, each written
/// on its own.
async fn send_in_pieces(addr: SocketAddr, request: &[u8], piece: usize) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    for part in request.chunks(piece) {
        stream.write_all(part).await.expect("write");
        stream.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    stream
}

/// Reads until what was read holds `needle`; returns all of it.
async fn read_until(stream: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    within(20, async {
        let mut buf = [0u8; 16 * 1024];
        while !bytes.windows(needle.len()).any(|w| w == needle) {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed before {:?}: {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&bytes[..bytes.len().min(500)])
            );
            bytes.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    bytes
}

/// The status line of what the server answers `request` with (up to the end
/// of its head).
async fn status_of(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = send_in_pieces(addr, request, request.len()).await;
    let head = read_until(&mut stream, b"\r\n\r\n").await;
    let head = String::from_utf8_lossy(&head);
    head.lines().next().unwrap_or_default().to_owned()
}

fn sse_request(extra_headers: &str) -> Vec<u8> {
    format!(
        "GET /v1/topics/t/events HTTP/1.1\r\nHost: localhost\r\n\
         Accept: text/event-stream\r\n{extra_headers}\r\n"
    )
    .into_bytes()
}

async fn await_subscribers(broker: &Broker, n: usize) {
    within(5, async {
        while broker.engine().info("t").expect("topic").subscribers != n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn an_sse_request_with_an_8_kib_bearer_token_streams() {
    let (broker, _dir) = broker(|c, dir| *c = hs256_config(c.clone(), dir)).await;
    let mut grant = claims("alice", 3600, &[], &["t"], false);
    grant["pad"] = "p".repeat(6 * 1024).into();
    let token = hs256(&grant);
    assert!(token.len() >= 8 * 1024, "{}", token.len());

    let request = sse_request(&format!("Authorization: Bearer {token}\r\n"));
    let mut stream = send_in_pieces(broker.http_addr(), &request, request.len()).await;
    let bytes = read_until(&mut stream, b"event: ready\n").await;
    let response = parse_response(&bytes);
    assert_eq!(response.status, 200, "{}", response.head);
    let head = response.head.to_ascii_lowercase();
    for line in [
        "content-type: text/event-stream",
        "transfer-encoding: chunked",
        "date: ",
    ] {
        assert!(head.contains(line), "no {line:?} in {head}");
    }
}

#[tokio::test]
async fn heads_up_to_hypers_limit_stream_even_when_they_arrive_in_pieces() {
    let (broker, _dir) = broker(|_, _| {}).await;
    // Below and above the length read here (64 KiB; longer heads go to
    // hyper with what was read), up to near hyper's own limit (~408 KiB).
    for pad in [10, 8 * 1024, 60 * 1024, 100 * 1024, 400 * 1024] {
        let request = sse_request(&format!("X-Pad: {}\r\n", "x".repeat(pad)));
        let mut stream = send_in_pieces(broker.http_addr(), &request, 4096).await;
        let bytes = read_until(&mut stream, b"event: ready\n").await;
        assert_eq!(parse_response(&bytes).status, 200, "pad {pad}");
    }
}

#[tokio::test]
async fn heads_over_hypers_limits_are_refused_with_431_as_before() {
    let (broker, _dir) = broker(|_, _| {}).await;
    let long = sse_request(&format!("X-Pad: {}\r\n", "x".repeat(1024 * 1024)));
    assert!(status_of(broker.http_addr(), &long).await.contains(" 431 "));
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = sse_request(&many);
    assert!(status_of(broker.http_addr(), &many).await.contains(" 431 "));
}

#[tokio::test]
async fn a_first_get_answered_with_a_body_keeps_its_connection_for_pipelined_requests() {
    let (broker, _dir) = broker(|_, _| {}).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let both = format!("{}{}", get("/healthz"), get("/v1/topics/t"));
    let mut stream = send_in_pieces(broker.http_addr(), both.as_bytes(), both.len()).await;
    let bytes = read_until(&mut stream, br#""name":"t""#).await;
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{text}");
    assert!(text.contains(r#"{"status":"ok"}HTTP/1.1 200 OK"#), "{text}");
    stream.write_all(get("/readyz").as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut stream).await.status, 200);
}

#[tokio::test]
async fn an_event_stream_that_ends_leaves_its_connection_to_the_next_request() {
    let (broker, _dir) = broker(|_, _| {}).await;
    let request = sse_request("");
    let mut stream = send_in_pieces(broker.http_addr(), &request, request.len()).await;
    read_until(&mut stream, b"event: ready\n").await;
    broker.engine().seal("t").await.expect("seal");
    // `end`, then the last chunk: the body is over, the connection is not.
    read_until(&mut stream, b"\r\n0\r\n\r\n").await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 200, "{}", response.head);
}

#[tokio::test]
async fn an_http_1_0_stream_is_delimited_by_the_close_after_its_end() {
    let (broker, _dir) = broker(|_, _| {}).await;
    let request = b"GET /v1/topics/t/events HTTP/1.0\r\nHost: localhost\r\n\r\n";
    let mut stream = send_in_pieces(broker.http_addr(), request, request.len()).await;
    let bytes = read_until(&mut stream, b"event: ready\n").await;
    let response = parse_response(&bytes);
    assert!(
        response.head.starts_with("HTTP/1.0 200"),
        "{}",
        response.head
    );
    assert!(!response
        .head
        .to_ascii_lowercase()
        .contains("transfer-encoding"));
    broker.engine().seal("t").await.expect("seal");
    let mut rest = Vec::new();
    within(20, stream.read_to_end(&mut rest))
        .await
        .expect("closed cleanly");
    assert!(
        String::from_utf8_lossy(&rest).contains("event: end\n"),
        "{rest:?}"
    );
}

#[tokio::test]
async fn a_client_that_closes_its_stream_is_noticed_at_once_not_at_the_next_write() {
    // No heartbeat for ten minutes: only reading the close can notice it.
    let (broker, _dir) = broker(|c, _| c.server.heartbeat = Duration::from_secs(600)).await;
    let request = sse_request("");
    let mut stream = send_in_pieces(broker.http_addr(), &request, request.len()).await;
    read_until(&mut stream, b"event: ready\n").await;
    await_subscribers(&broker, 1).await;
    drop(stream);
    await_subscribers(&broker, 0).await;
}
