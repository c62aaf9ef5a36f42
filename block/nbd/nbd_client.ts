import type { AioContext, AioTimer } from "../../aio/mod.ts";
import {
  addressOf,
  AF_UNIX,
  close,
  connectSockaddr,
  EIO,
  type InetAddress,
  resolveTcp,
  setTcpNoDelay,
  SOCK_NONBLOCK,
  sockaddrUn,
  socketStream,
  SysError,
} from "../../sys/mod.ts";
import type { IoVector } from "../io_vector.ts";
import type { BlockCompletion } from "../block_driver.ts";
import { describeNbdServer, type NbdServerAddress } from "./nbd_address.ts";
import { NbdChannel } from "./nbd_channel.ts";
import { NbdError } from "./nbd_error.ts";
import { nbdErrnoToSystemErrno } from "./nbd_errno.ts";
import { type NbdExportInfo, negotiate } from "./nbd_handshake.ts";
import { copyToQiov, fillQiov } from "./qiov_range.ts";
import {
  encodeNbdRequest,
  NBD_CMD_DISC,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_FLAG_READ_ONLY,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
} from "./nbd_protocol.ts";

/**
 * Options of an {@link NbdClient} (QEMU's BlockdevOptionsNbd): the server,
 * the export name, and `reconnect-delay` (seconds during which requests
 * wait for a lost server to come back before they fail with EIO; 0, the
 * default, fails them at once).
 *
 * @example
 * ```ts
 * import type { NbdClientOptions } from "./nbd_client.ts";
 * const o: NbdClientOptions = {
 *   server: { type: "inet", host: "127.0.0.1", port: 10809 }, exportName: "disk", reconnectDelay: 5,
 * };
 * ```
 */
export interface NbdClientOptions {
  server: NbdServerAddress;
  /** Export name (default ""). */
  exportName?: string;
  /** Seconds requests wait for a reconnection (default 0). */
  reconnectDelay?: number;
  /** Bound of one connection attempt, connect plus handshake, in seconds (default 10). */
  connectTimeout?: number;
  /** Requests in flight on the wire at once; more wait in a queue (default 64). */
  maxInFlight?: number;
}

/**
 * Where an {@link NbdClient} stands (QEMU's NBDClientState): `connected`;
 * `connecting-wait` (connection lost, requests wait up to reconnect-delay);
 * `connecting-nowait` (the delay is over: requests fail with EIO while
 * reconnection goes on); `quit` (closed).
 *
 * @example
 * ```ts
 * import type { NbdClientState } from "./nbd_client.ts";
 * const s: NbdClientState = "connecting-wait";
 * ```
 */
export type NbdClientState = "connected" | "connecting-wait" | "connecting-nowait" | "quit";

/** One request: on the wire (by cookie) or waiting for a connection or a free slot. */
class NbdRequestSlot {
  cookie = 0;
  type = 0;
  flags = 0;
  offset = 0;
  length = 0;
  qiov: IoVector | null = null;
  cb: BlockCompletion | null = null;
  /** First error reported by an error chunk (positive errno), 0 if none. */
  error = 0;
  /** Bytes of a read covered by data and hole chunks. */
  covered = 0;
  readonly hdr = new Uint8Array(NBD_REQUEST_SIZE);
  readonly hdrView = new DataView(this.hdr.buffer);
  readonly hdrAddr = addressOf(this.hdr);
}

const P_HEADER = 0, P_SIMPLE_DATA = 1, P_DATA_OFFSET = 2, P_CHUNK_DATA = 3, P_BUFFERED = 4;
/** Longest structured error payload accepted: error, length, message, offset. */
const MAX_ERROR_CHUNK = 6 + 4096 + 8;
const RECONNECT_BACKOFF_MIN_MS = 100;
const RECONNECT_BACKOFF_MAX_MS = 1000;

