/**
 * A thread-pool Worker (QEMU util/thread-pool.c worker_thread): takes queued
 * jobs from the shared ring, runs the blocking system call (itself, or on a
 * Deno blocking thread when jobs queue up: see `loop`), publishes the result
 * (ret or -errno), counts it done and sets the pool's EventNotifier. Idle,
 * it sleeps in Atomics.wait and exits after the idle timeout.
 *
 * @module
 */

import {
  blockAsyncSignals,
  EBADF,
  EIO,
  eventfdWrite,
  fallocate,
  fallocateAsync,
  fdatasync,
  fdatasyncAsync,
  isOpen,
  preadvAt,
  preadvAtAsync,
  pwritevAt,
  pwritevAtAsync,
  SysError,
} from "../sys/mod.ts";
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
  S_QUEUED,
  S_RELEASED,
  S_RUNNING,
  type ThreadPoolInit,
} from "./thread_pool_shared.ts";

function runJob(op: number, s: Int32Array, f: Float64Array, i: number, j: number): number {
  try {
    const fd = s[i + I32.fd];
    switch (op) {
      case OP_PREADV:
        return preadvAt(fd, f[j + F64.iovAddr], s[i + I32.iovcnt], f[j + F64.offset]);
      case OP_PWRITEV:
        return pwritevAt(fd, f[j + F64.iovAddr], s[i + I32.iovcnt], f[j + F64.offset]);
      case OP_FDATASYNC:
        fdatasync(fd);
        return 0;
      case OP_FALLOCATE:
        fallocate(fd, s[i + I32.mode], f[j + F64.offset], f[j + F64.len]);
        return 0;
      default:
        return -EIO;
    }
  } catch (e) {
    return e instanceof SysError ? -e.errno : -EIO;
  }
}

/** The test hook of ThreadPoolOptions.idleExitGate: announce arrival, wait until opened. */
function pauseAtGate(gate: Int32Array | null): void {
  if (gate === null) return;
  Atomics.store(gate, 0, 1);
  Atomics.notify(gate, 0);
  Atomics.wait(gate, 1, 0);
}

/**
 * Hands a cancelled slot back to the pool. It counts as done and sets the
 * EventNotifier like a finished job: otherwise the pool would only notice it
 * when some other job completes, and with every slot taken (slots: 1) the jobs
 * waiting for one would never run.
 */
function release(ctl: Int32Array, s: Int32Array, i: number, notifyFd: number): void {
  Atomics.store(s, i + I32.state, S_RELEASED);
  Atomics.add(ctl, CTL.done, 1);
  eventfdWrite(notifyFd, 1);
}

/**
 * An idle Worker's exit (worker_thread's timed-out branch): leaves `workers`
 * unless that would leave fewer than minThreads, and returns whether it left.
 *
 * QEMU decides under the pool mutex; here a submitter may store `tail` after
 * this Worker found the queue empty and then see no idle Worker and no room
 * to spawn (`workers` still counts this one). So after leaving, look at the
 * queue once more: the submitter stores tail before it loads workers, this
 * Worker decrements workers before it loads tail, and with sequentially
 * consistent atomics at least one of the two sees the other's write. If a job
 * is there, come back, unless the submitter already spawned a replacement
 * (then the pool is full again and that Worker takes the job).
 */
function idleExit(ctl: Int32Array, init: ThreadPoolInit, gate: Int32Array | null): boolean {
  pauseAtGate(gate);
  const w = Atomics.load(ctl, CTL.workers);
  if (w <= init.minThreads || Atomics.compareExchange(ctl, CTL.workers, w, w - 1) !== w) {
    return false;
  }
  if (Atomics.load(ctl, CTL.head) === Atomics.load(ctl, CTL.tail)) return true;
  for (;;) {
    const c = Atomics.load(ctl, CTL.workers);
    if (c >= init.maxThreads) return true;
    if (Atomics.compareExchange(ctl, CTL.workers, c, c + 1) === c) return false;
  }
}

