import {
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_DESC_SIZE,
} from "./constants.ts";
import type { GuestMemory } from "./guest_memory.ts";

/**
 * What is wrong with a descriptor chain (virtio 1.2 section 2.7.5). Two
 * families:
 *
 * - The chain cannot be followed (head or next index out of range, a loop, an
 *   unusable indirect table): nothing after the bad link can be trusted, not
 *   even where the chain ends. {@link walkChain} returns the kind and
 *   {@link Virtqueue.pop} marks the ring broken (the device needs reset).
 * - The chain can be followed to its end but a buffer in it is unusable
 *   ({@link BUFFER_ERRORS}: outside guest memory, zero length, out of order,
 *   too many): the walk goes on to the last descriptor and records the kind
 *   in {@link DescriptorChain.error}, plus where the last descriptor's last
 *   byte is if that descriptor is a valid device-writable buffer. The device
 *   decides: virtio-blk answers IOERR in that byte, or breaks the ring when
 *   there is none.
 */
export type DescriptorChainErrorKind =
  | "HeadOutOfRange" // the avail ring names a head >= queue size
  | "NextOutOfRange" // `next` >= table size
  | "Loop" // more descriptors than the table holds: a cycle
  | "TooLong" // more entries (descriptors, or their pieces) than the chain capacity (buffer error)
  | "OutOfRange" // buffer not inside guest memory: touches a hole or no region (buffer error)
  | "ZeroLength" // a buffer of length 0, QEMU rejects these too (buffer error)
  | "BadOrder" // a device-readable buffer after a device-writable one, 2.7.4.2 (buffer error)
  | "IndirectNotNegotiated" // VRING_DESC_F_INDIRECT without VIRTIO_RING_F_INDIRECT_DESC
  | "IndirectBadLength" // indirect table length 0 or not a multiple of 16 (2.7.5.3.1)
  | "IndirectOutOfRange" // indirect table not inside one guest memory region
  | "IndirectWithNext" // VRING_DESC_F_INDIRECT together with VRING_DESC_F_NEXT
  | "NestedIndirect"; // VRING_DESC_F_INDIRECT inside an indirect table

/**
 * The kinds that leave the chain walkable to its end (see
 * {@link DescriptorChainErrorKind}): recorded in {@link DescriptorChain.error}
 * rather than breaking the ring.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { BUFFER_ERRORS } from "./descriptor_chain.ts";
 * assert(BUFFER_ERRORS.includes("ZeroLength"));
 * assert(!BUFFER_ERRORS.includes("Loop"));
 * ```
 */
export const BUFFER_ERRORS: readonly DescriptorChainErrorKind[] = [
  "TooLong",
  "OutOfRange",
  "ZeroLength",
  "BadOrder",
];

/**
 * A descriptor chain that breaks the ring rules; `head` is the chain's head
 * index (or the bad avail ring entry).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { DescriptorChainError } from "./descriptor_chain.ts";
 * const e = new DescriptorChainError("Loop", 3);
 * assert.equal(e.kind, "Loop");
 * assert(e.message.includes("head 3"));
 * ```
 */
export class DescriptorChainError extends Error {
  /** What was wrong. */
  readonly kind: DescriptorChainErrorKind;
  /** Head descriptor index of the chain. */
  readonly head: number;

  constructor(kind: DescriptorChainErrorKind, head: number) {
    super(`descriptor chain: ${kind} (head ${head})`);
    this.name = "DescriptorChainError";
    this.kind = kind;
    this.head = head;
  }
}

/**
 * A walked descriptor chain (QEMU's VirtQueueElement, rust-vmm's
 * DescriptorChain): the head index and every buffer as a host address and
 * length, device-readable buffers first (`0 .. outNum`), then device-writable
 * ones (`outNum .. count`), each also as (region index, offset in region) so
 * its bytes can be read through {@link GuestMemory.regionBytes} without
 * allocating. An entry lies in one region: a descriptor that spans
 * guest-physically adjacent regions is one entry per region (like the
 * iovecs of QEMU's VirtQueueElement), so entries and descriptors are counted
 * apart only then.
 *
 * The arrays are allocated once with a fixed capacity; {@link Virtqueue.pop}
 * refills one object per queue (hot path: no allocation), so a chain is valid
 * only until the next pop of the same queue: parse it first.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { DescriptorChain } from "./descriptor_chain.ts";
 * const c = new DescriptorChain(4);
 * c.reset(2);
 * c.add(0x10000, 16, false, 0, 0x10000);
 * c.add(0x20000, 1, true, 0, 0x20000);
 * assert.equal(c.head, 2);
 * assert.equal(c.outNum, 1);
 * assert.equal(c.inNum, 1);
 * assert(c.isWritable(1));
 * ```
 */
