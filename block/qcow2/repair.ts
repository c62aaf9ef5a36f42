/**
 * Repair of a dirty image at a writable open (QEMU's qcow2_do_open: "Repair
 * image if dirty", qcow2_check with BDRV_FIX_ERRORS | BDRV_FIX_LEAKS): the
 * refcounts left stale by lazy refcounts are rebuilt from the metadata.
 *
 * @module
 */
import type { BlockDriver } from "../block_driver.ts";
import { IoVector } from "../io_vector.ts";
import {
  decodeL1Entry,
  decodeL2Entry,
  Qcow2Mapping,
  SubclusterType,
} from "./cluster_descriptor.ts";
import { QCOW2_INCOMPAT_DIRTY, QCOW_MAX_REFTABLE_SIZE } from "./constants.ts";
import type { Qcow2Header } from "./header.ts";
import { readMetadataAsync } from "./metadata_io.ts";
import { Qcow2Error } from "./qcow2_error.ts";

/** Header extension type of persistent dirty bitmaps (qcow2.txt). */
const QCOW2_EXT_MAGIC_BITMAPS = 0x23852875;

/** Most clusters a repair counts in memory (5 bytes each). */
const MAX_REPAIR_CLUSTERS = 1 << 26;

/** What uses a cluster (for the counts and the messages). */
const enum Use {
  None = 0,
  Header,
  L1,
  RefcountTable,
  RefcountBlock,
  L2,
  Data,
  Compressed,
}

const USE_NAMES = [
  "nothing",
  "the header",
  "the L1 table",
  "the refcount table",
  "a refcount block",
  "an L2 table",
  "a data cluster",
  "compressed data",
];

/** What {@link repairDirtyImage} found and fixed. */
export interface Qcow2RepairResult {
  /** Clusters whose stored refcount was higher than their references (QEMU's leaks). */
  leaksFixed: number;
  /** Clusters whose stored refcount was lower than their references (the lazy part). */
  refcountsFixed: number;
  /** Refcount blocks added (clusters referenced where no block covered them). */
  blocksAdded: number;
  /** The refcount table moved to a larger one at the end of the file. */
  tableMoved: boolean;
  /** Where the image file ends now (past the added blocks and table, if any). */
  fileEnd: number;
}

const hex = (n: number) => `0x${n.toString(16)}`;

function corrupt(what: string): Qcow2Error {
  return new Qcow2Error(
    "Invalid",
    `the dirty image cannot be repaired: ${what} (nothing was written; open it read-only, ` +
      `or inspect it with qemu-img check)`,
  );
}

/**
 * Rebuilds the refcounts of a dirty image (`h.dirty`) before it is opened
 * writable, then clears the dirty bit. Every cluster's true refcount is
 * counted from the header cluster, the L1 table, every L2 table and the
 * clusters its entries reference (data, preallocated zero clusters, every
 * cluster a compressed extent touches), the refcount table and its blocks.
 * A cluster used twice (other than by compressed extents sharing a host
 * cluster), a reference past the end of the file, a malformed entry or a
 * refcount too large for refcount_bits refuse the open with a
 * {@link Qcow2Error} (kind Invalid) before anything is written. Otherwise
 * every refcount block whose contents differ is rewritten (leaks freed),
 * clusters no block covers get new blocks at the end of the file (and the
 * table moves to a larger one there if it is too small), flush; a moved
 * table is then linked in the header (flush); last the dirty bit is
 * cleared in one header write, flushed. A crash at any point leaves the
 * image dirty, repaired again at the next open. `h` and `head` (the header
 * cluster as read) are updated to what the header now says.
 *
 * The caller has refused what this does not know: internal snapshots,
 * extended L2 entries, 64-bit refcounts. Persistent bitmaps are refused
 * here (their tables hold clusters).
 *
 * @example
 * ```ts ignore
 * if (h.dirty) await repairDirtyImage(child, h, head);
 * ```
 */
