/**
 * A thread-pool Worker (QEMU util/thread-pool.c worker_thread): takes queued
 * jobs from the shared ring, runs the blocking system call, publishes the
 * result (ret or -errno), counts it done and sets the pool's EventNotifier.
 * Idle, it sleeps in Atomics.wait (it never needs its event loop) and exits
 * after the idle timeout.
 *
 * @module
 */

import {
  blockAsyncSignals,
  EIO,
  eventfdWrite,
  fallocate,
  fdatasync,
  preadvAt,
  pwritevAt,
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

function loop(init: ThreadPoolInit): void {
  const ctl = new Int32Array(init.ctl);
  const ring = new Int32Array(init.ring);
  const mask = ring.length - 1;
  const s = new Int32Array(init.slotsI32);
  const f = new Float64Array(init.slotsF64);
  const gate = init.idleExitGate ? new Int32Array(init.idleExitGate) : null;
  Atomics.sub(ctl, CTL.starting, 1);
  for (;;) {
    if (Atomics.load(ctl, CTL.shutdown) !== 0) break;
    const h = Atomics.load(ctl, CTL.head);
    const t = Atomics.load(ctl, CTL.tail);
    if (h === t) {
      Atomics.add(ctl, CTL.idle, 1);
      const r = Atomics.wait(ctl, CTL.tail, t, init.idleTimeoutMs);
      Atomics.sub(ctl, CTL.idle, 1);
      if (
        r === "timed-out" && Atomics.load(ctl, CTL.head) === Atomics.load(ctl, CTL.tail) &&
        idleExit(ctl, init, gate)
      ) {
        return;
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
    f[j + F64.result] = runJob(s[i + I32.op], s, f, i, j);
    Atomics.store(s, i + I32.state, S_DONE); // publishes the result
    Atomics.add(ctl, CTL.done, 1);
    eventfdWrite(init.notifyFd, 1);
  }
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
  loop(e.data);
  scope.close();
};
