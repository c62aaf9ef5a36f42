/**
 * A block driver over a byte array, for fuzzing the dataplane against a
 * model: every operation takes effect at submission, in submission order
 * (so a model that applies requests in pop order predicts the image
 * exactly), and completes from one bottom half in FIFO order, never before
 * the submitting call returns (the BlockDriver contract), unless
 * {@link MemoryImageDriver.inlineAllowed} lets a caller's
 * `setInlineCompletion(true)` make it complete inside the submission, as
 * null-co does. A {@link DriverMutant}
 * makes it misbehave on purpose, so a test can show that the fuzz's
 * properties catch a device that does.
 *
 * @module
 */

import type { AioContext, BottomHalf } from "../../aio/mod.ts";
import type { BlockCompletion, BlockDriver, IoVector } from "../../block/mod.ts";
import { EIO, viewAt } from "../../sys/mod.ts";

/**
 * Ways the driver can be made wrong (mutation testing of the fuzz):
 * - "flushNeverCompletes": FLUSH is accepted and never answered.
 * - "readOneBytePast": a read also writes the byte after its last buffer.
 * - "readTransfersNothing": a read completes OK without writing its buffers.
 * - "writeDropped": a write completes OK and leaves the image as it was.
 * - "writeZeroesIgnored": write zeroes (and discard) complete OK and change nothing.
 */
export type DriverMutant =
  | "flushNeverCompletes"
  | "readOneBytePast"
  | "readTransfersNothing"
  | "writeDropped"
  | "writeZeroesIgnored";

/**
 * The driver. `image` is its content; `held` the completions a mutant never
 * delivered ({@link release} delivers them so a failed case can be torn down).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { IoVector } from "../../block/mod.ts";
 * import { MemoryImageDriver } from "./memory_image_driver.ts";
 * const ctx = new AioContext();
 * const d = new MemoryImageDriver(ctx, new Uint8Array(1024).fill(7));
 * const buf = new Uint8Array(512);
 * let ret = 1;
 * d.preadv(512, IoVector.fromBuffers([buf]), (r) => ret = r);
 * ctx.poll(false);
 * assert.equal(ret, 0);
 * assert.equal(buf[0], 7);
 * await d.close();
 * ctx.close();
 * ```
 */
export class MemoryImageDriver implements BlockDriver {
  readonly name = "memory";
  readonly requestAlignment = 1;
  readonly memAlignment = 1;
  readonly image: Uint8Array;
  /** Set to make the driver misbehave (see {@link DriverMutant}). */
  mutant: DriverMutant | null = null;
  /**
   * A sector (512 bytes) that fails every read, write, discard and write
   * zeroes touching it with -EIO, changing nothing (a medium error), or null.
   */
  badSector: number | null = null;
  /** Whether `setInlineCompletion(true)` is honoured (set before the caller asks). */
  inlineAllowed = false;
  /** Completions withheld by a mutant. */
  readonly held: BlockCompletion[] = [];
  readonly #bh: BottomHalf;
  #queue: BlockCompletion[] = [];
  #inline = false;

  constructor(ctx: AioContext, image: Uint8Array) {
    this.image = image;
    this.#bh = ctx.bhNew(() => {
      const q = this.#queue;
      this.#queue = [];
      for (const cb of q) cb(0); // failures come wrapped with their -errno
    }, "memory-image");
  }

  get length(): number {
    return this.image.length;
  }

  #complete(cb: BlockCompletion, ret = 0): void {
    if (this.#inline) return cb(ret);
    this.#queue.push(ret === 0 ? cb : () => cb(ret));
    this.#bh.schedule();
  }

  /** Whether [offset, offset + bytes) touches the bad sector. */
  #bad(offset: number, bytes: number): boolean {
    const b = this.badSector;
    return b !== null && offset < (b + 1) * 512 && offset + bytes > b * 512;
  }

  preadv(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (this.#bad(offset, qiov.size)) return this.#complete(cb, -EIO);
    if (this.mutant !== "readTransfersNothing") {
      let off = offset;
      for (let i = 0; i < qiov.niov; i++) {
        const n = qiov.len(i);
        new Uint8Array(viewAt(qiov.base(i), n)).set(this.image.subarray(off, off + n));
        off += n;
      }
      if (this.mutant === "readOneBytePast" && qiov.niov > 0) {
        const last = qiov.niov - 1;
        new Uint8Array(viewAt(qiov.base(last) + qiov.len(last), 1))[0] = 0x5a;
      }
    }
    this.#complete(cb);
  }

  pwritev(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (this.#bad(offset, qiov.size)) return this.#complete(cb, -EIO);
    if (this.mutant !== "writeDropped") {
      let off = offset;
      for (let i = 0; i < qiov.niov; i++) {
        const n = qiov.len(i);
        this.image.set(new Uint8Array(viewAt(qiov.base(i), n)), off);
        off += n;
      }
    }
    this.#complete(cb);
  }

  flush(cb: BlockCompletion): void {
    if (this.mutant === "flushNeverCompletes") this.held.push(cb);
    else this.#complete(cb);
  }

  pdiscard(offset: number, bytes: number, cb: BlockCompletion): void {
    if (this.#bad(offset, bytes)) return this.#complete(cb, -EIO);
    // A discarded range reads back as zeroes here (the model says so too).
    if (this.mutant !== "writeZeroesIgnored") this.image.fill(0, offset, offset + bytes);
    this.#complete(cb);
  }

  pwriteZeroes(offset: number, bytes: number, _unmap: boolean, cb: BlockCompletion): void {
    if (this.#bad(offset, bytes)) return this.#complete(cb, -EIO);
    if (this.mutant !== "writeZeroesIgnored") this.image.fill(0, offset, offset + bytes);
    this.#complete(cb);
  }

  /** Completes inside the submission from now on (if {@link inlineAllowed}); returns whether. */
  setInlineCompletion(on: boolean): boolean {
    this.#inline = on && this.inlineAllowed;
    return this.#inline;
  }

  ioPlug(): void {}

  ioUnplug(): void {}

  refreshLength(): number {
    return this.image.length;
  }

  /** Delivers every withheld completion (from the bottom half). */
  release(): void {
    for (const cb of this.held.splice(0)) this.#complete(cb);
  }

  close(): Promise<void> {
    this.#bh.delete();
    return Promise.resolve();
  }
}
