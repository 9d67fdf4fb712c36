//! The `redis` backend: several nodes share every topic through one Redis.
//!
//! Redis owns what must be the same everywhere: per topic a hash of
//! counters (incarnation, epoch, next offset, last version per type, seal)
//! and a stream of the retained events (entry id = offset), both changed
//! only by the server-side scripts beside this file, so two nodes appending
//! to one topic can never reuse an offset or let a version go back. Each
//! node keeps its engine (rings, subscriptions, front ends) as a cache of
//! what Redis holds: [`RedisLog`] is the engine's [`Log`] (one pipelined
//! round trip per writer pass), and [`follow`] keeps every topic's ring in
//! step with appends made on other nodes (pub/sub notifications, reads of
//! the stream). Layout and rules: `docs/cluster.md`.

mod follow;
#[cfg(test)]
mod script_tests;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::Value;

use super::dedup::Original;
use super::event::{Event, NewEvent};
use super::log::{Health, Log, Outcome, Shared, Step, TopicImage};
use super::EngineError;

pub(crate) use follow::{follow, Loaded};

/// How the `redis` backend reaches Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// `redis://[:password@]host:port[/db]`.
    pub url: String,
    /// This node's name in logs.
    pub node_id: String,
    /// Prefix of every key and channel.
    pub key_prefix: String,
    /// Longest wait for one command (connect, pass, read).
    pub command_timeout: Duration,
    /// How often the follower re-reads every topic's counters.
    pub resync_interval: Duration,
}

impl RedisOptions {
    /// Options for a Redis at `url` with the defaults of `[cluster]`.
    pub fn new(url: impl Into<String>, node_id: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            node_id: node_id.into(),
            key_prefix: "ringcast".into(),
            command_timeout: Duration::from_secs(2),
            resync_interval: Duration::from_secs(30),
        }
    }
}

/// How long a deleted topic's tombstone stays (a node away longer than this
/// sees the topic as lost instead of deleted: a gap, not an end).
const TOMBSTONE_MS: u64 = 7 * 24 * 3600 * 1000;

/// Names of the keys and the channel of one cluster. A topic's keys share
/// the hash tag `{topic}`, so Redis Cluster keeps them in one slot.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    fn meta(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}:m", self.prefix)
    }
    fn stream(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}:s", self.prefix)
    }
    fn key(&self, topic: &str, key: &str) -> String {
        format!("{}:{{{topic}}}:k:{key}", self.prefix)
    }
    fn topics(&self) -> String {
        format!("{}:topics", self.prefix)
    }
    fn channel(&self) -> String {
        format!("{}:notify", self.prefix)
    }
}

/// Prepends the helpers every script may call (common.lua) to a script.
macro_rules! script {
    ($file:literal) => {
        concat!(include_str!("common.lua"), include_str!($file))
    };
}

/// The sources of the scripts, in the order of [`Scripts`]' fields.
const SOURCES: [&str; 7] = [
    script!("append.lua"),
    script!("seal.lua"),
    script!("delete.lua"),
    script!("trim.lua"),
    script!("claim.lua"),
    script!("read.lua"),
    script!("rotate.lua"),
];

/// The scripts, each with its SHA-1 for `EVALSHA`.
struct Scripts {
    append: redis::Script,
    seal: redis::Script,
    delete: redis::Script,
    trim: redis::Script,
    claim: redis::Script,
    read: redis::Script,
    rotate: redis::Script,
}

impl Scripts {
    fn new() -> Self {
        let [append, seal, delete, trim, claim, read, rotate] = SOURCES.map(redis::Script::new);
        Self {
            append,
            seal,
            delete,
            trim,
            claim,
            read,
            rotate,
        }
    }

    /// Loads every script into the server's cache (after each connect: a
    /// restarted Redis has forgotten them).
    fn load(con: &mut redis::Connection) -> redis::RedisResult<()> {
        for code in SOURCES {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(code)
                .query::<String>(con)?;
        }
        Ok(())
    }
}

