//! The sled backend of the [`Log`] seam, and the only module that touches
//! sled: recovery, atomic passes, group-committed fsync, repair after a
//! storage error, and the checkpoint that detects a damaged data file.
//!
//! # Layout in sled (one tree)
//! - `M` + topic name → [`TopicMeta`]: generation, epoch, next offset,
//!   versions per type, trimmed-through offset, sealed time. Rewritten in
//!   every pass that touches the topic, so counters survive even when every
//!   event of a type has been trimmed.
//! - `R` + name length (u8) + name + generation (u64 BE) + first offset
//!   (u64 BE) → a [`RecordRef`]: where one record's bytes are in the
//!   event files (module [`files`](super::files)): the events of one topic
//!   that one or more consecutive passes appended, as bincode lists back to
//!   back, at most [`RECORD_MAX`] bytes. Each record's bytes are written
//!   once, outside sled: sled's pages hold values inline and rewrite whole
//!   leaves when they consolidate or split, which wrote 4–6× the payload
//!   when the records were sled values (BENCHMARKS.md, "Storage layout").
//!   Deleted once all its events are trimmed; records of another generation
//!   (left by a delete that a crash interrupted) are removed at recovery.
//! - `E` + the same key → one record stored inline (the layout before the
//!   event files): still read, trimmed and deleted, never written.
//! - `K` + name length (u8) + name + generation (u64 BE) + first offset
//!   (u64 BE) → [`KeysRef`]: where the idempotency keys of the events one
//!   pass appended to the topic are (a [`StoredKeys`], with the pass's
//!   time), in the keys files (`<data_dir>/keys/`, apart from the event
//!   files: keys live for the dedup window, records for the retention).
//!   Written in the same pass, before its records, so a key is never
//!   durable without being checked against them: recovery drops keys at
//!   offsets the records do not reach. Removed once older than the topic's
//!   dedup window, with the topic, and (by repair) when their pass failed.
//! - `D` + the same key → [`StoredKeys`] inline (the layout before the keys
//!   files): still read, expired and deleted, never written.
//! - `_run` → [`RunMarker`]: whether the last run closed cleanly.
//! - `_format` → the value format (3: records and keys may be in files; 2:
//!   every value is a CRC-32 of its body followed by the body; 1, the first
//!   format, had no checksum).
//!
//! A pass first writes its keys' and records' bytes to the active keys and
//! event files (one write each), then makes plain sled inserts in a fixed order (keys, records,
//! pruning, metas) rather than `apply_batch`, which in sled 0.34 forces two
//! synchronous buffer writes per batch. sled recovers a prefix of its log,
//! and recovery takes the maximum of the meta and the records for every
//! counter, so any prefix recovers consistently. In `interval` mode the
//! sled writes of the passes between two flusher ticks are coalesced per
//! key ([`Deferred`]) and applied at the tick, off the writer's path.
//!
//! # Durability
//! A sync `fdatasync`s the event files written since the last one, then
//! flushes sled and `fdatasync`s its data file (sled's `flush` ends in
//! `sync_file_range`, which survives `kill -9` but not power loss; blob
//! files sled wrote for large pages are synced too): an index entry is
//! never durable before the bytes it points to. `fsync` mode syncs every
//! pass before acknowledging it; concurrent publishes share one sync, a
//! pass being everything queued. An event file is removed only after the
//! sync that made the removal of its last record durable.
//!
//! # Failures
//! A failed insert, flush or fsync fails the whole pass: nothing of it is
//! acknowledged or reaches a ring, and this backend's counters stay as they
//! were (a pass is staged on copies and swapped in only on success). The
//! store is then `Degraded`: writes are refused until [`SledLog::repair`]
//! has reopened sled from disk (sled's own I/O errors are sticky), removed
//! whatever the failed pass left, restored any acknowledged event missing
//! from disk out of the rings, rewritten every meta from what was
//! acknowledged, and fsynced all of it. The writer retries that on its own,
//! so writes resume by themselves once, say, disk space is freed. The
//! failed fsync itself is never retried (after fsyncgate a retried fsync
//! can report success for pages the kernel dropped).
//!
//! # Damage
//! The checkpoint file `ringcast.state` (outside sled, written atomically)
//! holds every topic's counters as of the last clean stop, the last start,
//! and every few seconds of running. Recovery compares: a topic that comes
//! back with fewer offsets or lower versions than the checkpoint says, with
//! a record that fails its checksum (its index entry's, or its bytes' CRC
//! in the event file), whose event file is missing or too short, or with a
//! hole in its offsets, is damaged. It keeps what is readable, keeps its
//! counters at least where the checkpoint had them (no offset is ever
//! reused), gets a new epoch (so every resuming client gets
//! `gap(epoch_changed)`), and is logged at error; the damaged record's
//! index entry is removed, so the next start does not report it again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::dedup::{self, Original, Window};
use super::event::Event;
use super::files::{EventFiles, RecordRef, EVENTS_DIR, KEYS_DIR};
use super::log::{
    append_outcome, Counters, FastMap, Health, Log, Outcome, Step, TopicId, TopicImage,
};
use super::settings::Durability;
use super::EngineError;

/// Largest record written; a bigger batch is split. (64 KiB, which keeps
/// sled's 16-key leaves under its blob threshold, measured 20-25% slower
/// for 4 KiB events; the blob files sled writes instead are fsynced.)
const RECORD_MAX: usize = 256 * 1024;
/// sled segment size: log entries above a quarter of it become blob files.
const SEGMENT_SIZE: usize = 8 * 1024 * 1024;
/// sled's page cache: it holds the index, metas, keys and groups (event
/// bytes are in the event files, and in the rings); 1 GiB by default.
const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;
/// How often the checkpoint is rewritten while running.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// The checkpoint file, beside sled's files.
const CHECKPOINT_FILE: &str = "ringcast.state";

const META: u8 = b'M';
/// A record stored inline (the layout before event files; still read).
const RECORD: u8 = b'E';
/// A record in the event files: its [`RecordRef`].
const RECORD_REF: u8 = b'R';
const KEYS: u8 = b'D';
/// The idempotency keys of one pass in the event files: a [`KeysRef`].
const KEYS_REF: u8 = b'K';
const GROUP: u8 = b'G';
const RUN_MARKER: &[u8] = b"_run";
const FORMAT_KEY: &[u8] = b"_format";
/// Values carry a CRC-32 of their body (2); records may be in event files
/// (3). A data dir of a newer format is refused.
const FORMAT: u8 = 3;

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Persisted per-topic state.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// The idempotency keys one pass appended to a topic; written with
/// borrowed keys (`K = &str`, the same bytes), read with owned ones.
#[derive(Debug, Serialize, Deserialize)]
struct StoredKeys<K = String> {
    /// The pass's time: the window of every key here counts from it.
    at_ms: u64,
    /// `(key, offset, version)` in offset order.
    keys: Vec<(K, u64, u64)>,
}

/// Where the keys of one pass are: sled's value under a `K` key.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct KeysRef {
    /// Their bytes (an encoded [`StoredKeys`]) in the event files.
    at: RecordRef,
    /// The pass's time (also in the bytes): expiry without a read.
    at_ms: u64,
}

/// One stored keys value of a topic.
#[derive(Debug, Clone, Copy)]
struct KeysAt {
    /// The first offset its keys name (the key's last part in sled).
    first: u64,
    /// The pass's time: its keys expire together.
    at_ms: u64,
    /// Where the bytes are; `None` for an inline value (a `D` key).
    at: Option<RecordRef>,
}

impl KeysAt {
    /// Its key in sled.
    fn key(&self, topic: &str, generation: u64) -> Vec<u8> {
        let kind = if self.at.is_some() { KEYS_REF } else { KEYS };
        let mut k = prefix(kind, topic, generation);
        k.extend_from_slice(&self.first.to_be_bytes());
        k
    }
}

/// What this backend remembers of one topic incarnation's keys.
#[derive(Debug, Default)]
struct TopicKeys {
    generation: u64,
    /// The topic's dedup window, as its last append (or the config at
    /// recovery) gave it.
    window_ms: u64,
    window: Window,
    /// Every stored keys value, oldest first.
    records: VecDeque<KeysAt>,
}

impl TopicKeys {
    /// The stored keys values older than the window.
    fn expired_records(&self, now_ms: u64) -> impl Iterator<Item = &KeysAt> + '_ {
        self.records
            .iter()
            .take_while(move |k| k.at_ms.saturating_add(self.window_ms) <= now_ms)
    }

    /// Forgets what [`Self::expired_records`] named, once it is removed.
    fn expire(&mut self, now_ms: u64) {
        while self
            .records
            .front()
            .is_some_and(|k| k.at_ms.saturating_add(self.window_ms) <= now_ms)
        {
            self.records.pop_front();
        }
        self.window.expire(now_ms, self.window_ms);
    }

    /// Takes in the keys of a durable pass made at `now_ms`, stored at `at`.
    fn merge(&mut self, pass: PassKeys, now_ms: u64, at: Option<RecordRef>) {
        self.window_ms = pass.window_ms;
        if let Some(first) = pass.first_offset() {
            self.records.push_back(KeysAt {
                first,
                at_ms: now_ms,
                at,
            });
        }
        for (key, original) in pass.keys {
            self.window.insert(key, original);
        }
    }
}

/// The keys one pass adds to a topic incarnation, until it is durable. All
/// are stamped with the pass's time, so none expires within the pass.
struct PassKeys {
    generation: u64,
    window_ms: u64,
    /// For the lookups of later appends in the same pass.
    index: FastMap<Arc<str>, Original>,
    /// In offset order.
    keys: Vec<(Arc<str>, Original)>,
}

impl PassKeys {
    fn new(generation: u64) -> Self {
        Self {
            generation,
            window_ms: 0,
            index: FastMap::default(),
            keys: Vec::new(),
        }
    }

