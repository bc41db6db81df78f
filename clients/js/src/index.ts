/**
 * Client for the clinic realtime relay (see docs/protocol.md in the relay's repository).
 *
 * One `RelayClient` holds one WebSocket and keeps it alive: it reconnects by itself with capped,
 * jittered backoff, detects a dead connection by heartbeat, resumes every subscription from the
 * last cursor it delivered (so nothing is missed or doubled), refreshes the token before it
 * expires, and retries unacknowledged sends with the same `client_id` (so nothing is duplicated).
 * It depends on nothing but the platform's WebSocket.
 */

import type {
  ChangeEvent,
  ConnectionState,
  Feed,
  PresenceEvent,
  RelayError,
} from "./types.js";

export * from "./types.js";

/** The part of the WebSocket API the client uses: the browser's, Node 22's, or `ws`'s. */
export interface SocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string) => SocketLike;

export interface ConnectOptions {
  /** The relay's WebSocket URL, e.g. `wss://relay.example.com/ws`. */
  url: string;
  /** A token, when it never needs refreshing. */
  token?: string;
  /**
   * Returns a fresh token; called before each connection and before the current token expires.
   * Without it the client cannot outlive its token.
   */
  getToken?: () => string | Promise<string>;
  /** The WebSocket implementation; defaults to `globalThis.WebSocket` (Node 20: pass `ws`). */
  WebSocket?: WebSocketConstructor;
  /** Ping interval; a pong missing by the next ping means the connection is dead. Default 25 s. */
  heartbeatMs?: number;
  /** First reconnect delay (default 500 ms), doubled per failed attempt up to `maxBackoffMs`. */
  initialBackoffMs?: number;
  /** Longest reconnect delay (default 15 s). Each delay is jittered by ±50 %. */
  maxBackoffMs?: number;
  /** How long before expiry the token is refreshed (default 60 s; at most half its lifetime). */
  refreshMarginMs?: number;
}

export interface SubscribeOptions {
  /** `consultation_messages` only: the messages of one session. */
  filter?: { session_id?: string };
  /** Resume after this cursor (from an earlier event, or a history page). */
  since?: string;
}

export interface Subscription {
  readonly feed: Feed;
  /** The cursor of the last event delivered (or where the subscription started). */
  readonly cursor: string | undefined;
  unsubscribe(): void;
}

export interface SendResult {
  /** The message's id. */
  id: string;
  /** The id the client chose for this message; the event's row carries it too. */
  clientId: string;
}

/** A `send` the relay refused (not_found, forbidden, session_ended, invalid_body, conflict). */
export class SendError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = "SendError";
  }
}

interface Events {
  state: (state: ConnectionState) => void;
  presence: (event: PresenceEvent) => void;
  error: (error: RelayError & { feed?: Feed }) => void;
  /** A fresh token was accepted on the open socket. */
  token: (expiresAt: string) => void;
}

interface Entry {
  feed: Feed;
  filter: { session_id?: string } | undefined;
  handler: (event: ChangeEvent) => void;
  /** Where to resume: the last event delivered, or where the subscription started. */
  cursor: string | undefined;
  /** The last event id delivered, so that nothing is delivered twice. */
  lastId: number;
}

interface PendingSend {
  sessionId: string;
  body: string;
  resolve: (result: SendResult) => void;
  reject: (error: Error) => void;
}

const OPEN = 1;
/** Close codes after which reconnecting cannot help. */
const FATAL_CLOSES = new Set([4003]);

/** Connects to the relay; the connection opens in the background. */
export function connect(options: ConnectOptions): RelayClient {
  return new RelayClient(options);
}

export class RelayClient {
  private readonly options: Required<
    Pick<ConnectOptions, "heartbeatMs" | "initialBackoffMs" | "maxBackoffMs" | "refreshMarginMs">
  > &
    ConnectOptions;
  private readonly Socket: WebSocketConstructor;
  private socket: SocketLike | undefined;
  private currentState: ConnectionState = "connecting";
  private readonly entries = new Map<Feed, Entry>();
  private readonly sends = new Map<string, PendingSend>();
  private readonly listeners: { [K in keyof Events]: Set<Events[K]> } = {
    state: new Set(),
    presence: new Set(),
    error: new Set(),
    token: new Set(),
  };
  private token: string | undefined;
  private attempts = 0;
  private closedByUser = false;
  private awaitingPong = false;
  private heartbeat: ReturnType<typeof setInterval> | undefined;
  private refresh: ReturnType<typeof setTimeout> | undefined;
  private reconnect: ReturnType<typeof setTimeout> | undefined;
  private retrySends: ReturnType<typeof setTimeout> | undefined;
  private nextRef = 0;

