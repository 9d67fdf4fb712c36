//! The scenarios over the TCP clients: publish, fanout, latency, resume.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;

use crate::common::{
    bounded, now_ns, payload, read_stamp, round, stamped, stream_name, AckDrain, CpuMeter, Item,
    Publisher, Record, StorageMeter, Subscriber, Target, WireMeter,
};
use crate::Common;

/// A histogram of nanoseconds from 1 µs to 60 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid bounds")
}

/// Writes p50 / p99 / p99.9 / max (µs) of a nanosecond histogram.
pub fn put_percentiles(rec: &mut Record, h: &Histogram<u64>) {
    let us = |ns: u64| round(ns as f64 / 1000.0, 1);
    rec.set("samples", h.len());
    rec.set("p50_us", us(h.value_at_quantile(0.50)));
    rec.set("p99_us", us(h.value_at_quantile(0.99)));
    rec.set("p999_us", us(h.value_at_quantile(0.999)));
    rec.set("max_us", us(h.max()));
}

/// `publish`: pipelined publish throughput; `publishers` connections
/// (round-robin over `--addr`) publish into the same topic at once.
pub async fn publish(
    c: &Common,
    n: u64,
    payload_size: usize,
    window: usize,
    publishers: usize,
) -> Result<Record> {
    let dest = format!("{}.p{payload_size}", c.dest);
    let mut clients = Vec::with_capacity(publishers);
    for i in 0..publishers {
        let addr = &c.addrs[i % c.addrs.len()];
        clients.push(Publisher::connect(c.target, addr, window, c.retain).await?);
    }
    clients[0].prepare(&dest).await?;
    let payload = payload(payload_size);
    // Publisher i's share of `total`.
    let share = |total: u64, i: usize| {
        total / publishers as u64 + u64::from((i as u64) < total % publishers as u64)
    };
    let publish_all = |total: u64| {
        futures::future::try_join_all(
            clients
                .iter()
                .enumerate()
                .map(|(i, p)| p.publish_n(&dest, share(total, i), window, &payload)),
        )
    };
    // Storage cost (--data-dir with --server-pid): baselines before the
    // warm-up, on the fresh (just prepared) topic.
    let mut storage = StorageMeter::start(c.server_pid, c.data_dir.as_deref());
    // Warm-up (not timed): connection buffers, topic creation, allocator.
    let warm = (n / 20).clamp(100, 5_000);
    publish_all(warm).await?;
    if let Some(s) = storage.as_mut() {
        s.begin_measured().await;
    }

    let cpu = CpuMeter::start_nodes(&c.server_pids, c.backend_pid, c.metrics_addr.as_deref()).await;
    let wire = WireMeter::start(c.metrics_addr.as_deref()).await;
    let started = Instant::now();
    publish_all(n).await?;
    let elapsed = started.elapsed().as_secs_f64();
    tokio::time::sleep(c.cpu_settle).await;

    let mut rec = Record::new("publish", c.target, &c.label);
    rec.set("payload", payload_size);
    rec.set("n", n);
    rec.set("window", window);
    if publishers > 1 {
        rec.set("publishers", publishers);
    }
    if c.addrs.len() > 1 {
        rec.set("nodes", c.addrs.len());
    }
    rec.set("elapsed_s", round(elapsed, 3));
    rec.set("msgs_per_s", round(n as f64 / elapsed, 0));
    rec.set(
        "mib_per_s",
        round(n as f64 * payload_size as f64 / elapsed / 1_048_576.0, 1),
    );
    cpu.finish_nodes(&mut rec, n, None).await;
    wire.finish(&mut rec, n).await;
    if let Some(s) = storage {
        // What the server keeps of this run's topic: everything published
        // into it (warm-up included) up to the retention cap (ringcast
        // topics.max_events, JetStream max_msgs; Redis MAXLEN ~ may keep
        // slightly more).
        let retained = if c.retain > 0 {
            (warm + n).min(c.retain)
        } else {
            warm + n
        };
        let size = payload_size as u64;
        s.finish(&mut rec, n * size, retained, size).await;
    }
    Ok(rec)
}

