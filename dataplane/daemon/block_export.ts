/**
 * `--export type=vhost-user-blk,...` / QMP `block-export-add`: one
 * vhost-user-blk export (QEMU's block/export/vhost-user-blk-server.c). Each
 * export has its own socket, its own front-end, its own device and its own
 * BlockBackend and dataplane in its IOThread; several exports may share an
 * IOThread. A broken ring or a front-end that goes away ends only that
 * export's session.
 *
 * @module
 */

import { type AioContext, EventNotifier } from "../../aio/mod.ts";
import type { BlockOptions } from "../../block/mod.ts";
import { VhostUserHandler, VhostUserServer } from "../../vhost_user/mod.ts";
import { DEFAULT_MAX_QUEUE_SIZE, type VirtioBlkOptions } from "../../virtio/mod.ts";
import type { BlkImageInfo, BlkThreadStats } from "../blk_iothread.ts";
import { deviceModel } from "../device_model.ts";
import { VhostUserBlkDevice } from "../vhost_user_blk_device.ts";
import { ExportThread, type IOThreadObject } from "./iothread_object.ts";
import { DaemonError, type OptionObject, QapiInput } from "./qapi_input.ts";

/** Where an export listens (QEMU's SocketAddress, the kinds we serve). */
export type ExportAddr = { type: "unix"; path: string } | { type: "fd"; fd: number };

/** An `--export` as given. */
export interface BlockExportSpec {
  id: string;
  nodeName: string;
  addr: ExportAddr;
  /** Default false, as qemu-storage-daemon. */
  writable: boolean;
  /** The guest sees a write-through cache (flush after every write). */
  writethrough: boolean;
  numQueues: number;
  logicalBlockSize: number;
  iothread?: string;
  /**
   * The host's short options only (never parsed from `--export`): these and
   * the fields below are what the short command line sets that
   * qemu-storage-daemon's export does not take (dataplane/host_export.ts).
   * `iothreads`: queue i runs in `iothreads[i mod n]` (QEMU's newer
   * `iothread-vq-mapping` idea, round-robin); replaces `iothread`.
   */
  iothreads?: string[];
  /** GET_ID's answer (default qemu-storage-daemon's "vhost_user_blk"). */
  serial?: string;
  /** Largest virtqueue a front-end may set up (default 1024). */
  maxQueueSize?: number;
  /** Mode of the socket file (default 0600). */
  socketMode?: number;
  /** What the export's log lines start with (default `export ID: `). */
  logPrefix?: string;
  /** Tests only: see DataPlaneOptions.holdCompletions / breakRingEvery. */
  testHoldCompletions?: { every: number; ms: number };
  testBreakRing?: number;
}

/**
 * Parses an `--export` / `block-export-add` object.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseExport } from "./block_export.ts";
 * import { parseKeyval } from "./keyval.ts";
 * const e = parseExport(parseKeyval(
 *   "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/e0.sock,writable=on",
 * ), true);
 * assert.deepEqual(e.addr, { type: "unix", path: "/tmp/e0.sock" });
 * assert.equal(e.writable, true);
 * assert.equal(e.numQueues, 1);
 * ```
 */
