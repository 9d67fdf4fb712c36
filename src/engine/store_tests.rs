//! Unit tests of the sled backend's layout: event files, legacy inline
//! records, relocation.

use super::*;

use super::super::dedup::Expected;
use super::super::event::NewEvent;
use super::super::files::{EVENTS_DIR, KEYS_DIR};

/// The time every pass of these tests runs at.
const NOW: u64 = 1_700_000_000_000;

/// Opens the backend on `dir` (no dedup windows, no flusher tick during a
/// test).
fn open_log(dir: &Path, durability: Durability) -> Result<Opened, EngineError> {
    SledLog::open(
        dir,
        durability,
        Duration::from_secs(3600),
        None,
        &|_| 0,
        NOW,
    )
}

/// Closes `log` cleanly and drops it (releasing sled's lock).
fn close_log(log: Arc<SledLog>) {
    log.close(&[]).expect("the log closes cleanly");
    drop(log);
}

fn payload_of(n: u64) -> Vec<u8> {
    format!("event-{n:0>40}").into_bytes()
}

/// `(offset, payload)` of every recovered event of `topic`.
fn recovered(opened: &Opened, topic: &str) -> Vec<(u64, Vec<u8>)> {
    opened
        .topics
        .iter()
        .find(|t| &*t.id.name == topic)
        .unwrap_or_else(|| panic!("topic {topic} recovered"))
        .events
        .iter()
        .map(|e| (e.offset, e.payload.to_vec()))
        .collect()
}

fn expected(offsets: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
    offsets.map(|n| (n, payload_of(n))).collect()
}

/// Number of keys in sled with prefix `kind` (`E` inline records, `R`
/// record refs) for `topic`'s incarnation `generation`.
fn count_keys(log: &SledLog, kind: u8, topic: &str, generation: u64) -> usize {
    log.db
        .read()
        .scan_prefix(prefix(kind, topic, generation))
        .count()
}

/// Total bytes of the event files under `dir`.
fn event_file_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join(EVENTS_DIR))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

fn append(log: &SledLog, id: &TopicId, range: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    let events: Vec<NewEvent> = range.map(|n| NewEvent::new("e", payload_of(n))).collect();
    let mut steps = [Step::Append {
        topic: id.clone(),
        events,
        expect: Expected::default(),
        window_ms: 0,
        known_next: 1,
        max_events: u64::MAX,
    }];
    match log
        .persist(&mut steps, NOW)
        .expect("the pass persists")
        .pop()
    {
        Some(Outcome::Appended { events, .. }) => events.iter().map(|e| e.offset).collect(),
        other => panic!("expected an append, got {other:?}"),
    }
}

fn persist_one(log: &SledLog, step: Step) {
    let mut steps = [step];
    log.persist(&mut steps, NOW).expect("the pass persists");
}

/// Writes a data dir as the layout before event files left it: format 2,
/// a clean run, and per topic a meta and inline (`E`) records of 100
/// events each.
fn write_legacy(dir: &Path, topics: &[(&str, u64, u64)]) {
    let db = open_sled(dir).unwrap();
    db.insert(FORMAT_KEY, vec![2]).unwrap();
    let marker = RunMarker {
        clean: true,
        durability: 0,
    };
    db.insert(RUN_MARKER, encode(&marker).unwrap()).unwrap();
    for &(name, generation, count) in topics {
        let meta = TopicMeta {
            generation,
            epoch: 42,
            next_offset: count + 1,
            versions: vec![("e".to_string(), count)],
            trimmed_through: 0,
            sealed_at_ms: None,
        };
        db.insert(meta_key(name), encode(&meta).unwrap()).unwrap();
        let payloads: Vec<Vec<u8>> = (1..=count).map(payload_of).collect();
        let headers: Vec<(String, String)> = Vec::new();
        for first in (1..=count).step_by(100) {
            let last = (first + 99).min(count);
            let events: Vec<StoredEventRef<'_>> = (first..=last)
                .map(|n| StoredEventRef {
                    offset: n,
                    version: n,
                    timestamp_ms: NOW - 1000,
                    event_type: "e",
                    headers: &headers,
                    payload: serde_bytes::Bytes::new(&payloads[(n - 1) as usize]),
                })
                .collect();
            let mut key = prefix(RECORD, name, generation);
            key.extend_from_slice(&first.to_be_bytes());
            db.insert(key, encode(&events).unwrap()).unwrap();
        }
    }
    db.flush().unwrap();
}