    fn get(&self, key: &str) -> Option<Original> {
        self.index.get(key).copied()
    }

    fn insert(&mut self, key: Arc<str>, original: Original) {
        self.index.insert(key.clone(), original);
        self.keys.push((key, original));
    }

    fn first_offset(&self) -> Option<u64> {
        self.keys.first().map(|(_, o)| o.offset)
    }
}

/// The checkpoint file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    topics: Vec<CheckpointTopic>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointTopic {
    name: String,
    generation: u64,
    next_offset: u64,
    versions: Vec<(String, u64)>,
}

fn meta_key(topic: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + topic.len());
    k.push(META);
    k.extend_from_slice(topic.as_bytes());
    k
}

/// `kind` + name length + name + generation: the prefix of a topic
/// incarnation's records (`E`) or keys (`D`).
fn prefix(kind: u8, topic: &str, generation: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + topic.len() + 16);
    k.push(kind);
    // Topic names are 1..=255 bytes (validated), so the length fits a u8
    // and no name's prefix is another's.
    k.push(topic.len() as u8);
    k.extend_from_slice(topic.as_bytes());
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

/// `G` + name length + topic name: the prefix of a topic's group records.
fn group_prefix(topic: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + topic.len());
    k.push(GROUP);
    k.push(topic.len() as u8);
    k.extend_from_slice(topic.as_bytes());
    k
}

/// The key of one group's record: its topic's group prefix + group name.
fn group_key(topic: &str, group: &str) -> Vec<u8> {
    let mut k = group_prefix(topic);
    k.extend_from_slice(group.as_bytes());
    k
}

/// Splits a group key into topic and group name.
fn parse_group_key(key: &[u8]) -> Option<(&str, &str)> {
    let len = usize::from(*key.get(1)?);
    if key.first() != Some(&GROUP) || key.len() <= 2 + len {
        return None;
    }
    let topic = std::str::from_utf8(&key[2..2 + len]).ok()?;
    let group = std::str::from_utf8(&key[2 + len..]).ok()?;
    Some((topic, group))
}

/// Splits a record (`E`) or keys (`D`) key into topic name, generation and
/// first offset.
fn parse_key(kind: u8, key: &[u8]) -> Option<(&str, u64, u64)> {
    let len = usize::from(*key.get(1)?);
    if key.first() != Some(&kind) || key.len() != 2 + len + 16 {
        return None;
    }
    let name = std::str::from_utf8(&key[2..2 + len]).ok()?;
    let generation = u64::from_be_bytes(key[2 + len..2 + len + 8].try_into().ok()?);
    let first = u64::from_be_bytes(key[2 + len + 8..].try_into().ok()?);
    Some((name, generation, first))
}

/// Prefixes `body` with its CRC-32.
fn checksummed(body: Vec<u8>) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + body.len());
    v.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    v.extend_from_slice(&body);
    v
}

/// The body of a stored value, if its checksum holds.
fn verified(format: u8, value: &[u8]) -> Option<&[u8]> {
    if format < 2 {
        return Some(value);
    }
    let (crc, body) = value.split_at_checked(4)?;
    (crc32fast::hash(body).to_be_bytes() == crc).then_some(body)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, EngineError> {
    bincode::serde::encode_to_vec(value, bincode_config())
        .map(checksummed)
        .map_err(storage_err)
}

fn decode<T: for<'de> Deserialize<'de>>(format: u8, bytes: &[u8]) -> Option<T> {
    let body = verified(format, bytes)?;
    bincode::serde::decode_from_slice(body, bincode_config())
        .ok()
        .map(|(v, _)| v)
}

fn storage_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Storage(e.to_string())
}

/// Storage faults to inject, for tests of the failure rules: the Nth sled
/// write or fsync from now fails, and repairs can be made to fail too.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Faults {
    fail_write_at: AtomicU64,
    writes: AtomicU64,
    fail_sync_at: AtomicU64,
    syncs: AtomicU64,
    fail_file_sync_at: AtomicU64,
    file_syncs: AtomicU64,
    failing_repairs: AtomicU64,
}

impl Faults {
    /// Makes the `n`th write (one insert or remove, counted from now) fail.
    pub fn fail_nth_write(&self, n: u64) {
        self.writes.store(0, Ordering::SeqCst);
        self.fail_write_at.store(n, Ordering::SeqCst);
    }

    /// Makes the `n`th fsync (counted from now) fail.
    pub fn fail_nth_sync(&self, n: u64) {
        self.syncs.store(0, Ordering::SeqCst);
        self.fail_sync_at.store(n, Ordering::SeqCst);
    }

    /// Makes the `n`th fsync of an event or keys file (counted from now)
    /// fail, as an I/O error of that file would.
    pub fn fail_nth_file_sync(&self, n: u64) {
        self.file_syncs.store(0, Ordering::SeqCst);
        self.fail_file_sync_at.store(n, Ordering::SeqCst);
    }

    fn file_sync(&self) -> Result<(), EngineError> {
        if Self::hit(&self.file_syncs, &self.fail_file_sync_at) {
            return Err(EngineError::Storage(
                "injected event file fsync failure".into(),
            ));
        }
        Ok(())
    }

    /// Makes the next `n` repairs fail (as if the disk were still full).
    pub fn fail_repairs(&self, n: u64) {
        self.failing_repairs.store(n, Ordering::SeqCst);
    }

    fn hit(counter: &AtomicU64, at: &AtomicU64) -> bool {
        let target = at.load(Ordering::SeqCst);
        if target == 0 {
            return false;
        }
        if counter.fetch_add(1, Ordering::SeqCst) + 1 == target {
            at.store(0, Ordering::SeqCst);
            return true;
        }
        false
    }

    fn write(&self) -> Result<(), EngineError> {
        if Self::hit(&self.writes, &self.fail_write_at) {
            return Err(EngineError::Storage("injected write failure".into()));
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), EngineError> {
        if Self::hit(&self.syncs, &self.fail_sync_at) {
            return Err(EngineError::Storage("injected fsync failure".into()));
        }
        Ok(())
    }

    fn repair(&self) -> Result<(), EngineError> {
        let left = self.failing_repairs.load(Ordering::SeqCst);
        if left > 0 {
            self.failing_repairs.store(left - 1, Ordering::SeqCst);
            return Err(EngineError::Storage("injected repair failure".into()));
        }
        Ok(())
    }
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

    /// The same writes with every insert before every removal, and no
    /// removal of a key that is also inserted (its insert replaces it).
    fn inserts_first(self) -> Writes {
        let inserted: HashSet<Vec<u8>> = self
            .0
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        let (inserts, removals): (Vec<_>, Vec<_>) =
            self.0.into_iter().partition(|(_, v)| v.is_some());
        let removals = removals.into_iter().filter(|(k, _)| !inserted.contains(k));
        Writes(inserts.into_iter().chain(removals).collect())
    }

    fn apply(self, db: &sled::Db, faults: Option<&Faults>) -> Result<(), EngineError> {
        apply_writes(
            self.0.iter().map(|(k, v)| (&k[..], v.as_deref())),
            db,
            faults,
        )
    }
}

/// Applies `(key, value, or None to remove)` writes to sled in order.
fn apply_writes<'a>(
    writes: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    db: &sled::Db,
    faults: Option<&Faults>,
) -> Result<(), EngineError> {
    for (key, value) in writes {
        if let Some(f) = faults {
            f.write()?;
        }
        match value {
            Some(v) => db.insert(key, v).map_err(storage_err)?,
            None => db.remove(key).map_err(storage_err)?,
        };
    }
    Ok(())
}

/// Deferred writes as [`apply_writes`] takes them (borrowed: a failed
/// sync keeps them for the repair).
fn deferred_writes(taken: &[DeferredWrite]) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> + '_ {
    taken.iter().map(|(k, (_, v))| (&k[..], v.as_deref()))
}

/// The sled writes of `interval` mode passes, applied (and synced) by the
/// flusher's next tick instead of one by one: a key written many times in
/// between (a topic's meta, a growing record) is written once, in the order
/// of its last write. A prefix of that order is not always a state some
/// sequence of passes left (a group record may come before the record
/// growth it counts on); recovery tolerates that: counters take the maximum
/// of meta and records, keys beyond the records are dropped, and a group
/// is cut back to its topic (`fit_to`). Only ever applied after the files
/// the writes point into are fsynced.
#[derive(Default)]
struct Deferred {
    seq: u64,
    writes: HashMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
}

impl Deferred {
    fn add(&mut self, writes: Writes) {
        for (key, value) in writes.0 {
            self.seq += 1;
            self.writes.insert(key, (self.seq, value));
        }
    }

    /// Everything deferred, in the order of each key's last write.
    fn take(&mut self) -> Vec<DeferredWrite> {
        let mut all: Vec<_> = self.writes.drain().collect();
        all.sort_unstable_by_key(|(_, (seq, _))| *seq);
        all
    }

    /// Puts back what a failed sync took (a key written since keeps its
    /// newer value), so that a repair still applies it.
    fn restore(&mut self, taken: Vec<DeferredWrite>) {
        for (key, write) in taken {
            self.writes.entry(key).or_insert(write);
        }
    }
}

/// One deferred write: key, (sequence of its last write, value or removal).
type DeferredWrite = (Vec<u8>, (u64, Option<Vec<u8>>));

/// What this backend knows of one topic incarnation: the counters it
/// assigns on and which records hold which offsets.
#[derive(Debug, Clone)]
struct SledTopic {
    generation: u64,
    epoch: u64,
    counters: Counters,
    sealed_at_ms: Option<u64>,
    trimmed_through: u64,
    /// Every stored record, in offset order.
    segments: VecDeque<Segment>,
}

/// One stored record of a topic.
#[derive(Debug, Clone, Copy)]
struct Segment {
    first: u64,
    last: u64,
    /// Where its bytes are; `None` for an inline record (an `E` key).
    at: Option<RecordRef>,
}

