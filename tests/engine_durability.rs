//! Durability of the engine's sled store: what survives `kill -9`, a clean
//! restart, an unclean stop, trimming, deletion and concurrent publishing.
//!
//! Every test opens the engine on its own temporary directory. sled holds an
//! exclusive lock on its database file, so a test reopens a directory only
//! after every handle of the previous engine is dropped; the maintenance
//! thread is given an interval of an hour so that it never holds the engine
//! alive across that drop (tests that need trimming by age drive it with
//! `maintain_at`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::engine::{close, open, options, release};
use ringcast::config::Durability;
use ringcast::engine::{
    Delivery, Engine, EngineError, Event, GapReason, NewEvent, Start, TopicInfo,
};

/// Options on `dir` with retention wide enough that nothing is trimmed.
/// Every retained event of `topic`, in offset order.
fn all_events(engine: &Engine, topic: &str) -> Vec<Event> {
    engine
        .history(topic, 0, &[], usize::MAX)
        .expect("the topic exists")
        .events
        .iter()
        .map(|e| Event::clone(e))
        .collect()
}

fn version_of(info: &TopicInfo, event_type: &str) -> u64 {
    info.versions
        .iter()
        .find(|(t, _)| t == event_type)
        .map_or(0, |(_, v)| *v)
}

// ---------------------------------------------------------------------------
// 1. kill -9 in fsync mode
// ---------------------------------------------------------------------------

/// The test's own name: the child process re-runs exactly this test.
const CRASH_TEST: &str = "crash_safety_kill_9_loses_no_acknowledged_event";
/// Set in the child's environment to the data directory it publishes into.
const CRASH_CHILD_ENV: &str = "RINGCAST_CRASH_CHILD";
const CRASH_TOPICS: [&str; 3] = ["crash.orders", "crash.chat", "crash.tokens"];
const CRASH_TYPES: [&str; 4] = ["created", "updated", "deleted", "token"];
const CRASH_PUBLISHERS: usize = 16;
const CRASH_ROUNDS: usize = 5;

/// One acknowledged event, as the child printed it (or the parent published).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Acked {
    topic: String,
    epoch: u64,
    offset: u64,
    event_type: String,
    version: u64,
    payload: String,
}

impl Acked {
    /// Parses `ack <topic> <epoch> <offset> <type> <version> <payload>`.
    fn parse(line: &str) -> Option<Self> {
        let mut fields = line.strip_prefix("ack ")?.split(' ');
        let acked = Self {
            topic: fields.next()?.to_owned(),
            epoch: fields.next()?.parse().ok()?,
            offset: fields.next()?.parse().ok()?,
            event_type: fields.next()?.to_owned(),
            version: fields.next()?.parse().ok()?,
            payload: fields.next()?.to_owned(),
        };
        fields.next().is_none().then_some(acked)
    }
}

