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

let errnoView: Deno.UnsafePointerView | undefined;

/**
 * The calling thread's current errno. Read it immediately after the failing
 * call, before anything else can run on this thread.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { lastErrno } from "./sys_error.ts";
 * const e = lastErrno(); // whatever the last failed libc call left
 * assert.equal(typeof e, "number");
 * ```
 */
export function lastErrno(): number {
  // __errno_location is per thread and constant for the thread's life; each
  // Worker evaluates this module anew, so caching the view here is safe.
  errnoView ??= new Deno.UnsafePointerView(libc.__errno_location()!);
  return errnoView.getInt32();
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
