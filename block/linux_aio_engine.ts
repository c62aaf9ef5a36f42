import type { AioContext, ThreadPool } from "../aio/mod.ts";
import { EventNotifier } from "../aio/mod.ts";
import {
  addressOf,
  AioRing,
  EAGAIN,
  IO_EVENT,
  IOCB_CMD_PREADV,
  IOCB_CMD_PWRITEV,
  IocbArray,
  ioDestroy,
  ioGetevents,
  ioSetup,
  ioSubmit,
} from "../sys/mod.ts";
import type { IoVector } from "./io_vector.ts";
import type { BlockCompletion } from "./block_driver.ts";
import type { IoEngine, IoEngineKind, IoEngineStats } from "./io_engine.ts";
import { OP_READ, OP_WRITE, RequestSlots, SlotFifo } from "./request_slots.ts";
import { acquireThreadPool, releaseThreadPool } from "./thread_pool_registry.ts";

/**
 * Options of {@link LinuxAioEngine}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { LinuxAioOptions } from "./linux_aio_engine.ts";
 * const o: LinuxAioOptions = { maxEvents: 2 }; // tiny queue: exercises the pending path
 * assert.equal(o.maxEvents, 2);
 * ```
 */
export interface LinuxAioOptions {
  /** io_setup size and the most requests in the kernel at once (default 128). */
  maxEvents?: number;
  /** Under plug, submit as soon as this many are queued (default 32). */
  maxBatch?: number;
  /**
   * io_setup size when it should differ from maxEvents (tests: a context
   * smaller than maxEvents makes the kernel answer EAGAIN).
   */
  contextSize?: number;
  /** Reap from the user-space aio_ring (default true); false uses io_getevents. */
  useRing?: boolean;
}

/**
 * aio=native: Linux AIO in the manner of QEMU's block/linux-aio.c. One io
 * context per AioContext; completions are signalled on an eventfd
 * (IOCB_FLAG_RESFD) that the AioContext watches, and reaped by reading the
 * kernel's aio_ring in user space (io_getevents when the ring is not
 * readable). Requests are queued and submitted in batches under plug/unplug;
 * when the kernel is full (EAGAIN, partial submit, or `maxEvents` in flight)
 * they wait in a pending queue and go out as completions free room: nothing
 * fails for lack of room. Linux AIO has no usable fdatasync/fallocate, so those
 * run on the context's ThreadPool.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../aio/mod.ts";
 * import { LinuxAioEngine } from "./linux_aio_engine.ts";
 * const ctx = new AioContext();
 * const e = new LinuxAioEngine(ctx, { maxEvents: 8 });
 * assert.equal(e.kind, "native");
 * assert(e.usesRing);
 * await e.close();
 * ctx.close();
 * ```
 */
export class LinuxAioEngine implements IoEngine {
  /** Always "native". */
  readonly kind: IoEngineKind = "native";
  /** Counters. */
  readonly stats: IoEngineStats = { submitCalls: 0, submitted: 0, completed: 0, queued: 0 };
  readonly #ctx: AioContext;
  readonly #ioctx: bigint;
  readonly #ring: AioRing | null;
  readonly #notifier = new EventNotifier();
  readonly #maxEvents: number;
  readonly #maxBatch: number;
  readonly #iocbs: IocbArray;
  readonly #ptrs: bigint;
  readonly #events: Uint8Array<ArrayBuffer>;
  readonly #events32: Uint32Array;
  readonly #eventsAddr: bigint;
  readonly #zeroTimeout = new BigInt64Array(2);
  readonly #zeroTimeoutAddr: bigint;
  /**
   * Events io_getevents stored in #events not yet completed: `[#evHead,
   * #evCount)`. Fields, so a nested reap (a callback that polls) completes the
   * outer one's remaining events before it overwrites the array.
   */
  #evHead = 0;
  #evCount = 0;
  readonly #slots = new RequestSlots();
  readonly #pending = new SlotFifo(64);
  /** Requests io_submit refused, and their -errno: completed from #failBh. */
  readonly #failed = new SlotFifo(8);
  readonly #failedRet = new SlotFifo(8);
  readonly #retryBh;
  readonly #failBh;
  #inKernel = 0;
  #plugged = 0;
  #blocked = false;
  #threadPool: ThreadPool | null = null;
  #closed = false;

