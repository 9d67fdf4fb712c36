//! Cross-site protection: which web pages may use the broker from another
//! origin, and which `Host` names a loopback listener answers.
//!
//! CORS headers alone protect nothing: a cross-origin `POST` with
//! `Content-Type: text/plain` is a "simple request" that the browser sends
//! without asking, and only the answer is hidden from the page. So the
//! server refuses it itself ([`guard`]), whatever its content type:
//!
//! - A request whose `Origin` is not the broker's own (`http://<Host>` or
//!   `https://<Host>`, the latter behind a TLS proxy) is refused with 403
//!   `origin_not_allowed` unless that origin is listed: reads (`GET`, `HEAD`)
//!   in `server.cors_origins` (or `"*"` there), writes (everything else) in
//!   `server.cors_write_origins`. An origin listed for writes may also read.
//!   Requests without `Origin` (curl, backends) are not cross-site requests.
//! - On a loopback listener, `Host` must name `localhost`, `127.0.0.1`,
//!   `[::1]` or one of `server.allowed_hosts` (`"*"` = any), else 403
//!   `host_not_allowed`: a page whose DNS name was re-pointed at 127.0.0.1
//!   (DNS rebinding) is its own origin, and only its `Host` gives it away.
//!
//! CORS headers come from tower-http's `CorsLayer` ([`with_cors`]): listed
//! origins are reflected with `Access-Control-Allow-Credentials: true`;
//! `"*"` answers `Access-Control-Allow-Origin: *`, never with credentials.
//! A preflight for a write succeeds only for a write origin.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::{Layer as _, ServiceExt as _};
use tower_http::cors::{AllowHeaders, AllowOrigin, Cors, CorsLayer};

use super::{ApiError, HttpSettings, HttpState, SSE_ROUTE};

/// The cross-site rules of one listener, from its settings.
#[derive(Debug)]
pub(crate) struct CrossSite {
    /// Origins that may read, lower case (without `"*"`).
    reads: Vec<String>,
    /// `"*"` is among `cors_origins`.
    any_read: bool,
    /// Origins that may write (and read), lower case.
    writes: Vec<String>,
    /// Whether `Host` is checked (loopback listener).
    check_host: bool,
    /// Host names accepted besides the loopback ones, lower case.
    hosts: Vec<String>,
    /// `"*"` is among `allowed_hosts`.
    any_host: bool,
}

/// Host names a loopback listener always answers.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

impl CrossSite {
    /// The rules of `settings`.
    pub(crate) fn new(settings: &HttpSettings) -> Self {
        let lower = |list: &[String]| -> Vec<String> {
            list.iter()
                .filter(|o| *o != "*")
                .map(|o| o.to_ascii_lowercase())
                .collect()
        };
        Self {
            reads: lower(&settings.cors_origins),
            any_read: settings.cors_origins.iter().any(|o| o == "*"),
            writes: lower(&settings.cors_write_origins),
            check_host: settings.check_host,
            hosts: lower(&settings.allowed_hosts),
            any_host: settings.allowed_hosts.iter().any(|h| h == "*"),
        }
    }

    /// Whether `origin` is listed by name for a write (`write`) or a read.
    fn listed(&self, origin: &str, write: bool) -> bool {
        let has = |list: &[String]| list.iter().any(|o| o.eq_ignore_ascii_case(origin));
        has(&self.writes) || (!write && has(&self.reads))
    }

    /// Whether `host` (a `Host` header: name and optional port) may be
    /// answered.
    fn host_allowed(&self, host: &str) -> bool {
        if !self.check_host || self.any_host {
            return true;
        }
        let name = host_name(host);
        LOOPBACK_HOSTS.iter().any(|h| h.eq_ignore_ascii_case(name))
            || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// `Ok`, or the refusal's code and message.
    fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), (&'static str, String)> {
        let host = match headers.get(header::HOST).map(|h| h.to_str()) {
            Some(Ok(host)) => Some(host),
            Some(Err(_)) => {
                return Err(("host_not_allowed", "the Host header is not ASCII".into()))
            }
            // Browsers always send Host; a client without one is no page.
            None => None,
        };
        if let Some(host) = host {
            if !self.host_allowed(host) {
                return Err((
                    "host_not_allowed",
                    format!(
                        "Host {:?} is not served on this loopback listener (DNS rebinding \
                         defence); add it to server.allowed_hosts",
                        host_name(host)
                    ),
                ));
            }
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let Ok(origin) = origin.to_str() else {
            return Err((
                "origin_not_allowed",
                "the Origin header is not ASCII".into(),
            ));
        };
        if host.is_some_and(|host| same_origin(origin, host)) {
            return Ok(());
        }
        let write = is_write(method);
        if self.listed(origin, write) || (!write && self.any_read) {
            return Ok(());
        }
        let key = if write {
            "server.cors_write_origins"
        } else {
            "server.cors_origins"
        };
        Err((
            "origin_not_allowed",
            format!(
                "{} from origin {origin:?} are not allowed; add the origin to {key}",
                if write { "writes" } else { "reads" }
            ),
        ))
    }
}

/// Whether `method` changes something (what needs a write origin).
fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD)
}

