//! A running broker: the engine plus its front ends, with one shutdown.
//!
//! `ringcastd` and the tests both start brokers through [`Broker::start`],
//! so tests exercise exactly what the daemon runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::Config;
use crate::conns::Registry;
use crate::engine::Engine;
use crate::http::{self, HttpSettings, HttpState};
use crate::tcp::{self, TcpSettings};

/// A started broker. Stop it with [`Broker::shutdown`] (graceful) or
/// [`Broker::kill`] (abrupt, like a crash, for tests).
#[derive(Debug)]
pub struct Broker {
    engine: Engine,
    tcp_addr: SocketAddr,
    http_addr: SocketAddr,
    http: HttpState,
    auth: Arc<Auth>,
    conns: Registry,
    shutdown_timeout: Duration,
    shutdown: CancellationToken,
    kill: CancellationToken,
    tracker: TaskTracker,
}

impl Broker {
    /// Recovers storage, binds every listener and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        // Before recovery, which can take long: a config that must not serve
        // is refused at once.
        Self::check_exposure(&config)?;
        // Before the engine: it takes its metric handles when it opens.
        crate::metrics::handle();
        let options = config.engine_options();
        let data_dir = config.storage.data_dir.clone();
        let engine = tokio::task::spawn_blocking(move || Engine::open(options))
            .await
            .context("storage recovery task failed")?
            .with_context(|| format!("cannot open storage in {}", data_dir.display()))?;
        Self::start_with_engine(config, engine).await
    }

    /// Starts the front ends over an already opened engine (open it after
    /// [`crate::metrics::handle`] for its metrics to be recorded).
    pub async fn start_with_engine(config: Config, engine: Engine) -> anyhow::Result<Self> {
        crate::metrics::handle();
        Self::check_exposure(&config)?;
        let auth = Arc::new(Auth::new(&config.auth)?);
        let tcp_listener = TcpListener::bind(config.server.tcp_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (server.tcp_listen)",
                    config.server.tcp_listen
                )
            })?;
        let tcp_addr = tcp_listener.local_addr()?;
        let http_listener = TcpListener::bind(config.server.http_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (server.http_listen)",
                    config.server.http_listen
                )
            })?;
        let http_addr = http_listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let kill = CancellationToken::new();
        let tracker = TaskTracker::new();
        let conns = Registry::new();
        tracker.spawn(housekeeping(auth.clone(), shutdown.clone(), kill.clone()));
        tracker.spawn(tcp::serve(
            tcp_listener,
            engine.clone(),
            auth.clone(),
            conns.clone(),
            TcpSettings::from_config(&config),
            shutdown.clone(),
            kill.clone(),
            tracker.clone(),
        ));
        let http = HttpState::new(
            engine.clone(),
            auth.clone(),
            HttpSettings::from_config(&config),
            shutdown.clone(),
        )
        .with_connections(conns.clone());
        let app = http::router(http.clone());
        tracker.spawn(http::serve(
            http_listener,
            app,
            http.clone(),
            shutdown.clone(),
            kill.clone(),
            tracker.clone(),
        ));
        http.set_ready(true);
        Ok(Self {
            engine,
            tcp_addr,
            http_addr,
            http,
            auth,
            conns,
            shutdown_timeout: config.server.shutdown_timeout,
            shutdown,
            kill,
            tracker,
        })
    }

    /// The bound TCP address (useful when configured with port 0).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// The bound HTTP address (useful when configured with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Access control shared by the front ends.
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The registry of live client connections (TCP and SSE).
    pub fn connections(&self) -> &Registry {
        &self.conns
    }

    /// Re-reads the JWT key files (SIGHUP): tokens signed by keys added are
    /// accepted from now on, those of keys removed are refused. On error
    /// the keys in use stay.
    pub fn reload_auth(&self) -> anyhow::Result<()> {
        self.auth.reload()
    }

    fn check_exposure(config: &Config) -> anyhow::Result<()> {
        Auth::check_exposure(
            &config.auth,
            &[
                ("server.tcp_listen", config.server.tcp_listen),
                ("server.http_listen", config.server.http_listen),
            ],
        )
    }

    /// The engine the front ends serve.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Stops accepting, tells clients, delivers pending acks, then flushes
    /// storage. Gives up waiting for connections after `shutdown_timeout`.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.http.set_ready(false);
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.shutdown_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections did not finish within shutdown_timeout; closing anyway");
            self.kill.cancel();
        }
        self.engine.close().await.context("flushing storage")?;
        Ok(())
    }

    /// Drops every connection at once without a goodbye and without a final
    /// flush beyond what the durability mode already did — a crash, as far
    /// as clients can tell. Waits until every task is gone, so the data dir
    /// can be reopened.
    pub async fn kill(self) {
        self.kill.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Keeps the rate limiters' maps to recent clients.
async fn housekeeping(auth: Arc<Auth>, shutdown: CancellationToken, kill: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = kill.cancelled() => return,
            _ = tick.tick() => auth.limits().housekeeping(),
        }
    }
}
