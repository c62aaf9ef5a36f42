/**
 * Our NBD client against qemu-storage-daemon's, both as the block node of a
 * vhost-user-blk export and both clients of the same qemu-nbd export over a
 * Unix socket (qemu-nbd serving null-co through --image-opts, so the disk is
 * out of the picture and the NBD path is what is measured). blkgen (the C
 * load generator, docs/blkgen.md) drives each export with 4 KiB randread at
 * QD1 and QD32 in interrupt mode; the rounds alternate between the two
 * servers and the report gives the median of each point, the range of IOPS
 * over the rounds, and how many cores everything else kept busy meanwhile
 * (qemu-nbd included; a loaded machine moves these figures a lot).
 *
 * Run under the benchmark lock: `flock /tmp/bench.lock ./deno run -A
 * bench/nbd_bench.ts [--rounds 5] [--duration-ms 1000] [--qd 1,32]`
 *
 * @module
 */

import { benchArgs } from "./bench_args.ts";
import { buildBlkgen } from "./blkgen_build.ts";
import { measureRun, type RunSample } from "./compare_client.ts";
import { median } from "./compare_report.ts";
import type { BlkServer, ServerName } from "./compare_servers.ts";
import { makeScratchDir, REPO_ROOT, ServerProcess } from "../tests/harness/mod.ts";

function wrap(name: ServerName, socket: string, proc: ServerProcess): BlkServer {
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
    async stop() {
      await proc.stop("SIGTERM", 5_000);
    },
  };
}

async function started(proc: ServerProcess, socket: string, what: string): Promise<void> {
  if (!await proc.waitForSocket(socket, 60_000)) {
    await proc.stop("SIGKILL", 1_000);
    throw new Error(`${what} did not create ${socket}: ${proc.stderr.trim()}`);
  }
}

if (import.meta.main) {
  const v = benchArgs(
    "nbd_bench",
    "usage: deno run -A bench/nbd_bench.ts [--rounds 5] [--duration-ms 1000] [--qd 1,32]",
    {
      rounds: { type: "string", default: "5" },
      "duration-ms": { type: "string", default: "1000" },
      qd: { type: "string", default: "1,32" },
    },
  );
  const exe = await buildBlkgen();
  const dir = await makeScratchDir("nbd-bench");
  const nbdSock = `${dir}/nbd.sock`;
  const procs: ServerProcess[] = [];
  try {
    const nbd = new ServerProcess("qemu-nbd", [
      "--image-opts",
      "driver=null-co,size=1G",
      "-x",
      "disk",
      "-t",
      "-e",
      "4",
      "-k",
      nbdSock,
    ]);
    procs.push(nbd);
    await started(nbd, nbdSock, "qemu-nbd");
    const ours = new ServerProcess(`${REPO_ROOT}/deno`, [
      "run",
      "-A",
      "dataplane/main.ts",
      "--image",
      `nbd+unix:///disk?socket=${nbdSock}`,
      "--socket",
      `${dir}/ours.sock`,
      "--queue-size",
      "1024",
    ], { cwd: REPO_ROOT });
    procs.push(ours);
    await started(ours, `${dir}/ours.sock`, "our host");
    const qsd = new ServerProcess("qemu-storage-daemon", [
      "--blockdev",
      `driver=nbd,node-name=disk0,server.type=unix,server.path=${nbdSock},export=disk`,
      "--object",
      "iothread,id=io0",
      "--export",
      `type=vhost-user-blk,id=e0,node-name=disk0,addr.type=unix,addr.path=${dir}/qsd.sock,` +
      "iothread=io0,num-queues=1,writable=on",
    ]);
    procs.push(qsd);
    await started(qsd, `${dir}/qsd.sock`, "qemu-storage-daemon");
    const servers = [
      wrap("ours", `${dir}/ours.sock`, ours),
      wrap("theirs", `${dir}/qsd.sock`, qsd),
    ];
    const rounds = Number(v.rounds), durationMs = Number(v["duration-ms"]);
    const rows: string[] = [];
    for (const qd of v.qd.split(",").map(Number)) {
      const runs = new Map<ServerName, RunSample[]>([["ours", []], ["theirs", []]]);
      for (let r = 0; r < rounds; r++) {
        for (const s of servers) {
          const out = await measureRun(exe, s, {
            pattern: "randread",
            queues: 1,
            qd,
            durationMs,
            mode: "interrupt",
          });
          if ("error" in out) throw new Error(`${s.name} QD${qd}: ${out.error}`);
          runs.get(s.name)!.push(out);
        }
      }
      const m = (name: ServerName, f: (s: RunSample) => number) => median(runs.get(name)!.map(f));
      const ratio = m("ours", (s) => s.iops) / m("theirs", (s) => s.iops);
      for (const name of ["ours", "theirs"] as const) {
        const iops = runs.get(name)!.map((s) => s.iops / 1000);
        rows.push(
          `| QD${qd} | ${name === "ours" ? "our host" : "qemu-storage-daemon"} | ${
            (m(name, (s) => s.iops) / 1000).toFixed(1)
          }k (${Math.min(...iops).toFixed(1)}-${Math.max(...iops).toFixed(1)}k) | ${
            m(name, (s) => s.p50Us).toFixed(0)
          } | ${m(name, (s) => s.p99Us).toFixed(0)} | ${
            m(name, (s) => s.serverCpuUsPerIo).toFixed(1)
          } | ${m(name, (s) => s.otherCores).toFixed(2)} | ${
            name === "ours" ? ratio.toFixed(2) + "x" : ""
          } |`,
        );
      }
      console.error(`QD${qd} done`);
    }
    console.log(
      `4 KiB randread, 1 queue, blkgen interrupt mode, ${rounds} rounds x ${durationMs} ms, medians`,
    );
    console.log(
      "| QD | NBD client | IOPS (range) | p50 us | p99 us | server CPU us/IO | qemu-nbd + rest (cores) | ours/qsd |",
    );
    console.log("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (const r of rows) console.log(r);
  } finally {
    for (const p of procs.reverse()) await p.stop("SIGTERM", 5_000).catch(() => {});
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}
