//! The event log (`relay.events`) as the relay reads it: ranges of events for catch-up (including
//! events too large for NOTIFY) and replay, the retention horizon, and pruning.
//!
//! Event ids follow commit order (`triggers/003_commit_order.sql`): when an event is visible,
//! every event with a smaller id is visible too or never will be. So "the events after cursor N"
//! is one ordered range read, exact on any connection and any relay instance, and a range read
//! never races a transaction that commits late.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_postgres::{GenericClient, Row};

use crate::authz::Feed;
use crate::db;
use crate::event::{DecodeError, Event, RawEvent};
use crate::protocol::{Cursor, CursorKey, Mark, Tag};

/// An event's `at` as its frames carry it (RFC 3339 in UTC, microseconds), in SQL over `e`.
pub const AT_TEXT: &str = "to_char(e.at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";

/// The one row of `relay.log_horizon`, as queries join it. A table of one row that was never
/// analyzed (`relay.cursor_key` never is, and the horizon only once enough prunes have updated
/// it) is estimated by its size at over a thousand rows, and the estimate multiplies the cost of
/// everything joined to it: a page of the log was costed past `jit_above_cost`, and every page
/// read paid about 30 ms of JIT compilation.
pub const HORIZON: &str = "(select * from relay.log_horizon limit 1)";

/// The one row of `relay.cursor_key`, as queries join it (see [`HORIZON`]).
const CURSOR_KEY: &str = "(select * from relay.cursor_key limit 1)";

/// The columns of an event, in the NOTIFY payload's field order. `at` comes as the timestamp and
/// is written out here ([`at_text_of`]): `to_char` cost the server about a microsecond per event,
/// a tenth of a page's time. Outside the years 1 to 9999, where the two would write it
/// differently (or the timestamp could not be read here), Postgres writes it, in a tenth column.
const EVENT_COLUMNS: &str = concat!(
    "e.id, e.table_name, e.op, e.new_row, e.old_row, e.new_session, e.old_session, e.xid::text, ",
    "e.at, case when e.at < '0001-01-01 00:00:00+00' or e.at >= '10000-01-01 00:00:00+00' ",
    "then to_char(e.at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') end"
);

/// An event's `at` as [`AT_TEXT`] writes it in SQL and the capture in its notifications: RFC 3339
/// in UTC with six digits of microseconds. The same text for the years 1 to 9999 only.
pub fn at_text_of(at: time::OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

/// How much of the log one page may hold, counted as Postgres stores the rows' values
/// (compressed where they are large): a page ends at its count or at this, whichever comes first,
/// and always holds at least one event. Ordinary events are a few hundred bytes, so only runs of
/// large rows (long notes, long messages) end a page early; without the bound, a page of
/// thousands of them would be hundreds of megabytes in the relay's memory, and slow enough to
/// read to outlast the query timeout.
pub const PAGE_BYTES: i64 = 8 << 20;

/// A page as read, its events not yet decoded: where it ends is known from the ids alone, so the
/// next page can be asked for while this one is decoded.
#[derive(Debug)]
pub struct RawPage {
    /// Events below this were deleted by retention.
    pub horizon: Cursor,
    rows: Vec<Row>,
    /// The id of the page's last event, if it has any.
    pub last: Option<Cursor>,
    /// The page ended at its count or its size: the range may hold more events after the last.
    pub more: bool,
}

impl RawPage {
    /// As [`Page::is_complete_after`].
    pub fn is_complete_after(&self, after: Cursor) -> bool {
        self.horizon <= after
    }

    /// Decodes the page's events; one that cannot be decoded is an error in its place.
    pub fn decode(self) -> Page {
        let events = self
            .rows
            .iter()
            .filter_map(|row| {
                let id = row.try_get::<_, Option<i64>>(2).ok().flatten()?;
                Some((Cursor(id), decode(row, 2)))
            })
            .collect();
        Page {
            horizon: self.horizon,
            events,
            more: self.more,
        }
    }
}

/// Events of one range, read in one statement together with the horizon, so that a prune that
/// commits meanwhile is either wholly visible (and detected) or not at all.
#[derive(Debug)]
pub struct Page {
    /// Events below this were deleted by retention.
    pub horizon: Cursor,
    /// The events, by id; an event that cannot be decoded is an error in its place.
    pub events: Vec<(Cursor, Result<Event, DecodeError>)>,
    /// The page ended at its count or its size: the range may hold more events after the last.
    pub more: bool,
}

impl Page {
    /// Whether the range `after..` is complete: nothing in it was deleted by retention.
    pub fn is_complete_after(&self, after: Cursor) -> bool {
        self.horizon <= after
    }
}

/// What bounds a resumable cursor.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// The highest id deleted by retention: a cursor below it has lost events.
    pub horizon: Cursor,
    /// The highest id the sequence has handed out: a cursor above it is not from this database.
    pub issued: Cursor,
    /// The tag of the event the log holds at the cursor's id, if any; at the horizon, of the
    /// event retention deleted there, if known.
    pub logged: Option<Tag>,
}

