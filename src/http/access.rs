//! Who calls ([`Caller`], [`SseCaller`]) and whether it may: the checks every
//! `/v1` handler runs before it touches the engine, so a refusal never says
//! whether a topic exists and a refused request stores nothing.
//!
//! Credentials: `Authorization: Bearer <JWT or API key>` on every route. The
//! SSE stream, which a browser's `EventSource` opens without headers, also
//! takes the cookie named `auth.cookie` and, when `auth.query_token`,
//! `?access_token=`. Precedence: header, cookie, query. A credential that is
//! present is the one checked, valid or not: a bad header never falls back
//! to a cookie.
//!
//! Refusals: 401 `unauthorized` (missing or invalid credentials) or
//! `token_expired`, both with `WWW-Authenticate: Bearer`; 403 `forbidden`
//! (authenticated, not granted). Each is counted in
//! `ringcast_auth_refusals_total{transport, code}`. Nothing here logs a
//! credential, nor a query, which may hold one.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use serde::Deserialize;

use super::conn::Peer;
use super::{ApiError, HttpState};
use crate::auth::{Action, AuthConfig, Denied, Kind, Principal};

/// The authenticated caller of an API route (credentials from
/// `Authorization` only).
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// Who it is and what it may do.
    pub(crate) principal: Principal,
    /// `http` or `sse`, for metrics and logs.
    transport: &'static str,
}

/// The caller of the SSE stream: credentials from `Authorization`, the
/// `auth.cookie` cookie or `?access_token=`.
#[derive(Debug, Clone)]
pub(crate) struct SseCaller(pub(crate) Caller);

impl Caller {
    /// `Ok` when `action` on `topic` is granted; otherwise the refusal
    /// (401 for an anonymous caller, 403 for others), counted and logged.
    pub(crate) fn require(&self, action: Action, topic: &str) -> Result<(), ApiError> {
        if self.principal.may(action, topic) {
            return Ok(());
        }
        Err(self.refuse(self.principal.refusal(action, topic)))
    }

    /// `Ok` when `action` is granted on every topic (what broker-wide
    /// routes need: connections, stats); `what` names the request.
    pub(crate) fn require_everywhere(&self, action: Action, what: &str) -> Result<(), ApiError> {
        if self.principal.may_everywhere(action) {
            return Ok(());
        }
        Err(self.refuse(self.principal.refusal_everywhere(action, what)))
    }

    /// `Ok` when the caller holds any grant (what listing topics needs).
    pub(crate) fn require_any_grant(&self) -> Result<(), ApiError> {
        if self.principal.has_any_grant() {
            return Ok(());
        }
        Err(self.refuse(if self.principal.kind() == Kind::Anonymous {
            Denied::Missing("credentials required to list topics".into())
        } else {
            Denied::Forbidden("not granted: no topic at all".into())
        }))
    }

    /// The response for `denied`, counted and logged.
    fn refuse(&self, denied: Denied) -> ApiError {
        refused(self.transport, &denied, None)
    }
}

/// Counts and logs a refusal of access control, and answers it.
fn refused(transport: &'static str, denied: &Denied, uri: Option<&Uri>) -> ApiError {
    let code = denied.code();
    crate::metrics::auth_refused(transport, code);
    match uri {
        Some(uri) => {
            tracing::warn!(transport, code, uri = %loggable(uri), "request refused: {denied}")
        }
        None => tracing::warn!(transport, code, "request refused: {denied}"),
    }
    let (status, challenge) = match denied {
        Denied::Missing(_) => (StatusCode::UNAUTHORIZED, Some(CHALLENGE)),
        Denied::Invalid(_) | Denied::Expired(_) => {
            (StatusCode::UNAUTHORIZED, Some(CHALLENGE_INVALID))
        }
        Denied::Forbidden(_) => (StatusCode::FORBIDDEN, None),
    };
    let mut e = ApiError::new(status, code, denied.to_string());
    e.challenge = challenge;
    e
}

/// `WWW-Authenticate` of a 401 without credentials (RFC 6750).
const CHALLENGE: &str = "Bearer realm=\"ringcast\"";
/// `WWW-Authenticate` of a 401 for invalid or expired credentials.
const CHALLENGE_INVALID: &str = "Bearer realm=\"ringcast\", error=\"invalid_token\"";

impl FromRequestParts<HttpState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        identify(parts, state, false, "http")
    }
}

impl FromRequestParts<HttpState> for SseCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        identify(parts, state, true, "sse").map(SseCaller)
    }
}

