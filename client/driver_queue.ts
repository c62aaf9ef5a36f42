/**
 * The driver side of one split virtqueue (virtio 1.2 section 2.7) in guest
 * RAM: descriptor table, available ring (plus used_event) and used ring
 * (plus avail_event), with VIRTIO_RING_F_EVENT_IDX notification suppression.
 * What a guest's virtio_ring.c does, minus everything the client does not
 * need: the caller owns descriptor allocation (fixed chains per request slot).
 *
 * Index fields are read and written with `Atomics` (sequentially consistent:
 * the barriers the spec asks for between ring entries and indexes).
 *
 * @module
 */

import type { GuestBuffer, GuestRam } from "./guest_ram.ts";
import {
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_USED_F_NO_NOTIFY,
  vringNeedEvent,
} from "./virtio_blk_defs.ts";

/**
 * One split virtqueue, driver side.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { GuestRam } from "./guest_ram.ts";
 * import { DriverQueue } from "./driver_queue.ts";
 * const ram = GuestRam.create(1 << 20, 1);
 * const q = new DriverQueue(ram, 0, 8, true);
 * q.setDesc(0, 0x1000, 16, 0, 0);
 * q.addAvail(0);
 * assert.equal(q.publish(), true); // avail_event is 0: the device wants a kick
 * ram.close();
 * ```
 */
export class DriverQueue {
  /** Queue size (power of two). */
  readonly size: number;
  /** Whether VIRTIO_RING_F_EVENT_IDX was negotiated. */
  readonly eventIdx: boolean;
  /** Descriptor table memory. */
  readonly desc: GuestBuffer;
  /** Available ring memory. */
  readonly avail: GuestBuffer;
  /** Used ring memory. */
  readonly used: GuestBuffer;

  readonly #desc32: Uint32Array;
  readonly #avail16: Uint16Array;
  readonly #used16: Uint16Array;
  readonly #used32: Uint32Array;
  readonly #mask: number;
  /** Free-running (16-bit wrapped) avail idx of the driver, not yet published beyond #publishedIdx. */
  #availIdx = 0;
  #publishedIdx = 0;
  /** Next used entry to consume. */
  #lastUsed = 0;

