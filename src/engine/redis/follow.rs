//! The follower: keeps this node's topics in step with Redis.
//!
//! Every append script publishes the topic's name on one channel; the
//! follower (a thread with its own connections) reads the counters of the
//! topics named and the stream entries this node does not hold yet, and
//! applies them to the engine in offset order. A notification is only a
//! hint: after its subscription (re)starts, and every `resync_interval`, it
//! compares every topic with Redis, so what was published while it was
//! disconnected arrives as well. It also finds what Redis lost (a topic
//! missing or behind what this node saw acknowledged) and starts a new
//! history for it: a new epoch, never a reused offset.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use redis::Value;

use super::{array, connect, decode_entries, describe, evalsha, int, text, RedisLog};
use crate::engine::topic::Topic;
use crate::engine::{Engine, EngineError, Event, Inner};

/// A topic as Redis holds it.
#[derive(Debug)]
struct Remote {
    generation: u64,
    epoch: u64,
    next_offset: u64,
    versions: Vec<(String, u64)>,
    sealed_at_ms: Option<u64>,
    /// Claimed by a subscribe, nothing published yet (see claim.lua).
    placeholder: bool,
}

/// What a counters hash says.
#[derive(Debug)]
enum Stored {
    /// No such key.
    Missing,
    /// Deleted (a tombstone of this generation).
    Deleted(u64),
    /// A live topic.
    Live(Remote),
}

fn parse_meta(v: Value) -> Result<Stored, String> {
    let fields: HashMap<String, Value> = match v {
        Value::Map(pairs) => pairs
            .into_iter()
            .filter_map(|(k, v)| Some((text(&k)?.to_owned(), v)))
            .collect(),
        other => {
            let list = array(other).ok_or("a counters hash is not a map")?;
            let mut it = list.into_iter();
            let mut m = HashMap::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let Some(k) = text(&k) {
                    m.insert(k.to_owned(), v);
                }
            }
            m
        }
    };
    if fields.is_empty() {
        return Ok(Stored::Missing);
    }
    let num = |k: &str| fields.get(k).and_then(int);
    let generation = num("gen").ok_or("a counters hash has no generation")?;
    if fields.contains_key("deleted") {
        return Ok(Stored::Deleted(generation));
    }
    let mut versions: Vec<(String, u64)> = fields
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("v:")?.to_owned(), int(v)?)))
        .collect();
    versions.sort();
    Ok(Stored::Live(Remote {
        generation,
        epoch: num("epoch").ok_or("a counters hash has no epoch")?,
        next_offset: num("next").unwrap_or(1).max(1),
        versions,
        sealed_at_ms: num("sealed"),
        placeholder: fields.contains_key("placeholder"),
    }))
}

/// A read script's reply: the counters, and the entries it returned.
fn parse_read(reply: Value) -> Result<(Stored, Vec<Arc<Event>>), String> {
    let mut parts = array(reply).ok_or("a read reply is not an array")?;
    if parts.len() != 2 {
        return Err("a read reply is not [counters, entries]".into());
    }
    let entries = parts.pop().expect("two");
    let stored = parse_meta(parts.pop().expect("two"))?;
    Ok((stored, decode_entries(entries)?))
}

/// What this node holds of a topic: incarnation, next offset, and whether
/// it holds anything (a placeholder created by a subscribe does not).
struct Held {
    generation: u64,
    next_offset: u64,
    stored: bool,
}

impl Engine {
    fn held(&self, name: &str) -> Option<Held> {
        let t = self.inner.registry.topics.get(name)?.value().clone();
        let s = t.state.read();
        (!s.deleted).then(|| Held {
            generation: s.generation,
            next_offset: s.next_offset(),
            stored: !s.ephemeral,
        })
    }

    /// Applies a topic's state read from Redis: creates it, switches it to
    /// another incarnation, adds the events it lacks (`events`: contiguous,
    /// ascending), takes the seal.
    fn apply_remote(&self, name: &str, r: &Remote, events: Vec<Arc<Event>>) {
        let now = self.inner.options.clock.now_ms();
        let topic = self.register(name, (r.generation, r.epoch), false);
        {
            let mut s = topic.state.write();
            if s.deleted || s.deleting {
                return;
            }
            s.switch_incarnation(r.generation, r.epoch);
            if !r.placeholder {
                topic.clear_ephemeral(&mut s);
            }
            let before = s.next_offset();
            s.push(events, now);
            metrics::counter!(crate::metrics::CLUSTER_APPLIED)
                .increment(s.next_offset().saturating_sub(before));
            if r.next_offset > s.next_offset() {
                // Trimmed in Redis before this node read them.
                s.clear_ring();
                s.counters.next_offset = r.next_offset;
            }
            for (t, v) in &r.versions {
                if s.version_of(t) < *v {
                    s.counters.versions.insert(Arc::from(t.as_str()), *v);
                }
            }
            if r.sealed_at_ms.is_some() && !s.sealed {
                s.sealed = true;
                s.sealed_at_ms = r.sealed_at_ms;
            }
        }
        topic.touch(now);
        topic.wake();
    }

