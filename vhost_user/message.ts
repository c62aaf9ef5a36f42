/**
 * The vhost-user message codec (QEMU docs/interop/vhost-user.rst, "Message
 * Specification"): a 12-byte header (request, flags, size; native = little
 * endian) and a payload whose layout depends on the request.
 *
 * Parsing is strict and total: any byte sequence either decodes to a
 * {@link VhostUserMessage} or throws a {@link VhostUserError} with a
 * {@link VhostUserErrorKind}; nothing else is ever thrown. 64-bit fields are
 * decoded as `bigint` so an untrusted value is never rounded before the
 * connection range-checks it.
 *
 * @module
 */

import {
  requestName,
  VHOST_MEMORY_BASELINE_NREGIONS,
  VHOST_USER_ADD_MEM_REG,
  VHOST_USER_CONFIG_HDR_SIZE,
  VHOST_USER_GET_CONFIG,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_GET_INFLIGHT_FD,
  VHOST_USER_GET_MAX_MEM_SLOTS,
  VHOST_USER_GET_PROTOCOL_FEATURES,
  VHOST_USER_GET_QUEUE_NUM,
  VHOST_USER_GET_STATUS,
  VHOST_USER_GET_VRING_BASE,
  VHOST_USER_HDR_SIZE,
  VHOST_USER_MAX_CONFIG_SIZE,
  VHOST_USER_MAX_PAYLOAD,
  VHOST_USER_MAX_REQUEST,
  VHOST_USER_MEMORY_REGION_SIZE,
  VHOST_USER_NET_SET_MTU,
  VHOST_USER_REM_MEM_REG,
  VHOST_USER_RESET_DEVICE,
  VHOST_USER_RESET_OWNER,
  VHOST_USER_SEND_RARP,
  VHOST_USER_SET_BACKEND_REQ_FD,
  VHOST_USER_SET_CONFIG,
  VHOST_USER_SET_FEATURES,
  VHOST_USER_SET_INFLIGHT_FD,
  VHOST_USER_SET_LOG_FD,
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_OWNER,
  VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_SET_STATUS,
  VHOST_USER_SET_VRING_ADDR,
  VHOST_USER_SET_VRING_BASE,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_ENABLE,
  VHOST_USER_SET_VRING_ENDIAN,
  VHOST_USER_SET_VRING_ERR,
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_SET_VRING_NUM,
  VHOST_USER_VERSION,
  VHOST_USER_VERSION_MASK,
  VHOST_USER_VRING_IDX_MASK,
  VHOST_USER_VRING_KICK,
  VHOST_USER_VRING_NOFD_MASK,
} from "./constants.ts";

/** Why a message was rejected. */
export type VhostUserErrorKind =
  /** Header size field above {@link VHOST_USER_MAX_PAYLOAD}: the stream cannot be trusted. */
  | "Oversized"
  /** Fewer bytes than the header or the request's payload type needs. */
  | "Truncated"
  /** More payload bytes than the request's payload type allows. */
  | "BadSize"
  /** Request code this implementation does not know. */
  | "UnknownRequest"
  /** Version bits in the header flags are not 1. */
  | "BadVersion"
  /** Number of attached fds does not match what the request carries. */
  | "BadFdCount"
  /** A payload field is out of range (region count, config size, reserved bits...). */
  | "BadValue";

/**
 * A malformed or unacceptable vhost-user message. `request` is the request
 * code when the header was readable (else 0).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VhostUserError } from "./message.ts";
 * const e = new VhostUserError("Oversized", 5, "size 9999");
 * assert.equal(e.kind, "Oversized");
 * assert(e.message.includes("SET_MEM_TABLE"));
 * ```
 */
export class VhostUserError extends Error {
  /** The kind of failure. */
  readonly kind: VhostUserErrorKind;
  /** The request code of the offending message, 0 if unknown. */
  readonly request: number;

  constructor(kind: VhostUserErrorKind, request: number, detail: string) {
    super(`vhost-user ${requestName(request)}: ${kind}: ${detail}`);
    this.name = "VhostUserError";
    this.kind = kind;
    this.request = request;
  }
}

