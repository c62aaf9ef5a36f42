/**
 * Runs the daemon from qemu-storage-daemon's command line: parse, apply the
 * options in order (exit 1 with qsd's kind of message on the first that
 * fails), write the pidfile, serve until SIGINT/SIGTERM or QMP `quit`, stop
 * every export cleanly. `--daemonize` starts the same command line again
 * detached (Deno cannot fork) and exits 0 once the child reports that every
 * option was applied, or 1 with the child's error.
 *
 * @module
 */

import { releaseExecutablePages } from "../../sys/mod.ts";
import { DAEMON_USAGE, type DaemonArgs, DaemonUsageError, parseDaemonArgs } from "./daemon_args.ts";
import { DaemonError } from "./qapi_input.ts";
import { QMP_VERSION } from "./qmp_commands.ts";
import { StorageDaemon } from "./storage_daemon.ts";
import { HOST_V8_FLAGS_ARG } from "../v8_flags.ts";

/** Set in a daemonized child's environment: report readiness on stdout. */
const DAEMONIZED_ENV = "DATAPLANE_DAEMONIZED";

function log(prog: string, line: string): void {
  const t = new Date().toISOString().slice(11, 23);
  console.error(`${t} ${prog}: ${line}`);
}

/** Applies the parsed options to the daemon in order; throws DaemonUsageError with the option's text. */
async function apply(d: StorageDaemon, args: DaemonArgs): Promise<void> {
  // Latency histograms cost two clock reads a request: only with --metrics.
  d.latencyHistogram = args.options.some((o) => o.kind === "metrics");
  for (const o of args.options) {
    try {
      switch (o.kind) {
        case "blockdev":
          d.blockdevAdd(o.obj, o.keyval);
          break;
        case "object":
          await d.objectAdd(o.spec);
          break;
        case "export":
          await d.exportAdd(o.spec);
          break;
        case "chardev":
          d.chardevAdd(o.spec);
          break;
        case "monitor":
          await d.monitorAdd(o.chardev, o.pretty);
          break;
        case "metrics":
          await d.metricsAdd(o.hostname, o.port);
          break;
        case "nbd-server":
          await d.nbdServerStart(o.spec);
          break;
        case "nbd-export":
          await d.nbdExportAdd(o.spec);
          break;
      }
    } catch (e) {
      if (e instanceof DaemonError) throw new DaemonUsageError(`${o.text}: ${e.message}`);
      throw e;
    }
  }
}

/**
 * Runs the daemon; returns the exit status (0 after a clean stop, 1 on an
 * error). `prog` is the name errors start with.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { daemonMain } from "./daemon_main.ts";
 * const orig = console.error;
 * console.error = () => {};
 * try {
 *   assert.equal(await daemonMain(["--no-such-option"]), 1);
 * } finally {
 *   console.error = orig;
 * }
 * ```
 */
export async function daemonMain(argv: string[], prog = "dataplane"): Promise<number> {
  let args: DaemonArgs;
  try {
    args = parseDaemonArgs(argv);
  } catch (e) {
    if (!(e instanceof DaemonUsageError)) throw e;
    console.error(`${prog}: ${e.message}`);
    return 1;
  }
  if (args.help) {
    console.log(DAEMON_USAGE);
    return 0;
  }
  if (args.version) {
    const v = QMP_VERSION.qemu;
    console.log(`${prog} (qemu-storage-daemon ${v.major}.${v.minor}.${v.micro} interface)`);
    return 0;
  }
  if (args.daemonize && Deno.env.get(DAEMONIZED_ENV) === undefined) {
    return await daemonize(argv, prog);
  }
  const child = Deno.env.get(DAEMONIZED_ENV) !== undefined;
  const ready = (line: string) => {
    if (child) Deno.stdout.writeSync(new TextEncoder().encode(line + "\n"));
  };
  const daemon = new StorageDaemon((l) => log(prog, l));
  try {
    await apply(daemon, args);
    if (args.pidfile !== undefined) Deno.writeTextFileSync(args.pidfile, `${Deno.pid}\n`);
  } catch (e) {
    const msg = e instanceof DaemonUsageError
      ? e.message
      : args.pidfile !== undefined
      ? `Cannot write pid file ${args.pidfile}: ${(e as Error).message}`
      : (e as Error).message;
    console.error(`${prog}: ${msg}`);
    ready(`error: ${prog}: ${msg}`);
    await daemon.stop();
    return 1;
  }
  const signalled = Promise.withResolvers<string>();
  const onSignal = (name: string) => () => signalled.resolve(name);
  const sigint = onSignal("SIGINT"), sigterm = onSignal("SIGTERM");
  Deno.addSignalListener("SIGINT", sigint);
  Deno.addSignalListener("SIGTERM", sigterm);
  log(prog, `serving ${daemon.exports.size + daemon.nbdExports.size} export(s)`);
  releaseExecutablePages();
  ready("ready");
  const end = await Promise.race([
    signalled.promise,
    daemon.quitRequested.then(() => "quit"),
    daemon.failed.then((e) => {
      log(prog, `fatal: ${e.message}`);
      return "failure";
    }),
  ]);
  log(prog, `${end}: stopping (waiting for in-flight requests)`);
  await daemon.stop();
  Deno.removeSignalListener("SIGINT", sigint);
  Deno.removeSignalListener("SIGTERM", sigterm);
  if (args.pidfile !== undefined) {
    try {
      Deno.removeSync(args.pidfile);
    } catch { /* gone */ }
  }
  log(prog, "stopped");
  return end === "failure" ? 1 : 0;
}

/**
 * `--daemonize`: runs this program again, detached, with stdout as a
 * readiness pipe and stderr to /dev/null (as qsd's daemonized child); waits
 * for its first line.
 */
async function daemonize(argv: string[], prog: string): Promise<number> {
  if (!Deno.mainModule.startsWith("file:")) {
    console.error(`${prog}: --daemonize needs the program run from its module file`);
    return 1;
  }
  const cmd = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      HOST_V8_FLAGS_ARG,
      Deno.mainModule,
      ...argv,
    ],
    env: { [DAEMONIZED_ENV]: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "null",
    detached: true,
  });
  const child = cmd.spawn();
  const reader = child.stdout.getReader();
  const dec = new TextDecoder();
  let text = "";
  while (!text.includes("\n")) {
    const r = await reader.read();
    if (r.done) break;
    text += dec.decode(r.value, { stream: true });
  }
  reader.releaseLock();
  await child.stdout.cancel().catch(() => {});
  const line = text.split("\n")[0];
  if (line === "ready") {
    child.unref();
    return 0;
  }
  console.error(line.startsWith("error: ") ? line.slice(7) : `${prog}: the daemon exited early`);
  await child.status;
  return 1;
}
