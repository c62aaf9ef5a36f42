import { addressOf, IOVEC } from "../sys/mod.ts";

/**
 * QEMU's QEMUIOVector: a scatter-gather list kept as a real C `struct iovec`
 * array, so it can be handed to preadv/pwritev, Linux AIO (IOCB_CMD_PREADV)
 * and io_uring (IORING_OP_READV) without conversion.
 *
 * The array is allocated once with a fixed capacity; `reset()` and `add()` reuse
 * it, so a request object can own one IoVector for its whole life (hot path: no
 * allocation). Entries are host addresses: the caller keeps the memory alive
 * until the request completes.
 *
 * @example
 * ```ts
 * import { IoVector } from "./io_vector.ts";
 * const a = new Uint8Array(4096), b = new Uint8Array(512);
 * const qiov = IoVector.fromBuffers([a, b]);
 * console.assert(qiov.niov === 2 && qiov.size === 4608);
 * ```
 */
export class IoVector {
  /** The C iovec array (`capacity * 16` bytes), for FFI `buffer` parameters. */
  readonly iov: Uint8Array<ArrayBuffer>;
  /** Host address of {@link iov}, for raw-pointer parameters (iocb, SQE). */
  readonly iovAddr: number;
  /** Maximum number of entries. */
  readonly capacity: number;
  readonly #bases: Float64Array;
  readonly #lens: Float64Array;
  readonly #view: DataView;
  #niov = 0;
  #size = 0;
  /** Buffers handed to fromBuffers/addBuffer, kept alive with the vector. */
  #keep: Uint8Array[] = [];

  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1) {
      throw new RangeError(`IoVector: bad capacity ${capacity}`);
    }
    this.capacity = capacity;
    this.iov = new Uint8Array(capacity * IOVEC.size);
    this.iovAddr = addressOf(this.iov);
    this.#view = new DataView(this.iov.buffer);
    this.#bases = new Float64Array(capacity);
    this.#lens = new Float64Array(capacity);
  }

  /**
   * An IoVector over JS buffers (tests, bounce buffers, the client).
   *
   * @example
   * ```ts
   * import { IoVector } from "./io_vector.ts";
   * console.assert(IoVector.fromBuffers([new Uint8Array(8)]).size === 8);
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
   * Throws RangeError when full; callers bound the count first (seg_max).
   */
  add(addr: number, len: number): void {
    const i = this.#niov;
    if (i >= this.capacity) throw new RangeError("IoVector: capacity exceeded");
    const off = i * IOVEC.size;
    this.#view.setBigUint64(off + IOVEC.iov_base, BigInt(addr), true);
    this.#view.setBigUint64(off + IOVEC.iov_len, BigInt(len), true);
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

  /** Host address of entry `i`. */
  base(i: number): number {
    return this.#bases[i];
  }

  /** Length of entry `i`. */
  len(i: number): number {
    return this.#lens[i];
  }
}
