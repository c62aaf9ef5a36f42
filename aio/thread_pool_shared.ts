/**
 * The SharedArrayBuffer layout shared by {@link ThreadPool} and its Workers
 * (thread_pool_worker.ts): a control block, a ring of queued slot indexes and
 * the job slots. Internal to aio/.
 *
 * @module
 */

/** Control block indexes (Int32Array). */
export const CTL = {
  /** Ring consumer index (workers CAS it). */
  head: 0,
  /** Ring producer index; idle workers Atomics.wait on it. */
  tail: 1,
  /** Workers able to take a job now: alive and not inside a synchronous job. */
  idle: 2,
  /** Workers alive (counted by the pool at spawn, decremented by a worker at exit). */
  workers: 3,
  /** Workers spawned that have not reached their loop yet. */
  starting: 4,
  /** Set to 1 to make every worker exit. */
  shutdown: 5,
  /** Completed jobs (workers add 1 after publishing a result). */
  done: 6,
  /** Workers with jobs on Deno blocking threads: they wait on `kick`, not on `tail`. */
  dispatching: 7,
  /** Bumped (and notified) by the pool when it queues a job while a Worker dispatches. */
  kick: 8,
  size: 10,
} as const;

/** Job operations. */
export const OP_PREADV = 1;
export const OP_PWRITEV = 2;
export const OP_FDATASYNC = 3;
export const OP_FALLOCATE = 4;

/** Slot states. */
export const S_FREE = 0;
export const S_QUEUED = 1;
export const S_RUNNING = 2;
export const S_DONE = 3;
/** Cancelled while queued; the callback already got -ECANCELED. */
export const S_CANCELLED = 4;
/** A cancelled slot a worker dequeued: free for reuse. */
export const S_RELEASED = 5;

/** Int32 fields of a slot. */
export const I32 = { op: 0, fd: 1, iovcnt: 2, mode: 3, state: 4, size: 8 } as const;
/** Float64 fields of a slot (addresses, offsets, lengths as exact doubles). */
export const F64 = { iovAddr: 0, offset: 1, len: 2, result: 3, size: 4 } as const;

/**
 * What a pool posts to each new Worker.
 *
 * @see ThreadPoolOptions (thread_pool.ts) for idleExitGate.
 */
export interface ThreadPoolInit {
  ctl: SharedArrayBuffer;
  ring: SharedArrayBuffer;
  slotsI32: SharedArrayBuffer;
  slotsF64: SharedArrayBuffer;
  notifyFd: number;
  idleTimeoutMs: number;
  /** Workers that never exit on idle (thread-pool-min). */
  minThreads: number;
  /** Most Workers at once: a Worker that changes its mind about exiting may not exceed it. */
  maxThreads: number;
  /** Tests only: see {@link ThreadPoolOptions.idleExitGate}. */
  idleExitGate?: SharedArrayBuffer;
}
