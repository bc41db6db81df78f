//! A client process: opens its share of the run's sockets from its own source address, subscribes
//! each to its feeds, and records every event frame it receives: the latency from the event's
//! commit-time stamp to its arrival (when the process read it, and when its last segment
//! reached the socket: see [`crate::stamped`]), and how many times each event arrived.
//!
//! It talks to the orchestrator over stdin and stdout, one JSON document per line: it reads its
//! [`Plan`], answers [`Ready`] once every socket is subscribed, then obeys [`Command`]s, answering
//! `report` with a [`Report`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use relay::authz::Feed;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{http, Message, Utf8Bytes};

use crate::expect::Digest;
use crate::peer::{self, Peer};
use crate::stamped::Stamped;
use crate::Error;

/// What one client process does.
#[derive(Debug, Serialize, Deserialize)]
pub struct Plan {
    pub relay: SocketAddr,
    /// The local address its sockets connect from (127.0.0.x), so that no one address runs out of
    /// ports.
    pub source: IpAddr,
    /// How many sockets it opens at once.
    pub concurrency: usize,
    /// The server is a peer, not the relay: its sockets speak the peer's protocol.
    pub peer: Option<Peer>,
    /// Once every socket is subscribed, the process reads its sockets every this many
    /// microseconds, sleeping in between, instead of waking for each frame (0, the default).
    #[serde(default)]
    pub poll_micros: u64,
    pub sockets: Vec<SocketPlan>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SocketPlan {
    pub token: String,
    pub feeds: Vec<Feed>,
    /// The PostGraphile peer's topic for this socket's user (`admins`, or `user:<id>`).
    #[serde(default)]
    pub topic: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Ready {
    pub sockets: usize,
    /// From the first connect to the last `subscribed` reply.
    pub seconds: f64,
    /// When the first connect began and the last `subscribed` came, in microseconds since the
    /// epoch: the processes start one after another, so the rate over all of them is taken from
    /// the earliest start to the latest end.
    pub began_micros: i64,
    pub ended_micros: i64,
}

/// The answer to `reset` and `mark`, once done.
#[derive(Debug, Serialize, Deserialize)]
pub struct Done {
    pub done: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// Forget everything received so far: a new phase starts.
    Reset,
    /// Note how many deliveries have arrived: the writers just stopped.
    Mark,
    Report,
    /// When the writers saw each event's transaction commit: (event id, microseconds since the
    /// epoch). Answered with [`FromAcknowledgement`].
    Acknowledged {
        commits: Vec<(i64, i64)>,
    },
    /// The events with ids in `(after, upto]` each socket received, as one digest per socket in
    /// the plan's order. Answered with [`PerSocket`].
    PerSocket {
        after: i64,
        upto: i64,
    },
}

/// The answer to [`Command::PerSocket`].
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PerSocket {
    pub sockets: Vec<Digest>,
}

/// Latency measured from the writer's commit acknowledgement instead of the event's `at`, over
/// the deliveries of the events named in [`Command::Acknowledged`].
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FromAcknowledgement {
    /// (value, count) pairs, in microseconds.
    pub latency_us: Vec<(u64, u64)>,
    /// The same to each delivery's arrival at its socket: (value, count) pairs, in microseconds.
    #[serde(default)]
    pub at_socket_us: Vec<(u64, u64)>,
    /// Deliveries that arrived before the writer had seen its commit acknowledged (recorded as
    /// the smallest latency).
    pub early: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub deliveries: u64,
    /// Deliveries that had arrived at the last `mark`.
    pub deliveries_at_mark: u64,
    /// Frames whose event id was not above the socket's previous one: repeated or out of order.
    pub out_of_order: u64,
    /// Deliveries whose read carried no kernel receive time: timed at the socket as when read.
    #[serde(default)]
    pub unstamped: u64,
    /// Sockets that closed (none should, before the run ends).
    pub closed: u64,
    /// Commit-to-arrival latency in microseconds: (value, count) pairs.
    pub latency_us: Vec<(u64, u64)>,
    /// Deliveries per event id.
    pub per_event: Vec<(i64, u32)>,
}

struct Stats {
    latency: Histogram<u64>,
    per_event: HashMap<i64, u32>,
    /// Every delivery: (event id, when the process read it and when it reached the socket, in
    /// microseconds since the epoch, the socket's place in the plan).
    arrivals: Vec<(i64, i64, i64, u32)>,
    deliveries: u64,
    at_mark: u64,
    out_of_order: u64,
    unstamped: u64,
    closed: u64,
}

/// An empty latency histogram in microseconds: 1 µs to 10 minutes, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// A histogram as (value, count) pairs, as the client processes report it.
fn recorded(histogram: &Histogram<u64>) -> Vec<(u64, u64)> {
    histogram
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds reported (value, count) pairs to a histogram.
pub fn add_recorded(histogram: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for (value, count) in pairs {
        histogram.saturating_record_n(*value, *count);
    }
}

impl Stats {
    fn new() -> Stats {
        Stats {
            latency: latency_histogram(),
            per_event: HashMap::new(),
            arrivals: Vec::new(),
            deliveries: 0,
            at_mark: 0,
            out_of_order: 0,
            unstamped: 0,
            closed: 0,
        }
    }

    fn report(&self) -> Report {
        Report {
            deliveries: self.deliveries,
            deliveries_at_mark: self.at_mark,
            out_of_order: self.out_of_order,
            unstamped: self.unstamped,
            closed: self.closed,
            latency_us: recorded(&self.latency),
            per_event: self.per_event.iter().map(|(id, n)| (*id, *n)).collect(),
        }
    }

    fn since_acknowledgements(&self, commits: &[(i64, i64)]) -> FromAcknowledgement {
        let commits: HashMap<i64, i64> = commits.iter().copied().collect();
        let (mut latency, mut at_socket) = (latency_histogram(), latency_histogram());
        let mut early = 0;
        for (id, arrived, reached, _) in &self.arrivals {
            let Some(committed) = commits.get(id) else {
                continue;
            };
            let micros = arrived - committed;
            if micros < 1 {
                early += 1;
            }
            latency.saturating_record(micros.max(1) as u64);
            at_socket.saturating_record((reached - committed).max(1) as u64);
        }
        FromAcknowledgement {
            latency_us: recorded(&latency),
            at_socket_us: recorded(&at_socket),
            early,
        }
    }

    fn per_socket(&self, sockets: usize, after: i64, upto: i64) -> PerSocket {
        let mut digests = vec![Digest::default(); sockets];
        for (id, _, _, socket) in &self.arrivals {
            if (after + 1..=upto).contains(id) {
                if let Some(digest) = digests.get_mut(*socket as usize) {
                    digest.add(*id);
                }
            }
        }
        PerSocket { sockets: digests }
    }
}

type Shared = Arc<Mutex<Stats>>;

fn lock(stats: &Shared) -> std::sync::MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An `event` frame's id and `at`, read without parsing the whole frame: the client processes
/// share the machine with the relay, so they must cost as little as possible. The relay writes
/// `type` first and `at` last (see `relay/src/event.rs`).
fn event_fields(text: &str) -> Option<(i64, &str)> {
    if !text.starts_with(r#"{"type":"event""#) {
        return None;
    }
    let bytes = text.as_bytes();
    let id_at = memchr::memmem::find(bytes, br#""id":"#)? + 5;
    let digits = bytes[id_at..].iter().position(|b| !b.is_ascii_digit())?;
    let id = text[id_at..id_at + digits].parse().ok()?;
    let at_at = memchr::memmem::rfind(bytes, br#""at":""#)? + 6;
    let at = text.get(at_at..text.len().checked_sub(2)?)?;
    Some((id, at))
}

fn now_micros() -> i128 {
    i128::from(crate::system::now_micros())
}

/// Microseconds since the epoch of an RFC 3339 UTC time with up to microseconds, as the relay
/// writes `at` (`2026-11-21T10:37:02.520020Z`); anything else goes through a full parser.
fn micros_of(at: &str) -> Option<i128> {
    let b = at.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> { at.get(range)?.parse().ok() };
    if b.len() >= 20 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && b[b.len() - 1] == b'Z' {
        let date = time::Date::from_calendar_date(
            num(0..4)? as i32,
            time::Month::try_from(num(5..7)? as u8).ok()?,
            num(8..10)? as u8,
        )
        .ok()?;
        let seconds = (i64::from(date.to_julian_day()) - 2_440_588) * 86_400
            + num(11..13)? * 3600
            + num(14..16)? * 60
            + num(17..19)?;
        let fraction = at.get(20..b.len() - 1)?;
        let scale = 10i64.checked_pow(6u32.checked_sub(fraction.len() as u32)?)?;
        let micros = fraction.parse::<i64>().ok()? * scale;
        return Some(i128::from(seconds) * 1_000_000 + i128::from(micros));
    }
    let at =
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()?;
    Some(at.unix_timestamp_nanos() / 1000)
}

type Socket = tokio_tungstenite::WebSocketStream<Stamped>;

/// Opens one socket from `source` and subscribes it to its feeds (or, with a peer, waits until
/// the peer has put it in its room).
async fn open(plan: &Plan, socket: &SocketPlan) -> Result<Socket, Error> {
    let mut ws = handshake(plan, socket).await?;
    match plan.peer {
        None => {}
        Some(Peer::Socketio) => return connect_socket_io(ws).await,
        Some(peer) => {
            return match subscribe_graphql(ws, socket, peer == Peer::PostgraphileIds).await? {
                Subscription::Started(ws) => Ok(*ws),
                Subscription::Refused(text) => Err(format!("subscription refused: {text}").into()),
            }
        }
    }
    for feed in &socket.feeds {
        let subscribe = format!(r#"{{"type":"subscribe","feed":"{feed}"}}"#);
        ws.send(Message::text(subscribe)).await?;
    }
    let mut acknowledged = 0;
    while acknowledged < socket.feeds.len() {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if text.contains(r#""type":"subscribed""#) => {
                acknowledged += 1
            }
            Some(Ok(Message::Text(text))) if text.contains(r#""type":"error""#) => {
                return Err(format!("subscribe refused: {text}").into())
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err("closed while subscribing".into()),
        }
    }
    Ok(ws)
}

/// Connects one socket from `source` and completes its WebSocket handshake.
async fn handshake(plan: &Plan, socket: &SocketPlan) -> Result<Socket, Error> {
    let tcp = match plan.source {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    tcp.bind(SocketAddr::new(plan.source, 0))?;
    let stream = tcp.connect(plan.relay).await?;
    stream.set_nodelay(true)?;
    let stream = Stamped::new(stream)?;
    let url = match plan.peer {
        None => format!("ws://{}/ws?access_token={}", plan.relay, socket.token),
        Some(Peer::Socketio) => format!(
            "ws://{}/socket.io/?EIO=4&transport=websocket&access_token={}",
            plan.relay, socket.token
        ),
        Some(_) => format!("ws://{}/graphql", plan.relay),
    };
    let mut request = url.into_client_request()?;
    if plan.peer.is_some_and(Peer::graphql) {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            http::HeaderValue::from_static(peer::GRAPHQL_WS),
        );
    }
    // tungstenite zeroes the free part of its read buffer, up to this size, before every read:
    // 4 KiB holds a whole event frame of the runs' rows, and costs a quarter of 16 KiB's
    // clearing per frame.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4 * 1024);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    Ok(ws)
}

/// The next text frame from a peer while the socket is being set up.
async fn next_text(ws: &mut Socket) -> Result<Utf8Bytes, Error> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err("closed while connecting".into()),
        }
    }
}

/// Joins a Socket.IO server's main namespace: after the server's open packet, the client's
/// CONNECT; the server's answer comes once its middleware accepted the token and the socket is
/// in its room.
async fn connect_socket_io(mut ws: Socket) -> Result<Socket, Error> {
    let mut opened = false;
    loop {
        let text = next_text(&mut ws).await?;
        match peer::frame(&text) {
            peer::Frame::Open if !opened => {
                opened = true;
                ws.send(Message::text(peer::CONNECT)).await?;
            }
            peer::Frame::Connected if opened => return Ok(ws),
            peer::Frame::Refused(error) => return Err(format!("connect refused: {error}").into()),
            peer::Frame::Ping => ws.send(Message::text(peer::PONG)).await?,
            _ => {}
        }
    }
}

/// How a PostGraphile server answered a socket's subscription.
enum Subscription {
    /// The initial event came: the subscription is in place.
    Started(Box<Socket>),
    /// Anything else came first, as it came.
    Refused(Utf8Bytes),
}

/// Subscribes to a PostGraphile server's `listen` field for the socket's topic; the subscription's
/// initial event says it is in place.
async fn subscribe_graphql(
    mut ws: Socket,
    socket: &SocketPlan,
    ids_only: bool,
) -> Result<Subscription, Error> {
    ws.send(Message::text(peer::graphql_init(&socket.token)))
        .await?;
    let mut acknowledged = false;
    loop {
        let text = next_text(&mut ws).await?;
        if !acknowledged && text.starts_with(r#"{"type":"connection_ack""#) {
            acknowledged = true;
            ws.send(Message::text(peer::graphql_subscribe(
                &socket.topic,
                ids_only,
            )))
            .await?;
        } else if acknowledged
            && text.starts_with(r#"{"id":"1","type":"next","payload":{"data":{"listen""#)
        {
            return Ok(Subscription::Started(Box::new(ws)));
        } else if text.starts_with(r#"{"type":"ping""#) {
            ws.send(Message::text(r#"{"type":"pong"}"#)).await?;
        } else {
            return Ok(Subscription::Refused(text));
        }
    }
}

/// Asks a PostGraphile peer for a subscription it must refuse (`socket`'s token may not listen
/// to its topic), and fails unless the peer refuses it for that reason: the peer's authorization
/// is checked before it is measured, so that it is not measured doing less than the relay.
pub async fn check_refused(plan: &Plan, socket: &SocketPlan) -> Result<(), Error> {
    let ws = handshake(plan, socket).await?;
    let ids_only = plan.peer == Some(Peer::PostgraphileIds);
    match subscribe_graphql(ws, socket, ids_only).await? {
        Subscription::Refused(text) if peer::graphql_refusal(&text) => Ok(()),
        Subscription::Refused(text) => Err(format!(
            "the peer answered a subscription to `{}` it must refuse with something else: {text}",
            socket.topic
        )
        .into()),
        Subscription::Started(_) => Err(format!(
            "the peer let a client subscribe to `{}`, which its token may not listen to",
            socket.topic
        )
        .into()),
    }
}

/// Reads one socket's frames until it closes, recording each event; a Socket.IO server's pings
/// are answered, or it would close the socket.
async fn read(mut ws: Socket, stats: Shared, socket: u32, peer: Option<Peer>) {
    let mut last_id = 0i64;
    while let Some(message) = ws.next().await {
        let Ok(Message::Text(text)) = message else {
            if message.is_err() {
                break;
            }
            continue;
        };
        let arrived = now_micros();
        // The kernel's time of the read that completed the frame; never after the reading.
        let stamp = ws.get_ref().received_micros();
        let reached = stamp.map_or(arrived, |at| i128::from(at).min(arrived));
        // Each event's id and the microseconds of its `at`.
        let at_micros = |(id, at): (i64, &str)| (id, micros_of(at));
        let fields = match peer {
            None => event_fields(&text).map(at_micros),
            Some(Peer::Socketio) => match peer::frame(&text) {
                peer::Frame::Event(event) => event_fields(event).map(at_micros),
                peer::Frame::Ping => {
                    if ws.send(Message::text(peer::PONG)).await.is_err() {
                        break;
                    }
                    None
                }
                _ => None,
            },
            Some(peer) => {
                if text.starts_with(r#"{"type":"ping""#)
                    && ws.send(Message::text(r#"{"type":"pong"}"#)).await.is_err()
                {
                    break;
                }
                if peer == Peer::PostgraphileIds {
                    peer::graphql_node_id(&text).map(|(id, at)| (id, micros_of(&at)))
                } else {
                    peer::graphql_event(&text).map(at_micros)
                }
            }
        };
        let Some((id, at)) = fields else {
            continue;
        };
        let latency = at.map(|at| (arrived - at).max(1) as u64);
        let mut stats = lock(&stats);
        stats.deliveries += 1;
        if stamp.is_none() {
            stats.unstamped += 1;
        }
        if id <= last_id {
            stats.out_of_order += 1;
        }
        last_id = id;
        *stats.per_event.entry(id).or_default() += 1;
        stats
            .arrivals
            .push((id, arrived as i64, reached as i64, socket));
        if let Some(latency) = latency {
            stats.latency.saturating_record(latency);
        }
    }
    lock(&stats).closed += 1;
}

async fn say(out: &mut tokio::io::Stdout, message: &impl Serialize) -> Result<(), Error> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    out.write_all(&line).await?;
    out.flush().await?;
    Ok(())
}

/// Runs a client process: the plan comes on stdin, then commands.
pub async fn run() -> Result<(), Error> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let plan: Plan = match lines.next_line().await? {
        Some(line) => serde_json::from_str(&line)?,
        None => return Err("no plan on stdin".into()),
    };
    let stats: Shared = Arc::new(Mutex::new(Stats::new()));

    let start = Instant::now();
    let began_micros = crate::system::now_micros();
    let plan = Arc::new(plan);
    // Opened in any order; each keeps its place in the plan, which names it in the accounting.
    // Each is read from as soon as it is open: a peer that pings closes a socket whose pongs do
    // not come, and the last of 10,000 sockets can open many seconds after the first.
    let opened: Vec<Result<(), Error>> = futures::stream::iter(0..plan.sockets.len())
        .map(|i| {
            let (plan, stats) = (plan.clone(), stats.clone());
            async move {
                let socket = open(&plan, &plan.sockets[i]).await?;
                tokio::spawn(read(socket, stats, i as u32, plan.peer));
                Ok(())
            }
        })
        .buffer_unordered(plan.concurrency.max(1))
        .collect()
        .await;
    let seconds = start.elapsed().as_secs_f64();
    let ended_micros = crate::system::now_micros();
    let sockets = opened
        .into_iter()
        .collect::<Result<Vec<()>, Error>>()?
        .len();
    let ready = Ready {
        sockets,
        seconds,
        began_micros,
        ended_micros,
    };
    say(&mut out, &ready).await?;
    if plan.poll_micros > 0 {
        // The process's one thread sleeps outside the runtime, so no frame wakes it; then the
        // runtime takes every socket that became readable, and the sleep comes round again.
        let nap = std::time::Duration::from_micros(plan.poll_micros);
        tokio::spawn(async move {
            loop {
                std::thread::sleep(nap);
                tokio::task::yield_now().await;
            }
        });
    }

    while let Some(line) = lines.next_line().await? {
        match serde_json::from_str::<Command>(&line)? {
            Command::Reset => {
                let closed = lock(&stats).closed;
                *lock(&stats) = Stats {
                    closed,
                    ..Stats::new()
                };
                say(&mut out, &Done { done: true }).await?;
            }
            Command::Mark => {
                {
                    let mut stats = lock(&stats);
                    stats.at_mark = stats.deliveries;
                }
                say(&mut out, &Done { done: true }).await?;
            }
            Command::Report => {
                let report = lock(&stats).report();
                say(&mut out, &report).await?;
            }
            Command::Acknowledged { commits } => {
                let answer = lock(&stats).since_acknowledgements(&commits);
                say(&mut out, &answer).await?;
            }
            Command::PerSocket { after, upto } => {
                let answer = lock(&stats).per_socket(plan.sockets.len(), after, upto);
                say(&mut out, &answer).await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_from_the_writers_acknowledgement() {
        let mut stats = Stats::new();
        // Event 1 acknowledged at 1,000 µs: deliveries at 1,500 and 900 (before the
        // acknowledgement reached the writer). Event 2 has no acknowledgement and is left out.
        // Each reached its socket 200 µs before it was read.
        stats.arrivals = vec![(1, 1_500, 1_300, 0), (1, 900, 700, 1), (2, 5_000, 4_800, 0)];
        let answer = stats.since_acknowledgements(&[(1, 1_000)]);
        assert_eq!(answer.early, 1);
        let recorded: u64 = answer.latency_us.iter().map(|(_, n)| n).sum();
        assert_eq!(recorded, 2);
        assert_eq!(answer.latency_us.first().map(|(v, _)| *v), Some(1));
        assert!(answer
            .latency_us
            .iter()
            .any(|(v, _)| (499..=501).contains(v)));
        let at_socket: Vec<u64> = answer.at_socket_us.iter().map(|(v, _)| *v).collect();
        assert_eq!(at_socket.len(), 2);
        assert_eq!(at_socket[0], 1);
        assert!((299..=301).contains(&at_socket[1]), "{at_socket:?}");
    }

    #[test]
    fn reads_an_event_frames_id_and_time() {
        let frame = r#"{"type":"event","feed":"appointments","op":"INSERT","id":1042,"cursor":"1042","row":{"id":"x","at":"no"},"at":"2026-11-21T10:37:02.520020Z"}"#;
        let (id, at) = event_fields(frame).unwrap();
        assert_eq!((id, at), (1042, "2026-11-21T10:37:02.520020Z"));
        let full = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp_nanos()
            / 1000;
        assert_eq!(micros_of(at), Some(full));
        assert_eq!(micros_of("2026-11-21T10:37:02.5Z"), Some(full - 20_020));
        assert_eq!(micros_of("2026-11-21T10:37:02Z"), Some(full - 520_020));
        assert!(event_fields(r#"{"type":"pong"}"#).is_none());
    }
}
