/**
 * io_uring: io_uring_setup/enter/register through `syscall`, the constants the
 * block layer uses, and {@link IoUringRings}, which mmaps the SQ ring, CQ ring
 * and SQE array and exposes them as typed arrays (indexes read and written with
 * `Atomics`, as the kernel's acquire/release protocol requires).
 *
 * @module
 */

import { libc } from "./libc.ts";
import { check, retOrErrno, SysError } from "./sys_error.ts";
import { EINVAL } from "./errno.ts";
import { addressOf, viewAt } from "./pointer.ts";
import {
  IO_CQRING_OFFSETS,
  IO_SQRING_OFFSETS,
  IO_URING_CQE,
  IO_URING_PARAMS,
  IO_URING_SQE,
} from "./layout.ts";
import { MAP_POPULATE, MAP_SHARED, mmap, munmap, PROT_READ, PROT_WRITE } from "./mman.ts";
import { close } from "./fd.ts";

const SYS_IO_URING_SETUP = 425n;
const SYS_IO_URING_ENTER = 426n;
const SYS_IO_URING_REGISTER = 427n;

/** Opcode: no-op. */
export const IORING_OP_NOP = 0;
/** Opcode: preadv (addr = iovec array, len = count). */
export const IORING_OP_READV = 1;
/** Opcode: pwritev. */
export const IORING_OP_WRITEV = 2;
/** Opcode: fsync (rw_flags IORING_FSYNC_DATASYNC for fdatasync). */
export const IORING_OP_FSYNC = 3;
/** Opcode: fallocate (off = offset, addr = length, len = mode). */
export const IORING_OP_FALLOCATE = 17;
/** fsync flag: fdatasync semantics. */
export const IORING_FSYNC_DATASYNC = 1;
/** io_uring_enter flag: wait for min_complete completions. */
export const IORING_ENTER_GETEVENTS = 1;
/** io_uring_setup flag: the application sets the CQ size (params.cq_entries). */
export const IORING_SETUP_CQSIZE = 1 << 3;
/** io_uring_setup flag: clamp sizes instead of failing. */
export const IORING_SETUP_CLAMP = 1 << 4;
/**
 * io_uring_setup flag: completion task work does not interrupt the task with an
 * IPI; it runs at the task's next kernel transition (Linux 5.19).
 */
export const IORING_SETUP_COOP_TASKRUN = 1 << 8;
/** io_uring_setup flag: the kernel sets IORING_SQ_TASKRUN while task work waits. */
export const IORING_SETUP_TASKRUN_FLAG = 1 << 9;
/** io_uring_setup flag: only the creating task submits (Linux 6.0). */
export const IORING_SETUP_SINGLE_ISSUER = 1 << 12;
/**
 * io_uring_setup flag: completion task work waits until the task enters with
 * IORING_ENTER_GETEVENTS; the registered eventfd is signalled when work
 * arrives, and no signal-like wake-up interrupts the task's other waits
 * (Linux 6.1; needs SINGLE_ISSUER).
 */
export const IORING_SETUP_DEFER_TASKRUN = 1 << 13;
/** SQ ring flag (with TASKRUN_FLAG): task work is pending; enter with GETEVENTS to run it. */
export const IORING_SQ_TASKRUN = 1 << 2;
/** Feature: the SQ and CQ rings share one mapping. */
export const IORING_FEAT_SINGLE_MMAP = 1 << 0;
/** Feature: CQ overflow is never dropped. */
export const IORING_FEAT_NODROP = 1 << 1;
/** mmap offset of the SQ ring. */
export const IORING_OFF_SQ_RING = 0;
/** mmap offset of the CQ ring. */
export const IORING_OFF_CQ_RING = 0x8000000;
/** mmap offset of the SQE array. */
export const IORING_OFF_SQES = 0x10000000;
/** io_uring_register opcode: signal completions on an eventfd. */
export const IORING_REGISTER_EVENTFD = 4;
/** io_uring_register opcode: stop signalling the eventfd. */
export const IORING_UNREGISTER_EVENTFD = 5;
/** SQ ring flag: the CQ ring overflowed; enter with GETEVENTS to flush. */
export const IORING_SQ_CQ_OVERFLOW = 1 << 1;

const SMALL: bigint[] = Array.from({ length: 4097 }, (_, i) => BigInt(i));
function big(n: number): bigint {
  return n >= 0 && n <= 4096 ? SMALL[n] : BigInt(n);
}

/**
 * io_uring_setup(2): `params` is a zeroed `IO_URING_PARAMS.size` buffer (with
 * flags/cq_entries set as wanted); the kernel fills the ring offsets. Returns
 * the ring fd.
 *
 * @example
 * ```ts
 * import { ioUringSetup } from "./io_uring.ts";
 * import { IO_URING_PARAMS } from "./layout.ts";
 * import { close } from "./fd.ts";
 * close(ioUringSetup(4, new Uint8Array(IO_URING_PARAMS.size)));
 * ```
 */
