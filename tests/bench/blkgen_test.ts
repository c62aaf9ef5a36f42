// blkgen, the C load generator of `deno task compare`: it builds warning-free,
// completes requests without errors against our host and qemu-storage-daemon
// in every notification mode (interrupt / poll, EVENT_IDX and INDIRECT on and
// off, 2 queues in a thread each or both in one thread, every queue served),
// writes and reads back a pattern that lands in the image file, reports a stalled or silent server with exit status 2, and stops
// quickly on SIGTERM. Short runs: nothing here measures speed.

import assert from "node:assert/strict";
import { buildBlkgen } from "../../bench/blkgen_build.ts";
import { type BlkServer, startOurs } from "../../bench/compare_servers.ts";
import { makeScratchDir, QemuStorageDaemon } from "../harness/mod.ts";

const MiB = 1 << 20;

/** The fields of blkgen's JSON line the tests look at. */
interface BlkgenResult {
  iops: number;
  ops: number;
  reads: number;
  writes: number;
  errors: number;
  kicks_per_io: number;
  waits_per_io: number;
  lat_us: { p50: number; p99: number; max: number };
  verified?: number;
  mismatches?: number;
  server_cpu_us_per_io?: number;
  per_queue: {
    thread: number;
    ops: number;
    errors: number;
    reaps: number;
    total_ops: number;
    verified: number;
  }[];
  per_thread: { queues: number; waits: number; polls: number }[];
  config: {
    mode: string;
    event_idx: boolean;
    indirect: boolean;
    queues: number;
    threads: number;
  };
  stalled: boolean;
  interrupted: boolean;
}

interface BlkgenRun {
  code: number;
  stdout: string;
  stderr: string;
  result: BlkgenResult | null;
}

