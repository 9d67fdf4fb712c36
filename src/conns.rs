//! The registry of live client connections: who is connected over which
//! front end, what each of its subscriptions was delivered and how far it
//! lags, and a close signal an operator can fire
//! (`GET/DELETE /v1/connections`, `ringcast conns`).
//!
//! A front end registers a connection once it is admitted and holds the
//! [`ConnGuard`] for the connection's life: dropping it unregisters. Each
//! subscription likewise holds a [`SubHandle`]. Both are cheap to update:
//! a subscription's position and counts are atomics of its own, written
//! by its one pump once per hand-off to the connection's writer, never a
//! counter shared between connections. Lag is computed only when someone
//! lists ([`Registry::snapshot`]), from the engine's topic info.
//!
//! # Registering an SSE stream
//! ```
//! # use ringcast::conns::{ConnKind, Registry};
//! let registry = Registry::new();
//! let peer = "127.0.0.1:50000".parse().unwrap();
//! let conn = registry.register(ConnKind::Sse, peer, Some("u1".into()));
//! let closed = conn.closed(); // select on `closed.cancelled()` in the stream
//! let sub = conn.subscription("orders", 0x0123, 41);
//! // After each batch handed to the body: the last offset sent, the events in it.
//! sub.advance(0x0123, 44, 3);
//! let id = conn.id();
//! assert_eq!(registry.get(id).unwrap().delivered, 3);
//! drop(sub);
//! drop(conn); // gone from the listing
//! assert!(registry.get(id).is_none());
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;

/// Connection ids come from one counter per process, so an id is never
/// reused while the process runs, however many brokers it starts.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Which front end serves a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnKind {
    /// The binary TCP protocol.
    Tcp,
    /// An SSE stream (`GET /v1/topics/{topic}/events`).
    Sse,
}

impl ConnKind {
    /// The kind as listed: `tcp` or `sse`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnKind::Tcp => "tcp",
            ConnKind::Sse => "sse",
        }
    }
}

/// Every live connection of one broker. Cheap to clone; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// By id, so that listings come in id order and page by id.
    conns: RwLock<BTreeMap<u64, Arc<Conn>>>,
    /// Connections registered since the broker started.
    opened: AtomicU64,
    /// Events delivered by connections already gone.
    delivered_closed: AtomicU64,
}

#[derive(Debug)]
struct Conn {
    id: u64,
    kind: ConnKind,
    peer: SocketAddr,
    subject: Option<String>,
    since_ms: u64,
    /// Fired by [`Registry::close`]; the front end selects on it.
    close: CancellationToken,
    /// Fired when the guard drops, for whoever waits for the close.
    gone: CancellationToken,
    /// Registered and unregistered once per subscription, never per event.
    subs: Mutex<Vec<Arc<SubState>>>,
    /// Events delivered by subscriptions already ended.
    delivered_ended: AtomicU64,
}

#[derive(Debug)]
struct SubState {
    topic: String,
    subscription_id: Option<u64>,
    group: Option<String>,
    epoch: AtomicU64,
    position: AtomicU64,
    delivered: AtomicU64,
}

impl Conn {
    fn delivered(&self) -> u64 {
        let subs = self.subs.lock();
        self.delivered_ended.load(Ordering::Relaxed)
            + subs
                .iter()
                .map(|s| s.delivered.load(Ordering::Relaxed))
                .sum::<u64>()
    }

    fn info(&self) -> ConnInfo {
        let subscriptions: Vec<SubInfo> = self
            .subs
            .lock()
            .iter()
            .map(|s| SubInfo {
                topic: s.topic.clone(),
                subscription_id: s.subscription_id,
                group: s.group.clone(),
                epoch: s.epoch.load(Ordering::Relaxed),
                position: s.position.load(Ordering::Relaxed),
                lag: 0,
                delivered: s.delivered.load(Ordering::Relaxed),
            })
            .collect();
        ConnInfo {
            id: self.id,
            kind: self.kind,
            peer: self.peer,
            subject: self.subject.clone(),
            since_ms: self.since_ms,
            delivered: self.delivered_ended.load(Ordering::Relaxed)
                + subscriptions.iter().map(|s| s.delivered).sum::<u64>(),
            subscriptions,
        }
    }
}

