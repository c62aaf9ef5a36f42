/**
 * The multi-export daemon (qemu-storage-daemon's model): named block nodes,
 * named IOThreads, vhost-user-blk exports, QMP monitors, all driven by one
 * main-thread AioContext. The command line (daemon_args.ts) and QMP
 * (qmp_commands.ts) call the same operations.
 *
 * Exports given no `iothread=` run in one shared IOThread the daemon starts
 * when the first such export appears (QEMU runs them in its main loop; the
 * dataplane always runs in an IOThread).
 *
 * @module
 */

import { AioContext } from "../../aio/mod.ts";
import { resizeRbdImage } from "../../block/mod.ts";
import { BlockGraph } from "./blockdev.ts";
import { type BlockExportSpec, VhostUserBlkExport } from "./block_export.ts";
import { IOThreadObject } from "./iothread_object.ts";
import type { ObjectSpec } from "./object_spec.ts";
import { ThrottleGroupObject } from "./throttle_group_object.ts";
import { DaemonError, type OptionObject } from "./qapi_input.ts";
// QMP, the metrics endpoint and the NBD server and exports are imported
// when first used: the host's short options need none of them, and every
// module loaded stays resident in the main isolate.
import type { QmpServer } from "./qmp_server.ts";
import type { MetricsServer } from "./metrics.ts";
import type { NbdBlockExport, NbdExportSpec } from "../nbd/nbd_block_export.ts";
import type { NbdServer, NbdServerSpec } from "../nbd/nbd_server.ts";

/** The id of the IOThread that exports without `iothread=` share. */
export const MAIN_LOOP_IOTHREAD = "#main-loop";

/** A `--chardev socket,...` as given. */
export interface ChardevSpec {
  id: string;
  path: string;
  /** `wait=on` (QEMU's default for a server): start-up waits for a client. */
  wait: boolean;
}

