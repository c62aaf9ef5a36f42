import type { AioContext } from "../../aio/mod.ts";
import { addressOf, close, recvInto, sendIov, WOULD_BLOCK } from "../../sys/mod.ts";
import { NbdError } from "./nbd_error.ts";

const RECV_BUFFER = 256 * 1024;
/** Most iovec entries one sendmsg takes (Linux UIO_MAXIOV). */
const IOV_MAX_SYS = 1024;

/**
 * One connected NBD socket in an AioContext: a receive buffer filled by the
 * fd's read handler, and a send queue of (address, length) segments flushed
 * with gathered sendmsg calls (a write handler takes over after a partial
 * send). Non-blocking throughout: nothing here waits.
 *
 * Two ways to consume what arrives: {@link read} (the handshake, a
 * callback per message) or {@link onData} (transmission: a parser that
 * consumes `rbuf[rstart, rend)` synchronously in the read handler).
 *
 * The first failure (EOF, a socket error, or {@link fail} from a parser)
 * closes the fd once and calls `onError`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { socketpair, SOCK_NONBLOCK, write, close } from "../../sys/mod.ts";
 * import { NbdChannel } from "./nbd_channel.ts";
 * const ctx = new AioContext();
 * const [a, b] = socketpair(SOCK_NONBLOCK);
 * const ch = new NbdChannel(ctx, a, () => {});
 * let got: Uint8Array | null = null;
 * ch.readExact(2).then((bytes) => got = bytes);
 * write(b, new Uint8Array([1, 2, 3]));
 * while (got === null) {
 *   ctx.poll(true);
 *   await null;
 * }
 * assert.deepEqual([...got], [1, 2]);
 * assert.equal(ch.buffered, 1);
 * ch.close(); close(b); ctx.close();
 * ```
 */
