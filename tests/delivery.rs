//! Delivery guarantees: cursors, resuming (on the same relay or another one), transactions that
//! commit out of the order they started, retention, and slow consumers. Real Postgres, real
//! sockets, real tokens.

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::{ops, Ws};
use relay::authz::Role;

/// The cursor of an event frame.
fn cursor(frame: &Value) -> String {
    frame["cursor"].as_str().expect("cursor").to_string()
}

/// The position in the log a cursor names.
fn position(cursor: &str) -> i64 {
    let mark: relay::protocol::Mark = cursor.parse().expect("a cursor");
    mark.position.0
}

/// Reads a socket that was cut as a slow consumer: the event frames it still holds, then the 4008
/// close, whose reason is returned.
async fn events_then_slow_consumer_close(ws: &mut Ws) -> (Vec<Value>, String) {
    let mut events = Vec::new();
    loop {
        match ws.next_message().await {
            Some(Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "event" {
                    events.push(frame);
                }
            }
            Some(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), relay::protocol::close::SLOW_CONSUMER);
                return (events, frame.reason.to_string());
            }
            other => panic!("expected frames then close 4008, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_subscription_gets_exactly_what_it_missed_then_goes_on_live() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (patient, dentist, other) = (
        db.user(Role::Patient).await,
        db.user(Role::Dentist).await,
        db.user(Role::Dentist).await,
    );
    let mut ws = Ws::subscribed(addr, dentist, &["appointments"]).await;
    let first = db.book(&patient, &dentist, "seen live").await;
    let fence = db.fence().await;
    let seen = ws.events_until(fence).await;
    assert_eq!(ops(&seen), [("INSERT".into(), first.to_string())]);
    let last = cursor(&seen[0]);
    drop(ws);

    // While away: two of its own, one of another dentist's, and one moved away from it.
    let missed_a = db.book(&patient, &dentist, "missed a").await;
    db.book(&patient, &other, "not mine").await;
    let missed_b = db.book(&patient, &dentist, "missed b").await;
    db.client
        .execute(
            "update appointments set dentist_id = $1 where id = $2",
            &[&other.user_id, &first],
        )
        .await
        .unwrap();
    // The relay has dispatched all of that, so it is all in the replay, not after it.
    common::settle(&db, addr).await;

    let mut ws = Ws::connect(addr, dentist).await;
    let mut events = ws.resume("appointments", &last).await;
    assert_eq!(events.len(), 3, "the replay ends with a live marker");
    ws.subscribe("availability").await;
    let live = db.book(&patient, &dentist, "live again").await;
    let fence = db.fence().await;
    events.extend(ws.events_until(fence).await);
    assert_eq!(
        ops(&events),
        [
            ("INSERT".into(), missed_a.to_string()),
            ("INSERT".into(), missed_b.to_string()),
            ("DELETE".into(), first.to_string()),
            ("INSERT".into(), live.to_string()),
        ]
    );
    let cursors: Vec<i64> = events.iter().map(|e| position(&cursor(e))).collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");

    // The same cursor is good on another relay on the same database.
    let second = db.start().await;
    let mut elsewhere = Ws::connect(second.local_addr(), dentist).await;
    let replayed = elsewhere.resume("appointments", &last).await;
    assert_eq!(ops(&replayed), ops(&events));
    second.shutdown().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_commits_late_is_neither_skipped_nor_doubled() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut ws = Ws::subscribed(relay.local_addr(), dentist, &["appointments"]).await;

    // The long transaction starts first and writes first, then waits.
    let mut long = common::connect_to(&db.url).await;
    let long_tx = long.transaction().await.unwrap();
    let late: uuid::Uuid = long_tx
        .query_one(
            "insert into appointments (patient_id, dentist_id, starts_at, ends_at, notes)
             values ($1, $2, now(), now() + interval '1 hour', 'commits late') returning id",
            &[&patient.user_id, &dentist.user_id],
        )
        .await
        .unwrap()
        .get(0);
    // Meanwhile another commits; a client sees it, takes its cursor and leaves.
    let early = db.book(&patient, &dentist, "commits early").await;
    let fence = db.fence().await;
    let seen = ws.events_until(fence).await;
    assert_eq!(ops(&seen), [("INSERT".into(), early.to_string())]);
    let mut away = Ws::connect(relay.local_addr(), dentist).await;
    let away_cursor = away.subscribe("appointments").await;
    drop(away);

    long_tx.commit().await.unwrap();
    let fence = db.fence().await;
    assert_eq!(
        ops(&ws.events_until(fence).await),
        [("INSERT".into(), late.to_string())],
        "the live client gets the late commit"
    );
    let mut back = Ws::connect(relay.local_addr(), dentist).await;
    assert_eq!(
        ops(&back.resume("appointments", &away_cursor).await),
        [("INSERT".into(), late.to_string())],
        "the resuming client gets the late commit, and only it"
    );
    relay.shutdown().await;
}

