/**
 * Files and block devices: open, positioned and vectored I/O, fdatasync,
 * fallocate, fstat/statx (with the direct-I/O alignment), the block-device
 * ioctls BLKGETSIZE64/BLKSSZGET and statfs for the filesystem type.
 *
 * Buffer forms take typed arrays; `*At` forms take a raw host address (guest
 * memory, bounce buffers). Every wrapper throws {@link SysError}; the block
 * layer's engines call the raw symbols on their hot paths instead.
 *
 * @module
 */

import { libc } from "./libc.ts";
import { check } from "./sys_error.ts";
import { cString, pointerFrom } from "./pointer.ts";
import { STAT, STATFS, STATX } from "./layout.ts";

/** open flag: read only. */
export const O_RDONLY = 0;
/** open flag: write only. */
export const O_WRONLY = 0o1;
/** open flag: read and write. */
export const O_RDWR = 0o2;
/** open flag: create if missing. */
export const O_CREAT = 0o100;
/** open flag: fail if it exists (with O_CREAT). */
export const O_EXCL = 0o200;
/** open flag: truncate to zero length. */
export const O_TRUNC = 0o1000;
/** open flag: writes complete as fdatasync would (data integrity). */
export const O_DSYNC = 0o10000;
/** open flag: bypass the page cache (QEMU cache=none). */
export const O_DIRECT = 0o40000;
/** open flag: close on exec (always added by {@link open}). */
export const O_CLOEXEC = 0o2000000;

/** fallocate mode: do not change the file size. */
export const FALLOC_FL_KEEP_SIZE = 0x01;
/** fallocate mode: deallocate the range (needs KEEP_SIZE): discard. */
export const FALLOC_FL_PUNCH_HOLE = 0x02;
/** fallocate mode: make the range read as zeroes: write-zeroes. */
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** statx mask bit: basic stats. */
export const STATX_BASIC_STATS = 0x7ff;
/** statx mask bit: direct I/O alignment (Linux 6.1). */
export const STATX_DIOALIGN = 0x2000;
/** statx / *at flag: operate on the fd itself (empty path). */
export const AT_EMPTY_PATH = 0x1000;

/** ioctl: size of a block device in bytes (u64). */
export const BLKGETSIZE64 = 0x80081272;
/** ioctl: logical sector size of a block device (int). */
export const BLKSSZGET = 0x1268;

/** st_mode file type mask. */
export const S_IFMT = 0o170000;
/** st_mode: regular file. */
export const S_IFREG = 0o100000;
/** st_mode: block device. */
export const S_IFBLK = 0o060000;

/** statfs f_type of tmpfs (no O_DIRECT before Linux 6.6). */
export const TMPFS_MAGIC = 0x01021994;
/** statfs f_type of ext2/3/4. */
export const EXT4_SUPER_MAGIC = 0xef53;

/**
 * open(2) with O_CLOEXEC added; returns the fd.
 *
 * @example
 * ```ts
 * import { open, O_RDONLY } from "./file.ts";
 * import { close } from "./fd.ts";
 * close(open("/proc/self/stat", O_RDONLY));
 * ```
 */
export function open(path: string, flags: number, mode = 0o644): number {
  return check("open", libc.open(cString(path), flags | O_CLOEXEC, mode), path);
}

/**
 * unlink(2).
 *
 * @example
 * ```ts
 * import { open, unlink, O_CREAT, O_RDWR } from "./file.ts";
 * import { close } from "./fd.ts";
 * const p = Deno.makeTempFileSync();
 * close(open(p, O_RDWR | O_CREAT));
 * unlink(p);
 * ```
 */
export function unlink(path: string): void {
  check("unlink", libc.unlink(cString(path)), path);
}

/**
 * pread(2) into `buf` at `offset`; returns the byte count.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, pread, O_RDONLY } from "./file.ts";
 * const fd = open("/proc/self/stat", O_RDONLY);
 * assert(pread(fd, new Uint8Array(8), 0) > 0);
 * ```
 */
export function pread(fd: number, buf: Uint8Array, offset: number): number {
  return check("pread", libc.pread(fd, buf, BigInt(buf.byteLength), BigInt(offset)));
}

/**
 * pwrite(2) of `buf` at `offset`; returns the byte count.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, pwrite, O_RDWR, O_CREAT } from "./file.ts";
 * const fd = open(Deno.makeTempFileSync(), O_RDWR | O_CREAT);
 * assert.equal(pwrite(fd, new Uint8Array(3), 10), 3);
 * ```
 */
export function pwrite(fd: number, buf: Uint8Array, offset: number): number {
  return check("pwrite", libc.pwrite(fd, buf, BigInt(buf.byteLength), BigInt(offset)));
}