/**
 * Jobs this Worker runs on Deno blocking threads, and how its loop waits for
 * them. While any is in flight the loop must not block in Atomics.wait (their
 * completions arrive through the event loop), so it waits with
 * Atomics.waitAsync for new jobs and with a promise for completions.
 */
class Dispatcher {
  inFlight = 0;
  #wakeLoop: (() => void) | null = null;
  /** An Atomics.waitAsync of this Worker not resolved yet (at most one). */
  #waiting = false;

  constructor(
    readonly ctl: Int32Array,
    readonly s: Int32Array,
    readonly f: Float64Array,
    readonly notifyFd: number,
  ) {}

  #wake = (): void => {
    const w = this.#wakeLoop;
    this.#wakeLoop = null;
    w?.();
  };

  /** Runs the job in `slot` on a blocking thread; publishes its result when it ends. */
  start(op: number, slot: number): void {
    const s = this.s, f = this.f, i = slot * I32.size, j = slot * F64.size;
    const fd = s[i + I32.fd];
    let p: Promise<number>;
    switch (op) {
      case OP_PREADV:
        p = preadvAtAsync(fd, f[j + F64.iovAddr], s[i + I32.iovcnt], f[j + F64.offset]);
        break;
      case OP_PWRITEV:
        p = pwritevAtAsync(fd, f[j + F64.iovAddr], s[i + I32.iovcnt], f[j + F64.offset]);
        break;
      case OP_FDATASYNC:
        p = fdatasyncAsync(fd);
        break;
      case OP_FALLOCATE:
        p = fallocateAsync(fd, s[i + I32.mode], f[j + F64.offset], f[j + F64.len]);
        break;
      default:
        p = Promise.resolve(-1);
    }
    if (this.inFlight++ === 0) Atomics.add(this.ctl, CTL.dispatching, 1);
    p.then((ret) => {
      // errno stayed in the blocking thread. Positioned I/O and fallocate are
      // idempotent: run them again here to learn it (the file driver needs
      // EOPNOTSUPP, the guest's error path ENOSPC). A failed fdatasync is not:
      // the kernel reports a writeback error once per open file, so the
      // repeat could succeed after data was lost; it fails with EBADF if the
      // fd is not open (fcntl has no side effect), else EIO.
      if (ret < 0) {
        if (op !== OP_FDATASYNC) ret = runJob(op, s, f, i, j);
        else ret = isOpen(fd) ? -EIO : -EBADF;
      }
      if (--this.inFlight === 0) Atomics.sub(this.ctl, CTL.dispatching, 1);
      publish(this.ctl, s, f, i, j, ret, this.notifyFd);
      this.#wake();
    });
  }

  /**
   * Resolves when a job of this Worker completes or the pool kicks: `kick` is
   * CTL.kick as read before the ring was found empty, so a job queued since
   * then resolves it at once. A waitAsync still pending from an earlier call
   * is reused: it can only be older than `kick`'s value if a kick resolved it.
   */
  wait(kick: number): Promise<void> {
    if (!this.#waiting) {
      const r = Atomics.waitAsync(this.ctl, CTL.kick, kick);
      if (!r.async) return Promise.resolve();
      this.#waiting = true;
      r.value.then(() => {
        this.#waiting = false;
        this.#wake();
      });
    }
    return new Promise((resolve) => this.#wakeLoop = resolve);
  }
}

/** Stores a job's result, marks it done and wakes the pool's context. */
function publish(
  ctl: Int32Array,
  s: Int32Array,
  f: Float64Array,
  i: number,
  j: number,
  ret: number,
  notifyFd: number,
): void {
  f[j + F64.result] = ret;
  Atomics.store(s, i + I32.state, S_DONE); // publishes the result
  Atomics.add(ctl, CTL.done, 1);
  eventfdWrite(notifyFd, 1);
}

