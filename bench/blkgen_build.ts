/**
 * Builds blkgen, the C vhost-user-blk load generator (`bench/c/blkgen/`), with
 * gcc into `.cache/bench/blkgen` when a source file is newer than the binary.
 * `deno task compare`, the bench tests and `deno task bench` call it before
 * they run blkgen; see docs/blkgen.md for what blkgen does.
 *
 * @module
 */

import { join } from "node:path";
import { REPO_ROOT } from "../tests/harness/mod.ts";

/** The blkgen sources. */
export const BLKGEN_SOURCE_DIR: string = join(REPO_ROOT, "bench", "c", "blkgen");

/** Where {@link buildBlkgen} puts the binary. */
export const BLKGEN_BINARY: string = join(REPO_ROOT, ".cache", "bench", "blkgen");

/** The gcc flags blkgen is built with (it must stay warning-free with them). */
export const BLKGEN_CFLAGS: readonly string[] = [
  "-std=c11",
  "-O2",
  "-Wall",
  "-Wextra",
  "-Werror",
  "-pthread",
];

/** gcc is missing or rejected the sources. */
export class BlkgenBuildError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(`blkgen build: ${message}`, options);
    this.name = "BlkgenBuildError";
  }
}

function mtimeMs(path: string): number | null {
  try {
    return Deno.statSync(path).mtime?.getTime() ?? null;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
}

/**
 * Compiles blkgen if the binary is missing or older than any source file and
 * returns the binary's path. Throws {@link BlkgenBuildError} when gcc is not
 * installed (naming the package) or the compile fails (with gcc's output).
 * Safe to call from concurrent processes: the binary is renamed into place.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { buildBlkgen } from "./blkgen_build.ts";
 * const exe = await buildBlkgen();
 * const out = await new Deno.Command(exe, { args: ["--help"] }).output();
 * assert(out.success);
 * ```
 */
export async function buildBlkgen(): Promise<string> {
  const sources = [...Deno.readDirSync(BLKGEN_SOURCE_DIR)]
    .filter((e) => e.isFile && /\.[ch]$/.test(e.name))
    .map((e) => join(BLKGEN_SOURCE_DIR, e.name))
    .sort();
  const newest = Math.max(...sources.map((s) => mtimeMs(s) ?? 0));
  const built = mtimeMs(BLKGEN_BINARY);
  if (built !== null && built >= newest) return BLKGEN_BINARY;

  await Deno.mkdir(join(REPO_ROOT, ".cache", "bench"), { recursive: true });
  const tmp = `${BLKGEN_BINARY}.${Deno.pid}.tmp`;
  let out: Deno.CommandOutput;
  try {
    out = await new Deno.Command("gcc", {
      args: [...BLKGEN_CFLAGS, "-o", tmp, ...sources.filter((s) => s.endsWith(".c"))],
      stdout: "piped",
      stderr: "piped",
    }).output();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new BlkgenBuildError("gcc is not installed (Debian: apt-get install gcc)", {
        cause: e,
      });
    }
    throw e;
  }
  if (!out.success) {
    await Deno.remove(tmp).catch(() => {});
    const msg = new TextDecoder().decode(out.stderr).trim();
    throw new BlkgenBuildError(`gcc failed:\n${msg}`);
  }
  await Deno.rename(tmp, BLKGEN_BINARY);
  return BLKGEN_BINARY;
}

if (import.meta.main) console.log(await buildBlkgen());
