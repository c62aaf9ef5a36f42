import type { AioContext } from "../aio/mod.ts";
import { EventNotifier } from "../aio/mod.ts";
import {
  EAGAIN,
  EBUSY,
  EINTR,
  IO_URING_CQE,
  IO_URING_SQE,
  IORING_ENTER_GETEVENTS,
  IORING_FSYNC_DATASYNC,
  IORING_OP_FALLOCATE,
  IORING_OP_FSYNC,
  IORING_OP_READV,
  IORING_OP_WRITEV,
  IORING_SETUP_COOP_TASKRUN,
  IORING_SETUP_DEFER_TASKRUN,
  IORING_SETUP_SINGLE_ISSUER,
  IORING_SETUP_TASKRUN_FLAG,
  IORING_SQ_CQ_OVERFLOW,
  IORING_SQ_TASKRUN,
  ioUringEnter,
  IoUringRings,
} from "../sys/mod.ts";
import type { IoVector } from "./io_vector.ts";
import type { BlockCompletion } from "./block_driver.ts";
import type { IoEngine, IoEngineKind, IoEngineStats } from "./io_engine.ts";
import {
  OP_FALLOCATE,
  OP_FLUSH,
  OP_READ,
  OP_WRITE,
  RequestSlots,
  SlotFifo,
} from "./request_slots.ts";

/**
 * Options of {@link IoUringEngine}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { IoUringOptions } from "./io_uring_engine.ts";
 * const o: IoUringOptions = { entries: 4 }; // tiny SQ: exercises the overflow queue
 * assert.equal(o.entries, 4);
 * ```
 */
export interface IoUringOptions {
  /** SQ entries (default 128, as QEMU's MAX_ENTRIES); the CQ has twice as many. */
  entries?: number;
  /** Under plug, submit as soon as this many are queued (default 32). */
  maxBatch?: number;
  /**
   * How completion task work reaches this thread (default "defer", falling
   * back to "coop", then "interrupt", on kernels that lack the flags):
   * - "defer": IORING_SETUP_DEFER_TASKRUN | SINGLE_ISSUER | TASKRUN_FLAG. Task
   *   work waits for io_uring_enter(GETEVENTS), announced by the eventfd and
   *   the IORING_SQ_TASKRUN flag; nothing interrupts the thread's epoll_wait.
   *   Fits because one IOThread creates, submits to and reaps its ring.
   * - "coop": IORING_SETUP_COOP_TASKRUN | TASKRUN_FLAG: no IPI to a running
   *   thread, but a sleeping epoll_wait is still woken with EINTR.
   * - "interrupt": no flags (every completion interrupts the thread).
   */
  taskrun?: IoUringTaskrun;
  /**
   * Stands in for io_uring_enter(2) (same arguments, `-errno` result): a seam
   * for tests that need the kernel to refuse a submission. Default
   * {@link ioUringEnter}.
   */
  enter?: typeof ioUringEnter;
}

/** See {@link IoUringOptions.taskrun}. */
export type IoUringTaskrun = "defer" | "coop" | "interrupt";

const DEFER = IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_TASKRUN_FLAG;
const COOP = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
const SETUP_TRIES: Record<IoUringTaskrun, readonly number[]> = {
  defer: [DEFER, COOP, 0],
  coop: [COOP, 0],
  interrupt: [0],
};

const SQE_WORDS = IO_URING_SQE.size >> 2;
const CQE_WORDS = IO_URING_CQE.size >> 2;

