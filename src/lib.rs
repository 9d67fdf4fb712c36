//! ringcast: a pub/sub broker daemon whose subscribers, after a disconnect,
//! get exactly what they missed — or one explicit `gap` — never a silent hole.
//!
//! # Layout
//! - [`auth`]: credentials (JWT, API keys), per-topic grants, rate limits.
//! - [`config`]: the daemon configuration (TOML, env overrides, validation).
//! - [`engine`]: the topic log — rings, offsets, versions, epochs, retention,
//!   subscriptions (cursors), and the sled store with group commit.
//! - [`tcp`]: the binary TCP front end (`docs/protocol.md`).
//! - [`http`]: the SSE bridge, the JSON API and health endpoints (axum).
//! - [`conns`]: the registry of live client connections (listing, lag,
//!   closing one), shared by the front ends.
//! - [`broker`]: the engine plus its front ends, started and stopped as one.
//! - [`metrics`]: Prometheus metric names and the exporter handle.
//! - [`systemd`]: readiness, status and watchdog notifications.
//!
//! Data flows one way: front end → [`engine::Engine::publish`] → store writer
//! (assign, persist, fsync) → topic ring → subscription cursors → the
//! connection's writer. See `docs/architecture.md`.

#![warn(missing_docs)]

pub mod auth;
pub mod broker;
pub mod config;
pub mod conns;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod systemd;
pub mod tcp;
