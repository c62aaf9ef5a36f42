/**
 * Block layer benchmarks: 4 KiB random read and write at queue depth 1 and 32
 * through BlockBackend, per engine, on the null drivers and on a 256 MiB file
 * with cache=none. Each iteration is `IOS` requests: divide the time per
 * iteration by IOS for the time per request. bench/block_fio.ts compares the
 * same workload with fio.
 */
import type { BlockOptions } from "../block/mod.ts";
import { benchImage, openTarget, RandomIo, type Target } from "./block_workload.ts";

const IOS = 1024;
const image = benchImage();

const targets: [string, BlockOptions][] = [
  ["null-co", { driver: "null-co" }],
  ["null-aio", { driver: "null-aio" }],
  ["file threads", { driver: "file", filename: image, cache: "none", aio: "threads" }],
  ["file native", { driver: "file", filename: image, cache: "none", aio: "native" }],
  ["file io_uring", { driver: "file", filename: image, cache: "none", aio: "io_uring" }],
];

/** The target of the running benchmark; closed when the next one starts so
 * idle engines and thread-pool Workers of earlier targets do not interfere. */
let current: { t: Target; w: RandomIo } | null = null;

async function switchTo(opts: BlockOptions, qd: number, write: boolean): Promise<RandomIo> {
  if (current) {
    current.w.close();
    await current.t.close();
  }
  const t = await openTarget(opts);
  const w = new RandomIo(t, qd, write);
  await w.warmUp(qd * 64);
  current = { t, w };
  return w;
}

for (const [name, opts] of targets) {
  for (const write of [false, true]) {
    for (const qd of [1, 32]) {
      const rw = write ? "randwrite" : "randread";
      let w: RandomIo | undefined;
      Deno.bench({
        name: `${name} 4k ${rw} qd${qd} (${IOS} I/Os)`,
        group: `${rw} qd${qd}`,
        baseline: name === "null-co",
        async fn(b) {
          w ??= await switchTo(opts, qd, write);
          b.start();
          w.run(IOS);
          b.end();
        },
      });
    }
  }
}
