//! Loss accounting: which sockets each committed event must reach, from the run's subscriptions
//! and the relay's authorization rules (the rules `tests/differential.rs` proves equal to
//! row-level security), compared with what the client processes received: per event, and per
//! socket.

use std::collections::{HashMap, HashSet};

use relay::authz::{Feed, Principal, Role};
use relay::event::Event;
use relay::hub::View;
use relay::protocol::{Cursor, CursorKey, Filter};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::cast::{Cast, Member};
use crate::Error;

/// The events one socket received, or should have, as a multiset digest: how many, and the
/// wrapping sum of a 64-bit mix of each id. Two sockets' digests are equal when they hold the
/// same events the same number of times (a different set giving the same digest would take a
/// collision of the mix's sums); comparing digests instead of lists keeps each client process's
/// answer to a few numbers per socket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub count: u64,
    pub sum: u64,
}

impl Digest {
    pub fn add(&mut self, id: i64) {
        // SplitMix64's finaliser: neighbouring ids map to unrelated values.
        let mut z = (id as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.count += 1;
        self.sum = self.sum.wrapping_add(z ^ (z >> 31));
    }
}

/// The run's sockets, indexed for the question "who receives this event?". A socket is named by
/// its place in [`Cast::members`].
pub struct Audience {
    /// Sockets that may see every row of a feed they subscribe to, by role: the role's
    /// principal and feeds (one stands for all, as they all see the same), and its sockets.
    broad: Vec<(Principal, Vec<Feed>, Vec<usize>)>,
    /// Sockets of users who see their own rows, by user.
    own: HashMap<Uuid, (Principal, Vec<Feed>, usize)>,
    sockets: usize,
}

impl Audience {
    pub fn new(cast: &Cast) -> Audience {
        let members: Vec<Member> = cast.members();
        let mut broad = Vec::new();
        for role in [Role::Admin, Role::Chatbot] {
            let of_role: Vec<usize> = (0..members.len())
                .filter(|i| members[*i].role == role)
                .collect();
            if let Some(first) = of_role.first() {
                let first = &members[*first];
                broad.push((first.principal(), first.feeds.clone(), of_role));
            }
        }
        let own = members
            .iter()
            .enumerate()
            .filter(|(_, m)| matches!(m.role, Role::Dentist | Role::Patient))
            .map(|(i, m)| (m.user_id, (m.principal(), m.feeds.clone(), i)))
            .collect();
        Audience {
            broad,
            own,
            sockets: members.len(),
        }
    }

    /// The sockets that must receive `event`, each once.
    pub fn recipients(&self, event: &Event) -> Vec<usize> {
        let sees = |principal: Principal, feeds: &[Feed]| {
            feeds.contains(&event.feed)
                && View {
                    principal,
                    filter: Filter::default(),
                }
                // Whether a frame is sent, not its cursor: any key will do.
                .frame(event, &CursorKey([0; 16]))
                .is_some()
        };
        let mut sockets = Vec::new();
        for (principal, feeds, of_role) in &self.broad {
            if sees(*principal, feeds) {
                sockets.extend_from_slice(of_role);
            }
        }
        let owners: HashSet<Uuid> = [&event.new, &event.old]
            .into_iter()
            .flatten()
            .flat_map(|version| version.owners.user_ids())
            .collect();
        for user in owners {
            if let Some((principal, feeds, socket)) = self.own.get(&user) {
                if sees(*principal, feeds) {
                    sockets.push(*socket);
                }
            }
        }
        sockets
    }
}

/// What the sockets received, against what they should have. `lost` and `extra` are counted
/// per event; `sockets_wrong` compares each socket's events with its own expected ones, so a
/// delivery to a socket that may not see an event cannot offset one missing elsewhere.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Accounting {
    pub events: u64,
    pub expected: u64,
    pub received: u64,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    /// Deliveries beyond the expected ones for an event (duplicates).
    pub extra: u64,
    /// Sockets compared one by one with the events the rules give them.
    pub sockets_checked: u64,
    /// Sockets whose events differ from the expected ones: one missing, one too many or one
    /// they may not see.
    pub sockets_wrong: u64,
}

