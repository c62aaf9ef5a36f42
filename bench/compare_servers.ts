/**
 * The two vhost-user-blk servers `deno task compare` measures, behind one
 * interface: our host (`dataplane/main.ts`, run as its own `./deno` process)
 * and qemu-storage-daemon (through the test harness). Both export the same
 * backend with one IOThread, may be pinned to the same CPUs (`taskset`), and
 * both report the CPU time of their whole process (every thread): blkgen
 * reads it from the process CPU clock over its window.
 *
 * @module
 */

import { HOST_V8_FLAGS_ARG } from "../dataplane/mod.ts";
import {
  QemuStorageDaemon,
  type QsdBlockdev,
  REPO_ROOT,
  ServerProcess,
} from "../tests/harness/mod.ts";

/** The block backends the comparison runs on. */
export type BackendName = "null-co" | "native" | "io_uring";

/** Every backend, in the order the matrix runs them. */
export const BACKENDS: readonly BackendName[] = ["null-co", "native", "io_uring"];

/** Which of the two servers. */
export type ServerName = "ours" | "theirs";

/** What both servers export. */
export interface ServerConfig {
  backend: BackendName;
  /** Raw image for the file backends (cache=none, so on a file system with O_DIRECT). */
  image: string;
  /** Size of the null-co device in bytes. */
  nullSize: number;
  /** Virtqueues of the export. */
  queues: number;
  /** IOThreads of our host (qsd always runs its export in one IOThread). */
  iothreads: number;
  /** Unix socket path of the export. */
  socket: string;
  /** Pin every thread of the server to these CPUs (`taskset -c`, e.g. "0"); default not pinned. */
  cpus?: string;
  /** The image's format for the file backends (default raw). */
  format?: "raw" | "qcow2";
}

/** A started server. */
export interface BlkServer {
  readonly name: ServerName;
  readonly socket: string;
  /** The server process (for /proc/<pid>/stat). */
  readonly pid: number;
  /** True once the process has exited (crashed or stopped). */
  readonly exited: boolean;
  /** Everything the server wrote to stderr so far. */
  readonly stderr: string;
  /** Stops the server (SIGTERM, then SIGKILL). */
  stop(): Promise<void>;
}

/** Clock ticks per second of utime/stime in /proc (USER_HZ, 100 on Linux). */
const USER_HZ = 100;

/**
 * User plus system CPU time in ms of process `pid`, summed over all of its
 * threads, live and exited (fields 14 and 15 of proc(5) `/proc/<pid>/stat`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { processCpuMs } from "./compare_servers.ts";
 * assert(processCpuMs(Deno.pid) >= 0);
 * ```
 */
export function processCpuMs(pid: number): number {
  const f = Deno.readTextFileSync(`/proc/${pid}/stat`);
  // The command name (field 2) may contain spaces: count fields after its ')'.
  const rest = f.slice(f.lastIndexOf(")") + 2).split(" ");
  return ((Number(rest[11]) + Number(rest[12])) * 1000) / USER_HZ;
}

/** The command line of our host for `c` (arguments after `./deno`). */
export function ourHostArgs(c: ServerConfig): string[] {
  const image = c.backend === "null-co" ? `null-co:${c.nullSize}` : c.image;
  // The V8 flags of `deno task host`: what is measured is what users run.
  const args = ["run", "-A", HOST_V8_FLAGS_ARG, "dataplane/main.ts", "--image", image];
  args.push("--socket", c.socket);
  if (c.backend !== "null-co") args.push("--cache", "none", "--aio", c.backend);
  // blkgen asks for a ring of 512 entries at QD128 without INDIRECT (3 descriptors a request).
  args.push("--queues", String(c.queues), "--iothreads", String(c.iothreads));
  args.push("--queue-size", "1024");
  if (c.format === "qcow2") args.push("--format", "qcow2");
  return args;
}

/** The qsd block node for `c`; null-co reads leave the buffer alone, as our null-co does. */
export function theirBlockdev(c: ServerConfig): QsdBlockdev {
  if (c.backend === "null-co") return { driver: "null-co", size: c.nullSize, readZeroes: false };
  return { driver: "file", filename: c.image, cacheDirect: true, aio: c.backend, format: c.format };
}

/** Our host as a child process: `./deno run -A dataplane/main.ts ...`. */
class OurHost implements BlkServer {
  readonly name = "ours";
  readonly socket: string;
  readonly pid: number;
  #process: ServerProcess;

  constructor(socket: string, proc: ServerProcess) {
    this.socket = socket;
    this.#process = proc;
    // ./deno ends in `exec`, so this is the Deno process itself.
    this.pid = proc.pid;
  }

  get exited(): boolean {
    return this.#process.exited;
  }

  get stderr(): string {
    return this.#process.stderr;
  }

  async stop(): Promise<void> {
    try {
      await this.#process.stop("SIGTERM", 10_000);
    } finally {
      try {
        await Deno.remove(this.socket);
      } catch { /* the host removed it */ }
    }
  }
}

/** Starts our host for `c` and waits for its socket. */
export async function startOurs(c: ServerConfig): Promise<BlkServer> {
  try {
    await Deno.remove(c.socket);
  } catch { /* no stale socket */ }
  // taskset and ./deno both exec, so the pid is the Deno process itself.
  const proc = c.cpus === undefined
    ? new ServerProcess(`${REPO_ROOT}/deno`, ourHostArgs(c), { cwd: REPO_ROOT })
    : new ServerProcess("taskset", ["-c", c.cpus, `${REPO_ROOT}/deno`, ...ourHostArgs(c)], {
      cwd: REPO_ROOT,
    });
  const host = new OurHost(c.socket, proc);
  if (!await proc.waitForSocket(c.socket, 60_000)) {
    await host.stop();
    throw new Error(`our host did not create ${c.socket}: ${host.stderr.trim() || "timeout"}`);
  }
  return host;
}

/** Starts qemu-storage-daemon for `c` with its export in one IOThread. */
export async function startTheirs(c: ServerConfig): Promise<BlkServer> {
  const qsd = await QemuStorageDaemon.start({
    socket: c.socket,
    blockdev: theirBlockdev(c),
    numQueues: c.queues,
    iothread: true,
    cpus: c.cpus,
  });
  return {
    name: "theirs",
    socket: qsd.socket,
    pid: qsd.pid,
    get exited() {
      return qsd.exited;
    },
    get stderr() {
      return qsd.stderr;
    },
    stop: async () => {
      // qsd may not exit on SIGTERM after a front-end left with requests in flight.
      await qsd.stop(1_000);
    },
  };
}

/** Starts `name` for `c`. */
export function startServer(name: ServerName, c: ServerConfig): Promise<BlkServer> {
  return name === "ours" ? startOurs(c) : startTheirs(c);
}
