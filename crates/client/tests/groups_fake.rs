//! Consumer groups in the SDK (and the `ringcast group` commands) against a
//! scripted fake broker speaking the real protocol codec over loopback:
//! what goes on the wire for joins and settles, how deliveries, gaps and
//! settle answers come back, and what survives a dropped connection.

mod common;

use std::time::Duration;

use common::{event, FakeBroker, Peer, WAIT};
use ringcast_client::{
    Client, ConsumeOptions, Consumer, ConsumerItem, Error, ErrorCode, GapReason, GroupOptions,
    GroupStart, Job, Settled, WireGap, WireGroupInfo, WirePending,
};
use ringcast_protocol::{ClientMessage, ServerMessage, SettleAction, PROTOCOL_VERSION};
use tokio::time::timeout;

impl FakeBroker {
    /// Accepts a connection and completes the handshake.
    async fn accept(&self) -> Peer {
        let mut peer = self.accept_connection().await;
        match peer.recv().await {
            ClientMessage::Hello {
                protocol_version, ..
            } => assert_eq!(protocol_version, PROTOCOL_VERSION),
            other => panic!("expected Hello, got {other:?}"),
        }
        peer.welcome(0).await;
        peer
    }
}

async fn connected(broker: &FakeBroker) -> (Client, Peer) {
    tokio::join!(
        async { Client::connect_with(broker.options()).await.unwrap() },
        broker.accept()
    )
}

/// A `JoinGroup` as the fake broker read it.
#[derive(Debug)]
struct Join {
    request_id: u64,
    subscription_id: u64,
    topic: String,
    group: String,
    consumer: String,
    max_in_flight: u32,
    create: Option<GroupOptions>,
}

impl Peer {
    async fn expect_join(&mut self) -> Join {
        match self.recv().await {
            ClientMessage::JoinGroup {
                request_id,
                subscription_id,
                topic,
                group,
                consumer,
                max_in_flight,
                create,
            } => Join {
                request_id,
                subscription_id,
                topic,
                group,
                consumer,
                max_in_flight,
                create,
            },
            other => panic!("expected JoinGroup, got {other:?}"),
        }
    }

    /// Reads a `JoinGroup` and accepts it; returns it.
    async fn accept_join(&mut self, epoch: u64) -> Join {
        let join = self.expect_join().await;
        self.send(ServerMessage::Joined {
            request_id: join.request_id,
            subscription_id: join.subscription_id,
            epoch,
        })
        .await;
        join
    }

    /// Reads a `Settle`: (request id, subscription id, offsets, action).
    async fn expect_settle(&mut self) -> (u64, u64, Vec<u64>, SettleAction) {
        match self.recv().await {
            ClientMessage::Settle {
                request_id,
                subscription_id,
                offsets,
                action,
            } => (request_id, subscription_id, offsets, action),
            other => panic!("expected Settle, got {other:?}"),
        }
    }

    async fn settled(&mut self, request_id: u64, applied: u64, already_done: u64, unknown: u64) {
        self.send(ServerMessage::Settled {
            request_id,
            applied,
            already_done,
            unknown,
        })
        .await;
    }

    async fn deliver(&mut self, subscription_id: u64, offset: u64, attempt: u32) {
        self.send(ServerMessage::Delivery {
            subscription_id,
            attempt,
            event: event(offset),
        })
        .await;
    }

    /// Answers the client's next message, which must be a `Ping`: nothing
    /// else was sent before it.
    async fn expect_ping_next(&mut self, client: &Client) {
        let (rtt, ()) = tokio::join!(client.ping(), async {
            match self.recv().await {
                ClientMessage::Ping { request_id } => {
                    self.send(ServerMessage::Pong { request_id }).await
                }
                other => panic!("expected only a Ping, got {other:?}"),
            }
        });
        rtt.unwrap();
    }
}

