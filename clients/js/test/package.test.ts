// The package as an app installs it: `npm pack` on a clean copy of the sources (no dist/ yet)
// builds it, and the tarball, under the name the README gives, holds a client that loads.

import { execFile } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL("..", import.meta.url));
const scratch = mkdtempSync(join(tmpdir(), "realtime-client-pack-"));

afterAll(() => {
  rmSync(scratch, { recursive: true, force: true });
});

describe("the packed client", () => {
  it("is built by `npm pack` and loads", async () => {
    const copy = join(scratch, "client");
    for (const name of ["package.json", "tsconfig.json", "tsconfig.build.json", "README.md", "src"]) {
      cpSync(join(ROOT, name), join(copy, name), { recursive: true });
    }
    symlinkSync(join(ROOT, "node_modules"), join(copy, "node_modules"), "dir");
    const out = join(scratch, "out");
    mkdirSync(out);
    const { stdout } = await run("npm", ["pack", "--json", "--pack-destination", out], {
      cwd: copy,
    });
    const [packed] = JSON.parse(stdout) as { filename: string; files: { path: string }[] }[];
    const { version } = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as {
      version: string;
    };
    expect(packed?.filename).toBe(`clinic-realtime-client-${version}.tgz`);
    const files = packed?.files.map((file) => file.path) ?? [];
    // The sources too, which the source maps point to.
    expect(files).toEqual(
      expect.arrayContaining(["dist/index.js", "dist/index.d.ts", "src/index.ts"]),
    );

    await run("tar", ["-xzf", join(out, packed?.filename ?? ""), "-C", out]);
    const client = (await import(
      pathToFileURL(join(out, "package", "dist", "index.js")).href
    )) as typeof import("../src/index.js");
    expect(typeof client.connect).toBe("function");
  });
});
