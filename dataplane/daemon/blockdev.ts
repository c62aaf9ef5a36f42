/**
 * `--blockdev` / QMP `blockdev-add`: the block nodes the daemon knows, by
 * node-name (QEMU's named block nodes), and how a node and the nodes under it
 * become the {@link BlockOptions} an export opens in its IOThread. Nodes are
 * opened by the export that uses them (each IOThread opens its own driver
 * stack); adding a node checks what can be checked on the main thread (the
 * file exists and opens, the raw window fits).
 *
 * Supported drivers: `file` (filename, cache.direct, cache.no-flush, aio,
 * discard, read-only), `null-co` / `null-aio` (size, read-zeroes), `raw`
 * (file, offset, size) and `qcow2` (file, l2-cache-size) over a file node, given by
 * node-name or as a nested object; `nbd` (server.type=inet with
 * server.host/server.port, or server.type=unix with server.path; export;
 * reconnect-delay), opened by each export in its IOThread (nothing is
 * checked on the main thread: the server may come later); `rbd` (pool,
 * image, namespace, conf, user, snapshot: QEMU's blockdev-add rbd keys;
 * servers and secrets are not supported), also opened by the export.
 *
 * @module
 */

import type { BlockOptions, NbdServerAddress } from "../../block/mod.ts";
import { DaemonError, type OptionObject, QapiInput } from "./qapi_input.ts";

/** The drivers `--blockdev driver=` accepts. */
export const BLOCKDEV_DRIVERS = [
  "file",
  "null-co",
  "null-aio",
  "raw",
  "qcow2",
  "throttle",
  "nbd",
  "rbd",
] as const;

/** What the graph needs of a throttle group (the daemon's ThrottleGroupObject). */
export interface ThrottleGroupRef {
  /** Address of the group's shared state. */
  readonly addr: number;
  /** Nodes naming the group. */
  readonly users: Set<string>;
}

/** One block node as given. */
export interface BlockdevSpec {
  nodeName: string;
  driver: typeof BLOCKDEV_DRIVERS[number];
  readOnly: boolean;
  /** cache.direct / cache.no-flush; undefined: inherited (format nodes) or off. */
  cacheDirect?: boolean;
  cacheNoFlush?: boolean;
  discard?: "unmap" | "ignore";
  detectZeroes?: "off" | "on" | "unmap";
  /** file */
  filename?: string;
  aio?: "threads" | "native" | "io_uring";
  /** null-co / null-aio: the size; raw: the window size. */
  size?: number;
  readZeroes?: boolean;
  /** raw: window start. */
  offset?: number;
  /** qcow2: bytes of L2 tables cached (QEMU's l2-cache-size). */
  l2CacheSize?: number;
  /** raw / qcow2 / throttle: the child's node-name. */
  file?: string;
  /** throttle: the group's id. */
  throttleGroup?: string;
  /** nbd: the server, export name and reconnect-delay (seconds). */
  server?: NbdServerAddress;
  exportName?: string;
  reconnectDelay?: number;
  /** rbd: where the image is and how to reach the cluster. */
  pool?: string;
  image?: string;
  namespace?: string;
  conf?: string;
  user?: string;
  snapshot?: string;
  /**
   * rbd: more librados options, from QEMU's internal `=keyvalue-pairs` (a
   * JSON array of alternating keys and values: the legacy `rbd:` filename's
   * other `key=value` pairs; the host's `--image rbd:...` passes them).
   */
  rbdConf?: Record<string, string>;
}

/** A node in the graph and who uses it. */
export interface BlockNode {
  spec: BlockdevSpec;
  /** Parents (node-names) and exports (`export:<id>`) holding this node. */
  users: Set<string>;
  /** Created implicitly as a nested `file` object (removed with its parent). */
  implicit: boolean;
}

let implicitCounter = 0;

/**
 * The registry of named block nodes.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { BlockGraph } from "./blockdev.ts";
 * const g = new BlockGraph();
 * g.add({ driver: "null-co", "node-name": "n0", size: 1048576 }, false);
 * assert.deepEqual(g.blockOptions("n0"), {
 *   driver: "null-co", size: 1048576, readOnly: false, readZeroes: false,
 * });
 * assert.throws(() => g.add({ driver: "null-co", "node-name": "n0" }, false), /Duplicate nodes/);
 * ```
 */
export class BlockGraph {
  readonly nodes = new Map<string, BlockNode>();
  /** Finds a throttle group by id (the daemon sets it to its objects). */
  throttleGroups: (id: string) => ThrottleGroupRef | undefined = () => undefined;

