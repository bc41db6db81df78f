//! `relay-bench`: a load generator and benchmark for the relay.
//!
//! Against a fresh database and a relay it starts, it measures Postgres' own ceiling, opens the
//! sockets from several client processes, drives load phases, accounts for every delivery from
//! the authorization rules, measures a replay, and writes `results.json`, `results.md` and
//! `latency.svg`. See `BENCHMARKS.md` for the figures and the commands that produced them.

mod cast;
mod expect;
mod peer;
mod report;
mod run;
mod scrape;
mod stamped;
mod system;
mod worker;
mod writer;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Parser)]
#[command(
    name = "relay-bench",
    about = "Load generator and benchmark for the change-feed relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Internal>,

    /// A run of seconds with a few hundred sockets, to check that the tool works; CI runs it.
    #[arg(long)]
    quick: bool,

    /// `mix`: the role mix across all four tables; `fanout`: 50 admins plus one socket per user,
    /// each event to 51 sockets (the peers' workload).
    #[arg(long, value_enum, default_value = "mix")]
    mode: cast::Mode,

    /// WebSocket clients.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,

    /// Client processes the sockets are spread over (each from its own 127.0.0.x address).
    #[arg(long, default_value_t = 4)]
    client_processes: usize,

    /// Writer connections.
    #[arg(long, default_value_t = 8)]
    writers: usize,

    /// Once subscribed, each client process reads its sockets every this many microseconds,
    /// sleeping in between, instead of being woken by each frame (0, the default). A local
    /// client woken by a frame costs the relay's `send` that wake-up and often a switch to the
    /// client on the same core; clients on other machines cost it neither. The latency to the
    /// client's socket is measured either way.
    #[arg(long, default_value_t = 0)]
    client_poll_micros: u64,

    /// Rows each writer's transaction books, in the fan-out workload: above 1, events can come
    /// faster than Postgres commits single-row transactions, to find where the relay (or a
    /// peer) itself saturates. The rates and the ceiling still count commits and events apart.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    rows_per_commit: u16,

    /// Events per second in the rated phase.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,

    /// Seconds each load phase lasts.
    #[arg(long, default_value_t = 20)]
    seconds: u64,

    /// Seconds of the Postgres-alone ceiling measurement.
    #[arg(long, default_value_t = 10)]
    ceiling_seconds: u64,

    /// Skip the phase that writes as fast as Postgres commits.
    #[arg(long)]
    no_max: bool,

    /// Missed events replayed to one resuming client (0: skip).
    #[arg(long, default_value_t = 10_000)]
    replay: usize,

    /// The relay binary; by default the `relay` beside this one.
    #[arg(long)]
    relay_bin: Option<PathBuf>,

    /// Measure a peer in the relay's place, on the same database, writers and sockets, in the
    /// fan-out workload only (none has per-row authorization): `socketio`, a plain Socket.IO
    /// 4.8 + pg-listen relay; `postgraphile`, PostGraphile 4.14's simple subscriptions;
    /// `postgraphile-ids`, the same sending each event's node id only. Needs Node.js and
    /// `npm ci --prefix bench/peer`. No replay.
    #[arg(long, value_enum)]
    peer: Option<peer::Peer>,

    /// Where the peers' scripts and their `node_modules` are.
    #[arg(long, default_value_os_t = peer::default_dir())]
    peer_dir: PathBuf,

    /// Postgres server (without a database name); a fresh database is created and dropped.
    #[arg(
        long,
        env = "TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    postgres: String,

    /// Where the results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Internal {
    /// A client process (started by the benchmark itself).
    #[command(hide = true)]
    Worker,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Internal::Worker) = cli.command {
        // Client processes share the machine with everything else: one thread each.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        return match runtime.block_on(worker::run()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relay-bench worker: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let options = options(&cli);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    match runtime.block_on(run::run(options)) {
        Ok(results) => {
            println!("{}", results.markdown());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn options(cli: &Cli) -> run::Options {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|me| me.parent().map(|dir| dir.join("relay")))
        .unwrap_or_else(|| PathBuf::from("relay"));
    let mut options = run::Options {
        mode: cli.mode,
        clients: cli.clients,
        client_processes: cli.client_processes,
        writers: cli.writers,
        rows_per_commit: usize::from(cli.rows_per_commit),
        rate: cli.rate,
        duration: Duration::from_secs(cli.seconds),
        ceiling_duration: Duration::from_secs(cli.ceiling_seconds),
        max_phase: !cli.no_max,
        replay: cli.replay,
        relay_bin: cli.relay_bin.clone().unwrap_or(beside),
        peer: cli.peer,
        poll_micros: cli.client_poll_micros,
        peer_dir: cli.peer_dir.clone(),
        postgres: cli.postgres.trim_end_matches('/').to_string(),
        out: cli.out.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    if cli.quick {
        options.clients = options.clients.min(300);
        options.client_processes = options.client_processes.min(2);
        options.rate = options.rate.min(200.0);
        options.duration = Duration::from_secs(2);
        options.ceiling_duration = Duration::from_secs(1);
        options.replay = options.replay.min(1000);
    }
    options
}
