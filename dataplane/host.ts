/**
 * The vhost-user-blk host as a library: the short options' one export, run
 * by the daemon's code (dataplane/host_export.ts turns the options into
 * daemon specs), with the host's API (device, image, stats, a clean stop
 * that returns the final counters). Also the transport-independent half
 * vm/ drives ({@link startBlkIOThreads}) and the exit report
 * ({@link formatStats}). `deno task host` (dataplane/main.ts) and `deno
 * task demo` are thin wrappers around it.
 *
 * @module
 */

import { IOThread } from "../aio/mod.ts";
import {
  type BlockOptions,
  Qcow2SharedState,
  RangeLockTable,
  THROTTLE_GROUP_BYTES,
  ThrottleGroup,
} from "../block/mod.ts";
import type { VirtioBlkOptions } from "../virtio/mod.ts";
import type { VhostUserServer } from "../vhost_user/mod.ts";
import type { BlkImageInfo, BlkThreadData, BlkThreadStats } from "./blk_iothread.ts";
import type { HostOptions } from "./host_options.ts";
import {
  clockNs,
  type IsolateHeap,
  isolateHeap,
  type ResidentMemory,
  residentMemory,
} from "../sys/mod.ts";
import { deviceModel } from "./device_model.ts";
import { hostDaemonSpecs } from "./host_export.ts";
import { queueTotals, type VhostUserBlkExport } from "./daemon/block_export.ts";
import { StorageDaemon } from "./daemon/storage_daemon.ts";

export { deviceModel };

// A string literal in `new URL(...)` so the bundler (tools/build.ts) finds the module.
const BLK_IOTHREAD_MODULE = new URL("./blk_iothread.ts", import.meta.url).href;

/**
 * Totals over every queue, as printed when the host stops.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { HostStats } from "./host.ts";
 * const s: HostStats = { connections: 0, threads: [] };
 * assert.equal(s.connections, 0);
 * ```
 */
export interface HostStats {
  /** Front-ends that connected since start. */
  connections: number;
  /** Per IOThread: its queues' counters and its AioContext's. */
  threads: BlkThreadStats[];
  /** The process's resident memory and the main isolate's V8 heap. */
  memory?: { resident: ResidentMemory; mainHeap: IsolateHeap };
}

/**
 * What {@link startBlkIOThreads} returns: the IOThreads, each with the image
 * open and its dataplane configured, the device model and the image.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { BlkIOThreads } from "./host.ts";
 * const t: BlkIOThreads = {
 *   threads: [], device: { capacity: 8 },
 *   image: { length: 4096, requestAlignment: 1, memAlignment: 1, readOnly: false },
 * };
 * assert.equal(t.device.capacity, 8);
 * ```
 */
export interface BlkIOThreads {
  threads: IOThread[];
  device: VirtioBlkOptions;
  image: BlkImageInfo;
}

/**
 * The transport-independent half of a virtio-blk host: starts
 * `options.iothreads` IOThreads with dataplane/blk_iothread.ts loaded, opens
 * the image in each (`blkOpen`, one range-lock table shared by all), derives
 * the device model ({@link deviceModel}) and configures each thread's
 * dataplane (`blkConfigure`). The transport (the vhost-user device here, the
 * virtio-mmio device of vm/) then drives the threads with blkSetMemory,
 * blkStartQueue, blkStopQueue... `extra` is merged into every thread's data
 * (vm/ passes the interrupt status word). On failure every thread started is
 * closed and stopped before the error is thrown.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { startBlkIOThreads } from "./host.ts";
 * import { parseHostArgs } from "./host_options.ts";
 * const o = parseHostArgs(["--image", "null-co:1M", "--socket", "/unused"]);
 * const { threads, device } = await startBlkIOThreads(o);
 * assert.equal(device.capacity, 2048);
 * for (const t of threads) {
 *   await t.call("blkClose");
 *   await t.stop();
 * }
 * ```
 */
