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

/**
 * An event handler property of a socket. The client only assigns handlers, and reads of each
 * event only what `E` names, so a socket whose events carry more (the browser's, `ws`'s) must
 * fit. As a plain function type it would not: TypeScript would check the property as if the
 * client called the socket's own handler with a bare `E`. A method's parameter is checked both
 * ways instead: events with more fields pass, events without the fields the client reads don't.
 */
export type SocketHandler<E> = { handle(event: E): void }["handle"];

/** The part of the WebSocket API the client uses: the browser's, Node 22's, or `ws`'s. */
export interface SocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: SocketHandler<unknown> | null;
  onmessage: SocketHandler<{ data: unknown }> | null;
  onclose: SocketHandler<{ code: number; reason: string }> | null;
  onerror: SocketHandler<unknown> | null;
}

/** The browser's `WebSocket`, Node 22's, or the `ws` package's default export, as they are. */
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
  /** How long a connection attempt may take before it is abandoned and retried (default 15 s). */
  connectTimeoutMs?: number;
  /**
   * The relay's `RELAY_MAX_FRAME_BYTES` (default 65,536). A send whose frame would be larger is
   * refused here with `invalid_body`: the relay would close the socket with 1009 instead, and
   * the send, retried on every reconnect, would never get through.
   */
  maxFrameBytes?: number;
}

export interface SubscribeOptions {
  /** `consultation_messages` only: the messages of one session. */
  filter?: { session_id?: string };
  /** Resume after this cursor (from an earlier event, or a history page). */
  since?: string;
}

export interface Subscription {
  readonly feed: Feed;
  /** The cursor of the last event delivered, or where the subscription started, or the relay's
   * position when it last said that nothing for this feed came before it. */
  readonly cursor: string | undefined;
  unsubscribe(): void;
}

export interface SendResult {
  /** The message's id. */
  id: string;
  /** The id the client chose for this message; the event's row carries it too. */
  clientId: string;
}

