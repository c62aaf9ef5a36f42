/**
 * The NBD wire protocol's numbers and fixed-size headers, shared by the
 * client protocol driver (block/nbd/) and the NBD export (dataplane/): names
 * and values as the NBD protocol document (NetworkBlockDevice/nbd
 * doc/proto.md) gives them. Everything on the wire is big-endian.
 *
 * Only layouts live here: what a side does with them (handshake order,
 * request tracking, validation against the export) belongs to that side.
 *
 * @module
 */

/** "NBDMAGIC": the first eight bytes a newstyle server sends. */
export const NBDMAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": newstyle magic, also the magic of every client option. */
export const IHAVEOPT = 0x49484156454f5054n;
/** Magic of every option reply the server sends during the handshake. */
export const NBD_REP_MAGIC = 0x3e889045565a9n;
/** Magic of a transmission request (compact headers). */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** Magic of a simple reply. */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** Magic of a structured reply chunk. */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server, 16 bits). */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
/** Client flags (32 bits). */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

/** Transmission flags (16 bits, sent with the export's size). */
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

/** Option types (client to server, fixed newstyle). */
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

/** Option reply types; the error ones have bit 31 set. */
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
export const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
export const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;

/** Information types of NBD_OPT_INFO / NBD_OPT_GO (16 bits). */
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

/** Request types (16 bits). */
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

/** Command flags (16 bits). */
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

/** Structured reply flags (16 bits). */
export const NBD_REPLY_FLAG_DONE = 1 << 0;

/** Structured reply chunk types (16 bits); the error ones have bit 15 set. */
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

/** Error values on the wire (not the host's errno numbering, though equal on Linux). */
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** Longest string (export name, error message) the protocol allows. */
export const NBD_MAX_STRING_SIZE = 4096;

/** Sizes of the fixed headers. */
export const NBD_OPTION_HEADER_SIZE = 16;
export const NBD_OPTION_REPLY_HEADER_SIZE = 20;
export const NBD_REQUEST_SIZE = 28;
export const NBD_SIMPLE_REPLY_SIZE = 16;
export const NBD_STRUCTURED_REPLY_HEADER_SIZE = 20;

/** A transmission request (compact form, 28 bytes). */
export interface NbdRequest {
  flags: number;
  type: number;
  cookie: bigint;
  offset: bigint;
  length: number;
}

/** A simple reply (16 bytes, read data follows for NBD_CMD_READ). */
export interface NbdSimpleReply {
  error: number;
  cookie: bigint;
}

/** The header of a structured reply chunk (20 bytes, `length` payload bytes follow). */
export interface NbdStructuredReplyHeader {
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
}

/** The header of an option reply (20 bytes, `length` payload bytes follow). */
export interface NbdOptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

/** The header of a client option (16 bytes, `length` payload bytes follow). */
export interface NbdOptionHeader {
  option: number;
  length: number;
}

