/**
 * A deliberately low-level NBD client for tests: it sends whatever bytes it
 * is told (good or hostile) and parses what the server answers, checking
 * every magic on the way. Over a Unix socket (Deno.connect).
 *
 * @module
 */

import {
  IHAVEOPT,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  NBDMAGIC,
} from "../../../block/mod.ts";

/** An option reply as received. */
export interface OptionReply {
  option: number;
  type: number;
  payload: Uint8Array;
}

/** A transmission reply: a simple one, or one structured chunk. */
export interface TransmissionReply {
  structured: boolean;
  cookie: bigint;
  error: number;
  /** Structured only. */
  flags: number;
  type: number;
  /** Read data (simple replies: read only when the caller asked for `dataLength`). */
  payload: Uint8Array;
}

export class ProtocolViolation extends Error {}

export class RawNbdClient {
  readonly #conn: Deno.UnixConn;
  #buf = new Uint8Array(0);
  #eof = false;

  private constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
  }

  static async connect(path: string): Promise<RawNbdClient> {
    return new RawNbdClient(await Deno.connect({ transport: "unix", path }));
  }

  /** Connects, reads the greeting, sends the client flags (fixed newstyle, no zeroes). */
  static async open(path: string, clientFlags = 3): Promise<RawNbdClient> {
    const c = await RawNbdClient.connect(path);
    const g = await c.readExact(18);
    if (g === null) throw new ProtocolViolation("closed before the greeting");
    const v = new DataView(g.buffer);
    if (v.getBigUint64(0) !== NBDMAGIC || v.getBigUint64(8) !== IHAVEOPT) {
      throw new ProtocolViolation("bad greeting");
    }
    const f = new Uint8Array(4);
    new DataView(f.buffer).setUint32(0, clientFlags);
    await c.write(f);
    return c;
  }

  /** Opens, negotiates structured replies (optionally) and GOes to `name`. */
  static async go(
    path: string,
    name: string,
    structured = true,
    baseAllocation = false,
  ): Promise<{ client: RawNbdClient; size: bigint; flags: number }> {
    const c = await RawNbdClient.open(path);
    if (structured) {
      await c.sendOption(NBD_OPT_STRUCTURED_REPLY);
      const r = await c.readOptionReply();
      if (r?.type !== NBD_REP_ACK) throw new ProtocolViolation("no structured replies");
    }
    if (structured && baseAllocation) {
      const enc = new TextEncoder();
      const nb = enc.encode(name), q = enc.encode("base:allocation");
      const p = new Uint8Array(4 + nb.length + 4 + 4 + q.length);
      const v = new DataView(p.buffer);
      v.setUint32(0, nb.length);
      p.set(nb, 4);
      v.setUint32(4 + nb.length, 1);
      v.setUint32(8 + nb.length, q.length);
      p.set(q, 12 + nb.length);
      await c.sendOption(NBD_OPT_SET_META_CONTEXT, p);
      while ((await c.readOptionReply())?.type !== NBD_REP_ACK) { /* the context */ }
    }
    const nb = new TextEncoder().encode(name);
    const p = new Uint8Array(4 + nb.length + 2);
    new DataView(p.buffer).setUint32(0, nb.length);
    p.set(nb, 4);
    await c.sendOption(NBD_OPT_GO, p);
    let size = -1n, flags = 0;
    for (;;) {
      const r = await c.readOptionReply();
      if (r === null) throw new ProtocolViolation("closed during GO");
      if (r.type === NBD_REP_ACK) break;
      if (r.type !== NBD_REP_INFO) throw new ProtocolViolation(`GO refused: ${r.type}`);
      const v = new DataView(r.payload.buffer, r.payload.byteOffset);
      if (v.getUint16(0) === 0) {
        size = v.getBigUint64(2);
        flags = v.getUint16(10);
      }
    }
    return { client: c, size, flags };
  }

  async write(bytes: Uint8Array): Promise<boolean> {
    try {
      let off = 0;
      while (off < bytes.length) off += await this.#conn.write(bytes.subarray(off));
      return true;
    } catch {
      return false; // the server closed: EPIPE / ECONNRESET
    }
  }

  /** Exactly `n` bytes, or null at end of stream (or after `timeoutMs`: throws). */
  async readExact(n: number, timeoutMs = 10_000): Promise<Uint8Array | null> {
    const deadline = Date.now() + timeoutMs;
    const out = new Uint8Array(n);
    let filled = Math.min(n, this.#buf.length);
    out.set(this.#buf.subarray(0, filled));
    this.#buf = this.#buf.subarray(filled);
    while (filled < n) {
      if (this.#eof) return null;
      // Small reads go through a chunk (what follows is kept); big ones land in place.
      const direct = n - filled >= 65536;
      const into = direct ? out.subarray(filled) : new Uint8Array(65536);
      let timer: ReturnType<typeof setTimeout> | undefined;
      const got = await Promise.race([
        this.#conn.read(into).catch(() => null),
        new Promise<"timeout">((r) =>
          timer = setTimeout(() => r("timeout"), deadline - Date.now())
        ),
      ]);
      clearTimeout(timer);
      if (got === "timeout") throw new Error(`timed out waiting for ${n} bytes`);
      if (got === null) {
        this.#eof = true;
        continue;
      }
      if (direct) {
        filled += got;
      } else {
        const take = Math.min(got, n - filled);
        out.set(into.subarray(0, take), filled);
        filled += take;
        this.#buf = into.slice(take, got);
      }
    }
    return out;
  }

  /** Whether the server closes the connection within `timeoutMs` (discarding what it sends). */
  async closedWithin(timeoutMs = 5000): Promise<boolean> {
    try {
      for (;;) {
        if ((await this.readExact(1, timeoutMs)) === null) return true;
      }
    } catch {
      return false;
    }
  }

  async sendOption(
    option: number,
    payload: Uint8Array = new Uint8Array(0),
    length: number = payload.length,
  ): Promise<boolean> {
    const b = new Uint8Array(16 + payload.length);
    const v = new DataView(b.buffer);
    v.setBigUint64(0, IHAVEOPT);
    v.setUint32(8, option);
    v.setUint32(12, length);
    b.set(payload, 16);
    return await this.write(b);
  }

  async readOptionReply(timeoutMs = 10_000): Promise<OptionReply | null> {
    const h = await this.readExact(20, timeoutMs);
    if (h === null) return null;
    const v = new DataView(h.buffer);
    if (v.getBigUint64(0) !== NBD_REP_MAGIC) throw new ProtocolViolation("bad option reply magic");
    const len = v.getUint32(16);
    if (len > 1 << 20) throw new ProtocolViolation(`option reply of ${len} bytes`);
    const payload = await this.readExact(len);
    if (payload === null) throw new ProtocolViolation("option reply cut short");
    return { option: v.getUint32(8), type: v.getUint32(12), payload };
  }

  static request(
    type: number,
    opts: { flags?: number; cookie?: bigint; offset?: bigint; length?: number; magic?: number } =
      {},
  ): Uint8Array {
    const b = new Uint8Array(28);
    const v = new DataView(b.buffer);
    v.setUint32(0, opts.magic ?? NBD_REQUEST_MAGIC);
    v.setUint16(4, opts.flags ?? 0);
    v.setUint16(6, type);
    v.setBigUint64(8, opts.cookie ?? 1n);
    v.setBigUint64(16, opts.offset ?? 0n);
    v.setUint32(24, opts.length ?? 0);
    return b;
  }

  /**
   * One reply. A simple reply carries `dataLength` bytes after it when it
   * has no error (the client must know: a READ's length).
   */
  async readReply(
    dataLength: number | ((cookie: bigint) => number) = 0,
    timeoutMs = 10_000,
  ): Promise<TransmissionReply | null> {
    const m = await this.readExact(4, timeoutMs);
    if (m === null) return null;
    const magic = new DataView(m.buffer).getUint32(0);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      const h = await this.readExact(12);
      if (h === null) throw new ProtocolViolation("simple reply cut short");
      const v = new DataView(h.buffer);
      const error = v.getUint32(0);
      const cookie = v.getBigUint64(4);
      const len = typeof dataLength === "number" ? dataLength : dataLength(cookie);
      const payload = error === 0 && len > 0 ? await this.readExact(len) : new Uint8Array(0);
      if (payload === null) throw new ProtocolViolation("read data cut short");
      return { structured: false, cookie: v.getBigUint64(4), error, flags: 0, type: 0, payload };
    }
    if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
      const h = await this.readExact(16);
      if (h === null) throw new ProtocolViolation("chunk cut short");
      const v = new DataView(h.buffer);
      const len = v.getUint32(12);
      if (len > (32 << 20) + 8) throw new ProtocolViolation(`chunk of ${len} bytes`);
      const payload = await this.readExact(len);
      if (payload === null) throw new ProtocolViolation("chunk payload cut short");
      const type = v.getUint16(2);
      const pv = new DataView(payload.buffer);
      const error = type & 0x8000 ? pv.getUint32(0) : 0;
      return {
        structured: true,
        cookie: v.getBigUint64(4),
        error,
        flags: v.getUint16(0),
        type,
        payload,
      };
    }
    throw new ProtocolViolation(`bad reply magic 0x${magic.toString(16)}`);
  }

  /** Half-closes: the server reads the end of the stream, replies may still come. */
  async closeWrite(): Promise<void> {
    await this.#conn.closeWrite().catch(() => {});
  }

  close(): void {
    try {
      this.#conn.close();
    } catch { /* closed */ }
  }
}
