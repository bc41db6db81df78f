//! Presence: who is connected to which consultation session, on every relay instance of the
//! database, with the database as the bus (`triggers/004_presence.sql`).
//!
//! A socket joins a session's presence when it subscribes to `consultation_messages` filtered on
//! that session, and leaves when it unsubscribes, subscribes to something else, or closes. A user
//! is present while at least one of their sockets, on any instance, is joined. Every joined socket
//! gets `presence` frames: the current list when it joins, then who joined and who left.
//!
//! This instance writes its own sockets' presence to `relay.presence` (one row per session and
//! user), and learns the other instances' through the LISTEN connection's notifications
//! ([`Presence::notified`]). Its own changes take effect here at once; the notifications they cause
//! come back and are ignored. Writing is done by [`Presence::run`], which sends the latest state of
//! each changed (session, user) pair in order, and retries after a failure: a change is never lost,
//! only coalesced.
//!
//! Presence follows authorization: when a session changes hands, sockets of users who can no longer
//! read it leave its presence ([`Presence::observe`]), so they learn nothing more about it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::Pool;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::authz::{self, Feed, Owners, Principal, Role};
use crate::db;
use crate::event::Event;
use crate::hub::{Close, Hub, Link, SocketId};
use crate::protocol::{self, Member};

/// The notification channel of presence changes.
pub const CHANNEL: &str = "relay_presence";
/// How often the instance removes the presence of instances whose LISTEN connection is gone.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How long a presence write may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The wait before a failed presence write is tried again.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// The least time between two presence writes: changes that come faster are written together.
/// Each write is a transaction with a NOTIFY, which every committing transaction in the cluster
/// queues behind; a user subscribing and unsubscribing as fast as the frame limit allows must
/// not turn into hundreds of them a second.
const WRITE_INTERVAL: Duration = Duration::from_millis(50);

/// This instance's presence state, shared by the sessions, the listener and the writer.
pub struct Presence {
    state: Mutex<State>,
    /// Wakes the writer when there is something to write.
    dirty: Notify,
    hub: Arc<Hub>,
}

#[derive(Default)]
struct State {
    /// The instance number this process is registered under, once registered.
    instance: Option<i64>,
    /// Every number this process has been registered under: notifications naming them are echoes
    /// of its own writes.
    own: HashSet<i64>,
    /// An earlier registration whose rows must be forgotten once the current one holds them.
    previous: Option<i64>,
    /// Set by a new registration: the writer must write every local row under the new number.
    full_write: bool,
    /// The local sockets that watch presence: who they are, and what they joined.
    sockets: HashMap<SocketId, Watcher>,
    /// Sockets that follow all their user's open sessions, by user.
    followers: HashMap<Uuid, HashSet<SocketId>>,
    /// Every open (waiting or active) session and its participants, as of the last event
    /// dispatched: loaded when the relay starts, then kept by [`Presence::observe`].
    open: HashMap<Uuid, Owners>,
    /// The open sessions of each participant.
    open_by_user: HashMap<Uuid, HashSet<Uuid>>,
    /// Per session: who is present anywhere, and which local sockets watch it.
    rooms: HashMap<Uuid, Room>,
    /// Sessions named in the filter of a patient's or dentist's socket, and what is known of
    /// their participants: a socket is in the room only while they include its user.
    named: HashMap<Uuid, Named>,
    /// Local (session, user) pairs whose presence changed since the last write: role, present.
    pending: HashMap<(Uuid, Uuid), (Role, bool)>,
}

/// A change to write: a (session, user) pair, and its latest state here (role, present).
type Change = ((Uuid, Uuid), (Role, bool));

/// What a socket's `consultation_messages` subscription makes it join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The one session its filter names.
    Session(Uuid),
    /// Every open (waiting or active) session of its user, as they open and end: a patient's or
    /// dentist's subscription without a filter.
    OwnOpenSessions,
}

struct Watcher {
    principal: Principal,
    link: Link,
    /// Follows its user's open sessions (rather than one session).
    follows: bool,
    /// The session its filter names, for a patient or dentist: it joins and leaves as the
    /// participants change.
    named: Option<Uuid>,
    sessions: HashSet<Uuid>,
}

/// A session named by patients' or dentists' sockets.
#[derive(Default)]
struct Named {
    sockets: HashSet<SocketId>,
    /// Its participants as of the last event dispatched for it since it was first named, or as
    /// read from the database when there was none (`None`: not known yet; `Some(None)`: deleted).
    owners: Option<Option<Owners>>,
}

#[derive(Default)]
struct Room {
    watchers: HashMap<SocketId, Link>,
    members: HashMap<Uuid, Entry>,
}

struct Entry {
    role: Role,
    /// Local sockets of this user joined to the room.
    local: usize,
    /// Other instances where this user is joined to the room.
    remote: BTreeSet<i64>,
}

impl Entry {
    fn present(&self) -> bool {
        self.local > 0 || !self.remote.is_empty()
    }
}

impl Room {
    fn present(&self) -> Vec<Member> {
        let mut members: Vec<Member> = self
            .members
            .iter()
            .filter(|(_, entry)| entry.present())
            .map(|(user_id, entry)| Member {
                user_id: *user_id,
                role: entry.role,
            })
            .collect();
        members.sort();
        members
    }

    fn is_empty(&self) -> bool {
        self.watchers.is_empty() && self.members.is_empty()
    }
}

/// Frames queued while the state's lock is held, so every watcher gets them in the order the
/// changes took effect; and the sockets to cut, once the lock is released, whose queue was full.
#[derive(Default)]
struct Outbox {
    full: Vec<SocketId>,
}

impl Outbox {
    /// Queues a frame for one socket.
    fn send(&mut self, socket: SocketId, link: &Link, frame: Bytes) {
        if !link.try_send(frame) {
            self.full.push(socket);
        }
    }

    /// One frame to every watcher of a room.
    fn broadcast(&mut self, room: &Room, frame: Bytes) {
        for (socket, link) in &room.watchers {
            self.send(*socket, link, frame.clone());
        }
    }
}

/// A presence notification from another instance.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Notice {
    instance: i64,
    #[serde(default)]
    gone: bool,
    session_id: Option<Uuid>,
    user_id: Option<Uuid>,
    role: Option<Role>,
    present: Option<bool>,
}

