//! Consumer-group semantics (issue 10), asserted through the engine API:
//! work distribution, redelivery after `ack_wait`, backoff, `max_deliver`,
//! dead letters and redrive, `max_ack_pending`, retention gaps and
//! `retain_until_acked`, persistence across restarts and crashes, and
//! settles racing fetches. Time-driven cases run on tokio's paused clock
//! and check state with zero-wait fetches at chosen instants.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ringcast::config::Durability;
use ringcast::engine::{
    Delivery, Engine, EngineError, EngineOptions, Fetched, GapReason, GroupConfig, GroupStart,
    NewEvent, Settle, Settled, Start, DLQ_ATTEMPTS, DLQ_EPOCH, DLQ_GROUP, DLQ_OFFSET, DLQ_REASON,
    DLQ_TOPIC,
};

const TOPIC: &str = "jobs";
const GROUP: &str = "workers";

fn memory(configure: impl FnOnce(&mut EngineOptions)) -> Engine {
    let mut options = EngineOptions::memory();
    configure(&mut options);
    Engine::open(options).expect("open memory engine")
}

fn config(ack_wait: Duration, max_deliver: u32, backoff: &[u64]) -> GroupConfig {
    GroupConfig {
        ack_wait,
        max_deliver,
        backoff: backoff
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect(),
        ..GroupConfig::default()
    }
}

fn job(i: u64) -> NewEvent {
    let mut e = NewEvent::new("job", Bytes::from(format!("job-{i}")));
    e.headers.push(("trace".to_owned(), format!("t{i}")));
    e
}

async fn publish_n(engine: &Engine, n: u64) -> Vec<u64> {
    let mut offsets = Vec::with_capacity(n as usize);
    for i in 0..n {
        offsets.push(engine.publish(TOPIC, job(i)).await.unwrap().offset);
    }
    offsets
}

/// A zero-wait fetch: what the group hands `consumer` right now.
async fn fetch_now(engine: &Engine, consumer: &str, max: usize) -> Fetched {
    engine
        .fetch(TOPIC, GROUP, consumer, max, Duration::ZERO, 0)
        .await
        .unwrap()
}

fn offsets_of(f: &Fetched) -> Vec<u64> {
    f.deliveries.iter().map(|d| d.event.offset).collect()
}

fn attempts_of(f: &Fetched) -> Vec<u32> {
    f.deliveries.iter().map(|d| d.attempt).collect()
}

async fn settle(engine: &Engine, offsets: &[u64], how: Settle) -> Settled {
    engine.settle(TOPIC, GROUP, offsets, how).await.unwrap()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The next event of a subscription, awaited (a hang fails the test).
async fn next_event(sub: &mut ringcast::engine::Subscription) -> Arc<ringcast::engine::Event> {
    loop {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.recv())
            .await
            .expect("no event in time")
            .expect("the subscription ended");
        if let Delivery::Event(e) = d {
            return e;
        }
    }
}

