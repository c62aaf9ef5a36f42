/**
 * Scheduling: sched_yield(2).
 *
 * @module
 */

import { libc } from "./libc.ts";

/**
 * sched_yield(2): lets another runnable thread have this CPU (a spin lock's
 * back-off when its holder may have been preempted). Never fails on Linux.
 *
 * @example
 * ```ts
 * import { schedYield } from "./sched.ts";
 * schedYield();
 * ```
 */
export function schedYield(): void {
  libc.sched_yield();
}
