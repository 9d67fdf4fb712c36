//! The engine's resume, gap, retention and lifecycle rules (DESIGN.md),
//! asserted through the public engine API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ringcast::config::Durability;
use ringcast::engine::{
    Delivery, Engine, EngineError, EngineOptions, Gap, GapReason, NewEvent, Start,
};

fn memory(configure: impl FnOnce(&mut EngineOptions)) -> Engine {
    let mut options = EngineOptions::memory();
    configure(&mut options);
    Engine::open(options).expect("open memory engine")
}

fn ev(t: &str, payload: &str) -> NewEvent {
    NewEvent::new(t, Bytes::from(payload.to_owned()))
}

async fn publish_n(engine: &Engine, topic: &str, t: &str, n: usize) -> Vec<u64> {
    let mut offsets = Vec::new();
    for i in 0..n {
        offsets.push(
            engine
                .publish(topic, ev(t, &i.to_string()))
                .await
                .unwrap()
                .offset,
        );
    }
    offsets
}

/// Reads deliveries until `End`, with a generous timeout so a hang fails.
async fn read_to_end(sub: &mut ringcast::engine::Subscription) -> Vec<Delivery> {
    let mut out = Vec::new();
    loop {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.recv())
            .await
            .expect("subscription stalled")
            .expect("stream ended without End");
        let end = matches!(d, Delivery::End { .. });
        out.push(d);
        if end {
            return out;
        }
    }
}

fn offsets(ds: &[Delivery]) -> Vec<u64> {
    ds.iter()
        .filter_map(|d| match d {
            Delivery::Event(e) => Some(e.offset),
            _ => None,
        })
        .collect()
}

fn gaps(ds: &[Delivery]) -> Vec<Gap> {
    ds.iter()
        .filter_map(|d| match d {
            Delivery::Gap(g) => Some(g.clone()),
            _ => None,
        })
        .collect()
}

async fn next(sub: &mut ringcast::engine::Subscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("no delivery in time")
        .expect("stream ended")
}

