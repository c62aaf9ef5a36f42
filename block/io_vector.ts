import { addressOf, copyMemory, fillMemory, IOVEC } from "../sys/mod.ts";

/**
 * Linux's IOV_MAX (UIO_MAXIOV, <limits.h>): the most entries preadv/pwritev,
 * Linux AIO (IOCB_CMD_PREADV) and io_uring (IORING_OP_READV) accept in one
 * iovec; more fails with EINVAL. QEMU's block layer uses it as the default
 * `bs->bl.max_iov` (blk_get_max_iov) that devices keep their requests under.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IOV_MAX } from "./io_vector.ts";
 * assert.equal(IOV_MAX, 1024);
 * ```
 */
export const IOV_MAX = 1024;

/**
 * QEMU's QEMUIOVector: a scatter-gather list kept as a real C `struct iovec`
 * array, so it can be handed to preadv/pwritev, Linux AIO (IOCB_CMD_PREADV)
 * and io_uring (IORING_OP_READV) without conversion.
 *
 * The array is allocated with a capacity; `reset()` and `add()` reuse it, so a
 * request object can own one IoVector for its whole life (hot path: no
 * allocation). {@link reserve} grows it (a cold path: a request slot that
 * meets a longer request than ever before), so slots need not be sized for
 * the largest request up front. Entries are host addresses: the caller keeps
 * the memory alive until the request completes.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IoVector } from "./io_vector.ts";
 * const a = new Uint8Array(4096), b = new Uint8Array(512);
 * const qiov = IoVector.fromBuffers([a, b]);
 * assert.equal(qiov.niov, 2);
 * assert.equal(qiov.size, 4608);
 * ```
 */