  constructor(options: ConnectOptions) {
    const Socket =
      options.WebSocket ??
      (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Socket) {
      throw new Error(
        "no WebSocket implementation: pass `WebSocket` (for example from the `ws` package)",
      );
    }
    if (!options.token && !options.getToken) {
      throw new Error("a token or getToken is required");
    }
    this.Socket = Socket;
    this.options = {
      heartbeatMs: 25_000,
      initialBackoffMs: 500,
      maxBackoffMs: 15_000,
      refreshMarginMs: 60_000,
      ...options,
    };
    this.token = options.token;
    void this.open();
  }

  /** connecting, open, reconnecting or closed. */
  get state(): ConnectionState {
    return this.currentState;
  }

  /** Listens to `state`, `presence`, `error` or `token`; returns the function that stops it. */
  on<K extends keyof Events>(event: K, listener: Events[K]): () => void {
    this.listeners[event].add(listener);
    return () => this.listeners[event].delete(listener);
  }

  /**
   * Subscribes to a feed (replacing a subscription to the same feed). The handler gets each
   * change as this user sees it, in commit order, once, across reconnects.
   */
  subscribe<F extends Feed>(
    feed: F,
    options: SubscribeOptions,
    handler: (event: ChangeEvent<F>) => void,
  ): Subscription {
    const entry: Entry = {
      feed,
      filter: options.filter,
      handler: handler as (event: ChangeEvent) => void,
      cursor: options.since,
      lastId: options.since !== undefined ? Number(options.since) : 0,
    };
    this.entries.set(feed, entry);
    this.transmitSubscribe(entry);
    const client = this;
    return {
      feed,
      get cursor() {
        return entry.cursor;
      },
      unsubscribe() {
        if (client.entries.get(feed) === entry) {
          client.unsubscribe(feed);
        }
      },
    };
  }

  /** Ends the subscription to a feed. */
  unsubscribe(feed: Feed): void {
    if (!this.entries.delete(feed)) {
      return;
    }
    this.transmit({ type: "unsubscribe", ref: this.ref("unsubscribe"), feed });
  }

  /**
   * Sends a message to a consultation session. The message gets a `client_id` now; until the
   * relay acknowledges it, it is sent again with that id on every reconnect (and after a
   * transient failure), so it is created once however often it is sent. Resolves with the
   * message's id; rejects with a `SendError` when the relay refuses it.
   */
  send(sessionId: string, body: string): Promise<SendResult> {
    const clientId = globalThis.crypto.randomUUID();
    return new Promise<SendResult>((resolve, reject) => {
      this.sends.set(clientId, { sessionId, body, resolve, reject });
      this.transmitSend(clientId);
    });
  }

  /** Sends still waiting for the relay's acknowledgement. */
  get pendingSends(): number {
    return this.sends.size;
  }

  /** Closes the connection for good; pending sends are rejected. */
  close(): void {
    this.closedByUser = true;
    this.stopTimers();
    clearTimeout(this.reconnect);
    const socket = this.socket;
    this.socket = undefined;
    if (socket) {
      detach(socket);
      socket.close(1000, "client closed");
    }
    for (const [clientId, pending] of this.sends) {
      this.sends.delete(clientId);
      pending.reject(new Error("the client was closed before the relay acknowledged the message"));
    }
    this.setState("closed");
  }

  // --- the connection -----------------------------------------------------------------------

