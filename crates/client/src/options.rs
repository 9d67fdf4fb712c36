//! Connection settings.

use std::fmt;
use std::time::Duration;

use ringcast_protocol::DEFAULT_MAX_FRAME;

use crate::token::{TokenFuture, TokenProvider};

/// The broker's default TCP address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7411";

/// Payload compression the client offers the broker in its hello
/// (protocol version 5). Invisible to the caller: publishes are compressed
/// on their way out, events decompressed on their way in.
///
/// ```
/// use ringcast_client::{ClientOptions, Compression};
///
/// let options = ClientOptions::new("broker.internal:7411").with_compression(Compression::lz4());
/// assert_eq!(options.compression, Compression::Lz4 { min_size: 1024 });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Compression {
    /// Payloads go as they are (the default).
    #[default]
    None,
    /// LZ4 (block format): payloads of at least `min_size` bytes are
    /// compressed when that makes them smaller, both ways. The broker may
    /// raise `min_size` (its own floor);
    /// [`ServerInfo::compression`](crate::ServerInfo::compression) says
    /// what is in force.
    Lz4 {
        /// The smallest payload, in bytes, worth compressing.
        min_size: u32,
    },
}

impl Compression {
    /// LZ4 from 1 KiB: below that a payload rarely shrinks by more than
    /// the CPU it costs is worth on a LAN.
    pub const fn lz4() -> Self {
        Compression::Lz4 { min_size: 1024 }
    }
}

/// How to reach the broker and how patiently to talk to it.
///
/// Start from [`ClientOptions::new`] (or `Default`, which targets
/// [`DEFAULT_ADDR`]) and adjust fields or use the `with_*` helpers:
///
/// ```
/// use std::time::Duration;
/// use ringcast_client::ClientOptions;
///
/// let options = ClientOptions::new("broker.internal:7411")
///     .with_client_name("billing-worker")
///     .with_credentials("s3cret")
///     .with_request_timeout(Duration::from_secs(5));
/// assert_eq!(options.reconnect_max_backoff, Duration::from_secs(30));
/// ```
#[derive(Clone)]
pub struct ClientOptions {
    /// `host:port` of the broker's TCP listener.
    pub addr: String,
    /// Sent in `Hello`; shows up in the broker's logs.
    pub client_name: String,
    /// Sent in `Hello` when the broker requires credentials: a JWT or an API
    /// key. Replaced by a successful [`Client::refresh`](crate::Client::refresh)
    /// for later reconnects; ignored when a
    /// [`token_provider`](Self::token_provider) is set.
    pub credentials: Option<String>,
    /// Where fresh credentials come from, for every (re)connect and for
    /// refreshing a JWT before it expires. Without one, an expired token ends
    /// the client with [`Error::Refused`](crate::Error::Refused)
    /// (`TokenExpired`); with one, the client fetches a new token, reconnects
    /// and resumes every subscription exactly.
    pub token_provider: Option<TokenProvider>,
    /// With a token provider and a JWT with `exp`: refresh it on the live
    /// connection before it expires (at 80 % of its lifetime or 10 s before
    /// `exp`, whichever is earlier, but not before half of it), so the
    /// connection is never closed for expiry. Default on; off, the broker
    /// closes the connection at expiry and the client reconnects with a fresh
    /// token.
    pub proactive_refresh: bool,
    /// Reconnect backoff for the first retry; doubles per failed attempt.
    /// Each sleep is drawn uniformly from zero to the current bound ("full
    /// jitter"). Default 100 ms.
    pub reconnect_base_backoff: Duration,
    /// Upper bound of the reconnect backoff. Default 30 s.
    pub reconnect_max_backoff: Duration,
    /// How long a request waits for its reply, including any time spent
    /// waiting for a reconnect before it can be sent. Default 30 s.
    pub request_timeout: Duration,
    /// How long one connection attempt (TCP connect plus handshake) may take.
    /// Default 10 s.
    pub connect_timeout: Duration,
    /// Largest frame body accepted from the broker. Default 16 MiB.
    pub max_frame: usize,
    /// Deliveries buffered per subscription. When a subscription's buffer is
    /// full, the client pauses it (unsubscribes at the broker) and resumes it
    /// from its last delivered event once the caller has drained half the
    /// buffer (noticed within a sixteenth of it: the SDK counts what the
    /// caller took in steps, not per event); what the broker no longer
    /// retains by then arrives as a gap.
    /// Other subscriptions and requests are not held up. Default 16384:
    /// deep enough that a consumer keeping up with a burst (a catch-up
    /// replay, a fan-out spike) is never paused, which would make the broker
    /// send the paused stretch again.
    pub subscription_buffer: usize,
    /// Payload compression to offer the broker. Default
    /// [`Compression::None`]: compressing costs CPU on both ends for every
    /// large payload, which pays on slow or metered links, not on the LAN
    /// or loopback most brokers are reached over; turn it on where the
    /// bandwidth is the bottleneck (see BENCHMARKS.md, "TCP compression").
    pub compression: Compression,
}