/**
 * pread(2) of `len` bytes into host address `addr`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, preadAt, O_RDONLY } from "./file.ts";
 * import { addressOf } from "./pointer.ts";
 * const buf = new Uint8Array(8);
 * assert(preadAt(open("/proc/self/stat", O_RDONLY), addressOf(buf), 8, 0) > 0);
 * ```
 */
export function preadAt(fd: number, addr: number, len: number, offset: number): number {
  return check("pread", libc.pread_p(fd, pointerFrom(addr), BigInt(len), BigInt(offset)));
}

/**
 * pwrite(2) of `len` bytes from host address `addr`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, pwriteAt, O_RDWR } from "./file.ts";
 * import { addressOf } from "./pointer.ts";
 * const buf = new Uint8Array(4);
 * const fd = open(Deno.makeTempFileSync(), O_RDWR);
 * assert.equal(pwriteAt(fd, addressOf(buf), 4, 0), 4);
 * ```
 */
export function pwriteAt(fd: number, addr: number, len: number, offset: number): number {
  return check("pwrite", libc.pwrite_p(fd, pointerFrom(addr), BigInt(len), BigInt(offset)));
}

/**
 * preadv(2) with a C iovec array given as bytes (see IoVector.iov).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, preadv, O_RDONLY } from "./file.ts";
 * import { addressOf, IOVEC } from "./mod.ts";
 * const buf = new Uint8Array(16);
 * const iov = new BigUint64Array([BigInt(addressOf(buf)), 16n]);
 * const n = preadv(open("/proc/self/stat", O_RDONLY), new Uint8Array(iov.buffer), 1, 0);
 * assert.equal(n, 16);
 * assert.equal(IOVEC.size, 16);
 * ```
 */
export function preadv(fd: number, iov: Uint8Array, iovcnt: number, offset: number): number {
  return check("preadv", libc.preadv(fd, iov, iovcnt, BigInt(offset)));
}

/**
 * pwritev(2) with a C iovec array given as bytes.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, pwritev, O_RDWR } from "./file.ts";
 * import { addressOf } from "./mod.ts";
 * const buf = new Uint8Array(16);
 * const iov = new BigUint64Array([BigInt(addressOf(buf)), 16n]);
 * const fd = open(Deno.makeTempFileSync(), O_RDWR);
 * assert.equal(pwritev(fd, new Uint8Array(iov.buffer), 1, 0), 16);
 * ```
 */
export function pwritev(fd: number, iov: Uint8Array, iovcnt: number, offset: number): number {
  return check("pwritev", libc.pwritev(fd, iov, iovcnt, BigInt(offset)));
}

/**
 * preadv(2) with the iovec array at host address `iovAddr`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, preadvAt, O_RDONLY } from "./file.ts";
 * import { addressOf } from "./mod.ts";
 * const buf = new Uint8Array(4);
 * const iov = new BigUint64Array([BigInt(addressOf(buf)), 4n]);
 * assert.equal(preadvAt(open("/proc/self/stat", O_RDONLY), addressOf(iov), 1, 0), 4);
 * ```
 */
export function preadvAt(fd: number, iovAddr: number, iovcnt: number, offset: number): number {
  return check("preadv", libc.preadv_p(fd, pointerFrom(iovAddr), iovcnt, BigInt(offset)));
}

/**
 * pwritev(2) with the iovec array at host address `iovAddr`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, pwritevAt, O_RDWR } from "./file.ts";
 * import { addressOf } from "./mod.ts";
 * const buf = new Uint8Array(4);
 * const iov = new BigUint64Array([BigInt(addressOf(buf)), 4n]);
 * const fd = open(Deno.makeTempFileSync(), O_RDWR);
 * assert.equal(pwritevAt(fd, addressOf(iov), 1, 0), 4);
 * ```
 */
export function pwritevAt(fd: number, iovAddr: number, iovcnt: number, offset: number): number {
  return check("pwritev", libc.pwritev_p(fd, pointerFrom(iovAddr), iovcnt, BigInt(offset)));
}

/**
 * fdatasync(2): the flush of a raw image.
 *
 * @example
 * ```ts
 * import { open, fdatasync, O_RDWR } from "./file.ts";
 * fdatasync(open(Deno.makeTempFileSync(), O_RDWR));
 * ```
 */
export function fdatasync(fd: number): void {
  check("fdatasync", libc.fdatasync(fd));
}

/**
 * fallocate(2): preallocate, punch holes (discard) or zero ranges. Throws
 * SysError with EOPNOTSUPP where the filesystem lacks the mode.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, fallocate, fstat, O_RDWR } from "./file.ts";
 * const fd = open(Deno.makeTempFileSync(), O_RDWR);
 * fallocate(fd, 0, 0, 8192);
 * assert.equal(fstat(fd).size, 8192);
 * ```
 */
export function fallocate(fd: number, mode: number, offset: number, len: number): void {
  check("fallocate", libc.fallocate(fd, mode, BigInt(offset), BigInt(len)));
}