#[test]
fn a_legacy_data_dir_with_inline_records_is_read_trimmed_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    write_legacy(dir.path(), &[("old", 7, 300), ("gone", 9, 150)]);

    let opened = open_log(dir.path(), Durability::Fsync).unwrap();
    assert!(
        opened.report.damaged_topics.is_empty(),
        "{:?}",
        opened.report
    );
    assert_eq!(opened.report.bad_records, 0);
    assert_eq!(recovered(&opened, "old"), expected(1..=300));
    assert_eq!(recovered(&opened, "gone"), expected(1..=150));
    let image = opened.topics.iter().find(|t| &*t.id.name == "old").unwrap();
    assert_eq!(image.id.epoch, 42, "a clean legacy dir keeps its epoch");
    assert_eq!(image.counters.next_offset, 301);
    let id = image.id.clone();
    let gone = opened
        .topics
        .iter()
        .find(|t| &*t.id.name == "gone")
        .unwrap()
        .id
        .clone();
    let log = opened.log;
    assert_eq!(count_keys(&log, RECORD, "old", 7), 3);
    assert_eq!(count_keys(&log, RECORD_REF, "old", 7), 0);

    // New appends go to the event files, beside the inline records.
    assert_eq!(
        append(&log, &id, 301..=350),
        (301..=350).collect::<Vec<_>>()
    );
    assert_eq!(count_keys(&log, RECORD, "old", 7), 3);
    assert_eq!(count_keys(&log, RECORD_REF, "old", 7), 1);
    assert!(event_file_bytes(dir.path()) > 50 * 40);

    // A trim removes the inline records it covers entirely.
    persist_one(
        &log,
        Step::Trim {
            topic: id.clone(),
            first_retained: 201,
            next_offset: 0,
        },
    );
    assert_eq!(count_keys(&log, RECORD, "old", 7), 1);
    // A delete removes every inline record of its topic.
    persist_one(&log, Step::Delete { topic: gone });
    assert_eq!(count_keys(&log, RECORD, "gone", 9), 0);
    assert!(log.db.read().get(meta_key("gone")).unwrap().is_none());
    close_log(log);

    // Reopened: the last inline record and the new one, nothing of "gone".
    let opened = open_log(dir.path(), Durability::Fsync).unwrap();
    assert!(opened.report.damaged_topics.is_empty());
    assert_eq!(recovered(&opened, "old"), expected(201..=350));
    assert!(opened.topics.iter().all(|t| &*t.id.name != "gone"));
    let id = opened.topics[0].id.clone();
    assert_eq!(id.epoch, 42);
    let log = opened.log;
    assert_eq!(
        append(&log, &id, 351..=360),
        (351..=360).collect::<Vec<_>>()
    );
    persist_one(
        &log,
        Step::Trim {
            topic: id.clone(),
            first_retained: 320,
            next_offset: 0,
        },
    );
    assert_eq!(
        count_keys(&log, RECORD, "old", 7),
        0,
        "the last inline record is trimmed away"
    );
    assert_eq!(log.db.read().scan_prefix([RECORD]).count(), 0);
    close_log(log);

    let opened = open_log(dir.path(), Durability::Fsync).unwrap();
    assert!(opened.report.damaged_topics.is_empty());
    // Trimming is by record: the event file record 301..=350 is still whole.
    assert_eq!(recovered(&opened, "old"), expected(320..=360));
    assert_eq!(opened.topics[0].counters.next_offset, 361);
    assert_eq!(
        opened.log.db.read().get(FORMAT_KEY).unwrap().as_deref(),
        Some(&[FORMAT][..]),
        "the dir is marked with the current format"
    );
    close_log(opened.log);
}

#[test]
fn many_small_passes_grow_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let opened = open_log(dir.path(), Durability::Interval).unwrap();
    let log = opened.log;
    let id = TopicId {
        name: Arc::from("steady"),
        generation: 3,
        epoch: 5,
    };
    for n in 1..=1000 {
        assert_eq!(append(&log, &id, n..=n), vec![n]);
    }
    persist_one(&log, Step::Sync);
    // ~60 bytes per pass: 1000 passes fit one RECORD_MAX record.
    assert_eq!(count_keys(&log, RECORD_REF, "steady", 3), 1);
    let value = log
        .db
        .read()
        .scan_prefix(prefix(RECORD_REF, "steady", 3))
        .values()
        .next()
        .unwrap()
        .unwrap();
    let r: RecordRef = decode(FORMAT, &value).unwrap();
    assert_eq!(r.last, 1000);
    assert_eq!(
        u64::from(r.len),
        event_file_bytes(dir.path()),
        "the record spans everything written"
    );
    close_log(log);

    let opened = open_log(dir.path(), Durability::Interval).unwrap();
    assert!(opened.report.damaged_topics.is_empty());
    assert_eq!(recovered(&opened, "steady"), expected(1..=1000));
    close_log(opened.log);
}

