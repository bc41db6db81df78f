// The inspector page in a real headless Chromium (Debian's, driven by playwright-core): a dentist
// watches their appointments; one booked with SQL appears, and disappears when it is moved to
// another dentist. A screenshot is saved under test-results/. And the client itself, in a page of
// an origin the relay does not allow, told why its socket is refused.

import { mkdirSync, readFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { chromium, type Browser } from "playwright-core";

import { freePort, Relay, TestDb, token, type User } from "./support.js";

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";

let db: TestDb;
let relay: Relay;
let browser: Browser;
let patient: User;
let dentist: User;
let otherDentist: User;

beforeAll(async () => {
  db = await TestDb.create();
  relay = await Relay.start(db, await freePort());
  patient = await db.user("patient");
  dentist = await db.user("dentist");
  otherDentist = await db.user("dentist");
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
});

afterAll(async () => {
  await browser?.close();
  await relay?.stop();
  await db?.drop();
});

describe("the inspector page", () => {
  it("shows a dentist's appointment appear live, and disappear when it moves away", async () => {
    const page = await browser.newPage();
    const problems: string[] = [];
    page.on("pageerror", (error) => problems.push(String(error)));
    page.on("console", (message) => {
      if (message.type() === "error") problems.push(message.text());
    });
    // Everything the page loads comes from the relay itself.
    const foreign: string[] = [];
    page.on("request", (request) => {
      if (!request.url().startsWith(relay.http) && !request.url().startsWith("ws://127.0.0.1")) {
        foreign.push(request.url());
      }
    });

    await page.goto(`${relay.http}/`);
    await expect(page.title()).resolves.toBe("Relay inspector");
    await page.getByLabel("Access token").fill(await token(dentist));
    await page.getByRole("button", { name: "Connect", exact: true }).click();
    await page.locator('#state[data-state="open"]').waitFor();
    // Subscribed: the stats table names the feed with its starting cursor.
    await page.locator('#stats tr[data-feed="appointments"] td:nth-child(5):not(:empty)').waitFor();

    const id = await db.book(patient, dentist);
    const row = page.locator(`table[data-feed="appointments"] tr[data-row-id="${id}"]`);
    await row.waitFor({ state: "visible" });
    await expect(row.locator("td").allTextContents()).resolves.toContain(dentist.id);
    await page.locator("#events tbody tr td.op-INSERT").first().waitFor();

    await db.query("update appointments set dentist_id = $1 where id = $2", [otherDentist.id, id]);
    await row.waitFor({ state: "detached" });
    await page.locator("#events tbody tr td.op-DELETE").first().waitFor();
    await expect(
      page.locator('#stats tr[data-feed="appointments"] td:nth-child(2)').textContent(),
    ).resolves.toBe("2");

    mkdirSync("test-results", { recursive: true });
    await page.screenshot({ path: "test-results/inspector.png", fullPage: true });
    expect(problems).toEqual([]);
    expect(foreign).toEqual([]);
    await page.close();
  });

  it("gives up on a token the relay refuses, and says why", async () => {
    const page = await browser.newPage();
    await page.goto(`${relay.http}/`);
    const good = await token(dentist);
    // The same claims under a signature the relay's secret did not make.
    const forged = good.slice(0, good.lastIndexOf(".") + 1) + "A".repeat(43);
    await page.getByLabel("Access token").fill(forged);
    await page.getByRole("button", { name: "Connect", exact: true }).click();
    await page.locator('#state[data-state="closed"]').waitFor();
    await expect(page.locator("#state").textContent()).resolves.toContain("token refused");
    await expect(page.locator("#message").textContent()).resolves.toContain("invalid_signature");
    await expect(page.getByRole("button", { name: "Connect", exact: true }).isEnabled()).resolves.toBe(true);
    await page.close();
  });

  it("gives up on a relay that stops answering, and reconnects when it answers again", async () => {
    const page = await browser.newPage();
    // The page's timers run on a clock the test moves; the sockets are real.
    await page.clock.install();
    await page.goto(`${relay.http}/`);
    await page.getByLabel("Access token").fill(await token(dentist));
    await page.getByRole("button", { name: "Connect", exact: true }).click();
    await page.locator('#state[data-state="open"]').waitFor();
    // Subscribed before the relay freezes: a late answer must not count as the heartbeat's.
    await page.locator('#stats tr[data-feed="appointments"] td:nth-child(5):not(:empty)').waitFor();
    relay.signal("SIGSTOP");
    try {
      // One heartbeat, and its answer's deadline.
      await page.clock.runFor(15_000 + 10_000 + 1_000);
      await page.locator('#state[data-state="reconnecting"]').waitFor();
      await expect(page.locator("#message").textContent()).resolves.toContain("stopped answering");
    } finally {
      relay.signal("SIGCONT");
    }
    // Reconnects within its longest back-off, less than a minute.
    for (let i = 0; i < 60; i += 1) {
      if ((await page.locator("#state").getAttribute("data-state")) === "open") break;
      await page.clock.runFor(1_000);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    await page.locator('#state[data-state="open"]').waitFor();
    await page.close();
  });
});

describe("the client in a page of an origin the relay does not allow", () => {
  it("reports origin_not_allowed, which the browser does not show", async () => {
    const guarded = await Relay.start(db, await freePort(), {
      RELAY_ALLOWED_ORIGINS: "https://dash.example.com",
    });
    const page = await browser.newPage();
    const servers: Server[] = [];
    try {
      // A page of another origin (another port of this machine), served by the test itself,
      // with the client's built module; it reports the client's errors in `window.codes`.
      const port = await freePort();
      const origin = `http://127.0.0.1:${port}`;
      const dist = new URL("../dist/", import.meta.url);
      const html = `<!doctype html><title>dash</title>
        <script type="module">
          import { connect } from "/client/index.js";
          window.codes = [];
          window.start = (url, token) => {
            window.relay = connect({ url, token });
            window.relay.on("error", (error) => window.codes.push(error.code));
          };
        </script>`;
      const server = createServer((request, response) => {
        const path = new URL(request.url ?? "/", origin).pathname;
        if (path.startsWith("/client/")) {
          response.setHeader("content-type", "text/javascript");
          response.end(readFileSync(new URL(path.slice("/client/".length), dist)));
        } else {
          response.setHeader("content-type", "text/html");
          response.end(html);
        }
      });
      servers.push(server);
      await new Promise<void>((resolve) => server.listen(port, "127.0.0.1", resolve));
      type Page = { codes: string[]; start(url: string, token: string): void };
      await page.goto(`${origin}/`);
      await page.waitForFunction(() => "start" in window);
      await page.evaluate(({ url, token }) => (window as unknown as Page).start(url, token), {
        url: `${guarded.http.replace("http", "ws")}/ws`,
        token: await token(dentist),
      });
      await page.waitForFunction(() =>
        (window as unknown as Page).codes.includes("origin_not_allowed"),
      );
      // Only the origin: the token was never in question.
      const codes = await page.evaluate(() => (window as unknown as Page).codes);
      expect(codes).toEqual(["origin_not_allowed"]);
    } finally {
      await page.close();
      await guarded.stop();
      for (const server of servers) server.close();
    }
  });
});
