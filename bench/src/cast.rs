//! Who takes part in a run: the users, which of them hold a socket, and which feeds each socket
//! subscribes to. Both workloads are described here, so that the writers, the client processes
//! and the loss accounting agree on them.

use relay::authz::{Feed, Principal, Role};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The shape of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The role mix: 0.5 % admins, 10 % dentists, 89 % patients, 0.5 % chatbots, every socket on
    /// the feeds its dashboard shows, and changes across all four tables.
    Mix,
    /// The peers' workload: 50 admins and one socket per other user, all on `appointments`;
    /// each event is one appointment of one connected user, so it goes to 51 sockets.
    Fanout,
}

/// One socket: its user and the feeds it subscribes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub user_id: Uuid,
    pub role: Role,
    pub feeds: Vec<Feed>,
}

impl Member {
    pub fn principal(&self) -> Principal {
        Principal {
            user_id: self.user_id,
            role: self.role,
        }
    }
}

/// A consultation session, with its participants.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub id: Uuid,
    pub patient: Uuid,
    pub dentist: Uuid,
}

/// Everyone in a run.
#[derive(Debug, Clone)]
pub struct Cast {
    pub mode: Mode,
    pub admins: Vec<Uuid>,
    pub dentists: Vec<Uuid>,
    pub patients: Vec<Uuid>,
    pub chatbots: Vec<Uuid>,
    pub sessions: Vec<Session>,
    /// Whether dentists hold sockets (in the fan-out workload they are only named by rows).
    pub dentists_connected: bool,
}

/// Admins in the fan-out workload, as in the peers' measurements.
const FANOUT_ADMINS: usize = 50;
/// Dentists named by the fan-out workload's appointments; they hold no socket.
const FANOUT_DENTISTS: usize = 100;

impl Cast {
    /// The cast for `clients` sockets. The role mix keeps the proportions of the default 10,000
    /// (50 admins, 1,000 dentists, 8,900 patients, 50 chatbots), with at least one of each.
    pub fn new(mode: Mode, clients: usize) -> Cast {
        let ids = |n: usize| (0..n).map(|_| Uuid::new_v4()).collect::<Vec<_>>();
        let (admins, dentists, patients, chatbots, dentists_connected) = match mode {
            Mode::Mix => {
                let admins = (clients / 200).max(1);
                let chatbots = (clients / 200).max(1);
                let dentists = (clients / 10).max(1);
                let patients = clients.saturating_sub(admins + chatbots + dentists).max(1);
                (admins, dentists, patients, chatbots, true)
            }
            Mode::Fanout => {
                let admins = FANOUT_ADMINS.min(clients / 2).max(1);
                let patients = clients.saturating_sub(admins).max(1);
                (admins, FANOUT_DENTISTS, patients, 0, false)
            }
        };
        let (admins, dentists, patients) = (ids(admins), ids(dentists), ids(patients));
        // Mix: one session per ten patients, with a dentist each, for the message traffic.
        let sessions = match mode {
            Mode::Mix => patients
                .iter()
                .step_by(10)
                .enumerate()
                .map(|(i, patient)| Session {
                    id: Uuid::new_v4(),
                    patient: *patient,
                    dentist: dentists[i % dentists.len()],
                })
                .collect(),
            Mode::Fanout => Vec::new(),
        };
        Cast {
            mode,
            admins,
            dentists,
            patients,
            chatbots: ids(chatbots),
            sessions,
            dentists_connected,
        }
    }

    /// The feeds a role's socket subscribes to in this workload.
    pub fn feeds(&self, role: Role) -> Vec<Feed> {
        use Feed::*;
        match (self.mode, role) {
            (Mode::Fanout, _) => vec![Appointments],
            (Mode::Mix, Role::Admin) => Feed::ALL.to_vec(),
            (Mode::Mix, Role::Chatbot) => vec![Appointments, Availability],
            (Mode::Mix, Role::Dentist | Role::Patient) => {
                vec![Appointments, ConsultationSessions, ConsultationMessages]
            }
        }
    }

    /// Every user, with their role, for the `profiles` table.
    pub fn profiles(&self) -> Vec<(Uuid, Role)> {
        [
            (&self.admins, Role::Admin),
            (&self.dentists, Role::Dentist),
            (&self.patients, Role::Patient),
            (&self.chatbots, Role::Chatbot),
        ]
        .into_iter()
        .flat_map(|(ids, role)| ids.iter().map(move |id| (*id, role)))
        .collect()
    }

    /// The sockets of the run.
    pub fn members(&self) -> Vec<Member> {
        self.profiles()
            .into_iter()
            .filter(|(_, role)| *role != Role::Dentist || self.dentists_connected)
            .map(|(user_id, role)| Member {
                user_id,
                role,
                feeds: self.feeds(role),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_mix_is_the_documented_one() {
        let cast = Cast::new(Mode::Mix, 10_000);
        assert_eq!(
            (
                cast.admins.len(),
                cast.dentists.len(),
                cast.patients.len(),
                cast.chatbots.len()
            ),
            (50, 1_000, 8_900, 50)
        );
        assert_eq!(cast.members().len(), 10_000);
        assert_eq!(cast.sessions.len(), 890);
    }

    #[test]
    fn the_fanout_workload_connects_50_admins_and_the_users() {
        let cast = Cast::new(Mode::Fanout, 10_000);
        let members = cast.members();
        assert_eq!(members.len(), 10_000);
        assert_eq!(members.iter().filter(|m| m.role == Role::Admin).count(), 50);
        assert!(members.iter().all(|m| m.feeds == [Feed::Appointments]));
        assert!(members.iter().all(|m| m.role != Role::Dentist));
    }

    #[test]
    fn small_runs_keep_every_role() {
        let cast = Cast::new(Mode::Mix, 300);
        assert!(!cast.admins.is_empty() && !cast.chatbots.is_empty());
        assert_eq!(cast.members().len(), 300);
    }
}
