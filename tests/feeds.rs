//! End to end: triggers → LISTEN → authorized per-user WebSocket feeds, against a real Postgres,
//! with real WebSocket clients and real tokens. Each test has its own database.

mod common;

use std::collections::BTreeSet;

use common::{ops, Ws};
use serde_json::{json, Value};
use uuid::Uuid;

use relay::authz::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_sees_exactly_its_appointments_including_reassignment_and_delete() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (dentist_a, dentist_b) = (db.user(Role::Dentist).await, db.user(Role::Dentist).await);
    let (patient_1, patient_2) = (db.user(Role::Patient).await, db.user(Role::Patient).await);
    let (admin, bot) = (db.user(Role::Admin).await, db.user(Role::Chatbot).await);

    let mut clients = Vec::new();
    for who in [admin, bot, dentist_a, dentist_b, patient_1, patient_2] {
        clients.push(Ws::subscribed(addr, who, &["appointments"]).await);
    }

    let id = db.book(&patient_1, &dentist_a, "molar pain").await;
    db.exec(&format!(
        "update appointments set status = 'confirmed' where id = '{id}'"
    ))
    .await;
    db.exec(&format!(
        "update appointments set dentist_id = '{}' where id = '{id}'",
        dentist_b.user_id
    ))
    .await;
    db.exec(&format!("delete from appointments where id = '{id}'"))
        .await;
    // A booking of nobody in this test but the admin and the chatbot.
    let other_patient = db.user(Role::Patient).await;
    let other_dentist = db.user(Role::Dentist).await;
    let elsewhere = db.book(&other_patient, &other_dentist, "elsewhere").await;
    let fence = db.fence().await;

    let id = id.to_string();
    let elsewhere = elsewhere.to_string();
    let op = |op: &str, row: &str| (op.to_string(), row.to_string());
    let everything = vec![
        op("INSERT", &id),
        op("UPDATE", &id),
        op("UPDATE", &id),
        op("DELETE", &id),
        op("INSERT", &elsewhere),
    ];
    let expected: [Vec<(String, String)>; 6] = [
        everything.clone(),                                            // admin
        everything,                                                    // chatbot
        vec![op("INSERT", &id), op("UPDATE", &id), op("DELETE", &id)], // dentist A: moved away
        vec![op("INSERT", &id), op("DELETE", &id)], // dentist B: moved in, deleted
        vec![
            op("INSERT", &id),
            op("UPDATE", &id),
            op("UPDATE", &id),
            op("DELETE", &id),
        ], // patient 1
        vec![],                                     // patient 2
    ];

    let mut received = Vec::new();
    for (client, expected) in clients.iter_mut().zip(expected) {
        let events = client.events_until(fence).await;
        let appointments: Vec<Value> = events
            .into_iter()
            .filter(|e| e["feed"] == "appointments")
            .collect();
        assert_eq!(ops(&appointments), expected, "{:?}", client.who.role);
        received.push(appointments);
    }

    // Dentist A's DELETE carries the row as A last saw it; B's INSERT reveals nothing of before.
    let a_left = &received[2][2];
    assert_eq!(a_left["row"]["dentist_id"], json!(dentist_a.user_id));
    assert_eq!(a_left["old"]["dentist_id"], json!(dentist_a.user_id));
    let b_entered = &received[3][0];
    assert_eq!(b_entered["row"]["dentist_id"], json!(dentist_b.user_id));
    assert!(
        b_entered.get("old").is_none(),
        "a row entering view must not carry its past"
    );
    assert_eq!(b_entered["row"]["status"], "confirmed");
    // Patient 1's view of the reassignment is an UPDATE with both versions.
    let p_moved = &received[4][2];
    assert_eq!(p_moved["old"]["dentist_id"], json!(dentist_a.user_id));
    assert_eq!(p_moved["row"]["dentist_id"], json!(dentist_b.user_id));
    assert_eq!(p_moved["row"]["notes"], "molar pain");

    // The chatbot receives exactly the slot columns, on every version.
    let slot: BTreeSet<&str> = relay::authz::SLOT_COLUMNS.into_iter().collect();
    for event in &received[1] {
        for side in ["row", "old"] {
            if let Some(row) = event.get(side) {
                let columns: BTreeSet<&str> = row
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(String::as_str)
                    .collect();
                assert_eq!(columns, slot, "chatbot {side} of {event}");
            }
        }
    }
    // Event frames carry the documented fields.
    let first = &received[0][0];
    assert_eq!(first["type"], "event");
    assert!(first["id"].as_i64().is_some_and(|id| id > 0));
    assert!(first["at"].as_str().is_some_and(|at| at.ends_with('Z')));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn availability_reaches_every_role() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let mut clients = Vec::new();
    for role in relay::authz::Role::ALL {
        let who = db.user(role).await;
        // Subscribed only to the fence feed, availability itself.
        clients.push(Ws::subscribed(relay.local_addr(), who, &[]).await);
    }
    let dentist = db.user(Role::Dentist).await;
    db.exec(&format!(
        "insert into availability (dentist_id, starts_at, ends_at) values ('{}', now(), now() + interval '2 hours')",
        dentist.user_id
    ))
    .await;
    db.exec("update availability set is_available = false")
        .await;
    let fence = db.fence().await;
    for client in &mut clients {
        let events = client.events_until(fence).await;
        let seen: Vec<&str> = events.iter().map(|e| e["op"].as_str().unwrap()).collect();
        assert_eq!(seen, ["INSERT", "UPDATE"], "{:?}", client.who.role);
        assert_eq!(events[1]["row"]["is_available"], false);
        assert_eq!(events[1]["old"]["is_available"], true);
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consultations_follow_their_session() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (dentist_a, dentist_b) = (db.user(Role::Dentist).await, db.user(Role::Dentist).await);
    let (patient, stranger) = (db.user(Role::Patient).await, db.user(Role::Patient).await);
    let (admin, bot) = (db.user(Role::Admin).await, db.user(Role::Chatbot).await);
    let session = db.open_session(&patient, &dentist_a).await;

    // The chatbot may never read consultations.
    let mut chatbot = Ws::connect(addr, bot).await;
    for feed in ["consultation_sessions", "consultation_messages"] {
        chatbot
            .send(json!({"type": "subscribe", "ref": "c", "feed": feed}))
            .await;
        let reply = chatbot.recv().await;
        assert_eq!(
            (reply["type"].as_str(), reply["code"].as_str()),
            (Some("error"), Some("forbidden")),
            "{reply}"
        );
        assert_eq!(reply["ref"], "c");
    }
    // A patient may not filter on someone else's session (nor on one that does not exist).
    let mut nosy = Ws::connect(addr, stranger).await;
    for target in [session, Uuid::new_v4()] {
        nosy.send(
            json!({"type": "subscribe", "ref": "n", "feed": "consultation_messages",
                         "filter": {"session_id": target}}),
        )
        .await;
        let reply = nosy.recv().await;
        assert_eq!(reply["code"], "forbidden", "{reply}");
    }

    // The sessions opened above are already dispatched: subscriptions start after them.
    common::settle(&db, addr).await;
    let feeds = ["consultation_sessions", "consultation_messages"];
    let mut admin_ws = Ws::subscribed(addr, admin, &feeds).await;
    let mut a = Ws::subscribed(addr, dentist_a, &feeds).await;
    let mut b = Ws::subscribed(addr, dentist_b, &feeds).await;
    let mut stranger_ws = Ws::subscribed(addr, stranger, &feeds).await;
    // The patient narrows messages to this one session.
    let mut p = Ws::connect(addr, patient).await;
    p.subscribe("consultation_sessions").await;
    p.send(
        json!({"type": "subscribe", "ref": "m", "feed": "consultation_messages",
                  "filter": {"session_id": session}}),
    )
    .await;
    let ack = p.recv().await;
    assert_eq!(
        (&ack["type"], &ack["ref"], &ack["feed"]),
        (
            &json!("subscribed"),
            &json!("m"),
            &json!("consultation_messages")
        ),
        "{ack}"
    );
    // A subscription to one session's messages joins its presence: the list comes first, and
    // names the patient (and the dentist, whose unfiltered subscription follows their sessions).
    let presence = p.recv_frame().await;
    assert_eq!(presence["type"], "presence", "{presence}");
    assert_eq!(presence["session_id"], json!(session));
    let patient_entry = json!({"user_id": patient.user_id, "role": "patient"});
    assert!(
        presence["joined"]
            .as_array()
            .unwrap()
            .contains(&patient_entry),
        "{presence}"
    );
    p.subscribe("availability").await;

    let say = |sender: Uuid, body: &str| {
        format!(
            "insert into consultation_messages (session_id, sender_id, body) values ('{session}', '{sender}', '{body}')"
        )
    };
    db.exec(&say(patient.user_id, "hello doctor")).await;
    db.exec(&format!(
        "update consultation_sessions set dentist_id = '{}' where id = '{session}'",
        dentist_b.user_id
    ))
    .await;
    db.exec(&say(dentist_b.user_id, "dr b here")).await;
    // A message in another session of the same patient: filtered out for the patient's socket.
    let other_session = db.open_session(&patient, &dentist_b).await;
    db.exec(&format!(
        "insert into consultation_messages (session_id, sender_id, body) values ('{other_session}', '{}', 'other')",
        patient.user_id
    ))
    .await;
    let fence = db.fence().await;

    let summary = |events: Vec<Value>| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["feed"] != "availability")
            .map(|e| {
                let what = e["row"]["body"]
                    .as_str()
                    .or(e["row"]["status"].as_str())
                    .unwrap_or("?");
                format!(
                    "{} {} {}",
                    e["feed"].as_str().unwrap(),
                    e["op"].as_str().unwrap(),
                    what
                )
            })
            .collect()
    };
    assert_eq!(
        summary(admin_ws.events_until(fence).await),
        [
            "consultation_messages INSERT hello doctor",
            "consultation_sessions UPDATE waiting",
            "consultation_messages INSERT dr b here",
            "consultation_sessions INSERT waiting",
            "consultation_messages INSERT other",
        ]
    );
    assert_eq!(
        summary(a.events_until(fence).await),
        [
            "consultation_messages INSERT hello doctor",
            "consultation_sessions DELETE waiting",
            // Handing the session over takes its messages along: A loses sight of them.
            "consultation_messages DELETE hello doctor",
        ]
    );
    assert_eq!(
        summary(b.events_until(fence).await),
        [
            "consultation_sessions INSERT waiting",
            "consultation_messages INSERT hello doctor",
            "consultation_messages INSERT dr b here",
            "consultation_sessions INSERT waiting",
            "consultation_messages INSERT other",
        ]
    );
    assert_eq!(
        summary(p.events_until(fence).await),
        [
            "consultation_messages INSERT hello doctor",
            "consultation_sessions UPDATE waiting",
            "consultation_messages INSERT dr b here",
            "consultation_sessions INSERT waiting",
        ]
    );
    assert!(summary(stranger_ws.events_until(fence).await).is_empty());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_kb_row_arrives_whole() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let bot = db.user(Role::Chatbot).await;
    let mut d = Ws::subscribed(relay.local_addr(), dentist, &["appointments"]).await;
    let mut c = Ws::subscribed(relay.local_addr(), bot, &["appointments"]).await;
    // The notifications as the relay gets them, on a LISTEN connection of the test's own.
    let (listener, mut connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (notified, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = notified.send(n.payload().to_string());
            }
        }
    });
    listener.batch_execute("listen relay_events").await.unwrap();
    // Multi-byte characters, so bytes and characters differ: 20,000 characters, 30,000 bytes.
    let notes: String = "é😀xyz".repeat(4000);
    assert_eq!(notes.chars().count(), 20_000);
    let id = db.book(&patient, &dentist, &notes).await;
    let small = db.book(&patient, &dentist, "small").await;
    let fence = db.fence().await;

    // The trigger could not inline it: its notification asks the relay to fetch the event.
    let event: i64 = db
        .client
        .query_one(
            "select id from relay.events where new_row ->> 'id' = $1",
            &[&id.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    let payload: Value = loop {
        let text = tokio::time::timeout(common::PATIENCE, notifications.recv())
            .await
            .expect("the notification in time")
            .expect("the listening connection");
        let payload: Value = serde_json::from_str(&text).unwrap();
        if payload["id"] == json!(event) {
            break payload;
        }
    };
    assert_eq!(payload["fetch"], json!(true), "{payload}");
    assert!(payload.get("new").is_none(), "{payload}");

    let events = d.events_until(fence).await;
    let appointments: Vec<&Value> = events
        .iter()
        .filter(|e| e["feed"] == "appointments")
        .collect();
    assert_eq!(appointments.len(), 2);
    assert_eq!(appointments[0]["row"]["id"], json!(id));
    assert_eq!(
        appointments[0]["row"]["notes"].as_str(),
        Some(notes.as_str())
    );
    assert_eq!(
        appointments[1]["row"]["id"],
        json!(small),
        "the large event keeps its place in order"
    );
    let slots = c.events_until(fence).await;
    assert!(slots[0]["row"].get("notes").is_none());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_parameter_token_works_too() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let dentist = db.user(Role::Dentist).await;
    let mut ws = Ws::connect_with_query(relay.local_addr(), dentist).await;
    ws.subscribe("appointments").await;
    ws.subscribe("availability").await;
    let patient = db.user(Role::Patient).await;
    let id = db.book(&patient, &dentist, "").await;
    let fence = db.fence().await;
    assert_eq!(
        ops(&ws.events_until(fence).await),
        [("INSERT".to_string(), id.to_string())]
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_committed_states_are_announced() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (dentist_a, dentist_b) = (db.user(Role::Dentist).await, db.user(Role::Dentist).await);
    let patient = db.user(Role::Patient).await;
    let admin = db.user(Role::Admin).await;
    let mut a = Ws::subscribed(addr, dentist_a, &["appointments"]).await;
    let mut b = Ws::subscribed(addr, dentist_b, &["appointments"]).await;
    let mut all = Ws::subscribed(addr, admin, &["appointments"]).await;

    let insert = |id: Uuid, dentist: Uuid, notes: &str| {
        format!(
            "insert into appointments (id, patient_id, dentist_id, starts_at, ends_at, notes)
             values ('{id}', '{}', '{dentist}', now(), now() + interval '1 hour', '{notes}')",
            patient.user_id
        )
    };
    // Booked for B and moved to A before commit: it was only ever A's.
    let moved = Uuid::new_v4();
    db.exec(&format!(
        "begin; {}; update appointments set dentist_id = '{}', status = 'confirmed' where id = '{moved}'; commit;",
        insert(moved, dentist_b.user_id, "private to A"),
        dentist_a.user_id
    ))
    .await;
    // Rolled back, rolled back to a savepoint, and born and gone in one transaction: nothing.
    db.exec(&format!(
        "begin; {}; rollback;",
        insert(Uuid::new_v4(), dentist_a.user_id, "r")
    ))
    .await;
    db.exec(&format!(
        "begin; savepoint s; {}; rollback to savepoint s; commit;",
        insert(Uuid::new_v4(), dentist_a.user_id, "s")
    ))
    .await;
    let ephemeral = Uuid::new_v4();
    db.exec(&format!(
        "begin; {}; delete from appointments where id = '{ephemeral}'; commit;",
        insert(ephemeral, dentist_a.user_id, "e")
    ))
    .await;
    // Two updates in one transaction are one UPDATE, from the state before to the state after.
    db.exec(&format!(
        "begin; update appointments set status = 'cancelled' where id = '{moved}';
                update appointments set status = 'completed' where id = '{moved}'; commit;"
    ))
    .await;
    // An update that changes nothing is no event.
    db.exec(&format!(
        "update appointments set status = status where id = '{moved}'"
    ))
    .await;
    let fence = db.fence().await;

    let a_events = a.events_until(fence).await;
    let moved = moved.to_string();
    assert_eq!(
        ops(&a_events),
        [
            ("INSERT".to_string(), moved.clone()),
            ("UPDATE".to_string(), moved.clone())
        ]
    );
    assert_eq!(a_events[0]["row"]["status"], "confirmed");
    assert_eq!(a_events[1]["old"]["status"], "confirmed");
    assert_eq!(a_events[1]["row"]["status"], "completed");
    assert!(b.events_until(fence).await.is_empty(), "B never had it");
    let everything = all.events_until(fence).await;
    let appointments: Vec<Value> = everything
        .into_iter()
        .filter(|e| e["feed"] == "appointments")
        .collect();
    assert_eq!(ops(&appointments).len(), 2);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_goes_to_whoever_has_the_session_when_it_commits() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (dentist_a, dentist_b) = (db.user(Role::Dentist).await, db.user(Role::Dentist).await);
    let patient = db.user(Role::Patient).await;
    let session = db.open_session(&patient, &dentist_a).await;
    let mut a = Ws::subscribed(addr, dentist_a, &["consultation_messages"]).await;
    let mut b = Ws::subscribed(addr, dentist_b, &["consultation_messages"]).await;

    // Same transaction: the message is written, then the session is handed to B.
    db.exec(&format!(
        "begin;
         insert into consultation_messages (session_id, sender_id, body) values ('{session}', '{}', 'first');
         update consultation_sessions set dentist_id = '{}' where id = '{session}';
         commit;",
        patient.user_id, dentist_b.user_id
    ))
    .await;
    // Concurrently: a message is written while another transaction hands the session back to A
    // and commits first.
    let (writer, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    writer.batch_execute("begin").await.unwrap();
    writer
        .execute(
            "insert into consultation_messages (session_id, sender_id, body) values ($1, $2, 'second')",
            &[&session, &patient.user_id],
        )
        .await
        .unwrap();
    db.exec(&format!(
        "update consultation_sessions set dentist_id = '{}' where id = '{session}'",
        dentist_a.user_id
    ))
    .await;
    writer.batch_execute("commit").await.unwrap();
    let fence = db.fence().await;

    let bodies = |events: Vec<Value>| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["feed"] == "consultation_messages")
            .map(|e| {
                format!(
                    "{} {}",
                    e["op"].as_str().unwrap(),
                    e["row"]["body"].as_str().unwrap_or("?")
                )
            })
            .collect()
    };
    // B: the first message arrives with the session and leaves with it; the second is never B's.
    assert_eq!(
        bodies(b.events_until(fence).await),
        ["INSERT first", "DELETE first"]
    );
    // A: never saw the first message until the session came back, then sees the second.
    assert_eq!(
        bodies(a.events_until(fence).await),
        ["INSERT first", "INSERT second"]
    );
    relay.shutdown().await;
}

/// A transaction's first staged change queues its publish; when that change is rolled back to a
/// savepoint (or lost with a failed block), the next one must queue it again, and a transaction
/// that stages many rows publishes each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_after_a_rolled_back_savepoint_are_published_once() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut ws = Ws::subscribed(relay.local_addr(), dentist, &["appointments"]).await;
    let insert = |notes: &str| {
        format!(
            "insert into appointments (patient_id, dentist_id, starts_at, ends_at, notes)
             values ('{}', '{}', now(), now() + interval '1 hour', '{notes}')",
            patient.user_id, dentist.user_id
        )
    };
    db.exec(&format!(
        "begin; savepoint s; {}; rollback to savepoint s; {}; commit;",
        insert("rolled back"),
        insert("after the rollback")
    ))
    .await;
    db.exec(&format!(
        "begin; savepoint s; {}; release savepoint s; {}; commit;",
        insert("released"),
        insert("after the release")
    ))
    .await;
    db.exec(&format!(
        "do $$ begin
             begin {}; raise exception 'undo'; exception when raise_exception then null; end;
             {};
         end $$",
        insert("in a failed block"),
        insert("after the failed block")
    ))
    .await;
    // Rolling back to a savepoint after the first change leaves that change staged on its own.
    db.exec(&format!(
        "begin; {}; savepoint s; {}; rollback to savepoint s; commit;",
        insert("kept before a savepoint"),
        insert("rolled back after it")
    ))
    .await;
    db.exec(&format!(
        "begin; {}; {}; {}; commit;",
        insert("one of three"),
        insert("two of three"),
        insert("three of three")
    ))
    .await;
    let fence = db.fence().await;
    let notes: Vec<String> = ws
        .events_until(fence)
        .await
        .iter()
        .map(|e| e["row"]["notes"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        notes,
        [
            "after the rollback",
            "released",
            "after the release",
            "after the failed block",
            "kept before a savepoint",
            "one of three",
            "two of three",
            "three of three"
        ]
    );
    relay.shutdown().await;
}

/// The capture's helpers run with their caller's rights; only the trigger functions may call them.
/// An application role that could call `relay.emit` would forge events for every subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_roles_cannot_call_the_capture_helpers() {
    let db = common::TestDb::new().await;
    for call in [
        "select relay.emit('appointments', null, '{\"id\": \"forged\"}', null, null)",
        "select relay.stage('appointments', gen_random_uuid(), null, '{}')",
    ] {
        let err = db
            .client
            .batch_execute(&format!(
                "begin; set local role authenticated; {call}; commit;"
            ))
            .await
            .expect_err(call);
        db.exec("rollback").await;
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{call}: {err}"
        );
    }
    let events: i64 = db
        .client
        .query_one("select count(*) from relay.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 0);
}

