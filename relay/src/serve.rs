//! Serving HTTP: the accept loop, with the two limits warp's own server does not set.
//!
//! warp 0.4 keeps every accepted connection for as long as the client does, and accepts for as
//! long as the process can open files. A client that opens connections and never finishes a
//! request, or a flood of them, would hold the relay's file descriptors until none was left: not
//! for other clients, and not for the relay's own connections to Postgres, so that a LISTEN
//! connection that dropped could not be opened again and every feed stopped. Here:
//!
//! * a connection must send a request's head (its request line and headers) within
//!   `RELAY_HEADER_TIMEOUT` of connecting, or of the response before, or it is closed;
//! * HTTP/1.1 only: a connection that begins with HTTP/2's preface is closed (no client of the
//!   relay speaks HTTP/2 without TLS, and the preface's first bytes alone would hold the
//!   connection open without a timeout);
//! * client connections, HTTP and WebSocket together, never outnumber what the process's
//!   open-file limit leaves after [`reserved_files`]. At that count the relay stops accepting
//!   until a connection closes; new connections wait in the listen backlog meanwhile.
//!
//! The connections are served by hyper, as warp's own server does, with upgrades for WebSockets.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use warp::{Filter, Reply};

/// What an HTTP/2 connection without TLS begins with.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connections the separate `/metrics` listener (`RELAY_METRICS_BIND`) serves at once.
pub const METRICS_CONNECTIONS: usize = 16;

/// File descriptors the relay keeps for itself, beyond client connections, with a clients'
/// pool of `pool_size`: the pool's connections and as many again for the connections that cancel
/// their queries, its own two and the LISTEN connection, the listening sockets and the metrics
/// listener's connections, and the runtime's and the standard streams' (64 covers them).
pub fn reserved_files(pool_size: usize) -> usize {
    2 * pool_size + crate::db::INTERNAL_POOL_SIZE + 1 + METRICS_CONNECTIONS + 64
}

/// The process's open-file limit (its soft limit), if it has one.
pub fn open_file_limit() -> Option<u64> {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) if soft != rlimit::INFINITY => Some(soft),
        _ => None,
    }
}

/// Raises the process's open-file limit to its hard limit (containers often start with a soft
/// limit of 1,024); returns the limit now in force.
pub fn raise_open_file_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// The most client connections the relay holds at once: what the open-file limit leaves after
/// [`reserved_files`], or `None` if that leaves fewer than 16 (the limit is too low to serve).
pub fn connection_limit(pool_size: usize) -> Option<usize> {
    let Some(files) = open_file_limit() else {
        return Some(usize::MAX >> 4);
    };
    let files = usize::try_from(files).unwrap_or(usize::MAX);
    files
        .checked_sub(reserved_files(pool_size))
        .filter(|left| *left >= 16)
}

/// Places for client connections, taken before each accept and held until the connection closes
/// (for a WebSocket, until the socket does).
#[derive(Debug, Clone)]
pub struct Gate {
    places: Arc<Semaphore>,
    limit: usize,
    /// Whether the last accept had to wait for a place; logged when that changes.
    full: Arc<AtomicBool>,
}

