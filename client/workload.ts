/**
 * Block workloads for the built-in client (an fio in miniature): random or
 * sequential reads/writes/mixes at a block size and queue depth over N
 * queues, for a duration or an op count, reporting IOPS, bandwidth and
 * latency percentiles; and a verify mode (pattern write, flush, read back,
 * compare). The submit/complete loop allocates nothing.
 *
 * @module
 */

import { clockNs } from "../sys/mod.ts";
import type { BlkQueue, VhostUserBlkClient, WaitMode } from "./blk_client.ts";
import { VIRTIO_BLK_S_OK } from "./virtio_blk_defs.ts";

/** Sub-buckets per power of two in {@link LatencyHistogram} (relative error < 1/64). */
const SUB = 64;

/**
 * Log-linear latency histogram in nanoseconds (HDR-style): fixed memory,
 * recording is allocation-free.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { LatencyHistogram } from "./workload.ts";
 * const h = new LatencyHistogram();
 * for (let i = 1; i <= 100; i++) h.record(i * 1000);
 * const p50 = h.percentile(50);
 * assert(p50 > 48_000);
 * assert(p50 < 52_000);
 * ```
 */
export class LatencyHistogram {
  readonly #counts = new Float64Array(27 * SUB);
  /** Number of samples. */
  count = 0;
  /** Largest sample (ns). */
  max = 0;
  /** Sum of samples (ns). */
  sum = 0;

  /** Records one latency in ns. Hot path: no allocation. */
  record(ns: number): void {
    const v = ns < 0 ? 0 : ns > 0xffffffff ? 0xffffffff : Math.floor(ns);
    let idx: number;
    if (v < SUB) {
      idx = v;
    } else {
      const shift = 31 - Math.clz32(v) - 6;
      idx = (shift + 1) * SUB + ((v >>> shift) - SUB);
    }
    this.#counts[idx]++;
    this.count++;
    this.sum += ns;
    if (ns > this.max) this.max = ns;
  }

  /** The latency (ns, bucket midpoint) below which `p` percent of samples fall. */
  percentile(p: number): number {
    if (this.count === 0) return 0;
    const target = Math.ceil((p / 100) * this.count);
    let seen = 0;
    for (let i = 0; i < this.#counts.length; i++) {
      seen += this.#counts[i];
      if (seen >= target) {
        if (i < SUB) return i;
        const shift = Math.floor(i / SUB) - 1;
        const lo = ((i % SUB) + SUB) * 2 ** shift;
        return lo + 2 ** shift / 2;
      }
    }
    return this.max;
  }
}

/** Access pattern of a workload. */
export type Pattern = "randread" | "randwrite" | "read" | "write" | "randrw" | "rw";

/** Parameters of {@link runWorkload}. */
export interface WorkloadOptions {
  /** Access pattern. */
  pattern: Pattern;
  /** Bytes per request (a multiple of 512). */
  blockSize: number;
  /** Requests in flight per queue (<= the client's slots). */
  queueDepth: number;
  /** Queues to use (default: all of the client's). */
  numQueues?: number;
  /** Stop after this many ms ... */
  durationMs?: number;
  /** ... or after this many completed requests. */
  ops?: number;
  /** Percentage of reads in mixed patterns (default 70). */
  readPercent?: number;
  /** Bytes of the device to use from offset 0 (default: all). */
  span?: number;
  /** Completion waiting (default "block"). */
  wait?: "poll" | "block";
  /** PRNG seed (default 1). */
  seed?: number;
  /**
   * Record latencies into this histogram instead of a fresh one, to merge
   * several runs (the result's percentiles then cover everything it holds).
   */
  histogram?: LatencyHistogram;
}

/** What {@link runWorkload} measured. */
export interface WorkloadResult {
  /** Completed requests. */
  ops: number;
  /** Requests that completed with a status other than OK. */
  errors: number;
  /** Wall time (s). */
  seconds: number;
  /** Requests per second. */
  iops: number;
  /** MiB per second. */
  mibps: number;
  /** Latency percentiles and mean in microseconds. */
  latUs: { p50: number; p99: number; p999: number; mean: number; max: number };
  /** CPU time of this process during the run (ms of user and system time). */
  cpuMs: { user: number; system: number };
  /** Kicks (eventfd writes) and interrupts (call eventfd reads) per request. */
  kicksPerOp: number;
  /** Interrupts consumed per request. */
  interruptsPerOp: number;
}

/** xorshift32: a fast, allocation-free PRNG for offsets. */
function xorshift(s: number): number {
  s ^= s << 13;
  s ^= s >>> 17;
  s ^= s << 5;
  return s >>> 0;
}

/**
 * Runs a workload on `client` and measures it. Data buffers are left as they
 * are (writes send whatever the slot holds).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { runWorkload } from "./workload.ts";
 * // Needs a connected client; see tests/client/client_qsd_test.ts.
 * assert.equal(typeof runWorkload, "function");
 * ```
 */
