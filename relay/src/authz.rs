//! Who may see what: the relay's mirror of `sql/003_row_level_security.sql`.
//!
//! The policies in `sql/` are the source of truth; every rule here restates one of them, and
//! `docs/authorization.md` sets each policy beside the function that mirrors it. This module owns
//! the decision and nothing else: no I/O, no Postgres, no warp, so that it can be tested case by
//! case and run for every subscriber of every event without asking the database.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// The application role, from the token's `role` claim (what `auth.role()` returns in SQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Dentist,
    Patient,
    Chatbot,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Dentist, Role::Patient, Role::Chatbot];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Dentist => "dentist",
            Role::Patient => "patient",
            Role::Chatbot => "chatbot",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or(UnknownName)
    }
}

/// A watched table, as clients name it when they subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feed {
    Appointments,
    Availability,
    ConsultationSessions,
    ConsultationMessages,
}

impl Feed {
    pub const ALL: [Feed; 4] = [
        Feed::Appointments,
        Feed::Availability,
        Feed::ConsultationSessions,
        Feed::ConsultationMessages,
    ];

    /// The feed's name on the wire, which is also its table's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Feed::Appointments => "appointments",
            Feed::Availability => "availability",
            Feed::ConsultationSessions => "consultation_sessions",
            Feed::ConsultationMessages => "consultation_messages",
        }
    }

    /// Position in arrays indexed by feed.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Feed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Feed {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Feed::ALL
            .into_iter()
            .find(|feed| feed.as_str() == s)
            .ok_or(UnknownName)
    }
}

/// A name that is not one of the known roles or feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownName;

/// The verified identity behind a socket: `auth.uid()` and `auth.role()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Principal {
    pub user_id: Uuid,
    pub role: Role,
}

/// The columns the policies compare with `auth.uid()` to decide whether a row is someone's own.
///
/// For appointments and consultation sessions they are the row's own columns; for a consultation
/// message they are its session's (the message policies look the session up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owners {
    pub patient_id: Option<Uuid>,
    pub dentist_id: Option<Uuid>,
}

impl Owners {
    /// Reads `patient_id` and `dentist_id` from a row (or a session summary); absent or
    /// non-uuid values count as no owner, as they would never equal `auth.uid()`.
    pub fn from_columns(columns: &Map<String, Value>) -> Owners {
        let uuid = |name: &str| {
            columns
                .get(name)
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(s).ok())
        };
        Owners {
            patient_id: uuid("patient_id"),
            dentist_id: uuid("dentist_id"),
        }
    }

    /// The users whose own-rows policy could match this row, for indexing subscribers by user.
    pub fn user_ids(&self) -> impl Iterator<Item = Uuid> {
        let second = self.dentist_id.filter(|d| Some(*d) != self.patient_id);
        self.patient_id.into_iter().chain(second)
    }
}

/// How much of a feed a role may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Every row (an unconditional policy for this role).
    Everything,
    /// Rows whose owner column for this role equals the user's id.
    Own,
    /// No row: no policy admits this role, so subscribing is refused.
    Nothing,
}

/// Which policy of `sql/003_row_level_security.sql` applies to `role` on `feed`.
pub fn reach(role: Role, feed: Feed) -> Reach {
    use Feed::*;
    match (role, feed) {
        // *_admin policies: using (auth.role() = 'admin')
        (Role::Admin, _) => Reach::Everything,
        // availability_read: every signed-in role
        (_, Availability) => Reach::Everything,
        // appointments_chatbot: using (auth.role() = 'chatbot')
        (Role::Chatbot, Appointments) => Reach::Everything,
        // no consultation policy names the chatbot
        (Role::Chatbot, ConsultationSessions | ConsultationMessages) => Reach::Nothing,
        // *_dentist and *_patient policies
        (Role::Dentist | Role::Patient, _) => Reach::Own,
    }
}

