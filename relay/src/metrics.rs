//! `GET /metrics`: the relay's state and counters in the Prometheus text format.
//!
//! Counters live where the work is done (the hub's [`Counters`](crate::hub::Counters), plain
//! atomics); a scrape reads them into a fresh registry with the gauges of the moment and the
//! commit-to-send histogram, and encodes that. Nothing here holds a token or a row.

use std::time::{Duration, SystemTime};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::authz::{Feed, Role};
use crate::hub::Hub;

/// The histogram's buckets, in seconds: a tenth of a millisecond apart below one millisecond,
/// where a healthy relay's events fall, then wider up to ten seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0002, 0.0003, 0.0004, 0.0005, 0.0006, 0.0007, 0.0008, 0.0009, 0.001, 0.0012, 0.0015, 0.002,
    0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// What the relay measures as it goes, beyond the hub's counters.
pub struct Metrics {
    /// From an event's commit (its `at`, the database's clock) to the relay holding it, read and
    /// parsed from its notification (the relay's clock), once per event: the part of the
    /// latency spent before the relay.
    commit_to_receive: Histogram,
    /// From an event's commit to its frames being written or queued for every recipient, once per
    /// event.
    commit_to_send: Histogram,
}

fn latency_histogram(name: &str, help: &str) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    // The options are constant and valid.
    Histogram::with_opts(opts).expect("valid histogram options")
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            commit_to_receive: latency_histogram(
                "relay_commit_to_receive_seconds",
                "From an event's commit to the relay holding it, before its dispatch",
            ),
            commit_to_send: latency_histogram(
                "relay_commit_to_send_seconds",
                "From an event's commit to its frames being written or queued for every recipient",
            ),
        }
    }
}

impl Metrics {
    /// Records one event's commit-to-receive and commit-to-send times; `at` is the event's
    /// RFC 3339 commit time, `received` when the relay had parsed its notification, `sent` when
    /// its frames were written or queued. A time that cannot be read records nothing; one that
    /// lies ahead of this clock (clock skew) counts as zero.
    pub fn dispatched(&self, at: &str, received: SystemTime, sent: SystemTime) {
        let format = time::format_description::well_known::Rfc3339;
        let Ok(committed) = time::OffsetDateTime::parse(at, &format) else {
            return;
        };
        let committed = SystemTime::from(committed);
        let since = |then: SystemTime| then.duration_since(committed).unwrap_or(Duration::ZERO);
        self.commit_to_receive
            .observe(since(received).as_secs_f64());
        self.commit_to_send.observe(since(sent).as_secs_f64());
    }
}

/// The state a scrape reports beyond the hub.
pub struct Scrape {
    pub listening: bool,
    /// The newest event id committed to the log, when the database answered in time.
    pub newest_event: Option<i64>,
    pub presence_members: usize,
    /// Client connections open (HTTP and WebSocket), and the most the relay holds at once.
    pub connections: (usize, usize),
}

