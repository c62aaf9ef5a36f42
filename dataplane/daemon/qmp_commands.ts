/**
 * The QMP commands the daemon answers, as qemu-storage-daemon 7.2 spells
 * their arguments and replies: `query-version`, `query-commands`,
 * `query-named-block-nodes`, `query-block-exports`, `query-iothreads`,
 * `blockdev-add`, `blockdev-del`, `block-export-add`, `block-export-del`,
 * `object-add`, `object-del`, `qom-set` / `qom-get` (throttle groups),
 * `block_resize`, `quit` (`qmp_capabilities` belongs to the protocol,
 * qmp_server.ts). Arguments are checked by the same readers as the
 * command line, in their JSON form.
 *
 * @module
 */

import type { NbdServerAddress } from "../../block/mod.ts";
import { protocolSize } from "./blockdev.ts";
import { parseExport } from "./block_export.ts";
import { parseObjectSpec } from "./object_spec.ts";
import { parseNbdExport, parseNbdServer } from "../nbd/nbd_block_export.ts";
import { DaemonError, QapiInput } from "./qapi_input.ts";
import type { QmpDispatcher } from "./qmp_server.ts";
import { MAIN_LOOP_IOTHREAD, type StorageDaemon } from "./storage_daemon.ts";

/** The version QMP reports: the QEMU release whose interface this follows. */
export const QMP_VERSION = {
  qemu: { major: 7, minor: 2, micro: 0 },
  package: "dataplane",
};

type Command = (d: StorageDaemon, args: QapiInput) => unknown | Promise<unknown>;

function noArgs(fn: (d: StorageDaemon) => unknown): Command {
  return (d, a) => {
    a.end();
    return fn(d);
  };
}

const COMMANDS: Record<string, Command> = {
  "query-version": noArgs(() => QMP_VERSION),
  "query-commands": noArgs(() =>
    ["qmp_capabilities", ...Object.keys(COMMANDS)].map((name) => ({ name }))
  ),
  "query-named-block-nodes": (d, a) => {
    a.bool("flat");
    a.end();
    return [...d.graph.nodes.values()].map((n) => {
      const s = n.spec;
      const size = nodeSize(d, s.nodeName);
      // The protocol node under the chain names the image.
      const chain = d.graph.chain(s.nodeName);
      const bottom = d.graph.get(chain[chain.length - 1]).spec;
      const filename = bottom.driver === "file"
        ? bottom.filename!
        : bottom.driver === "nbd"
        ? nbdFilename(bottom.server!, bottom.exportName ?? "")
        : `json:{"driver": "${bottom.driver}", "size": ${bottom.size}}`;
      return {
        "node-name": s.nodeName,
        drv: s.driver,
        ro: s.readOnly,
        file: filename,
        encrypted: false,
        backing_file_depth: 0,
        detect_zeroes: s.detectZeroes ?? "off",
        cache: {
          writeback: true,
          direct: s.cacheDirect ?? false,
          "no-flush": s.cacheNoFlush ?? false,
        },
        image: { filename, format: s.driver, "virtual-size": size },
        bps: 0,
        bps_rd: 0,
        bps_wr: 0,
        iops: 0,
        iops_rd: 0,
        iops_wr: 0,
        write_threshold: 0,
      };
    });
  },
  "query-block-exports": noArgs((d) =>
    [...d.exports.values()].map((e) => ({
      id: e.spec.id,
      type: "vhost-user-blk",
      "node-name": e.spec.nodeName,
      "shutting-down": false,
    })).concat([...d.nbdExports.values()].map((e) => ({
      id: e.spec.id,
      type: "nbd",
      "node-name": e.spec.nodeName,
      "shutting-down": false,
    })))
  ),
  "query-iothreads": noArgs((d) =>
    [...d.iothreads.values()].filter((t) => t.spec.id !== MAIN_LOOP_IOTHREAD).map((t) => ({
      id: t.spec.id,
      "poll-max-ns": t.spec.pollMaxNs,
      "poll-grow": t.spec.pollGrow ?? 0,
      "poll-shrink": t.spec.pollShrink ?? 0,
      "aio-max-batch": t.spec.aioMaxBatch,
    }))
  ),
  "blockdev-add": (d, a) => {
    d.blockdevAdd(a.rest(), false);
  },
  "blockdev-del": (d, a) => {
    const name = a.str("node-name", true);
    a.end();
    d.blockdevDel(name);
  },
  "block-export-add": async (d, a) => {
    const obj = a.rest();
    if ((obj as Record<string, unknown>).type === "nbd") {
      await d.nbdExportAdd(parseNbdExport(obj, false));
    } else {
      await d.exportAdd(parseExport(obj, false));
    }
  },
  "nbd-server-start": async (d, a) => {
    await d.nbdServerStart(parseNbdServer(a.rest(), false));
  },
  "nbd-server-stop": noArgs((d) => d.nbdServerStop()),
  "block-export-del": async (d, a) => {
    const id = a.str("id", true);
    const mode = a.enum("mode", ["safe", "hard"] as const) ?? "safe";
    a.end();
    await d.exportDel(id, mode === "hard");
  },
  "object-add": async (d, a) => {
    await d.objectAdd(parseObjectSpec(a.rest(), false));
  },
  "object-del": async (d, a) => {
    const id = a.str("id", true);
    a.end();
    await d.objectDel(id);
  },
  block_resize: async (d, a) => {
    const device = a.str("device");
    const nodeName = a.str("node-name");
    const size = a.int("size", Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER, true);
    a.end();
    if (size < 0) throw new DaemonError("Parameter 'size' must be non-negative");
    const name = nodeName ?? device;
    if (name === undefined) throw new DaemonError("Need exactly one of 'device' and 'node-name'");
    await d.blockResize(name, size);
  },
  "qom-set": (d, a) => {
    const path = a.str("path", true);
    const property = a.str("property", true);
    const value = a.raw("value");
    a.end();
    if (value === undefined) throw new DaemonError("Parameter 'value' is missing");
    d.qomObject(path).set(property, value);
  },
  "qom-get": (d, a) => {
    const path = a.str("path", true);
    const property = a.str("property", true);
    a.end();
    return d.qomObject(path).get(property);
  },
  quit: noArgs((d) => {
    d.requestQuit();
  }),
};