#[test]
fn extending_a_record_combines_crcs_as_hashing_the_concatenation() {
    let bytes: Vec<u8> = (0..70_000u32).map(|i| (i * 31 % 251) as u8).collect();
    for (a, b, c) in [
        (0, 1, 2),
        (1, 1, 1),
        (100, 5_000, 64_894),
        (0, 0, 7),
        (3, 0, 9),
    ] {
        let (x, rest) = bytes.split_at(a);
        let (y, rest) = rest.split_at(b);
        let z = &rest[..c];
        let part = |pos: usize, s: &[u8], last: u64| RecordRef {
            file: 4,
            pos: 1000 + pos as u64,
            len: s.len() as u32,
            crc: crc32fast::hash(s),
            last,
        };
        let rx = part(0, x, 10);
        let ry = part(a, y, 20);
        let rz = part(a + b, z, 30);
        let grown = rx.extend(&ry).extend(&rz);
        assert_eq!(
            grown,
            RecordRef {
                file: 4,
                pos: 1000,
                len: (a + b + c) as u32,
                crc: crc32fast::hash(&bytes[..a + b + c]),
                last: 30,
            },
            "parts of {a}, {b}, {c} bytes"
        );
        // Grouping does not matter.
        assert_eq!(rx.extend(&ry.extend(&rz)), grown);
    }
}

fn encoded_list(offsets: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    let payloads: Vec<Vec<u8>> = offsets.clone().map(payload_of).collect();
    let headers = vec![("k".to_string(), "v".to_string())];
    let events: Vec<StoredEventRef<'_>> = offsets
        .zip(&payloads)
        .map(|(n, p)| StoredEventRef {
            offset: n,
            version: n,
            timestamp_ms: NOW,
            event_type: "e",
            headers: &headers,
            payload: serde_bytes::Bytes::new(p),
        })
        .collect();
    bincode::serde::encode_to_vec(&events, bincode_config()).unwrap()
}

#[test]
fn decode_chunks_reads_concatenated_lists_and_refuses_trailing_garbage() {
    let first = encoded_list(1..=3);
    let second = encoded_list(4..=9);
    let mut both = first.clone();
    both.extend_from_slice(&second);
    let events = decode_chunks(&both).expect("two lists decode");
    let offsets: Vec<u64> = events.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, (1..=9).collect::<Vec<_>>());
    for e in &events {
        assert_eq!(e.payload.as_slice(), payload_of(e.offset));
        assert_eq!(e.version, e.offset);
        assert_eq!(e.event_type, "e");
        assert_eq!(e.headers, vec![("k".to_string(), "v".to_string())]);
    }
    assert_eq!(decode_chunks(&first).map(|e| e.len()), Some(3));

    let garbage: [&[u8]; 5] = [
        &[0xde, 0xad, 0xbe, 0xef],
        // An empty list is never written.
        &[0],
        // A list cut short.
        &second[..second.len() - 1],
        &second[..1],
        &[0xff],
    ];
    for tail in garbage {
        let mut bytes = both.clone();
        bytes.extend_from_slice(tail);
        assert!(
            decode_chunks(&bytes).is_none(),
            "trailing {:?} refused",
            &tail[..tail.len().min(8)]
        );
    }
    assert!(decode_chunks(&second[..second.len() / 2]).is_none());
}

#[test]
fn a_data_dir_of_a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open_sled(dir.path()).unwrap();
        db.insert(FORMAT_KEY, vec![FORMAT + 1]).unwrap();
        db.insert(meta_key("t"), vec![1, 2, 3]).unwrap();
        db.flush().unwrap();
    }
    let err = match open_log(dir.path(), Durability::Fsync) {
        Ok(_) => panic!("a format {} dir was opened", FORMAT + 1),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("newer ringcastd"), "unclear error: {err}");
    assert!(
        err.contains(&format!("data format {}", FORMAT + 1)),
        "the error names the format: {err}"
    );
    // Left as it was.
    let db = open_sled(dir.path()).unwrap();
    assert_eq!(
        db.get(FORMAT_KEY).unwrap().as_deref(),
        Some(&[FORMAT + 1][..])
    );
    assert_eq!(
        db.get(meta_key("t")).unwrap().as_deref(),
        Some(&[1, 2, 3][..])
    );
}

/// The dedup window of the keyed tests below.
const WINDOW: u64 = 60_000;

/// Opens the backend on `dir` in fsync mode with every topic's dedup
/// window at [`WINDOW`], recovering the keys as of `now`.
fn open_keyed(dir: &Path, now: u64) -> Result<Opened, EngineError> {
    SledLog::open(
        dir,
        Durability::Fsync,
        Duration::from_secs(3600),
        None,
        &|_| WINDOW,
        now,
    )
}

fn topic_id(name: &str, generation: u64) -> TopicId {
    TopicId {
        name: Arc::from(name),
        generation,
        epoch: 5,
    }
}

