// The client against a scripted socket, on fake timers: what it does after a replay fails
// part-way, across a dropped connection (pacing, retries), with oversized frames, when it
// refreshes tokens, and when its socket is refused before it opens (the relay's HTTP API
// played by a stubbed fetch). The relay's side of each case is in docs/protocol.md.

import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import {
  connect,
  SendError,
  type ConnectOptions,
  type ConnectionState,
  type RelayClient,
  type RelayError,
  type SocketLike,
  type WebSocketConstructor,
} from "../src/index.js";

type Frame = Record<string, unknown>;

/** A socket whose peer is the test: it records what the client sends and plays the relay. */
class ScriptedSocket implements SocketLike {
  static opened: ScriptedSocket[] = [];
  readyState = 0;
  readonly sent: Frame[] = [];
  onopen: ((event: unknown) => void) | null = null;
  onmessage: ((event: { data: unknown }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;

  constructor(readonly url: string) {
    ScriptedSocket.opened.push(this);
  }

  send(data: string): void {
    const frame = JSON.parse(data) as Frame;
    this.sent.push(frame);
    // The heartbeat is answered, as the relay does.
    if (frame.type === "ping") {
      queueMicrotask(() => this.reply({ type: "pong", ref: frame.ref }));
    }
  }

  close(): void {
    this.readyState = 3;
  }

  /** The relay accepts the connection. */
  accept(): void {
    this.readyState = 1;
    this.onopen?.({});
  }

  reply(frame: Frame): void {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  /** The relay closes the connection. */
  end(code: number, reason = ""): void {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  of(type: string): Frame[] {
    return this.sent.filter((frame) => frame.type === type);
  }
}

const Socket = ScriptedSocket as unknown as WebSocketConstructor;
const SESSION = "00000000-0000-4000-8000-000000000001";

function latest(): ScriptedSocket {
  const socket = ScriptedSocket.opened.at(-1);
  if (!socket) {
    throw new Error("no socket opened");
  }
  return socket;
}

/** An unsigned JWT with these claims; the client only reads them. */
function jwt(claims: Frame): string {
  const part = (value: Frame) => Buffer.from(JSON.stringify(value)).toString("base64url");
  return `${part({ alg: "HS256" })}.${part(claims)}.signature`;
}

const seconds = () => Math.floor(Date.now() / 1000);

/** A client whose first connection the relay has accepted. */
async function accepted(options: Partial<ConnectOptions> = {}): Promise<RelayClient> {
  const client = await connecting(options);
  latest().accept();
  return client;
}

function event(id: number): Frame {
  return {
    type: "event",
    feed: "appointments",
    op: "INSERT",
    id,
    cursor: String(id),
    at: "2026-11-22T00:00:00.000000Z",
    row: { id: `row-${id}` },
  };
}

beforeEach(() => {
  vi.useFakeTimers();
  ScriptedSocket.opened = [];
});

afterEach(() => {
  vi.useRealTimers();
  vi.unstubAllGlobals();
});

/** A client whose first socket has been made, not yet accepted. */
async function connecting(options: Partial<ConnectOptions> = {}): Promise<RelayClient> {
  const client = connect({
    url: "ws://relay/ws",
    token: jwt({ exp: seconds() + 3600 }),
    WebSocket: Socket,
    initialBackoffMs: 10,
    maxBackoffMs: 10,
    ...options,
  });
  await vi.advanceTimersByTimeAsync(0);
  return client;
}

/** What the relay's GET /api/realtime/status answers a token, as the stubbed fetch plays it. */
type StatusAnswer = 200 | { refused: string } | "unreachable";

/** Stubs fetch as the relay's HTTP API; returns the requests it got. */
function relayApi(answer: (token: string) => StatusAnswer): { url: string; token: string }[] {
  const asked: { url: string; token: string }[] = [];
  vi.stubGlobal("fetch", async (url: string, init?: RequestInit) => {
    const token = (new Headers(init?.headers).get("Authorization") ?? "").replace(/^Bearer /, "");
    asked.push({ url: String(url), token });
    const reply = answer(token);
    if (reply === "unreachable") {
      throw new TypeError("fetch failed");
    }
    if (reply === 200) {
      return Response.json({ userId: "u", role: "dentist", subscriptions: [] });
    }
    const body = { error: reply.refused, message: `refused: ${reply.refused}` };
    return Response.json(body, { status: 401 });
  });
  return asked;
}

/** The relay refuses the latest socket's upgrade: it closes before it opens. */
async function refuse(): Promise<void> {
  latest().end(1006);
  await vi.advanceTimersByTimeAsync(20);
}

function watch(client: RelayClient): { errors: RelayError[]; states: ConnectionState[] } {
  const seen = { errors: [] as RelayError[], states: [] as ConnectionState[] };
  client.on("error", (e) => seen.errors.push(e));
  client.on("state", (s) => seen.states.push(s));
  return seen;
}

describe("the first connection", () => {
  it("reports an expired fixed token to listeners attached after connect()", async () => {
    const client = connect({
      url: "ws://relay/ws",
      token: jwt({ exp: seconds() - 60 }),
      WebSocket: Socket,
    });
    const { errors, states } = watch(client);
    await vi.advanceTimersByTimeAsync(0);
    expect(errors).toMatchObject([{ code: "token_expired" }]);
    expect(states).toEqual(["closed"]);
    expect(ScriptedSocket.opened).toHaveLength(0);
  });
});

describe("a socket refused before it opens", () => {
  it("ends a client whose fixed token the relay refuses, with the relay's code", async () => {
    const token = jwt({ exp: seconds() + 3600 });
    const asked = relayApi(() => ({ refused: "invalid_signature" }));
    const client = await connecting({ url: "wss://relay.example:8443/ws?tenant=a", token });
    const { errors, states } = watch(client);
    await refuse();
    expect(asked).toEqual([{ url: "https://relay.example:8443/api/realtime/status", token }]);
    expect(errors).toEqual([{ code: "invalid_signature", message: "refused: invalid_signature" }]);
    expect(states).toEqual(["reconnecting", "closed"]);
    await vi.advanceTimersByTimeAsync(10_000);
    expect(ScriptedSocket.opened).toHaveLength(1);
  });

  it("keeps trying fresh tokens from getToken, reporting the refusal once", async () => {
    let issued = 0;
    const getToken = () => jwt({ exp: seconds() + 3600, n: ++issued });
    const asked = relayApi(() => ({ refused: "invalid_token" }));
    const client = await connecting({ token: undefined, getToken });
    const { errors, states } = watch(client);
    await refuse();
    await refuse();
    await refuse();
    // Each asked about with the token its socket was made with, each a fresh one.
    const used = ScriptedSocket.opened.slice(0, 3).map((s) => new URL(s.url).searchParams.get("access_token"));
    expect(asked.map((a) => a.token)).toEqual(used);
    expect(new Set(used).size).toBe(3);
    expect(errors).toMatchObject([{ code: "invalid_token" }]);
    expect(states.at(-1)).toBe("reconnecting");
    expect(ScriptedSocket.opened).toHaveLength(4);
    client.close();
  });

  it("asks beside the socket's path, and never when the path is not the relay's", async () => {
    const token = jwt({ exp: seconds() + 3600 });
    const asked = relayApi(() => ({ refused: "invalid_signature" }));
    const client = await connecting({ url: "wss://app.example/realtime/ws", token });
    await refuse();
    expect(asked).toEqual([{ url: "https://app.example/realtime/api/realtime/status", token }]);
    client.close();
    const other = await connecting({ url: "wss://app.example/live", token });
    const { errors } = watch(other);
    await refuse();
    expect(asked).toHaveLength(1);
    expect(errors).toEqual([]);
    expect(other.state).toBe("reconnecting");
    other.close();
  });

  it("takes a 401 that is not the relay's refusal of a token as no answer", async () => {
    vi.stubGlobal(
      "fetch",
      vi.fn(async () => new Response("<html>sign in</html>", { status: 401 })),
    );
    const client = await connecting();
    const { errors } = watch(client);
    await refuse();
    expect(errors).toEqual([]);
    expect(client.state).toBe("reconnecting");
    client.close();
  });

  it("goes on with a fresh token that the relay accepts", async () => {
    const [stale, fresh] = [jwt({ exp: seconds() - 60 }), jwt({ exp: seconds() + 3600 })];
    let issued = 0;
    const getToken = () => (issued++ === 0 ? stale : fresh);
    relayApi((token) => (token === stale ? { refused: "token_expired" } : 200));
    const client = await connecting({ token: undefined, getToken });
    const { errors } = watch(client);
    await refuse();
    expect(errors).toMatchObject([{ code: "token_expired" }]);
    latest().accept();
    expect(client.state).toBe("open");
    client.close();
  });

  it("reports a refused socket with a valid token once, and keeps reconnecting", async () => {
    relayApi(() => 200);
    const client = await connecting();
    const { errors } = watch(client);
    await refuse();
    await refuse();
    await refuse();
    expect(errors).toMatchObject([{ code: "connection_refused" }]);
    expect(errors[0]?.message).toContain("RELAY_MAX_SOCKETS_PER_USER");
    expect(client.state).toBe("reconnecting");
    expect(ScriptedSocket.opened).toHaveLength(4);
    // Once per cause until a socket opens: refused again after that, it is reported again.
    latest().accept();
    latest().end(1001);
    await vi.advanceTimersByTimeAsync(20);
    await refuse();
    expect(errors.map((e) => e.code)).toEqual(["connection_refused", "connection_refused"]);
    client.close();
  });

  it("waits, reporting it once, for a token the relay says is not valid yet", async () => {
    relayApi(() => ({ refused: "token_not_yet_valid" }));
    const client = await connecting();
    const { errors } = watch(client);
    await refuse();
    await refuse();
    await refuse();
    expect(errors).toMatchObject([{ code: "token_not_yet_valid" }]);
    expect(client.state).toBe("reconnecting");
    expect(ScriptedSocket.opened).toHaveLength(4);
    client.close();
  });

  it("keeps reconnecting silently when the relay's API is out of reach, or not there", async () => {
    relayApi(() => "unreachable");
    const client = await connecting();
    const { errors } = watch(client);
    await refuse();
    await refuse();
    vi.stubGlobal("fetch", undefined);
    await refuse();
    expect(errors).toEqual([]);
    expect(client.state).toBe("reconnecting");
    expect(ScriptedSocket.opened).toHaveLength(4);
    latest().accept();
    expect(client.state).toBe("open");
    client.close();
  });
});

describe("a relay whose event log went back (close 4010)", () => {
  it("reports every feed's cursor expired once live again, with ids it had seen", async () => {
    const client = await accepted();
    const errors: RelayError[] = [];
    client.on("error", (e) => errors.push(e));
    const delivered: number[] = [];
    client.subscribe("appointments", {}, (e) => delivered.push(e.id));
    const socket = latest();
    const [first] = socket.of("subscribe");
    socket.reply({ type: "subscribed", ref: first?.ref, feed: "appointments", cursor: "10" });
    socket.reply(event(11));
    socket.reply(event(12));
    socket.end(4010, "the event log went back (a restore or a failover): fetch current state");
    await vi.advanceTimersByTimeAsync(20);
    const again = latest();
    expect(again).not.toBe(socket);
    again.accept();
    const [subscribe] = again.of("subscribe");
    expect(subscribe?.since).toBeUndefined();
    // Reported once the feed is live again, so that state fetched then misses nothing.
    expect(errors).toEqual([]);
    again.reply({ type: "subscribed", ref: subscribe?.ref, feed: "appointments", cursor: "9" });
    expect(errors).toMatchObject([{ code: "cursor_expired", feed: "appointments" }]);
    // The restored log hands out ids the client saw before: they are new events.
    again.reply(event(10));
    again.reply(event(11));
    expect(delivered).toEqual([11, 12, 10, 11]);
    client.close();
  });
});

describe("a replay that fails after `subscribed`", () => {
  it("is resumed from the last event delivered when the database was unavailable", async () => {
    const client = await accepted();
    const delivered: number[] = [];
    client.subscribe("appointments", { since: "10" }, (e) => delivered.push(e.id));
    const socket = latest();
    const [first] = socket.of("subscribe");
    socket.reply({ type: "subscribed", ref: first?.ref, feed: "appointments", cursor: "10" });
    socket.reply(event(11));
    socket.reply({
      type: "error",
      ref: first?.ref,
      code: "unavailable",
      message: "the relay could not reach the database; try again",
    });
    // Whatever still arrives for the ended subscription is not delivered.
    socket.reply(event(12));
    await vi.advanceTimersByTimeAsync(1_000);
    const again = socket.of("subscribe");
    expect(again).toHaveLength(2);
    expect(again[1]).toMatchObject({ feed: "appointments", since: "11" });
    socket.reply({ type: "subscribed", ref: again[1]?.ref, feed: "appointments", cursor: "11" });
    socket.reply(event(12));
    expect(delivered).toEqual([11, 12]);
    client.close();
  });

  it("tells the events it has from new ones by a cursor's id, tag or none", async () => {
    const client = await accepted();
    const delivered: number[] = [];
    const subscription = client.subscribe("appointments", { since: "10.0badcafe" }, (e) =>
      delivered.push(e.id),
    );
    const socket = latest();
    const [first] = socket.of("subscribe");
    expect(first?.since).toBe("10.0badcafe");
    socket.reply({
      type: "subscribed",
      ref: first?.ref,
      feed: "appointments",
      cursor: "10.0badcafe",
    });
    socket.reply(event(10));
    socket.reply({ ...event(11), cursor: "11.00c0ffee" });
    expect(delivered).toEqual([11]);
    expect(subscription.cursor).toBe("11.00c0ffee");
    client.close();
  });

  it("moves a quiet feed's cursor to the relay's position, and resumes from there", async () => {
    const client = await accepted();
    const delivered: number[] = [];
    const subscription = client.subscribe("appointments", {}, (e) => delivered.push(e.id));
    const socket = latest();
    const [first] = socket.of("subscribe");
    socket.reply({
      type: "subscribed",
      ref: first?.ref,
      feed: "appointments",
      cursor: "10.0badcafe",
    });
    socket.reply({ type: "position", feed: "appointments", cursor: "40.00c0ffee" });
    expect(subscription.cursor).toBe("40.00c0ffee");
    // Another feed's position, or one behind the cursor, moves nothing.
    socket.reply({ type: "position", feed: "availability", cursor: "50.00000001" });
    socket.reply({ type: "position", feed: "appointments", cursor: "30.00000002" });
    expect(subscription.cursor).toBe("40.00c0ffee");
    socket.reply(event(41));
    expect(delivered).toEqual([41]);
    socket.reply({ type: "position", feed: "appointments", cursor: "45.00000003" });
    socket.end(1001);
    await vi.advanceTimersByTimeAsync(50);
    const again = latest();
    again.accept();
    const [resumed] = again.of("subscribe");
    expect(resumed?.since).toBe("45.00000003");
    client.close();
  });

  it("goes on live when retention overtook it, and is reported once live", async () => {
    const client = await accepted();
    const errors: RelayError[] = [];
    client.on("error", (e) => errors.push(e));
    client.subscribe("appointments", { since: "10" }, () => {});
    const socket = latest();
    const [first] = socket.of("subscribe");
    socket.reply({ type: "subscribed", ref: first?.ref, feed: "appointments", cursor: "10" });
    socket.reply({ type: "error", ref: first?.ref, code: "cursor_expired", message: "expired" });
    const again = socket.of("subscribe");
    expect(again).toHaveLength(2);
    expect(again[1]?.since).toBeUndefined();
    expect(errors).toEqual([]);
    socket.reply({ type: "subscribed", ref: again[1]?.ref, feed: "appointments", cursor: "40" });
    expect(errors).toMatchObject([{ code: "cursor_expired", feed: "appointments" }]);
    client.close();
  });

  it("lets the app unsubscribe from its report without leaving a subscription", async () => {
    const client = await accepted();
    const subscription = client.subscribe("appointments", { since: "10" }, () => {});
    client.on("error", (e) => {
      if (e.code === "cursor_expired") subscription.unsubscribe();
    });
    const socket = latest();
    const [first] = socket.of("subscribe");
    socket.reply({ type: "error", ref: first?.ref, code: "cursor_expired", message: "expired" });
    const [, again] = socket.of("subscribe");
    socket.reply({ type: "subscribed", ref: again?.ref, feed: "appointments", cursor: "40" });
    // The unsubscribe is the last word: nothing subscribes again after it.
    expect(socket.of("subscribe")).toHaveLength(2);
    const feedFrames = socket.sent.filter((f) => f.type === "subscribe" || f.type === "unsubscribe");
    expect(feedFrames.at(-1)?.type).toBe("unsubscribe");
    client.close();
  });

  it("is not confused with the answer to a subscribe since replaced", async () => {
    const client = await accepted();
    client.subscribe("appointments", { since: "10" }, () => {});
    client.subscribe("appointments", {}, () => {});
    const socket = latest();
    const [old] = socket.of("subscribe");
    socket.reply({ type: "error", ref: old?.ref, code: "unavailable", message: "try again" });
    await vi.advanceTimersByTimeAsync(5_000);
    expect(socket.of("subscribe")).toHaveLength(2);
    client.close();
  });
});

describe("across a dropped connection", () => {
  it("paces a burst to the end, though the drop came in the middle of one", async () => {
    const client = await accepted();
    const sends = Array.from({ length: 60 }, (_, i) => client.send(SESSION, `message ${i}`));
    for (const send of sends) {
      send.catch(() => {});
    }
    latest().end(1006);
    await vi.advanceTimersByTimeAsync(1_100);
    const socket = latest();
    socket.accept();
    // One second's worth at once, the rest paced.
    expect(socket.of("send")).toHaveLength(40);
    await vi.advanceTimersByTimeAsync(2_000);
    expect(socket.of("send")).toHaveLength(60);
    client.close();
  });

  it("hands the clientId of a send cut short by close() to the next client", async () => {
    const client = await accepted();
    const first = client.send(SESSION, "one");
    const [frame] = latest().of("send");
    client.close();
    const error = await first.catch((e: unknown) => e);
    expect(error).toBeInstanceOf(SendError);
    expect(error).toMatchObject({ code: "closed", clientId: frame?.client_id });

    const next = await accepted();
    const again = next.send(SESSION, "one", { clientId: (error as SendError).clientId });
    const [resent] = latest().of("send");
    expect(resent?.client_id).toBe(frame?.client_id);
    // One waiting send per clientId; and only a uuid will do.
    await expect(next.send(SESSION, "one", { clientId: frame?.client_id as string })).rejects.toMatchObject({
      code: "conflict",
    });
    await expect(next.send(SESSION, "one", { clientId: "not-a-uuid" })).rejects.toMatchObject({
      code: "bad_request",
    });
    latest().reply({ type: "sent", ref: resent?.ref, id: "m1", client_id: resent?.client_id });
    await expect(again).resolves.toMatchObject({ id: "m1", clientId: frame?.client_id });
    next.close();
  });

  it("retries a send answered `unavailable` on the next connection too", async () => {
    const client = await accepted();
    const first = client.send(SESSION, "one");
    let socket = latest();
    const [frame] = socket.of("send");
    socket.reply({ type: "error", ref: frame?.ref, code: "unavailable", message: "try again" });
    socket.end(1001);
    await vi.advanceTimersByTimeAsync(50);
    socket = latest();
    socket.accept();
    const [resent] = socket.of("send");
    expect(resent?.client_id).toBe(frame?.client_id);
    socket.reply({ type: "sent", ref: resent?.ref, id: "m1", client_id: resent?.client_id });
    await expect(first).resolves.toMatchObject({ id: "m1" });

    const second = client.send(SESSION, "two");
    const [, next] = socket.of("send");
    socket.reply({ type: "error", ref: next?.ref, code: "unavailable", message: "try again" });
    await vi.advanceTimersByTimeAsync(1_000);
    const retried = socket.of("send").filter((f) => f.client_id === next?.client_id);
    expect(retried).toHaveLength(2);
    socket.reply({ type: "sent", ref: next?.ref, id: "m2", client_id: next?.client_id });
    await expect(second).resolves.toMatchObject({ id: "m2" });
    client.close();
  });

  it("sends a subscribe once on reconnecting, though a retry of it was planned", async () => {
    const client = await accepted();
    client.subscribe("appointments", {}, () => {});
    let socket = latest();
    const [first] = socket.of("subscribe");
    socket.reply({ type: "error", ref: first?.ref, code: "unavailable", message: "try again" });
    socket.end(1001);
    await vi.advanceTimersByTimeAsync(50);
    socket = latest();
    socket.accept();
    await vi.advanceTimersByTimeAsync(2_000);
    expect(socket.of("subscribe")).toHaveLength(1);
    client.close();
  });
});

describe("presence", () => {
  it("marks each session's whole list, again after a reconnect", async () => {
    const client = await accepted();
    const seen: [string, boolean, number][] = [];
    client.on("presence", (p) => seen.push([p.session_id, p.first, p.joined.length]));
    client.subscribe("consultation_messages", { filter: { session_id: SESSION } }, () => {});
    const member = { user_id: "00000000-0000-4000-8000-0000000000aa", role: "patient" };
    const dentist = { user_id: "00000000-0000-4000-8000-0000000000bb", role: "dentist" };
    let socket = latest();
    let [subscribe] = socket.of("subscribe");
    socket.reply({ type: "subscribed", ref: subscribe?.ref, feed: "consultation_messages", cursor: "1" });
    socket.reply({ type: "presence", session_id: SESSION, joined: [member, dentist], left: [] });
    socket.reply({ type: "presence", session_id: SESSION, joined: [], left: [dentist] });
    socket.end(1001);
    await vi.advanceTimersByTimeAsync(50);
    socket = latest();
    socket.accept();
    [subscribe] = socket.of("subscribe");
    socket.reply({ type: "subscribed", ref: subscribe?.ref, feed: "consultation_messages", cursor: "1" });
    socket.reply({ type: "presence", session_id: SESSION, joined: [member], left: [] });
    expect(seen).toEqual([
      [SESSION, true, 2],
      [SESSION, false, 0],
      [SESSION, true, 1],
    ]);
    client.close();
  });
});

describe("frames the relay would refuse", () => {
  it("refuses a body whose frame is over the relay's limit, and never sends it", async () => {
    const client = await accepted();
    // Within 4,000 characters after trimming, but not as a frame.
    const body = `see below.${"\n".repeat(70_000)}`;
    await expect(client.send(SESSION, body)).rejects.toBeInstanceOf(SendError);
    await expect(client.send(SESSION, body)).rejects.toMatchObject({ code: "invalid_body" });
    expect(latest().of("send")).toHaveLength(0);
    expect(client.pendingSends).toBe(0);
    client.close();
  });

  it("takes the limit the relay was given", async () => {
    const client = await accepted({ maxFrameBytes: 1_024 });
    await expect(client.send(SESSION, "x".repeat(2_000))).rejects.toMatchObject({
      code: "invalid_body",
    });
    client.close();
  });
});

describe("token refresh", () => {
  it("is timed from the time the token has left, not from its whole life", async () => {
    // A getToken that hands back a cached token, 55 minutes into its hour.
    const cached = jwt({ iat: seconds() - 3_300, exp: seconds() + 300 });
    const client = await accepted({ token: undefined, getToken: () => cached });
    const socket = latest();
    await vi.advanceTimersByTimeAsync(240_000); // 60 s before it expires
    expect(socket.of("auth")).toHaveLength(1);
    client.close();
  });

  it("waits for a token that lives longer than a timer can wait", async () => {
    const lasting = jwt({ iat: seconds(), exp: seconds() + 30 * 86_400 });
    let fetched = 0;
    const client = await accepted({
      token: undefined,
      getToken: () => {
        fetched += 1;
        return lasting;
      },
    });
    await vi.advanceTimersByTimeAsync(60_000);
    expect(latest().of("auth")).toHaveLength(0);
    expect(fetched).toBe(1);
    client.close();
  });

  it("tries again with a fresh token when the relay refuses one", async () => {
    const token = jwt({ iat: seconds(), exp: seconds() + 120 });
    const client = await accepted({ token: undefined, getToken: () => token });
    const errors: RelayError[] = [];
    client.on("error", (e) => errors.push(e));
    const socket = latest();
    await vi.advanceTimersByTimeAsync(60_000);
    const [auth] = socket.of("auth");
    expect(auth).toBeDefined();
    socket.reply({ type: "error", ref: auth?.ref, code: "invalid_token", message: "refused" });
    expect(errors).toMatchObject([{ code: "invalid_token" }]);
    await vi.advanceTimersByTimeAsync(5_000);
    expect(socket.of("auth")).toHaveLength(2);
    client.close();
  });
});
