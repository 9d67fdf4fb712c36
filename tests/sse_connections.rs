//! SSE streams in the connection registry: listed with a subscription per
//! topic (position, lag, delivered), and `DELETE /v1/connections/{id}`
//! closes exactly that stream, cleanly (`event: shutdown`, end of body),
//! after which a reconnect with the last event id resumes every topic.

mod common;

use std::collections::VecDeque;
use std::pin::Pin;

use bytes::Bytes;
use common::http::send_json;
use common::sse::{SseEvent, SseParser};
use common::{memory_broker, within};
use futures::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use ringcast::broker::Broker;
use ringcast::engine::NewEvent;
use serde_json::{json, Value};

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn call(broker: &Broker, method: Method, path: &str) -> (StatusCode, Value) {
    let url = format!("http://{}{path}", broker.http_addr());
    send_json(http().request(method, url), 20).await
}

async fn publish(broker: &Broker, topic: &str, n: u64) -> u64 {
    let ack = broker
        .engine()
        .publish(topic, NewEvent::new("tick", format!("{{\"n\":{n}}}")))
        .await
        .expect("publish");
    ack.offset
}

/// One SSE message: its `event:`, `data:` (parsed) and `id:`.
#[derive(Debug)]
struct Msg {
    event: String,
    data: Value,
    id: Option<String>,
}

/// An open `text/event-stream` response, read message by message.
struct Sse {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    parser: SseParser,
    queue: VecDeque<SseEvent>,
}

impl Sse {
    async fn open(broker: &Broker, path: &str, last_id: Option<&str>) -> Sse {
        let mut request = http().get(format!("http://{}{path}", broker.http_addr()));
        if let Some(id) = last_id {
            request = request.header("last-event-id", id);
        }
        let response = within(20, request.send()).await.expect("stream opens");
        assert_eq!(response.status(), StatusCode::OK);
        Sse {
            body: Box::pin(response.bytes_stream()),
            parser: SseParser::default(),
            queue: VecDeque::new(),
        }
    }

    /// The next message (comments skipped); `None` when the body ends.
    async fn next(&mut self) -> Option<Msg> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                let data = e.json();
                return Some(Msg {
                    event: e.event,
                    data,
                    id: e.id,
                });
            }
            match within(20, self.body.next()).await {
                Some(Ok(chunk)) => self.parser.feed_events(&chunk, &mut self.queue),
                Some(Err(e)) => panic!("stream failed: {e}"),
                None => return None,
            }
        }
    }

    /// The next `n` events as (topic, offset), with the last one's id.
    async fn events(&mut self, n: usize) -> (Vec<(String, u64)>, String) {
        let mut got = Vec::new();
        let mut last = String::new();
        while got.len() < n {
            let m = self.next().await.expect("an event");
            assert_eq!(m.event, "tick", "{m:?}");
            got.push((
                m.data["topic"].as_str().unwrap().to_owned(),
                m.data["offset"].as_u64().unwrap(),
            ));
            last = m.id.expect("every event has an id");
        }
        (got, last)
    }
}

fn sse_connections(list: &Value) -> Vec<Value> {
    list["connections"]
        .as_array()
        .expect("a list")
        .iter()
        .filter(|c| c["kind"] == "sse")
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_is_listed_per_topic_and_a_delete_closes_exactly_it_then_it_resumes() {
    let (broker, _dir) = memory_broker().await;
    publish(&broker, "a", 1).await;
    publish(&broker, "b", 1).await;
    let many_path = "/v1/events?topic=a&topic=b&earliest=true";
    let mut many = Sse::open(&broker, many_path, None).await;
    assert_eq!(many.next().await.unwrap().event, "ready");
    let (got, last_id) = many.events(2).await;
    assert_eq!(got, [("a".to_owned(), 1), ("b".to_owned(), 1)]);
    let mut one = Sse::open(&broker, "/v1/topics/a/events?earliest=true", None).await;
    assert_eq!(one.next().await.unwrap().event, "ready");
    assert_eq!(one.events(1).await.0, [("a".to_owned(), 1)]);

    // Both listed; the multi-topic stream with one subscription per topic.
    let (status, listed) = call(&broker, Method::GET, "/v1/connections").await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let sse = sse_connections(&listed);
    assert_eq!(sse.len(), 2, "{listed}");
    let multi = sse
        .iter()
        .find(|c| c["subscriptions"].as_array().unwrap().len() == 2)
        .unwrap_or_else(|| panic!("no stream with two topics: {listed}"));
    let mut subs: Vec<Value> = multi["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| json!([s["topic"], s["position"], s["lag"], s["delivered"]]))
        .collect();
    subs.sort_by_key(|s| s[0].as_str().unwrap().to_owned());
    assert_eq!(subs, [json!(["a", 1, 0, 1]), json!(["b", 1, 0, 1])]);
    assert_eq!(multi["delivered"], 2, "{multi}");
    let id = multi["id"].as_u64().unwrap();
    let (status, single) = call(&broker, Method::GET, &format!("/v1/connections/{id}")).await;
    assert_eq!((status, &single["id"]), (StatusCode::OK, &json!(id)));

    // A delete closes exactly that stream: told `shutdown` (no id, so the
    // browser's last event id stays), then the body ends.
    let (status, body) = call(&broker, Method::DELETE, &format!("/v1/connections/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let bye = many.next().await.expect("a goodbye before the end");
    assert_eq!(bye.event, "shutdown", "{bye:?}");
    assert_eq!(bye.id, None);
    assert!(many.next().await.is_none(), "the body ends after shutdown");
    let (_, listed) = call(&broker, Method::GET, "/v1/connections").await;
    let left = sse_connections(&listed);
    assert_eq!(left.len(), 1, "{listed}");
    assert_ne!(left[0]["id"], json!(id));

    // The other stream goes on; the closed one resumes with its last id
    // and gets exactly what was published since.
    publish(&broker, "a", 2).await;
    publish(&broker, "b", 2).await;
    assert_eq!(one.events(1).await.0, [("a".to_owned(), 2)]);
    let mut resumed = Sse::open(&broker, many_path, Some(&last_id)).await;
    assert_eq!(resumed.next().await.unwrap().event, "ready");
    let (mut got, _) = resumed.events(2).await;
    got.sort();
    assert_eq!(got, [("a".to_owned(), 2), ("b".to_owned(), 2)]);
}
