//! Configuration: the command line, where every setting is both an environment variable and a
//! flag of the same name (`RELAY_BIND` is `--relay-bind`), parsed and validated once at start-up.
//! `docs/operations.md` lists every setting; the README's Configuration table, the common ones.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::authz::Role;
use crate::token::{parse_duration, Algorithm, KeySource, Secret, TokenConfig};

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
const DEFAULT_HEADER_TIMEOUT: &str = "10s";
const DEFAULT_QUERY_TIMEOUT: &str = "5s";
const DEFAULT_MAX_SUBSCRIPTIONS_PER_SOCKET: u32 = 4;
const DEFAULT_MAX_FRAMES_PER_SECOND: u32 = 50;
const DEFAULT_MAX_SOCKETS_PER_USER: u32 = 16;
const DEFAULT_MAX_SOCKETS: u32 = 20_000;

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

    /// Log lines as plain text, or as one JSON object per line (for log shippers). JSON lines
    /// carry the fields of the span they were written in, such as a socket's user and role.
    #[arg(
        long = "relay-log-format",
        env = "RELAY_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub relay_log_format: LogFormat,

    /// Threads of the async runtime; by default one per core. On a small machine shared with
    /// Postgres, fewer threads hand work back and forth less (see BENCHMARKS.md).
    #[arg(long = "relay-worker-threads", env = "RELAY_WORKER_THREADS", global = true,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub relay_worker_threads: Option<u32>,

    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
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
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true,
          value_parser = DatabaseUrl)]
    pub database_url: tokio_postgres::Config,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Postgres connection URL. The LISTEN connection must reach the primary directly, not
    /// through a transaction pooler.
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true,
          value_parser = DatabaseUrl)]
    pub database_url: tokio_postgres::Config,

    #[command(flatten)]
    pub auth: AuthArgs,

    #[command(flatten)]
    pub tuning: Tuning,
}

/// How `serve` verifies tokens: one pinned algorithm and its key.
#[derive(Debug, Args, Clone)]
pub struct AuthArgs {
    /// The one algorithm tokens must be signed with: HS256 (with RELAY_JWT_SECRET), RS256 or
    /// ES256 (with RELAY_JWT_PUBLIC_KEY_FILE or RELAY_JWKS_FILE).
    #[arg(long = "relay-jwt-alg", env = "RELAY_JWT_ALG", default_value = "HS256",
          value_parser = Algorithm::from_str)]
    pub relay_jwt_alg: Algorithm,

    /// HS256 secret that signs access tokens; at least 32 bytes.
    #[arg(long = "relay-jwt-secret", env = "RELAY_JWT_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub relay_jwt_secret: Option<Secret>,

    /// RS256/ES256: the PEM file holding the public key that verifies tokens.
    #[arg(
        long = "relay-jwt-public-key-file",
        env = "RELAY_JWT_PUBLIC_KEY_FILE",
        conflicts_with = "relay_jwks_file"
    )]
    pub relay_jwt_public_key_file: Option<PathBuf>,

    /// RS256/ES256: a JWKS file (`{"keys": [...]}`); a token's `kid` picks the key.
    #[arg(long = "relay-jwks-file", env = "RELAY_JWKS_FILE")]
    pub relay_jwks_file: Option<PathBuf>,

    /// When set, a token's `aud` claim must name this value.
    #[arg(long = "relay-jwt-audience", env = "RELAY_JWT_AUDIENCE", value_parser = parse_claim)]
    pub relay_jwt_audience: Option<String>,

    /// When set, a token's `iss` claim must equal this value.
    #[arg(long = "relay-jwt-issuer", env = "RELAY_JWT_ISSUER", value_parser = parse_claim)]
    pub relay_jwt_issuer: Option<String>,
}

