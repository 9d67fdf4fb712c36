//! Access control: who a client is ([`Auth::authenticate`]) and what it may
//! do ([`Principal::may`]), shared by every front end.
//!
//! # Layout
//! - this file: `[auth]` config, [`Auth`] (credential checks, key reload on
//!   SIGHUP, the loopback-only rule), [`Principal`] (grants and expiry).
//! - [`jwt`]: JWT keys (HMAC secret, PEM public key, JWKS) and verification
//!   with `jsonwebtoken`.
//! - [`pattern`]: the topic pattern syntax of grants.
//! - [`rate`]: rate limits on `governor`.
//!
//! A credential is either a JWT (three base64url parts joined by `.`) or an
//! API key (anything else), whose SHA-256 is looked up in `[[auth.keys]]`.
//! Credentials are checked once per connection (TCP `Hello`, `Refresh`) or
//! request (HTTP), never per event.

pub mod jwt;
pub mod pattern;
pub mod rate;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use pattern::{PatternError, TopicPattern};
pub use rate::{retry_after_ms, retry_after_secs, Limited, RateConfig, RateLimits, SseSlot};

/// `[auth]`: credentials, grants and rate limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Serve clients without credentials on non-loopback listeners although
    /// no credential is configured (off: such a broker refuses to start).
    pub allow_anonymous_remote: bool,
    /// Accepted clock skew when checking `exp` and `nbf`; an expired session
    /// ends this long after `exp`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Cookie the SSE endpoint reads a token from (for `EventSource` with
    /// `withCredentials`); empty = no cookie.
    pub cookie: String,
    /// Whether the SSE endpoint accepts `?access_token=` (it ends up in
    /// access logs: the last resort).
    pub query_token: bool,
    /// Grants for clients without credentials. Unset: everything while no
    /// credential is configured, nothing once one is.
    pub anonymous: Option<GrantsConfig>,
    /// JWT verification; unset = no JWTs.
    pub jwt: Option<jwt::JwtConfig>,
    /// Static API keys for backends.
    pub keys: Vec<ApiKeyConfig>,
    /// Rate limits.
    pub rate: RateConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            allow_anonymous_remote: false,
            leeway: Duration::from_secs(30),
            cookie: "ringcast_token".into(),
            query_token: true,
            anonymous: None,
            jwt: None,
            keys: Vec::new(),
            rate: RateConfig::default(),
        }
    }
}

/// Grants: topic patterns per action.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrantsConfig {
    /// Topics the client may publish to.
    pub publish: Vec<String>,
    /// Topics the client may read: subscribe, SSE, history, info.
    pub subscribe: Vec<String>,
    /// Topics the client may seal and delete.
    pub admin: Vec<String>,
}

/// One `[[auth.keys]]` entry: a backend's API key, by hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A name for logs and rate limits (e.g. `"orders-backend"`).
    pub name: String,
    /// SHA-256 of the key, 64 hex digits (`printf %s "$KEY" | sha256sum`).
    pub sha256: String,
    /// Topics the key may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topics the key may read.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Topics the key may seal and delete.
    #[serde(default)]
    pub admin: Vec<String>,
}

impl AuthConfig {
    /// Whether any credential check is configured: JWTs, API keys, or
    /// explicit anonymous grants.
    pub fn enabled(&self) -> bool {
        self.jwt.is_some() || !self.keys.is_empty() || self.anonymous.is_some()
    }

    /// Checks everything that needs no file: patterns, key hashes, names.
    /// Errors are `(dotted key, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let grants = |key: &str, g: [&Vec<String>; 3]| -> Result<(), (String, String)> {
            for (action, list) in ["publish", "subscribe", "admin"].iter().zip(g) {
                for (i, p) in list.iter().enumerate() {
                    TopicPattern::check(p)
                        .map_err(|e| (format!("{key}.{action}[{i}]"), e.to_string()))?;
                }
            }
            Ok(())
        };
        if let Some(a) = &self.anonymous {
            grants("auth.anonymous", [&a.publish, &a.subscribe, &a.admin])?;
        }
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let key = format!("auth.keys[{i}]");
            if k.name.is_empty() {
                return Err((format!("{key}.name"), "must not be empty".into()));
            }
            if !names.insert(&k.name) {
                return Err((format!("{key}.name"), format!("{:?} is used twice", k.name)));
            }
            let hash = parse_sha256(&k.sha256).ok_or_else(|| {
                (
                    format!("{key}.sha256"),
                    "must be 64 hex digits: the SHA-256 of the key, never the key itself (printf %s \"$KEY\" | sha256sum)".to_owned(),
                )
            })?;
            if !hashes.insert(hash) {
                return Err((
                    format!("{key}.sha256"),
                    "the same key is listed twice".into(),
                ));
            }
            grants(&key, [&k.publish, &k.subscribe, &k.admin])?;
        }
        if let Some(j) = &self.jwt {
            j.validate()
                .map_err(|(k, m)| (format!("auth.jwt.{k}"), m))?;
        }
        if self
            .cookie
            .chars()
            .any(|c| !c.is_ascii_alphanumeric() && !"-_.".contains(c))
        {
            return Err((
                "auth.cookie".into(),
                "may hold only A-Z a-z 0-9 - _ .".into(),
            ));
        }
        Ok(())
    }
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The SHA-256 of an API key, as `[[auth.keys]] sha256` takes it.
pub fn api_key_hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a request wants to do to a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Publish events.
    Publish,
    /// Read: subscribe, SSE, history, topic info.
    Subscribe,
    /// Seal or delete.
    Admin,
}

