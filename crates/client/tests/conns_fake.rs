//! Connection management in the SDK (and `ringcast conns`) against a
//! scripted fake broker speaking the real protocol codec over loopback:
//! what goes on the wire for listing (page by page) and closing, and what
//! comes back.

mod common;

use common::{FakeBroker, Peer, WAIT};
use ringcast_client::{Client, ErrorCode, WireConnSubscription, WireConnection};
use ringcast_protocol::{ClientMessage, ServerMessage, PROTOCOL_VERSION};
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

fn connection(id: u64) -> WireConnection {
    WireConnection {
        id,
        kind: "tcp".into(),
        peer: format!("10.0.0.{id}:5000"),
        subject: Some("u1".into()),
        since_ms: 1_700_000_000_000,
        delivered: 12,
        subscriptions: vec![WireConnSubscription {
            topic: "orders".into(),
            subscription_id: Some(1),
            group: None,
            epoch: 9,
            position: 42,
            lag: 8,
            delivered: 12,
        }],
    }
}

impl Peer {
    /// Expects `ListConnections { after }` and answers `page`.
    async fn answer_list(&mut self, after: u64, page: Vec<WireConnection>, next_after: u64) {
        match self.recv().await {
            ClientMessage::ListConnections {
                request_id,
                after: asked,
                limit,
            } => {
                assert_eq!((asked, limit), (after, 0));
                self.send(ServerMessage::Connections {
                    request_id,
                    connections: page,
                    next_after,
                })
                .await;
            }
            other => panic!("expected ListConnections, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn connections_follows_every_page() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = tokio::join!(
        async { Client::connect_with(broker.options()).await.unwrap() },
        broker.accept()
    );
    let (listed, ()) = tokio::join!(client.connections(), async {
        peer.answer_list(0, vec![connection(3), connection(5)], 5)
            .await;
        peer.answer_list(5, vec![connection(8)], 0).await;
    });
    let ids: Vec<u64> = listed.unwrap().iter().map(|c| c.id).collect();
    assert_eq!(ids, [3, 5, 8]);
}

#[tokio::test]
async fn close_connection_sends_the_id_and_reports_an_unknown_one() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = tokio::join!(
        async { Client::connect_with(broker.options()).await.unwrap() },
        broker.accept()
    );
    for (id, known) in [(7, true), (8, false)] {
        let (result, ()) = tokio::join!(client.close_connection(id), async {
            let ClientMessage::CloseConnection {
                request_id,
                connection_id,
            } = peer.recv().await
            else {
                panic!("expected CloseConnection")
            };
            assert_eq!(connection_id, id);
            let reply = if known {
                ServerMessage::Ok { request_id }
            } else {
                ServerMessage::Error {
                    request_id: Some(request_id),
                    code: ErrorCode::ConnectionNotFound,
                    message: format!("no live connection {id}"),
                }
            };
            peer.send(reply).await;
        });
        match known {
            true => result.unwrap(),
            false => assert_eq!(
                result.unwrap_err().code(),
                Some(ErrorCode::ConnectionNotFound)
            ),
        }
    }
}

/// The `ringcast` binary against the fake broker.
#[cfg(feature = "cli")]
mod cli {
    use super::*;
    use serde_json::Value;
    use tokio::process::Command;

    fn ringcast(broker: &FakeBroker, args: &[&str]) -> tokio::process::Child {
        Command::new(env!("CARGO_BIN_EXE_ringcast"))
            .arg("--server")
            .arg(broker.addr())
            .args(args)
            .env_remove("RINGCAST_TOKEN")
            .env_remove("RINGCAST_CREDENTIALS")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// Runs the command to its end: (exit code, stdout, stderr).
    async fn finish(child: tokio::process::Child) -> (i32, String, String) {
        let out = timeout(WAIT, child.wait_with_output())
            .await
            .expect("ringcast did not exit")
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    #[tokio::test]
    async fn conns_prints_a_table_with_a_row_per_connection_and_subscription() {
        let broker = FakeBroker::start().await;
        let child = ringcast(&broker, &["conns"]);
        let mut peer = broker.accept().await;
        peer.answer_list(0, vec![connection(3)], 0).await;
        let (code, out, err) = finish(child).await;
        assert_eq!(code, 0, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            ["ID", "KIND", "PEER", "SUBJECT", "AGE", "DELIVERED", "SUBS"]
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            (row[0], row[1], row[2], row[3], row[5], row[6]),
            ("3", "tcp", "10.0.0.3:5000", "u1", "12", "1")
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            [
                "orders",
                "#1",
                "position",
                "42",
                "lag",
                "8",
                "delivered",
                "12"
            ]
        );
    }

    #[tokio::test]
    async fn conns_json_prints_one_array() {
        let broker = FakeBroker::start().await;
        let child = ringcast(&broker, &["conns", "--json"]);
        let mut peer = broker.accept().await;
        peer.answer_list(0, vec![connection(3), connection(4)], 0)
            .await;
        let (code, out, err) = finish(child).await;
        assert_eq!(code, 0, "{err}");
        let value: Value = serde_json::from_str(out.trim()).unwrap();
        let list = value.as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1]["id"], 4);
        assert_eq!(list[0]["subscriptions"][0]["lag"], 8);
        assert_eq!(list[0]["subject"], "u1");
    }

    #[tokio::test]
    async fn conns_close_and_the_close_flag_close_that_connection() {
        for args in [&["conns", "close", "7"][..], &["conns", "--close", "7"][..]] {
            let broker = FakeBroker::start().await;
            let child = ringcast(&broker, args);
            let mut peer = broker.accept().await;
            let ClientMessage::CloseConnection {
                request_id,
                connection_id: 7,
            } = peer.recv().await
            else {
                panic!("expected CloseConnection of 7 for {args:?}")
            };
            peer.send(ServerMessage::Ok { request_id }).await;
            let (code, out, err) = finish(child).await;
            assert_eq!(code, 0, "{err}");
            let value: Value = serde_json::from_str(out.trim()).unwrap();
            assert_eq!(value, serde_json::json!({"ok": true, "closed": 7}));
        }
    }

    #[tokio::test]
    async fn conns_close_of_a_bad_id_is_a_usage_error() {
        let broker = FakeBroker::start().await;
        let (code, _, err) = finish(ringcast(&broker, &["conns", "close", "abc"])).await;
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("abc"), "{err}");
    }
}