export async function startBlkIOThreads(
  options: HostOptions,
  brokenNotifyFd?: number,
  extra: BlkThreadData = {},
): Promise<BlkIOThreads> {
  const threads: IOThread[] = [];
  // One range-lock table for the image, shared by every IOThread's driver:
  // read-modify-write cycles are serialised across all of them.
  const data: BlkThreadData = { ...extra, rangeLocks: RangeLockTable.create().shared };
  // A writable qcow2 on several IOThreads: every thread's driver attaches;
  // the first owns the metadata. (Alone, a driver keeps writeback metadata.)
  if (options.block.format === "qcow2" && !options.block.readOnly && options.iothreads > 1) {
    data.qcow2 = Qcow2SharedState.create().shared;
  }
  if (options.throttle !== undefined) {
    // --throttle: one group every IOThread's driver joins (freed with the threads).
    data.throttle = new SharedArrayBuffer(THROTTLE_GROUP_BYTES);
    new ThrottleGroup(data.throttle).init(options.throttle, clockNs());
  }
  try {
    for (let i = 0; i < options.iothreads; i++) {
      threads.push(
        await IOThread.start({
          name: `iothread${i}`,
          modules: [BLK_IOTHREAD_MODULE],
          pollMaxNs: options.pollMaxNs,
          aioMaxBatch: options.aioMaxBatch,
          data,
        }),
      );
    }
    const block: BlockOptions = { ...options.block };
    const infos: BlkImageInfo[] = [];
    for (const t of threads) infos.push(await t.call<BlkImageInfo>("blkOpen", block));
    const image = infos[0];
    if (image.length < options.logicalBlockSize) {
      throw new Error(
        `image is ${image.length} bytes: smaller than one ${options.logicalBlockSize}-byte block`,
      );
    }
    const device = deviceModel(options, image);
    for (const t of threads) {
      await t.call("blkConfigure", {
        device,
        serial: options.serial,
        writeback: true,
        brokenNotifyFd,
        holdCompletions: options.testHoldCompletions ?? null,
        breakRingEvery: options.testBreakRing ?? null,
      });
    }
    return { threads, device, image };
  } catch (e) {
    for (const t of threads) {
      await t.call("blkClose").catch(() => {});
      await t.stop();
    }
    throw e;
  }
}

/**
 * A running vhost-user-blk host: the short options run by the daemon's
 * code. {@link hostDaemonSpecs} turns them into one blockdev chain,
 * `--iothreads` IOThread objects and one vhost-user-blk export, which a
 * {@link StorageDaemon} of their own then runs (the same export as
 * `--export type=vhost-user-blk`: session, ring-broken handling, clean
 * stop). This class keeps the host's API over it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { VhostUserBlkHost } from "./host.ts";
 * import { parseHostArgs } from "./host_options.ts";
 * const dir = Deno.makeTempDirSync();
 * const host = await VhostUserBlkHost.start(
 *   parseHostArgs(["--image", "null-co:1M", "--socket", `${dir}/blk.sock`]),
 * );
 * assert.equal(host.device.capacity, 2048);
 * await host.stop();
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export class VhostUserBlkHost {
  readonly options: HostOptions;
  /** The daemon running the export. */
  readonly daemon: StorageDaemon;
  /** The one export. */
  readonly export: VhostUserBlkExport;
  #stopped: Promise<HostStats> | null = null;

  private constructor(options: HostOptions, daemon: StorageDaemon, exp: VhostUserBlkExport) {
    this.options = options;
    this.daemon = daemon;
    this.export = exp;
  }

  /**
   * Starts the IOThreads, opens the image in each, builds the device and
   * listens on `options.socket`. Throws (after undoing what it did) on a
   * bad image or a socket in use.
   */
  static async start(
    options: HostOptions,
    log: (line: string) => void = () => {},
  ): Promise<VhostUserBlkHost> {
    const b = options.block;
    if (b.driver === "file" && b.aio === "native" && b.cache !== "none") {
      // BlockBackend's words (the blockdev's are qemu-storage-daemon's).
      throw new Error("aio=native requires cache=none (O_DIRECT), as in QEMU");
    }
    const specs = hostDaemonSpecs(options);
    const daemon = new StorageDaemon(log);
    try {
      for (const g of specs.throttleGroups) await daemon.objectAdd(g);
      for (const node of specs.blockdevs) daemon.blockdevAdd(node, false);
      for (const t of specs.iothreads) await daemon.objectAdd(t);
      await daemon.exportAdd(specs.export);
    } catch (e) {
      await daemon.stop();
      throw e;
    }
    return new VhostUserBlkHost(options, daemon, daemon.exports.get(specs.export.id)!);
  }

  /** The device model served. */
  get device(): VirtioBlkOptions {
    return this.export.device;
  }

  /** What the image looks like (from the first IOThread). */
  get image(): BlkImageInfo {
    return this.export.image;
  }

  /** The vhost-user server on the socket. */
  get server(): VhostUserServer {
    return this.export.server;
  }

  /**
   * Resolves with the first IOThread failure (its event loop died: a bug);
   * the device can no longer serve those queues, so the CLI logs it and exits.
   */
  get failed(): Promise<Error> {
    return this.daemon.failed;
  }

  /** Counters of every IOThread (queues, AioContext, broken rings). */
  async stats(): Promise<HostStats> {
    return this.#hostStats(await this.export.threadStats());
  }

  #hostStats(threads: BlkThreadStats[]): HostStats {
    return {
      connections: this.export.connections,
      threads,
      memory: { resident: residentMemory(), mainHeap: isolateHeap() },
    };
  }

  /**
   * Stops taking requests and waits for those in flight (their completions
   * reach the front-end while it is still connected), stops accepting,
   * disconnects the front-end, drains and closes the image in every
   * IOThread, stops them, and returns the final counters. Idempotent.
   */
  stop(): Promise<HostStats> {
    this.#stopped ??= (async () => {
      const stats = this.#hostStats(await this.export.stop());
      await this.daemon.stop();
      return stats;
    })();
    return this.#stopped;
  }
}

