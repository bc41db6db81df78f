//! Configuration: the command line, where every setting is both an environment variable and a
//! flag of the same name (`RELAY_BIND` is `--relay-bind`), parsed and validated once at start-up.
//! The README's Configuration table lists every setting.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::authz::Role;
use crate::token::{parse_duration, Secret};

/// The database `relay dev` uses when `DATABASE_URL` is not set.
pub const DEV_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/relay_dev";

/// The signing secret `relay dev` uses when `RELAY_JWT_SECRET` is not set. Development only:
/// `relay serve` has no default secret.
pub const DEV_JWT_SECRET: &str = "relay-dev-secret-do-not-use-in-production";

const DEFAULT_BIND: &str = "127.0.0.1:8080";
const DEFAULT_SOCKET_QUEUE: u32 = 1024;
const DEFAULT_POOL_SIZE: u32 = 8;
const DEFAULT_MAX_FRAME_BYTES: u32 = 65536;
const DEFAULT_SHUTDOWN_GRACE: &str = "10s";
const DEFAULT_JWT_LEEWAY: &str = "30s";
const DEFAULT_RETENTION: &str = "24h";

#[derive(Debug, Parser)]
#[command(
    name = "relay",
    version,
    about = "Postgres change-feed relay: row changes to authorized per-user WebSocket feeds"
)]
pub struct Cli {
    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `relay=debug`).
    #[arg(
        long = "rust-log",
        env = "RUST_LOG",
        default_value = "info",
        global = true
    )]
    pub rust_log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply sql/ and triggers/ to the database, idempotently, recording what was applied.
    Migrate(MigrateArgs),
    /// Serve WebSocket feeds and the HTTP API.
    Serve(ServeArgs),
    /// Print a signed access token, for development and tests.
    Token(TokenArgs),
    /// Create and migrate a development database, add demo data, print tokens, and serve.
    Dev(DevArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Postgres connection URL.
    #[arg(long = "database-url", env = "DATABASE_URL", value_parser = parse_database_url)]
    pub database_url: tokio_postgres::Config,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Postgres connection URL. The LISTEN connection must reach the primary directly, not
    /// through a transaction pooler.
    #[arg(long = "database-url", env = "DATABASE_URL", value_parser = parse_database_url)]
    pub database_url: tokio_postgres::Config,

    /// HS256 secret that signs access tokens; at least 32 bytes.
    #[arg(long = "relay-jwt-secret", env = "RELAY_JWT_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub relay_jwt_secret: Secret,

    #[command(flatten)]
    pub tuning: Tuning,
}

/// Settings with defaults, shared by `serve` and `dev`.
#[derive(Debug, Args, Clone)]
pub struct Tuning {
    /// Address to serve HTTP and WebSockets on.
    #[arg(long = "relay-bind", env = "RELAY_BIND", default_value = DEFAULT_BIND)]
    pub relay_bind: SocketAddr,

    /// Frames each socket may have waiting to be sent; a socket whose queue fills is closed
    /// with code 4008.
    #[arg(long = "relay-socket-queue", env = "RELAY_SOCKET_QUEUE", default_value_t = DEFAULT_SOCKET_QUEUE,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub relay_socket_queue: u32,

    /// Connections in the pool used for queries (the LISTEN connection is separate).
    #[arg(long = "relay-pool-size", env = "RELAY_POOL_SIZE", default_value_t = DEFAULT_POOL_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub relay_pool_size: u32,

    /// Largest WebSocket message accepted from a client, in bytes.
    #[arg(long = "relay-max-frame-bytes", env = "RELAY_MAX_FRAME_BYTES", default_value_t = DEFAULT_MAX_FRAME_BYTES,
          value_parser = clap::value_parser!(u32).range(256..=16_777_216))]
    pub relay_max_frame_bytes: u32,

    /// Clock skew tolerated on a token's `exp`; a socket closes (4001) when its token expires
    /// plus this leeway.
    #[arg(long = "relay-jwt-leeway", env = "RELAY_JWT_LEEWAY", default_value = DEFAULT_JWT_LEEWAY,
          value_parser = parse_duration)]
    pub relay_jwt_leeway: Duration,

    /// How long shutdown waits for sockets to close before exiting.
    #[arg(long = "relay-shutdown-grace", env = "RELAY_SHUTDOWN_GRACE", default_value = DEFAULT_SHUTDOWN_GRACE,
          value_parser = parse_duration)]
    pub relay_shutdown_grace: Duration,

    /// How long the event log keeps events, and so how far back a client can resume; older
    /// events are deleted in the background, and a cursor older than this gets `cursor_expired`.
    #[arg(long = "relay-retention", env = "RELAY_RETENTION", default_value = DEFAULT_RETENTION,
          value_parser = parse_retention)]
    pub relay_retention: Duration,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The token's role.
    #[arg(long, value_parser = parse_role)]
    pub role: Role,
    /// The user id (`sub` claim); a new random one if omitted.
    #[arg(long)]
    pub sub: Option<Uuid>,
    /// How long the token is valid, e.g. 30m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// HS256 secret that signs access tokens; at least 32 bytes.
    #[arg(long = "relay-jwt-secret", env = "RELAY_JWT_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub relay_jwt_secret: Secret,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Postgres connection URL; the database is created if missing.
    #[arg(long = "database-url", env = "DATABASE_URL", default_value = DEV_DATABASE_URL,
          value_parser = parse_database_url)]
    pub database_url: tokio_postgres::Config,

    /// HS256 secret; a fixed development secret if unset.
    #[arg(long = "relay-jwt-secret", env = "RELAY_JWT_SECRET", hide_env_values = true,
          default_value = DEV_JWT_SECRET, value_parser = parse_secret)]
    pub relay_jwt_secret: Secret,

    #[command(flatten)]
    pub tuning: Tuning,
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: tokio_postgres::Config,
    pub jwt_secret: Secret,
    pub bind: SocketAddr,
    pub socket_queue: usize,
    pub pool_size: usize,
    pub max_frame_bytes: usize,
    pub shutdown_grace: Duration,
    pub jwt_leeway: Duration,
    pub retention: Duration,
}

