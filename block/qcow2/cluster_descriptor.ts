import { QCOW2_COMPRESSED_SECTOR_SIZE, QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER } from "./constants.ts";

/**
 * How a run of guest bytes is read (QEMU's QCow2SubclusterType, reduced to
 * what reading needs): from the host cluster, by decompressing, as zeroes,
 * from the backing file, or not at all (the entry breaks the format's rules:
 * the request fails with -EIO).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { SubclusterType } from "./cluster_descriptor.ts";
 * assert.notEqual(SubclusterType.Zero, SubclusterType.Unallocated);
 * ```
 */
export const SubclusterType = {
  /** Data at `host` in the image file. */
  Normal: 0,
  /** A deflated cluster at `host` of `compressedBytes`. */
  Compressed: 1,
  /** Reads as zeroes (zero flag, or a "reads as zeros" subcluster). */
  Zero: 2,
  /** Not allocated: the backing file's data, or zeroes without one. */
  Unallocated: 3,
  /** Reserved bits set, a misaligned offset, contradictory bits. */
  Invalid: 4,
} as const;

/** See {@link SubclusterType}. */
export type SubclusterType = typeof SubclusterType[keyof typeof SubclusterType];

/**
 * The result of {@link decodeL2Entry}: a mutable record the driver reuses
 * (hot path: no allocation).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Qcow2Mapping } from "./cluster_descriptor.ts";
 * const m = new Qcow2Mapping();
 * assert.equal(m.bytes, 0);
 * ```
 */
export class Qcow2Mapping {
  /** A {@link SubclusterType}. */
  type: SubclusterType = SubclusterType.Invalid;
  /**
   * Normal: host offset of the run's first byte. Compressed: host offset of
   * the compressed data (not aligned). Otherwise 0.
   */
  host = 0;
  /**
   * Normal: the host cluster's offset (for metadata overlap checks). Zero
   * (without extended L2): the preallocated cluster kept under the zero
   * flag, or 0.
   */
  hostCluster = 0;
  /** Bytes of the run, from the requested offset on, inside one cluster. */
  bytes = 0;
  /** Compressed: bytes to read at `host` (may run into the next cluster). */
  compressedBytes = 0;
  /** Normal and Zero: bit 63 (COPIED), the cluster's refcount is exactly one. */
  copied = false;
  /** Why the entry is Invalid (for logs and tests). */
  reason = "";
}

/** Geometry {@link decodeL2Entry} needs (a subset of the header). */
export interface L2Geometry {
  clusterBits: number;
  clusterSize: number;
  extendedL2: boolean;
  /** Version 2 has no zero flag. */
  version: number;
}

/**
 * Decodes an L1 entry (qcow2.txt "L1 table entry") at `index` of `l1`:
 * returns the L2 table's offset, 0 when unallocated, or -1 when reserved
 * bits are set or the offset is not cluster aligned.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeL1Entry } from "./cluster_descriptor.ts";
 * const l1 = new DataView(new ArrayBuffer(16));
 * l1.setUint32(0, 0x80000000); l1.setUint32(4, 0x30000); // COPIED, 0x30000
 * l1.setUint32(12, 0x30001);                              // a reserved bit
 * assert.equal(decodeL1Entry(l1, 0, 65536), 0x30000);
 * assert.equal(decodeL1Entry(l1, 1, 65536), -1);
 * ```
 */
export function decodeL1Entry(l1: DataView, index: number, clusterSize: number): number {
  const hi = l1.getUint32(index * 8), lo = l1.getUint32(index * 8 + 4);
  if ((lo & 0x1ff) !== 0 || (hi & 0x7f000000) !== 0) return -1;
  const offset = (hi & 0x00ffffff) * 0x100000000 + (lo >>> 0);
  if (offset % clusterSize !== 0) return -1;
  return offset;
}