function mib(bytes: number): string {
  return (bytes / 2 ** 20).toFixed(1);
}

/**
 * One line per queue plus a total, for the host's exit report.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatStats } from "./host.ts";
 * assert(formatStats({ connections: 1, threads: [] }).includes("total"));
 * ```
 */
export function formatStats(s: HostStats): string {
  const lines: string[] = [];
  for (const [i, t] of s.threads.entries()) {
    // EINTR here means a signal or io_uring task work reached the IOThread.
    lines.push(
      `  iothread ${i}: ${t.aio.interruptedWaits ?? 0} interrupted waits, ` +
        `${t.aio.strayWaitErrors ?? 0} stray wait errors`,
    );
    for (const q of t.queues) {
      lines.push(
        `  queue ${q.index}: ${q.requests} requests (${q.reads} reads, ${q.writes} writes, ` +
          `${q.flushes} flushes, ${q.discards} discards, ${q.writeZeroes} write-zeroes, ` +
          `${q.getIds} get-id), ${q.errors} IOERR, ${q.unsupported} UNSUPP, ` +
          `${q.kicks} kicks, ${q.polls} poll hits, ${q.notifies} notifies` +
          (q.broken ? `, BROKEN: ${q.broken}` : "") +
          (q.ring ? `\n    ring: ${q.ring}` : ""),
      );
    }
  }
  if (s.memory) {
    const r = s.memory.resident,
      heap = (h?: IsolateHeap) =>
        h ? `${mib(h.used)}/${mib(h.total)} MiB (external ${mib(h.external)})` : "?";
    lines.push(
      `  memory: rss ${mib(r.rssKiB * 1024)} MiB (anon ${mib(r.anonKiB * 1024)}, file ` +
        `${mib(r.fileKiB * 1024)}, shmem ${mib(r.shmemKiB * 1024)}), V8 heap used/total: main ` +
        `${heap(s.memory.mainHeap)}` +
        s.threads.map((t, i) => `, iothread ${i} ${heap(t.heap)}`).join(""),
    );
  }
  const t = queueTotals(s.threads);
  lines.push(
    `  total: ${s.connections} connection(s), ${t.requests} requests, ${t.errors} IOERR, ` +
      `${mib(t.readBytes)} MiB read, ${mib(t.writtenBytes)} MiB written`,
  );
  return lines.join("\n");
}
