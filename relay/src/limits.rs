//! Limits that keep one client, or one user, from harming the others: how many sockets the relay
//! and each user may hold, and how fast a socket may send frames. Pure bookkeeping, no I/O; the
//! HTTP layer refuses an upgrade that [`Admission`] does not admit, and the session closes a
//! socket whose [`FrameRate`] runs out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use uuid::Uuid;

/// Why a socket was not admitted. Answered before the upgrade, as HTTP with a JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this user already has {0} open sockets, the most allowed; close one first")]
    TooManyForUser(usize),
    #[error(
        "the relay holds {0} sockets, the most it allows; try again later or another instance"
    )]
    Full(usize),
}

impl Refusal {
    /// The `error` code of the HTTP body.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::TooManyForUser(_) => "too_many_sockets",
            Refusal::Full(_) => "relay_full",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_user: HashMap<Uuid, usize>,
}

/// Counts open sockets, in total and per user, against their limits.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_user: usize,
    counts: Mutex<Counts>,
}

/// One admitted socket; dropping it frees its place.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    user: Uuid,
}

impl Admission {
    pub fn new(max_total: usize, max_per_user: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_total,
            max_per_user,
            counts: Mutex::default(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent whatever panicked while holding the lock: every change is
        // one increment or decrement.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place for one more socket of `user`, or says which limit refuses it.
    pub fn admit(self: &Arc<Self>, user: Uuid) -> Result<Ticket, Refusal> {
        let mut counts = self.counts();
        if counts.total >= self.max_total {
            return Err(Refusal::Full(self.max_total));
        }
        let mine = counts.per_user.entry(user).or_default();
        if *mine >= self.max_per_user {
            return Err(Refusal::TooManyForUser(self.max_per_user));
        }
        *mine += 1;
        counts.total += 1;
        Ok(Ticket {
            admission: self.clone(),
            user,
        })
    }

    /// Sockets admitted and not yet closed.
    pub fn open(&self) -> usize {
        self.counts().total
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = self.admission.counts();
        counts.total -= 1;
        if let Some(mine) = counts.per_user.get_mut(&self.user) {
            *mine -= 1;
            if *mine == 0 {
                counts.per_user.remove(&self.user);
            }
        }
    }
}

/// A token bucket over a socket's inbound frames: `per_second` frames a second on average, and
/// bursts of up to `per_second` frames.
///
/// Frames are counted as they are read. While one frame's work runs (a replay can take seconds),
/// the socket is not read, and what the client sent meanwhile is read at once afterwards:
/// [`FrameRate::resume`] credits that time, so a client within the rate is not taken for one over
/// it.
#[derive(Debug, Clone)]
pub struct FrameRate {
    per_second: f64,
    tokens: f64,
    /// Tokens above `per_second` credited for time the socket went unread; it wanes as time
    /// passes, at the rate itself.
    credit: f64,
    last: Instant,
}

impl FrameRate {
    pub fn new(per_second: u32, now: Instant) -> FrameRate {
        FrameRate {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            credit: 0.0,
            last: now,
        }
    }

    /// Counts one frame read at `now`; false when the socket is over its rate.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.credit = (self.credit - elapsed * self.per_second).max(0.0);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second + self.credit);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Reading resumes at `now` after the last frame's work: the client may have sent frames at
    /// the full rate all the while, and those waiting are read now, so the time since that frame
    /// was read fills the bucket past its usual size.
    pub fn resume(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens += elapsed * self.per_second;
        self.credit = (self.tokens - self.per_second).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sockets_are_admitted_up_to_each_limit_and_freed_on_drop() {
        let admission = Admission::new(3, 2);
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a1 = admission.admit(alice).unwrap();
        let _a2 = admission.admit(alice).unwrap();
        assert_eq!(
            admission.admit(alice).unwrap_err(),
            Refusal::TooManyForUser(2)
        );
        let _b1 = admission.admit(bob).unwrap();
        assert_eq!(admission.admit(bob).unwrap_err(), Refusal::Full(3));
        assert_eq!(admission.open(), 3);
        drop(a1);
        assert_eq!(admission.open(), 2);
        let _b2 = admission.admit(bob).unwrap();
        assert_eq!(admission.admit(alice).unwrap_err(), Refusal::Full(3));
    }

    #[test]
    fn a_refusal_takes_no_place() {
        let admission = Admission::new(10, 1);
        let user = Uuid::new_v4();
        let _ticket = admission.admit(user).unwrap();
        for _ in 0..5 {
            assert!(admission.admit(user).is_err());
        }
        assert_eq!(admission.open(), 1);
    }

    #[test]
    fn refusals_have_codes_and_messages() {
        assert_eq!(Refusal::TooManyForUser(4).code(), "too_many_sockets");
        assert_eq!(Refusal::Full(9).code(), "relay_full");
        assert!(Refusal::TooManyForUser(4).to_string().contains('4'));
        assert!(Refusal::Full(9).to_string().contains('9'));
    }

    #[test]
    fn the_frame_rate_allows_a_burst_then_the_average() {
        let start = Instant::now();
        let mut rate = FrameRate::new(10, start);
        for i in 0..10 {
            assert!(rate.allow(start), "frame {i} of the burst");
        }
        assert!(!rate.allow(start), "the eleventh frame in the same instant");
        // A tenth of a second buys one more frame.
        let later = start + Duration::from_millis(100);
        assert!(rate.allow(later));
        assert!(!rate.allow(later));
        // A long pause refills the bucket, never beyond one burst.
        let much_later = later + Duration::from_secs(60);
        for _ in 0..10 {
            assert!(rate.allow(much_later));
        }
        assert!(!rate.allow(much_later));
    }

    #[test]
    fn a_steady_client_under_the_rate_is_never_refused() {
        let start = Instant::now();
        let mut rate = FrameRate::new(5, start);
        for i in 0..1000u64 {
            assert!(rate.allow(start + Duration::from_millis(i * 250)));
        }
    }

    #[test]
    fn frames_sent_while_the_socket_went_unread_are_read_at_once_within_the_rate() {
        let start = Instant::now();
        let mut rate = FrameRate::new(10, start);
        // A burst, the last frame of which starts 3 s of work (a replay).
        for i in 0..10 {
            assert!(rate.allow(start), "frame {i} of the burst");
        }
        let done = start + Duration::from_secs(3);
        rate.resume(done);
        // Meanwhile the client sent at the rate: 30 frames, all read now.
        for i in 0..30 {
            assert!(rate.allow(done), "frame {i} sent during the work");
        }
        assert!(
            !rate.allow(done),
            "one more than the rate allowed over the 3 s"
        );
        // From here the usual burst and average hold.
        let later = done + Duration::from_secs(60);
        for _ in 0..10 {
            assert!(rate.allow(later));
        }
        assert!(!rate.allow(later));
    }

    #[test]
    fn the_credit_for_unread_time_wanes_as_time_passes() {
        let start = Instant::now();
        let mut rate = FrameRate::new(10, start);
        assert!(rate.allow(start));
        rate.resume(start + Duration::from_secs(5));
        // Unused, the credit of the 5 s wanes at the rate: 5 s later, one burst and no more.
        let later = start + Duration::from_secs(10);
        for _ in 0..10 {
            assert!(rate.allow(later));
        }
        assert!(!rate.allow(later));
    }
}