    /// Ends this node's copy of a topic deleted on another node.
    fn apply_delete(&self, name: &str, generation: u64) {
        let Some(t) = self
            .inner
            .registry
            .topics
            .get(name)
            .map(|t| t.value().clone())
        else {
            return;
        };
        {
            let s = t.state.read();
            if s.deleted || s.ephemeral || s.generation != generation {
                return;
            }
        }
        crate::engine::finish_delete(&t);
    }
}

/// Runs a Redis round trip from engine code that async front ends call:
/// on a multi-threaded runtime the worker hands its other tasks to another
/// thread meanwhile (`block_in_place`); elsewhere it just runs.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// A topic read from Redis with its retained events.
type Found = (Remote, Vec<Arc<Event>>);

/// What a lookup in Redis found for a topic this node did not hold.
pub(crate) enum Loaded {
    /// A stored topic, now held (events and counters loaded).
    Stored(Arc<Topic>),
    /// A subscribe's placeholder `(generation, epoch)`: the caller creates
    /// its ephemeral topic with this incarnation.
    Placeholder(u64, u64),
}

/// How long a subscribe's placeholder stays in Redis without an event.
const PLACEHOLDER_MS: u64 = 24 * 3600 * 1000;

impl Engine {
    /// Looks `name` up in Redis (the redis backend only): loads a stored
    /// topic into the engine; with `claim`, a missing one becomes a
    /// placeholder every node agrees on. `None` when there is nothing (or
    /// Redis does not answer: the caller goes on as a single node would).
    pub(crate) fn load_shared(&self, name: &str, claim: bool) -> Option<Loaded> {
        let log = self.inner.shared.as_ref()?;
        if !log.answering() {
            return None;
        }
        match blocking(|| log.lookup(name, claim, None)) {
            Ok(Some((r, _))) if r.placeholder && r.next_offset <= 1 => {
                Some(Loaded::Placeholder(r.generation, r.epoch))
            }
            Ok(Some((r, events))) => {
                self.apply_remote(name, &r, events);
                let t = self.inner.registry.topics.get(name)?.value().clone();
                Some(Loaded::Stored(t))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(topic = %name, error = %e, "looking a topic up in redis failed");
                None
            }
        }
    }
}

impl Engine {
    /// With the redis backend: reads `topic` from Redis first when `start`
    /// names a position this node has not applied yet (a client resuming
    /// here what it saw on a node that is ahead: a later offset, version or
    /// epoch), so that it resumes exactly instead of being refused.
    pub(crate) fn catch_up(&self, topic: &Arc<Topic>, start: &crate::engine::Start) {
        use crate::engine::Start;
        let Some(log) = self.inner.shared.as_ref() else {
            return;
        };
        let held = {
            let s = topic.state.read();
            let ahead = match start {
                Start::AfterOffset { epoch, offset }
                | Start::AfterOffsetVersions { epoch, offset, .. } => {
                    *epoch != s.epoch || *offset > s.last_offset()
                }
                Start::AfterVersions { epoch, versions } => {
                    *epoch != s.epoch || versions.iter().any(|(t, v)| *v > s.version_of(t))
                }
                Start::Live | Start::Earliest => false,
            };
            if !ahead || s.deleted || !log.answering() {
                return;
            }
            (s.generation, s.next_offset())
        };
        match blocking(|| log.lookup(&topic.name, false, Some(held))) {
            Ok(Some((r, events))) if !r.placeholder => self.apply_remote(&topic.name, &r, events),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(topic = %topic.name, error = %e, "reading a topic from redis failed")
            }
        }
    }
}

impl RedisLog {
    /// The read script's call for `name`, from what this node holds
    /// (`(generation, next offset)`) or from the start.
    fn read_command(&self, name: &str, held: Option<(u64, u64)>) -> redis::Cmd {
        let mut cmd = evalsha(
            &self.scripts.read,
            &[self.keys.meta(name), self.keys.stream(name)],
        );
        match held {
            Some((generation, next)) => cmd.arg(generation.to_string()).arg(next),
            None => cmd.arg("").arg(1),
        };
        cmd
    }

