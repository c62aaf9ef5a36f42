import { EIO, ENOSPC } from "../../sys/mod.ts";
import type { BlockDriver } from "../block_driver.ts";
import { IoVector } from "../io_vector.ts";
import { readMetadata } from "./metadata_io.ts";

/** What {@link Qcow2Refcounts.allocate} calls back with. */
export type AllocCallback = (ret: number, offset: number, fresh: boolean) => void;

/** Geometry {@link Qcow2Refcounts} needs. */
export interface RefcountGeometry {
  clusterSize: number;
  refcountOrder: number;
  /** Updated in place when the table grows (the driver's header object). */
  refcountTableOffset: number;
  refcountTableClusters: number;
}

/**
 * The refcount table and blocks of a writable image, and the cluster
 * allocator (QEMU's qcow2-refcount.c, reduced): the first cluster with
 * refcount 0 at or after a free-cluster hint is taken (QEMU's
 * alloc_clusters_noref and free_cluster_index: the hint starts at 0, moves
 * past each cluster taken and back to each cluster freed), so clusters freed
 * by discard are used again; a cluster `usable` refuses (known metadata) is
 * never taken. Setting a refcount writes the 512-byte sector of the refcount
 * block that holds it before the caller may reference the cluster (or, while
 * {@link deferWrites} is on, marks the sector dirty for {@link writeDirty}:
 * a batch of allocations writes each sector once). A range without a
 * refcount block gets a new block placed on the first cluster of the free
 * range, counting itself; the block is written and flushed before the
 * refcount table entry that points at it. A full refcount table is grown
 * (see {@link Qcow2Refcounts.allocate}).
 *
 * Not thread-safe and not re-entrant: the driver runs one allocation at a
 * time.
 *
 * @example
 * ```ts ignore
 * refcounts.allocate((ret, off) => { if (ret === 0) console.log("new cluster at", off); });
 * ```
 */
export class Qcow2Refcounts {
  readonly #child: BlockDriver;
  readonly #geo: RefcountGeometry;
  #reftable: DataView;
  #reftableBytes: Uint8Array;
  readonly #blocks = new Map<number, Uint8Array>();
  readonly #perBlock: number;
  readonly #onNewBlock: (off: number) => void;
  readonly #blockOk: (off: number) => boolean;
  readonly #usable: (off: number) => boolean;
  /** Told when the refcount table has moved (after the header points at it). */
  onTableMoved: (offset: number, clusters: number) => void = () => {};
  #end: number;
  /** Where the search for a free cluster starts (byte offset). */
  #hint = 0;
  /** Refcount block sectors changed but not written yet (block offset -> sector starts). */
  readonly #dirty = new Map<number, Set<number>>();
  readonly #waiting: AllocCallback[] = [];
  /** Mark sectors dirty instead of writing them at once. */
  deferWrites = false;

  /**
   * `reftable`: the table as read at open (kept and updated in memory);
   * `fileLength`: the image file's length; `onNewBlock`: told of every
   * refcount block created (metadata overlap checks); `blockOk`: whether a
   * refcount table entry may point there (inside the file, not on other
   * metadata): a bad entry fails the allocation with -EIO, so nothing is
   * ever read or written where it points.
   */
  constructor(
    child: BlockDriver,
    geo: RefcountGeometry,
    reftable: Uint8Array,
    fileLength: number,
    onNewBlock: (off: number) => void,
    blockOk: (off: number) => boolean,
    usable: (off: number) => boolean = () => true,
  ) {
    this.#usable = usable;
    this.#child = child;
    this.#geo = geo;
    this.#reftableBytes = reftable;
    this.#reftable = new DataView(reftable.buffer, reftable.byteOffset, reftable.byteLength);
    this.#perBlock = (geo.clusterSize * 8) >> geo.refcountOrder;
    this.#end = Math.ceil(fileLength / geo.clusterSize) * geo.clusterSize;
    this.#onNewBlock = onNewBlock;
    this.#blockOk = blockOk;
  }

  /** First byte past every cluster allocated so far (the file's end, cluster aligned). */
  get end(): number {
    return this.#end;
  }

