/**
 * The host's short options as the daemon's own specs: what `deno task host
 * -- --image ... --socket ...` means in qemu-storage-daemon's terms. One
 * blockdev chain (a `file`, `null-co`/`null-aio`, `nbd` or `rbd` node, a
 * `qcow2` node over a file with `--format qcow2`, a `throttle` node over
 * them in a throttle group of its own with `--throttle`), `--iothreads`
 * IOThread objects,
 * and one vhost-user-blk export on the socket whose `--queues` are spread
 * round-robin over those IOThreads (the export's internal `iothreads`, as
 * QEMU's newer `iothread-vq-mapping`). The short options that
 * qemu-storage-daemon's export does not take (`--serial`, `--queue-size`,
 * `--socket-mode`, the test-only ones) travel as the export spec's internal
 * fields. The IOThreads share the image's range-lock table (and a writable
 * qcow2's metadata owner) as the host's always did.
 *
 * @module
 */

import { Qcow2SharedState, RangeLockTable } from "../block/mod.ts";
import type { BlkThreadData } from "./blk_iothread.ts";
import type { BlockExportSpec } from "./daemon/block_export.ts";
import type { IOThreadSpec } from "./daemon/iothread_object.ts";
import type { OptionObject } from "./daemon/qapi_input.ts";
import type { ThrottleGroupSpec } from "./daemon/throttle_group_object.ts";
import type { HostOptions } from "./host_options.ts";

/** The export id (and the top node's name) the short options' export gets. */
export const HOST_EXPORT_ID = "disk";

/**
 * What the short options become: `--blockdev` objects (JSON form, children
 * first), `--object iothread` specs, the `--export` spec.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import type { HostDaemonSpecs } from "./host_export.ts";
 * const s: HostDaemonSpecs = { throttleGroups: [], blockdevs: [], iothreads: [], export: {
 *   id: "disk", nodeName: "disk", addr: { type: "unix", path: "/tmp/s" }, writable: true,
 *   writethrough: false, numQueues: 1, logicalBlockSize: 512 } };
 * assert.equal(s.export.id, "disk");
 * ```
 */
export interface HostDaemonSpecs {
  /** `--object throttle-group` (`--throttle`), added before the nodes naming them. */
  throttleGroups: ThrottleGroupSpec[];
  blockdevs: OptionObject[];
  iothreads: IOThreadSpec[];
  export: BlockExportSpec;
}

/** The protocol node of the image (`--image`, `--cache`, `--aio`, `--discard`, `--read-only`). */
function protocolNode(o: HostOptions, nodeName: string): OptionObject {
  const b = o.block;
  const common: OptionObject = {
    "node-name": nodeName,
    "read-only": b.readOnly,
    discard: b.discard,
    cache: { direct: b.cache === "none", "no-flush": b.cache === "unsafe" },
  };
  switch (b.driver) {
    case "file":
      return { driver: "file", ...common, filename: b.filename!, aio: b.aio };
    case "null-co":
    case "null-aio":
      return { driver: b.driver, ...common, size: b.size! };
    case "rbd": {
      const node: OptionObject = { driver: "rbd", ...common, pool: b.pool!, image: b.image! };
      for (const k of ["namespace", "conf", "user", "snapshot"] as const) {
        if (b[k] !== undefined) node[k] = b[k];
      }
      if (b.rbdConf !== undefined) {
        node["=keyvalue-pairs"] = JSON.stringify(Object.entries(b.rbdConf).flat());
      }
      return node;
    }
    case "nbd": {
      const s = b.server!;
      const server: Record<string, string> = s.type === "unix"
        ? { type: "unix", path: s.path }
        : { type: "inet", host: s.host, port: String(s.port) };
      const node: OptionObject = { driver: "nbd", ...common, server };
      if (b.exportName !== undefined) node.export = b.exportName;
      if (b.reconnectDelay !== undefined) node["reconnect-delay"] = b.reconnectDelay;
      return node;
    }
  }
}

/**
 * Translates validated short options into the daemon's specs. The
 * IOThreads' shared state is created here (a fresh range-lock table each
 * call).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { hostDaemonSpecs } from "./host_export.ts";
 * import { parseHostArgs } from "./host_options.ts";
 * const s = hostDaemonSpecs(parseHostArgs([
 *   "--image", "null-co:1M", "--socket", "/tmp/s", "--queues", "4", "--iothreads", "2",
 * ]));
 * assert.deepEqual(s.iothreads.map((t) => t.id), ["iothread0", "iothread1"]);
 * assert.deepEqual(s.export.iothreads, ["iothread0", "iothread1"]);
 * assert.equal(s.export.numQueues, 4);
 * ```
 */
export function hostDaemonSpecs(o: HostOptions): HostDaemonSpecs {
  const b = o.block;
  const blockdevs: OptionObject[] = [];
  const throttleGroups: ThrottleGroupSpec[] = [];
  // The top node is the export's; the nodes under it are named after it.
  const throttled = o.throttle !== undefined;
  const fmt = throttled ? `${HOST_EXPORT_ID}-fmt` : HOST_EXPORT_ID;
  if (b.format === "qcow2") {
    blockdevs.push(protocolNode(o, `${HOST_EXPORT_ID}-file`));
    const top: OptionObject = {
      driver: "qcow2",
      "node-name": fmt,
      file: `${HOST_EXPORT_ID}-file`,
      "read-only": b.readOnly,
      discard: b.discard,
    };
    if (b.l2CacheSize !== undefined) top["l2-cache-size"] = b.l2CacheSize;
    blockdevs.push(top);
  } else {
    blockdevs.push(protocolNode(o, fmt));
  }
  if (o.throttle !== undefined) {
    // --throttle: a throttle group over the whole export, a throttle filter on top.
    const group = `${HOST_EXPORT_ID}-throttle`;
    throttleGroups.push({ qomType: "throttle-group", id: group, config: o.throttle });
    blockdevs.push({
      driver: "throttle",
      "node-name": HOST_EXPORT_ID,
      "throttle-group": group,
      file: fmt,
    });
  }
  // One range-lock table for the image, shared by every IOThread's driver:
  // read-modify-write cycles are serialised across all of them. A writable
  // qcow2: every IOThread's driver attaches; the first owns the metadata.
  const data: BlkThreadData = {
    rangeLocks: RangeLockTable.create().shared,
    sharedExport: HOST_EXPORT_ID,
  };
  if (b.format === "qcow2" && !b.readOnly) data.qcow2 = Qcow2SharedState.create().shared;
  const iothreads: IOThreadSpec[] = [];
  for (let i = 0; i < o.iothreads; i++) {
    iothreads.push({
      id: `iothread${i}`,
      pollMaxNs: o.pollMaxNs,
      aioMaxBatch: o.aioMaxBatch,
      data,
    });
  }
  const spec: BlockExportSpec = {
    id: HOST_EXPORT_ID,
    nodeName: HOST_EXPORT_ID,
    addr: { type: "unix", path: o.socket },
    writable: !b.readOnly,
    writethrough: false,
    numQueues: o.queues,
    logicalBlockSize: o.logicalBlockSize,
    iothreads: iothreads.map((t) => t.id),
    serial: o.serial,
    maxQueueSize: o.queueSize,
    socketMode: o.socketMode,
    logPrefix: "",
  };
  if (o.testHoldCompletions) spec.testHoldCompletions = o.testHoldCompletions;
  if (o.testBreakRing) spec.testBreakRing = o.testBreakRing;
  return { throttleGroups, blockdevs, iothreads, export: spec };
}
