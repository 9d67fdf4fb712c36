//! Credentials that change: the [`TokenProvider`] the SDK asks for a token on
//! every (re)connect and before the current one expires, and when that is.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

/// What a [`TokenProvider`] returns: the credentials, or why it could not get
/// them (kept for the error and the logs).
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// A source of fresh credentials (typically a JWT from your identity
/// service), set with
/// [`ClientOptions::with_token_provider`](crate::ClientOptions::with_token_provider).
///
/// The client calls it for the `Hello` of every connection and reconnection,
/// and — when the credentials are a JWT with an `exp` claim — before that
/// expiry, to send `Refresh` on the live connection (see
/// [`ClientOptions::proactive_refresh`](crate::ClientOptions::proactive_refresh)).
/// The client never runs two calls at once; a call that fails (`Err`) is
/// retried later: with the reconnect backoff, or before the token expires.
#[derive(Clone)]
pub struct TokenProvider(Arc<dyn Fn() -> TokenFuture + Send + Sync>);

impl TokenProvider {
    /// Wraps a function returning a boxed future of the credentials.
    pub fn new<F>(fetch: F) -> Self
    where
        F: Fn() -> TokenFuture + Send + Sync + 'static,
    {
        TokenProvider(Arc::new(fetch))
    }

    /// Asks for credentials.
    pub fn fetch(&self) -> TokenFuture {
        (self.0)()
    }
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenProvider")
    }
}

/// The `exp` claim of a JWT, read without verifying anything (the broker
/// verifies; the client only needs to know when to refresh). `None` when
/// `credentials` is not a JWT (an API key) or has no `exp`.
pub(crate) fn expiry(credentials: &str) -> Option<SystemTime> {
    let mut parts = credentials.trim().split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    // base64url, with or without padding (RFC 7515 says without).
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let json = LENIENT.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let exp = claims.get("exp")?;
    // A NumericDate may have a fraction.
    let secs = match exp.as_u64() {
        Some(secs) => Duration::from_secs(secs),
        None => Duration::try_from_secs_f64(exp.as_f64()?).ok()?,
    };
    UNIX_EPOCH.checked_add(secs)
}

/// The shortest wait between refreshes (unless the token expires sooner).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// How long after getting a token with `lifetime` left to refresh it: at 80 %
/// of the lifetime or 10 s before expiry, whichever is earlier — but not
/// before half of it nor within a second (unless it expires sooner), so that
/// short-lived tokens, or a provider handing out the same token again, do
/// not make refreshes a busy loop.
pub(crate) fn refresh_delay(lifetime: Duration) -> Duration {
    let at_80 = lifetime.mul_f64(0.8);
    let before_exp = lifetime.saturating_sub(Duration::from_secs(10));
    at_80
        .min(before_exp)
        .max(lifetime / 2)
        .max(MIN_REFRESH_INTERVAL.min(lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
            b64.encode(payload)
        )
    }

    #[test]
    fn the_expiry_of_a_jwt_is_its_exp_claim() {
        assert_eq!(
            expiry(&jwt(r#"{"sub":"u1","exp":1700000000}"#)),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(
            expiry(&jwt(r#"{"exp":1700000000.5}"#)),
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_500))
        );
    }

    #[test]
    fn api_keys_and_tokens_without_exp_have_no_expiry() {
        assert_eq!(expiry("rk_live_0123456789"), None);
        assert_eq!(expiry(&jwt(r#"{"sub":"u1"}"#)), None);
        assert_eq!(expiry(&jwt(r#"{"exp":"soon"}"#)), None);
        assert_eq!(expiry(&jwt(r#"{"exp":-5}"#)), None);
        assert_eq!(expiry("a.%%%.c"), None);
        assert_eq!(expiry("a.b.c.d"), None);
    }

    #[test]
    fn refresh_comes_at_80_percent_or_10_s_before_expiry_but_not_before_half() {
        assert_eq!(
            refresh_delay(Duration::from_secs(3600)),
            Duration::from_secs(2880)
        );
        assert_eq!(
            refresh_delay(Duration::from_secs(30)),
            Duration::from_secs(20)
        );
        assert_eq!(
            refresh_delay(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        assert_eq!(refresh_delay(Duration::ZERO), Duration::ZERO);
    }
}
