/**
 * Scratch directories for images and sockets that tests and benchmarks create.
 * They live under `.cache/tmp/` in the repository, which is on the same file
 * system as the checkout (ext4 here), not on a tmpfs that rejects O_DIRECT.
 *
 * @module
 */

import { join } from "node:path";
import { REPO_ROOT } from "./kernel_image.ts";

/**
 * Creates a fresh scratch directory; remove it with `Deno.remove(dir, { recursive: true })`.
 * Unix socket paths must stay under 108 bytes, so keep names inside it short.
 *
 * @example
 * ```ts
 * import { makeScratchDir } from "./scratch_dir.ts";
 * const dir = await makeScratchDir("example");
 * await Deno.writeTextFile(`${dir}/x`, "x");
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function makeScratchDir(prefix: string): Promise<string> {
  const base = join(REPO_ROOT, ".cache", "tmp");
  await Deno.mkdir(base, { recursive: true });
  return await Deno.makeTempDir({ dir: base, prefix: `${prefix}-` });
}
