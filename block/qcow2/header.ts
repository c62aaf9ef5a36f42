import {
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  MIN_EXTENDED_L2_CLUSTER_BITS,
  QCOW2_COMPAT_LAZY_REFCOUNTS,
  QCOW2_COMPRESSION_TYPE_OFFSET,
  QCOW2_COMPRESSION_TYPE_ZLIB,
  QCOW2_COMPRESSION_TYPE_ZSTD,
  QCOW2_EXT_MAGIC_BACKING_FORMAT,
  QCOW2_EXT_MAGIC_DATA_FILE,
  QCOW2_EXT_MAGIC_END,
  QCOW2_EXT_MAGIC_FEATURE_TABLE,
  QCOW2_INCOMPAT_COMPRESSION,
  QCOW2_INCOMPAT_CORRUPT,
  QCOW2_INCOMPAT_DATA_FILE,
  QCOW2_INCOMPAT_DIRTY,
  QCOW2_INCOMPAT_EXTL2,
  QCOW2_INCOMPAT_KNOWN,
  QCOW2_MAX_BACKING_FILE_NAME,
  QCOW2_MAX_BACKING_FORMAT,
  QCOW2_MAX_REFCOUNT_ORDER,
  QCOW2_V2_HEADER_LENGTH,
  QCOW2_V3_HEADER_LENGTH,
  QCOW_CRYPT_NONE,
  QCOW_MAGIC,
  QCOW_MAX_L1_SIZE,
  QCOW_MAX_REFTABLE_SIZE,
  QCOW_MAX_SNAPSHOTS,
} from "./constants.ts";
import { Qcow2Error } from "./qcow2_error.ts";

/**
 * A parsed and validated qcow2 header (qcow2.txt "Header" and "Header
 * extensions"), with the derived geometry the driver needs.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { Qcow2Header } from "./header.ts";
 * function l2Coverage(h: Qcow2Header): number {
 *   return h.clusterSize * h.l2Entries;
 * }
 * assert.equal(typeof l2Coverage, "function");
 * ```
 */
export interface Qcow2Header {
  /** 2 or 3. */
  version: number;
  clusterBits: number;
  clusterSize: number;
  /** Virtual disk size in bytes. */
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** incompatible_features (every known bit is in the low 32). */
  incompatibleFeatures: number;
  /** compatible_features, low 32 bits. */
  compatibleFeatures: number;
  /** autoclear_features, low 32 bits. */
  autoclearFeatures: number;
  /** refcount_bits = 1 << refcountOrder. */
  refcountOrder: number;
  headerLength: number;
  /** 0 zlib, 1 zstd. */
  compressionType: number;
  /** Backing file name as stored (null: none). */
  backingFile: string | null;
  /** From the backing format extension (null: not recorded). */
  backingFormat: string | null;
  /** Incompatible bit 4: 128-bit L2 entries with 32 subclusters. */
  extendedL2: boolean;
  /** Incompatible bit 0. */
  dirty: boolean;
  /** Incompatible bit 1. */
  corrupt: boolean;
  /** Compatible bit 0. */
  lazyRefcounts: boolean;
  /** Entries per L2 table (cluster_size / 8, or / 16 with extended L2). */
  l2Entries: number;
  /** Bytes of one L2 entry (8 or 16). */
  l2EntrySize: number;
  /** Feature names from the feature name table, keyed "type:bit". */
  featureNames: Map<string, string>;
}

/** Bytes {@link parseQcow2Header} needs to see the cluster size. */
export const QCOW2_HEADER_PROBE_BYTES = 4096;

/**
 * Parses and validates the header in `buf` (the image's first cluster, or as
 * much of it as the file has) against a file of `fileLength` bytes. Throws
 * {@link Qcow2Error}: never anything else, whatever the bytes. Checks every
 * field QEMU's qcow2_do_open checks (cluster size, header length, refcount
 * order, feature bits, L1 size against the virtual size, table alignment and
 * limits) and also that the L1 and refcount tables lie inside the file, do
 * not overlap the header cluster or each other.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseQcow2Header } from "./header.ts";
 * assert.throws(() => parseQcow2Header(new Uint8Array(512), 512), /not a qcow2 image/);
 * ```
 */
