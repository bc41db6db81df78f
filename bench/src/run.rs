//! The orchestrator: prepares a fresh database, measures Postgres' ceiling, starts the relay,
//! spreads the sockets over client processes, drives the load phases, accounts for every
//! delivery, measures a replay, and writes the results.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use relay::authz::{Principal, Role};
use relay::protocol::Cursor;
use relay::token::{Issuer, Secret};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_postgres::{Client, NoTls};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::cast::{Cast, Mode};
use crate::expect::{self, Audience};
use crate::peer::Peer;
use crate::report::{
    self, FromCommitTimestamp, Memory, Percentiles, Phase, Replay, Results, Setup,
};
use crate::scrape;
use crate::worker::{self, Plan, Ready, Report, SocketPlan};
use crate::writer::{self, Rate};
use crate::{system, Error};

/// Everything a run is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    pub clients: usize,
    pub client_processes: usize,
    pub writers: usize,
    /// Rows each writer's transaction changes: 1, or more in the fan-out workload.
    pub rows_per_commit: usize,
    pub rate: f64,
    pub duration: Duration,
    pub ceiling_duration: Duration,
    pub max_phase: bool,
    pub replay: usize,
    pub relay_bin: PathBuf,
    pub peer: Option<Peer>,
    /// The client processes read their sockets every this many microseconds instead of waking
    /// for each frame; 0 for waking.
    pub poll_micros: u64,
    pub peer_dir: PathBuf,
    pub postgres: String,
    pub out: PathBuf,
    pub command: String,
}