    /// Reads (or with `claim`, claims) the topic `name` and its retained
    /// events, on the lookup connection: those from `held`'s next offset on
    /// when Redis holds that incarnation `held.0`, else all.
    fn lookup(
        &self,
        name: &str,
        claim: bool,
        held: Option<(u64, u64)>,
    ) -> Result<Option<Found>, String> {
        let mut guard = self.lookups.lock();
        let con = match guard.as_mut() {
            Some(con) => con,
            None => guard.insert(self.connect()?),
        };
        let parse = |e: String| redis::RedisError::from((redis::ErrorKind::Parse, "reply", e));
        let run = |con: &mut redis::Connection| -> redis::RedisResult<Option<Found>> {
            if claim {
                let mut cmd = evalsha(
                    &self.scripts.claim,
                    &[self.keys.meta(name), self.keys.stream(name)],
                );
                cmd.arg(crate::engine::topic::new_generation().to_string())
                    .arg(crate::engine::new_epoch().to_string())
                    .arg(PLACEHOLDER_MS);
                if let Stored::Live(r) = parse_meta(cmd.query(con)?).map_err(parse)? {
                    if r.placeholder {
                        return Ok(Some((r, Vec::new())));
                    }
                }
            }
            let reply: Value = self.read_command(name, held).query(con)?;
            match parse_read(reply).map_err(parse)? {
                (Stored::Live(r), events) => Ok(Some((r, events))),
                _ => Ok(None),
            }
        };
        run(con).map_err(|e| {
            *guard = None;
            describe(&e)
        })
    }
}

/// The follower's own connections and state.
struct Follower {
    engine: Weak<Inner>,
    /// Client, keys, scripts, token and options of this node's backend.
    log: Arc<RedisLog>,
    /// The command connection (subscriptions have their own).
    con: Option<redis::Connection>,
}

/// Loads every topic Redis holds into `engine` (before the node serves
/// anyone), then follows them on a thread of its own.
pub(crate) fn follow(engine: &Engine, log: &Arc<RedisLog>) -> Result<(), EngineError> {
    let mut f = Follower {
        engine: Arc::downgrade(&engine.inner),
        log: log.clone(),
        con: None,
    };
    f.sync_all(engine).map_err(|e| {
        EngineError::Storage(format!(
            "cannot load the topics from Redis at {}: {e}",
            log.options.url
        ))
    })?;
    let loaded = engine.inner.registry.topics.len();
    tracing::info!(topics = loaded, "topics loaded from redis");
    std::thread::Builder::new()
        .name("ringcast-follower".into())
        .spawn(move || f.run())
        .map_err(|e| EngineError::Storage(format!("cannot start the redis follower: {e}")))?;
    Ok(())
}

impl Follower {
    fn command(&mut self) -> Result<&mut redis::Connection, String> {
        if self.con.is_none() {
            self.con = Some(self.log.connect()?);
        }
        Ok(self.con.as_mut().expect("connected"))
    }

    fn query(&mut self, pipe: &redis::Pipeline) -> Result<Vec<Value>, String> {
        if pipe.is_empty() {
            return Ok(Vec::new());
        }
        let con = self.command()?;
        pipe.query::<Vec<Value>>(con).map_err(|e| {
            self.con = None;
            describe(&e)
        })
    }

