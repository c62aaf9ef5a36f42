import { viewAt } from "../sys/mod.ts";
import {
  VIRTQUEUE_MAX_SIZE,
  VRING_AVAIL_ALIGN,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_DESC_ALIGN,
  VRING_DESC_SIZE,
  VRING_USED_ALIGN,
  VRING_USED_ELEM_SIZE,
  VRING_USED_F_NO_NOTIFY,
} from "./constants.ts";
import { DescriptorChain, DescriptorChainError, walkChain } from "./descriptor_chain.ts";
import type { GuestMemory } from "./guest_memory.ts";
import type { SplitInflightRegion } from "./inflight_region.ts";

/**
 * Why a Virtqueue could not be set up, why the driver broke it, or how the
 * device misused it.
 */
export type VirtqueueErrorKind =
  | "BadSize" // not a power of two in 1..32768
  | "RingOutOfRange" // desc table / avail ring / used ring not inside one region
  | "Misaligned" // ring address not aligned as 2.7 requires (16 / 2 / 4)
  | "AvailIdxJump" // avail idx moved more than the queue size ahead (driver bug or attack)
  | "HeadInUse" // the driver made a head available again before it was used
  | "NotInFlight" // push() of a head that pop() did not return (device bug)
  | "NothingToUndo" // undoPop() without a pop() to undo (device bug)
  | "Busy"; // lastAvailIdx set while requests are in flight (device bug)

/**
 * A virtqueue error (see {@link VirtqueueErrorKind}).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VirtqueueError } from "./virtqueue.ts";
 * const e = new VirtqueueError("BadSize", "size 3");
 * assert.equal(e.kind, "BadSize");
 * ```
 */
export class VirtqueueError extends Error {
  /** What was wrong. */
  readonly kind: VirtqueueErrorKind;

  constructor(kind: VirtqueueErrorKind, detail: string) {
    super(`virtqueue: ${kind}: ${detail}`);
    this.name = "VirtqueueError";
    this.kind = kind;
  }
}

/**
 * What a split virtqueue is made of: the negotiated size, ring addresses and
 * ring features (vhost-user SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE,
 * SET_FEATURES).
 */
export interface VirtqueueOptions {
  /** The guest's memory. */
  mem: GuestMemory;
  /** Queue size: a power of two, at most 32768. */
  size: number;
  /** Descriptor table address (16-byte aligned). */
  desc: number;
  /** Available ring address (2-byte aligned). */
  avail: number;
  /** Used ring address (4-byte aligned). */
  used: number;
  /**
   * Which address space `desc`/`avail`/`used` are in: "user" = the frontend's
   * virtual addresses (vhost-user SET_VRING_ADDR, the default), "guest" =
   * guest-physical (a VMM of our own).
   */
  addressSpace?: "user" | "guest";
  /** VIRTIO_RING_F_EVENT_IDX negotiated. */
  eventIdx?: boolean;
  /** VIRTIO_RING_F_INDIRECT_DESC negotiated. */
  indirectDesc?: boolean;
  /** Where to start taking requests (vhost-user SET_VRING_BASE); default 0. */
  lastAvailIdx?: number;
  /**
   * Most entries one chain may have (direct + indirect; a buffer spanning
   * adjacent regions counts once per region); default `size`.
   */
  maxChainLength?: number;
  /**
   * The ring's inflight log (vhost-user INFLIGHT_SHMFD): every pop and push
   * is recorded in it. Call {@link Virtqueue.resumeInflight} once when the
   * ring starts to take back what was in flight.
   */
  inflight?: SplitInflightRegion | null;
}

/**
 * x86 makes stores visible in program order (TSO), so plain stores publish
 * the used ring's entries before its idx, as virtio's release ordering asks;
 * elsewhere the idx goes out with Atomics.store. `Atomics.store` is a builtin
 * call V8 does not inline (an xchg on x86, ~20 ns on a guest mapping here):
 * {@link Virtqueue.push} avoids it where the hardware orders anyway, and the
 * full fence the notification check needs comes from
 * {@link Virtqueue.notifyNeeded}.
 */
