import type { AioContext, ThreadPool } from "../aio/mod.ts";
import type { IoVector } from "./io_vector.ts";
import type { BlockCompletion } from "./block_driver.ts";
import type { IoEngine, IoEngineKind, IoEngineStats } from "./io_engine.ts";
import { OP_FALLOCATE, OP_FLUSH, OP_READ, OP_WRITE, RequestSlots } from "./request_slots.ts";
import { acquireThreadPool, releaseThreadPool } from "./thread_pool_registry.ts";

/**
 * aio=threads: every request runs as a blocking preadv/pwritev/fdatasync/
 * fallocate on the AioContext's ThreadPool (QEMU's raw_thread_pool_submit).
 * Plug/unplug do nothing: each job is its own submission. Per-request state
 * lives in recycled slots with one pre-bound completion each, so a warmed-up
 * engine allocates nothing of its own per request.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../aio/mod.ts";
 * import { ThreadPoolEngine } from "./thread_pool_engine.ts";
 * const ctx = new AioContext();
 * const e = new ThreadPoolEngine(ctx);
 * assert.equal(e.kind, "threads");
 * await e.close();
 * ctx.close();
 * ```
 */
export class ThreadPoolEngine implements IoEngine {
  /** Always "threads". */
  readonly kind: IoEngineKind = "threads";
  /** Counters. */
  readonly stats: IoEngineStats = { submitCalls: 0, submitted: 0, completed: 0, queued: 0 };
  readonly #ctx: AioContext;
  readonly #pool: ThreadPool;
  readonly #slots = new RequestSlots();
  readonly #done: ((ret: number) => void)[] = [];
  #closed = false;

  constructor(ctx: AioContext) {
    this.#ctx = ctx;
    this.#pool = acquireThreadPool(ctx);
  }

  /** Requests accepted and not yet completed. */
  get inFlight(): number {
    return this.#slots.inUse;
  }

  /** Hot path: preadv on a pool thread. */
  preadv(fd: number, qiov: IoVector, offset: number, cb: BlockCompletion): void {
    const slot = this.#slots.alloc(OP_READ, fd, qiov, offset, qiov.size, 0, cb);
    this.#count();
    this.#pool.submitPreadv(fd, qiov.iovAddr, qiov.niov, offset, this.#doneFor(slot));
  }

  /** Hot path: pwritev on a pool thread. */
  pwritev(fd: number, qiov: IoVector, offset: number, cb: BlockCompletion): void {
    const slot = this.#slots.alloc(OP_WRITE, fd, qiov, offset, qiov.size, 0, cb);
    this.#count();
    this.#pool.submitPwritev(fd, qiov.iovAddr, qiov.niov, offset, this.#doneFor(slot));
  }

  /** fdatasync on a pool thread. */
  fdatasync(fd: number, cb: BlockCompletion): void {
    const slot = this.#slots.alloc(OP_FLUSH, fd, null, 0, 0, 0, cb);
    this.#count();
    this.#pool.submitFdatasync(fd, this.#doneFor(slot));
  }

  /** fallocate on a pool thread. */
  fallocate(fd: number, mode: number, offset: number, len: number, cb: BlockCompletion): void {
    const slot = this.#slots.alloc(OP_FALLOCATE, fd, null, offset, len, mode, cb);
    this.#count();
    this.#pool.submitFallocate(fd, mode, offset, len, this.#doneFor(slot));
  }

  /** No-op: pool jobs are not batched. */
  plug(): void {}

  /** No-op. */
  unplug(): void {}

  /** Drops this engine's reference on the context's pool. */
  async close(): Promise<void> {
    if (this.#closed) return;
    if (this.#slots.inUse > 0) throw new Error("ThreadPoolEngine.close: requests in flight");
    this.#closed = true;
    await releaseThreadPool(this.#ctx);
  }

  #count(): void {
    this.stats.submitCalls++;
    this.stats.submitted++;
  }

  /** The pre-bound completion of `slot` (created once per slot). */
  #doneFor(slot: number): (ret: number) => void {
    let fn = this.#done[slot];
    if (fn === undefined) {
      fn = (ret: number) => {
        this.stats.completed++;
        this.#slots.complete(slot, ret);
      };
      this.#done[slot] = fn;
    }
    return fn;
  }
}