/**
 * A running daemon. Create it, apply options, then wait for `quitRequested`
 * or a signal and `stop()` it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { StorageDaemon } from "./storage_daemon.ts";
 * const dir = Deno.makeTempDirSync();
 * const d = new StorageDaemon();
 * d.blockdevAdd({ driver: "null-co", "node-name": "n0", size: 1048576 }, false);
 * await d.exportAdd({ id: "e0", nodeName: "n0", addr: { type: "unix", path: `${dir}/e0.sock` },
 *   writable: false, writethrough: false, numQueues: 1, logicalBlockSize: 512 });
 * assert.equal(d.exports.size, 1);
 * await d.stop();
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export class StorageDaemon {
  readonly ctx = new AioContext();
  readonly graph = new BlockGraph();
  readonly iothreads = new Map<string, IOThreadObject>();
  /** `--object throttle-group` objects by id. */
  readonly throttleGroups = new Map<string, ThrottleGroupObject>();
  readonly exports = new Map<string, VhostUserBlkExport>();
  /** `--export type=nbd` exports (ids shared with {@link exports}). */
  readonly nbdExports = new Map<string, NbdBlockExport>();
  /** `--nbd-server` / `nbd-server-start`. */
  nbdServer: NbdServer | null = null;
  readonly chardevs = new Map<string, ChardevSpec>();
  readonly monitors: QmpServer[] = [];
  readonly log: (line: string) => void;
  /**
   * Exports started from now on keep a latency histogram per queue (set
   * before the first export when `--metrics` is on the command line).
   */
  latencyHistogram = false;
  metrics: MetricsServer | null = null;
  readonly #quit = Promise.withResolvers<void>();
  readonly #failed = Promise.withResolvers<Error>();
  readonly #loop: Promise<void>;
  #running = true;
  #stopped: Promise<void> | null = null;
  #mainLoopThread: Promise<IOThreadObject> | null = null;
  #mainLoopObject: IOThreadObject | null = null;

  constructor(log: (line: string) => void = () => {}) {
    this.log = log;
    this.graph.throttleGroups = (id) => this.throttleGroups.get(id);
    this.#loop = (async () => {
      while (this.#running) await this.ctx.pollAsync();
    })();
  }

  /** Resolves when a monitor client sent `quit`. */
  get quitRequested(): Promise<void> {
    return this.#quit.promise;
  }

  /** Resolves with the first IOThread failure (its event loop died: a bug). */
  get failed(): Promise<Error> {
    return this.#failed.promise;
  }

  /** QMP `quit`. */
  requestQuit(): void {
    this.#quit.resolve();
  }

  /** `--blockdev` / `blockdev-add`. */
  blockdevAdd(obj: OptionObject, keyval: boolean): void {
    this.graph.add(obj, keyval);
  }

  /** `blockdev-del`. */
  blockdevDel(nodeName: string): void {
    this.graph.delete(nodeName);
  }

  /** `--object iothread|throttle-group` / `object-add`. */
  async objectAdd(spec: ObjectSpec): Promise<void> {
    if (
      this.iothreads.has(spec.id) || this.throttleGroups.has(spec.id) ||
      spec.id === MAIN_LOOP_IOTHREAD
    ) {
      throw new DaemonError(
        `attempt to add duplicate property '${spec.id}' to object (type 'container')`,
      );
    }
    if (spec.qomType === "throttle-group") {
      this.throttleGroups.set(spec.id, new ThrottleGroupObject(spec));
      return;
    }
    const obj = await IOThreadObject.start(spec);
    this.#watch(obj);
    this.iothreads.set(spec.id, obj);
  }

  #watch(obj: IOThreadObject): void {
    obj.thread.failed.then((e) => this.#failed.resolve(e));
  }

  /** `object-del`: only an IOThread no export runs in. */
  async objectDel(id: string): Promise<void> {
    const group = this.throttleGroups.get(id);
    if (group !== undefined) {
      if (group.users.size > 0) {
        throw new DaemonError(`object '${id}' is in use, can not be deleted`);
      }
      this.throttleGroups.delete(id);
      group.close();
      return;
    }
    const obj = this.iothreads.get(id);
    if (obj === undefined) throw new DaemonError(`object '${id}' not found`);
    if (obj.users.size > 0) {
      throw new DaemonError(`object '${id}' is in use by export ${[...obj.users].join(", ")}`);
    }
    this.iothreads.delete(id);
    await obj.stop();
  }

  /** `--export` / `block-export-add`. */
  async exportAdd(spec: BlockExportSpec): Promise<void> {
    if (this.exports.has(spec.id) || this.nbdExports.has(spec.id)) {
      throw new DaemonError(`Block export id '${spec.id}' is already in use`);
    }
    const node = this.graph.get(spec.nodeName);
    const key = `export:${spec.id}`;
    if (node.users.size > 0) {
      throw new DaemonError(`Node '${spec.nodeName}' is already in use`);
    }
    const named = spec.iothreads ?? (spec.iothread === undefined ? [] : [spec.iothread]);
    const iothreads: IOThreadObject[] = [];
    for (const id of named) {
      const t = this.iothreads.get(id);
      if (t === undefined) throw new DaemonError(`iothread "${id}" not found`);
      iothreads.push(t);
    }
    if (iothreads.length === 0) iothreads.push(await this.#mainLoopIOThread());
    node.users.add(key); // reserved while the export starts
    try {
      const exp = await VhostUserBlkExport.start(
        spec,
        this.graph.blockOptions(spec.nodeName),
        iothreads,
        this.ctx,
        this.log,
        this.latencyHistogram,
      );
      this.exports.set(spec.id, exp);
      this.log(
        `export ${spec.id}: node ${spec.nodeName} (${exp.image.length} bytes${
          exp.image.readOnly ? ", read-only" : ""
        }) on ${spec.addr.type === "unix" ? spec.addr.path : `fd ${spec.addr.fd}`}, ` +
          `${spec.numQueues} queue(s) in IOThread ${iothreads.map((t) => t.spec.id).join(", ")}`,
      );
    } catch (e) {
      node.users.delete(key);
      throw e;
    }
  }

  /** `--nbd-server` / `nbd-server-start`. */
  async nbdServerStart(spec: NbdServerSpec): Promise<void> {
    const { NbdServer } = await import("../nbd/nbd_server.ts");
    if (this.nbdServer !== null) throw new DaemonError("NBD server already running");
    try {
      this.nbdServer = NbdServer.listen(spec, this.ctx, this.log);
    } catch (e) {
      throw new DaemonError(`Failed to start the NBD server: ${(e as Error).message}`);
    }
    const a = spec.addr;
    this.log(
      `NBD server on ${
        a.type === "unix"
          ? a.path
          : a.type === "inet"
          ? `${a.host}:${this.nbdServer.port}`
          : `fd ${a.fd}`
      }`,
    );
  }

  /** `nbd-server-stop`: stops listening and removes every NBD export (as QEMU). */
  async nbdServerStop(): Promise<void> {
    const server = this.nbdServer;
    if (server === null) throw new DaemonError("NBD server not running");
    this.nbdServer = null;
    server.close();
    for (const id of [...this.nbdExports.keys()]) await this.exportDel(id, true);
  }

  /** `--export type=nbd` / `block-export-add` with type nbd. */
  async nbdExportAdd(spec: NbdExportSpec): Promise<void> {
    if (this.exports.has(spec.id) || this.nbdExports.has(spec.id)) {
      throw new DaemonError(`Block export id '${spec.id}' is already in use`);
    }
    // Checked in qemu-storage-daemon's order, so the first error is the same.
    const node = this.graph.get(spec.nodeName);
    const named = spec.iothread === undefined ? undefined : this.iothreads.get(spec.iothread);
    if (spec.iothread !== undefined && named === undefined) {
      throw new DaemonError(`iothread "${spec.iothread}" not found`);
    }
    const server = this.nbdServer;
    if (server === null) throw new DaemonError("NBD server not running");
    if (server.exports.has(spec.name)) {
      throw new DaemonError(`NBD server already has export named '${spec.name}'`);
    }
    const block = this.graph.blockOptions(spec.nodeName);
    if (spec.writable && block.readOnly) {
      throw new DaemonError("Cannot export read-only node as writable");
    }
    const key = `export:${spec.id}`;
    // Each export opens the node for itself: one user at a time (qsd shares it).
    if (node.users.size > 0) throw new DaemonError(`Node '${spec.nodeName}' is already in use`);
    const iothread = named ?? await this.#mainLoopIOThread();
    node.users.add(key);
    try {
      const { NbdBlockExport } = await import("../nbd/nbd_block_export.ts");
      const exp = await NbdBlockExport.start(
        spec,
        block,
        iothread,
        server,
        this.ctx,
        this.log,
      );
      this.nbdExports.set(spec.id, exp);
      this.log(
        `export ${spec.id}: node ${spec.nodeName} (${exp.image.length} bytes${
          exp.image.readOnly ? ", read-only" : ""
        }) as NBD export '${spec.name}' in IOThread ${iothread.spec.id}`,
      );
    } catch (e) {
      node.users.delete(key);
      throw e;
    }
  }

  #mainLoopIOThread(): Promise<IOThreadObject> {
    this.#mainLoopThread ??= IOThreadObject.start({
      id: MAIN_LOOP_IOTHREAD,
      pollMaxNs: 32768,
      aioMaxBatch: 4,
    }).then((t) => {
      this.#watch(t);
      this.#mainLoopObject = t;
      return t;
    });
    return this.#mainLoopThread;
  }

  /**
   * `block-export-del`: disconnects the front-end, stops and closes the
   * export, then sends BLOCK_EXPORT_DELETED. `mode=safe` (the default)
   * refuses while a front-end is connected, as QEMU's.
   */
  async exportDel(id: string, force: boolean): Promise<void> {
    const nbd = this.nbdExports.get(id);
    if (nbd !== undefined) {
      if (!force && nbd.clients > 0) throw new DaemonError(`export '${id}' still in use`);
      this.nbdExports.delete(id);
      await nbd.stop();
      this.graph.nodes.get(nbd.spec.nodeName)?.users.delete(`export:${id}`);
      this.log(`export ${id}: deleted`);
      for (const m of this.monitors) m.event("BLOCK_EXPORT_DELETED", { id });
      return;
    }
    const exp = this.exports.get(id);
    if (exp === undefined) throw new DaemonError(`Export '${id}' is not found`);
    if (!force && exp.server.connection !== null) {
      throw new DaemonError(`export '${id}' still in use`);
    }
    this.exports.delete(id);
    await exp.stop();
    this.graph.nodes.get(exp.spec.nodeName)?.users.delete(`export:${id}`);
    this.log(`export ${id}: deleted`);
    for (const m of this.monitors) m.event("BLOCK_EXPORT_DELETED", { id });
  }

  /**
   * QMP `block_resize`: truncates the file behind a file node (or a raw
   * node without an offset/size window over one; an rbd image: rbd_resize)
   * to `size` bytes and tells every export on it. Null and qcow2 nodes refuse, as qemu-storage-daemon 7.2.
   */
  async blockResize(nodeName: string, size: number): Promise<void> {
    const node = this.graph.nodes.get(nodeName);
    if (node === undefined || node.implicit) {
      throw new DaemonError(`Cannot find device='' nor node-name='${nodeName}'`);
    }
    const s = node.spec;
    if (s.driver === "raw" && (s.offset !== undefined || s.size !== undefined)) {
      throw new DaemonError("Cannot resize fixed-size raw disks");
    }
    const file = s.driver === "raw" ? this.graph.get(s.file!).spec : s;
    if (file.driver !== "file" && file.driver !== "rbd") {
      throw new DaemonError("Image format driver does not support resize");
    }
    if (s.readOnly || file.readOnly) throw new DaemonError("Node is read-only");
    if (file.driver === "rbd") {
      if (file.snapshot !== undefined) throw new DaemonError("Node is read-only");
      // rbd_resize through a connection of its own (QEMU's qemu_rbd_co_truncate).
      const where = { pool: file.pool!, image: file.image!, namespace: file.namespace };
      try {
        await resizeRbdImage({ ...where, conf: file.conf, user: file.user }, size);
      } catch (e) {
        throw new DaemonError(`Failed to resize rbd image: ${(e as Error).message}`);
      }
    } else {
      try {
        Deno.truncateSync(file.filename!, size);
      } catch (e) {
        throw new DaemonError(`Failed to resize ${file.filename}: ${(e as Error).message}`);
      }
    }
    // Every export whose node is the file node or over it.
    for (const exp of this.exports.values()) {
      if (this.graph.chain(exp.spec.nodeName).includes(file.nodeName)) {
        const length = await exp.resize();
        this.log(`export ${exp.spec.id}: resized to ${length} bytes`);
      }
    }
    for (const exp of this.nbdExports.values()) {
      if (this.graph.chain(exp.spec.nodeName).includes(file.nodeName)) {
        const length = await exp.resize();
        this.log(`export ${exp.spec.id}: resized to ${length} bytes`);
      }
    }
  }

  /** Every running IOThread, the shared one of exports without `iothread=` included. */
  allIOThreads(): IOThreadObject[] {
    return [...this.iothreads.values(), ...(this.#mainLoopObject ? [this.#mainLoopObject] : [])];
  }

  /** `--metrics ADDR:PORT`: the Prometheus endpoint. */
  async metricsAdd(hostname: string, port: number): Promise<void> {
    if (this.metrics !== null) throw new DaemonError("--metrics given twice");
    const { MetricsServer } = await import("./metrics.ts");
    if (this.metrics !== null) throw new DaemonError("--metrics given twice");
    try {
      this.metrics = await MetricsServer.start(this, hostname, port);
    } catch (e) {
      throw new DaemonError(
        `metrics: cannot listen on ${hostname}:${port}: ${(e as Error).message}`,
      );
    }
    this.log(`metrics on http://${hostname}:${this.metrics.port}/metrics`);
  }

  /** `--chardev socket,...` */
  chardevAdd(spec: ChardevSpec): void {
    if (this.chardevs.has(spec.id)) {
      throw new DaemonError(`attempt to add duplicate property '${spec.id}' to object`);
    }
    this.chardevs.set(spec.id, spec);
  }

  /** `--monitor chardev=...`: a QMP monitor on that chardev's socket. */
  async monitorAdd(chardev: string, pretty: boolean): Promise<void> {
    const c = this.chardevs.get(chardev);
    if (c === undefined) throw new DaemonError(`chardev "${chardev}" not found`);
    if (this.monitors.some((m) => m.path === c.path)) {
      throw new DaemonError(`Device '${chardev}' is in use`);
    }
    const [{ QmpServer }, { QmpCommands }] = await Promise.all([
      import("./qmp_server.ts"),
      import("./qmp_commands.ts"),
    ]);
    let server: QmpServer;
    try {
      server = QmpServer.listen(c.path, this.ctx, new QmpCommands(this), {
        pretty,
        log: this.log,
      });
    } catch (e) {
      throw new DaemonError(`Failed to bind socket to ${c.path}: ${(e as Error).message}`);
    }
    this.monitors.push(server);
    this.log(`QMP monitor on ${c.path}`);
    if (c.wait) {
      this.log(`waiting for a connection on ${c.path}`);
      await server.connected;
    }
  }

  /**
   * The object at a QOM path (`/objects/<id>`, or a bare id as QEMU's
   * partial paths), for qom-set / qom-get: the throttle groups.
   */
  qomObject(path: string): ThrottleGroupObject {
    const id = path.startsWith("/objects/") ? path.slice("/objects/".length) : path;
    const g = this.throttleGroups.get(id);
    if (g === undefined) throw new DaemonError(`Device '${path}' not found`, "DeviceNotFound");
    return g;
  }

  /** Stops every export, monitor and IOThread. Idempotent. */
  stop(): Promise<void> {
    this.#stopped ??= (async () => {
      for (const m of this.monitors) m.close();
      await this.metrics?.close();
      for (const [id, exp] of [...this.exports]) {
        this.exports.delete(id);
        await exp.stop();
      }
      this.nbdServer?.close();
      for (const [id, exp] of [...this.nbdExports]) {
        this.nbdExports.delete(id);
        await exp.stop();
      }
      const threads = [...this.iothreads.values()];
      this.iothreads.clear();
      if (this.#mainLoopThread) threads.push(await this.#mainLoopThread);
      for (const t of threads) await t.stop();
      // After the IOThreads: no throttle filter uses a group's memory any more.
      for (const g of this.throttleGroups.values()) g.close();
      this.throttleGroups.clear();
      this.#running = false;
      this.ctx.close(); // as the host: the loop's pending wait returns
      await this.#loop;
    })();
    return this.#stopped;
  }
}
