/**
 * clock_gettime(2) on CLOCK_MONOTONIC, the clock of every AioContext.
 *
 * @module
 */

import { libc } from "./libc.ts";
import { check } from "./sys_error.ts";
import { TIMESPEC } from "./layout.ts";

/** clock id: monotonic time since boot, not affected by settimeofday. */
export const CLOCK_MONOTONIC = 1;
/** clock id: wall-clock time. */
export const CLOCK_REALTIME = 0;

const ts = new Uint32Array(TIMESPEC.size / 4);
const tsBytes = new Uint8Array(ts.buffer);

/**
 * The current CLOCK_MONOTONIC time in nanoseconds, as a number (exact to the
 * nanosecond for the first 104 days of uptime, then to 2 ns, and so on).
 * Hot path: no allocation (clock_gettime is a vDSO call).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { clockNs } from "./mod.ts";
 * const a = clockNs(), b = clockNs();
 * assert(b >= a);
 * assert(a > 0);
 * ```
 */
export function clockNs(clockId = CLOCK_MONOTONIC): number {
  const r = libc.clock_gettime(clockId, tsBytes);
  if (r !== 0) check("clock_gettime", -1);
  // tv_sec (i64) as two u32 halves, tv_nsec below 1e9.
  return (ts[0] + ts[1] * 0x1_0000_0000) * 1e9 + ts[2];
}
