//! The WebSocket protocol's frames (see `docs/protocol.md`): parsing what clients send and
//! rendering the relay's replies. `event` frames are rendered by [`crate::event`].
//!
//! Parsing never fails the socket: every malformed frame becomes a [`FrameError`] that is sent back
//! as an `error` frame, echoing the frame's `ref` when one could be read.

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::authz::Feed;
use crate::token::{RawToken, TokenError};

/// WebSocket close codes the relay uses, beyond the standard ones.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The relay is shutting down; reconnect (to another instance).
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A frame exceeded `RELAY_MAX_FRAME_BYTES`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The socket's token expired and no fresh one came in an `auth` frame; reconnect with a
    /// fresh token.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// An `auth` frame carried a token for another user or role than the socket's.
    pub const IDENTITY_CHANGED: u16 = 4003;
    /// The socket's outbound queue was full: the client read too slowly. The reason names the
    /// cursor of the last event frame written; resume each feed from its last cursor.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The event log went back (a restore, a failover that lost commits): cursors no longer
    /// name what they named, and rows the client holds may be gone. Fetch current state and
    /// subscribe without `since`.
    pub const STATE_LOST: u16 = 4010;
    /// The client sent more frames per second than `RELAY_MAX_FRAMES_PER_SECOND` allows.
    pub const RATE_LIMITED: u16 = 4029;
}

/// A position in the event log: the id of the last event a client has, as the opaque string
/// `event` frames carry in `cursor`. Event ids follow commit order (`triggers/003_commit_order.sql`),
/// so "every event after this cursor" is exact on any relay instance on the same database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor(pub i64);

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for Cursor {
    type Err = ();

    fn from_str(s: &str) -> Result<Cursor, ()> {
        // Digits only: no sign, no spaces, no leading plus.
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(());
        }
        s.parse().map(Cursor).map_err(|_| ())
    }
}

/// What tells one event from another that later took its id in a log that went back (a restore,
/// a failover that lost commits): a keyed hash of the event's id and `at`, the time of its
/// transaction, which the later one cannot share but by a one-in-four-billion chance. The id is
/// hashed too so that two events of one transaction, which share their `at`, differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(pub u32);

/// The key of [`Tag`]s, kept in the database (`relay.cursor_key`) so that every relay on it tags
/// alike. Without it a tag says nothing of the time it was made from, so a cursor may name an
/// event its client may not see.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CursorKey(pub [u8; 16]);

impl std::fmt::Debug for CursorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorKey(..)")
    }
}

impl CursorKey {
    /// The key as the database keeps it: 16 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<CursorKey> {
        bytes.try_into().ok().map(CursorKey)
    }

    /// The tag of the event with this id and `at`, as its frames carry it: SipHash-2-4 of the id
    /// (8 bytes, little-endian) and `at`, low 32 bits.
    pub fn tag(&self, id: i64, at: &str) -> Tag {
        use std::hash::Hasher;
        let mut hasher = siphasher::sip::SipHasher24::new_with_key(&self.0);
        hasher.write(&id.to_le_bytes());
        hasher.write(at.as_bytes());
        Tag(hasher.finish() as u32)
    }

    /// The cursor of the event with this id and `at`.
    pub fn mark(&self, id: i64, at: &str) -> Mark {
        Mark {
            position: Cursor(id),
            tag: Some(self.tag(id, at)),
        }
    }
}

/// A cursor as clients hold it: a position in the log and, when the position is an event, that
/// event's [`Tag`]. Written `<id>` or `<id>.<tag in 8 lowercase hex digits>`; clients treat it as
/// an opaque string. The tag lets a resume find out that the log no longer holds the event the
/// cursor came from, even once new events have passed its id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Mark {
    pub position: Cursor,
    pub tag: Option<Tag>,
}

impl From<Cursor> for Mark {
    fn from(position: Cursor) -> Mark {
        Mark {
            position,
            tag: None,
        }
    }
}

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tag {
            Some(Tag(tag)) => write!(f, "{}.{tag:08x}", self.position),
            None => self.position.fmt(f),
        }
    }
}