/// A changed primary key is a DELETE of the old row and an INSERT of the new one; a plain update,
/// an insert and a delete in the same transaction are staged by the trigger itself, not by the
/// helper the key change uses, and come out the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_primary_key_is_a_delete_and_an_insert() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let (moved, updated, deleted) = (
        db.book(&patient, &dentist, "").await,
        db.book(&patient, &dentist, "").await,
        db.book(&patient, &dentist, "").await,
    );
    common::settle(&db, relay.local_addr()).await;
    let mut ws = Ws::subscribed(relay.local_addr(), dentist, &["appointments"]).await;
    let new_id = Uuid::new_v4();
    db.exec(&format!(
        "begin;
         update appointments set id = '{new_id}' where id = '{moved}';
         update appointments set status = 'confirmed' where id = '{updated}';
         delete from appointments where id = '{deleted}';
         commit;"
    ))
    .await;
    let fence = db.fence().await;
    let events = ws.events_until(fence).await;
    assert_eq!(
        ops(&events),
        vec![
            ("DELETE".to_string(), moved.to_string()),
            ("INSERT".to_string(), new_id.to_string()),
            ("UPDATE".to_string(), updated.to_string()),
            ("DELETE".to_string(), deleted.to_string()),
        ]
    );
    assert_eq!(events[2]["row"]["status"], "confirmed");
    relay.shutdown().await;
}

