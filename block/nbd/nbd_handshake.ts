import type { NbdChannel } from "./nbd_channel.ts";
import { NbdError } from "./nbd_error.ts";
import {
  decodeNbdOptionReplyHeader,
  encodeNbdOptionHeader,
  IHAVEOPT,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_MAX_STRING_SIZE,
  NBD_OPT_GO,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPTION_HEADER_SIZE,
  NBD_OPTION_REPLY_HEADER_SIZE,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBDMAGIC,
} from "./nbd_protocol.ts";

/** Largest payload this client sends or accepts in one request (QEMU's NBD_MAX_BUFFER_SIZE). */
export const NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024;
/** Longest option reply payload the client reads (bounded: the server is untrusted). */
const MAX_OPTION_REPLY = 64 * 1024;

/**
 * What the handshake learnt about the export (QEMU's NBDExportInfo): size
 * and transmission flags from NBD_INFO_EXPORT, block size constraints from
 * NBD_INFO_BLOCK_SIZE (defaults 1 / 4096 / 32 MiB when the server sends
 * none), and whether structured replies were negotiated.
 *
 * @example
 * ```ts
 * import type { NbdExportInfo } from "./nbd_handshake.ts";
 * const i: NbdExportInfo = {
 *   size: 1 << 20, flags: 1, structuredReply: true, minBlock: 1, optBlock: 4096, maxBlock: 1 << 25,
 * };
 * ```
 */
export interface NbdExportInfo {
  size: number;
  flags: number;
  structuredReply: boolean;
  minBlock: number;
  optBlock: number;
  maxBlock: number;
}

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder("utf-8", { fatal: false });

function isPow2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/**
 * The fixed newstyle handshake as QEMU's nbd/client.c runs it
 * (nbd_receive_negotiate): server greeting (NBDMAGIC, IHAVEOPT, handshake
 * flags; fixed newstyle required), client flags, NBD_OPT_STRUCTURED_REPLY,
 * then NBD_OPT_GO with the export name asking for NBD_INFO_BLOCK_SIZE.
 * Everything the server says is checked (magics, echoed option, reply
 * lengths, info sizes, block sizes); a violation is an {@link NbdError} of
 * kind "protocol", a refusal ("no such export") kind "refused".
 *
 * @example
 * ```ts
 * import { nbdReceiveNegotiate } from "./nbd_handshake.ts";
 * // Runs over an NbdChannel whose peer is an NBD server (see the tests).
 * const f: typeof nbdReceiveNegotiate = nbdReceiveNegotiate;
 * ```
 */
export function nbdReceiveNegotiate(
  ch: NbdChannel,
  exportName: string,
): Promise<NbdExportInfo> {
  return new Promise((resolve, reject) => negotiate(ch, exportName, resolve, reject));
}

/**
 * Runs the handshake on `ch` and calls `done` with what it learnt, or `fail`
 * with an {@link NbdError} / SysError. Driven by the channel's callbacks
 * only (no Promise on the way), so it progresses inside an IOThread's poll.
 *
 * @example
 * ```ts
 * import { negotiate } from "./nbd_handshake.ts";
 * // Runs over an NbdChannel whose peer is an NBD server (see the tests).
 * const f: typeof negotiate = negotiate;
 * ```
 */
export function negotiate(
  ch: NbdChannel,
  exportName: string,
  done: (info: NbdExportInfo) => void,
  fail: (e: Error) => void,
): void {
  const gen = negotiation(ch, exportName);
  let settled = false;
  const finish = (e: Error | null, info?: NbdExportInfo) => {
    if (settled) return;
    settled = true;
    if (e) fail(e);
    else done(info!);
  };
  const step = (input: Uint8Array | undefined): void => {
    // Each read that is already buffered completes inside ch.read: loop
    // instead of recursing once per message.
    let next: IteratorResult<number, NbdExportInfo>;
    try {
      next = input === undefined ? gen.next() : gen.next(input);
    } catch (e) {
      return finish(e as Error);
    }
    for (;;) {
      if (next.done) return finish(null, next.value);
      let got: Uint8Array | null = null, waiting = true;
      ch.read(next.value, (b) => {
        if (waiting) got = b;
        else step(b);
      }, (e) => finish(e));
      waiting = false;
      if (got === null || settled) return;
      try {
        next = gen.next(got);
      } catch (e) {
        return finish(e as Error);
      }
    }
  };
  step(undefined);
}

