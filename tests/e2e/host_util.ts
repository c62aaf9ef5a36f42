/**
 * Test helpers for the vhost-user-blk host: scratch directories on a file
 * system that supports O_DIRECT (the repository's `.cache/tmp`, not tmpfs),
 * images with known content, and a host started from command-line flags the
 * way `deno task host` would parse them.
 *
 * @module
 */

import { VhostUserBlkHost } from "../../dataplane/host.ts";
import { parseHostArgs } from "../../dataplane/host_options.ts";
import { makeScratchDir } from "../harness/mod.ts";

/** Scratch directories not removed yet (a failed test leaves its own; unload removes them). */
const live = new Set<string>();
globalThis.addEventListener("unload", () => {
  for (const d of live) {
    try {
      Deno.removeSync(d, { recursive: true });
    } catch { /* best effort */ }
  }
});

/** A scratch directory with an image and a socket path in it. */
export interface HostScratch {
  dir: string;
  image: string;
  socket: string;
  /** Removes the directory. */
  remove(): Promise<void>;
}

/**
 * Creates a scratch directory holding a sparse image of `size` bytes
 * (`fill` writes content first, if given).
 */
export async function hostScratch(
  prefix: string,
  size: number,
  fill?: Uint8Array,
): Promise<HostScratch> {
  const dir = await makeScratchDir(prefix);
  live.add(dir);
  const image = `${dir}/disk.raw`;
  const f = await Deno.open(image, { create: true, write: true });
  if (fill) await f.write(fill);
  await f.truncate(size);
  f.close();
  return {
    dir,
    image,
    socket: `${dir}/blk.sock`,
    remove: async () => {
      live.delete(dir);
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/** Starts a host from CLI-style flags (errors go to the returned log). */
export async function startHost(
  args: string[],
): Promise<{ host: VhostUserBlkHost; log: string[] }> {
  const log: string[] = [];
  const host = await VhostUserBlkHost.start(parseHostArgs(args), (l) => log.push(l));
  return { host, log };
}

/** Deterministic pseudo-random bytes (xorshift32) for data checks. */
export function randomBytes(len: number, seed: number): Uint8Array {
  const out = new Uint8Array(len);
  let x = (seed * 0x9e3779b1) >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

/** Index of the first byte where `a` and `b` differ, or -1 (lengths must match). */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

/** Reads `len` bytes at `offset` of a file (after the host closed it). */
export function fileBytes(path: string, offset: number, len: number): Uint8Array {
  const f = Deno.openSync(path, { read: true });
  try {
    const out = new Uint8Array(len);
    f.seekSync(offset, Deno.SeekMode.Start);
    let got = 0;
    while (got < len) {
      const n = f.readSync(out.subarray(got));
      if (n === null) throw new Error(`${path}: EOF at ${offset + got}`);
      got += n;
    }
    return out;
  } finally {
    f.close();
  }
}
