import { EIO, ENOSPC } from "../../sys/mod.ts";
import type { BlockDriver } from "../block_driver.ts";
import { IoVector } from "../io_vector.ts";
import { readMetadata } from "./metadata_io.ts";

/** Geometry {@link Qcow2Refcounts} needs. */
export interface RefcountGeometry {
  clusterSize: number;
  refcountOrder: number;
  refcountTableOffset: number;
}

/**
 * The refcount table and blocks of a writable image, and the cluster
 * allocator (QEMU's qcow2-refcount.c, reduced): clusters are allocated at the
 * end of the image file, one at a time, and skipped if their refcount is not
 * 0. Setting a refcount writes the 512-byte sector of the refcount block that
 * holds it before the caller may reference the cluster. A range without a
 * refcount block gets a new block placed on the first cluster of the free
 * range, counting itself; the block is written and flushed before the
 * refcount table entry that points at it. A full refcount table is not grown
 * yet: allocation fails with -ENOSPC.
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
  readonly #reftable: DataView;
  readonly #reftableBytes: Uint8Array;
  readonly #blocks = new Map<number, Uint8Array>();
  readonly #perBlock: number;
  readonly #onNewBlock: (off: number) => void;
  readonly #blockOk: (off: number) => boolean;
  #end: number;

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
  ) {
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

  /** Allocates one cluster with refcount 1; `cb(0, offset)` or `cb(-errno, 0)`. */
  allocate(cb: (ret: number, offset: number) => void): void {
    const cs = this.#geo.clusterSize;
    const c = this.#end;
    const index = c / cs;
    const rt = Math.floor(index / this.#perBlock);
    if (rt * 8 >= this.#reftableBytes.length) return cb(-ENOSPC, 0);
    const hi = this.#reftable.getUint32(rt * 8), lo = this.#reftable.getUint32(rt * 8 + 4);
    if ((lo & 0x1ff) !== 0 || hi >= 0x200000) return cb(-EIO, 0);
    const blockOff = hi * 0x100000000 + lo;
    const slot = index % this.#perBlock;
    if (blockOff === 0) return this.#newBlock(c, rt, slot, cb);
    if (!this.#blockOk(blockOff)) return cb(-EIO, 0);
    this.#block(blockOff, (ret, block) => {
      if (ret < 0 || block === null) return cb(ret < 0 ? ret : -EIO, 0);
      if (this.#get(block, slot) !== 0) {
        // Leaked or in use past the end: skip it.
        this.#end = c + cs;
        return this.allocate(cb);
      }
      this.#end = c + cs;
      this.#set(block, slot, 1);
      this.#writeSector(blockOff, block, this.#byteOf(slot), (r) => cb(r, r < 0 ? 0 : c));
    });
  }

  /**
   * Frees cluster `off` (refcount 1 -> 0; the caller has already removed
   * every reference to it, so a crash before this write only leaks it).
   * Freed clusters are not allocated again (allocation is at the end).
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
      this.#writeSector(blockOff, block, this.#byteOf(slot), cb);
    });
  }

  /** A new refcount block at `c`, covering itself, then the table entry for it. */
  #newBlock(c: number, rt: number, slot: number, cb: (ret: number, offset: number) => void): void {
    const cs = this.#geo.clusterSize;
    const block = new Uint8Array(cs);
    this.#set(block, slot, 1);
    this.#end = c + cs;
    this.#child.pwritev(c, IoVector.fromBuffers([block]), (ret) => {
      if (ret < 0) return cb(ret, 0);
      this.#child.flush((fr) => {
        if (fr < 0) return cb(fr, 0);
        this.#reftable.setUint32(rt * 8, Math.floor(c / 0x100000000));
        this.#reftable.setUint32(rt * 8 + 4, c >>> 0);
        this.#blocks.set(c, block);
        this.#onNewBlock(c);
        this.#writeSector(this.#geo.refcountTableOffset, this.#reftableBytes, rt * 8, (wr) => {
          if (wr < 0) return cb(wr, 0);
          this.allocate(cb);
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
): void {
  const start = at - (at % 512);
  const end = Math.min(start + 512, table.length);
  const copy = table.slice(start, end);
  child.pwritev(tableOff + start, IoVector.fromBuffers([copy]), cb);
}
