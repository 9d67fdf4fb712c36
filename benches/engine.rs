//! Engine benchmarks: append (per durability mode, 1 and 16 publishers, plus
//! a raw "one sled flush + fdatasync per event" baseline), replay from
//! `Start::Earliest`, and in-process fan-out. Every figure is events/s.
//!
//! Run with `cargo bench --bench engine`; sample counts and times are kept
//! small so the whole run takes a few minutes on 2 cores.

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use ringcast::config::Durability;
use ringcast::engine::{Delivery, Engine, EngineOptions, NewEvent, Start};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

const PAYLOAD_LEN: usize = 128;
const EVENT_TYPE: &str = "bench";
const TOPIC: &str = "bench";

/// Events per append iteration (all publishers together; divisible by 16).
const APPEND_EVENTS: u64 = 640;
/// Events retained by the replay topic.
const REPLAY_EVENTS: u64 = 100_000;
/// Events published per fan-out iteration.
const FANOUT_EVENTS: u64 = 1_000;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Engine options of `durability`, storing under `dir` unless in memory.
fn options(dir: &std::path::Path, durability: Durability) -> EngineOptions {
    match durability {
        Durability::Memory => EngineOptions::memory(),
        d => EngineOptions::persistent(dir, d),
    }
}

fn payload() -> Bytes {
    Bytes::from(vec![0xAB_u8; PAYLOAD_LEN])
}

fn event(payload: &Bytes) -> NewEvent {
    NewEvent::new(EVENT_TYPE, payload.clone())
}

/// Keys of `keyed_event`: unique across the whole run, as an SDK's are.
static NEXT_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// An event with a fresh 32-byte idempotency key (the SDK's key length).
fn keyed_event(payload: &Bytes) -> NewEvent {
    let n = NEXT_KEY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    event(payload).key(format!("{n:032x}"))
}

/// Publishes `count` events in batches, outside any measurement.
fn prefill(rt: &Runtime, engine: &Engine, count: u64) {
    let payload = payload();
    rt.block_on(async {
        let mut left = count;
        while left > 0 {
            let n = left.min(1_000);
            let batch = (0..n).map(|_| event(&payload)).collect();
            engine
                .publish_batch(TOPIC, batch)
                .await
                .expect("prefill publish");
            left -= n;
        }
    });
}

