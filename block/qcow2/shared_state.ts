import { futexLock, futexUnlock } from "../../aio/mod.ts";
import { eventfdWrite } from "../../sys/mod.ts";

// Header (Int32 indexes).
const MAGIC = 0;
const LOCK = 1; // futex mutex: 0 free, 1 locked, 2 locked with waiters
const OWNER = 2; // participant that owns the metadata; -1 none yet, -2 gone
const L1_GEN = 3; // bumped by the owner after every L1 entry it changed
const END = 4; // clusters allocated so far (the file's end / cluster size), owner-written
const NPART = 5;
const NSLOT = 6;
const RT_OFF = 7; // the refcount table's cluster index (0: as in every driver's header)
const RT_CLUSTERS = 8;
const PART_BASE = 16;
const P_INTS = 2; // used, eventfd
const VERSIONS = 4096; // L2 table versions, hashed by the table's cluster index
const SLOT_INTS = 16;
// A slot: state, from, mode, ret, inCluster, len, then cluster and addr as float64.
const S_STATE = 0, S_FROM = 1, S_MODE = 2, S_RET = 3, S_IN = 4, S_LEN = 5;
const S_CLUSTER = 8, S_ADDR = 10;
const FREE = 0, FILLING = 1, QUEUED = 2, TAKEN = 3, DONE = 4;
const MAGIC_VALUE = 0x51433253;
/** What a forwarded allocating write does (see the driver's AllocatingWrite). */
export type Qcow2AllocMode = "write" | "zero" | "discard";
const MODES: readonly Qcow2AllocMode[] = ["write", "zero", "discard"];

/** One allocating write forwarded to the owner, as the owner sees it. */
export interface Qcow2ForwardedWrite {
  /** Slot index (pass it back to {@link Qcow2SharedState.complete}). */
  slot: number;
  mode: Qcow2AllocMode;
  /** Guest cluster index. */
  cluster: number;
  /** Offset of the data inside the cluster. */
  inCluster: number;
  /** Bytes. */
  len: number;
  /** Host address of the data ("write"; valid until completed). */
  addr: number;
}

/**
 * The state that every IOThread's {@link Qcow2Driver} of one writable image
 * shares, in one SharedArrayBuffer (see docs/design.md, "Who owns the
 * metadata"). One driver, the first to attach, is the *owner*: only it
 * allocates clusters and changes L1/L2 entries and refcounts. The others
 * forward their allocating writes (copy on write, write-zeroes as zero
 * clusters, discards) through the slots here and keep doing reads and
 * in-place writes to COPIED clusters themselves, from their own L1 copy and
 * L2 cache, which stay coherent through three numbers the owner publishes
 * after its disk writes completed and before it completes the request:
 *
 * - the L1 generation (a new L2 table was linked: reload the L1 table);
 * - a version per L2 table (hashed into 4096 counters: a cached table whose
 *   counter moved is read again);
 * - the number of clusters allocated (the file's end, for the overlap check).
 *
 * Waiting never blocks a thread's loop: a forwarded write is announced with
 * an eventfd write to the owner's context, its completion with one to the
 * forwarder's. A short futex mutex guards the participant table and those
 * eventfd writes (so a participant that detaches, closing its eventfd, is
 * never written to afterwards).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Qcow2SharedState } from "./shared_state.ts";
 * const s = Qcow2SharedState.create({ slots: 4 });
 * const owner = s.attach(-1), other = new Qcow2SharedState(s.shared).attach(-1);
 * assert.equal(s.isOwner(owner), true);
 * assert.equal(s.isOwner(other), false);
 * const slot = s.forward(other, "zero", 7, 0, 65536, 0);
 * assert.equal(slot >= 0, true);
 * const [w] = s.takeQueued();
 * assert.equal(w.cluster, 7);
 * s.complete(w.slot, 0);
 * assert.equal(s.reap(slot), 0);
 * ```
 */
export class Qcow2SharedState {
  /** The memory to hand to other threads. */
  readonly shared: SharedArrayBuffer;
  readonly #i32: Int32Array;
  readonly #f64: Float64Array;
  readonly #nPart: number;
  readonly #nSlot: number;
  readonly #verBase: number;
  readonly #slotBase: number;
  #hint = 0;

