/**
 * Compares our engines with fio on the same workload: 4 KiB random read and
 * write at queue depth 1 and 32. On the 256 MiB image with cache=none
 * (fio direct=1): aio=native vs fio libaio, aio=io_uring vs fio io_uring,
 * aio=threads vs fio psync with one thread per request in flight (numjobs=qd,
 * as QEMU's thread pool runs one blocking call per Worker). On null: null-co
 * vs fio's null engine (the per-request cost of the software stack alone).
 * Each cell is run `--reps` times, ours and fio alternating (the disk of a VM
 * is noisy); the table prints medians and the ratio of the medians.
 *
 * Run: ./deno run -A bench/block_fio.ts [--seconds 1] [--reps 3]
 */
import { parseArgs } from "node:util";
import type { BlockOptions } from "../block/mod.ts";
import { benchImage, measureIops } from "./block_workload.ts";

const { values } = parseArgs({
  options: {
    seconds: { type: "string", default: "1" },
    reps: { type: "string", default: "3" },
  },
});
const seconds = Number(values.seconds);
const reps = Number(values.reps);
const image = benchImage();

/** fio's IOPS for `engine` (its own name); psync runs `qd` single-request threads. */
async function fio(engine: string, rw: string, qd: number): Promise<number> {
  const target = engine === "null"
    ? []
    : [`--filename=${image}`, "--direct=1", ...(engine === "psync" ? psyncJobs(qd) : [])];
  const out = await new Deno.Command("/usr/bin/fio", {
    args: [
      "--name=cmp",
      ...target,
      "--size=256M",
      "--bs=4k",
      `--rw=${rw}`,
      `--iodepth=${engine === "psync" ? 1 : qd}`,
      `--ioengine=${engine}`,
      "--norandommap",
      "--randrepeat=0",
      "--time_based",
      `--runtime=${seconds}`,
      "--output-format=json",
    ],
  }).output();
  if (out.code !== 0) throw new Error(new TextDecoder().decode(out.stderr));
  const job = JSON.parse(new TextDecoder().decode(out.stdout)).jobs[0];
  return rw === "randread" ? job.read.iops : job.write.iops;
}

function psyncJobs(qd: number): string[] {
  return qd === 1 ? [] : ["--thread", `--numjobs=${qd}`, "--group_reporting"];
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/** [row label, our options, fio engine] */
const cases: [string, BlockOptions, string][] = [
  ["null-co vs null", { driver: "null-co" }, "null"],
  ...(["threads", "native", "io_uring"] as const).map((aio): [string, BlockOptions, string] => {
    const theirs = { threads: "psync", native: "libaio", io_uring: "io_uring" }[aio];
    return [
      `file ${aio} vs ${theirs}`,
      { driver: "file", filename: image, cache: "none", aio },
      theirs,
    ];
  }),
];

const rows: string[][] = [["engine", "pattern", "qd", "ours IOPS", "fio IOPS", "ours/fio"]];
for (const [label, opts, theirs] of cases) {
  for (const rw of ["randread", "randwrite"]) {
    for (const qd of [1, 32]) {
      const ours: number[] = [], fios: number[] = [];
      for (let r = 0; r < reps; r++) {
        ours.push(await measureIops(opts, qd, rw === "randwrite", seconds));
        fios.push(await fio(theirs, rw, qd));
      }
      const a = median(ours), b = median(fios);
      rows.push([label, rw, String(qd), a.toFixed(0), b.toFixed(0), (a / b).toFixed(2)]);
      console.error(rows[rows.length - 1].join("  "));
    }
  }
}

console.log(`medians of ${reps} runs of ${seconds} s each, 4 KiB, cache=none / direct=1 on files`);
const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
for (const [i, r] of rows.entries()) {
  console.log(`| ${r.map((v, c) => v.padEnd(widths[c])).join(" | ")} |`);
  if (i === 0) console.log(`|${widths.map((w) => "-".repeat(w + 2)).join("|")}|`);
}
Deno.exit(0);
