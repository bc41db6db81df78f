//! Measures replay: how long a client that resumes from a cursor takes to receive N events it
//! missed. Starts a relay in-process against a fresh database, takes a dentist's cursor, commits N
//! appointments for that dentist (in transactions of 1,000) while the dentist is away, then resumes
//! and times from sending `subscribe` with `since` to receiving the `live` marker after the N
//! replayed events. Repeats a few times and prints each run.
//!
//!     cargo run --release -p relay --example replay -- [N] [runs]
//!
//! Needs Postgres at 127.0.0.1:5432 (user postgres, trust), or `TEST_DATABASE_URL`.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_postgres::NoTls;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use relay::authz::{Principal, Role};
use relay::token::{Keys, Secret};
use relay::{Config, Relay};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let base = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let name = format!("relay_replay_{}", Uuid::new_v4().simple());
    let (admin, conn) = tokio_postgres::connect(&format!("{base}/postgres"), NoTls).await?;
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("create database {name}"))
        .await?;
    let url = format!("{base}/{name}");
    let (mut db, conn) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(conn);
    relay::migrate::migrate(&mut db).await?;

    let secret = Secret::new("replay-example-secret-0123456789abcdef")?;
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
    let ws_url = format!("ws://{}/ws?access_token={token}", relay.local_addr());

    println!("replaying {n} missed events to one dentist socket");
    for run in 1..=runs {
        // Where the dentist left off.
        let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await?;
        ws.send(Message::text(
            r#"{"type":"subscribe","feed":"appointments"}"#,
        ))
        .await?;
        let cursor = match ws.next().await {
            Some(Ok(Message::Text(text))) => serde_json::from_str::<Value>(&text)?["cursor"]
                .as_str()
                .unwrap_or("0")
                .to_string(),
            other => return Err(format!("expected subscribed, got {other:?}").into()),
        };
        drop(ws);

        for _ in 0..n.div_ceil(1000) {
            db.execute(
                "insert into appointments (patient_id, dentist_id, starts_at, ends_at)
                 select $1, $2, now(), now() + interval '1 hour' from generate_series(1, 1000)",
                &[&patient, &dentist],
            )
            .await?;
        }

        let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await?;
        let start = Instant::now();
        ws.send(Message::text(format!(
            r#"{{"type":"subscribe","feed":"appointments","since":"{cursor}"}}"#
        )))
        .await?;
        let mut events = 0usize;
        let mut first = None;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text)?;
                    match frame["type"].as_str() {
                        Some("event") => {
                            events += 1;
                            first.get_or_insert_with(|| start.elapsed());
                        }
                        Some("live") => break,
                        _ => {}
                    }
                }
                other => return Err(format!("unexpected {other:?}").into()),
            }
        }
        let total = start.elapsed();
        println!(
            "run {run}: {events} events, first after {:.1} ms, all after {:.1} ms ({:.0} events/s)",
            first.unwrap_or_default().as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            events as f64 / total.as_secs_f64()
        );
    }
    relay.shutdown().await;
    drop(db);
    admin
        .batch_execute(&format!("drop database {name} with (force)"))
        .await?;
    Ok(())
}
