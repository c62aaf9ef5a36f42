import { ENOSPC } from "../sys/mod.ts";
import type { IoVector } from "./io_vector.ts";
import type { BlockCompletion } from "./block_driver.ts";

/** Request opcodes shared by the engines. */
export const OP_READ = 0;
/** Write request. */
export const OP_WRITE = 1;
/** fdatasync request. */
export const OP_FLUSH = 2;
/** fallocate request. */
export const OP_FALLOCATE = 3;

/**
 * Per-request state of an engine, kept in parallel arrays indexed by a slot
 * number that travels through the kernel as `aio_data` / `user_data`. Slots
 * are recycled through a free list, so a warmed-up engine allocates nothing
 * per request (the arrays only grow when more requests are in flight than ever
 * before). Internal to block/.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { RequestSlots, OP_READ } from "./request_slots.ts";
 * const s = new RequestSlots();
 * const slot = s.alloc(OP_READ, 3, null, 0, 0, 0, () => {});
 * assert.equal(s.inUse, 1);
 * s.release(slot);
 * assert.equal(s.inUse, 0);
 * assert.equal(s.alloc(OP_READ, 3, null, 0, 0, 0, () => {}), slot);
 * ```
 */
export class RequestSlots {
  /** OP_* of each slot. */
  readonly op: number[] = [];
  /** File descriptor. */
  readonly fd: number[] = [];
  /** Data vector (reads and writes). */
  readonly qiov: (IoVector | null)[] = [];
  /** File offset. */
  readonly offset: number[] = [];
  /** Bytes expected (qiov.size) or the fallocate length. */
  readonly len: number[] = [];
  /** fallocate mode. */
  readonly mode: number[] = [];
  /** The caller's completion. */
  readonly cb: (BlockCompletion | null)[] = [];
  readonly #free: number[] = [];
  #inUse = 0;

  /** Slots currently holding a request. */
  get inUse(): number {
    return this.#inUse;
  }

  /** Takes a slot and records a request in it. Hot path. */
  alloc(
    op: number,
    fd: number,
    qiov: IoVector | null,
    offset: number,
    len: number,
    mode: number,
    cb: BlockCompletion,
  ): number {
    let slot: number;
    if (this.#free.length > 0) {
      slot = this.#free.pop()!;
      this.op[slot] = op;
      this.fd[slot] = fd;
      this.qiov[slot] = qiov;
      this.offset[slot] = offset;
      this.len[slot] = len;
      this.mode[slot] = mode;
      this.cb[slot] = cb;
    } else {
      slot = this.op.length;
      this.op.push(op);
      this.fd.push(fd);
      this.qiov.push(qiov);
      this.offset.push(offset);
      this.len.push(len);
      this.mode.push(mode);
      this.cb.push(cb);
    }
    this.#inUse++;
    return slot;
  }

  /** Returns a slot to the free list and drops its references. Hot path. */
  release(slot: number): void {
    this.qiov[slot] = null;
    this.cb[slot] = null;
    this.#free.push(slot);
    this.#inUse--;
  }

  /**
   * Turns a kernel result for `slot` into the engine result (QEMU's
   * qemu_laio_process_completion): full transfer -> 0, short read -> zero
   * padding and 0, short write -> -ENOSPC, errors unchanged; flush and
   * fallocate -> 0 or -errno. Then releases the slot and calls the callback.
   * Hot path.
   */
  complete(slot: number, res: number): void {
    const op = this.op[slot];
    let ret = res;
    if (op === OP_READ || op === OP_WRITE) {
      const want = this.len[slot];
      if (res === want) ret = 0;
      else if (res >= 0) {
        if (op === OP_READ) {
          this.qiov[slot]!.fill(res, 0);
          ret = 0;
        } else ret = -ENOSPC;
      }
    } else if (res > 0) ret = 0;
    const cb = this.cb[slot]!;
    this.release(slot);
    cb(ret);
  }
}

/**
 * A FIFO of slot numbers (a growable ring): the engines' pending queue of
 * requests not yet accepted by the kernel. Internal to block/.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { SlotFifo } from "./request_slots.ts";
 * const q = new SlotFifo(2);
 * q.push(1); q.push(2); q.push(3);
 * assert.equal(q.length, 3);
 * assert.equal(q.peek(0), 1);
 * assert.equal(q.shift(), 1);
 * ```
 */
export class SlotFifo {
  #ring: Int32Array;
  #head = 0;
  #length = 0;

  constructor(capacity = 64) {
    this.#ring = new Int32Array(Math.max(2, capacity));
  }

  /** Number of queued slots. */
  get length(): number {
    return this.#length;
  }

  /** Appends a slot (grows the ring when full). */
  push(slot: number): void {
    if (this.#length === this.#ring.length) this.#grow();
    this.#ring[(this.#head + this.#length) % this.#ring.length] = slot;
    this.#length++;
  }

  /** The k-th queued slot (0 = oldest). */
  peek(k: number): number {
    return this.#ring[(this.#head + k) % this.#ring.length];
  }

  /** Removes and returns the oldest slot. */
  shift(): number {
    const slot = this.#ring[this.#head];
    this.#head = (this.#head + 1) % this.#ring.length;
    this.#length--;
    return slot;
  }

  /** Removes the `n` oldest slots. */
  drop(n: number): void {
    this.#head = (this.#head + n) % this.#ring.length;
    this.#length -= n;
  }

  #grow(): void {
    const next = new Int32Array(this.#ring.length * 2);
    for (let i = 0; i < this.#length; i++) next[i] = this.peek(i);
    this.#ring = next;
    this.#head = 0;
  }
}
