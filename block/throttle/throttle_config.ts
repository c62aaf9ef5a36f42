/**
 * A throttle group's limits (QEMU's ThrottleConfig in include/qemu/throttle.h)
 * and their validation (util/throttle.c throttle_is_valid, with its messages).
 *
 * @module
 */

/** The buckets, in QEMU's BucketType order, named as QEMU's ThrottleLimits members. */
export const THROTTLE_BUCKETS = [
  "bps-total",
  "bps-read",
  "bps-write",
  "iops-total",
  "iops-read",
  "iops-write",
] as const;

/** One bucket's name. */
export type ThrottleBucketName = typeof THROTTLE_BUCKETS[number];

/** The largest avg or max a bucket takes (QEMU's THROTTLE_VALUE_MAX). */
export const THROTTLE_VALUE_MAX = 1_000_000_000_000_000;

/** The largest burst length (QEMU refuses more than UINT_MAX). */
export const THROTTLE_BURST_LENGTH_MAX = 0xffff_ffff;

/** One bucket's limits (LeakyBucket's configuration part): units a second, 0 for none. */
export interface ThrottleBucketConfig {
  /** The average rate (bytes or operations a second). */
  avg: number;
  /** The burst rate; 0: bursts of avg / 10 only. */
  max: number;
  /** Seconds a burst at `max` may last (QEMU's burst_length, >= 1). */
  burstLength: number;
}

/** A whole group's limits. */
export interface ThrottleConfig {
  buckets: Record<ThrottleBucketName, ThrottleBucketConfig>;
  /** Bytes one operation counts as for the iops buckets (QEMU's op_size; 0: each request is one). */
  iopsSize: number;
}

/**
 * A configuration with no limit (QEMU's throttle_config_init).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { throttleConfigInit } from "./throttle_config.ts";
 * const c = throttleConfigInit();
 * assert.deepEqual(c.buckets["iops-total"], { avg: 0, max: 0, burstLength: 1 });
 * ```
 */
export function throttleConfigInit(): ThrottleConfig {
  const buckets = {} as ThrottleConfig["buckets"];
  for (const b of THROTTLE_BUCKETS) buckets[b] = { avg: 0, max: 0, burstLength: 1 };
  return { buckets, iopsSize: 0 };
}

/**
 * A deep copy of `c`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { cloneThrottleConfig, throttleConfigInit } from "./throttle_config.ts";
 * const a = throttleConfigInit();
 * const b = cloneThrottleConfig(a);
 * b.buckets["bps-read"].avg = 1;
 * assert.equal(a.buckets["bps-read"].avg, 0);
 * ```
 */
export function cloneThrottleConfig(c: ThrottleConfig): ThrottleConfig {
  const out = throttleConfigInit();
  for (const b of THROTTLE_BUCKETS) out.buckets[b] = { ...c.buckets[b] };
  out.iopsSize = c.iopsSize;
  return out;
}

/**
 * Whether any bucket limits anything (throttle_enabled).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { throttleConfigInit, throttleEnabled } from "./throttle_config.ts";
 * const c = throttleConfigInit();
 * assert(!throttleEnabled(c));
 * c.buckets["bps-write"].avg = 1;
 * assert(throttleEnabled(c));
 * ```
 */
export function throttleEnabled(c: ThrottleConfig): boolean {
  return THROTTLE_BUCKETS.some((b) => c.buckets[b].avg > 0);
}

/**
 * Checks `c` as QEMU's throttle_is_valid: null when valid, else QEMU's
 * error message.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { throttleConfigInit, throttleIsValid } from "./throttle_config.ts";
 * const c = throttleConfigInit();
 * c.buckets["iops-total"].max = 100;
 * assert.equal(throttleIsValid(c), "bps_max/iops_max require corresponding bps/iops values");
 * c.buckets["iops-total"].avg = 50;
 * assert.equal(throttleIsValid(c), null);
 * ```
 */
export function throttleIsValid(c: ThrottleConfig): string | null {
  const b = c.buckets;
  const conflict = (t: ThrottleBucketName, r: ThrottleBucketName, w: ThrottleBucketName) =>
    (b[t].avg > 0 && (b[r].avg > 0 || b[w].avg > 0)) ||
    (b[t].max > 0 && (b[r].max > 0 || b[w].max > 0));
  if (
    conflict("bps-total", "bps-read", "bps-write") ||
    conflict("iops-total", "iops-read", "iops-write")
  ) {
    return "bps/iops/max total values and read/write values cannot be used at the same time";
  }
  if (
    c.iopsSize > 0 && !b["iops-total"].avg && !b["iops-read"].avg && !b["iops-write"].avg
  ) {
    return "iops size requires an iops value to be set";
  }
  for (const name of THROTTLE_BUCKETS) {
    const k = b[name];
    if (
      !(k.avg >= 0 && k.max >= 0) || k.avg > THROTTLE_VALUE_MAX || k.max > THROTTLE_VALUE_MAX
    ) {
      return `bps/iops/max values must be within [0, ${THROTTLE_VALUE_MAX}]`;
    }
    if (!k.burstLength) return "the burst length cannot be 0";
    if (k.burstLength > 1 && !k.max) return "burst length set without burst rate";
    if (k.max && k.burstLength > THROTTLE_VALUE_MAX / k.max) {
      return "burst length too high for this burst rate";
    }
    if (k.max && !k.avg) return "bps_max/iops_max require corresponding bps/iops values";
    if (k.max && k.max < k.avg) return "bps_max/iops_max cannot be lower than bps/iops";
  }
  return null;
}
