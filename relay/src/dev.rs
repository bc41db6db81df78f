//! `relay dev`: everything a newcomer needs in one command. Creates the development database if
//! missing, migrates it, adds demo users and appointments (idempotently: fixed ids), prints a
//! token and a ready-to-paste connection line for each role, and serves.

use std::time::Duration;

use uuid::{uuid, Uuid};

use crate::authz::{Principal, Role};
use crate::token::Issuer;

/// The demo users, with fixed ids so tokens and SQL lines stay valid across runs.
pub const DEMO_USERS: [(Uuid, Role, &str); 6] = [
    (
        uuid!("00000000-0000-4000-8000-00000000a001"),
        Role::Admin,
        "Ada Admin",
    ),
    (
        uuid!("00000000-0000-4000-8000-00000000d001"),
        Role::Dentist,
        "Dr. Dana Molar",
    ),
    (
        uuid!("00000000-0000-4000-8000-00000000d002"),
        Role::Dentist,
        "Dr. Dev Canine",
    ),
    (
        uuid!("00000000-0000-4000-8000-00000000b001"),
        Role::Patient,
        "Pat Patient",
    ),
    (
        uuid!("00000000-0000-4000-8000-00000000b002"),
        Role::Patient,
        "Paz Person",
    ),
    (
        uuid!("00000000-0000-4000-8000-00000000c001"),
        Role::Chatbot,
        "Booking bot",
    ),
];

/// The demo consultation, waiting, of Pat Patient with Dr. Dana Molar.
pub const DEMO_SESSION: Uuid = uuid!("00000000-0000-4000-8000-0000000c5001");

/// The appointment the banner's SQL books and moves: taken out at each start, so the lines work
/// again.
const DEMO_BOOKING: Uuid = uuid!("00000000-0000-4000-8000-0000000e00aa");

/// How long the printed tokens are valid.
pub const DEMO_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("cannot reach Postgres ({target}): {} (is it running? see the README)", crate::Causes(.source))]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("{source}; this development database predates the change: drop it ({drop}) and run relay dev again")]
    Outdated {
        source: crate::migrate::MigrateError,
        drop: String,
    },
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
}

async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, DevError> {
    crate::connect(config)
        .await
        .map_err(|source| DevError::Connect {
            target: psql_command(config),
            source,
        })
}

/// Creates the database named in `config` if it does not exist (connecting to `postgres` to do
/// so), then migrates it and adds the demo data.
pub async fn prepare(config: &tokio_postgres::Config) -> Result<(), DevError> {
    let name = config.get_dbname().unwrap_or("relay_dev").to_string();
    let mut maintenance = config.clone();
    maintenance.dbname("postgres");
    let admin = connect(&maintenance).await?;
    let exists = admin
        .query_opt("select 1 from pg_database where datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        admin
            .batch_execute(&format!("create database {quoted}"))
            .await?;
        println!("created database {name}");
    }
    let mut client = connect(config).await?;
    let applied = crate::migrate::migrate(&mut client)
        .await
        .map_err(|source| match source {
            crate::migrate::MigrateError::Changed { .. } => DevError::Outdated {
                source,
                drop: format!(
                    "{} -c 'drop database \"{name}\" with (force)'",
                    psql_command(&maintenance)
                ),
            },
            other => DevError::Migrate(other),
        })?;
    if !applied.is_empty() {
        println!("applied {}", applied.join(", "));
    }
    seed(&client).await
}

async fn seed(client: &tokio_postgres::Client) -> Result<(), DevError> {
    for (id, role, name) in DEMO_USERS {
        client
            .execute(
                "insert into profiles (id, role, full_name) values ($1, $2, $3) on conflict (id) do nothing",
                &[&id, &role.as_str(), &name],
            )
            .await?;
    }
    client
        .execute("delete from appointments where id = $1", &[&DEMO_BOOKING])
        .await?;
    client
        .execute(
            "insert into consultation_sessions (id, patient_id, dentist_id) values ($1, $2, $3) \
             on conflict (id) do update set patient_id = excluded.patient_id, \
                 dentist_id = excluded.dentist_id, status = 'waiting', started_at = null, \
                 ended_at = null",
            &[&DEMO_SESSION, &DEMO_USERS[3].0, &DEMO_USERS[1].0],
        )
        .await?;
    client
        .batch_execute(
            "insert into appointments (id, patient_id, dentist_id, starts_at, ends_at, kind, notes)
             select * from (values
               ('00000000-0000-4000-8000-0000000e0001'::uuid, '00000000-0000-4000-8000-00000000b001'::uuid,
                '00000000-0000-4000-8000-00000000d001'::uuid, date_trunc('day', now()) + interval '1 day 9 hours',
                date_trunc('day', now()) + interval '1 day 10 hours', 'in_person', 'Check-up'),
               ('00000000-0000-4000-8000-0000000e0002'::uuid, '00000000-0000-4000-8000-00000000b002'::uuid,
                '00000000-0000-4000-8000-00000000d002'::uuid, date_trunc('day', now()) + interval '1 day 11 hours',
                date_trunc('day', now()) + interval '1 day 12 hours', 'video', 'Follow-up on a filling')
             ) as demo (id, patient_id, dentist_id, starts_at, ends_at, kind, notes)
             on conflict (id) do nothing;
             insert into availability (id, dentist_id, starts_at, ends_at)
             select * from (values
               ('00000000-0000-4000-8000-0000000f0001'::uuid, '00000000-0000-4000-8000-00000000d001'::uuid,
                date_trunc('day', now()) + interval '2 days 9 hours', date_trunc('day', now()) + interval '2 days 12 hours'),
               ('00000000-0000-4000-8000-0000000f0002'::uuid, '00000000-0000-4000-8000-00000000d002'::uuid,
                date_trunc('day', now()) + interval '2 days 13 hours', date_trunc('day', now()) + interval '2 days 17 hours')
             ) as demo (id, dentist_id, starts_at, ends_at)
             on conflict (id) do nothing;",
        )
        .await?;
    Ok(())
}

