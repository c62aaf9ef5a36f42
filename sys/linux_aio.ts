/**
 * Linux native AIO (io_setup/io_submit/io_getevents/io_destroy) through
 * `syscall`, the iocb array helper and a user-space view of the kernel's
 * completion ring (struct aio_ring), which is mapped at the io context's
 * address so completions can be reaped without a system call.
 *
 * The submit and getevents wrappers return a count or `-errno` (never throw):
 * they are on the block layer's hot path, where EAGAIN is a normal answer.
 *
 * @module
 */

import { libc } from "./libc.ts";
import { check, retOrErrno } from "./sys_error.ts";
import { addressOf, viewAt } from "./pointer.ts";
import { AIO_RING, IO_EVENT, IOCB } from "./layout.ts";

/** x86_64 system call numbers. */
const SYS_IO_SETUP = 206n;
const SYS_IO_DESTROY = 207n;
const SYS_IO_GETEVENTS = 208n;
const SYS_IO_SUBMIT = 209n;

/** iocb opcode: pread. */
export const IOCB_CMD_PREAD = 0;
/** iocb opcode: pwrite. */
export const IOCB_CMD_PWRITE = 1;
/** iocb opcode: fsync (not supported by most filesystems). */
export const IOCB_CMD_FSYNC = 2;
/** iocb opcode: fdatasync (not supported by most filesystems). */
export const IOCB_CMD_FDSYNC = 3;
/** iocb opcode: no-op. */
export const IOCB_CMD_NOOP = 6;
/** iocb opcode: preadv (aio_buf = iovec array, aio_nbytes = count). */
export const IOCB_CMD_PREADV = 7;
/** iocb opcode: pwritev. */
export const IOCB_CMD_PWRITEV = 8;
/** iocb flag: signal completion on the eventfd in aio_resfd. */
export const IOCB_FLAG_RESFD = 1;
/** The magic at the start of the kernel's aio_ring (fs/aio.c AIO_RING_MAGIC). */
export const AIO_RING_MAGIC = 0xa10a10a1;
/** The incompat_features value this reader understands. */
export const AIO_RING_INCOMPAT_FEATURES = 0;

/** Cached small bigints so hot calls do not allocate for counts. */
const SMALL: bigint[] = Array.from({ length: 1025 }, (_, i) => BigInt(i));
function big(n: number): bigint {
  return n >= 0 && n <= 1024 ? SMALL[n] : BigInt(n);
}

/**
 * io_setup(2): creates an io context for `nr` in-flight requests and returns
 * its id (the address where the kernel mapped the aio_ring).
 *
 * @example
 * ```ts
 * import { ioSetup, ioDestroy } from "./linux_aio.ts";
 * const ctx = ioSetup(8);
 * ioDestroy(ctx);
 * ```
 */
export function ioSetup(nr: number): bigint {
  const out = new BigUint64Array(1);
  check("io_setup", libc.syscall(SYS_IO_SETUP, BigInt(nr), BigInt(addressOf(out)), 0n, 0n, 0n, 0n));
  return out[0];
}

/**
 * io_destroy(2): cancels what it can, waits for the rest, unmaps the ring.
 *
 * @example
 * ```ts
 * import { ioSetup, ioDestroy } from "./linux_aio.ts";
 * ioDestroy(ioSetup(1));
 * ```
 */
export function ioDestroy(ctx: bigint): void {
  check("io_destroy", libc.syscall(SYS_IO_DESTROY, ctx, 0n, 0n, 0n, 0n, 0n));
}

/**
 * io_submit(2) of `nr` iocbs whose pointers start at `iocbppAddr` (a bigint
 * host address, prepared once). Returns how many the kernel took (may be fewer
 * than `nr`) or `-errno` (`-EAGAIN` when the context is full). Hot path.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ioSetup, ioSubmit, ioDestroy } from "./linux_aio.ts";
 * const ctx = ioSetup(1);
 * assert.equal(ioSubmit(ctx, 0, 0n), 0);
 * ioDestroy(ctx);
 * ```
 */
export function ioSubmit(ctx: bigint, nr: number, iocbppAddr: bigint): number {
  return retOrErrno(libc.syscall(SYS_IO_SUBMIT, ctx, big(nr), iocbppAddr, 0n, 0n, 0n));
}

