import { type AioContext, EventNotifier } from "../../aio/mod.ts";
import { addressOf, EIO, EROFS } from "../../sys/mod.ts";
import { IoVector } from "../io_vector.ts";
import type { BlockCompletion, BlockDriver } from "../block_driver.ts";
import {
  decodeL1Entry,
  decodeL2Entry,
  Qcow2Mapping,
  SubclusterType,
} from "./cluster_descriptor.ts";
import { parseQcow2Header, QCOW2_HEADER_PROBE_BYTES, type Qcow2Header } from "./header.ts";
import { MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, QCOW_MAGIC } from "./constants.ts";
import { sliceIoVector, zeroIoVector } from "./iov_range.ts";
import { L2Cache } from "./l2_cache.ts";
import { readMetadata, readMetadataAsync } from "./metadata_io.ts";
import { Qcow2Refcounts, writeTableSector } from "./refcounts.ts";
import { Qcow2Error } from "./qcow2_error.ts";
import { repairDirtyImage } from "./repair.ts";
import { inflateCluster } from "./inflate.ts";
import { type Qcow2AllocMode, type Qcow2ForwardedWrite, Qcow2SharedState } from "./shared_state.ts";

/** Most allocating writes in one {@link AllocationBatch}. */
const MAX_BATCH = 128;

/** Dirty L1/L2 sectors (writeback) that make the driver write its metadata. */
const MAX_DIRTY_SECTORS = 1024;

/** QEMU's DEFAULT_L2_CACHE_MAX_SIZE: the default cache covers the disk up to this. */
export const QCOW2_DEFAULT_L2_CACHE_MAX = 32 << 20;

/**
 * Options of {@link Qcow2Driver.open}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { Qcow2DriverOptions } from "./qcow2_driver.ts";
 * const o: Qcow2DriverOptions = { readOnly: true, l2CacheSize: 1 << 20 };
 * assert(o.readOnly);
 * ```
 */
export interface Qcow2DriverOptions {
  /**
   * Open without write access. A writable open refuses images this driver
   * cannot yet write safely (corrupt, extended L2 entries, internal
   * snapshots, 64-bit refcounts), repairs the refcounts of a dirty image
   * (refusing one whose metadata is inconsistent) and clears the autoclear
   * feature bits.
   */
  readOnly: boolean;
  /**
   * Bytes of L2 tables cached (QEMU's l2-cache-size); default: enough for
   * the whole disk, at most 32 MiB. At least two tables are kept.
   */
  l2CacheSize?: number;
  /**
   * Opens the backing file `name` (as stored in the image) of format
   * `format` ("raw" | "qcow2"), read-only. Without it an image with a
   * backing file is refused.
   */
  openBacking?: (name: string, format: string) => Promise<BlockDriver>;
  /**
   * A writable image served by several IOThreads: the
   * {@link Qcow2SharedState} memory every thread's driver of this image
   * attaches to (the first one to attach owns the metadata). Ignored
   * read-only.
   */
  shared?: SharedArrayBuffer;
}

/**
 * The qcow2 format driver (QEMU block/qcow2.c, docs/interop/qcow2.txt):
 * versions 2 and 3, L1/L2 lookup through an {@link L2Cache}, zero
 * clusters, compressed clusters (deflate), extended L2 entries
 * (subclusters), and a read-only backing file (qcow2 or raw) for unallocated
 * clusters. It sits on a protocol driver (`child`) as the raw driver does;
 * every metadata read goes through the child asynchronously. A request is
 * split into runs that read the same way (one cluster, or one subcluster
 * type); a read that fits one allocated cluster whose L2 table is cached is
 * passed straight to the child (hot path: no allocation).
 *
 * Bad input: {@link Qcow2Driver.open} validates the header and tables and
 * throws {@link Qcow2Error}; an L1 or L2 entry that is malformed or points
 * past the end of the file or into the header, L1 table, refcount table, an
 * L2 table or a refcount block fails that request with -EIO.
 *
 * Writes (when not opened read-only): in place into clusters with refcount
 * 1, else through a queued {@link AllocatingWrite} (copy on write, metadata
 * ordered for crash safety). A driver alone on its image keeps new entries
 * and refcounts in memory until a flush commits them (writeback, as QEMU's
 * metadata caches); drivers of one image in several threads attach to one
 * {@link Qcow2SharedState} (`shared`): the first owns the metadata and
 * writes it through, the others forward their allocating writes to it.
 * Never open one image writable twice otherwise. Completions never arrive
 * inside the submitting call (no inline completion).
 *
 * @example
 * ```ts ignore
 * const file = FileDriver.open(ctx, { filename: "disk.qcow2", readOnly: true });
 * const qcow2 = await Qcow2Driver.open(ctx, file, { readOnly: true });
 * ```
 */
export class Qcow2Driver implements BlockDriver {
  /** "qcow2". */
  readonly name = "qcow2";
  /** The protocol driver holding the image file. */
  readonly child: BlockDriver;
  /** The backing image (read-only), if any. */
  readonly backing: BlockDriver | null;
  /** The validated header. */
  readonly header: Qcow2Header;
  /** The L2 table cache. */
  readonly l2Cache: L2Cache;
  /** @internal */
  readonly ctx: AioContext;
  readonly #l1: DataView;
  readonly #l1Bytes: Uint8Array;
  #fileLength: number;
  /** Several threads write this image (null: this driver is alone). */
  readonly #shared: Qcow2SharedState | null = null;
  readonly #participant: number = -1;
  readonly #notifier: EventNotifier | null = null;
  #l1Gen = 0;
  #l1Reload: ((ret: number) => void)[] | null = null;
  /** Forwarded writes in flight: slot -> completion (and the bounce buffer it holds). */
  readonly #forwarded = new Map<number, { cb: BlockCompletion; buf: Uint8Array | null }>();
  /** Forwards waiting for a free slot. */
  readonly #forwardQueue: (() => boolean)[] = [];
  /** Refcounts and the allocator (writable images only). */
  readonly #refcounts: Qcow2Refcounts | null;
  #allocQueue: QueuedAllocation[] = [];
  /**
   * Writeback metadata (a driver alone on its image): a batch's L1/L2
   * entries and refcounts change in memory and reach the disk at the next
   * flush, in order ({@link commitMetadata}); shared images write through.
   */
  readonly #writeback: boolean;
  /** L2 table sectors changed and not written: table offset -> sector starts. */
  readonly #dirtyL2 = new Map<number, Set<number>>();
  /** L1 sectors changed and not written. */
  readonly #dirtyL1 = new Set<number>();
  #dirtySectors = 0;
  /** Lazy refcounts (compat bit, writeback only): refcounts written at close. */
  readonly #lazy: boolean;
  #markedDirty = false;
  #copiedOnWrite = false;
  /** Writeback: guest clusters with an allocating write in flight. */
  readonly #inflight = new Set<number>();
  /** Writeback: L1 indexes whose new L2 table is being made. */
  readonly #inflightTables = new Set<number>();
  /** Writeback: a flush, write-zeroes or discard runs. */
  #exclusive = false;
  #pumping = false;
  #pumpAgain = false;
  #allocBusy = false;
  readonly readOnly: boolean;
  readonly #l2Tables: Set<number>;
  readonly #refBlocks: Set<number>;
  readonly #map = new Qcow2Mapping();
  #lastCompressed = -1;
  #zeroCluster: Uint8Array | null = null;
  #lastInflated: Uint8Array | null = null;

