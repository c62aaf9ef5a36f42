/**
 * `deno task NAME -- ARGS` hands the program a leading `--` (Deno 2 passes
 * the separator through), which node:util's parseArgs and qemu-storage-daemon's
 * option parser would take as the end of options or an unknown option. The
 * entry points (host, vm, demo, benches) drop it.
 *
 * @module
 */

/**
 * `args` without the one leading `--` that `deno task NAME -- ARGS` passes on.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { taskArgs } from "./task_args.ts";
 * assert.deepEqual(taskArgs(["--", "--image", "x"]), ["--image", "x"]);
 * assert.deepEqual(taskArgs(["--image", "x"]), ["--image", "x"]);
 * ```
 */
export function taskArgs(args: readonly string[]): string[] {
  return args[0] === "--" ? args.slice(1) : [...args];
}
