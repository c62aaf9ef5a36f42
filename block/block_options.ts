import { NBD_DEFAULT_PORT, type NbdServerAddress } from "./nbd/nbd_address.ts";
import { parseRbdFilename } from "./rbd_filename.ts";

/**
 * How to open an image, in QEMU's -blockdev/-drive vocabulary. `cache`:
 * none = O_DIRECT, writeback = page cache, unsafe = page cache and flush is a
 * no-op. `aio`: threads | native (Linux AIO) | io_uring. `discard`: unmap
 * (pass discards down) | ignore. `detectZeroes`: off | on (all-zero writes
 * become write-zeroes) | unmap (and may deallocate).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { BlockOptions } from "./block_options.ts";
 * const o: BlockOptions = { driver: "file", filename: "disk.img", cache: "none", aio: "native" };
 * assert.equal(o.cache, "none");
 * ```
 */
export interface BlockOptions {
  /** Protocol driver. */
  driver: "file" | "null-co" | "null-aio" | "nbd" | "rbd";
  /** nbd: the server (`server.type=inet,server.host=H,server.port=P` or `server.type=unix,server.path=S`). */
  server?: NbdServerAddress;
  /** nbd: the export name (`export=`; default ""). */
  exportName?: string;
  /** nbd: seconds requests wait for a lost server (`reconnect-delay=`; default 0). */
  reconnectDelay?: number;
  /** Image path (file driver). */
  filename?: string;
  /** rbd: RADOS pool. */
  pool?: string;
  /** rbd: image name. */
  image?: string;
  /** rbd: RADOS namespace. */
  namespace?: string;
  /** rbd: ceph.conf path. */
  conf?: string;
  /** rbd: client id without "client.". */
  user?: string;
  /** rbd: open this snapshot (read-only). */
  snapshot?: string;
  /** rbd: more librados options (the legacy filename's other key=value pairs). */
  rbdConf?: Record<string, string>;
  /** Size in bytes (null drivers). */
  size?: number;
  /** Format driver (default raw). qcow2 needs driver=file. */
  format?: "raw" | "qcow2";
  /** qcow2: bytes of L2 tables cached per driver instance (QEMU's l2-cache-size). */
  l2CacheSize?: number;
  /** raw: window start in bytes. */
  offset?: number;
  /** raw: window size in bytes. */
  sizeLimit?: number;
  /** Cache mode (default writeback). */
  cache?: "none" | "writeback" | "unsafe";
  /** I/O engine of the file driver (default threads). */
  aio?: "threads" | "native" | "io_uring";
  /** Refuse writes, discards and write-zeroes with -EROFS. */
  readOnly?: boolean;
  /** Discard policy (default ignore, as QEMU). */
  discard?: "unmap" | "ignore";
  /** Zero-write detection (default off). */
  detectZeroes?: "off" | "on" | "unmap";
  /** null-*: reads fill the buffer with zeroes. */
  readZeroes?: boolean;
  /**
   * The throttle filter on top (QEMU's driver=throttle): `addr` is the host
   * address of the group's shared state (THROTTLE_GROUP_BYTES, initialised
   * and mapped by its creator for as long as any member may use it).
   */
  throttle?: { addr: number };
}

const ENUMS: Record<string, readonly string[]> = {
  driver: ["file", "null-co", "null-aio", "nbd", "rbd"],
  format: ["raw", "qcow2"],
  cache: ["none", "writeback", "unsafe"],
  aio: ["threads", "native", "io_uring"],
  discard: ["unmap", "ignore"],
  detectZeroes: ["off", "on", "unmap"],
};

const ALIASES: Record<string, string> = {
  "read-only": "readOnly",
  readonly: "readOnly",
  "detect-zeroes": "detectZeroes",
  "read-zeroes": "readZeroes",
  "size-limit": "sizeLimit",
  "l2-cache-size": "l2CacheSize",
  file: "filename",
  "file.filename": "filename",
  "file.driver": "driver",
  path: "filename",
  export: "exportName",
  "reconnect-delay": "reconnectDelay",
};

