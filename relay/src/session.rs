//! One WebSocket: reading the client's frames and writing what the hub queues for it.
//!
//! Each socket gets two tasks. The reader parses client frames and answers them; the writer drains
//! the socket's outbound queue (most event frames never wait there: the hub's dispatch writes them
//! itself, see [`crate::outlet`]). They are separate so that a client that stops reading (and so
//! blocks a write) can still be cut at once: the writer races every write against the socket's
//! close signal. A malformed frame gets an `error` frame and the socket stays open.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, Utf8Bytes};
use uuid::Uuid;

use crate::authz::{self, Feed, Owners, Principal, Reach, Role};
use crate::config::Limits;
use crate::consult;
use crate::db::{self, ClientPool};
use crate::hub::{
    self, Close, Connection, Drained, Hub, Link, Outbound, Replayed, SocketId, Start,
    SubscribeError, View,
};
use crate::limits::{FrameRate, Ticket};
use crate::log;
use crate::outlet::{Outlet, Pumped};
use crate::presence::{Presence, Scope};
use crate::protocol::{self, close, ClientFrame, Cursor, ErrorCode, Filter, Mark};
use crate::token::{RawToken, Verified, Verifier};
use crate::upgrade::Socket;

/// How long a close frame may take to send before the socket is dropped without one. Long enough
/// for a slow reader to drain what its socket already holds and receive the close code.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a replay waits for room in its socket's queue before cutting the socket as a slow
/// consumer. A client that takes not one frame in this time has stopped reading; live frames of
/// the feed being replayed wait in the replay's buffer meanwhile, and could never fill the queue.
const REPLAY_STALL: Duration = Duration::from_secs(10);
/// Events read from the log per replay query.
const REPLAY_PAGE: i64 = 2000;
/// Ids of the log one replay query looks through at most. A replay reads one feed, and the log
/// is indexed by id only: a feed that rarely changes, resumed across millions of other feeds'
/// events, is read window by window, each query short, instead of in one scan that could outlast
/// the query timeout.
const REPLAY_WINDOW: i64 = 1_000_000;

/// What a session needs from the running relay.
#[derive(Clone)]
pub struct SessionContext {
    pub hub: Arc<Hub>,
    /// For clients' database work: subscribe-time checks (does a filtered session belong to the
    /// caller?), replays, sends and history, each user within their share.
    pub db: ClientPool,
    /// Counts live sessions, so shutdown can wait for them to close.
    pub live: Arc<watch::Sender<usize>>,
    /// Verifies the fresh tokens of `auth` frames.
    pub verifier: Arc<Verifier>,
    pub limits: Arc<Limits>,
    /// Who is connected to which consultation session.
    pub presence: Arc<Presence>,
}

/// Serves one upgraded socket until either side closes it, or its token expires. The ticket
/// holds the socket's place under the socket limits until it ends.
pub async fn run(socket: Socket, verified: Verified, context: SessionContext, ticket: Ticket) {
    let principal = verified.principal;
    let span = tracing::info_span!("socket", user = %principal.user_id, role = %principal.role);
    serve(socket, verified, context).instrument(span).await;
    drop(ticket);
}

/// Counts a session as live for as long as it exists, however it ends.
struct Live(Arc<watch::Sender<usize>>);

