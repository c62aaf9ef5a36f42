/**
 * One measured run of `deno task compare`: blkgen (the C load generator,
 * `bench/c/blkgen/`, docs/blkgen.md) as its own process against one server.
 * blkgen measures everything over its measured window only: IOPS, latency,
 * its own CPU per I/O, and (`--server-pid`) the server's CPU time from its
 * process CPU clock (ns), so connection set-up and warm-up count for neither.
 *
 * @module
 */

import type { BlkServer } from "./compare_servers.ts";

/** The I/O patterns the comparison runs. */
export type ComparePattern = "randread" | "randwrite";

/** How blkgen waits for completions: as Linux's virtio_blk (interrupts) or by spinning. */
export type WaitMode = "interrupt" | "poll";

/** What blkgen runs: `blockSize` requests, `qd` in flight on each of `queues` queues. */
export interface Workload {
  pattern: ComparePattern;
  queues: number;
  /** Requests in flight per queue. */
  qd: number;
  durationMs: number;
  /** Unmeasured run inside blkgen before the window (default 200). */
  warmupMs?: number;
  /** Bytes per request (default 4096). */
  blockSize?: number;
  /** Default "interrupt". */
  mode?: WaitMode;
  /** One INDIRECT descriptor per request (default false). */
  indirect?: boolean;
  /** Negotiate VIRTIO_RING_F_EVENT_IDX (default true). */
  eventIdx?: boolean;
  /** Pin blkgen's threads to this CPU (default: not pinned). */
  cpu?: number;
  /**
   * blkgen threads driving the queues, round-robin (default: one per queue).
   * One thread for several queues is what a 1-vCPU guest does.
   */
  threads?: number;
  /**
   * The server's CPU: blkgen times a cache line moving between it and `cpu`
   * before connecting and after closing (`--probe-cpu`), which says whether
   * the two virtual CPUs sat on cores that share a cache during the run.
   */
  probeCpu?: number;
}

/** The fields of blkgen's `--json` line that the comparison uses. */
interface BlkgenJson {
  iops: number;
  ops: number;
  errors: number;
  seconds: number;
  lat_us: { p50: number; p99: number };
  kicks_per_io: number;
  waits_per_io: number;
  cpu_us_per_io: number;
  busy_us_per_io: number;
  cpu_cores: number;
  busy_cores: number;
  server_cpu_us_per_io?: number;
  server_cores?: number;
  preempted: number;
  ops_per_reap: number;
  transfer_ns?: { before: number; after: number };
}

/** One run's measurements. */
export interface RunSample {
  iops: number;
  p50Us: number;
  p99Us: number;
  /** Server CPU (all threads, user + system) per completed request, in us. */
  serverCpuUsPerIo: number;
  /** blkgen CPU per completed request, in us (poll mode: includes spinning on an empty ring). */
  clientCpuUsPerIo: number;
  /** What the load costs blkgen per request: its passes with completions, not its waiting. */
  clientBusyUsPerIo: number;
  /** Server CPU time over the measured window (cores busy). */
  serverCores: number;
  /** blkgen's busy time over the window (cores). */
  clientCores: number;
  /** Kick eventfd writes per request. */
  kicksPerIo: number;
  /** Sleeps on the call eventfd per request (0 in poll mode). */
  waitsPerIo: number;
  /**
   * Times blkgen's threads lost the CPU with work to do in the window
   * (involuntary context switches): to other processes, or to each other.
   */
  clientPreempted: number;
  /**
   * Completions blkgen found per pass with completions: small while it keeps
   * up with the server (it reaps as they come), growing towards QD if it fell
   * behind.
   */
  clientOpsPerReap: number;
  ops: number;
  /** Requests that completed with a non-OK status. */
  errors: number;
  seconds: number;
  /**
   * CPU the rest of the machine used meanwhile (cores): every CPU's busy time
   * from /proc/stat over the whole blkgen process, less blkgen's and the
   * server's. Above ~0.1 something else competed for the CPUs.
   */
  otherCores: number;
  /**
   * With `probeCpu`: one cache line's transfer between the server's CPU and
   * blkgen's, in ns, before and after the run (-1: not measured). See
   * {@link FAR_TRANSFER_NS}.
   */
  transferNs?: { before: number; after: number };
}

/**
 * A cache-line transfer slower than this (ns) means the server's and
 * blkgen's virtual CPUs sat on physical cores that share no cache. On the
 * 2-CPU VM these figures come from, the hypervisor moves them about once a
 * second between placements measuring 25-50 ns and 155-180 ns, and a
 * request crosses between the CPUs several times.
 */
export const FAR_TRANSFER_NS = 100;

/**
 * Whether run `r` saw the far placement ({@link FAR_TRANSFER_NS}) before or
 * after it; false when it was not probed.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { farPlacement, type RunSample } from "./compare_client.ts";
 * const r = { transferNs: { before: 30, after: 170 } } as RunSample;
 * assert.equal(farPlacement(r), true);
 * assert.equal(farPlacement({ ...r, transferNs: { before: 30, after: 41 } }), false);
 * ```
 */
export function farPlacement(r: RunSample): boolean {
  const t = r.transferNs;
  return t !== undefined && Math.max(t.before, t.after) > FAR_TRANSFER_NS;
}

/** A run that produced no result (blkgen failed, server died, timeout). */
export interface RunFailure {
  error: string;
}

