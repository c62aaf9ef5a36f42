/**
 * The inflight log of one split virtqueue: QEMU docs/interop/vhost-user.rst,
 * "Inflight I/O tracking" (QueueRegionSplit / DescStateSplit). A region of
 * shared memory the front-end keeps for the device across a crash of the
 * device's process, in which the device records, per descriptor head, whether
 * the request is in flight and in which order it was taken, plus the used
 * index it last published. A restarted device reads it back
 * ({@link SplitInflightRegion.recover}) and takes every request that was in
 * flight again, in the order it first took them, before new ones.
 *
 * Layout (little endian): a 16-byte header (u64 features, u16 version, u16
 * desc_num, u16 last_batch_head, u16 used_idx) and one 16-byte DescStateSplit
 * per descriptor (u8 inflight, 5 bytes padding, u16 next, u64 counter). Every
 * queue's region is {@link inflightQueueRegionSize} bytes (the same size
 * libvhost-user uses), queue i at i times that offset.
 *
 * Ordering, which is what makes it crash-safe (a SIGKILL can land between any
 * two stores; stores already made stay in the shared memory):
 *
 * - taking a head: counter first, then `inflight = 1`;
 * - returning a head: `next = last_batch_head`, `last_batch_head = head`,
 *   then the used element and the ring's used idx (by the virtqueue), then
 *   `inflight = 0` and `used_idx` = the ring's used idx.
 *
 * So after a crash either the ring's used idx equals `used_idx` (the
 * `inflight` flags are exact) or it is ahead by the batch being returned (the
 * flags of that batch, reachable from `last_batch_head`, are stale and are
 * cleared). The region is front-end memory: its contents are untrusted, only
 * bounded (heads beyond the ring, a batch list that loops).
 *
 * @module
 */

import { viewAt } from "../sys/mod.ts";

/** Region version this code writes (0 = a region never used: fresh from GET_INFLIGHT_FD). */
export const INFLIGHT_VERSION = 1;

/** Alignment of each queue's region (libvhost-user's INFLIGHT_ALIGNMENT). */
export const INFLIGHT_ALIGNMENT = 64;

const HEADER_BYTES = 16;
const DESC_STATE_BYTES = 16;

/**
 * Bytes of one queue's region for a ring of `queueSize` entries: header plus
 * one DescStateSplit per entry, rounded up to 64.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { inflightQueueRegionSize } from "./inflight_region.ts";
 * assert.equal(inflightQueueRegionSize(256), 16 + 16 * 256 + 48);
 * assert.equal(inflightQueueRegionSize(1), 64);
 * ```
 */