export async function repairDirtyImage(
  child: BlockDriver,
  h: Qcow2Header,
  head: Uint8Array,
): Promise<Qcow2RepairResult> {
  const cs = h.clusterSize;
  const fileLength = child.length;
  const nFile = Math.ceil(fileLength / cs);
  if (hasBitmaps(h, head)) {
    throw new Qcow2Error(
      "Unsupported",
      "repairing a dirty image with persistent bitmaps is not supported " +
        "(open it read-only, or repair it with qemu-img check -r all)",
    );
  }
  if (nFile + 3 > MAX_REPAIR_CLUSTERS) {
    throw new Qcow2Error("Unsupported", `repairing a dirty image of ${nFile} clusters`);
  }
  // A compressed extent may end up to two clusters past the last one.
  const refs = new Uint32Array(nFile + 3);
  const use = new Uint8Array(nFile + 3);
  const maxRef = h.refcountOrder >= 5 ? 0xffffffff : (1 << (1 << h.refcountOrder)) - 1;

  const count = (off: number, len: number, kind: Use) => {
    const first = Math.floor(off / cs), last = Math.floor((off + len - 1) / cs);
    if (first >= nFile || (kind !== Use.Compressed && last >= nFile)) {
      throw corrupt(
        `${USE_NAMES[kind]} at ${hex(off)} lies past the end of the file (${fileLength} bytes)`,
      );
    }
    for (let c = first; c <= last; c++) {
      const prev = use[c] as Use;
      if (prev !== Use.None && (prev !== Use.Compressed || kind !== Use.Compressed)) {
        throw corrupt(
          `cluster ${hex(c * cs)} is used both by ${USE_NAMES[prev]} and by ${USE_NAMES[kind]}`,
        );
      }
      use[c] = kind;
      if (++refs[c] > maxRef) {
        throw corrupt(`cluster ${hex(c * cs)} needs refcount ${refs[c]} (> refcount_bits allow)`);
      }
    }
  };

  // Fixed metadata.
  count(0, cs, Use.Header);
  if (h.l1Size > 0) count(h.l1TableOffset, h.l1Size * 8, Use.L1);
  const tableBytes = h.refcountTableClusters * cs;
  count(h.refcountTableOffset, tableBytes, Use.RefcountTable);
  const reftable = await readMetadataAsync(
    child,
    h.refcountTableOffset,
    tableBytes,
    "refcount table",
  );
  const rdv = new DataView(reftable.buffer, reftable.byteOffset, reftable.byteLength);
  const oldEntries = tableBytes / 8;
  /** Refcount block index -> its offset (existing blocks). */
  const blocks = new Map<number, number>();
  for (let k = 0; k < oldEntries; k++) {
    const hi = rdv.getUint32(k * 8), lo = rdv.getUint32(k * 8 + 4);
    if (hi === 0 && lo === 0) continue;
    const off = hi * 0x100000000 + lo;
    if ((lo & 0x1ff) !== 0 || hi >= 0x01000000 || off % cs !== 0) {
      throw corrupt(`refcount table entry ${k} (${hex(off)}) is malformed or misaligned`);
    }
    count(off, cs, Use.RefcountBlock);
    blocks.set(k, off);
  }

  // The L1 table, every L2 table and what its entries reference.
  if (h.l1Size > 0) {
    const l1 = await readMetadataAsync(child, h.l1TableOffset, h.l1Size * 8, "L1 table");
    const l1dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    const geo = {
      clusterBits: h.clusterBits,
      clusterSize: cs,
      extendedL2: h.extendedL2,
      version: h.version,
    };
    const m = new Qcow2Mapping();
    for (let i = 0; i < h.l1Size; i++) {
      const l2Off = decodeL1Entry(l1dv, i, cs);
      if (l2Off < 0) throw corrupt(`L1 entry ${i} has reserved bits set or is misaligned`);
      if (l2Off === 0) continue;
      count(l2Off, cs, Use.L2);
      const l2 = await readMetadataAsync(child, l2Off, cs, "L2 table");
      const l2dv = new DataView(l2.buffer, l2.byteOffset, l2.byteLength);
      for (let j = 0; j < h.l2Entries; j++) {
        decodeL2Entry(l2dv, j, 0, cs, geo, m);
        const guest = (i * h.l2Entries + j) * cs;
        if (m.type === SubclusterType.Invalid) {
          throw corrupt(`the L2 entry for guest offset ${hex(guest)} is invalid (${m.reason})`);
        }
        if (m.type === SubclusterType.Compressed) count(m.host, m.compressedBytes, Use.Compressed);
        else if (m.hostCluster > 0) count(m.hostCluster, cs, Use.Data);
      }
    }
  }

  // Clusters no block covers get new blocks in an area at the end of the
  // file (after every counted cluster); a table too small for them moves
  // there too, after the blocks (QEMU's rebuild places them likewise).
  const per = (cs * 8) >> h.refcountOrder;
  let lastUsed = 0;
  for (let c = refs.length - 1; c >= 0; c--) {
    if (refs[c] > 0) {
      lastUsed = c;
      break;
    }
  }
  const areaStart = Math.max(nFile, lastUsed + 1);
  const needed = new Set<number>();
  for (let c = 0; c < refs.length; c++) if (refs[c] > 0) needed.add(Math.floor(c / per));
  const added: number[] = []; // block indexes, placed at areaStart + i
  let newTableClusters = 0; // 0: the table stays
  for (;;) {
    const areaEnd = areaStart + added.length + newTableClusters;
    const want = new Set(needed);
    for (let c = areaStart; c < areaEnd; c++) want.add(Math.floor(c / per));
    let changed = false;
    let maxK = 0;
    for (const k of want) {
      maxK = Math.max(maxK, k);
      if (!blocks.has(k) && !added.includes(k)) {
        added.push(k);
        changed = true;
      }
    }
    if (maxK >= oldEntries) {
      const clusters = Math.ceil(Math.max(2 * oldEntries, maxK + 1) * 8 / cs);
      if (clusters > newTableClusters) {
        newTableClusters = clusters;
        changed = true;
      }
    }
    if (!changed) break;
  }
  if (newTableClusters * cs > QCOW_MAX_REFTABLE_SIZE) {
    throw new Qcow2Error("Unsupported", "the repaired refcount table would exceed 8 MiB");
  }
  const tableMoved = newTableClusters > 0;
  const areaEnd = areaStart + added.length + newTableClusters;
  const refOf = (c: number): number => {
    if (c >= areaStart && c < areaEnd) return 1;
    if (c >= refs.length) return 0;
    // The old table is freed when a new one replaces it.
    if (tableMoved && use[c] === Use.RefcountTable) return 0;
    return refs[c];
  };

  // Blocks with their true contents; existing ones compared with the disk.
  const writes: [number, Uint8Array][] = [];
  let leaksFixed = 0, refcountsFixed = 0;
  // Past `limit` every true refcount is 0: only stored ones need a look.
  const limit = Math.max(refs.length, areaEnd);
  for (const [k, off] of blocks) {
    const old = await readMetadataAsync(child, off, cs, "refcount block");
    const block = new Uint8Array(cs);
    const slots = Math.max(0, Math.min(per, limit - k * per));
    for (let s = 0; s < per; s++) {
      if (s >= slots && old[Math.floor((s << h.refcountOrder) / 8)] === 0) continue;
      const want = s < slots ? refOf(k * per + s) : 0;
      const had = getRefcount(old, s, h.refcountOrder);
      if (want < had) leaksFixed++;
      else if (want > had) refcountsFixed++;
      if (want > 0) setRefcount(block, s, h.refcountOrder, want);
    }
    if (block.some((b, i) => b !== old[i])) writes.push([off, block]);
  }
  const table = tableMoved ? new Uint8Array(newTableClusters * cs) : reftable;
  if (tableMoved) table.set(reftable);
  const tdv = new DataView(table.buffer, table.byteOffset, table.byteLength);
  for (let i = 0; i < added.length; i++) {
    const k = added[i], off = (areaStart + i) * cs;
    const block = new Uint8Array(cs);
    for (let s = 0; s < per; s++) {
      const v = refOf(k * per + s);
      if (v > 0 && !(k * per + s >= areaStart && k * per + s < areaEnd)) refcountsFixed++;
      setRefcount(block, s, h.refcountOrder, v);
    }
    writes.push([off, block]);
    tdv.setUint32(k * 8, Math.floor(off / 0x100000000));
    tdv.setUint32(k * 8 + 4, off >>> 0);
  }
  const tableOff = tableMoved ? (areaStart + added.length) * cs : h.refcountTableOffset;
  if (added.length > 0) writes.push([tableOff, table]);

  // Nothing was written so far: from here on the image changes.
  await Promise.all(writes.map(([off, buf]) => pwrite(child, off, buf)));
  await flush(child);
  const hdv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (tableMoved) {
    const hdr = new Uint8Array(12), dv = new DataView(hdr.buffer);
    dv.setUint32(0, Math.floor(tableOff / 0x100000000));
    dv.setUint32(4, tableOff >>> 0);
    dv.setUint32(8, newTableClusters);
    // refcount_table_offset (48) and refcount_table_clusters (56): one sector.
    await pwrite(child, 48, hdr);
    await flush(child);
    head.set(hdr, 48);
    h.refcountTableOffset = tableOff;
    h.refcountTableClusters = newTableClusters;
  }
  const bits = (h.incompatibleFeatures & ~QCOW2_INCOMPAT_DIRTY) >>> 0;
  const inc = new Uint8Array(8);
  new DataView(inc.buffer).setUint32(4, bits);
  await pwrite(child, 72, inc);
  await flush(child);
  hdv.setUint32(72, 0);
  hdv.setUint32(76, bits);
  h.incompatibleFeatures = bits;
  h.dirty = false;
  return {
    leaksFixed,
    refcountsFixed,
    blocksAdded: added.length,
    tableMoved,
    fileEnd: added.length > 0 ? areaEnd * cs : fileLength,
  };
}

