/**
 * The fixed-newstyle handshake of one NBD connection, on the main thread
 * (QEMU's nbd_negotiate / nbd_negotiate_options): greeting, client flags,
 * then options until NBD_OPT_GO or NBD_OPT_EXPORT_NAME picks an export (the
 * fd then goes to that export's IOThread) or the client aborts.
 *
 * Reads exactly the bytes each step needs, so nothing of the transmission
 * phase is ever read here. Hostile input is bounded: an option longer than
 * {@link NBD_MAX_OPTION_LENGTH}, more than `maxOptions` options, a bad magic,
 * unknown client flags or a handshake slower than `timeoutMs` close the
 * connection; a malformed option gets NBD_REP_ERR_INVALID and the
 * handshake goes on; an unknown option gets NBD_REP_ERR_UNSUP.
 *
 * @module
 */

import type { AioContext, AioTimer } from "../../aio/mod.ts";
import {
  IHAVEOPT,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_SEND_DF,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAX_STRING_SIZE,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPTION_HEADER_SIZE,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  NBDMAGIC,
} from "../../block/mod.ts";
import { recvInto, WOULD_BLOCK } from "../../sys/mod.ts";
import { NbdSocketIo } from "./nbd_socket_io.ts";

/** Longest option payload accepted (an INFO/GO with a maximal name and many requests fits). */
export const NBD_MAX_OPTION_LENGTH = 4 * NBD_MAX_STRING_SIZE;
/** Default bound on options per connection. */
export const NBD_MAX_OPTIONS = 256;
/** The meta context the export offers. */
export const BASE_ALLOCATION = "base:allocation";
/** The id it is known by in NBD_REP_META_CONTEXT and block status chunks. */
export const NBD_BASE_ALLOCATION_ID = 1;
/** Default handshake deadline (QEMU's handshake-max-seconds is 10). */
export const NBD_HANDSHAKE_TIMEOUT_MS = 10_000;

/**
 * What the handshake tells a client about an export.
 *
 * @example
 * ```ts
 * import type { NbdExportInfo } from "./nbd_handshake.ts";
 * const i: NbdExportInfo = { name: "d", description: "", size: 512, flags: 1,
 *   minBlockSize: 1, preferredBlockSize: 4096, maxBlockSize: 1 << 25 };
 * if (i.size !== 512) throw new Error();
 * ```
 */
export interface NbdExportInfo {
  name: string;
  description: string;
  size: number;
  /** Transmission flags (NBD_FLAG_HAS_FLAGS | ...). */
  flags: number;
  minBlockSize: number;
  preferredBlockSize: number;
  maxBlockSize: number;
}

/**
 * Where the handshake finds exports (the server's table).
 *
 * @example
 * ```ts
 * import type { NbdExportTable } from "./nbd_handshake.ts";
 * const t: NbdExportTable = { lookup: () => undefined, list: () => [] };
 * if (t.list().length !== 0) throw new Error();
 * ```
 */
export interface NbdExportTable {
  lookup(name: string): NbdExportInfo | undefined;
  list(): NbdExportInfo[];
}

/**
 * A finished handshake: the fd (still open, no longer served here), the
 * export picked and whether structured replies were negotiated.
 *
 * @example
 * ```ts
 * import type { NbdHandshakeResult } from "./nbd_handshake.ts";
 * const r: NbdHandshakeResult = { fd: 5, exportName: "d", structured: true };
 * if (!r.structured) throw new Error();
 * ```
 */
export interface NbdHandshakeResult {
  fd: number;
  exportName: string;
  structured: boolean;
  /** `base:allocation` was selected (id {@link NBD_BASE_ALLOCATION_ID}) for this export. */
  baseAllocation?: boolean;
}

/**
 * Options of an {@link NbdHandshake}.
 *
 * @example
 * ```ts
 * import type { NbdHandshakeOptions } from "./nbd_handshake.ts";
 * const o: NbdHandshakeOptions = { onDone: () => {}, timeoutMs: 1000 };
 * if (o.timeoutMs !== 1000) throw new Error();
 * ```
 */