/// A client process and its pipes.
struct Clients {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Clients {
    async fn send(&mut self, line: &impl serde::Serialize) -> Result<(), Error> {
        let mut bytes = serde_json::to_vec(line)?;
        bytes.push(b'\n');
        self.stdin.write_all(&bytes).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn receive<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, Error> {
        let line = tokio::time::timeout(Duration::from_secs(120), self.stdout.next_line())
            .await
            .map_err(|_| "a client process did not answer within 2 minutes")?;
        match line? {
            Some(line) => Ok(serde_json::from_str(&line)?),
            None => Err("a client process exited early".into()),
        }
    }
}

async fn connect(url: &str) -> Result<Client, Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The relay, or a peer in its place, as a child process.
struct RelayProcess {
    child: Child,
    addr: SocketAddr,
    health: &'static str,
}

impl RelayProcess {
    async fn start(options: &Options, url: &str, secret: &str) -> Result<RelayProcess, Error> {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let (child, health) = match options.peer {
            None => (
                start_relay(options, url, secret, addr)?,
                "/api/realtime/health",
            ),
            Some(peer) => (start_peer(options, peer, url, secret, addr)?, "/health"),
        };
        let relay = RelayProcess {
            child,
            addr,
            health,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !relay.healthy().await {
            if Instant::now() > deadline {
                return Err("the relay did not become healthy within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(relay)
    }

    async fn healthy(&self) -> bool {
        get(self.addr, self.health, None)
            .await
            .is_some_and(|(status, _)| status == 200)
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await;
    }
}

fn start_relay(
    options: &Options,
    url: &str,
    secret: &str,
    addr: SocketAddr,
) -> Result<Child, Error> {
    Command::new(&options.relay_bin)
        .arg("serve")
        .env("DATABASE_URL", url)
        .env("RELAY_JWT_SECRET", secret)
        .env("RELAY_BIND", addr.to_string())
        .env("RELAY_MAX_SOCKETS", (options.clients + 1000).to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start the relay at {} ({e}); build it with `cargo build --release -p relay` \
                 or pass --relay-bin",
                options.relay_bin.display()
            )
            .into()
        })
}

fn start_peer(
    options: &Options,
    peer: Peer,
    url: &str,
    secret: &str,
    addr: SocketAddr,
) -> Result<Child, Error> {
    if !options.peer_dir.join("node_modules").is_dir() {
        return Err(format!(
            "the peer's packages are not installed: run `npm ci --prefix {}`",
            options.peer_dir.display()
        )
        .into());
    }
    Command::new("node")
        .arg(peer.script(&options.peer_dir))
        .env("DATABASE_URL", url)
        .env("PEER_JWT_SECRET", secret)
        .env("PEER_BIND", addr.to_string())
        // As a deployment runs it (graphql-js, for one, checks less).
        .env("NODE_ENV", "production")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the peer with `node` ({e}); install Node.js 20").into())
}

/// Before a PostGraphile peer is measured, checks that it refuses a user the admins' topic and
/// another user's: it must decide who listens to what, as the relay decides who sees what. The
/// two users are made up: the peer's check compares the token's claims with the topic alone.
async fn check_topics_refused(peer: Peer, relay: SocketAddr, issuer: &Issuer) -> Result<(), Error> {
    let user = Principal {
        user_id: Uuid::new_v4(),
        role: Role::Patient,
    };
    let plan = Plan {
        relay,
        source: IpAddr::V4(Ipv4Addr::LOCALHOST),
        concurrency: 1,
        peer: Some(peer),
        poll_micros: 0,
        sockets: Vec::new(),
    };
    for topic in ["admins".to_string(), format!("user:{}", Uuid::new_v4())] {
        let socket = SocketPlan {
            token: issuer.issue(&user, Duration::from_secs(600)),
            feeds: Vec::new(),
            topic,
        };
        tokio::time::timeout(
            Duration::from_secs(30),
            worker::check_refused(&plan, &socket),
        )
        .await
        .map_err(|_| {
            format!(
                "the peer did not answer a subscription to `{}` within 30 s",
                socket.topic
            )
        })??;
    }
    Ok(())
}

/// A minimal HTTP GET: the status and the body.
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response)
        .await
        .ok()?;
    let status = response.get(9..12)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// The relay's latency histograms, from its `/metrics`; none if it did not answer.
async fn relay_histograms(relay: SocketAddr) -> Option<RelayHistograms> {
    match get(relay, "/metrics", None).await {
        Some((200, body)) => Some(RelayHistograms {
            received: scrape::Buckets::parse(&body, scrape::RECEIVED),
            queued: scrape::Buckets::parse(&body, scrape::QUEUED),
        }),
        _ => None,
    }
}

/// From commit to the relay holding an event, and to its frames written or queued everywhere.
struct RelayHistograms {
    received: scrape::Buckets,
    queued: scrape::Buckets,
}

/// What the relay's histograms counted since `before`, once they hold `events` more events: the
/// relay observes an event just after queueing its frames, so a client can hold the last event
/// a moment before the histogram counts it. None if the relay did not answer, or never counted
/// them all within a few seconds.
async fn relay_histograms_since(
    relay: SocketAddr,
    before: &RelayHistograms,
    events: u64,
) -> Option<RelayHistograms> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = relay_histograms(relay).await?;
        let queued = now.queued.since(&before.queued);
        if queued.events() >= events {
            return Some(RelayHistograms {
                received: now.received.since(&before.received),
                queued,
            });
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the relay's stats (as an admin) until `done` says so, for at most a minute; `what` names
/// the wait in the error.
async fn stats_until(
    relay: SocketAddr,
    issuer: &Issuer,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<(), Error> {
    let admin = Principal {
        user_id: Uuid::new_v4(),
        role: Role::Admin,
    };
    let token = issuer.issue(&admin, Duration::from_secs(600));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, body)) = get(relay, "/api/realtime/stats", Some(&token)).await {
            if done(&serde_json::from_str(&body)?) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{what} within 60 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the relay holds no socket: the client processes' are closed.
async fn sockets_gone(relay: SocketAddr, issuer: &Issuer) -> Result<(), Error> {
    stats_until(relay, issuer, "the relay still held sockets", |stats| {
        stats["connectedSockets"].as_u64() == Some(0)
    })
    .await
}

/// Waits until the relay has dispatched every event up to `position`.
async fn caught_up(relay: SocketAddr, issuer: &Issuer, position: Cursor) -> Result<(), Error> {
    stats_until(
        relay,
        issuer,
        "the relay did not catch up with the log",
        |stats| {
            let at: Option<i64> = stats["position"].as_str().and_then(|p| p.parse().ok());
            at.is_some_and(|at| at >= position.0)
        },
    )
    .await
}

/// Creates the run's database and migrates it.
async fn create_database(options: &Options) -> Result<(String, String), Error> {
    let name = format!("relay_bench_{}", Uuid::new_v4().simple());
    let admin = connect(&format!("{}/postgres", options.postgres)).await?;
    admin
        .batch_execute(&format!("create database {name}"))
        .await?;
    let url = format!("{}/{name}", options.postgres);
    let mut client = connect(&url).await?;
    relay::migrate::migrate(&mut client).await?;
    Ok((name, url))
}

async fn drop_database(options: &Options, name: &str) {
    if let Ok(admin) = connect(&format!("{}/postgres", options.postgres)).await {
        let _ = admin
            .batch_execute(&format!("drop database if exists {name} with (force)"))
            .await;
    }
}

/// Adds the cast's profiles and sessions, in bulk.
async fn populate(client: &Client, cast: &Cast) -> Result<(), Error> {
    let profiles = cast.profiles();
    let ids: Vec<Uuid> = profiles.iter().map(|(id, _)| *id).collect();
    let roles: Vec<&str> = profiles.iter().map(|(_, role)| role.as_str()).collect();
    client
        .execute(
            "insert into profiles (id, role) select * from unnest($1::uuid[], $2::text[])",
            &[&ids, &roles],
        )
        .await?;
    let sessions: Vec<Uuid> = cast.sessions.iter().map(|s| s.id).collect();
    let patients: Vec<Uuid> = cast.sessions.iter().map(|s| s.patient).collect();
    let dentists: Vec<Uuid> = cast.sessions.iter().map(|s| s.dentist).collect();
    client
        .execute(
            "insert into consultation_sessions (id, patient_id, dentist_id, status)
             select s, p, d, 'active' from unnest($1::uuid[], $2::uuid[], $3::uuid[]) as t(s, p, d)",
            &[&sessions, &patients, &dentists],
        )
        .await?;
    Ok(())
}

/// Starts the client processes, each with its share of the sockets; returns once every socket
/// is subscribed, with how long that took.
async fn start_clients(
    options: &Options,
    cast: &Cast,
    relay: SocketAddr,
    issuer: &Issuer,
) -> Result<(Vec<Clients>, Setup), Error> {
    let members = cast.members();
    let processes = options.client_processes.max(1).min(members.len().max(1));
    // Dealt out in turn, so that every process holds its share of each role: the 50 admins alone
    // receive about half of the role mix's deliveries, and one process holding them all would
    // queue their frames behind each other while the others idled.
    let mut shares: Vec<Vec<&crate::cast::Member>> = vec![Vec::new(); processes];
    for (i, member) in members.iter().enumerate() {
        shares[i % processes].push(member);
    }
    let me = std::env::current_exe()?;
    let mut clients = Vec::new();
    for (i, chunk) in shares.iter().enumerate() {
        let mut child = Command::new(&me)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let mut process = Clients {
            child,
            stdin,
            stdout,
        };
        let plan = Plan {
            relay,
            source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8)),
            concurrency: 64,
            peer: options.peer,
            poll_micros: options.poll_micros,
            sockets: chunk
                .iter()
                .map(|m| SocketPlan {
                    token: issuer.issue(&m.principal(), Duration::from_secs(4 * 3600)),
                    feeds: m.feeds.clone(),
                    topic: match m.role {
                        Role::Admin => "admins".to_string(),
                        _ => format!("user:{}", m.user_id),
                    },
                })
                .collect(),
        };
        process.send(&plan).await?;
        clients.push(process);
    }
    let (mut began, mut ended) = (i64::MAX, i64::MIN);
    for process in &mut clients {
        let ready: Ready = process.receive().await?;
        began = began.min(ready.began_micros);
        ended = ended.max(ready.ended_micros);
    }
    // From the first socket's connect to the last one's `subscribed`, over every process.
    let span = (ended - began).max(1) as f64 / 1e6;
    Ok((
        clients,
        Setup {
            sockets_per_second: members.len() as f64 / span,
            seconds: span,
        },
    ))
}

async fn broadcast(clients: &mut [Clients], command: worker::Command) -> Result<(), Error> {
    for process in clients {
        process.send(&command).await?;
    }
    Ok(())
}

async fn collect(clients: &mut [Clients]) -> Result<Vec<Report>, Error> {
    broadcast(clients, worker::Command::Report).await?;
    let mut reports = Vec::new();
    for process in clients {
        reports.push(process.receive().await?);
    }
    Ok(reports)
}

async fn log_position(client: &Client) -> Result<Cursor, Error> {
    Ok(relay::log::position(client).await?)
}

/// Waits until the sockets have received every expected delivery of the phase, or nothing
/// more arrives for two seconds.
async fn drain(
    clients: &mut [Clients],
    expected: &HashMap<i64, u64>,
) -> Result<Vec<Report>, Error> {
    let want: u64 = expected.values().sum();
    let mut last = 0;
    let mut quiet = 0;
    loop {
        let reports = collect(clients).await?;
        let received = expect::account(expected, &merged(&reports)).received;
        if received >= want || (received == last && quiet >= 10) {
            return Ok(reports);
        }
        quiet = if received == last { quiet + 1 } else { 0 };
        last = received;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deliveries per event, over every client process.
fn merged(reports: &[Report]) -> HashMap<i64, u64> {
    let mut per_event: HashMap<i64, u64> = HashMap::new();
    for report in reports {
        for (id, count) in &report.per_event {
            *per_event.entry(*id).or_default() += u64::from(*count);
        }
    }
    per_event
}

/// The events in `(after, upto]` each socket received, indexed like [`Cast::members`]: the
/// sockets were dealt out in turn, so process `p`'s `j`-th socket is member `j × processes + p`.
async fn received_per_socket(
    clients: &mut [Clients],
    after: Cursor,
    upto: Cursor,
) -> Result<Vec<Option<expect::Digest>>, Error> {
    let processes = clients.len();
    broadcast(
        clients,
        worker::Command::PerSocket {
            after: after.0,
            upto: upto.0,
        },
    )
    .await?;
    let mut sockets = Vec::new();
    for (p, process) in clients.iter_mut().enumerate() {
        let answer: worker::PerSocket = process.receive().await?;
        for (j, digest) in answer.sockets.into_iter().enumerate() {
            let member = j * processes + p;
            if sockets.len() <= member {
                sockets.resize(member + 1, None);
            }
            sockets[member] = Some(digest);
        }
    }
    Ok(sockets)
}

/// Sends a command to every client process and waits until each has carried it out.
async fn command(clients: &mut [Clients], command: worker::Command) -> Result<(), Error> {
    broadcast(clients, command).await?;
    for process in clients {
        let _: worker::Done = process.receive().await?;
    }
    Ok(())
}

/// The CPU time the client processes have used so far, together.
fn clients_cpu(clients: &[Clients]) -> Duration {
    clients
        .iter()
        .filter_map(|c| c.child.id().and_then(system::cpu_time))
        .sum()
}

struct Context<'a> {
    options: &'a Options,
    db: &'a Client,
    audience: &'a Audience,
    relay_pid: u32,
    relay_addr: SocketAddr,
    ceiling: f64,
}

/// One load phase: the writers at `rate` for the phase's duration, every delivery accounted for.
async fn phase(
    context: &Context<'_>,
    clients: &mut [Clients],
    writers: Vec<writer::Writer>,
    name: &str,
    rate: Rate,
) -> Result<(Vec<writer::Writer>, Phase), Error> {
    command(clients, worker::Command::Reset).await?;
    let before = log_position(context.db).await?;
    let start = Instant::now();
    let cpu_before = system::cpu_time(context.relay_pid).unwrap_or_default();
    let clients_cpu_before = clients_cpu(clients);
    let machine_before = system::machine_ticks();
    let histograms_before = relay_histograms(context.relay_addr).await;
    let (writers, written) = writer::write(
        writers,
        rate,
        context.options.rows_per_commit,
        context.options.duration,
    )
    .await?;
    let machine_shares = machine_before
        .zip(system::machine_ticks())
        .map(|(before, after)| system::busy_share(before, after));
    let machine_busy = machine_shares.map(|(busy, _)| busy);
    let machine_stolen = machine_shares.map(|(_, stolen)| stolen);
    command(clients, worker::Command::Mark).await?;
    let after = log_position(context.db).await?;

    // Expected deliveries, event by event, from the log and the subscriptions; then what came.
    let expect::Expected {
        deliveries: expected,
        xids,
        per_socket,
    } = expect::expected(context.db, context.audience, before, after).await?;
    let reports = drain(clients, &expected).await?;
    // The relay's CPU over the phase, including the drain: all the work the phase's events cost.
    let cpu = system::cpu_time(context.relay_pid).unwrap_or_default() - cpu_before;
    let clients_cpu = clients_cpu(clients).saturating_sub(clients_cpu_before);
    // The span the CPU times cover; not the reading of the histograms below.
    let elapsed = start.elapsed().as_secs_f64();
    let histograms = match &histograms_before {
        Some(before) => {
            relay_histograms_since(context.relay_addr, before, expected.len() as u64).await
        }
        None => None,
    };
    let relay_received_ms = histograms.as_ref().and_then(|h| h.received.percentiles());
    let relay_queued_ms = histograms.as_ref().and_then(|h| h.queued.percentiles());
    let mut latency = worker::latency_histogram();
    let (mut at_mark, mut out_of_order, mut unstamped, mut closed) = (0, 0, 0, 0);
    for report in &reports {
        worker::add_recorded(&mut latency, &report.latency_us);
        at_mark += report.deliveries_at_mark;
        out_of_order += report.out_of_order;
        unstamped += report.unstamped;
        closed += report.closed;
    }
    let mut accounting = expect::account(&expected, &merged(&reports));
    (accounting.sockets_checked, accounting.sockets_wrong) = expect::compare_sockets(
        &per_socket,
        &received_per_socket(clients, before, after).await?,
    );
    let (
        latency_from_acknowledgement_ms,
        latency_from_acknowledgement_at_socket_ms,
        arrived_before_acknowledgement,
        acknowledged_events,
    ) = measured_from(clients, acknowledgements(&xids, &written.acknowledged)).await?;
    let from_commit_timestamp = match commit_timestamps(context.db, before, after).await? {
        Some(commits) => {
            let (latency, at_socket, early, events) = measured_from(clients, commits).await?;
            Some(FromCommitTimestamp {
                latency_ms: latency,
                at_socket_ms: at_socket,
                arrived_before: early,
                events,
            })
        }
        None => None,
    };
    let seconds = written.seconds;
    let commits_per_second = written.commits as f64 / seconds;
    let phase = Phase {
        name: name.to_string(),
        target_per_second: match rate {
            Rate::PerSecond(r) => Some(r),
            Rate::Max => None,
        },
        seconds,
        events_per_second: accounting.events as f64 / seconds,
        deliveries_per_second: accounting.received as f64 / seconds,
        ratio_to_ceiling: commits_per_second / context.ceiling.max(1e-9),
        accounting,
        delivered_within_run: at_mark as f64 / (accounting.expected.max(1)) as f64,
        out_of_order,
        unstamped,
        closed_sockets: closed,
        latency_ms: Percentiles::of(&latency),
        latency_from_acknowledgement_ms,
        latency_from_acknowledgement_at_socket_ms,
        arrived_before_acknowledgement,
        acknowledged_events,
        from_commit_timestamp,
        relay_received_ms,
        relay_queued_ms,
        machine_busy,
        machine_stolen,
        clients_cpu_cores: clients_cpu.as_secs_f64() / elapsed,
        relay_cpu_cores: cpu.as_secs_f64() / elapsed,
        relay_cores_per_100k_deliveries: cpu.as_secs_f64() * 100_000.0
            / (accounting.received.max(1)) as f64,
        curve: report::curve(&latency),
    };
    Ok((writers, phase))
}

/// Latency from a time per event (its writer's acknowledgement, or its commit timestamp), which
/// the client processes measure against every delivery they recorded: to when they read it, and
/// to when it reached the socket. Also the deliveries read before that time, and how many of the
/// phase's events had one.
async fn measured_from(
    clients: &mut [Clients],
    commits: Vec<(i64, i64)>,
) -> Result<(Percentiles, Percentiles, u64, u64), Error> {
    let events = commits.len() as u64;
    broadcast(clients, worker::Command::Acknowledged { commits }).await?;
    let (mut latency, mut at_socket) = (worker::latency_histogram(), worker::latency_histogram());
    let mut early = 0;
    for process in clients {
        let answer: worker::FromAcknowledgement = process.receive().await?;
        worker::add_recorded(&mut latency, &answer.latency_us);
        worker::add_recorded(&mut at_socket, &answer.at_socket_us);
        early += answer.early;
    }
    Ok((
        Percentiles::of(&latency),
        Percentiles::of(&at_socket),
        early,
        events,
    ))
}

/// When each writer saw its event's transaction acknowledged: the events' transaction ids (from
/// the log) matched with the writers' acknowledgements.
fn acknowledgements(xids: &HashMap<i64, u64>, acknowledged: &[(u64, i64)]) -> Vec<(i64, i64)> {
    let by_xid: HashMap<u64, i64> = acknowledged.iter().copied().collect();
    xids.iter()
        .filter_map(|(id, xid)| by_xid.get(xid).map(|at| (*id, *at)))
        .collect()
}

/// Each event's commit timestamp, as Postgres recorded it just before writing the commit, when
/// the server keeps them (`track_commit_timestamp = on`); none otherwise.
async fn commit_timestamps(
    db: &Client,
    after: Cursor,
    upto: Cursor,
) -> Result<Option<Vec<(i64, i64)>>, Error> {
    let tracked: String = db
        .query_one("select current_setting('track_commit_timestamp')", &[])
        .await?
        .get(0);
    if tracked != "on" {
        return Ok(None);
    }
    // pg_xact_commit_timestamp takes a 32-bit xid: the low half of the event's xid8.
    let rows = db
        .query(
            "select id, (extract(epoch from pg_xact_commit_timestamp(
                        ((xid::text::numeric % 4294967296)::text)::xid)) * 1000000)::bigint
             from relay.events where id > $1 and id <= $2",
            &[&after.0, &upto.0],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .filter_map(|row| Some((row.get::<_, i64>(0), row.get::<_, Option<i64>>(1)?)))
            .collect(),
    ))
}

