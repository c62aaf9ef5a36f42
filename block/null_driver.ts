import type { AioContext, BottomHalf } from "../aio/mod.ts";
import type { IoVector } from "./io_vector.ts";
import type { BlockCompletion, BlockDriver } from "./block_driver.ts";

/**
 * Options of {@link NullDriver} (QEMU's null-co / null-aio).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { NullDriverOptions } from "./null_driver.ts";
 * const o: NullDriverOptions = { size: 1 << 30, readZeroes: true };
 * assert(o.readZeroes);
 * ```
 */
export interface NullDriverOptions {
  /** Reported size in bytes (default 1 GiB, as QEMU). */
  size?: number;
  /** Reads fill the buffer with zeroes (default false: the buffer is left as is). */
  readZeroes?: boolean;
}

/**
 * QEMU's null-co: every request succeeds without doing I/O. Completions are
 * queued and delivered by one bottom half in the same context, so a caller is
 * never re-entered from inside its own submit call, and a batch of requests
 * costs one BH dispatch.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../aio/mod.ts";
 * import { NullCoDriver } from "./null_driver.ts";
 * import { IoVector } from "./io_vector.ts";
 * const ctx = new AioContext();
 * const d = new NullCoDriver(ctx, { size: 4096 });
 * let got = 1;
 * d.preadv(0, IoVector.fromBuffers([new Uint8Array(512)]), (r) => got = r);
 * assert.equal(got, 1); // not yet: completes from the BH
 * ctx.poll(false);
 * assert.equal(got, 0);
 * await d.close();
 * ctx.close();
 * ```
 */
export class NullCoDriver implements BlockDriver {
  /** "null-co". */
  readonly name: string = "null-co";
  /** Reported size. */
  readonly length: number;
  /** 1: any offset. */
  readonly requestAlignment = 1;
  /** 1: any buffer. */
  readonly memAlignment = 1;
  /** Whether reads zero the buffer (read-zeroes). */
  readonly readZeroes: boolean;
  readonly #bh: BottomHalf;
  /**
   * Queued completions: a growable ring, live between the absolute indexes
   * `#head` and `#tail`. The indexes are fields so that a nested run (a
   * callback that polls) shares them. No allocation once it has grown.
   */
  #cbs: (BlockCompletion | undefined)[] = new Array(16);
  #mask = 15;
  #head = 0;
  #tail = 0;
  /** Where the running batch ends (exclusive); nested runs extend it. */
  #end = 0;
  /** Completions inside the submitting call (setInlineCompletion). */
  #inline = false;

  constructor(ctx: AioContext, opts: NullDriverOptions = {}) {
    this.length = opts.size ?? 1 << 30;
    this.readZeroes = opts.readZeroes ?? false;
    this.#bh = ctx.bhNew(() => this.#run(), "null-co");
  }

  /** Hot path: optionally zeroes `qiov`, completes from the BH. */
  preadv(_offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (this.readZeroes) qiov.fill(0, 0);
    this.#complete(cb);
  }

  /** Hot path: completes from the BH. */
  pwritev(_offset: number, _qiov: IoVector, cb: BlockCompletion): void {
    this.#complete(cb);
  }

  /** Completes from the BH. */
  flush(cb: BlockCompletion): void {
    this.#complete(cb);
  }

  /** Completes from the BH. */
  pdiscard(_offset: number, _bytes: number, cb: BlockCompletion): void {
    this.#complete(cb);
  }

  /** Completes from the BH. */
  pwriteZeroes(_offset: number, _bytes: number, _unmap: boolean, cb: BlockCompletion): void {
    this.#complete(cb);
  }

  /**
   * On: every request completes inside its submitting call, as QEMU's
   * null-co does in the request's coroutine (no BH round between the
   * submission and the completion). Off (the default): from the BH.
   */
  setInlineCompletion(on: boolean): boolean {
    this.#inline = on;
    return on;
  }

  /** Nothing to batch. */
  ioPlug(): void {}

  /** Nothing to batch. */
  ioUnplug(): void {}

  /** The size never changes. */
  refreshLength(): number {
    return this.length;
  }

  /** Deletes the BH. */
  close(): Promise<void> {
    this.#bh.delete();
    return Promise.resolve();
  }

