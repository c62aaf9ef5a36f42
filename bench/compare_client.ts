/**
 * One measured run of `deno task compare`: the built-in client
 * (`client/main.ts`) as its own `./deno` process against one server, with the
 * server's CPU time read from /proc before the client starts and after it
 * exits.
 *
 * @module
 */

import { REPO_ROOT } from "../tests/harness/mod.ts";
import { type BlkServer, processCpuMs } from "./compare_servers.ts";

/** The I/O patterns the comparison runs. */
export type ComparePattern = "randread" | "randwrite";

/** What the client runs: 4 KiB requests, `qd` in flight on each of `queues` queues. */
export interface Workload {
  pattern: ComparePattern;
  queues: number;
  /** Requests in flight per queue. */
  qd: number;
  durationMs: number;
  /** Bytes per request (default 4096). */
  blockSize?: number;
}

/** The fields of client/main.ts's JSON result that the comparison uses. */
interface ClientJson {
  ops: number;
  errors: number;
  seconds: number;
  iops: number;
  latUs: { p50: number; p99: number };
  cpuMs: { user: number; system: number };
}

/** One run's measurements. */
export interface RunSample {
  iops: number;
  p50Us: number;
  p99Us: number;
  /** Server CPU (all threads, user + system) per completed request, in us. */
  serverCpuUsPerIo: number;
  /** Client CPU during the workload per completed request, in us. */
  clientCpuUsPerIo: number;
  /** Server CPU time over the client's workload time (cores busy). */
  serverCores: number;
  /** Client CPU time over its workload time. */
  clientCores: number;
  ops: number;
  /** Requests that completed with a non-OK status. */
  errors: number;
  seconds: number;
}

/** A run that produced no result (client failed, server died, timeout). */
export interface RunFailure {
  error: string;
}

/** The client's command line for `w` (arguments after `./deno`). */
export function clientArgs(socket: string, w: Workload): string[] {
  // client/main.ts sizes the ring (>= 3 descriptors per slot) and slots = iodepth itself.
  return [
    "run",
    "-A",
    "client/main.ts",
    "--socket",
    socket,
    "--pattern",
    w.pattern,
    "--bs",
    String(w.blockSize ?? 4096),
    "--iodepth",
    String(w.qd),
    "--queues",
    String(w.queues),
    "--duration-ms",
    String(w.durationMs),
  ];
}

/**
 * Runs the client once against `server` and measures both. Never throws for a
 * failed run: the failure comes back as a {@link RunFailure} so one bad cell
 * does not lose the rest of the matrix.
 */
export async function measureRun(server: BlkServer, w: Workload): Promise<RunSample | RunFailure> {
  if (server.exited) return { error: `${server.name} server is not running` };
  const cpu0 = processCpuMs(server.pid);
  const child = new Deno.Command(`${REPO_ROOT}/deno`, {
    args: clientArgs(server.socket, w),
    cwd: REPO_ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  // A stalled run must not hang the whole comparison.
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
  }, w.durationMs + 60_000);
  const out = await child.output();
  clearTimeout(timer);
  if (server.exited) {
    return { error: `${server.name} server exited during the run: ${lastLines(server.stderr)}` };
  }
  const cpu1 = processCpuMs(server.pid);
  const dec = new TextDecoder();
  if (!out.success) {
    return {
      error: `client exited with ${out.code}${out.signal ? ` (${out.signal})` : ""}: ${
        lastLines(dec.decode(out.stderr))
      }`,
    };
  }
  let r: ClientJson;
  try {
    const lines = dec.decode(out.stdout).trim().split("\n");
    r = JSON.parse(lines[lines.length - 1]);
  } catch {
    return { error: `client printed no JSON: ${lastLines(dec.decode(out.stdout))}` };
  }
  if (!(r.ops > 0)) return { error: `client completed no requests: ${JSON.stringify(r)}` };
  const clientMs = r.cpuMs.user + r.cpuMs.system;
  return {
    iops: r.iops,
    p50Us: r.latUs.p50,
    p99Us: r.latUs.p99,
    serverCpuUsPerIo: ((cpu1 - cpu0) * 1000) / r.ops,
    clientCpuUsPerIo: (clientMs * 1000) / r.ops,
    serverCores: (cpu1 - cpu0) / 1000 / r.seconds,
    clientCores: clientMs / 1000 / r.seconds,
    ops: r.ops,
    errors: r.errors,
    seconds: r.seconds,
  };
}

/** The last few lines of `text`, on one line, for an error message. */
function lastLines(text: string, n = 3): string {
  return text.trim().split("\n").slice(-n).join(" | ") || "(no output)";
}