export interface NbdHandshakeOptions {
  /** The result, or null with the reason when the connection was closed. */
  onDone(result: NbdHandshakeResult | null, reason: string): void;
  timeoutMs?: number;
  maxOptions?: number;
}

const decoder = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();

type Step = "flags" | "header" | "payload";

/** Thrown by an option parser for a malformed payload: NBD_REP_ERR_INVALID. */
class OptionInvalid extends Error {}

/**
 * One connection's handshake, served from `ctx`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { close, recvInto, sendMsg, SOCK_NONBLOCK, socketpair } from "../../sys/mod.ts";
 * import { NbdHandshake, type NbdHandshakeResult } from "./nbd_handshake.ts";
 * const ctx = new AioContext();
 * const [srv, cli] = socketpair(SOCK_NONBLOCK);
 * const results: NbdHandshakeResult[] = [];
 * const info = { name: "d", description: "", size: 4096, flags: 1, minBlockSize: 1,
 *   preferredBlockSize: 4096, maxBlockSize: 1 << 25 };
 * new NbdHandshake(ctx, srv, { lookup: (n) => n === "d" ? info : undefined, list: () => [info] },
 *   { onDone: (r) => r && results.push(r) });
 * const msg = new Uint8Array(4 + 16 + 1);
 * const v = new DataView(msg.buffer);
 * v.setUint32(0, 3); // FIXED_NEWSTYLE | NO_ZEROES
 * v.setBigUint64(4, 0x49484156454f5054n); v.setUint32(12, 1); v.setUint32(16, 1); // EXPORT_NAME "d"
 * msg[20] = 100;
 * sendMsg(cli, msg);
 * while (results.length === 0) ctx.poll(true);
 * assert.equal(results[0].exportName, "d");
 * const got = new Uint8Array(64);
 * assert.equal(recvInto(cli, got, 0, 64), 18 + 10); // greeting, then size and flags
 * close(results[0].fd); close(cli); ctx.close();
 * ```
 */
export class NbdHandshake {
  readonly #io: NbdSocketIo;
  readonly #exports: NbdExportTable;
  readonly #opts: NbdHandshakeOptions;
  readonly #timer: AioTimer;
  readonly #maxOptions: number;
  #step: Step = "flags";
  #buf = new Uint8Array(NBD_OPTION_HEADER_SIZE);
  #need = 4;
  #fill = 0;
  #option = 0;
  #options = 0;
  #noZeroes = false;
  #structured = false;
  /** The export base:allocation was selected for by SET_META_CONTEXT. */
  #baseAllocationFor: string | null = null;
  #done = false;
  #constructing = false;
  readonly #ctx: AioContext;
  /** GO or EXPORT_NAME answered: the last replies are being sent. */
  #finishing = false;

