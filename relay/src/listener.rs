//! The LISTEN connection: receives the capture trigger's notifications and hands each event to the
//! hub, in commit order (which is id order), without gaps.
//!
//! It owns one dedicated connection, not one from the pool: tokio-postgres only surfaces
//! notifications to code that drives the connection with `poll_message`, and the pool's driver
//! discards them. Events are handled one at a time, so an event read from the log never overtakes
//! the ones after it.
//!
//! NOTIFY forgets what is sent while no one listens, so the event log is the source of truth and
//! NOTIFY only the fast path. When the connection fails the listener reconnects with capped,
//! jittered backoff and reports itself unhealthy meanwhile; on return it LISTENs first, then reads
//! from the log every event after the last one it dispatched, then continues with notifications,
//! skipping those the log already gave it. This module must not decide who sees what; that is the
//! hub's job.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::db;
use crate::event::{self, Payload};
use crate::hub::{Close, Hub, Writes};
use crate::log::{self, AT_TEXT, HORIZON};
use crate::metrics::Metrics;
use crate::presence::{self, Presence};
use crate::protocol::{close, Cursor, CursorKey, Mark};

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
/// How long a heartbeat, or one page of catch-up, may take before the connection is considered
/// dead.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Events read from the log per catch-up query.
const CATCH_UP_PAGE: i64 = 5000;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// What the LISTEN connection calls itself in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "relay-listen";

#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error("{}{}", crate::Causes(.0), unmigrated_hint(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the connection closed")]
    Closed,
    #[error("no answer from the database within {0:?}")]
    Timeout(Duration),
    #[error("no connection from the pool: {}", crate::Causes(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// For an error that says the relay's schema or its functions are missing: the likely reason.
fn unmigrated_hint(error: &tokio_postgres::Error) -> &'static str {
    use tokio_postgres::error::SqlState;
    match error.code() {
        Some(code)
            if *code == SqlState::INVALID_SCHEMA_NAME
                || *code == SqlState::UNDEFINED_TABLE
                || *code == SqlState::UNDEFINED_FUNCTION =>
        {
            " (has `relay migrate` been run on this database?)"
        }
        _ => "",
    }
}

/// Runs until `shutdown` turns true.
pub struct Listener {
    pub database: tokio_postgres::Config,
    /// For reading the log. Never the LISTEN connection itself: while its notifications wait to
    /// be handled, its driver stops reading, and a query on it would wait behind them.
    pub pool: Pool,
    pub hub: Arc<Hub>,
    pub health: Arc<Health>,
    /// Learns the other instances' presence from the notifications on [`presence::CHANNEL`].
    pub presence: Arc<Presence>,
    /// Times each event from commit to dispatch.
    pub metrics: Arc<Metrics>,
    /// The ids and times of the last events dispatched: to tell after a reconnect whether the log
    /// went back (a restore, a failover), and a notification repeating an id with another event.
    pub dispatched: std::sync::Mutex<Dispatched>,
}

/// Why the relay starts over from the log's newest event: what it logs, and the reason every
/// socket is closed with (4010: clients fetch current state).
struct StartOver {
    what: &'static str,
    close: &'static str,
}

const WENT_BACK: StartOver = StartOver {
    what: "the event log went back",
    close: "the event log went back (a restore or a failover): fetch current state",
};

const FORGED: StartOver = StartOver {
    what: "an event that was never committed was dispatched",
    close:
        "an event was sent that was never committed (a forged notification): fetch current state",
};

/// How many of the last events dispatched [`Dispatched`] remembers.
const REMEMBERED: usize = 1024;

/// The last events dispatched, oldest first: ids, times, and what the log said of them.
#[derive(Debug, Default)]
pub struct Dispatched(VecDeque<Sent>);

#[derive(Debug)]
struct Sent {
    id: i64,
    at: String,
    log: Logged,
}

/// What the log said of a dispatched event, when a repeat of its id made the listener ask. Its
/// answer does not change, so it is asked once per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Logged {
    /// Not asked yet.
    Unasked,
    /// The log holds the event with the time dispatched: any other time named for it is forged.
    Confirmed,
    /// The log has pruned the event: nothing to tell a repeat by.
    Pruned,
}

