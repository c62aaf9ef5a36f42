/**
 * `--export type=nbd,...` / QMP `block-export-add` with type nbd: a node
 * served to NBD clients through the daemon's {@link NbdServer} (QEMU's
 * nbd/server.c export, BlockExportOptionsNbd). The export's BlockBackend
 * and every client's requests live in its IOThread (nbd_iothread.ts); the
 * main thread only publishes it under its NBD name and hands clients over.
 *
 * @module
 */

import { type AioContext, EventNotifier } from "../../aio/mod.ts";
import {
  type BlockOptions,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from "../../block/mod.ts";
import { close, eventfdRead } from "../../sys/mod.ts";
import { ExportThread, type IOThreadObject } from "../daemon/iothread_object.ts";
import { DaemonError, type OptionObject, QapiInput } from "../daemon/qapi_input.ts";
import type { NbdExportInfo } from "./nbd_handshake.ts";
import type { NbdExportStats, NbdImageInfo } from "./nbd_iothread.ts";

// The export's side in its IOThread, loaded there by the first NBD export
// (IOThreadObject.load). A string literal in `new URL(...)` so the bundler
// (tools/build.ts) finds the module.
const NBD_IOTHREAD_MODULE = new URL("./nbd_iothread.ts", import.meta.url).href;
import type { NbdServedExport, NbdServer, NbdServerSpec } from "./nbd_server.ts";
import { NBD_MAX_PAYLOAD } from "./nbd_session.ts";

/**
 * An `--export type=nbd` as given.
 *
 * @example
 * ```ts
 * import type { NbdExportSpec } from "./nbd_block_export.ts";
 * const s: NbdExportSpec = { id: "e0", nodeName: "n0", name: "n0", description: "", writable: false };
 * if (s.writable) throw new Error();
 * ```
 */
export interface NbdExportSpec {
  id: string;
  nodeName: string;
  /** The NBD export name (default: the node name, as QEMU). */
  name: string;
  description: string;
  /** Default false, as qemu-storage-daemon. */
  writable: boolean;
  /** Flush every write before its reply (QEMU: the export's write cache off). */
  writethrough?: boolean;
  iothread?: string;
}

/**
 * Parses an `--export type=nbd` / `block-export-add` object (type
 * included): BlockExportOptions' common members and
 * BlockExportOptionsNbd's `name` and `description`. `bitmaps` and
 * `allocation-depth=on` are refused (not served here).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseNbdExport } from "./nbd_block_export.ts";
 * import { parseKeyval } from "../daemon/keyval.ts";
 * const e = parseNbdExport(parseKeyval("type=nbd,id=e0,node-name=n0,writable=on"), true);
 * assert.equal(e.name, "n0");
 * assert.equal(e.writable, true);
 * ```
 */
export function parseNbdExport(obj: OptionObject, keyval: boolean): NbdExportSpec {
  const input = new QapiInput(obj, keyval);
  input.enum("type", ["nbd"] as const, true);
  const id = input.str("id", true);
  const nodeName = input.str("node-name", true);
  const name = input.str("name") ?? nodeName;
  const description = input.str("description") ?? "";
  if (new TextEncoder().encode(name).byteLength > 4096) {
    throw new DaemonError("export name too long to send to clients");
  }
  if (new TextEncoder().encode(description).byteLength > 4096) {
    throw new DaemonError("description too long to send to clients");
  }
  const writable = input.bool("writable") ?? false;
  const writethrough = input.bool("writethrough") ?? false;
  input.bool("fixed-iothread"); // an export never moves between IOThreads here
  const iothread = input.str("iothread");
  const bitmaps = input.raw("bitmaps");
  if (bitmaps !== undefined && !(Array.isArray(bitmaps) && bitmaps.length === 0)) {
    throw new DaemonError("bitmaps are not supported by this daemon's NBD export");
  }
  if (input.bool("allocation-depth")) {
    throw new DaemonError("allocation-depth is not supported by this daemon's NBD export");
  }
  input.end();
  const spec: NbdExportSpec = { id, nodeName, name, description, writable };
  if (writethrough) spec.writethrough = true;
  if (iothread !== undefined) spec.iothread = iothread;
  return spec;
}

/**
 * Parses `--nbd-server` (NbdServerOptions: `addr` a flat SocketAddress) or
 * QMP `nbd-server-start` (`addr` a SocketAddressLegacy, `{type, data}`).
 * TLS is refused (not served here).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseNbdServer } from "./nbd_block_export.ts";
 * import { parseKeyval } from "../daemon/keyval.ts";
 * const s = parseNbdServer(parseKeyval("addr.type=inet,addr.host=127.0.0.1,addr.port=10809"), true);
 * assert.deepEqual(s.addr, { type: "inet", host: "127.0.0.1", port: 10809 });
 * const q = parseNbdServer({ addr: { type: "unix", data: { path: "/tmp/n.sock" } } }, false);
 * assert.deepEqual(q.addr, { type: "unix", path: "/tmp/n.sock" });
 * ```
 */
export function parseNbdServer(obj: OptionObject, keyval: boolean): NbdServerSpec {
  const input = new QapiInput(obj, keyval);
  let a = input.object("addr");
  if (a === undefined) throw new DaemonError("Parameter 'addr' is missing");
  let kind = a.enum("type", ["inet", "unix", "fd"] as const, true);
  if (!keyval && a.has("data")) {
    const d = a.object("data")!;
    a.end();
    a = d;
  }
  let addr: NbdServerSpec["addr"];
  if (kind === "inet") {
    const host = a.str("host", true);
    const portStr = a.str("port", true);
    if (!/^\d+$/.test(portStr) || Number(portStr) > 65535) {
      throw new DaemonError(`Parameter 'addr.port' expects a port number, got '${portStr}'`);
    }
    // The host's first address is bound (QEMU binds each one it resolves to).
    for (const k of ["numeric", "ipv4", "ipv6", "keep-alive"]) a.bool(k);
    if (a.int("to") !== undefined) throw new DaemonError("addr.to is not supported");
    addr = { type: "inet", host, port: Number(portStr) };
  } else if (kind === "unix") {
    addr = { type: "unix", path: a.str("path", true) };
    a.bool("abstract");
    a.bool("tight");
  } else {
    const str = a.str("str", true);
    if (!/^\d+$/.test(str)) throw new DaemonError(`Unable to parse FD number ${str}`);
    addr = { type: "fd", fd: Number(str) };
    kind = "fd";
  }
  a.end();
  const tlsCreds = input.str("tls-creds");
  if (tlsCreds !== undefined) throw new DaemonError(`No TLS credentials with id '${tlsCreds}'`);
  if (input.str("tls-authz") !== undefined) {
    throw new DaemonError("tls-authz is not supported without TLS");
  }
  const maxConnections = input.int("max-connections") ?? 0;
  if (maxConnections < 0 || maxConnections > 0xffffffff) {
    throw new DaemonError("Parameter 'max-connections' expects uint32_t");
  }
  input.end();
  return { addr, maxConnections };
}

/** Preferred block size told to clients. */
const PREFERRED_BLOCK_SIZE = 4096;

/**
 * A running NBD export.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { IOThreadObject } from "../daemon/iothread_object.ts";
 * import { NbdBlockExport } from "./nbd_block_export.ts";
 * import { NbdServer } from "./nbd_server.ts";
 * const ctx = new AioContext();
 * const server = NbdServer.listen({ addr: { type: "inet", host: "127.0.0.1", port: 0 }, maxConnections: 0 }, ctx);
 * const io = await IOThreadObject.start({ id: "io0", pollMaxNs: 0, aioMaxBatch: 4 });
 * const exp = await NbdBlockExport.start(
 *   { id: "e0", nodeName: "n0", name: "disk", description: "", writable: false },
 *   { driver: "null-co", size: 1 << 20 }, io, server, ctx);
 * assert.equal(exp.info.size, 1 << 20);
 * await exp.stop();
 * await io.stop();
 * server.close();
 * ctx.close();
 * ```
 */
export class NbdBlockExport implements NbdServedExport {
  readonly spec: NbdExportSpec;
  readonly iothread: IOThreadObject;
  readonly image: NbdImageInfo;
  #info: NbdExportInfo;
  readonly #thread: ExportThread;
  readonly #server: NbdServer;
  readonly #ctx: AioContext;
  readonly #log: (line: string) => void;
  readonly #clientGone: EventNotifier;
  #clients = 0;
  #connections = 0;
  #stopped: Promise<void> | null = null;

  private constructor(
    spec: NbdExportSpec,
    image: NbdImageInfo,
    iothread: IOThreadObject,
    thread: ExportThread,
    server: NbdServer,
    clientGone: EventNotifier,
    ctx: AioContext,
    log: (line: string) => void,
  ) {
    this.spec = spec;
    this.image = image;
    this.iothread = iothread;
    this.#thread = thread;
    this.#server = server;
    this.#clientGone = clientGone;
    this.#ctx = ctx;
    this.#log = log;
    this.#info = exportInfo(spec, image);
    ctx.setEventNotifier(clientGone, () => this.#onClientGone());
  }

  /** Opens the node in the IOThread and publishes the export on `server`. */
  static async start(
    spec: NbdExportSpec,
    block: BlockOptions,
    iothread: IOThreadObject,
    server: NbdServer,
    ctx: AioContext,
    log: (line: string) => void = () => {},
  ): Promise<NbdBlockExport> {
    if (server.exports.has(spec.name)) {
      throw new DaemonError(`NBD server already has export named '${spec.name}'`);
    }
    if (spec.writable && block.readOnly) {
      throw new DaemonError("Cannot export read-only node as writable");
    }
    const thread = new ExportThread(iothread.thread, spec.id);
    const clientGone = new EventNotifier();
    let opened = false;
    try {
      await iothread.load(NBD_IOTHREAD_MODULE);
      const readOnly = (block.readOnly ?? false) || !spec.writable;
      opened = true;
      const image = await thread.call<NbdImageInfo>("nbdOpen", {
        ...block,
        readOnly,
        clientGoneFd: clientGone.fd,
        writethrough: spec.writethrough ?? false,
      });
      const exp = new NbdBlockExport(
        spec,
        image,
        iothread,
        thread,
        server,
        clientGone,
        ctx,
        log,
      );
      server.addExport(exp);
      iothread.users.add(spec.id);
      return exp;
    } catch (e) {
      if (opened) await thread.call("nbdClose").catch(() => {});
      clientGone.close();
      if (e instanceof DaemonError) throw e;
      throw new DaemonError((e as Error).message);
    }
  }

  /** What the handshake tells clients. */
  get info(): NbdExportInfo {
    return this.#info;
  }

  /** Clients connected now. */
  get clients(): number {
    return this.#clients;
  }

  /** Clients that connected since the export started. */
  get connections(): number {
    return this.#connections;
  }

  attach(fd: number, structured: boolean, baseAllocation = false): void {
    if (this.#stopped !== null) {
      close(fd);
      return;
    }
    this.#clients++;
    this.#connections++;
    this.#log(`export ${this.spec.id}: NBD client #${this.#connections} connected`);
    this.#thread.call("nbdClientAdd", { fd, structured, baseAllocation }).catch((e: Error) => {
      this.#clients--;
      this.#log(`export ${this.spec.id}: NBD client lost: ${e.message}`);
    });
  }

  #onClientGone(): void {
    const n = eventfdRead(this.#clientGone.fd);
    this.#clients = Math.max(0, this.#clients - n);
  }

  /** Counters of this export's clients (from its IOThread). */
  async stats(): Promise<NbdExportStats> {
    const s = await this.#thread.call<NbdExportStats>("nbdStats");
    for (const l of s.log) this.#log(`export ${this.spec.id}: NBD client gone: ${l}`);
    return s;
  }

  /** The node changed size: clients connecting from now on are told the new one. */
  async resize(): Promise<number> {
    const length = await this.#thread.call<number>("nbdResize");
    this.#info = exportInfo(this.spec, { ...this.image, length });
    this.#server.exports.set(this.spec.name, this);
    return length;
  }

  /** Unpublishes, disconnects every client, closes the node. Idempotent. */
  stop(): Promise<void> {
    this.#stopped ??= (async () => {
      if (this.#server.exports.get(this.spec.name) === this) {
        this.#server.removeExport(this.spec.name);
      }
      await this.#thread.call("nbdClose").catch(() => {});
      this.#ctx.setEventNotifier(this.#clientGone, null);
      this.#clientGone.close();
      this.#clients = 0;
      this.iothread.users.delete(this.spec.id);
    })();
    return this.#stopped;
  }
}

/** Transmission flags and sizes from the node (QEMU's nbd_export_create). */
function exportInfo(spec: NbdExportSpec, image: NbdImageInfo): NbdExportInfo {
  let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
    NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN;
  if (image.readOnly) flags |= NBD_FLAG_READ_ONLY;
  else flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
  const min = Math.max(1, image.requestAlignment);
  return {
    name: spec.name,
    description: spec.description,
    size: image.length,
    flags,
    minBlockSize: min,
    preferredBlockSize: Math.max(min, PREFERRED_BLOCK_SIZE),
    maxBlockSize: NBD_MAX_PAYLOAD,
  };
}
