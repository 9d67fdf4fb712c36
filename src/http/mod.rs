//! The HTTP front end (axum): the SSE bridge for browsers, a JSON API
//! beside it, and health endpoints.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /v1/topics/{topic}/events` | SSE stream ([`sse`]) |
//! | `POST /v1/topics/{topic}/events?type=T` | publish the body |
//! | `POST /v1/topics/{topic}/events:batch` | publish a JSON array atomically |
//! | `GET /v1/topics/{topic}/history` | paginated retained events |
//! | `GET /v1/topics`, `GET /v1/topics/{topic}` | list, info |
//! | `POST /v1/topics/{topic}/seal`, `DELETE /v1/topics/{topic}` | lifecycle |
//! | `GET /v1/connections`, `GET`/`DELETE /v1/connections/{id}` | live connections ([`conns`]) |
//! | `GET /v1/stats` | broker-wide counts |
//! | `GET /healthz`, `GET /readyz` | liveness, readiness |
//! | `GET /metrics` | Prometheus text |
//!
//! Every `/v1` route checks the caller's credentials and grants
//! (`access.rs`) before it touches the engine; `/healthz`, `/readyz` and
//! `/metrics` need none (probes and scrapers carry no token, and they
//! reveal no topic). Every route is behind the cross-site checks
//! (`cross_site.rs`): `Origin` (with CORS) and, on a loopback listener, `Host`.

mod access;
mod api;
mod compress;
mod conn;
mod conns;
mod cross_site;
mod envelope;
mod groups;
mod h1;
mod sse;
mod stream_id;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::config::Config;
use crate::engine::{Engine, EngineError};

/// Settings of the HTTP front end.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Interval of SSE heartbeat comments.
    pub heartbeat: Duration,
    /// Reconnect delay suggested to browsers (`retry:`).
    pub retry: Duration,
    /// Most SSE connections at once.
    pub max_sse_connections: usize,
    /// Most topics and patterns one SSE stream may name.
    pub max_stream_topics: usize,
    /// Most topics the patterns of one SSE stream may bring in.
    pub max_pattern_matches: usize,
    /// Largest payload accepted by `POST .../events`.
    pub max_payload: u64,
    /// Largest body of `POST .../events:batch` (`limits.max_frame`, the
    /// largest TCP request).
    pub max_batch_body: u64,
    /// Origins whose pages may read cross-origin (`*` = any, without
    /// credentials).
    pub cors_origins: Vec<String>,
    /// Origins whose pages may also write (publish, seal, delete) cross-origin.
    pub cors_write_origins: Vec<String>,
    /// Host names accepted in `Host` besides the loopback ones (`*` = any),
    /// when `check_host`.
    pub allowed_hosts: Vec<String>,
    /// Whether `Host` is checked: the listener is on a loopback address,
    /// where a DNS-rebound page could otherwise reach it.
    pub check_host: bool,
    /// Most HTTP connections at once.
    pub max_connections: usize,
    /// Most non-SSE requests handled at once.
    pub max_requests: usize,
    /// Bytes an SSE stream may have queued that its peer has not read.
    pub max_outbound_bytes: usize,
    /// Most payload bytes in one history page.
    pub max_history_bytes: usize,
    /// A started request (headers and body) must arrive whole within this.
    pub read_timeout: Duration,
    /// Topics whose consumer groups get their own `/metrics` series
    /// (`[metrics] topics`).
    pub metered_topics: Vec<String>,
}

impl HttpSettings {
    /// Settings taken from a daemon config.
    pub fn from_config(config: &Config) -> Self {
        Self {
            heartbeat: config.server.heartbeat,
            retry: Duration::from_secs(2),
            max_sse_connections: config.limits.max_sse_connections,
            max_stream_topics: config.limits.max_stream_topics,
            max_pattern_matches: config.limits.max_pattern_matches,
            max_payload: config.limits.max_payload.as_u64(),
            max_batch_body: config.limits.max_frame.as_u64(),
            cors_origins: config.server.cors_origins.clone(),
            cors_write_origins: config.server.cors_write_origins.clone(),
            allowed_hosts: config.server.allowed_hosts.clone(),
            check_host: config.server.http_listen.ip().to_canonical().is_loopback(),
            max_connections: config.limits.max_http_connections,
            max_requests: config.limits.max_http_requests,
            max_outbound_bytes: crate::config::usize_bytes(config.limits.max_outbound_bytes),
            max_history_bytes: crate::config::usize_bytes(config.limits.max_history_bytes),
            read_timeout: config.server.read_timeout,
            metered_topics: config.metrics.topics.clone(),
        }
    }
}

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct HttpState {
    engine: Engine,
    auth: Arc<Auth>,
    settings: Arc<HttpSettings>,
    cross_site: Arc<cross_site::CrossSite>,
    sse_permits: Arc<Semaphore>,
    request_permits: Arc<Semaphore>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    connections: crate::conns::Registry,
}

