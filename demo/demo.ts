/**
 * `deno task demo`: the project in one command. Creates a raw image in a
 * temporary directory, starts the vhost-user-blk host in this process (its
 * IOThreads are Workers, so the dataplane runs beside the client), connects
 * the built-in vhost-user-blk client as the "guest", and runs a verify pass
 * and four short fio-style workloads, then prints a report with latency
 * percentiles and the host's own counters. Everything it created is removed
 * at the end, also on an error or Ctrl-C.
 *
 * The image lives on a filesystem that supports O_DIRECT when one is found
 * (cache=none aio=io_uring, as a production QEMU setup would use) and is
 * prefilled there; otherwise it stays sparse and the demo falls back to
 * cache=writeback aio=threads, and says so.
 *
 * Exit status: 0 when verify matched and no request failed, 1 otherwise (or on
 * a runtime error), 2 on a usage error, 130 after Ctrl-C.
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  LatencyHistogram,
  type Pattern,
  runWorkload,
  verify,
  type VerifyResult,
  VhostUserBlkClient,
} from "../client/mod.ts";
import {
  close,
  fdatasync,
  fsFilesystemType,
  mmapAnonymous,
  O_DIRECT,
  O_RDWR,
  open,
  pwriteAt,
  TMPFS_MAGIC,
} from "../sys/mod.ts";
import {
  formatStats,
  type HostOptions,
  type HostStats,
  parseHostArgs,
  parseSize,
  taskArgs,
  UsageError,
  VhostUserBlkHost,
} from "../dataplane/mod.ts";

/** The `--help` text. */
export const DEMO_USAGE = `Usage: deno task demo [-- options]

Start the vhost-user-blk host on a temporary image, drive it with the built-in
client (verify, then 4 KiB random read QD1/QD32, 4 KiB random write QD32,
64 KiB sequential read QD8) and print a report. Needs no arguments.

  --duration-ms MS     length of each workload phase                [2500]
  --image-size SIZE    size of the temporary image (e.g. 256M, 1G)  [256M]
  -h, --help           this text
`;

/** What the demo was asked to do. */
export interface DemoOptions {
  /** Length of each workload phase (ms). */
  durationMs: number;
  /** Bytes of the temporary image. */
  imageSize: number;
  /** Print {@link DEMO_USAGE} and stop. */
  help: boolean;
}

/**
 * Parses the demo's command line; throws {@link UsageError} on a bad flag.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseDemoArgs } from "./demo.ts";
 * const o = parseDemoArgs(["--duration-ms", "300", "--image-size", "64M"]);
 * assert.equal(o.durationMs, 300);
 * assert.equal(o.imageSize, 64 << 20);
 * ```
 */
export function parseDemoArgs(args: string[]): DemoOptions {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      strict: true,
      allowPositionals: false,
      options: {
        "duration-ms": { type: "string" },
        "image-size": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    }));
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const d = values["duration-ms"] ?? "2500";
  if (!/^\d+$/.test(d) || Number(d) < 1 || Number(d) > 3_600_000) {
    throw new UsageError(`--duration-ms takes a whole number of ms (1..3600000), not '${d}'`);
  }
  const imageSize = parseSize(values["image-size"] ?? "256M");
  if (imageSize < 1 << 20 || imageSize % 4096 !== 0) {
    throw new UsageError("--image-size must be at least 1M and a multiple of 4K");
  }
  return { durationMs: Number(d), imageSize, help: values.help ?? false };
}

/** One workload of the demo; `queueDepth` is the total over the queues it uses. */
interface Phase {
  name: string;
  pattern: Pattern;
  blockSize: number;
  queueDepth: number;
}

const PHASES: Phase[] = [
  { name: "4k randread QD1", pattern: "randread", blockSize: 4096, queueDepth: 1 },
  { name: "4k randread QD32", pattern: "randread", blockSize: 4096, queueDepth: 32 },
  { name: "4k randwrite QD32", pattern: "randwrite", blockSize: 4096, queueDepth: 32 },
  { name: "64k read QD8", pattern: "read", blockSize: 65536, queueDepth: 8 },
];

/** A phase's totals over its slices. */
interface PhaseResult {
  phase: Phase;
  ops: number;
  errors: number;
  seconds: number;
  hist: LatencyHistogram;
}