/// `fanout`: S subscribers (one connection each), one publisher, M messages.
pub async fn fanout(
    c: &Common,
    subscribers: usize,
    m: u64,
    payload_size: usize,
    window: usize,
    idle: Duration,
) -> Result<Record> {
    if !matches!(
        c.target,
        Target::Ringcast | Target::RedisPubsub | Target::NatsCore
    ) {
        bail!("fanout runs against ringcast, redis-pubsub and nats-core");
    }
    let dest = format!("{}.fan{subscribers}", c.dest);
    // Subscriber i on node i % nodes; the publisher on the first.
    let nodes = c.addrs.len();
    let subs = bounded(subscribers, 64, |i| {
        Subscriber::connect(c.target, &c.addrs[i % nodes], &dest, c.sub_buffer)
    })
    .await
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let publisher = Publisher::connect(c.target, &c.addr, window, c.retain).await?;
    let payload = payload(payload_size);

    let delivered = Arc::new(AtomicU64::new(0));
    let delivered_nodes: Arc<Vec<AtomicU64>> =
        Arc::new((0..nodes).map(|_| AtomicU64::new(0)).collect());
    let gaps = Arc::new(AtomicU64::new(0));
    let last_ns = Arc::new(AtomicU64::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let finished = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(subscribers);
    for (i, mut sub) in subs.into_iter().enumerate() {
        let (delivered, delivered_nodes, gaps, last_ns, done, finished) = (
            delivered.clone(),
            delivered_nodes.clone(),
            gaps.clone(),
            last_ns.clone(),
            done.clone(),
            finished.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut got = 0u64;
            while got < m {
                match sub.next().await {
                    Some(Item::Msg(_)) => {
                        got += 1;
                        delivered.fetch_add(1, Ordering::Relaxed);
                        delivered_nodes[i % nodes].fetch_add(1, Ordering::Relaxed);
                        last_ns.fetch_max(now_ns(), Ordering::Relaxed);
                    }
                    Some(Item::Gap(n)) => {
                        gaps.fetch_add(n.max(1), Ordering::Relaxed);
                    }
                    None => break,
                }
            }
            if finished.fetch_add(1, Ordering::AcqRel) + 1 == subscribers as u64 {
                done.notify_one();
            }
            drop(sub);
        }));
    }

    let cpu = CpuMeter::start_nodes(&c.server_pids, c.backend_pid, c.metrics_addr.as_deref()).await;
    let wire = WireMeter::start(c.metrics_addr.as_deref()).await;
    let start_ns = now_ns();
    publisher.publish_n(&dest, m, window, &payload).await?;
    let publish_s = (now_ns() - start_ns) as f64 / 1e9;
    // Wait until every subscriber has all M, or deliveries stall for `idle`.
    let mut seen = delivered.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = done.notified() => break,
            _ = tokio::time::sleep(idle) => {
                let now = delivered.load(Ordering::Relaxed);
                if now == seen {
                    break;
                }
                seen = now;
            }
        }
    }
    tokio::time::sleep(c.cpu_settle).await;
    let total = delivered.load(Ordering::Relaxed);
    let end_ns = last_ns.load(Ordering::Relaxed).max(start_ns + 1);
    let elapsed = (end_ns - start_ns) as f64 / 1e9;

    let mut rec = Record::new("fanout", c.target, &c.label);
    rec.set("subscribers", subscribers);
    rec.set("payload", payload_size);
    rec.set("n", m);
    rec.set("window", window);
    rec.set("expected", m * subscribers as u64);
    rec.set("delivered", total);
    rec.set("lost", (m * subscribers as u64).saturating_sub(total));
    rec.set("gap_events", gaps.load(Ordering::Relaxed));
    rec.set("publish_s", round(publish_s, 3));
    rec.set("elapsed_s", round(elapsed, 3));
    rec.set("publish_msgs_per_s", round(m as f64 / publish_s, 0));
    rec.set("msgs_per_s", round(total as f64 / elapsed, 0));
    // Each node's CPU over the deliveries to its own subscribers.
    let per_node: Vec<u64> = delivered_nodes
        .iter()
        .map(|d| d.load(Ordering::Relaxed))
        .collect();
    if nodes > 1 {
        rec.set("nodes", nodes);
        rec.set("delivered_nodes", per_node.clone());
    }
    cpu.finish_nodes(&mut rec, total, Some(&per_node)).await;
    wire.finish(&mut rec, total).await;
    for t in tasks {
        t.abort();
    }
    Ok(rec)
}

