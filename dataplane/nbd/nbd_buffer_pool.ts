/**
 * Payload buffers of one NBD connection (write data in, read data out),
 * reused by power-of-two size class so a steady stream of requests
 * allocates nothing. Bounded: a class keeps a few free buffers (fewer for
 * the big ones), the rest go to the garbage collector.
 *
 * @module
 */

const MIN_CLASS = 12; // 4 KiB
const POOLED_MAX_CLASS = 25; // 32 MiB

/**
 * A size-classed free list of byte buffers.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdBufferPool } from "./nbd_buffer_pool.ts";
 * const pool = new NbdBufferPool();
 * const a = pool.get(5000);
 * assert.equal(a.byteLength, 8192);
 * pool.put(a);
 * assert.equal(pool.get(6000), a);
 * ```
 */
export class NbdBufferPool {
  readonly #free: Uint8Array[][] = [];

  /** A buffer of at least `len` bytes (its class size); hot path: reuses a freed one. */
  get(len: number): Uint8Array {
    const c = classOf(len);
    const list = this.#free[c];
    const b = list?.pop();
    return b ?? new Uint8Array(2 ** c);
  }

  /** Gives a buffer from {@link get} back. */
  put(buf: Uint8Array): void {
    const c = classOf(buf.byteLength);
    if (c > POOLED_MAX_CLASS || 2 ** c !== buf.byteLength) return;
    const list = (this.#free[c] ??= []);
    if (list.length < (c <= 20 ? 16 : 2)) list.push(buf);
  }
}

function classOf(len: number): number {
  let c = MIN_CLASS;
  while (2 ** c < len) c++;
  return c;
}