impl Live {
    fn new(live: &Arc<watch::Sender<usize>>) -> Live {
        live.send_modify(|n| *n += 1);
        Live(live.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

async fn serve(socket: Socket, verified: Verified, context: SessionContext) {
    let _live = Live::new(&context.live);
    let principal = verified.principal;
    // Subscriptions never outlive the right to see: the socket closes when the token expires,
    // unless an `auth` frame brings a fresh one first.
    let expiry = tokio::time::sleep(until(verified.expires_at));
    tokio::pin!(expiry);
    let outlet = Arc::new(Outlet::new(socket));
    let Connection {
        id,
        outbox,
        closed,
        link,
    } = context.hub.connect(principal, Some(outlet.clone()));
    tracing::debug!(socket = id, "connected");

    let writer = tokio::spawn(write(outlet.clone(), outbox, closed.clone()).in_current_span());
    // However serving ends, even by a panic, the hub forgets the socket and its writer stops.
    let leave = Leave {
        hub: context.hub.clone(),
        presence: context.presence.clone(),
        id,
        link: link.clone(),
    };
    let reader = Reader {
        id,
        principal,
        link: link.clone(),
        context: context.clone(),
    };
    let mut rate = FrameRate::new(context.limits.max_frames_per_second, Instant::now());
    let mut closed = closed;
    // The socket's input failed (too big, not UTF-8, not WebSocket): it cannot be read further.
    let mut unreadable = false;
    let token_expired = || Close {
        code: close::TOKEN_EXPIRED,
        reason: "token expired".into(),
    };
    loop {
        let message = tokio::select! {
            biased;
            _ = closed.wait_for(Option::is_some) => break,
            _ = &mut expiry => {
                link.close(token_expired());
                break;
            }
            message = outlet.next() => message,
        };
        if message.is_some() && !rate.allow(Instant::now()) {
            link.close(Close {
                code: close::RATE_LIMITED,
                reason: format!(
                    "more than {} frames per second",
                    context.limits.max_frames_per_second
                )
                .into(),
            });
            break;
        }
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                reader.reply(protocol::error(
                    None,
                    ErrorCode::BadRequest,
                    "frames must be JSON text, not binary",
                ));
                continue;
            }
            Some(Ok(Message::Close(_))) => break,
            // Pings are answered by the WebSocket layer; pongs need nothing.
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                tracing::debug!(cause = %e, "socket read failed");
                link.close(close_for(&e));
                unreadable = true;
                break;
            }
            None => break,
        };
        // A frame's work (a replay may take a while) never outlives the token or the socket.
        let outcome = tokio::select! {
            biased;
            _ = closed.wait_for(Option::is_some) => break,
            _ = &mut expiry => {
                link.close(token_expired());
                break;
            }
            // Boxed: a frame's work (a replay, above all) is large, and an idle socket should
            // not carry room for it.
            outcome = Box::pin(reader.handle(&text)) => outcome,
        };
        rate.resume(Instant::now());
        match outcome {
            Outcome::Continue => {}
            Outcome::Reauthenticated(expires_at) => {
                let now = tokio::time::Instant::now();
                // Tokens expire before the year 10000, so this cannot overflow; if it did, the
                // socket would close rather than outlive its token.
                let at = now.checked_add(until(expires_at)).unwrap_or(now);
                expiry.as_mut().reset(at);
            }
            Outcome::Close(reason) => {
                link.close(reason);
                break;
            }
        }
    }
    drop(leave);
    // When the client's own input closed the socket (too fast, too big, malformed, another
    // identity), more of it may be in flight: keep reading and discarding it until the client
    // answers the close frame, or for at most the close timeout. Closing with input unread would
    // turn the close into a TCP reset, and the client could lose the close frame and its code.
    let code = closed.borrow().as_ref().map(|reason| reason.code);
    let provoked = matches!(
        code,
        Some(
            close::RATE_LIMITED
                | close::MESSAGE_TOO_BIG
                | close::PROTOCOL_ERROR
                | close::INVALID_PAYLOAD
                | close::IDENTITY_CHANGED
        )
    );
    if provoked && unreadable {
        // Past a read error the WebSocket layer reads nothing more: the rest is discarded
        // beneath it, until the client closes the connection.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, outlet.discard_input()).await;
    } else if provoked {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while let Some(Ok(message)) = outlet.next().await {
                if message.is_close() {
                    break;
                }
            }
        })
        .await;
    }
    let _ = writer.await;
    tracing::debug!("disconnected");
}

/// Removes a socket from the hub and closes it (normally, unless a reason was given) when the
/// session ends.
struct Leave {
    hub: Arc<Hub>,
    presence: Arc<Presence>,
    id: SocketId,
    link: Link,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.presence.leave(self.id);
        self.hub.disconnect(self.id);
        self.link.close(Close {
            code: close::NORMAL,
            reason: "".into(),
        });
    }
}