/**
 * io_getevents(2): reaps between `minNr` and `nr` events into the io_event
 * array at `eventsAddr`; `timeoutAddr` 0n waits forever (with minNr > 0).
 * Returns the count or `-errno`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ioSetup, ioGetevents, ioDestroy } from "./linux_aio.ts";
 * import { addressOf } from "./pointer.ts";
 * const ctx = ioSetup(1);
 * const ev = new Uint8Array(32), ts = new BigInt64Array(2); // zero timeout
 * assert.equal(ioGetevents(ctx, 0, 1, BigInt(addressOf(ev)), BigInt(addressOf(ts))), 0);
 * ioDestroy(ctx);
 * ```
 */
export function ioGetevents(
  ctx: bigint,
  minNr: number,
  nr: number,
  eventsAddr: bigint,
  timeoutAddr: bigint,
): number {
  return retOrErrno(
    libc.syscall(SYS_IO_GETEVENTS, ctx, big(minNr), big(nr), eventsAddr, timeoutAddr, 0n),
  );
}

/**
 * A fixed array of `struct iocb` plus the array of pointers to them that
 * io_submit takes, in memory that never moves. Fields are written through
 * 32-bit views (64-bit fields as two halves) so preparing an iocb allocates
 * nothing. `aio_data` carries a caller's slot number.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IocbArray, IOCB_CMD_PREADV } from "./linux_aio.ts";
 * const a = new IocbArray(4);
 * a.prepare(0, IOCB_CMD_PREADV, 3, 0x1000, 2, 8192, 0, -1);
 * a.setPointer(0, 0); // submission order position 0 -> iocb 0
 * assert.equal(a.data(0), 0);
 * assert(a.ptrsAddr > 0);
 * ```
 */
export class IocbArray {
  /** Number of iocbs. */
  readonly length: number;
  /** The iocbs (length * 64 bytes). */
  readonly bytes: Uint8Array<ArrayBuffer>;
  /** Host address of the first iocb. */
  readonly addr: number;
  /** The `struct iocb *` array io_submit reads (length * 8 bytes). */
  readonly ptrs: Uint8Array<ArrayBuffer>;
  /** Host address of {@link ptrs}. */
  readonly ptrsAddr: number;
  readonly #u32: Uint32Array;
  readonly #u16: Uint16Array;
  readonly #p32: Uint32Array;

  constructor(length: number) {
    this.length = length;
    this.bytes = new Uint8Array(length * IOCB.size);
    this.addr = addressOf(this.bytes);
    this.ptrs = new Uint8Array(length * 8);
    this.ptrsAddr = addressOf(this.ptrs);
    this.#u32 = new Uint32Array(this.bytes.buffer);
    this.#u16 = new Uint16Array(this.bytes.buffer);
    this.#p32 = new Uint32Array(this.ptrs.buffer);
  }

  /**
   * Fills iocb `i` (hot path: no allocation). `buf` is the data address (or
   * iovec array for the V opcodes), `nbytes` the length (or iovec count),
   * `resfd` an eventfd for IOCB_FLAG_RESFD or -1.
   */
  prepare(
    i: number,
    opcode: number,
    fd: number,
    buf: number,
    nbytes: number,
    offset: number,
    data: number,
    resfd: number,
  ): void {
    const w = (i * IOCB.size) >> 2;
    const u = this.#u32;
    u[w + (IOCB.aio_data >> 2)] = data >>> 0;
    u[w + (IOCB.aio_data >> 2) + 1] = 0;
    u[w + (IOCB.aio_key >> 2)] = 0;
    u[w + (IOCB.aio_rw_flags >> 2)] = 0;
    this.#u16[(i * IOCB.size + IOCB.aio_lio_opcode) >> 1] = opcode;
    this.#u16[(i * IOCB.size + IOCB.aio_reqprio) >> 1] = 0;
    u[w + (IOCB.aio_fildes >> 2)] = fd;
    u[w + (IOCB.aio_buf >> 2)] = buf >>> 0;
    u[w + (IOCB.aio_buf >> 2) + 1] = Math.floor(buf / 0x100000000);
    u[w + (IOCB.aio_nbytes >> 2)] = nbytes >>> 0;
    u[w + (IOCB.aio_nbytes >> 2) + 1] = Math.floor(nbytes / 0x100000000);
    u[w + (IOCB.aio_offset >> 2)] = offset >>> 0;
    u[w + (IOCB.aio_offset >> 2) + 1] = Math.floor(offset / 0x100000000);
    u[w + (IOCB.aio_reserved2 >> 2)] = 0;
    u[w + (IOCB.aio_reserved2 >> 2) + 1] = 0;
    u[w + (IOCB.aio_flags >> 2)] = resfd >= 0 ? IOCB_FLAG_RESFD : 0;
    u[w + (IOCB.aio_resfd >> 2)] = resfd >= 0 ? resfd : 0;
  }

