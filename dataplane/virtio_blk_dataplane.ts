/**
 * The virtio-blk dataplane of one IOThread, in the shape of QEMU's
 * hw/block/dataplane/virtio-blk.c plus the request handling of
 * hw/block/virtio-blk.c: every queue assigned to this thread has its kick
 * eventfd (host notifier) as a handler on the thread's AioContext; a kick (or
 * a successful busy poll of the avail ring) pops every available chain under
 * ioPlug/ioUnplug, parses it, submits it through the thread's BlockBackend,
 * and completes it in the same thread: status byte, used element, and one
 * guest notification (call eventfd) per batch when EVENT_IDX says so.
 *
 * @module
 */

import type { AioContext, AioTimer, BottomHalf } from "../aio/mod.ts";
import type { BlockBackend } from "../block/mod.ts";
import { eventfdRead, eventfdWrite } from "../sys/mod.ts";
import {
  blkIdBytes,
  type BlkRequestLimits,
  blkRequestLimits,
  encodeVirtioBlkConfig,
  type GuestMemory,
  parseBlkRequest,
  REQUEST_BROKEN,
  requestErrorStatus,
  SplitInflightRegion,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_SECTOR_SIZE,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  type VirtioBlkOptions,
  VirtioBlkRequest,
  Virtqueue,
  writeBlkId,
} from "../virtio/mod.ts";

/** ISR bit 0: a used buffer notification (virtio 1.2, 4.2.2 InterruptStatus). */
const VIRTIO_ISR_QUEUE = 1;

/**
 * Where one queue's rings are and how to signal, as collected from
 * SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR. Addresses are front-end virtual
 * addresses (vhost-user), translated through the current GuestMemory.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { DataPlaneQueueSetup } from "./virtio_blk_dataplane.ts";
 * const s: DataPlaneQueueSetup = {
 *   index: 0, size: 256, desc: 0x1000, avail: 0x2000, used: 0x3000, base: 0,
 *   kickFd: 7, callFd: 8, errFd: null, eventIdx: true, indirectDesc: true, enabled: true,
 * };
 * assert.equal(s.size, 256);
 * ```
 */
export interface DataPlaneQueueSetup {
  /** Queue index (for stats and messages). */
  index: number;
  /** Ring size (power of two). */
  size: number;
  /** Descriptor table, available and used ring (front-end virtual addresses). */
  desc: number;
  avail: number;
  used: number;
  /** Next avail index to take (SET_VRING_BASE); -1: where a running queue is now. */
  base: number;
  /** Kick eventfd, or null to poll the ring only (the NOFD flag). */
  kickFd: number | null;
  /** Call eventfd, or null: no notifications. */
  callFd: number | null;
  /** Error eventfd (SET_VRING_ERR), written once when the ring breaks. */
  errFd: number | null;
  /** VIRTIO_RING_F_EVENT_IDX negotiated. */
  eventIdx: boolean;
  /** VIRTIO_RING_F_INDIRECT_DESC negotiated. */
  indirectDesc: boolean;
  /** SET_VRING_ENABLE state: a disabled ring is not processed. */
  enabled: boolean;
  /**
   * The ring's inflight log (vhost-user INFLIGHT_SHMFD): host address of its
   * QueueRegionSplit and the queue size the region was made for. At start,
   * what it says was in flight is taken again first (and the ring's base is
   * used idx + that many); every pop and push is recorded in it.
   */
  inflight?: { addr: number; queueSize: number } | null;
}

/**
 * Per-queue counters (what the host prints on exit).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { DataPlaneQueueStats } from "./virtio_blk_dataplane.ts";
 * const s: DataPlaneQueueStats = {
 *   index: 0, requests: 0, reads: 0, writes: 0, flushes: 0, discards: 0,
 *   writeZeroes: 0, getIds: 0, errors: 0, unsupported: 0, readBytes: 0, writtenBytes: 0,
 *   kicks: 0, polls: 0, notifies: 0, broken: null,
 * };
 * assert.equal(s.requests, 0);
 * ```
 */
export interface DataPlaneQueueStats {
  index: number;
  /** Requests completed (any status). */
  requests: number;
  reads: number;
  writes: number;
  flushes: number;
  discards: number;
  writeZeroes: number;
  getIds: number;
  /** Completed with VIRTIO_BLK_S_IOERR. */
  errors: number;
  /** Completed with VIRTIO_BLK_S_UNSUPP. */
  unsupported: number;
  readBytes: number;
  writtenBytes: number;
  /** Kick eventfd reads that found a kick. */
  kicks: number;
  /** Requests taken again from the inflight log at ring starts. */
  resubmitted?: number;
  /** Batches started by busy polling instead of a kick. */
  polls: number;
  /** Call eventfd writes. */
  notifies: number;
  /**
   * With `latencyHistogram`: completed requests by latency (pop to push),
   * one count per bucket of {@link LATENCY_BUCKETS_NS} plus one for longer
   * (not cumulative), and their latencies' sum in ns.
   */
  latencyCounts?: number[];
  latencySumNs?: number;
  /** Why the ring was marked broken, or null. */
  broken: string | null;
  /** The ring's state when the stats were taken (Virtqueue.describe), or null when stopped. */
  ring?: string | null;
}