impl std::str::FromStr for Mark {
    type Err = ();

    fn from_str(s: &str) -> Result<Mark, ()> {
        let Some((position, tag)) = s.split_once('.') else {
            return Ok(Mark::from(s.parse::<Cursor>()?));
        };
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if tag.len() != 8 || !tag.bytes().all(hex) {
            return Err(());
        }
        Ok(Mark {
            position: position.parse()?,
            tag: Some(Tag(u32::from_str_radix(tag, 16).map_err(|_| ())?)),
        })
    }
}

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Subscribe {
        reference: Option<String>,
        feed: Feed,
        filter: Filter,
        /// Resume after this cursor: replay what was missed, then continue live.
        since: Option<Mark>,
    },
    Unsubscribe {
        reference: Option<String>,
        feed: Feed,
    },
    Ping {
        reference: Option<String>,
    },
    /// Replaces the socket's token with a fresh one for the same user and role.
    Auth {
        reference: Option<String>,
        token: RawToken,
    },
    /// Sends a message to a consultation session, as the socket's user.
    Send {
        reference: Option<String>,
        session_id: Uuid,
        body: String,
        /// Chosen by the client once per message: a retry with the same one creates nothing new.
        client_id: Uuid,
    },
}

/// Narrows a subscription; never widens what authorization allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Filter {
    /// Only messages of this consultation session (`consultation_messages` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Uuid>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.session_id.is_none()
    }
}

/// The error codes of `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is not valid JSON or not a valid frame.
    BadRequest,
    /// The `feed` names no feed.
    UnknownFeed,
    /// The caller may never see this feed, or filters on something that is not theirs.
    Forbidden,
    /// The relay could not complete the request right now (e.g. the database is unreachable).
    Unavailable,
    /// The `since` cursor is older than the event log's retention (or not from this database):
    /// events after it can no longer be replayed. Refetch current state, then subscribe anew.
    CursorExpired,
    /// The socket already holds `RELAY_MAX_SUBSCRIPTIONS_PER_SOCKET` subscriptions.
    TooManySubscriptions,
    /// An `auth` frame's token was refused; the code names why, as the HTTP 401 codes do.
    InvalidToken,
    TokenExpired,
    TokenNotYetValid,
    InvalidSignature,
    /// An `auth` frame's token names another user or role; the socket is closed (4003).
    IdentityChanged,
    /// A `send` names a session that does not exist.
    NotFound,
    /// A `send` to a session that has ended.
    SessionEnded,
    /// A `send` whose body is empty or longer than 4000 characters after trimming.
    InvalidBody,
    /// A `send` whose `client_id` was already used for another message.
    Conflict,
    /// A history request while the same user's earlier ones hold all of the user's share of the
    /// database pool (HTTP 429).
    TooManyRequests,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownFeed => "unknown_feed",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::CursorExpired => "cursor_expired",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenNotYetValid => "token_not_yet_valid",
            ErrorCode::InvalidSignature => "invalid_signature",
            ErrorCode::IdentityChanged => "identity_changed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::SessionEnded => "session_ended",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooManyRequests => "too_many_requests",
        }
    }
}

impl From<&TokenError> for ErrorCode {
    fn from(error: &TokenError) -> ErrorCode {
        match error {
            TokenError::Expired => ErrorCode::TokenExpired,
            TokenError::NotYetValid => ErrorCode::TokenNotYetValid,
            TokenError::BadSignature => ErrorCode::InvalidSignature,
            TokenError::Missing | TokenError::MissingHeader | TokenError::Invalid(_) => {
                ErrorCode::InvalidToken
            }
        }
    }
}

/// A frame the relay refuses, with the `ref` to echo in the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub reference: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    pub fn new(reference: Option<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError {
            reference,
            code,
            message: message.into(),
        }
    }

    pub fn to_frame(&self) -> Bytes {
        error(self.reference.as_deref(), self.code, &self.message)
    }
}