/**
 * {@link preadvAt} on a Deno blocking thread: the calling thread's event loop
 * keeps running, and one thread can have many calls in flight (the thread
 * pool's dispatching Worker). Resolves the byte count, or -1 when the call
 * failed: errno was set in the blocking thread and is lost here, so a caller
 * that needs it repeats the call with {@link preadvAt} (positioned I/O is
 * idempotent). Costs a thread hand-off each way (~36 us a round trip).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, preadvAtAsync, O_RDONLY } from "./file.ts";
 * import { addressOf } from "./mod.ts";
 * const buf = new Uint8Array(4);
 * const iov = new BigUint64Array([BigInt(addressOf(buf)), 4n]);
 * assert.equal(await preadvAtAsync(open("/proc/self/stat", O_RDONLY), addressOf(iov), 1, 0), 4);
 * assert.equal(await preadvAtAsync(-1, addressOf(iov), 1, 0), -1);
 * ```
 */
export async function preadvAtAsync(
  fd: number,
  iovAddr: number,
  iovcnt: number,
  offset: number,
): Promise<number> {
  return Number(await libc.preadv_async(fd, pointerFrom(iovAddr), iovcnt, BigInt(offset)));
}

/**
 * {@link pwritevAt} on a Deno blocking thread; resolves the byte count or -1
 * (errno lost: see {@link preadvAtAsync}).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, pwritevAtAsync, O_RDWR } from "./file.ts";
 * import { addressOf } from "./mod.ts";
 * const buf = new Uint8Array(4);
 * const iov = new BigUint64Array([BigInt(addressOf(buf)), 4n]);
 * const fd = open(Deno.makeTempFileSync(), O_RDWR);
 * assert.equal(await pwritevAtAsync(fd, addressOf(iov), 1, 0), 4);
 * ```
 */
export async function pwritevAtAsync(
  fd: number,
  iovAddr: number,
  iovcnt: number,
  offset: number,
): Promise<number> {
  return Number(await libc.pwritev_async(fd, pointerFrom(iovAddr), iovcnt, BigInt(offset)));
}

/**
 * fdatasync(2) on a Deno blocking thread; resolves 0 or -1. Unlike the I/O
 * forms, a failed fdatasync must not be repeated to learn errno: the kernel
 * reports a writeback error once per open file, so the second call may
 * succeed although data was lost.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { fdatasyncAsync, open, O_RDWR } from "./file.ts";
 * assert.equal(await fdatasyncAsync(open(Deno.makeTempFileSync(), O_RDWR)), 0);
 * assert.equal(await fdatasyncAsync(-1), -1);
 * ```
 */
export function fdatasyncAsync(fd: number): Promise<number> {
  return libc.fdatasync_async(fd);
}

/**
 * fallocate(2) on a Deno blocking thread; resolves 0 or -1 (errno lost:
 * repeat with {@link fallocate}, which is idempotent, to learn it).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { fallocateAsync, fstat, open, O_RDWR } from "./file.ts";
 * const fd = open(Deno.makeTempFileSync(), O_RDWR);
 * assert.equal(await fallocateAsync(fd, 0, 0, 4096), 0);
 * assert.equal(fstat(fd).size, 4096);
 * ```
 */
export function fallocateAsync(
  fd: number,
  mode: number,
  offset: number,
  len: number,
): Promise<number> {
  return libc.fallocate_async(fd, mode, BigInt(offset), BigInt(len));
}

/** The fields of `struct stat` the block layer uses. */
export interface FileStat {
  /** st_mode (type and permissions). */
  mode: number;
  /** Size in bytes (0 for block devices: use {@link blkGetSize64}). */
  size: number;
  /** Preferred I/O block size. */
  blksize: number;
  /** Allocated 512-byte blocks. */
  blocks: number;
  /** Whether this is a block device. */
  isBlockDevice: boolean;
  /** Whether this is a regular file. */
  isRegularFile: boolean;
}

/**
 * fstat(2).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, fstat, O_RDONLY } from "./file.ts";
 * assert.equal(fstat(open("/dev/null", O_RDONLY)).isRegularFile, false);
 * ```
 */
export function fstat(fd: number): FileStat {
  const buf = new Uint8Array(STAT.size);
  check("fstat", libc.fstat(fd, buf));
  const v = new DataView(buf.buffer);
  const mode = v.getUint32(STAT.st_mode, true);
  return {
    mode,
    size: Number(v.getBigInt64(STAT.st_size, true)),
    blksize: Number(v.getBigInt64(STAT.st_blksize, true)),
    blocks: Number(v.getBigInt64(STAT.st_blocks, true)),
    isBlockDevice: (mode & S_IFMT) === S_IFBLK,
    isRegularFile: (mode & S_IFMT) === S_IFREG,
  };
}