impl Presence {
    pub fn new(hub: Arc<Hub>) -> Arc<Presence> {
        Arc::new(Presence {
            state: Mutex::new(State::default()),
            dirty: Notify::new(),
            hub,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cuts, as slow consumers, the sockets whose queue had no room for a frame.
    fn deliver(&self, outbox: Outbox) {
        for socket in outbox.full {
            self.hub.cut(socket, Close::slow_consumer());
        }
    }

    /// Sets what a socket watches, for a new `consultation_messages` subscription: the sessions
    /// of `scope` (for [`Scope::OwnOpenSessions`], the user's open sessions as of the last event
    /// dispatched). It leaves the sessions it watched that are not among them and joins the new
    /// ones. For each session it watches the socket gets the current list; the others watching a
    /// session learn that its user joined, if the user was not present already.
    pub fn watch(&self, socket: SocketId, link: Link, principal: Principal, scope: Scope) {
        let mut outbox = Outbox::default();
        let wrote = {
            let mut state = self.lock();
            let follows = scope == Scope::OwnOpenSessions;
            let watcher = state.sockets.entry(socket).or_insert_with(|| Watcher {
                principal,
                link,
                follows,
                named: None,
                sessions: HashSet::new(),
            });
            watcher.follows = follows;
            let named = match scope {
                Scope::Session(session) if principal.role != Role::Admin => Some(session),
                _ => None,
            };
            state.set_named(socket, named);
            let followers = state.followers.entry(principal.user_id).or_default();
            if follows {
                followers.insert(socket);
            } else {
                followers.remove(&socket);
                if followers.is_empty() {
                    state.followers.remove(&principal.user_id);
                }
            }
            let target = match scope {
                Scope::Session(session) if named.is_some() => state
                    .known_owners(session)
                    .filter(|owners| authz::may_see(&principal, Feed::ConsultationMessages, owners))
                    .map(|_| HashSet::from([session]))
                    .unwrap_or_default(),
                Scope::Session(session) => HashSet::from([session]),
                Scope::OwnOpenSessions => state.open_sessions_of(&principal),
            };
            state.set_sessions(socket, target, true, &mut outbox)
        };
        if wrote {
            self.dirty.notify_one();
        }
        self.deliver(outbox);
    }

    /// The participants of a session named by a socket's filter, read from the database after the
    /// socket began to watch it (`None`: no such session). Used only while no event for the
    /// session has been dispatched since it was named, and it is not among the open sessions:
    /// presence otherwise follows the events, in the order they are dispatched.
    pub fn owners_read(&self, session: Uuid, owners: Option<Owners>) {
        let mut outbox = Outbox::default();
        let wrote = {
            let mut state = self.lock();
            if state.known_owners(session).is_some() || !state.named.contains_key(&session) {
                return;
            }
            if let Some(named) = state.named.get_mut(&session) {
                named.owners = Some(owners);
            }
            state.admit_named(session, &mut outbox)
        };
        if wrote {
            self.dirty.notify_one();
        }
        self.deliver(outbox);
    }

    /// Events were lost to this relay (a log that went back, events pruned before they were
    /// dispatched): what was learnt of named sessions' participants from events may no longer
    /// hold. Read again as sockets name them.
    pub fn events_lost(&self) {
        for named in self.lock().named.values_mut() {
            named.owners = None;
        }
    }

    /// Whether presence knows a session's participants (it is open, or named and followed).
    pub fn knows(&self, session: Uuid) -> bool {
        self.lock().known_owners(session).is_some()
    }

    /// Replaces what is known of open sessions (`id`, participants), read in the snapshot of the
    /// position the relay starts from; sockets that follow their open sessions are set to them.
    pub fn open_sessions_loaded(&self, sessions: Vec<(Uuid, Owners)>) {
        let mut outbox = Outbox::default();
        let wrote = {
            let mut state = self.lock();
            state.open.clear();
            state.open_by_user.clear();
            for (session, owners) in sessions {
                state.set_open(session, Some(owners));
            }
            let following: Vec<SocketId> = state.followers.values().flatten().copied().collect();
            let mut wrote = false;
            for socket in following {
                if let Some(principal) = state.sockets.get(&socket).map(|w| w.principal) {
                    let target = state.open_sessions_of(&principal);
                    wrote |= state.set_sessions(socket, target, false, &mut outbox);
                }
            }
            wrote
        };
        if wrote {
            self.dirty.notify_one();
        }
        self.deliver(outbox);
    }

    /// Takes a socket out of every session it watches.
    pub fn leave(&self, socket: SocketId) {
        let mut outbox = Outbox::default();
        let wrote = self.lock().forget_socket(socket, &mut outbox);
        if wrote {
            self.dirty.notify_one();
        }
        self.deliver(outbox);
    }

    /// Sees every event, and follows sessions' changes:
    /// - a socket whose user can no longer read a session (handed over, deleted) leaves it;
    /// - a session that ends is left by the sockets that follow their user's open sessions;
    /// - a session that opens (or is handed to someone) is joined by its participants' sockets
    ///   that follow their open sessions.
    pub fn observe(&self, event: &Event) {
        if event.feed != Feed::ConsultationSessions {
            return;
        }
        let Some(session) = event
            .new
            .as_ref()
            .or(event.old.as_ref())
            .and_then(|version| version.row.get("id"))
            .and_then(|id| id.as_str())
            .and_then(|id| Uuid::parse_str(id).ok())
        else {
            return;
        };
        let now = event.new.as_ref().map(|version| {
            let open = matches!(
                version.row.get("status").and_then(|s| s.as_str()),
                Some("waiting" | "active")
            );
            (version.owners, open)
        });
        let mut outbox = Outbox::default();
        let wrote = {
            let mut state = self.lock();
            state.set_open(
                session,
                now.filter(|(_, open)| *open).map(|(owners, _)| owners),
            );
            if let Some(named) = state.named.get_mut(&session) {
                named.owners = Some(now.map(|(owners, _)| owners));
            }
            let mut wrote = false;
            // Who leaves.
            let leaving: Vec<SocketId> = state
                .rooms
                .get(&session)
                .map(|room| {
                    room.watchers
                        .keys()
                        .filter(|socket| {
                            let Some(watcher) = state.sockets.get(socket) else {
                                return false;
                            };
                            match &now {
                                Some((owners, open)) => {
                                    !authz::may_see(
                                        &watcher.principal,
                                        Feed::ConsultationMessages,
                                        owners,
                                    ) || (watcher.follows && !open)
                                }
                                None => watcher.principal.role != Role::Admin,
                            }
                        })
                        .copied()
                        .collect()
                })
                .unwrap_or_default();
            for socket in leaving {
                wrote |= state.leave_room(socket, session, &mut outbox);
            }
            // Who joins: sockets that name the session and may now read it.
            wrote |= state.admit_named(session, &mut outbox);
            // Who joins: followers of their open sessions.
            if let Some((owners, true)) = now {
                let joining: Vec<SocketId> = owners
                    .user_ids()
                    .filter_map(|user| state.followers.get(&user))
                    .flatten()
                    .filter(|socket| {
                        state.sockets.get(socket).is_some_and(|watcher| {
                            !watcher.sessions.contains(&session)
                                && authz::may_see(
                                    &watcher.principal,
                                    Feed::ConsultationMessages,
                                    &owners,
                                )
                        })
                    })
                    .copied()
                    .collect();
                for socket in joining {
                    wrote |= state.join_room(socket, session, &mut outbox);
                }
            }
            wrote
        };
        if wrote {
            self.dirty.notify_one();
        }
        self.deliver(outbox);
    }

    /// Handles a notification on [`CHANNEL`]. Echoes of this instance's own writes are ignored.
    pub fn notified(&self, payload: &str) {
        let notice: Notice = match serde_json::from_str(payload) {
            Ok(notice) => notice,
            Err(cause) => {
                tracing::warn!(%cause, "undecodable presence notification; ignored");
                return;
            }
        };
        let mut outbox = Outbox::default();
        {
            let mut state = self.lock();
            if state.own.contains(&notice.instance) {
                return;
            }
            if notice.gone {
                state.forget_instance(notice.instance, &mut outbox);
            } else if let (Some(session), Some(user_id), Some(role), Some(present)) = (
                notice.session_id,
                notice.user_id,
                notice.role,
                notice.present,
            ) {
                state.set_remote(
                    notice.instance,
                    session,
                    Member { user_id, role },
                    present,
                    &mut outbox,
                );
            } else {
                tracing::warn!(
                    "presence notification without session, user, role and present; ignored"
                );
            }
        }
        self.deliver(outbox);
    }

    /// This process is registered as `instance` (on a new LISTEN connection), and the rows of the
    /// other instances are `rows`: instance, session, member. Replaces what was known of the
    /// others (notifications were missed while the connection was down) and has the writer put
    /// every local row under the new number.
    pub fn registered(&self, instance: i64, rows: Vec<(i64, Uuid, Member)>) {
        let mut outbox = Outbox::default();
        {
            let mut state = self.lock();
            if let Some(previous) = state.instance.replace(instance) {
                // If an earlier one was never forgotten, the database's sweep removes it.
                state.previous = Some(previous);
            }
            state.own.insert(instance);
            state.full_write = true;
            state.replace_remote(rows, &mut outbox);
        }
        self.dirty.notify_one();
        self.deliver(outbox);
    }

    /// Who is present in a session, as this instance knows it.
    pub fn members(&self, session: Uuid) -> Vec<Member> {
        self.lock()
            .rooms
            .get(&session)
            .map(Room::present)
            .unwrap_or_default()
    }

    /// How many (session, user) pairs are present, as this instance knows them.
    pub fn member_count(&self) -> usize {
        self.lock()
            .rooms
            .values()
            .map(|room| room.members.len())
            .sum()
    }

    /// Writes this instance's presence changes to the database as they happen, and sweeps the
    /// presence of instances that are gone, until `shutdown`; then forgets this instance.
    pub async fn run(self: Arc<Self>, pool: Pool, mut shutdown: watch::Receiver<bool>) {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = false;
        let mut last_write: Option<Instant> = None;
        loop {
            if retry {
                retry = false;
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_DELAY) => self.dirty.notify_one(),
                    _ = stopped(&mut shutdown) => break,
                }
            }
            tokio::select! {
                _ = self.dirty.notified() => {
                    let since = last_write.map_or(WRITE_INTERVAL, |at| at.elapsed());
                    if let Some(wait) = WRITE_INTERVAL.checked_sub(since).filter(|w| !w.is_zero()) {
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = stopped(&mut shutdown) => break,
                        }
                    }
                    last_write = Some(Instant::now());
                    if let Err(cause) = self.write(&pool).await {
                        tracing::warn!(cause = %crate::Causes(&cause), retry_in = ?RETRY_DELAY, "presence write failed");
                        retry = true;
                    }
                }
                _ = sweep.tick() => {
                    if let Err(cause) = sweep_once(&pool).await {
                        tracing::warn!(cause = %crate::Causes(&cause), "presence sweep failed");
                    }
                }
                _ = stopped(&mut shutdown) => break,
            }
        }
        let instance = self.lock().instance;
        if let Some(instance) = instance {
            let forget = async {
                let lease = db::lease(&pool).await?;
                lease
                    .execute("select relay.presence_forget($1)", &[&instance])
                    .await?;
                lease.finish();
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            match tokio::time::timeout(QUERY_TIMEOUT, forget).await {
                Ok(Ok(())) => tracing::debug!(instance, "presence forgotten"),
                Ok(Err(cause)) => {
                    tracing::warn!(cause = %crate::Causes(&*cause), "could not forget this instance's presence")
                }
                Err(_) => tracing::warn!("could not forget this instance's presence in time"),
            }
        }
    }

    /// Writes what changed since the last write. On failure the changes are put back (unless newer
    /// ones replaced them) for the next attempt.
    async fn write(&self, pool: &Pool) -> Result<(), WriteError> {
        let (instance, changes, previous, full) = {
            let mut state = self.lock();
            let Some(instance) = state.instance else {
                return Ok(()); // Written once registered.
            };
            let full = std::mem::take(&mut state.full_write);
            let changes: Vec<Change> = if full {
                state.pending.clear();
                state.local_rows()
            } else {
                state.pending.drain().collect()
            };
            (instance, changes, state.previous.take(), full)
        };
        // A full write with no rows still replaces what the instance holds.
        if changes.is_empty() && previous.is_none() && !full {
            return Ok(());
        }
        let written = tokio::time::timeout(
            QUERY_TIMEOUT,
            apply(pool, instance, &changes, previous, full),
        )
        .await
        .map_err(|_| WriteError::Timeout)
        .and_then(|outcome| outcome);
        if let Err(e) = written {
            let mut state = self.lock();
            if full {
                state.full_write = true;
            } else {
                for (key, value) in changes {
                    state.pending.entry(key).or_insert(value);
                }
            }
            if state.previous.is_none() {
                state.previous = previous;
            }
            return Err(e);
        }
        if let Some(previous) = previous {
            // Forgotten: a number the database hands out again (after a restore) is another's.
            let mut state = self.lock();
            if state.instance != Some(previous) {
                state.own.remove(&previous);
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no connection from the pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("no answer from the database within {QUERY_TIMEOUT:?}")]
    Timeout,
}

/// Waits for shutdown, holding nothing across the wait's end.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Writes changes under `instance`, then forgets `previous`, in one transaction: the others see
/// the new rows before the old ones go, so no one seems to leave and come back. A `full` write
/// replaces the instance's rows: those it holds that are not among `changes` go too (an earlier
/// full write may have committed though it was not known to, and users have left since).
async fn apply(
    pool: &Pool,
    instance: i64,
    changes: &[Change],
    previous: Option<i64>,
    full: bool,
) -> Result<(), WriteError> {
    let mut rows: Vec<serde_json::Value> = changes
        .iter()
        .map(|((session, user), (role, present))| {
            json!({"session_id": session, "user_id": user, "role": role, "present": present})
        })
        .collect();
    let mut lease = db::lease(pool).await?;
    let tx = lease.client().transaction().await?;
    if full {
        let held = tx
            .query(
                "select session_id, user_id, role from relay.presence where instance = $1",
                &[&instance],
            )
            .await?;
        let current: HashSet<(Uuid, Uuid)> = changes.iter().map(|(key, _)| *key).collect();
        for row in held {
            let key: (Uuid, Uuid) = (row.get(0), row.get(1));
            if !current.contains(&key) {
                let role: String = row.get(2);
                rows.push(json!({"session_id": key.0, "user_id": key.1, "role": role,
                                 "present": false}));
            }
        }
    }
    let registered: bool = tx
        .query_one(
            "select relay.presence_apply($1, $2)",
            &[&instance, &serde_json::Value::Array(rows)],
        )
        .await?
        .get(0);
    if let Some(previous) = previous {
        tx.execute("select relay.presence_forget($1)", &[&previous])
            .await?;
    }
    tx.commit().await?;
    lease.finish();
    if !registered {
        // Only when this instance's LISTEN connection is gone: it registers anew on reconnect.
        tracing::debug!(
            instance,
            "presence not written: the instance is not registered"
        );
    }
    Ok(())
}

/// Removes the presence of instances whose LISTEN connection is gone. Never on a LISTEN
/// connection: there the instance's own lock would look free.
async fn sweep_once(pool: &Pool) -> Result<(), WriteError> {
    let lease = tokio::time::timeout(QUERY_TIMEOUT, db::lease(pool))
        .await
        .map_err(|_| WriteError::Timeout)??;
    let swept: i32 = tokio::time::timeout(
        QUERY_TIMEOUT,
        lease.query_one("select relay.presence_sweep()", &[]),
    )
    .await
    .map_err(|_| WriteError::Timeout)??
    .get(0);
    lease.finish();
    if swept > 0 {
        tracing::info!(
            swept,
            "removed the presence of relay instances that are gone"
        );
    }
    Ok(())
}

/// Every open (waiting or active) consultation session and its participants.
pub async fn open_sessions(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Vec<(Uuid, Owners)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "select id, patient_id, dentist_id from public.consultation_sessions \
             where status in ('waiting', 'active')",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let owners = Owners {
                patient_id: row.get(1),
                dentist_id: row.get(2),
            };
            (row.get(0), owners)
        })
        .collect())
}