/// `APPEND_EVENTS` events from `publishers` concurrent tasks, each awaiting
/// its own ack before publishing the next.
async fn append_round(engine: &Engine, publishers: u64, payload: &Bytes) {
    let per = APPEND_EVENTS / publishers;
    let tasks: Vec<_> = (0..publishers)
        .map(|_| {
            let engine = engine.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                for _ in 0..per {
                    engine
                        .publish(TOPIC, event(&payload))
                        .await
                        .expect("publish");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("publisher task");
    }
}

/// Like [`append_round`], but each publisher keeps `window` publishes in
/// flight, as one pipelining SDK connection does.
async fn append_round_pipelined(
    engine: &Engine,
    publishers: u64,
    window: usize,
    payload: &Bytes,
    keys: bool,
) {
    use futures::stream::{FuturesUnordered, StreamExt};
    let per = APPEND_EVENTS / publishers;
    let tasks: Vec<_> = (0..publishers)
        .map(|_| {
            let engine = engine.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut in_flight: FuturesUnordered<ringcast::engine::PendingPublish> =
                    FuturesUnordered::new();
                for _ in 0..per {
                    if in_flight.len() == window {
                        in_flight
                            .next()
                            .await
                            .expect("one in flight")
                            .expect("publish");
                    }
                    let event = if keys {
                        keyed_event(&payload)
                    } else {
                        event(&payload)
                    };
                    in_flight.push(
                        engine
                            .start_publish(TOPIC, vec![event])
                            .await
                            .expect("queue publish"),
                    );
                }
                while let Some(r) = in_flight.next().await {
                    r.expect("publish");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("publisher task");
    }
}

fn append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(APPEND_EVENTS));
    let payload = payload();

    for (name, durability) in [
        ("memory", Durability::Memory),
        ("interval", Durability::Interval),
        ("fsync", Durability::Fsync),
    ] {
        for publishers in [1_u64, 16] {
            let dir = tempfile::tempdir().expect("tempdir");
            let engine = Engine::open(options(dir.path(), durability)).expect("open engine");
            // Start in the steady state of a long-lived topic: the ring is
            // full (default retention), so every commit also trims.
            let retained = engine.info(TOPIC).map_or(0, |i| i.retained_events);
            let max_events = EngineOptions::memory().topics.max_events;
            prefill(&rt, &engine, max_events.saturating_sub(retained));
            group.bench_function(BenchmarkId::new(name, publishers), |b| {
                b.to_async(&rt)
                    .iter(|| append_round(&engine, publishers, &payload));
            });
            if durability == Durability::Fsync && publishers == 16 {
                // 16 publishers pipelining 16 publishes each (SDK behaviour).
                group.bench_function(BenchmarkId::new("fsync_pipelined_x16", publishers), |b| {
                    b.to_async(&rt)
                        .iter(|| append_round_pipelined(&engine, publishers, 16, &payload, false));
                });
            }
            rt.block_on(engine.close()).expect("close engine");
            drop(engine);
        }
    }

    // Baseline: one sled flush (+ fdatasync, as sled's flush is only
    // sync_file_range) per event, no group commit.
    group.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(None)
        .open()
        .expect("open sled");
    let data_file = File::open(dir.path().join("db")).expect("open sled data file");
    let value = vec![0xAB_u8; PAYLOAD_LEN];
    let mut key = 0_u64;
    group.bench_function("fsync_one_flush_per_event", |b| {
        b.iter(|| {
            key += 1;
            db.insert(key.to_be_bytes(), value.as_slice())
                .expect("insert");
            db.flush().expect("flush");
            data_file.sync_data().expect("fdatasync");
        });
    });
    drop(db);
    group.finish();
}

fn replay(c: &mut Criterion) {
    let rt = runtime();
    let mut options = EngineOptions::memory();
    options.topics.max_events = 200_000;
    options.topics.max_bytes = bytesize::ByteSize::gib(1);
    let engine = Engine::open(options).expect("open engine");
    prefill(&rt, &engine, REPLAY_EVENTS);
    let info = engine.info(TOPIC).expect("topic info");
    assert_eq!(info.retained_events, REPLAY_EVENTS, "replay topic not full");

    let mut group = c.benchmark_group("replay");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(REPLAY_EVENTS));
    group.bench_function("earliest_100k", |b| {
        b.to_async(&rt).iter(|| async {
            let mut sub = engine
                .subscribe(TOPIC, vec![], Start::Earliest)
                .expect("subscribe");
            let mut got = 0;
            while got < REPLAY_EVENTS {
                match sub.recv().await {
                    Some(Delivery::Event(e)) => {
                        std::hint::black_box(&e);
                        got += 1;
                    }
                    other => panic!("replay: unexpected delivery {other:?}"),
                }
            }
        });
    });
    group.finish();
    rt.block_on(engine.close()).expect("close engine");
}

fn fanout(c: &mut Criterion) {
    let rt = runtime();
    let payload = payload();
    let mut group = c.benchmark_group("fanout");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sampling_mode(SamplingMode::Flat);

    for subscribers in [1_usize, 100, 1000] {
        let engine = Engine::open(EngineOptions::memory()).expect("open engine");
        // Subscribers still to receive all of the current round's events.
        let remaining = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Notify::new());
        let tasks: Vec<_> = (0..subscribers)
            .map(|_| {
                let mut sub = engine
                    .subscribe(TOPIC, vec![], Start::Live)
                    .expect("subscribe");
                let (remaining, done) = (remaining.clone(), done.clone());
                rt.spawn(async move {
                    let mut got = 0_u64;
                    while let Some(d) = sub.recv().await {
                        match d {
                            Delivery::Event(_) => {
                                got += 1;
                                if got.is_multiple_of(FANOUT_EVENTS)
                                    && remaining.fetch_sub(1, Ordering::AcqRel) == 1
                                {
                                    done.notify_one();
                                }
                            }
                            Delivery::End { .. } => break,
                            Delivery::Gap(g) => {
                                // A gap makes the figures meaningless; stop
                                // rather than hang waiting for the round.
                                eprintln!("fanout: subscriber got a gap: {g:?}");
                                std::process::exit(1);
                            }
                        }
                    }
                })
            })
            .collect();

        group.throughput(Throughput::Elements(FANOUT_EVENTS * subscribers as u64));
        group.bench_function(BenchmarkId::from_parameter(subscribers), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (engine, remaining, done, payload) = (&engine, &remaining, &done, &payload);
                async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        remaining.store(subscribers, Ordering::Release);
                        for _ in 0..FANOUT_EVENTS {
                            engine
                                .publish(TOPIC, event(payload))
                                .await
                                .expect("publish");
                        }
                        done.notified().await;
                    }
                    start.elapsed()
                }
            });
        });

        rt.block_on(async {
            engine.delete(TOPIC).await.expect("delete topic");
            for t in tasks {
                t.await.expect("subscriber task");
            }
            engine.close().await.expect("close engine");
        });
    }
    group.finish();
}

/// The cost of idempotency keys: the same pipelined load (16 publishers,
/// 16 in flight each, 128 B) without and with a fresh key per event, side
/// by side per durability mode.
fn append_keys(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append_keys");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(APPEND_EVENTS));
    let payload = payload();
    // The default 2-minute window, and a 1-second one: what a big key
    // index costs (cache misses, growth) beside the per-key work.
    let default_window = EngineOptions::memory().topics.dedup_window;
    for (name, durability, window) in [
        ("memory", Durability::Memory, default_window),
        (
            "memory_window_1s",
            Durability::Memory,
            Duration::from_secs(1),
        ),
        ("interval", Durability::Interval, default_window),
        ("fsync", Durability::Fsync, default_window),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut options = options(dir.path(), durability);
        options.topics.dedup_window = window;
        let engine = Engine::open(options).expect("open engine");
        // Both in the steady state of a full ring, so neither runs first
        // into an emptier one.
        prefill(&rt, &engine, EngineOptions::memory().topics.max_events);
        for keys in [false, true] {
            let id = format!("{name}_{}", if keys { "keys" } else { "no_keys" });
            group.bench_function(BenchmarkId::new(id, 16), |b| {
                b.to_async(&rt)
                    .iter(|| append_round_pipelined(&engine, 16, 16, &payload, keys));
            });
        }
        rt.block_on(engine.close()).expect("close engine");
        drop(engine);
    }
    group.finish();
}

criterion_group!(benches, append, append_keys, replay, fanout);
criterion_main!(benches);