impl Segment {
    /// The record's key in sled.
    fn key(&self, topic: &str, generation: u64) -> Vec<u8> {
        let kind = if self.at.is_some() {
            RECORD_REF
        } else {
            RECORD
        };
        let mut k = prefix(kind, topic, generation);
        k.extend_from_slice(&self.first.to_be_bytes());
        k
    }
}

/// The records one pass writes to the event files: their bytes, appended
/// to the active file in one write before sled's inserts, and the index
/// changes to count once the pass is durable.
#[derive(Default)]
struct PassFile {
    /// Active file and the position of `buf`'s first byte in it.
    at: Option<(u64, u64)>,
    buf: Vec<u8>,
    /// Records added (`true`) and removed (`false`).
    changes: Vec<(RecordRef, bool)>,
}

impl PassFile {
    /// Appends one record's bytes (encoded by `encode` into the buffer)
    /// and returns where they will be.
    fn push(
        &mut self,
        files: &parking_lot::Mutex<EventFiles>,
        last: u64,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), EngineError>,
    ) -> Result<RecordRef, EngineError> {
        let (file, base) = match self.at {
            Some(at) => at,
            None => *self.at.insert(files.lock().append_position()?),
        };
        let start = self.buf.len();
        encode(&mut self.buf)?;
        let bytes = &self.buf[start..];
        let r = RecordRef {
            file,
            pos: base + start as u64,
            len: u32::try_from(bytes.len()).map_err(storage_err)?,
            crc: crc32fast::hash(bytes),
            last,
        };
        self.changes.push((r, true));
        Ok(r)
    }

    /// Counts a record's removal (once the pass is durable).
    fn removed(&mut self, segment: &Segment) {
        if let Some(r) = segment.at {
            self.changes.push((r, false));
        }
    }
}

impl SledTopic {
    fn new(id: &TopicId) -> Self {
        Self {
            generation: id.generation,
            epoch: id.epoch,
            counters: Counters::new(),
            sealed_at_ms: None,
            trimmed_through: 0,
            segments: VecDeque::new(),
        }
    }

    fn meta(&self) -> TopicMeta {
        TopicMeta {
            generation: self.generation,
            epoch: self.epoch,
            next_offset: self.counters.next_offset,
            versions: self.counters.version_list(),
            trimmed_through: self.trimmed_through,
            sealed_at_ms: self.sealed_at_ms,
        }
    }
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
    fn new(dir: &Path) -> Result<Self, EngineError> {
        Ok(Self {
            dir: dir.to_owned(),
            data_file: File::open(dir.join("db")).map_err(storage_err)?,
            synced_blobs: parking_lot::Mutex::new(0),
        })
    }

