//! Consultations over the relay: `send`, the history endpoint, presence across relay instances,
//! and the start and end of a session, with real sockets as patient and dentist on a real
//! database. Each test has its own database.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;

use common::{http_get, token, RelayProcess, TestDb, Ws};
use serde_json::{json, Value};
use tokio_postgres::Row;
use uuid::Uuid;

use relay::authz::{Principal, Role};

/// Sends a `send` frame and returns the reply to it (`sent` or `error`), keeping the event frames
/// that arrive meanwhile in `events`: a message's event may come before or after its reply.
async fn send(
    ws: &mut Ws,
    session: Uuid,
    body: &str,
    client_id: Uuid,
    reference: &str,
    events: &mut Vec<Value>,
) -> Value {
    ws.send(
        json!({"type": "send", "ref": reference, "session_id": session,
                   "body": body, "client_id": client_id}),
    )
    .await;
    loop {
        let frame = ws.recv().await;
        if frame["type"] == "event" {
            events.push(frame);
        } else {
            assert_eq!(frame["ref"], reference, "a reply to another frame: {frame}");
            return frame;
        }
    }
}

/// The id a `sent` reply names, after checking the reply is exactly as documented.
fn sent_id(reply: &Value, reference: &str, client_id: Uuid) -> Uuid {
    let id = reply["id"].as_str().and_then(|id| id.parse().ok());
    let id: Uuid = id.unwrap_or_else(|| panic!("not a sent reply: {reply}"));
    assert_eq!(
        reply,
        &json!({"type": "sent", "ref": reference, "id": id, "client_id": client_id})
    );
    id
}

fn error_code(reply: &Value) -> &str {
    assert_eq!(reply["type"], "error", "{reply}");
    reply["code"].as_str().unwrap_or_default()
}

/// Message-feed events (op, row id), in order.
fn message_ops(events: &[Value]) -> Vec<(String, String)> {
    let messages: Vec<Value> = events
        .iter()
        .filter(|e| e["feed"] == "consultation_messages")
        .cloned()
        .collect();
    common::ops(&messages)
}