/**
 * Decodes L2 entry `index` of `table` for the guest bytes
 * `[inCluster, inCluster + bytes)` of its cluster into `out`: the type of the
 * first byte and how many bytes from there share it (with extended L2
 * entries a run ends where the subcluster type changes). Follows
 * qcow2.txt "L2 table entry", "Compressed Clusters Descriptor" and
 * "Extended L2 Entries"; reserved bits that are set make the entry Invalid.
 * Hot path: no allocation.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { decodeL2Entry, Qcow2Mapping, SubclusterType } from "./cluster_descriptor.ts";
 * const geo = { clusterBits: 16, clusterSize: 65536, extendedL2: false, version: 3 };
 * const l2 = new DataView(new ArrayBuffer(16));
 * l2.setUint32(4, 0x50000);           // entry 0: data at 0x50000
 * l2.setUint32(12, 1);                // entry 1: zero flag
 * const m = new Qcow2Mapping();
 * decodeL2Entry(l2, 0, 512, 4096, geo, m);
 * assert.equal(m.type, SubclusterType.Normal);
 * assert.equal(m.host, 0x50000 + 512);
 * decodeL2Entry(l2, 1, 0, 65536, geo, m);
 * assert.equal(m.type, SubclusterType.Zero);
 * ```
 */
export function decodeL2Entry(
  table: DataView,
  index: number,
  inCluster: number,
  bytes: number,
  geo: L2Geometry,
  out: Qcow2Mapping,
): void {
  const at = index * (geo.extendedL2 ? 16 : 8);
  const hi = table.getUint32(at), lo = table.getUint32(at + 4);
  out.host = 0;
  out.hostCluster = 0;
  out.compressedBytes = 0;
  out.copied = false;
  out.bytes = bytes;
  if ((hi >>> 30) & 1) return compressed(hi, lo, geo.clusterBits, out);
  if ((lo & 0x1fe) !== 0 || (hi & 0x3f000000) !== 0) return invalid(out, "reserved bits set");
  const offset = (hi & 0x00ffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
  const copied = hi >>> 31;
  if (offset % geo.clusterSize !== 0) return invalid(out, "host offset not cluster aligned");
  if (offset === 0 && copied) return invalid(out, "offset 0 marked COPIED");
  if (!geo.extendedL2) {
    if (lo & 1) {
      if (geo.version < 3) return invalid(out, "zero flag in a version 2 image");
      out.type = SubclusterType.Zero;
      out.hostCluster = offset; // a preallocated zero cluster (0: none)
      out.copied = copied === 1;
    } else if (offset === 0) out.type = SubclusterType.Unallocated;
    else {
      out.type = SubclusterType.Normal;
      out.hostCluster = offset;
      out.host = offset + inCluster;
      out.copied = copied === 1;
    }
    return;
  }
  if (lo & 1) return invalid(out, "zero flag with extended L2 entries");
  const zero = table.getUint32(at + 8), alloc = table.getUint32(at + 12);
  if ((zero & alloc) !== 0) return invalid(out, "subcluster both allocated and zero");
  if (offset === 0 && alloc !== 0) return invalid(out, "allocated subclusters without a cluster");
  const scBits = geo.clusterBits - 5;
  const first = inCluster >>> scBits;
  const last = (inCluster + bytes - 1) >>> scBits;
  const kind = subclusterKind(zero, alloc, first);
  let sc = first + 1;
  while (sc <= last && subclusterKind(zero, alloc, sc) === kind) sc++;
  out.type = kind;
  out.bytes = Math.min(
    bytes,
    sc * (geo.clusterSize / QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER) - inCluster,
  );
  if (kind === SubclusterType.Normal) {
    out.hostCluster = offset;
    out.host = offset + inCluster;
  }
}

function subclusterKind(zero: number, alloc: number, sc: number): SubclusterType {
  if ((alloc >>> sc) & 1) return SubclusterType.Normal;
  if ((zero >>> sc) & 1) return SubclusterType.Zero;
  return SubclusterType.Unallocated;
}

function compressed(hi: number, lo: number, clusterBits: number, out: Qcow2Mapping): void {
  // x = 62 - (cluster_bits - 8): bits 0..x-1 the offset, x..61 the sector count.
  const hiOffsetBits = 62 - (clusterBits - 8) - 32;
  const offHi = hi & ((1 << hiOffsetBits) - 1);
  if (offHi >= 0x01000000) return invalid(out, "compressed offset beyond 2^56");
  const host = offHi * 0x100000000 + (lo >>> 0);
  const sectors = ((hi >>> hiOffsetBits) & ((1 << (clusterBits - 8)) - 1)) + 1;
  out.type = SubclusterType.Compressed;
  out.host = host;
  out.compressedBytes = sectors * QCOW2_COMPRESSED_SECTOR_SIZE -
    (host % QCOW2_COMPRESSED_SECTOR_SIZE);
}

function invalid(out: Qcow2Mapping, reason: string): void {
  out.type = SubclusterType.Invalid;
  out.reason = reason;
}
