/**
 * The client's "guest RAM": one memfd mapped shared into this process and
 * described to the back-end as one or more regions. Guest-physical addresses
 * deliberately differ from the user (host virtual) addresses, and regions
 * are not contiguous in guest-physical space, so a back-end that confuses
 * the two address spaces, or ignores mmap offsets, fails loudly.
 *
 * @module
 */

import {
  close,
  ftruncate,
  type MappedRegion,
  memfdCreate,
  MFD_ALLOW_SEALING,
  mmapShared,
} from "../sys/mod.ts";

/** Guest-physical address of the first region (4 GiB: never equal to a user address). */
export const GPA_BASE = 0x1_0000_0000;
/** Guest-physical hole between consecutive regions. */
export const GPA_GAP = 0x4000_0000;

/** One region as sent in SET_MEM_TABLE. */
export interface GuestRamRegion {
  /** Guest-physical address of the first byte. */
  guestPhysAddr: number;
  /** Bytes. */
  size: number;
  /** This process's virtual address of the first byte. */
  userAddr: number;
  /** Offset in the memfd. */
  mmapOffset: number;
}

/** A block of guest memory handed out by {@link GuestRam.alloc}. */
export interface GuestBuffer {
  /** Guest-physical address (what descriptors carry). */
  gpa: number;
  /** Host (= user) address in this process. */
  addr: number;
  /** Length in bytes. */
  length: number;
  /** The bytes, viewed without copying. */
  bytes: Uint8Array;
}

/**
 * memfd-backed guest memory split in `regionCount` equal regions, each with a
 * bump allocator.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { GuestRam } from "./guest_ram.ts";
 * const ram = GuestRam.create(1 << 20, 2);
 * const b = ram.alloc(1, 4096, 4096);
 * assert.notEqual(b.gpa, b.addr);
 * assert.equal(ram.regions.length, 2);
 * ram.close();
 * ```
 */
export class GuestRam {
  /** The memfd (sent with every region). */
  readonly fd: number;
  /** The regions, in order. */
  readonly regions: readonly GuestRamRegion[];
  readonly #map: MappedRegion;
  readonly #next: number[];

  private constructor(fd: number, map: MappedRegion, regions: GuestRamRegion[]) {
    this.fd = fd;
    this.#map = map;
    this.regions = regions;
    this.#next = regions.map(() => 0);
  }

  /**
   * Creates `size` bytes (rounded up to 2 MiB per region) split in
   * `regionCount` regions, `gap` bytes of guest-physical hole after each
   * (0: adjacent regions, as memory hotplug makes them).
   */
  static create(size: number, regionCount = 2, gap = GPA_GAP): GuestRam {
    const unit = 2 << 20;
    const per = Math.max(unit, Math.ceil(size / regionCount / unit) * unit);
    const total = per * regionCount;
    // Sealable, as QEMU's memory-backend-memfd: the back-end seals it against shrinking.
    const fd = memfdCreate("dataplane-client-ram", MFD_ALLOW_SEALING);
    try {
      ftruncate(fd, total);
      const map = mmapShared(fd, total, 0);
      const regions: GuestRamRegion[] = [];
      for (let i = 0; i < regionCount; i++) {
        regions.push({
          guestPhysAddr: GPA_BASE + i * (per + gap),
          size: per,
          userAddr: map.addr + i * per,
          mmapOffset: i * per,
        });
      }
      return new GuestRam(fd, map, regions);
    } catch (err) {
      close(fd);
      throw err;
    }
  }

  /** Allocates `length` bytes aligned to `align` in region `region`; throws when it is full. */
  alloc(region: number, length: number, align = 64): GuestBuffer {
    const r = this.regions[region];
    if (!r) throw new RangeError(`GuestRam: no region ${region}`);
    const off = Math.ceil(this.#next[region] / align) * align;
    if (off + length > r.size) {
      throw new RangeError(`GuestRam: region ${region} is full (${length} bytes requested)`);
    }
    this.#next[region] = off + length;
    const addr = r.userAddr + off;
    return {
      gpa: r.guestPhysAddr + off,
      addr,
      length,
      bytes: new Uint8Array(this.#map.buffer, addr - this.#map.addr, length),
    };
  }

  /**
   * The bytes of guest-physical `[gpa, gpa + length)` without allocating from
   * the regions (tests place buffers themselves, e.g. across two adjacent
   * regions: this process maps the regions back to back). Throws unless every
   * byte is in a region.
   */
  at(gpa: number, length: number): GuestBuffer {
    for (let i = 0; i < this.regions.length; i++) {
      const r = this.regions[i];
      if (gpa < r.guestPhysAddr || gpa >= r.guestPhysAddr + r.size) continue;
      let end = r.guestPhysAddr + r.size;
      for (let j = i + 1; end < gpa + length && j < this.regions.length; j++) {
        if (this.regions[j].guestPhysAddr !== end) break;
        end += this.regions[j].size;
      }
      if (gpa + length > end) break;
      const addr = r.userAddr + (gpa - r.guestPhysAddr);
      return {
        gpa,
        addr,
        length,
        bytes: new Uint8Array(this.#map.buffer, addr - this.#map.addr, length),
      };
    }
    throw new RangeError(`GuestRam: [${gpa}, +${length}) is not all guest memory`);
  }

  /** Unmaps the memory and closes the memfd (drop every view first). */
  close(): void {
    this.#map.unmap();
    close(this.fd);
  }
}
