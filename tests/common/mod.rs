//! Shared helpers for the integration tests: a fresh database per test, an in-process relay on
//! port 0, WebSocket clients with real tokens, and a fence for asserting "these and no others".
//!
//! The fence: every test client also subscribes to `availability`, which every role may read.
//! Events reach each socket in commit order, so after a test's writes it inserts one marker
//! availability row; when a client receives the marker it has received everything committed
//! before it, and the frames before the marker are exactly what it was sent. No sleeps.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, NoTls};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use relay::authz::{Principal, Role};
use relay::token::{Issuer, Secret};
use relay::{Config, Relay};

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// A guard against a test hanging forever; not a performance threshold.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn admin_url(database: &str) -> String {
    let base = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string());
    format!("{}/{database}", base.trim_end_matches('/'))
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e} (is Postgres running?)"));
    tokio::spawn(connection);
    client
}

/// A database created for one test, migrated, and dropped when the test ends (even on failure).
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!("relay_test_{}", Uuid::new_v4().simple());
        let admin = connect(&admin_url("postgres")).await;
        admin
            .batch_execute(&format!("create database {name}"))
            .await
            .expect("create test database");
        let url = admin_url(&name);
        let mut client = connect(&url).await;
        relay::migrate::migrate(&mut client).await.expect("migrate");
        TestDb { name, url, client }
    }

    pub fn config(&self) -> Config {
        let mut config = Config::new(
            self.url.parse().expect("database url"),
            Secret::new(SECRET).expect("secret"),
        );
        config.bind = "127.0.0.1:0".parse().unwrap();
        config.shutdown_grace = Duration::from_secs(5);
        config
    }

    pub async fn start(&self) -> Relay {
        start_with(self.config()).await
    }

    /// Adds a profile and returns its principal.
    pub async fn user(&self, role: Role) -> Principal {
        let id = Uuid::new_v4();
        self.client
            .execute(
                "insert into profiles (id, role, full_name) values ($1, $2, $3)",
                &[&id, &role.as_str(), &format!("{role} {id}")],
            )
            .await
            .expect("insert profile");
        Principal { user_id: id, role }
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Books an appointment and returns its id.
    pub async fn book(&self, patient: &Principal, dentist: &Principal, notes: &str) -> Uuid {
        self.client
            .query_one(
                "insert into appointments (patient_id, dentist_id, starts_at, ends_at, notes)
                 values ($1, $2, now() + interval '1 day', now() + interval '1 day 1 hour', $3)
                 returning id",
                &[&patient.user_id, &dentist.user_id, &notes],
            )
            .await
            .expect("book")
            .get(0)
    }

    /// Books `count` appointments in one statement: `count` events in one transaction.
    pub async fn book_many(&self, patient: &Principal, dentist: &Principal, count: i32) {
        self.client
            .execute(
                "insert into appointments (patient_id, dentist_id, starts_at, ends_at)
                 select $1, $2, now(), now() + interval '1 hour' from generate_series(1, $3)",
                &[&patient.user_id, &dentist.user_id, &count],
            )
            .await
            .expect("book many");
    }

    /// Opens a consultation session (status `waiting`) and returns its id.
    pub async fn open_session(&self, patient: &Principal, dentist: &Principal) -> Uuid {
        self.client
            .query_one(
                "insert into consultation_sessions (patient_id, dentist_id) values ($1, $2) returning id",
                &[&patient.user_id, &dentist.user_id],
            )
            .await
            .expect("open session")
            .get(0)
    }

    /// The cursor of the event the log holds under `id`, as the relay writes it: the id and the
    /// tag of the event's id and time, keyed by the database's key.
    pub async fn event_cursor(&self, id: i64) -> String {
        let at: String = self
            .client
            .query_one(
                &format!(
                    "select {} from relay.events e where e.id = $1",
                    relay::log::AT_TEXT
                ),
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        let key = relay::log::read_cursor_key(&self.client).await.unwrap();
        key.mark(id, &at).to_string()
    }

    /// Inserts the marker availability row every client waits for; returns its id.
    pub async fn fence(&self) -> Uuid {
        let dentist = self.user(Role::Dentist).await;
        self.client
            .query_one(
                "insert into availability (dentist_id, starts_at, ends_at)
                 values ($1, now(), now() + interval '1 hour') returning id",
                &[&dentist.user_id],
            )
            .await
            .expect("fence")
            .get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block; use a thread of our own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok((client, connection)) =
                    tokio_postgres::connect(&admin_url("postgres"), NoTls).await
                {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("drop database if exists {name} with (force)"))
                        .await;
                }
            });
        })
        .join();
    }
}

