/**
 * `deno task compare`: our vhost-user-blk host against qemu-storage-daemon on
 * the same backends, driven by blkgen (the C load generator in
 * `bench/c/blkgen/`, docs/blkgen.md) with the same workload.
 *
 * Matrix (each restrictable by a flag): backends null-co, a raw file with
 * cache=none and aio=native, the same file with aio=io_uring; 4 KiB randread
 * and randwrite; queue depth 1, 32, 128 per queue, and 128 again with one
 * INDIRECT descriptor per request; 1 and 2 queues. blkgen waits for
 * completions as Linux's virtio_blk does (interrupt mode; `--mode poll`
 * spins instead).
 *
 * How it runs, on a small machine (2 CPUs here):
 * - Both servers export the same node with one IOThread each (qsd
 *   `--object iothread` on the export; our host `--iothreads 1`), for 1 and
 *   2 queues alike. Our host runs as its own `./deno` process with the V8
 *   flags of `deno task host` (HOST_V8_FLAGS), so
 *   blkgen reads its CPU time from its process CPU clock, as for qsd.
 * - With 2 or more CPUs, every thread of both servers is pinned to CPU 0
 *   (`taskset -c 0`) and blkgen to CPU 1 (`--cpu 1`), so neither competes
 *   with the other for a core (`--pin off` leaves placement to the
 *   scheduler).
 * - blkgen on one CPU drives all queues of a cell from one thread
 *   (`--threads 1`), as a 1-vCPU guest takes every queue's interrupts on its
 *   one CPU: with a thread per queue on one CPU the kernel time-slices them
 *   whenever neither sleeps, and one queue's completions wait a slice to be
 *   reaped (p99 then measures the scheduler). `--client-threads queues`
 *   runs a thread per queue instead (the default when not pinned).
 * - For each backend and queue count both servers are started and stay up;
 *   only one is driven at a time, the other sits idle (neither burns CPU
 *   idle). Each server first gets an unrecorded warm-up run (our host's JIT).
 * - Each cell runs `--rounds` times alternating ours, theirs, ours, ...; one
 *   blkgen process per run, each with its own short warm-up before its
 *   measured window. The table shows the median of each metric over the
 *   rounds.
 * - Server CPU per I/O: utime + stime (all threads) of the server process,
 *   read by blkgen from /proc at the start and end of its measured window,
 *   over the requests completed in it. blkgen's own CPU per I/O: getrusage
 *   over the same window; its busy time is the time of the passes that had
 *   completions (reap, refill, publish, kick), not the waiting.
 * - Both servers share one image (our host takes no lock, qsd's shared lock
 *   does not conflict), written once with non-zero data so no extent is
 *   unwritten; it lives on a disk-backed directory (cache=none needs O_DIRECT).
 * - The disk's ceiling (`--fio on`, the default): in the file cells (not
 *   again for INDIRECT) each round also runs fio straight on the image with
 *   the same engine, pattern and requests in flight, pinned as the servers
 *   (compare_fio.ts); the table's "IOPS fio" column. Near it, a server is
 *   bound by the disk.
 * - Client check: at null-co randread QD128 on one queue (the fastest cell)
 *   blkgen's cores busy (CPU per I/O x IOPS) say whether blkgen, not the
 *   server, limits the rate; the same for the most queues run at that QD
 *   when the matrix has such a cell (all of them in one blkgen thread).
 *
 * Output: the table on stdout, the chart (SVG, cells without INDIRECT) at
 * --svg, every run at --json.
 *
 * Run: `deno task compare [--quick] [--backend null-co,native,io_uring]
 * [--pattern randread,randwrite] [--qd 1,32,128] [--indirect-qd 128]
 * [--queues 1,2] [--mode interrupt|poll] [--duration-ms 1000] [--rounds 5]
 * [--pin on|off] [--fio on|off] [--client-threads 1|queues]
 * [--svg bench/results/compare.svg]
 * [--json bench/results/compare.json]`
 *
 * @module
 */

