/**
 * The functions the main thread runs in a virtio-blk IOThread through
 * `IOThread.call` (the module is loaded into the IOThread's Worker): open the
 * thread's own BlockBackend, install guest memory, start and stop queues,
 * forward ring fd and enable changes, report stats. Each call gets the
 * thread's AioContext first and plain JSON arguments; fds and host addresses
 * are process-wide, so they travel as numbers.
 *
 * The host's queues are spread over its IOThreads, each with its own
 * {@link VirtioBlkDataPlane}; the multi-export daemon runs several exports
 * in one IOThread, each call naming its export (`args.export`, "" when
 * absent), each export with its own BlockBackend and dataplane.
 *
 * @module
 */

import type { AioContext } from "../aio/mod.ts";
import { BlockBackend, type BlockOptions, RangeLockTable, ThrottleGroup } from "../block/mod.ts";
import { eventfdWrite, type IsolateHeap, isolateHeap, kvmIrqLine, threadId } from "../sys/mod.ts";
import { GuestMemory, type MappedMemoryRegion, type VirtioBlkOptions } from "../virtio/mod.ts";
import {
  type DataPlaneQueueSetup,
  type DataPlaneQueueStats,
  VirtioBlkDataPlane,
} from "./virtio_blk_dataplane.ts";

/**
 * One export's state in this thread. The host has one (key ""); the
 * multi-export daemon (dataplane/daemon/) runs several exports in one
 * IOThread, each call naming its export in `args.export`.
 */
interface BlkExportState {
  blk: BlockBackend | null;
  dataplane: VirtioBlkDataPlane | null;
  memory: GuestMemory | null;
  brokenLog: string[];
  brokenDropped: number;
}

const exports = new Map<string, BlkExportState>();

/** The export a call is for: `args.export`, or "" (the host's only one). */
function exportKey(args: unknown): string {
  if (typeof args === "object" && args !== null && "export" in args) {
    const k = (args as { export: unknown }).export;
    if (typeof k === "string") return k;
  }
  return "";
}

function state(args: unknown): BlkExportState {
  const key = exportKey(args);
  let s = exports.get(key);
  if (s === undefined) {
    s = { blk: null, dataplane: null, memory: null, brokenLog: [], brokenDropped: 0 };
    exports.set(key, s);
  }
  return s;
}

/**
 * Broken-ring reports kept between two {@link blkStats} calls. A front-end
 * may restart a broken ring (GET_VRING_BASE, SET_VRING_KICK) and break it
 * again forever; past this many only a count is kept.
 */
const BROKEN_LOG_MAX = 64;

function logBroken(s: BlkExportState, index: number, reason: string): void {
  if (s.brokenLog.length < BROKEN_LOG_MAX) s.brokenLog.push(`queue ${index}: ${reason}`);
  else s.brokenDropped++;
}

/**
 * What {@link blkOpen} learns about the image.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { BlkImageInfo } from "./blk_iothread.ts";
 * const i: BlkImageInfo = { length: 1 << 20, requestAlignment: 1, memAlignment: 1, readOnly: false };
 * assert.equal(i.length, 1048576);
 * ```
 */
export interface BlkImageInfo {
  length: number;
  requestAlignment: number;
  memAlignment: number;
  readOnly: boolean;
}

/**
 * What the host gives every IOThread at start (IOThread `data`): the image's
 * range-lock table, shared by all threads' drivers.
 *
 * @example
 * ```ts
 * import type { BlkThreadData } from "./blk_iothread.ts";
 * import { RangeLockTable } from "../block/mod.ts";
 * const d: BlkThreadData = { rangeLocks: RangeLockTable.create().shared };
 * if (!(d.rangeLocks instanceof SharedArrayBuffer)) throw new Error("shared");
 * ```
 */
