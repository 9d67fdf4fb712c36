//! `group`: consumer groups with explicit acks. N events are published to
//! one topic / stream first (timed on its own, not part of the figure); then
//! W workers, each on its own connection, take them through a consumer
//! group and acknowledge every event individually, until all N are acked.
//!
//! - ringcast: `Client::consume` (a group created with `earliest` start),
//!   `Job::ack` for every job, the acks pipelined (each awaits the broker's
//!   `Settled`, which comes once the ack is stored under the durability mode).
//! - Redis Streams: `XGROUP CREATE key g 0`, then per worker a loop of one
//!   pipeline per round trip: an `XACK key g id` for each entry of the last
//!   read (one command per entry) followed by `XREADGROUP GROUP g w COUNT k
//!   STREAMS key >` (with `BLOCK 100` only when there is nothing to ack).
//! - JetStream: a durable pull consumer (`AckExplicit`), each worker reading
//!   it through `async-nats`' pull stream (`max_messages_per_batch` k) and
//!   calling `ack()` for every message (a publish to the reply subject, which
//!   the server does not answer); the clock stops once every worker has
//!   acked its messages and flushed its connection (PING/PONG), and the
//!   consumer's ack floor is checked afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;

use crate::common::{
    nats_connect, redis_config, redis_url, ringcast_connect, round, stream_name, CpuMeter,
    Publisher, Record, Target,
};
use crate::Common;

/// The group's (and JetStream consumer's) ceiling on events handed out and
/// not acked: room for every worker's window twice over.
fn max_ack_pending(workers: usize, batch: usize) -> usize {
    (2 * workers * batch).max(1_000)
}

/// Counts acked events over all workers and wakes the waiter at `n`.
struct Progress {
    n: u64,
    acked: AtomicU64,
    redelivered: AtomicU64,
    done: tokio::sync::Notify,
}

impl Progress {
    fn add(&self, k: u64) {
        if k > 0 && self.acked.fetch_add(k, Ordering::AcqRel) + k >= self.n {
            self.done.notify_one();
        }
    }
}

/// Waits until every event is acked, or fails when a worker stopped first
/// (workers run until aborted) or nothing was acked for `idle`.
/// Spawns `workers`, waits until every event is acked (see [`wait_done`])
/// and `settled` resolves, and returns the seconds from the spawn to then;
/// the workers are stopped whatever the outcome.
async fn timed_workers<W>(
    progress: &Progress,
    idle: Duration,
    workers: impl Iterator<Item = W>,
    settled: impl std::future::Future<Output = Result<()>>,
) -> Result<f64>
where
    W: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let started = Instant::now();
    let mut tasks: Vec<_> = workers.map(tokio::spawn).collect();
    let done = wait_done(progress, &mut tasks, idle).await;
    let done = match done {
        Ok(()) => settled.await,
        Err(e) => Err(e),
    };
    let elapsed = started.elapsed().as_secs_f64();
    for t in &tasks {
        t.abort();
    }
    done.map(|()| elapsed)
}

async fn wait_done(
    progress: &Progress,
    workers: &mut [tokio::task::JoinHandle<Result<()>>],
    idle: Duration,
) -> Result<()> {
    let mut seen = progress.acked.load(Ordering::Acquire);
    loop {
        if seen >= progress.n {
            return Ok(());
        }
        let any_ended = futures::future::select_all(workers.iter_mut());
        tokio::select! {
            _ = progress.done.notified() => return Ok(()),
            (r, i, _) = any_ended => {
                return match r {
                    Ok(Ok(())) => Err(anyhow!("worker {i} ended early")),
                    Ok(Err(e)) => Err(e.context(format!("worker {i}"))),
                    Err(e) => Err(anyhow!("worker {i} panicked: {e}")),
                };
            }
            _ = tokio::time::sleep(idle) => {
                let now = progress.acked.load(Ordering::Acquire);
                if now == seen {
                    bail!("stalled: {now} of {} acked, none for {idle:?}", progress.n);
                }
                seen = now;
            }
        }
    }
}