    /// Follows until the engine is gone: subscribe, catch up, apply what
    /// is announced, compare everything every `resync_interval`; after a
    /// failure, again with backoff.
    fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.engine.strong_count() == 0 {
                return;
            }
            match self.session() {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "following redis failed; subscribers wait, resuming when it answers");
                    self.con = None;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// One subscription to the channel; `Ok` when the engine is gone.
    fn session(&mut self) -> Result<(), String> {
        let mut sub = connect(&self.log.client, self.log.options.command_timeout)
            .map_err(|e| describe(&e))?;
        let mut pubsub = sub.as_pubsub();
        pubsub
            .subscribe(self.log.keys.channel())
            .map_err(|e| describe(&e))?;
        let wait = Duration::from_millis(200);
        pubsub
            .set_read_timeout(Some(wait))
            .map_err(|e| describe(&e))?;
        // What was published while nobody listened.
        let mut last_full = Instant::now();
        {
            let Some(engine) = self.engine() else {
                return Ok(());
            };
            self.sync_all(&engine)?;
        }
        tracing::debug!("following redis");
        loop {
            let mut names = BTreeSet::new();
            match pubsub.get_message() {
                Ok(msg) => {
                    self.note(&mut names, msg.get_payload_bytes());
                    // Take what else is waiting without blocking long.
                    pubsub
                        .set_read_timeout(Some(Duration::from_millis(1)))
                        .map_err(|e| describe(&e))?;
                    while names.len() < 1024 {
                        match pubsub.get_message() {
                            Ok(msg) => self.note(&mut names, msg.get_payload_bytes()),
                            Err(e) if e.is_timeout() => break,
                            Err(e) => return Err(describe(&e)),
                        }
                    }
                    pubsub
                        .set_read_timeout(Some(wait))
                        .map_err(|e| describe(&e))?;
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(describe(&e)),
            }
            let Some(engine) = self.engine() else {
                return Ok(());
            };
            let failed_pass = self
                .log
                .resync
                .swap(false, std::sync::atomic::Ordering::AcqRel);
            if failed_pass || last_full.elapsed() >= self.log.options.resync_interval {
                self.sync_all(&engine)?;
                last_full = Instant::now();
            } else if !names.is_empty() {
                self.sync(&engine, names.into_iter().collect())?;
            }
        }
    }

    /// Takes the topic a notification names (`[token ]topic`), unless
    /// this node's own writer appended it.
    fn note(&self, names: &mut BTreeSet<String>, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        match text.split_once(' ') {
            Some((token, _)) if token == self.log.token => {}
            Some((_, topic)) => {
                names.insert(topic.to_owned());
            }
            None => {
                names.insert(text.into_owned());
            }
        }
    }

    fn engine(&self) -> Option<Engine> {
        self.engine.upgrade().map(|inner| Engine { inner })
    }

    /// Compares every topic Redis or this node holds.
    fn sync_all(&mut self, engine: &Engine) -> Result<(), String> {
        let topics_key = self.log.keys.topics();
        let con = self.command()?;
        let names: Vec<String> =
            redis::cmd("SMEMBERS")
                .arg(topics_key)
                .query(con)
                .map_err(|e| {
                    self.con = None;
                    describe(&e)
                })?;
        let mut all: BTreeSet<String> = names.into_iter().collect();
        for t in engine.inner.registry.topics.iter() {
            if !t.state.read().ephemeral {
                all.insert(t.key().to_string());
            }
        }
        let all: Vec<String> = all.into_iter().collect();
        for chunk in all.chunks(512) {
            self.sync(engine, chunk.to_vec())?;
        }
        Ok(())
    }

    /// Brings the topics `names` in line with Redis: one atomic read per
    /// topic (counters and the entries this node lacks), one round trip.
    fn sync(&mut self, engine: &Engine, names: Vec<String>) -> Result<(), String> {
        let held: Vec<Option<Held>> = names.iter().map(|n| engine.held(n)).collect();
        let mut pipe = redis::pipe();
        for (name, h) in names.iter().zip(&held) {
            let position = h.as_ref().map(|h| (h.generation, h.next_offset));
            pipe.add_command(self.log.read_command(name, position));
        }
        let replies = self.query(&pipe)?;
        let mut rotations = Vec::new();
        for ((name, held), reply) in names.into_iter().zip(held).zip(replies) {
            let (stored, events) = match parse_read(reply) {
                Ok(read) => read,
                Err(e) => {
                    tracing::warn!(topic = %name, error = %e, "unreadable topic in redis");
                    continue;
                }
            };
            match (stored, held) {
                (Stored::Missing, Some(h)) if h.stored && h.next_offset > 1 => {
                    rotations.push((name, h));
                }
                (Stored::Missing, _) => {}
                (Stored::Deleted(generation), _) => {
                    engine.apply_delete(&name, generation);
                    self.log.seen.lock().remove(name.as_str());
                }
                (Stored::Live(r), Some(h))
                    if h.generation == r.generation && r.next_offset < h.next_offset =>
                {
                    rotations.push((name, h));
                }
                // Only a subscribe's claim: nothing to hold until it is stored.
                (Stored::Live(r), None) if r.placeholder => {}
                (Stored::Live(r), _) => engine.apply_remote(&name, &r, events),
            }
        }
        if rotations.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (name, h) in &rotations {
            tracing::warn!(topic = %name, next_offset = h.next_offset, "redis lost acknowledged events of this topic: starting a new epoch");
            let mut cmd = evalsha(&self.log.scripts.rotate, &self.log.topic_keys(name));
            cmd.arg(h.generation.to_string())
                .arg(h.next_offset)
                .arg(crate::engine::new_epoch().to_string())
                .arg(crate::engine::new_epoch().to_string())
                .arg(name)
                .arg(self.log.keys.channel());
            pipe.add_command(cmd);
        }
        let started: u64 = self.query(&pipe)?.iter().filter_map(int).sum();
        metrics::counter!(crate::metrics::CLUSTER_NEW_EPOCHS).increment(started);
        // Read back whichever history now stands.
        let again = rotations.into_iter().map(|(n, _)| n).collect();
        self.sync(engine, again)
    }
}
