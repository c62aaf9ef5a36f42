/**
 * Allocating 4 KiB random writes into a fresh qcow2 image (issue 14): our
 * host against qemu-storage-daemon's qcow2 driver, both driven by blkgen
 * (bench/c/blkgen) over vhost-user, each server in one IOThread, cache=none
 * with io_uring, on a non-tmpfs directory. Every round makes a new empty
 * image (`qemu-img create -f qcow2`, 64 KiB clusters, lazy_refcounts as
 * given) for each server, alternating ours and theirs, so each run starts
 * with every cluster unallocated; the first writes into a cluster allocate
 * it (copy on write of the rest of the cluster), later ones are in place.
 * Prints each run and the medians; afterwards `qemu-img check` of the last
 * images (ours must be clean, leaks counted).
 *
 * Run: flock /tmp/bench.lock ./deno run -A bench/qcow2_alloc_bench.ts
 *   [--qd 32] [--rounds 5] [--duration-ms 2000] [--size-mib 4096] [--lazy-refcounts off]
 *   [--queues 1] (ours: an IOThread per queue, one owning the metadata; qsd: one IOThread)
 *
 * Figures depend on the machine's load: run it under the lock, read the
 * medians, and say how loaded the machine was.
 */
import { benchArgs } from "./bench_args.ts";
import { buildBlkgen } from "./blkgen_build.ts";
import { measureRun } from "./compare_client.ts";
import { type ServerName, startServer } from "./compare_servers.ts";
import { benchDir } from "./block_workload.ts";

const values = benchArgs(
  "qcow2_alloc_bench",
  "usage: deno run -A bench/qcow2_alloc_bench.ts [--qd 32] [--rounds 5] [--duration-ms 2000] " +
    "[--size-mib 4096] [--lazy-refcounts off|on] [--queues 1]",
  {
    qd: { type: "string", default: "32" },
    rounds: { type: "string", default: "5" },
    "duration-ms": { type: "string", default: "2000" },
    "size-mib": { type: "string", default: "4096" },
    "lazy-refcounts": { type: "string", default: "off" },
    queues: { type: "string", default: "1" },
  },
);
const qd = Number(values.qd), rounds = Number(values.rounds);
const durationMs = Number(values["duration-ms"]), sizeMib = Number(values["size-mib"]);
const lazy = values["lazy-refcounts"] === "on" ? "on" : "off";
// Ours: one IOThread per queue (several: one owner of the metadata); qsd: one IOThread.
const queues = Number(values.queues);
const exe = await buildBlkgen();
const dir = Deno.makeTempDirSync({ dir: benchDir(), prefix: "qcow2-alloc-" });

function qemuImg(...args: string[]): string {
  const out = new Deno.Command("qemu-img", { args, stdout: "piped", stderr: "piped" })
    .outputSync();
  const dec = new TextDecoder();
  if (!out.success && !(args[0] === "check" && out.code === 3)) {
    throw new Error(`qemu-img ${args.join(" ")}: ${dec.decode(out.stderr)}`);
  }
  return dec.decode(out.stdout);
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const iops: Record<ServerName, number[]> = { ours: [], theirs: [] };
try {
  for (let r = 0; r < rounds; r++) {
    for (const name of ["ours", "theirs"] as const) {
      const image = `${dir}/${name}.qcow2`;
      qemuImg(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        `cluster_size=64k,lazy_refcounts=${lazy}`,
        image,
        `${sizeMib}M`,
      );
      const server = await startServer(name, {
        backend: "io_uring",
        image,
        nullSize: 0,
        queues,
        iothreads: queues,
        socket: `${dir}/${name}.sock`,
        format: "qcow2",
      });
      try {
        const s = await measureRun(exe, server, {
          pattern: "randwrite",
          queues,
          qd,
          durationMs,
        });
        if ("error" in s) {
          console.error(server.stderr.split("\n").filter((l) => !l.startsWith("  ")).join("\n"));
          throw new Error(`${name}: ${s.error}`);
        }
        iops[name].push(s.iops);
        console.log(
          `round ${r} ${name.padEnd(6)} ${(s.iops / 1000).toFixed(1)}k IOPS, p50 ${s.p50Us} us, ` +
            `server ${s.serverCpuUsPerIo.toFixed(1)} us CPU/IO`,
        );
      } finally {
        await server.stop();
      }
      const check = JSON.parse(qemuImg("check", "--output=json", image)) as {
        corruptions?: number;
        leaks?: number;
      };
      if ((check.corruptions ?? 0) > 0) throw new Error(`${name}: qemu-img check: corrupt`);
      if (r === rounds - 1) console.log(`${name}: qemu-img check clean, ${check.leaks ?? 0} leaks`);
      Deno.removeSync(image);
    }
  }
  const o = median(iops.ours), t = median(iops.theirs);
  console.log(
    `allocating 4k randwrite QD${qd} x ${queues} queue(s), lazy_refcounts=${lazy}: ours ${
      (o / 1000).toFixed(1)
    }k, ` +
      `qsd ${(t / 1000).toFixed(1)}k IOPS (medians of ${rounds}), ours/qsd ${(o / t).toFixed(2)}x`,
  );
} finally {
  Deno.removeSync(dir, { recursive: true });
}
