//! Payload compression negotiated in `HelloExt` (protocol version 5),
//! against the real broker on loopback: the negotiation, what goes on the
//! wire (counted by a proxy), the SDK's invisible round trip, bad
//! compressed payloads, plain payloads everywhere else, and one compression
//! per event however many subscribers get it.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use common::proxy::Proxy;
use common::{config, expect_error, memory_broker, start, subscribe_live, within, RawClient};
use ringcast::config::Durability;
use ringcast_client::{Client, ClientOptions, Compression, ConsumeOptions, ConsumerItem, Delivery};
use ringcast_protocol::compression::{decode_payload, encode_payload};
use ringcast_protocol::{
    encode_frame, ClientMessage, Codec, CompressionChoice, CompressionOffer, ErrorCode,
    GroupOptions, NewEvent, ServerMessage, Start, WireEvent, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// About `n` bytes of JSON as an application would publish it: repetitive
/// keys and values, compressible.
fn json(n: usize) -> Bytes {
    let mut s = String::from("[");
    let mut i = 0;
    while s.len() + 80 < n {
        s.push_str(&format!(
            r#"{{"order":{i},"status":"shipped","customer":"c-{}","total":{}.50}},"#,
            i % 13,
            i * 7 % 1000
        ));
        i += 1;
    }
    s.push_str(r#"{"end":true}]"#);
    Bytes::from(s)
}

/// `n` bytes LZ4 cannot shrink.
fn noise(n: usize) -> Bytes {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn offer(codecs: Vec<Codec>, min_size: u32) -> CompressionOffer {
    CompressionOffer { codecs, min_size }
}

/// Connects a raw client with `HelloExt`; returns it and its `WelcomeExt`'s
/// compression.
async fn raw_ext(addr: SocketAddr, offer: CompressionOffer) -> (RawClient, CompressionChoice) {
    let mut c = RawClient::connect(addr).await;
    c.send(&ClientMessage::HelloExt {
        protocol_version: PROTOCOL_VERSION,
        client_name: "raw-compression".into(),
        credentials: None,
        compression: offer,
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::WelcomeExt {
            protocol_version,
            compression,
            ..
        }) => {
            assert_eq!(protocol_version, PROTOCOL_VERSION);
            (c, compression)
        }
        other => panic!("expected WelcomeExt, got {other:?}"),
    }
}

fn publish(request_id: u64, topic: &str, payload: Bytes) -> ClientMessage {
    ClientMessage::Publish {
        request_id,
        topic: topic.into(),
        event_type: "created".into(),
        headers: vec![],
        payload,
    }
}

/// The next `Event` (skipping acks and confirmations).
async fn next_event(c: &mut RawClient) -> (u64, WireEvent) {
    loop {
        match c.recv().await {
            Some(ServerMessage::Event {
                subscription_id,
                event,
            }) => return (subscription_id, event),
            Some(
                ServerMessage::Published { .. }
                | ServerMessage::Subscribed { .. }
                | ServerMessage::Pong { .. },
            ) => {}
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

async fn subscribed(c: &mut RawClient, topic: &str, sid: u64) {
    c.send(&subscribe_live(sid, sid, topic)).await;
    match c.recv().await {
        Some(ServerMessage::Subscribed {
            subscription_id, ..
        }) if subscription_id == sid => {}
        other => panic!("expected Subscribed, got {other:?}"),
    }
}

async fn published(c: &mut RawClient, request_id: u64) {
    match c.recv().await {
        Some(ServerMessage::Published { request_id: r, .. }) if r == request_id => {}
        other => panic!("expected Published {request_id}, got {other:?}"),
    }
}

#[tokio::test]
async fn the_server_takes_lz4_with_the_larger_threshold_and_says_so() {
    let (broker, _dir) = memory_broker().await;
    let (_c, choice) = raw_ext(broker.tcp_addr(), offer(vec![Codec(9), Codec::LZ4], 4096)).await;
    assert_eq!(
        choice,
        CompressionChoice {
            codec: Codec::LZ4,
            min_size: 4096
        }
    );
    // Below the server's floor (128 bytes by default) the floor applies.
    let (_c, choice) = raw_ext(broker.tcp_addr(), offer(vec![Codec::LZ4], 16)).await;
    assert_eq!(choice.min_size, 128);
    // Nothing offered, or nothing the server speaks: off.
    let (_c, choice) = raw_ext(broker.tcp_addr(), offer(vec![], 0)).await;
    assert_eq!(choice, CompressionChoice::OFF);
    let (_c, choice) = raw_ext(broker.tcp_addr(), offer(vec![Codec(9)], 0)).await;
    assert_eq!(choice, CompressionChoice::OFF);
}

#[tokio::test]
async fn a_server_with_compression_off_answers_every_offer_with_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Durability::Memory);
    cfg.server.tcp_compression = false;
    let broker = start(cfg).await;
    let (mut c, choice) = raw_ext(broker.tcp_addr(), offer(vec![Codec::LZ4], 0)).await;
    assert_eq!(choice, CompressionChoice::OFF);
    // Off means no marker: a payload is stored as sent.
    subscribed(&mut c, "off", 1).await;
    c.send(&publish(2, "off", Bytes::from_static(b"\x01abc")))
        .await;
    let (_, event) = next_event(&mut c).await;
    assert_eq!(&event.payload[..], b"\x01abc");
}

#[tokio::test]
async fn hello_ext_naming_an_old_version_is_bad_hello() {
    let (broker, _dir) = memory_broker().await;
    let mut c = RawClient::connect(broker.tcp_addr()).await;
    c.send(&ClientMessage::HelloExt {
        protocol_version: 4,
        client_name: "old".into(),
        credentials: None,
        compression: offer(vec![Codec::LZ4], 0),
    })
    .await;
    expect_error(&mut c, None, ErrorCode::BadHello).await;
    c.expect_closed().await;
    // And after the handshake it is a second hello.
    let (mut c, _) = raw_ext(broker.tcp_addr(), offer(vec![Codec::LZ4], 0)).await;
    c.send(&ClientMessage::HelloExt {
        protocol_version: PROTOCOL_VERSION,
        client_name: "again".into(),
        credentials: None,
        compression: offer(vec![Codec::LZ4], 0),
    })
    .await;
    expect_error(&mut c, None, ErrorCode::BadHello).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn a_v4_client_is_untouched_byte_for_byte_while_others_compress() {
    let (broker, _dir) = memory_broker().await;
    let mut old = RawClient::connect(broker.tcp_addr()).await;
    old.send(&ClientMessage::Hello {
        protocol_version: 4,
        client_name: "v4".into(),
        credentials: None,
    })
    .await;
    // A v4 client reads `Welcome` (tag 0) with its own version, nothing more.
    let mut frame = [0u8; 4];
    within(20, old.stream.read_exact(&mut frame)).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(frame) as usize];
    within(20, old.stream.read_exact(&mut body)).await.unwrap();
    let welcome: ServerMessage = ringcast_protocol::decode_body(&body).unwrap();
    let ServerMessage::Welcome {
        protocol_version: 4,
        ..
    } = welcome
    else {
        panic!("expected a version 4 Welcome, got {welcome:?}");
    };
    let (mut new, _) = raw_ext(broker.tcp_addr(), offer(vec![Codec::LZ4], 0)).await;
    subscribed(&mut old, "mixed", 1).await;
    subscribed(&mut new, "mixed", 1).await;

    // From the v4 client a payload is opaque, even one that starts like a
    // marker: stored as sent.
    let big = json(8 * 1024);
    let mut looks_marked = vec![1u8];
    looks_marked.extend_from_slice(&big);
    old.send(&publish(2, "mixed", Bytes::from(looks_marked.clone())))
        .await;
    let (_, plain) = next_event(&mut old).await;
    assert_eq!(plain.payload, looks_marked);
    // Exactly the bytes a version 4 broker sends: the plain encoding.
    let mut expected = BytesMut::new();
    encode_frame(
        &ServerMessage::Event {
            subscription_id: 1,
            event: plain.clone(),
        },
        &mut expected,
    )
    .unwrap();
    assert_eq!(plain.payload.len(), big.len() + 1);
    // The compressing subscriber gets the same event compressed.
    let (_, packed) = next_event(&mut new).await;
    assert_eq!(packed.payload[0], 1);
    assert!(packed.payload.len() < looks_marked.len() / 3);
    let back = decode_payload(Codec::LZ4, packed.payload, 1 << 20).unwrap();
    assert_eq!(back, looks_marked);
    assert_eq!(
        (packed.offset, packed.headers),
        (plain.offset, plain.headers)
    );
}

#[tokio::test]
async fn small_and_incompressible_payloads_go_raw_behind_their_marker() {
    let (broker, _dir) = memory_broker().await;
    let (mut c, choice) = raw_ext(broker.tcp_addr(), offer(vec![Codec::LZ4], 1024)).await;
    assert_eq!(choice.min_size, 1024);
    subscribed(&mut c, "raw", 1).await;
    let small = json(600);
    let random = noise(4096);
    let big = json(4096);
    for (i, p) in [&small, &random, &big].into_iter().enumerate() {
        let wire = encode_payload(Codec::LZ4, 1024, p);
        c.send(&publish(10 + i as u64, "raw", wire)).await;
    }
    let (_, e1) = next_event(&mut c).await;
    let (_, e2) = next_event(&mut c).await;
    let (_, e3) = next_event(&mut c).await;
    assert_eq!(e1.payload[0], 0, "under min_size: raw");
    assert_eq!(&e1.payload[1..], &small[..]);
    assert_eq!(e2.payload[0], 0, "incompressible: raw");
    assert_eq!(&e2.payload[1..], &random[..]);
    assert_eq!(e3.payload[0], 1, "compressible and large enough: LZ4");
    assert_eq!(decode_payload(Codec::LZ4, e3.payload, 4096).unwrap(), big);
    // History on this connection is marked too.
    c.send(&ClientMessage::History {
        request_id: 20,
        topic: "raw".into(),
        after: 0,
        types: vec![],
        limit: 10,
    })
    .await;
    let events = loop {
        match c.recv().await {
            Some(ServerMessage::History { events, .. }) => break events,
            Some(ServerMessage::Published { .. }) => {}
            other => panic!("expected History, got {other:?}"),
        }
    };
    let markers: Vec<u8> = events.iter().map(|e| e.payload[0]).collect();
    assert_eq!(markers, [0, 0, 1]);
    let plain: Vec<Bytes> = events
        .into_iter()
        .map(|e| decode_payload(Codec::LZ4, e.payload, 1 << 20).unwrap())
        .collect();
    assert_eq!(plain, [small, random, big]);
}

#[tokio::test]
async fn a_corrupt_or_lying_payload_is_refused_and_the_connection_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Durability::Memory);
    cfg.limits.max_payload = bytesize::ByteSize::kib(48);
    cfg.limits.max_frame = bytesize::ByteSize::kib(64);
    let broker = start(cfg).await;
    let (mut c, _) = raw_ext(broker.tcp_addr(), offer(vec![Codec::LZ4], 0)).await;
    let good = encode_payload(Codec::LZ4, 0, &json(2048));
    assert_eq!(good[0], 1);

    let mut lying = good.to_vec();
    lying[1..5].copy_from_slice(&4000u32.to_be_bytes());
    let mut garbage = good[..5].to_vec();
    garbage.extend_from_slice(&[0xff; 40]);
    let mut huge = vec![1];
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    huge.extend_from_slice(&[0x1f, 0]);
    let cases: [(&[u8], ErrorCode); 6] = [
        (&lying, ErrorCode::InvalidRequest),
        (&garbage, ErrorCode::InvalidRequest),
        (&good[..3], ErrorCode::InvalidRequest),
        (b"", ErrorCode::InvalidRequest),
        (b"\x07{}", ErrorCode::InvalidRequest),
        (&huge, ErrorCode::PayloadTooLarge),
    ];
    for (i, (payload, code)) in cases.into_iter().enumerate() {
        let id = 100 + i as u64;
        c.send(&publish(id, "bad", Bytes::copy_from_slice(payload)))
            .await;
        expect_error(&mut c, Some(id), code).await;
    }
    // A batch whose payloads decompress to more than max_frame together,
    // though each is within max_payload.
    let each = encode_payload(Codec::LZ4, 0, &[b'x'; 40 * 1024]);
    assert!(each.len() < 1024);
    let event = |payload: Bytes| NewEvent {
        event_type: "created".into(),
        headers: vec![],
        payload,
    };
    c.send(&ClientMessage::PublishBatch {
        request_id: 200,
        topic: "bad".into(),
        events: vec![event(each.clone()), event(each.clone())],
    })
    .await;
    expect_error(&mut c, Some(200), ErrorCode::InvalidRequest).await;
    // One bad payload refuses the whole batch: nothing was stored.
    c.send(&ClientMessage::PublishBatch {
        request_id: 201,
        topic: "bad".into(),
        events: vec![event(good.clone()), event(Bytes::from(lying))],
    })
    .await;
    expect_error(&mut c, Some(201), ErrorCode::InvalidRequest).await;
    c.send(&ClientMessage::TopicInfo {
        request_id: 202,
        topic: "bad".into(),
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::TopicInfo { info, .. }) => assert_eq!(info.last_offset, 0),
        Some(ServerMessage::Error {
            code: ErrorCode::TopicNotFound,
            ..
        }) => {}
        other => panic!("expected the topic empty, got {other:?}"),
    }

    // The connection goes on, and so does the broker for others.
    c.send(&publish(300, "bad", good.clone())).await;
    published(&mut c, 300).await;
    c.send(&ClientMessage::Ping { request_id: 301 }).await;
    assert_eq!(
        c.recv().await,
        Some(ServerMessage::Pong { request_id: 301 })
    );
    let mut other = RawClient::handshake(broker.tcp_addr()).await;
    other
        .send(&ClientMessage::History {
            request_id: 1,
            topic: "bad".into(),
            after: 0,
            types: vec![],
            limit: 10,
        })
        .await;
    match other.recv().await {
        Some(ServerMessage::History { events, .. }) => {
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].payload, json(2048));
        }
        other => panic!("expected History, got {other:?}"),
    }
}

