//! Serving HTTP: the accept loop, with the two limits warp's own server does not set.
//!
//! warp 0.4 keeps every accepted connection for as long as the client does, and accepts for as
//! long as the process can open files. A client that opens connections and never finishes a
//! request, or a flood of them, would hold the relay's file descriptors until none was left: not
//! for other clients, and not for the relay's own connections to Postgres, so that a LISTEN
//! connection that dropped could not be opened again and every feed stopped. Here:
//!
//! * a connection must send its request's head (its request line and headers) within
//!   `RELAY_HEADER_TIMEOUT` of connecting, or it is closed; it serves that one request (no
//!   keep-alive);
//! * HTTP/1.1 only: a connection that begins with HTTP/2's preface is closed (no client of the
//!   relay speaks HTTP/2 without TLS, and hyper, waiting for the rest of the preface, would hold
//!   the connection open without a timeout);
//! * client connections, HTTP and WebSocket together, never outnumber what the process's
//!   open-file limit leaves after [`reserved_files`]. At that count the relay stops accepting
//!   until a connection closes; new connections wait in the listen backlog meanwhile.
//!
//! The connections are served by hyper, as warp's own server does, with upgrades for WebSockets.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use warp::{Filter, Reply};

/// What an HTTP/2 connection without TLS begins with.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How many of the preface's bytes tell it from every HTTP/1 request (`PRI`).
const PREFACE_TELLS: usize = 3;

/// Connections the separate `/metrics` listener (`RELAY_METRICS_BIND`) serves at once.
pub const METRICS_CONNECTIONS: usize = 16;

/// File descriptors the relay keeps for itself, beyond client connections, with a clients'
/// pool of `pool_size`: the pool's connections, its own two and the LISTEN connection; abandoned
/// queries being cancelled, two connections each ([`crate::db::MAX_CANCELS`]); the metrics
/// listener's connections; and the listening sockets, the runtime's and the standard streams'
/// (64 covers them).
pub fn reserved_files(pool_size: usize) -> usize {
    pool_size
        + crate::db::INTERNAL_POOL_SIZE
        + 1
        + 2 * crate::db::MAX_CANCELS
        + METRICS_CONNECTIONS
        + 64
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
    /// When a wait for a place was last logged.
    warned: Arc<Mutex<Option<Instant>>>,
}

/// How often, at most, the relay logs that connections wait for a place.
const FULL_WARNING_INTERVAL: Duration = Duration::from_secs(60);

impl Gate {
    pub fn new(limit: usize) -> Gate {
        Gate {
            places: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
            limit,
            warned: Arc::default(),
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
            return place;
        }
        let now = Instant::now();
        let warn = {
            let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
            let due = warned.is_none_or(|then| now.duration_since(then) >= FULL_WARNING_INTERVAL);
            if due {
                *warned = Some(now);
            }
            due
        };
        if warn {
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
/// HTTP connections in progress to end: one still waiting for its first bytes is closed at once,
/// the others finish their request or reach their deadline (upgraded sockets are the sessions'
/// to close). Dropped, it ends every connection it serves.
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
    // As warp's own server: `hyper_util`'s automatic builder, with upgrades. (hyper's HTTP/1
    // builder used directly left about 150 bytes more per open WebSocket, measured with
    // `relay-bench`.)
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    // Each connection's task holds a clone of `alive`: once all are dropped, every connection
    // has ended. And each ends when `all_ended` is dropped, as when the server's task is aborted.
    // (A `JoinSet` keeps each finished task's memory until it is joined: about 150 bytes more per
    // open WebSocket, measured with `relay-bench`.)
    let (alive, mut all_ended) = mpsc::channel::<()>(1);
    loop {
        let accepted = tokio::select! {
            accepted = accept(&tcp, &gate) => accepted,
            () = stop(&mut stopped) => break,
        };
        let Some(stream) = accepted else { continue };
        let deadline = tokio::time::Instant::now() + header_timeout;
        let service = one_request(TowerToHyperService::new(warp::service(filter.clone())));
        let builder = builder.clone();
        let mut stopped = stopped.clone();
        let alive = alive.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = serve_one(stream, service, builder, deadline, &mut stopped) => {}
                () = alive.closed() => {}
            }
        });
    }
    drop(tcp);
    drop(alive);
    let _ = all_ended.recv().await;
}

/// Serves one connection, within `deadline` for its request's head.
async fn serve_one<S, B>(
    stream: Counted,
    service: S,
    mut builder: auto::Builder<TokioExecutor>,
    deadline: tokio::time::Instant,
    stopped: &mut watch::Receiver<bool>,
) where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // The automatic builder first reads until it can tell HTTP/1 from HTTP/2's preface, with no
    // timeout of its own: it is given the connection once its first bytes tell.
    tokio::select! {
        http1 = starts_as_http1(&stream.stream, deadline) => {
            if !http1 {
                return;
            }
        }
        () = stop(stopped) => return,
    }
    // The rest of the head, by the same deadline.
    builder
        .http1()
        .header_read_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        () = stop(stopped) => {
            // Finish the request in progress, if any, then close.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(cause = %e, "a client connection ended with an error");
    }
}

/// Whether the connection's first bytes, within `deadline`, are not HTTP/2's preface: false when
/// nothing came in time, the connection closed, or it begins as HTTP/2 (no client of the relay
/// speaks HTTP/2 without TLS). While they are only `P` or `PR` (a request that came in pieces),
/// it looks again as more arrive.
async fn starts_as_http1(stream: &TcpStream, deadline: tokio::time::Instant) -> bool {
    let mut first = [0u8; H2_PREFACE.len()];
    let mut pause = Duration::from_millis(5);
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 && first[..n] != H2_PREFACE[..n] => return true,
            // `P` and `PR` begin methods too; from `PRI` on, no HTTP/1 method.
            Ok(Ok(n)) if n > 0 && n < PREFACE_TELLS => {}
            _ => return false,
        }
        // The bytes peeked stay readable, so readiness cannot say when more come: look again
        // after a pause, up to the deadline.
        if tokio::time::timeout_at(deadline, tokio::time::sleep(pause))
            .await
            .is_err()
        {
            return false;
        }
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// `service`, with every answer but an upgrade's closing its connection (`connection: close`):
/// one request per connection. An idle keep-alive connection would be closed by the head's
/// timeout, and a proxy reusing it just then would fail its request. (hyper's own switch for
/// keep-alive would close the upgrades' connections too.)
fn one_request<S>(
    service: S,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = S::Response,
    Error = S::Error,
    Future = impl std::future::Future<Output = Result<S::Response, S::Error>> + Send,
> + Send
       + Clone
where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = warp::reply::Response,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    hyper::service::service_fn(move |request| {
        let answer = service.call(request);
        async move {
            let mut response = answer.await?;
            if response.status() != warp::http::StatusCode::SWITCHING_PROTOCOLS {
                response.headers_mut().insert(
                    warp::http::header::CONNECTION,
                    warp::http::HeaderValue::from_static("close"),
                );
            }
            Ok(response)
        }
    })
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
        assert_eq!(reserved_files(10) - reserved_files(4), 6);
        assert_eq!(reserved_files(8), 123, "as docs/operations.md says");
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
        assert!(gate.warned.lock().unwrap().is_none(), "no wait, no warning");
    }
}
