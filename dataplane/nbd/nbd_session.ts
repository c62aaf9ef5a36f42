/**
 * The transmission phase of one NBD connection, run in the export's
 * IOThread (QEMU's nbd_trip / nbd_handle_request, in callback form): reads
 * requests from the non-blocking socket, checks them against the export,
 * submits them to the IOThread's BlockBackend and sends each reply (simple
 * or structured) straight from the request's buffer with gathered sendmsg.
 *
 * Bounded: at most `maxRequests` requests are between header and reply
 * sent, and reading stops while their payload buffers or the output queue
 * hold `maxQueuedBytes` or more (a client that does not read its replies
 * stops being read: TCP flow control reaches it), so a connection holds at
 * most `maxQueuedBytes` plus one maximal request. A request larger than
 * {@link NBD_MAX_PAYLOAD} is refused; a write that large drops the
 * connection after the error reply (its payload is not read). A bad magic
 * or a socket error ends the connection at once.
 *
 * @module
 */

import type { AioContext, BottomHalf } from "../../aio/mod.ts";
import {
  type BlockBackend,
  IoVector,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EPERM,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  systemErrnoToNbdErrno,
} from "../../block/mod.ts";
import { addressOf, recvInto, WOULD_BLOCK } from "../../sys/mod.ts";
import { NbdBufferPool } from "./nbd_buffer_pool.ts";

import { NbdSocketIo } from "./nbd_socket_io.ts";
import { NBD_BASE_ALLOCATION_ID } from "./nbd_handshake.ts";

/** Largest read or write payload (QEMU's NBD_MAX_BUFFER_SIZE, 32 MiB). */
export const NBD_MAX_PAYLOAD = 32 * 1024 * 1024;

/** Default bound on requests between header and reply sent, per connection. */
export const NBD_MAX_REQUESTS = 64;

/** Default bound on reply bytes queued before reading stops. */
export const NBD_MAX_QUEUED_BYTES = 64 * 1024 * 1024;

/** Requests parsed per read callback before other handlers get a turn. */
const REQUESTS_PER_WAKE = 64;

const RECV_BUFFER = 64 * 1024;

/**
 * Options of an {@link NbdSession}.
 *
 * @example
 * ```ts
 * import type { NbdSessionOptions } from "./nbd_session.ts";
 * const o: NbdSessionOptions = { structured: true, readOnly: false, onClose: () => {} };
 * if (!o.structured) throw new Error();
 * ```
 */
export interface NbdSessionOptions {
  /** NBD_OPT_STRUCTURED_REPLY was negotiated. */
  structured: boolean;
  /** `base:allocation` was selected: NBD_CMD_BLOCK_STATUS is answered. */
  baseAllocation?: boolean;
  /** Every write, trim and write-zeroes is flushed before its reply (export `writethrough=on`). */
  writethrough?: boolean;
  /** The export is read-only: writes, trims and write-zeroes get EPERM. */
  readOnly: boolean;
  /** Called once when the connection is closed and nothing is in flight. */
  onClose: (reason: string) => void;
  maxRequests?: number;
  maxQueuedBytes?: number;
}

/**
 * Counters of one connection (they only grow).
 *
 * @example
 * ```ts
 * import type { NbdSessionStats } from "./nbd_session.ts";
 * const s: NbdSessionStats = { requests: 0, errors: 0, bytesRead: 0, bytesWritten: 0, readPauses: 0 };
 * if (s.requests !== 0) throw new Error();
 * ```
 */
export interface NbdSessionStats {
  requests: number;
  /** Requests answered with an error. */
  errors: number;
  bytesRead: number;
  bytesWritten: number;
  /** Times reading stopped for backpressure. */
  readPauses: number;
}

class RequestSlot {
  type = 0;
  flags = 0;
  offset = 0;
  length = 0;
  fuaDone = false;
  /** Pooled payload buffer (class size) and the request's view of it. */
  pooled: Uint8Array | null = null;
  data: Uint8Array | null = null;
  readonly qiov = new IoVector(1);
  readonly hdr = new Uint8Array(32);
  readonly hv = new DataView(this.hdr.buffer);
  readonly hdr16 = this.hdr.subarray(0, 16);
  readonly hdr20 = this.hdr.subarray(0, 20);
  readonly hdr26 = this.hdr.subarray(0, 26);
  readonly hdr28 = this.hdr.subarray(0, 28);
  /** Cookie bytes as sent (copied into the reply unchanged). */
  readonly cookie = new Uint8Array(8);
  readonly done: (ret: number) => void;
  readonly release: () => void;
  constructor(session: NbdSession) {
    this.done = (ret) => session.complete(this, ret);
    this.release = () => session.release(this);
  }
}

