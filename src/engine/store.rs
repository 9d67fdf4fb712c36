//! The only module that touches sled: recovery, and the single writer
//! thread that assigns offsets, group-commits batches and then publishes
//! them to the rings.
//!
//! # Layout in sled (one tree)
//! - `M` + topic name → [`TopicMeta`]: generation, epoch, next offset,
//!   versions per type, trimmed-through offset, sealed time. Rewritten after
//!   the records of every batch that touches the topic, so counters survive
//!   even when every event of a type has been trimmed.
//! - `E` + name length (u8) + name + generation (u64 BE) + first offset
//!   (u64 BE) → one record: the events of one publish (or one slice of a
//!   large batch). Records are deleted once every event in them is trimmed;
//!   recovery skips events at or below `trimmed_through`, and deletes records
//!   of another generation (left by a delete that a crash interrupted).
//!
//! Writes are plain inserts in a fixed order (records, then pruning, then
//! metas) rather than `apply_batch`, which in sled 0.34 forces two
//! synchronous buffer writes per batch. sled recovers a prefix of its log,
//! and recovery takes the maximum of the meta and the records for every
//! counter, so any prefix recovers consistently.
//! - `_run` → [`RunMarker`]: whether the last run closed cleanly.
//!
//! # Durability
//! sled's `flush` ends in `sync_file_range`, which survives `kill -9` but not
//! power loss, so `fsync` mode follows every flush with `fdatasync` of the
//! data file (and of blob files when a record was large enough to become
//! one). Concurrent publishes queue while a flush runs and share the next.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::event::{Ack, Event, NewEvent};
use super::settings::{Durability, TopicsConfig};
use super::topic::{Counters, Topic, TopicState};
use super::{now_ms, EngineError};

/// Largest record written; a bigger batch is split. (64 KiB, which keeps
/// sled's 16-key leaves under its blob threshold, measured 20-25% slower
/// for 4 KiB events; the blob files sled writes instead are fsynced.)
const RECORD_MAX: usize = 256 * 1024;
/// sled segment size: log entries above a quarter of it become blob files.
const SEGMENT_SIZE: usize = 8 * 1024 * 1024;
/// Most operations folded into one batch.
const MAX_OPS: usize = 4096;

const META: u8 = b'M';
const RECORD: u8 = b'E';
const RUN_MARKER: &[u8] = b"_run";

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Persisted per-topic state.
#[derive(Debug, Serialize, Deserialize)]
struct TopicMeta {
    generation: u64,
    epoch: u64,
    next_offset: u64,
    versions: Vec<(String, u64)>,
    trimmed_through: u64,
    sealed_at_ms: Option<u64>,
}

/// Whether the previous run closed cleanly, and in which mode.
#[derive(Debug, Serialize, Deserialize)]
struct RunMarker {
    clean: bool,
    durability: u8,
}

#[derive(Serialize)]
struct StoredEventRef<'a> {
    offset: u64,
    version: u64,
    timestamp_ms: u64,
    event_type: &'a str,
    headers: &'a [(String, String)],
    payload: &'a serde_bytes::Bytes,
}

#[derive(Deserialize)]
struct StoredEvent {
    offset: u64,
    version: u64,
    timestamp_ms: u64,
    event_type: String,
    headers: Vec<(String, String)>,
    payload: serde_bytes::ByteBuf,
}

fn meta_key(topic: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + topic.len());
    k.push(META);
    k.extend_from_slice(topic.as_bytes());
    k
}

fn record_prefix(topic: &str, generation: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + topic.len() + 16);
    k.push(RECORD);
    // Topic names are 1..=255 bytes (validated), so the length fits a u8
    // and no name's prefix is another's.
    k.push(topic.len() as u8);
    k.extend_from_slice(topic.as_bytes());
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

fn record_key(topic: &str, generation: u64, first_offset: u64) -> Vec<u8> {
    let mut k = record_prefix(topic, generation);
    k.extend_from_slice(&first_offset.to_be_bytes());
    k
}

