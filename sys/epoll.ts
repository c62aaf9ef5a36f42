/**
 * epoll(7): the readiness multiplexer under every AioContext (QEMU's
 * util/fdmon-epoll.c). An {@link Epoll} owns the epoll fd; ready events land in
 * an {@link EpollEvents} buffer that is reused across waits.
 *
 * @module
 */

import { libc } from "./libc.ts";
import { EINTR } from "./errno.ts";
import { check, lastErrno, SysError } from "./sys_error.ts";
import { EPOLL_EVENT } from "./layout.ts";

/** Readable. */
export const EPOLLIN = 0x001;
/** Urgent data. */
export const EPOLLPRI = 0x002;
/** Writable. */
export const EPOLLOUT = 0x004;
/** Error condition (always reported). */
export const EPOLLERR = 0x008;
/** Hang up (always reported). */
export const EPOLLHUP = 0x010;
/** Peer closed its writing half. */
export const EPOLLRDHUP = 0x2000;
/** One event, then the fd is disabled until EPOLL_CTL_MOD. */
export const EPOLLONESHOT = 1 << 30;
/** Edge triggered. */
export const EPOLLET = 1 << 31;
/** epoll_create1 flag: close on exec. */
export const EPOLL_CLOEXEC = 0o2000000;
/** epoll_ctl op: add. */
export const EPOLL_CTL_ADD = 1;
/** epoll_ctl op: delete. */
export const EPOLL_CTL_DEL = 2;
/** epoll_ctl op: modify. */
export const EPOLL_CTL_MOD = 3;

const WORDS = EPOLL_EVENT.size / 4; // a packed epoll_event is three u32 words

/**
 * A reusable array of C `struct epoll_event`s that epoll_wait fills. Each event
 * carries the fd it was registered with (in `data`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { EpollEvents } from "./mod.ts";
 * const ev = new EpollEvents(8);
 * assert.equal(ev.count, 0);
 * assert.equal(ev.bytes.byteLength, 96);
 * ```
 */
export class EpollEvents {
  /** Capacity in events. */
  readonly max: number;
  /** The C array (FFI `buffer` argument). */
  readonly bytes: Uint8Array<ArrayBuffer>;
  /** The same memory as u32 words: events at 3i, data (the fd) at 3i+1. */
  readonly words: Uint32Array<ArrayBuffer>;
  /** Number of valid events after the last wait. */
  count = 0;

  constructor(max = 64) {
    this.max = max;
    // An explicit ArrayBuffer: off the V8 heap, so the kernel may write it from
    // another thread (waitAsync).
    this.words = new Uint32Array(new ArrayBuffer(max * WORDS * 4));
    this.bytes = new Uint8Array(this.words.buffer);
  }

  /** The fd of ready event `i`. Hot path. */
  fd(i: number): number {
    return this.words[i * WORDS + 1] | 0;
  }

  /** The EPOLL* event mask of ready event `i`. Hot path. */
  events(i: number): number {
    return this.words[i * WORDS];
  }
}

/**
 * An epoll instance. Registers fds with their own number as `data`, so a
 * waiter maps events back to fds. `wait` is synchronous and blocks the calling
 * thread; `waitAsync` runs epoll_wait on a Deno blocking thread (~36 us a
 * round trip: control plane only).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Epoll, EPOLLIN, eventfd, eventfdWrite, close } from "./mod.ts";
 * const ep = new Epoll();
 * const fd = eventfd();
 * ep.add(fd, EPOLLIN);
 * eventfdWrite(fd);
 * assert.equal(ep.wait(0), 1);
 * assert.equal(ep.ready.fd(0), fd);
 * ep.close(); close(fd);
 * ```
 */
export class Epoll {
  /** The epoll fd. */
  readonly fd: number;
  /** Default event buffer for {@link wait}. */
  readonly ready: EpollEvents;
  readonly #ev = new Uint32Array(WORDS);
  readonly #evBytes = new Uint8Array(this.#ev.buffer);
  #closed = false;

  constructor(maxEvents = 64) {
    this.fd = check("epoll_create1", libc.epoll_create1(EPOLL_CLOEXEC));
    this.ready = new EpollEvents(maxEvents);
  }

  #ctl(op: number, fd: number, events: number, name: string): void {
    this.#ev[0] = events >>> 0;
    this.#ev[1] = fd;
    this.#ev[2] = 0;
    if (libc.epoll_ctl(this.fd, op, fd, this.#evBytes) < 0) {
      throw new SysError("epoll_ctl", lastErrno(), `${name} fd ${fd}`); // errno before the string
    }
  }