fn group_info(topic: &str, group: &str, options: GroupOptions) -> WireGroupInfo {
    WireGroupInfo {
        topic: topic.into(),
        group: group.into(),
        dead_letter_topic: options
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}.dlq")),
        options,
        epoch: 7,
        ack_floor: 3,
        next_offset: 6,
        last_offset: 9,
        lag: 4,
        pending: 2,
        in_flight: 1,
        oldest_pending_ms: 1500,
        members: vec![],
        delivered: 8,
        redelivered: 3,
        acked: 3,
        dead_lettered: 1,
        lost: 0,
        pending_sample: vec![WirePending {
            offset: 4,
            attempt: 2,
            consumer: Some("w1".into()),
            due_in_ms: 250,
            first_delivered_ms: 1_700_000_000_000,
        }],
    }
}

/// A consumer joined as `w1` on orders/billing; returns it and its id.
async fn joined(client: &Client, peer: &mut Peer) -> (Consumer, u64) {
    let (consumer, join) = tokio::join!(
        client.consume("orders", "billing", ConsumeOptions::new("w1")),
        peer.accept_join(7)
    );
    (consumer.unwrap(), join.subscription_id)
}

async fn next_job(consumer: &mut Consumer) -> Job {
    match timeout(WAIT, consumer.next()).await.expect("no item") {
        Some(Ok(ConsumerItem::Job(job))) => job,
        other => panic!("expected a job, got {other:?}"),
    }
}

/// The consumer's next item is a `GroupNotFound` error (`what` names it in a
/// failure), and then the consumer ends.
async fn ends_with_group_not_found(consumer: &mut Consumer, what: &str) {
    match timeout(WAIT, consumer.next()).await.unwrap() {
        Some(Err(e)) => assert_eq!(e.code(), Some(ErrorCode::GroupNotFound), "{e}"),
        other => panic!("expected {what}, got {other:?}"),
    }
    assert!(timeout(WAIT, consumer.next()).await.unwrap().is_none());
}

#[tokio::test]
async fn consume_joins_with_its_options_and_yields_jobs_and_gaps_in_order() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let create = GroupOptions {
        ack_wait_ms: 300,
        ..GroupOptions::default()
    };
    let options = ConsumeOptions::new("worker-1")
        .max_in_flight(8)
        .create(create.clone());
    let (consumer, join) = tokio::join!(
        client.consume("orders", "billing", options),
        peer.accept_join(42)
    );
    let mut consumer = consumer.unwrap();
    assert_eq!(
        (
            join.topic.as_str(),
            join.group.as_str(),
            join.consumer.as_str()
        ),
        ("orders", "billing", "worker-1")
    );
    assert_eq!((join.max_in_flight, join.create), (8, Some(create)));
    assert_eq!(consumer.epoch(), 42);
    assert_eq!(
        (consumer.topic(), consumer.group(), consumer.consumer()),
        ("orders", "billing", "worker-1")
    );

    let id = join.subscription_id;
    peer.deliver(id, 1, 1).await;
    let gap = WireGap {
        topic: "orders".into(),
        event_type: None,
        reason: GapReason::Retention,
        epoch: 42,
        requested: 1,
        first_available: 5,
        current: 9,
    };
    peer.send(ServerMessage::Gap {
        subscription_id: id,
        gap: gap.clone(),
    })
    .await;
    peer.deliver(id, 5, 3).await;

    let first = next_job(&mut consumer).await;
    assert_eq!((first.offset(), first.attempt()), (1, 1));
    assert_eq!(first.event(), &event(1));
    match timeout(WAIT, consumer.next()).await.unwrap() {
        Some(Ok(ConsumerItem::Gap(g))) => assert_eq!(g, gap),
        other => panic!("expected the gap, got {other:?}"),
    }
    let second = next_job(&mut consumer).await;
    assert_eq!((second.offset(), second.attempt()), (5, 3));

    let (settled, ()) = tokio::join!(first.ack(), async {
        let (request_id, sub, offsets, action) = peer.expect_settle().await;
        assert_eq!((sub, offsets, action), (id, vec![1], SettleAction::Ack));
        peer.settled(request_id, 1, 0, 0).await;
    });
    assert_eq!(
        settled.unwrap(),
        Settled {
            applied: 1,
            already_done: 0,
            unknown: 0
        }
    );
}