/// Splits a record key into topic name and generation.
fn parse_record_key(key: &[u8]) -> Option<(&str, u64)> {
    let len = usize::from(*key.get(1)?);
    if key.first() != Some(&RECORD) || key.len() != 2 + len + 16 {
        return None;
    }
    let name = std::str::from_utf8(&key[2..2 + len]).ok()?;
    let generation = u64::from_be_bytes(key[2 + len..2 + len + 8].try_into().ok()?);
    Some((name, generation))
}

/// Writes of one pass, applied in order.
#[derive(Default)]
struct Writes(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl Writes {
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.0.push((key, Some(value)));
    }

    fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.0.push((key.into(), None));
    }

    fn apply(self, db: &sled::Db) -> sled::Result<()> {
        for (key, value) in self.0 {
            match value {
                Some(v) => db.insert(key, v)?,
                None => db.remove(key)?,
            };
        }
        Ok(())
    }
}

fn storage_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Storage(e.to_string())
}

/// A topic as recovered from disk, ready to be installed in the engine.
pub(crate) struct Recovered {
    pub topic: Arc<Topic>,
    writer: WriterTopic,
}

/// What the writer alone knows of a topic: counters including events not
/// yet committed, and which records hold which offsets.
struct WriterTopic {
    topic: Arc<Topic>,
    generation: u64,
    counters: Counters,
    segments: VecDeque<(u64, u64)>,
    sealed_at_ms: Option<u64>,
}

impl WriterTopic {
    /// The meta to persist, given the topic's current epoch and first
    /// retained offset.
    fn meta(&self, epoch: u64, first_retained: u64) -> TopicMeta {
        TopicMeta {
            generation: self.generation,
            epoch,
            next_offset: self.counters.next_offset,
            versions: self
                .counters
                .versions
                .iter()
                .map(|(t, v)| (t.to_string(), *v))
                .collect(),
            trimmed_through: first_retained - 1,
            sealed_at_ms: self.sealed_at_ms,
        }
    }

    fn from_topic(topic: &Arc<Topic>) -> Self {
        let state = topic.state.read();
        Self {
            topic: topic.clone(),
            generation: state.generation,
            counters: state.counters.clone(),
            segments: VecDeque::new(),
            sealed_at_ms: state.sealed_at_ms,
        }
    }
}

/// A request to the writer thread.
pub(crate) enum Op {
    /// Assign, persist and commit events.
    Append {
        topic: Arc<Topic>,
        events: Vec<NewEvent>,
        ack: oneshot::Sender<Result<Vec<Ack>, EngineError>>,
    },
    /// Persist the seal after every earlier append.
    Seal {
        topic: Arc<Topic>,
        ack: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Remove every record and the meta of the topic.
    Delete {
        topic: Arc<Topic>,
        ack: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Rewrite the topic's meta and drop trimmed records.
    Touch { topic: Arc<Topic> },
    /// Flush and fsync everything before it.
    Sync {
        ack: oneshot::Sender<Result<(), EngineError>>,
    },
}

/// Handle to the sled store and its writer thread.
pub(crate) struct Store {
    tx: mpsc::UnboundedSender<Op>,
    db: sled::Db,
    syncer: Arc<FileSync>,
    writer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    flusher: parking_lot::Mutex<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

/// Forces sled's data to stable storage.
struct FileSync {
    dir: PathBuf,
    data_file: File,
    /// Highest blob file (sled names them by log sequence number) already
    /// fsynced; only newer ones need it.
    synced_blobs: parking_lot::Mutex<u64>,
}

impl FileSync {
    /// Flushes sled and fsyncs what it wrote. sled writes any log entry
    /// larger than a quarter segment (a big value, or a big consolidated
    /// page) to its own blob file without syncing it, so new blob files are
    /// fsynced too (with their directory); the old ones already were.
    fn sync(&self, db: &sled::Db) -> Result<(), EngineError> {
        db.flush().map_err(storage_err)?;
        self.data_file.sync_data().map_err(storage_err)?;
        let mut synced = self.synced_blobs.lock();
        let dir = self.dir.join("blobs");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let mut newest = *synced;
        for entry in entries.flatten() {
            let Some(lsn) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if lsn <= *synced {
                continue;
            }
            match File::open(entry.path()).and_then(|f| f.sync_data()) {
                Ok(()) => newest = newest.max(lsn),
                // sled removed a superseded blob meanwhile: nothing to keep.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(storage_err(e)),
            }
        }
        if newest > *synced {
            File::open(&dir)
                .and_then(|f| f.sync_all())
                .map_err(storage_err)?;
            *synced = newest;
        }
        Ok(())
    }
}

/// Opens sled under `dir`. sled's lock on its data file can outlive the
/// previous `Db` by a moment (its I/O threads finish last), so a lock held
/// when restarting in the same process, or right after the previous daemon
/// exited, is retried briefly before it counts as another running broker.
fn open_sled(dir: &Path) -> Result<sled::Db, EngineError> {
    const LOCK_WAIT: Duration = Duration::from_secs(3);
    let started = Instant::now();
    loop {
        let opened = sled::Config::new()
            .path(dir)
            .segment_size(SEGMENT_SIZE)
            .flush_every_ms(None)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                // sled reports the lock as `Other` with this text.
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(EngineError::Storage(format!(
                    "cannot open {}: {e}",
                    dir.display()
                )))
            }
        }
    }
}

/// What recovery needs from the engine besides the directory.
pub(crate) struct OpenContext<'a> {
    /// Retention settings per topic name.
    pub topics: &'a TopicsConfig,
    /// Topic names counted under their own metric label.
    pub metered: &'a [String],
    /// The engine-wide retained-bytes counter.
    pub global_bytes: Arc<std::sync::atomic::AtomicU64>,
}

