/**
 * Inflating qcow2 compressed clusters (QEMU's qcow2_zlib_decompress) with
 * node:zlib, imported on the first compressed cluster a thread reads: the
 * Node compatibility layer it pulls in costs ~3.5 MiB per isolate (main
 * thread and every IOThread), which images without compressed clusters
 * should not pay.
 *
 * @module
 */

import type { AioContext } from "../../aio/mod.ts";

type Zlib = typeof import("node:zlib");

let zlib: Zlib | null = null;
let loading: Promise<Zlib> | null = null;

/** Raw deflate, window bits -12; the stream may end without a final block once the cluster is full. */
function inflateNow(z: Zlib, data: Uint8Array, clusterSize: number): Uint8Array | null {
  try {
    const out = z.inflateRawSync(data, {
      finishFlush: z.constants.Z_SYNC_FLUSH,
      maxOutputLength: clusterSize,
    });
    return out.length === clusterSize ? out : null;
  } catch {
    return null;
  }
}

/**
 * Inflates `data` (one compressed cluster's deflate stream) into
 * `clusterSize` bytes and calls `cb` with them, or with null if the stream
 * is corrupt or does not fill the cluster exactly. Calls `cb` before
 * returning once node:zlib is loaded; the first call loads it through
 * `ctx.waitEventLoop` (an IOThread keeps its event loop running meanwhile).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { deflateRawSync } from "node:zlib";
 * import { AioContext } from "../../aio/mod.ts";
 * import { inflateCluster } from "./inflate.ts";
 * const ctx = new AioContext();
 * const data = deflateRawSync(new Uint8Array(4096).fill(3));
 * let out: Uint8Array | null | undefined;
 * inflateCluster(ctx, data, 4096, (o) => out = o);
 * while (out === undefined) await ctx.pollAsync();
 * assert.equal(out?.length, 4096);
 * assert.equal(out?.[4095], 3);
 * ctx.close();
 * ```
 */
export function inflateCluster(
  ctx: AioContext,
  data: Uint8Array,
  clusterSize: number,
  cb: (out: Uint8Array | null) => void,
): void {
  if (zlib !== null) return cb(inflateNow(zlib, data, clusterSize));
  loading ??= ctx.waitEventLoop(import("node:zlib")).then((m) => zlib = m);
  loading.then(
    (z) => cb(inflateNow(z, data, clusterSize)),
    () => {
      loading = null; // try again on the next cluster
      cb(null);
    },
  );
}