  constructor(
    ctx: AioContext,
    fd: number,
    exports: NbdExportTable,
    opts: NbdHandshakeOptions,
  ) {
    this.#ctx = ctx;
    this.#exports = exports;
    this.#opts = opts;
    this.#maxOptions = opts.maxOptions ?? NBD_MAX_OPTIONS;
    this.#io = new NbdSocketIo(ctx, fd, () => this.#onReadable(), (e) => this.#fail(e.message));
    this.#timer = ctx.timerNew(() => this.#fail("handshake timed out"));
    this.#timer.modNs(ctx.now() + (opts.timeoutMs ?? NBD_HANDSHAKE_TIMEOUT_MS) * 1e6);
    const greeting = new Uint8Array(18);
    const v = new DataView(greeting.buffer);
    v.setBigUint64(0, NBDMAGIC);
    v.setBigUint64(8, IHAVEOPT);
    v.setUint16(16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    this.#io.queue(greeting);
    this.#constructing = true;
    this.#io.flush(); // may fail at once (a client that reset): onDone comes later
    this.#constructing = false;
    if (!this.#done) this.#io.setReading(true);
  }

  /** Closes the connection (server stopping). */
  abort(reason = "server stopped"): void {
    this.#fail(reason);
  }

  #fail(reason: string): void {
    if (this.#done) return;
    this.#done = true;
    this.#timer.del();
    this.#io.close();
    // Never from inside the constructor: the caller does not hold the object yet.
    if (this.#constructing) this.#ctx.scheduleOneshot(() => this.#opts.onDone(null, reason));
    else this.#opts.onDone(null, reason);
  }

  #onReadable(): void {
    while (!this.#done && !this.#finishing) {
      if (this.#fill < this.#need) {
        let n: number;
        try {
          n = recvInto(this.#io.fd, this.#buf, this.#fill, this.#need - this.#fill);
        } catch (e) {
          return this.#fail(`receive failed: ${(e as Error).message}`);
        }
        if (n === WOULD_BLOCK) return;
        if (n === 0) return this.#fail("client closed the connection during the handshake");
        this.#fill += n;
        if (this.#fill < this.#need) continue;
      }
      this.#stepDone();
    }
  }

  #expect(step: Step, n: number): void {
    this.#step = step;
    this.#need = n;
    this.#fill = 0;
    if (this.#buf.byteLength < n || this.#buf.byteLength > NBD_OPTION_HEADER_SIZE && n <= 16) {
      this.#buf = new Uint8Array(Math.max(n, NBD_OPTION_HEADER_SIZE));
    }
  }

  #stepDone(): void {
    const v = new DataView(this.#buf.buffer, 0, this.#need);
    switch (this.#step) {
      case "flags": {
        const flags = v.getUint32(0);
        if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
          return this.#fail(`unknown client flags 0x${flags.toString(16)}`);
        }
        if (!(flags & NBD_FLAG_C_FIXED_NEWSTYLE)) {
          return this.#fail("the client does not speak fixed newstyle");
        }
        this.#noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
        return this.#expect("header", NBD_OPTION_HEADER_SIZE);
      }
      case "header": {
        if (v.getBigUint64(0) !== IHAVEOPT) return this.#fail("bad option magic");
        if (++this.#options > this.#maxOptions) {
          return this.#fail(`more than ${this.#maxOptions} options`);
        }
        this.#option = v.getUint32(8);
        const length = v.getUint32(12);
        if (length > NBD_MAX_OPTION_LENGTH) {
          return this.#fail(`option ${this.#option} of ${length} bytes is too long`);
        }
        if (length === 0) return this.#handle(new Uint8Array(0));
        return this.#expect("payload", length);
      }
      case "payload":
        return this.#handle(this.#buf.subarray(0, this.#need));
    }
  }

  #handle(payload: Uint8Array): void {
    const opt = this.#option;
    this.#expect("header", NBD_OPTION_HEADER_SIZE); // the next option, unless this one ends it
    try {
      switch (opt) {
        case NBD_OPT_EXPORT_NAME:
          return this.#exportName(payload);
        case NBD_OPT_ABORT:
          this.#finishing = true;
          this.#io.setReading(false);
          this.#reply(opt, NBD_REP_ACK);
          this.#io.whenDrained(() => this.#fail("client sent NBD_OPT_ABORT"));
          return;
        case NBD_OPT_LIST:
          if (payload.byteLength !== 0) throw new OptionInvalid("NBD_OPT_LIST takes no data");
          for (const e of this.#exports.list()) {
            // The name, then (free-form details) the description, as QEMU.
            const name = encoder.encode(e.name);
            const desc = encoder.encode(e.description);
            const p = new Uint8Array(4 + name.byteLength + desc.byteLength);
            new DataView(p.buffer).setUint32(0, name.byteLength);
            p.set(name, 4);
            p.set(desc, 4 + name.byteLength);
            this.#reply(opt, NBD_REP_SERVER, p);
          }
          return this.#reply(opt, NBD_REP_ACK);
        case NBD_OPT_INFO:
        case NBD_OPT_GO:
          return this.#infoOrGo(opt, payload);
        case NBD_OPT_STRUCTURED_REPLY:
          if (payload.byteLength !== 0) {
            throw new OptionInvalid("NBD_OPT_STRUCTURED_REPLY takes no data");
          }
          if (this.#structured) throw new OptionInvalid("structured replies already negotiated");
          this.#structured = true;
          return this.#reply(opt, NBD_REP_ACK);
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT:
          return this.#metaContext(opt, payload);
        default: // STARTTLS, EXTENDED_HEADERS and anything unknown
          return this.#error(opt, NBD_REP_ERR_UNSUP, `option ${opt} is not supported`);
      }
    } catch (e) {
      if (!(e instanceof OptionInvalid)) throw e;
      this.#error(opt, NBD_REP_ERR_INVALID, e.message);
    }
  }

  #reply(option: number, type: number, payload?: Uint8Array): void {
    const len = payload?.byteLength ?? 0;
    const b = new Uint8Array(20 + len);
    const v = new DataView(b.buffer);
    v.setBigUint64(0, NBD_REP_MAGIC);
    v.setUint32(8, option);
    v.setUint32(12, type);
    v.setUint32(16, len);
    if (payload) b.set(payload, 20);
    this.#io.queue(b);
    this.#io.flush();
  }

  #error(option: number, type: number, message: string): void {
    this.#reply(option, type, encoder.encode(message.slice(0, NBD_MAX_STRING_SIZE)));
  }

