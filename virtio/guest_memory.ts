import { fstat, type MappedRegion, mmapShared, sealShrink, viewAt } from "../sys/mod.ts";

/**
 * One entry of the vhost-user memory table (VHOST_USER_SET_MEM_TABLE): `size`
 * bytes of guest-physical memory at `guestPhysAddr`, mapped in the frontend
 * (the VMM) at `userAddr`, backed by `fd` at byte `mmapOffset`.
 *
 * Values may be `bigint` (as read from a u64 field of a message) or `number`;
 * a value that is not an exact non-negative integer is rejected.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { MemoryRegion } from "./guest_memory.ts";
 * const r: MemoryRegion = { guestPhysAddr: 0, size: 1 << 20, userAddr: 0x7f0000000000, mmapOffset: 0, fd: 3 };
 * assert.equal(r.size, 1 << 20);
 * ```
 */
export interface MemoryRegion {
  guestPhysAddr: number | bigint;
  size: number | bigint;
  userAddr: number | bigint;
  mmapOffset: number | bigint;
  fd: number;
}

/**
 * A region that is already mapped in this process at `hostAddr`: what
 * {@link GuestMemory.regions} returns and {@link GuestMemory.fromMapped}
 * accepts. It is plain data, so it can be posted to a Worker (an IOThread),
 * which rebuilds its own GuestMemory over the same mappings.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { MappedMemoryRegion } from "./guest_memory.ts";
 * const r: MappedMemoryRegion = { guestPhysAddr: 0, size: 4096, userAddr: 0, hostAddr: 0x10000 };
 * assert.equal(r.hostAddr, 0x10000);
 * ```
 */
export interface MappedMemoryRegion {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  hostAddr: number;
}

/** Why a memory table was rejected. */
export type GuestMemoryErrorKind =
  | "Empty" // a region of size 0, or no region at all
  | "BadValue" // not an exact non-negative integer, or a bad fd
  | "WrapAround" // start + size wraps past 2^64
  | "TooLarge" // start + size beyond 2^53 (not exact as a JS number; no x86 guest has it)
  | "Overlap"; // two regions share guest-physical addresses

/**
 * A memory table that cannot be used (from a guest or a socket: untrusted).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { GuestMemory, GuestMemoryError } from "./guest_memory.ts";
 * assert.throws(
 *   () => GuestMemory.fromMapped([{ guestPhysAddr: 0, size: 0, userAddr: 0, hostAddr: 4096 }]),
 *   (e) => e instanceof GuestMemoryError && e.kind === "Empty",
 * );
 * ```
 */
export class GuestMemoryError extends Error {
  /** What was wrong. */
  readonly kind: GuestMemoryErrorKind;

  constructor(kind: GuestMemoryErrorKind, detail: string) {
    super(`guest memory: ${kind}: ${detail}`);
    this.name = "GuestMemoryError";
    this.kind = kind;
  }
}

const TWO_53 = 2 ** 53;
const TWO_64 = 1n << 64n;
const PAGE_SIZE = 4096;

function exact(v: number | bigint, what: string): number {
  if (typeof v === "bigint") {
    if (v < 0n) throw new GuestMemoryError("BadValue", `${what} ${v} is negative`);
    if (v >= TWO_64) throw new GuestMemoryError("BadValue", `${what} ${v} exceeds u64`);
    if (v >= BigInt(TWO_53)) throw new GuestMemoryError("TooLarge", `${what} ${v}`);
    return Number(v);
  }
  if (!Number.isSafeInteger(v) || v < 0) {
    throw new GuestMemoryError("BadValue", `${what} ${v} is not an exact non-negative integer`);
  }
  return v;
}

function checkEnd(start: number | bigint, size: number | bigint, what: string): void {
  const end = BigInt(start) + BigInt(size);
  if (end > TWO_64) throw new GuestMemoryError("WrapAround", `${what} ${start} + ${size}`);
  if (end > BigInt(TWO_53)) throw new GuestMemoryError("TooLarge", `${what} ${start} + ${size}`);
}