/**
 * One client in transmission. Owns the fd from construction on.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { BlockBackend } from "../../block/mod.ts";
 * import { close, recvInto, sendMsg, SOCK_NONBLOCK, socketpair } from "../../sys/mod.ts";
 * import { NbdSession } from "./nbd_session.ts";
 * const ctx = new AioContext();
 * const blk = await BlockBackend.open(ctx, { driver: "null-co", size: 1 << 20, readZeroes: true });
 * const [srv, cli] = socketpair(SOCK_NONBLOCK);
 * let closed = "";
 * new NbdSession(ctx, srv, blk, { structured: false, readOnly: true, onClose: (r) => closed = r });
 * const req = new Uint8Array(28);
 * const v = new DataView(req.buffer);
 * v.setUint32(0, 0x25609513); v.setUint16(6, 0); v.setUint32(24, 512); // READ 512 at 0
 * sendMsg(cli, req);
 * const reply = new Uint8Array(16 + 512);
 * let got = 0;
 * while (got < reply.length) {
 *   ctx.poll(true);
 *   const n = recvInto(cli, reply, got, reply.length - got);
 *   if (n > 0) got += n;
 * }
 * assert.equal(new DataView(reply.buffer).getUint32(4), 0); // no error
 * v.setUint16(6, 2); // DISC
 * sendMsg(cli, req);
 * while (closed === "") ctx.poll(true);
 * close(cli);
 * await blk.close();
 * ctx.close();
 * ```
 */
export class NbdSession {
  readonly stats: NbdSessionStats = {
    requests: 0,
    errors: 0,
    bytesRead: 0,
    bytesWritten: 0,
    readPauses: 0,
  };
  readonly #blk: BlockBackend;
  readonly #io: NbdSocketIo;
  readonly #opts: NbdSessionOptions;
  readonly #maxRequests: number;
  readonly #maxQueued: number;
  readonly #size: number;
  readonly #pool = new NbdBufferPool();
  readonly #slots: RequestSlot[] = [];
  readonly #rbuf = new Uint8Array(RECV_BUFFER);
  readonly #rview = new DataView(this.#rbuf.buffer);
  #rStart = 0;
  #rEnd = 0;
  /** A write whose payload is being read. */
  #cur: RequestSlot | null = null;
  #curFill = 0;
  #inUse = 0;
  /** Payload buffer bytes held by requests in flight. */
  #bufferedBytes = 0;
  #paused = false;
  /** This wake-up's last recv was short: the socket is empty for now. */
  #drained = false;
  /** No more requests are read (DISC, EOF, a fatal error or a stop). */
  #closing = false;
  /** Replies are dropped (the socket failed or the export stops). */
  #dead = false;
  #closeReason = "";
  #closed = false;
  readonly #closedP = Promise.withResolvers<void>();
  /**
   * Runs the reader after a pause: requests already in the receive buffer
   * raise no new POLLIN.
   */
  readonly #resume: BottomHalf;

  constructor(
    ctx: AioContext,
    fd: number,
    blk: BlockBackend,
    opts: NbdSessionOptions,
  ) {
    this.#blk = blk;
    this.#opts = opts;
    this.#size = blk.length;
    this.#maxRequests = opts.maxRequests ?? NBD_MAX_REQUESTS;
    this.#maxQueued = opts.maxQueuedBytes ?? NBD_MAX_QUEUED_BYTES;
    this.#io = new NbdSocketIo(ctx, fd, this.#onReadable, (e) => this.#fatal(e.message));
    this.#resume = ctx.bhNew(this.#onReadable, "nbd-resume");
    this.#io.setReading(true);
  }

  /** Requests between header and reply sent. */
  get inFlight(): number {
    return this.#inUse;
  }

  /** Resolves once the connection is closed and nothing is in flight. */
  get closed(): Promise<void> {
    return this.#closedP.promise;
  }

  /** Ends the connection now (export stopping): replies not sent are dropped. */
  stop(reason = "export stopped"): Promise<void> {
    this.#fatal(reason);
    return this.closed;
  }

