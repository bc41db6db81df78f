//! Starting and stopping a relay: the pool, the LISTEN task, the HTTP server, and shutdown.
//!
//! [`Relay::start`] binds and returns at once with the address it serves on, so tests run whole
//! relays in-process on port 0. [`Relay::shutdown`] stops accepting, closes every socket with
//! 1001 (going away) so clients resume elsewhere, and waits at most the configured grace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::db::{self, ClientPool};
use crate::http::{self, AppState};
use crate::hub::{Close, Hub};
use crate::limits::Admission;
use crate::listener::{Health, Listener};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::serve::{self, Gate};
use crate::session::SessionContext;
use crate::token::{KeyError, Verifier};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the connection pool: {0}")]
    Pool(#[from] deadpool_postgres::BuildError),
    #[error("cannot load the token key: {0}")]
    Keys(#[from] KeyError),
    #[error(
        "the open-file limit ({limit}) leaves too few for client connections: the relay keeps \
         {reserved} for itself (Postgres, listeners); raise it (`ulimit -n`, or `ulimits` in \
         Docker) to at least {needed}"
    )]
    Files {
        limit: u64,
        reserved: usize,
        needed: usize,
    },
}

/// A running relay.
pub struct Relay {
    local_addr: SocketAddr,
    hub: Arc<Hub>,
    health: Arc<Health>,
    /// Turning it true stops the HTTP server and the LISTEN task.
    stop: watch::Sender<bool>,
    /// Live session count; shutdown waits for it to reach zero.
    live: Arc<watch::Sender<usize>>,
    server: JoinHandle<()>,
    /// `/metrics` on its own address (`RELAY_METRICS_BIND`), if it has one.
    metrics_server: Option<(SocketAddr, JoinHandle<()>)>,
    listener: JoinHandle<()>,
    /// Writes this instance's presence; on shutdown, forgets it.
    presence_writer: JoinHandle<()>,
    config: Config,
}

/// The clients' pool: `RELAY_POOL_SIZE` connections.
pub fn pool(config: &Config) -> Result<Pool, deadpool_postgres::BuildError> {
    db::pool(&config.database, config.pool_size, config.query_timeout)
}

/// Connections waiting to be accepted. Larger than the 128 of `TcpListener::bind`, so that the
/// burst of reconnects after an instance goes away is queued rather than refused; the kernel caps
/// it at `net.core.somaxconn`.
const ACCEPT_BACKLOG: u32 = 1024;

/// How long a client's connection may stay silent before the kernel probes it, how often it
/// probes, and how many unanswered probes end it.
const CLIENT_KEEPALIVE: (Duration, Duration, u32) =
    (Duration::from_secs(30), Duration::from_secs(10), 3);
/// How long data sent to a client may go unacknowledged before the connection is dropped.
const CLIENT_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// How often, at most, live subscriptions are told the relay's position (`position` frames).
const POSITION_EVERY: Duration = Duration::from_secs(600);

/// How often live subscriptions are told the relay's position: often enough, against
/// `retention`, that a quiet subscription's cursor stays well within the log.
fn position_every(retention: Duration) -> Duration {
    (retention / 4).min(POSITION_EVERY)
}

/// Tells live subscriptions the relay's position every `every`, until `stop`.
async fn tell_position_periodically(
    hub: Arc<Hub>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        hub.tell_position(crate::protocol::position);
    }
}

/// The listening socket, whose options its accepted sockets inherit:
///
/// * They send without Nagle's delay (`TCP_NODELAY`): an event frame is small and must leave at
///   once, not wait for the acknowledgement of the frame before it. With Nagle's algorithm a
///   socket receiving a steady stream (an admin's dashboard) held frames for up to a delayed
///   acknowledgement, tens of milliseconds.
/// * A client that vanishes without closing (a laptop lid, a dropped network) is noticed within
///   about a minute: TCP keepalives while the socket is idle, and `TCP_USER_TIMEOUT` while frames
///   to it wait unacknowledged. Otherwise the socket, its subscriptions, its presence in
///   consultations and its place under the per-user limit lasted until the kernel gave up
///   retransmitting (about 15 minutes), or for ever on a socket nothing was sent to.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted relay can bind while old connections linger in
    // TIME_WAIT. (Windows gives the option another meaning, so it is left alone there.)
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    let (idle, interval, probes) = CLIENT_KEEPALIVE;
    let options = socket2::SockRef::from(&socket);
    options.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(probes),
    )?;
    #[cfg(target_os = "linux")]
    options.set_tcp_user_timeout(Some(CLIENT_USER_TIMEOUT))?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

