//! Storage faults and the engine's failure rules: failed writes and fsyncs
//! refuse their pass and the store repairs itself; a damaged data file is
//! detected (new epoch, counters never go back) rather than served as a
//! silently shorter history; subscribe-created topics are ephemeral; slow
//! consumers get exactly one gap; seal/delete take effect only once
//! persisted; a data dir is held by one engine; close acknowledges nothing
//! after its clean marker.
//!
//! Every test opens its engine on its own temporary directory, with the
//! maintenance thread at an hour so it never keeps an engine alive across a
//! reopen. Waiting for the store to repair itself polls `health()`: there is
//! no event to await for it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::engine::{open, options, release, try_open};
use ringcast::config::Durability;
use ringcast::engine::{
    Ack, Delivery, Engine, EngineError, EngineOptions, Event, Faults, GapReason, Health, NewEvent,
    Start, Subscription,
};

/// Generous bound for anything a test awaits on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// Options on `dir` with retention wide enough that nothing is trimmed.
/// Options on `dir` with fault injection; returns the handle to inject with.
fn faulty(dir: &Path, durability: Durability) -> (EngineOptions, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let mut options = options(dir, durability);
    options.faults = Some(faults.clone());
    (options, faults)
}

/// Shuts the engine down cleanly and releases the data directory.
async fn close(engine: Engine) {
    within(engine.close())
        .await
        .expect("the engine closes cleanly");
    release(engine).await;
}

/// Awaits `f`, failing the test after [`PATIENCE`].
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .expect("finished in time")
}

/// An event whose payload names it.
fn event(name: &str) -> NewEvent {
    NewEvent::new("e", name.as_bytes().to_vec())
}

fn payload(e: &Event) -> String {
    String::from_utf8(e.payload.to_vec()).expect("test payloads are UTF-8")
}

/// Every retained event of `topic` as (offset, payload), in offset order.
fn stored(engine: &Engine, topic: &str) -> Vec<(u64, String)> {
    engine
        .history(topic, 0, &[], 10_000)
        .expect("the topic exists")
        .events
        .iter()
        .map(|e| (e.offset, payload(e)))
        .collect()
}