/** The fixed message header. */
export interface VhostUserHeader {
  /** Request code (VHOST_USER_*). */
  request: number;
  /** Version (bits 0-1), REPLY (bit 2), NEED_REPLY (bit 3). */
  flags: number;
  /** Payload size in bytes. */
  size: number;
}

/** One memory region description (four u64s, untrusted). */
export interface MemoryRegionDesc {
  /** Guest physical address of the region's first byte. */
  guestPhysAddr: bigint;
  /** Length in bytes. */
  size: bigint;
  /** The front-end's virtual address of the first byte (SET_VRING_ADDR uses these). */
  userAddr: bigint;
  /** Offset of the region in the attached fd. */
  mmapOffset: bigint;
}

/** A decoded payload, by layout ("Payload" in the spec). */
export type VhostUserPayload =
  | { kind: "empty" }
  | { kind: "u64"; value: bigint }
  | { kind: "vringState"; index: number; num: number }
  | {
    kind: "vringAddr";
    index: number;
    flags: number;
    descUserAddr: bigint;
    usedUserAddr: bigint;
    availUserAddr: bigint;
    logGuestAddr: bigint;
  }
  | { kind: "memTable"; regions: MemoryRegionDesc[] }
  | { kind: "memRegion"; region: MemoryRegionDesc }
  | { kind: "config"; offset: number; flags: number; data: Uint8Array }
  | {
    /** "Inflight description" (GET_INFLIGHT_FD, SET_INFLIGHT_FD): 24 bytes, 4 of them padding. */
    kind: "inflight";
    mmapSize: bigint;
    mmapOffset: bigint;
    numQueues: number;
    queueSize: number;
  }
  | { kind: "raw"; bytes: Uint8Array };

/** The name of a payload layout. */
export type VhostUserPayloadKind = VhostUserPayload["kind"];

/** A parsed front-end message with the fds that arrived with it. */
export interface VhostUserMessage {
  /** Request code. */
  request: number;
  /** Header flags. */
  flags: number;
  /** Decoded payload. */
  payload: VhostUserPayload;
  /** Descriptors received with the message; the receiver owns them. */
  fds: number[];
}

/** How many fds a request must carry: a number, or a rule on the payload. */
type FdRule = number | "memTable" | "vringFd" | "zeroOrOne" | "any";

interface RequestSpec {
  payload: VhostUserPayloadKind;
  fds: FdRule;
}