export function inflightQueueRegionSize(queueSize: number): number {
  const raw = HEADER_BYTES + DESC_STATE_BYTES * queueSize;
  return Math.ceil(raw / INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT;
}

/**
 * One split queue's inflight log, viewed in place (the memory is the
 * front-end's shared region, mapped by the vhost-user layer; every thread
 * of the process sees it at the same address).
 *
 * Hot path ({@link begin}, {@link prePut}, {@link postPut}): a handful of
 * stores, no allocation. {@link recover} (ring start) allocates its
 * resubmission list.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { inflightQueueRegionSize, SplitInflightRegion } from "./inflight_region.ts";
 * const buf = new ArrayBuffer(inflightQueueRegionSize(8));
 * const log = new SplitInflightRegion(buf, 0, 8);
 * assert.equal(log.recover(0, 8), 0); // fresh region: initialised, nothing to resubmit
 * log.begin(3); // head 3 taken, then head 5
 * log.begin(5);
 * log.prePut(5); // head 5 returned: the ring's used idx becomes 1
 * log.postPut(5, 1);
 * // The process dies here. The restarted device finds head 3 in flight.
 * const again = new SplitInflightRegion(buf, 0, 8);
 * assert.equal(again.recover(1, 8), 1);
 * assert.equal(again.nextResubmit(), 3);
 * assert.equal(again.nextResubmit(), -1);
 * ```
 */
export class SplitInflightRegion {
  /** Entries the region has room for (the front-end's queue size). */
  readonly queueSize: number;
  readonly #u8: Uint8Array;
  readonly #u16: Uint16Array;
  readonly #u32: Uint32Array;
  /** The global counter of the spec: order in which heads were taken. */
  #counter = 0;
  #resubmit: Uint16Array = new Uint16Array(0);
  #resubmitPos = 0;
  #resubmitLen = 0;

  /**
   * Views `inflightQueueRegionSize(queueSize)` bytes of `buffer` at
   * `byteOffset` (a multiple of 8).
   */
  constructor(buffer: ArrayBufferLike, byteOffset: number, queueSize: number) {
    if (!Number.isInteger(queueSize) || queueSize < 1 || queueSize > 32768) {
      throw new RangeError(`inflight region: queue size ${queueSize}`);
    }
    const len = inflightQueueRegionSize(queueSize);
    if (byteOffset % 8 !== 0 || byteOffset + len > buffer.byteLength) {
      throw new RangeError(`inflight region: ${len} bytes at ${byteOffset} do not fit`);
    }
    this.queueSize = queueSize;
    this.#u8 = new Uint8Array(buffer, byteOffset, len);
    this.#u16 = new Uint16Array(buffer, byteOffset, len / 2);
    this.#u32 = new Uint32Array(buffer, byteOffset, len / 4);
  }

  /**
   * The region of a ring of at most `queueSize` entries at host address
   * `addr` (mapped shared memory, valid in every thread).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * import { inflightQueueRegionSize, SplitInflightRegion } from "./inflight_region.ts";
   * const m = mmapAnonymous(inflightQueueRegionSize(4));
   * assert.equal(SplitInflightRegion.at(m.addr, 4).version, 0);
   * m.unmap();
   * ```
   */
  static at(addr: number, queueSize: number): SplitInflightRegion {
    return new SplitInflightRegion(viewAt(addr, inflightQueueRegionSize(queueSize)), 0, queueSize);
  }

  /** The region's version field (0 until the first {@link recover}). */
  get version(): number {
    return Atomics.load(this.#u16, 4);
  }

  /** The used idx last recorded ({@link postPut}). */
  get usedIdx(): number {
    return Atomics.load(this.#u16, 7);
  }

  /** Whether head `i` is marked in flight. */
  inflight(i: number): boolean {
    return this.#u8[HEADER_BYTES + DESC_STATE_BYTES * i] !== 0;
  }

  /** Heads taken again by {@link recover} that {@link nextResubmit} has not handed out yet. */
  get resubmitPending(): number {
    return this.#resubmitLen - this.#resubmitPos;
  }

  /**
   * "When reconnecting" (ring start): a fresh region (version 0) is
   * initialised for a ring of `ringSize` entries whose used idx is
   * `usedIdx`, and nothing is in flight. Otherwise a last batch that was
   * published without its `used_idx` has its flags cleared, and every head
   * still marked in flight is queued for {@link nextResubmit} in the order it
   * was first taken (counter). Returns how many are in flight: the ring's
   * next avail index is `usedIdx` plus that (every taken request is either
   * used or in flight).
   */
  recover(usedIdx: number, ringSize: number): number {
    if (ringSize > this.queueSize) {
      throw new RangeError(
        `ring of ${ringSize} entries in an inflight region of ${this.queueSize}`,
      );
    }
    const u16 = this.#u16, u8 = this.#u8;
    this.#resubmitPos = this.#resubmitLen = 0;
    this.#counter = 0;
    if (Atomics.load(u16, 4) === 0) {
      u8.fill(0);
      u16[5] = this.queueSize;
      Atomics.store(u16, 7, usedIdx & 0xffff);
      Atomics.store(u16, 4, INFLIGHT_VERSION);
      return 0;
    }
    const recorded = Atomics.load(u16, 7);
    if (recorded !== (usedIdx & 0xffff)) {
      // The ring's used idx moved past used_idx: the batch from
      // last_batch_head reached the driver, its flags are stale.
      let n = Math.min((usedIdx - recorded) & 0xffff, ringSize);
      let i = u16[6];
      while (n-- > 0 && i < ringSize) {
        Atomics.store(u8, HEADER_BYTES + DESC_STATE_BYTES * i, 0);
        i = u16[(HEADER_BYTES + DESC_STATE_BYTES * i + 6) / 2];
      }
      Atomics.store(u16, 7, usedIdx & 0xffff);
    }
    const heads: number[] = [];
    for (let i = 0; i < this.queueSize; i++) {
      const at = HEADER_BYTES + DESC_STATE_BYTES * i;
      if (u8[at] === 0) continue;
      if (i >= ringSize) {
        u8[at] = 0; // not a head of this ring: never taken by us
        continue;
      }
      heads.push(i);
    }
    const counter = (i: number) => {
      const w = (HEADER_BYTES + DESC_STATE_BYTES * i + 8) / 4;
      return this.#u32[w] + this.#u32[w + 1] * 0x1_0000_0000;
    };
    heads.sort((a, b) => counter(a) - counter(b));
    this.#resubmit = Uint16Array.from(heads);
    this.#resubmitLen = heads.length;
    if (heads.length > 0) this.#counter = counter(heads[heads.length - 1]) + 1;
    return heads.length;
  }

  /**
   * The next head to take again (oldest first), or -1 when none is left.
   * Its flag and counter stay as they are. Hot path.
   */
  nextResubmit(): number {
    return this.#resubmitPos < this.#resubmitLen ? this.#resubmit[this.#resubmitPos++] : -1;
  }

  /** Gives back the head the last {@link nextResubmit} returned (virtqueue undoPop). */
  unresubmit(): void {
    if (this.#resubmitPos > 0) this.#resubmitPos--;
  }

  /** Head `head` was taken from the avail ring: counter, then in flight. Hot path. */
  begin(head: number): void {
    const w = (HEADER_BYTES + DESC_STATE_BYTES * head + 8) / 4;
    const c = this.#counter++;
    this.#u32[w] = c >>> 0;
    this.#u32[w + 1] = Math.floor(c / 0x1_0000_0000);
    Atomics.store(this.#u8, HEADER_BYTES + DESC_STATE_BYTES * head, 1);
  }

  /** Undoes {@link begin} of the head just taken (it goes back to the avail ring). */
  abort(head: number): void {
    Atomics.store(this.#u8, HEADER_BYTES + DESC_STATE_BYTES * head, 0);
    this.#counter--;
  }

  /**
   * Head `head` is about to be published in the used ring (a batch of one):
   * link it into the last batch list. Hot path.
   */
  prePut(head: number): void {
    const u16 = this.#u16;
    u16[(HEADER_BYTES + DESC_STATE_BYTES * head + 6) / 2] = u16[6];
    Atomics.store(u16, 6, head);
  }

  /** The ring's used idx is now `usedIdx` and includes `head`: not in flight any more. Hot path. */
  postPut(head: number, usedIdx: number): void {
    Atomics.store(this.#u8, HEADER_BYTES + DESC_STATE_BYTES * head, 0);
    Atomics.store(this.#u16, 7, usedIdx);
  }
}