impl AuthArgs {
    /// The token configuration, or the one line that says what is missing or contradictory.
    pub fn token_config(self) -> Result<TokenConfig, String> {
        let algorithm = self.relay_jwt_alg;
        let key = match (
            algorithm,
            self.relay_jwt_secret,
            self.relay_jwt_public_key_file,
            self.relay_jwks_file,
        ) {
            (Algorithm::Hs256, Some(secret), None, None) => KeySource::Secret(secret),
            (Algorithm::Hs256, None, None, None) => {
                return Err("missing required setting RELAY_JWT_SECRET (RELAY_JWT_ALG is HS256)".into())
            }
            (Algorithm::Hs256, _, _, _) => {
                return Err("RELAY_JWT_ALG is HS256, which verifies with RELAY_JWT_SECRET only; \
                            unset RELAY_JWT_PUBLIC_KEY_FILE and RELAY_JWKS_FILE, or set RELAY_JWT_ALG"
                    .into())
            }
            (_, Some(_), _, _) => {
                return Err(format!(
                    "RELAY_JWT_ALG is {algorithm}, which verifies with a public key; \
                     unset RELAY_JWT_SECRET"
                ))
            }
            (_, None, Some(path), None) => KeySource::PublicKeyFile(path),
            (_, None, None, Some(path)) => KeySource::JwksFile(path),
            (_, None, None, None) => {
                return Err(format!(
                    "missing required setting RELAY_JWT_PUBLIC_KEY_FILE or RELAY_JWKS_FILE \
                     (RELAY_JWT_ALG is {algorithm})"
                ))
            }
            (_, None, Some(_), Some(_)) => {
                return Err("set RELAY_JWT_PUBLIC_KEY_FILE or RELAY_JWKS_FILE, not both".into())
            }
        };
        Ok(TokenConfig {
            algorithm,
            key,
            leeway: crate::token::DEFAULT_LEEWAY,
            audience: self.relay_jwt_audience,
            issuer: self.relay_jwt_issuer,
        })
    }
}