const PLAIN_PUBLISH = Deno.build.arch === "x86_64";

/**
 * wrap-around-safe "has `newIdx` passed `event` since `oldIdx`" of 2.7.7.2
 * (vring_need_event in the Linux and QEMU sources).
 */
function vringNeedEvent(event: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - event - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

/**
 * A split virtqueue (virtio 1.2 section 2.7) seen from the device: QEMU's
 * VirtQueue, rust-vmm's `Queue`. It reads the driver's descriptor table and
 * available ring and writes the used ring, all through typed-array views of
 * guest memory created once here (the rings must each lie inside one region).
 *
 * Everything from the guest is untrusted: chains are walked with bounds (see
 * {@link walkChain}); a ring that cannot be trusted any more is marked
 * {@link broken} with a typed reason, after which pop() returns null and push()
 * writes nothing: the device needs a reset. This is the one place where chain
 * errors become a broken ring.
 *
 * Ordering: avail idx is read with `Atomics.load` (acquire) before the ring
 * entries it covers; used elements are written before used idx, which push()
 * stores plainly on x86 (TSO keeps stores in order) and with `Atomics.store`
 * elsewhere (release); notifyNeeded() re-stores used idx with `Atomics.store`
 * before it reads the driver's suppression fields, the full barrier that
 * notification suppression needs (2.7.7, 2.7.10). notifyHint() reads without
 * it: only notifyNeeded() may decide that no notification is due.
 *
 * Hot path (pop, push, notifyHint, notifyNeeded, availPending): no allocation. pop()
 * returns the queue's one {@link DescriptorChain}, refilled every call.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { GuestMemory, Virtqueue } from "./mod.ts";
 * import { mmapAnonymous } from "../sys/mod.ts";
 * const m = mmapAnonymous(65536);
 * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0, size: 65536, userAddr: 0, hostAddr: m.addr }]);
 * const vq = new Virtqueue({ mem, size: 4, desc: 0, avail: 0x100, used: 0x200, addressSpace: "guest" });
 * const dv = new DataView(m.buffer);
 * dv.setUint32(0, 0x1000, true); // desc[0] = { addr 0x1000, len 512, flags WRITE }
 * dv.setUint32(8, 512, true);
 * dv.setUint16(12, 2, true);
 * dv.setUint16(0x104, 0, true); // avail.ring[0] = 0
 * dv.setUint16(0x102, 1, true); // avail.idx = 1
 * const chain = vq.pop()!;
 * assert.equal(chain.head, 0);
 * assert.equal(chain.inLen, 512);
 * vq.push(chain.head, 512);
 * assert.equal(dv.getUint16(0x202, true), 1);
 * assert(vq.notifyNeeded());
 * m.unmap();
 * ```
 */
export class Virtqueue {
  /** Queue size. */
  readonly size: number;
  /** VIRTIO_RING_F_EVENT_IDX in effect. */
  readonly eventIdx: boolean;
  /** VIRTIO_RING_F_INDIRECT_DESC in effect. */
  readonly indirectDesc: boolean;
  readonly #mem: GuestMemory;
  readonly #mask: number;
  readonly #desc: Uint32Array;
  readonly #avail: Uint16Array; // [0] flags, [1] idx, [2 + i] ring, [2 + size] used_event
  readonly #used16: Uint16Array; // [0] flags, [1] idx, [2 + 4 * size] avail_event
  readonly #used32: Uint32Array; // [1 + 2 i] id, [2 + 2 i] len
  readonly #chain: DescriptorChain;
  readonly #inFlight: Uint8Array;
  #inFlightCount = 0;
  #lastAvail: number;
  /**
   * The driver's avail idx as last read (QEMU's shadow_avail_idx): pop()
   * reads the ring's idx again only once it has taken everything up to this
   * one, so a batch costs one Atomics.load, not one per chain.
   */
  #shadowAvail: number;
  #usedIdx: number;
  #usedFlags = 0;
  #signalledUsed = 0;
  #signalledUsedValid = false;
  #lastPopped = -1;
  /** The last pop came from the inflight log's resubmission list. */
  #lastPoppedResubmit = false;
  readonly #inflight: SplitInflightRegion | null;
  #notificationsEnabled = true;
  #broken: DescriptorChainError | VirtqueueError | null = null;

  /** Validates the layout and builds the views; throws {@link VirtqueueError}. */
  constructor(opts: VirtqueueOptions) {
    const { mem, size } = opts;
    if (!Number.isInteger(size) || size < 1 || size > VIRTQUEUE_MAX_SIZE || (size & (size - 1))) {
      throw new VirtqueueError("BadSize", `size ${size}`);
    }
    this.size = size;
    this.#mask = size - 1;
    this.#mem = mem;
    this.eventIdx = opts.eventIdx ?? false;
    this.indirectDesc = opts.indirectDesc ?? false;
    const ev = this.eventIdx ? 2 : 0;
    const space = opts.addressSpace ?? "user";
    const map = (what: string, addr: number, len: number, align: number): ArrayBuffer => {
      const host = space === "user" ? mem.userToHost(addr, len) : mem.hostAddr(addr, len);
      if (host < 0) {
        throw new VirtqueueError(
          "RingOutOfRange",
          `${what} at ${addr} (+${len}) in ${space} space`,
        );
      }
      if (addr % align !== 0 || host % align !== 0) {
        throw new VirtqueueError("Misaligned", `${what} at ${addr} (host ${host})`);
      }
      return viewAt(host, len);
    };
    this.#desc = new Uint32Array(map("desc", opts.desc, size * VRING_DESC_SIZE, VRING_DESC_ALIGN));
    this.#avail = new Uint16Array(map("avail", opts.avail, 4 + 2 * size + ev, VRING_AVAIL_ALIGN));
    const used = map("used", opts.used, 4 + VRING_USED_ELEM_SIZE * size + ev, VRING_USED_ALIGN);
    this.#used16 = new Uint16Array(used);
    this.#used32 = new Uint32Array(used, 0, (4 + VRING_USED_ELEM_SIZE * size) / 4);
    const maxChain = opts.maxChainLength ?? size;
    this.#chain = new DescriptorChain(maxChain);
    this.#inFlight = new Uint8Array(size);
    this.#lastAvail = (opts.lastAvailIdx ?? 0) & 0xffff;
    this.#shadowAvail = this.#lastAvail;
    this.#inflight = opts.inflight ?? null;
    if (this.#inflight !== null && size > this.#inflight.queueSize) {
      throw new VirtqueueError(
        "BadSize",
        `size ${size} > inflight region's ${this.#inflight.queueSize}`,
      );
    }
    this.#usedIdx = Atomics.load(this.#used16, 1);
    this.#usedFlags = Atomics.load(this.#used16, 0) & ~VRING_USED_F_NO_NOTIFY;
    this.#signalledUsed = this.#usedIdx;
    this.enableNotification();
  }

  /** Whether the ring is broken (needs reset); see {@link brokenReason}. */
  get broken(): boolean {
    return this.#broken !== null;
  }

  /** Why the ring is broken, or null. */
  get brokenReason(): DescriptorChainError | VirtqueueError | null {
    return this.#broken;
  }

  /**
   * Index of the next avail ring entry to take (vhost-user GET_VRING_BASE).
   * Setting it (SET_VRING_BASE) is refused while requests are in flight.
   */
  get lastAvailIdx(): number {
    return this.#lastAvail;
  }

  set lastAvailIdx(v: number) {
    if (this.#inFlightCount !== 0) {
      throw new VirtqueueError("Busy", `${this.#inFlightCount} requests in flight`);
    }
    this.#lastAvail = v & 0xffff;
    this.#shadowAvail = this.#lastAvail;
    this.#lastPopped = -1;
  }

  /**
   * Ring start with an inflight log ("When reconnecting" in vhost-user.rst):
   * repairs a last batch that reached the used ring without the log's
   * used_idx, queues every head still in flight to be popped again (oldest
   * first, before anything new from the avail ring), and sets the next avail
   * index to used idx + that many (each request taken before is used or in
   * flight). A fresh log is initialised and the ring starts at its
   * `lastAvailIdx`. Returns how many are resubmitted;
   * 0 without a log. Throws "Busy" while requests are in flight.
   */
  resumeInflight(): number {
    if (this.#inflight === null) return 0;
    if (this.#inFlightCount !== 0) {
      throw new VirtqueueError("Busy", `${this.#inFlightCount} requests in flight`);
    }
    // A fresh log (version 0) starts where SET_VRING_BASE said.
    const fresh = this.#inflight.version === 0;
    const n = this.#inflight.recover(this.#usedIdx, this.size);
    if (!fresh) {
      this.#lastAvail = (this.#usedIdx + n) & 0xffff;
      this.#shadowAvail = this.#lastAvail;
      this.#lastPopped = -1;
    }
    return n;
  }

  /** The device's used idx (what the next push publishes after). */
  get usedIdx(): number {
    return this.#usedIdx;
  }

  /** Chains popped and not yet pushed. */
  get inFlight(): number {
    return this.#inFlightCount;
  }

  /**
   * The ring's state as one line, for diagnostics (a host's stats dump):
   * the driver's avail idx against the next one to take, used idx, chains in
   * flight, whether kicks are asked for, and both event indexes (or flags).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory, Virtqueue } from "./mod.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const m = mmapAnonymous(65536);
   * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0, size: 65536, userAddr: 0, hostAddr: m.addr }]);
   * const vq = new Virtqueue({ mem, size: 4, desc: 0, avail: 0x100, used: 0x200, addressSpace: "guest" });
   * assert(vq.describe().startsWith("avail 0 last_avail 0 used 0 in_flight 0"));
   * m.unmap();
   * ```
   */
  describe(): string {
    const ev = this.eventIdx
      ? `used_event ${Atomics.load(this.#avail, 2 + this.size)} avail_event ${
        Atomics.load(this.#used16, 2 + 4 * this.size)
      }`
      : `avail.flags ${Atomics.load(this.#avail, 0)} used.flags ${Atomics.load(this.#used16, 0)}`;
    return `avail ${Atomics.load(this.#avail, 1)} last_avail ${this.#lastAvail} ` +
      `used ${this.#usedIdx} in_flight ${this.#inFlightCount} ` +
      `kicks ${this.#notificationsEnabled ? "on" : "off"} ${ev}` +
      (this.#broken ? ` broken: ${this.#broken.message}` : "");
  }

  #fail(reason: DescriptorChainError | VirtqueueError): null {
    this.#broken ??= reason;
    return null;
  }

  /**
   * Whether the driver has made buffers available that pop() has not taken (a
   * poll handler's cheap check; a broken ring reports false). Hot path: the
   * idx it reads becomes the shadow, so the pops that follow do not read it
   * again.
   */
  availPending(): boolean {
    if (this.#broken !== null) return false;
    if (this.#shadowAvail === this.#lastAvail) this.#shadowAvail = Atomics.load(this.#avail, 1);
    return this.#shadowAvail !== this.#lastAvail ||
      (this.#inflight !== null && this.#inflight.resubmitPending !== 0);
  }

  /**
   * Takes the next available chain (virtqueue_pop), or null when the ring is
   * empty or broken (check {@link broken}). The chain is the queue's own
   * object, valid until the next pop(). A chain that cannot be followed (see
   * `DescriptorChainErrorKind`), an avail idx more than `size` ahead or
   * a head that is already in flight breaks the ring. A chain that can be
   * followed but holds an unusable buffer is returned, in flight like any
   * other, with `chain.error` set: the device answers it (or breaks the ring
   * itself when it cannot). Hot path: no allocation.
   */
  pop(): DescriptorChain | null {
    if (this.#broken !== null) return null;
    const inflight = this.#inflight;
    let head: number;
    const resubmit = inflight !== null && inflight.resubmitPending !== 0;
    if (resubmit) {
      // Taken before a restart and never used: again, before anything new.
      head = inflight.nextResubmit();
    } else {
      // Hot path: Atomics.load is a builtin call (V8 does not inline it), so
      // the ring's idx is read once for everything it makes available.
      let availIdx = this.#shadowAvail;
      if (availIdx === this.#lastAvail) {
        availIdx = Atomics.load(this.#avail, 1);
        this.#shadowAvail = availIdx;
      }
      const pending = (availIdx - this.#lastAvail) & 0xffff;
      if (pending === 0) return null;
      if (pending > this.size) {
        return this.#fail(
          new VirtqueueError("AvailIdxJump", `avail idx ${availIdx}, last ${this.#lastAvail}`),
        );
      }
      head = this.#avail[2 + (this.#lastAvail & this.#mask)];
    }
    const chain = this.#chain;
    const err = walkChain(chain, this.#mem, this.#desc, this.size, head, this.indirectDesc);
    if (err !== null) return this.#fail(new DescriptorChainError(err, head));
    if (this.#inFlight[head] !== 0) {
      return this.#fail(new VirtqueueError("HeadInUse", `head ${head} is already in flight`));
    }
    this.#inFlight[head] = 1;
    this.#inFlightCount++;
    if (!resubmit) {
      this.#lastAvail = (this.#lastAvail + 1) & 0xffff;
      if (inflight !== null) inflight.begin(head);
    }
    this.#lastPopped = head;
    this.#lastPoppedResubmit = resubmit;
    return chain;
  }

  /**
   * Gives back the chain the last pop() returned, as if it had not been taken
   * (back-pressure: no request slot free). Only the most recent pop can be
   * undone, once. QEMU's virtqueue_unpop.
   */
  undoPop(): void {
    const head = this.#lastPopped;
    if (head < 0) throw new VirtqueueError("NothingToUndo", "no pop to undo");
    this.#lastPopped = -1;
    this.#inFlight[head] = 0;
    this.#inFlightCount--;
    if (this.#lastPoppedResubmit) {
      this.#inflight!.unresubmit();
      return;
    }
    this.#lastAvail = (this.#lastAvail - 1) & 0xffff;
    this.#inflight?.abort(head);
  }

  /**
   * Returns chain `head` to the driver with `len` bytes written into its
   * device-writable buffers (virtqueue_push: fill + flush). The used element
   * is written first, then used idx is published. Throws VirtqueueError
   * "NotInFlight" for a head that pop() did not hand out (so the device can
   * never complete something the driver did not make available). On a broken
   * ring the bookkeeping is done but nothing is written. Hot path.
   */
  push(head: number, len: number): void {
    if (!(head >= 0 && head < this.size) || this.#inFlight[head] === 0) {
      throw new VirtqueueError("NotInFlight", `head ${head}`);
    }
    this.#inFlight[head] = 0;
    this.#inFlightCount--;
    if (this.#lastPopped === head) this.#lastPopped = -1;
    if (this.#broken !== null) return;
    const inflight = this.#inflight;
    if (inflight !== null) inflight.prePut(head);
    const slot = this.#usedIdx & this.#mask;
    this.#used32[1 + 2 * slot] = head;
    this.#used32[2 + 2 * slot] = len >>> 0;
    this.#usedIdx = (this.#usedIdx + 1) & 0xffff;
    if (PLAIN_PUBLISH) this.#used16[1] = this.#usedIdx;
    else Atomics.store(this.#used16, 1, this.#usedIdx);
    if (inflight !== null) inflight.postPut(head, this.#usedIdx);
  }

  /**
   * Whether the driver wants a used-buffer notification for what was pushed
   * since the last call (virtio_should_notify): with EVENT_IDX, whether used
   * idx has passed the driver's used_event (2.7.7.2); otherwise whether
   * VRING_AVAIL_F_NO_INTERRUPT is clear. False when nothing was pushed since.
   * Call once per batch, then signal the call fd if true. Hot path.
   */
  notifyNeeded(): boolean {
    if (this.#broken !== null) return false;
    const newIdx = this.#usedIdx;
    const oldIdx = this.#signalledUsed;
    const valid = this.#signalledUsedValid;
    // Nothing pushed since the last notification, or since the queue started
    // (a stop with nothing completed asks too): nothing to tell.
    if (newIdx === oldIdx) return false;
    // The full fence between publishing used idx and reading the driver's
    // suppression field (virtio_should_notify's smp_mb): re-storing idx with
    // Atomics.store is one. Without it this load could be served before the
    // store is visible, while the driver re-enables and sees the old idx:
    // both would sleep.
    Atomics.store(this.#used16, 1, newIdx);
    this.#signalledUsed = newIdx;
    this.#signalledUsedValid = true;
    if (!this.eventIdx) {
      return (Atomics.load(this.#avail, 0) & VRING_AVAIL_F_NO_INTERRUPT) === 0;
    }
    const usedEvent = Atomics.load(this.#avail, 2 + this.size);
    return !valid || vringNeedEvent(usedEvent, newIdx, oldIdx);
  }

  /**
   * An early, unfenced {@link notifyNeeded} for EVENT_IDX after each push:
   * true when used idx has just passed the driver's used_event as read
   * without a fence (the caller then signals). The read can be stale, so a
   * false answer proves nothing: it leaves the window open, and the caller
   * must still call {@link notifyNeeded} (fenced) before it goes idle, e.g.
   * once per batch. False without EVENT_IDX or with nothing new; true for
   * the first push (nothing signalled yet). Hot path: plain loads only.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * import { GuestMemory, Virtqueue } from "./mod.ts";
   * import { mmapAnonymous } from "../sys/mod.ts";
   * const m = mmapAnonymous(0x3000);
   * const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0, size: 0x3000, userAddr: 0, hostAddr: m.addr }]);
   * const vq = new Virtqueue({ mem, size: 4, desc: 0, avail: 0x1000, used: 0x2000, eventIdx: true });
   * assert.equal(vq.notifyHint(), false); // nothing pushed
   * m.unmap();
   * ```
   */
  notifyHint(): boolean {
    if (this.#broken !== null || !this.eventIdx) return false;
    const newIdx = this.#usedIdx;
    const oldIdx = this.#signalledUsed;
    if (newIdx === oldIdx) return false;
    // Nothing signalled yet: notify, as notifyNeeded does (virtio_split_should_notify).
    const valid = this.#signalledUsedValid;
    if (valid && !vringNeedEvent(this.#avail[2 + this.size], newIdx, oldIdx)) return false;
    this.#signalledUsed = newIdx;
    this.#signalledUsedValid = true;
    return true;
  }

  /**
   * Asks the driver not to kick (while the device is polling the ring
   * anyway): sets VRING_USED_F_NO_NOTIFY; with EVENT_IDX it leaves avail_event
   * where it is, so the driver kicks at most once more (as Linux vhost does).
   */
  disableNotification(): void {
    this.#notificationsEnabled = false;
    if (!this.eventIdx) {
      this.#usedFlags |= VRING_USED_F_NO_NOTIFY;
      Atomics.store(this.#used16, 0, this.#usedFlags);
    }
  }

  /**
   * Asks the driver to kick again for new buffers (avail_event = last avail
   * idx with EVENT_IDX, else clears VRING_USED_F_NO_NOTIFY), then re-reads
   * avail idx after a full barrier. Returns true if buffers are already
   * pending: the driver may have added them before it saw the request, so
   * the caller must process them (disable again and pop) or lose them.
   */
  enableNotification(): boolean {
    this.#notificationsEnabled = true;
    if (this.eventIdx) {
      Atomics.store(this.#used16, 2 + 4 * this.size, this.#lastAvail);
    } else {
      this.#usedFlags &= ~VRING_USED_F_NO_NOTIFY;
      Atomics.store(this.#used16, 0, this.#usedFlags);
    }
    return this.availPending();
  }

  /** Whether notifications are enabled (see {@link enableNotification}). */
  get notificationsEnabled(): boolean {
    return this.#notificationsEnabled;
  }
}
