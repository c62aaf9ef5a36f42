import { viewAt } from "../../sys/mod.ts";
import { VIRTIO_BLK_ID_BYTES } from "./constants.ts";
import type { VirtioBlkRequest } from "./request.ts";

const encoder = new TextEncoder();

/**
 * The VIRTIO_BLK_T_GET_ID answer for `serial` (virtio 1.2 section 5.2.6):
 * exactly {@link VIRTIO_BLK_ID_BYTES} bytes of UTF-8, zero-padded, so it is
 * NUL-terminated only when shorter than 20 bytes; longer serials are cut.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { blkIdBytes } from "./id.ts";
 * const id = blkIdBytes("disk0");
 * assert.equal(id.length, 20);
 * assert.equal(id[4], 0x30);
 * assert.equal(id[5], 0);
 * assert(blkIdBytes("x".repeat(25)).every((b) => b === 0x78));
 * ```
 */
export function blkIdBytes(serial: string): Uint8Array {
  const out = new Uint8Array(VIRTIO_BLK_ID_BYTES);
  const bytes = encoder.encode(serial);
  out.set(bytes.subarray(0, VIRTIO_BLK_ID_BYTES));
  return out;
}

/**
 * Copies the device ID into the data buffers of a parsed GET_ID request (at
 * most `req.inLen` bytes, which the parser capped at 20). Returns the number
 * of bytes written. Not a hot path (it creates views).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { blkIdBytes, writeBlkId } from "./id.ts";
 * import { blkRequestLimits } from "./config.ts";
 * import { VirtioBlkRequest } from "./request.ts";
 * const req = new VirtioBlkRequest(blkRequestLimits({ capacity: 8 }));
 * const buf = new Uint8Array(20);
 * req.qiov.addBuffer(buf);
 * req.inLen = 20;
 * assert.equal(writeBlkId(req, blkIdBytes("abc")), 20);
 * assert.equal(buf[2], 0x63);
 * ```
 */
export function writeBlkId(req: VirtioBlkRequest, id: Uint8Array): number {
  let done = 0;
  const want = Math.min(req.inLen, id.length);
  for (let i = 0; i < req.qiov.niov && done < want; i++) {
    const n = Math.min(req.qiov.len(i), want - done);
    new Uint8Array(viewAt(req.qiov.base(i), n)).set(id.subarray(done, done + n));
    done += n;
  }
  return done;
}