/// How long one resuming dentist takes to receive `count` events it missed.
async fn replay(
    db: &Client,
    relay: SocketAddr,
    issuer: &Issuer,
    count: usize,
) -> Result<Replay, Error> {
    let (dentist, patient) = (Uuid::new_v4(), Uuid::new_v4());
    db.execute(
        "insert into profiles (id, role) values ($1, 'dentist'), ($2, 'patient')",
        &[&dentist, &patient],
    )
    .await?;
    let token = issuer.issue(
        &Principal {
            user_id: dentist,
            role: Role::Dentist,
        },
        Duration::from_secs(3600),
    );
    let url = format!("ws://{relay}/ws?access_token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
    ws.send(Message::text(
        r#"{"type":"subscribe","feed":"appointments"}"#,
    ))
    .await?;
    let cursor = loop {
        if let Some(Ok(Message::Text(text))) = ws.next().await {
            let reply: serde_json::Value = serde_json::from_str(&text)?;
            if let Some(cursor) = reply["cursor"].as_str() {
                break cursor.to_string();
            }
        } else {
            return Err("no subscribed reply".into());
        }
    };
    drop(ws);
    for chunk in 0..count.div_ceil(1000) {
        let n = (count - chunk * 1000).min(1000) as i32;
        db.execute(
            "insert into appointments (patient_id, dentist_id, starts_at, ends_at)
             select $1, $2, now(), now() + interval '1 hour' from generate_series(1, $3)",
            &[&patient, &dentist, &n],
        )
        .await?;
    }
    // The relay has dispatched them all, so the resumed subscription replays all of them.
    caught_up(relay, issuer, log_position(db).await?).await?;
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
    let start = Instant::now();
    let machine_before = system::machine_ticks();
    ws.send(Message::text(format!(
        r#"{{"type":"subscribe","feed":"appointments","since":"{cursor}"}}"#
    )))
    .await?;
    let (mut events, mut first) = (0, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, ws.next()).await {
        let Message::Text(text) = message else {
            continue;
        };
        if text.contains(r#""type":"event""#) {
            events += 1;
            first.get_or_insert_with(|| start.elapsed());
        } else if text.contains(r#""type":"live""#) {
            break;
        } else if text.contains(r#""type":"error""#) {
            return Err(format!("the resumed subscription failed: {text}").into());
        }
    }
    let all = start.elapsed();
    let stolen = machine_before
        .zip(system::machine_ticks())
        .map(|(before, after)| system::busy_share(before, after).1);
    if events != count {
        return Err(format!("replayed {events} events, expected {count}").into());
    }
    Ok(Replay {
        events,
        first_ms: first.unwrap_or_default().as_secs_f64() * 1000.0,
        all_ms: all.as_secs_f64() * 1000.0,
        stolen,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .to_string();
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / (1024 * 1024))
        })
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {memory} GiB")
}