impl Action {
    /// The grant's name, as in config and claims.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Admin => "admin",
        }
    }
}

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No credentials.
    Anonymous,
    /// A verified JWT.
    Token,
    /// A configured API key.
    ApiKey,
}

/// Who a client is and what it may do, fixed when its credentials were
/// checked. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Principal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    kind: Kind,
    subject: Option<String>,
    rate_key: Arc<str>,
    /// Shared by every principal of one API key, and by every anonymous one.
    grants: Arc<Grants>,
    /// When the session ends (`exp` + leeway); `None` = never.
    ends_at: Option<SystemTime>,
}

/// Compiled grants: topic patterns per action, `{sub}` substituted.
#[derive(Debug, Default)]
struct Grants {
    publish: Vec<TopicPattern>,
    subscribe: Vec<TopicPattern>,
    admin: Vec<TopicPattern>,
}

impl Grants {
    /// Compiles `config` for `subject`; patterns naming `{sub}` without a
    /// usable subject grant nothing.
    fn compile(config: &GrantsConfig, subject: Option<&str>) -> Result<Self, PatternError> {
        let one = |list: &[String]| -> Result<Vec<TopicPattern>, PatternError> {
            let mut out = Vec::with_capacity(list.len().min(MAX_PATTERNS));
            for p in list.iter().take(MAX_PATTERNS) {
                if let Some(p) = TopicPattern::compile(p, subject)? {
                    out.push(p);
                }
            }
            Ok(out)
        };
        Ok(Self {
            publish: one(&config.publish)?,
            subscribe: one(&config.subscribe)?,
            admin: one(&config.admin)?,
        })
    }

    /// Every action on every topic (auth off).
    fn everything() -> Self {
        let all = || {
            vec![TopicPattern::compile("*", None)
                .ok()
                .flatten()
                .expect("* is valid")]
        };
        Self {
            publish: all(),
            subscribe: all(),
            admin: all(),
        }
    }

    /// These grants plus `more` (what anyone may do is added to every
    /// credential).
    fn with(mut self, more: &Grants) -> Self {
        self.publish.extend(more.publish.iter().cloned());
        self.subscribe.extend(more.subscribe.iter().cloned());
        self.admin.extend(more.admin.iter().cloned());
        self
    }
}