/// `latency`: publish→receive latency at a paced rate, one subscriber.
pub async fn latency(
    c: &Common,
    rate: u64,
    duration: Duration,
    warmup: Duration,
    payload_size: usize,
) -> Result<Record> {
    let dest = format!("{}.lat", c.dest);
    let mut sub = Subscriber::connect(c.target, &c.addr, &dest, c.sub_buffer).await?;
    let publisher = Publisher::connect(c.target, &c.addr, 1 << 16, c.retain).await?;

    let collector = tokio::spawn(async move {
        let mut h = latency_histogram();
        let mut gaps = 0u64;
        while let Some(item) = sub.next().await {
            match item {
                Item::Msg(p) => {
                    let Some((stamp, flag)) = read_stamp(&p) else {
                        continue;
                    };
                    if flag == 2 {
                        break; // the end marker
                    }
                    if flag == 1 {
                        let _ = h.record(now_ns().saturating_sub(stamp).max(1_000));
                    }
                }
                Item::Gap(n) => gaps += n,
            }
        }
        (h, gaps)
    });

    let acks = AckDrain::start();
    let cpu = CpuMeter::start(c.server_pid, c.metrics_addr.as_deref()).await;
    let period_ns = 1_000_000_000 / rate.max(1);
    let total = (warmup + duration).as_nanos() as u64 / period_ns;
    let warm = warmup.as_nanos() as u64 / period_ns;
    let start = now_ns();
    let mut i = 0u64;
    while i < total {
        // Send everything due by now, each stamped just before its send;
        // tokio's timer wakes us about once a millisecond.
        let due = ((now_ns() - start) / period_ns + 1).min(total);
        while i < due {
            let flag = u8::from(i >= warm);
            publisher
                .fire(&dest, stamped(payload_size, now_ns(), flag), &acks)
                .await?;
            i += 1;
        }
        let next = start + i * period_ns;
        let now = now_ns();
        if next > now {
            tokio::time::sleep(Duration::from_nanos(next - now)).await;
        }
    }
    let sent_s = (now_ns() - start) as f64 / 1e9;
    // Every publish acknowledged first (Redis requests are spawned, so they
    // may leave out of order), then the end marker.
    let failures = acks.finish().await;
    let end = AckDrain::start();
    publisher
        .fire(&dest, stamped(payload_size, now_ns(), 2), &end)
        .await?;
    let failures = failures + end.finish().await;
    let (h, gaps) = tokio::time::timeout(Duration::from_secs(30), collector)
        .await
        .map_err(|_| anyhow::anyhow!("the subscriber did not see the end marker in 30 s"))??;

    let measured = total - warm;
    let mut rec = Record::new("latency", c.target, &c.label);
    rec.set("rate", rate);
    rec.set("payload", payload_size);
    rec.set("duration_s", duration.as_secs_f64());
    rec.set("sent", measured);
    rec.set("achieved_rate", round(total as f64 / sent_s, 0));
    rec.set("lost", measured.saturating_sub(h.len()));
    rec.set("gap_events", gaps);
    rec.set("publish_failures", failures);
    put_percentiles(&mut rec, &h);
    cpu.finish(&mut rec, total).await;
    Ok(rec)
}