/// One connection as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Broker-unique id, never reused while the process runs.
    pub id: u64,
    /// The front end serving it.
    pub kind: ConnKind,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The credential's subject; `None` with auth off or without one.
    pub subject: Option<String>,
    /// When it was registered, in ms since the Unix epoch.
    pub since_ms: u64,
    /// Events delivered on it so far, over all its subscriptions.
    pub delivered: u64,
    /// Its live subscriptions, in the order they started.
    pub subscriptions: Vec<SubInfo>,
}

/// One subscription of a listed connection: the wire form itself (TCP sends
/// it as it is; HTTP renders the same fields as JSON). `lag` is filled by
/// [`Registry::snapshot`].
pub use ringcast_protocol::WireConnSubscription as SubInfo;

/// Broker-wide counts of the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Live TCP connections.
    pub tcp: u64,
    /// Live SSE streams.
    pub sse: u64,
    /// Live subscriptions of TCP connections (group memberships included).
    pub tcp_subscriptions: u64,
    /// Live subscriptions of SSE streams.
    pub sse_subscriptions: u64,
    /// Connections registered since the broker started.
    pub opened: u64,
    /// Events delivered since the broker started, by live and closed
    /// connections.
    pub delivered: u64,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a connection; it is listed until the guard drops.
    pub fn register(&self, kind: ConnKind, peer: SocketAddr, subject: Option<String>) -> ConnGuard {
        let conn = Arc::new(Conn {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            kind,
            peer,
            subject,
            since_ms: crate::engine::now_ms(),
            close: CancellationToken::new(),
            gone: CancellationToken::new(),
            subs: Mutex::new(Vec::new()),
            delivered_ended: AtomicU64::new(0),
        });
        self.shared.conns.write().insert(conn.id, conn.clone());
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
        ConnGuard {
            conn,
            shared: self.shared.clone(),
        }
    }

    /// Every live connection, by id; `lag` is left 0 (see [`snapshot`](Self::snapshot)).
    pub fn list(&self) -> Vec<ConnInfo> {
        self.page(0, usize::MAX)
    }

    /// At most `limit` live connections with an id above `after`, by id;
    /// `lag` is left 0.
    pub fn page(&self, after: u64, limit: usize) -> Vec<ConnInfo> {
        // Arcs taken under the lock, described outside it.
        let conns: Vec<Arc<Conn>> = {
            let map = self.shared.conns.read();
            map.range(after.saturating_add(1)..)
                .take(limit)
                .map(|(_, c)| c.clone())
                .collect()
        };
        conns.iter().map(|c| c.info()).collect()
    }

    /// One live connection; `lag` is left 0.
    pub fn get(&self, id: u64) -> Option<ConnInfo> {
        let conn = self.shared.conns.read().get(&id).cloned()?;
        Some(conn.info())
    }

    /// Every live connection with each subscription's lag filled in.
    pub fn snapshot(&self, engine: &Engine) -> Vec<ConnInfo> {
        let mut list = self.list();
        fill_lag(engine, &mut list);
        list
    }

    /// Fires the close signal of connection `id`; `None` when no live
    /// connection has it. Await [`Closing::gone`] to know it is unregistered.
    pub fn close(&self, id: u64) -> Option<Closing> {
        let conn = self.shared.conns.read().get(&id).cloned()?;
        conn.close.cancel();
        Some(Closing {
            gone: conn.gone.clone(),
        })
    }

    /// Counts by kind, subscriptions, and delivery totals.
    pub fn stats(&self) -> RegistryStats {
        let conns: Vec<Arc<Conn>> = self.shared.conns.read().values().cloned().collect();
        let mut stats = RegistryStats {
            opened: self.shared.opened.load(Ordering::Relaxed),
            delivered: self.shared.delivered_closed.load(Ordering::Relaxed),
            ..RegistryStats::default()
        };
        for c in &conns {
            let subs = c.subs.lock().len() as u64;
            match c.kind {
                ConnKind::Tcp => {
                    stats.tcp += 1;
                    stats.tcp_subscriptions += subs;
                }
                ConnKind::Sse => {
                    stats.sse += 1;
                    stats.sse_subscriptions += subs;
                }
            }
            stats.delivered += c.delivered();
        }
        stats
    }
}

