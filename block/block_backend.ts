import type { AioContext } from "../aio/mod.ts";
import { EINVAL, EIO, EROFS, viewAt } from "../sys/mod.ts";
import type { IoVector } from "./io_vector.ts";
import type { BlockCompletion, BlockDriver } from "./block_driver.ts";
import type { IoEngine } from "./io_engine.ts";
import { type BlockOptions, validateBlockOptions } from "./block_options.ts";
import { FileDriver } from "./file_driver.ts";
import { NullAioDriver, NullCoDriver } from "./null_driver.ts";
import { RawDriver } from "./raw_driver.ts";
import { RbdDriver } from "./rbd_driver.ts";
import type { RangeLockTable } from "./range_lock_table.ts";
import { THROTTLE_GROUP_BYTES, ThrottleGroup } from "./throttle/throttle_group.ts";

/**
 * Callbacks a device registers on its BlockBackend (QEMU's BlockDevOps):
 * `drainedBegin` stops taking new requests (detach host notifiers),
 * `drainedEnd` resumes (re-attach and kick), `resize` reports a new length.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { BlockDevOps } from "./block_backend.ts";
 * let paused = false;
 * const ops: BlockDevOps = { drainedBegin: () => paused = true, drainedEnd: () => paused = false };
 * ops.drainedBegin!();
 * assert(paused);
 * ```
 */
export interface BlockDevOps {
  drainedBegin?(): void;
  drainedEnd?(): void;
  resize?(): void;
}

/**
 * Extra, non-QEMU knobs of {@link BlockBackend.open} for tests and benchmarks.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { BlockBackendExtras } from "./block_backend.ts";
 * const x: BlockBackendExtras = {};
 * assert.equal(x.engine, undefined);
 * ```
 */
export interface BlockBackendExtras {
  /** Use this engine for the file driver instead of the context's shared one. */
  engine?: IoEngine;
  /**
   * The range-lock table shared by every driver of this image (one per
   * IOThread): read-modify-write cycles are serialised across all of them.
   * Without one, the file driver serialises only its own requests.
   */
  rangeLocks?: RangeLockTable;
  /**
   * A writable qcow2 image served by several IOThreads: the
   * Qcow2SharedState memory every thread's driver of it attaches to.
   */
  qcow2Shared?: SharedArrayBuffer;
  /**
   * A throttle group every driver of this image joins (the short host's
   * `--throttle`, one group over all its IOThreads): the filter goes on top.
   */
  throttleGroup?: ThrottleGroup;
}

/** A request object recycled through the backend's pool (hot path: no closures). */
class BackendRequest {
  cb: BlockCompletion | null = null;
  readonly done: BlockCompletion;

  constructor(blk: BlockBackend, release: (r: BackendRequest) => void) {
    this.done = (ret: number) => {
      const cb = this.cb!;
      this.cb = null;
      release(this);
      try {
        cb(ret);
      } finally {
        blk.decInFlight();
      }
    };
  }
}

const OP_READ = 0, OP_WRITE = 1;

/**
 * What a device talks to (QEMU's BlockBackend, block/block-backend.c): range
 * and permission checks, the in-flight counter, plug/unplug batching, drained
 * sections, and the cache/discard/detect-zeroes policies, over a driver graph
 * (raw format over file | null-co | null-aio).
 *
 * Callback forms (`aio*`) are the hot path: the request object is pooled and
 * the caller's IoVector must stay alive until `cb(ret)` (0 or -errno). They
 * never call `cb` before returning. Promise forms resolve with the same code.
 * Completions arrive only while the AioContext is polled (an IOThread's loop,
 * or `ctx.poll()` in tests).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../aio/mod.ts";
 * import { BlockBackend } from "./block_backend.ts";
 * import { IoVector } from "./io_vector.ts";
 * const ctx = new AioContext();
 * const blk = await BlockBackend.open(ctx, { driver: "null-co", size: 1 << 20, readZeroes: true });
 * const buf = new Uint8Array(4096).fill(7);
 * let ret = 1;
 * blk.aioPreadv(0, IoVector.fromBuffers([buf]), (r) => ret = r);
 * while (blk.inFlight > 0) ctx.poll(true);
 * assert.equal(ret, 0);
 * assert.equal(buf[0], 0);
 * await blk.close();
 * ctx.close();
 * ```
 */