export class NbdChannel {
  readonly fd: number;
  /** Receive buffer; bytes `[rstart, rend)` are unconsumed. */
  readonly rbuf = new Uint8Array(RECV_BUFFER);
  /** A DataView over {@link rbuf}. */
  readonly rview = new DataView(this.rbuf.buffer);
  /** Host address of {@link rbuf}. */
  readonly rbufAddr = addressOf(this.rbuf);
  rstart = 0;
  rend = 0;
  /** Transmission parser: consumes bytes from the buffer (advancing rstart). */
  onData: (() => void) | null = null;
  readonly #ctx: AioContext;
  readonly #onError: (e: Error) => void;
  #waiter: { n: number; resolve: (b: Uint8Array) => void; reject: (e: Error) => void } | null =
    null;
  #closed = false;
  // Send queue: parallel arrays of segments, from #head (first #headOff bytes sent).
  #segAddr: number[] = [];
  #segLen: number[] = [];
  #keep: (Uint8Array | null)[] = [];
  #head = 0;
  #headOff = 0;
  readonly #iov = new BigUint64Array(2 * IOV_MAX_SYS);
  readonly #iovAddr = addressOf(this.#iov);
  #writeArmed = false;
  /** A failure seen by the poll callback, reported from pollReady. */
  #pollError: Error | null = null;
  readonly #handler = {
    read: () => this.#readable(),
    write: undefined as (() => void) | undefined,
    // Busy polling (the context's poll-max-ns window) looks at the socket too:
    // a reply is taken as soon as it arrives rather than when the window ends.
    poll: () => this.#pollRecv(),
    pollReady: () => this.#readable(),
  };

  constructor(ctx: AioContext, fd: number, onError: (e: Error) => void) {
    this.#ctx = ctx;
    this.fd = fd;
    this.#onError = onError;
    ctx.setFdHandler(fd, this.#handler);
  }

  /** Whether the channel failed or was closed. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Unconsumed received bytes. */
  get buffered(): number {
    return this.rend - this.rstart;
  }

  /** Resolves with the next `n` bytes (a copy); n must fit the buffer. See {@link read}. */
  readExact(n: number): Promise<Uint8Array> {
    return new Promise((resolve, reject) => this.read(n, resolve, reject));
  }

  /**
   * Calls `cb` with the next `n` bytes (a copy) once they are here, at once
   * when they already are; `err` when the channel fails or closes first.
   * Callbacks rather than a Promise: an IOThread's loop runs promise
   * continuations only between polls, so a chain of awaits could stall
   * while the loop waits for events. Handshake only: one read at a time.
   */
  read(n: number, cb: (b: Uint8Array) => void, err: (e: Error) => void): void {
    if (n > RECV_BUFFER) return err(new RangeError(`read: ${n} bytes`));
    if (this.#closed) return err(new NbdError("closed", "connection closed"));
    if (this.buffered >= n) return cb(this.#take(n));
    this.#waiter = { n, resolve: cb, reject: err };
    this.#compact(n);
  }

  /** Queues a JS buffer (kept alive until sent) and flushes. */
  sendBytes(b: Uint8Array): void {
    this.queue(addressOf(b), b.byteLength, b);
    this.flush();
  }

  /**
   * Queues `len` bytes at host address `addr`; `keep` is held until sent.
   * Call {@link flush} after the last segment of a batch. Hot path.
   */
  queue(addr: number, len: number, keep: Uint8Array | null = null): void {
    if (len === 0 || this.#closed) return;
    this.#segAddr.push(addr);
    this.#segLen.push(len);
    this.#keep.push(keep);
  }

  /** Sends what the socket takes now; arms the write handler for the rest. Hot path. */
  flush(): void {
    while (!this.#closed && this.#head < this.#segAddr.length) {
      let n = 0, i = this.#head;
      for (; i < this.#segAddr.length && n < IOV_MAX_SYS; i++, n++) {
        const off = i === this.#head ? this.#headOff : 0;
        this.#iov[2 * n] = BigInt(this.#segAddr[i] + off);
        this.#iov[2 * n + 1] = BigInt(this.#segLen[i] - off);
      }
      let sent: number;
      try {
        sent = sendIov(this.fd, this.#iovAddr, n);
      } catch (e) {
        return this.fail(e as Error);
      }
      if (sent === WOULD_BLOCK) break;
      this.#advance(sent);
    }
    if (this.#head === this.#segAddr.length) {
      this.#segAddr.length = this.#segLen.length = this.#keep.length = 0;
      this.#head = this.#headOff = 0;
      this.#armWrite(false);
    } else this.#armWrite(true);
  }

  #advance(sent: number): void {
    while (sent > 0) {
      const left = this.#segLen[this.#head] - this.#headOff;
      if (sent < left) {
        this.#headOff += sent;
        return;
      }
      sent -= left;
      this.#keep[this.#head] = null;
      this.#head++;
      this.#headOff = 0;
    }
  }

  #armWrite(on: boolean): void {
    if (on === this.#writeArmed || this.#closed) return;
    this.#writeArmed = on;
    this.#handler.write = on ? () => this.flush() : undefined;
    this.#ctx.setFdHandler(this.fd, this.#handler);
  }

  /** Poll callback: one non-blocking receive; true when bytes (or an error) came. */
  #pollRecv(): boolean {
    if (this.#closed) return false;
    this.#compact(1);
    let n: number;
    try {
      n = recvInto(this.fd, this.rbuf, this.rend, this.rbuf.byteLength - this.rend);
    } catch (e) {
      this.#pollError = e as Error;
      return true;
    }
    if (n === WOULD_BLOCK) return false;
    if (n === 0) this.#pollError = new NbdError("closed", "the server closed the connection");
    else this.rend += n;
    return true;
  }

  #readable(): void {
    if (this.#pollError) return this.fail(this.#pollError);
    if (this.buffered > 0) this.#deliver();
    while (!this.#closed) {
      this.#compact(1);
      const room = this.rbuf.byteLength - this.rend;
      let n: number;
      try {
        n = recvInto(this.fd, this.rbuf, this.rend, room);
      } catch (e) {
        return this.fail(e as Error);
      }
      if (n === WOULD_BLOCK) return;
      if (n === 0) return this.fail(new NbdError("closed", "the server closed the connection"));
      this.rend += n;
      this.#deliver();
    }
  }

  #deliver(): void {
    const w = this.#waiter;
    if (w && this.buffered >= w.n) {
      this.#waiter = null;
      w.resolve(this.#take(w.n));
    }
    if (!this.#waiter && this.onData && this.buffered > 0) this.onData();
  }

  /** Consumer hook: parse whatever is buffered now (after switching to onData). */
  drainBuffered(): void {
    if (!this.#closed) this.#deliver();
  }

  #take(n: number): Uint8Array {
    const b = this.rbuf.slice(this.rstart, this.rstart + n);
    this.rstart += n;
    if (this.rstart === this.rend) this.rstart = this.rend = 0;
    return b;
  }

  /** Makes room for `need` more bytes at the end by moving unconsumed bytes down. */
  #compact(need: number): void {
    if (this.rstart === this.rend) {
      this.rstart = this.rend = 0;
      return;
    }
    if (this.rbuf.byteLength - this.rend >= Math.max(need, 4096)) return;
    this.rbuf.copyWithin(0, this.rstart, this.rend);
    this.rend -= this.rstart;
    this.rstart = 0;
  }

  /** Drops the connection with `e` (once): closes the fd and reports to onError. */
  fail(e: Error): void {
    if (this.#closed) return;
    this.#shut();
    const w = this.#waiter;
    this.#waiter = null;
    w?.reject(e);
    this.#onError(e);
  }

  /** Closes without reporting an error. */
  close(): void {
    if (this.#closed) return;
    this.#shut();
    const w = this.#waiter;
    this.#waiter = null;
    w?.reject(new NbdError("closed", "connection closed"));
  }

  #shut(): void {
    this.#closed = true;
    this.#ctx.setFdHandler(this.fd, null);
    close(this.fd);
    this.#segAddr.length = this.#segLen.length = this.#keep.length = 0;
    this.#head = this.#headOff = 0;
  }
}
