//! The event files of the sled backend: append-only files under
//! `<data_dir>/events/` that hold the bytes of every record, each written
//! once. sled keeps the index (a small [`RecordRef`] per record, beside the
//! metas, keys and groups), so its pages stay small and its page rewrites
//! no longer copy event payloads; see BENCHMARKS.md ("Storage layout").
//!
//! Files are named by a sequence number (`00000000000000000042.rce`) and
//! rolled once they reach [`FILE_MAX`]. A file is removed once no record in
//! it is live, and only after a sync has made the removal of its last
//! record durable in sled (so a crash never leaves an index entry pointing
//! into a removed file). A file kept alive by a few records (a quiet topic
//! among busy ones) has them moved to the active file once less than half
//! of it is live, a few MiB per pass.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::EngineError;

/// Largest size at which the active file is rolled (a pass may overshoot
/// it); smaller while little is live, see [`EventFiles::roll_size`].
pub(crate) const FILE_MAX: u64 = 64 * 1024 * 1024;
/// Smallest roll size.
const FILE_MIN: u64 = 1024 * 1024;
/// Most bytes of live records moved out of mostly-dead files per pass.
pub(crate) const RELOCATE_BUDGET: u64 = 4 * 1024 * 1024;
/// The directory of the event files, under the data dir.
pub(crate) const EVENTS_DIR: &str = "events";
/// The directory of the files holding idempotency keys (kept apart: keys
/// expire with their window, records with retention, and a file holding
/// both would stay until the later of the two).
pub(crate) const KEYS_DIR: &str = "keys";
const SUFFIX: &str = ".rce";

/// Where one record's bytes are: stored in sled under the record's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecordRef {
    /// Sequence number of the event file.
    pub file: u64,
    /// Byte position in it.
    pub pos: u64,
    /// Length of the record's bytes.
    pub len: u32,
    /// CRC-32 of those bytes.
    pub crc: u32,
    /// Offset of the record's last event (repair needs it without a read).
    pub last: u64,
}

impl RecordRef {
    /// This record grown by `next`, the bytes right after it.
    pub fn extend(&self, next: &RecordRef) -> RecordRef {
        let mut crc = crc32fast::Hasher::new_with_initial_len(self.crc, u64::from(self.len));
        crc.combine(&crc32fast::Hasher::new_with_initial_len(
            next.crc,
            u64::from(next.len),
        ));
        RecordRef {
            file: self.file,
            pos: self.pos,
            len: self.len + next.len,
            crc: crc.finalize(),
            last: next.last,
        }
    }
}

/// What is known of one event file.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    /// Bytes written to it (its length).
    size: u64,
    /// Records whose index entries point into it.
    live_records: u64,
    /// Their bytes.
    live_bytes: u64,
}

/// A file written to since its last sync, and how often (a write after a
/// sync began keeps it unsynced).
struct Unsynced {
    file: Arc<File>,
    writes: u64,
}

/// The event files of one data dir.
pub(crate) struct EventFiles {
    dir: PathBuf,
    /// Its name under the data dir.
    sub: &'static str,
    /// The file appended to: sequence number and handle.
    active: Option<(u64, Arc<File>)>,
    next_seq: u64,
    stats: BTreeMap<u64, Stats>,
    unsynced: HashMap<u64, Unsynced>,
    /// Whether a file was created since the directory's last sync.
    dir_dirty: bool,
    /// Files with no live record left, removed after the next sync.
    dead: Vec<u64>,
    /// Read handles of rolled files (relocation and recovery read them).
    readers: HashMap<u64, Arc<File>>,
    /// Sum of every file's live bytes.
    total_live: u64,
    /// Files whose fsync failed: what they hold is not trusted (after
    /// fsyncgate a second fsync can report success for pages the kernel
    /// dropped), so they are never synced again, never appended to, and a
    /// repair writes their live records again from memory.
    poisoned: HashSet<u64>,
    /// Rolled files whose relocation failed to read a record: not tried
    /// again (recovery reports such a record as damaged).
    unmovable: HashSet<u64>,
}

/// What a sync has to do, taken under the lock and done outside it.
pub(crate) struct SyncPlan {
    files: Vec<(u64, Arc<File>, u64)>,
    dir: Option<PathBuf>,
    dead: Vec<u64>,
}