export function parseExport(obj: OptionObject, keyval: boolean): BlockExportSpec {
  const input = new QapiInput(obj, keyval);
  input.enum("type", ["vhost-user-blk"] as const, true);
  const id = input.str("id", true);
  const nodeName = input.str("node-name", true);
  const a = input.object("addr");
  if (a === undefined) throw new DaemonError("Parameter 'addr' is missing");
  const kind = a.enum("type", ["unix", "fd"] as const, true);
  let addr: ExportAddr;
  if (kind === "unix") {
    addr = { type: "unix", path: a.str("path", true) };
    a.bool("abstract");
    a.bool("tight");
  } else {
    const str = a.str("str", true);
    if (!/^\d+$/.test(str)) throw new DaemonError(`Unable to parse FD number ${str}`);
    addr = { type: "fd", fd: Number(str) };
  }
  a.end();
  const writable = input.bool("writable") ?? false;
  const writethrough = input.bool("writethrough") ?? false;
  const numQueues = input.int("num-queues") ?? 1;
  if (numQueues < 1) throw new DaemonError("num-queues must be greater than 0");
  if (numQueues > 64) throw new DaemonError("num-queues must be at most 64");
  const lbs = input.size("logical-block-size") ?? 512;
  if ((lbs & (lbs - 1)) !== 0) {
    throw new DaemonError(
      `Property ${id}.logical-block-size doesn't take value '${lbs}', it's not a power of 2`,
    );
  }
  if (lbs < 512 || lbs > 4096) {
    throw new DaemonError(
      `Property ${id}.logical-block-size doesn't take value '${lbs}' (minimum: 512, maximum: 4096)`,
    );
  }
  const iothread = input.str("iothread");
  input.bool("fixed-iothread"); // an export never moves between IOThreads here
  input.end();
  const spec: BlockExportSpec = {
    id,
    nodeName,
    addr,
    writable,
    writethrough,
    numQueues,
    logicalBlockSize: lbs,
  };
  if (iothread !== undefined) spec.iothread = iothread;
  return spec;
}

/** GET_ID's answer, as qemu-storage-daemon's vhost-user-blk export. */
const SERIAL = "vhost_user_blk";

/** Request and byte totals over some queue counters. */
interface Totals {
  requests: number;
  errors: number;
  readBytes: number;
  writtenBytes: number;
}

/**
 * Request, IOERR and byte totals over every queue of `threads` (the
 * host's stop report and a connection's summary line).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { queueTotals } from "./block_export.ts";
 * assert.deepEqual(queueTotals([]), { requests: 0, errors: 0, readBytes: 0, writtenBytes: 0 });
 * ```
 */
export function queueTotals(threads: BlkThreadStats[]): Totals {
  const t = { requests: 0, errors: 0, readBytes: 0, writtenBytes: 0 };
  for (const th of threads) {
    for (const q of th.queues) {
      t.requests += q.requests;
      t.errors += q.errors;
      t.readBytes += q.readBytes;
      t.writtenBytes += q.writtenBytes;
    }
  }
  return t;
}

function mib(bytes: number): string {
  return (bytes / 2 ** 20).toFixed(1);
}

