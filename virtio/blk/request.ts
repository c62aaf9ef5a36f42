import { IoVector } from "../../block/mod.ts";
import type { DescriptorChain } from "../descriptor_chain.ts";
import type { GuestMemory } from "../guest_memory.ts";
import type { BlkRequestLimits } from "./config.ts";
import {
  VIRTIO_BLK_DISCARD_WRITE_ZEROES_SIZE,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_OUTHDR_SIZE,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_SECTOR_BITS,
  VIRTIO_BLK_SECTOR_SIZE,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from "./constants.ts";

/**
 * What is wrong with a virtio-blk request (virtio 1.2 section 5.2.6).
 * {@link requestErrorStatus} maps each to the status byte to complete it with,
 * or to {@link REQUEST_BROKEN} when the request cannot even be completed.
 */
export type RequestErrorKind =
  | "NoStatus" // no device-writable byte for the status: broken
  | "BadDescriptor" // a buffer the device cannot use (DescriptorChain.error), status writable: IOERR
  | "HeaderTooShort" // fewer than 16 device-readable bytes for the outhdr: IOERR
  | "Unsupported" // unknown type, or a feature not offered: UNSUPP
  | "UnsupportedFlags" // unknown discard/write-zeroes flags, UNMAP on discard: UNSUPP
  | "BadLength" // IN/OUT data not a multiple of the logical block size: IOERR
  | "Unaligned" // IN/OUT sector not on a logical block boundary: IOERR
  | "OutOfRange" // beyond capacity (including 64-bit overflow): IOERR
  | "TooManySegments" // more data segments than seg_max / max_*_seg: IOERR
  | "BadSegments" // discard/write-zeroes payload empty or not a multiple of 16: IOERR
  | "TooLarge" // IN/OUT data over VIRTIO_BLK_MAX_REQUEST_BYTES, or num_sectors beyond
  //              max_discard_sectors / max_write_zeroes_sectors: IOERR
  | "ReadOnly"; // a write, discard or write zeroes on a read-only device: IOERR

/**
 * The most data one IN/OUT request may carry: Linux's MAX_RW_COUNT
 * (INT_MAX & PAGE_MASK), the most one preadv/pwritev, IOCB_CMD_PREADV or
 * io_uring READV transfers (more comes back short), and under QEMU's
 * BDRV_REQUEST_MAX_BYTES, beyond which blk_aio_preadv fails with EINVAL (an
 * IOERR to the guest). It also keeps the used length (data + status byte) in
 * the used ring's 32-bit `len`: descriptor lengths are u32 each, so a chain
 * can describe far more than 4 GiB.
 */
export const VIRTIO_BLK_MAX_REQUEST_BYTES = 0x7ffff000;

/** {@link requestErrorStatus} for errors that leave no way to complete the request. */
export const REQUEST_BROKEN = -1;

/**
 * The status byte for a request that failed with `kind`, or
 * {@link REQUEST_BROKEN} when there is no status byte to write (the device
 * needs reset, QEMU's virtio_error). The one place where request errors
 * become statuses. QEMU also breaks the device for a short header and for
 * unusable buffers; here a request whose status byte can be written is
 * answered instead (IOERR), so the guest is never left waiting on a live
 * ring (docs/design.md, "Malformed chains").
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { requestErrorStatus, REQUEST_BROKEN } from "./request.ts";
 * import { VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP } from "./constants.ts";
 * assert.equal(requestErrorStatus("Unsupported"), VIRTIO_BLK_S_UNSUPP);
 * assert.equal(requestErrorStatus("OutOfRange"), VIRTIO_BLK_S_IOERR);
 * assert.equal(requestErrorStatus("HeaderTooShort"), VIRTIO_BLK_S_IOERR);
 * assert.equal(requestErrorStatus("BadDescriptor"), VIRTIO_BLK_S_IOERR);
 * assert.equal(requestErrorStatus("NoStatus"), REQUEST_BROKEN);
 * ```
 */
export function requestErrorStatus(kind: RequestErrorKind): number {
  switch (kind) {
    case "NoStatus":
      return REQUEST_BROKEN;
    case "Unsupported":
    case "UnsupportedFlags":
      return VIRTIO_BLK_S_UNSUPP;
    default:
      return VIRTIO_BLK_S_IOERR;
  }
}

/**
 * A request error as an Error object (for logs and tests; the parser itself
 * returns the kind without allocating).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { RequestError } from "./request.ts";
 * const e = new RequestError("TooLarge", 7);
 * assert.equal(e.status, 1);
 * assert(e.message.includes("TooLarge"));
 * ```
 */
export class RequestError extends Error {
  /** What was wrong. */
  readonly kind: RequestErrorKind;
  /** Status to complete with, or REQUEST_BROKEN. */
  readonly status: number;

  constructor(kind: RequestErrorKind, head: number) {
    super(`virtio-blk request (head ${head}): ${kind}`);
    this.name = "RequestError";
    this.kind = kind;
    this.status = requestErrorStatus(kind);
  }
}

/**
 * Data segments a {@link VirtioBlkRequest}'s I/O vector has room for before
 * it grows: enough for the 4-64 KiB requests guests send most (Linux merges
 * bios into few segments), 512 bytes of iovec.
 */
export const INITIAL_SEGMENTS = 16;

/**
 * A parsed virtio-blk request (QEMU's VirtIOBlockReq): reusable, one per
 * request slot, refilled by {@link parseBlkRequest} without allocating.
 *
 * - `qiov`: the data buffers as host addresses into guest memory (device-
 *   readable for OUT, device-writable for IN and GET_ID, header and status
 *   byte excluded); empty for other types. It starts with room for
 *   {@link INITIAL_SEGMENTS} and grows (up to seg_max) the first time the
 *   request object meets a longer request, so a slot costs what the requests
 *   it served needed, not seg_max x 32 bytes.
 * - `inLen`: bytes the device writes besides the status byte (IN: the data
 *   length; GET_ID: up to 20); the used length on success is `inLen + 1`.
 * - discard / write zeroes: `rangeCount` ranges in `rangeSector`,
 *   `rangeSectors`, `rangeUnmap`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VirtioBlkRequest } from "./request.ts";
 * import { blkRequestLimits } from "./config.ts";
 * const req = new VirtioBlkRequest(blkRequestLimits({ capacity: 8, segMax: 1022 }));
 * assert.equal(req.qiov.capacity, 16);
 * assert.equal(req.usedLen, 1);
 * ```
 */
export class VirtioBlkRequest {
  /** Head of the chain this request came from (what to push). */
  head = 0;
  /** VIRTIO_BLK_T_*. */
  type = 0;
  /** outhdr ioprio (unused by this device). */
  ioprio = 0;
  /** Start sector (512-byte units) for IN/OUT. */
  sector = 0;
  /** Host address of the status byte. */
  statusAddr = 0;
  /** Bytes written to the guest besides the status byte (see class doc). */
  inLen = 0;
  /** Data buffers. */
  readonly qiov: IoVector;
  /** Number of discard / write zeroes ranges. */
  rangeCount = 0;
  /** Start sector of each range. */
  readonly rangeSector: Float64Array;
  /** Sector count of each range. */
  readonly rangeSectors: Uint32Array;
  /** Whether each range had VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP. */
  readonly rangeUnmap: Uint8Array;
  #statusBytes: Uint8Array | null = null;
  #statusOffset = 0;

  constructor(limits: BlkRequestLimits) {
    this.qiov = new IoVector(Math.min(limits.segMax, INITIAL_SEGMENTS));
    const ranges = Math.max(1, limits.maxDiscardSeg, limits.maxWriteZeroesSeg);
    this.rangeSector = new Float64Array(ranges);
    this.rangeSectors = new Uint32Array(ranges);
    this.rangeUnmap = new Uint8Array(ranges);
  }

  /** Used length on success: data written plus the status byte. */
  get usedLen(): number {
    return this.inLen + 1;
  }

  /** Sets where the status byte lives (parser only). */
  setStatusLocation(bytes: Uint8Array, offset: number, addr: number): void {
    this.#statusBytes = bytes;
    this.#statusOffset = offset;
    this.statusAddr = addr;
  }

  /**
   * Writes the status byte (VIRTIO_BLK_S_*) into guest memory. Only after a
   * parse that did not return a REQUEST_BROKEN error. Hot path.
   */
  writeStatus(status: number): void {
    const b = this.#statusBytes;
    if (b === null) throw new Error("VirtioBlkRequest: no status byte (not parsed)");
    b[this.#statusOffset] = status;
  }
}

// Reading device-readable bytes across buffers without allocating: one cursor
// per thread (the parser is not re-entrant, and never needs to be).
let curSeg = 0;
let curOff = 0;
const scratch = new Uint8Array(16);
const scratchView = new DataView(scratch.buffer);

function readOut(chain: DescriptorChain, mem: GuestMemory, n: number): boolean {
  let k = 0;
  while (k < n) {
    if (curSeg >= chain.outNum) return false;
    const left = chain.len[curSeg] - curOff;
    if (left === 0) {
      curSeg++;
      curOff = 0;
      continue;
    }
    const bytes = mem.regionBytes(chain.region[curSeg]);
    const base = chain.offset[curSeg] + curOff;
    const take = left < n - k ? left : n - k;
    for (let j = 0; j < take; j++) scratch[k + j] = bytes[base + j];
    k += take;
    curOff += take;
  }
  return true;
}

const HI_LIMIT = 0x200000; // sector >= 2^53 is beyond any capacity

/**
 * Parses the chain of one virtio-blk request into `req` (as QEMU's
 * virtio_blk_handle_request does before submitting): the 16-byte outhdr
 * (type, ioprio, sector; it may span buffers, including the pieces of one
 * descriptor in adjacent regions), the data buffers into `req.qiov` (one
 * iovec per chain entry: a descriptor split over adjacent regions counts
 * once per piece against seg_max, like QEMU's iovecs), the status byte (the
 * last byte of the last device-writable buffer: one byte, so always in one
 * region) and, for discard / write zeroes, the ranges. Everything is checked
 * against `limits`. Returns null when the request can be executed, else what
 * is wrong: complete it with {@link requestErrorStatus} (after
 * `req.writeStatus`), or treat the ring as broken for REQUEST_BROKEN. A
 * chain with an unusable buffer (`chain.error`) is "BadDescriptor" when its
 * last buffer can take the status byte, else "NoStatus".
 *
 * Extra buffers in the unused direction (readable bytes after the header of a
 * read, writable bytes before the status of a write) are ignored, like QEMU.
 * Hot path: no allocation (except growing `req.qiov` the first time this
 * request object meets a request with more buffers than ever before).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { blkRequestLimits, DescriptorChain, GuestMemory, parseBlkRequest, VirtioBlkRequest } from "../mod.ts";
 * import { mmapAnonymous } from "../../sys/mod.ts";
 * const m = mmapAnonymous(8192);
 * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0, size: 8192, userAddr: 0, hostAddr: m.addr }]);
 * new DataView(m.buffer).setUint32(8, 3, true); // outhdr: type IN, sector 3
 * const chain = new DescriptorChain(4);
 * chain.reset(0);
 * chain.add(m.addr, 16, false, 0, 0); // header
 * chain.add(m.addr + 4096, 513, true, 0, 4096); // 512 data bytes + status
 * const req = new VirtioBlkRequest(blkRequestLimits({ capacity: 8 }));
 * assert.equal(parseBlkRequest(chain, mem, blkRequestLimits({ capacity: 8 }), req), null);
 * assert.equal(req.sector, 3);
 * assert.equal(req.qiov.size, 512);
 * assert.equal(req.inLen, 512);
 * req.writeStatus(0);
 * m.unmap();
 * ```
 */
export function parseBlkRequest(
  chain: DescriptorChain,
  mem: GuestMemory,
  limits: BlkRequestLimits,
  req: VirtioBlkRequest,
): RequestErrorKind | null {
  const qiov = req.qiov;
  qiov.reset();
  req.head = chain.head;
  req.inLen = 0;
  req.rangeCount = 0;
  req.type = 0;
  req.sector = 0;
  if (chain.error !== null) {
    // The chain was walked to its end but a buffer in it is unusable: answer
    // IOERR in the last byte of a valid device-writable last buffer, if any.
    if (chain.statusAddr < 0) return "NoStatus";
    req.setStatusLocation(
      mem.regionBytes(chain.statusRegion),
      chain.statusOffset,
      chain.statusAddr,
    );
    return "BadDescriptor";
  }
  if (chain.inNum === 0) return "NoStatus";
  const last = chain.count - 1;
  const statusRegion = chain.region[last];
  req.setStatusLocation(
    mem.regionBytes(statusRegion),
    chain.offset[last] + chain.len[last] - 1,
    chain.addr[last] + chain.len[last] - 1,
  );
  if (chain.outLen < VIRTIO_BLK_OUTHDR_SIZE) return "HeaderTooShort";
  curSeg = 0;
  curOff = 0;
  let type: number, sectorLo: number, sectorHi: number;
  if (chain.len[0] >= VIRTIO_BLK_OUTHDR_SIZE) {
    // Hot path: the whole outhdr in the first buffer (as drivers lay it
    // out), read in place; the entry lies inside its region, so these reads
    // are in bounds.
    const v = mem.regionView(chain.region[0]);
    const o = chain.offset[0];
    type = v.getUint32(o, true);
    req.ioprio = v.getUint32(o + 4, true);
    sectorLo = v.getUint32(o + 8, true);
    sectorHi = v.getUint32(o + 12, true);
    curOff = VIRTIO_BLK_OUTHDR_SIZE;
  } else {
    readOut(chain, mem, VIRTIO_BLK_OUTHDR_SIZE);
    type = scratchView.getUint32(0, true);
    req.ioprio = scratchView.getUint32(4, true);
    sectorLo = scratchView.getUint32(8, true);
    sectorHi = scratchView.getUint32(12, true);
  }
  req.type = type;

  switch (type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT: {
      const isWrite = type === VIRTIO_BLK_T_OUT;
      const dataLen = isWrite ? chain.outLen - VIRTIO_BLK_OUTHDR_SIZE : chain.inLen - 1;
      if (sectorHi >= HI_LIMIT) return "OutOfRange";
      const sector = sectorHi * 0x100000000 + sectorLo;
      req.sector = sector;
      // Hot path: blk_size is a power of two up to 2^31, so the low 32 bits
      // decide both; `&` keeps them exactly for integers below 2^53, where
      // `%` of a number V8 holds as a double is a call into C (Float64Mod).
      if ((dataLen & (limits.blkSize - 1)) !== 0) return "BadLength";
      if ((sectorLo & ((limits.blkSize >>> VIRTIO_BLK_SECTOR_BITS) - 1)) !== 0) return "Unaligned";
      if (sector + dataLen / VIRTIO_BLK_SECTOR_SIZE > limits.capacity) return "OutOfRange";
      if (dataLen > VIRTIO_BLK_MAX_REQUEST_BYTES) return "TooLarge";
      if (isWrite && limits.readOnly) return "ReadOnly";
      if (isWrite) {
        if (!addOutData(chain, qiov, limits.segMax)) return "TooManySegments";
      } else {
        if (!addInData(chain, qiov, limits.segMax)) return "TooManySegments";
        req.inLen = dataLen;
      }
      return null;
    }
    case VIRTIO_BLK_T_FLUSH:
      return limits.flush ? null : "Unsupported";
    case VIRTIO_BLK_T_GET_ID: {
      if (!addInData(chain, qiov, limits.segMax)) return "TooManySegments";
      req.inLen = Math.min(VIRTIO_BLK_ID_BYTES, chain.inLen - 1);
      return null;
    }
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
      return parseRanges(chain, mem, limits, req, type === VIRTIO_BLK_T_DISCARD);
    default:
      return "Unsupported";
  }
}

/**
 * Makes room in `qiov` for `n` buffers (at most `segMax`: more fail as
 * TooManySegments anyway). Doubles at least, so a slot grows a few times in
 * its life, then never again (no allocation once warm).
 */
function reserveSegments(qiov: IoVector, n: number, segMax: number): void {
  if (n <= qiov.capacity) return;
  qiov.reserve(Math.min(segMax, Math.max(n, 2 * qiov.capacity)));
}

/** Device-readable bytes after the header (cursor position) into `qiov`, at most `segMax` buffers. */
function addOutData(chain: DescriptorChain, qiov: IoVector, segMax: number): boolean {
  reserveSegments(qiov, chain.outNum - curSeg, segMax);
  for (let s = curSeg; s < chain.outNum; s++) {
    const off = s === curSeg ? curOff : 0;
    const len = chain.len[s] - off;
    if (len === 0) continue;
    if (qiov.niov >= segMax) return false;
    qiov.add(chain.addr[s] + off, len);
  }
  return true;
}

/** Device-writable bytes except the final status byte into `qiov`, at most `segMax` buffers. */
function addInData(chain: DescriptorChain, qiov: IoVector, segMax: number): boolean {
  const last = chain.count - 1;
  reserveSegments(qiov, chain.inNum, segMax);
  for (let s = chain.outNum; s <= last; s++) {
    const len = s === last ? chain.len[s] - 1 : chain.len[s];
    if (len === 0) continue;
    if (qiov.niov >= segMax) return false;
    qiov.add(chain.addr[s], len);
  }
  return true;
}

function parseRanges(
  chain: DescriptorChain,
  mem: GuestMemory,
  limits: BlkRequestLimits,
  req: VirtioBlkRequest,
  discard: boolean,
): RequestErrorKind | null {
  const maxSeg = discard ? limits.maxDiscardSeg : limits.maxWriteZeroesSeg;
  const maxSectors = discard ? limits.maxDiscardSectors : limits.maxWriteZeroesSectors;
  if (maxSeg === 0) return "Unsupported";
  if (limits.readOnly) return "ReadOnly";
  const dataLen = chain.outLen - VIRTIO_BLK_OUTHDR_SIZE;
  const size = VIRTIO_BLK_DISCARD_WRITE_ZEROES_SIZE;
  if (dataLen === 0 || dataLen % size !== 0) return "BadSegments";
  const n = dataLen / size;
  if (n > maxSeg || n > req.rangeSector.length) return "TooManySegments";
  for (let i = 0; i < n; i++) {
    readOut(chain, mem, size);
    const lo = scratchView.getUint32(0, true);
    const hi = scratchView.getUint32(4, true);
    const num = scratchView.getUint32(8, true);
    const flags = scratchView.getUint32(12, true);
    if ((flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0) return "UnsupportedFlags";
    if (discard && (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0) return "UnsupportedFlags";
    if (num > maxSectors) return "TooLarge";
    if (hi >= HI_LIMIT) return "OutOfRange";
    const sector = hi * 0x100000000 + lo;
    if (sector + num > limits.capacity) return "OutOfRange";
    req.rangeSector[i] = sector;
    req.rangeSectors[i] = num;
    req.rangeUnmap[i] = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    req.rangeCount = i + 1;
  }
  return null;
}
