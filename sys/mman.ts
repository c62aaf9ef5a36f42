import { libc } from "./libc.ts";
import { check, lastErrno, SysError } from "./sys_error.ts";
import { cString, pointerFrom, viewAt } from "./pointer.ts";

/** mmap protection: readable (sys/mman.h). */
export const PROT_READ = 0x1;
/** mmap protection: writable. */
export const PROT_WRITE = 0x2;
/** mmap protection: none (guard pages). */
export const PROT_NONE = 0x0;
/** mmap flag: changes are shared with other mappings of the same object. */
export const MAP_SHARED = 0x01;
/** mmap flag: private copy-on-write mapping. */
export const MAP_PRIVATE = 0x02;
/** mmap flag: not backed by a file. */
export const MAP_ANONYMOUS = 0x20;
/** mmap flag: populate (prefault) the pages. */
export const MAP_POPULATE = 0x8000;
/** memfd_create flag: close on exec. */
export const MFD_CLOEXEC = 0x1;
/** memfd_create flag: allow seals. */
export const MFD_ALLOW_SEALING = 0x2;
/** fcntl command: add seals to a memfd (linux/fcntl.h). */
export const F_ADD_SEALS = 1033;
/** fcntl command: read a memfd's seals. */
export const F_GET_SEALS = 1034;
/** Seal: the file cannot shrink. */
export const F_SEAL_SHRINK = 0x0002;

const MAP_FAILED = -1n;

/**
 * A live memory mapping. `bytes` views it without copying; `unmap()` releases
 * it (after which every view is invalid: drop them first).
 *
 * @example
 * ```ts
 * import { mmapAnonymous } from "./mman.ts";
 * const m = mmapAnonymous(4096);
 * m.bytes[0] = 7;
 * m.unmap();
 * ```
 */
export class MappedRegion {
  /** Host address of the first byte. */
  readonly addr: number;
  /** Length in bytes. */
  readonly length: number;
  #buffer: ArrayBuffer | undefined;
  #unmapped = false;

  constructor(addr: number, length: number) {
    this.addr = addr;
    this.length = length;
  }

  /** The whole mapping as an ArrayBuffer (created once). */
  get buffer(): ArrayBuffer {
    if (this.#unmapped) throw new Error("MappedRegion: used after unmap");
    this.#buffer ??= viewAt(this.addr, this.length);
    return this.#buffer;
  }

  /** The whole mapping as bytes (a new view over {@link buffer}). */
  get bytes(): Uint8Array {
    return new Uint8Array(this.buffer);
  }

  /** Whether {@link unmap} has run. */
  get unmapped(): boolean {
    return this.#unmapped;
  }

  /** munmap the region; idempotent. */
  unmap(): void {
    if (this.#unmapped) return;
    this.#unmapped = true;
    this.#buffer = undefined;
    munmap(this.addr, this.length);
  }
}

/**
 * mmap(2). Returns the address; throws SysError on MAP_FAILED.
 *
 * @example
 * ```ts
 * import { mmap, munmap, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS } from "./mman.ts";
 * const a = mmap(4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
 * munmap(a, 4096);
 * ```
 */
export function mmap(
  length: number,
  prot: number,
  flags: number,
  fd: number,
  offset: number,
  hint = 0,
): number {
  const p = libc.mmap(pointerFrom(hint), BigInt(length), prot, flags, fd, BigInt(offset));
  // errno first: UnsafePointer.value is a Deno op, which can clobber it.
  const errno = lastErrno();
  const v = BigInt(Deno.UnsafePointer.value(p));
  if (v === (MAP_FAILED & 0xffffffffffffffffn) || v === 0n) {
    throw new SysError("mmap", errno, `length ${length} offset ${offset}`);
  }
  return Number(v);
}

/**
 * munmap(2).
 *
 * @example
 * ```ts
 * import { mmapAnonymous } from "./mman.ts";
 * mmapAnonymous(4096).unmap(); // calls munmap
 * ```
 */
export function munmap(addr: number, length: number): void {
  check("munmap", libc.munmap(pointerFrom(addr), BigInt(length)));
}

/**
 * mprotect(2): used to make guard pages around regions in tests.
 *
 * @example
 * ```ts
 * import { mmapAnonymous, mprotect, PROT_NONE } from "./mman.ts";
 * const m = mmapAnonymous(8192);
 * mprotect(m.addr + 4096, 4096, PROT_NONE);
 * m.unmap();
 * ```
 */
export function mprotect(addr: number, length: number, prot: number): void {
  check("mprotect", libc.mprotect(pointerFrom(addr), BigInt(length), prot));
}

/**
 * A private anonymous read-write mapping: page-aligned memory that satisfies
 * any O_DIRECT alignment (bounce buffers, rings, test guest memory).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { mmapAnonymous } from "./mman.ts";
 * const m = mmapAnonymous(1 << 20);
 * assert.equal(m.addr % 4096, 0);
 * m.unmap();
 * ```
 */
export function mmapAnonymous(length: number): MappedRegion {
  const addr = mmap(length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return new MappedRegion(addr, length);
}

/**
 * Maps `length` bytes of `fd` at `offset`, shared and read-write (guest memory
 * regions received over vhost-user, memfd-backed test memory).
 *
 * @example
 * ```ts
 * import { memfdCreate, ftruncate, mmapShared } from "./mman.ts";
 * import { close } from "./fd.ts";
 * const fd = memfdCreate("guest");
 * ftruncate(fd, 1 << 20);
 * const m = mmapShared(fd, 1 << 20, 0);
 * m.unmap();
 * close(fd);
 * ```
 */
export function mmapShared(fd: number, length: number, offset: number): MappedRegion {
  const addr = mmap(length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset);
  return new MappedRegion(addr, length);
}

/**
 * memfd_create(2) with MFD_CLOEXEC (plus `flags`). Returns the fd.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { memfdCreate } from "./mman.ts";
 * const fd = memfdCreate("ram");
 * assert(fd >= 0);
 * ```
 */
export function memfdCreate(name: string, flags = 0): number {
  return check("memfd_create", libc.memfd_create(cString(name), MFD_CLOEXEC | flags));
}

/**
 * Makes sure `fd` cannot shrink (F_SEAL_SHRINK), adding the seal when the
 * file allows it: a MAP_SHARED mapping of a file that shrinks raises SIGBUS
 * on access to the lost pages. Returns whether the file is sealed against
 * shrinking now (false for files without seals, e.g. a memfd created without
 * MFD_ALLOW_SEALING, a regular file, or one sealed with F_SEAL_SEAL first).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, MFD_ALLOW_SEALING, memfdCreate, sealShrink } from "./mman.ts";
 * const fd = memfdCreate("ram", MFD_ALLOW_SEALING);
 * ftruncate(fd, 8192);
 * assert(sealShrink(fd));
 * assert.throws(() => ftruncate(fd, 4096), { code: "EPERM" });
 * assert(!sealShrink(memfdCreate("plain")));
 * ```
 */
export function sealShrink(fd: number): boolean {
  const seals = libc.fcntl(fd, F_GET_SEALS, 0);
  if (seals < 0) return false; // not a sealable file
  if ((seals & F_SEAL_SHRINK) !== 0) return true;
  return libc.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) === 0;
}

/**
 * ftruncate(2).
 *
 * @example
 * ```ts
 * import { memfdCreate, ftruncate } from "./mman.ts";
 * ftruncate(memfdCreate("x"), 4096);
 * ```
 */
export function ftruncate(fd: number, length: number): void {
  check("ftruncate", libc.ftruncate(fd, BigInt(length)));
}