/// Whether `principal` may see a row of `feed` whose owners are `owners`: the decision the
/// table's policies make for a SELECT by that user.
pub fn may_see(principal: &Principal, feed: Feed, owners: &Owners) -> bool {
    match reach(principal.role, feed) {
        Reach::Everything => true,
        Reach::Nothing => false,
        Reach::Own => {
            let owner = match principal.role {
                Role::Dentist => owners.dentist_id,
                Role::Patient => owners.patient_id,
                Role::Admin | Role::Chatbot => None,
            };
            owner == Some(principal.user_id)
        }
    }
}

/// Which columns of a visible row a subscriber receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    /// Every column.
    Full,
    /// Only [`SLOT_COLUMNS`]: the chatbot's view of an appointment (the `appointment_slots` view).
    Slot,
}

impl Projection {
    pub const ALL: [Projection; 2] = [Projection::Full, Projection::Slot];

    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether a column is part of this projection.
    pub fn includes(self, column: &str) -> bool {
        match self {
            Projection::Full => true,
            Projection::Slot => SLOT_COLUMNS.contains(&column),
        }
    }
}

/// The appointment columns the chatbot may read: never `patient_id` or `notes`.
pub const SLOT_COLUMNS: [&str; 6] = ["id", "dentist_id", "starts_at", "ends_at", "status", "kind"];

pub fn projection(role: Role, feed: Feed) -> Projection {
    match (role, feed) {
        (Role::Chatbot, Feed::Appointments) => Projection::Slot,
        _ => Projection::Full,
    }
}

/// What a change is to one subscriber, who may have seen the row before it, after it, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perceived {
    /// The row entered the subscriber's view (inserted, or updated into view).
    Insert,
    /// The row changed and stays in view.
    Update,
    /// The row left the subscriber's view (deleted, or updated out of view).
    Delete,
}