    /// Flushes sled and fsyncs what it wrote. sled writes any log entry
    /// larger than a quarter segment (a big value, or a big consolidated
    /// page) to its own blob file without syncing it, so new blob files are
    /// fsynced too (with their directory); the old ones already were.
    fn sync(&self, db: &sled::Db, faults: Option<&Faults>) -> Result<(), EngineError> {
        db.flush().map_err(storage_err)?;
        if let Some(f) = faults {
            f.sync()?;
        }
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
        let config = sled::Config::new()
            .path(dir)
            .segment_size(SEGMENT_SIZE)
            .cache_capacity(CACHE_CAPACITY)
            .flush_every_ms(None);
        // sled 0.34 can panic on some damaged files instead of returning
        // an error; that must be a clear refusal to start, not a crash.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open())).map_err(|_| {
            EngineError::Storage(format!(
                "the data in {} is damaged beyond what sled can recover; restore it from a backup or move it away",
                dir.display()
            ))
        })?;
        match opened {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                // sled reports the lock as `Other` with this text.
                if e.to_string().contains("could not acquire lock") =>
            {
                if started.elapsed() >= LOCK_WAIT {
                    return Err(EngineError::Storage(format!(
                        "{} is in use by another ringcastd (its lock is held); stop it or choose another storage.data_dir",
                        dir.display()
                    )));
                }
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

/// What recovery found wrong with the data dir.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Topics that came back damaged and got a new epoch.
    pub damaged_topics: Vec<String>,
    /// Records that failed their checksum or could not be decoded.
    pub bad_records: u64,
}

/// The sled backend.
pub(crate) struct SledLog {
    dir: PathBuf,
    fsync: bool,
    faults: Option<Arc<Faults>>,
    db: parking_lot::RwLock<sled::Db>,
    syncer: parking_lot::RwLock<Arc<FileSync>>,
    /// The event files (locked after `keys` and `deferred`, briefly).
    files: parking_lot::Mutex<EventFiles>,
    /// The files of the idempotency keys (locked after `files`).
    keys_files: parking_lot::Mutex<EventFiles>,
    /// `interval` mode: sled writes waiting for the flusher's next tick.
    deferred: Option<parking_lot::Mutex<Deferred>>,
    /// Serialises syncs (a pass's, the flusher's, repair's): the sled
    /// writes one sync takes reach sled before those of the next (locked
    /// after `topics` and `keys`, before `deferred`).
    sync_lock: parking_lot::Mutex<()>,
    /// The buffer of the last pass's records, kept for the next one (no
    /// allocation, page faults and regrowth per pass).
    pass_buf: parking_lot::Mutex<Vec<u8>>,
    /// Only the writer thread persists; the flusher of `interval` mode
    /// syncs beside it.
    topics: parking_lot::Mutex<FastMap<Arc<str>, SledTopic>>,
    /// Idempotency keys per topic incarnation, as committed (locked after
    /// `topics`; only passes and repair change it).
    keys: parking_lot::Mutex<FastMap<Arc<str>, TopicKeys>>,
    /// Why writes are refused, while they are.
    failed: parking_lot::Mutex<Option<String>>,
    /// `failed.is_some()`, readable without the lock (checked per publish).
    degraded: std::sync::atomic::AtomicBool,
    last_checkpoint: parking_lot::Mutex<Instant>,
    flusher: parking_lot::Mutex<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

/// What [`SledLog::open`] returns.
pub(crate) struct Opened {
    pub log: Arc<SledLog>,
    pub topics: Vec<TopicImage>,
    pub report: RecoveryReport,
    /// Every stored group record: topic, group, the engine's bytes.
    pub groups: Vec<(String, String, Vec<u8>)>,
}

impl SledLog {
    /// Opens (or creates) the database under `dir` and recovers every topic
    /// and the idempotency keys still inside their window (`window_for`
    /// gives a topic's window in ms; `now_ms` is the time to measure from).
    pub fn open(
        dir: &Path,
        durability: Durability,
        flush_interval: Duration,
        faults: Option<Arc<Faults>>,
        window_for: &dyn Fn(&str) -> u64,
        now_ms: u64,
    ) -> Result<Opened, EngineError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| EngineError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        let db = open_sled(dir)?;
        let syncer = Arc::new(FileSync::new(dir)?);
        let checkpoint = read_checkpoint(dir);
        let mut files = EventFiles::open(dir, EVENTS_DIR)?;
        let mut keys_files = EventFiles::open(dir, KEYS_DIR)?;
        let (recovered, sled_topics, report) = recover(&db, &mut files, checkpoint.as_ref(), dir)?;
        let keys = recover_keys(&db, &mut keys_files, &sled_topics, window_for, now_ms)?;
        files.start();
        keys_files.start();
        let groups = recover_groups(&db)?;
        let marker = RunMarker {
            clean: false,
            durability: match durability {
                Durability::Fsync => 0,
                _ => 1,
            },
        };
        db.insert(RUN_MARKER, encode(&marker)?)
            .map_err(storage_err)?;
        db.insert(FORMAT_KEY, vec![FORMAT]).map_err(storage_err)?;
        let files = parking_lot::Mutex::new(files);
        let keys_files = parking_lot::Mutex::new(keys_files);
        // Nothing new is in the files yet: sled, then the files no record
        // points into are removed.
        syncer.sync(&db, None)?;
        for f in [&files, &keys_files] {
            let mut f = f.lock();
            let plan = f.plan_sync();
            plan.run(|| Ok(()))?;
            f.synced(plan, true, false);
        }
        write_checkpoint(dir, &sled_topics)?;

        let log = Arc::new(SledLog {
            dir: dir.to_owned(),
            fsync: durability == Durability::Fsync,
            faults,
            db: parking_lot::RwLock::new(db),
            syncer: parking_lot::RwLock::new(syncer),
            files,
            keys_files,
            deferred: (durability == Durability::Interval)
                .then(|| parking_lot::Mutex::new(Deferred::default())),
            pass_buf: parking_lot::Mutex::new(Vec::new()),
            sync_lock: parking_lot::Mutex::new(()),
            topics: parking_lot::Mutex::new(sled_topics),
            keys: parking_lot::Mutex::new(keys),
            failed: parking_lot::Mutex::new(None),
            degraded: std::sync::atomic::AtomicBool::new(false),
            last_checkpoint: parking_lot::Mutex::new(Instant::now()),
            flusher: parking_lot::Mutex::new(None),
        });
        if durability == Durability::Interval {
            let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
            let weak = Arc::downgrade(&log);
            let handle = std::thread::Builder::new()
                .name("ringcast-flusher".into())
                .spawn(move || {
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        stop_rx.recv_timeout(flush_interval)
                    {
                        let Some(log) = weak.upgrade() else { return };
                        log.periodic_sync();
                    }
                })
                .map_err(storage_err)?;
            *log.flusher.lock() = Some((stop_tx, handle));
        }
        Ok(Opened {
            log,
            topics: recovered,
            report,
            groups,
        })
    }

    /// Stops the `interval` mode flusher thread, if any.
    fn stop_flusher(&self) {
        if let Some((stop, handle)) = self.flusher.lock().take() {
            drop(stop);
            // The flusher itself may drop the last handle (it holds one
            // while it syncs): it ends on its own then.
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }

    fn faults(&self) -> Option<&Faults> {
        self.faults.as_deref()
    }

    fn sync_now(&self) -> Result<(), EngineError> {
        self.sync_with(Writes::default())
    }

    /// A sync that also writes `writes` (a pass's sled writes in `fsync`
    /// mode) after the deferred ones: see [`Self::sync_locked`].
    fn sync_with(&self, writes: Writes) -> Result<(), EngineError> {
        let _sync = self.sync_lock.lock();
        self.sync_locked(writes)
    }

    /// One sync, with `sync_lock` held. The deferred writes and the plan
    /// (which files to fsync, which dead ones to remove) are taken together;
    /// the event and keys files are fsynced first, then the sled writes are
    /// applied and sled is synced, so no index entry reaches sled (whose
    /// buffers and `Drop` write on their own) before the bytes it points
    /// to are durable. On failure the deferred writes are kept for the
    /// repair, and a failed file fsync poisons the plan's files.
    fn sync_locked(&self, writes: Writes) -> Result<(), EngineError> {
        let db = self.db.read().clone();
        let syncer = self.syncer.read().clone();
        let (taken, plans) = {
            let mut deferred = self.deferred.as_ref().map(|d| d.lock());
            let taken = deferred.as_mut().map(|d| d.take()).unwrap_or_default();
            let plans = self.file_sets().map(|f| f.lock().plan_sync());
            (taken, plans)
        };
        let file_faults = || self.faults().map_or(Ok(()), Faults::file_sync);
        if let Err(e) = plans.iter().try_for_each(|p| p.run(file_faults)) {
            self.keep_deferred(taken);
            for (files, plan) in self.file_sets().into_iter().zip(plans) {
                files.lock().synced(plan, false, true);
            }
            return Err(e);
        }
        let applied = apply_writes(deferred_writes(&taken), &db, self.faults())
            .and_then(|()| writes.apply(&db, self.faults()));
        let result = applied.and_then(|()| syncer.sync(&db, self.faults()));
        if result.is_err() {
            self.keep_deferred(taken);
        }
        for (files, plan) in self.file_sets().into_iter().zip(plans) {
            files.lock().synced(plan, result.is_ok(), false);
        }
        result
    }

    /// The event files and the keys files, in the order syncs take them.
    fn file_sets(&self) -> [&parking_lot::Mutex<EventFiles>; 2] {
        [&self.files, &self.keys_files]
    }

    /// Puts taken deferred writes back after a failed sync.
    fn keep_deferred(&self, taken: Vec<DeferredWrite>) {
        if let Some(d) = &self.deferred {
            d.lock().restore(taken);
        }
    }

    fn fail(&self, e: &EngineError) {
        let mut failed = self.failed.lock();
        if failed.is_none() {
            tracing::error!(error = %e, "storage failed; writes are refused until it is repaired (retried with backoff)");
            metrics::counter!(crate::metrics::STORAGE_ERRORS).increment(1);
        }
        *failed = Some(e.to_string());
        self.degraded.store(true, Ordering::Release);
    }

    /// `interval` mode: fsync what was written, then checkpoint the
    /// counters as of before the fsync (those are durable now).
    fn periodic_sync(&self) {
        let due = self.last_checkpoint.lock().elapsed() >= CHECKPOINT_EVERY;
        // Taken before the sync (and before `sync_lock`, which comes after
        // `topics`): counters as of then are durable after it.
        let snapshot = due.then(|| self.topics.lock().clone());
        let _sync = self.sync_lock.lock();
        // Checked under the lock: a repair holds it from start to end.
        if self.failed.lock().is_some() {
            return;
        }
        match self.sync_locked(Writes::default()) {
            Ok(()) => {
                if let Some(topics) = snapshot {
                    self.checkpoint(&topics);
                }
            }
            Err(e) => self.fail(&e),
        }
    }

    fn checkpoint(&self, topics: &FastMap<Arc<str>, SledTopic>) {
        match write_checkpoint(&self.dir, topics) {
            Ok(()) => *self.last_checkpoint.lock() = Instant::now(),
            // Not a failed write of events: the next one may succeed, and
            // an old checkpoint only detects less.
            Err(e) => tracing::warn!(error = %e, "cannot write the checkpoint file"),
        }
    }

    /// One pass (see [`Log::persist`]); a storage error it returns fails
    /// the store.
    fn persist_pass(&self, steps: &mut [Step], now: u64) -> Result<Vec<Outcome>, EngineError> {
        let mut topics = self.topics.lock();
        let mut keys = self.keys.lock();
        let db = self.db.read().clone();
        let mut staged: FastMap<Arc<str>, SledTopic> = FastMap::default();
        let mut deleted: Vec<Arc<str>> = Vec::new();
        // Incarnations whose keys a delete of this pass removes.
        let mut dropped_keys: Vec<(Arc<str>, u64)> = Vec::new();
        // The keys this pass adds, per topic: merged into `keys` only once
        // the pass is durable.
        let mut pass_keys: FastMap<Arc<str>, PassKeys> = FastMap::default();
        let mut expire = false;
        // Per topic, the steps whose events go into this pass's records
        // (every append to a topic in a pass shares them).
        let mut appended: FastMap<Arc<str>, Vec<usize>> = FastMap::default();
        if steps.iter().any(|s| matches!(s, Step::Delete { .. })) {
            // A delete scans sled for the topic's keys: the deferred
            // writes go there first (through a whole sync, so that none
            // reaches sled before the bytes it points to).
            if let Err(e) = self.sync_now() {
                self.fail(&e);
                return Err(EngineError::StorageUnavailable(e.to_string()));
            }
        }
        let mut writes = Writes::default();
        let mut pass_file = PassFile {
            buf: std::mem::take(&mut *self.pass_buf.lock()),
            ..PassFile::default()
        };
        let mut keys_pass = PassFile::default();
        let mut outcomes = Vec::with_capacity(steps.len());
        let mut must_sync = false;
        for (index, step) in steps.iter_mut().enumerate() {
            let outcome = match step {
                Step::Append {
                    topic,
                    events,
                    expect,
                    window_ms,
                    ..
                } => {
                    let t = Self::stage(&mut staged, &topics, topic);
                    if t.sealed_at_ms.is_some() {
                        Outcome::Refused(EngineError::TopicSealed(topic.name.to_string()))
                    } else {
                        let window = *window_ms;
                        let pass = pass_keys
                            .get(&topic.name)
                            .filter(|p| p.generation == topic.generation);
                        let committed = keys
                            .get(&topic.name)
                            .filter(|k| k.generation == topic.generation);
                        let result =
                            dedup::append(&mut t.counters, events, *expect, window, now, |k| {
                                pass.and_then(|p| p.get(k)).or_else(|| {
                                    committed.and_then(|c| c.window.get(k, now, window))
                                })
                            });
                        let (outcome, keyed) = append_outcome(result);
                        if matches!(&outcome, Outcome::Appended { events, .. } if !events.is_empty())
                        {
                            deleted.retain(|d| *d != topic.name);
                            appended.entry(topic.name.clone()).or_default().push(index);
                            must_sync |= self.fsync;
                        }
                        if !keyed.is_empty() {
                            let p = pass_keys
                                .entry(topic.name.clone())
                                .or_insert_with(|| PassKeys::new(topic.generation));
                            if p.generation != topic.generation {
                                *p = PassKeys::new(topic.generation);
                            }
                            p.window_ms = window;
                            for (key, original) in keyed {
                                p.insert(key, original);
                            }
                        }
                        outcome
                    }
                }
                Step::Seal { topic } => {
                    let t = Self::stage(&mut staged, &topics, topic);
                    must_sync = true;
                    Outcome::Sealed(*t.sealed_at_ms.get_or_insert(now))
                }
                Step::Delete { topic } => {
                    let t = Self::stage(&mut staged, &topics, topic);
                    // The meta goes first: a crash mid-way leaves records of
                    // a generation no meta names, which recovery removes.
                    writes.remove(meta_key(&topic.name));
                    for segment in &t.segments {
                        writes.remove(segment.key(&topic.name, t.generation));
                        pass_file.removed(segment);
                    }
                    if let Some(k) = keys
                        .get(&topic.name)
                        .filter(|k| k.generation == t.generation)
                    {
                        for r in k.records.iter().filter_map(|k| k.at) {
                            keys_pass.changes.push((r, false));
                        }
                    }
                    for kind in [RECORD, RECORD_REF, KEYS, KEYS_REF] {
                        for key in db
                            .scan_prefix(prefix(kind, &topic.name, t.generation))
                            .keys()
                            .flatten()
                        {
                            writes.remove(key.to_vec());
                        }
                    }
                    for key in db.scan_prefix(group_prefix(&topic.name)).keys().flatten() {
                        writes.remove(key.to_vec());
                    }
                    if pass_keys
                        .get(&topic.name)
                        .is_some_and(|p| p.generation == t.generation)
                    {
                        pass_keys.remove(&topic.name);
                    }
                    dropped_keys.push((topic.name.clone(), t.generation));
                    *t = SledTopic::new(topic);
                    appended.remove(&topic.name);
                    deleted.push(topic.name.clone());
                    must_sync = true;
                    Outcome::Done
                }
                Step::Trim {
                    topic,
                    first_retained,
                    ..
                } => {
                    let t = Self::stage(&mut staged, &topics, topic);
                    t.trimmed_through = t.trimmed_through.max(first_retained.saturating_sub(1));
                    while let Some(segment) = t.segments.front() {
                        if segment.last > t.trimmed_through {
                            break;
                        }
                        writes.remove(segment.key(&topic.name, t.generation));
                        pass_file.removed(segment);
                        t.segments.pop_front();
                    }
                    Outcome::Done
                }
                Step::Sync => {
                    must_sync = true;
                    Outcome::Done
                }
                Step::Groups { writes: groups } => {
                    for g in groups.drain(..) {
                        let key = group_key(&g.topic, &g.group);
                        match g.value {
                            Some(v) => writes.insert(key, checksummed(v)),
                            None => writes.remove(key),
                        }
                        must_sync |= self.fsync;
                    }
                    Outcome::Done
                }
                Step::Expire => {
                    for (name, k) in keys.iter() {
                        for expired in k.expired_records(now) {
                            writes.remove(expired.key(name, k.generation));
                            if let Some(r) = expired.at {
                                keys_pass.changes.push((r, false));
                            }
                        }
                    }
                    expire = true;
                    Outcome::Done
                }
            };
            outcomes.push(outcome);
        }
        // Keys before the records they cover (see the module docs), in
        // the event files too (sled would rewrite them with its pages).
        let mut keys_at: FastMap<Arc<str>, RecordRef> = FastMap::default();
        for (name, p) in &pass_keys {
            if let (Some(first), Some((_, last))) = (p.first_offset(), p.keys.last()) {
                let stored = StoredKeys {
                    at_ms: now,
                    keys: p
                        .keys
                        .iter()
                        .map(|(k, o)| (&**k, o.offset, o.version))
                        .collect(),
                };
                let at = keys_pass.push(&self.keys_files, last.offset, |buf| {
                    bincode::serde::encode_into_std_write(&stored, buf, bincode_config())
                        .map(drop)
                        .map_err(storage_err)
                })?;
                let stored_at = KeysAt {
                    first,
                    at_ms: now,
                    at: Some(at),
                };
                writes.insert(
                    stored_at.key(name, p.generation),
                    encode(&KeysRef { at, at_ms: now })?,
                );
                keys_at.insert(name.clone(), at);
            }
        }
        for (name, indices) in &appended {
            let events: Vec<&Arc<Event>> = indices
                .iter()
                .filter_map(|i| match &outcomes[*i] {
                    Outcome::Appended { events, .. } => Some(events),
                    _ => None,
                })
                .flatten()
                .collect();
            if let Some(t) = staged.get_mut(name) {
                let size: u64 = events.iter().map(|e| e.retained_size() + 16).sum();
                pass_file.buf.reserve(size as usize);
                encode_records(&mut writes, &mut pass_file, &self.files, name, t, &events)?;
            }
        }
        if !appended.is_empty() {
            self.relocate(&mut staged, &topics, &deleted, &mut writes, &mut pass_file)?;
        }
        for (name, t) in &staged {
            if !deleted.contains(name) {
                writes.insert(meta_key(name), encode(&t.meta())?);
            }
        }
        let result = self
            .append_pass_file(&keys_pass, &self.keys_files)
            .and_then(|()| self.append_pass_file(&pass_file, &self.files))
            .and_then(|()| match &self.deferred {
                Some(d) => {
                    d.lock().add(writes);
                    if must_sync {
                        self.sync_now()
                    } else {
                        Ok(())
                    }
                }
                // fsync mode: the files are fsynced before these writes
                // reach sled (a pass without new bytes has none to wait for).
                None if must_sync => self.sync_with(writes),
                None => writes.apply(&db, self.faults()),
            });
        self.recycle(std::mem::take(&mut pass_file.buf));
        if let Err(e) = result {
            self.fail(&e);
            return Err(EngineError::StorageUnavailable(e.to_string()));
        }
        for (name, t) in staged {
            if deleted.contains(&name) {
                topics.remove(&name);
            } else {
                topics.insert(name, t);
            }
        }
        self.files.lock().commit(&pass_file.changes);
        // A keys value that two steps removed (two expires, or a delete and
        // an expire, in one pass) counts once.
        let mut removed = HashSet::new();
        keys_pass
            .changes
            .retain(|(r, added)| *added || removed.insert((r.file, r.pos)));
        self.keys_files.lock().commit(&keys_pass.changes);
        for (name, generation) in dropped_keys {
            if keys.get(&name).is_some_and(|k| k.generation == generation) {
                keys.remove(&name);
            }
        }
        if expire {
            keys.retain(|_, k| {
                k.expire(now);
                !k.records.is_empty()
            });
        }
        for (name, p) in pass_keys {
            let at = keys_at.get(&name).copied();
            let k = keys.entry(name).or_default();
            if k.generation != p.generation {
                *k = TopicKeys {
                    generation: p.generation,
                    ..TopicKeys::default()
                };
            }
            k.merge(p, now, at);
        }
        if self.fsync && must_sync && self.last_checkpoint.lock().elapsed() >= CHECKPOINT_EVERY {
            self.checkpoint(&topics);
        }
        Ok(outcomes)
    }

    /// Keeps a pass's buffer for the next pass (up to a size worth keeping).
    fn recycle(&self, mut buf: Vec<u8>) {
        const KEEP: usize = 16 * 1024 * 1024;
        if buf.capacity() <= KEEP {
            buf.clear();
            *self.pass_buf.lock() = buf;
        }
    }

    /// Writes a pass's record bytes to the active event file (before sled's
    /// inserts point at them).
    fn append_pass_file(
        &self,
        pass: &PassFile,
        files: &parking_lot::Mutex<EventFiles>,
    ) -> Result<(), EngineError> {
        if pass.buf.is_empty() {
            return Ok(());
        }
        if let Some(f) = self.faults() {
            f.write()?;
        }
        files.lock().append(&pass.buf)
    }

    /// Moves up to [`files::RELOCATE_BUDGET`](super::files::RELOCATE_BUDGET)
    /// bytes of live records out of a mostly dead event file into this
    /// pass, so a few records of a quiet topic never keep a whole file.
    fn relocate(
        &self,
        staged: &mut FastMap<Arc<str>, SledTopic>,
        topics: &FastMap<Arc<str>, SledTopic>,
        deleted: &[Arc<str>],
        writes: &mut Writes,
        pass: &mut PassFile,
    ) -> Result<(), EngineError> {
        let Some(file) = self.files.lock().relocation_candidate() else {
            return Ok(());
        };
        let mut moves: Vec<(Arc<str>, usize)> = Vec::new();
        let mut budget = super::files::RELOCATE_BUDGET;
        for (name, t) in topics.iter().filter(|(n, _)| !deleted.contains(n)) {
            let t = staged.get(name).unwrap_or(t);
            for (i, segment) in t.segments.iter().enumerate() {
                if budget == 0 {
                    break;
                }
                if let Some(r) = segment.at.filter(|r| r.file == file) {
                    budget = budget.saturating_sub(u64::from(r.len));
                    moves.push((name.clone(), i));
                }
            }
        }
        for (name, i) in moves {
            let t = staged
                .entry(name.clone())
                .or_insert_with(|| topics[&name].clone());
            let segment = t.segments[i];
            let Some(old) = segment.at else { continue };
            let Some(bytes) = self.files.lock().read(&old) else {
                // Left where it is: recovery reports it if it is damaged.
                tracing::warn!(
                    topic = &*name,
                    file = old.file,
                    "cannot read a record to relocate it"
                );
                self.files.lock().unmovable(old.file);
                continue;
            };
            let new = pass.push(&self.files, segment.last, |buf| {
                buf.extend_from_slice(&bytes);
                Ok(())
            })?;
            writes.insert(segment.key(&name, t.generation), encode(&new)?);
            pass.removed(&segment);
            t.segments[i].at = Some(new);
        }
        Ok(())
    }

    /// Stages a topic of the pass: a copy of its state (or a fresh one for
    /// a new incarnation), swapped in only if the pass succeeds.
    fn stage<'a>(
        staged: &'a mut FastMap<Arc<str>, SledTopic>,
        topics: &FastMap<Arc<str>, SledTopic>,
        id: &TopicId,
    ) -> &'a mut SledTopic {
        let t = staged.entry(id.name.clone()).or_insert_with(|| {
            topics
                .get(&id.name)
                .filter(|t| t.generation == id.generation)
                .cloned()
                .unwrap_or_else(|| SledTopic::new(id))
        });
        if t.generation != id.generation {
            *t = SledTopic::new(id);
        }
        t
    }
}

