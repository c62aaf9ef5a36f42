/**
 * The disk's own ceiling for a file cell of `deno task compare`: fio on the
 * same image with the same pattern, block size, engine (aio=native is fio's
 * libaio, aio=io_uring its io_uring), O_DIRECT, and the same requests in
 * flight (one fio job per queue, QD each), on the servers' CPU. No
 * virtqueue, no notifications, no second process: what the disk gives a
 * program that submits straight to it. A server near this figure is bound by
 * the disk, and no server can lead another by much there.
 *
 * @module
 */

import type { ComparePattern, RunFailure } from "./compare_client.ts";
import type { BackendName } from "./compare_servers.ts";

/** One fio run: completions per second and p99 completion latency. */
export interface FioSample {
  iops: number;
  p99Us: number;
}

/** What fio is asked to do. */
export interface FioWorkload {
  /** The file backend whose engine fio uses. */
  backend: Exclude<BackendName, "null-co">;
  image: string;
  pattern: ComparePattern;
  /** One fio job per queue. */
  queues: number;
  /** Requests in flight per job. */
  qd: number;
  durationMs: number;
  warmupMs: number;
  /** Pin fio to these CPUs (`taskset -c`), as the servers are. */
  cpus?: string;
}

/**
 * fio's engine for a compare backend.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { fioEngine } from "./compare_fio.ts";
 * assert.equal(fioEngine("native"), "libaio");
 * assert.equal(fioEngine("io_uring"), "io_uring");
 * ```
 */
export function fioEngine(backend: Exclude<BackendName, "null-co">): string {
  return backend === "native" ? "libaio" : "io_uring";
}

/**
 * fio's command line (program first) for `w`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { fioArgs } from "./compare_fio.ts";
 * const a = fioArgs({
 *   backend: "native", image: "/d/disk.raw", pattern: "randread", queues: 2, qd: 32,
 *   durationMs: 1000, warmupMs: 200, cpus: "0",
 * });
 * assert.deepEqual(a.slice(0, 3), ["taskset", "-c", "0"]);
 * assert(a.includes("--ioengine=libaio") && a.includes("--numjobs=2") && a.includes("--iodepth=32"));
 * ```
 */
export function fioArgs(w: FioWorkload): string[] {
  const fio = [
    "fio",
    "--name=ceiling",
    `--filename=${w.image}`,
    "--direct=1",
    `--ioengine=${fioEngine(w.backend)}`,
    `--rw=${w.pattern}`,
    "--bs=4k",
    `--iodepth=${w.qd}`,
    `--numjobs=${w.queues}`,
    "--group_reporting",
    "--thread",
    "--norandommap",
    "--randrepeat=0",
    "--time_based",
    `--ramp_time=${(w.warmupMs / 1000).toFixed(3)}`,
    `--runtime=${(w.durationMs / 1000).toFixed(3)}`,
    "--output-format=json",
  ];
  return w.cpus === undefined ? fio : ["taskset", "-c", w.cpus, ...fio];
}

/**
 * Parses fio's JSON report (one group-reported job) for `pattern`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseFioReport } from "./compare_fio.ts";
 * const r = parseFioReport(JSON.stringify({ jobs: [{ read: { iops: 5000.5,
 *   clat_ns: { percentile: { "99.000000": 250000 } } } }] }), "randread");
 * assert.deepEqual(r, { iops: 5000.5, p99Us: 250 });
 * assert.throws(() => parseFioReport("{}", "randread"), /fio report/);
 * ```
 */
export function parseFioReport(text: string, pattern: ComparePattern): FioSample {
  const side = pattern === "randread" ? "read" : "write";
  const job = (JSON.parse(text) as { jobs?: Record<string, unknown>[] }).jobs?.[0];
  const s = job?.[side] as
    | { iops?: unknown; clat_ns?: { percentile?: Record<string, unknown> } }
    | undefined;
  const iops = s?.iops, p99 = s?.clat_ns?.percentile?.["99.000000"];
  if (typeof iops !== "number" || typeof p99 !== "number") {
    throw new Error(`fio report without ${side} iops and p99`);
  }
  return { iops, p99Us: p99 / 1000 };
}

/** Runs fio once for `w`; a failure (fio missing, bad exit) is returned, not thrown. */
export async function runFio(w: FioWorkload): Promise<FioSample | RunFailure> {
  const [cmd, ...args] = fioArgs(w);
  let out: Deno.CommandOutput;
  try {
    out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  } catch (e) {
    return { error: `fio: ${(e as Error).message}` };
  }
  const text = new TextDecoder().decode(out.stdout);
  if (out.code !== 0) {
    const err = new TextDecoder().decode(out.stderr).trim().split("\n").pop() ?? "";
    return { error: `fio exited ${out.code}: ${err}` };
  }
  try {
    // fio may print notes before the JSON.
    return parseFioReport(text.slice(Math.max(0, text.indexOf("{"))), w.pattern);
  } catch (e) {
    return { error: (e as Error).message };
  }
}