  /** The aio_data (slot) of iocb `i`. */
  data(i: number): number {
    return this.#u32[(i * IOCB.size + IOCB.aio_data) >> 2];
  }

  /** Makes pointer-array position `pos` point at iocb `i`. Hot path. */
  setPointer(pos: number, i: number): void {
    const a = this.addr + i * IOCB.size;
    this.#p32[pos * 2] = a >>> 0;
    this.#p32[pos * 2 + 1] = Math.floor(a / 0x100000000);
  }
}

/**
 * The kernel's completion ring for one io context, read in user space as
 * libaio and QEMU's linux-aio do: `tail` is advanced by the kernel, `head` by
 * us. {@link AioRing.open} returns null when the magic or incompat_features do
 * not match (then io_getevents must be used).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ioSetup, ioDestroy, AioRing } from "./linux_aio.ts";
 * const ctx = ioSetup(4);
 * const ring = AioRing.open(ctx)!;
 * assert(ring.nr >= 4);
 * assert.equal(ring.head, ring.tail);
 * ioDestroy(ctx);
 * ```
 */
export class AioRing {
  /** Number of io_event slots in the ring. */
  readonly nr: number;
  readonly #hdr: Int32Array;
  readonly #ev: Uint32Array;

  private constructor(hdr: Int32Array, ev: Uint32Array, nr: number) {
    this.#hdr = hdr;
    this.#ev = ev;
    this.nr = nr;
  }

  /** Maps the ring of io context `ctx`, or null if it is not readable here. */
  static open(ctx: bigint): AioRing | null {
    const addr = Number(ctx);
    const head = new Uint32Array(viewAt(addr, AIO_RING.size));
    if (head[AIO_RING.magic >> 2] !== AIO_RING_MAGIC) return null;
    if (head[AIO_RING.incompat_features >> 2] !== AIO_RING_INCOMPAT_FEATURES) return null;
    if (head[AIO_RING.header_length >> 2] !== AIO_RING.size) return null;
    const nr = head[AIO_RING.nr >> 2];
    const buf = viewAt(addr, AIO_RING.size + nr * IO_EVENT.size);
    return new AioRing(new Int32Array(buf, 0, AIO_RING.size >> 2), new Uint32Array(buf), nr);
  }

  /** The consumer index (ours). */
  get head(): number {
    return Atomics.load(this.#hdr, AIO_RING.head >> 2);
  }

  /** The producer index (the kernel's). Read with acquire semantics. */
  get tail(): number {
    return Atomics.load(this.#hdr, AIO_RING.tail >> 2);
  }

  /** The ring's magic (AIO_RING_MAGIC while the context lives). */
  get magic(): number {
    return this.#hdr[AIO_RING.magic >> 2] >>> 0;
  }

  /** Publishes the new consumer index after the events were read. */
  setHead(head: number): void {
    Atomics.store(this.#hdr, AIO_RING.head >> 2, head);
  }

  /** Low 32 bits of io_event `i`'s `data` (the slot we put in aio_data). */
  data(i: number): number {
    return this.#ev[(AIO_RING.size + i * IO_EVENT.size + IO_EVENT.data) >> 2];
  }

  /** io_event `i`'s `res`: bytes transferred or -errno. */
  res(i: number): number {
    const w = (AIO_RING.size + i * IO_EVENT.size + IO_EVENT.res) >> 2;
    const lo = this.#ev[w];
    const hi = this.#ev[w + 1] | 0;
    return hi * 0x100000000 + lo;
  }
}