/// Registers this relay as a presence instance on its LISTEN connection, and reads the other
/// instances' rows.
pub async fn register(
    listen: &tokio_postgres::Client,
) -> Result<(i64, Vec<(i64, Uuid, Member)>), tokio_postgres::Error> {
    let instance: i64 = listen
        .query_one("select relay.presence_register()", &[])
        .await?
        .get(0);
    let rows = listen
        .query(
            "select instance, session_id, user_id, role from relay.presence where instance <> $1",
            &[&instance],
        )
        .await?;
    let rows = rows
        .into_iter()
        .filter_map(|row| {
            let role: String = row.get(3);
            let role = role.parse().ok()?;
            Some((
                row.get(0),
                row.get(1),
                Member {
                    user_id: row.get(2),
                    role,
                },
            ))
        })
        .collect();
    Ok((instance, rows))
}

impl State {
    /// Records a session as open with these participants, or as not open.
    fn set_open(&mut self, session: Uuid, owners: Option<Owners>) {
        if let Some(before) = self.open.remove(&session) {
            for user in before.user_ids() {
                if let Some(sessions) = self.open_by_user.get_mut(&user) {
                    sessions.remove(&session);
                    if sessions.is_empty() {
                        self.open_by_user.remove(&user);
                    }
                }
            }
        }
        if let Some(owners) = owners {
            for user in owners.user_ids() {
                self.open_by_user.entry(user).or_default().insert(session);
            }
            self.open.insert(session, owners);
        }
    }