export function runWorkload(client: VhostUserBlkClient, o: WorkloadOptions): WorkloadResult {
  const qs: BlkQueue[] = client.queues.slice(0, o.numQueues ?? client.queues.length);
  const bs = o.blockSize;
  const depth = o.queueDepth;
  if (bs % 512 !== 0 || bs <= 0) throw new RangeError("blockSize must be a multiple of 512");
  for (const q of qs) {
    if (depth > q.slots) throw new RangeError(`queueDepth ${depth} > ${q.slots} slots`);
  }
  const span = Math.min(o.span ?? client.config.capacity * 512, client.config.capacity * 512);
  const blocks = Math.floor(span / bs);
  if (blocks < 1) throw new RangeError("device smaller than one block");
  const maxOps = o.ops ?? Infinity;
  const endNs = o.durationMs !== undefined ? clockNs() + o.durationMs * 1e6 : Infinity;
  if (maxOps === Infinity && endNs === Infinity) throw new RangeError("give durationMs or ops");
  const random = o.pattern.startsWith("rand");
  const readPct = o.pattern === "randread" || o.pattern === "read"
    ? 100
    : o.pattern === "randwrite" || o.pattern === "write"
    ? 0
    : o.readPercent ?? 70;
  const waitMode: WaitMode = o.wait ?? "block";

  const hist = o.histogram ?? new LatencyHistogram();
  const start = new Float64Array(qs.length * depth);
  let rng = (o.seed ?? 1) >>> 0 || 1;
  let seqBlock = 0;
  let submitted = 0;
  let completed = 0;
  let errors = 0;
  let stopping = false;

  const submitOne = (q: BlkQueue, qi: number, slot: number): void => {
    let blk: number;
    if (random) {
      rng = xorshift(rng);
      blk = rng % blocks;
    } else {
      blk = seqBlock;
      seqBlock = seqBlock + 1 === blocks ? 0 : seqBlock + 1;
    }
    rng = xorshift(rng);
    const isRead = readPct === 100 || (readPct > 0 && rng % 100 < readPct);
    start[qi * depth + slot] = clockNs();
    if (isRead) q.read(slot, blk * bs, bs);
    else q.write(slot, blk * bs, bs);
    submitted++;
  };

  const kicks0 = qs.reduce((a, q) => a + q.kicks, 0);
  const irq0 = client.interrupts;
  const callbacks = qs.map((q, qi) => (slot: number, status: number) => {
    const now = clockNs();
    hist.record(now - start[qi * depth + slot]);
    completed++;
    if (status !== VIRTIO_BLK_S_OK) errors++;
    if (!stopping && (submitted >= maxOps || now >= endNs)) stopping = true;
    if (!stopping) submitOne(q, qi, slot);
  });
  const saved = qs.map((q) => q.onComplete);
  qs.forEach((q, qi) => q.onComplete = callbacks[qi]);

  const cpu0 = cpuTimes();
  const t0 = clockNs();
  try {
    if (waitMode === "poll") client.disableInterrupts();
    for (let qi = 0; qi < qs.length; qi++) {
      for (let s = 0; s < depth && submitted < maxOps; s++) submitOne(qs[qi], qi, s);
      qs[qi].notify();
    }
    while (completed < submitted) {
      let n = 0;
      for (let qi = 0; qi < qs.length; qi++) n += qs[qi].reap();
      for (let qi = 0; qi < qs.length; qi++) qs[qi].notify();
      if (n === 0 && completed < submitted && !client.wait(waitMode)) {
        const rings = qs.map((q) => `queue ${q.index}: ${q.ring.describe()}`).join("; ");
        throw new Error(
          `workload stalled: ${submitted - completed} requests never completed (${rings})`,
        );
      }
    }
  } finally {
    qs.forEach((q, qi) => q.onComplete = saved[qi]);
  }
  const seconds = (clockNs() - t0) / 1e9;
  const cpu1 = cpuTimes();
  const kicks = qs.reduce((a, q) => a + q.kicks, 0) - kicks0;
  return {
    ops: completed,
    errors,
    seconds,
    iops: completed / seconds,
    mibps: (completed * bs) / seconds / (1 << 20),
    latUs: {
      p50: hist.percentile(50) / 1000,
      p99: hist.percentile(99) / 1000,
      p999: hist.percentile(99.9) / 1000,
      mean: hist.count ? hist.sum / hist.count / 1000 : 0,
      max: hist.max / 1000,
    },
    cpuMs: { user: cpu1.user - cpu0.user, system: cpu1.system - cpu0.system },
    kicksPerOp: completed ? kicks / completed : 0,
    interruptsPerOp: completed ? (client.interrupts - irq0) / completed : 0,
  };
}