export class DescriptorChain {
  /** Head descriptor index: what {@link Virtqueue.push} returns to the driver. */
  head = 0;
  /** Number of entries (buffers, or their pieces in adjacent regions). */
  count = 0;
  /** Number of device-readable buffers (they come first). */
  outNum = 0;
  /** Total bytes of the device-readable buffers. */
  outLen = 0;
  /** Total bytes of the device-writable buffers. */
  inLen = 0;
  /** Maximum number of entries. */
  readonly capacity: number;
  /** Host address of each buffer. */
  readonly addr: Float64Array;
  /** Length of each buffer. */
  readonly len: Uint32Array;
  /** Guest memory region index of each buffer. */
  readonly region: Uint32Array;
  /** Offset of each buffer inside its region. */
  readonly offset: Float64Array;
  /**
   * The first unusable buffer of a chain that was still walked to its end
   * (a buffer error, see {@link DescriptorChainErrorKind}), or null. When
   * set, the buffer arrays are incomplete: only the status fields below may
   * be used.
   */
  error: DescriptorChainErrorKind | null = null;
  /**
   * With {@link error} set: host address of the last byte of the chain's last
   * descriptor when that descriptor is a valid device-writable buffer (where a
   * virtio-blk status byte goes), else -1.
   */
  statusAddr = -1;
  /** With {@link statusAddr} >= 0: its region index and offset in the region. */
  statusRegion = 0;
  statusOffset = 0;

  constructor(capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1) {
      throw new RangeError(`DescriptorChain: bad capacity ${capacity}`);
    }
    this.capacity = capacity;
    this.addr = new Float64Array(capacity);
    this.len = new Uint32Array(capacity);
    this.region = new Uint32Array(capacity);
    this.offset = new Float64Array(capacity);
  }

  /** Number of device-writable buffers. */
  get inNum(): number {
    return this.count - this.outNum;
  }

  /** Whether buffer `i` is device-writable. */
  isWritable(i: number): boolean {
    return i >= this.outNum;
  }

  /** Empties the chain for head `head`. Hot path. */
  reset(head: number): void {
    this.head = head;
    this.count = 0;
    this.outNum = 0;
    this.outLen = 0;
    this.inLen = 0;
    this.error = null;
    this.statusAddr = -1;
  }

  /**
   * Appends a buffer; false when full or when a readable buffer would follow a
   * writable one (the caller turns that into an error). Hot path.
   */
  add(addr: number, len: number, writable: boolean, region: number, offset: number): boolean {
    const i = this.count;
    if (i >= this.capacity) return false;
    if (writable) {
      this.inLen += len;
    } else {
      if (this.outNum !== i) return false;
      this.outNum = i + 1;
      this.outLen += len;
    }
    this.addr[i] = addr;
    this.len[i] = len;
    this.region[i] = region;
    this.offset[i] = offset;
    this.count = i + 1;
    return true;
  }
}

/**
 * Adds buffer `[gpa, gpa + len)`, which is not inside one region, as one
 * entry per region when it spans guest-physically adjacent regions (QEMU's
 * virtqueue_map_desc maps a descriptor in as many iovecs as dma_memory_map
 * needs; libvhost-user's does the same). Returns the buffer error, or null.
 * Each entry counts against the chain capacity, as each of QEMU's iovecs
 * counts against max_num_sg ("too many write descriptors"). Runs only when
 * the single-region translation failed: the common case never gets here.
 */
function addPieces(
  chain: DescriptorChain,
  mem: GuestMemory,
  gpa: number,
  len: number,
  writable: boolean,
): DescriptorChainErrorKind | null {
  // All of it mapped first: a span into a hole is OutOfRange whatever else.
  if (mem.pieceCount(gpa, len) < 0) return "OutOfRange";
  let g = gpa, left = len;
  while (left > 0) {
    const host = mem.hostAddrPrefix(g, left);
    const piece = mem.prefixLength, r = mem.lastRegion;
    if (!chain.add(host, piece, writable, r, host - mem.regionHostAddr(r))) {
      return chain.count >= chain.capacity ? "TooLong" : "BadOrder";
    }
    g += piece;
    left -= piece;
  }
  return null;
}

/** Guest addresses at or above 2^53 cannot be in any region (GuestMemory rejects them). */
const HI_LIMIT = 0x200000;