/// Settings with defaults, shared by `serve` and `dev`.
#[derive(Debug, Args, Clone)]
pub struct Tuning {
    /// Address to serve HTTP and WebSockets on.
    #[arg(long = "relay-bind", env = "RELAY_BIND", default_value = DEFAULT_BIND,
          value_parser = parse_address)]
    pub relay_bind: SocketAddr,

    /// Address to serve `/metrics` on, apart from `RELAY_BIND` (e.g. `0.0.0.0:9090`, a port not
    /// published beyond the monitoring network); `/metrics` is then not served on `RELAY_BIND`.
    /// Unset, or the same address as `RELAY_BIND`: `/metrics` is served on `RELAY_BIND`, without
    /// authentication.
    #[arg(long = "relay-metrics-bind", env = "RELAY_METRICS_BIND", value_parser = parse_address)]
    pub relay_metrics_bind: Option<SocketAddr>,

    /// Frames each socket may have waiting to be sent; a socket whose queue fills is closed
    /// with code 4008. At least 8: a replay leaves half the queue to live frames and its `live`
    /// marker.
    #[arg(long = "relay-socket-queue", env = "RELAY_SOCKET_QUEUE", default_value_t = DEFAULT_SOCKET_QUEUE,
          value_parser = clap::value_parser!(u32).range(8..=1_000_000))]
    pub relay_socket_queue: u32,

    /// Connections in the pool for clients' requests: subscribe-time checks, replays, sends and
    /// history. Each user may hold half of them at once. The LISTEN connection and the two the
    /// relay keeps for itself (catching up on the log, presence) are separate.
    #[arg(long = "relay-pool-size", env = "RELAY_POOL_SIZE", default_value_t = DEFAULT_POOL_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub relay_pool_size: u32,

    /// Largest WebSocket message accepted from a client, in bytes.
    #[arg(long = "relay-max-frame-bytes", env = "RELAY_MAX_FRAME_BYTES", default_value_t = DEFAULT_MAX_FRAME_BYTES,
          value_parser = clap::value_parser!(u32).range(256..=16_777_216))]
    pub relay_max_frame_bytes: u32,

    /// Clock skew tolerated on a token's `exp` and `nbf`; a socket closes (4001) when its token
    /// expires plus this leeway, unless an `auth` frame brought a fresh token.
    #[arg(long = "relay-jwt-leeway", env = "RELAY_JWT_LEEWAY", default_value = DEFAULT_JWT_LEEWAY,
          value_parser = parse_duration)]
    pub relay_jwt_leeway: Duration,

    /// How long shutdown waits for sockets to close before exiting.
    #[arg(long = "relay-shutdown-grace", env = "RELAY_SHUTDOWN_GRACE", default_value = DEFAULT_SHUTDOWN_GRACE,
          value_parser = parse_duration)]
    pub relay_shutdown_grace: Duration,

    /// How long a connection may take, from its opening, to send its request's head (its request
    /// line and headers); a connection over it is closed. Each connection serves one request.
    /// WebSockets, once open, are not affected.
    #[arg(long = "relay-header-timeout", env = "RELAY_HEADER_TIMEOUT", default_value = DEFAULT_HEADER_TIMEOUT,
          value_parser = parse_header_timeout)]
    pub relay_header_timeout: Duration,

    /// How long a client's request may wait for a database connection, and then for its query,
    /// before it is answered `unavailable` (503); a query given up on is cancelled on the server.
    #[arg(long = "relay-query-timeout", env = "RELAY_QUERY_TIMEOUT", default_value = DEFAULT_QUERY_TIMEOUT,
          value_parser = parse_query_timeout)]
    pub relay_query_timeout: Duration,

    /// How long the event log keeps events, and so how far back a client can resume; older
    /// events are deleted in the background, and a cursor older than this gets `cursor_expired`.
    #[arg(long = "relay-retention", env = "RELAY_RETENTION", default_value = DEFAULT_RETENTION,
          value_parser = parse_retention)]
    pub relay_retention: Duration,

    /// Subscriptions one socket may hold (one per feed, so at most 4); one more is refused with
    /// `too_many_subscriptions`.
    #[arg(long = "relay-max-subscriptions-per-socket", env = "RELAY_MAX_SUBSCRIPTIONS_PER_SOCKET",
          default_value_t = DEFAULT_MAX_SUBSCRIPTIONS_PER_SOCKET,
          value_parser = clap::value_parser!(u32).range(1..=4))]
    pub relay_max_subscriptions_per_socket: u32,

    /// Frames a socket may send per second (with bursts of as many); a socket over the rate is
    /// closed with 4029.
    #[arg(long = "relay-max-frames-per-second", env = "RELAY_MAX_FRAMES_PER_SECOND",
          default_value_t = DEFAULT_MAX_FRAMES_PER_SECOND,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub relay_max_frames_per_second: u32,

    /// Sockets one user may hold open at once; one more is refused with HTTP 429.
    #[arg(long = "relay-max-sockets-per-user", env = "RELAY_MAX_SOCKETS_PER_USER",
          default_value_t = DEFAULT_MAX_SOCKETS_PER_USER,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub relay_max_sockets_per_user: u32,

    /// Sockets this relay holds open at once; one more is refused with HTTP 503. Each socket is an
    /// open file: client connections stop, and wait to be accepted, at what the open-file limit
    /// leaves after the relay's own files, whichever is lower.
    #[arg(long = "relay-max-sockets", env = "RELAY_MAX_SOCKETS", default_value_t = DEFAULT_MAX_SOCKETS,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub relay_max_sockets: u32,

    /// Comma-separated `Origin` values browser pages may open sockets and call the HTTP API from
    /// (e.g. `https://dash.example.com`); an upgrade or API request from any other origin is
    /// refused with HTTP 403. Unset: every origin. Requests without an `Origin` header (not from a
    /// browser) are allowed.
    #[arg(long = "relay-allowed-origins", env = "RELAY_ALLOWED_ORIGINS", value_delimiter = ',',
          value_parser = parse_origin)]
    pub relay_allowed_origins: Vec<String>,
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
          hide_env_values = true, value_parser = DatabaseUrl)]
    pub database_url: tokio_postgres::Config,

    /// HS256 secret; a fixed development secret if unset.
    #[arg(long = "relay-jwt-secret", env = "RELAY_JWT_SECRET", hide_env_values = true,
          default_value = DEV_JWT_SECRET, value_parser = parse_secret)]
    pub relay_jwt_secret: Secret,

    #[command(flatten)]
    pub tuning: Tuning,
}