export function parseQcow2Header(buf: Uint8Array, fileLength: number): Qcow2Header {
  if (buf.length < QCOW2_V2_HEADER_LENGTH || fileLength < QCOW2_V2_HEADER_LENGTH) {
    throw new Qcow2Error("BadMagic", "not a qcow2 image (shorter than a header)");
  }
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (dv.getUint32(0) !== QCOW_MAGIC) throw new Qcow2Error("BadMagic", "not a qcow2 image");
  const version = dv.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new Qcow2Error("Unsupported", `version ${version} (only 2 and 3)`);
  }
  const clusterBits = dv.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new Qcow2Error(
      clusterBits > MAX_CLUSTER_BITS ? "Unsupported" : "Invalid",
      `cluster_bits ${clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`,
    );
  }
  const clusterSize = 2 ** clusterBits;
  const size = u64(dv, 24, "size");
  const cryptMethod = dv.getUint32(32);
  const l1Size = dv.getUint32(36);
  const l1TableOffset = u64(dv, 40, "l1_table_offset");
  const refcountTableOffset = u64(dv, 48, "refcount_table_offset");
  const refcountTableClusters = dv.getUint32(56);
  const nbSnapshots = dv.getUint32(60);
  const snapshotsOffset = u64(dv, 64, "snapshots_offset");
  const backingFileOffset = u64(dv, 8, "backing_file_offset");
  const backingFileSize = dv.getUint32(16);

  let incompatibleFeatures = 0, incompatHigh = 0, compatibleFeatures = 0;
  let autoclearFeatures = 0, refcountOrder = 4, headerLength = QCOW2_V2_HEADER_LENGTH;
  let compressionType = QCOW2_COMPRESSION_TYPE_ZLIB;
  if (version === 3) {
    if (buf.length < QCOW2_V3_HEADER_LENGTH) {
      throw new Qcow2Error("Invalid", "version 3 header is truncated");
    }
    incompatHigh = dv.getUint32(72);
    incompatibleFeatures = dv.getUint32(76);
    compatibleFeatures = dv.getUint32(84);
    autoclearFeatures = dv.getUint32(92);
    refcountOrder = dv.getUint32(96);
    headerLength = dv.getUint32(100);
    if (headerLength < QCOW2_V3_HEADER_LENGTH || headerLength % 8 !== 0) {
      throw new Qcow2Error("Invalid", `header_length ${headerLength} (>= 104, a multiple of 8)`);
    }
    if (headerLength > clusterSize) {
      throw new Qcow2Error("Invalid", `header_length ${headerLength} exceeds the cluster size`);
    }
    if (headerLength > buf.length) throw new Qcow2Error("Invalid", "header is truncated");
    if (headerLength > QCOW2_COMPRESSION_TYPE_OFFSET) {
      compressionType = buf[QCOW2_COMPRESSION_TYPE_OFFSET];
    }
  }
  if (refcountOrder > QCOW2_MAX_REFCOUNT_ORDER) {
    throw new Qcow2Error("Invalid", `refcount_order ${refcountOrder} exceeds 6`);
  }

  // Header extensions end where the backing file name starts, else at the
  // end of the first cluster (QEMU's ext_end).
  let extEnd = Math.min(clusterSize, buf.length);
  if (backingFileOffset !== 0 && backingFileOffset < extEnd) extEnd = backingFileOffset;
  const ext = parseExtensions(buf, dv, headerLength, extEnd);

  const unknown = (incompatibleFeatures & ~QCOW2_INCOMPAT_KNOWN) >>> 0;
  if (unknown !== 0 || incompatHigh !== 0) {
    throw new Qcow2Error(
      "Unsupported",
      `unknown incompatible feature(s): ${
        describeBits(ext.featureNames, unknown, incompatHigh)
      }; refusing to open the image`,
    );
  }
  if (cryptMethod !== QCOW_CRYPT_NONE) {
    throw new Qcow2Error("Unsupported", `encrypted images (crypt_method ${cryptMethod})`);
  }
  if (incompatibleFeatures & QCOW2_INCOMPAT_DATA_FILE || ext.hasDataFile) {
    throw new Qcow2Error("Unsupported", "images with an external data file");
  }
  if (incompatibleFeatures & QCOW2_INCOMPAT_COMPRESSION) {
    if (headerLength <= QCOW2_COMPRESSION_TYPE_OFFSET || compressionType === 0) {
      throw new Qcow2Error("Invalid", "compression type bit set without a compression type");
    }
  } else if (compressionType !== QCOW2_COMPRESSION_TYPE_ZLIB) {
    throw new Qcow2Error("Invalid", "compression_type set without its incompatible bit");
  }
  if (compressionType !== QCOW2_COMPRESSION_TYPE_ZLIB) {
    throw new Qcow2Error(
      "Unsupported",
      compressionType === QCOW2_COMPRESSION_TYPE_ZSTD
        ? "zstd compression (only zlib)"
        : `unknown compression type ${compressionType}`,
    );
  }
  const extendedL2 = (incompatibleFeatures & QCOW2_INCOMPAT_EXTL2) !== 0;
  if (extendedL2 && clusterBits < MIN_EXTENDED_L2_CLUSTER_BITS) {
    throw new Qcow2Error("Invalid", "extended L2 entries need clusters of at least 16 KiB");
  }

  const l2EntrySize = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / l2EntrySize;
  const clusters = Math.ceil(size / clusterSize);
  const neededL1 = Math.ceil(clusters / l2Entries);
  if (l1Size < neededL1) {
    throw new Qcow2Error(
      "Invalid",
      `L1 table has ${l1Size} entries; ${neededL1} are needed for ${size} bytes`,
    );
  }
  if (l1Size * 8 > QCOW_MAX_L1_SIZE) {
    throw new Qcow2Error("Invalid", `L1 table of ${l1Size} entries exceeds 32 MiB`);
  }
  if (l1Size > 0) {
    checkTable("L1 table", l1TableOffset, l1Size * 8, clusterSize, fileLength);
  }
  if (refcountTableClusters === 0) {
    throw new Qcow2Error("Invalid", "image has no refcount table");
  }
  const reftableBytes = refcountTableClusters * clusterSize;
  if (reftableBytes > QCOW_MAX_REFTABLE_SIZE) {
    throw new Qcow2Error("Invalid", `refcount table of ${reftableBytes} bytes exceeds 8 MiB`);
  }
  checkTable("refcount table", refcountTableOffset, reftableBytes, clusterSize, fileLength);
  if (
    l1Size > 0 && l1TableOffset < refcountTableOffset + reftableBytes &&
    refcountTableOffset < l1TableOffset + l1Size * 8
  ) {
    throw new Qcow2Error("Invalid", "L1 table overlaps the refcount table");
  }
  if (nbSnapshots > QCOW_MAX_SNAPSHOTS) {
    throw new Qcow2Error("Invalid", `${nbSnapshots} snapshots exceed ${QCOW_MAX_SNAPSHOTS}`);
  }
  if (nbSnapshots > 0) checkTable("snapshot table", snapshotsOffset, 1, clusterSize, fileLength);

  let backingFile: string | null = null;
  if (backingFileOffset !== 0 && backingFileSize !== 0) {
    if (backingFileSize > QCOW2_MAX_BACKING_FILE_NAME) {
      throw new Qcow2Error("Invalid", `backing file name of ${backingFileSize} bytes`);
    }
    const end = backingFileOffset + backingFileSize;
    if (end > clusterSize || end > buf.length) {
      throw new Qcow2Error("Invalid", "backing file name lies outside the first cluster");
    }
    if (backingFileOffset < headerLength) {
      throw new Qcow2Error("Invalid", "backing file name overlaps the header");
    }
    backingFile = decodeName("backing file name", buf.subarray(backingFileOffset, end));
  }

  return {
    version,
    clusterBits,
    clusterSize,
    size,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    backingFile,
    backingFormat: ext.backingFormat,
    extendedL2,
    dirty: (incompatibleFeatures & QCOW2_INCOMPAT_DIRTY) !== 0,
    corrupt: (incompatibleFeatures & QCOW2_INCOMPAT_CORRUPT) !== 0,
    lazyRefcounts: (compatibleFeatures & QCOW2_COMPAT_LAZY_REFCOUNTS) !== 0,
    l2Entries,
    l2EntrySize,
    featureNames: ext.featureNames,
  };
}

