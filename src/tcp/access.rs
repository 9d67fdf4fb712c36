//! Access control at the TCP boundary: which `Hello` is admitted, how an
//! [`auth`](crate::auth) refusal reads on the wire, and what a peer of an
//! older protocol version is sent instead of the newer messages and codes.
//!
//! The checks themselves live in [`crate::auth`]; the session
//! (`connection.rs`) keeps the admitted [`Principal`] and checks each request
//! against it.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, UNIX_EPOCH};

use bytes::BytesMut;
use ringcast_protocol::{encode_frame, ClientMessage, ErrorCode, FrameDecoder, ServerMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) use crate::auth::retry_after_ms;
use crate::auth::{Auth, Denied, Kind, Principal};

/// How long a connection refused by the connection rate limit may take to
/// send its `Hello` (read only to answer in the client's protocol version).
const REFUSAL_HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// How long writing the refusal may take.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest `Hello` read from a refused connection.
const REFUSAL_HELLO_MAX: usize = 4 * 1024;

/// The wire code of an access-control refusal.
pub(crate) fn code(denied: &Denied) -> ErrorCode {
    match denied {
        Denied::Missing(_) | Denied::Invalid(_) => ErrorCode::Unauthorized,
        Denied::Expired(_) => ErrorCode::TokenExpired,
        Denied::Forbidden(_) => ErrorCode::Forbidden,
    }
}

/// Who may open a session with `credentials` from `ip`, or the error that
/// refuses the `Hello`. Every refusal is counted in
/// `ringcast_auth_refusals_total`.
pub(crate) fn admit(
    auth: &Auth,
    credentials: Option<&str>,
    ip: IpAddr,
) -> Result<Principal, (ErrorCode, String)> {
    let refused = match auth.authenticate(credentials, Some(ip)) {
        Ok(principal) if principal.has_any_grant() => return Ok(principal),
        // Auth is on and anonymous clients may do nothing.
        Ok(principal) if principal.kind() == Kind::Anonymous => {
            Denied::Missing("credentials required: send a token or an API key in hello".into())
        }
        // Valid credentials that grant nothing: refused now rather than
        // request by request.
        Ok(_) => Denied::Forbidden("these credentials grant no action on any topic".into()),
        Err(denied) => denied,
    };
    crate::metrics::auth_refused("tcp", refused.code());
    Err((code(&refused), refused.to_string()))
}

/// When `principal`'s session ends, in ms since the Unix epoch; 0 = never.
pub(crate) fn expires_at_ms(principal: &Principal) -> u64 {
    principal
        .ends_at()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        })
}

/// An `Error` as a peer speaking `version` understands it.
pub(crate) fn error(
    version: u16,
    request_id: Option<u64>,
    code: ErrorCode,
    message: String,
) -> ServerMessage {
    ServerMessage::Error {
        request_id,
        code: code.for_version(version),
        message,
    }
}

/// A `RetryLater` as a peer speaking `version` understands it: version 1
/// knows no `RetryLater`, so it gets an `Error` with the closest code it
/// knows and the wait in the message.
pub(crate) fn retry_later(
    version: u16,
    request_id: Option<u64>,
    code: ErrorCode,
    message: String,
    wait: Duration,
) -> ServerMessage {
    let retry_after_ms = retry_after_ms(wait);
    if version < 2 {
        return error(
            version,
            request_id,
            code,
            format!("{message} (retry after {retry_after_ms} ms)"),
        );
    }
    ServerMessage::RetryLater {
        request_id,
        code,
        message,
        retry_after_ms,
    }
}

/// Refuses a connection over the connection rate limit, without a session:
/// reads its `Hello` (briefly, and only to learn its protocol version —
/// which also keeps the close from resetting the connection over unread
/// bytes), answers `RetryLater` (an `Error` to a version 1 client) and
/// closes.
pub(crate) async fn refuse_rate_limited(
    mut stream: TcpStream,
    peer: SocketAddr,
    wait: Duration,
    rate: u32,
) {
    let version = tokio::time::timeout(REFUSAL_HELLO_TIMEOUT, hello_version(&mut stream))
        .await
        .ok()
        .flatten()
        // No readable hello: answer in the oldest version, which everyone reads.
        .unwrap_or(ringcast_protocol::MIN_PROTOCOL_VERSION);
    let message = format!(
        "too many new connections from {} (auth.rate.connections_per_second = {rate}); retry after {} ms",
        peer.ip(),
        retry_after_ms(wait)
    );
    let msg = retry_later(version, None, ErrorCode::RateLimited, message, wait);
    say_and_close(stream, &msg).await;
    tracing::debug!(%peer, version, "rate-limited connection closed");
}

/// Sends `msg` (within a second) and closes: how every connection refused
/// before its session is told why.
pub(crate) async fn say_and_close(mut stream: TcpStream, msg: &ServerMessage) {
    let mut buf = BytesMut::new();
    if encode_frame(msg, &mut buf).is_ok() {
        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, stream.write_all(&buf)).await;
    }
    let _ = stream.shutdown().await;
}

/// The protocol version named by the first frame, if it is a `Hello` or a
/// `HelloExt`.
async fn hello_version(stream: &mut TcpStream) -> Option<u16> {
    let mut decoder = FrameDecoder::<ClientMessage>::new(REFUSAL_HELLO_MAX);
    let mut buf = BytesMut::with_capacity(REFUSAL_HELLO_MAX);
    loop {
        match decoder.decode(&mut buf) {
            Ok(Some(
                ClientMessage::Hello {
                    protocol_version, ..
                }
                | ClientMessage::HelloExt {
                    protocol_version, ..
                },
            )) => return Some(protocol_version),
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) => {}
        }
        if stream.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_peer_gets_retry_later_as_an_error_it_knows() {
        let wait = Duration::from_millis(1500);
        match retry_later(1, Some(4), ErrorCode::RateLimited, "slow".into(), wait) {
            ServerMessage::Error {
                request_id: Some(4),
                code: ErrorCode::OverCapacity,
                message,
            } => assert_eq!(message, "slow (retry after 1500 ms)"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            retry_later(2, None, ErrorCode::RateLimited, "slow".into(), wait),
            ServerMessage::RetryLater {
                request_id: None,
                code: ErrorCode::RateLimited,
                retry_after_ms: 1500,
                ..
            }
        ));
        assert!(matches!(
            error(1, None, ErrorCode::TokenExpired, "x".into()),
            ServerMessage::Error {
                code: ErrorCode::Unauthorized,
                ..
            }
        ));
    }
}
