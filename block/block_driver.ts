import type { IoVector } from "./io_vector.ts";

/**
 * Completion of a block request: 0 on success or `-errno` (QEMU's convention).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { BlockCompletion } from "./block_driver.ts";
 * const cb: BlockCompletion = (ret) => assert(ret <= 0);
 * cb(0);
 * ```
 */
export type BlockCompletion = (ret: number) => void;

/**
 * What a block driver implements (QEMU's BlockDriver callbacks, in callback
 * rather than coroutine form): protocol drivers (file, null-co, null-aio) and
 * format drivers (raw) that sit on top of a child driver.
 *
 * Contract: a driver never calls `cb` before the submitting call returns (it
 * completes from an fd handler, a bottom half or a thread-pool completion)
 * unless its caller turned on `setInlineCompletion`,
 * validates nothing the BlockBackend already checked (range, read-only), and
 * owns no memory of the caller's IoVector, which stays alive until `cb`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { BlockDriver } from "./block_driver.ts";
 * function describe(d: BlockDriver): string {
 *   return `${d.name}: ${d.length} bytes, align ${d.requestAlignment}`;
 * }
 * assert.equal(typeof describe, "function");
 * ```
 */
export interface BlockDriver {
  /** Driver name ("file", "null-co", "null-aio", "raw"). */
  readonly name: string;
  /** Size in bytes. */
  readonly length: number;
  /** Offset and length alignment the driver handles without extra work. */
  readonly requestAlignment: number;
  /** Buffer address alignment the driver handles without a bounce buffer. */
  readonly memAlignment: number;
  /** Reads `qiov.size` bytes at `offset` into `qiov`. Hot path. */
  preadv(offset: number, qiov: IoVector, cb: BlockCompletion): void;
  /** Writes `qiov.size` bytes from `qiov` at `offset`. Hot path. */
  pwritev(offset: number, qiov: IoVector, cb: BlockCompletion): void;
  /** Makes completed writes durable (fdatasync). */
  flush(cb: BlockCompletion): void;
  /** Deallocates a range (it may read back as anything, usually zeroes). */
  pdiscard(offset: number, bytes: number, cb: BlockCompletion): void;
  /** Makes a range read as zeroes; `unmap` allows deallocating it. */
  pwriteZeroes(offset: number, bytes: number, unmap: boolean, cb: BlockCompletion): void;
  /** Starts a batch: submissions are queued until the matching unplug. */
  ioPlug(): void;
  /** Ends a batch: submits what was queued (one system call for many). */
  ioUnplug(): void;
  /** Re-reads the size (after the image was resized); returns it. */
  refreshLength(): number;
  /** Releases files and engines. No request may be in flight. */
  close(): Promise<void>;
  /**
   * Lets the driver call `cb` from inside the submitting call (on) or not
   * (off, the default), for a caller that allows it: QEMU's null-co finishes
   * inside the request's own coroutine, so its caller sees the completion
   * before the submission returns. Returns whether completions are now
   * inline; a driver without this method never completes inline.
   */
  setInlineCompletion?(on: boolean): boolean;
  /**
   * Sends on at once, past its limits, the requests the driver holds back (a
   * throttle filter's queues; QEMU's throttle_group_restart_tgm when a
   * drained section begins), so that waiting for in-flight requests ends.
   * Optional: a driver that holds nothing back has no such method.
   */
  releaseHeld?(): void;
}