async fn messages_in(db: &TestDb, session: Uuid) -> i64 {
    db.client
        .query_one(
            "select count(*) from consultation_messages where session_id = $1",
            &[&session],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_go_both_ways_once_and_retries_create_nothing() {
    let db = TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let (other_patient, other_dentist) =
        (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let admin = db.user(Role::Admin).await;
    let session = db.open_session(&patient, &dentist).await;

    let feeds = ["consultation_messages"];
    let mut p = Ws::subscribed(addr, patient, &feeds).await;
    let mut d = Ws::subscribed(addr, dentist, &feeds).await;
    let mut bystanders = Vec::new();
    for who in [other_patient, other_dentist, admin] {
        bystanders.push(Ws::subscribed(addr, who, &feeds).await);
    }

    let (mut p_events, mut d_events) = (Vec::new(), Vec::new());
    let hello = Uuid::new_v4();
    let reply = send(
        &mut p,
        session,
        "  Hello, doctor  ",
        hello,
        "p1",
        &mut p_events,
    )
    .await;
    let first = sent_id(&reply, "p1", hello);
    let answer = Uuid::new_v4();
    let reply = send(
        &mut d,
        session,
        "Hello! How can I help?",
        answer,
        "d1",
        &mut d_events,
    )
    .await;
    let second = sent_id(&reply, "d1", answer);
    assert_ne!(first, second);

    // Retries after a lost reply: on the same socket, and on a new one after reconnecting.
    let reply = send(
        &mut p,
        session,
        "  Hello, doctor  ",
        hello,
        "p2",
        &mut p_events,
    )
    .await;
    assert_eq!(sent_id(&reply, "p2", hello), first);
    let mut reconnected = Ws::connect(addr, patient).await;
    let mut ignored = Vec::new();
    let reply = send(
        &mut reconnected,
        session,
        "Hello, doctor",
        hello,
        "p3",
        &mut ignored,
    )
    .await;
    assert_eq!(
        sent_id(&reply, "p3", hello),
        first,
        "the body is compared trimmed"
    );
    let reply = send(
        &mut d,
        session,
        "Hello! How can I help?",
        answer,
        "d2",
        &mut d_events,
    )
    .await;
    assert_eq!(sent_id(&reply, "d2", answer), second);
    // The same client_id from two sockets at once still makes one message.
    let race = Uuid::new_v4();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (one, two) = tokio::join!(
        send(&mut p, session, "twice?", race, "p4", &mut a),
        send(&mut reconnected, session, "twice?", race, "p5", &mut b),
    );
    let third = sent_id(&one, "p4", race);
    assert_eq!(sent_id(&two, "p5", race), third);
    p_events.extend(a);

    let fence = db.fence().await;
    p_events.extend(p.events_until(fence).await);
    d_events.extend(d.events_until(fence).await);
    let expected: Vec<(String, String)> = [first, second, third]
        .iter()
        .map(|id| ("INSERT".to_string(), id.to_string()))
        .collect();
    assert_eq!(message_ops(&p_events), expected, "patient");
    assert_eq!(message_ops(&d_events), expected, "dentist");
    let first_event = p_events
        .iter()
        .find(|e| e["row"]["id"] == json!(first))
        .unwrap();
    assert_eq!(
        first_event["row"]["body"], "Hello, doctor",
        "stored trimmed"
    );
    assert_eq!(first_event["row"]["client_id"], json!(hello));
    assert_eq!(first_event["row"]["sender_id"], json!(patient.user_id));

    let names = ["other patient", "other dentist", "admin"];
    for (ws, name) in bystanders.iter_mut().zip(names) {
        let seen = message_ops(&ws.events_until(fence).await);
        let want = if name == "admin" {
            expected.clone()
        } else {
            Vec::new()
        };
        assert_eq!(seen, want, "{name}");
    }
    assert_eq!(messages_in(&db, session).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_send_rule_has_its_error_code_and_writes_nothing() {
    let db = TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let (admin, bot) = (db.user(Role::Admin).await, db.user(Role::Chatbot).await);
    let stranger = db.user(Role::Patient).await;
    let session = db.open_session(&patient, &dentist).await;
    let mut events = Vec::new();

    let mut p = Ws::connect(addr, patient).await;
    let reply = send(
        &mut p,
        Uuid::new_v4(),
        "hi",
        Uuid::new_v4(),
        "1",
        &mut events,
    )
    .await;
    // A session that does not exist is refused as someone else's is.
    assert_eq!(error_code(&reply), "forbidden", "{reply}");
    for who in [admin, bot, stranger] {
        let mut ws = Ws::connect(addr, who).await;
        let reply = send(&mut ws, session, "hi", Uuid::new_v4(), "2", &mut events).await;
        assert_eq!(error_code(&reply), "forbidden", "{:?}: {reply}", who.role);
    }
    for body in [
        "",
        "   \n\t ",
        "\u{a0}\u{3000}\u{feff}",
        &"x".repeat(4001),
        "a\0b",
    ] {
        let reply = send(&mut p, session, body, Uuid::new_v4(), "3", &mut events).await;
        assert_eq!(error_code(&reply), "invalid_body", "{reply}");
    }
    // 4000 characters (multi-byte ones too) after trimming are fine.
    let long = format!("  {}  ", "é".repeat(4000));
    let reply = send(&mut p, session, &long, Uuid::new_v4(), "4", &mut events).await;
    assert_eq!(reply["type"], "sent", "{reply}");
    // A client_id reused for another body or another session.
    let used = Uuid::new_v4();
    let reply = send(&mut p, session, "first", used, "5", &mut events).await;
    assert_eq!(reply["type"], "sent", "{reply}");
    let reply = send(&mut p, session, "second", used, "6", &mut events).await;
    assert_eq!(error_code(&reply), "conflict", "{reply}");
    // Frames that are not valid sends.
    for frame in [
        json!({"type": "send", "ref": "7", "session_id": session, "body": "hi"}),
        json!({"type": "send", "ref": "7", "session_id": "nope", "body": "hi", "client_id": used}),
        json!({"type": "send", "ref": "7", "session_id": session, "body": 5, "client_id": used}),
        json!({"type": "send", "ref": "7", "session_id": session, "body": "hi",
               "client_id": used, "extra": true}),
    ] {
        p.send(frame.clone()).await;
        let reply = p.recv().await;
        assert_eq!(reply["ref"], "7");
        assert_eq!(error_code(&reply), "bad_request", "{frame} → {reply}");
    }

    // An ended session takes no more messages; a retry of a message sent before still works.
    db.client
        .execute(
            "update consultation_sessions set status = 'ended', ended_at = now() where id = $1",
            &[&session],
        )
        .await
        .unwrap();
    let reply = send(
        &mut p,
        session,
        "too late",
        Uuid::new_v4(),
        "8",
        &mut events,
    )
    .await;
    assert_eq!(error_code(&reply), "session_ended", "{reply}");
    let reply = send(&mut p, session, "first", used, "9", &mut events).await;
    assert_eq!(reply["type"], "sent", "{reply}");

    assert_eq!(
        messages_in(&db, session).await,
        2,
        "only the two valid sends"
    );
    // The socket stayed open through every refusal.
    p.send(json!({"type": "ping", "ref": "last"})).await;
    assert_eq!(p.recv().await, json!({"type": "pong", "ref": "last"}));
}

/// A message deleted by SQL outside the relay stays deleted: its sender's retry, which may come
/// after the delete, is refused and writes nothing. The marks the deletes leave are no app
/// user's to read, and go with the sender's profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_does_not_send_again_a_message_deleted_since() {
    let db = TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let session = db.open_session(&patient, &dentist).await;
    let mut events = Vec::new();
    let mut p = Ws::connect(addr, patient).await;
    let mut d = Ws::connect(addr, dentist).await;

    let (mine, theirs, kept) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let reply = send(&mut p, session, "delete me", mine, "1", &mut events).await;
    sent_id(&reply, "1", mine);
    let reply = send(&mut d, session, "and me", theirs, "2", &mut events).await;
    sent_id(&reply, "2", theirs);
    let reply = send(&mut p, session, "keep me", kept, "3", &mut events).await;
    let kept_id = sent_id(&reply, "3", kept);
    // One statement deletes two messages, of two senders.
    let deleted = db
        .client
        .execute(
            "delete from consultation_messages where client_id = any($1)",
            &[&vec![mine, theirs]],
        )
        .await
        .unwrap();
    assert_eq!(deleted, 2);

    let reply = send(&mut p, session, "delete me", mine, "4", &mut events).await;
    assert_eq!(error_code(&reply), "conflict", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap_or_default()
            .contains("deleted"),
        "{reply}"
    );
    let reply = send(&mut d, session, "and me", theirs, "5", &mut events).await;
    assert_eq!(error_code(&reply), "conflict", "{reply}");
    // A retry of a message still there is answered as before, and new messages go through.
    let reply = send(&mut p, session, "keep me", kept, "6", &mut events).await;
    assert_eq!(sent_id(&reply, "6", kept), kept_id);
    let reply = send(
        &mut p,
        session,
        "a new one",
        Uuid::new_v4(),
        "7",
        &mut events,
    )
    .await;
    assert_eq!(reply["type"], "sent", "{reply}");
    assert_eq!(messages_in(&db, session).await, 2);

    // The other sender's client_id is not the patient's: a mark is per sender.
    let reply = send(&mut p, session, "and me", theirs, "8", &mut events).await;
    assert_eq!(reply["type"], "sent", "{reply}");

    let read = as_user(
        &db,
        &patient,
        "select count(*) from public.deleted_consultation_messages where $1::uuid is not null",
        session,
    )
    .await;
    assert_eq!(
        sqlstate(&read),
        "42501",
        "the marks are not the app's to read"
    );
    let client = common::connect_to(&db.url).await;
    client.batch_execute("begin").await.unwrap();
    common::act_as(&client, &patient).await.unwrap();
    let truncated = client
        .batch_execute("truncate public.deleted_consultation_messages")
        .await
        .expect_err("the marks are not the app's to truncate");
    assert_eq!(truncated.code().map(|c| c.code()), Some("42501"));
    drop(client);
    let marks = "select count(*) from public.deleted_consultation_messages";
    let count = |row: Row| row.get::<_, i64>(0);
    assert_eq!(count(db.client.query_one(marks, &[]).await.unwrap()), 2);
    db.client
        .batch_execute(&format!(
            "delete from consultation_messages where session_id = '{session}';
             delete from consultation_sessions where id = '{session}';
             delete from profiles where id = '{}'",
            dentist.user_id
        ))
        .await
        .unwrap();
    assert_eq!(
        count(db.client.query_one(marks, &[]).await.unwrap()),
        4,
        "the dentist's mark went with the profile; the patient's four remain"
    );
}

/// A retry that found neither the message nor its mark because the first send had not committed,
/// and whose insert then waited for that send, is refused if the message was deleted before the
/// wait ended: the mark is looked for again after the insert. (Here the first send and the delete
/// are one transaction, so that the retry's wait ends exactly when both have committed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_waited_for_a_send_deleted_since_does_not_bring_it_back() {
    const SEND: &str = "select id from public.send_consultation_message($1, 'hello', $2)";
    let db = TestDb::new().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let session = db.open_session(&patient, &dentist).await;
    let client_id = Uuid::new_v4();

    let first = common::connect_to(&db.url).await;
    first.batch_execute("begin").await.unwrap();
    common::act_as(&first, &patient).await.unwrap();
    first
        .query_one(SEND, &[&session, &client_id])
        .await
        .unwrap();
    first.batch_execute("reset role").await.unwrap();
    let deleted = first
        .execute(
            "delete from consultation_messages where client_id = $1",
            &[&client_id],
        )
        .await
        .unwrap();
    assert_eq!(deleted, 1);

    let retry = common::connect_to(&db.url).await;
    let pid: i32 = retry
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let retrying = tokio::spawn(async move {
        retry.batch_execute("begin").await.unwrap();
        common::act_as(&retry, &patient).await.unwrap();
        let sent = retry.query_one(SEND, &[&session, &client_id]).await;
        retry.batch_execute("rollback").await.unwrap();
        sent.map(|row| row.get::<_, Uuid>(0))
    });
    // The retry's insert waits on the first send's uncommitted message.
    tokio::time::timeout(common::PATIENCE, async {
        loop {
            let waiting: bool = db
                .client
                .query_one(
                    "select exists (select from pg_stat_activity
                                    where pid = $1 and wait_event_type = 'Lock')",
                    &[&pid],
                )
                .await
                .unwrap()
                .get(0);
            if waiting {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the retry never waited for the first send");
    first.batch_execute("commit").await.unwrap();

    let refused = retrying
        .await
        .unwrap()
        .expect_err("the retry sent the deleted message again");
    assert_eq!(refused.code().map(|c| c.code()), Some("RL409"), "{refused}");
    assert_eq!(messages_in(&db, session).await, 0);
}

/// Runs `sql` in a transaction as `who` (their claims, as row-level security sees them).
async fn as_user(
    db: &TestDb,
    who: &Principal,
    sql: &str,
    session: Uuid,
) -> Result<Row, tokio_postgres::Error> {
    let client = common::connect_to(&db.url).await;
    client.batch_execute("begin").await?;
    common::act_as(&client, who).await?;
    let row = client.query_one(sql, &[&session]).await;
    client
        .batch_execute(if row.is_ok() { "commit" } else { "rollback" })
        .await?;
    row
}

fn sqlstate(result: &Result<Row, tokio_postgres::Error>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => e.code().map(|c| c.code().to_string()).unwrap_or_default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_its_dentist_starts_and_ends_a_session_and_participants_see_it() {
    let db = TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let (other_dentist, admin) = (db.user(Role::Dentist).await, db.user(Role::Admin).await);
    let session = db.open_session(&patient, &dentist).await;
    // The session's INSERT is dispatched before anyone subscribes: only its changes are asserted.
    common::settle(&db, addr).await;
    let feeds = ["consultation_sessions"];
    let mut p = Ws::subscribed(addr, patient, &feeds).await;
    let mut other = Ws::subscribed(addr, other_dentist, &feeds).await;

    let start = "select status, started_at is not null from start_consultation($1)";
    let end = "select status, ended_at is not null, notes, duration is not null \
               from end_consultation($1, 'fillings next week')";
    for who in [&patient, &other_dentist, &admin] {
        assert_eq!(sqlstate(&as_user(&db, who, start, session).await), "RL403");
    }
    let ended_too_early = as_user(&db, &dentist, end, session).await;
    assert_eq!(
        sqlstate(&ended_too_early),
        "RL409",
        "ending a session that never started"
    );
    let started = as_user(&db, &dentist, start, session).await.unwrap();
    assert_eq!(
        (started.get::<_, String>(0), started.get::<_, bool>(1)),
        ("active".into(), true)
    );
    assert_eq!(
        sqlstate(&as_user(&db, &dentist, start, session).await),
        "RL409"
    );
    assert_eq!(
        sqlstate(&as_user(&db, &patient, end, session).await),
        "RL403"
    );
    let ended = as_user(&db, &dentist, end, session).await.unwrap();
    assert_eq!(ended.get::<_, String>(0), "ended");
    assert!(ended.get::<_, bool>(1));
    assert_eq!(ended.get::<_, String>(2), "fillings next week");
    assert!(ended.get::<_, bool>(3), "the duration is derived");
    assert_eq!(
        sqlstate(&as_user(&db, &dentist, end, session).await),
        "RL410"
    );
    assert_eq!(
        sqlstate(&as_user(&db, &dentist, start, session).await),
        "RL410"
    );
    let nowhere = as_user(&db, &dentist, start, Uuid::new_v4()).await;
    assert_eq!(sqlstate(&nowhere), "RL403", "as someone else's session");

    let fence = db.fence().await;
    let events = p.events_until(fence).await;
    let statuses: Vec<&str> = events
        .iter()
        .map(|e| e["row"]["status"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(statuses, ["active", "ended"], "{events:?}");
    assert_eq!(events[1]["old"]["status"], "active");
    assert!(events[1]["row"]["duration"].is_string(), "{}", events[1]);
    assert!(
        other.events_until(fence).await.is_empty(),
        "another dentist sees nothing"
    );
}

/// GETs a history page as `who`.
async fn history(addr: SocketAddr, who: &Principal, session: Uuid, query: &str) -> (u16, Value) {
    let path = format!("/api/consultations/{session}/messages{query}");
    http_get(addr, &path, Some(&token(who))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_then_live_has_no_gap_and_no_duplicate_while_messages_keep_coming() {
    let db = TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let session = db.open_session(&patient, &dentist).await;
    let send_sql = "select id from send_consultation_message($1, $2, gen_random_uuid())";
    // The writer: 120 messages before the history is read, and more while it is. Given a gate,
    // it writes the second half once the gate opens.
    let writer = {
        let url = db.url.clone();
        let (patient, dentist) = (patient, dentist);
        move |count: usize, mut gate: Option<tokio::sync::oneshot::Receiver<()>>| {
            let url = url.clone();
            async move {
                let client = common::connect_to(&url).await;
                let mut ids = Vec::new();
                for i in 0..count {
                    if i == count / 2 {
                        if let Some(gate) = gate.take() {
                            let _ = gate.await;
                        }
                    }
                    let who = if i % 3 == 0 { dentist } else { patient };
                    client.batch_execute("begin").await.unwrap();
                    common::act_as(&client, &who).await.unwrap();
                    let row = client
                        .query_one(send_sql, &[&session, &format!("message {i}")])
                        .await
                        .unwrap();
                    client.batch_execute("commit").await.unwrap();
                    ids.push(row.get::<_, Uuid>(0));
                }
                ids
            }
        }
    };
    let mut all: Vec<Uuid> = writer(120, None).await;
    // Half of these race the first page; the rest wait for its cursor, so some are live.
    let (after_cursor, gate) = tokio::sync::oneshot::channel();
    let mut concurrent = Some(tokio::spawn(writer(150, Some(gate))));

    // The first page, then older pages until the end, while the writer goes on.
    let (status, page) = history(addr, &patient, session, "").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["session_id"], json!(session));
    let cursor = page["cursor"].as_str().expect("a cursor").to_string();
    // It names the event at the log's position, as an event frame would: after a restore, a
    // cursor of an event the log no longer holds is refused, however far new ids have gone.
    let mark: relay::protocol::Mark = cursor.parse().unwrap();
    assert_eq!(cursor, db.event_cursor(mark.position.0).await);
    let _ = after_cursor.send(());
    let mut pages = vec![page];
    while let Some(before) = pages.last().unwrap()["next_before"]
        .as_str()
        .map(String::from)
    {
        let (status, page) = history(addr, &patient, session, &format!("?before={before}")).await;
        assert_eq!(status, 200, "{page}");
        pages.push(page);
    }
    let mut seen: Vec<Uuid> = Vec::new();
    for page in &pages {
        let messages = page["messages"].as_array().unwrap();
        assert!(messages.len() <= 50);
        for message in messages {
            assert_eq!(message["session_id"], json!(session));
            seen.push(message["id"].as_str().unwrap().parse().unwrap());
        }
    }
    assert_eq!(
        pages[0]["messages"].as_array().unwrap().len(),
        50,
        "a full first page"
    );
    assert!(pages.len() >= 3);
    for page in &pages[1..] {
        assert!(
            page.get("cursor").is_none(),
            "only the first page has a cursor: {page}"
        );
    }
    // Newest first: created_at never rises down the list.
    let times: Vec<&str> = pages
        .iter()
        .flat_map(|p| p["messages"].as_array().unwrap().iter())
        .map(|m| m["created_at"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");

    // Then live from the history's cursor, filtered on the session.
    let mut p = Ws::connect(addr, patient).await;
    p.send(
        json!({"type": "subscribe", "ref": "m", "feed": "consultation_messages",
                  "filter": {"session_id": session}, "since": cursor}),
    )
    .await;
    let ack = p.recv().await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    assert_eq!(ack["cursor"], json!(cursor));
    let mut live_ids: Vec<Uuid> = Vec::new();
    loop {
        let frame = p.recv().await;
        match frame["type"].as_str() {
            Some("event") => {
                assert_eq!(frame["op"], "INSERT");
                live_ids.push(frame["row"]["id"].as_str().unwrap().parse().unwrap());
            }
            Some("presence") => {}
            Some("live") => break,
            _ => panic!("unexpected {frame}"),
        }
    }
    // The fence feed; live messages keep arriving meanwhile.
    p.send(json!({"type": "subscribe", "ref": "fence", "feed": "availability"}))
        .await;
    let mut fence = None;
    loop {
        let frame = p.recv().await;
        match frame["type"].as_str() {
            Some("subscribed") => {
                assert_eq!(frame["feed"], "availability");
                all.extend(concurrent.take().expect("once").await.unwrap());
                fence = Some(db.fence().await);
                continue;
            }
            Some("event") => {}
            _ => panic!("unexpected {frame}"),
        }
        if frame["feed"] == "availability"
            && Some(&frame["row"]["id"]) == fence.map(|f| json!(f)).as_ref()
        {
            break;
        }
        assert_eq!(frame["feed"], "consultation_messages", "{frame}");
        live_ids.push(frame["row"]["id"].as_str().unwrap().parse().unwrap());
    }

    let history_set: HashSet<Uuid> = seen.iter().copied().collect();
    assert_eq!(
        history_set.len(),
        seen.len(),
        "no message twice in the history"
    );
    let live_set: HashSet<Uuid> = live_ids.iter().copied().collect();
    assert_eq!(live_set.len(), live_ids.len(), "no message twice live");
    assert!(
        !live_ids.is_empty(),
        "messages kept coming after the history's cursor, so the hand-over was exercised"
    );
    assert!(
        history_set.is_disjoint(&live_set),
        "no message both in history and live"
    );
    let mut union: Vec<Uuid> = seen.iter().chain(&live_ids).copied().collect();
    union.sort();
    all.sort();
    assert_eq!(union, all, "history plus live is every message");
    assert!(
        seen.len() >= 120,
        "the history holds at least what came before it"
    );

    // `before` also takes a message id.
    let oldest_first_page = pages[0]["messages"][49]["id"].as_str().unwrap();
    let (_, by_id) = history(
        addr,
        &patient,
        session,
        &format!("?before={oldest_first_page}"),
    )
    .await;
    assert_eq!(by_id["messages"], pages[1]["messages"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_authorized_like_the_feed_and_refuses_bad_requests() {
    let db = TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let (stranger, bot) = (db.user(Role::Patient).await, db.user(Role::Chatbot).await);
    let (admin, new_dentist) = (db.user(Role::Admin).await, db.user(Role::Dentist).await);
    let session = db.open_session(&patient, &dentist).await;
    db.exec(&format!(
        "insert into consultation_messages (session_id, sender_id, body) values ('{session}', '{}', 'hi')",
        patient.user_id
    ))
    .await;

    for who in [&patient, &dentist, &admin] {
        let (status, body) = history(addr, who, session, "?limit=10").await;
        assert_eq!(status, 200, "{:?}: {body}", who.role);
        assert_eq!(body["messages"].as_array().unwrap().len(), 1);
        assert_eq!(body["next_before"], Value::Null);
    }
    for who in [&stranger, &bot, &new_dentist] {
        let (status, body) = history(addr, who, session, "").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("forbidden")),
            "{body}"
        );
    }
    // After a hand-over the history follows the session, as the feed does.
    db.exec(&format!(
        "update consultation_sessions set dentist_id = '{}' where id = '{session}'",
        new_dentist.user_id
    ))
    .await;
    assert_eq!(history(addr, &dentist, session, "").await.0, 403);
    assert_eq!(history(addr, &new_dentist, session, "").await.0, 200);

    // Only admins learn that a session does not exist; to others it looks like someone else's.
    let (status, body) = history(addr, &admin, Uuid::new_v4(), "").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (status, body) = history(addr, &stranger, Uuid::new_v4(), "").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    for query in [
        "?limit=0",
        "?limit=201",
        "?limit=ten",
        "?before=yesterday",
        "?page=2",
    ] {
        let (status, body) = history(addr, &admin, session, query).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_request")),
            "{query}: {body}"
        );
    }
    let (status, body) = history(
        addr,
        &admin,
        session,
        &format!("?before={}", Uuid::new_v4()),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = http_get(
        addr,
        "/api/consultations/not-a-uuid/messages",
        Some(&token(&admin)),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = http_get(
        addr,
        &format!("/api/consultations/{session}/messages"),
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("missing_token")),
        "{body}"
    );
}

/// The next presence frame, as (joined, left) sets of (user, role).
async fn presence(
    ws: &mut Ws,
    session: Uuid,
) -> (BTreeSet<(String, String)>, BTreeSet<(String, String)>) {
    let frame = ws.recv_frame().await;
    assert_eq!(frame["type"], "presence", "{frame}");
    assert_eq!(frame["session_id"], json!(session), "{frame}");
    let set = |list: &Value| -> BTreeSet<(String, String)> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["user_id"].as_str().unwrap().to_string(),
                    m["role"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    (set(&frame["joined"]), set(&frame["left"]))
}

/// Reads presence frames, applying each to what the socket knows, until it knows exactly `want`:
/// across instances, a socket's list may be sent before news from the other instance arrives,
/// and the news then follows as its own frame.
async fn presence_until(ws: &mut Ws, session: Uuid, want: BTreeSet<(String, String)>) {
    let mut known = BTreeSet::new();
    while known != want {
        let (joined, left) = presence(ws, session).await;
        known.extend(joined);
        known.retain(|m| !left.contains(m));
    }
}

fn member(who: &Principal) -> (String, String) {
    (who.user_id.to_string(), who.role.to_string())
}

fn members(who: &[&Principal]) -> BTreeSet<(String, String)> {
    who.iter().map(|w| member(w)).collect()
}

/// Connects and subscribes to one session's messages; the acknowledgement is consumed.
async fn join(addr: SocketAddr, who: Principal, session: Uuid) -> Ws {
    let mut ws = Ws::connect(addr, who).await;
    ws.send(
        json!({"type": "subscribe", "ref": "join", "feed": "consultation_messages",
                   "filter": {"session_id": session}}),
    )
    .await;
    let ack = ws.recv_frame().await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_right_across_two_relay_instances() {
    let db = TestDb::new().await;
    let one = db.start().await;
    let two = db.start().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let (stranger, admin) = (db.user(Role::Patient).await, db.user(Role::Admin).await);
    let session = db.open_session(&patient, &dentist).await;
    let nobody = BTreeSet::new();

    // The patient waits on instance one: the list names only them.
    let mut p = join(one.local_addr(), patient, session).await;
    assert_eq!(
        presence(&mut p, session).await,
        (members(&[&patient]), nobody.clone())
    );

    // The dentist comes online on instance two: they get the list, and the patient learns that the
    // doctor is now available, across instances.
    let mut d = join(two.local_addr(), dentist, session).await;
    presence_until(&mut d, session, members(&[&patient, &dentist])).await;
    assert_eq!(
        presence(&mut p, session).await,
        (members(&[&dentist]), nobody.clone())
    );

    // Someone else's session: refused, and no presence frame.
    let mut s = Ws::connect(one.local_addr(), stranger).await;
    s.send(
        json!({"type": "subscribe", "ref": "x", "feed": "consultation_messages",
                  "filter": {"session_id": session}}),
    )
    .await;
    assert_eq!(error_code(&s.recv_frame().await), "forbidden");

    // A second socket of the dentist changes nothing; closing it changes nothing either.
    let mut d2 = join(one.local_addr(), dentist, session).await;
    assert_eq!(
        presence(&mut d2, session).await,
        (members(&[&patient, &dentist]), nobody.clone())
    );
    d2.stream.close(None).await.unwrap();
    // An admin watching the session shows as present, on both instances.
    let mut a = join(one.local_addr(), admin, session).await;
    assert_eq!(
        presence(&mut a, session).await,
        (members(&[&patient, &dentist, &admin]), nobody.clone())
    );
    assert_eq!(
        presence(&mut p, session).await,
        (members(&[&admin]), nobody.clone())
    );
    assert_eq!(
        presence(&mut d, session).await,
        (members(&[&admin]), nobody.clone())
    );

    // Leaving by unsubscribing, and by closing the socket.
    a.send(json!({"type": "unsubscribe", "ref": "u", "feed": "consultation_messages"}))
        .await;
    assert_eq!(
        presence(&mut p, session).await,
        (nobody.clone(), members(&[&admin]))
    );
    assert_eq!(
        presence(&mut d, session).await,
        (nobody.clone(), members(&[&admin]))
    );
    d.stream.close(None).await.unwrap();
    assert_eq!(
        presence(&mut p, session).await,
        (nobody.clone(), members(&[&dentist]))
    );

    // The dentist comes back; then instance two shuts down, and the patient sees them leave.
    let mut d = join(two.local_addr(), dentist, session).await;
    presence(&mut d, session).await;
    assert_eq!(
        presence(&mut p, session).await,
        (members(&[&dentist]), nobody.clone())
    );
    two.shutdown().await;
    assert_eq!(
        presence(&mut p, session).await,
        (nobody.clone(), members(&[&dentist]))
    );
    // The one frame the patient got for all this was the dentist's: nothing else is pending.
    p.send(json!({"type": "ping", "ref": "end"})).await;
    assert_eq!(p.recv_frame().await, json!({"type": "pong", "ref": "end"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_leaves_no_one_present() {
    let db = TestDb::new().await;
    let one = db.start().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let session = db.open_session(&patient, &dentist).await;
    let nobody = BTreeSet::new();
    let mut p = join(one.local_addr(), patient, session).await;
    presence(&mut p, session).await;

    let addr = common::free_address();
    let mut killed = RelayProcess::spawn(&db.url, addr).await;
    let mut d = join(addr, dentist, session).await;
    presence(&mut d, session).await;
    assert_eq!(
        presence(&mut p, session).await,
        (members(&[&dentist]), nobody.clone())
    );
    killed.child.kill().await.unwrap();
    // Its LISTEN connection is gone, so the next sweep forgets it.
    assert_eq!(
        presence(&mut p, session).await,
        (nobody, members(&[&dentist]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_a_hand_over() {
    let db = TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let new_dentist = db.user(Role::Dentist).await;
    let session = db.open_session(&patient, &dentist).await;
    let nobody = BTreeSet::new();
    let mut p = join(addr, patient, session).await;
    presence(&mut p, session).await;
    let mut d = join(addr, dentist, session).await;
    presence(&mut d, session).await;
    assert_eq!(
        presence(&mut p, session).await,
        (members(&[&dentist]), nobody.clone())
    );

    db.exec(&format!(
        "update consultation_sessions set dentist_id = '{}' where id = '{session}'",
        new_dentist.user_id
    ))
    .await;
    // The old dentist no longer reads the session: they leave its presence and hear no more of it.
    assert_eq!(
        presence(&mut p, session).await,
        (nobody.clone(), members(&[&dentist]))
    );
    let mut n = join(addr, new_dentist, session).await;
    assert_eq!(
        presence(&mut n, session).await,
        (members(&[&patient, &new_dentist]), nobody.clone())
    );
    assert_eq!(
        presence(&mut p, session).await,
        (members(&[&new_dentist]), nobody)
    );
    d.send(json!({"type": "ping", "ref": "still here"})).await;
    assert_eq!(
        d.recv_frame().await,
        json!({"type": "pong", "ref": "still here"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfiltered_subscription_follows_its_open_sessions() {
    let db = TestDb::new().await;
    let one = db.start().await;
    let two = db.start().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let waiting = db.open_session(&patient, &dentist).await;
    let ended = db.open_session(&patient, &dentist).await;
    db.exec(&format!(
        "update consultation_sessions set status = 'ended' where id = '{ended}'"
    ))
    .await;
    let nobody = BTreeSet::new();

    // The patient waits in the waiting session, on instance one.
    let mut p = join(one.local_addr(), patient, waiting).await;
    assert_eq!(
        presence(&mut p, waiting).await,
        (members(&[&patient]), nobody.clone())
    );

    // The dentist comes online on instance two, subscribed to all their messages: present in
    // every open session of theirs (not the ended one), and the patient hears of it. Instance
    // two knows the sessions from their events: dispatched first, so that it knows which ended.
    common::settle(&db, two.local_addr()).await;
    let mut d = Ws::connect(two.local_addr(), dentist).await;
    d.subscribe("consultation_messages").await;
    presence_until(&mut d, waiting, members(&[&patient, &dentist])).await;
    assert_eq!(
        presence(&mut p, waiting).await,
        (members(&[&dentist]), nobody.clone())
    );

    // A session opened for them later is joined as it opens.
    let later = db.open_session(&patient, &dentist).await;
    assert_eq!(
        presence(&mut d, later).await,
        (members(&[&dentist]), nobody.clone())
    );

    // The waiting session ends: the dentist's socket leaves it, and the patient sees them go.
    db.exec(&format!(
        "update consultation_sessions set status = 'ended' where id = '{waiting}'"
    ))
    .await;
    assert_eq!(
        presence(&mut p, waiting).await,
        (nobody.clone(), members(&[&dentist]))
    );
    // Nothing more for the dentist about that session: the next frame is a pong.
    d.send(json!({"type": "ping", "ref": "after"})).await;
    assert_eq!(
        d.recv_frame().await,
        json!({"type": "pong", "ref": "after"})
    );
}

/// A hand-over under REPEATABLE READ or SERIALIZABLE could leave a message committed after its
/// snapshot with the old participants: it is refused, with a hint. Other changes to a session are
/// not, and under READ COMMITTED the hand-over is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_outside_read_committed_is_refused_with_a_clear_error() {
    let db = common::TestDb::new().await;
    let (patient, dentist, other) = (
        db.user(Role::Patient).await,
        db.user(Role::Dentist).await,
        db.user(Role::Dentist).await,
    );
    let session = db.open_session(&patient, &dentist).await;
    let hand_over = format!(
        "update consultation_sessions set dentist_id = '{}' where id = '{session}'",
        other.user_id
    );
    for level in ["repeatable read", "serializable"] {
        db.exec(&format!("begin isolation level {level}")).await;
        let err = db
            .client
            .batch_execute(&hand_over)
            .await
            .expect_err("a hand-over must be refused under this level");
        db.exec("rollback").await;
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
            "{level}: {err}"
        );
        let db_error = err.as_db_error().unwrap();
        assert!(
            db_error.message().contains("handed over")
                && db_error.message().contains(&level.to_uppercase()),
            "{}",
            db_error.message()
        );
        assert!(db_error
            .hint()
            .unwrap_or_default()
            .contains("READ COMMITTED"));
        // The same level takes other changes.
        db.exec(&format!(
            "begin isolation level {level}; \
             update consultation_sessions set notes = 'x' where id = '{session}'; commit"
        ))
        .await;
    }
    db.exec(&format!(
        "begin isolation level read committed; {hand_over}; commit"
    ))
    .await;
    let now: Uuid = db
        .client
        .query_one(
            "select dentist_id from consultation_sessions where id = $1",
            &[&session],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(now, other.user_id);
}

/// A full presence write (after registering anew) replaces what the instance held: a row it no
/// longer has (written by an earlier attempt that committed though the relay did not learn it,
/// for a user who has left since) goes, and the other instances hear that the user left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_presence_write_removes_rows_the_instance_no_longer_has() {
    let db = TestDb::new().await;
    let listen = common::connect_to(&db.url).await;
    let (instance, _) = relay::presence::register(&listen).await.unwrap();
    let (session, user) = (Uuid::new_v4(), Uuid::new_v4());
    db.client
        .execute(
            "insert into relay.presence (instance, session_id, user_id, role) \
             values ($1, $2, $3, 'patient')",
            &[&instance, &session, &user],
        )
        .await
        .unwrap();
    let presence = relay::presence::Presence::new(relay::hub::Hub::new(16));
    presence.registered(instance, Vec::new());
    let pool = relay::server::pool(&db.config()).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(presence.clone().run(pool, stopped));
    tokio::time::timeout(common::PATIENCE, async {
        loop {
            let left: i64 = db
                .client
                .query_one(
                    "select count(*) from relay.presence where instance = $1",
                    &[&instance],
                )
                .await
                .unwrap()
                .get(0);
            if left == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the row the instance no longer has was never removed");
    stop.send(true).unwrap();
    writer.await.unwrap();
}