export function ioUringSetup(entries: number, params: Uint8Array): number {
  return check(
    "io_uring_setup",
    libc.syscall(SYS_IO_URING_SETUP, BigInt(entries), BigInt(addressOf(params)), 0n, 0n, 0n, 0n),
  );
}

/**
 * io_uring_enter(2) without a signal mask. Returns the number of SQEs consumed
 * or `-errno` (hot path: never throws). `fd` is passed as a bigint prepared
 * once.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ioUringSetup, ioUringEnter } from "./io_uring.ts";
 * import { IO_URING_PARAMS } from "./layout.ts";
 * const fd = ioUringSetup(4, new Uint8Array(IO_URING_PARAMS.size));
 * assert.equal(ioUringEnter(BigInt(fd), 0, 0, 0), 0);
 * ```
 */
export function ioUringEnter(
  fd: bigint,
  toSubmit: number,
  minComplete: number,
  flags: number,
): number {
  return retOrErrno(
    libc.syscall(SYS_IO_URING_ENTER, fd, big(toSubmit), big(minComplete), big(flags), 0n, 0n),
  );
}

/**
 * io_uring_register(2) with an argument buffer; throws SysError on failure.
 *
 * @example
 * ```ts
 * import { ioUringSetup, ioUringRegister, IORING_REGISTER_EVENTFD } from "./io_uring.ts";
 * import { IO_URING_PARAMS } from "./layout.ts";
 * const fd = ioUringSetup(4, new Uint8Array(IO_URING_PARAMS.size));
 * import { libc } from "./libc.ts";
 * const efd = new Int32Array([libc.eventfd(0, 0)]);
 * ioUringRegister(fd, IORING_REGISTER_EVENTFD, new Uint8Array(efd.buffer), 1);
 * ```
 */
export function ioUringRegister(
  fd: number,
  opcode: number,
  arg: Uint8Array,
  nrArgs: number,
): number {
  return check(
    "io_uring_register",
    libc.syscall(
      SYS_IO_URING_REGISTER,
      BigInt(fd),
      BigInt(opcode),
      BigInt(addressOf(arg)),
      BigInt(nrArgs),
      0n,
      0n,
    ),
  );
}

/** One io_uring instance: its fd and mapped rings. */
export interface IoUringRingsOptions {
  /** SQ size (rounded up to a power of two by the kernel). */
  entries: number;
  /** CQ size; default twice the SQ size. */
  cqEntries?: number;
  /**
   * io_uring_setup flag sets to try in order; the first the kernel accepts
   * (one that does not fail with EINVAL) is used. Default `[0]`.
   */
  setupFlags?: readonly number[];
}

/**
 * An io_uring with its rings mapped. The SQ side: `sqHead`/`sqTail` indexes
 * into `sqArray` (which holds SQE indexes) and `sqes` (64-byte entries, viewed
 * as u8/u32 arrays). The CQ side: `cqHead`/`cqTail` and `cqes` (16-byte
 * entries). All index loads/stores go through Atomics.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IoUringRings } from "./io_uring.ts";
 * const r = IoUringRings.create({ entries: 8 });
 * assert.equal(r.sqEntries, 8);
 * assert.equal(r.cqEntries, 16);
 * r.close();
 * ```
 */
export class IoUringRings {
  /** The ring fd. */
  readonly fd: number;
  /** The ring fd as a bigint, for io_uring_enter. */
  readonly fdBig: bigint;
  /** SQ entries. */
  readonly sqEntries: number;
  /** SQ index mask. */
  readonly sqMask: number;
  /** CQ entries. */
  readonly cqEntries: number;
  /** CQ index mask. */
  readonly cqMask: number;
  /** Kernel features (IORING_FEAT_*). */
  readonly features: number;
  /** The IORING_SETUP_* flags the ring was created with. */
  readonly setupFlags: number;
  /** SQ ring words (head, tail, flags, dropped, array live here). */
  readonly sqRing: Uint32Array;
  /** CQ ring words (head, tail, overflow, cqes live here). */
  readonly cqRing: Uint32Array;
  /** Word index of SQ head/tail/flags and of the SQ index array. */
  readonly sqOff: { head: number; tail: number; flags: number; dropped: number; array: number };
  /** Word index of CQ head/tail/overflow and of the first CQE. */
  readonly cqOff: { head: number; tail: number; overflow: number; cqes: number };
  /** The SQE array as bytes. */
  readonly sqes: Uint8Array;
  /** The SQE array as u32 words. */
  readonly sqes32: Uint32Array;
  #maps: [number, number][];
  #closed = false;

