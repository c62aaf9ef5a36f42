import { errnoName } from "./errno.ts";
import { libc } from "./libc.ts";

/**
 * A failed system call: carries errno, its name and the call that failed.
 * Every sys/ wrapper throws this instead of returning -1.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { SysError, EBADF } from "./mod.ts";
 * const err = new SysError("close", EBADF);
 * assert.equal(err.code, "EBADF");
 * assert.equal(err.message, "close: EBADF (errno 9)");
 * ```
 */
export class SysError extends Error {
  /** The errno value (positive). */
  readonly errno: number;
  /** The errno name, e.g. `EAGAIN`. */
  readonly code: string;
  /** The libc function or system call that failed. */
  readonly call: string;

  constructor(call: string, errno: number, detail?: string) {
    const code = errnoName(errno);
    super(`${call}: ${code} (errno ${errno})${detail ? `: ${detail}` : ""}`);
    this.name = "SysError";
    this.errno = errno;
    this.code = code;
    this.call = call;
  }
}

/**
 * This thread's errno as a plain memory word: `__errno_location()` is per thread
 * and constant for the thread's life, and every Worker evaluates this module
 * anew, so the view is made once, eagerly, on the thread that reads it.
 *
 * Why a typed array and not `Deno.UnsafePointerView#getInt32`: that getter is
 * an op, and Deno's pointer ops take a lock that every Worker of the process
 * shares (their permission check). When another thread holds it, the reader
 * waits in futex(2), which returns EAGAIN when the lock was released in the
 * meantime, and errno is overwritten before the op reads it. Measured with
 * tests/sys/fixtures/errno_race.ts: 10-12 of ~20M reads of close(-1)'s EBADF
 * came back as EAGAIN while one other Worker called `Deno.UnsafePointer.of`;
 * none with no other thread, none through this view. That is how an IOThread
 * died with "epoll_wait: EAGAIN".
 */
const errnoWord = new Int32Array(
  Deno.UnsafePointerView.getArrayBuffer(libc.__errno_location()!, 4),
);

/**
 * The calling thread's current errno, read with a plain load (no op, no
 * allocation, nothing that can run between the failing call and the read).
 *
 * What a caller may rely on: the value is the errno of the last libc call of
 * this thread that set it, provided no other FFI call and no Deno op (pointer
 * views, `Deno.UnsafePointer.of`, timers, I/O...) ran on this thread since.
 * So read it first thing after the call returned -1: `check` and
 * `retOrErrno` do; never `await` or call another sys/ function in between.
 * A call on a Deno blocking thread (`nonblocking: true`) sets that thread's
 * errno, not this one's: such calls cannot report errno at all.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { lastErrno } from "./sys_error.ts";
 * import { libc } from "./libc.ts";
 * import { EBADF } from "./errno.ts";
 * assert.equal(libc.close(-1), -1);
 * assert.equal(lastErrno(), EBADF);
 * ```
 */
export function lastErrno(): number {
  return errnoWord[0];
}

/**
 * Throws a {@link SysError} for `call` when a libc return value is negative;
 * returns the value (as a number) otherwise.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { check } from "./sys_error.ts";
 * assert.equal(check("getpid", 42), 42);
 * ```
 */
export function check(call: string, ret: number | bigint, detail?: string): number {
  if (ret < 0) throw new SysError(call, lastErrno(), detail);
  return Number(ret);
}

/**
 * Like {@link check}, but returns `-errno` instead of throwing: for hot paths and
 * for the block layer, whose completions carry `-errno` as QEMU's do.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { retOrErrno } from "./sys_error.ts";
 * assert.equal(retOrErrno(4096n), 4096);
 * ```
 */
export function retOrErrno(ret: number | bigint): number {
  return ret < 0 ? -lastErrno() : Number(ret);
}