/**
 * One request slot: the parsed request plus its completion, created once and
 * recycled through the dataplane's free list (shared by its queues and kept
 * across queue restarts).
 */
class DataPlaneRequest {
  readonly req: VirtioBlkRequest;
  /** The queue the request was popped from (set per request). */
  queue: DataPlaneQueue | null = null;
  /** Sub-requests still running (discard / write zeroes ranges). */
  pending = 0;
  /** First error of the sub-requests (0 or -errno). */
  ret = 0;
  /** When the request was popped (ns on the context's clock), with latencyHistogram. */
  startNs = 0;
  readonly cb: (ret: number) => void;
  constructor(limits: BlkRequestLimits, done: (r: DataPlaneRequest, ret: number) => void) {
    this.req = new VirtioBlkRequest(limits);
    this.cb = (ret: number) => done(this, ret);
  }
}

/** One virtqueue served by this thread. */
class DataPlaneQueue {
  readonly stats: DataPlaneQueueStats;
  vq: Virtqueue;
  /** The ring's inflight log (kept across memory swaps: it holds the resubmission list). */
  readonly inflight: SplitInflightRegion | null;
  kickFd: number | null;
  callFd: number | null;
  errFd: number | null;
  enabled: boolean;
  /** Host notifier attached to the AioContext. */
  attached = false;
  /** Requests submitted and not yet completed. */
  inFlight = 0;
  /** Inside handle_output: completions there are notified at the batch's end. */
  handling = false;
  /** Resumed from an inflight log: signal the call fd once (see VirtioBlkDataPlane #start). */
  resumeNotify = false;
  /**
   * Why the ring broke (virtio_error), or null. Kept for the life of this
   * queue, across memory swaps: only a restart by the front-end (stop, then
   * SET_VRING_KICK, or a reset) makes a new, unbroken queue.
   */
  broken: string | null = null;
  idleWaiters: (() => void)[] = [];
  readonly notifyBh: BottomHalf;

  constructor(
    readonly setup: DataPlaneQueueSetup,
    vq: Virtqueue,
    notifyBh: BottomHalf,
    stats: DataPlaneQueueStats,
    inflight: SplitInflightRegion | null,
  ) {
    this.vq = vq;
    this.inflight = inflight;
    this.kickFd = setup.kickFd;
    this.callFd = setup.callFd;
    this.errFd = setup.errFd;
    this.enabled = setup.enabled;
    this.notifyBh = notifyBh;
    this.stats = stats;
    stats.broken = null;
  }
}

/**
 * Upper bounds (ns) of the latency histogram buckets: 10 us to 1 s, the
 * range between a null-co request and a stalled disk.
 */
export const LATENCY_BUCKETS_NS: readonly number[] = [
  10e3,
  25e3,
  50e3,
  100e3,
  250e3,
  500e3,
  1e6,
  2.5e6,
  5e6,
  10e6,
  25e6,
  50e6,
  100e6,
  250e6,
  1e9,
];

function newStats(index: number): DataPlaneQueueStats {
  return {
    index,
    requests: 0,
    reads: 0,
    writes: 0,
    flushes: 0,
    discards: 0,
    writeZeroes: 0,
    getIds: 0,
    errors: 0,
    unsupported: 0,
    readBytes: 0,
    writtenBytes: 0,
    kicks: 0,
    polls: 0,
    notifies: 0,
    broken: null,
  };
}

/** Counts one latency in its bucket. Hot path (with latencyHistogram): no allocation. */
function recordLatency(stats: DataPlaneQueueStats, ns: number): void {
  const counts = stats.latencyCounts!;
  let i = 0;
  while (i < LATENCY_BUCKETS_NS.length && ns > LATENCY_BUCKETS_NS[i]) i++;
  counts[i]++;
  stats.latencySumNs! += ns;
}

/**
 * Device settings shared by every queue of the dataplane.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { DataPlaneOptions } from "./virtio_blk_dataplane.ts";
 * const o: DataPlaneOptions = { device: { capacity: 2048 }, serial: "disk0", writeback: true };
 * assert.equal(o.serial, "disk0");
 * ```
 */
