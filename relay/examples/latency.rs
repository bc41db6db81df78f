//! Measures commit-to-client latency on this machine: starts a relay in-process against a fresh
//! database, connects one dentist's WebSocket, performs N single-row inserts one after another,
//! and reports how long each took from issuing the INSERT (an autocommit transaction) to the event
//! frame arriving. A quick check, not the benchmark.
//!
//!     cargo run --release -p relay --example latency -- [N]
//!
//! Needs Postgres at 127.0.0.1:5432 (user postgres, trust), or `TEST_DATABASE_URL`.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_postgres::NoTls;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use relay::authz::{Principal, Role};
use relay::token::{Keys, Secret};
use relay::{Config, Relay};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let base = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let name = format!("relay_latency_{}", Uuid::new_v4().simple());
    let (admin, conn) = tokio_postgres::connect(&format!("{base}/postgres"), NoTls).await?;
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("create database {name}"))
        .await?;
    let url = format!("{base}/{name}");
    let (mut db, conn) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(conn);
    relay::migrate::migrate(&mut db).await?;

    let secret = Secret::new("latency-example-secret-0123456789abcdef")?;
    let mut config = Config::new(url.parse()?, secret.clone());
    config.bind = "127.0.0.1:0".parse()?;
    let relay = Relay::start(config).await?;
    relay.health().wait_for(true).await;

    let (dentist, patient) = (Uuid::new_v4(), Uuid::new_v4());
    db.execute(
        "insert into profiles (id, role) values ($1, 'dentist'), ($2, 'patient')",
        &[&dentist, &patient],
    )
    .await?;
    let token = Keys::new(&secret).issue(
        &Principal {
            user_id: dentist,
            role: Role::Dentist,
        },
        Duration::from_secs(3600),
    );
    let url = format!("ws://{}/ws?access_token={token}", relay.local_addr());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    ws.send(Message::text(
        r#"{"type":"subscribe","feed":"appointments"}"#,
    ))
    .await?;
    ws.next().await; // subscribed

    let insert = db
        .prepare(
            "insert into appointments (patient_id, dentist_id, starts_at, ends_at)
             values ($1, $2, now(), now() + interval '1 hour')",
        )
        .await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        db.execute(&insert, &[&patient, &dentist]).await?;
        match ws.next().await {
            Some(Ok(Message::Text(_))) => samples.push(start.elapsed()),
            other => return Err(format!("expected an event, got {other:?}").into()),
        }
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{n} inserts, insert issued -> event received: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        at(0.5),
        at(0.9),
        at(0.99),
        samples[samples.len() - 1]
    );
    relay.shutdown().await;
    drop(db);
    admin
        .batch_execute(&format!("drop database {name} with (force)"))
        .await?;
    Ok(())
}