  private async open(): Promise<void> {
    if (this.closedByUser) {
      return;
    }
    let token: string;
    try {
      token = this.options.getToken ? await this.options.getToken() : (this.token as string);
    } catch (error) {
      this.emit("error", { code: "token_unavailable", message: String(error) });
      this.scheduleReconnect();
      return;
    }
    if (this.closedByUser) {
      return;
    }
    this.token = token;
    const separator = this.options.url.includes("?") ? "&" : "?";
    const url = `${this.options.url}${separator}access_token=${encodeURIComponent(token)}`;
    let socket: SocketLike;
    try {
      socket = new this.Socket(url);
    } catch (error) {
      this.emit("error", { code: "connect_failed", message: String(error) });
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    socket.onopen = () => this.opened(socket);
    socket.onmessage = (event) => this.received(event.data);
    socket.onclose = (event) => this.closed(socket, event.code, event.reason);
    socket.onerror = () => {
      // A close follows; it decides what happens next.
    };
  }

  private opened(socket: SocketLike): void {
    if (socket !== this.socket) {
      return;
    }
    this.attempts = 0;
    this.setState("open");
    for (const entry of this.entries.values()) {
      this.transmitSubscribe(entry);
    }
    for (const clientId of this.sends.keys()) {
      this.transmitSend(clientId);
    }
    this.awaitingPong = false;
    this.heartbeat = setInterval(() => this.beat(), this.options.heartbeatMs);
    this.scheduleRefresh();
  }

  private closed(socket: SocketLike, code: number, reason: string): void {
    if (socket !== this.socket) {
      return;
    }
    this.socket = undefined;
    this.stopTimers();
    if (this.closedByUser) {
      this.setState("closed");
      return;
    }
    if (FATAL_CLOSES.has(code)) {
      this.emit("error", { code: `closed_${code}`, message: reason });
      this.close();
      return;
    }
    this.scheduleReconnect();
  }

  /** Gives up on a socket that stopped answering, and reconnects. */
  private drop(): void {
    const socket = this.socket;
    if (!socket) {
      return;
    }
    this.socket = undefined;
    detach(socket);
    try {
      socket.close(4000, "heartbeat missed");
    } catch {
      // Already closing.
    }
    this.stopTimers();
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.closedByUser) {
      return;
    }
    this.setState("reconnecting");
    const { initialBackoffMs, maxBackoffMs } = this.options;
    const base = Math.min(maxBackoffMs, initialBackoffMs * 2 ** Math.min(this.attempts, 20));
    const delay = base * (0.5 + Math.random());
    this.attempts += 1;
    clearTimeout(this.reconnect);
    this.reconnect = setTimeout(() => void this.open(), delay);
  }

  private beat(): void {
    if (this.awaitingPong) {
      this.drop();
      return;
    }
    this.awaitingPong = true;
    this.transmit({ type: "ping", ref: this.ref("ping") });
  }

  private scheduleRefresh(): void {
    clearTimeout(this.refresh);
    if (!this.options.getToken || !this.token) {
      return;
    }
    const expiresAt = tokenExpiry(this.token);
    if (expiresAt === undefined) {
      return;
    }
    const now = Date.now();
    const margin = Math.min(this.options.refreshMarginMs, Math.max(0, expiresAt - now) / 2);
    const delay = Math.max(0, expiresAt - margin - now);
    this.refresh = setTimeout(() => void this.refreshToken(), delay);
  }

  private async refreshToken(): Promise<void> {
    const getToken = this.options.getToken;
    if (!getToken || this.socket?.readyState !== OPEN) {
      return;
    }
    try {
      const token = await getToken();
      this.token = token;
      this.transmit({ type: "auth", ref: this.ref("auth"), access_token: token });
    } catch (error) {
      this.emit("error", { code: "token_unavailable", message: String(error) });
      this.refresh = setTimeout(() => void this.refreshToken(), 5_000);
    }
  }

  private stopTimers(): void {
    clearInterval(this.heartbeat);
    clearTimeout(this.refresh);
    clearTimeout(this.retrySends);
    this.heartbeat = undefined;
  }

  // --- frames ---------------------------------------------------------------------------------

  private received(data: unknown): void {
    let frame: Record<string, unknown>;
    try {
      frame = JSON.parse(String(data)) as Record<string, unknown>;
    } catch {
      return;
    }
    switch (frame.type) {
      case "event":
        this.deliver(frame as unknown as ChangeEvent);
        break;
      case "subscribed": {
        const entry = this.entries.get(frame.feed as Feed);
        if (entry && entry.cursor === undefined) {
          entry.cursor = frame.cursor as string;
          entry.lastId = Number(frame.cursor);
        }
        break;
      }
      case "pong":
        this.awaitingPong = false;
        break;
      case "authenticated":
        this.emit("token", frame.expires_at as string);
        this.scheduleRefresh();
        break;
      case "sent":
        this.acknowledged(frame.client_id as string, frame.id as string);
        break;
      case "presence":
        this.emit("presence", frame as unknown as PresenceEvent);
        break;
      case "error":
        this.refused(frame as unknown as RelayError);
        break;
      default:
        // live, unsubscribed: nothing to do.
        break;
    }
  }