function* negotiation(
  ch: NbdChannel,
  exportName: string,
): Generator<number, NbdExportInfo, Uint8Array> {
  const greet = yield 18;
  const gv = new DataView(greet.buffer);
  if (gv.getBigUint64(0) !== NBDMAGIC) throw new NbdError("protocol", "bad server magic");
  if (gv.getBigUint64(8) !== IHAVEOPT) {
    throw new NbdError("unsupported", "oldstyle NBD server: only newstyle is supported");
  }
  const globalFlags = gv.getUint16(16);
  if (!(globalFlags & NBD_FLAG_FIXED_NEWSTYLE)) {
    throw new NbdError("unsupported", "the server does not speak fixed newstyle");
  }
  const noZeroes = (globalFlags & NBD_FLAG_NO_ZEROES) !== 0;
  const cflags = new Uint8Array(4);
  new DataView(cflags.buffer).setUint32(
    0,
    NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0),
  );
  ch.sendBytes(cflags);

  // Structured replies: refused (NBD_REP_ERR_UNSUP) is fine, simple replies then.
  sendOption(ch, NBD_OPT_STRUCTURED_REPLY, new Uint8Array(0));
  const sr = yield* readOptionReply(NBD_OPT_STRUCTURED_REPLY);
  let structuredReply = false;
  if (sr.type === NBD_REP_ACK) {
    if (sr.payload.length !== 0) throw new NbdError("protocol", "structured reply ACK with data");
    structuredReply = true;
  } else if (!(sr.type & NBD_REP_FLAG_ERROR)) {
    throw new NbdError("protocol", `unexpected reply ${sr.type} to NBD_OPT_STRUCTURED_REPLY`);
  }

  const name = textEncoder.encode(exportName);
  if (name.length > NBD_MAX_STRING_SIZE) throw new NbdError("address", "export name too long");
  const go = new Uint8Array(4 + name.length + 2 + 2);
  const gov = new DataView(go.buffer);
  gov.setUint32(0, name.length);
  go.set(name, 4);
  gov.setUint16(4 + name.length, 1);
  gov.setUint16(6 + name.length, NBD_INFO_BLOCK_SIZE);
  sendOption(ch, NBD_OPT_GO, go);
  let size = -1, flags = 0;
  let minBlock = 0, optBlock = 0, maxBlock = 0;
  for (;;) {
    const r = yield* readOptionReply(NBD_OPT_GO);
    if (r.type === NBD_REP_ACK) break;
    if (r.type & NBD_REP_FLAG_ERROR) {
      const msg = textDecoder.decode(r.payload.subarray(0, NBD_MAX_STRING_SIZE));
      if (r.type === NBD_REP_ERR_UNSUP) {
        throw new NbdError("unsupported", "the server does not support NBD_OPT_GO");
      }
      throw new NbdError(
        "refused",
        `the server refused export '${exportName}'${msg ? `: ${msg}` : ""} (error 0x${
          r.type.toString(16)
        })`,
      );
    }
    if (r.type !== NBD_REP_INFO) {
      throw new NbdError("protocol", `unexpected reply type ${r.type} to NBD_OPT_GO`);
    }
    if (r.payload.length < 2) throw new NbdError("protocol", "NBD_REP_INFO too short");
    const v = new DataView(r.payload.buffer, r.payload.byteOffset, r.payload.byteLength);
    const info = v.getUint16(0);
    if (info === NBD_INFO_EXPORT) {
      if (r.payload.length !== 12) throw new NbdError("protocol", "NBD_INFO_EXPORT: bad length");
      const s = v.getBigUint64(2);
      if (s > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw new NbdError("protocol", `export size ${s} too large`);
      }
      size = Number(s);
      flags = v.getUint16(10);
    } else if (info === NBD_INFO_BLOCK_SIZE) {
      if (r.payload.length !== 14) {
        throw new NbdError("protocol", "NBD_INFO_BLOCK_SIZE: bad length");
      }
      minBlock = v.getUint32(2);
      optBlock = v.getUint32(6);
      maxBlock = v.getUint32(10);
      // As nbd_opt_info_or_go: powers of two where required, min <= 64 KiB.
      if (!isPow2(minBlock) || minBlock > 65536) {
        throw new NbdError("protocol", `bad minimum block size ${minBlock}`);
      }
      if (!isPow2(optBlock) || optBlock < minBlock) {
        throw new NbdError("protocol", `bad preferred block size ${optBlock}`);
      }
      if (maxBlock < optBlock || maxBlock % minBlock !== 0) {
        throw new NbdError("protocol", `bad maximum block size ${maxBlock}`);
      }
    }
    // Other information (NAME, DESCRIPTION, unknown) is ignored.
  }
  if (size < 0) throw new NbdError("protocol", "the server did not send NBD_INFO_EXPORT");
  if (!(flags & NBD_FLAG_HAS_FLAGS)) flags = NBD_FLAG_HAS_FLAGS;
  if (minBlock === 0) {
    minBlock = 1;
    optBlock = 4096;
    maxBlock = NBD_MAX_BUFFER_SIZE;
  }
  maxBlock = Math.min(maxBlock, NBD_MAX_BUFFER_SIZE);
  maxBlock -= maxBlock % minBlock;
  return { size, flags, structuredReply, minBlock, optBlock, maxBlock };
}

function sendOption(ch: NbdChannel, option: number, payload: Uint8Array): void {
  const b = new Uint8Array(NBD_OPTION_HEADER_SIZE + payload.length);
  encodeNbdOptionHeader(b, 0, { option, length: payload.length });
  b.set(payload, NBD_OPTION_HEADER_SIZE);
  ch.sendBytes(b);
}

function* readOptionReply(
  option: number,
): Generator<number, { type: number; payload: Uint8Array }, Uint8Array> {
  const h = decodeNbdOptionReplyHeader(yield NBD_OPTION_REPLY_HEADER_SIZE, 0);
  if (h.magic !== NBD_REP_MAGIC) throw new NbdError("protocol", "bad option reply magic");
  if (h.option !== option) {
    throw new NbdError("protocol", `reply for option ${h.option}, expected ${option}`);
  }
  if (h.length > MAX_OPTION_REPLY) {
    throw new NbdError("protocol", `option reply of ${h.length} bytes`);
  }
  const payload = h.length > 0 ? yield h.length : new Uint8Array(0);
  return { type: h.type, payload };
}

/** The server's handshake flags that this client supports, for tests. */
export const NBD_CLIENT_HANDSHAKE_FLAGS = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