impl ClientOptions {
    /// Defaults for a broker at `addr` (`host:port`).
    pub fn new(addr: impl Into<String>) -> Self {
        ClientOptions {
            addr: addr.into(),
            ..ClientOptions::default()
        }
    }

    /// Sets [`client_name`](Self::client_name).
    pub fn with_client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    /// Sets [`credentials`](Self::credentials).
    pub fn with_credentials(mut self, credentials: impl Into<String>) -> Self {
        self.credentials = Some(credentials.into());
        self
    }

    /// Sets [`token_provider`](Self::token_provider): a function returning a
    /// boxed future of fresh credentials (`Err` with a reason when it cannot
    /// get any; a failure on reconnect is retried with the reconnect backoff).
    ///
    /// ```
    /// use ringcast_client::ClientOptions;
    ///
    /// // Stands for a call to your identity service.
    /// async fn fetch_token() -> std::io::Result<String> {
    ///     Ok("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2ln".into())
    /// }
    ///
    /// let options = ClientOptions::new("broker.internal:7411").with_token_provider(|| {
    ///     Box::pin(async { fetch_token().await.map_err(|e| e.to_string()) })
    /// });
    /// assert!(options.token_provider.is_some());
    /// ```
    pub fn with_token_provider<F>(mut self, provider: F) -> Self
    where
        F: Fn() -> TokenFuture + Send + Sync + 'static,
    {
        self.token_provider = Some(TokenProvider::new(provider));
        self
    }

    /// Sets [`proactive_refresh`](Self::proactive_refresh).
    pub fn with_proactive_refresh(mut self, on: bool) -> Self {
        self.proactive_refresh = on;
        self
    }

    /// Sets both reconnect backoff bounds.
    pub fn with_reconnect_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.reconnect_base_backoff = base;
        self.reconnect_max_backoff = max;
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`compression`](Self::compression).
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            addr: DEFAULT_ADDR.to_owned(),
            client_name: concat!("ringcast-rs/", env!("CARGO_PKG_VERSION")).to_owned(),
            credentials: None,
            token_provider: None,
            proactive_refresh: true,
            reconnect_base_backoff: Duration::from_millis(100),
            reconnect_max_backoff: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
            subscription_buffer: 16_384,
            compression: Compression::None,
        }
    }
}

impl fmt::Debug for ClientOptions {
    // Hand-written so that credentials never end up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("addr", &self.addr)
            .field("client_name", &self.client_name)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("token_provider", &self.token_provider)
            .field("proactive_refresh", &self.proactive_refresh)
            .field("reconnect_base_backoff", &self.reconnect_base_backoff)
            .field("reconnect_max_backoff", &self.reconnect_max_backoff)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_frame", &self.max_frame)
            .field("subscription_buffer", &self.subscription_buffer)
            .field("compression", &self.compression)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_credentials() {
        let options = ClientOptions::new("h:1").with_credentials("hunter2");
        let shown = format!("{options:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
