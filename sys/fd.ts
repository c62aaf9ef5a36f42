import { libc } from "./libc.ts";
import { check } from "./sys_error.ts";

/** fcntl command: get file status flags. */
export const F_GETFL = 3;
/** fcntl command: set file status flags. */
export const F_SETFL = 4;
/** fcntl command: get fd flags. */
export const F_GETFD = 1;
/** File status flag: non-blocking I/O. */
export const O_NONBLOCK = 0o4000;

/**
 * close(2). Throws SysError (EBADF) on a descriptor that is not open.
 *
 * @example
 * ```ts
 * import { close } from "./fd.ts";
 * import { memfdCreate } from "./mman.ts";
 * close(memfdCreate("x"));
 * ```
 */
export function close(fd: number): void {
  check("close", libc.close(fd));
}

/**
 * read(2) into `buf`; returns the byte count (0 at end of file).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { read, write, close } from "./fd.ts";
 * import { pipe } from "./fd.ts";
 * const [r, w] = pipe();
 * write(w, new Uint8Array([1]));
 * assert.equal(read(r, new Uint8Array(1)), 1);
 * close(r); close(w);
 * ```
 */
export function read(fd: number, buf: Uint8Array, length = buf.byteLength): number {
  return check("read", libc.read(fd, buf, BigInt(length)));
}

/**
 * write(2) from `buf`; returns the byte count.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { pipe, write } from "./fd.ts";
 * const [, w] = pipe();
 * assert.equal(write(w, new Uint8Array(3)), 3);
 * ```
 */
export function write(fd: number, buf: Uint8Array, length = buf.byteLength): number {
  return check("write", libc.write(fd, buf, BigInt(length)));
}

/**
 * pipe2(2) with O_CLOEXEC (plus `flags`); returns [readFd, writeFd].
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { pipe } from "./fd.ts";
 * const [r, w] = pipe();
 * assert.notEqual(r, w);
 * ```
 */
export function pipe(flags = 0): [number, number] {
  const fds = new Int32Array(2);
  check("pipe2", libc.pipe2(new Uint8Array(fds.buffer), 0o2000000 | flags));
  return [fds[0], fds[1]];
}

/**
 * Sets or clears O_NONBLOCK on `fd`.
 *
 * @example
 * ```ts
 * import { pipe, setNonBlocking } from "./fd.ts";
 * const [r] = pipe();
 * setNonBlocking(r, true);
 * ```
 */
export function setNonBlocking(fd: number, on: boolean): void {
  const fl = check("fcntl", libc.fcntl(fd, F_GETFL, 0));
  check("fcntl", libc.fcntl(fd, F_SETFL, on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK));
}

/**
 * The file status flags of `fd` (fcntl F_GETFL: O_NONBLOCK, O_APPEND, access mode).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { fileStatusFlags, O_NONBLOCK, pipe, setNonBlocking } from "./fd.ts";
 * const [r] = pipe();
 * setNonBlocking(r, true);
 * assert.notEqual(fileStatusFlags(r) & O_NONBLOCK, 0);
 * ```
 */
export function fileStatusFlags(fd: number): number {
  return check("fcntl", libc.fcntl(fd, F_GETFL, 0));
}

/**
 * Whether `fd` is an open descriptor (fcntl F_GETFD succeeds).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { isOpen } from "./fd.ts";
 * assert(!isOpen(-1));
 * ```
 */
export function isOpen(fd: number): boolean {
  return libc.fcntl(fd, F_GETFD, 0) >= 0;
}

/**
 * What `fd` refers to, as the kernel names it in /proc/self/fd (readlink):
 * `anon_inode:[eventfd]`, `pipe:[123]`, `socket:[45]`, `/memfd:ram (deleted)`,
 * a path; null when it cannot be read (`fd` not open, no /proc). fstat
 * cannot tell anonymous-inode fds apart (eventfd, timerfd, signalfd, epoll
 * and io_uring share one inode of mode 0600): this can. Control plane only
 * (a Deno fs op, not on the hot path).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { close, fdTarget, pipe } from "./fd.ts";
 * const [r, w] = pipe();
 * assert.match(fdTarget(r)!, /^pipe:\[\d+\]$/);
 * close(r); close(w);
 * assert.equal(fdTarget(-1), null);
 * ```
 */
export function fdTarget(fd: number): string | null {
  if (!Number.isInteger(fd) || fd < 0) return null;
  try {
    return Deno.readLinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return null;
  }
}
