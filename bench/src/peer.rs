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
    /// PostGraphile v4 with simple subscriptions (`bench/peer/postgraphile.js`): each event
    /// read back from the database for each subscriber.
    Postgraphile,
    /// The same server, each client taking only the event's node id (`relatedNodeId`), which
    /// names the event's id and time: no read-back, no row, PostGraphile's cheapest delivery.
    #[serde(rename = "postgraphile-ids")]
    PostgraphileIds,
}

impl Peer {
    /// What the results name as the server measured.
    pub fn describe(self) -> &'static str {
        match self {
            Peer::Socketio => "Socket.IO 4.8 + pg-listen (bench/peer/socketio.js)",
            Peer::Postgraphile => {
                "PostGraphile 4.14 simple subscriptions (bench/peer/postgraphile.js)"
            }
            Peer::PostgraphileIds => {
                "PostGraphile 4.14 simple subscriptions, node ids only (bench/peer/postgraphile.js)"
            }
        }
    }

    /// Whether its clients speak graphql-ws to PostGraphile.
    pub fn graphql(self) -> bool {
        matches!(self, Peer::Postgraphile | Peer::PostgraphileIds)
    }

    /// What it needs in the run's database before the ceiling is measured, if anything.
    pub fn setup(self, dir: &Path) -> Option<PathBuf> {
        match self {
            Peer::Socketio => None,
            Peer::Postgraphile | Peer::PostgraphileIds => Some(dir.join("postgraphile.sql")),
        }
    }

    /// The script that runs it, in the peers' directory.
    pub fn script(self, dir: &Path) -> PathBuf {
        match self {
            Peer::Socketio => dir.join("socketio.js"),
            Peer::Postgraphile | Peer::PostgraphileIds => dir.join("postgraphile.js"),
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

/// The WebSocket subprotocol of graphql-ws, which PostGraphile speaks.
pub const GRAPHQL_WS: &str = "graphql-transport-ws";

/// graphql-ws's first message: the token goes in the connection's parameters.
pub fn graphql_init(token: &str) -> String {
    format!(r#"{{"type":"connection_init","payload":{{"authorization":"Bearer {token}"}}}}"#)
}

/// The one subscription a socket makes: its topic's events, the first right away (with no node)
/// so the socket knows the subscription is in place. With `ids_only`, each event's node id alone.
pub fn graphql_subscribe(topic: &str, ids_only: bool) -> String {
    let selection = if ids_only {
        "relatedNodeId"
    } else {
        "relatedNode { ... on Event { id row at } }"
    };
    format!(
        r#"{{"id":"1","type":"subscribe","payload":{{"query":"subscription {{ listen(topic: \"{topic}\", initialEvent: true) {{ {selection} }} }}"}}}}"#
    )
}

/// The start of a graphql-ws `next` message of the one subscription a socket makes.
const NEXT: &str = r#"{"id":"1","type":"next""#;

/// What PostGraphile's simple subscriptions say when the authorization function (`peer.may_listen`)
/// turns a topic down.
pub const GRAPHQL_REFUSED: &str = "You may not subscribe to this topic";

/// Whether a graphql-ws message is the one subscription's refusal by the authorization function:
/// its result with that error and no data.
pub fn graphql_refusal(text: &str) -> bool {
    text.starts_with(r#"{"id":"1","type":"next","payload":{"errors":["#)
        && text.contains(GRAPHQL_REFUSED)
        && !text.contains(r#""data":{"#)
}

/// A graphql-ws `next` message's event: its id and `at`, without parsing the whole message (the
/// id is a string, as PostGraphile gives a bigint). None for any other message, and for the
/// initial one, which has no node.
pub fn graphql_event(text: &str) -> Option<(i64, &str)> {
    const NODE: &str = r#""relatedNode":{"id":""#;
    if !text.starts_with(NEXT) {
        return None;
    }
    let id_at = text.find(NODE)? + NODE.len();
    let digits = text[id_at..].find('"')?;
    let id = text[id_at..id_at + digits].parse().ok()?;
    let at_at = text.rfind(r#""at":""#)? + 6;
    let end = text[at_at..].find('"')?;
    Some((id, &text[at_at..at_at + end]))
}

/// A graphql-ws `next` message's event when the client takes only its node id: the base64 of
/// the JSON array `["events", id, at]` that `postgraphile.sql` notifies. None for any other
/// message, and for the initial one, which has no node.
pub fn graphql_node_id(text: &str) -> Option<(i64, String)> {
    use base64::Engine as _;
    const NODE_ID: &str = r#""relatedNodeId":""#;
    if !text.starts_with(NEXT) {
        return None;
    }
    let start = text.find(NODE_ID)? + NODE_ID.len();
    let end = text[start..].find('"')?;
    let json = base64::engine::general_purpose::STANDARD
        .decode(&text[start..start + end])
        .ok()?;
    let (_, id, at): (String, i64, String) = serde_json::from_slice(&json).ok()?;
    Some((id, at))
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

    #[test]
    fn reads_a_postgraphile_event() {
        let next = r#"{"id":"1","type":"next","payload":{"data":{"listen":{"relatedNode":{"id":"42","row":{"id":"x","at":"no"},"at":"2026-11-22T15:45:08.123456+00:00"}}}}}"#;
        assert_eq!(
            graphql_event(next),
            Some((42, "2026-11-22T15:45:08.123456+00:00"))
        );
        let initial =
            r#"{"id":"1","type":"next","payload":{"data":{"listen":{"relatedNode":null}}}}"#;
        assert_eq!(graphql_event(initial), None);
        assert_eq!(graphql_event(r#"{"type":"connection_ack"}"#), None);
    }

    #[test]
    fn reads_a_postgraphile_node_id() {
        // base64 of ["events",42,"2026-11-22T15:45:08.123456+00:00"], as PostGraphile encodes
        // the notification's __node__.
        let next = r#"{"id":"1","type":"next","payload":{"data":{"listen":{"relatedNodeId":"WyJldmVudHMiLDQyLCIyMDI2LTExLTIyVDE1OjQ1OjA4LjEyMzQ1NiswMDowMCJd"}}}}"#;
        assert_eq!(
            graphql_node_id(next),
            Some((42, "2026-11-22T15:45:08.123456+00:00".to_string()))
        );
        let initial =
            r#"{"id":"1","type":"next","payload":{"data":{"listen":{"relatedNodeId":null}}}}"#;
        assert_eq!(graphql_node_id(initial), None);
        assert_eq!(graphql_node_id(r#"{"type":"connection_ack"}"#), None);
    }

    #[test]
    fn tells_a_refused_postgraphile_subscription() {
        // As PostGraphile 4.14 answers a topic `peer.may_listen` turns down.
        let refused = r#"{"id":"1","type":"next","payload":{"errors":[{"message":"You may not subscribe to this topic","locations":[{"line":1,"column":16}],"path":["listen"]}]}}"#;
        assert!(graphql_refusal(refused));
        // Other errors are not that refusal: a bad token, say.
        let other =
            r#"{"id":"1","type":"next","payload":{"errors":[{"message":"jwt malformed"}]}}"#;
        assert!(!graphql_refusal(other));
        let started =
            r#"{"id":"1","type":"next","payload":{"data":{"listen":{"relatedNodeId":null}}}}"#;
        assert!(!graphql_refusal(started));
        assert!(!graphql_refusal(r#"{"id":"1","type":"complete"}"#));
    }

    #[test]
    fn writes_postgraphile_messages() {
        let query = |topic: &str, ids_only: bool| {
            let subscribe: serde_json::Value =
                serde_json::from_str(&graphql_subscribe(topic, ids_only)).unwrap();
            subscribe["payload"]["query"].as_str().unwrap().to_string()
        };
        let node = query("user:abc", false);
        assert!(node.contains(r#"listen(topic: "user:abc", initialEvent: true)"#));
        assert!(node.contains("relatedNode {"), "{node}");
        let ids = query("admins", true);
        assert!(ids.contains("{ relatedNodeId }"), "{ids}");
        let init: serde_json::Value = serde_json::from_str(&graphql_init("t.o.k")).unwrap();
        assert_eq!(init["payload"]["authorization"], "Bearer t.o.k");
    }
}
