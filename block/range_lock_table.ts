import { futexLock, futexUnlock } from "../aio/mod.ts";
import { eventfdWrite } from "../sys/mod.ts";

/**
 * Sizes of a {@link RangeLockTable}.
 *
 * @example
 * ```ts
 * import type { RangeLockTableOptions } from "./range_lock_table.ts";
 * const o: RangeLockTableOptions = { participants: 8, entries: 256 };
 * if (o.entries !== 256) throw new Error("unreachable");
 * ```
 */
export interface RangeLockTableOptions {
  /** Drivers that may attach (one per IOThread's driver; default 64). */
  participants?: number;
  /** Requests tracked at once, granted or waiting (default 1024). */
  entries?: number;
}

// Header (Int32 indexes). The serialising count sits on its own cache line:
// every aligned write reads it, and only read-modify-writes write it.
const LOCK = 0; // futex mutex: 0 free, 1 locked, 2 locked with waiters
const TICKET = 1; // next ticket (wraps; compared with (a - b) | 0)
const HIGH = 2; // entries [0, HIGH) may be in use
const NPART = 3;
const NENT = 4;
const MAGIC = 5;
const SERIALISING = 16; // serialising entries, pending or granted
const PART_BASE = 32;

// A participant: one 64-byte line (16 Int32s).
const PART_INTS = 16;
const P_FAST = 0; // fast-path writes in flight (not in the table)
const P_USED = 1;
const P_WAITING = 2; // has requests queued; wake its eventfd on a release
const P_FD = 3;

// An entry: 8 Int32s, lo/hi as float64 at Int32 offsets 4 and 6.
const ENT_INTS = 8;
const E_STATE = 0; // FREE, PENDING or GRANTED
const E_TICKET = 1;
const E_SER = 2;
const E_OWNER = 3;
const E_LO = 4;
const E_HI = 6;

const FREE = 0, PENDING = 1, GRANTED = 2;
const MAGIC_VALUE = 0x524c5431;
/**
 * A range-lock table in a SharedArrayBuffer that every driver of one image
 * attaches to, whichever thread it runs in: QEMU's tracked requests
 * (BdrvTrackedRequest, bdrv_mark_request_serialising,
 * bdrv_wait_serialising_requests) made to work across IOThreads, each of
 * which opens its own driver stack.
 *
 * A read-modify-write is *serialising*: it may not run while any other
 * write-like request (write, write-zeroes, discard) overlaps its aligned
 * span, nor may those run while it does. Everything else runs in parallel.
 * So that an aligned write pays nearly nothing while no serialising request
 * exists, writes are counted per participant ({@link fastBegin}, two
 * atomics) instead of being entered in the table; a serialising request
 * raises a shared count first and then waits until every participant's
 * count is zero (Dekker-style: the writer increments then reads the count,
 * the read-modify-write raises the count then reads the counters, both
 * sequentially consistent, so at least one sees the other). While the
 * count is non-zero, writes take the slow path and are entered as
 * non-serialising entries. Entries carry tickets: a request waits only for
 * conflicting entries with an earlier ticket, so waiting never forms a
 * cycle and a waiting read-modify-write is not overtaken.
 *
 * The table never blocks on a lock owner: a request that cannot be granted
 * stays pending and its participant is marked waiting; whoever releases an
 * entry (or drains a fast count while serialising requests exist) writes
 * the eventfd of every waiting participant, whose context then retries.
 * A short futex mutex guards the entries; the eventfd writes happen under
 * it, so a participant that detaches (and closes its eventfd) is never
 * written to afterwards.
 *
 * Create it once per image ({@link RangeLockTable.create}) and hand
 * {@link shared} to every IOThread (IOThread `data`); each thread wraps it
 * with `new RangeLockTable(shared)`. All drivers attached to one table must
 * have the same request alignment.
 *
 * @example
 * ```ts
 * import { RangeLockTable } from "./range_lock_table.ts";
 * const t = RangeLockTable.create({ participants: 2, entries: 8 });
 * const a = t.register(-1), b = t.register(-1);
 * const rmw = t.enqueue(a, 0, 4096, true); // a read-modify-write of block 0
 * if (!t.granted(rmw)) throw new Error("nothing else runs");
 * if (t.fastBegin(b)) throw new Error("writes take the slow path now");
 * const w = t.enqueue(b, 4096, 8192, false); // next block: no conflict
 * const v = t.enqueue(b, 512, 1024, false); // overlaps the read-modify-write
 * if (!t.granted(w) || t.granted(v)) throw new Error("wrong grants");
 * t.release(rmw);
 * if (!t.retry(b, v)) throw new Error("granted once the owner released");
 * t.release(w);
 * t.release(v);
 * ```
 */