/**
 * Parses a QEMU-style option string (`driver=file,filename=disk.img,
 * cache=none,aio=io_uring,read-only=on,discard=unmap,detect-zeroes=on`) and
 * validates it. Throws TypeError naming the bad key. A format driver may be
 * named as in -blockdev (`driver=qcow2,file.driver=file,file.filename=x`) or
 * as in -drive (`format=qcow2,file=x`); the protocol defaults to file.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseBlockOptions } from "./block_options.ts";
 * const o = parseBlockOptions("driver=file,filename=/tmp/x.img,cache=none,aio=native,read-only=on");
 * assert.equal(o.aio, "native");
 * assert.equal(o.readOnly, true);
 * ```
 */
export function parseBlockOptions(spec: string): BlockOptions {
  const out: Record<string, string | number | boolean | NbdServerAddress> = {};
  const server: Record<string, string> = {};
  for (const part of spec.split(",")) {
    if (!part) continue;
    const eq = part.indexOf("=");
    if (eq < 0) throw new TypeError(`block option without value: ${part}`);
    const rawKey = part.slice(0, eq), value = part.slice(eq + 1);
    const key = ALIASES[rawKey] ?? rawKey;
    if (rawKey.startsWith("server.")) {
      server[rawKey.slice(7)] = value;
      continue;
    }
    if (rawKey === "driver" && (value === "raw" || value === "qcow2")) {
      out.format = value;
      continue;
    }
    if (key === "readOnly" || key === "readZeroes") {
      if (!["on", "off", "true", "false"].includes(value)) {
        throw new TypeError(`block option ${rawKey}: expected on|off, got ${value}`);
      }
      out[key] = value === "on" || value === "true";
    } else if (
      key === "size" || key === "offset" || key === "sizeLimit" || key === "l2CacheSize"
    ) {
      out[key] = parseSize(rawKey, value);
    } else if (key === "reconnectDelay") {
      out[key] = parseSize(rawKey, value);
    } else out[key] = value;
  }
  if (Object.keys(server).length > 0) out.server = nbdServerFromKeys(server);
  if (typeof out.filename === "string" && out.filename.startsWith("rbd:")) {
    if (out.driver !== undefined && out.driver !== "rbd") {
      throw new TypeError(`an rbd: filename needs driver=rbd, not ${out.driver}`);
    }
    const rbd = parseRbdFilename(out.filename);
    delete out.filename;
    const { confOptions, ...rest } = rbd;
    Object.assign(out, { driver: "rbd", ...rest }, confOptions ? { rbdConf: confOptions } : {});
  }
  if (out.driver === undefined) out.driver = "file";
  return validateBlockOptions(out);
}

/**
 * Checks a BlockOptions object (from JSON or code): known keys, enum values,
 * a filename for the file driver, non-negative integer sizes.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { validateBlockOptions } from "./block_options.ts";
 * assert.throws(() => validateBlockOptions({ driver: "file" }), /filename is required/);
 * ```
 */