/// Polls `health()` until the store has repaired itself.
async fn healthy(engine: &Engine) {
    within(async {
        while engine.health() != Health::Ok {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The next delivery, failing the test if none comes in time.
async fn next(sub: &mut Subscription) -> Delivery {
    within(sub.recv())
        .await
        .expect("the subscription is still open")
}

/// The next delivery, which must be an event.
async fn next_event(sub: &mut Subscription) -> Arc<Event> {
    match next(sub).await {
        Delivery::Event(e) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

/// Asserts `r` is a refusal because the store is unavailable.
fn assert_unavailable<T: std::fmt::Debug>(r: &Result<T, EngineError>) {
    assert!(
        matches!(r, Err(EngineError::StorageUnavailable(_))),
        "expected StorageUnavailable, got {r:?}"
    );
}

/// `publishers` tasks each publishing `each` events one after the other
/// (so passes hold several publishes); returns every outcome by payload.
async fn publish_concurrently(
    engine: &Engine,
    topic: &str,
    round: usize,
    publishers: usize,
    each: usize,
) -> Vec<(String, Result<Ack, EngineError>)> {
    let tasks: Vec<_> = (0..publishers)
        .map(|p| {
            let engine = engine.clone();
            let topic = topic.to_string();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..each {
                    let name = format!("r{round}-p{p}-{i}");
                    let r = engine.publish(&topic, event(&name)).await;
                    out.push((name, r));
                }
                out
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.extend(within(t).await.expect("publisher does not panic"));
    }
    outcomes
}

/// Checks the outcomes of a faulty round: every refusal is
/// `StorageUnavailable`, at least one happened, and adds the acks to
/// `acked` (offset → payload).
fn record_round(
    outcomes: Vec<(String, Result<Ack, EngineError>)>,
    epoch: u64,
    acked: &mut BTreeMap<u64, String>,
) {
    let mut refused = 0;
    for (name, r) in outcomes {
        match r {
            Ok(ack) => {
                assert_eq!(ack.epoch, epoch, "the epoch never changes while running");
                let before = acked.insert(ack.offset, name);
                assert!(before.is_none(), "offset {} acknowledged twice", ack.offset);
            }
            Err(_) => {
                assert_unavailable(&r);
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "the injected fault refused at least one publish"
    );
}

/// Asserts that `acked` is exactly offsets 1..=n: refusals consume no offset.
fn assert_contiguous(acked: &BTreeMap<u64, String>) {
    let offsets: Vec<u64> = acked.keys().copied().collect();
    let expected: Vec<u64> = (1..=acked.len() as u64).collect();
    assert_eq!(offsets, expected, "acked offsets are 1..=n without holes");
}

/// Runs faulty rounds against a live subscriber, then checks the
/// subscriber and the reopened store hold exactly the acknowledged events.
async fn faults_refuse_their_pass(inject: impl Fn(&Faults, u64), ks: &[u64]) {
    let dir = tempfile::tempdir().unwrap();
    let (opts, faults) = faulty(dir.path(), Durability::Fsync);
    let engine = open(opts.clone()).await;
    let topic = "faulty";
    let first = within(engine.publish(topic, event("first"))).await.unwrap();
    let epoch = first.epoch;
    let mut acked = BTreeMap::from([(first.offset, "first".to_string())]);
    let mut sub = engine.subscribe(topic, vec![], Start::Earliest).unwrap();

    for (round, &k) in ks.iter().enumerate() {
        inject(&faults, k);
        let outcomes = publish_concurrently(&engine, topic, round, 6, 6).await;
        record_round(outcomes, epoch, &mut acked);
        healthy(&engine).await;
        let name = format!("after-round-{round}");
        let ack = within(engine.publish(topic, event(&name))).await.unwrap();
        assert_eq!(ack.epoch, epoch);
        assert_eq!(
            ack.offset,
            *acked.keys().last().unwrap() + 1,
            "offsets continue right after the last acknowledged one"
        );
        acked.insert(ack.offset, name);
    }
    assert_contiguous(&acked);

    let expected: Vec<(u64, String)> = acked.clone().into_iter().collect();
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let e = next_event(&mut sub).await;
        seen.push((e.offset, payload(&e)));
    }
    assert_eq!(
        seen, expected,
        "the subscriber sees exactly the acked events, in order"
    );
    assert_eq!(sub.try_recv(), None, "nothing refused reaches a subscriber");
    drop(sub);
    assert_eq!(stored(&engine, topic), expected);
    close(engine).await;

    let engine = open(opts).await;
    assert_eq!(engine.info(topic).unwrap().epoch, epoch);
    assert_eq!(
        stored(&engine, topic),
        expected,
        "after reopen: exactly the acked events"
    );
    let ack = within(engine.publish(topic, event("after-reopen")))
        .await
        .unwrap();
    assert_eq!(ack.offset, expected.len() as u64 + 1);
    close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_refuses_its_pass_and_the_store_repairs_itself() {
    faults_refuse_their_pass(|f, k| f.fail_nth_write(k), &[1, 2, 3, 5, 8]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_is_never_acknowledged_and_writes_resume_after_repair() {
    // The single-publish case first: exact offsets.
    let dir = tempfile::tempdir().unwrap();
    let (opts, faults) = faulty(dir.path(), Durability::Fsync);
    let engine = open(opts.clone()).await;
    let mut sub = engine.subscribe("t", vec![], Start::Live).unwrap();
    for i in 1..=3 {
        let ack = within(engine.publish("t", event(&i.to_string())))
            .await
            .unwrap();
        assert_eq!(ack.offset, i);
    }
    faults.fail_nth_sync(1);
    let r = within(engine.publish("t", event("lost"))).await;
    assert_unavailable(&r);
    assert!(matches!(engine.health(), Health::Degraded(_)));
    healthy(&engine).await;
    let ack = within(engine.publish("t", event("4"))).await.unwrap();
    assert_eq!(ack.offset, 4, "the refused event consumed no offset");
    for i in 1..=4u64 {
        let e = next_event(&mut sub).await;
        assert_eq!((e.offset, payload(&e)), (i, i.to_string()));
    }
    assert_eq!(sub.try_recv(), None);
    drop(sub);
    close(engine).await;
    let engine = open(opts).await;
    let expected: Vec<(u64, String)> = (1..=4).map(|i| (i, i.to_string())).collect();
    assert_eq!(stored(&engine, "t"), expected);
    close(engine).await;

    // Then concurrent publishers sharing the failed flush.
    faults_refuse_their_pass(|f, k| f.fail_nth_sync(k), &[1, 2, 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_repairs_fail_publishes_are_refused_and_reads_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, faults) = faulty(dir.path(), Durability::Fsync);
    let engine = open(opts.clone()).await;
    for i in 1..=5 {
        within(engine.publish("t", event(&i.to_string())))
            .await
            .unwrap();
    }
    let epoch = engine.info("t").unwrap().epoch;
    let expected: Vec<(u64, String)> = (1..=5).map(|i| (i, i.to_string())).collect();

    // Three failed repairs keep the store degraded for at least
    // 200 + 400 + 800 ms after the failure.
    faults.fail_repairs(3);
    faults.fail_nth_write(1);
    let r = within(engine.publish("t", event("lost"))).await;
    assert_unavailable(&r);
    assert!(matches!(engine.health(), Health::Degraded(_)));
    let r = within(engine.publish("t", event("refused"))).await;
    assert_unavailable(&r);
    assert!(matches!(engine.health(), Health::Degraded(_)));

    // Reads keep working while degraded.
    assert_eq!(stored(&engine, "t"), expected);
    let info = engine.info("t").unwrap();
    assert_eq!((info.epoch, info.last_offset), (epoch, 5));
    let mut sub = engine.subscribe("t", vec![], Start::Earliest).unwrap();
    for i in 1..=5u64 {
        let e = next_event(&mut sub).await;
        assert_eq!((e.offset, payload(&e)), (i, i.to_string()));
    }

    healthy(&engine).await;
    let ack = within(engine.publish("t", event("6"))).await.unwrap();
    assert_eq!((ack.epoch, ack.offset), (epoch, 6));
    let e = next_event(&mut sub).await;
    assert_eq!((e.offset, payload(&e)), (6, "6".to_string()));
    assert_eq!(sub.try_recv(), None);
    drop(sub);
    close(engine).await;

    let engine = open(opts).await;
    let expected: Vec<(u64, String)> = (1..=6).map(|i| (i, i.to_string())).collect();
    assert_eq!(stored(&engine, "t"), expected);
    assert_eq!(engine.info("t").unwrap().epoch, epoch);
    close(engine).await;
}

/// Copies a directory tree (the sled data dir has at most one level of
/// subdirectories, but recurse anyway).
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

const DAMAGE_EVENTS: u64 = 5_000;

/// A cleanly closed data dir holding `DAMAGE_EVENTS` events of ~200 bytes
/// on topic "big"; returns the topic's epoch.
async fn write_big_topic(dir: &Path) -> u64 {
    let engine = open(options(dir, Durability::Fsync)).await;
    let mut epoch = 0;
    for batch in 0..(DAMAGE_EVENTS / 100) {
        let events = (0..100)
            .map(|i| {
                let n = batch * 100 + i + 1;
                NewEvent::new("e", format!("{n:0>200}").into_bytes())
            })
            .collect();
        let acks = within(engine.publish_batch("big", events)).await.unwrap();
        epoch = acks[0].epoch;
    }
    close(engine).await;
    epoch
}

/// Whether [`assert_damage_detected`] also checks that, once a damaged
/// topic got a new epoch, new events reach subscribers and history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterDamage {
    /// Only the damage rule: error, or new epoch / intact, counters go on.
    RuleOnly,
    /// Also: the gap is followed by the next event; live subscribers and
    /// history after the last old offset see new events.
    CheckReads,
}

/// The damage rule on a reopened, damaged copy: an error, or (a new epoch,
/// or every event intact) with counters that never go back.
async fn assert_damage_detected(dir: &Path, old_epoch: u64, what: &str, after_damage: AfterDamage) {
    let engine = match try_open(options(dir, Durability::Fsync)).await {
        Err(e) => {
            println!("{what}: open refused: {e}");
            let text = e.to_string();
            assert!(!text.is_empty());
            return;
        }
        Ok(engine) => engine,
    };
    let report = engine.recovery_report().clone();
    let info = engine
        .info("big")
        .unwrap_or_else(|e| panic!("{what}: the damaged topic is still known: {e}"));
    let history = stored(&engine, "big");
    println!(
        "{what}: epoch changed {}, {} events back, report {report:?}",
        info.epoch != old_epoch,
        history.len()
    );
    if info.epoch == old_epoch {
        let expected: Vec<(u64, String)> = (1..=DAMAGE_EVENTS)
            .map(|n| (n, format!("{n:0>200}")))
            .collect();
        assert!(
            history == expected,
            "{what}: same epoch but {} of {DAMAGE_EVENTS} events (first {:?}, last {:?}): \
             a silently shorter or altered history",
            history.len(),
            history.first().map(|e| e.0),
            history.last().map(|e| e.0),
        );
    } else {
        assert!(
            report.damaged_topics.iter().any(|t| t == "big"),
            "{what}: a new epoch is reported as damage: {report:?}"
        );
    }

    let mut sub = engine
        .subscribe(
            "big",
            vec![],
            Start::AfterOffset {
                epoch: old_epoch,
                offset: 3000,
            },
        )
        .unwrap();
    let ack = within(engine.publish("big", event("next"))).await.unwrap();
    assert_eq!(
        ack.offset,
        DAMAGE_EVENTS + 1,
        "{what}: the next offset never goes back"
    );
    assert_eq!(ack.epoch, info.epoch);
    if info.epoch == old_epoch {
        for n in 3001..=DAMAGE_EVENTS {
            let e = next_event(&mut sub).await;
            assert_eq!((e.offset, payload(&e)), (n, format!("{n:0>200}")));
        }
    } else {
        match next(&mut sub).await {
            Delivery::Gap(g) => assert_eq!(g.reason, GapReason::EpochChanged, "{g:?}"),
            other => panic!("{what}: expected an epoch_changed gap, got {other:?}"),
        }
    }
    if info.epoch == old_epoch || after_damage == AfterDamage::CheckReads {
        let e = next_event(&mut sub).await;
        assert_eq!(
            (e.offset, payload(&e)),
            (DAMAGE_EVENTS + 1, "next".to_string())
        );
    }
    if info.epoch != old_epoch && after_damage == AfterDamage::CheckReads {
        let h = engine.history("big", DAMAGE_EVENTS, &[], 10).unwrap();
        let offsets: Vec<u64> = h.events.iter().map(|e| e.offset).collect();
        assert_eq!(
            offsets,
            vec![DAMAGE_EVENTS + 1],
            "{what}: history after the last old offset"
        );
        let mut live = engine.subscribe("big", vec![], Start::Live).unwrap();
        let ack = within(engine.publish("big", event("next2"))).await.unwrap();
        assert_eq!(ack.offset, DAMAGE_EVENTS + 2);
        let e = next_event(&mut live).await;
        assert_eq!(
            (e.offset, payload(&e)),
            (DAMAGE_EVENTS + 2, "next2".to_string())
        );
        let e = next_event(&mut sub).await;
        assert_eq!(e.offset, DAMAGE_EVENTS + 2);
    }
    drop(sub);
    close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_the_data_file_is_detected_never_a_silent_shorter_history() {
    let original = tempfile::tempdir().unwrap();
    let epoch = write_big_topic(original.path()).await;
    let len = std::fs::metadata(original.path().join("db")).unwrap().len();
    for position in [len / 2, len / 3, len * 2 / 3, len * 9 / 10] {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(original.path(), copy.path());
        let db = copy.path().join("db");
        let mut bytes = std::fs::read(&db).unwrap();
        bytes[position as usize] ^= 0xff;
        std::fs::write(&db, bytes).unwrap();
        let what = format!("byte {position} of {len}");
        assert_damage_detected(copy.path(), epoch, &what, AfterDamage::RuleOnly).await;
    }
}

/// Cuts sled's data file to half its length; returns what was done.
fn truncate_data_file_to_half(dir: &Path) -> String {
    let db = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("db"))
        .unwrap();
    let len = db.metadata().unwrap().len();
    db.set_len(len / 2).unwrap();
    format!("truncated to {} of {len}", len / 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_data_file_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let epoch = write_big_topic(dir.path()).await;
    let what = truncate_data_file_to_half(dir.path());
    assert_damage_detected(dir.path(), epoch, &what, AfterDamage::RuleOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_damaged_recovery_new_events_reach_subscribers_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let epoch = write_big_topic(dir.path()).await;
    let what = truncate_data_file_to_half(dir.path());
    assert_damage_detected(dir.path(), epoch, &what, AfterDamage::CheckReads).await;
}

fn topic_names(engine: &Engine) -> Vec<String> {
    engine.topics().into_iter().map(|t| t.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_created_topics_do_not_outlive_their_subscribers_or_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path(), Durability::Fsync);
    let engine = open(opts.clone()).await;

    let a = engine.subscribe("eph", vec![], Start::Live).unwrap();
    let b = engine.subscribe("eph", vec![], Start::Earliest).unwrap();
    assert_eq!(topic_names(&engine), vec!["eph"]);
    drop(a);
    assert_eq!(
        topic_names(&engine),
        vec!["eph"],
        "one subscriber still lives"
    );
    drop(b);
    assert!(
        topic_names(&engine).is_empty(),
        "gone with its last subscriber"
    );
    assert!(matches!(
        engine.info("eph"),
        Err(EngineError::TopicNotFound(_))
    ));

    // Its first event makes it a normal, stored topic.
    let mut kept = engine.subscribe("kept", vec![], Start::Live).unwrap();
    let ack = within(engine.publish("kept", event("1"))).await.unwrap();
    assert_eq!(ack.offset, 1);
    assert_eq!(next_event(&mut kept).await.offset, 1);
    drop(kept);
    assert_eq!(topic_names(&engine), vec!["kept"]);

    // Alive across close, never stored.
    let held = engine.subscribe("held", vec![], Start::Live).unwrap();
    assert_eq!(topic_names(&engine), vec!["held", "kept"]);
    close(engine).await;
    drop(held);

    let engine = open(opts).await;
    assert_eq!(topic_names(&engine), vec!["kept"]);
    assert_eq!(stored(&engine, "kept"), vec![(1, "1".to_string())]);
    close(engine).await;
}

#[tokio::test]
async fn max_ephemeral_topics_is_enforced() {
    let mut opts = EngineOptions::memory();
    opts.limits.max_ephemeral_topics = 3;
    let engine = Engine::open(opts).unwrap();
    let mut subs: Vec<Subscription> = (0..3)
        .map(|i| {
            engine
                .subscribe(&format!("e{i}"), vec![], Start::Live)
                .unwrap()
        })
        .collect();
    let r = engine.subscribe("e3", vec![], Start::Live);
    assert!(
        matches!(r, Err(EngineError::TooManyTopics(_))),
        "the fourth is refused: {:?}",
        r.map(|_| ())
    );
    assert_eq!(topic_names(&engine), vec!["e0", "e1", "e2"]);
    // A second subscriber of an existing ephemeral topic creates nothing.
    let again = engine.subscribe("e0", vec![], Start::Live).unwrap();
    drop(again);

    // Dropping one frees its slot.
    drop(subs.remove(2));
    subs.push(engine.subscribe("e3", vec![], Start::Live).unwrap());
    // Publishing makes one a normal topic, which frees another slot.
    within(engine.publish("e0", event("x"))).await.unwrap();
    subs.push(engine.subscribe("e4", vec![], Start::Live).unwrap());
    let r = engine.subscribe("e5", vec![], Start::Live);
    assert!(matches!(r, Err(EngineError::TooManyTopics(_))));
    // Explicitly created or published topics are not ephemeral.
    within(engine.publish("p", event("x"))).await.unwrap();
    engine.subscribe("p", vec![], Start::Live).unwrap();
    assert_eq!(topic_names(&engine), vec!["e0", "e1", "e3", "e4", "p"]);
    drop(subs);
    assert_eq!(topic_names(&engine), vec!["e0", "p"]);
    engine.close().await.unwrap();
}

/// Options keeping at most 10 events per topic.
fn ring_of_ten(dir: &Path, durability: Durability) -> EngineOptions {
    let mut opts = options(dir, durability);
    opts.topics.max_events = 10;
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeping_up_subscriber_never_gets_a_gap_whatever_the_batch_size() {
    for durability in [Durability::Memory, Durability::Fsync] {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(ring_of_ten(dir.path(), durability)).await;
        within(engine.publish("t", event("0"))).await.unwrap();
        let mut sub = engine.subscribe("t", vec![], Start::Earliest).unwrap();
        assert_eq!(next_event(&mut sub).await.offset, 1);
        let mut last = 1;
        for size in [1u64, 9, 10, 11, 50, 200, 3] {
            let events = (0..size).map(|i| event(&format!("{size}-{i}"))).collect();
            let acks = within(engine.publish_batch("t", events)).await.unwrap();
            assert_eq!(acks.len() as u64, size);
            for (i, ack) in acks.iter().enumerate() {
                assert_eq!(ack.offset, last + 1 + i as u64);
            }
            for i in 0..size {
                match next(&mut sub).await {
                    Delivery::Event(e) => {
                        assert_eq!(
                            (e.offset, payload(&e)),
                            (last + 1 + i, format!("{size}-{i}")),
                            "{durability:?}, batch of {size}"
                        );
                    }
                    other => panic!("{durability:?}, batch of {size}: got {other:?}"),
                }
            }
            last += size;
            assert_eq!(sub.try_recv(), None);
        }
        drop(sub);
        close(engine).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_once_gets_exactly_one_gap_then_events() {
    for durability in [Durability::Memory, Durability::Fsync] {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(ring_of_ten(dir.path(), durability)).await;
        let mut sub = engine.subscribe("t", vec![], Start::Live).unwrap();
        within(engine.publish("t", event("1"))).await.unwrap();
        assert_eq!(next_event(&mut sub).await.offset, 1);
        // Thirty single publishes while the subscriber reads nothing: the
        // ring (10 events) overwrites 2..=21 before it reads on.
        for i in 2..=31 {
            within(engine.publish("t", event(&i.to_string())))
                .await
                .unwrap();
        }
        match next(&mut sub).await {
            Delivery::Gap(g) => {
                assert_eq!(g.reason, GapReason::SlowConsumer, "{durability:?}: {g:?}");
                assert_eq!(g.topic, "t");
                assert_eq!(g.event_type, None);
            }
            other => panic!("{durability:?}: expected a slow-consumer gap, got {other:?}"),
        }
        let e = next_event(&mut sub).await;
        assert_eq!(
            (e.offset, payload(&e)),
            (31, "31".to_string()),
            "{durability:?}: the gap is followed by the newest retained event"
        );
        assert_eq!(sub.try_recv(), None, "{durability:?}: exactly one gap");
        for i in 32..=34u64 {
            within(engine.publish("t", event(&i.to_string())))
                .await
                .unwrap();
            let e = next_event(&mut sub).await;
            assert_eq!((e.offset, payload(&e)), (i, i.to_string()));
        }
        assert_eq!(sub.try_recv(), None);
        drop(sub);
        close(engine).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_or_delete_that_fails_to_persist_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, faults) = faulty(dir.path(), Durability::Fsync);
    let engine = open(opts.clone()).await;
    for i in 1..=3 {
        within(engine.publish("t", event(&i.to_string())))
            .await
            .unwrap();
    }
    let epoch = engine.info("t").unwrap().epoch;
    let mut sub = engine.subscribe("t", vec![], Start::Live).unwrap();

    faults.fail_nth_write(1);
    let r = within(engine.seal("t")).await;
    assert!(r.is_err(), "a seal that failed to persist is an error");
    println!("failed seal: {r:?}");
    assert!(!engine.info("t").unwrap().sealed, "the topic is not sealed");
    healthy(&engine).await;
    let ack = within(engine.publish("t", event("4"))).await.unwrap();
    assert_eq!(
        (ack.epoch, ack.offset),
        (epoch, 4),
        "publishes still accepted"
    );
    let e = next_event(&mut sub).await;
    assert_eq!(e.offset, 4, "the subscriber got no End");

    faults.fail_nth_write(1);
    let r = within(engine.delete("t")).await;
    assert!(r.is_err(), "a delete that failed to persist is an error");
    println!("failed delete: {r:?}");
    let info = engine.info("t").expect("the topic still exists");
    assert_eq!(
        (info.epoch, info.last_offset, info.sealed),
        (epoch, 4, false)
    );
    healthy(&engine).await;
    let ack = within(engine.publish("t", event("5"))).await.unwrap();
    assert_eq!((ack.epoch, ack.offset), (epoch, 5));
    let e = next_event(&mut sub).await;
    assert_eq!(e.offset, 5, "the subscriber got no End");
    assert_eq!(sub.try_recv(), None);
    drop(sub);
    close(engine).await;

    let engine = open(opts).await;
    let info = engine.info("t").expect("the topic survives a reopen");
    assert_eq!((info.epoch, info.sealed), (epoch, false));
    let expected: Vec<(u64, String)> = (1..=5).map(|i| (i, i.to_string())).collect();
    assert_eq!(stored(&engine, "t"), expected);
    let ack = within(engine.publish("t", event("6"))).await.unwrap();
    assert_eq!(ack.offset, 6);
    close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_engine_on_the_same_data_dir_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path(), Durability::Fsync);
    let first = open(opts.clone()).await;
    within(first.publish("t", event("1"))).await.unwrap();

    let second = within(try_open(opts.clone())).await;
    match second {
        Ok(_) => panic!("a second engine opened a held data dir"),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("in use by another ringcastd"),
                "unclear error: {text}"
            );
        }
    }
    // The first is unaffected.
    let ack = within(first.publish("t", event("2"))).await.unwrap();
    assert_eq!(ack.offset, 2);
    close(first).await;

    let again = open(opts).await;
    assert_eq!(
        stored(&again, "t"),
        vec![(1, "1".to_string()), (2, "2".to_string())]
    );
    close(again).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_acknowledges_nothing_after_the_clean_marker() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path(), Durability::Interval);
    opts.flush_interval = Duration::from_millis(50);
    let engine = open(opts.clone()).await;
    let epoch = within(engine.publish("t", event("first")))
        .await
        .unwrap()
        .epoch;

    let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel();
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let engine = engine.clone();
            let progress = progress_tx.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0.. {
                    let name = format!("p{p}-{i}");
                    match engine.publish("t", event(&name)).await {
                        Ok(ack) => {
                            acked.push((ack.offset, name));
                            let _ = progress.send(());
                        }
                        Err(EngineError::ShuttingDown) => break,
                        Err(e) => panic!("a publish racing close got {e:?}"),
                    }
                }
                acked
            })
        })
        .collect();
    drop(progress_tx);
    // Close once the publishers are well under way.
    for _ in 0..200 {
        within(progress.recv()).await.expect("publishers run");
    }
    within(engine.close()).await.expect("close succeeds");
    let mut acked: BTreeMap<u64, String> = BTreeMap::from([(1, "first".to_string())]);
    for p in publishers {
        for (offset, name) in within(p).await.expect("publisher does not panic") {
            assert!(
                acked.insert(offset, name).is_none(),
                "offset {offset} twice"
            );
        }
    }
    assert_contiguous(&acked);
    let r = within(engine.publish("t", event("late"))).await;
    assert!(matches!(r, Err(EngineError::ShuttingDown)), "{r:?}");
    release(engine).await;

    let engine = open(opts).await;
    assert_eq!(
        engine.info("t").unwrap().epoch,
        epoch,
        "a clean close keeps the epoch"
    );
    assert!(engine.recovery_report().damaged_topics.is_empty());
    let expected: Vec<(u64, String)> = acked.into_iter().collect();
    assert_eq!(stored(&engine, "t"), expected, "exactly the acked events");
    close(engine).await;
}

/// Unmounts the tmpfs at its path when dropped, also when the test fails.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Mounts a 64 MiB tmpfs on `dir` when running as root and allowed to.
fn mount_small_tmpfs(dir: &Path) -> Option<Unmount> {
    let uid = std::process::Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        println!("not root: skipping the disk-full test");
        return None;
    }
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(dir)
        .status()
        .ok()?;
    if !mounted.success() {
        println!("cannot mount a tmpfs: skipping the disk-full test");
        return None;
    }
    Some(Unmount(dir.to_path_buf()))
}

/// Writes `path` until the file system is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_all()) {
            assert_eq!(e.raw_os_error(), Some(28), "filled until ENOSPC: {e}");
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_refuses_publishes_serves_reads_and_recovers_when_space_is_freed() {
    let mount = tempfile::tempdir().unwrap();
    let Some(_unmount) = mount_small_tmpfs(mount.path()) else {
        return;
    };
    let data = mount.path().join("data");
    let opts = options(&data, Durability::Fsync);
    let engine = open(opts.clone()).await;
    let mut acked = BTreeMap::new();
    for i in 1..=10u64 {
        let name = format!("before-{i}");
        let ack = within(engine.publish("t", event(&name))).await.unwrap();
        assert_eq!(ack.offset, i);
        acked.insert(ack.offset, name);
    }

    let filler = mount.path().join("filler");
    fill(&filler);
    let padding = "x".repeat(4096);
    let mut refused = false;
    for i in 0..20_000 {
        let name = format!("full-{i}-{padding}");
        match within(engine.publish("t", event(&name))).await {
            Ok(ack) => {
                assert_eq!(ack.offset, acked.len() as u64 + 1);
                acked.insert(ack.offset, name);
            }
            Err(e) => {
                assert_unavailable::<()>(&Err(e));
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "a full disk refuses publishes");
    println!("disk full after {} acked events", acked.len());
    assert!(matches!(engine.health(), Health::Degraded(_)));
    let r = within(engine.publish("t", event("refused"))).await;
    assert_unavailable(&r);

    // Reads keep working.
    let expected: Vec<(u64, String)> = acked.clone().into_iter().collect();
    assert_eq!(stored(&engine, "t"), expected);
    let mut sub = engine.subscribe("t", vec![], Start::Earliest).unwrap();
    for (offset, name) in &expected {
        let e = next_event(&mut sub).await;
        assert_eq!((&e.offset, &payload(&e)), (offset, name));
    }

    std::fs::remove_file(&filler).unwrap();
    healthy(&engine).await;
    let ack = within(engine.publish("t", event("after"))).await.unwrap();
    assert_eq!(
        ack.offset,
        acked.len() as u64 + 1,
        "no offset consumed by refusals"
    );
    acked.insert(ack.offset, "after".to_string());
    let e = next_event(&mut sub).await;
    assert_eq!(e.offset, ack.offset);
    drop(sub);
    close(engine).await;

    let engine = open(opts).await;
    let expected: Vec<(u64, String)> = acked.into_iter().collect();
    assert_eq!(
        stored(&engine, "t"),
        expected,
        "every acked event after reopen"
    );
    close(engine).await;
}

/// The event files of a data dir (`events/*.rce`) in sequence order, with
/// their lengths.
fn event_files(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut files: Vec<(std::path::PathBuf, u64)> = std::fs::read_dir(dir.join("events"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().extension().is_some_and(|x| x == "rce"))
        // A file the engine removes meanwhile is not counted.
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
        .collect();
    files.sort();
    files
}

/// Sum of the event files' lengths.
fn event_file_bytes(dir: &Path) -> u64 {
    event_files(dir).iter().map(|(_, len)| len).sum()
}

/// `dir`'s event files after `write_big_topic`: where the events are.
fn big_topic_event_files(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let files = event_files(dir);
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    assert!(
        total > DAMAGE_EVENTS * 200,
        "the events' bytes are in the event files ({total} bytes in {files:?})"
    );
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_an_event_file_is_detected_never_a_silent_shorter_history() {
    let original = tempfile::tempdir().unwrap();
    let epoch = write_big_topic(original.path()).await;
    let files = big_topic_event_files(original.path());
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    // Positions across all the files, as if they were one: both ends, and
    // points in between (a record's list header, payloads, offsets).
    for at in [
        0,
        total / 7,
        total * 2 / 5,
        total / 2 + 3,
        total * 4 / 5,
        total - 1,
    ] {
        let (mut index, mut position) = (0, at);
        while position >= files[index].1 {
            position -= files[index].1;
            index += 1;
        }
        let copy = tempfile::tempdir().unwrap();
        copy_dir(original.path(), copy.path());
        let file = copy
            .path()
            .join("events")
            .join(files[index].0.file_name().unwrap());
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[position as usize] ^= 0xff;
        std::fs::write(&file, bytes).unwrap();
        let what = format!(
            "byte {position} of {} ({} of {} files)",
            files[index].1,
            index + 1,
            files.len()
        );
        assert_damage_detected(copy.path(), epoch, &what, AfterDamage::RuleOnly).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_or_removed_event_file_is_detected() {
    let original = tempfile::tempdir().unwrap();
    let epoch = write_big_topic(original.path()).await;
    let files = big_topic_event_files(original.path());
    for (index, (path, len)) in files.iter().enumerate() {
        let name = path.file_name().unwrap();

        let copy = tempfile::tempdir().unwrap();
        copy_dir(original.path(), copy.path());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(copy.path().join("events").join(name))
            .unwrap();
        file.set_len(len / 2).unwrap();
        drop(file);
        let what = format!(
            "event file {} of {} truncated to {} of {len}",
            index + 1,
            files.len(),
            len / 2
        );
        assert_damage_detected(copy.path(), epoch, &what, AfterDamage::RuleOnly).await;

        let copy = tempfile::tempdir().unwrap();
        copy_dir(original.path(), copy.path());
        std::fs::remove_file(copy.path().join("events").join(name)).unwrap();
        let what = format!("event file {} of {} removed", index + 1, files.len());
        assert_damage_detected(copy.path(), epoch, &what, AfterDamage::RuleOnly).await;
    }
}

const MIB: u64 = 1024 * 1024;
/// Payload size of the busy topic's events.
const BUSY_PAYLOAD: usize = 4096;

fn busy_payload(n: u64) -> String {
    format!("{n:0>BUSY_PAYLOAD$}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_files_stay_bounded_with_quiet_topics_among_a_busy_one() {
    // The busy topic keeps 256 events of 4 KiB (~1 MiB) and gets 20 MiB in
    // batches of 32; "quiet" gets one event at the start, "sparse" one
    // every 8 batches (~1 MiB), so without relocation each file would stay
    // pinned by a few bytes.
    const KEEP: u64 = 256;
    const BATCH: u64 = 32;
    const BATCHES: u64 = 20 * MIB / (BATCH * BUSY_PAYLOAD as u64);
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path(), Durability::Fsync);
    opts.topics.overrides.push(ringcast::engine::TopicOverride {
        pattern: "busy".into(),
        max_events: Some(KEEP),
        ..ringcast::engine::TopicOverride::default()
    });
    let engine = open(opts.clone()).await;
    let quiet = within(engine.publish("quiet", event("the only one")))
        .await
        .unwrap();
    assert_eq!(quiet.offset, 1);

    // The bound, from src/engine/files.rs: the roll size is live / 8
    // clamped to 1..=64 MiB, here 1 MiB. Live bytes are the retained events
    // (~4.1 KiB each, encoded) plus at most one partly trimmed busy record
    // (RECORD_MAX, 256 KiB) and the tiny quiet records. Relocation keeps
    // the files holding live records within 1.5 x live + 2 roll sizes
    // (checked before each appending pass, so one more pass and one more
    // file, the active one, may be over); files with nothing live are
    // removed at the next sync. So: 1.5 x live + 4 roll sizes.
    let live = KEEP * (BUSY_PAYLOAD as u64 + 64) + 256 * 1024 + 64 * 1024;
    let bound = live * 3 / 2 + 4 * MIB;
    let mut sparse = Vec::new();
    let mut largest = 0;
    for batch in 0..BATCHES {
        let events = (0..BATCH)
            .map(|i| NewEvent::new("e", busy_payload(batch * BATCH + i + 1).into_bytes()))
            .collect();
        let acks = within(engine.publish_batch("busy", events)).await.unwrap();
        assert_eq!(acks[0].offset, batch * BATCH + 1);
        if batch % 8 == 7 {
            let name = format!("sparse-{batch}");
            let ack = within(engine.publish("sparse", event(&name)))
                .await
                .unwrap();
            sparse.push((ack.offset, name));
        }
        largest = largest.max(event_file_bytes(dir.path()));
    }
    let written = BATCHES * BATCH * BUSY_PAYLOAD as u64;
    // Twice: the trim of the last publish may come in the pass after it,
    // and files left with nothing live go at the sync after that.
    within(engine.sync()).await.unwrap();
    within(engine.sync()).await.unwrap();
    let running = event_file_bytes(dir.path());
    println!(
        "wrote {written} bytes; event files: {running} bytes at the end, {largest} at most \
         while running, in {} files; bound {bound}",
        event_files(dir.path()).len()
    );
    assert!(
        running <= bound,
        "event files take {running} bytes, over the bound {bound}"
    );
    // While running, a pass's dead files wait for the next sync: one more
    // roll size.
    assert!(
        largest <= bound + MIB,
        "event files took {largest} bytes while running, over {}",
        bound + MIB
    );
    let last = BATCHES * BATCH;
    let busy: Vec<(u64, String)> = (last - KEEP + 1..=last)
        .map(|n| (n, busy_payload(n)))
        .collect();
    assert_eq!(stored(&engine, "busy"), busy);
    close(engine).await;
    let closed = event_file_bytes(dir.path());
    assert!(closed <= bound, "{closed} bytes after close, over {bound}");

    let engine = open(opts).await;
    assert!(engine.recovery_report().damaged_topics.is_empty());
    assert_eq!(
        stored(&engine, "quiet"),
        vec![(1, "the only one".to_string())]
    );
    assert_eq!(engine.info("quiet").unwrap().epoch, quiet.epoch);
    assert_eq!(stored(&engine, "sparse"), sparse);
    assert_eq!(stored(&engine, "busy"), busy);
    let ack = within(engine.publish("busy", event("next"))).await.unwrap();
    assert_eq!(ack.offset, last + 1);
    close(engine).await;
    let reopened = event_file_bytes(dir.path());
    assert!(
        reopened <= bound,
        "{reopened} bytes after reopen, over {bound}"
    );
}

/// Interval mode with no flusher tick during the test: only `sync` (and
/// close, and dropping the engine) write sled.
fn interval_without_ticks(dir: &Path) -> EngineOptions {
    let mut opts = options(dir, Durability::Interval);
    opts.flush_interval = Duration::from_secs(3600);
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_mode_keeps_what_sync_acknowledged_across_a_crash_and_a_drop() {
    let dir = tempfile::tempdir().unwrap();
    let opts = interval_without_ticks(dir.path());
    let engine = open(opts.clone()).await;
    let mut acked = Vec::new();
    let publish_some = |engine: Engine, round: u64| async move {
        let mut out = Vec::new();
        for i in 0..300 {
            let name = format!("r{round}-{i}");
            let ack = within(engine.publish("t", event(&name))).await.unwrap();
            out.push((ack.offset, name));
        }
        let events = (0..200).map(|i| event(&format!("r{round}-b{i}"))).collect();
        let acks = within(engine.publish_batch("t", events)).await.unwrap();
        for (i, ack) in acks.iter().enumerate() {
            out.push((ack.offset, format!("r{round}-b{i}")));
        }
        out
    };
    acked.extend(publish_some(engine.clone(), 0).await);
    within(engine.publish("other", event("o"))).await.unwrap();
    acked.extend(publish_some(engine.clone(), 1).await);
    within(engine.sync()).await.unwrap();
    let synced = acked.len();

    // A crash right after the sync: the data dir as it is on disk now.
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), crashed.path());

    acked.extend(publish_some(engine.clone(), 2).await);
    let expected_offsets: Vec<u64> = (1..=acked.len() as u64).collect();
    assert_eq!(
        acked.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        expected_offsets
    );
    // Dropped without a close: the deferred writes still reach sled.
    release(engine).await;

    let engine = open(opts.clone()).await;
    assert!(engine.recovery_report().damaged_topics.is_empty());
    assert_eq!(
        stored(&engine, "t"),
        acked,
        "every acked event after a drop"
    );
    assert_eq!(stored(&engine, "other"), vec![(1, "o".to_string())]);
    let ack = within(engine.publish("t", event("after"))).await.unwrap();
    assert_eq!(ack.offset, acked.len() as u64 + 1);
    close(engine).await;

    let engine = open(interval_without_ticks(crashed.path())).await;
    let report = engine.recovery_report().clone();
    let back = stored(&engine, "t");
    println!(
        "after the crash: {} of {} acked events back ({synced} synced), report {report:?}",
        back.len(),
        acked.len()
    );
    assert!(
        back.len() >= synced,
        "only {} of the {synced} events acknowledged before the sync are back",
        back.len()
    );
    assert_eq!(back[..], acked[..back.len()], "a prefix of what was acked");
    assert_eq!(stored(&engine, "other"), vec![(1, "o".to_string())]);
    assert!(report.damaged_topics.is_empty(), "{report:?}");
    let ack = within(engine.publish("t", event("after"))).await.unwrap();
    assert_eq!(ack.offset, back.len() as u64 + 1);
    close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_mode_keeps_everything_across_a_close_with_many_small_passes() {
    let dir = tempfile::tempdir().unwrap();
    let opts = interval_without_ticks(dir.path());
    let mut expected = Vec::new();
    let mut epoch = 0;
    for run in 0..3u64 {
        let engine = open(opts.clone()).await;
        assert!(engine.recovery_report().damaged_topics.is_empty());
        if run > 0 {
            assert_eq!(stored(&engine, "steady"), expected, "run {run}");
            assert_eq!(
                engine.info("steady").unwrap().epoch,
                epoch,
                "a clean close keeps the epoch"
            );
        }
        // One event per pass: each pass's bytes land right after the
        // previous ones, growing the topic's record.
        for i in 0..1500 {
            let name = format!("run{run}-{i}");
            let ack = within(engine.publish("steady", event(&name)))
                .await
                .unwrap();
            assert_eq!(ack.offset, expected.len() as u64 + 1);
            epoch = ack.epoch;
            expected.push((ack.offset, name));
        }
        assert_eq!(stored(&engine, "steady"), expected);
        close(engine).await;
    }
    // ~30 bytes of event per pass: nothing but the events' bytes is kept.
    let bytes = event_file_bytes(dir.path());
    println!("{} events in {bytes} bytes of event files", expected.len());
    assert!(bytes < expected.len() as u64 * 64, "{bytes} bytes");
    let engine = open(opts).await;
    assert_eq!(stored(&engine, "steady"), expected);
    close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_event_file_fsync_is_never_trusted_again() {
    for durability in [Durability::Fsync, Durability::Interval] {
        let dir = tempfile::tempdir().unwrap();
        let (mut opts, faults) = faulty(dir.path(), durability);
        // The flusher never ticks on its own: `sync` drives it.
        opts.flush_interval = Duration::from_secs(3600);
        let engine = open(opts.clone()).await;
        let mut acked = Vec::new();
        for i in 1..=20u64 {
            let ack = within(engine.publish("t", event(&i.to_string())))
                .await
                .unwrap();
            assert_eq!(ack.offset, i);
            acked.push((i, i.to_string()));
        }
        let before: Vec<_> = event_files(dir.path())
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert!(
            !before.is_empty(),
            "{durability:?}: events are in event files"
        );
        // The next fsync of an event file fails: the pass (fsync) or the
        // sync (interval) is refused, the store degrades and repairs itself.
        faults.fail_nth_file_sync(1);
        match durability {
            Durability::Fsync => {
                let r = within(engine.publish("t", event("lost"))).await;
                assert_unavailable(&r);
            }
            _ => {
                let r = within(engine.sync()).await;
                assert!(r.is_err(), "{durability:?}: a failed fsync fails the sync");
            }
        }
        healthy(&engine).await;
        let ack = within(engine.publish("t", event("21"))).await.unwrap();
        assert_eq!(
            ack.offset, 21,
            "{durability:?}: no offset consumed by the refusal"
        );
        acked.push((21, "21".to_string()));
        within(engine.sync()).await.unwrap();
        // Every record of the poisoned files was written again by the
        // repair, so those files hold nothing live and are gone.
        let after: Vec<_> = event_files(dir.path())
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        for name in &before {
            assert!(
                !after.contains(name),
                "{durability:?}: {} failed its fsync and is still in use ({after:?})",
                name.display()
            );
        }
        close(engine).await;
        let engine = open(opts).await;
        assert_eq!(
            stored(&engine, "t"),
            acked,
            "{durability:?}: every acknowledged event after reopen"
        );
        assert!(engine.recovery_report().damaged_topics.is_empty());
        close(engine).await;
    }
}