impl Bounds {
    /// Whether the events after `cursor` can be replayed: retention kept them, the log has come
    /// as far, and a cursor that names an event still finds that event at its id, or, at the
    /// horizon, finds that retention deleted that very event there: not another, after the log
    /// went back and new events took the id again.
    pub fn admits(&self, cursor: Mark) -> bool {
        let position = cursor.position;
        let same_event = cursor.tag.is_none_or(|tag| self.logged == Some(tag));
        self.horizon <= position && position <= self.issued && same_event
    }
}

/// Reads up to `limit` events with `after < id <= upto`, of one feed or of all, in id order, and
/// no more than [`PAGE_BYTES`] of them past the first.
pub async fn read_range(
    client: &impl GenericClient,
    after: Cursor,
    upto: Cursor,
    feed: Option<Feed>,
    limit: i64,
) -> Result<Page, tokio_postgres::Error> {
    Ok(read_range_raw(client, after, upto, feed, limit)
        .await?
        .decode())
}

/// [`read_range`], leaving the events to be decoded.
pub async fn read_range_raw(
    client: &impl GenericClient,
    after: Cursor,
    upto: Cursor,
    feed: Option<Feed>,
    limit: i64,
) -> Result<RawPage, tokio_postgres::Error> {
    let table = feed.map(Feed::as_str);
    let rows = client
        .query(
            &range_sql(),
            &[&after.0, &upto.0, &table, &limit, &PAGE_BYTES],
        )
        .await?;
    let (horizon, fetched) = match rows.first() {
        Some(row) => (
            Cursor(row.try_get(0)?),
            row.try_get::<_, Option<i64>>(1)?.unwrap_or(0),
        ),
        None => (Cursor::default(), 0),
    };
    let mut count = 0;
    let mut last = None;
    for row in &rows {
        if let Some(id) = row.try_get::<_, Option<i64>>(2)? {
            count += 1;
            last = Some(Cursor(id));
        }
    }
    let more = fetched == limit || count < fetched;
    Ok(RawPage {
        horizon,
        rows,
        last,
        more,
    })
}

/// The statement [`read_range`] runs: `$1` after, `$2` up to, `$3` the feed's table or null,
/// `$4` the count, `$5` the size bound.
pub fn range_sql() -> String {
    // The innermost query takes the page by count. The sizes are summed over those rows only,
    // from the values' stored headers (pg_column_size reads no large value), and rows that start
    // past the budget are left out before anything reads their values. `fetched` is how many the
    // count took, to tell a page cut short by size.
    format!(
        "select h.pruned_through, e.fetched, {EVENT_COLUMNS} \
         from {HORIZON} h \
         left join lateral ( \
             select s.* from ( \
                 select c.*, sum(c.size) over (order by c.id) - c.size as before, \
                        count(*) over () as fetched \
                 from ( \
                     select e.*, coalesce(pg_column_size(e.new_row), 0) \
                         + coalesce(pg_column_size(e.old_row), 0) as size \
                     from relay.events e \
                     where id > $1 and id <= $2 and ($3::text is null or table_name = $3) \
                     order by id limit $4) c) s \
             where s.before < $5) e on true \
         order by e.id"
    )
}

