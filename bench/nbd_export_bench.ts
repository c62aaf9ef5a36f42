/**
 * The NBD export against qemu-storage-daemon's, driven by QEMU's own NBD
 * client (`qemu-img bench`): the same qsd command line (a null-co node,
 * `--nbd-server` on a Unix socket, `--export type=nbd`; no `iothread=`:
 * qsd 7.2 aborts in nbd_blockdev_client_closed when a client of an
 * IOThread export leaves; ours runs it in its shared IOThread) run by
 * both daemons; 4 KiB reads and writes at queue depth 1 and 32, 1 MiB reads
 * at depth 8; median IOPS of `--rounds` runs per point. qemu-img bench is a
 * single-threaded client: at depth 32 it may be the bottleneck for both.
 *
 * Run (on a shared machine, under the bench lock):
 * `flock /tmp/bench.lock ./deno run -A bench/nbd_export_bench.ts [--rounds 3]`
 *
 * @module
 */

import { HOST_V8_FLAGS_ARG } from "../dataplane/mod.ts";
import { makeScratchDir } from "../tests/harness/mod.ts";

const MAIN = new URL("../dataplane/main.ts", import.meta.url).pathname;

interface Point {
  name: string;
  args: string[];
  count: number;
}

const POINTS: Point[] = [
  { name: "4k read QD1", args: ["-d", "1", "-s", "4k"], count: 20000 },
  { name: "4k read QD32", args: ["-d", "32", "-s", "4k"], count: 100000 },
  { name: "4k write QD32", args: ["-w", "-d", "32", "-s", "4k"], count: 100000 },
  { name: "1M read QD8", args: ["-d", "8", "-s", "1M"], count: 4000 },
];

function daemonArgv(sock: string): string[] {
  return [
    "--blockdev",
    "driver=null-co,node-name=n0,size=1073741824",
    "--nbd-server",
    `addr.type=unix,addr.path=${sock}`,
    "--export",
    "type=nbd,id=e0,node-name=n0,name=d,writable=on",
  ];
}

async function waitForExport(sock: string): Promise<void> {
  const until = Date.now() + 20_000;
  for (;;) {
    const r = await new Deno.Command("qemu-nbd", {
      args: ["--list", "-k", sock],
      stdout: "piped",
      stderr: "null",
    }).output();
    if (r.code === 0 && new TextDecoder().decode(r.stdout).includes("export: 'd'")) return;
    if (Date.now() > until) throw new Error(`no export on ${sock}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function qemuImgBench(sock: string, p: Point): Promise<number> {
  const r = await new Deno.Command("qemu-img", {
    args: ["bench", "-f", "raw", "-c", String(p.count), ...p.args, `nbd+unix:///d?socket=${sock}`],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const out = new TextDecoder().decode(r.stdout);
  const m = /Run completed in ([\d.]+) seconds/.exec(out);
  if (r.code !== 0 || !m) {
    throw new Error(`qemu-img bench: ${out}${new TextDecoder().decode(r.stderr)}`);
  }
  return p.count / Number(m[1]);
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

async function measure(kind: "ours" | "qsd", dir: string, rounds: number) {
  const sock = `${dir}/${kind}.sock`;
  const cmd = kind === "ours"
    ? new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "--no-check",
        HOST_V8_FLAGS_ARG,
        MAIN,
        ...daemonArgv(sock),
      ],
      stdout: "null",
      stderr: "null",
    })
    : new Deno.Command("qemu-storage-daemon", {
      args: daemonArgv(sock),
      stdout: "null",
      stderr: "null",
    });
  const proc = cmd.spawn();
  const out: Record<string, number> = {};
  let failure: unknown = null;
  try {
    await waitForExport(sock);
    for (const p of POINTS) {
      const runs: number[] = [];
      for (let i = 0; i < rounds; i++) runs.push(await qemuImgBench(sock, p));
      out[p.name] = median(runs);
    }
  } catch (e) {
    failure = e;
  }
  try {
    proc.kill("SIGKILL");
  } catch { /* it exited: the status says how */ }
  const st = await proc.status;
  if (st.signal !== "SIGKILL") throw new Error(`${kind} exited early: ${JSON.stringify(st)}`);
  if (failure !== null) throw failure;
  return out;
}

if (import.meta.main) {
  const i = Deno.args.indexOf("--rounds");
  const rounds = i >= 0 ? Number(Deno.args[i + 1]) : 3;
  const dir = await makeScratchDir("nbd-bench");
  try {
    const ours = await measure("ours", dir, rounds);
    const qsd = await measure("qsd", dir, rounds);
    console.log(`NBD export, qemu-img bench, median IOPS of ${rounds} runs`);
    console.log("point            ours       qsd    ours/qsd");
    for (const p of POINTS) {
      console.log(
        `${p.name.padEnd(15)} ${ours[p.name].toFixed(0).padStart(7)} ${
          qsd[p.name].toFixed(0).padStart(9)
        }    ${(ours[p.name] / qsd[p.name]).toFixed(2)}`,
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}
