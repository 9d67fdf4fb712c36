//! Regression tests of the Redis scripts (`append.lua`, `delete.lua`,
//! `seal.lua`, `trim.lua`) through [`RedisLog::persist`], against a real
//! `redis-server` started per test (no persistence, loopback, its own
//! temporary directory, killed on drop). Each test names the fix it guards:
//! reverting that fix makes it fail.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::super::log::TopicId;
use super::super::Expected;
use super::*;

/// The time passes are stamped with (keys expire by Redis's own clock).
const NOW: u64 = 1_700_000_000_000;
const WINDOW_MS: u64 = 60_000;
const MAX_EVENTS: u64 = 1_000;

// Generations and epochs above 2^53 and 2^63: Lua numbers could not hold them.
const GEN_A: u64 = 0xA000_0000_0000_0A0A;
const EPOCH_A: u64 = 0xE000_0000_0000_0E0A;
const GEN_B: u64 = 0x00B0_0000_0000_0B0B;
const GEN_C: u64 = 0xC000_0000_0000_0C0C;
const EPOCH_C: u64 = 0xE000_0000_0000_0E0C;

/// The `redis-server` binary: `$REDIS_SERVER`, else `/usr/bin/redis-server`.
/// `None` (the tests are skipped, with a note) when there is none, unless
/// `RINGCAST_REDIS_TESTS=1` (as `.ci/run` sets): then its absence fails.
fn redis_server_binary() -> Option<PathBuf> {
    let path = std::env::var_os("REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/redis-server"));
    if path.is_file() {
        return Some(path);
    }
    assert!(
        !std::env::var("RINGCAST_REDIS_TESTS").is_ok_and(|v| v == "1"),
        "redis-server not found at {} (set REDIS_SERVER or install redis-server): \
         the redis script tests need a real Redis",
        path.display()
    );
    eprintln!("skipping: no redis-server here (set RINGCAST_REDIS_TESTS=1 to make that fail)");
    None
}

