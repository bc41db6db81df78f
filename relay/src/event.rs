//! Change events: decoding what the capture trigger sends, and rendering what subscribers receive.
//!
//! An event arrives as a NOTIFY payload (`triggers/002_capture.sql`) or, when it was too large for
//! NOTIFY, as a row of `relay.events`; both become the same [`RawEvent`] and then a validated
//! [`Event`]. This module knows the payload's shape and the `event` frame's shape; it does not
//! know who subscribes or how bytes reach them.

use bytes::Bytes;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::authz::{Feed, Owners, Perceived, Projection};
use crate::protocol::{CursorKey, Mark};

/// The NOTIFY channel the capture trigger sends on.
pub const CHANNEL: &str = "relay_events";

/// A change as the trigger reports it, before validation.
#[derive(Debug, Clone, Deserialize)]
pub struct RawEvent {
    pub id: i64,
    pub table: String,
    pub op: String,
    #[serde(default)]
    pub xid: Option<String>,
    pub at: String,
    #[serde(default)]
    pub new: Option<Map<String, Value>>,
    #[serde(default)]
    pub old: Option<Map<String, Value>>,
    #[serde(default)]
    pub new_session: Option<Map<String, Value>>,
    #[serde(default)]
    pub old_session: Option<Map<String, Value>>,
    /// The rows were left out to fit NOTIFY's size limit; read them from the log.
    #[serde(default)]
    pub fetch: bool,
}

/// What a NOTIFY payload asks of the relay.
#[derive(Debug)]
pub enum Payload {
    /// The whole event is in the payload.
    Inline(Event),
    /// Only the event's id and time are: read the rest from `relay.events`.
    Fetch { id: i64, at: String },
}

/// Why a payload or log row is not a usable event. Such events are logged and counted, and the
/// feed goes on without them.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Only the kind of fault and its place are told: serde's own message can quote a value
    /// of the row, and the logs never carry row contents.
    #[error(
        "payload is not a valid event object ({}, at line {} column {})",
        json_fault(.0),
        .0.line(),
        .0.column()
    )]
    Json(#[from] serde_json::Error),
    #[error("event {id}: table {table:?} is not a watched table")]
    UnknownTable { id: i64, table: String },
    #[error("event {id}: unknown op {op:?}")]
    UnknownOp { id: i64, op: String },
    #[error("event {id}: a {op} event must carry {missing}")]
    MissingRow {
        id: i64,
        op: &'static str,
        missing: &'static str,
    },
}

fn json_fault(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Eof => "cut short",
        serde_json::error::Category::Data => "a field missing or of the wrong type",
    }
}

/// The change as the database made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
        }
    }
}

/// One version of a row (before or after the change) with the owners its visibility depends on.
#[derive(Debug, Clone)]
pub struct Version {
    pub row: Map<String, Value>,
    pub owners: Owners,
}

/// A validated change event.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: i64,
    pub feed: Feed,
    pub op: Op,
    /// The writing transaction's id (`xid8` as text), for snapshot-based reading of the log.
    pub xid: Option<String>,
    /// When the change was made, RFC 3339 in UTC.
    pub at: String,
    /// The row after the change (INSERT, UPDATE).
    pub new: Option<Version>,
    /// The row before the change (UPDATE, DELETE).
    pub old: Option<Version>,
}

impl Payload {
    pub fn decode(payload: &str) -> Result<Payload, DecodeError> {
        let raw: RawEvent = serde_json::from_str(payload)?;
        if raw.fetch {
            return Ok(Payload::Fetch {
                id: raw.id,
                at: raw.at,
            });
        }
        Ok(Payload::Inline(Event::try_from(raw)?))
    }
}

impl TryFrom<RawEvent> for Event {
    type Error = DecodeError;

    fn try_from(raw: RawEvent) -> Result<Event, DecodeError> {
        let id = raw.id;
        let feed: Feed = raw.table.parse().map_err(|_| DecodeError::UnknownTable {
            id,
            table: raw.table.clone(),
        })?;
        let op = match raw.op.as_str() {
            "INSERT" => Op::Insert,
            "UPDATE" => Op::Update,
            "DELETE" => Op::Delete,
            _ => return Err(DecodeError::UnknownOp { id, op: raw.op }),
        };
        let missing = |missing| DecodeError::MissingRow {
            id,
            op: op.as_str(),
            missing,
        };
        if op != Op::Delete && raw.new.is_none() {
            return Err(missing("the new row"));
        }
        if op != Op::Insert && raw.old.is_none() {
            return Err(missing("the old row"));
        }
        let version = |row: Option<Map<String, Value>>, session: Option<Map<String, Value>>| {
            row.map(|row| {
                // A message's owners are its session's participants (the message policies join
                // the session); every other feed's rows name their owners themselves.
                let owners = match feed {
                    Feed::ConsultationMessages => session
                        .as_ref()
                        .map(Owners::from_columns)
                        .unwrap_or_default(),
                    _ => Owners::from_columns(&row),
                };
                Version { row, owners }
            })
        };
        Ok(Event {
            id,
            feed,
            op,
            xid: raw.xid,
            at: raw.at,
            new: version(raw.new, raw.new_session),
            old: version(raw.old, raw.old_session),
        })
    }
}

