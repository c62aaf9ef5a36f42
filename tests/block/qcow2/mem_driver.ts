/**
 * An in-memory protocol driver for qcow2 tests and fuzzing: the image is a
 * Uint8Array, reads past its end are zero-padded (as the file engines pad
 * short reads), completions come from a bottom half, and any write-like
 * request is counted (a read-only format driver must send none). A
 * writable one grows as it is written past its end (as a file does) and
 * zeroes discarded ranges (a punched hole).
 */
import type { AioContext } from "../../../aio/mod.ts";
import type { BlockCompletion, BlockDriver, IoVector } from "../../../block/mod.ts";
import { addressOf, EIO } from "../../../sys/mod.ts";

/** See the module comment. */
export class MemDriver implements BlockDriver {
  readonly name = "mem";
  readonly requestAlignment = 1;
  readonly memAlignment = 1;
  /** Write, discard and write-zeroes requests received. */
  writes = 0;
  /** Read requests received. */
  reads = 0;
  /** Requests not completed yet. */
  inFlight = 0;
  readonly #ctx: AioContext;
  #data: Uint8Array;
  readonly #writable: boolean;

  constructor(ctx: AioContext, data: Uint8Array, writable = false) {
    this.#ctx = ctx;
    this.#data = data;
    this.#writable = writable;
  }

  /** The image as it is now. */
  get bytes(): Uint8Array {
    return this.#data;
  }

  get length(): number {
    return this.#data.length;
  }

  preadv(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    this.reads++;
    let ret = 0;
    if (!Number.isSafeInteger(offset) || offset < 0) ret = -EIO;
    else {
      const have = Math.max(0, Math.min(qiov.size, this.#data.length - offset));
      qiov.fill(0, 0);
      if (have > 0) {
        const tmp = this.#data.slice(offset, offset + have);
        const padded = new Uint8Array(qiov.size);
        padded.set(tmp);
        qiov.copyFrom(addressOf(padded));
      }
    }
    this.#done(ret, cb);
  }

  pwritev(o: number, q: IoVector, cb: BlockCompletion): void {
    this.writes++;
    if (!this.#writable || !Number.isSafeInteger(o) || o < 0) return this.#done(-EIO, cb);
    const end = o + q.size;
    if (end > this.#data.length) {
      const grown = new Uint8Array(end);
      grown.set(this.#data);
      this.#data = grown;
    }
    const tmp = new Uint8Array(q.size);
    q.copyTo(addressOf(tmp));
    this.#data.set(tmp, o);
    this.#done(0, cb);
  }

  flush(cb: BlockCompletion): void {
    this.#done(0, cb);
  }

  pdiscard(o: number, b: number, cb: BlockCompletion): void {
    this.writes++;
    if (!this.#writable) return this.#done(-EIO, cb);
    this.#data.fill(0, o, Math.min(o + b, this.#data.length));
    this.#done(0, cb);
  }

  pwriteZeroes(_o: number, _b: number, _u: boolean, cb: BlockCompletion): void {
    this.writes++;
    this.#done(-EIO, cb);
  }

  ioPlug(): void {}
  ioUnplug(): void {}

  refreshLength(): number {
    return this.#data.length;
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  #done(ret: number, cb: BlockCompletion): void {
    this.inFlight++;
    this.#ctx.scheduleOneshot(() => {
      this.inFlight--;
      cb(ret);
    });
  }
}