/** The bytes a node presents (a qcow2 node: its virtual size once exported, else 0). */
function nodeSize(d: StorageDaemon, nodeName: string): number {
  const s = d.graph.get(nodeName).spec;
  switch (s.driver) {
    case "raw":
      if (s.size === undefined && openedSize(d.graph.get(s.file!).spec.driver)) {
        return exportedLength(d, s.nodeName) ?? 0;
      }
      return s.size ?? protocolSize(d.graph.get(s.file!).spec) - (s.offset ?? 0);
    case "qcow2":
    case "rbd": // known once an export opened it
    case "nbd":
      return exportedLength(d, s.nodeName) ?? 0;
    case "throttle":
      return nodeSize(d, s.file!);
    default:
      return protocolSize(s);
  }
}

/** Protocol drivers whose size is known only once a driver opened the node (not by stat). */
function openedSize(driver: string): boolean {
  return driver === "nbd" || driver === "rbd";
}

function exportedLength(d: StorageDaemon, nodeName: string): number | undefined {
  for (const e of d.exports.values()) if (e.spec.nodeName === nodeName) return e.image.length;
  return undefined;
}

/**
 * The dispatcher a daemon's monitors use.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { QmpCommands } from "./qmp_commands.ts";
 * import { StorageDaemon } from "./storage_daemon.ts";
 * const d = new StorageDaemon();
 * const q = new QmpCommands(d);
 * await q.execute("blockdev-add", { driver: "null-co", "node-name": "n0", size: 4096 });
 * const nodes = await q.execute("query-named-block-nodes", {}) as { "node-name": string }[];
 * assert.equal(nodes[0]["node-name"], "n0");
 * await assert.rejects(async () => await q.execute("nope", {}), /The command nope has not been found/);
 * await d.stop();
 * ```
 */
export class QmpCommands implements QmpDispatcher {
  readonly #daemon: StorageDaemon;
  constructor(daemon: StorageDaemon) {
    this.#daemon = daemon;
  }
  version(): unknown {
    return QMP_VERSION;
  }
  execute(name: string, args: Record<string, unknown>): unknown | Promise<unknown> {
    const cmd = Object.hasOwn(COMMANDS, name) ? COMMANDS[name] : undefined;
    if (cmd === undefined) {
      throw new DaemonError(`The command ${name} has not been found`, "CommandNotFound");
    }
    return cmd(this.#daemon, new QapiInput(args as Record<string, never>, false));
  }
}

/** An nbd node's filename as QEMU's nbd_refresh_filename writes it. */
function nbdFilename(s: NbdServerAddress, exportName: string): string {
  if (s.type === "unix") return `nbd+unix:///${exportName}?socket=${s.path}`;
  const host = s.host.includes(":") ? `[${s.host}]` : s.host;
  return `nbd://${host}:${s.port}/${exportName}`;
}
