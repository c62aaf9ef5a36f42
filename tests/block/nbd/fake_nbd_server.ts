/**
 * A scripted NBD server on a Unix socket, in the test's own process: a valid
 * fixed newstyle handshake (structured replies, NBD_OPT_GO with a 1 MiB
 * export), then each transmission request is handed to `reply`, which may
 * answer with anything at all (a misbehaving server).
 */
import {
  decodeNbdOptionHeader,
  decodeNbdRequest,
  encodeNbdOptionReplyHeader,
  IHAVEOPT,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_SEND_FLUSH,
  NBD_INFO_EXPORT,
  NBD_OPT_GO,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBDMAGIC,
  type NbdRequest,
} from "../../../block/mod.ts";

/** What the fake server does with a request: write bytes back through `send`. */
export type FakeReply = (req: NbdRequest, send: (b: Uint8Array) => Promise<void>) => Promise<void>;

/** Options of the handshake the fake server plays. */
export interface FakeServerOptions {
  /** Replace the greeting (e.g. a bad magic). */
  greeting?: Uint8Array;
  /** Export size (default 1 MiB). */
  size?: number;
  /** After the client's flags, send these bytes instead of negotiating, then hang up. */
  afterFlags?: () => Uint8Array;
}

async function readN(conn: Deno.Conn, n: number): Promise<Uint8Array | null> {
  const b = new Uint8Array(n);
  let got = 0;
  while (got < n) {
    const r = await conn.read(b.subarray(got));
    if (r === null) return null;
    got += r;
  }
  return b;
}

/** Serves connections on `path` until `close()`; each plays the handshake then `reply`. */
export function fakeNbdServer(path: string, reply: FakeReply, opts: FakeServerOptions = {}) {
  const listener = Deno.listen({ transport: "unix", path });
  const conns = new Set<Deno.Conn>();
  let connections = 0;
  const serve = async (conn: Deno.Conn) => {
    const send = async (b: Uint8Array) => {
      let off = 0;
      while (off < b.length) off += await conn.write(b.subarray(off));
    };
    const greet = new Uint8Array(18);
    const gv = new DataView(greet.buffer);
    gv.setBigUint64(0, NBDMAGIC);
    gv.setBigUint64(8, IHAVEOPT);
    gv.setUint16(16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    await send(opts.greeting ?? greet);
    if (!await readN(conn, 4)) return;
    if (opts.afterFlags) {
      await send(opts.afterFlags());
      return;
    }
    for (;;) {
      const h = await readN(conn, 16);
      if (!h) return;
      const o = decodeNbdOptionHeader(h, 0);
      if (o.length > 0 && !await readN(conn, o.length)) return;
      const rep = (type: number, payload = new Uint8Array(0)) => {
        const b = new Uint8Array(20 + payload.length);
        encodeNbdOptionReplyHeader(b, 0, { option: o.option, type, length: payload.length });
        b.set(payload, 20);
        return send(b);
      };
      if (o.option === NBD_OPT_GO) {
        const info = new Uint8Array(12);
        const iv = new DataView(info.buffer);
        iv.setUint16(0, NBD_INFO_EXPORT);
        iv.setBigUint64(2, BigInt(opts.size ?? 1 << 20));
        iv.setUint16(10, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH);
        await rep(NBD_REP_INFO, info);
        await rep(NBD_REP_ACK);
        break;
      }
      if (o.option === 8) await rep(NBD_REP_ACK); // NBD_OPT_STRUCTURED_REPLY
      else await rep(NBD_REP_ERR_UNSUP);
    }
    for (;;) {
      const r = await readN(conn, 28);
      if (!r) return;
      const req = decodeNbdRequest(r, 0);
      if (req.type === 1 && req.length > 0 && !await readN(conn, req.length)) return;
      await reply(req, send);
    }
  };
  const loop = (async () => {
    for (;;) {
      let conn: Deno.Conn;
      try {
        conn = await listener.accept();
      } catch {
        return;
      }
      connections++;
      conns.add(conn);
      serve(conn).catch(() => {}).finally(() => {
        conns.delete(conn);
        try {
          conn.close();
        } catch { /* closed */ }
      });
    }
  })();
  return {
    get connections() {
      return connections;
    },
    async close() {
      listener.close();
      for (const c of conns) {
        try {
          c.close();
        } catch { /* closed */ }
      }
      await loop;
    },
  };
}