/// The id `opened` recovered for `topic`.
fn recovered_id(opened: &Opened, topic: &str) -> TopicId {
    opened
        .topics
        .iter()
        .find(|t| &*t.id.name == topic)
        .unwrap_or_else(|| panic!("topic {topic} recovered"))
        .id
        .clone()
}

/// Appends one event per key (its payload is the key) at `now`, in one
/// pass: `(offset, repeat)` per key.
fn append_keyed(log: &SledLog, id: &TopicId, keys: &[&str], now: u64) -> Vec<(u64, bool)> {
    let events = keys
        .iter()
        .map(|k| NewEvent::new("e", k.as_bytes().to_vec()).key(*k))
        .collect();
    let mut steps = [Step::Append {
        topic: id.clone(),
        events,
        expect: Expected::default(),
        window_ms: WINDOW,
        known_next: 1,
        max_events: u64::MAX,
    }];
    match log
        .persist(&mut steps, now)
        .expect("the pass persists")
        .pop()
    {
        Some(Outcome::Appended {
            events, repeats, ..
        }) => {
            let mut fresh = events.iter();
            let mut repeats = repeats.into_iter().peekable();
            (0..keys.len())
                .map(|i| match repeats.next_if(|(at, _)| *at == i) {
                    Some((_, original)) => (original.offset, true),
                    None => (fresh.next().expect("an event per new key").offset, false),
                })
                .collect()
        }
        other => panic!("expected an append, got {other:?}"),
    }
}

fn persist_at(log: &SledLog, steps: impl Into<Vec<Step>>, now: u64) {
    let mut steps = steps.into();
    log.persist(&mut steps, now).expect("the pass persists");
}

/// Every `K` entry of a topic incarnation: first offset and its value.
fn keys_refs(log: &SledLog, topic: &str, generation: u64) -> Vec<(u64, KeysRef)> {
    log.db
        .read()
        .scan_prefix(prefix(KEYS_REF, topic, generation))
        .map(|item| {
            let (key, value) = item.unwrap();
            let (name, g, first) = parse_key(KEYS_REF, &key).expect("a K key parses");
            assert_eq!((name, g), (topic, generation));
            let r = decode::<KeysRef>(FORMAT, &value).expect("a K value decodes");
            (first, r)
        })
        .collect()
}

/// The keys a `K` entry points to, read back from its keys file:
/// `(at_ms, [(key, offset, version)])`.
fn read_back(log: &SledLog, r: &KeysRef) -> (u64, Vec<(String, u64, u64)>) {
    let bytes = log
        .keys_files
        .lock()
        .read(&r.at)
        .expect("the keys' bytes are in their keys file");
    let (stored, used): (StoredKeys, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode_config()).expect("keys decode");
    assert_eq!(used, bytes.len(), "the ref spans exactly the keys' bytes");
    (stored.at_ms, stored.keys)
}

fn keys_list(keys: &[(&str, u64)]) -> Vec<(String, u64, u64)> {
    keys.iter().map(|(k, o)| (k.to_string(), *o, *o)).collect()
}

/// The path of event file `seq` under `dir`.
fn event_file(dir: &Path, seq: u64) -> PathBuf {
    dir.join(EVENTS_DIR).join(format!("{seq:020}.rce"))
}

/// The path of keys file `seq` under `dir`.
fn keys_file(dir: &Path, seq: u64) -> PathBuf {
    dir.join(KEYS_DIR).join(format!("{seq:020}.rce"))
}

/// Where the record of `topic` holding `offset` is.
fn record_at(log: &SledLog, topic: &str, offset: u64) -> RecordRef {
    let topics = log.topics.lock();
    let segment = topics[topic]
        .segments
        .iter()
        .find(|s| s.first <= offset && offset <= s.last)
        .copied()
        .expect("a record holds the offset");
    segment.at.expect("a record in the event files")
}

/// `(offset, payload)` of the recovered events of `topic`, payloads as text.
fn recovered_text(opened: &Opened, topic: &str) -> Vec<(u64, String)> {
    recovered(opened, topic)
        .into_iter()
        .map(|(o, p)| (o, String::from_utf8(p).unwrap()))
        .collect()
}