/// The log's newest committed event (0 if none): the position a relay starts live from.
pub async fn position(client: &impl GenericClient) -> Result<Cursor, tokio_postgres::Error> {
    let row = client
        .query_one(
            "select greatest(coalesce(max(id), 0), (select pruned_through from relay.log_horizon)) \
             from relay.events",
            &[],
        )
        .await?;
    Ok(Cursor(row.try_get(0)?))
}

/// The log's position (as [`position`]) as clients are told it: tagged as the event there, the
/// newest one or, when retention deleted it, the one whose time retention kept; an id alone
/// otherwise (nothing was ever logged, or pruned before that time was kept); and the key the tag
/// was made with.
pub async fn mark(client: &impl GenericClient) -> Result<(Mark, CursorKey), tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "select e.id, e.at, h.pruned_through, h.pruned_through_at, k.key \
                 from {HORIZON} h cross join {CURSOR_KEY} k \
                 left join lateral (select e.id, {AT_TEXT} as at from relay.events e \
                                    order by e.id desc limit 1) e on true"
            ),
            &[],
        )
        .await?;
    let key = cursor_key(row.try_get(4)?);
    let horizon: i64 = row.try_get(2)?;
    let mark = match row.try_get::<_, Option<i64>>(0)? {
        Some(newest) if newest >= horizon => key.mark(newest, &row.try_get::<_, String>(1)?),
        _ => match row.try_get::<_, Option<String>>(3)? {
            Some(at) => key.mark(horizon, &at),
            None => Mark::from(Cursor(horizon)),
        },
    };
    Ok((mark, key))
}

/// The bounds of a resume from `cursor`, read in one statement; the tag of the event at its id is
/// made with the database's key of cursors' tags.
pub async fn bounds(
    client: &impl GenericClient,
    cursor: Mark,
) -> Result<Bounds, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "select h.pruned_through, \
                        case when s.is_called then s.last_value else 0 end, \
                        case when $1 = h.pruned_through then h.pruned_through_at \
                             else (select {AT_TEXT} from relay.events e where e.id = $1) end, \
                        k.key \
                 from {HORIZON} h, relay.events_id_seq s, {CURSOR_KEY} k"
            ),
            &[&cursor.position.0],
        )
        .await?;
    let key = cursor_key(row.try_get(3)?);
    Ok(Bounds {
        horizon: Cursor(row.try_get(0)?),
        issued: Cursor(row.try_get(1)?),
        logged: row
            .try_get::<_, Option<String>>(2)?
            .map(|at| key.tag(cursor.position.0, &at)),
    })
}

/// The database's key of cursors' tags (`relay.cursor_key`, 16 bytes by its check; were it not,
/// tags would not match and cursors would be refused as expired, never taken for others).
fn cursor_key(bytes: &[u8]) -> CursorKey {
    CursorKey::from_bytes(bytes).unwrap_or(CursorKey([0; 16]))
}

/// The database's key of cursors' tags, alone (`mark` and `bounds` read it with what they tag).
pub async fn read_cursor_key(
    client: &impl GenericClient,
) -> Result<CursorKey, tokio_postgres::Error> {
    let row = client
        .query_one("select key from relay.cursor_key", &[])
        .await?;
    Ok(cursor_key(row.try_get(0)?))
}