#[test]
fn crash_safety_kill_9_loses_no_acknowledged_event() {
    if let Some(dir) = std::env::var_os(CRASH_CHILD_ENV) {
        publish_until_killed(Path::new(&dir));
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    // Everything acknowledged so far, by topic and offset, over all rounds.
    let mut acked: BTreeMap<(String, u64), Acked> = BTreeMap::new();
    let mut epochs: HashMap<String, u64> = HashMap::new();
    for round in 1..=CRASH_ROUNDS {
        let kill_after = rand::random_range(50..2000);
        let acks = run_child_until_killed(dir.path(), kill_after);
        eprintln!(
            "round {round}: killed after {kill_after} acks, {} printed in all",
            acks.len()
        );
        for ack in acks {
            let epoch = *epochs.entry(ack.topic.clone()).or_insert(ack.epoch);
            assert_eq!(
                ack.epoch, epoch,
                "round {round}: the epoch of {} changed under fsync: {ack:?}",
                ack.topic
            );
            let key = (ack.topic.clone(), ack.offset);
            if let Some(earlier) = acked.insert(key, ack.clone()) {
                panic!("round {round}: offset acknowledged twice: {earlier:?} then {ack:?}");
            }
        }
        runtime.block_on(check_recovery(dir.path(), round, &mut acked, &epochs));
    }
}

/// Spawns this test binary as the publishing child, reads its acks, kills it
/// with SIGKILL after `kill_after` of them and returns every ack it printed,
/// including those that were still in the pipe when it died.
fn run_child_until_killed(dir: &Path, kill_after: usize) -> Vec<Acked> {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = Command::new(exe)
        .args([CRASH_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD_ENV, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the child starts");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut acks = Vec::new();
    let mut killed = false;
    let mut line = String::new();
    loop {
        line.clear();
        let read = stdout
            .read_line(&mut line)
            .expect("the child's stdout reads");
        // A line cut short by the kill was never a complete ack print; pipe
        // writes this small are atomic, so this is only a safety net.
        if read == 0 || !line.ends_with('\n') {
            break;
        }
        if !line.starts_with("ack ") {
            continue; // the test harness's own lines
        }
        acks.push(
            Acked::parse(line.trim_end())
                .unwrap_or_else(|| panic!("a well-formed ack line: {line:?}")),
        );
        if !killed && acks.len() == kill_after {
            child.kill().expect("SIGKILL is delivered");
            killed = true;
        }
    }
    let status = child.wait().expect("the child is reaped");
    let stderr = stderr.join().expect("the stderr reader does not panic");
    assert!(
        killed,
        "the child stopped after {} acks, before the kill at {kill_after}: {status}\n{stderr}",
        acks.len()
    );
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "the child died of SIGKILL: {status}\n{stderr}"
        );
    }
    acks
}

/// The child: publishes from many tasks until it is killed, printing one
/// line per acknowledged event. Never returns.
fn publish_until_killed(dir: &Path) -> ! {
    // A watchdog, not synchronisation: never outlive a parent that failed
    // to kill us.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(120));
        std::process::exit(3);
    });
    let engine = Engine::open(options(dir, Durability::Fsync)).expect("the child opens the engine");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let mut publishers = tokio::task::JoinSet::new();
        for publisher in 0..CRASH_PUBLISHERS {
            publishers.spawn(publish_forever(engine.clone(), publisher));
        }
        while let Some(result) = publishers.join_next().await {
            result.expect("a publisher does not panic");
        }
    });
    unreachable!("publishers never finish")
}

async fn publish_forever(engine: Engine, publisher: usize) {
    for seq in 0u64.. {
        let topic = CRASH_TOPICS[rand::random_range(0..CRASH_TOPICS.len())];
        // One publish in four is a batch of 2 to 5 events.
        let count = if rand::random_range(0..4) == 0 {
            rand::random_range(2..=5)
        } else {
            1
        };
        let events: Vec<NewEvent> = (0..count)
            .map(|i| {
                let event_type = CRASH_TYPES[rand::random_range(0..CRASH_TYPES.len())];
                NewEvent::new(event_type, format!("p{publisher}.{seq}.{i}"))
                    .header("publisher", publisher.to_string())
            })
            .collect();
        let acks = engine
            .publish_batch(topic, events.clone())
            .await
            .expect("an fsync publish is acknowledged");
        let mut lines = String::new();
        for (ack, event) in acks.iter().zip(&events) {
            lines.push_str(&format!(
                "ack {topic} {} {} {} {} {}\n",
                ack.epoch,
                ack.offset,
                event.event_type,
                ack.version,
                String::from_utf8_lossy(&event.payload)
            ));
        }
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(lines.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // The parent is gone.
            std::process::exit(0);
        }
    }
}