export interface BlkThreadData {
  rangeLocks?: SharedArrayBuffer;
  /**
   * The export `rangeLocks` and `qcow2` belong to ("" or absent: the
   * export-less host's; the host's short options name their one daemon
   * export, whose queues are spread over these threads).
   */
  sharedExport?: string;
  /** A writable qcow2 image's Qcow2SharedState (one owner of its metadata). */
  qcow2?: SharedArrayBuffer;
  /** The host's `--throttle` group (THROTTLE_GROUP_BYTES, initialised), joined by every thread. */
  throttle?: SharedArrayBuffer;
  /**
   * The device's interrupt status word (4 bytes; DataPlaneOptions `isr`),
   * for a transport whose guest reads it (virtio-mmio under vm/).
   */
  isr?: SharedArrayBuffer;
  /**
   * Raise the guest's interrupt with KVM_IRQ_LINE on this VM fd and GSI (an
   * edge: 1 then 0) instead of writing the call fd (DataPlaneOptions
   * `raiseIrq`): vm/'s `--irq line`, to measure what KVM_IRQFD saves.
   */
  irqLine?: { vmFd: number; gsi: number };
}

function need(args: unknown): VirtioBlkDataPlane {
  const dp = exports.get(exportKey(args))?.dataplane ?? null;
  if (dp === null) throw new Error("virtio-blk IOThread: device not configured");
  return dp;
}

/**
 * Opens this thread's BlockBackend on the image (each IOThread has its own
 * engine instance, as QEMU's blk in the IOThread's AioContext), attached to
 * the image's shared range-lock table when the host gave one.
 *
 * @example
 * ```ts ignore
 * const info = await iothread.call<BlkImageInfo>("blkOpen", { driver: "null-co", size: 4096 });
 * ```
 */
export async function blkOpen(
  ctx: AioContext,
  args: BlockOptions & { export?: string },
  data?: BlkThreadData,
): Promise<BlkImageInfo> {
  const s = state(args);
  if (s.blk !== null) throw new Error("virtio-blk IOThread: image already open");
  const { export: key, ...opts } = args;
  // The thread's shared tables belong to one image; other exports get their own.
  const owner = (key ?? "") === (data?.sharedExport ?? "");
  const rangeLocks = data?.rangeLocks && owner ? new RangeLockTable(data.rangeLocks) : undefined;
  const throttleGroup = data?.throttle && owner ? new ThrottleGroup(data.throttle) : undefined;
  const qcow2Shared = data?.qcow2 && owner ? data.qcow2 : undefined;
  const blk = await BlockBackend.open(ctx, opts, { rangeLocks, qcow2Shared, throttleGroup });
  if (s.blk !== null) {
    await blk.close();
    throw new Error("virtio-blk IOThread: image already open");
  }
  s.blk = blk;
  return {
    length: blk.length,
    requestAlignment: blk.requestAlignment,
    memAlignment: blk.memAlignment,
    readOnly: blk.readOnly,
  };
}

function irqLineEdge(vmFd: number, gsi: number): () => void {
  return () => {
    kvmIrqLine(vmFd, gsi, 1);
    kvmIrqLine(vmFd, gsi, 0);
  };
}

/**
 * Creates the dataplane once the main thread has decided the device model.
 * `brokenNotifyFd` is an eventfd of the main thread, written when a running
 * queue breaks: the main thread then asks {@link blkBrokenQueues} and ends
 * the session (closes the vhost-user connection).
 *
 * @example
 * ```ts ignore
 * await iothread.call("blkConfigure", { device: { capacity: 2048 }, serial: "d", writeback: true });
 * ```
 */
export function blkConfigure(
  ctx: AioContext,
  args: {
    device: VirtioBlkOptions;
    serial: string;
    writeback: boolean;
    brokenNotifyFd?: number;
    /** Test-only: see DataPlaneOptions.holdCompletions. */
    holdCompletions?: { every: number; ms: number } | null;
    /** Test-only: see DataPlaneOptions.breakRingEvery. */
    breakRingEvery?: number | null;
    export?: string;
    latencyHistogram?: boolean;
  },
  data?: BlkThreadData,
): void {
  const s = state(args);
  if (s.blk === null) throw new Error("virtio-blk IOThread: blkOpen first");
  if (s.dataplane !== null) throw new Error("virtio-blk IOThread: already configured");
  const { brokenNotifyFd, export: _key, ...opts } = args;
  s.dataplane = new VirtioBlkDataPlane(ctx, s.blk, {
    ...opts,
    isr: data?.isr ? new Int32Array(data.isr, 0, 1) : undefined,
    raiseIrq: data?.irqLine ? irqLineEdge(data.irqLine.vmFd, data.irqLine.gsi) : undefined,
    onBroken: (index, reason) => {
      logBroken(s, index, reason);
      if (brokenNotifyFd === undefined) return;
      try {
        eventfdWrite(brokenNotifyFd, 1);
      } catch { /* the host is stopping: it closed the eventfd */ }
    },
  });
}

