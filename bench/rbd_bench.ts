/**
 * Our daemon and qemu-storage-daemon serving the same Ceph RBD image, both
 * from the same command line (`--blockdev driver=rbd,... --object iothread
 * --export type=vhost-user-blk,...,iothread=iot0`), driven by blkgen: 4 KiB
 * random reads on one queue at QD1 and QD32, interrupt mode, median of
 * `--rounds` runs per point (the servers take turns within a round). The
 * cluster is the tests' one-monitor, one-OSD memstore cluster on this
 * machine (tests/harness/ceph_cluster.ts), so the OSD's own CPU time is in
 * every figure: on a 2-core machine the cluster, the server and blkgen share
 * the CPUs, and the comparison is of the two servers under the same load.
 * Run it under `flock /tmp/bench.lock`.
 *
 * Run: `deno run -A bench/rbd_bench.ts [--rounds 5] [--duration-ms 2000] [--qd 1,32]`
 *
 * @module
 */

import { benchArgs } from "./bench_args.ts";
import { buildBlkgen } from "./blkgen_build.ts";
import { measureRun, type RunSample } from "./compare_client.ts";
import { median } from "./compare_report.ts";
import type { BlkServer, ServerName } from "./compare_servers.ts";
import { CephCluster, REPO_ROOT, ServerProcess } from "../tests/harness/mod.ts";

const MiB = 1 << 20;

/**
 * The qemu-storage-daemon arguments both servers get.
 *
 * @example
 * ```ts ignore
 * import { rbdServerArgs } from "./rbd_bench.ts";
 * import { CephCluster } from "../tests/harness/mod.ts";
 * const cluster = await CephCluster.start();
 * console.log(rbdServerArgs(cluster, "bench", "/tmp/rbd.sock").join(" "));
 * await cluster.stop();
 * ```
 */
export function rbdServerArgs(cluster: CephCluster, image: string, socket: string): string[] {
  return [
    "--blockdev",
    `driver=rbd,node-name=disk0,pool=${cluster.pool},image=${image},conf=${cluster.conf}`,
    "--object",
    "iothread,id=iot0",
    "--export",
    `type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=${socket},` +
    `writable=on,num-queues=1,iothread=iot0`,
  ];
}

async function startServer(name: ServerName, args: string[], socket: string): Promise<BlkServer> {
  await Deno.remove(socket).catch(() => {});
  const proc = name === "ours"
    ? new ServerProcess(`${REPO_ROOT}/deno`, ["run", "-A", "dataplane/main.ts", ...args], {
      cwd: REPO_ROOT,
    })
    : new ServerProcess("qemu-storage-daemon", args);
  if (!await proc.waitForSocket(socket, 60_000)) {
    await proc.stop("SIGKILL", 5_000);
    throw new Error(`${name} did not create ${socket}: ${proc.stderr.trim() || "timeout"}`);
  }
  return {
    name,
    socket,
    pid: proc.pid,
    get exited() {
      return proc.exited;
    },
    get stderr() {
      return proc.stderr;
    },
    stop: async () => {
      await proc.stop("SIGTERM", 5_000);
    },
  };
}

if (import.meta.main) {
  const v = benchArgs(
    "rbd_bench",
    "usage: deno run -A bench/rbd_bench.ts [--rounds 5] [--duration-ms 2000] [--qd 1,32]",
    {
      rounds: { type: "string", default: "5" },
      "duration-ms": { type: "string", default: "2000" },
      qd: { type: "string", default: "1,32" },
    },
  );
  const exe = await buildBlkgen();
  const cluster = await CephCluster.start({ memstoreBytes: 768 * MiB });
  const samples = new Map<string, RunSample[]>();
  const qds = v.qd.split(",").map(Number);
  try {
    const image = `${cluster.pool}/bench`;
    await cluster.rbd("create", "--size", "256M", image);
    // Every object written, so reads reach the OSD's data rather than a missing object.
    await cluster.rbd(
      "bench",
      "--io-type",
      "write",
      "--io-size",
      "4M",
      "--io-pattern",
      "seq",
      "--io-total",
      "256M",
      image,
    );
    const socket = `${cluster.dir}/bench.sock`;
    const args = rbdServerArgs(cluster, "bench", socket);
    for (let r = 0; r < Number(v.rounds); r++) {
      for (const name of ["ours", "theirs"] as const) {
        const server = await startServer(name, args, socket);
        try {
          for (const qd of qds) {
            const s = await measureRun(exe, server, {
              pattern: "randread",
              queues: 1,
              qd,
              mode: "interrupt",
              durationMs: Number(v["duration-ms"]),
            });
            if ("error" in s) throw new Error(`${name} QD${qd}: ${s.error}`);
            const key = `${name} QD${qd}`;
            samples.set(key, [...(samples.get(key) ?? []), s]);
          }
        } finally {
          await server.stop();
        }
      }
    }
  } finally {
    await cluster.stop();
  }
  console.log(
    `rbd: our daemon vs qemu-storage-daemon on one rbd image (256 MiB, one-OSD memstore ` +
      `cluster on this machine), 4 KiB randread, 1 queue, interrupt mode, median of ` +
      `${v.rounds} x ${v["duration-ms"]} ms:`,
  );
  for (const qd of qds) {
    const row = (["ours", "theirs"] as const).map((name) => {
      const runs = samples.get(`${name} QD${qd}`) ?? [];
      const m = (f: (s: RunSample) => number) => median(runs.map(f));
      return `${name} ${(m((s) => s.iops) / 1000).toFixed(1)}k IOPS p50 ${
        m((s) => s.p50Us).toFixed(0)
      } us p99 ${m((s) => s.p99Us).toFixed(0)} us server ${
        m((s) => s.serverCpuUsPerIo).toFixed(1)
      } us/IO (others ${m((s) => s.otherCores).toFixed(2)} cores)`;
    });
    const ratio = median((samples.get(`ours QD${qd}`) ?? []).map((s) => s.iops)) /
      median((samples.get(`theirs QD${qd}`) ?? []).map((s) => s.iops));
    console.log(
      `  QD${String(qd).padEnd(3)} ${row.join("  |  ")}  ours/theirs ${ratio.toFixed(2)}`,
    );
  }
}
