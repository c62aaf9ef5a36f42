/**
 * The option names of qemu-storage-daemon's command line, apart from their
 * parser (daemon_args.ts): dataplane/main.ts tells the two syntaxes apart
 * with them and imports the daemon's modules only for the daemon's syntax.
 *
 * @module
 */

/**
 * Options that take a value.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { DAEMON_OPTIONS_WITH_VALUE } from "./daemon_option_names.ts";
 * assert(DAEMON_OPTIONS_WITH_VALUE.has("--blockdev"));
 * ```
 */
export const DAEMON_OPTIONS_WITH_VALUE: ReadonlySet<string> = new Set([
  "--blockdev",
  "--object",
  "--export",
  "--chardev",
  "--monitor",
  "--pidfile",
  "--metrics",
  "--nbd-server",
  "--trace",
  "-T",
]);

/**
 * Options without a value.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { DAEMON_FLAGS } from "./daemon_option_names.ts";
 * assert(DAEMON_FLAGS.has("--daemonize"));
 * ```
 */
export const DAEMON_FLAGS: ReadonlySet<string> = new Set([
  "--daemonize",
  "--help",
  "-h",
  "--version",
  "-V",
]);

/**
 * Every option name of the qsd syntax: one of these on a command line selects it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { DAEMON_OPTION_NAMES } from "./daemon_option_names.ts";
 * assert(DAEMON_OPTION_NAMES.has("--export") && !DAEMON_OPTION_NAMES.has("--image"));
 * ```
 */
export const DAEMON_OPTION_NAMES: ReadonlySet<string> = new Set([
  ...DAEMON_OPTIONS_WITH_VALUE,
  ...DAEMON_FLAGS,
]);
