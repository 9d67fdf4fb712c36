//! Connection management: `GET /v1/connections`, `GET` and `DELETE
//! /v1/connections/{id}`, and broker-wide counts at `GET /v1/stats`.
//!
//! All of them are broker-wide, so they need the admin grant on every topic
//! (a `*` admin pattern; with access control off, everyone has it): a
//! connection's listing names topics and subjects of other clients.

use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::access::Caller;
use super::{ApiError, HttpState};
use crate::auth::Action;
use crate::conns::{ConnInfo, Registry};

/// How long `DELETE` waits for the connection to be gone before answering.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

impl HttpState {
    /// The same state, listing connections in `registry` (the one the TCP
    /// front end registers into too).
    pub fn with_connections(mut self, registry: Registry) -> Self {
        self.connections = registry;
        self
    }

    /// The registry of live connections; SSE streams register here.
    pub(crate) fn connections(&self) -> &Registry {
        &self.connections
    }
}

/// `GET /v1/connections`: every live TCP connection and SSE stream, by id,
/// with its subscriptions' positions and lags.
pub(crate) async fn list(
    caller: Caller,
    State(state): State<HttpState>,
) -> Result<Json<Value>, ApiError> {
    caller.require_everywhere(Action::Admin, "list connections")?;
    let list: Vec<Value> = state
        .connections()
        .snapshot(&state.engine)
        .iter()
        .map(connection)
        .collect();
    Ok(Json(json!({ "connections": list })))
}

/// `GET /v1/connections/{id}`: one connection; 404 when none has the id.
pub(crate) async fn get(
    caller: Caller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_everywhere(Action::Admin, "list connections")?;
    let id = parse_id(&id)?;
    let mut info = [state.connections().get(id).ok_or_else(|| not_found(id))?];
    crate::conns::fill_lag(&state.engine, &mut info);
    Ok(Json(connection(&info[0])))
}

/// `DELETE /v1/connections/{id}`: closes that connection as a broker
/// shutdown would (its client reconnects and resumes); 204 once it is gone
/// (or after [`CLOSE_WAIT`]), 404 when none has the id.
pub(crate) async fn close(
    caller: Caller,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_everywhere(Action::Admin, "close connections")?;
    let id = parse_id(&id)?;
    let closing = state.connections().close(id).ok_or_else(|| not_found(id))?;
    tracing::info!(connection = id, "closing a connection on request");
    if !closing.gone(CLOSE_WAIT).await {
        tracing::warn!(
            connection = id,
            "connection still open {CLOSE_WAIT:?} after it was told to close"
        );
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/stats`: broker-wide counts — connections and subscriptions by
/// front end, topics, retained events and bytes, events delivered.
pub(crate) async fn stats(
    caller: Caller,
    State(state): State<HttpState>,
) -> Result<Json<Value>, ApiError> {
    caller.require_everywhere(Action::Admin, "read broker stats")?;
    let engine = state.engine.stats();
    let conns = state.connections().stats();
    Ok(Json(json!({
        "connections": {
            "total": conns.tcp + conns.sse,
            "tcp": conns.tcp,
            "sse": conns.sse,
            "opened_total": conns.opened,
        },
        "subscriptions": {
            "total": conns.tcp_subscriptions + conns.sse_subscriptions,
            "tcp": conns.tcp_subscriptions,
            "sse": conns.sse_subscriptions,
        },
        "subscribers": engine.subscribers,
        "topics": engine.topics,
        "retained_events": engine.retained_events,
        "retained_bytes": engine.retained_bytes,
        "delivered_total": conns.delivered,
    })))
}

/// A connection id from the path: a decimal `u64`.
fn parse_id(id: &str) -> Result<u64, ApiError> {
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_connection_id",
            format!("connection id {id:?} is not an unsigned integer"),
        )
    })
}

fn not_found(id: u64) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "connection_not_found",
        format!("no live connection {id}"),
    )
}

/// A connection as JSON (epochs as strings, as everywhere in the API: they
/// do not fit a JavaScript number).
fn connection(c: &ConnInfo) -> Value {
    let since = UNIX_EPOCH + Duration::from_millis(c.since_ms);
    let subscriptions: Vec<Value> = c
        .subscriptions
        .iter()
        .map(|s| {
            json!({
                "topic": s.topic,
                "subscription_id": s.subscription_id,
                "group": s.group,
                "epoch": s.epoch.to_string(),
                "position": s.position,
                "lag": s.lag,
                "delivered": s.delivered,
            })
        })
        .collect();
    json!({
        "id": c.id,
        "kind": c.kind.as_str(),
        "peer": c.peer.to_string(),
        "subject": c.subject,
        "since_ms": c.since_ms,
        "since": humantime::format_rfc3339_millis(since).to_string(),
        "delivered": c.delivered,
        "subscriptions": subscriptions,
    })
}