/// One script call of a pass.
#[derive(Debug)]
enum Call {
    /// Appends to one topic, merged: `(step index, events in it)`.
    Append(Vec<(usize, usize)>),
    /// A seal, delete or trim: its step index.
    Step(usize),
}

/// An `EVALSHA` of `script` with `keys`; arguments follow.
fn evalsha(script: &redis::Script, keys: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    cmd
}

/// Opens a connection with the command timeout on connect, reads and writes.
fn connect(client: &redis::Client, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let con = client.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    Ok(con)
}

/// One line for a Redis error.
fn describe(e: &redis::RedisError) -> String {
    e.to_string().replace('\n', " ")
}

/// The engine's [`Log`] on Redis: each writer pass is one pipeline of
/// script calls on one connection.
pub(crate) struct RedisLog {
    client: redis::Client,
    options: RedisOptions,
    keys: Keys,
    scripts: Scripts,
    /// The writer's connection; `None` after a failure until repaired.
    con: Mutex<Option<redis::Connection>>,
    /// The connection of lookups of topics this node does not hold.
    lookups: Mutex<Option<redis::Connection>>,
    health: Mutex<Health>,
    /// Per topic, the incarnation and next offset this log last handed to
    /// the engine: an append asks Redis for what other nodes appended from
    /// there on (the engine holds at least that much once a pass commits).
    seen: Mutex<super::log::FastMap<Arc<str>, (u64, u64)>>,
    /// This process's random id in notifications: its follower skips its
    /// own appends (the writer commits them, with what came before).
    token: String,
    /// A pass failed after sending: some of it may be stored although its
    /// publishers were refused; the follower compares every topic.
    resync: std::sync::atomic::AtomicBool,
}

impl RedisLog {
    /// Connects to Redis and loads the scripts; fails if Redis cannot be reached.
    pub fn open(options: &RedisOptions) -> Result<Self, EngineError> {
        let client = redis::Client::open(options.url.as_str())
            .map_err(|e| EngineError::Storage(format!("cluster.redis_url: {}", describe(&e))))?;
        let log = Self {
            client,
            options: options.clone(),
            keys: Keys {
                prefix: options.key_prefix.clone(),
            },
            scripts: Scripts::new(),
            con: Mutex::new(None),
            lookups: Mutex::new(None),
            health: Mutex::new(Health::Ok),
            seen: Mutex::default(),
            token: format!("{:016x}", super::new_epoch()),
            resync: std::sync::atomic::AtomicBool::new(false),
        };
        let con = log.connect().map_err(|e| {
            EngineError::Storage(format!("cannot reach Redis at {}: {e}", options.url))
        })?;
        *log.con.lock() = Some(con);
        tracing::info!(url = %options.url, node = %options.node_id, "redis backend connected");
        Ok(log)
    }

    fn connect(&self) -> Result<redis::Connection, String> {
        let mut con =
            connect(&self.client, self.options.command_timeout).map_err(|e| describe(&e))?;
        Scripts::load(&mut con).map_err(|e| describe(&e))?;
        Ok(con)
    }

    /// Whether Redis answered the writer's last pass (lookups are skipped
    /// while it does not: the caller goes on as a single node would).
    fn answering(&self) -> bool {
        *self.health.lock() == Health::Ok
    }

    /// Refuses writes until a repair reconnects.
    fn degrade(&self, why: String) -> EngineError {
        tracing::warn!(error = %why, "redis backend unavailable: publishes are refused until it answers");
        metrics::counter!(crate::metrics::STORAGE_ERRORS).increment(1);
        *self.health.lock() = Health::Degraded(format!("redis: {why}"));
        EngineError::StorageUnavailable(format!("redis: {why}"))
    }

