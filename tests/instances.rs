//! Several relay processes on one database: each delivers to its own clients, every client gets
//! every event it may see exactly once, and when one instance stops its clients move to another
//! with their cursors and lose nothing. Also the operational surface of a real process: metrics and
//! JSON logs.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::{RelayProcess, TestDb, Ws};
use serde_json::Value;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use relay::authz::{Principal, Role};

/// Appointments written while the first instance still runs, and in all.
const BEFORE_STOP: usize = 60;
const TOTAL: usize = 200;

/// What one client received on the appointments feed: (op, row id, event id), in order.
type Received = Vec<(String, String, i64)>;

fn appointment(frame: &Value) -> Option<(String, String, i64)> {
    (frame["type"] == "event" && frame["feed"] == "appointments").then(|| {
        (
            frame["op"].as_str().unwrap().to_string(),
            frame["row"]["id"].as_str().unwrap().to_string(),
            frame["id"].as_i64().unwrap(),
        )
    })
}

/// One client: subscribed on `home`; if `moves_to` is given, it reads until `home` closes it, then
/// reconnects there and resumes from its last cursor. It reads until the fence.
async fn client(
    who: Principal,
    home: SocketAddr,
    moves_to: Option<SocketAddr>,
    mut fence: watch::Receiver<Option<Uuid>>,
    subscribed: tokio::sync::mpsc::Sender<()>,
) -> Received {
    let mut ws = Ws::connect(home, who).await;
    let mut cursor = ws.subscribe("appointments").await;
    ws.subscribe("availability").await;
    subscribed.send(()).await.unwrap();
    let mut received = Received::new();
    if let Some(other) = moves_to {
        // Until the instance stops: it closes with 1001 (going away).
        loop {
            match ws.next_message().await {
                Some(Message::Text(text)) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if let Some(event) = appointment(&frame) {
                        cursor = frame["cursor"].as_str().unwrap().to_string();
                        received.push(event);
                    }
                }
                Some(Message::Close(frame)) => {
                    let code = frame.map(|f| u16::from(f.code));
                    assert_eq!(code, Some(1001), "closed as going away");
                    break;
                }
                Some(_) => {}
                None => panic!("the socket ended without a close frame"),
            }
        }
        ws = Ws::connect(other, who).await;
        for frame in ws.resume("appointments", &cursor).await {
            received.push(appointment(&frame).expect("an appointment event"));
        }
        // The fence feed, while live appointments keep arriving.
        ws.send(serde_json::json!({"type": "subscribe", "ref": "fence", "feed": "availability"}))
            .await;
        loop {
            let frame = ws.recv().await;
            if frame["type"] == "subscribed" {
                assert_eq!(frame["feed"], "availability");
                break;
            }
            received.push(appointment(&frame).expect("an appointment event"));
        }
    }
    let fence = *fence.wait_for(Option::is_some).await.unwrap();
    for frame in ws.events_until(fence.unwrap()).await {
        if let Some(event) = appointment(&frame) {
            received.push(event);
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_stopped_instance_resume_on_another_without_loss_or_duplicate() {
    let db = TestDb::new().await;
    let [addr_a, addr_b] = common::free_addresses();
    let a = RelayProcess::spawn(&db.url, addr_a).await;
    let _b = RelayProcess::spawn(&db.url, addr_b).await;

    let admins = [db.user(Role::Admin).await, db.user(Role::Admin).await];
    let mut dentists = Vec::new();
    let mut patients = Vec::new();
    for _ in 0..3 {
        dentists.push(db.user(Role::Dentist).await);
        patients.push(db.user(Role::Patient).await);
    }
    let everyone: Vec<Principal> = admins
        .iter()
        .chain(&dentists)
        .chain(&patients)
        .copied()
        .collect();

    // Half the clients on each instance; those on A move to B when A stops.
    let (fence_tx, fence_rx) = watch::channel(None);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(everyone.len());
    let mut clients = Vec::new();
    for (i, who) in everyone.iter().enumerate() {
        let (home, moves_to) = if i % 2 == 0 {
            (addr_a, Some(addr_b))
        } else {
            (addr_b, None)
        };
        let task = client(*who, home, moves_to, fence_rx.clone(), ready_tx.clone());
        clients.push((*who, tokio::spawn(task)));
    }
    for _ in 0..everyone.len() {
        ready_rx.recv().await.unwrap();
    }

    // The writer: one appointment per transaction; A stops partway through.
    let mut rng = common::Rng::new(common::seed());
    let writer = common::connect_to(&db.url).await;
    let mut a = Some(a);
    for i in 0..TOTAL {
        if i == BEFORE_STOP {
            a.as_ref().unwrap().terminate();
        }
        let (patient, dentist) = (rng.pick(&patients), rng.pick(&dentists));
        writer
            .execute(
                "insert into appointments (patient_id, dentist_id, starts_at, ends_at)
                 values ($1, $2, now() + interval '1 day', now() + interval '1 day 1 hour')",
                &[&patient.user_id, &dentist.user_id],
            )
            .await
            .unwrap();
    }
    let status = a.take().unwrap().child.wait().await.unwrap();
    assert!(status.success(), "instance A stopped cleanly: {status}");
    fence_tx.send_replace(Some(db.fence().await));

    for (who, task) in clients {
        let received = task.await.unwrap();
        let column = match who.role {
            Role::Dentist => "dentist_id",
            Role::Patient => "patient_id",
            _ => "'all'",
        };
        let filter = if who.role == Role::Admin {
            String::new()
        } else {
            format!("where {column} = '{}'", who.user_id)
        };
        let expected: BTreeSet<String> = db
            .client
            .query(&format!("select id::text from appointments {filter}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let ids: Vec<i64> = received.iter().map(|(_, _, id)| *id).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{:?}: events in order, none twice: {ids:?}",
            who.role
        );
        assert!(received.iter().all(|(op, _, _)| op == "INSERT"));
        let rows: BTreeSet<String> = received.iter().map(|(_, row, _)| row.clone()).collect();
        assert_eq!(rows.len(), received.len(), "{:?}: no row twice", who.role);
        assert_eq!(rows, expected, "{:?}: every row it may see", who.role);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_process_reports_metrics_and_writes_json_logs_without_tokens() {
    let db = TestDb::new().await;
    let addr = common::free_address();
    let env = [
        ("RELAY_LOG_FORMAT", "json"),
        ("RUST_LOG", "info,relay=debug"),
    ];
    let relay = RelayProcess::spawn_with(&db.url, addr, &env, true).await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut ws = Ws::subscribed(addr, dentist, &["appointments"]).await;
    let token = common::token(&dentist);
    db.book(&patient, &dentist, "private notes").await;
    let fence = db.fence().await;
    assert_eq!(ws.events_until(fence).await.len(), 1);

    // An event is counted once its frames are all handed over, so the client can hold the fence
    // a moment before it is counted: read until both events are.
    let counted = |text: &str| {
        [
            "relay_messages_delivered_total 2",
            "relay_commit_to_send_seconds_count 2",
            "relay_commit_to_receive_seconds_count 2",
        ]
        .iter()
        .all(|counted| text.lines().any(|line| line == *counted))
    };
    let (status, text) = tokio::time::timeout(common::PATIENCE, async {
        loop {
            let (status, text) = http_text(addr, "/metrics").await;
            if status != 200 || counted(&text) {
                return (status, text);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both events counted");
    assert_eq!(status, 200);
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(value("relay_sockets_connected"), 1.0);
    assert_eq!(
        value("relay_subscriptions{feed=\"appointments\",role=\"dentist\"}"),
        1.0
    );
    assert_eq!(value("relay_listening"), 1.0);
    assert_eq!(value("relay_events_received_total"), 2.0);
    assert_eq!(value("relay_messages_delivered_total"), 2.0);
    assert_eq!(value("relay_event_log_lag_events"), 0.0);
    assert_eq!(value("relay_commit_to_send_seconds_count"), 2.0);
    assert!(text.contains("# TYPE relay_commit_to_send_seconds histogram"));
    assert_eq!(value("relay_commit_to_receive_seconds_count"), 2.0);
    assert!(text.contains("# TYPE relay_commit_to_receive_seconds histogram"));

    drop(ws);
    relay.terminate();
    let RelayProcess { mut child, output } = relay;
    child.wait().await.unwrap();
    let log = output.unwrap().await.unwrap();
    let signature = token.rsplit('.').next().unwrap();
    assert!(!log.contains(signature), "a token reached the log");
    assert!(
        !log.contains("private notes"),
        "row contents reached the log"
    );
    let mut socket_lines = 0;
    for line in log.lines() {
        let entry: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            entry["timestamp"].is_string() && entry["level"].is_string(),
            "{line}"
        );
        if entry["span"]["name"] == "socket" {
            assert_eq!(entry["span"]["user"], dentist.user_id.to_string(), "{line}");
            assert_eq!(entry["span"]["role"], "dentist", "{line}");
            socket_lines += 1;
        }
    }
    assert!(socket_lines > 0, "no line in the socket's span:\n{log}");
}

/// An empty `RUST_LOG` would switch every log line off, errors included: like any other empty
/// setting, it stops the relay at start with a line that names it.
#[test]
fn an_empty_rust_log_stops_the_relay_at_start() {
    let (status, printed) = run_relay(
        "migrate",
        &[
            ("DATABASE_URL", &common::admin_url("relay_never_reached")),
            ("RUST_LOG", ""),
        ],
    );
    assert_eq!(status.code(), Some(2), "{printed}");
    assert!(printed.contains("RUST_LOG"), "{printed}");
}

/// `relay dev` hands its demo tokens (an admin's among them) to whoever asks: it refuses to listen
/// beyond this machine, before it touches any database.
#[test]
fn relay_dev_refuses_to_listen_beyond_this_machine() {
    let (status, printed) = run_relay(
        "dev",
        &[
            ("DATABASE_URL", &common::admin_url("relay_never_reached")),
            ("RELAY_BIND", "0.0.0.0:0"),
        ],
    );
    assert!(!status.success(), "{printed}");
    assert!(
        printed.contains("RELAY_BIND=0.0.0.0:0") && printed.contains("loopback"),
        "{printed}"
    );
}

/// `relay dev`'s picker tokens are signed afresh for each request, so an inspector page left open
/// past their lifetime still offers tokens that work.
#[tokio::test]
async fn relay_dev_issues_the_demo_tokens_afresh_for_each_request() {
    let db = TestDb::new().await;
    let addr = common::free_address();
    let _relay = RelayProcess::start("dev", &db.url, addr, &[("RUST_LOG", "error")], false).await;
    let verifier = relay::token::Verifier::load(&relay::token::TokenConfig::hs256(
        relay::token::Secret::new(common::SECRET).unwrap(),
    ))
    .unwrap();
    let expiries = || async {
        let (status, body) = common::http_get(addr, "/dev/tokens", None).await;
        assert_eq!(status, 200, "{body}");
        let users = body.as_array().expect("a list of demo users");
        assert!(users.iter().any(|u| u["role"] == "admin"), "{body}");
        users
            .iter()
            .map(|user| {
                let verified = verifier
                    .verify(user["token"].as_str().unwrap())
                    .expect("a valid token");
                assert_eq!(verified.principal.user_id.to_string(), user["user_id"]);
                verified.expires_at
            })
            .collect::<Vec<_>>()
    };
    let first = expiries().await;
    // The tokens' times are whole seconds: ask again once the clock has passed the next one
    // after the last of them (one request may sign across a second's turn).
    let issued = *first.iter().max().unwrap() - relay::dev::DEMO_TOKEN_TTL;
    while std::time::SystemTime::now() < issued + std::time::Duration::from_secs(1) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let second = expiries().await;
    assert_eq!(first.len(), second.len());
    for (before, after) in first.iter().zip(&second) {
        assert!(after > before, "the same token was handed out twice");
    }
}

/// `relay dev`'s banner works as printed, and again after a restart: its booking SQL (whose row
/// each start takes out again), and a message in the demo consultation.
#[tokio::test]
async fn relay_dev_banner_lines_work_and_work_again_after_a_restart() {
    let db = TestDb::new().await;
    let book = "insert into appointments (id, patient_id, dentist_id, starts_at, ends_at) \
                values ('00000000-0000-4000-8000-0000000e00aa', '00000000-0000-4000-8000-00000000b001', \
                '00000000-0000-4000-8000-00000000d001', now() + interval '1 day', \
                now() + interval '1 day 1 hour')";
    let patient = Principal {
        user_id: relay::dev::DEMO_USERS[3].0,
        role: Role::Patient,
    };
    assert_eq!(patient.role, relay::dev::DEMO_USERS[3].1);
    for round in 0..2 {
        let addr = common::free_address();
        let mut dev =
            RelayProcess::start("dev", &db.url, addr, &[("RUST_LOG", "error")], true).await;
        db.client
            .execute(book, &[])
            .await
            .unwrap_or_else(|e| panic!("round {round}: the banner's booking failed: {e}"));
        let session = relay::dev::DEMO_SESSION.to_string();
        let mut ws = Ws::connect(addr, patient).await;
        ws.send(
            serde_json::json!({"type": "send", "ref": "m", "session_id": session,
                                   "body": "Hello, doctor", "client_id": Uuid::new_v4()}),
        )
        .await;
        let reply = ws.recv().await;
        assert_eq!(reply["type"], "sent", "{reply}");
        dev.terminate();
        dev.child.wait().await.unwrap();
        let banner = dev.output.take().unwrap().await.unwrap();
        assert!(banner.contains(&session), "{banner}");
        assert!(
            banner.contains(
                "RELAY_JWT_SECRET=<the one relay dev runs with> relay token --role patient"
            ),
            "{banner}"
        );
    }
}

/// `relay migrate` against a database that does not exist, or as a role that does not: it stops
/// at once, not after its minute of patience for a database still starting, and says what
/// Postgres said rather than tokio-postgres' bare "db error".
#[test]
fn migrate_refused_for_good_stops_at_once_and_says_why() {
    let server = common::admin_url("postgres");
    let server = server.trim_end_matches("/postgres");
    for (url, says) in [
        (
            format!("{server}/relay_no_such_database"),
            "database \"relay_no_such_database\" does not exist",
        ),
        (
            format!(
                "postgres://relay_no_such_role@{}/postgres",
                server.rsplit('@').next().unwrap()
            ),
            "role \"relay_no_such_role\" does not exist",
        ),
    ] {
        let (status, printed) =
            run_relay("migrate", &[("DATABASE_URL", &url), ("RUST_LOG", "info")]);
        assert!(!status.success(), "{url}: {printed}");
        assert!(printed.contains(says), "{url}: {printed}");
        assert!(
            !printed.contains("cannot connect to DATABASE_URL yet"),
            "{url}: retried a refusal that waiting cannot change: {printed}"
        );
    }
}

/// `relay serve` on a database `relay migrate` never ran on: it keeps trying (the migration may be
/// on its way), and its log, without colours in a pipe, says what is missing and what to run.
#[tokio::test]
async fn serving_an_unmigrated_database_says_to_migrate_it() {
    use tokio::io::AsyncBufReadExt;
    let name = format!("relay_unmigrated_{}", Uuid::new_v4().simple());
    let admin = common::connect_to(&common::admin_url("postgres")).await;
    admin
        .batch_execute(&format!("create database {name}"))
        .await
        .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("serve")
        .env("DATABASE_URL", common::admin_url(&name))
        .env("RELAY_JWT_SECRET", common::SECRET)
        .env("RELAY_BIND", common::free_address().to_string())
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(common::PATIENCE, lines.next_line())
        .await
        .expect("a log line in time")
        .unwrap()
        .expect("a log line");
    assert!(
        line.contains("cannot listen for changes")
            && line.contains(r#"schema "relay" does not exist"#)
            && line.contains("has `relay migrate` been run on this database?"),
        "{line}"
    );
    assert!(!line.contains('\u{1b}'), "no terminal colours: {line:?}");
    child.kill().await.unwrap();
    admin
        .batch_execute(&format!("drop database {name} with (force)"))
        .await
        .unwrap();
}

/// Runs `relay <command>` to its end with `env`: how it exited, and everything it printed.
fn run_relay(command: &str, env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg(command)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run relay {command}: {e}"));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, printed)
}

/// A GET whose body is text.
async fn http_text(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// The pool's connections end on the server a query the relay gave up on, so that a connection
/// returned to the pool is never busy for long with one no one awaits.
#[tokio::test]
async fn pooled_connections_end_queries_no_one_awaits() {
    let db = TestDb::new().await;
    let pool = relay::server::pool(&db.config()).unwrap();
    let client = pool.get().await.unwrap();
    let timeout: String = client
        .query_one("show statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "30s");
}
