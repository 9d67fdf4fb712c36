//! Consumer groups through the Rust SDK (`Client::consume`) against the real
//! broker over loopback: work shared by members with each event acked
//! exactly once, redelivery of a dead member's work after `ack_wait` (or at
//! once on a clean leave), lost work surfaced as a gap, and members that
//! keep consuming through cut connections without losing anything.
//!
//! Connections are cut with [`common::proxy::Proxy`], from the reading side
//! (after so many jobs), never on timers.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::proxy::Proxy;
use common::{config, memory_broker, start, within};
use futures::future::select_all;
use ringcast::config::Durability;
use ringcast_client::{
    new_event, Client, ClientOptions, ConsumeOptions, Consumer, ConsumerItem, GapReason,
    GroupOptions, GroupStart, Job, Settled,
};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// A client that reconnects quickly, so that tests spend their time on
/// the re-join and not in backoff.
async fn connect(addr: SocketAddr) -> Client {
    let options = ClientOptions::new(addr.to_string())
        .with_client_name("groups-test")
        .with_reconnect_backoff(Duration::from_millis(5), Duration::from_millis(50));
    Client::connect_with(options)
        .await
        .expect("client connects")
}

fn group_options(ack_wait_ms: u64) -> GroupOptions {
    GroupOptions {
        start: GroupStart::Earliest,
        ack_wait_ms,
        ..GroupOptions::default()
    }
}

async fn consume(client: &Client, topic: &str, group: &str, name: &str, max: u32) -> Consumer {
    client
        .consume(topic, group, ConsumeOptions::new(name).max_in_flight(max))
        .await
        .expect("joins the group")
}

/// The next job, failing the test on a gap, an error, an end or silence.
async fn next_job(consumer: &mut Consumer) -> Job {
    match within(30, consumer.next()).await {
        Some(Ok(ConsumerItem::Job(job))) => job,
        other => panic!("expected a job, got {other:?}"),
    }
}

/// Publishes `count` events to `topic` (payload = their number), pipelined.
async fn publish(client: &Client, topic: &str, count: u64) {
    let mut acks = Vec::new();
    for n in 1..=count {
        acks.push(
            client
                .queue_publish(topic, new_event("job", n.to_string()))
                .await
                .expect("queued"),
        );
    }
    for ack in acks {
        ack.await.expect("published");
    }
}

const APPLIED_ONCE: Settled = Settled {
    applied: 1,
    already_done: 0,
    unknown: 0,
};