fn identify(
    parts: &Parts,
    state: &HttpState,
    sse: bool,
    transport: &'static str,
) -> Result<Caller, ApiError> {
    let peer = parts.extensions.get::<Peer>().map(|p| p.0.ip());
    let auth = &state.auth;
    // Auth off: what the broker always did, whatever the request carries.
    let principal = if auth.enabled() {
        credential(&parts.headers, &parts.uri, auth.config(), sse)
    } else {
        Ok(None)
    }
    .and_then(|c| auth.authenticate(c.as_deref(), peer))
    .map_err(|denied| refused(transport, &denied, Some(&parts.uri)))?;
    Ok(Caller {
        principal,
        transport,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TokenQuery {
    access_token: Option<String>,
}

/// The credential a request presents, by precedence; `None` = anonymous.
fn credential(
    headers: &HeaderMap,
    uri: &Uri,
    config: &AuthConfig,
    sse: bool,
) -> Result<Option<String>, Denied> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let bad = || Denied::Invalid("the Authorization header must be `Bearer <token>`".into());
        let value = value.to_str().map_err(|_| bad())?.trim();
        let (scheme, token) = value.split_once(' ').ok_or_else(bad)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(bad());
        }
        return Ok(Some(token.to_owned()));
    }
    if !sse {
        return Ok(None);
    }
    if !config.cookie.is_empty() {
        if let Some(token) = cookie(headers, &config.cookie) {
            return Ok(Some(token));
        }
    }
    let query = axum::extract::Query::<TokenQuery>::try_from_uri(uri)
        .map_err(|_| Denied::Invalid("the query string is malformed".into()))?;
    match query.0.access_token {
        Some(_) if !config.query_token => Err(Denied::Invalid(
            "?access_token= is turned off here (auth.query_token = false): send the token in the Authorization header or the cookie".into(),
        )),
        token => Ok(token),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers (RFC 6265:
/// `name=value` pairs separated by `; `), unquoted.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| n.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

/// `uri` for logs: the path and the query without the value of
/// `access_token` (a credential), however its name is percent-encoded.
pub(crate) fn loggable(uri: &Uri) -> String {
    let Some(query) = uri.query() else {
        return uri.path().to_owned();
    };
    let query: Vec<&str> = query
        .split('&')
        .map(|pair| {
            let name = pair.split_once('=').map_or(pair, |(name, _)| name);
            if percent_decoded(name) == b"access_token" {
                "access_token=<redacted>"
            } else {
                pair
            }
        })
        .collect();
    format!("{}?{}", uri.path(), query.join("&"))
}

/// `s` with `%XX` escapes decoded (as a query's names are read).
fn percent_decoded(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                // Two hex digits: at most 255.
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn config(cookie: &str, query_token: bool) -> AuthConfig {
        AuthConfig {
            cookie: cookie.into(),
            query_token,
            ..AuthConfig::default()
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn the_header_wins_over_the_cookie_which_wins_over_the_query() {
        let uri: Uri = "/v1/topics/t/events?access_token=q".parse().unwrap();
        let c = config("tok", true);
        let all = headers(&[("authorization", "Bearer h"), ("cookie", "a=1; tok=c")]);
        assert_eq!(
            credential(&all, &uri, &c, true).unwrap().as_deref(),
            Some("h")
        );
        let cookie_only = headers(&[("cookie", "a=1"), ("cookie", "tok=\"c\"")]);
        assert_eq!(
            credential(&cookie_only, &uri, &c, true).unwrap().as_deref(),
            Some("c")
        );
        assert_eq!(
            credential(&HeaderMap::new(), &uri, &c, true)
                .unwrap()
                .as_deref(),
            Some("q")
        );
        // Outside the SSE stream only the header counts.
        assert_eq!(credential(&cookie_only, &uri, &c, false).unwrap(), None);
        // No cookie name: cookies are not read.
        assert_eq!(
            credential(&cookie_only, &uri, &config("", true), true)
                .unwrap()
                .as_deref(),
            Some("q")
        );
    }

    #[test]
    fn a_malformed_authorization_header_is_invalid_not_anonymous() {
        let uri: Uri = "/".parse().unwrap();
        let c = config("tok", true);
        for bad in ["Basic abc", "Bearer", "Bearer   ", "token"] {
            let h = headers(&[("authorization", bad), ("cookie", "tok=c")]);
            assert_eq!(
                credential(&h, &uri, &c, true).unwrap_err().code(),
                "unauthorized",
                "{bad:?}"
            );
        }
        let h = headers(&[("authorization", "bearer  k ")]);
        assert_eq!(
            credential(&h, &uri, &c, false).unwrap().as_deref(),
            Some("k")
        );
    }

    #[test]
    fn a_query_token_is_refused_when_turned_off() {
        let uri: Uri = "/v1/topics/t/events?access_token=q".parse().unwrap();
        let e = credential(&HeaderMap::new(), &uri, &config("tok", false), true).unwrap_err();
        assert!(e.to_string().contains("auth.query_token"), "{e}");
    }

    #[test]
    fn logged_uris_never_hold_the_query_token() {
        let uri: Uri = "/v1/topics/t/events?types=a&access_token=eyJ.secret.x&last_event_id=1:2"
            .parse()
            .unwrap();
        assert_eq!(
            loggable(&uri),
            "/v1/topics/t/events?types=a&access_token=<redacted>&last_event_id=1:2"
        );
        assert_eq!(loggable(&"/healthz".parse().unwrap()), "/healthz");
        let encoded: Uri = "/e?access%5Ftoken=eyJ.x.y&%61ccess_token=k"
            .parse()
            .unwrap();
        assert_eq!(
            loggable(&encoded),
            "/e?access_token=<redacted>&access_token=<redacted>"
        );
    }
}
