import { fillMemory } from "../../sys/mod.ts";
import { IoVector } from "../io_vector.ts";

/**
 * A new vector over bytes `[from, from + len)` of `src` (qemu_iovec_init +
 * qemu_iovec_concat): what a request split at cluster boundaries hands to
 * the child driver. Allocates; the memory stays owned by `src`'s owner.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IoVector } from "../io_vector.ts";
 * import { sliceIoVector } from "./iov_range.ts";
 * const q = new IoVector(2);
 * q.add(4096, 512);
 * q.add(8192, 512);
 * const s = sliceIoVector(q, 256, 512);
 * assert.equal(s.niov, 2);
 * assert.equal(s.base(0), 4096 + 256);
 * assert.equal(s.len(1), 256);
 * ```
 */
export function sliceIoVector(src: IoVector, from: number, len: number): IoVector {
  const out = new IoVector(Math.max(1, src.niov));
  let start = 0;
  const end = from + len;
  for (let i = 0; i < src.niov && start < end; i++) {
    const l = src.len(i), s = start;
    start += l;
    if (start <= from) continue;
    const a = Math.max(from, s), b = Math.min(end, start);
    if (b > a) out.add(src.base(i) + (a - s), b - a);
  }
  return out;
}

/**
 * Zeroes bytes `[from, from + len)` of `qiov` (qemu_iovec_memset with a
 * length): unallocated and zero clusters. No allocation.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { IoVector } from "../io_vector.ts";
 * import { zeroIoVector } from "./iov_range.ts";
 * const a = new Uint8Array([1, 1, 1]), b = new Uint8Array([1, 1]);
 * zeroIoVector(IoVector.fromBuffers([a, b]), 2, 2);
 * assert.equal([...a, ...b].join(), "1,1,0,0,1");
 * ```
 */
export function zeroIoVector(qiov: IoVector, from: number, len: number): void {
  let start = 0;
  const end = from + len;
  for (let i = 0; i < qiov.niov && start < end; i++) {
    const l = qiov.len(i), s = start;
    start += l;
    if (start <= from) continue;
    const a = Math.max(from, s), b = Math.min(end, start);
    if (b > a) fillMemory(qiov.base(i) + (a - s), 0, b - a);
  }
}
