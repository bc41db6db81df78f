//! The results of a run: a JSON document, a Markdown table, and an SVG plot of the latency
//! distribution of each load phase.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cast::Mode;
use crate::expect::Accounting;
use crate::scrape::AtMost;

#[derive(Debug, Serialize)]
pub struct Results {
    pub machine: String,
    pub command: String,
    /// What was measured: the relay, or a peer in its place.
    pub server: String,
    pub mode: Mode,
    pub sockets: usize,
    pub client_processes: usize,
    /// The client processes read their sockets every this many microseconds instead of waking
    /// for each frame; 0 when they wake.
    pub poll_micros: u64,
    pub writers: usize,
    /// Rows (events) each writer's transaction commits.
    pub rows_per_commit: usize,
    pub setup: Setup,
    pub memory: Memory,
    /// Postgres alone, the same writers, no relay attached.
    pub ceiling_commits_per_second: f64,
    pub phases: Vec<Phase>,
    pub replay: Option<Replay>,
}

#[derive(Debug, Serialize)]
pub struct Setup {
    /// Authenticated connect plus subscribe, every socket, all client processes together.
    pub sockets_per_second: f64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Memory {
    pub relay_before_bytes: u64,
    pub relay_idle_bytes: u64,
    /// (idle − before) / sockets: what one idle, subscribed socket costs the relay.
    pub per_socket_bytes: f64,
}

#[derive(Debug, Serialize)]
pub struct Phase {
    pub name: String,
    /// Events per second asked of the writers; none for "as fast as Postgres accepts".
    pub target_per_second: Option<f64>,
    pub seconds: f64,
    pub events_per_second: f64,
    pub deliveries_per_second: f64,
    /// Commits per second as a share of Postgres' ceiling (commits per second without the relay).
    pub ratio_to_ceiling: f64,
    pub accounting: Accounting,
    /// Share of the expected deliveries that had arrived when the writers stopped.
    pub delivered_within_run: f64,
    pub out_of_order: u64,
    /// Deliveries whose read carried no kernel receive time, timed at the socket as when read
    /// (none where the kernel stamps every segment).
    pub unstamped: u64,
    /// Sockets that had closed by the end of the phase (the relay cut them, or they failed).
    pub closed_sockets: u64,
    /// From the event's `at`, taken inside the committing transaction just before its commit: an
    /// upper bound on commit-to-client latency.
    pub latency_ms: Percentiles,
    /// From the moment the writer saw its commit acknowledged: a lower bound, since the
    /// acknowledgement reaches the writer after the commit.
    pub latency_from_acknowledgement_ms: Percentiles,
    /// The same to each delivery's arrival at the client's socket.
    pub latency_from_acknowledgement_at_socket_ms: Percentiles,
    /// Deliveries that arrived before their writer had seen the acknowledgement.
    pub arrived_before_acknowledgement: u64,
    /// The phase's events matched with a writer's acknowledgement.
    pub acknowledged_events: u64,
    /// From each event's commit timestamp, when Postgres keeps them.
    pub from_commit_timestamp: Option<FromCommitTimestamp>,
    /// From commit to the relay holding the event, from the relay's own histogram: the part of
    /// the latency spent before the relay.
    pub relay_received_ms: Option<AtMost>,
    /// From commit to written or queued for every recipient inside the relay, from the relay's
    /// own histogram: the part of the latency before the last socket's write.
    pub relay_queued_ms: Option<AtMost>,
    /// The share of all the machine's cores that was busy while the writers ran; none where
    /// `/proc/stat` could not be read.
    pub machine_busy: Option<f64>,
    /// The share of all the machine's cores taken by the hypervisor for other guests over the
    /// same span (included in `machine_busy`): on a shared host, time nothing here could use.
    pub machine_stolen: Option<f64>,
    /// The client processes' CPU time over the phase (writing and draining), together, as a
    /// share of one core: the load generator's part of the machine.
    pub clients_cpu_cores: f64,
    /// The relay's CPU time over the phase (writing and draining), as a share of one core.
    pub relay_cpu_cores: f64,
    /// CPU seconds the relay spent per 100,000 deliveries: the cores it needs per 100,000
    /// deliveries per second.
    pub relay_cores_per_100k_deliveries: f64,
    #[serde(skip)]
    pub curve: Vec<(f64, f64)>,
}

/// Latency from the commit timestamp Postgres records for each transaction
/// (`track_commit_timestamp`), taken just before it writes the commit: between the two other
/// measures, and the closest to the commit itself.
#[derive(Debug, Serialize)]
pub struct FromCommitTimestamp {
    /// To when the client process read the delivery.
    pub latency_ms: Percentiles,
    /// To when the delivery reached the client's socket (the kernel's receive time of the last
    /// segment of the read that completed its frame), whenever the client process got to read it.
    pub at_socket_ms: Percentiles,
    /// Deliveries that arrived before their transaction's commit timestamp (none should).
    pub arrived_before: u64,
    /// The phase's events that had a commit timestamp.
    pub events: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: histogram.max() as f64 / 1000.0,
        }
    }
}