#[tokio::test]
async fn each_settle_goes_on_the_wire_as_asked() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (mut consumer, id) = joined(&client, &mut peer).await;
    peer.deliver(id, 3, 1).await;
    let job = next_job(&mut consumer).await;

    let (settled, ()) = tokio::join!(job.nack(Some(Duration::from_millis(1500))), async {
        let (request_id, _, offsets, action) = peer.expect_settle().await;
        assert_eq!((offsets, action), (vec![3], SettleAction::Nack(Some(1500))));
        peer.settled(request_id, 1, 0, 0).await;
    });
    assert_eq!(settled.unwrap().applied, 1);
    let (settled, ()) = tokio::join!(job.nack(None), async {
        let (request_id, _, _, action) = peer.expect_settle().await;
        assert_eq!(action, SettleAction::Nack(None));
        peer.settled(request_id, 0, 0, 1).await;
    });
    assert_eq!(settled.unwrap().unknown, 1);
    let (settled, ()) = tokio::join!(job.in_progress(), async {
        let (request_id, _, _, action) = peer.expect_settle().await;
        assert_eq!(action, SettleAction::InProgress);
        peer.settled(request_id, 1, 0, 0).await;
    });
    assert_eq!(settled.unwrap().applied, 1);
    let (settled, ()) = tokio::join!(job.term("malformed"), async {
        let (request_id, _, _, action) = peer.expect_settle().await;
        assert_eq!(action, SettleAction::Term("malformed".into()));
        peer.settled(request_id, 0, 1, 0).await;
    });
    assert_eq!(settled.unwrap().already_done, 1);
}

#[tokio::test]
async fn after_a_reconnect_the_member_joins_again_and_an_ack_in_flight_goes_again() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (mut consumer, id) = joined(&client, &mut peer).await;
    peer.deliver(id, 4, 1).await;
    let job = next_job(&mut consumer).await;

    let ack = tokio::spawn(async move { job.ack().await });
    let (_, sub, offsets, _) = peer.expect_settle().await;
    assert_eq!((sub, offsets), (id, vec![4]));
    // The connection drops before the answer.
    drop(peer);

    let mut peer = broker.accept().await;
    let join = peer.accept_join(7).await;
    assert_eq!(join.subscription_id, id, "the same membership id");
    assert_eq!(join.consumer, "w1", "the same consumer name");
    let (request_id, sub, offsets, action) = peer.expect_settle().await;
    assert_eq!((sub, offsets, action), (id, vec![4], SettleAction::Ack));
    peer.settled(request_id, 0, 1, 0).await;
    let settled = timeout(WAIT, ack).await.unwrap().unwrap().unwrap();
    assert_eq!(settled.already_done, 1);

    // Deliveries of the new session reach the same consumer.
    peer.deliver(id, 5, 2).await;
    let job = next_job(&mut consumer).await;
    assert_eq!((job.offset(), job.attempt()), (5, 2));
}

#[tokio::test]
async fn a_job_settled_while_disconnected_is_settled_after_the_join_again() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (mut consumer, id) = joined(&client, &mut peer).await;
    peer.deliver(id, 8, 1).await;
    let job = next_job(&mut consumer).await;
    drop(peer);
    // Issued while the client is (or is about to be) reconnecting.
    let ack = tokio::spawn(async move { job.ack().await });

    let mut peer = broker.accept().await;
    let join = peer.accept_join(7).await;
    assert_eq!(join.subscription_id, id);
    let (request_id, sub, offsets, _) = peer.expect_settle().await;
    assert_eq!((sub, offsets), (id, vec![8]));
    peer.settled(request_id, 1, 0, 0).await;
    assert_eq!(
        timeout(WAIT, ack).await.unwrap().unwrap().unwrap().applied,
        1
    );
}

#[tokio::test]
async fn a_nack_in_flight_at_a_loss_fails_and_is_not_sent_again() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (mut consumer, id) = joined(&client, &mut peer).await;
    peer.deliver(id, 2, 1).await;
    let job = next_job(&mut consumer).await;

    let nack = tokio::spawn(async move { job.nack(None).await });
    let _ = peer.expect_settle().await;
    drop(peer);
    let result = timeout(WAIT, nack).await.unwrap().unwrap();
    assert!(
        matches!(result, Err(Error::ConnectionLost)),
        "got {result:?}"
    );

    let mut peer = broker.accept().await;
    peer.accept_join(7).await;
    peer.expect_ping_next(&client).await;
}