impl Config {
    /// A configuration with every default, as `relay serve` would have with only the two
    /// required settings.
    pub fn new(database: tokio_postgres::Config, jwt_secret: Secret) -> Config {
        let defaults = Tuning::defaults();
        Config::from_parts(database, jwt_secret, defaults)
    }

    pub fn from_parts(
        database: tokio_postgres::Config,
        jwt_secret: Secret,
        tuning: Tuning,
    ) -> Config {
        Config {
            database,
            jwt_secret,
            bind: tuning.relay_bind,
            socket_queue: tuning.relay_socket_queue as usize,
            pool_size: tuning.relay_pool_size as usize,
            max_frame_bytes: tuning.relay_max_frame_bytes as usize,
            shutdown_grace: tuning.relay_shutdown_grace,
            jwt_leeway: tuning.relay_jwt_leeway,
            retention: tuning.relay_retention,
        }
    }
}

impl Tuning {
    /// The documented defaults, independent of the environment.
    pub fn defaults() -> Tuning {
        Tuning {
            relay_bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            relay_socket_queue: DEFAULT_SOCKET_QUEUE,
            relay_pool_size: DEFAULT_POOL_SIZE,
            relay_max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            relay_shutdown_grace: Duration::from_secs(10),
            relay_jwt_leeway: crate::token::DEFAULT_LEEWAY,
            relay_retention: Duration::from_secs(24 * 3600),
        }
    }
}

fn parse_database_url(value: &str) -> Result<tokio_postgres::Config, String> {
    let config = tokio_postgres::Config::from_str(value)
        .map_err(|e| format!("not a valid Postgres URL ({e})"))?;
    if config.get_dbname().is_none() {
        return Err("the URL must name a database, e.g. postgres://user@host:5432/clinic".into());
    }
    Ok(config)
}

fn parse_retention(value: &str) -> Result<Duration, String> {
    let retention = parse_duration(value)?;
    if retention < Duration::from_secs(1) {
        return Err("retention must be at least 1s".into());
    }
    Ok(retention)
}

fn parse_secret(value: &str) -> Result<Secret, String> {
    Secret::new(value)
}

fn parse_role(value: &str) -> Result<Role, String> {
    value
        .parse()
        .map_err(|_| format!("{value:?} is not a role: use admin, dentist, patient or chatbot"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let t = Tuning::defaults();
        assert_eq!(t.relay_bind, DEFAULT_BIND.parse().unwrap());
        assert_eq!(
            parse_duration(DEFAULT_SHUTDOWN_GRACE),
            Ok(t.relay_shutdown_grace)
        );
        assert_eq!(t.relay_bind, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.relay_socket_queue, 1024);
        assert_eq!(t.relay_pool_size, 8);
        assert_eq!(t.relay_max_frame_bytes, 65536);
        assert_eq!(t.relay_shutdown_grace, Duration::from_secs(10));
        assert_eq!(parse_duration(DEFAULT_RETENTION), Ok(t.relay_retention));
    }

    #[test]
    fn invalid_settings_fail_with_one_clear_line() {
        let secret = "x".repeat(32);
        let serve = |extra: &[&str]| -> Vec<String> {
            let base = ["relay", "serve", "--database-url", "postgres://h/db"];
            base.iter().chain(extra).map(|s| s.to_string()).collect()
        };
        let cases = [
            vec![
                "relay",
                "serve",
                "--database-url",
                "nonsense://",
                "--relay-jwt-secret",
                &secret,
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            serve(&["--relay-jwt-secret", "short"]),
            serve(&["--relay-jwt-secret", &secret, "--relay-bind", "nowhere"]),
            serve(&["--relay-jwt-secret", &secret, "--relay-socket-queue", "0"]),
            serve(&["--relay-jwt-secret", &secret, "--relay-retention", "0s"]),
            [
                "relay",
                "token",
                "--role",
                "root",
                "--relay-jwt-secret",
                &secret,
            ]
            .into_iter()
            .map(String::from)
            .collect(),
        ];
        for args in cases {
            let err = Cli::try_parse_from(&args).expect_err(&args.join(" "));
            let first = err
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            assert!(first.starts_with("error: invalid value"), "{first}");
        }
    }
}
