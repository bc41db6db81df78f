// Test harness: a fresh database per test file, real relay processes (the workspace's `relay`
// binary, built by `cargo build -p relay`), real tokens from `relay token`.

import { execFile, spawn, type ChildProcess } from "node:child_process";
import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import net from "node:net";
import { promisify } from "node:util";
import pg from "pg";

const run = promisify(execFile);

export const RELAY_BIN =
  process.env.RELAY_BIN ?? fileURLToPath(new URL("../../../target/debug/relay", import.meta.url));
const SERVER = (process.env.TEST_DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432").replace(
  /\/$/,
  "",
);
export const SECRET = "js-client-test-secret-0123456789abcdef";

export type Role = "admin" | "dentist" | "patient" | "chatbot";
export interface User {
  id: string;
  role: Role;
}

/** A database made for one test file, migrated by `relay migrate`, dropped by `drop()`. */
export class TestDb {
  private constructor(
    readonly name: string,
    readonly url: string,
    readonly client: pg.Client,
  ) {}

  static async create(): Promise<TestDb> {
    const name = `relay_test_js_${randomUUID().replace(/-/g, "")}`;
    const admin = new pg.Client({ connectionString: `${SERVER}/postgres` });
    await admin.connect();
    await admin.query(`create database ${name}`);
    await admin.end();
    const url = `${SERVER}/${name}`;
    await run(RELAY_BIN, ["migrate"], { env: { ...process.env, DATABASE_URL: url } });
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    return new TestDb(name, url, client);
  }

  async user(role: Role): Promise<User> {
    const id = randomUUID();
    await this.client.query("insert into profiles (id, role, full_name) values ($1, $2, $3)", [
      id,
      role,
      `${role} ${id.slice(0, 8)}`,
    ]);
    return { id, role };
  }

  async book(patient: User, dentist: User): Promise<string> {
    const result = await this.client.query(
      `insert into appointments (patient_id, dentist_id, starts_at, ends_at)
       values ($1, $2, now() + interval '1 day', now() + interval '1 day 1 hour') returning id`,
      [patient.id, dentist.id],
    );
    return result.rows[0].id as string;
  }

  async query<T extends pg.QueryResultRow>(sql: string, params: unknown[] = []): Promise<T[]> {
    return (await this.client.query<T>(sql, params)).rows;
  }

  async drop(): Promise<void> {
    await this.client.end();
    const admin = new pg.Client({ connectionString: `${SERVER}/postgres` });
    await admin.connect();
    await admin.query(`drop database if exists ${this.name} with (force)`);
    await admin.end();
  }
}

/** A signed token for a user, from the relay's own `relay token`. */
export async function token(user: User, ttl = "10m"): Promise<string> {
  const { stdout } = await run(
    RELAY_BIN,
    ["token", "--role", user.role, "--sub", user.id, "--ttl", ttl],
    { env: { ...process.env, RELAY_JWT_SECRET: SECRET } },
  );
  return stdout.trim();
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** `relay serve` as a child process. */
export class Relay {
  private constructor(
    readonly port: number,
    readonly child: ChildProcess,
  ) {}

  get url(): string {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get http(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  static async start(db: TestDb, port: number, env: Record<string, string> = {}): Promise<Relay> {
    const child = spawn(RELAY_BIN, ["serve"], {
      env: {
        ...process.env,
        DATABASE_URL: db.url,
        RELAY_JWT_SECRET: SECRET,
        RELAY_BIND: `127.0.0.1:${port}`,
        RUST_LOG: "error",
        ...env,
      },
      stdio: "ignore",
    });
    const relay = new Relay(port, child);
    await until(() => relay.healthy(), "the relay to become healthy");
    return relay;
  }

  async healthy(): Promise<boolean> {
    try {
      const response = await fetch(`${this.http}/api/realtime/health`);
      return response.status === 200;
    } catch {
      return false;
    }
  }

  /** Stops the process with `signal` and waits for it to exit. */
  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) {
      return;
    }
    const exited = new Promise<void>((resolve) => this.child.once("exit", () => resolve()));
    this.child.kill(signal);
    await exited;
  }

  signal(signal: NodeJS.Signals): void {
    this.child.kill(signal);
  }
}

/**
 * Waits for a condition, checking it every 20 ms, for at most `timeoutMs`: a guard against a
 * hang, not a performance threshold.
 */
export async function until(
  condition: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = 30_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