/// A `psql` command line for the database (never including a password).
pub fn psql_command(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "127.0.0.1".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let database = config.get_dbname().unwrap_or("relay_dev");
    format!("psql -h {host} -p {port} -U {user} {database}")
}

/// A token for every demo user, for the inspector's picker, valid [`DEMO_TOKEN_TTL`] from now.
pub fn demo_tokens(issuer: &Issuer) -> Vec<crate::config::DemoToken> {
    DEMO_USERS
        .iter()
        .map(|(id, role, name)| crate::config::DemoToken {
            name: name.to_string(),
            role: *role,
            user_id: *id,
            token: issuer.issue(
                &Principal {
                    user_id: *id,
                    role: *role,
                },
                DEMO_TOKEN_TTL,
            ),
        })
        .collect()
}

/// The text `relay dev` prints: a token and connection line per demo user, and SQL to try.
/// `token_command` is how to make more tokens with the secret it signs with.
pub fn banner(
    issuer: &Issuer,
    addr: std::net::SocketAddr,
    psql: &str,
    token_command: &str,
) -> String {
    let mut out = format!("\nrelay dev: serving on http://{addr}\n");
    let (id, role, name) = DEMO_USERS[1];
    let token = issuer.issue(&Principal { user_id: id, role }, DEMO_TOKEN_TTL);
    out.push_str(&format!(
        "\nInspector (watch the feeds live in a browser), as {role} {name}; pick another demo user \
         on the page:\n  http://{addr}/#token={token}\n"
    ));
    out.push_str("\nConnect as any demo user (tokens valid 24 h), then send\n");
    out.push_str("  {\"type\":\"subscribe\",\"ref\":\"1\",\"feed\":\"appointments\"}\n");
    for (id, role, name) in DEMO_USERS {
        let token = issuer.issue(&Principal { user_id: id, role }, DEMO_TOKEN_TTL);
        out.push_str(&format!(
            "\n# {role:<8} {name} ({id})\nnpx -y wscat -c 'ws://{addr}/ws?access_token={token}'\n"
        ));
    }
    out.push_str(&format!(
        "\nThen change a row, e.g. book for Dr. Dana Molar and move it to Dr. Dev Canine:\n\
         {psql} -c \"insert into appointments (id, patient_id, dentist_id, starts_at, ends_at) \
         values ('00000000-0000-4000-8000-0000000e00aa', '00000000-0000-4000-8000-00000000b001', \
         '00000000-0000-4000-8000-00000000d001', now() + interval '1 day', now() + interval '1 day 1 hour')\"\n\
         {psql} -c \"update appointments set dentist_id = '00000000-0000-4000-8000-00000000d002' \
         where id = '00000000-0000-4000-8000-0000000e00aa'\"\n"
    ));
    out.push_str(&format!(
        "\nChat in the demo consultation ({DEMO_SESSION}), as Pat Patient or Dr. Dana Molar: \
         subscribe, then send (a new client_id for each message)\n  \
         {{\"type\":\"subscribe\",\"ref\":\"2\",\"feed\":\"consultation_messages\",\
         \"filter\":{{\"session_id\":\"{DEMO_SESSION}\"}}}}\n  \
         {{\"type\":\"send\",\"ref\":\"3\",\"session_id\":\"{DEMO_SESSION}\",\
         \"body\":\"Hello, doctor\",\"client_id\":\"{}\"}}\n",
        Uuid::new_v4()
    ));
    out.push_str(&format!(
        "\nA token for any user (a new uuid is a new user):\n  \
         {token_command} relay token --role patient --sub {}\n",
        Uuid::new_v4()
    ));
    out
}