/// What [`Store::open`] recovered.
pub(crate) struct Opened {
    pub store: Store,
    pub topics: Vec<Arc<Topic>>,
    pub events: u64,
}

impl Store {
    /// Opens (or creates) the database under `dir`, rebuilds every topic
    /// and starts the writer thread.
    pub fn open(
        dir: &Path,
        durability: Durability,
        flush_interval: Duration,
        ctx: OpenContext<'_>,
    ) -> Result<Opened, EngineError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| EngineError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        let db = open_sled(dir)?;
        let data_file = File::open(dir.join("db")).map_err(storage_err)?;
        let syncer = Arc::new(FileSync {
            dir: dir.to_owned(),
            data_file,
            synced_blobs: parking_lot::Mutex::new(0),
        });

        let previous: Option<RunMarker> = db
            .get(RUN_MARKER)
            .map_err(storage_err)?
            .and_then(|v| decode(&v).ok());
        // An unclean stop in a mode that acks before fsync may have lost
        // acknowledged events; their offsets would be reused. A new epoch
        // makes resuming clients get `epoch_changed` instead of a silent hole.
        let rotate = previous.is_some_and(|m| !m.clean && m.durability != 0);
        let now = now_ms();
        let mut metas: HashMap<String, (TopicMeta, Vec<Vec<StoredEvent>>)> = HashMap::new();
        for item in db.scan_prefix([META]) {
            let (key, value) = item.map_err(storage_err)?;
            let name = std::str::from_utf8(&key[1..]).map_err(storage_err)?;
            metas.insert(name.to_owned(), (decode(&value)?, Vec::new()));
        }
        let mut orphans = 0;
        for item in db.scan_prefix([RECORD]) {
            let (key, value) = item.map_err(storage_err)?;
            match parse_record_key(&key).and_then(|(name, g)| Some((metas.get_mut(name)?, g))) {
                Some(((meta, records), generation)) if meta.generation == generation => {
                    records.push(decode(&value)?);
                }
                _ => {
                    db.remove(&key).map_err(storage_err)?;
                    orphans += 1;
                }
            }
        }
        if orphans > 0 {
            tracing::info!(records = orphans, "removed records of deleted topics");
        }
        let mut recovered = Vec::new();
        let mut events = 0;
        for (name, (meta, records)) in metas {
            let r = recover_topic(&name, meta, records, &ctx, now, rotate);
            events += r.topic.state.read().ring.len() as u64;
            recovered.push(r);
        }
        // New epochs are persisted before the marker that would no longer
        // ask for them.
        if rotate {
            for r in &recovered {
                let (epoch, first) = {
                    let s = r.topic.state.read();
                    (s.epoch, s.first_offset())
                };
                db.insert(
                    meta_key(&r.topic.name),
                    encode(&r.writer.meta(epoch, first))?,
                )
                .map_err(storage_err)?;
            }
            syncer.sync(&db)?;
        }
        let marker = RunMarker {
            clean: false,
            durability: match durability {
                Durability::Fsync => 0,
                _ => 1,
            },
        };
        db.insert(RUN_MARKER, encode(&marker)?)
            .map_err(storage_err)?;
        syncer.sync(&db)?;