#[test]
fn keys_are_written_once_to_the_keys_files_and_free_their_file_once_expired() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_keyed(dir.path(), NOW).unwrap().log;
    let id = topic_id("keyed", 1);
    assert_eq!(
        append_keyed(&log, &id, &["a", "b"], NOW),
        vec![(1, false), (2, false)]
    );
    assert_eq!(
        append_keyed(&log, &id, &["c"], NOW + 1000),
        vec![(3, false)]
    );
    // Unkeyed events store no keys.
    assert_eq!(append(&log, &id, 4..=5), vec![4, 5]);
    assert_eq!(
        append_keyed(&log, &id, &["b", "d"], NOW + 2000),
        vec![(2, true), (6, false)]
    );
    assert_eq!(count_keys(&log, KEYS, "keyed", 1), 0, "no inline keys");
    let refs = keys_refs(&log, "keyed", 1);
    let firsts: Vec<u64> = refs.iter().map(|(first, _)| *first).collect();
    assert_eq!(firsts, vec![1, 3, 6], "one K entry per keyed pass");
    let expected = [
        (NOW, keys_list(&[("a", 1), ("b", 2)])),
        (NOW + 1000, keys_list(&[("c", 3)])),
        (NOW + 2000, keys_list(&[("d", 6)])),
    ];
    for ((_, r), (at_ms, keys)) in refs.iter().zip(&expected) {
        assert_eq!(r.at_ms, *at_ms);
        assert!(keys_file(dir.path(), r.at.file).is_file(), "{r:?}");
        assert_eq!(read_back(&log, r), (*at_ms, keys.clone()));
    }
    let file = refs[0].1.at.file;
    assert!(refs.iter().all(|(_, r)| r.at.file == file));
    let records = record_at(&log, "keyed", 1).file;
    // Written once: the keys files hold the keys and nothing else.
    let keys_bytes: u64 = refs.iter().map(|(_, r)| u64::from(r.at.len)).sum();
    assert_eq!(
        std::fs::metadata(keys_file(dir.path(), file))
            .unwrap()
            .len(),
        keys_bytes
    );
    close_log(log);

    // Reopened within the window: the keys are read back from the file.
    let opened = open_keyed(dir.path(), NOW + 3000).unwrap();
    assert!(
        opened.report.damaged_topics.is_empty(),
        "{:?}",
        opened.report
    );
    assert_eq!(opened.report.bad_records, 0);
    let id = recovered_id(&opened, "keyed");
    let log = opened.log;
    assert_eq!(keys_refs(&log, "keyed", 1).len(), 3);
    assert_eq!(
        append_keyed(&log, &id, &["a", "c", "d"], NOW + 3000),
        vec![(1, true), (3, true), (6, true)]
    );
    // Every record trimmed: their event file goes, the keys' file stays.
    persist_at(
        &log,
        [Step::Trim {
            topic: id.clone(),
            first_retained: 7,
            next_offset: 0,
        }],
        NOW + 3000,
    );
    assert_eq!(count_keys(&log, RECORD_REF, "keyed", 1), 0);
    persist_at(&log, [Step::Sync], NOW + 3000);
    assert!(!event_file(dir.path(), records).exists());
    assert!(
        keys_file(dir.path(), file).is_file(),
        "live keys keep their file"
    );

    // The first pass's keys expire; the others still keep the file.
    persist_at(&log, [Step::Expire], NOW + WINDOW);
    let firsts: Vec<u64> = keys_refs(&log, "keyed", 1)
        .iter()
        .map(|(f, _)| *f)
        .collect();
    assert_eq!(firsts, vec![3, 6]);
    assert_eq!(
        append_keyed(&log, &id, &["a", "c"], NOW + WINDOW),
        vec![(7, false), (3, true)]
    );
    persist_at(&log, [Step::Sync], NOW + WINDOW);
    assert!(keys_file(dir.path(), file).is_file());

    // The rest expire: their K entries go, and the file after the next sync.
    persist_at(&log, [Step::Expire], NOW + WINDOW + 2000);
    let refs = keys_refs(&log, "keyed", 1);
    assert_eq!(refs.len(), 1, "only the key of offset 7 is left: {refs:?}");
    assert_eq!(refs[0].0, 7);
    assert_ne!(refs[0].1.at.file, file, "written after the reopen");
    assert!(
        keys_file(dir.path(), file).is_file(),
        "removed only after a sync"
    );
    persist_at(&log, [Step::Sync], NOW + WINDOW + 2000);
    assert!(
        !keys_file(dir.path(), file).exists(),
        "nothing is live in the file any more"
    );
    assert!(keys_file(dir.path(), refs[0].1.at.file).is_file());
    close_log(log);

    let opened = open_keyed(dir.path(), NOW + WINDOW + 3000).unwrap();
    assert!(
        opened.report.damaged_topics.is_empty(),
        "{:?}",
        opened.report
    );
    assert_eq!(opened.report.bad_records, 0);
    assert_eq!(recovered_text(&opened, "keyed"), vec![(7, "a".to_string())]);
    let id = recovered_id(&opened, "keyed");
    let log = opened.log;
    assert_eq!(
        append_keyed(&log, &id, &["a", "c"], NOW + WINDOW + 3000),
        vec![(7, true), (8, false)]
    );
    close_log(log);
}

