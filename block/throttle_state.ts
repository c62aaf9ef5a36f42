/**
 * I/O throttling as QEMU's util/throttle.c: six leaky buckets (bytes and
 * operations, total / read / write), each with an average rate, an optional
 * burst rate (`max`) held for at most `burstLength` seconds, and the levels
 * they leak from. A request may go when no bucket of its direction is over
 * its size; it is then counted in each (a big request may take a bucket over,
 * and the next ones wait until it has leaked).
 *
 * The state of one throttle group lives in memory every thread of the
 * process sees (the daemon maps it once and hands its address to each
 * IOThread whose nodes are in the group), behind a spin lock taken for a few
 * dozen instructions, so members in different IOThreads share the limits.
 * The limits may be changed at any time from any thread (QMP qom-set); as in
 * QEMU's throttle_config, that empties the buckets.
 *
 * @module
 */

/** The buckets, in QEMU's order (BucketType in include/qemu/throttle.h). */
export const THROTTLE_BUCKETS = [
  "bps-total",
  "bps-read",
  "bps-write",
  "iops-total",
  "iops-read",
  "iops-write",
] as const;

/** One bucket's configuration: units per second (0: no limit). */
export interface ThrottleBucketConfig {
  /** Average rate. */
  avg: number;
  /** Burst rate (0: no burst beyond avg / 10). */
  max: number;
  /** How long a burst at `max` may last, seconds (>= 1). */
  burstLength: number;
}

/** A whole group's configuration. */
export interface ThrottleConfig {
  buckets: Record<typeof THROTTLE_BUCKETS[number], ThrottleBucketConfig>;
  /** Bytes that count as one operation for the iops buckets (0: every request is one). */
  iopsSize: number;
}

const SLOT_PREV_LEAK = 1;
const SLOT_IOPS_SIZE = 2;
const SLOT_BUCKETS = 3;
const BUCKET_SLOTS = 5; // avg, max, burstLength, level, burstLevel

/** Bytes of shared memory one group's state takes. */
export const THROTTLE_STATE_BYTES = (SLOT_BUCKETS + THROTTLE_BUCKETS.length * BUCKET_SLOTS) * 8;

const NS = 1e9;
const READ = [0, 1, 3, 4];
const WRITE = [0, 2, 3, 5];

/**
 * An unlimited configuration (every bucket 0).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { noThrottle } from "./throttle_state.ts";
 * assert.equal(noThrottle().buckets["iops-total"].avg, 0);
 * ```
 */
export function noThrottle(): ThrottleConfig {
  const b = {} as ThrottleConfig["buckets"];
  for (const name of THROTTLE_BUCKETS) b[name] = { avg: 0, max: 0, burstLength: 1 };
  return { buckets: b, iopsSize: 0 };
}

/**
 * Checks a configuration as QEMU's throttle_is_valid; returns the error
 * message or null.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { noThrottle, throttleConfigError } from "./throttle_state.ts";
 * const c = noThrottle();
 * c.buckets["iops-total"] = { avg: 100, max: 50, burstLength: 1 };
 * assert.match(throttleConfigError(c)!, /cannot be lower/);
 * ```
 */
export function throttleConfigError(c: ThrottleConfig): string | null {
  const b = c.buckets;
  for (
    const [t, r, w] of [["bps-total", "bps-read", "bps-write"], [
      "iops-total",
      "iops-read",
      "iops-write",
    ]] as const
  ) {
    if (b[t].avg && (b[r].avg || b[w].avg)) {
      return `${t} cannot be used at the same time as ${r} and ${w}`;
    }
    if (b[t].max && (b[r].max || b[w].max)) {
      return `${t}-max cannot be used at the same time as ${r}-max and ${w}-max`;
    }
  }
  for (const name of THROTTLE_BUCKETS) {
    const k = b[name];
    for (const v of [k.avg, k.max]) {
      if (!(Number.isFinite(v) && v >= 0 && v <= 1e15)) {
        return `bps/iops/max values must be within [0, 1000000000000000]`;
      }
    }
    if (!(Number.isInteger(k.burstLength) && k.burstLength >= 1 && k.burstLength <= 86400)) {
      return `${name}-max-length must be between 1 and 86400`;
    }
    if (k.burstLength > 1 && !k.max) return `${name}-max-length requires ${name}-max to be set`;
    if (k.max && !k.avg) return `${name}-max requires ${name} to be set`;
    if (k.max && k.max < k.avg) return `${name}-max cannot be lower than ${name}`;
  }
  if (!(Number.isInteger(c.iopsSize) && c.iopsSize >= 0)) return "iops-size must be >= 0";
  return null;
}

