//! The accept loop and its limits (hyper directly, since `warp::serve` exposes none of them):
//!
//! - at most `max_connections` open connections; one more is answered with a 503
//!   `server_busy` (`Retry-After: 1`) and closed. Connections are HTTP/1.1 (keep-alive,
//!   pipelining), so this also caps the requests in progress: each connection has at most one;
//! - a request's head must arrive within `header_read_timeout` (hyper's timer, running whenever
//!   the connection waits for a head: new or idle between requests), else the connection is
//!   closed: a client that trickles header bytes, or sends none, is dropped;
//! - a write that makes no progress for `write_timeout` ([`WriteTimeout`]) fails the connection,
//!   which drops the response body: an SSE client that stopped reading releases its lease;
//! - the body read timeout is the body filter's ([`super::app`]), a 408.
//!
//! No queue or channel here grows with the load: refused connections are answered by at most
//! [`MAX_REFUSING`] tasks at once, and dropped beyond that.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use super::error::ApiError;
use super::metrics::Metrics;
use crate::config::ServerLimitsConfig;

/// Refused connections answered at once; more are closed without a reply.
pub const MAX_REFUSING: usize = 64;

/// An I/O stream whose writes fail with `TimedOut` after `timeout` without progress. Reads are
/// untouched (hyper's header timeout and the body filter's bound those).
pub struct WriteTimeout<S> {
    io: S,
    timeout: Duration,
    /// Armed while a write is pending; reset by any write that makes progress.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteTimeout<S> {
    /// Wrap `io`.
    pub fn new(io: S, timeout: Duration) -> Self {
        WriteTimeout { io, timeout, sleep: None }
    }

    fn on_poll<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.sleep = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let t = self.timeout;
                let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
                if sleep.as_mut().poll(cx).is_ready() {
                    self.sleep = None;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "write timed out: the client is not reading",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.on_poll(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.on_poll(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.on_poll(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.on_poll(cx, r)
    }
}

/// Accept errors that concern one connection only (the listener is fine).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Answer a connection over the cap with a 503 and close it, all within about two seconds.
async fn refuse(mut tcp: TcpStream, max_connections: usize) {
    let e = ApiError::busy("open connections", max_connections);
    let body = e.body();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut scratch = [0u8; 4096];
    // Read what the client sent first, so closing does not reset the connection under the reply.
    let _ = tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut scratch)).await;
    let write = async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body.as_bytes()).await?;
        tcp.shutdown().await
    };
    if tokio::time::timeout(Duration::from_secs(1), write).await.is_ok() {
        let drain = async { while tcp.read(&mut scratch).await.is_ok_and(|n| n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
}

/// Serve `filter` on `listener` with `limits` until `stop` resolves; then stop accepting and
/// wait for open connections to finish their requests (the caller bounds that wait).
pub(super) async fn accept_loop(
    listener: TcpListener,
    filter: BoxedFilter<(Response,)>,
    limits: ServerLimitsConfig,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut stop = std::pin::pin!(stop);
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for connections to close.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            metrics.record("server", 503, Duration::ZERO);
            if let Ok(r) = refusing.clone().try_acquire_owned() {
                let max = limits.max_connections;
                tokio::spawn(async move {
                    refuse(tcp, max).await;
                    drop(r);
                });
            }
            continue;
        };
        let svc = TowerToHyperService::new(warp::service(filter.clone()));
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let io = TokioIo::new(WriteTimeout::new(tcp, limits.write_timeout));
            // hyper's HTTP/1 connection directly: its header timer runs from the moment it waits
            // for a head (a new connection, an idle keep-alive one), where hyper-util's `auto`
            // first waits for the protocol preface with no timeout at all.
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
            let conn = watcher.watch(builder.serve_connection(io, svc));
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_reads_fails_after_the_timeout() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = WriteTimeout::new(a, Duration::from_secs(5));
        // Progress resets the timer: 64 bytes fit, are read, and 64 more fit again.
        w.write_all(&[1u8; 64]).await.unwrap();
        let mut buf = [0u8; 64];
        b.read_exact(&mut buf).await.unwrap();
        w.write_all(&[2u8; 64]).await.unwrap();
        // Nobody reads now: the next write is pending until the timeout fails it.
        let e = w.write_all(&[3u8; 64]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