/// Writes a legacy inline keys value (`D`).
fn write_legacy_keys(
    db: &sled::Db,
    topic: &str,
    generation: u64,
    at_ms: u64,
    keys: &[(&str, u64)],
) {
    let mut key = prefix(KEYS, topic, generation);
    key.extend_from_slice(&keys[0].1.to_be_bytes());
    let value = StoredKeys::<String> {
        at_ms,
        keys: keys_list(keys),
    };
    db.insert(key, encode(&value).unwrap()).unwrap();
}

/// The inline keys value (`D`) of a topic incarnation at `first`.
fn legacy_keys_at(log: &SledLog, topic: &str, generation: u64, first: u64) -> Option<StoredKeys> {
    let mut key = prefix(KEYS, topic, generation);
    key.extend_from_slice(&first.to_be_bytes());
    let value = log.db.read().get(key).unwrap()?;
    Some(decode::<StoredKeys>(FORMAT, &value).expect("a D value decodes"))
}

#[test]
fn legacy_inline_keys_are_recognised_expired_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    write_legacy(dir.path(), &[("old", 7, 300), ("gone", 9, 50)]);
    {
        let db = open_sled(dir.path()).unwrap();
        write_legacy_keys(&db, "old", 7, NOW - 10_000, &[("a", 10), ("b", 11)]);
        write_legacy_keys(&db, "old", 7, NOW - 1000, &[("c", 20)]);
        // A pass that failed after its keys: "f" names an offset never stored.
        write_legacy_keys(&db, "old", 7, NOW - 500, &[("e", 299), ("f", 301)]);
        // Older than the window, and of an incarnation no meta names.
        write_legacy_keys(&db, "old", 7, NOW - WINDOW - 1, &[("stale", 5)]);
        write_legacy_keys(&db, "old", 8, NOW - 1000, &[("orphan", 1)]);
        write_legacy_keys(&db, "gone", 9, NOW - 1000, &[("x", 1)]);
        db.flush().unwrap();
    }

    let opened = open_keyed(dir.path(), NOW).unwrap();
    assert!(
        opened.report.damaged_topics.is_empty(),
        "{:?}",
        opened.report
    );
    assert_eq!(opened.report.bad_records, 0);
    assert_eq!(recovered(&opened, "old"), expected(1..=300));
    let id = recovered_id(&opened, "old");
    let gone = recovered_id(&opened, "gone");
    let log = opened.log;
    assert_eq!(count_keys(&log, KEYS, "old", 7), 3, "10, 20 and 299 stay");
    assert!(
        legacy_keys_at(&log, "old", 7, 5).is_none(),
        "expired: removed"
    );
    assert_eq!(count_keys(&log, KEYS, "old", 8), 0, "orphaned: removed");
    let kept = legacy_keys_at(&log, "old", 7, 299).expect("kept");
    assert_eq!(
        (kept.at_ms, kept.keys),
        (NOW - 500, keys_list(&[("e", 299)])),
        "the key beyond the stored offsets is dropped from the value"
    );
    assert_eq!(
        append_keyed(&log, &id, &["a", "c", "e", "f", "stale", "g"], NOW),
        vec![
            (10, true),
            (20, true),
            (299, true),
            (301, false),
            (302, false),
            (303, false)
        ]
    );
    // New keys go to the event files, beside the inline ones.
    assert_eq!(count_keys(&log, KEYS, "old", 7), 3);
    assert_eq!(count_keys(&log, KEYS_REF, "old", 7), 1);
    // A delete removes the inline keys of its topic.
    persist_at(&log, [Step::Delete { topic: gone }], NOW);
    assert_eq!(count_keys(&log, KEYS, "gone", 9), 0);
    close_log(log);

    let opened = open_keyed(dir.path(), NOW + 1000).unwrap();
    assert!(
        opened.report.damaged_topics.is_empty(),
        "{:?}",
        opened.report
    );
    assert!(opened.topics.iter().all(|t| &*t.id.name != "gone"));
    let id = recovered_id(&opened, "old");
    let log = opened.log;
    assert_eq!(count_keys(&log, KEYS, "old", 7), 3);
    assert_eq!(
        append_keyed(&log, &id, &["b", "e", "f"], NOW + 1000),
        vec![(11, true), (299, true), (301, true)]
    );

    // The oldest inline value expires like a new one.
    let at = NOW - 10_000 + WINDOW;
    persist_at(&log, [Step::Expire], at);
    assert!(legacy_keys_at(&log, "old", 7, 10).is_none());
    assert_eq!(count_keys(&log, KEYS, "old", 7), 2);
    assert_eq!(
        append_keyed(&log, &id, &["a", "b", "c"], at),
        vec![(304, false), (305, false), (20, true)]
    );
    // Then the other inline values and the first new one.
    persist_at(&log, [Step::Expire], NOW + WINDOW);
    assert_eq!(log.db.read().scan_prefix([KEYS]).count(), 0);
    let firsts: Vec<u64> = keys_refs(&log, "old", 7).iter().map(|(f, _)| *f).collect();
    assert_eq!(firsts, vec![304], "the K entry of 301 expired too");
    assert_eq!(
        append_keyed(&log, &id, &["c", "e", "f", "a"], NOW + WINDOW),
        vec![(306, false), (307, false), (308, false), (304, true)]
    );
    close_log(log);

    let opened = open_keyed(dir.path(), NOW + WINDOW + 1).unwrap();
    assert!(
        opened.report.damaged_topics.is_empty(),
        "{:?}",
        opened.report
    );
    assert_eq!(opened.log.db.read().scan_prefix([KEYS]).count(), 0);
    let id = recovered_id(&opened, "old");
    assert_eq!(
        append_keyed(&opened.log, &id, &["a", "b", "c"], NOW + WINDOW + 1),
        vec![(304, true), (305, true), (306, true)]
    );
    close_log(opened.log);
}

