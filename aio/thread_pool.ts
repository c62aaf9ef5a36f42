import { ECANCELED } from "../sys/mod.ts";
import type { AioContext } from "./aio_context.ts";
import { EventNotifier } from "./event_notifier.ts";
import {
  CTL,
  F64,
  I32,
  OP_FALLOCATE,
  OP_FDATASYNC,
  OP_PREADV,
  OP_PWRITEV,
  S_CANCELLED,
  S_DONE,
  S_FREE,
  S_QUEUED,
  S_RELEASED,
  type ThreadPoolInit,
} from "./thread_pool_shared.ts";

/** Completion callback of a pool job: `ret >= 0` or `-errno`. */
export type ThreadPoolCompletion = (ret: number) => void;

/**
 * Options of a {@link ThreadPool}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { ThreadPoolOptions } from "./mod.ts";
 * const o: ThreadPoolOptions = { maxThreads: 4, idleTimeoutMs: 1000 };
 * assert.equal(o.maxThreads, 4);
 * ```
 */
export interface ThreadPoolOptions {
  /** Most Workers at once (default 64). */
  maxThreads?: number;
  /** An idle Worker exits after this long (default 10000 ms), unless `minThreads` are left. */
  idleTimeoutMs?: number;
  /**
   * Workers started at once and kept while idle (QEMU's thread-pool-min;
   * default 0). A Worker started from another Worker (an IOThread) takes
   * about a second to run in Deno 2.9, so a pool on the data path should
   * not rely on growing on demand.
   */
  minThreads?: number;
  /** Job slots in shared memory (default 256, a power of two); more jobs wait in a JS queue. */
  slots?: number;
  /**
   * Tests only: an Int32Array(2)'s buffer that makes a Worker stop in its
   * idle-exit path, after it found the queue empty and before it gives up its
   * place in `workers`, so a test can submit in exactly that window. The
   * Worker sets element 0 to 1 (and notifies it) when it arrives, then waits
   * until element 1 is non-zero; once element 1 is set, it never stops again.
   */
  idleExitGate?: SharedArrayBuffer;
}

/**
 * A job handed to a {@link ThreadPool}: keep it to {@link ThreadPool.cancel} it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { ThreadPoolRequest } from "./mod.ts";
 * const isDone = (r: ThreadPoolRequest) => r.done;
 * assert.equal(typeof isDone, "function");
 * ```
 */
export class ThreadPoolRequest {
  /** Slot index while in shared memory, -1 while waiting in the JS queue. */
  slot = -1;
  /** Whether the callback has been called (or is scheduled, for a cancel). */
  done = false;
  /** @internal */
  constructor(
    readonly op: number,
    readonly fd: number,
    readonly iovAddr: number,
    readonly iovcnt: number,
    readonly offset: number,
    readonly len: number,
    readonly mode: number,
    readonly cb: ThreadPoolCompletion,
  ) {}
}

const WORKER_URL = new URL("./thread_pool_worker.ts", import.meta.url);

/**
 * QEMU's ThreadPool (util/thread-pool.c): Workers that run blocking system
 * calls (preadv, pwritev, fdatasync, fallocate) for one AioContext. Jobs go to
 * slots in a SharedArrayBuffer; an idle Worker wakes from Atomics.wait, runs
 * the call, stores the result and sets the pool's EventNotifier; the context
 * reaps completions (on that fd, or sooner while busy polling) and calls each
 * callback in its own thread with `ret` or `-errno`.
 *
 * The pool starts with `minThreads` Workers and grows on demand up to
 * `maxThreads` (starting a Worker takes tens of ms), only while every Worker
 * is inside a synchronous call; idle Workers exit after `idleTimeoutMs`. A
 * Worker runs a job found alone itself (the low-latency QD1 path) and hands
 * jobs that queue up to Deno blocking threads, so one Worker (one V8 isolate,
 * ~10 MB resident) keeps any queue depth in flight. Addresses in iovecs are raw host addresses valid in every
 * thread; the caller keeps the memory (and the iovec array) alive until the
 * callback. Beware: a typed array whose address was taken but that no live
 * code references is garbage, and the GC frees its memory while a worker
 * still reads or writes it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext, ThreadPool } from "./mod.ts";
 * const ctx = new AioContext();
 * const pool = new ThreadPool(ctx, { maxThreads: 1 });
 * let ret = 1;
 * pool.submitFdatasync(-1, (r) => ret = r); // a bad fd
 * while (ret === 1) await ctx.pollAsync();
 * assert.equal(ret, -9); // -EBADF, delivered in ctx's thread
 * await pool.close();
 * ctx.close();
 * ```
 */
