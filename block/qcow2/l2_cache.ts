/**
 * Reads one table of `bytes` at `offset` of the image file; calls `cb` with 0
 * and the table, or -errno. Never calls back before returning.
 */
export type L2TableLoader = (
  offset: number,
  bytes: number,
  cb: (ret: number, table: DataView | null) => void,
) => void;

type Waiter = (ret: number, table: DataView | null) => void;

/**
 * An LRU cache of L2 tables keyed by their offset in the image file (QEMU's
 * Qcow2Cache for L2 tables, sized by `l2-cache-size`). A lookup that misses
 * starts one read through the loader; requests that miss on the same table
 * meanwhile wait for that read instead of issuing their own. A failed read
 * caches nothing. One cache per driver instance (per IOThread): no locking.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { L2Cache } from "./l2_cache.ts";
 * const loads: number[] = [];
 * const cache = new L2Cache(2, 512, (off, bytes, cb) => {
 *   loads.push(off);
 *   queueMicrotask(() => cb(0, new DataView(new ArrayBuffer(bytes))));
 * });
 * let got = 0;
 * cache.fetch(4096, () => got++);
 * cache.fetch(4096, () => got++);   // waits for the same read
 * await new Promise((r) => setTimeout(r, 0));
 * assert.equal(got, 2);
 * assert.deepEqual(loads, [4096]);
 * assert(cache.lookup(4096) !== undefined);
 * ```
 */
export class L2Cache {
  /** Most tables kept. */
  readonly capacity: number;
  readonly #tableBytes: number;
  readonly #load: L2TableLoader;
  readonly #tables = new Map<number, DataView>();
  readonly #pending = new Map<number, Waiter[]>();
  /** The version each cached table was read or put at (shared images only). */
  readonly #versions = new Map<number, number>();
  readonly #version: ((offset: number) => number) | null;
  /** Tables with changes not written yet: never evicted (see {@link pin}). */
  readonly #pinned = new Set<number>();
  #mru = -1;
  /** Lookups that found the table, and reads started. */
  hits = 0;
  misses = 0;

  /**
   * `version` (an image written by several threads): the current version of
   * the table at an offset; a cached table whose version moved since it was
   * read or put is stale, and {@link lookup} misses it.
   */
  constructor(
    capacity: number,
    tableBytes: number,
    load: L2TableLoader,
    version?: (offset: number) => number,
  ) {
    this.#version = version ?? null;
    if (!Number.isInteger(capacity) || capacity < 1) {
      throw new RangeError(`L2Cache: bad capacity ${capacity}`);
    }
    this.capacity = capacity;
    this.#tableBytes = tableBytes;
    this.#load = load;
  }

  /** Tables held now. */
  get size(): number {
    return this.#tables.size;
  }

  /** The table at `offset` if cached (and marks it most recently used). Hot path. */
  lookup(offset: number): DataView | undefined {
    const t = this.#tables.get(offset);
    if (t === undefined) return undefined;
    if (this.#version !== null && this.#versions.get(offset) !== this.#version(offset)) {
      this.#tables.delete(offset);
      this.#versions.delete(offset);
      if (this.#mru === offset) this.#mru = -1;
      return undefined;
    }
    this.hits++;
    if (this.#mru !== offset) {
      this.#tables.delete(offset);
      this.#tables.set(offset, t);
      this.#mru = offset;
    }
    return t;
  }

  /** Loads the table at `offset` (or joins the read already under way). */
  fetch(offset: number, cb: Waiter): void {
    const waiting = this.#pending.get(offset);
    if (waiting !== undefined) {
      waiting.push(cb);
      return;
    }
    this.misses++;
    this.#pending.set(offset, [cb]);
    // Sampled before the read: a change during it makes the copy stale.
    const version = this.#version === null ? 0 : this.#version(offset);
    this.#load(offset, this.#tableBytes, (ret, table) => {
      const waiters = this.#pending.get(offset)!;
      this.#pending.delete(offset);
      // A table put() meanwhile is newer than what was read: keep it.
      const cur = this.#tables.get(offset);
      if (ret === 0 && table !== null && cur === undefined) this.#insert(offset, table, version);
      const t = cur ?? table;
      for (const w of waiters) w(ret, ret === 0 ? t : null);
    });
  }

  /**
   * Puts a table the driver has just made or changed (a new L2 table, an
   * updated entry), so lookups see it at once. A read of the same table
   * that completes later does not replace it.
   */
  put(offset: number, table: DataView): void {
    this.#insert(offset, table, this.#version === null ? 0 : this.#version(offset));
  }

  /**
   * Keeps the table at `offset` (which must be cached) until
   * {@link unpinAll}: it holds changes the driver has not written yet.
   */
  pin(offset: number): void {
    this.#pinned.add(offset);
  }

  /** The changes are written: the pinned tables may be evicted again. */
  unpinAll(): void {
    this.#pinned.clear();
  }

  /** Drops every table (none may be loading). */
  clear(): void {
    this.#tables.clear();
    this.#versions.clear();
    this.#mru = -1;
  }

  #insert(offset: number, table: DataView, version: number): void {
    this.#tables.delete(offset);
    if (this.#tables.size >= this.capacity) {
      // The least recently used tables that hold no unwritten change.
      for (const oldest of this.#tables.keys()) {
        if (this.#tables.size < this.capacity) break;
        if (this.#pinned.has(oldest)) continue;
        this.#tables.delete(oldest);
        this.#versions.delete(oldest);
      }
    }
    this.#tables.set(offset, table);
    if (this.#version !== null) this.#versions.set(offset, version);
    this.#mru = offset;
  }
}