/// `resume`: `n` events are stored before a reader connects; the reader
/// catches up from the beginning.
pub async fn resume(c: &Common, n: u64, payload_size: usize, page: usize) -> Result<Record> {
    let dest = format!("{}.resume", c.dest);
    let publisher = Publisher::connect(c.target, &c.addr, 1024, c.retain).await?;
    publisher.prepare(&dest).await?;
    let payload = Bytes::from(vec![b'x'; payload_size]);
    publisher.publish_n(&dest, n, 1024, &payload).await?;
    drop(publisher);

    let mut rec = Record::new("resume", c.target, &c.label);
    let cpu;
    let started;
    let got: u64;
    match c.target {
        Target::Ringcast => {
            let client = crate::common::ringcast_connect(c.addr.as_str()).await?;
            cpu = CpuMeter::start(c.server_pid, c.metrics_addr.as_deref()).await;
            started = Instant::now();
            let mut sub = client
                .subscribe(dest.as_str())
                .earliest()
                .buffer(c.sub_buffer)
                .send()
                .await?;
            let mut count = 0u64;
            let mut gaps = 0u64;
            while count < n {
                match sub.next_delivery().await {
                    Some(Ok(ringcast_client::Delivery::Event(_))) => count += 1,
                    Some(Ok(ringcast_client::Delivery::Gap(g))) => {
                        gaps += g.current.saturating_sub(g.requested);
                        eprintln!("resume: gap {:?}", g);
                    }
                    Some(Ok(ringcast_client::Delivery::End { .. })) | None => break,
                    Some(Err(e)) => bail!("resume subscription failed: {e}"),
                }
            }
            rec.set("gap_events", gaps);
            got = count;
        }
        Target::RedisStreams => {
            let client = redis::Client::open(crate::common::redis_url(&c.addr))?;
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&crate::common::redis_config())
                .await?;
            cpu = CpuMeter::start(c.server_pid, c.metrics_addr.as_deref()).await;
            started = Instant::now();
            let mut last = "0".to_owned();
            let mut count = 0u64;
            while count < n {
                let reply: redis::streams::StreamReadReply = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(page)
                    .arg("STREAMS")
                    .arg(&dest)
                    .arg(&last)
                    .query_async(&mut conn)
                    .await?;
                let Some(key) = reply.keys.into_iter().next() else {
                    break;
                };
                if key.ids.is_empty() {
                    break;
                }
                count += key.ids.len() as u64;
                last = key.ids.last().expect("non-empty").id.clone();
            }
            rec.set("page", page);
            got = count;
        }
        Target::NatsJetstream => {
            use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
            let client = crate::common::nats_connect(&c.addr).await?;
            let js = async_nats::jetstream::new(client);
            let stream = js
                .get_stream(stream_name(&dest))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            cpu = CpuMeter::start(c.server_pid, c.metrics_addr.as_deref()).await;
            started = Instant::now();
            let consumer = stream
                .create_consumer(OrderedConfig {
                    deliver_policy: DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("creating the ordered consumer: {e}"))?;
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut count = 0u64;
            while count < n {
                match messages.next().await {
                    Some(Ok(_)) => count += 1,
                    Some(Err(e)) => bail!("ordered consumer failed: {e}"),
                    None => break,
                }
            }
            got = count;
        }
        t => bail!(
            "resume runs against ringcast, redis-streams and nats-jetstream, not {}",
            t.name()
        ),
    }
    let elapsed = started.elapsed().as_secs_f64();
    rec.set("payload", payload_size);
    rec.set("n", n);
    rec.set("received", got);
    rec.set("elapsed_s", round(elapsed, 3));
    rec.set("events_per_s", round(got as f64 / elapsed, 0));
    cpu.finish(&mut rec, got).await;
    if got < n {
        bail!("resume received only {got} of {n} events");
    }
    Ok(rec)
}

