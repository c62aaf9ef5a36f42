/**
 * Compares our engines with fio on the same 256 MiB image, same pattern
 * (4 KiB random read / write, queue depth 1 and 32, direct=1): prints IOPS and
 * the ratio ours / fio for aio=native vs fio libaio and aio=io_uring vs fio
 * io_uring (and aio=threads vs fio psync with numjobs=1 at qd1 for reference).
 *
 * Run: ./deno run -A bench/block_fio.ts [--seconds 3]
 */
import { parseArgs } from "node:util";
import { benchImage, measureIops } from "./block_workload.ts";

const { values } = parseArgs({ options: { seconds: { type: "string", default: "3" } } });
const seconds = Number(values.seconds);
const image = benchImage();

async function fio(engine: string, rw: string, qd: number): Promise<number> {
  const out = await new Deno.Command("/usr/bin/fio", {
    args: [
      "--name=cmp",
      `--filename=${image}`,
      "--size=256M",
      "--bs=4k",
      `--rw=${rw}`,
      `--iodepth=${qd}`,
      `--ioengine=${engine}`,
      "--direct=1",
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

const rows: string[][] = [["engine", "pattern", "qd", "ours IOPS", "fio IOPS", "ours/fio"]];
const pairs = [["native", "libaio"], ["io_uring", "io_uring"], ["threads", "psync"]] as const;
for (const [ours, theirs] of pairs) {
  for (const rw of ["randread", "randwrite"]) {
    for (const qd of [1, 32]) {
      if (theirs === "psync" && qd !== 1) continue; // psync has no queue depth
      const a = await measureIops(
        { driver: "file", filename: image, cache: "none", aio: ours },
        qd,
        rw === "randwrite",
        seconds,
      );
      const b = await fio(theirs, rw, qd);
      rows.push([
        `${ours} vs ${theirs}`,
        rw,
        String(qd),
        a.toFixed(0),
        b.toFixed(0),
        (a / b).toFixed(2),
      ]);
      console.error(rows[rows.length - 1].join("  "));
    }
  }
}

const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
for (const [i, r] of rows.entries()) {
  console.log(`| ${r.map((v, c) => v.padEnd(widths[c])).join(" | ")} |`);
  if (i === 0) console.log(`|${widths.map((w) => "-".repeat(w + 2)).join("|")}|`);
}
Deno.exit(0);