/** Busy (not idle, not iowait) time of all CPUs in seconds, from the first line of /proc/stat. */
export function machineBusySeconds(): number {
  const line = Deno.readTextFileSync("/proc/stat").split("\n")[0];
  const f = line.trim().split(/\s+/).slice(1, 9).map(Number);
  const total = f.reduce((a, b) => a + b, 0);
  // USER_HZ is 100 on Linux.
  return (total - f[3] - f[4]) / 100;
}

/**
 * blkgen's command line for `w` against `socket`, reporting the CPU time of
 * process `serverPid`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { blkgenArgs } from "./compare_client.ts";
 * const a = blkgenArgs("/tmp/s.sock", 42, { pattern: "randread", queues: 1, qd: 32, durationMs: 500 });
 * assert.deepEqual(a.slice(0, 4), ["--socket", "/tmp/s.sock", "--server-pid", "42"]);
 * assert(a.includes("--json") && !a.includes("--threads"));
 * const b = blkgenArgs("/tmp/s.sock", 42, {
 *   pattern: "randread", queues: 2, qd: 32, durationMs: 500, threads: 1,
 * });
 * assert.deepEqual(b.slice(-2), ["--threads", "1"]);
 * const c = blkgenArgs("/tmp/s.sock", 42, {
 *   pattern: "randread", queues: 1, qd: 32, durationMs: 500, cpu: 1, probeCpu: 0,
 * });
 * assert.deepEqual(c.slice(-4), ["--cpu", "1", "--probe-cpu", "0"]);
 * ```
 */
export function blkgenArgs(socket: string, serverPid: number, w: Workload): string[] {
  const args = [
    "--socket",
    socket,
    "--server-pid",
    String(serverPid),
    "--rw",
    w.pattern,
    "--bs",
    String(w.blockSize ?? 4096),
    "--qd",
    String(w.qd),
    "--queues",
    String(w.queues),
    "--mode",
    w.mode ?? "interrupt",
    "--indirect",
    w.indirect ? "on" : "off",
    "--event-idx",
    w.eventIdx === false ? "off" : "on",
    "--duration-ms",
    String(w.durationMs),
    "--warmup-ms",
    String(w.warmupMs ?? 200),
    "--json",
  ];
  if (w.cpu !== undefined) args.push("--cpu", String(w.cpu));
  if (w.threads !== undefined) args.push("--threads", String(w.threads));
  if (w.probeCpu !== undefined) args.push("--probe-cpu", String(w.probeCpu));
  return args;
}

/**
 * Runs blkgen (`exe`) once against `server`. Never throws for a failed run:
 * the failure comes back as a {@link RunFailure} so one bad cell does not
 * lose the rest of the matrix.
 */
export async function measureRun(
  exe: string,
  server: BlkServer,
  w: Workload,
): Promise<RunSample | RunFailure> {
  if (server.exited) return { error: `${server.name} server is not running` };
  const busy0 = machineBusySeconds();
  const t0 = performance.now();
  const child = new Deno.Command(exe, {
    args: blkgenArgs(server.socket, server.pid, w),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  // blkgen gives up on a stalled server by itself (5 s); this is for a blkgen that hangs.
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
  }, (w.warmupMs ?? 200) + w.durationMs + 30_000);
  const out = await child.output();
  clearTimeout(timer);
  const machineCores = (machineBusySeconds() - busy0) / ((performance.now() - t0) / 1000);
  const dec = new TextDecoder();
  if (server.exited) {
    return { error: `${server.name} server exited during the run: ${lastLines(server.stderr)}` };
  }
  if (!out.success) {
    return {
      error: `blkgen exited with ${out.code}${out.signal ? ` (${out.signal})` : ""}: ${
        lastLines(dec.decode(out.stderr))
      }`,
    };
  }
  let r: BlkgenJson;
  try {
    const lines = dec.decode(out.stdout).trim().split("\n");
    r = JSON.parse(lines[lines.length - 1]);
  } catch {
    return { error: `blkgen printed no JSON: ${lastLines(dec.decode(out.stdout))}` };
  }
  if (!(r.ops > 0)) return { error: `blkgen completed no requests: ${JSON.stringify(r)}` };
  if (r.server_cpu_us_per_io === undefined || r.server_cores === undefined) {
    return { error: `blkgen could not read the server's CPU time (pid ${server.pid})` };
  }
  return {
    iops: r.iops,
    p50Us: r.lat_us.p50,
    p99Us: r.lat_us.p99,
    serverCpuUsPerIo: r.server_cpu_us_per_io,
    clientCpuUsPerIo: r.cpu_us_per_io,
    clientBusyUsPerIo: r.busy_us_per_io,
    serverCores: r.server_cores,
    clientCores: r.busy_cores,
    kicksPerIo: r.kicks_per_io,
    waitsPerIo: r.waits_per_io,
    clientPreempted: r.preempted,
    clientOpsPerReap: r.ops_per_reap,
    ops: r.ops,
    errors: r.errors,
    seconds: r.seconds,
    otherCores: Math.max(0, machineCores - r.cpu_cores - r.server_cores),
    ...(r.transfer_ns ? { transferNs: { ...r.transfer_ns } } : {}),
  };
}

/** The last few lines of `text`, on one line, for an error message. */
function lastLines(text: string, n = 3): string {
  return text.trim().split("\n").slice(-n).join(" | ") || "(no output)";
}
