// The relay inspector: connect with a token, choose feeds, and watch events arrive with their op,
// time and row; the rows the token can see now; per-feed counts and rates; the connection state.
// Plain JavaScript served as is by the relay (no build step, no external assets). It reconnects
// by itself and resumes each feed from its last cursor, as a dashboard should.

const FEEDS = ["appointments", "availability", "consultation_sessions", "consultation_messages"];
const MAX_EVENTS = 500;
const MAX_ROWS = 1000;
const RATE_WINDOW_MS = 10_000;
// A ping every HEARTBEAT_MS; a socket that brings nothing within ANSWER_MS after one is given up
// on at once. (Closing it and waiting for its close event would wait for a closing handshake a
// vanished relay never answers: in Chromium, about a minute more.)
const HEARTBEAT_MS = 15_000;
const ANSWER_MS = 10_000;

const $ = (selector) => document.querySelector(selector);
const state = {
  socket: null,
  wanted: false,
  token: "",
  feeds: [],
  filter: "",
  attempt: 0,
  retry: null,
  stats: new Map(), // feed -> { count, times: [], cursor }
  rows: new Map(), // feed -> Map(id -> row)
  identity: "", // sub and role of the token the state above belongs to
  opened: false, // whether the current socket ever opened
  heard: true, // whether anything arrived since the last heartbeat
  heartbeat: null,
  answer: null, // the deadline of the last heartbeat's answer
};

function setState(value, detail = "") {
  const output = $("#state");
  output.textContent = detail ? `${value} (${detail})` : value;
  output.dataset.state = value;
  $("#connect-button").disabled = state.wanted;
  $("#disconnect-button").disabled = !state.wanted;
}

function say(message) {
  $("#message").textContent = message;
}

function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(Math.ceil(part.length / 4) * 4, "=")));
  } catch {
    return null;
  }
}

function statsOf(feed) {
  if (!state.stats.has(feed)) state.stats.set(feed, { count: 0, times: [], cursor: "" });
  return state.stats.get(feed);
}

function rowsOf(feed) {
  if (!state.rows.has(feed)) state.rows.set(feed, new Map());
  return state.rows.get(feed);
}

function subscribe(socket, feed) {
  const frame = { type: "subscribe", ref: feed, feed };
  if (feed === "consultation_messages" && state.filter) frame.filter = { session_id: state.filter };
  const cursor = statsOf(feed).cursor;
  if (cursor) frame.since = cursor;
  socket.send(JSON.stringify(frame));
}