export class RangeLockTable {
  /** The memory to hand to other threads. */
  readonly shared: SharedArrayBuffer;
  readonly #i32: Int32Array;
  readonly #f64: Float64Array;
  readonly #nPart: number;
  readonly #nEnt: number;
  readonly #entBase: number;

  /** Attaches to a table made by {@link RangeLockTable.create} (in any thread). */
  constructor(shared: SharedArrayBuffer) {
    this.shared = shared;
    this.#i32 = new Int32Array(shared);
    this.#f64 = new Float64Array(shared);
    if (this.#i32[MAGIC] !== MAGIC_VALUE) throw new TypeError("not a RangeLockTable");
    this.#nPart = this.#i32[NPART];
    this.#nEnt = this.#i32[NENT];
    this.#entBase = PART_BASE + this.#nPart * PART_INTS;
  }

  /** Allocates an empty table. */
  static create(opts: RangeLockTableOptions = {}): RangeLockTable {
    const nPart = opts.participants ?? 64, nEnt = opts.entries ?? 1024;
    if (!(nPart >= 1 && nEnt >= 1)) throw new RangeError("RangeLockTable: bad sizes");
    const ints = PART_BASE + nPart * PART_INTS + nEnt * ENT_INTS;
    const sab = new SharedArrayBuffer(ints * 4);
    const i32 = new Int32Array(sab);
    i32[NPART] = nPart;
    i32[NENT] = nEnt;
    for (let p = 0; p < nPart; p++) i32[PART_BASE + p * PART_INTS + P_FD] = -1;
    Atomics.store(i32, MAGIC, MAGIC_VALUE);
    return new RangeLockTable(sab);
  }

  /**
   * Attaches a participant whose context is woken through eventfd
   * `notifyFd` (-1: never woken, for tests); returns its index.
   */
  register(notifyFd: number): number {
    this.#lock();
    try {
      for (let p = 0; p < this.#nPart; p++) {
        const b = PART_BASE + p * PART_INTS;
        if (this.#i32[b + P_USED] !== 0) continue;
        this.#i32[b + P_USED] = 1;
        this.#i32[b + P_WAITING] = 0;
        this.#i32[b + P_FD] = notifyFd;
        Atomics.store(this.#i32, b + P_FAST, 0);
        return p;
      }
    } finally {
      this.#unlock();
    }
    throw new RangeError(`RangeLockTable: more than ${this.#nPart} drivers attached`);
  }

  /** Detaches a participant; it must have nothing in flight or queued. */
  unregister(p: number): void {
    this.#lock();
    const b = PART_BASE + p * PART_INTS;
    this.#i32[b + P_USED] = 0;
    this.#i32[b + P_WAITING] = 0;
    this.#i32[b + P_FD] = -1;
    this.#unlock();
  }

  /** Serialising requests pending or granted (tests, stats). */
  get serialising(): number {
    return Atomics.load(this.#i32, SERIALISING);
  }

  /** Entries in use (tests). */
  get entriesInUse(): number {
    let n = 0;
    for (let e = 0; e < this.#nEnt; e++) {
      if (Atomics.load(this.#i32, this.#entBase + e * ENT_INTS + E_STATE) !== FREE) n++;
    }
    return n;
  }

  /**
   * Starts a non-serialising write without entering it, when no serialising
   * request exists; false means take the slow path ({@link enqueue}).
   * Hot path: two atomics, no allocation.
   */
  fastBegin(p: number): boolean {
    const i32 = this.#i32, c = PART_BASE + p * PART_INTS + P_FAST;
    Atomics.add(i32, c, 1);
    if (Atomics.load(i32, SERIALISING) === 0) return true;
    this.fastEnd(p);
    return false;
  }

  /**
   * Ends a write started by a successful {@link fastBegin}. When the count
   * reaches zero while a serialising request exists, wakes the waiting
   * participants (it may be waiting for exactly this). Hot path.
   */
  fastEnd(p: number): void {
    const i32 = this.#i32;
    if (Atomics.sub(i32, PART_BASE + p * PART_INTS + P_FAST, 1) !== 1) return;
    if (Atomics.load(i32, SERIALISING) === 0) return;
    this.#lock();
    this.#wakeWaiters();
    this.#unlock();
  }

  /**
   * Enters a request over [lo, hi) for participant `p` and grants it if
   * nothing conflicts; returns the entry (see {@link granted}), or -1 when
   * the table is full (the participant is woken when an entry frees up).
   */
  enqueue(p: number, lo: number, hi: number, serialising: boolean): number {
    const i32 = this.#i32;
    // Raised before anything is read, so fast-path writers see it (Dekker).
    if (serialising) Atomics.add(i32, SERIALISING, 1);
    this.#lock();
    try {
      const base = this.#entBase;
      let e = 0;
      while (e < this.#nEnt && i32[base + e * ENT_INTS + E_STATE] !== FREE) e++;
      if (e === this.#nEnt) {
        if (serialising) Atomics.sub(i32, SERIALISING, 1);
        this.#setWaiting(p);
        return -1;
      }
      const b = base + e * ENT_INTS;
      i32[b + E_TICKET] = i32[TICKET];
      i32[TICKET] = (i32[TICKET] + 1) | 0;
      i32[b + E_SER] = serialising ? 1 : 0;
      i32[b + E_OWNER] = p;
      this.#f64[(b + E_LO) >> 1] = lo;
      this.#f64[(b + E_HI) >> 1] = hi;
      i32[b + E_STATE] = PENDING;
      if (e >= i32[HIGH]) i32[HIGH] = e + 1;
      this.#tryGrant(p, e);
      return e;
    } finally {
      this.#unlock();
    }
  }

  /** Whether entry `e` is granted (its request may run). */
  granted(e: number): boolean {
    return e >= 0 && Atomics.load(this.#i32, this.#entBase + e * ENT_INTS + E_STATE) === GRANTED;
  }

  /** Tries again to grant pending entry `e` of participant `p`; true once granted. */
  retry(p: number, e: number): boolean {
    this.#lock();
    try {
      return this.#tryGrant(p, e);
    } finally {
      this.#unlock();
    }
  }

  /** Frees entry `e` (granted or pending) and wakes every waiting participant. */
  release(e: number): void {
    const i32 = this.#i32, b = this.#entBase + e * ENT_INTS;
    this.#lock();
    const ser = i32[b + E_SER] !== 0;
    i32[b + E_STATE] = FREE;
    let high = i32[HIGH];
    while (high > 0 && i32[this.#entBase + (high - 1) * ENT_INTS + E_STATE] === FREE) high--;
    i32[HIGH] = high;
    if (ser) Atomics.sub(i32, SERIALISING, 1);
    this.#wakeWaiters();
    this.#unlock();
  }

  /** Under the lock: grants `e` unless an earlier entry or a fast write conflicts. */
  #tryGrant(p: number, e: number): boolean {
    const i32 = this.#i32, f64 = this.#f64, base = this.#entBase;
    const b = base + e * ENT_INTS;
    if (i32[b + E_STATE] === GRANTED) return true;
    const ser = i32[b + E_SER] !== 0, ticket = i32[b + E_TICKET];
    const lo = f64[(b + E_LO) >> 1], hi = f64[(b + E_HI) >> 1];
    const high = i32[HIGH];
    for (let o = 0; o < high; o++) {
      const ob = base + o * ENT_INTS;
      if (o === e || i32[ob + E_STATE] === FREE) continue;
      if (!ser && i32[ob + E_SER] === 0) continue;
      if (((i32[ob + E_TICKET] - ticket) | 0) >= 0) continue; // later: it waits for us
      if (f64[(ob + E_LO) >> 1] < hi && lo < f64[(ob + E_HI) >> 1]) {
        this.#setWaiting(p);
        return false;
      }
    }
    if (ser) {
      // Writes that started on the fast path before the count was raised.
      for (let q = 0; q < this.#nPart; q++) {
        if (Atomics.load(i32, PART_BASE + q * PART_INTS + P_FAST) !== 0) {
          this.#setWaiting(p);
          return false;
        }
      }
    }
    Atomics.store(i32, b + E_STATE, GRANTED);
    return true;
  }

  #setWaiting(p: number): void {
    this.#i32[PART_BASE + p * PART_INTS + P_WAITING] = 1;
  }

  /** Under the lock: clears every waiting flag and writes those participants' eventfds. */
  #wakeWaiters(): void {
    const i32 = this.#i32;
    for (let q = 0; q < this.#nPart; q++) {
      const b = PART_BASE + q * PART_INTS;
      if (i32[b + P_WAITING] === 0) continue;
      i32[b + P_WAITING] = 0;
      const fd = i32[b + P_FD];
      if (i32[b + P_USED] !== 0 && fd >= 0) eventfdWrite(fd, 1);
    }
  }

  #lock(): void {
    futexLock(this.#i32, LOCK);
  }

  #unlock(): void {
    futexUnlock(this.#i32, LOCK);
  }
}