    /// The script calls of a pass: a topic's appends that expect nothing
    /// are merged into one call (one script run, one notification) until a
    /// step of another kind for that topic; everything else is a call of
    /// its own; syncs, group records and key expiry need none (Redis's
    /// persistence and `PX` do that).
    fn calls(steps: &[Step]) -> Vec<Call> {
        let mut calls: Vec<Call> = Vec::new();
        let mut open: super::log::FastMap<&str, usize> = super::log::FastMap::default();
        for (i, step) in steps.iter().enumerate() {
            match step {
                Step::Append {
                    topic,
                    events,
                    expect,
                    window_ms,
                    max_events,
                    ..
                } => {
                    let name = &*topic.name;
                    let joins = |first: &Step| {
                        matches!(first, Step::Append { topic: t, window_ms: w, max_events: m, .. }
                            if t.generation == topic.generation && w == window_ms && m == max_events)
                    };
                    match open.get(name) {
                        Some(&c) if expect.is_none() => match &mut calls[c] {
                            Call::Append(list) if joins(&steps[list[0].0]) => {
                                list.push((i, events.len()));
                                continue;
                            }
                            _ => {}
                        },
                        _ => {}
                    }
                    if expect.is_none() {
                        open.insert(name, calls.len());
                    } else {
                        open.remove(name);
                    }
                    calls.push(Call::Append(vec![(i, events.len())]));
                }
                Step::Seal { topic } | Step::Delete { topic } | Step::Trim { topic, .. } => {
                    open.remove(&*topic.name);
                    calls.push(Call::Step(i));
                }
                Step::Sync | Step::Groups { .. } | Step::Expire => {}
            }
        }
        calls
    }

    /// The pipeline of a pass's calls, in order.
    fn plan(&self, steps: &[Step], calls: &[Call], now_ms: u64) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let channel = self.keys.channel();
        let seen = self.seen.lock();
        for call in calls {
            let cmd = match call {
                Call::Append(list) => {
                    let Step::Append {
                        topic,
                        expect,
                        window_ms,
                        known_next,
                        max_events,
                        ..
                    } = &steps[list[0].0]
                    else {
                        unreachable!("an append call starts with an append")
                    };
                    let name = &*topic.name;
                    let known = match seen.get(name) {
                        Some((g, next)) if *g == topic.generation => (*known_next).max(*next),
                        _ => *known_next,
                    };
                    let merged = || {
                        list.iter().flat_map(|(i, _)| match &steps[*i] {
                            Step::Append { events, .. } => events.as_slice(),
                            _ => &[],
                        })
                    };
                    let count: usize = list.iter().map(|(_, n)| n).sum();
                    let mut keys = self.topic_keys(name).to_vec();
                    let mut key_index = Vec::with_capacity(count);
                    for e in merged() {
                        key_index.push(match &e.idempotency_key {
                            Some(k) if *window_ms > 0 => {
                                keys.push(self.keys.key(name, k));
                                keys.len()
                            }
                            _ => 0,
                        });
                    }
                    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
                    let mut cmd = evalsha(&self.scripts.append, &keys);
                    cmd.arg(topic.generation.to_string())
                        .arg(topic.epoch.to_string())
                        .arg(super::new_epoch().to_string())
                        .arg(super::new_epoch().to_string())
                        .arg(known)
                        .arg(*window_ms)
                        .arg(now_ms)
                        .arg(opt(expect.offset))
                        .arg(opt(expect.version))
                        .arg((*max_events).clamp(1, i64::MAX as u64))
                        .arg(name)
                        .arg(&channel)
                        .arg(count)
                        .arg(&self.token);
                    // Each event straight into the command buffer: no copy
                    // of its payload on the way.
                    for (e, index) in merged().zip(key_index) {
                        cmd.arg(e.event_type.as_bytes())
                            .arg(index)
                            .arg(encode_headers(&e.headers))
                            .arg(&e.payload[..]);
                    }
                    cmd
                }
                Call::Step(i) => match &steps[*i] {
                    Step::Seal { topic } => {
                        let mut cmd = evalsha(&self.scripts.seal, &self.topic_keys(&topic.name));
                        cmd.arg(topic.generation.to_string())
                            .arg(topic.epoch.to_string())
                            .arg(now_ms)
                            .arg(&*topic.name)
                            .arg(&channel);
                        cmd
                    }
                    Step::Delete { topic } => {
                        let mut cmd = evalsha(&self.scripts.delete, &self.topic_keys(&topic.name));
                        cmd.arg(topic.generation.to_string())
                            .arg(&*topic.name)
                            .arg(&channel)
                            .arg(TOMBSTONE_MS);
                        cmd
                    }
                    Step::Trim {
                        topic,
                        first_retained,
                        next_offset,
                    } => {
                        let mut cmd = evalsha(&self.scripts.trim, &self.topic_keys(&topic.name));
                        cmd.arg(topic.generation.to_string())
                            .arg(topic.epoch.to_string())
                            .arg(*first_retained)
                            .arg(&*topic.name)
                            .arg(&channel)
                            .arg(*next_offset);
                        cmd
                    }
                    _ => unreachable!("only seals, deletes and trims are single calls"),
                },
            };
            pipe.add_command(cmd);
        }
        pipe
    }

    fn topic_keys(&self, topic: &str) -> [String; 3] {
        [
            self.keys.meta(topic),
            self.keys.stream(topic),
            self.keys.topics(),
        ]
    }

    /// Runs a pass's pipeline: reconnecting first if needed, and once more
    /// if Redis had forgotten the scripts (restarted): then no step ran.
    fn run(&self, pipe: &redis::Pipeline, replies: usize) -> Result<Vec<Value>, EngineError> {
        if replies == 0 {
            return Ok(Vec::new());
        }
        let mut guard = self.con.lock();
        for attempt in 0..2 {
            let con = match guard.as_mut() {
                Some(con) => con,
                None => guard.insert(self.connect().map_err(|e| self.degrade(e))?),
            };
            let values: Vec<Value> = match pipe.query(con) {
                Ok(v) => v,
                Err(e) => {
                    // The connection's state is unknown (a reply may be
                    // half read): never reuse it. What ran is found by the
                    // follower.
                    *guard = None;
                    self.resync
                        .store(true, std::sync::atomic::Ordering::Release);
                    return Err(self.degrade(describe(&e)));
                }
            };
            let noscript = |v: &Value| matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT");
            if attempt == 0 && !values.is_empty() && values.iter().all(noscript) {
                *guard = None;
                continue;
            }
            return Ok(values);
        }
        Err(self.degrade("the scripts could not be loaded".into()))
    }
}