        let (tx, rx) = mpsc::unbounded_channel();
        let topics: Vec<Arc<Topic>> = recovered.iter().map(|r| r.topic.clone()).collect();
        let writer = Writer {
            metrics: super::EngineMetrics::new(),
            db: db.clone(),
            syncer: syncer.clone(),
            fsync: durability == Durability::Fsync,
            topics: recovered
                .into_iter()
                .map(|r| (r.topic.name.clone(), r.writer))
                .collect(),
            dirty: HashMap::new(),
        };
        let writer = std::thread::Builder::new()
            .name("ringcast-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(storage_err)?;

        let flusher = (durability == Durability::Interval).then(|| {
            let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
            let (db, syncer) = (db.clone(), syncer.clone());
            let handle = std::thread::Builder::new()
                .name("ringcast-flusher".into())
                .spawn(move || {
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        stop_rx.recv_timeout(flush_interval)
                    {
                        if let Err(e) = syncer.sync(&db) {
                            tracing::error!(error = %e, "periodic flush failed");
                        }
                    }
                });
            handle.map(|h| (stop_tx, h))
        });
        let flusher = flusher.transpose().map_err(storage_err)?;
        Ok(Opened {
            store: Store {
                tx,
                db,
                syncer,
                writer: parking_lot::Mutex::new(Some(writer)),
                flusher: parking_lot::Mutex::new(flusher),
            },
            topics,
            events,
        })
    }

    /// Queues an operation for the writer.
    pub fn send(&self, op: Op) -> Result<(), EngineError> {
        self.tx.send(op).map_err(|_| EngineError::ShuttingDown)
    }

