//! Hostile and careless clients: token refresh done right and wrong, public-key tokens, every
//! limit, cross-site origins, floods, garbage frames and notifications, malformed log rows, and
//! tokens kept out of the logs. Each test checks that the offender gets a clear error or close
//! code, and that nobody else notices.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use uuid::Uuid;

use common::{http_get, seed, Rng, Ws, PATIENCE};
use relay::authz::{Principal, Role};
use relay::protocol::close;
use relay::token::{KeySource, TokenConfig};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(who: &Principal, exp: u64) -> Value {
    json!({"sub": who.user_id, "role": who.role.as_str(), "exp": exp})
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        claims,
        &EncodingKey::from_secret(common::SECRET.as_bytes()),
    )
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/keys")
        .join(name)
}

fn private_key(name: &str) -> EncodingKey {
    let pem = std::fs::read(fixture(name)).unwrap();
    if name.starts_with("es") {
        EncodingKey::from_ec_pem(&pem).unwrap()
    } else {
        EncodingKey::from_rsa_pem(&pem).unwrap()
    }
}

/// Opens a socket with `token` in the query string and, if given, an `Origin` header; on
/// refusal, the HTTP status and JSON body.
async fn open(
    addr: SocketAddr,
    who: Principal,
    token: &str,
    origin: Option<&str>,
) -> Result<Ws, (u16, Value)> {
    let mut request = format!("ws://{addr}/ws?access_token={token}")
        .into_client_request()
        .unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((stream, _)) => Ok(Ws { stream, who }),
        Err(WsError::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            Err((
                response.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ))
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Reads frames until the socket closes; returns the close code. Other frames must be replies
/// (pongs, errors) or events.
async fn closed_with(ws: &mut Ws) -> u16 {
    loop {
        match ws.next_message().await {
            Some(Message::Close(Some(frame))) => return u16::from(frame.code),
            Some(Message::Text(_) | Message::Ping(_) | Message::Pong(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

async fn auth(ws: &mut Ws, reference: &str, token: &str) -> Value {
    ws.send(json!({"type": "auth", "ref": reference, "access_token": token}))
        .await;
    ws.recv().await
}

/// Sends a ping and expects its pong: the socket is open and answering.
async fn answers(ws: &mut Ws) {
    let reference = Uuid::new_v4().to_string();
    ws.send(json!({"type": "ping", "ref": reference})).await;
    assert_eq!(ws.recv().await, json!({"type": "pong", "ref": reference}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_keeps_the_socket_open_past_the_first_expiry() {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.tokens.leeway = Duration::ZERO;
    let relay = common::start_with(config).await;
    let addr = relay.local_addr();
    let dentist = db.user(Role::Dentist).await;
    let patient = db.user(Role::Patient).await;
    // Margins wide enough for a loaded machine: the upgrades, subscriptions and refresh happen
    // before the first expiry, and the delivery after it before the second.
    let first_exp = now() + 10;
    let first = hs256(&claims(&dentist, first_exp));
    let mut ws = open(addr, dentist, &first, None).await.expect("upgrade");
    ws.subscribe("appointments").await;
    ws.subscribe("availability").await;
    // A socket whose refresh is refused keeps its first token, and expires with it.
    let mut stale = open(addr, dentist, &first, None).await.expect("upgrade");
    let reply = auth(&mut stale, "bad", "not-a-token").await;
    assert_eq!(reply["code"], "invalid_token", "{reply}");

    let second_exp = first_exp + 8;
    let reply = auth(&mut ws, "r1", &hs256(&claims(&dentist, second_exp))).await;
    assert_eq!(reply["type"], "authenticated", "{reply}");
    assert_eq!(reply["ref"], "r1");
    let expected = relay::rfc3339(UNIX_EPOCH + Duration::from_secs(second_exp));
    assert_eq!(reply["expires_at"], json!(expected));

    assert_eq!(closed_with(&mut stale).await, close::TOKEN_EXPIRED);
    // Past the first token's expiry (the stale socket saw it) the refreshed socket delivers.
    assert!(now() >= first_exp);
    let booked = db.book(&patient, &dentist, "after the first expiry").await;
    let fence = db.fence().await;
    let events = ws.events_until(fence).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["row"]["id"], json!(booked));

    // The second token expires too, and then the socket closes.
    assert_eq!(closed_with(&mut ws).await, close::TOKEN_EXPIRED);
    assert!(now() >= second_exp);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_keeps_the_old_token_and_another_identity_closes_the_socket() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let dentist = db.user(Role::Dentist).await;
    let mut ws = Ws::connect(addr, dentist).await;
    let later = now() + 600;

    let other_secret = EncodingKey::from_secret(b"another-secret-of-sufficient-length!!");
    let refused = [
        ("garbage".to_string(), "invalid_token"),
        // Empty is malformed, as over HTTP.
        (String::new(), "invalid_token"),
        (hs256(&claims(&dentist, now() - 3600)), "token_expired"),
        (
            sign(
                Algorithm::HS256,
                None,
                &claims(&dentist, later),
                &other_secret,
            ),
            "invalid_signature",
        ),
        (
            hs256(&json!({"sub": dentist.user_id, "role": "dentist", "exp": later, "nbf": later})),
            "token_not_yet_valid",
        ),
    ];
    for (token, code) in refused {
        let reply = auth(&mut ws, "bad", &token).await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], code, "{reply}");
        assert_eq!(reply["ref"], "bad");
        assert!(
            token.is_empty() || !reply.to_string().contains(&token),
            "the token is echoed"
        );
        answers(&mut ws).await;
    }

    // The same user as a patient, and another dentist: both close the socket.
    let as_patient = Principal {
        user_id: dentist.user_id,
        role: Role::Patient,
    };
    let someone_else = db.user(Role::Dentist).await;
    for other in [as_patient, someone_else] {
        let mut ws = Ws::connect(addr, dentist).await;
        ws.subscribe("appointments").await;
        let reply = auth(&mut ws, "who", &common::token(&other)).await;
        assert_eq!(reply["code"], "identity_changed", "{reply}");
        assert_eq!(closed_with(&mut ws).await, close::IDENTITY_CHANGED);
    }
    relay.shutdown().await;
}

/// A JWKS file with the RS256 fixture key under `kid`, in a fresh temporary directory.
fn jwks_file(kid: &str) -> PathBuf {
    let mut jwk =
        Jwk::from_encoding_key(&private_key("rs256-private.pem"), Algorithm::RS256).expect("jwk");
    jwk.common.key_id = Some(kid.to_string());
    let dir = std::env::temp_dir().join(format!("relay-test-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    std::fs::write(&path, json!({"keys": [jwk]}).to_string()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_tokens_from_a_jwks_file_or_a_pem_file() {
    let db = common::TestDb::new().await;
    let dentist = db.user(Role::Dentist).await;
    let patient = db.user(Role::Patient).await;
    let valid = claims(&dentist, now() + 600);

    let mut config = db.config();
    config.tokens = TokenConfig {
        algorithm: "RS256".parse().unwrap(),
        key: KeySource::JwksFile(jwks_file("k1")),
        ..config.tokens
    };
    let rs_relay = common::start_with(config.clone()).await;
    let rs_addr = rs_relay.local_addr();
    let rs_token = sign(
        Algorithm::RS256,
        Some("k1"),
        &valid,
        &private_key("rs256-private.pem"),
    );
    let mut ws = open(rs_addr, dentist, &rs_token, None)
        .await
        .expect("an RS256 token with a known kid");
    ws.subscribe("appointments").await;
    ws.subscribe("availability").await;
    let booked = db.book(&patient, &dentist, "rs256").await;
    let fence = db.fence().await;
    let events = ws.events_until(fence).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["row"]["id"], json!(booked));

    let public_pem = std::fs::read(fixture("rs256-public.pem")).unwrap();
    let refused = [
        // HS256 with the public key as its secret: the algorithm confusion attack.
        (
            sign(
                Algorithm::HS256,
                Some("k1"),
                &valid,
                &EncodingKey::from_secret(&public_pem),
            ),
            "invalid_token",
        ),
        (hs256(&valid), "invalid_token"),
        (
            sign(
                Algorithm::RS256,
                Some("k1"),
                &valid,
                &private_key("rs256-other-private.pem"),
            ),
            "invalid_signature",
        ),
        (
            sign(
                Algorithm::RS256,
                Some("k2"),
                &valid,
                &private_key("rs256-private.pem"),
            ),
            "invalid_token",
        ),
    ];
    for (token, code) in refused {
        let (status, body) = open(rs_addr, dentist, &token, None)
            .await
            .err()
            .expect("refused");
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some(code)),
            "{body}"
        );
    }
    rs_relay.shutdown().await;

    config.tokens = TokenConfig {
        algorithm: "ES256".parse().unwrap(),
        key: KeySource::PublicKeyFile(fixture("es256-public.pem")),
        ..config.tokens
    };
    let es_relay = common::start_with(config).await;
    let es_token = sign(
        Algorithm::ES256,
        None,
        &valid,
        &private_key("es256-private.pem"),
    );
    let mut ws = open(es_relay.local_addr(), dentist, &es_token, None)
        .await
        .expect("an ES256 token");
    answers(&mut ws).await;
    let (status, body) = open(es_relay.local_addr(), dentist, &rs_token, None)
        .await
        .err()
        .expect("RS256 refused by an ES256 relay");
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
    es_relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_answers_with_its_own_code() {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.limits.max_subscriptions_per_socket = 2;
    config.limits.max_sockets_per_user = 2;
    config.limits.max_sockets = 3;
    let relay = common::start_with(config).await;
    let addr = relay.local_addr();
    let dentist = db.user(Role::Dentist).await;

    let mut first = Ws::connect(addr, dentist).await;
    first.subscribe("appointments").await;
    first.subscribe("availability").await;
    first
        .send(json!({"type": "subscribe", "ref": "3", "feed": "consultation_sessions"}))
        .await;
    let reply = first.recv().await;
    assert_eq!(reply["code"], "too_many_subscriptions", "{reply}");
    assert_eq!(reply["ref"], "3");
    // Subscribing again to a feed it holds replaces the subscription; it adds none.
    first.subscribe("appointments").await;
    first
        .send(json!({"type": "unsubscribe", "ref": "u", "feed": "availability"}))
        .await;
    assert_eq!(first.recv().await["type"], "unsubscribed");
    first.subscribe("consultation_sessions").await;

    let second = Ws::connect(addr, dentist).await;
    let token = common::token(&dentist);
    let (status, body) = open(addr, dentist, &token, None)
        .await
        .err()
        .expect("third");
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_sockets")),
        "{body}"
    );

    let patient = db.user(Role::Patient).await;
    let _third = Ws::connect(addr, patient).await;
    let another = db.user(Role::Patient).await;
    let (status, body) = open(addr, another, &common::token(&another), None)
        .await
        .err()
        .expect("fourth");
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("relay_full")),
        "{body}"
    );

    // A closed socket frees its place.
    drop(second);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match open(addr, dentist, &token, None).await {
            Ok(mut ws) => {
                answers(&mut ws).await;
                break;
            }
            // Until the relay has let go of the closed socket, it counts against both limits.
            Err((429 | 503, _)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(refusal) => panic!("the closed socket's place was never freed: {refusal:?}"),
        }
    }
    answers(&mut first).await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_socket_is_closed_and_the_others_are_not() {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.limits.max_frames_per_second = 20;
    let relay = common::start_with(config).await;
    let addr = relay.local_addr();
    let admin = db.user(Role::Admin).await;
    let mut bystander = Ws::subscribed(addr, admin, &["appointments"]).await;

    let flooder = db.user(Role::Patient).await;
    let mut flood = Ws::connect(addr, flooder).await;
    for i in 0..200 {
        let ping = json!({"type": "ping", "ref": i.to_string()}).to_string();
        if flood.stream.send(Message::text(ping)).await.is_err() {
            break; // Closed already.
        }
    }
    assert_eq!(closed_with(&mut flood).await, close::RATE_LIMITED);

    let dentist = db.user(Role::Dentist).await;
    let booked = db.book(&flooder, &dentist, "after the flood").await;
    let fence = db.fence().await;
    let events = bystander.events_until(fence).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["row"]["id"], json!(booked));
    relay.shutdown().await;
}

/// A client frame, masked (with a zero mask, which leaves the payload as it is).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(payload);
    frame
}

/// A socket closed for input the WebSocket layer cannot read (a frame over the size limit: 1009)
/// has the rest of that input discarded until the client closes. The connection then ends in an
/// orderly way; closed with the input unread, it would be reset, which can lose the close frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_closed_for_unreadable_input_ends_in_order_not_with_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.limits.max_frame_bytes = 1024;
    let relay = common::start_with(config).await;
    let admin = db.user(Role::Admin).await;
    let mut tcp = tokio::net::TcpStream::connect(relay.local_addr())
        .await
        .unwrap();
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {}\r\n\r\n",
        common::token(&admin)
    );
    tcp.write_all(upgrade.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 65536];
    async fn read(tcp: &mut tokio::net::TcpStream, buffer: &mut [u8]) -> std::io::Result<usize> {
        tokio::time::timeout(PATIENCE, tcp.read(buffer))
            .await
            .expect("the relay answers")
    }
    let head_end = loop {
        let n = read(&mut tcp, &mut buffer).await.unwrap();
        assert!(n > 0, "the relay closed during the upgrade");
        received.extend_from_slice(&buffer[..n]);
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    assert!(
        received.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&received)
    );
    received.drain(..head_end);

    // 200 KB in one frame: refused from its header, the payload left unread.
    tcp.write_all(&client_frame(0x1, &vec![b'a'; 200_000]))
        .await
        .expect("the relay takes in the whole frame");
    // The close frame, unmasked from the relay: 0x88, a length under 126, the code.
    while received.len() < 4 || received.len() < 2 + usize::from(received[1]) {
        let n = read(&mut tcp, &mut buffer).await.unwrap();
        assert!(n > 0, "the relay closed without a close frame");
        received.extend_from_slice(&buffer[..n]);
    }
    assert_eq!(received[0], 0x88, "a close frame: {received:?}");
    assert_eq!(u16::from_be_bytes([received[2], received[3]]), 1009);

    // The client answers the close and ends its side; the relay then ends the connection in
    // order: end of stream, not a reset.
    tcp.write_all(&client_frame(0x8, &1009u16.to_be_bytes()))
        .await
        .unwrap();
    tcp.shutdown().await.unwrap();
    match read(&mut tcp, &mut buffer).await {
        Ok(0) => {}
        Ok(n) => panic!("{n} more bytes after the close frame"),
        Err(e) => panic!("the connection ended with {e} instead of in order"),
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_outside_the_allowlist_are_refused() {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.limits.allowed_origins = vec!["https://dash.example.com".into()];
    let relay = common::start_with(config).await;
    let addr = relay.local_addr();
    let who = db.user(Role::Patient).await;
    let token = common::token(&who);
    for origin in ["https://evil.example", "http://dash.example.com", "null"] {
        let (status, body) = open(addr, who, &token, Some(origin))
            .await
            .err()
            .unwrap_or_else(|| panic!("{origin} was let in"));
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("origin_not_allowed"))
        );
    }
    for origin in [
        Some("https://dash.example.com"),
        Some("HTTPS://Dash.Example.com"),
        None,
    ] {
        let mut ws = open(addr, who, &token, origin).await.expect("allowed");
        answers(&mut ws).await;
    }

    // The HTTP API, to pages of the same origins: a preflight, then the request, each answered
    // for the page's origin; a page of another origin is refused.
    let path = "/api/realtime/status";
    let (status, head) = request(
        addr,
        &format!(
            "OPTIONS {path} HTTP/1.1\r\nOrigin: https://dash.example.com\r\n\
             Access-Control-Request-Method: GET\r\n\
             Access-Control-Request-Headers: authorization\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://dash.example.com"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers: authorization"),
        "{head}"
    );
    let (status, head) = request(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nOrigin: https://dash.example.com\r\n\
             Authorization: Bearer {token}\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://dash.example.com"),
        "{head}"
    );
    // Its refusals too, so that the page can read why.
    for (path, auth, expected) in [
        (path, String::new(), 401),
        (
            "/api/realtime/stats",
            format!("Authorization: Bearer {token}\r\n"),
            403,
        ),
        (
            "/api/consultations/not-a-uuid/messages",
            format!("Authorization: Bearer {token}\r\n"),
            400,
        ),
    ] {
        let (status, head) = request(
            addr,
            &format!("GET {path} HTTP/1.1\r\nOrigin: https://dash.example.com\r\n{auth}"),
        )
        .await;
        assert_eq!(status, expected, "{path}: {head}");
        assert!(
            head.contains("access-control-allow-origin: https://dash.example.com"),
            "{path}: {head}"
        );
    }
    // What is not the API answers no preflight.
    for other in ["/metrics", "/ws", "/nothing"] {
        let (status, head) = request(
            addr,
            &format!(
                "OPTIONS {other} HTTP/1.1\r\nOrigin: https://dash.example.com\r\n\
                 Access-Control-Request-Method: GET\r\n"
            ),
        )
        .await;
        assert_ne!(status, 200, "{other}: {head}");
        assert!(
            !head.contains("access-control-allow-origin"),
            "{other}: {head}"
        );
    }
    for preflight in [true, false] {
        let method = if preflight { "OPTIONS" } else { "GET" };
        let (status, head) = request(
            addr,
            &format!(
                "{method} {path} HTTP/1.1\r\nOrigin: https://evil.example\r\n\
                 Access-Control-Request-Method: GET\r\nAuthorization: Bearer {token}\r\n"
            ),
        )
        .await;
        assert_eq!(status, 403, "{method}: {head}");
        assert!(!head.contains("access-control-allow-origin"), "{head}");
    }
    // Except the health check asked plainly (no preflight, no token): its refusal is readable by
    // any page, so that a page of an origin not allowed can tell why its socket was refused.
    let health = "/api/realtime/health";
    let (status, head) = request(
        addr,
        &format!("GET {health} HTTP/1.1\r\nOrigin: https://evil.example\r\n"),
    )
    .await;
    assert_eq!(status, 403, "{head}");
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    let (status, head) = request(
        addr,
        &format!("GET {health} HTTP/1.1\r\nOrigin: https://dash.example.com\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://dash.example.com"),
        "{head}"
    );
    relay.shutdown().await;
}

/// Sends one HTTP/1.1 request (its request line and headers, without the blank line) and returns
/// the whole response.
async fn exchange(addr: SocketAddr, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{head}Host: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("a response in time")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// Sends one HTTP/1.1 request (its request line and headers, without the blank line) and returns
/// the status and the response's head, lowercased.
async fn request(addr: SocketAddr, head: &str) -> (u16, String) {
    let text = exchange(addr, head).await.to_lowercase();
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head)
}

/// Random input built from the words frames and payloads are made of.
trait Garbage {
    fn json(&mut self, depth: usize) -> Value;
    fn text(&mut self) -> String;
}

impl Garbage for Rng {
    /// A random JSON value built from the words frames and payloads are made of.
    fn json(&mut self, depth: usize) -> Value {
        const WORDS: [&str; 22] = [
            "type",
            "ref",
            "feed",
            "filter",
            "since",
            "access_token",
            "session_id",
            "subscribe",
            "unsubscribe",
            "ping",
            "auth",
            "appointments",
            "consultation_messages",
            "id",
            "table",
            "op",
            "INSERT",
            "UPDATE",
            "new",
            "old",
            "fetch",
            "at",
        ];
        match self.below(if depth > 3 { 6 } else { 9 }) {
            0 => Value::Null,
            1 => json!(self.below(2) == 0),
            2 => json!(self.next() as i64),
            3 => json!(self.pick(&WORDS)),
            4 => json!(Uuid::from_u64_pair(self.next(), self.next()).to_string()),
            5 => json!((self.next() % 100_000).to_string()),
            6 | 7 => Value::Object(
                (0..self.below(5))
                    .map(|_| (self.pick(&WORDS).to_string(), self.json(depth + 1)))
                    .collect(),
            ),
            _ => Value::Array((0..self.below(4)).map(|_| self.json(depth + 1)).collect()),
        }
    }

    /// Random text: JSON-ish, truncated, control characters, deep nesting, or plain noise.
    fn text(&mut self) -> String {
        match self.below(6) {
            0 | 1 => self.json(0).to_string(),
            2 => {
                let text = self.json(0).to_string();
                let cut = self.below(text.len() + 1);
                text.chars().take(cut).collect()
            }
            3 => "[".repeat(1 + self.below(5000)),
            4 => (0..self.below(64))
                .filter_map(|_| char::from_u32((self.next() % 0x11_0000) as u32))
                .collect(),
            _ => format!(
                r#"{{"type":"subscribe","feed":"{}","since":"{}"}}"#,
                self.pick(&["appointments", "availability", "x"]),
                self.next() % 1000
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_and_notifications_harm_no_one_else() {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.limits.max_frames_per_second = 1_000_000;
    let relay = common::start_with(config).await;
    let addr = relay.local_addr();
    let seed = seed();
    let mut rng = Rng::new(seed);
    let admin = db.user(Role::Admin).await;
    let mut bystander = Ws::subscribed(addr, admin, &["appointments"]).await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);

    let fuzzer = Ws::connect(addr, db.user(Role::Dentist).await).await;
    let (mut garbage, replies) = fuzzer.stream.split();
    let replies = tokio::spawn(well_formed_until_the_last_pong(replies));
    let mut booked = Vec::new();
    for round in 0..2000 {
        let message = if rng.below(8) == 0 {
            Message::binary(
                (0..rng.below(100))
                    .map(|_| rng.next() as u8)
                    .collect::<Vec<u8>>(),
            )
        } else {
            Message::text(rng.text())
        };
        garbage
            .send(message)
            .await
            .expect("the fuzzing socket was closed");
        if round % 20 == 0 {
            // Garbage on the NOTIFY channel too: noise, near-events, and ids far ahead.
            let payload = match rng.below(3) {
                0 => rng.text(),
                1 => rng.json(0).to_string(),
                _ => json!({"id": rng.next() >> 1, "table": "appointments", "op": "INSERT",
                            "at": "2026-11-21T10:00:00Z",
                            "new": {"id": Uuid::new_v4(), "dentist_id": dentist.user_id}})
                .to_string(),
            };
            db.client
                .execute("select pg_notify('relay_events', $1)", &[&payload])
                .await
                .expect("notify");
            booked.push(db.book(&patient, &dentist, &format!("round {round}")).await);
        }
    }
    let last = json!({"type": "ping", "ref": "end"}).to_string();
    garbage.send(Message::text(last)).await.expect("send");
    let replies = tokio::time::timeout(PATIENCE, replies)
        .await
        .expect("no pong after the garbage")
        .expect("replies");
    assert!(
        replies >= 2000,
        "seed {seed}: {replies} replies to 2001 frames"
    );

    let fence = db.fence().await;
    let events = bystander.events_until(fence).await;
    let ids: Vec<Value> = events.iter().map(|e| e["row"]["id"].clone()).collect();
    let expected: Vec<Value> = booked.iter().map(|id| json!(id)).collect();
    assert_eq!(ids, expected, "seed {seed}: the bystander's feed");
    assert!(events.iter().all(|e| e["op"] == "INSERT"), "seed {seed}");
    assert_eq!(http_get(addr, "/api/realtime/health", None).await.0, 200);
    relay.shutdown().await;
}

/// A notification forged on the relay's channel with the next event's id is dispatched (the
/// channel is trusted: see design.md), but when the real event of that id is notified, whole or,
/// too large for NOTIFY, by its id alone, the relay finds out from the log that what it sent was
/// never committed, and closes every socket with 4010 so that clients fetch current state;
/// resuming from before the forgery gets the real event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_next_event_is_found_out_when_the_real_one_comes() {
    let db = common::TestDb::new().await;
    let relay = common::start_with(db.config()).await;
    let addr = relay.local_addr();
    let (admin, patient, dentist) = (
        db.user(Role::Admin).await,
        db.user(Role::Patient).await,
        db.user(Role::Dentist).await,
    );
    db.book(&patient, &dentist, "before").await;
    for (round, notes) in [(1, "real".to_string()), (2, "x".repeat(9_000))] {
        common::settle(&db, addr).await;
        let mut watcher = Ws::connect(addr, admin).await;
        let before = watcher.subscribe("appointments").await;
        let position = before.split('.').next().unwrap().parse::<i64>().unwrap();
        let issued: i64 = db
            .client
            .query_one("select last_value from relay.events_id_seq", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(issued, position, "the next event takes the next id");

        let forged = json!({"id": position + 1, "table": "appointments", "op": "INSERT",
                            "at": "2000-01-01T00:00:00.000000Z",
                            "new": {"id": Uuid::new_v4(), "patient_id": patient.user_id,
                                    "dentist_id": dentist.user_id, "notes": "forged"}});
        db.client
            .execute(
                "select pg_notify('relay_events', $1)",
                &[&forged.to_string()],
            )
            .await
            .unwrap();
        let frame = watcher.recv().await;
        assert_eq!(
            (&frame["id"], &frame["row"]["notes"]),
            (&json!(position + 1), &json!("forged")),
            "{frame}"
        );

        let real = db.book(&patient, &dentist, &notes).await;
        match watcher.next_message().await {
            Some(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), relay::protocol::close::STATE_LOST);
                assert!(frame.reason.contains("never committed"), "{}", frame.reason);
            }
            other => panic!(
                "{} bytes of notes: expected close 4010, got {other:?}",
                notes.len()
            ),
        }
        assert_eq!(common::starts_over(&relay), round);
        let mut again = Ws::connect(addr, admin).await;
        let replayed = again.resume("appointments", &before).await;
        assert_eq!(replayed.len(), 1, "{replayed:?}");
        assert_eq!(
            (&replayed[0]["id"], &replayed[0]["row"]["id"]),
            (&json!(position + 1), &json!(real))
        );
    }
    relay.shutdown().await;
}

/// Notifications forged on the relay's channel that repeat an event already delivered, each with
/// another time, are ignored: the log says the delivered event is the real one, no socket is
/// closed, and the next real event follows. The log is asked once for that event: with the
/// table the question reads locked, further repeats still cost nothing, and the next real event
/// still comes (had the relay asked again, the question would wait for the lock and time out, and
/// the LISTEN connection would start again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_repeats_of_a_delivered_event_are_ignored() {
    let db = common::TestDb::new().await;
    let relay = common::start_with(db.config()).await;
    let addr = relay.local_addr();
    let (admin, patient, dentist) = (
        db.user(Role::Admin).await,
        db.user(Role::Patient).await,
        db.user(Role::Dentist).await,
    );
    let mut watcher = Ws::subscribed(addr, admin, &["appointments", "availability"]).await;
    let first = db.book(&patient, &dentist, "real").await;
    let delivered = watcher.recv().await;
    assert_eq!(delivered["row"]["id"], json!(first), "{delivered}");
    let id = delivered["id"].as_i64().expect("an event id");
    let forge = |n: usize| {
        json!({"id": id, "table": "appointments", "op": "INSERT",
               "at": format!("2000-01-01T00:00:{:02}.000000Z", n % 60),
               "new": {"id": Uuid::new_v4(), "patient_id": patient.user_id,
                       "dentist_id": dentist.user_id, "notes": "forged"}})
        .to_string()
    };
    let notify = "select pg_notify('relay_events', $1)";
    let mut expected = Vec::new();

    // The first repeat is checked against the log; the next real event comes after it.
    db.client.execute(notify, &[&forge(0)]).await.unwrap();
    expected.push(db.book(&patient, &dentist, "real too").await);
    let next = watcher.recv().await;
    assert_eq!(
        (&next["id"], &next["row"]["id"]),
        (&json!(id + 1), &json!(expected[0])),
        "{next}"
    );

    let locker = common::connect_to(&db.url).await;
    locker
        .batch_execute("begin; lock table relay.log_horizon in access exclusive mode")
        .await
        .unwrap();
    for n in 1..50 {
        db.client.execute(notify, &[&forge(n)]).await.unwrap();
    }
    expected.push(db.book(&patient, &dentist, "real, locked").await);
    let next = watcher.recv().await;
    assert_eq!(
        (&next["id"], &next["row"]["id"]),
        (&json!(id + 2), &json!(expected[1])),
        "{next}"
    );
    locker.batch_execute("rollback").await.unwrap();

    let fence = db.fence().await;
    assert_eq!(
        watcher.events_until(fence).await,
        Vec::<Value>::new(),
        "nothing forged was delivered"
    );
    assert_eq!(common::starts_over(&relay), 0);
    assert_eq!(common::listen_reconnects(&relay), 0);
    relay.shutdown().await;
}

/// Reads the fuzzer's replies until the pong of its final ping; every reply must be a
/// well-formed frame of the protocol. Returns how many came.
async fn well_formed_until_the_last_pong(
    mut replies: futures::stream::SplitStream<common::Stream>,
) -> usize {
    let mut count = 0;
    while let Some(message) = replies.next().await {
        let text = match message.expect("the fuzzing socket failed") {
            Message::Text(text) => text,
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("the fuzzing socket got {other:?}"),
        };
        count += 1;
        let frame: Value = serde_json::from_str(&text).expect("a JSON reply");
        let kind = frame["type"].as_str().unwrap_or_default();
        assert!(
            [
                "error",
                "pong",
                "subscribed",
                "unsubscribed",
                "live",
                "event"
            ]
            .contains(&kind),
            "{frame}"
        );
        if kind == "error" {
            assert!(
                frame["code"].as_str().is_some_and(|c| !c.is_empty()),
                "{frame}"
            );
        }
        if frame == json!({"type": "pong", "ref": "end"}) {
            return count;
        }
    }
    panic!("the fuzzing socket closed after {count} replies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_log_rows_are_counted_and_skipped_by_a_replay() {
    let db = common::TestDb::new().await;
    let relay = db.start().await;
    let addr = relay.local_addr();
    let admin = db.user(Role::Admin).await;
    let (patient, dentist) = (db.user(Role::Patient).await, db.user(Role::Dentist).await);
    let mut ws = Ws::connect(addr, admin).await;
    let cursor = ws.subscribe("appointments").await;
    drop(ws);

    let first = db.book(&patient, &dentist, "before").await;
    // Rows no trigger would write: another table, a row that is not an object.
    db.exec(
        r#"insert into relay.events (table_name, op, new_row) values
               ('profiles', 'INSERT', '{"id": "x"}'),
               ('appointments', 'INSERT', '"not an object"')"#,
    )
    .await;
    let second = db.book(&patient, &dentist, "after").await;
    common::settle(&db, addr).await;

    let malformed = || {
        relay
            .hub()
            .counters()
            .events_malformed
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // The live feed read both rows from the log (after the gap in ids) and went on.
    let live = malformed();
    assert_eq!(live, 2, "malformed rows counted by the live feed");
    let mut ws = Ws::connect(addr, admin).await;
    let replayed = ws.resume("appointments", &cursor).await;
    let ids: Vec<&Value> = replayed.iter().map(|e| &e["row"]["id"]).collect();
    assert_eq!(ids, [&json!(first), &json!(second)]);
    // The replay of appointments met the one malformed appointments row.
    assert_eq!(malformed(), live + 1);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_logs_even_at_trace_level() {
    let db = common::TestDb::new().await;
    let addr = common::free_address();
    // Every way to ask for the WebSocket library's frame tracing: globally, by its module, and by
    // the connection's span.
    let verbose = "trace,tungstenite::protocol=trace,[socket]=trace";
    let mut relay =
        common::RelayProcess::spawn_with(&db.url, addr, &[("RUST_LOG", verbose)], true).await;
    let dentist = db.user(Role::Dentist).await;
    let token = common::token(&dentist);
    let fresh = hs256(&claims(&dentist, now() + 900));
    let bad = hs256(&claims(&dentist, now() - 900));

    let mut ws = open(addr, dentist, &token, None).await.expect("upgrade");
    assert_eq!(auth(&mut ws, "a", &fresh).await["type"], "authenticated");
    assert_eq!(auth(&mut ws, "b", &bad).await["code"], "token_expired");
    let _ = open(addr, dentist, &bad, None)
        .await
        .err()
        .expect("refused");
    let (status, _) = http_get(addr, "/api/realtime/status", Some(&token)).await;
    assert_eq!(status, 200);
    ws.stream.close(None).await.expect("close");

    relay.terminate();
    let output = tokio::time::timeout(PATIENCE, relay.output.take().expect("captured"))
        .await
        .expect("the relay did not exit")
        .expect("read the log");
    assert!(output.contains("socket"), "the log is not at trace level");
    for secret in [&token, &fresh, &bad] {
        // The signature is the part no one else could produce.
        let signature = secret.rsplit('.').next().unwrap();
        assert!(!output.contains(signature), "a token reached the log");
    }
}

/// With `RELAY_METRICS_BIND`, `/metrics` (event counts, positions, presence) is served only on
/// its own address, which a deployment keeps from the public; the public address answers 404.
#[tokio::test]
async fn metrics_on_an_address_of_their_own_are_not_served_with_the_sockets() {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    let relay = common::start_with(config).await;
    let public = relay.local_addr();
    let private = relay.metrics_addr().expect("an address for /metrics");
    assert_ne!(public, private);

    let (status, head) = request(public, "GET /metrics HTTP/1.1\r\n").await;
    assert_eq!(status, 404, "{head}");
    let (status, head) = request(private, "GET /metrics HTTP/1.1\r\n").await;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("content-type: text/plain"), "{head}");
    // Only /metrics there: not the page, the API or sockets.
    for path in ["/", "/api/realtime/health", "/ws"] {
        let (status, head) = request(private, &format!("GET {path} HTTP/1.1\r\n")).await;
        assert_eq!(status, 404, "{path}: {head}");
    }
    // The rest is served as before on the public address.
    let (status, _) = common::http_get(public, "/api/realtime/health", None).await;
    assert_eq!(status, 200);
    relay.shutdown().await;
}

/// A route asked with a method it does not take answers 405, not 404: the API's routes, the
/// health check among them, as the rest.
#[tokio::test]
async fn every_route_answers_405_to_a_method_it_does_not_take() {
    let db = common::TestDb::new().await;
    let relay = common::start_with(db.config()).await;
    let addr = relay.local_addr();
    for path in [
        "/api/realtime/health",
        "/api/realtime/status",
        "/api/realtime/stats",
        "/ws",
        "/",
    ] {
        let (status, head) = request(
            addr,
            &format!("POST {path} HTTP/1.1\r\nContent-Length: 0\r\n"),
        )
        .await;
        assert_eq!(status, 405, "{path}: {head}");
    }
    relay.shutdown().await;
}

/// Backends of the test's database waiting for a lock.
async fn lock_waiters(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
}

/// Waits at most `within` until the number of lock waiters satisfies `done`.
async fn lock_waiters_until(
    client: &tokio_postgres::Client,
    within: Duration,
    done: impl Fn(i64) -> bool,
) -> Result<(), tokio::time::error::Elapsed> {
    tokio::time::timeout(within, async {
        while !done(lock_waiters(client).await) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Starts history requests by `users` for `session` that wait behind a lock on its messages,
/// with the clients' pool down to one connection: one holds the connection, the others wait for
/// it. Returns the lock's transaction (and its connection) and the requests.
async fn stuck_history_requests<'a>(
    db: &common::TestDb,
    holder: &'a mut tokio_postgres::Client,
    addr: SocketAddr,
    session: Uuid,
    users: &[Principal],
) -> (
    tokio_postgres::Transaction<'a>,
    String,
    Vec<tokio::task::JoinHandle<(u16, Value)>>,
) {
    let lock = holder.transaction().await.unwrap();
    lock.batch_execute("lock table public.consultation_messages in access exclusive mode")
        .await
        .unwrap();
    let path = format!("/api/consultations/{session}/messages");
    let stuck: Vec<_> = users
        .iter()
        .map(|who| {
            let (path, token) = (path.clone(), common::token(who));
            tokio::spawn(async move { http_get(addr, &path, Some(&token)).await })
        })
        .collect();
    lock_waiters_until(&db.client, PATIENCE, |n| n > 0)
        .await
        .expect("a history query waits on the lock");
    (lock, path, stuck)
}

/// A relay whose clients' pool is one connection, whose requests give up after
/// `query_timeout`; a patient, a dentist, an admin, a consultation session of the first two, and
/// the admin watching appointments.
struct OneConnection {
    db: common::TestDb,
    relay: relay::server::Relay,
    addr: SocketAddr,
    users: [Principal; 3],
    session: Uuid,
    watcher: Ws,
}

async fn one_connection(query_timeout: Duration) -> OneConnection {
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.pool_size = 1;
    config.query_timeout = query_timeout;
    let relay = common::start_with(config).await;
    let addr = relay.local_addr();
    let users = [
        db.user(Role::Patient).await,
        db.user(Role::Dentist).await,
        db.user(Role::Admin).await,
    ];
    let session = db.open_session(&users[0], &users[1]).await;
    let watcher = Ws::subscribed(addr, users[2], &["appointments", "availability"]).await;
    OneConnection {
        db,
        relay,
        addr,
        users,
        session,
        watcher,
    }
}

/// Requests, however slow, do not hold back the live feed: the listener reads the log on
/// connections of its own, not the clients' pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_requests_hold_back_not_the_feed() {
    // The one connection is held by stuck queries for longer than the test's patience: an event
    // that arrives at all arrived while they held it.
    let OneConnection {
        db,
        relay,
        addr,
        users,
        session,
        mut watcher,
    } = one_connection(PATIENCE * 2).await;
    let [patient, dentist, _] = users;
    let before = common::listen_reconnects(&relay);
    let mut holder = common::connect_to(&db.url).await;
    let (lock, path, stuck) = stuck_history_requests(&db, &mut holder, addr, session, &users).await;

    // An event too large for a notification, which the listener reads from the log.
    let booked = db.book(&patient, &dentist, &"x".repeat(9_000)).await;
    let fence = db.fence().await;
    let events = watcher.events_until(fence).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["row"]["id"], json!(booked));
    assert!(
        lock_waiters(&db.client).await > 0,
        "the lock is still waited on"
    );
    assert_eq!(
        common::listen_reconnects(&relay),
        before,
        "the LISTEN connection was given up"
    );

    // Once the lock goes, every stuck request is answered.
    lock.rollback().await.unwrap();
    for request in stuck {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = http_get(addr, &path, Some(&common::token(&patient))).await;
    assert_eq!(status, 200, "{body}");
    relay.shutdown().await;
}

/// A query the relay gives up on (`RELAY_QUERY_TIMEOUT`) is answered 503 and cancelled on the
/// server, and its connection closed, so that the next request gets a free one at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_requests_are_given_up_on_and_hold_back_not_the_next_request() {
    let OneConnection {
        db,
        relay,
        addr,
        users,
        session,
        mut watcher,
    } = one_connection(Duration::from_secs(3)).await;
    let [patient, dentist, _] = users;
    db.book(&patient, &dentist, "a cursor to resume from").await;
    let fence = db.fence().await;
    let events = watcher.events_until(fence).await;
    let cursor = events[0]["cursor"].as_str().unwrap().to_string();

    // Three users' history queries wait behind the lock: longer, together, than anyone waits.
    let mut holder = common::connect_to(&db.url).await;
    let (lock, path, stuck) = stuck_history_requests(&db, &mut holder, addr, session, &users).await;
    // They are given up on, while the lock is still held...
    for request in stuck {
        let (status, body) = request.await.unwrap();
        assert_eq!(
            (status, &body["error"]),
            (503, &json!("unavailable")),
            "{body}"
        );
    }
    // ...and their queries cancelled: the pool's one connection serves a resume at once, which
    // would otherwise wait behind an abandoned query and time out too.
    let mut resuming = Ws::connect(addr, dentist).await;
    resuming
        .send(json!({"type": "subscribe", "ref": "r", "feed": "appointments", "since": cursor}))
        .await;
    let reply = resuming.recv().await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(resuming.recv().await["type"], "live");

    lock.rollback().await.unwrap();
    let (status, body) = http_get(addr, &path, Some(&common::token(&patient))).await;
    assert_eq!(status, 200, "{body}");
    relay.shutdown().await;
}

/// A connection that never finishes its request is closed after `RELAY_HEADER_TIMEOUT`, whether
/// it sent nothing or half a request head, and one that begins HTTP/2's preface at once; an open
/// WebSocket, silent for as long, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_finishes_its_request_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.header_timeout = Duration::from_secs(1);
    let relay = common::start_with(config).await;
    let addr = relay.local_addr();
    let (patient, dentist, admin) = (
        db.user(Role::Patient).await,
        db.user(Role::Dentist).await,
        db.user(Role::Admin).await,
    );
    let mut watcher = Ws::subscribed(addr, admin, &["appointments"]).await;

    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /api/realtime/health HTTP/1.1\r\nHost: relay\r\n")
        .await
        .unwrap();
    // The start of HTTP/2's preface: a server that tells HTTP/1 from HTTP/2 waits for the rest.
    let mut preface = tokio::net::TcpStream::connect(addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    for (name, mut stream) in [
        ("silent", silent),
        ("half a head", slow),
        ("half a preface", preface),
    ] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("{name}: the relay never closed the connection"));
        // Closed, with at most an error response: never a response to the unfinished request.
        if let Ok(n) = read {
            let text = String::from_utf8_lossy(&rest[..n]);
            assert!(!text.contains(" 200 "), "{name}: {text}");
        }
    }

    // A request whose first bytes come alone, then the rest: served, and its connection closed
    // after the answer (one request per connection). `P` and `PR` are also how HTTP/2's preface
    // begins: the relay waits to tell them apart.
    for (first, rest, status) in [
        ("G", "ET /api/realtime/health", "200"),
        ("P", "OST /api/realtime/health", "405"),
        ("PR", "OPFIND /api/realtime/health", "405"),
    ] {
        let mut split = tokio::net::TcpStream::connect(addr).await.unwrap();
        split.write_all(first.as_bytes()).await.unwrap();
        // A slow client, not a synchronisation: the first bytes go out on their own.
        tokio::time::sleep(Duration::from_millis(200)).await;
        split
            .write_all(format!("{rest} HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, split.read_to_end(&mut answer))
            .await
            .expect("the answer, then the connection closed")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer).to_lowercase();
        assert!(
            answer.starts_with(&format!("http/1.1 {status}")),
            "{first}: {answer}"
        );
        assert!(answer.contains("connection: close"), "{first}: {answer}");
    }

    // The WebSocket, silent all along, still gets its feed.
    let booked = db.book(&patient, &dentist, "after the timeouts").await;
    let event = watcher.recv().await;
    assert_eq!(event["row"]["id"], json!(booked), "{event}");
    relay.shutdown().await;
}

/// One value of the relay's `/metrics`.
async fn metric(addr: SocketAddr, name: &str) -> i64 {
    let response = exchange(addr, "GET /metrics HTTP/1.1\r\n").await;
    response
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {response}"))
}

/// Waits until the metric `name` satisfies `done`, and returns its value.
async fn metric_until(addr: SocketAddr, name: &str, done: impl Fn(i64) -> bool) -> i64 {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let value = metric(addr, name).await;
        if done(value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A flood of connections that never send a request cannot take the relay's last file
/// descriptors. At what its open-file limit leaves after its own reserve, it stops accepting; its
/// LISTEN connection, dropped during the flood, is opened again, the socket already open gets its
/// events, and a query it gives up on is cancelled on the server. Once the flood ends, new
/// clients are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_leaves_the_relay_files_of_its_own() {
    use tokio::io::AsyncWriteExt;
    const FILES: u32 = 160;
    let db = common::TestDb::new().await;
    let [addr, metrics] = common::free_addresses::<2>();
    let metrics_bind = metrics.to_string();
    let relay = common::RelayProcess::spawn_with_files(
        FILES,
        &db.url,
        addr,
        &[
            ("RUST_LOG", "error"),
            ("RELAY_POOL_SIZE", "2"),
            // The flood is not timed out while the test runs.
            ("RELAY_HEADER_TIMEOUT", "1h"),
            ("RELAY_METRICS_BIND", &metrics_bind),
        ],
    )
    .await;
    let (patient, dentist, admin) = (
        db.user(Role::Patient).await,
        db.user(Role::Dentist).await,
        db.user(Role::Admin).await,
    );
    let mut watcher = Ws::subscribed(addr, admin, &["appointments"]).await;
    let limit = metric(metrics, "relay_client_connections_limit").await;
    assert!(0 < limit && limit < i64::from(FILES), "limit {limit}");

    // A history query stuck behind a lock the test holds: the relay gives it up during the
    // flood, and cancelling it on the server takes a connection to Postgres of its own.
    let session = db.open_session(&patient, &dentist).await;
    let mut holder = common::connect_to(&db.url).await;
    let lock = holder.transaction().await.unwrap();
    lock.batch_execute("lock table public.consultation_messages in access exclusive mode")
        .await
        .unwrap();
    let stuck = tokio::spawn({
        let path = format!("/api/consultations/{session}/messages");
        let token = common::token(&patient);
        async move { common::http_get(addr, &path, Some(&token)).await }
    });
    lock_waiters_until(&db.client, PATIENCE, |n| n > 0)
        .await
        .expect("the history query waits on the lock");

    // More connections than the process could hold, each with half a request.
    let mut flood = Vec::new();
    for _ in 0..FILES + 40 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /api/realtime/health HTTP/1.1\r\n")
            .await
            .unwrap();
        flood.push(stream);
    }
    // The relay takes them up to its limit, and no further: were its reserve too small, it would
    // run out of files before the limit.
    metric_until(metrics, "relay_client_connections", |open| open == limit).await;
    // What is left is enough for every connection to Postgres the relay may open: its pool, its
    // own three, and the queries it cancels.
    let pid = relay.child.id().expect("the relay runs");
    let open_files = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let for_postgres = 2 + relay::db::INTERNAL_POOL_SIZE + 1 + 2 * relay::db::MAX_CANCELS;
    assert!(
        open_files + for_postgres <= FILES as usize,
        "{open_files} files open of {FILES}"
    );

    // The LISTEN connection dropped: the relay needs a new connection to Postgres, now.
    let reconnects = metric(metrics, "relay_listen_reconnects_total").await;
    assert_eq!(common::kill_listen(&db.client).await, 1);
    metric_until(metrics, "relay_listen_reconnects_total", |n| n > reconnects).await;
    let booked = db.book(&patient, &dentist, "during the flood").await;
    let event = watcher.recv().await;
    assert_eq!(event["row"]["id"], json!(booked), "{event}");
    assert_eq!(metric(metrics, "relay_client_connections").await, limit);

    // The stuck query was given up on (after the relay's 5 s) and cancelled on the server while
    // the lock is still held: without the cancel, it would wait on until the server's own
    // statement_timeout, 30 s after it began.
    let (status, body) = stuck.await.unwrap();
    assert_eq!(
        (status, &body["error"]),
        (503, &json!("unavailable")),
        "{body}"
    );
    lock_waiters_until(&db.client, Duration::from_secs(15), |n| n == 0)
        .await
        .expect("the abandoned query was cancelled");
    lock.rollback().await.unwrap();
    assert_eq!(metric(metrics, "relay_client_connections").await, limit);

    // The flood ends: the connections that waited are accepted (and end at once), and new
    // clients are served.
    drop(flood);
    metric_until(metrics, "relay_client_connections", |open| open < limit).await;
    let mut late = Ws::subscribed(addr, admin, &["appointments"]).await;
    let booked = db.book(&patient, &dentist, "after the flood").await;
    for ws in [&mut watcher, &mut late] {
        let event = ws.recv().await;
        assert_eq!(event["row"]["id"], json!(booked), "{event}");
    }
}

/// Shutdown does not wait for a connection that is still sending its request head, however long
/// `RELAY_HEADER_TIMEOUT` is: once the grace is over, the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_connection_still_sending_its_head() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = common::TestDb::new().await;
    let mut config = db.config();
    config.header_timeout = Duration::from_secs(3600);
    config.shutdown_grace = Duration::from_secs(1);
    let relay = common::start_with(config).await;
    let mut slow = tokio::net::TcpStream::connect(relay.local_addr())
        .await
        .unwrap();
    slow.write_all(b"GET /api/realtime/health HTTP/1.1\r\n")
        .await
        .unwrap();
    // The head has reached the relay's HTTP layer: a complete request on another connection is
    // answered, so the accept loop has taken the slow one before it.
    let (status, _) = http_get(relay.local_addr(), "/api/realtime/health", None).await;
    assert_eq!(status, 200);
    relay.shutdown().await;
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, slow.read_to_end(&mut rest))
        .await
        .expect("the relay closed the connection")
        .ok();
}