async fn replay_then_live_is_atomic(engine: Engine) {
    const PUBLISHERS: usize = 4;
    const PER_PUBLISHER: usize = 300;
    let topic = "atomic";
    engine.create(topic).unwrap();
    let epoch = engine.info(topic).unwrap().epoch;
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let engine = engine.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..PER_PUBLISHER {
                let t = if i % 3 == 0 { "x" } else { "y" };
                engine
                    .publish(topic, ev(t, &format!("{p}-{i}")))
                    .await
                    .unwrap();
                if i % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    // Subscribers join while the publishers run, each with a different start.
    let mut subscribers = Vec::new();
    for s in 0..24u64 {
        let engine = engine.clone();
        subscribers.push(tokio::spawn(async move {
            for _ in 0..s {
                tokio::task::yield_now().await;
            }
            let last = engine.info(topic).unwrap().last_offset;
            let (start, expected_first) = match s % 3 {
                0 => (Start::Earliest, Some(1)),
                1 => (
                    Start::AfterOffset {
                        epoch,
                        offset: last / 2,
                    },
                    Some(last / 2 + 1),
                ),
                _ => (Start::Live, None),
            };
            let mut sub = engine.subscribe(topic, vec![], start).unwrap();
            let start_offset = sub.start_offset();
            let ds = read_to_end(&mut sub).await;
            assert!(gaps(&ds).is_empty(), "no gap expected: {:?}", gaps(&ds));
            let got = offsets(&ds);
            let first = expected_first.unwrap_or(start_offset);
            let total = (PUBLISHERS * PER_PUBLISHER) as u64;
            let want: Vec<u64> = (first..=total).collect();
            assert_eq!(got, want, "subscriber {s} saw a hole or a duplicate");
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    engine.seal(topic).await.unwrap();
    for s in subscribers {
        s.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_then_live_is_atomic_in_memory_mode() {
    let engine = memory(|o| o.topics.max_events = 100_000);
    replay_then_live_is_atomic(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_then_live_is_atomic_with_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = EngineOptions::persistent(dir.path(), Durability::Interval);
    options.topics.max_events = 100_000;
    let engine = Engine::open(options).unwrap();
    replay_then_live_is_atomic(engine.clone()).await;
    engine.close().await.unwrap();
}

#[tokio::test]
async fn resume_from_the_last_offset_sends_no_gap_and_nothing_old() {
    let engine = memory(|_| {});
    publish_n(&engine, "t", "a", 5).await;
    let epoch = engine.info("t").unwrap().epoch;
    let mut sub = engine
        .subscribe("t", vec![], Start::AfterOffset { epoch, offset: 5 })
        .unwrap();
    assert!(sub.try_recv().is_none(), "up to date: nothing to deliver");
    engine.publish("t", ev("a", "6")).await.unwrap();
    match next(&mut sub).await {
        Delivery::Event(e) => assert_eq!((e.offset, e.version), (6, 6)),
        other => panic!("expected event 6, got {other:?}"),
    }
}

#[tokio::test]
async fn resume_after_trim_sends_one_gap_with_exact_fields_then_live() {
    let engine = memory(|o| o.topics.max_events = 3);
    publish_n(&engine, "t", "a", 10).await; // retained: 8, 9, 10
    let epoch = engine.info("t").unwrap().epoch;
    let mut sub = engine
        .subscribe("t", vec![], Start::AfterOffset { epoch, offset: 4 })
        .unwrap();
    assert_eq!(
        next(&mut sub).await,
        Delivery::Gap(Gap {
            topic: "t".into(),
            event_type: None,
            reason: GapReason::Retention,
            epoch,
            requested: 4,
            first_available: 8,
            current: 10,
        })
    );
    assert!(sub.try_recv().is_none(), "after the gap the stream is live");
    engine.publish("t", ev("a", "11")).await.unwrap();
    match next(&mut sub).await {
        Delivery::Event(e) => assert_eq!(e.offset, 11),
        other => panic!("expected live event 11, got {other:?}"),
    }
}

#[tokio::test]
async fn resume_just_before_the_ring_needs_no_gap() {
    let engine = memory(|o| o.topics.max_events = 3);
    publish_n(&engine, "t", "a", 10).await;
    let epoch = engine.info("t").unwrap().epoch;
    let mut sub = engine
        .subscribe("t", vec![], Start::AfterOffset { epoch, offset: 7 })
        .unwrap();
    let got: Vec<u64> = (0..3)
        .map(|_| match sub.try_recv() {
            Some(Delivery::Event(e)) => e.offset,
            other => panic!("expected an event, got {other:?}"),
        })
        .collect();
    assert_eq!(got, vec![8, 9, 10]);
}

#[tokio::test]
async fn nothing_missed_and_nothing_retained_is_not_a_gap() {
    let engine = memory(|o| o.topics.max_age = Duration::from_secs(1));
    publish_n(&engine, "t", "a", 3).await;
    engine.maintain_at(SystemTime::now() + Duration::from_secs(5));
    let info = engine.info("t").unwrap();
    assert_eq!((info.retained_events, info.first_offset), (0, 4));
    let mut sub = engine
        .subscribe(
            "t",
            vec![],
            Start::AfterOffset {
                epoch: info.epoch,
                offset: 3,
            },
        )
        .unwrap();
    assert!(sub.try_recv().is_none());
    let mut by_version = engine
        .subscribe(
            "t",
            vec![],
            Start::AfterVersions {
                epoch: info.epoch,
                versions: vec![("a".into(), 3)],
            },
        )
        .unwrap();
    assert!(by_version.try_recv().is_none());
}

#[tokio::test]
async fn another_epoch_gives_an_epoch_changed_gap_then_live() {
    let engine = memory(|_| {});
    publish_n(&engine, "t", "a", 3).await;
    let epoch = engine.info("t").unwrap().epoch;
    let mut sub = engine
        .subscribe(
            "t",
            vec![],
            Start::AfterOffset {
                epoch: epoch ^ 1,
                offset: 2,
            },
        )
        .unwrap();
    match next(&mut sub).await {
        Delivery::Gap(g) => {
            assert_eq!(g.reason, GapReason::EpochChanged);
            assert_eq!((g.epoch, g.event_type, g.current), (epoch, None, 3));
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    assert!(sub.try_recv().is_none());

    let mut by_version = engine
        .subscribe(
            "t",
            vec![],
            Start::AfterVersions {
                epoch: epoch ^ 1,
                versions: vec![("a".into(), 1)],
            },
        )
        .unwrap();
    assert!(matches!(
        next(&mut by_version).await,
        Delivery::Gap(Gap {
            reason: GapReason::EpochChanged,
            ..
        })
    ));
}

#[tokio::test]
async fn deleted_and_recreated_topic_has_a_new_epoch() {
    let engine = memory(|_| {});
    publish_n(&engine, "t", "a", 3).await;
    let old = engine.info("t").unwrap().epoch;
    let mut sub = engine.subscribe("t", vec![], Start::Live).unwrap();
    engine.delete("t").await.unwrap();
    assert_eq!(next(&mut sub).await, Delivery::End { last_offset: 3 });
    let ack = engine.publish("t", ev("a", "again")).await.unwrap();
    assert_ne!(ack.epoch, old);
    assert_eq!((ack.offset, ack.version), (1, 1));
    let mut resumed = engine
        .subscribe(
            "t",
            vec![],
            Start::AfterOffset {
                epoch: old,
                offset: 3,
            },
        )
        .unwrap();
    assert!(matches!(
        next(&mut resumed).await,
        Delivery::Gap(Gap {
            reason: GapReason::EpochChanged,
            ..
        })
    ));
}

#[tokio::test]
async fn resume_by_versions_replays_missed_types_and_gaps_only_the_trimmed_one() {
    let engine = memory(|o| o.topics.max_events = 6);
    // offsets: a1 b1 a2 c1 a3 b2 a4 c2 b3 a5   (ring keeps offsets 5..=10)
    for t in ["a", "b", "a", "c", "a", "b", "a", "c", "b", "a"] {
        engine.publish("t", ev(t, t)).await.unwrap();
    }
    let info = engine.info("t").unwrap();
    assert_eq!(info.first_offset, 5);
    let mut sub = engine
        .subscribe(
            "t",
            vec![],
            Start::AfterVersions {
                epoch: info.epoch,
                versions: vec![
                    ("a".into(), 2), // a3 (offset 5) is retained: replay a3 a4 a5
                    ("b".into(), 0), // b1 (offset 2) is trimmed: gap, then b live
                    ("c".into(), 2), // up to date
                ],
            },
        )
        .unwrap();
    assert_eq!(
        next(&mut sub).await,
        Delivery::Gap(Gap {
            topic: "t".into(),
            event_type: Some("b".into()),
            reason: GapReason::Retention,
            epoch: info.epoch,
            requested: 0,
            first_available: 2,
            current: 3,
        })
    );
    let mut got = Vec::new();
    while let Some(d) = sub.try_recv() {
        match d {
            Delivery::Event(e) => got.push((e.event_type.to_string(), e.version)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, vec![("a".into(), 3), ("a".into(), 4), ("a".into(), 5)]);
    // Live: every type, including b and a type never named.
    engine.publish("t", ev("b", "b4")).await.unwrap();
    engine.publish("t", ev("d", "d1")).await.unwrap();
    for want in [("b", 4), ("d", 1)] {
        match next(&mut sub).await {
            Delivery::Event(e) => assert_eq!((&*e.event_type, e.version), want),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_type_filter_applies_to_replay_and_live() {
    let engine = memory(|_| {});
    for t in ["a", "b", "a", "c"] {
        engine.publish("t", ev(t, t)).await.unwrap();
    }
    let mut sub = engine
        .subscribe("t", vec!["a".into(), "c".into()], Start::Earliest)
        .unwrap();
    engine.publish("t", ev("b", "b")).await.unwrap();
    engine.publish("t", ev("c", "c")).await.unwrap();
    engine.seal("t").await.unwrap();
    let ds = read_to_end(&mut sub).await;
    assert_eq!(offsets(&ds), vec![1, 3, 4, 6]);
    assert_eq!(ds.last(), Some(&Delivery::End { last_offset: 6 }));
}

#[tokio::test]
async fn future_positions_are_refused_not_silently_accepted() {
    let engine = memory(|_| {});
    publish_n(&engine, "t", "a", 2).await;
    let epoch = engine.info("t").unwrap().epoch;
    let err = engine
        .subscribe("t", vec![], Start::AfterOffset { epoch, offset: 3 })
        .unwrap_err();
    assert!(matches!(err, EngineError::InvalidStart(_)), "{err}");
    let err = engine
        .subscribe(
            "t",
            vec![],
            Start::AfterVersions {
                epoch,
                versions: vec![("a".into(), 9)],
            },
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::InvalidStart(_)), "{err}");
}

#[tokio::test]
async fn a_subscriber_that_never_reads_costs_bounded_memory_and_gets_a_slow_consumer_gap() {
    let engine = memory(|o| {
        o.topics.max_events = 100;
        o.topics.max_bytes = bytesize_of(64 * 1024);
    });
    engine.create("t").unwrap();
    let mut stalled = engine.subscribe("t", vec![], Start::Live).unwrap();
    let mut healthy = engine.subscribe("t", vec![], Start::Live).unwrap();
    let payload = Bytes::from(vec![7u8; 512]);
    for i in 1..=5_000u64 {
        engine
            .publish("t", NewEvent::new("a", payload.clone()))
            .await
            .unwrap();
        // A reader that keeps up misses nothing, whatever the stalled one does.
        match next(&mut healthy).await {
            Delivery::Event(e) => assert_eq!(e.offset, i),
            other => panic!("healthy reader got {other:?}"),
        }
        let info = engine.info("t").unwrap();
        assert!(info.retained_events <= 100);
        assert!(info.retained_bytes <= 64 * 1024);
    }
    match next(&mut stalled).await {
        Delivery::Gap(g) => {
            assert_eq!(g.reason, GapReason::SlowConsumer);
            // It continues from the newest retained event, so the gap is
            // never the only thing it gets.
            assert_eq!((g.requested, g.current), (0, 4_999));
            assert_eq!(g.first_available, 4_901);
        }
        other => panic!("expected gap(slow_consumer), got {other:?}"),
    }
    match next(&mut stalled).await {
        Delivery::Event(e) => assert_eq!(e.offset, 5_000),
        other => panic!("expected the newest event after the gap, got {other:?}"),
    }
    assert!(stalled.try_recv().is_none(), "after the gap: live");
    engine.publish("t", ev("a", "next")).await.unwrap();
    match next(&mut stalled).await {
        Delivery::Event(e) => assert_eq!(e.offset, 5_001),
        other => panic!("expected live event, got {other:?}"),
    }
}

fn bytesize_of(n: u64) -> bytesize::ByteSize {
    bytesize::ByteSize::b(n)
}

#[tokio::test]
async fn sealing_ends_subscribers_after_the_last_event_and_refuses_publishes() {
    let engine = memory(|o| o.topics.sealed_ttl = Duration::from_secs(60));
    publish_n(&engine, "t", "a", 2).await;
    let mut sub = engine.subscribe("t", vec![], Start::Earliest).unwrap();
    engine.seal("t").await.unwrap();
    let ds = read_to_end(&mut sub).await;
    assert_eq!(offsets(&ds), vec![1, 2]);
    assert_eq!(ds.last(), Some(&Delivery::End { last_offset: 2 }));
    assert!(sub.recv().await.is_none());
    assert_eq!(
        engine.publish("t", ev("a", "late")).await.unwrap_err(),
        EngineError::TopicSealed("t".into())
    );
    // A late subscriber replays and ends too.
    let mut late = engine.subscribe("t", vec![], Start::Earliest).unwrap();
    assert_eq!(offsets(&read_to_end(&mut late).await), vec![1, 2]);
    assert!(engine.info("t").unwrap().sealed);
    // Removed after sealed_ttl.
    engine.maintain_at(SystemTime::now() + Duration::from_secs(30));
    assert!(engine.info("t").is_ok());
    engine.maintain_at(SystemTime::now() + Duration::from_secs(61));
    assert_eq!(
        engine.info("t").unwrap_err(),
        EngineError::TopicNotFound("t".into())
    );
}

#[tokio::test]
async fn idle_topics_expire_only_when_configured_and_unwatched() {
    let engine = memory(|o| {
        o.topics.overrides.push(ringcast::config::TopicOverride {
            pattern: "tmp-*".into(),
            idle_ttl: Some(Duration::from_secs(10)),
            ..Default::default()
        })
    });
    publish_n(&engine, "tmp-1", "a", 1).await;
    publish_n(&engine, "tmp-2", "a", 1).await;
    publish_n(&engine, "keep", "a", 1).await;
    let watcher = engine.subscribe("tmp-2", vec![], Start::Live).unwrap();
    let later = SystemTime::now() + Duration::from_secs(11);
    engine.maintain_at(later);
    let names: Vec<String> = engine.topics().into_iter().map(|t| t.name).collect();
    assert_eq!(names, vec!["keep", "tmp-2"]);
    drop(watcher);
    engine.maintain_at(later + Duration::from_secs(11));
    let names: Vec<String> = engine.topics().into_iter().map(|t| t.name).collect();
    assert_eq!(names, vec!["keep"]);
}

#[tokio::test]
async fn versions_are_per_type_and_offsets_per_topic() {
    let engine = memory(|_| {});
    let mut got = Vec::new();
    for t in ["a", "b", "a", "a", "b"] {
        let ack = engine.publish("t", ev(t, t)).await.unwrap();
        got.push((ack.offset, ack.version));
    }
    assert_eq!(got, vec![(1, 1), (2, 1), (3, 2), (4, 3), (5, 2)]);
    let other = engine.publish("u", ev("a", "x")).await.unwrap();
    assert_eq!((other.offset, other.version), (1, 1));
    let info = engine.info("t").unwrap();
    assert_eq!(info.versions, vec![("a".into(), 3), ("b".into(), 2)]);
}

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_error_and_appends_nothing() {
    let engine = memory(|o| o.limits.max_payload = 16);
    for bad in ["", "has space", "slash/no", "ü", &"x".repeat(256)] {
        assert!(
            matches!(
                engine.publish(bad, ev("a", "x")).await,
                Err(EngineError::InvalidTopic(_))
            ),
            "topic {bad:?}"
        );
    }
    assert!(engine.publish(&"x".repeat(255), ev("a", "x")).await.is_ok());
    assert!(matches!(
        engine.publish("t", ev("bad type", "x")).await,
        Err(EngineError::InvalidType(_))
    ));
    assert_eq!(
        engine.publish("t", ev("a", &"x".repeat(17))).await,
        Err(EngineError::PayloadTooLarge { size: 17, max: 16 })
    );
    assert_eq!(
        engine.publish_batch("t", vec![]).await,
        Err(EngineError::EmptyBatch)
    );
    assert!(matches!(
        engine
            .publish("t", ev("a", "x").header("", "empty name"))
            .await,
        Err(EngineError::InvalidHeaders(_))
    ));
    // A batch is validated as a whole: one bad event, nothing appended.
    let batch = vec![ev("a", "ok"), ev("a", &"x".repeat(17)), ev("a", "ok")];
    assert!(engine.publish_batch("t", batch).await.is_err());
    assert!(engine.info("t").is_err(), "topic was not even created");
    let acks = engine
        .publish_batch("t", vec![ev("a", "1"), ev("b", "2"), ev("a", "3")])
        .await
        .unwrap();
    let got: Vec<(u64, u64)> = acks.iter().map(|a| (a.offset, a.version)).collect();
    assert_eq!(got, vec![(1, 1), (2, 1), (3, 2)]);
    assert!(matches!(
        engine.subscribe("t", vec!["no spaces".into()], Start::Live),
        Err(EngineError::InvalidType(_))
    ));
}

#[tokio::test]
async fn a_payload_larger_than_the_topic_can_retain_is_refused() {
    let engine = memory(|o| o.topics.max_bytes = bytesize_of(100));
    assert!(matches!(
        engine.publish("t", ev("a", &"x".repeat(101))).await,
        Err(EngineError::PayloadTooLarge {
            size: 101,
            max: 100
        })
    ));
}

#[tokio::test]
async fn auto_create_off_refuses_unknown_topics_and_max_topics_is_enforced() {
    let engine = memory(|o| {
        o.topics.auto_create = false;
        o.limits.max_topics = 2;
    });
    assert_eq!(
        engine.publish("t", ev("a", "x")).await.unwrap_err(),
        EngineError::TopicNotFound("t".into())
    );
    assert!(engine.subscribe("t", vec![], Start::Live).is_err());
    engine.create("t").unwrap();
    engine.create("u").unwrap();
    assert_eq!(
        engine.create("v").unwrap_err(),
        EngineError::TooManyTopics(2)
    );
    assert!(engine.publish("t", ev("a", "x")).await.is_ok());
}

#[tokio::test]
async fn history_pages_through_retained_events_with_a_filter() {
    let engine = memory(|o| o.topics.max_events = 8);
    for i in 0..10 {
        let t = if i % 2 == 0 { "even" } else { "odd" };
        engine.publish("t", ev(t, &i.to_string())).await.unwrap();
    }
    // Retained: 3..=10.
    let page = engine.history("t", 0, &[], 3).unwrap();
    assert_eq!(page.first_available, 3);
    let got: Vec<u64> = page.events.iter().map(|e| e.offset).collect();
    assert_eq!((got, page.next_after), (vec![3, 4, 5], 5));
    let mut after = 0;
    let mut all = Vec::new();
    loop {
        let page = engine.history("t", after, &["even".into()], 2).unwrap();
        if page.events.is_empty() {
            break;
        }
        all.extend(page.events.iter().map(|e| e.offset));
        after = page.next_after;
    }
    assert_eq!(all, vec![3, 5, 7, 9]);
    assert!(matches!(
        engine.history("nope", 0, &[], 1),
        Err(EngineError::TopicNotFound(_))
    ));
}

#[tokio::test]
async fn payloads_are_shared_not_copied_per_subscriber() {
    let engine = memory(|_| {});
    engine.create("t").unwrap();
    let mut subs: Vec<_> = (0..3)
        .map(|_| engine.subscribe("t", vec![], Start::Live).unwrap())
        .collect();
    engine
        .publish("t", NewEvent::new("a", Bytes::from(vec![1u8; 1024])))
        .await
        .unwrap();
    let mut events = Vec::new();
    for s in &mut subs {
        match next(s).await {
            Delivery::Event(e) => events.push(e),
            other => panic!("{other:?}"),
        }
    }
    assert!(events.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
    assert_eq!(engine.info("t").unwrap().subscribers, 3);
    drop(subs);
    assert_eq!(engine.info("t").unwrap().subscribers, 0);
}

#[tokio::test]
async fn headers_survive_the_round_trip() {
    let engine = memory(|_| {});
    let e = ev("a", "{}")
        .header("correlation-id", "c1")
        .header("user-id", "u1");
    engine.publish("t", e).await.unwrap();
    let page = engine.history("t", 0, &[], 10).unwrap();
    let headers: HashMap<_, _> = page.events[0].headers.iter().cloned().collect();
    assert_eq!(headers["correlation-id"], "c1");
    assert_eq!(headers["user-id"], "u1");
}
