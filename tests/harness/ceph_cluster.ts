/**
 * A throw-away single-node Ceph cluster for tests and benchmarks: one monitor
 * and one OSD on memstore (RAM, no disk), bound to 127.0.0.1 only, with
 * authentication off, pool size one and a fresh pool initialised for RBD. It
 * lives in a scratch directory (configuration, monitor store, logs, admin
 * sockets) and comes up in about 7 s. The `ceph` and `rbd` command-line tools
 * and QEMU's rbd driver reach it through {@link CephCluster.conf}.
 *
 * @module
 */

import { makeScratchDir } from "./scratch_dir.ts";

/**
 * Why a cluster cannot be started here (a missing binary), or null.
 *
 * @example
 * ```ts
 * import { cephUnavailable } from "./ceph_cluster.ts";
 * const why = cephUnavailable();
 * if (why) console.warn(`SKIPPING: ${why}`);
 * ```
 */
export function cephUnavailable(): string | null {
  for (const bin of ["ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool"]) {
    const found = ["/usr/bin", "/usr/sbin", "/usr/local/bin"].some((d) => {
      try {
        return Deno.statSync(`${d}/${bin}`).isFile;
      } catch {
        return false;
      }
    });
    if (!found) return `${bin} is not installed (tools/setup.sh --test installs Ceph)`;
  }
  return null;
}

/** Options of {@link CephCluster.start}. */
export interface CephClusterOptions {
  /** Pool to create and `rbd pool init` (default "rbd"). */
  pool?: string;
  /** Bytes of RAM the memstore OSD may hold (default 512 MiB). */
  memstoreBytes?: number;
}

/**
 * A running one-monitor, one-OSD cluster. Always {@link CephCluster.stop} it.
 *
 * @example
 * ```ts ignore
 * import { CephCluster } from "./ceph_cluster.ts";
 * const cluster = await CephCluster.start();
 * try {
 *   await cluster.rbd("create", "--size", "4M", `${cluster.pool}/img`);
 * } finally {
 *   await cluster.stop();
 * }
 * ```
 */
export class CephCluster {
  /** Scratch directory holding everything of the cluster. */
  readonly dir: string;
  /** Path of the cluster's ceph.conf (give it to librados, rbd, qemu-img). */
  readonly conf: string;
  /** The pool created for RBD images. */
  readonly pool: string;
  /** Monitor address (127.0.0.1:port, msgr2). */
  readonly monAddr: string;

  private constructor(dir: string, pool: string, monAddr: string) {
    this.dir = dir;
    this.conf = `${dir}/ceph.conf`;
    this.pool = pool;
    this.monAddr = monAddr;
  }

  /** Brings up the monitor and the OSD, creates and initialises the pool. */
  static async start(opts: CephClusterOptions = {}): Promise<CephCluster> {
    const why = cephUnavailable();
    if (why) throw new Error(why);
    const dir = await makeScratchDir("ceph");
    const port = freePort();
    const c = new CephCluster(dir, opts.pool ?? "rbd", `127.0.0.1:${port}`);
    try {
      await c.#bringUp(opts.memstoreBytes ?? 512 << 20);
    } catch (e) {
      await c.stop();
      throw e;
    }
    return c;
  }