/// What a notification of an event at or before the position calls for.
#[derive(Debug, PartialEq, Eq)]
enum Repeat {
    /// The event itself again, one too old to be remembered, or one the log has pruned: nothing
    /// to do.
    Nothing,
    /// Another time for an event the log has confirmed (the time dispatched): forged, ignored
    /// without asking the log.
    Forged(String),
    /// Another time for an event dispatched with this one: the log decides which is real.
    Check(String),
}

impl Dispatched {
    fn record(&mut self, id: i64, at: &str) {
        if self.0.len() == REMEMBERED {
            self.0.pop_front();
        }
        self.0.push_back(Sent {
            id,
            at: at.to_owned(),
            log: Logged::Unasked,
        });
    }

    /// Starts again from the log's newest event, if any, as if dispatched.
    fn restart(&mut self, newest: Option<(i64, String)>) {
        self.0.clear();
        self.0.extend(newest.map(|(id, at)| Sent {
            id,
            at,
            log: Logged::Unasked,
        }));
    }

    fn last(&self) -> Option<(i64, String)> {
        self.0.back().map(|sent| (sent.id, sent.at.clone()))
    }

    fn find(&self, id: i64) -> Option<usize> {
        self.0.binary_search_by_key(&id, |sent| sent.id).ok()
    }

    /// The time of the event dispatched with this id, if remembered.
    #[cfg(test)]
    fn at_of(&self, id: i64) -> Option<&str> {
        self.find(id).map(|place| self.0[place].at.as_str())
    }

    /// What a notification naming this id and time, at or before the position, calls for.
    fn repeat(&self, id: i64, at: &str) -> Repeat {
        match self.find(id).map(|place| &self.0[place]) {
            Some(sent) if sent.at == at => Repeat::Nothing,
            Some(sent) => match sent.log {
                Logged::Unasked => Repeat::Check(sent.at.clone()),
                Logged::Confirmed => Repeat::Forged(sent.at.clone()),
                Logged::Pruned => Repeat::Nothing,
            },
            None => Repeat::Nothing,
        }
    }

    /// What the log said of the event dispatched as `id` with the time `at`: later repeats need
    /// not ask it again. Nothing is noted if that event is no longer the one remembered.
    fn note(&mut self, id: i64, at: &str, log: Logged) {
        if let Some(place) = self.find(id) {
            let sent = &mut self.0[place];
            if sent.at == at {
                sent.log = log;
            }
        }
    }
}