/// Reopens the store the killed child left behind and checks it against
/// every ack: nothing acknowledged is lost or changed, offsets and versions
/// are contiguous and continue past every ack, epochs are stable. Publishes
/// one event per type and topic (recorded as acked), then closes.
async fn check_recovery(
    dir: &Path,
    round: usize,
    acked: &mut BTreeMap<(String, u64), Acked>,
    epochs: &HashMap<String, u64>,
) {
    let engine = open(options(dir, Durability::Fsync)).await;
    for topic in CRASH_TOPICS {
        let of_topic: Vec<Acked> = acked
            .range((topic.to_owned(), 0)..=(topic.to_owned(), u64::MAX))
            .map(|(_, a)| a.clone())
            .collect();
        let info = match engine.info(topic) {
            Ok(info) => info,
            Err(EngineError::TopicNotFound(_)) => {
                assert!(
                    of_topic.is_empty(),
                    "round {round}: {topic} is gone but had {} acks",
                    of_topic.len()
                );
                continue;
            }
            Err(e) => panic!("round {round}: info of {topic} fails: {e}"),
        };
        let history = engine
            .history(topic, 0, &[], usize::MAX)
            .expect("the topic exists");
        if let Some(epoch) = epochs.get(topic) {
            assert_eq!(
                history.epoch, *epoch,
                "round {round}: {topic} keeps its epoch"
            );
        }

        // Offsets are contiguous from 1 up to the last offset.
        assert_eq!(history.first_available, 1, "round {round}: {topic}");
        let offsets: Vec<u64> = history.events.iter().map(|e| e.offset).collect();
        let expected: Vec<u64> = (1..=history.last_offset).collect();
        assert_eq!(
            offsets, expected,
            "round {round}: offsets of {topic} are 1..=last"
        );

        // Versions per type are contiguous from 1 in offset order, and the
        // recovered counters agree with the events.
        let mut versions: BTreeMap<String, u64> = BTreeMap::new();
        for e in &history.events {
            let v = versions.entry(e.event_type.to_string()).or_insert(0);
            *v += 1;
            assert_eq!(
                e.version, *v,
                "round {round}: {topic} offset {} is version {} of {}",
                e.offset, *v, e.event_type
            );
        }
        assert_eq!(
            info.versions,
            versions.into_iter().collect::<Vec<_>>(),
            "round {round}: recovered versions of {topic}"
        );

        // Every acknowledged event is there, unchanged.
        for ack in &of_topic {
            let event = usize::try_from(ack.offset - 1)
                .ok()
                .and_then(|i| history.events.get(i))
                .unwrap_or_else(|| panic!("round {round}: acknowledged event lost: {ack:?}"));
            assert_eq!(ack.epoch, history.epoch, "round {round}: {ack:?}");
            assert_eq!(
                (&*event.event_type, event.version, &event.payload[..]),
                (ack.event_type.as_str(), ack.version, ack.payload.as_bytes()),
                "round {round}: acknowledged event changed: {ack:?}"
            );
        }

        // The next publishes continue past every ack.
        let last_acked_offset = of_topic.iter().map(|a| a.offset).max().unwrap_or(0);
        for event_type in CRASH_TYPES {
            let last_acked_version = of_topic
                .iter()
                .filter(|a| a.event_type == event_type)
                .map(|a| a.version)
                .max()
                .unwrap_or(0);
            let payload = format!("parent.{round}.{event_type}");
            let ack = engine
                .publish(topic, NewEvent::new(event_type, payload.clone()))
                .await
                .expect("the recovered engine accepts publishes");
            assert!(
                ack.offset > last_acked_offset,
                "round {round}: {topic} reuses offset {} (acked up to {last_acked_offset})",
                ack.offset
            );
            assert!(
                ack.version > last_acked_version,
                "round {round}: {topic}/{event_type} reuses version {} (acked up to {last_acked_version})",
                ack.version
            );
            assert_eq!(ack.epoch, history.epoch, "round {round}: {topic}");
            let previous = acked.insert(
                (topic.to_owned(), ack.offset),
                Acked {
                    topic: topic.to_owned(),
                    epoch: ack.epoch,
                    offset: ack.offset,
                    event_type: event_type.to_owned(),
                    version: ack.version,
                    payload,
                },
            );
            assert_eq!(previous, None, "round {round}: offset reused");
        }
    }
    close(engine).await;
}

// ---------------------------------------------------------------------------
// 2. Clean restart
// ---------------------------------------------------------------------------