/// The event log accepts only the three operations, whoever writes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_log_refuses_an_unknown_operation() {
    let db = common::TestDb::new().await;
    let err = db
        .client
        .batch_execute("insert into relay.events (table_name, op) values ('appointments', 'MERGE')")
        .await
        .expect_err("an unknown operation must be refused");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_is_a_delete_of_every_row() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let first = db.book(&patient, &dentist, "").await;
    let second = db.book(&patient, &dentist, "").await;
    common::settle(&db, relay.local_addr()).await;
    let mut ws = Ws::subscribed(relay.local_addr(), dentist, &["appointments"]).await;
    // A row staged before the TRUNCATE in the same transaction is born and gone: no event.
    db.exec(&format!(
        "begin;
         insert into appointments (patient_id, dentist_id, starts_at, ends_at)
         values ('{}', '{}', now(), now() + interval '1 hour');
         truncate appointments cascade;
         commit;",
        patient.user_id, dentist.user_id
    ))
    .await;
    let fence = db.fence().await;
    let mut deleted: Vec<(String, String)> = ops(&ws.events_until(fence).await);
    deleted.sort();
    let mut expected = vec![
        ("DELETE".to_string(), first.to_string()),
        ("DELETE".to_string(), second.to_string()),
    ];
    expected.sort();
    assert_eq!(deleted, expected);
    relay.shutdown().await;
}

