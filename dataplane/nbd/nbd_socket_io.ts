/**
 * The non-blocking socket under one NBD connection, served from an
 * AioContext fd handler (QEMU's QIOChannel in non-blocking mode under
 * aio_set_fd_handler): a reader callback while reading is wanted, and an
 * output queue of byte segments that goes out with gathered sendmsg calls.
 * A partial write keeps the rest queued and waits for POLLOUT; a segment's
 * `release` runs once it has been sent entirely (the owner may then reuse
 * the buffer: replies are sent straight from the block layer's buffers).
 *
 * @module
 */

import type { AioContext } from "../../aio/mod.ts";
import { addressOf, close, IOVEC, sendIov, shutdown, WOULD_BLOCK } from "../../sys/mod.ts";

/** Most segments one sendmsg gathers. */
const IOV_BATCH = 64;

interface Segment {
  buf: Uint8Array;
  release: (() => void) | null;
}

/**
 * One connection's socket in an AioContext. Owns the fd: {@link close}
 * closes it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { recvInto, socketpair, SOCK_NONBLOCK, close } from "../../sys/mod.ts";
 * import { NbdSocketIo } from "./nbd_socket_io.ts";
 * const ctx = new AioContext();
 * const [a, b] = socketpair(SOCK_NONBLOCK);
 * const io = new NbdSocketIo(ctx, a, () => {}, () => {});
 * let released = false;
 * io.queue(new Uint8Array([1, 2]), () => released = true);
 * io.queue(new Uint8Array([3]));
 * assert(io.flush());
 * assert(released);
 * assert.equal(recvInto(b, new Uint8Array(4), 0, 4), 3);
 * io.close();
 * close(b);
 * ctx.close();
 * ```
 */
export class NbdSocketIo {
  readonly fd: number;
  readonly #ctx: AioContext;
  readonly #onReadable: () => void;
  readonly #onError: (e: Error) => void;
  readonly #out: Segment[] = [];
  #head = 0;
  /** Bytes of the first queued segment already sent. */
  #headSent = 0;
  #pendingBytes = 0;
  #reading = false;
  #writing = false;
  #attached = false;
  #closed = false;
  #fdClosed = false;
  readonly #iov = new BigUint64Array((IOV_BATCH * IOVEC.size) / 8);
  /** {@link #iov} as 32-bit halves: addresses and lengths without BigInt allocation. */
  readonly #iov32 = new Uint32Array(this.#iov.buffer);
  readonly #iovAddr: number;
  #onDrained: (() => void) | null = null;

  constructor(
    ctx: AioContext,
    fd: number,
    onReadable: () => void,
    onError: (e: Error) => void,
  ) {
    this.#ctx = ctx;
    this.fd = fd;
    this.#onReadable = onReadable;
    this.#onError = onError;
    this.#iovAddr = addressOf(this.#iov);
  }

  /** Bytes queued and not sent yet. */
  get pendingBytes(): number {
    return this.#pendingBytes;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Turns the read handler on or off (backpressure: off while too much is in flight). */
  setReading(on: boolean): void {
    if (this.#reading === on || this.#closed) return;
    this.#reading = on;
    this.#update();
  }

  /** Runs `cb` once every queued byte is sent (at once if none is queued). */
  whenDrained(cb: () => void): void {
    if (this.#pendingBytes === 0) cb();
    else this.#onDrained = cb;
  }

  #update(): void {
    if (this.#closed) return;
    const want = this.#reading || this.#writing;
    if (!want) {
      if (this.#attached) this.#ctx.setFdHandler(this.fd, null);
      this.#attached = false;
      return;
    }
    this.#ctx.setFdHandler(this.fd, {
      read: this.#reading ? this.#onReadable : undefined,
      write: this.#writing ? this.#onWritable : undefined,
    });
    this.#attached = true;
  }

  readonly #onWritable = (): void => {
    this.flush();
  };

  /** Queues `buf` (not copied: keep it unchanged until `release`). Hot path. */
  queue(buf: Uint8Array, release: (() => void) | null = null): void {
    if (this.#closed) {
      release?.();
      return;
    }
    if (buf.byteLength === 0) {
      release?.();
      return;
    }
    this.#out.push({ buf, release });
    this.#pendingBytes += buf.byteLength;
  }

  /**
   * Sends what is queued until done or the socket is full (then waits for
   * POLLOUT). Returns whether everything went. A send error reports through
   * `onError` and returns false. Hot path.
   */
  flush(): boolean {
    while (this.#pendingBytes > 0 && !this.#closed) {
      const n = Math.min(this.#out.length - this.#head, IOV_BATCH);
      const iov = this.#iov32;
      for (let i = 0; i < n; i++) {
        const s = this.#out[this.#head + i];
        const skip = i === 0 ? this.#headSent : 0;
        const addr = addressOf(s.buf) + skip;
        iov[4 * i] = addr >>> 0;
        iov[4 * i + 1] = Math.floor(addr / 0x100000000);
        iov[4 * i + 2] = s.buf.byteLength - skip;
        iov[4 * i + 3] = 0;
      }
      let sent: number;
      try {
        sent = sendIov(this.fd, this.#iovAddr, n);
      } catch (e) {
        this.#onError(e as Error);
        return false;
      }
      if (sent === WOULD_BLOCK) {
        if (!this.#writing) {
          this.#writing = true;
          this.#update();
        }
        return false;
      }
      this.#advance(sent);
    }
    if (this.#pendingBytes === 0) {
      if (this.#writing) {
        this.#writing = false;
        this.#update();
      }
      const d = this.#onDrained;
      this.#onDrained = null;
      d?.();
    }
    return this.#pendingBytes === 0;
  }

  #advance(sent: number): void {
    this.#pendingBytes -= sent;
    let left = sent + this.#headSent;
    this.#headSent = 0;
    while (left > 0) {
      const s = this.#out[this.#head];
      if (left < s.buf.byteLength) {
        this.#headSent = left;
        break;
      }
      left -= s.buf.byteLength;
      this.#head++;
      s.release?.();
    }
    if (this.#head === this.#out.length) {
      this.#out.length = 0;
      this.#head = 0;
    } else if (this.#head > 1024) {
      this.#out.splice(0, this.#head);
      this.#head = 0;
    }
  }

  /**
   * Stops serving the fd in this context without closing it (the handshake
   * hands a connection over to an IOThread). Unsent output is dropped.
   */
  detach(): number {
    if (this.#closed) return this.fd;
    if (this.#attached) this.#ctx.setFdHandler(this.fd, null);
    this.#attached = false;
    this.#reading = false;
    this.#writing = false;
    this.#dropQueue();
    this.#closed = true;
    return this.fd;
  }

  /** shutdown(2) both ways: the peer sees the end; reads here return 0. */
  shutdown(): void {
    if (this.#fdClosed) return;
    try {
      shutdown(this.fd);
    } catch { /* not connected any more */ }
  }

  #dropQueue(): void {
    const out = this.#out.splice(this.#head);
    this.#out.length = 0;
    this.#head = 0;
    this.#headSent = 0;
    this.#pendingBytes = 0;
    for (const s of out) s.release?.();
  }

  /** Removes the handler, drops unsent output and closes the fd. Idempotent. */
  close(): void {
    if (this.#fdClosed) return;
    this.#fdClosed = true;
    this.detach();
    try {
      close(this.fd);
    } catch { /* already gone */ }
  }
}
