import {
  featureBit,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../constants.ts";
import { IOV_MAX } from "../../block/mod.ts";
import {
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_GEOMETRY,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_TOPOLOGY,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_SECTOR_SIZE,
} from "./constants.ts";

/**
 * Byte offsets of `struct virtio_blk_config` (virtio 1.2 section 5.2.4), all
 * fields little-endian, packed. `size` covers the fields up to and including
 * write_zeroes_may_unmap and its padding (secure erase, 1.2's last addition,
 * is not offered). Checked against /usr/include/linux/virtio_blk.h by
 * tests/virtio/blk_config_test.ts.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VIRTIO_BLK_CONFIG } from "./config.ts";
 * assert.equal(VIRTIO_BLK_CONFIG.writeback, 32);
 * assert.equal(VIRTIO_BLK_CONFIG.size, 60);
 * ```
 */
export const VIRTIO_BLK_CONFIG = {
  size: 60,
  capacity: 0,
  size_max: 8,
  seg_max: 12,
  geometry_cylinders: 16,
  geometry_heads: 18,
  geometry_sectors: 19,
  blk_size: 20,
  physical_block_exp: 24,
  alignment_offset: 25,
  min_io_size: 26,
  opt_io_size: 28,
  writeback: 32,
  num_queues: 34,
  max_discard_sectors: 36,
  max_discard_seg: 40,
  discard_sector_alignment: 44,
  max_write_zeroes_sectors: 48,
  max_write_zeroes_seg: 52,
  write_zeroes_may_unmap: 56,
} as const;

/**
 * What a virtio-blk device offers: the inputs to its config space
 * ({@link encodeVirtioBlkConfig}), feature bits ({@link virtioBlkFeatures}) and
 * request checks ({@link blkRequestLimits}). Sizes in 512-byte sectors unless
 * named otherwise; an optional group that is absent is not offered.
 */
export interface VirtioBlkOptions {
  /** Disk size in 512-byte sectors. */
  capacity: number;
  /** VIRTIO_BLK_F_RO: writes, discards and write zeroes fail with IOERR. */
  readOnly?: boolean;
  /** VIRTIO_BLK_F_SIZE_MAX: largest single segment in bytes. */
  sizeMax?: number;
  /**
   * VIRTIO_BLK_F_SEG_MAX: most data segments in one request (QEMU: queue size
   * - 2, see {@link segMaxForQueueSize}); at most IOV_MAX. Default 126.
   */
  segMax?: number;
  /** VIRTIO_BLK_F_GEOMETRY (legacy CHS). */
  geometry?: { cylinders: number; heads: number; sectors: number };
  /** VIRTIO_BLK_F_BLK_SIZE: logical block size in bytes (power of two >= 512). */
  blkSize?: number;
  /** VIRTIO_BLK_F_TOPOLOGY (in logical blocks; physical block = blkSize << exp). */
  topology?: {
    physicalBlockExp: number;
    alignmentOffset: number;
    minIoSize: number;
    optIoSize: number;
  };
  /** VIRTIO_BLK_F_CONFIG_WCE with this initial `writeback` value. */
  writeback?: boolean;
  /** VIRTIO_BLK_F_FLUSH; default true. */
  flush?: boolean;
  /** VIRTIO_BLK_F_MQ with this many request queues. */
  numQueues?: number;
  /** VIRTIO_BLK_F_DISCARD. */
  discard?: { maxSectors: number; maxSeg: number; sectorAlignment: number };
  /** VIRTIO_BLK_F_WRITE_ZEROES. */
  writeZeroes?: { maxSectors: number; maxSeg: number; mayUnmap: boolean };
  /** Ring features offered; both default true. */
  ring?: { indirectDesc?: boolean; eventIdx?: boolean };
}

/** Most discard / write zeroes segments per request this device accepts to offer. */
export const MAX_RANGE_SEG = 4096;

/** Default seg_max: QEMU's queue size (128) minus header and status. */
export const DEFAULT_SEG_MAX = 126;

/**
 * The largest ring a device accepts by default: QEMU's VIRTQUEUE_MAX_SIZE
 * (1024; the spec allows 32768). Front-ends ask for up to this much (QEMU's
 * vhost-user-blk-pci uses 128 by default, cloud-hypervisor and others 256-1024).
 */
export const DEFAULT_MAX_QUEUE_SIZE = 1024;

/**
 * seg_max for a device whose rings are at most `queueSize` entries, as QEMU's
 * virtio-blk computes it (`queue_size - 2`: one descriptor each for header and
 * status), except that it never exceeds IOV_MAX - 2: QEMU cannot exceed it
 * because its rings stop at VIRTQUEUE_MAX_SIZE = 1024 = IOV_MAX, ours may be
 * larger, and a request with more data segments than IOV_MAX fails in
 * preadv/io_submit/io_uring with EINVAL. So the guest never builds a request
 * the engines cannot take, and each request needs at most IOV_MAX - 2 iovecs.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { segMaxForQueueSize } from "./config.ts";
 * assert.equal(segMaxForQueueSize(256), 254);
 * assert.equal(segMaxForQueueSize(32768), 1022);
 * ```
 */
export function segMaxForQueueSize(queueSize: number): number {
  return Math.max(1, Math.min(queueSize, IOV_MAX) - 2);
}

/**
 * The feature bits a device with `opts` offers: VIRTIO_F_VERSION_1, the ring
 * features, VIRTIO_BLK_F_SEG_MAX and one bit per offered option.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { virtioBlkFeatures } from "./config.ts";
 * import { hasFeature } from "../constants.ts";
 * import { VIRTIO_BLK_F_RO } from "./constants.ts";
 * assert(hasFeature(virtioBlkFeatures({ capacity: 8, readOnly: true }), VIRTIO_BLK_F_RO));
 * ```
 */
export function virtioBlkFeatures(opts: VirtioBlkOptions): bigint {
  let f = featureBit(VIRTIO_F_VERSION_1) | featureBit(VIRTIO_BLK_F_SEG_MAX);
  if (opts.ring?.indirectDesc ?? true) f |= featureBit(VIRTIO_RING_F_INDIRECT_DESC);
  if (opts.ring?.eventIdx ?? true) f |= featureBit(VIRTIO_RING_F_EVENT_IDX);
  if (opts.readOnly) f |= featureBit(VIRTIO_BLK_F_RO);
  if (opts.sizeMax !== undefined) f |= featureBit(VIRTIO_BLK_F_SIZE_MAX);
  if (opts.geometry) f |= featureBit(VIRTIO_BLK_F_GEOMETRY);
  if (opts.blkSize !== undefined) f |= featureBit(VIRTIO_BLK_F_BLK_SIZE);
  if (opts.topology) f |= featureBit(VIRTIO_BLK_F_TOPOLOGY);
  if (opts.writeback !== undefined) f |= featureBit(VIRTIO_BLK_F_CONFIG_WCE);
  if (opts.flush ?? true) f |= featureBit(VIRTIO_BLK_F_FLUSH);
  if (opts.numQueues !== undefined) f |= featureBit(VIRTIO_BLK_F_MQ);
  if (opts.discard) f |= featureBit(VIRTIO_BLK_F_DISCARD);
  if (opts.writeZeroes) f |= featureBit(VIRTIO_BLK_F_WRITE_ZEROES);
  return f;
}

function u(v: number, bits: number, what: string): number {
  if (!Number.isInteger(v) || v < 0 || v >= 2 ** bits) {
    throw new RangeError(`virtio-blk config: ${what} ${v} does not fit u${bits}`);
  }
  return v;
}

/**
 * `struct virtio_blk_config` for `opts` as its exact little-endian bytes
 * ({@link VIRTIO_BLK_CONFIG} layout); fields of options not offered are 0.
 * Throws RangeError for a value that does not fit its field.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { encodeVirtioBlkConfig, VIRTIO_BLK_CONFIG } from "./config.ts";
 * const b = encodeVirtioBlkConfig({ capacity: 2 ** 33, numQueues: 2 });
 * const dv = new DataView(b.buffer);
 * assert.equal(dv.getBigUint64(0, true), 2n ** 33n);
 * assert.equal(dv.getUint16(VIRTIO_BLK_CONFIG.num_queues, true), 2);
 * ```
 */
export function encodeVirtioBlkConfig(opts: VirtioBlkOptions): Uint8Array<ArrayBuffer> {
  const L = VIRTIO_BLK_CONFIG;
  const out = new Uint8Array(L.size);
  const dv = new DataView(out.buffer);
  if (!Number.isSafeInteger(opts.capacity) || opts.capacity < 0) {
    throw new RangeError(`virtio-blk config: capacity ${opts.capacity}`);
  }
  dv.setBigUint64(L.capacity, BigInt(opts.capacity), true);
  dv.setUint32(L.size_max, u(opts.sizeMax ?? 0, 32, "size_max"), true);
  dv.setUint32(L.seg_max, u(opts.segMax ?? DEFAULT_SEG_MAX, 32, "seg_max"), true);
  const g = opts.geometry;
  if (g) {
    dv.setUint16(L.geometry_cylinders, u(g.cylinders, 16, "cylinders"), true);
    dv.setUint8(L.geometry_heads, u(g.heads, 8, "heads"));
    dv.setUint8(L.geometry_sectors, u(g.sectors, 8, "sectors"));
  }
  dv.setUint32(L.blk_size, u(opts.blkSize ?? 0, 32, "blk_size"), true);
  const t = opts.topology;
  if (t) {
    dv.setUint8(L.physical_block_exp, u(t.physicalBlockExp, 8, "physical_block_exp"));
    dv.setUint8(L.alignment_offset, u(t.alignmentOffset, 8, "alignment_offset"));
    dv.setUint16(L.min_io_size, u(t.minIoSize, 16, "min_io_size"), true);
    dv.setUint32(L.opt_io_size, u(t.optIoSize, 32, "opt_io_size"), true);
  }
  dv.setUint8(L.writeback, opts.writeback ? 1 : 0);
  dv.setUint16(L.num_queues, u(opts.numQueues ?? 1, 16, "num_queues"), true);
  const d = opts.discard;
  if (d) {
    dv.setUint32(L.max_discard_sectors, u(d.maxSectors, 32, "max_discard_sectors"), true);
    dv.setUint32(L.max_discard_seg, u(d.maxSeg, 32, "max_discard_seg"), true);
    dv.setUint32(
      L.discard_sector_alignment,
      u(d.sectorAlignment, 32, "discard_sector_alignment"),
      true,
    );
  }
  const w = opts.writeZeroes;
  if (w) {
    dv.setUint32(L.max_write_zeroes_sectors, u(w.maxSectors, 32, "max_write_zeroes_sectors"), true);
    dv.setUint32(L.max_write_zeroes_seg, u(w.maxSeg, 32, "max_write_zeroes_seg"), true);
    dv.setUint8(L.write_zeroes_may_unmap, w.mayUnmap ? 1 : 0);
  }
  return out;
}

/**
 * The numbers {@link parseBlkRequest} checks requests against, computed once
 * from {@link VirtioBlkOptions} (plain fields: cheap to read per request).
 */
export interface BlkRequestLimits {
  /** Disk size in 512-byte sectors. */
  readonly capacity: number;
  /** Most data segments per request (capacity of each request's IoVector). */
  readonly segMax: number;
  /** Logical block size in bytes: IN/OUT offsets and lengths must be multiples. */
  readonly blkSize: number;
  readonly readOnly: boolean;
  readonly flush: boolean;
  /** 0 when discard is not offered. */
  readonly maxDiscardSeg: number;
  readonly maxDiscardSectors: number;
  /** 0 when write zeroes is not offered. */
  readonly maxWriteZeroesSeg: number;
  readonly maxWriteZeroesSectors: number;
}

/**
 * The request limits of a device with `opts`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { blkRequestLimits } from "./config.ts";
 * const l = blkRequestLimits({ capacity: 2048, discard: { maxSectors: 1024, maxSeg: 1, sectorAlignment: 8 } });
 * assert.equal(l.maxDiscardSeg, 1);
 * assert.equal(l.maxWriteZeroesSeg, 0);
 * assert.equal(l.blkSize, 512);
 * ```
 */
export function blkRequestLimits(opts: VirtioBlkOptions): BlkRequestLimits {
  const blkSize = opts.blkSize ?? VIRTIO_BLK_SECTOR_SIZE;
  if (blkSize < VIRTIO_BLK_SECTOR_SIZE || (blkSize & (blkSize - 1)) !== 0) {
    throw new RangeError(`virtio-blk: blk_size ${blkSize} is not a power of two >= 512`);
  }
  const segMax = opts.segMax ?? DEFAULT_SEG_MAX;
  if (!Number.isInteger(segMax) || segMax < 1 || segMax > IOV_MAX) {
    // More than IOV_MAX buffers cannot be submitted in one preadv/pwritev.
    throw new RangeError(`virtio-blk: seg_max ${segMax} (1..${IOV_MAX})`);
  }
  for (
    const [what, seg] of [["discard", opts.discard?.maxSeg], [
      "write zeroes",
      opts.writeZeroes?.maxSeg,
    ]] as const
  ) {
    if (seg !== undefined && !(Number.isInteger(seg) && seg >= 0 && seg <= MAX_RANGE_SEG)) {
      throw new RangeError(`virtio-blk: ${what} max_seg ${seg} (at most ${MAX_RANGE_SEG})`);
    }
  }
  return Object.freeze({
    capacity: opts.capacity,
    segMax,
    blkSize,
    readOnly: opts.readOnly ?? false,
    flush: opts.flush ?? true,
    maxDiscardSeg: opts.discard ? Math.max(1, opts.discard.maxSeg) : 0,
    maxDiscardSectors: opts.discard?.maxSectors ?? 0,
    maxWriteZeroesSeg: opts.writeZeroes ? Math.max(1, opts.writeZeroes.maxSeg) : 0,
    maxWriteZeroesSectors: opts.writeZeroes?.maxSectors ?? 0,
  });
}

/**
 * The write cache setting a driver's config-space write asks for, as QEMU's
 * virtio_blk_set_config: only the `writeback` byte is writable, and only
 * when VIRTIO_BLK_F_CONFIG_WCE is offered (`opts.writeback` set). Returns
 * true for writeback, false for writethrough; throws RangeError for a write
 * that does not cover that byte.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { configWriteback, VIRTIO_BLK_CONFIG } from "./config.ts";
 * const o = { capacity: 8, writeback: true };
 * assert.equal(configWriteback(o, VIRTIO_BLK_CONFIG.writeback, new Uint8Array([0])), false);
 * assert.throws(() => configWriteback(o, 0, new Uint8Array(8)), RangeError);
 * ```
 */
export function configWriteback(opts: VirtioBlkOptions, offset: number, data: Uint8Array): boolean {
  const wb = VIRTIO_BLK_CONFIG.writeback;
  if (opts.writeback === undefined || offset > wb || offset + data.length <= wb) {
    throw new RangeError(`config write of ${data.length} bytes at ${offset}: read-only field`);
  }
  return data[wb - offset] !== 0;
}
