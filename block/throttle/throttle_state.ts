/**
 * QEMU's leaky buckets (util/throttle.c ThrottleState): six buckets (bytes
 * and operations; total, read, write), each with an average rate `avg`, a
 * burst rate `max` held for at most `burstLength` seconds, a `level` that
 * leaks at `avg` and a `burstLevel` that leaks at `max`. A request may go
 * when no bucket of its direction is over its size
 * ({@link ThrottleState.computeWaitFor} is 0); it is then counted in each
 * ({@link ThrottleState.account}), so a big request may take a bucket over
 * and the next ones wait until it has leaked.
 *
 * The state is plain numbers in a Float64Array so that it can live in
 * memory every thread maps (a throttle group's, see throttle_group.ts);
 * this class does no locking: its caller holds the group's lock.
 *
 * @module
 */

import { THROTTLE_BUCKETS, type ThrottleConfig, throttleConfigInit } from "./throttle_config.ts";

/** Direction of a request (QEMU's ThrottleDirection). */
export const enum ThrottleDirection {
  Read = 0,
  Write = 1,
}

const NS = 1e9;
const PREVIOUS_LEAK = 0;
const OP_SIZE = 1;
const BUCKET0 = 2;
const AVG = 0, MAX = 1, BURST_LENGTH = 2, LEVEL = 3, BURST_LEVEL = 4;
const BUCKET_SLOTS = 5;

/** Float64 slots a ThrottleState takes. */
export const THROTTLE_STATE_SLOTS = BUCKET0 + THROTTLE_BUCKETS.length * BUCKET_SLOTS;

// Bucket indexes (THROTTLE_BUCKETS order) a direction checks and counts in.
const BPS_TOTAL = 0, BPS_READ = 1, BPS_WRITE = 2, OPS_TOTAL = 3, OPS_READ = 4, OPS_WRITE = 5;
const TO_CHECK = [
  [BPS_TOTAL, OPS_TOTAL, BPS_READ, OPS_READ],
  [BPS_TOTAL, OPS_TOTAL, BPS_WRITE, OPS_WRITE],
] as const;

/**
 * One throttle state over `f` (THROTTLE_STATE_SLOTS float64s from `offset`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ThrottleState } from "./throttle_state.ts";
 * import { throttleConfigInit } from "./throttle_config.ts";
 * const ts = new ThrottleState();
 * const c = throttleConfigInit();
 * c.buckets["iops-total"].avg = 10; // bucket of avg / 10 = 1 operation
 * ts.config(c, 0);
 * assert.equal(ts.computeWaitFor(0, 0), 0);
 * ts.account(0, 4096); // level 1: not over the bucket
 * ts.account(0, 4096); // level 2: over by 1
 * assert.equal(ts.computeWaitFor(0, 0), 100e6); // 1 op at 10/s: 100 ms
 * assert.equal(ts.computeWaitFor(0, 100e6), 0);
 * ```
 */
export class ThrottleState {
  readonly #f: Float64Array;
  readonly #o: number;

  constructor(f: Float64Array = new Float64Array(THROTTLE_STATE_SLOTS), offset = 0) {
    this.#f = f;
    this.#o = offset;
  }

  /** Sets the limits, empties the buckets, leaks from `nowNs` on (throttle_config). */
  config(c: ThrottleConfig, nowNs: number): void {
    const f = this.#f, o = this.#o;
    f[o + PREVIOUS_LEAK] = nowNs;
    f[o + OP_SIZE] = c.iopsSize;
    THROTTLE_BUCKETS.forEach((name, i) => {
      const b = o + BUCKET0 + i * BUCKET_SLOTS;
      f[b + AVG] = c.buckets[name].avg;
      f[b + MAX] = c.buckets[name].max;
      f[b + BURST_LENGTH] = c.buckets[name].burstLength;
      f[b + LEVEL] = 0;
      f[b + BURST_LEVEL] = 0;
    });
  }

  /** The limits in force (throttle_get_config). */
  getConfig(): ThrottleConfig {
    const f = this.#f, o = this.#o;
    const c = throttleConfigInit();
    c.iopsSize = f[o + OP_SIZE];
    THROTTLE_BUCKETS.forEach((name, i) => {
      const b = o + BUCKET0 + i * BUCKET_SLOTS;
      c.buckets[name] = { avg: f[b + AVG], max: f[b + MAX], burstLength: f[b + BURST_LENGTH] };
    });
    return c;
  }