/// The longest `ref` a frame may carry. Every reply echoes it, and a socket's queue holds up to
/// `RELAY_SOCKET_QUEUE` replies: a client that sends long refs and reads nothing must not make
/// the relay hold its frames many times over.
pub const MAX_REF_BYTES: usize = 128;

/// The most of a client's value an error message quotes, in characters.
const SHOWN_CHARS: usize = 64;

/// A client's value as an error message quotes it: cut to [`SHOWN_CHARS`] characters, with `…`
/// when cut, so that a reply is never much larger than the request's meaningful part.
fn shown(value: &str) -> std::borrow::Cow<'_, str> {
    match value.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", &value[..cut]).into(),
        None => value.into(),
    }
}

impl ClientFrame {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        let bad = |reference: Option<String>, message: String| {
            FrameError::new(reference, ErrorCode::BadRequest, message)
        };
        let value: Value = serde_json::from_str(text)
            .map_err(|e| bad(None, format!("frame is not valid JSON: {e}")))?;
        let Value::Object(mut object) = value else {
            return Err(bad(None, "frame must be a JSON object".into()));
        };
        let reference = match object.remove("ref") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.len() <= MAX_REF_BYTES => Some(s),
            Some(Value::String(_)) => {
                return Err(bad(
                    None,
                    format!("`ref` is longer than {MAX_REF_BYTES} bytes"),
                ))
            }
            Some(_) => return Err(bad(None, "`ref` must be a string".into())),
        };
        let kind = match object.remove("type") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(bad(reference, "`type` must be a string".into())),
            None => return Err(bad(reference, "missing field `type`".into())),
        };
        let frame = match kind.as_str() {
            "subscribe" => {
                let feed = take_feed(&mut object, &reference)?;
                let filter = take_filter(&mut object, feed, &reference)?;
                let since = take_since(&mut object, &reference)?;
                ClientFrame::Subscribe {
                    reference: reference.clone(),
                    feed,
                    filter,
                    since,
                }
            }
            "unsubscribe" => ClientFrame::Unsubscribe {
                feed: take_feed(&mut object, &reference)?,
                reference: reference.clone(),
            },
            "ping" => ClientFrame::Ping {
                reference: reference.clone(),
            },
            // An empty token is a malformed one: refused with `invalid_token` when verified, as
            // over HTTP.
            "auth" => match object.remove("access_token") {
                Some(Value::String(token)) => ClientFrame::Auth {
                    reference: reference.clone(),
                    token: RawToken(token),
                },
                _ => {
                    return Err(bad(
                        reference,
                        "an auth frame needs `access_token`, a JWT string".into(),
                    ))
                }
            },
            "send" => {
                let session_id = take_uuid(&mut object, "session_id", &reference)?;
                let client_id = take_uuid(&mut object, "client_id", &reference)?;
                let body = match object.remove("body") {
                    Some(Value::String(body)) => body,
                    _ => return Err(bad(reference, "a send frame needs `body`, a string".into())),
                };
                ClientFrame::Send {
                    reference: reference.clone(),
                    session_id,
                    body,
                    client_id,
                }
            }
            other => {
                return Err(bad(
                    reference,
                    format!(
                        "unknown type {:?}: expected subscribe, unsubscribe, ping, auth or send",
                        shown(other)
                    ),
                ))
            }
        };
        if let Some(field) = object.keys().next() {
            return Err(bad(
                reference,
                format!("unknown field `{}` in a {} frame", shown(field), kind),
            ));
        }
        Ok(frame)
    }
}

fn take_feed(
    object: &mut Map<String, Value>,
    reference: &Option<String>,
) -> Result<Feed, FrameError> {
    match object.remove("feed") {
        Some(Value::String(name)) => name.parse().map_err(|_| {
            FrameError::new(
                reference.clone(),
                ErrorCode::UnknownFeed,
                format!(
                    "unknown feed {:?}: expected one of appointments, availability, \
                     consultation_sessions, consultation_messages",
                    shown(&name)
                ),
            )
        }),
        Some(_) => Err(FrameError::new(
            reference.clone(),
            ErrorCode::BadRequest,
            "`feed` must be a string",
        )),
        None => Err(FrameError::new(
            reference.clone(),
            ErrorCode::BadRequest,
            "missing field `feed`",
        )),
    }
}

