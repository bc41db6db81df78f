//! Measures commit-to-client latency on this machine: starts a relay in-process against a fresh
//! database, connects one dentist's WebSocket, performs N single-row inserts one after another,
//! and reports how long each took from issuing the INSERT (an autocommit transaction) to the event
//! frame arriving. A quick check, not the benchmark.
//!
//!     cargo run --release -p relay --example latency -- [N]
//!
//! Needs Postgres at 127.0.0.1:5432 (user postgres, trust), or `TEST_DATABASE_URL`.

use std::time::Instant;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

mod support;

#[tokio::main]
async fn main() -> Result<(), support::Error> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let setup = support::Setup::new("relay_latency").await?;
    let (db, dentist, patient) = (&setup.db, setup.dentist, setup.patient);
    let url = setup.dentist_url();
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
    setup.finish().await?;
    Ok(())
}