interface Extensions {
  backingFormat: string | null;
  hasDataFile: boolean;
  featureNames: Map<string, string>;
}

function parseExtensions(buf: Uint8Array, dv: DataView, start: number, end: number): Extensions {
  const out: Extensions = { backingFormat: null, hasDataFile: false, featureNames: new Map() };
  const seen = new Set<number>();
  let off = start;
  while (off + 8 <= end) {
    const type = dv.getUint32(off), len = dv.getUint32(off + 4);
    if (type === QCOW2_EXT_MAGIC_END) return out;
    const data = off + 8;
    if (len > end - data) {
      throw new Qcow2Error("Invalid", `header extension 0x${type.toString(16)} overflows`);
    }
    if (seen.has(type)) {
      throw new Qcow2Error("Invalid", `header extension 0x${type.toString(16)} appears twice`);
    }
    seen.add(type);
    if (type === QCOW2_EXT_MAGIC_BACKING_FORMAT) {
      if (len > QCOW2_MAX_BACKING_FORMAT) {
        throw new Qcow2Error("Invalid", `backing format name of ${len} bytes`);
      }
      out.backingFormat = decodeName("backing format", buf.subarray(data, data + len));
    } else if (type === QCOW2_EXT_MAGIC_DATA_FILE) {
      out.hasDataFile = true;
    } else if (type === QCOW2_EXT_MAGIC_FEATURE_TABLE) {
      for (let e = data; e + 48 <= data + len; e += 48) {
        const name = new TextDecoder().decode(buf.subarray(e + 2, e + 48)).replace(/\0.*$/s, "");
        out.featureNames.set(`${buf[e]}:${buf[e + 1]}`, name);
      }
    }
    off = data + Math.ceil(len / 8) * 8;
  }
  return out;
}