export class BlockBackend {
  /** The context completions are delivered in. */
  readonly ctx: AioContext;
  /** The top of the driver graph. */
  readonly driver: BlockDriver;
  /** Writes, discards and write-zeroes fail with -EROFS. */
  readonly readOnly: boolean;
  readonly #noFlush: boolean;
  readonly #discard: boolean;
  readonly #detectZeroes: "off" | "on" | "unmap";
  readonly #pool: BackendRequest[] = [];
  readonly #release = (r: BackendRequest) => this.#pool.push(r);
  #inFlight = 0;
  #quiesce = 0;
  #queued: (() => void)[] = [];
  #idle: (() => void)[] = [];
  #devOps: BlockDevOps | null = null;
  #closed = false;

  /** Wraps an already built driver graph; most callers use {@link BlockBackend.open}. */
  constructor(ctx: AioContext, driver: BlockDriver, opts: Partial<BlockOptions> = {}) {
    this.ctx = ctx;
    this.driver = driver;
    this.readOnly = opts.readOnly ?? false;
    this.#noFlush = opts.cache === "unsafe";
    this.#discard = opts.discard === "unmap";
    this.#detectZeroes = opts.detectZeroes ?? "off";
  }

  /**
   * Builds the graph for `opts`: raw (with the optional offset/sizeLimit
   * window) over file (cache=none -> O_DIRECT; aio engine), null-co/null-aio
   * or rbd (librbd; connecting and opening settle asynchronously);
   * or qcow2 over file, with its backing chain (files opened read-only with
   * the same cache and aio); or raw over nbd (an NBD client: the handshake
   * runs in `ctx`). aio=native requires cache=none, as in QEMU.
   * Opening qcow2 reads metadata: poll the context until this settles (an
   * IOThread's loop does; on the main thread use `pollAsync`).
   *
   * The qcow2, nbd and throttle drivers are imported when a graph first
   * needs them (dynamic `import()` through `ctx.waitEventLoop`), so a
   * thread that serves raw files never compiles them: each module a V8
   * isolate loads stays resident in it (main thread and every IOThread).
   */
  static open(
    ctx: AioContext,
    opts: BlockOptions,
    extras: BlockBackendExtras = {},
  ): Promise<BlockBackend> {
    validateBlockOptions(opts as unknown as Record<string, unknown>);
    let proto: BlockDriver;
    if (opts.driver === "file" && opts.aio === "native" && opts.cache !== "none") {
      throw new TypeError("aio=native requires cache=none (O_DIRECT), as in QEMU");
    }
    const openFile = (filename: string, readOnly: boolean, top: boolean) =>
      FileDriver.open(ctx, {
        filename,
        direct: opts.cache === "none",
        aio: opts.aio ?? "threads",
        readOnly,
        discardUnmap: opts.discard === "unmap",
        engine: extras.engine,
        rangeLocks: top ? extras.rangeLocks : undefined,
      });
    if (opts.format === "qcow2") {
      const top = opts.filename!;
      return ctx.waitEventLoop(import("./qcow2/image_chain.ts")).then(({ openQcow2Image }) =>
        openQcow2Image(ctx, top, {
          readOnly: opts.readOnly ?? false,
          l2CacheSize: opts.l2CacheSize,
          openFile: (path, readOnly) => openFile(path, readOnly, path === top),
          shared: extras.qcow2Shared,
        })
      ).then(async (d) =>
        new BlockBackend(ctx, await BlockBackend.#filter(ctx, d, opts, extras), opts)
      );
    }
    if (opts.driver === "nbd") {
      // Connects and negotiates in the context; a read-only export makes a read-only backend.
      return ctx.waitEventLoop(import("./nbd/nbd_driver.ts")).then(({ NbdDriver }) =>
        NbdDriver.open(ctx, {
          server: opts.server!,
          exportName: opts.exportName,
          reconnectDelay: opts.reconnectDelay,
        })
      ).then((nbd) =>
        BlockBackend.#rawOver(
          ctx,
          nbd,
          { ...opts, readOnly: opts.readOnly || nbd.readOnly },
          extras,
        )
      );
    }
    if (opts.driver === "rbd") {
      return RbdDriver.open(ctx, {
        pool: opts.pool!,
        image: opts.image!,
        namespace: opts.namespace,
        conf: opts.conf,
        user: opts.user,
        snapshot: opts.snapshot,
        readOnly: opts.readOnly,
        confOptions: opts.rbdConf,
      }).then((d) =>
        // A snapshot is read-only whatever was asked (QEMU's auto-read-only for rbd snapshots).
        BlockBackend.#rawOver(ctx, d, opts.snapshot ? { ...opts, readOnly: true } : opts, extras)
      );
    }
    if (opts.driver === "file") {
      proto = openFile(opts.filename!, opts.readOnly ?? false, true);
    } else if (opts.driver === "null-co") {
      proto = new NullCoDriver(ctx, { size: opts.size, readZeroes: opts.readZeroes });
    } else {
      proto = new NullAioDriver(ctx, { size: opts.size, readZeroes: opts.readZeroes });
    }
    return BlockBackend.#rawOver(ctx, proto, opts, extras);
  }