/** Whether the header extensions (version 3) include persistent bitmaps. */
function hasBitmaps(h: Qcow2Header, head: Uint8Array): boolean {
  if (h.version < 3) return false;
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  let at = h.headerLength;
  while (at + 8 <= head.length) {
    const type = dv.getUint32(at), len = dv.getUint32(at + 4);
    if (type === 0) return false;
    if (type === QCOW2_EXT_MAGIC_BITMAPS) return true;
    at += 8 + Math.ceil(len / 8) * 8;
  }
  return false;
}

function getRefcount(block: Uint8Array, slot: number, order: number): number {
  if (order < 3) {
    const bits = 1 << order;
    return (block[Math.floor((slot * bits) / 8)] >> ((slot * bits) % 8)) & ((1 << bits) - 1);
  }
  const n = 1 << (order - 3);
  let v = 0;
  for (let i = 0; i < n; i++) v = v * 256 + block[slot * n + i];
  return v;
}

function setRefcount(block: Uint8Array, slot: number, order: number, value: number): void {
  if (order < 3) {
    const bits = 1 << order, at = Math.floor((slot * bits) / 8), bit = (slot * bits) % 8;
    const mask = ((1 << bits) - 1) << bit;
    block[at] = (block[at] & ~mask) | ((value << bit) & mask);
    return;
  }
  const n = 1 << (order - 3);
  for (let i = n - 1; i >= 0; i--) {
    block[slot * n + i] = value & 0xff;
    value = Math.floor(value / 256);
  }
}

function pwrite(child: BlockDriver, off: number, buf: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) =>
    child.pwritev(off, IoVector.fromBuffers([buf]), (ret) => {
      if (ret < 0) reject(new Qcow2Error("Io", `repair: writing at ${hex(off)} failed (${ret})`));
      else resolve();
    })
  );
}

function flush(child: BlockDriver): Promise<void> {
  return new Promise((resolve, reject) =>
    child.flush((ret) => {
      if (ret < 0) reject(new Qcow2Error("Io", `repair: flush failed (${ret})`));
      else resolve();
    })
  );
}
