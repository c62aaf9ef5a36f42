/**
 * What KVM_IOEVENTFD and KVM_IRQFD save: the test guest's own timed loops
 * (4 KiB random reads, QD1 round trip and QD32 IOPS, interrupt mode) under
 * `deno task vm`, on null-co and on a file image, with
 *
 * - `ioeventfd+irqfd`: QueueNotify signals the kick eventfd in the kernel,
 *   completions raise the GSI through an eventfd in the kernel (the default);
 * - `trap+irqfd`: QueueNotify exits to user space (the vCPU thread hands it
 *   to the main thread, which writes the kick eventfd);
 * - `ioeventfd+irq-line`: the IOThread raises the GSI with KVM_IRQ_LINE.
 *
 * Median of `--rounds` runs per point. On this machine /dev/kvm is kvm_pvm
 * and the 32-bit guest runs in KVM's instruction emulator: the guest's own
 * code costs most of each round trip. Run it under `flock /tmp/bench.lock`.
 *
 * Run: `deno run -A bench/vm_notify.ts [--rounds 3]`
 *
 * @module
 */

import { HOST_V8_FLAGS_ARG } from "../dataplane/mod.ts";
import { parseArgs } from "node:util";
import { makeScratchDir } from "../tests/harness/mod.ts";

const MAIN = new URL("../vm/main.ts", import.meta.url).pathname;

const MODES = [
  { name: "ioeventfd+irqfd", args: [] },
  { name: "trap+irqfd", args: ["--notify", "trap"] },
  { name: "ioeventfd+irq-line", args: ["--irq", "line"] },
];

interface Perf {
  qd1Ns: number;
  qd32Iops: number;
}

/** Parses the guest's "perf interrupt qd1/qd32" lines out of the host's log. */
export function parsePerf(log: string): Perf | null {
  const qd1 = /perf interrupt qd1: \d+ requests, (\d+) ns per request/.exec(log);
  const qd32 = /perf interrupt qd32: \d+ requests, \d+ ns per request, (\d+) IOPS/.exec(log);
  if (!qd1 || !qd32) return null;
  return { qd1Ns: Number(qd1[1]), qd32Iops: Number(qd32[1]) };
}

function median(v: number[]): number {
  const s = [...v].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

async function runOnce(image: string, extra: string[]): Promise<Perf> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "--no-check",
      HOST_V8_FLAGS_ARG,
      MAIN,
      "--image",
      image,
      ...extra,
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const log = new TextDecoder().decode(out.stderr);
  const p = parsePerf(log);
  if (out.code !== 0 || p === null) throw new Error(`vm run failed (${out.code}):\n${log}`);
  return p;
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { rounds: { type: "string" } } });
  const rounds = Number(values.rounds ?? "3");
  const dir = await makeScratchDir("vm-bench");
  try {
    const file = `${dir}/disk.img`;
    // Written through, so reads hit allocated blocks (page cache: cache=writeback).
    await Deno.writeFile(file, new Uint8Array(64 << 20).fill(0x5a));
    const images = [
      { name: "null-co", image: "null-co:64M", args: [] as string[] },
      {
        name: "file (io_uring, cache=none)",
        image: file,
        args: ["--aio", "io_uring", "--cache", "none"],
      },
    ];
    console.log("| image | notify + interrupt | QD1 round trip (us) | QD32 IOPS |");
    console.log("| --- | --- | --- | --- |");
    for (const img of images) {
      for (const m of MODES) {
        const runs: Perf[] = [];
        for (let i = 0; i < rounds; i++) {
          runs.push(await runOnce(img.image, [...img.args, ...m.args]));
        }
        const qd1 = median(runs.map((r) => r.qd1Ns)) / 1000;
        const iops = median(runs.map((r) => r.qd32Iops));
        const span = (f: (r: Perf) => number) =>
          `${Math.min(...runs.map(f))}-${Math.max(...runs.map(f))}`;
        console.log(
          `| ${img.name} | ${m.name} | ${qd1.toFixed(0)} (${
            span((r) => Math.round(r.qd1Ns / 1000))
          }) | ${iops} (${span((r) => r.qd32Iops)}) |`,
        );
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) await main();
