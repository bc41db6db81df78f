// The peer relay-bench measures the relay against on the same machine: a plain Socket.IO 4.8 +
// pg-listen relay, as teams write it by hand today. It listens on the relay's own channel (the
// same triggers and the same event log, so Postgres does the same work under both), checks the
// JWT once at connect, puts each socket in a room (`admins`, or `user:<id>`), and emits each
// notification to the admins' room and to the rooms of the users its row names. It has no
// per-row authorization, no projection, no replay, and drops what it cannot route: only the
// fan-out workload (`relay-bench --mode fanout --peer socketio`) is a fair comparison.
//
// Settings come from the environment: DATABASE_URL, PEER_BIND (host:port), PEER_JWT_SECRET.
// GET /health answers 200: the server listens once the LISTEN is in place.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const createSubscriber = require("pg-listen").default;
const jwt = require("jsonwebtoken");

const CHANNEL = "relay_events";

const { databaseUrl, host, port, secret } = require("./settings")("socketio");

// Listening only once the LISTEN is in place, so a health check that answers means it is.
const server = http.createServer((req, res) => {
  if (req.url === "/health") {
    res.writeHead(200).end();
  } else {
    res.writeHead(404).end();
  }
});

// WebSocket only, as the relay's clients connect; no long-polling upgrade dance.
const io = new Server(server, { transports: ["websocket"], serveClient: false });

io.use((socket, next) => {
  const token = socket.handshake.query.access_token || socket.handshake.auth?.token;
  try {
    const claims = jwt.verify(token, secret, { algorithms: ["HS256"] });
    socket.data.room = claims.role === "admin" ? "admins" : `user:${claims.sub}`;
    next();
  } catch (e) {
    next(new Error(`unauthorized: ${e.message}`));
  }
});

io.on("connection", (socket) => {
  socket.join(socket.data.room);
});

const subscriber = createSubscriber({ connectionString: databaseUrl });

subscriber.notifications.on(CHANNEL, (payload) => {
  // An event too large for a notification comes as its id alone; this peer does not fetch it.
  if (!payload || payload.fetch) {
    return;
  }
  const rooms = new Set(["admins"]);
  for (const row of [payload.new, payload.old]) {
    for (const user of [row?.patient_id, row?.dentist_id]) {
      if (user) {
        rooms.add(`user:${user}`);
      }
    }
  }
  // `at` last, as the relay writes its event frames.
  io.to([...rooms]).emit("event", {
    type: "event",
    feed: payload.table,
    op: payload.op,
    id: payload.id,
    row: payload.new ?? payload.old,
    at: payload.at,
  });
});

subscriber.events.on("error", (error) => {
  console.error("socketio peer: database connection lost:", error);
  process.exit(1);
});

process.on("SIGTERM", () => {
  subscriber.close().finally(() => process.exit(0));
});

(async () => {
  await subscriber.connect();
  await subscriber.listenTo(CHANNEL);
  server.listen(port, host);
})().catch((error) => {
  console.error("socketio peer: cannot start:", error);
  process.exit(1);
});
