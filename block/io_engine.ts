import type { IoVector } from "./io_vector.ts";
import type { BlockCompletion } from "./block_driver.ts";

/**
 * Counters an engine keeps for tests and benchmarks; they only grow.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { IoEngineStats } from "./io_engine.ts";
 * const s: IoEngineStats = { submitCalls: 0, submitted: 0, completed: 0, queued: 0 };
 * assert.equal(s.submitCalls, 0);
 * ```
 */
export interface IoEngineStats {
  /** System calls that submitted requests (io_submit, io_uring_enter, pool pushes). */
  submitCalls: number;
  /** Requests handed to the kernel or the thread pool. */
  submitted: number;
  /** Requests completed. */
  completed: number;
  /** Times a request had to wait in the pending queue (kernel or ring full). */
  queued: number;
  /** Short reads whose rest was resubmitted (io_uring). */
  shortReads?: number;
  /** Requests the kernel completed with -EAGAIN/-EINTR and that went again (io_uring). */
  resubmitted?: number;
}

/**
 * The seam between the file driver and the way it does I/O (QEMU's
 * aio=threads|native|io_uring; Firecracker's FileEngine). The file driver never
 * switches on which engine it has.
 *
 * Results are normalised the way QEMU's linux-aio does: `cb(0)` when the whole
 * vector was transferred, a short read is padded with zeroes and succeeds, a
 * short write fails with `-ENOSPC`, errors are `-errno`. Completions arrive in
 * the engine's AioContext, never before the submitting call returns.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { IoEngine } from "./io_engine.ts";
 * function batched(e: IoEngine, submit: () => void): void {
 *   e.plug(); submit(); e.unplug();
 * }
 * assert.equal(typeof batched, "function");
 * ```
 */
export interface IoEngine {
  /** "threads", "native" or "io_uring" (for logs and benchmarks only). */
  readonly kind: IoEngineKind;
  /** Submission counters. */
  readonly stats: IoEngineStats;
  /** preadv of `qiov` at `offset`. Hot path. */
  preadv(fd: number, qiov: IoVector, offset: number, cb: BlockCompletion): void;
  /** pwritev of `qiov` at `offset`. Hot path. */
  pwritev(fd: number, qiov: IoVector, offset: number, cb: BlockCompletion): void;
  /** fdatasync. */
  fdatasync(fd: number, cb: BlockCompletion): void;
  /** fallocate(mode, offset, len). */
  fallocate(fd: number, mode: number, offset: number, len: number, cb: BlockCompletion): void;
  /** Starts a batch (nests). */
  plug(): void;
  /** Ends a batch; the outermost unplug submits what was queued. */
  unplug(): void;
  /** Releases kernel objects. No request may be in flight. */
  close(): Promise<void>;
}

/**
 * Engine names as in QEMU's `aio=` option.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { IoEngineKind } from "./io_engine.ts";
 * const k: IoEngineKind = "io_uring";
 * assert(k.length > 0);
 * ```
 */
export type IoEngineKind = "threads" | "native" | "io_uring";