/// Copies a data dir (sled's files, the event files, the checkpoint).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn damaged_keys_bytes_forget_only_those_keys() {
    let original = tempfile::tempdir().unwrap();
    let log = open_keyed(original.path(), NOW).unwrap().log;
    let t = topic_id("t", 1);
    let u = topic_id("u", 2);
    assert_eq!(
        append_keyed(&log, &t, &["a", "b"], NOW),
        vec![(1, false), (2, false)]
    );
    assert_eq!(append(&log, &t, 3..=4), vec![3, 4]);
    assert_eq!(append_keyed(&log, &t, &["c"], NOW + 1), vec![(5, false)]);
    assert_eq!(append_keyed(&log, &u, &["a"], NOW + 2), vec![(1, false)]);
    let refs = keys_refs(&log, "t", 1);
    assert_eq!(refs.len(), 2);
    let damaged = refs[0].1.at;
    close_log(log);
    let events_of_t = vec![
        (1, "a".to_string()),
        (2, "b".to_string()),
        (3, String::from_utf8(payload_of(3)).unwrap()),
        (4, String::from_utf8(payload_of(4)).unwrap()),
        (5, "c".to_string()),
    ];

    let copy = tempfile::tempdir().unwrap();
    copy_dir(original.path(), copy.path());
    let path = keys_file(copy.path(), damaged.file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(damaged.pos + u64::from(damaged.len) / 2) as usize] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let opened = open_keyed(copy.path(), NOW + 1000).expect("damaged keys do not stop a start");
    assert!(
        opened.report.damaged_topics.is_empty(),
        "{:?}",
        opened.report
    );
    assert_eq!(opened.report.bad_records, 0, "no record is damaged");
    assert_eq!(recovered_text(&opened, "t"), events_of_t);
    let id = recovered_id(&opened, "t");
    assert_eq!(id.epoch, 5, "the topic keeps its epoch");
    let u = recovered_id(&opened, "u");
    let log = opened.log;
    let firsts: Vec<u64> = keys_refs(&log, "t", 1).iter().map(|(f, _)| *f).collect();
    assert_eq!(firsts, vec![5], "the damaged K entry is removed");
    assert_eq!(
        append_keyed(&log, &id, &["a", "b", "c"], NOW + 1000),
        vec![(6, false), (7, false), (5, true)],
        "only the damaged pass's keys are forgotten"
    );
    assert_eq!(append_keyed(&log, &u, &["a"], NOW + 1000), vec![(1, true)]);
    close_log(log);

    let opened = open_keyed(copy.path(), NOW + 2000).unwrap();
    assert!(
        opened.report.damaged_topics.is_empty(),
        "{:?}",
        opened.report
    );
    assert_eq!(opened.report.bad_records, 0);
    assert_eq!(recovered(&opened, "t").len(), 7);
    let id = recovered_id(&opened, "t");
    assert_eq!(
        append_keyed(&opened.log, &id, &["a", "b", "c"], NOW + 2000),
        vec![(6, true), (7, true), (5, true)]
    );
    close_log(opened.log);

    // The undamaged original remembers every key.
    let opened = open_keyed(original.path(), NOW + 1000).unwrap();
    let id = recovered_id(&opened, "t");
    assert_eq!(
        append_keyed(&opened.log, &id, &["a", "b", "c"], NOW + 1000),
        vec![(1, true), (2, true), (5, true)]
    );
    close_log(opened.log);
}