/// Pages of the log end at a size as well as a count, so a run of large rows is read a few at a
/// time; a resume across them still gets every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_are_read_in_pages_bounded_by_size_and_all_replayed() {
    const ROWS: i32 = 24;
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut ws = Ws::connect(relay.local_addr(), dentist).await;
    let since = ws.subscribe("appointments").await;
    drop(ws);
    // Notes of 1 MB each that do not compress: 24 MB of rows, three times a page's bound.
    db.client
        .execute(
            "insert into appointments (patient_id, dentist_id, starts_at, ends_at, notes)
             select $1, $2, now(), now() + interval '1 hour',
                    n || ' ' || (select string_agg(md5(random()::text || g), '')
                                 from generate_series(1, 32768) g)
             from generate_series(1, $3::int) n order by n",
            &[&patient.user_id, &dentist.user_id, &ROWS],
        )
        .await
        .unwrap();
    common::settle(&db, relay.local_addr()).await;

    let pool = relay::server::pool(&db.config()).unwrap();
    let client = pool.get().await.unwrap();
    let after = relay::protocol::Cursor(position(&since));
    let page = relay::log::read_range(
        &**client,
        after,
        relay::protocol::Cursor(i64::MAX),
        Some(relay::authz::Feed::Appointments),
        2000,
    )
    .await
    .unwrap();
    assert!(
        !page.events.is_empty() && page.events.len() < ROWS as usize && page.more,
        "a page of {} events, more: {}",
        page.events.len(),
        page.more
    );

    let mut ws = Ws::connect(relay.local_addr(), dentist).await;
    let replayed = ws.resume("appointments", &since).await;
    let order: Vec<i32> = replayed
        .iter()
        .map(|e| {
            let notes = e["row"]["notes"].as_str().unwrap();
            notes.split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(order, (1..=ROWS).collect::<Vec<_>>());
    relay.shutdown().await;
}

/// A page of the log is costed as what it is, whatever the statistics: with `relay.events`
/// analyzed and the one-row tables it joins not (the key never is, the horizon only once enough
/// prunes have updated it), the
/// planner had estimated the horizon's one row at over a thousand, costed a page past
/// `jit_above_cost`, and every page read (replays, catch-up) paid tens of milliseconds of JIT
/// compilation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_the_log_is_not_costed_past_jit_above_cost() {
    let db = common::TestDb::new().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    db.book_many(&patient, &dentist, 5000).await;
    db.exec("analyze relay.events").await;
    // Postgres' default, whatever this server is set to.
    let jit_above_cost = 100_000.0;
    for table in [Some("appointments"), None] {
        let plan: serde_json::Value = db
            .client
            .query_one(
                &format!("explain (format json) {}", relay::log::range_sql()),
                &[&0i64, &i64::MAX, &table, &2000i64, &relay::log::PAGE_BYTES],
            )
            .await
            .unwrap()
            .get(0);
        let cost = plan[0]["Plan"]["Total Cost"].as_f64().unwrap();
        assert!(
            cost < jit_above_cost,
            "a page of {table:?} costed {cost}, past jit_above_cost {jit_above_cost}"
        );
    }
}