function connect() {
  clearTimeout(state.retry);
  const who = claims(state.token);
  if (who && typeof who.exp === "number" && who.exp * 1000 <= Date.now()) {
    state.wanted = false;
    setState("closed", "token expired");
    say("This token has expired. Paste a fresh one.");
    return;
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/ws?access_token=${encodeURIComponent(state.token)}`;
  setState(state.attempt === 0 ? "connecting" : "reconnecting");
  const socket = new WebSocket(url);
  state.socket = socket;
  state.opened = false;
  socket.onopen = () => {
    state.attempt = 0;
    state.opened = true;
    setState("open");
    say("");
    for (const feed of state.feeds) subscribe(socket, feed);
    // A socket that stops answering is given up on, and the page reconnects.
    clearInterval(state.heartbeat);
    state.heartbeat = setInterval(() => {
      state.heard = false;
      socket.send(JSON.stringify({ type: "ping", ref: "heartbeat" }));
      clearTimeout(state.answer);
      state.answer = setTimeout(() => {
        if (!state.heard && state.socket === socket) abandon(socket, "no answer to the heartbeat");
      }, ANSWER_MS);
    }, HEARTBEAT_MS);
  };
  socket.onmessage = (message) => {
    state.heard = true;
    received(socket, JSON.parse(message.data));
  };
  socket.onclose = (event) => closed(socket, event.code, event.reason);
}

/** Gives up on a socket without waiting for its closing handshake. */
function abandon(socket, why) {
  socket.onclose = null;
  socket.onmessage = null;
  socket.close(4000, why);
  say(`The relay stopped answering (${why}).`);
  closed(socket, 4000, why);
}

function closed(socket, code, reason) {
  if (state.socket !== socket) return;
  state.socket = null;
  clearInterval(state.heartbeat);
  clearTimeout(state.answer);
  if (!state.wanted) {
    setState("closed");
    return;
  }
  if (code === 4010) {
    // The relay's event log went back (a restore, a failover): start every feed over, live.
    for (const feed of state.feeds) {
      statsOf(feed).cursor = "";
      rowsOf(feed).clear();
      renderRows(feed);
    }
    say(`The relay closed the socket: ${reason || code}. Starting over live.`);
  }
  if (code === 4001 || code === 4003) {
    state.wanted = false;
    setState("closed", code === 4001 ? "token expired" : "identity changed");
    say(`The relay closed the socket: ${reason || code}. Paste a fresh token.`);
    return;
  }
  const delay = Math.min(10_000, 250 * 2 ** state.attempt) * (0.5 + Math.random());
  state.attempt += 1;
  setState("reconnecting", `in ${(delay / 1000).toFixed(1)} s`);
  state.retry = setTimeout(connect, delay);
  if (!state.opened) void explainRefusal();
}

/**
 * The socket closed before it opened: the upgrade was refused, or the relay is unreachable. The
 * browser cannot see which, so ask the HTTP API: a token it refuses is given up on (it will not
 * work later either); a token it accepts means one of the relay's limits, or the origin.
 */
async function explainRefusal() {
  const token = state.token;
  let response;
  try {
    response = await fetch("/api/realtime/status", { headers: { Authorization: `Bearer ${token}` } });
  } catch {
    say("The relay cannot be reached.");
    return;
  }
  // Stopped, another token, or a later attempt opened meanwhile: this answer is about the past.
  // (A later attempt still connecting, with the same token, is answered by it too.)
  if (!state.wanted || state.token !== token || state.opened) {
    return;
  }
  if (response.ok) {
    say(
      "The relay refused the socket although the token is valid: too many sockets for this user " +
        "(RELAY_MAX_SOCKETS_PER_USER), the relay full (RELAY_MAX_SOCKETS), or this page's origin " +
        "not in RELAY_ALLOWED_ORIGINS. Retrying.",
    );
    return;
  }
  let body = {};
  try {
    body = await response.json();
  } catch {
    // Not the relay's JSON: say what there is.
  }
  if (response.status === 401 && body.error !== "token_not_yet_valid") {
    state.wanted = false;
    clearTimeout(state.retry);
    setState("closed", "token refused");
    say(`The relay refused the token: ${body.error}: ${body.message}. Paste a fresh one.`);
    return;
  }
  say(`The relay answered ${response.status}${body.error ? ` ${body.error}: ${body.message}` : ""}. Retrying.`);
}

function received(socket, frame) {
  switch (frame.type) {
    case "subscribed": {
      const stats = statsOf(frame.feed);
      if (!stats.cursor) stats.cursor = frame.cursor;
      renderStats();
      break;
    }
    case "event":
      onEvent(frame);
      break;
    case "error": {
      say(`${frame.ref ? `${frame.ref}: ` : ""}${frame.code}: ${frame.message}`);
      const feed = FEEDS.includes(frame.ref) ? frame.ref : null;
      if (feed && frame.code === "cursor_expired") {
        // Too far behind to resume: start over live for that feed.
        statsOf(feed).cursor = "";
        rowsOf(feed).clear();
        renderRows(feed);
        subscribe(socket, feed);
      } else if (feed && frame.code === "unavailable") {
        setTimeout(() => state.socket === socket && subscribe(socket, feed), 1000);
      }
      break;
    }
    default:
      break;
  }
}

function onEvent(event) {
  const stats = statsOf(event.feed);
  stats.count += 1;
  stats.times.push(Date.now());
  stats.cursor = event.cursor;
  const rows = rowsOf(event.feed);
  if (event.op === "DELETE") rows.delete(event.row.id);
  else if (rows.has(event.row.id) || rows.size < MAX_ROWS) rows.set(event.row.id, event.row);
  addEventRow(event);
  updateRow(event.feed, event.row.id);
  renderStats();
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function addEventRow(event) {
  const body = $("#events tbody");
  const tr = document.createElement("tr");
  tr.className = "fresh";
  tr.append(
    cell(
      new Date(event.at).toLocaleTimeString([], {
        hour: "2-digit",
        minute: "2-digit",
        second: "2-digit",
        fractionalSecondDigits: 3,
        hour12: false,
      }),
    ),
    cell(event.feed),
    cell(event.op, `op-${event.op}`),
  );
  const row = document.createElement("td");
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = event.row.id;
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(event.old ? { row: event.row, old: event.old } : event.row, null, 2);
  details.append(summary, pre);
  row.append(details);
  tr.append(row, cell(event.cursor));
  body.prepend(tr);
  while (body.rows.length > MAX_EVENTS) body.deleteRow(-1);
}

function text(value) {
  if (value === null || value === undefined) return "";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

/** The feed's table of visible rows; its columns are those of the first row seen. */
function tableOf(feed, sample) {
  const container = $("#rows");
  let table = container.querySelector(`table[data-feed="${feed}"]`);
  if (!table && sample) {
    table = document.createElement("table");
    table.dataset.feed = feed;
    table.createCaption().textContent = `${feed} (at most ${MAX_ROWS} rows)`;
    const headRow = table.createTHead().insertRow();
    for (const column of Object.keys(sample)) {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = column;
      headRow.append(th);
    }
    table.createTBody();
    container.append(table);
  }
  return table;
}

/** Adds, updates or removes one row's line, leaving the others alone. */
function updateRow(feed, id) {
  const row = rowsOf(feed).get(id);
  const table = tableOf(feed, row);
  if (!table) return;
  const existing = [...table.tBodies[0].rows].find((tr) => tr.dataset.rowId === id);
  if (!row) {
    existing?.remove();
    return;
  }
  const columns = [...table.tHead.rows[0].cells].map((th) => th.textContent);
  const tr = document.createElement("tr");
  tr.dataset.rowId = id;
  tr.className = "fresh";
  for (const column of columns) tr.append(cell(text(row[column])));
  if (existing) existing.replaceWith(tr);
  else table.tBodies[0].append(tr);
}

function renderRows(feed) {
  const table = $("#rows").querySelector(`table[data-feed="${feed}"]`);
  if (table) table.tBodies[0].replaceChildren();
  for (const id of rowsOf(feed).keys()) updateRow(feed, id);
}

function renderStats() {
  const body = $("#stats tbody");
  body.replaceChildren();
  const now = Date.now();
  for (const feed of state.feeds) {
    const stats = statsOf(feed);
    stats.times = stats.times.filter((t) => now - t <= RATE_WINDOW_MS);
    const tr = body.insertRow();
    tr.dataset.feed = feed;
    tr.append(
      cell(feed),
      cell(String(stats.count)),
      cell((stats.times.length / (RATE_WINDOW_MS / 1000)).toFixed(1)),
      cell(String(rowsOf(feed).size)),
      cell(stats.cursor),
    );
  }
}

function start(event) {
  event.preventDefault();
  const token = $("#token").value.trim();
  const feeds = [...document.querySelectorAll('input[name="feed"]:checked')].map((input) => input.value);
  if (!token) return say("Paste a token first.");
  if (feeds.length === 0) return say("Choose at least one feed.");
  const who = claims(token);
  $("#identity").textContent = who ? `as ${who.role} ${who.sub}` : "";
  // Another user's cursors and rows are not this one's.
  const identity = who ? `${who.sub}/${who.role}` : token;
  if (identity !== state.identity) clear();
  state.identity = identity;
  state.token = token;
  state.feeds = feeds.filter((feed) => FEEDS.includes(feed));
  state.filter = $("#session-filter").value.trim();
  state.wanted = true;
  state.attempt = 0;
  connect();
  renderStats();
}

function stop() {
  state.wanted = false;
  clearTimeout(state.retry);
  if (state.socket) state.socket.close(1000, "inspector closed");
  state.socket = null;
  setState("closed");
}

function clear() {
  state.stats.clear();
  state.rows.clear();
  $("#events tbody").replaceChildren();
  $("#rows").replaceChildren();
  renderStats();
}

async function loadDemoUsers() {
  try {
    const response = await fetch("/dev/tokens");
    if (!response.ok) return;
    const users = await response.json();
    if (users.length === 0) return;
    const select = $("#demo-user");
    for (const user of users) {
      const option = document.createElement("option");
      option.value = user.user_id;
      option.textContent = `${user.role}: ${user.name}`;
      select.append(option);
    }
    // A token signed now, so a page left open longer than a token lives still gets one that works.
    select.addEventListener("change", async () => {
      const picked = select.value;
      let fresh = users;
      try {
        const again = await fetch("/dev/tokens");
        if (again.ok) fresh = await again.json();
      } catch {
        // The relay is unreachable: the token loaded with the page is the best there is.
      }
      const user = fresh.find((u) => u.user_id === picked);
      if (user && select.value === picked) $("#token").value = user.token;
    });
    $("#demo").hidden = false;
  } catch {
    // Not `relay dev`: no demo users.
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#connect").addEventListener("submit", start);
  $("#disconnect-button").addEventListener("click", stop);
  $("#clear-button").addEventListener("click", clear);
  setInterval(renderStats, 1000);
  // A token in the fragment (never sent to the server): /#token=<jwt>&feeds=appointments,availability
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("token")) {
    $("#token").value = params.get("token");
    const feeds = params.get("feeds");
    if (feeds) {
      for (const input of document.querySelectorAll('input[name="feed"]')) {
        input.checked = feeds.split(",").includes(input.value);
      }
    }
    history.replaceState(null, "", location.pathname);
    $("#connect").requestSubmit();
  }
  void loadDemoUsers();
});
