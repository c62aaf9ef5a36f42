/**
 * qemu-storage-daemon's command line: `--blockdev`, `--object`, `--export`,
 * `--chardev`, `--monitor` (keyval strings, or JSON objects where QEMU takes
 * them), `--pidfile`, `--daemonize`, `-h`/`--help`, `-V`/`--version`. The
 * options are checked here (syntax and schema) and applied in order by the
 * daemon, as qsd does (an export names a node given before it). Errors read
 * as qsd's: `PROG: --blockdev driver=nope: Parameter 'driver' does not
 * accept value 'nope'`, `PROG: unrecognized option '--foo'`.
 *
 * @module
 */

import { type BlockExportSpec, parseExport } from "./block_export.ts";
import { type ObjectSpec, parseObjectSpec } from "./object_spec.ts";
import { type NbdExportSpec, parseNbdExport, parseNbdServer } from "../nbd/nbd_block_export.ts";
import type { NbdServerSpec } from "../nbd/nbd_server.ts";
import { KeyvalError, parseKeyval } from "./keyval.ts";
import { DaemonError, type OptionObject, QapiInput } from "./qapi_input.ts";
import { DAEMON_FLAGS, DAEMON_OPTIONS_WITH_VALUE } from "./daemon_option_names.ts";
import type { ChardevSpec } from "./storage_daemon.ts";

/** One option, parsed, with the text it came from (for error messages). */
export type DaemonOption =
  & { text: string }
  & (
    | { kind: "blockdev"; obj: OptionObject; keyval: boolean }
    | { kind: "object"; spec: ObjectSpec }
    | { kind: "export"; spec: BlockExportSpec }
    | { kind: "chardev"; spec: ChardevSpec }
    | { kind: "monitor"; chardev: string; pretty: boolean }
    | { kind: "metrics"; hostname: string; port: number }
    | { kind: "nbd-server"; spec: NbdServerSpec }
    | { kind: "nbd-export"; spec: NbdExportSpec }
  );

/** The whole command line. */
export interface DaemonArgs {
  options: DaemonOption[];
  pidfile?: string;
  daemonize: boolean;
  help: boolean;
  version: boolean;
}

/**
 * A command-line error; `message` is the whole line qsd would print after
 * its program name (`--export ...: Parameter 'id' is missing`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { DaemonUsageError, parseDaemonArgs } from "./daemon_args.ts";
 * assert.throws(() => parseDaemonArgs(["--foo"]), (e) =>
 *   e instanceof DaemonUsageError && e.message === "unrecognized option '--foo'");
 * ```
 */
export class DaemonUsageError extends Error {
  readonly kind = "usage";
  constructor(message: string) {
    super(message);
    this.name = "DaemonUsageError";
  }
}

/** The `--help` text of the qsd syntax. */
export const DAEMON_USAGE = `Usage: deno task host -- [options]
qemu-storage-daemon's command line (the options this daemon supports):

  -h, --help             this text
  -V, --version          the QEMU version whose interface this follows
  --blockdev [driver=]<driver>[,node-name=<N>][,read-only=on|off][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off][,detect-zeroes=on|off|unmap]
                         driver=file (filename, aio=threads|native|io_uring),
                         null-co / null-aio (size, read-zeroes),
                         raw (file, offset, size), qcow2 (file, l2-cache-size),
                         throttle (throttle-group, file); or a JSON object
  --chardev socket,id=<id>,path=<path>,server=on[,wait=on|off]
                         a Unix socket for a monitor
  --export type=vhost-user-blk,id=<id>,node-name=<node>,addr.type=unix,addr.path=<path>
           [,writable=on|off][,writethrough=on|off][,num-queues=<n>]
           [,logical-block-size=<n>][,iothread=<id>]
                         a vhost-user-blk export (addr.type=fd,addr.str=<fd>: an
                         inherited listening socket); or a JSON object
  --export type=nbd,id=<id>,node-name=<node>[,name=<name>][,description=<text>]
           [,writable=on|off][,iothread=<id>]
                         an NBD export on the --nbd-server (name: the node's by default)
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               | addr.type=unix,addr.path=<path> | addr.type=fd,addr.str=<fd>
               [,max-connections=<n>]
                         the NBD server that type=nbd exports are served on
  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                         a QMP monitor on a chardev
  --object iothread,id=<id>[,poll-max-ns=<ns>][,poll-grow=<n>][,poll-shrink=<n>]
           [,aio-max-batch=<n>]
                         an IOThread exports can run in; or a JSON object
  --object throttle-group,id=<id>[,x-iops-total=<n>][,x-bps-read-max=<n>]
           [,x-iops-write-max-length=<s>][,x-iops-size=<n>]...
                         I/O limits shared by the driver=throttle nodes naming
                         it (also as limits.iops-total=<n>...)
  --pidfile <path>       write the process id there (removed at exit)
  --metrics <addr>:<port>
                         serve Prometheus metrics at http://<addr>:<port>/metrics
                         (not a qemu-storage-daemon option; port 0: any free one)
  --daemonize            detach once every option is applied (the parent
                         exits 0 then, or 1 with the error)
`;