/// A required uuid field of a frame.
fn take_uuid(
    object: &mut Map<String, Value>,
    field: &str,
    reference: &Option<String>,
) -> Result<Uuid, FrameError> {
    match object.remove(field) {
        Some(Value::String(s)) => Uuid::parse_str(&s).ok(),
        _ => None,
    }
    .ok_or_else(|| {
        FrameError::new(
            reference.clone(),
            ErrorCode::BadRequest,
            format!("`{field}` must be a uuid string"),
        )
    })
}

fn take_since(
    object: &mut Map<String, Value>,
    reference: &Option<String>,
) -> Result<Option<Mark>, FrameError> {
    let bad = || {
        FrameError::new(
            reference.clone(),
            ErrorCode::BadRequest,
            "`since` must be a cursor string from an event or subscribed frame",
        )
    };
    match object.remove("since") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s.parse().map(Some).map_err(|()| bad()),
        Some(_) => Err(bad()),
    }
}

fn take_filter(
    object: &mut Map<String, Value>,
    feed: Feed,
    reference: &Option<String>,
) -> Result<Filter, FrameError> {
    let bad = |message: String| FrameError::new(reference.clone(), ErrorCode::BadRequest, message);
    let mut filter = match object.remove("filter") {
        None | Some(Value::Null) => return Ok(Filter::default()),
        Some(Value::Object(filter)) => filter,
        Some(_) => return Err(bad("`filter` must be an object".into())),
    };
    if filter.is_empty() {
        return Ok(Filter::default());
    }
    if feed != Feed::ConsultationMessages {
        return Err(bad(format!(
            "feed {feed} takes no filter; only consultation_messages filters, by session_id"
        )));
    }
    let session_id = match filter.remove("session_id") {
        Some(Value::String(s)) => Some(
            Uuid::parse_str(&s)
                .map_err(|_| bad(format!("filter.session_id {:?} is not a uuid", shown(&s))))?,
        ),
        Some(Value::Null) | None => None,
        Some(_) => return Err(bad("filter.session_id must be a uuid string".into())),
    };
    if let Some(field) = filter.keys().next() {
        return Err(bad(format!(
            "unknown filter field `{}`: consultation_messages filters by session_id only",
            shown(field)
        )));
    }
    Ok(Filter { session_id })
}

#[derive(Serialize)]
struct Reply<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    feed: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
}

impl<'a> Reply<'a> {
    fn new(kind: &'static str, reference: Option<&'a str>) -> Self {
        Reply {
            kind,
            reference,
            feed: None,
            cursor: None,
            code: None,
            message: None,
            expires_at: None,
        }
    }

    fn render(&self) -> Bytes {
        render(self)
    }
}

/// The acknowledgement of a subscription. `cursor` is where it starts: the client has every event
/// of the feed up to it (the `since` it resumed from, or the log's position when it subscribed),
/// so it can resume from there even if no event arrives before it disconnects.
pub fn subscribed(reference: Option<&str>, feed: Feed, cursor: Mark) -> Bytes {
    Reply {
        feed: Some(feed.as_str()),
        cursor: Some(cursor.to_string()),
        ..Reply::new("subscribed", reference)
    }
    .render()
}

/// Where a live subscription stands though nothing came for it: no event up to `cursor` is for
/// it, so the client may resume from there. Keeps a quiet subscription's cursor within retention.
pub fn position(feed: Feed, cursor: Mark) -> Bytes {
    Reply {
        feed: Some(feed.as_str()),
        cursor: Some(cursor.to_string()),
        ..Reply::new("position", None)
    }
    .render()
}