/// Fills in `lag` of every subscription: one topic lookup per topic named.
pub fn fill_lag(engine: &Engine, conns: &mut [ConnInfo]) {
    let mut topics: HashMap<String, Option<(u64, u64)>> = HashMap::new();
    for sub in conns.iter_mut().flat_map(|c| c.subscriptions.iter_mut()) {
        let current = *topics.entry(sub.topic.clone()).or_insert_with(|| {
            engine
                .info(&sub.topic)
                .ok()
                .map(|i| (i.epoch, i.last_offset))
        });
        sub.lag = match current {
            Some((epoch, last)) if epoch == sub.epoch => last.saturating_sub(sub.position),
            Some((_, last)) => last,
            // Deleted: its subscribers get `End`; nothing to catch up on.
            None => 0,
        };
    }
}

/// A registered connection; dropping it unregisters the connection (and
/// counts what it delivered into the broker's totals).
#[derive(Debug)]
pub struct ConnGuard {
    conn: Arc<Conn>,
    shared: Arc<Shared>,
}

impl ConnGuard {
    /// The connection's id.
    pub fn id(&self) -> u64 {
        self.conn.id
    }

    /// The close signal: cancelled when an operator closes the connection.
    /// The front end then says goodbye the way a broker shutdown does
    /// (TCP `Shutdown`, SSE `event: shutdown`) and drops the connection.
    pub fn closed(&self) -> CancellationToken {
        self.conn.close.clone()
    }

    /// Registers an SSE stream's subscription to `topic`, at `position`
    /// (the last offset the client had, 0 for none) in `epoch`.
    pub fn subscription(&self, topic: &str, epoch: u64, position: u64) -> SubHandle {
        self.add(topic, None, None, epoch, position)
    }

    /// Registers a TCP subscription `subscription_id` to `topic` (or a
    /// membership of consumer group `group`), at `position` in `epoch`.
    pub fn tcp_subscription(
        &self,
        subscription_id: u64,
        topic: &str,
        group: Option<&str>,
        epoch: u64,
        position: u64,
    ) -> SubHandle {
        self.add(
            topic,
            Some(subscription_id),
            group.map(str::to_owned),
            epoch,
            position,
        )
    }

    fn add(
        &self,
        topic: &str,
        subscription_id: Option<u64>,
        group: Option<String>,
        epoch: u64,
        position: u64,
    ) -> SubHandle {
        let state = Arc::new(SubState {
            topic: topic.to_owned(),
            subscription_id,
            group,
            epoch: AtomicU64::new(epoch),
            position: AtomicU64::new(position),
            delivered: AtomicU64::new(0),
        });
        self.conn.subs.lock().push(state.clone());
        SubHandle {
            state,
            conn: self.conn.clone(),
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.conns.write().remove(&self.conn.id);
        self.shared
            .delivered_closed
            .fetch_add(self.conn.delivered(), Ordering::Relaxed);
        self.conn.gone.cancel();
    }
}

/// A registered subscription; dropping it unregisters it. Written by one
/// task (the subscription's pump), so its atomics are never contended.
#[derive(Debug)]
pub struct SubHandle {
    state: Arc<SubState>,
    conn: Arc<Conn>,
}

impl SubHandle {
    /// The epoch last recorded.
    pub fn epoch(&self) -> u64 {
        self.state.epoch.load(Ordering::Relaxed)
    }