impl Relay {
    pub async fn start(config: Config) -> Result<Relay, StartError> {
        let verifier = Arc::new(Verifier::load(&config.tokens)?);
        let reserved = serve::reserved_files(config.pool_size);
        let connections = serve::connection_limit(config.pool_size).ok_or(StartError::Files {
            limit: serve::open_file_limit().unwrap_or_default(),
            reserved,
            needed: reserved + 16,
        })?;
        if config.limits.max_sockets > connections {
            tracing::warn!(
                max_sockets = config.limits.max_sockets,
                connections,
                "RELAY_MAX_SOCKETS is more than the open-file limit allows; client connections \
                 stop at the lower figure (raise the limit: `ulimit -n`, or `ulimits` in Docker)"
            );
        }
        let pool = pool(&config)?;
        let internal = db::pool(&config.database, db::INTERNAL_POOL_SIZE, db::QUERY_TIMEOUT)?;
        let tcp = listen(config.bind).map_err(|source| StartError::Bind {
            addr: config.bind,
            source,
        })?;
        let local_addr = tcp.local_addr().map_err(|source| StartError::Bind {
            addr: config.bind,
            source,
        })?;
        let hub = Hub::new(config.socket_queue);
        let health = Arc::new(Health::default());
        let (stop, stopped) = watch::channel(false);
        let live = Arc::new(watch::Sender::new(0usize));

        let presence = Presence::new(hub.clone());
        let metrics = Arc::new(Metrics::default());
        let listener = tokio::spawn(
            Listener {
                database: config.database.clone(),
                pool: internal.clone(),
                hub: hub.clone(),
                health: health.clone(),
                presence: presence.clone(),
                metrics: metrics.clone(),
                dispatched: Default::default(),
            }
            .run(stopped.clone()),
        );
        let presence_writer = tokio::spawn(presence.clone().run(internal, stopped.clone()));
        tokio::spawn(crate::log::prune_periodically(
            pool.clone(),
            config.retention,
            stopped.clone(),
        ));
        tokio::spawn(tell_position_periodically(
            hub.clone(),
            position_every(config.retention),
            stopped.clone(),
        ));
        let gate = Gate::new(connections);
        let state = AppState {
            session: SessionContext {
                hub: hub.clone(),
                db: ClientPool::new(pool),
                live: live.clone(),
                verifier,
                limits: Arc::new(config.limits.clone()),
                presence,
            },
            health: health.clone(),
            metrics,
            demo_issuer: config.demo_issuer.clone().map(Arc::new),
            metrics_apart: config.metrics_bind.is_some(),
            admission: Admission::new(
                config.limits.max_sockets,
                config.limits.max_sockets_per_user,
            ),
            connections: gate.clone(),
        };
        let metrics_server = match config.metrics_bind {
            Some(addr) => {
                let tcp = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?;
                let metrics_addr = tcp
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?;
                let serving = serve::serve(
                    tcp,
                    http::metrics_routes(state.clone()),
                    Gate::new(serve::METRICS_CONNECTIONS),
                    config.header_timeout,
                    stopped.clone(),
                );
                tracing::info!(addr = %metrics_addr, "serving /metrics");
                Some((metrics_addr, tokio::spawn(serving)))
            }
            None => None,
        };
        let server = tokio::spawn(serve::serve(
            tcp,
            http::routes(state),
            gate,
            config.header_timeout,
            stopped,
        ));
        tracing::info!(addr = %local_addr, "serving");
        Ok(Relay {
            local_addr,
            hub,
            health,
            stop,
            live,
            server,
            metrics_server,
            listener,
            presence_writer,
            config,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where `/metrics` is served apart from [`Relay::local_addr`], if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(|(addr, _)| *addr)
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Stops accepting, closes every socket with 1001, and waits for sockets to close, for the
    /// HTTP server to end and for this instance's presence to be forgotten: all within one
    /// shutdown grace.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.hub.close_all(Close::going_away());
        let mut live = self.live.subscribe();
        let grace = self.config.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        if tokio::time::timeout_at(deadline, live.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::warn!(
                open = *live.borrow(),
                ?grace,
                "sockets still open after the shutdown grace"
            );
        }
        let server = self.server.abort_handle();
        if tokio::time::timeout_at(deadline, self.server)
            .await
            .is_err()
        {
            // Connections still in their request head; ending the server ends them.
            server.abort();
        }
        // Others learn at once that this instance's users left, rather than at their next sweep.
        if tokio::time::timeout_at(deadline, self.presence_writer)
            .await
            .is_err()
        {
            tracing::warn!("presence not forgotten within the shutdown grace; others sweep it");
        }
        if let Some((_, server)) = self.metrics_server {
            server.abort();
        }
        self.listener.abort();
        tracing::info!("stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_send_without_nagles_delay() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
        let options = socket2::SockRef::from(&accepted);
        assert!(options.keepalive().unwrap());
        assert_eq!(options.tcp_keepalive_time().unwrap(), CLIENT_KEEPALIVE.0);
        #[cfg(target_os = "linux")]
        assert_eq!(
            options.tcp_user_timeout().unwrap(),
            Some(CLIENT_USER_TIMEOUT)
        );
        // The client's side is the client's choice; the default keeps Nagle's algorithm.
        assert!(!client.nodelay().unwrap());
    }
}