impl Principal {
    fn new(
        kind: Kind,
        subject: Option<String>,
        rate_key: Arc<str>,
        grants: Arc<Grants>,
        ends_at: Option<SystemTime>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind,
                subject,
                rate_key,
                grants,
                ends_at,
            }),
        }
    }

    /// Whether `action` on `topic` is granted.
    pub fn may(&self, action: Action, topic: &str) -> bool {
        let list = match action {
            Action::Publish => &self.inner.grants.publish,
            Action::Subscribe => &self.inner.grants.subscribe,
            Action::Admin => &self.inner.grants.admin,
        };
        list.iter().any(|p| p.matches(topic))
    }

    /// Whether `action` is granted on every topic (a pattern of `*` alone):
    /// what broker-wide requests need, e.g. listing or closing connections.
    pub fn may_everywhere(&self, action: Action) -> bool {
        let list = match action {
            Action::Publish => &self.inner.grants.publish,
            Action::Subscribe => &self.inner.grants.subscribe,
            Action::Admin => &self.inner.grants.admin,
        };
        list.iter().any(TopicPattern::matches_everything)
    }

    /// The error for a refused broker-wide `action` (`what` says what was
    /// asked, e.g. "list connections"), as [`refusal`](Self::refusal) words it.
    pub fn refusal_everywhere(&self, action: Action, what: &str) -> Denied {
        if self.inner.kind == Kind::Anonymous {
            Denied::Missing(format!(
                "credentials required to {what} ({} on every topic)",
                action.as_str()
            ))
        } else {
            Denied::Forbidden(format!(
                "not granted: {what} needs {} on every topic (\"*\")",
                action.as_str()
            ))
        }
    }

    /// Whether any grant names `topic` (what a topic listing shows).
    pub fn may_see(&self, topic: &str) -> bool {
        [Action::Subscribe, Action::Publish, Action::Admin]
            .iter()
            .any(|a| self.may(*a, topic))
    }

    /// Whether any grant at all is held (a client with none is refused at
    /// connect).
    pub fn has_any_grant(&self) -> bool {
        let g = &self.inner.grants;
        !(g.publish.is_empty() && g.subscribe.is_empty() && g.admin.is_empty())
    }

    /// How the principal authenticated.
    pub fn kind(&self) -> Kind {
        self.inner.kind
    }

    /// The token's `sub`, or the API key's name.
    pub fn subject(&self) -> Option<&str> {
        self.inner.subject.as_deref()
    }

    /// The key its rate limits are counted under: `jwt:<sub>`, `key:<name>`
    /// or `ip:<address>`.
    pub fn rate_key(&self) -> &Arc<str> {
        &self.inner.rate_key
    }

    /// When the session ends (`exp` plus leeway), if ever.
    pub fn ends_at(&self) -> Option<SystemTime> {
        self.inner.ends_at
    }

    /// Time left until the session ends, from now (zero when past); `None`
    /// when it never ends.
    pub fn remaining(&self) -> Option<Duration> {
        self.inner.ends_at.map(|t| {
            t.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }

    /// The `tokio` instant at which the session ends, if ever (for timers).
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        // A deadline past what an Instant holds is as good as never.
        self.remaining()
            .and_then(|left| tokio::time::Instant::now().checked_add(left))
    }

    /// The error for a refused `action` on a topic: anonymous clients are
    /// told to authenticate, others that the grant is missing. The topic
    /// is named only as the client sent it, so nothing says whether it exists.
    pub fn refusal(&self, action: Action, topic: &str) -> Denied {
        if self.inner.kind == Kind::Anonymous {
            Denied::Missing(format!(
                "credentials required to {} {topic:?}",
                action.as_str()
            ))
        } else {
            Denied::Forbidden(format!("not granted: {} on {topic:?}", action.as_str()))
        }
    }
}

fn anon_key(peer: Option<IpAddr>) -> Arc<str> {
    match peer {
        Some(ip) => format!("ip:{ip}").into(),
        None => "ip:unknown".into(),
    }
}

/// Why a client was refused. Front ends map it to their codes: TCP
/// `Unauthorized` / `TokenExpired` / `Forbidden`, HTTP 401 / 401 / 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No credentials, and anonymous clients may not do this.
    #[error("{0}")]
    Missing(String),
    /// The credentials are not valid (bad signature, unknown key, wrong
    /// issuer or audience, not yet valid, malformed).
    #[error("{0}")]
    Invalid(String),
    /// The token's `exp` has passed.
    #[error("{0}")]
    Expired(String),
    /// Authenticated, but the grant does not cover the request.
    #[error("{0}")]
    Forbidden(String),
}

impl Denied {
    /// The documented error code: `unauthorized`, `token_expired` or `forbidden`.
    pub fn code(&self) -> &'static str {
        match self {
            Denied::Missing(_) | Denied::Invalid(_) => "unauthorized",
            Denied::Expired(_) => "token_expired",
            Denied::Forbidden(_) => "forbidden",
        }
    }
}

/// Credential checks and rate limits of one broker.
pub struct Auth {
    config: AuthConfig,
    keys: RwLock<Arc<jwt::KeySet>>,
    /// By the key's SHA-256: its name and compiled grants.
    api_keys: std::collections::HashMap<[u8; 32], (Arc<str>, Arc<Grants>)>,
    /// What a client without credentials may do (everything with auth off).
    anonymous: Arc<Grants>,
    limits: RateLimits,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.config.enabled())
            .field("api_keys", &self.api_keys.len())
            .field("limits", &self.limits)
            .finish()
    }
}