export class IoVector {
  #iov: Uint8Array<ArrayBuffer>;
  #iovAddr: number;
  #capacity: number;
  #bases: Float64Array;
  #lens: Float64Array;
  #words: Uint32Array;
  #niov = 0;
  #size = 0;
  /** Buffers handed to fromBuffers/addBuffer, kept alive with the vector. */
  #keep: Uint8Array[] = [];

  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1) {
      throw new RangeError(`IoVector: bad capacity ${capacity}`);
    }
    this.#capacity = capacity;
    this.#iov = new Uint8Array(capacity * IOVEC.size);
    this.#iovAddr = addressOf(this.#iov);
    this.#words = new Uint32Array(this.#iov.buffer);
    this.#bases = new Float64Array(capacity);
    this.#lens = new Float64Array(capacity);
  }

  /**
   * The C iovec array (`capacity * 16` bytes), for FFI `buffer` parameters.
   * Replaced by {@link reserve}: read it when submitting, do not keep it.
   */
  get iov(): Uint8Array<ArrayBuffer> {
    return this.#iov;
  }

  /** Host address of {@link iov}, for raw-pointer parameters (iocb, SQE); see {@link iov}. */
  get iovAddr(): number {
    return this.#iovAddr;
  }

  /** Entries the vector holds without growing. */
  get capacity(): number {
    return this.#capacity;
  }

  /**
   * Grows the capacity to at least `n` entries, keeping the entries added
   * so far (a new C array: never while the vector is part of a request in
   * flight). No-op when it is large enough, so callers may call it per
   * request: it allocates only the first time a slot meets a request that
   * long.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { IoVector } from "./io_vector.ts";
   * const q = new IoVector(1);
   * q.add(4096, 512);
   * q.reserve(8);
   * q.add(8192, 512);
   * assert.equal(q.capacity, 8);
   * assert.equal(q.niov, 2);
   * assert.equal(q.base(0), 4096);
   * ```
   */
  reserve(n: number): void {
    if (n <= this.#capacity) return;
    if (!Number.isInteger(n)) throw new RangeError(`IoVector: bad capacity ${n}`);
    const iov = new Uint8Array(n * IOVEC.size);
    iov.set(this.#iov.subarray(0, this.#niov * IOVEC.size));
    const bases = new Float64Array(n), lens = new Float64Array(n);
    bases.set(this.#bases.subarray(0, this.#niov));
    lens.set(this.#lens.subarray(0, this.#niov));
    this.#iov = iov;
    this.#iovAddr = addressOf(iov);
    this.#words = new Uint32Array(iov.buffer);
    this.#bases = bases;
    this.#lens = lens;
    this.#capacity = n;
  }

  /**
   * An IoVector over JS buffers (tests, bounce buffers, the client).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { IoVector } from "./io_vector.ts";
   * assert.equal(IoVector.fromBuffers([new Uint8Array(8)]).size, 8);
   * ```
   */
  static fromBuffers(bufs: Uint8Array[]): IoVector {
    const q = new IoVector(Math.max(1, bufs.length));
    for (const b of bufs) q.addBuffer(b);
    return q;
  }

  /** Number of entries. */
  get niov(): number {
    return this.#niov;
  }

  /** Total bytes over all entries. */
  get size(): number {
    return this.#size;
  }

  /** Empties the vector (capacity is kept). Hot path: no allocation. */
  reset(): void {
    this.#niov = 0;
    this.#size = 0;
    if (this.#keep.length) this.#keep = [];
  }

  /**
   * Appends `len` bytes at host address `addr`. Hot path: no allocation.
   * Throws RangeError when full; callers bound the count first (seg_max) and
   * {@link reserve} what they need.
   */
  add(addr: number, len: number): void {
    const i = this.#niov;
    if (i >= this.#capacity) throw new RangeError("IoVector: capacity exceeded");
    // 64-bit fields as two u32 halves: no BigInt allocation on the hot path.
    const w = (i * IOVEC.size) >> 2, words = this.#words;
    words[w + (IOVEC.iov_base >> 2)] = addr >>> 0;
    words[w + (IOVEC.iov_base >> 2) + 1] = Math.floor(addr / 0x100000000);
    words[w + (IOVEC.iov_len >> 2)] = len >>> 0;
    words[w + (IOVEC.iov_len >> 2) + 1] = Math.floor(len / 0x100000000);
    this.#bases[i] = addr;
    this.#lens[i] = len;
    this.#niov = i + 1;
    this.#size += len;
  }

  /** Appends a JS buffer, keeping a reference to it until reset(). */
  addBuffer(buf: Uint8Array): void {
    this.add(addressOf(buf), buf.byteLength);
    this.#keep.push(buf);
  }

  /**
   * A new vector over this one's bytes from `from` on (qemu_iovec_concat of
   * the tail): what resubmitting the rest of a short read needs. Allocates
   * (a rare path). The memory stays owned by this vector's buffers.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { IoVector } from "./io_vector.ts";
   * const q = new IoVector(2);
   * q.add(4096, 512);
   * q.add(8192, 512);
   * const t = q.tail(600);
   * assert.equal(t.niov, 1);
   * assert.equal(t.base(0), 8192 + 88);
   * assert.equal(t.size, 424);
   * ```
   */
  tail(from: number): IoVector {
    if (!(from >= 0 && from <= this.#size)) throw new RangeError(`IoVector.tail: ${from}`);
    const t = new IoVector(Math.max(1, this.#niov));
    let skip = from;
    for (let i = 0; i < this.#niov; i++) {
      const len = this.#lens[i];
      if (skip >= len) {
        skip -= len;
        continue;
      }
      t.add(this.#bases[i] + skip, len - skip);
      skip = 0;
    }
    return t;
  }

  /** Host address of entry `i`. */
  base(i: number): number {
    return this.#bases[i];
  }

  /** Length of entry `i`. */
  len(i: number): number {
    return this.#lens[i];
  }

  /**
   * Whether every entry's address is a multiple of `memAlign` and every
   * length a multiple of `lenAlign` (QEMU's bdrv_qiov_is_aligned): what
   * O_DIRECT needs to use the vector without a bounce buffer. Hot path.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { IoVector } from "./io_vector.ts";
   * const q = new IoVector(2);
   * q.add(4096, 512);
   * assert(q.isAligned(512, 512));
   * assert(!q.isAligned(4096, 4096));
   * ```
   */
  isAligned(memAlign: number, lenAlign: number): boolean {
    for (let i = 0; i < this.#niov; i++) {
      if (this.#bases[i] % memAlign !== 0 || this.#lens[i] % lenAlign !== 0) return false;
    }
    return true;
  }

  /**
   * Gathers the whole vector into contiguous memory at host address `dst`
   * (qemu_iovec_to_buf), e.g. into a bounce buffer before a write.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { IoVector } from "./io_vector.ts";
   * import { addressOf } from "../sys/mod.ts";
   * const q = IoVector.fromBuffers([new Uint8Array([1, 2]), new Uint8Array([3])]);
   * const out = new Uint8Array(3);
   * q.copyTo(addressOf(out));
   * assert.equal(out.join(), "1,2,3");
   * ```
   */
  copyTo(dst: number): void {
    let off = 0;
    for (let i = 0; i < this.#niov; i++) {
      copyMemory(dst + off, this.#bases[i], this.#lens[i]);
      off += this.#lens[i];
    }
  }

  /**
   * Scatters `size` contiguous bytes at host address `src` into the vector
   * (qemu_iovec_from_buf), e.g. from a bounce buffer after a read.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { IoVector } from "./io_vector.ts";
   * import { addressOf } from "../sys/mod.ts";
   * const a = new Uint8Array(2), b = new Uint8Array(1);
   * IoVector.fromBuffers([a, b]).copyFrom(addressOf(new Uint8Array([7, 8, 9])));
   * assert.equal(a.join(), "7,8");
   * assert.equal(b[0], 9);
   * ```
   */
  copyFrom(src: number): void {
    let off = 0;
    for (let i = 0; i < this.#niov; i++) {
      copyMemory(this.#bases[i], src + off, this.#lens[i]);
      off += this.#lens[i];
    }
  }

  /**
   * Fills bytes `[from, size)` of the vector with `byte` (qemu_iovec_memset):
   * zero padding after a short read, null-co's read-zeroes.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { IoVector } from "./io_vector.ts";
   * const a = new Uint8Array([1, 1]), b = new Uint8Array([1, 1]);
   * IoVector.fromBuffers([a, b]).fill(1, 0);
   * assert.equal(a.join(), "1,0");
   * assert.equal(b.join(), "0,0");
   * ```
   */
  fill(from: number, byte: number): void {
    let start = 0;
    for (let i = 0; i < this.#niov; i++) {
      const len = this.#lens[i];
      const end = start + len;
      if (end > from) {
        const skip = from > start ? from - start : 0;
        fillMemory(this.#bases[i] + skip, byte, len - skip);
      }
      start = end;
    }
  }
}