/**
 * aio=io_uring, in the manner of QEMU's block/io_uring.c: one ring per
 * AioContext with the SQ ring, CQ ring and SQE array mmapped; completions are
 * signalled on an eventfd registered with IORING_REGISTER_EVENTFD and reaped
 * by reading the CQ in user space (also from the AioContext's poll handler, so
 * busy polling sees them without a system call). Requests are prepared from a
 * pending queue at submit time, batched under plug/unplug; when the SQ (or the
 * CQ budget) is full they wait there until completions make room. READV,
 * WRITEV, FSYNC(DATASYNC) and FALLOCATE all go through the ring. A short
 * read is continued for the rest (zero padding only at EOF) and a request the
 * kernel completes with -EAGAIN or -EINTR is submitted again, as QEMU does.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../aio/mod.ts";
 * import { IoUringEngine } from "./io_uring_engine.ts";
 * const ctx = new AioContext();
 * const e = new IoUringEngine(ctx, { entries: 8 });
 * assert.equal(e.kind, "io_uring");
 * await e.close();
 * ctx.close();
 * ```
 */
export class IoUringEngine implements IoEngine {
  /** Always "io_uring". */
  readonly kind: IoEngineKind = "io_uring";
  /** Counters. */
  readonly stats: IoEngineStats = { submitCalls: 0, submitted: 0, completed: 0, queued: 0 };
  readonly #ctx: AioContext;
  readonly #rings: IoUringRings;
  readonly #notifier = new EventNotifier();
  readonly #maxBatch: number;
  readonly #slots = new RequestSlots();
  readonly #pending = new SlotFifo(64);
  readonly #sq: Uint32Array;
  readonly #cq: Uint32Array;
  readonly #sqes32: Uint32Array;
  readonly #sqHead: number;
  readonly #sqTail: number;
  readonly #sqFlags: number;
  readonly #sqArray: number;
  readonly #cqHead: number;
  readonly #cqTail: number;
  readonly #cqes: number;
  readonly #retryBh;
  readonly #enter: typeof ioUringEnter;
  /** Requests io_uring_enter refused, completed with `#failRes[slot]` from `#failBh`. */
  readonly #failed = new SlotFifo(16);
  readonly #failRes: number[] = [];
  readonly #failBh;
  /** SQEs published to the SQ but not yet consumed by io_uring_enter. */
  #unconsumed = 0;
  /** Requests in the ring (SQ or in the kernel), bounded by the CQ size. */
  #inKernel = 0;
  #plugged = 0;
  /** Short reads being completed: bytes done so far and the vector of the rest, per slot. */
  readonly #resubDone: number[] = [];
  readonly #resubIov: (IoVector | null)[] = [];
  #blocked = false;
  #closed = false;
  /** Completions wait as deferred task work until GETEVENTS (IORING_SETUP_DEFER_TASKRUN). */
  readonly #deferred: boolean;

