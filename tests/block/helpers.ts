/**
 * Test helpers for block/: a directory on a filesystem that supports O_DIRECT,
 * images with known content, aligned buffers, and a loop that polls an
 * AioContext until a promise settles.
 */
import type { AioContext } from "../../aio/mod.ts";
import {
  close,
  fsFilesystemType,
  type MappedRegion,
  mmapAnonymous,
  O_RDONLY,
  open,
  pread,
  TMPFS_MAGIC,
} from "../../sys/mod.ts";

let dir: string | undefined;

/** A fresh directory on a non-tmpfs filesystem (O_DIRECT works there). */
export function directDir(): string {
  if (dir) return dir;
  const candidates = [Deno.env.get("TMPDIR") ?? "/tmp", "/work/main/.cache/tmp", "/var/tmp"];
  for (const c of candidates) {
    try {
      Deno.mkdirSync(c, { recursive: true });
      if (fsFilesystemType(c) === TMPFS_MAGIC) continue;
      dir = Deno.makeTempDirSync({ dir: c, prefix: "block-test-" });
      return dir;
    } catch {
      continue;
    }
  }
  throw new Error("no non-tmpfs directory for O_DIRECT tests");
}

/** Byte `i` of the reference pattern for seed `seed`. */
export function patternByte(seed: number, i: number): number {
  return (i * 31 + seed * 7 + (i >> 9)) & 0xff;
}

/** Fills `buf` with the pattern as if it were at image offset `offset`. */
export function fillPattern(buf: Uint8Array, seed: number, offset = 0): Uint8Array {
  for (let i = 0; i < buf.length; i++) buf[i] = patternByte(seed, offset + i);
  return buf;
}

/** Creates an image of `size` bytes filled with pattern `seed`; returns its path. */
export function makeImage(size: number, seed = 1, name = "img"): string {
  const path = `${directDir()}/${name}-${crypto.randomUUID()}.raw`;
  Deno.writeFileSync(path, fillPattern(new Uint8Array(size), seed));
  return path;
}

/**
 * Reads `len` bytes at `offset` of the file at `path` through a fresh fd (what
 * is on disk, not what a backend cached); throws on a short read.
 */
export function onDisk(path: string, offset: number, len: number): Uint8Array {
  const fd = open(path, O_RDONLY);
  try {
    const out = new Uint8Array(len);
    const n = pread(fd, out, offset);
    if (n !== len) throw new Error(`onDisk: read ${n} of ${len} bytes at ${offset}`);
    return out;
  } finally {
    close(fd);
  }
}

/** Page-aligned anonymous memory (satisfies any O_DIRECT alignment). */
export function aligned(len: number): MappedRegion {
  return mmapAnonymous(Math.max(4096, Math.ceil(len / 4096) * 4096));
}

/**
 * Polls `ctx` until `p` settles, then returns its value. Uses pollAsync so the
 * Deno event loop keeps running (ThreadPool Workers start through it).
 */
export async function runUntil<T>(ctx: AioContext, p: Promise<T>): Promise<T> {
  let done = false;
  const q = p.finally(() => {
    done = true;
    ctx.notify(); // wake a pollAsync that waits for nothing else
  });
  // A rejection while we poll is taken at the `await q` below, not reported
  // as unhandled in between.
  q.catch(() => {});
  await null;
  while (!done) {
    await ctx.pollAsync();
    await null;
  }
  return await q;
}

/** Polls `ctx` until `cond()` is false (pollAsync: see {@link runUntil}). */
export async function pollWhile(
  ctx: AioContext,
  cond: () => boolean,
  limitMs = 10_000,
): Promise<void> {
  const end = Date.now() + limitMs;
  while (cond()) {
    if (Date.now() > end) throw new Error("pollWhile: timed out");
    await ctx.pollAsync();
  }
}

/** Removes the test directory. */
export function cleanup(): void {
  if (dir) Deno.removeSync(dir, { recursive: true });
  dir = undefined;
}

globalThis.addEventListener("unload", () => {
  try {
    cleanup();
  } catch {
    // best effort: the directory may already be gone
  }
});