fn decode(row: &Row, first: usize) -> Result<Event, DecodeError> {
    let object = |value: Option<Value>| match value {
        Some(Value::Object(map)) => Some(map),
        _ => None::<Map<String, Value>>,
    };
    let column = |i: usize| row.try_get::<_, Option<Value>>(first + i).ok().flatten();
    let text = |i: usize| row.try_get::<_, Option<String>>(first + i).ok().flatten();
    let raw = RawEvent {
        id: row.try_get(first).unwrap_or_default(),
        table: text(1).unwrap_or_default(),
        op: text(2).unwrap_or_default(),
        new: object(column(3)),
        old: object(column(4)),
        new_session: object(column(5)),
        old_session: object(column(6)),
        xid: text(7),
        at: text(9)
            .or_else(|| {
                row.try_get::<_, Option<time::OffsetDateTime>>(first + 8)
                    .ok()
                    .flatten()
                    .map(at_text_of)
            })
            .unwrap_or_default(),
        fetch: false,
    };
    Event::try_from(raw)
}

/// Events deleted per statement, so that pruning never holds long locks.
const PRUNE_BATCH: i32 = 10_000;

/// How long one batch of pruning may run on the server, at least: longer than the clients' queries
/// when `RELAY_QUERY_TIMEOUT` is short.
const PRUNE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Deletes events recorded more than `retention` ago; returns how many.
pub async fn prune(pool: &Pool, retention: Duration) -> Result<u64, PruneError> {
    let mut client = pool.get().await?;
    let mut total = 0u64;
    // A batch may take longer than clients' requests are allowed (`RELAY_QUERY_TIMEOUT` sets the
    // pool's statement_timeout); given up on each time, the log would never shrink.
    let limit = db::statement_timeout_of(pool).max(PRUNE_STATEMENT_TIMEOUT);
    let limit = format!("set local statement_timeout = {}", limit.as_millis());
    loop {
        let tx = client.transaction().await?;
        tx.batch_execute(&limit).await?;
        let row = tx
            .query_one(
                "select relay.prune_events(now() - make_interval(secs => $1), $2)",
                &[&retention.as_secs_f64(), &PRUNE_BATCH],
            )
            .await?;
        tx.commit().await?;
        let deleted: i64 = row.try_get(0)?;
        if deleted == 0 {
            return Ok(total);
        }
        total += deleted as u64;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("no connection from the pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Query(#[from] tokio_postgres::Error),
}

/// Prunes the log every so often until `stop` turns true. Several relays on one database may all
/// prune: each deletes a prefix of the log and the horizon only grows.
pub async fn prune_periodically(pool: Pool, retention: Duration, mut stop: watch::Receiver<bool>) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        match prune(&pool, retention).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, ?retention, "pruned the event log"),
            Err(cause) => tracing::warn!(
                cause = %crate::Causes(&cause),
                "pruning the event log failed; will retry"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_is_admitted_only_while_the_log_holds_its_event() {
        let event = |id| Mark {
            position: Cursor(id),
            tag: Some(Tag(7)),
        };
        let bounds = |logged| Bounds {
            horizon: Cursor(10),
            issued: Cursor(20),
            logged,
        };
        // An untagged cursor: the range alone.
        assert!(bounds(None).admits(Mark::from(Cursor(15))));
        assert!(!bounds(None).admits(Mark::from(Cursor(9))));
        assert!(!bounds(None).admits(Mark::from(Cursor(21))));
        // A tagged one: its event must be at its id, as it was.
        assert!(bounds(Some(Tag(7))).admits(event(15)));
        assert!(
            !bounds(Some(Tag(8))).admits(event(15)),
            "another event at its id"
        );
        assert!(!bounds(None).admits(event(15)), "no event at its id");
        // At the horizon, retention deleted its event, or another, or one whose time it did not
        // keep.
        assert!(bounds(Some(Tag(7))).admits(event(10)));
        assert!(!bounds(Some(Tag(8))).admits(event(10)));
        assert!(!bounds(None).admits(event(10)));
        assert!(bounds(None).admits(Mark::from(Cursor(10))));
        assert!(!bounds(Some(Tag(7))).admits(event(21)));
    }
}
