//! The fan-out hub: which socket is subscribed to what, and delivering each event to exactly the
//! subscribers allowed to see it.
//!
//! Subscribers are indexed per feed: those whose role sees every row of the feed, and those who
//! see only their own rows, by user id. An event therefore touches the first group and the
//! handful of users its rows name, never every socket. For each candidate the authorization rules
//! ([`crate::authz`]) decide, and each distinct frame (perceived op × projection) is rendered once
//! and its bytes shared by every recipient.
//!
//! Every socket has one bounded outbound queue. Delivery never waits. With [`Writes::Direct`] a
//! frame goes straight to the socket when nothing is queued ahead of it and the socket takes it at
//! once ([`Direct`]), saving the wake-up of the socket's writer; with [`Writes::Queued`], and
//! whenever the socket is busy, it goes to the queue, whose writers run on every runtime thread.
//! A socket whose queue is full is cut (close code [`close::SLOW_CONSUMER`]) so that one slow
//! reader never delays anyone else. The hub knows nothing of Postgres or warp; the session owns
//! the socket itself.
//!
//! The hub also knows its position: the id of the last event dispatched. A subscription that
//! resumes from a cursor joins at that position with a private buffer; its session replays the
//! missed events up to the position from the log, then drains the buffer and the subscription
//! goes live ([`Hub::drain_replay`]), so the replayed and live parts meet with no gap and no
//! duplicate.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch, Notify};
use tungstenite::Utf8Bytes;
use uuid::Uuid;

use crate::authz::{self, Feed, Perceived, Principal, Reach, Role};
use crate::event::{DecodeError, Event, Version};
use crate::protocol::{close, Cursor, CursorKey, Filter, Mark, Tag};

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
    /// Notifications and event-log rows that could not be decoded (a row that cannot be decoded
    /// is skipped; the log is read instead of a notification that cannot be).
    pub events_malformed: AtomicU64,
    /// Event frames sent by replays of resumed subscriptions.
    pub replayed: AtomicU64,
    /// Replays of resumed subscriptions that completed.
    pub replays: AtomicU64,
    /// Times the LISTEN connection was re-established after a loss.
    pub listen_reconnects: AtomicU64,
    /// Times every socket was closed (4010) for clients to fetch current state: the event log
    /// went back, or an event that was never committed was dispatched.
    pub starts_over: AtomicU64,
}

/// A frame queued for a socket, with the cursor of the event it carries (none for replies). The
/// frame is text checked once when it is queued; every socket it goes to shares its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub frame: Utf8Bytes,
    pub cursor: Option<Cursor>,
}

impl Outbound {
    pub fn reply(frame: Bytes) -> Outbound {
        Outbound {
            frame: text(frame),
            cursor: None,
        }
    }
}

/// A rendered frame as WebSocket text. Frames are rendered from serde_json output, so they are
/// always UTF-8; the check costs one pass, and the lossy fallback is never taken.
pub fn text(frame: Bytes) -> Utf8Bytes {
    Utf8Bytes::try_from(frame.clone())
        .unwrap_or_else(|_| Utf8Bytes::from(String::from_utf8_lossy(&frame).into_owned()))
}

/// A socket the dispatch may write to directly, without waking its writer.
pub trait Direct: Send + Sync + std::fmt::Debug {
    /// Writes the frame now if the socket can take it without waiting; false if it cannot, and
    /// the frame must be queued. Called only while the socket's queue is empty.
    fn try_write(&self, outbound: &Outbound) -> bool;

    /// What its writer signals as it takes frames from the queue, for [`Link::send_replayed`].
    fn room(&self) -> Option<&Room> {
        None
    }
}

/// The hub's handle on one socket: its queue and its close signal.
#[derive(Debug, Clone)]
pub struct Link {
    /// The socket's bounded outbound queue, drained by its writer.
    /// Frames are boxed so that the queue's first block, allocated with the socket, is small:
    /// most sockets are idle most of the time.
    tx: mpsc::Sender<Box<Outbound>>,
    /// Set once when the socket must close; the session's reader and writer both watch it.
    cut: Arc<watch::Sender<Option<Close>>>,
    /// The socket itself, for frames that need not wait in the queue.
    direct: Option<Arc<dyn Direct>>,
}

/// How a replay waiting for room in a socket's queue learns that the writer took frames from it.
/// The replay waits without holding any of the queue's places, so live frames of the socket's
/// other feeds, and its replies, still find the room there is. It lives in the socket's writer
/// side (the outlet), which is allocated with the socket anyway.
#[derive(Debug, Default)]
pub struct Room {
    /// Replays waiting (at most one per feed).
    waiting: AtomicUsize,
    taken: Notify,
}

impl Room {
    /// The writer took frames from the queue (or may have): wakes the replays waiting for room.
    pub fn taken(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.taken.notify_waiters();
        }
    }
}

/// How long a waiting replay trusts the writer's wake-up before it looks at the queue again.
const ROOM_RECHECK: Duration = Duration::from_millis(100);

/// How [`Hub::dispatch`] hands an event's frames to its sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// Written by the dispatching thread itself where the socket can take them at once: the
    /// cheapest way, when the dispatch has time for every recipient's write.
    Direct,
    /// Queued for each socket's writer, so that the writes spread over the runtime's threads and
    /// the dispatch moves on at once: for when more events are waiting behind this one.
    Queued,
}

impl Link {
    /// Delivers an event's frame: with [`Writes::Direct`], written at once when nothing is queued
    /// ahead of it and the socket takes it without waiting; queued otherwise.
    fn offer(
        &self,
        outbound: Outbound,
        writes: Writes,
    ) -> Result<(), mpsc::error::TrySendError<Box<Outbound>>> {
        if let (Writes::Direct, Some(direct)) = (writes, &self.direct) {
            // An empty queue has every permit back: nothing queued, nothing being queued.
            if self.tx.capacity() == self.tx.max_capacity()
                && self.cut.borrow().is_none()
                && direct.try_write(&outbound)
            {
                return Ok(());
            }
        }
        self.tx.try_send(Box::new(outbound))
    }