  private constructor(
    fd: number,
    p: DataView,
    maps: [number, number][],
    sqRing: ArrayBuffer,
    cqRing: ArrayBuffer,
    sqes: ArrayBuffer,
  ) {
    this.fd = fd;
    this.fdBig = BigInt(fd);
    this.#maps = maps;
    const sq = IO_URING_PARAMS.sq_off, cq = IO_URING_PARAMS.cq_off;
    const u = (o: number) => p.getUint32(o, true);
    this.sqEntries = u(IO_URING_PARAMS.sq_entries);
    this.cqEntries = u(IO_URING_PARAMS.cq_entries);
    this.features = u(IO_URING_PARAMS.features);
    this.setupFlags = u(IO_URING_PARAMS.flags);
    this.sqRing = new Uint32Array(sqRing);
    this.cqRing = new Uint32Array(cqRing);
    this.sqMask = this.sqRing[u(sq + IO_SQRING_OFFSETS.ring_mask) >> 2];
    this.cqMask = this.cqRing[u(cq + IO_CQRING_OFFSETS.ring_mask) >> 2];
    this.sqOff = {
      head: u(sq + IO_SQRING_OFFSETS.head) >> 2,
      tail: u(sq + IO_SQRING_OFFSETS.tail) >> 2,
      flags: u(sq + IO_SQRING_OFFSETS.flags) >> 2,
      dropped: u(sq + IO_SQRING_OFFSETS.dropped) >> 2,
      array: u(sq + IO_SQRING_OFFSETS.array) >> 2,
    };
    this.cqOff = {
      head: u(cq + IO_CQRING_OFFSETS.head) >> 2,
      tail: u(cq + IO_CQRING_OFFSETS.tail) >> 2,
      overflow: u(cq + IO_CQRING_OFFSETS.overflow) >> 2,
      cqes: u(cq + IO_CQRING_OFFSETS.cqes) >> 2,
    };
    this.sqes = new Uint8Array(sqes);
    this.sqes32 = new Uint32Array(sqes);
  }

  /** io_uring_setup + the three mmaps (two when IORING_FEAT_SINGLE_MMAP). */
  static create(opts: IoUringRingsOptions): IoUringRings {
    const params = new Uint8Array(IO_URING_PARAMS.size);
    const pv = new DataView(params.buffer);
    const tries = opts.setupFlags ?? [0];
    let fd = -1;
    for (let i = 0; fd < 0; i++) {
      params.fill(0);
      let flags = tries[i];
      if (opts.cqEntries) {
        flags |= IORING_SETUP_CQSIZE;
        pv.setUint32(IO_URING_PARAMS.cq_entries, opts.cqEntries, true);
      }
      pv.setUint32(IO_URING_PARAMS.flags, flags, true);
      try {
        fd = ioUringSetup(opts.entries, params);
      } catch (e) {
        // An older kernel refuses flags it does not know with EINVAL.
        if (!(e instanceof SysError && e.errno === EINVAL) || i === tries.length - 1) throw e;
      }
    }
    const maps: [number, number][] = [];
    try {
      const u = (o: number) => pv.getUint32(o, true);
      const sqEntries = u(IO_URING_PARAMS.sq_entries);
      const cqEntries = u(IO_URING_PARAMS.cq_entries);
      const features = u(IO_URING_PARAMS.features);
      let sqLen = u(IO_URING_PARAMS.sq_off + IO_SQRING_OFFSETS.array) + sqEntries * 4;
      let cqLen = u(IO_URING_PARAMS.cq_off + IO_CQRING_OFFSETS.cqes) +
        cqEntries * IO_URING_CQE.size;
      const single = (features & IORING_FEAT_SINGLE_MMAP) !== 0;
      if (single) sqLen = cqLen = Math.max(sqLen, cqLen);
      const prot = PROT_READ | PROT_WRITE, flags = MAP_SHARED | MAP_POPULATE;
      const sqAddr = mmap(sqLen, prot, flags, fd, IORING_OFF_SQ_RING);
      maps.push([sqAddr, sqLen]);
      let cqAddr = sqAddr;
      if (!single) {
        cqAddr = mmap(cqLen, prot, flags, fd, IORING_OFF_CQ_RING);
        maps.push([cqAddr, cqLen]);
      }
      const sqesLen = sqEntries * IO_URING_SQE.size;
      const sqesAddr = mmap(sqesLen, prot, flags, fd, IORING_OFF_SQES);
      maps.push([sqesAddr, sqesLen]);
      return new IoUringRings(
        fd,
        pv,
        maps,
        viewAt(sqAddr, sqLen),
        viewAt(cqAddr, cqLen),
        viewAt(sqesAddr, sqesLen),
      );
    } catch (e) {
      for (const [a, l] of maps) munmap(a, l);
      close(fd);
      throw e;
    }
  }

  /** Registers `eventfd` to be signalled on every completion. */
  registerEventfd(eventfd: number): void {
    ioUringRegister(
      this.fd,
      IORING_REGISTER_EVENTFD,
      new Uint8Array(new Int32Array([eventfd]).buffer),
      1,
    );
  }

  /** Unmaps the rings and closes the fd (drop every view first); idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const [a, l] of this.#maps) munmap(a, l);
    close(this.fd);
  }
}
