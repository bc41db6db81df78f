//! The relay's own view of latency: its `relay_commit_to_receive_seconds` and
//! `relay_commit_to_send_seconds` histograms, read from `/metrics` before and after a phase. The
//! differences say how long events took from their commit to reaching the relay, and to being
//! written or queued for every recipient, which splits the clients' commit-to-arrival latency
//! into the part before the relay has the event, the relay's dispatch, and the part after.

use serde::Serialize;

/// From commit to the relay holding the event.
pub const RECEIVED: &str = "relay_commit_to_receive_seconds";
/// From commit to the event's frames written or queued for every recipient.
pub const QUEUED: &str = "relay_commit_to_send_seconds";

/// Cumulative bucket counts: (upper bound in seconds, events at or below it), by bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets(Vec<(f64, u64)>);

/// Percentiles known to a bucket: each is the upper bound of the bucket it falls in (infinite
/// for the last, open bucket, which JSON shows as null).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AtMost {
    pub events: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Buckets {
    /// The buckets of histogram `name` in a Prometheus text exposition; empty if it has none.
    pub fn parse(text: &str, name: &str) -> Buckets {
        let mut buckets: Vec<(f64, u64)> = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix("_bucket{le=\"")?;
                let (bound, count) = rest.split_once("\"}")?;
                let bound = match bound {
                    "+Inf" => f64::INFINITY,
                    b => b.parse().ok()?,
                };
                Some((bound, count.trim().parse().ok()?))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Buckets(buckets)
    }

    /// What was counted after `earlier`, bucket by bucket.
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .map(|&(bound, count)| {
                    let before = earlier
                        .0
                        .iter()
                        .find(|(b, _)| *b == bound)
                        .map_or(0, |(_, c)| *c);
                    (bound, count.saturating_sub(before))
                })
                .collect(),
        )
    }

    /// The upper bound, in milliseconds, of the bucket holding quantile `q`.
    fn at_most(&self, q: f64) -> Option<f64> {
        let total = self.0.last()?.1;
        let rank = (q * total as f64).ceil() as u64;
        self.0
            .iter()
            .find(|(_, count)| *count >= rank.max(1))
            .map(|(bound, _)| bound * 1000.0)
    }

    /// Events counted (the +Inf bucket).
    pub fn events(&self) -> u64 {
        self.0.last().map_or(0, |(_, count)| *count)
    }

    /// The median and the 99th percentile; `f64::INFINITY` for one above the largest bound.
    pub fn percentiles(&self) -> Option<AtMost> {
        let events = self.events();
        if events == 0 {
            return None;
        }
        Some(AtMost {
            events,
            p50_ms: self.at_most(0.5)?,
            p99_ms: self.at_most(0.99)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_buckets_and_their_difference() {
        let text = "# TYPE relay_commit_to_send_seconds histogram\n\
             relay_commit_to_send_seconds_bucket{le=\"0.001\"} 5\n\
             relay_commit_to_send_seconds_bucket{le=\"0.0005\"} 2\n\
             relay_commit_to_send_seconds_bucket{le=\"+Inf\"} 6\n\
             relay_commit_to_send_seconds_count 6\n\
             relay_commit_to_receive_seconds_bucket{le=\"0.0005\"} 6\n\
             relay_commit_to_receive_seconds_bucket{le=\"+Inf\"} 6\n\
             relay_events_received_total 6\n";
        let before = Buckets::parse(text, QUEUED);
        assert_eq!(
            Buckets::parse(text, RECEIVED),
            Buckets(vec![(0.0005, 6), (f64::INFINITY, 6)])
        );
        assert_eq!(
            before,
            Buckets(vec![(0.0005, 2), (0.001, 5), (f64::INFINITY, 6)])
        );
        let after = Buckets(vec![(0.0005, 52), (0.001, 104), (f64::INFINITY, 106)]);
        let phase = after.since(&before).percentiles().unwrap();
        // 100 events: 50 within 0.5 ms, 49 more within 1 ms, one above.
        assert_eq!(phase.events, 100);
        assert_eq!(phase.p50_ms, 0.5);
        assert_eq!(phase.p99_ms, 1.0);
        assert_eq!(after.since(&before).events(), 100);
        assert!(Buckets::parse("", QUEUED).percentiles().is_none());
        assert!(after.since(&after).percentiles().is_none());
    }
}