/// Pages of the log carry `at` as a timestamp and the relay writes it out: byte for byte as the
/// capture writes it in notifications (cursors' tags are made from it), whatever the session's
/// time zone, for whole seconds, the last microsecond of a day, leap days, times long past or
/// far ahead, and through a page of the log those the relay leaves to Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_time_is_written_as_the_capture_writes_it() {
    let db = common::TestDb::new().await;
    db.exec("set timezone = 'Asia/Kolkata'").await;
    let rows = db
        .client
        .query(
            &format!(
                "select e.at, {} from (
                     select t::timestamptz as at from unnest(array[
                         '2026-01-01 00:00:00+00', '2024-02-29 23:59:59.999999+00',
                         '1999-12-31 23:59:59.000001+00', '1970-01-01 00:00:00+00',
                         '1900-03-01 12:00:00.5+00', '9999-12-31 23:59:59.999999+00',
                         '2026-03-29 01:30:00.000100+02']) t
                     union all
                     select clock_timestamp() + (random() - 0.5) * interval '200 years'
                     from generate_series(1, 2000)) e",
                relay::log::AT_TEXT
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2007);
    for row in rows {
        let (at, text): (time::OffsetDateTime, String) = (row.get(0), row.get(1));
        assert_eq!(relay::log::at_text_of(at), text, "{at}");
    }

    // Through a page of the log, times the relay cannot write as Postgres does: before the year 1,
    // past 9999, and infinity (which the capture writes as nothing).
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let row = format!(
        r#"{{"id": "{}", "patient_id": "{}", "dentist_id": "{}", "status": "booked"}}"#,
        uuid::Uuid::new_v4(),
        patient.user_id,
        dentist.user_id
    );
    let times = [
        "2026-11-22 10:00:00.000001+00",
        "0001-01-01 00:00:00+00",
        "0044-03-15 12:00:00+00 BC",
        "10000-01-01 00:00:00.5+00",
        "infinity",
    ];
    for at in times {
        db.client
            .execute(
                "insert into relay.events (table_name, op, new_row, at)
                 values ('appointments', 'INSERT', $1::text::jsonb, $2::text::timestamptz)",
                &[&row, &at],
            )
            .await
            .unwrap();
    }
    let page = relay::log::read_range(
        &db.client,
        relay::protocol::Cursor(0),
        relay::protocol::Cursor(i64::MAX),
        Some(relay::authz::Feed::Appointments),
        100,
    )
    .await
    .unwrap();
    let expected: Vec<String> = db
        .client
        .query(
            &format!(
                "select coalesce({}, '') from relay.events e order by e.id",
                relay::log::AT_TEXT
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let read: Vec<String> = page
        .events
        .into_iter()
        .map(|(_, event)| event.unwrap().at)
        .collect();
    assert_eq!(read, expected);
    assert_eq!(expected.len(), times.len());
    assert_eq!(expected[2], "0044-03-15T12:00:00.000000Z");
    assert_eq!(expected[4], "");
}

/// A subscription that receives nothing is told the relay's position now and then, so that its
/// cursor keeps up with the log: once retention has passed the cursor its `subscribed` reply
/// named, the client still resumes, from the last position it was told, with nothing missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_subscription_is_told_the_position_and_resumes_after_retention() {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    // Positions told every 500 ms; events pruned once 2 s old.
    config.retention = Duration::from_secs(2);
    let relay = common::start_with(config).await;
    let addr = relay.local_addr();
    let (patient, other, dentist) = (
        db.user(Role::Patient).await,
        db.user(Role::Patient).await,
        db.user(Role::Dentist).await,
    );
    let mut quiet = Ws::connect(addr, patient).await;
    let subscribed = quiet.subscribe("appointments").await;
    // Someone else's appointment: nothing the quiet patient may see.
    db.book(&other, &dentist, "not theirs").await;
    let told = loop {
        let frame = quiet.recv().await;
        assert_eq!(frame["type"], "position", "{frame}");
        assert_eq!(frame["feed"], "appointments", "{frame}");
        let told = cursor(&frame);
        if position(&told) > position(&subscribed) {
            break told;
        }
    };
    drop(quiet);

    // Retention passes both cursors.
    tokio::time::timeout(common::PATIENCE, async {
        loop {
            let horizon: i64 = db
                .client
                .query_one("select pruned_through from relay.log_horizon", &[])
                .await
                .unwrap()
                .get(0);
            if horizon >= position(&told) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("retention prunes the booking's event");

    let mut back = Ws::connect(addr, patient).await;
    back.send(
        json!({"type": "subscribe", "ref": "old", "feed": "appointments", "since": subscribed}),
    )
    .await;
    assert_eq!(back.recv().await["code"], "cursor_expired");
    assert!(back.resume("appointments", &told).await.is_empty());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_retention_is_refused_never_partly_replayed() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut ws = Ws::subscribed(relay.local_addr(), dentist, &["appointments"]).await;
    db.book(&patient, &dentist, "old").await;
    db.book(&patient, &dentist, "old too").await;
    let fence = db.fence().await;
    let seen = ws.events_until(fence).await;
    let (oldest, newest) = (cursor(&seen[0]), cursor(&seen[1]));
    let kept = db.book(&patient, &dentist, "recent").await;
    // Dispatched before the late client resumes, so it is in the replay, not after it.
    common::settle(&db, relay.local_addr()).await;

    // The first events are two days old; retention is one.
    db.client
        .execute(
            "update relay.events set at = at - interval '2 days' where id <= $1",
            &[&position(&newest)],
        )
        .await
        .unwrap();
    // A cursor names its event by its time too: `newest` as the log now holds it.
    let (stale, newest) = (newest.clone(), db.event_cursor(position(&newest)).await);
    let pool = relay::server::pool(&db.config()).unwrap();
    let deleted = relay::log::prune(&pool, Duration::from_secs(86400))
        .await
        .unwrap();
    assert!(deleted >= 2, "{deleted}");

    let mut late = Ws::connect(relay.local_addr(), dentist).await;
    late.send(json!({"type": "subscribe", "ref": "r", "feed": "appointments", "since": oldest}))
        .await;
    let refused = late.recv().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "cursor_expired");
    assert_eq!(refused["ref"], "r");
    // A cursor from the future (another database) is refused the same way.
    late.send(json!({"type": "subscribe", "feed": "appointments", "since": "999999999"}))
        .await;
    assert_eq!(late.recv().await["code"], "cursor_expired");

    // At the horizon, a cursor of another event than the one retention deleted there (as after
    // a restore) is refused too.
    late.send(json!({"type": "subscribe", "feed": "appointments", "since": stale}))
        .await;
    assert_eq!(late.recv().await["code"], "cursor_expired");

    // From the horizon on, nothing was lost: resuming there works.
    assert_eq!(
        ops(&late.resume("appointments", &newest).await),
        [("INSERT".into(), kept.to_string())]
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_is_cut_others_are_not_and_it_resumes_without_loss() {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.socket_queue = 8;
    let relay = common::start_with(config).await;
    let addr = relay.local_addr();
    let admin = db.user(Role::Admin).await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut stalled = Ws::connect(addr, admin).await;
    let start = stalled.subscribe("appointments").await;
    // Another client reads throughout, until the first availability event: the fence.
    // It reports how many it has, and the writes wait for it, so that only the stalled client
    // ever falls behind.
    let mut reader = Ws::subscribed(addr, admin, &["appointments"]).await;
    let (progress, read) = tokio::sync::watch::channel(0usize);
    let reading = tokio::spawn(async move {
        let mut events = Vec::new();
        loop {
            let frame = reader.recv().await;
            assert_eq!(frame["type"], "event", "{frame}");
            if frame["feed"] == "availability" {
                return events;
            }
            events.push(frame);
            progress.send_replace(events.len());
        }
    });
    let caught_up = |n: usize| {
        let mut read = read.clone();
        async move {
            tokio::time::timeout(common::PATIENCE, read.wait_for(|r| *r >= n))
                .await
                .expect("the reading client fell behind")
                .expect("reader");
        }
    };

    // Large rows until the stalled client's queue and socket buffers are full and it is cut,
    // then a few more.
    let cut = || {
        relay
            .hub()
            .counters()
            .slow_consumers_cut
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut booked = Vec::new();
    while cut() == 0 {
        assert!(booked.len() < 20_000, "the stalled client was never cut");
        let notes = format!("{} {}", booked.len(), "x".repeat(4000));
        booked.push(db.book(&patient, &dentist, &notes).await);
        caught_up(booked.len()).await;
    }
    // The stalled client reads now, before the relay gives up sending it the close: what was
    // written before the cut, then the close.
    let (received, reason) = events_then_slow_consumer_close(&mut stalled).await;
    for _ in 0..10 {
        booked.push(db.book(&patient, &dentist, "after the cut").await);
        caught_up(booked.len()).await;
    }
    let count = booked.len();
    db.fence().await;
    let everything = reading.await.unwrap();
    assert_eq!(everything.len(), count, "the reading client got everything");

    assert!(
        received.len() < count,
        "the stalled client was cut before the end"
    );
    assert!(
        !received.is_empty(),
        "events filled its buffers before the cut"
    );
    let last = received.last().map(cursor).unwrap_or(start);
    // The reason names the last cursor the relay finished sending; the client may have received
    // one more that was in flight.
    let (_, named) = reason
        .rsplit_once("last cursor sent ")
        .unwrap_or_else(|| panic!("the 4008 reason names the last cursor sent: {reason}"));
    let named: i64 = named.parse().expect("a cursor in the reason");
    assert!(named <= position(&last), "{reason} vs {last}");

    let mut again = Ws::connect(addr, admin).await;
    let rest = again.resume("appointments", &last).await;
    let ids: Vec<String> = received
        .iter()
        .chain(&rest)
        .map(|e| e["row"]["id"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = booked.iter().map(|id| id.to_string()).collect();
    let diverges = ids.iter().zip(&expected).position(|(a, b)| a != b);
    assert!(
        ids.len() == expected.len() && diverges.is_none(),
        "every row once, in order, across the cut: got {} of {}, first difference at {diverges:?} \
         ({} received before the cut)",
        ids.len(),
        expected.len(),
        received.len()
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_longer_than_the_socket_queue_is_not_cut() {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.socket_queue = 16;
    let relay = common::start_with(config).await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut ws = Ws::connect(relay.local_addr(), dentist).await;
    let cursor = ws.subscribe("appointments").await;
    drop(ws);
    db.book_many(&patient, &dentist, 200).await;
    // All 200 are behind the relay's position, so the resume replays every one of them.
    common::settle(&db, relay.local_addr()).await;

    // Another feed is live on the socket throughout.
    let mut ws = Ws::connect(relay.local_addr(), dentist).await;
    ws.subscribe("availability").await;
    let replayed = ws.resume("appointments", &cursor).await;
    assert_eq!(
        replayed.len(),
        200,
        "all missed events, then the live marker"
    );
    let fence = db.fence().await;
    assert!(ws.events_until(fence).await.is_empty());
    relay.shutdown().await;
}

/// A client that stops reading while its resumed subscription is replayed is cut as a slow
/// consumer, though the replay alone never fills its queue, and resumes without loss. Live events
/// of the feed arriving meanwhile wait in the replay's buffer, so nothing else would ever cut it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_during_a_replay_is_cut_and_resumes_without_loss() {
    const ROWS: usize = 3000;
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.socket_queue = 8;
    let relay = common::start_with(config).await;
    let addr = relay.local_addr();
    let admin = db.user(Role::Admin).await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut ws = Ws::connect(addr, admin).await;
    let start = ws.subscribe("appointments").await;
    drop(ws);
    // 12 MB of events: more than the socket's buffers hold.
    db.client
        .execute(
            "insert into appointments (patient_id, dentist_id, starts_at, ends_at, notes)
             select $1, $2, now(), now() + interval '1 hour', n || ' ' || repeat('x', 4000)
             from generate_series(1, $3::int) n order by n",
            &[&patient.user_id, &dentist.user_id, &(ROWS as i32)],
        )
        .await
        .unwrap();
    common::settle(&db, addr).await;

    let mut stalled = Ws::connect(addr, admin).await;
    stalled
        .send(json!({"type": "subscribe", "ref": "r", "feed": "appointments", "since": start}))
        .await;
    let cut = || {
        relay
            .hub()
            .counters()
            .slow_consumers_cut
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    tokio::time::timeout(common::PATIENCE, async {
        while cut() == 0 || relay.hub().snapshot().connected_sockets > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the client that stopped reading was never cut and let go");

    // It reads now: the reply, what the replay sent before the cut, then the close.
    let (received, _) = events_then_slow_consumer_close(&mut stalled).await;
    assert!(received.len() < ROWS, "cut before the replay ended");
    // A replay cut short still counts the frames it queued: at least those the client read.
    let replayed = relay
        .hub()
        .counters()
        .replayed
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        replayed >= received.len() as u64 && replayed > 0,
        "replayed {replayed}, received {}",
        received.len()
    );
    let last = received.last().map(cursor).unwrap_or(start);
    let mut again = Ws::connect(addr, admin).await;
    let rest = again.resume("appointments", &last).await;
    let notes: Vec<usize> = received
        .iter()
        .chain(&rest)
        .map(|e| {
            let notes = e["row"]["notes"].as_str().unwrap();
            notes.split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(
        notes,
        (1..=ROWS).collect::<Vec<_>>(),
        "every row once, in order, across the cut ({} received before it)",
        received.len()
    );
    relay.shutdown().await;
}

/// Events committed from several connections at once, faster than one at a time, reach every
/// socket complete and in cursor order. The relay writes an event's frames from its dispatch while
/// nothing waits behind the event, and queues them for the sockets' writers while notifications
/// back up; a burst like this one makes both likely on the same sockets. What the test checks is
/// what the clients get, whichever path each frame took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_concurrent_writers_arrives_complete_and_in_order() {
    const WRITERS: usize = 4;
    const EACH: usize = 250;
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut sockets = Vec::new();
    for _ in 0..8 {
        let admin = db.user(Role::Admin).await;
        sockets.push(Ws::subscribed(addr, admin, &["appointments", "availability"]).await);
    }
    let mut own = Ws::subscribed(addr, dentist, &["appointments"]).await;

    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let client = common::connect_to(&db.url).await;
        let (patient, dentist) = (patient.user_id, dentist.user_id);
        writers.push(tokio::spawn(async move {
            let mut booked = Vec::new();
            for _ in 0..EACH {
                let row = client
                    .query_one(
                        "insert into appointments (patient_id, dentist_id, starts_at, ends_at)
                         values ($1, $2, now(), now() + interval '1 hour') returning id",
                        &[&patient, &dentist],
                    )
                    .await
                    .expect("book");
                booked.push(row.get::<_, uuid::Uuid>(0).to_string());
            }
            booked
        }));
    }
    let mut booked = std::collections::HashSet::new();
    for writer in writers {
        booked.extend(writer.await.expect("writer"));
    }
    assert_eq!(booked.len(), WRITERS * EACH);
    let fence = db.fence().await;

    let check = |events: &[Value]| {
        let cursors: Vec<i64> = events.iter().map(|e| position(&cursor(e))).collect();
        assert!(cursors.windows(2).all(|w| w[0] < w[1]), "out of order");
        let ids: std::collections::HashSet<String> = events
            .iter()
            .map(|e| e["row"]["id"].as_str().expect("row id").to_string())
            .collect();
        assert_eq!(events.len(), booked.len());
        assert_eq!(ids, booked);
    };
    for ws in &mut sockets {
        check(&ws.events_until(fence).await);
    }
    // The dentist's own rows reach it through the per-user index; availability, the fence,
    // reaches every role.
    check(&own.events_until(fence).await);
    relay.shutdown().await;
}

/// A replay reads the log a window of ids at a time (a feed that rarely changes would otherwise
/// be looked for through every other event in one scan): across windows, empty or not, it misses
/// nothing and repeats nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_across_millions_of_ids_gets_every_event_once() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut ws = Ws::connect(addr, dentist).await;
    let from = ws.subscribe("appointments").await;
    drop(ws);

    // Events far apart in the log: ids jump by millions between them, as they would after
    // millions of other feeds' events.
    let mut booked = Vec::new();
    for n in 0..3 {
        booked.push(db.book(&patient, &dentist, &format!("far {n}")).await);
        db.exec("select setval('relay.events_id_seq', nextval('relay.events_id_seq') + 2500000)")
            .await;
    }
    common::settle(&db, addr).await;

    let mut ws = Ws::connect(addr, dentist).await;
    let events = ws.resume("appointments", &from).await;
    let ids: Vec<Value> = events.iter().map(|e| e["row"]["id"].clone()).collect();
    let expected: Vec<Value> = booked.iter().map(|id| json!(id)).collect();
    assert_eq!(ids, expected, "{events:?}");
    assert!(position(&cursor(&events[2])) > 5_000_000);
}
