//! Per-connection accounting shared between a connection's IO and the SSE
//! stream it serves.
//!
//! hyper buffers body chunks itself, so what an SSE stream has handed over
//! says nothing about what the peer has read. Counting the bytes that reach
//! the socket (below hyper) lets the stream bound what it has queued, and
//! notice a peer that stopped reading altogether.
//!
//! [`Rewind`] puts back in front of a connection the bytes [`super::h1`]
//! read before handing it to hyper.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::Request;
use bytes::Bytes;
use hyper::service::Service;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// What one HTTP connection's IO reports to the handlers it serves (a
/// request extension).
#[derive(Debug, Default)]
pub(crate) struct ConnIo {
    written: AtomicU64,
    /// A write returned `Pending` and none has made progress since.
    blocked: AtomicBool,
    progress: Notify,
}

impl ConnIo {
    /// Bytes written to the socket so far (heads, framing and bodies).
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Resolves after the next write that made progress (or at once if one
    /// happened since the last call).
    pub(crate) async fn progressed(&self) {
        self.progress.notified().await;
    }

    /// Whether the last write attempt is still waiting for the peer.
    pub(crate) fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Acquire)
    }

    fn wrote(&self, n: usize) {
        if n > 0 {
            self.written.fetch_add(n as u64, Ordering::AcqRel);
            self.blocked.store(false, Ordering::Release);
            // A stored permit when nobody waits: one atomic, no lock.
            self.progress.notify_one();
        }
    }

    fn noted(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) => self.wrote(*n),
            Poll::Pending => self.blocked.store(true, Ordering::Release),
            Poll::Ready(Err(_)) => {}
        }
    }
}

/// A connection's IO, counting the bytes written into [`ConnIo`].
#[derive(Debug)]
pub(crate) struct CountingIo<T> {
    inner: T,
    shared: Arc<ConnIo>,
}

impl<T> CountingIo<T> {
    /// Wraps `inner`, reporting into `shared`.
    pub(crate) fn new(inner: T, shared: Arc<ConnIo>) -> Self {
        Self { inner, shared }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.shared.noted(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.shared.noted(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection's IO with bytes already read from it put back in front:
/// hyper reads them again (see [`super::h1`]). Writes go straight through.
#[derive(Debug)]
pub(crate) struct Rewind<T> {
    /// Freed once read (empty `Bytes` hold no allocation).
    read: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// `inner`, read from `read` first.
    pub(crate) fn new(inner: T, read: Bytes) -> Self {
        Self { read, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read.split_to(n));
        if self.read.is_empty() {
            self.read = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The address of the peer a request came from (a request extension; absent
/// when the app is served outside [`super::serve`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) SocketAddr);

/// The app as a hyper service for one connection: every request carries
/// that connection's [`ConnIo`] and [`Peer`] as extensions.
#[derive(Debug, Clone)]
pub(crate) struct WithConn<S> {
    inner: TowerToHyperService<S>,
    conn: Arc<ConnIo>,
    peer: SocketAddr,
}

impl<S> WithConn<S> {
    /// Serves `app` for the connection from `peer` reporting into `conn`.
    pub(crate) fn new(app: S, conn: Arc<ConnIo>, peer: SocketAddr) -> Self {
        Self {
            inner: TowerToHyperService::new(app),
            conn,
            peer,
        }
    }
}

impl<S, B> Service<Request<B>> for WithConn<S>
where
    TowerToHyperService<S>: Service<Request<B>>,
{
    type Response = <TowerToHyperService<S> as Service<Request<B>>>::Response;
    type Error = <TowerToHyperService<S> as Service<Request<B>>>::Error;
    type Future = <TowerToHyperService<S> as Service<Request<B>>>::Future;

    fn call(&self, mut request: Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.conn.clone());
        request.extensions_mut().insert(Peer(self.peer));
        self.inner.call(request)
    }
}