/**
 * Running queues of this thread that broke and wait for a restart (what the
 * main thread checks when the broken-ring eventfd fires).
 *
 * @example
 * ```ts ignore
 * const broken = await iothread.call<{ index: number; reason: string }[]>("blkBrokenQueues");
 * ```
 */
export function blkBrokenQueues(
  _ctx: AioContext,
  args?: { export?: string },
): { index: number; reason: string }[] {
  return exports.get(exportKey(args))?.dataplane?.brokenQueues ?? [];
}

/**
 * Installs the guest memory the main thread mapped (null: none). Resolves
 * once no request uses the previous mapping, so the main thread may unmap it;
 * rejects, changing nothing, when a running ring is not in the new mapping.
 *
 * @example
 * ```ts ignore
 * await iothread.call("blkSetMemory", { regions: mem.regions() });
 * ```
 */
export async function blkSetMemory(
  _ctx: AioContext,
  args: { regions: MappedMemoryRegion[] | null; export?: string },
): Promise<void> {
  const dp = need(args);
  const s = state(args);
  const next = args.regions === null ? null : GuestMemory.fromMapped(args.regions);
  await dp.setMemory(next);
  s.memory?.close();
  s.memory = next;
}

/**
 * Starts (or restarts) a queue. A refused restart leaves the queue running
 * as before (old kick fd, addresses, position). Resolves with the number of
 * requests its inflight log resubmits.
 *
 * @example
 * ```ts ignore
 * await iothread.call("blkStartQueue", setup);
 * ```
 */
export function blkStartQueue(
  _ctx: AioContext,
  args: DataPlaneQueueSetup & { export?: string },
): Promise<number> {
  const { export: _key, ...setup } = args;
  return need(args).startQueue(setup);
}

/**
 * Stops a queue after its in-flight requests; resolves with the next avail index.
 *
 * @example
 * ```ts ignore
 * const base = await iothread.call<number>("blkStopQueue", { index: 0 });
 * ```
 */
export function blkStopQueue(
  _ctx: AioContext,
  args: { index: number; export?: string },
): Promise<number> {
  const stopped = need(args).stopQueue(args.index); // detaches the queue at once
  // Requests a throttle filter holds would hold the stop for as long as the
  // limits say: send them on (QEMU drains the export, which releases them).
  exports.get(exportKey(args))?.blk?.releaseHeld();
  return stopped;
}

/**
 * Forwards SET_VRING_CALL / SET_VRING_ERR / SET_VRING_ENABLE to a running queue.
 *
 * @example
 * ```ts ignore
 * await iothread.call("blkSetVring", { index: 0, callFd: 12 });
 * ```
 */
export function blkSetVring(
  _ctx: AioContext,
  args: {
    index: number;
    callFd?: number | null;
    errFd?: number | null;
    enabled?: boolean;
    export?: string;
  },
): void {
  const dp = need(args);
  if (args.callFd !== undefined) dp.setCallFd(args.index, args.callFd);
  if (args.errFd !== undefined) dp.setErrFd(args.index, args.errFd);
  if (args.enabled !== undefined) dp.setEnabled(args.index, args.enabled);
}

/**
 * Changes the write cache mode (guest wrote the config `writeback` byte).
 *
 * @example
 * ```ts ignore
 * await iothread.call("blkSetWriteback", { on: false });
 * ```
 */
export function blkSetWriteback(_ctx: AioContext, args: { on: boolean; export?: string }): void {
  need(args).setWriteback(args.on);
}