/// Info and full history of every topic.
fn snapshot(engine: &Engine) -> Vec<(TopicInfo, u64, Vec<Event>)> {
    engine
        .topics()
        .into_iter()
        .map(|t| {
            let info = engine.info(&t.name).expect("a listed topic exists");
            let history = engine
                .history(&t.name, 0, &[], usize::MAX)
                .expect("a listed topic exists");
            let events = history.events.iter().map(|e| Event::clone(e)).collect();
            (info, history.epoch, events)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_rebuilds_rings_offsets_versions_and_epochs_exactly() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let engine = open(options(dir.path(), Durability::Fsync)).await;

    for i in 0..5 {
        let event = NewEvent::new("order.created", format!(r#"{{"id":{i}}}"#))
            .header("correlation-id", format!("c-{i}"))
            .header("user-id", "u-42");
        engine.publish("orders", event).await.expect("published");
        if i % 2 == 0 {
            let paid = NewEvent::new("order.paid", format!(r#"{{"id":{i},"paid":true}}"#))
                .header("causation-id", format!("c-{i}"));
            engine.publish("orders", paid).await.expect("published");
        }
    }
    let batch = vec![
        NewEvent::new("order.shipped", "{}"),
        NewEvent::new("order.created", r#"{"id":99}"#).header("", "x"),
    ];
    assert!(
        matches!(
            engine.publish_batch("orders", batch).await,
            Err(EngineError::InvalidHeaders(_))
        ),
        "a batch with an invalid event is refused as a whole"
    );
    engine
        .publish_batch(
            "orders",
            vec![
                NewEvent::new("order.shipped", "{}"),
                NewEvent::new("order.created", r#"{"id":99}"#),
            ],
        )
        .await
        .expect("published");

    // Binary payloads: empty, every byte value, and large ones whose batch
    // the store splits over several records.
    let every_byte: Vec<u8> = (0..=255u8).collect();
    engine
        .publish("blobs", NewEvent::new("empty", Vec::<u8>::new()))
        .await
        .expect("published");
    engine
        .publish("blobs", NewEvent::new("bytes", every_byte.clone()))
        .await
        .expect("published");
    let large: Vec<NewEvent> = (0..5u8)
        .map(|i| {
            let payload: Vec<u8> = (0..120 * 1024).map(|_| rand::random::<u8>() ^ i).collect();
            NewEvent::new("large", payload).header("part", i.to_string())
        })
        .collect();
    engine
        .publish_batch("blobs", large)
        .await
        .expect("published");
    engine
        .publish(
            "blobs",
            NewEvent::new("empty", Vec::<u8>::new()).header("k", ""),
        )
        .await
        .expect("published");

    for token in ["Hel", "lo", ", ", "world"] {
        engine
            .publish("stream.answer-1", NewEvent::new("token", token))
            .await
            .expect("published");
    }
    engine.seal("stream.answer-1").await.expect("sealed");

    engine.create("empty-topic").expect("created");

    let before = snapshot(&engine);
    assert_eq!(before.len(), 4, "four topics: {before:?}");
    let retained: u64 = before.iter().map(|(info, _, _)| info.retained_events).sum();
    close(engine).await;

    let engine = open(options(dir.path(), Durability::Fsync)).await;
    let after = snapshot(&engine);
    assert_eq!(after.len(), before.len());
    for ((info_b, epoch_b, events_b), (info_a, epoch_a, events_a)) in before.iter().zip(&after) {
        assert_eq!(
            info_a, info_b,
            "info of {} survives the restart",
            info_b.name
        );
        assert_eq!(epoch_a, epoch_b, "epoch of {}", info_b.name);
        assert_eq!(events_a.len(), events_b.len(), "events of {}", info_b.name);
        for (a, b) in events_a.iter().zip(events_b) {
            assert_eq!(
                a, b,
                "event {} of {} survives the restart",
                b.offset, info_b.name
            );
        }
    }
    assert_eq!(engine.recovered_events(), retained);

    // The sealed topic is still sealed: replay ends, publishes are refused.
    let mut sub = engine
        .subscribe("stream.answer-1", vec![], Start::Earliest)
        .expect("subscribed");
    let mut tokens = String::new();
    loop {
        match sub.recv().await.expect("a delivery") {
            Delivery::Event(e) => tokens.push_str(std::str::from_utf8(&e.payload).unwrap()),
            Delivery::End { last_offset } => {
                assert_eq!(last_offset, 4);
                break;
            }
            other => panic!("unexpected delivery {other:?}"),
        }
    }
    assert_eq!(tokens, "Hello, world");
    assert!(matches!(
        engine
            .publish("stream.answer-1", NewEvent::new("token", "!"))
            .await,
        Err(EngineError::TopicSealed(_))
    ));
    drop(sub);
    close(engine).await;
}

// ---------------------------------------------------------------------------
// 3. Counters survive trimming
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_and_offsets_never_go_back_after_trimming_and_restart() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut opts = options(dir.path(), Durability::Fsync);
    opts.topics.max_events = 3;

    let engine = open(opts.clone()).await;
    for i in 0..10 {
        engine
            .publish("t", NewEvent::new("a", format!("a{i}")))
            .await
            .expect("published");
    }
    for i in 0..5 {
        engine
            .publish("t", NewEvent::new("b", format!("b{i}")))
            .await
            .expect("published");
    }
    close(engine).await;

    let engine = open(opts.clone()).await;
    let info = engine.info("t").expect("the topic survives");
    assert_eq!(
        info.versions,
        vec![("a".to_owned(), 10), ("b".to_owned(), 5)],
        "the version of a survives although every a event was trimmed"
    );
    assert_eq!((info.first_offset, info.last_offset), (13, 15));
    assert_eq!(info.retained_events, 3);
    let types: Vec<(u64, String)> = all_events(&engine, "t")
        .iter()
        .map(|e| (e.offset, e.event_type.to_string()))
        .collect();
    assert_eq!(
        types,
        vec![(13, "b".into()), (14, "b".into()), (15, "b".into())]
    );
    let ack = engine
        .publish("t", NewEvent::new("a", "a10"))
        .await
        .expect("published");
    assert_eq!((ack.offset, ack.version), (16, 11));
    close(engine).await;

    // And once more, so the counters advanced after a restart persist too.
    let engine = open(opts).await;
    let info = engine.info("t").expect("the topic survives");
    assert_eq!(
        info.versions,
        vec![("a".to_owned(), 11), ("b".to_owned(), 5)]
    );
    assert_eq!((info.first_offset, info.last_offset), (14, 16));
    close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_age_trimming_of_every_event_and_restart() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut opts = options(dir.path(), Durability::Fsync);
    let max_age = Duration::from_secs(3600);
    opts.topics.max_age = max_age;

    let engine = open(opts.clone()).await;
    for i in 0..5 {
        engine
            .publish("aged", NewEvent::new("a", format!("a{i}")))
            .await
            .expect("published");
    }
    for i in 0..2 {
        engine
            .publish("aged", NewEvent::new("b", format!("b{i}")))
            .await
            .expect("published");
    }
    let epoch = engine.info("aged").expect("exists").epoch;
    engine.maintain_at(SystemTime::now() + 2 * max_age);
    let info = engine.info("aged").expect("a trimmed topic is not removed");
    assert_eq!(info.retained_events, 0, "every event is older than max_age");
    assert_eq!((info.first_offset, info.last_offset), (8, 7));
    close(engine).await;

    let engine = open(opts).await;
    let info = engine.info("aged").expect("the topic survives");
    assert_eq!(info.epoch, epoch);
    assert_eq!(info.retained_events, 0, "trimmed events stay trimmed");
    assert_eq!(info.retained_bytes, 0);
    assert_eq!((info.first_offset, info.last_offset), (8, 7));
    assert_eq!(
        info.versions,
        vec![("a".to_owned(), 5), ("b".to_owned(), 2)]
    );
    assert!(all_events(&engine, "aged").is_empty());
    let ack = engine
        .publish("aged", NewEvent::new("a", "a5"))
        .await
        .expect("published");
    assert_eq!((ack.epoch, ack.offset, ack.version), (epoch, 8, 6));
    close(engine).await;
}

// ---------------------------------------------------------------------------
// 4. Epochs after clean and unclean stops
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_mode_unclean_stop_rotates_the_epoch() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let opts = options(dir.path(), Durability::Interval);

    let engine = open(opts.clone()).await;
    for i in 0..4 {
        let event_type = if i % 2 == 0 { "even" } else { "odd" };
        engine
            .publish("feed", NewEvent::new(event_type, format!("e{i}")))
            .await
            .expect("published");
    }
    let old = engine.info("feed").expect("exists");
    // Dropped without close: the store flushes what it has but the run is
    // not marked clean, so acknowledged-but-unflushed events may be lost.
    release(engine).await;

    let engine = open(opts).await;
    let new = engine.info("feed").expect("the topic survives");
    assert_ne!(
        new.epoch, old.epoch,
        "an unclean interval stop rotates the epoch"
    );
    assert!(
        new.last_offset >= old.last_offset,
        "offsets do not go back: {} then {}",
        old.last_offset,
        new.last_offset
    );
    assert!(
        new.versions.iter().all(|(t, v)| *v >= version_of(&old, t)),
        "versions do not go back: {:?} then {:?}",
        old.versions,
        new.versions
    );

    // A subscriber resuming in the old epoch is told so, then goes live.
    let mut by_offset = engine
        .subscribe(
            "feed",
            vec![],
            Start::AfterOffset {
                epoch: old.epoch,
                offset: old.last_offset,
            },
        )
        .expect("subscribed");
    let mut by_versions = engine
        .subscribe(
            "feed",
            vec![],
            Start::AfterVersions {
                epoch: old.epoch,
                versions: old.versions.clone(),
            },
        )
        .expect("subscribed");
    for sub in [&mut by_offset, &mut by_versions] {
        match sub.recv().await {
            Some(Delivery::Gap(gap)) => {
                assert_eq!(gap.reason, GapReason::EpochChanged);
                assert_eq!(gap.epoch, new.epoch);
                assert_eq!(gap.current, new.last_offset);
            }
            other => panic!("expected an epoch_changed gap, got {other:?}"),
        }
    }
    let ack = engine
        .publish("feed", NewEvent::new("even", "live"))
        .await
        .expect("published");
    assert_eq!(ack.epoch, new.epoch);
    assert_eq!(ack.offset, new.last_offset + 1);
    for sub in [&mut by_offset, &mut by_versions] {
        match sub.recv().await {
            Some(Delivery::Event(e)) => assert_eq!(e.offset, ack.offset),
            other => panic!("expected the live event, got {other:?}"),
        }
    }
    drop((by_offset, by_versions));
    close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_mode_clean_close_keeps_the_epoch() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let opts = options(dir.path(), Durability::Interval);

    let engine = open(opts.clone()).await;
    for i in 0..3 {
        engine
            .publish("feed", NewEvent::new("e", format!("e{i}")))
            .await
            .expect("published");
    }
    let before = engine.info("feed").expect("exists");
    close(engine).await;

    let engine = open(opts).await;
    let after = engine.info("feed").expect("the topic survives");
    assert_eq!(
        after, before,
        "a clean close keeps epoch, offsets and versions"
    );
    let mut sub = engine
        .subscribe(
            "feed",
            vec![],
            Start::AfterOffset {
                epoch: before.epoch,
                offset: 1,
            },
        )
        .expect("subscribed");
    for offset in 2..=3 {
        match sub.recv().await {
            Some(Delivery::Event(e)) => assert_eq!(e.offset, offset),
            other => panic!("expected replay of offset {offset}, got {other:?}"),
        }
    }
    drop(sub);
    close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_mode_unclean_stop_keeps_the_epoch() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let opts = options(dir.path(), Durability::Fsync);

    let engine = open(opts.clone()).await;
    for i in 0..3 {
        engine
            .publish("feed", NewEvent::new("e", format!("e{i}")))
            .await
            .expect("published");
    }
    let before = engine.info("feed").expect("exists");
    release(engine).await;

    let engine = open(opts).await;
    let after = engine.info("feed").expect("the topic survives");
    assert_eq!(
        after, before,
        "fsync acks are durable, so an unclean stop keeps the epoch"
    );
    close(engine).await;
}

// ---------------------------------------------------------------------------
// 5. Delete and re-create
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_then_recreate_gives_a_new_epoch_and_survives_restart() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let opts = options(dir.path(), Durability::Fsync);

    let engine = open(opts.clone()).await;
    let mut old_epoch = 0;
    for i in 0..5 {
        let ack = engine
            .publish(
                "room",
                NewEvent::new(if i < 3 { "msg" } else { "join" }, "old"),
            )
            .await
            .expect("published");
        old_epoch = ack.epoch;
    }
    engine.delete("room").await.expect("deleted");
    assert!(matches!(
        engine.info("room"),
        Err(EngineError::TopicNotFound(_))
    ));
    let ack = engine
        .publish("room", NewEvent::new("msg", "new"))
        .await
        .expect("published");
    assert_ne!(ack.epoch, old_epoch, "a re-created topic gets a new epoch");
    assert_eq!((ack.offset, ack.version), (1, 1));
    let new_epoch = ack.epoch;
    close(engine).await;

    let engine = open(opts).await;
    let info = engine.info("room").expect("the re-created topic survives");
    assert_eq!(info.epoch, new_epoch);
    assert_eq!((info.first_offset, info.last_offset), (1, 1));
    assert_eq!(info.versions, vec![("msg".to_owned(), 1)]);
    let events = all_events(&engine, "room");
    assert_eq!(events.len(), 1, "only the new history exists: {events:?}");
    assert_eq!(&events[0].payload[..], b"new");
    assert_eq!(engine.recovered_events(), 1);
    let ack = engine
        .publish("room", NewEvent::new("join", "new"))
        .await
        .expect("published");
    assert_eq!((ack.epoch, ack.offset, ack.version), (new_epoch, 2, 1));
    close(engine).await;
}

// ---------------------------------------------------------------------------
// 6. Group commit
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_acknowledges_concurrent_publishes() {
    const PUBLISHERS: usize = 64;
    const EACH: usize = 50;
    let dir = tempfile::tempdir().expect("a temp dir");
    let engine = open(options(dir.path(), Durability::Fsync)).await;

    let mut publishers = tokio::task::JoinSet::new();
    for publisher in 0..PUBLISHERS {
        let engine = engine.clone();
        publishers.spawn(async move {
            let event_type = format!("type{}", publisher % 4);
            let mut acks = Vec::with_capacity(EACH);
            for i in 0..EACH {
                let ack = engine
                    .publish(
                        "busy",
                        NewEvent::new(event_type.clone(), format!("{publisher}.{i}")),
                    )
                    .await
                    .expect("an fsync publish is acknowledged");
                acks.push((ack, event_type.clone(), format!("{publisher}.{i}")));
            }
            acks
        });
    }
    let mut acks = Vec::with_capacity(PUBLISHERS * EACH);
    while let Some(result) = publishers.join_next().await {
        let mine = result.expect("a publisher does not panic");
        assert!(
            mine.windows(2).all(|w| w[0].0.offset < w[1].0.offset),
            "one publisher's sequential publishes get increasing offsets"
        );
        acks.extend(mine);
    }
    acks.sort_by_key(|(ack, _, _)| ack.offset);

    let epoch = acks[0].0.epoch;
    assert!(acks.iter().all(|(ack, _, _)| ack.epoch == epoch));
    let offsets: Vec<u64> = acks.iter().map(|(ack, _, _)| ack.offset).collect();
    let expected: Vec<u64> = (1..=(PUBLISHERS * EACH) as u64).collect();
    assert_eq!(offsets, expected, "offsets are unique and contiguous");
    let mut versions: HashMap<&str, u64> = HashMap::new();
    for (ack, event_type, _) in &acks {
        let v = versions.entry(event_type).or_insert(0);
        *v += 1;
        assert_eq!(
            ack.version, *v,
            "versions of {event_type} are contiguous in offset order"
        );
    }

    // What was acknowledged is what the ring holds.
    let events = all_events(&engine, "busy");
    assert_eq!(events.len(), acks.len());
    for (event, (ack, event_type, payload)) in events.iter().zip(&acks) {
        assert_eq!(
            (
                event.offset,
                event.version,
                &*event.event_type,
                &event.payload[..]
            ),
            (
                ack.offset,
                ack.version,
                event_type.as_str(),
                payload.as_bytes()
            )
        );
    }
    let info = engine.info("busy").expect("exists");
    assert_eq!(info.last_offset, (PUBLISHERS * EACH) as u64);
    close(engine).await;
}

// ---------------------------------------------------------------------------
// Close is final
// ---------------------------------------------------------------------------

/// `Engine::close` marks the run clean, so an event acknowledged after it
/// (in interval mode: acknowledged before any fsync, the flusher already
/// stopped) could be lost by a crash without the epoch rotating on restart —
/// a silent hole. Its doc promises such publishes fail with `ShuttingDown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn publishing_after_close_is_refused_with_shutting_down() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let engine = open(options(dir.path(), Durability::Interval)).await;
    engine
        .publish("feed", NewEvent::new("e", "before"))
        .await
        .expect("published");
    engine.close().await.expect("the engine closes cleanly");

    let after = engine.publish("feed", NewEvent::new("e", "after")).await;
    release(engine).await;
    assert!(
        matches!(after, Err(EngineError::ShuttingDown)),
        "a publish after close is refused, got {after:?}"
    );
}
