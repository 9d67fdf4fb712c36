//! One HTTP/1.1 connection, served so that an idle event stream costs as
//! little memory as can be.
//!
//! hyper keeps a read buffer and a write buffer of 8 KiB each for the whole
//! life of a connection (a page of each is touched: 8 KiB of RSS), plus its
//! dispatcher's boxes and the response head it caches for reuse: two thirds
//! of what an idle SSE connection cost. An event stream needs none of it:
//! after its request head there is nothing to read but the close, and each
//! chunk is written whole as the body hands it over.
//!
//! So the first request of a connection is read here. A `GET` without a body
//! is answered by the app at once, and when the answer is an event stream
//! (`200`, `text/event-stream`, no length) its head and chunks are written
//! here ([`Pump`]: queued and gathered as hyper does, nothing held while
//! idle); the peer's close is noticed by peeking one byte when the socket
//! turns readable. Anything else goes to hyper, with the bytes read so far
//! put back in front, and hyper answers as it always has: another method, a
//! malformed head, one over 64 KiB or 100 headers (hyper's limits then
//! apply, as before), an answer of known length (handed to hyper as the
//! answer to its first request, so the app is not called twice). A
//! connection whose event stream ends (shutdown, a sealed topic, an expired
//! token) goes on with hyper for its next requests, unless it must close.
//!
//! A stream that starts on a keep-alive connection after other requests
//! stays with hyper: browsers open a connection per `EventSource`.
//!
//! An idle SSE connection went from 12.7 KiB of broker RSS to 2.5 KiB
//! (`benches/compare.sh --sse`, 10,000 connections; what is left: this
//! task, the SSE body, the socket's registration).

use std::convert::Infallible;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Request, Response, StatusCode, Uri, Version};
use axum::Router;
use bytes::Bytes;
use futures_util::future::Either;
use futures_util::StreamExt;
use hyper::body::Incoming;
use hyper::service::Service;
use tokio::io::{AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::conn::{ConnIo, CountingIo, Rewind, WithConn};

/// The longest request head read here. A longer one (a rare giant cookie)
/// is left to hyper, bytes read so far included, and hyper's own limit
/// applies as before: its `max_buf_size` (about 408 KiB; a read that
/// crosses it may bring in a little more).
const MAX_HEAD: usize = 64 * 1024;
/// The most headers hyper accepts in a request (its default `max_headers`);
/// a head with more is left to hyper, which refuses it.
const MAX_HEADERS: usize = 100;
/// The first read's buffer; it doubles while the head is longer, and is
/// freed once the head is parsed.
const FIRST_READ: usize = 1024;

/// What one connection task needs.
pub(crate) struct Connection {
    pub(crate) app: Router,
    pub(crate) io: Arc<ConnIo>,
    pub(crate) peer: SocketAddr,
    /// A request head must arrive whole within this.
    pub(crate) read_timeout: Duration,
    /// The write watchdog's period (see [`super::watchdog`]); an event
    /// stream's write may wait [`super::STALL_HEARTBEATS`] of them.
    pub(crate) heartbeat: Duration,
    /// Ends event streams (by their own `shutdown` event) and idle
    /// connections.
    pub(crate) shutdown: CancellationToken,
    /// Drops the connection at once.
    pub(crate) kill: CancellationToken,
    /// The connection's place under `max_connections`, held until it closes.
    pub(crate) permit: OwnedSemaphorePermit,
}

/// What a connection goes on with after its first request.
enum Next {
    Close,
    /// hyper serves it: `read` first, `answer` to its first request.
    Hyper {
        read: Bytes,
        answer: Option<Response<Body>>,
    },
    /// An event stream, written here.
    Stream(EventStream),
}

/// An event stream's answer, ready to be written.
struct EventStream {
    head: Vec<u8>,
    body: Body,
    chunked: bool,
    /// The connection closes after the stream.
    close: bool,
    /// What was read after the request head: the next request's, for
    /// hyper after the stream.
    after: Bytes,
}

/// The first request of a connection, as read here.
#[expect(
    clippy::large_enum_variant,
    reason = "one per connection, for the moment its first request is read"
)]
enum First {
    /// A whole `GET` head without a body.
    Get {
        request: Request<Body>,
        /// Everything read: the head, then whatever followed it.
        read: Vec<u8>,
        head_len: usize,
        /// The request asks that the connection close after the answer.
        close: bool,
    },
    /// Anything else: the bytes read so far, for hyper to read again.
    Other(Vec<u8>),
    /// The peer closed before sending a byte.
    Closed,
}

