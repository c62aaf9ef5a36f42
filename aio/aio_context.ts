import {
  clockNs,
  Epoll,
  EPOLLERR,
  EpollEvents,
  EPOLLHUP,
  EPOLLIN,
  EPOLLOUT,
  eventfdWrite,
  SysError,
} from "../sys/mod.ts";
import { EventNotifier } from "./event_notifier.ts";
import { BhQueue, BottomHalf } from "./bottom_half.ts";
import { AioTimer, TimerList } from "./aio_timer.ts";

/**
 * Callbacks for one fd (QEMU's aio_set_fd_handler arguments). `read` runs when
 * the fd is readable (or has an error or hang-up), `write` when writable.
 * `poll` is called in the busy-polling loop and returns true when there is
 * work; then `pollReady` (or `read` if absent) runs.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { AioHandler } from "./mod.ts";
 * const h: AioHandler = { read() {}, poll: () => false };
 * assert.equal(typeof h.read, "function");
 * ```
 */
export interface AioHandler {
  read?(): void;
  write?(): void;
  poll?(): boolean;
  pollReady?(): void;
  /**
   * io_poll_begin: the context starts busy polling (e.g. a virtqueue stops
   * asking the driver for kicks). Paired with {@link pollEnd}.
   */
  pollBegin?(): void;
  /**
   * io_poll_end: the context is about to block (e.g. re-enable kicks). The
   * poll callback runs once right after, so work that raced in is not lost.
   */
  pollEnd?(): void;
}

/**
 * Options of an {@link AioContext}: QEMU's iothread poll-max-ns, poll-grow and
 * poll-shrink properties.
 *
 * @example
 * ```ts
 * import { AioContext, type AioContextOptions } from "./mod.ts";
 * const opts: AioContextOptions = { pollMaxNs: 0 }; // no busy polling
 * new AioContext(opts).close();
 * ```
 */
export interface AioContextOptions {
  /** Longest busy-polling window in ns (default 32768; 0 disables polling). */
  pollMaxNs?: number;
  /** Factor the window grows by (default 2). */
  pollGrow?: number;
  /** Divisor the window shrinks by (default 0: reset to 0). */
  pollShrink?: number;
  /**
   * aio-max-batch: most requests an AIO engine of this context (linux-aio,
   * io_uring) queues before it submits them, even inside a plugged section
   * (default 0: the engine's own default, 32).
   */
  aioMaxBatch?: number;
}

/**
 * Counters of an {@link AioContext}, for benchmarks and tests. They only grow.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "./mod.ts";
 * const ctx = new AioContext();
 * ctx.poll(false);
 * assert.equal(ctx.stats.polls, 1);
 * ctx.close();
 * ```
 */
export interface AioStats {
  /** Calls of poll() (nested ones included). */
  polls: number;
  /** Times poll() slept in epoll_wait with a non-zero timeout. */
  blockingWaits: number;
  /** Busy-polling loops started. */
  pollLoops: number;
  /** Busy-polling loops ended because a poll callback found work. */
  pollSuccesses: number;
  /** read/write/pollReady callbacks run. */
  handlerCalls: number;
  /** Bottom halves run. */
  bhRuns: number;
  /** Timers fired. */
  timerRuns: number;
  /** Times the polling window grew / shrank. */
  pollGrows: number;
  pollShrinks: number;
  /** epoll_wait calls that ended with EINTR (signals, io_uring task work). */
  readonly interruptedWaits: number;
  /** epoll_wait errors taken for spurious wake-ups (see sys/ `Epoll.wait`). */
  readonly strayWaitErrors: number;
}

/**
 * What another thread needs to wake an {@link AioContext} with QEMU's
 * `notify_me` protocol: the context's notifier eventfd and a small shared
 * state. Structured-cloneable (post it to a Worker).
 *
 * @example
 * ```ts
 * import { AioContext, aioNotify } from "./mod.ts";
 * const ctx = new AioContext();
 * aioNotify(ctx.notifyHandle); // from any thread: makes the next poll(true) return
 * ctx.poll(true);
 * ctx.close();
 * ```
 */
export interface AioNotifyHandle {
  fd: number;
  state: SharedArrayBuffer;
}

/** Most consecutive poll() iterations that skip epoll_wait(0) after busy-poll progress. */
const MAX_SKIPPED_WAITS = 4;