/// The method a request is about: a preflight's
/// `Access-Control-Request-Method`, else its own. A bare `OPTIONS` counts
/// as a write (nothing is allowed for it).
fn intended_write(method: &Method, headers: &HeaderMap) -> bool {
    if *method != Method::OPTIONS {
        return is_write(method);
    }
    headers
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .is_none_or(|m| is_write(&m))
}

/// The name part of a `Host` value: without the port, a trailing dot, or
/// anything after a `/` (which no valid Host holds).
fn host_name(host: &str) -> &str {
    let host = host.trim();
    let name = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.strip_suffix('.').unwrap_or(name)
}

/// Whether `origin` is the broker's own as reached through `host`.
fn same_origin(origin: &str, host: &str) -> bool {
    ["http://", "https://"].iter().any(|scheme| {
        origin.len() == scheme.len() + host.len()
            && origin[..scheme.len()].eq_ignore_ascii_case(scheme)
            && origin[scheme.len()..].eq_ignore_ascii_case(host)
    })
}

/// Refuses cross-site requests that are not allowed (see the module docs)
/// before routing goes further: no limit permit, no credential check, no
/// engine call.
pub(crate) async fn guard(
    State(state): State<HttpState>,
    request: Request,
    next: Next,
) -> Response {
    if let Err((code, message)) = state.cross_site.check(request.method(), request.headers()) {
        let sse = request.method() == Method::GET
            && request
                .extensions()
                .get::<MatchedPath>()
                .is_some_and(|p| p.as_str() == SSE_ROUTE);
        let transport = if sse { "sse" } else { "http" };
        crate::metrics::auth_refused(transport, code);
        tracing::warn!(
            transport,
            code,
            uri = %super::access::loggable(request.uri()),
            "cross-site request refused: {message}"
        );
        return ApiError::new(StatusCode::FORBIDDEN, code, message).into_response();
    }
    next.run(request).await
}

/// Request headers a page on any origin (`"*"` in `cors_origins`) may send.
const ALLOWED_HEADERS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    HeaderName::from_static("last-event-id"),
    HeaderName::from_static("idempotency-key"),
];
/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(3600);

/// `app` behind CORS: listed origins through a credentialed `CorsLayer`,
/// reads from anywhere else (with `"*"` configured) through a wildcard one.
pub(crate) fn with_cors(app: Router, rules: Arc<CrossSite>) -> Router {
    let for_listed = rules.clone();
    let listed = CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, parts| {
            origin.to_str().is_ok_and(|origin| {
                for_listed.listed(origin, intended_write(&parts.method, &parts.headers))
            })
        }))
        .allow_credentials(true)
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::DELETE,
        ])
        // A listed origin is trusted: whatever headers its preflight asks
        // for (`X-Ringcast-Header-*` event headers included) are allowed.
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([header::RETRY_AFTER])
        .max_age(PREFLIGHT_MAX_AGE);
    if !rules.any_read {
        return app.layer(listed);
    }
    let wildcard = CorsLayer::new()
        .allow_origin(AllowOrigin::any())
        .allow_methods([Method::GET, Method::HEAD])
        .allow_headers(ALLOWED_HEADERS)
        .expose_headers([header::RETRY_AFTER])
        .max_age(PREFLIGHT_MAX_AGE);
    Router::new().fallback_service(ChooseCors {
        listed: listed.layer(app.clone()),
        wildcard: wildcard.layer(app),
        rules,
    })
}

/// Sends each request through the `CorsLayer` that answers for its origin:
/// the wildcard one for a read from an origin not listed by name, the
/// credentialed one otherwise (which refuses what is not listed).
#[derive(Clone)]
struct ChooseCors {
    listed: Cors<Router>,
    wildcard: Cors<Router>,
    rules: Arc<CrossSite>,
}

