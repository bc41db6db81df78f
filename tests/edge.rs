//! The relay's edges: tokens, malformed frames, the HTTP API, migrations, slow consumers,
//! shutdown and a lost LISTEN connection. Real Postgres, real sockets, real tokens.

mod common;

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{http_get, Ws};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use uuid::Uuid;

use relay::authz::Role;

fn sign(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// `{"alg":"none"}` over `{"sub":"00000000-0000-0000-0000-000000000001","role":"admin",
/// "exp":9999999999}`, unsigned: valid claims, no signature.
const ALG_NONE: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIwMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDEiLCJyb2xlIjoiYWRtaW4iLCJleHAiOjk5OTk5OTk5OTl9.";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Attempts an upgrade; returns the HTTP status and JSON body of the refusal.
async fn refused(
    addr: std::net::SocketAddr,
    authorization: Option<String>,
    query: &str,
) -> (u16, Value) {
    let mut request = format!("ws://{addr}/ws{query}")
        .into_client_request()
        .unwrap();
    if let Some(value) = authorization {
        request
            .headers_mut()
            .insert("authorization", value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Err(WsError::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            (
                response.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            )
        }
        Ok(_) => panic!("the upgrade was accepted"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_401_with_a_json_reason_and_no_upgrade() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let sub = Uuid::new_v4();
    let good = |claims: Value| sign(claims, common::SECRET);
    let cases: Vec<(Option<String>, String, &str)> = vec![
        (None, String::new(), "missing_token"),
        (
            Some("Bearer not-a-jwt".into()),
            String::new(),
            "invalid_token",
        ),
        (
            Some("Basic dXNlcjpwYXNz".into()),
            String::new(),
            "invalid_token",
        ),
        (None, "?access_token=garbage".into(), "invalid_token"),
        (
            Some(format!(
                "Bearer {}",
                sign(
                    json!({"sub": sub, "role": "admin", "exp": now() + 60}),
                    "another-secret-of-sufficient-length!!"
                )
            )),
            String::new(),
            "invalid_signature",
        ),
        (
            Some(format!(
                "Bearer {}",
                good(json!({"sub": sub, "role": "admin", "exp": now() - 3600}))
            )),
            String::new(),
            "token_expired",
        ),
        (
            None,
            format!(
                "?access_token={}",
                good(json!({"sub": sub, "role": "superuser", "exp": now() + 60}))
            ),
            "invalid_token",
        ),
        (
            Some(format!(
                "Bearer {}",
                good(json!({"sub": "not-a-uuid", "role": "admin", "exp": now() + 60}))
            )),
            String::new(),
            "invalid_token",
        ),
        (
            Some(format!(
                "Bearer {}",
                good(json!({"sub": sub, "role": "admin"}))
            )),
            String::new(),
            "invalid_token",
        ),
        (
            Some(format!(
                "Bearer {}",
                good(json!({"sub": sub, "role": "admin", "exp": now() + 600, "nbf": now() + 300}))
            )),
            String::new(),
            "token_not_yet_valid",
        ),
        (
            // alg "none", unsigned.
            Some(format!("Bearer {ALG_NONE}")),
            String::new(),
            "invalid_token",
        ),
        (
            // The right secret, the wrong algorithm.
            Some(format!(
                "Bearer {}",
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS512),
                    &json!({"sub": sub, "role": "admin", "exp": now() + 60}),
                    &EncodingKey::from_secret(common::SECRET.as_bytes()),
                )
                .unwrap()
            )),
            String::new(),
            "invalid_token",
        ),
    ];
    for (header, query, code) in cases {
        let (status, body) = refused(addr, header.clone(), &query).await;
        assert_eq!(status, 401, "{header:?} {query}");
        assert_eq!(body["error"], code, "{header:?} {query}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        // The token never comes back in the message.
        if let Some(token) = header.as_deref().and_then(|h| h.split(' ').nth(1)) {
            assert!(!body.to_string().contains(token));
        }
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_the_socket_survives() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let dentist = db.user(Role::Dentist).await;
    let mut ws = Ws::connect(relay.local_addr(), dentist).await;

    let bad: Vec<(Message, &str, Option<&str>)> = vec![
        (Message::text("not json"), "bad_request", None),
        (Message::text("[1,2,3]"), "bad_request", None),
        (
            Message::binary(vec![0u8, 159, 146, 150]),
            "bad_request",
            None,
        ),
        (Message::text(r#"{"ref":"1"}"#), "bad_request", Some("1")),
        (
            Message::text(r#"{"ref":"2","type":"explode"}"#),
            "bad_request",
            Some("2"),
        ),
        (
            Message::text(r#"{"ref":"3","type":"subscribe"}"#),
            "bad_request",
            Some("3"),
        ),
        (
            Message::text(r#"{"ref":"4","type":"subscribe","feed":"profiles"}"#),
            "unknown_feed",
            Some("4"),
        ),
        (
            Message::text(
                r#"{"ref":"5","type":"subscribe","feed":"appointments","filter":{"session_id":"x"}}"#,
            ),
            "bad_request",
            Some("5"),
        ),
        (
            Message::text(r#"{"ref":"6","type":"unsubscribe","feed":"nope"}"#),
            "unknown_feed",
            Some("6"),
        ),
    ];
    for (message, code, reference) in bad {
        ws.send_raw(message.clone()).await;
        let reply = ws.recv().await;
        assert_eq!(reply["type"], "error", "{message:?}");
        assert_eq!(reply["code"], code, "{message:?}: {reply}");
        assert_eq!(reply["ref"].as_str(), reference, "{message:?}");
    }
    // Still open and working.
    ws.send(json!({"type": "ping", "ref": "p"})).await;
    assert_eq!(ws.recv().await, json!({"type": "pong", "ref": "p"}));
    ws.subscribe("appointments").await;
    ws.subscribe("availability").await;
    let patient = db.user(Role::Patient).await;
    db.book(&patient, &dentist, "after the noise").await;
    let fence = db.fence().await;
    assert_eq!(ws.events_until(fence).await.len(), 1);
    // Unsubscribing stops the feed and is acknowledged.
    ws.send(json!({"type": "unsubscribe", "ref": "u", "feed": "appointments"}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "unsubscribed", "ref": "u", "feed": "appointments"})
    );
    db.book(&patient, &dentist, "unseen").await;
    let fence = db.fence().await;
    assert!(ws.events_until(fence).await.is_empty());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_size_limit_closes_only_that_socket() {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.limits.max_frame_bytes = 1024;
    let relay = common::start_with(config).await;
    let (big, fine) = (db.user(Role::Admin).await, db.user(Role::Admin).await);
    let mut offender = Ws::connect(relay.local_addr(), big).await;
    let mut bystander = Ws::subscribed(relay.local_addr(), fine, &[]).await;
    offender
        .send(json!({"type": "ping", "ref": "x".repeat(4096)}))
        .await;
    // The offender is closed with 1009 (message too big); the bystander is untouched.
    match offender.next_message().await {
        Some(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected close 1009, got {other:?}"),
    }
    let fence = db.fence().await;
    assert!(bystander.events_until(fence).await.is_empty());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_status_and_stats() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let (admin, dentist) = (db.user(Role::Admin).await, db.user(Role::Dentist).await);
    let mut ws = Ws::subscribed(addr, dentist, &["appointments"]).await;

    let (status, health) = http_get(addr, "/api/realtime/health", None).await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["service"], "realtime-relay");
    assert_eq!(health["activeSubscriptions"], 2);
    assert!(health["timestamp"]
        .as_str()
        .is_some_and(|t| t.contains('T')));

    let (status, mine) =
        http_get(addr, "/api/realtime/status", Some(&common::token(&dentist))).await;
    assert_eq!(status, 200);
    assert_eq!(mine["userId"], json!(dentist.user_id));
    assert_eq!(mine["role"], "dentist");
    let feeds: Vec<&str> = mine["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["feed"].as_str().unwrap())
        .collect();
    assert_eq!(feeds, ["appointments", "availability"]);
    let (status, body) = http_get(addr, "/api/realtime/status", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("missing_token"))
    );
    // The HTTP API reads the header only, and says so.
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("Authorization") && !message.contains("access_token"),
        "{message}"
    );

    let patient = db.user(Role::Patient).await;
    db.book(&patient, &dentist, "").await;
    let fence = db.fence().await;
    ws.events_until(fence).await;

    // An event's deliveries are counted once all its frames are handed over, which can be just
    // after this client has read the last one: wait for the count rather than race it.
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    let stats = loop {
        let (status, stats) =
            http_get(addr, "/api/realtime/stats", Some(&common::token(&admin))).await;
        assert_eq!(status, 200);
        if stats["messagesDelivered"] == 2 || tokio::time::Instant::now() > deadline {
            break stats;
        }
    };
    assert_eq!(stats["connectedSockets"], 1);
    assert_eq!(stats["subscriptionsByFeed"]["appointments"]["dentist"], 1);
    assert_eq!(stats["eventsReceived"], 2);
    assert_eq!(stats["messagesDelivered"], 2);
    let (status, body) =
        http_get(addr, "/api/realtime/stats", Some(&common::token(&dentist))).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));

    let (status, body) = http_get(addr, "/nowhere", None).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_changes_nothing() {
    let db = common::TestDb::new().await;
    let (mut client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let applied = relay::migrate::migrate(&mut client).await.unwrap();
    assert!(applied.is_empty(), "second run applied {applied:?}");
    let recorded: i64 = client
        .query_one("select count(*) from relay.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded as usize, relay::migrate::MIGRATIONS.len());
    // An edited migration is reported, not silently skipped.
    client
        .execute("update relay.schema_migrations set checksum = 'tampered' where name = 'sql/001_schema.sql'", &[])
        .await
        .unwrap();
    let err = relay::migrate::migrate(&mut client).await.unwrap_err();
    assert!(
        err.to_string().contains("sql/001_schema.sql was changed"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_matches_the_documented_policies() {
    let db = common::TestDb::new().await;
    let (patient, dentist, other) = (
        db.user(Role::Patient).await,
        db.user(Role::Dentist).await,
        db.user(Role::Dentist).await,
    );
    db.book(&patient, &dentist, "secret").await;
    db.book(&patient, &other, "other").await;
    let visible = |who: relay::authz::Principal, table: &'static str| {
        let client = &db.client;
        async move {
            client.batch_execute("begin").await.unwrap();
            common::act_as(client, &who).await.unwrap();
            let n: i64 = client
                .query_one(&format!("select count(*) from {table}"), &[])
                .await
                .unwrap()
                .get(0);
            client.batch_execute("commit").await.unwrap();
            n
        }
    };
    assert_eq!(visible(dentist, "appointments").await, 1);
    assert_eq!(visible(patient, "appointments").await, 2);
    let bot = db.user(Role::Chatbot).await;
    assert_eq!(visible(bot, "appointments").await, 2);
    assert_eq!(visible(bot, "appointment_slots").await, 2);
    assert_eq!(visible(bot, "consultation_sessions").await, 0);
    let admin = db.user(Role::Admin).await;
    assert_eq!(visible(admin, "appointments").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_and_others_are_not() {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.socket_queue = 256;
    let relay = common::start_with(config).await;
    let (slow_admin, fast_admin) = (db.user(Role::Admin).await, db.user(Role::Admin).await);
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut slow = Ws::subscribed(relay.local_addr(), slow_admin, &["appointments"]).await;
    let mut fast = Ws::subscribed(relay.local_addr(), fast_admin, &["appointments"]).await;

    // Batches of 100 events of ~7 KB each, until the slow client's queue overflows. The fast
    // client reads each batch in full before the next is written.
    let notes = "n".repeat(7000);
    let mut batches = 0;
    while relay
        .hub()
        .counters()
        .slow_consumers_cut
        .load(Ordering::Relaxed)
        == 0
    {
        batches += 1;
        assert!(batches <= 400, "the slow client was never cut");
        db.client
            .execute(
                "insert into appointments (patient_id, dentist_id, starts_at, ends_at, notes)
                 select $1, $2, now(), now() + interval '1 hour', $3 from generate_series(1, 100)",
                &[&patient.user_id, &dentist.user_id, &notes],
            )
            .await
            .unwrap();
        for _ in 0..100 {
            assert_eq!(fast.recv().await["feed"], "appointments");
        }
    }
    // The slow client, reading now, gets what was queued and then close code 4008.
    let close = loop {
        match slow.next_message().await {
            Some(Message::Text(_)) => continue,
            Some(Message::Close(frame)) => break frame,
            other => panic!("expected frames then a close, got {other:?}"),
        }
    };
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), relay::protocol::close::SLOW_CONSUMER);
    // The fast client is unaffected.
    let fence = db.fence().await;
    assert!(fast.events_until(fence).await.is_empty());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_socket_with_going_away() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let who = db.user(Role::Patient).await;
    let mut ws = Ws::subscribed(relay.local_addr(), who, &["appointments"]).await;
    relay.shutdown().await;
    match ws.next_message().await {
        Some(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected close 1001, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listen_connection_comes_back_after_being_killed() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut ws = Ws::subscribed(relay.local_addr(), dentist, &["appointments"]).await;
    let before = common::listen_reconnects(&relay);
    assert_eq!(common::kill_listen(&db.client).await, 1);
    common::wait_for_reconnect(&relay, before).await;
    let (status, body) = http_get(relay.local_addr(), "/api/realtime/health", None).await;
    // It may already be back; if not, health says so.
    assert!(
        status == 503 && body["status"] == "unhealthy" || status == 200,
        "{status} {body}"
    );
    common::wait_until_listening(&relay).await;
    let id = db.book(&patient, &dentist, "after the reconnect").await;
    let fence = db.fence().await;
    let events = ws.events_until(fence).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["row"]["id"], json!(id));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_notification_is_skipped_and_the_feed_goes_on() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let admin = db.user(Role::Admin).await;
    let mut ws = Ws::subscribed(relay.local_addr(), admin, &["appointments"]).await;
    db.exec("select pg_notify('relay_events', 'this is not an event')")
        .await;
    db.exec(r#"select pg_notify('relay_events', '{"id": 1, "table": "profiles", "op": "INSERT", "at": "t", "new": {}}')"#)
        .await;
    let fence = db.fence().await;
    assert!(ws.events_until(fence).await.is_empty());
    assert_eq!(
        relay
            .hub()
            .counters()
            .events_malformed
            .load(Ordering::Relaxed),
        2
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_closes_when_its_token_expires() {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.tokens.leeway = std::time::Duration::ZERO;
    let relay = common::start_with(config).await;
    let who = db.user(Role::Dentist).await;
    // Enough for the upgrade and the subscribe to be answered before it expires, even on a
    // loaded machine.
    let exp = now() + 10;
    let token = sign(
        json!({"sub": who.user_id, "role": "dentist", "exp": exp}),
        common::SECRET,
    );
    let url = format!("ws://{}/ws?access_token={token}", relay.local_addr());
    let (stream, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");
    let mut ws = Ws { stream, who };
    ws.subscribe("appointments").await;
    match ws.next_message().await {
        Some(Message::Close(Some(frame))) => {
            assert_eq!(u16::from(frame.code), relay::protocol::close::TOKEN_EXPIRED);
            assert!(now() >= exp, "closed before the token expired");
        }
        other => panic!("expected close 4001, got {other:?}"),
    }
    relay.shutdown().await;
}