impl Gate {
    pub fn new(limit: usize) -> Gate {
        Gate {
            places: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
            limit,
            full: Arc::default(),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limit.min(Semaphore::MAX_PERMITS) - self.places.available_permits()
    }

    /// The most connections held at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A place for the next connection, waiting until one is free.
    async fn place(&self) -> OwnedSemaphorePermit {
        if let Ok(place) = self.places.clone().try_acquire_owned() {
            if self.full.swap(false, Ordering::Relaxed) {
                tracing::info!(limit = self.limit, "accepting connections again");
            }
            return place;
        }
        if !self.full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                limit = self.limit,
                "client connections reached the most the open-file limit allows; new connections \
                 wait until one closes (raise the limit: `ulimit -n`, or `ulimits` in Docker)"
            );
        }
        self.places
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

/// A client's connection, holding its place at the [`Gate`] until it is dropped.
struct Counted {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Serves `filter` on `tcp` until `stopped` turns true, then stops accepting and waits for the
/// HTTP connections in progress to end (idle ones are closed at once; upgraded sockets are the
/// sessions' to close).
pub async fn serve<F, R>(
    tcp: TcpListener,
    filter: F,
    gate: Gate,
    header_timeout: Duration,
    mut stopped: watch::Receiver<bool>,
) where
    F: Filter<Extract = (R,), Error = Infallible> + Clone + Send + Sync + 'static,
    R: Reply,
{
    // As warp's own server: `hyper_util`'s automatic builder (HTTP/1.1, or HTTP/2 with prior
    // knowledge), with upgrades. (hyper's HTTP/1 builder used directly left about 150 bytes more
    // per open WebSocket, measured with `relay-bench`.)
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    // Each connection's task holds a clone; once all are dropped, every connection has ended.
    let (alive, mut all_ended) = mpsc::channel::<()>(1);
    loop {
        let accepted = tokio::select! {
            accepted = accept(&tcp, &gate) => accepted,
            () = stop(&mut stopped) => break,
        };
        let Some(stream) = accepted else { continue };
        let service = TowerToHyperService::new(warp::service(filter.clone()));
        let builder = builder.clone();
        let mut stopped = stopped.clone();
        let alive = alive.clone();
        tokio::spawn(async move {
            let _alive = alive;
            // The automatic builder first reads until it can tell HTTP/1 from HTTP/2's preface,
            // with no timeout of its own; hyper's covers the rest of an HTTP/1 head.
            let mut first = [0u8; H2_PREFACE.len()];
            tokio::select! {
                peeked = tokio::time::timeout(header_timeout, stream.stream.peek(&mut first)) => {
                    match peeked {
                        Ok(Ok(n)) if n > 0 && first[..n] != H2_PREFACE[..n] => {}
                        // Nothing in time, the connection closed, an error, or HTTP/2 (or the
                        // start of its preface, on which the builder would wait for ever): no
                        // client of the relay speaks HTTP/2 without TLS.
                        _ => return,
                    }
                }
                () = stop(&mut stopped) => return,
            }
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = stop(&mut stopped) => {
                    // Finish the request in progress, if any, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(cause = %e, "a client connection ended with an error");
            }
        });
    }
    drop(tcp);
    drop(alive);
    let _ = all_ended.recv().await;
}

/// Returns once `stopped` is true (or its sender is gone).
async fn stop(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// The next connection, once there is a place for it; `None` after an error accepting.
async fn accept(tcp: &TcpListener, gate: &Gate) -> Option<Counted> {
    let place = gate.place().await;
    match tcp.accept().await {
        Ok((stream, _)) => Some(Counted {
            stream,
            _place: place,
        }),
        // The connection went away before it was accepted.
        Err(e) if is_connection_error(&e) => None,
        Err(e) => {
            // Out of file descriptors despite the gate (something else in the process holds
            // them), or out of memory: wait rather than spin.
            tracing::error!(cause = %e, "cannot accept a connection; retrying in a second");
            tokio::time::sleep(Duration::from_secs(1)).await;
            None
        }
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_grows_with_the_pool() {
        assert_eq!(
            reserved_files(10) - reserved_files(4),
            12,
            "each pooled connection, and its cancel"
        );
    }

    #[tokio::test]
    async fn a_place_is_free_again_once_its_connection_is_dropped() {
        let gate = Gate::new(1);
        let first = gate.place().await;
        assert!(gate.places.clone().try_acquire_owned().is_err());
        assert_eq!(gate.open(), 1);
        drop(first);
        assert_eq!(gate.open(), 0);
        let _second = gate.place().await;
        assert!(!gate.full.load(Ordering::Relaxed));
    }
}
