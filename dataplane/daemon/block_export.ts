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
import { deviceModel } from "../host.ts";
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
  readonly iothread: IOThreadObject;
  readonly #thread: ExportThread;
  readonly #device: VhostUserBlkDevice;
  /** The ring state over the device (vhost_user/'s handler). */
  readonly #backend: VhostUserHandler;
  readonly #ringBroken: EventNotifier;
  readonly #ctx: AioContext;
  readonly #log: (line: string) => void;
  #connections = 0;
  #stopped: Promise<void> | null = null;

  private constructor(
    spec: BlockExportSpec,
    device: VirtioBlkOptions,
    image: BlkImageInfo,
    iothread: IOThreadObject,
    thread: ExportThread,
    ringBroken: EventNotifier,
    ctx: AioContext,
    log: (line: string) => void,
  ) {
    this.spec = spec;
    this.device = device;
    this.image = image;
    this.iothread = iothread;
    this.#thread = thread;
    this.#ringBroken = ringBroken;
    this.#ctx = ctx;
    this.#log = log;
    const exportLog = (l: string) => log(`export ${spec.id}: ${l}`);
    this.#device = new VhostUserBlkDevice({
      device,
      iothreads: [thread],
      maxQueueSize: DEFAULT_MAX_QUEUE_SIZE,
      log: exportLog,
    });
    this.#backend = new VhostUserHandler(this.#device, { log: exportLog });
    const opts = {
      onError: (e: Error) => log(`export ${spec.id}: error: ${e.message}`),
      onConnect: () => {
        this.#connections++;
        log(`export ${spec.id}: front-end #${this.#connections} connected`);
      },
      onDisconnect: () => log(`export ${spec.id}: front-end #${this.#connections} disconnected`),
    };
    this.server = spec.addr.type === "unix"
      ? VhostUserServer.listen(spec.addr.path, this.#backend, ctx, opts)
      : VhostUserServer.adopt(spec.addr.fd, this.#backend, ctx, opts);
    ctx.setEventNotifier(ringBroken, () => void this.#onRingBroken());
  }

  /**
   * Opens the node in the export's IOThread, builds the device and listens.
   * Throws (after undoing what it did) on a bad image or a socket in use.
   */
  static async start(
    spec: BlockExportSpec,
    block: BlockOptions,
    iothread: IOThreadObject,
    ctx: AioContext,
    log: (line: string) => void = () => {},
    latencyHistogram = false,
  ): Promise<VhostUserBlkExport> {
    const thread = new ExportThread(iothread.thread, spec.id);
    const ringBroken = new EventNotifier();
    let opened = false;
    try {
      const readOnly = (block.readOnly ?? false) || !spec.writable;
      if (spec.writable && block.readOnly) {
        throw new DaemonError(
          `Node '${spec.nodeName}' is read-only: the export cannot be writable`,
        );
      }
      opened = true;
      const image = await thread.call<BlkImageInfo>("blkOpen", { ...block, readOnly });
      if (image.length < spec.logicalBlockSize) {
        throw new DaemonError(
          `image is ${image.length} bytes: smaller than one ${spec.logicalBlockSize}-byte block`,
        );
      }
      const device = deviceModel({
        logicalBlockSize: spec.logicalBlockSize,
        queueSize: DEFAULT_MAX_QUEUE_SIZE,
        queues: spec.numQueues,
        block: { discard: block.discard },
      }, image);
      await thread.call("blkConfigure", {
        device,
        serial: SERIAL,
        writeback: !spec.writethrough,
        brokenNotifyFd: ringBroken.fd,
        latencyHistogram,
      });
      const exp = new VhostUserBlkExport(
        spec,
        device,
        image,
        iothread,
        thread,
        ringBroken,
        ctx,
        log,
      );
      iothread.users.add(spec.id);
      return exp;
    } catch (e) {
      if (opened) await thread.call("blkClose").catch(() => {});
      ringBroken.close();
      if (e instanceof DaemonError) throw e;
      throw new DaemonError((e as Error).message);
    }
  }

  /**
   * The image behind the export changed size (the daemon truncated its
   * file): the IOThread re-reads it and checks requests against the new
   * capacity, and GET_CONFIG reports it. Returns the new length in bytes.
   * A connected front-end that set up the back-end request channel is sent
   * VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (QEMU then re-reads the config and
   * raises a config interrupt: the guest sees the new size); another one
   * learns it when it next reads the config.
   */
  async resize(): Promise<number> {
    const lbs = this.spec.logicalBlockSize;
    const length = await this.#thread.call<number>("blkResize", { blkSize: lbs });
    this.#device.setCapacity(Math.floor(length / lbs) * (lbs / 512));
    const sent = await this.#device.notifyConfigChange();
    this.#log(`export ${this.spec.id}: config change to the front-end: ${sent}`);
    return length;
  }

  /** Front-ends that connected since the export started. */
  get connections(): number {
    return this.#connections;
  }

  /** This export's queue counters (from its IOThread). */
  stats(): Promise<BlkThreadStats> {
    return this.#thread.call<BlkThreadStats>("blkStats");
  }

  /**
   * A ring of this export broke: close this export's connection (as the
   * host does), so its front-end resets; other exports are not involved.
   */
  async #onRingBroken(): Promise<void> {
    this.#ringBroken.testAndClear();
    const conn = this.server.connection;
    if (conn === null) return;
    let broken: { index: number; reason: string }[];
    try {
      broken = await this.#thread.call<{ index: number; reason: string }[]>("blkBrokenQueues");
    } catch {
      return; // stopping
    }
    if (broken.length === 0 || conn.closed || this.server.connection !== conn) return;
    this.#log(
      `export ${this.spec.id}: ring broken (${
        broken.map((b) => `queue ${b.index}: ${b.reason}`).join("; ")
      }): closing the connection (device needs reset)`,
    );
    await conn.close();
  }

  /**
   * Stops listening, disconnects the front-end (rings stop after their
   * in-flight requests), drains and closes the image. Idempotent.
   */
  stop(): Promise<void> {
    this.#stopped ??= (async () => {
      // Requests in flight complete while the front-end still listens (see
      // VhostUserBlkHost.stop).
      await this.#thread.call("blkQuiesce").catch(() => {});
      await this.server.close();
      await this.#backend.reset();
      await this.#thread.call("blkDrain").catch(() => {});
      await this.#thread.call("blkClose").catch(() => {});
      this.#ctx.setEventNotifier(this.#ringBroken, null);
      this.#ringBroken.close();
      this.iothread.users.delete(this.spec.id);
    })();
    return this.#stopped;
  }
}
