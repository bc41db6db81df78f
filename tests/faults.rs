//! Fault injection: concurrent writers across all four tables while the relay's LISTEN backend is
//! killed, Postgres restarts, and the relay process itself is killed (and, separately, stopped with
//! SIGTERM); clients of every role stay
//! connected, drop their sockets now and then and resume from their cursors. At the end each
//! client's view, built only from the frames it received, must equal what Postgres' row-level
//! security shows that user, and every frame must have followed from the one before (see
//! `common::Model`): exactly once, in order, nothing missed.
//!
//! These tests restart the shared Postgres, so they run one at a time, in their own test binary.
//! The restart command is `pg_ctlcluster` for the one installed cluster, or whatever
//! `RELAY_TEST_PG_RESTART` says (a shell command).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use common::{free_address, Model, RelayProcess, Rng, PATIENCE};
use relay::authz::{Principal, Role};

/// The tests of this binary restart Postgres or stop the relay; never two at once.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The cast: every role, several of the roles that see only their own rows.
struct Cast {
    admins: Vec<Principal>,
    dentists: Vec<Principal>,
    patients: Vec<Principal>,
    chatbots: Vec<Principal>,
}

impl Cast {
    async fn new(db: &common::TestDb) -> Cast {
        let mut cast = Cast {
            admins: vec![],
            dentists: vec![],
            patients: vec![],
            chatbots: vec![],
        };
        cast.admins.push(db.user(Role::Admin).await);
        for _ in 0..3 {
            cast.dentists.push(db.user(Role::Dentist).await);
        }
        for _ in 0..4 {
            cast.patients.push(db.user(Role::Patient).await);
        }
        cast.chatbots.push(db.user(Role::Chatbot).await);
        cast
    }

    fn everyone(&self) -> Vec<Principal> {
        [&self.admins, &self.dentists, &self.patients, &self.chatbots]
            .into_iter()
            .flatten()
            .copied()
            .collect()
    }
}

/// One random change, as SQL with its parameters.
fn random_change(rng: &mut Rng, cast: &Cast) -> (&'static str, Vec<Uuid>) {
    let dentist = rng.pick(&cast.dentists).user_id;
    let patient = rng.pick(&cast.patients).user_id;
    match rng.below(16) {
        0..=2 => (
            "insert into appointments (patient_id, dentist_id, starts_at, ends_at, notes)
             values ($1, $2, now(), now() + interval '1 hour', md5(random()::text))",
            vec![patient, dentist],
        ),
        3 => (
            "update appointments set dentist_id = $1
             where id = (select id from appointments order by random() limit 1)",
            vec![dentist],
        ),
        4 => (
            "update appointments set patient_id = $1
             where id = (select id from appointments order by random() limit 1)",
            vec![patient],
        ),
        5 => (
            "update appointments
             set status = (array['booked','confirmed','cancelled','completed'])[1 + floor(random() * 4)::int],
                 notes = md5(random()::text)
             where id = (select id from appointments order by random() limit 1)",
            vec![],
        ),
        6 => (
            "delete from appointments
             where id = (select id from appointments order by random() limit 1)",
            vec![],
        ),
        7 => (
            "insert into availability (dentist_id, starts_at, ends_at)
             values ($1, now(), now() + interval '30 minutes')",
            vec![dentist],
        ),
        8 => (
            "update availability set is_available = not is_available
             where id = (select id from availability order by random() limit 1)",
            vec![],
        ),
        9 => (
            "delete from availability
             where id = (select id from availability order by random() limit 1)",
            vec![],
        ),
        10 => (
            "insert into consultation_sessions (patient_id, dentist_id) values ($1, $2)",
            vec![patient, dentist],
        ),
        11 => (
            // A hand-over: the session's messages change readers.
            "update consultation_sessions set dentist_id = $1
             where id = (select id from consultation_sessions order by random() limit 1)",
            vec![dentist],
        ),
        12 => (
            "update consultation_sessions set status = 'active', started_at = now()
             where id = (select id from consultation_sessions order by random() limit 1)",
            vec![],
        ),
        13 => (
            "insert into consultation_messages (session_id, sender_id, body)
             select s.id, s.patient_id, md5(random()::text)
             from consultation_sessions s order by random() limit 1",
            vec![],
        ),
        14 => (
            // Now and then a body too large for NOTIFY: read from the log instead.
            "insert into consultation_messages (session_id, sender_id, body)
             select s.id, s.dentist_id,
                    case when random() < 0.2 then repeat('long ', 2000) else md5(random()::text) end
             from consultation_sessions s order by random() limit 1",
            vec![],
        ),
        _ => (
            "update consultation_messages set body = body || '!'
             where id = (select id from consultation_messages order by random() limit 1)",
            vec![],
        ),
    }
}