impl Log for SledLog {
    fn inline(&self) -> bool {
        false
    }

    fn persist(&self, steps: &mut [Step], now: u64) -> Result<Vec<Outcome>, EngineError> {
        if let Health::Degraded(why) = self.health() {
            return Err(EngineError::StorageUnavailable(why));
        }
        match self.persist_pass(steps, now) {
            // Any storage error fails the pass and degrades the store (the
            // repair then restores what it may have left half done).
            Err(e @ EngineError::Storage(_)) => {
                self.fail(&e);
                Err(EngineError::StorageUnavailable(e.to_string()))
            }
            other => other,
        }
    }

    fn health(&self) -> Health {
        if !self.degraded.load(Ordering::Acquire) {
            return Health::Ok;
        }
        match &*self.failed.lock() {
            None => Health::Ok,
            Some(why) => Health::Degraded(why.clone()),
        }
    }

    fn repair(&self, committed: &[TopicImage]) -> Result<(), EngineError> {
        if self.failed.lock().is_none() {
            return Ok(());
        }
        if let Some(f) = self.faults() {
            f.repair()?;
        }
        let mut topics = self.topics.lock();
        let mut keys = self.keys.lock();
        // No sync (the flusher's) runs beside a repair.
        let _sync = self.sync_lock.lock();
        // Reopen from disk: sled's I/O errors are sticky in its Db, and
        // what it holds in memory may include the failed pass.
        {
            let mut db = self.db.write();
            let placeholder = sled::Config::new()
                .temporary(true)
                .open()
                .map_err(storage_err)?;
            drop(std::mem::replace(&mut *db, placeholder));
            *db = open_sled(&self.dir)?;
            *self.syncer.write() = Arc::new(FileSync::new(&self.dir)?);
        }
        let db = self.db.read().clone();
        let mut writes = Writes::default();
        // What passes acknowledged before the failure but the flusher had
        // not written yet (a group's deletion, say) goes in first; the scan
        // below then judges it like the rest (index entries into files a
        // failed fsync poisoned count as missing and are written again).
        if let Some(d) = &self.deferred {
            let taken = d.lock().take();
            if let Err(e) = apply_writes(deferred_writes(&taken), &db, self.faults()) {
                d.lock().restore(taken);
                return Err(e);
            }
        }
        let mut files = self.files.lock();
        files.reset()?;
        // Per topic: (generation, segment) of every readable record.
        let mut stored: HashMap<String, Vec<(u64, Segment)>> = HashMap::new();
        for kind in [RECORD, RECORD_REF] {
            for item in db.scan_prefix([kind]) {
                let (key, value) = item.map_err(storage_err)?;
                let Some((name, generation, first)) = parse_key(kind, &key) else {
                    writes.remove(key.to_vec());
                    continue;
                };
                let segment = if kind == RECORD {
                    decode::<Vec<StoredEvent>>(FORMAT, &value)
                        .and_then(|events| events.last().map(|e| e.offset))
                        .map(|last| Segment {
                            first,
                            last,
                            at: None,
                        })
                } else {
                    // Only whether its bytes are there: reading every
                    // record back would make a repair as slow as a start.
                    decode::<RecordRef>(FORMAT, &value)
                        .filter(|r| files.present(r))
                        .map(|r| Segment {
                            first,
                            last: r.last,
                            at: Some(r),
                        })
                };
                match segment {
                    Some(segment) => stored
                        .entry(name.to_owned())
                        .or_default()
                        .push((generation, segment)),
                    None => writes.remove(key.to_vec()),
                }
            }
        }
        let mut rebuilt: FastMap<Arc<str>, SledTopic> = FastMap::default();
        // Acknowledged events to write again, per topic.
        let mut rewrite: Vec<(Arc<str>, Vec<&Arc<Event>>)> = Vec::new();
        for c in committed {
            let name = &*c.id.name;
            let mut t = SledTopic {
                generation: c.id.generation,
                epoch: c.id.epoch,
                counters: c.counters.clone(),
                sealed_at_ms: c.sealed_at_ms,
                trimmed_through: c
                    .events
                    .first()
                    .map_or(c.counters.next_offset, |e| e.offset)
                    - 1,
                segments: VecDeque::new(),
            };
            let mut kept: Vec<Segment> = Vec::new();
            for (generation, segment) in stored.remove(name).unwrap_or_default() {
                let refused = segment.last >= c.counters.next_offset;
                if generation != c.id.generation || refused || segment.last <= t.trimmed_through {
                    writes.remove(segment.key(name, generation));
                } else {
                    kept.push(segment);
                }
            }
            kept.sort_unstable_by_key(|s| s.first);
            for segment in &kept {
                if let Some(r) = segment.at {
                    files.found(&r);
                }
            }
            // Acknowledged events no stored record covers (a failed delete
            // or trim removed them, or the disk lost them): rewrite them.
            let mut missing: Vec<&Arc<Event>> = Vec::new();
            let mut covered = kept.iter().peekable();
            for e in &c.events {
                while covered.peek().is_some_and(|s| s.last < e.offset) {
                    covered.next();
                }
                if covered.peek().is_none_or(|s| s.first > e.offset) {
                    missing.push(e);
                }
            }
            t.segments = kept.into();
            if !missing.is_empty() {
                tracing::warn!(
                    topic = name,
                    events = missing.len(),
                    "repair: rewriting acknowledged events missing from disk"
                );
                rewrite.push((c.id.name.clone(), missing));
            }
            writes.insert(meta_key(name), encode(&t.meta())?);
            rebuilt.insert(c.id.name.clone(), t);
        }
        // Topics on disk the engine does not hold (deleted, or created by
        // the failed pass alone).
        for (name, records) in stored {
            for (generation, segment) in records {
                writes.remove(segment.key(&name, generation));
            }
        }
        keys.retain(|name, k| {
            rebuilt
                .get(name)
                .is_some_and(|t| t.generation == k.generation)
        });
        let key_rewrites = {
            let mut keys_files = self.keys_files.lock();
            keys_files.reset()?;
            let rewrites = repair_keys(&db, &mut keys_files, &rebuilt, &mut keys, &mut writes)?;
            keys_files.start();
            rewrites
        };
        files.start();
        drop(files);
        let mut pass_file = PassFile::default();
        let mut keys_pass = PassFile::default();
        // Keys before the records they cover, as in a pass.
        for (name, first, bytes) in key_rewrites {
            let Some(k) = keys.get_mut(&name) else {
                continue;
            };
            let Some(i) = k.records.iter().position(|r| r.first == first) else {
                continue;
            };
            let old = k.records[i];
            let at = keys_pass.push(&self.keys_files, old.first, |buf| {
                buf.extend_from_slice(&bytes);
                Ok(())
            })?;
            let new = KeysAt {
                at: Some(at),
                ..old
            };
            writes.insert(
                new.key(&name, k.generation),
                encode(&KeysRef {
                    at,
                    at_ms: old.at_ms,
                })?,
            );
            k.records[i] = new;
        }
        for (name, missing) in rewrite {
            let t = rebuilt.get_mut(&name).expect("rebuilt above");
            // One record per contiguous run: recovery reads a hole inside a
            // record as damage.
            for run in missing.chunk_by(|a, b| a.offset + 1 == b.offset) {
                encode_records(&mut writes, &mut pass_file, &self.files, &name, t, run)?;
            }
            t.segments
                .make_contiguous()
                .sort_unstable_by_key(|s| s.first);
        }
        for item in db.scan_prefix([META]) {
            let (key, _) = item.map_err(storage_err)?;
            let known = std::str::from_utf8(&key[1..]).is_ok_and(|name| rebuilt.contains_key(name));
            if !known {
                writes.remove(key.to_vec());
            }
        }
        drop(keys);
        self.append_pass_file(&keys_pass, &self.keys_files)?;
        self.append_pass_file(&pass_file, &self.files)?;
        // The files first, then what sled gets: rewrites before removals,
        // so no prefix of it loses a record before its replacement is in.
        self.sync_locked(writes.inserts_first())?;
        self.files.lock().commit(&pass_file.changes);
        self.keys_files.lock().commit(&keys_pass.changes);
        *topics = rebuilt;
        self.checkpoint(&topics);
        *self.failed.lock() = None;
        self.degraded.store(false, Ordering::Release);
        tracing::info!("storage repaired; writes are accepted again");
        Ok(())
    }