impl HttpState {
    /// State over `engine`; `shutdown` ends SSE streams with `event: shutdown`.
    pub fn new(
        engine: Engine,
        auth: Arc<Auth>,
        settings: HttpSettings,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            engine,
            auth,
            cross_site: Arc::new(cross_site::CrossSite::new(&settings)),
            sse_permits: Arc::new(Semaphore::new(settings.max_sse_connections)),
            request_permits: Arc::new(Semaphore::new(settings.max_requests)),
            settings: Arc::new(settings),
            ready: Arc::new(AtomicBool::new(false)),
            shutdown,
            connections: crate::conns::Registry::default(),
        }
    }

    /// The settings every handler shares (and `serve` uses).
    pub fn settings(&self) -> Arc<HttpSettings> {
        self.settings.clone()
    }

    /// Marks the broker ready (or not) for `/readyz`.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}

/// The HTTP application, separate from serving so tests can mount it.
pub fn router(state: HttpState) -> Router {
    let cross_site = state.cross_site.clone();
    let app = Router::new()
        .route("/v1/topics", get(api::list_topics))
        .route(
            "/v1/topics/{topic}",
            get(api::topic_info).delete(api::delete_topic),
        )
        .route(SSE_ROUTE, post(api::publish))
        .route("/v1/topics/{topic}/events:batch", post(api::publish_batch))
        .route("/v1/topics/{topic}/history", get(api::history))
        .route("/v1/topics/{topic}/seal", post(api::seal))
        .route("/v1/connections", get(conns::list))
        .route("/v1/connections/{id}", get(conns::get).delete(conns::close))
        .route("/v1/stats", get(conns::stats))
        .merge(groups::routes())
        .route("/metrics", get(api::metrics))
        // Only the routes above: SSE streams have their own limit, and
        // health probes must answer under load.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_requests,
        ))
        .route(SSE_ROUTE, get(sse::events))
        .route("/v1/events", get(sse::events_many))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .fallback(api::not_found)
        // Before anything else, the request limit included: a refused
        // cross-site request costs nothing.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cross_site::guard,
        ))
        .with_state(state);
    cross_site::with_cors(app, cross_site)
}

/// The route of the SSE stream (`GET`) and of publishing (`POST`).
const SSE_ROUTE: &str = "/v1/topics/{topic}/events";

/// Holds one of `max_requests` permits while an API request is handled
/// (its body read included); without one the request is refused at once
/// with 503, so an overload is answered, never queued.
async fn limit_requests(
    axum::extract::State(state): axum::extract::State<HttpState>,
    request: Request,
    next: Next,
) -> Response {
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    let Ok(_permit) = state.request_permits.clone().try_acquire_owned() else {
        crate::metrics::refused("max_http_requests");
        tracing::warn!(path, "HTTP request refused: too many requests in flight");
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "over_capacity",
            format!(
                "too many HTTP requests in flight (limit {}); retry later",
                state.settings.max_requests
            ),
        )
        .into_response();
    };
    next.run(request).await
}

/// Serves `app` (built over `state`) on `listener` with every connection
/// tracked by `tracker`: `shutdown` ends SSE streams (with `event:
/// shutdown`) and closes idle keep-alive connections; `kill` drops every
/// connection at once. At most `max_connections` are open at once: more
/// are closed at accept. A peer IP over `auth.rate.connections_per_second`
/// gets 429 on that connection, which is then closed. Each connection is
/// served by `h1::Connection`: event streams without hyper's buffers,
/// everything else by hyper.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    state: HttpState,
    shutdown: CancellationToken,
    kill: CancellationToken,
    tracker: tokio_util::task::TaskTracker,
) {
    let settings = state.settings();
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let read_timeout = settings.read_timeout;
    let heartbeat = settings.heartbeat;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = kill.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            crate::metrics::refused("max_http_connections");
            tracing::warn!(%peer, limit = settings.max_connections, "HTTP connection refused: too many connections");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        if let Err(limited) = state.auth.limits().check_connect(peer.ip()) {
            tracing::warn!(%peer, "HTTP connection refused: over auth.rate.connections_per_second");
            tracker.spawn(refuse_connection(
                stream,
                limited,
                read_timeout,
                permit,
                kill.clone(),
            ));
            continue;
        }
        // Its first request is read by `h1`, which writes event streams
        // itself and hands everything else to hyper (idle SSE memory).
        let connection = h1::Connection {
            app: app.clone(),
            io: Arc::new(conn::ConnIo::default()),
            peer,
            read_timeout,
            heartbeat,
            shutdown: shutdown.clone(),
            kill: kill.clone(),
            permit,
        };
        tracker.spawn(connection.serve(stream));
    }
}

/// Heartbeats a blocked write may go without progress before its peer is
/// considered gone.
const STALL_HEARTBEATS: u32 = 3;

/// Resolves when the connection should be dropped: a peer that has read
/// nothing for [`STALL_HEARTBEATS`] heartbeats while a write waits (an SSE
/// client that stopped reading would otherwise hold its slot forever).
async fn watchdog(io: &conn::ConnIo, heartbeat: Duration, peer: &std::net::SocketAddr) {
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = io.written();
    let mut stuck = 0;
    loop {
        tick.tick().await;
        let written = io.written();
        if written == last && io.blocked() {
            stuck += 1;
            // The first tick may come right after the write blocked.
            if stuck > STALL_HEARTBEATS {
                write_stalled(peer);
                return;
            }
        } else {
            stuck = 0;
        }
        last = written;
    }
}