/// Writes random transactions until `stop`: one to four changes each, some rolled back, some
/// held open while others commit. Errors (a restart, a deadlock between writers) roll back and
/// the writer goes on, reconnecting when it must.
async fn write(
    url: String,
    cast: Arc<Cast>,
    seed: u64,
    stop: watch::Receiver<bool>,
    committed: Arc<watch::Sender<u64>>,
    rolled_back: Arc<AtomicU64>,
) {
    let mut rng = Rng::new(seed);
    let mut client: Option<Client> = None;
    while !*stop.borrow() {
        let Some(c) = client.as_mut().filter(|c| !c.is_closed()) else {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, connection)) => {
                    tokio::spawn(connection);
                    client = Some(c);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
            continue;
        };
        let Ok(tx) = c.transaction().await else {
            client = None;
            continue;
        };
        let changes = 1 + rng.below(4);
        let mut ok = true;
        for _ in 0..changes {
            let (sql, params) = random_change(&mut rng, &cast);
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            if tx.execute(sql, &params).await.is_err() {
                ok = false;
                break;
            }
        }
        // Some transactions stay open while others commit, then commit late.
        if ok && rng.below(10) == 0 {
            ok = tx.batch_execute("select pg_sleep(0.02)").await.is_ok();
        }
        if ok && rng.below(8) == 0 {
            let _ = tx.rollback().await;
            rolled_back.fetch_add(1, Ordering::Relaxed);
        } else if ok && tx.commit().await.is_ok() {
            committed.send_modify(|n| *n += 1);
        }
    }
}

/// Where clients connect; changes when the relay process is replaced.
type Address = watch::Receiver<SocketAddr>;