  /** Hot path: calls `cb` (inline) or queues it and schedules the BH (a no-op when scheduled). */
  #complete(cb: BlockCompletion): void {
    if (this.#inline) return cb(0);
    if (this.#tail - this.#head > this.#mask) this.#grow();
    this.#cbs[this.#tail++ & this.#mask] = cb;
    this.#bh.schedule();
  }

  /** Doubles the ring, rebasing the indexes (and the running batch's end) to 0. */
  #grow(): void {
    const n = (this.#mask + 1) * 2;
    const cbs: (BlockCompletion | undefined)[] = new Array(n);
    for (let k = 0, j = this.#head; j < this.#tail; j++, k++) cbs[k] = this.#cbs[j & this.#mask];
    this.#end = this.#end > this.#head ? this.#end - this.#head : 0;
    this.#tail -= this.#head;
    this.#head = 0;
    this.#cbs = cbs;
    this.#mask = n - 1;
  }

  /**
   * Runs the completions queued so far; ones queued meanwhile wait for the
   * next run (their #complete scheduled the BH again). Nest-safe like
   * aio_bh_poll: a callback that polls nested runs the rest of this batch and
   * what was queued since, in order, and this run then finds them gone.
   * Hot path: no allocation.
   */
  #run(): void {
    this.#end = this.#tail;
    while (this.#head < this.#end) {
      const i = this.#head++ & this.#mask;
      const cb = this.#cbs[i]!;
      this.#cbs[i] = undefined;
      cb(0);
    }
    if (this.#head === this.#tail) this.#head = this.#tail = this.#end = 0;
  }
}

/**
 * QEMU's null-aio: like null-co, but each request is an AIOCB completed by its
 * own bottom half (pooled: one BH per concurrently pending request, reused).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../aio/mod.ts";
 * import { NullAioDriver } from "./null_driver.ts";
 * import { IoVector } from "./io_vector.ts";
 * const ctx = new AioContext();
 * const d = new NullAioDriver(ctx, { readZeroes: true });
 * const buf = new Uint8Array([1, 2]);
 * let got = 1;
 * d.preadv(0, IoVector.fromBuffers([buf]), (r) => got = r);
 * ctx.poll(false);
 * assert.equal(got, 0);
 * assert.equal(buf[0], 0);
 * await d.close();
 * ctx.close();
 * ```
 */
export class NullAioDriver extends NullCoDriver {
  /** "null-aio". */
  override readonly name: string = "null-aio";
  readonly #ctx: AioContext;
  readonly #free: NullAiocb[] = [];
  readonly #all: NullAiocb[] = [];

  constructor(ctx: AioContext, opts: NullDriverOptions = {}) {
    super(ctx, opts);
    this.#ctx = ctx;
  }

  /** Never inline: null-aio completes every request from its own BH, as QEMU's. */
  override setInlineCompletion(_on: boolean): boolean {
    return false;
  }

  /** Hot path: one pooled AIOCB and its BH. */
  override pwritev(_offset: number, _qiov: IoVector, cb: BlockCompletion): void {
    this.#aiocb(cb);
  }

  /** Completes from the request's BH. */
  override flush(cb: BlockCompletion): void {
    this.#aiocb(cb);
  }

  /** Completes from the request's BH. */
  override pdiscard(_offset: number, _bytes: number, cb: BlockCompletion): void {
    this.#aiocb(cb);
  }

  /** Completes from the request's BH. */
  override pwriteZeroes(_o: number, _b: number, _u: boolean, cb: BlockCompletion): void {
    this.#aiocb(cb);
  }

  /** Hot path: optionally zeroes, then completes from the request's BH. */
  override preadv(_offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (this.readZeroes) qiov.fill(0, 0);
    this.#aiocb(cb);
  }

  /** Deletes every BH. */
  override async close(): Promise<void> {
    for (const a of this.#all) a.bh.delete();
    await super.close();
  }

  #aiocb(cb: BlockCompletion): void {
    let a = this.#free.pop();
    if (!a) {
      const n = new NullAiocb();
      n.bh = this.#ctx.bhNew(() => {
        const c = n.cb!;
        n.cb = null;
        this.#free.push(n);
        c(0);
      }, "null-aio");
      this.#all.push(n);
      a = n;
    }
    a.cb = cb;
    a.bh.schedule();
  }
}

class NullAiocb {
  cb: BlockCompletion | null = null;
  bh!: BottomHalf;
}