/// Limits that keep one client from harming the others (see [`crate::limits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_subscriptions_per_socket: usize,
    pub max_frames_per_second: u32,
    pub max_sockets_per_user: usize,
    pub max_sockets: usize,
    /// Empty: every origin.
    pub allowed_origins: Vec<String>,
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: tokio_postgres::Config,
    pub tokens: TokenConfig,
    pub bind: SocketAddr,
    /// Where `/metrics` is served apart from `bind`; `None`: on `bind`.
    pub metrics_bind: Option<SocketAddr>,
    pub socket_queue: usize,
    pub pool_size: usize,
    pub shutdown_grace: Duration,
    pub retention: Duration,
    /// How long a connection may take to send a request's head.
    pub header_timeout: Duration,
    /// How long a client's request may wait for the database.
    pub query_timeout: Duration,
    pub limits: Limits,
    /// `relay dev` only: the signer of the demo users' tokens, issued afresh on each request of
    /// the inspector page (`GET /dev/tokens`). `None` otherwise, and the route answers `[]`.
    pub demo_issuer: Option<crate::token::Issuer>,
}

/// A demo user and a token for it, as `relay dev` offers them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoToken {
    pub name: String,
    pub role: Role,
    pub user_id: Uuid,
    pub token: String,
}

impl Config {
    /// A configuration with every default and HS256 tokens signed with `jwt_secret`, as
    /// `relay serve` would have with only the two required settings.
    pub fn new(database: tokio_postgres::Config, jwt_secret: Secret) -> Config {
        Config::from_parts(database, TokenConfig::hs256(jwt_secret), Tuning::defaults())
    }

    pub fn from_parts(
        database: tokio_postgres::Config,
        tokens: TokenConfig,
        tuning: Tuning,
    ) -> Config {
        Config {
            database,
            tokens: TokenConfig {
                leeway: tuning.relay_jwt_leeway,
                ..tokens
            },
            bind: tuning.relay_bind,
            // The same address as RELAY_BIND names no address of its own: the way back, in an
            // image that sets RELAY_METRICS_BIND, to /metrics beside the sockets.
            metrics_bind: tuning
                .relay_metrics_bind
                .filter(|metrics| *metrics != tuning.relay_bind),
            socket_queue: tuning.relay_socket_queue as usize,
            pool_size: tuning.relay_pool_size as usize,
            shutdown_grace: tuning.relay_shutdown_grace,
            retention: tuning.relay_retention,
            header_timeout: tuning.relay_header_timeout,
            query_timeout: tuning.relay_query_timeout,
            limits: Limits {
                max_frame_bytes: tuning.relay_max_frame_bytes as usize,
                max_subscriptions_per_socket: tuning.relay_max_subscriptions_per_socket as usize,
                max_frames_per_second: tuning.relay_max_frames_per_second,
                max_sockets_per_user: tuning.relay_max_sockets_per_user as usize,
                max_sockets: tuning.relay_max_sockets as usize,
                allowed_origins: tuning
                    .relay_allowed_origins
                    .into_iter()
                    .filter(|origin| !origin.is_empty())
                    .collect(),
            },
            demo_issuer: None,
        }
    }
}