// ---- distribution --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn three_members_ack_ten_thousand_events_each_exactly_once_never_two_holding_one() {
    const N: u64 = 10_000;
    let engine = memory(|_| {});
    engine
        .create_group(TOPIC, GROUP, GroupConfig::default(), false)
        .await
        .unwrap();
    let held: Arc<Mutex<HashMap<u64, usize>>> = Arc::default();
    let acked: Arc<Mutex<HashMap<u64, usize>>> = Arc::default();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);

    let mut members = Vec::new();
    for id in 0..3usize {
        let member = engine
            .join_group(TOPIC, GROUP, &format!("w{id}"), 16, None)
            .await
            .unwrap();
        let (engine, held, acked, done_tx, mut done_rx) = (
            engine.clone(),
            held.clone(),
            acked.clone(),
            done_tx.clone(),
            done_rx.clone(),
        );
        members.push(tokio::spawn(async move {
            let mut mine = 0u64;
            loop {
                let fetched = tokio::select! {
                    f = member.next(8) => f.unwrap(),
                    _ = done_rx.wait_for(|d| *d) => break,
                };
                assert!(fetched.gaps.is_empty());
                let offsets = offsets_of(&fetched);
                {
                    let mut held = held.lock().unwrap();
                    for (o, d) in offsets.iter().zip(&fetched.deliveries) {
                        assert_eq!(d.attempt, 1, "offset {o} was redelivered");
                        if let Some(other) = held.insert(*o, id) {
                            panic!(
                                "offset {o} handed to member {id} while member {other} holds it"
                            );
                        }
                    }
                }
                // Work, then let go before the ack: from here on another
                // member may legitimately get it.
                tokio::task::yield_now().await;
                {
                    let mut held = held.lock().unwrap();
                    for o in &offsets {
                        assert_eq!(held.remove(o), Some(id));
                    }
                }
                let s = settle(&engine, &offsets, Settle::Ack).await;
                assert_eq!(s.applied, offsets.len() as u64);
                mine += offsets.len() as u64;
                let total = {
                    let mut acked = acked.lock().unwrap();
                    for o in &offsets {
                        *acked.entry(*o).or_default() += 1;
                    }
                    acked.len() as u64
                };
                if total == N {
                    done_tx.send_replace(true);
                }
            }
            member.leave();
            mine
        }));
    }
    let publisher = {
        let engine = engine.clone();
        tokio::spawn(async move {
            for chunk in 0..(N / 100) {
                let batch = (0..100).map(|i| job(chunk * 100 + i)).collect();
                engine.publish_batch(TOPIC, batch).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    publisher.await.unwrap();
    let mut per_member = Vec::new();
    for m in members {
        per_member.push(
            tokio::time::timeout(Duration::from_secs(60), m)
                .await
                .expect("the members finish")
                .unwrap(),
        );
    }

    let acked = acked.lock().unwrap();
    assert_eq!(acked.len() as u64, N);
    assert!((1..=N).all(|o| acked.get(&o) == Some(&1)), "each once");
    assert_eq!(per_member.iter().sum::<u64>(), N);
    assert!(
        per_member.iter().all(|&n| n > 0),
        "spread over the members: {per_member:?}"
    );
    let info = engine.group_info(TOPIC, GROUP).unwrap();
    assert_eq!((info.acked, info.delivered, info.redelivered), (N, N, 0));
    assert_eq!((info.pending, info.ack_floor, info.lag), (0, N, 0));
}

// ---- redelivery, backoff, max_deliver ---------------------------------------

#[tokio::test(start_paused = true)]
async fn a_dropped_member_s_events_go_to_the_others_after_ack_wait_then_dead_letter() {
    let engine = memory(|_| {});
    let cfg = config(Duration::from_secs(5), 2, &[]);
    engine.create_group(TOPIC, GROUP, cfg, false).await.unwrap();
    publish_n(&engine, 10).await;

    let a = engine.join_group(TOPIC, GROUP, "a", 0, None).await.unwrap();
    let taken = a.next(100).await.unwrap();
    assert_eq!(offsets_of(&taken), (1..=10).collect::<Vec<_>>());
    drop(a); // a disconnect: the events wait for their deadline

    tokio::time::advance(Duration::from_millis(4_999)).await;
    assert!(fetch_now(&engine, "b", 100).await.is_empty());
    let info = engine.group_info(TOPIC, GROUP).unwrap();
    assert_eq!((info.pending, info.in_flight), (10, 10));

    tokio::time::advance(Duration::from_millis(1)).await;
    let again = fetch_now(&engine, "b", 100).await;
    assert_eq!(offsets_of(&again), (1..=10).collect::<Vec<_>>());
    assert_eq!(attempts_of(&again), vec![2; 10]);
    assert_eq!(engine.group_info(TOPIC, GROUP).unwrap().redelivered, 10);

    // b acks half and walks away from the rest: their second (last)
    // attempt expires and they are dead-lettered as `max_deliver`.
    engine.create(&format!("{TOPIC}.dlq")).unwrap();
    let mut dlq = engine
        .subscribe(&format!("{TOPIC}.dlq"), Vec::new(), Start::Earliest)
        .unwrap();
    settle(&engine, &[1, 2, 3, 4, 5], Settle::Ack).await;
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(fetch_now(&engine, "c", 100).await.is_empty());
    let mut dead = Vec::new();
    for _ in 0..5 {
        let e = next_event(&mut dlq).await;
        assert_eq!(header(&e.headers, DLQ_REASON), Some("max_deliver"));
        assert_eq!(header(&e.headers, DLQ_ATTEMPTS), Some("2"));
        dead.push(
            header(&e.headers, DLQ_OFFSET)
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    dead.sort_unstable();
    assert_eq!(dead, vec![6, 7, 8, 9, 10]);
    let info = engine.group_info(TOPIC, GROUP).unwrap();
    assert_eq!((info.acked, info.dead_lettered, info.pending), (5, 5, 0));
    assert_eq!(info.ack_floor, 10);
}

#[tokio::test(start_paused = true)]
async fn redeliveries_wait_for_their_backoff_and_max_deliver_ends_in_the_dead_letters() {
    let engine = memory(|_| {});
    let cfg = config(Duration::from_secs(1), 3, &[2_000, 5_000]);
    engine.create_group(TOPIC, GROUP, cfg, false).await.unwrap();
    publish_n(&engine, 1).await;

    let first = fetch_now(&engine, "w", 10).await;
    assert_eq!(attempts_of(&first), vec![1]);
    // A nack without a delay waits backoff[0] = 2 s.
    let s = settle(&engine, &[1], Settle::Nack(None)).await;
    assert_eq!(s.applied, 1);
    tokio::time::advance(Duration::from_millis(1_999)).await;
    assert!(fetch_now(&engine, "w", 10).await.is_empty());
    tokio::time::advance(Duration::from_millis(1)).await;
    let second = fetch_now(&engine, "w", 10).await;
    assert_eq!(attempts_of(&second), vec![2]);

    // Attempt 2 expires after ack_wait; then backoff[1] = 5 s.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(fetch_now(&engine, "w", 10).await.is_empty());
    tokio::time::advance(Duration::from_millis(4_999)).await;
    assert!(fetch_now(&engine, "w", 10).await.is_empty());
    tokio::time::advance(Duration::from_millis(1)).await;
    let third = fetch_now(&engine, "w", 10).await;
    assert_eq!(attempts_of(&third), vec![3]);

    let info = engine.group_info(TOPIC, GROUP).unwrap();
    assert_eq!(info.pending_sample[0].attempt, 3);
    engine.create(&format!("{TOPIC}.dlq")).unwrap();
    let mut dlq = engine
        .subscribe(&format!("{TOPIC}.dlq"), Vec::new(), Start::Earliest)
        .unwrap();
    // The third attempt was the last: a nack dead-letters it.
    settle(&engine, &[1], Settle::Nack(Some(Duration::from_millis(10)))).await;
    let e = next_event(&mut dlq).await;
    assert_eq!(header(&e.headers, DLQ_REASON), Some("nacked"));
    assert_eq!(header(&e.headers, DLQ_ATTEMPTS), Some("3"));
    assert_eq!(header(&e.headers, DLQ_OFFSET), Some("1"));
    let info = engine.group_info(TOPIC, GROUP).unwrap();
    assert_eq!(
        (info.dead_lettered, info.pending, info.ack_floor),
        (1, 0, 1)
    );
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(fetch_now(&engine, "w", 10).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_nack_delay_is_respected_and_in_progress_moves_the_deadline() {
    let engine = memory(|_| {});
    let cfg = config(Duration::from_secs(2), 5, &[]);
    engine.create_group(TOPIC, GROUP, cfg, false).await.unwrap();
    publish_n(&engine, 2).await;
    assert_eq!(offsets_of(&fetch_now(&engine, "w", 10).await), vec![1, 2]);

    settle(
        &engine,
        &[1],
        Settle::Nack(Some(Duration::from_millis(700))),
    )
    .await;
    tokio::time::advance(Duration::from_millis(699)).await;
    assert!(fetch_now(&engine, "w", 10).await.is_empty());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(offsets_of(&fetch_now(&engine, "w", 10).await), vec![1]);

    // Offset 2 was delivered at t=0 with a 2 s deadline; at 1.5 s it is
    // extended to 3.5 s.
    tokio::time::advance(Duration::from_millis(800)).await;
    let s = settle(&engine, &[2], Settle::InProgress).await;
    assert_eq!(s.applied, 1);
    tokio::time::advance(Duration::from_millis(1_999)).await;
    let f = fetch_now(&engine, "w", 10).await;
    assert!(
        !offsets_of(&f).contains(&2),
        "extended: {:?}",
        offsets_of(&f)
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    let f = fetch_now(&engine, "w", 10).await;
    assert!(offsets_of(&f).contains(&2));
}

// ---- term, dead letters, redrive -------------------------------------------

#[tokio::test]
async fn term_dead_letters_with_the_documented_headers_and_redrive_puts_it_back_once() {
    let engine = memory(|_| {});
    engine
        .create_group(TOPIC, GROUP, GroupConfig::default(), false)
        .await
        .unwrap();
    publish_n(&engine, 3).await;
    let epoch = engine.info(TOPIC).unwrap().epoch;
    assert_eq!(
        offsets_of(&fetch_now(&engine, "w", 10).await),
        vec![1, 2, 3]
    );
    settle(&engine, &[1, 3], Settle::Ack).await;

    let s = settle(&engine, &[2], Settle::Term("cannot parse".into())).await;
    assert_eq!(s.applied, 1);
    // `Settled` for a term comes once the dead letter is appended.
    let dlq = engine.history(&format!("{TOPIC}.dlq"), 0, &[], 10).unwrap();
    assert_eq!(dlq.events.len(), 1);
    let d = &dlq.events[0];
    assert_eq!(&*d.event_type, "job");
    assert_eq!(d.payload, Bytes::from("job-1"));
    assert_eq!(
        header(&d.headers, "trace"),
        Some("t1"),
        "original headers kept"
    );
    assert_eq!(header(&d.headers, DLQ_TOPIC), Some(TOPIC));
    assert_eq!(header(&d.headers, DLQ_OFFSET), Some("2"));
    assert_eq!(header(&d.headers, DLQ_GROUP), Some(GROUP));
    assert_eq!(header(&d.headers, DLQ_ATTEMPTS), Some("1"));
    assert_eq!(header(&d.headers, DLQ_REASON), Some("cannot parse"));
    assert_eq!(
        header(&d.headers, DLQ_EPOCH),
        Some(epoch.to_string().as_str())
    );
    let info = engine.group_info(TOPIC, GROUP).unwrap();
    assert_eq!(
        (info.dead_lettered, info.pending, info.ack_floor),
        (1, 0, 3)
    );
    assert_eq!(info.dead_letter_topic, format!("{TOPIC}.dlq"));

    // A second term of the same offset: already done.
    let again = settle(&engine, &[2], Settle::Term("again".into())).await;
    assert_eq!((again.applied, again.already_done), (0, 1));

    assert_eq!(engine.redrive(TOPIC, GROUP).await.unwrap(), 1);
    let topic = engine.history(TOPIC, 3, &[], 10).unwrap();
    assert_eq!(topic.events.len(), 1);
    let r = &topic.events[0];
    assert_eq!(r.offset, 4);
    assert_eq!(r.payload, Bytes::from("job-1"));
    assert_eq!(header(&r.headers, "trace"), Some("t1"));
    assert!(r
        .headers
        .iter()
        .all(|(k, _)| !k.starts_with("ringcast-dlq-")));
    // Redriving again stores nothing twice.
    assert_eq!(engine.redrive(TOPIC, GROUP).await.unwrap(), 0);
    assert_eq!(engine.info(TOPIC).unwrap().last_offset, 4);
    // The group works on the redriven event as a new one.
    let f = fetch_now(&engine, "w", 10).await;
    assert_eq!((offsets_of(&f), attempts_of(&f)), (vec![4], vec![1]));
}

#[tokio::test]
async fn redrive_takes_only_this_group_s_dead_letters_from_a_shared_topic() {
    let engine = memory(|_| {});
    let shared = GroupConfig {
        dead_letter_topic: Some("failed".into()),
        ..GroupConfig::default()
    };
    engine
        .create_group(TOPIC, GROUP, shared.clone(), false)
        .await
        .unwrap();
    engine
        .create_group(TOPIC, "audit", shared, false)
        .await
        .unwrap();
    publish_n(&engine, 2).await;
    fetch_now(&engine, "w", 10).await;
    settle(&engine, &[1, 2], Settle::Term("x".into())).await;
    engine
        .fetch(TOPIC, "audit", "w", 10, Duration::ZERO, 0)
        .await
        .unwrap();
    engine
        .settle(TOPIC, "audit", &[1], Settle::Term("y".into()))
        .await
        .unwrap();
    assert_eq!(engine.info("failed").unwrap().last_offset, 3);
    assert_eq!(engine.redrive(TOPIC, "audit").await.unwrap(), 1);
    assert_eq!(engine.redrive(TOPIC, GROUP).await.unwrap(), 2);
    assert_eq!(engine.info(TOPIC).unwrap().last_offset, 5);
}

// ---- max_ack_pending --------------------------------------------------------

#[tokio::test]
async fn max_ack_pending_stops_delivery_at_the_limit_and_an_ack_resumes_it() {
    let engine = memory(|_| {});
    let cfg = GroupConfig {
        max_ack_pending: 5,
        ..GroupConfig::default()
    };
    engine.create_group(TOPIC, GROUP, cfg, false).await.unwrap();
    publish_n(&engine, 20).await;

    assert_eq!(
        offsets_of(&fetch_now(&engine, "a", 100).await),
        vec![1, 2, 3, 4, 5]
    );
    assert!(fetch_now(&engine, "a", 100).await.is_empty());
    assert!(fetch_now(&engine, "b", 100).await.is_empty());
    let info = engine.group_info(TOPIC, GROUP).unwrap();
    assert_eq!((info.pending, info.lag), (5, 15));

    // A member waiting for work is woken by the ack that frees room.
    let member = engine.join_group(TOPIC, GROUP, "c", 0, None).await.unwrap();
    let waiting = tokio::spawn(async move {
        let f = member.next(100).await.unwrap();
        (member, f)
    });
    tokio::task::yield_now().await;
    settle(&engine, &[2, 4], Settle::Ack).await;
    let (_member, f) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the ack wakes the waiting member")
        .unwrap();
    assert_eq!(offsets_of(&f), vec![6, 7]);
    assert_eq!(engine.group_info(TOPIC, GROUP).unwrap().pending, 5);
    assert!(fetch_now(&engine, "a", 100).await.is_empty());
}

#[tokio::test]
async fn max_in_flight_bounds_one_member_but_not_the_others() {
    let engine = memory(|_| {});
    engine
        .create_group(TOPIC, GROUP, GroupConfig::default(), false)
        .await
        .unwrap();
    publish_n(&engine, 10).await;
    let a = engine.join_group(TOPIC, GROUP, "a", 3, None).await.unwrap();
    assert_eq!(offsets_of(&a.next(100).await.unwrap()), vec![1, 2, 3]);
    let f = engine
        .fetch(TOPIC, GROUP, "a", 100, Duration::ZERO, 3)
        .await
        .unwrap();
    assert!(f.is_empty(), "a is full");
    assert_eq!(
        offsets_of(&fetch_now(&engine, "b", 4).await),
        vec![4, 5, 6, 7]
    );
    settle(&engine, &[1], Settle::Ack).await;
    assert_eq!(offsets_of(&a.next(100).await.unwrap()), vec![8]);
}

// ---- retention ---------------------------------------------------------------

#[tokio::test]
async fn a_group_behind_retention_gets_one_gap_then_works_on_what_is_retained() {
    let engine = memory(|o| o.topics.max_events = 10);
    engine
        .create_group(TOPIC, GROUP, GroupConfig::default(), false)
        .await
        .unwrap();
    publish_n(&engine, 25).await;
    assert_eq!(engine.info(TOPIC).unwrap().first_offset, 16);

    let f = fetch_now(&engine, "w", 100).await;
    assert_eq!(f.gaps.len(), 1, "{:?}", f.gaps);
    let gap = &f.gaps[0];
    assert_eq!(gap.topic, TOPIC);
    assert_eq!(gap.reason, GapReason::Retention);
    assert_eq!(gap.event_type, None);
    assert_eq!(
        (gap.requested, gap.first_available, gap.current),
        (0, 16, 25)
    );
    assert_eq!(offsets_of(&f), (16..=25).collect::<Vec<_>>());
    assert_eq!(engine.group_info(TOPIC, GROUP).unwrap().lost, 15);
    settle(&engine, &(16..=25).collect::<Vec<_>>(), Settle::Ack).await;

    let f = fetch_now(&engine, "w", 100).await;
    assert!(f.is_empty(), "the gap is reported once");
    publish_n(&engine, 1).await;
    let f = fetch_now(&engine, "w", 100).await;
    assert!(f.gaps.is_empty());
    assert_eq!(offsets_of(&f), vec![26]);
    let info = engine.group_info(TOPIC, GROUP).unwrap();
    assert_eq!((info.acked, info.lost, info.pending), (10, 15, 1));
}

#[tokio::test(start_paused = true)]
async fn pending_work_taken_by_retention_is_one_gap_for_the_lost_range() {
    let engine = memory(|o| o.topics.max_events = 10);
    let cfg = config(Duration::from_secs(1), 5, &[]);
    engine.create_group(TOPIC, GROUP, cfg, false).await.unwrap();
    publish_n(&engine, 10).await;
    assert_eq!(
        offsets_of(&fetch_now(&engine, "w", 4).await),
        vec![1, 2, 3, 4]
    );
    // 1..=4 are in flight when retention takes 1..=6.
    publish_n(&engine, 6).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    // The four expired ones and the two never handed out touch: one gap.
    let f = fetch_now(&engine, "v", 100).await;
    assert_eq!(f.gaps.len(), 1, "{:?}", f.gaps);
    let gap = &f.gaps[0];
    assert_eq!(
        (gap.requested, gap.first_available, gap.current),
        (0, 7, 16)
    );
    assert_eq!(offsets_of(&f), (7..=16).collect::<Vec<_>>());
    assert!(
        fetch_now(&engine, "v", 100).await.is_empty(),
        "reported once"
    );
    assert_eq!(engine.group_info(TOPIC, GROUP).unwrap().lost, 6);
}

#[tokio::test]
async fn retain_until_acked_trims_nothing_unacked_and_refuses_publishes_at_max_bytes() {
    let engine = memory(|o| {
        o.topics.retain_until_acked = true;
        o.topics.max_events = 5;
        o.topics.max_bytes = bytesize(4_096);
    });
    engine
        .create_group(TOPIC, GROUP, GroupConfig::default(), false)
        .await
        .unwrap();
    let mut published = 0u64;
    let refused = loop {
        match engine.publish(TOPIC, job(published)).await {
            Ok(_) => published += 1,
            Err(e) => break e,
        }
        assert!(published < 10_000, "never refused");
    };
    assert!(
        matches!(refused, EngineError::TopicFull { .. }),
        "{refused:?}"
    );
    assert!(published > 5, "more than max_events kept: {published}");
    let info = engine.info(TOPIC).unwrap();
    assert_eq!((info.first_offset, info.last_offset), (1, published));
    // The refusal checks payload bytes against `max_bytes` while the ring
    // also counts each event's type, headers and a fixed overhead, so the
    // cap can be passed by one event's overhead (reported to the lead).
    assert!(info.retained_bytes <= 4_096 + 128, "{info:?}");

    // Acks free room: the topic trims and takes publishes again.
    let f = fetch_now(&engine, "w", 1000).await;
    assert_eq!(f.deliveries.len() as u64, published);
    assert!(matches!(
        engine.publish(TOPIC, job(0)).await,
        Err(EngineError::TopicFull { .. })
    ));
    settle(&engine, &offsets_of(&f), Settle::Ack).await;
    engine.publish(TOPIC, job(published)).await.unwrap();
    let info = engine.info(TOPIC).unwrap();
    assert!(info.first_offset > 1, "acked events are trimmed");
    assert!(info.retained_events <= 5);
}

fn bytesize(n: u64) -> bytesize::ByteSize {
    bytesize::ByteSize::b(n)
}

// ---- persistence ----------------------------------------------------------

/// Consumes `n` (acking `acked` of them) on a sled engine, stops it (a
/// clean close or a release without one), reopens and checks that the
/// acked are never delivered again and every unacked one is.
async fn acked_stay_acked_and_unacked_come_back(durability: Durability, clean: bool) {
    let dir = tempfile::tempdir().unwrap();
    let options = || common::engine::options(dir.path(), durability);
    let cfg = GroupConfig {
        ack_wait: Duration::from_millis(300),
        max_deliver: 50,
        backoff: vec![Duration::from_millis(5)],
        max_ack_pending: 64,
        dead_letter_topic: Some("jobs.failed".into()),
        start: GroupStart::Earliest,
    };
    let engine = common::engine::open(options()).await;
    engine
        .create_group(TOPIC, GROUP, cfg.clone(), false)
        .await
        .unwrap();
    publish_n(&engine, 30).await;
    let f = engine
        .fetch(TOPIC, GROUP, "w", 20, Duration::ZERO, 0)
        .await
        .unwrap();
    assert_eq!(offsets_of(&f), (1..=20).collect::<Vec<_>>());
    let acked: Vec<u64> = (1..=20).filter(|o| o % 3 != 0).collect();
    assert_eq!(settle(&engine, &acked, Settle::Ack).await.applied, 14);
    settle(&engine, &[3], Settle::Nack(None)).await;
    let before = engine.group_info(TOPIC, GROUP).unwrap();
    if clean {
        common::engine::close(engine).await;
    } else {
        common::engine::release(engine).await;
    }

    let engine = common::engine::open(options()).await;
    let info = engine.group_info(TOPIC, GROUP).unwrap();
    assert_eq!(info.config, cfg, "settings survive");
    // Without fsync, a release without close may lose the last interval.
    let strict = durability == Durability::Fsync || clean;
    if strict {
        assert_eq!(info.acked, 14, "counters survive");
        assert_eq!(info.delivered, before.delivered);
        assert_eq!(info.ack_floor, 2);
    }

    // Every unacked offset comes back (in flight ones after their
    // deadline); no acked one does.
    let member = engine
        .join_group(TOPIC, GROUP, "w2", 0, None)
        .await
        .unwrap();
    let want: HashSet<u64> = (1..=30).filter(|o| !acked.contains(o)).collect();
    let mut seen = HashSet::new();
    while !want.is_subset(&seen) {
        let f = tokio::time::timeout(Duration::from_secs(10), member.next(100))
            .await
            .expect("unacked work comes back")
            .unwrap();
        for o in offsets_of(&f) {
            if strict {
                assert!(!acked.contains(&o), "acked offset {o} delivered again");
            }
            seen.insert(o);
        }
        settle(&engine, &offsets_of(&f), Settle::Ack).await;
    }
    let info = engine.group_info(TOPIC, GROUP).unwrap();
    assert_eq!((info.pending, info.ack_floor), (0, 30));
    member.leave();
    common::engine::close(engine).await;
}

#[tokio::test]
async fn fsync_groups_survive_a_clean_restart() {
    acked_stay_acked_and_unacked_come_back(Durability::Fsync, true).await;
}

#[tokio::test]
async fn fsync_groups_survive_a_release_without_close() {
    acked_stay_acked_and_unacked_come_back(Durability::Fsync, false).await;
}

#[tokio::test]
async fn interval_groups_survive_a_clean_restart() {
    acked_stay_acked_and_unacked_come_back(Durability::Interval, true).await;
}

#[tokio::test]
async fn interval_groups_lose_no_unacked_work_on_a_release_without_close() {
    acked_stay_acked_and_unacked_come_back(Durability::Interval, false).await;
}

#[tokio::test]
async fn deleting_a_group_or_its_topic_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let options = || common::engine::options(dir.path(), Durability::Fsync);
    let engine = common::engine::open(options()).await;
    for g in ["keep", "gone"] {
        engine
            .create_group(TOPIC, g, GroupConfig::default(), false)
            .await
            .unwrap();
    }
    engine
        .create_group("other", "g", GroupConfig::default(), false)
        .await
        .unwrap();
    publish_n(&engine, 3).await;
    engine.delete_group(TOPIC, "gone").await.unwrap();
    assert!(matches!(
        engine.group_info(TOPIC, "gone"),
        Err(EngineError::GroupNotFound(_))
    ));
    engine.delete("other").await.unwrap();
    assert!(matches!(
        engine.group_info("other", "g"),
        Err(EngineError::GroupNotFound(_))
    ));
    common::engine::release(engine).await;

    let engine = common::engine::open(options()).await;
    let names: Vec<String> = engine
        .groups(TOPIC)
        .unwrap()
        .into_iter()
        .map(|g| g.group)
        .collect();
    assert_eq!(names, vec!["keep".to_owned()]);
    assert!(matches!(
        engine.group_info("other", "g"),
        Err(EngineError::GroupNotFound(_))
    ));
    // A re-created topic of the same name starts without the old groups.
    engine.create("other").unwrap();
    assert!(engine.groups("other").unwrap().is_empty());
    common::engine::close(engine).await;
}

// ---- concurrency -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn acks_racing_fetches_settle_each_event_once() {
    const N: u64 = 3_000;
    let engine = memory(|_| {});
    let cfg = GroupConfig {
        max_ack_pending: 50,
        ..GroupConfig::default()
    };
    engine.create_group(TOPIC, GROUP, cfg, false).await.unwrap();
    publish_n(&engine, N).await;

    // Two members fetch; a third task acks what they got, each offset
    // twice, while they keep fetching.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u64>>();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let mut fetchers = Vec::new();
    for id in 0..2 {
        let member = engine
            .join_group(TOPIC, GROUP, &format!("f{id}"), 0, None)
            .await
            .unwrap();
        let (tx, mut done_rx) = (tx.clone(), done_rx.clone());
        fetchers.push(tokio::spawn(async move {
            let mut got: Vec<u64> = Vec::new();
            loop {
                let f = tokio::select! {
                    f = member.next(7) => f.unwrap(),
                    _ = done_rx.wait_for(|d| *d) => break,
                };
                let offsets = offsets_of(&f);
                assert!(attempts_of(&f).iter().all(|&a| a == 1));
                got.extend(&offsets);
                tx.send(offsets).unwrap();
            }
            got
        }));
    }
    drop(tx);
    let acker = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let (mut applied, mut repeats) = (0, 0);
            while applied < N {
                let offsets = rx.recv().await.expect("fetchers run until done");
                let s = settle(&engine, &offsets, Settle::Ack).await;
                applied += s.applied;
                let again = settle(&engine, &offsets, Settle::Ack).await;
                repeats += again.already_done;
                assert_eq!(again.applied, 0);
            }
            done_tx.send_replace(true);
            (applied, repeats)
        })
    };
    let (applied, repeats) = tokio::time::timeout(Duration::from_secs(60), acker)
        .await
        .expect("every event is acked")
        .unwrap();
    assert_eq!((applied, repeats), (N, N));
    let mut all: Vec<u64> = Vec::new();
    for f in fetchers {
        all.extend(f.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=N).collect::<Vec<_>>(), "each delivered once");
    let info = engine.group_info(TOPIC, GROUP).unwrap();
    assert_eq!((info.acked, info.pending, info.ack_floor), (N, 0, N));
}

#[tokio::test]
async fn a_clean_leave_hands_the_work_to_a_waiting_member_at_once() {
    let engine = memory(|_| {});
    engine
        .create_group(TOPIC, GROUP, GroupConfig::default(), false)
        .await
        .unwrap();
    publish_n(&engine, 5).await;
    let a = engine.join_group(TOPIC, GROUP, "a", 0, None).await.unwrap();
    assert_eq!(a.next(100).await.unwrap().deliveries.len(), 5);
    let b = engine.join_group(TOPIC, GROUP, "b", 0, None).await.unwrap();
    let waiting = tokio::spawn(async move { b.next(100).await.unwrap() });
    tokio::task::yield_now().await;
    a.leave();
    // ack_wait is 30 s: only the leave can hand the work over in time.
    let f = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the leave hands the work over")
        .unwrap();
    assert_eq!(offsets_of(&f), vec![1, 2, 3, 4, 5]);
    assert_eq!(attempts_of(&f), vec![2; 5]);
}

#[tokio::test]
async fn a_leave_with_another_session_of_the_same_name_hands_nothing_back() {
    let engine = memory(|_| {});
    engine
        .create_group(TOPIC, GROUP, GroupConfig::default(), false)
        .await
        .unwrap();
    publish_n(&engine, 2).await;
    let a1 = engine.join_group(TOPIC, GROUP, "a", 0, None).await.unwrap();
    let a2 = engine.join_group(TOPIC, GROUP, "a", 0, None).await.unwrap();
    assert_eq!(a1.next(100).await.unwrap().deliveries.len(), 2);
    a1.leave();
    assert!(fetch_now(&engine, "b", 100).await.is_empty());
    a2.leave();
    assert_eq!(offsets_of(&fetch_now(&engine, "b", 100).await), vec![1, 2]);
}

// ---- bad input ---------------------------------------------------------------

#[tokio::test]
async fn hostile_settles_and_settings_get_errors_not_panics() {
    let engine = memory(|_| {});
    engine
        .create_group(TOPIC, GROUP, GroupConfig::default(), false)
        .await
        .unwrap();
    publish_n(&engine, 2).await;
    fetch_now(&engine, "w", 1).await;
    for how in [
        Settle::Ack,
        Settle::Nack(None),
        Settle::InProgress,
        Settle::Term("x".into()),
    ] {
        let s = settle(&engine, &[u64::MAX, u64::MAX - 1, 2], how).await;
        assert_eq!((s.applied, s.unknown), (0, 3));
    }
    let s = settle(&engine, &[0], Settle::Ack).await;
    assert_eq!(s.applied, 0);
    assert!(matches!(
        engine
            .settle(TOPIC, GROUP, &[1], Settle::Nack(Some(Duration::MAX)))
            .await,
        Err(EngineError::InvalidRequest(_))
    ));
    assert!(matches!(
        engine.settle(TOPIC, GROUP, &[1; 10_001], Settle::Ack).await,
        Err(EngineError::InvalidRequest(_))
    ));
    // The nack that was refused changed nothing: 1 is still in flight.
    let s = settle(&engine, &[1], Settle::Ack).await;
    assert_eq!(s.applied, 1);

    let bad = [
        GroupConfig {
            ack_wait: Duration::ZERO,
            ..GroupConfig::default()
        },
        GroupConfig {
            max_deliver: 0,
            ..GroupConfig::default()
        },
        GroupConfig {
            max_ack_pending: 0,
            ..GroupConfig::default()
        },
        GroupConfig {
            backoff: vec![Duration::MAX],
            ..GroupConfig::default()
        },
        GroupConfig {
            dead_letter_topic: Some("bad topic".into()),
            ..GroupConfig::default()
        },
    ];
    for cfg in bad {
        assert!(matches!(
            engine.create_group(TOPIC, "g2", cfg, false).await,
            Err(EngineError::InvalidRequest(_))
        ));
    }
    assert!(matches!(
        engine
            .create_group(TOPIC, "bad name", GroupConfig::default(), false)
            .await,
        Err(EngineError::InvalidGroup(_))
    ));
    assert!(matches!(
        engine.join_group(TOPIC, GROUP, "bad name", 0, None).await,
        Err(EngineError::InvalidRequest(_))
    ));
    assert!(matches!(
        engine.join_group(TOPIC, "missing", "w", 0, None).await,
        Err(EngineError::GroupNotFound(_))
    ));
    let far = GroupConfig {
        start: GroupStart::AfterOffset(u64::MAX),
        ..GroupConfig::default()
    };
    let info = engine.create_group(TOPIC, "far", far, false).await.unwrap();
    assert_eq!(info.next_offset, 3, "capped at the topic's next offset");
}

#[tokio::test]
async fn create_is_idempotent_and_update_keeps_the_start() {
    let engine = memory(|_| {});
    publish_n(&engine, 3).await;
    let live = GroupConfig {
        start: GroupStart::Live,
        ..GroupConfig::default()
    };
    let a = engine
        .create_group(TOPIC, GROUP, live, false)
        .await
        .unwrap();
    assert_eq!(a.next_offset, 4);
    let other = GroupConfig {
        max_deliver: 9,
        ..GroupConfig::default()
    };
    let b = engine
        .create_group(TOPIC, GROUP, other.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        b.config.max_deliver, 5,
        "an existing group keeps its settings"
    );
    let c = engine
        .create_group(TOPIC, GROUP, other, true)
        .await
        .unwrap();
    assert_eq!(c.config.max_deliver, 9);
    assert_eq!(c.config.start, GroupStart::Live, "the start is kept");
    assert_eq!(c.next_offset, 4);
}

// ---- review mends ---------------------------------------------------------

#[tokio::test]
async fn a_worker_leaving_cleanly_on_the_same_event_every_time_ends_it_in_the_dead_letters() {
    let engine = memory(|_| {});
    engine
        .create_group(TOPIC, GROUP, config(Duration::from_secs(60), 2, &[]), false)
        .await
        .unwrap();
    publish_n(&engine, 1).await;
    for attempt in 1..=2 {
        let member = engine.join_group(TOPIC, GROUP, "w", 0, None).await.unwrap();
        let f = member.next(10).await.unwrap();
        assert_eq!(attempts_of(&f), vec![attempt]);
        member.leave();
    }
    let mut dlq = engine
        .subscribe("jobs.dlq", vec![], Start::Earliest)
        .unwrap();
    let letter = next_event(&mut dlq).await;
    assert_eq!(header(&letter.headers, DLQ_REASON), Some("max_deliver"));
    assert_eq!(header(&letter.headers, DLQ_ATTEMPTS), Some("2"));
    assert!(fetch_now(&engine, "w", 10).await.is_empty());
}

#[tokio::test]
async fn retain_until_acked_keeps_unacked_events_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let options = || {
        let mut o = common::engine::options(dir.path(), Durability::Fsync);
        o.topics.retain_until_acked = true;
        o.topics.max_events = 5;
        o
    };
    let engine = common::engine::open(options()).await;
    engine
        .create_group(TOPIC, GROUP, GroupConfig::default(), false)
        .await
        .unwrap();
    publish_n(&engine, 20).await;
    let f = fetch_now(&engine, "w", 3).await;
    settle(&engine, &offsets_of(&f), Settle::Ack).await;
    common::engine::close(engine).await;

    let engine = common::engine::open(options()).await;
    // Only what the group acked may go: 4..=20 stay although max_events is 5.
    let info = engine.info(TOPIC).unwrap();
    assert_eq!((info.first_offset, info.last_offset), (4, 20));
    let f = fetch_now(&engine, "w", 100).await;
    assert!(f.gaps.is_empty(), "{:?}", f.gaps);
    assert_eq!(offsets_of(&f), (4..=20).collect::<Vec<_>>());
    common::engine::close(engine).await;
}

#[tokio::test]
async fn a_sealed_topic_stays_until_its_groups_are_done() {
    let engine = memory(|o| o.topics.sealed_ttl = Duration::from_secs(60));
    engine
        .create_group(TOPIC, GROUP, GroupConfig::default(), false)
        .await
        .unwrap();
    publish_n(&engine, 2).await;
    engine.seal(TOPIC).await.unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(61);
    engine.maintain_at(later);
    assert!(engine.info(TOPIC).is_ok(), "removed with work left");
    let f = fetch_now(&engine, "w", 10).await;
    settle(&engine, &offsets_of(&f), Settle::Ack).await;
    engine.maintain_at(later);
    assert!(matches!(
        engine.info(TOPIC),
        Err(EngineError::TopicNotFound(_))
    ));
    assert!(matches!(
        engine.group_info(TOPIC, GROUP),
        Err(EngineError::GroupNotFound(_))
    ));
}

#[tokio::test]
async fn a_group_knows_a_bounded_number_of_consumer_names() {
    let engine = memory(|_| {});
    engine
        .create_group(TOPIC, GROUP, GroupConfig::default(), false)
        .await
        .unwrap();
    for i in 0..1024 {
        fetch_now(&engine, &format!("w{i}"), 1).await;
    }
    let refused = engine
        .fetch(TOPIC, GROUP, "one-too-many", 1, Duration::ZERO, 0)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, EngineError::InvalidRequest(_)),
        "{refused:?}"
    );
    // A known name is still served.
    fetch_now(&engine, "w7", 1).await;
}

