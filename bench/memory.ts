/**
 * Resident memory of the host serving one file disk, beside
 * qemu-storage-daemon serving the same file: for each engine and IOThread
 * count N (N queues; qsd: N queues in its one export IOThread), starts the server (a separate process), reads its VmRSS idle
 * (1 s after it serves), then runs the built-in client (another process:
 * 4 KiB random reads at `--iodepth` per queue) and samples the server's VmRSS every
 * 100 ms; reports the idle figure, the largest sample under load (split
 * into anonymous, file and shared-memory pages) and the client's IOPS.
 * One JSON line per cell, then a Markdown table.
 *
 * The host runs with the V8 flags of `deno task host` (HOST_V8_FLAGS),
 * so the figures are those of the documented command line. Guest memory is
 * the client's memfd (4 MiB at QD32): the pages the server touches count in
 * its RSS (as shmem), for both servers alike.
 *
 * `flock /tmp/bench.lock ./deno run -A bench/memory.ts [--image FILE]
 *   [--engines io_uring,native,threads] [--iothreads 1,2] [--iodepth 32]
 *   [--seconds 3] [--no-qsd] [--host FILE] [--v8-flags FLAGS]`
 *
 * `--host FILE` measures another host entry point (an older checkout's
 * dataplane/main.ts), `--v8-flags ""` runs it without V8 flags.
 *
 * Without `--image`, a 1 GiB file of random data is made in .cache/ (O_DIRECT
 * needs a real filesystem, not tmpfs) and kept for the next run.
 *
 * @module
 */

import { benchArgs } from "./bench_args.ts";
import { residentMemory } from "../sys/mod.ts";
import { HOST_V8_FLAGS_ARG } from "../dataplane/mod.ts";

const a = benchArgs(
  "memory",
  "usage: deno task memory [--image FILE] [--engines io_uring,native,threads] [--iothreads 1,2]\n" +
    "  [--iodepth 32] [--seconds 3] [--no-qsd] [--host FILE] [--v8-flags FLAGS]",
  {
    image: { type: "string" },
    engines: { type: "string", default: "io_uring,native,threads" },
    iothreads: { type: "string", default: "1,2" },
    iodepth: { type: "string", default: "32" },
    seconds: { type: "string", default: "3" },
    "no-qsd": { type: "boolean", default: false },
    host: { type: "string" },
    "v8-flags": { type: "string" },
  },
);

const root = new URL("..", import.meta.url).pathname;
const deno = Deno.execPath();

/** One server to measure. */
interface Cell {
  server: "ours" | "qsd";
  aio: string;
  iothreads: number;
}

/** What a cell measured, in MiB (RSS) and IOPS. */
interface CellResult extends Cell {
  idleMiB: number;
  loadMiB: number;
  loadAnonMiB: number;
  loadFileMiB: number;
  loadShmemMiB: number;
  iops: number;
}

/** The host's V8 flags (HOST_V8_FLAGS, as `deno task host`), or those of `--v8-flags`. */
function hostV8Flags(): string[] {
  if (a["v8-flags"] !== undefined) return a["v8-flags"] ? [`--v8-flags=${a["v8-flags"]}`] : [];
  return [HOST_V8_FLAGS_ARG];
}

function defaultImage(): string {
  const dir = `${root}.cache/bench-memory`;
  const path = `${dir}/disk.img`;
  Deno.mkdirSync(dir, { recursive: true });
  try {
    if (Deno.statSync(path).size === 2 ** 30) return path;
  } catch { /* not there yet */ }
  const f = Deno.openSync(path, { create: true, write: true, truncate: true });
  const chunk = new Uint8Array(1 << 20);
  for (let i = 0; i < 1024; i++) {
    for (let o = 0; o < chunk.length; o += 65536) {
      crypto.getRandomValues(chunk.subarray(o, o + 65536));
    }
    f.writeSync(chunk);
  }
  f.close();
  return path;
}