/// The events in `(after, upto]`, by id: how many sockets each must reach, and the id of the
/// transaction that committed it; and by socket, the digest of the events it must receive.
pub struct Expected {
    pub deliveries: HashMap<i64, u64>,
    pub xids: HashMap<i64, u64>,
    pub per_socket: Vec<Digest>,
}

/// Reads the events in `(after, upto]` from the log and works out who must receive each.
pub async fn expected(
    client: &tokio_postgres::Client,
    audience: &Audience,
    after: Cursor,
    upto: Cursor,
) -> Result<Expected, Error> {
    const PAGE: i64 = 10_000;
    let mut expected = Expected {
        deliveries: HashMap::new(),
        xids: HashMap::new(),
        per_socket: vec![Digest::default(); audience.sockets],
    };
    let mut from = after;
    while from < upto {
        let page = relay::log::read_range(client, from, upto, None, PAGE).await?;
        let more = page.more;
        for (id, event) in page.events {
            from = id;
            let event = event.map_err(|e| format!("event {id} in the log: {e}"))?;
            let recipients = audience.recipients(&event);
            for socket in &recipients {
                expected.per_socket[*socket].add(id.0);
            }
            expected.deliveries.insert(id.0, recipients.len() as u64);
            if let Some(xid) = event.xid.as_deref().and_then(|x| x.parse().ok()) {
                expected.xids.insert(id.0, xid);
            }
        }
        if !more {
            break;
        }
    }
    Ok(expected)
}

/// Compares the deliveries of each event with what it should have had; deliveries of events
/// outside `expected` (another phase's) are not counted.
pub fn account(expected: &HashMap<i64, u64>, received: &HashMap<i64, u64>) -> Accounting {
    let mut accounting = Accounting::default();
    for (id, want) in expected {
        let got = received.get(id).copied().unwrap_or(0);
        accounting.events += 1;
        accounting.expected += want;
        accounting.received += got;
        accounting.lost += want.saturating_sub(got);
        accounting.extra += got.saturating_sub(*want);
    }
    accounting
}

/// Compares each socket's received events with its expected ones: (checked, wrong). A socket
/// missing from `received` (its process did not answer for it) counts as wrong.
pub fn compare_sockets(expected: &[Digest], received: &[Option<Digest>]) -> (u64, u64) {
    let wrong = expected
        .iter()
        .enumerate()
        .filter(|(i, want)| received.get(*i).copied().flatten() != Some(**want))
        .count();
    (expected.len() as u64, wrong as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_tell_sets_apart() {
        let of = |ids: &[i64]| {
            let mut digest = Digest::default();
            ids.iter().for_each(|id| digest.add(*id));
            digest
        };
        // Order does not matter; a missing, an extra, a repeated or a swapped event does.
        assert_eq!(of(&[1, 2, 3]), of(&[3, 1, 2]));
        assert_ne!(of(&[1, 2, 3]), of(&[1, 2]));
        assert_ne!(of(&[1, 2, 3]), of(&[1, 2, 3, 3]));
        assert_ne!(of(&[1, 2, 3]), of(&[1, 2, 4]));
        // Same count and same plain sum of ids: still apart.
        assert_ne!(of(&[1, 4]), of(&[2, 3]));
    }

    #[test]
    fn a_misdelivery_and_a_loss_for_the_same_event_do_not_cancel() {
        // Event 7 should reach sockets 0 and 1; it reached 0 and 2 instead.
        let mut want = vec![Digest::default(); 3];
        want[0].add(7);
        want[1].add(7);
        let mut got = vec![Some(Digest::default()); 3];
        got[0].as_mut().unwrap().add(7);
        got[2].as_mut().unwrap().add(7);
        let per_event = account(&HashMap::from([(7, 2)]), &HashMap::from([(7, 2)]));
        assert_eq!((per_event.lost, per_event.extra), (0, 0));
        assert_eq!(compare_sockets(&want, &got), (3, 2));
        // A socket nobody answered for is wrong, even one that expected nothing.
        got[1] = Some(want[1]);
        got[2] = None;
        assert_eq!(compare_sockets(&want, &got), (3, 1));
    }
}
