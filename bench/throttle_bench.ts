/**
 * Throttle groups measured over 10 s, ours against qemu-storage-daemon 7.2
 * given the same command line word for word (`--object throttle-group`,
 * `--blockdev driver=throttle`): the built-in vhost-user-blk client keeps 8
 * reads in flight on a null-co node behind the group and counts completions.
 * Cases: x-iops-total=500 (4 KiB reads), x-bps-total=4 MiB/s (64 KiB
 * reads), and a burst (x-iops-total=100, -max=400, -max-length=3: the rate
 * in the first 2 s and in the last 4 s). The first second is left out of the
 * steady-state figures (it holds the bucket's initial allowance).
 * The figures are quoted in the README. Run under `flock /tmp/bench.lock`.
 *
 * Under `deno bench` (`deno task bench`) it measures the filter's cost per
 * request instead: a null-co read through a throttle node whose limit is
 * never reached (one bucket check under the group's lock), against the same
 * read without the filter.
 *
 * Run: `deno run -A bench/throttle_bench.ts [--seconds 10] [--only ours|qsd]`
 *
 * @module
 */

import { HOST_V8_FLAGS_ARG } from "../dataplane/mod.ts";
import { parseArgs } from "node:util";
import { AioContext } from "../aio/mod.ts";
import {
  type BlockDriver,
  IoVector,
  NullCoDriver,
  THROTTLE_GROUP_BYTES,
  throttleConfigInit,
  ThrottleGroup,
} from "../block/mod.ts";
import { ThrottleDriver } from "../block/throttle/mod.ts";
import { VhostUserBlkClient } from "../client/blk_client.ts";
import { makeScratchDir, ServerProcess } from "../tests/harness/mod.ts";

interface Case {
  name: string;
  group: string;
  bytes: number;
  /** [from, to, expected per second, unit] windows to report. */
  windows: [number, number, number, "IOPS" | "MiB/s"][];
  /** Report when the burst ended: the rate fell below the middle of [avg, max]. */
  burst?: { avg: number; max: number };
}

function cases(seconds: number): Case[] {
  return [
    {
      name: "x-iops-total=500, 4 KiB reads",
      group: "x-iops-total=500",
      bytes: 4096,
      windows: [[1, seconds, 500, "IOPS"]],
    },
    {
      name: "x-bps-total=4 MiB/s, 64 KiB reads",
      group: `x-bps-total=${4 << 20}`,
      bytes: 65536,
      windows: [[1, seconds, 4, "MiB/s"]],
    },
    {
      name: "burst: x-iops-total=100, -max=400, -max-length=3",
      group: "x-iops-total=100,x-iops-total-max=400,x-iops-total-max-length=3",
      bytes: 4096,
      // Bucket 1200 filled at 400 - 100 = 300/s from 41: 3.9 s of burst.
      windows: [[0.2, 2.2, 400, "IOPS"], [seconds - 4, seconds, 100, "IOPS"]],
      burst: { avg: 100, max: 400 },
    },
  ];
}

function argv(dir: string, group: string): string[] {
  return [
    "--object",
    `throttle-group,id=tg0,${group}`,
    "--blockdev",
    "driver=null-co,node-name=n0,size=1073741824",
    "--blockdev",
    "driver=throttle,node-name=t0,throttle-group=tg0,file=n0",
    "--export",
    `type=vhost-user-blk,id=e0,node-name=t0,addr.type=unix,addr.path=${dir}/e0.sock`,
  ];
}