/** A `send` the relay refused (forbidden, session_ended, invalid_body, conflict). */
export class SendError extends Error {
  constructor(
    readonly code: string,
    message: string,
    /** The message's `client_id`, when it may have been created: send it again with this id
     * (`send(sessionId, body, { clientId })`) and it is created once. */
    readonly clientId?: string,
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
  /** The `ref` of the subscribe in flight; until its `subscribed` arrives, events of the feed
   * belong to the subscription it replaces and are not delivered. */
  pending: string | undefined;
  /** The `ref` of the latest subscribe, in flight or answered: an `error` with it ends the
   * subscription, even after `subscribed` (a replay that failed part-way). */
  ref: string | undefined;
  /** A retry of a subscribe the relay could not complete. */
  retry: ReturnType<typeof setTimeout> | undefined;
  filter: { session_id?: string } | undefined;
  handler: (event: ChangeEvent) => void;
  /** Where to resume: the last event delivered, or where the subscription started. */
  cursor: string | undefined;
  /** The last event id delivered, so that nothing is delivered twice. */
  lastId: number;
  /** Why its cursor could not be resumed from: reported once it is live again, so that state
   * the app fetches then misses nothing. */
  expired: string | undefined;
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
/** The relay's event log went back: every feed must be fetched again. */
const STATE_LOST = 4010;
/** What a message body may be, as the relay checks it (characters after trimming). */
const MAX_BODY_CHARACTERS = 4000;
/** Frames per second the client sends at most: below the relay's default limit of 50. */
const FRAMES_PER_SECOND = 40;
/** The relay's default `RELAY_MAX_FRAME_BYTES`. */
const MAX_FRAME_BYTES = 65_536;
/** The codes of the relay's 401 for a token it refuses. */
const TOKEN_REFUSALS = new Set([
  "missing_token",
  "invalid_token",
  "token_expired",
  "token_not_yet_valid",
  "invalid_signature",
]);
/** The HTTP scheme of the relay's API beside a socket URL's. */
const SCHEMES: Record<string, string> = {
  "ws:": "http:",
  "wss:": "https:",
  "http:": "http:",
  "https:": "https:",
};
/** The longest delay `setTimeout` keeps (about 24.8 days); longer ones fire at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** Connects to the relay; the connection opens in the background. */
export function connect(options: ConnectOptions): RelayClient {
  return new RelayClient(options);
}

export class RelayClient {
  private readonly options: Required<
    Pick<
      ConnectOptions,
      | "heartbeatMs"
      | "initialBackoffMs"
      | "maxBackoffMs"
      | "refreshMarginMs"
      | "connectTimeoutMs"
      | "maxFrameBytes"
    >
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
  private connecting: ReturnType<typeof setTimeout> | undefined;
  /** Whether the current socket has opened. */
  private socketOpened = false;
  /** The codes of errors reported since a socket last opened: a cause is reported once, not on
   * every retry. */
  private readonly reported = new Set<string>();
  /** Sessions whose first presence frame (the whole list) came since the last `subscribed` of
   * `consultation_messages` on this connection. */
  private readonly presenceListed = new Set<string>();
  /** Sends to retry after the relay answered `unavailable`. */
  private readonly toRetry = new Set<string>();
  /** Frames waiting for their turn under the client's own rate limit. */
  private outbox: string[] = [];
  private budget = FRAMES_PER_SECOND;
  private budgetAt = Date.now();
  private pump: ReturnType<typeof setTimeout> | undefined;
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
      connectTimeoutMs: 15_000,
      maxFrameBytes: MAX_FRAME_BYTES,
      ...options,
    };
    this.token = options.token;
    // Not at once: what the first attempt may report straight away (an expired token) must reach
    // the listeners attached right after `connect()`.
    queueMicrotask(() => void this.open());
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
    const replaced = this.entries.get(feed);
    if (replaced) {
      clearTimeout(replaced.retry);
    }
    const entry: Entry = {
      feed,
      pending: undefined,
      ref: undefined,
      retry: undefined,
      filter: options.filter,
      handler: handler as (event: ChangeEvent) => void,
      cursor: options.since,
      lastId: options.since !== undefined ? positionOf(options.since) : 0,
      expired: undefined,
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
    const entry = this.entries.get(feed);
    if (!entry) {
      return;
    }
    clearTimeout(entry.retry);
    this.entries.delete(feed);
    this.transmit({ type: "unsubscribe", ref: this.ref("unsubscribe"), feed });
  }

  /**
   * Sends a message to a consultation session. The message gets a `client_id` now; until the
   * relay acknowledges it, it is sent again with that id on every reconnect (and after a
   * transient failure), so it is created once however often it is sent. Resolves with the
   * message's id; rejects with a `SendError` when the relay refuses it, or when the client is
   * closed first (code `closed`, with the `clientId` to send it again with, on another client).
   */
  send(sessionId: string, body: string, options: { clientId?: string } = {}): Promise<SendResult> {
    if (this.closedByUser) {
      return Promise.reject(new Error("the client is closed"));
    }
    // What the relay would refuse anyway is refused here, so that it is never retried.
    const characters = [...body.trim()].length;
    if (characters === 0 || characters > MAX_BODY_CHARACTERS || !wellFormed(body)) {
      return Promise.reject(
        new SendError(
          "invalid_body",
          `a message body is 1 to ${MAX_BODY_CHARACTERS} characters after trimming, of valid text`,
        ),
      );
    }
    const clientId = options.clientId ?? uuid();
    if (!UUID.test(clientId)) {
      return Promise.reject(new SendError("bad_request", "clientId must be a uuid"));
    }
    if (this.sends.has(clientId)) {
      return Promise.reject(
        new SendError("conflict", `a send with clientId ${clientId} is already waiting`),
      );
    }
    if (byteLength(JSON.stringify(this.sendFrame(clientId, sessionId, body))) > this.options.maxFrameBytes) {
      return Promise.reject(
        new SendError(
          "invalid_body",
          `the message's frame would exceed the relay's ${this.options.maxFrameBytes} bytes`,
        ),
      );
    }
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
    for (const entry of this.entries.values()) {
      clearTimeout(entry.retry);
    }
    const socket = this.socket;
    this.socket = undefined;
    if (socket) {
      detach(socket);
      socket.close(1000, "client closed");
    }
    for (const [clientId, pending] of this.sends) {
      this.sends.delete(clientId);
      pending.reject(
        new SendError(
          "closed",
          "the client was closed before the relay acknowledged the message; it may have been " +
            "created: send it again with the same clientId",
          clientId,
        ),
      );
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
    const expiresAt = tokenExpiry(token);
    if (!this.options.getToken && expiresAt !== undefined && expiresAt <= Date.now()) {
      // Without getToken nothing can bring a fresh one: say so rather than retry for ever.
      this.emit("error", {
        code: "token_expired",
        message: "the token has expired and there is no getToken to fetch a fresh one",
      });
      this.close();
      return;
    }
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
    this.socketOpened = false;
    this.outbox = [];
    clearTimeout(this.connecting);
    this.connecting = setTimeout(() => {
      if (this.socket === socket && socket.readyState !== OPEN) {
        this.drop();
      }
    }, this.options.connectTimeoutMs);
    socket.onopen = () => this.opened(socket);
    socket.onmessage = (event) => this.received(event.data);
    socket.onclose = (event) => this.closed(socket, event.code, event.reason, token);
    socket.onerror = () => {
      // A close follows; it decides what happens next.
    };
  }

  private opened(socket: SocketLike): void {
    if (socket !== this.socket) {
      return;
    }
    clearTimeout(this.connecting);
    this.socketOpened = true;
    this.reported.clear();
    this.awaitingPong = false;
    this.heartbeat = setInterval(() => this.beat(), this.options.heartbeatMs);
    this.scheduleRefresh();
    for (const entry of this.entries.values()) {
      // A retry planned on the last connection is this subscribe.
      clearTimeout(entry.retry);
      entry.retry = undefined;
      this.transmitSubscribe(entry);
    }
    for (const clientId of this.sends.keys()) {
      this.transmitSend(clientId);
    }
    // Last: a listener may close the client.
    this.setState("open");
  }

  private closed(socket: SocketLike, code: number, reason: string, token: string): void {
    if (socket !== this.socket) {
      return;
    }
    this.socket = undefined;
    this.stopTimers();
    if (this.closedByUser) {
      this.setState("closed");
      return;
    }
    if (!this.socketOpened) {
      // Retry as ever; what the relay says of the token may yet stop the retries.
      this.scheduleReconnect();
      void this.diagnose(token);
      return;
    }
    if (FATAL_CLOSES.has(code)) {
      this.emit("error", { code: `closed_${code}`, message: reason });
      this.close();
      return;
    }
    if (code === STATE_LOST) {
      // The relay's log went back (a restore, a failover): no cursor can be resumed from, and
      // rows the app holds may be gone. As for an expired cursor: report, and go on live.
      for (const entry of this.entries.values()) {
        entry.cursor = undefined;
        entry.lastId = 0;
        entry.expired = reason;
      }
    }
    if (code === 1002 || code === 1007 || code === 1009 || code === 4029) {
      // Something this client sent broke a rule; worth knowing, though reconnecting may help.
      this.emit("error", { code: `closed_${code}`, message: reason });
    }
    this.scheduleReconnect();
  }

  /**
   * A socket closed before it opened: the relay refused the upgrade (a token it rejects, one of
   * its limits, an origin it does not allow) or could not be reached. Browsers and `ws` show
   * neither the refusal's status nor its body, so the relay's HTTP API is asked about the token,
   * as the relay's inspector page does. A refused token is reported, and given up on when
   * nothing can replace it; a valid one means a limit or the origin, reported and retried. When
   * the API does not answer this page at all, the health check says whether the relay refuses
   * the page's origin (`origin_not_allowed`, reported and retried: the setting may change).
   */
  private async diagnose(token: string): Promise<void> {
    const answer = (await this.askStatus(token)) ?? (await this.askOrigin());
    // Closed meanwhile, or a later attempt has opened: this answer is about the past.
    if (this.closedByUser || this.socketOpened) {
      return;
    }
    if (answer?.status === 401) {
      const { code, message } = answer;
      this.report({ code, message });
      // Without getToken the same token would be refused again; with it, each attempt fetches
      // a fresh one, which may work (a rolling deploy of a new key, a secret being fixed). A
      // token not valid yet will be (a clock behind the relay's).
      if (code !== "token_not_yet_valid" && !this.options.getToken) {
        this.close();
      }
      return;
    }
    if (answer?.status === 403 && answer.code === "origin_not_allowed") {
      this.report({ code: answer.code, message: `${answer.message}; reconnecting` });
      return;
    }
    if (answer?.status === 200) {
      this.report({
        code: "connection_refused",
        message:
          "the relay accepts the token but refused the socket: too many sockets for this user " +
          "(RELAY_MAX_SOCKETS_PER_USER), the relay full (RELAY_MAX_SOCKETS), or this origin not " +
          "in RELAY_ALLOWED_ORIGINS; reconnecting",
      });
    }
    // Out of reach, or an answer that says nothing about the token: the retry goes on.
  }

  /**
   * GET /api/realtime/status with the token, on the relay's host; undefined when there is no
   * fetch, or no answer (the relay out of reach, or, from a page of another origin, one that
   * RELAY_ALLOWED_ORIGINS does not list).
   */
  private askStatus(token: string): Promise<Answer | undefined> {
    return this.ask("status", { Authorization: `Bearer ${token}` }, async (response) => {
      let body: { error?: unknown; message?: unknown } = {};
      if (response.status === 401) {
        try {
          body = (await response.json()) as typeof body;
        } catch {
          // Not the relay's JSON: something else answered.
        }
        // Only the relay's own refusal of a token says anything about the token.
        if (typeof body.error !== "string" || !TOKEN_REFUSALS.has(body.error)) {
          return undefined;
        }
      }
      return {
        status: response.status,
        code: typeof body.error === "string" ? body.error : "",
        message:
          typeof body.message === "string" ? body.message : `the relay answered ${response.status}`,
      };
    });
  }

  /**
   * GET /api/realtime/health with no header, which a browser sends without a preflight: a relay
   * that refuses this page's origin answers 403 `origin_not_allowed`, readable by any page.
   * Undefined for any other answer, or none.
   */
  private askOrigin(): Promise<Answer | undefined> {
    return this.ask("health", {}, async (response) => {
      if (response.status !== 403) {
        return undefined;
      }
      const body = (await response.json()) as { error?: unknown; message?: unknown };
      if (body.error !== "origin_not_allowed") {
        return undefined;
      }
      return {
        status: 403,
        code: body.error,
        message:
          typeof body.message === "string" ? body.message : "the relay refuses this page's origin",
      };
    });
  }

  /**
   * GETs `/api/realtime/<endpoint>` on the relay's host, within at most 5 s, and reads the
   * answer with `read`; undefined when there is no fetch, no answer, or `read` fails.
   */
  private async ask(
    endpoint: "status" | "health",
    headers: Record<string, string>,
    read: (response: Response) => Promise<Answer | undefined>,
  ): Promise<Answer | undefined> {
    const url = apiUrl(this.options.url, endpoint);
    if (typeof globalThis.fetch !== "function" || url === undefined) {
      return undefined;
    }
    const abort = new AbortController();
    const timer = setTimeout(
      () => abort.abort(),
      Math.min(this.options.connectTimeoutMs, 5_000),
    );
    try {
      return await read(await globalThis.fetch(url, { headers, signal: abort.signal }));
    } catch {
      return undefined;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Emits an error, unless one with its code was reported since a socket last opened. */
  private report(error: RelayError): void {
    if (!this.reported.has(error.code)) {
      this.reported.add(error.code);
      this.emit("error", error);
    }
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
    this.refresh = undefined;
    if (!this.options.getToken || !this.token) {
      return;
    }
    const lifetime = tokenLifetime(this.token);
    const expiry = tokenExpiry(this.token);
    if (lifetime === undefined || expiry === undefined) {
      return;
    }
    // The time the token has left by this clock (a getToken may hand back a cached token, well
    // into its life). A clock so far off that the token looks expired, or longer-lived than
    // it is, falls back to the token's whole lifetime (exp - iat), so that the client does not
    // refresh in a loop. Never sooner than a second.
    const left = expiry - Date.now();
    const basis = left > 0 && left <= lifetime ? left : lifetime;
    const margin = Math.min(this.options.refreshMarginMs, lifetime / 2);
    const delay = Math.max(1_000, basis - margin);
    if (delay > MAX_TIMER_MS) {
      // Longer than a timer can wait: look again when it has waited what it can.
      this.refresh = setTimeout(() => this.scheduleRefresh(), MAX_TIMER_MS);
      return;
    }
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
      clearTimeout(this.refresh);
      this.refresh = setTimeout(() => void this.refreshToken(), 5_000);
    }
  }

  private stopTimers(): void {
    clearInterval(this.heartbeat);
    clearTimeout(this.refresh);
    clearTimeout(this.retrySends);
    clearTimeout(this.connecting);
    clearTimeout(this.pump);
    // Cleared handles are forgotten too: each is scheduled again only while it is undefined.
    this.heartbeat = undefined;
    this.refresh = undefined;
    this.retrySends = undefined;
    this.connecting = undefined;
    this.pump = undefined;
    // Every unacknowledged send goes out again when the connection opens.
    this.toRetry.clear();
    this.presenceListed.clear();
    this.outbox = [];
  }

  // --- frames ---------------------------------------------------------------------------------

  private received(data: unknown): void {
    let frame: Record<string, unknown>;
    try {
      frame = JSON.parse(String(data)) as Record<string, unknown>;
    } catch {
      return;
    }
    // Any frame shows the connection is alive (a long replay holds up the pong).
    this.awaitingPong = false;
    switch (frame.type) {
      case "event":
        this.deliver(frame as unknown as ChangeEvent);
        break;
      case "subscribed": {
        const entry = this.entries.get(frame.feed as Feed);
        if (frame.feed === "consultation_messages") {
          // A new subscription joins its sessions afresh: each one's next frame is a whole list.
          this.presenceListed.clear();
        }
        if (entry && entry.pending === frame.ref) {
          entry.pending = undefined;
          if (entry.cursor === undefined) {
            entry.cursor = frame.cursor as string;
            entry.lastId = positionOf(frame.cursor as string);
          }
          if (entry.expired !== undefined) {
            // Live again: every change from here on reaches the handler, so state fetched now
            // (with the events that arrive meanwhile applied after it) misses nothing.
            const message = entry.expired;
            entry.expired = undefined;
            this.emit("error", { code: "cursor_expired", message, feed: entry.feed });
          }
        }
        break;
      }
      case "position": {
        // Nothing for this feed up to the relay's position: resuming from there misses nothing,
        // and keeps a quiet feed's cursor from falling behind the relay's retention.
        const entry = this.entries.get(frame.feed as Feed);
        const cursor = frame.cursor as string;
        if (entry && entry.pending === undefined && positionOf(cursor) > entry.lastId) {
          entry.cursor = cursor;
          entry.lastId = positionOf(cursor);
        }
        break;
      }
      case "pong":
        // A connection that answered a heartbeat is healthy: reconnects start over from the
        // shortest delay.
        this.attempts = 0;
        break;
      case "authenticated":
        this.emit("token", frame.expires_at as string);
        this.scheduleRefresh();
        break;
      case "sent":
        this.acknowledged(frame.client_id as string, frame.id as string);
        break;
      case "presence": {
        const session = frame.session_id as string;
        const first = !this.presenceListed.has(session);
        this.presenceListed.add(session);
        this.emit("presence", { ...(frame as unknown as Omit<PresenceEvent, "first">), first });
        break;
      }
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
    // While a subscribe is in flight, the feed's events are the replaced subscription's.
    if (!entry || entry.pending !== undefined || event.id <= entry.lastId) {
      return;
    }
    entry.lastId = event.id;
    entry.cursor = event.cursor;
    try {
      entry.handler(event);
    } catch (error) {
      this.emit("error", { code: "handler_failed", message: String(error), feed: event.feed });
    }
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
        this.toRetry.add(clientId);
        if (this.retrySends === undefined) {
          this.retrySends = setTimeout(() => {
            this.retrySends = undefined;
            const retry = [...this.toRetry];
            this.toRetry.clear();
            for (const id of retry) {
              this.transmitSend(id);
            }
          }, 1_000);
        }
        return;
      }
      this.sends.delete(clientId);
      pending.reject(new SendError(error.code, error.message));
      return;
    }
    if (ref.startsWith("auth:")) {
      // The relay kept the token it had; try a fresh one shortly, while that one lasts.
      this.emit("error", error);
      if (this.options.getToken && this.socket?.readyState === OPEN) {
        clearTimeout(this.refresh);
        this.refresh = setTimeout(() => void this.refreshToken(), 5_000);
      }
      return;
    }
    if (ref.startsWith("subscribe:")) {
      const entry = [...this.entries.values()].find((e) => e.ref === ref);
      if (!entry) {
        return; // The answer to a subscribe that has since been replaced.
      }
      // An error after `subscribed` (a replay that failed part-way) ended the subscription too:
      // until it is subscribed again, the feed's events are not this subscription's.
      entry.pending = ref;
      const feed = entry.feed;
      if (error.code === "cursor_expired") {
        // The log no longer reaches back to the cursor: go on live, and once live, tell the app
        // to refetch.
        entry.cursor = undefined;
        entry.lastId = 0;
        entry.expired = error.message;
        this.transmitSubscribe(entry);
        return;
      }
      if (error.code === "unavailable") {
        clearTimeout(entry.retry);
        entry.retry = setTimeout(() => {
          if (this.entries.get(feed) === entry) {
            this.transmitSubscribe(entry);
          }
        }, 1_000);
        return;
      }
      // Refused for good. A subscription this one was replacing may still be live on the
      // relay: end it too.
      this.entries.delete(feed);
      this.transmit({ type: "unsubscribe", ref: this.ref("unsubscribe"), feed });
      this.emit("error", { ...error, feed });
      return;
    }
    this.emit("error", error);
  }

  private transmitSubscribe(entry: Entry): void {
    if (this.socket?.readyState !== OPEN) {
      return; // Sent when the connection opens.
    }
    entry.pending = this.ref(`subscribe:${entry.feed}`);
    entry.ref = entry.pending;
    const frame: Record<string, unknown> = {
      type: "subscribe",
      ref: entry.pending,
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
    this.transmit(this.sendFrame(clientId, pending.sessionId, pending.body));
  }

  private sendFrame(clientId: string, sessionId: string, body: string): Record<string, unknown> {
    return {
      type: "send",
      ref: `send:${clientId}`,
      session_id: sessionId,
      body,
      client_id: clientId,
    };
  }

  /**
   * Sends a frame if the socket is open (otherwise it goes out, if still wanted, on reconnect),
   * at most `FRAMES_PER_SECOND` a second: a burst (many sends queued offline) waits its turn
   * instead of tripping the relay's rate limit.
   */
  private transmit(frame: Record<string, unknown>): void {
    const socket = this.socket;
    if (!socket || socket.readyState !== OPEN) {
      return;
    }
    this.outbox.push(JSON.stringify(frame));
    this.flush();
  }

  private flush(): void {
    const now = Date.now();
    this.budget = Math.min(
      FRAMES_PER_SECOND,
      this.budget + ((now - this.budgetAt) / 1000) * FRAMES_PER_SECOND,
    );
    this.budgetAt = now;
    const socket = this.socket;
    while (this.outbox.length > 0 && this.budget >= 1 && socket?.readyState === OPEN) {
      socket.send(this.outbox.shift() as string);
      this.budget -= 1;
    }
    if (this.outbox.length > 0 && this.pump === undefined) {
      this.pump = setTimeout(() => {
        this.pump = undefined;
        this.flush();
      }, 1000 / FRAMES_PER_SECOND);
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
  // Closing a socket that is still connecting reports an error; it is expected, and some
  // implementations (ws) throw an error no one listens to.
  socket.onerror = () => {};
}

/**
 * The relay's `/api/realtime/status` beside a socket URL: the same host and port, over HTTP, and
 * the same path before `/ws` (a relay behind a path prefix). None for a socket path that does not
 * end in `/ws`: the token is never sent to what may be another service.
 */
/** What the relay's API answered about a refused socket. */
interface Answer {
  status: number;
  code: string;
  message: string;
}

/** The URL of `/api/realtime/<endpoint>` on the relay a socket URL names, beside its `/ws`. */
function apiUrl(socketUrl: string, endpoint: "status" | "health"): string | undefined {
  let url: URL;
  try {
    // A browser takes a socket URL relative to the page.
    url = new URL(socketUrl, (globalThis as { location?: { href: string } }).location?.href);
  } catch {
    return undefined;
  }
  const scheme = SCHEMES[url.protocol];
  if (scheme === undefined || !url.pathname.endsWith("/ws")) {
    return undefined;
  }
  const prefix = url.pathname.slice(0, -"/ws".length);
  return `${scheme}//${url.host}${prefix}/api/realtime/${endpoint}`;
}

function claims(token: string): { exp?: unknown; iat?: unknown } | undefined {
  const payload = token.split(".")[1];
  if (!payload) {
    return undefined;
  }
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, "=")));
  } catch {
    return undefined;
  }
}

/** A JWT's `exp` in milliseconds, if it has one. */
export function tokenExpiry(token: string): number | undefined {
  const exp = claims(token)?.exp;
  return typeof exp === "number" ? exp * 1000 : undefined;
}

/** How long a JWT lives, in milliseconds: `exp - iat`, or until `exp` by this clock. */
export function tokenLifetime(token: string): number | undefined {
  const { exp, iat } = claims(token) ?? {};
  if (typeof exp !== "number") {
    return undefined;
  }
  if (typeof iat === "number") {
    return Math.max(0, (exp - iat) * 1000);
  }
  return Math.max(0, exp * 1000 - Date.now());
}

/** The length of a string in UTF-8. */
function byteLength(text: string): number {
  return new TextEncoder().encode(text).length;
}

/** Whether a string is valid Unicode (no lone surrogates), which the relay requires. */
function wellFormed(text: string): boolean {
  return !/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/.test(text);
}

/** A random (v4) uuid; `crypto.randomUUID` exists only in secure contexts. */
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function uuid(): string {
  const crypto = globalThis.crypto;
  if (typeof crypto.randomUUID === "function") {
    return crypto.randomUUID();
  }
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = ((bytes[6] as number) & 0x0f) | 0x40;
  bytes[8] = ((bytes[8] as number) & 0x3f) | 0x80;
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/**
 * The event id a cursor stands at: its leading digits (a cursor is `<id>` or `<id>.<tag>`).
 * Only for telling events already delivered from new ones; a cursor is resumed from as it is.
 */
function positionOf(cursor: string): number {
  const id = Number.parseInt(cursor, 10);
  return Number.isFinite(id) ? id : 0;
}