/** The fields of `struct statx` the block layer uses. */
export interface StatxResult {
  /** Which fields the kernel filled (STATX_* bits). */
  mask: number;
  /** Preferred I/O block size. */
  blksize: number;
  /** Size in bytes. */
  size: number;
  /** Required buffer alignment for O_DIRECT (0 if unknown / unsupported). */
  dioMemAlign: number;
  /** Required offset and length alignment for O_DIRECT (0 if unknown). */
  dioOffsetAlign: number;
}

/**
 * statx(2) on an open fd (AT_EMPTY_PATH), asking for basic stats and
 * STATX_DIOALIGN. The dio fields are 0 when the kernel or filesystem does not
 * report them (check `mask & STATX_DIOALIGN`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, statx, O_RDWR } from "./file.ts";
 * const st = statx(open(Deno.makeTempFileSync(), O_RDWR));
 * assert.equal(st.size, 0);
 * ```
 */
export function statx(fd: number, mask = STATX_BASIC_STATS | STATX_DIOALIGN): StatxResult {
  const buf = new Uint8Array(STATX.size);
  check("statx", libc.statx(fd, cString(""), AT_EMPTY_PATH, mask, buf));
  const v = new DataView(buf.buffer);
  const got = v.getUint32(STATX.stx_mask, true);
  const dio = (got & STATX_DIOALIGN) !== 0;
  return {
    mask: got,
    blksize: v.getUint32(STATX.stx_blksize, true),
    size: Number(v.getBigUint64(STATX.stx_size, true)),
    dioMemAlign: dio ? v.getUint32(STATX.stx_dio_mem_align, true) : 0,
    dioOffsetAlign: dio ? v.getUint32(STATX.stx_dio_offset_align, true) : 0,
  };
}

/**
 * ioctl(BLKGETSIZE64): the size of a block device in bytes. Throws SysError
 * (ENOTTY) on anything that is not a block device.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, blkGetSize64, O_RDONLY } from "./file.ts";
 * import { SysError } from "./sys_error.ts";
 * assert.throws(() => blkGetSize64(open("/dev/null", O_RDONLY)), SysError);
 * ```
 */
export function blkGetSize64(fd: number): number {
  const out = new BigUint64Array(1);
  check("ioctl(BLKGETSIZE64)", libc.ioctl(fd, BigInt(BLKGETSIZE64), new Uint8Array(out.buffer)));
  return Number(out[0]);
}

/**
 * ioctl(BLKSSZGET): the logical sector size of a block device.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { open, blkSszGet, O_RDONLY } from "./file.ts";
 * import { SysError } from "./sys_error.ts";
 * assert.throws(() => blkSszGet(open("/dev/null", O_RDONLY)), SysError);
 * ```
 */
export function blkSszGet(fd: number): number {
  const out = new Int32Array(1);
  check("ioctl(BLKSSZGET)", libc.ioctl(fd, BigInt(BLKSSZGET), new Uint8Array(out.buffer)));
  return out[0];
}

/**
 * statfs(2) `f_type` of the filesystem holding `path` (compare with
 * {@link TMPFS_MAGIC}): tests use it to avoid tmpfs for O_DIRECT.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { fsFilesystemType } from "./file.ts";
 * assert.equal(fsFilesystemType("/proc"), 0x9fa0); // PROC_SUPER_MAGIC
 * ```
 */
export function fsFilesystemType(path: string): number {
  const buf = new Uint8Array(STATFS.size);
  check("statfs", libc.statfs(cString(path), buf), path);
  return Number(new DataView(buf.buffer).getBigInt64(STATFS.f_type, true));
}

/**
 * memcpy between two host addresses (bounce buffers <-> guest memory). The
 * caller guarantees both ranges are mapped.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { copyMemory } from "./file.ts";
 * import { addressOf } from "./pointer.ts";
 * const a = new Uint8Array([1, 2, 3]), b = new Uint8Array(3);
 * copyMemory(addressOf(b), addressOf(a), 3);
 * assert.equal(b[2], 3);
 * ```
 */
export function copyMemory(dst: number, src: number, len: number): void {
  if (len > 0) libc.memcpy_a(BigInt(dst), BigInt(src), BigInt(len));
}

/**
 * memset of `len` bytes at host address `addr` (zero padding of short reads,
 * null-co read-zeroes).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { fillMemory } from "./file.ts";
 * import { addressOf } from "./pointer.ts";
 * const a = new Uint8Array([1, 2, 3]);
 * fillMemory(addressOf(a) + 1, 0, 2);
 * assert.equal(a[0], 1);
 * assert.equal(a[1], 0);
 * assert.equal(a[2], 0);
 * ```
 */
export function fillMemory(addr: number, byte: number, len: number): void {
  if (len > 0) libc.memset_a(BigInt(addr), byte, BigInt(len));
}