    /// The open sessions whose messages this user may read.
    fn open_sessions_of(&self, principal: &Principal) -> HashSet<Uuid> {
        self.open_by_user
            .get(&principal.user_id)
            .into_iter()
            .flatten()
            .filter(|session| {
                self.open.get(session).is_some_and(|owners| {
                    authz::may_see(principal, Feed::ConsultationMessages, owners)
                })
            })
            .copied()
            .collect()
    }

    /// What is known of a session's participants, in dispatch order: from the events since it was
    /// named (or the database read when there was none), else from the open sessions. `None`:
    /// not known; `Some(Owners::default())`: no one's (deleted).
    fn known_owners(&self, session: Uuid) -> Option<Owners> {
        match self.named.get(&session).and_then(|named| named.owners) {
            Some(owners) => Some(owners.unwrap_or_default()),
            None => self.open.get(&session).copied(),
        }
    }

    /// Records the session a socket's filter names (or none), forgetting the one before.
    fn set_named(&mut self, socket: SocketId, session: Option<Uuid>) {
        let Some(watcher) = self.sockets.get_mut(&socket) else {
            return;
        };
        if watcher.named == session {
            return;
        }
        let before = std::mem::replace(&mut watcher.named, session);
        if let Some(before) = before {
            if let Some(named) = self.named.get_mut(&before) {
                named.sockets.remove(&socket);
                if named.sockets.is_empty() {
                    self.named.remove(&before);
                }
            }
        }
        if let Some(session) = session {
            self.named
                .entry(session)
                .or_default()
                .sockets
                .insert(socket);
        }
    }

    /// Joins to a named session every socket naming it whose user may now read it. (Those that
    /// may not are taken out by [`Presence::observe`].) Returns whether there is something new
    /// to write.
    fn admit_named(&mut self, session: Uuid, outbox: &mut Outbox) -> bool {
        let Some(owners) = self.known_owners(session) else {
            return false;
        };
        let Some(named) = self.named.get(&session) else {
            return false;
        };
        let joining: Vec<SocketId> = named
            .sockets
            .iter()
            .filter(|socket| {
                self.sockets.get(socket).is_some_and(|watcher| {
                    !watcher.sessions.contains(&session)
                        && authz::may_see(&watcher.principal, Feed::ConsultationMessages, &owners)
                })
            })
            .copied()
            .collect();
        let mut wrote = false;
        for socket in joining {
            wrote |= self.join_room(socket, session, outbox);
        }
        wrote
    }