    /// Records a hand-off: `delivered_events` more events, the last one
    /// (or the end of a gap) at `offset` in `epoch`. Call once per batch,
    /// not per event.
    pub fn advance(&self, epoch: u64, offset: u64, delivered_events: u64) {
        let s = &self.state;
        s.epoch.store(epoch, Ordering::Relaxed);
        s.position.store(offset, Ordering::Relaxed);
        if delivered_events > 0 {
            s.delivered.fetch_add(delivered_events, Ordering::Relaxed);
        }
    }
}

impl Drop for SubHandle {
    fn drop(&mut self) {
        let mut subs = self.conn.subs.lock();
        subs.retain(|s| !Arc::ptr_eq(s, &self.state));
        // Under the lock, so a listing never sees the events twice or not at all.
        self.conn.delivered_ended.fetch_add(
            self.state.delivered.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }
}

/// A close in progress (see [`Registry::close`]).
#[derive(Debug)]
pub struct Closing {
    gone: CancellationToken,
}

impl Closing {
    /// Resolves once the connection is unregistered, or after `within`;
    /// `true` when it is gone.
    pub async fn gone(self, within: Duration) -> bool {
        tokio::time::timeout(within, self.gone.cancelled())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:4000".parse().unwrap()
    }

    #[test]
    fn ids_are_never_reused_and_listings_come_in_id_order() {
        let r = Registry::new();
        let a = r.register(ConnKind::Tcp, peer(), None);
        let b = r.register(ConnKind::Sse, peer(), Some("u1".into()));
        let (ida, idb) = (a.id(), b.id());
        assert!(idb > ida);
        drop(a);
        let c = r.register(ConnKind::Tcp, peer(), None);
        assert!(c.id() > idb, "a freed id is not handed out again");
        let ids: Vec<u64> = r.list().iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![idb, c.id()]);
        assert_eq!(r.page(idb, 10).len(), 1);
        assert_eq!(r.page(0, 1)[0].id, idb);
        assert!(r.get(ida).is_none());
        assert_eq!(r.get(idb).unwrap().subject.as_deref(), Some("u1"));
    }

    #[test]
    fn delivered_counts_survive_ended_subscriptions_and_closed_connections() {
        let r = Registry::new();
        let conn = r.register(ConnKind::Tcp, peer(), None);
        let one = conn.tcp_subscription(1, "orders", None, 7, 0);
        let two = conn.tcp_subscription(2, "billing", Some("workers"), 7, 0);
        one.advance(7, 5, 5);
        two.advance(7, 2, 2);
        let info = r.get(conn.id()).unwrap();
        assert_eq!(info.delivered, 7);
        assert_eq!(info.subscriptions.len(), 2);
        assert_eq!(info.subscriptions[0].position, 5);
        assert_eq!(info.subscriptions[1].group.as_deref(), Some("workers"));
        drop(one);
        let info = r.get(conn.id()).unwrap();
        assert_eq!((info.delivered, info.subscriptions.len()), (7, 1));
        let stats = r.stats();
        assert_eq!(
            (stats.tcp, stats.tcp_subscriptions, stats.delivered),
            (1, 1, 7)
        );
        drop(two);
        drop(conn);
        let stats = r.stats();
        assert_eq!((stats.tcp, stats.opened, stats.delivered), (0, 1, 7));
    }

    #[tokio::test]
    async fn close_fires_the_signal_and_resolves_once_the_guard_drops() {
        let r = Registry::new();
        let conn = r.register(ConnKind::Sse, peer(), None);
        let signal = conn.closed();
        assert!(r.close(conn.id() + 1_000_000).is_none());
        let closing = r.close(conn.id()).unwrap();
        assert!(signal.is_cancelled());
        let waiter = tokio::spawn(closing.gone(Duration::from_secs(10)));
        drop(conn);
        assert!(waiter.await.unwrap());
    }
}