  /**
   * driver=throttle on top of the graph (QEMU's throttle filter node) when
   * the options name a group: a member of the group whose state the daemon
   * mapped at opts.throttle.addr, or of the host's `--throttle` group
   * (extras.throttleGroup). Otherwise `d` itself.
   */
  static async #filter(
    ctx: AioContext,
    d: BlockDriver,
    opts: BlockOptions,
    extras: BlockBackendExtras,
  ): Promise<BlockDriver> {
    if (extras.throttleGroup === undefined && opts.throttle === undefined) return d;
    const { ThrottleDriver } = await ctx.waitEventLoop(import("./throttle/throttle_driver.ts"));
    if (extras.throttleGroup !== undefined) return new ThrottleDriver(ctx, d, extras.throttleGroup);
    return new ThrottleDriver(
      ctx,
      d,
      new ThrottleGroup(viewAt(opts.throttle!.addr, THROTTLE_GROUP_BYTES)),
    );
  }

  /** The raw format (with its window) over `proto`; closes `proto` if that fails. */
  static #rawOver(
    ctx: AioContext,
    proto: BlockDriver,
    opts: BlockOptions,
    extras: BlockBackendExtras,
  ): Promise<BlockBackend> {
    let top: BlockDriver;
    try {
      top = new RawDriver(proto, { offset: opts.offset, size: opts.sizeLimit });
    } catch (e) {
      return proto.close().then(() => Promise.reject(e));
    }
    return BlockBackend.#filter(ctx, top, opts, extras).then((d) => new BlockBackend(ctx, d, opts));
  }

  /** Size in bytes. */
  get length(): number {
    return this.driver.length;
  }

  /** Offset/length alignment that avoids bounce buffers (1 for cached files and null). */
  get requestAlignment(): number {
    return this.driver.requestAlignment;
  }

  /** Buffer alignment that avoids bounce buffers. */
  get memAlignment(): number {
    return this.driver.memAlignment;
  }

  /** Requests accepted and not completed yet. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Whether a drained section is open. */
  get quiesced(): boolean {
    return this.#quiesce > 0;
  }

  /**
   * Allows (on) or forbids (off, the default) completion callbacks from
   * inside the submitting call, for a caller whose callbacks are safe to run
   * there (the virtio-blk dataplane, like QEMU's coroutine-based exports).
   * Only drivers that can finish at once use it (null-co). Returns whether
   * completions may now be inline.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "../aio/mod.ts";
   * import { BlockBackend, IoVector } from "./mod.ts";
   * const ctx = new AioContext();
   * const blk = await BlockBackend.open(ctx, { driver: "null-co", size: 1 << 20 });
   * assert.equal(blk.setInlineCompletion(true), true);
   * let ret = 1;
   * blk.aioPreadv(0, IoVector.fromBuffers([new Uint8Array(512)]), (r) => ret = r);
   * assert.equal(ret, 0); // completed before aioPreadv returned
   * await blk.close();
   * ctx.close();
   * ```
   */
  setInlineCompletion(on: boolean): boolean {
    return this.driver.setInlineCompletion?.(on) ?? false;
  }

  /** Reads `qiov.size` bytes at `offset`. Hot path: no allocation. */
  aioPreadv(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (!this.#inRange(offset, qiov.size)) return this.#fail(-EINVAL, cb);
    if (this.#quiesce > 0) return this.#defer(OP_READ, offset, qiov, cb);
    this.#inFlight++;
    this.driver.preadv(offset, qiov, this.#req(cb));
  }

  /** Writes `qiov` at `offset`. Hot path: no allocation (unless detect-zeroes is on). */
  aioPwritev(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (this.readOnly) return this.#fail(-EROFS, cb);
    if (!this.#inRange(offset, qiov.size)) return this.#fail(-EINVAL, cb);
    if (this.#quiesce > 0) return this.#defer(OP_WRITE, offset, qiov, cb);
    if (this.#detectZeroes !== "off" && qiov.size > 0 && isZero(qiov)) {
      const unmap = this.#detectZeroes === "unmap" && this.#discard;
      this.#inFlight++;
      this.driver.pwriteZeroes(offset, qiov.size, unmap, this.#req(cb));
      return;
    }
    this.#inFlight++;
    this.driver.pwritev(offset, qiov, this.#req(cb));
  }

  /** Flushes (a no-op under cache=unsafe). */
  aioFlush(cb: BlockCompletion): void {
    if (this.#noFlush) return this.#fail(0, cb);
    if (this.#quiesce > 0) {
      this.#queued.push(() => this.aioFlush(cb));
      return;
    }
    this.#inFlight++;
    this.driver.flush(this.#req(cb));
  }

  /** Discards a range (a successful no-op under discard=ignore). */
  aioPdiscard(offset: number, bytes: number, cb: BlockCompletion): void {
    if (this.readOnly) return this.#fail(-EROFS, cb);
    if (!this.#inRange(offset, bytes)) return this.#fail(-EINVAL, cb);
    if (!this.#discard) return this.#fail(0, cb);
    if (this.#quiesce > 0) {
      this.#queued.push(() => this.aioPdiscard(offset, bytes, cb));
      return;
    }
    this.#inFlight++;
    this.driver.pdiscard(offset, bytes, this.#req(cb));
  }

  /** Makes a range read as zeroes; `unmap` may deallocate it (only with discard=unmap). */
  aioPwriteZeroes(offset: number, bytes: number, unmap: boolean, cb: BlockCompletion): void {
    if (this.readOnly) return this.#fail(-EROFS, cb);
    if (!this.#inRange(offset, bytes)) return this.#fail(-EINVAL, cb);
    if (this.#quiesce > 0) {
      this.#queued.push(() => this.aioPwriteZeroes(offset, bytes, unmap, cb));
      return;
    }
    this.#inFlight++;
    this.driver.pwriteZeroes(offset, bytes, unmap && this.#discard, this.#req(cb));
  }

  /** Promise form of {@link aioPreadv}: resolves with 0 or -errno. */
  preadv(offset: number, qiov: IoVector): Promise<number> {
    return new Promise((resolve) => this.aioPreadv(offset, qiov, resolve));
  }

  /** Promise form of {@link aioPwritev}. */
  pwritev(offset: number, qiov: IoVector): Promise<number> {
    return new Promise((resolve) => this.aioPwritev(offset, qiov, resolve));
  }

  /** Promise form of {@link aioFlush}. */
  flush(): Promise<number> {
    return new Promise((resolve) => this.aioFlush(resolve));
  }

  /** Promise form of {@link aioPdiscard}. */
  pdiscard(offset: number, bytes: number): Promise<number> {
    return new Promise((resolve) => this.aioPdiscard(offset, bytes, resolve));
  }

  /** Promise form of {@link aioPwriteZeroes}. */
  pwriteZeroes(offset: number, bytes: number, unmap = false): Promise<number> {
    return new Promise((resolve) => this.aioPwriteZeroes(offset, bytes, unmap, resolve));
  }

  /** Starts a batch (blk_io_plug): submissions wait for the matching unplug. */
  ioPlug(): void {
    this.driver.ioPlug();
  }

  /** Ends a batch: submits everything queued since the plug in one go. */
  ioUnplug(): void {
    this.driver.ioUnplug();
  }

  /** Registers the device's callbacks. */
  setDevOps(ops: BlockDevOps | null): void {
    this.#devOps = ops;
  }

  /**
   * Opens a drained section (bdrv_drained_begin): the device is told to stop
   * submitting; requests that still arrive are held until drainedEnd. Nests.
   */
  drainedBegin(): void {
    if (this.#quiesce++ === 0) {
      this.#devOps?.drainedBegin?.();
      this.driver.releaseHeld?.(); // a throttle filter's queue would hold the drain
    }
  }

  /**
   * Sends on at once what a filter holds back (throttled requests): the
   * dataplane calls it when it stops a queue and waits for its requests.
   */
  releaseHeld(): void {
    this.driver.releaseHeld?.();
  }

  /** Closes a drained section; the outermost one resumes held requests. */
  drainedEnd(): void {
    if (this.#quiesce === 0) throw new Error("BlockBackend.drainedEnd without drainedBegin");
    if (--this.#quiesce > 0) return;
    this.#devOps?.drainedEnd?.();
    const q = this.#queued;
    this.#queued = [];
    for (const f of q) f();
  }

  /** Resolves once no request is in flight (the context must be polled meanwhile). */
  waitIdle(): Promise<void> {
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idle.push(resolve));
  }

  /** blk_drain: drainedBegin, wait for in-flight requests, drainedEnd. */
  async drain(): Promise<void> {
    this.drainedBegin();
    try {
      await this.waitIdle();
    } finally {
      this.drainedEnd();
    }
  }

  /** Re-reads the image size; calls the device's `resize` when it changed. */
  refreshLength(): number {
    const before = this.driver.length;
    const after = this.driver.refreshLength();
    if (after !== before) this.#devOps?.resize?.();
    return after;
  }

  /** Drains, then closes the driver graph. Later requests fail with -EIO. */
  async close(): Promise<void> {
    if (this.#closed) return;
    await this.drain();
    this.#closed = true;
    await this.driver.close();
  }

  /** @internal Called by pooled requests after the callback ran. */
  decInFlight(): void {
    if (--this.#inFlight === 0 && this.#idle.length > 0) {
      const w = this.#idle;
      this.#idle = [];
      for (const f of w) f();
    }
  }

  #req(cb: BlockCompletion): BlockCompletion {
    const r = this.#pool.pop() ?? new BackendRequest(this, this.#release);
    r.cb = cb;
    return r.done;
  }

  #inRange(offset: number, bytes: number): boolean {
    return Number.isSafeInteger(offset) && Number.isSafeInteger(bytes) && offset >= 0 &&
      bytes >= 0 && offset + bytes <= this.driver.length && !this.#closed;
  }

  /** Completes with `ret` from a bottom half (never re-entering the caller). */
  #fail(ret: number, cb: BlockCompletion): void {
    if (this.#closed) ret = ret === 0 ? 0 : -EIO;
    this.#inFlight++;
    this.ctx.scheduleOneshot(() => {
      try {
        cb(ret);
      } finally {
        this.decInFlight();
      }
    });
  }

  #defer(op: number, offset: number, qiov: IoVector, cb: BlockCompletion): void {
    this.#queued.push(() =>
      op === OP_READ ? this.aioPreadv(offset, qiov, cb) : this.aioPwritev(offset, qiov, cb)
    );
  }
}

/** Whether every byte of `qiov` is zero (detect-zeroes; allocates views). */
function isZero(qiov: IoVector): boolean {
  for (let i = 0; i < qiov.niov; i++) {
    const len = qiov.len(i);
    if (len === 0) continue;
    const buf = viewAt(qiov.base(i), len);
    const words = new Uint32Array(buf, 0, len >>> 2);
    for (let j = 0; j < words.length; j++) if (words[j] !== 0) return false;
    const bytes = new Uint8Array(buf);
    for (let k = words.length * 4; k < len; k++) if (bytes[k] !== 0) return false;
  }
  return true;
}