/**
 * The guest's memory as the vhost-user frontend described it, mapped into this
 * process: translates guest-physical addresses (descriptor buffers) and
 * frontend-virtual addresses (ring addresses from VHOST_USER_SET_VRING_ADDR)
 * into host addresses, with bounds checks. Like rust-vmm's `GuestMemoryMmap`.
 *
 * {@link hostAddr} succeeds only when the whole range lies inside ONE region
 * (what rings and indirect tables need: one contiguous host view). A range
 * that spans guest-physically adjacent regions (memory hotplug, RAM split
 * around a PCI hole) is not contiguous in this process, whose mappings of the
 * regions are separate: {@link pieceCount} and {@link hostAddrPrefix}
 * translate it one region at a time, as QEMU's dma_memory_map loop in
 * virtqueue_map_desc does, so a descriptor becomes one iovec per region. A
 * range that touches a hole is an error either way. Nothing is ever read or
 * written outside a region.
 *
 * Lifetime: views handed out (and Virtqueues built on this memory) become
 * invalid at {@link close}; drop them first, or the process faults.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { GuestMemory } from "./guest_memory.ts";
 * import { close, ftruncate, memfdCreate } from "../sys/mod.ts";
 * const fd = memfdCreate("ram");
 * ftruncate(fd, 1 << 16);
 * const mem = GuestMemory.map([
 *   { guestPhysAddr: 0x100000, size: 1 << 16, userAddr: 0x7f0000000000, mmapOffset: 0, fd },
 * ]);
 * close(fd); // the mapping stays
 * assert(mem.hostAddr(0x100000, 16) > 0);
 * assert.equal(mem.hostAddr(0x100000 + (1 << 16) - 8, 16), -1);
 * mem.bytes(0x100010, 4)!.set([1, 2, 3, 4]);
 * mem.close();
 * ```
 */
export class GuestMemory {
  readonly #count: number;
  readonly #gpaStart: Float64Array;
  readonly #gpaEnd: Float64Array;
  readonly #uvaStart: Float64Array;
  readonly #uvaEnd: Float64Array;
  readonly #host: Float64Array;
  readonly #owned: MappedRegion[];
  readonly #bytes: (Uint8Array | undefined)[];
  readonly #views: (DataView | undefined)[];
  readonly #words: (Uint32Array | undefined)[];
  #last = 0;
  #lastUser = 0;
  #prefixLength = 0;
  #closed = false;

  #unsealed = 0;

