//! The benchmark's `--quick` run, in both workloads, so the tool never rots: a fresh database, a
//! real relay process, a few hundred real sockets from two client processes, every phase. Figures are reported, not
//! asserted; what must hold is that the run completes, accounts for every delivery with nothing
//! lost or extra, and writes its three results.

use std::path::Path;
use std::process::Command;

/// One workload after the other: run side by side, two relays, their client processes and
/// writers as fast as Postgres commits would share two cores, and a run starved that much can
/// see its slowest sockets cut by its own relay.
#[test]
fn a_quick_run_of_each_workload_completes_and_loses_nothing() {
    quick_run("mix", None, 0);
    // Client processes that sleep between reads instead of waking for each frame.
    quick_run("fanout", None, 500);
    // The peer the fan-out workload measures the relay against, in the relay's place: its
    // packages come from `npm ci --prefix bench/peer` (scripts/test runs it).
    quick_run("fanout", Some("socketio"), 0);
    // Each PostGraphile run first checks that the peer refuses a user the admins' topic and
    // another user's, and fails if it does not.
    quick_run("fanout", Some("postgraphile"), 0);
    quick_run("fanout", Some("postgraphile-ids"), 0);
}

fn quick_run(mode: &str, peer: Option<&str>, poll_micros: u64) {
    let bench = Path::new(env!("CARGO_BIN_EXE_relay-bench"));
    // `cargo test --workspace` builds the relay binary beside this one.
    let relay = bench.with_file_name("relay");
    let out = std::env::temp_dir().join(format!(
        "relay-bench-{mode}-{}-{}",
        peer.unwrap_or("relay"),
        std::process::id()
    ));
    let mut command = Command::new(bench);
    command
        .args(["--quick", "--mode", mode, "--relay-bin"])
        .arg(&relay)
        .arg("--out")
        .arg(&out)
        .args(["--client-poll-micros", &poll_micros.to_string()]);
    match peer {
        None => {}
        // Several rows per commit too: events faster than single-row commits.
        Some("socketio") => {
            command.args(["--peer", "socketio", "--rows-per-commit", "3"]);
        }
        // PostGraphile reads each event back for each subscriber: a few sockets, a low rate and
        // no phase as fast as Postgres commits, or it would take minutes to catch up. The rate
        // still gives the client processes enough to read that their CPU time shows in /proc's
        // ticks.
        Some("postgraphile") => {
            command.args([
                "--peer",
                "postgraphile",
                "--clients",
                "40",
                "--rate",
                "40",
                "--no-max",
            ]);
        }
        // With node ids only it reads nothing back and keeps up with the quick run's rate; the
        // phase as fast as Postgres commits would still leave it seconds behind.
        Some(peer) => {
            command.args(["--peer", peer, "--no-max"]);
        }
    }
    let status = command.status().expect("run relay-bench");
    assert!(status.success(), "relay-bench --quick failed: {status}");

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let phases = results["phases"].as_array().expect("phases");
    assert_eq!(results["poll_micros"], poll_micros);
    let expected_phases = if peer.is_some_and(|p| p.starts_with("postgraphile")) {
        1
    } else {
        2
    };
    assert_eq!(phases.len(), expected_phases, "{results}");
    for phase in phases {
        let accounting = &phase["accounting"];
        assert!(accounting["events"].as_u64().unwrap() > 0, "{phase}");
        assert_eq!(accounting["lost"], 0, "{phase}");
        assert_eq!(accounting["extra"], 0, "{phase}");
        assert_eq!(accounting["expected"], accounting["received"], "{phase}");
        // Every socket got exactly its own events.
        assert_eq!(accounting["sockets_checked"], results["sockets"], "{phase}");
        assert_eq!(accounting["sockets_wrong"], 0, "{phase}");
        assert_eq!(phase["out_of_order"], 0, "{phase}");
        // Every delivery was timed at its socket by the kernel.
        assert_eq!(phase["unstamped"], 0, "{phase}");
        assert_eq!(phase["closed_sockets"], 0, "{phase}");
        // Measured from the writers' acknowledgements too: never later than from `at`, which
        // is taken inside the transaction before it commits.
        let (from_at, from_ack) = (
            &phase["latency_ms"],
            &phase["latency_from_acknowledgement_ms"],
        );
        assert_eq!(
            phase["acknowledged_events"], accounting["events"],
            "every event matched with its writer's acknowledgement: {phase}"
        );
        assert!(from_ack["p50"].as_f64().unwrap() > 0.0, "{phase}");
        // Each delivery reached its socket before the client process read it.
        let from_ack_at_socket = &phase["latency_from_acknowledgement_at_socket_ms"];
        for p in ["p50", "p90", "p99"] {
            assert!(
                from_ack[p].as_f64().unwrap() <= from_at[p].as_f64().unwrap(),
                "{p}: {phase}"
            );
            assert!(
                from_ack_at_socket[p].as_f64().unwrap() <= from_ack[p].as_f64().unwrap(),
                "{p}: {phase}"
            );
        }
        // From the commit timestamps, when the server keeps them: between the two.
        if let Some(committed) = phase["from_commit_timestamp"].as_object() {
            assert_eq!(committed["events"], accounting["events"], "{phase}");
            assert_eq!(committed["arrived_before"], 0, "{phase}");
            for p in ["p50", "p90", "p99"] {
                let value = committed["latency_ms"][p].as_f64().unwrap();
                assert!(value <= from_at[p].as_f64().unwrap(), "{p}: {phase}");
                assert!(value >= from_ack[p].as_f64().unwrap(), "{p}: {phase}");
                let at_socket = committed["at_socket_ms"][p].as_f64().unwrap();
                assert!(at_socket <= value, "{p}: {phase}");
            }
        }
        // The client processes did the reading, and their CPU time was counted.
        assert!(
            phase["clients_cpu_cores"].as_f64().unwrap() > 0.0,
            "{phase}"
        );
        // So was the server's, relay or peer.
        assert!(phase["relay_cpu_cores"].as_f64().unwrap() > 0.0, "{phase}");
        if peer.is_some() {
            // A peer has no histograms of its own.
            assert!(phase["relay_received_ms"].is_null(), "{phase}");
            continue;
        }
        // The relay's own histograms, read from its /metrics, counted the phase's events, and
        // each event reached the relay before its frames were handed over.
        for histogram in ["relay_received_ms", "relay_queued_ms"] {
            assert_eq!(
                phase[histogram]["events"], accounting["events"],
                "{histogram}: {phase}"
            );
        }
        for p in ["p50_ms", "p99_ms"] {
            assert!(
                phase["relay_received_ms"][p].as_f64().unwrap()
                    <= phase["relay_queued_ms"][p].as_f64().unwrap(),
                "{p}: {phase}"
            );
        }
    }
    match peer {
        None => {
            assert_eq!(results["replay"]["events"], 1000);
            assert_eq!(results["server"], "the relay");
        }
        Some("socketio") => {
            assert!(results["replay"].is_null(), "a peer keeps no log to replay");
            assert!(results["server"].as_str().unwrap().contains("Socket.IO"));
            assert_eq!(results["rows_per_commit"], 3);
        }
        Some(peer) => {
            assert!(results["replay"].is_null(), "a peer keeps no log to replay");
            let server = results["server"].as_str().unwrap();
            assert!(server.contains("PostGraphile"), "{server}");
            assert_eq!(
                server.contains("node ids only"),
                peer == "postgraphile-ids",
                "{server}"
            );
        }
    }
    assert!(results["memory"]["per_socket_bytes"].as_f64().unwrap() > 0.0);
    let svg = std::fs::read_to_string(out.join("latency.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(table.contains("| phase |"));
    let _ = std::fs::remove_dir_all(&out);
}