export class ThreadPool {
  /** Most Workers at once. */
  readonly maxThreads: number;
  /** Idle time after which a Worker exits. */
  readonly idleTimeoutMs: number;
  /** Workers kept alive while idle. */
  readonly minThreads: number;
  /** Counters for benchmarks and tests. */
  readonly stats = { submitted: 0, completed: 0, cancelled: 0, spawned: 0 };

  readonly #ctx: AioContext;
  readonly #notifier = new EventNotifier();
  readonly #ctl: Int32Array;
  readonly #ring: Int32Array;
  readonly #s: Int32Array;
  readonly #f: Float64Array;
  readonly #init: ThreadPoolInit;
  readonly #reqs: (ThreadPoolRequest | undefined)[];
  readonly #free: number[] = [];
  /** Slots submitted and not yet reaped, in submission order. */
  readonly #inflight: number[] = [];
  /**
   * Finished slots whose callback has not run yet, in completion order: a
   * ring with one entry per slot at most (a slot stays S_DONE until its
   * callback is taken). Head is a field so nested reaps share it.
   */
  readonly #completed: Int32Array;
  #completedHead = 0;
  #completedTail = 0;
  /** Jobs waiting for a free slot. */
  readonly #overflow: ThreadPoolRequest[] = [];
  #reaped = 0;
  readonly #workers: Worker[] = [];
  #closed = false;

  constructor(ctx: AioContext, opts: ThreadPoolOptions = {}) {
    this.#ctx = ctx;
    this.maxThreads = opts.maxThreads ?? 64;
    this.idleTimeoutMs = opts.idleTimeoutMs ?? 10_000;
    this.minThreads = Math.min(opts.minThreads ?? 0, this.maxThreads);
    const slots = opts.slots ?? 256;
    if (slots < 1 || (slots & (slots - 1)) !== 0) {
      throw new RangeError(`ThreadPool: slots must be a power of two, got ${slots}`);
    }
    this.#init = {
      ctl: new SharedArrayBuffer(CTL.size * 4),
      ring: new SharedArrayBuffer(slots * 4),
      slotsI32: new SharedArrayBuffer(slots * I32.size * 4),
      slotsF64: new SharedArrayBuffer(slots * F64.size * 8),
      notifyFd: this.#notifier.fd,
      idleTimeoutMs: this.idleTimeoutMs,
      minThreads: this.minThreads,
      maxThreads: this.maxThreads,
      idleExitGate: opts.idleExitGate,
    };
    this.#ctl = new Int32Array(this.#init.ctl);
    this.#ring = new Int32Array(this.#init.ring);
    this.#s = new Int32Array(this.#init.slotsI32);
    this.#f = new Float64Array(this.#init.slotsF64);
    this.#reqs = new Array(slots);
    this.#completed = new Int32Array(slots);
    for (let i = slots - 1; i >= 0; i--) this.#free.push(i);
    const n = this.#notifier;
    ctx.setEventNotifier(
      n,
      () => {
        n.testAndClear();
        this.#reap();
      },
      () =>
        Atomics.load(this.#ctl, CTL.done) > this.#reaped ||
        this.#completedHead !== this.#completedTail,
      () => this.#reap(),
    );
    for (let k = 0; k < this.minThreads; k++) this.#spawn();
  }

