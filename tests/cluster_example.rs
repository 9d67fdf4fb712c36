//! The README's "Running several nodes" example, as shipped: a real
//! `redis-server` with `appendfsync always` and three `ringcastd` processes
//! started with `config/cluster/node-{a,b,c}.toml` (only the Redis port and
//! the listeners are moved to free ports, through the documented
//! environment variable and flags). Then what the README shows: a stream on
//! node c sees what nodes a and b publish as offsets 1 and 2, and a
//! reconnect to another node with `Last-Event-ID` continues exactly.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use common::redis::{Persistence, RedisServer};
use futures::StreamExt;
use tokio::net::UnixDatagram;
use tokio::process::Child;

/// One node of the example, started from its shipped config file.
struct Node {
    _child: Child,
    _notify_dir: tempfile::TempDir,
    http: SocketAddr,
}

async fn start_node(name: &str, redis: &RedisServer) -> Node {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("config/cluster")
        .join(format!("node-{name}.toml"));
    let notify_dir = tempfile::tempdir().unwrap();
    let socket = notify_dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&socket).unwrap();
    let mut cmd = common::ringcastd();
    cmd.arg("--config")
        .arg(&config)
        .args([
            "--tcp-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("RINGCAST_CLUSTER_REDIS_URL", redis.url())
        .env("NOTIFY_SOCKET", &socket)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd.spawn().expect("spawn ringcastd");
    // READY=1 comes with STATUS=serving tcp=... http=... once it listens.
    let http = common::within(60, async {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = notify.recv(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if !text.lines().any(|l| l == "READY=1") {
                continue;
            }
            let status = text
                .lines()
                .find_map(|l| l.strip_prefix("STATUS="))
                .expect("READY=1 comes with a STATUS=");
            let http = status
                .split_whitespace()
                .find_map(|w| w.strip_prefix("http="))
                .expect("the status names the HTTP address");
            return http.parse::<SocketAddr>().unwrap();
        }
    })
    .await;
    Node {
        _child: child,
        _notify_dir: notify_dir,
        http,
    }
}

/// One SSE message: its id, event name and data.
#[derive(Debug, Clone)]
struct Message {
    id: String,
    event: String,
    data: serde_json::Value,
}

/// Reads SSE messages from `url` (with `last_event_id`) until `count`
/// events of type `created` arrived; returns them.
async fn read_created(url: String, last_event_id: Option<&str>, count: usize) -> Vec<Message> {
    let http = reqwest::Client::new();
    let mut req = http.get(url);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.send().await.expect("GET the stream");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < count {
        let chunk = body
            .next()
            .await
            .expect("the stream stays open")
            .expect("stream bytes");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut m = Message {
                id: String::new(),
                event: String::new(),
                data: serde_json::Value::Null,
            };
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    m.id = v.to_owned();
                } else if let Some(v) = line.strip_prefix("event: ") {
                    m.event = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    m.data = serde_json::from_str(v).expect("data is JSON");
                }
            }
            assert_ne!(m.event, "gap", "no gap in the example: {m:?}");
            if m.event == "created" {
                out.push(m);
            }
        }
    }
    out
}

async fn publish(node: &Node, id: u64) -> serde_json::Value {
    let resp = reqwest::Client::new()
        .post(format!(
            "http://{}/v1/topics/orders/events?type=created",
            node.http
        ))
        .body(format!("{{\"id\":{id}}}"))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 200, "publish on {}", node.http);
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_three_node_example_works_as_shown() {
    if !common::redis::available() {
        return;
    }
    let redis = RedisServer::start(Persistence::AofAlways).await;
    let a = start_node("a", &redis).await;
    let b = start_node("b", &redis).await;
    let c = start_node("c", &redis).await;

    // `curl -N .../orders/events` on node c, started before the publishes:
    // its `ready` message says it is subscribed.
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("http://{}/v1/topics/orders/events", c.http))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = common::within(20, stream.next()).await;
    assert!(
        String::from_utf8_lossy(&first.unwrap().unwrap()).contains("event: ready"),
        "the stream opens with ready"
    );
    let reader = tokio::spawn(async move {
        let mut buf = String::new();
        let mut ids = Vec::new();
        while ids.len() < 2 {
            let chunk = stream.next().await.expect("open").expect("bytes");
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                if block.contains("event: created") {
                    let data = block
                        .lines()
                        .find_map(|l| l.strip_prefix("data: "))
                        .unwrap();
                    let v: serde_json::Value = serde_json::from_str(data).unwrap();
                    ids.push((
                        v["offset"].as_u64().unwrap(),
                        v["data"]["id"].as_u64().unwrap(),
                    ));
                }
            }
        }
        ids
    });

    let ack_a = publish(&a, 1).await;
    let ack_b = publish(&b, 2).await;
    assert_eq!(ack_a["offset"], 1);
    assert_eq!(ack_b["offset"], 2);
    assert_eq!(ack_a["epoch"], ack_b["epoch"], "one topic, one epoch");
    let seen = common::within(20, reader).await.unwrap();
    assert_eq!(seen, vec![(1, 1), (2, 2)], "node c streams both, in order");

    // A reconnect to another node with the first event's id gets the rest.
    let from_start = common::within(
        20,
        read_created(
            format!("http://{}/v1/topics/orders/events?earliest=true", a.http),
            None,
            2,
        ),
    )
    .await;
    let first_id = from_start[0].id.clone();
    assert_eq!(first_id, format!("{}:1", ack_a["epoch"].as_str().unwrap()));
    let resumed = common::within(
        20,
        read_created(
            format!("http://{}/v1/topics/orders/events", b.http),
            Some(&first_id),
            1,
        ),
    )
    .await;
    assert_eq!(resumed[0].data["offset"], 2);
    assert_eq!(resumed[0].data["data"]["id"], 2);
    drop((a, b, c));
}