impl Event {
    /// The `event` frame for a subscriber who perceives this change as `perceived` through
    /// `projection`. Rendered once per distinct pair and shared by every such subscriber.
    ///
    /// `row` is the row as the subscriber may now see it, or for a DELETE as they last could;
    /// `old` is present on UPDATE and DELETE only, so a row entering view reveals nothing of
    /// what it was before.
    ///
    /// `None` for an UPDATE that changed none of the columns the projection shows: the chatbot
    /// does not learn that something it cannot see has changed, and nobody receives a message
    /// that only changed who else may read it. `key` tags the frame's cursor.
    pub fn frame(
        &self,
        perceived: Perceived,
        projection: Projection,
        key: &CursorKey,
    ) -> Option<Bytes> {
        let (row, old) = match perceived {
            Perceived::Insert => (self.new.as_ref(), None),
            Perceived::Update => (self.new.as_ref(), self.old.as_ref()),
            Perceived::Delete => (self.old.as_ref(), self.old.as_ref()),
        };
        if let (Perceived::Update, Some(new), Some(old)) = (perceived, row, old) {
            let visible_change = new
                .row
                .iter()
                .chain(old.row.iter())
                .filter(|(column, _)| projection.includes(column))
                .any(|(column, _)| new.row.get(column) != old.row.get(column));
            if !visible_change {
                return None;
            }
        }
        let frame = EventFrame {
            kind: "event",
            feed: self.feed.as_str(),
            op: perceived.as_str(),
            id: self.id,
            cursor: key.mark(self.id, &self.at),
            row: row.map(|v| Projected(&v.row, projection)),
            old: old.map(|v| Projected(&v.row, projection)),
            at: &self.at,
        };
        // Serializing a map of JSON values into a Vec cannot fail.
        Some(Bytes::from(serde_json::to_vec(&frame).unwrap_or_default()))
    }
}

#[derive(Serialize)]
struct EventFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    feed: &'static str,
    op: &'static str,
    id: i64,
    /// The position to resume from: the event's id and tag, as an opaque string.
    #[serde(serialize_with = "as_string")]
    cursor: Mark,
    row: Option<Projected<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old: Option<Projected<'a>>,
    at: &'a str,
}

fn as_string<S: Serializer>(value: &Mark, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// A row serialized through a projection, without copying it.
struct Projected<'a>(&'a Map<String, Value>, Projection);

