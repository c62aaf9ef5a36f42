/**
 * The functions the main thread runs in a virtio-blk IOThread through
 * `IOThread.call` (the module is loaded into the IOThread's Worker): open the
 * thread's own BlockBackend, install guest memory, start and stop queues,
 * forward ring fd and enable changes, report stats. Each call gets the
 * thread's AioContext first and plain JSON arguments; fds and host addresses
 * are process-wide, so they travel as numbers.
 *
 * One device per IOThread: the host's queues are spread over its IOThreads,
 * each with its own {@link VirtioBlkDataPlane}.
 *
 * @module
 */

import type { AioContext } from "../aio/mod.ts";
import { BlockBackend, type BlockOptions, RangeLockTable } from "../block/mod.ts";
import { eventfdWrite, type IsolateHeap, isolateHeap, kvmIrqLine } from "../sys/mod.ts";
import { GuestMemory, type MappedMemoryRegion, type VirtioBlkOptions } from "../virtio/mod.ts";
import {
  type DataPlaneQueueSetup,
  type DataPlaneQueueStats,
  VirtioBlkDataPlane,
} from "./virtio_blk_dataplane.ts";

let blk: BlockBackend | null = null;
let dataplane: VirtioBlkDataPlane | null = null;
let memory: GuestMemory | null = null;
let brokenLog: string[] = [];
let brokenDropped = 0;

/**
 * Broken-ring reports kept between two {@link blkStats} calls. A front-end
 * may restart a broken ring (GET_VRING_BASE, SET_VRING_KICK) and break it
 * again forever; past this many only a count is kept.
 */
const BROKEN_LOG_MAX = 64;

function logBroken(index: number, reason: string): void {
  if (brokenLog.length < BROKEN_LOG_MAX) brokenLog.push(`queue ${index}: ${reason}`);
  else brokenDropped++;
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

function need(): VirtioBlkDataPlane {
  if (dataplane === null) throw new Error("virtio-blk IOThread: device not configured");
  return dataplane;
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
  opts: BlockOptions,
  data?: BlkThreadData,
): Promise<BlkImageInfo> {
  if (blk !== null) throw new Error("virtio-blk IOThread: image already open");
  const rangeLocks = data?.rangeLocks ? new RangeLockTable(data.rangeLocks) : undefined;
  blk = await BlockBackend.open(ctx, opts, { rangeLocks });
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
  },
  data?: BlkThreadData,
): void {
  if (blk === null) throw new Error("virtio-blk IOThread: blkOpen first");
  if (dataplane !== null) throw new Error("virtio-blk IOThread: already configured");
  const { brokenNotifyFd, ...opts } = args;
  dataplane = new VirtioBlkDataPlane(ctx, blk, {
    ...opts,
    isr: data?.isr ? new Int32Array(data.isr, 0, 1) : undefined,
    raiseIrq: data?.irqLine ? irqLineEdge(data.irqLine.vmFd, data.irqLine.gsi) : undefined,
    onBroken: (index, reason) => {
      logBroken(index, reason);
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
export function blkBrokenQueues(_ctx: AioContext): { index: number; reason: string }[] {
  return dataplane?.brokenQueues ?? [];
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
  args: { regions: MappedMemoryRegion[] | null },
): Promise<void> {
  const dp = need();
  const next = args.regions === null ? null : GuestMemory.fromMapped(args.regions);
  await dp.setMemory(next);
  memory?.close();
  memory = next;
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
export function blkStartQueue(_ctx: AioContext, setup: DataPlaneQueueSetup): Promise<number> {
  return need().startQueue(setup);
}

/**
 * Stops a queue after its in-flight requests; resolves with the next avail index.
 *
 * @example
 * ```ts ignore
 * const base = await iothread.call<number>("blkStopQueue", { index: 0 });
 * ```
 */
export function blkStopQueue(_ctx: AioContext, args: { index: number }): Promise<number> {
  return need().stopQueue(args.index);
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
  args: { index: number; callFd?: number | null; errFd?: number | null; enabled?: boolean },
): void {
  const dp = need();
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
export function blkSetWriteback(_ctx: AioContext, args: { on: boolean }): void {
  need().setWriteback(args.on);
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
export function blkStats(ctx: AioContext): BlkThreadStats {
  const broken = brokenLog;
  if (brokenDropped > 0) broken.push(`and ${brokenDropped} more broken-ring reports`);
  brokenLog = [];
  brokenDropped = 0;
  return {
    queues: dataplane?.stats() ?? [],
    inFlight: dataplane?.inFlight ?? 0,
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
 * Stops taking requests from every queue for good and resolves once none is
 * in flight (the host's clean stop, before it closes the connection).
 *
 * @example
 * ```ts ignore
 * await iothread.call("blkQuiesce");
 * ```
 */
export async function blkQuiesce(_ctx: AioContext): Promise<void> {
  if (dataplane) await dataplane.quiesce();
}

/**
 * Drains the BlockBackend (bdrv_drained_begin/end around waiting for in-flight requests).
 *
 * @example
 * ```ts ignore
 * await iothread.call("blkDrain");
 * ```
 */
export async function blkDrain(_ctx: AioContext): Promise<void> {
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
export async function blkClose(_ctx: AioContext): Promise<void> {
  if (dataplane) {
    await dataplane.close();
    dataplane = null;
  }
  memory?.close();
  memory = null;
  if (blk) {
    const b = blk;
    blk = null;
    await b.close();
  }
}
