import { type MappedRegion, mmapAnonymous } from "../sys/mod.ts";

const GRANULE = 64 * 1024;

/**
 * Page-aligned bounce buffers (qemu_try_blockalign) kept for reuse: O_DIRECT
 * requests whose buffers, offsets or lengths are not aligned are staged here.
 * Sizes are rounded up to 64 KiB; at most `keep` free buffers are cached.
 * Internal to block/.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { BounceBufferPool } from "./bounce_buffer_pool.ts";
 * const p = new BounceBufferPool();
 * const b = p.get(1000);
 * assert(b.length >= 1000);
 * assert.equal(b.addr % 4096, 0);
 * p.put(b);
 * assert.equal(p.get(10), b);
 * p.close();
 * ```
 */
export class BounceBufferPool {
  readonly #free: MappedRegion[] = [];
  readonly #keep: number;

  constructor(keep = 16) {
    this.#keep = keep;
  }

  /** A buffer of at least `len` bytes. */
  get(len: number): MappedRegion {
    for (let i = 0; i < this.#free.length; i++) {
      if (this.#free[i].length >= len) {
        const b = this.#free[i];
        this.#free[i] = this.#free[this.#free.length - 1];
        this.#free.pop();
        return b;
      }
    }
    return mmapAnonymous(Math.ceil(len / GRANULE) * GRANULE);
  }

  /** Returns a buffer for reuse (or unmaps it when the cache is full). */
  put(b: MappedRegion): void {
    if (this.#free.length < this.#keep) this.#free.push(b);
    else b.unmap();
  }

  /** Unmaps every cached buffer. */
  close(): void {
    for (const b of this.#free) b.unmap();
    this.#free.length = 0;
  }
}