  constructor(ctx: AioContext, opts: LinuxAioOptions = {}) {
    this.#ctx = ctx;
    this.#maxEvents = opts.maxEvents ?? 128;
    this.#maxBatch = opts.maxBatch ?? (ctx.aioMaxBatch > 0 ? ctx.aioMaxBatch : 32);
    this.#ioctx = ioSetup(opts.contextSize ?? this.#maxEvents);
    this.#ring = opts.useRing === false ? null : AioRing.open(this.#ioctx);
    this.#iocbs = new IocbArray(this.#maxEvents);
    this.#ptrs = BigInt(this.#iocbs.ptrsAddr);
    this.#events = new Uint8Array(this.#maxEvents * IO_EVENT.size);
    this.#events32 = new Uint32Array(this.#events.buffer);
    this.#eventsAddr = BigInt(addressOf(this.#events));
    this.#zeroTimeoutAddr = BigInt(addressOf(this.#zeroTimeout));
    this.#retryBh = ctx.bhNew(() => this.#submit(), "linux-aio-retry");
    this.#failBh = ctx.bhNew(() => this.#completeFailed(), "linux-aio-fail");
    const onEvent = () => {
      this.#notifier.testAndClear();
      this.#processCompletions();
    };
    ctx.setFdHandler(this.#notifier.fd, {
      read: onEvent,
      poll: () => this.#ring !== null && this.#ring.head !== this.#ring.tail,
      pollReady: () => this.#processCompletions(),
    });
  }

  /** Whether completions are reaped from the user-space aio_ring. */
  get usesRing(): boolean {
    return this.#ring !== null;
  }

  /** Requests accepted by the engine and not yet completed. */
  get inFlight(): number {
    return this.#slots.inUse;
  }

  /** Hot path: queues an IOCB_CMD_PREADV. */
  preadv(fd: number, qiov: IoVector, offset: number, cb: BlockCompletion): void {
    this.#enqueue(this.#slots.alloc(OP_READ, fd, qiov, offset, qiov.size, 0, cb));
  }

  /** Hot path: queues an IOCB_CMD_PWRITEV. */
  pwritev(fd: number, qiov: IoVector, offset: number, cb: BlockCompletion): void {
    this.#enqueue(this.#slots.alloc(OP_WRITE, fd, qiov, offset, qiov.size, 0, cb));
  }

  /** fdatasync on the thread pool (Linux AIO cannot do it here). */
  fdatasync(fd: number, cb: BlockCompletion): void {
    this.#pool().submitFdatasync(fd, (ret: number) => cb(ret < 0 ? ret : 0));
  }

  /** fallocate on the thread pool. */
  fallocate(fd: number, mode: number, offset: number, len: number, cb: BlockCompletion): void {
    this.#pool().submitFallocate(fd, mode, offset, len, (ret: number) => cb(ret < 0 ? ret : 0));
  }

  /** Starts a batch (laio_io_plug). */
  plug(): void {
    this.#plugged++;
  }

  /** Ends a batch: the outermost unplug submits the queue (laio_io_unplug). */
  unplug(): void {
    if (this.#plugged > 0 && --this.#plugged === 0 && !this.#blocked && this.#pending.length) {
      this.#submit();
    }
  }

  /** Destroys the io context; requests must have completed. */
  async close(): Promise<void> {
    if (this.#closed) return;
    if (this.#slots.inUse > 0) throw new Error("LinuxAioEngine.close: requests in flight");
    this.#closed = true;
    this.#ctx.setFdHandler(this.#notifier.fd, null);
    this.#retryBh.delete();
    this.#failBh.delete();
    ioDestroy(this.#ioctx);
    this.#notifier.close();
    if (this.#threadPool) await releaseThreadPool(this.#ctx);
  }

  #pool(): ThreadPool {
    return this.#threadPool ??= acquireThreadPool(this.#ctx);
  }

  #enqueue(slot: number): void {
    this.#pending.push(slot);
    if (this.#blocked) {
      this.stats.queued++;
      return;
    }
    if (this.#plugged === 0 || this.#pending.length >= this.#maxBatch) this.#submit();
  }

  /** ioq_submit: hands pending iocbs to the kernel, as many as fit. */
  #submit(): void {
    const s = this.#slots, iocbs = this.#iocbs, pending = this.#pending;
    const resfd = this.#notifier.fd;
    while (pending.length > 0) {
      const room = this.#maxEvents - this.#inKernel;
      if (room <= 0) break;
      const n = pending.length < room ? pending.length : room;
      for (let k = 0; k < n; k++) {
        const slot = pending.peek(k);
        const q = s.qiov[slot]!;
        iocbs.prepare(
          k,
          s.op[slot] === OP_READ ? IOCB_CMD_PREADV : IOCB_CMD_PWRITEV,
          s.fd[slot],
          q.iovAddr,
          q.niov,
          s.offset[slot],
          slot,
          resfd,
        );
        iocbs.setPointer(k, k);
      }
      const ret = ioSubmit(this.#ioctx, n, this.#ptrs);
      this.stats.submitCalls++;
      if (ret === -EAGAIN) break;
      if (ret < 0) {
        // Fail the first request and retry the rest (as QEMU's ioq_submit),
        // but complete it later: this may run inside preadv/pwritev/unplug.
        this.#fail(pending.shift(), ret);
        continue;
      }
      pending.drop(ret);
      this.#inKernel += ret;
      this.stats.submitted += ret;
      if (ret < n) break;
    }
    this.#blocked = pending.length > 0;
    if (this.#blocked) {
      this.stats.queued++;
      // Nothing in the kernel would wake us up: retry from a bottom half.
      if (this.#inKernel === 0) this.#retryBh.schedule();
    }
  }

  /**
   * Queues a request io_submit refused for #failBh. QEMU's laio completes it
   * at once, which is fine for its coroutine (it does not yield when the
   * result is already there); a callback must never run before the
   * submitting call returns (the BlockDriver contract). No allocation once
   * the FIFOs have grown.
   */
  #fail(slot: number, ret: number): void {
    this.#failed.push(slot);
    this.#failedRet.push(ret);
    this.#failBh.schedule();
  }

  /** Completes the refused requests; each is taken off the FIFOs first, so nesting is safe. */
  #completeFailed(): void {
    while (this.#failed.length > 0) {
      const slot = this.#failed.shift();
      const ret = this.#failedRet.shift();
      this.stats.completed++;
      this.#slots.complete(slot, ret);
    }
  }

  /** qemu_laio_process_completions: reaps every finished event. */
  #processCompletions(): void {
    const ring = this.#ring;
    const s = this.#slots;
    let reaped = 0;
    if (ring !== null) {
      const nr = ring.nr;
      for (;;) {
        // Re-read both indexes each time: a callback may reap nested.
        const head = ring.head;
        if (head === ring.tail) break;
        const slot = ring.data(head);
        const res = ring.res(head);
        ring.setHead(head + 1 === nr ? 0 : head + 1);
        this.#inKernel--;
        reaped++;
        this.stats.completed++;
        s.complete(slot, res);
      }
    } else {
      reaped = this.#processEvents();
    }
    if (reaped > 0 && this.#pending.length > 0) {
      this.#blocked = false;
      if (this.#plugged === 0) this.#submit();
    }
  }

  /**
   * The io_getevents form of the reap: refills #events only when every event
   * in it has been completed, and takes each off through the shared #evHead
   * before its callback runs, so a nested reap neither completes an event
   * twice nor overwrites ones the outer reap has not reached. Returns how many
   * events were fetched. Hot path: no allocation.
   */
  #processEvents(): number {
    const ev = this.#events32, s = this.#slots;
    let fetched = 0;
    for (;;) {
      if (this.#evHead === this.#evCount) {
        const n = ioGetevents(
          this.#ioctx,
          0,
          this.#maxEvents,
          this.#eventsAddr,
          this.#zeroTimeoutAddr,
        );
        if (n <= 0) break;
        this.#evHead = 0;
        this.#evCount = n;
        this.#inKernel -= n;
        fetched += n;
      }
      const w = (this.#evHead++ * IO_EVENT.size) >> 2;
      const slot = ev[w + (IO_EVENT.data >> 2)];
      const res = (ev[w + (IO_EVENT.res >> 2) + 1] | 0) * 0x100000000 + ev[w + (IO_EVENT.res >> 2)];
      this.stats.completed++;
      s.complete(slot, res);
    }
    return fetched;
  }
}
