import { type AioContext, EventNotifier } from "../aio/mod.ts";
import {
  radosConfReadFile,
  radosConfSet,
  radosConnect,
  radosCreate,
  radosIoctxCreate,
  radosIoctxDestroy,
  radosShutdown,
  RBD_WRITE_ZEROES_FLAG_THICK_PROVISION,
  rbdAioCreateCompletion,
  rbdAioDiscard,
  rbdAioFlush,
  rbdAioGetArg,
  rbdAioGetReturnValue,
  rbdAioReadv,
  rbdAioRelease,
  rbdAioWritev,
  rbdAioWriteZeroes,
  rbdClose,
  rbdGetSize,
  rbdOpen,
  rbdPollIoEvents,
  rbdResize,
  rbdSetImageNotification,
  SysError,
} from "../sys/mod.ts";
import type { IoVector } from "./io_vector.ts";
import type { BlockCompletion, BlockDriver } from "./block_driver.ts";

/**
 * Options of {@link RbdDriver}: QEMU's blockdev-add rbd keys (pool,
 * namespace, image, conf, user) and the legacy filename's extra
 * configuration pairs.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { RbdDriverOptions } from "./rbd_driver.ts";
 * const o: RbdDriverOptions = { pool: "rbd", image: "vm1", conf: "/etc/ceph/ceph.conf" };
 * assert.equal(o.pool, "rbd");
 * ```
 */
export interface RbdDriverOptions {
  /** RADOS pool of the image. */
  pool: string;
  /** Image name. */
  image: string;
  /** RADOS namespace inside the pool (default none). */
  namespace?: string;
  /** ceph.conf path (default: librados' search path, errors ignored, as QEMU). */
  conf?: string;
  /** Client id without "client." (default admin). */
  user?: string;
  /** Open the image read-only (rbd_open_read_only). */
  readOnly?: boolean;
  /** Open this snapshot of the image (read-only; QEMU's `snapshot`). */
  snapshot?: string;
  /** More configuration options, set with rados_conf_set after the file. */
  confOptions?: Record<string, string>;
}

/** Most completions taken from librbd in one rbd_poll_io_events call. */
const POLL_BATCH = 64;

/**
 * The `rbd` protocol driver (QEMU block/rbd.c) over librbd. Requests go to
 * librbd as rbd_aio_* calls on the caller's own iovecs (no copy); each carries
 * a completion created without a callback, so no librbd thread ever enters
 * JavaScript: librbd writes an eventfd (rbd_set_image_notification) and the
 * AioContext's handler takes the finished completions with
 * rbd_poll_io_events, as QEMU's rbd driver once did, and while the context
 * busy-polls it looks for them without waiting for the eventfd. Completions
 * are therefore always delivered from the context, never inside the
 * submitting call. Connecting and opening run on a blocking thread
 * ({@link RbdDriver.open} returns a Promise). Flush is rbd_aio_flush;
 * discard rbd_aio_discard; write-zeroes rbd_aio_write_zeroes, thick
 * (allocated) unless unmapping is allowed.
 *
 * One driver is one cluster connection and one open image: each IOThread
 * opens its own, as it has its own driver stack.
 *
 * @example
 * ```ts ignore
 * import { AioContext } from "../aio/mod.ts";
 * import { RbdDriver } from "./rbd_driver.ts";
 * import { IoVector } from "./io_vector.ts";
 * const ctx = new AioContext();
 * const d = await RbdDriver.open(ctx, { pool: "rbd", image: "vm1", conf: "/etc/ceph/ceph.conf" });
 * let ret = 1;
 * d.preadv(0, IoVector.fromBuffers([new Uint8Array(4096)]), (r) => ret = r);
 * while (ret === 1) ctx.poll(true);
 * await d.close();
 * ctx.close();
 * ```
 */
export class RbdDriver implements BlockDriver {
  /** "rbd". */
  readonly name = "rbd";
  /** 1: librbd takes any offset. */
  readonly requestAlignment = 1;
  /** 1: librbd takes any buffer. */
  readonly memAlignment = 1;
  /** "pool/image" (or "pool/namespace/image"), for messages. */
  readonly spec: string;
  readonly #ctx: AioContext;
  readonly #cluster: Deno.PointerValue;
  readonly #io: Deno.PointerValue;
  readonly #image: Deno.PointerValue;
  readonly #notifier = new EventNotifier();
  /** Finished completions taken from librbd, not yet delivered: comps[#next..#taken). */
  readonly #comps = new BigUint64Array(POLL_BATCH);
  #taken = 0;
  #next = 0;
  /** Request slots: callback, and the slot's completion argument (pre-built bigint). */
  #cbs: (BlockCompletion | undefined)[] = [];
  #args: bigint[] = [];
  #free: number[] = [];
  #inFlight = 0;
  #length: number;
  #closed = false;