impl tower::Service<Request> for ChooseCors {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = tower::util::Oneshot<Cors<Router>, Request>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both services are clones of routers, always ready; each call
        // drives its own clone (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let wildcard = !intended_write(request.method(), request.headers())
            && request
                .headers()
                .get(header::ORIGIN)
                .and_then(|o| o.to_str().ok())
                .is_some_and(|origin| !self.rules.listed(origin, false));
        let service = if wildcard {
            self.wildcard.clone()
        } else {
            self.listed.clone()
        };
        service.oneshot(request)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn rules(reads: &[&str], writes: &[&str], hosts: &[&str], check_host: bool) -> CrossSite {
        let own = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        let settings = HttpSettings {
            cors_origins: own(reads),
            cors_write_origins: own(writes),
            allowed_hosts: own(hosts),
            check_host,
            ..HttpSettings::from_config(&crate::config::Config::default())
        };
        CrossSite::new(&settings)
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn host_names_lose_their_port_and_trailing_dot() {
        assert_eq!(host_name("localhost:7480"), "localhost");
        assert_eq!(host_name("[::1]:7480"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("Example.COM."), "Example.COM");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
    }

    #[test]
    fn a_loopback_listener_answers_loopback_names_and_listed_hosts_only() {
        let r = rules(&[], &[], &["broker.internal"], true);
        for ok in [
            "localhost",
            "LOCALHOST:1",
            "127.0.0.1:7480",
            "[::1]:7480",
            "broker.internal:80",
        ] {
            assert!(r.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "127.0.0.2",
            "localhost.evil.example:7480",
            "",
        ] {
            assert!(!r.host_allowed(bad), "{bad}");
        }
        assert!(rules(&[], &[], &["*"], true).host_allowed("evil.example"));
        assert!(rules(&[], &[], &[], false).host_allowed("evil.example"));
    }

    #[test]
    fn the_own_origin_and_listed_origins_pass_and_others_are_refused() {
        let r = rules(
            &["https://app.example"],
            &["https://admin.example"],
            &[],
            true,
        );
        let get = |origin: &'static str| {
            r.check(
                &Method::GET,
                &headers(&[("host", "localhost:7480"), ("origin", origin)]),
            )
        };
        let post = |origin: &'static str| {
            r.check(
                &Method::POST,
                &headers(&[("host", "localhost:7480"), ("origin", origin)]),
            )
        };
        assert!(get("http://localhost:7480").is_ok());
        assert!(post("http://LOCALHOST:7480").is_ok());
        assert!(post("https://localhost:7480").is_ok());
        assert!(get("https://app.example").is_ok());
        assert!(get("https://admin.example").is_ok(), "writers may read");
        assert_eq!(
            post("https://app.example").unwrap_err().0,
            "origin_not_allowed"
        );
        assert!(post("https://admin.example").is_ok());
        assert_eq!(
            get("http://localhost:7481").unwrap_err().0,
            "origin_not_allowed"
        );
        assert_eq!(get("null").unwrap_err().0, "origin_not_allowed");
        let (code, message) = r
            .check(&Method::GET, &headers(&[("host", "evil.example:7480")]))
            .unwrap_err();
        assert_eq!(code, "host_not_allowed");
        assert!(message.contains("server.allowed_hosts"), "{message}");
        assert!(r.check(&Method::DELETE, &HeaderMap::new()).is_ok());
    }

    #[test]
    fn a_wildcard_lets_any_origin_read_but_not_write() {
        let r = rules(&["*"], &[], &[], false);
        let h = headers(&[("host", "b:1"), ("origin", "https://x.example")]);
        assert!(r.check(&Method::GET, &h).is_ok());
        assert_eq!(
            r.check(&Method::DELETE, &h).unwrap_err().0,
            "origin_not_allowed"
        );
    }

    #[test]
    fn preflights_are_judged_by_the_method_they_ask_for() {
        let ask = |m: &'static str| headers(&[("access-control-request-method", m)]);
        assert!(!intended_write(&Method::OPTIONS, &ask("GET")));
        assert!(intended_write(&Method::OPTIONS, &ask("POST")));
        assert!(intended_write(&Method::OPTIONS, &ask("DELETE")));
        assert!(intended_write(&Method::OPTIONS, &HeaderMap::new()));
        assert!(!intended_write(&Method::HEAD, &HeaderMap::new()));
    }
}