/// How long until `at`; zero if it has passed.
fn until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now()).unwrap_or_default()
}

/// What the socket does after a client frame.
enum Outcome {
    Continue,
    /// A fresh token was accepted: the socket now lives until then.
    Reauthenticated(SystemTime),
    Close(Close),
}

/// The close code for a failed read: the client broke the protocol or a limit.
fn close_for(error: &tungstenite::Error) -> Close {
    use tungstenite::Error as WsError;
    let (code, reason) = match error {
        WsError::Capacity(_) => (close::MESSAGE_TOO_BIG, "frame exceeds the size limit"),
        WsError::Utf8(_) => (close::INVALID_PAYLOAD, "text frame is not UTF-8"),
        _ => (close::PROTOCOL_ERROR, "protocol error"),
    };
    Close {
        code,
        reason: reason.into(),
    }
}

struct Reader {
    id: SocketId,
    principal: Principal,
    link: Link,
    context: SessionContext,
}

impl Reader {
    /// Queues a reply; a client whose queue is full is cut as a slow consumer.
    fn reply(&self, frame: Bytes) {
        if !self.link.try_send(frame) {
            self.context.hub.cut(self.id, Close::slow_consumer());
        }
    }

    async fn handle(&self, text: &str) -> Outcome {
        match ClientFrame::parse(text) {
            Err(e) => self.reply(e.to_frame()),
            Ok(ClientFrame::Ping { reference }) => self.reply(protocol::pong(reference.as_deref())),
            Ok(ClientFrame::Auth { reference, token }) => {
                return self.reauthenticate(reference.as_deref(), &token)
            }
            Ok(ClientFrame::Unsubscribe { reference, feed }) => {
                let ack = protocol::unsubscribed(reference.as_deref(), feed);
                self.context.hub.unsubscribe(self.id, feed, Some(ack));
                if feed == Feed::ConsultationMessages {
                    self.context.presence.leave(self.id);
                }
            }
            Ok(ClientFrame::Send {
                reference,
                session_id,
                body,
                client_id,
            }) => {
                let db = &self.context.db;
                let reply =
                    match consult::send(db, &self.principal, session_id, &body, client_id).await {
                        Ok(id) => protocol::sent(reference.as_deref(), id, client_id),
                        Err(refusal) => {
                            protocol::error(reference.as_deref(), refusal.code, &refusal.message)
                        }
                    };
                self.reply(reply);
            }
            Ok(ClientFrame::Subscribe {
                reference,
                feed,
                filter,
                since,
            }) => {
                self.subscribe(reference.as_deref(), feed, filter, since)
                    .await
            }
        }
        Outcome::Continue
    }

    /// Replaces the socket's token. A token for another user or role closes the socket: a
    /// socket's subscriptions were authorized for one identity.
    fn reauthenticate(&self, reference: Option<&str>, token: &RawToken) -> Outcome {
        match self.context.verifier.verify(&token.0) {
            Err(e) => {
                // The socket keeps its current token, and closes when that one expires.
                self.reply(protocol::error(
                    reference,
                    ErrorCode::from(&e),
                    &e.to_string(),
                ));
                Outcome::Continue
            }
            Ok(verified) if verified.principal != self.principal => {
                self.reply(protocol::error(
                    reference,
                    ErrorCode::IdentityChanged,
                    "the token is for another user or role; a socket keeps the identity it \
                     was opened with, so open a new socket for this one",
                ));
                Outcome::Close(Close {
                    code: close::IDENTITY_CHANGED,
                    reason: "token for another user or role".into(),
                })
            }
            Ok(verified) => {
                self.reply(protocol::authenticated(reference, verified.expires_at));
                Outcome::Reauthenticated(verified.expires_at)
            }
        }
    }