#[tokio::test]
async fn a_group_cannot_dead_letter_into_its_own_topic() {
    let engine = memory(|_| {});
    let cfg = GroupConfig {
        dead_letter_topic: Some(TOPIC.into()),
        ..GroupConfig::default()
    };
    let refused = engine
        .create_group(TOPIC, GROUP, cfg, false)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, EngineError::InvalidRequest(_)),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_dead_letter_refused_by_a_sealed_dead_letter_topic_stays_pending_and_is_retried() {
    let engine = memory(|_| {});
    let cfg = GroupConfig {
        dead_letter_topic: Some("jobs.failed".into()),
        ..GroupConfig::default()
    };
    engine.create_group(TOPIC, GROUP, cfg, false).await.unwrap();
    engine.create("jobs.failed").unwrap();
    engine.seal("jobs.failed").await.unwrap();
    publish_n(&engine, 1).await;
    let f = fetch_now(&engine, "w", 1).await;
    settle(&engine, &offsets_of(&f), Settle::Term("bad".into())).await;
    let info = engine.group_info(TOPIC, GROUP).unwrap();
    assert_eq!((info.pending, info.dead_lettered), (1, 0), "{info:?}");
    // Nothing is handed out meanwhile: it is dead, waiting for its append.
    assert!(fetch_now(&engine, "w", 1).await.is_empty());

    // Once the dead-letter topic takes events again, the ticker appends it.
    engine.delete("jobs.failed").await.unwrap();
    let mut dlq = engine
        .subscribe("jobs.failed", vec![], Start::Earliest)
        .unwrap();
    let letter = next_event(&mut dlq).await;
    assert_eq!(header(&letter.headers, DLQ_REASON), Some("bad"));
}
