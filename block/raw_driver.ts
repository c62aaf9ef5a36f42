import type { IoVector } from "./io_vector.ts";
import type { BlockCompletion, BlockDriver } from "./block_driver.ts";

/**
 * Options of {@link RawDriver}: QEMU raw format's `offset` and `size`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { RawDriverOptions } from "./raw_driver.ts";
 * const o: RawDriverOptions = { offset: 1 << 20, size: 64 << 20 }; // a partition
 * assert.equal(o.offset, 1048576);
 * ```
 */
export interface RawDriverOptions {
  /** Start of the window in the child, in bytes (default 0). */
  offset?: number;
  /** Size of the window (default: the rest of the child). */
  size?: number;
}

/**
 * The raw format driver (QEMU block/raw-format.c): passes requests through to
 * its child protocol driver, shifted by an optional offset and limited to an
 * optional size, so one file can expose a window (e.g. a partition). The
 * BlockBackend checks ranges against {@link RawDriver.length}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../aio/mod.ts";
 * import { NullCoDriver } from "./null_driver.ts";
 * import { RawDriver } from "./raw_driver.ts";
 * const ctx = new AioContext();
 * const raw = new RawDriver(new NullCoDriver(ctx, { size: 8192 }), { offset: 4096 });
 * assert.equal(raw.length, 4096);
 * await raw.close();
 * ctx.close();
 * ```
 */
export class RawDriver implements BlockDriver {
  /** "raw". */
  readonly name = "raw";
  /** The protocol driver below. */
  readonly child: BlockDriver;
  /** Window start in the child. */
  readonly offset: number;
  readonly #size: number | undefined;

  constructor(child: BlockDriver, opts: RawDriverOptions = {}) {
    this.child = child;
    this.offset = opts.offset ?? 0;
    this.#size = opts.size;
    if (!Number.isSafeInteger(this.offset) || this.offset < 0) {
      throw new RangeError(`raw: bad offset ${opts.offset}`);
    }
    if (this.offset > child.length) {
      throw new RangeError(`raw: offset ${this.offset} beyond the image (${child.length})`);
    }
    if (this.#size !== undefined && this.offset + this.#size > child.length) {
      throw new RangeError(
        `raw: window ${this.offset}+${this.#size} beyond the image (${child.length})`,
      );
    }
  }

  /** Window size. */
  get length(): number {
    return this.#size ?? this.child.length - this.offset;
  }

  /** The child's. */
  get requestAlignment(): number {
    return this.child.requestAlignment;
  }

  /** The child's. */
  get memAlignment(): number {
    return this.child.memAlignment;
  }

  /** Hot path: shifts and forwards. */
  preadv(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    this.child.preadv(offset + this.offset, qiov, cb);
  }

  /** Hot path: shifts and forwards. */
  pwritev(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    this.child.pwritev(offset + this.offset, qiov, cb);
  }

  /** Forwards. */
  flush(cb: BlockCompletion): void {
    this.child.flush(cb);
  }

  /** Shifts and forwards. */
  pdiscard(offset: number, bytes: number, cb: BlockCompletion): void {
    this.child.pdiscard(offset + this.offset, bytes, cb);
  }

  /** Shifts and forwards. */
  pwriteZeroes(offset: number, bytes: number, unmap: boolean, cb: BlockCompletion): void {
    this.child.pwriteZeroes(offset + this.offset, bytes, unmap, cb);
  }

  /** Forwards. */
  /** Passes through to the child (the raw format adds no work of its own). */
  setInlineCompletion(on: boolean): boolean {
    return this.child.setInlineCompletion?.(on) ?? false;
  }

  ioPlug(): void {
    this.child.ioPlug();
  }

  /** Forwards. */
  ioUnplug(): void {
    this.child.ioUnplug();
  }

  /** Refreshes the child; the window keeps its size unless it has none. */
  refreshLength(): number {
    const n = this.child.refreshLength();
    if (this.offset > n) throw new RangeError(`raw: image shrank below the offset ${this.offset}`);
    return this.length;
  }

  /** Closes the child. */
  close(): Promise<void> {
    return this.child.close();
  }
}