/** Reads a u64 that must fit a safe integer (every offset and size does). */
function u64(dv: DataView, off: number, what: string): number {
  const hi = dv.getUint32(off), lo = dv.getUint32(off + 4);
  if (hi >= 0x200000) throw new Qcow2Error("Invalid", `${what} is too large`);
  return hi * 0x100000000 + lo;
}

function checkTable(
  what: string,
  offset: number,
  bytes: number,
  clusterSize: number,
  fileLength: number,
): void {
  if (offset % clusterSize !== 0) {
    throw new Qcow2Error("Invalid", `${what} offset ${offset} is not cluster aligned`);
  }
  if (offset < clusterSize) throw new Qcow2Error("Invalid", `${what} overlaps the header`);
  if (offset + bytes > fileLength) {
    throw new Qcow2Error("Invalid", `${what} at ${offset} (+${bytes}) is past the end of the file`);
  }
}

function decodeName(what: string, bytes: Uint8Array): string {
  let s: string;
  try {
    s = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new Qcow2Error("Invalid", `${what} is not UTF-8`);
  }
  if (s.includes("\0")) throw new Qcow2Error("Invalid", `${what} contains a NUL byte`);
  return s;
}

function describeBits(names: Map<string, string>, lo: number, hi: number): string {
  const parts: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    const set = bit < 32 ? (lo >>> bit) & 1 : (hi >>> (bit - 32)) & 1;
    if (!set) continue;
    const name = names.get(`0:${bit}`);
    parts.push(name ? `bit ${bit} (${name})` : `bit ${bit}`);
  }
  return parts.join(", ");
}
