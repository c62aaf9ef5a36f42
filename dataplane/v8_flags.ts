/**
 * The V8 flags the host runs with: `deno task host`, `demo` and `vm` in
 * deno.json (tests/dataplane/v8_flags_test.ts keeps them equal), the
 * daemon's `--daemonize` re-exec, and every benchmark that starts the host
 * as its own process, so what is measured is what users run. V8 flags are
 * per process: IOThread Workers inherit them.
 *
 * - `--max-semi-space-size=1`: the young generation capped at 1 MiB
 *   semispaces (the data path allocates nothing per request).
 * - `--no-short-builtin-calls`: no 2 MiB copy of the embedded builtins per
 *   isolate.
 * - `--no-maglev`: no mid-tier compiler (its code and compile memory in every
 *   isolate; hot paths reach TurboFan either way).
 *
 * README's Memory section measures them.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { HOST_V8_FLAGS, HOST_V8_FLAGS_ARG } from "./v8_flags.ts";
 * assert(HOST_V8_FLAGS.split(",").includes("--no-maglev"));
 * assert.equal(HOST_V8_FLAGS_ARG, `--v8-flags=${HOST_V8_FLAGS}`);
 * ```
 */
export const HOST_V8_FLAGS = "--max-semi-space-size=1,--no-short-builtin-calls,--no-maglev";

/** {@link HOST_V8_FLAGS} as a `deno run` argument. */
export const HOST_V8_FLAGS_ARG = `--v8-flags=${HOST_V8_FLAGS}`;