  /** A bucket's level and burst level (for tests and metrics). */
  level(name: typeof THROTTLE_BUCKETS[number]): { level: number; burstLevel: number } {
    const b = this.#o + BUCKET0 + THROTTLE_BUCKETS.indexOf(name) * BUCKET_SLOTS;
    return { level: this.#f[b + LEVEL], burstLevel: this.#f[b + BURST_LEVEL] };
  }

  /** Leaks every bucket for the time since the last leak (throttle_do_leak). */
  doLeak(nowNs: number): void {
    const f = this.#f, o = this.#o;
    const delta = nowNs - f[o + PREVIOUS_LEAK];
    f[o + PREVIOUS_LEAK] = nowNs;
    if (delta <= 0) return;
    for (let i = 0; i < THROTTLE_BUCKETS.length; i++) {
      leakBucket(f, o + BUCKET0 + i * BUCKET_SLOTS, delta);
    }
  }

  /**
   * Leaks to `nowNs`, then the ns a request of direction `dir` must wait
   * (0: it may go now) (throttle_compute_timer's wait). Hot path: no allocation.
   */
  computeWaitFor(dir: ThrottleDirection, nowNs: number): number {
    this.doLeak(nowNs);
    let maxWait = 0;
    for (const i of TO_CHECK[dir]) {
      const w = computeWait(this.#f, this.#o + BUCKET0 + i * BUCKET_SLOTS);
      if (w > maxWait) maxWait = w;
    }
    return maxWait;
  }

  /** Counts a request of `bytes` in its direction's buckets (throttle_account). Hot path: no allocation. */
  account(dir: ThrottleDirection, bytes: number): void {
    const f = this.#f, o = this.#o;
    const opSize = f[o + OP_SIZE];
    const units = opSize > 0 && bytes > opSize ? bytes / opSize : 1;
    // BPS_READ + 1 = BPS_WRITE, OPS_READ + 1 = OPS_WRITE.
    fill(f, o + BUCKET0 + BPS_TOTAL * BUCKET_SLOTS, bytes);
    fill(f, o + BUCKET0 + (BPS_READ + dir) * BUCKET_SLOTS, bytes);
    fill(f, o + BUCKET0 + OPS_TOTAL * BUCKET_SLOTS, units);
    fill(f, o + BUCKET0 + (OPS_READ + dir) * BUCKET_SLOTS, units);
  }
}

function fill(f: Float64Array, b: number, n: number): void {
  f[b + LEVEL] += n;
  if (f[b + BURST_LENGTH] > 1) f[b + BURST_LEVEL] += n;
}

/** throttle_leak_bucket: `level` leaks at avg, `burstLevel` (bursts over 1 s) at max. */
function leakBucket(f: Float64Array, b: number, deltaNs: number): void {
  f[b + LEVEL] = Math.max(f[b + LEVEL] - f[b + AVG] * deltaNs / NS, 0);
  if (f[b + BURST_LENGTH] > 1) {
    f[b + BURST_LEVEL] = Math.max(f[b + BURST_LEVEL] - f[b + MAX] * deltaNs / NS, 0);
  }
}

/**
 * throttle_compute_wait: the bucket holds `max * burstLength` (or avg / 10
 * without a burst rate) before a request waits for it to leak at avg; with
 * bursts longer than a second the burst bucket (max / 10) also leaks at max,
 * so a burst runs at most at `max`. Whole nanoseconds, as QEMU's int64.
 */
function computeWait(f: Float64Array, b: number): number {
  const avg = f[b + AVG], max = f[b + MAX], burstLength = f[b + BURST_LENGTH];
  if (!avg) return 0;
  const bucketSize = max ? max * burstLength : avg / 10;
  const burstBucketSize = max ? max / 10 : 0;
  let extra = f[b + LEVEL] - bucketSize;
  if (extra > 0) return Math.trunc(extra * NS / avg);
  if (burstLength > 1) {
    extra = f[b + BURST_LEVEL] - burstBucketSize;
    if (extra > 0) return Math.trunc(extra * NS / max);
  }
  return 0;
}