/**
 * A throttle group's state over `buffer` (at least {@link THROTTLE_STATE_BYTES},
 * zero-filled before first use; an ArrayBuffer over memory every thread maps).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { noThrottle, ThrottleState, THROTTLE_STATE_BYTES } from "./throttle_state.ts";
 * const s = new ThrottleState(new ArrayBuffer(THROTTLE_STATE_BYTES));
 * const c = noThrottle();
 * c.buckets["iops-total"].avg = 10; // 10 requests/s: a bucket of avg / 10 = 1
 * s.configure(c, 0);
 * assert.equal(s.acquire(0, false, 4096), 0); // level 0 -> 1
 * assert.equal(s.acquire(0, false, 4096), 0); // level 1 is not over the bucket: -> 2
 * assert.equal(s.acquire(0, false, 4096), 100e6); // over by 1: 100 ms
 * assert.equal(s.acquire(100e6, false, 4096), 0); // 100 ms later it leaked
 * ```
 */
export class ThrottleState {
  readonly #f: Float64Array;
  readonly #lock: Int32Array;

  constructor(buffer: ArrayBuffer, byteOffset = 0) {
    this.#f = new Float64Array(buffer, byteOffset, THROTTLE_STATE_BYTES / 8);
    this.#lock = new Int32Array(buffer, byteOffset, 1);
  }

  #acquireLock(): void {
    while (Atomics.compareExchange(this.#lock, 0, 0, 1) !== 0) { /* a few instructions */ }
  }

  #releaseLock(): void {
    Atomics.store(this.#lock, 0, 0);
  }

  /** Sets the limits and empties the buckets (QEMU's throttle_config). */
  configure(c: ThrottleConfig, nowNs: number): void {
    this.#acquireLock();
    try {
      const f = this.#f;
      f[SLOT_PREV_LEAK] = nowNs;
      f[SLOT_IOPS_SIZE] = c.iopsSize;
      THROTTLE_BUCKETS.forEach((name, i) => {
        const o = SLOT_BUCKETS + i * BUCKET_SLOTS;
        const b = c.buckets[name];
        f[o] = b.avg;
        f[o + 1] = b.max;
        f[o + 2] = b.burstLength;
        f[o + 3] = 0;
        f[o + 4] = 0;
      });
    } finally {
      this.#releaseLock();
    }
  }

  /** The configuration now in force. */
  config(): ThrottleConfig {
    const c = noThrottle();
    const f = this.#f;
    c.iopsSize = f[SLOT_IOPS_SIZE];
    THROTTLE_BUCKETS.forEach((name, i) => {
      const o = SLOT_BUCKETS + i * BUCKET_SLOTS;
      c.buckets[name] = { avg: f[o], max: f[o + 1], burstLength: f[o + 2] || 1 };
    });
    return c;
  }

  /**
   * Leaks the buckets to `nowNs`; if every bucket of the direction has
   * room, counts a request of `bytes` in them and returns 0, else returns
   * the ns to wait before trying again (nothing counted). Hot path with
   * throttling on: no allocation.
   */
  acquire(nowNs: number, isWrite: boolean, bytes: number): number {
    this.#acquireLock();
    const f = this.#f;
    try {
      const delta = nowNs - f[SLOT_PREV_LEAK];
      if (delta > 0) {
        f[SLOT_PREV_LEAK] = nowNs;
        for (let i = 0; i < THROTTLE_BUCKETS.length; i++) {
          leak(f, SLOT_BUCKETS + i * BUCKET_SLOTS, delta);
        }
      }
      const which = isWrite ? WRITE : READ;
      let wait = 0;
      for (const i of which) wait = Math.max(wait, computeWait(f, SLOT_BUCKETS + i * BUCKET_SLOTS));
      if (wait > 0) return Math.ceil(wait);
      const iopsSize = f[SLOT_IOPS_SIZE];
      const units = iopsSize > 0 && bytes > iopsSize ? bytes / iopsSize : 1;
      for (const i of which) {
        const o = SLOT_BUCKETS + i * BUCKET_SLOTS;
        if (f[o] === 0) continue;
        const n = i < 3 ? bytes : units;
        f[o + 3] += n;
        if (f[o + 2] > 1) f[o + 4] += n;
      }
      return 0;
    } finally {
      this.#releaseLock();
    }
  }
}

/** throttle_leak_bucket. */
function leak(f: Float64Array, o: number, deltaNs: number): void {
  const avg = f[o], max = f[o + 1];
  if (avg === 0) return;
  f[o + 3] = Math.max(f[o + 3] - avg * deltaNs / NS, 0);
  if (f[o + 2] > 1) f[o + 4] = Math.max(f[o + 4] - max * deltaNs / NS, 0);
}

/** throttle_compute_wait: ns until the bucket at `o` has room. */
function computeWait(f: Float64Array, o: number): number {
  const avg = f[o], max = f[o + 1], burstLength = f[o + 2] || 1;
  if (avg === 0) return 0;
  let bucketSize: number, burstBucketSize: number;
  if (max === 0) {
    bucketSize = avg / 10;
    burstBucketSize = 0;
  } else {
    bucketSize = max * burstLength;
    burstBucketSize = max / 10;
  }
  const extra = f[o + 3] - bucketSize;
  if (extra > 0) return extra * NS / avg;
  // A burst longer than a second: at most `max` a second while it lasts.
  if (burstLength > 1 && f[o + 4] > burstBucketSize) return (f[o + 4] - burstBucketSize) * NS / max;
  return 0;
}