impl Connection {
    /// Serves `stream` until it closes, the peer stops reading (for
    /// [`super::STALL_HEARTBEATS`] heartbeats while a write waits) or `kill`.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would hold self and stream twice (its arguments are moved into the future, then into its locals): 144 bytes more per connection"
    )]
    pub(crate) fn serve(self, mut stream: TcpStream) -> impl Future<Output = ()> {
        async move {
            // Boxed: the first request is read and answered in a moment, an
            // event stream that may follow lasts hours, and only the latter
            // should size the task.
            let EventStream {
                head,
                body,
                chunked,
                close,
                after,
            } = match Box::pin(self.first(&mut stream)).await {
                Next::Close => return,
                Next::Hyper { read, answer } => {
                    return Box::pin(self.with_hyper(stream, read, answer)).await;
                }
                Next::Stream(answer) => answer,
            };
            let ended = {
                let (mut reader, writer) = stream.split();
                let mut writer = CountingIo::new(writer, self.io.clone());
                // No watchdog here: the writes time out themselves (see
                // `Pump`), which spares each idle stream a timer.
                let stall = self.heartbeat * super::STALL_HEARTBEATS;
                tokio::select! {
                    ended = Pump::new(&mut writer, head, body, chunked, stall) => ended,
                    () = peer_closed(&mut reader) => return,
                    _ = self.kill.cancelled() => return,
                }
            };
            match ended {
                Ok(()) if !close && !self.shutdown.is_cancelled() => {
                    Box::pin(self.with_hyper(stream, after, None)).await;
                }
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => super::write_stalled(&self.peer),
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "HTTP event stream ended with an error");
                }
            }
        }
    }

    /// Reads the first request and has the app answer it when it is a
    /// `GET`: what the connection goes on with.
    async fn first(&self, stream: &mut TcpStream) -> Next {
        let first = tokio::select! {
            first = tokio::time::timeout(self.read_timeout, read_first(stream)) => match first {
                Ok(Ok(first)) => first,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "HTTP connection failed before a request");
                    return Next::Close;
                }
                Err(_) => {
                    // hyper closes such a connection too, without an answer.
                    tracing::debug!(peer = %self.peer, "HTTP request head not whole within read_timeout");
                    return Next::Close;
                }
            },
            // A connection without a whole request is idle: closed at once,
            // as hyper's graceful shutdown closes idle connections.
            _ = self.shutdown.cancelled() => return Next::Close,
            _ = self.kill.cancelled() => return Next::Close,
        };
        let (request, read, head_len, close) = match first {
            First::Get {
                request,
                read,
                head_len,
                close,
            } => (request, read, head_len, close),
            First::Other(read) => {
                return Next::Hyper {
                    read: read.into(),
                    answer: None,
                }
            }
            First::Closed => return Next::Close,
        };
        let version = request.version();
        let service = WithConn::new(self.app.clone(), self.io.clone(), self.peer);
        let answer = tokio::select! {
            answer = Service::call(&service, request) => answer,
            _ = self.kill.cancelled() => return Next::Close,
        };
        let Ok(answer) = answer;
        if !is_event_stream(&answer) {
            return Next::Hyper {
                read: read.into(),
                answer: Some(answer),
            };
        }
        // What followed the head (a pipelined request, normally nothing)
        // waits for hyper, after the stream; the head's buffer goes now.
        let after = match read.get(head_len..) {
            Some(after) if !after.is_empty() => Bytes::copy_from_slice(after),
            _ => Bytes::new(),
        };
        let (parts, body) = answer.into_parts();
        let chunked = version == Version::HTTP_11;
        let close = close || !chunked || connection_close(&parts.headers);
        Next::Stream(EventStream {
            head: response_head(&parts, version, close),
            body,
            chunked,
            close,
            after,
        })
    }

    /// Serves the rest of the connection with hyper: `read` (bytes already
    /// read from `stream`) comes first, and `answer`, when given, answers its
    /// first request (the one in `read`).
    async fn with_hyper(self, stream: TcpStream, read: Bytes, answer: Option<Response<Body>>) {
        use hyper_util::rt::{TokioIo, TokioTimer};

        let Self {
            app,
            io,
            peer,
            read_timeout,
            heartbeat,
            shutdown,
            kill,
            permit: _permit,
        } = self;
        let service = Answered {
            inner: WithConn::new(app, io.clone(), peer),
            answer: Mutex::new(answer),
        };
        // HTTP/1.1 only: what EventSource and curl speak, and no
        // protocol-sniffing buffer per connection (idle SSE memory).
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(read_timeout)
            .serve_connection(
                TokioIo::new(CountingIo::new(Rewind::new(stream, read), io.clone())),
                service,
            );
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
            _ = kill.cancelled() => return,
            _ = super::watchdog(&io, heartbeat, &peer) => return,
        }
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = kill.cancelled() => {}
            _ = super::watchdog(&io, heartbeat, &peer) => {}
        }
    }
}

