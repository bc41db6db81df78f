//! The LISTEN connection: receives the capture trigger's notifications and hands each event to the
//! hub, in commit order.
//!
//! It owns one dedicated connection, not one from the pool: tokio-postgres only surfaces
//! notifications to code that drives the connection with `poll_message`, and the pool's driver
//! discards them. Events too large for NOTIFY are read from the event log through the pool. Events
//! are handled one at a time, so a fetched event never overtakes the ones after it.
//!
//! When the connection fails it reconnects with capped, jittered backoff and reports itself
//! unhealthy meanwhile. This module must not decide who sees what; that is the hub's job.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::event::{self, DecodeError, Event, Payload, RawEvent};
use crate::hub::Hub;

/// Whether the relay is currently receiving events; read by the health endpoint.
#[derive(Debug)]
pub struct Health {
    listening: watch::Sender<bool>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            listening: watch::Sender::new(false),
        }
    }
}

impl Health {
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Waits until the LISTEN connection is (`true`) or is not (`false`) established.
    pub async fn wait_for(&self, listening: bool) {
        let mut changes = self.listening.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = changes.wait_for(|now| *now == listening).await;
    }

    fn set_listening(&self, value: bool) {
        self.listening.send_replace(value);
    }
}

/// Notifications buffered between the connection's driver and the event loop.
const BUFFER: usize = 4096;
/// How often the LISTEN connection is checked when it is otherwise quiet.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long a heartbeat may take before the connection is considered dead.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long reading one large event from the log may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts at reading one large event before the connection is treated as lost.
const FETCH_ATTEMPTS: u32 = 4;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the connection closed")]
    Closed,
    #[error("no answer to a heartbeat within {0:?}")]
    Heartbeat(Duration),
    #[error("could not read event {id} from relay.events: {cause}")]
    Fetch { id: i64, cause: FetchError },
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("no connection from the pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("event {0} is not in relay.events")]
    Missing(i64),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl FetchError {
    /// Whether trying again may succeed: the database was unreachable or slow, as opposed to an
    /// event that is not there or cannot be decoded.
    fn is_retryable(&self) -> bool {
        matches!(
            self,
            FetchError::Pool(_) | FetchError::Query(_) | FetchError::Timeout(_)
        )
    }
}

/// Runs until `shutdown` turns true.
pub struct Listener {
    pub database: tokio_postgres::Config,
    pub pool: Pool,
    pub hub: Arc<Hub>,
    pub health: Arc<Health>,
}

impl Listener {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let outcome = tokio::select! {
                outcome = self.listen_once() => outcome,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            self.health.set_listening(false);
            let (cause, was_listening) = outcome;
            if was_listening {
                backoff = BACKOFF_MIN;
            }
            let delay = jitter(backoff);
            tracing::error!(%cause, retry_in = ?delay, "LISTEN connection lost");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Connects, listens and handles events until the connection fails. Returns why, and
    /// whether it got as far as listening.
    async fn listen_once(&self) -> (ListenError, bool) {
        let (client, mut messages, driver) = match connect(&self.database).await {
            Ok(parts) => parts,
            Err(e) => return (e, false),
        };
        tracing::info!(channel = event::CHANNEL, "listening for changes");
        self.health.set_listening(true);
        let cause = self.handle_messages(&client, &mut messages).await;
        driver.abort();
        (cause, true)
    }

    async fn handle_messages(
        &self,
        client: &Client,
        messages: &mut mpsc::Receiver<Result<AsyncMessage, tokio_postgres::Error>>,
    ) -> ListenError {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Some(Ok(AsyncMessage::Notification(n))) if n.channel() == event::CHANNEL => {
                        if let Err(e) = self.handle(n.payload()).await {
                            return e;
                        }
                        heartbeat.reset();
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return e.into(),
                    None => return ListenError::Closed,
                },
                _ = heartbeat.tick() => {
                    match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.simple_query("")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return e.into(),
                        Err(_) => return ListenError::Heartbeat(HEARTBEAT_TIMEOUT),
                    }
                }
            }
        }
    }

    /// Handles one notification. An undecodable one is skipped; an event that cannot be read
    /// from the log (the database is unreachable) is an error that ends this connection, so that
    /// health reports it, rather than a silent skip.
    async fn handle(&self, payload: &str) -> Result<(), ListenError> {
        let event = match Payload::decode(payload) {
            Ok(Payload::Inline(event)) => event,
            Ok(Payload::Fetch { id }) => match self.fetch_with_retries(id).await {
                Ok(event) => event,
                Err(FetchError::Decode(e)) => {
                    self.skip_malformed(&e, payload.len());
                    return Ok(());
                }
                Err(e) => return Err(ListenError::Fetch { id, cause: e }),
            },
            Err(e) => {
                self.skip_malformed(&e, payload.len());
                return Ok(());
            }
        };
        let delivered = self.hub.dispatch(&event);
        tracing::debug!(event_id = event.id, feed = %event.feed, delivered, "event dispatched");
        Ok(())
    }

    fn skip_malformed(&self, cause: &DecodeError, payload_bytes: usize) {
        self.hub
            .counters()
            .events_malformed
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%cause, payload_bytes, "skipped an undecodable event");
    }

    /// Reads a large event, retrying a few times with a bounded wait each.
    async fn fetch_with_retries(&self, id: i64) -> Result<Event, FetchError> {
        let mut delay = BACKOFF_MIN;
        let mut attempt = 1;
        loop {
            let outcome = match tokio::time::timeout(FETCH_TIMEOUT, self.fetch(id)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(FetchError::Timeout(FETCH_TIMEOUT)),
            };
            match outcome {
                Err(e) if e.is_retryable() && attempt < FETCH_ATTEMPTS => {
                    tracing::warn!(event_id = id, attempt, cause = %e, "reading a large event failed; retrying");
                    tokio::time::sleep(jitter(delay)).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// Reads an event that was too large for NOTIFY from the event log.
    async fn fetch(&self, id: i64) -> Result<Event, FetchError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(event::FETCH_SQL, &[&id])
            .await?
            .ok_or(FetchError::Missing(id))?;
        let object = |value: Option<Value>| match value {
            Some(Value::Object(map)) => Some(map),
            _ => None::<Map<String, Value>>,
        };
        let raw = RawEvent {
            id: row.try_get(0)?,
            table: row.try_get(1)?,
            op: row.try_get(2)?,
            new: object(row.try_get(3)?),
            old: object(row.try_get(4)?),
            new_session: object(row.try_get(5)?),
            old_session: object(row.try_get(6)?),
            xid: row.try_get(7)?,
            at: row.try_get(8)?,
            fetch: false,
        };
        Ok(Event::try_from(raw)?)
    }
}

type Messages = mpsc::Receiver<Result<AsyncMessage, tokio_postgres::Error>>;

/// Opens the LISTEN connection. Its driver runs in its own task and forwards every message,
/// so that notifications are collected before LISTEN is even sent.
async fn connect(
    database: &tokio_postgres::Config,
) -> Result<(Client, Messages, JoinHandle<()>), ListenError> {
    let (client, mut connection) = database.connect(NoTls).await?;
    let (tx, rx) = mpsc::channel(BUFFER);
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            let failed = message.is_err();
            if tx.send(message).await.is_err() || failed {
                break;
            }
        }
    });
    // The channel name is a fixed lowercase identifier; it needs no quoting.
    client
        .batch_execute(&format!("LISTEN {}", event::CHANNEL))
        .await?;
    Ok((client, rx, driver))
}

/// Spreads reconnects of many relays over ±50% of the delay so they do not arrive together.
fn jitter(delay: Duration) -> Duration {
    let random = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
    delay.mul_f64(0.5 + random)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_one_and_a_half() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(3),
                "{d:?}"
            );
        }
    }
}
