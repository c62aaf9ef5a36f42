import { copyMemory, fillMemory } from "../../sys/mod.ts";
import { IoVector } from "../io_vector.ts";

/**
 * Copies `n` bytes from host address `src` into `qiov` starting `pos` bytes
 * into it (qemu_iovec_from_buf with an offset): read data arriving in
 * pieces, each to its place. Hot path: no allocation.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IoVector } from "../io_vector.ts";
 * import { addressOf } from "../../sys/mod.ts";
 * import { copyToQiov } from "./qiov_range.ts";
 * const a = new Uint8Array(2), b = new Uint8Array(2);
 * copyToQiov(IoVector.fromBuffers([a, b]), 1, addressOf(new Uint8Array([7, 8])), 2);
 * assert.deepEqual([...a, ...b], [0, 7, 8, 0]);
 * ```
 */
export function copyToQiov(qiov: IoVector, pos: number, src: number, n: number): void {
  let start = 0;
  for (let i = 0; i < qiov.niov && n > 0; i++) {
    const len = qiov.len(i), end = start + len;
    if (end > pos) {
      const skip = pos - start;
      const k = Math.min(len - skip, n);
      copyMemory(qiov.base(i) + skip, src, k);
      src += k;
      pos += k;
      n -= k;
    }
    start = end;
  }
}

/**
 * Zeroes `n` bytes of `qiov` from `pos` (a hole in a structured read reply).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IoVector } from "../io_vector.ts";
 * import { fillQiov } from "./qiov_range.ts";
 * const a = new Uint8Array([1, 1, 1]);
 * fillQiov(IoVector.fromBuffers([a]), 1, 1);
 * assert.deepEqual([...a], [1, 0, 1]);
 * ```
 */
export function fillQiov(qiov: IoVector, pos: number, n: number): void {
  let start = 0;
  for (let i = 0; i < qiov.niov && n > 0; i++) {
    const len = qiov.len(i), end = start + len;
    if (end > pos) {
      const skip = pos - start;
      const k = Math.min(len - skip, n);
      fillMemory(qiov.base(i) + skip, 0, k);
      pos += k;
      n -= k;
    }
    start = end;
  }
}

/**
 * A new vector over bytes `[from, from + len)` of `qiov` (qemu_iovec_concat
 * of a part): one piece of a request split at the server's maximum size.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IoVector } from "../io_vector.ts";
 * import { sliceQiov } from "./qiov_range.ts";
 * const q = new IoVector(2);
 * q.add(4096, 100);
 * q.add(8192, 100);
 * const s = sliceQiov(q, 50, 100);
 * assert.equal(s.niov, 2);
 * assert.equal(s.base(0), 4146);
 * assert.equal(s.len(1), 50);
 * ```
 */
export function sliceQiov(qiov: IoVector, from: number, len: number): IoVector {
  const out = new IoVector(Math.max(1, qiov.niov));
  let start = 0;
  for (let i = 0; i < qiov.niov && len > 0; i++) {
    const l = qiov.len(i), end = start + l;
    if (end > from) {
      const skip = Math.max(0, from - start);
      const k = Math.min(l - skip, len);
      out.add(qiov.base(i) + skip, k);
      len -= k;
      from += k;
    }
    start = end;
  }
  return out;
}