#[tokio::test]
async fn dropping_the_consumer_leaves_the_group_even_while_a_job_lives() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (mut consumer, id) = joined(&client, &mut peer).await;
    peer.deliver(id, 1, 1).await;
    let job = next_job(&mut consumer).await;

    // Nobody reads the consumer any more: it must not keep taking work.
    drop(consumer);
    match peer.recv().await {
        ClientMessage::LeaveGroup {
            subscription_id, ..
        } => assert_eq!(subscription_id, id),
        other => panic!("expected LeaveGroup, got {other:?}"),
    }
    drop(job);
    // The job's drop sends nothing more.
    peer.expect_ping_next(&client).await;
}

#[tokio::test]
async fn leave_waits_for_the_brokers_answer() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (consumer, id) = joined(&client, &mut peer).await;
    let (left, ()) = tokio::join!(consumer.leave(), async {
        match peer.recv().await {
            ClientMessage::LeaveGroup {
                request_id,
                subscription_id,
            } => {
                assert_eq!(subscription_id, id);
                peer.send(ServerMessage::Unsubscribed {
                    request_id,
                    subscription_id,
                })
                .await;
            }
            other => panic!("expected LeaveGroup, got {other:?}"),
        }
    });
    left.unwrap();
}

#[tokio::test]
async fn joining_a_missing_group_fails_with_the_brokers_code() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (consumer, ()) = tokio::join!(
        client.consume("orders", "nope", ConsumeOptions::new("w1")),
        async {
            let join = peer.expect_join().await;
            assert_eq!(join.create, None);
            peer.send(ServerMessage::Error {
                request_id: Some(join.request_id),
                code: ErrorCode::GroupNotFound,
                message: "no group orders/nope".into(),
            })
            .await;
        }
    );
    let err = consumer.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::GroupNotFound), "{err}");
}

#[tokio::test]
async fn a_refused_join_after_a_reconnect_ends_the_consumer_with_the_error() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (mut consumer, _) = joined(&client, &mut peer).await;
    drop(peer);
    let mut peer = broker.accept().await;
    let join = peer.expect_join().await;
    peer.send(ServerMessage::Error {
        request_id: Some(join.request_id),
        code: ErrorCode::GroupNotFound,
        message: "the group was deleted".into(),
    })
    .await;
    ends_with_group_not_found(&mut consumer, "the broker's error").await;
}

#[tokio::test]
async fn an_end_from_the_broker_ends_the_consumer_with_group_not_found() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (mut consumer, id) = joined(&client, &mut peer).await;
    peer.send(ServerMessage::End {
        subscription_id: id,
        topic: "orders".into(),
        last_offset: 9,
    })
    .await;
    ends_with_group_not_found(&mut consumer, "the end of the membership").await;
}

