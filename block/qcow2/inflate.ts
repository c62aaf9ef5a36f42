/**
 * Inflating qcow2 compressed clusters (QEMU's qcow2_zlib_decompress) with
 * node:zlib. Only the qcow2 driver imports this module, and BlockBackend
 * imports the driver when a thread first opens a qcow2 node: the Node
 * compatibility layer node:zlib pulls in costs an isolate ~3.5 MiB, which
 * threads serving raw files do not pay.
 *
 * @module
 */

import { constants, inflateRawSync } from "node:zlib";

/**
 * Inflates `data` (one compressed cluster's raw deflate stream, window bits
 * -12) into `clusterSize` bytes; null if the stream is corrupt or does not
 * fill the cluster exactly. The stream may end without a final block once
 * the cluster is full (Z_SYNC_FLUSH), and data past its end is ignored.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { deflateRawSync } from "node:zlib";
 * import { inflateCluster } from "./inflate.ts";
 * const out = inflateCluster(deflateRawSync(new Uint8Array(4096).fill(3)), 4096);
 * assert.equal(out?.length, 4096);
 * assert.equal(out?.[4095], 3);
 * assert.equal(inflateCluster(new Uint8Array([1, 2, 3]), 4096), null);
 * ```
 */
export function inflateCluster(data: Uint8Array, clusterSize: number): Uint8Array | null {
  try {
    const out = inflateRawSync(data, {
      finishFlush: constants.Z_SYNC_FLUSH,
      maxOutputLength: clusterSize,
    });
    return out.length === clusterSize ? out : null;
  } catch {
    return null;
  }
}
