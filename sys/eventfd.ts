/**
 * eventfd(2): a kernel counter used as a wake-up signal between threads
 * (EventNotifier, aio_notify, thread-pool completions, virtio kick/call fds).
 *
 * @module
 */

import { libc } from "./libc.ts";
import { EAGAIN } from "./errno.ts";
import { check, lastErrno, SysError } from "./sys_error.ts";
import { fdTarget } from "./fd.ts";

/** eventfd flag: non-blocking reads and writes. */
export const EFD_NONBLOCK = 0o4000;
/** eventfd flag: close on exec. */
export const EFD_CLOEXEC = 0o2000000;
/** eventfd flag: each read returns 1 and decrements the counter. */
export const EFD_SEMAPHORE = 1;

// One 8-byte scratch buffer per thread (each Worker evaluates this module anew).
const scratch = new BigUint64Array(1);
const scratchBytes = new Uint8Array(scratch.buffer);
const scratchLo = new Uint32Array(scratch.buffer);
const EIGHT = 8n;

/**
 * Creates an eventfd with counter `init` and `flags` (EFD_*); returns the fd.
 *
 * @example
 * ```ts
 * import { eventfd, EFD_CLOEXEC, EFD_NONBLOCK, close } from "./mod.ts";
 * const fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
 * close(fd);
 * ```
 */
export function eventfd(init = 0, flags = EFD_NONBLOCK | EFD_CLOEXEC): number {
  return check("eventfd", libc.eventfd(init, flags));
}

/**
 * Adds `n` to the eventfd counter (wakes a reader or epoll waiter). On a
 * non-blocking eventfd whose counter would overflow (EAGAIN) the write is
 * dropped: a wake-up is already pending, which is all a notifier needs.
 * Hot path: no allocation.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { eventfd, eventfdRead, eventfdWrite, close } from "./mod.ts";
 * const fd = eventfd();
 * eventfdWrite(fd, 2);
 * assert.equal(eventfdRead(fd), 2);
 * close(fd);
 * ```
 */
export function eventfdWrite(fd: number, n = 1): void {
  scratchLo[0] = n >>> 0;
  scratchLo[1] = Math.floor(n / 0x1_0000_0000);
  const r = libc.write_i32(fd, scratchBytes, EIGHT);
  if (r < 0) {
    const e = lastErrno();
    if (e !== EAGAIN) throw new SysError("write", e, "eventfd");
  }
}

/**
 * Reads and resets the eventfd counter; returns 0 when it was zero (EAGAIN on a
 * non-blocking eventfd). Hot path: no allocation.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { eventfd, eventfdRead, close } from "./mod.ts";
 * const fd = eventfd(3);
 * assert.equal(eventfdRead(fd), 3);
 * assert.equal(eventfdRead(fd), 0);
 * close(fd);
 * ```
 */
export function eventfdRead(fd: number): number {
  const r = libc.read_i32(fd, scratchBytes, EIGHT);
  if (r < 0) {
    const e = lastErrno();
    if (e === EAGAIN) return 0;
    throw new SysError("read", e, "eventfd");
  }
  return scratchLo[0] + scratchLo[1] * 0x1_0000_0000;
}

/**
 * Whether `fd` is an eventfd (its /proc/self/fd link is `anon_inode:[eventfd]`,
 * see {@link fdTarget}). Used to check the ring fds a vhost-user front-end
 * sends before anything reads or writes them. Control plane only.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { close, eventfd, isEventfd, pipe } from "./mod.ts";
 * const e = eventfd();
 * const [r, w] = pipe();
 * assert(isEventfd(e));
 * assert(!isEventfd(r));
 * close(e); close(r); close(w);
 * ```
 */
export function isEventfd(fd: number): boolean {
  return fdTarget(fd) === "anon_inode:[eventfd]";
}