    /// Makes a socket watch exactly `target`, leaving and joining as needed; with `resend`, the
    /// sessions it already watched send it their list again. Returns whether there is something
    /// new to write.
    fn set_sessions(
        &mut self,
        socket: SocketId,
        target: HashSet<Uuid>,
        resend: bool,
        outbox: &mut Outbox,
    ) -> bool {
        let Some(watcher) = self.sockets.get(&socket) else {
            return false;
        };
        let current = watcher.sessions.clone();
        let link = watcher.link.clone();
        let mut wrote = false;
        for session in current.difference(&target) {
            wrote |= self.leave_room(socket, *session, outbox);
        }
        for session in &target {
            if current.contains(session) {
                if resend {
                    if let Some(room) = self.rooms.get(session) {
                        let list = protocol::presence(*session, &room.present(), &[]);
                        outbox.send(socket, &link, list);
                    }
                }
            } else {
                wrote |= self.join_room(socket, *session, outbox);
            }
        }
        wrote
    }

    /// Joins a watching socket to a session: it gets the list, and the others learn of its user
    /// if they were not present. Returns whether there is something new to write.
    fn join_room(&mut self, socket: SocketId, session: Uuid, outbox: &mut Outbox) -> bool {
        let Some(watcher) = self.sockets.get_mut(&socket) else {
            return false;
        };
        if !watcher.sessions.insert(session) {
            return false;
        }
        let member = Member {
            user_id: watcher.principal.user_id,
            role: watcher.principal.role,
        };
        let link = watcher.link.clone();
        let room = self.rooms.entry(session).or_default();
        let entry = room.members.entry(member.user_id).or_insert(Entry {
            role: member.role,
            local: 0,
            remote: BTreeSet::new(),
        });
        let was_present = entry.present();
        entry.role = member.role;
        entry.local += 1;
        let first_here = entry.local == 1;
        if !was_present {
            outbox.broadcast(room, protocol::presence(session, &[member], &[]));
        }
        outbox.send(
            socket,
            &link,
            protocol::presence(session, &room.present(), &[]),
        );
        room.watchers.insert(socket, link);
        if first_here {
            self.pending
                .insert((session, member.user_id), (member.role, true));
        }
        first_here
    }

    /// Takes a socket out of one session. Returns whether there is something new to write.
    fn leave_room(&mut self, socket: SocketId, session: Uuid, outbox: &mut Outbox) -> bool {
        let Some(watcher) = self.sockets.get_mut(&socket) else {
            return false;
        };
        if !watcher.sessions.remove(&session) {
            return false;
        }
        let user = watcher.principal.user_id;
        let Some(room) = self.rooms.get_mut(&session) else {
            return false;
        };
        room.watchers.remove(&socket);
        let mut wrote = false;
        if let Some(entry) = room.members.get_mut(&user) {
            entry.local = entry.local.saturating_sub(1);
            if entry.local == 0 {
                self.pending.insert((session, user), (entry.role, false));
                wrote = true;
            }
            if !entry.present() {
                let member = Member {
                    user_id: user,
                    role: entry.role,
                };
                room.members.remove(&user);
                outbox.broadcast(room, protocol::presence(session, &[], &[member]));
            }
        }
        if room.is_empty() {
            self.rooms.remove(&session);
        }
        wrote
    }

    /// Takes a socket out of every session and forgets it.
    fn forget_socket(&mut self, socket: SocketId, outbox: &mut Outbox) -> bool {
        let Some(watcher) = self.sockets.get(&socket) else {
            return false;
        };
        let sessions: Vec<Uuid> = watcher.sessions.iter().copied().collect();
        let user = watcher.principal.user_id;
        let mut wrote = false;
        for session in sessions {
            wrote |= self.leave_room(socket, session, outbox);
        }
        self.set_named(socket, None);
        self.sockets.remove(&socket);
        if let Some(followers) = self.followers.get_mut(&user) {
            followers.remove(&socket);
            if followers.is_empty() {
                self.followers.remove(&user);
            }
        }
        wrote
    }

    fn set_remote(
        &mut self,
        instance: i64,
        session: Uuid,
        member: Member,
        present: bool,
        outbox: &mut Outbox,
    ) {
        let room = self.rooms.entry(session).or_default();
        if present {
            let entry = room.members.entry(member.user_id).or_insert(Entry {
                role: member.role,
                local: 0,
                remote: BTreeSet::new(),
            });
            let was_present = entry.present();
            entry.remote.insert(instance);
            if !was_present {
                entry.role = member.role;
                outbox.broadcast(room, protocol::presence(session, &[member], &[]));
            }
        } else if let Some(entry) = room.members.get_mut(&member.user_id) {
            entry.remote.remove(&instance);
            if !entry.present() {
                let member = Member {
                    user_id: member.user_id,
                    role: entry.role,
                };
                room.members.remove(&member.user_id);
                outbox.broadcast(room, protocol::presence(session, &[], &[member]));
            }
        }
        if room.is_empty() {
            self.rooms.remove(&session);
        }
    }

    /// Another instance is gone: everyone only it had leaves.
    fn forget_instance(&mut self, instance: i64, outbox: &mut Outbox) {
        self.rooms.retain(|session, room| {
            let mut left = Vec::new();
            room.members.retain(|user_id, entry| {
                if entry.remote.remove(&instance) && !entry.present() {
                    left.push(Member {
                        user_id: *user_id,
                        role: entry.role,
                    });
                    return false;
                }
                true
            });
            if !left.is_empty() {
                left.sort();
                outbox.broadcast(room, protocol::presence(*session, &[], &left));
            }
            !room.is_empty()
        });
    }

    /// Replaces everything known of other instances with `rows`, telling watchers the difference.
    fn replace_remote(&mut self, rows: Vec<(i64, Uuid, Member)>, outbox: &mut Outbox) {
        let before: HashMap<Uuid, Vec<Member>> = self
            .rooms
            .iter()
            .map(|(session, room)| (*session, room.present()))
            .collect();
        for room in self.rooms.values_mut() {
            for entry in room.members.values_mut() {
                entry.remote.clear();
            }
        }
        for (instance, session, member) in rows {
            if self.own.contains(&instance) {
                continue;
            }
            let room = self.rooms.entry(session).or_default();
            let entry = room.members.entry(member.user_id).or_insert(Entry {
                role: member.role,
                local: 0,
                remote: BTreeSet::new(),
            });
            entry.remote.insert(instance);
        }
        self.rooms.retain(|session, room| {
            room.members.retain(|_, entry| entry.present());
            let now = room.present();
            let was = before.get(session).cloned().unwrap_or_default();
            let joined: Vec<Member> = now.iter().filter(|m| !was.contains(m)).copied().collect();
            let left: Vec<Member> = was.iter().filter(|m| !now.contains(m)).copied().collect();
            if !joined.is_empty() || !left.is_empty() {
                outbox.broadcast(room, protocol::presence(*session, &joined, &left));
            }
            !room.is_empty()
        });
    }

