/**
 * Test helpers for virtio/: guest memory built from memfds with PROT_NONE
 * guard pages around every region (a stray access outside a region faults the
 * test process instead of passing silently), and a guest driver that lays out
 * descriptor tables, avail and used rings in that memory, in the manner of
 * rust-vmm's MockSplitQueue (written from scratch).
 *
 * @module
 */

import {
  close,
  ftruncate,
  MAP_ANONYMOUS,
  MAP_PRIVATE,
  MAP_SHARED,
  memfdCreate,
  mmap,
  munmap,
  PROT_NONE,
  PROT_READ,
  PROT_WRITE,
} from "../../sys/mod.ts";
import {
  GuestMemory,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
} from "../../virtio/mod.ts";

export const PAGE = 4096;
const MAP_FIXED = 0x10;

/** One region to create: guest-physical and frontend-virtual bases. */
export interface RegionSpec {
  gpa: number;
  size: number;
  /** Frontend virtual address; defaults to a value unlike `gpa`. */
  uva?: number;
}

/** A region as created, with its host mapping. */
export interface TestRegion {
  gpa: number;
  size: number;
  uva: number;
  host: number;
  fd: number;
  reserve: number;
}

/** Guest memory over memfd regions with guard pages; `close()` releases all. */
export class TestMemory {
  readonly mem: GuestMemory;
  readonly regions: TestRegion[];

  constructor(specs: RegionSpec[]) {
    this.regions = specs.map((s, i) => {
      const fd = memfdCreate(`guest${i}`);
      ftruncate(fd, s.size);
      // PROT_NONE reservation with one guard page each side; the memfd goes in the middle.
      const reserve = mmap(s.size + 2 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      const host = mmap(
        s.size,
        PROT_READ | PROT_WRITE,
        MAP_SHARED | MAP_FIXED,
        fd,
        0,
        reserve + PAGE,
      );
      if (host !== reserve + PAGE) throw new Error("MAP_FIXED did not map at the hint");
      return {
        gpa: s.gpa,
        size: s.size,
        uva: s.uva ?? 0x7f0000000000 + i * 0x100000000 + (s.gpa % 0x100000000),
        host,
        fd,
        reserve,
      };
    });
    this.mem = GuestMemory.fromMapped(
      this.regions.map((r) => ({
        guestPhysAddr: r.gpa,
        size: r.size,
        userAddr: r.uva,
        hostAddr: r.host,
      })),
    );
  }

  /** Frontend virtual address of guest-physical `gpa`. */
  uva(gpa: number): number {
    for (const r of this.regions) {
      if (gpa >= r.gpa && gpa < r.gpa + r.size) return r.uva + (gpa - r.gpa);
    }
    throw new Error(`gpa ${gpa} not in any region`);
  }

  /** Whether host range [addr, addr+len) lies inside one region's mapping. */
  containsHost(addr: number, len: number): boolean {
    return this.regions.some((r) => addr >= r.host && addr + len <= r.host + r.size);
  }

  /** A DataView over guest-physical bytes (throws when not mapped). */
  view(gpa: number, len: number): DataView {
    const b = this.mem.bytes(gpa, len);
    if (b === null) throw new Error(`gpa ${gpa} +${len} not mapped`);
    return new DataView(b.buffer, b.byteOffset, b.byteLength);
  }

  close(): void {
    this.mem.close();
    for (const r of this.regions) {
      munmap(r.reserve, r.size + 2 * PAGE);
      close(r.fd);
    }
  }
}

/** A buffer of a chain, as the driver describes it. */
export interface Buf {
  gpa: number;
  len: number;
  write?: boolean;
}

/** Guest-physical layout of one split queue. */
export interface RingLayout {
  desc: number;
  avail: number;
  used: number;
}

/** The standard layout of a queue of `size` at `base` (desc, avail, used, each aligned). */
export function ringLayout(base: number, size: number): RingLayout {
  const desc = base;
  const avail = desc + 16 * size;
  const used = (avail + 6 + 2 * size + 3) & ~3;
  return { desc, avail, used };
}

/** Bytes the layout of {@link ringLayout} occupies. */
export function ringBytes(size: number): number {
  const l = ringLayout(0, size);
  return l.used + 6 + 8 * size;
}

/** Plays the guest driver of one split queue. */
export class GuestDriver {
  readonly size: number;
  readonly layout: RingLayout;
  #tm: TestMemory;
  #availIdx = 0;
  #nextDesc = 0;

