/**
 * Helpers for the bad-image tests and the fuzzers: a small qcow2 image made
 * once by qemu-img and qemu-io (bytes in memory), field patching, and
 * opening/reading through {@link Qcow2Driver} over a {@link MemDriver}.
 */
import type { AioContext } from "../../../aio/mod.ts";
import { type BlockDriver, IoVector } from "../../../block/mod.ts";
import { Qcow2Driver } from "../../../block/qcow2/mod.ts";
import { runUntil } from "../helpers.ts";
import { MemDriver } from "./mem_driver.ts";
import { qemuImg, qemuIo, tempDir } from "./qemu_tools.ts";

/**
 * A 1 MiB v3 image (64 KiB clusters by default) with data in clusters 0,
 * 2 and 5, a zero cluster 3 and a compressed cluster 7 when `compressed`.
 */
export function sampleImage(createOpts = "", compressed = false): Uint8Array {
  const d = tempDir();
  try {
    const img = `${d}/s.qcow2`;
    const o = createOpts ? ["-o", createOpts] : [];
    qemuImg("create", "-q", "-f", "qcow2", ...o, img, "1M");
    qemuIo(img, "qcow2", "write -P 0xa1 0 64k", "write -P 0xa2 128k 64k", "write -z 192k 64k");
    qemuIo(img, "qcow2", "write -P 0xa5 320k 4k");
    if (compressed) qemuIo(img, "qcow2", "write -c -P 0xa7 448k 64k");
    return Deno.readFileSync(img);
  } finally {
    Deno.removeSync(d, { recursive: true });
  }
}

/** Writes a big-endian u32 at `off` of a copy of `img`; returns the copy. */
export function withU32(img: Uint8Array, off: number, v: number): Uint8Array {
  const c = img.slice();
  new DataView(c.buffer).setUint32(off, v >>> 0);
  return c;
}

/** Writes a big-endian u64 (as two halves) at `off` of a copy. */
export function withU64(img: Uint8Array, off: number, hi: number, lo: number): Uint8Array {
  const c = img.slice();
  const dv = new DataView(c.buffer);
  dv.setUint32(off, hi >>> 0);
  dv.setUint32(off + 4, lo >>> 0);
  return c;
}

/** Reads a big-endian u64 (safe-integer values only). */
export function u64At(img: Uint8Array, off: number): number {
  const dv = new DataView(img.buffer, img.byteOffset, img.byteLength);
  return dv.getUint32(off) * 2 ** 32 + dv.getUint32(off + 4);
}

/** Opens `bytes` as a read-only qcow2 image in memory. */
export function openMem(
  ctx: AioContext,
  bytes: Uint8Array,
  openBacking?: (name: string, format: string) => Promise<BlockDriver>,
): Promise<Qcow2Driver> {
  return runUntil(
    ctx,
    Qcow2Driver.open(ctx, new MemDriver(ctx, bytes), { readOnly: true, openBacking }),
  );
}

/**
 * Reads `len` bytes at `offset` through `d`; returns [ret, bytes]. Fails
 * (throws) when the completion does not come within `limitMs` or comes twice.
 */
export async function readDriver(
  ctx: AioContext,
  d: BlockDriver,
  offset: number,
  len: number,
  limitMs = 5_000,
): Promise<[number, Uint8Array]> {
  const buf = new Uint8Array(len).fill(0xee);
  let ret: number | undefined;
  const n: { calls: number } = { calls: 0 };
  const p = new Promise<void>((resolve) => {
    d.preadv(offset, IoVector.fromBuffers([buf]), (r) => {
      n.calls++;
      ret = r;
      resolve();
    });
  });
  const atReturn = n.calls;
  if (atReturn !== 0) throw new Error("completed inside preadv");
  const timer = new Promise<void>((_, reject) => {
    const t = setTimeout(() => reject(new Error(`read ${offset}+${len} hung`)), limitMs);
    p.finally(() => clearTimeout(t));
  });
  await runUntil(ctx, Promise.race([p, timer]));
  // Anything already scheduled (a second completion from a bottom half) runs now.
  ctx.poll(false);
  ctx.poll(false);
  if (n.calls !== 1) throw new Error(`read ${offset}+${len} completed ${n.calls} times`);
  return [ret!, buf];
}
