/**
 * `deno task host -- --image disk.img --socket /path.sock [options]`: serve a
 * disk image to a VM over vhost-user-blk. With qemu-storage-daemon's options
 * (`--blockdev`, `--export`, `--object`, `--chardev`, `--monitor`, ...) it
 * runs the multi-export daemon instead (dataplane/daemon/daemon_main.ts,
 * exit status 1 on any error, as qsd). (QEMU `vhost-user-blk-pci`,
 * cloud-hypervisor `--disk vhost_user=on`). Logs one line per event and per
 * connection; on SIGINT/SIGTERM it stops accepting, lets in-flight requests
 * finish, closes the image and prints the counters; on SIGUSR1 it prints the
 * counters and each running ring's indexes and carries on. If an IOThread's
 * event loop dies (a bug) it logs why and exits 1. Exit status: 0 after a
 * clean stop, 1 on a runtime error, 2 on a usage error.
 *
 * @module
 */

import { releaseExecutablePages } from "../sys/mod.ts";
import { describeNbdServer } from "../block/mod.ts";
import { formatStats, VhostUserBlkHost } from "./host.ts";
import { HOST_USAGE, type HostOptions, parseHostArgs, UsageError } from "./host_options.ts";
import { DAEMON_OPTION_NAMES } from "./daemon/daemon_option_names.ts";
import { taskArgs } from "./task_args.ts";

/**
 * Whether `args` are qemu-storage-daemon's syntax (`--blockdev`, `--export`,
 * `--object`, ...) rather than the short options: any of its option names
 * other than the shared `-h`/`--help` selects it.
 */
function isDaemonSyntax(args: string[]): boolean {
  return args.some((a) => {
    const name = a.startsWith("--") && a.includes("=") ? a.slice(0, a.indexOf("=")) : a;
    return DAEMON_OPTION_NAMES.has(name) && name !== "-h" && name !== "--help";
  });
}

function log(line: string): void {
  const t = new Date().toISOString().slice(11, 23);
  console.error(`${t} dataplane: ${line}`);
}

function describe(o: HostOptions, host: VhostUserBlkHost): string {
  const b = o.block;
  const image = b.driver === "file"
    ? b.filename
    : b.driver === "nbd"
    ? `nbd export '${b.exportName}' at ${describeNbdServer(b.server!)}`
    : `${b.driver}:${b.size}`;
  const gib = (host.image.length / 2 ** 30).toFixed(2);
  return `serving ${image} (${gib} GiB, ${b.format}, cache=${b.cache}, aio=${b.aio}` +
    `${b.readOnly ? ", read-only" : ""}) on ${o.socket}: ${o.queues} queue(s) over ` +
    `${o.iothreads} IOThread(s), logical block ${o.logicalBlockSize}, serial ${
      JSON.stringify(o.serial)
    }`;
}

/** Runs the host until a signal; returns the exit status. */
export async function main(args: string[]): Promise<number> {
  if (isDaemonSyntax(args)) {
    // Only the daemon's syntax compiles its parser, QMP and the rest.
    const { daemonMain } = await import("./daemon/daemon_main.ts");
    return await daemonMain(args);
  }
  let opts: HostOptions;
  try {
    opts = parseHostArgs(args);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`dataplane host: ${e.message}\nTry --help.`);
    return 2;
  }
  if (opts.help) {
    console.log(HOST_USAGE);
    return 0;
  }
  if (opts.block.driver === "file") {
    try {
      const st = Deno.statSync(opts.block.filename!);
      if (st.isDirectory) throw new Error("is a directory");
    } catch (e) {
      const why = e instanceof Deno.errors.NotFound ? "no such file" : (e as Error).message;
      console.error(`dataplane host: image ${opts.block.filename}: ${why}`);
      return 1;
    }
  }
  let host: VhostUserBlkHost;
  try {
    host = await VhostUserBlkHost.start(opts, log);
  } catch (e) {
    console.error(`dataplane host: ${(e as Error).message}`);
    return 1;
  }
  const signalled = Promise.withResolvers<string>();
  const onSignal = (name: string) => () => signalled.resolve(name);
  const sigint = onSignal("SIGINT"), sigterm = onSignal("SIGTERM");
  Deno.addSignalListener("SIGINT", sigint);
  Deno.addSignalListener("SIGTERM", sigterm);
  // SIGUSR1: print the counters and every running ring's state (a stuck
  // IOThread shows as no answer).
  const sigusr1 = () => {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const stuck = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error("an IOThread did not answer in 2 s")), 2000);
    });
    Promise.race([host.stats(), stuck]).then(
      (s) => log(`SIGUSR1: stats\n${formatStats(s)}`),
      (e) => log(`SIGUSR1: no stats: ${(e as Error).message}`),
    ).finally(() => clearTimeout(timer));
  };
  Deno.addSignalListener("SIGUSR1", sigusr1);
  // "serving" only once every handler is in place: whoever waits for it may
  // signal at once, and a signal without a listener would kill the process.
  log(describe(opts, host));
  // Start-up (Deno's snapshot, module loading, the IOThreads' compiles) maps
  // ~40 MB of the deno binary that serving does not use again: give those
  // page mappings back (they stay in the page cache; used ones fault in).
  const released = releaseExecutablePages();
  log(`released ${(released.residentKiB / 1024).toFixed(1)} MiB of start-up executable pages`);
  const end = await Promise.race([
    signalled.promise.then((sig) => ({ sig, error: null })),
    host.failed.then((error) => ({ sig: null, error })),
  ]);
  Deno.removeSignalListener("SIGUSR1", sigusr1);
  if (end.error !== null) {
    // An IOThread's loop died (a bug): its queues are dead. Say so and exit
    // rather than leave the guest waiting on a disk that never answers.
    log(`fatal: ${end.error.message}`);
    await host.server.close().catch(() => {});
    Deno.removeSignalListener("SIGINT", sigint);
    Deno.removeSignalListener("SIGTERM", sigterm);
    return 1;
  }
  log(`${end.sig}: stopping (waiting for in-flight requests)`);
  const stats = await host.stop();
  Deno.removeSignalListener("SIGINT", sigint);
  Deno.removeSignalListener("SIGTERM", sigterm);
  log(`stopped cleanly\n${formatStats(stats)}`);
  return 0;
}

if (import.meta.main) Deno.exit(await main(taskArgs(Deno.args)));
