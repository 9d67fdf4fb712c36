//! The storage layout by record size: events/s of persisted appends, and
//! the bytes written to disk per event and per payload byte, for payloads
//! of 128 B and 4 KiB in passes of 1, 16 and 256 events (one publish of a
//! batch is one pass: one record in the event files).
//!
//! `cargo bench --bench layout` prints criterion's events/s, and after
//! each group a line per configuration with what the process wrote
//! (`/proc/self/io` `write_bytes`, accounted when pages are dirtied) and
//! what the data dir takes on disk, divided by the payload published.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringcast::config::Durability;
use ringcast::engine::{Engine, EngineOptions, NewEvent};
use tokio::runtime::Runtime;

const TOPIC: &str = "layout";
/// Events a topic retains by default (`topics.max_events`).
const RETAINED_EVENTS: u64 = 10_000;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Bytes this process caused to be written to storage so far.
fn written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    field("write_bytes:").saturating_sub(field("cancelled_write_bytes:"))
}

/// Allocated bytes of every file under `dir`.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

fn layout(c: &mut Criterion) {
    let rt = runtime();
    for payload_len in [128usize, 4096] {
        let mut group = c.benchmark_group(format!("layout/{payload_len}B"));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(3));
        group.warm_up_time(Duration::from_millis(500));
        let mut lines = Vec::new();
        for durability in [Durability::Interval, Durability::Fsync] {
            for per_pass in [1u64, 16, 256] {
                let dir = tempfile::tempdir().expect("temp dir");
                let engine = rt
                    .block_on(async {
                        Engine::open(EngineOptions::persistent(dir.path(), durability))
                    })
                    .expect("engine opens");
                let payload = Bytes::from(vec![0x5a; payload_len]);
                let (mut events, before) = (0u64, written());
                let id = format!("{durability:?}/{per_pass}").to_lowercase();
                group.throughput(Throughput::Elements(per_pass));
                group.bench_function(BenchmarkId::from_parameter(&id), |b| {
                    b.iter(|| {
                        let batch = (0..per_pass)
                            .map(|_| NewEvent::new("e", payload.clone()))
                            .collect();
                        rt.block_on(engine.publish_batch(TOPIC, batch))
                            .expect("publish");
                        events += per_pass;
                    })
                });
                rt.block_on(engine.close()).expect("close");
                if events > 0 {
                    let payload_bytes = (events * payload_len as u64) as f64;
                    let retained = (events.min(RETAINED_EVENTS) * payload_len as u64) as f64;
                    let wrote = written().saturating_sub(before) as f64;
                    lines.push(format!(
                        "layout/{payload_len}B/{id}: {:.0} B written per event, write amplification \
                         {:.2}x, disk {:.2}x the retained payload ({events} events)",
                        wrote / events as f64,
                        wrote / payload_bytes,
                        disk_usage(dir.path()) as f64 / retained,
                    ));
                }
                drop(engine);
            }
        }
        group.finish();
        for line in lines {
            println!("{line}");
        }
    }
}

criterion_group!(benches, layout);
criterion_main!(benches);
