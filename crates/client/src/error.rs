//! The SDK's error type.

use ringcast_protocol::{ErrorCode, ProtocolError};

/// Result alias used throughout the SDK.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a client call can fail with.
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
    /// The connection dropped while this request was in flight. The client
    /// reconnects by itself, but the request is not retried: a publish may or
    /// may not have been appended.
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
    /// The broker's error code, for [`Error::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
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