/** user and system CPU time of this process in ms (/proc/self/stat, clock ticks of 10 ms). */
function cpuTimes(): { user: number; system: number } {
  const f = Deno.readTextFileSync("/proc/self/stat");
  const rest = f.slice(f.lastIndexOf(")") + 2).split(" ");
  // Fields after the command: state(3) ... utime(14) stime(15), 1-based in proc(5).
  return { user: Number(rest[11]) * 10, system: Number(rest[12]) * 10 };
}

/**
 * The verify pattern: the 32-bit word at byte `offset` (a multiple of 4) of
 * the device for `seed`. Tests check image files with it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { patternWord } from "./workload.ts";
 * assert.notEqual(patternWord(0, 1), patternWord(4, 1));
 * ```
 */
export function patternWord(offset: number, seed: number): number {
  let x = (Math.floor(offset / 4) ^ Math.imul(seed, 0x9e3779b1)) >>> 0;
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

function fillPattern(buf: Uint8Array, offset: number, len: number, seed: number): void {
  const w = new Uint32Array(buf.buffer, buf.byteOffset, len / 4);
  for (let i = 0; i < w.length; i++) w[i] = patternWord(offset + 4 * i, seed);
}

/** Fills `buf` with the complement of the pattern: every word differs from what a read must bring. */
function poisonPattern(buf: Uint8Array, offset: number, len: number, seed: number): void {
  const w = new Uint32Array(buf.buffer, buf.byteOffset, len / 4);
  for (let i = 0; i < w.length; i++) w[i] = ~patternWord(offset + 4 * i, seed);
}

function checkPattern(buf: Uint8Array, offset: number, len: number, seed: number): boolean {
  const w = new Uint32Array(buf.buffer, buf.byteOffset, len / 4);
  for (let i = 0; i < w.length; i++) if (w[i] !== patternWord(offset + 4 * i, seed)) return false;
  return true;
}

/** What {@link verify} found. */
export interface VerifyResult {
  /** Blocks written and read back. */
  blocks: number;
  /** Blocks whose read-back differed from what was written. */
  mismatches: number;
  /** Requests that failed. */
  errors: number;
}

/**
 * Writes a pattern over `[offset, offset + span)` in `blockSize` requests
 * spread over every queue with up to `queueDepth` in flight each, flushes,
 * reads everything back (through a different queue than wrote it, into
 * buffers poisoned with the pattern's complement, so a read that transfers
 * nothing counts as a mismatch) and compares. Awaits between waits so a back-end in this thread can run.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { verify } from "./workload.ts";
 * // Needs a connected client; see tests/client/client_qsd_test.ts.
 * assert.equal(typeof verify, "function");
 * ```
 */
export async function verify(
  client: VhostUserBlkClient,
  o: { offset?: number; span: number; blockSize: number; queueDepth: number; seed: number },
): Promise<VerifyResult> {
  const base = o.offset ?? 0;
  const nblocks = Math.floor(o.span / o.blockSize);
  const res: VerifyResult = { blocks: nblocks, mismatches: 0, errors: 0 };
  const qs = client.queues;
  const pass = async (write: boolean) => {
    let next = 0;
    let inflight = 0;
    const blockOf = qs.map(() => new Int32Array(o.queueDepth).fill(-1));
    const issue = (q: BlkQueue, qi: number, slot: number) => {
      if (next >= nblocks) return;
      const b = next++;
      blockOf[qi][slot] = b;
      const off = base + b * o.blockSize;
      if (write) {
        fillPattern(q.data(slot), off, o.blockSize, o.seed);
        q.write(slot, off, o.blockSize);
      } else {
        // Poison first: a read the device answers OK without transferring
        // anything must not find the pattern a write left in this slot.
        poisonPattern(q.data(slot), off, o.blockSize, o.seed);
        q.read(slot, off, o.blockSize);
      }
      inflight++;
    };
    const saved = qs.map((q) => q.onComplete);
    // The read pass walks the queues in another order, so blocks are mostly
    // read back through a different queue than wrote them.
    const order = write ? qs : [...qs.slice(1), qs[0]];
    order.forEach((q, qi) =>
      q.onComplete = (slot, status) => {
        inflight--;
        const b = blockOf[qi][slot];
        if (status !== VIRTIO_BLK_S_OK) res.errors++;
        else if (
          !write && !checkPattern(q.data(slot), base + b * o.blockSize, o.blockSize, o.seed)
        ) {
          res.mismatches++;
        }
        issue(q, qi, slot);
      }
    );
    try {
      order.forEach((q, qi) => {
        for (let s = 0; s < o.queueDepth; s++) issue(q, qi, s);
        q.notify();
      });
      while (inflight > 0) {
        if (!await client.waitAsync()) throw new Error("verify: requests never completed");
        for (const q of order) q.reap();
        for (const q of order) q.notify();
      }
    } finally {
      qs.forEach((q, i) => q.onComplete = saved[i]);
    }
  };
  await pass(true);
  const st = await client.execute(0, (q) => q.flush(0));
  if (st !== VIRTIO_BLK_S_OK) res.errors++;
  await pass(false);
  return res;
}