#[tokio::test]
async fn admin_requests_carry_their_arguments_and_return_the_brokers_answers() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let options = GroupOptions {
        start: GroupStart::Live,
        max_deliver: 2,
        ..GroupOptions::default()
    };

    let (info, ()) = tokio::join!(
        client.create_group("orders", "billing", options.clone(), true),
        async {
            match peer.recv().await {
                ClientMessage::CreateGroup {
                    request_id,
                    topic,
                    group,
                    options: o,
                    update,
                } => {
                    assert_eq!(
                        (topic.as_str(), group.as_str(), update),
                        ("orders", "billing", true)
                    );
                    assert_eq!(o.max_deliver, 2);
                    peer.send(ServerMessage::GroupInfo {
                        request_id,
                        info: group_info("orders", "billing", o),
                    })
                    .await;
                }
                other => panic!("expected CreateGroup, got {other:?}"),
            }
        }
    );
    assert_eq!(
        info.unwrap(),
        group_info("orders", "billing", options.clone())
    );

    let (info, ()) = tokio::join!(client.group_info("orders", "billing"), async {
        let ClientMessage::GroupInfo {
            request_id,
            topic,
            group,
        } = peer.recv().await
        else {
            panic!("expected GroupInfo")
        };
        assert_eq!((topic.as_str(), group.as_str()), ("orders", "billing"));
        peer.send(ServerMessage::GroupInfo {
            request_id,
            info: group_info("orders", "billing", GroupOptions::default()),
        })
        .await;
    });
    assert_eq!(info.unwrap().pending_sample[0].offset, 4);

    let (groups, ()) = tokio::join!(client.groups("orders"), async {
        let ClientMessage::ListGroups { request_id, topic } = peer.recv().await else {
            panic!("expected ListGroups")
        };
        assert_eq!(topic, "orders");
        peer.send(ServerMessage::Groups {
            request_id,
            groups: vec![group_info("orders", "a", GroupOptions::default())],
        })
        .await;
    });
    assert_eq!(groups.unwrap()[0].group, "a");

    let (count, ()) = tokio::join!(client.redrive("orders", "billing"), async {
        let ClientMessage::Redrive { request_id, .. } = peer.recv().await else {
            panic!("expected Redrive")
        };
        peer.send(ServerMessage::Redriven {
            request_id,
            count: 3,
        })
        .await;
    });
    assert_eq!(count.unwrap(), 3);

    let (deleted, ()) = tokio::join!(client.delete_group("orders", "billing"), async {
        let ClientMessage::DeleteGroup {
            request_id, group, ..
        } = peer.recv().await
        else {
            panic!("expected DeleteGroup")
        };
        assert_eq!(group, "billing");
        peer.send(ServerMessage::Error {
            request_id: Some(request_id),
            code: ErrorCode::Forbidden,
            message: "admin only".into(),
        })
        .await;
    });
    assert_eq!(deleted.unwrap_err().code(), Some(ErrorCode::Forbidden));
}

/// The `ringcast` binary against the fake broker.
#[cfg(feature = "cli")]
mod cli {
    use super::*;
    use serde_json::{json, Value};
    use tokio::process::Command;