/// A TRUNCATE that removes nothing stages nothing: the transaction's other changes are published,
/// whether the TRUNCATE came first in it or with other tables in one statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncating_an_empty_table_keeps_the_transactions_other_changes() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut ws = Ws::subscribed(relay.local_addr(), dentist, &["appointments"]).await;
    db.exec(&format!(
        "begin;
         truncate availability;
         insert into appointments (id, patient_id, dentist_id, starts_at, ends_at)
         values ('00000000-0000-4000-8000-00000000a001', '{}', '{}', now(), now() + interval '1 hour');
         commit;",
        patient.user_id, dentist.user_id
    ))
    .await;
    let fence = db.fence().await;
    assert_eq!(
        ops(&ws.events_until(fence).await),
        [(
            "INSERT".into(),
            "00000000-0000-4000-8000-00000000a001".into()
        )]
    );
    // An empty table first, then one with a row, in one statement. (The first statement empties
    // availability of the fence.)
    db.exec("truncate availability").await;
    db.exec("truncate availability, appointments cascade").await;
    let fence_after = db.fence().await;
    assert_eq!(
        ops(&ws.events_until(fence_after).await),
        [
            ("DELETE".into(), fence.to_string()),
            (
                "DELETE".into(),
                "00000000-0000-4000-8000-00000000a001".into()
            )
        ]
    );
    let left: i64 = db
        .client
        .query_one("select count(*) from relay.pending", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "nothing staged outlives its transaction");
    relay.shutdown().await;
}

