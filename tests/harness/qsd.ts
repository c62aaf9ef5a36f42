/**
 * Starts and stops `qemu-storage-daemon` with a vhost-user-blk export, the
 * reference backend that end-to-end tests prove the harness against and that
 * benchmarks compare the dataplane host with.
 *
 * @module
 */

import { ServerProcess } from "./server_process.ts";

/** The block node qsd exports: a raw file or a null device. */
export type QsdBlockdev =
  | {
    driver: "file";
    filename: string;
    /** cache.direct (O_DIRECT); default true. aio "native" requires it. */
    cacheDirect?: boolean;
    /** default "threads". */
    aio?: "threads" | "native" | "io_uring";
    /** default "unmap" (guest discards punch holes in the file). */
    discard?: "unmap" | "ignore";
    /** The image format: "qcow2" puts a qcow2 node (disk0) over the file node (default "raw"). */
    format?: "raw" | "qcow2";
  }
  | {
    driver: "null-co";
    /** Size in bytes. */
    size: number;
    /** Reads return zeros (default true); off makes reads cost nothing. */
    readZeroes?: boolean;
  };

/** How to start qemu-storage-daemon. */
export interface QsdOptions {
  /** Unix socket path of the vhost-user-blk export (a stale file there is removed). */
  socket: string;
  blockdev: QsdBlockdev;
  /** Export num-queues (default 1). */
  numQueues?: number;
  /** Export logical-block-size (default 512). */
  logicalBlockSize?: number;
  /** Export writable (default true). */
  writable?: boolean;
  /** Run the export in its own IOThread (as a guest-facing production setup would). */
  iothread?: boolean;
  /** qemu-storage-daemon binary (default from PATH). */
  binary?: string;
  /** Pin every qsd thread to these CPUs (`taskset -c CPUS`, e.g. "0"); default not pinned. */
  cpus?: string;
  /** Give up if the socket has not appeared after this long (default 10 s). */
  startTimeoutMs?: number;
}

function blockdevArgs(b: QsdBlockdev): string {
  if (b.driver === "null-co") {
    return `driver=null-co,node-name=disk0,size=${b.size},read-zeroes=${
      (b.readZeroes ?? true) ? "on" : "off"
    }`;
  }
  const direct = b.cacheDirect ?? true;
  const aio = b.aio ?? "threads";
  if (aio === "native" && !direct) {
    throw new RangeError("qsd: aio=native needs cacheDirect (cache.direct=on)");
  }
  if (/[,=]/.test(b.filename)) {
    throw new RangeError(`qsd: filename ${b.filename} contains ',' or '='`);
  }
  const node = b.format === "qcow2" ? "disk0-file" : "disk0";
  return `driver=file,node-name=${node},filename=${b.filename},cache.direct=${
    direct ? "on" : "off"
  },aio=${aio},discard=${b.discard ?? "unmap"}`;
}

/**
 * The qemu-storage-daemon arguments for `opts`.
 *
 * @example
 * ```ts
 * import { qsdArgs } from "./qsd.ts";
 * const args = qsdArgs({ socket: "/tmp/s.sock", blockdev: { driver: "null-co", size: 1 << 20 } });
 * if (!args.includes("driver=null-co,node-name=disk0,size=1048576,read-zeroes=on")) {
 *   throw new Error(args.join(" "));
 * }
 * ```
 */
export function qsdArgs(opts: QsdOptions): string[] {
  const args = ["--blockdev", blockdevArgs(opts.blockdev)];
  if (opts.blockdev.driver === "file" && opts.blockdev.format === "qcow2") {
    args.push("--blockdev", "driver=qcow2,node-name=disk0,file=disk0-file");
  }
  let exp = `type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=${opts.socket}` +
    `,writable=${(opts.writable ?? true) ? "on" : "off"},num-queues=${opts.numQueues ?? 1}`;
  if (opts.logicalBlockSize !== undefined) exp += `,logical-block-size=${opts.logicalBlockSize}`;
  if (opts.iothread) {
    args.push("--object", "iothread,id=iot0");
    exp += ",iothread=iot0";
  }
  args.push("--export", exp);
  return args;
}