function keyvalOrJson(value: string, impliedKey?: string): { obj: OptionObject; keyval: boolean } {
  if (value.trimStart().startsWith("{")) {
    let obj: unknown;
    try {
      obj = JSON.parse(value);
    } catch (e) {
      throw new DaemonError(`JSON parse error, ${(e as Error).message}`);
    }
    if (typeof obj !== "object" || obj === null || Array.isArray(obj)) {
      throw new DaemonError("JSON value must be an object");
    }
    return { obj: obj as OptionObject, keyval: false };
  }
  try {
    return { obj: parseKeyval(value, impliedKey), keyval: true };
  } catch (e) {
    if (e instanceof KeyvalError) throw new DaemonError(e.message);
    throw e;
  }
}

/** `ADDR:PORT` (`[v6addr]:PORT` for IPv6). */
function parseHostPort(value: string): { hostname: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(value);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new DaemonError("expects ADDR:PORT (e.g. 127.0.0.1:9100)");
  return { hostname: m[1] ?? m[2], port };
}

function parseChardev(value: string): ChardevSpec {
  const { obj, keyval } = keyvalOrJson(value, "backend");
  const input = new QapiInput(obj, keyval);
  input.enum("backend", ["socket"] as const, true);
  const id = input.str("id", true);
  const path = input.str("path");
  if (path === undefined) throw new DaemonError("chardev: socket: 'path' is required here");
  const server = input.bool("server") ?? false;
  if (!server) throw new DaemonError("chardev: only server=on sockets are supported");
  const wait = input.bool("wait") ?? true;
  input.end();
  return { id, path, wait };
}

function parseMonitor(value: string): { chardev: string; pretty: boolean } {
  const { obj, keyval } = keyvalOrJson(value, "chardev");
  const input = new QapiInput(obj, keyval);
  const chardev = input.str("chardev", true);
  input.enum("mode", ["control"] as const);
  input.str("id");
  const pretty = input.bool("pretty") ?? false;
  input.end();
  return { chardev, pretty };
}

/**
 * Parses qemu-storage-daemon's argv (without the program name). Throws
 * {@link DaemonUsageError}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseDaemonArgs } from "./daemon_args.ts";
 * const a = parseDaemonArgs([
 *   "--blockdev", "driver=null-co,node-name=n0,size=1048576",
 *   "--object", "iothread,id=io0",
 *   "--export", "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=/tmp/e0.sock,iothread=io0",
 * ]);
 * assert.deepEqual(a.options.map((o) => o.kind), ["blockdev", "object", "export"]);
 * assert.throws(() => parseDaemonArgs(["--object", "iothread,id=io0,bogus=1"]),
 *   { message: "--object iothread,id=io0,bogus=1: Parameter 'bogus' is unexpected" });
 * ```
 */
export function parseDaemonArgs(argv: string[]): DaemonArgs {
  const out: DaemonArgs = { options: [], daemonize: false, help: false, version: false };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let value: string | undefined;
    const eq = arg.startsWith("--") ? arg.indexOf("=") : -1;
    if (eq > 0) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    if (!arg.startsWith("-") || arg === "-") {
      throw new DaemonUsageError(`${arg}: Unexpected argument`);
    }
    if (DAEMON_FLAGS.has(arg)) {
      if (value !== undefined) {
        throw new DaemonUsageError(`option '${arg}' doesn't allow an argument`);
      }
      if (arg === "--daemonize") out.daemonize = true;
      else if (arg === "--help" || arg === "-h") out.help = true;
      else out.version = true;
      continue;
    }
    if (!DAEMON_OPTIONS_WITH_VALUE.has(arg)) {
      throw new DaemonUsageError(
        arg.startsWith("--")
          ? `unrecognized option '${arg}'`
          : `invalid option -- '${arg.slice(1)}'`,
      );
    }
    if (value === undefined) {
      if (i + 1 >= argv.length) throw new DaemonUsageError(`option '${arg}' requires an argument`);
      value = argv[++i];
    }
    const text = `${arg} ${value}`;
    try {
      switch (arg) {
        case "--blockdev": {
          const { obj, keyval } = keyvalOrJson(value, "driver");
          out.options.push({ kind: "blockdev", obj, keyval, text });
          break;
        }
        case "--object": {
          const { obj, keyval } = keyvalOrJson(value, "qom-type");
          out.options.push({ kind: "object", spec: parseObjectSpec(obj, keyval), text });
          break;
        }
        case "--export": {
          const { obj, keyval } = keyvalOrJson(value, "type");
          if ((obj as Record<string, unknown>).type === "nbd") {
            out.options.push({ kind: "nbd-export", spec: parseNbdExport(obj, keyval), text });
          } else {
            out.options.push({ kind: "export", spec: parseExport(obj, keyval), text });
          }
          break;
        }
        case "--chardev":
          out.options.push({ kind: "chardev", spec: parseChardev(value), text });
          break;
        case "--monitor":
          out.options.push({ kind: "monitor", ...parseMonitor(value), text });
          break;
        case "--pidfile":
          out.pidfile = value;
          break;
        case "--metrics":
          out.options.push({ kind: "metrics", ...parseHostPort(value), text });
          break;
        case "--nbd-server": {
          const { obj, keyval } = keyvalOrJson(value);
          out.options.push({ kind: "nbd-server", spec: parseNbdServer(obj, keyval), text });
          break;
        }
        default: // --trace
          throw new DaemonError(`${arg} is not supported by this daemon`);
      }
    } catch (e) {
      if (e instanceof DaemonError) throw new DaemonUsageError(`${text}: ${e.message}`);
      throw e;
    }
  }
  return out;
}