/// Runs the whole benchmark and writes `results.json`, `results.md` and `latency.svg` to the
/// output directory.
pub async fn run(options: Options) -> Result<Results, Error> {
    let cast = Arc::new(Cast::new(options.mode, options.clients));
    let (name, url) = create_database(&options).await?;
    let outcome = measure(&options, &cast, &url).await;
    drop_database(&options, &name).await;
    let results = outcome?;
    std::fs::create_dir_all(&options.out)?;
    std::fs::write(
        options.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(options.out.join("results.md"), results.markdown())?;
    std::fs::write(options.out.join("latency.svg"), results.svg())?;
    Ok(results)
}

async fn measure(options: &Options, cast: &Arc<Cast>, url: &str) -> Result<Results, Error> {
    if options.peer.is_some() && options.mode != Mode::Fanout {
        // A peer without per-row authorization would send the role mix's rows to everyone.
        return Err("a peer is measured in the fan-out workload only: add --mode fanout".into());
    }
    if options.rows_per_commit != 1 && options.mode != Mode::Fanout {
        return Err("--rows-per-commit is for the fan-out workload only: add --mode fanout".into());
    }
    let db = connect(url).await?;
    // What the peer needs in the database goes in before the ceiling, which then includes it.
    if let Some(setup) = options.peer.and_then(|p| p.setup(&options.peer_dir)) {
        let sql = std::fs::read_to_string(&setup)
            .map_err(|e| format!("cannot read {}: {e}", setup.display()))?;
        db.batch_execute(&sql).await?;
    }
    populate(&db, cast).await?;
    let secret_text = format!(
        "bench-{}-{}",
        Uuid::new_v4().simple(),
        Uuid::new_v4().simple()
    );
    let issuer = Issuer::new(&Secret::new(secret_text.clone())?);

    eprintln!(
        "relay-bench: Postgres alone, {} writers, as fast as it commits",
        options.writers
    );
    let writers = writer::connect(url, cast, options.writers).await?;
    let (writers, ceiling) = writer::write(
        writers,
        Rate::Max,
        options.rows_per_commit,
        options.ceiling_duration,
    )
    .await?;
    let ceiling = ceiling.commits as f64 / ceiling.seconds;

    let relay = RelayProcess::start(options, url, &secret_text).await?;
    let pid = relay.pid();
    let before = system::resident_bytes(pid).unwrap_or_default();
    if let Some(peer) = options.peer.filter(|p| p.graphql()) {
        check_topics_refused(peer, relay.addr, &issuer).await?;
    }
    eprintln!("relay-bench: opening {} sockets", cast.members().len());
    let (mut clients, setup) = start_clients(options, cast, relay.addr, &issuer).await?;
    // Let the relay's allocator settle before reading its size: a measurement, not a wait for
    // anything.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = system::resident_bytes(pid).unwrap_or_default();
    let sockets = cast.members().len();
    let memory = Memory {
        relay_before_bytes: before,
        relay_idle_bytes: idle,
        per_socket_bytes: idle.saturating_sub(before) as f64 / sockets as f64,
    };

    let audience = Audience::new(cast);
    let context = Context {
        options,
        db: &db,
        audience: &audience,
        relay_pid: pid,
        relay_addr: relay.addr,
        ceiling,
    };
    let mut phases = Vec::new();
    let mut rates = vec![(
        format!("{} events/s", options.rate),
        Rate::PerSecond(options.rate),
    )];
    if options.max_phase {
        rates.push(("as fast as Postgres commits".to_string(), Rate::Max));
    }
    let mut writers = writers;
    for (name, rate) in rates {
        eprintln!("relay-bench: {name} for {:?}", options.duration);
        let (returned, phase) = phase(&context, &mut clients, writers, &name, rate).await?;
        writers = returned;
        phases.push(phase);
    }
    drop(writers);

    // The client processes have reported everything; they hold nothing else. They go before the
    // replay: its 10,000 events, written in a few large transactions, would otherwise also go live
    // to every admin's socket at once, overflow their queues and have the relay cut them, and
    // the replay would be timed on a relay busy with that.
    for process in &mut clients {
        let _ = process.child.kill().await;
    }
    // A peer keeps no log to replay from.
    let replay = if options.replay > 0 && options.peer.is_none() {
        eprintln!("relay-bench: replay of {} missed events", options.replay);
        sockets_gone(relay.addr, &issuer).await?;
        Some(replay(&db, relay.addr, &issuer, options.replay).await?)
    } else {
        None
    };
    relay.stop().await;
    Ok(Results {
        machine: machine(),
        command: options.command.clone(),
        server: options.peer.map_or("the relay", Peer::describe).to_string(),
        mode: options.mode,
        sockets,
        client_processes: options.client_processes,
        poll_micros: options.poll_micros,
        writers: options.writers,
        rows_per_commit: options.rows_per_commit,
        setup,
        memory,
        ceiling_commits_per_second: ceiling,
        phases,
        replay,
    })
}