  #slot(): RequestSlot {
    this.#inUse++;
    return this.#slots.pop() ?? new RequestSlot(this);
  }

  readonly #onReadable = (): void => {
    if (this.#closing) return;
    this.#drained = false;
    this.#blk.ioPlug();
    try {
      this.#readRequests();
    } finally {
      this.#blk.ioUnplug();
    }
  };

  #readRequests(): void {
    let budget = REQUESTS_PER_WAKE;
    const fd = this.#io.fd;
    while (!this.#closing && budget > 0) {
      if (this.#cur !== null) {
        const s = this.#cur;
        const data = s.data!;
        const avail = this.#rEnd - this.#rStart;
        if (avail > 0) {
          const n = Math.min(avail, s.length - this.#curFill);
          data.set(this.#rbuf.subarray(this.#rStart, this.#rStart + n), this.#curFill);
          this.#rStart += n;
          this.#curFill += n;
        }
        if (this.#curFill < s.length) {
          const n = this.#recv(fd, data, this.#curFill, s.length - this.#curFill);
          if (n <= 0) return;
          this.#curFill += n;
          continue;
        }
        this.#cur = null;
        budget--;
        this.#dispatch(s);
        continue;
      }
      if (this.#rEnd - this.#rStart >= NBD_REQUEST_SIZE) {
        if (this.#overloaded()) return;
        budget--;
        this.#parseHeader();
        continue;
      }
      if (this.#rStart > 0) {
        this.#rbuf.copyWithin(0, this.#rStart, this.#rEnd);
        this.#rEnd -= this.#rStart;
        this.#rStart = 0;
      }
      const n = this.#recv(fd, this.#rbuf, this.#rEnd, this.#rbuf.byteLength - this.#rEnd);
      if (n <= 0) return;
      this.#rEnd += n;
    }
    // Out of budget: what is already buffered raises no new POLLIN.
    if (budget === 0 && !this.#closing) this.#resume.schedule();
  }

  /**
   * A recv: >0 bytes; 0 when it would block or the peer closed (then
   * closing). A short read means the socket was empty: the next recv of this
   * wake-up is skipped (it would only say EAGAIN; POLLIN comes again for
   * anything that arrives meanwhile). Hot path: no allocation.
   */
  #recv(fd: number, buf: Uint8Array, off: number, len: number): number {
    if (this.#drained) return 0;
    let n: number;
    try {
      n = recvInto(fd, buf, off, len);
    } catch (e) {
      this.#fatal(`receive failed: ${(e as Error).message}`);
      return 0;
    }
    if (n === WOULD_BLOCK) {
      this.#drained = true;
      return 0;
    }
    if (n < len) this.#drained = true;
    if (n === 0) {
      this.#beginClose(
        this.#cur !== null || this.#rEnd > this.#rStart
          ? "client closed the connection mid-request"
          : "client closed the connection",
      );
      return 0;
    }
    return n;
  }

  /** Backpressure: stop reading while too much is in flight or queued. */
  #overloaded(): boolean {
    if (
      this.#inUse >= this.#maxRequests || this.#bufferedBytes >= this.#maxQueued ||
      this.#io.pendingBytes > this.#maxQueued
    ) {
      if (!this.#paused) {
        this.#paused = true;
        this.stats.readPauses++;
        this.#io.setReading(false);
      }
      return true;
    }
    return false;
  }

  #parseHeader(): void {
    const v = this.#rview, at = this.#rStart;
    const magic = v.getUint32(at);
    if (magic !== NBD_REQUEST_MAGIC) {
      this.#fatal(`invalid request magic 0x${magic.toString(16)}`);
      return;
    }
    const s = this.#slot();
    s.flags = v.getUint16(at + 4);
    s.type = v.getUint16(at + 6);
    s.cookie.set(this.#rbuf.subarray(at + 8, at + 16));
    s.offset = v.getUint32(at + 16) * 0x100000000 + v.getUint32(at + 20);
    s.length = v.getUint32(at + 24);
    s.fuaDone = false;
    this.#rStart += NBD_REQUEST_SIZE;
    this.stats.requests++;
    if (s.type === NBD_CMD_DISC) {
      this.release(s);
      this.#beginClose("client sent NBD_CMD_DISC");
      return;
    }
    if (s.type === NBD_CMD_WRITE) {
      if (s.length > NBD_MAX_PAYLOAD) {
        // The payload is not read: the stream cannot be followed any more.
        this.#reply(s, NBD_EINVAL);
        this.#beginClose(`write of ${s.length} bytes is over the ${NBD_MAX_PAYLOAD}-byte limit`);
        return;
      }
      if (s.length > 0) {
        this.#buffer(s);
        this.#cur = s;
        this.#curFill = 0;
        return;
      }
    }
    this.#dispatch(s);
  }

  #buffer(s: RequestSlot): void {
    s.pooled = this.#pool.get(s.length);
    this.#bufferedBytes += s.pooled.byteLength;
    s.data = s.length === s.pooled.byteLength ? s.pooled : s.pooled.subarray(0, s.length);
  }

  /** QEMU's nbd_co_receive_request checks, in its order. */
  #check(s: RequestSlot): number {
    const t = s.type;
    let valid = NBD_CMD_FLAG_FUA;
    if (t === NBD_CMD_READ && this.#opts.structured) valid |= NBD_CMD_FLAG_DF;
    else if (t === NBD_CMD_WRITE_ZEROES) valid |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
    else if (t === NBD_CMD_BLOCK_STATUS) valid |= NBD_CMD_FLAG_REQ_ONE;
    if (t === NBD_CMD_FLUSH) return s.flags & ~valid ? NBD_EINVAL : 0;
    if (t === NBD_CMD_BLOCK_STATUS) {
      if (!this.#opts.baseAllocation || s.length === 0) return NBD_EINVAL;
    } else if (
      t !== NBD_CMD_READ && t !== NBD_CMD_WRITE && t !== NBD_CMD_TRIM &&
      t !== NBD_CMD_WRITE_ZEROES && t !== NBD_CMD_CACHE
    ) {
      return NBD_EINVAL; // unknown
    }
    if ((t === NBD_CMD_READ || t === NBD_CMD_CACHE) && s.length > NBD_MAX_PAYLOAD) {
      return NBD_EINVAL;
    }
    const writes = t === NBD_CMD_WRITE || t === NBD_CMD_TRIM || t === NBD_CMD_WRITE_ZEROES;
    if (writes && this.#opts.readOnly) return NBD_EPERM;
    if (s.offset > this.#size || s.length > this.#size - s.offset) {
      return t === NBD_CMD_WRITE || t === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
    }
    if (s.flags & ~valid) return NBD_EINVAL;
    if (s.flags & NBD_CMD_FLAG_FAST_ZERO) return NBD_ENOTSUP; // no zeroing known to be fast
    return 0;
  }

  #dispatch(s: RequestSlot): void {
    const err = this.#check(s);
    if (err !== 0) {
      this.#reply(s, err);
      return;
    }
    const blk = this.#blk;
    switch (s.type) {
      case NBD_CMD_READ:
        if (s.length === 0) return this.#reply(s, 0);
        this.#buffer(s);
        s.qiov.reset();
        s.qiov.add(addressOf(s.data!), s.length);
        blk.aioPreadv(s.offset, s.qiov, s.done);
        return;
      case NBD_CMD_WRITE:
        if (s.length === 0) return this.#reply(s, 0);
        s.qiov.reset();
        s.qiov.add(addressOf(s.data!), s.length);
        blk.aioPwritev(s.offset, s.qiov, s.done);
        return;
      case NBD_CMD_FLUSH:
        blk.aioFlush(s.done);
        return;
      case NBD_CMD_TRIM:
        if (s.length === 0) return this.#reply(s, 0);
        blk.aioPdiscard(s.offset, s.length, s.done);
        return;
      case NBD_CMD_WRITE_ZEROES:
        if (s.length === 0) return this.#reply(s, 0);
        blk.aioPwriteZeroes(s.offset, s.length, (s.flags & NBD_CMD_FLAG_NO_HOLE) === 0, s.done);
        return;
      case NBD_CMD_BLOCK_STATUS:
        this.#blockStatus(s);
        return;
      default: // NBD_CMD_CACHE: a hint; nothing is cached here
        this.#reply(s, 0);
    }
  }

  /**
   * One base:allocation extent over the whole range, flags 0 ("data, not
   * known to read as zeroes"): true of every range, since no driver below
   * reports allocation (QEMU says the same of a driver without block status).
   */
  #blockStatus(s: RequestSlot): void {
    if (this.#dead) {
      this.release(s);
      return;
    }
    const v = s.hv;
    v.setUint32(0, NBD_STRUCTURED_REPLY_MAGIC);
    v.setUint16(4, NBD_REPLY_FLAG_DONE);
    v.setUint16(6, NBD_REPLY_TYPE_BLOCK_STATUS);
    s.hdr.set(s.cookie, 8);
    v.setUint32(16, 12);
    v.setUint32(20, NBD_BASE_ALLOCATION_ID);
    v.setUint32(24, s.length);
    v.setUint32(28, 0);
    this.#io.queue(s.hdr, s.release);
    this.#io.flush();
  }

  /** Block-layer completion of a request. */
  complete(s: RequestSlot, ret: number): void {
    if (
      ret === 0 && ((s.flags & NBD_CMD_FLAG_FUA) !== 0 || this.#opts.writethrough) &&
      !s.fuaDone &&
      (s.type === NBD_CMD_WRITE || s.type === NBD_CMD_TRIM || s.type === NBD_CMD_WRITE_ZEROES)
    ) {
      s.fuaDone = true; // FUA: flush before the reply (QEMU's BDRV_REQ_FUA emulation)
      this.#blk.aioFlush(s.done);
      return;
    }
    if (ret === 0) {
      if (s.type === NBD_CMD_READ) this.stats.bytesRead += s.length;
      else if (s.type === NBD_CMD_WRITE) this.stats.bytesWritten += s.length;
    }
    this.#reply(s, ret < 0 ? systemErrnoToNbdErrno(-ret) : 0);
  }

  /** Queues the reply and sends what it can. Hot path: no allocation. */
  #reply(s: RequestSlot, error: number): void {
    if (error !== 0) this.stats.errors++;
    if (this.#dead) {
      this.release(s);
      return;
    }
    const v = s.hv;
    const withData = error === 0 && s.type === NBD_CMD_READ && s.length > 0;
    if (!this.#opts.structured) {
      v.setUint32(0, NBD_SIMPLE_REPLY_MAGIC);
      v.setUint32(4, error);
      s.hdr.set(s.cookie, 8);
      if (withData) {
        this.#io.queue(s.hdr16);
        this.#io.queue(s.data!, s.release);
      } else {
        this.#io.queue(s.hdr16, s.release);
      }
    } else {
      v.setUint32(0, NBD_STRUCTURED_REPLY_MAGIC);
      v.setUint16(4, NBD_REPLY_FLAG_DONE);
      s.hdr.set(s.cookie, 8);
      if (withData) {
        v.setUint16(6, NBD_REPLY_TYPE_OFFSET_DATA);
        v.setUint32(16, 8 + s.length);
        v.setUint32(20, Math.floor(s.offset / 0x100000000));
        v.setUint32(24, s.offset >>> 0);
        this.#io.queue(s.hdr28);
        this.#io.queue(s.data!, s.release);
      } else if (error !== 0) {
        v.setUint16(6, NBD_REPLY_TYPE_ERROR);
        v.setUint32(16, 6);
        v.setUint32(20, error);
        v.setUint16(24, 0); // no message
        this.#io.queue(s.hdr26, s.release);
      } else {
        v.setUint16(6, NBD_REPLY_TYPE_NONE);
        v.setUint32(16, 0);
        this.#io.queue(s.hdr20, s.release);
      }
    }
    this.#io.flush();
  }

  /** The reply of `s` is sent (or dropped): the slot and its buffer are free. */
  release(s: RequestSlot): void {
    if (s.pooled !== null) {
      this.#bufferedBytes -= s.pooled.byteLength;
      this.#pool.put(s.pooled);
      s.pooled = null;
      s.data = null;
    }
    this.#slots.push(s);
    this.#inUse--;
    if (this.#closing) {
      this.#maybeFinish();
      return;
    }
    if (
      this.#paused && this.#inUse < this.#maxRequests &&
      this.#bufferedBytes < this.#maxQueued && this.#io.pendingBytes <= this.#maxQueued
    ) {
      this.#paused = false;
      this.#io.setReading(true);
      this.#resume.schedule();
    }
  }

  /** No more requests; close once every reply is sent. */
  #beginClose(reason: string): void {
    if (this.#closing) return;
    this.#closing = true;
    this.#closeReason = reason;
    this.#io.setReading(false);
    if (this.#cur !== null) {
      const s = this.#cur;
      this.#cur = null;
      this.release(s); // a write cut short: never submitted
    }
    this.#maybeFinish();
  }

  /** Drop the connection: replies not sent yet are lost. */
  #fatal(reason: string): void {
    if (this.#dead) return;
    this.#beginClose(reason);
    this.#dead = true;
    this.#io.shutdown();
    this.#io.detach(); // drops queued replies (their slots are released)
    this.#maybeFinish();
  }

  #maybeFinish(): void {
    if (this.#closed || this.#inUse > 0) return;
    this.#io.whenDrained(() => {
      if (this.#closed) return;
      this.#closed = true;
      this.#resume.delete();
      this.#io.close();
      this.#opts.onClose(this.#closeReason);
      this.#closedP.resolve();
    });
  }
}