/// `group`: see the module documentation.
pub async fn group(
    c: &Common,
    n: u64,
    workers: usize,
    payload_size: usize,
    batch: usize,
) -> Result<Record> {
    if !matches!(
        c.target,
        Target::Ringcast | Target::RedisStreams | Target::NatsJetstream
    ) {
        bail!("group runs against ringcast, redis-streams and nats-jetstream");
    }
    let workers = workers.max(1);
    let batch = batch.max(1);
    let dest = format!("{}.group{workers}", c.dest);
    let group = "workers";

    // Untimed: the events, published once.
    let publisher = Publisher::connect(c.target, &c.addr, 1024, c.retain).await?;
    publisher.prepare(&dest).await?;
    let payload = Bytes::from(vec![b'x'; payload_size]);
    let published = Instant::now();
    publisher.publish_n(&dest, n, 1024, &payload).await?;
    let publish_s = published.elapsed().as_secs_f64();
    drop(publisher);

    let progress = Arc::new(Progress {
        n,
        acked: AtomicU64::new(0),
        redelivered: AtomicU64::new(0),
        done: tokio::sync::Notify::new(),
    });
    let idle = Duration::from_secs(20);
    let mut rec = Record::new("group", c.target, &c.label);
    let (cpu, elapsed) = match c.target {
        Target::Ringcast => {
            // Untimed: the group and one connection per worker.
            let admin = ringcast_connect(&c.addr).await?;
            admin
                .create_group(
                    dest.as_str(),
                    group,
                    ringcast_client::GroupOptions {
                        start: ringcast_client::GroupStart::Earliest,
                        max_ack_pending: max_ack_pending(workers, batch) as u32,
                        ..Default::default()
                    },
                    false,
                )
                .await
                .context("creating the group")?;
            let mut clients = Vec::with_capacity(workers);
            for _ in 0..workers {
                clients.push(ringcast_connect(&c.addr).await?);
            }
            let cpu = CpuMeter::start(c.server_pid, c.metrics_addr.as_deref()).await;
            let workers = clients.into_iter().enumerate().map(|(i, client)| {
                ringcast_worker(client, dest.clone(), group, i, batch, progress.clone())
            });
            let elapsed = timed_workers(&progress, idle, workers, async { Ok(()) }).await?;
            let info = admin.group_info(dest.as_str(), group).await?;
            rec.set("group_ack_floor", info.ack_floor);
            rec.set("group_last_offset", info.last_offset);
            rec.set("group_pending", info.pending);
            rec.set("group_redelivered", info.redelivered);
            (cpu, elapsed)
        }
        Target::RedisStreams => {
            let client = redis::Client::open(redis_url(&c.addr))?;
            let mut admin = client
                .get_multiplexed_async_connection_with_config(&redis_config())
                .await?;
            let _: () = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&dest)
                .arg(group)
                .arg("0")
                .query_async(&mut admin)
                .await
                .context("XGROUP CREATE")?;
            let mut conns = Vec::with_capacity(workers);
            for _ in 0..workers {
                conns.push(
                    client
                        .get_multiplexed_async_connection_with_config(&redis_config())
                        .await?,
                );
            }
            let cpu = CpuMeter::start(c.server_pid, None).await;
            let workers = conns.into_iter().enumerate().map(|(i, conn)| {
                redis_worker(conn, dest.clone(), group, i, batch, progress.clone())
            });
            let elapsed = timed_workers(&progress, idle, workers, async { Ok(()) }).await?;
            // XPENDING summary: [count, min, max, consumers].
            let pending: redis::Value = redis::cmd("XPENDING")
                .arg(&dest)
                .arg(group)
                .query_async(&mut admin)
                .await?;
            if let redis::Value::Array(v) = pending {
                if let Some(redis::Value::Int(k)) = v.first() {
                    rec.set("group_pending", *k);
                }
            }
            (cpu, elapsed)
        }
        Target::NatsJetstream => {
            use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
            let name = stream_name(&dest);
            let admin = async_nats::jetstream::new(nats_connect(&c.addr).await?);
            let stream = admin
                .get_stream(&name)
                .await
                .map_err(|e| anyhow!("getting stream {name}: {e}"))?;
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
                .create_consumer(pull::Config {
                    durable_name: Some(group.to_owned()),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    max_ack_pending: max_ack_pending(workers, batch) as i64,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("creating the durable consumer: {e}"))?;
            let mut clients = Vec::with_capacity(workers);
            let mut consumers = Vec::with_capacity(workers);
            for _ in 0..workers {
                let client = nats_connect(&c.addr).await?;
                let js = async_nats::jetstream::new(client.clone());
                let s = js
                    .get_stream(&name)
                    .await
                    .map_err(|e| anyhow!("getting stream {name}: {e}"))?;
                let consumer: async_nats::jetstream::consumer::PullConsumer = s
                    .get_consumer(group)
                    .await
                    .map_err(|e| anyhow!("getting the consumer: {e}"))?;
                clients.push(client);
                consumers.push(consumer);
            }
            let cpu = CpuMeter::start(c.server_pid, None).await;
            let workers = consumers
                .into_iter()
                .map(|consumer| jetstream_worker(consumer, batch, progress.clone()));
            // Every ack publish has left the client and been processed once
            // its connection's PING is answered: the clock stops after that.
            let flushed = async {
                for client in &clients {
                    client.flush().await?;
                }
                Ok(())
            };
            let elapsed = timed_workers(&progress, idle, workers, flushed).await?;
            // Untimed check that the server took every ack.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let info = consumer
                    .info()
                    .await
                    .map_err(|e| anyhow!("consumer info: {e}"))?;
                if info.ack_floor.stream_sequence >= n || Instant::now() >= deadline {
                    rec.set("group_ack_floor", info.ack_floor.stream_sequence);
                    rec.set("group_pending", info.num_ack_pending);
                    rec.set("group_redelivered", info.num_redelivered);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (cpu, elapsed)
        }
        _ => unreachable!("checked above"),
    };
    let acked = progress.acked.load(Ordering::Acquire);
    rec.set("workers", workers);
    rec.set("batch", batch);
    rec.set("payload", payload_size);
    rec.set("n", n);
    rec.set("acked", acked);
    rec.set(
        "redelivered_seen",
        progress.redelivered.load(Ordering::Acquire),
    );
    rec.set("publish_s", round(publish_s, 3));
    rec.set("publish_events_per_s", round(n as f64 / publish_s, 0));
    rec.set("elapsed_s", round(elapsed, 3));
    rec.set("events_per_s", round(acked as f64 / elapsed, 0));
    cpu.finish(&mut rec, acked).await;
    Ok(rec)
}

/// One ringcast worker: joins as `w<i>` with `batch` jobs in flight and acks
/// every job as it arrives, the acks pipelined; runs until aborted.
async fn ringcast_worker(
    client: ringcast_client::Client,
    dest: String,
    group: &'static str,
    i: usize,
    batch: usize,
    progress: Arc<Progress>,
) -> Result<()> {
    use ringcast_client::{ConsumeOptions, ConsumerItem};
    let options = ConsumeOptions::new(format!("w{i}")).max_in_flight(batch as u32);
    let mut consumer = client.consume(dest, group, options).await?;
    let mut acks = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(settled) = acks.next(), if !acks.is_empty() => {
                let settled: ringcast_client::Settled = settled?;
                progress.add(settled.applied);
            }
            item = consumer.next() => match item {
                Some(Ok(ConsumerItem::Job(job))) => {
                    if job.attempt() > 1 {
                        progress.redelivered.fetch_add(1, Ordering::Relaxed);
                    }
                    acks.push(async move { job.ack().await });
                }
                Some(Ok(ConsumerItem::Gap(gap))) => bail!("unexpected gap {gap:?}"),
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the consumer ended"),
            },
        }
    }
}