pub async fn start_with(config: Config) -> Relay {
    let relay = Relay::start(config).await.expect("start relay");
    wait_until_listening(&relay).await;
    relay
}

/// Times the relay closed every socket for clients to fetch current state.
pub fn starts_over(relay: &Relay) -> u64 {
    relay
        .hub()
        .counters()
        .starts_over
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// How many times the relay's LISTEN connection has come back.
pub fn listen_reconnects(relay: &Relay) -> u64 {
    relay
        .hub()
        .counters()
        .listen_reconnects
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Waits until the LISTEN connection has come back since the count was `before`: the relay is
/// listening again. The counter, not health: a quick reconnect can turn health false and true
/// again unseen.
pub async fn wait_for_reconnect(relay: &Relay, before: u64) {
    tokio::time::timeout(PATIENCE, async {
        while listen_reconnects(relay) == before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the relay listens again");
}

/// Ends the relay's LISTEN connection on the server (as `pg_terminate_backend` by an operator
/// would); returns how many backends it ended, 0 if the database could not be asked.
pub async fn kill_listen(client: &Client) -> i64 {
    client
        .query_one(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity
             where datname = current_database() and application_name = $1",
            &[&relay::listener::APPLICATION_NAME],
        )
        .await
        .map(|row| row.get(0))
        .unwrap_or(0)
}

/// Waits for the relay's LISTEN connection, so that no write of the test precedes it.
pub async fn wait_until_listening(relay: &Relay) {
    tokio::time::timeout(PATIENCE, relay.health().wait_for(true))
        .await
        .expect("the relay never started listening");
}

pub fn token(principal: &Principal) -> String {
    Issuer::new(&Secret::new(SECRET).unwrap()).issue(principal, Duration::from_secs(600))
}

pub type Stream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A real WebSocket client.
pub struct Ws {
    pub stream: Stream,
    pub who: Principal,
}

impl Ws {
    /// Connects with the token in the Authorization header.
    pub async fn connect(addr: SocketAddr, who: Principal) -> Ws {
        let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", token(&who)).parse().unwrap(),
        );
        let (stream, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("upgrade");
        Ws { stream, who }
    }

    /// Connects with the token in the `access_token` query parameter.
    pub async fn connect_with_query(addr: SocketAddr, who: Principal) -> Ws {
        let url = format!("ws://{addr}/ws?access_token={}", token(&who));
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("upgrade");
        Ws { stream, who }
    }

    /// Connects and subscribes to `feeds` plus the fence feed, `availability`.
    pub async fn subscribed(addr: SocketAddr, who: Principal, feeds: &[&str]) -> Ws {
        let mut ws = Ws::connect(addr, who).await;
        for feed in feeds.iter().chain(["availability"].iter()) {
            ws.subscribe(feed).await;
        }
        ws
    }

    pub async fn send(&mut self, frame: Value) {
        self.stream
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("send");
    }

    /// The next message of any kind.
    pub async fn next_message(&mut self) -> Option<Message> {
        tokio::time::timeout(PATIENCE, self.stream.next())
            .await
            .expect("no frame within the test's patience")
            .map(|m| m.expect("socket error"))
    }

    /// The next text frame, as JSON, passing over `presence` frames: a patient's or dentist's
    /// `consultation_messages` subscription also reports who is connected to their open sessions,
    /// which tests of other things do not look at. Presence tests use [`Ws::recv_frame`].
    pub async fn recv(&mut self) -> Value {
        loop {
            let frame = self.recv_frame().await;
            if frame["type"] != "presence" {
                return frame;
            }
        }
    }

    /// The next text frame of any type, as JSON.
    pub async fn recv_frame(&mut self) -> Value {
        loop {
            match self.next_message().await {
                Some(Message::Text(text)) => {
                    return serde_json::from_str(&text).expect("JSON frame")
                }
                Some(Message::Ping(_) | Message::Pong(_)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Subscribes live; returns the cursor the acknowledgement names.
    pub async fn subscribe(&mut self, feed: &str) -> String {
        self.send(json!({"type": "subscribe", "ref": feed, "feed": feed}))
            .await;
        self.subscribed_reply(feed).await
    }

    /// Subscribes after `cursor` and returns the events replayed, up to the `live` marker that
    /// ends the replay. Subscribe the fence feed after this: a live fence could overtake the
    /// replay of another feed.
    pub async fn resume(&mut self, feed: &str, cursor: &str) -> Vec<Value> {
        self.send(json!({"type": "subscribe", "ref": feed, "feed": feed, "since": cursor}))
            .await;
        let ack = self.subscribed_reply(feed).await;
        assert_eq!(ack, cursor, "a resumed subscription starts at its cursor");
        let mut replayed = Vec::new();
        loop {
            let frame = self.recv().await;
            if frame["type"] == "live" {
                assert_eq!(frame, json!({"type": "live", "ref": feed, "feed": feed}));
                return replayed;
            }
            assert_eq!(frame["type"], "event", "unexpected frame {frame}");
            assert_eq!(frame["feed"], feed, "{frame}");
            replayed.push(frame);
        }
    }

    async fn subscribed_reply(&mut self, feed: &str) -> String {
        let reply = self.recv().await;
        let cursor = reply["cursor"].as_str().unwrap_or_default().to_string();
        assert!(
            cursor.parse::<relay::protocol::Mark>().is_ok(),
            "subscribe {feed}: {reply}"
        );
        assert_eq!(
            reply,
            json!({"type": "subscribed", "ref": feed, "feed": feed, "cursor": cursor}),
            "subscribe {feed}"
        );
        cursor
    }

    /// Every event frame before the fence's, in order; the fence itself is consumed. `live`
    /// markers are skipped.
    pub async fn events_until(&mut self, fence: Uuid) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let frame = self.recv().await;
            if frame["type"] == "live" {
                continue; // The end of a resumed subscription's replay.
            }
            assert_eq!(frame["type"], "event", "unexpected frame {frame}");
            if frame["feed"] == "availability" && frame["row"]["id"] == json!(fence) {
                return events;
            }
            events.push(frame);
        }
    }
}

/// Makes the current transaction act as `who`, the way row-level security sees a request: the
/// role `authenticated` and their claims in `request.jwt.claims`. Call it inside a transaction.
pub async fn act_as(
    client: &impl tokio_postgres::GenericClient,
    who: &Principal,
) -> Result<(), tokio_postgres::Error> {
    let claims = json!({"sub": who.user_id, "role": who.role.as_str()}).to_string();
    client.batch_execute("set local role authenticated").await?;
    client
        .execute(
            "select set_config('request.jwt.claims', $1, true)",
            &[&claims],
        )
        .await?;
    Ok(())
}

/// Waits until the relay has dispatched everything committed so far, so that a subscription made
/// next starts after it (a live subscription starts at the relay's position, which may trail the
/// last commit by a moment).
pub async fn settle(db: &TestDb, addr: SocketAddr) {
    let admin = db.user(Role::Admin).await;
    let mut ws = Ws::connect(addr, admin).await;
    ws.subscribe("availability").await;
    let fence = db.fence().await;
    ws.events_until(fence).await;
}

/// A minimal HTTP GET; returns the status and the JSON body.
pub async fn http_get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8(response).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, body)
}

/// Rows of an event's frames, keyed for easy assertions: (op, row id).
pub fn ops(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap_or_default().to_string(),
                e["row"]["id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Opens a fresh connection to a test database (the shared one may have died with a restart).
pub async fn connect_to(url: &str) -> Client {
    connect(url).await
}

/// The feeds a role subscribes to: every feed it may read.
pub fn feeds_of(role: Role) -> &'static [&'static str] {
    match role {
        Role::Chatbot => &["appointments", "availability"],
        _ => &[
            "appointments",
            "availability",
            "consultation_sessions",
            "consultation_messages",
        ],
    }
}

/// What one client has been told, folded into the rows it believes exist, with every frame
/// checked against what came before: cursors strictly rising per feed (nothing twice, nothing out
/// of order), an INSERT only for a row it does not have, an UPDATE or DELETE only for a row it has,
/// whose `old` is exactly what it had (so no change to the row was missed or reordered).
#[derive(Debug, Default)]
pub struct Model {
    pub cursors: std::collections::HashMap<String, String>,
    pub rows: std::collections::HashMap<String, std::collections::HashMap<String, Value>>,
    pub events: usize,
}

impl Model {
    pub fn apply(&mut self, frame: &Value) -> Result<(), String> {
        let feed = frame["feed"].as_str().ok_or("no feed")?.to_string();
        let cursor = frame["cursor"].as_str().ok_or("no cursor")?.to_string();
        let number = |c: &str| {
            c.parse::<relay::protocol::Mark>()
                .map_or(-1, |mark| mark.position.0)
        };
        if let Some(last) = self.cursors.get(&feed) {
            if number(&cursor) <= number(last) {
                return Err(format!("{feed}: cursor {cursor} after {last}: {frame}"));
            }
        }
        self.cursors.insert(feed.clone(), cursor);
        let rows = self.rows.entry(feed.clone()).or_default();
        let id = frame["row"]["id"].as_str().ok_or("no row id")?.to_string();
        match frame["op"].as_str() {
            Some("INSERT") => {
                if rows.insert(id.clone(), frame["row"].clone()).is_some() {
                    return Err(format!(
                        "{feed}: INSERT of {id}, which it already has: {frame}"
                    ));
                }
            }
            Some(op @ ("UPDATE" | "DELETE")) => {
                let had = rows
                    .get(&id)
                    .ok_or_else(|| format!("{feed}: {op} of {id}, which it never had: {frame}"))?;
                if *had != frame["old"] {
                    return Err(format!(
                        "{feed}: {op} of {id} whose old version {} is not the one it had {had}",
                        frame["old"]
                    ));
                }
                if op == "UPDATE" {
                    rows.insert(id, frame["row"].clone());
                } else {
                    rows.remove(&id);
                }
            }
            other => return Err(format!("unknown op {other:?}")),
        }
        self.events += 1;
        Ok(())
    }
}

/// The rows of a feed that Postgres itself shows `who` under row-level security, by id, as the
/// relay renders them (the chatbot reads appointments through `appointment_slots`).
pub async fn rls_view(
    client: &mut Client,
    who: &Principal,
    feed: &str,
) -> std::collections::HashMap<String, Value> {
    let source = match (who.role, feed) {
        (Role::Chatbot, "appointments") => "public.appointment_slots",
        (_, "appointments") => "public.appointments",
        (_, "availability") => "public.availability",
        (_, "consultation_sessions") => "public.consultation_sessions",
        (_, "consultation_messages") => "public.consultation_messages",
        _ => panic!("no feed {feed}"),
    };
    let tx = client.transaction().await.expect("begin");
    act_as(&tx, who).await.expect("act as the user");
    let rows = tx
        .query(&format!("select to_jsonb(t) from {source} t"), &[])
        .await
        .expect("read under RLS");
    tx.commit().await.expect("commit");
    rows.iter()
        .map(|row| {
            let value: Value = row.get(0);
            (value["id"].as_str().unwrap().to_string(), value)
        })
        .collect()
}

/// Checks a client's folded view of every feed it reads against row-level security.
pub async fn assert_matches_rls(client: &mut Client, who: &Principal, model: &Model) {
    for feed in feeds_of(who.role) {
        let expected = rls_view(client, who, feed).await;
        let empty = std::collections::HashMap::new();
        let got = model.rows.get(*feed).unwrap_or(&empty);
        let missing: Vec<&String> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<&String> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
        let differ: Vec<&String> = expected
            .iter()
            .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
            .map(|(k, _)| k)
            .collect();
        let mut first_difference = differ
            .first()
            .map(|k| format!("expected {} got {}", expected[*k], got[*k]))
            .unwrap_or_default();
        if let Some(id) = missing.first().or(extra.first()).or(differ.first()) {
            // The row's history in the log, to tell a lost event from a wrong one.
            let history = client
                .query(
                    "select id, op, coalesce(new_row, old_row)->>'dentist_id', new_session, old_session
                     from relay.events
                     where coalesce(new_row, old_row)->>'id' = $1 order by id",
                    &[&id.as_str()],
                )
                .await
                .map(|rows| {
                    rows.iter()
                        .map(|r| {
                            format!(
                                "{}:{}:{:?}",
                                r.get::<_, i64>(0),
                                r.get::<_, String>(1),
                                r.get::<_, Option<String>>(2)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            first_difference.push_str(&format!(
                "; log of {id}: {history}; client's cursors {:?}",
                model.cursors
            ));
        }
        assert!(
            missing.is_empty() && extra.is_empty() && differ.is_empty(),
            "{} {}: {feed}: missing {missing:?}, extra {extra:?}, different {differ:?} \
             {first_difference}",
            who.role,
            who.user_id
        );
    }
}

/// A relay as a separate process (the `relay` binary), so it can be killed outright, or its
/// output read.
pub struct RelayProcess {
    pub child: tokio::process::Child,
    /// Everything the process writes to stdout (its log), once it exits; when captured.
    pub output: Option<tokio::task::JoinHandle<String>>,
}

impl RelayProcess {
    /// Starts `relay serve` quietly on `addr` and waits until it is healthy.
    pub async fn spawn(database_url: &str, addr: SocketAddr) -> RelayProcess {
        RelayProcess::spawn_with(database_url, addr, &[("RUST_LOG", "error")], false).await
    }

    /// Starts `relay serve` with extra environment, its stdout piped if `capture`, and waits
    /// until it is healthy.
    pub async fn spawn_with(
        database_url: &str,
        addr: SocketAddr,
        env: &[(&str, &str)],
        capture: bool,
    ) -> RelayProcess {
        RelayProcess::start("serve", database_url, addr, env, capture).await
    }

    /// Starts `relay <command>` (`serve` or `dev`) with extra environment, its stdout piped if
    /// `capture`, and waits until it is healthy.
    pub async fn start(
        command: &str,
        database_url: &str,
        addr: SocketAddr,
        env: &[(&str, &str)],
        capture: bool,
    ) -> RelayProcess {
        let mut program = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"));
        program.arg(command);
        RelayProcess::launch(program, database_url, addr, env, capture).await
    }

    /// Starts `relay serve` under an open-file limit of `files` (soft and hard: the relay cannot
    /// raise it), with extra environment, and waits until it is healthy.
    pub async fn spawn_with_files(
        files: u32,
        database_url: &str,
        addr: SocketAddr,
        env: &[(&str, &str)],
    ) -> RelayProcess {
        let mut program = tokio::process::Command::new("sh");
        program
            .arg("-c")
            .arg(format!("ulimit -n {files} && exec \"$0\" serve"))
            .arg(env!("CARGO_BIN_EXE_relay"));
        RelayProcess::launch(program, database_url, addr, env, false).await
    }

    async fn launch(
        mut program: tokio::process::Command,
        database_url: &str,
        addr: SocketAddr,
        env: &[(&str, &str)],
        capture: bool,
    ) -> RelayProcess {
        let stdout = if capture {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        };
        let mut child = program
            .env("DATABASE_URL", database_url)
            .env("RELAY_JWT_SECRET", SECRET)
            .env("RELAY_BIND", addr.to_string())
            .envs(env.iter().copied())
            .stdout(stdout)
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn relay");
        // Read as it is written, so a verbose log never blocks the relay on a full pipe.
        let output = child.stdout.take().map(|mut stdout| {
            tokio::spawn(async move {
                let mut text = String::new();
                let _ = tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut text).await;
                text
            })
        });
        let relay = RelayProcess { child, output };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !healthy(addr).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay never became healthy"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        relay
    }
}

impl RelayProcess {
    /// Sends SIGTERM, as an orchestrator stopping the relay would.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("the relay is running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -TERM {pid}");
    }
}

/// An address no one listens on, for a relay process to bind.
pub fn free_address() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap()
}

/// `N` distinct addresses no one listens on: the probes are held open until all are chosen, so
/// none is handed out twice.
pub fn free_addresses<const N: usize>() -> [SocketAddr; N] {
    let probes: [std::net::TcpListener; N] =
        std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    probes.map(|probe| probe.local_addr().unwrap())
}

pub async fn healthy(addr: SocketAddr) -> bool {
    if tokio::net::TcpStream::connect(addr).await.is_err() {
        return false;
    }
    http_get(addr, "/api/realtime/health", None).await.0 == 200
}

/// A small deterministic generator (xorshift), so a failing run can be replayed from its seed.
pub struct Rng(pub u64);

impl Rng {
    /// Scrambles the seed (splitmix64) so that small seeds start well; the state is never 0.
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn byte(&mut self) -> u8 {
        (self.next() >> 32) as u8
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The seed for a randomized test: `RELAY_TEST_SEED` if set, else a fresh one; printed either
/// way, so a failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("RELAY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Uuid::new_v4().as_u64_pair().0 | 1);
    eprintln!("seed {seed} (rerun with RELAY_TEST_SEED={seed})");
    seed
}
