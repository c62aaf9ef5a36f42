/**
 * The `throttle` filter driver (QEMU's block/throttle.c with
 * block/throttle-groups.c): sits on top of a driver and lets reads and
 * writes through only as fast as its throttle group's buckets allow
 * ({@link ThrottleState}, shared by every member of the group, in any
 * thread). A request that must wait joins its direction's queue, in order,
 * and a timer on the member's AioContext submits the queue's head when the
 * buckets have leaked enough. Discards and write-zeroes count as writes of
 * their length (as QEMU's); flushes are not throttled.
 *
 * @module
 */

import type { AioContext, AioTimer } from "../aio/mod.ts";
import type { BlockCompletion, BlockDriver } from "./block_driver.ts";
import type { IoVector } from "./io_vector.ts";
import type { ThrottleState } from "./throttle_state.ts";

const enum Op {
  Read,
  Write,
  Discard,
  WriteZeroes,
}

/** A request waiting for the buckets (allocated only when one must wait). */
interface Waiting {
  op: Op;
  offset: number;
  bytes: number;
  qiov: IoVector | null;
  unmap: boolean;
  cb: BlockCompletion;
}

/**
 * A throttled view of `child`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../aio/mod.ts";
 * import { IoVector, NullCoDriver } from "./mod.ts";
 * import { ThrottleDriver } from "./throttle_driver.ts";
 * import { noThrottle, ThrottleState, THROTTLE_STATE_BYTES } from "./throttle_state.ts";
 * const ctx = new AioContext();
 * const state = new ThrottleState(new ArrayBuffer(THROTTLE_STATE_BYTES));
 * const c = noThrottle();
 * c.buckets["iops-total"].avg = 100; // a bucket of 10, then one every 10 ms
 * state.configure(c, ctx.now());
 * const d = new ThrottleDriver(ctx, new NullCoDriver(ctx, { size: 1 << 20 }), state);
 * const qiov = IoVector.fromBuffers([new Uint8Array(512)]);
 * let done = 0;
 * const t0 = ctx.now();
 * for (let i = 0; i < 15; i++) d.preadv(0, qiov, () => done++);
 * while (done < 15) ctx.poll(true);
 * assert(ctx.now() - t0 >= 30e6, "the last ones waited for the bucket");
 * await d.close();
 * ctx.close();
 * ```
 */
export class ThrottleDriver implements BlockDriver {
  readonly name = "throttle";
  readonly child: BlockDriver;
  readonly #ctx: AioContext;
  readonly #state: ThrottleState;
  /** Waiting requests per direction (0 read, 1 write). */
  readonly #queues: [Waiting[], Waiting[]] = [[], []];
  readonly #timers: [AioTimer, AioTimer];

  constructor(ctx: AioContext, child: BlockDriver, state: ThrottleState) {
    this.child = child;
    this.#ctx = ctx;
    this.#state = state;
    this.#timers = [ctx.timerNew(() => this.#restart(0)), ctx.timerNew(() => this.#restart(1))];
  }

  get length(): number {
    return this.child.length;
  }
  get requestAlignment(): number {
    return this.child.requestAlignment;
  }
  get memAlignment(): number {
    return this.child.memAlignment;
  }

  /** Requests waiting for the buckets. */
  get throttled(): number {
    return this.#queues[0].length + this.#queues[1].length;
  }

  /** Hot path: one bucket check when nothing waits; allocates only for a request that must. */
  preadv(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (this.#mayGo(0, qiov.size)) this.child.preadv(offset, qiov, cb);
    else this.#wait(0, { op: Op.Read, offset, bytes: qiov.size, qiov, unmap: false, cb });
  }

  pwritev(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (this.#mayGo(1, qiov.size)) this.child.pwritev(offset, qiov, cb);
    else this.#wait(1, { op: Op.Write, offset, bytes: qiov.size, qiov, unmap: false, cb });
  }

  pdiscard(offset: number, bytes: number, cb: BlockCompletion): void {
    if (this.#mayGo(1, bytes)) this.child.pdiscard(offset, bytes, cb);
    else this.#wait(1, { op: Op.Discard, offset, bytes, qiov: null, unmap: false, cb });
  }

  pwriteZeroes(offset: number, bytes: number, unmap: boolean, cb: BlockCompletion): void {
    if (this.#mayGo(1, bytes)) this.child.pwriteZeroes(offset, bytes, unmap, cb);
    else this.#wait(1, { op: Op.WriteZeroes, offset, bytes, qiov: null, unmap, cb });
  }

  flush(cb: BlockCompletion): void {
    this.child.flush(cb);
  }

  ioPlug(): void {
    this.child.ioPlug();
  }
  ioUnplug(): void {
    this.child.ioUnplug();
  }

  refreshLength(): number {
    return this.child.refreshLength();
  }

  setInlineCompletion(on: boolean): boolean {
    return this.child.setInlineCompletion?.(on) ?? false;
  }

  /** Submits every waiting request now, past the limits (drain, queue stop). */
  releaseHeld(): void {
    for (const t of this.#timers) t.del();
    this.child.ioPlug();
    try {
      for (const q of this.#queues) {
        while (q.length > 0) this.#submit(q.shift()!);
      }
    } finally {
      this.child.ioUnplug();
    }
  }

  /** Nothing queued in this direction and the buckets have room: counted, go. */
  #mayGo(dir: 0 | 1, bytes: number): boolean {
    return this.#queues[dir].length === 0 &&
      this.#state.acquire(this.#ctx.now(), dir === 1, bytes) === 0;
  }

  #wait(dir: 0 | 1, w: Waiting): void {
    const q = this.#queues[dir];
    q.push(w);
    if (q.length === 1) this.#arm(dir);
  }

  #arm(dir: 0 | 1): void {
    const w = this.#queues[dir][0];
    const now = this.#ctx.now();
    const wait = this.#state.acquire(now, dir === 1, w.bytes);
    if (wait === 0) {
      // The buckets had room after all (another member's request leaked): go now.
      this.#ctx.scheduleOneshot(() => this.#restart(dir, true));
      return;
    }
    this.#timers[dir].modNs(now + wait);
  }

  /** Submits the queue's head (and what may follow it) once the buckets allow. */
  #restart(dir: 0 | 1, headCounted = false): void {
    const q = this.#queues[dir];
    this.child.ioPlug();
    try {
      while (q.length > 0) {
        const w = q[0];
        if (!headCounted && this.#state.acquire(this.#ctx.now(), dir === 1, w.bytes) !== 0) {
          this.#arm(dir);
          return;
        }
        headCounted = false;
        q.shift();
        this.#submit(w);
      }
    } finally {
      this.child.ioUnplug();
    }
  }

  #submit(w: Waiting): void {
    switch (w.op) {
      case Op.Read:
        return this.child.preadv(w.offset, w.qiov!, w.cb);
      case Op.Write:
        return this.child.pwritev(w.offset, w.qiov!, w.cb);
      case Op.Discard:
        return this.child.pdiscard(w.offset, w.bytes, w.cb);
      case Op.WriteZeroes:
        return this.child.pwriteZeroes(w.offset, w.bytes, w.unmap, w.cb);
    }
  }

  /** Stops the timers and closes the child; nothing waits any more (the caller drained first). */
  async close(): Promise<void> {
    for (const t of this.#timers) t.del();
    await this.child.close();
  }
}