impl Serialize for Projected<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Projected(row, projection) = self;
        let mut map = serializer.serialize_map(None)?;
        for (column, value) in row.iter().filter(|(c, _)| projection.includes(c)) {
            map.serialize_entry(column, value)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    const KEY: CursorKey = CursorKey([1; 16]);

    fn payload(value: Value) -> String {
        value.to_string()
    }

    fn appointment(patient: Uuid, dentist: Uuid) -> Value {
        json!({"id": Uuid::new_v4(), "patient_id": patient, "dentist_id": dentist,
               "starts_at": "2026-01-01T10:00:00+00:00", "ends_at": "2026-01-01T11:00:00+00:00",
               "status": "booked", "kind": "video", "notes": "sensitive"})
    }

    #[test]
    fn decodes_an_inline_update_with_owners_from_the_rows() {
        let (p, d1, d2) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let text = payload(
            json!({"id": 7, "table": "appointments", "op": "UPDATE", "xid": "99",
            "at": "2026-11-21T10:00:00.000001Z", "new": appointment(p, d2), "old": appointment(p, d1),
            "new_session": null, "old_session": null}),
        );
        let Payload::Inline(event) = Payload::decode(&text).unwrap() else {
            panic!("expected an inline event")
        };
        assert_eq!(
            (event.id, event.feed, event.op),
            (7, Feed::Appointments, Op::Update)
        );
        assert_eq!(event.new.unwrap().owners.dentist_id, Some(d2));
        assert_eq!(event.old.unwrap().owners.dentist_id, Some(d1));
    }

    #[test]
    fn message_owners_come_from_the_session() {
        let (p, d) = (Uuid::new_v4(), Uuid::new_v4());
        let text = payload(
            json!({"id": 1, "table": "consultation_messages", "op": "INSERT",
            "at": "t", "new": {"id": Uuid::new_v4(), "body": "hi", "session_id": Uuid::new_v4()},
            "new_session": {"patient_id": p, "dentist_id": d}}),
        );
        let Payload::Inline(event) = Payload::decode(&text).unwrap() else {
            panic!("expected an inline event")
        };
        let owners = event.new.unwrap().owners;
        assert_eq!((owners.patient_id, owners.dentist_id), (Some(p), Some(d)));
    }

    #[test]
    fn an_update_with_nothing_visible_changed_renders_no_frame() {
        let (p, d) = (Uuid::new_v4(), Uuid::new_v4());
        let row = appointment(p, d);
        let mut notes_changed = row.clone();
        notes_changed["notes"] = json!("new notes");
        let text = payload(
            json!({"id": 5, "table": "appointments", "op": "UPDATE", "at": "t",
            "new": notes_changed, "old": row}),
        );
        let Payload::Inline(event) = Payload::decode(&text).unwrap() else {
            panic!("expected an inline event")
        };
        assert!(event
            .frame(Perceived::Update, Projection::Full, &KEY)
            .is_some());
        assert!(event
            .frame(Perceived::Update, Projection::Slot, &KEY)
            .is_none());
        let same = payload(
            json!({"id": 6, "table": "appointments", "op": "UPDATE", "at": "t",
            "new": row.clone(), "old": row}),
        );
        let Payload::Inline(event) = Payload::decode(&same).unwrap() else {
            panic!("expected an inline event")
        };
        assert!(event
            .frame(Perceived::Update, Projection::Full, &KEY)
            .is_none());
        assert!(event
            .frame(Perceived::Delete, Projection::Full, &KEY)
            .is_some());
        assert!(event
            .frame(Perceived::Insert, Projection::Full, &KEY)
            .is_some());
    }

    #[test]
    fn a_fetch_payload_names_only_the_id() {
        let text =
            r#"{"id": 12, "table": "appointments", "op": "INSERT", "at": "t", "fetch": true}"#;
        assert!(matches!(
            Payload::decode(text),
            Ok(Payload::Fetch { id: 12, .. })
        ));
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        for bad in [
            "",
            "not json",
            "[]",
            r#"{"id": "x"}"#,
            r#"{"id": 1, "table": "profiles", "op": "INSERT", "at": "t", "new": {}}"#,
            r#"{"id": 1, "table": "appointments", "op": "TRUNCATE", "at": "t"}"#,
            r#"{"id": 1, "table": "appointments", "op": "INSERT", "at": "t"}"#,
            r#"{"id": 1, "table": "appointments", "op": "UPDATE", "at": "t", "new": {}}"#,
            r#"{"id": 1, "table": "appointments", "op": "DELETE", "at": "t", "new": {}}"#,
            r#"{"id": 1, "table": "appointments", "op": "INSERT", "at": "t", "new": 5}"#,
        ] {
            assert!(Payload::decode(bad).is_err(), "{bad:?} should not decode");
        }
    }

    #[test]
    fn frames_follow_perception_and_projection() {
        let (p, d1, d2) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let text = payload(json!({"id": 3, "table": "appointments", "op": "UPDATE",
            "at": "2026-11-21T10:00:00Z", "new": appointment(p, d2), "old": appointment(p, d1)}));
        let Payload::Inline(event) = Payload::decode(&text).unwrap() else {
            panic!("expected an inline event")
        };
        let parse = |b: Option<Bytes>| serde_json::from_slice::<Value>(&b.unwrap()).unwrap();

        let entered = parse(event.frame(Perceived::Insert, Projection::Full, &KEY));
        assert_eq!(entered["type"], "event");
        assert_eq!(entered["op"], "INSERT");
        assert_eq!(entered["row"]["dentist_id"], json!(d2));
        assert!(
            entered.get("old").is_none(),
            "a row entering view must not reveal its past"
        );

        let left = parse(event.frame(Perceived::Delete, Projection::Full, &KEY));
        assert_eq!(left["op"], "DELETE");
        assert_eq!(left["row"]["dentist_id"], json!(d1));
        assert_eq!(left["old"]["dentist_id"], json!(d1));

        let slot = parse(event.frame(Perceived::Update, Projection::Slot, &KEY));
        let columns: Vec<&String> = slot["row"].as_object().unwrap().keys().collect();
        assert_eq!(columns.len(), 6);
        assert!(slot["row"].get("patient_id").is_none());
        assert!(slot["old"].get("notes").is_none());
        assert_eq!(slot["id"], 3);
        assert_eq!(
            slot["cursor"],
            format!("3.{:08x}", KEY.tag(3, "2026-11-21T10:00:00Z").0)
        );
        assert_eq!(slot["at"], "2026-11-21T10:00:00Z");
    }

    mod properties {
        use super::*;
        use crate::authz::{Perceived, Projection};
        use proptest::prelude::*;

        const TABLES: [&str; 6] = [
            "appointments",
            "availability",
            "consultation_sessions",
            "consultation_messages",
            "profiles",
            "",
        ];
        const OPS: [&str; 5] = ["INSERT", "UPDATE", "DELETE", "TRUNCATE", "insert"];
        const COLUMNS: [&str; 8] = [
            "id",
            "patient_id",
            "dentist_id",
            "notes",
            "status",
            "starts_at",
            "session_id",
            "body",
        ];

        fn column_value() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<i64>().prop_map(Value::from),
                any::<String>().prop_map(Value::from),
                any::<u128>().prop_map(|n| Value::from(Uuid::from_u128(n).to_string())),
                Just(json!({"nested": [1, 2]})),
            ]
        }

        fn row() -> impl Strategy<Value = Value> {
            prop_oneof![
                4 => prop::collection::vec((prop::sample::select(&COLUMNS[..]), column_value()), 0..8)
                    .prop_map(|cols| Value::Object(cols.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
                1 => column_value(),
            ]
        }

        /// Payloads shaped like the trigger's, with every field sometimes missing or wrong.
        fn payload_like() -> impl Strategy<Value = Value> {
            (
                prop::option::of(any::<i64>()),
                prop::option::of(prop::sample::select(&TABLES[..])),
                prop::option::of(prop::sample::select(&OPS[..])),
                prop::option::of(row()),
                prop::option::of(row()),
                prop::option::of(row()),
                prop::option::of(row()),
                any::<Option<bool>>(),
            )
                .prop_map(
                    |(id, table, op, new, old, new_session, old_session, fetch)| {
                        let mut payload = json!({"at": "2026-11-21T10:00:00Z"});
                        let fields = [
                            ("id", id.map(Value::from)),
                            ("table", table.map(Value::from)),
                            ("op", op.map(Value::from)),
                            ("new", new),
                            ("old", old),
                            ("new_session", new_session),
                            ("old_session", old_session),
                            ("fetch", fetch.map(Value::from)),
                        ];
                        for (name, value) in fields {
                            if let Some(value) = value {
                                payload[name] = value;
                            }
                        }
                        payload
                    },
                )
        }

        /// Decoding never panics; a decoded event renders, for every subscriber's view, a frame
        /// that is JSON, carries its id as the cursor, and never shows the chatbot a column
        /// outside its projection.
        fn check(text: &str) -> Result<(), TestCaseError> {
            let Ok(Payload::Inline(event)) = Payload::decode(text) else {
                return Ok(());
            };
            for perceived in Perceived::ALL {
                for projection in Projection::ALL {
                    let Some(frame) = event.frame(perceived, projection, &KEY) else {
                        continue;
                    };
                    let frame: Value = serde_json::from_slice(&frame).unwrap();
                    prop_assert_eq!(
                        &frame["cursor"],
                        &json!(KEY.mark(event.id, &event.at).to_string())
                    );
                    prop_assert_eq!(&frame["op"], perceived.as_str());
                    if projection == Projection::Slot {
                        for version in [&frame["row"], &frame["old"]] {
                            if let Some(columns) = version.as_object() {
                                prop_assert!(columns.keys().all(|c| projection.includes(c)));
                            }
                        }
                    }
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn any_text_decodes_or_is_refused(text in any::<String>()) {
                check(&text)?;
            }

            #[test]
            fn payload_shaped_json_decodes_or_is_refused(value in payload_like()) {
                check(&value.to_string())?;
            }
        }
    }

    /// A payload whose row is not an object: the error names the fault, never the row's text.
    #[test]
    fn a_malformed_payload_is_reported_without_its_values() {
        let bad = payload(
            json!({"id": 7, "table": "appointments", "op": "INSERT", "at": "t",
                                 "new": "Mrs Example, tooth 36, private notes"}),
        );
        let error = Payload::decode(&bad).unwrap_err().to_string();
        assert!(error.contains("wrong type"), "{error}");
        assert!(!error.contains("private notes"), "{error}");
        let error = Payload::decode("{\"id\": 7, \"new\": \"private")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("cut short") && !error.contains("private"),
            "{error}"
        );
    }
}
