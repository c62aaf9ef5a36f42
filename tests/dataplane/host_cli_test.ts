// The host CLI (dataplane/main.ts) as a user runs it: exit statuses (0 help
// or clean stop, 1 runtime error, 2 usage error), the messages, the socket
// file's mode, never removing a file it does not own, and the stats printed
// after SIGTERM ends a session.

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { VhostUserBlkClient } from "../../client/blk_client.ts";
import { VIRTIO_BLK_S_OK } from "../../client/virtio_blk_defs.ts";
import { makeScratchDir } from "../harness/mod.ts";

const REPO = fileURLToPath(new URL("../../", import.meta.url));

/** A running `deno run -A dataplane/main.ts ...` with its stderr collected. */
class HostProcess {
  readonly child: Deno.ChildProcess;
  stderr = "";
  stdout = "";
  readonly #pumps: Promise<void>[];

  constructor(args: string[]) {
    this.child = new Deno.Command(`${REPO}deno`, {
      args: ["run", "-A", "dataplane/main.ts", ...args],
      cwd: REPO,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#pumps = [
      this.#pump(this.child.stderr, (t) => this.stderr += t),
      this.#pump(this.child.stdout, (t) => this.stdout += t),
    ];
  }

  async #pump(s: ReadableStream<Uint8Array>, add: (t: string) => void): Promise<void> {
    for await (const t of s.pipeThrough(new TextDecoderStream())) add(t);
  }