// Layout of the shared notify state (Int32Array indexes).
const NOTIFY_ME = 0; // > 0 while the owner is (about to be) asleep in epoll_wait
const NOTIFIED = 1; // set by aio_notify, cleared by the owner when it wakes

/**
 * aio_notify from any thread: marks the context notified and writes its
 * eventfd only when the context is (about to be) blocked, so a busy context
 * costs no system call. The woken context runs its handlers' poll callbacks
 * once, so a producer can publish work in shared memory and call this.
 * Hot path: no allocation if `view` is passed.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext, aioNotify } from "./mod.ts";
 * const ctx = new AioContext();
 * aioNotify(ctx.notifyHandle);
 * assert(!ctx.poll(true)); // woke at once; a wake-up is not progress
 * ctx.close();
 * ```
 */
export function aioNotify(handle: AioNotifyHandle, view?: Int32Array): void {
  const s = view ?? new Int32Array(handle.state);
  Atomics.store(s, NOTIFIED, 1);
  if (Atomics.load(s, NOTIFY_ME) !== 0) eventfdWrite(handle.fd, 1);
}

class HandlerNode {
  deleted = false;
  constructor(
    readonly fd: number,
    readonly io: AioHandler,
    readonly events: number,
    readonly progress: boolean,
  ) {}
}

function eventsOf(h: AioHandler): number {
  return (h.read ? EPOLLIN : 0) | (h.write ? EPOLLOUT : 0);
}

/** Zeroed counters; the epoll_wait ones are read from the context's Epoll. */
function newAioStats(epoll: () => Epoll): AioStats {
  return {
    polls: 0,
    blockingWaits: 0,
    pollLoops: 0,
    pollSuccesses: 0,
    handlerCalls: 0,
    bhRuns: 0,
    timerRuns: 0,
    pollGrows: 0,
    pollShrinks: 0,
    get interruptedWaits(): number {
      return epoll().interrupted;
    },
    get strayWaitErrors(): number {
      return epoll().strayErrors;
    },
  };
}

/** ns -> epoll_wait ms, rounded up so a timer never fires early. */
function timeoutMs(ns: number): number {
  if (ns < 0) return -1;
  return Math.min(Math.ceil(ns / 1e6), 0x7fffffff);
}

/**
 * QEMU's AioContext (util/aio-posix.c, util/async.c): an event loop over epoll
 * with fd handlers, bottom halves, timers and adaptive busy polling. One
 * context belongs to one thread; other threads wake it with
 * {@link AioContext.notifyHandle} / {@link aioNotify} or by writing
 * {@link AioContext.notifyFd}.
 *
 * Handlers and BHs may be added and removed from inside callbacks (a removed
 * handler is tombstoned and skipped for the rest of the dispatch), and poll()
 * may be called recursively from a callback (each nesting level has its own
 * event buffer).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext, EventNotifier } from "./mod.ts";
 * const ctx = new AioContext();
 * const n = new EventNotifier();
 * let hits = 0;
 * ctx.setEventNotifier(n, () => { n.testAndClear(); hits++; });
 * n.set();
 * assert(ctx.poll(true));
 * assert.equal(hits, 1);
 * ctx.setEventNotifier(n, null);
 * n.close(); ctx.close();
 * ```
 */