/// Reads until the first request head is whole (or cannot be taken here).
async fn read_first(stream: &mut TcpStream) -> io::Result<First> {
    let mut read = Vec::with_capacity(FIRST_READ);
    loop {
        if read.len() == read.capacity() {
            if read.len() >= MAX_HEAD {
                return Ok(First::Other(read));
            }
            read.reserve_exact(read.len().min(MAX_HEAD - read.len()));
        }
        // Only the new bytes are searched for the end of the head (as hyper
        // does): a head trickled in costs no parse per read.
        let searched = read.len().saturating_sub(3);
        if stream.read_buf(&mut read).await? == 0 {
            return Ok(match read.is_empty() {
                true => First::Closed,
                false => First::Other(read),
            });
        }
        if ends_head(&read[searched..]) {
            return Ok(parse_first(read));
        }
    }
}

/// Whether `bytes` hold an empty line (CRLF or bare LF line ends, as
/// httparse accepts).
fn ends_head(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && bytes.get(i + 2) == Some(&b'\n')))
}

/// The request in `read`, when it is a whole `GET` head that this module
/// takes: no body, no `Expect` or `Upgrade`, within hyper's limits.
fn parse_first(read: Vec<u8>) -> First {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(&read) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return First::Other(read),
    };
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return First::Other(read),
    };
    let uri = match parsed.path.map(Uri::try_from) {
        Some(Ok(uri)) if parsed.method == Some("GET") => uri,
        _ => return First::Other(read),
    };
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    // HTTP/1.0 closes unless asked to keep alive; HTTP/1.1 keeps alive
    // unless asked to close.
    let mut close = version == Version::HTTP_10;
    for h in parsed.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return First::Other(read);
        };
        if [
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::EXPECT,
            header::UPGRADE,
        ]
        .contains(&name)
        {
            return First::Other(read);
        }
        if name == header::CONNECTION {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    close = false;
                }
            }
        }
        map.append(name, value);
    }
    let mut request = Request::new(Body::empty());
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = map;
    First::Get {
        request,
        read,
        head_len,
        close,
    }
}

/// Whether `answer` is an event stream: written here, not by hyper.
fn is_event_stream(answer: &Response<Body>) -> bool {
    use axum::body::HttpBody as _;

    answer.status() == StatusCode::OK
        && answer
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
        && !answer.headers().contains_key(header::CONTENT_LENGTH)
        && answer.body().size_hint().exact().is_none()
}