/// A client that stays connected through everything: on any close or error it reconnects and
/// resumes every feed from its last cursor; every `drop_every` events it drops its socket on
/// purpose. Counts itself in `ready` once first subscribed to all its feeds. Returns its model
/// once it has received the fence row.
async fn follow(
    address: Address,
    who: Principal,
    drop_every: usize,
    mut fence: watch::Receiver<Option<Uuid>>,
    ready: Arc<watch::Sender<usize>>,
) -> Result<Model, String> {
    let mut model = Model::default();
    let mut counted = false;
    loop {
        let addr = *address.borrow();
        let url = format!("ws://{addr}/ws?access_token={}", common::token(&who));
        let Ok(Ok((mut ws, _))) =
            tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url)).await
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut pending = 0;
        // Resumed feeds still replaying: until their `live` marker, the fence on availability
        // may overtake their older events.
        let mut replaying = std::collections::HashSet::new();
        for feed in common::feeds_of(who.role) {
            let frame = match model.cursors.get(*feed) {
                Some(cursor) => {
                    replaying.insert(feed.to_string());
                    json!({"type": "subscribe", "feed": feed, "since": cursor})
                }
                None => json!({"type": "subscribe", "feed": feed}),
            };
            if ws.send(Message::text(frame.to_string())).await.is_err() {
                break;
            }
            pending += 1;
        }
        let mut received_here = 0;
        let outcome: Result<bool, String> = loop {
            let message = tokio::select! {
                message = tokio::time::timeout(PATIENCE, ws.next()) => message,
                _ = fence.changed() => continue,

            };
            let text = match message {
                Err(_) => {
                    break Err(format!(
                        "{} {}: no frame within {PATIENCE:?}",
                        who.role, who.user_id
                    ))
                }
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => break Ok(false),
                Ok(Some(Ok(_))) => continue,
            };
            let frame: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            match frame["type"].as_str() {
                Some("subscribed") => {
                    pending -= 1;
                    let feed = frame["feed"].as_str().unwrap_or_default().to_string();
                    let cursor = frame["cursor"].as_str().unwrap_or_default().to_string();
                    match model.cursors.get(&feed) {
                        Some(had) if *had != cursor => {
                            break Err(format!("resumed {feed} from {had}, ack says {cursor}"))
                        }
                        _ => {
                            model.cursors.insert(feed, cursor);
                        }
                    }
                    if pending == 0 && !counted {
                        counted = true;
                        ready.send_modify(|n| *n += 1);
                    }
                }
                Some("live") => {
                    replaying.remove(frame["feed"].as_str().unwrap_or_default());
                }
                Some("event") => {
                    if let Err(e) = model.apply(&frame) {
                        break Err(format!("{} {}: {e}", who.role, who.user_id));
                    }
                    received_here += 1;
                    if pending == 0 && replaying.is_empty() && received_here >= drop_every {
                        break Ok(false); // Drop the socket on purpose, and resume.
                    }
                }
                // Who is connected to the client's open consultations: not what this checks.
                Some("presence") => {}
                // The database was away while subscribing: try again.
                Some("error") if frame["code"] == "unavailable" => break Ok(false),
                _ => break Err(format!("unexpected frame {frame}")),
            }
            let done = pending == 0
                && replaying.is_empty()
                && (*fence.borrow()).is_some_and(|f| {
                    model
                        .rows
                        .get("availability")
                        .is_some_and(|rows| rows.contains_key(&f.to_string()))
                });
            if done {
                break Ok(true);
            }
        };
        match outcome {
            Ok(true) => return Ok(model),
            Ok(false) => {
                let _ = ws.close(None).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn restart_postgres() {
    let command = std::env::var("RELAY_TEST_PG_RESTART").unwrap_or_else(|_| {
        let version = std::fs::read_dir("/etc/postgresql")
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .expect(
                "no cluster under /etc/postgresql: set RELAY_TEST_PG_RESTART to a command \
                 that restarts the test Postgres",
            );
        format!("pg_ctlcluster --skip-systemctl-redirect {version} main restart -m fast")
    });
    let status = std::process::Command::new("sh")
        .args(["-c", &command])
        .status()
        .expect("run the restart command");
    assert!(status.success(), "{command} failed: {status}");
}

async fn wait_for_commits(committed: &watch::Sender<u64>, at_least: u64) {
    let mut seen = committed.subscribe();
    tokio::time::timeout(PATIENCE * 2, seen.wait_for(|n| *n >= at_least))
        .await
        .expect("writers made no progress")
        .expect("writers gone");
}

/// Reconnects until Postgres answers (after a restart).
async fn reconnect(url: &str) -> Client {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            return client;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Postgres did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Scenario {
    db: common::TestDb,
    cast: Arc<Cast>,
    stop: watch::Sender<bool>,
    committed: Arc<watch::Sender<u64>>,
    rolled_back: Arc<AtomicU64>,
    fence: watch::Sender<Option<Uuid>>,
    writers: Vec<tokio::task::JoinHandle<()>>,
    clients: Vec<(Principal, tokio::task::JoinHandle<Result<Model, String>>)>,
}

impl Scenario {
    /// Connects a following client per user, then starts the writers.
    async fn start(db: common::TestDb, address: Address) -> Scenario {
        let cast = Arc::new(Cast::new(&db).await);
        let (fence, _) = watch::channel(None);
        let ready = Arc::new(watch::Sender::new(0usize));
        let mut clients = Vec::new();
        for (i, who) in cast.everyone().into_iter().enumerate() {
            let task = tokio::spawn(follow(
                address.clone(),
                who,
                40 + 13 * i,
                fence.subscribe(),
                ready.clone(),
            ));
            clients.push((who, task));
        }
        // Every client is subscribed before the first write, so each view starts, like the
        // watched tables, empty.
        let everyone = clients.len();
        tokio::time::timeout(PATIENCE, ready.subscribe().wait_for(|n| *n == everyone))
            .await
            .expect("clients never subscribed")
            .expect("ready");
        let (stop, stopped) = watch::channel(false);
        let committed = Arc::new(watch::Sender::new(0u64));
        let rolled_back = Arc::new(AtomicU64::new(0));
        let seed = Uuid::new_v4().as_u64_pair().0 | 1;
        eprintln!("writer seed: {seed}");
        let writers = (0..4)
            .map(|w| {
                tokio::spawn(write(
                    db.url.clone(),
                    cast.clone(),
                    seed.wrapping_mul(w + 1) | 1,
                    stopped.clone(),
                    committed.clone(),
                    rolled_back.clone(),
                ))
            })
            .collect();
        Scenario {
            db,
            cast,
            stop,
            committed,
            rolled_back,
            fence,
            writers,
            clients,
        }
    }

    /// Stops the writers, inserts the fence, and checks every client against row-level security.
    async fn finish(self) {
        let _ = self.stop.send(true);
        for writer in self.writers {
            writer.await.expect("writer");
        }
        let mut client = reconnect(&self.db.url).await;
        let fence = Uuid::new_v4();
        self.fence.send_replace(Some(fence));
        let dentist = self.cast.dentists[0].user_id;
        client
            .execute(
                "insert into availability (id, dentist_id, starts_at, ends_at)
                 values ($1, $2, now(), now() + interval '1 hour')",
                &[&fence, &dentist],
            )
            .await
            .expect("fence");
        let mut total = 0;
        for (who, task) in self.clients {
            let model = tokio::time::timeout(PATIENCE * 2, task)
                .await
                .expect("a client never saw the fence")
                .expect("client task")
                .unwrap_or_else(|e| panic!("{e}"));
            total += model.events;
            common::assert_matches_rls(&mut client, &who, &model).await;
        }
        let events: i64 = client
            .query_one("select count(*) from relay.events", &[])
            .await
            .unwrap()
            .get(0);
        assert!(events >= 1000, "only {events} events were produced");
        assert!(self.rolled_back.load(Ordering::Relaxed) > 0);
        eprintln!(
            "{} commits, {} rollbacks, {events} events, {total} frames checked",
            *self.committed.borrow(),
            self.rolled_back.load(Ordering::Relaxed)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_across_listen_kills_and_a_postgres_restart() {
    let _serial = SERIAL.lock().await;
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let (_, address) = watch::channel(relay.local_addr());
    let scenario = Scenario::start(db, address).await;
    let mut admin = common::connect_to(&scenario.db.url).await;

    let mut kills = 0;
    for (step, at) in [150u64, 300, 450, 600, 750, 900].into_iter().enumerate() {
        wait_for_commits(&scenario.committed, at).await;
        let before = common::listen_reconnects(&relay);
        if step == 3 {
            restart_postgres();
            admin = reconnect(&scenario.db.url).await;
        } else {
            assert_eq!(
                common::kill_listen(&admin).await,
                1,
                "kill {step}: no LISTEN backend"
            );
            kills += 1;
        }
        // Listening again before the next kill, so that it has a backend to kill.
        common::wait_for_reconnect(&relay, before).await;
    }
    wait_for_commits(&scenario.committed, 1000).await;
    scenario.finish().await;
    let reconnects = common::listen_reconnects(&relay);
    assert!(
        reconnects > kills,
        "{reconnects} reconnects after {kills} kills and a restart"
    );
    drop(admin);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resume_without_loss_after_the_relay_is_killed() {
    let _serial = SERIAL.lock().await;
    let db = common::TestDb::new().await;
    let addr = free_address();
    let mut relay = RelayProcess::spawn(&db.url, addr).await;
    let (_, address) = watch::channel(addr);
    let scenario = Scenario::start(db, address).await;

    wait_for_commits(&scenario.committed, 300).await;
    relay.child.start_kill().expect("SIGKILL");
    relay.child.wait().await.expect("reap");
    wait_for_commits(&scenario.committed, 450).await;
    let mut relay = RelayProcess::spawn(&scenario.db.url, addr).await;
    wait_for_commits(&scenario.committed, 1000).await;
    scenario.finish().await;
    relay.child.start_kill().expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_socket_with_going_away_and_exits() {
    let _serial = SERIAL.lock().await;
    let db = common::TestDb::new().await;
    let addr = free_address();
    let mut relay = RelayProcess::spawn(&db.url, addr).await;
    let admin = db.user(Role::Admin).await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(common::Ws::subscribed(addr, admin, &["appointments"]).await);
    }
    relay.terminate();
    for ws in &mut sockets {
        match ws.next_message().await {
            Some(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), relay::protocol::close::GOING_AWAY)
            }
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
    let exit = tokio::time::timeout(PATIENCE, relay.child.wait())
        .await
        .expect("the relay did not exit after SIGTERM")
        .expect("wait");
    assert!(exit.success(), "{exit}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens after shutdown"
    );
}

/// The database goes back while the relay is away from it (restored from a backup, or failed over
/// to a standby that missed the last commits), and new events take the ids it already delivered.
/// It notices when it reconnects: every socket is closed to fetch current state, and what is
/// committed from then on is delivered, none of it mistaken for what was already sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_went_back_closes_every_socket_and_what_follows_is_delivered() {
    let _serial = SERIAL.lock().await;
    let db = common::TestDb::new().await;
    let relay = common::start_with(db.config()).await;
    let addr = relay.local_addr();
    let (admin, dentist) = (db.user(Role::Admin).await, db.user(Role::Dentist).await);
    async fn insert(client: &Client, dentist: Uuid, n: i32) {
        let sql = "insert into availability (dentist_id, starts_at, ends_at) \
                   select $1, now() + make_interval(days => n), \
                          now() + make_interval(days => n, hours => 1) \
                   from generate_series(1, $2) n";
        client.execute(sql, &[&dentist, &n]).await.unwrap();
    }
    let mut ws = common::Ws::subscribed(addr, admin, &["availability"]).await;
    for _ in 0..3 {
        insert(&db.client, dentist.user_id, 1).await;
    }
    let (mut ids, mut cursors) = (Vec::new(), Vec::new());
    while ids.len() < 3 {
        let frame = ws.recv().await;
        if frame["type"] == "event" {
            ids.push(frame["id"].as_i64().unwrap());
            cursors.push(frame["cursor"].as_str().unwrap().to_string());
        }
    }
    // A client that subscribes now, and then sees nothing, holds the relay's position: the last
    // event's cursor, tag and all, so that it too is refused once the log went back past it.
    let mut quiet = common::Ws::connect(addr, dentist).await;
    assert_eq!(quiet.subscribe("availability").await, cursors[2]);
    drop(quiet);

    // Back to just after the first event, with the relay shut out meanwhile.
    let admin_db = common::connect_to(&common::admin_url("postgres")).await;
    let allow = |yes: bool| format!("alter database {} allow_connections {yes}", db.name);
    admin_db.batch_execute(&allow(false)).await.unwrap();
    assert_eq!(common::kill_listen(&db.client).await, 1);
    db.client
        .batch_execute(&format!(
            "begin;
             set local session_replication_role = replica;
             delete from availability where id in
                 (select (new_row->>'id')::uuid from relay.events where id > {first});
             delete from relay.events where id > {first};
             select setval('relay.events_id_seq', {first});
             commit;",
            first = ids[0]
        ))
        .await
        .unwrap();
    // Committed before the relay is back: they take the ids it delivered, and one more.
    insert(&db.client, dentist.user_id, 3).await;
    admin_db.batch_execute(&allow(true)).await.unwrap();

    match ws.next_message().await {
        Some(Message::Close(Some(frame))) => {
            assert_eq!(u16::from(frame.code), relay::protocol::close::STATE_LOST);
            assert!(frame.reason.contains("went back"), "{}", frame.reason);
        }
        other => panic!("expected close 4010, got {other:?}"),
    }
    assert_eq!(common::starts_over(&relay), 1);
    let mut ws = common::Ws::connect(addr, admin).await;
    let restarted = ws.subscribe("availability").await;
    assert!(
        restarted.starts_with(&format!("{}.", ids[0] + 3)),
        "the position after starting over, the log's newest event: {restarted}"
    );
    // The next reconnect, before anything new was dispatched, finds the log as the relay left
    // it: the socket stays.
    let before = common::listen_reconnects(&relay);
    assert_eq!(common::kill_listen(&db.client).await, 1);
    common::wait_for_reconnect(&relay, before).await;
    insert(&db.client, dentist.user_id, 1).await;
    let frame = loop {
        let frame = ws.recv().await;
        if frame["type"] == "event" {
            break frame;
        }
    };
    assert_eq!(frame["id"].as_i64(), Some(ids[0] + 4), "{frame}");

    // A client away through all of it resumes. From the last event it had, whose id new events
    // have since taken and passed: refused, since the log no longer holds that event (its rows
    // may be gone too). From the first, which the restore kept: the new events.
    let mut away = common::Ws::connect(addr, admin).await;
    for lost in &cursors[1..] {
        away.send(
            json!({"type": "subscribe", "ref": "lost", "feed": "availability", "since": lost}),
        )
        .await;
        let reply = away.recv().await;
        assert_eq!(
            (&reply["type"], &reply["code"]),
            (&json!("error"), &json!("cursor_expired")),
            "{reply}"
        );
    }
    let replayed = away.resume("availability", &cursors[0]).await;
    let replayed: Vec<i64> = replayed.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(replayed, (1..=4).map(|n| ids[0] + n).collect::<Vec<_>>());
    // From the position a subscription was told after the relay started over: what came after.
    let mut late = common::Ws::connect(addr, admin).await;
    let replayed = late.resume("availability", &restarted).await;
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    assert_eq!(replayed[0]["id"].as_i64(), Some(ids[0] + 4));
    relay.shutdown().await;
}
