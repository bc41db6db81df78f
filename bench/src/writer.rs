//! The writers: several connections committing changes, one row per transaction (in the fan-out
//! workload, `--rows-per-commit` rows), at a target rate or as fast as Postgres accepts them.
//!
//! The role mix changes all four tables: appointments booked, confirmed or cancelled, moved to
//! another dentist, deleted; availability added; messages sent in sessions; session notes
//! updated. The fan-out workload only books appointments, each for one connected user.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use crate::cast::{Cast, Mode};
use crate::Error;

/// How fast the writers go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Events per second, across all writers.
    PerSecond(f64),
    /// As fast as Postgres commits.
    Max,
}

/// What the writers did in one phase.
#[derive(Debug, Clone, Default)]
pub struct Written {
    pub commits: u64,
    pub seconds: f64,
    /// Each commit's transaction id and when its writer saw it acknowledged (microseconds since
    /// the epoch).
    pub acknowledged: Vec<(u64, i64)>,
}

/// A small deterministic generator; writers need speed, not quality.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

#[derive(Clone)]
struct Statements {
    book: Statement,
    /// Books several appointments in one statement (the fan-out workload's `--rows-per-commit`).
    book_many: Statement,
    set_status: Statement,
    reassign: Statement,
    delete: Statement,
    add_slot: Statement,
    send: Statement,
    note: Statement,
}

/// One writer connection and the appointments it booked (so it changes rows without asking).
pub struct Writer {
    client: Client,
    statements: Statements,
    cast: Arc<Cast>,
    rng: Rng,
    /// Appointments this writer booked and has not deleted: id, dentist, status (none: the
    /// table's default).
    booked: Vec<(Uuid, Uuid, Option<&'static str>)>,
    acknowledged: Vec<(u64, i64)>,
}

fn pick(rng: &mut Rng, ids: &[Uuid]) -> Uuid {
    ids[rng.below(ids.len())]
}

const STATUSES: [&str; 3] = ["confirmed", "cancelled", "completed"];

impl Writer {
    async fn connect(url: &str, cast: Arc<Cast>, seed: u64) -> Result<Writer, Error> {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(connection);
        let statements = Statements {
            book: client
                .prepare(
                    "insert into appointments (id, patient_id, dentist_id, starts_at, ends_at)
                     values ($1, $2, $3, now() + interval '1 day', now() + interval '1 day 1 hour')
                     returning pg_current_xact_id()::text",
                )
                .await?,
            book_many: client
                .prepare(
                    "insert into appointments (id, patient_id, dentist_id, starts_at, ends_at)
                     select id, patient, dentist, now() + interval '1 day', now() + interval '1 day 1 hour'
                     from unnest($1::uuid[], $2::uuid[], $3::uuid[]) as t(id, patient, dentist)
                     returning pg_current_xact_id()::text",
                )
                .await?,
            set_status: client
                .prepare("update appointments set status = $2 where id = $1 returning pg_current_xact_id()::text")
                .await?,
            reassign: client
                .prepare("update appointments set dentist_id = $2 where id = $1 returning pg_current_xact_id()::text")
                .await?,
            delete: client
                .prepare("delete from appointments where id = $1 returning pg_current_xact_id()::text")
                .await?,
            add_slot: client
                .prepare(
                    "insert into availability (dentist_id, starts_at, ends_at)
                     values ($1, now() + interval '2 days', now() + interval '2 days 30 minutes')
                     returning pg_current_xact_id()::text",
                )
                .await?,
            send: client
                .prepare(
                    "insert into consultation_messages (session_id, sender_id, body)
                     values ($1, $2, 'How is the tooth today?')
                     returning pg_current_xact_id()::text",
                )
                .await?,
            note: client
                .prepare("update consultation_sessions set notes = $2 where id = $1 returning pg_current_xact_id()::text")
                .await?,
        };
        Ok(Writer {
            client,
            statements,
            cast,
            rng: Rng(seed | 1),
            booked: Vec::new(),
            acknowledged: Vec::new(),
        })
    }

    fn pick(&mut self, ids: &[Uuid]) -> Uuid {
        pick(&mut self.rng, ids)
    }