/// Whether `headers` hold `Connection: close`.
fn connection_close(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// The head of a streamed answer, as hyper writes it: chunked on HTTP/1.1,
/// delimited by the close on HTTP/1.0, with `Date`.
fn response_head(parts: &axum::http::response::Parts, version: Version, close: bool) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(match version {
        Version::HTTP_10 => b"HTTP/1.0 ",
        _ => b"HTTP/1.1 ",
    });
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING || name == header::CONTENT_LENGTH {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if version == Version::HTTP_11 {
        if close && !parts.headers.contains_key(header::CONNECTION) {
            head.extend_from_slice(b"connection: close\r\n");
        }
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// The most chunks queued while a write waits (hyper's own limit).
const MAX_QUEUED: usize = 16;
/// The most bytes queued while a write waits (hyper's `max_buf_size`).
const MAX_QUEUED_BYTES: usize = 8192 + 4096 * 100;
/// Rounds of pulling and writing in one poll before yielding to other
/// tasks.
const ROUNDS_PER_POLL: usize = 32;

/// Writes an event stream: `head`, then every chunk of the body as the body
/// hands it over, then the end of the body. Resolves when all is written.
///
/// Like hyper, it keeps pulling chunks from the body while a write waits
/// (up to [`MAX_QUEUED`] chunks, [`MAX_QUEUED_BYTES`]), so a peer that reads
/// slowly for a while has them queued here rather than in its subscription
/// (the SSE stream bounds this with `max_outbound_bytes`); and each write
/// gathers all that is queued, framing included. A write that waits
/// `stall` without progress fails with `TimedOut`: the peer stopped reading.
///
/// Polled by hand to stay small, since it sizes every stream's task: an
/// idle stream holds no buffer, no queue and no timer.
struct Pump<'a, W> {
    w: &'a mut W,
    data: axum::body::BodyDataStream,
    /// False once the body has ended.
    body_open: bool,
    chunked: bool,
    /// Waiting to be written, the first one `sent` bytes in (its
    /// framing counted). Its allocation is freed whenever it empties.
    queue: std::collections::VecDeque<Piece>,
    sent: usize,
    queued_bytes: usize,
    stall: Duration,
    /// Armed while a write waits.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// What is written as it is (`Raw`: the head, the end of the body) or as
/// one chunk (`Chunk`: framed by its size line and a CRLF).
enum Piece {
    Raw(Bytes),
    Chunk(Bytes),
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Raw(b) => b.len(),
            Piece::Chunk(b) => chunk_size(b.len()).1 + b.len() + 2,
        }
    }
}

impl<'a, W: AsyncWrite + Unpin> Pump<'a, W> {
    fn new(w: &'a mut W, head: Vec<u8>, body: Body, chunked: bool, stall: Duration) -> Self {
        let mut queue = std::collections::VecDeque::new();
        let queued_bytes = head.len();
        queue.push_back(Piece::Raw(head.into()));
        Self {
            w,
            data: body.into_data_stream(),
            body_open: true,
            chunked,
            queue,
            sent: 0,
            queued_bytes,
            stall,
            timer: None,
        }
    }

    /// Pulls the chunks the body has ready, while there is room.
    fn pull(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.body_open
            && self.queue.len() < MAX_QUEUED
            && self.queued_bytes < MAX_QUEUED_BYTES
        {
            match self.data.poll_next_unpin(cx) {
                Poll::Pending => break,
                // hyper too aborts the connection: no end of body is written.
                Poll::Ready(Some(Err(e))) => return Err(io::Error::other(e)),
                // A zero-length chunk would end the body.
                Poll::Ready(Some(Ok(chunk))) if chunk.is_empty() => {}
                Poll::Ready(Some(Ok(chunk))) => self.push(match self.chunked {
                    true => Piece::Chunk(chunk),
                    false => Piece::Raw(chunk),
                }),
                Poll::Ready(None) => {
                    self.body_open = false;
                    if self.chunked {
                        self.push(Piece::Raw(Bytes::from_static(b"0\r\n\r\n")));
                    }
                }
            }
        }
        Ok(())
    }

    fn push(&mut self, piece: Piece) {
        self.queued_bytes += piece.len();
        self.queue.push_back(piece);
    }

    /// Writes what is queued; `Ready(Ok(true))` when it made progress,
    /// `Ready(Ok(false))` when there was nothing to write.
    fn write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.queue.is_empty() {
            return Poll::Ready(Ok(false));
        }
        let mut sizes = [([0u8; 18], 0usize); MAX_QUEUED + 1];
        let mut iov = [IoSlice::new(&[]); 3 * (MAX_QUEUED + 1)];
        let mut k = 0;
        let mut skip = self.sent;
        for (piece, size) in self.queue.iter().zip(sizes.iter_mut()) {
            let parts: [&[u8]; 3] = match piece {
                Piece::Raw(b) => [b, &[], &[]],
                Piece::Chunk(b) => {
                    *size = chunk_size(b.len());
                    [&size.0[..size.1], b, b"\r\n"]
                }
            };
            for part in parts {
                let written = skip.min(part.len());
                skip -= written;
                let part = &part[written..];
                if !part.is_empty() {
                    iov[k] = IoSlice::new(part);
                    k += 1;
                }
            }
        }
        match Pin::new(&mut *self.w).poll_write_vectored(cx, &iov[..k]) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                self.advance(n);
                if let Some(timer) = &mut self.timer {
                    timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + self.stall);
                }
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let stall = self.stall;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer stopped reading",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    /// Drops the `n` bytes just written from the front of the queue.
    fn advance(&mut self, mut n: usize) {
        self.queued_bytes -= n;
        while n > 0 {
            let Some(front) = self.queue.front() else {
                break;
            };
            let left = front.len() - self.sent;
            if n < left {
                self.sent += n;
                return;
            }
            n -= left;
            self.sent = 0;
            self.queue.pop_front();
        }
        if self.queue.is_empty() {
            // An idle stream keeps neither a queue nor a timer.
            self.queue = std::collections::VecDeque::new();
            self.timer = None;
        }
    }
}

