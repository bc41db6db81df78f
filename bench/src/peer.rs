//! The peers the relay is measured against on the same machine, in place of the relay: the
//! same database, triggers, writers, sockets and accounting, another server. `bench/peer/`
//! holds them; `npm ci --prefix bench/peer` installs what they need.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A server other than the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    /// A plain Socket.IO 4.8 + pg-listen relay (`bench/peer/socketio.js`): the JWT checked at
    /// connect, a room per user and one for admins, no per-row authorization, no replay.
    Socketio,
}

impl Peer {
    /// What the results name as the server measured.
    pub fn describe(self) -> &'static str {
        match self {
            Peer::Socketio => "Socket.IO 4.8 + pg-listen (bench/peer/socketio.js)",
        }
    }

    /// The script that runs it, in the peers' directory.
    pub fn script(self, dir: &Path) -> PathBuf {
        match self {
            Peer::Socketio => dir.join("socketio.js"),
        }
    }
}

/// Where the peers live in this checkout.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peer")
}

/// Engine.IO 4's open packet, which the server sends first on a WebSocket.
pub const OPEN: char = '0';
/// Socket.IO's CONNECT to the main namespace, as the client sends it.
pub const CONNECT: &str = "40";
/// The server's ping, and the client's pong to it.
pub const PING: &str = "2";
pub const PONG: &str = "3";

/// What a Socket.IO frame from the server is, as far as a benchmark client cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Open,
    /// The namespace accepted the socket: it is in its room.
    Connected,
    /// The namespace refused the socket (the middleware's error).
    Refused(&'a str),
    Ping,
    /// An `event` emitted to the socket: its argument, the JSON of an event frame.
    Event(&'a str),
    Other,
}

/// Reads a text frame of the Socket.IO protocol (v5, over Engine.IO v4).
pub fn frame(text: &str) -> Frame<'_> {
    if let Some(event) = text
        .strip_prefix(r#"42["event","#)
        .and_then(|rest| rest.strip_suffix(']'))
    {
        return Frame::Event(event);
    }
    if text == PING {
        return Frame::Ping;
    }
    if text.starts_with("40") {
        return Frame::Connected;
    }
    if let Some(error) = text.strip_prefix("44") {
        return Frame::Refused(error);
    }
    if text.starts_with(OPEN) {
        return Frame::Open;
    }
    Frame::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_frames_a_socket_io_server_sends() {
        assert_eq!(
            frame(r#"0{"sid":"x","upgrades":[],"pingInterval":25000,"pingTimeout":20000}"#),
            Frame::Open
        );
        assert_eq!(frame(r#"40{"sid":"y"}"#), Frame::Connected);
        assert_eq!(
            frame(r#"44{"message":"unauthorized"}"#),
            Frame::Refused(r#"{"message":"unauthorized"}"#)
        );
        assert_eq!(frame("2"), Frame::Ping);
        assert_eq!(
            frame(r#"42["event",{"type":"event","id":7,"at":"2026-11-22T10:00:00.000001Z"}]"#),
            Frame::Event(r#"{"type":"event","id":7,"at":"2026-11-22T10:00:00.000001Z"}"#)
        );
        assert_eq!(frame(r#"42["other",{}]"#), Frame::Other);
    }
}