impl Cli {
    /// The runtime's thread count: the setting, or one per core.
    pub fn worker_threads(&self) -> usize {
        self.relay_worker_threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            |n| n as usize,
        )
    }
}

impl Tuning {
    /// The documented defaults, independent of the environment.
    pub fn defaults() -> Tuning {
        Tuning {
            relay_bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            relay_metrics_bind: None,
            relay_socket_queue: DEFAULT_SOCKET_QUEUE,
            relay_pool_size: DEFAULT_POOL_SIZE,
            relay_max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            relay_shutdown_grace: Duration::from_secs(10),
            relay_jwt_leeway: crate::token::DEFAULT_LEEWAY,
            relay_retention: Duration::from_secs(24 * 3600),
            relay_header_timeout: Duration::from_secs(10),
            relay_query_timeout: crate::db::QUERY_TIMEOUT,
            relay_max_subscriptions_per_socket: DEFAULT_MAX_SUBSCRIPTIONS_PER_SOCKET,
            relay_max_frames_per_second: DEFAULT_MAX_FRAMES_PER_SECOND,
            relay_max_sockets_per_user: DEFAULT_MAX_SOCKETS_PER_USER,
            relay_max_sockets: DEFAULT_MAX_SOCKETS,
            relay_allowed_origins: Vec::new(),
        }
    }
}

/// Parses `DATABASE_URL`. Unlike the other settings, a refused value is not repeated in the
/// error: it may hold a password.
#[derive(Clone)]
struct DatabaseUrl;

impl clap::builder::TypedValueParser for DatabaseUrl {
    type Value = tokio_postgres::Config;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        let name = arg.map_or_else(|| "DATABASE_URL".to_string(), ToString::to_string);
        value
            .to_str()
            .ok_or_else(|| "not UTF-8".to_string())
            .and_then(parse_database_url)
            .map_err(|reason| {
                clap::Error::raw(
                    clap::error::ErrorKind::ValueValidation,
                    format!(
                        "invalid value for '{name}' (not repeated here: it may hold a password): \
                         {reason}\n"
                    ),
                )
                .with_cmd(cmd)
            })
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

/// An address to listen on: an IP address and a port.
fn parse_address(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        "expected an IP address and a port, such as 127.0.0.1:8080 (this machine only) or \
         0.0.0.0:8080 (every interface); a host name such as localhost is not taken"
            .to_string()
    })
}

fn parse_header_timeout(value: &str) -> Result<Duration, String> {
    let timeout = parse_duration(value)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&timeout) {
        return Err("must be between 1s and 1h".into());
    }
    Ok(timeout)
}

fn parse_query_timeout(value: &str) -> Result<Duration, String> {
    let timeout = parse_duration(value)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&timeout) {
        return Err("must be between 1s and 5m".into());
    }
    Ok(timeout)
}

fn parse_retention(value: &str) -> Result<Duration, String> {
    let retention = parse_duration(value)?;
    if retention < Duration::from_secs(1) {
        return Err("retention must be at least 1s".into());
    }
    Ok(retention)
}

/// A required `aud` or `iss`. An empty one would refuse every token that names an audience or
/// issuer; a setting left empty by mistake (`RELAY_JWT_AUDIENCE=`) stops the relay instead.
fn parse_claim(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err("must not be empty; leave the setting unset to accept any".into());
    }
    Ok(value.to_string())
}