/// Under REPEATABLE READ or SERIALIZABLE, the rows a TRUNCATE removes cannot all be listed (the
/// snapshot predates rows it removes too), so it is refused; under READ COMMITTED it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_outside_read_committed_is_refused_with_a_clear_error() {
    let db = common::TestDb::new().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    db.book(&patient, &dentist, "").await;
    for level in ["repeatable read", "serializable"] {
        db.exec(&format!("begin isolation level {level}")).await;
        let err = db
            .client
            .batch_execute("truncate appointments cascade")
            .await
            .expect_err("TRUNCATE must be refused under this level");
        db.exec("rollback").await;
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
            "{level}: {err}"
        );
        let message = err.as_db_error().unwrap().message();
        assert!(
            message.contains("TRUNCATE") && message.contains(&level.to_uppercase()),
            "{message}"
        );
    }
    async fn count(db: &common::TestDb) -> i64 {
        db.client
            .query_one("select count(*) from appointments", &[])
            .await
            .unwrap()
            .get(0)
    }
    assert_eq!(count(&db).await, 1, "the refused TRUNCATEs removed nothing");
    db.exec("begin isolation level read committed; truncate appointments cascade; commit")
        .await;
    assert_eq!(count(&db).await, 0);
}

/// `SET CONSTRAINTS ALL IMMEDIATE` publishes early; any later change to a watched table is refused,
/// whether the transaction had staged one change before it (the common path) or several, and
/// whatever the later change is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_after_an_early_publish_is_refused_with_a_clear_error() {
    let db = common::TestDb::new().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let id = db.book(&patient, &dentist, "").await;
    let other = db.book(&patient, &dentist, "").await;
    let before = [
        format!("update appointments set status = 'confirmed' where id = '{id}'"),
        format!(
            "update appointments set status = 'confirmed' where id = '{id}';
             update appointments set notes = 'both' where id = '{other}'"
        ),
    ];
    let after = [
        format!("update appointments set status = 'cancelled' where id = '{id}'"),
        format!("delete from appointments where id = '{other}'"),
        format!(
            "insert into appointments (patient_id, dentist_id, starts_at, ends_at)
             values ('{}', '{}', now(), now() + interval '1 hour')",
            patient.user_id, dentist.user_id
        ),
        format!("update appointments set id = gen_random_uuid() where id = '{other}'"),
        "truncate appointments cascade".to_string(),
    ];
    for first in &before {
        for then in &after {
            let err = db
                .client
                .batch_execute(&format!(
                    "begin; {first}; set constraints all immediate; {then}; commit;"
                ))
                .await
                .expect_err("the change after the early publish must be refused");
            db.exec("rollback").await;
            let message = err
                .as_db_error()
                .map(|e| e.message().to_string())
                .unwrap_or_default();
            assert!(
                message.contains("changed after this transaction's changes were published"),
                "{first}; {then}: {message}"
            );
        }
    }
    let rows = db
        .client
        .query(
            "select status, notes from appointments where id = any($1) order by id = $2",
            &[&vec![id, other], &id],
        )
        .await
        .unwrap();
    let rows: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        rows,
        [
            ("booked".to_string(), String::new()),
            ("booked".to_string(), String::new())
        ],
        "the refused transactions changed nothing"
    );
}