  constructor(tm: TestMemory, size: number, layout: RingLayout) {
    this.#tm = tm;
    this.size = size;
    this.layout = layout;
  }

  /** Writes descriptor `i` of the descriptor table (or of a table at `table`). */
  setDesc(i: number, addr: number, len: number, flags: number, next: number, table?: number): void {
    const dv = this.#tm.view((table ?? this.layout.desc) + 16 * i, 16);
    dv.setBigUint64(0, BigInt(addr), true);
    dv.setUint32(8, len >>> 0, true);
    dv.setUint16(12, flags, true);
    dv.setUint16(14, next, true);
  }

  /** Writes `bufs` as a chain of fresh descriptors (round robin); returns the head. */
  writeChain(bufs: Buf[]): number {
    const idx = bufs.map(() => this.#nextDesc++ % this.size);
    bufs.forEach((b, k) => {
      const last = k === bufs.length - 1;
      const flags = (last ? 0 : VRING_DESC_F_NEXT) | (b.write ? VRING_DESC_F_WRITE : 0);
      this.setDesc(idx[k], b.gpa, b.len, flags, last ? 0 : idx[k + 1]);
    });
    return idx[0];
  }

  /** Writes `bufs` as an indirect table at `tableGpa` and one descriptor pointing at it. */
  writeIndirect(bufs: Buf[], tableGpa: number): number {
    bufs.forEach((b, k) => {
      const last = k === bufs.length - 1;
      const flags = (last ? 0 : VRING_DESC_F_NEXT) | (b.write ? VRING_DESC_F_WRITE : 0);
      this.setDesc(k, b.gpa, b.len, flags, last ? 0 : k + 1, tableGpa);
    });
    const head = this.#nextDesc++ % this.size;
    this.setDesc(head, tableGpa, 16 * bufs.length, VRING_DESC_F_INDIRECT, 0);
    return head;
  }

  /** Puts `head` in the avail ring and publishes it (bumps avail idx). */
  makeAvailable(head: number): void {
    const a = this.layout.avail;
    this.#tm.view(a + 4 + 2 * (this.#availIdx % this.size), 2).setUint16(0, head, true);
    this.#availIdx = (this.#availIdx + 1) & 0xffff;
    this.#tm.view(a + 2, 2).setUint16(0, this.#availIdx, true);
  }

  /** writeChain + makeAvailable. */
  add(bufs: Buf[]): number {
    const head = this.writeChain(bufs);
    this.makeAvailable(head);
    return head;
  }

  /** Writes avail idx directly (to fake a jump). */
  setAvailIdx(v: number): void {
    this.#availIdx = v & 0xffff;
    this.#tm.view(this.layout.avail + 2, 2).setUint16(0, this.#availIdx, true);
  }

  get availIdx(): number {
    return this.#availIdx;
  }

  setAvailFlags(v: number): void {
    this.#tm.view(this.layout.avail, 2).setUint16(0, v, true);
  }

  /** used_event (in the avail ring, after ring[size]). */
  setUsedEvent(v: number): void {
    this.#tm.view(this.layout.avail + 4 + 2 * this.size, 2).setUint16(0, v, true);
  }

  usedIdx(): number {
    return this.#tm.view(this.layout.used + 2, 2).getUint16(0, true);
  }

  usedFlags(): number {
    return this.#tm.view(this.layout.used, 2).getUint16(0, true);
  }

  /** avail_event (in the used ring, after ring[size]). */
  availEvent(): number {
    return this.#tm.view(this.layout.used + 4 + 8 * this.size, 2).getUint16(0, true);
  }

  /** Used element `i` (ring slot i % size). */
  used(i: number): { id: number; len: number } {
    const dv = this.#tm.view(this.layout.used + 4 + 8 * (i % this.size), 8);
    return { id: dv.getUint32(0, true), len: dv.getUint32(4, true) };
  }
}