/// A loopback proxy to one target that counts the bytes it forwards each
/// way.
struct CountingProxy {
    addr: SocketAddr,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl CountingProxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let counters = (up.clone(), down.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(copy_counting(cr, sw, counters.0.clone()));
                tokio::spawn(copy_counting(sr, cw, counters.1.clone()));
            }
        });
        CountingProxy { addr, up, down }
    }

    /// Bytes client → broker, broker → client.
    fn counts(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::SeqCst),
            self.down.load(Ordering::SeqCst),
        )
    }
}

async fn copy_counting(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::SeqCst);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Publishes `payload` through one SDK client and receives it through
/// another, each through its own counting proxy; returns what each sent
/// and received on the wire once the event arrived, and the event.
async fn through_the_sdk(
    broker: SocketAddr,
    compression: Compression,
    topic: &str,
    payload: Bytes,
) -> ((u64, u64), (u64, u64), WireEvent) {
    let (pub_proxy, sub_proxy) = (
        CountingProxy::start(broker).await,
        CountingProxy::start(broker).await,
    );
    let options = |addr: SocketAddr| {
        ClientOptions::new(addr.to_string())
            .with_compression(compression)
            .with_client_name("compression-test")
    };
    let publisher = Client::connect_with(options(pub_proxy.addr)).await.unwrap();
    let subscriber = Client::connect_with(options(sub_proxy.addr)).await.unwrap();
    // The broker's floor (128 bytes) is below the SDK's default threshold.
    assert_eq!(subscriber.server_info().compression, compression);
    let mut sub = subscriber.subscribe(topic).send().await.unwrap();
    let (pub_before, sub_before) = (pub_proxy.counts(), sub_proxy.counts());
    publisher.publish(topic, "created", payload).await.unwrap();
    let event = match within(20, sub.next_delivery()).await {
        Some(Ok(Delivery::Event(e))) => e,
        other => panic!("expected an event, got {other:?}"),
    };
    let (pub_after, sub_after) = (pub_proxy.counts(), sub_proxy.counts());
    let delta = |a: (u64, u64), b: (u64, u64)| (a.0 - b.0, a.1 - b.1);
    (
        delta(pub_after, pub_before),
        delta(sub_after, sub_before),
        event,
    )
}