  /**
   * Registers `fd` for `events` (EPOLLIN | EPOLLOUT | ...).
   *
   * @example
   * ```ts
   * import { Epoll, EPOLLIN, eventfd } from "./mod.ts";
   * const ep = new Epoll();
   * ep.add(eventfd(), EPOLLIN);
   * ep.close();
   * ```
   */
  add(fd: number, events: number): void {
    this.#ctl(EPOLL_CTL_ADD, fd, events, "add");
  }

  /**
   * Changes the events of a registered `fd`.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { Epoll, EPOLLIN, EPOLLOUT, eventfd } from "./mod.ts";
   * const ep = new Epoll(), fd = eventfd();
   * ep.add(fd, EPOLLIN);
   * ep.modify(fd, EPOLLIN | EPOLLOUT);
   * assert.equal(ep.wait(0), 1); // an eventfd is writable
   * ep.close();
   * ```
   */
  modify(fd: number, events: number): void {
    this.#ctl(EPOLL_CTL_MOD, fd, events, "modify");
  }

  /**
   * Unregisters `fd`.
   *
   * @example
   * ```ts
   * import { Epoll, EPOLLIN, eventfd } from "./mod.ts";
   * const ep = new Epoll(), fd = eventfd();
   * ep.add(fd, EPOLLIN);
   * ep.delete(fd);
   * ep.close();
   * ```
   */
  delete(fd: number): void {
    this.#ctl(EPOLL_CTL_DEL, fd, 0, "delete");
  }

  /**
   * Errors epoll_wait cannot legitimately return on a live epoll fd (anything
   * but EINTR) that were taken for a spurious wake-up: see {@link wait}.
   */
  strayErrors = 0;
  #strayInARow = 0;
  /** Waits that ended with EINTR (a signal, or io_uring task work). */
  interrupted = 0;

  /**
   * epoll_wait for up to `timeoutMs` (-1: forever, 0: just look); returns the
   * number of ready events, stored in `out` (default {@link ready}). EINTR
   * counts as zero events. Any other error is one epoll_wait cannot return
   * on a live fd and a correct buffer (EBADF, EFAULT, EINVAL), so a single one
   * is counted in {@link strayErrors} and taken for a wake-up with no events;
   * only a second in a row throws. An event loop must not die of one misread
   * errno (see sys/sys_error.ts). Hot path: no allocation.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { Epoll } from "./mod.ts";
   * const ep = new Epoll();
   * assert.equal(ep.wait(0), 0);
   * ep.close();
   * ```
   */
  wait(timeoutMs: number, out: EpollEvents = this.ready): number {
    const n = libc.epoll_wait(this.fd, out.bytes, out.max, timeoutMs);
    if (n < 0) {
      const e = lastErrno();
      out.count = 0;
      if (e === EINTR) {
        this.interrupted++;
        return 0;
      }
      this.strayErrors++;
      if (++this.#strayInARow < 2) return 0;
      throw new SysError("epoll_wait", e);
    }
    this.#strayInARow = 0;
    out.count = n;
    return n;
  }

  /**
   * Like {@link wait}, but epoll_wait runs on a Deno blocking thread so this
   * thread's event loop keeps running. The kernel fills a private buffer that
   * is copied into `out` when the wait ends, so a synchronous wait in between
   * cannot be corrupted. Control plane only (~36 us overhead).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { Epoll } from "./mod.ts";
   * const ep = new Epoll();
   * assert.equal(await ep.waitAsync(1), 0);
   * ep.close();
   * ```
   */
  async waitAsync(timeoutMs: number, out: EpollEvents = this.ready): Promise<number> {
    const tmp = new EpollEvents(out.max);
    const n = await libc.epoll_wait_async(this.fd, tmp.bytes, tmp.max, timeoutMs);
    if (n < 0) {
      // errno of the blocking thread is not ours; EINTR is the only likely case.
      out.count = 0;
      return 0;
    }
    out.words.set(tmp.words.subarray(0, n * WORDS));
    out.count = n;
    return n;
  }

  /**
   * Closes the epoll fd; idempotent.
   *
   * @example
   * ```ts
   * import { Epoll } from "./mod.ts";
   * const ep = new Epoll();
   * ep.close(); ep.close();
   * ```
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    check("close", libc.close(this.fd), "epoll");
  }
}