    /// Waits until everything queued so far is on stable storage.
    pub async fn sync(&self) -> Result<(), EngineError> {
        let (ack, rx) = oneshot::channel();
        self.send(Op::Sync { ack })?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Drains the writer, fsyncs, and marks the run clean. Blocking.
    pub fn close(&self) -> Result<(), EngineError> {
        if let Some((stop, handle)) = self.flusher.lock().take() {
            drop(stop);
            let _ = handle.join();
        }
        let (ack, rx) = oneshot::channel();
        if self.tx.send(Op::Sync { ack }).is_ok() {
            rx.blocking_recv()
                .map_err(|_| EngineError::ShuttingDown)??;
        }
        let marker = RunMarker {
            clean: true,
            durability: 0,
        };
        self.db
            .insert(RUN_MARKER, encode(&marker)?)
            .map_err(storage_err)?;
        self.syncer.sync(&self.db)?;
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.flusher.lock().take() {
            drop(stop);
            let _ = handle.join();
        }
        // Closing the channel makes the writer finish what is queued and exit.
        let (tx, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, EngineError> {
    bincode::serde::encode_to_vec(value, bincode_config()).map_err(storage_err)
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, EngineError> {
    bincode::serde::decode_from_slice(bytes, bincode_config())
        .map(|(v, _)| v)
        .map_err(|e| EngineError::Storage(format!("corrupt record: {e}")))
}

fn recover_topic(
    name: &str,
    meta: TopicMeta,
    records: Vec<Vec<StoredEvent>>,
    ctx: &OpenContext<'_>,
    now: u64,
    rotate_epoch: bool,
) -> Recovered {
    let mut state = TopicState::new(
        meta.epoch,
        ctx.topics.retention_for(name),
        ctx.global_bytes.clone(),
    );
    state.generation = meta.generation;
    state.metered = ctx.metered.iter().any(|m| m == name);
    state.counters.next_offset = meta.next_offset.max(1);
    state.counters.versions = meta
        .versions
        .into_iter()
        .map(|(t, v)| (Arc::<str>::from(t), v))
        .collect();
    state.sealed_at_ms = meta.sealed_at_ms;
    state.sealed = meta.sealed_at_ms.is_some();
    let mut segments = VecDeque::new();
    for events in records {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            continue;
        };
        segments.push_back((first.offset, last.offset));
        for e in events {
            if e.offset <= meta.trimmed_through {
                continue;
            }
            if state.ring.back().is_some_and(|b| b.offset + 1 != e.offset) {
                tracing::error!(
                    topic = name,
                    offset = e.offset,
                    "hole in stored offsets; keeping the events after it"
                );
                state.clear_ring();
            }
            let event_type: Arc<str> =
                match state.counters.versions.get_key_value(e.event_type.as_str()) {
                    Some((k, _)) => k.clone(),
                    None => Arc::from(e.event_type),
                };
            let version = state
                .counters
                .versions
                .entry(event_type.clone())
                .or_insert(0);
            *version = (*version).max(e.version);
            let event = Arc::new(Event::new(
                e.offset,
                e.version,
                e.timestamp_ms,
                event_type,
                e.headers,
                Bytes::from(e.payload.into_vec()),
            ));
            state.counters.next_offset = state.counters.next_offset.max(e.offset + 1);
            state.push_back(event);
        }
    }
    state.trim(now);
    if rotate_epoch {
        state.epoch = super::new_epoch();
        tracing::warn!(
            topic = name,
            "unclean stop in a non-fsync mode: topic gets a new epoch"
        );
    }
    let topic = Topic::new(Arc::from(name), state, now);
    let writer = WriterTopic {
        counters: topic.state.read().counters.clone(),
        generation: meta.generation,
        topic: topic.clone(),
        segments,
        sealed_at_ms: meta.sealed_at_ms,
    };
    Recovered { topic, writer }
}

/// Encodes `events` (in offset order) into records of at most
/// `RECORD_MAX` bytes.
fn encode_records(batch: &mut Writes, topic: &str, wt: &mut WriterTopic, events: &[&Arc<Event>]) {
    let mut start = 0;
    while start < events.len() {
        let mut end = start;
        let mut size = 0;
        while end < events.len() && (end == start || size < RECORD_MAX) {
            size += events[end].retained_size() as usize;
            end += 1;
        }
        let chunk = &events[start..end];
        let refs: Vec<StoredEventRef<'_>> = chunk
            .iter()
            .map(|e| StoredEventRef {
                offset: e.offset,
                version: e.version,
                timestamp_ms: e.timestamp_ms,
                event_type: &e.event_type,
                headers: &e.headers,
                payload: serde_bytes::Bytes::new(&e.payload),
            })
            .collect();
        match encode(&refs) {
            Ok(value) => {
                let (first, last) = (chunk[0].offset, chunk[chunk.len() - 1].offset);
                batch.insert(record_key(topic, wt.generation, first), value);
                wt.segments.push_back((first, last));
            }
            Err(e) => tracing::error!(error = %e, "cannot encode record"),
        }
        start = end;
    }
}

/// What to do with an operation once its batch is durable.
enum Done {
    Append {
        topic: Arc<Topic>,
        events: Vec<Arc<Event>>,
        epoch: u64,
        ack: oneshot::Sender<Result<Vec<Ack>, EngineError>>,
    },
    Seal {
        topic: Arc<Topic>,
        at: u64,
        ack: oneshot::Sender<Result<(), EngineError>>,
    },
    Reply(oneshot::Sender<Result<(), EngineError>>),
}

struct Writer {
    metrics: super::EngineMetrics,
    db: sled::Db,
    syncer: Arc<FileSync>,
    fsync: bool,
    topics: HashMap<Arc<str>, WriterTopic>,
    /// Topics whose ring was trimmed since their records were last pruned.
    dirty: HashMap<Arc<str>, Arc<Topic>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut ops = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(mpsc::error::TryRecvError::Empty) if !self.dirty.is_empty() => {}
                Err(mpsc::error::TryRecvError::Empty) => match rx.blocking_recv() {
                    Some(op) => ops.push(op),
                    None => break,
                },
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
            while ops.len() < MAX_OPS {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            self.process(std::mem::take(&mut ops));
        }
        self.process(Vec::new());
        if let Err(e) = self.syncer.sync(&self.db) {
            tracing::error!(error = %e, "final flush failed");
        }
    }

    fn entry(&mut self, topic: &Arc<Topic>) -> &mut WriterTopic {
        let wt = self
            .topics
            .entry(topic.name.clone())
            .or_insert_with(|| WriterTopic::from_topic(topic));
        if !Arc::ptr_eq(&wt.topic, topic) {
            *wt = WriterTopic::from_topic(topic);
        }
        wt
    }

    fn process(&mut self, ops: Vec<Op>) {
        let started = Instant::now();
        let mut batch = Writes::default();
        let mut deleted_here: Vec<Arc<Topic>> = Vec::new();
        let mut touched: HashMap<Arc<str>, Arc<Topic>> = std::mem::take(&mut self.dirty);
        let mut done = Vec::with_capacity(ops.len());
        let now = now_ms();
        for op in ops {
            match op {
                Op::Append { topic, events, ack } => {
                    let epoch = topic.state.read().epoch;
                    let wt = self.entry(&topic);
                    let events: Vec<Arc<Event>> = events
                        .into_iter()
                        .map(|e| {
                            let (offset, version, event_type) = wt.counters.assign(&e.event_type);
                            Arc::new(Event::new(
                                offset, version, now, event_type, e.headers, e.payload,
                            ))
                        })
                        .collect();
                    // Encoded after the loop (from `done`): every append to a
                    // topic in this pass shares its records.
                    touched.insert(topic.name.clone(), topic.clone());
                    done.push(Done::Append {
                        topic,
                        events,
                        epoch,
                        ack,
                    });
                }
                Op::Seal { topic, ack } => {
                    let wt = self.entry(&topic);
                    let at = *wt.sealed_at_ms.get_or_insert(now);
                    touched.insert(topic.name.clone(), topic.clone());
                    done.push(Done::Seal { topic, at, ack });
                }
                Op::Delete { topic, ack } => {
                    // Appends of this pass to the deleted topic are not written.
                    deleted_here.push(topic.clone());
                    // The meta goes first: a crash mid-way leaves records of
                    // a generation no meta names, which recovery removes.
                    batch.remove(meta_key(&topic.name));
                    let generation = topic.state.read().generation;
                    if let Some(wt) = self.topics.get(&topic.name) {
                        if Arc::ptr_eq(&wt.topic, &topic) {
                            // Records of this very pass are not in sled yet.
                            for (first, _) in &wt.segments {
                                batch.remove(record_key(&topic.name, generation, *first));
                            }
                            self.topics.remove(&topic.name);
                        }
                    }
                    for key in self
                        .db
                        .scan_prefix(record_prefix(&topic.name, generation))
                        .keys()
                        .flatten()
                    {
                        batch.remove(key.to_vec());
                    }
                    if touched
                        .get(&topic.name)
                        .is_some_and(|t| Arc::ptr_eq(t, &topic))
                    {
                        touched.remove(&topic.name);
                    }
                    done.push(Done::Reply(ack));
                }
                Op::Touch { topic } => {
                    touched.insert(topic.name.clone(), topic);
                }
                Op::Sync { ack } => done.push(Done::Reply(ack)),
            }
        }
        let mut appended: Vec<(&Arc<Topic>, Vec<&Arc<Event>>)> = Vec::new();
        for d in &done {
            let Done::Append { topic, events, .. } = d else {
                continue;
            };
            if deleted_here.iter().any(|t| Arc::ptr_eq(t, topic)) {
                continue;
            }
            match appended.iter_mut().find(|(t, _)| Arc::ptr_eq(t, topic)) {
                Some((_, list)) => list.extend(events),
                None => appended.push((topic, events.iter().collect())),
            }
        }
        for (topic, events) in &appended {
            let wt = self.entry(topic);
            encode_records(&mut batch, &topic.name, wt, events);
        }
        for topic in touched.values() {
            let (epoch, first, deleted) = {
                let s = topic.state.read();
                (s.epoch, s.first_offset(), s.deleted)
            };
            if deleted {
                continue;
            }
            let wt = self.entry(topic);
            while let Some(&(seg_first, seg_last)) = wt.segments.front() {
                if seg_last >= first {
                    break;
                }
                batch.remove(record_key(&topic.name, wt.generation, seg_first));
                wt.segments.pop_front();
            }
            match encode(&wt.meta(epoch, first)) {
                Ok(value) => batch.insert(meta_key(&topic.name), value),
                Err(e) => tracing::error!(error = %e, "cannot encode topic meta"),
            }
        }
        let write_started = Instant::now();
        // A pass with nobody waiting (pruning only) needs no flush: what it
        // writes is re-derivable, and the next acknowledged pass covers it.
        let must_sync = if self.fsync {
            !done.is_empty()
        } else {
            done.iter().any(|d| matches!(d, Done::Reply(_)))
        };
        let result = batch.apply(&self.db).map_err(storage_err).and_then(|()| {
            if must_sync {
                self.syncer.sync(&self.db)
            } else {
                Ok(())
            }
        });
        self.metrics.flush_seconds.record(write_started.elapsed());
        tracing::trace!(ops = done.len(), elapsed = ?started.elapsed(), "batch written");
        if let Err(e) = &result {
            tracing::error!(error = %e, "storage write failed; publishes in this batch are refused");
            // Nothing of this batch reached the rings: rewind to what did.
            for topic in touched.values() {
                let wt = self.entry(topic);
                let state = topic.state.read();
                wt.counters = state.counters.clone();
                let next = state.next_offset();
                drop(state);
                while wt.segments.back().is_some_and(|(f, _)| *f >= next) {
                    wt.segments.pop_back();
                }
            }
        }
        let mut wake: HashMap<Arc<str>, Arc<Topic>> = HashMap::new();
        for d in done {
            match (d, &result) {
                (
                    Done::Append {
                        topic,
                        events,
                        epoch,
                        ack,
                    },
                    Ok(()),
                ) => {
                    let acks = events
                        .iter()
                        .map(|e| Ack {
                            epoch,
                            offset: e.offset,
                            version: e.version,
                        })
                        .collect();
                    let trimmed = {
                        let mut state = topic.state.write();
                        let before = state.first_offset();
                        super::count_published(
                            &self.metrics,
                            &topic.name,
                            state.metered,
                            events.len(),
                        );
                        state.push(events, now);
                        state.first_offset() != before
                    };
                    topic.touch(now);
                    if trimmed {
                        self.dirty.insert(topic.name.clone(), topic.clone());
                    }
                    wake.insert(topic.name.clone(), topic);
                    let _ = ack.send(Ok(acks));
                }
                (Done::Seal { topic, at, ack }, Ok(())) => {
                    topic.state.write().sealed_at_ms = Some(at);
                    wake.insert(topic.name.clone(), topic);
                    let _ = ack.send(Ok(()));
                }
                (Done::Reply(ack), Ok(())) => {
                    let _ = ack.send(Ok(()));
                }
                (Done::Append { ack, .. }, Err(e)) => {
                    let _ = ack.send(Err(e.clone()));
                }
                (Done::Seal { ack, .. } | Done::Reply(ack), Err(e)) => {
                    let _ = ack.send(Err(e.clone()));
                }
            }
        }
        // Only live rings need pruning.
        self.dirty.retain(|_, t| !t.state.read().deleted);
        for topic in wake.values() {
            topic.wake();
        }
    }
}
