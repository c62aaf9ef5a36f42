/**
 * Command-line parsing for the benchmark scripts: node:util's parseArgs, but
 * a bad flag ends the script with a one-line error and the usage (exit 2)
 * instead of an uncaught TypeError and its stack.
 *
 * @module
 */

import { parseArgs, type ParseArgsConfig } from "node:util";
import { taskArgs } from "../dataplane/mod.ts";

/**
 * Parses `Deno.args` with `options`; on a bad flag prints `name: message` and
 * `usage` and exits 2; with `--help` prints `usage` and exits 0.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { benchArgs } from "./bench_args.ts";
 * const v = benchArgs("demo", "usage: demo [--n N]", { n: { type: "string", default: "3" } }, ["--n", "5"]);
 * assert.equal(v.n, "5");
 * ```
 */
export function benchArgs<O extends NonNullable<ParseArgsConfig["options"]>>(
  name: string,
  usage: string,
  options: O,
  args: string[] = taskArgs(Deno.args),
): ReturnType<typeof parseArgs<{ options: O; args: string[] }>>["values"] {
  if (args.includes("--help") || args.includes("-h")) {
    console.log(usage);
    Deno.exit(0);
  }
  try {
    return parseArgs({ args, options }).values;
  } catch (e) {
    console.error(`${name}: ${(e as Error).message}\n${usage}`);
    Deno.exit(2);
  }
}