impl Auth {
    /// Loads keys (secret, PEM, JWKS files) for `config`.
    pub fn new(config: &AuthConfig) -> anyhow::Result<Self> {
        config
            .validate()
            .map_err(|(key, message)| anyhow::anyhow!("invalid config: {key}: {message}"))?;
        let keys = match &config.jwt {
            Some(j) => jwt::KeySet::load(j)?,
            None => jwt::KeySet::default(),
        };
        let invalid = |e: PatternError| anyhow::anyhow!("invalid config: {e}");
        let anonymous = match &config.anonymous {
            _ if !config.enabled() => Grants::everything(),
            Some(g) => Grants::compile(g, None).map_err(invalid)?,
            None => Grants::default(),
        };
        let mut api_keys = std::collections::HashMap::new();
        for k in &config.keys {
            let Some(hash) = parse_sha256(&k.sha256) else {
                continue; // validate() refused it already
            };
            let own = GrantsConfig {
                publish: k.publish.clone(),
                subscribe: k.subscribe.clone(),
                admin: k.admin.clone(),
            };
            let grants = Grants::compile(&own, Some(&k.name)).map_err(invalid)?;
            api_keys.insert(
                hash,
                (
                    Arc::from(k.name.as_str()),
                    Arc::new(grants.with(&anonymous)),
                ),
            );
        }
        Ok(Self {
            config: config.clone(),
            keys: RwLock::new(Arc::new(keys)),
            api_keys,
            anonymous: Arc::new(anonymous),
            limits: RateLimits::new(&config.rate),
        })
    }

    /// Auth off: every client may do everything (tests of other features).
    pub fn open() -> Self {
        Self::new(&AuthConfig::default()).expect("the default auth config is valid")
    }

    /// The secure-by-default rule: without any credential configured, only
    /// loopback listeners may serve (unless `allow_anonymous_remote`).
    /// The error is one line saying how to fix it.
    pub fn check_exposure(
        config: &AuthConfig,
        listeners: &[(&str, SocketAddr)],
    ) -> anyhow::Result<()> {
        if config.enabled() || config.allow_anonymous_remote {
            return Ok(());
        }
        if let Some((key, addr)) = listeners.iter().find(|(_, a)| !a.ip().is_loopback()) {
            anyhow::bail!(
                "refusing to serve anonymous clients on {addr} ({key}), which is not a loopback address: configure [auth] (see README \"Security\"), or set auth.allow_anonymous_remote = true to opt out"
            );
        }
        Ok(())
    }

    /// Whether credentials are checked at all.
    pub fn enabled(&self) -> bool {
        self.config.enabled()
    }