function view(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

function need(buf: Uint8Array, at: number, size: number): void {
  if (buf.byteLength < at + size) {
    throw new RangeError(`NBD header needs ${size} bytes at ${at}, buffer has ${buf.byteLength}`);
  }
}

/**
 * Writes a transmission request into `buf` at `at`.
 *
 * @example
 * ```ts
 * import { decodeNbdRequest, encodeNbdRequest, NBD_CMD_READ } from "./nbd_protocol.ts";
 * const b = new Uint8Array(28);
 * encodeNbdRequest(b, 0, { flags: 0, type: NBD_CMD_READ, cookie: 7n, offset: 4096n, length: 512 });
 * if (decodeNbdRequest(b, 0).length !== 512) throw new Error("round trip");
 * ```
 */
export function encodeNbdRequest(buf: Uint8Array, at: number, r: NbdRequest): void {
  need(buf, at, NBD_REQUEST_SIZE);
  const v = view(buf);
  v.setUint32(at, NBD_REQUEST_MAGIC);
  v.setUint16(at + 4, r.flags);
  v.setUint16(at + 6, r.type);
  v.setBigUint64(at + 8, r.cookie);
  v.setBigUint64(at + 16, r.offset);
  v.setUint32(at + 24, r.length);
}

/**
 * Reads a transmission request's fields from `buf` at `at`; the magic is not
 * checked (see {@link nbdRequestMagic}).
 *
 * @example
 * ```ts
 * import { decodeNbdRequest, nbdRequestMagic } from "./nbd_protocol.ts";
 * const b = new Uint8Array(28);
 * if (nbdRequestMagic(b, 0) !== 0 || decodeNbdRequest(b, 0).type !== 0) throw new Error("zeros");
 * ```
 */
export function decodeNbdRequest(buf: Uint8Array, at: number): NbdRequest {
  need(buf, at, NBD_REQUEST_SIZE);
  const v = view(buf);
  return {
    flags: v.getUint16(at + 4),
    type: v.getUint16(at + 6),
    cookie: v.getBigUint64(at + 8),
    offset: v.getBigUint64(at + 16),
    length: v.getUint32(at + 24),
  };
}

/**
 * The 32-bit magic at `at` (requests and both reply kinds start with one).
 *
 * @example
 * ```ts
 * import { NBD_SIMPLE_REPLY_MAGIC, encodeNbdSimpleReply, nbdRequestMagic } from "./nbd_protocol.ts";
 * const b = new Uint8Array(16);
 * encodeNbdSimpleReply(b, 0, { error: 0, cookie: 1n });
 * if (nbdRequestMagic(b, 0) !== NBD_SIMPLE_REPLY_MAGIC) throw new Error("magic");
 * ```
 */
export function nbdRequestMagic(buf: Uint8Array, at: number): number {
  need(buf, at, 4);
  return view(buf).getUint32(at);
}

/**
 * Writes a simple reply header into `buf` at `at`.
 *
 * @example
 * ```ts
 * import { decodeNbdSimpleReply, encodeNbdSimpleReply } from "./nbd_protocol.ts";
 * const b = new Uint8Array(16);
 * encodeNbdSimpleReply(b, 0, { error: 5, cookie: 9n });
 * if (decodeNbdSimpleReply(b, 0).error !== 5) throw new Error("round trip");
 * ```
 */
export function encodeNbdSimpleReply(buf: Uint8Array, at: number, r: NbdSimpleReply): void {
  need(buf, at, NBD_SIMPLE_REPLY_SIZE);
  const v = view(buf);
  v.setUint32(at, NBD_SIMPLE_REPLY_MAGIC);
  v.setUint32(at + 4, r.error);
  v.setBigUint64(at + 8, r.cookie);
}

/**
 * Reads a simple reply's fields (magic not checked).
 *
 * @example
 * ```ts
 * import { decodeNbdSimpleReply } from "./nbd_protocol.ts";
 * if (decodeNbdSimpleReply(new Uint8Array(16), 0).cookie !== 0n) throw new Error("zeros");
 * ```
 */
export function decodeNbdSimpleReply(buf: Uint8Array, at: number): NbdSimpleReply {
  need(buf, at, NBD_SIMPLE_REPLY_SIZE);
  const v = view(buf);
  return { error: v.getUint32(at + 4), cookie: v.getBigUint64(at + 8) };
}

/**
 * Writes a structured reply chunk header into `buf` at `at`.
 *
 * @example
 * ```ts
 * import { decodeNbdStructuredReplyHeader, encodeNbdStructuredReplyHeader, NBD_REPLY_FLAG_DONE } from "./nbd_protocol.ts";
 * const b = new Uint8Array(20);
 * encodeNbdStructuredReplyHeader(b, 0, { flags: NBD_REPLY_FLAG_DONE, type: 0, cookie: 3n, length: 0 });
 * if (decodeNbdStructuredReplyHeader(b, 0).flags !== NBD_REPLY_FLAG_DONE) throw new Error("round trip");
 * ```
 */
export function encodeNbdStructuredReplyHeader(
  buf: Uint8Array,
  at: number,
  h: NbdStructuredReplyHeader,
): void {
  need(buf, at, NBD_STRUCTURED_REPLY_HEADER_SIZE);
  const v = view(buf);
  v.setUint32(at, NBD_STRUCTURED_REPLY_MAGIC);
  v.setUint16(at + 4, h.flags);
  v.setUint16(at + 6, h.type);
  v.setBigUint64(at + 8, h.cookie);
  v.setUint32(at + 16, h.length);
}

/**
 * Reads a structured reply chunk header's fields (magic not checked).
 *
 * @example
 * ```ts
 * import { decodeNbdStructuredReplyHeader } from "./nbd_protocol.ts";
 * if (decodeNbdStructuredReplyHeader(new Uint8Array(20), 0).length !== 0) throw new Error("zeros");
 * ```
 */
export function decodeNbdStructuredReplyHeader(
  buf: Uint8Array,
  at: number,
): NbdStructuredReplyHeader {
  need(buf, at, NBD_STRUCTURED_REPLY_HEADER_SIZE);
  const v = view(buf);
  return {
    flags: v.getUint16(at + 4),
    type: v.getUint16(at + 6),
    cookie: v.getBigUint64(at + 8),
    length: v.getUint32(at + 16),
  };
}

/**
 * Writes a client option header (IHAVEOPT, option, length) into `buf` at `at`.
 *
 * @example
 * ```ts
 * import { decodeNbdOptionHeader, encodeNbdOptionHeader, NBD_OPT_GO } from "./nbd_protocol.ts";
 * const b = new Uint8Array(16);
 * encodeNbdOptionHeader(b, 0, { option: NBD_OPT_GO, length: 6 });
 * if (decodeNbdOptionHeader(b, 0).magic !== 0x49484156454f5054n) throw new Error("magic");
 * ```
 */
export function encodeNbdOptionHeader(buf: Uint8Array, at: number, h: NbdOptionHeader): void {
  need(buf, at, NBD_OPTION_HEADER_SIZE);
  const v = view(buf);
  v.setBigUint64(at, IHAVEOPT);
  v.setUint32(at + 8, h.option);
  v.setUint32(at + 12, h.length);
}

/**
 * Reads a client option header, magic included (the server must check it).
 *
 * @example
 * ```ts
 * import { decodeNbdOptionHeader } from "./nbd_protocol.ts";
 * if (decodeNbdOptionHeader(new Uint8Array(16), 0).option !== 0) throw new Error("zeros");
 * ```
 */
export function decodeNbdOptionHeader(
  buf: Uint8Array,
  at: number,
): NbdOptionHeader & { magic: bigint } {
  need(buf, at, NBD_OPTION_HEADER_SIZE);
  const v = view(buf);
  return {
    magic: v.getBigUint64(at),
    option: v.getUint32(at + 8),
    length: v.getUint32(at + 12),
  };
}

/**
 * Writes an option reply header (NBD_REP_MAGIC, option, type, length).
 *
 * @example
 * ```ts
 * import { decodeNbdOptionReplyHeader, encodeNbdOptionReplyHeader, NBD_REP_ACK } from "./nbd_protocol.ts";
 * const b = new Uint8Array(20);
 * encodeNbdOptionReplyHeader(b, 0, { option: 7, type: NBD_REP_ACK, length: 0 });
 * if (decodeNbdOptionReplyHeader(b, 0).type !== NBD_REP_ACK) throw new Error("round trip");
 * ```
 */
export function encodeNbdOptionReplyHeader(
  buf: Uint8Array,
  at: number,
  h: NbdOptionReplyHeader,
): void {
  need(buf, at, NBD_OPTION_REPLY_HEADER_SIZE);
  const v = view(buf);
  v.setBigUint64(at, NBD_REP_MAGIC);
  v.setUint32(at + 8, h.option);
  v.setUint32(at + 12, h.type);
  v.setUint32(at + 16, h.length);
}

/**
 * Reads an option reply header, magic included (the client must check it).
 *
 * @example
 * ```ts
 * import { decodeNbdOptionReplyHeader } from "./nbd_protocol.ts";
 * if (decodeNbdOptionReplyHeader(new Uint8Array(20), 0).magic !== 0n) throw new Error("zeros");
 * ```
 */
export function decodeNbdOptionReplyHeader(
  buf: Uint8Array,
  at: number,
): NbdOptionReplyHeader & { magic: bigint } {
  need(buf, at, NBD_OPTION_REPLY_HEADER_SIZE);
  const v = view(buf);
  return {
    magic: v.getBigUint64(at),
    option: v.getUint32(at + 8),
    type: v.getUint32(at + 12),
    length: v.getUint32(at + 16),
  };
}
