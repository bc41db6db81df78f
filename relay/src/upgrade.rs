//! The WebSocket upgrade. It is done here rather than by warp's `ws()` filter so that each
//! socket's buffers can be sized: tungstenite's default read buffer is 128 KiB per socket, zeroed
//! on the first read, which made an idle subscribed socket cost the relay about 140 KiB of
//! resident memory. Clients send small frames (a subscribe is a hundred bytes), so a small
//! buffer that grows for the occasional larger frame serves them as well.

use std::future::Future;

use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};
use warp::http::{header, HeaderValue, StatusCode};
use warp::reject::Reject;
use warp::{Filter, Rejection};

/// An upgraded socket, as the session serves it.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Bytes read from a socket at a time; the buffer grows to hold a larger frame when one comes.
/// Most client frames (subscribe, ping) are about a hundred bytes.
const READ_BUFFER_BYTES: usize = 256;

/// Bytes gathered before a write happens even without a flush.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// A request that is not a WebSocket upgrade (answered 426).
#[derive(Debug)]
pub struct NotAnUpgrade;
impl Reject for NotAnUpgrade {}

/// A valid upgrade request, not yet answered.
pub struct Upgrade {
    key: String,
    on_upgrade: OnUpgrade,
}

/// Accepts a WebSocket upgrade request (version 13); anything else is [`NotAnUpgrade`].
pub fn upgrade() -> impl Filter<Extract = (Upgrade,), Error = Rejection> + Clone {
    warp::header::optional::<String>("connection")
        .and(warp::header::optional::<String>("upgrade"))
        .and(warp::header::optional::<String>("sec-websocket-version"))
        .and(warp::header::optional::<String>("sec-websocket-key"))
        .and(warp::ext::optional::<OnUpgrade>())
        .and_then(
            |connection: Option<String>,
             upgrade: Option<String>,
             version: Option<String>,
             key: Option<String>,
             on_upgrade: Option<OnUpgrade>| async move {
                let connection = connection.is_some_and(|value| {
                    value
                        .split(',')
                        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
                });
                let websocket =
                    upgrade.is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
                match (connection && websocket, version.as_deref(), key, on_upgrade) {
                    (true, Some("13"), Some(key), Some(on_upgrade)) => {
                        Ok(Upgrade { key, on_upgrade })
                    }
                    _ => Err(warp::reject::custom(NotAnUpgrade)),
                }
            },
        )
}

/// The socket settings: a small read buffer, frames gathered until the session flushes them
/// (so a burst of frames for one socket is one write), and the configured limit on what a client
/// may send.
pub fn config(max_frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes))
}

impl Upgrade {
    /// Answers 101 and, once the connection has switched protocols, serves the socket.
    pub fn reply<F, Fut>(self, config: WebSocketConfig, serve: F) -> warp::reply::Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let io = TokioIo::new(upgraded);
                    serve(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await)
                        .await
                }
                Err(e) => tracing::debug!(cause = %e, "the upgrade did not complete"),
            }
        });
        let mut response = warp::reply::Response::default();
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}