impl Listener {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        let mut lost = false;
        loop {
            let outcome = tokio::select! {
                outcome = self.listen_once(lost) => outcome,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            self.health.set_listening(false);
            let (cause, was_listening) = outcome;
            if was_listening {
                backoff = BACKOFF_MIN;
                lost = true;
            }
            let delay = jitter(backoff);
            if was_listening {
                tracing::error!(%cause, retry_in = ?delay, "LISTEN connection lost");
            } else {
                tracing::error!(%cause, retry_in = ?delay, "cannot listen for changes");
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Connects, listens, catches up on what was committed while no one listened, and handles
    /// events until the connection fails. Returns why, and whether it got as far as listening.
    async fn listen_once(&self, reconnect: bool) -> (ListenError, bool) {
        let connected = tokio::time::timeout(QUERY_TIMEOUT, connect(&self.database)).await;
        let (client, mut messages, driver) = match connected {
            Ok(Ok(parts)) => parts,
            Ok(Err(e)) => return (e, false),
            Err(_) => return (ListenError::Timeout(QUERY_TIMEOUT), false),
        };
        // Presence is registered on this connection, so it lives exactly as long as the LISTEN.
        // Before catching up: the connection's notifications are not read until then, and a
        // query behind a full buffer of them would never be answered.
        let (instance, others) = match timed(presence::register(&client)).await {
            Ok(registered) => registered,
            Err(e) => {
                driver.abort();
                return (e, false);
            }
        };
        // LISTEN came first, so whatever commits from now on is notified; what committed before
        // is in the log.
        let caught_up = match self.hub.position() {
            None => self.start().await,
            Some(position) => match self.log_went_back(position).await {
                Ok(None) => self.catch_up().await,
                Ok(Some(why)) => self.start_over(position, &why, WENT_BACK).await,
                Err(e) => Err(e),
            },
        };
        if let Err(e) = caught_up {
            driver.abort();
            return (e, false);
        }
        // The other instances' presence is taken in once the hand-overs missed meanwhile have
        // been dispatched: they joined by those, and the sockets here that those took out of a
        // session must not hear of them first.
        tracing::debug!(instance, "registered for presence");
        self.presence.registered(instance, others);

        if reconnect {
            self.hub
                .counters()
                .listen_reconnects
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(channel = event::CHANNEL, position = ?self.hub.position(), "listening for changes");
        self.health.set_listening(true);
        let cause = self.handle_messages(&client, &mut messages).await;
        driver.abort();
        (cause, true)
    }

    /// The first connection: the relay starts live from the log's newest event.
    async fn start(&self) -> Result<(), ListenError> {
        let (position, key) = self.read_start().await?;
        self.hub.start_at(position, key);
        Ok(())
    }

    /// Reads where the relay starts: the log's position as clients are told it, and the key of
    /// cursors' tags; and loads what presence and the reconnect check need as of that position.
    async fn read_start(&self) -> Result<(Mark, CursorKey), ListenError> {
        let mut lease = self.pooled().await?;
        let client = lease.client();
        // The open consultation sessions presence follows, as of that very position; events
        // after it keep them current.
        let tx = timed(
            client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start(),
        )
        .await?;
        let (position, key) = timed(log::mark(&*tx)).await?;
        let open = timed(presence::open_sessions(&*tx)).await?;
        // The newest event, as if dispatched: what a later reconnect checks the log against.
        let newest = timed(tx.query_opt(
            &format!("select e.id, {AT_TEXT} from relay.events e order by e.id desc limit 1"),
            &[],
        ))
        .await?
        .map(|row| (row.get::<_, i64>(0), row.get::<_, String>(1)));
        timed(tx.commit()).await?;
        lease.finish();
        self.dispatched().restart(newest);
        self.presence.open_sessions_loaded(open);
        Ok((position, key))
    }

    /// The log went back (restored from a backup, or failed over to a standby that missed
    /// commits): ids this relay delivered are taken again by other events, and clients' views
    /// hold rows the database no longer has. Everyone starts over, once the hub stands at the
    /// log's newest event: a client that reconnects at once is never told the old position.
    async fn start_over(
        &self,
        position: Cursor,
        why: &str,
        over: StartOver,
    ) -> Result<(), ListenError> {
        tracing::error!(%position, %why, "{}; closing every socket and starting from the log's \
            newest event", over.what);
        self.presence.events_lost();
        let (position, key) = self.read_start().await?;
        self.hub.start_over_at(
            position,
            key,
            Close {
                code: close::STATE_LOST,
                reason: over.close.into(),
            },
        );
        Ok(())
    }

    /// Whether the log is behind what this relay delivered, and why: its sequence has not handed
    /// out the position's id, or the last event dispatched is no longer in the log as it was
    /// (not pruned by retention, but gone or another event under its id).
    async fn log_went_back(&self, position: Cursor) -> Result<Option<String>, ListenError> {
        let last = self.dispatched().last();
        let lease = self.pooled().await?;
        let (last_id, last_at) = last.map_or((-1, None), |(id, at)| (id, Some(at)));
        let row = timed(lease.query_one(
            &format!(
                "select case when s.is_called then s.last_value else 0 end, h.pruned_through, \
                        (select {AT_TEXT} from relay.events e where e.id = $1) \
                 from relay.events_id_seq s, {HORIZON} h"
            ),
            &[&last_id],
        ))
        .await?;
        lease.finish();
        let issued: i64 = row.get(0);
        let horizon: i64 = row.get(1);
        let logged: Option<String> = row.get(2);
        if issued < position.0 {
            return Ok(Some(format!(
                "its sequence has handed out ids up to {issued}, and this relay delivered up to {position}"
            )));
        }
        Ok(match last_at {
            Some(at) if last_id > horizon && logged.as_deref() != Some(at.as_str()) => {
                Some(format!(
                    "event {last_id}, delivered with the time {at}, is {} in the log",
                    logged.map_or("no longer".to_string(), |other| format!(
                        "another event (time {other})"
                    ))
                ))
            }
            _ => None,
        })
    }

    /// Dispatches, in order, every event in the log after the hub's position.
    async fn catch_up(&self) -> Result<(), ListenError> {
        let lease = self.pooled().await?;
        let caught_up = self.catch_up_on(&lease).await;
        if caught_up.is_ok() {
            lease.finish();
        }
        caught_up
    }

    async fn catch_up_on(&self, client: &Client) -> Result<(), ListenError> {
        loop {
            let Some(after) = self.hub.position() else {
                return Ok(());
            };
            let page = timed(log::read_range(
                client,
                after,
                Cursor(i64::MAX),
                None,
                CATCH_UP_PAGE,
            ))
            .await?;
            if !page.is_complete_after(after) {
                // Retention deleted events no one here has delivered: every subscriber may have
                // missed some. Close every socket; clients resume and learn their cursor expired.
                tracing::error!(position = %after, horizon = %page.horizon,
                    "events were pruned before they were delivered; closing every socket");
                self.hub.disconnect_all(Close {
                    code: close::GOING_AWAY,
                    reason: "events were lost to retention; resume or refetch".into(),
                });
                self.hub.skip(page.horizon);
                // What presence knew of sessions came from events; some of those are gone.
                let open = timed(presence::open_sessions(client)).await?;
                self.presence.events_lost();
                self.presence.open_sessions_loaded(open);
                continue;
            }
            let more = page.more;
            for (id, event) in page.events {
                match event {
                    // A page of the log: more events are waiting behind each one.
                    Ok(event) => {
                        self.dispatch(&event, Writes::Queued, None).await;
                    }
                    Err(cause) => {
                        self.hub.skip_malformed(&cause);
                        self.hub.skip(id);
                    }
                }
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Hands an event to the hub, and to presence (which follows sessions changing hands).
    /// `arrived`: when its notification was read from the connection (none for one read from the
    /// log, which counts as received when dispatched).
    async fn dispatch(
        &self,
        event: &event::Event,
        writes: Writes,
        arrived: Option<SystemTime>,
    ) -> usize {
        // With `Writes::Direct` the hub writes most frames straight to their sockets.
        // Unconstrained, so that those writes do not spend this task's cooperative budget: a
        // socket write refused for want of budget would be handed to the socket's writer instead,
        // which is what writing directly saves.
        self.dispatched().record(event.id, &event.at);
        let received = arrived.unwrap_or_else(SystemTime::now);
        let delivered =
            tokio::task::unconstrained(async { self.hub.dispatch_with(event, writes) }).await;
        self.metrics
            .dispatched(&event.at, received, SystemTime::now());
        self.presence.observe(event);
        delivered
    }

    fn dispatched(&self) -> std::sync::MutexGuard<'_, Dispatched> {
        self.dispatched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A notification of an event at or before the position, with its time (whole, or naming
    /// only the id and time of an event too large for NOTIFY). The same event again (read from
    /// the log meanwhile, or buffered across a reconnect) is skipped. Otherwise, for an id dispatched
    /// lately, the log says whether what was dispatched under it was committed; if not, it was
    /// forged on the relay's channel, clients received an event that never was and missed the
    /// real one, and everyone starts over from the log.
    async fn check_repeat(&self, id: i64, at: &str, position: Cursor) -> Result<(), ListenError> {
        let repeat = self.dispatched().repeat(id, at);
        let dispatched = match repeat {
            Repeat::Nothing => return Ok(()),
            Repeat::Forged(dispatched) => {
                forged_repeat(id, at, &dispatched);
                return Ok(());
            }
            Repeat::Check(dispatched) => dispatched,
        };
        let lease = self.pooled().await?;
        let row = timed(lease.query_one(
            &format!(
                "select (select {AT_TEXT} from relay.events e where e.id = $1), h.pruned_through \
                 from {HORIZON} h"
            ),
            &[&id],
        ))
        .await?;
        lease.finish();
        let logged: Option<String> = row.get(0);
        let horizon: i64 = row.get(1);
        match logged {
            Some(logged) if logged == dispatched => {
                // Each dispatched event is looked up once: a flood of forged repeats of it costs
                // the database nothing more.
                self.dispatched().note(id, &dispatched, Logged::Confirmed);
                forged_repeat(id, at, &dispatched);
                Ok(())
            }
            // Pruned since: nothing to tell by, now or later.
            None if id <= horizon => {
                self.dispatched().note(id, &dispatched, Logged::Pruned);
                Ok(())
            }
            logged => {
                let why = format!(
                    "event {id} was dispatched with the time {dispatched}, but the one committed \
                     under its id has {}: a notification was forged on the relay's channel",
                    logged.as_deref().unwrap_or("none")
                );
                self.start_over(position, &why, FORGED).await
            }
        }
    }

    /// A pooled connection, within the query timeout: a listener that cannot get one reconnects
    /// (and reports unhealthy) rather than hang.
    async fn pooled(&self) -> Result<db::Lease, ListenError> {
        match tokio::time::timeout(QUERY_TIMEOUT, db::lease(&self.pool)).await {
            Ok(client) => Ok(client?),
            Err(_) => Err(ListenError::Timeout(QUERY_TIMEOUT)),
        }
    }

    async fn handle_messages(&self, client: &Client, messages: &mut Messages) -> ListenError {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Some((Ok(AsyncMessage::Notification(n)), arrived)) if n.channel() == event::CHANNEL => {
                        // The dispatch writes an event's frames itself while nothing waits behind
                        // it. Once notifications queue up, each event's writes go to the sockets'
                        // writers, on every runtime thread, so that the backlog clears in
                        // parallel and no event waits for all the writes of the ones before it.
                        let writes = if messages.is_empty() {
                            Writes::Direct
                        } else {
                            Writes::Queued
                        };
                        if let Err(e) = self.handle(n.payload(), writes, arrived).await {
                            return e;
                        }
                        heartbeat.reset();
                    }
                    Some((Ok(AsyncMessage::Notification(n)), _)) if n.channel() == presence::CHANNEL => {
                        self.presence.notified(n.payload());
                        heartbeat.reset();
                    }
                    Some((Ok(_), _)) => {}
                    Some((Err(e), _)) => return e.into(),
                    None => return ListenError::Closed,
                },
                _ = heartbeat.tick() => {
                    if let Err(e) = timed(client.simple_query("")).await {
                        return e;
                    }
                }
            }
        }
    }

    /// Handles one notification. Notifications arrive in id order; one the log has already
    /// delivered (during catch-up) is skipped. Only the event right after the position is taken
    /// from the payload as it is: after a gap in the ids (a transaction that failed after drawing
    /// its ids, or a notification no trigger sent), the log says what really committed. An event
    /// too large for NOTIFY, or a payload that cannot be decoded, is read from the log too, with
    /// everything before it.
    async fn handle(
        &self,
        payload: &str,
        writes: Writes,
        arrived: SystemTime,
    ) -> Result<(), ListenError> {
        let position = self.hub.position().unwrap_or_default();
        match Payload::decode(payload) {
            Ok(Payload::Inline(event)) if position.0.checked_add(1) == Some(event.id) => {
                let delivered = self.dispatch(&event, writes, Some(arrived)).await;
                tracing::trace!(event_id = event.id, feed = %event.feed, delivered, "event dispatched");
                Ok(())
            }
            Ok(Payload::Inline(event)) if Cursor(event.id) <= position => {
                self.check_repeat(event.id, &event.at, position).await
            }
            Ok(Payload::Inline(event)) => {
                tracing::debug!(event_id = event.id, %position, "a gap in event ids; reading the log");
                self.catch_up().await
            }
            Ok(Payload::Fetch { id, at }) if Cursor(id) <= position => {
                self.check_repeat(id, &at, position).await
            }
            Ok(Payload::Fetch { .. }) => self.catch_up().await,
            Err(cause) => {
                self.hub
                    .counters()
                    .events_malformed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%cause, payload_bytes = payload.len(),
                    "undecodable notification; reading the log instead");
                self.catch_up().await
            }
        }
    }
}

fn forged_repeat(id: i64, at: &str, dispatched: &str) {
    tracing::warn!(event_id = id, %at, %dispatched,
        "a notification named an event already dispatched, with another time the log does not \
         hold: forged on the relay's channel; ignored");
}

/// Bounds a query on the LISTEN connection: one that hangs means the connection is gone.
async fn timed<T>(
    query: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, ListenError> {
    match tokio::time::timeout(QUERY_TIMEOUT, query).await {
        Ok(outcome) => Ok(outcome?),
        Err(_) => Err(ListenError::Timeout(QUERY_TIMEOUT)),
    }
}

/// What the LISTEN connection brings, each with when it was read from the connection.
type Messages = mpsc::Receiver<(Result<AsyncMessage, tokio_postgres::Error>, SystemTime)>;

/// Opens the LISTEN connection. Its driver runs in its own task and forwards every message,
/// so that notifications are collected before LISTEN is even sent.
async fn connect(
    database: &tokio_postgres::Config,
) -> Result<(Client, Messages, JoinHandle<()>), ListenError> {
    let mut database = database.clone();
    database.application_name(APPLICATION_NAME);
    let (client, mut connection) = database.connect(NoTls).await?;
    let (tx, rx) = mpsc::channel(BUFFER);
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            let failed = message.is_err();
            // Timed here, so that the time an event waits behind earlier ones' dispatch counts
            // as the relay's, not as the database's.
            if tx.send((message, SystemTime::now())).await.is_err() || failed {
                break;
            }
        }
    });
    // The channel names are fixed lowercase identifiers; they need no quoting. The keepalives
    // make the server notice within about a minute when this relay's host vanishes without
    // closing the connection, so its presence does not outlive it by the system default of hours.
    // Keepalives probe an idle connection only, and notifications keep this one busy: the user
    // timeout ends it when what the server sends goes unacknowledged for a minute.
    client
        .batch_execute(&format!(
            "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; \
             SET tcp_keepalives_count = 3; SET tcp_user_timeout = 60000; LISTEN {}; LISTEN {}",
            event::CHANNEL,
            presence::CHANNEL
        ))
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
    fn the_last_events_dispatched_are_remembered_by_id() {
        let mut dispatched = Dispatched::default();
        dispatched.restart(Some((3, "c".into())));
        for id in 5..5 + REMEMBERED as i64 {
            dispatched.record(id, &format!("t{id}"));
        }
        // The oldest went to make room; every other is found by its id, gaps and all.
        assert_eq!(dispatched.at_of(3), None);
        assert_eq!(dispatched.at_of(4), None);
        assert_eq!(dispatched.at_of(5), Some("t5"));
        assert_eq!(dispatched.at_of(700), Some("t700"));
        let last = 4 + REMEMBERED as i64;
        assert_eq!(dispatched.last(), Some((last, format!("t{last}"))));
        dispatched.restart(None);
        assert_eq!((dispatched.last(), dispatched.at_of(700)), (None, None));
    }

    #[test]
    fn a_repeat_is_checked_against_the_log_until_the_log_has_answered_for_the_event() {
        let mut dispatched = Dispatched::default();
        dispatched.restart(Some((3, "c".into())));
        dispatched.record(4, "d");
        assert_eq!(dispatched.repeat(4, "d"), Repeat::Nothing, "the same event");
        assert_eq!(dispatched.repeat(2, "x"), Repeat::Nothing, "not remembered");
        assert_eq!(dispatched.repeat(4, "x"), Repeat::Check("d".into()));
        // What the log said of another time than the one dispatched is not noted.
        dispatched.note(4, "x", Logged::Confirmed);
        assert_eq!(dispatched.repeat(4, "y"), Repeat::Check("d".into()));
        dispatched.note(4, "d", Logged::Confirmed);
        assert_eq!(dispatched.repeat(4, "y"), Repeat::Forged("d".into()));
        assert_eq!(dispatched.repeat(4, "d"), Repeat::Nothing);
        assert_eq!(dispatched.repeat(3, "y"), Repeat::Check("c".into()));
        dispatched.note(3, "c", Logged::Pruned);
        assert_eq!(
            dispatched.repeat(3, "y"),
            Repeat::Nothing,
            "pruned: nothing to tell by"
        );
        // Starting over forgets what the log said.
        dispatched.restart(Some((4, "d".into())));
        assert_eq!(dispatched.repeat(4, "y"), Repeat::Check("d".into()));
    }

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
