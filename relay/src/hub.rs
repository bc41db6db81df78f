//! The fan-out hub: which socket is subscribed to what, and delivering each event to exactly the
//! subscribers allowed to see it.
//!
//! Subscribers are indexed per feed: those whose role sees every row of the feed, and those who
//! see only their own rows, by user id. An event therefore touches the first group and the
//! handful of users its rows name, never every socket. For each candidate the authorization rules
//! ([`crate::authz`]) decide, and each distinct frame (perceived op × projection) is rendered once
//! and its bytes shared by every recipient.
//!
//! Every socket has one bounded outbound queue. Delivery never waits: a socket whose queue is
//! full is cut (close code [`close::SLOW_CONSUMER`]) so that one slow reader never delays anyone
//! else. The hub knows nothing of Postgres or warp; the session owns the socket itself.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::authz::{self, Feed, Perceived, Principal, Reach, Role};
use crate::event::{Event, Version};
use crate::protocol::{close, Filter};

/// Identifies one connected socket for as long as the process runs.
pub type SocketId = u64;

/// Why and how a socket is being closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: Cow<'static, str>,
}

impl Close {
    pub fn going_away() -> Close {
        Close {
            code: close::GOING_AWAY,
            reason: "relay shutting down".into(),
        }
    }

    pub fn slow_consumer() -> Close {
        Close {
            code: close::SLOW_CONSUMER,
            reason: "slow consumer: outbound queue full".into(),
        }
    }
}

/// Counters the stats endpoint reports. Monotonic since start.
#[derive(Debug, Default)]
pub struct Counters {
    /// Events handed to the hub.
    pub events_received: AtomicU64,
    /// Event frames queued to sockets.
    pub messages_delivered: AtomicU64,
    /// Sockets closed because their outbound queue was full.
    pub slow_consumers_cut: AtomicU64,
    /// Events that could not be decoded and were skipped.
    pub events_malformed: AtomicU64,
}

/// The hub's handle on one socket: its queue and its close signal.
#[derive(Debug, Clone)]
pub struct Link {
    /// The socket's bounded outbound queue, drained by its writer.
    tx: mpsc::Sender<Bytes>,
    /// Set once when the socket must close; the session's reader and writer both watch it.
    cut: Arc<watch::Sender<Option<Close>>>,
}

impl Link {
    /// Queues a frame without waiting; false when the queue is full or the socket is gone.
    pub fn try_send(&self, frame: Bytes) -> bool {
        self.tx.try_send(frame).is_ok()
    }

    /// Asks the socket to close; the first reason given wins.
    pub fn close(&self, reason: Close) {
        self.cut.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason);
            true
        });
    }
}

/// What a session receives when it joins the hub.
#[derive(Debug)]
pub struct Connection {
    pub id: SocketId,
    /// Frames to write to the socket, in order.
    pub outbox: mpsc::Receiver<Bytes>,
    /// Becomes `Some` when the socket must close.
    pub closed: watch::Receiver<Option<Close>>,
    /// For the session's own replies, which share the queue so that order is kept.
    pub link: Link,
}

/// A subscription request the hub refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("role {role} may not read {feed}")]
    Forbidden { role: Role, feed: Feed },
    #[error("the socket is closing")]
    Closing,
}

/// One subscription as the status endpoint reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionInfo {
    pub socket: SocketId,
    pub feed: Feed,
    #[serde(skip_serializing_if = "Filter::is_empty")]
    pub filter: Filter,
    pub connected_at: String,
}

/// A point-in-time view of the hub for the stats endpoint.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub connected_sockets: usize,
    pub sockets_by_role: HashMap<Role, usize>,
    pub subscriptions_by_feed: HashMap<Feed, HashMap<Role, usize>>,
    pub active_subscriptions: usize,
    pub events_received: u64,
    pub messages_delivered: u64,
    pub slow_consumers_cut: u64,
    pub events_malformed: u64,
}

