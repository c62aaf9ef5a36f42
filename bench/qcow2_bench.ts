/**
 * qcow2 against raw on the same data (issue 14, item 7): 4 KiB random read
 * and write at QD 1 and 32 through BlockBackend, the raw benchmark image
 * and a fully allocated qcow2 copy of it (qemu-img convert, 64 KiB
 * clusters: every request maps through a cached L2 table to a COPIED
 * cluster, the driver's fast path). cache=none (O_DIRECT, the disk) and
 * cache=writeback (page cache: the per-request software cost shows), both
 * with io_uring. Each cell alternates raw and qcow2 `--reps` times and
 * prints medians and qcow2/raw.
 *
 * Run: flock /tmp/bench.lock ./deno run -A bench/qcow2_bench.ts [--seconds 1] [--reps 3]
 */
import { benchArgs } from "./bench_args.ts";
import type { BlockOptions } from "../block/mod.ts";
import { benchDir, benchImage, measureIops } from "./block_workload.ts";

const values = benchArgs(
  "qcow2_bench",
  "usage: deno run -A bench/qcow2_bench.ts [--seconds 1] [--reps 3]",
  { seconds: { type: "string", default: "1" }, reps: { type: "string", default: "3" } },
);
const seconds = Number(values.seconds), reps = Number(values.reps);
const raw = benchImage();
const qcow2 = `${benchDir()}/block-bench-256m.qcow2`;
const made = new Deno.Command("qemu-img", {
  // -S 0: allocate every cluster, zero or not (the raw write cells leave zeroes).
  args: ["convert", "-S", "0", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=64k", raw, qcow2],
}).outputSync();
if (!made.success) throw new Error(new TextDecoder().decode(made.stderr));

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log("cache      rw     qd  raw IOPS  qcow2 IOPS  qcow2/raw");
for (const cache of ["none", "writeback"] as const) {
  for (const write of [false, true]) {
    for (const qd of [1, 32]) {
      const r: number[] = [], q: number[] = [];
      for (let i = 0; i < reps; i++) {
        const base: BlockOptions = { driver: "file", cache, aio: "io_uring", filename: raw };
        r.push(await measureIops(base, qd, write, seconds));
        q.push(
          await measureIops({ ...base, filename: qcow2, format: "qcow2" }, qd, write, seconds),
        );
      }
      const mr = median(r), mq = median(q);
      console.log(
        `${cache.padEnd(10)} ${(write ? "write" : "read").padEnd(6)} ${String(qd).padStart(2)}  ` +
          `${(mr / 1000).toFixed(1).padStart(7)}k  ${(mq / 1000).toFixed(1).padStart(9)}k  ` +
          `${(mq / mr).toFixed(2).padStart(9)}`,
      );
    }
  }
}
Deno.removeSync(qcow2);