export class AioContext {
  /** Current busy-polling window in ns (adapted by poll()). */
  pollNs = 0;
  /** Longest polling window in ns; 0 disables busy polling. */
  pollMaxNs: number;
  /** Growth factor of the window. */
  pollGrow: number;
  /** Shrink divisor of the window (0: reset to 0). */
  pollShrink: number;
  /** aio-max-batch (0: each engine's default). */
  readonly aioMaxBatch: number;
  /** Counters for benchmarks and tests. */
  readonly stats: AioStats = newAioStats(() => this.#epoll);

  readonly #epoll: Epoll;
  readonly #notifier: EventNotifier;
  readonly #state: Int32Array;
  readonly #handle: AioNotifyHandle;
  /** fd -> live handler. */
  readonly #byFd: (HandlerNode | undefined)[] = [];
  /** Snapshot of live handlers with a poll callback; replaced (never mutated) on change. */
  #pollNodes: HandlerNode[] = [];
  #pollDirty = false;
  readonly #bhs: BhQueue;
  readonly #timers: TimerList;
  /** One event buffer per nesting level of poll(). */
  readonly #ready: EpollEvents[] = [];
  #depth = 0;
  /** aio_notify from this thread since the last poll. */
  #notified = false;
  #asyncWaits = 0;
  /** Promises passed to waitEventLoop() not settled yet. */
  #eventLoopWaits = 0;
  #closed = false;
  /** epoll_wait(0) calls skipped in a row because polling made progress. */
  #skippedWaits = 0;
  /** In poll mode: handlers' pollBegin ran, pollEnd not yet (poll_set_started). */
  #pollStarted = false;

  constructor(opts: AioContextOptions = {}) {
    this.pollMaxNs = opts.pollMaxNs ?? 32768;
    this.pollGrow = opts.pollGrow ?? 2;
    this.pollShrink = opts.pollShrink ?? 0;
    this.aioMaxBatch = opts.aioMaxBatch ?? 0;
    this.#epoll = new Epoll();
    this.#notifier = new EventNotifier();
    const sab = new SharedArrayBuffer(8);
    this.#state = new Int32Array(sab);
    this.#handle = { fd: this.#notifier.fd, state: sab };
    this.#bhs = new BhQueue(() => this.#wake());
    this.#timers = new TimerList(() => this.#wake());
    const n = this.#notifier;
    // The context's own notifier: clearing it is not progress (as in QEMU).
    this.#setHandler(n.fd, { read: () => n.testAndClear() }, false);
  }

  /** The eventfd another thread writes to wake this context (aio_notify). */
  get notifyFd(): number {
    return this.#notifier.fd;
  }

  /** Fd plus shared state for {@link aioNotify} in another thread. */
  get notifyHandle(): AioNotifyHandle {
    return this.#handle;
  }

  /** Whether {@link close} has run. */
  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Promises given to {@link waitEventLoop} that have not settled: while
   * there are any, whoever drives this context must wait with
   * {@link pollAsync} rather than a blocking `poll(true)` (an IOThread's
   * loop does).
   */
  get eventLoopWaits(): number {
    return this.#eventLoopWaits;
  }

  /**
   * Returns `p`, a promise that Deno's event loop settles rather than this
   * context (a dynamic `import()`, a Deno async op), and counts it in
   * {@link eventLoopWaits} until it settles; then wakes the context. A
   * thread blocked in `poll(true)` (epoll_wait in a synchronous FFI call)
   * does not run its event loop, so code that may run in an IOThread wraps
   * such a promise here: the block layer loads a driver's modules on first
   * use this way. Cold path only.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * const p = ctx.waitEventLoop(import("./wire_error.ts"));
   * assert.equal(ctx.eventLoopWaits, 1);
   * while (ctx.eventLoopWaits > 0) await ctx.pollAsync();
   * assert.equal(typeof (await p).encodeError, "function");
   * ctx.close();
   * ```
   */
  waitEventLoop<T>(p: Promise<T>): Promise<T> {
    this.#eventLoopWaits++;
    const settled = () => {
      this.#eventLoopWaits--;
      if (!this.#closed) this.#wake();
    };
    return p.then((v) => {
      settled();
      return v;
    }, (e) => {
      settled();
      throw e;
    });
  }

  /**
   * Wakes this context (aio_notify) from its own thread: the next poll() does
   * not block, and a pending {@link pollAsync} wait returns. No system call
   * unless a wait is in progress.
   *
   * @example
   * ```ts
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * ctx.notify();
   * ctx.poll(true); // returns at once
   * ctx.close();
   * ```
   */
  notify(): void {
    this.#notified = true;
    aioNotify(this.#handle, this.#state);
  }

  /**
   * Wake-up for work scheduled in this thread (BHs, timers): the next poll()
   * does not block, and only a pending pollAsync wait needs the eventfd.
   * Unlike aio_notify it does not make poll callbacks run.
   */
  #wake(): void {
    this.#notified = true;
    if (Atomics.load(this.#state, NOTIFY_ME) !== 0) this.#notifier.set();
  }

  /**
   * The current time on the context clock (CLOCK_MONOTONIC) in ns.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * assert(ctx.now() > 0);
   * ctx.close();
   * ```
   */
  now(): number {
    return clockNs();
  }

  /**
   * Registers (or replaces, or with `null` removes) the handler of `fd`
   * (aio_set_fd_handler). Safe while dispatching: a removed handler is not
   * called again, not even for events already collected.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "./mod.ts";
   * import { pipe, write, close } from "../sys/mod.ts";
   * const ctx = new AioContext();
   * const [r, w] = pipe();
   * let got = false;
   * ctx.setFdHandler(r, { read() { got = true; ctx.setFdHandler(r, null); } });
   * write(w, new Uint8Array([1]));
   * ctx.poll(true);
   * assert(got);
   * close(r); close(w); ctx.close();
   * ```
   */
  setFdHandler(fd: number, h: AioHandler | null): void {
    if (fd === this.#notifier.fd) throw new Error("AioContext: notifyFd is reserved");
    this.#setHandler(fd, h, true);
  }

  /**
   * Registers `read` (and optionally busy-poll callbacks) for an
   * EventNotifier (aio_set_event_notifier); `null` removes it. The callback
   * must clear the notifier (testAndClear) itself.
   *
   * @example
   * ```ts
   * import { AioContext, EventNotifier } from "./mod.ts";
   * const ctx = new AioContext();
   * const n = new EventNotifier();
   * ctx.setEventNotifier(n, () => n.testAndClear(), () => false);
   * ctx.setEventNotifier(n, null);
   * n.close(); ctx.close();
   * ```
   */
  setEventNotifier(
    n: EventNotifier,
    read: (() => void) | null,
    poll?: () => boolean,
    pollReady?: () => void,
  ): void {
    this.setFdHandler(n.fd, read ? { read, poll, pollReady } : null);
  }

  #setHandler(fd: number, h: AioHandler | null, progress: boolean): void {
    if (this.#closed) throw new Error("AioContext: used after close");
    const old = this.#byFd[fd];
    if (old) {
      old.deleted = true;
      this.#byFd[fd] = undefined;
      if (old.io.poll) this.#pollDirty = true;
      // Leaving poll mode for this handler (QEMU does the same on removal).
      if (this.#pollStarted) old.io.pollEnd?.();
    }
    if (h && !h.read && !h.write && !h.poll) h = null;
    if (!h) {
      if (old) {
        try {
          this.#epoll.delete(fd);
        } catch (e) {
          // Already closed by the caller: the kernel dropped the registration.
          if (!(e instanceof SysError)) throw e;
        }
      }
      return;
    }
    const node = new HandlerNode(fd, h, eventsOf(h), progress);
    if (old) this.#epoll.modify(fd, node.events);
    else this.#epoll.add(fd, node.events);
    this.#byFd[fd] = node;
    if (h.poll) this.#pollDirty = true;
    if (this.#pollStarted) h.pollBegin?.();
  }

  #pollList(): HandlerNode[] {
    if (this.#pollDirty) {
      this.#pollDirty = false;
      const list: HandlerNode[] = [];
      for (const n of this.#byFd) if (n && n.io.poll) list.push(n);
      this.#pollNodes = list;
    }
    return this.#pollNodes;
  }

  /**
   * A new bottom half running `cb` in this context (aio_bh_new).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * const order: number[] = [];
   * const a = ctx.bhNew(() => order.push(1)), b = ctx.bhNew(() => order.push(2));
   * b.schedule(); a.schedule();
   * ctx.poll(false);
   * assert.equal(order.join(), "2,1");
   * ctx.close();
   * ```
   */
  bhNew(cb: () => void, name = "bh"): BottomHalf {
    return new BottomHalf(this.#bhs, cb, name, false);
  }

  /**
   * Runs `cb` once in this context's next dispatch (aio_bh_schedule_oneshot).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * let ran = false;
   * ctx.scheduleOneshot(() => ran = true);
   * ctx.poll(false);
   * assert(ran);
   * ctx.close();
   * ```
   */
  scheduleOneshot(cb: () => void): void {
    new BottomHalf(this.#bhs, cb, "oneshot", true).schedule();
  }

  /**
   * A new (disarmed) timer on this context's clock (aio_timer_new).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * const t = ctx.timerNew(() => {});
   * assert(!t.pending);
   * ctx.close();
   * ```
   */
  timerNew(cb: () => void): AioTimer {
    return new AioTimer(this.#timers, cb);
  }

  /** Time to sleep in ns: 0 if work is pending, -1 for no deadline (aio_compute_timeout). */
  #timeoutNs(): number {
    if (this.#notified || this.#bhs.pending) return 0;
    const d = this.#timers.nearest;
    if (d < 0) return -1;
    return Math.max(0, d - clockNs());
  }

  /**
   * One round of the event loop (aio_poll): busy-poll for up to the current
   * window, wait for fds (only if `blocking`; until the nearest timer), then
   * run bottom halves, fd handlers and expired timers. Returns whether any
   * callback other than a bare wake-up ran. Hot path: no allocation.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * assert.equal(ctx.poll(false), false);
   * ctx.close();
   * ```
   */
  poll(blocking: boolean): boolean {
    if (this.#closed) throw new Error("AioContext: used after close");
    const depth = this.#depth++;
    try {
      return this.#poll(blocking, depth);
    } finally {
      this.#depth--;
    }
  }

  #poll(blocking: boolean, depth: number): boolean {
    const stats = this.stats;
    stats.polls++;
    const ready = this.#ready[depth] ??= new EpollEvents(64);
    const state = this.#state;
    let progress = false;
    let timeout = blocking ? this.#timeoutNs() : 0;
    const adapt = blocking && timeout !== 0 && this.pollMaxNs > 0;
    const start = adapt ? clockNs() : 0;

    // Busy polling (try_poll_mode / run_poll_handlers).
    const nodes = this.#pollList();
    if (nodes.length !== 0) {
      if (adapt && this.pollNs > 0) {
        if (!this.#pollStarted) this.#setPollStarted(nodes, true);
        const maxNs = timeout < 0 ? this.pollNs : Math.min(this.pollNs, timeout);
        progress = this.#runPollHandlers(nodes, maxNs, start);
        // Time has passed while polling: the nearest deadline is closer now.
        if (!progress) timeout = this.#timeoutNs();
      } else if (!blocking) {
        progress = this.#runPollOnce(nodes);
      }
      if (progress) timeout = 0;
    }
    // About to block: leave poll mode first (handlers re-enable their
    // notifications), then look once more, as QEMU's poll_set_started(false).
    if (timeout !== 0 && this.#pollStarted && this.#setPollStarted(this.#pollList(), false)) {
      progress = true;
      timeout = 0;
    }

    let n: number;
    if (timeout !== 0) {
      Atomics.add(state, NOTIFY_ME, 1);
      if (Atomics.load(state, NOTIFIED) !== 0) timeout = 0;
      if (timeout !== 0) stats.blockingWaits++;
      try {
        n = this.#epoll.wait(timeoutMs(timeout), ready);
      } finally {
        Atomics.sub(state, NOTIFY_ME, 1);
      }
    } else if (progress && this.#skippedWaits < MAX_SKIPPED_WAITS) {
      // Busy polling found work: skip the epoll_wait(0) system call (a good
      // part of the cost of an iteration), but not forever, so handlers
      // without a poll callback still run while polling keeps succeeding.
      this.#skippedWaits++;
      n = 0;
    } else {
      this.#skippedWaits = 0;
      n = this.#epoll.wait(0, ready);
    }
    // aio_notify_accept. A wake-up from aioNotify also means "look at your
    // poll callbacks": producers in other threads publish work in shared
    // memory that only a poll callback can see. Always look once after
    // consuming the flag, even if polling already made progress: the flag
    // may belong to work published after that poll.
    this.#notified = false;
    if (Atomics.exchange(state, NOTIFIED, 0) !== 0) {
      const list = this.#pollList();
      if (list.length !== 0 && this.#runPollOnce(list)) progress = true;
    }

    if (adapt) this.#adjustPolling(clockNs() - start);

    const bhs = this.#bhs.poll();
    if (bhs !== 0) {
      stats.bhRuns += bhs;
      progress = true;
    }
    if (n !== 0 && this.#dispatch(ready, n)) progress = true;
    if (this.#timers.nearest >= 0) {
      const fired = this.#timers.run(clockNs());
      if (fired !== 0) {
        stats.timerRuns += fired;
        progress = true;
      }
    }
    return progress;
  }

  /** Adaptive polling window, as the end of QEMU's aio_poll adjusts poll_ns. */
  #adjustPolling(blockNs: number): void {
    if (blockNs <= this.pollNs) return; // the sweet spot
    if (blockNs > this.pollMaxNs) {
      if (this.pollNs === 0) return;
      this.pollNs = this.pollShrink ? Math.floor(this.pollNs / this.pollShrink) : 0;
      this.stats.pollShrinks++;
    } else if (this.pollNs < this.pollMaxNs) {
      const grow = this.pollGrow || 2;
      this.pollNs = this.pollNs ? this.pollNs * grow : 4000;
      if (this.pollNs > this.pollMaxNs) this.pollNs = this.pollMaxNs;
      this.stats.pollGrows++;
    }
  }

  /**
   * Calls every handler's pollBegin (started) or pollEnd (stopped). After
   * pollEnd, runs the poll callbacks once; returns whether one found work.
   */
  #setPollStarted(nodes: HandlerNode[], started: boolean): boolean {
    this.#pollStarted = started;
    for (let i = 0; i < nodes.length; i++) {
      const node = nodes[i];
      if (node.deleted) continue;
      if (started) node.io.pollBegin?.();
      else node.io.pollEnd?.();
    }
    return started ? false : this.#runPollOnce(nodes);
  }

  #runPollHandlers(nodes: HandlerNode[], maxNs: number, start: number): boolean {
    const stats = this.stats;
    const state = this.#state;
    stats.pollLoops++;
    do {
      if (this.#runPollOnce(nodes)) {
        stats.pollSuccesses++;
        return true;
      }
      // Stop early on work that is not visible to poll callbacks.
      if (this.#bhs.pending || this.#notified || Atomics.load(state, NOTIFIED) !== 0) break;
    } while (clockNs() - start < maxNs);
    return false;
  }

  #runPollOnce(nodes: HandlerNode[]): boolean {
    let progress = false;
    for (let i = 0; i < nodes.length; i++) {
      const node = nodes[i];
      if (node.deleted || !node.io.poll!()) continue;
      if (node.deleted) continue;
      progress = true;
      this.stats.handlerCalls++;
      if (node.io.pollReady) node.io.pollReady();
      else if (node.io.read) node.io.read();
    }
    return progress;
  }

  #dispatch(ready: EpollEvents, n: number): boolean {
    let progress = false;
    const stats = this.stats;
    for (let i = 0; i < n; i++) {
      const node = this.#byFd[ready.fd(i)];
      if (!node) continue;
      const ev = ready.events(i);
      const io = node.io;
      if (io.read && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) !== 0) {
        io.read();
        stats.handlerCalls++;
        if (node.progress) progress = true;
      }
      if (io.write && !node.deleted && (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) !== 0) {
        io.write();
        stats.handlerCalls++;
        if (node.progress) progress = true;
      }
    }
    return progress;
  }

  /**
   * For the main thread: does the non-blocking work, then, if there was none,
   * waits for fds or the nearest timer with epoll_wait on a Deno blocking
   * thread so this thread's event loop keeps running, and dispatches what is
   * ready then. Handlers may change while waiting: dispatch uses a fresh
   * non-blocking epoll_wait, not the stale result. Control plane only
   * (~36 us per wait).
   *
   * @example
   * ```ts
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * let fired = false;
   * ctx.timerNew(() => fired = true).modNs(ctx.now() + 1e6);
   * while (!fired) await ctx.pollAsync();
   * ctx.close();
   * ```
   */
  async pollAsync(): Promise<boolean> {
    if (this.poll(false)) return true;
    const timeout = this.#timeoutNs();
    if (timeout === 0) return this.poll(false);
    const state = this.#state;
    this.#asyncWaits++;
    Atomics.add(state, NOTIFY_ME, 1);
    try {
      if (Atomics.load(state, NOTIFIED) === 0) {
        this.stats.blockingWaits++;
        await this.#epoll.waitAsync(timeoutMs(timeout), new EpollEvents(1));
      }
    } finally {
      Atomics.sub(state, NOTIFY_ME, 1);
      this.#asyncWaits--;
      if (this.#closed && this.#asyncWaits === 0) this.#release();
    }
    if (this.#closed) return false;
    return this.poll(false);
  }

  /**
   * Releases the epoll fd and the notifier (aio_context_finalize). Remove
   * your handlers first; their fds are not closed. A pending
   * {@link pollAsync} is woken and resolves false.
   *
   * @example
   * ```ts
   * import { AioContext } from "./mod.ts";
   * const ctx = new AioContext();
   * ctx.close(); ctx.close();
   * ```
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#asyncWaits > 0) this.#notifier.set();
    else this.#release();
  }

  #release(): void {
    this.#epoll.close();
    this.#notifier.close();
  }
}