#[derive(Debug)]
pub struct Hub {
    index: RwLock<Index>,
    /// Set by [`Hub::close_all`]: a socket that connects afterwards is closed at once, with the
    /// same reason.
    closing: RwLock<Option<Close>>,
    next_id: AtomicU64,
    /// Capacity of each socket's outbound queue, in frames.
    queue_capacity: usize,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Index {
    sockets: HashMap<SocketId, SocketState>,
    feeds: [FeedIndex; 4],
}

#[derive(Debug)]
struct SocketState {
    principal: Principal,
    connected_at: SystemTime,
    /// The filter of each feed this socket subscribes to, indexed by [`Feed::index`].
    subscriptions: [Option<Filter>; 4],
    link: Link,
}

/// The subscribers of one feed.
#[derive(Debug, Default)]
struct FeedIndex {
    /// Subscribers whose role sees every row of this feed.
    everyone: HashMap<SocketId, Member>,
    /// Subscribers who see only their own rows, by user id.
    by_user: HashMap<Uuid, Vec<Member>>,
}

#[derive(Debug, Clone)]
struct Member {
    socket: SocketId,
    principal: Principal,
    filter: Filter,
    link: Link,
}

impl Member {
    /// Whether this subscriber may see, and asked for, this version of a row.
    fn wants(&self, feed: Feed, version: &Version) -> bool {
        authz::may_see(&self.principal, feed, &version.owners)
            && filter_matches(&self.filter, &version.row)
    }
}

fn filter_matches(filter: &Filter, row: &Map<String, Value>) -> bool {
    match filter.session_id {
        None => true,
        Some(session) => {
            row.get("session_id")
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(s).ok())
                == Some(session)
        }
    }
}

impl FeedIndex {
    fn add(&mut self, member: Member, feed: Feed) {
        match authz::reach(member.principal.role, feed) {
            Reach::Everything => {
                self.everyone.insert(member.socket, member);
            }
            Reach::Own => self
                .by_user
                .entry(member.principal.user_id)
                .or_default()
                .push(member),
            Reach::Nothing => {}
        }
    }

    fn remove(&mut self, socket: SocketId, principal: &Principal, feed: Feed) {
        match authz::reach(principal.role, feed) {
            Reach::Everything => {
                self.everyone.remove(&socket);
            }
            Reach::Own => {
                if let Some(members) = self.by_user.get_mut(&principal.user_id) {
                    members.retain(|m| m.socket != socket);
                    if members.is_empty() {
                        self.by_user.remove(&principal.user_id);
                    }
                }
            }
            Reach::Nothing => {}
        }
    }
}

impl Hub {
    pub fn new(queue_capacity: usize) -> Arc<Hub> {
        Arc::new(Hub {
            index: RwLock::default(),
            closing: RwLock::default(),
            next_id: AtomicU64::new(1),
            queue_capacity: queue_capacity.max(1),
            counters: Counters::default(),
        })
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new socket for `principal`.
    pub fn connect(&self, principal: Principal) -> Connection {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, outbox) = mpsc::channel(self.queue_capacity);
        let (cut, closed) = watch::channel(None);
        let link = Link {
            tx,
            cut: Arc::new(cut),
        };
        let closing = self
            .closing
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match closing {
            Some(reason) => link.close(reason),
            None => {
                self.write().sockets.insert(
                    id,
                    SocketState {
                        principal,
                        connected_at: SystemTime::now(),
                        subscriptions: Default::default(),
                        link: link.clone(),
                    },
                );
            }
        }
        Connection {
            id,
            outbox,
            closed,
            link,
        }
    }

    /// Subscribes a socket to a feed, replacing its filter if it already is subscribed, and
    /// queues `ack` before any event of the subscription can be queued.
    pub fn subscribe(
        &self,
        socket: SocketId,
        feed: Feed,
        filter: Filter,
        ack: Bytes,
    ) -> Result<(), SubscribeError> {
        let mut index = self.write();
        let Some(state) = index.sockets.get_mut(&socket) else {
            return Err(SubscribeError::Closing);
        };
        let principal = state.principal;
        if authz::reach(principal.role, feed) == Reach::Nothing {
            return Err(SubscribeError::Forbidden {
                role: principal.role,
                feed,
            });
        }
        let previous = state.subscriptions[feed.index()].replace(filter);
        let link = state.link.clone();
        let member = Member {
            socket,
            principal,
            filter,
            link: link.clone(),
        };
        let feed_index = &mut index.feeds[feed.index()];
        if previous.is_some() {
            feed_index.remove(socket, &principal, feed);
        }
        feed_index.add(member, feed);
        // Queued under the write lock, so no event of the subscription can precede it.
        let queued = link.try_send(ack);
        drop(index);
        if !queued {
            self.cut(socket, Close::slow_consumer());
        }
        Ok(())
    }

