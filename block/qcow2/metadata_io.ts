import { IoVector } from "../io_vector.ts";
import type { BlockDriver } from "../block_driver.ts";
import { Qcow2Error } from "./qcow2_error.ts";

/**
 * Reads `bytes` at `offset` of `child` into a new buffer and calls `cb` with
 * 0 and the bytes, or -errno (metadata: header, L1, refcount and L2 tables,
 * compressed clusters). The child never calls back before this returns.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AioContext } from "../../aio/mod.ts";
 * import { NullCoDriver } from "../null_driver.ts";
 * import { readMetadata } from "./metadata_io.ts";
 * const ctx = new AioContext();
 * const d = new NullCoDriver(ctx, { size: 4096, readZeroes: true });
 * let got = -1;
 * readMetadata(d, 0, 512, (ret, buf) => got = ret === 0 ? buf!.length : ret);
 * while (got === -1) ctx.poll(true);
 * assert.equal(got, 512);
 * await d.close();
 * ctx.close();
 * ```
 */
export function readMetadata(
  child: BlockDriver,
  offset: number,
  bytes: number,
  cb: (ret: number, buf: Uint8Array | null) => void,
): void {
  const buf = new Uint8Array(bytes);
  const qiov = IoVector.fromBuffers([buf]);
  child.preadv(offset, qiov, (ret) => {
    // qiov holds buf (and its iovec) alive until here.
    cb(ret, ret < 0 || qiov.size !== bytes ? null : buf);
  });
}

/**
 * Promise form of {@link readMetadata} for opening an image: throws a
 * {@link Qcow2Error} of kind `Io` naming `what` on an error. Completions
 * arrive only while the child's AioContext is polled (an IOThread's loop, or
 * `pollAsync` on the main thread).
 *
 * @example
 * ```ts ignore
 * const l1 = await readMetadataAsync(child, h.l1TableOffset, h.l1Size * 8, "L1 table");
 * ```
 */
export function readMetadataAsync(
  child: BlockDriver,
  offset: number,
  bytes: number,
  what: string,
): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    readMetadata(child, offset, bytes, (ret, buf) => {
      if (ret < 0 || buf === null) {
        reject(new Qcow2Error("Io", `reading the ${what} at ${offset} failed (${ret})`));
      } else resolve(buf);
    });
  });
}