/// Latency (ms) at percentiles from 0 to 99.99, for the plot.
pub fn curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    (0..=80)
        .map(|i| {
            // Evenly spaced in "nines": 0, ..., 90, ..., 99, ..., 99.99.
            let nines = f64::from(i) / 20.0;
            let quantile = 1.0 - 10f64.powf(-nines);
            (nines, histogram.value_at_quantile(quantile) as f64 / 1000.0)
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct Replay {
    pub events: usize,
    pub first_ms: f64,
    pub all_ms: f64,
    /// The share of the machine's cores the hypervisor took for other guests meanwhile (to the
    /// nearest of `/proc/stat`'s 10 ms ticks, so coarse over so short a span).
    pub stolen: Option<f64>,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl Results {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "machine: {}", self.machine);
        let _ = writeln!(out, "command: `{}`", self.command);
        let _ = writeln!(out, "server: {}\n", self.server);
        let _ = writeln!(
            out,
            "{} sockets ({:?} workload) from {} client processes{}; {} writer connections, {} row{} per commit\n",
            self.sockets,
            self.mode,
            self.client_processes,
            if self.poll_micros > 0 {
                format!(" reading every {} µs", self.poll_micros)
            } else {
                String::new()
            },
            self.writers,
            self.rows_per_commit,
            if self.rows_per_commit == 1 { "" } else { "s" }
        );
        let _ = writeln!(out, "| measure | value |\n|---|---|");
        let _ = writeln!(
            out,
            "| connect + subscribe | {:.0} sockets/s ({:.2} s for all) |",
            self.setup.sockets_per_second, self.setup.seconds
        );
        let _ = writeln!(
            out,
            "| relay memory | {:.1} MiB before sockets, {:.1} MiB with all idle and subscribed |",
            mib(self.memory.relay_before_bytes),
            mib(self.memory.relay_idle_bytes)
        );
        let _ = writeln!(
            out,
            "| memory per idle socket | {:.1} KiB |",
            self.memory.per_socket_bytes / 1024.0
        );
        let _ = writeln!(
            out,
            "| Postgres ceiling (no relay) | {:.0} commits/s ({:.0} events/s) |",
            self.ceiling_commits_per_second,
            self.ceiling_commits_per_second * self.rows_per_commit as f64
        );
        if let Some(replay) = &self.replay {
            let _ = writeln!(
                out,
                "| replay of {} missed events | first after {:.1} ms, all after {:.1} ms{} |",
                replay.events,
                replay.first_ms,
                replay.all_ms,
                replay.stolen.map_or_else(String::new, |stolen| format!(
                    " ({:.0} % of the machine stolen)",
                    stolen * 100.0
                ))
            );
        }
        let _ = writeln!(
            out,
            "\n| phase | events/s | deliveries/s | of ceiling | lost | extra | sockets wrong | within run | p50 | p90 | p99 | p99.9 | max | relay CPU | cores per 100k deliveries/s |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for p in &self.phases {
            let l = &p.latency_ms;
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.0} | {:.0} % | {} | {} | {} of {} | {:.2} % | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} ms | {:.1} ms | {:.0} % | {:.2} |",
                p.name,
                p.events_per_second,
                p.deliveries_per_second,
                p.ratio_to_ceiling * 100.0,
                p.accounting.lost,
                p.accounting.extra,
                p.accounting.sockets_wrong,
                p.accounting.sockets_checked,
                p.delivered_within_run * 100.0,
                l.p50,
                l.p90,
                l.p99,
                l.p999,
                l.max,
                p.relay_cpu_cores * 100.0,
                p.relay_cores_per_100k_deliveries
            );
        }
        let _ = writeln!(
            out,
            "\n| phase | machine busy | client processes' CPU | `at` → received by the relay, p50 | p99 | `at` → handed over by the relay, p50 | p99 | `at` → client, p50 | p99 | commit timestamp → client, p50 | p99 | commit timestamp → client's socket, p50 | p99 | acknowledged commit → client, p50 | p99 | arrived before the acknowledgement |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for p in &self.phases {
            let at_most = |ms: f64| {
                if ms.is_finite() {
                    format!("≤ {ms:.1} ms")
                } else {
                    "above the largest bucket".to_string()
                }
            };
            let bounds = |h: Option<AtMost>| {
                h.map_or_else(
                    || ("n/a".to_string(), "n/a".to_string()),
                    |q| (at_most(q.p50_ms), at_most(q.p99_ms)),
                )
            };
            let (received_p50, received_p99) = bounds(p.relay_received_ms);
            let (queued_p50, queued_p99) = bounds(p.relay_queued_ms);
            let busy = match (p.machine_busy, p.machine_stolen) {
                (Some(busy), Some(stolen)) => {
                    format!("{:.0} % ({:.0} % stolen)", busy * 100.0, stolen * 100.0)
                }
                (Some(busy), None) => format!("{:.0} %", busy * 100.0),
                _ => "n/a".to_string(),
            };
            let from_commit = |of: fn(&FromCommitTimestamp) -> &Percentiles| {
                p.from_commit_timestamp.as_ref().map_or_else(
                    || ("n/a".to_string(), "n/a".to_string()),
                    |c| {
                        (
                            format!("{:.2} ms", of(c).p50),
                            format!("{:.2} ms", of(c).p99),
                        )
                    },
                )
            };
            let (committed_p50, committed_p99) = from_commit(|c| &c.latency_ms);
            let (socket_p50, socket_p99) = from_commit(|c| &c.at_socket_ms);
            let _ = writeln!(
                out,
                "| {} | {busy} | {:.0} % | {received_p50} | {received_p99} | {queued_p50} | {queued_p99} | {:.2} ms | {:.2} ms | {committed_p50} | {committed_p99} | {socket_p50} | {socket_p99} | {:.2} ms | {:.2} ms | {:.1} % |",
                p.name,
                p.clients_cpu_cores * 100.0,
                p.latency_ms.p50,
                p.latency_ms.p99,
                p.latency_from_acknowledgement_ms.p50,
                p.latency_from_acknowledgement_ms.p99,
                p.arrived_before_acknowledgement as f64 * 100.0
                    / p.accounting.received.max(1) as f64,
            );
        }
        out
    }

    /// Latency against percentile, one line per phase, log-scaled latency.
    pub fn svg(&self) -> String {
        const W: f64 = 720.0;
        const H: f64 = 420.0;
        const LEFT: f64 = 70.0;
        const BOTTOM: f64 = 50.0;
        const TOP: f64 = 40.0;
        const RIGHT: f64 = 150.0;
        let (plot_w, plot_h) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let highest = self
            .phases
            .iter()
            .flat_map(|p| p.curve.iter().map(|(_, ms)| *ms))
            .fold(1.0f64, f64::max);
        let (low, high) = (0.01f64.log10(), (highest * 1.5).log10());
        let x = |nines: f64| LEFT + nines / 4.0 * plot_w;
        let y = |ms: f64| TOP + plot_h - (ms.max(0.01).log10() - low) / (high - low) * plot_h;
        let mut svg = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{LEFT}" y="22" font-size="14">Commit-to-client latency by percentile ({} sockets)</text>
"#,
            self.sockets
        );
        for (nines, label) in [
            (0.0, "0"),
            (1.0, "90"),
            (2.0, "99"),
            (3.0, "99.9"),
            (4.0, "99.99"),
        ] {
            let _ = writeln!(
                svg,
                r##"<line x1="{0}" y1="{TOP}" x2="{0}" y2="{1}" stroke="#ddd"/><text x="{0}" y="{2}" text-anchor="middle">{label}</text>"##,
                x(nines),
                TOP + plot_h,
                TOP + plot_h + 18.0
            );
        }
        let mut ms = 0.01;
        while ms <= highest * 1.5 {
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{0}" x2="{1}" y2="{0}" stroke="#ddd"/><text x="{2}" y="{3}" text-anchor="end">{ms} ms</text>"##,
                y(ms),
                LEFT + plot_w,
                LEFT - 6.0,
                y(ms) + 4.0
            );
            ms *= 10.0;
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
            LEFT + plot_w / 2.0,
            H - 10.0
        );
        let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
        for (i, phase) in self.phases.iter().enumerate() {
            let colour = colours[i % colours.len()];
            let points: Vec<String> = phase
                .curve
                .iter()
                .map(|(nines, ms)| format!("{:.1},{:.1}", x(*nines), y(*ms)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" fill="{colour}">{}</text>"#,
                LEFT + plot_w + 10.0,
                TOP + 16.0 * (i as f64 + 1.0),
                phase.name
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_rises_with_the_percentile() {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        for us in 1..=10_000u64 {
            histogram.record(us).unwrap();
        }
        let curve = curve(&histogram);
        assert_eq!(curve.first().unwrap().0, 0.0);
        assert!(curve.windows(2).all(|w| w[1].1 >= w[0].1));
        let p = Percentiles::of(&histogram);
        assert!((p.p50 - 5.0).abs() < 0.1, "{p:?}");
        assert!(p.max >= p.p999 && p.p999 >= p.p99 && p.p99 >= p.p90);
    }
}