impl Log for RedisLog {
    fn inline(&self) -> bool {
        false
    }

    fn persist(&self, steps: &mut [Step], now_ms: u64) -> Result<Vec<Outcome>, EngineError> {
        let calls = Self::calls(steps);
        let pipe = self.plan(steps, &calls, now_ms);
        let values = self.run(&pipe, calls.len())?;
        let mut outcomes: Vec<Option<Outcome>> = steps.iter().map(|_| None).collect();
        let mut seen = self.seen.lock();
        for (call, value) in calls.into_iter().zip(values) {
            let failed = match &value {
                Value::ServerError(e) => {
                    let why = format!("redis: {}", e.details().unwrap_or(e.code()));
                    tracing::warn!(error = %why, "a redis script failed");
                    Some(EngineError::StorageUnavailable(why))
                }
                _ => None,
            };
            match call {
                Call::Append(list) => {
                    let (name, queued) = match &steps[list[0].0] {
                        Step::Append { topic, .. } => (topic.name.clone(), topic.generation),
                        _ => unreachable!("an append call starts with an append"),
                    };
                    let batches: Vec<Vec<NewEvent>> = list
                        .iter()
                        .map(|(i, _)| match &mut steps[*i] {
                            Step::Append { events, .. } => std::mem::take(events),
                            _ => Vec::new(),
                        })
                        .collect();
                    let result = match failed {
                        Some(e) => Err(e),
                        None => {
                            append_outcomes(&name, queued, batches, value, now_ms).map_err(|e| {
                                // It may have been stored: let the follower look.
                                self.resync
                                    .store(true, std::sync::atomic::Ordering::Release);
                                EngineError::Storage(e)
                            })
                        }
                    };
                    match result {
                        Ok((appended, next)) => {
                            if let Some(seen_now) = next {
                                seen.insert(name.clone(), seen_now);
                            }
                            for ((i, _), outcome) in list.iter().zip(appended) {
                                outcomes[*i] = Some(outcome);
                            }
                        }
                        Err(e) => {
                            for (i, _) in &list {
                                outcomes[*i] = Some(Outcome::Refused(e.clone()));
                            }
                        }
                    }
                }
                Call::Step(i) => {
                    let outcome = match (&steps[i], value) {
                        _ if failed.is_some() => Outcome::Refused(failed.expect("checked")),
                        (Step::Seal { topic }, Value::Int(at)) => match u64::try_from(at) {
                            Ok(at) => Outcome::Sealed(at),
                            // Deleted, or lost by Redis: nothing to seal.
                            Err(_) => {
                                Outcome::Refused(EngineError::TopicNotFound(topic.name.to_string()))
                            }
                        },
                        (Step::Seal { .. }, other) => Outcome::Refused(EngineError::Storage(
                            format!("redis: unexpected reply to a seal: {other:?}"),
                        )),
                        (Step::Delete { topic }, _) => {
                            seen.remove(&topic.name);
                            Outcome::Done
                        }
                        _ => Outcome::Done,
                    };
                    outcomes[i] = Some(outcome);
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::Done))
            .collect())
    }