/// Awaits `done`, failing the test as soon as one of `members` ends (they
/// only end by panicking).
async fn until_done(done: &Notify, members: Vec<JoinHandle<()>>) {
    tokio::select! {
        () = done.notified() => {}
        (result, i, _) = select_all(members) => {
            match result {
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                other => panic!("member {i} ended early: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_ten_thousand_events_each_acked_exactly_once() {
    const EVENTS: u64 = 10_000;
    const PUBLISHERS: u64 = 4;
    let (broker, _dir) = memory_broker().await;
    let admin = connect(broker.tcp_addr()).await;
    admin
        .create_group("work", "g", group_options(30_000), false)
        .await
        .expect("group created");

    // Offset → the member holding it now; member → offsets it acked.
    let holders: Arc<Mutex<HashMap<u64, usize>>> = Arc::default();
    let acked: Arc<Mutex<Vec<Vec<u64>>>> = Arc::new(Mutex::new(vec![Vec::new(); 3]));
    let done = Arc::new(Notify::new());
    let mut members = Vec::new();
    for member in 0..3 {
        let client = connect(broker.tcp_addr()).await;
        let mut consumer = consume(&client, "work", "g", &format!("w{member}"), 32).await;
        let (holders, acked, done) = (holders.clone(), acked.clone(), done.clone());
        members.push(tokio::spawn(async move {
            let _client = client;
            loop {
                let job = next_job(&mut consumer).await;
                let offset = job.offset();
                assert_eq!(job.attempt(), 1, "offset {offset} was redelivered");
                if let Some(other) = holders.lock().unwrap().insert(offset, member) {
                    panic!("offset {offset} went to member {member} while member {other} held it");
                }
                // Let the others run between receiving and acking.
                tokio::task::yield_now().await;
                let settled = job.ack().await.expect("ack");
                assert_eq!(settled, APPLIED_ONCE, "ack of offset {offset}");
                holders.lock().unwrap().remove(&offset);
                let mut acked = acked.lock().unwrap();
                acked[member].push(offset);
                if acked.iter().map(Vec::len).sum::<usize>() as u64 == EVENTS {
                    done.notify_one();
                }
            }
        }));
    }

    let publisher = connect(broker.tcp_addr()).await;
    let publishing: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let publisher = publisher.clone();
            tokio::spawn(async move { publish(&publisher, "work", EVENTS / PUBLISHERS).await })
        })
        .collect();
    within(120, until_done(&done, members)).await;
    for p in publishing {
        p.await.expect("publisher");
    }

    let acked = acked.lock().unwrap().clone();
    for (member, offsets) in acked.iter().enumerate() {
        assert!(
            !offsets.is_empty(),
            "member {member} got no work: {acked:?}"
        );
    }
    let mut all: Vec<u64> = acked.concat();
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=EVENTS).collect::<Vec<_>>(),
        "each offset acked once"
    );

    let info = admin.group_info("work", "g").await.expect("group info");
    assert_eq!(
        (info.ack_floor, info.pending, info.lag, info.acked),
        (EVENTS, 0, 0, EVENTS)
    );
    assert_eq!(info.redelivered, 0);
    broker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_dead_members_jobs_go_to_another_member_after_ack_wait_as_attempt_two() {
    let (broker, _dir) = memory_broker().await;
    let admin = connect(broker.tcp_addr()).await;
    admin
        .create_group("tasks", "g", group_options(300), false)
        .await
        .unwrap();
    let proxy = Proxy::start(broker.tcp_addr()).await;
    let doomed = connect(proxy.addr()).await;
    let mut a = consume(&doomed, "tasks", "g", "a", 10).await;
    publish(&admin, "tasks", 5).await;
    let mut held = Vec::new();
    for offset in 1..=5 {
        let job = next_job(&mut a).await;
        assert_eq!((job.offset(), job.attempt()), (offset, 1));
        held.push(job);
    }

    // Member a dies: its connection is cut and it cannot come back.
    assert_eq!(proxy.pause().await, 1);
    // Attempts at the death: 1, unless a stall of this test outlasted the
    // 300 ms ack_wait while a was still connected and a took them again.
    let info = within(30, async {
        loop {
            let info = admin.group_info("tasks", "g").await.unwrap();
            if info.members.iter().all(|m| m.sessions == 0) {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let at_death: HashMap<u64, u32> = info
        .pending_sample
        .iter()
        .map(|p| (p.offset, p.attempt))
        .collect();
    assert_eq!(at_death.len(), 5, "{at_death:?}");
    let survivor = connect(broker.tcp_addr()).await;
    let mut b = consume(&survivor, "tasks", "g", "b", 10).await;
    for offset in 1..=5 {
        let job = next_job(&mut b).await;
        assert_eq!(job.offset(), offset);
        assert_eq!(job.attempt(), at_death[&offset] + 1, "offset {offset}");
        assert_eq!(job.ack().await.unwrap(), APPLIED_ONCE);
    }
    let info = admin.group_info("tasks", "g").await.unwrap();
    assert_eq!((info.acked, info.pending), (5, 0));
    let attempts_before: u64 = at_death.values().map(|&a| u64::from(a) - 1).sum();
    assert_eq!(info.redelivered, 5 + attempts_before);

    // Back again, a settles its stale jobs over its new connection: they
    // are done already, which is no error.
    proxy.resume();
    for job in &held {
        let settled = job.ack().await.expect("a late ack is answered");
        assert_eq!(
            settled,
            Settled {
                applied: 0,
                already_done: 1,
                unknown: 0
            }
        );
    }
}

/// Member a takes three jobs and then lets go of them by `release`; b must
/// get them long before the group's 60 s `ack_wait`.
async fn handed_back_at_once(release: impl FnOnce(Consumer, Vec<Job>) -> JoinHandle<()>) {
    let (broker, _dir) = memory_broker().await;
    let admin = connect(broker.tcp_addr()).await;
    admin
        .create_group("tasks", "g", group_options(60_000), false)
        .await
        .unwrap();
    let client = connect(broker.tcp_addr()).await;
    let mut a = consume(&client, "tasks", "g", "a", 10).await;
    publish(&admin, "tasks", 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next_job(&mut a).await);
    }
    let mut b = consume(&client, "tasks", "g", "b", 10).await;
    release(a, held).await.unwrap();
    // `within` (30 s) is well inside ack_wait: only a handback gets here.
    let mut offsets = Vec::new();
    for _ in 0..3 {
        let job = next_job(&mut b).await;
        assert_eq!(job.attempt(), 2);
        offsets.push(job.offset());
        job.ack().await.unwrap();
    }
    offsets.sort_unstable();
    assert_eq!(offsets, [1, 2, 3]);
}

#[tokio::test]
async fn a_clean_leave_hands_unsettled_jobs_to_another_member_at_once() {
    handed_back_at_once(|a, held| {
        tokio::spawn(async move {
            a.leave().await.expect("left");
            drop(held);
        })
    })
    .await;
}

#[tokio::test]
async fn dropping_a_consumer_and_its_jobs_hands_them_back_at_once() {
    handed_back_at_once(|a, held| {
        tokio::spawn(async move {
            drop(a);
            drop(held);
        })
    })
    .await;
}

#[tokio::test]
async fn deleting_the_group_ends_its_members_with_group_not_found() {
    let (broker, _dir) = memory_broker().await;
    let client = connect(broker.tcp_addr()).await;
    client
        .create_group("gone", "g", group_options(30_000), false)
        .await
        .unwrap();
    let mut consumer = consume(&client, "gone", "g", "w", 10).await;
    publish(&client, "gone", 1).await;
    let job = next_job(&mut consumer).await;
    // The member waits for more work when the group goes away.
    client.delete_group("gone", "g").await.unwrap();
    match within(30, consumer.next()).await {
        Some(Err(e)) => assert!(
            e.to_string().contains("group_not_found") || format!("{e:?}").contains("GroupNotFound"),
            "{e:?}"
        ),
        other => panic!("expected the membership to end with group_not_found, got {other:?}"),
    }
    assert!(within(30, consumer.next()).await.is_none());
    assert!(
        job.ack().await.is_err(),
        "settling a job of a deleted group"
    );
}

#[tokio::test]
async fn a_group_behind_retention_gets_one_gap_then_the_retained_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Durability::Memory);
    config.topics.max_events = 10;
    let broker = start(config).await;
    let client = connect(broker.tcp_addr()).await;
    client
        .create_group("short", "g", group_options(30_000), false)
        .await
        .unwrap();
    publish(&client, "short", 30).await;

    let mut consumer = consume(&client, "short", "g", "w", 100).await;
    match within(30, consumer.next()).await {
        Some(Ok(ConsumerItem::Gap(gap))) => {
            assert_eq!(gap.reason, GapReason::Retention);
            assert_eq!((gap.requested, gap.first_available), (0, 21), "{gap:?}");
        }
        other => panic!("expected a retention gap first, got {other:?}"),
    }
    for offset in 21..=30 {
        let job = next_job(&mut consumer).await;
        assert_eq!(job.offset(), offset);
        assert_eq!(job.ack().await.unwrap(), APPLIED_ONCE);
    }
    let info = client.group_info("short", "g").await.unwrap();
    assert_eq!((info.ack_floor, info.lost, info.acked), (30, 20, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_consume_through_cut_connections_and_every_event_is_acked() {
    const EVENTS: u64 = 3_000;
    const CUTS_AFTER: [u64; 3] = [400, 1_200, 2_000];
    let (broker, _dir) = memory_broker().await;
    let admin = connect(broker.tcp_addr()).await;
    // Deliveries lost with a connection come back after this.
    admin
        .create_group("flaky", "g", group_options(500), false)
        .await
        .unwrap();
    publish(&admin, "flaky", EVENTS).await;

    let proxy = Proxy::start(broker.tcp_addr()).await;
    let (received_tx, received) = watch::channel(0u64);
    let received_tx = Arc::new(received_tx);
    let acked: Arc<Mutex<(HashSet<u64>, u64)>> = Arc::default();
    let done = Arc::new(Notify::new());
    let mut members = Vec::new();
    for member in 0..2 {
        let client = connect(proxy.addr()).await;
        let mut consumer = consume(&client, "flaky", "g", &format!("w{member}"), 64).await;
        let (received_tx, acked, done) = (received_tx.clone(), acked.clone(), done.clone());
        members.push(tokio::spawn(async move {
            let _client = client;
            loop {
                let job = next_job(&mut consumer).await;
                received_tx.send_modify(|n| *n += 1);
                // An ack cut off before its answer is sent again on the
                // next connection: it never fails.
                let settled = job.ack().await.expect("ack survives the cut");
                assert_eq!(settled.unknown, 0, "offset {}", job.offset());
                assert_eq!(settled.applied + settled.already_done, 1);
                let mut acked = acked.lock().unwrap();
                acked.0.insert(job.offset());
                acked.1 += settled.applied;
                if acked.0.len() as u64 == EVENTS {
                    done.notify_one();
                }
            }
        }));
    }

    let cutter = {
        let mut received = received.clone();
        async move {
            for threshold in CUTS_AFTER {
                received.wait_for(|n| *n >= threshold).await.unwrap();
                assert!(proxy.cut().await >= 1, "a connection was cut");
            }
            proxy
        }
    };
    let (proxy, ()) = within(120, async {
        tokio::join!(cutter, until_done(&done, members))
    })
    .await;

    let (offsets, applied) = acked.lock().unwrap().clone();
    assert_eq!(offsets.len() as u64, EVENTS);
    // An ack applied just before a cut is answered `already_done` when it
    // goes again, so the callers may see fewer than EVENTS applied; the
    // group counts each event acked once.
    assert!(applied <= EVENTS, "{applied} acks applied");
    let info = admin.group_info("flaky", "g").await.unwrap();
    assert_eq!(
        (info.ack_floor, info.pending, info.acked),
        (EVENTS, 0, EVENTS)
    );
    assert!(
        proxy.connections() >= 2 + 2 * CUTS_AFTER.len(),
        "both members reconnected after each cut: {} connections",
        proxy.connections()
    );
}