    /// Every (session, user) joined here, as rows to write.
    fn local_rows(&self) -> Vec<Change> {
        self.rooms
            .iter()
            .flat_map(|(session, room)| {
                room.members
                    .iter()
                    .filter(|(_, entry)| entry.local > 0)
                    .map(|(user, entry)| ((*session, *user), (entry.role, true)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Payload;
    use crate::hub::Connection;
    use serde_json::Value;

    fn principal(role: Role) -> Principal {
        Principal {
            user_id: Uuid::new_v4(),
            role,
        }
    }

    /// Every frame queued for a connection, as JSON.
    fn received(connection: &mut Connection) -> Vec<Value> {
        let mut frames = Vec::new();
        while let Ok(outbound) = connection.outbox.try_recv() {
            frames.push(serde_json::from_str(outbound.frame.as_str()).unwrap());
        }
        frames
    }

    fn frame(session: Uuid, joined: &[&Principal], left: &[&Principal]) -> Value {
        let list = |who: &[&Principal]| {
            let mut members: Vec<Member> = who
                .iter()
                .map(|w| Member {
                    user_id: w.user_id,
                    role: w.role,
                })
                .collect();
            members.sort();
            serde_json::to_value(members).unwrap()
        };
        json!({"type": "presence", "session_id": session, "joined": list(joined), "left": list(left)})
    }

    /// Makes the sessions open, with these participants (patient, dentist), as at start.
    fn opened(presence: &Presence, sessions: &[(Uuid, &Principal, &Principal)]) {
        presence.open_sessions_loaded(
            sessions
                .iter()
                .map(|(session, patient, dentist)| {
                    let owners = Owners {
                        patient_id: Some(patient.user_id),
                        dentist_id: Some(dentist.user_id),
                    };
                    (*session, owners)
                })
                .collect(),
        );
    }

    fn pending(presence: &Presence) -> HashMap<(Uuid, Uuid), (Role, bool)> {
        presence.lock().pending.clone()
    }

    /// A consultation_sessions event: an UPDATE of an `active` session to these participants,
    /// or, with `status`, an INSERT of one in that status.
    fn session_event(session: Uuid, patient: Uuid, dentist: Uuid) -> Event {
        open_session_event(session, patient, dentist, "active")
    }

    fn open_session_event(session: Uuid, patient: Uuid, dentist: Uuid, status: &str) -> Event {
        let row = json!({"id": session, "patient_id": patient, "dentist_id": dentist,
                         "status": status});
        let payload = json!({"id": 1, "table": "consultation_sessions", "op": "INSERT",
                             "at": "t", "new": row});
        match Payload::decode(&payload.to_string()).unwrap() {
            Payload::Inline(event) => event,
            Payload::Fetch { .. } => unreachable!(),
        }
    }

    #[test]
    fn joining_lists_who_is_there_and_tells_the_others_once_per_user() {
        let hub = Hub::new(16);
        let presence = Presence::new(hub.clone());
        let session = Uuid::new_v4();
        let (patient, dentist) = (principal(Role::Patient), principal(Role::Dentist));
        opened(&presence, &[(session, &patient, &dentist)]);
        let mut p = hub.connect(patient, None);
        presence.watch(p.id, p.link.clone(), patient, Scope::Session(session));
        assert_eq!(received(&mut p), [frame(session, &[&patient], &[])]);
        assert_eq!(
            pending(&presence),
            HashMap::from([((session, patient.user_id), (Role::Patient, true))])
        );

        let mut d = hub.connect(dentist, None);
        presence.watch(d.id, d.link.clone(), dentist, Scope::Session(session));
        assert_eq!(
            received(&mut d),
            [frame(session, &[&patient, &dentist], &[])]
        );
        assert_eq!(received(&mut p), [frame(session, &[&dentist], &[])]);

        // A second socket of the dentist: listed to itself, news to no one.
        let mut d2 = hub.connect(dentist, None);
        presence.watch(d2.id, d2.link.clone(), dentist, Scope::Session(session));
        assert_eq!(
            received(&mut d2),
            [frame(session, &[&patient, &dentist], &[])]
        );
        assert!(received(&mut p).is_empty());
        presence.leave(d2.id);
        assert!(received(&mut p).is_empty(), "the dentist is still here");
        presence.leave(d.id);
        assert_eq!(received(&mut p), [frame(session, &[], &[&dentist])]);
        assert_eq!(
            pending(&presence).get(&(session, dentist.user_id)),
            Some(&(Role::Dentist, false))
        );
        // Leaving twice, or without having joined, does nothing.
        presence.leave(d.id);
        presence.leave(12345);
        assert!(received(&mut p).is_empty());
        assert_eq!(presence.members(session).len(), 1);
    }

    #[test]
    fn joining_another_session_leaves_the_first() {
        let hub = Hub::new(16);
        let presence = Presence::new(hub.clone());
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
        let (patient, dentist) = (principal(Role::Patient), principal(Role::Dentist));
        opened(
            &presence,
            &[(first, &patient, &dentist), (second, &patient, &dentist)],
        );
        let mut p = hub.connect(patient, None);
        presence.watch(p.id, p.link.clone(), patient, Scope::Session(first));
        let d = hub.connect(dentist, None);
        presence.watch(d.id, d.link.clone(), dentist, Scope::Session(first));
        received(&mut p);
        presence.watch(d.id, d.link.clone(), dentist, Scope::Session(second));
        assert_eq!(received(&mut p), [frame(first, &[], &[&dentist])]);
        assert_eq!(presence.members(second).len(), 1);
    }

    #[test]
    fn other_instances_count_until_they_leave_or_are_gone_and_echoes_are_ignored() {
        let hub = Hub::new(16);
        let presence = Presence::new(hub.clone());
        presence.registered(1, Vec::new());
        let session = Uuid::new_v4();
        let (patient, dentist) = (principal(Role::Patient), principal(Role::Dentist));
        opened(&presence, &[(session, &patient, &dentist)]);
        let mut p = hub.connect(patient, None);
        presence.watch(p.id, p.link.clone(), patient, Scope::Session(session));
        received(&mut p);
        let notice = |instance: i64, who: &Principal, present: bool| {
            json!({"instance": instance, "session_id": session, "user_id": who.user_id,
                   "role": who.role, "present": present})
            .to_string()
        };

        // The echo of this instance's own write changes nothing.
        presence.notified(&notice(1, &patient, false));
        assert!(received(&mut p).is_empty());
        assert_eq!(presence.members(session).len(), 1);

        presence.notified(&notice(2, &dentist, true));
        assert_eq!(received(&mut p), [frame(session, &[&dentist], &[])]);
        presence.notified(&notice(3, &dentist, true));
        presence.notified(&notice(2, &dentist, false));
        assert!(received(&mut p).is_empty(), "still present on instance 3");
        presence.notified(&json!({"instance": 3, "gone": true}).to_string());
        assert_eq!(received(&mut p), [frame(session, &[], &[&dentist])]);

        // Garbage is ignored.
        for bad in ["", "{}", "[1]", r#"{"instance": 2, "session_id": "x"}"#] {
            presence.notified(bad);
        }
        assert!(received(&mut p).is_empty());
    }

    #[test]
    fn a_new_registration_replaces_what_was_known_and_rewrites_every_local_row() {
        let hub = Hub::new(16);
        let presence = Presence::new(hub.clone());
        presence.registered(1, Vec::new());
        let session = Uuid::new_v4();
        let (patient, dentist, admin) = (
            principal(Role::Patient),
            principal(Role::Dentist),
            principal(Role::Admin),
        );
        opened(&presence, &[(session, &patient, &dentist)]);
        let mut p = hub.connect(patient, None);
        presence.watch(p.id, p.link.clone(), patient, Scope::Session(session));
        presence.notified(
            &json!({"instance": 2, "session_id": session, "user_id": dentist.user_id,
                    "role": "dentist", "present": true})
            .to_string(),
        );
        received(&mut p);
        presence.lock().pending.clear();

        // While disconnected the dentist left and an admin joined elsewhere.
        let admin_member = Member {
            user_id: admin.user_id,
            role: Role::Admin,
        };
        presence.registered(5, vec![(4, session, admin_member)]);
        assert_eq!(received(&mut p), [frame(session, &[&admin], &[&dentist])]);
        let state = presence.lock();
        assert_eq!(state.instance, Some(5));
        assert_eq!(
            state.previous,
            Some(1),
            "the old rows are forgotten after the rewrite"
        );
        assert!(state.full_write);
        assert_eq!(
            state.local_rows(),
            vec![((session, patient.user_id), (Role::Patient, true))]
        );
        assert!(state.own.contains(&1) && state.own.contains(&5));
    }

    #[test]
    fn a_hand_over_takes_the_old_dentist_out_of_presence() {
        let hub = Hub::new(16);
        let presence = Presence::new(hub.clone());
        let session = Uuid::new_v4();
        let (patient, dentist, new_dentist, admin) = (
            principal(Role::Patient),
            principal(Role::Dentist),
            principal(Role::Dentist),
            principal(Role::Admin),
        );
        opened(&presence, &[(session, &patient, &dentist)]);
        let mut p = hub.connect(patient, None);
        presence.watch(p.id, p.link.clone(), patient, Scope::Session(session));
        let mut d = hub.connect(dentist, None);
        presence.watch(d.id, d.link.clone(), dentist, Scope::Session(session));
        let a = hub.connect(admin, None);
        presence.watch(a.id, a.link.clone(), admin, Scope::Session(session));
        received(&mut p);
        received(&mut d);

        presence.observe(&session_event(
            session,
            patient.user_id,
            new_dentist.user_id,
        ));
        assert_eq!(received(&mut p), [frame(session, &[], &[&dentist])]);
        assert!(
            received(&mut d).is_empty(),
            "the old dentist hears nothing more"
        );
        let left = presence.members(session);
        assert_eq!(left.len(), 2, "the patient and the admin stay: {left:?}");
    }

    #[test]
    fn a_full_queue_cuts_the_socket_not_the_others() {
        let hub = Hub::new(1);
        let presence = Presence::new(hub.clone());
        let session = Uuid::new_v4();
        let (patient, dentist) = (principal(Role::Patient), principal(Role::Dentist));
        opened(&presence, &[(session, &patient, &dentist)]);
        let p = hub.connect(patient, None);
        presence.watch(p.id, p.link.clone(), patient, Scope::Session(session)); // fills its queue of one
        let mut d = hub.connect(dentist, None);
        presence.watch(d.id, d.link.clone(), dentist, Scope::Session(session));
        assert_eq!(received(&mut d).len(), 1);
        assert_eq!(
            p.closed.borrow().as_ref().map(|c| c.code),
            Some(crate::protocol::close::SLOW_CONSUMER)
        );
    }

    #[test]
    fn a_follower_joins_its_open_sessions_as_they_open_and_leaves_them_as_they_end() {
        let hub = Hub::new(16);
        let presence = Presence::new(hub.clone());
        let (patient, dentist, other) = (
            principal(Role::Patient),
            principal(Role::Dentist),
            principal(Role::Dentist),
        );
        let (open, elsewhere, later) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let owners = |dentist: &Principal| Owners {
            patient_id: Some(patient.user_id),
            dentist_id: Some(dentist.user_id),
        };
        presence.open_sessions_loaded(vec![(open, owners(&dentist)), (elsewhere, owners(&other))]);

        let mut d = hub.connect(dentist, None);
        presence.watch(d.id, d.link.clone(), dentist, Scope::OwnOpenSessions);
        assert_eq!(received(&mut d), [frame(open, &[&dentist], &[])]);

        // A session that opens for them is joined; one for someone else is not.
        presence.observe(&open_session_event(
            later,
            patient.user_id,
            dentist.user_id,
            "waiting",
        ));
        presence.observe(&open_session_event(
            Uuid::new_v4(),
            patient.user_id,
            other.user_id,
            "waiting",
        ));
        assert_eq!(received(&mut d), [frame(later, &[&dentist], &[])]);

        // The patient joins one; then it ends: the follower leaves it, the patient stays.
        let mut p = hub.connect(patient, None);
        presence.watch(p.id, p.link.clone(), patient, Scope::Session(open));
        received(&mut p);
        assert_eq!(received(&mut d), [frame(open, &[&patient], &[])]);
        presence.observe(&open_session_event(
            open,
            patient.user_id,
            dentist.user_id,
            "ended",
        ));
        assert_eq!(received(&mut p), [frame(open, &[], &[&dentist])]);
        assert!(received(&mut d).is_empty());
        assert_eq!(presence.members(open).len(), 1);
        assert_eq!(presence.members(later).len(), 1);
    }

    #[test]
    fn subscribing_again_to_the_same_session_resends_the_list_and_tells_no_one() {
        let hub = Hub::new(16);
        let presence = Presence::new(hub.clone());
        let session = Uuid::new_v4();
        let (patient, dentist) = (principal(Role::Patient), principal(Role::Dentist));
        opened(&presence, &[(session, &patient, &dentist)]);
        let mut p = hub.connect(patient, None);
        presence.watch(p.id, p.link.clone(), patient, Scope::Session(session));
        let mut d = hub.connect(dentist, None);
        presence.watch(d.id, d.link.clone(), dentist, Scope::Session(session));
        received(&mut p);
        received(&mut d);
        presence.watch(d.id, d.link.clone(), dentist, Scope::Session(session));
        assert_eq!(
            received(&mut d),
            [frame(session, &[&patient, &dentist], &[])]
        );
        assert!(received(&mut p).is_empty());
    }

    /// A user's socket leaving and another of theirs joining, on two threads at once: every
    /// watcher's frames must end with the user present, as the state does. Frames queued after
    /// the state's lock is released could put the leave's after the join's.
    #[test]
    fn a_leave_and_a_join_racing_reach_every_watcher_in_the_order_they_took_effect() {
        const WATCHERS: usize = 100;
        let hub = Hub::new(16);
        let presence = Presence::new(hub.clone());
        let session = Uuid::new_v4();
        let mut watchers: Vec<Connection> = (0..WATCHERS)
            .map(|_| {
                let admin = principal(Role::Admin);
                let mut c = hub.connect(admin, None);
                presence.watch(c.id, c.link.clone(), admin, Scope::Session(session));
                received(&mut c);
                c
            })
            .collect();
        for watcher in &mut watchers {
            received(watcher);
        }
        let patient = principal(Role::Patient);
        opened(&presence, &[(session, &patient, &principal(Role::Dentist))]);
        let mut current = hub.connect(patient, None);
        presence.watch(
            current.id,
            current.link.clone(),
            patient,
            Scope::Session(session),
        );
        let mut reordered = 0;
        for _ in 0..5000 {
            let next = hub.connect(patient, None);
            let barrier = std::sync::Barrier::new(2);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    barrier.wait();
                    presence.leave(current.id);
                });
                scope.spawn(|| {
                    barrier.wait();
                    presence.watch(next.id, next.link.clone(), patient, Scope::Session(session));
                });
            });
            hub.disconnect(current.id);
            current = next;
            assert!(presence
                .members(session)
                .iter()
                .any(|m| m.user_id == patient.user_id));
            for watcher in &mut watchers {
                // The last frame that names the patient must say it joined.
                let last = received(watcher)
                    .into_iter()
                    .rev()
                    .find(|frame| frame.to_string().contains(&patient.user_id.to_string()));
                if let Some(frame) = last {
                    if frame["joined"].as_array().is_none_or(|j| j.is_empty()) {
                        reordered += 1;
                    }
                }
            }
        }
        assert_eq!(reordered, 0, "watchers left thinking the patient absent");
    }

    /// A session handed to someone else after a socket's subscription was authorized, and
    /// dispatched before its presence began: the socket gets no list, and no one hears it joined.
    /// Handed back, it joins.
    #[test]
    fn a_socket_naming_a_session_no_longer_its_own_learns_nothing_until_it_is_again() {
        let hub = Hub::new(16);
        let presence = Presence::new(hub.clone());
        let session = Uuid::new_v4();
        let (former, patient, dentist) = (
            principal(Role::Patient),
            principal(Role::Patient),
            principal(Role::Dentist),
        );
        opened(&presence, &[(session, &former, &dentist)]);
        let mut d = hub.connect(dentist, None);
        presence.watch(d.id, d.link.clone(), dentist, Scope::Session(session));
        received(&mut d);
        presence.observe(&session_event(session, patient.user_id, dentist.user_id));

        let mut f = hub.connect(former, None);
        presence.watch(f.id, f.link.clone(), former, Scope::Session(session));
        // The database read after the watch began may be older than what was dispatched.
        presence.owners_read(
            session,
            Some(Owners {
                patient_id: Some(former.user_id),
                dentist_id: Some(dentist.user_id),
            }),
        );
        assert!(received(&mut f).is_empty());
        assert!(
            received(&mut d).is_empty(),
            "no one hears the former patient joined"
        );
        assert_eq!(presence.members(session).len(), 1);

        presence.observe(&session_event(session, former.user_id, dentist.user_id));
        assert_eq!(
            received(&mut f),
            [frame(session, &[&former, &dentist], &[])]
        );
        assert_eq!(received(&mut d), [frame(session, &[&former], &[])]);
    }

    /// A session presence knows nothing of (not open, never seen): the socket joins once its
    /// participants are read, if they include its user, and not before.
    #[test]
    fn a_session_presence_does_not_know_is_joined_once_read_and_only_if_allowed() {
        let hub = Hub::new(16);
        let presence = Presence::new(hub.clone());
        let session = Uuid::new_v4();
        let (patient, dentist, other) = (
            principal(Role::Patient),
            principal(Role::Dentist),
            principal(Role::Dentist),
        );
        let owners = Owners {
            patient_id: Some(patient.user_id),
            dentist_id: Some(dentist.user_id),
        };
        let mut o = hub.connect(other, None);
        presence.watch(o.id, o.link.clone(), other, Scope::Session(session));
        let mut p = hub.connect(patient, None);
        presence.watch(p.id, p.link.clone(), patient, Scope::Session(session));
        assert!(received(&mut p).is_empty(), "nothing before the read");
        presence.owners_read(session, Some(owners));
        assert_eq!(received(&mut p), [frame(session, &[&patient], &[])]);
        assert!(
            received(&mut o).is_empty(),
            "not the other dentist's session"
        );
        assert_eq!(presence.members(session).len(), 1);

        // Once an event has been dispatched for it, a later read changes nothing.
        let q = principal(Role::Patient);
        presence.observe(&session_event(session, q.user_id, dentist.user_id));
        assert_eq!(received(&mut p), Vec::<Value>::new(), "left, silently");
        presence.owners_read(session, Some(owners));
        assert!(received(&mut p).is_empty());
        assert!(presence.members(session).is_empty());
    }

    /// Subscribing again to an ended session it names: the list again, and no one hears the user
    /// leave and come back.
    #[test]
    fn subscribing_again_to_an_ended_session_resends_the_list_and_tells_no_one() {
        let hub = Hub::new(16);
        let presence = Presence::new(hub.clone());
        let session = Uuid::new_v4();
        let (patient, dentist) = (principal(Role::Patient), principal(Role::Dentist));
        let owners = Owners {
            patient_id: Some(patient.user_id),
            dentist_id: Some(dentist.user_id),
        };
        let mut p = hub.connect(patient, None);
        presence.watch(p.id, p.link.clone(), patient, Scope::Session(session));
        presence.owners_read(session, Some(owners));
        // An admin watching: it names no session, so the patient's socket is the only one.
        let admin = principal(Role::Admin);
        let mut d = hub.connect(admin, None);
        presence.watch(d.id, d.link.clone(), admin, Scope::Session(session));
        received(&mut p);
        received(&mut d);
        presence.watch(p.id, p.link.clone(), patient, Scope::Session(session));
        assert_eq!(received(&mut p), [frame(session, &[&patient, &admin], &[])]);
        assert!(received(&mut d).is_empty(), "{:?}", received(&mut d));
        assert!(
            pending(&presence).get(&(session, patient.user_id)) != Some(&(Role::Patient, false))
        );
    }
}
