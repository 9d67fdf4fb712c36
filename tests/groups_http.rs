//! The HTTP pull API of consumer groups over real loopback sockets against
//! the real broker: lifecycle and idempotent creation, access control,
//! concurrent workers, nack and redelivery, dead letters and redrive,
//! `max_ack_pending`, bad input, metrics, long polls at disconnect and
//! shutdown, and group state across a restart on the same data dir.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::auth::{claims, hs256, hs256_config};
use common::{config, within};
use reqwest::StatusCode;
use ringcast::broker::Broker;
use ringcast::config::{Config, Durability};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// A broker plus an HTTP client.
// ---------------------------------------------------------------------------

struct Api {
    broker: Broker,
    http: reqwest::Client,
    base: String,
    config: Config,
    /// A bearer token sent with every request, if set.
    token: Option<String>,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A memory-mode broker with settings changed by `tweak`.
    async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), Durability::Memory);
        tweak(&mut config);
        Self::start_config(config, dir).await
    }

    async fn start_config(config: Config, dir: tempfile::TempDir) -> Self {
        config.validate().expect("test config is valid");
        let broker = common::start(config.clone()).await;
        Self::over(broker, config, dir)
    }

    fn over(broker: Broker, config: Config, dir: tempfile::TempDir) -> Self {
        let base = format!("http://{}", broker.http_addr());
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Self {
            broker,
            http,
            base,
            config,
            token: None,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends a request; the status and the JSON body (`Null` when empty).
    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        common::http::send_json(request, 30).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.request(reqwest::Method::DELETE, path)).await
    }

    async fn put(&self, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        self.send(self.request(reqwest::Method::PUT, path).body(body))
            .await
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        self.send(self.request(reqwest::Method::POST, path).body(body))
            .await
    }

    /// Publishes `n` JSON events `{"i": k}` of type `job`, in batches.
    async fn publish(&self, topic: &str, n: u64) {
        let mut k = 0;
        while k < n {
            let chunk: Vec<Value> = (k..n.min(k + 500))
                .map(|i| json!({"type": "job", "data": {"i": i}}))
                .collect();
            k += chunk.len() as u64;
            let (status, body) = self
                .post(
                    &format!("/v1/topics/{topic}/events:batch"),
                    Value::Array(chunk).to_string(),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "publish refused: {body}");
        }
    }

    /// Creates (or finds) a group; asserts success.
    async fn create(&self, topic: &str, group: &str, options: Value) -> Value {
        let (status, info) = self
            .put(&group_path(topic, group, ""), options.to_string())
            .await;
        assert!(
            status == StatusCode::CREATED || status == StatusCode::OK,
            "PUT group: {status} {info}"
        );
        info
    }

    async fn info(&self, topic: &str, group: &str) -> Value {
        let (status, info) = self.get(&group_path(topic, group, "")).await;
        assert_eq!(status, StatusCode::OK, "group info: {info}");
        info
    }

    /// A fetch; asserts success and returns the answer.
    async fn fetch(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        max: u64,
        wait_ms: u64,
    ) -> Value {
        let (status, body) = self
            .post(
                &group_path(topic, group, "/fetch"),
                json!({"consumer": consumer, "max": max, "wait_ms": wait_ms}).to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "fetch: {body}");
        body
    }

    /// Settles `offsets` with `action` (`ack`, `nack`, ...) and `extra`
    /// fields; asserts success and returns `{applied, already_done, unknown}`.
    async fn settle(
        &self,
        topic: &str,
        group: &str,
        action: &str,
        offsets: &[u64],
        extra: Value,
    ) -> Value {
        let mut body = json!({ "offsets": offsets });
        if let Value::Object(fields) = extra {
            for (k, v) in fields {
                body[k] = v;
            }
        }
        let (status, settled) = self
            .post(
                &group_path(topic, group, &format!("/{action}")),
                body.to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{action}: {settled}");
        settled
    }
}

fn group_path(topic: &str, group: &str, rest: &str) -> String {
    format!("/v1/topics/{topic}/groups/{group}{rest}")
}