/// Renders every metric in the Prometheus text format.
pub fn render(hub: &Hub, metrics: &Metrics, scrape: &Scrape) -> String {
    let registry = Registry::new();
    let snapshot = hub.snapshot();
    let counters = hub.counters();
    let load =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);

    let gauge = |name: &str, help: &str, value: i64| {
        let gauge = IntGauge::new(name, help).expect("valid gauge");
        gauge.set(value);
        registry.register(Box::new(gauge)).expect("unique metric");
    };
    let counter = |name: &str, help: &str, value: u64| {
        let counter = IntCounter::new(name, help).expect("valid counter");
        counter.inc_by(value);
        registry.register(Box::new(counter)).expect("unique metric");
    };

    gauge(
        "relay_sockets_connected",
        "WebSockets open on this instance",
        snapshot.connected_sockets as i64,
    );
    let subscriptions = IntGaugeVec::new(
        Opts::new(
            "relay_subscriptions",
            "Subscriptions held, by feed and role",
        ),
        &["feed", "role"],
    )
    .expect("valid gauge");
    for feed in Feed::ALL {
        for role in Role::ALL {
            let held = snapshot
                .subscriptions_by_feed
                .get(&feed)
                .and_then(|roles| roles.get(&role))
                .copied()
                .unwrap_or(0);
            subscriptions
                .with_label_values(&[feed.as_str(), role.as_str()])
                .set(held as i64);
        }
    }
    registry
        .register(Box::new(subscriptions))
        .expect("unique metric");
    gauge(
        "relay_listening",
        "1 while the LISTEN connection to Postgres is up and caught up, else 0",
        scrape.listening as i64,
    );
    let position = hub.position().map_or(0, |p| p.0);
    gauge(
        "relay_event_log_position",
        "Id of the last event dispatched to subscribers",
        position,
    );
    if let Some(newest) = scrape.newest_event {
        gauge(
            "relay_event_log_newest",
            "Id of the newest event committed to the event log",
            newest,
        );
        gauge(
            "relay_event_log_lag_events",
            "Events committed but not yet dispatched (newest minus position)",
            (newest - position).max(0),
        );
    }
    gauge(
        "relay_client_connections",
        "Client connections open, HTTP and WebSocket, counted from accept to close",
        scrape.connections.0 as i64,
    );
    gauge(
        "relay_client_connections_limit",
        "The most client connections held at once (what the open-file limit leaves); at it, new \
         connections wait to be accepted",
        scrape.connections.1.min(i64::MAX as usize) as i64,
    );
    gauge(
        "relay_presence_members",
        "Users present in consultation sessions, counted once per session",
        scrape.presence_members as i64,
    );

    let totals = [
        (
            "relay_events_received_total",
            "Events handed to the hub",
            &counters.events_received,
        ),
        (
            "relay_messages_delivered_total",
            "Event frames queued to sockets",
            &counters.messages_delivered,
        ),
        (
            "relay_slow_consumers_cut_total",
            "Sockets closed (4008) because their outbound queue was full; nothing is dropped otherwise",
            &counters.slow_consumers_cut,
        ),
        (
            "relay_events_malformed_total",
            "Notifications and event-log rows that could not be decoded",
            &counters.events_malformed,
        ),
        (
            "relay_replays_total",
            "Resumed subscriptions whose replay completed",
            &counters.replays,
        ),
        (
            "relay_replayed_events_total",
            "Event frames sent by replays",
            &counters.replayed,
        ),
        (
            "relay_listen_reconnects_total",
            "Times the LISTEN connection was re-established after a loss",
            &counters.listen_reconnects,
        ),
        (
            "relay_starts_over_total",
            "Times every socket was closed (4010) for clients to fetch current state: the event log went back, or a forged event was dispatched",
            &counters.starts_over,
        ),
    ];
    for (name, help, value) in totals {
        counter(name, help, load(value));
    }
    for histogram in [&metrics.commit_to_receive, &metrics.commit_to_send] {
        registry
            .register(Box::new(histogram.clone()))
            .expect("unique metric");
    }

    let mut text = Vec::new();
    // Encoding gathered families into a Vec cannot fail.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut text);
    String::from_utf8(text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_its_type() {
        let hub = Hub::new(4);
        let metrics = Metrics::default();
        let now = SystemTime::now();
        metrics.dispatched(
            &crate::rfc3339(now - Duration::from_millis(3)),
            now - Duration::from_micros(2450),
            now,
        );
        metrics.dispatched("not a time", now, now);
        let text = render(
            &hub,
            &metrics,
            &Scrape {
                listening: true,
                newest_event: Some(7),
                presence_members: 2,
                connections: (3, 900),
            },
        );
        for line in [
            "# TYPE relay_sockets_connected gauge",
            "relay_subscriptions{feed=\"appointments\",role=\"chatbot\"} 0",
            "relay_listening 1",
            "relay_event_log_lag_events 7",
            "relay_presence_members 2",
            "relay_client_connections 3",
            "relay_client_connections_limit 900",
            "# TYPE relay_events_received_total counter",
            "relay_slow_consumers_cut_total 0",
            "# TYPE relay_commit_to_send_seconds histogram",
            "relay_commit_to_send_seconds_count 1",
            "relay_commit_to_send_seconds_bucket{le=\"0.005\"} 1",
            "relay_commit_to_send_seconds_bucket{le=\"0.002\"} 0",
            "# TYPE relay_commit_to_receive_seconds histogram",
            "relay_commit_to_receive_seconds_count 1",
            "relay_commit_to_receive_seconds_bucket{le=\"0.0005\"} 0",
            "relay_commit_to_receive_seconds_bucket{le=\"0.0006\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
