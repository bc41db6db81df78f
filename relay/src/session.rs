//! One WebSocket: reading the client's frames and writing what the hub queues for it.
//!
//! Each socket gets two tasks. The reader parses client frames and answers them; the writer drains
//! the socket's outbound queue. They are separate so that a client that stops reading (and so
//! blocks a write) can still be cut at once: the writer races every write against the socket's
//! close signal. A malformed frame gets an `error` frame and the socket stays open.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use warp::ws::{Message, WebSocket};

use crate::authz::{self, Feed, Owners, Principal, Reach};
use crate::hub::{Close, Connection, Hub, Link, SocketId, SubscribeError};
use crate::protocol::{self, close, ClientFrame, ErrorCode, Filter};
use crate::token::Verified;

/// How long a close frame may take to send before the socket is dropped without one. Long enough
/// for a slow reader to drain what its socket already holds and receive the close code.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a subscribe-time check may wait for the database.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a session needs from the running relay.
#[derive(Clone)]
pub struct SessionContext {
    pub hub: Arc<Hub>,
    /// For subscribe-time checks (does a filtered session belong to the caller?).
    pub pool: deadpool_postgres::Pool,
    /// Counts live sessions, so shutdown can wait for them to close.
    pub live: Arc<watch::Sender<usize>>,
}

/// Serves one upgraded socket until either side closes it, or its token expires.
pub async fn run(socket: WebSocket, verified: Verified, context: SessionContext) {
    let principal = verified.principal;
    let span = tracing::info_span!("socket", user = %principal.user_id, role = %principal.role);
    serve(socket, verified, context).instrument(span).await
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

async fn serve(socket: WebSocket, verified: Verified, context: SessionContext) {
    let _live = Live::new(&context.live);
    let principal = verified.principal;
    // Subscriptions never outlive the right to see: the socket closes when the token expires.
    let remaining = verified
        .expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let expiry = tokio::time::sleep(remaining);
    tokio::pin!(expiry);
    let Connection {
        id,
        outbox,
        closed,
        link,
    } = context.hub.connect(principal);
    tracing::debug!(socket = id, "connected");

    let (sink, mut stream) = socket.split();
    let writer = tokio::spawn(write(sink, outbox, closed.clone()).in_current_span());
    let reader = Reader {
        id,
        principal,
        link: link.clone(),
        context: context.clone(),
    };
    let mut closed = closed;
    loop {
        let message = tokio::select! {
            biased;
            _ = closed.wait_for(Option::is_some) => break,
            _ = &mut expiry => {
                link.close(Close {
                    code: close::TOKEN_EXPIRED,
                    reason: "token expired".into(),
                });
                break;
            }
            message = stream.next() => message,
        };
        match message {
            Some(Ok(message)) if message.is_text() => match message.to_str() {
                Ok(text) => reader.handle(text).await,
                Err(()) => reader.reply(protocol::error(
                    None,
                    ErrorCode::BadRequest,
                    "text frame is not UTF-8",
                )),
            },
            Some(Ok(message)) if message.is_binary() => reader.reply(protocol::error(
                None,
                ErrorCode::BadRequest,
                "frames must be JSON text, not binary",
            )),
            Some(Ok(message)) if message.is_close() => break,
            // Pings are answered by the WebSocket layer; pongs need nothing.
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(cause = %e, "socket read failed");
                link.close(close_for(&e));
                break;
            }
            None => break,
        }
    }
    context.hub.disconnect(id);
    link.close(Close {
        code: close::NORMAL,
        reason: "".into(),
    });
    let _ = writer.await;
    tracing::debug!("disconnected");
}

/// The close code for a failed read: the client broke the protocol or a limit.
fn close_for(error: &warp::Error) -> Close {
    use std::error::Error as _;
    use tungstenite::error::Error as WsError;
    let (code, reason) = match error.source().and_then(|s| s.downcast_ref::<WsError>()) {
        Some(WsError::Capacity(_)) => (close::MESSAGE_TOO_BIG, "frame exceeds the size limit"),
        Some(WsError::Utf8(_)) => (close::INVALID_PAYLOAD, "text frame is not UTF-8"),
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

    async fn handle(&self, text: &str) {
        match ClientFrame::parse(text) {
            Err(e) => self.reply(e.to_frame()),
            Ok(ClientFrame::Ping { reference }) => self.reply(protocol::pong(reference.as_deref())),
            Ok(ClientFrame::Unsubscribe { reference, feed }) => {
                let ack = protocol::unsubscribed(reference.as_deref(), feed);
                self.context.hub.unsubscribe(self.id, feed, ack);
            }
            Ok(ClientFrame::Subscribe {
                reference,
                feed,
                filter,
            }) => {
                if let Err((code, message)) = self.check_subscription(feed, &filter).await {
                    self.reply(protocol::error(reference.as_deref(), code, &message));
                    return;
                }
                let ack = protocol::subscribed(reference.as_deref(), feed);
                match self.context.hub.subscribe(self.id, feed, filter, ack) {
                    Ok(()) | Err(SubscribeError::Closing) => {}
                    Err(e @ SubscribeError::Forbidden { .. }) => self.reply(protocol::error(
                        reference.as_deref(),
                        ErrorCode::Forbidden,
                        &e.to_string(),
                    )),
                }
            }
        }
    }

    /// Refuses a feed the role may never read, and a session filter on a session the caller
    /// may not read (one query at subscribe time, never per event).
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
        let Some(session_id) = filter.session_id else {
            return Ok(());
        };
        if reach == Reach::Everything {
            return Ok(());
        }
        let unavailable = |e: &dyn std::fmt::Display| {
            tracing::warn!(cause = %e, "session lookup for a filter failed");
            (
                ErrorCode::Unavailable,
                "could not check the session; try again".to_string(),
            )
        };
        let lookup = async {
            let client = self.context.pool.get().await.map_err(|e| unavailable(&e))?;
            client
                .query_opt(
                    "select patient_id, dentist_id from public.consultation_sessions where id = $1",
                    &[&session_id],
                )
                .await
                .map_err(|e| unavailable(&e))
        };
        let row = tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
            .await
            .map_err(|e| unavailable(&e))??;
        let owners = row.map(|row| Owners {
            patient_id: row.get(0),
            dentist_id: row.get(1),
        });
        match owners {
            Some(owners) if authz::may_see(&self.principal, feed, &owners) => Ok(()),
            // A session that does not exist and one that is someone else's look the same.
            _ => Err((
                ErrorCode::Forbidden,
                format!("session {session_id} is not one of yours"),
            )),
        }
    }
}

/// Writes queued frames until the queue ends or the socket is told to close, then closes it.
async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    mut outbox: mpsc::Receiver<Bytes>,
    mut closed: watch::Receiver<Option<Close>>,
) {
    let reason = loop {
        let frame = tokio::select! {
            biased;
            reason = closed.wait_for(Option::is_some) => break reason.ok().and_then(|r| r.clone()),
            frame = outbox.recv() => match frame {
                Some(frame) => frame,
                None => break None,
            },
        };
        // Frames are rendered from serde_json output, so they are always UTF-8.
        let message = Message::text(String::from_utf8_lossy(&frame).into_owned());
        tokio::select! {
            biased;
            reason = closed.wait_for(Option::is_some) => break reason.ok().and_then(|r| r.clone()),
            sent = sink.send(message) => if sent.is_err() { return },
        }
    };
    let close = match reason {
        Some(Close { code, reason }) => Message::close_with(code, reason),
        None => Message::close(),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.send(close)).await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
}