    async fn subscribe(
        &self,
        reference: Option<&str>,
        feed: Feed,
        filter: Filter,
        since: Option<Mark>,
    ) {
        if let Err((code, message)) = self.check_subscription(feed, &filter).await {
            self.reply(protocol::error(reference, code, &message));
            return;
        }
        if let Some(cursor) = since {
            if let Err((code, message)) = self.check_cursor(cursor).await {
                self.reply(protocol::error(reference, code, &message));
                return;
            }
        }
        let start = since.map_or(Start::Live, |since| Start::After(since.position));
        // A resumed subscription starts at its cursor, as the client sent it; a live one at the
        // relay's position, tagged as the event there when the relay knows it (the tag, keyed,
        // tells nothing of an event the client may not see).
        let ack = |start| protocol::subscribed(reference, feed, since.unwrap_or(start));
        let position = match self
            .context
            .hub
            .subscribe(self.id, feed, filter, start, ack)
        {
            Ok(position) => position,
            Err(SubscribeError::Closing) => return,
            Err(e @ SubscribeError::Forbidden { .. }) => {
                self.reply(protocol::error(
                    reference,
                    ErrorCode::Forbidden,
                    &e.to_string(),
                ));
                return;
            }
            Err(e @ SubscribeError::NotReady) => {
                self.reply(protocol::error(
                    reference,
                    ErrorCode::Unavailable,
                    &format!("{e}; try again"),
                ));
                return;
            }
        };
        if feed == Feed::ConsultationMessages {
            if let Err((code, message)) = self.watch_presence(filter).await {
                // Presence could not be set up: end the subscription, and say why (the client
                // subscribes again, as after a replay that failed).
                self.context.hub.unsubscribe(self.id, feed, None);
                self.context.presence.leave(self.id);
                self.reply(protocol::error(reference, code, &message));
                return;
            }
        }
        if let Some(Mark {
            position: cursor, ..
        }) = since
        {
            let view = View {
                principal: self.principal,
                filter,
            };
            let replayed = self.replay(feed, view, cursor, position, reference).await;
            if let Err((code, message)) = replayed {
                // The subscription cannot be completed: end it, and say why.
                self.context.hub.unsubscribe(self.id, feed, None);
                if feed == Feed::ConsultationMessages {
                    self.context.presence.leave(self.id);
                }
                self.reply(protocol::error(reference, code, &message));
            }
        }
    }

    /// A `consultation_messages` subscription watches presence: of the session its filter names,
    /// or, unfiltered, of every open session of its patient or dentist (admins watch presence only
    /// of a session they name). What it watched before is replaced.
    async fn watch_presence(&self, filter: Filter) -> Result<(), (ErrorCode, String)> {
        let presence = &self.context.presence;
        let (link, principal) = (self.link.clone(), self.principal);
        let Some(session) = filter.session_id else {
            if principal.role == Role::Admin {
                presence.leave(self.id);
            } else {
                presence.watch(self.id, link, principal, Scope::OwnOpenSessions);
            }
            return Ok(());
        };
        presence.watch(self.id, link, principal, Scope::Session(session));
        if principal.role == Role::Admin {
            return Ok(());
        }
        // Presence knows the participants of open sessions, and follows every session named in
        // a filter through its events. For a session it knew nothing of, they are read now that
        // presence follows the socket: a hand-over dispatched from here on is seen, and one
        // committed before the read is in it. Until then the socket is not in the session's
        // presence, so it learns nothing of a session that is no longer its own.
        if presence.knows(session) {
            return Ok(());
        }
        let owners = self.session_owners(session).await?;
        presence.owners_read(session, owners);
        Ok(())
    }

    /// A session's participants (None: no such session), within the lookup timeout.
    async fn session_owners(&self, session: Uuid) -> Result<Option<Owners>, (ErrorCode, String)> {
        let user = self.principal.user_id;
        let lease = self.context.db.get(user).await.map_err(not_leased)?;
        db::bounded(lease, |client| {
            Box::pin(async move { consult::owners(&***client, session).await })
        })
        .await
        .map_err(|e| unavailable(&e))?
        .map_err(|e| unavailable(&e))
    }