/** Payload layout and fd rule of every known front-end request. */
const SPECS: ReadonlyMap<number, RequestSpec> = new Map<number, RequestSpec>([
  [VHOST_USER_GET_FEATURES, { payload: "empty", fds: 0 }],
  [VHOST_USER_SET_FEATURES, { payload: "u64", fds: 0 }],
  [VHOST_USER_SET_OWNER, { payload: "empty", fds: 0 }],
  [VHOST_USER_RESET_OWNER, { payload: "empty", fds: 0 }],
  [VHOST_USER_SET_MEM_TABLE, { payload: "memTable", fds: "memTable" }],
  [VHOST_USER_SET_LOG_FD, { payload: "empty", fds: 1 }],
  [VHOST_USER_SET_VRING_NUM, { payload: "vringState", fds: 0 }],
  [VHOST_USER_SET_VRING_ADDR, { payload: "vringAddr", fds: 0 }],
  [VHOST_USER_SET_VRING_BASE, { payload: "vringState", fds: 0 }],
  [VHOST_USER_GET_VRING_BASE, { payload: "vringState", fds: 0 }],
  [VHOST_USER_SET_VRING_KICK, { payload: "u64", fds: "vringFd" }],
  [VHOST_USER_SET_VRING_CALL, { payload: "u64", fds: "vringFd" }],
  [VHOST_USER_SET_VRING_ERR, { payload: "u64", fds: "vringFd" }],
  [VHOST_USER_GET_PROTOCOL_FEATURES, { payload: "empty", fds: 0 }],
  [VHOST_USER_SET_PROTOCOL_FEATURES, { payload: "u64", fds: 0 }],
  [VHOST_USER_GET_QUEUE_NUM, { payload: "empty", fds: 0 }],
  [VHOST_USER_SET_VRING_ENABLE, { payload: "vringState", fds: 0 }],
  [VHOST_USER_SEND_RARP, { payload: "u64", fds: 0 }],
  [VHOST_USER_NET_SET_MTU, { payload: "u64", fds: 0 }],
  [VHOST_USER_SET_BACKEND_REQ_FD, { payload: "empty", fds: 1 }],
  [VHOST_USER_SET_VRING_ENDIAN, { payload: "vringState", fds: 0 }],
  [VHOST_USER_GET_CONFIG, { payload: "config", fds: 0 }],
  [VHOST_USER_SET_CONFIG, { payload: "config", fds: 0 }],
  [VHOST_USER_RESET_DEVICE, { payload: "empty", fds: 0 }],
  [VHOST_USER_VRING_KICK, { payload: "vringState", fds: 0 }],
  [VHOST_USER_GET_MAX_MEM_SLOTS, { payload: "empty", fds: 0 }],
  [VHOST_USER_ADD_MEM_REG, { payload: "memRegion", fds: 1 }],
  // The spec lets back-ends accept (and close) one stray fd here.
  [VHOST_USER_REM_MEM_REG, { payload: "memRegion", fds: "zeroOrOne" }],
  [VHOST_USER_SET_STATUS, { payload: "u64", fds: 0 }],
  [VHOST_USER_GET_STATUS, { payload: "empty", fds: 0 }],
  [VHOST_USER_GET_INFLIGHT_FD, { payload: "inflight", fds: 0 }],
  [VHOST_USER_SET_INFLIGHT_FD, { payload: "inflight", fds: 1 }],
]);

/** Size of the inflight description: u64, u64, u16, u16 and 4 bytes of struct padding. */
export const VHOST_USER_INFLIGHT_SIZE = 24;

/**
 * The payload layout a request carries, or undefined for an unknown code.
 * Known requests without a modelled layout (log, IOTLB, crypto, postcopy,
 * GPU) decode as `raw`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { payloadKindOf } from "./message.ts";
 * import { VHOST_USER_SET_VRING_ADDR } from "./constants.ts";
 * assert.equal(payloadKindOf(VHOST_USER_SET_VRING_ADDR), "vringAddr");
 * assert.equal(payloadKindOf(0), undefined);
 * ```
 */
export function payloadKindOf(request: number): VhostUserPayloadKind | undefined {
  const spec = SPECS.get(request);
  if (spec) return spec.payload;
  return Number.isInteger(request) && request >= 1 && request <= VHOST_USER_MAX_REQUEST
    ? "raw"
    : undefined;
}

/**
 * Decodes the 12-byte header at the start of `bytes`. Throws Truncated for
 * fewer than 12 bytes, BadVersion for version bits other than 1, Oversized
 * for a size above {@link VHOST_USER_MAX_PAYLOAD}. Unknown request codes are
 * not an error here (the payload must still be skipped): see {@link parseMessage}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeHeader } from "./message.ts";
 * const h = decodeHeader(new Uint8Array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]));
 * assert.equal(h.request, 1);
 * assert.equal(h.flags, 1);
 * assert.equal(h.size, 0);
 * ```
 */
export function decodeHeader(bytes: Uint8Array): VhostUserHeader {
  if (bytes.byteLength < VHOST_USER_HDR_SIZE) {
    throw new VhostUserError("Truncated", 0, `header is ${bytes.byteLength} of 12 bytes`);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, VHOST_USER_HDR_SIZE);
  const request = dv.getUint32(0, true);
  const flags = dv.getUint32(4, true);
  const size = dv.getUint32(8, true);
  if ((flags & VHOST_USER_VERSION_MASK) !== VHOST_USER_VERSION) {
    throw new VhostUserError("BadVersion", request, `flags 0x${flags.toString(16)}`);
  }
  if (size > VHOST_USER_MAX_PAYLOAD) {
    throw new VhostUserError(
      "Oversized",
      request,
      `payload size ${size} > ${VHOST_USER_MAX_PAYLOAD}`,
    );
  }
  return { request, flags, size };
}