impl EventFiles {
    /// Opens the directory (creating it) with nothing known yet: recovery
    /// reports every record it finds with [`Self::found`], then calls
    /// [`Self::start`].
    pub fn open(data_dir: &Path, sub: &'static str) -> Result<Self, EngineError> {
        let dir = data_dir.join(sub);
        std::fs::create_dir_all(&dir).map_err(storage_err)?;
        let mut stats = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(storage_err)?.flatten() {
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let size = entry.metadata().map_err(storage_err)?.len();
            stats.insert(
                seq,
                Stats {
                    size,
                    ..Stats::default()
                },
            );
        }
        let next_seq = stats.keys().next_back().map_or(1, |s| s + 1);
        Ok(Self {
            dir,
            sub,
            active: None,
            next_seq,
            stats,
            unsynced: HashMap::new(),
            dir_dirty: true,
            dead: Vec::new(),
            readers: HashMap::new(),
            total_live: 0,
            poisoned: HashSet::new(),
            unmovable: HashSet::new(),
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}{SUFFIX}"))
    }

    /// Counts a record found in the index. Returns false when its file is
    /// missing or shorter than the record (the record is damaged).
    pub fn found(&mut self, r: &RecordRef) -> bool {
        if !self.holds(r) {
            return false;
        }
        let s = self.stats.get_mut(&r.file).expect("held above");
        s.live_records += 1;
        s.live_bytes += u64::from(r.len);
        self.total_live += u64::from(r.len);
        true
    }

    /// Whether a record's file exists and is long enough for it.
    fn holds(&self, r: &RecordRef) -> bool {
        self.stats
            .get(&r.file)
            .is_some_and(|s| r.pos + u64::from(r.len) <= s.size)
    }

    /// Whether a record's file holds its bytes' range and can be trusted
    /// (not poisoned by a failed fsync); not counted.
    pub fn present(&self, r: &RecordRef) -> bool {
        !self.poisoned.contains(&r.file) && self.holds(r)
    }

    /// Reads the bytes a live index entry points to and decodes them,
    /// counting them as live in their file; `None` (not counted) when they
    /// are missing, damaged or do not decode.
    pub fn read_live<T>(
        &mut self,
        r: &RecordRef,
        decode: impl FnOnce(&[u8]) -> Option<T>,
    ) -> Option<T> {
        if !self.found(r) {
            return None;
        }
        let value = self.read(r).and_then(|bytes| decode(&bytes));
        if value.is_none() {
            self.commit(&[(*r, false)]);
        }
        value
    }

    /// Reads a record's bytes, checking its CRC; `None` when they are
    /// missing or damaged.
    pub fn read(&mut self, r: &RecordRef) -> Option<Vec<u8>> {
        let file = self.reader(r.file)?;
        let mut buf = vec![0; r.len as usize];
        file.read_exact_at(&mut buf, r.pos).ok()?;
        (crc32fast::hash(&buf) == r.crc).then_some(buf)
    }

    fn reader(&mut self, seq: u64) -> Option<Arc<File>> {
        if let Some((s, f)) = &self.active {
            if *s == seq {
                return Some(f.clone());
            }
        }
        if let Some(f) = self.readers.get(&seq) {
            return Some(f.clone());
        }
        let f = Arc::new(File::open(self.path(seq)).ok()?);
        self.readers.insert(seq, f.clone());
        Some(f)
    }

    /// Ends recovery (or a repair's rescan): files no record points into
    /// are removed after the next sync, and appends go to a new file.
    pub fn start(&mut self) {
        self.dead = self
            .stats
            .iter()
            .filter(|(_, s)| s.live_records == 0)
            .map(|(seq, _)| *seq)
            .collect();
        self.active = None;
        self.readers.clear();
    }

    /// Forgets every count (a repair rescans the index) and rolls the
    /// active file: a failed write leaves its length unknown.
    pub fn reset(&mut self) -> Result<(), EngineError> {
        let mut fresh = Self::open(self.dir.parent().unwrap_or(&self.dir), self.sub)?;
        // Files still unsynced stay so: what they hold may be referenced.
        fresh.unsynced = std::mem::take(&mut self.unsynced);
        fresh.poisoned = std::mem::take(&mut self.poisoned);
        fresh.next_seq = fresh.next_seq.max(self.next_seq);
        *self = fresh;
        Ok(())
    }

    /// The position the next append lands at, in the file appended to
    /// (opening a new file when there is none or it is full).
    pub fn append_position(&mut self) -> Result<(u64, u64), EngineError> {
        let roll = self.roll_size();
        let full = self
            .active
            .as_ref()
            .is_some_and(|(seq, _)| self.stats.get(seq).is_none_or(|s| s.size >= roll));
        if full {
            if let Some((seq, file)) = self.active.take() {
                if self.stats.get(&seq).is_some_and(|s| s.live_records == 0) {
                    self.dead.push(seq);
                }
                self.readers.insert(seq, file);
            }
        }
        if self.active.is_none() {
            let seq = self.next_seq;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(self.path(seq))
                .map_err(storage_err)?;
            self.next_seq += 1;
            self.stats.insert(seq, Stats::default());
            self.active = Some((seq, Arc::new(file)));
            self.dir_dirty = true;
        }
        let (seq, _) = self.active.as_ref().expect("opened above");
        Ok((*seq, self.stats[seq].size))
    }

    /// Appends `bytes` (the records of one pass) to the active file at the
    /// position [`Self::append_position`] gave. On error the file is rolled
    /// (what it holds past the last good write is never referenced).
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        let (seq, file) = self.active.clone().expect("append_position first");
        let size = self.stats[&seq].size;
        if let Err(e) = file.write_all_at(bytes, size) {
            self.active = None;
            return Err(storage_err(e));
        }
        self.stats.get_mut(&seq).expect("active").size += bytes.len() as u64;
        let u = self
            .unsynced
            .entry(seq)
            .or_insert(Unsynced { file, writes: 0 });
        u.writes += 1;
        Ok(())
    }