    fn close(&self, committed: &[TopicImage]) -> Result<(), EngineError> {
        self.stop_flusher();
        if self.failed.lock().is_some() {
            // The clean marker would vouch for a store that failed.
            self.repair(committed)?;
        }
        let db = self.db.read().clone();
        self.sync_now()?;
        let marker = RunMarker {
            clean: true,
            durability: 0,
        };
        db.insert(RUN_MARKER, encode(&marker)?)
            .map_err(storage_err)?;
        self.sync_now()?;
        let topics = self.topics.lock();
        write_checkpoint(&self.dir, &topics)
    }
}

impl Drop for SledLog {
    fn drop(&mut self) {
        self.stop_flusher();
        // Dropped without a close: sled writes what it holds on drop, so
        // the deferred writes go to it, once the files they point into are
        // fsynced.
        if let Some(d) = &self.deferred {
            let _sync = self.sync_lock.lock();
            let db = self.db.read().clone();
            let taken = d.lock().take();
            let synced = self
                .file_sets()
                .into_iter()
                .try_for_each(|f| f.lock().plan_sync().run(|| Ok(())));
            if let Err(e) = synced.and_then(|()| apply_writes(deferred_writes(&taken), &db, None)) {
                tracing::warn!(error = %e, "cannot write the last deferred writes");
            }
        }
    }
}

/// A keys value [`repair_keys`] found missing: its topic, its first
/// offset, and its bytes (an encoded [`StoredKeys`]).
type KeysRewrite = (Arc<str>, u64, Vec<u8>);

