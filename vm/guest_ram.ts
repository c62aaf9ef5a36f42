/**
 * Guest RAM: one memfd, mapped shared once in the process (so every thread,
 * IOThreads included, sees it at the same host address) and given to KVM as
 * memory slot 0 at guest-physical 0. The dataplane translates ring and
 * buffer addresses through the same mapping (a `MappedMemoryRegion` whose
 * "user" address is the guest-physical one: ring addresses a virtio-mmio
 * driver writes are guest-physical).
 *
 * @module
 */

import {
  close,
  ftruncate,
  kvmSetUserMemoryRegion,
  type MappedRegion,
  memfdCreate,
  MFD_CLOEXEC,
  mmapShared,
} from "../sys/mod.ts";
import type { MappedMemoryRegion } from "../virtio/mod.ts";

/**
 * The VM's RAM.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { GuestRam } from "./guest_ram.ts";
 * const ram = GuestRam.create(1 << 20); // no VM: not registered with KVM
 * ram.load(0x1000, new Uint8Array([1, 2, 3]));
 * assert.equal(ram.bytes[0x1002], 3);
 * assert.equal(ram.regions()[0].userAddr, 0);
 * ram.close();
 * ```
 */
export class GuestRam {
  readonly size: number;
  readonly fd: number;
  readonly #map: MappedRegion;

  private constructor(fd: number, map: MappedRegion) {
    this.fd = fd;
    this.#map = map;
    this.size = map.length;
  }

  /** A memfd of `size` bytes (zeroed), mapped; registered as slot 0 when `vmFd` is given. */
  static create(size: number, vmFd?: number): GuestRam {
    const fd = memfdCreate("guest-ram", MFD_CLOEXEC);
    let map: MappedRegion | null = null;
    try {
      ftruncate(fd, size);
      map = mmapShared(fd, size, 0);
      if (vmFd !== undefined) {
        kvmSetUserMemoryRegion(vmFd, {
          slot: 0,
          guestPhysAddr: 0,
          memorySize: size,
          userspaceAddr: map.addr,
        });
      }
      return new GuestRam(fd, map);
    } catch (e) {
      map?.unmap();
      close(fd);
      throw e;
    }
  }

  /** Host address of guest-physical 0. */
  get hostAddr(): number {
    return this.#map.addr;
  }

  /** The whole RAM as bytes. */
  get bytes(): Uint8Array {
    return this.#map.bytes;
  }

  /** Copies `image` to guest-physical `gpa`; throws RangeError when it does not fit. */
  load(gpa: number, image: Uint8Array): void {
    if (gpa < 0 || gpa + image.length > this.size) {
      throw new RangeError(
        `image of ${image.length} bytes at ${
          gpa.toString(16)
        } does not fit ${this.size} bytes of RAM`,
      );
    }
    this.#map.bytes.set(image, gpa);
  }

  /** The RAM as the dataplane's memory map (guest-physical = "user" address). */
  regions(): MappedMemoryRegion[] {
    return [{ guestPhysAddr: 0, size: this.size, userAddr: 0, hostAddr: this.#map.addr }];
  }

  /** Unmaps and closes (after the VM and every IOThread stopped using it). */
  close(): void {
    this.#map.unmap();
    close(this.fd);
  }
}