#[tokio::test]
async fn a_64_kib_json_payload_round_trips_through_the_sdk_in_a_fraction_of_the_bytes() {
    let (broker, _dir) = memory_broker().await;
    let payload = json(64 * 1024);
    let (pub_plain, sub_plain, plain) = through_the_sdk(
        broker.tcp_addr(),
        Compression::None,
        "big.plain",
        payload.clone(),
    )
    .await;
    let (pub_lz4, sub_lz4, packed) = through_the_sdk(
        broker.tcp_addr(),
        Compression::lz4(),
        "big.lz4",
        payload.clone(),
    )
    .await;
    // The caller sees the original payload either way.
    assert_eq!(plain.payload, payload);
    assert_eq!(packed.payload, payload);
    // Publisher → broker and broker → subscriber: the payload dominates.
    assert!(pub_plain.0 > 64 * 1024 && sub_plain.1 > 64 * 1024);
    assert!(
        pub_lz4.0 * 4 < pub_plain.0,
        "published {} bytes compressed, {} plain",
        pub_lz4.0,
        pub_plain.0
    );
    assert!(
        sub_lz4.1 * 4 < sub_plain.1,
        "received {} bytes compressed, {} plain",
        sub_lz4.1,
        sub_plain.1
    );
}

#[tokio::test]
async fn an_incompressible_payload_costs_one_byte_more_through_the_sdk() {
    let (broker, _dir) = memory_broker().await;
    let payload = noise(16 * 1024);
    let (pub_plain, sub_plain, plain) = through_the_sdk(
        broker.tcp_addr(),
        Compression::None,
        "noise.plain",
        payload.clone(),
    )
    .await;
    let (pub_lz4, sub_lz4, packed) = through_the_sdk(
        broker.tcp_addr(),
        Compression::lz4(),
        "noise.lz4",
        payload.clone(),
    )
    .await;
    assert_eq!((plain.payload, packed.payload), (payload.clone(), payload));
    // The topic names differ by 2 bytes ("noise.lz4" vs "noise.plain"):
    // one marker byte more, two topic bytes fewer.
    assert_eq!(pub_lz4.0 + 1, pub_plain.0);
    assert_eq!(sub_lz4.1 + 1, sub_plain.1);
}

