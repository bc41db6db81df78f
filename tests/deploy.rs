//! The deployment files, checked against the code without a Docker engine: `docker-compose.yml`,
//! the `Dockerfile`, `.env.example` and the configuration reference in `docs/operations.md`.
//! Every environment variable the relay reads must be set or documented, commands must name real
//! subcommands, and ports and health check paths must match what the relay serves.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use yaml_rust2::{Yaml, YamlLoader};

use relay::config::Cli;
use relay::http::HEALTH_PATH;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> Yaml {
    let mut documents = YamlLoader::load_from_str(&read("docker-compose.yml")).expect("valid YAML");
    assert_eq!(documents.len(), 1, "one YAML document");
    documents.remove(0)
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let service = &compose["services"][name];
    assert!(
        !service.is_badvalue(),
        "docker-compose.yml has no service {name}"
    );
    service
}

/// A service's `environment` as (name, value) pairs.
fn environment(service: &Yaml) -> Vec<(String, String)> {
    let Some(environment) = service["environment"].as_hash() else {
        return Vec::new();
    };
    environment
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                Yaml::Boolean(b) => b.to_string(),
                other => panic!("environment value {other:?}"),
            };
            (k.as_str().expect("variable name").to_string(), value)
        })
        .collect()
}

fn strings(value: &Yaml) -> Vec<String> {
    value
        .as_vec()
        .map(|items| {
            items
                .iter()
                .map(|i| i.as_str().expect("string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Every environment variable the relay binary reads, over all its subcommands.
fn variables_the_relay_reads() -> BTreeSet<String> {
    let cli = Cli::command();
    let mut commands = vec![&cli];
    commands.extend(cli.get_subcommands());
    let mut variables: BTreeSet<String> = commands
        .iter()
        .flat_map(|command| command.get_arguments())
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect();
    // Read by `relay dev` and `relay serve` alike; listed explicitly so that the list is never
    // empty by mistake.
    assert!(variables.contains("DATABASE_URL") && variables.contains("RELAY_JWT_SECRET"));
    variables.insert("DATABASE_URL".into());
    variables
}

/// `${NAME}`, `${NAME:-default}`, `${NAME:?message}` references in a compose file.
fn interpolated(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        names.insert(after[..end].to_string());
        rest = &after[end..];
    }
    names
}

/// The names `.env.example` sets or documents (`NAME=` or `#NAME=`).
fn documented_in_env_example() -> BTreeSet<String> {
    read(".env.example")
        .lines()
        .filter_map(|line| {
            let line = line.trim_start_matches('#').trim();
            let (name, _) = line.split_once('=')?;
            let name = name.trim();
            (!name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit()))
            .then(|| name.to_string())
        })
        .collect()
}

fn port_of(bind: &str) -> u16 {
    bind.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{bind:?} names no port"))
}

#[test]
fn every_variable_the_relay_reads_is_set_or_documented() {
    let compose = compose();
    let reads = variables_the_relay_reads();
    let documented = documented_in_env_example();
    let mut set_by_compose = BTreeSet::new();
    for name in ["migrate", "relay"] {
        for (variable, _) in environment(service(&compose, name)) {
            assert!(
                reads.contains(&variable),
                "docker-compose.yml sets {variable} for {name}, which the relay does not read"
            );
            set_by_compose.insert(variable);
        }
    }
    let operations = read("docs/operations.md");
    for variable in &reads {
        assert!(
            set_by_compose.contains(variable) || documented.contains(variable),
            "{variable} is neither set in docker-compose.yml nor documented in .env.example"
        );
        assert!(
            operations.contains(&format!("`{variable}`")),
            "docs/operations.md does not describe {variable}"
        );
    }
    // Everything the compose file interpolates comes from .env, so .env.example names it.
    for variable in interpolated(&read("docker-compose.yml")) {
        assert!(
            documented.contains(&variable),
            "docker-compose.yml uses ${{{variable}}}, which .env.example does not document"
        );
    }
    // No secret is filled in.
    for line in read(".env.example").lines() {
        for secret in ["RELAY_JWT_SECRET=", "POSTGRES_PASSWORD="] {
            if let Some(value) = line.strip_prefix(secret) {
                assert!(
                    value.is_empty(),
                    ".env.example must not carry a secret: {line}"
                );
            }
        }
    }
}

#[test]
fn services_name_real_commands_and_wait_for_each_other() {
    let compose = compose();
    let cli = Cli::command();
    for name in ["migrate", "relay"] {
        let command = strings(&service(&compose, name)["command"]);
        let subcommand = command.first().expect("a command");
        assert!(
            cli.find_subcommand(subcommand).is_some(),
            "{name} runs `relay {subcommand}`, which is no subcommand"
        );
    }
    assert_eq!(
        strings(&service(&compose, "migrate")["command"]),
        ["migrate"]
    );
    assert_eq!(strings(&service(&compose, "relay")["command"]), ["serve"]);

    let postgres = service(&compose, "postgres");
    let image = postgres["image"].as_str().expect("postgres image");
    let tag = image.strip_prefix("postgres:").expect("the official image");
    assert!(
        tag.starts_with(|c: char| c.is_ascii_digit()) && tag.contains('.'),
        "the Postgres image is pinned to a version, not {tag:?}"
    );
    assert!(
        !postgres["healthcheck"]["test"].is_badvalue(),
        "Postgres has a healthcheck"
    );
    let volume = strings(&postgres["volumes"])
        .first()
        .and_then(|v| v.split_once(':').map(|(name, _)| name.to_string()))
        .expect("a volume");
    assert!(
        !compose["volumes"][volume.as_str()].is_badvalue(),
        "{volume} is a named volume"
    );

    let depends = |name: &str, on: &str| {
        service(&compose, name)["depends_on"][on]["condition"]
            .as_str()
            .map(String::from)
    };
    assert_eq!(
        depends("migrate", "postgres").as_deref(),
        Some("service_healthy")
    );
    assert_eq!(
        depends("relay", "migrate").as_deref(),
        Some("service_completed_successfully")
    );
    assert_eq!(
        depends("relay", "postgres").as_deref(),
        Some("service_healthy")
    );
}

#[test]
fn ports_and_health_checks_match_what_the_relay_serves() {
    let compose = compose();
    let relay = service(&compose, "relay");
    let environment = environment(relay);
    let bind = environment
        .iter()
        .find(|(k, _)| k == "RELAY_BIND")
        .map(|(_, v)| v.clone())
        .expect("the relay's RELAY_BIND");
    let port = port_of(&bind);
    assert!(
        bind.starts_with("0.0.0.0:"),
        "listens on every interface in its container"
    );

    // `--scale relay=2`: no fixed container name, and a host port that can be set to a range;
    // one port by default, so that a recreated container keeps it.
    assert!(
        relay["container_name"].is_badvalue(),
        "a container_name prevents --scale"
    );
    let ports = strings(&relay["ports"]);
    assert!(!ports.is_empty(), "the relay publishes its port");
    for mapping in &ports {
        let (host, container) = mapping.rsplit_once(':').expect("host:container");
        assert_eq!(container.parse::<u16>().ok(), Some(port), "{mapping}");
        assert_eq!(
            host,
            format!("${{RELAY_PORTS:-{port}}}"),
            "one host port by default, a range when RELAY_PORTS says so: {mapping}"
        );
    }
    // /metrics has its own port, and it is not published.
    let metrics = environment
        .iter()
        .find(|(k, _)| k == "RELAY_METRICS_BIND")
        .map(|(_, v)| port_of(v))
        .expect("the relay's RELAY_METRICS_BIND");
    assert_ne!(metrics, port);
    for mapping in &ports {
        assert!(
            !mapping.ends_with(&format!(":{metrics}")),
            "/metrics is published: {mapping}"
        );
    }
    let health = strings(&relay["healthcheck"]["test"]).join(" ");
    assert!(
        health.contains(&format!("http://127.0.0.1:{port}{HEALTH_PATH}")),
        "the relay's healthcheck {health:?} targets {HEALTH_PATH} on {port}"
    );

    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains(&format!("EXPOSE {port}")));
    assert!(dockerfile.contains(&format!("ENV RELAY_BIND=0.0.0.0:{port}")));
    // The image alone, published with `-p` or `-P`, keeps /metrics off the public port too.
    assert!(dockerfile.contains(&format!("ENV RELAY_METRICS_BIND=0.0.0.0:{metrics}")));
    for line in dockerfile
        .lines()
        .filter(|l| l.trim_start().starts_with("EXPOSE"))
    {
        assert!(
            !line
                .split_whitespace()
                .any(|p| p.split('/').next() == Some(metrics.to_string().as_str())),
            "the image exposes /metrics: {line}"
        );
    }
    assert!(dockerfile.contains(&format!("http://127.0.0.1:{port}{HEALTH_PATH}")));
}

/// The relay's container may open enough files for its default socket limit and its own
/// connections: the relay raises its soft limit to the hard one, and holds at most what that
/// leaves.
#[test]
fn the_relay_may_open_files_for_every_socket_it_allows() {
    let compose = compose();
    let nofile = &service(&compose, "relay")["ulimits"]["nofile"];
    let limit = |which: &str| {
        nofile[which]
            .as_i64()
            .unwrap_or_else(|| panic!("the relay's ulimits.nofile.{which}"))
    };
    assert_eq!(limit("soft"), limit("hard"));
    let defaults = relay::config::Tuning::defaults();
    let needed = defaults.relay_max_sockets as usize
        + relay::serve::reserved_files(defaults.relay_pool_size as usize);
    assert!(
        limit("hard") as usize >= needed,
        "nofile {} < {needed}",
        limit("hard")
    );
}

#[test]
fn the_image_is_multi_stage_non_root_and_carries_the_sql() {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    let stages: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    let runtime_start = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let (build, runtime) = lines.split_at(runtime_start);

    // The build stage has the whole workspace: every member and the tests the manifests name.
    let manifest = read("Cargo.toml");
    let members = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members");
    let mut needed: Vec<String> = members
        .split('"')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    needed.extend(["sql", "triggers", "inspector", "tests"].map(String::from));
    for dir in &needed {
        assert!(
            build
                .iter()
                .any(|l| l.starts_with("COPY ") && l.split_whitespace().nth(1) == Some(dir)),
            "the build stage does not copy {dir}/"
        );
    }
    // The Rust image is at least the workspace's rust-version.
    let rust_version = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = \""))
        .map(|v| v.trim_end_matches('"').to_string())
        .expect("rust-version");
    let image = stages[0].split_whitespace().nth(1).unwrap();
    let tag = image
        .strip_prefix("rust:")
        .expect("the official Rust image");
    let version = |v: &str| -> Vec<u32> {
        v.split(|c: char| !c.is_ascii_digit())
            .take(2)
            .map(|n| n.parse().unwrap())
            .collect()
    };
    assert!(
        version(tag) >= version(&rust_version),
        "{tag} < {rust_version}"
    );

    let user = runtime
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert!(
        user != "root" && user != "0",
        "runs as non-root, not {user}"
    );
    for dir in ["sql", "triggers"] {
        assert!(
            runtime
                .iter()
                .any(|l| l.starts_with(&format!("COPY {dir} "))),
            "the runtime image carries {dir}/"
        );
    }
    assert!(runtime
        .iter()
        .any(|l| l.starts_with("ENTRYPOINT [\"relay\"]")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_check_path_is_served() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let (status, body) = common::http_get(relay.local_addr(), HEALTH_PATH, None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("healthy")));
}