/// Counts and logs a connection dropped by the write watchdog (or by the
/// same check in [`h1`]'s event streams).
fn write_stalled(peer: &std::net::SocketAddr) {
    crate::metrics::refused("write_stall");
    tracing::warn!(%peer, "HTTP peer read nothing for {STALL_HEARTBEATS} heartbeats: disconnected");
}

/// Answers every request of a connection over the connection rate with 429
/// and closes it: a tiny service of its own, so the refusal costs no
/// routing, no request permit and no authentication. It holds its
/// connection slot (`permit`) until closed, so `max_connections` still
/// bounds the sockets open.
async fn refuse_connection(
    stream: tokio::net::TcpStream,
    limited: crate::auth::Limited,
    read_timeout: Duration,
    _permit: tokio::sync::OwnedSemaphorePermit,
    kill: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};

    let service = hyper::service::service_fn(move |_request| async move {
        let refusal = ApiError::limited(
            limited,
            "too many new connections from this address (auth.rate.connections_per_second)",
        )
        .closing();
        Ok::<_, std::convert::Infallible>(refusal.into_response())
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = kill.cancelled() => {}
    }
}

/// An error answered as `{"error": {"code", "message"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    close: bool,
    /// Answered as `Retry-After` (whole seconds) and `retry_after_ms`.
    retry_after: Option<Duration>,
    /// Answered as `WWW-Authenticate`.
    challenge: Option<&'static str>,
    /// `(current_offset, current_version)` of a position mismatch.
    current: Option<(u64, u64)>,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            close: false,
            retry_after: None,
            challenge: None,
            current: None,
        }
    }

    /// The refusal of a rate limit: 429 `rate_limited` with `Retry-After`,
    /// or 400 `exceeds_burst` for a request that can never fit. `what` says
    /// which limit, with its config key.
    pub fn limited(limited: crate::auth::Limited, what: &str) -> Self {
        match limited {
            crate::auth::Limited::RetryAfter(after) => {
                let mut e = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!(
                        "{what}; retry after {}",
                        humantime::format_duration(Duration::from_millis(
                            crate::auth::retry_after_ms(after)
                        ))
                    ),
                );
                e.retry_after = Some(after);
                e
            }
            crate::auth::Limited::TooLarge { requested, burst } => Self::new(
                StatusCode::BAD_REQUEST,
                "exceeds_burst",
                format!("{what}: {requested} events at once can never fit the burst of {burst}"),
            ),
        }
    }

    /// The same error, answered with `Connection: close` (the request was
    /// not read to its end, so the connection cannot carry another).
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// A 400 for a malformed query or body.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let (status, code) = match &e {
            EngineError::InvalidTopic(_) => (StatusCode::BAD_REQUEST, "invalid_topic"),
            EngineError::InvalidType(_) => (StatusCode::BAD_REQUEST, "invalid_type"),
            EngineError::InvalidHeaders(_) => (StatusCode::BAD_REQUEST, "invalid_headers"),
            EngineError::EmptyBatch => (StatusCode::BAD_REQUEST, "empty_batch"),
            EngineError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            EngineError::InvalidKey(_) => (StatusCode::BAD_REQUEST, "invalid_idempotency_key"),
            EngineError::PositionMismatch { .. } => (StatusCode::CONFLICT, "position_mismatch"),
            EngineError::InvalidStart(_) => (StatusCode::BAD_REQUEST, "invalid_start"),
            EngineError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            EngineError::TopicNotFound(_) => (StatusCode::NOT_FOUND, "topic_not_found"),
            EngineError::TopicSealed(_) => (StatusCode::CONFLICT, "topic_sealed"),
            EngineError::TooManyTopics(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_topics"),
            EngineError::TooManyMatches(_) => (StatusCode::BAD_REQUEST, "too_many_topics"),
            EngineError::OverCapacity(_) | EngineError::TopicFull { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "over_capacity")
            }
            EngineError::GroupNotFound(_) => (StatusCode::NOT_FOUND, "group_not_found"),
            EngineError::InvalidGroup(_) => (StatusCode::BAD_REQUEST, "invalid_group"),
            EngineError::TooManyGroups(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_groups"),
            EngineError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
            EngineError::StorageUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
            EngineError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        };
        let mut error = Self::new(status, code, e.to_string());
        if let EngineError::PositionMismatch {
            current_offset,
            current_version,
        } = e
        {
            error.current = Some((current_offset, current_version));
        }
        error
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use axum::http::header;

        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(after) = self.retry_after {
            error["retry_after_ms"] = json!(crate::auth::retry_after_ms(after));
        }
        if let Some((offset, version)) = self.current {
            error["current_offset"] = json!(offset);
            error["current_version"] = json!(version);
        }
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        let headers = response.headers_mut();
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(after) = self.retry_after {
            let secs = crate::auth::retry_after_secs(after);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(challenge) = self.challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}