import { parseArgs } from "node:util";
import { dirname, resolve } from "node:path";
import { fsFilesystemType, TMPFS_MAGIC } from "../sys/mod.ts";
import { makeScratchDir } from "../tests/harness/mod.ts";
import { buildBlkgen } from "./blkgen_build.ts";
import { taskArgs } from "../dataplane/mod.ts";
import {
  type ComparePattern,
  FAR_TRANSFER_NS,
  measureRun,
  type RunFailure,
  type RunSample,
  type WaitMode,
  type Workload,
} from "./compare_client.ts";
import {
  type Cell,
  type ClientCheck,
  clientCheck,
  formatTable,
  iopsRatio,
  isSample,
  summarize,
  summarizeFio,
} from "./compare_report.ts";
import {
  type BackendName,
  BACKENDS,
  type BlkServer,
  type ServerConfig,
  type ServerName,
  startServer,
} from "./compare_servers.ts";
import { renderCompareSvg } from "./compare_svg.ts";
import { runFio } from "./compare_fio.ts";

const PATTERNS: readonly ComparePattern[] = ["randread", "randwrite"];
const SERVERS: readonly ServerName[] = ["ours", "theirs"];
const MODES: readonly WaitMode[] = ["interrupt", "poll"];

/** A run during which the rest of the machine used more CPU than this (cores) is noted as noisy. */
const NOISY_CORES = 0.15;

/** blkgen threads per cell: one for all queues, or one per queue. */
type ClientThreads = "1" | "queues";
const CLIENT_THREADS: readonly ClientThreads[] = ["1", "queues"];

/** Runs one workload on the named server (restarting it first if it died). */
type RunFn = (name: ServerName, w: Workload) => Promise<RunSample | RunFailure>;

/** The parsed command line. */
interface CompareOptions {
  backends: BackendName[];
  patterns: ComparePattern[];
  qds: number[];
  /** Queue depths run a second time with INDIRECT. */
  indirectQds: number[];
  queues: number[];
  mode: WaitMode;
  durationMs: number;
  warmupMs: number;
  rounds: number;
  iothreads: number;
  imageSize: number;
  pin: boolean;
  /** File cells: also run fio straight on the image each round (the disk's ceiling). */
  fio: boolean;
  /** Unset: "1" when blkgen is pinned to one CPU, else "queues". */
  clientThreads?: ClientThreads;
  dir?: string;
  svg: string;
  json: string;
}

const USAGE = `usage: deno task compare [--quick] [--backend null-co,native,io_uring]
  [--pattern randread,randwrite] [--qd 1,32,128] [--indirect-qd 128] [--queues 1,2]
  [--mode interrupt|poll] [--duration-ms 1000] [--rounds 5] [--warmup-ms 500] [--iothreads 1]
  [--image-size-mib 1024] [--pin on|off] [--fio on|off] [--client-threads 1|queues] [--dir DIR]
  [--svg bench/results/compare.svg] [--json bench/results/compare.json]`;

function list<T extends string>(flag: string, text: string, all: readonly T[]): T[] {
  const xs = text.split(",").map((s) => s.trim()).filter(Boolean);
  for (const x of xs) {
    if (!(all as readonly string[]).includes(x)) {
      throw new RangeError(`--${flag}: '${x}' is not one of ${all.join(", ")}`);
    }
  }
  return xs as T[];
}

function numbers(flag: string, text: string, max: number): number[] {
  const xs = text.split(",").filter((s) => s.trim()).map((s) => Number(s.trim()));
  if (xs.some((x) => !Number.isInteger(x) || x < 1 || x > max)) {
    throw new RangeError(`--${flag} takes whole numbers 1..${max}, comma-separated`);
  }
  return xs;
}

function positive(flag: string, text: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0) throw new RangeError(`--${flag} takes a whole number`);
  return n;
}