/// A `redis-server` child process; killed on drop.
struct Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Option<Self> {
        let bin = redis_server_binary()?;
        let mut last = String::new();
        // A port found free may be taken before Redis binds it: try another.
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            let dir = tempfile::tempdir().expect("a temp dir for redis");
            let child = Command::new(&bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--protected-mode", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(dir.path().join("redis.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let mut server = Server { child, port, dir };
            match server.ready() {
                Ok(()) => return Some(server),
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start on any of 10 ports; last error: {last}");
    }

    /// Polls `PING` until this very process (by pid) answers.
    fn ready(&mut self) -> Result<(), String> {
        let client = redis::Client::open(self.url()).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid = format!("process_id:{}", self.child.id());
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                let log = std::fs::read_to_string(self.dir.path().join("redis.log"));
                return Err(format!("redis-server exited ({status}): {log:?}"));
            }
            if let Ok(mut con) = client.get_connection_with_timeout(Duration::from_secs(1)) {
                let pong = redis::cmd("PING").query::<String>(&mut con);
                let info = redis::cmd("INFO").arg("server").query::<String>(&mut con);
                if let (Ok(pong), Ok(info)) = (pong, info) {
                    // Another test's server on a reused port is not ours.
                    if pong == "PONG" && info.lines().any(|l| l.trim() == pid) {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err("redis-server did not answer PING within 30s".into());
            }
            std::thread::yield_now();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A [`RedisLog`] (one node) with its own key prefix.
    fn log(&self, prefix: &str) -> RedisLog {
        let options = RedisOptions {
            key_prefix: prefix.into(),
            ..RedisOptions::new(self.url(), "t")
        };
        RedisLog::open(&options).expect("open the redis log")
    }

    /// A plain connection for reading raw state.
    fn con(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("a redis connection")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keys(prefix: &str) -> Keys {
    Keys {
        prefix: prefix.into(),
    }
}

fn id(name: &str, generation: u64, epoch: u64) -> TopicId {
    TopicId {
        name: Arc::from(name),
        generation,
        epoch,
    }
}

fn append(topic: &TopicId, events: Vec<NewEvent>, expect: Expected, known_next: u64) -> Step {
    Step::Append {
        topic: topic.clone(),
        events,
        expect,
        window_ms: WINDOW_MS,
        known_next,
        max_events: MAX_EVENTS,
    }
}

fn ev(key: Option<&str>) -> NewEvent {
    let e = NewEvent::new("e", b"x".to_vec());
    match key {
        Some(k) => e.key(k),
        None => e,
    }
}

fn expect(offset: Option<u64>, version: Option<u64>) -> Expected {
    Expected { offset, version }
}

fn persist(log: &RedisLog, mut steps: Vec<Step>) -> Vec<Outcome> {
    let outcomes = log.persist(&mut steps, NOW).expect("the pass runs");
    assert_eq!(outcomes.len(), steps.len());
    outcomes
}

/// One step's pass.
fn persist1(log: &RedisLog, step: Step) -> Outcome {
    persist(log, vec![step]).pop().expect("one outcome")
}

/// An `Appended` outcome's `(offsets, repeats, shared)`.
fn appended(o: &Outcome) -> (Vec<u64>, Vec<(usize, Original)>, &Shared) {
    match o {
        Outcome::Appended {
            events,
            repeats,
            shared: Some(shared),
        } => (
            events.iter().map(|e| e.offset).collect(),
            repeats.clone(),
            shared,
        ),
        other => panic!("expected a shared Appended outcome, got {other:?}"),
    }
}

fn refused(o: &Outcome) -> &EngineError {
    match o {
        Outcome::Refused(e) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn hgetall(con: &mut redis::Connection, key: &str) -> BTreeMap<String, String> {
    redis::cmd("HGETALL").arg(key).query(con).expect("HGETALL")
}

fn int_cmd(con: &mut redis::Connection, cmd: &str, key: &str) -> i64 {
    redis::cmd(cmd).arg(key).query(con).expect(cmd)
}

fn is_member(con: &mut redis::Connection, set: &str, name: &str) -> bool {
    redis::cmd("SISMEMBER")
        .arg(set)
        .arg(name)
        .query(con)
        .expect("SISMEMBER")
}

/// The offsets the stream holds, in order.
fn stream_offsets(con: &mut redis::Connection, key: &str) -> Vec<u64> {
    let v: Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(con)
        .expect("XRANGE");
    decode_entries(v)
        .expect("stream entries")
        .iter()
        .map(|e| e.offset)
        .collect()
}

fn map(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Appends one event to `topic` (creating it with its own incarnation),
/// then deletes it: a tombstone of that incarnation.
fn tombstone(log: &RedisLog, con: &mut redis::Connection, k: &Keys, topic: &TopicId) {
    let o = persist1(log, append(topic, vec![ev(None)], Expected::default(), 1));
    assert_eq!(appended(&o).2.incarnation, (topic.generation, topic.epoch));
    assert!(matches!(
        persist1(
            log,
            Step::Delete {
                topic: topic.clone()
            }
        ),
        Outcome::Done
    ));
    assert_eq!(
        hgetall(con, &k.meta(&topic.name)),
        map(&[
            ("gen", topic.generation.to_string()),
            ("deleted", "1".into())
        ])
    );
}

/// Guards delete.lua's generation check: a delete names the incarnation it
/// deletes, so a node that is behind (or a second expiry of a sealed topic)
/// never deletes a newer incarnation. Reverted (delete whatever is stored),
/// the stale delete below wipes incarnation A.
#[test]
fn a_delete_naming_a_stale_generation_keeps_the_newer_incarnation() {
    let Some(server) = Server::start() else {
        return;
    };
    let (log, k, mut con) = (server.log("st1"), keys("st1"), server.con());
    let a = id("orders", GEN_A, EPOCH_A);
    let o = persist1(
        &log,
        append(&a, vec![ev(Some("k1")), ev(None)], Expected::default(), 1),
    );
    let (offsets, repeats, shared) = appended(&o);
    assert_eq!((offsets, repeats.len()), (vec![1, 2], 0));
    assert_eq!(shared.incarnation, (GEN_A, EPOCH_A));
    let meta = hgetall(&mut con, &k.meta("orders"));
    assert_eq!(meta["gen"], GEN_A.to_string());
    assert_eq!(meta["epoch"], EPOCH_A.to_string());
    assert_eq!(meta["next"], "3");
    assert_eq!(meta["v:e"], "2");

    // A delete from a node that still holds incarnation B: nothing happens.
    let stale = Step::Delete {
        topic: id("orders", GEN_B, EPOCH_A),
    };
    assert!(matches!(persist1(&log, stale), Outcome::Done));
    assert_eq!(hgetall(&mut con, &k.meta("orders")), meta);
    assert_eq!(stream_offsets(&mut con, &k.stream("orders")), vec![1, 2]);
    assert!(is_member(&mut con, &k.topics(), "orders"));

    // The delete of A itself: a tombstone, the stream gone, no longer listed.
    assert!(matches!(
        persist1(&log, Step::Delete { topic: a.clone() }),
        Outcome::Done
    ));
    assert_eq!(
        hgetall(&mut con, &k.meta("orders")),
        map(&[("gen", GEN_A.to_string()), ("deleted", "1".into())])
    );
    let ttl = int_cmd(&mut con, "PTTL", &k.meta("orders"));
    assert!(
        ttl > 0 && ttl <= TOMBSTONE_MS as i64,
        "tombstone PTTL {ttl}"
    );
    assert_eq!(int_cmd(&mut con, "EXISTS", &k.stream("orders")), 0);
    assert!(!is_member(&mut con, &k.topics(), "orders"));

    // A second delete of A (a second expiry) leaves the tombstone as it is.
    assert!(matches!(
        persist1(&log, Step::Delete { topic: a }),
        Outcome::Done
    ));
    assert_eq!(
        hgetall(&mut con, &k.meta("orders")),
        map(&[("gen", GEN_A.to_string()), ("deleted", "1".into())])
    );
}

/// Guards append.lua's keys repeated within one call (`in_call`/`later`):
/// two queued appends merged into one script run that repeat a key store
/// the first and answer the second as its repeat. Reverted (only stored keys
/// are looked up), both events are stored under two offsets.
#[test]
fn merged_appends_repeating_a_key_store_it_once() {
    let Some(server) = Server::start() else {
        return;
    };
    let (log, k, mut con) = (server.log("st2"), keys("st2"), server.con());
    let a = id("pay", GEN_A, EPOCH_A);
    let steps = vec![
        append(&a, vec![ev(Some("k"))], Expected::default(), 1),
        append(&a, vec![ev(Some("k"))], Expected::default(), 1),
    ];
    // The pass is one merged script call.
    assert!(matches!(&RedisLog::calls(&steps)[..], [Call::Append(l)] if l.len() == 2));
    let outcomes = persist(&log, steps);
    let (offsets, repeats, shared) = appended(&outcomes[0]);
    assert_eq!((offsets, repeats), (vec![1], vec![]));
    assert_eq!(shared.incarnation, (GEN_A, EPOCH_A));
    let (offsets, repeats, _) = appended(&outcomes[1]);
    assert_eq!(offsets, Vec::<u64>::new());
    assert_eq!(
        repeats,
        vec![(
            0,
            Original {
                offset: 1,
                version: 1,
                at_ms: NOW
            }
        )]
    );
    assert_eq!(stream_offsets(&mut con, &k.stream("pay")), vec![1]);
    assert_eq!(int_cmd(&mut con, "XLEN", &k.stream("pay")), 1);
    let meta = hgetall(&mut con, &k.meta("pay"));
    assert_eq!((meta["next"].as_str(), meta["v:e"].as_str()), ("2", "1"));
    let stored: String = redis::cmd("GET")
        .arg(k.key("pay", "k"))
        .query(&mut con)
        .expect("GET key");
    assert_eq!(stored, format!("{GEN_A} 1 1 {NOW}"));
}

/// Guards append.lua's tombstone branch: an append to a deleted topic
/// creates it anew, never under the deleted incarnation nor under one the
/// caller holds events of (offsets from 1 in a new epoch; otherwise a
/// subscriber of the old epoch could see offsets given out twice). Only a
/// caller that holds nothing, naming another generation, gets its own.
/// Reverted, the append fails or continues the deleted incarnation.
#[test]
fn an_append_after_a_delete_starts_a_new_incarnation() {
    let Some(server) = Server::start() else {
        return;
    };
    let (log, k, mut con) = (server.log("st3"), keys("st3"), server.con());
    // Node B: no state of its own (no `seen`), as a node behind the delete.
    let other = server.log("st3");

    // A node that still holds events of A (known_next 3).
    let a = id("x", GEN_A, EPOCH_A);
    tombstone(&log, &mut con, &k, &a);
    let o = persist1(
        &other,
        append(&a, vec![ev(Some("k"))], Expected::default(), 3),
    );
    let (offsets, repeats, shared) = appended(&o);
    assert_eq!((offsets, repeats), (vec![1], vec![]));
    let (gen, epoch) = shared.incarnation;
    assert_ne!(gen, GEN_A);
    assert_ne!((gen, epoch), (GEN_A, EPOCH_A));
    assert_ne!(epoch, EPOCH_A);
    assert!(shared.before.is_empty());
    assert_eq!(
        hgetall(&mut con, &k.meta("x")),
        map(&[
            ("gen", gen.to_string()),
            ("epoch", epoch.to_string()),
            ("next", "2".into()),
            ("v:e", "1".into())
        ])
    );
    // No longer a tombstone: it does not expire with it.
    assert_eq!(int_cmd(&mut con, "PTTL", &k.meta("x")), -1);
    assert!(is_member(&mut con, &k.topics(), "x"));
    assert_eq!(stream_offsets(&mut con, &k.stream("x")), vec![1]);

    // A node holding nothing but naming the deleted generation: new too.
    let y = id("y", GEN_A, EPOCH_A);
    tombstone(&log, &mut con, &k, &y);
    let o = persist1(&other, append(&y, vec![ev(None)], Expected::default(), 1));
    let (offsets, _, shared) = appended(&o);
    assert_eq!(offsets, vec![1]);
    assert_ne!(shared.incarnation.0, GEN_A);
    assert_ne!(shared.incarnation.1, EPOCH_A);

    // A node holding nothing, with another generation C: incarnation C.
    let z = id("z", GEN_A, EPOCH_A);
    tombstone(&log, &mut con, &k, &z);
    let c = id("z", GEN_C, EPOCH_C);
    let o = persist1(&other, append(&c, vec![ev(None)], Expected::default(), 1));
    let (offsets, _, shared) = appended(&o);
    assert_eq!(offsets, vec![1]);
    assert_eq!(shared.incarnation, (GEN_C, EPOCH_C));
    let meta = hgetall(&mut con, &k.meta("z"));
    assert_eq!(
        (meta["gen"].as_str(), meta["next"].as_str()),
        (GEN_C.to_string().as_str(), "2")
    );
    assert!(!meta.contains_key("deleted"));
}

/// Guards append.lua's "nothing is written before every check passed": a
/// new history (missing or deleted topic) used to be written before the
/// expected position was checked, so a refused append still re-created the
/// topic (or wiped its tombstone). Now it is refused and Redis is unchanged.
#[test]
fn a_refused_expectation_on_a_missing_or_deleted_topic_writes_nothing() {
    let Some(server) = Server::start() else {
        return;
    };
    let (log, k, mut con) = (server.log("st4"), keys("st4"), server.con());
    let mismatch = EngineError::PositionMismatch {
        current_offset: 0,
        current_version: 0,
    };

    // Missing: nothing at all is created.
    let m = id("missing", GEN_A, EPOCH_A);
    for known in [1, 4] {
        let o = persist1(
            &log,
            append(&m, vec![ev(Some("k"))], expect(Some(5), None), known),
        );
        assert_eq!(refused(&o), &mismatch);
    }
    for key in [
        k.meta("missing"),
        k.stream("missing"),
        k.key("missing", "k"),
    ] {
        assert_eq!(int_cmd(&mut con, "EXISTS", &key), 0, "{key}");
    }
    assert!(!is_member(&mut con, &k.topics(), "missing"));

    // Deleted: the tombstone stays as it was, still expiring.
    let d = id("gone", GEN_A, EPOCH_A);
    tombstone(&log, &mut con, &k, &d);
    let before = hgetall(&mut con, &k.meta("gone"));
    for (topic, known) in [(d.clone(), 2), (id("gone", GEN_C, EPOCH_C), 1)] {
        let o = persist1(
            &log,
            append(&topic, vec![ev(None)], expect(None, Some(7)), known),
        );
        assert_eq!(refused(&o), &mismatch);
        assert_eq!(hgetall(&mut con, &k.meta("gone")), before);
        assert!(int_cmd(&mut con, "PTTL", &k.meta("gone")) > 0);
        assert_eq!(int_cmd(&mut con, "EXISTS", &k.stream("gone")), 0);
        assert!(!is_member(&mut con, &k.topics(), "gone"));
    }

    // The matching expectation (no event ever stored: 0) creates it.
    let c = id("gone", GEN_C, EPOCH_C);
    let o = persist1(
        &log,
        append(&c, vec![ev(None)], expect(Some(0), Some(0)), 1),
    );
    let (offsets, _, shared) = appended(&o);
    assert_eq!((offsets, shared.incarnation), (vec![1], (GEN_C, EPOCH_C)));
}

/// Guards seal.lua's refusal of a topic Redis does not hold: a seal used
/// to create the counters hash (a sealed topic out of nothing, or a sealed
/// tombstone that no append could re-create). Now it is refused with
/// TopicNotFound and nothing is written.
#[test]
fn a_seal_of_a_topic_redis_does_not_hold_is_refused_and_creates_nothing() {
    let Some(server) = Server::start() else {
        return;
    };
    let (log, k, mut con) = (server.log("st5"), keys("st5"), server.con());

    let m = id("missing", GEN_A, EPOCH_A);
    let o = persist1(&log, Step::Seal { topic: m });
    assert_eq!(refused(&o), &EngineError::TopicNotFound("missing".into()));
    assert_eq!(int_cmd(&mut con, "EXISTS", &k.meta("missing")), 0);
    assert!(!is_member(&mut con, &k.topics(), "missing"));

    let d = id("gone", GEN_A, EPOCH_A);
    tombstone(&log, &mut con, &k, &d);
    let before = hgetall(&mut con, &k.meta("gone"));
    let o = persist1(&log, Step::Seal { topic: d.clone() });
    assert_eq!(refused(&o), &EngineError::TopicNotFound("gone".into()));
    assert_eq!(hgetall(&mut con, &k.meta("gone")), before);
    assert!(int_cmd(&mut con, "PTTL", &k.meta("gone")) > 0);
    assert!(!is_member(&mut con, &k.topics(), "gone"));

    // A held topic is sealed, and a second seal answers the first's time.
    let h = id("held", GEN_A, EPOCH_A);
    appended(&persist1(
        &log,
        append(&h, vec![ev(None)], Expected::default(), 1),
    ));
    assert!(matches!(
        persist1(&log, Step::Seal { topic: h.clone() }),
        Outcome::Sealed(NOW)
    ));
    let mut later = vec![Step::Seal { topic: h }];
    match &log.persist(&mut later, NOW + 5).expect("the pass runs")[..] {
        [Outcome::Sealed(at)] => assert_eq!(*at, NOW),
        other => panic!("{other:?}"),
    }
}

/// Guards trim.lua's missing-topic branch: only a topic that holds nothing
/// yet (an explicit create, next offset 1) is stored by a trim; a missing
/// topic the node holds events of is Redis's loss (the follower starts a new
/// history), so the trim must not store it with `next` 1 under the old
/// epoch. Reverted, the first trim below creates the hash.
#[test]
fn a_trim_of_a_missing_topic_stores_it_only_when_it_holds_nothing() {
    let Some(server) = Server::start() else {
        return;
    };
    let (log, k, mut con) = (server.log("st6"), keys("st6"), server.con());
    let t = id("t", GEN_A, EPOCH_A);

    let trim = |next_offset| Step::Trim {
        topic: t.clone(),
        first_retained: 3,
        next_offset,
    };
    assert!(matches!(persist1(&log, trim(5)), Outcome::Done));
    for key in [k.meta("t"), k.stream("t")] {
        assert_eq!(int_cmd(&mut con, "EXISTS", &key), 0, "{key}");
    }
    assert!(!is_member(&mut con, &k.topics(), "t"));

    assert!(matches!(persist1(&log, trim(1)), Outcome::Done));
    assert_eq!(
        hgetall(&mut con, &k.meta("t")),
        map(&[
            ("gen", GEN_A.to_string()),
            ("epoch", EPOCH_A.to_string()),
            ("next", "1".into())
        ])
    );
    assert_eq!(int_cmd(&mut con, "PTTL", &k.meta("t")), -1);
    assert!(is_member(&mut con, &k.topics(), "t"));

    // A tombstone is not a missing topic: a trim leaves it alone.
    let d = id("gone", GEN_A, EPOCH_A);
    tombstone(&log, &mut con, &k, &d);
    let before = hgetall(&mut con, &k.meta("gone"));
    let trim = Step::Trim {
        topic: d,
        first_retained: 1,
        next_offset: 1,
    };
    assert!(matches!(persist1(&log, trim), Outcome::Done));
    assert_eq!(hgetall(&mut con, &k.meta("gone")), before);
    // A create after the delete (a new incarnation, nothing in it yet) is
    // stored over the tombstone.
    let created = id("gone", GEN_A + 7, EPOCH_A + 7);
    let trim = Step::Trim {
        topic: created.clone(),
        first_retained: 1,
        next_offset: 1,
    };
    assert!(matches!(persist1(&log, trim), Outcome::Done));
    assert_eq!(
        hgetall(&mut con, &k.meta("gone")),
        map(&[
            ("gen", created.generation.to_string()),
            ("epoch", created.epoch.to_string()),
            ("next", "1".to_string()),
        ])
    );
    assert_eq!(int_cmd(&mut con, "PTTL", &k.meta("gone")), -1);
}

/// Guards append.lua's expected-position check, mirroring
/// `dedup::append`: the offset and the batch type's version must match the
/// counters (a mismatch answers the current ones and stores nothing), but a
/// batch of repeats only is a retry and is answered as repeats, not
/// refused, even though its expectation is stale by then. Reverted (check
/// before the repeats), the retry below is refused with a mismatch.
#[test]
fn expected_positions_are_checked_except_for_a_retry_of_repeats_only() {
    let Some(server) = Server::start() else {
        return;
    };
    let (log, k, mut con) = (server.log("st7"), keys("st7"), server.con());
    let t = id("acct", GEN_A, EPOCH_A);
    let s = k.stream("acct");

    let o = persist1(
        &log,
        append(&t, vec![ev(None), ev(None)], Expected::default(), 1),
    );
    assert_eq!(appended(&o).0, vec![1, 2]);

    // Right offset: stored.
    let o = persist1(&log, append(&t, vec![ev(None)], expect(Some(2), None), 3));
    assert_eq!(appended(&o).0, vec![3]);
    // Wrong offset, wrong version: refused with the current ones.
    let now = EngineError::PositionMismatch {
        current_offset: 3,
        current_version: 3,
    };
    for e in [
        expect(Some(2), None),
        expect(None, Some(2)),
        expect(Some(3), Some(9)),
    ] {
        let o = persist1(&log, append(&t, vec![ev(Some("n"))], e, 4));
        assert_eq!(refused(&o), &now, "{e:?}");
    }
    assert_eq!(stream_offsets(&mut con, &s), vec![1, 2, 3]);
    assert_eq!(int_cmd(&mut con, "EXISTS", &k.key("acct", "n")), 0);

    // Right offset and version, keyed.
    let right = expect(Some(3), Some(3));
    let o = persist1(&log, append(&t, vec![ev(Some("r"))], right, 4));
    assert_eq!(appended(&o).0, vec![4]);
    let original = Original {
        offset: 4,
        version: 4,
        at_ms: NOW,
    };

    // Its retry, with the expectation now stale: the original, not a refusal.
    let o = persist1(&log, append(&t, vec![ev(Some("r"))], right, 5));
    let (offsets, repeats, shared) = appended(&o);
    assert_eq!(offsets, Vec::<u64>::new());
    assert_eq!(repeats, vec![(0, original)]);
    assert_eq!(shared.incarnation, (GEN_A, EPOCH_A));

    // A repeat with a new event is not a retry: the stale expectation fails.
    let o = persist1(
        &log,
        append(&t, vec![ev(Some("r")), ev(Some("s"))], right, 5),
    );
    assert_eq!(
        refused(&o),
        &EngineError::PositionMismatch {
            current_offset: 4,
            current_version: 4,
        }
    );
    assert_eq!(stream_offsets(&mut con, &s), vec![1, 2, 3, 4]);
    assert_eq!(int_cmd(&mut con, "EXISTS", &k.key("acct", "s")), 0);
    let meta = hgetall(&mut con, &k.meta("acct"));
    assert_eq!((meta["next"].as_str(), meta["v:e"].as_str()), ("5", "4"));

    // With the current expectation it stores the new one only.
    let o = persist1(
        &log,
        append(
            &t,
            vec![ev(Some("r")), ev(Some("s"))],
            expect(Some(4), Some(4)),
            5,
        ),
    );
    let (offsets, repeats, _) = appended(&o);
    assert_eq!((offsets, repeats), (vec![5], vec![(0, original)]));
}

/// Guards append.lua's `XADD ... MAXLEN <max_events>` (exact): the stream
/// keeps the topic's last `max_events` events. Reverted (no MAXLEN, or an
/// approximate `~` one that trims only whole nodes), all 5 stay.
#[test]
fn the_stream_is_trimmed_to_max_events() {
    let Some(server) = Server::start() else {
        return;
    };
    let (log, k, mut con) = (server.log("st8"), keys("st8"), server.con());
    let t = id("m", GEN_A, EPOCH_A);
    let step = Step::Append {
        topic: t,
        events: (0..5).map(|_| ev(None)).collect(),
        expect: Expected::default(),
        window_ms: WINDOW_MS,
        known_next: 1,
        max_events: 3,
    };
    let o = persist1(&log, step);
    assert_eq!(appended(&o).0, vec![1, 2, 3, 4, 5]);
    assert_eq!(int_cmd(&mut con, "XLEN", &k.stream("m")), 3);
    let first: Value = redis::cmd("XRANGE")
        .arg(k.stream("m"))
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query(&mut con)
        .expect("XRANGE");
    match &array(first).expect("entries")[..] {
        [entry] => match array(entry.clone()).as_deref() {
            Some([id, _]) => assert_eq!(text(id), Some("3-0")),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert_eq!(stream_offsets(&mut con, &k.stream("m")), vec![3, 4, 5]);
    assert_eq!(hgetall(&mut con, &k.meta("m"))["next"], "6");
}