/// An origin as browsers send it: `scheme://host[:port]`, no path; compared case-insensitively.
/// An empty value (an empty `RELAY_ALLOWED_ORIGINS`) names no origin.
fn parse_origin(value: &str) -> Result<String, String> {
    let origin = value.trim().trim_end_matches('/').to_ascii_lowercase();
    if origin.is_empty() {
        return Ok(origin);
    }
    let valid = origin.split_once("://").is_some_and(|(scheme, authority)| {
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_lowercase())
            && scheme
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-".contains(c));
        // A host name or an IPv6 address in brackets, and a port if any.
        let (host_ok, rest) = match authority.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((address, rest)) => (
                    !address.is_empty()
                        && address
                            .chars()
                            .all(|c| c.is_ascii_hexdigit() || ":.".contains(c)),
                    rest,
                ),
                None => (false, ""),
            },
            None => {
                let end = authority.find(':').unwrap_or(authority.len());
                let host = &authority[..end];
                (
                    !host.is_empty()
                        && host.chars().all(|c| {
                            c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c)
                        }),
                    &authority[end..],
                )
            }
        };
        let port_ok = rest.is_empty()
            || rest
                .strip_prefix(':')
                .is_some_and(|port| port.parse::<u16>().is_ok());
        scheme_ok && host_ok && port_ok
    });
    if valid {
        Ok(origin)
    } else {
        Err(format!(
            "{value:?} is not an origin like https://dash.example.com or http://localhost:3000"
        ))
    }
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
        assert_eq!(
            parse_header_timeout(DEFAULT_HEADER_TIMEOUT),
            Ok(t.relay_header_timeout)
        );
        assert_eq!(
            parse_query_timeout(DEFAULT_QUERY_TIMEOUT),
            Ok(t.relay_query_timeout)
        );
        assert!(parse_query_timeout("500ms").is_err());
        assert!(parse_query_timeout("6m").is_err());
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
            serve(&["--relay-jwt-secret", &secret, "--relay-socket-queue", "7"]),
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

    /// A refused `DATABASE_URL` is not printed back: it may hold a password. Nor is it shown by
    /// `--help`.
    #[test]
    fn the_database_url_is_never_printed() {
        let url = "postgres://relay:hunter2secret@db:5432";
        let err = Cli::try_parse_from(["relay", "migrate", "--database-url", url]).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("hunter2secret"), "{text}");
        assert!(
            text.contains("DATABASE_URL") && text.contains("must name a database"),
            "{text}"
        );
        let cli = Cli::command();
        for command in ["serve", "migrate", "dev"] {
            let url = cli
                .find_subcommand(command)
                .unwrap()
                .get_arguments()
                .find(|arg| arg.get_env() == Some(std::ffi::OsStr::new("DATABASE_URL")))
                .unwrap();
            assert!(url.is_hide_env_values_set(), "{command}");
        }
    }

    fn serve_args(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let base = ["relay", "serve", "--database-url", "postgres://h/db"];
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        match Cli::try_parse_from(args)?.command {
            Command::Serve(args) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn the_token_settings_must_agree_with_the_algorithm() {
        let secret = "x".repeat(32);
        let ok = |extra: &[&str]| serve_args(extra).unwrap().auth.token_config().unwrap();
        let hs = ok(&["--relay-jwt-secret", &secret]);
        assert_eq!(hs.algorithm, Algorithm::Hs256);
        assert!(matches!(hs.key, KeySource::Secret(_)));
        let rs = ok(&[
            "--relay-jwt-alg",
            "RS256",
            "--relay-jwt-public-key-file",
            "k.pem",
        ]);
        assert!(matches!(rs.key, KeySource::PublicKeyFile(_)));
        let es = ok(&[
            "--relay-jwt-alg",
            "ES256",
            "--relay-jwks-file",
            "jwks.json",
            "--relay-jwt-audience",
            "relay",
            "--relay-jwt-issuer",
            "https://auth.example",
        ]);
        assert!(matches!(es.key, KeySource::JwksFile(_)));
        assert_eq!(es.audience.as_deref(), Some("relay"));
        assert_eq!(es.issuer.as_deref(), Some("https://auth.example"));

        let contradictions: [&[&str]; 5] = [
            &[],
            &["--relay-jwt-secret", &secret, "--relay-jwks-file", "j.json"],
            &["--relay-jwt-alg", "RS256"],
            &["--relay-jwt-alg", "RS256", "--relay-jwt-secret", &secret],
            &[
                "--relay-jwt-alg",
                "ES256",
                "--relay-jwt-secret",
                &secret,
                "--relay-jwks-file",
                "j",
            ],
        ];
        for extra in contradictions {
            let err = serve_args(extra).unwrap().auth.token_config().unwrap_err();
            assert!(err.contains("RELAY_"), "{extra:?}: {err}");
        }
        for extra in [
            &["--relay-jwt-alg", "none"][..],
            &["--relay-jwt-alg", "HS512"],
            &[
                "--relay-jwt-alg",
                "RS256",
                "--relay-jwt-public-key-file",
                "a",
                "--relay-jwks-file",
                "b",
            ],
        ] {
            assert!(serve_args(extra).is_err(), "{extra:?}");
        }
    }

    #[test]
    fn limits_and_origins_parse() {
        let secret = "x".repeat(32);
        let args = serve_args(&[
            "--relay-jwt-secret",
            &secret,
            "--relay-allowed-origins",
            "https://Dash.Example.com/,http://localhost:3000,http://[::1]:8000",
            "--relay-max-sockets-per-user",
            "3",
        ])
        .unwrap();
        let config = Config::from_parts(
            args.database_url,
            args.auth.token_config().unwrap(),
            args.tuning,
        );
        assert_eq!(
            config.limits.allowed_origins,
            [
                "https://dash.example.com",
                "http://localhost:3000",
                "http://[::1]:8000"
            ]
        );
        assert_eq!(config.limits.max_sockets_per_user, 3);
        assert_eq!(config.limits.max_subscriptions_per_socket, 4);
        assert_eq!(config.limits.max_frames_per_second, 50);
        assert_eq!(config.limits.max_sockets, 20_000);
        let unset = serve_args(&["--relay-jwt-secret", &secret, "--relay-allowed-origins", ""]);
        let unset = unset.unwrap().tuning;
        let config = Config::from_parts(
            "postgres://h/db".parse().unwrap(),
            TokenConfig::hs256(Secret::new(secret.clone()).unwrap()),
            unset,
        );
        assert!(
            config.limits.allowed_origins.is_empty(),
            "empty means every origin"
        );
        let metrics = |extra: &[&str]| {
            let mut args = vec![
                "--relay-jwt-secret",
                &secret,
                "--relay-bind",
                "0.0.0.0:8080",
            ];
            args.extend_from_slice(extra);
            let args = serve_args(&args).unwrap();
            let tokens = args.auth.token_config().unwrap();
            Config::from_parts(args.database_url, tokens, args.tuning).metrics_bind
        };
        assert_eq!(metrics(&[]), None);
        assert_eq!(
            metrics(&["--relay-metrics-bind", "0.0.0.0:9090"]),
            Some("0.0.0.0:9090".parse().unwrap())
        );
        assert_eq!(
            metrics(&["--relay-metrics-bind", "0.0.0.0:8080"]),
            None,
            "RELAY_BIND's own address: /metrics beside the sockets"
        );
        for bad in [
            &["--relay-allowed-origins", "dash.example.com"][..],
            &["--relay-allowed-origins", "https://dash.example.com/app"],
            &["--relay-allowed-origins", "https://dash example.com"],
            &["--relay-allowed-origins", "https://dash.example.com:port"],
            &["--relay-allowed-origins", "https://[::1"],
            &["--relay-allowed-origins", "1https://dash.example.com"],
            &["--relay-max-subscriptions-per-socket", "5"],
            &["--relay-max-frames-per-second", "0"],
            // Empty by mistake: every token naming an audience or issuer would be refused.
            &["--relay-jwt-audience", ""],
            &["--relay-jwt-issuer", " "],
        ] {
            let mut extra = vec!["--relay-jwt-secret", &secret];
            extra.extend_from_slice(bad);
            assert!(serve_args(&extra).is_err(), "{bad:?}");
        }
    }
}