/** Slice length: runWorkload blocks the thread, so phases run in slices to redraw the bar. */
const SLICE_MS = 250;
/** Bytes the verify pass writes and reads back. */
const VERIFY_SPAN = 16 << 20;
const VERIFY_BLOCK = 64 << 10;

/** Thrown between slices after SIGINT/SIGTERM. */
class Interrupted extends Error {
  constructor(signal: string) {
    super(`interrupted by ${signal}`);
    this.name = "Interrupted";
  }
}

const encoder = new TextEncoder();
const stderrIsTty = Deno.stderr.isTerminal();
let barShown = false;

function writeErr(text: string): void {
  Deno.stderr.writeSync(encoder.encode(text));
}

/** Erases the progress bar (so a log line does not land in the middle of it). */
function clearBar(): void {
  if (barShown) writeErr("\r\x1b[K");
  barShown = false;
}

function drawBar(label: string, done: number, total: number, iops: number): void {
  if (!stderrIsTty) return;
  const width = 30;
  const frac = Math.min(1, done / total);
  const fill = Math.round(frac * width);
  const bar = "#".repeat(fill) + ".".repeat(width - fill);
  writeErr(
    `\r\x1b[K  ${label.padEnd(18)} [${bar}] ${(frac * 100).toFixed(0).padStart(3)}%  ` +
      `${fmtNum(iops, 0)} IOPS`,
  );
  barShown = true;
}

function hostLog(line: string): void {
  clearBar();
  const t = new Date().toISOString().slice(11, 23);
  writeErr(`${t} host: ${line}\n`);
}

