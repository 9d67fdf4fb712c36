//! Connection management over real loopback sockets: the registry as the
//! HTTP API (`/v1/connections`, `/v1/stats`) and the TCP admin messages
//! (`ListConnections`, `CloseConnection`) show it, closing one connection
//! cleanly while the SDK resumes exactly, and admin-only access.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::auth::{claims, hs256, hs256_config, token};
use common::http::send_json;
use common::{config, expect_error, memory_broker, within, RawClient};
use reqwest::{Method, StatusCode};
use ringcast::broker::Broker;
use ringcast::config::Durability;
use ringcast::engine::NewEvent;
use ringcast_client::{Client, ClientOptions, Delivery, Subscription};
use ringcast_protocol::{ClientMessage, ErrorCode, ServerMessage, Start};
use serde_json::{json, Value};

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// `method path` on the broker's HTTP listener with an optional bearer token.
async fn call(
    broker: &Broker,
    method: Method,
    path: &str,
    bearer: Option<&str>,
) -> (StatusCode, Value) {
    let url = format!("http://{}{path}", broker.http_addr());
    let mut request = http().request(method, url);
    if let Some(t) = bearer {
        request = request.bearer_auth(t);
    }
    send_json(request, 20).await
}

async fn list(broker: &Broker) -> Vec<Value> {
    let (status, body) = call(broker, Method::GET, "/v1/connections", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["connections"].as_array().expect("a list").clone()
}

/// The listed connection whose peer is `addr`.
fn by_peer(list: &[Value], addr: SocketAddr) -> Value {
    list.iter()
        .find(|c| c["peer"] == addr.to_string())
        .unwrap_or_else(|| panic!("no connection from {addr} in {list:?}"))
        .clone()
}

async fn publish(broker: &Broker, topic: &str, event_type: &str, n: u64) -> u64 {
    let ack = broker
        .engine()
        .publish(topic, NewEvent::new(event_type, format!("{{\"n\":{n}}}")))
        .await
        .expect("publish");
    ack.offset
}

/// Subscribes a raw client to `topic` (types `types`) and awaits `Subscribed`.
async fn raw_subscriber(broker: &Broker, topic: &str, sid: u64, types: &[&str]) -> RawClient {
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    c.send(&ClientMessage::Subscribe {
        request_id: 1,
        subscription_id: sid,
        topic: topic.into(),
        types: types.iter().map(|t| t.to_string()).collect(),
        start: Start::Earliest,
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::Subscribed { .. }) => c,
        other => panic!("expected Subscribed, got {other:?}"),
    }
}

/// Awaits the raw client's events at exactly `offsets`.
async fn raw_events(c: &mut RawClient, offsets: std::ops::RangeInclusive<u64>) {
    for offset in offsets {
        match c.recv().await {
            Some(ServerMessage::Event { event, .. }) => assert_eq!(event.offset, offset),
            other => panic!("expected the event at {offset}, got {other:?}"),
        }
    }
}

async fn sdk_events(sub: &mut Subscription, offsets: std::ops::RangeInclusive<u64>) {
    for offset in offsets {
        match within(30, sub.next_delivery()).await {
            Some(Ok(Delivery::Event(e))) => assert_eq!(e.offset, offset, "{e:?}"),
            other => panic!("expected the event at {offset}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_listing_shows_a_tcp_connection_with_its_subscription_position_and_lag() {
    let (broker, _dir) = memory_broker().await;
    let mut c = raw_subscriber(&broker, "orders", 9, &["created"]).await;
    let me = c.stream.local_addr().unwrap();
    for n in 1..=3 {
        publish(&broker, "orders", "created", n).await;
    }
    raw_events(&mut c, 1..=3).await;

    let conn = by_peer(&list(&broker).await, me);
    assert_eq!(conn["kind"], "tcp");
    assert_eq!(conn["subject"], Value::Null, "auth is off");
    assert_eq!(conn["delivered"], 3);
    assert!(conn["since_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let epoch = broker.engine().info("orders").unwrap().epoch.to_string();
    let subs = conn["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(
        subs[0],
        json!({"topic": "orders", "subscription_id": 9, "group": null, "epoch": epoch,
               "position": 3, "lag": 0, "delivered": 3})
    );

    // An event the subscription filters out is never delivered: the topic
    // moves on, the position does not, and the lag counts it.
    assert_eq!(publish(&broker, "orders", "paid", 4).await, 4);
    let id = conn["id"].as_u64().unwrap();
    let (status, one) = call(&broker, Method::GET, &format!("/v1/connections/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["id"], id);
    assert_eq!(one["subscriptions"][0]["position"], 3);
    assert_eq!(one["subscriptions"][0]["lag"], 1);

    // Unsubscribed: listed without it, its deliveries still counted.
    c.send(&ClientMessage::Unsubscribe {
        request_id: 2,
        subscription_id: 9,
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Unsubscribed { .. })
    ));
    let conn = by_peer(&list(&broker).await, me);
    assert_eq!(conn["subscriptions"], json!([]));
    assert_eq!(conn["delivered"], 3);
}

#[tokio::test]
async fn a_group_membership_is_listed_as_a_subscription_of_its_group() {
    let (broker, _dir) = memory_broker().await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    c.send(&ClientMessage::JoinGroup {
        request_id: 1,
        subscription_id: 3,
        topic: "jobs".into(),
        group: "workers".into(),
        consumer: "w1".into(),
        max_in_flight: 0,
        create: Some(ringcast_protocol::GroupOptions::default()),
    })
    .await;
    assert!(matches!(c.recv().await, Some(ServerMessage::Joined { .. })));
    for n in 1..=2 {
        publish(&broker, "jobs", "created", n).await;
    }
    for offset in 1..=2 {
        match c.recv().await {
            Some(ServerMessage::Delivery { event, .. }) => assert_eq!(event.offset, offset),
            other => panic!("expected the delivery of {offset}, got {other:?}"),
        }
    }
    let conn = by_peer(&list(&broker).await, c.stream.local_addr().unwrap());
    let sub = &conn["subscriptions"][0];
    assert_eq!(
        (&sub["topic"], &sub["subscription_id"], &sub["group"]),
        (&json!("jobs"), &json!(3), &json!("workers"))
    );
    assert_eq!(
        (&sub["position"], &sub["lag"], &sub["delivered"]),
        (&json!(2), &json!(0), &json!(2))
    );
}

#[tokio::test]
async fn unknown_and_malformed_connection_ids_get_404_and_400() {
    let (broker, _dir) = memory_broker().await;
    for method in [Method::GET, Method::DELETE] {
        let (status, body) = call(&broker, method.clone(), "/v1/connections/987654321", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {body}");
        assert_eq!(body["error"]["code"], "connection_not_found");
        for bad in ["abc", "-1", "1.5", "18446744073709551616"] {
            let (status, body) = call(
                &broker,
                method.clone(),
                &format!("/v1/connections/{bad}"),
                None,
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {bad}: {body}");
            assert_eq!(body["error"]["code"], "invalid_connection_id");
        }
    }
}

#[tokio::test]
async fn a_closed_connection_is_told_shutdown_and_closed_while_another_keeps_working() {
    let (broker, _dir) = memory_broker().await;
    let mut closed = raw_subscriber(&broker, "orders", 1, &[]).await;
    let mut kept = raw_subscriber(&broker, "orders", 1, &[]).await;
    let victim = by_peer(&list(&broker).await, closed.stream.local_addr().unwrap());
    let id = victim["id"].as_u64().unwrap();

    let (status, body) = call(
        &broker,
        Method::DELETE,
        &format!("/v1/connections/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    match closed.recv().await {
        Some(ServerMessage::Shutdown { reason }) => {
            assert!(reason.contains("administrator"), "{reason}")
        }
        other => panic!("expected Shutdown, got {other:?}"),
    }
    closed.expect_closed().await;

    // Gone from the listing as soon as the DELETE answered.
    let (status, _) = call(&broker, Method::GET, &format!("/v1/connections/{id}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(
        &broker,
        Method::DELETE,
        &format!("/v1/connections/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "closing twice");

    publish(&broker, "orders", "created", 1).await;
    raw_events(&mut kept, 1..=1).await;
    kept.send(&ClientMessage::Ping { request_id: 5 }).await;
    assert_eq!(
        kept.recv().await,
        Some(ServerMessage::Pong { request_id: 5 })
    );
}

#[tokio::test]
async fn an_sdk_subscriber_closed_by_an_operator_resumes_with_every_event_exactly_once() {
    let (broker, _dir) = memory_broker().await;
    let options = ClientOptions::new(broker.tcp_addr().to_string())
        .with_reconnect_backoff(Duration::from_millis(5), Duration::from_millis(50));
    let client = Client::connect_with(options).await.unwrap();
    let mut sub = client.subscribe("orders").earliest().send().await.unwrap();
    let mut other = raw_subscriber(&broker, "orders", 1, &[]).await;
    let other_addr = other.stream.local_addr().unwrap();

    for n in 1..=3 {
        publish(&broker, "orders", "created", n).await;
    }
    sdk_events(&mut sub, 1..=3).await;
    raw_events(&mut other, 1..=3).await;

    let before = list(&broker).await;
    assert_eq!(before.len(), 2);
    let sdk_conn = before
        .iter()
        .find(|c| c["peer"] != other_addr.to_string())
        .unwrap()
        .clone();
    assert_eq!(sdk_conn["subscriptions"][0]["position"], 3);
    let old_id = sdk_conn["id"].as_u64().unwrap();
    let (status, _) = call(
        &broker,
        Method::DELETE,
        &format!("/v1/connections/{old_id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // Published while the client reconnects: it resumes after offset 3.
    for n in 4..=6 {
        publish(&broker, "orders", "created", n).await;
    }
    sdk_events(&mut sub, 4..=6).await;
    publish(&broker, "orders", "created", 7).await;
    sdk_events(&mut sub, 7..=7).await;
    // The other connection saw nothing of it.
    raw_events(&mut other, 4..=7).await;

    let after = list(&broker).await;
    assert_eq!(after.len(), 2, "{after:?}");
    let resumed = after
        .iter()
        .find(|c| c["peer"] != other_addr.to_string())
        .unwrap();
    let new_id = resumed["id"].as_u64().unwrap();
    assert!(new_id > old_id, "a new connection, a new id: {new_id}");
    assert_eq!(resumed["subscriptions"][0]["position"], 7);
    assert_eq!(resumed["delivered"], 4, "4..=7 on the new connection");
    assert_eq!(
        by_peer(&after, other_addr)["id"],
        by_peer(&before, other_addr)["id"]
    );
    client.close().await.unwrap();
}

#[tokio::test]
async fn the_tcp_admin_messages_list_and_close_connections() {
    let (broker, _dir) = memory_broker().await;
    let mut admin = RawClient::handshake(broker.tcp_addr()).await;
    let mut target = raw_subscriber(&broker, "orders", 4, &[]).await;
    let target_addr = target.stream.local_addr().unwrap().to_string();

    admin
        .send(&ClientMessage::ListConnections {
            request_id: 7,
            after: 0,
            limit: 0,
        })
        .await;
    let Some(ServerMessage::Connections {
        request_id: 7,
        connections,
        next_after: 0,
    }) = admin.recv().await
    else {
        panic!("expected Connections");
    };
    assert_eq!(connections.len(), 2);
    let t = connections.iter().find(|c| c.peer == target_addr).unwrap();
    assert_eq!((t.kind.as_str(), t.subscriptions.len()), ("tcp", 1));
    assert_eq!(t.subscriptions[0].subscription_id, Some(4));

    // Paged one at a time: the first page says where to go on.
    admin
        .send(&ClientMessage::ListConnections {
            request_id: 8,
            after: 0,
            limit: 1,
        })
        .await;
    let Some(ServerMessage::Connections {
        connections: first,
        next_after,
        ..
    }) = admin.recv().await
    else {
        panic!("expected Connections");
    };
    assert_eq!(first.len(), 1);
    assert_eq!(next_after, first[0].id);

    admin
        .send(&ClientMessage::CloseConnection {
            request_id: 9,
            connection_id: u64::MAX,
        })
        .await;
    expect_error(&mut admin, Some(9), ErrorCode::ConnectionNotFound).await;
    admin
        .send(&ClientMessage::CloseConnection {
            request_id: 10,
            connection_id: t.id,
        })
        .await;
    assert_eq!(
        admin.recv().await,
        Some(ServerMessage::Ok { request_id: 10 })
    );
    assert!(matches!(
        target.recv().await,
        Some(ServerMessage::Shutdown { .. })
    ));
    target.expect_closed().await;

    // The SDK's methods over the same messages.
    let client = Client::connect(broker.tcp_addr().to_string())
        .await
        .unwrap();
    let listed = client.connections().await.unwrap();
    assert!(listed.iter().all(|c| c.id != t.id));
    let err = client.close_connection(t.id).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ConnectionNotFound), "{err}");
    client.close().await.unwrap();
}

#[tokio::test]
async fn a_version_4_client_cannot_send_the_version_5_messages() {
    let (broker, _dir) = memory_broker().await;
    let mut c = RawClient::connect(broker.tcp_addr()).await;
    c.send(&ClientMessage::Hello {
        protocol_version: 4,
        client_name: "old".into(),
        credentials: None,
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Welcome { .. })
    ));
    c.send(&ClientMessage::ListConnections {
        request_id: 1,
        after: 0,
        limit: 0,
    })
    .await;
    expect_error(&mut c, None, ErrorCode::BadFrame).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn stats_count_connections_subscriptions_topics_and_deliveries() {
    let (broker, _dir) = memory_broker().await;
    let mut c = raw_subscriber(&broker, "orders", 1, &[]).await;
    let _idle = RawClient::handshake(broker.tcp_addr()).await;
    for n in 1..=3 {
        publish(&broker, "orders", "created", n).await;
    }
    publish(&broker, "billing", "created", 1).await;
    raw_events(&mut c, 1..=3).await;

    let (status, stats) = call(&broker, Method::GET, "/v1/stats", None).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(
        stats["connections"],
        json!({"total": 2, "tcp": 2, "sse": 0, "opened_total": 2})
    );
    assert_eq!(
        stats["subscriptions"],
        json!({"total": 1, "tcp": 1, "sse": 0})
    );
    assert_eq!(stats["subscribers"], 1);
    assert_eq!(stats["topics"], 2);
    assert_eq!(stats["retained_events"], 4);
    assert!(stats["retained_bytes"].as_u64().unwrap() > 0);
    assert_eq!(stats["delivered_total"], 3);

    // Deliveries of closed connections stay counted (DELETE answers once
    // the connection is gone).
    let id = by_peer(&list(&broker).await, c.stream.local_addr().unwrap())["id"].clone();
    let (status, _) = call(
        &broker,
        Method::DELETE,
        &format!("/v1/connections/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, stats) = call(&broker, Method::GET, "/v1/stats", None).await;
    assert_eq!(stats["connections"]["tcp"], 1);
    assert_eq!(stats["subscriptions"]["tcp"], 0);
    assert_eq!(stats["delivered_total"], 3);
}

#[tokio::test]
async fn connection_management_is_admin_only_when_auth_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = hs256_config(config(dir.path(), Durability::Memory), dir.path());
    let broker = common::start(config).await;
    let user = token("u1", &["orders.*"], 300);
    let topic_admin = hs256(&json!({
        "sub": "ops-orders",
        "aud": common::auth::AUDIENCE,
        "exp": ringcast::auth::unix_now() + 300,
        "ringcast": {"subscribe": ["orders.*"], "admin": ["orders.*"]},
    }));
    let admin = hs256(&claims("ops", 300, &[], &[], true));

    // A user's connection, listed with its subject.
    let mut c = RawClient::connect(broker.tcp_addr()).await;
    c.send(&ClientMessage::Hello {
        protocol_version: ringcast_protocol::PROTOCOL_VERSION,
        client_name: "user".into(),
        credentials: Some(user.clone()),
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Welcome { .. })
    ));
    let id = {
        let (status, body) = call(&broker, Method::GET, "/v1/connections", Some(&admin)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let conn = by_peer(
            body["connections"].as_array().unwrap(),
            c.stream.local_addr().unwrap(),
        );
        assert_eq!(conn["subject"], "u1");
        conn["id"].as_u64().unwrap()
    };

    let routes = [
        (Method::GET, "/v1/connections".to_owned()),
        (Method::GET, format!("/v1/connections/{id}")),
        (Method::DELETE, format!("/v1/connections/{id}")),
        (Method::GET, "/v1/stats".to_owned()),
    ];
    for (method, path) in &routes {
        let (status, body) = call(&broker, method.clone(), path, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
        for who in [&user, &topic_admin] {
            let (status, body) = call(&broker, method.clone(), path, Some(who)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
            assert_eq!(body["error"]["code"], "forbidden");
        }
    }
    // Refused before the id is looked at: a stranger learns nothing.
    let (status, _) = call(&broker, Method::GET, "/v1/connections/abc", Some(&user)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Over TCP too, and the connection lives on.
    c.send(&ClientMessage::ListConnections {
        request_id: 3,
        after: 0,
        limit: 0,
    })
    .await;
    expect_error(&mut c, Some(3), ErrorCode::Forbidden).await;
    c.send(&ClientMessage::CloseConnection {
        request_id: 4,
        connection_id: id,
    })
    .await;
    expect_error(&mut c, Some(4), ErrorCode::Forbidden).await;
    c.send(&ClientMessage::Ping { request_id: 5 }).await;
    assert_eq!(c.recv().await, Some(ServerMessage::Pong { request_id: 5 }));

    for (method, path) in &routes[..2] {
        let (status, body) = call(&broker, method.clone(), path, Some(&admin)).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {body}");
    }
    let (status, _) = call(&broker, Method::GET, "/v1/stats", Some(&admin)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&broker, Method::DELETE, &routes[2].1, Some(&admin)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Shutdown { .. })
    ));
    c.expect_closed().await;
}