/// Ends the replay of a resumed subscription: everything missed has been sent, and what follows
/// is live.
pub fn live(reference: Option<&str>, feed: Feed) -> Bytes {
    Reply {
        feed: Some(feed.as_str()),
        ..Reply::new("live", reference)
    }
    .render()
}

pub fn unsubscribed(reference: Option<&str>, feed: Feed) -> Bytes {
    Reply {
        feed: Some(feed.as_str()),
        ..Reply::new("unsubscribed", reference)
    }
    .render()
}

/// The answer to an accepted `auth` frame: the socket now lives until `expires_at` (RFC 3339,
/// the new token's `exp` plus the leeway).
pub fn authenticated(reference: Option<&str>, expires_at: std::time::SystemTime) -> Bytes {
    Reply {
        expires_at: Some(crate::rfc3339(expires_at)),
        ..Reply::new("authenticated", reference)
    }
    .render()
}

/// The answer to a `send`: the message's id. A retry with the same `client_id` gets the same id.
pub fn sent(reference: Option<&str>, id: Uuid, client_id: Uuid) -> Bytes {
    #[derive(Serialize)]
    struct Sent<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        id: Uuid,
        client_id: Uuid,
    }
    render(&Sent {
        kind: "sent",
        reference,
        id,
        client_id,
    })
}

/// Someone connected to a consultation session: its user and role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Member {
    pub user_id: Uuid,
    pub role: crate::authz::Role,
}

/// Who joined and who left a session. The first one a subscriber gets lists everyone connected
/// when it subscribed, in `joined`.
pub fn presence(session_id: Uuid, joined: &[Member], left: &[Member]) -> Bytes {
    #[derive(Serialize)]
    struct Presence<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        session_id: Uuid,
        joined: &'a [Member],
        left: &'a [Member],
    }
    render(&Presence {
        kind: "presence",
        session_id,
        joined,
        left,
    })
}

fn render(frame: &impl Serialize) -> Bytes {
    // Structs of strings and uuids always serialize.
    Bytes::from(serde_json::to_vec(frame).unwrap_or_default())
}

pub fn pong(reference: Option<&str>) -> Bytes {
    Reply::new("pong", reference).render()
}