/// One Redis worker: see the module documentation; runs until aborted.
async fn redis_worker(
    mut conn: redis::aio::MultiplexedConnection,
    dest: String,
    group: &'static str,
    i: usize,
    batch: usize,
    progress: Arc<Progress>,
) -> Result<()> {
    let consumer = format!("w{i}");
    let mut to_ack: Vec<String> = Vec::new();
    loop {
        let mut pipe = redis::pipe();
        for id in &to_ack {
            pipe.cmd("XACK").arg(&dest).arg(group).arg(id);
        }
        let read = pipe
            .cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg(&consumer)
            .arg("COUNT")
            .arg(batch);
        if to_ack.is_empty() {
            read.arg("BLOCK").arg(100);
        }
        read.arg("STREAMS").arg(&dest).arg(">");
        let mut replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let reply = replies
            .pop()
            .ok_or_else(|| anyhow!("empty pipeline reply"))?;
        let acked: u64 = replies
            .iter()
            .map(|v| match v {
                redis::Value::Int(k) => *k as u64,
                _ => 0,
            })
            .sum();
        progress.add(acked);
        to_ack.clear();
        if matches!(reply, redis::Value::Nil) {
            continue; // BLOCK timed out
        }
        let read: redis::streams::StreamReadReply = redis::FromRedisValue::from_redis_value(reply)?;
        for key in read.keys {
            to_ack.extend(key.ids.into_iter().map(|e| e.id));
        }
    }
}

/// One JetStream worker: pulls batches of `batch` and acks every message;
/// runs until aborted.
async fn jetstream_worker(
    consumer: async_nats::jetstream::consumer::PullConsumer,
    batch: usize,
    progress: Arc<Progress>,
) -> Result<()> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(batch)
        .messages()
        .await
        .map_err(|e| anyhow!("pull stream: {e}"))?;
    while let Some(msg) = messages.next().await {
        let msg = msg.map_err(|e| anyhow!("pull: {e}"))?;
        if msg.info().map(|i| i.delivered > 1).unwrap_or(false) {
            progress.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        msg.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
        progress.add(1);
    }
    bail!("the pull stream ended")
}