/**
 * The Worker's loop. A read or write found alone (the ring empty behind it,
 * nothing of this Worker's in flight) runs synchronously: the QD1 path, woken
 * straight from Atomics.wait. A job with others queued behind it, or found
 * waiting when a synchronous job ended, or taken while jobs are in flight,
 * goes to a Deno blocking thread, and so do fdatasync and fallocate (slow
 * calls: the Worker stays free for reads and writes meanwhile). One Worker
 * thus keeps any queue depth busy: a Worker is a V8 isolate (~10 MB), a
 * blocking thread is not.
 */
async function loop(init: ThreadPoolInit): Promise<void> {
  const ctl = new Int32Array(init.ctl);
  const ring = new Int32Array(init.ring);
  const mask = ring.length - 1;
  const s = new Int32Array(init.slotsI32);
  const f = new Float64Array(init.slotsF64);
  const gate = init.idleExitGate ? new Int32Array(init.idleExitGate) : null;
  const d = new Dispatcher(ctl, s, f, init.notifyFd);
  // Counted as idle (able to take a job) except inside a synchronous job.
  Atomics.add(ctl, CTL.idle, 1);
  Atomics.sub(ctl, CTL.starting, 1);
  let afterSyncJob = false;
  for (;;) {
    if (Atomics.load(ctl, CTL.shutdown) !== 0) break;
    const kick = Atomics.load(ctl, CTL.kick);
    const h = Atomics.load(ctl, CTL.head);
    const t = Atomics.load(ctl, CTL.tail);
    if (h === t) {
      afterSyncJob = false;
      if (d.inFlight > 0) {
        await d.wait(kick);
        continue;
      }
      const r = Atomics.wait(ctl, CTL.tail, t, init.idleTimeoutMs);
      if (r === "timed-out" && Atomics.load(ctl, CTL.head) === Atomics.load(ctl, CTL.tail)) {
        // Not idle while deciding: a job queued meanwhile makes the pool spawn.
        Atomics.sub(ctl, CTL.idle, 1);
        if (idleExit(ctl, init, gate)) return;
        Atomics.add(ctl, CTL.idle, 1);
      }
      continue;
    }
    // Read the entry before claiming it: once head moves on, the producer may reuse it.
    const slot = Atomics.load(ring, h & mask);
    if (Atomics.compareExchange(ctl, CTL.head, h, h + 1) !== h) continue;
    const i = slot * I32.size, j = slot * F64.size;
    const st = Atomics.compareExchange(s, i + I32.state, S_QUEUED, S_RUNNING);
    if (st !== S_QUEUED) {
      if (st === S_CANCELLED) release(ctl, s, i, init.notifyFd);
      continue;
    }
    const op = s[i + I32.op];
    if (
      d.inFlight > 0 || afterSyncJob || Atomics.load(ctl, CTL.tail) !== h + 1 ||
      op === OP_FDATASYNC || op === OP_FALLOCATE
    ) {
      d.start(op, slot);
      continue;
    }
    Atomics.sub(ctl, CTL.idle, 1);
    const ret = runJob(op, s, f, i, j);
    Atomics.add(ctl, CTL.idle, 1);
    publish(ctl, s, f, i, j, ret, init.notifyFd);
    afterSyncJob = true;
  }
  while (d.inFlight > 0) await d.wait(Atomics.load(ctl, CTL.kick));
  Atomics.sub(ctl, CTL.idle, 1);
  Atomics.sub(ctl, CTL.workers, 1);
}

// Signals belong to the main thread: none interrupts a blocking job here.
blockAsyncSignals();

/** The Worker global scope, typed without the deno.worker lib. */
const scope = self as unknown as {
  onmessage: ((e: MessageEvent<ThreadPoolInit>) => void) | null;
  close(): void;
};
scope.onmessage = (e) => {
  scope.onmessage = null;
  loop(e.data).then(() => scope.close());
};