export function validateBlockOptions(o: Record<string, unknown>): BlockOptions {
  const known = new Set([
    "driver",
    "filename",
    "size",
    "format",
    "offset",
    "sizeLimit",
    "cache",
    "aio",
    "readOnly",
    "discard",
    "detectZeroes",
    "readZeroes",
    "l2CacheSize",
    "throttle",
    "server",
    "exportName",
    "reconnectDelay",
    "pool",
    "image",
    "namespace",
    "conf",
    "user",
    "snapshot",
    "rbdConf",
  ]);
  for (const [k, v] of Object.entries(o)) {
    if (!known.has(k)) throw new TypeError(`unknown block option ${k}`);
    if (v === undefined) continue;
    const allowed = ENUMS[k];
    if (allowed && !allowed.includes(String(v))) {
      throw new TypeError(`block option ${k}: ${v} is not one of ${allowed.join("|")}`);
    }
    if (
      (k === "size" || k === "offset" || k === "sizeLimit" || k === "l2CacheSize") &&
      !(Number.isSafeInteger(v) && (v as number) >= 0)
    ) {
      throw new TypeError(`block option ${k}: bad size ${v}`);
    }
  }
  if (o.throttle !== undefined) {
    const t = o.throttle as { addr?: unknown } | null;
    if (
      typeof t !== "object" || t === null || !(Number.isSafeInteger(t.addr) && t.addr as number > 0)
    ) {
      throw new TypeError("block option throttle: expected { addr } (the group's state address)");
    }
  }
  if (o.driver === "nbd") checkNbdOptions(o);
  else if (o.server !== undefined || o.exportName !== undefined || o.reconnectDelay !== undefined) {
    throw new TypeError("server, export and reconnect-delay are nbd options");
  }
  if (o.driver === "file" && typeof o.filename !== "string") {
    throw new TypeError("block option filename is required for driver=file");
  }
  if (o.driver === "rbd") {
    for (const k of ["pool", "image"]) {
      if (typeof o[k] !== "string" || o[k] === "") {
        throw new TypeError(`block option ${k} is required for driver=rbd`);
      }
    }
    const kv = o.rbdConf;
    if (
      kv !== undefined &&
      (typeof kv !== "object" || kv === null ||
        !Object.values(kv).every((v) => typeof v === "string"))
    ) {
      throw new TypeError("block option rbdConf: expected string values");
    }
  }
  if (o.format === "qcow2") {
    if (o.driver !== "file") throw new TypeError("format qcow2 needs driver=file");
    if (o.offset !== undefined || o.sizeLimit !== undefined) {
      throw new TypeError("offset and size-limit are raw format options, not qcow2");
    }
  } else if (o.l2CacheSize !== undefined) {
    throw new TypeError("l2-cache-size is a qcow2 option");
  }
  return o as unknown as BlockOptions;
}

function parseSize(key: string, v: string): number {
  const m = /^(\d+)([kKmMgGtT]?)$/.exec(v);
  if (!m) throw new TypeError(`block option ${key}: bad size ${v}`);
  const mul: Record<string, number> = { "": 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };
  return Number(m[1]) * mul[m[2].toLowerCase()];
}

/** `server.type=inet,server.host=H,server.port=P` / `server.type=unix,server.path=S` keys. */
function nbdServerFromKeys(k: Record<string, string>): NbdServerAddress {
  const known = k.type === "unix" ? ["type", "path"] : ["type", "host", "port"];
  for (const key of Object.keys(k)) {
    if (!known.includes(key)) throw new TypeError(`unknown block option server.${key}`);
  }
  if (k.type === "unix") return { type: "unix", path: k.path };
  if (k.type !== "inet") throw new TypeError(`block option server.type: expected inet|unix`);
  const port = k.port === undefined ? NBD_DEFAULT_PORT : Number(k.port);
  return { type: "inet", host: k.host, port };
}

/** An nbd node's server, export name and reconnect delay. */
function checkNbdOptions(o: Record<string, unknown>): void {
  const s = o.server as Record<string, unknown> | undefined;
  if (s === undefined || typeof s !== "object" || s === null) {
    throw new TypeError("block option server is required for driver=nbd");
  }
  if (s.type === "unix") {
    if (typeof s.path !== "string" || s.path === "") {
      throw new TypeError("block option server.path is required for server.type=unix");
    }
  } else if (s.type === "inet") {
    if (typeof s.host !== "string" || s.host === "") {
      throw new TypeError("block option server.host is required for server.type=inet");
    }
    if (!(Number.isInteger(s.port) && (s.port as number) >= 1 && (s.port as number) <= 65535)) {
      throw new TypeError(`block option server.port: bad port ${s.port}`);
    }
  } else throw new TypeError("block option server.type: expected inet|unix");
  if (o.exportName !== undefined && typeof o.exportName !== "string") {
    throw new TypeError("block option export: expected a string");
  }
  const d = o.reconnectDelay;
  if (d !== undefined && !(Number.isSafeInteger(d) && (d as number) >= 0)) {
    throw new TypeError(`block option reconnect-delay: bad delay ${d}`);
  }
  if (o.format === "qcow2") throw new TypeError("format qcow2 over driver=nbd is not supported");
}
