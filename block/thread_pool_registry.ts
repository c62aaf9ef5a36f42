import { type AioContext, ThreadPool } from "../aio/mod.ts";

interface Entry {
  pool: ThreadPool;
  refs: number;
}

const pools = new WeakMap<AioContext, Entry>();

/**
 * Workers each pool starts up front and keeps (thread-pool-min): a Worker
 * started from an IOThread takes about a second to run, so growing on
 * demand would stall the first I/O bursts; more still start up to 64.
 */
const POOL_MIN_THREADS = 8;

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
    e = { pool: new ThreadPool(ctx, { minThreads: POOL_MIN_THREADS }), refs: 0 };
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