    /// Ends a socket's subscription to a feed (if any) and queues `ack` after its last event.
    pub fn unsubscribe(&self, socket: SocketId, feed: Feed, ack: Bytes) {
        let mut index = self.write();
        let Some(state) = index.sockets.get_mut(&socket) else {
            return;
        };
        let principal = state.principal;
        let link = state.link.clone();
        if state.subscriptions[feed.index()].take().is_some() {
            index.feeds[feed.index()].remove(socket, &principal, feed);
        }
        let queued = link.try_send(ack);
        drop(index);
        if !queued {
            self.cut(socket, Close::slow_consumer());
        }
    }

    /// Removes a socket and all its subscriptions.
    pub fn disconnect(&self, socket: SocketId) {
        let mut index = self.write();
        if let Some(state) = index.sockets.remove(&socket) {
            for feed in Feed::ALL {
                if state.subscriptions[feed.index()].is_some() {
                    index.feeds[feed.index()].remove(socket, &state.principal, feed);
                }
            }
        }
    }

    /// Disconnects a socket and tells its session to close it with `reason`.
    pub fn cut(&self, socket: SocketId, reason: Close) {
        let link = self.read().sockets.get(&socket).map(|s| s.link.clone());
        if let Some(link) = link {
            if reason.code == close::SLOW_CONSUMER {
                self.counters
                    .slow_consumers_cut
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.disconnect(socket);
            link.close(reason);
        }
    }

    /// Asks every socket to close, and every socket that connects from now on, for shutdown.
    pub fn close_all(&self, reason: Close) {
        *self.closing.write().unwrap_or_else(PoisonError::into_inner) = Some(reason.clone());
        for state in self.read().sockets.values() {
            state.link.close(reason.clone());
        }
    }

    /// Delivers an event to every subscriber allowed to see it; returns how many frames were
    /// queued.
    pub fn dispatch(&self, event: &Event) -> usize {
        self.counters
            .events_received
            .fetch_add(1, Ordering::Relaxed);
        // Rendered on first use: None = not yet rendered, Some(None) = nothing to send.
        let mut frames: [[Option<Option<Bytes>>; 2]; 3] = Default::default();
        let mut delivered = 0;
        let mut slow = Vec::new();
        {
            let index = self.read();
            let feed_index = &index.feeds[event.feed.index()];
            let mut offer = |member: &Member| {
                let saw = event.old.as_ref().map(|v| member.wants(event.feed, v));
                let sees = event.new.as_ref().map(|v| member.wants(event.feed, v));
                let Some(perceived) = Perceived::of(saw, sees) else {
                    return;
                };
                let projection = authz::projection(member.principal.role, event.feed);
                let Some(frame) = frames[perceived.index()][projection.index()]
                    .get_or_insert_with(|| event.frame(perceived, projection))
                    .clone()
                else {
                    return;
                };
                match member.link.tx.try_send(frame) {
                    Ok(()) => delivered += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => slow.push(member.socket),
                    // The session ended and is about to disconnect.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            };
            feed_index.everyone.values().for_each(&mut offer);
            let mut users: Vec<Uuid> = [&event.old, &event.new]
                .into_iter()
                .flatten()
                .flat_map(|v| v.owners.user_ids())
                .collect();
            users.sort_unstable();
            users.dedup();
            for user in users {
                if let Some(members) = feed_index.by_user.get(&user) {
                    members.iter().for_each(&mut offer);
                }
            }
        }
        for socket in slow {
            self.cut(socket, Close::slow_consumer());
        }
        self.counters
            .messages_delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
        delivered
    }

    /// Subscriptions currently held, across all sockets.
    pub fn active_subscriptions(&self) -> usize {
        self.read()
            .sockets
            .values()
            .map(|s| s.subscriptions.iter().flatten().count())
            .sum()
    }

    /// The subscriptions held by one user's sockets.
    pub fn subscriptions_of(&self, user_id: Uuid) -> Vec<SubscriptionInfo> {
        let index = self.read();
        let mut out: Vec<SubscriptionInfo> = index
            .sockets
            .iter()
            .filter(|(_, s)| s.principal.user_id == user_id)
            .flat_map(|(id, s)| {
                Feed::ALL.into_iter().filter_map(move |feed| {
                    s.subscriptions[feed.index()].map(|filter| SubscriptionInfo {
                        socket: *id,
                        feed,
                        filter,
                        connected_at: crate::rfc3339(s.connected_at),
                    })
                })
            })
            .collect();
        out.sort_by_key(|s| (s.socket, s.feed.index()));
        out
    }

    pub fn snapshot(&self) -> Snapshot {
        let index = self.read();
        let mut sockets_by_role = HashMap::new();
        let mut subscriptions_by_feed: HashMap<Feed, HashMap<Role, usize>> =
            Feed::ALL.into_iter().map(|f| (f, HashMap::new())).collect();
        let mut active = 0;
        for state in index.sockets.values() {
            *sockets_by_role.entry(state.principal.role).or_insert(0) += 1;
            for feed in Feed::ALL {
                if state.subscriptions[feed.index()].is_some() {
                    active += 1;
                    *subscriptions_by_feed
                        .entry(feed)
                        .or_default()
                        .entry(state.principal.role)
                        .or_insert(0) += 1;
                }
            }
        }
        let c = &self.counters;
        Snapshot {
            connected_sockets: index.sockets.len(),
            sockets_by_role,
            subscriptions_by_feed,
            active_subscriptions: active,
            events_received: c.events_received.load(Ordering::Relaxed),
            messages_delivered: c.messages_delivered.load(Ordering::Relaxed),
            slow_consumers_cut: c.slow_consumers_cut.load(Ordering::Relaxed),
            events_malformed: c.events_malformed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Payload;
    use serde_json::json;

    fn principal(role: Role) -> Principal {
        Principal {
            user_id: Uuid::new_v4(),
            role,
        }
    }

    fn appointment_event(
        id: i64,
        op: &str,
        old: Option<(Uuid, Uuid)>,
        new: Option<(Uuid, Uuid)>,
    ) -> Event {
        let row = |(patient, dentist): (Uuid, Uuid)| {
            json!({"id": "00000000-0000-4000-8000-000000000001", "patient_id": patient,
                   "dentist_id": dentist, "notes": "private", "status": "booked",
                   "kind": "video", "starts_at": "s", "ends_at": "e"})
        };
        let payload = json!({"id": id, "table": "appointments", "op": op, "at": "t",
                             "new": new.map(row), "old": old.map(row)});
        match Payload::decode(&payload.to_string()).unwrap() {
            Payload::Inline(event) => event,
            Payload::Fetch { .. } => unreachable!(),
        }
    }

    /// Joins the hub and subscribes to appointments, consuming the ack.
    fn join(hub: &Hub, who: Principal) -> Connection {
        let mut connection = hub.connect(who);
        hub.subscribe(
            connection.id,
            Feed::Appointments,
            Filter::default(),
            Bytes::from_static(b"ack"),
        )
        .unwrap();
        assert_eq!(
            connection.outbox.try_recv().unwrap(),
            Bytes::from_static(b"ack")
        );
        connection
    }

    fn received(connection: &mut Connection) -> Vec<Value> {
        received_raw(connection)
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect()
    }

    #[test]
    fn delivers_to_exactly_the_subscribers_who_may_see_the_row() {
        let hub = Hub::new(16);
        let (patient, dentist, other_dentist) = (
            principal(Role::Patient),
            principal(Role::Dentist),
            principal(Role::Dentist),
        );
        let mut admin = join(&hub, principal(Role::Admin));
        let mut bot = join(&hub, principal(Role::Chatbot));
        let mut p = join(&hub, patient);
        let mut d = join(&hub, dentist);
        let mut other = join(&hub, other_dentist);

        let pair = (patient.user_id, dentist.user_id);
        assert_eq!(
            hub.dispatch(&appointment_event(1, "INSERT", None, Some(pair))),
            4
        );
        for c in [&mut admin, &mut p, &mut d] {
            let frames = received(c);
            assert_eq!(frames.len(), 1);
            assert_eq!(frames[0]["op"], "INSERT");
            assert_eq!(frames[0]["row"]["notes"], "private");
        }
        let slots = received(&mut bot);
        assert_eq!(slots.len(), 1);
        assert!(slots[0]["row"].get("patient_id").is_none());
        assert!(slots[0]["row"].get("notes").is_none());
        assert!(received(&mut other).is_empty());
    }

    #[test]
    fn reassignment_is_a_delete_for_one_dentist_and_an_insert_for_the_other() {
        let hub = Hub::new(16);
        let (patient, from, to) = (
            principal(Role::Patient),
            principal(Role::Dentist),
            principal(Role::Dentist),
        );
        let mut p = join(&hub, patient);
        let mut a = join(&hub, from);
        let mut b = join(&hub, to);
        let event = appointment_event(
            2,
            "UPDATE",
            Some((patient.user_id, from.user_id)),
            Some((patient.user_id, to.user_id)),
        );
        assert_eq!(hub.dispatch(&event), 3);
        let left = received(&mut a);
        assert_eq!(left[0]["op"], "DELETE");
        assert_eq!(left[0]["row"]["dentist_id"], json!(from.user_id));
        let entered = received(&mut b);
        assert_eq!(entered[0]["op"], "INSERT");
        assert!(entered[0].get("old").is_none());
        let stays = received(&mut p);
        assert_eq!(stays[0]["op"], "UPDATE");
        assert_eq!(stays[0]["old"]["dentist_id"], json!(from.user_id));
    }

    #[test]
    fn the_chatbot_hears_nothing_of_changes_to_columns_it_cannot_see() {
        let hub = Hub::new(16);
        let (patient, dentist) = (principal(Role::Patient), principal(Role::Dentist));
        let mut bot = join(&hub, principal(Role::Chatbot));
        let mut admin = join(&hub, principal(Role::Admin));
        let pair = (patient.user_id, dentist.user_id);
        let other_patient = (Uuid::new_v4(), dentist.user_id);
        // Only patient_id changes: invisible to the chatbot.
        assert_eq!(
            hub.dispatch(&appointment_event(
                1,
                "UPDATE",
                Some(pair),
                Some(other_patient)
            )),
            1
        );
        assert!(received(&mut bot).is_empty());
        assert_eq!(received(&mut admin).len(), 1);
    }

    #[test]
    fn identical_frames_share_one_buffer() {
        let hub = Hub::new(16);
        let mut admins: Vec<Connection> =
            (0..3).map(|_| join(&hub, principal(Role::Admin))).collect();
        hub.dispatch(&appointment_event(
            3,
            "INSERT",
            None,
            Some((Uuid::new_v4(), Uuid::new_v4())),
        ));
        let frames: Vec<Bytes> = admins
            .iter_mut()
            .map(|c| c.outbox.try_recv().unwrap())
            .collect();
        assert!(frames.windows(2).all(|w| w[0].as_ptr() == w[1].as_ptr()));
    }

    #[test]
    fn a_full_queue_cuts_only_that_socket() {
        let hub = Hub::new(2);
        let mut slow = join(&hub, principal(Role::Admin));
        let mut fast = join(&hub, principal(Role::Admin));
        for id in 0..3 {
            hub.dispatch(&appointment_event(
                id,
                "INSERT",
                None,
                Some((Uuid::new_v4(), Uuid::new_v4())),
            ));
            received(&mut fast);
        }
        assert_eq!(
            slow.closed.borrow().as_ref().map(|c| c.code),
            Some(close::SLOW_CONSUMER)
        );
        assert!(fast.closed.borrow().is_none());
        assert_eq!(hub.counters().slow_consumers_cut.load(Ordering::Relaxed), 1);
        // The cut socket is gone from the index; the other still receives.
        assert_eq!(
            hub.dispatch(&appointment_event(
                9,
                "INSERT",
                None,
                Some((Uuid::new_v4(), Uuid::new_v4()))
            )),
            1
        );
        assert_eq!(
            received(&mut slow).len(),
            2,
            "what was queued before the cut stays queued"
        );
    }

    #[test]
    fn sockets_connecting_after_close_all_are_closed_too() {
        let hub = Hub::new(4);
        let before = hub.connect(principal(Role::Admin));
        hub.close_all(Close::going_away());
        let after = hub.connect(principal(Role::Admin));
        for c in [&before, &after] {
            assert_eq!(
                c.closed.borrow().as_ref().map(|c| c.code),
                Some(close::GOING_AWAY)
            );
        }
        assert!(matches!(
            hub.subscribe(
                after.id,
                Feed::Availability,
                Filter::default(),
                Bytes::new()
            ),
            Err(SubscribeError::Closing)
        ));
    }

    #[test]
    fn refuses_feeds_the_role_may_never_read() {
        let hub = Hub::new(4);
        let bot = hub.connect(principal(Role::Chatbot));
        for feed in [Feed::ConsultationSessions, Feed::ConsultationMessages] {
            assert!(matches!(
                hub.subscribe(bot.id, feed, Filter::default(), Bytes::new()),
                Err(SubscribeError::Forbidden { .. })
            ));
        }
        assert_eq!(hub.active_subscriptions(), 0);
    }

    #[test]
    fn session_filter_narrows_message_delivery() {
        let hub = Hub::new(8);
        let admin = principal(Role::Admin);
        let (wanted, other) = (Uuid::new_v4(), Uuid::new_v4());
        let mut c = hub.connect(admin);
        let filter = Filter {
            session_id: Some(wanted),
        };
        hub.subscribe(c.id, Feed::ConsultationMessages, filter, Bytes::new())
            .unwrap();
        assert_eq!(received_raw(&mut c), vec![Bytes::new()]);
        let message = |id: i64, session: Uuid| {
            let payload = json!({"id": id, "table": "consultation_messages", "op": "INSERT", "at": "t",
                "new": {"id": Uuid::new_v4(), "session_id": session, "body": "hi"},
                "new_session": {"patient_id": Uuid::new_v4(), "dentist_id": Uuid::new_v4()}});
            match Payload::decode(&payload.to_string()).unwrap() {
                Payload::Inline(event) => event,
                Payload::Fetch { .. } => unreachable!(),
            }
        };
        hub.dispatch(&message(1, other));
        hub.dispatch(&message(2, wanted));
        let frames = received(&mut c);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0]["id"], 2);
    }

    #[test]
    fn unsubscribe_and_disconnect_leave_no_trace() {
        let hub = Hub::new(8);
        let dentist = principal(Role::Dentist);
        let mut c = join(&hub, dentist);
        hub.unsubscribe(c.id, Feed::Appointments, Bytes::from_static(b"bye"));
        assert_eq!(received_raw(&mut c), vec![Bytes::from_static(b"bye")]);
        assert_eq!(
            hub.dispatch(&appointment_event(
                1,
                "INSERT",
                None,
                Some((Uuid::new_v4(), dentist.user_id))
            )),
            0
        );
        let c2 = join(&hub, dentist);
        assert_eq!(hub.subscriptions_of(dentist.user_id).len(), 1);
        hub.disconnect(c2.id);
        hub.disconnect(c.id);
        assert_eq!(hub.snapshot().connected_sockets, 0);
        assert!(hub
            .read()
            .feeds
            .iter()
            .all(|f| f.everyone.is_empty() && f.by_user.is_empty()));
    }

    fn received_raw(connection: &mut Connection) -> Vec<Bytes> {
        std::iter::from_fn(|| connection.outbox.try_recv().ok()).collect()
    }
}
