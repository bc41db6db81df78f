//! A Postgres change-feed relay: row changes, captured by triggers and announced with NOTIFY, go
//! out over WebSockets to every connected user allowed to see them, and to no one else.
//!
//! # Layout
//!
//! Modules follow the data's path:
//!
//! - [`listener`]: the one LISTEN connection; receives notifications, catches up from the event
//!   log after any outage, hands events to the hub in commit order.
//! - [`log`]: reading the event log (`relay.events`): ranges after a cursor, the retention
//!   horizon, pruning.
//! - [`event`]: decoding the capture trigger's payloads; rendering `event` frames.
//! - [`authz`]: the mirror of the tables' row-level security: who may see which row, and which
//!   columns. Pure, no I/O.
//! - [`hub`]: subscriptions indexed by feed and user; fans each event out to exactly the
//!   subscribers allowed to see it, through bounded per-socket queues.
//! - [`session`]: one WebSocket: client frames in, queued frames out; replays a resumed
//!   subscription from the log.
//! - [`protocol`]: the client frames and the relay's replies.
//! - [`http`]: routes: the upgrade, health, status, stats; [`upgrade`]: the WebSocket
//!   handshake, with the socket's buffer sizes.
//! - [`token`]: verifying and issuing JWTs.
//! - [`limits`]: socket admission (per user, in total) and the inbound frame rate.
//! - [`serve`]: the accept loop, with the connection limit and the request-head timeout.
//! - [`server`]: wiring it together; start and graceful shutdown.
//! - [`migrate`]: applying `sql/` and `triggers/`.
//! - [`config`]: the command line and environment; [`dev`]: the `relay dev` command.

pub mod authz;
pub mod config;
pub mod consult;
pub mod db;
pub mod dev;
pub mod event;
pub mod http;
pub mod hub;
pub mod inspector;
pub mod limits;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod migrate;
pub mod outlet;
pub mod presence;
pub mod protocol;
pub mod serve;
pub mod server;
pub mod session;
pub mod token;
pub mod upgrade;

pub use config::Config;
pub use server::{Relay, StartError};

use std::time::SystemTime;

/// Opens one plain connection (no pool) and drives it in the background; for migrations and
/// `relay dev`. The LISTEN connection has its own driver (see [`listener`]).
pub async fn connect(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// An error with its causes, for logs and messages: "db error: FATAL: password authentication
/// failed for user …" rather than tokio-postgres' own "db error", which keeps what Postgres said
/// in its source. A cause whose text the message already holds is not repeated.
pub struct Causes<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let more = cause.to_string();
            if !text.contains(&more) {
                text.push_str(": ");
                text.push_str(&more);
            }
            source = cause.source();
        }
        f.write_str(&text)
    }
}

/// RFC 3339 in UTC, as every timestamp the relay writes.
pub fn rfc3339(at: SystemTime) -> String {
    let since_epoch = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    // Beyond what `time` represents (the year 9999) there is nothing meaningful to print.
    time::OffsetDateTime::UNIX_EPOCH
        .checked_add(time::Duration::try_from(since_epoch).unwrap_or(time::Duration::MAX))
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_prints_utc_and_never_panics() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_262_400);
        assert_eq!(rfc3339(at), "2026-11-21T12:00:00Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 4);
        assert_eq!(rfc3339(far), "");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Layer(&'static str, #[source] Option<Box<Layer>>);

    #[test]
    fn causes_follow_the_sources_without_repeating_them() {
        let inner = Layer("FATAL: database \"nope\" does not exist", None);
        let outer = Layer("db error", Some(Box::new(inner)));
        assert_eq!(
            Causes(&outer).to_string(),
            "db error: FATAL: database \"nope\" does not exist"
        );
        let repeated = Layer("db error: timeout", Some(Box::new(Layer("timeout", None))));
        assert_eq!(Causes(&repeated).to_string(), "db error: timeout");
    }
}