  private constructor(regions: MappedMemoryRegion[], owned: MappedRegion[]) {
    const sorted = [...regions].sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
    const n = sorted.length;
    this.#count = n;
    this.#gpaStart = new Float64Array(n);
    this.#gpaEnd = new Float64Array(n);
    this.#uvaStart = new Float64Array(n);
    this.#uvaEnd = new Float64Array(n);
    this.#host = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      const r = sorted[i];
      this.#gpaStart[i] = r.guestPhysAddr;
      this.#gpaEnd[i] = r.guestPhysAddr + r.size;
      this.#uvaStart[i] = r.userAddr;
      this.#uvaEnd[i] = r.userAddr + r.size;
      this.#host[i] = r.hostAddr;
    }
    this.#owned = owned;
    this.#bytes = new Array(n).fill(undefined);
    this.#views = new Array(n).fill(undefined);
    this.#words = new Array(n).fill(undefined);
  }

  static #validate(regions: readonly MappedMemoryRegion[]): void {
    if (regions.length === 0) throw new GuestMemoryError("Empty", "no regions");
    const sorted = [...regions].sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
    for (let i = 1; i < sorted.length; i++) {
      const prev = sorted[i - 1], cur = sorted[i];
      if (cur.guestPhysAddr < prev.guestPhysAddr + prev.size) {
        throw new GuestMemoryError(
          "Overlap",
          `[${prev.guestPhysAddr}, +${prev.size}) and [${cur.guestPhysAddr}, +${cur.size})`,
        );
      }
    }
  }

  static #normalize(
    r: Omit<MemoryRegion, "fd" | "mmapOffset"> & { hostAddr?: number },
  ): Omit<MappedMemoryRegion, "hostAddr"> {
    const size = exact(r.size, "size");
    if (size === 0) throw new GuestMemoryError("Empty", `region at ${r.guestPhysAddr} has size 0`);
    for (
      const [v, what] of [[r.guestPhysAddr, "guestPhysAddr"], [r.userAddr, "userAddr"]] as const
    ) {
      if (typeof v === "bigint" ? v < 0n || v >= TWO_64 : !Number.isSafeInteger(v) || v < 0) {
        throw new GuestMemoryError("BadValue", `${what} ${v} is not a u64 integer`);
      }
    }
    checkEnd(r.guestPhysAddr, r.size, "guestPhysAddr");
    checkEnd(r.userAddr, r.size, "userAddr");
    return {
      guestPhysAddr: exact(r.guestPhysAddr, "guestPhysAddr"),
      size,
      userAddr: exact(r.userAddr, "userAddr"),
    };
  }

  /**
   * Validates a vhost-user memory table and mmaps every region (MAP_SHARED,
   * read-write). Throws {@link GuestMemoryError} for an empty table, empty,
   * wrapping or overlapping regions, an fd that is not a regular file (a
   * memfd is one; a block or character device is not: its size cannot be
   * checked), a region beyond the end of its file, and SysError when fstat
   * or mmap fails; nothing
   * stays mapped after a throw. The fds are not closed: the caller may close
   * them once this returns.
   *
   * `mmapOffset` need not be page-aligned: the mapping starts at the page
   * below it and the region begins at the offset inside the mapping.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory } from "./guest_memory.ts";
   * import { ftruncate, memfdCreate } from "../sys/mod.ts";
   * const fd = memfdCreate("ram");
   * ftruncate(fd, 8192);
   * const mem = GuestMemory.map([{ guestPhysAddr: 0, size: 4096, userAddr: 0, mmapOffset: 4096, fd }]);
   * assert.equal(mem.regionCount, 1);
   * mem.close();
   * ```
   */
  static map(regions: readonly MemoryRegion[]): GuestMemory {
    const plain = regions.map((r) => {
      if (!Number.isInteger(r.fd) || r.fd < 0) {
        throw new GuestMemoryError("BadValue", `fd ${r.fd}`);
      }
      const off = exact(r.mmapOffset, "mmapOffset");
      const n = GuestMemory.#normalize(r);
      // Pages of a MAP_SHARED file mapping beyond the end of the file raise
      // SIGBUS on first access (the whole process dies): refuse them here,
      // and seal the file against shrinking first where it allows (a memfd
      // with MFD_ALLOW_SEALING; QEMU's memory-backend-memfd seals it itself).
      // Only a regular file (memfds, tmpfs and hugetlbfs files are) has a
      // size that says which pages exist: a block device's size is not
      // fstat's (an unbound loop device maps with size 0 and faults), a
      // character device's is unknown. Those are refused.
      const sealed = sealShrink(r.fd);
      const st = fstat(r.fd);
      if (!st.isRegularFile) {
        throw new GuestMemoryError(
          "BadValue",
          `fd ${r.fd} is not a regular file or memfd (st_mode 0o${st.mode.toString(8)})`,
        );
      }
      if (off + n.size > st.size) {
        throw new GuestMemoryError(
          "BadValue",
          `region [${off}, +${n.size}) of fd ${r.fd} ends beyond the file (${st.size} bytes)`,
        );
      }
      return { ...n, off, fd: r.fd, sealed };
    });
    GuestMemory.#validate(plain.map((p) => ({ ...p, hostAddr: 0 })));
    const owned: MappedRegion[] = [];
    const mapped: MappedMemoryRegion[] = [];
    try {
      for (const p of plain) {
        const alignedOff = p.off - (p.off % PAGE_SIZE);
        const delta = p.off - alignedOff;
        const m = mmapShared(p.fd, p.size + delta, alignedOff);
        owned.push(m);
        mapped.push({
          guestPhysAddr: p.guestPhysAddr,
          size: p.size,
          userAddr: p.userAddr,
          hostAddr: m.addr + delta,
        });
      }
    } catch (e) {
      for (const m of owned) m.unmap();
      throw e;
    }
    const mem = new GuestMemory(mapped, owned);
    mem.#unsealed = plain.filter((p) => !p.sealed).length;
    return mem;
  }

  /**
   * Regions of {@link map} whose file could still shrink under us (not
   * sealed with F_SEAL_SHRINK and not sealable): a front-end that truncates
   * such a file makes the next access to the lost pages raise SIGBUS.
   */
  get unsealedRegions(): number {
    return this.#unsealed;
  }

  /**
   * A GuestMemory over regions that are already mapped in this process (by a
   * test, or by {@link map} on another thread: pass {@link regions} to the
   * Worker). It does not own the mappings: {@link close} leaves them mapped.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory } from "./guest_memory.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const m = mmapAnonymous(4096);
   * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0x1000, size: 4096, userAddr: 0, hostAddr: m.addr }]);
   * assert.equal(mem.hostAddr(0x1000, 4096), m.addr);
   * mem.close();
   * m.unmap();
   * ```
   */
  static fromMapped(regions: readonly MappedMemoryRegion[]): GuestMemory {
    const plain = regions.map((r) => {
      if (!Number.isSafeInteger(r.hostAddr) || r.hostAddr <= 0) {
        throw new GuestMemoryError("BadValue", `hostAddr ${r.hostAddr}`);
      }
      return { ...GuestMemory.#normalize(r), hostAddr: r.hostAddr };
    });
    GuestMemory.#validate(plain);
    return new GuestMemory(plain, []);
  }

  /** Number of regions (0 after {@link close}). */
  get regionCount(): number {
    return this.#closed ? 0 : this.#count;
  }

  /**
   * The regions as plain data, sorted by guest-physical address (for a Worker's
   * {@link fromMapped}, or for logging).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory } from "./guest_memory.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const m = mmapAnonymous(4096);
   * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0, size: 4096, userAddr: 8192, hostAddr: m.addr }]);
   * assert.equal(mem.regions()[0].userAddr, 8192);
   * m.unmap();
   * ```
   */
  regions(): MappedMemoryRegion[] {
    const out: MappedMemoryRegion[] = [];
    for (let i = 0; i < this.regionCount; i++) {
      out.push({
        guestPhysAddr: this.#gpaStart[i],
        size: this.#gpaEnd[i] - this.#gpaStart[i],
        userAddr: this.#uvaStart[i],
        hostAddr: this.#host[i],
      });
    }
    return out;
  }

  /**
   * Host address of guest-physical `[gpa, gpa + len)`, or -1 unless the whole
   * range lies inside one region. `len` 0 asks whether `gpa` itself lies inside
   * a region. Non-integer or negative input gets -1. On success
   * {@link lastRegion} names the region. Hot path: no allocation (the last
   * region hit is tried first, then a linear scan).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory } from "./guest_memory.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const m = mmapAnonymous(4096);
   * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0x1000, size: 4096, userAddr: 0, hostAddr: m.addr }]);
   * assert.equal(mem.hostAddr(0x1ff0, 16), m.addr + 0xff0);
   * assert.equal(mem.hostAddr(0x1ff0, 17), -1);
   * assert.equal(mem.hostAddr(0x2000, 0), -1);
   * m.unmap();
   * ```
   */
  hostAddr(gpa: number, len: number): number {
    if (!Number.isInteger(gpa) || !Number.isInteger(len) || len < 0) return -1;
    const start = this.#gpaStart, end = this.#gpaEnd;
    let i = this.#last;
    if (i < this.#count && gpa >= start[i] && gpa < end[i] && len <= end[i] - gpa) {
      return this.#host[i] + (gpa - start[i]);
    }
    const n = this.#closed ? 0 : this.#count;
    for (i = 0; i < n; i++) {
      if (gpa >= start[i] && gpa < end[i]) {
        if (len > end[i] - gpa) return -1;
        this.#last = i;
        return this.#host[i] + (gpa - start[i]);
      }
    }
    return -1;
  }

  /**
   * Host address of guest-physical `gpa` when it lies in a region, or -1; on
   * success {@link prefixLength} says how many of the `len` bytes from `gpa`
   * lie in that region (all of them, or up to the region's end) and
   * {@link lastRegion} names it. One step of translating a range that spans
   * adjacent regions (QEMU's address_space_map, which shortens `*plen` the
   * same way); call {@link pieceCount} first to know the whole range is
   * mapped. Hot path: no allocation.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory } from "./guest_memory.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const a = mmapAnonymous(4096), b = mmapAnonymous(4096);
   * const mem = GuestMemory.fromMapped([
   *   { guestPhysAddr: 0x1000, size: 4096, userAddr: 0, hostAddr: a.addr },
   *   { guestPhysAddr: 0x2000, size: 4096, userAddr: 4096, hostAddr: b.addr }, // adjacent
   * ]);
   * assert.equal(mem.hostAddrPrefix(0x1ff0, 32), a.addr + 0xff0);
   * assert.equal(mem.prefixLength, 16);
   * assert.equal(mem.hostAddrPrefix(0x2000, 16), b.addr);
   * assert.equal(mem.prefixLength, 16);
   * a.unmap();
   * b.unmap();
   * ```
   */
  hostAddrPrefix(gpa: number, len: number): number {
    if (!Number.isInteger(gpa) || !Number.isInteger(len) || len < 0) return -1;
    const start = this.#gpaStart, end = this.#gpaEnd;
    const n = this.#closed ? 0 : this.#count;
    // The region of the last hit, then the next one (where the next piece of
    // a range being split lies), then a scan.
    let i = this.#last;
    if (!(i < n && gpa >= start[i] && gpa < end[i])) {
      i++;
      if (!(i < n && gpa >= start[i] && gpa < end[i])) {
        for (i = 0; i < n; i++) if (gpa >= start[i] && gpa < end[i]) break;
        if (i === n) return -1;
      }
    }
    const left = end[i] - gpa;
    this.#prefixLength = len < left ? len : left;
    this.#last = i;
    return this.#host[i] + (gpa - start[i]);
  }

  /** Bytes of the range the last successful {@link hostAddrPrefix} covered. Hot path. */
  get prefixLength(): number {
    return this.#prefixLength;
  }

  /**
   * How many regions guest-physical `[gpa, gpa + len)` spans (1 when
   * {@link hostAddr} would translate it), or -1 when any byte of it is in
   * no region (a hole, below or beyond guest memory) or `len` is 0. Regions
   * never overlap, so a range in more than one region crosses from each to
   * the next at a shared boundary: they are guest-physically adjacent. Hot
   * path: no allocation, O(regions) (callers try {@link hostAddr} first;
   * this runs only for ranges that are not inside one region).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory } from "./guest_memory.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const a = mmapAnonymous(4096), b = mmapAnonymous(4096);
   * const mem = GuestMemory.fromMapped([
   *   { guestPhysAddr: 0x1000, size: 4096, userAddr: 0, hostAddr: a.addr },
   *   { guestPhysAddr: 0x2000, size: 4096, userAddr: 4096, hostAddr: b.addr },
   * ]);
   * assert.equal(mem.pieceCount(0x1000, 16), 1);
   * assert.equal(mem.pieceCount(0x1ff0, 32), 2);
   * assert.equal(mem.pieceCount(0x2ff0, 32), -1); // runs off the end
   * a.unmap();
   * b.unmap();
   * ```
   */
  pieceCount(gpa: number, len: number): number {
    if (!Number.isInteger(gpa) || !Number.isInteger(len) || len <= 0) return -1;
    const start = this.#gpaStart, end = this.#gpaEnd;
    const n = this.#closed ? 0 : this.#count;
    let i = 0;
    while (i < n && !(gpa >= start[i] && gpa < end[i])) i++;
    if (i === n) return -1;
    // Sorted and disjoint: the rest of the range must lie in the regions that
    // follow, each starting where the previous one ends.
    let pieces = 1;
    let left = len - (end[i] - gpa);
    while (left > 0) {
      i++;
      if (i === n || start[i] !== end[i - 1]) return -1;
      pieces++;
      left -= end[i] - start[i];
    }
    return pieces;
  }

  /**
   * Host address of frontend-virtual `[uva, uva + len)` (the VMM's own address
   * for guest RAM, as VHOST_USER_SET_VRING_ADDR sends ring addresses), or -1
   * unless it lies inside one region. Same rules as {@link hostAddr}.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory } from "./guest_memory.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const m = mmapAnonymous(4096);
   * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0, size: 4096, userAddr: 0x7f00000000, hostAddr: m.addr }]);
   * assert.equal(mem.userToHost(0x7f00000010, 8), m.addr + 16);
   * assert.equal(mem.userToHost(0x10, 8), -1);
   * m.unmap();
   * ```
   */
  userToHost(uva: number, len: number): number {
    if (!Number.isInteger(uva) || !Number.isInteger(len) || len < 0) return -1;
    const start = this.#uvaStart, end = this.#uvaEnd;
    let i = this.#lastUser;
    if (i < this.#count && uva >= start[i] && uva < end[i] && len <= end[i] - uva) {
      return this.#host[i] + (uva - start[i]);
    }
    const n = this.#closed ? 0 : this.#count;
    for (i = 0; i < n; i++) {
      if (uva >= start[i] && uva < end[i] && len <= end[i] - uva) {
        this.#lastUser = i;
        return this.#host[i] + (uva - start[i]);
      }
    }
    return -1;
  }

  /**
   * Guest-physical address of frontend-virtual `uva` (the start of `len`
   * bytes inside one region), or -1.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory } from "./guest_memory.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const m = mmapAnonymous(4096);
   * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0x5000, size: 4096, userAddr: 0x9000, hostAddr: m.addr }]);
   * assert.equal(mem.userToGuest(0x9010, 4), 0x5010);
   * m.unmap();
   * ```
   */
  userToGuest(uva: number, len: number): number {
    const host = this.userToHost(uva, len);
    if (host < 0) return -1;
    const i = this.#lastUser;
    return this.#gpaStart[i] + (host - this.#host[i]);
  }

  /** Index of the region of the last successful {@link hostAddr}. Hot path. */
  get lastRegion(): number {
    return this.#last;
  }

  /** Host address of the first byte of region `i`. */
  regionHostAddr(i: number): number {
    return this.#host[i];
  }

  /**
   * The whole of region `i` as bytes, created once and reused (hot path after
   * the first call): offsets are `hostAddr - regionHostAddr(i)`.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory } from "./guest_memory.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const m = mmapAnonymous(4096);
   * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0, size: 4096, userAddr: 0, hostAddr: m.addr }]);
   * assert.equal(mem.regionBytes(0).length, 4096);
   * assert.equal(mem.regionBytes(0), mem.regionBytes(0));
   * m.unmap();
   * ```
   */
  regionBytes(i: number): Uint8Array {
    if (this.#closed || !(i >= 0 && i < this.#count)) {
      throw new RangeError(`GuestMemory: no region ${i}`);
    }
    let b = this.#bytes[i];
    if (b === undefined) {
      b = new Uint8Array(viewAt(this.#host[i], this.#gpaEnd[i] - this.#gpaStart[i]));
      this.#bytes[i] = b;
    }
    return b;
  }

  /**
   * Region `i` as 32-bit words (host byte order: little-endian here, as
   * virtio's fields), created once (see {@link regionBytes}); word `k` is
   * bytes `4k .. 4k + 3` of the region, and a last partial word is left out.
   * For reading descriptor tables at 4-byte aligned offsets. Hot path after
   * the first call.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory } from "./guest_memory.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const m = mmapAnonymous(4096);
   * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0, size: 4096, userAddr: 0, hostAddr: m.addr }]);
   * mem.regionBytes(0).set([1, 2, 0, 0], 8);
   * assert.equal(mem.regionWords(0)[2], 0x201);
   * assert.equal(mem.regionWords(0).length, 1024);
   * m.unmap();
   * ```
   */
  regionWords(i: number): Uint32Array {
    let w = this.#words[i];
    if (w === undefined) {
      const b = this.regionBytes(i);
      // Not `>>> 2`: regions of 4 GiB and more have lengths past 2^32.
      w = new Uint32Array(b.buffer, b.byteOffset, Math.floor(b.byteLength / 4));
      this.#words[i] = w;
    }
    return w;
  }

  /** The whole of region `i` as a DataView, created once (see {@link regionBytes}). */
  regionView(i: number): DataView {
    let v = this.#views[i];
    if (v === undefined) {
      const b = this.regionBytes(i);
      v = new DataView(b.buffer, b.byteOffset, b.byteLength);
      this.#views[i] = v;
    }
    return v;
  }

  /**
   * A view of guest-physical `[gpa, gpa + len)` (no copy), or null unless it
   * lies inside one region. Allocates a view: control path and tests.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory } from "./guest_memory.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const m = mmapAnonymous(4096);
   * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0x1000, size: 4096, userAddr: 0, hostAddr: m.addr }]);
   * mem.bytes(0x1004, 1)![0] = 9;
   * assert.equal(m.bytes[4], 9);
   * assert.equal(mem.bytes(0x1ffc, 8), null);
   * m.unmap();
   * ```
   */
  bytes(gpa: number, len: number): Uint8Array | null {
    const host = this.hostAddr(gpa, len);
    if (host < 0) return null;
    const i = this.#last;
    return this.regionBytes(i).subarray(host - this.#host[i], host - this.#host[i] + len);
  }

  /**
   * Forgets every region (every translation fails afterwards) and munmaps the
   * regions that {@link map} mapped. Idempotent.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory } from "./guest_memory.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const m = mmapAnonymous(4096);
   * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0, size: 4096, userAddr: 0, hostAddr: m.addr }]);
   * mem.close();
   * assert.equal(mem.hostAddr(0, 1), -1);
   * m.unmap();
   * ```
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#last = this.#count; // makes the cached-hit test fail
    this.#lastUser = this.#count;
    this.#bytes.fill(undefined);
    this.#views.fill(undefined);
    this.#words.fill(undefined);
    for (const m of this.#owned) m.unmap();
  }
}