  /** Resolves once stderr matches `re` (fails when the process exits first or on timeout). */
  async waitFor(re: RegExp, timeoutMs = 30_000): Promise<void> {
    const end = Date.now() + timeoutMs;
    let exited = false;
    this.child.status.then(() => exited = true);
    while (!re.test(this.stderr)) {
      if (exited) assert.fail(`host exited before ${re}:\n${this.stderr}`);
      if (Date.now() > end) assert.fail(`timed out waiting for ${re}:\n${this.stderr}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Waits for exit and the end of output. */
  async done(): Promise<{ code: number; stdout: string; stderr: string }> {
    const st = await this.child.status;
    await Promise.all(this.#pumps);
    return { code: st.code, stdout: this.stdout, stderr: this.stderr };
  }
}

/** Runs the host to completion (for the cases that exit by themselves). */
function runHost(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new HostProcess(args).done();
}

Deno.test("host CLI: --help prints the usage and exits 0", async () => {
  const r = await runHost(["--help"]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^Usage: deno task host -- --image IMAGE --socket PATH/);
  for (const flag of ["--cache", "--aio", "--read-only", "--queues", "--logical-block-size"]) {
    assert.ok(r.stdout.includes(flag), `usage mentions ${flag}`);
  }
});

Deno.test("host CLI: usage errors exit 2 with a clear message", async () => {
  const cases: [string[], RegExp][] = [
    [["--image", "null-co:1M", "--socket", "/tmp/x.sock", "--bogus"], /bogus/],
    [["--socket", "/tmp/x.sock"], /--image is required/],
    [["--image", "null-co:1M"], /--socket is required/],
    [["--image", "null-co:1M", "--socket", "/tmp/x.sock", "--cache", "fast"], /--cache must be/],
    [["--image", "null-co:1M", "--socket", "/tmp/x.sock", "--queues", "0"], /--queues must be/],
    [["--image", "null-co:1M", "--socket", "/tmp/x.sock", "--queue-size", "100"], /power of two/],
    [["--image", "null-co:1000", "--socket", "/tmp/x.sock"], /multiple of 512/],
    [
      ["--image", "null-co:1M", "--socket", "/tmp/x.sock", "--serial", "x".repeat(21)],
      /at most 20 bytes/,
    ],
  ];
  const results = await Promise.all(cases.map(([args]) => runHost(args)));
  results.forEach((r, i) => {
    const [args, re] = cases[i];
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, re, args.join(" "));
    assert.match(r.stderr, /Try --help/);
    assert.equal(r.stdout, "");
  });
});

Deno.test("host CLI: a missing image exits 1 without creating the socket", async () => {
  const dir = await makeScratchDir("cli-missing");
  try {
    const r = await runHost(["--image", `${dir}/nope.raw`, "--socket", `${dir}/s.sock`]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /image .*nope\.raw: no such file/);
    assert.throws(() => Deno.lstatSync(`${dir}/s.sock`), Deno.errors.NotFound);
    // a directory is not an image either
    const d = await runHost(["--image", dir, "--socket", `${dir}/s.sock`]);
    assert.equal(d.code, 1, d.stderr);
    assert.match(d.stderr, /is a directory/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("host CLI: aio=native without cache=none exits 1 with the reason", async () => {
  const dir = await makeScratchDir("cli-native");
  try {
    Deno.writeFileSync(`${dir}/disk.raw`, new Uint8Array(1 << 20));
    const r = await runHost([
      "--image",
      `${dir}/disk.raw`,
      "--socket",
      `${dir}/s.sock`,
      "--aio",
      "native",
    ]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /aio=native requires cache=none/);
    assert.throws(() => Deno.lstatSync(`${dir}/s.sock`), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("host CLI: a socket path in use exits 1 (EADDRINUSE) and leaves the listener alone", async () => {
  const dir = await makeScratchDir("cli-inuse");
  const path = `${dir}/s.sock`;
  const listener = Deno.listen({ transport: "unix", path });
  try {
    const r = await runHost(["--image", "null-co:1M", "--socket", path]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /EADDRINUSE/);
    assert.match(r.stderr, /another process is listening/);
    // the other server's socket is still there and still accepts
    assert.ok(Deno.lstatSync(path).isSocket);
    const accepted = listener.accept();
    const conn = await Deno.connect({ transport: "unix", path });
    (await accepted).close();
    conn.close();
  } finally {
    listener.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("host CLI: a regular file at the socket path is never removed", async () => {
  const dir = await makeScratchDir("cli-file");
  const path = `${dir}/s.sock`;
  await Deno.writeTextFile(path, "precious data");
  try {
    const r = await runHost(["--image", "null-co:1M", "--socket", path]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /exists and is not a socket/);
    assert.equal(await Deno.readTextFile(path), "precious data");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("host CLI: a stale socket is replaced; SIGTERM after a session exits 0 with stats", async () => {
  const dir = await makeScratchDir("cli-session");
  const path = `${dir}/s.sock`;
  // A socket file whose server is gone (stale): the host may replace it.
  Deno.listen({ transport: "unix", path }).close();
  Deno.writeFileSync(`${dir}/disk.raw`, new Uint8Array(4 << 20));
  const host = new HostProcess([
    "--image",
    `${dir}/disk.raw`,
    "--socket",
    path,
    "--queues",
    "2",
    "--serial",
    "cli-test",
  ]);
  try {
    await host.waitFor(/serving .*disk\.raw .* on .*s\.sock: 2 queue\(s\)/);
    assert.equal(Deno.statSync(path).mode! & 0o777, 0o600, "socket mode 0600");
    const c = await VhostUserBlkClient.connect(path, { numQueues: 2, queueSize: 64, slots: 8 });
    c.queues[0].data(0).fill(0x42, 0, 4096);
    assert.equal(await c.execute(0, (q) => q.write(0, 8192, 4096)), VIRTIO_BLK_S_OK);
    assert.equal(await c.execute(1, (q) => q.read(0, 8192, 4096)), VIRTIO_BLK_S_OK);
    assert.ok(c.queues[1].data(0).subarray(0, 4096).every((b) => b === 0x42));
    assert.equal(await c.execute(1, (q) => q.flush(0)), VIRTIO_BLK_S_OK);
    // SIGUSR1 dumps the counters and each running ring's indexes, and the host carries on.
    host.child.kill("SIGUSR1");
    await host.waitFor(
      /queue 1: 2 requests[^\n]*\n {4}ring: avail 2 last_avail 2 used 2 in_flight 0 kicks on/,
    );
    assert.match(host.stderr, /queue 0: 1 requests[^\n]*\n {4}ring: avail 1 last_avail 1 used 1/);
    await c.close();
    await host.waitFor(/front-end #1 disconnected: 3 requests/);
    host.child.kill("SIGTERM");
    const r = await host.done();
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /SIGTERM: stopping/);
    assert.match(r.stderr, /stopped cleanly/);
    assert.match(r.stderr, /queue 0: 1 requests \(0 reads, 1 writes/);
    assert.match(r.stderr, /queue 1: 2 requests \(1 reads, 0 writes, 1 flushes/);
    assert.match(r.stderr, /total: 1 connection\(s\), 3 requests, 0 IOERR/);
    assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound, "socket removed on exit");
    const img = Deno.readFileSync(`${dir}/disk.raw`);
    assert.ok(img.subarray(8192, 12288).every((b) => b === 0x42), "data in the image");
  } finally {
    try {
      host.child.kill("SIGKILL");
    } catch { /* already exited */ }
    await host.done();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("host CLI: --socket-mode, and SIGINT with no session exits 0", async () => {
  const dir = await makeScratchDir("cli-mode");
  const path = `${dir}/s.sock`;
  const host = new HostProcess([
    "--image",
    "null-co:1M",
    "--socket",
    path,
    "--socket-mode",
    "0660",
  ]);
  try {
    await host.waitFor(/serving null-co/);
    assert.equal(Deno.statSync(path).mode! & 0o777, 0o660);
    host.child.kill("SIGINT");
    const r = await host.done();
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /SIGINT: stopping/);
    assert.match(r.stderr, /total: 0 connection\(s\), 0 requests/);
  } finally {
    try {
      host.child.kill("SIGKILL");
    } catch { /* already exited */ }
    await host.done();
    await Deno.remove(dir, { recursive: true });
  }
});

// `deno task host -- ARGS` (the README's form) hands the program a leading
// `--`: both option syntaxes must see the options after it, not stop there.
Deno.test("deno task host -- ARGS: the separator is dropped, for the short options and qsd's", async () => {
  const root = fileURLToPath(new URL("../..", import.meta.url));
  const run = async (args: string[]) => {
    const out = await new Deno.Command(`${root}/deno`, {
      args: ["task", "host", "--", ...args],
      cwd: root,
      stdout: "piped",
      stderr: "piped",
    }).output();
    return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
  };
  const short = await run(["--image", "null-co:1M"]);
  assert.equal(short.code, 2);
  assert.match(short.stderr, /--socket is required/);
  const qsd = await run(["--blockdev", "driver=null-co,node-name=a,bogus=1"]);
  assert.equal(qsd.code, 1);
  assert.match(qsd.stderr, /Parameter 'bogus' is unexpected/);
});