/// Repair of the keys values: removes those of incarnations the engine
/// does not hold and those a failed pass wrote (at offsets not
/// acknowledged), counts the ones kept in the event files, and returns the
/// ones to write again from memory (a failed pass removed them, or their
/// bytes are gone): topic, index in its records, encoded [`StoredKeys`].
fn repair_keys(
    db: &sled::Db,
    files: &mut EventFiles,
    topics: &FastMap<Arc<str>, SledTopic>,
    keys: &mut FastMap<Arc<str>, TopicKeys>,
    writes: &mut Writes,
) -> Result<Vec<KeysRewrite>, EngineError> {
    // Per topic: first offset → sled key of every keys value kept so far.
    let mut on_disk: HashMap<Arc<str>, HashMap<u64, Vec<u8>>> = HashMap::new();
    for kind in [KEYS, KEYS_REF] {
        for item in db.scan_prefix([kind]) {
            let (key, value) = item.map_err(storage_err)?;
            let kept = parse_key(kind, &key).and_then(|(name, generation, first)| {
                let (name, t) = topics.get_key_value(name)?;
                (t.generation == generation && first < t.counters.next_offset)
                    .then(|| (name.clone(), first))
            });
            let present = kind == KEYS
                || decode::<KeysRef>(FORMAT, &value).is_some_and(|r| files.present(&r.at));
            match kept.filter(|_| present) {
                Some((name, first)) => {
                    on_disk.entry(name).or_default().insert(first, key.to_vec());
                }
                None => writes.remove(key.to_vec()),
            }
        }
    }
    let mut rewrite = Vec::new();
    for (name, k) in keys.iter_mut() {
        let mut present = on_disk.remove(name).unwrap_or_default();
        let mut missing: HashSet<usize> = HashSet::new();
        for (i, stored) in k.records.iter().enumerate() {
            if present.remove(&stored.first).is_some() {
                if let Some(r) = stored.at {
                    files.found(&r);
                }
            } else {
                missing.insert(i);
            }
        }
        // On disk but unknown to memory (their expiry's removal was lost):
        // nothing may point into a file once memory no longer counts it.
        for (_, key) in present {
            writes.remove(key);
        }
        if missing.is_empty() {
            continue;
        }
        let mut rebuilt: HashMap<usize, Vec<(&str, u64, u64)>> = HashMap::new();
        for (key, o) in k.window.iter() {
            let i = k.records.partition_point(|r| r.first <= o.offset);
            if let Some(i) = i.checked_sub(1).filter(|i| missing.contains(i)) {
                rebuilt
                    .entry(i)
                    .or_default()
                    .push((&**key, o.offset, o.version));
            }
        }
        let mut stale = missing;
        for (i, stored) in rebuilt {
            stale.remove(&i);
            let body = StoredKeys {
                at_ms: k.records[i].at_ms,
                keys: stored,
            };
            let bytes =
                bincode::serde::encode_to_vec(&body, bincode_config()).map_err(storage_err)?;
            rewrite.push((name.clone(), k.records[i].first, bytes));
        }
        // Missing with no key left in the window (each was published again
        // since): nothing to write again, nor to remove or uncount later.
        let mut i = 0;
        k.records.retain(|_| {
            i += 1;
            !stale.contains(&(i - 1))
        });
    }
    for (_, key) in on_disk.into_values().flatten() {
        writes.remove(key);
    }
    Ok(rewrite)
}

fn read_checkpoint(dir: &Path) -> Option<Checkpoint> {
    let bytes = std::fs::read(dir.join(CHECKPOINT_FILE)).ok()?;
    let checkpoint = decode(FORMAT, &bytes);
    if checkpoint.is_none() {
        tracing::error!(
            file = %dir.join(CHECKPOINT_FILE).display(),
            "the checkpoint file is damaged; recovery cannot check the data against it"
        );
    }
    checkpoint
}

/// Writes the checkpoint atomically: a temporary file, fsynced, renamed
/// over the old one, and the directory fsynced.
fn write_checkpoint(dir: &Path, topics: &FastMap<Arc<str>, SledTopic>) -> Result<(), EngineError> {
    use std::io::Write;
    let checkpoint = Checkpoint {
        topics: topics
            .iter()
            .map(|(name, t)| CheckpointTopic {
                name: name.to_string(),
                generation: t.generation,
                next_offset: t.counters.next_offset,
                versions: t.counters.version_list(),
            })
            .collect(),
    };
    let bytes = encode(&checkpoint)?;
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    let mut file = File::create(&tmp).map_err(storage_err)?;
    file.write_all(&bytes).map_err(storage_err)?;
    file.sync_all().map_err(storage_err)?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE)).map_err(storage_err)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(storage_err)
}

type Recovery = (
    Vec<TopicImage>,
    FastMap<Arc<str>, SledTopic>,
    RecoveryReport,
);

/// Reads every group record back (bodies whose checksum holds; others are
/// logged and dropped: their groups start over from their defaults would be
/// wrong, so they are reported and removed).
fn recover_groups(db: &sled::Db) -> Result<Vec<(String, String, Vec<u8>)>, EngineError> {
    let mut out = Vec::new();
    for item in db.scan_prefix([GROUP]) {
        let (key, value) = item.map_err(storage_err)?;
        let parsed = parse_group_key(&key);
        match (parsed, verified(FORMAT, &value)) {
            (Some((topic, group)), Some(body)) => {
                out.push((topic.to_owned(), group.to_owned(), body.to_vec()));
            }
            _ => {
                tracing::error!(key = %String::from_utf8_lossy(&key), "a consumer group record is damaged; removing it");
                metrics::counter!(crate::metrics::DAMAGED_TOPICS).increment(1);
                db.remove(&key).map_err(storage_err)?;
            }
        }
    }
    Ok(out)
}

/// Reads every topic back, checking it against the checkpoint.
fn recover(
    db: &sled::Db,
    files: &mut EventFiles,
    checkpoint: Option<&Checkpoint>,
    dir: &Path,
) -> Result<Recovery, EngineError> {
    let format = match db.get(FORMAT_KEY).map_err(storage_err)? {
        Some(v) => v.first().copied().unwrap_or(FORMAT),
        None if db.is_empty() => FORMAT,
        None => 1,
    };
    if format > FORMAT {
        return Err(EngineError::Storage(format!(
            "{} was written by a newer ringcastd (data format {format}, this one reads up to {FORMAT}); run that version or move the data away",
            dir.display()
        )));
    }
    let previous: Option<RunMarker> = db
        .get(RUN_MARKER)
        .map_err(storage_err)?
        .and_then(|v| decode(format, &v));
    // An unclean stop in a mode that acks before fsync may have lost
    // acknowledged events; their offsets would be reused. A new epoch
    // makes resuming clients get `epoch_changed` instead of a silent hole.
    let rotate_all = previous.is_some_and(|m| !m.clean && m.durability != 0);
    let mut report = RecoveryReport::default();
    let mut metas: HashMap<String, (TopicMeta, Vec<StoredRecord>, bool)> = HashMap::new();
    let mut bad_metas = Vec::new();
    for item in db.scan_prefix([META]) {
        let (key, value) = item.map_err(storage_err)?;
        let name = String::from_utf8_lossy(&key[1..]).into_owned();
        match decode::<TopicMeta>(format, &value) {
            Some(meta) => {
                metas.insert(name, (meta, Vec::new(), false));
            }
            None => bad_metas.push((name, key.to_vec())),
        }
    }
    let expected: HashMap<&str, &CheckpointTopic> = checkpoint
        .map(|c| c.topics.iter().map(|t| (t.name.as_str(), t)).collect())
        .unwrap_or_default();
    // A topic whose meta is unreadable is rebuilt from the checkpoint if it
    // knows it (its records are still keyed by its generation).
    for (name, key) in bad_metas {
        report.bad_records += 1;
        match expected.get(name.as_str()) {
            Some(cp) => {
                let meta = TopicMeta {
                    generation: cp.generation,
                    epoch: super::new_epoch(),
                    next_offset: cp.next_offset,
                    versions: cp.versions.clone(),
                    trimmed_through: 0,
                    sealed_at_ms: None,
                };
                metas.insert(name, (meta, Vec::new(), true));
            }
            None => {
                tracing::error!(
                    topic = name,
                    "topic meta is damaged and no checkpoint knows the topic; dropping it"
                );
                db.remove(key).map_err(storage_err)?;
                report.damaged_topics.push(name);
            }
        }
    }
    let mut orphans = 0;
    for kind in [RECORD, RECORD_REF] {
        for item in db.scan_prefix([kind]) {
            let (key, value) = item.map_err(storage_err)?;
            let parsed = parse_key(kind, &key);
            let Some(((meta, records, damaged), generation)) =
                parsed.and_then(|(name, g, _)| Some((metas.get_mut(name)?, g)))
            else {
                db.remove(&key).map_err(storage_err)?;
                orphans += 1;
                continue;
            };
            if meta.generation != generation {
                db.remove(&key).map_err(storage_err)?;
                orphans += 1;
                continue;
            }
            let record = if kind == RECORD {
                decode::<Vec<StoredEvent>>(format, &value)
                    .map(|events| StoredRecord { at: None, events })
            } else {
                read_record(files, format, &value)
            };
            match record {
                Some(record) => records.push(record),
                None => {
                    // Reported once: the topic gets a new epoch now, and
                    // the record is not read again at the next start.
                    report.bad_records += 1;
                    *damaged = true;
                    db.remove(&key).map_err(storage_err)?;
                }
            }
        }
    }
    if orphans > 0 {
        tracing::info!(records = orphans, "removed records of deleted topics");
    }
    let mut recovered = Vec::new();
    let mut sled_topics = FastMap::default();
    for (name, (meta, records, damaged)) in metas {
        let cp = expected
            .get(name.as_str())
            .filter(|cp| cp.generation == meta.generation);
        let (topic, sled_topic, damaged) =
            recover_topic(&name, meta, records, damaged, cp.copied());
        let mut topic = topic;
        if damaged {
            report.damaged_topics.push(name.clone());
            topic.id.epoch = super::new_epoch();
            tracing::error!(
                topic = name,
                dir = %dir.display(),
                "stored events of this topic are damaged or missing; it gets a new epoch so resuming clients get gap(epoch_changed)"
            );
        } else if rotate_all {
            topic.id.epoch = super::new_epoch();
            tracing::warn!(
                topic = name,
                "unclean stop in a non-fsync mode: topic gets a new epoch"
            );
        }
        let mut sled_topic = sled_topic;
        sled_topic.epoch = topic.id.epoch;
        // New epochs are persisted before the marker that would no longer
        // ask for them.
        if damaged || rotate_all {
            db.insert(meta_key(&name), encode(&sled_topic.meta())?)
                .map_err(storage_err)?;
        }
        sled_topics.insert(topic.id.name.clone(), sled_topic);
        recovered.push(topic);
    }
    if !report.damaged_topics.is_empty() {
        metrics::counter!(crate::metrics::DAMAGED_TOPICS)
            .increment(report.damaged_topics.len() as u64);
    }
    Ok((recovered, sled_topics, report))
}

/// Decodes a record in the event files: one or more encoded lists of
/// events back to back (a record grows by a list per pass).
fn decode_chunks(mut bytes: &[u8]) -> Option<Vec<StoredEvent>> {
    let mut events = Vec::new();
    while !bytes.is_empty() {
        let (chunk, used): (Vec<StoredEvent>, usize) =
            bincode::serde::decode_from_slice(bytes, bincode_config()).ok()?;
        if chunk.is_empty() || used == 0 {
            return None;
        }
        events.extend(chunk);
        bytes = &bytes[used..];
    }
    Some(events)
}