  private deliver(event: ChangeEvent): void {
    const entry = this.entries.get(event.feed);
    if (!entry || event.id <= entry.lastId) {
      return;
    }
    entry.lastId = event.id;
    entry.cursor = event.cursor;
    entry.handler(event);
  }

  private acknowledged(clientId: string, id: string): void {
    const pending = this.sends.get(clientId);
    if (pending) {
      this.sends.delete(clientId);
      pending.resolve({ id, clientId });
    }
  }

  private refused(error: RelayError): void {
    const ref = error.ref ?? "";
    if (ref.startsWith("send:")) {
      const clientId = ref.slice("send:".length);
      const pending = this.sends.get(clientId);
      if (!pending) {
        return;
      }
      if (error.code === "unavailable") {
        // Transient: the same client_id again shortly, so at most one message is created.
        clearTimeout(this.retrySends);
        this.retrySends = setTimeout(() => this.transmitSend(clientId), 1_000);
        return;
      }
      this.sends.delete(clientId);
      pending.reject(new SendError(error.code, error.message));
      return;
    }
    if (ref.startsWith("subscribe:")) {
      const feed = ref.slice("subscribe:".length) as Feed;
      const entry = this.entries.get(feed);
      if (entry && error.code === "cursor_expired") {
        // The log no longer reaches back to the cursor: the app must refetch; go on live.
        entry.cursor = undefined;
        entry.lastId = 0;
        this.emit("error", { ...error, feed });
        this.transmitSubscribe(entry);
        return;
      }
      if (entry && error.code === "unavailable") {
        setTimeout(() => {
          if (this.entries.get(feed) === entry) {
            this.transmitSubscribe(entry);
          }
        }, 1_000);
        return;
      }
      this.entries.delete(feed);
      this.emit("error", { ...error, feed });
      return;
    }
    this.emit("error", error);
  }

  private transmitSubscribe(entry: Entry): void {
    const frame: Record<string, unknown> = {
      type: "subscribe",
      ref: `subscribe:${entry.feed}`,
      feed: entry.feed,
    };
    if (entry.filter && Object.keys(entry.filter).length > 0) {
      frame.filter = entry.filter;
    }
    if (entry.cursor !== undefined) {
      frame.since = entry.cursor;
    }
    this.transmit(frame);
  }

  private transmitSend(clientId: string): void {
    const pending = this.sends.get(clientId);
    if (!pending) {
      return;
    }
    this.transmit({
      type: "send",
      ref: `send:${clientId}`,
      session_id: pending.sessionId,
      body: pending.body,
      client_id: clientId,
    });
  }

  /** Sends a frame if the socket is open; otherwise it goes out (if still wanted) on reconnect. */
  private transmit(frame: Record<string, unknown>): void {
    const socket = this.socket;
    if (socket && socket.readyState === OPEN) {
      socket.send(JSON.stringify(frame));
    }
  }

  private ref(kind: string): string {
    this.nextRef += 1;
    return `${kind}:${this.nextRef}`;
  }

  private setState(state: ConnectionState): void {
    if (state !== this.currentState) {
      this.currentState = state;
      this.emit("state", state);
    }
  }

  private emit<K extends keyof Events>(event: K, ...args: Parameters<Events[K]>): void {
    for (const listener of this.listeners[event]) {
      try {
        (listener as (...a: Parameters<Events[K]>) => void)(...args);
      } catch (error) {
        // A listener's failure must not break the connection.
        console.error(error);
      }
    }
  }
}

function detach(socket: SocketLike): void {
  socket.onopen = null;
  socket.onmessage = null;
  socket.onclose = null;
  socket.onerror = null;
}

/** A JWT's `exp` in milliseconds, if it has one. */
export function tokenExpiry(token: string): number | undefined {
  const payload = token.split(".")[1];
  if (!payload) {
    return undefined;
  }
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const json = JSON.parse(atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, "="))) as {
      exp?: unknown;
    };
    return typeof json.exp === "number" ? json.exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}
