/**
 * `deno task demo` as a user runs it: a subprocess with short phases, checked
 * for its exit status, its report, zero errors and a removed temp directory.
 */
import assert from "node:assert/strict";
import { parseDemoArgs } from "../../demo/demo.ts";
import { UsageError } from "../../dataplane/host_options.ts";

const DEMO = new URL("../../demo/demo.ts", import.meta.url).pathname;

async function runDemo(args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", DEMO, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

Deno.test("demo: parseDemoArgs defaults and errors", () => {
  const d = parseDemoArgs([]);
  assert.equal(d.durationMs, 2500);
  assert.equal(d.imageSize, 256 << 20);
  assert.equal(d.help, false);
  assert.equal(parseDemoArgs(["-h"]).help, true);
  assert.throws(() => parseDemoArgs(["--duration-ms", "x"]), UsageError);
  assert.throws(() => parseDemoArgs(["--image-size", "1000"]), UsageError);
  assert.throws(() => parseDemoArgs(["--bogus"]), UsageError);
});

Deno.test("demo: --help and a usage error", async () => {
  const help = await runDemo(["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /Usage: deno task demo/);
  const bad = await runDemo(["--duration-ms", "-5"]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /Try --help/);
});

Deno.test("demo: short run passes, reports every phase, removes its directory", async () => {
  const r = await runDemo(["--duration-ms", "300", "--image-size", "64M"]);
  const why = `stdout:\n${r.stdout}\nstderr:\n${r.stderr}`;
  assert.equal(r.code, 0, why);

  assert.match(r.stdout, /verify: .* 0 mismatches, 0 errors: OK/, why);
  const header = /^phase +IOPS +MiB\/s +p50 us +p99 us +p99\.9 us +errors$/m;
  assert.match(r.stdout, header, why);
  for (const name of ["4k randread QD1", "4k randread QD32", "4k randwrite QD32", "64k read QD8"]) {
    const row = r.stdout.split("\n").find((l) => l.startsWith(`${name} `));
    assert.ok(row, `no report row for ${name}\n${why}`);
    const cols = row.trim().split(/\s{2,}/);
    assert.equal(cols.length, 7, row);
    assert.ok(Number(cols[1].replaceAll(",", "")) > 0, `no IOPS in ${row}`);
    assert.equal(cols[6], "0", `errors in ${row}`);
  }
  assert.match(r.stdout, /host stats:\n/, why);
  assert.match(r.stdout, /total: 1 connection\(s\), \d+ requests, 0 IOERR/, why);
  assert.doesNotMatch(r.stdout, /BROKEN/, why);
  assert.match(r.stdout, /demo: PASS/, why);

  // Not a terminal: one line per phase, no progress bar.
  assert.doesNotMatch(r.stderr, /\r/);
  assert.doesNotMatch(r.stderr, /error/i, why);

  const dir = /^removed (\S+)$/m.exec(r.stdout)?.[1];
  assert.ok(dir, why);
  assert.match(dir, /dataplane-demo-/);
  assert.throws(() => Deno.statSync(dir), Deno.errors.NotFound);
});