    fn ringcast(broker: &FakeBroker, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringcast"));
        cmd.arg("--server")
            .arg(broker.addr())
            .args(args)
            .env_remove("RINGCAST_TOKEN")
            .env_remove("RINGCAST_CREDENTIALS")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs the command to its end; (exit code, stdout lines as JSON).
    async fn finish(child: tokio::process::Child) -> (i32, Vec<Value>) {
        let out = timeout(WAIT, child.wait_with_output())
            .await
            .expect("ringcast did not exit")
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let lines = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        (out.status.code().unwrap_or(-1), lines)
    }

    #[tokio::test]
    async fn group_create_sends_the_settings_given_and_prints_the_group() {
        let broker = FakeBroker::start().await;
        let child = ringcast(
            &broker,
            &[
                "group",
                "create",
                "orders",
                "billing",
                "--start",
                "live",
                "--ack-wait",
                "300ms",
                "--backoff",
                "1s,5s",
                "--max-deliver",
                "3",
            ],
        )
        .spawn()
        .unwrap();
        let mut peer = broker.accept().await;
        match peer.recv().await {
            ClientMessage::CreateGroup {
                request_id,
                topic,
                group,
                options,
                update,
            } => {
                assert_eq!(
                    (topic.as_str(), group.as_str(), update),
                    ("orders", "billing", false)
                );
                assert_eq!(
                    options,
                    GroupOptions {
                        start: GroupStart::Live,
                        ack_wait_ms: 300,
                        max_deliver: 3,
                        backoff_ms: vec![1000, 5000],
                        ..GroupOptions::default()
                    }
                );
                peer.send(ServerMessage::GroupInfo {
                    request_id,
                    info: group_info("orders", "billing", options),
                })
                .await;
            }
            other => panic!("expected CreateGroup, got {other:?}"),
        }
        let (code, lines) = finish(child).await;
        assert_eq!(code, 0);
        let [line] = &lines[..] else {
            panic!("one line expected: {lines:?}")
        };
        assert_eq!(line["group"], "billing");
        assert_eq!(line["options"]["start"], "live");
        assert_eq!(line["options"]["backoff_ms"], json!([1000, 5000]));
        assert_eq!(line["dead_letter_topic"], "orders.dlq");
        assert_eq!(line["pending_sample"][0]["consumer"], "w1");
    }

    #[tokio::test]
    async fn group_update_keeps_the_settings_not_given() {
        let broker = FakeBroker::start().await;
        let child = ringcast(
            &broker,
            &[
                "group",
                "create",
                "orders",
                "billing",
                "--update",
                "--max-deliver",
                "9",
            ],
        )
        .spawn()
        .unwrap();
        let mut peer = broker.accept().await;
        let current = GroupOptions {
            ack_wait_ms: 1234,
            backoff_ms: vec![7],
            ..GroupOptions::default()
        };
        let ClientMessage::GroupInfo { request_id, .. } = peer.recv().await else {
            panic!("expected GroupInfo first")
        };
        peer.send(ServerMessage::GroupInfo {
            request_id,
            info: group_info("orders", "billing", current.clone()),
        })
        .await;
        match peer.recv().await {
            ClientMessage::CreateGroup {
                request_id,
                options,
                update,
                ..
            } => {
                assert!(update);
                assert_eq!(
                    options,
                    GroupOptions {
                        max_deliver: 9,
                        ..current
                    }
                );
                peer.send(ServerMessage::GroupInfo {
                    request_id,
                    info: group_info("orders", "billing", options),
                })
                .await;
            }
            other => panic!("expected CreateGroup, got {other:?}"),
        }
        let (code, lines) = finish(child).await;
        assert_eq!(code, 0);
        assert_eq!(lines[0]["options"]["max_deliver"], 9);
    }

    #[tokio::test]
    async fn group_consume_prints_each_job_then_acks_it_and_leaves_at_the_end() {
        let broker = FakeBroker::start().await;
        let child = ringcast(
            &broker,
            &[
                "group",
                "consume",
                "orders",
                "billing",
                "--consumer",
                "w9",
                "--count",
                "2",
            ],
        )
        .spawn()
        .unwrap();
        let mut peer = broker.accept().await;
        let join = peer.accept_join(5).await;
        assert_eq!((join.consumer.as_str(), join.max_in_flight), ("w9", 2));
        let id = join.subscription_id;
        peer.deliver(id, 10, 1).await;
        peer.deliver(id, 11, 2).await;
        for offset in [10, 11] {
            let (request_id, sub, offsets, action) = peer.expect_settle().await;
            assert_eq!(
                (sub, offsets, action),
                (id, vec![offset], SettleAction::Ack)
            );
            peer.settled(request_id, 1, 0, 0).await;
        }
        match peer.recv().await {
            ClientMessage::LeaveGroup {
                request_id,
                subscription_id,
            } => {
                peer.send(ServerMessage::Unsubscribed {
                    request_id,
                    subscription_id,
                })
                .await
            }
            other => panic!("expected LeaveGroup, got {other:?}"),
        }
        let (code, lines) = finish(child).await;
        assert_eq!(code, 0);
        let seen: Vec<(Value, Value, Value)> = lines
            .iter()
            .map(|l| {
                (
                    l["offset"].clone(),
                    l["attempt"].clone(),
                    l["epoch"].clone(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (json!(10), json!(1), json!(5)),
                (json!(11), json!(2), json!(5))
            ]
        );
    }

    #[tokio::test]
    async fn a_missing_group_is_a_one_line_error_and_exit_code_1() {
        let broker = FakeBroker::start().await;
        let child = ringcast(&broker, &["group", "info", "orders", "nope"])
            .spawn()
            .unwrap();
        let mut peer = broker.accept().await;
        let ClientMessage::GroupInfo { request_id, .. } = peer.recv().await else {
            panic!("expected GroupInfo")
        };
        peer.send(ServerMessage::Error {
            request_id: Some(request_id),
            code: ErrorCode::GroupNotFound,
            message: "no group orders/nope".into(),
        })
        .await;
        let out = timeout(WAIT, child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            stderr.trim_end(),
            "ringcast: describing group nope of orders: no group orders/nope (group_not_found)"
        );
    }
}