impl Perceived {
    pub const ALL: [Perceived; 3] = [Perceived::Insert, Perceived::Update, Perceived::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Perceived::Insert => "INSERT",
            Perceived::Update => "UPDATE",
            Perceived::Delete => "DELETE",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// From whether the subscriber could see the row before the change (`None` when there was
    /// no row before, an INSERT) and after it (`None` when there is none after, a DELETE).
    /// `None` when the subscriber sees neither version and must learn nothing.
    pub fn of(saw_before: Option<bool>, sees_after: Option<bool>) -> Option<Perceived> {
        match (saw_before.unwrap_or(false), sees_after.unwrap_or(false)) {
            (true, true) => Some(Perceived::Update),
            (false, true) => Some(Perceived::Insert),
            (true, false) => Some(Perceived::Delete),
            (false, false) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(role: Role) -> Principal {
        Principal {
            user_id: Uuid::new_v4(),
            role,
        }
    }

    fn owned_by(patient: &Principal, dentist: &Principal) -> Owners {
        Owners {
            patient_id: Some(patient.user_id),
            dentist_id: Some(dentist.user_id),
        }
    }

    #[test]
    fn admin_sees_every_row_of_every_feed() {
        let admin = user(Role::Admin);
        for feed in Feed::ALL {
            assert!(may_see(&admin, feed, &Owners::default()), "{feed}");
        }
    }

    #[test]
    fn dentist_and_patient_see_only_their_own_rows() {
        let (dentist, patient) = (user(Role::Dentist), user(Role::Patient));
        let (other_dentist, other_patient) = (user(Role::Dentist), user(Role::Patient));
        let theirs = owned_by(&patient, &dentist);
        let others = owned_by(&other_patient, &other_dentist);
        for feed in [
            Feed::Appointments,
            Feed::ConsultationSessions,
            Feed::ConsultationMessages,
        ] {
            assert!(may_see(&dentist, feed, &theirs), "{feed}");
            assert!(may_see(&patient, feed, &theirs), "{feed}");
            assert!(!may_see(&dentist, feed, &others), "{feed}");
            assert!(!may_see(&patient, feed, &others), "{feed}");
        }
    }

    #[test]
    fn ownership_is_by_the_column_of_ones_own_role() {
        // A patient whose id stands in the dentist column does not own the row, as in SQL
        // (appointments_patient compares patient_id only).
        let patient = user(Role::Patient);
        let odd = Owners {
            patient_id: Some(Uuid::new_v4()),
            dentist_id: Some(patient.user_id),
        };
        assert!(!may_see(&patient, Feed::Appointments, &odd));
        let dentist = user(Role::Dentist);
        let odd = Owners {
            patient_id: Some(dentist.user_id),
            dentist_id: Some(Uuid::new_v4()),
        };
        assert!(!may_see(&dentist, Feed::Appointments, &odd));
    }

    #[test]
    fn rows_without_owners_are_nobodys_own() {
        for role in [Role::Dentist, Role::Patient] {
            assert!(!may_see(
                &user(role),
                Feed::Appointments,
                &Owners::default()
            ));
        }
    }

    #[test]
    fn everyone_sees_all_availability() {
        for role in Role::ALL {
            assert!(may_see(&user(role), Feed::Availability, &Owners::default()));
        }
    }

    #[test]
    fn chatbot_sees_all_appointments_as_slots_and_no_consultations() {
        let bot = user(Role::Chatbot);
        assert!(may_see(&bot, Feed::Appointments, &Owners::default()));
        assert_eq!(
            projection(Role::Chatbot, Feed::Appointments),
            Projection::Slot
        );
        assert_eq!(
            projection(Role::Chatbot, Feed::Availability),
            Projection::Full
        );
        for feed in [Feed::ConsultationSessions, Feed::ConsultationMessages] {
            assert_eq!(reach(Role::Chatbot, feed), Reach::Nothing);
            let anything = owned_by(&bot, &bot);
            assert!(!may_see(&bot, feed, &anything));
        }
        assert!(!Projection::Slot.includes("patient_id"));
        assert!(!Projection::Slot.includes("notes"));
        assert!(SLOT_COLUMNS.iter().all(|c| Projection::Slot.includes(c)));
    }

    #[test]
    fn only_the_chatbot_gets_a_narrower_projection() {
        for role in [Role::Admin, Role::Dentist, Role::Patient] {
            for feed in Feed::ALL {
                assert_eq!(projection(role, feed), Projection::Full);
            }
        }
    }

    #[test]
    fn perceived_op_follows_visibility_before_and_after() {
        use Perceived::*;
        assert_eq!(Perceived::of(None, Some(true)), Some(Insert));
        assert_eq!(Perceived::of(None, Some(false)), None);
        assert_eq!(Perceived::of(Some(true), Some(true)), Some(Update));
        assert_eq!(Perceived::of(Some(false), Some(true)), Some(Insert));
        assert_eq!(Perceived::of(Some(true), Some(false)), Some(Delete));
        assert_eq!(Perceived::of(Some(false), Some(false)), None);
        assert_eq!(Perceived::of(Some(true), None), Some(Delete));
        assert_eq!(Perceived::of(Some(false), None), None);
    }

    #[test]
    fn owners_are_read_from_columns() {
        let (p, d) = (Uuid::new_v4(), Uuid::new_v4());
        let row = json!({"patient_id": p.to_string(), "dentist_id": d.to_string(), "x": 1});
        let owners = Owners::from_columns(row.as_object().unwrap());
        assert_eq!(owners.patient_id, Some(p));
        assert_eq!(owners.dentist_id, Some(d));
        assert_eq!(owners.user_ids().collect::<Vec<_>>(), vec![p, d]);
        let bad = json!({"patient_id": "not-a-uuid", "dentist_id": 7});
        assert_eq!(
            Owners::from_columns(bad.as_object().unwrap()),
            Owners::default()
        );
        let same = Owners {
            patient_id: Some(p),
            dentist_id: Some(p),
        };
        assert_eq!(same.user_ids().count(), 1);
    }

    #[test]
    fn names_round_trip() {
        for feed in Feed::ALL {
            assert_eq!(feed.as_str().parse::<Feed>(), Ok(feed));
        }
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("profiles".parse::<Feed>().is_err());
        assert!("superuser".parse::<Role>().is_err());
    }
}