pub fn error(reference: Option<&str>, code: ErrorCode, message: &str) -> Bytes {
    Reply {
        code: Some(code.as_str()),
        message: Some(message),
        ..Reply::new("error", reference)
    }
    .render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<ClientFrame, FrameError> {
        ClientFrame::parse(&value.to_string())
    }

    #[test]
    fn a_cursor_names_its_event_by_the_hash_of_its_time() {
        // SipHash-2-4 with the reference key 00..0f, low 32 bits, as another implementation
        // (checked against the reference vectors) computes it: fixed, so that cursors stay valid
        // across versions of the relay.
        let key = CursorKey(std::array::from_fn(|i| i as u8));
        let at = "2026-11-21T10:37:02.520020Z";
        assert_eq!(key.tag(1042, at), Tag(0x9e00_0fd1));
        // Another key, another tag: without the key, a tag does not tell the time. Another id of
        // the same transaction, another tag: equal tags tell nothing either.
        assert_ne!(CursorKey([7; 16]).tag(1042, at), key.tag(1042, at));
        assert_ne!(key.tag(1043, at), key.tag(1042, at));
        assert_eq!(format!("{key:?}"), "CursorKey(..)");
        let mark = key.mark(1042, at);
        let text = mark.to_string();
        assert!(text.starts_with("1042.") && text.len() == 13, "{text}");
        assert_eq!(text.parse(), Ok(mark));
        assert_eq!("1042".parse(), Ok(Mark::from(Cursor(1042))));
        assert_eq!(Mark::from(Cursor(7)).to_string(), "7");
    }

    #[test]
    fn parses_each_frame_type() {
        let session = Uuid::new_v4();
        assert_eq!(
            parse(json!({"type": "subscribe", "ref": "1", "feed": "appointments"})),
            Ok(ClientFrame::Subscribe {
                reference: Some("1".into()),
                feed: Feed::Appointments,
                filter: Filter::default(),
                since: None,
            })
        );
        assert_eq!(
            parse(json!({"type": "subscribe", "feed": "appointments", "since": "42"})),
            Ok(ClientFrame::Subscribe {
                reference: None,
                feed: Feed::Appointments,
                filter: Filter::default(),
                since: Some(Mark::from(Cursor(42))),
            })
        );
        assert_eq!(
            parse(json!({"type": "subscribe", "feed": "appointments", "since": "42.00c0ffee"})),
            Ok(ClientFrame::Subscribe {
                reference: None,
                feed: Feed::Appointments,
                filter: Filter::default(),
                since: Some(Mark {
                    position: Cursor(42),
                    tag: Some(Tag(0x00c0_ffee))
                }),
            })
        );
        assert_eq!(
            parse(json!({"type": "subscribe", "feed": "consultation_messages",
                         "filter": {"session_id": session.to_string()}})),
            Ok(ClientFrame::Subscribe {
                reference: None,
                feed: Feed::ConsultationMessages,
                filter: Filter {
                    session_id: Some(session)
                },
                since: None,
            })
        );
        assert_eq!(
            parse(json!({"type": "unsubscribe", "ref": "2", "feed": "availability"})),
            Ok(ClientFrame::Unsubscribe {
                reference: Some("2".into()),
                feed: Feed::Availability
            })
        );
        assert_eq!(
            parse(json!({"type": "ping", "ref": "3"})),
            Ok(ClientFrame::Ping {
                reference: Some("3".into())
            })
        );
        assert_eq!(
            parse(json!({"type": "auth", "ref": "4", "access_token": "a.b.c"})),
            Ok(ClientFrame::Auth {
                reference: Some("4".into()),
                token: RawToken("a.b.c".into())
            })
        );
    }

    #[test]
    fn rejects_malformed_frames_with_the_right_code_and_ref() {
        let cases = [
            (json!("just a string"), ErrorCode::BadRequest, None),
            (json!({"ref": "a"}), ErrorCode::BadRequest, Some("a")),
            (
                json!({"ref": "b", "type": "launch"}),
                ErrorCode::BadRequest,
                Some("b"),
            ),
            (
                json!({"ref": "c", "type": "subscribe"}),
                ErrorCode::BadRequest,
                Some("c"),
            ),
            (
                json!({"ref": "d", "type": "subscribe", "feed": 4}),
                ErrorCode::BadRequest,
                Some("d"),
            ),
            (
                json!({"ref": "e", "type": "subscribe", "feed": "profiles"}),
                ErrorCode::UnknownFeed,
                Some("e"),
            ),
            (
                json!({"ref": "f", "type": "subscribe", "feed": "appointments", "filter": {"session_id": Uuid::new_v4().to_string()}}),
                ErrorCode::BadRequest,
                Some("f"),
            ),
            (
                json!({"ref": "g", "type": "subscribe", "feed": "consultation_messages", "filter": {"session_id": "nope"}}),
                ErrorCode::BadRequest,
                Some("g"),
            ),
            (
                json!({"ref": "h", "type": "subscribe", "feed": "consultation_messages", "filter": {"sender_id": "x"}}),
                ErrorCode::BadRequest,
                Some("h"),
            ),
            (
                json!({"ref": "i", "type": "ping", "extra": true}),
                ErrorCode::BadRequest,
                Some("i"),
            ),
            (
                json!({"ref": "j", "type": "subscribe", "feed": "appointments", "since": 42}),
                ErrorCode::BadRequest,
                Some("j"),
            ),
            (
                json!({"ref": "k", "type": "subscribe", "feed": "appointments", "since": "-1"}),
                ErrorCode::BadRequest,
                Some("k"),
            ),
            (
                json!({"ref": "l", "type": "subscribe", "feed": "appointments", "since": "99999999999999999999"}),
                ErrorCode::BadRequest,
                Some("l"),
            ),
            (
                json!({"ref": "l2", "type": "subscribe", "feed": "appointments", "since": "42.C0FFEE00"}),
                ErrorCode::BadRequest,
                Some("l2"),
            ),
            (
                json!({"ref": "l3", "type": "subscribe", "feed": "appointments", "since": "42.c0ffee"}),
                ErrorCode::BadRequest,
                Some("l3"),
            ),
            (
                json!({"ref": "l4", "type": "subscribe", "feed": "appointments", "since": ".c0ffee00"}),
                ErrorCode::BadRequest,
                Some("l4"),
            ),
            (
                json!({"ref": 5, "type": "ping"}),
                ErrorCode::BadRequest,
                None,
            ),
            (
                json!({"ref": "m", "type": "auth"}),
                ErrorCode::BadRequest,
                Some("m"),
            ),
            (
                json!({"ref": "n", "type": "auth", "access_token": 7}),
                ErrorCode::BadRequest,
                Some("n"),
            ),
            (
                json!({"ref": "o", "type": "auth", "access_token": "a.b.c", "role": "admin"}),
                ErrorCode::BadRequest,
                Some("o"),
            ),
        ];
        for (value, code, reference) in cases {
            let err = parse(value.clone()).expect_err(&value.to_string());
            assert_eq!(err.code, code, "{value}");
            assert_eq!(err.reference.as_deref(), reference, "{value}");
            assert!(!err.message.is_empty());
        }
        for text in ["", "{", "\u{0}", "[1,2]", "null"] {
            assert_eq!(
                ClientFrame::parse(text).unwrap_err().code,
                ErrorCode::BadRequest
            );
        }
    }

    #[test]
    fn replies_never_echo_much_more_than_the_frame_means() {
        // A ref at the limit is echoed; one byte over is refused, without the echo.
        let at_limit = "r".repeat(MAX_REF_BYTES);
        let err = parse(json!({"ref": at_limit, "type": "nope"})).unwrap_err();
        assert_eq!(err.reference.as_deref(), Some(at_limit.as_str()));
        let over = "r".repeat(MAX_REF_BYTES + 1);
        let err = parse(json!({"ref": over, "type": "ping"})).unwrap_err();
        assert_eq!((err.code, err.reference), (ErrorCode::BadRequest, None));
        assert!(
            err.message.contains("`ref` is longer than 128 bytes"),
            "{}",
            err.message
        );
        // Long values named in a refusal are cut: type, field, feed, filter and its fields.
        let long = "\"x".repeat(20_000);
        let cases = [
            json!({"type": long}),
            json!({"type": "ping", long.clone(): 1}),
            json!({"type": "subscribe", "feed": long}),
            json!({"type": "subscribe", "feed": "consultation_messages", "filter": {"session_id": long}}),
            json!({"type": "subscribe", "feed": "consultation_messages", "filter": {long.clone(): 1}}),
        ];
        for value in cases {
            let err = parse(value.clone()).unwrap_err();
            assert!(err.to_frame().len() < 512, "{}", err.message);
            assert!(err.message.contains('…'), "{}", err.message);
        }
        // Short values are quoted whole.
        let err = parse(json!({"type": "subscribe", "feed": "appointmentz"})).unwrap_err();
        assert!(err.message.contains(r#""appointmentz""#), "{}", err.message);
    }

    #[test]
    fn an_empty_filter_is_no_filter() {
        for filter in [json!({}), json!(null), json!({"session_id": null})] {
            let frame = parse(
                json!({"type": "subscribe", "feed": "consultation_messages", "filter": filter}),
            );
            assert!(
                matches!(frame, Ok(ClientFrame::Subscribe { filter, .. }) if filter.is_empty())
            );
        }
    }

    #[test]
    fn replies_render_as_documented() {
        let v = |b: Bytes| serde_json::from_slice::<Value>(&b).unwrap();
        assert_eq!(
            v(subscribed(
                Some("1"),
                Feed::Appointments,
                Mark::from(Cursor(7))
            )),
            json!({"type": "subscribed", "ref": "1", "feed": "appointments", "cursor": "7"})
        );
        assert_eq!(
            v(unsubscribed(None, Feed::Availability)),
            json!({"type": "unsubscribed", "feed": "availability"})
        );
        assert_eq!(v(pong(Some("x"))), json!({"type": "pong", "ref": "x"}));
        assert_eq!(
            v(live(Some("r"), Feed::Appointments)),
            json!({"type": "live", "ref": "r", "feed": "appointments"})
        );
        assert_eq!(
            v(error(Some("e"), ErrorCode::Forbidden, "no")),
            json!({"type": "error", "ref": "e", "code": "forbidden", "message": "no"})
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const WORDS: [&str; 16] = [
            "type",
            "ref",
            "feed",
            "filter",
            "since",
            "access_token",
            "session_id",
            "subscribe",
            "unsubscribe",
            "ping",
            "auth",
            "appointments",
            "availability",
            "consultation_messages",
            "42",
            "-1",
        ];

        fn word() -> impl Strategy<Value = String> {
            prop::sample::select(&WORDS[..]).prop_map(str::to_string)
        }

        /// JSON shaped like frames: objects keyed by the protocol's words, with values of every
        /// kind, nested.
        fn frame_like() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(
                    |f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
                ),
                word().prop_map(Value::from),
                any::<String>().prop_map(Value::from),
                any::<u128>().prop_map(|n| Value::from(Uuid::from_u128(n).to_string())),
            ];
            leaf.prop_recursive(4, 64, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::vec((word(), inner), 0..6)
                        .prop_map(|entries| Value::Object(entries.into_iter().collect())),
                ]
            })
        }

        /// Parsing never panics; a refusal is a well-formed `error` frame that never repeats
        /// the token an `auth` frame carried.
        fn check(text: &str) -> Result<(), TestCaseError> {
            match ClientFrame::parse(text) {
                Ok(_) => {}
                Err(e) => {
                    prop_assert!(!e.message.is_empty());
                    let frame: Value = serde_json::from_slice(&e.to_frame()).unwrap();
                    prop_assert_eq!(&frame["type"], "error");
                    prop_assert_eq!(&frame["code"], e.code.as_str());
                    let token = serde_json::from_str::<Value>(text)
                        .ok()
                        .and_then(|v| v["access_token"].as_str().map(str::to_string));
                    // A token is never a word of the protocol, which messages may name
                    // ("expected subscribe, …") whatever the frame held.
                    let secret = |t: &String| t.len() >= 8 && !WORDS.contains(&t.as_str());
                    if let Some(token) = token.filter(secret) {
                        prop_assert!(!e.message.contains(&token));
                    }
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn any_text_is_parsed_or_refused_cleanly(text in any::<String>()) {
                check(&text)?;
            }

            #[test]
            fn any_bytes_are_parsed_or_refused_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
                check(&String::from_utf8_lossy(&bytes))?;
            }

            #[test]
            fn frame_shaped_json_is_parsed_or_refused_cleanly(value in frame_like()) {
                check(&value.to_string())?;
            }

            #[test]
            fn a_cursor_round_trips(id in 0i64.., tag in any::<Option<u32>>()) {
                let mark = Mark { position: Cursor(id), tag: tag.map(Tag) };
                prop_assert_eq!(mark.to_string().parse::<Mark>(), Ok(mark));
            }

            #[test]
            fn a_subscribe_frame_round_trips(feed in prop::sample::select(&Feed::ALL[..]), since in any::<Option<u32>>(), reference in any::<Option<String>>()) {
                let mut frame = json!({"type": "subscribe", "feed": feed.as_str(), "ref": reference});
                if let Some(since) = since {
                    frame["since"] = json!(since.to_string());
                }
                let parsed = ClientFrame::parse(&frame.to_string());
                prop_assert_eq!(parsed, Ok(ClientFrame::Subscribe {
                    reference,
                    feed,
                    filter: Filter::default(),
                    since: since.map(|s| Mark::from(Cursor(i64::from(s)))),
                }));
            }
        }
    }
}