function exactSize(request: number, bytes: Uint8Array, want: number): DataView {
  if (bytes.byteLength < want) {
    throw new VhostUserError("Truncated", request, `payload ${bytes.byteLength} < ${want} bytes`);
  }
  if (bytes.byteLength > want) {
    throw new VhostUserError("BadSize", request, `payload ${bytes.byteLength} > ${want} bytes`);
  }
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

function readRegion(dv: DataView, off: number): MemoryRegionDesc {
  return {
    guestPhysAddr: dv.getBigUint64(off, true),
    size: dv.getBigUint64(off + 8, true),
    userAddr: dv.getBigUint64(off + 16, true),
    mmapOffset: dv.getBigUint64(off + 24, true),
  };
}

/**
 * Decodes `bytes` as a payload of layout `kind` for `request` (used for
 * requests and, by the front-end, for replies). Throws {@link VhostUserError}
 * (Truncated, BadSize, BadValue) and nothing else. The returned payload never
 * aliases `bytes`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodePayload } from "./message.ts";
 * const p = decodePayload(8, "vringState", new Uint8Array([1, 0, 0, 0, 0, 1, 0, 0]));
 * assert.equal(p.kind, "vringState");
 * assert.equal(p.index, 1);
 * assert.equal(p.num, 256);
 * ```
 */
export function decodePayload(
  request: number,
  kind: VhostUserPayloadKind,
  bytes: Uint8Array,
): VhostUserPayload {
  switch (kind) {
    case "empty":
      exactSize(request, bytes, 0);
      return { kind };
    case "u64":
      return { kind, value: exactSize(request, bytes, 8).getBigUint64(0, true) };
    case "vringState": {
      const dv = exactSize(request, bytes, 8);
      return { kind, index: dv.getUint32(0, true), num: dv.getUint32(4, true) };
    }
    case "vringAddr": {
      const dv = exactSize(request, bytes, 40);
      return {
        kind,
        index: dv.getUint32(0, true),
        flags: dv.getUint32(4, true),
        descUserAddr: dv.getBigUint64(8, true),
        usedUserAddr: dv.getBigUint64(16, true),
        availUserAddr: dv.getBigUint64(24, true),
        logGuestAddr: dv.getBigUint64(32, true),
      };
    }
    case "memTable": {
      if (bytes.byteLength < 8) {
        throw new VhostUserError(
          "Truncated",
          request,
          `memory table ${bytes.byteLength} < 8 bytes`,
        );
      }
      const head = new DataView(bytes.buffer, bytes.byteOffset, 8);
      const n = head.getUint32(0, true);
      if (n === 0 || n > VHOST_MEMORY_BASELINE_NREGIONS) {
        throw new VhostUserError(
          "BadValue",
          request,
          `${n} regions (1..${VHOST_MEMORY_BASELINE_NREGIONS})`,
        );
      }
      const dv = exactSize(request, bytes, 8 + n * VHOST_USER_MEMORY_REGION_SIZE);
      const regions: MemoryRegionDesc[] = [];
      for (let i = 0; i < n; i++) {
        regions.push(readRegion(dv, 8 + i * VHOST_USER_MEMORY_REGION_SIZE));
      }
      return { kind, regions };
    }
    case "memRegion":
      // u64 padding, then one region.
      return { kind, region: readRegion(exactSize(request, bytes, 40), 8) };
    case "config": {
      if (bytes.byteLength < VHOST_USER_CONFIG_HDR_SIZE) {
        throw new VhostUserError("Truncated", request, `config ${bytes.byteLength} < 12 bytes`);
      }
      const dv = new DataView(bytes.buffer, bytes.byteOffset, VHOST_USER_CONFIG_HDR_SIZE);
      const offset = dv.getUint32(0, true);
      const size = dv.getUint32(4, true);
      const flags = dv.getUint32(8, true);
      if (size > VHOST_USER_MAX_CONFIG_SIZE) {
        throw new VhostUserError("BadValue", request, `config size ${size} > 256`);
      }
      exactSize(request, bytes, VHOST_USER_CONFIG_HDR_SIZE + size);
      const data = bytes.slice(VHOST_USER_CONFIG_HDR_SIZE, VHOST_USER_CONFIG_HDR_SIZE + size);
      return { kind, offset, flags, data };
    }
    case "inflight": {
      const dv = exactSize(request, bytes, VHOST_USER_INFLIGHT_SIZE);
      return {
        kind,
        mmapSize: dv.getBigUint64(0, true),
        mmapOffset: dv.getBigUint64(8, true),
        numQueues: dv.getUint16(16, true),
        queueSize: dv.getUint16(18, true),
      };
    }
    case "raw":
      return { kind, bytes: bytes.slice() };
  }
}

function expectedFds(
  request: number,
  rule: FdRule,
  payload: VhostUserPayload,
  got: number,
): boolean {
  if (typeof rule === "number") return got === rule;
  switch (rule) {
    case "memTable":
      return payload.kind === "memTable" && got === payload.regions.length;
    case "vringFd": {
      if (payload.kind !== "u64") return false;
      const v = payload.value;
      if (v >> 9n !== 0n) {
        throw new VhostUserError("BadValue", request, `reserved bits set in 0x${v.toString(16)}`);
      }
      return got === ((Number(v) & VHOST_USER_VRING_NOFD_MASK) !== 0 ? 0 : 1);
    }
    case "zeroOrOne":
      return got <= 1;
    case "any":
      return got <= VHOST_MEMORY_BASELINE_NREGIONS;
  }
}

/**
 * Parses one complete front-end message: the header, exactly `size` payload
 * bytes, and the fds that arrived with it. Throws {@link VhostUserError}
 * (UnknownRequest, Truncated, BadSize, BadValue, BadFdCount, BadVersion,
 * Oversized) and nothing else. It never closes `fds`: on error the caller
 * still owns them.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeMessage, parseMessage } from "./message.ts";
 * import { VHOST_USER_SET_VRING_NUM } from "./constants.ts";
 * const bytes = encodeMessage(VHOST_USER_SET_VRING_NUM, 1, { kind: "vringState", index: 0, num: 256 });
 * const m = parseMessage(bytes.subarray(0, 12), bytes.subarray(12), []);
 * assert.equal(m.payload.kind, "vringState");
 * assert.equal(m.payload.num, 256);
 * ```
 */
export function parseMessage(
  header: Uint8Array,
  payload: Uint8Array,
  fds: readonly number[],
): VhostUserMessage {
  const h = decodeHeader(header);
  if (payload.byteLength !== h.size) {
    throw new VhostUserError(
      payload.byteLength < h.size ? "Truncated" : "BadSize",
      h.request,
      `header says ${h.size} payload bytes, got ${payload.byteLength}`,
    );
  }
  const spec = SPECS.get(h.request);
  const kind = payloadKindOf(h.request);
  if (kind === undefined) {
    throw new VhostUserError("UnknownRequest", h.request, `unknown request code ${h.request}`);
  }
  const p = decodePayload(h.request, kind, payload);
  const rule: FdRule = spec ? spec.fds : "any";
  if (!expectedFds(h.request, rule, p, fds.length)) {
    throw new VhostUserError("BadFdCount", h.request, `${fds.length} fds attached`);
  }
  return { request: h.request, flags: h.flags, payload: p, fds: [...fds] };
}

/** Encoded payload size of `p`. */
function payloadSize(p: VhostUserPayload): number {
  switch (p.kind) {
    case "empty":
      return 0;
    case "u64":
    case "vringState":
      return 8;
    case "vringAddr":
    case "memRegion":
      return 40;
    case "memTable":
      return 8 + p.regions.length * VHOST_USER_MEMORY_REGION_SIZE;
    case "config":
      return VHOST_USER_CONFIG_HDR_SIZE + p.data.byteLength;
    case "inflight":
      return VHOST_USER_INFLIGHT_SIZE;
    case "raw":
      return p.bytes.byteLength;
  }
}

function writeRegion(dv: DataView, off: number, r: MemoryRegionDesc): void {
  dv.setBigUint64(off, r.guestPhysAddr, true);
  dv.setBigUint64(off + 8, r.size, true);
  dv.setBigUint64(off + 16, r.userAddr, true);
  dv.setBigUint64(off + 24, r.mmapOffset, true);
}

/**
 * Encodes a whole message (header + payload) for sending: requests from the
 * front-end and replies from the back-end alike. `flags` should include
 * {@link VHOST_USER_VERSION}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeMessage } from "./message.ts";
 * import { VHOST_USER_GET_FEATURES, VHOST_USER_VERSION } from "./constants.ts";
 * const b = encodeMessage(VHOST_USER_GET_FEATURES, VHOST_USER_VERSION, { kind: "empty" });
 * assert.equal(b.length, 12);
 * assert.equal(b[0], 1);
 * assert.equal(b[4], 1);
 * ```
 */
export function encodeMessage(
  request: number,
  flags: number,
  payload: VhostUserPayload,
): Uint8Array<ArrayBuffer> {
  const size = payloadSize(payload);
  const out = new Uint8Array(VHOST_USER_HDR_SIZE + size);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, request, true);
  dv.setUint32(4, flags, true);
  dv.setUint32(8, size, true);
  const o = VHOST_USER_HDR_SIZE;
  switch (payload.kind) {
    case "empty":
      break;
    case "u64":
      dv.setBigUint64(o, BigInt.asUintN(64, payload.value), true);
      break;
    case "vringState":
      dv.setUint32(o, payload.index, true);
      dv.setUint32(o + 4, payload.num, true);
      break;
    case "vringAddr":
      dv.setUint32(o, payload.index, true);
      dv.setUint32(o + 4, payload.flags, true);
      dv.setBigUint64(o + 8, payload.descUserAddr, true);
      dv.setBigUint64(o + 16, payload.usedUserAddr, true);
      dv.setBigUint64(o + 24, payload.availUserAddr, true);
      dv.setBigUint64(o + 32, payload.logGuestAddr, true);
      break;
    case "memTable":
      dv.setUint32(o, payload.regions.length, true);
      payload.regions.forEach((r, i) =>
        writeRegion(dv, o + 8 + i * VHOST_USER_MEMORY_REGION_SIZE, r)
      );
      break;
    case "memRegion":
      writeRegion(dv, o + 8, payload.region);
      break;
    case "config":
      dv.setUint32(o, payload.offset, true);
      dv.setUint32(o + 4, payload.data.byteLength, true);
      dv.setUint32(o + 8, payload.flags, true);
      out.set(payload.data, o + VHOST_USER_CONFIG_HDR_SIZE);
      break;
    case "inflight":
      dv.setBigUint64(o, BigInt.asUintN(64, payload.mmapSize), true);
      dv.setBigUint64(o + 8, BigInt.asUintN(64, payload.mmapOffset), true);
      dv.setUint16(o + 16, payload.numQueues, true);
      dv.setUint16(o + 18, payload.queueSize, true);
      break;
    case "raw":
      out.set(payload.bytes, o);
      break;
  }
  return out;
}

/**
 * The ring index and NOFD flag of a SET_VRING_KICK/CALL/ERR payload.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { vringFdPayload } from "./message.ts";
 * assert.equal(vringFdPayload(0x101n).index, 1);
 * assert(vringFdPayload(0x101n).noFd);
 * ```
 */
export function vringFdPayload(value: bigint): { index: number; noFd: boolean } {
  const v = Number(value & 0x1ffn);
  return { index: v & VHOST_USER_VRING_IDX_MASK, noFd: (v & VHOST_USER_VRING_NOFD_MASK) !== 0 };
}
