//! Opening and releasing an engine directly, for the storage tests.

use std::path::Path;
use std::time::Duration;

use ringcast::config::Durability;
use ringcast::engine::{Engine, EngineError, EngineOptions};

/// Persistent options on `dir` that neither trim by count nor run
/// maintenance during a test.
pub fn options(dir: &Path, durability: Durability) -> EngineOptions {
    let mut options = EngineOptions::persistent(dir, durability);
    options.topics.max_events = 1_000_000;
    options.maintenance_interval = Duration::from_secs(3600);
    options
}

/// Opens the engine off the async workers: recovery reads and fsyncs.
pub async fn try_open(options: EngineOptions) -> Result<Engine, EngineError> {
    tokio::task::spawn_blocking(move || Engine::open(options))
        .await
        .expect("the open task does not panic")
}

/// [`try_open`], which must succeed.
pub async fn open(options: EngineOptions) -> Engine {
    try_open(options).await.expect("the engine opens")
}

/// Drops the last handle of `engine`, which joins its writer thread and
/// releases sled's lock, without marking the run clean.
pub async fn release(engine: Engine) {
    tokio::task::spawn_blocking(move || drop(engine))
        .await
        .expect("dropping the engine does not panic");
}

/// Shuts the engine down cleanly and releases the data directory.
pub async fn close(engine: Engine) {
    engine.close().await.expect("the engine closes cleanly");
    release(engine).await;
}
