//! The SDK's error type.

use std::time::Duration;

use ringcast_protocol::{ErrorCode, ProtocolError};

/// Result alias used throughout the SDK.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a client call can fail with.
///
/// # Retrying
/// [`is_retryable`](Self::is_retryable) tells whether the same call may
/// succeed later unchanged, and [`retry_after`](Self::retry_after) how long
/// to wait when the broker said so:
/// - retryable: [`Error::RetryLater`] (a rate limit; wait `retry_after`), and
///   broker codes `Internal`, `ShuttingDown`, `TooManyConnections`,
///   `OverCapacity`, `RateLimited` (back off);
/// - not retryable: `Unauthorized`, `Forbidden` (fix the credentials or the
///   grants; the client never retries them on its own), `TokenExpired` (needs
///   a new token: [`Client::refresh`](crate::Client::refresh), or a token
///   provider, with which the client handles expiry by itself), and every
///   request error (`InvalidTopic`, `TopicSealed`, …);
/// - [`Error::ConnectionLost`] is deliberately not retryable: the request may
///   or may not have taken effect (publishes are retried by the client itself,
///   with idempotency keys, and do not fail with it);
/// - [`Error::PositionMismatch`] is not: reload and decide again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Connecting to the broker, or reading or writing its socket, failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Bytes from the broker could not be decoded, or a message could not be
    /// encoded (for instance a request larger than the broker's `max_frame`).
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The broker answered a request with a message of the wrong kind.
    #[error("unexpected reply from the broker: {0}")]
    UnexpectedReply(String),
    /// The broker refused the request; the connection lives on.
    #[error("{message} ({})", code_name(*.code))]
    Server {
        /// Machine-readable cause.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
    },
    /// The broker refused the request for now (`RetryLater`, e.g. a rate
    /// limit, code `RateLimited`): the same request succeeds after
    /// `retry_after`. Nothing of it was stored. The connection lives on.
    #[error("{message} ({}; retry after {retry_after:?})", code_name(*.code))]
    RetryLater {
        /// Machine-readable cause.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
        /// How long to wait before retrying.
        retry_after: Duration,
    },
    /// The broker refused the connection, or ended the session, with an
    /// error: answering `Hello` (bad credentials, too many connections, a
    /// connection rate limit), or later (the token expired and the client
    /// has no token provider). When it is final — `Unauthorized`,
    /// `Forbidden`, `TokenExpired` — the client stops: this error ends every
    /// subscription and fails every later call.
    #[error("{message} ({})", code_name(*.code))]
    Refused {
        /// Machine-readable cause.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
        /// When the broker said when to try again (`RetryLater`).
        retry_after: Option<Duration>,
    },
    /// The [`TokenProvider`](crate::TokenProvider) failed to produce credentials.
    #[error("the token provider failed: {0}")]
    TokenProvider(String),
    /// An expected position did not hold
    /// ([`Client::publish_expecting`](crate::Client::publish_expecting)):
    /// another writer appended first. Nothing was stored; reload from the
    /// current position and decide again. Code `PositionMismatch`.
    #[error(
        "{message} (position_mismatch: current offset {current_offset}, version {current_version})"
    )]
    PositionMismatch {
        /// The broker's explanation.
        message: String,
        /// The topic's last offset now.
        current_offset: u64,
        /// The last version of the batch's event type now.
        current_version: u64,
    },
    /// The connection dropped while this request was in flight. The client
    /// reconnects by itself, but the request is not retried: it may or may
    /// not have taken effect. (Publishes are retried with their idempotency
    /// keys instead, and never end with this.)
    #[error("connection to the broker lost while the request was in flight")]
    ConnectionLost,
    /// No answer within the request (or connect) timeout.
    #[error("timed out waiting for the broker")]
    Timeout,
    /// The client was closed with [`Client::close`](crate::Client::close).
    #[error("client closed")]
    Closed,
    /// The broker refused the connection (or answered `Hello` with something
    /// other than `Welcome`).
    #[error("handshake failed: {0}")]
    Handshake(String),
}

impl Error {
    /// The broker's error code, for [`Error::Server`], [`Error::RetryLater`]
    /// and [`Error::Refused`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. }
            | Error::RetryLater { code, .. }
            | Error::Refused { code, .. } => Some(*code),
            Error::PositionMismatch { .. } => Some(ErrorCode::PositionMismatch),
            _ => None,
        }
    }

    /// How long the broker asked to wait before retrying, when it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RetryLater { retry_after, .. } => Some(*retry_after),
            Error::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the same call may succeed later, unchanged (see
    /// [Retrying](Self#retrying)).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::RetryLater { .. } => true,
            _ => self.code().is_some_and(ErrorCode::is_retryable),
        }
    }
}

/// The `snake_case` name of an error code (`TopicSealed` → `topic_sealed`),
/// as printed in messages and by the CLI.
pub fn code_name(code: ErrorCode) -> String {
    // Derived from the variant name so that codes added to the protocol
    // later get a name without a change here.
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_print_the_message_and_the_code() {
        let e = Error::Server {
            code: ErrorCode::TopicSealed,
            message: "topic orders is sealed".into(),
        };
        assert_eq!(e.to_string(), "topic orders is sealed (topic_sealed)");
        assert_eq!(e.code(), Some(ErrorCode::TopicSealed));
        assert!(!e.is_retryable());
    }

    #[test]
    fn retry_later_carries_the_wait_and_is_retryable() {
        let e = Error::RetryLater {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            retry_after: Duration::from_millis(250),
        };
        assert_eq!(e.retry_after(), Some(Duration::from_millis(250)));
        assert!(e.is_retryable());
        assert_eq!(e.to_string(), "slow down (rate_limited; retry after 250ms)");
        let refused = Error::Refused {
            code: ErrorCode::Unauthorized,
            message: "bad token".into(),
            retry_after: None,
        };
        assert!(!refused.is_retryable());
        assert_eq!(refused.code(), Some(ErrorCode::Unauthorized));
        assert!(!Error::ConnectionLost.is_retryable());
    }

    #[test]
    fn code_names_are_snake_case() {
        assert_eq!(code_name(ErrorCode::BadFrame), "bad_frame");
        assert_eq!(
            code_name(ErrorCode::TooManySubscriptions),
            "too_many_subscriptions"
        );
    }
}