/**
 * A running vhost-user-blk export.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { IOThreadObject } from "./iothread_object.ts";
 * import { VhostUserBlkExport } from "./block_export.ts";
 * const dir = Deno.makeTempDirSync();
 * const ctx = new AioContext();
 * const io = await IOThreadObject.start({ id: "io0", pollMaxNs: 0, aioMaxBatch: 4 });
 * const exp = await VhostUserBlkExport.start(
 *   { id: "e0", nodeName: "n0", addr: { type: "unix", path: `${dir}/e0.sock` }, writable: true,
 *     writethrough: false, numQueues: 1, logicalBlockSize: 512 },
 *   { driver: "null-co", size: 1 << 20 }, io, ctx);
 * assert.equal(exp.device.capacity, 2048);
 * await exp.stop();
 * await io.stop();
 * ctx.close();
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export class VhostUserBlkExport {
  readonly spec: BlockExportSpec;
  readonly device: VirtioBlkOptions;
  readonly image: BlkImageInfo;
  readonly server: VhostUserServer;
  /** The IOThread of queue 0. */
  readonly iothread: IOThreadObject;
  /** Every IOThread the queues are spread over (queue i in `iothreads[i mod n]`). */
  readonly iothreads: IOThreadObject[];
  readonly #threads: ExportThread[];
  readonly #device: VhostUserBlkDevice;
  /** The ring state over the device (vhost_user/'s handler). */
  readonly #backend: VhostUserHandler;
  readonly #ringBroken: EventNotifier;
  readonly #ctx: AioContext;
  /** Log lines of this export, with its prefix. */
  readonly #log: (line: string) => void;
  #connections = 0;
  /** Totals at the previous disconnect: each summary line says what one connection did. */
  #reported: Totals = { requests: 0, errors: 0, readBytes: 0, writtenBytes: 0 };
  #stopped: Promise<BlkThreadStats[]> | null = null;

  private constructor(
    spec: BlockExportSpec,
    device: VirtioBlkOptions,
    image: BlkImageInfo,
    iothreads: IOThreadObject[],
    threads: ExportThread[],
    ringBroken: EventNotifier,
    ctx: AioContext,
    log: (line: string) => void,
  ) {
    this.spec = spec;
    this.device = device;
    this.image = image;
    this.iothread = iothreads[0];
    this.iothreads = iothreads;
    this.#threads = threads;
    this.#ringBroken = ringBroken;
    this.#ctx = ctx;
    const prefix = spec.logPrefix ?? `export ${spec.id}: `;
    const exportLog = (l: string) => log(prefix + l);
    this.#log = exportLog;
    this.#device = new VhostUserBlkDevice({
      device,
      iothreads: threads,
      maxQueueSize: spec.maxQueueSize ?? DEFAULT_MAX_QUEUE_SIZE,
      log: exportLog,
    });
    this.#backend = new VhostUserHandler(this.#device, { log: exportLog });
    const opts = {
      mode: spec.socketMode,
      onError: (e: Error) => exportLog(`error: ${e.message}`),
      onConnect: () => {
        this.#connections++;
        exportLog(`front-end #${this.#connections} connected`);
      },
      onDisconnect: () => void this.#logDisconnect(),
    };
    this.server = spec.addr.type === "unix"
      ? VhostUserServer.listen(spec.addr.path, this.#backend, ctx, opts)
      : VhostUserServer.adopt(spec.addr.fd, this.#backend, ctx, opts);
    ctx.setEventNotifier(ringBroken, () => void this.#onRingBroken());
  }

  /**
   * Opens the node in each of the export's IOThreads (one for a
   * qemu-storage-daemon export; the host's short options may spread the
   * queues over several), builds the device and listens. Throws (after
   * undoing what it did) on a bad image or a socket in use.
   */
  static async start(
    spec: BlockExportSpec,
    block: BlockOptions,
    iothreads: IOThreadObject | IOThreadObject[],
    ctx: AioContext,
    log: (line: string) => void = () => {},
    latencyHistogram = false,
  ): Promise<VhostUserBlkExport> {
    const objects = Array.isArray(iothreads) ? iothreads : [iothreads];
    if (objects.length === 0) throw new DaemonError("an export needs an IOThread");
    const threads = objects.map((o) => new ExportThread(o.thread, spec.id));
    const ringBroken = new EventNotifier();
    const opened: ExportThread[] = [];
    try {
      const readOnly = (block.readOnly ?? false) || !spec.writable;
      if (spec.writable && block.readOnly) {
        throw new DaemonError(
          `Node '${spec.nodeName}' is read-only: the export cannot be writable`,
        );
      }
      let image: BlkImageInfo | undefined;
      for (const t of threads) {
        opened.push(t);
        const info = await t.call<BlkImageInfo>("blkOpen", { ...block, readOnly });
        image ??= info;
      }
      if (image!.length < spec.logicalBlockSize) {
        throw new DaemonError(
          `image is ${image!.length} bytes: smaller than one ${spec.logicalBlockSize}-byte block`,
        );
      }
      const device = deviceModel({
        logicalBlockSize: spec.logicalBlockSize,
        queueSize: spec.maxQueueSize ?? DEFAULT_MAX_QUEUE_SIZE,
        queues: spec.numQueues,
        block: { discard: block.discard },
      }, image!);
      for (const t of threads) {
        await t.call("blkConfigure", {
          device,
          serial: spec.serial ?? SERIAL,
          writeback: !spec.writethrough,
          brokenNotifyFd: ringBroken.fd,
          latencyHistogram,
          holdCompletions: spec.testHoldCompletions ?? null,
          breakRingEvery: spec.testBreakRing ?? null,
        });
      }
      const exp = new VhostUserBlkExport(
        spec,
        device,
        image!,
        objects,
        threads,
        ringBroken,
        ctx,
        log,
      );
      for (const o of objects) o.users.add(spec.id);
      return exp;
    } catch (e) {
      for (const t of opened) await t.call("blkClose").catch(() => {});
      ringBroken.close();
      if (e instanceof DaemonError) throw e;
      throw new DaemonError((e as Error).message);
    }
  }

  /**
   * The image behind the export changed size (the daemon truncated its
   * file): the IOThreads re-read it and check requests against the new
   * capacity, and GET_CONFIG reports it. Returns the new length in bytes.
   * A connected front-end that set up the back-end request channel is sent
   * VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (QEMU then re-reads the config and
   * raises a config interrupt: the guest sees the new size); another one
   * learns it when it next reads the config.
   */
  async resize(): Promise<number> {
    const lbs = this.spec.logicalBlockSize;
    let length = 0;
    for (const t of this.#threads) length = await t.call<number>("blkResize", { blkSize: lbs });
    this.#device.setCapacity(Math.floor(length / lbs) * (lbs / 512));
    const sent = await this.#device.notifyConfigChange();
    this.#log(`config change to the front-end: ${sent}`);
    return length;
  }

  /** Front-ends that connected since the export started. */
  get connections(): number {
    return this.#connections;
  }

  /**
   * Each IOThread's counters of this export's queues, in `iothreads` order
   * (broken-ring reports since the previous call).
   */
  async threadStats(): Promise<BlkThreadStats[]> {
    const out: BlkThreadStats[] = [];
    for (const t of this.#threads) out.push(await t.call<BlkThreadStats>("blkStats"));
    return out;
  }

  /** This export's queue counters (over its IOThreads; the first one's loop counters). */
  async stats(): Promise<BlkThreadStats> {
    const all = await this.threadStats();
    if (all.length === 1) return all[0];
    return {
      queues: all.flatMap((s) => s.queues).sort((a, b) => a.index - b.index),
      inFlight: all.reduce((n, s) => n + s.inFlight, 0),
      aio: all[0].aio,
      broken: all.flatMap((s) => s.broken),
      heap: all[0].heap,
    };
  }

  /**
   * A ring of this export broke (virtio_error in its IOThread; the err
   * eventfd was written): close the connection that runs it, so the VMM
   * resets and reconnects rather than waiting forever on a ring nobody
   * serves; other exports are not involved. Only rings still running count:
   * a ring of a connection that already left was stopped by its reset.
   */
  async #onRingBroken(): Promise<void> {
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
    this.#log(`ring broken (${broken.join("; ")}): closing the connection (device needs reset)`);
    await conn.close();
  }

  /** The one-line summary of a connection: what it did since the previous one left. */
  async #logDisconnect(): Promise<void> {
    const n = this.#connections;
    let s: BlkThreadStats[];
    try {
      s = await this.threadStats();
    } catch {
      this.#log(`front-end #${n} disconnected`);
      return; // stopping
    }
    const now = queueTotals(s);
    const was = this.#reported;
    this.#reported = now;
    this.#log(
      `front-end #${n} disconnected: ${now.requests - was.requests} requests, ` +
        `${mib(now.readBytes - was.readBytes)} MiB read, ` +
        `${mib(now.writtenBytes - was.writtenBytes)} MiB written, ${now.errors - was.errors} IOERR`,
    );
    for (const t of s) for (const b of t.broken) this.#log(`ring broken: ${b}`);
  }

  /**
   * Stops taking requests and waits for those in flight (their completions
   * reach the front-end while it still listens: one that sees the
   * disconnect stops its rings at the used idx and drops later
   * notifications, as QEMU), stops listening, disconnects the front-end,
   * drains and closes the image in every IOThread. Resolves with the final
   * counters (taken before the close). Idempotent.
   */
  stop(): Promise<BlkThreadStats[]> {
    this.#stopped ??= (async () => {
      for (const t of this.#threads) await t.call("blkQuiesce").catch(() => {});
      await this.server.close();
      await this.#backend.reset();
      const stats = await this.threadStats().catch(() => []);
      for (const t of this.#threads) {
        await t.call("blkDrain").catch(() => {});
        await t.call("blkClose").catch(() => {});
      }
      this.#ctx.setEventNotifier(this.#ringBroken, null);
      this.#ringBroken.close();
      for (const o of this.iothreads) o.users.delete(this.spec.id);
      return stats;
    })();
    return this.#stopped;
  }
}