async function waitForSocket(path: string, p: ServerProcess): Promise<void> {
  for (let i = 0; i < 300; i++) {
    try {
      if (Deno.statSync(path).isSocket) return;
    } catch { /* not yet */ }
    if (p.exited) throw new Error(`server exited: ${p.stderr}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`no socket at ${path}: ${p.stderr}`);
}

/** Completion times (s) of reads kept 8 deep for `seconds`. */
async function measure(sock: string, bytes: number, seconds: number): Promise<number[]> {
  const c = await VhostUserBlkClient.connect(sock, { slots: 8 });
  const q = c.queues[0];
  const times: number[] = [];
  let running = true, inFlight = 0, i = 0;
  const start = performance.now();
  q.onComplete = (slot) => {
    inFlight--;
    if (!running) return;
    times.push((performance.now() - start) / 1000);
    q.read(slot, (i++ * bytes) % (1 << 30), bytes);
    inFlight++;
  };
  for (let s = 0; s < 8; s++, inFlight++) q.read(s, i++ * bytes, bytes);
  q.notify();
  const end = start + seconds * 1000;
  while (performance.now() < end) {
    await c.waitAsync(Math.ceil(Math.max(1, Math.min(50, end - performance.now()))));
    q.reap();
    q.notify();
  }
  running = false;
  while (inFlight > 0 && await c.waitAsync(2000)) q.reap();
  await c.close();
  return times;
}

async function run(server: "ours" | "qsd", c: Case, seconds: number): Promise<string[]> {
  const dir = await makeScratchDir("throttle-bench");
  const args = argv(dir, c.group);
  const p = server === "qsd"
    ? new ServerProcess("qemu-storage-daemon", args)
    : new ServerProcess(Deno.execPath(), [
      "run",
      "-A",
      HOST_V8_FLAGS_ARG,
      new URL("../dataplane/main.ts", import.meta.url).pathname,
      ...args,
    ]);
  try {
    await waitForSocket(`${dir}/e0.sock`, p);
    const times = await measure(`${dir}/e0.sock`, c.bytes, seconds);
    const lines: string[] = [];
    if (c.burst) {
      // The end of the last 100 ms slice still above the middle rate.
      const mid = (c.burst.avg + c.burst.max) / 2 * 0.1;
      let end = 0;
      for (let t = 0; t < seconds; t += 0.1) {
        if (times.filter((x) => x >= t && x < t + 0.1).length >= mid) end = t + 0.1;
      }
      lines.push(
        `${server.padEnd(4)} ${c.name.padEnd(50)} burst ended at ${end.toFixed(1)} s ` +
          `(${times.filter((x) => x < end).length} requests by then)`,
      );
    }
    return lines.concat(c.windows.map(([from, to, want, unit]) => {
      const n = times.filter((t) => t >= from && t < to).length;
      const perS = n / (to - from) * (unit === "MiB/s" ? c.bytes / (1 << 20) : 1);
      const err = (perS / want - 1) * 100;
      return `${server.padEnd(4)} ${c.name.padEnd(50)} ${from}-${to} s: ` +
        `${perS.toFixed(1)} ${unit} (limit ${want}, ${err >= 0 ? "+" : ""}${err.toFixed(1)}%)`;
    }));
  } finally {
    await p.stop("SIGTERM", 5000);
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: { seconds: { type: "string", default: "10" }, only: { type: "string" } },
  });
  const seconds = Number(values.seconds);
  if (!(seconds >= 6)) throw new Error("--seconds: at least 6");
  const servers = values.only ? [values.only as "ours" | "qsd"] : ["ours", "qsd"] as const;
  for (const c of cases(seconds)) {
    for (const s of servers) {
      for (const line of await run(s, c, seconds)) console.log(line);
    }
  }
}

// ---- deno bench: the filter's cost on the hot path ----

function readLoop(ctx: AioContext, d: BlockDriver): () => void {
  const qiov = IoVector.fromBuffers([new Uint8Array(4096)]);
  let done = 0;
  const cb = () => done++;
  return () => {
    const want = done + 1;
    d.preadv(0, qiov, cb);
    while (done < want) ctx.poll(false);
  };
}

if (!import.meta.main) {
  const benchCtx = new AioContext();
  const plain = new NullCoDriver(benchCtx, { size: 1 << 20 });
  const group = new ThrottleGroup(new ArrayBuffer(THROTTLE_GROUP_BYTES));
  const high = throttleConfigInit();
  high.buckets["iops-total"].avg = 1e15; // never reached
  high.buckets["bps-total"].avg = 1e15;
  group.init(high, benchCtx.now());
  const throttled = new ThrottleDriver(
    benchCtx,
    new NullCoDriver(benchCtx, { size: 1 << 20 }),
    group,
  );

  Deno.bench(
    "null-co 4 KiB read",
    { group: "throttle filter", baseline: true },
    readLoop(benchCtx, plain),
  );
  Deno.bench(
    "null-co 4 KiB read through a throttle node (limit not reached)",
    { group: "throttle filter" },
    readLoop(benchCtx, throttled),
  );
}