  /**
   * Allocates one cluster with refcount 1: the first free one from the
   * hint on; `cb(0, offset, fresh)` or `cb(-errno, 0, false)`. `fresh`: the
   * cluster lies past every cluster allocated before (past the file's end
   * at open), so nothing was ever written there.
   */
  allocate(cb: AllocCallback): void {
    // One at a time: a search may wait for a refcount block read.
    this.#waiting.push(cb);
    if (this.#waiting.length === 1) this.#allocNext();
  }

  #allocNext(): void {
    const cb = this.#waiting[0];
    this.#allocFrom(this.#hint, (ret, off, fresh) => {
      this.#waiting.shift();
      if (this.#waiting.length > 0) this.#allocNext();
      cb(ret, off, fresh);
    });
  }

  #allocFrom(c: number, cb: AllocCallback): void {
    const cs = this.#geo.clusterSize;
    for (;;) {
      const index = c / cs;
      const rt = Math.floor(index / this.#perBlock);
      if (rt * 8 >= this.#reftableBytes.length) return this.#tableFull(c, cb);
      const hi = this.#reftable.getUint32(rt * 8), lo = this.#reftable.getUint32(rt * 8 + 4);
      if ((lo & 0x1ff) !== 0 || hi >= 0x200000) return cb(-EIO, 0, false);
      const blockOff = hi * 0x100000000 + lo;
      const slot = index % this.#perBlock;
      if (blockOff === 0) {
        if (!this.#usable(c)) {
          c += cs;
          continue;
        }
        return this.#newBlock(c, rt, slot, cb);
      }
      if (!this.#blockOk(blockOff)) return cb(-EIO, 0, false);
      const block = this.#blocks.get(blockOff);
      if (block === undefined) {
        return this.#block(blockOff, (ret) => {
          if (ret < 0) return cb(ret, 0, false);
          this.#allocFrom(c, cb);
        });
      }
      if (this.#get(block, slot) !== 0 || !this.#usable(c)) {
        c += cs; // in use (or leaked, or metadata): skip it
        continue;
      }
      this.#hint = c + cs;
      const fresh = c >= this.#end;
      if (c + cs > this.#end) this.#end = c + cs;
      this.#set(block, slot, 1);
      return this.#changed(
        blockOff,
        block,
        this.#byteOf(slot),
        (r) => cb(r, r < 0 ? 0 : c, r === 0 && fresh),
      );
    }
  }

  /**
   * The refcount table has no entry for cluster `c`: grow it (QEMU's
   * qcow2_refcount_area). A new area at `c` (or the end of the file) holds
   * the refcount blocks that describe the area itself, then a table twice
   * as large (at least) with the old entries and the new blocks'. Crash-safe
   * order: blocks and table written and flushed while nothing points at
   * them; then the header's refcount_table_offset and _clusters in one
   * sector write, flushed; only then are the old table's clusters freed (a
   * crash before that leaks them).
   */
  #tableFull(c: number, cb: AllocCallback): void {
    const g = this.#geo, cs = g.clusterSize, per = this.#perBlock;
    const oldEntries = this.#reftableBytes.length / 8;
    const a = Math.max(c, this.#end) / cs;
    const k0 = Math.floor(a / per);
    let blocks = 1, tableClusters = 0;
    for (;;) {
      const entries = Math.max(2 * oldEntries, k0 + blocks + 1);
      tableClusters = Math.ceil((entries * 8) / cs);
      const need = Math.floor((a + blocks + tableClusters - 1) / per) - k0 + 1;
      if (need <= blocks) break;
      blocks = need;
    }
    const tableOff = (a + blocks) * cs, areaEnd = a + blocks + tableClusters;
    if (tableClusters * cs > 8 << 20 || areaEnd * cs > Number.MAX_SAFE_INTEGER) {
      return cb(-ENOSPC, 0, false);
    }
    const table = new Uint8Array(tableClusters * cs);
    table.set(this.#reftableBytes);
    const tdv = new DataView(table.buffer);
    const newBlocks: Uint8Array[] = [];
    for (let i = 0; i < blocks; i++) {
      const block = new Uint8Array(cs);
      for (let x = Math.max(a, (k0 + i) * per); x < Math.min(areaEnd, (k0 + i + 1) * per); x++) {
        this.#set(block, x % per, 1);
      }
      newBlocks.push(block);
      const off = (a + i) * cs;
      tdv.setUint32((k0 + i) * 8, Math.floor(off / 0x100000000));
      tdv.setUint32((k0 + i) * 8 + 4, off >>> 0);
    }
    let pending = blocks + 1, err = 0;
    const written = (r: number) => {
      if (r < 0 && err === 0) err = r;
      if (--pending > 0) return;
      if (err < 0) return cb(err, 0, false);
      this.#child.flush((fr) => {
        if (fr < 0) return cb(fr, 0, false);
        const hdr = new Uint8Array(12), hdv = new DataView(hdr.buffer);
        hdv.setUint32(0, Math.floor(tableOff / 0x100000000));
        hdv.setUint32(4, tableOff >>> 0);
        hdv.setUint32(8, tableClusters);
        // refcount_table_offset (48) and refcount_table_clusters (56): one sector.
        this.#child.pwritev(48, IoVector.fromBuffers([hdr]), (hr) => {
          if (hr < 0) return cb(hr, 0, false);
          this.#child.flush((hf) => {
            if (hf < 0) return cb(hf, 0, false);
            const oldOff = g.refcountTableOffset, oldClusters = g.refcountTableClusters;
            this.#reftableBytes = table;
            this.#reftable = tdv;
            g.refcountTableOffset = tableOff;
            g.refcountTableClusters = tableClusters;
            for (let i = 0; i < blocks; i++) {
              this.#blocks.set((a + i) * cs, newBlocks[i]);
              this.#onNewBlock((a + i) * cs);
            }
            if (areaEnd * cs > this.#end) this.#end = areaEnd * cs;
            this.onTableMoved(tableOff, tableClusters);
            this.#freeAll(oldOff, oldClusters, (fr2) => {
              if (fr2 < 0) return cb(fr2, 0, false);
              this.#allocFrom(this.#hint, cb);
            });
          });
        });
      });
    };
    for (let i = 0; i < blocks; i++) {
      this.#child.pwritev((a + i) * cs, IoVector.fromBuffers([newBlocks[i]]), written);
    }
    this.#child.pwritev(tableOff, IoVector.fromBuffers([table]), written);
  }

  /** Frees `n` clusters from `off` one after the other. */
  #freeAll(off: number, n: number, cb: (ret: number) => void): void {
    if (n === 0) return cb(0);
    this.free(off, (r) => r < 0 ? cb(r) : this.#freeAll(off + this.#geo.clusterSize, n - 1, cb));
  }

  /** A refcount changed: write its sector now, or mark it dirty (deferWrites). */
  #changed(blockOff: number, block: Uint8Array, at: number, cb: (ret: number) => void): void {
    if (!this.deferWrites) return this.#writeSector(blockOff, block, at, cb);
    let set = this.#dirty.get(blockOff);
    if (set === undefined) this.#dirty.set(blockOff, set = new Set());
    set.add(at - (at % 512));
    cb(0);
  }

  /** Whether some refcount block sector waits for {@link writeDirty}. */
  get dirty(): boolean {
    return this.#dirty.size > 0;
  }

  /** Writes every dirty refcount block sector once (after a batch of allocations). */
  writeDirty(cb: (ret: number) => void): void {
    let pending = 1, err = 0;
    const done = (r: number) => {
      if (r < 0 && err === 0) err = r;
      if (--pending === 0) cb(err);
    };
    // Whole units of the file's request alignment: no read-modify-write.
    const unit = Math.min(Math.max(512, this.#child.requestAlignment), this.#geo.clusterSize);
    for (const [blockOff, sectors] of this.#dirty) {
      const block = this.#blocks.get(blockOff)!;
      for (const at of new Set([...sectors].map((a) => a - (a % unit)))) {
        pending++;
        writeTableSector(this.#child, blockOff, block, at, done, unit);
      }
    }
    this.#dirty.clear();
    done(0);
  }

  /**
   * Frees cluster `off` (refcount 1 -> 0; the caller has already removed
   * every reference to it and made that durable, so a crash before this
   * write only leaks it). The hint moves back to it: it is used again.
   */
  free(off: number, cb: (ret: number) => void): void {
    const cs = this.#geo.clusterSize;
    const index = off / cs;
    const rt = Math.floor(index / this.#perBlock);
    if (rt * 8 >= this.#reftableBytes.length) return cb(-EIO);
    const hi = this.#reftable.getUint32(rt * 8), lo = this.#reftable.getUint32(rt * 8 + 4);
    const blockOff = hi * 0x100000000 + (lo >>> 0);
    if (blockOff === 0 || (lo & 0x1ff) !== 0 || !this.#blockOk(blockOff)) return cb(-EIO);
    this.#block(blockOff, (ret, block) => {
      if (ret < 0 || block === null) return cb(ret < 0 ? ret : -EIO);
      const slot = index % this.#perBlock;
      if (this.#get(block, slot) !== 1) return cb(0); // shared or already free: keep it
      this.#set(block, slot, 0);
      if (off < this.#hint) this.#hint = off;
      this.#changed(blockOff, block, this.#byteOf(slot), cb);
    });
  }

  /** A new refcount block at `c`, covering itself, then the table entry for it. */
  #newBlock(c: number, rt: number, slot: number, cb: AllocCallback): void {
    const cs = this.#geo.clusterSize;
    const block = new Uint8Array(cs);
    this.#set(block, slot, 1);
    if (c + cs > this.#end) this.#end = c + cs;
    this.#hint = c + cs;
    this.#child.pwritev(c, IoVector.fromBuffers([block]), (ret) => {
      if (ret < 0) return cb(ret, 0, false);
      this.#child.flush((fr) => {
        if (fr < 0) return cb(fr, 0, false);
        this.#reftable.setUint32(rt * 8, Math.floor(c / 0x100000000));
        this.#reftable.setUint32(rt * 8 + 4, c >>> 0);
        this.#blocks.set(c, block);
        this.#onNewBlock(c);
        this.#writeSector(this.#geo.refcountTableOffset, this.#reftableBytes, rt * 8, (wr) => {
          if (wr < 0) return cb(wr, 0, false);
          this.#allocFrom(c + cs, cb);
        });
      });
    });
  }

  #block(off: number, cb: (ret: number, block: Uint8Array | null) => void): void {
    const b = this.#blocks.get(off);
    if (b !== undefined) return cb(0, b);
    readMetadata(this.#child, off, this.#geo.clusterSize, (ret, buf) => {
      if (ret === 0 && buf !== null) this.#blocks.set(off, buf);
      cb(ret, buf);
    });
  }

  #byteOf(slot: number): number {
    return Math.floor((slot << this.#geo.refcountOrder) / 8);
  }

  #get(block: Uint8Array, slot: number): number {
    const order = this.#geo.refcountOrder;
    if (order < 3) {
      const bits = 1 << order, bit = (slot * bits) % 8;
      return (block[this.#byteOf(slot)] >> bit) & ((1 << bits) - 1);
    }
    const n = 1 << (order - 3);
    let v = 0;
    for (let i = 0; i < n; i++) v = v * 256 + block[slot * n + i];
    return v;
  }

  #set(block: Uint8Array, slot: number, value: number): void {
    const order = this.#geo.refcountOrder;
    if (order < 3) {
      const bits = 1 << order, bit = (slot * bits) % 8, mask = ((1 << bits) - 1) << bit;
      const at = this.#byteOf(slot);
      block[at] = (block[at] & ~mask) | ((value << bit) & mask);
      return;
    }
    const n = 1 << (order - 3);
    for (let i = n - 1; i >= 0; i--) {
      block[slot * n + i] = value & 0xff;
      value = Math.floor(value / 256);
    }
  }

  /** Writes the 512-byte sector of `table` (at `tableOff` in the file) holding byte `at`. */
  #writeSector(
    tableOff: number,
    table: Uint8Array,
    at: number,
    cb: (ret: number) => void,
  ): void {
    writeTableSector(this.#child, tableOff, table, at, cb);
  }
}

/**
 * Writes the 512-byte sector of an in-memory table (at `tableOff` in the
 * image file) that holds byte `at` of it: how one L1, L2 or refcount entry
 * reaches the disk. A copy is written, so later changes to the table do
 * not race the write.
 *
 * @example
 * ```ts ignore
 * writeTableSector(child, h.l1TableOffset, l1Bytes, index * 8, (ret) => {});
 * ```
 */
export function writeTableSector(
  child: BlockDriver,
  tableOff: number,
  table: Uint8Array,
  at: number,
  cb: (ret: number) => void,
  unit = 512,
): void {
  const start = at - (at % unit);
  const end = Math.min(start + unit, table.length);
  const copy = table.slice(start, end);
  child.pwritev(tableOff + start, IoVector.fromBuffers([copy]), cb);
}