  /** A string of `len` bytes at `at` of `p`, checked (OptionInvalid when malformed). */
  #string(p: Uint8Array, at: number, len: number): string {
    if (len > NBD_MAX_STRING_SIZE) throw new OptionInvalid("name too long");
    if (at + len > p.byteLength) throw new OptionInvalid("option data too short");
    try {
      return decoder.decode(p.subarray(at, at + len));
    } catch {
      throw new OptionInvalid("name is not UTF-8");
    }
  }

  #exportName(payload: Uint8Array): void {
    let name: string;
    try {
      name = this.#string(payload, 0, payload.byteLength);
    } catch (e) {
      return this.#fail(`NBD_OPT_EXPORT_NAME: ${(e as Error).message}`);
    }
    const e = this.#exports.lookup(name);
    // NBD_OPT_EXPORT_NAME has no error reply: only closing.
    if (e === undefined) return this.#fail(`NBD_OPT_EXPORT_NAME: no export '${name}'`);
    const b = new Uint8Array(10 + (this.#noZeroes ? 0 : 124));
    const v = new DataView(b.buffer);
    v.setBigUint64(0, BigInt(e.size));
    v.setUint16(8, this.#flags(e));
    this.#io.queue(b);
    this.#io.flush();
    this.#finish(name);
  }

  /** The export's transmission flags, plus SEND_DF with structured replies (as QEMU). */
  #flags(e: NbdExportInfo): number {
    return this.#structured ? e.flags | NBD_FLAG_SEND_DF : e.flags;
  }

  #infoOrGo(opt: number, p: Uint8Array): void {
    const v = new DataView(p.buffer, p.byteOffset, p.byteLength);
    if (p.byteLength < 6) throw new OptionInvalid("option data too short");
    const nameLen = v.getUint32(0);
    const name = this.#string(p, 4, nameLen);
    if (4 + nameLen + 2 > p.byteLength) throw new OptionInvalid("option data too short");
    const n = v.getUint16(4 + nameLen);
    if (p.byteLength !== 4 + nameLen + 2 + 2 * n) {
      throw new OptionInvalid("option data length does not match its request count");
    }
    const wanted = new Set<number>();
    for (let i = 0; i < n; i++) wanted.add(v.getUint16(4 + nameLen + 2 + 2 * i));
    const e = this.#exports.lookup(name);
    if (e === undefined) {
      return this.#error(opt, NBD_REP_ERR_UNKNOWN, `export '${name}' not present`);
    }
    if (wanted.has(NBD_INFO_NAME)) {
      const nb = encoder.encode(e.name);
      const b = new Uint8Array(2 + nb.byteLength);
      new DataView(b.buffer).setUint16(0, NBD_INFO_NAME);
      b.set(nb, 2);
      this.#reply(opt, NBD_REP_INFO, b);
    }
    if (wanted.has(NBD_INFO_DESCRIPTION) && e.description !== "") {
      const db = encoder.encode(e.description);
      const b = new Uint8Array(2 + db.byteLength);
      new DataView(b.buffer).setUint16(0, NBD_INFO_DESCRIPTION);
      b.set(db, 2);
      this.#reply(opt, NBD_REP_INFO, b);
    }
    // Block sizes always (as QEMU): min 1 unless the client promised to honour a larger one.
    const bs = new Uint8Array(14);
    const bv = new DataView(bs.buffer);
    bv.setUint16(0, NBD_INFO_BLOCK_SIZE);
    bv.setUint32(2, wanted.has(NBD_INFO_BLOCK_SIZE) ? e.minBlockSize : 1);
    bv.setUint32(6, e.preferredBlockSize);
    bv.setUint32(10, e.maxBlockSize);
    this.#reply(opt, NBD_REP_INFO, bs);
    const ex = new Uint8Array(12);
    const ev = new DataView(ex.buffer);
    ev.setUint16(0, NBD_INFO_EXPORT);
    ev.setBigUint64(2, BigInt(e.size));
    ev.setUint16(10, this.#flags(e));
    this.#reply(opt, NBD_REP_INFO, ex);
    this.#reply(opt, NBD_REP_ACK);
    if (opt === NBD_OPT_GO) this.#finish(name);
  }

  /**
   * The one meta context offered is `base:allocation` (every extent is
   * reported as data: nothing below tells holes apart); LIST answers it for
   * no query or a `base:` query, SET selects it for the named export.
   */
  #metaContext(opt: number, p: Uint8Array): void {
    if (opt === NBD_OPT_SET_META_CONTEXT && !this.#structured) {
      throw new OptionInvalid("NBD_OPT_SET_META_CONTEXT needs structured replies first");
    }
    const v = new DataView(p.buffer, p.byteOffset, p.byteLength);
    if (p.byteLength < 8) throw new OptionInvalid("option data too short");
    const nameLen = v.getUint32(0);
    const name = this.#string(p, 4, nameLen);
    if (4 + nameLen + 4 > p.byteLength) throw new OptionInvalid("option data too short");
    const n = v.getUint32(4 + nameLen);
    let at = 8 + nameLen;
    const queries: string[] = [];
    for (let i = 0; i < n; i++) {
      if (at + 4 > p.byteLength) throw new OptionInvalid("option data too short");
      const len = v.getUint32(at);
      queries.push(this.#string(p, at + 4, len));
      at += 4 + len;
    }
    if (at !== p.byteLength) throw new OptionInvalid("option data longer than its queries");
    if (this.#exports.lookup(name) === undefined) {
      return this.#error(opt, NBD_REP_ERR_UNKNOWN, `export '${name}' not present`);
    }
    const match = opt === NBD_OPT_LIST_META_CONTEXT
      ? n === 0 || queries.some((q) => q === "base:" || q === BASE_ALLOCATION)
      : queries.includes(BASE_ALLOCATION);
    if (opt === NBD_OPT_SET_META_CONTEXT) this.#baseAllocationFor = match ? name : null;
    if (match) {
      const nb = encoder.encode(BASE_ALLOCATION);
      const b = new Uint8Array(4 + nb.byteLength);
      new DataView(b.buffer).setUint32(0, NBD_BASE_ALLOCATION_ID);
      b.set(nb, 4);
      this.#reply(opt, NBD_REP_META_CONTEXT, b);
    }
    this.#reply(opt, NBD_REP_ACK);
  }

  #finish(name: string): void {
    this.#finishing = true;
    this.#io.setReading(false);
    this.#io.whenDrained(() => {
      if (this.#done) return; // the send failed: #fail closed it
      this.#done = true;
      this.#timer.del();
      const fd = this.#io.detach();
      this.#opts.onDone({
        fd,
        exportName: name,
        structured: this.#structured,
        baseAllocation: this.#structured && this.#baseAllocationFor === name,
      }, "");
    });
  }
}
