//! A socket shared by the session's two tasks and the hub's dispatch.
//!
//! Most frames are written by the dispatch itself, at once: when the socket has nothing queued
//! and nothing unflushed, the frame goes to the socket in the same call that decided who receives
//! it ([`Outlet::try_write`]), a non-blocking write that either completes or leaves the rest for
//! the writer. That saves, per delivery, a wake-up of the socket's writer task and a hand-over to
//! another thread, which at tens of thousands of deliveries a second were a large share of the
//! relay's CPU and of its latency.
//!
//! Everything else goes through the socket's queue and its writer task ([`Outlet::pump`]): replies,
//! replays, and every frame that finds the socket busy (its queue not empty, a write not finished,
//! another task holding it). Order is kept because frames leave the queue only under the outlet's
//! lock, straight into the socket's buffer, and the dispatch writes directly only while holding
//! that lock and only when the queue is empty: a frame never overtakes one queued before it.

use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use futures::{Sink, Stream};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tungstenite::Message;

use crate::hub::{Direct, Outbound, Room};
use crate::protocol::Cursor;
use crate::upgrade::Socket;

/// Most queued frames one write to a socket carries before the writer yields.
const BATCH_FRAMES: usize = 64;

/// Why [`Outlet::pump`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    /// The queue ended (its senders are gone) and everything was flushed.
    Ended,
    /// The socket failed; nothing more can be written.
    Failed,
}

/// The socket, for reading and writing.
pub struct Outlet {
    state: Mutex<State>,
    /// Wakes a replay waiting for room in the socket's queue as the writer takes frames.
    room: Room,
}

struct State {
    socket: Socket,
    /// Frames handed to the socket are not all written yet: the writer finishes them, and nothing
    /// is written directly until it has.
    unflushed: bool,
    /// The writer is closing the socket: every frame goes to the queue, which decides.
    closing: bool,
    /// The cursor of the last event frame handed to the socket.
    last_cursor: Option<Cursor>,
    /// Wakes the writer task, to finish a write the dispatch began.
    writer: Option<Waker>,
}

impl std::fmt::Debug for Outlet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outlet").finish_non_exhaustive()
    }
}

