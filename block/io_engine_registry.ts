import type { AioContext } from "../aio/mod.ts";
import type { IoEngine, IoEngineKind } from "./io_engine.ts";
import { ThreadPoolEngine } from "./thread_pool_engine.ts";
import { LinuxAioEngine } from "./linux_aio_engine.ts";
import { IoUringEngine } from "./io_uring_engine.ts";

interface Entry {
  engine: IoEngine;
  refs: number;
}

const engines = new WeakMap<AioContext, Map<IoEngineKind, Entry>>();

/**
 * Creates an engine of `kind` for `ctx` with default settings (no sharing).
 *
 * @example
 * ```ts
 * import { AioContext } from "../aio/mod.ts";
 * import { createIoEngine } from "./io_engine_registry.ts";
 * const ctx = new AioContext();
 * const e = createIoEngine(ctx, "io_uring");
 * await e.close();
 * ctx.close();
 * ```
 */
export function createIoEngine(ctx: AioContext, kind: IoEngineKind): IoEngine {
  switch (kind) {
    case "threads":
      return new ThreadPoolEngine(ctx);
    case "native":
      return new LinuxAioEngine(ctx);
    case "io_uring":
      return new IoUringEngine(ctx);
  }
}

/**
 * The engine of `kind` shared by every file driver in `ctx`: one Linux AIO
 * context / one io_uring per AioContext, as QEMU's aio_get_linux_aio and
 * aio_get_linux_io_uring. Pair with {@link releaseIoEngine}. Internal to block/.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../aio/mod.ts";
 * import { acquireIoEngine, releaseIoEngine } from "./io_engine_registry.ts";
 * const ctx = new AioContext();
 * assert.equal(acquireIoEngine(ctx, "native"), acquireIoEngine(ctx, "native"));
 * await releaseIoEngine(ctx, "native"); await releaseIoEngine(ctx, "native");
 * ctx.close();
 * ```
 */
export function acquireIoEngine(ctx: AioContext, kind: IoEngineKind): IoEngine {
  let m = engines.get(ctx);
  if (!m) engines.set(ctx, m = new Map());
  let e = m.get(kind);
  if (!e) m.set(kind, e = { engine: createIoEngine(ctx, kind), refs: 0 });
  e.refs++;
  return e.engine;
}

/** Drops one reference; the last one closes the engine. */
export async function releaseIoEngine(ctx: AioContext, kind: IoEngineKind): Promise<void> {
  const m = engines.get(ctx);
  const e = m?.get(kind);
  if (!m || !e) return;
  if (--e.refs === 0) {
    m.delete(kind);
    await e.engine.close();
  }
}