async function blkgen(args: string[]): Promise<BlkgenRun> {
  const out = await new Deno.Command(await buildBlkgen(), {
    args: [...args, "--json"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stdout = new TextDecoder().decode(out.stdout);
  const stderr = new TextDecoder().decode(out.stderr);
  let result: BlkgenResult | null = null;
  try {
    result = JSON.parse(stdout.trim().split("\n").pop() ?? "");
  } catch { /* no JSON: the caller asserts on code and stderr */ }
  return { code: out.code, stdout, stderr, result };
}

/** Every notification mode blkgen has, and 2 queues. */
const MODES: { name: string; args: string[]; indirect: boolean; eventIdx: boolean }[] = [
  { name: "interrupt", args: ["--mode", "interrupt"], indirect: false, eventIdx: true },
  { name: "poll", args: ["--mode", "poll"], indirect: false, eventIdx: true },
  {
    name: "interrupt, EVENT_IDX off",
    args: ["--mode", "interrupt", "--event-idx", "off"],
    indirect: false,
    eventIdx: false,
  },
  {
    name: "poll, EVENT_IDX off",
    args: ["--mode", "poll", "--event-idx", "off"],
    indirect: false,
    eventIdx: false,
  },
  {
    name: "interrupt, INDIRECT",
    args: ["--mode", "interrupt", "--indirect", "on"],
    indirect: true,
    eventIdx: true,
  },
  {
    name: "interrupt, INDIRECT, EVENT_IDX off, randrw",
    args: ["--indirect", "on", "--event-idx", "off", "--rw", "randrw", "--rwmixread", "50"],
    indirect: true,
    eventIdx: false,
  },
  {
    name: "poll, INDIRECT",
    args: ["--mode", "poll", "--indirect", "on"],
    indirect: true,
    eventIdx: true,
  },
  {
    name: "2 queues, randwrite",
    args: ["--queues", "2", "--rw", "randwrite"],
    indirect: false,
    eventIdx: true,
  },
  {
    name: "2 queues in 1 thread, interrupt",
    args: ["--queues", "2", "--threads", "1", "--mode", "interrupt"],
    indirect: false,
    eventIdx: true,
  },
  {
    name: "2 queues in 1 thread, poll",
    args: ["--queues", "2", "--threads", "1", "--mode", "poll"],
    indirect: false,
    eventIdx: true,
  },
  {
    name: "2 queues in 1 thread, interrupt, EVENT_IDX off, randrw",
    args: ["--queues", "2", "--threads", "1", "--event-idx", "off", "--rw", "randrw"],
    indirect: false,
    eventIdx: false,
  },
  {
    name: "2 queues in 1 thread, poll, EVENT_IDX off",
    args: ["--queues", "2", "--threads", "1", "--mode", "poll", "--event-idx", "off"],
    indirect: false,
    eventIdx: false,
  },
];

/** The value of `flag` in `args`, as a number, or `fallback`. */
function argNumber(args: string[], flag: string, fallback: number): number {
  const i = args.indexOf(flag);
  return i < 0 ? fallback : Number(args[i + 1]);
}

/**
 * Every queue was served: its own completions in the window, summing to the total,
 * and the queues spread round-robin over the threads.
 */
function assertEveryQueueServed(j: BlkgenResult, what: string): void {
  assert.equal(j.per_queue.length, j.config.queues, what);
  assert.equal(j.per_thread.length, j.config.threads, what);
  for (const [i, q] of j.per_queue.entries()) {
    assert.ok(q.ops > 0, `${what}: queue ${i} completed no request: ${JSON.stringify(j)}`);
    assert.equal(q.thread, i % j.config.threads, what);
    // Each pass with completions reaps at least one and at most QD of them.
    assert.ok(q.reaps > 0 && q.reaps <= q.ops, `${what}: queue ${i}: ${q.reaps} reaps`);
  }
  assert.equal(j.per_queue.reduce((a, q) => a + q.ops, 0), j.ops, what);
  assert.equal(j.per_thread.reduce((a, t) => a + t.queues, 0), j.config.queues, what);
}

/** Runs every mode against `socket`; each completes requests with no error. */
async function everyMode(socket: string, serverPid: number): Promise<void> {
  for (const m of MODES) {
    const r = await blkgen([
      "--socket",
      socket,
      "--server-pid",
      String(serverPid),
      "--qd",
      "16",
      "--duration-ms",
      "150",
      "--warmup-ms",
      "30",
      ...m.args,
    ]);
    assert.equal(r.code, 0, `${m.name}: exit ${r.code}\n${r.stderr}`);
    const j = r.result!;
    assert.ok(j.ops > 100, `${m.name}: only ${j.ops} requests`);
    assert.equal(j.errors, 0, m.name);
    assert.equal(j.config.indirect, m.indirect, m.name);
    assert.equal(j.config.event_idx, m.eventIdx, m.name);
    const queues = argNumber(m.args, "--queues", 1);
    assert.equal(j.config.queues, queues, m.name);
    assert.equal(j.config.threads, argNumber(m.args, "--threads", queues), m.name);
    assertEveryQueueServed(j, m.name);
    assert.ok(j.lat_us.p50 > 0 && j.lat_us.p99 >= j.lat_us.p50 && j.lat_us.max >= j.lat_us.p99);
    assert.ok(j.server_cpu_us_per_io !== undefined && j.server_cpu_us_per_io >= 0, m.name);
    if (m.args.includes("randrw")) assert.ok(j.reads > 0 && j.writes > 0, m.name);
    if (m.args.includes("poll")) assert.equal(j.waits_per_io, 0, `${m.name}: poll mode slept`);
  }
}

/** Word `i` of block `b` as blkgen's --verify writes it (bench/c/blkgen/queue.c, pattern_word). */
function patternWord(seed: bigint, block: bigint, i: bigint): bigint {
  return ((block << 32n) ^ (seed << 16n) ^ i) & 0xffff_ffff_ffff_ffffn;
}

/** Checks a few whole blocks of `image` against the pattern (the data really is in the file). */
async function checkImage(image: string, bs: number, blocks: number, seed: number): Promise<void> {
  const f = await Deno.open(image, { read: true });
  try {
    for (const b of [0, 1, blocks >> 1, blocks - 1]) {
      const buf = new Uint8Array(bs);
      await f.seek(b * bs, Deno.SeekMode.Start);
      let got = 0;
      while (got < bs) got += (await f.read(buf.subarray(got))) ?? bs;
      const dv = new DataView(buf.buffer);
      for (let i = 0; i < bs / 8; i++) {
        const want = patternWord(BigInt(seed), BigInt(b), BigInt(i));
        assert.equal(dv.getBigUint64(i * 8, true), want, `block ${b} word ${i}`);
      }
    }
  } finally {
    f.close();
  }
}

Deno.test("blkgen builds and prints its usage", async () => {
  const exe = await buildBlkgen();
  const help = await new Deno.Command(exe, { args: ["--help"], stdout: "piped" }).output();
  assert.ok(help.success);
  assert.match(new TextDecoder().decode(help.stdout), /--mode MODE\s+interrupt/);
  const bad = await blkgen(["--socket", "/nonexistent", "--mode", "sideways"]);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /--mode takes interrupt or poll/);
  const threads = await blkgen(["--socket", "/nonexistent", "--queues", "2", "--threads", "3"]);
  assert.equal(threads.code, 1);
  assert.match(threads.stderr, /--threads 3 is more than --queues 2/);
  const probe = await blkgen(["--socket", "/nonexistent", "--probe-cpu", "0"]);
  assert.equal(probe.code, 1);
  assert.match(probe.stderr, /--probe-cpu needs --cpu/);
  const self = await blkgen(["--socket", "/nonexistent", "--cpu", "0", "--probe-cpu", "0"]);
  assert.equal(self.code, 1);
  assert.match(self.stderr, /--probe-cpu 0 is --cpu itself/);
});

Deno.test("blkgen vs our host: every mode without errors, verify on a file image", async () => {
  const dir = await makeScratchDir("blkgen-ours");
  let host: BlkServer | null = null;
  try {
    host = await startOurs({
      backend: "null-co",
      image: "",
      nullSize: 1 << 30,
      queues: 2,
      iothreads: 1,
      socket: `${dir}/null.sock`,
    });
    await everyMode(host.socket, host.pid);
    await host.stop();

    const image = `${dir}/disk.raw`;
    const f = await Deno.open(image, { create: true, write: true });
    await f.truncate(8 * MiB);
    f.close();
    host = await startOurs({
      backend: "io_uring",
      image,
      nullSize: 0,
      queues: 2,
      iothreads: 1,
      socket: `${dir}/file.sock`,
    });
    // Both queues in one thread; each verifies its own half of the blocks.
    const seed = 7;
    const r = await blkgen([
      "--socket",
      host.socket,
      "--verify",
      "--queues",
      "2",
      "--threads",
      "1",
      "--qd",
      "8",
      "--seed",
      String(seed),
    ]);
    assert.equal(r.code, 0, r.stderr);
    const blocks = (8 * MiB) / 4096;
    assert.equal(r.result!.verified, blocks);
    assert.equal(r.result!.mismatches, 0);
    assert.equal(r.result!.errors, 0);
    assert.deepEqual(r.result!.per_queue.map((q) => q.verified), [blocks / 2, blocks / 2]);
    assert.equal(r.result!.config.threads, 1);
    await host.stop();
    host = null;
    await checkImage(image, 4096, blocks, seed);
  } finally {
    await host?.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("blkgen vs qemu-storage-daemon: every mode without errors, verify, a stall", async () => {
  const dir = await makeScratchDir("blkgen-qsd");
  const image = `${dir}/disk.raw`;
  const f = await Deno.open(image, { create: true, write: true });
  await f.truncate(8 * MiB);
  f.close();
  let qsd: QemuStorageDaemon | null = null;
  try {
    qsd = await QemuStorageDaemon.start({
      socket: `${dir}/null.sock`,
      blockdev: { driver: "null-co", size: 1 << 30, readZeroes: false },
      numQueues: 2,
      iothread: true,
    });
    await everyMode(qsd.socket, qsd.pid);

    // A server that stops completing requests: blkgen gives up after --timeout-ms with status 2.
    const run = blkgen(["--socket", qsd.socket, "--duration-ms", "5000", "--timeout-ms", "400"]);
    // Well after the set-up (a few ms unless the machine is very busy).
    await new Promise((r) => setTimeout(r, 1000));
    qsd.signal("SIGSTOP");
    const stalled = await run;
    assert.equal(stalled.code, 2, stalled.stderr);
    assert.match(stalled.stderr, /stalled: \d+ requests outstanding/);
    assert.equal(stalled.result?.stalled, true);
    await qsd.kill();

    qsd = await QemuStorageDaemon.start({
      socket: `${dir}/file.sock`,
      blockdev: { driver: "file", filename: image, cacheDirect: true, aio: "io_uring" },
      numQueues: 2,
      iothread: true,
    });
    const seed = 9;
    const r = await blkgen([
      "--socket",
      qsd.socket,
      "--verify",
      "--queues",
      "2",
      "--qd",
      "8",
      "--indirect",
      "on",
      "--seed",
      String(seed),
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.result!.mismatches, 0);
    assert.equal(r.result!.verified, (8 * MiB) / 4096);
    await qsd.kill();
    qsd = null;
    await checkImage(image, 4096, (8 * MiB) / 4096, seed);
  } finally {
    await qsd?.kill();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("blkgen: a server that never answers is an error within --timeout-ms", async () => {
  const dir = await makeScratchDir("blkgen-silent");
  const socket = `${dir}/silent.sock`;
  const listener = Deno.listen({ transport: "unix", path: socket });
  const accepted: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const c of listener) accepted.push(c);
  })();
  try {
    const t0 = performance.now();
    const r = await blkgen(["--socket", socket, "--timeout-ms", "300"]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /did not answer GET_FEATURES within 300 ms/);
    assert.ok(performance.now() - t0 < 3000);
  } finally {
    listener.close();
    await accepting.catch(() => {});
    for (const c of accepted) c.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("blkgen: SIGTERM ends a long run at once with the partial report", async () => {
  const dir = await makeScratchDir("blkgen-sigterm");
  const qsd = await QemuStorageDaemon.start({
    socket: `${dir}/null.sock`,
    blockdev: { driver: "null-co", size: 1 << 30, readZeroes: false },
    iothread: true,
  });
  try {
    const child = new Deno.Command(await buildBlkgen(), {
      args: ["--socket", qsd.socket, "--duration-ms", "60000", "--json"],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    await new Promise((r) => setTimeout(r, 1000));
    const t0 = performance.now();
    child.kill("SIGTERM");
    const out = await child.output();
    assert.ok(performance.now() - t0 < 2000, "blkgen took too long to stop");
    assert.equal(out.code, 128 + 15);
    const j = JSON.parse(new TextDecoder().decode(out.stdout)) as BlkgenResult;
    assert.equal(j.interrupted, true);
    assert.ok(j.ops > 0 && j.errors === 0);
  } finally {
    await qsd.kill();
    await Deno.remove(dir, { recursive: true });
  }
});