function parseOptions(args: string[]): CompareOptions {
  const { values: v } = parseArgs({
    args,
    options: {
      quick: { type: "boolean", default: false },
      backend: { type: "string", default: BACKENDS.join(",") },
      pattern: { type: "string", default: PATTERNS.join(",") },
      qd: { type: "string", default: "1,32,128" },
      "indirect-qd": { type: "string", default: "128" },
      queues: { type: "string", default: "1,2" },
      mode: { type: "string", default: "interrupt" },
      "duration-ms": { type: "string" },
      "warmup-ms": { type: "string" },
      rounds: { type: "string" },
      iothreads: { type: "string", default: "1" },
      "image-size-mib": { type: "string", default: "1024" },
      pin: { type: "string", default: "on" },
      fio: { type: "string", default: "on" },
      "client-threads": { type: "string" },
      dir: { type: "string" },
      svg: { type: "string", default: "bench/results/compare.svg" },
      json: { type: "string", default: "bench/results/compare.json" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (v.help) {
    console.log(USAGE);
    Deno.exit(0);
  }
  if (v.pin !== "on" && v.pin !== "off") throw new RangeError("--pin takes on or off");
  if (v.fio !== "on" && v.fio !== "off") throw new RangeError("--fio takes on or off");
  const qds = numbers("qd", v.qd, 1024);
  const indirectQds = numbers("indirect-qd", v["indirect-qd"], 1024);
  if (qds.length + indirectQds.length === 0) throw new RangeError("--qd: no queue depth");
  return {
    backends: list("backend", v.backend, BACKENDS),
    patterns: list("pattern", v.pattern, PATTERNS),
    // QD128 without INDIRECT needs a 512-entry ring; our host is started with --queue-size 1024.
    qds,
    indirectQds,
    queues: numbers("queues", v.queues, 8),
    mode: list("mode", v.mode, MODES)[0] ?? "interrupt",
    durationMs: positive("duration-ms", v["duration-ms"] ?? (v.quick ? "300" : "1000")),
    warmupMs: positive("warmup-ms", v["warmup-ms"] ?? (v.quick ? "200" : "500")),
    rounds: Math.max(1, positive("rounds", v.rounds ?? (v.quick ? "1" : "5"))),
    iothreads: numbers("iothreads", v.iothreads, 8)[0],
    imageSize: positive("image-size-mib", v["image-size-mib"]) * (1 << 20),
    pin: v.pin === "on",
    fio: v.fio === "on",
    clientThreads: v["client-threads"] === undefined
      ? undefined
      : list("client-threads", v["client-threads"], CLIENT_THREADS)[0],
    dir: v.dir,
    svg: resolve(v.svg),
    json: resolve(v.json),
  };
}

/** Writes `size` bytes of non-zero data to `path` (every extent allocated and written). */
async function writeImage(path: string, size: number): Promise<void> {
  const chunk = new Uint8Array(1 << 20);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 31 + 7) & 0xff;
  const f = await Deno.open(path, { create: true, write: true, truncate: true });
  try {
    for (let off = 0; off < size; off += chunk.length) {
      const part = chunk.subarray(0, Math.min(chunk.length, size - off));
      let done = 0;
      while (done < part.length) done += await f.write(part.subarray(done));
    }
    await f.syncData();
  } finally {
    f.close();
  }
}

function progress(line: string): void {
  console.error(`compare: ${line}`);
}

function brief(r: RunSample | RunFailure): string {
  return isSample(r) ? `${(r.iops / 1000).toFixed(1)}k IOPS` : `FAILED (${r.error})`;
}

/** Host stderr lines that are not the normal start/connect/stop log. */
function anomalies(name: ServerName, stderr: string): string[] {
  const bad = /error|fail|warn|exception|panic|uncaught|abort|stall|IOERR [1-9]|[1-9]\d* IOERR/i;
  // Counters that are zero ("0 stray wait errors") are the normal stop log.
  const zero = /\b0 [a-z ]*(errors|failures)\b/gi;
  return stderr.split("\n").filter((l) =>
    l.trim() && (name === "theirs" || bad.test(l.replace(zero, "")))
  );
}

/** The cell variants of one backend / pattern / queue count: (QD, INDIRECT) in run order. */
function variants(o: CompareOptions): { qd: number; indirect: boolean }[] {
  return [
    ...o.qds.map((qd) => ({ qd, indirect: false })),
    ...o.indirectQds.map((qd) => ({ qd, indirect: true })),
  ].sort((a, b) => a.qd - b.qd || Number(a.indirect) - Number(b.indirect));
}

function cellName(
  c: { backend: string; pattern: string; queues: number; qd: number; indirect: boolean },
) {
  return `${c.backend} ${c.pattern} q${c.queues} QD${c.qd}${c.indirect ? " INDIRECT" : ""}`;
}

function emptyCell(
  backend: BackendName,
  pattern: ComparePattern,
  queues: number,
  threads: number,
  qd: number,
  indirect: boolean,
): Cell {
  return {
    backend,
    pattern,
    queues,
    threads,
    qd,
    indirect,
    ours: { runs: [], median: null },
    theirs: { runs: [], median: null },
  };
}

/** Runs the whole comparison; returns the process exit status. */
export async function main(args: string[]): Promise<number> {
  let o: CompareOptions;
  try {
    o = parseOptions(args);
  } catch (e) {
    console.error(`compare: ${(e as Error).message}\n${USAGE}`);
    return 2;
  }
  const exe = await buildBlkgen();
  const cpus = navigator.hardwareConcurrency;
  const pinned = o.pin && cpus >= 2;
  const serverCpus = pinned ? "0" : undefined;
  const blkgenCpu = pinned ? 1 : undefined;
  // One CPU for blkgen: one thread for all queues, as a 1-vCPU guest (see the module doc).
  const clientThreads: ClientThreads = o.clientThreads ?? (pinned ? "1" : "queues");
  const threadsFor = (queues: number) => clientThreads === "1" ? 1 : queues;
  const dir = o.dir ? resolve(o.dir) : await makeScratchDir("compare");
  await Deno.mkdir(dir, { recursive: true });
  const image = `${dir}/disk.raw`;
  const needsFile = o.backends.some((b) => b !== "null-co");
  const odd: string[] = [];
  const cells: Cell[] = [];
  /** Cells with a run during which the rest of the machine was busy: the most it used (cores). */
  const noisy = new Map<string, number>();
  let noisyRuns = 0, runsDone = 0;
  let check: ClientCheck | null = null;
  if (o.pin && !pinned) odd.push(`only ${cpus} CPU: servers and blkgen are not pinned`);
  try {
    if (needsFile) {
      if (fsFilesystemType(dir) === TMPFS_MAGIC) {
        throw new Error(`${dir} is on tmpfs, which rejects O_DIRECT (cache=none): pass --dir`);
      }
      progress(`writing ${o.imageSize >> 20} MiB image ${image}`);
      await writeImage(image, o.imageSize);
    }
    const perConfig = o.patterns.length * variants(o).length;
    const total = o.backends.length * o.queues.length * perConfig;
    const workload = (
      pattern: ComparePattern,
      queues: number,
      qd: number,
      indirect: boolean,
      durationMs: number,
    ): Workload => ({
      pattern,
      queues,
      qd,
      indirect,
      durationMs,
      warmupMs: Math.min(200, o.warmupMs),
      mode: o.mode,
      cpu: blkgenCpu,
      threads: threadsFor(queues),
      probeCpu: pinned ? Number(serverCpus) : undefined,
    });

    /** Runs `body` with both servers started (and warmed up) for `backend` / `queues`. */
    const withServers = async (
      backend: BackendName,
      queues: number,
      body: (run: RunFn) => Promise<void>,
    ) => {
      const config = (name: ServerName): ServerConfig => ({
        backend,
        image,
        nullSize: 1 << 30,
        queues,
        iothreads: o.iothreads,
        socket: `${dir}/${name}.sock`,
        cpus: serverCpus,
      });
      const servers = new Map<ServerName, BlkServer>();
      const logs: Record<ServerName, string> = { ours: "", theirs: "" };
      try {
        for (const name of SERVERS) servers.set(name, await startServer(name, config(name)));
        for (const name of SERVERS) {
          if (o.warmupMs === 0) break;
          const w = await measureRun(
            exe,
            servers.get(name)!,
            workload("randread", queues, 32, false, o.warmupMs),
          );
          if (!isSample(w)) odd.push(`${name} ${backend} q${queues} warm-up: ${w.error}`);
        }
        await body(async (name, w) => {
          let s = servers.get(name)!;
          if (s.exited) {
            // A crash in one run must not lose the rest: note it and restart.
            odd.push(`${name} (${backend}, ${queues}q) had exited; restarted`);
            logs[name] += s.stderr;
            s = await startServer(name, config(name));
            servers.set(name, s);
          }
          return await measureRun(exe, s, w);
        });
      } finally {
        for (const [name, s] of servers) {
          const crashed = s.exited;
          await s.stop();
          logs[name] += s.stderr;
          if (crashed) odd.push(`${name} (${backend}, ${queues}q) exited before it was stopped`);
        }
        for (const name of SERVERS) {
          for (const l of anomalies(name, logs[name])) {
            odd.push(`${name} (${backend}, ${queues}q): ${l}`);
          }
        }
      }
    };

    /** Runs `cell` for `--rounds` rounds, alternating the servers, and takes the medians. */
    const runCell = async (run: RunFn, cell: Cell, label: string) => {
      const w = workload(cell.pattern, cell.queues, cell.qd, cell.indirect, o.durationMs);
      const backend = cell.backend;
      // The disk's ceiling does not depend on the descriptor layout: not again for INDIRECT.
      const fio: Cell["fio"] = o.fio && backend !== "null-co" && !cell.indirect
        ? { runs: [], median: null }
        : undefined;
      for (let r = 0; r < o.rounds; r++) {
        for (const name of SERVERS) cell[name].runs.push(await run(name, w));
        let ceiling = "";
        if (fio !== undefined && backend !== "null-co") {
          const f = await runFio({
            backend,
            image,
            pattern: cell.pattern,
            queues: cell.queues,
            qd: cell.qd,
            durationMs: o.durationMs,
            warmupMs: w.warmupMs ?? 0,
            cpus: serverCpus,
          });
          fio.runs.push(f);
          ceiling = `, fio ${
            "error" in f ? `FAILED (${f.error})` : `${(f.iops / 1000).toFixed(1)}k IOPS`
          }`;
        }
        progress(
          `${label}${cellName(cell)} round ${r + 1}/${o.rounds}: ` +
            `ours ${brief(cell.ours.runs[r])}, theirs ${brief(cell.theirs.runs[r])}${ceiling}`,
        );
      }
      if (fio !== undefined) {
        fio.median = summarizeFio(fio.runs);
        cell.fio = fio;
        for (const f of fio.runs) if ("error" in f) odd.push(`fio ${cellName(cell)}: ${f.error}`);
      }
      for (const name of SERVERS) {
        cell[name].median = summarize(cell[name].runs);
        for (const f of cell[name].runs) {
          if (!isSample(f)) odd.push(`${name} ${cellName(cell)}: ${f.error}`);
          else {
            runsDone++;
            if (f.otherCores > NOISY_CORES) {
              noisy.set(cellName(cell), Math.max(noisy.get(cellName(cell)) ?? 0, f.otherCores));
              noisyRuns++;
            }
          }
        }
        const errs = cell[name].median?.errors ?? 0;
        if (errs) odd.push(`${name} ${cellName(cell)}: ${errs} failed requests`);
      }
    };

    let n = 0;
    for (const backend of o.backends) {
      for (const queues of o.queues) {
        progress(`${backend}, ${queues} queue(s): starting both servers`);
        await withServers(backend, queues, async (run) => {
          for (const pattern of o.patterns) {
            for (const { qd, indirect } of variants(o)) {
              n++;
              const cell = emptyCell(backend, pattern, queues, threadsFor(queues), qd, indirect);
              await runCell(run, cell, `[${n}/${total}] `);
              cells.push(cell);
            }
          }
        });
      }
    }

    // The client check needs null-co randread, 1 queue, QD128: reuse the matrix's cell or run it.
    const fastest = (c: Cell) =>
      c.backend === "null-co" && c.pattern === "randread" && c.queues === 1 && c.qd === 128;
    let checkCell = cells.find((c) => fastest(c) && c.indirect) ?? cells.find(fastest);
    if (!checkCell) {
      const c = emptyCell("null-co", "randread", 1, 1, 128, false);
      await withServers("null-co", 1, (run) => runCell(run, c, "client check: "));
      checkCell = c;
    }
    check = clientCheck(checkCell, cpus);
    // And with the most queues the matrix ran (one blkgen thread drives them all by default).
    const maxQueues = Math.max(...o.queues);
    const multi = (c: Cell) =>
      c.backend === "null-co" && c.pattern === "randread" && c.queues === maxQueues &&
      c.qd === 128;
    const multiCell = maxQueues > 1
      ? cells.find((c) => multi(c) && c.indirect) ?? cells.find(multi)
      : undefined;
    const checkQueues = multiCell ? clientCheck(multiCell, cpus) : null;

    if (noisyRuns) {
      const worst = [...noisy.entries()].sort((a, b) => b[1] - a[1]);
      odd.push(
        `noisy: in ${noisyRuns} of ${runsDone} runs the rest of the machine (other processes, ` +
          `or kernel work charged to neither server nor blkgen) used more than ${NOISY_CORES} ` +
          `core, up to ${worst[0][1].toFixed(2)}; cells: ${
            worst.slice(0, 8).map(([n, c]) => `${n} (${c.toFixed(2)})`).join(", ")
          }${worst.length > 8 ? `, and ${worst.length - 8} more` : ""}`,
      );
    }
    for (const c of cells) {
      const ratio = iopsRatio(c);
      if (ratio < 0.5) odd.push(`slow: ours at ${ratio.toFixed(2)}x theirs on ${cellName(c)}`);
    }

    const placement = pinned ? "servers on CPU 0, blkgen on CPU 1" : "not pinned";
    const threadsText = clientThreads === "1"
      ? "one blkgen thread for all queues"
      : "one blkgen thread per queue";
    const subtitle = `medians of ${o.rounds} round(s) x ${o.durationMs} ms, ${cpus} CPUs ` +
      `(${placement}), blkgen ${o.mode} mode, ${threadsText}, 1 IOThread each ` +
      `(ours --iothreads ${o.iothreads}); QD is per queue`;
    console.log(`\n${subtitle}; o = ours (dataplane), t = theirs (qemu-storage-daemon);`);
    console.log(
      "latency p50/p99 in us, cpu/IO = server CPU us per request (all threads), " +
        "kick/wait per IO = blkgen's eventfd writes / sleeps" +
        (pinned
          ? `,\nfar o/t = runs of each server during which a cache line took over ` +
            `${FAR_TRANSFER_NS} ns between CPU ${serverCpus} and CPU ${blkgenCpu} ` +
            `(the VM's two CPUs on cores that share no cache)\n`
          : "\n"),
    );
    console.log(formatTable(cells));
    console.log(`\n${check.text}`);
    if (checkQueues) console.log(checkQueues.text);
    if (odd.length) {
      console.log("\nnoted during the runs:");
      for (const l of odd) console.log(`  ${l}`);
    }

    await Deno.mkdir(dirname(o.svg), { recursive: true });
    await Deno.writeTextFile(
      o.svg,
      renderCompareSvg(cells.filter((c) => !c.indirect), `${subtitle}; without INDIRECT`),
    );
    await Deno.mkdir(dirname(o.json), { recursive: true });
    const qsdVersion = new TextDecoder().decode(
      (await new Deno.Command("qemu-storage-daemon", { args: ["--version"] }).output()).stdout,
    ).split("\n")[0];
    await Deno.writeTextFile(
      o.json,
      JSON.stringify(
        {
          generated: new Date().toISOString(),
          machine: { cpus, kernel: Deno.osRelease(), deno: Deno.version.deno, qsd: qsdVersion },
          options: { ...o, dir, pinned, clientThreads },
          cells,
          clientCheck: check,
          clientCheckQueues: checkQueues,
          noted: odd,
        },
        null,
        1,
      ) + "\n",
    );
    console.log(`\nwrote ${o.svg} and ${o.json}`);
    return cells.every((c) => c.ours.median && c.theirs.median) ? 0 : 1;
  } finally {
    if (needsFile) await Deno.remove(image).catch(() => {});
    for (const name of SERVERS) await Deno.remove(`${dir}/${name}.sock`).catch(() => {});
    if (!o.dir) await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

if (import.meta.main) Deno.exit(await main(taskArgs(Deno.args)));