  /**
   * Parses and adds a node (and nested children). `keyval`: the object came
   * from a keyval string. Throws {@link DaemonError} in QEMU's wording.
   */
  add(obj: OptionObject, keyval: boolean): BlockdevSpec {
    const added: string[] = [];
    try {
      return this.#add(new QapiInput(obj, keyval), true, added);
    } catch (e) {
      for (const n of added.reverse()) this.#forget(n);
      throw e;
    }
  }

  #add(input: QapiInput, root: boolean, added: string[]): BlockdevSpec {
    const driver = input.enum("driver", BLOCKDEV_DRIVERS, true);
    const givenName = input.str("node-name");
    const nodeName = givenName ?? `#block${++implicitCounter}`;
    const spec: BlockdevSpec = { nodeName, driver, readOnly: input.bool("read-only") ?? false };
    const cache = input.object("cache");
    if (cache) {
      spec.cacheDirect = cache.bool("direct");
      spec.cacheNoFlush = cache.bool("no-flush");
      cache.end();
    }
    spec.discard = input.enum("discard", ["unmap", "ignore"] as const);
    spec.detectZeroes = input.enum("detect-zeroes", ["off", "on", "unmap"] as const);
    let child: string | undefined;
    switch (driver) {
      case "file":
        spec.filename = input.str("filename", true);
        spec.aio = input.enum("aio", ["threads", "native", "io_uring"] as const);
        if (spec.aio === "native" && spec.cacheDirect !== true) {
          throw new DaemonError(
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
          );
        }
        break;
      case "rbd":
        spec.pool = input.str("pool", true);
        spec.image = input.str("image", true);
        spec.namespace = input.str("namespace");
        spec.conf = input.str("conf");
        spec.user = input.str("user");
        spec.snapshot = input.str("snapshot");
        spec.rbdConf = keyvaluePairs(input.str("=keyvalue-pairs"));
        break;
      case "null-co":
      case "null-aio":
        spec.size = input.int("size", 0, Number.MAX_SAFE_INTEGER) ?? 1 << 30;
        spec.readZeroes = input.bool("read-zeroes") ?? false;
        break;
      case "throttle": {
        spec.throttleGroup = input.str("throttle-group", true);
        const f = input.refOrObject("file");
        if (f === undefined) throw new DaemonError("Parameter 'file' is missing");
        child = typeof f === "string" ? f : this.#add(f, false, added).nodeName;
        spec.file = child;
        break;
      }
      case "nbd": {
        const srv = input.object("server");
        if (srv === undefined) throw new DaemonError("Parameter 'server' is missing");
        const type = srv.enum("type", ["inet", "unix"] as const, true);
        if (type === "unix") spec.server = { type, path: srv.str("path", true) };
        else {
          const host = srv.str("host", true), port = srv.str("port") ?? "10809";
          if (!/^\d{1,5}$/.test(port) || Number(port) < 1 || Number(port) > 65535) {
            throw new DaemonError(`Parameter 'server.port' expects a port number, got '${port}'`);
          }
          spec.server = { type, host, port: Number(port) };
        }
        srv.end();
        spec.exportName = input.str("export");
        spec.reconnectDelay = input.int("reconnect-delay", 0, 4294967295);
        break;
      }
      case "raw":
      case "qcow2": {
        const f = input.refOrObject("file");
        if (f === undefined) throw new DaemonError("Parameter 'file' is missing");
        child = typeof f === "string" ? f : this.#add(f, false, added).nodeName;
        if (driver === "raw") {
          spec.offset = input.int("offset", 0, Number.MAX_SAFE_INTEGER);
          spec.size = input.int("size", 0, Number.MAX_SAFE_INTEGER);
        }
        if (driver === "qcow2") spec.l2CacheSize = input.size("l2-cache-size");
        spec.file = child;
        break;
      }
    }
    input.end();
    // After the schema, as QEMU (bdrv_open checks names once the options parsed).
    if (givenName === undefined && root) {
      throw new DaemonError("'node-name' must be specified for the root node");
    }
    if (givenName !== undefined && !/^[A-Za-z][A-Za-z0-9_.-]{0,30}$/.test(givenName)) {
      throw new DaemonError(`Invalid node-name: '${givenName}'`);
    }
    if (this.nodes.has(nodeName)) {
      throw new DaemonError(`Duplicate nodes with node-name='${nodeName}'`);
    }
    if (spec.driver === "throttle" && this.throttleGroups(spec.throttleGroup!) === undefined) {
      throw new DaemonError(`Throttle group '${spec.throttleGroup}' does not exist`);
    }
    if (child !== undefined) this.#checkChild(spec, child);
    if (spec.driver === "file") checkFile(spec);
    if (spec.driver === "raw" && this.get(spec.file!).spec.driver !== "rbd") {
      this.#checkWindow(spec); // an rbd image's size is known once opened
    }
    if (
      spec.cacheDirect && spec.cacheNoFlush &&
      (spec.driver === "file" || spec.driver === "raw" || spec.driver === "qcow2")
    ) {
      throw new DaemonError("cache.direct=on together with cache.no-flush=on is not supported");
    }
    this.nodes.set(nodeName, {
      spec,
      users: new Set(),
      implicit: givenName === undefined,
    });
    added.push(nodeName);
    if (child !== undefined) this.nodes.get(child)!.users.add(nodeName);
    if (spec.throttleGroup !== undefined) {
      this.throttleGroups(spec.throttleGroup)!.users.add(nodeName);
    }
    return spec;
  }

  #checkChild(spec: BlockdevSpec, child: string): void {
    const c = this.nodes.get(child);
    if (c === undefined) {
      throw new DaemonError(`Cannot find device='' nor node-name='${child}'`);
    }
    if (c.spec.driver === "throttle") {
      throw new DaemonError(`a throttle node under driver=${spec.driver} is not supported`);
    }
    if (spec.driver === "throttle") {
      if (c.users.size > 0) throw new DaemonError(`Node '${child}' is already in use`);
      return; // a filter over any other node
    }
    if (c.spec.driver === "raw" || c.spec.driver === "qcow2") {
      throw new DaemonError(
        `driver=${spec.driver} over a ${c.spec.driver} node is not supported (only over file or null)`,
      );
    }
    if (spec.driver === "qcow2" && c.spec.driver !== "file") {
      throw new DaemonError("driver=qcow2 needs a file node under it");
    }
    if (c.users.size > 0) throw new DaemonError(`Node '${child}' is already in use`);
  }

  #checkWindow(spec: BlockdevSpec): void {
    const child = this.nodes.get(spec.file!)!.spec;
    // The size of an nbd or rbd node is known once connected.
    if (child.driver === "nbd" || child.driver === "rbd") return;
    const total = protocolSize(child);
    const offset = spec.offset ?? 0;
    const size = spec.size ?? total - offset;
    if (offset + size > total) {
      throw new DaemonError(
        `The sum of offset (${offset}) and size (${size}) has to be smaller or equal to the ` +
          ` actual size of the containing file (${total})`,
      );
    }
  }

  /** The node, or a DaemonError naming it. */
  get(nodeName: string): BlockNode {
    const n = this.nodes.get(nodeName);
    if (n === undefined) {
      throw new DaemonError(`Cannot find device='' nor node-name='${nodeName}'`);
    }
    return n;
  }

  /** The node and every node under it, top first. */
  chain(nodeName: string): string[] {
    const out: string[] = [];
    for (let n = this.nodes.get(nodeName); n !== undefined;) {
      out.push(n.spec.nodeName);
      n = n.spec.file === undefined ? undefined : this.nodes.get(n.spec.file);
    }
    return out;
  }

  /** Removes a node nobody uses (and its implicit children). QMP blockdev-del. */
  delete(nodeName: string): void {
    const n = this.nodes.get(nodeName);
    if (n === undefined || n.implicit) {
      throw new DaemonError(`Failed to find node with node-name='${nodeName}'`);
    }
    if (n.users.size > 0) throw new DaemonError(`Node ${nodeName} is in use`);
    this.#forget(nodeName);
  }

  #forget(nodeName: string): void {
    const n = this.nodes.get(nodeName);
    if (n === undefined) return;
    this.nodes.delete(nodeName);
    if (n.spec.throttleGroup !== undefined) {
      this.throttleGroups(n.spec.throttleGroup)?.users.delete(nodeName);
    }
    const child = n.spec.file === undefined ? undefined : this.nodes.get(n.spec.file);
    if (child) {
      child.users.delete(nodeName);
      if (child.implicit) this.#forget(n.spec.file!);
    }
  }

  /**
   * What an export opens for `nodeName`: the format node (raw, qcow2) over
   * its protocol node (file, null), flattened into one BlockOptions.
   */
  blockOptions(nodeName: string): BlockOptions {
    const node = this.get(nodeName).spec;
    if (node.driver === "throttle") {
      // The filter on top of its child's graph, a member of the group.
      const o = this.blockOptions(node.file!);
      if (node.readOnly) o.readOnly = true;
      o.throttle = { addr: this.throttleGroups(node.throttleGroup!)!.addr };
      return o;
    }
    const top = node;
    const proto = top.file === undefined ? top : this.get(top.file).spec;
    const o: BlockOptions = { driver: proto.driver as BlockOptions["driver"] };
    if (proto.driver === "file") {
      o.filename = proto.filename;
      const direct = proto.cacheDirect ?? top.cacheDirect ?? false;
      const noFlush = proto.cacheNoFlush ?? top.cacheNoFlush ?? false;
      o.cache = direct ? "none" : noFlush ? "unsafe" : "writeback";
      o.aio = proto.aio ?? "threads";
      o.discard = top.discard ?? proto.discard ?? "ignore";
    } else if (proto.driver === "rbd") {
      for (const k of ["pool", "image", "namespace", "conf", "user", "snapshot"] as const) {
        if (proto[k] !== undefined) o[k] = proto[k];
      }
      if (proto.rbdConf !== undefined) o.rbdConf = { ...proto.rbdConf };
      o.discard = top.discard ?? proto.discard ?? "ignore";
      o.cache = (proto.cacheNoFlush ?? top.cacheNoFlush) ? "unsafe" : "writeback";
    } else if (proto.driver === "nbd") {
      o.server = proto.server;
      if (proto.exportName !== undefined) o.exportName = proto.exportName;
      if (proto.reconnectDelay !== undefined) o.reconnectDelay = proto.reconnectDelay;
    } else {
      o.size = proto.size;
      o.readZeroes = proto.readZeroes;
    }
    if (proto.driver !== "file") {
      // What the BlockBackend does above any driver: pass discards on, drop flushes.
      const discard = top.discard ?? proto.discard;
      if (discard !== undefined) o.discard = discard;
      if ((top.cacheNoFlush ?? proto.cacheNoFlush) === true) o.cache = "unsafe";
    }
    o.readOnly = top.readOnly || proto.readOnly;
    const dz = top.detectZeroes ?? proto.detectZeroes;
    if (dz !== undefined && dz !== "off") o.detectZeroes = dz;
    if (top.driver === "qcow2") {
      o.format = "qcow2";
      if (top.l2CacheSize !== undefined) o.l2CacheSize = top.l2CacheSize;
    }
    if (top.driver === "raw") {
      if (top.offset !== undefined) o.offset = top.offset;
      if (top.size !== undefined) o.sizeLimit = top.size;
    }
    return o;
  }
}