  private constructor(
    ctx: AioContext,
    spec: string,
    cluster: Deno.PointerValue,
    io: Deno.PointerValue,
    image: Deno.PointerValue,
  ) {
    this.#ctx = ctx;
    this.spec = spec;
    this.#cluster = cluster;
    this.#io = io;
    this.#image = image;
    this.#length = rbdGetSize(image);
    rbdSetImageNotification(image, this.#notifier.fd);
    ctx.setFdHandler(this.#notifier.fd, {
      read: () => {
        this.#notifier.testAndClear();
        this.#reap();
      },
      poll: () => this.#peek(),
      pollReady: () => this.#reap(),
    });
  }

  /**
   * Connects to the cluster (rados_create, conf file and options,
   * rados_connect), opens the pool's I/O context and the image. Throws a
   * {@link SysError} naming the step and the pool or image (ENOENT for a
   * missing pool or image, ETIMEDOUT when no monitor answers within
   * client_mount_timeout); everything opened so far is released.
   */
  static async open(ctx: AioContext, opts: RbdDriverOptions): Promise<RbdDriver> {
    const wait = <T>(p: Promise<T>) => offThread(ctx, p);
    const h = await rbdConnect(opts, wait);
    try {
      return new RbdDriver(ctx, h.spec, h.cluster, h.io, h.image);
    } catch (e) {
      await rbdDisconnect(h, wait);
      throw e;
    }
  }

  /** Size in bytes (rbd_get_size at open, and at {@link refreshLength}). */
  get length(): number {
    return this.#length;
  }