  /** Jobs submitted whose callback has not run yet. */
  get inFlight(): number {
    return this.#inflight.length + this.#overflow.length +
      (this.#completedTail - this.#completedHead);
  }

  /** Workers alive (or starting). */
  get threads(): number {
    return Atomics.load(this.#ctl, CTL.workers);
  }

  /**
   * preadv(2) of `iovcnt` iovecs at host address `iovAddr` from `offset`.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext, ThreadPool } from "./mod.ts";
   * const ctx = new AioContext(), pool = new ThreadPool(ctx);
   * let ret = 1;
   * pool.submitPreadv(-1, 0, 0, 0, (r) => ret = r);
   * while (ret === 1) await ctx.pollAsync();
   * assert.equal(ret, -9);
   * await pool.close(); ctx.close();
   * ```
   */
  submitPreadv(
    fd: number,
    iovAddr: number,
    iovcnt: number,
    offset: number,
    cb: ThreadPoolCompletion,
  ): ThreadPoolRequest {
    return this.#submit(new ThreadPoolRequest(OP_PREADV, fd, iovAddr, iovcnt, offset, 0, 0, cb));
  }

  /**
   * pwritev(2) of `iovcnt` iovecs at host address `iovAddr` to `offset`.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext, ThreadPool } from "./mod.ts";
   * const ctx = new AioContext(), pool = new ThreadPool(ctx);
   * let ret = 1;
   * pool.submitPwritev(-1, 0, 0, 0, (r) => ret = r);
   * while (ret === 1) await ctx.pollAsync();
   * assert.equal(ret, -9);
   * await pool.close(); ctx.close();
   * ```
   */
  submitPwritev(
    fd: number,
    iovAddr: number,
    iovcnt: number,
    offset: number,
    cb: ThreadPoolCompletion,
  ): ThreadPoolRequest {
    return this.#submit(new ThreadPoolRequest(OP_PWRITEV, fd, iovAddr, iovcnt, offset, 0, 0, cb));
  }

  /**
   * fdatasync(2); the callback gets 0 or -errno.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext, ThreadPool } from "./mod.ts";
   * const ctx = new AioContext(), pool = new ThreadPool(ctx);
   * let ret = 1;
   * pool.submitFdatasync(-1, (r) => ret = r);
   * while (ret === 1) await ctx.pollAsync();
   * assert.equal(ret, -9);
   * await pool.close(); ctx.close();
   * ```
   */
  submitFdatasync(fd: number, cb: ThreadPoolCompletion): ThreadPoolRequest {
    return this.#submit(new ThreadPoolRequest(OP_FDATASYNC, fd, 0, 0, 0, 0, 0, cb));
  }

  /**
   * fallocate(2) with `mode` (FALLOC_FL_*); the callback gets 0 or -errno.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext, ThreadPool } from "./mod.ts";
   * const ctx = new AioContext(), pool = new ThreadPool(ctx);
   * let ret = 1;
   * pool.submitFallocate(-1, 0, 0, 4096, (r) => ret = r);
   * while (ret === 1) await ctx.pollAsync();
   * assert.equal(ret, -9);
   * await pool.close(); ctx.close();
   * ```
   */
  submitFallocate(
    fd: number,
    mode: number,
    offset: number,
    len: number,
    cb: ThreadPoolCompletion,
  ): ThreadPoolRequest {
    return this.#submit(new ThreadPoolRequest(OP_FALLOCATE, fd, 0, 0, offset, len, mode, cb));
  }

  #submit(req: ThreadPoolRequest): ThreadPoolRequest {
    if (this.#closed) throw new Error("ThreadPool: submit after close");
    this.stats.submitted++;
    if (this.#free.length === 0) this.#overflow.push(req);
    else this.#enqueue(req, this.#free.pop()!);
    return req;
  }

  #enqueue(req: ThreadPoolRequest, slot: number): void {
    const s = this.#s, f = this.#f, ctl = this.#ctl;
    const i = slot * I32.size, j = slot * F64.size;
    req.slot = slot;
    this.#reqs[slot] = req;
    s[i + I32.op] = req.op;
    s[i + I32.fd] = req.fd;
    s[i + I32.iovcnt] = req.iovcnt;
    s[i + I32.mode] = req.mode;
    f[j + F64.iovAddr] = req.iovAddr;
    f[j + F64.offset] = req.offset;
    f[j + F64.len] = req.len;
    f[j + F64.result] = 0;
    Atomics.store(s, i + I32.state, S_QUEUED);
    this.#inflight.push(slot);
    const t = Atomics.load(ctl, CTL.tail);
    Atomics.store(this.#ring, t & (this.#ring.length - 1), slot);
    Atomics.store(ctl, CTL.tail, t + 1);
    if (Atomics.load(ctl, CTL.idle) > 0) {
      Atomics.notify(ctl, CTL.tail, 1);
      if (Atomics.load(ctl, CTL.dispatching) > 0) {
        Atomics.add(ctl, CTL.kick, 1);
        Atomics.notify(ctl, CTL.kick);
      }
    } else this.#maybeSpawn();
  }

  /** Spawns a Worker when queued jobs outnumber idle and starting ones (spawn_thread). */
  #maybeSpawn(): void {
    const ctl = this.#ctl;
    const queued = Atomics.load(ctl, CTL.tail) - Atomics.load(ctl, CTL.head);
    const ready = Atomics.load(ctl, CTL.idle) + Atomics.load(ctl, CTL.starting);
    if (queued <= ready || Atomics.load(ctl, CTL.workers) >= this.maxThreads) return;
    this.#spawn();
  }

  #spawn(): void {
    const ctl = this.#ctl;
    Atomics.add(ctl, CTL.workers, 1);
    Atomics.add(ctl, CTL.starting, 1);
    const w = new Worker(WORKER_URL, { type: "module", name: "thread-pool" });
    w.postMessage(this.#init);
    this.#workers.push(w);
    this.stats.spawned++;
    // Forget Workers that exited on their own (idle timeout) now and then.
    if (this.#workers.length > 2 * this.maxThreads) this.#workers.splice(0, this.maxThreads);
  }

  /**
   * Cancels a job that no Worker has started (thread_pool_cancel): its
   * callback gets -ECANCELED from a bottom half of the context. Returns false
   * when the job already runs or finished.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext, ThreadPool } from "./mod.ts";
   * const ctx = new AioContext(), pool = new ThreadPool(ctx);
   * let ret = 1;
   * const req = pool.submitFdatasync(-1, (r) => ret = r);
   * if (pool.cancel(req)) { ctx.poll(false); assert.equal(ret, -125); }
   * while (ret === 1) await ctx.pollAsync();
   * await pool.close(); ctx.close();
   * ```
   */
  cancel(req: ThreadPoolRequest): boolean {
    if (req.done) return false;
    if (req.slot < 0) {
      const k = this.#overflow.indexOf(req);
      if (k < 0) return false;
      this.#overflow.splice(k, 1);
    } else {
      const i = req.slot * I32.size;
      if (Atomics.compareExchange(this.#s, i + I32.state, S_QUEUED, S_CANCELLED) !== S_QUEUED) {
        return false;
      }
      this.#reqs[req.slot] = undefined; // the slot is freed once a Worker skips it
    }
    req.done = true;
    this.stats.cancelled++;
    this.#ctx.scheduleOneshot(() => req.cb(-ECANCELED));
    return true;
  }

  /**
   * Calls the callbacks of finished jobs; frees their slots and fills them
   * from the JS queue (thread_pool_completion_bh).
   *
   * Reentrant: a callback may poll the context nested, which reaps again.
   * QEMU's completion BH restarts its walk after every callback for that
   * reason. Here the walk over the in-flight list calls nothing, it only
   * moves finished slots to the completed ring; callbacks then run from the
   * ring's shared head, so a nested reap delivers the outer one's remaining
   * completions first, in order, and the outer one finds them gone.
   * Hot path: no allocation.
   */
  #reap(): void {
    this.#collect();
    const s = this.#s, f = this.#f, ring = this.#completed, mask = ring.length - 1;
    while (this.#completedHead !== this.#completedTail) {
      const slot = ring[this.#completedHead++ & mask];
      const req = this.#reqs[slot]!;
      const ret = f[slot * F64.size + F64.result];
      this.#reqs[slot] = undefined;
      s[slot * I32.size + I32.state] = S_FREE;
      this.#free.push(slot);
      req.done = true;
      this.stats.completed++;
      req.cb(ret);
    }
    while (this.#overflow.length && this.#free.length) {
      this.#enqueue(this.#overflow.shift()!, this.#free.pop()!);
    }
    if (this.#inflight.length) this.#maybeSpawn();
  }

  /**
   * Takes finished and released slots out of the in-flight list (compacting
   * it in place, order kept): finished ones go to the completed ring, released
   * (cancelled) ones straight to the free list. Each counts against `done`.
   */
  #collect(): void {
    const s = this.#s, list = this.#inflight, ring = this.#completed, mask = ring.length - 1;
    let kept = 0;
    for (let k = 0; k < list.length; k++) {
      const slot = list[k];
      const i = slot * I32.size;
      const st = Atomics.load(s, i + I32.state);
      if (st === S_DONE) {
        ring[this.#completedTail++ & mask] = slot;
        this.#reaped++;
      } else if (st === S_RELEASED) {
        s[i + I32.state] = S_FREE;
        this.#free.push(slot);
        this.#reaped++;
      } else {
        list[kept++] = slot;
      }
    }
    list.length = kept;
  }

  /**
   * Cancels queued jobs, waits (driving the context with pollAsync) for
   * running ones, then stops and terminates every Worker.
   *
   * @example
   * ```ts
   * import { AioContext, ThreadPool } from "./mod.ts";
   * const ctx = new AioContext();
   * await new ThreadPool(ctx).close();
   * ctx.close();
   * ```
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    for (const req of [...this.#overflow]) this.cancel(req);
    for (const slot of [...this.#inflight]) {
      const req = this.#reqs[slot];
      if (req) this.cancel(req);
    }
    while (this.#inflight.some((slot) => this.#reqs[slot] !== undefined)) {
      await this.#ctx.pollAsync();
    }
    this.#closed = true;
    while (this.#ctx.poll(false)) { /* deliver -ECANCELED callbacks */ }
    Atomics.store(this.#ctl, CTL.shutdown, 1);
    Atomics.notify(this.#ctl, CTL.tail);
    for (const w of this.#workers) w.terminate();
    this.#workers.length = 0;
    this.#ctx.setEventNotifier(this.#notifier, null);
    this.#notifier.close();
  }
}