/// Opens a ringcast TCP connection and completes the handshake by hand
/// (raw frames: the SDK would never misbehave as `halfopen` needs).
async fn raw_hello(addr: &str, recv_buffer: Option<u32>) -> Result<tokio::net::TcpStream> {
    use ringcast_protocol::{encode_frame, ClientMessage, PROTOCOL_VERSION};
    use tokio::io::AsyncWriteExt;
    let peer = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{addr} does not resolve"))?;
    let socket = if peer.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let mut stream = socket.connect(peer).await?;
    let mut frame = bytes::BytesMut::new();
    encode_frame(
        &ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: "ringcast-bench-halfopen".into(),
            credentials: None,
        },
        &mut frame,
    )?;
    stream.write_all(&frame).await?;
    Ok(stream)
}

/// `halfopen`: N connections that announce a 4 MiB frame and send only a
/// few bytes of it, N subscribers that never read, while one publisher
/// publishes M events; reports the server's RSS before and after (and its
/// queued outbound bytes with `--metrics-addr`).
pub async fn halfopen(c: &Common, n: usize, m: u64, payload_size: usize) -> Result<Record> {
    use ringcast_protocol::{encode_frame, ClientMessage, Start};
    use tokio::io::AsyncWriteExt;
    if c.target != Target::Ringcast {
        bail!("halfopen runs against ringcast only");
    }
    let dest = format!("{}.halfopen", c.dest);
    let rss = || c.server_pid.and_then(crate::common::rss_kib);
    let rss_before = rss();
    let started = Instant::now();

    // After hello, so that the server has to hold them until read_timeout.
    let partial = bounded(n, 64, |_| async {
        let mut s = raw_hello(&c.addr, None).await?;
        s.write_all(&(4u32 * 1024 * 1024).to_be_bytes()).await?;
        s.write_all(b"\x00\x00\x00\x00\x00\x00\x00\x01").await?;
        anyhow::Ok(s)
    })
    .await;
    let stalled = bounded(n, 64, |i| {
        let dest = dest.clone();
        async move {
            let mut s = raw_hello(&c.addr, Some(4096)).await?;
            let mut frame = bytes::BytesMut::new();
            encode_frame(
                &ClientMessage::Subscribe {
                    request_id: 1,
                    subscription_id: i as u64,
                    topic: dest,
                    types: vec![],
                    start: Start::Live,
                },
                &mut frame,
            )?;
            s.write_all(&frame).await?;
            anyhow::Ok(s)
        }
    })
    .await;
    let open = |v: &[Result<tokio::net::TcpStream>]| v.iter().filter(|r| r.is_ok()).count();
    let (partial_open, stalled_open) = (open(&partial), open(&stalled));
    let rss_open = rss();

    let publisher = Publisher::connect(c.target, &c.addr, 256, c.retain).await?;
    publisher.prepare(&dest).await?;
    let payload = Bytes::from(vec![b'h'; payload_size]);
    publisher.publish_n(&dest, m, 256, &payload).await?;
    let rss_after = rss();
    // What the stalled subscribers cost in queues (bounded by
    // limits.max_outbound_bytes each), when the broker's /metrics is known.
    let queued = match c.metrics_addr.as_deref() {
        Some(http) => crate::common::scrape(http, "ringcast_outbound_queued_bytes").await,
        None => None,
    };
    let elapsed = started.elapsed().as_secs_f64();
    drop((partial, stalled));

    let mut rec = Record::new("halfopen", c.target, &c.label);
    rec.set("connections", n);
    rec.set("partial_open", partial_open);
    rec.set("stalled_open", stalled_open);
    rec.set("n", m);
    rec.set("payload", payload_size);
    rec.set("elapsed_s", round(elapsed, 3));
    let kib = |v: Option<u64>| v.map_or(serde_json::Value::Null, Into::into);
    rec.set("rss_before_kib", kib(rss_before));
    rec.set("rss_open_kib", kib(rss_open));
    rec.set("rss_after_kib", kib(rss_after));
    if let Some(q) = queued {
        rec.set("outbound_queued_bytes", q);
    }
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let per = after.saturating_sub(before) as f64 / (2 * n).max(1) as f64;
        rec.set("rss_per_conn_kib", round(per, 2));
    }
    Ok(rec)
}
