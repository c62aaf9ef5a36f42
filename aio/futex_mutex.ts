/**
 * A mutex in one Int32 word of shared memory (Drepper's "Futexes Are
 * Tricky", mutex3: 0 free, 1 locked, 2 locked with waiters), for state that
 * IOThreads share through a SharedArrayBuffer (range locks, qcow2 metadata
 * hand-off, throttle groups). Meant for critical sections of a few hundred
 * nanoseconds: it spins briefly, then sleeps in the kernel (Atomics.wait)
 * only when the holder was preempted, so a waiter on these 2-core machines
 * does not spin away the holder's time slice.
 *
 * @module
 */

/** Compare-and-swap attempts before a waiter sleeps. */
const SPINS = 64;

/**
 * Takes the mutex in word `index` of `i32`, which must view a
 * SharedArrayBuffer (Atomics.wait throws on any other memory, mmapped shared
 * memory included).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { futexLock, futexUnlock } from "./futex_mutex.ts";
 * const word = new Int32Array(new SharedArrayBuffer(4));
 * futexLock(word, 0);
 * assert.equal(word[0], 1);
 * futexUnlock(word, 0);
 * assert.equal(word[0], 0);
 * ```
 */
export function futexLock(i32: Int32Array, index: number): void {
  let c = Atomics.compareExchange(i32, index, 0, 1);
  if (c === 0) return;
  for (let i = 0; i < SPINS; i++) {
    c = Atomics.compareExchange(i32, index, 0, 1);
    if (c === 0) return;
  }
  if (c !== 2) c = Atomics.exchange(i32, index, 2);
  while (c !== 0) {
    // The holder was preempted: sleep in the kernel instead of spinning.
    Atomics.wait(i32, index, 2, 1);
    c = Atomics.exchange(i32, index, 2);
  }
}

/**
 * Releases the mutex in word `index` of `i32`, waking one sleeper if any.
 *
 * @example
 * ```ts
 * import { futexLock, futexUnlock } from "./futex_mutex.ts";
 * const word = new Int32Array(new SharedArrayBuffer(4));
 * futexLock(word, 0);
 * futexUnlock(word, 0);
 * ```
 */
export function futexUnlock(i32: Int32Array, index: number): void {
  if (Atomics.sub(i32, index, 1) !== 1) {
    Atomics.store(i32, index, 0);
    Atomics.notify(i32, index, 1);
  }
}