  /** Wraps a state made by {@link Qcow2SharedState.create} (in any thread). */
  constructor(shared: SharedArrayBuffer) {
    this.shared = shared;
    this.#i32 = new Int32Array(shared);
    this.#f64 = new Float64Array(shared);
    if (this.#i32[MAGIC] !== MAGIC_VALUE) throw new TypeError("not a Qcow2SharedState");
    this.#nPart = this.#i32[NPART];
    this.#nSlot = this.#i32[NSLOT];
    this.#verBase = PART_BASE + this.#nPart * P_INTS;
    this.#slotBase = this.#verBase + VERSIONS;
  }

  /** Allocates the state for one image (before any driver attaches). */
  static create(opts: { participants?: number; slots?: number } = {}): Qcow2SharedState {
    const nPart = opts.participants ?? 64, nSlot = opts.slots ?? 256;
    if (!(nPart >= 1 && nSlot >= 1)) throw new RangeError("Qcow2SharedState: bad sizes");
    const ints = PART_BASE + nPart * P_INTS + VERSIONS + nSlot * SLOT_INTS;
    const sab = new SharedArrayBuffer(ints * 4);
    const i32 = new Int32Array(sab);
    i32[NPART] = nPart;
    i32[NSLOT] = nSlot;
    i32[OWNER] = -1;
    for (let p = 0; p < nPart; p++) i32[PART_BASE + p * P_INTS + 1] = -1;
    Atomics.store(i32, MAGIC, MAGIC_VALUE);
    return new Qcow2SharedState(sab);
  }

  /**
   * Attaches a driver woken through eventfd `notifyFd` (-1: never, tests);
   * the first one attached becomes the owner. Returns the participant.
   */
  attach(notifyFd: number): number {
    this.#lock();
    try {
      for (let p = 0; p < this.#nPart; p++) {
        const b = PART_BASE + p * P_INTS;
        if (this.#i32[b] !== 0) continue;
        this.#i32[b] = 1;
        this.#i32[b + 1] = notifyFd;
        if (this.#i32[OWNER] === -1) Atomics.store(this.#i32, OWNER, p);
        return p;
      }
    } finally {
      this.#unlock();
    }
    throw new RangeError(`Qcow2SharedState: more than ${this.#nPart} drivers attached`);
  }

  /**
   * Detaches a participant. When the owner leaves, nobody allocates any
   * more: forwarded writes still queued fail with `-EIO` (`failWith`), later
   * ones too ({@link forward} returns -2).
   */
  detach(p: number, failWith: number): void {
    this.#lock();
    const b = PART_BASE + p * P_INTS;
    this.#i32[b] = 0;
    this.#i32[b + 1] = -1;
    if (Atomics.load(this.#i32, OWNER) === p) {
      Atomics.store(this.#i32, OWNER, -2);
      for (let s = 0; s < this.#nSlot; s++) {
        const sb = this.#slotBase + s * SLOT_INTS;
        if (Atomics.load(this.#i32, sb + S_STATE) !== QUEUED) continue;
        this.#i32[sb + S_RET] = failWith;
        Atomics.store(this.#i32, sb + S_STATE, DONE);
        this.#wake(this.#i32[sb + S_FROM]);
      }
    }
    this.#unlock();
  }

  /** Whether participant `p` owns the metadata. */
  isOwner(p: number): boolean {
    return Atomics.load(this.#i32, OWNER) === p;
  }

  /** The L1 generation (hot path: one atomic load). */
  get l1Generation(): number {
    return Atomics.load(this.#i32, L1_GEN);
  }

  /** Owner: an L1 entry changed (after its sector was written). */
  bumpL1(): void {
    Atomics.add(this.#i32, L1_GEN, 1);
  }

  /** The version of the L2 table at cluster index `tableCluster` (hot path). */
  l2Version(tableCluster: number): number {
    return Atomics.load(this.#i32, this.#verBase + (tableCluster & (VERSIONS - 1)));
  }

  /** Owner: an entry of the L2 table at cluster index `tableCluster` changed. */
  bumpL2(tableCluster: number): void {
    Atomics.add(this.#i32, this.#verBase + (tableCluster & (VERSIONS - 1)), 1);
  }

  /** Clusters allocated so far (the file's end in clusters). */
  get endClusters(): number {
    return Atomics.load(this.#i32, END) >>> 0;
  }

  /** Owner: the file now reaches `clusters` clusters. */
  setEndClusters(clusters: number): void {
    if (clusters > this.endClusters) Atomics.store(this.#i32, END, clusters >>> 0);
  }

  /** Owner: the refcount table moved to cluster index `offCluster` (`clusters` long). */
  setRefcountTable(offCluster: number, clusters: number): void {
    Atomics.store(this.#i32, RT_CLUSTERS, clusters);
    Atomics.store(this.#i32, RT_OFF, offCluster);
  }

  /** The refcount table's cluster index as the owner last moved it (0: never moved). */
  get refcountTableCluster(): number {
    return Atomics.load(this.#i32, RT_OFF) >>> 0;
  }

  /** Its length in clusters (with {@link refcountTableCluster}). */
  get refcountTableClusters(): number {
    return Atomics.load(this.#i32, RT_CLUSTERS);
  }

  /**
   * Forwards an allocating write to the owner: returns its slot (watch it
   * with {@link reap}), -1 when every slot is busy (try again after one of
   * yours completes), -2 when no owner is there any more.
   */
  forward(
    from: number,
    mode: Qcow2AllocMode,
    cluster: number,
    inCluster: number,
    len: number,
    addr: number,
  ): number {
    const owner = Atomics.load(this.#i32, OWNER);
    if (owner < 0) return -2;
    const i32 = this.#i32;
    for (let k = 0; k < this.#nSlot; k++) {
      const s = (this.#hint + k) % this.#nSlot;
      const sb = this.#slotBase + s * SLOT_INTS;
      if (Atomics.compareExchange(i32, sb + S_STATE, FREE, FILLING) !== FREE) continue;
      this.#hint = s + 1;
      i32[sb + S_FROM] = from;
      i32[sb + S_MODE] = MODES.indexOf(mode);
      i32[sb + S_RET] = 0;
      i32[sb + S_IN] = inCluster;
      i32[sb + S_LEN] = len;
      this.#f64[(sb + S_CLUSTER) >> 1] = cluster;
      this.#f64[(sb + S_ADDR) >> 1] = addr;
      Atomics.store(i32, sb + S_STATE, QUEUED);
      this.#lock();
      const o = Atomics.load(i32, OWNER);
      if (o >= 0) this.#wake(o);
      else {
        i32[sb + S_RET] = -5; // EIO: the owner left meanwhile
        Atomics.compareExchange(i32, sb + S_STATE, QUEUED, DONE);
      }
      this.#unlock();
      return s;
    }
    return -1;
  }

  /** Owner: takes every queued forwarded write. */
  takeQueued(): Qcow2ForwardedWrite[] {
    const out: Qcow2ForwardedWrite[] = [], i32 = this.#i32;
    for (let s = 0; s < this.#nSlot; s++) {
      const sb = this.#slotBase + s * SLOT_INTS;
      if (Atomics.compareExchange(i32, sb + S_STATE, QUEUED, TAKEN) !== QUEUED) continue;
      out.push({
        slot: s,
        mode: MODES[i32[sb + S_MODE]] ?? "write",
        cluster: this.#f64[(sb + S_CLUSTER) >> 1],
        inCluster: i32[sb + S_IN],
        len: i32[sb + S_LEN],
        addr: this.#f64[(sb + S_ADDR) >> 1],
      });
    }
    return out;
  }

  /** Owner: a taken write completed with `ret`; wakes its forwarder. */
  complete(slot: number, ret: number): void {
    const sb = this.#slotBase + slot * SLOT_INTS;
    this.#i32[sb + S_RET] = ret;
    Atomics.store(this.#i32, sb + S_STATE, DONE);
    this.#lock();
    this.#wake(this.#i32[sb + S_FROM]);
    this.#unlock();
  }

  /** Forwarder: the result of `slot` (which is then free again), or null while it runs. */
  reap(slot: number): number | null {
    const sb = this.#slotBase + slot * SLOT_INTS;
    if (Atomics.load(this.#i32, sb + S_STATE) !== DONE) return null;
    const ret = this.#i32[sb + S_RET];
    Atomics.store(this.#i32, sb + S_STATE, FREE);
    return ret;
  }

  /** Under the lock: writes participant `p`'s eventfd if it is attached. */
  #wake(p: number): void {
    const b = PART_BASE + p * P_INTS;
    const fd = this.#i32[b + 1];
    if (this.#i32[b] !== 0 && fd >= 0) eventfdWrite(fd, 1);
  }

  #lock(): void {
    futexLock(this.#i32, LOCK);
  }

  #unlock(): void {
    futexUnlock(this.#i32, LOCK);
  }
}