  constructor(ctx: AioContext, opts: IoUringOptions = {}) {
    this.#ctx = ctx;
    this.#maxBatch = opts.maxBatch ?? (ctx.aioMaxBatch > 0 ? ctx.aioMaxBatch : 32);
    this.#enter = opts.enter ?? ioUringEnter;
    const entries = opts.entries ?? 128;
    const r = this.#rings = IoUringRings.create({
      entries,
      cqEntries: entries * 2,
      setupFlags: SETUP_TRIES[opts.taskrun ?? "defer"],
    });
    this.#deferred = (r.setupFlags & IORING_SETUP_DEFER_TASKRUN) !== 0;
    this.#sq = r.sqRing;
    this.#cq = r.cqRing;
    this.#sqes32 = r.sqes32;
    this.#sqHead = r.sqOff.head;
    this.#sqTail = r.sqOff.tail;
    this.#sqFlags = r.sqOff.flags;
    this.#sqArray = r.sqOff.array;
    this.#cqHead = r.cqOff.head;
    this.#cqTail = r.cqOff.tail;
    this.#cqes = r.cqOff.cqes;
    r.registerEventfd(this.#notifier.fd);
    this.#retryBh = ctx.bhNew(() => this.#submit(), "io_uring-retry");
    this.#failBh = ctx.bhNew(() => this.#completeFailed(), "io_uring-fail");
    ctx.setFdHandler(this.#notifier.fd, {
      read: () => {
        this.#notifier.testAndClear();
        this.#processCompletions();
      },
      poll: () =>
        Atomics.load(this.#cq, this.#cqHead) !== Atomics.load(this.#cq, this.#cqTail) ||
        (this.#deferred && (Atomics.load(this.#sq, this.#sqFlags) & IORING_SQ_TASKRUN) !== 0),
      pollReady: () => this.#processCompletions(),
    });
  }

  /** Requests accepted by the engine and not yet completed. */
  get inFlight(): number {
    return this.#slots.inUse;
  }

  /** SQ size. */
  get sqEntries(): number {
    return this.#rings.sqEntries;
  }

  /** The IORING_SETUP_* flags the kernel accepted for this ring. */
  get setupFlags(): number {
    return this.#rings.setupFlags;
  }

  /** Hot path: queues an IORING_OP_READV. */
  preadv(fd: number, qiov: IoVector, offset: number, cb: BlockCompletion): void {
    this.#enqueue(this.#slots.alloc(OP_READ, fd, qiov, offset, qiov.size, 0, cb));
  }

  /** Hot path: queues an IORING_OP_WRITEV. */
  pwritev(fd: number, qiov: IoVector, offset: number, cb: BlockCompletion): void {
    this.#enqueue(this.#slots.alloc(OP_WRITE, fd, qiov, offset, qiov.size, 0, cb));
  }

  /** Queues an IORING_OP_FSYNC with IORING_FSYNC_DATASYNC. */
  fdatasync(fd: number, cb: BlockCompletion): void {
    this.#enqueue(this.#slots.alloc(OP_FLUSH, fd, null, 0, 0, 0, cb));
  }

  /** Queues an IORING_OP_FALLOCATE. */
  fallocate(fd: number, mode: number, offset: number, len: number, cb: BlockCompletion): void {
    this.#enqueue(this.#slots.alloc(OP_FALLOCATE, fd, null, offset, len, mode, cb));
  }

  /** Starts a batch (luring_io_plug). */
  plug(): void {
    this.#plugged++;
  }

  /** Ends a batch: the outermost unplug submits (luring_io_unplug). */
  unplug(): void {
    if (this.#plugged > 0 && --this.#plugged === 0 && !this.#blocked) {
      if (this.#pending.length || this.#unconsumed) this.#submit();
    }
  }

  /** Unregisters the handler, unmaps the rings, closes the fds. */
  close(): Promise<void> {
    if (this.#closed) return Promise.resolve();
    if (this.#slots.inUse > 0) throw new Error("IoUringEngine.close: requests in flight");
    this.#closed = true;
    this.#ctx.setFdHandler(this.#notifier.fd, null);
    this.#retryBh.delete();
    this.#failBh.delete();
    this.#rings.close();
    this.#notifier.close();
    return Promise.resolve();
  }

  #enqueue(slot: number): void {
    this.#pending.push(slot);
    if (this.#blocked) {
      this.stats.queued++;
      return;
    }
    if (this.#plugged === 0 || this.#pending.length >= this.#maxBatch) this.#submit();
  }

  /** Writes the SQE for `slot` at SQ position `tail`. Hot path. */
  #prep(slot: number, tail: number): void {
    const r = this.#rings, s = this.#slots, w = this.#sqes32;
    const idx = tail & r.sqMask;
    const b = idx * SQE_WORDS;
    w.fill(0, b, b + SQE_WORDS);
    const op = s.op[slot];
    const u8 = r.sqes;
    w[b + (IO_URING_SQE.fd >> 2)] = s.fd[slot];
    w[b + (IO_URING_SQE.user_data >> 2)] = slot;
    if (op === OP_READ || op === OP_WRITE) {
      let q = s.qiov[slot]!, off = s.offset[slot];
      const rest = this.#resubIov[slot];
      if (rest) { // the rest of a short read
        q = rest;
        off += this.#resubDone[slot];
      }
      u8[idx * IO_URING_SQE.size + IO_URING_SQE.opcode] = op === OP_READ
        ? IORING_OP_READV
        : IORING_OP_WRITEV;
      const addr = q.iovAddr;
      w[b + (IO_URING_SQE.off >> 2)] = off >>> 0;
      w[b + (IO_URING_SQE.off >> 2) + 1] = Math.floor(off / 0x100000000);
      w[b + (IO_URING_SQE.addr >> 2)] = addr >>> 0;
      w[b + (IO_URING_SQE.addr >> 2) + 1] = Math.floor(addr / 0x100000000);
      w[b + (IO_URING_SQE.len >> 2)] = q.niov;
    } else if (op === OP_FLUSH) {
      u8[idx * IO_URING_SQE.size + IO_URING_SQE.opcode] = IORING_OP_FSYNC;
      w[b + (IO_URING_SQE.rw_flags >> 2)] = IORING_FSYNC_DATASYNC;
    } else {
      // fallocate: off = offset, addr = length, len = mode.
      u8[idx * IO_URING_SQE.size + IO_URING_SQE.opcode] = IORING_OP_FALLOCATE;
      const off = s.offset[slot], len = s.len[slot];
      w[b + (IO_URING_SQE.off >> 2)] = off >>> 0;
      w[b + (IO_URING_SQE.off >> 2) + 1] = Math.floor(off / 0x100000000);
      w[b + (IO_URING_SQE.addr >> 2)] = len >>> 0;
      w[b + (IO_URING_SQE.addr >> 2) + 1] = Math.floor(len / 0x100000000);
      w[b + (IO_URING_SQE.len >> 2)] = s.mode[slot];
    }
    this.#sq[this.#sqArray + idx] = idx;
  }

  /** luring_submit: moves pending requests into the SQ and enters the kernel. */
  #submit(): void {
    const r = this.#rings, pending = this.#pending, sq = this.#sq;
    for (;;) {
      const head = Atomics.load(sq, this.#sqHead);
      let tail = Atomics.load(sq, this.#sqTail);
      const sqFree = r.sqEntries - ((tail - head) >>> 0);
      const cqFree = r.cqEntries - this.#inKernel;
      let n = pending.length;
      if (n > sqFree) n = sqFree;
      if (n > cqFree) n = cqFree;
      for (let k = 0; k < n; k++) this.#prep(pending.shift(), tail++);
      if (n > 0) Atomics.store(sq, this.#sqTail, tail);
      this.#inKernel += n;
      this.#unconsumed += n;
      if (this.#unconsumed === 0) break;
      const ret = this.#enter(r.fdBig, this.#unconsumed, 0, 0);
      this.stats.submitCalls++;
      if (ret < 0) {
        if (ret === -EINTR) continue;
        // -EAGAIN / -EBUSY: out of resources or CQ backlog: retry after completions.
        if (ret !== -EAGAIN && ret !== -EBUSY) return this.#failUnsubmitted(ret);
        break;
      }
      this.#unconsumed -= ret;
      this.stats.submitted += ret;
      if (this.#unconsumed > 0 || pending.length === 0 || n === 0) break;
    }
    this.#blocked = pending.length > 0 || this.#unconsumed > 0;
    if (this.#blocked) {
      this.stats.queued++;
      if (this.#inKernel - this.#unconsumed <= 0) this.#retryBh.schedule();
    }
  }

  /**
   * io_uring_enter refused the submission with an error that retrying will
   * not cure (a ring torn down, EEXIST from another thread under
   * SINGLE_ISSUER, ...): the SQEs it did not consume are taken back off the
   * SQ (nothing consumed them: an error return means none was), and they and
   * every request still pending complete with that error from a bottom half,
   * never inside the submitting call. The IOThread goes on; before, the
   * exception escaped from the guest's request submission and killed it.
   */
  #failUnsubmitted(err: number): void {
    const sq = this.#sq, r = this.#rings;
    const tail = Atomics.load(sq, this.#sqTail);
    const unconsumed = (tail - Atomics.load(sq, this.#sqHead)) >>> 0;
    for (let k = unconsumed; k > 0; k--) {
      const idx = (tail - k) & r.sqMask;
      this.#fail(this.#sqes32[idx * SQE_WORDS + (IO_URING_SQE.user_data >> 2)], err);
    }
    Atomics.store(sq, this.#sqTail, (tail - unconsumed) >>> 0);
    this.#inKernel -= unconsumed;
    this.#unconsumed = 0;
    while (this.#pending.length > 0) this.#fail(this.#pending.shift(), err);
    this.#blocked = false;
    this.#failBh.schedule();
  }

  #fail(slot: number, err: number): void {
    this.#failRes[slot] = err;
    this.#failed.push(slot);
  }

  #completeFailed(): void {
    const s = this.#slots;
    while (this.#failed.length > 0) {
      const slot = this.#failed.shift();
      this.#resubIov[slot] = null;
      this.stats.completed++;
      s.complete(slot, this.#failRes[slot]);
    }
  }

  /** luring_process_completions: reaps the CQ. */
  #processCompletions(): void {
    const r = this.#rings, cq = this.#cq, s = this.#slots;
    if (this.#deferred && (Atomics.load(this.#sq, this.#sqFlags) & IORING_SQ_TASKRUN)) {
      // Deferred task work turns finished I/O into CQEs only inside
      // io_uring_enter(GETEVENTS); the kernel clears the flag as it runs it.
      ioUringEnter(r.fdBig, 0, 0, IORING_ENTER_GETEVENTS);
    }
    let reaped = 0;
    for (;;) {
      const head = Atomics.load(cq, this.#cqHead);
      if (head === Atomics.load(cq, this.#cqTail)) break;
      const b = this.#cqes + (head & r.cqMask) * CQE_WORDS;
      const slot = cq[b + (IO_URING_CQE.user_data >> 2)];
      let res = cq[b + (IO_URING_CQE.res >> 2)] | 0;
      Atomics.store(cq, this.#cqHead, head + 1);
      this.#inKernel--;
      reaped++;
      if (res === -EAGAIN || res === -EINTR) {
        // The kernel gave up on this one (some kernels do for O_DIRECT under
        // load): submit it again, as luring_process_completions does.
        this.stats.resubmitted = (this.stats.resubmitted ?? 0) + 1;
        this.#pending.push(slot);
        continue;
      }
      if (s.op[slot] === OP_READ && res > 0) {
        // io_uring may read less than asked before EOF (a buffered read cut
        // short): read the rest (luring_resubmit_short_read). 0 means EOF.
        const done = (this.#resubIov[slot] ? this.#resubDone[slot] : 0) + res;
        if (done < s.len[slot]) {
          this.#resubDone[slot] = done;
          this.#resubIov[slot] = s.qiov[slot]!.tail(done);
          this.stats.shortReads = (this.stats.shortReads ?? 0) + 1;
          this.#pending.push(slot);
          continue;
        }
        res = done;
      }
      if (this.#resubIov[slot]) {
        if (res === 0) res = this.#resubDone[slot]; // EOF after a short read: pad the rest
        this.#resubIov[slot] = null;
      }
      this.stats.completed++;
      s.complete(slot, res);
    }
    if (Atomics.load(this.#sq, this.#sqFlags) & IORING_SQ_CQ_OVERFLOW) {
      ioUringEnter(r.fdBig, 0, 0, IORING_ENTER_GETEVENTS);
    }
    if (reaped > 0 && (this.#pending.length > 0 || this.#unconsumed > 0)) {
      this.#blocked = false;
      if (this.#plugged === 0) this.#submit();
    }
  }
}