/**
 * Counters of this thread's queues, its AioContext, and broken-ring reports
 * since the last call (at most 64, then one line counting the rest).
 *
 * @example
 * ```ts ignore
 * const s = await iothread.call<BlkThreadStats>("blkStats");
 * ```
 */
export function blkStats(ctx: AioContext, args?: { export?: string }): BlkThreadStats {
  const s = exports.get(exportKey(args)) ??
    { blk: null, dataplane: null, memory: null, brokenLog: [], brokenDropped: 0 };
  const broken = s.brokenLog;
  if (s.brokenDropped > 0) broken.push(`and ${s.brokenDropped} more broken-ring reports`);
  s.brokenLog = [];
  s.brokenDropped = 0;
  return {
    queues: s.dataplane?.stats() ?? [],
    inFlight: s.dataplane?.inFlight ?? 0,
    aio: { ...ctx.stats },
    broken,
    heap: isolateHeap(),
  };
}

/**
 * What {@link blkStats} returns.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { BlkThreadStats } from "./blk_iothread.ts";
 * const s: BlkThreadStats = { queues: [], inFlight: 0, aio: {}, broken: [] };
 * assert.equal(s.inFlight, 0);
 * ```
 */
export interface BlkThreadStats {
  queues: DataPlaneQueueStats[];
  inFlight: number;
  aio: Record<string, number>;
  broken: string[];
  /** This IOThread's V8 heap. */
  heap?: IsolateHeap;
}

/**
 * Stops taking requests from every queue of the export for good and resolves once none is
 * in flight (the host's clean stop, before it closes the connection).
 *
 * @example
 * ```ts ignore
 * await iothread.call("blkQuiesce");
 * ```
 */
export async function blkQuiesce(_ctx: AioContext, args?: { export?: string }): Promise<void> {
  const s = exports.get(exportKey(args));
  const dp = s?.dataplane;
  if (!dp) return;
  const idle = dp.quiesce(); // detaches every queue at once
  s?.blk?.releaseHeld(); // what a throttle filter holds would hold the stop
  await idle;
}

/**
 * This IOThread's kernel thread id (gettid), for /proc/self/task/TID/stat
 * (its CPU time: the daemon's busy-time metric).
 *
 * @example
 * ```ts ignore
 * const tid = await iothread.call<number>("blkThreadId");
 * ```
 */
export function blkThreadId(_ctx: AioContext): number {
  return threadId();
}

/**
 * Re-reads the image size after the main thread resized the file (QMP
 * block_resize) and checks requests against the new capacity (whole
 * logical blocks of `blkSize` bytes); returns the new length in bytes.
 *
 * @example
 * ```ts ignore
 * const length = await iothread.call<number>("blkResize", { blkSize: 512 });
 * ```
 */
export function blkResize(_ctx: AioContext, args: { blkSize: number; export?: string }): number {
  const s = exports.get(exportKey(args));
  if (!s?.blk || !s.dataplane) throw new Error("virtio-blk IOThread: device not configured");
  const length = s.blk.refreshLength();
  s.dataplane.setCapacity(Math.floor(length / args.blkSize) * (args.blkSize / 512));
  return length;
}

/**
 * Drains the BlockBackend (bdrv_drained_begin/end around waiting for in-flight requests).
 *
 * @example
 * ```ts ignore
 * await iothread.call("blkDrain");
 * ```
 */
export async function blkDrain(_ctx: AioContext, args?: { export?: string }): Promise<void> {
  const blk = exports.get(exportKey(args))?.blk;
  if (blk) await blk.drain();
}

/**
 * Stops every queue, drops guest memory and closes the image.
 *
 * @example
 * ```ts ignore
 * await iothread.call("blkClose");
 * ```
 */
export async function blkClose(_ctx: AioContext, args?: { export?: string }): Promise<void> {
  const s = exports.get(exportKey(args));
  if (s === undefined) return;
  if (s.dataplane) {
    await s.dataplane.close();
    s.dataplane = null;
  }
  s.memory?.close();
  s.memory = null;
  if (s.blk) {
    const b = s.blk;
    s.blk = null;
    await b.close();
  }
  exports.delete(exportKey(args));
}