/// One record read back: where it is (`None`: inline) and its events.
struct StoredRecord {
    at: Option<RecordRef>,
    events: Vec<StoredEvent>,
}

/// Reads the record an index entry points to: `None` when the entry, the
/// file or the bytes are damaged or missing.
fn read_record(files: &mut EventFiles, format: u8, value: &[u8]) -> Option<StoredRecord> {
    let at = decode::<RecordRef>(format, value)?;
    let events = files.read_live(&at, |bytes| {
        decode_chunks(bytes).filter(|events| events.last().is_some_and(|e| e.offset == at.last))
    })?;
    Some(StoredRecord {
        at: Some(at),
        events,
    })
}

fn recover_topic(
    name: &str,
    meta: TopicMeta,
    records: Vec<StoredRecord>,
    mut damaged: bool,
    checkpoint: Option<&CheckpointTopic>,
) -> (TopicImage, SledTopic, bool) {
    let mut counters = Counters::from_parts(meta.next_offset, &meta.versions);
    let mut segments = VecDeque::new();
    let mut events: Vec<Arc<Event>> = Vec::new();
    let mut records = records;
    records.sort_by_key(|r| r.events.first().map_or(0, |e| e.offset));
    for record in records {
        let (Some(first), Some(last)) = (record.events.first(), record.events.last()) else {
            continue;
        };
        segments.push_back(Segment {
            first: first.offset,
            last: last.offset,
            at: record.at,
        });
        for e in record.events {
            if e.offset <= meta.trimmed_through {
                continue;
            }
            if events.last().is_some_and(|b| b.offset + 1 != e.offset) {
                // Keep the events after the hole; the ring must be contiguous.
                damaged = true;
                events.clear();
            }
            let event_type: Arc<str> = match counters.versions.get_key_value(e.event_type.as_str())
            {
                Some((k, _)) => k.clone(),
                None => Arc::from(e.event_type),
            };
            let version = counters.versions.entry(event_type.clone()).or_insert(0);
            *version = (*version).max(e.version);
            counters.next_offset = counters.next_offset.max(e.offset + 1);
            events.push(Arc::new(Event::new(
                e.offset,
                e.version,
                e.timestamp_ms,
                event_type,
                e.headers,
                Bytes::from(e.payload.into_vec()),
            )));
        }
    }
    if let Some(cp) = checkpoint {
        if counters.next_offset < cp.next_offset {
            damaged = true;
            counters.next_offset = cp.next_offset;
        }
        for (t, v) in &cp.versions {
            let version = counters.versions.entry(Arc::from(t.as_str())).or_insert(0);
            if *version < *v {
                damaged = true;
                *version = *v;
            }
        }
    }
    if events
        .last()
        .is_some_and(|last| last.offset + 1 != counters.next_offset)
    {
        // The newest events are gone (the counters say more were stored):
        // the ring must end right before the next offset, so keep none.
        damaged = true;
        events.clear();
    }
    let id = TopicId {
        name: Arc::from(name),
        generation: meta.generation,
        epoch: meta.epoch,
    };
    let sled_topic = SledTopic {
        generation: meta.generation,
        epoch: meta.epoch,
        counters: counters.clone(),
        sealed_at_ms: meta.sealed_at_ms,
        trimmed_through: meta.trimmed_through,
        segments,
    };
    let topic = TopicImage {
        id,
        counters,
        sealed_at_ms: meta.sealed_at_ms,
        events,
    };
    (topic, sled_topic, damaged)
}

/// Loads the idempotency keys still inside their topic's window: values of
/// unknown incarnations, older than the window, or damaged are removed, and
/// keys at offsets the recovered records do not reach (their pass failed
/// after the keys were written) are dropped from their value.
fn recover_keys(
    db: &sled::Db,
    files: &mut EventFiles,
    topics: &FastMap<Arc<str>, SledTopic>,
    window_for: &dyn Fn(&str) -> u64,
    now_ms: u64,
) -> Result<FastMap<Arc<str>, TopicKeys>, EngineError> {
    let mut found: HashMap<Arc<str>, Vec<(KeysAt, StoredKeys)>> = HashMap::new();
    let mut removed = 0u64;
    for kind in [KEYS, KEYS_REF] {
        for item in db.scan_prefix([kind]) {
            let (key, value) = item.map_err(storage_err)?;
            let owner = parse_key(kind, &key).and_then(|(name, generation, first)| {
                let (name, t) = topics.get_key_value(name)?;
                (t.generation == generation).then(|| (name.clone(), t.counters.next_offset, first))
            });
            let window = owner.as_ref().map_or(0, |(name, _, _)| window_for(name));
            let fresh = |at_ms: u64| at_ms.saturating_add(window) > now_ms;
            let stored = if owner.is_none() {
                None
            } else if kind == KEYS {
                decode::<StoredKeys>(FORMAT, &value)
                    .filter(|s| fresh(s.at_ms))
                    .map(|s| (None, s))
            } else {
                decode::<KeysRef>(FORMAT, &value)
                    .filter(|r| fresh(r.at_ms))
                    .and_then(|r| read_keys(files, &r.at).map(|s| (Some(r.at), s)))
            };
            let (Some((name, next_offset, first)), Some((at, mut stored))) = (owner, stored) else {
                db.remove(&key).map_err(storage_err)?;
                removed += 1;
                continue;
            };
            let before = stored.keys.len();
            stored.keys.retain(|(_, offset, _)| *offset < next_offset);
            if stored.keys.is_empty() {
                if let Some(r) = at {
                    files.commit(&[(r, false)]);
                }
                db.remove(&key).map_err(storage_err)?;
                removed += 1;
                continue;
            }
            if at.is_none() && stored.keys.len() < before {
                db.insert(&key, encode(&stored)?).map_err(storage_err)?;
            }
            let stored_at = KeysAt {
                first,
                at_ms: stored.at_ms,
                at,
            };
            found.entry(name).or_default().push((stored_at, stored));
        }
    }
    if removed > 0 {
        tracing::debug!(
            values = removed,
            "removed expired or orphaned idempotency keys"
        );
    }
    let mut keys = FastMap::default();
    for (name, mut values) in found {
        values.sort_by_key(|(at, _)| at.first);
        let mut k = TopicKeys {
            generation: topics[&name].generation,
            window_ms: window_for(&name),
            ..TopicKeys::default()
        };
        for (stored_at, stored) in values {
            k.records.push_back(stored_at);
            for (key, offset, version) in stored.keys {
                let original = Original {
                    offset,
                    version,
                    at_ms: stored.at_ms,
                };
                k.window.insert(Arc::from(key), original);
            }
        }
        keys.insert(name, k);
    }
    Ok(keys)
}

/// Reads (and counts as live) the keys value a [`KeysRef`] points to;
/// `None` (not counted) when its bytes are missing or damaged.
fn read_keys(files: &mut EventFiles, at: &RecordRef) -> Option<StoredKeys> {
    let stored = files.read_live(at, |bytes| {
        bincode::serde::decode_from_slice::<StoredKeys, _>(bytes, bincode_config())
            .ok()
            .map(|(v, _)| v)
    });
    if stored.is_none() {
        tracing::warn!("idempotency keys of a pass are damaged; retries of those publishes are no longer recognised");
    }
    stored
}

/// Encodes `events` (in offset order) into records of at most
/// `RECORD_MAX` bytes.
fn encode_records(
    writes: &mut Writes,
    pass: &mut PassFile,
    files: &parking_lot::Mutex<EventFiles>,
    topic: &str,
    t: &mut SledTopic,
    events: &[impl AsRef<Event>],
) -> Result<(), EngineError> {
    let mut start = 0;
    while start < events.len() {
        let mut end = start;
        let mut size = 0;
        while end < events.len() && (end == start || size < RECORD_MAX) {
            size += events[end].as_ref().retained_size() as usize;
            end += 1;
        }
        let chunk = &events[start..end];
        let refs: Vec<StoredEventRef<'_>> = chunk
            .iter()
            .map(AsRef::as_ref)
            .map(|e: &Event| StoredEventRef {
                offset: e.offset,
                version: e.version,
                timestamp_ms: e.timestamp_ms,
                event_type: &e.event_type,
                headers: &e.headers,
                payload: serde_bytes::Bytes::new(&e.payload),
            })
            .collect();
        let (first, last) = (refs[0].offset, refs[refs.len() - 1].offset);
        let at = pass.push(files, last, |buf| {
            bincode::serde::encode_into_std_write(&refs, buf, bincode_config())
                .map(drop)
                .map_err(storage_err)
        })?;
        // Right after the topic's previous record in the same file (one
        // topic publishing steadily): that record grows instead, so sled
        // holds one index entry per RECORD_MAX bytes, not one per pass.
        let previous = t.segments.back_mut().filter(|s| {
            s.at.is_some_and(|p| {
                p.file == at.file
                    && p.pos + u64::from(p.len) == at.pos
                    && p.len as usize + at.len as usize <= RECORD_MAX
                    && s.last + 1 == first
            })
        });
        match previous {
            Some(segment) => {
                let old = segment.at.expect("filtered above");
                let grown = old.extend(&at);
                pass.changes.pop();
                pass.changes.push((grown, true));
                pass.changes.push((old, false));
                segment.last = last;
                segment.at = Some(grown);
                writes.insert(segment.key(topic, t.generation), encode(&grown)?);
            }
            None => {
                let segment = Segment {
                    first,
                    last,
                    at: Some(at),
                };
                writes.insert(segment.key(topic, t.generation), encode(&at)?);
                t.segments.push_back(segment);
            }
        }
        start = end;
    }
    Ok(())
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