    /// The config this was built from.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// The rate limits.
    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// Who presents `credentials` (a JWT or an API key; `None` = anonymous)
    /// from `peer`.
    pub fn authenticate(
        &self,
        credentials: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<Principal, Denied> {
        let credentials = credentials.map(str::trim).filter(|c| !c.is_empty());
        let (true, Some(credentials)) = (self.config.enabled(), credentials) else {
            return Ok(Principal::new(
                Kind::Anonymous,
                None,
                anon_key(peer),
                self.anonymous.clone(),
                None,
            ));
        };
        if jwt::looks_like_jwt(credentials) {
            let keys = self.keys.read().clone();
            let claims = keys.verify(credentials, self.config.jwt.as_ref(), self.config.leeway)?;
            let subject = claims.sub.clone();
            let grants = Grants::compile(&claims.grants(), subject.as_deref())
                .map_err(|e| {
                    Denied::Invalid(format!("the token's ringcast claim is invalid: {e}"))
                })?
                .with(&self.anonymous);
            // An `exp` beyond what SystemTime holds (signed, but absurd)
            // never ends rather than overflowing.
            let ends_at = claims.exp.and_then(|exp| {
                UNIX_EPOCH
                    .checked_add(Duration::from_secs(exp))?
                    .checked_add(self.config.leeway)
            });
            // jsonwebtoken compares whole seconds (`exp < now`), accepting a
            // token for up to a second past `exp` + leeway; a session that
            // has ended (an SSE stream just closed at it) must not start
            // again with the same token (RFC 7519: not accepted on or after).
            if ends_at.is_some_and(|end| end <= SystemTime::now()) {
                return Err(Denied::Expired("the token has expired".into()));
            }
            let rate_key = format!("jwt:{}", subject.as_deref().unwrap_or("")).into();
            return Ok(Principal::new(
                Kind::Token,
                subject,
                rate_key,
                Arc::new(grants),
                ends_at,
            ));
        }
        let hash: [u8; 32] = Sha256::digest(credentials.as_bytes()).into();
        let Some((name, grants)) = self.api_keys.get(&hash) else {
            return Err(Denied::Invalid("unknown API key (and not a JWT)".into()));
        };
        Ok(Principal::new(
            Kind::ApiKey,
            Some(name.to_string()),
            format!("key:{name}").into(),
            grants.clone(),
            None,
        ))
    }

    /// Re-reads the key files (secret, PEM, JWKS) — on SIGHUP. On error the
    /// keys in use stay, and the error says which file failed.
    pub fn reload(&self) -> anyhow::Result<()> {
        let Some(j) = &self.config.jwt else {
            return Ok(());
        };
        let keys = jwt::KeySet::load(j)?;
        *self.keys.write() = Arc::new(keys);
        Ok(())
    }
}

/// Most patterns per action taken from one credential; more are ignored
/// (bounds the work of every check).
pub const MAX_PATTERNS: usize = 256;

/// A Unix time in seconds, for minting tokens.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a credential file is read from, for errors.
pub(crate) fn read_key_file(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("auth.jwt.{key}: cannot read {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_config(name: &str, key: &str, publish: &[&str]) -> ApiKeyConfig {
        ApiKeyConfig {
            name: name.into(),
            sha256: api_key_hash(key),
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: vec![],
            admin: vec![],
        }
    }

    #[test]
    fn without_config_everyone_may_do_everything() {
        let auth = Auth::open();
        let p = auth.authenticate(None, None).unwrap();
        assert!(p.may(Action::Admin, "any"));
        assert!(!auth.enabled());
    }

    #[test]
    fn api_keys_are_matched_by_hash_and_carry_their_grants() {
        let config = AuthConfig {
            keys: vec![key_config("orders", "s3cret-key", &["orders.*"])],
            ..AuthConfig::default()
        };
        let auth = Auth::new(&config).unwrap();
        let p = auth.authenticate(Some("s3cret-key"), None).unwrap();
        assert_eq!(p.kind(), Kind::ApiKey);
        assert!(p.may(Action::Publish, "orders.1"));
        assert!(!p.may(Action::Publish, "billing.1"));
        assert!(!p.may(Action::Subscribe, "orders.1"));
        assert_eq!(
            auth.authenticate(Some("wrong"), None).unwrap_err().code(),
            "unauthorized"
        );
        let anon = auth.authenticate(None, None).unwrap();
        assert!(!anon.has_any_grant());
        assert_eq!(anon.refusal(Action::Subscribe, "x").code(), "unauthorized");
        assert_eq!(p.refusal(Action::Subscribe, "x").code(), "forbidden");
    }

    #[test]
    fn a_key_listed_in_clear_is_refused_with_the_key_named() {
        let mut k = key_config("a", "x", &[]);
        k.sha256 = "my-plain-key".into();
        let config = AuthConfig {
            keys: vec![k],
            ..AuthConfig::default()
        };
        let (key, message) = config.validate().unwrap_err();
        assert_eq!(key, "auth.keys[0].sha256");
        assert!(message.contains("never the key itself"));
    }

    #[test]
    fn non_loopback_listeners_need_auth_or_an_explicit_opt_out() {
        let open: SocketAddr = "0.0.0.0:7411".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7411".parse().unwrap();
        let config = AuthConfig::default();
        assert!(Auth::check_exposure(&config, &[("server.tcp_listen", local)]).is_ok());
        let e = Auth::check_exposure(
            &config,
            &[("server.tcp_listen", local), ("server.http_listen", open)],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("server.http_listen") && e.contains("allow_anonymous_remote"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        let opted = AuthConfig {
            allow_anonymous_remote: true,
            ..AuthConfig::default()
        };
        assert!(Auth::check_exposure(&opted, &[("server.tcp_listen", open)]).is_ok());
    }

    #[test]
    fn anonymous_grants_are_added_to_every_credential() {
        let config = AuthConfig {
            anonymous: Some(GrantsConfig {
                subscribe: vec!["public.*".into()],
                ..GrantsConfig::default()
            }),
            keys: vec![key_config("k", "key", &["x"])],
            ..AuthConfig::default()
        };
        let auth = Auth::new(&config).unwrap();
        let anon = auth.authenticate(None, None).unwrap();
        assert!(anon.may(Action::Subscribe, "public.news"));
        assert!(!anon.may(Action::Publish, "public.news"));
        let k = auth.authenticate(Some("key"), None).unwrap();
        assert!(k.may(Action::Subscribe, "public.news") && k.may(Action::Publish, "x"));
    }
}