#[tokio::test]
async fn sse_and_http_history_of_a_compressed_publish_serve_the_plain_payload() {
    let (broker, _dir) = memory_broker().await;
    let payload = json(16 * 1024);
    let client = Client::connect_with(
        ClientOptions::new(broker.tcp_addr().to_string()).with_compression(Compression::lz4()),
    )
    .await
    .unwrap();
    assert_eq!(
        client.server_info().compression,
        Compression::Lz4 { min_size: 1024 }
    );
    client
        .publish("web", "created", payload.clone())
        .await
        .unwrap();
    let want: serde_json::Value = serde_json::from_slice(&payload).unwrap();

    let http = reqwest::Client::new();
    let base = format!("http://{}", broker.http_addr());
    let page: serde_json::Value = within(20, async {
        http.get(format!("{base}/v1/topics/web/history"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    })
    .await;
    assert_eq!(page["events"][0]["data"], want, "history");

    let mut sse = http
        .get(format!("{base}/v1/topics/web/events?earliest=true"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut text = String::new();
    let envelope = within(20, async {
        loop {
            let chunk = sse.chunk().await.unwrap().expect("the stream goes on");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
            let Some(at) = text.find("event: created\n") else {
                continue;
            };
            let Some(end) = text[at..].find("\n\n") else {
                continue;
            };
            let data: String = text[at..at + end]
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            break serde_json::from_str::<serde_json::Value>(&data).unwrap();
        }
    })
    .await;
    assert_eq!(envelope["data"], want, "SSE");
}

#[tokio::test]
async fn a_group_member_with_compression_gets_its_jobs_plain() {
    let (broker, _dir) = memory_broker().await;
    let client = Client::connect_with(
        ClientOptions::new(broker.tcp_addr().to_string()).with_compression(Compression::lz4()),
    )
    .await
    .unwrap();
    let payload = json(8 * 1024);
    client
        .publish("jobs", "created", payload.clone())
        .await
        .unwrap();
    let mut jobs = client
        .consume(
            "jobs",
            "workers",
            ConsumeOptions::new("w1").create(GroupOptions::default()),
        )
        .await
        .unwrap();
    match within(20, jobs.next()).await {
        Some(Ok(ConsumerItem::Job(job))) => {
            assert_eq!(job.event().payload, payload);
            job.ack().await.unwrap();
        }
        other => panic!("expected a job, got {other:?}"),
    }
}

#[tokio::test]
async fn fan_out_to_compressed_subscribers_compresses_each_event_once() {
    let (broker, _dir) = memory_broker().await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        let (mut c, _) = raw_ext(broker.tcp_addr(), offer(vec![Codec::LZ4], 0)).await;
        subscribed(&mut c, "fan", 1).await;
        subs.push(c);
    }
    let payload = json(8 * 1024);
    let mut publisher = RawClient::handshake(broker.tcp_addr()).await;
    publisher.send(&publish(1, "fan", payload.clone())).await;
    published(&mut publisher, 1).await;
    let mut frames = Vec::new();
    for c in &mut subs {
        let (sid, event) = next_event(c).await;
        assert_eq!(sid, 1);
        assert_eq!(event.payload[0], 1);
        assert_eq!(
            decode_payload(Codec::LZ4, event.payload.clone(), 1 << 20).unwrap(),
            payload
        );
        let mut frame = BytesMut::new();
        encode_frame(
            &ServerMessage::Event {
                subscription_id: sid,
                event,
            },
            &mut frame,
        )
        .unwrap();
        frames.push(frame);
    }
    // Every subscriber got the very same frame: one compression, shared.
    assert!(frames.windows(2).all(|w| w[0] == w[1]));
    // And the ring holds the event plus exactly one compressed frame of it
    // (the shared encoding, charged to the topic like the plain one): had
    // each subscriber compressed it for itself, none would be cached.
    let info = broker.engine().info("fan").unwrap();
    let event_size = (payload.len() + "created".len() + 64) as u64;
    assert_eq!(info.retained_bytes, event_size + frames[0].len() as u64);
}

#[tokio::test]
async fn a_pattern_subscription_with_compression_gets_payloads_compressed() {
    let (broker, _dir) = memory_broker().await;
    let (mut c, _) = raw_ext(broker.tcp_addr(), offer(vec![Codec::LZ4], 0)).await;
    c.send(&ClientMessage::SubscribePattern {
        request_id: 1,
        subscription_id: 4,
        pattern: "pat.*".into(),
        types: vec![],
        start: Start::Live,
        positions: None,
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::PatternSubscribed { .. }) => {}
        other => panic!("expected PatternSubscribed, got {other:?}"),
    }
    let payload = json(4096);
    let mut publisher = RawClient::handshake(broker.tcp_addr()).await;
    publisher.send(&publish(1, "pat.a", payload.clone())).await;
    loop {
        match c.recv().await {
            Some(ServerMessage::TopicJoined { .. }) => {}
            Some(ServerMessage::Event {
                subscription_id: 4,
                event,
            }) => {
                assert_eq!(event.payload[0], 1);
                let plain = decode_payload(Codec::LZ4, event.payload, 1 << 20).unwrap();
                assert_eq!(plain, payload);
                break;
            }
            other => panic!("expected the event, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_compressing_sdk_client_negotiates_again_after_a_reconnect_and_misses_nothing() {
    let (broker, _dir) = memory_broker().await;
    let proxy = Proxy::start(broker.tcp_addr()).await;
    let options = |addr: SocketAddr| {
        ClientOptions::new(addr.to_string())
            .with_compression(Compression::Lz4 { min_size: 256 })
            .with_reconnect_backoff(
                std::time::Duration::from_millis(10),
                std::time::Duration::from_millis(50),
            )
    };
    let subscriber = Client::connect_with(options(proxy.addr())).await.unwrap();
    let publisher = Client::connect_with(options(broker.tcp_addr()))
        .await
        .unwrap();
    let mut sub = subscriber.subscribe("again").send().await.unwrap();
    let payloads: Vec<Bytes> = (0..6).map(|i| json(2048 + i * 100)).collect();
    let mut got = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        if i == 3 {
            // Everything before the cut was received; the rest is resumed.
            assert_eq!(proxy.cut().await, 1);
        }
        publisher
            .publish("again", "created", p.clone())
            .await
            .unwrap();
        if i < 3 {
            match within(20, sub.next_delivery()).await {
                Some(Ok(Delivery::Event(e))) => got.push(e.payload),
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }
    while got.len() < payloads.len() {
        match within(20, sub.next_delivery()).await {
            Some(Ok(Delivery::Event(e))) => got.push(e.payload),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    assert_eq!(got, payloads);
    assert!(proxy.connections() >= 2, "it reconnected");
    assert_eq!(
        subscriber.server_info().compression,
        Compression::Lz4 { min_size: 256 }
    );
}