    /// Queues a reply without waiting; false when the queue is full, and the socket is then a
    /// slow consumer. A socket that is gone takes nothing and needs no cutting: true.
    pub fn try_send(&self, frame: Bytes) -> bool {
        !matches!(
            self.tx.try_send(Box::new(Outbound::reply(frame))),
            Err(mpsc::error::TrySendError::Full(_))
        )
    }

    /// Queues a frame that can wait for another time, only while at least half the queue is
    /// free, so that it never brings a socket nearer to being cut; true if queued.
    fn try_send_spare(&self, frame: Bytes) -> bool {
        self.tx.capacity() * 2 >= self.tx.max_capacity()
            && self.tx.try_send(Box::new(Outbound::reply(frame))).is_ok()
    }

    /// Queues a frame for a replay, waiting until the queue has room for it and half its capacity
    /// besides, so that live frames of the socket's other feeds, and the `live` marker, still find
    /// room. Waits at most `stall`: a client that takes no frame for that long has stopped
    /// reading.
    pub async fn send_replayed(&self, outbound: Outbound, stall: Duration) -> Replayed {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let headroom = self.tx.max_capacity() / 2;
        let deadline = tokio::time::Instant::now() + stall;
        let mut outbound = Box::new(outbound);
        // Without a writer that signals (a socket of the unit tests), the queue is looked at
        // every ROOM_RECHECK.
        let unsignalled = Room::default();
        let room = self
            .direct
            .as_deref()
            .and_then(Direct::room)
            .unwrap_or(&unsignalled);
        room.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&room.waiting);
        loop {
            let taken = room.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            if self.tx.capacity() > headroom {
                match self.tx.try_send(outbound) {
                    Ok(()) => return Replayed::Queued,
                    Err(mpsc::error::TrySendError::Closed(_)) => return Replayed::Gone,
                    Err(mpsc::error::TrySendError::Full(back)) => outbound = back,
                }
            } else if self.tx.is_closed() {
                return Replayed::Gone;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Replayed::Stalled;
            }
            let _ = tokio::time::timeout_at(deadline.min(now + ROOM_RECHECK), taken).await;
        }
    }

    /// Asks the socket to close; the first reason given wins, and only then is true returned.
    pub fn close(&self, reason: Close) -> bool {
        self.cut.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason);
            true
        })
    }

    /// Whether the socket was asked to close.
    fn is_closing(&self) -> bool {
        self.cut.borrow().is_some()
    }
}

/// What became of a replayed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replayed {
    Queued,
    /// The socket closed.
    Gone,
    /// The queue made no room within the time allowed.
    Stalled,
}

/// What a session receives when it joins the hub.
#[derive(Debug)]
pub struct Connection {
    pub id: SocketId,
    /// Frames to write to the socket, in order.
    pub outbox: mpsc::Receiver<Box<Outbound>>,
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
    #[error("the relay has not reached the database yet")]
    NotReady,
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the next event dispatched.
    Live,
    /// After this cursor: the session replays from the log up to the position
    /// [`Hub::subscribe`] returns, then calls [`Hub::drain_replay`].
    After(Cursor),
}

/// What [`Hub::drain_replay`] found.
#[derive(Debug)]
pub enum Drained {
    /// Live frames that arrived during replay; send them, then drain again.
    Frames(Vec<Outbound>),
    /// Nothing was waiting: the subscription now receives events directly.
    Live,
    /// More live frames arrived than the buffer holds; they were dropped. Replay from the log up
    /// to this position too, then drain again.
    Behind(Cursor),
    /// The subscription or socket is gone.
    Gone,
}

/// Live frames held back while a resumed subscription replays.
type ReplayBuffer = Arc<Mutex<Replay>>;

#[derive(Debug, Default)]
struct Replay {
    frames: VecDeque<Outbound>,
    /// Frames were dropped because the buffer was full: the replay must read further instead.
    overflowed: bool,
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
    pub replayed: u64,
    pub listen_reconnects: u64,
    /// The id of the last event dispatched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
}

/// Marks a [`Hub`]'s `position_tag` as holding a tag.
const TAGGED: u64 = 1 << 32;

fn tagged(tag: Tag) -> u64 {
    TAGGED | u64::from(tag.0)
}

#[derive(Debug)]
pub struct Hub {
    index: RwLock<Index>,
    /// The id of the last event dispatched; negative until the listener has read the log's
    /// position. Written only under the index lock (read side, by the one dispatching task).
    position: AtomicI64,
    /// The tag of the event at the position ([`TAGGED`] set), or 0 when the position is not an
    /// event dispatched here (the log's start, a stretch lost to retention). Written with it.
    position_tag: AtomicU64,
    /// The key of cursors' tags, the database's (`relay.cursor_key`); set by [`Hub::start_at`].
    key: RwLock<CursorKey>,
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
    /// Events up to this cursor are not for this subscription (it resumed after it).
    after: Cursor,
    /// While the subscription replays: where live frames wait.
    replay: Option<ReplayBuffer>,
    /// The latest position its client was told it may resume from (its start, or a `position`
    /// frame); events it received may have taken it further.
    told: Cursor,
}

impl Member {
    fn view(&self) -> View {
        View {
            principal: self.principal,
            filter: self.filter,
        }
    }
}

/// Who is looking, through which filter: decides how an event appears to one subscription.
#[derive(Debug, Clone, Copy)]
pub struct View {
    pub principal: Principal,
    pub filter: Filter,
}

impl View {
    /// Whether this subscriber may see, and asked for, this version of a row.
    fn wants(&self, feed: Feed, version: &Version) -> bool {
        authz::may_see(&self.principal, feed, &version.owners)
            && filter_matches(&self.filter, &version.row)
    }