impl Outlet {
    pub fn new(socket: Socket) -> Outlet {
        Outlet {
            state: Mutex::new(State {
                socket,
                unflushed: false,
                closing: false,
                last_cursor: None,
                writer: None,
            }),
            room: Room::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next frame from the client.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<tungstenite::Result<Message>>> {
        Pin::new(&mut self.lock().socket).poll_next(cx)
    }

    /// The next frame from the client.
    pub async fn next(&self) -> Option<tungstenite::Result<Message>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Reads and discards the client's input beneath the WebSocket layer, until the client closes
    /// the connection or it fails. After a read error the WebSocket layer reads nothing more, and
    /// a connection closed with input unread is reset rather than closed, which can lose the
    /// close frame on its way to the client.
    pub async fn discard_input(&self) {
        let mut scratch = vec![0u8; 4096];
        std::future::poll_fn(|cx| {
            let mut state = self.lock();
            loop {
                let mut buffer = ReadBuf::new(&mut scratch);
                match Pin::new(state.socket.get_mut()).poll_read(cx, &mut buffer) {
                    Poll::Ready(Ok(())) if buffer.filled().is_empty() => return Poll::Ready(()),
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }

    /// The writer's work: moves queued frames into the socket and writes them out, until the
    /// queue ends or the socket fails. Pending while there is nothing to do, or while the client
    /// is not reading.
    pub fn pump(
        &self,
        outbox: &mut mpsc::Receiver<Box<Outbound>>,
        cx: &mut Context<'_>,
    ) -> Poll<Pumped> {
        let mut guard = self.lock();
        let state = &mut *guard;
        if !state
            .writer
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.writer = Some(cx.waker().clone());
        }
        let mut socket = Pin::new(&mut state.socket);
        let mut taken = 0;
        let ended = loop {
            if taken == BATCH_FRAMES {
                break false;
            }
            match socket.as_mut().poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(Pumped::Failed),
                // The client is not reading: wait until the socket takes more.
                Poll::Pending => {
                    if taken > 0 {
                        self.room.taken();
                    }
                    return Poll::Pending;
                }
            }
            match outbox.poll_recv(cx) {
                Poll::Ready(Some(frame)) => {
                    if socket
                        .as_mut()
                        .start_send(Message::Text(frame.frame))
                        .is_err()
                    {
                        return Poll::Ready(Pumped::Failed);
                    }
                    state.last_cursor = frame.cursor.or(state.last_cursor);
                    state.unflushed = true;
                    taken += 1;
                }
                Poll::Ready(None) => break true,
                Poll::Pending => break false,
            }
        };
        // Room in the queue, whether or not the socket takes the frames at once.
        if taken > 0 {
            self.room.taken();
        }
        if state.unflushed {
            match socket.as_mut().poll_flush(cx) {
                Poll::Ready(Ok(())) => state.unflushed = false,
                Poll::Ready(Err(_)) => return Poll::Ready(Pumped::Failed),
                Poll::Pending => return Poll::Pending,
            }
        }
        if ended {
            return Poll::Ready(Pumped::Ended);
        }
        if taken == BATCH_FRAMES {
            // More may be queued, and no wake-up is registered for it: come back after others.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// From now on every frame goes through the queue; returns the cursor of the last event frame
    /// handed to the socket.
    pub fn close(&self) -> Option<Cursor> {
        let mut state = self.lock();
        state.closing = true;
        state.last_cursor
    }

    /// Hands one frame to the socket and flushes it (waiting until the socket takes it).
    pub fn poll_send(&self, frame: &mut Option<Message>, cx: &mut Context<'_>) -> Poll<bool> {
        let mut state = self.lock();
        let mut socket = Pin::new(&mut state.socket);
        if frame.is_some() {
            match socket.as_mut().poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Pending => return Poll::Pending,
            }
            if let Some(message) = frame.take() {
                if socket.as_mut().start_send(message).is_err() {
                    return Poll::Ready(false);
                }
            }
        }
        socket.poll_flush(cx).map(|flushed| flushed.is_ok())
    }

    /// Hands `frame` to the socket (if any) and writes everything out.
    pub async fn send(&self, frame: Option<Message>) -> bool {
        let mut frame = frame;
        std::future::poll_fn(|cx| self.poll_send(&mut frame, cx)).await
    }

    /// Closes the socket's sending side.
    pub async fn shut(&self) {
        let _ = std::future::poll_fn(|cx| Pin::new(&mut self.lock().socket).poll_close(cx)).await;
    }
}

impl Direct for Outlet {
    fn room(&self) -> Option<&Room> {
        Some(&self.room)
    }

    fn try_write(&self, outbound: &Outbound) -> bool {
        let Ok(mut guard) = self.state.try_lock() else {
            return false;
        };
        let state = &mut *guard;
        if state.unflushed || state.closing {
            return false;
        }
        // Nothing here waits: a write that cannot finish now is left to the writer, woken below.
        let mut cx = Context::from_waker(Waker::noop());
        let mut socket = Pin::new(&mut state.socket);
        if !matches!(socket.as_mut().poll_ready(&mut cx), Poll::Ready(Ok(()))) {
            return false;
        }
        if socket
            .as_mut()
            .start_send(Message::Text(outbound.frame.clone()))
            .is_err()
        {
            // The socket failed; its reader and writer see it too and end the session.
            return true;
        }
        state.last_cursor = outbound.cursor.or(state.last_cursor);
        if !matches!(socket.poll_flush(&mut cx), Poll::Ready(Ok(()))) {
            state.unflushed = true;
            if let Some(writer) = &state.writer {
                writer.wake_by_ref();
            }
        }
        true
    }
}
