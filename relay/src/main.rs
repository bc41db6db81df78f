//! The `relay` binary: parses the command line, sets up logging, and calls into the library.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::prelude::*;

use relay::config::{Cli, Command, Config, LogFormat};
use relay::token::{Issuer, TokenConfig};
use relay::{dev, migrate, Relay};

/// Whether a log line may be written at all, whatever `RUST_LOG` says: the WebSocket library
/// traces every frame's payload below `info`, and a client's `auth` frame carries its token,
/// which must never reach the logs.
fn never_secret(metadata: &tracing::Metadata<'_>) -> bool {
    let websocket = ["tungstenite", "tokio_tungstenite"].iter().any(|name| {
        metadata
            .target()
            .strip_prefix(name)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    });
    !websocket || *metadata.level() <= tracing::Level::INFO
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("{}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    if cli.rust_log.trim().is_empty() {
        // EnvFilter reads an empty filter as "nothing at all": not one line, errors included.
        eprintln!("error: RUST_LOG is set but empty; give a level such as `info`, or unset it");
        return ExitCode::from(2);
    }
    let filter = match EnvFilter::try_new(&cli.rust_log) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("error: invalid value {:?} for RUST_LOG: {e}", cli.rust_log);
            return ExitCode::from(2);
        }
    };
    // RUST_LOG filters globally, so that disabled levels cost nothing (the `log` records of the
    // WebSocket library are not even formatted); `never_secret` filters what is written.
    let format = match cli.relay_log_format {
        // Colours only for a terminal: not in files, pipes or `docker compose logs`.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(format.with_filter(filter_fn(never_secret)))
        .init();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.worker_threads())
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// A command-line error as one line that names the setting and the problem.
fn one_line(error: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    if error.kind() == ErrorKind::MissingRequiredArgument {
        if let Some(ContextValue::Strings(missing)) = error.get(ContextKind::InvalidArg) {
            return format!(
                "error: missing required setting {} (an environment variable or a flag)",
                missing.join(", ")
            );
        }
    }
    let rendered = error.to_string();
    rendered
        .lines()
        .next()
        .unwrap_or("error: invalid arguments")
        .to_string()
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Migrate(args) => {
            let mut client = connect_patiently(&args.database_url).await?;
            let applied = migrate::migrate(&mut client)
                .await
                .map_err(|e| e.to_string())?;
            if applied.is_empty() {
                println!("up to date: nothing to apply");
            } else {
                for name in applied {
                    println!("applied {name}");
                }
            }
            Ok(())
        }
        Command::Token(args) => {
            let principal = relay::authz::Principal {
                user_id: args.sub.unwrap_or_else(uuid::Uuid::new_v4),
                role: args.role,
            };
            println!(
                "{}",
                Issuer::new(&args.relay_jwt_secret).issue(&principal, args.ttl)
            );
            Ok(())
        }
        Command::Serve(args) => {
            let tokens = args.auth.token_config()?;
            let config = Config::from_parts(args.database_url, tokens, args.tuning);
            serve(config, None).await
        }
        Command::Dev(args) => {
            // Its demo tokens (an admin's among them) are handed to whoever asks at /dev/tokens,
            // signed with RELAY_JWT_SECRET: never to another machine.
            if !args.tuning.relay_bind.ip().is_loopback() {
                return Err(format!(
                    "relay dev serves demo tokens to anyone who asks, so it binds only to this \
                     machine: RELAY_BIND={} is not a loopback address (use relay serve)",
                    args.tuning.relay_bind
                ));
            }
            dev::prepare(&args.database_url)
                .await
                .map_err(|e| e.to_string())?;
            let psql = dev::psql_command(&args.database_url);
            let issuer = Issuer::new(&args.relay_jwt_secret);
            // The development secret is no secret; one of the user's own is not printed.
            let token_command = if args.relay_jwt_secret.is(relay::config::DEV_JWT_SECRET) {
                format!("RELAY_JWT_SECRET={}", relay::config::DEV_JWT_SECRET)
            } else {
                "RELAY_JWT_SECRET=<the one relay dev runs with>".to_string()
            };
            let tokens = TokenConfig::hs256(args.relay_jwt_secret);
            let mut config = Config::from_parts(args.database_url, tokens, args.tuning);
            config.demo_issuer = Some(issuer.clone());
            serve(config, Some((issuer, psql, token_command))).await
        }
    }
}

/// How long `relay migrate` keeps trying to reach a database that is starting.
const MIGRATE_CONNECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Connects, retrying for a while: `relay migrate` often starts beside a database that is still
/// starting (a compose stack, a Kubernetes job).
async fn connect_patiently(
    database: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, String> {
    let deadline = tokio::time::Instant::now() + MIGRATE_CONNECT_PATIENCE;
    let mut delay = std::time::Duration::from_millis(250);
    loop {
        match relay::connect(database).await {
            Ok(client) => return Ok(client),
            // Waiting does not make a password right or a database exist.
            Err(e) if !refused_for_good(&e) && tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(cause = %relay::Causes(&e), retry_in = ?delay, "cannot connect to DATABASE_URL yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => {
                return Err(format!(
                    "cannot connect to DATABASE_URL: {}",
                    relay::Causes(&e)
                ))
            }
        }
    }
}

/// Whether Postgres refused the connection for a reason that waiting cannot change: the
/// credentials (SQLSTATE class 28) or the database's name (3D000).
fn refused_for_good(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|code| {
        code.code().starts_with("28")
            || *code == tokio_postgres::error::SqlState::INVALID_CATALOG_NAME
    })
}

/// Serves until SIGINT or SIGTERM; `relay dev` also prints its banner, with tokens from `issuer`.
async fn serve(config: Config, dev: Option<(Issuer, String, String)>) -> Result<(), String> {
    // Every client connection is a file descriptor; containers often start with a soft limit of
    // 1,024, far below the sockets the relay is meant to hold.
    match relay::serve::raise_open_file_limit() {
        Ok(files) => tracing::debug!(files, "open-file limit"),
        Err(e) => tracing::warn!(cause = %e, "cannot raise the open-file limit"),
    }
    let relay = Relay::start(config).await.map_err(|e| e.to_string())?;
    if let Some((issuer, psql, token_command)) = dev {
        println!(
            "{}",
            dev::banner(&issuer, relay.local_addr(), &psql, &token_command)
        );
    }
    relay::shutdown_signal().await;
    tracing::info!("shutting down");
    relay.shutdown().await;
    Ok(())
}