    /// How the event appears to this subscriber: the op they perceive and the projection they
    /// see it through, or `None` if it is not for them.
    pub fn perceive(&self, event: &Event) -> Option<(Perceived, authz::Projection)> {
        let saw = event.old.as_ref().map(|v| self.wants(event.feed, v));
        let sees = event.new.as_ref().map(|v| self.wants(event.feed, v));
        let perceived = Perceived::of(saw, sees)?;
        Some((
            perceived,
            authz::projection(self.principal.role, event.feed),
        ))
    }

    /// The frame this subscriber receives for an event, if any (used by replay; live dispatch
    /// shares rendered frames across subscribers); `key` tags its cursor.
    pub fn frame(&self, event: &Event, key: &CursorKey) -> Option<Bytes> {
        let (perceived, projection) = self.perceive(event)?;
        event.frame(perceived, projection, key)
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
            // Most users hold one socket: room for one member, where `Vec`'s first push would
            // make room for four (three unused members per user and feed, about 300 bytes).
            Reach::Own => self
                .by_user
                .entry(member.principal.user_id)
                .or_insert_with(|| Vec::with_capacity(1))
                .push(member),
            Reach::Nothing => {}
        }
    }

    fn member_mut(
        &mut self,
        socket: SocketId,
        principal: &Principal,
        feed: Feed,
    ) -> Option<&mut Member> {
        match authz::reach(principal.role, feed) {
            Reach::Everything => self.everyone.get_mut(&socket),
            Reach::Own => self
                .by_user
                .get_mut(&principal.user_id)?
                .iter_mut()
                .find(|m| m.socket == socket),
            Reach::Nothing => None,
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
            position: AtomicI64::new(-1),
            position_tag: AtomicU64::new(0),
            key: RwLock::new(CursorKey([0; 16])),
            closing: RwLock::default(),
            next_id: AtomicU64::new(1),
            queue_capacity: queue_capacity.max(1),
            counters: Counters::default(),
        })
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counts and logs an event that cannot be decoded; the feed goes on without it.
    pub fn skip_malformed(&self, cause: &DecodeError) {
        self.counters
            .events_malformed
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%cause, "skipped an undecodable event");
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The id of the last event dispatched, once known.
    pub fn position(&self) -> Option<Cursor> {
        let position = self.position.load(Ordering::Acquire);
        (position >= 0).then_some(Cursor(position))
    }

    /// The position as clients are told it: the id of the last event dispatched, and its tag
    /// when it is an event the hub knows. Stable under the index lock.
    fn mark(&self) -> Option<Mark> {
        let position = self.position()?;
        let tag = self.position_tag.load(Ordering::Acquire);
        Some(Mark {
            position,
            tag: (tag & TAGGED != 0).then_some(Tag(tag as u32)),
        })
    }

    /// Tells every live subscription whose client last heard of an earlier position where the hub
    /// stands (`frame(feed, position)`): a subscription that receives nothing keeps a cursor that
    /// retention would otherwise pass, and its client would have to refetch on its next resume.
    /// Queued under the index lock, so after every event up to the position, and only where the
    /// socket's queue is at least half free (the others are told next time); never to a socket
    /// asked to close, which may have missed an event. Returns how many subscriptions were told.
    pub fn tell_position(&self, frame: impl Fn(Feed, Mark) -> Bytes) -> usize {
        let mut index = self.write();
        let Some(mark) = self.mark() else {
            return 0;
        };
        let mut told = 0;
        for feed in Feed::ALL {
            let feed_index = &mut index.feeds[feed.index()];
            let frame = frame(feed, mark);
            let members = feed_index
                .everyone
                .values_mut()
                .chain(feed_index.by_user.values_mut().flatten());
            for member in members {
                // Replaying (its cursor is the replay's), or told this or a later position.
                if member.replay.is_some() || member.told >= mark.position {
                    continue;
                }
                if !member.link.is_closing() && member.link.try_send_spare(frame.clone()) {
                    member.told = mark.position;
                    told += 1;
                }
            }
        }
        told
    }

    /// The key of cursors' tags.
    pub fn key(&self) -> CursorKey {
        *self.key.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the position the hub starts from (the log's newest event when the relay starts), and
    /// the database's key of cursors' tags.
    pub fn start_at(&self, position: Mark, key: CursorKey) {
        let _index = self.write();
        self.set_start(position, key);
    }

    /// Starts again from `position` after the log went back, closing every socket connected
    /// before with `reason`: in one step, so that none of them is told a position of the new log
    /// (their cursors are of the old one), and every socket connected after starts there.
    pub fn start_over_at(&self, position: Mark, key: CursorKey, reason: Close) {
        self.counters.starts_over.fetch_add(1, Ordering::Relaxed);
        let sockets: Vec<SocketId> = {
            let index = self.write();
            self.set_start(position, key);
            for state in index.sockets.values() {
                state.link.close(reason.clone());
            }
            index.sockets.keys().copied().collect()
        };
        for socket in sockets {
            self.disconnect(socket);
        }
    }

    /// Under the index lock.
    fn set_start(&self, position: Mark, key: CursorKey) {
        *self.key.write().unwrap_or_else(PoisonError::into_inner) = key;
        self.position.store(position.position.0, Ordering::Release);
        self.position_tag
            .store(position.tag.map_or(0, tagged), Ordering::Release);
    }

    /// Registers a new socket for `principal`. Frames go to its queue, and with `direct`, when
    /// nothing is queued, straight to the socket.
    pub fn connect(&self, principal: Principal, direct: Option<Arc<dyn Direct>>) -> Connection {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, outbox) = mpsc::channel(self.queue_capacity);
        let (cut, closed) = watch::channel(None);
        let link = Link {
            tx,
            cut: Arc::new(cut),
            direct,
        };
        // Read under the index's write lock: `close_all` sets `closing` before it reads the
        // index, so a socket either sees the reason here or is in the index `close_all` walks.
        let mut index = self.write();
        let closing = self
            .closing
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match closing {
            Some(reason) => {
                link.close(reason);
            }
            None => {
                index.sockets.insert(
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
        drop(index);
        Connection {
            id,
            outbox,
            closed,
            link,
        }
    }

    /// Subscribes a socket to a feed, replacing its subscription if it already has one, and
    /// queues the acknowledgement `ack(cursor)` before any event of the subscription can be
    /// queued. `cursor` is where the subscription starts: the position for [`Start::Live`], the
    /// given cursor for [`Start::After`]. Returns the position: a resumed subscription must
    /// replay the events after its cursor up to it, then call [`Hub::drain_replay`].
    pub fn subscribe(
        &self,
        socket: SocketId,
        feed: Feed,
        filter: Filter,
        start: Start,
        ack: impl FnOnce(Mark) -> Bytes,
    ) -> Result<Cursor, SubscribeError> {
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
        // Stable: dispatch moves the position only under the index lock, which this holds.
        let mark = self.mark().ok_or(SubscribeError::NotReady)?;
        let position = mark.position;
        let previous = state.subscriptions[feed.index()].replace(filter);
        let link = state.link.clone();
        let (after, replay, from) = match start {
            Start::Live => (position, None, mark),
            Start::After(cursor) => (cursor, Some(ReplayBuffer::default()), Mark::from(cursor)),
        };
        let member = Member {
            socket,
            principal,
            filter,
            link: link.clone(),
            after,
            replay,
            told: after,
        };
        let feed_index = &mut index.feeds[feed.index()];
        if previous.is_some() {
            feed_index.remove(socket, &principal, feed);
        }
        feed_index.add(member, feed);
        // Queued under the write lock, so no event of the subscription can precede it.
        let queued = link.try_send(ack(from));
        drop(index);
        if !queued {
            self.cut(socket, Close::slow_consumer());
        }
        Ok(position)
    }

    /// Ends a resumed subscription's replay: hands over the live frames that arrived meanwhile
    /// (the session sends them and calls again), or, when none are waiting, makes the
    /// subscription live and queues `live` before any frame that follows.
    pub fn drain_replay(
        &self,
        socket: SocketId,
        feed: Feed,
        live: impl FnOnce() -> Bytes,
    ) -> Drained {
        let mut index = self.write();
        let Some(principal) = index.sockets.get(&socket).map(|s| s.principal) else {
            return Drained::Gone;
        };
        let Some(member) = index.feeds[feed.index()].member_mut(socket, &principal, feed) else {
            return Drained::Gone;
        };
        let Some(buffer) = &member.replay else {
            return Drained::Live;
        };
        let mut replay = buffer.lock().unwrap_or_else(PoisonError::into_inner);
        if replay.overflowed {
            *replay = Replay::default();
            // Stable under the write lock: every event up to it was dropped or never buffered.
            return Drained::Behind(self.position().unwrap_or_default());
        }
        let waiting: Vec<Outbound> = replay.frames.drain(..).collect();
        drop(replay);
        if waiting.is_empty() {
            member.replay = None;
            let queued = member.link.try_send(live());
            drop(index);
            if !queued {
                self.cut(socket, Close::slow_consumer());
            }
            Drained::Live
        } else {
            Drained::Frames(waiting)
        }
    }

    /// Ends a socket's subscription to a feed (if any) and queues `ack`, if given, after its
    /// last event.
    pub fn unsubscribe(&self, socket: SocketId, feed: Feed, ack: Option<Bytes>) {
        let mut index = self.write();
        let Some(state) = index.sockets.get_mut(&socket) else {
            return;
        };
        let principal = state.principal;
        let link = state.link.clone();
        if state.subscriptions[feed.index()].take().is_some() {
            index.feeds[feed.index()].remove(socket, &principal, feed);
        }
        let queued = ack.is_none_or(|ack| link.try_send(ack));
        drop(index);
        if !queued {
            self.cut(socket, Close::slow_consumer());
        }
    }

    /// How many subscriptions a socket holds, and whether one of them is to `feed` (so that
    /// subscribing to it again replaces rather than adds).
    pub fn subscriptions_held(&self, socket: SocketId, feed: Feed) -> (usize, bool) {
        let index = self.read();
        let Some(state) = index.sockets.get(&socket) else {
            return (0, false);
        };
        let held = state.subscriptions.iter().flatten().count();
        (held, state.subscriptions[feed.index()].is_some())
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
            // Counted by whoever closes it first (here, or a dispatch that found its queue full).
            let slow = reason.code == close::SLOW_CONSUMER;
            if link.close(reason) && slow {
                self.counters
                    .slow_consumers_cut
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.disconnect(socket);
        }
    }

    /// Moves the position past an event no one receives (one that could not be decoded, or a
    /// stretch of the log lost to retention).
    pub fn skip(&self, cursor: Cursor) {
        let _index = self.read();
        if self.position.fetch_max(cursor.0, Ordering::AcqRel) < cursor.0 {
            self.position_tag.store(0, Ordering::Release);
        }
    }

    /// Closes every socket now connected with `reason`; new sockets are still accepted.
    pub fn disconnect_all(&self, reason: Close) {
        let sockets: Vec<SocketId> = self.read().sockets.keys().copied().collect();
        for socket in sockets {
            self.cut(socket, reason.clone());
        }
    }

    /// Asks every socket to close, and every socket that connects from now on, for shutdown.
    pub fn close_all(&self, reason: Close) {
        *self.closing.write().unwrap_or_else(PoisonError::into_inner) = Some(reason.clone());
        for state in self.read().sockets.values() {
            state.link.close(reason.clone());
        }
    }

    /// Delivers an event to every subscriber allowed to see it, writing frames directly where the
    /// socket takes them at once; returns how many frames were written or queued.
    pub fn dispatch(&self, event: &Event) -> usize {
        self.dispatch_with(event, Writes::Direct)
    }

    /// [`Hub::dispatch`], choosing how the frames are handed over.
    pub fn dispatch_with(&self, event: &Event, writes: Writes) -> usize {
        self.counters
            .events_received
            .fetch_add(1, Ordering::Relaxed);
        // Rendered on first use: None = not yet rendered, Some(None) = nothing to send.
        let mut frames: [[Option<Option<Utf8Bytes>>; 2]; 3] = Default::default();
        let mut delivered = 0;
        let mut slow = Vec::new();
        let cursor = Cursor(event.id);
        let key = self.key();
        {
            let index = self.read();
            let feed_index = &index.feeds[event.feed.index()];
            let mut offer = |member: &Member| {
                if cursor <= member.after {
                    return;
                }
                let Some((perceived, projection)) = member.view().perceive(event) else {
                    return;
                };
                let Some(frame) = frames[perceived.index()][projection.index()]
                    .get_or_insert_with(|| event.frame(perceived, projection, &key).map(text))
                    .clone()
                else {
                    return;
                };
                let outbound = Outbound {
                    frame,
                    cursor: Some(cursor),
                };
                if let Some(buffer) = &member.replay {
                    // Bounded: past the socket's queue capacity the frames are dropped and the
                    // replay reads them from the log instead.
                    let mut replay = buffer.lock().unwrap_or_else(PoisonError::into_inner);
                    if replay.overflowed || replay.frames.len() >= self.queue_capacity {
                        replay.overflowed = true;
                        replay.frames.clear();
                    } else {
                        replay.frames.push_back(outbound);
                        delivered += 1;
                    }
                    return;
                }
                match member.link.offer(outbound, writes) {
                    Ok(()) => delivered += 1,
                    // Closed at once, under the lock: nothing queued from now on (a position,
                    // which could name this event) reaches the client ahead of the close.
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        if member.link.close(Close::slow_consumer()) {
                            slow.push(member.socket);
                        }
                    }
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
            // Under the lock: a subscription registered from now on starts after this event.
            if self.position.fetch_max(event.id, Ordering::AcqRel) < event.id {
                self.position_tag
                    .store(tagged(key.tag(event.id, &event.at)), Ordering::Release);
            }
        }
        for socket in slow {
            self.counters
                .slow_consumers_cut
                .fetch_add(1, Ordering::Relaxed);
            self.disconnect(socket);
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
    /// The subscriptions of the sockets opened with this principal: the same user and role (a
    /// token for the same user in another role sees nothing of them).
    pub fn subscriptions_of(&self, principal: &Principal) -> Vec<SubscriptionInfo> {
        let index = self.read();
        let mut out: Vec<SubscriptionInfo> = index
            .sockets
            .iter()
            .filter(|(_, s)| s.principal == *principal)
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
            replayed: c.replayed.load(Ordering::Relaxed),
            listen_reconnects: c.listen_reconnects.load(Ordering::Relaxed),
            position: self.position().map(|p| p.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Payload;
    use serde_json::json;

    const KEY: CursorKey = CursorKey([3; 16]);

    /// A hub whose listener has started at the beginning of the log.
    fn started(queue_capacity: usize) -> Arc<Hub> {
        let hub = Hub::new(queue_capacity);
        hub.start_at(Mark::from(Cursor(0)), KEY);
        hub
    }

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
        let mut connection = hub.connect(who, None);
        hub.subscribe(
            connection.id,
            Feed::Appointments,
            Filter::default(),
            Start::Live,
            |_| Bytes::from_static(b"ack"),
        )
        .unwrap();
        assert_eq!(
            connection.outbox.try_recv().unwrap().frame,
            Utf8Bytes::from_static("ack")
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
    fn a_users_subscription_reserves_room_for_one_member() {
        // Memory per idle socket: most users hold one socket, so each user's list of members
        // starts with room for one, and grows only for a second socket.
        let hub = started(16);
        let patient = principal(Role::Patient);
        let _first = join(&hub, patient);
        let capacity = |hub: &Hub| {
            hub.read().feeds[Feed::Appointments.index()].by_user[&patient.user_id].capacity()
        };
        assert_eq!(capacity(&hub), 1);
        let _second = join(&hub, patient);
        assert!(capacity(&hub) >= 2);
    }

    #[test]
    fn delivers_to_exactly_the_subscribers_who_may_see_the_row() {
        let hub = started(16);
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
        let hub = started(16);
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
        let hub = started(16);
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
        let hub = started(16);
        let mut admins: Vec<Connection> =
            (0..3).map(|_| join(&hub, principal(Role::Admin))).collect();
        hub.dispatch(&appointment_event(
            3,
            "INSERT",
            None,
            Some((Uuid::new_v4(), Uuid::new_v4())),
        ));
        let frames: Vec<Utf8Bytes> = admins
            .iter_mut()
            .map(|c| c.outbox.try_recv().unwrap().frame)
            .collect();
        assert!(frames.windows(2).all(|w| w[0].as_ptr() == w[1].as_ptr()));
    }

    #[test]
    fn a_socket_that_is_gone_is_not_counted_as_slow() {
        let hub = started(2);
        let Connection { outbox, link, .. } = join(&hub, principal(Role::Admin));
        drop(outbox);
        assert!(
            link.try_send(Bytes::from_static(b"reply")),
            "nothing to cut"
        );
        let Connection {
            outbox: _open,
            link,
            ..
        } = join(&hub, principal(Role::Admin));
        assert!(link.try_send(Bytes::from_static(b"1")));
        assert!(link.try_send(Bytes::from_static(b"2")));
        assert!(
            !link.try_send(Bytes::from_static(b"3")),
            "full: a slow consumer"
        );
    }

    #[test]
    fn a_full_queue_cuts_only_that_socket() {
        let hub = started(2);
        let mut slow = join(&hub, principal(Role::Admin));
        let mut fast = join(&hub, principal(Role::Admin));
        for id in 1..=3 {
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
        // A socket closed as slow by a dispatch and cut by its session too, before the dispatch
        // disconnected it: counted once, by whoever closed it (here, the dispatch, uncounted
        // in this test).
        let other = join(&hub, principal(Role::Admin));
        assert!(other.link.close(Close::slow_consumer()));
        hub.cut(other.id, Close::slow_consumer());
        assert_eq!(hub.counters().slow_consumers_cut.load(Ordering::Relaxed), 1);
        assert_eq!(hub.active_subscriptions(), 1, "disconnected all the same");
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
        let hub = started(4);
        let before = hub.connect(principal(Role::Admin), None);
        hub.close_all(Close::going_away());
        let after = hub.connect(principal(Role::Admin), None);
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
                Start::Live,
                |_| Bytes::new()
            ),
            Err(SubscribeError::Closing)
        ));
    }

    #[test]
    fn refuses_feeds_the_role_may_never_read() {
        let hub = started(4);
        let bot = hub.connect(principal(Role::Chatbot), None);
        for feed in [Feed::ConsultationSessions, Feed::ConsultationMessages] {
            assert!(matches!(
                hub.subscribe(
                    bot.id,
                    feed,
                    Filter::default(),
                    Start::Live,
                    |_| Bytes::new()
                ),
                Err(SubscribeError::Forbidden { .. })
            ));
        }
        assert_eq!(hub.active_subscriptions(), 0);
    }

    #[test]
    fn session_filter_narrows_message_delivery() {
        let hub = started(8);
        let admin = principal(Role::Admin);
        let (wanted, other) = (Uuid::new_v4(), Uuid::new_v4());
        let mut c = hub.connect(admin, None);
        let filter = Filter {
            session_id: Some(wanted),
        };
        hub.subscribe(
            c.id,
            Feed::ConsultationMessages,
            filter,
            Start::Live,
            |_| Bytes::new(),
        )
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
        let hub = started(8);
        let dentist = principal(Role::Dentist);
        let mut c = join(&hub, dentist);
        hub.unsubscribe(c.id, Feed::Appointments, Some(Bytes::from_static(b"bye")));
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
        assert_eq!(hub.subscriptions_of(&dentist).len(), 1);
        let same_user_as_admin = Principal {
            role: Role::Admin,
            ..dentist
        };
        assert!(hub.subscriptions_of(&same_user_as_admin).is_empty());
        hub.disconnect(c2.id);
        hub.disconnect(c.id);
        assert_eq!(hub.snapshot().connected_sockets, 0);
        assert!(hub
            .read()
            .feeds
            .iter()
            .all(|f| f.everyone.is_empty() && f.by_user.is_empty()));
    }

    /// A socket that takes frames directly unless told to refuse them.
    #[derive(Debug, Default)]
    struct Socket {
        written: Mutex<Vec<i64>>,
        busy: std::sync::atomic::AtomicBool,
    }

    impl Direct for Socket {
        fn try_write(&self, outbound: &Outbound) -> bool {
            if self.busy.load(Ordering::SeqCst) {
                return false;
            }
            let cursor = outbound.cursor.expect("only events are written directly");
            self.written.lock().unwrap().push(cursor.0);
            true
        }
    }

    fn queued_ids(connection: &mut Connection) -> Vec<i64> {
        received(connection)
            .iter()
            .map(|frame| frame["id"].as_i64().unwrap())
            .collect()
    }

    #[test]
    fn frames_go_straight_to_the_socket_only_with_nothing_queued_ahead() {
        let hub = started(8);
        let dentist = principal(Role::Dentist);
        let socket = Arc::new(Socket::default());
        let mut c = hub.connect(principal(Role::Admin), Some(socket.clone()));
        hub.subscribe(
            c.id,
            Feed::Appointments,
            Filter::default(),
            Start::Live,
            |_| Bytes::from_static(b"{}"),
        )
        .unwrap();

        // The acknowledgement is still queued: the first event waits behind it.
        assert_eq!(hub.dispatch(&insert(1, &dentist)), 1);
        assert!(socket.written.lock().unwrap().is_empty());
        let queued = received_raw(&mut c);
        assert_eq!(queued.len(), 2);
        assert_eq!(
            serde_json::from_slice::<Value>(&queued[1]).unwrap()["id"],
            1
        );

        // Nothing queued: straight to the socket.
        assert_eq!(hub.dispatch(&insert(2, &dentist)), 1);
        assert_eq!(*socket.written.lock().unwrap(), [2]);
        assert!(queued_ids(&mut c).is_empty());

        // A busy socket: queued; and the next frame, which the socket would take, queues behind it.
        socket.busy.store(true, Ordering::SeqCst);
        hub.dispatch(&insert(3, &dentist));
        socket.busy.store(false, Ordering::SeqCst);
        hub.dispatch(&insert(4, &dentist));
        assert_eq!(*socket.written.lock().unwrap(), [2]);
        assert_eq!(queued_ids(&mut c), [3, 4]);

        // Asked to queue: queued, though the socket would take it; and written again after.
        assert_eq!(hub.dispatch_with(&insert(5, &dentist), Writes::Queued), 1);
        assert_eq!(queued_ids(&mut c), [5]);
        hub.dispatch(&insert(6, &dentist));
        assert_eq!(*socket.written.lock().unwrap(), [2, 6]);

        // Once cut, frames go to the queue, where the writer drops them.
        hub.cut(c.id, Close::going_away());
        hub.dispatch(&insert(7, &dentist));
        assert_eq!(*socket.written.lock().unwrap(), [2, 6]);
    }

    fn received_raw(connection: &mut Connection) -> Vec<Bytes> {
        std::iter::from_fn(|| connection.outbox.try_recv().ok())
            .map(|o| Bytes::from(o.frame))
            .collect()
    }

    fn insert(id: i64, dentist: &Principal) -> Event {
        appointment_event(id, "INSERT", None, Some((Uuid::new_v4(), dentist.user_id)))
    }

    #[test]
    fn live_subscriptions_are_told_the_position_when_theirs_is_older() {
        let hub = started(4);
        let told = |feed: Feed, mark: Mark| Bytes::from(format!("{}@{mark}", feed.as_str()));
        let (dentist, other) = (principal(Role::Dentist), principal(Role::Dentist));
        let mut admin = join(&hub, principal(Role::Admin));
        let mut quiet = join(&hub, other);
        let mut replaying = hub.connect(dentist, None);
        hub.subscribe(
            replaying.id,
            Feed::Appointments,
            Filter::default(),
            Start::After(Cursor(0)),
            |_| Bytes::from_static(b"ack"),
        )
        .unwrap();
        received_raw(&mut replaying);
        // A full queue but for one place: the position waits for room, the event does not.
        let mut busy = join(&hub, principal(Role::Admin));
        for _ in 0..3 {
            assert!(busy.link.try_send(Bytes::from_static(b"queued")));
        }

        hub.dispatch(&insert(5, &dentist));
        assert_eq!(received(&mut admin).len(), 1);
        assert_eq!(
            hub.tell_position(told),
            2,
            "the admin and the quiet dentist"
        );
        let at_5 = Bytes::from(format!("appointments@{}", KEY.mark(5, "t")));
        assert_eq!(received_raw(&mut admin), vec![at_5.clone()]);
        assert_eq!(received_raw(&mut quiet), vec![at_5.clone()]);
        // The replaying subscription's cursor is its replay's.
        assert!(received_raw(&mut replaying).is_empty());
        assert_eq!(
            received_raw(&mut busy).len(),
            4,
            "three queued and the event"
        );

        // Not moved: only the one left untold, now that it has room.
        assert_eq!(hub.tell_position(told), 1);
        assert_eq!(received_raw(&mut busy), vec![at_5.clone()]);
        assert!(received_raw(&mut admin).is_empty());
        assert_eq!(hub.tell_position(told), 0);
        // A resumed subscription gone live holds its resume's cursor: told, though nothing moved.
        // (Its own event 5 waited in its buffer: handed over, then live.)
        while let Drained::Frames(_) = hub.drain_replay(replaying.id, Feed::Appointments, || {
            Bytes::from_static(b"live")
        }) {}
        assert_eq!(
            received_raw(&mut replaying),
            vec![Bytes::from_static(b"live")]
        );
        assert_eq!(hub.tell_position(told), 1);
        assert_eq!(received_raw(&mut replaying), vec![at_5]);

        // A socket asked to close may have missed an event: it is told nothing more.
        quiet.link.close(Close::slow_consumer());
        hub.skip(Cursor(8));
        assert_eq!(hub.tell_position(told), 3);
        assert!(received_raw(&mut quiet).is_empty());
        assert_eq!(
            received_raw(&mut admin),
            vec![Bytes::from_static(b"appointments@8")]
        );
    }

    #[test]
    fn starting_over_closes_every_socket_before_any_is_told_the_new_position() {
        let hub = started(8);
        let admin = principal(Role::Admin);
        hub.dispatch(&insert(20, &admin));
        let mut before = join(&hub, admin);
        let went_back = Close {
            code: close::STATE_LOST,
            reason: "went back".into(),
        };
        hub.start_over_at(KEY.mark(7, "u"), KEY, went_back);
        assert_eq!(hub.mark(), Some(KEY.mark(7, "u")));
        assert!(before.link.is_closing());
        assert_eq!(hub.tell_position(|_, m| Bytes::from(m.to_string())), 0);
        assert!(received_raw(&mut before).is_empty());
        // A socket that connects now starts at the new position.
        let mut after = hub.connect(admin, None);
        let ack = |mark: Mark| Bytes::from(mark.to_string());
        let start = hub.subscribe(
            after.id,
            Feed::Appointments,
            Filter::default(),
            Start::Live,
            ack,
        );
        assert_eq!(start, Ok(Cursor(7)));
        assert_eq!(
            received_raw(&mut after),
            vec![Bytes::from(KEY.mark(7, "u").to_string())]
        );
    }

    #[test]
    fn subscriptions_wait_until_the_position_is_known() {
        let hub = Hub::new(4);
        let c = hub.connect(principal(Role::Admin), None);
        let subscribe = || {
            hub.subscribe(
                c.id,
                Feed::Appointments,
                Filter::default(),
                Start::Live,
                |_| Bytes::new(),
            )
        };
        assert_eq!(subscribe(), Err(SubscribeError::NotReady));
        hub.start_at(Mark::from(Cursor(41)), KEY);
        assert_eq!(subscribe(), Ok(Cursor(41)));
    }

    #[test]
    fn the_ack_names_where_the_subscription_starts() {
        let hub = started(8);
        let admin = principal(Role::Admin);
        hub.dispatch(&insert(5, &admin));
        let mut c = hub.connect(admin, None);
        let ack = |cursor: Mark| Bytes::from(cursor.to_string());
        let subscribe =
            |start| hub.subscribe(c.id, Feed::Appointments, Filter::default(), start, ack);
        assert_eq!(subscribe(Start::Live), Ok(Cursor(5)));
        assert_eq!(subscribe(Start::After(Cursor(2))), Ok(Cursor(5)));
        // Live: at the position, tagged as the event there (its tag tells no time without the
        // key); resumed: at the cursor given.
        assert_eq!(
            received_raw(&mut c),
            vec![Bytes::from(KEY.mark(5, "t").to_string()), Bytes::from("2")]
        );
    }

    #[test]
    fn a_resumed_subscription_holds_live_frames_until_its_replay_is_drained() {
        let hub = started(8);
        let dentist = principal(Role::Dentist);
        hub.dispatch(&insert(10, &dentist));
        let mut c = hub.connect(dentist, None);
        let upto = hub
            .subscribe(
                c.id,
                Feed::Appointments,
                Filter::default(),
                Start::After(Cursor(7)),
                |_| Bytes::from_static(b"ack"),
            )
            .unwrap();
        assert_eq!(upto, Cursor(10), "replay runs up to the position");
        assert_eq!(received_raw(&mut c), vec![Bytes::from_static(b"ack")]);

        // Live events during the replay wait in the subscription's buffer, in order.
        hub.dispatch(&insert(11, &dentist));
        hub.dispatch(&insert(12, &dentist));
        assert!(received_raw(&mut c).is_empty());
        let Drained::Frames(waiting) =
            hub.drain_replay(c.id, Feed::Appointments, || Bytes::from_static(b"live"))
        else {
            panic!("expected the waiting frames");
        };
        let cursors: Vec<_> = waiting.iter().map(|o| o.cursor).collect();
        assert_eq!(cursors, vec![Some(Cursor(11)), Some(Cursor(12))]);

        // Once nothing waits, the subscription is live: the marker, then frames go straight to
        // the socket.
        assert!(matches!(
            hub.drain_replay(c.id, Feed::Appointments, || Bytes::from_static(b"live")),
            Drained::Live
        ));
        hub.dispatch(&insert(13, &dentist));
        let live: Vec<_> = std::iter::from_fn(|| c.outbox.try_recv().ok()).collect();
        assert_eq!(live.len(), 2);
        assert_eq!(live[0].frame, Utf8Bytes::from_static("live"));
        assert_eq!(live[1].cursor, Some(Cursor(13)));
        hub.disconnect(c.id);
        assert!(matches!(
            hub.drain_replay(c.id, Feed::Appointments, || Bytes::from_static(b"live")),
            Drained::Gone
        ));
    }

    #[test]
    fn a_cursor_ahead_of_the_position_skips_what_it_already_has() {
        let hub = started(8);
        let dentist = principal(Role::Dentist);
        let mut c = hub.connect(dentist, None);
        // Resumed from another instance that was further along than this one.
        hub.subscribe(
            c.id,
            Feed::Appointments,
            Filter::default(),
            Start::After(Cursor(3)),
            |_| Bytes::new(),
        )
        .unwrap();
        assert!(matches!(
            hub.drain_replay(c.id, Feed::Appointments, || Bytes::from_static(b"live")),
            Drained::Live
        ));
        assert_eq!(received_raw(&mut c).len(), 2, "the ack and the live marker");
        for id in 1..=4 {
            hub.dispatch(&insert(id, &dentist));
        }
        let cursors: Vec<_> = std::iter::from_fn(|| c.outbox.try_recv().ok())
            .map(|o| o.cursor)
            .collect();
        assert_eq!(cursors, vec![Some(Cursor(4))]);
    }

    #[test]
    fn a_replay_buffer_that_overflows_sends_the_replay_further_instead() {
        let hub = started(2);
        let dentist = principal(Role::Dentist);
        let c = hub.connect(dentist, None);
        hub.subscribe(
            c.id,
            Feed::Appointments,
            Filter::default(),
            Start::After(Cursor(0)),
            |_| Bytes::new(),
        )
        .unwrap();
        for id in 1..=3 {
            hub.dispatch(&insert(id, &dentist));
        }
        assert!(c.closed.borrow().is_none(), "not cut");
        assert!(matches!(
            hub.drain_replay(c.id, Feed::Appointments, Bytes::new),
            Drained::Behind(Cursor(3))
        ));
        assert!(matches!(
            hub.drain_replay(c.id, Feed::Appointments, Bytes::new),
            Drained::Live
        ));
    }

    #[test]
    fn dispatch_advances_the_position() {
        let hub = started(2);
        let admin = principal(Role::Admin);
        hub.dispatch(&insert(3, &admin));
        assert_eq!(hub.mark(), Some(KEY.mark(3, "t")));
        // Past events it never held: the position is no event's, and carries no tag.
        hub.skip(Cursor(9));
        hub.skip(Cursor(4));
        assert_eq!(hub.position(), Some(Cursor(9)));
        assert_eq!(hub.mark(), Some(Mark::from(Cursor(9))));
        hub.dispatch(&insert(10, &admin));
        assert_eq!(hub.mark(), Some(KEY.mark(10, "t")));
        // Started at an event of the log: its tag, as read with the key.
        hub.start_at(KEY.mark(12, "u"), KEY);
        assert_eq!(hub.mark(), Some(KEY.mark(12, "u")));
    }

    /// A replay waiting for room in a socket's queue takes nothing from the live frames of the
    /// socket's other feeds meanwhile: they still find the room there is, and the socket is not
    /// cut as a slow consumer for it.
    #[tokio::test]
    async fn a_replay_waiting_for_room_leaves_the_room_there_is_to_live_frames() {
        let hub = Hub::new(8);
        let mut c = hub.connect(principal(Role::Admin), None);
        for _ in 0..6 {
            assert!(c.link.try_send(Bytes::from_static(b"queued")));
        }
        // Needs half the queue free besides its frame: it waits.
        let replay = {
            let link = c.link.clone();
            tokio::spawn(async move {
                let frame = Outbound::reply(Bytes::from_static(b"replayed"));
                link.send_replayed(frame, Duration::from_secs(10)).await
            })
        };
        tokio::task::yield_now().await;
        assert!(!replay.is_finished());
        assert!(
            c.link.try_send(Bytes::from_static(b"live")),
            "two places were free"
        );
        // The client reads: the replay goes on.
        for _ in 0..7 {
            c.outbox.recv().await.unwrap();
        }
        assert!(matches!(replay.await.unwrap(), Replayed::Queued));
        assert_eq!(&*c.outbox.recv().await.unwrap().frame, "replayed");
    }
}