/**
 * Walks the chain that starts at `head` of the descriptor table `desc` (a
 * Uint32Array over the table: 4 words a descriptor) into `chain`, validating
 * every index, flag and buffer against `mem`. Returns null when the chain
 * could be followed to its end (check `chain.error` for an unusable buffer
 * in it), or the kind of link that could not be followed. Walking is
 * bounded: at most `size` steps in the table and at most `len / 16` in an
 * indirect table (more means a loop), at most `chain.capacity` entries in
 * all. A buffer that spans guest-physically adjacent regions becomes one
 * entry per region; one that touches a hole is OutOfRange. An indirect
 * table must lie in one region (QEMU: "Cannot map indirect buffer").
 * Internal to virtio/ (Virtqueue.pop).
 *
 * Hot path: no allocation (an indirect table is read as words of its region,
 * {@link GuestMemory.regionWords}, like the ring's table, or through the
 * region's DataView when it is not 4-byte aligned). A buffer inside one
 * region costs one {@link GuestMemory.hostAddr}; only one that is not pays
 * for the split.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { DescriptorChain, walkChain } from "./descriptor_chain.ts";
 * import { GuestMemory } from "./guest_memory.ts";
 * import { mmapAnonymous } from "../sys/mod.ts";
 * const m = mmapAnonymous(4096);
 * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0, size: 4096, userAddr: 0, hostAddr: m.addr }]);
 * const desc = new Uint32Array(8); // two descriptors, both pointing at 0x800
 * desc.set([0x800, 0, 16, 1 | (1 << 16)], 0); // NEXT -> 1
 * desc.set([0x800, 0, 16, 1 | (0 << 16)], 4); // NEXT -> 0: a loop
 * const chain = new DescriptorChain(2);
 * assert.equal(walkChain(chain, mem, desc, 2, 0, true), "Loop");
 * desc.set([0x9000, 0, 16, 1 | (1 << 16)], 0); // outside memory, NEXT -> 1
 * desc.set([0x800, 0, 1, 2], 4); // a writable byte, the end
 * assert.equal(walkChain(chain, mem, desc, 2, 0, true), null);
 * assert.equal(chain.error, "OutOfRange");
 * assert.equal(chain.statusAddr, m.addr + 0x800);
 * m.unmap();
 * ```
 */
export function walkChain(
  chain: DescriptorChain,
  mem: GuestMemory,
  desc: Uint32Array,
  size: number,
  head: number,
  indirectAllowed: boolean,
): DescriptorChainErrorKind | null {
  chain.reset(head);
  if (!(head >= 0 && head < size)) return "HeadOutOfRange";
  let i = head;
  let limit = size;
  let steps = 0;
  // Where descriptors are read: the ring's table, or an indirect table read
  // as words of its region (`base` its first word) when 4-byte aligned, as
  // drivers place them; a table at another offset is read through the
  // region's DataView (`view`).
  let words = desc;
  let base = 0;
  let inTable = false;
  let view: DataView | null = null;
  let tableBase = 0;
  let failed: DescriptorChainErrorKind | null = null; // first buffer error: walk on to the end
  for (;;) {
    if (i >= limit) return "NextOutOfRange";
    if (++steps > limit) return "Loop";
    let lo: number, hi: number, len: number, flags: number, next: number;
    if (view === null) {
      const w = base + i * 4;
      lo = words[w];
      hi = words[w + 1];
      len = words[w + 2];
      const fn = words[w + 3];
      flags = fn & 0xffff;
      next = fn >>> 16;
    } else {
      const off = tableBase + i * VRING_DESC_SIZE;
      lo = view.getUint32(off, true);
      hi = view.getUint32(off + 4, true);
      len = view.getUint32(off + 8, true);
      flags = view.getUint16(off + 12, true);
      next = view.getUint16(off + 14, true);
    }
    // -1 never translates: addresses >= 2^53 are in no region
    const gpa = hi < HI_LIMIT ? hi * 0x100000000 + lo : -1;
    if (flags & VRING_DESC_F_INDIRECT) {
      if (inTable) return "NestedIndirect";
      if (!indirectAllowed) return "IndirectNotNegotiated";
      if (flags & VRING_DESC_F_NEXT) return "IndirectWithNext";
      if (len === 0 || (len & (VRING_DESC_SIZE - 1)) !== 0) return "IndirectBadLength";
      const host = mem.hostAddr(gpa, len);
      if (host < 0) return "IndirectOutOfRange";
      const r = mem.lastRegion;
      const off = host - mem.regionHostAddr(r);
      inTable = true;
      // The low bits of an offset past 2^31 survive `&` (ToInt32 wraps mod 2^32).
      if ((off & 3) === 0) {
        words = mem.regionWords(r);
        base = off / 4;
      } else {
        view = mem.regionView(r);
        tableBase = off;
      }
      limit = len >>> 4; // VRING_DESC_SIZE is 16
      steps = 0;
      i = 0;
      continue;
    }
    const writable = (flags & VRING_DESC_F_WRITE) !== 0;
    const last = (flags & VRING_DESC_F_NEXT) === 0;
    if (failed === null) {
      const host = len === 0 ? -1 : mem.hostAddr(gpa, len);
      if (len === 0) failed = "ZeroLength";
      else if (host < 0) failed = addPieces(chain, mem, gpa, len, writable);
      else {
        const r = mem.lastRegion;
        if (!chain.add(host, len, writable, r, host - mem.regionHostAddr(r))) {
          failed = chain.count >= chain.capacity ? "TooLong" : "BadOrder";
        }
      }
    }
    if (last) {
      if (failed !== null) {
        chain.error = failed;
        // Where a status byte could still be written: the last byte of a
        // valid device-writable last descriptor (which may span adjacent
        // regions: the byte itself is in one).
        const host = writable && len > 0 && mem.pieceCount(gpa, len) > 0
          ? mem.hostAddr(gpa + len - 1, 1)
          : -1;
        if (host >= 0) {
          const r = mem.lastRegion;
          chain.statusAddr = host;
          chain.statusRegion = r;
          chain.statusOffset = host - mem.regionHostAddr(r);
        }
      }
      return null;
    }
    i = next;
  }
}