  async #bringUp(memstoreBytes: number): Promise<void> {
    const dir = this.dir, fsid = crypto.randomUUID();
    for (const d of ["mon", "osd", "run"]) await Deno.mkdir(`${dir}/${d}`);
    await Deno.writeTextFile(
      this.conf,
      [
        "[global]",
        `fsid = ${fsid}`,
        `mon host = v2:${this.monAddr}`,
        "public addr = 127.0.0.1",
        "cluster addr = 127.0.0.1", // the OSD binds nothing but loopback
        "ms bind msgr1 = false",
        "auth cluster required = none",
        "auth service required = none",
        "auth client required = none",
        "mon allow pool size one = true",
        "mon allow pool delete = true",
        "mon warn on pool no redundancy = false",
        "osd pool default size = 1",
        "osd pool default min size = 1",
        "osd pool default pg num = 8",
        "osd pool default pgp num = 8",
        "osd crush chooseleaf type = 0",
        "osd objectstore = memstore",
        `memstore device bytes = ${memstoreBytes}`,
        "client mount timeout = 20",
        // A stalled cluster fails the tests' requests (ETIMEDOUT) instead of hanging them.
        "rados osd op timeout = 30",
        "rados mon op timeout = 30",
        `mon data = ${dir}/mon`,
        `osd data = ${dir}/osd`,
        `run dir = ${dir}/run`,
        `admin socket = ${dir}/run/$name.asok`,
        `pid file = ${dir}/run/$name.pid`,
        `log file = ${dir}/$name.log`,
        `crash dir = ${dir}/crash`,
        `keyring = ${dir}/keyring`,
        "",
      ].join("\n"),
    );
    await run("monmaptool", [
      "--create",
      "--addv",
      "a",
      `[v2:${this.monAddr}]`,
      "--fsid",
      fsid,
      `${dir}/monmap`,
    ]);
    await run("ceph-mon", ["--mkfs", "-i", "a", "-c", this.conf, "--monmap", `${dir}/monmap`]);
    await run("ceph-mon", ["-i", "a", "-c", this.conf]); // daemonises
    await this.ceph("osd", "create");
    await run("ceph-osd", ["-i", "0", "--mkfs", "-c", this.conf]);
    await run("ceph-osd", ["-i", "0", "-c", this.conf]); // daemonises
    await this.ceph("osd", "pool", "create", this.pool, "8");
    await this.rbd("pool", "init", this.pool);
  }

  /** Runs the `ceph` CLI against this cluster; returns stdout, throws with stderr. */
  ceph(...args: string[]): Promise<string> {
    return run("ceph", ["-c", this.conf, "--connect-timeout", "20", ...args]);
  }

  /** Runs the `rbd` CLI against this cluster; returns stdout, throws with stderr. */
  rbd(...args: string[]): Promise<string> {
    return run("rbd", ["-c", this.conf, ...args]);
  }

  /** QEMU's legacy filename of `image` in this cluster's pool (`rbd:pool/image:conf=...`). */
  qemuFilename(image: string): string {
    return `rbd:${this.pool}/${image}:conf=${this.conf}`;
  }

  /** Kills the daemons (by their pid files) and removes the directory. */
  async stop(): Promise<void> {
    for (const name of ["osd.0", "mon.a"]) {
      let pid = 0;
      try {
        pid = Number((await Deno.readTextFile(`${this.dir}/run/${name}.pid`)).trim());
      } catch { /* never started */ }
      if (pid > 0) await killAndWait(pid);
    }
    await Deno.remove(this.dir, { recursive: true }).catch(() => {});
  }
}

/** A TCP port that was free a moment ago on 127.0.0.1. */
function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

async function run(cmd: string, args: string[]): Promise<string> {
  const out = await new Deno.Command(cmd, { args, stdin: "null", stdout: "piped", stderr: "piped" })
    .output();
  const dec = new TextDecoder();
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")} failed (${out.code}): ${dec.decode(out.stderr)}`);
  }
  return dec.decode(out.stdout);
}

async function killAndWait(pid: number): Promise<void> {
  const alive = () => {
    try {
      return !Deno.readTextFileSync(`/proc/${pid}/stat`).split(") ")[1]?.startsWith("Z");
    } catch {
      return false;
    }
  };
  try {
    Deno.kill(pid, "SIGTERM");
  } catch {
    return;
  }
  for (let i = 0; i < 100 && alive(); i++) await new Promise((r) => setTimeout(r, 50));
  if (alive()) {
    try {
      Deno.kill(pid, "SIGKILL");
    } catch { /* gone */ }
  }
}