function fmtNum(n: number, digits: number): string {
  return n.toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

/** Lets the event loop run: the host's control plane, signal handlers. */
function yieldToLoop(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/** A temporary directory in `base` holding a sparse image of `size` bytes. */
function createImage(base: string, size: number): { dir: string; image: string } {
  const dir = Deno.makeTempDirSync({ dir: base, prefix: "dataplane-demo-" });
  const image = `${dir}/disk.raw`;
  try {
    Deno.writeFileSync(image, new Uint8Array());
    Deno.truncateSync(image, size);
  } catch (e) {
    Deno.removeSync(dir, { recursive: true });
    throw e;
  }
  return { dir, image };
}

/**
 * A fresh directory for the image and socket. Prefers a disk-backed
 * filesystem where O_DIRECT works, probed by opening the image with O_DIRECT
 * as QEMU's raw_open would, and prefills the image there; tmpfs is skipped
 * (memory, not a disk, and no O_DIRECT before Linux 6.6) unless nothing else
 * is writable.
 */
function makeWorkDir(imageSize: number): { dir: string; image: string; direct: boolean } {
  const repoCache = new URL("../.cache/tmp", import.meta.url).pathname;
  const bases = [Deno.env.get("TMPDIR") ?? "/tmp", "/var/tmp", repoCache];
  const usable: string[] = [];
  for (const base of bases) {
    let work: { dir: string; image: string };
    try {
      Deno.mkdirSync(base, { recursive: true });
      usable.push(base);
      if (fsFilesystemType(base) === TMPFS_MAGIC) continue;
      work = createImage(base, imageSize);
    } catch {
      continue;
    }
    let fd: number;
    try {
      fd = open(work.image, O_RDWR | O_DIRECT);
    } catch {
      Deno.removeSync(work.dir, { recursive: true });
      continue;
    }
    try {
      prefill(fd, imageSize);
    } catch (e) {
      Deno.removeSync(work.dir, { recursive: true });
      throw e;
    } finally {
      close(fd);
    }
    return { ...work, direct: true };
  }
  for (const base of usable) {
    try {
      return { ...createImage(base, imageSize), direct: false };
    } catch {
      continue;
    }
  }
  throw new Error(`cannot create a temporary image in ${bases.join(", ")}`);
}

/**
 * Writes every block of the image once (O_DIRECT, 4 MiB at a time: a fraction
 * of a second). Reads then measure the disk rather than holes, and random
 * writes overwrite blocks instead of allocating them one by one: on ext4
 * mounted with `discard`, unlinking a file with tens of thousands of small
 * extents takes many seconds.
 */
function prefill(fd: number, size: number): void {
  const chunk = 4 << 20;
  const buf = mmapAnonymous(chunk); // page-aligned, as O_DIRECT needs
  try {
    for (let off = 0; off < size; off += chunk) {
      const len = Math.min(chunk, size - off);
      if (pwriteAt(fd, buf.addr, len, off) !== len) throw new Error(`short write at ${off}`);
    }
    fdatasync(fd);
  } finally {
    buf.unmap();
  }
}

/** Starts the host; falls back to aio=threads when io_uring is unavailable (old kernel, seccomp). */
async function startHost(
  image: string,
  socket: string,
  direct: boolean,
): Promise<VhostUserBlkHost> {
  // The client's submit/complete loop needs a core of its own: with two cores
  // one IOThread serves both queues; with more, each queue gets its own.
  const iothreads = navigator.hardwareConcurrency >= 4 ? 2 : 1;
  const args = (cache: string, aio: string) =>
    parseHostArgs([
      ...["--image", image, "--socket", socket, "--cache", cache, "--aio", aio],
      ...["--queues", "2", "--iothreads", String(iothreads)],
    ]);
  if (!direct) {
    console.log(
      "note: no filesystem with O_DIRECT found for the image (tmpfs?): " +
        "using cache=writeback aio=threads, so reads may come from the page cache",
    );
    return await VhostUserBlkHost.start(args("writeback", "threads"), hostLog);
  }
  try {
    return await VhostUserBlkHost.start(args("none", "io_uring"), hostLog);
  } catch (e) {
    console.log(`note: aio=io_uring failed (${(e as Error).message}): using aio=threads`);
    return await VhostUserBlkHost.start(args("none", "threads"), hostLog);
  }
}

function describe(o: HostOptions, host: VhostUserBlkHost, dir: string, direct: boolean): string {
  const mib = (host.image.length / 2 ** 20).toFixed(0);
  return `dataplane demo: ${mib} MiB ${direct ? "prefilled" : "sparse"} raw image in ${dir}\n` +
    `  host: cache=${o.block.cache} aio=${o.block.aio}, ${o.queues} queues over ` +
    `${o.iothreads} IOThread(s), queue size ${o.queueSize}; client in this thread`;
}

/** Runs one phase in slices, redrawing the bar between them; returns its totals. */
async function runPhase(
  client: VhostUserBlkClient,
  phase: Phase,
  durationMs: number,
  interrupted: () => string | null,
): Promise<PhaseResult> {
  const numQueues = Math.min(client.queues.length, phase.queueDepth);
  const res: PhaseResult = { phase, ops: 0, errors: 0, seconds: 0, hist: new LatencyHistogram() };
  let elapsedMs = 0;
  let slice = 0;
  drawBar(phase.name, 0, durationMs, 0);
  while (durationMs - elapsedMs >= 1) {
    const r = runWorkload(client, {
      pattern: phase.pattern,
      blockSize: phase.blockSize,
      queueDepth: phase.queueDepth / numQueues,
      numQueues,
      durationMs: Math.min(SLICE_MS, durationMs - elapsedMs),
      seed: ++slice, // a new seed per slice, or every slice would hit the same blocks
      histogram: res.hist,
    });
    res.ops += r.ops;
    res.errors += r.errors;
    res.seconds += r.seconds;
    elapsedMs += r.seconds * 1000;
    drawBar(phase.name, elapsedMs, durationMs, res.ops / res.seconds);
    await yieldToLoop();
    const sig = interrupted();
    if (sig) throw new Interrupted(sig);
  }
  clearBar();
  return res;
}

const COLUMNS = ["phase", "IOPS", "MiB/s", "p50 us", "p99 us", "p99.9 us", "errors"];

function reportRow(r: PhaseResult): string[] {
  const iops = r.seconds > 0 ? r.ops / r.seconds : 0;
  const mibps = (iops * r.phase.blockSize) / 2 ** 20;
  const us = (p: number) => fmtNum(r.hist.percentile(p) / 1000, 1);
  return [
    r.phase.name,
    fmtNum(iops, 0),
    fmtNum(mibps, 1),
    us(50),
    us(99),
    us(99.9),
    String(r.errors),
  ];
}

function formatTable(rows: string[][]): string {
  const all = [COLUMNS, ...rows];
  const widths = COLUMNS.map((_, i) => Math.max(...all.map((r) => r[i].length)));
  const line = (r: string[]) =>
    r.map((c, i) => i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i])).join("  ");
  return all.map(line).join("\n");
}

