// The client against a real relay and a real Postgres: reconnects lose nothing, tokens are
// refreshed in place, sends made offline are delivered once, a lost reply never duplicates, and
// a socket the relay refuses is explained.

import { createHmac, randomUUID } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";

import {
  connect,
  SendError,
  type ConnectOptions,
  type ChangeEvent,
  type ConnectionState,
  type RelayClient,
  type RelayError,
  type WebSocketConstructor,
} from "../src/index.js";
import { freePort, Relay, SECRET, TestDb, token, until, type User } from "./support.js";

// Node 20 has no WebSocket of its own; the client takes any that follows the standard API. No
// cast, for either: `npm run typecheck` checks that `ws`'s class and the browser's fit as they are.
const Socket: WebSocketConstructor = WebSocket;
const browserSocket: WebSocketConstructor | undefined = globalThis.WebSocket;

/** An HS256 token with these claims, signed with `secret`: what `relay token` would not make. */
function signed(claims: Record<string, unknown>, secret: string): string {
  const part = (value: object) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const unsigned = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${unsigned}.${createHmac("sha256", secret).update(unsigned).digest("base64url")}`;
}

let db: TestDb;
let patient: User;
let dentist: User;

beforeAll(async () => {
  db = await TestDb.create();
  patient = await db.user("patient");
  dentist = await db.user("dentist");
});

afterAll(async () => {
  await db.drop();
});

/** A relay on a fresh port and a client of it for `who`, with quick reconnects. */
async function started(
  who: User,
  options: Partial<ConnectOptions> = {},
  env: Record<string, string> = {},
): Promise<{ port: number; relay: Relay; client: RelayClient }> {
  const port = await freePort();
  const relay = await Relay.start(db, port, env);
  const client = connect({
    url: relay.url,
    getToken: () => token(who),
    WebSocket: Socket,
    initialBackoffMs: 50,
    maxBackoffMs: 300,
    ...options,
  });
  return { port, relay, client };
}

/** Stops the relay and waits until the client knows it is offline. */
async function offline(relay: Relay, client: RelayClient): Promise<void> {
  await until(() => client.state === "open", "the connection");
  await relay.stop();
  await until(() => client.state === "reconnecting", "the client to go offline");
}

function states(client: RelayClient): ConnectionState[] {
  const seen: ConnectionState[] = [client.state];
  client.on("state", (state) => seen.push(state));
  return seen;
}

async function openSession(): Promise<string> {
  const rows = await db.query<{ id: string }>(
    "insert into consultation_sessions (patient_id, dentist_id) values ($1, $2) returning id",
    [patient.id, dentist.id],
  );
  return rows[0]!.id;
}

describe("the relay client", () => {
  it("resumes after the relay restarts and delivers every event once, in order", async () => {
    const port = await freePort();
    let relay = await Relay.start(db, port);
    const client = connect({
      url: relay.url,
      getToken: () => token(dentist),
      WebSocket: Socket,
      initialBackoffMs: 50,
      maxBackoffMs: 500,
    });
    const seen = states(client);
    const received: ChangeEvent<"appointments">[] = [];
    const subscription = client.subscribe("appointments", {}, (event) => {
      received.push(event);
    });
    await until(() => subscription.cursor !== undefined, "the subscription");

    for (let i = 0; i < 10; i++) await db.book(patient, dentist);
    await until(() => received.length === 10, "the first ten events");

    // Killed outright, mid-stream; bookings go on while it is down; then it is back.
    await relay.stop("SIGKILL");
    await until(() => client.state === "reconnecting", "the client to notice");
    for (let i = 0; i < 10; i++) await db.book(patient, dentist);
    relay = await Relay.start(db, port);
    for (let i = 0; i < 10; i++) await db.book(patient, dentist);
    await until(() => received.length >= 30, "all thirty events");

    const mine = await db.query<{ id: string }>(
      "select id from appointments where dentist_id = $1",
      [dentist.id],
    );
    const ids = received.map((event) => event.id);
    expect(ids).toEqual([...ids].sort((a, b) => a - b));
    expect(new Set(ids).size).toBe(ids.length);
    expect(new Set(received.map((e) => e.row.id))).toEqual(new Set(mine.map((r) => r.id)));
    expect(received.every((event) => event.op === "INSERT")).toBe(true);
    expect(seen).toContain("reconnecting");
    expect(seen.at(-1)).toBe("open");

    client.close();
    expect(client.state).toBe("closed");
    await relay.stop();
  });

  it("refreshes its token before it expires and keeps the same socket", async () => {
    const port = await freePort();
    // No leeway: a token is dead the second it expires.
    const relay = await Relay.start(db, port, { RELAY_JWT_LEEWAY: "0s" });
    // Signed here, at once: 12 s tokens, refreshed halfway through their life (the margin is at
    // most half the lifetime), which leaves 6 s for the refresh to reach the relay.
    const ttl = 12;
    let issued = 0;
    let firstExpiry = 0;
    const client = connect({
      url: relay.url,
      getToken: () => {
        issued += 1;
        const iat = Math.floor(Date.now() / 1000);
        if (issued === 1) firstExpiry = (iat + ttl) * 1000;
        return signed({ sub: dentist.id, role: dentist.role, iat, exp: iat + ttl }, SECRET);
      },
      WebSocket: Socket,
      refreshMarginMs: 6_000,
    });
    const seen = states(client);
    const refreshed: string[] = [];
    client.on("token", (expiresAt) => refreshed.push(expiresAt));
    const received: ChangeEvent<"appointments">[] = [];
    const subscription = client.subscribe("appointments", {}, (event) => {
      received.push(event);
    });
    await until(() => subscription.cursor !== undefined, "the subscription");

    // Two refreshes take the socket past its first token's expiry.
    await until(() => refreshed.length >= 2, "two token refreshes");
    await until(() => Date.now() > firstExpiry, "the first token's expiry");
    const id = await db.book(patient, dentist);
    await until(() => received.some((event) => event.row.id === id), "an event after expiry");
    expect(issued).toBeGreaterThanOrEqual(3);
    // One connection throughout: never reconnected.
    expect(seen.filter((state) => state === "open")).toHaveLength(1);
    expect(seen).not.toContain("reconnecting");

    client.close();
    await relay.stop();
  });

  it("queues a message sent while offline and delivers it once on reconnect", async () => {
    const session = await openSession();
    const { port, relay: first, client } = await started(patient);
    await offline(first, client);

    const sending = client.send(session, "sent while offline");
    expect(client.pendingSends).toBe(1);
    const relay = await Relay.start(db, port);
    const result = await sending;
    expect(client.pendingSends).toBe(0);

    const rows = await db.query<{ id: string; client_id: string }>(
      "select id, client_id from consultation_messages where session_id = $1 and body = $2",
      [session, "sent while offline"],
    );
    expect(rows).toEqual([{ id: result.id, client_id: result.clientId }]);
    client.close();
    await relay.stop();
  });

  it("retries a send whose reply was lost with the same client_id, creating nothing new", async () => {
    const session = await openSession();
    const port = await freePort();
    const relay = await Relay.start(db, port);
    // A socket that loses the first `sent` reply together with its connection, as a network
    // failure right after the relay committed would.
    let lost = 0;
    class LossySocket extends WebSocket {
      constructor(url: string) {
        super(url);
        queueMicrotask(() => {
          const deliver = this.onmessage;
          this.onmessage = (event) => {
            if (lost === 0 && String(event.data).includes('"type":"sent"')) {
              lost += 1;
              this.close(4000, "the reply is lost");
              return;
            }
            deliver?.(event);
          };
        });
      }
    }
    const client = connect({
      url: relay.url,
      getToken: () => token(patient),
      WebSocket: LossySocket,
      initialBackoffMs: 50,
      maxBackoffMs: 300,
    });
    const seen = states(client);
    await until(() => client.state === "open", "the connection");
    const result = await client.send(session, "exactly once");
    expect(lost).toBe(1);
    expect(seen).toContain("reconnecting");

    const rows = await db.query<{ id: string }>(
      "select id from consultation_messages where session_id = $1 and body = $2",
      [session, "exactly once"],
    );
    expect(rows).toEqual([{ id: result.id }]);
    client.close();
    await relay.stop();
  });

  it("rejects a send the relay refuses, with its code", async () => {
    const { relay, client } = await started(patient);
    const missing = client.send(crypto.randomUUID(), "hello?");
    await expect(missing).rejects.toBeInstanceOf(SendError);
    await expect(missing).rejects.toMatchObject({ code: "forbidden" });
    const session = await openSession();
    await expect(client.send(session, "   ")).rejects.toMatchObject({ code: "invalid_body" });
    expect(client.pendingSends).toBe(0);
    client.close();
    await relay.stop();
  });

  it("gives up on a relay that stops answering pings, and resumes when it answers again", async () => {
    const port = await freePort();
    const relay = await Relay.start(db, port);
    const client = connect({
      url: relay.url,
      token: await token(dentist),
      WebSocket: Socket,
      heartbeatMs: 2_000,
      initialBackoffMs: 50,
      maxBackoffMs: 300,
    });
    const seen = states(client);
    const received: ChangeEvent<"appointments">[] = [];
    const subscription = client.subscribe("appointments", {}, (event) => {
      received.push(event);
    });
    await until(() => subscription.cursor !== undefined, "the subscription");

    // Frozen: the TCP connection stays up, but nothing answers.
    relay.signal("SIGSTOP");
    await until(() => client.state === "reconnecting", "a missed pong to be noticed");
    const id = await db.book(patient, dentist);
    relay.signal("SIGCONT");
    await until(() => received.some((event) => event.row.id === id), "the event, after resuming");
    expect(seen).toContain("reconnecting");
    expect(new Set(received.map((e) => e.id)).size).toBe(received.length);
    client.close();
    await relay.stop();
  });

  it("paces a burst of sends queued offline under the relay's rate limit, each delivered once", async () => {
    const session = await openSession();
    const { port, relay: first, client } = await started(patient);
    const errors: string[] = [];
    client.on("error", (error) => errors.push(error.code));
    await offline(first, client);

    // More than the relay's 50 frames per second, all at once when the connection returns.
    const sends = Array.from({ length: 80 }, (_, i) => client.send(session, `burst ${i}`));
    const relay = await Relay.start(db, port);
    const results = await Promise.all(sends);
    expect(new Set(results.map((r) => r.id)).size).toBe(80);
    const rows = await db.query<{ count: string }>(
      "select count(*) from consultation_messages where session_id = $1 and body like 'burst %'",
      [session],
    );
    expect(Number(rows[0]?.count)).toBe(80);
    expect(errors).not.toContain("closed_4029");
    client.close();
    await relay.stop();
  });

  it("refuses a body the relay would refuse without sending it, and anything after close", async () => {
    const { relay, client } = await started(patient);
    const session = await openSession();
    for (const body of ["", " \n ", "x".repeat(4001), "lone \uD800 surrogate"]) {
      await expect(client.send(session, body)).rejects.toMatchObject({ code: "invalid_body" });
    }
    expect(client.pendingSends).toBe(0);
    client.close();
    await expect(client.send(session, "after close")).rejects.toThrow("closed");
    await relay.stop();
  });

  it("keeps delivering when a handler throws, and reports it", async () => {
    const { relay, client } = await started(dentist);
    const errors: string[] = [];
    client.on("error", (error) => errors.push(error.code));
    const received: string[] = [];
    const subscription = client.subscribe("appointments", {}, (event) => {
      received.push(event.row.id);
      if (received.length === 1) throw new Error("a bug in the dashboard");
    });
    await until(() => subscription.cursor !== undefined, "the subscription");
    const first = await db.book(patient, dentist);
    const second = await db.book(patient, dentist);
    await until(() => received.length === 2, "both events");
    expect(received).toEqual([first, second]);
    expect(errors).toEqual(["handler_failed"]);
    expect(client.state).toBe("open");
    client.close();
    await relay.stop();
  });

  it("gives a replaced subscription's events to nobody", async () => {
    const first = await openSession();
    const second = await openSession();
    const { relay, client } = await started(patient);
    const say = (session: string, body: string) =>
      db.query(
        "insert into consultation_messages (session_id, sender_id, body) values ($1, $2, $3)",
        [session, patient.id, body],
      );
    const old: string[] = [];
    const subscription = client.subscribe(
      "consultation_messages",
      { filter: { session_id: first } },
      (event) => old.push(event.row.session_id),
    );
    await until(() => subscription.cursor !== undefined, "the first subscription");
    // Messages of the first session are on their way while the subscription is replaced.
    await Promise.all([say(first, "one"), say(first, "two")]);
    const now: ChangeEvent<"consultation_messages">[] = [];
    const replaced = client.subscribe(
      "consultation_messages",
      { filter: { session_id: second } },
      (event) => now.push(event),
    );
    await until(() => replaced.cursor !== undefined, "the second subscription");
    await say(second, "three");
    await until(() => now.length === 1, "the second session's message");
    await say(first, "four");
    await say(second, "five");
    await until(() => now.length === 2, "the next message");
    expect(now.map((event) => event.row.body)).toEqual(["three", "five"]);
    expect(now.every((event) => event.row.session_id === second)).toBe(true);
    expect(old.every((session) => session === first)).toBe(true);
    client.close();
    await relay.stop();
  });

  it("says why the relay refuses a token, and gives up on a fixed one", async () => {
    const port = await freePort();
    const relay = await Relay.start(db, port);
    const exp = Math.floor(Date.now() / 1000) + 600;
    // Signed with another secret; a fixed token, as in the README's Node example.
    const otherSecret = "another-secret-0123456789abcdef0123";
    const forged = signed({ sub: dentist.id, role: "dentist", exp }, otherSecret);
    const fixed = connect({ url: relay.url, token: forged, WebSocket });
    const errors: RelayError[] = [];
    fixed.on("error", (error) => errors.push(error));
    await until(() => fixed.state === "closed", "the client to give up");
    expect(errors).toMatchObject([{ code: "invalid_signature" }]);

    // A role the relay does not know, from a getToken: reported once, and fresh tokens are
    // tried (one may work), with the backoff.
    let issued = 0;
    const unknownRole = connect({
      url: relay.url,
      getToken: () => {
        issued += 1;
        return signed({ sub: randomUUID(), role: "nurse", exp }, SECRET);
      },
      WebSocket,
      initialBackoffMs: 50,
    });
    const refused: RelayError[] = [];
    unknownRole.on("error", (error) => refused.push(error));
    await until(() => issued >= 3, "fresh tokens to be tried");
    // Reported by a status request of its own, which may answer after the retries.
    await until(() => refused.length > 0, "the refusal to be reported");
    expect(refused).toMatchObject([{ code: "invalid_token" }]);
    expect(refused[0]?.message).toContain("role");
    expect(unknownRole.state).not.toBe("closed");
    unknownRole.close();
    await relay.stop();
  });

  it("reports a socket refused with a valid token once, and connects when there is room", async () => {
    const oneEach = { RELAY_MAX_SOCKETS_PER_USER: "1" };
    const { relay, client: first } = await started(dentist, {}, oneEach);
    await until(() => first.state === "open", "the first connection");
    let attempts = 0;
    class Counted extends WebSocket {
      constructor(url: string) {
        super(url);
        attempts += 1;
      }
    }
    const second = connect({
      url: relay.url,
      getToken: () => token(dentist),
      WebSocket: Counted,
      initialBackoffMs: 50,
      maxBackoffMs: 100,
    });
    const errors: RelayError[] = [];
    second.on("error", (error) => errors.push(error));
    await until(() => attempts >= 4, "a few refused attempts");
    await until(() => errors.length > 0, "the refusal to be reported");
    expect(errors).toMatchObject([{ code: "connection_refused" }]);
    expect(second.state).toBe("reconnecting");
    first.close();
    await until(() => second.state === "open", "the second connection, once there is room");
    expect(errors).toHaveLength(1);
    second.close();
    await relay.stop();
  });
});