export interface DataPlaneOptions {
  /** The virtio-blk device model (capacity, limits, features offered). */
  device: VirtioBlkOptions;
  /** GET_ID answer (at most 20 bytes are used). */
  serial: string;
  /** Write cache enabled; false = flush after every write (writethrough). */
  writeback: boolean;
  /**
   * Called once when a running queue breaks (virtio_error): index and reason.
   * The queue stays stopped until it is restarted; the owner should end the
   * session (a vhost-user host closes the connection, so the VMM resets).
   */
  onBroken?: (index: number, reason: string) => void;
  /**
   * The device's interrupt status word (virtio-mmio InterruptStatus, QEMU's
   * `vdev->isr`), shared with the thread that answers the guest's reads of
   * it: bit 0 (used buffer) is set before every call-fd write, as QEMU's
   * virtio_notify sets the ISR before raising the interrupt. Where the call
   * fd is a KVM irqfd the interrupt reaches the guest without user space, so
   * this word is how the guest's interrupt handler learns why. vhost-user
   * has no ISR on this side (the VMM keeps it): leave it out.
   */
  isr?: Int32Array;
  /**
   * Raises the guest's interrupt instead of writing the call fd (the call fd
   * must still be set: it says the queue wants notifications). For a VMM
   * that injects the interrupt itself (vm/ with `--irq line`: KVM_IRQ_LINE
   * from the IOThread, to compare with KVM_IRQFD). Leave it out otherwise.
   */
  raiseIrq?: () => void;
  /**
   * Test-only: the completion of every `every`-th request is held back `ms`
   * milliseconds before it reaches the used ring (requests complete out of
   * order). Costs one null check per request when absent.
   */
  holdCompletions?: { every: number; ms: number } | null;
  /**
   * Test-only: every `breakRingEvery`-th chain popped breaks its ring as a
   * malformed one does (virtio_error: the owner closes the connection), but
   * the chain itself is sound, so the front-end's reconnect resubmits it from
   * its inflight log and the disk goes on. Costs one null check per request
   * when absent.
   */
  breakRingEvery?: number | null;
  /**
   * Keep a latency histogram per queue (`latencyCounts`, `latencySumNs` in
   * the stats): costs two clock reads per request, so only when asked
   * (the daemon's `--metrics`).
   */
  latencyHistogram?: boolean;
}

/**
 * QEMU's VirtIOBlockDataPlane for the queues one IOThread owns. Create it in
 * the IOThread with the thread's AioContext and BlockBackend; give it guest
 * memory with {@link setMemory}; start queues with {@link startQueue}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../aio/mod.ts";
 * import { BlockBackend } from "../block/mod.ts";
 * import { VirtioBlkDataPlane } from "./virtio_blk_dataplane.ts";
 * const ctx = new AioContext();
 * const blk = await BlockBackend.open(ctx, { driver: "null-co", size: 1 << 20 });
 * const dp = new VirtioBlkDataPlane(ctx, blk, {
 *   device: { capacity: 2048 }, serial: "x", writeback: true,
 * });
 * assert.equal(dp.inFlight, 0);
 * await dp.close();
 * await blk.close();
 * ctx.close();
 * ```
 */
export class VirtioBlkDataPlane {
  readonly ctx: AioContext;
  readonly blk: BlockBackend;
  #limits: BlkRequestLimits;
  readonly #id: Uint8Array;
  readonly #opts: DataPlaneOptions;
  #writeback: boolean;
  readonly #latency: boolean;
  #mem: GuestMemory | null = null;
  readonly #queues = new Map<number, DataPlaneQueue>();
  /** Counters per queue index, kept across stop/start (reconnects). */
  readonly #stats = new Map<number, DataPlaneQueueStats>();
  /** Inside a drained section: host notifiers detached (BlockDevOps). */
  #drained = false;
  /** {@link quiesce}d: no host notifier is attached again. */
  #quiesced = false;
  /**
   * A guest memory swap waiting for the requests on the old mapping: no host
   * notifier may be attached until it is done (drainedEnd, setEnabled and
   * startQueue meanwhile only record their state).
   */
  #memorySwap: Promise<void> | null = null;
  /** Queues stopped (out of #queues) whose in-flight requests have not finished. */
  readonly #stopping = new Set<DataPlaneQueue>();
  /**
   * Free request slots. Grown on demand (a new slot only when more requests
   * are in flight than ever before) instead of ring-size x seg_max iovecs
   * per queue start: 33 MB for one 1024-entry ring.
   */
  readonly #free: DataPlaneRequest[] = [];
  #slots = 0;
  /** Test-only completion hold (see DataPlaneOptions.holdCompletions). */
  readonly #hold: { every: number; ms: number } | null;
  #holdCount = 0;
  /** Test-only injected ring breaks (see DataPlaneOptions.breakRingEvery). */
  readonly #breakEvery: number | null;
  #popCount = 0;
  readonly #held: { q: DataPlaneQueue; r: DataPlaneRequest; status: number; at: number }[] = [];
  #holdTimer: AioTimer | null = null;
  readonly #subDoneCb = (r: DataPlaneRequest, ret: number) => this.#subDone(r.queue!, r, ret);