  /** Requests submitted and not yet completed. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Hot path: rbd_aio_readv into the caller's iovecs. */
  preadv(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    const slot = this.#slot(cb);
    const c = rbdAioCreateCompletion(this.#args[slot]);
    this.#submitted(slot, c, rbdAioReadv(this.#image, qiov.iov, qiov.niov, BigInt(offset), c));
  }

  /** Hot path: rbd_aio_writev from the caller's iovecs. */
  pwritev(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    const slot = this.#slot(cb);
    const c = rbdAioCreateCompletion(this.#args[slot]);
    this.#submitted(slot, c, rbdAioWritev(this.#image, qiov.iov, qiov.niov, BigInt(offset), c));
  }

  /** rbd_aio_flush. */
  flush(cb: BlockCompletion): void {
    const slot = this.#slot(cb);
    const c = rbdAioCreateCompletion(this.#args[slot]);
    this.#submitted(slot, c, rbdAioFlush(this.#image, c));
  }

  /** rbd_aio_discard. */
  pdiscard(offset: number, bytes: number, cb: BlockCompletion): void {
    const slot = this.#slot(cb);
    const c = rbdAioCreateCompletion(this.#args[slot]);
    this.#submitted(slot, c, rbdAioDiscard(this.#image, BigInt(offset), BigInt(bytes), c));
  }

  /** rbd_aio_write_zeroes; thick-provisioned unless `unmap` (as QEMU's qemu_rbd_co_pwrite_zeroes). */
  pwriteZeroes(offset: number, bytes: number, unmap: boolean, cb: BlockCompletion): void {
    const slot = this.#slot(cb);
    const c = rbdAioCreateCompletion(this.#args[slot]);
    const flags = unmap ? 0 : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION;
    this.#submitted(
      slot,
      c,
      rbdAioWriteZeroes(this.#image, BigInt(offset), BigInt(bytes), c, flags),
    );
  }

  /** librbd queues each request itself: nothing to batch. */
  ioPlug(): void {}

  /** Nothing to batch. */
  ioUnplug(): void {}

  /** Re-reads the size (rbd_get_size: librbd follows the image header). */
  refreshLength(): number {
    this.#length = rbdGetSize(this.#image);
    return this.#length;
  }

  /** Closes the image (rbd_close), the I/O context and the connection. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#ctx.setFdHandler(this.#notifier.fd, null);
    const h = { spec: this.spec, cluster: this.#cluster, io: this.#io, image: this.#image };
    try {
      await rbdDisconnect(h, (p) => offThread(this.#ctx, p));
    } finally {
      this.#notifier.close();
    }
  }

  /** Hot path: a free slot holding `cb` (the table grows to the deepest queue seen). */
  #slot(cb: BlockCompletion): number {
    let slot = this.#free.pop();
    if (slot === undefined) {
      slot = this.#cbs.length;
      this.#cbs.push(undefined);
      this.#args.push(BigInt(slot));
    }
    this.#cbs[slot] = cb;
    this.#inFlight++;
    return slot;
  }

  /** Hot path: a refused submission completes with its error from a one-shot BH. */
  #submitted(slot: number, c: bigint, ret: number): void {
    if (ret >= 0) return;
    rbdAioRelease(c);
    const cb = this.#cbs[slot]!;
    this.#release(slot);
    this.#ctx.scheduleOneshot(() => cb(ret));
  }

  #release(slot: number): void {
    this.#cbs[slot] = undefined;
    this.#free.push(slot);
    this.#inFlight--;
  }

  /** Busy-poll check: takes finished completions if there are any. Hot path. */
  #peek(): boolean {
    if (this.#next < this.#taken) return true;
    if (this.#inFlight === 0) return false;
    return this.#take() > 0;
  }

  #take(): number {
    const n = rbdPollIoEvents(this.#image, this.#comps);
    this.#next = 0;
    this.#taken = n > 0 ? n : 0;
    return this.#taken;
  }

  /**
   * Delivers every finished completion: the ones {@link #peek} took, then
   * batches from rbd_poll_io_events until librbd has no more. A callback
   * that polls the context re-enters here and continues with the same
   * batch (the indexes are fields). Hot path: no allocation.
   */
  #reap(): void {
    for (;;) {
      while (this.#next < this.#taken) {
        const c = this.#comps[this.#next++];
        const slot = rbdAioGetArg(c);
        const ret = rbdAioGetReturnValue(c);
        rbdAioRelease(c);
        const cb = this.#cbs[slot]!;
        this.#release(slot);
        cb(ret < 0 ? ret : 0);
      }
      if (this.#inFlight === 0 || this.#take() === 0) return;
    }
  }
}

/** An open image and what it hangs on. */
interface RbdHandles {
  spec: string;
  cluster: Deno.PointerValue;
  io: Deno.PointerValue;
  image: Deno.PointerValue;
}

/**
 * Connects and opens `opts`' image, awaiting each blocking-thread call
 * through `wait`; on failure releases what was opened and throws a
 * SysError naming the image.
 */
async function rbdConnect(
  opts: RbdDriverOptions,
  wait: <T>(p: Promise<T>) => Promise<T>,
): Promise<RbdHandles> {
  const spec = [opts.pool, opts.namespace, opts.image].filter((s) => s).join("/") +
    (opts.snapshot !== undefined ? `@${opts.snapshot}` : "");
  const cluster = radosCreate(opts.user ?? null);
  let io: Deno.PointerValue = null;
  try {
    if (opts.conf !== undefined) radosConfReadFile(cluster, opts.conf);
    else {
      try {
        radosConfReadFile(cluster, null);
      } catch (e) {
        if (!(e instanceof SysError)) throw e; // no default ceph.conf: options may suffice
      }
    }
    for (const [k, v] of Object.entries(opts.confOptions ?? {})) radosConfSet(cluster, k, v);
    await wait(radosConnect(cluster));
    io = radosIoctxCreate(cluster, opts.pool, opts.namespace ?? "");
    const image = await wait(rbdOpen(io, opts.image, opts.readOnly ?? false, opts.snapshot));
    return { spec, cluster, io, image };
  } catch (e) {
    if (io) radosIoctxDestroy(io);
    await wait(radosShutdown(cluster));
    if (e instanceof SysError && !e.message.includes(spec)) {
      const detail = e.message.split("): ").slice(1).join("): ");
      throw new SysError(e.call, e.errno, `${detail ? `${detail}, ` : ""}rbd image ${spec}`);
    }
    throw e;
  }
}

async function rbdDisconnect(
  h: RbdHandles,
  wait: <T>(p: Promise<T>) => Promise<T>,
): Promise<void> {
  try {
    await wait(rbdClose(h.image));
  } finally {
    radosIoctxDestroy(h.io);
    await wait(radosShutdown(h.cluster));
  }
}

/**
 * Resizes an rbd image (rbd_resize) through a connection of its own, for
 * the control plane (QMP block_resize): call it where Deno's event loop runs
 * (the main thread), not from inside an AioContext loop. Drivers that have
 * the image open see the new size at their next `refreshLength` (librbd
 * tells every open handle before rbd_resize returns).
 *
 * @example
 * ```ts ignore
 * import { resizeRbdImage } from "./rbd_driver.ts";
 * await resizeRbdImage({ pool: "rbd", image: "vm1", conf: "/etc/ceph/ceph.conf" }, 2 ** 30);
 * ```
 */
export async function resizeRbdImage(opts: RbdDriverOptions, size: number): Promise<void> {
  const wait = <T>(p: Promise<T>) => p;
  const h = await rbdConnect({ ...opts, readOnly: false }, wait);
  try {
    await rbdResize(h.image, size);
  } catch (e) {
    if (e instanceof SysError) throw new SysError(e.call, e.errno, `rbd image ${h.spec}`);
    throw e;
  } finally {
    await rbdDisconnect(h, wait);
  }
}

/** How often a context waiting for a blocking-thread call wakes up to look. */
const OFF_THREAD_TICK_NS = 1_000_000;

/**
 * Awaits a call that runs on a Deno blocking thread (connect, open, close)
 * from code driven by an AioContext: the result reaches this thread through
 * Deno's event loop, which an IOThread only visits between two `poll(true)`
 * calls, so a 1 ms timer keeps the context from sleeping past it. Set-up and
 * tear-down only; the data path never waits like this.
 */
async function offThread<T>(ctx: AioContext, p: Promise<T>): Promise<T> {
  const tick = ctx.timerNew(() => tick.modNs(ctx.now() + OFF_THREAD_TICK_NS));
  tick.modNs(ctx.now() + OFF_THREAD_TICK_NS);
  try {
    return await p;
  } finally {
    tick.del();
  }
}