/**
 * An NBD client connection in an AioContext (QEMU's block/nbd.c
 * BDRVNBDState with nbd/client.c): many requests in flight told apart by
 * cookie, simple and structured replies parsed incrementally as bytes
 * arrive, everything the server says validated (a violation drops the
 * connection), and reconnection with reconnect-delay semantics: requests
 * on the wire when the connection goes are resent once it is back, and
 * fail with EIO only when the delay runs out first.
 *
 * Connection attempts (the first at {@link NbdClient.connect} and every
 * reconnection) run in the context without blocking it: a non-blocking
 * connect and the handshake over fd handlers, bounded by `connectTimeout`.
 * Only the name lookup of a TCP host that is not a numeric address
 * (getaddrinfo) is a blocking call.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { NbdClient } from "./nbd_client.ts";
 * // Against a server: see tests/block/nbd/. Here: a refused connection.
 * import { AioContext } from "../../aio/mod.ts";
 * const ctx = new AioContext();
 * const dir = Deno.makeTempDirSync();
 * await assert.rejects(
 *   NbdClient.connect(ctx, { server: { type: "unix", path: `${dir}/none` } }),
 *   /ENOENT/,
 * );
 * ctx.close();
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export class NbdClient {
  /** What the server said about the export at the first handshake. */
  readonly info: NbdExportInfo;
  /** Successful reconnections so far. */
  reconnects = 0;
  /** Requests resent after a reconnection. */
  resent = 0;
  /** Structured read chunks received: data and holes (tests, statistics). */
  dataChunks = 0;
  holeChunks = 0;
  /** Why the last connection went away or the last attempt failed. */
  lastError: Error | null = null;
  readonly #ctx: AioContext;
  readonly #opts: NbdClientOptions;
  readonly #maxInFlight: number;
  #state: NbdClientState = "connected";
  #ch: NbdChannel | null;
  #structured: boolean;
  readonly #inflight = new Map<number, NbdRequestSlot>();
  #waiting: NbdRequestSlot[] = [];
  readonly #free: NbdRequestSlot[] = [];
  #nextCookie = 1;
  #plugged = 0;
  readonly #delayTimer: AioTimer;
  readonly #retryTimer: AioTimer;
  #backoffMs = RECONNECT_BACKOFF_MIN_MS;
  /** The channel of a connection attempt under way (closed by close()). */
  #attempt: NbdChannel | null = null;
  // Reply parser state.
  #pState = P_HEADER;
  #pSlot: NbdRequestSlot | null = null;
  #pType = 0;
  #pFlags = 0;
  #pRemain = 0;
  #pPos = 0;
  readonly #onData = () => this.#parse();

  private constructor(
    ctx: AioContext,
    opts: NbdClientOptions,
    ch: NbdChannel,
    info: NbdExportInfo,
  ) {
    this.#ctx = ctx;
    this.#opts = opts;
    this.#maxInFlight = opts.maxInFlight ?? 64;
    this.info = info;
    this.#structured = info.structuredReply;
    this.#delayTimer = ctx.timerNew(() => this.#delayExpired());
    this.#retryTimer = ctx.timerNew(() => this.#attemptReconnect());
    this.#ch = ch;
    this.#attach(ch);
  }

  /**
   * Connects and runs the handshake (poll the context until this settles:
   * an IOThread's loop does; on the main thread use `pollAsync`). Throws
   * SysError (ECONNREFUSED, ENOENT...), AddressError or {@link NbdError}.
   */
  static connect(ctx: AioContext, opts: NbdClientOptions): Promise<NbdClient> {
    return new Promise((resolve, reject) => {
      let client: NbdClient | null = null;
      establish(
        ctx,
        opts,
        (ch, e) => {
          if (client) client.#channelFailed(ch, e);
        },
        (ch, info) => {
          client = new NbdClient(ctx, opts, ch, info);
          resolve(client);
        },
        reject,
      );
    });
  }

  /** Connection state. */
  get state(): NbdClientState {
    return this.#state;
  }

  /** Whether the export is read-only (NBD_FLAG_READ_ONLY). */
  get readOnly(): boolean {
    return (this.info.flags & NBD_FLAG_READ_ONLY) !== 0;
  }

  /** Requests on the wire plus those waiting. */
  get inFlight(): number {
    return this.#inflight.size + this.#waiting.length;
  }

  /**
   * Sends a request (type NBD_CMD_*, command flags, range; `qiov` is the
   * destination of a read or the source of a write, alive until `cb`).
   * Completes with 0 or -errno, never before returning. Hot path.
   */
  submit(
    type: number,
    flags: number,
    offset: number,
    length: number,
    qiov: IoVector | null,
    cb: BlockCompletion,
  ): void {
    if (this.#state === "quit" || this.#state === "connecting-nowait") {
      this.#ctx.scheduleOneshot(() => cb(-EIO));
      return;
    }
    const s = this.#free.pop() ?? new NbdRequestSlot();
    s.type = type;
    s.flags = flags;
    s.offset = offset;
    s.length = length;
    s.qiov = qiov;
    s.cb = cb;
    if (this.#state === "connected" && this.#inflight.size < this.#maxInFlight) {
      this.#send(s);
      if (this.#plugged === 0) this.#ch!.flush();
    } else this.#waiting.push(s);
  }

  /** Starts a batch: requests are queued on the socket until {@link unplug}. */
  plug(): void {
    this.#plugged++;
  }

  /** Ends a batch: one sendmsg for what was queued. */
  unplug(): void {
    if (this.#plugged > 0 && --this.#plugged === 0) this.#ch?.flush();
  }

  /**
   * Disconnects (NBD_CMD_DISC) and stops reconnecting; waiting requests
   * fail with EIO. No request should be in flight.
   */
  close(): Promise<void> {
    if (this.#state === "quit") return Promise.resolve();
    this.#state = "quit";
    this.#delayTimer.del();
    this.#retryTimer.del();
    this.#attempt?.close();
    this.#attempt = null;
    const ch = this.#ch;
    this.#ch = null;
    if (ch && !ch.closed) {
      const s = new NbdRequestSlot();
      encodeNbdRequest(s.hdr, 0, {
        flags: 0,
        type: NBD_CMD_DISC,
        cookie: 0n,
        offset: 0n,
        length: 0,
      });
      ch.sendBytes(s.hdr);
      ch.close();
    }
    const lost = [...this.#inflight.values(), ...this.#waiting];
    this.#inflight.clear();
    this.#waiting = [];
    for (const s of lost) this.#complete(s, -EIO);
    return Promise.resolve();
  }

  /** Drops the connection as if the server had gone (tests). */
  breakConnection(): void {
    this.#ch?.fail(new NbdError("closed", "connection broken on purpose"));
  }

  #attach(ch: NbdChannel): void {
    this.#pState = P_HEADER;
    this.#pSlot = null;
    ch.onData = this.#onData;
    ch.drainBuffered();
  }

  /** Hot path: the header is written in place (as encodeNbdRequest lays it out), no allocation. */
  #send(s: NbdRequestSlot): void {
    // Cookies are 32-bit counters (the high half on the wire is 0), never one in use.
    let cookie = this.#nextCookie;
    while (this.#inflight.has(cookie)) cookie = (cookie + 1) >>> 0;
    this.#nextCookie = (cookie + 1) >>> 0;
    s.cookie = cookie;
    s.error = 0;
    s.covered = 0;
    const v = s.hdrView;
    v.setUint32(0, NBD_REQUEST_MAGIC);
    v.setUint16(4, s.flags);
    v.setUint16(6, s.type);
    v.setUint32(8, 0);
    v.setUint32(12, cookie);
    v.setUint32(16, Math.floor(s.offset / 0x100000000));
    v.setUint32(20, s.offset >>> 0);
    v.setUint32(24, s.length);
    this.#inflight.set(cookie, s);
    const ch = this.#ch!;
    ch.queue(s.hdrAddr, NBD_REQUEST_SIZE);
    if (s.type === NBD_CMD_WRITE) {
      const q = s.qiov!;
      for (let i = 0; i < q.niov; i++) ch.queue(q.base(i), q.len(i));
    }
  }

  #complete(s: NbdRequestSlot, ret: number): void {
    const cb = s.cb!;
    s.cb = null;
    s.qiov = null;
    this.#free.push(s);
    cb(ret);
  }

  /** Sends waiting requests while slots are free. */
  #pump(): void {
    if (this.#state !== "connected") return;
    let sent = false;
    while (this.#waiting.length > 0 && this.#inflight.size < this.#maxInFlight) {
      this.#send(this.#waiting.shift()!);
      sent = true;
    }
    if (sent && this.#plugged === 0) this.#ch?.flush();
  }

  #protocolError(msg: string): void {
    this.#ch?.fail(new NbdError("protocol", msg));
  }

  /** The request of the cookie at `at` in the receive buffer; unknown: protocol error. */
  #lookup(v: DataView, at: number): NbdRequestSlot | null {
    const hi = v.getUint32(at), lo = v.getUint32(at + 4);
    const s = hi === 0 ? this.#inflight.get(lo) : undefined;
    if (!s) {
      this.#protocolError(`reply with unknown cookie ${v.getBigUint64(at)}`);
      return null;
    }
    return s;
  }

  /** Parses the replies buffered in the channel (hot path). */
  #parse(): void {
    const ch = this.#ch;
    if (!ch) return;
    const v = ch.rview;
    while (!ch.closed) {
      const avail = ch.rend - ch.rstart;
      const at = ch.rstart;
      switch (this.#pState) {
        case P_HEADER: {
          if (avail < 4) return this.#pump();
          const magic = v.getUint32(at);
          if (magic === NBD_SIMPLE_REPLY_MAGIC) {
            if (avail < 16) return this.#pump();
            const error = v.getUint32(at + 4);
            const s = this.#lookup(v, at + 8);
            if (!s) return;
            ch.rstart += 16;
            if (error !== 0) this.#finish(s, -nbdErrnoToSystemErrno(error));
            else if (s.type === NBD_CMD_READ) {
              if (this.#structured) {
                return this.#protocolError("simple reply with data to a structured read");
              }
              this.#pSlot = s;
              this.#pPos = 0;
              this.#pRemain = s.length;
              this.#pState = P_SIMPLE_DATA;
              if (s.length === 0) this.#finishSimpleRead();
            } else this.#finish(s, 0);
          } else if (magic === NBD_STRUCTURED_REPLY_MAGIC && this.#structured) {
            if (avail < 20) return this.#pump();
            const flags = v.getUint16(at + 4), type = v.getUint16(at + 6);
            const length = v.getUint32(at + 16);
            const s = this.#lookup(v, at + 8);
            if (!s) return;
            ch.rstart += 20;
            if (!this.#startChunk(s, flags, type, length)) return;
          } else {
            return this.#protocolError(`bad reply magic 0x${magic.toString(16)}`);
          }
          break;
        }
        case P_SIMPLE_DATA:
        case P_CHUNK_DATA: {
          if (avail === 0) return this.#pump();
          const n = Math.min(avail, this.#pRemain);
          copyToQiov(this.#pSlot!.qiov!, this.#pPos, ch.rbufAddr + at, n);
          ch.rstart += n;
          this.#pPos += n;
          this.#pRemain -= n;
          if (this.#pRemain === 0) {
            if (this.#pState === P_SIMPLE_DATA) this.#finishSimpleRead();
            else this.#endChunk();
          }
          break;
        }
        case P_DATA_OFFSET: {
          if (avail < 8) return this.#pump();
          const s = this.#pSlot!;
          const rel = Number(v.getBigUint64(at)) - s.offset;
          ch.rstart += 8;
          this.#pRemain -= 8;
          if (!(rel >= 0 && rel + this.#pRemain <= s.length)) {
            return this.#protocolError("data chunk outside its request");
          }
          s.covered += this.#pRemain;
          this.dataChunks++;
          this.#pPos = rel;
          this.#pState = P_CHUNK_DATA;
          break;
        }
        case P_BUFFERED: {
          if (avail < this.#pRemain) return this.#pump();
          if (!this.#bufferedChunk(v, at, this.#pRemain)) return;
          ch.rstart += this.#pRemain;
          this.#endChunk();
          break;
        }
      }
    }
  }

  /** Validates a structured chunk header; false when the connection was dropped. */
  #startChunk(s: NbdRequestSlot, flags: number, type: number, length: number): boolean {
    this.#pSlot = s;
    this.#pType = type;
    this.#pFlags = flags;
    this.#pRemain = length;
    const read = s.type === NBD_CMD_READ;
    if (type === NBD_REPLY_TYPE_NONE) {
      if (length !== 0 || !(flags & NBD_REPLY_FLAG_DONE)) {
        this.#protocolError("NBD_REPLY_TYPE_NONE with data or without DONE");
        return false;
      }
      this.#endChunk();
    } else if (type === NBD_REPLY_TYPE_OFFSET_DATA) {
      if (!read || length <= 8) {
        this.#protocolError("unexpected or empty NBD_REPLY_TYPE_OFFSET_DATA");
        return false;
      }
      this.#pState = P_DATA_OFFSET;
    } else if (type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      if (!read || length !== 12) {
        this.#protocolError("unexpected or bad NBD_REPLY_TYPE_OFFSET_HOLE");
        return false;
      }
      this.#pState = P_BUFFERED;
    } else if (type & 0x8000) {
      if (length < 6 || length > MAX_ERROR_CHUNK) {
        this.#protocolError(`error chunk of ${length} bytes`);
        return false;
      }
      this.#pState = P_BUFFERED;
    } else {
      this.#protocolError(`unexpected structured reply type ${type}`);
      return false;
    }
    return true;
  }

  /** An OFFSET_HOLE or error chunk whose payload is all buffered at `at`. */
  #bufferedChunk(v: DataView, at: number, length: number): boolean {
    const s = this.#pSlot!;
    if (this.#pType === NBD_REPLY_TYPE_OFFSET_HOLE) {
      const rel = Number(v.getBigUint64(at)) - s.offset;
      const size = v.getUint32(at + 8);
      if (!(size > 0 && rel >= 0 && rel + size <= s.length)) {
        this.#protocolError("hole chunk outside its request");
        return false;
      }
      fillQiov(s.qiov!, rel, size);
      s.covered += size;
      this.holeChunks++;
      return true;
    }
    const err = v.getUint32(at), msgLen = v.getUint16(at + 4);
    const extra = this.#pType === (0x8000 | 2) ? 8 : 0; // NBD_REPLY_TYPE_ERROR_OFFSET
    const known = this.#pType === (0x8000 | 1) || extra > 0;
    if (err === 0 || 6 + msgLen + extra > length || (known && 6 + msgLen + extra !== length)) {
      this.#protocolError("malformed error chunk");
      return false;
    }
    if (extra > 0) {
      const rel = Number(v.getBigUint64(at + 6 + msgLen)) - s.offset;
      if (!(rel >= 0 && rel < Math.max(s.length, 1))) {
        this.#protocolError("error offset outside its request");
        return false;
      }
    }
    if (s.error === 0) s.error = nbdErrnoToSystemErrno(err);
    return true;
  }

  #endChunk(): void {
    this.#pState = P_HEADER;
    const s = this.#pSlot!;
    this.#pSlot = null;
    if (!(this.#pFlags & NBD_REPLY_FLAG_DONE)) return;
    let ret = s.error ? -s.error : 0;
    // A read that succeeded must have been covered exactly (chunks never overlap).
    if (ret === 0 && s.type === NBD_CMD_READ && s.covered !== s.length) ret = -EIO;
    this.#finish(s, ret);
  }

  #finishSimpleRead(): void {
    this.#pState = P_HEADER;
    const s = this.#pSlot!;
    this.#pSlot = null;
    this.#finish(s, 0);
  }

  #finish(s: NbdRequestSlot, ret: number): void {
    this.#inflight.delete(s.cookie);
    this.#complete(s, ret);
  }

  /** The channel of the current connection failed (EOF, error, protocol violation). */
  #channelFailed(ch: NbdChannel, e: Error): void {
    if (ch !== this.#ch || this.#state === "quit") return;
    this.lastError = e;
    this.#ch = null;
    this.#pState = P_HEADER;
    this.#pSlot = null;
    // Requests on the wire go back to the front of the queue, in order.
    this.#waiting = [...this.#inflight.values(), ...this.#waiting];
    this.#inflight.clear();
    const delay = this.#opts.reconnectDelay ?? 0;
    if (delay > 0) {
      this.#state = "connecting-wait";
      this.#delayTimer.modNs(this.#ctx.now() + delay * 1e9);
    } else this.#delayExpired();
    this.#backoffMs = RECONNECT_BACKOFF_MIN_MS;
    this.#attemptReconnect();
  }

  /** reconnect-delay is over: waiting requests fail, new ones fail fast. */
  #delayExpired(): void {
    if (this.#state !== "connecting-wait" && this.#state !== "connected") return;
    this.#state = "connecting-nowait";
    const w = this.#waiting;
    this.#waiting = [];
    for (const s of w) this.#complete(s, -EIO);
  }

  /**
   * One reconnection attempt (callbacks only: it runs inside the context's
   * poll); on failure the retry timer tries again after a backoff of 100 ms
   * doubling to 1 s.
   */
  #attemptReconnect(): void {
    if (this.#state !== "connecting-wait" && this.#state !== "connecting-nowait") return;
    if (this.#attempt) return;
    establish(
      this.#ctx,
      this.#opts,
      (c, e) => this.#channelFailed(c, e),
      (ch, info) => this.#reconnected(ch, info),
      (e) => this.#attemptFailed(e),
      (c) => this.#attempt = c,
    );
  }

  #attemptFailed(e: Error): void {
    this.#attempt = null;
    this.lastError = e;
    if (this.#state === "quit") return;
    this.#retryTimer.modNs(this.#ctx.now() + this.#backoffMs * 1e6);
    this.#backoffMs = Math.min(this.#backoffMs * 2, RECONNECT_BACKOFF_MAX_MS);
  }

  #reconnected(ch: NbdChannel, info: NbdExportInfo): void {
    this.#attempt = null;
    if (this.#state === "quit") return ch.close();
    const why = this.#incompatible(info);
    if (why) {
      ch.close();
      return this.#attemptFailed(new NbdError("protocol", why));
    }
    this.#structured = info.structuredReply;
    this.#ch = ch;
    this.#state = "connected";
    this.#delayTimer.del();
    this.reconnects++;
    this.resent += Math.min(this.#waiting.length, this.#maxInFlight);
    this.#attach(ch);
    this.#pump();
  }

  /** Why a reconnection's export cannot replace the first one (QEMU checks the same). */
  #incompatible(info: NbdExportInfo): string | null {
    if (info.size !== this.info.size) {
      return `export size changed from ${this.info.size} to ${info.size}`;
    }
    if ((info.flags & NBD_FLAG_READ_ONLY) && !this.readOnly) return "export became read-only";
    if (info.minBlock > this.info.minBlock || info.maxBlock < this.info.maxBlock) {
      return "export block sizes changed";
    }
    return null;
  }
}

/**
 * One connection attempt: a non-blocking connect, then the handshake over
 * an {@link NbdChannel}, bounded by the connect timeout; `done` or `fail`
 * is called (possibly before this returns, for an immediate connect error).
 */
function establish(
  ctx: AioContext,
  opts: NbdClientOptions,
  onError: (ch: NbdChannel, e: Error) => void,
  done: (ch: NbdChannel, info: NbdExportInfo) => void,
  fail: (e: Error) => void,
  onChannel?: (ch: NbdChannel) => void,
): void {
  let fd: number;
  try {
    fd = startConnect(opts.server);
  } catch (e) {
    return fail(e as Error);
  }
  let ch: NbdChannel;
  try {
    ch = new NbdChannel(ctx, fd, (e) => onError(ch, e));
  } catch (e) {
    close(fd);
    return fail(e as Error);
  }
  onChannel?.(ch);
  const timeout = (opts.connectTimeout ?? 10) * 1e9;
  const timer = ctx.timerNew(() =>
    ch.fail(
      new NbdError("timeout", `no NBD handshake with ${describeNbdServer(opts.server)} in time`),
    )
  );
  timer.modNs(ctx.now() + timeout);
  negotiate(ch, opts.exportName ?? "", (info) => {
    timer.del();
    done(ch, info);
  }, (e) => {
    timer.del();
    ch.close();
    fail(e);
  });
}

/** socket + non-blocking connect (may still be in progress: errors show on the fd). */
function startConnect(server: NbdServerAddress): number {
  if (server.type === "unix") {
    const sa = sockaddrUn(server.path, "connect");
    const fd = socketStream(AF_UNIX, SOCK_NONBLOCK);
    try {
      connectSockaddr(fd, sa, server.path);
      return fd;
    } catch (e) {
      close(fd);
      throw e;
    }
  }
  const addrs: InetAddress[] = resolveTcp(server.host, server.port);
  let last: unknown = null;
  for (const a of addrs) {
    const fd = socketStream(a.family, SOCK_NONBLOCK);
    try {
      setTcpNoDelay(fd);
      connectSockaddr(fd, a.sockaddr, describeNbdServer(server));
      return fd;
    } catch (e) {
      close(fd);
      if (!(e instanceof SysError)) throw e;
      last = e;
    }
  }
  throw last;
}