    /// Runs one single-statement transaction, and notes its transaction id (which the statement
    /// returns) with the time its commit was acknowledged.
    async fn commit(
        &mut self,
        statement: &Statement,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<(), Error> {
        let rows = self.client.query(statement, params).await?;
        let acknowledged = crate::system::now_micros();
        if let Some(xid) = rows
            .first()
            .and_then(|row| row.get::<_, String>(0).parse().ok())
        {
            self.acknowledged.push((xid, acknowledged));
        }
        Ok(())
    }

    async fn book(&mut self) -> Result<(), Error> {
        let cast = self.cast.clone();
        let (id, patient, dentist) = (
            Uuid::new_v4(),
            self.pick(&cast.patients),
            self.pick(&cast.dentists),
        );
        let book = self.statements.book.clone();
        self.commit(&book, &[&id, &patient, &dentist]).await?;
        self.booked.push((id, dentist, None));
        Ok(())
    }

    /// Books `rows` appointments in one transaction, each for a user picked at random.
    async fn book_many(&mut self, rows: usize) -> Result<(), Error> {
        let cast = self.cast.clone();
        let ids: Vec<Uuid> = (0..rows).map(|_| Uuid::new_v4()).collect();
        let patients: Vec<Uuid> = (0..rows).map(|_| self.pick(&cast.patients)).collect();
        let dentists: Vec<Uuid> = (0..rows).map(|_| self.pick(&cast.dentists)).collect();
        let book_many = self.statements.book_many.clone();
        self.commit(&book_many, &[&ids, &patients, &dentists]).await
    }

    /// Commits one change (in the fan-out workload, `rows` appointments).
    async fn change(&mut self, rows: usize) -> Result<(), Error> {
        if self.cast.mode == Mode::Fanout && rows > 1 {
            return self.book_many(rows).await;
        }
        if self.cast.mode == Mode::Fanout || self.booked.is_empty() {
            return self.book().await;
        }
        let cast = self.cast.clone();
        let s = self.statements.clone();
        match self.rng.below(100) {
            0..=54 => return self.book().await,
            55..=69 => {
                // Always another status: a change that changes nothing commits without an event.
                let slot = self.rng.below(self.booked.len());
                let (id, _, current) = self.booked[slot];
                let others: Vec<&'static str> = STATUSES
                    .into_iter()
                    .filter(|s| Some(*s) != current)
                    .collect();
                let status = others[self.rng.below(others.len())];
                self.commit(&s.set_status, &[&id, &status]).await?;
                self.booked[slot].2 = Some(status);
            }
            70..=79 => {
                // Always another dentist, for the same reason.
                let slot = self.rng.below(self.booked.len());
                let (id, current, _) = self.booked[slot];
                let mut dentist = pick(&mut self.rng, &cast.dentists);
                while dentist == current && cast.dentists.len() > 1 {
                    dentist = pick(&mut self.rng, &cast.dentists);
                }
                self.commit(&s.reassign, &[&id, &dentist]).await?;
                self.booked[slot].1 = dentist;
            }
            80..=84 => {
                let slot = self.rng.below(self.booked.len());
                let (id, _, _) = self.booked.swap_remove(slot);
                self.commit(&s.delete, &[&id]).await?;
            }
            85..=89 => {
                let dentist = pick(&mut self.rng, &cast.dentists);
                self.commit(&s.add_slot, &[&dentist]).await?;
            }
            90..=94 => {
                let session = cast.sessions[self.rng.below(cast.sessions.len())];
                let sender = if self.rng.below(2) == 0 {
                    session.patient
                } else {
                    session.dentist
                };
                self.commit(&s.send, &[&session.id, &sender]).await?;
            }
            _ => {
                let session = cast.sessions[self.rng.below(cast.sessions.len())];
                let note = format!("note {}", self.rng.below(1_000_000));
                self.commit(&s.note, &[&session.id, &note]).await?;
            }
        }
        Ok(())
    }
}

/// Connects `count` writers.
pub async fn connect(url: &str, cast: &Arc<Cast>, count: usize) -> Result<Vec<Writer>, Error> {
    let mut writers = Vec::new();
    for i in 0..count {
        writers.push(Writer::connect(url, cast.clone(), 0x9e37_79b9 * (i as u64 + 1)).await?);
    }
    Ok(writers)
}

/// Runs the writers for `duration` at `rate` (in events: each commit is `rows` of them); returns
/// them for the next phase, with what they did.
pub async fn write(
    writers: Vec<Writer>,
    rate: Rate,
    rows: usize,
    duration: Duration,
) -> Result<(Vec<Writer>, Written), Error> {
    let count = writers.len();
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let tasks: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(i, mut writer)| {
            tokio::spawn(async move {
                let interval = match rate {
                    Rate::PerSecond(r) => Some(Duration::from_secs_f64((count * rows) as f64 / r)),
                    Rate::Max => None,
                };
                // Writers start spread over one interval, so their commits interleave.
                let mut next = tokio::time::Instant::now()
                    + interval.map_or(Duration::ZERO, |d| d.mul_f64(i as f64 / count as f64));
                let mut commits = 0u64;
                while tokio::time::Instant::now() < deadline {
                    if let Some(interval) = interval {
                        tokio::time::sleep_until(next).await;
                        next += interval;
                    }
                    writer.change(rows).await?;
                    commits += 1;
                }
                Ok::<_, Error>((writer, commits))
            })
        })
        .collect();
    let mut writers = Vec::new();
    let mut commits = 0;
    let mut acknowledged = Vec::new();
    for task in tasks {
        let (mut writer, n) = task.await??;
        acknowledged.append(&mut writer.acknowledged);
        writers.push(writer);
        commits += n;
    }
    Ok((
        writers,
        Written {
            commits,
            seconds: start.elapsed().as_secs_f64(),
            acknowledged,
        },
    ))
}