function serverCommand(c: Cell, image: string, socket: string): Deno.Command {
  if (c.server === "ours") {
    return new Deno.Command(deno, {
      args: [
        "run",
        "-A",
        ...hostV8Flags(),
        a.host ?? `${root}dataplane/main.ts`,
        ...["--image", image, "--cache", "none", "--aio", c.aio, "--socket", socket],
        ...["--queues", String(c.iothreads), "--iothreads", String(c.iothreads)],
      ],
      stdout: "null",
      stderr: "piped",
    });
  }
  // qsd's vhost-user-blk export runs in one IOThread; N queues there.
  return new Deno.Command("qemu-storage-daemon", {
    args: [
      "--blockdev",
      `driver=file,node-name=f,filename=${image},cache.direct=on,aio=${c.aio}`,
      ...["--blockdev", "driver=raw,node-name=n,file=f", "--object", "iothread,id=io0"],
      "--export",
      `type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=${socket},iothread=io0,` +
      `writable=on,num-queues=${c.iothreads}`,
    ],
    stdout: "null",
    stderr: "piped",
  });
}

async function waitFor(cond: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("bench/memory: server did not start");
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Starts `c`, measures it idle and under load, stops it. */
async function measure(c: Cell, image: string): Promise<CellResult> {
  const dir = Deno.makeTempDirSync({ prefix: "bench-memory-" });
  const socket = `${dir}/s.sock`;
  const child = serverCommand(c, image, socket).spawn();
  // Ours logs "serving ..." once it serves; qsd only creates the socket.
  let stderr = "";
  const reader = (async () => {
    const dec = new TextDecoder();
    for await (const chunk of child.stderr) stderr += dec.decode(chunk);
  })();
  try {
    await waitFor(
      () => c.server === "qsd" ? exists(socket) : /serving /.test(stderr),
      30_000,
    );
    await new Promise((r) => setTimeout(r, 1000));
    const idle = residentMemory(child.pid);
    const client = new Deno.Command(deno, {
      args: [
        "run",
        "-A",
        `${root}client/main.ts`,
        ...["--socket", socket, "--queues", String(c.iothreads), "--iodepth", a.iodepth!],
        "--duration-ms",
        String(Number(a.seconds) * 1000),
      ],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    let peak = idle;
    let running = true;
    const out = client.output().finally(() => running = false);
    while (running) {
      await new Promise((r) => setTimeout(r, 100));
      const r = residentMemory(child.pid);
      if (r.rssKiB > peak.rssKiB) peak = r;
    }
    const o = await out;
    const res = JSON.parse(new TextDecoder().decode(o.stdout)) as { iops: number };
    const mib = (kib: number) => Math.round(kib / 102.4) / 10;
    return {
      ...c,
      idleMiB: mib(idle.rssKiB),
      loadMiB: mib(peak.rssKiB),
      loadAnonMiB: mib(peak.anonKiB),
      loadFileMiB: mib(peak.fileKiB),
      loadShmemMiB: mib(peak.shmemKiB),
      iops: Math.round(res.iops),
    };
  } finally {
    child.kill("SIGINT");
    await child.status;
    await reader;
    Deno.removeSync(dir, { recursive: true });
  }
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

if (import.meta.main) {
  const image = a.image ?? defaultImage();
  const cells: Cell[] = [];
  for (const aio of a.engines!.split(",")) {
    for (const n of a.iothreads!.split(",").map(Number)) {
      cells.push({ server: "ours", aio, iothreads: n });
      if (!a["no-qsd"]) cells.push({ server: "qsd", aio, iothreads: n });
    }
  }
  const results: CellResult[] = [];
  for (const c of cells) {
    const r = await measure(c, image);
    console.log(JSON.stringify(r));
    results.push(r);
  }
  console.log(
    `\n| server | aio | IOThreads | idle MiB | QD${a.iodepth} MiB | anon | file | shmem | IOPS |`,
  );
  console.log("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
  for (const r of results) {
    console.log(
      `| ${r.server} | ${r.aio} | ${r.iothreads} | ${r.idleMiB} | ${r.loadMiB} | ` +
        `${r.loadAnonMiB} | ${r.loadFileMiB} | ${r.loadShmemMiB} | ${r.iops} |`,
    );
  }
}
