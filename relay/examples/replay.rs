//! Measures replay: how long a client that resumes from a cursor takes to receive N events it
//! missed. Starts a relay in-process against a fresh database, takes a dentist's cursor, commits N
//! appointments for that dentist (in transactions of 1,000) while the dentist is away, then resumes
//! and times from sending `subscribe` with `since` to receiving the `live` marker after the N
//! replayed events. Repeats a few times and prints each run.
//!
//!     cargo run --release -p relay --example replay -- [N] [runs]
//!
//! Needs Postgres at 127.0.0.1:5432 (user postgres, trust), or `TEST_DATABASE_URL`.

use std::time::Instant;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

mod support;

#[tokio::main]
async fn main() -> Result<(), support::Error> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let setup = support::Setup::new("relay_replay").await?;
    let (db, dentist, patient) = (&setup.db, setup.dentist, setup.patient);
    let ws_url = setup.dentist_url();

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
    setup.finish().await?;
    Ok(())
}