/**
 * A running qemu-storage-daemon. Start it with {@link QemuStorageDaemon.start};
 * always {@link QemuStorageDaemon.stop} it (also on test failure).
 *
 * @example
 * ```ts
 * import { QemuStorageDaemon } from "./qsd.ts";
 * const dir = Deno.makeTempDirSync();
 * const socket = `${dir}/vhost.sock`;
 * const qsd = await QemuStorageDaemon.start({
 *   socket,
 *   blockdev: { driver: "null-co", size: 64 << 20 },
 * });
 * if (!Deno.lstatSync(socket).isSocket) throw new Error("no socket");
 * await qsd.stop();
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export class QemuStorageDaemon {
  readonly socket: string;
  readonly pid: number;
  #process: ServerProcess;

  private constructor(socket: string, proc: ServerProcess) {
    this.socket = socket;
    this.#process = proc;
    this.pid = proc.pid;
  }

  /** Everything qsd wrote to stderr so far (errors, warnings). */
  get stderr(): string {
    return this.#process.stderr;
  }

  /** True once the process has exited. */
  get exited(): boolean {
    return this.#process.exited;
  }

  /**
   * Spawns qsd and resolves once its export socket exists. Throws an Error
   * with qsd's stderr if it exits first or the socket does not appear in time,
   * and one naming the install step if the binary is missing.
   */
  static async start(opts: QsdOptions): Promise<QemuStorageDaemon> {
    try {
      await Deno.remove(opts.socket);
    } catch { /* no stale socket */ }
    const binary = opts.binary ?? "qemu-storage-daemon";
    let proc: ServerProcess;
    try {
      // taskset execs qsd, so the pid (for /proc/<pid>/stat) is qsd's own.
      proc = opts.cpus === undefined
        ? new ServerProcess(binary, qsdArgs(opts))
        : new ServerProcess("taskset", ["-c", opts.cpus, binary, ...qsdArgs(opts)]);
    } catch (e) {
      // A test that needs the reference must fail with the fix, not a bare ENOENT.
      if (!(e instanceof Deno.errors.NotFound)) throw e;
      throw new Error(
        `${binary} is missing: install QEMU with tools/setup.sh --test (Debian: qemu-system-common)`,
        { cause: e },
      );
    }
    const qsd = new QemuStorageDaemon(opts.socket, proc);
    if (!await proc.waitForSocket(opts.socket, opts.startTimeoutMs ?? 10_000)) {
      await qsd.stop();
      throw new Error(
        `qemu-storage-daemon did not create ${opts.socket}: ${qsd.stderr.trim() || "timeout"}`,
      );
    }
    return qsd;
  }

  /**
   * SIGTERM, then SIGKILL if qsd has not exited within `graceMs`; removes the
   * socket. Returns the exit status. Safe to call twice.
   */
  async stop(graceMs = 5_000): Promise<Deno.CommandStatus> {
    return await this.#end("SIGTERM", graceMs);
  }

  /**
   * SIGKILL and wait; removes the socket. For tests whose front-end may have
   * left requests in flight, after which qsd can hang on SIGTERM.
   */
  async kill(): Promise<Deno.CommandStatus> {
    return await this.#end("SIGKILL", 5_000);
  }

  /** Sends `signal` to qsd without waiting for anything (SIGSTOP: it stops answering). */
  signal(signal: Deno.Signal): void {
    this.#process.kill(signal);
  }

  async #end(signal: Deno.Signal, graceMs: number): Promise<Deno.CommandStatus> {
    try {
      return await this.#process.stop(signal, graceMs);
    } finally {
      try {
        await Deno.remove(this.socket);
      } catch { /* qsd removed it */ }
    }
  }
}