    /// Refuses a cursor that cannot be resumed from: older than retention, not from this
    /// database, or naming an event the log no longer holds as it was (it went back).
    async fn check_cursor(&self, cursor: Mark) -> Result<(), (ErrorCode, String)> {
        let user = self.principal.user_id;
        let lease = self.context.db.get(user).await.map_err(not_leased)?;
        let bounds = db::bounded(lease, |client| {
            Box::pin(async move { log::bounds(&***client, cursor).await })
        })
        .await
        .map_err(|e| unavailable(&e))?
        .map_err(|e| unavailable(&e))?;
        if bounds.admits(cursor) {
            Ok(())
        } else {
            Err(expired(cursor))
        }
    }

    /// Queues a replayed frame; false when the socket closed, or was cut because its client
    /// stopped reading.
    async fn send_replayed(&self, outbound: Outbound) -> bool {
        match self.link.send_replayed(outbound, REPLAY_STALL).await {
            Replayed::Queued => true,
            Replayed::Gone => false,
            Replayed::Stalled => {
                self.context.hub.cut(self.id, Close::slow_consumer());
                false
            }
        }
    }

    /// Sends, in order, the events of `feed` after `cursor` up to `upto` that this subscriber
    /// may see, then the live frames that arrived meanwhile, and makes the subscription live.
    /// When more live frames arrive than the buffer holds, the replay reads further in the log.
    async fn replay(
        &self,
        feed: Feed,
        view: View,
        cursor: Cursor,
        mut upto: Cursor,
        reference: Option<&str>,
    ) -> Result<(), (ErrorCode, String)> {
        let hub = &self.context.hub;
        let key = hub.key();
        let mut after = cursor;
        let mut replayed = 0u64;
        // Reads one page of the log, within one window of ids, and says where the window ends;
        // spawned, so that the next page is read while this one is decoded and sent.
        let fetch = |after: Cursor, upto: Cursor| {
            let db = self.context.db.clone();
            let user = self.principal.user_id;
            let end = Cursor(upto.0.min(after.0.saturating_add(REPLAY_WINDOW)));
            let read = async move {
                let lease = db.get(user).await.map_err(not_leased)?;
                db::bounded(lease, |client| {
                    Box::pin(async move {
                        log::read_range_raw(&***client, after, end, Some(feed), REPLAY_PAGE).await
                    })
                })
                .await
                .map_err(|e| unavailable(&e))?
                .map(|page| (page, end))
                .map_err(|e| unavailable(&e))
            };
            tokio::spawn(read.in_current_span())
        };
        loop {
            let mut pending = (after < upto).then(|| fetch(after, upto));
            while let Some(reading) = pending.take() {
                let (page, end) = reading.await.map_err(|e| unavailable(&e))??;
                if !page.is_complete_after(after) {
                    return Err(expired(cursor));
                }
                // A full page goes on after its last event; otherwise the window was read
                // through. The next page is asked for before this one is decoded.
                let next = match page.last {
                    Some(last) if page.more => last,
                    _ => end,
                };
                pending = (next < upto).then(|| fetch(next, upto));
                for (id, event) in page.decode().events {
                    let event = match event {
                        Ok(event) => event,
                        Err(cause) => {
                            hub.skip_malformed(&cause);
                            continue;
                        }
                    };
                    let Some(frame) = view.frame(&event, &key) else {
                        continue;
                    };
                    let outbound = Outbound {
                        frame: hub::text(frame),
                        cursor: Some(id),
                    };
                    if !self.send_replayed(outbound).await {
                        return Ok(());
                    }
                    replayed += 1;
                    // Counted as each is queued, so a replay cut short counts what it sent.
                    hub.counters()
                        .replayed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                after = next;
            }
            match hub.drain_replay(self.id, feed, || protocol::live(reference, feed)) {
                Drained::Frames(frames) => {
                    for outbound in frames {
                        after = outbound.cursor.unwrap_or(after);
                        if !self.send_replayed(outbound).await {
                            return Ok(());
                        }
                    }
                    upto = after;
                }
                Drained::Behind(position) => upto = position,
                Drained::Live | Drained::Gone => break,
            }
        }
        hub.counters()
            .replays
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(%feed, %cursor, %upto, replayed, "replayed, now live");
        Ok(())
    }

    /// Refuses a feed the role may never read, a subscription beyond the socket's limit, and a
    /// session filter on a session the caller may not read (one query at subscribe time, never
    /// per event).
    async fn check_subscription(
        &self,
        feed: Feed,
        filter: &Filter,
    ) -> Result<(), (ErrorCode, String)> {
        let role = self.principal.role;
        let reach = authz::reach(role, feed);
        if reach == Reach::Nothing {
            return Err((
                ErrorCode::Forbidden,
                format!("role {role} may not read {feed}"),
            ));
        }
        let max = self.context.limits.max_subscriptions_per_socket;
        let (held, replacing) = self.context.hub.subscriptions_held(self.id, feed);
        if !replacing && held >= max {
            return Err((
                ErrorCode::TooManySubscriptions,
                format!("a socket may hold {max} subscriptions; unsubscribe one first"),
            ));
        }
        let Some(session_id) = filter.session_id else {
            return Ok(());
        };
        if reach == Reach::Everything {
            return Ok(());
        }
        match self.session_owners(session_id).await? {
            Some(owners) if authz::may_see(&self.principal, feed, &owners) => Ok(()),
            // A session that does not exist and one that is someone else's look the same.
            _ => Err((
                ErrorCode::Forbidden,
                format!("session {session_id} is not one of yours"),
            )),
        }
    }
}

/// The database could not answer a subscribe-time question.
/// No connection for the user's work: the user's own requests held all of theirs, or the pool
/// had none.
fn not_leased(error: db::GetError) -> (ErrorCode, String) {
    match error {
        db::GetError::Busy(..) => (
            ErrorCode::Unavailable,
            format!("{error}; try again once they are answered"),
        ),
        other => unavailable(&other),
    }
}

fn unavailable(cause: &(dyn std::error::Error + 'static)) -> (ErrorCode, String) {
    tracing::warn!(cause = %crate::Causes(cause), "a subscribe-time query failed");
    (
        ErrorCode::Unavailable,
        "the relay could not reach the database; try again".to_string(),
    )
}

fn expired(cursor: impl std::fmt::Display) -> (ErrorCode, String) {
    (
        ErrorCode::CursorExpired,
        format!(
            "cursor {cursor} is older than the event log's retention, or not from this database \
             or from before it was restored; fetch current state and subscribe without `since`"
        ),
    )
}

/// Writes queued frames until the queue ends or the socket is told to close, then closes it.
async fn write(
    outlet: Arc<Outlet>,
    mut outbox: mpsc::Receiver<Box<Outbound>>,
    mut closed: watch::Receiver<Option<Close>>,
) {
    let reason = {
        let closing = closed.wait_for(Option::is_some);
        tokio::pin!(closing);
        tokio::select! {
            biased;
            reason = &mut closing => reason.ok().and_then(|r| r.clone()),
            pumped = std::future::poll_fn(|cx| outlet.pump(&mut outbox, cx)) => match pumped {
                Pumped::Ended => None,
                Pumped::Failed => return,
            },
        }
    };
    // The cursor of the last event frame handed to the socket, named when it is cut as slow.
    let last_cursor = outlet.close();
    // Replies queued before the close (the error that explains it) go out first, within the
    // close timeout; a slow consumer's backlog and frames after a token's expiry do not.
    let flush = reason
        .as_ref()
        .is_some_and(|r| r.code != close::SLOW_CONSUMER && r.code != close::TOKEN_EXPIRED);
    if flush {
        let pending = async {
            while let Ok(frame) = outbox.try_recv() {
                if !outlet.send(Some(Message::Text(frame.frame))).await {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, pending).await;
    }
    let close_with = |code: u16, reason: String| {
        Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from(reason),
        }))
    };
    let close = match reason {
        Some(Close { code, reason }) => match last_cursor {
            Some(cursor) if code == close::SLOW_CONSUMER => {
                close_with(code, format!("{reason}; last cursor sent {cursor}"))
            }
            _ => close_with(code, reason.into_owned()),
        },
        None => Message::Close(None),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, outlet.send(Some(close))).await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, outlet.shut()).await;
}