    /// Takes in the records a committed pass added (`+1`) and removed
    /// (`-1`); files left with no live record are removed after the next
    /// sync, unless appended to.
    pub fn commit(&mut self, changes: &[(RecordRef, bool)]) {
        for (r, added) in changes {
            let Some(s) = self.stats.get_mut(&r.file) else {
                continue;
            };
            let len = u64::from(r.len);
            if *added {
                s.live_records += 1;
                s.live_bytes += len;
                self.total_live += len;
            } else {
                s.live_records = s.live_records.saturating_sub(1);
                s.live_bytes = s.live_bytes.saturating_sub(len);
                self.total_live = self.total_live.saturating_sub(len);
                let active = self.active.as_ref().is_some_and(|(a, _)| *a == r.file);
                if s.live_records == 0 && !active {
                    self.dead.push(r.file);
                }
            }
        }
    }

    /// The size at which the active file is rolled: an eighth of what is
    /// live, within [`FILE_MIN`]..=[`FILE_MAX`], so that the partly trimmed
    /// oldest file of a topic costs little beside what it retains.
    pub fn roll_size(&self) -> u64 {
        (self.total_live / 8).clamp(FILE_MIN, FILE_MAX)
    }

    /// A rolled file whose live records are worth moving to the active
    /// file: only while the files holding live records take more than 1.5×
    /// what is live (plus two files' slack, so the steady trimming of a
    /// topic's oldest file never triggers it), the one least live.
    pub fn relocation_candidate(&self) -> Option<u64> {
        // Files awaiting removal (nothing live) do not count.
        let kept: u64 = self
            .stats
            .values()
            .filter(|s| s.live_records > 0)
            .map(|s| s.size)
            .sum();
        let slack = 2 * self.roll_size();
        if kept <= self.total_live + self.total_live / 2 + slack {
            return None;
        }
        let active = self.active.as_ref().map(|(a, _)| *a);
        self.stats
            .iter()
            .filter(|(seq, s)| {
                Some(**seq) != active
                    && !self.unmovable.contains(seq)
                    && s.live_records > 0
                    && s.live_bytes * 2 < s.size
            })
            .min_by_key(|(_, s)| s.live_bytes * 1000 / s.size.max(1))
            .map(|(seq, _)| *seq)
    }

    /// A relocation could not read a record of `seq`: it is not tried again.
    pub fn unmovable(&mut self, seq: u64) {
        self.unmovable.insert(seq);
    }

    /// What the next sync has to fsync and may then remove.
    pub fn plan_sync(&mut self) -> SyncPlan {
        SyncPlan {
            files: self
                .unsynced
                .iter()
                .map(|(seq, u)| (*seq, u.file.clone(), u.writes))
                .collect(),
            dir: std::mem::take(&mut self.dir_dirty).then(|| self.dir.clone()),
            dead: self.dead.clone(),
        }
    }

    /// Once the sync of `plan` succeeded: files not written since are
    /// synced, and the dead files are removed (their index entries' removal
    /// is durable now). On failure the directory stays to be synced; when
    /// the files' own fsync failed (`poison`), every file of the plan is
    /// poisoned.
    pub fn synced(&mut self, plan: SyncPlan, ok: bool, poison: bool) {
        if poison {
            for (seq, _, _) in &plan.files {
                self.poisoned.insert(*seq);
                self.unsynced.remove(seq);
                if self.active.as_ref().is_some_and(|(a, _)| a == seq) {
                    self.active = None;
                }
            }
        }
        if !ok {
            self.dir_dirty |= plan.dir.is_some();
            return;
        }
        for (seq, _, writes) in plan.files {
            if self.unsynced.get(&seq).is_some_and(|u| u.writes == writes) {
                self.unsynced.remove(&seq);
            }
        }
        for seq in plan.dead {
            let still_dead = self.stats.get(&seq).is_none_or(|s| s.live_records == 0)
                && self.active.as_ref().is_none_or(|(a, _)| *a != seq)
                && !self.unsynced.contains_key(&seq);
            if !still_dead {
                continue;
            }
            match std::fs::remove_file(self.path(seq)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(error = %e, file = seq, "cannot remove an event file");
                    continue;
                }
            }
            self.stats.remove(&seq);
            self.readers.remove(&seq);
            self.poisoned.remove(&seq);
            self.unmovable.remove(&seq);
            self.dead.retain(|d| *d != seq);
        }
    }
}

impl SyncPlan {
    /// fsyncs the files (and the directory, when files were created or
    /// removed); sled is synced after this, by the caller.
    pub fn run(&self, fail: impl Fn() -> Result<(), EngineError>) -> Result<(), EngineError> {
        for (_, file, _) in &self.files {
            fail()?;
            file.sync_data().map_err(storage_err)?;
        }
        if let Some(dir) = &self.dir {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(storage_err)?;
        }
        Ok(())
    }
}

fn storage_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Storage(e.to_string())
}
