import { type AioContext, ThreadPool } from "../aio/mod.ts";

interface Entry {
  pool: ThreadPool;
  refs: number;
}

const pools = new WeakMap<AioContext, Entry>();

/**
 * Workers each pool starts up front and keeps (thread-pool-min): a Worker
 * started from an IOThread takes about a second to run, so the one that
 * serves the first (QD1) request is ready when the image opens. One Worker
 * serves any queue depth (jobs queued behind others run on Deno blocking
 * threads), and each Worker is a V8 isolate of about 10 MB resident.
 */
const POOL_MIN_THREADS = 1;

/**
 * Most Workers of a pool (thread-pool-max): one. Its synchronous calls are
 * reads and writes found alone, which are short; every other job runs on a
 * blocking thread, so a second Worker (another isolate) would only add memory.
 */
const POOL_MAX_THREADS = 1;

/**
 * The ThreadPool of `ctx`, created on first use and shared by every driver and
 * engine in that context (QEMU's aio_get_thread_pool). Pair each call with
 * {@link releaseThreadPool}. Internal to block/.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { acquireThreadPool, releaseThreadPool } from "./thread_pool_registry.ts";
 * import { AioContext } from "../aio/mod.ts";
 * const ctx = new AioContext();
 * const a = acquireThreadPool(ctx), b = acquireThreadPool(ctx);
 * assert.equal(a, b);
 * await releaseThreadPool(ctx); await releaseThreadPool(ctx);
 * ctx.close();
 * ```
 */
export function acquireThreadPool(ctx: AioContext): ThreadPool {
  let e = pools.get(ctx);
  if (!e) {
    e = {
      pool: new ThreadPool(ctx, { minThreads: POOL_MIN_THREADS, maxThreads: POOL_MAX_THREADS }),
      refs: 0,
    };
    pools.set(ctx, e);
  }
  e.refs++;
  return e.pool;
}

/** Drops one reference; the last one closes the pool. */
export async function releaseThreadPool(ctx: AioContext): Promise<void> {
  const e = pools.get(ctx);
  if (!e) return;
  if (--e.refs === 0) {
    pools.delete(ctx);
    await e.pool.close();
  }
}