impl<W: AsyncWrite + Unpin> Future for Pump<'_, W> {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        for _ in 0..ROUNDS_PER_POLL {
            this.pull(cx)?;
            match this.write(cx)? {
                Poll::Ready(true) => {}
                Poll::Ready(false) if this.body_open => return Poll::Pending,
                Poll::Ready(false) => return Pin::new(&mut *this.w).poll_flush(cx),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Still more to pull and write: let other tasks run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// `<len in hex>\r\n`.
fn chunk_size(len: usize) -> ([u8; 18], usize) {
    let mut line = [0u8; 18];
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, b) in line[..digits].iter_mut().enumerate() {
        let nibble = (len >> (4 * (digits - 1 - i))) & 0xf;
        *b = b"0123456789abcdef"[nibble];
    }
    line[digits..digits + 2].copy_from_slice(b"\r\n");
    (line, digits + 2)
}

/// Resolves when the peer has closed (or reset) the connection. Bytes that
/// arrive instead (a pipelined request) stay in the socket for after the
/// stream, and a close is then noticed by the next write, as with hyper.
async fn peer_closed(reader: &mut tokio::net::tcp::ReadHalf<'_>) {
    let mut data = false;
    std::future::poll_fn(|cx| {
        if data {
            return Poll::Pending;
        }
        let mut probe = [0u8; 1];
        match reader.poll_peek(cx, &mut ReadBuf::new(&mut probe)) {
            Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(()),
            Poll::Ready(Ok(_)) => {
                data = true;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
}

/// The app as hyper's service, with the first request's answer already
/// computed (by [`Connection::serve`], which had to see whether it was an
/// event stream).
struct Answered {
    inner: WithConn<Router>,
    answer: Mutex<Option<Response<Body>>>,
}

impl Service<Request<Incoming>> for Answered {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<
        std::future::Ready<Result<Response<Body>, Infallible>>,
        <WithConn<Router> as Service<Request<Incoming>>>::Future,
    >;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let answer = self
            .answer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match answer {
            Some(answer) => Either::Left(std::future::ready(Ok(answer))),
            None => Either::Right(self.inner.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most `per_write` bytes of the first slice per
    /// write, and is not ready every other time.
    struct Trickle {
        out: Vec<u8>,
        per_write: usize,
        ready: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.ready = !self.ready;
            if !self.ready {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.per_write);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn body(chunks: &[&'static str]) -> Body {
        let chunks: Vec<Result<Bytes, Infallible>> = chunks
            .iter()
            .map(|c| Ok(Bytes::from_static(c.as_bytes())))
            .collect();
        Body::from_stream(futures_util::stream::iter(chunks))
    }

    #[tokio::test]
    async fn a_stream_is_written_whole_through_partial_and_refused_writes() {
        let long = "x".repeat(300).leak();
        for (chunked, expected) in [
            (true, format!("HEAD3\r\nabc\r\n12c\r\n{long}\r\n0\r\n\r\n")),
            (false, format!("HEADabc{long}")),
        ] {
            for per_write in [1, 2, 7, 1000] {
                let mut w = Trickle {
                    out: Vec::new(),
                    per_write,
                    ready: false,
                };
                let pump = Pump::new(
                    &mut w,
                    b"HEAD".to_vec(),
                    body(&["abc", "", long]),
                    chunked,
                    Duration::from_secs(60),
                );
                pump.await.expect("written");
                assert_eq!(String::from_utf8(w.out).unwrap(), expected, "{per_write}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_past_the_stall_limit_fails_with_timed_out() {
        /// A peer that never reads.
        struct Stuck;
        impl AsyncWrite for Stuck {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &[u8],
            ) -> Poll<io::Result<usize>> {
                Poll::Pending
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let started = tokio::time::Instant::now();
        let mut w = Stuck;
        let pump = Pump::new(
            &mut w,
            b"HEAD".to_vec(),
            body(&["abc"]),
            true,
            Duration::from_secs(45),
        );
        let e = pump.await.expect_err("stalled");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(45));
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex_lines() {
        for len in [0, 1, 9, 10, 15, 16, 255, 256, 4095, 65536, usize::MAX] {
            let (line, n) = chunk_size(len);
            assert_eq!(&line[..n], format!("{len:x}\r\n").as_bytes());
        }
    }

    #[test]
    fn a_head_ends_at_its_first_empty_line() {
        assert!(ends_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(ends_head(b"GET / HTTP/1.1\nHost: a\n\n"));
        assert!(ends_head(b"\r\n\r\n"));
        assert!(!ends_head(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(!ends_head(b"\r\n\r"));
    }

    fn taken(head: &str) -> bool {
        matches!(parse_first(head.as_bytes().to_vec()), First::Get { .. })
    }

    #[test]
    fn only_a_whole_bodiless_get_is_taken() {
        assert!(taken("GET /v1/topics/a/events HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(taken("GET /v1/topics/a/events HTTP/1.0\r\n\r\n"));
        assert!(!taken(
            "POST /v1/topics/a/events HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!taken("GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"));
        assert!(!taken(
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!taken("GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"));
        assert!(!taken("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"));
        assert!(!taken("GET / HTTP/1.1\r\nBad Header: x\r\n\r\n"));
        let many = (0..=MAX_HEADERS)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect::<String>();
        assert!(!taken(&format!("GET / HTTP/1.1\r\n{many}\r\n")));
    }

    #[test]
    fn connection_tokens_decide_the_close() {
        let close = |head: &str| match parse_first(head.as_bytes().to_vec()) {
            First::Get { close, .. } => close,
            _ => panic!("not taken: {head}"),
        };
        assert!(!close("GET / HTTP/1.1\r\n\r\n"));
        assert!(close(
            "GET / HTTP/1.1\r\nConnection: Keep-Alive, close\r\n\r\n"
        ));
        assert!(close("GET / HTTP/1.0\r\n\r\n"));
        assert!(!close("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    }
}
