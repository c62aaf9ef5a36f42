/**
 * The vhost-user-blk host as a library: IOThreads that each open the image
 * and run a virtio-blk dataplane, a main-thread AioContext that runs the
 * vhost-user server, and a clean stop (drain, stats). `deno task host`
 * (dataplane/main.ts) and `deno task demo` are thin wrappers around it.
 *
 * @module
 */

import { AioContext, EventNotifier, IOThread } from "../aio/mod.ts";
import {
  type BlockOptions,
  Qcow2SharedState,
  RangeLockTable,
  THROTTLE_GROUP_BYTES,
  ThrottleGroup,
} from "../block/mod.ts";
import { segMaxForQueueSize, type VirtioBlkOptions } from "../virtio/mod.ts";
import type { BlkImageInfo, BlkThreadData, BlkThreadStats } from "./blk_iothread.ts";
import type { HostOptions } from "./host_options.ts";
import {
  clockNs,
  type IsolateHeap,
  isolateHeap,
  type ResidentMemory,
  residentMemory,
} from "../sys/mod.ts";
import { VhostUserBlkDevice } from "./vhost_user_blk_device.ts";
import { VhostUserHandler, VhostUserServer } from "../vhost_user/mod.ts";

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
 * Derives the virtio-blk device model from the host options and the image
 * (as QEMU's vhost-user-blk export fills struct virtio_blk_config).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { deviceModel } from "./host.ts";
 * import { parseHostArgs } from "./host_options.ts";
 * const o = parseHostArgs(["--image", "null-co:1M", "--socket", "/tmp/s"]);
 * const d = deviceModel(o, { length: 1 << 20, requestAlignment: 1, memAlignment: 1, readOnly: false });
 * assert.equal(d.capacity, 2048);
 * assert.equal(d.numQueues, 1);
 * ```
 */
export function deviceModel(
  opts: Pick<HostOptions, "logicalBlockSize" | "queueSize" | "queues"> & {
    block: { discard?: "unmap" | "ignore" };
  },
  image: BlkImageInfo,
): VirtioBlkOptions {
  const lbs = opts.logicalBlockSize;
  const sectorsPerBlock = lbs / 512;
  const capacity = Math.floor(image.length / lbs) * sectorsPerBlock;
  const readOnly = image.readOnly;
  const align = Math.max(lbs, image.requestAlignment);
  const maxSectors = 0x3fffff & ~(sectorsPerBlock - 1); // 2 GiB - 512 B, block-aligned
  return {
    capacity,
    readOnly,
    blkSize: lbs,
    // QEMU's queue_size - 2, bounded by IOV_MAX (what one preadv/io_submit takes).
    segMax: segMaxForQueueSize(opts.queueSize),
    topology: {
      physicalBlockExp: Math.log2(align / lbs),
      alignmentOffset: 0,
      minIoSize: 1,
      optIoSize: 0,
    },
    writeback: true,
    flush: true,
    numQueues: opts.queues,
    // Offered on read-only exports too (as qemu-storage-daemon): the requests get IOERR.
    discard: { maxSectors, maxSeg: 32, sectorAlignment: sectorsPerBlock },
    writeZeroes: { maxSectors, maxSeg: 32, mayUnmap: opts.block.discard === "unmap" },
  };
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
 * A running vhost-user-blk host.
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
  /** The device model served. */
  readonly device: VirtioBlkOptions;
  /** What the image looks like (from the first IOThread). */
  readonly image: BlkImageInfo;
  readonly server: VhostUserServer;
  readonly #threads: IOThread[];
  readonly #ctx: AioContext;
  readonly #loop: Promise<void>;
  /** The ring state (vhost-user layer) over the device. */
  readonly #backend: VhostUserHandler;
  /** Written by an IOThread when one of its running rings breaks. */
  readonly #ringBroken: EventNotifier;
  #running = true;
  #connections = 0;
  #reported = { requests: 0, errors: 0, readBytes: 0, writtenBytes: 0 };
  #stopped: Promise<HostStats> | null = null;

  private constructor(
    options: HostOptions,
    device: VirtioBlkOptions,
    image: BlkImageInfo,
    threads: IOThread[],
    ctx: AioContext,
    ringBroken: EventNotifier,
    log: (line: string) => void,
  ) {
    this.options = options;
    this.#ringBroken = ringBroken;
    this.device = device;
    this.image = image;
    this.#threads = threads;
    this.#ctx = ctx;
    this.#backend = new VhostUserHandler(
      new VhostUserBlkDevice({ device, iothreads: threads, maxQueueSize: options.queueSize, log }),
      { log },
    );
    this.server = VhostUserServer.listen(options.socket, this.#backend, ctx, {
      mode: options.socketMode,
      onError: (e) => log(`error: ${e.message}`),
      onConnect: () => {
        this.#connections++;
        log(`front-end #${this.#connections} connected`);
      },
      onDisconnect: () => void this.#logDisconnect(log),
    });
    ctx.setEventNotifier(ringBroken, () => void this.#onRingBroken(log));
    this.#loop = (async () => {
      while (this.#running) await ctx.pollAsync();
    })();
  }

  /**
   * Starts the IOThreads, opens the image in each, and listens on the socket.
   * Throws (after cleaning up) on a bad image, a socket in use, etc.
   */
  static async start(
    options: HostOptions,
    log: (line: string) => void = () => {},
  ): Promise<VhostUserBlkHost> {
    const ctx = new AioContext();
    const ringBroken = new EventNotifier();
    try {
      const { threads, device, image } = await startBlkIOThreads(options, ringBroken.fd);
      return new VhostUserBlkHost(options, device, image, threads, ctx, ringBroken, log);
    } catch (e) {
      ringBroken.close();
      ctx.close();
      throw e;
    }
  }

  /**
   * Resolves with the first IOThread failure (its event loop died: a bug);
   * the device can no longer serve those queues, so the CLI logs it and exits.
   */
  get failed(): Promise<Error> {
    return Promise.race(this.#threads.map((t) => t.failed));
  }

  /** Counters of every IOThread (queues, AioContext, broken rings). */
  async stats(): Promise<HostStats> {
    const threads: BlkThreadStats[] = [];
    for (const t of this.#threads) threads.push(await t.call<BlkThreadStats>("blkStats"));
    return {
      connections: this.#connections,
      threads,
      memory: { resident: residentMemory(), mainHeap: isolateHeap() },
    };
  }

  /**
   * A ring broke (virtio_error in its IOThread; the err eventfd was written):
   * close the connection that runs it, so the VMM resets and reconnects
   * rather than waiting forever on a ring nobody serves. Only rings still
   * running count: a ring of a connection that already left was stopped by
   * its reset, and the next front-end must not pay for it.
   */
  async #onRingBroken(log: (line: string) => void): Promise<void> {
    this.#ringBroken.testAndClear();
    // The connection whose rings are asked about: another may be accepted
    // while the IOThreads answer, and it must not be closed for this one.
    const conn = this.server.connection;
    if (conn === null) return;
    const broken: string[] = [];
    try {
      for (const t of this.#threads) {
        for (const b of await t.call<{ index: number; reason: string }[]>("blkBrokenQueues")) {
          broken.push(`queue ${b.index}: ${b.reason}`);
        }
      }
    } catch {
      return; // stopping
    }
    if (broken.length === 0 || conn.closed || this.server.connection !== conn) return;
    log(`ring broken (${broken.join("; ")}): closing the connection (device needs reset)`);
    await conn.close();
  }

  /** The one-line summary of a connection: what it did since the previous one left. */
  async #logDisconnect(log: (line: string) => void): Promise<void> {
    const n = this.#connections;
    let s: HostStats;
    try {
      s = await this.stats();
    } catch {
      log(`front-end #${n} disconnected`);
      return; // stopping
    }
    const now = totals(s);
    const d = {
      requests: now.requests - this.#reported.requests,
      errors: now.errors - this.#reported.errors,
      readBytes: now.readBytes - this.#reported.readBytes,
      writtenBytes: now.writtenBytes - this.#reported.writtenBytes,
    };
    this.#reported = now;
    log(
      `front-end #${n} disconnected: ${d.requests} requests, ${mib(d.readBytes)} MiB read, ` +
        `${mib(d.writtenBytes)} MiB written, ${d.errors} IOERR`,
    );
    for (const t of s.threads) for (const b of t.broken) log(`ring broken: ${b}`);
  }

  /**
   * Stops taking requests and waits for those in flight (their completions
   * reach the front-end while it is still connected), stops accepting,
   * disconnects the front-end, drains and closes the image in every
   * IOThread, and returns the final counters. Idempotent.
   */
  stop(): Promise<HostStats> {
    this.#stopped ??= (async () => {
      // Requests in flight complete while the front-end still listens: one
      // that sees the disconnect stops its rings at the used idx and drops
      // later notifications (QEMU), so completing them after the close would
      // hide them from a driver that waits for them.
      for (const t of this.#threads) await t.call("blkQuiesce").catch(() => {});
      await this.server.close();
      await this.#backend.reset();
      const stats = await this.stats();
      for (const t of this.#threads) {
        await t.call("blkDrain");
        await t.call("blkClose");
        await t.stop();
      }
      // After the IOThreads stopped: none of them writes it any more.
      this.#ctx.setEventNotifier(this.#ringBroken, null);
      this.#ringBroken.close();
      this.#running = false;
      this.#ctx.close();
      await this.#loop;
      return stats;
    })();
    return this.#stopped;
  }
}

function mib(bytes: number): string {
  return (bytes / 2 ** 20).toFixed(1);
}

function totals(s: HostStats) {
  const t = { requests: 0, errors: 0, readBytes: 0, writtenBytes: 0 };
  for (const th of s.threads) {
    for (const q of th.queues) {
      t.requests += q.requests;
      t.errors += q.errors;
      t.readBytes += q.readBytes;
      t.writtenBytes += q.writtenBytes;
    }
  }
  return t;
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
  const t = totals(s);
  lines.push(
    `  total: ${s.connections} connection(s), ${t.requests} requests, ${t.errors} IOERR, ` +
      `${mib(t.readBytes)} MiB read, ${mib(t.writtenBytes)} MiB written`,
  );
  return lines.join("\n");
}