function formatVerify(v: VerifyResult): string {
  const ok = v.mismatches === 0 && v.errors === 0;
  return `verify: wrote ${VERIFY_SPAN >> 20} MiB in ${VERIFY_BLOCK >> 10} KiB blocks over ` +
    `both queues, flushed, read back: ${v.blocks} blocks, ${v.mismatches} mismatches, ` +
    `${v.errors} errors: ${ok ? "OK" : "FAILED"}`;
}

/** Runs the demo; returns the exit status. */
export async function main(args: string[]): Promise<number> {
  let opts: DemoOptions;
  try {
    opts = parseDemoArgs(args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`dataplane demo: ${e.message}\nTry --help.`);
    return 2;
  }
  if (opts.help) {
    console.log(DEMO_USAGE);
    return 0;
  }

  let signal: string | null = null;
  const work = makeWorkDir(opts.imageSize);
  const removeWorkDir = () => {
    try {
      Deno.removeSync(work.dir, { recursive: true });
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
  };
  // The first signal stops the demo between two slices; a second one, when
  // something hangs, removes the directory and exits at once.
  const onSignal = (name: string) => () => {
    if (signal === null) {
      signal = name;
      return;
    }
    clearBar();
    removeWorkDir();
    console.error(`dataplane demo: ${name} again: exiting without a clean stop`);
    Deno.exit(130);
  };
  const sigint = onSignal("SIGINT"), sigterm = onSignal("SIGTERM");
  Deno.addSignalListener("SIGINT", sigint);
  Deno.addSignalListener("SIGTERM", sigterm);

  let host: VhostUserBlkHost | null = null;
  let client: VhostUserBlkClient | null = null;
  let status = 0;
  try {
    host = await startHost(work.image, `${work.dir}/blk.sock`, work.direct);
    console.log(describe(host.options, host, work.dir, work.direct));
    client = await VhostUserBlkClient.connect(host.options.socket, {
      numQueues: host.options.queues,
      maxBlockSize: Math.max(VERIFY_BLOCK, ...PHASES.map((p) => p.blockSize)),
    });

    const v = await verify(client, {
      span: Math.min(VERIFY_SPAN, opts.imageSize),
      blockSize: VERIFY_BLOCK,
      queueDepth: 8,
      seed: Date.now() & 0xffff, // not what a previous run left, were the image reused
    });
    console.log(formatVerify(v));
    if (v.mismatches !== 0 || v.errors !== 0) status = 1;
    if (signal) throw new Interrupted(signal);

    const results: PhaseResult[] = [];
    for (const phase of PHASES) {
      const r = await runPhase(client, phase, opts.durationMs, () => signal);
      results.push(r);
      const row = reportRow(r);
      console.log(
        `  ${row[0]}: ${row[1]} IOPS, p99 ${row[4]} us, ${r.errors} errors ` +
          `(${r.ops} ops in ${r.seconds.toFixed(2)} s)`,
      );
      if (r.errors !== 0) status = 1;
    }

    await client.close();
    client = null;
    const stats: HostStats = await host.stop();
    host = null;
    console.log(`\n${formatTable(results.map(reportRow))}\n`);
    console.log(formatVerify(v));
    console.log(`host stats:\n${formatStats(stats)}`);
    if (stats.threads.some((t) => t.queues.some((q) => q.errors !== 0 || q.broken))) status = 1;
  } catch (e) {
    clearBar();
    if (e instanceof Interrupted) {
      console.error(`dataplane demo: ${e.message}: cleaning up`);
      status = 130;
    } else {
      console.error(`dataplane demo: ${(e as Error).stack ?? e}`);
      status = 1;
    }
  } finally {
    clearBar();
    await client?.close().catch(() => {});
    await host?.stop().catch((e) => console.error(`dataplane demo: host stop: ${e}`));
    removeWorkDir();
    Deno.removeSignalListener("SIGINT", sigint);
    Deno.removeSignalListener("SIGTERM", sigterm);
  }
  console.log(`removed ${work.dir}`);
  console.log(
    status === 0
      ? "demo: PASS"
      : status === 130
      ? "demo: interrupted"
      : `demo: FAIL (exit ${status})`,
  );
  return status;
}

if (import.meta.main) Deno.exit(await main(taskArgs(Deno.args)));
