/**
 * Pointers and C strings: converting between JS memory (typed arrays) and raw
 * addresses, and viewing raw addresses (mmapped guest memory) as ArrayBuffers.
 *
 * Addresses are JS numbers: x86_64 user-space addresses are below 2^47, so they
 * are exact in a double. Address values that come from a guest are NOT
 * host addresses and never reach these functions unchecked.
 *
 * @module
 */

/**
 * The host address of a typed array's first byte (or of an ArrayBuffer).
 * ArrayBuffer backing stores never move, so the address stays valid as long as
 * the buffer is alive: keep a reference while the kernel may use it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { addressOf } from "./pointer.ts";
 * const buf = new Uint8Array(16);
 * assert(addressOf(buf) > 0);
 * ```
 */
export function addressOf(buf: ArrayBufferView | ArrayBuffer): number {
  const view = buf instanceof ArrayBuffer ? new Uint8Array(buf) : buf;
  if (view.byteLength === 0) return 0;
  return Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(view as Uint8Array<ArrayBuffer>)));
}

/**
 * A `Deno.PointerValue` for a raw address (null for 0).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { pointerFrom } from "./pointer.ts";
 * assert.equal(pointerFrom(0), null);
 * ```
 */
export function pointerFrom(addr: number | bigint): Deno.PointerValue {
  if (addr === 0 || addr === 0n) return null;
  return Deno.UnsafePointer.create(BigInt(addr));
}

/**
 * An ArrayBuffer over `len` bytes at host address `addr`, without copying.
 * The caller guarantees the range is mapped for as long as the buffer is used.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { addressOf, viewAt } from "./pointer.ts";
 * const src = new Uint8Array([1, 2, 3]);
 * assert.equal(new Uint8Array(viewAt(addressOf(src), 3))[2], 3);
 * ```
 */
export function viewAt(addr: number, len: number): ArrayBuffer {
  return Deno.UnsafePointerView.getArrayBuffer(pointerFrom(addr)!, len);
}

const encoder = new TextEncoder();

/**
 * A NUL-terminated UTF-8 copy of `s`, for path and name parameters.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { cString } from "./pointer.ts";
 * assert.equal(cString("ab").length, 3);
 * ```
 */
export function cString(s: string): Uint8Array<ArrayBuffer> {
  const bytes = encoder.encode(s);
  const out = new Uint8Array(bytes.length + 1);
  out.set(bytes);
  return out;
}