  constructor(ctx: AioContext, blk: BlockBackend, opts: DataPlaneOptions) {
    this.ctx = ctx;
    this.blk = blk;
    this.#opts = opts;
    this.#limits = blkRequestLimits(opts.device);
    encodeVirtioBlkConfig(opts.device); // validates every field once
    // Zero-padded to 20 bytes: a shorter serial reaches the guest NUL-terminated.
    this.#id = blkIdBytes(opts.serial);
    this.#writeback = opts.writeback;
    this.#hold = opts.holdCompletions ?? null;
    this.#breakEvery = opts.breakRingEvery ?? null;
    this.#latency = opts.latencyHistogram ?? false;
    blk.setDevOps({
      drainedBegin: () => this.#drainedBegin(),
      drainedEnd: () => this.#drainedEnd(),
    });
    // Completions may run inside a submission (null-co, as in QEMU's
    // coroutine exports): the first answers of a batch reach the ring while
    // the rest is still being popped, so a guest reaping them overlaps with
    // us instead of waiting for the whole batch.
    blk.setInlineCompletion(true);
  }

  /** Requests in flight over every queue. */
  /**
   * The disk's new size in 512-byte sectors (QMP block_resize): requests are
   * checked against it from the next one popped. Requests already created
   * keep their buffers (capacity is not part of their sizing).
   */
  setCapacity(sectors: number): void {
    this.#limits = Object.freeze({ ...this.#limits, capacity: sectors });
  }

  /** Disk size in 512-byte sectors that requests are checked against. */
  get capacity(): number {
    return this.#limits.capacity;
  }