    fn health(&self) -> Health {
        self.health.lock().clone()
    }

    fn repair(&self, _committed: &[TopicImage]) -> Result<(), EngineError> {
        // What the engine acknowledged is in Redis already (an append is
        // acknowledged only after its script ran); what Redis lost since is
        // found by the follower, which starts a new epoch for it.
        let con = self
            .connect()
            .map_err(|e| EngineError::StorageUnavailable(format!("redis: {e}")))?;
        *self.con.lock() = Some(con);
        *self.health.lock() = Health::Ok;
        tracing::info!(url = %self.options.url, "redis backend available again");
        Ok(())
    }

    fn close(&self, _committed: &[TopicImage]) -> Result<(), EngineError> {
        self.con.lock().take();
        Ok(())
    }
}

/// Headers as stored in a stream entry: for each, the key's and the value's
/// length (u32 LE) and bytes. Empty for none (the entry then has no `h`).
fn encode_headers(headers: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in headers {
        for s in [k, v] {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

fn decode_headers(mut b: &[u8]) -> Result<Vec<(String, String)>, String> {
    let take = |b: &mut &[u8]| -> Result<String, String> {
        let len = b
            .get(..4)
            .map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
            .ok_or("truncated headers")?;
        let s = b.get(4..4 + len).ok_or("truncated headers")?;
        let s = String::from_utf8(s.to_vec()).map_err(|_| "headers are not UTF-8")?;
        *b = &b[4 + len..];
        Ok(s)
    };
    let mut out = Vec::new();
    while !b.is_empty() {
        let k = take(&mut b)?;
        let v = take(&mut b)?;
        out.push((k, v));
    }
    Ok(out)
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn array(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        Value::Nil => Some(Vec::new()),
        _ => None,
    }
}

/// The shared name of event type `t` among those a reply has named so far
/// (a batch holds few types: events of one type share one allocation).
fn intern(types: &mut Vec<Arc<str>>, t: &str) -> Arc<str> {
    if let Some(x) = types.iter().find(|x| ***x == *t) {
        return x.clone();
    }
    let x: Arc<str> = Arc::from(t);
    types.push(x.clone());
    x
}

/// Decodes stream entries (`XRANGE` replies) into events, in order.
pub(crate) fn decode_entries(v: Value) -> Result<Vec<Arc<Event>>, String> {
    let entries = array(v).ok_or("a stream read is not an array")?;
    let mut out = Vec::with_capacity(entries.len());
    let mut types: Vec<Arc<str>> = Vec::new();
    for entry in entries {
        let mut entry = array(entry).ok_or("a stream entry is not an array")?;
        if entry.len() != 2 {
            return Err("a stream entry is not [id, fields]".into());
        }
        let fields =
            array(entry.pop().expect("two")).ok_or("a stream entry's fields are not an array")?;
        let id = text(&entry[0]).ok_or("a stream entry id is not text")?;
        let offset: u64 = id
            .split_once('-')
            .and_then(|(o, _)| o.parse().ok())
            .ok_or("a stream entry id is not OFFSET-0")?;
        let (mut t, mut version, mut ts, mut headers, mut payload) = (None, 0, 0, Vec::new(), None);
        let mut fields = fields.into_iter();
        while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
            match text(&k) {
                Some("t") => t = text(&v).map(str::to_owned),
                Some("v") => version = int(&v).ok_or("bad version")?,
                Some("ts") => ts = int(&v).ok_or("bad timestamp")?,
                Some("h") => {
                    if let Value::BulkString(b) = &v {
                        headers = decode_headers(b)?;
                    }
                }
                Some("p") => {
                    if let Value::BulkString(b) = v {
                        payload = Some(Bytes::from(b));
                    }
                }
                _ => {}
            }
        }
        let t = t.ok_or("a stream entry has no type")?;
        out.push(Arc::new(Event::new(
            offset,
            version,
            ts,
            intern(&mut types, &t),
            headers,
            payload.unwrap_or_default(),
        )));
    }
    Ok(out)
}

/// One outcome per merged request, and (when stored) the incarnation and
/// next offset the call left.
type CallOutcomes = (Vec<Outcome>, Option<(u64, u64)>);

/// The outcomes of an append call's reply, one per merged request (each
/// request's events in `batches`), and (when stored) the incarnation and
/// next offset after them.
fn append_outcomes(
    topic: &str,
    queued: u64,
    batches: Vec<Vec<NewEvent>>,
    value: Value,
    now_ms: u64,
) -> Result<CallOutcomes, String> {
    let reply = array(value).ok_or("an append reply is not an array")?;
    let refuse = |e: EngineError| {
        (
            batches
                .iter()
                .map(|_| Outcome::Refused(e.clone()))
                .collect(),
            None,
        )
    };
    match reply.first().and_then(text) {
        Some("sealed") => Ok(refuse(EngineError::TopicSealed(topic.to_owned()))),
        Some("mismatch") => {
            metrics::counter!(crate::metrics::POSITION_MISMATCHES).increment(1);
            Ok(refuse(EngineError::PositionMismatch {
                current_offset: reply.get(1).and_then(int).unwrap_or(0),
                current_version: reply.get(2).and_then(int).unwrap_or(0),
            }))
        }
        Some("ok") if reply.len() == 7 => {
            let mut reply = reply.into_iter();
            reply.next();
            let generation = reply
                .next()
                .as_ref()
                .and_then(int)
                .ok_or("bad generation")?;
            let epoch = reply.next().as_ref().and_then(int).ok_or("bad epoch")?;
            let first = reply.next().as_ref().and_then(int).ok_or("bad offset")?;
            let versions = array(reply.next().unwrap_or_default()).ok_or("bad versions")?;
            let repeats = array(reply.next().unwrap_or_default()).ok_or("bad repeats")?;
            let mut before = Some(decode_entries(reply.next().unwrap_or_default())?);
            let mut repeated = Vec::with_capacity(repeats.len());
            for r in repeats {
                let r = array(r).ok_or("bad repeat")?;
                let n = |i: usize| r.get(i).and_then(int).ok_or("bad repeat");
                repeated.push((
                    usize::try_from(n(0)?).map_err(|_| "bad repeat")?,
                    Original {
                        offset: n(1)?,
                        version: n(2)?,
                        at_ms: n(3)?,
                    },
                ));
            }
            let mut repeated = repeated.into_iter().peekable();
            let mut versions = versions.iter();
            let mut offset = first;
            let mut types: Vec<Arc<str>> = Vec::new();
            // Index of an event in the whole merged batch.
            let mut at = 0;
            let mut outcomes = Vec::with_capacity(batches.len());
            for batch in batches {
                let start = at;
                let mut fresh = Vec::with_capacity(batch.len());
                let mut repeats = Vec::new();
                for e in batch {
                    if let Some((_, original)) = repeated.next_if(|(i, _)| *i == at) {
                        repeats.push((at - start, original));
                        at += 1;
                        continue;
                    }
                    at += 1;
                    let version = versions.next().and_then(int).ok_or("too few versions")?;
                    fresh.push(Arc::new(Event::new(
                        offset,
                        version,
                        now_ms,
                        intern(&mut types, &e.event_type),
                        e.headers,
                        e.payload,
                    )));
                    offset += 1;
                }
                outcomes.push(Outcome::Appended {
                    events: fresh,
                    repeats,
                    shared: Some(Box::new(Shared {
                        incarnation: (generation, epoch),
                        // What others appended before this call: with its first request.
                        before: before.take().unwrap_or_default(),
                        queued,
                    })),
                });
            }
            Ok((outcomes, Some((generation, offset))))
        }
        _ => Err(format!("redis: unexpected reply to an append: {reply:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn headers_round_trip_and_truncation_is_an_error() {
        let headers = vec![
            ("trace".to_owned(), "abc".to_owned()),
            ("empty".to_owned(), String::new()),
            ("ü".to_owned(), "✓".to_owned()),
        ];
        let b = encode_headers(&headers);
        assert_eq!(decode_headers(&b).unwrap(), headers);
        assert!(encode_headers(&[]).is_empty());
        // A cut between two headers is a shorter list; anywhere else an error.
        let mut ends = Vec::new();
        for n in 1..headers.len() {
            ends.push(encode_headers(&headers[..n]).len());
        }
        for cut in 1..b.len() {
            match ends.iter().position(|e| *e == cut) {
                Some(n) => assert_eq!(decode_headers(&b[..cut]).unwrap(), headers[..=n]),
                None => assert!(decode_headers(&b[..cut]).is_err(), "cut at {cut}"),
            }
        }
    }

    #[test]
    fn stream_entries_decode_in_order_with_their_fields() {
        let h = encode_headers(&[("k".into(), "v".into())]);
        let entry =
            |id: &[u8], fields: Vec<Value>| Value::Array(vec![bulk(id), Value::Array(fields)]);
        let v = Value::Array(vec![
            entry(
                b"7-0",
                vec![
                    bulk(b"t"),
                    bulk(b"a"),
                    bulk(b"v"),
                    bulk(b"3"),
                    bulk(b"ts"),
                    bulk(b"99"),
                    bulk(b"p"),
                    bulk(b"{}"),
                ],
            ),
            entry(
                b"8-0",
                vec![
                    bulk(b"t"),
                    bulk(b"a"),
                    bulk(b"v"),
                    bulk(b"4"),
                    bulk(b"ts"),
                    bulk(b"100"),
                    bulk(b"h"),
                    bulk(&h),
                    bulk(b"p"),
                    bulk(b""),
                ],
            ),
        ]);
        let events = decode_entries(v).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(
            (events[0].offset, events[0].version, events[0].timestamp_ms),
            (7, 3, 99)
        );
        assert_eq!(&events[0].payload[..], b"{}");
        assert_eq!(events[1].headers, vec![("k".to_owned(), "v".to_owned())]);
        assert!(Arc::ptr_eq(&events[0].event_type, &events[1].event_type));
        assert!(decode_entries(Value::Array(vec![entry(b"x-0", vec![])])).is_err());
        assert!(decode_entries(Value::Array(vec![entry(
            b"1-0",
            vec![bulk(b"p"), bulk(b"")]
        )]))
        .is_err());
    }

    fn int_value(n: i64) -> Value {
        Value::Int(n)
    }

    #[test]
    fn a_merged_append_reply_is_split_back_per_request() {
        let keyed = |t: &str, k: &str| NewEvent::new(t, b"x".to_vec()).key(k);
        let batches = vec![
            vec![keyed("a", "k1"), NewEvent::new("b", b"y".to_vec())],
            vec![keyed("c", "k2"), NewEvent::new("c", b"z".to_vec())],
        ];
        let repeat =
            |i, o, v| Value::Array(vec![int_value(i), int_value(o), int_value(v), int_value(5)]);
        let before = Value::Array(vec![Value::Array(vec![
            bulk(b"9-0"),
            Value::Array(vec![
                bulk(b"t"),
                bulk(b"a"),
                bulk(b"v"),
                bulk(b"4"),
                bulk(b"ts"),
                bulk(b"1"),
                bulk(b"p"),
                bulk(b""),
            ]),
        ])]);
        let reply = Value::Array(vec![
            bulk(b"ok"),
            bulk(b"77"),
            bulk(b"88"),
            int_value(10),
            Value::Array(vec![int_value(7), int_value(3)]),
            Value::Array(vec![repeat(0, 2, 1), repeat(2, 4, 2)]),
            before,
        ]);
        let (outcomes, next) = append_outcomes("t", 77, batches, reply, 1000).unwrap();
        assert_eq!(next, Some((77, 12)));
        let parts: Vec<_> = outcomes
            .into_iter()
            .map(|o| match o {
                Outcome::Appended {
                    events,
                    repeats,
                    shared,
                } => {
                    let shared = shared.expect("a shared outcome");
                    assert_eq!(shared.incarnation, (77, 88));
                    (
                        events
                            .iter()
                            .map(|e| (e.offset, e.version, e.event_type.to_string()))
                            .collect::<Vec<_>>(),
                        repeats
                            .iter()
                            .map(|(i, o)| (*i, o.offset))
                            .collect::<Vec<_>>(),
                        shared.before.iter().map(|e| e.offset).collect::<Vec<_>>(),
                    )
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(parts[0], (vec![(10, 7, "b".into())], vec![(0, 2)], vec![9]));
        assert_eq!(parts[1], (vec![(11, 3, "c".into())], vec![(0, 4)], vec![]));
        // A sealed topic refuses every merged request.
        let sealed = append_outcomes(
            "t",
            1,
            vec![vec![NewEvent::new("a", b"".to_vec())]; 2],
            Value::Array(vec![bulk(b"sealed")]),
            0,
        )
        .unwrap();
        assert!(sealed
            .0
            .iter()
            .all(|o| matches!(o, Outcome::Refused(EngineError::TopicSealed(_)))));
    }

    #[test]
    fn appends_merge_per_topic_until_another_step_of_that_topic() {
        use super::super::log::TopicId;
        let id = |n: &str| TopicId {
            name: Arc::from(n),
            generation: 1,
            epoch: 2,
        };
        let append = |n: &str, expect: Option<u64>| Step::Append {
            topic: id(n),
            events: vec![NewEvent::new("e", b"".to_vec())],
            expect: super::super::Expected {
                offset: expect,
                version: None,
            },
            window_ms: 0,
            known_next: 1,
            max_events: 10,
        };
        let steps = vec![
            append("a", None),
            append("b", None),
            append("a", None),
            Step::Sync,
            append("a", Some(3)),
            append("a", None),
            Step::Seal { topic: id("b") },
            append("b", None),
        ];
        let calls: Vec<String> = RedisLog::calls(&steps)
            .iter()
            .map(|c| match c {
                Call::Append(l) => format!("A{:?}", l.iter().map(|(i, _)| *i).collect::<Vec<_>>()),
                Call::Step(i) => format!("S{i}"),
            })
            .collect();
        assert_eq!(calls, ["A[0, 2]", "A[1]", "A[4]", "A[5]", "S6", "A[7]"]);
    }

    #[test]
    fn topic_keys_share_one_hash_tag() {
        let k = Keys {
            prefix: "rc".into(),
        };
        for key in [k.meta("a.b"), k.stream("a.b"), k.key("a.b", "x")] {
            assert!(key.starts_with("rc:{a.b}:"), "{key}");
        }
    }
}
