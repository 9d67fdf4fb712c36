//! Unit tests of the sled backend's layout: event files, legacy inline
//! records, relocation.

use super::*;

use super::super::dedup::Expected;
use super::super::event::NewEvent;
use super::super::files::EVENTS_DIR;

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