#[test]
fn keys_removed_twice_in_one_pass_do_not_free_a_file_still_in_use() {
    // Two topics' keys share a keys file; one pass removes the first
    // topic's keys through two steps (two maintenance ticks queued behind
    // a slow pass, or a delete beside a tick).
    for case in ["expire twice", "delete and expire"] {
        let dir = tempfile::tempdir().unwrap();
        let log = open_keyed(dir.path(), NOW).unwrap().log;
        let keyed = topic_id("keyed", 1);
        let other = topic_id("other", 2);
        assert_eq!(append_keyed(&log, &keyed, &["a"], NOW), vec![(1, false)]);
        assert_eq!(
            append_keyed(&log, &other, &["z"], NOW + 10_000),
            vec![(1, false)]
        );
        let file = keys_refs(&log, "keyed", 1)[0].1.at.file;
        assert_eq!(keys_refs(&log, "other", 2)[0].1.at.file, file);
        close_log(log);

        // Reopened, so that the file is no longer the one appended to.
        let opened = open_keyed(dir.path(), NOW + 1000).unwrap();
        let keyed = recovered_id(&opened, "keyed");
        let log = opened.log;
        let steps = match case {
            "expire twice" => vec![Step::Expire, Step::Expire],
            _ => vec![Step::Delete { topic: keyed }, Step::Expire],
        };
        persist_at(&log, steps, NOW + WINDOW);
        assert!(keys_refs(&log, "keyed", 1).is_empty(), "{case}");
        assert_eq!(keys_refs(&log, "other", 2).len(), 1, "{case}");
        persist_at(&log, [Step::Sync], NOW + WINDOW);
        assert!(
            keys_file(dir.path(), file).is_file(),
            "{case}: the file still holds the keys of another topic"
        );
        close_log(log);

        let opened = open_keyed(dir.path(), NOW + WINDOW).unwrap();
        let other = recovered_id(&opened, "other");
        assert_eq!(
            append_keyed(&opened.log, &other, &["z"], NOW + WINDOW),
            vec![(1, true)],
            "{case}: the other topic's key is still known"
        );
        close_log(opened.log);
    }
}

#[test]
fn a_repair_that_finds_a_keys_value_with_no_key_left_does_not_uncount_another() {
    // "a" is published again right after its window, before the tick
    // expired its first value: the window's "a" is the new one, and the
    // first value has no key left in it. The tick's pass then fails after
    // removing that value's K entry, and the repair finds it missing with
    // nothing to write again.
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::default());
    let open = |now| {
        SledLog::open(
            dir.path(),
            Durability::Fsync,
            Duration::from_secs(3600),
            Some(faults.clone()),
            &|_| WINDOW,
            now,
        )
        .unwrap()
    };
    let log = open(NOW).log;
    let t = topic_id("t", 1);
    let other = topic_id("other", 2);
    assert_eq!(append_keyed(&log, &t, &["a"], NOW), vec![(1, false)]);
    assert_eq!(
        append_keyed(&log, &other, &["z"], NOW + 10_000),
        vec![(1, false)]
    );
    let file = keys_refs(&log, "t", 1)[0].1.at.file;
    assert_eq!(keys_refs(&log, "other", 2)[0].1.at.file, file);
    close_log(log);

    let opened = open(NOW + 1000);
    let t = recovered_id(&opened, "t");
    let log = opened.log;
    assert_eq!(
        append_keyed(&log, &t, &["a"], NOW + WINDOW),
        vec![(2, false)]
    );
    faults.fail_nth_sync(1);
    let mut steps = [Step::Expire, Step::Sync];
    assert!(log.persist(&mut steps, NOW + WINDOW).is_err());
    // What the engine acknowledged: the counters (no event needs writing
    // again for what this test checks).
    let committed: Vec<TopicImage> = log
        .topics
        .lock()
        .iter()
        .map(|(name, s)| TopicImage {
            id: TopicId {
                name: name.clone(),
                generation: s.generation,
                epoch: s.epoch,
            },
            counters: s.counters.clone(),
            sealed_at_ms: None,
            events: Vec::new(),
        })
        .collect();
    log.repair(&committed).expect("the repair succeeds");
    assert_eq!(log.health(), Health::Ok);
    persist_at(&log, [Step::Expire], NOW + WINDOW + 1);
    persist_at(&log, [Step::Sync], NOW + WINDOW + 1);
    assert!(
        keys_file(dir.path(), file).is_file(),
        "the file still holds the keys of \"other\""
    );
    close_log(log);

    let opened = open(NOW + WINDOW + 2);
    let other = recovered_id(&opened, "other");
    assert_eq!(
        append_keyed(&opened.log, &other, &["z"], NOW + WINDOW + 2),
        vec![(1, true)],
        "the other topic's key is still known"
    );
    close_log(opened.log);
}