  private constructor(
    ctx: AioContext,
    child: BlockDriver,
    header: Qcow2Header,
    l1: Uint8Array,
    refBlocks: Set<number>,
    backing: BlockDriver | null,
    l2CacheSize: number | undefined,
    reftable: Uint8Array | null,
    shared: SharedArrayBuffer | undefined,
    fileLength: number,
  ) {
    this.ctx = ctx;
    this.child = child;
    this.header = header;
    this.backing = backing;
    this.#fileLength = fileLength;
    this.#l1 = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    this.#l1Bytes = l1;
    this.#refBlocks = refBlocks;
    this.readOnly = reftable === null;
    this.#refcounts = reftable === null ? null : new Qcow2Refcounts(
      child,
      header,
      reftable,
      this.#fileLength,
      (off) => refBlocks.add(off),
      (off) => this.#refBlockOk(off),
      (off) => !this.#isMetadata(off) && !this.#l2Tables.has(off),
    );
    if (this.#refcounts !== null) {
      this.#refcounts.onTableMoved = (off, n) => {
        this.grewTo(off + n * header.clusterSize); // the new blocks and table end the file
        this.#shared?.setRefcountTable(off / header.clusterSize, n);
      };
    }
    this.#l2Tables = new Set();
    for (let i = 0; i < header.l1Size; i++) {
      const off = decodeL1Entry(this.#l1, i, header.clusterSize);
      if (off > 0) this.#l2Tables.add(off);
    }
    const cs = header.clusterSize;
    const wholeDisk = Math.ceil(header.size / (cs * header.l2Entries)) * cs;
    const bytes = l2CacheSize ?? Math.min(wholeDisk, QCOW2_DEFAULT_L2_CACHE_MAX);
    const tables = Math.max(2, Math.floor(bytes / cs));
    if (shared !== undefined && reftable !== null) {
      const st = new Qcow2SharedState(shared);
      const n = new EventNotifier();
      this.#shared = st;
      this.#notifier = n;
      this.#participant = st.attach(n.fd);
      this.#l1Gen = st.l1Generation;
      st.setEndClusters(Math.ceil(this.#fileLength / cs));
      ctx.setEventNotifier(n, () => {
        n.testAndClear();
        this.#onSharedNotify();
      });
    }
    const sh = this.#shared;
    this.#writeback = reftable !== null && sh === null;
    this.#lazy = this.#writeback && header.lazyRefcounts && header.version >= 3;
    if (this.#refcounts !== null) this.#refcounts.deferWrites = this.#writeback;
    this.l2Cache = new L2Cache(
      tables,
      cs,
      (off, n, cb) =>
        readMetadata(
          this.child,
          off,
          n,
          (ret, buf) =>
            cb(ret, buf === null ? null : new DataView(buf.buffer, buf.byteOffset, buf.byteLength)),
        ),
      sh === null ? undefined : (off) => sh.l2Version(off / cs),
    );
  }

  /**
   * Reads and validates the header, the L1 table and the refcount table
   * (qcow2_do_open), then opens the backing file through `opts.openBacking`.
   * Throws {@link Qcow2Error}; the child is not closed on failure (the
   * caller owns it until this resolves). Needs the context polled meanwhile.
   */
  static async open(
    ctx: AioContext,
    child: BlockDriver,
    opts: Qcow2DriverOptions,
  ): Promise<Qcow2Driver> {
    const fileLength = child.length;
    if (fileLength < 72) throw new Qcow2Error("BadMagic", "not a qcow2 image (too short)");
    let head = await readMetadataAsync(
      child,
      0,
      Math.min(QCOW2_HEADER_PROBE_BYTES, fileLength),
      "header",
    );
    const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
    const bits = dv.getUint32(20);
    if (
      dv.getUint32(0) === QCOW_MAGIC && bits >= MIN_CLUSTER_BITS && bits <= MAX_CLUSTER_BITS &&
      2 ** bits > head.length && fileLength > head.length
    ) {
      head = await readMetadataAsync(child, 0, Math.min(2 ** bits, fileLength), "header cluster");
    }
    const h = parseQcow2Header(head, fileLength);
    const end = opts.readOnly ? fileLength : await prepareForWriting(child, h, head);
    if (opts.l2CacheSize !== undefined && !(Number.isSafeInteger(opts.l2CacheSize))) {
      throw new Qcow2Error("Invalid", `bad l2-cache-size ${opts.l2CacheSize}`);
    }
    const l1 = h.l1Size > 0
      ? await readMetadataAsync(child, h.l1TableOffset, h.l1Size * 8, "L1 table")
      : new Uint8Array(8);
    const reftable = await readMetadataAsync(
      child,
      h.refcountTableOffset,
      h.refcountTableClusters * h.clusterSize,
      "refcount table",
    );
    const refBlocks = new Set<number>();
    const rdv = new DataView(reftable.buffer);
    for (let i = 0; i < reftable.length; i += 8) {
      const off = rdv.getUint32(i) * 0x100000000 + (rdv.getUint32(i + 4) & 0xfffffe00);
      if (off !== 0) refBlocks.add(off);
    }
    let backing: BlockDriver | null = null;
    if (h.backingFile !== null) {
      if (h.backingFormat === null) {
        throw new Qcow2Error(
          "BackingChain",
          `the backing file ${h.backingFile} has no recorded format (probing is unsafe); ` +
            `record it with qemu-img rebase -u -b ${h.backingFile} -F raw|qcow2`,
        );
      }
      if (h.backingFormat !== "raw" && h.backingFormat !== "qcow2") {
        throw new Qcow2Error("Unsupported", `backing file format ${h.backingFormat}`);
      }
      if (!opts.openBacking) {
        throw new Qcow2Error("BackingChain", `no way to open the backing file ${h.backingFile}`);
      }
      backing = await opts.openBacking(h.backingFile, h.backingFormat);
    }
    return new Qcow2Driver(
      ctx,
      child,
      h,
      l1,
      refBlocks,
      backing,
      opts.l2CacheSize,
      opts.readOnly ? null : reftable,
      opts.shared,
      Math.max(child.length, end),
    );
  }

  /** The virtual disk size. */
  get length(): number {
    return this.header.size;
  }

  /** The child's (runs are split at clusters, which are multiples of 512). */
  get requestAlignment(): number {
    return this.child.requestAlignment;
  }

  /** The child's. */
  get memAlignment(): number {
    return this.child.memAlignment;
  }

  /**
   * The fast paths' lookup: where guest `[offset, offset + len)` maps, when
   * it lies inside one cluster whose L2 table is cached (a cached table was
   * checked when it was read or made here), else null. Hot path: fills and
   * returns the driver's one Qcow2Mapping, no allocation.
   */
  #cachedMapping(offset: number, len: number): Qcow2Mapping | null {
    const cs = this.header.clusterSize;
    const inCluster = offset % cs;
    if (len === 0 || inCluster + len > cs || this.l1Stale()) return null;
    const cluster = (offset - inCluster) / cs;
    const l2Off = decodeL1Entry(this.#l1, Math.floor(cluster / this.header.l2Entries), cs);
    const table = l2Off > 0 ? this.l2Cache.lookup(l2Off) : undefined;
    if (table === undefined) return null;
    const m = this.#map;
    decodeL2Entry(table, cluster % this.header.l2Entries, inCluster, len, this.header, m);
    return m;
  }

  /**
   * Reads `qiov.size` bytes at guest `offset`. Hot path: a read inside one
   * allocated cluster whose L2 table is cached goes to the child as is.
   */
  preadv(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    const m = this.#cachedMapping(offset, qiov.size);
    if (
      m !== null && m.type === SubclusterType.Normal && m.bytes === qiov.size &&
      this.dataClusterOk(m.hostCluster)
    ) {
      this.child.preadv(m.host, qiov, cb);
      return;
    }
    new Qcow2ReadRequest(this, offset, qiov, cb).start();
  }

  /**
   * Writes `qiov` at guest `offset`. Clusters allocated with refcount 1
   * (COPIED) are written in place; the others are allocated one at a time
   * (see {@link AllocatingWrite}). Hot path: a write inside one COPIED
   * cluster whose L2 table is cached goes to the child as is.
   */
  pwritev(offset: number, qiov: IoVector, cb: BlockCompletion): void {
    if (this.#refcounts === null) return this.#complete(-EROFS, cb);
    const m = this.#cachedMapping(offset, qiov.size);
    if (
      m !== null && m.type === SubclusterType.Normal && m.copied &&
      this.dataClusterOk(m.hostCluster)
    ) {
      this.child.pwritev(m.host, qiov, cb);
      return;
    }
    new Qcow2WriteRequest(this, offset, qiov, cb).start();
  }

  /**
   * Flushes the image file. Metadata is written through as it changes (in
   * an order that survives a crash at any point), so nothing is held back.
   */
  flush(cb: BlockCompletion): void {
    if (this.#refcounts === null) return this.#complete(0, cb);
    if (!this.#writeback) return this.child.flush(cb);
    // After the allocations queued before it: their entries are written.
    this.enqueueAllocation(new MetadataCommit(this, cb));
  }

  /**
   * Frees the whole clusters in the range (QEMU's qcow2_cluster_discard):
   * their L2 entries become unallocated (a zero cluster when a backing file
   * would show through, version 3), then their refcounts drop to 0 and the
   * file range is discarded below. Partial clusters, compressed and shared
   * clusters are left alone (discard is advisory).
   */
  pdiscard(offset: number, bytes: number, cb: BlockCompletion): void {
    if (this.#refcounts === null) return this.#complete(-EROFS, cb);
    new Qcow2WriteRequest(this, offset, null, cb, bytes, true).start();
  }

  /**
   * Makes a range read as zeroes: runs that already do (zero clusters,
   * unallocated without backing data) are skipped, the others are written
   * as zero data (setting zero flags is not done yet).
   */
  pwriteZeroes(offset: number, bytes: number, _unmap: boolean, cb: BlockCompletion): void {
    if (this.#refcounts === null) return this.#complete(-EROFS, cb);
    new Qcow2WriteRequest(this, offset, null, cb, bytes).start();
  }

  /** @internal The refcounts and allocator (writable images). */
  get refcounts(): Qcow2Refcounts {
    return this.#refcounts!;
  }

  /**
   * @internal Runs an allocating write of `src` into guest cluster
   * `cluster` (see {@link AllocatingWrite}): here, queued behind the others,
   * when this driver owns the metadata; else forwarded to the owner.
   */
  allocate(
    cluster: number,
    inCluster: number,
    src: IoVector,
    cb: BlockCompletion,
    mode: Qcow2AllocMode,
  ): void {
    const st = this.#shared;
    if (st === null || st.isOwner(this.#participant)) {
      return this.enqueueAllocation(new AllocatingWrite(this, cluster, inCluster, src, cb, mode));
    }
    // The owner reads the data from this thread's memory: one flat copy,
    // kept alive here until the owner completed.
    let buf: Uint8Array | null = null, addr = 0;
    if (mode === "write") {
      buf = new Uint8Array(Math.max(src.size, 128));
      src.copyTo(addressOf(buf));
      addr = addressOf(buf);
    }
    const attempt = (): boolean => {
      const slot = st.forward(this.#participant, mode, cluster, inCluster, src.size, addr);
      if (slot === -1) return false;
      if (slot === -2) this.ctx.scheduleOneshot(() => cb(-EIO));
      else this.#forwarded.set(slot, { cb, buf });
      return true;
    };
    if (this.#forwardQueue.length > 0 || !attempt()) this.#forwardQueue.push(attempt);
  }

  /** The owner's eventfd: forwarded writes queued; a forwarder's: some completed. */
  #onSharedNotify(): void {
    const st = this.#shared!;
    if (st.isOwner(this.#participant)) {
      for (const w of st.takeQueued()) this.#runForwarded(st, w);
    }
    for (const [slot, f] of this.#forwarded) {
      const ret = st.reap(slot);
      if (ret === null) continue;
      this.#forwarded.delete(slot);
      f.cb(ret);
    }
    while (this.#forwardQueue.length > 0 && this.#forwardQueue[0]()) this.#forwardQueue.shift();
  }

  #runForwarded(st: Qcow2SharedState, w: Qcow2ForwardedWrite): void {
    const src = new IoVector(1);
    if (w.mode === "write") src.add(w.addr, w.len);
    else src.addBuffer(this.zeroCluster.subarray(0, w.len));
    const done = (ret: number) => st.complete(w.slot, ret);
    if (
      !(w.len > 0 && w.inCluster >= 0 && w.inCluster + w.len <= this.header.clusterSize &&
        Number.isSafeInteger(w.cluster) && w.cluster * this.header.clusterSize < this.length)
    ) return done(-EIO);
    this.enqueueAllocation(new AllocatingWrite(this, w.cluster, w.inCluster, src, done, w.mode));
  }

  /**
   * @internal Whether another thread's driver linked a new L2 table since
   * this one read the L1 table (hot path: one atomic load when shared).
   */
  l1Stale(): boolean {
    const st = this.#shared;
    return st !== null && st.l1Generation !== this.#l1Gen &&
      !st.isOwner(this.#participant);
  }

  /** @internal Reads the L1 table again (after {@link l1Stale}); `cb(0)` or `cb(-errno)`. */
  reloadL1(cb: (ret: number) => void): void {
    if (this.#l1Reload !== null) {
      this.#l1Reload.push(cb);
      return;
    }
    const waiters = this.#l1Reload = [cb];
    const gen = this.#shared!.l1Generation;
    const h = this.header;
    readMetadata(this.child, h.l1TableOffset, h.l1Size * 8, (ret, buf) => {
      this.#l1Reload = null;
      if (ret === 0 && buf !== null) {
        this.#l1Bytes.set(buf);
        for (let i = 0; i < h.l1Size; i++) {
          const off = decodeL1Entry(this.#l1, i, h.clusterSize);
          if (off > 0) this.#l2Tables.add(off);
        }
        this.#l1Gen = gen;
      }
      for (const w of waiters) w(ret < 0 ? ret : buf === null ? -EIO : 0);
    });
  }

  /**
   * @internal Writeback: links a batch's writes in memory (after their data
   * is written) and marks the sectors dirty; the tables stay in the cache.
   */
  linkInMemory(links: readonly BatchLink[]): void {
    for (const l of links) {
      if (l.isNew) {
        setEntry(this.#l1, l.l1Index, l.l2Off);
        this.#l2Tables.add(l.l2Off);
        this.l2Cache.put(l.l2Off, l.table);
        this.l2Cache.pin(l.l2Off);
        const at = l.l1Index * 8;
        if (!this.#dirtyL1.has(at - (at % 512))) {
          this.#dirtyL1.add(at - (at % 512));
          this.#dirtySectors++;
        }
        continue;
      }
      const cur = this.l2Cache.lookup(l.l2Off) ?? l.table;
      setEntry(cur, l.index, l.host);
      this.l2Cache.put(l.l2Off, cur);
      this.l2Cache.pin(l.l2Off);
      let set = this.#dirtyL2.get(l.l2Off);
      if (set === undefined) this.#dirtyL2.set(l.l2Off, set = new Set());
      const at = l.index * 8, start = at - (at % 512);
      if (!set.has(start)) {
        set.add(start);
        this.#dirtySectors++;
      }
    }
    // Bound what a crash can lose and what stays pinned.
    if (this.#dirtySectors >= MAX_DIRTY_SECTORS) {
      this.enqueueAllocation(new MetadataCommit(this, () => {}));
    }
  }

  /**
   * @internal Writes what is dirty, in QEMU's cache dependency order: the
   * refcount block sectors, flush, the L2 and L1 sectors, flush. Runs alone
   * (from the allocation queue, or at close).
   */
  commitMetadata(cb: BlockCompletion): void {
    const rc = this.refcounts;
    if (this.#lazy) {
      // Lazy refcounts: the dirty bit stands for the refcounts not
      // written; a flush first only when copied-on-write data must be
      // durable before the entries that point at it.
      if (this.#dirtySectors === 0) return this.child.flush(cb);
      return this.#markDirty((mr) => {
        if (mr < 0) return cb(mr);
        if (!this.#copiedOnWrite) return this.#writeTables(cb);
        this.child.flush((fr) => fr < 0 ? cb(fr) : this.#writeTables(cb));
      });
    }
    rc.writeDirty((ret) => {
      if (ret < 0) return cb(ret);
      if (this.#dirtySectors === 0) return this.child.flush(cb);
      this.child.flush((fr) => {
        if (fr < 0) return cb(fr);
        this.#writeTables(cb);
      });
    });
  }

  /** @internal A write merged data copied from the cluster's old view (COW). */
  noteCopyOnWrite(): void {
    this.#copiedOnWrite = true;
  }

  /**
   * Lazy refcounts: sets the header's dirty bit (incompatible feature 0)
   * and flushes, once, before the first L2 entry reaches the disk without
   * its refcount (QEMU's qcow2_mark_dirty).
   */
  #markDirty(cb: BlockCompletion): void {
    if (this.#markedDirty) return cb(0);
    this.#writeIncompat(this.header.incompatibleFeatures | 1, (ret) => {
      if (ret === 0) this.#markedDirty = true;
      cb(ret);
    });
  }

  /** Writes incompatible_features (header offset 72) and flushes. */
  #writeIncompat(bits: number, cb: BlockCompletion): void {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setUint32(4, bits >>> 0);
    this.child.pwritev(72, IoVector.fromBuffers([b]), (ret) => {
      if (ret < 0) return cb(ret);
      this.child.flush(cb);
    });
  }

  /**
   * Lazy refcounts at close: the refcounts, flush, then the dirty bit
   * cleared (QEMU's qcow2_mark_clean).
   */
  #markClean(cb: BlockCompletion): void {
    if (!this.#markedDirty) return cb(0);
    this.refcounts.writeDirty((ret) => {
      if (ret < 0) return cb(ret);
      this.child.flush((fr) => {
        if (fr < 0) return cb(fr);
        this.#writeIncompat(this.header.incompatibleFeatures & ~1, (cr) => {
          if (cr === 0) this.#markedDirty = false;
          cb(cr);
        });
      });
    });
  }

  /** The dirty L2 and L1 sectors, then a flush (the second half of a commit). */
  #writeTables(cb: BlockCompletion): void {
    let pending = 1, err = 0;
    const done = (r: number) => {
      if (r < 0 && err === 0) err = r;
      if (--pending > 0) return;
      if (err < 0) return cb(err);
      this.#dirtyL2.clear();
      this.#dirtyL1.clear();
      this.#dirtySectors = 0;
      this.#copiedOnWrite = false;
      this.l2Cache.unpinAll();
      this.child.flush(cb);
    };
    // Whole units of the file's request alignment (within the cluster-
    // aligned tables): no read-modify-write under O_DIRECT.
    const unit = this.metadataUnit;
    const units = (sectors: Iterable<number>) => new Set([...sectors].map((a) => a - (a % unit)));
    for (const [l2Off, sectors] of this.#dirtyL2) {
      const t = this.l2Cache.lookup(l2Off);
      if (t === undefined) {
        err = -EIO; // pinned: cannot happen
        continue;
      }
      const bytes = new Uint8Array(t.buffer, t.byteOffset, t.byteLength);
      for (const at of units(sectors)) {
        pending++;
        writeTableSector(this.child, l2Off, bytes, at, done, unit);
      }
    }
    for (const at of units(this.#dirtyL1)) {
      pending++;
      writeTableSector(this.child, this.header.l1TableOffset, this.#l1Bytes, at, done, unit);
    }
    done(0);
  }

  /** @internal Runs `op` after every allocating write queued before it. */
  enqueueAllocation(op: QueuedAllocation): void {
    this.#allocQueue.push(op);
    if (this.#writeback) this.#pump();
    else if (!this.#allocBusy) this.#nextAllocation();
  }

  /**
   * Writeback: starts every queued write that does not meet one in flight
   * (same guest cluster, or the same missing L2 table): each links its
   * entry in memory as soon as its data is written, so writes need not wait
   * for each other. A write-zeroes, discard or flush runs alone, once what
   * was started before it has completed, and nothing queued behind it
   * overtakes it.
   */
  #pump(): void {
    if (this.#pumping) {
      this.#pumpAgain = true;
      return;
    }
    this.#pumping = true;
    do {
      this.#pumpAgain = false;
      this.#pumpOnce();
    } while (this.#pumpAgain);
    this.#pumping = false;
  }

  #pumpOnce(): void {
    const q = this.#allocQueue, h = this.header;
    for (let i = 0; i < q.length && !this.#exclusive;) {
      const op = q[i];
      if (!(op instanceof AllocatingWrite) || op.mode !== "write") {
        if (i > 0 || this.#inflight.size > 0) return;
        q.shift();
        this.#exclusive = true;
        return this.#runAlone(op, () => {
          this.#exclusive = false;
          this.#pump();
        });
      }
      const l1 = Math.floor(op.cluster / h.l2Entries);
      const newTable = this.l2Offset(op.cluster) === 0;
      if (this.#inflight.has(op.cluster) || (newTable && this.#inflightTables.has(l1))) {
        i++;
        continue;
      }
      q.splice(i, 1);
      this.#inflight.add(op.cluster);
      if (newTable) this.#inflightTables.add(l1);
      const batch = new AllocationBatch(this, () => {
        this.#inflight.delete(op.cluster);
        if (newTable) this.#inflightTables.delete(l1);
        this.#pump();
      }, true);
      batch.ops.push(op);
      batch.run();
    }
  }

  /**
   * A flush (metadata commit), or a write-zeroes or discard of a writeback
   * driver: those write through, so what is dirty goes first (no entry may
   * reach the disk before the refcounts it relies on).
   */
  #runAlone(op: QueuedAllocation, next: () => void): void {
    if (op.mode === "commit" || !this.#writeback) return op.run(next, null);
    const rc = this.refcounts;
    this.commitMetadata((ret) => {
      if (ret < 0) {
        op.fail(ret);
        return next();
      }
      rc.deferWrites = false;
      op.run(() => {
        rc.deferWrites = true;
        next();
      }, null);
    });
  }

  /**
   * Starts what is queued: a write-zeroes or discard alone; else a batch of
   * the writes at the head of the queue (see {@link AllocationBatch}), at
   * most one per guest cluster and one per missing L2 table (the others
   * wait for the next batch, which looks their mapping up again).
   */
  #nextAllocation(): void {
    const q = this.#allocQueue;
    if (q.length === 0) {
      this.#allocBusy = false;
      return;
    }
    this.#allocBusy = true;
    if (q[0].mode !== "write") return this.#runAlone(q.shift()!, () => this.#nextAllocation());
    const batch = new AllocationBatch(this, () => this.#nextAllocation(), this.#writeback);
    const clusters = new Set<number>(),
      newTables = new Set<number>(),
      later: QueuedAllocation[] = [];
    let i = 0;
    for (; i < q.length && batch.ops.length < MAX_BATCH; i++) {
      const op = q[i];
      if (!(op instanceof AllocatingWrite) || op.mode !== "write") break;
      const l1 = Math.floor(op.cluster / this.header.l2Entries);
      if (clusters.has(op.cluster) || newTables.has(l1)) {
        later.push(op);
        continue;
      }
      clusters.add(op.cluster);
      if (this.l2Offset(op.cluster) === 0) newTables.add(l1);
      batch.ops.push(op);
    }
    this.#allocQueue = later.concat(q.slice(i));
    batch.run();
  }

  /** @internal A cluster was allocated: the file now reaches `end`. */
  grewTo(end: number): void {
    if (end > this.#fileLength) this.#fileLength = end;
    this.#shared?.setEndClusters(Math.ceil(end / this.header.clusterSize));
  }

  /**
   * @internal Points L1 entry `index` at the new L2 table `l2Off` (COPIED):
   * writes the L1 sector with the entry first and changes the in-memory L1
   * only once that write completed, so no request relies on it earlier.
   */
  setL1Entry(index: number, l2Off: number, table: DataView, cb: BlockCompletion): void {
    this.setL1Entries([{ index, l2Off, table }], cb);
  }

  /**
   * @internal {@link setL1Entry} for several entries of one {@link metadataUnit}
   * of the L1 table: one write.
   */
  setL1Entries(
    entries: readonly { index: number; l2Off: number; table: DataView }[],
    cb: BlockCompletion,
  ): void {
    const unit = this.metadataUnit;
    const at = entries[0].index * 8, start = at - (at % unit);
    const copy = this.#l1Bytes.slice(start, start + unit);
    const cdv = new DataView(copy.buffer);
    for (const e of entries) setEntry(cdv, e.index - start / 8, e.l2Off);
    writeTableSector(this.child, this.header.l1TableOffset + start, copy, 0, (ret) => {
      if (ret === 0) {
        for (const e of entries) {
          setEntry(this.#l1, e.index, e.l2Off);
          this.#l2Tables.add(e.l2Off);
          this.#shared?.bumpL2(e.l2Off / this.header.clusterSize);
          this.l2Cache.put(e.l2Off, e.table);
        }
        this.#shared?.bumpL1();
      }
      cb(ret);
    });
  }

  /**
   * @internal Points L2 entry `index` of the table at `l2Off` at data
   * cluster `host` (COPIED), the same way: the sector first, memory after.
   */
  setL2Entry(
    l2Off: number,
    table: DataView,
    index: number,
    host: number,
    cb: BlockCompletion,
    zero = false,
  ) {
    this.setL2Entries(l2Off, table, [{ index, host, zero }], cb);
  }

  /**
   * @internal {@link setL2Entry} for several entries of one {@link metadataUnit}
   * of one L2 table: one write.
   */
  setL2Entries(
    l2Off: number,
    table: DataView,
    entries: readonly { index: number; host: number; zero: boolean }[],
    cb: BlockCompletion,
  ): void {
    // The cached copy if there is one (the table may have been evicted and
    // read again since the caller looked it up): the sector written must
    // hold every entry changed so far.
    const src = this.l2Cache.lookup(l2Off) ?? table;
    const bytes = new Uint8Array(src.buffer, src.byteOffset, src.byteLength);
    const unit = this.metadataUnit;
    const at = entries[0].index * 8, start = at - (at % unit);
    const copy = bytes.slice(start, start + unit);
    const cdv = new DataView(copy.buffer);
    for (const e of entries) setEntry(cdv, e.index - start / 8, e.host, e.zero);
    writeTableSector(this.child, l2Off + start, copy, 0, (ret) => {
      if (ret === 0) {
        // The cached copy, if the table was evicted and read again meanwhile.
        const cur = this.l2Cache.lookup(l2Off) ?? table;
        for (const e of entries) setEntry(cur, e.index, e.host, e.zero);
        // Other threads' copies go stale before the request completes.
        this.#shared?.bumpL2(l2Off / this.header.clusterSize);
        this.l2Cache.put(l2Off, cur);
      }
      cb(ret);
    });
  }

  /**
   * @internal Whether a cluster past everything allocated reads as zeroes
   * without being written: the image is a regular file (holes), not a
   * block device or an in-memory test driver.
   */
  get freshClustersReadZero(): boolean {
    const c = this.child as BlockDriver & { isBlockDevice?: boolean };
    return c.name === "file" && c.isBlockDevice === false;
  }

  /**
   * @internal Bytes of a table written at once: 512, or the image file's
   * request alignment (O_DIRECT on 4K sectors) up to a cluster, so that
   * table writes need no read-modify-write.
   */
  get metadataUnit(): number {
    return Math.min(Math.max(512, this.child.requestAlignment), this.header.clusterSize);
  }

  /** @internal Zeroes for write-zeroes, one cluster long. */
  get zeroCluster(): Uint8Array {
    return this.#zeroCluster ??= new Uint8Array(this.header.clusterSize);
  }

  /** Plugs the image file and the backing chain. */
  ioPlug(): void {
    this.child.ioPlug();
    this.backing?.ioPlug();
  }

  /** Unplugs them. */
  ioUnplug(): void {
    this.child.ioUnplug();
    this.backing?.ioUnplug();
  }

  /** The virtual size does not change while the image is open read-only. */
  refreshLength(): number {
    return this.header.size;
  }

  /** Closes the backing chain and the image file. */
  async close(): Promise<void> {
    const busy = this.#allocQueue.length > 0 || this.#exclusive || this.#inflight.size > 0;
    if (this.#writeback && (busy || this.#dirtySectors > 0 || this.refcounts.dirty)) {
      // Behind anything still queued (a commit started on its own, say).
      const ret = await new Promise<number>((resolve) =>
        this.enqueueAllocation(new MetadataCommit(this, resolve))
      );
      if (ret < 0) console.error(`qcow2: writing metadata at close failed (${ret})`);
    }
    if (this.#markedDirty) {
      const ret = await new Promise<number>((resolve) => this.#markClean(resolve));
      if (ret < 0) console.error(`qcow2: clearing the dirty bit at close failed (${ret})`);
    }
    this.l2Cache.clear();
    if (this.#shared !== null) {
      this.#shared.detach(this.#participant, -EIO);
      this.ctx.setEventNotifier(this.#notifier!, null);
      this.#notifier!.close();
    }
    try {
      await this.backing?.close();
    } finally {
      await this.child.close();
    }
  }

  /**
   * @internal Whether host cluster `off` may hold guest data: inside the
   * file and not the header, the L1 or refcount table, an L2 table or a
   * refcount block (QEMU's metadata overlap check, "cached" level).
   */
  dataClusterOk(off: number): boolean {
    return off < this.#fileEnd() && !this.#isMetadata(off) && !this.#l2Tables.has(off);
  }

  /** @internal Whether `off` may hold an L2 table (cluster aligned, inside the file). */
  l2TableOk(off: number): boolean {
    return off + this.header.clusterSize <= this.#fileEnd() && !this.#isMetadata(off);
  }

  /** @internal The L2 table offset for guest cluster `cluster` (0: none, -1: bad). */
  l2Offset(cluster: number): number {
    const off = decodeL1Entry(
      this.#l1,
      Math.floor(cluster / this.header.l2Entries),
      this.header.clusterSize,
    );
    return off > 0 && !this.l2TableOk(off) ? -1 : off;
  }

  /**
   * @internal Reads and inflates the compressed cluster at `host`
   * (`bytes` of deflate data); calls `cb` with 0 and the cluster, or -EIO.
   * The last cluster inflated is kept (sequential reads of one cluster).
   */
  readCompressed(
    host: number,
    bytes: number,
    cb: (ret: number, data: Uint8Array | null) => void,
  ): void {
    const cs = this.header.clusterSize;
    if (host === this.#lastCompressed && this.#lastInflated !== null) {
      const data = this.#lastInflated;
      this.ctx.scheduleOneshot(() => cb(0, data));
      return;
    }
    const first = host - host % cs;
    const fileEnd = this.#fileEnd();
    const lastByte = Math.min(host + bytes, fileEnd) - 1;
    if (host >= fileEnd) return this.ctx.scheduleOneshot(() => cb(-EIO, null));
    for (let c = first; c <= lastByte; c += cs) {
      if (this.#isMetadata(c) || this.#l2Tables.has(c)) {
        return this.ctx.scheduleOneshot(() => cb(-EIO, null));
      }
    }
    readMetadata(this.child, host, lastByte + 1 - host, (ret, buf) => {
      if (ret < 0 || buf === null) return cb(ret < 0 ? ret : -EIO, null);
      const out = inflateCluster(buf, cs);
      if (out === null) return cb(-EIO, null);
      this.#lastCompressed = host;
      this.#lastInflated = out;
      cb(0, out);
    });
  }

  /** Whether a refcount table entry may point at `off` (see {@link Qcow2Refcounts}). */
  #refBlockOk(off: number): boolean {
    const h = this.header, cs = h.clusterSize;
    if (off % cs !== 0 || off < cs || off + cs > this.#fileEnd()) return false;
    if (h.l1Size > 0 && off + cs > h.l1TableOffset && off < h.l1TableOffset + h.l1Size * 8) {
      return false;
    }
    const rt = h.refcountTableOffset;
    if (off + cs > rt && off < rt + h.refcountTableClusters * cs) return false;
    return !this.#l2Tables.has(off);
  }

  /** The file's length, or what the owner has allocated past it (shared images). */
  #fileEnd(): number {
    const st = this.#shared;
    // The allocator's end: refcount blocks and tables it placed count at once.
    const rc = this.#refcounts;
    if (rc !== null && rc.end > this.#fileLength) this.#fileLength = rc.end;
    if (st === null) return this.#fileLength;
    return Math.max(this.#fileLength, st.endClusters * this.header.clusterSize);
  }

  #isMetadata(off: number): boolean {
    const h = this.header;
    const st = this.#shared;
    if (st !== null && st.refcountTableCluster !== 0) {
      // The owner grew and moved the refcount table (a no-op for the owner).
      h.refcountTableOffset = st.refcountTableCluster * h.clusterSize;
      h.refcountTableClusters = st.refcountTableClusters;
    }
    if (off < h.clusterSize) return true;
    if (h.l1Size > 0 && off >= h.l1TableOffset && off < h.l1TableOffset + h.l1Size * 8) {
      return true;
    }
    const rt = h.refcountTableOffset;
    if (off >= rt && off < rt + h.refcountTableClusters * h.clusterSize) return true;
    return this.#refBlocks.has(off);
  }

  #complete(ret: number, cb: BlockCompletion): void {
    this.ctx.scheduleOneshot(() => cb(ret));
  }
}

/**
 * What a writable open checks and does first: refuse what cannot be written
 * safely yet, repair a dirty image (lazy refcounts left stale by a crash:
 * {@link repairDirtyImage}, as QEMU's qcow2_do_open does for any dirty
 * image), and clear the autoclear feature bits (their data, e.g. bitmaps,
 * would not be kept up to date), flushed before any other write. Returns
 * where the image file now ends (a repair may add refcount blocks there).
 */
async function prepareForWriting(
  child: BlockDriver,
  h: Qcow2Header,
  head: Uint8Array,
): Promise<number> {
  const refuse = (why: string) => {
    throw new Qcow2Error("Unsupported", `writing ${why} is not supported yet (open read-only)`);
  };
  if (h.corrupt) {
    throw new Qcow2Error("Invalid", "the image is marked corrupt: it must not be written");
  }
  if (h.extendedL2) refuse("images with extended L2 entries");
  if (h.nbSnapshots > 0) refuse("images with internal snapshots");
  if (h.refcountOrder > 5) refuse("images with 64-bit refcounts");
  let end = child.length;
  if (h.dirty) {
    const r = await repairDirtyImage(child, h, head);
    end = Math.max(end, r.fileEnd);
  }
  if (h.version < 3) return end;
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (dv.getUint32(88) === 0 && dv.getUint32(92) === 0) return end;
  const sector = head.slice(0, 512);
  new DataView(sector.buffer).setBigUint64(88, 0n);
  const ret = await new Promise<number>((resolve) =>
    child.pwritev(0, IoVector.fromBuffers([sector]), resolve)
  );
  const fr = ret < 0 ? ret : await new Promise<number>((resolve) => child.flush(resolve));
  if (fr < 0) throw new Qcow2Error("Io", `clearing the autoclear features failed (${fr})`);
  return end;
}

/**
 * What a guest read and a guest write share: they walk their range in runs
 * (`step`, from `start` and again as metadata arrives), count the sub-requests
 * still running (`pending`), keep the first error (`ret`), and complete once,
 * never inside the submitting call (a completion while `start` runs is
 * deferred to a oneshot BH).
 */
abstract class Qcow2Request {
  /** Bytes of the range handled so far. */
  protected pos = 0;
  /** Sub-requests started and not yet completed. */
  protected pending = 0;
  /** Inside `step`: completions wait for it to return. */
  protected stepping = false;
  /** First error (0 or -errno). */
  protected ret = 0;
  #inSubmit = false;
  #done = false;
  readonly #cb: BlockCompletion;
  /** A sub-request's completion. */
  protected readonly subDone = (ret: number): void => {
    if (ret < 0 && this.ret === 0) this.ret = ret;
    this.pending--;
    this.maybeFinish();
  };

  constructor(
    protected readonly d: Qcow2Driver,
    protected readonly offset: number,
    cb: BlockCompletion,
  ) {
    this.#cb = cb;
  }

  /**
   * Starts the walk (from the submitting call), after reading the L1 table
   * again if another thread's driver linked a new L2 table meanwhile.
   */
  start(): void {
    this.#inSubmit = true;
    if (this.d.l1Stale()) {
      this.stepping = true;
      this.d.reloadL1((ret) => {
        this.stepping = false;
        if (ret < 0) {
          this.ret = ret;
          this.maybeFinish();
        } else this.step();
      });
    } else this.step();
    this.#inSubmit = false;
  }

  /** Walks on from `pos` as far as it can without waiting. */
  protected abstract step(): void;

  /** Completes once nothing runs any more and the walk is not inside `step`. */
  protected maybeFinish(): void {
    if (this.stepping || this.pending > 0 || this.#done) return;
    this.#done = true;
    const ret = this.ret, cb = this.#cb;
    if (this.#inSubmit) this.d.ctx.scheduleOneshot(() => cb(ret));
    else cb(ret);
  }
}

/**
 * One guest read split into runs (QEMU's qcow2_co_preadv_part loop): each
 * run is looked up (waiting for its L2 table when not cached) and its read
 * started before the next is looked up, so the runs' reads overlap. The
 * first error wins; the callback runs once, never inside preadv.
 */
class Qcow2ReadRequest extends Qcow2Request {
  readonly #qiov: IoVector;
  readonly #map = new Qcow2Mapping();

  constructor(d: Qcow2Driver, offset: number, qiov: IoVector, cb: BlockCompletion) {
    super(d, offset, cb);
    this.#qiov = qiov;
  }

  protected step(): void {
    const d = this.d, h = d.header, cs = h.clusterSize, size = this.#qiov.size;
    this.stepping = true;
    while (this.pos < size && this.ret === 0) {
      const guest = this.offset + this.pos;
      const inCluster = guest % cs;
      const cluster = (guest - inCluster) / cs;
      const len = Math.min(size - this.pos, cs - inCluster);
      const l2Off = d.l2Offset(cluster);
      if (l2Off < 0) {
        this.ret = -EIO;
        break;
      }
      if (l2Off === 0) {
        this.#unallocated(guest, len);
        this.pos += len;
        continue;
      }
      const table = d.l2Cache.lookup(l2Off);
      if (table === undefined) {
        d.l2Cache.fetch(l2Off, (ret) => {
          if (ret < 0) {
            if (this.ret === 0) this.ret = ret;
            this.stepping = false;
            this.maybeFinish();
          } else this.step();
        });
        return; // still stepping: resumes when the table is in
      }
      const m = this.#map;
      decodeL2Entry(table, cluster % h.l2Entries, inCluster, len, h, m);
      switch (m.type) {
        case SubclusterType.Normal:
          if (!d.dataClusterOk(m.hostCluster)) {
            this.ret = -EIO;
            break;
          }
          this.pending++;
          d.child.preadv(m.host, sliceIoVector(this.#qiov, this.pos, m.bytes), this.subDone);
          break;
        case SubclusterType.Zero:
          zeroIoVector(this.#qiov, this.pos, m.bytes);
          break;
        case SubclusterType.Unallocated:
          this.#unallocated(guest, m.bytes);
          break;
        case SubclusterType.Compressed:
          this.#compressed(m.host, m.compressedBytes, inCluster, m.bytes);
          break;
        default:
          this.ret = -EIO;
      }
      this.pos += m.bytes;
    }
    this.stepping = false;
    this.maybeFinish();
  }

  /** Reads from the backing file what it has, zeroes past its end. */
  #unallocated(guest: number, len: number): void {
    const backing = this.d.backing;
    const have = backing === null ? 0 : Math.max(0, Math.min(len, backing.length - guest));
    if (have > 0) {
      this.pending++;
      backing!.preadv(guest, sliceIoVector(this.#qiov, this.pos, have), this.subDone);
    }
    if (have < len) zeroIoVector(this.#qiov, this.pos + have, len - have);
  }

  #compressed(host: number, bytes: number, inCluster: number, len: number): void {
    const pos = this.pos;
    this.pending++;
    this.d.readCompressed(host, bytes, (ret, data) => {
      if (ret === 0 && data !== null) {
        sliceIoVector(this.#qiov, pos, len).copyFrom(addressOf(data) + inCluster);
      }
      this.subDone(ret);
    });
  }
}

/**
 * Writes a standard L1/L2 entry: `offset` with COPIED (bit 63) when it is
 * not 0, and the zero flag (bit 0, L2 entries of version 3) when `zero`.
 */
function setEntry(table: DataView, index: number, offset: number, zero = false): void {
  const hi = offset === 0 ? 0 : 0x80000000 | Math.floor(offset / 0x100000000);
  table.setUint32(index * 8, hi >>> 0);
  table.setUint32(index * 8 + 4, ((offset >>> 0) | (zero ? 1 : 0)) >>> 0);
}

/**
 * One guest write (or write-zeroes) split at cluster boundaries (QEMU's
 * qcow2_co_pwritev_part loop): a run in a cluster allocated with refcount 1
 * (COPIED) is written in place at once; any other run (unallocated, zero,
 * compressed, shared, or its L2 table missing) becomes an
 * {@link AllocatingWrite} queued on the driver. Completes once, with the
 * first error, never inside the submitting call.
 */
class Qcow2WriteRequest extends Qcow2Request {
  readonly #qiov: IoVector | null;
  readonly #size: number;
  readonly #map = new Qcow2Mapping();

  readonly #discard: boolean;

  /** `qiov` null: write `zeroBytes` zeroes (or discard them, `discard`). */
  constructor(
    d: Qcow2Driver,
    offset: number,
    qiov: IoVector | null,
    cb: BlockCompletion,
    zeroBytes = 0,
    discard = false,
  ) {
    super(d, offset, cb);
    this.#discard = discard;
    this.#qiov = qiov;
    this.#size = qiov === null ? zeroBytes : qiov.size;
  }

  #source(len: number): IoVector {
    if (this.#qiov !== null) return sliceIoVector(this.#qiov, this.pos, len);
    return IoVector.fromBuffers([this.d.zeroCluster.subarray(0, len)]);
  }

  protected step(): void {
    const d = this.d, h = d.header, cs = h.clusterSize;
    this.stepping = true;
    while (this.pos < this.#size && this.ret === 0) {
      const guest = this.offset + this.pos;
      const inCluster = guest % cs;
      const cluster = (guest - inCluster) / cs;
      const len = Math.min(this.#size - this.pos, cs - inCluster);
      const l2Off = d.l2Offset(cluster);
      if (l2Off < 0) {
        this.ret = -EIO;
        break;
      }
      let inPlace = false;
      if (this.#discard) {
        if (len === cs && l2Off > 0) {
          this.pending++;
          d.allocate(cluster, 0, this.#source(len), this.subDone, "discard");
        }
        this.pos += len;
        continue;
      }
      if (this.#qiov === null && this.#readsZero(l2Off, cluster, guest, inCluster, len)) {
        this.pos += len; // write-zeroes where the guest already reads zeroes
        continue;
      }
      if (l2Off > 0) {
        const table = d.l2Cache.lookup(l2Off);
        if (table === undefined) {
          d.l2Cache.fetch(l2Off, (ret) => {
            if (ret < 0) {
              if (this.ret === 0) this.ret = ret;
              this.stepping = false;
              this.maybeFinish();
            } else this.step();
          });
          return;
        }
        const m = this.#map;
        decodeL2Entry(table, cluster % h.l2Entries, inCluster, len, h, m);
        if (m.type === SubclusterType.Invalid) {
          this.ret = -EIO;
          break;
        }
        const zeroFlag = this.#qiov === null && len === cs && h.version >= 3;
        if (m.type === SubclusterType.Normal && m.copied && !zeroFlag) {
          if (!d.dataClusterOk(m.hostCluster)) {
            this.ret = -EIO;
            break;
          }
          inPlace = true;
          this.pending++;
          d.child.pwritev(m.host, this.#source(len), this.subDone);
        }
      }
      if (!inPlace) {
        // Whole clusters of write-zeroes become zero clusters (version 3).
        const zeroFlag = this.#qiov === null && len === cs && h.version >= 3 && !h.extendedL2;
        this.pending++;
        d.allocate(
          cluster,
          inCluster,
          this.#source(len),
          this.subDone,
          zeroFlag ? "zero" : "write",
        );
      }
      this.pos += len;
    }
    this.stepping = false;
    this.maybeFinish();
  }

  /**
   * Whether the run already reads as zeroes: a zero cluster, or unallocated
   * with no backing data there (a fresh image: mkfs's write-zeroes cost
   * nothing). Needs the L2 table cached when there is one (else: false).
   */
  #readsZero(l2Off: number, cluster: number, guest: number, inCluster: number, len: number) {
    const d = this.d, backing = d.backing;
    const noBacking = backing === null || guest >= backing.length;
    if (l2Off === 0) return noBacking;
    if (l2Off < 0) return false;
    const table = d.l2Cache.lookup(l2Off);
    if (table === undefined) return false;
    const m = this.#map;
    decodeL2Entry(table, cluster % d.header.l2Entries, inCluster, len, d.header, m);
    if (m.bytes !== len) return false;
    return m.type === SubclusterType.Zero || (m.type === SubclusterType.Unallocated && noBacking);
  }
}

/**
 * A write into a guest cluster that has no cluster of its own with refcount
 * 1 (QEMU's qcow2_alloc_host_offset + perform_cow + qcow2_alloc_cluster_link_l2,
 * one cluster at a time, serialised per driver). Order, so a crash at any
 * point leaves at most leaked clusters and every completed write readable:
 *
 * 1. if the L1 entry is empty, allocate a cluster for a new L2 table;
 * 2. read the guest's current view of the whole cluster (backing file,
 *    zeroes, compressed or shared data) and merge the new bytes in (COW);
 * 3. allocate the data cluster (its refcount reaches the disk first);
 * 4. write the data cluster (and the new L2 table, with the entry);
 * 5. flush the image file (refcounts and data durable before anything
 *    points at them);
 * 6. write the L2 entry (or the L1 entry of the new table); the in-memory
 *    tables change only when that write has completed.
 *
 * At run time the mapping is looked up again: an earlier queued write may
 * have allocated the cluster, and then this one is written in place.
 */
class AllocatingWrite {
  readonly #d: Qcow2Driver;
  readonly #cluster: number;
  readonly #inCluster: number;
  readonly #src: IoVector;
  readonly #cb: BlockCompletion;
  readonly #mode: "write" | "zero" | "discard";
  #batch: AllocationBatch | null = null;

  /**
   * `mode`: write `src`; "zero": make the whole cluster a zero cluster;
   * "discard": free the whole cluster.
   */
  constructor(
    d: Qcow2Driver,
    cluster: number,
    inCluster: number,
    src: IoVector,
    cb: BlockCompletion,
    mode: "write" | "zero" | "discard" = "write",
  ) {
    this.#d = d;
    this.#cluster = cluster;
    this.#inCluster = inCluster;
    this.#src = src;
    this.#cb = cb;
    this.#mode = mode;
  }

  /** What it does. */
  get mode(): "write" | "zero" | "discard" {
    return this.#mode;
  }

  /** Completes it with `ret` without running it. */
  fail(ret: number): void {
    this.#cb(ret);
  }

  /** The guest cluster. */
  get cluster(): number {
    return this.#cluster;
  }

  /**
   * Runs the steps; `next` starts the driver's next allocating write. In a
   * `batch`, the last step (flush, then the L1/L2 entry) is the batch's.
   */
  run(next: () => void, batch: AllocationBatch | null): void {
    this.#batch = batch;
    const finish = (ret: number) => {
      if (batch === null) next();
      this.#cb(ret);
      batch?.settled();
    };
    const d = this.#d, h = d.header, cs = h.clusterSize;
    const l2Off = d.l2Offset(this.#cluster);
    if (l2Off < 0) return d.ctx.scheduleOneshot(() => finish(-EIO));
    if (l2Off === 0 && this.#mode === "discard") return d.ctx.scheduleOneshot(() => finish(0));
    if (l2Off === 0) {
      return d.refcounts.allocate((ret, off) => {
        if (ret < 0) return finish(ret);
        d.grewTo(off + cs);
        this.#withTable(off, new DataView(new ArrayBuffer(cs)), true, finish);
      });
    }
    const table = d.l2Cache.lookup(l2Off);
    if (table !== undefined) return this.#withTable(l2Off, table, false, finish);
    d.l2Cache.fetch(l2Off, (ret, t) => {
      if (ret < 0 || t === null) return finish(ret < 0 ? ret : -EIO);
      this.#withTable(l2Off, t, false, finish);
    });
  }

  #withTable(l2Off: number, table: DataView, isNew: boolean, finish: BlockCompletion): void {
    const d = this.#d, h = d.header, cs = h.clusterSize, len = this.#src.size;
    const index = this.#cluster % h.l2Entries;
    const m = new Qcow2Mapping();
    decodeL2Entry(table, index, this.#inCluster, len, h, m);
    if (m.type === SubclusterType.Invalid) return finish(-EIO);
    if (this.#mode === "zero") return this.#makeZero(l2Off, table, isNew, index, m, finish);
    if (this.#mode === "discard") return this.#free(l2Off, table, index, m, finish);
    if (m.type === SubclusterType.Normal && m.copied) {
      if (!d.dataClusterOk(m.hostCluster)) return finish(-EIO);
      return d.child.pwritev(m.host, this.#src, finish);
    }
    // A zero cluster that kept its host cluster (refcount 1): write into it.
    const reuse = m.type === SubclusterType.Zero && m.copied && m.hostCluster > 0 &&
        d.dataClusterOk(m.hostCluster)
      ? m.hostCluster
      : 0;
    const start = this.#cluster * cs;
    const backing = d.backing;
    const readsZero = m.type === SubclusterType.Zero ||
      (m.type === SubclusterType.Unallocated && (backing === null || start >= backing.length));
    // No copy on write: the new cluster gets the guest's data and zeroes.
    if (reuse === 0 && (readsZero || (this.#inCluster === 0 && len === cs))) {
      return this.#allocateData(l2Off, table, isNew, index, null, finish);
    }
    // Aligned for O_DIRECT, so the file driver need not bounce it.
    const buf = alignedBuffer(cs, d.memAlignment);
    if (!readsZero) d.noteCopyOnWrite();
    const merge = () => {
      this.#src.copyTo(addressOf(buf) + this.#inCluster);
      if (reuse === 0) return this.#allocateData(l2Off, table, isNew, index, buf, finish);
      // Data first (invisible under the zero flag), flushed, then the entry.
      d.child.pwritev(reuse, IoVector.fromBuffers([buf]), (ret) => {
        if (ret < 0) return finish(ret);
        this.#link(l2Off, table, index, reuse, false, finish);
      });
    };
    // Nothing to copy where the guest reads zeroes (the buffer is zeroed).
    if ((this.#inCluster === 0 && len === cs) || readsZero) return merge();
    const n = Math.min(cs, d.length - start);
    d.preadv(start, IoVector.fromBuffers([buf.subarray(0, n)]), (ret) => {
      if (ret < 0) return finish(ret);
      merge();
    });
  }

  /**
   * Write-zeroes of a whole cluster: the L2 entry gets the zero flag. An
   * allocated cluster with refcount 1 stays allocated under the flag (QEMU's
   * QCOW2_CLUSTER_ZERO_ALLOC, reused by the next write); any other host
   * cluster (compressed, shared) is dropped from the entry and leaks.
   */
  #makeZero(
    l2Off: number,
    table: DataView,
    isNew: boolean,
    index: number,
    m: Qcow2Mapping,
    finish: BlockCompletion,
  ): void {
    const d = this.#d;
    if (m.type === SubclusterType.Zero) return finish(0);
    const keep = (m.type === SubclusterType.Normal && m.copied) ? m.hostCluster : 0;
    if (!isNew) return d.setL2Entry(l2Off, table, index, keep, finish, true);
    setEntry(table, index, 0, true);
    const bytes = new Uint8Array(table.buffer, table.byteOffset, table.byteLength);
    d.child.pwritev(l2Off, IoVector.fromBuffers([bytes]), (ret) => {
      if (ret < 0) return finish(ret);
      d.child.flush((fr) => {
        if (fr < 0) return finish(fr);
        d.setL1Entry(Math.floor(this.#cluster / d.header.l2Entries), l2Off, table, finish);
      });
    });
  }

  /** Discard of a whole cluster: unlink it (entry written), then free it. */
  #free(
    l2Off: number,
    table: DataView,
    index: number,
    m: Qcow2Mapping,
    finish: BlockCompletion,
  ): void {
    const d = this.#d, h = d.header;
    const owned = (m.type === SubclusterType.Normal || m.type === SubclusterType.Zero) &&
        m.copied && m.hostCluster > 0 && d.dataClusterOk(m.hostCluster)
      ? m.hostCluster
      : 0;
    if (owned === 0) return d.ctx.scheduleOneshot(() => finish(0));
    // With a backing file, unallocated would show its data: a zero cluster instead.
    const zero = d.backing !== null && h.version >= 3;
    // The unlinked entry is durable before the refcount drops (QEMU's
    // refcount cache depending on the L2 cache): once the cluster is
    // allocated again, no crash can leave this entry pointing at it.
    d.setL2Entry(l2Off, table, index, 0, (ret) => {
      if (ret < 0) return finish(ret);
      d.child.flush((flr) => {
        if (flr < 0) return finish(flr);
        d.refcounts.free(owned, (fr) => {
          if (fr < 0) return finish(fr);
          d.child.pdiscard(owned, h.clusterSize, () => finish(0));
        });
      });
    }, zero);
  }

  /**
   * The data (and a new table) are written: flush, then point the L2 entry
   * (or, for a new table, the L1 entry) at them; in a batch, the batch does
   * that for all its writes at once.
   */
  #link(
    l2Off: number,
    table: DataView,
    index: number,
    host: number,
    isNew: boolean,
    finish: BlockCompletion,
  ): void {
    const d = this.#d, l1Index = Math.floor(this.#cluster / d.header.l2Entries);
    if (this.#batch !== null) {
      this.#batch.link({ isNew, l1Index, l2Off, table, index, host, cb: this.#cb });
      return this.#batch.settled();
    }
    d.child.flush((fr) => {
      if (fr < 0) return finish(fr);
      if (isNew) d.setL1Entry(l1Index, l2Off, table, finish);
      else d.setL2Entry(l2Off, table, index, host, finish);
    });
  }

  #allocateData(
    l2Off: number,
    table: DataView,
    isNew: boolean,
    index: number,
    buf: Uint8Array | null,
    finish: BlockCompletion,
  ): void {
    const d = this.#d, cs = d.header.clusterSize;
    d.refcounts.allocate((ret, host, fresh) => {
      if (ret < 0) return finish(ret);
      d.grewTo(host + cs);
      // `buf` null: the rest of the cluster is zeroes. A whole cluster is
      // written from the guest's buffers; a part of a fresh cluster of a
      // regular file (a hole: it reads as zeroes) too, at its place (QEMU
      // zeroes such a cluster's rest with write_zeroes instead); else the
      // data is copied into a zeroed cluster.
      let data: IoVector, at = host;
      if (buf !== null) data = IoVector.fromBuffers([buf]);
      else if (this.#src.size === cs) data = this.#src;
      else if (fresh && d.freshClustersReadZero) {
        data = this.#src;
        at = host + this.#inCluster;
      } else {
        const b = alignedBuffer(cs, d.memAlignment);
        this.#src.copyTo(addressOf(b) + this.#inCluster);
        data = IoVector.fromBuffers([b]);
      }
      let pending = isNew ? 2 : 1, err = 0;
      const written = (r: number) => {
        if (r < 0 && err === 0) err = r;
        if (--pending > 0) return;
        if (err < 0) return finish(err);
        this.#link(l2Off, table, index, host, isNew, finish);
      };
      if (at !== host) {
        // QEMU's handle_alloc_space: the cluster's zeroes by fallocate first.
        d.child.pwriteZeroes(host, cs, false, (zr) => {
          if (zr < 0) return written(zr);
          d.child.pwritev(at, data, written);
        });
      } else d.child.pwritev(at, data, written);
      if (isNew) {
        setEntry(table, index, host);
        const bytes = new Uint8Array(table.buffer, table.byteOffset, table.byteLength);
        d.child.pwritev(l2Off, IoVector.fromBuffers([bytes]), written);
      }
    });
  }
}

/** One write's last step, done by its {@link AllocationBatch}. */
interface BatchLink {
  /** A new L2 table (written with the entry): link it in the L1 table. */
  isNew: boolean;
  l1Index: number;
  l2Off: number;
  table: DataView;
  index: number;
  host: number;
  cb: BlockCompletion;
}

/**
 * Allocating writes run together (QEMU gets the same from its metadata
 * caches' dependencies: many allocations, one flush). Every write of the
 * batch allocates (refcounts changed in memory only: the refcount block
 * sectors are marked dirty), copies on write and writes its data (and a new
 * L2 table) at once; when all have done so, each dirty refcount sector is
 * written once, the image file is flushed once (refcounts and data durable
 * before anything points at them), and then the L2 entries (one write per
 * 512-byte sector of a table, however many entries of the batch it holds)
 * and the L1 entries of new tables; each write completes when its entry's
 * sector is written. A crash at any point leaves at most leaked clusters.
 */
class AllocationBatch {
  readonly ops: AllocatingWrite[] = [];
  readonly #d: Qcow2Driver;
  readonly #next: () => void;
  readonly #links: BatchLink[] = [];
  readonly #writeback: boolean;
  #pending = 0;

  /** `writeback`: link in memory only (the next flush writes the entries). */
  constructor(d: Qcow2Driver, next: () => void, writeback: boolean) {
    this.#d = d;
    this.#next = next;
    this.#writeback = writeback;
  }

  /** Starts every write. */
  run(): void {
    this.#d.refcounts.deferWrites = true;
    this.#pending = this.ops.length;
    for (const op of this.ops) op.run(this.#next, this);
  }

  /** A write's data is written: it waits for the entry. */
  link(l: BatchLink): void {
    this.#links.push(l);
  }

  /** A write completed (error, in place) or linked. */
  settled(): void {
    if (--this.#pending === 0) this.#commit();
  }

  #commit(): void {
    const d = this.#d, rc = d.refcounts;
    const links = this.#links;
    if (this.#writeback) {
      d.linkInMemory(links);
      for (const l of links) l.cb(0);
      return this.#next();
    }
    rc.deferWrites = false;
    rc.writeDirty((ret) => {
      if (links.length === 0) return this.#next();
      if (ret < 0) return this.#fail(ret);
      d.child.flush((fr) => {
        if (fr < 0) return this.#fail(fr);
        const l2 = new Map<string, BatchLink[]>(), l1 = new Map<number, BatchLink[]>();
        for (const l of links) {
          if (l.isNew) {
            const k = Math.floor((l.l1Index * 8) / d.metadataUnit);
            l1.set(k, [...(l1.get(k) ?? []), l]);
          } else {
            const k = `${l.l2Off}/${Math.floor((l.index * 8) / d.metadataUnit)}`;
            l2.set(k, [...(l2.get(k) ?? []), l]);
          }
        }
        let pending = l1.size + l2.size;
        const done = (group: BatchLink[]) => (r: number) => {
          for (const l of group) l.cb(r);
          if (--pending === 0) this.#next();
        };
        for (const g of l2.values()) {
          const entries = g.map((l) => ({ index: l.index, host: l.host, zero: false }));
          d.setL2Entries(g[0].l2Off, g[0].table, entries, done(g));
        }
        for (const g of l1.values()) {
          const entries = g.map((l) => ({ index: l.l1Index, l2Off: l.l2Off, table: l.table }));
          d.setL1Entries(entries, done(g));
        }
      });
    });
  }

  #fail(ret: number): void {
    for (const l of this.#links) l.cb(ret);
    this.#next();
  }
}

/**
 * A guest flush of a writeback driver, queued behind the allocating writes
 * before it: {@link Qcow2Driver.commitMetadata} (which ends with the flush
 * of the image file).
 */
class MetadataCommit {
  readonly mode = "commit";
  readonly cluster = -1;
  readonly #d: Qcow2Driver;
  readonly #cb: BlockCompletion;

  constructor(d: Qcow2Driver, cb: BlockCompletion) {
    this.#d = d;
    this.#cb = cb;
  }

  run(next: () => void, _batch: null): void {
    this.#d.commitMetadata((ret) => {
      next();
      this.#cb(ret);
    });
  }

  fail(ret: number): void {
    this.#cb(ret);
  }
}

/** What the allocation queue holds. */
type QueuedAllocation = AllocatingWrite | MetadataCommit;

/** `len` zeroed bytes whose address is a multiple of `align` (a power of two). */
function alignedBuffer(len: number, align: number): Uint8Array {
  if (align <= 16) return new Uint8Array(len);
  const raw = new Uint8Array(len + align);
  const skip = (align - (addressOf(raw) % align)) % align;
  return raw.subarray(skip, skip + len);
}