/// The clinic's tables refuse an unknown status or kind, naming the constraint, whatever the
/// writer's `search_path`: an `=` of the writer's own that lets everything through changes nothing.
/// Every allowed value is still accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_status_and_kind_are_refused_whatever_the_search_path() {
    let db = common::TestDb::new().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let id = db.book(&patient, &dentist, "").await;
    let session = db.open_session(&patient, &dentist).await;
    db.exec(
        "create schema lenient;
         create function lenient.always(text, text) returns boolean language sql immutable return true;
         create operator lenient.= (function = lenient.always, leftarg = text, rightarg = text);",
    )
    .await;
    let refused = [
        (
            format!("update appointments set status = 'lost' where id = '{id}'"),
            "appointments_status_check",
        ),
        (
            format!("update appointments set kind = 'telepathy' where id = '{id}'"),
            "appointments_kind_check",
        ),
        (
            format!(
                "insert into appointments (patient_id, dentist_id, starts_at, ends_at, status)
                 values ('{}', '{}', now(), now() + interval '1 hour', 'lost')",
                patient.user_id, dentist.user_id
            ),
            "appointments_status_check",
        ),
        (
            format!("update consultation_sessions set status = 'paused' where id = '{session}'"),
            "consultation_sessions_status_check",
        ),
    ];
    for search_path in ["public", "lenient, pg_catalog, public"] {
        for (sql, constraint) in &refused {
            let err = db
                .client
                .batch_execute(&format!("set search_path = {search_path}; {sql}"))
                .await
                .expect_err(sql);
            let err = err.as_db_error().expect("a database error");
            assert_eq!(
                err.code(),
                &tokio_postgres::error::SqlState::CHECK_VIOLATION,
                "{search_path}: {sql}"
            );
            assert_eq!(err.constraint(), Some(*constraint), "{search_path}: {sql}");
        }
    }
    db.exec("reset search_path").await;
    for status in ["booked", "confirmed", "cancelled", "completed"] {
        db.exec(&format!(
            "update appointments set status = '{status}' where id = '{id}'"
        ))
        .await;
    }
    for kind in ["in_person", "video", "audio", "chat"] {
        db.exec(&format!(
            "update appointments set kind = '{kind}' where id = '{id}'"
        ))
        .await;
    }
    for status in ["waiting", "active", "ended"] {
        db.exec(&format!(
            "update consultation_sessions set status = '{status}' where id = '{session}'"
        ))
        .await;
    }
}