/// The `(offset, attempt)` of each event of a fetch answer.
fn deliveries(fetched: &Value) -> Vec<(u64, u64)> {
    fetched["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events in {fetched}"))
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["attempt"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn offsets(fetched: &Value) -> Vec<u64> {
    deliveries(fetched).into_iter().map(|(o, _)| o).collect()
}

/// Asserts an error answer with this status and code.
fn assert_error(answer: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"]["code"], code, "{}", answer.1);
    let message = answer.1["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "an error says why: {}", answer.1);
}

/// Polls the group's info until `ready` holds (what a test waits for is
/// an observable state, not a guess at how long it takes).
async fn until_info(api: &Api, topic: &str, group: &str, ready: impl Fn(&Value) -> bool) -> Value {
    within(20, async {
        loop {
            let info = api.info(topic, group).await;
            if ready(&info) {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// Lifecycle.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn groups_are_created_listed_described_and_deleted() {
    let api = Api::start().await;
    api.publish("jobs", 3).await;

    let path = group_path("jobs", "billing", "");
    let options = json!({
        "start": {"after_offset": 1},
        "ack_wait_ms": 5000,
        "max_deliver": 3,
        "backoff_ms": [100, 1000],
        "max_ack_pending": 50,
    });
    let (status, info) = api.put(&path, options.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{info}");
    assert_eq!(info["topic"], "jobs");
    assert_eq!(info["group"], "billing");
    assert_eq!(
        info["config"],
        json!({
            "start": {"after_offset": 1},
            "ack_wait_ms": 5000,
            "max_deliver": 3,
            "backoff_ms": [100, 1000],
            "max_ack_pending": 50,
            "dead_letter_topic": null,
        })
    );
    assert_eq!(info["dead_letter_topic"], "jobs.dlq");
    let epoch = info["epoch"]
        .as_str()
        .expect("the epoch is a decimal string");
    assert!(epoch.parse::<u64>().is_ok(), "{epoch}");
    assert_eq!(
        (info["next_offset"].as_u64(), info["last_offset"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(info["lag"], 2);
    assert_eq!(info["pending"], 0);
    assert_eq!(info["members"], json!([]));
    assert_eq!(info["pending_sample"], json!([]));

    // The same request again, an empty body, or another start: nothing to
    // change, 200 with the group as it is.
    let (status, again) = api.put(&path, options.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["config"], info["config"]);
    let (status, empty) = api.put(&path, "").await;
    assert_eq!(status, StatusCode::OK, "{empty}");
    assert_eq!(empty["config"], info["config"]);
    let (status, other_start) = api.put(&path, json!({"start": "live"}).to_string()).await;
    assert_eq!(status, StatusCode::OK, "{other_start}");
    assert_eq!(other_start["config"]["start"], json!({"after_offset": 1}));

    // A field sent changes only that setting (auth is off: no grant needed).
    let (status, updated) = api
        .put(
            &path,
            json!({"ack_wait_ms": 7000, "dead_letter_topic": "failed"}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["config"]["ack_wait_ms"], 7000);
    assert_eq!(updated["config"]["max_deliver"], 3);
    assert_eq!(updated["dead_letter_topic"], "failed");
    let (_, reset) = api
        .put(&path, json!({"dead_letter_topic": null}).to_string())
        .await;
    assert_eq!(reset["dead_letter_topic"], "jobs.dlq");

    api.create("jobs", "audit", json!({})).await;
    let (status, list) = api.get("/v1/topics/jobs/groups").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let names: Vec<&str> = list["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["group"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["audit", "billing"]);
    // The default start: every retained event.
    assert_eq!(list["groups"][0]["config"]["start"], "earliest");
    assert_eq!(list["groups"][0]["lag"], 3);

    let (status, deleted) = api.delete(&path).await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert_error(
        &api.get(&path).await,
        StatusCode::NOT_FOUND,
        "group_not_found",
    );
    assert_error(
        &api.delete(&path).await,
        StatusCode::NOT_FOUND,
        "group_not_found",
    );
    let (_, list) = api.get("/v1/topics/jobs/groups").await;
    assert_eq!(list["groups"].as_array().unwrap().len(), 1);
    // A topic without groups lists none; a missing topic is a 404.
    api.publish("quiet", 1).await;
    assert_eq!(
        api.get("/v1/topics/quiet/groups").await.1,
        json!({"groups": []})
    );
    assert_error(
        &api.get("/v1/topics/nowhere/groups").await,
        StatusCode::NOT_FOUND,
        "topic_not_found",
    );
}

#[tokio::test]
async fn creating_needs_subscribe_and_changing_settings_needs_admin() {
    let dir = tempfile::tempdir().unwrap();
    let config = hs256_config(config(dir.path(), Durability::Memory), dir.path());
    let mut api = Api::start_config(config, dir).await;
    let worker = hs256(&claims("worker", 600, &["jobs"], &["jobs"], false));
    let admin = hs256(&claims("ops", 600, &["jobs"], &["jobs"], true));
    let path = group_path("jobs", "g", "");

    // Anonymous: 401; a worker without a grant on the topic: 403.
    assert_error(
        &api.put(&path, "{}").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    api.token = Some(hs256(&claims(
        "stranger",
        600,
        &["other"],
        &["other"],
        false,
    )));
    assert_error(
        &api.put(&path, "{}").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );

    api.token = Some(worker.clone());
    api.publish("jobs", 2).await;
    let (status, created) = api
        .put(&path, json!({"ack_wait_ms": 1000}).to_string())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, same) = api
        .put(&path, json!({"ack_wait_ms": 1000}).to_string())
        .await;
    assert_eq!(status, StatusCode::OK, "{same}");
    // Another start is no change; other settings are an update: admin only.
    assert_eq!(
        api.put(&path, json!({"start": "live"}).to_string()).await.0,
        StatusCode::OK
    );
    assert_error(
        &api.put(&path, json!({"ack_wait_ms": 2000}).to_string())
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_eq!(api.info("jobs", "g").await["config"]["ack_wait_ms"], 1000);
    // Bad settings are a 400 whoever asks.
    assert_error(
        &api.put(&path, json!({"max_deliver": 0}).to_string()).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // Naming a dead-letter topic is publishing there: the worker may
    // publish to `jobs` only.
    assert_error(
        &api.put(
            &group_path("jobs", "g2", ""),
            json!({"dead_letter_topic": "billing"}).to_string(),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &api.put(
            &group_path("jobs", "g2", ""),
            json!({"dead_letter_topic": "jobs"}).to_string(),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // The worker may consume and settle, not delete or redrive.
    let fetched = api.fetch("jobs", "g", "w1", 1, 0).await;
    assert_eq!(offsets(&fetched), [1]);
    assert_eq!(
        api.settle("jobs", "g", "ack", &[1], json!({})).await["applied"],
        1
    );
    assert_error(&api.delete(&path).await, StatusCode::FORBIDDEN, "forbidden");
    assert_error(
        &api.post(&group_path("jobs", "g", "/redrive"), "").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );

    api.token = Some(admin);
    let (status, updated) = api
        .put(&path, json!({"ack_wait_ms": 2000}).to_string())
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["config"]["ack_wait_ms"], 2000);
    let (status, redriven) = api.post(&group_path("jobs", "g", "/redrive"), "").await;
    assert_eq!((status, redriven), (StatusCode::OK, json!({"redriven": 0})));
    assert_eq!(api.delete(&path).await.0, StatusCode::OK);
}

// ---------------------------------------------------------------------------
// Work distribution.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_http_workers_ack_3000_events_exactly_once_and_never_share_one() {
    const EVENTS: u64 = 3_000;
    let api = Arc::new(Api::start().await);
    api.publish("work", EVENTS).await;
    api.create("work", "pool", json!({"max_ack_pending": 120}))
        .await;

    // Offsets held by some worker now, and how often each was acked.
    let held: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let acked: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..3 {
        let (api, held, acked, done) = (api.clone(), held.clone(), acked.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let consumer = format!("w{w}");
            let mut mine = 0u64;
            while done.load(Ordering::SeqCst) < EVENTS {
                let fetched = api.fetch("work", "pool", &consumer, 25, 200).await;
                let got = deliveries(&fetched);
                if got.is_empty() {
                    continue;
                }
                {
                    let mut held = held.lock().unwrap();
                    for &(o, attempt) in &got {
                        assert_eq!(
                            attempt, 1,
                            "nothing expired: offset {o} is a first delivery"
                        );
                        assert!(
                            held.insert(o),
                            "offset {o} handed to {consumer} while another worker held it"
                        );
                    }
                }
                let offsets: Vec<u64> = got.iter().map(|&(o, _)| o).collect();
                let settled = api.settle("work", "pool", "ack", &offsets, json!({})).await;
                assert_eq!(settled["applied"], offsets.len() as u64, "{settled}");
                {
                    let mut held = held.lock().unwrap();
                    let mut acked = acked.lock().unwrap();
                    for o in &offsets {
                        held.remove(o);
                        *acked.entry(*o).or_default() += 1;
                    }
                }
                mine += offsets.len() as u64;
                done.fetch_add(offsets.len() as u64, Ordering::SeqCst);
            }
            mine
        }));
    }
    let mut per_worker = Vec::new();
    for w in workers {
        per_worker.push(within(120, w).await.expect("worker"));
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len() as u64, EVENTS);
    assert!(
        acked.values().all(|&n| n == 1),
        "every offset acked exactly once"
    );
    assert_eq!(
        acked.keys().copied().collect::<BTreeSet<_>>(),
        (1..=EVENTS).collect()
    );
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "every worker got work: {per_worker:?}"
    );
    assert_eq!(per_worker.iter().sum::<u64>(), EVENTS);

    let info = api.info("work", "pool").await;
    assert_eq!(
        (
            &info["acked"],
            &info["pending"],
            &info["lag"],
            &info["ack_floor"],
            &info["redelivered"]
        ),
        (
            &json!(EVENTS),
            &json!(0),
            &json!(0),
            &json!(EVENTS),
            &json!(0)
        ),
        "{info}"
    );
    let members: Vec<&str> = info["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["consumer"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["w0", "w1", "w2"]);
}

#[tokio::test]
async fn a_nacked_event_comes_back_after_its_delay_with_attempt_2() {
    let api = Api::start().await;
    api.publish("retry", 1).await;
    api.create("retry", "g", json!({})).await;

    let first = api.fetch("retry", "g", "w1", 10, 0).await;
    assert_eq!(deliveries(&first), [(1, 1)]);
    let envelope = &first["events"][0];
    assert_eq!(
        (&envelope["topic"], &envelope["type"], &envelope["data"]),
        (&json!("retry"), &json!("job"), &json!({"i": 0}))
    );
    assert!(first["epoch"].as_str().unwrap().parse::<u64>().is_ok());
    assert_eq!(first["gaps"], json!([]));

    let nacked = Instant::now();
    let settled = api
        .settle("retry", "g", "nack", &[1], json!({"delay_ms": 300}))
        .await;
    assert_eq!(
        settled,
        json!({"applied": 1, "already_done": 0, "unknown": 0})
    );
    let info = api.info("retry", "g").await;
    assert_eq!(
        (&info["pending"], &info["in_flight"]),
        (&json!(1), &json!(0))
    );
    assert_eq!(info["pending_sample"][0]["attempt"], 1);
    assert_eq!(info["pending_sample"][0]["consumer"], Value::Null);

    // A long poll by another worker gets it once its delay is over.
    let again = api.fetch("retry", "g", "w2", 10, 20_000).await;
    assert_eq!(deliveries(&again), [(1, 2)]);
    assert!(
        nacked.elapsed() >= Duration::from_millis(300),
        "redelivered after {:?}, before its 300 ms delay",
        nacked.elapsed()
    );
    // A second nack of an event no longer held by anyone is unknown; an
    // ack settles it, and acking again says it is already done.
    assert_eq!(
        api.settle("retry", "g", "ack", &[1], json!({})).await["applied"],
        1
    );
    assert_eq!(
        api.settle("retry", "g", "nack", &[1], json!({})).await,
        json!({"applied": 0, "already_done": 1, "unknown": 0})
    );
    assert_eq!(
        api.settle("retry", "g", "ack", &[1, 99], json!({})).await,
        json!({"applied": 0, "already_done": 1, "unknown": 1})
    );
    let info = api.info("retry", "g").await;
    assert_eq!(
        (
            &info["delivered"],
            &info["redelivered"],
            &info["acked"],
            &info["pending"]
        ),
        (&json!(2), &json!(1), &json!(1), &json!(0))
    );
}

#[tokio::test]
async fn in_progress_keeps_an_event_past_its_ack_wait() {
    const ACK_WAIT_MS: u64 = 5_000;
    let api = Api::start().await;
    api.publish("slow", 1).await;
    api.create("slow", "g", json!({ "ack_wait_ms": ACK_WAIT_MS }))
        .await;
    assert_eq!(offsets(&api.fetch("slow", "g", "w1", 1, 0).await), [1]);
    // Milliseconds to the deadline of the one pending event, from an info.
    let due = |i: &Value| i["pending_sample"][0]["due_in_ms"].as_u64().unwrap();
    let before = due(&api.info("slow", "g").await);
    // Let some of the deadline pass, measured by the broker's own report.
    until_info(&api, "slow", "g", |i| due(i) + 300 < before).await;
    let asked = Instant::now();
    assert_eq!(
        api.settle("slow", "g", "in_progress", &[1], json!({}))
            .await["applied"],
        1
    );
    let after = api.info("slow", "g").await;
    let since = asked.elapsed().as_millis() as u64;
    assert_eq!(after["pending_sample"][0]["consumer"], "w1");
    // Extended: due at least a whole ack_wait after the request was sent;
    // not extended, it would be 300 ms short of that.
    assert!(
        due(&after) + since + 5 >= ACK_WAIT_MS,
        "the deadline moved a whole ack_wait on: {after}, {since} ms after asking"
    );
}

#[tokio::test]
async fn a_termed_event_goes_to_the_dead_letter_topic_and_redrive_brings_it_back() {
    let api = Api::start().await;
    let (status, _) = api
        .send(
            api.request(reqwest::Method::POST, "/v1/topics/orders/events?type=order")
                .header("X-Ringcast-Header-tenant", "acme")
                .body(r#"{"id":7}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let info = api.create("orders", "shipping", json!({})).await;
    let epoch = info["epoch"].as_str().unwrap().to_owned();

    assert_eq!(
        offsets(&api.fetch("orders", "shipping", "w1", 5, 0).await),
        [1]
    );
    let settled = api
        .settle(
            "orders",
            "shipping",
            "term",
            &[1],
            json!({"reason": "malformed address"}),
        )
        .await;
    assert_eq!(settled["applied"], 1);

    // The term answered once the dead letter was appended.
    let (status, page) = api.get("/v1/topics/orders.dlq/history").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{page}");
    let letter = &events[0];
    assert_eq!(
        (&letter["type"], &letter["data"]),
        (&json!("order"), &json!({"id": 7}))
    );
    let headers = &letter["headers"];
    assert_eq!(headers["tenant"], "acme");
    assert_eq!(headers["ringcast-dlq-topic"], "orders");
    assert_eq!(headers["ringcast-dlq-offset"], "1");
    assert_eq!(headers["ringcast-dlq-group"], "shipping");
    assert_eq!(headers["ringcast-dlq-attempts"], "1");
    assert_eq!(headers["ringcast-dlq-reason"], "malformed address");
    assert_eq!(headers["ringcast-dlq-epoch"], epoch.as_str());
    let info = api.info("orders", "shipping").await;
    assert_eq!(
        (&info["dead_lettered"], &info["pending"], &info["ack_floor"]),
        (&json!(1), &json!(0), &json!(1))
    );

    let (status, redriven) = api
        .post(&group_path("orders", "shipping", "/redrive"), "")
        .await;
    assert_eq!((status, redriven), (StatusCode::OK, json!({"redriven": 1})));
    // Each dead letter once: a second redrive publishes nothing.
    let (_, again) = api
        .post(&group_path("orders", "shipping", "/redrive"), "")
        .await;
    assert_eq!(again, json!({"redriven": 0}));

    let back = api.fetch("orders", "shipping", "w2", 5, 5_000).await;
    assert_eq!(deliveries(&back), [(2, 1)]);
    let event = &back["events"][0];
    assert_eq!(
        (&event["type"], &event["data"]),
        (&json!("order"), &json!({"id": 7}))
    );
    assert_eq!(
        event["headers"],
        json!({"tenant": "acme"}),
        "no ringcast-dlq-* headers"
    );
}

#[tokio::test]
async fn max_ack_pending_stops_delivery_at_the_limit_and_acks_resume_it() {
    let api = Arc::new(Api::start().await);
    api.publish("capped", 20).await;
    api.create("capped", "g", json!({"max_ack_pending": 5}))
        .await;

    assert_eq!(
        offsets(&api.fetch("capped", "g", "w1", 100, 0).await),
        [1, 2, 3, 4, 5]
    );
    let info = api.info("capped", "g").await;
    assert_eq!((&info["pending"], &info["lag"]), (&json!(5), &json!(15)));
    // At the limit a fetch waits out its wait and gets nothing.
    let empty = api.fetch("capped", "g", "w2", 100, 50).await;
    assert_eq!(offsets(&empty), Vec::<u64>::new());
    assert_eq!(api.info("capped", "g").await["pending"], 5);

    // A long poll waiting at the limit wakes when acks make room, and gets
    // exactly that room.
    let waiting = {
        let api = api.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let fetched = api.fetch("capped", "g", "w2", 100, 30_000).await;
            (offsets(&fetched), started.elapsed())
        })
    };
    until_info(&api, "capped", "g", |i| {
        i["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["consumer"] == "w2")
    })
    .await;
    assert_eq!(
        api.settle("capped", "g", "ack", &[1, 2], json!({})).await["applied"],
        2
    );
    let (got, took) = within(30, waiting).await.unwrap();
    assert_eq!(got, [6, 7]);
    assert!(
        took < Duration::from_secs(25),
        "woken by the acks, not by its deadline: {took:?}"
    );
    assert_eq!(api.info("capped", "g").await["pending"], 5);
}

#[tokio::test]
async fn a_consumer_holds_at_most_its_max_in_flight() {
    let api = Api::start().await;
    api.publish("room", 10).await;
    api.create("room", "g", json!({})).await;
    let (status, fetched) = api
        .post(
            &group_path("room", "g", "/fetch"),
            json!({"consumer": "w1", "max": 10, "max_in_flight": 3}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{fetched}");
    assert_eq!(offsets(&fetched), [1, 2, 3]);
    // Default max is 1.
    assert_eq!(offsets(&api.fetch("room", "g", "w2", 1, 0).await), [4]);
    let (_, one) = api
        .post(
            &group_path("room", "g", "/fetch"),
            json!({"consumer": "w3"}).to_string(),
        )
        .await;
    assert_eq!(offsets(&one), [5]);
}

// ---------------------------------------------------------------------------
// Bad input.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_code() {
    let api = Api::start().await;
    api.publish("jobs", 1).await;
    api.create("jobs", "g", json!({})).await;
    let bad = StatusCode::BAD_REQUEST;

    // Names.
    assert_error(
        &api.put("/v1/topics/jobs/groups/bad%20name", "{}").await,
        bad,
        "invalid_group",
    );
    assert_error(
        &api.get("/v1/topics/jobs/groups/a%2Fb").await,
        bad,
        "invalid_group",
    );
    assert_error(
        &api.put("/v1/topics/bad%20topic/groups/g", "{}").await,
        bad,
        "invalid_topic",
    );
    let long = "g".repeat(256);
    assert_error(
        &api.get(&group_path("jobs", &long, "")).await,
        bad,
        "invalid_group",
    );

    // Group options.
    let put = |body: &'static str| api.put("/v1/topics/jobs/groups/h", body);
    assert_error(&put("{not json").await, bad, "bad_request");
    assert_error(&put("[]").await, bad, "bad_request");
    let typo = put(r#"{"ack_wait": 5000}"#).await;
    assert_error(&typo, bad, "bad_request");
    assert!(
        typo.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ack_wait"),
        "{}",
        typo.1
    );
    assert_error(&put(r#"{"start": "yesterday"}"#).await, bad, "bad_request");
    assert_error(&put(r#"{"max_deliver": -1}"#).await, bad, "bad_request");
    assert_error(&put(r#"{"max_deliver": 0}"#).await, bad, "invalid_request");
    assert_error(&put(r#"{"ack_wait_ms": 1}"#).await, bad, "invalid_request");
    assert_error(
        &put(r#"{"ack_wait_ms": 18446744073709551615}"#).await,
        bad,
        "bad_request",
    );
    assert_error(
        &put(r#"{"backoff_ms": [100, 999999999999]}"#).await,
        bad,
        "bad_request",
    );
    assert_error(
        &put(r#"{"max_ack_pending": 0}"#).await,
        bad,
        "invalid_request",
    );
    assert_error(
        &put(r#"{"dead_letter_topic": "no spaces"}"#).await,
        bad,
        "invalid_request",
    );
    assert_error(
        &api.get("/v1/topics/jobs/groups/h").await,
        StatusCode::NOT_FOUND,
        "group_not_found",
    );

    // Fetch.
    let fetch = |body: Value| api.post("/v1/topics/jobs/groups/g/fetch", body.to_string());
    let max0 = fetch(json!({"consumer": "w", "max": 0})).await;
    assert_error(&max0, bad, "bad_request");
    assert!(max0.1["error"]["message"].as_str().unwrap().contains("max"));
    assert_error(
        &fetch(json!({"consumer": "w", "max": 1001})).await,
        bad,
        "bad_request",
    );
    assert_error(
        &fetch(json!({"consumer": "w", "max": u64::MAX})).await,
        bad,
        "bad_request",
    );
    let long_wait = fetch(json!({"consumer": "w", "wait_ms": 60_001})).await;
    assert_error(&long_wait, bad, "bad_request");
    assert!(long_wait.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("wait_ms"));
    assert_error(&fetch(json!({"max": 1})).await, bad, "bad_request");
    assert_error(
        &fetch(json!({"consumer": ""})).await,
        bad,
        "invalid_request",
    );
    assert_error(
        &fetch(json!({"consumer": "two words"})).await,
        bad,
        "invalid_request",
    );
    assert_error(
        &fetch(json!({"consumer": "w", "batch": 5})).await,
        bad,
        "bad_request",
    );
    assert_error(
        &api.post("/v1/topics/jobs/groups/g/fetch", "").await,
        bad,
        "bad_request",
    );
    assert_error(
        &api.post(
            "/v1/topics/jobs/groups/nope/fetch",
            json!({"consumer": "w"}).to_string(),
        )
        .await,
        StatusCode::NOT_FOUND,
        "group_not_found",
    );
    // Nothing was handed out by the refused fetches.
    assert_eq!(api.info("jobs", "g").await["pending"], 0);

    // Settles.
    let post = |action: &'static str, body: &str| {
        let body = body.to_owned();
        let api = &api;
        async move {
            api.post(&format!("/v1/topics/jobs/groups/g/{action}"), body)
                .await
        }
    };
    assert_error(
        &post("ack", r#"{"offsets": "1"}"#).await,
        bad,
        "bad_request",
    );
    assert_error(
        &post("ack", r#"{"offsets": [-1]}"#).await,
        bad,
        "bad_request",
    );
    assert_error(&post("ack", "").await, bad, "bad_request");
    assert_error(
        &post(
            "nack",
            r#"{"offsets": [1], "delay_ms": 18446744073709551615}"#,
        )
        .await,
        bad,
        "bad_request",
    );
    assert_error(
        &post("term", r#"{"offsets": [1], "reason": 5}"#).await,
        bad,
        "bad_request",
    );
    let many: Vec<u64> = (1..=10_001).collect();
    assert_error(
        &post("ack", &json!({ "offsets": many }).to_string()).await,
        bad,
        "invalid_request",
    );
    assert_error(
        &api.post("/v1/topics/jobs/groups/nope/ack", r#"{"offsets": [1]}"#)
            .await,
        StatusCode::NOT_FOUND,
        "group_not_found",
    );
    assert_error(
        &api.post("/v1/topics/jobs/groups/nope/redrive", "").await,
        StatusCode::NOT_FOUND,
        "group_not_found",
    );

    // A body over limits.max_frame is refused before it is read.
    let huge = vec![b' '; 5 * 1024 * 1024];
    let refused = api.put("/v1/topics/jobs/groups/g", huge).await;
    assert_error(&refused, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    // The broker serves on.
    assert_eq!(api.info("jobs", "g").await["group"], "g");
}

#[tokio::test]
async fn too_many_groups_are_refused_with_429() {
    let api = Api::start_with(|c| c.limits.max_groups = 2).await;
    api.publish("jobs", 1).await;
    api.create("jobs", "a", json!({})).await;
    api.create("jobs", "b", json!({})).await;
    assert_error(
        &api.put(&group_path("jobs", "c", ""), "{}").await,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_groups",
    );
}

// ---------------------------------------------------------------------------
// Metrics.
// ---------------------------------------------------------------------------

/// The value of the sample `series` (name and labels as written) in a
/// `/metrics` text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|v| v.trim().parse().expect("a sample value"))
    })
}

#[tokio::test]
async fn metrics_show_group_series_for_metered_topics_only() {
    let api = Api::start_with(|c| c.metrics.topics = vec!["metered".into()]).await;
    api.publish("metered", 5).await;
    api.publish("other", 5).await;
    api.create("metered", "g", json!({})).await;
    api.create("other", "g", json!({})).await;
    assert_eq!(offsets(&api.fetch("metered", "g", "w", 2, 0).await), [1, 2]);
    api.settle("metered", "g", "ack", &[1], json!({})).await;
    api.fetch("other", "g", "w", 5, 0).await;

    let text = within(20, async {
        let response = api.http.get(api.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    })
    .await;
    let labels = r#"{topic="metered",group="g"}"#;
    let get = |name: &str| sample(&text, &format!("{name}{labels}"));
    assert_eq!(get("ringcast_group_lag"), Some(3.0), "{text}");
    assert_eq!(get("ringcast_group_pending"), Some(1.0));
    assert_eq!(get("ringcast_group_in_flight"), Some(1.0));
    assert_eq!(get("ringcast_group_delivered_total"), Some(2.0));
    assert_eq!(get("ringcast_group_acked_total"), Some(1.0));
    assert_eq!(get("ringcast_group_redelivered_total"), Some(0.0));
    assert_eq!(get("ringcast_group_dead_lettered_total"), Some(0.0));
    assert_eq!(get("ringcast_group_lost_total"), Some(0.0));
    assert!(get("ringcast_group_oldest_pending_age_seconds").is_some_and(|age| age >= 0.0));
    // Unmetered groups count only in the totals.
    assert!(!text.contains(r#"topic="other""#), "{text}");
    assert_eq!(sample(&text, "ringcast_groups"), Some(2.0));
    assert_eq!(sample(&text, "ringcast_group_pending"), Some(6.0));
    assert_eq!(sample(&text, "ringcast_group_delivered_total"), Some(7.0));
    for family in ["ringcast_group_pending", "ringcast_group_acked_total"] {
        assert_eq!(
            text.matches(&format!("# TYPE {family} ")).count(),
            1,
            "{text}"
        );
    }
    assert!(text.contains("# TYPE ringcast_group_acked_total counter"));
    assert!(text.contains("# TYPE ringcast_group_lag gauge"));
}

// ---------------------------------------------------------------------------
// Long polls: disconnects and shutdown.
// ---------------------------------------------------------------------------

/// Sends a fetch on a raw connection (so the test can cut it) and returns
/// the stream.
async fn raw_fetch(api: &Api, topic: &str, group: &str, consumer: &str, wait_ms: u64) -> TcpStream {
    let body = json!({"consumer": consumer, "max": 10, "wait_ms": wait_ms}).to_string();
    let request = format!(
        "POST /v1/topics/{topic}/groups/{group}/fetch HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(api.broker.http_addr()).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    // Waiting: the consumer is a member of the group.
    until_info(api, topic, group, |i| {
        i["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["consumer"] == consumer)
    })
    .await;
    stream
}

#[tokio::test]
async fn a_long_poll_whose_client_went_away_takes_no_event() {
    let api = Api::start().await;
    api.publish("gone", 1).await;
    api.create("gone", "g", json!({"start": "live"})).await;
    let mut stream = raw_fetch(&api, "gone", "g", "ghost", 30_000).await;
    // The client closes its side; the broker ends the request and the
    // connection (and with them the waiting fetch).
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(20, stream.read_to_end(&mut rest)).await.ok();
    assert!(
        rest.is_empty(),
        "no answer to a client that left: {:?}",
        String::from_utf8_lossy(&rest)
    );

    api.publish("gone", 1).await;
    let fetched = api.fetch("gone", "g", "alive", 10, 10_000).await;
    assert_eq!(deliveries(&fetched), [(2, 1)]);
    let info = api.info("gone", "g").await;
    let ghost = info["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["consumer"] == "ghost")
        .cloned();
    assert!(ghost.is_none_or(|m| m["in_flight"] == 0), "{info}");
}

#[tokio::test]
async fn shutdown_ends_a_waiting_long_poll_at_once() {
    let api = Api::start_with(|c| c.server.shutdown_timeout = Duration::from_secs(60)).await;
    api.publish("jobs", 1).await;
    api.create("jobs", "g", json!({"start": "live"})).await;
    let mut stream = raw_fetch(&api, "jobs", "g", "w1", 60_000).await;

    let started = Instant::now();
    let Api { broker, _dir, .. } = api;
    within(30, broker.shutdown()).await.expect("clean shutdown");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "shutdown waited {:?} for a long poll",
        started.elapsed()
    );
    let response = common::http::read_closing_response(&mut stream).await;
    assert_eq!(response.status, 200, "{}", response.head);
    let body = response.json();
    assert_eq!(body["events"], json!([]), "{body}");
}

// ---------------------------------------------------------------------------
// Persistence.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn after_a_restart_unacked_work_comes_back_and_acked_work_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), Durability::Fsync);
    let api = Api::start_config(config, dir).await;
    api.publish("durable", 10).await;
    api.create("durable", "g", json!({"ack_wait_ms": 300}))
        .await;
    let first = api.fetch("durable", "g", "w1", 6, 0).await;
    assert_eq!(offsets(&first), [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        api.settle("durable", "g", "ack", &[1, 2, 3], json!({}))
            .await["applied"],
        3
    );

    // A crash: no graceful shutdown, the acks were stored before they were
    // answered.
    let Api {
        broker,
        config,
        _dir,
        ..
    } = api;
    within(20, broker.kill()).await;
    let broker = Broker::start(config.clone())
        .await
        .expect("the broker restarts on its data dir");
    let api = Api::over(broker, config, _dir);

    let info = api.info("durable", "g").await;
    assert_eq!(info["ack_floor"], 3, "{info}");
    assert_eq!(info["acked"], 3, "{info}");
    assert_eq!(info["config"]["ack_wait_ms"], 300);

    // Everything unacked comes again: 4-6 after their ack_wait as second
    // attempts, 7-10 as first ones; 1-3 never.
    let mut seen: HashMap<u64, u64> = HashMap::new();
    within(30, async {
        while seen.len() < 7 {
            let fetched = api.fetch("durable", "g", "w2", 10, 5_000).await;
            for (o, attempt) in deliveries(&fetched) {
                assert!(seen.insert(o, attempt).is_none(), "offset {o} twice");
            }
        }
    })
    .await;
    let got: BTreeSet<u64> = seen.keys().copied().collect();
    assert_eq!(got, (4..=10).collect::<BTreeSet<_>>());
    for o in 4..=6 {
        assert!(
            seen[&o] >= 2,
            "offset {o} was in flight before the crash: attempt {}",
            seen[&o]
        );
    }
    for o in 7..=10 {
        assert_eq!(seen[&o], 1, "offset {o} was never delivered before");
    }
    let all: Vec<u64> = (4..=10).collect();
    assert_eq!(
        api.settle("durable", "g", "ack", &all, json!({})).await["applied"],
        7
    );
    let info = api.info("durable", "g").await;
    assert_eq!(
        (
            &info["ack_floor"],
            &info["pending"],
            &info["lag"],
            &info["acked"]
        ),
        (&json!(10), &json!(0), &json!(0), &json!(10)),
        "{info}"
    );
    api.broker.shutdown().await.expect("clean shutdown");
}
