//! Loss accounting: how many sockets each committed event must reach, from the run's
//! subscriptions and the relay's authorization rules (the rules `tests/differential.rs` proves
//! equal to row-level security), compared with what the client processes received.

use std::collections::{HashMap, HashSet};

use relay::authz::{Feed, Principal, Role};
use relay::event::Event;
use relay::hub::View;
use relay::protocol::{Cursor, Filter};
use uuid::Uuid;

use crate::cast::{Cast, Member};
use crate::Error;

/// The run's sockets, indexed for the question "who receives this event?".
pub struct Audience {
    /// Sockets that may see every row of a feed they subscribe to, by role.
    broad: Vec<(Principal, Vec<Feed>, u64)>,
    /// Sockets of users who see their own rows, by user.
    own: HashMap<Uuid, (Principal, Vec<Feed>)>,
}

impl Audience {
    pub fn new(cast: &Cast) -> Audience {
        let members: Vec<Member> = cast.members();
        let mut broad = Vec::new();
        for role in [Role::Admin, Role::Chatbot] {
            let of_role: Vec<&Member> = members.iter().filter(|m| m.role == role).collect();
            if let Some(first) = of_role.first() {
                // Admins (and chatbots) all see the same: one stands for all.
                broad.push((first.principal(), first.feeds.clone(), of_role.len() as u64));
            }
        }
        let own = members
            .iter()
            .filter(|m| matches!(m.role, Role::Dentist | Role::Patient))
            .map(|m| (m.user_id, (m.principal(), m.feeds.clone())))
            .collect();
        Audience { broad, own }
    }

    /// How many sockets must receive `event`.
    pub fn expected(&self, event: &Event) -> u64 {
        let sees = |principal: Principal, feeds: &[Feed]| {
            feeds.contains(&event.feed)
                && View {
                    principal,
                    filter: Filter::default(),
                }
                .frame(event)
                .is_some()
        };
        let mut count = 0;
        for (principal, feeds, n) in &self.broad {
            if sees(*principal, feeds) {
                count += n;
            }
        }
        let owners: HashSet<Uuid> = [&event.new, &event.old]
            .into_iter()
            .flatten()
            .flat_map(|version| version.owners.user_ids())
            .collect();
        for user in owners {
            if let Some((principal, feeds)) = self.own.get(&user) {
                if sees(*principal, feeds) {
                    count += 1;
                }
            }
        }
        count
    }
}

/// What the sockets received, against what they should have. Counts are per event: a
/// delivery to a socket that may not see the event would offset one that is missing; who may see
/// what is proven separately, against row-level security, by `tests/differential.rs`.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Accounting {
    pub events: u64,
    pub expected: u64,
    pub received: u64,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    /// Deliveries beyond the expected ones for an event (duplicates).
    pub extra: u64,
}

/// The events in `(after, upto]`, by id: how many sockets each must reach, and the id of the
/// transaction that committed it.
pub struct Expected {
    pub deliveries: HashMap<i64, u64>,
    pub xids: HashMap<i64, u64>,
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
    };
    let mut from = after;
    while from < upto {
        let page = relay::log::read_range(client, from, upto, None, PAGE).await?;
        let more = page.more;
        for (id, event) in page.events {
            from = id;
            let event = event.map_err(|e| format!("event {id} in the log: {e}"))?;
            expected.deliveries.insert(id.0, audience.expected(&event));
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