/**
 * The bytes behind a protocol node (file: its size now; null: its size).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { protocolSize } from "./blockdev.ts";
 * assert.equal(protocolSize({ nodeName: "n", driver: "null-co", readOnly: false, size: 4096 }), 4096);
 * ```
 */
export function protocolSize(spec: BlockdevSpec): number {
  if (spec.driver !== "file") return spec.size ?? 0;
  try {
    return Deno.statSync(spec.filename!).size;
  } catch {
    return 0;
  }
}

/** Parses rbd's `=keyvalue-pairs` (QEMU's: a JSON array, key, value, key, value...). */
function keyvaluePairs(text: string | undefined): Record<string, string> | undefined {
  if (text === undefined) return undefined;
  let a: unknown;
  try {
    a = JSON.parse(text);
  } catch {
    a = null;
  }
  if (!Array.isArray(a) || a.length % 2 !== 0 || a.some((x) => typeof x !== "string")) {
    throw new DaemonError("Parameter '=keyvalue-pairs' expects a JSON array of key/value strings");
  }
  const out: Record<string, string> = {};
  for (let i = 0; i < a.length; i += 2) out[a[i]] = a[i + 1];
  return out;
}

function checkFile(spec: BlockdevSpec): void {
  try {
    const st = Deno.statSync(spec.filename!);
    if (st.isDirectory) throw new Error("Is a directory");
    const f = Deno.openSync(spec.filename!, { read: true, write: !spec.readOnly });
    f.close();
  } catch (e) {
    const why = e instanceof Deno.errors.NotFound
      ? "No such file or directory"
      : e instanceof Deno.errors.PermissionDenied
      ? "Permission denied"
      : (e as Error).message;
    throw new DaemonError(`Could not open '${spec.filename}': ${why}`);
  }
}