  get inFlight(): number {
    let n = 0;
    for (const q of this.#queues.values()) n += q.inFlight;
    return n;
  }

  /** Request slots allocated so far (each holds one request in flight at a time). */
  get requestSlots(): number {
    return this.#slots;
  }

  /** Indexes of the queues this dataplane serves. */
  get queueIndexes(): number[] {
    return [...this.#queues.keys()];
  }

  /** Running queues that broke (virtio_error) and wait for the front-end to restart them. */
  get brokenQueues(): { index: number; reason: string }[] {
    const out: { index: number; reason: string }[] = [];
    for (const [index, q] of this.#queues) {
      if (q.broken !== null) out.push({ index, reason: q.broken });
    }
    return out;
  }

  /** Changes the write cache mode (virtio-blk config `writeback`, CONFIG_WCE). */
  setWriteback(on: boolean): void {
    this.#writeback = on;
  }

  /**
   * Replaces guest memory (SET_MEM_TABLE): stops taking requests, waits for
   * the in-flight ones (they point into the old mapping), swaps, and rebuilds
   * the running queues on the new mapping at their current ring positions.
   * The caller unmaps the old memory after this resolves. All or nothing: a
   * mapping that does not hold every running ring is refused (VirtqueueError)
   * and the queues go on on the old one.
   */
  async setMemory(mem: GuestMemory | null): Promise<void> {
    while (this.#memorySwap !== null) await this.#memorySwap;
    let done!: () => void;
    this.#memorySwap = new Promise<void>((r) => done = r);
    try {
      // Nothing attaches while #memorySwap is set, so no request can start on
      // the old mapping once this wait began (QEMU's vhost-user-blk export
      // does the same under vu_blk_drained_begin ... end).
      for (const q of this.#queues.values()) this.#detach(q);
      await this.#waitIdle();
      // Every ring on the new mapping first: one that does not fit throws
      // before anything changed.
      const rings = new Map<DataPlaneQueue, Virtqueue>();
      if (mem !== null) {
        for (const q of this.#queues.values()) {
          rings.set(
            q,
            this.#newVirtqueue({ ...q.setup, base: q.vq.lastAvailIdx }, mem, q.inflight),
          );
        }
      }
      this.#mem = mem;
      for (const [i, q] of this.#queues) {
        if (mem === null) {
          this.#queues.delete(i);
          this.#dropQueue(q);
          continue;
        }
        q.vq = rings.get(q)!;
      }
    } finally {
      this.#memorySwap = null;
      done();
      for (const q of this.#queues.values()) this.#attach(q);
    }
  }

  #newVirtqueue(
    s: DataPlaneQueueSetup,
    mem: GuestMemory,
    inflight: SplitInflightRegion | null,
  ): Virtqueue {
    return new Virtqueue({
      inflight,
      mem,
      size: s.size,
      desc: s.desc,
      avail: s.avail,
      used: s.used,
      addressSpace: "user",
      eventIdx: s.eventIdx,
      indirectDesc: s.indirectDesc,
      lastAvailIdx: s.base,
      // seg_max is offered before the ring size is known; Linux then builds
      // indirect tables of up to seg_max + 2 buffers even on a smaller ring
      // (QEMU bounds chains by VIRTQUEUE_MAX_SIZE for the same reason).
      maxChainLength: Math.max(s.size, this.#limits.segMax + 2),
    });
  }

  /**
   * Starts serving a queue (vhost-user: SET_VRING_KICK after NUM/ADDR/BASE).
   * Throws a VirtqueueError when the ring does not fit guest memory. A queue
   * that already runs is restarted from `setup.base`; a restart that is
   * refused leaves it running as before (its kick fd, addresses and
   * position), so the caller may keep using the old kick fd. Resolves with
   * the number of requests taken again from the inflight log.
   */
  async startQueue(setup: DataPlaneQueueSetup): Promise<number> {
    // A ring started during a memory swap would be built on the mapping
    // that is about to go: start it on the new one.
    while (this.#memorySwap !== null) await this.#memorySwap;
    let previous: DataPlaneQueueSetup | null = null;
    const running = this.#queues.get(setup.index);
    if (running !== undefined) {
      const broken = running.vq.broken;
      const current = await this.stopQueue(setup.index);
      // The fds and enable state as they are now (SET_VRING_CALL/ERR/ENABLE
      // since the start changed the queue, not its setup).
      if (!broken) {
        previous = {
          ...running.setup,
          base: current,
          kickFd: running.kickFd,
          callFd: running.callFd,
          errFd: running.errFd,
          enabled: running.enabled,
        };
      }
      // A new kick fd without SET_VRING_BASE: go on from where the ring is.
      if (setup.base < 0) setup = { ...setup, base: current };
      while (this.#memorySwap !== null) await this.#memorySwap;
    }
    try {
      return this.#start(setup);
    } catch (e) {
      if (previous !== null && !this.#queues.has(setup.index)) {
        try {
          this.#start(previous);
        } catch { /* guest memory changed while the queue stopped: it stays stopped */ }
      }
      throw e;
    }
  }

  /**
   * Builds a queue's virtqueue on the current memory and attaches it (throws
   * if it does not fit); returns how many requests its inflight log resubmits.
   */
  #start(setup: DataPlaneQueueSetup): number {
    const mem = this.#mem;
    if (mem === null) throw new Error(`queue ${setup.index}: no guest memory (SET_MEM_TABLE)`);
    if (this.#queues.has(setup.index)) {
      throw new Error(`queue ${setup.index}: started twice at once`);
    }
    if (setup.base < 0) setup = { ...setup, base: 0 };
    const inflight = setup.inflight
      ? SplitInflightRegion.at(setup.inflight.addr, setup.inflight.queueSize)
      : null;
    const vq = this.#newVirtqueue(setup, mem, inflight);
    // A log kept by the front-end across our restart: what was in flight
    // goes first, in the order it was taken (the base becomes used idx + n).
    const resumed = inflight !== null && inflight.version !== 0;
    const resubmitted = vq.resumeInflight();
    let q: DataPlaneQueue | undefined = undefined;
    const bh = this.ctx.bhNew(() => this.#notifyGuest(q!), `notify-vq${setup.index}`);
    let stats = this.#stats.get(setup.index);
    if (stats === undefined) {
      this.#stats.set(setup.index, stats = newStats(setup.index));
      if (this.#latency) {
        stats.latencyCounts = new Array(LATENCY_BUCKETS_NS.length + 1).fill(0);
        stats.latencySumNs = 0;
      }
    }
    stats.resubmitted = (stats.resubmitted ?? 0) + resubmitted;
    q = new DataPlaneQueue({ ...setup }, vq, bh, stats, inflight);
    // Used entries the previous back-end published after the front-end had
    // stopped listening to its call fd (a clean stop finishing its requests
    // after the disconnect) were never signalled, and a driver waiting for
    // them sends nothing more: signal once, as soon as there is a call fd
    // (QEMU sends SET_VRING_CALL after SET_VRING_KICK). A spurious
    // interrupt is harmless.
    q.resumeNotify = resumed;
    this.#queues.set(setup.index, q);
    this.#attach(q);
    this.#resumeNotify(q);
    return resubmitted;
  }

  /**
   * Stops a queue (GET_VRING_BASE): detaches its notifier, waits for its
   * in-flight requests, notifies the guest of what completed, and returns
   * the next avail index to process.
   */
  async stopQueue(index: number): Promise<number> {
    const q = this.#queues.get(index);
    if (!q) throw new Error(`queue ${index} is not running`);
    this.#detach(q);
    this.#queues.delete(index);
    this.#stopping.add(q);
    try {
      await this.#whenIdle(q);
    } finally {
      this.#stopping.delete(q);
    }
    this.#notifyGuest(q);
    const base = q.vq.lastAvailIdx;
    this.#dropQueue(q);
    return base;
  }

  /** SET_VRING_CALL while running. The caller closes the old fd afterwards. */
  setCallFd(index: number, fd: number | null): void {
    const q = this.#queues.get(index);
    if (!q) return;
    q.callFd = fd;
    this.#resumeNotify(q);
  }

  /** The one notification of a ring resumed from an inflight log (see #start). */
  #resumeNotify(q: DataPlaneQueue): void {
    if (!q.resumeNotify || q.callFd === null) return;
    q.resumeNotify = false;
    this.#signal(q);
  }

  /** SET_VRING_ERR while running. */
  setErrFd(index: number, fd: number | null): void {
    const q = this.#queues.get(index);
    if (q) q.errFd = fd;
  }

  /** SET_VRING_ENABLE while running. */
  setEnabled(index: number, enabled: boolean): void {
    const q = this.#queues.get(index);
    if (!q) return;
    q.enabled = enabled;
    if (enabled) this.#attach(q);
    else this.#detach(q);
  }

  /** Counters of every queue served so far (cumulative over restarts). */
  stats(): DataPlaneQueueStats[] {
    return [...this.#stats.values()].map((s) => {
      const q = this.#queues.get(s.index);
      const ring = q === undefined ? null : `${q.vq.describe()} requests ${q.inFlight}` +
        (q.attached ? "" : " detached") + (q.notifyBh.scheduled ? " notify-pending" : "") +
        (q.broken === null ? "" : " broken");
      return { ...s, ring };
    });
  }

  /**
   * Stops taking requests for good (a clean stop of the host) and resolves
   * once none is in flight, while the front-end still listens: their used
   * entries and notifications reach it before the connection closes. (A
   * front-end that has stopped the rings when it sees the disconnect takes
   * the used idx as the ring base and no longer watches the call fd.)
   */
  async quiesce(): Promise<void> {
    this.#quiesced = true;
    for (const q of this.#queues.values()) this.#detach(q);
    await this.#waitIdle();
  }

  /** Stops every queue (waiting for in-flight requests) and drops memory. */
  async close(): Promise<void> {
    for (const i of [...this.#queues.keys()]) await this.stopQueue(i);
    this.#holdTimer?.del();
    this.#mem = null;
    this.blk.setDevOps(null);
    this.blk.setInlineCompletion(false);
  }

  // ---- host notifier ----------------------------------------------------------------

  #attach(q: DataPlaneQueue): void {
    if (
      q.attached || this.#drained || this.#quiesced || this.#memorySwap !== null || !q.enabled ||
      q.broken !== null || q.vq.broken
    ) {
      return;
    }
    q.attached = true;
    const handler = {
      read: () => {
        if (q.kickFd !== null) {
          let n: number;
          try {
            n = eventfdRead(q.kickFd);
          } catch (e) {
            // A kick fd that fails (closed under us, not an eventfd) breaks
            // this ring and detaches it, never the IOThread.
            this.#markBroken(q, `kick fd ${q.kickFd}: ${(e as Error).message}`);
            return;
          }
          if (n !== 0) q.stats.kicks++;
        }
        this.#handleOutput(q);
      },
      poll: () => q.vq.availPending(),
      pollReady: () => {
        q.stats.polls++;
        this.#handleOutput(q);
      },
      // While the IOThread busy-polls the ring, the driver need not kick
      // (virtio_queue_aio_poll_begin/end); pollEnd re-enables kicks and the
      // context then polls once more, so a request that raced in is seen.
      pollBegin: () => q.vq.disableNotification(),
      pollEnd: () => void q.vq.enableNotification(),
    };
    q.vq.enableNotification();
    if (q.kickFd !== null) this.ctx.setFdHandler(q.kickFd, handler);
    // Work may be waiting from before (kick consumed while detached).
    this.ctx.scheduleOneshot(() => {
      if (q.attached) this.#handleOutput(q);
    });
  }

  #detach(q: DataPlaneQueue): void {
    if (!q.attached) return;
    q.attached = false;
    if (q.kickFd !== null) this.ctx.setFdHandler(q.kickFd, null);
  }

  #drainedBegin(): void {
    this.#drained = true;
    for (const q of this.#queues.values()) this.#detach(q);
  }

  #drainedEnd(): void {
    this.#drained = false;
    for (const q of this.#queues.values()) this.#attach(q);
  }

  // ---- requests -----------------------------------------------------------------------

  /** virtio_blk_handle_vq: pop everything, submit as one batch. Hot path. */
  #handleOutput(q: DataPlaneQueue): void {
    if (!q.attached) return;
    const vq = q.vq;
    const mem = this.#mem!;
    const blk = this.blk;
    blk.ioPlug();
    q.handling = true;
    // In poll mode notifications are already off: leave them so (QEMU's
    // suppress_notifications in virtio_blk_handle_vq).
    const suppress = vq.notificationsEnabled;
    try {
      for (;;) {
        if (suppress) vq.disableNotification();
        for (;;) {
          const chain = vq.pop();
          if (chain === null) break;
          if (this.#breakEvery !== null && ++this.#popCount % this.#breakEvery === 0) {
            this.#markBroken(q, `request ${chain.head}: test: injected ring break`);
            return;
          }
          const r = this.#free.pop() ?? this.#newRequest();
          r.queue = q;
          if (this.#latency) r.startNs = this.ctx.now();
          const req = r.req;
          const err = parseBlkRequest(chain, mem, this.#limits, req);
          q.inFlight++;
          if (err !== null) {
            const status = requestErrorStatus(err);
            if (status === REQUEST_BROKEN) {
              // No status byte to write: the driver is broken (virtio_error).
              q.inFlight--;
              this.#free.push(r);
              const why = chain.error === null ? err : `${err} (${chain.error})`;
              this.#markBroken(q, `request ${req.head}: ${why}`);
              return;
            }
            this.#complete(q, r, status);
            continue;
          }
          this.#submit(q, r);
        }
        if (vq.broken) {
          this.#markBroken(q, vq.brokenReason?.message ?? "broken");
          return;
        }
        if (!(suppress ? vq.enableNotification() : vq.availPending())) break;
      }
    } finally {
      q.handling = false;
      blk.ioUnplug();
    }
  }

  #submit(q: DataPlaneQueue, r: DataPlaneRequest): void {
    const req = r.req;
    const blk = this.blk;
    r.ret = 0;
    switch (req.type) {
      case VIRTIO_BLK_T_IN:
        r.pending = 1;
        q.stats.reads++;
        q.stats.readBytes += req.qiov.size;
        blk.aioPreadv(req.sector * VIRTIO_BLK_SECTOR_SIZE, req.qiov, r.cb);
        return;
      case VIRTIO_BLK_T_OUT:
        // Writethrough: the flush follows in #subDone.
        r.pending = this.#writeback ? 1 : 2;
        q.stats.writes++;
        q.stats.writtenBytes += req.qiov.size;
        blk.aioPwritev(req.sector * VIRTIO_BLK_SECTOR_SIZE, req.qiov, r.cb);
        return;
      case VIRTIO_BLK_T_FLUSH:
        r.pending = 1;
        q.stats.flushes++;
        blk.aioFlush(r.cb);
        return;
      case VIRTIO_BLK_T_GET_ID:
        q.stats.getIds++;
        req.inLen = writeBlkId(req, this.#id);
        this.#complete(q, r, VIRTIO_BLK_S_OK);
        return;
      case VIRTIO_BLK_T_DISCARD:
      case VIRTIO_BLK_T_WRITE_ZEROES: {
        const discard = req.type === VIRTIO_BLK_T_DISCARD;
        if (discard) q.stats.discards++;
        else q.stats.writeZeroes++;
        const n = req.rangeCount;
        r.pending = n;
        for (let i = 0; i < n; i++) {
          const off = req.rangeSector[i] * VIRTIO_BLK_SECTOR_SIZE;
          const len = req.rangeSectors[i] * VIRTIO_BLK_SECTOR_SIZE;
          if (discard) blk.aioPdiscard(off, len, r.cb);
          else blk.aioPwriteZeroes(off, len, req.rangeUnmap[i] !== 0, r.cb);
        }
        return;
      }
    }
    this.#complete(q, r, VIRTIO_BLK_S_IOERR); // the parser only passes the types above
  }

  /** One block-layer completion of request `r`. Hot path. */
  #subDone(q: DataPlaneQueue, r: DataPlaneRequest, ret: number): void {
    if (ret < 0 && r.ret === 0) r.ret = ret;
    if (--r.pending > 0) {
      // Writethrough: the write finished, now the flush (QEMU emulates FUA so).
      if (r.req.type === VIRTIO_BLK_T_OUT && r.ret === 0) {
        this.blk.aioFlush(r.cb);
        return;
      }
      if (r.req.type !== VIRTIO_BLK_T_OUT) return;
      r.pending = 0; // the write failed: skip the flush
    }
    this.#complete(q, r, r.ret === 0 ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR);
  }

  /** virtio_blk_req_complete: status, used element, batched notify. Hot path. */
  #complete(q: DataPlaneQueue, r: DataPlaneRequest, status: number): void {
    if (this.#hold !== null && ++this.#holdCount % this.#hold.every === 0) {
      this.#holdBack(q, r, status);
      return;
    }
    this.#completeNow(q, r, status);
  }

  /** Test-only: completes `r` `ms` later (it stays in flight meanwhile). */
  #holdBack(q: DataPlaneQueue, r: DataPlaneRequest, status: number): void {
    const hold = this.#hold!;
    this.#held.push({ q, r, status, at: this.ctx.now() + hold.ms * 1e6 });
    this.#holdTimer ??= this.ctx.timerNew(() => {
      const now = this.ctx.now();
      while (this.#held.length > 0 && this.#held[0].at <= now) {
        const h = this.#held.shift()!;
        this.#completeNow(h.q, h.r, h.status);
      }
      if (this.#held.length > 0) this.#holdTimer!.modNs(this.#held[0].at);
    });
    if (!this.#holdTimer.pending) this.#holdTimer.modNs(this.#held[0].at);
  }

  #completeNow(q: DataPlaneQueue, r: DataPlaneRequest, status: number): void {
    const req = r.req;
    const stats = q.stats;
    stats.requests++;
    if (this.#latency) recordLatency(stats, this.ctx.now() - r.startNs);
    if (status === VIRTIO_BLK_S_IOERR) stats.errors++;
    else if (status !== VIRTIO_BLK_S_OK) stats.unsupported++;
    req.writeStatus(status);
    q.vq.push(req.head, status === VIRTIO_BLK_S_OK ? req.usedLen : 1);
    r.queue = null;
    this.#free.push(r);
    if (--q.inFlight === 0 && !q.handling) {
      // Nothing else outstanding: no batch to wait for (QD1 latency).
      if (q.notifyBh.scheduled) q.notifyBh.cancel();
      this.#notifyGuest(q);
    } else if (q.vq.eventIdx) {
      // EVENT_IDX: the driver asks for exactly one notification, when used
      // idx passes its used_event; tell it at once, as libvhost-user's
      // vu_queue_notify after each push does. A sleeping driver then wakes
      // while the rest of the batch completes, instead of after it. The
      // check here has no fence (notifyHint); the fenced one, which cannot
      // miss a driver that just re-enabled, runs once for the batch, from
      // the BH.
      if (q.callFd !== null && q.vq.notifyHint()) this.#signal(q);
      if (!q.notifyBh.scheduled) q.notifyBh.schedule();
    } else if (!q.notifyBh.scheduled) {
      // Without EVENT_IDX every check with interrupts enabled says yes: one
      // notification per batch, from the BH.
      q.notifyBh.schedule();
    }
    if (q.inFlight === 0 && q.idleWaiters.length > 0) {
      const w = q.idleWaiters;
      q.idleWaiters = [];
      for (const f of w) f();
    }
  }

  /** One guest notification for everything pushed since the last one. */
  #notifyGuest(q: DataPlaneQueue): void {
    if (q.callFd !== null && q.vq.notifyNeeded()) this.#signal(q);
  }

  /** Raises the guest's interrupt for `q` (call fd set): ISR bit, then the call fd or raiseIrq. */
  #signal(q: DataPlaneQueue): void {
    const isr = this.#opts.isr;
    if (isr !== undefined) Atomics.or(isr, 0, VIRTIO_ISR_QUEUE);
    try {
      const raise = this.#opts.raiseIrq;
      if (raise !== undefined) raise();
      else eventfdWrite(q.callFd!, 1);
    } catch (e) {
      // The connection only accepts non-blocking eventfds, whose writes
      // cannot fail; one that does anyway (closed, reused) breaks this
      // ring, not the IOThread (an exception out of a completion would).
      const fd = q.callFd;
      q.callFd = null;
      this.#markBroken(q, `call fd ${fd}: ${(e as Error).message}`);
      return;
    }
    q.stats.notifies++;
  }

  /**
   * virtio_error: stop the queue for good (until the front-end restarts it),
   * tell the front-end through the error eventfd, and the owner through
   * `onBroken` (the host closes the connection: the VMM resets the device).
   */
  #markBroken(q: DataPlaneQueue, reason: string): void {
    this.#detach(q);
    if (q.broken !== null) return;
    q.broken = reason;
    q.stats.broken = reason;
    if (q.errFd !== null) {
      try {
        eventfdWrite(q.errFd, 1);
      } catch { /* the front-end closed it: nothing more to tell */ }
    }
    this.#opts.onBroken?.(q.setup.index, reason);
  }

  /** A new request slot: only when every slot is in flight (cold path once warm). */
  #newRequest(): DataPlaneRequest {
    this.#slots++;
    return new DataPlaneRequest(this.#limits, this.#subDoneCb);
  }

  /** Resolves once no queue, running or being stopped, has a request in flight. */
  async #waitIdle(): Promise<void> {
    for (;;) {
      let busy: DataPlaneQueue | null = null;
      for (const q of this.#queues.values()) if (q.inFlight > 0) busy = q;
      for (const q of this.#stopping) if (q.inFlight > 0) busy = q;
      if (busy === null) return;
      await this.#whenIdle(busy);
    }
  }

  /** Resolves once `q` has no request in flight (woken from #complete). */
  #whenIdle(q: DataPlaneQueue): Promise<void> {
    if (q.inFlight === 0) return Promise.resolve();
    return new Promise<void>((r) => q.idleWaiters.push(r));
  }

  #dropQueue(q: DataPlaneQueue): void {
    this.#detach(q);
    q.notifyBh.delete();
  }
}