  /** Allocates the three parts in `region` of `ram` (desc 16-aligned, used 4096-aligned). */
  constructor(ram: GuestRam, region: number, size: number, eventIdx: boolean) {
    if (size < 1 || size > 32768 || (size & (size - 1)) !== 0) {
      throw new RangeError(`DriverQueue: size ${size} is not a power of two <= 32768`);
    }
    this.size = size;
    this.eventIdx = eventIdx;
    this.#mask = size - 1;
    this.desc = ram.alloc(region, 16 * size, 4096);
    this.avail = ram.alloc(region, 6 + 2 * size, 2);
    this.used = ram.alloc(region, 6 + 8 * size, 4096);
    this.#desc32 = new Uint32Array(this.desc.bytes.buffer, this.desc.bytes.byteOffset, 4 * size);
    this.#avail16 = new Uint16Array(this.avail.bytes.buffer, this.avail.bytes.byteOffset, 3 + size);
    this.#used16 = new Uint16Array(
      this.used.bytes.buffer,
      this.used.bytes.byteOffset,
      3 + 4 * size,
    );
    this.#used32 = new Uint32Array(
      this.used.bytes.buffer,
      this.used.bytes.byteOffset,
      1 + 2 * size,
    );
  }

  /** The next used entry the driver will consume (for tests and GET_VRING_BASE checks). */
  get lastUsed(): number {
    return this.#lastUsed;
  }

  /** The device's used idx as it is in the ring now. */
  get usedIdx(): number {
    return Atomics.load(this.#used16, 1);
  }

  /** The driver's avail idx (published or not). */
  get availIdx(): number {
    return this.#availIdx;
  }

  /** Writes descriptor `i`. Hot path: no allocation. */
  setDesc(i: number, gpa: number, len: number, flags: number, next: number): void {
    const o = i * 4;
    const d = this.#desc32;
    d[o] = gpa >>> 0;
    d[o + 1] = Math.floor(gpa / 0x1_0000_0000);
    d[o + 2] = len;
    d[o + 3] = (flags & 0xffff) | (next << 16);
  }

  /** Puts chain `head` in the next avail slot (not yet visible: see {@link publish}). Hot path. */
  addAvail(head: number): void {
    this.#avail16[2 + (this.#availIdx & this.#mask)] = head;
    this.#availIdx = (this.#availIdx + 1) & 0xffff;
  }

  /**
   * Makes the added chains visible (avail.idx store) and says whether the
   * device wants a kick (avail_event with EVENT_IDX, else used.flags).
   * Returns false when nothing was added. Hot path.
   */
  publish(): boolean {
    const old = this.#publishedIdx;
    const now = this.#availIdx;
    if (old === now) return false;
    this.#publishedIdx = now;
    Atomics.store(this.#avail16, 1, now);
    if (this.eventIdx) {
      const availEvent = Atomics.load(this.#used16, 2 + 4 * this.size);
      return vringNeedEvent(availEvent, now, old);
    }
    return (Atomics.load(this.#used16, 0) & VIRTQ_USED_F_NO_NOTIFY) === 0;
  }

  /** Whether the device has used entries the driver has not consumed. Hot path. */
  hasUsed(): boolean {
    return Atomics.load(this.#used16, 1) !== this.#lastUsed;
  }

  /**
   * Consumes one used entry: returns its head id and stores its length in
   * {@link usedLen}, or returns -1 when there is none. Hot path.
   */
  popUsed(): number {
    const idx = Atomics.load(this.#used16, 1);
    if (idx === this.#lastUsed) return -1;
    const slot = this.#lastUsed & this.#mask;
    const id = this.#used32[1 + 2 * slot];
    this.usedLen = this.#used32[2 + 2 * slot];
    this.#lastUsed = (this.#lastUsed + 1) & 0xffff;
    return id;
  }

  /** Length of the entry returned by the last {@link popUsed}. */
  usedLen = 0;

  /**
   * Asks for an interrupt at the next used entry; returns true if entries
   * arrived meanwhile (then do not sleep). Hot path.
   */
  enableInterrupts(): boolean {
    if (this.eventIdx) {
      Atomics.store(this.#avail16, 2 + this.size, this.#lastUsed);
    } else {
      Atomics.store(this.#avail16, 0, 0);
    }
    return this.hasUsed();
  }

  /**
   * The ring's indexes as one line, for stall reports: the driver's avail idx
   * and published idx, the device's used idx, the next used entry to consume,
   * and both event indexes (or flags without EVENT_IDX).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestRam } from "./guest_ram.ts";
   * import { DriverQueue } from "./driver_queue.ts";
   * const ram = GuestRam.create(1 << 20, 1);
   * const q = new DriverQueue(ram, 0, 8, true);
   * assert(q.describe().startsWith("avail 0/0 used 0"));
   * ram.close();
   * ```
   */
  describe(): string {
    const a = this.#avail16, u = this.#used16;
    const ev = this.eventIdx
      ? `used_event ${Atomics.load(a, 2 + this.size)} avail_event ${
        Atomics.load(u, 2 + 4 * this.size)
      }`
      : `avail.flags ${Atomics.load(a, 0)} used.flags ${Atomics.load(u, 0)}`;
    return `avail ${this.#availIdx}/${Atomics.load(a, 1)} used ${Atomics.load(u, 1)} ` +
      `last_used ${this.#lastUsed} ${ev}`;
  }

  /** Asks the device not to interrupt (busy polling). Hot path. */
  disableInterrupts(): void {
    if (this.eventIdx) {
      // An event index just behind the consumer is not reached for 64K entries.
      Atomics.store(this.#avail16, 2 + this.size, (this.#lastUsed - 1) & 0xffff);
    } else {
      Atomics.store(this.#avail16, 0, VIRTQ_AVAIL_F_NO_INTERRUPT);
    }
  }
}
