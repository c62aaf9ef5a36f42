/**
 * `--metrics ADDR:PORT`: the daemon's counters over HTTP (`GET /metrics`) in
 * Prometheus' text exposition format 0.0.4, something qemu-storage-daemon
 * does not offer. Per export and queue: requests completed, well-formed
 * requests by type, bytes read and
 * written, IOERR/UNSUPP completions, kicks, guest notifies, batches started
 * by busy polling, a latency histogram (pop to completion), whether the ring
 * is broken; per export: requests in flight, whether a front-end is
 * connected, connections since start; per IOThread: CPU time (its busy
 * time, polling included, from /proc/self/task/TID/stat).
 *
 * A scrape asks every export's IOThread for its counters (as SIGUSR1 on the
 * host does); nothing is kept between scrapes.
 *
 * @module
 */

import type { BlkThreadStats } from "../blk_iothread.ts";
import { LATENCY_BUCKETS_NS } from "../virtio_blk_dataplane.ts";
import type { StorageDaemon } from "./storage_daemon.ts";
import { collectNbdMetrics, formatNbdMetrics, type NbdExportMetrics } from "../nbd/nbd_metrics.ts";

/** What one scrape collected. */
export interface MetricsSnapshot {
  exports: {
    id: string;
    connected: boolean;
    connections: number;
    stats: BlkThreadStats;
  }[];
  /** CPU seconds per IOThread (null when /proc could not tell). */
  iothreads: { id: string; cpuSeconds: number | null }[];
  /** NBD exports (dataplane/nbd/), when there are any. */
  nbdExports?: NbdExportMetrics[];
}

/** Clock ticks per second of /proc's utime and stime (USER_HZ, 100 on Linux). */
const USER_HZ = 100;

/**
 * CPU time of thread `tid` of this process, in seconds (utime + stime), or
 * null if it is gone.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { threadCpuSeconds } from "./metrics.ts";
 * assert.equal(typeof threadCpuSeconds(Deno.pid), "number");
 * ```
 */
export function threadCpuSeconds(tid: number): number | null {
  let text: string;
  try {
    text = Deno.readTextFileSync(`/proc/self/task/${tid}/stat`);
  } catch {
    return null;
  }
  // Fields after the command name (which may hold spaces and parentheses).
  const f = text.slice(text.lastIndexOf(")") + 2).split(" ");
  const utime = Number(f[11]), stime = Number(f[12]);
  return Number.isFinite(utime + stime) ? (utime + stime) / USER_HZ : null;
}

/**
 * Asks every export and IOThread of `d` for its counters.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { collectMetrics } from "./metrics.ts";
 * import { StorageDaemon } from "./storage_daemon.ts";
 * const d = new StorageDaemon();
 * assert.deepEqual(await collectMetrics(d), { exports: [], iothreads: [] });
 * await d.stop();
 * ```
 */
export async function collectMetrics(d: StorageDaemon): Promise<MetricsSnapshot> {
  const exports: MetricsSnapshot["exports"] = [];
  for (const e of [...d.exports.values()]) {
    let stats: BlkThreadStats;
    try {
      stats = await e.stats();
    } catch {
      continue; // deleted meanwhile
    }
    exports.push({
      id: e.spec.id,
      connected: e.server.connection !== null,
      connections: e.connections,
      stats,
    });
  }
  const iothreads: MetricsSnapshot["iothreads"] = [];
  for (const t of d.allIOThreads()) {
    const tid = await t.threadId().catch(() => null);
    iothreads.push({ id: t.spec.id, cpuSeconds: tid === null ? null : threadCpuSeconds(tid) });
  }
  const nbdExports = await collectNbdMetrics(d);
  return nbdExports.length > 0 ? { exports, iothreads, nbdExports } : { exports, iothreads };
}

function label(v: string | number): string {
  return String(v).replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n");
}

function labels(l: Record<string, string | number>): string {
  return `{${Object.entries(l).map(([k, v]) => `${k}="${label(v)}"`).join(",")}}`;
}

/** Writes families in the text format: HELP and TYPE once, then the samples. */
class Exposition {
  readonly #families = new Map<string, { help: string; type: string; lines: string[] }>();

  add(
    name: string,
    type: "counter" | "gauge" | "histogram",
    help: string,
    l: Record<string, string | number>,
    value: number,
    suffix = "",
  ): void {
    let f = this.#families.get(name);
    if (f === undefined) this.#families.set(name, f = { help, type, lines: [] });
    f.lines.push(`${name}${suffix}${labels(l)} ${value}`);
  }

  text(): string {
    const out: string[] = [];
    for (const [name, f] of this.#families) {
      out.push(`# HELP ${name} ${f.help}`, `# TYPE ${name} ${f.type}`, ...f.lines);
    }
    return out.join("\n") + "\n";
  }
}

/**
 * Renders a snapshot in Prometheus' text exposition format 0.0.4.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatMetrics } from "./metrics.ts";
 * const text = formatMetrics({ exports: [], iothreads: [{ id: "io0", cpuSeconds: 1.5 }] });
 * assert.match(text, /^dataplane_iothread_busy_seconds_total\{iothread="io0"\} 1\.5$/m);
 * ```
 */
export function formatMetrics(s: MetricsSnapshot): string {
  const x = new Exposition();
  for (const e of s.exports) {
    const ex = { export: e.id };
    x.add(
      "dataplane_export_connected",
      "gauge",
      "1 while a front-end is connected to the export.",
      ex,
      e.connected ? 1 : 0,
    );
    x.add(
      "dataplane_export_connections_total",
      "counter",
      "Front-ends that connected to the export.",
      ex,
      e.connections,
    );
    x.add(
      "dataplane_requests_in_flight",
      "gauge",
      "Requests taken from the rings and not completed yet.",
      ex,
      e.stats.inFlight,
    );
    for (const q of e.stats.queues) {
      const ql = { export: e.id, queue: q.index };
      const types: [string, number][] = [
        ["read", q.reads],
        ["write", q.writes],
        ["flush", q.flushes],
        ["discard", q.discards],
        ["write_zeroes", q.writeZeroes],
        ["get_id", q.getIds],
      ];
      x.add(
        "dataplane_requests_completed_total",
        "counter",
        "Requests completed, any type and status.",
        ql,
        q.requests,
      );
      for (const [type, n] of types) {
        x.add(
          "dataplane_requests_total",
          "counter",
          "Well-formed requests by type (one the parser refused counts only as an error).",
          { ...ql, type },
          n,
        );
      }
      x.add(
        "dataplane_request_errors_total",
        "counter",
        "Requests completed with an error status.",
        { ...ql, status: "ioerr" },
        q.errors,
      );
      x.add(
        "dataplane_request_errors_total",
        "counter",
        "Requests completed with an error status.",
        { ...ql, status: "unsupp" },
        q.unsupported,
      );
      x.add(
        "dataplane_bytes_total",
        "counter",
        "Bytes read and written by requests.",
        { ...ql, direction: "read" },
        q.readBytes,
      );
      x.add(
        "dataplane_bytes_total",
        "counter",
        "Bytes read and written by requests.",
        { ...ql, direction: "write" },
        q.writtenBytes,
      );
      x.add(
        "dataplane_kicks_total",
        "counter",
        "Kick eventfd reads that found a kick.",
        ql,
        q.kicks,
      );
      x.add(
        "dataplane_notifies_total",
        "counter",
        "Guest notifications (call eventfd writes).",
        ql,
        q.notifies,
      );
      x.add(
        "dataplane_poll_hits_total",
        "counter",
        "Batches found by busy polling rather than a kick.",
        ql,
        q.polls,
      );
      x.add(
        "dataplane_queue_broken",
        "gauge",
        "1 when the ring was marked broken (device needs reset).",
        ql,
        q.broken === null ? 0 : 1,
      );
      if (q.latencyCounts !== undefined) {
        const name = "dataplane_request_latency_seconds";
        const help = "Request latency from taking it off the ring to completing it.";
        let cumulative = 0;
        LATENCY_BUCKETS_NS.forEach((le, i) => {
          cumulative += q.latencyCounts![i];
          x.add(name, "histogram", help, { ...ql, le: le / 1e9 }, cumulative, "_bucket");
        });
        cumulative += q.latencyCounts[LATENCY_BUCKETS_NS.length];
        x.add(name, "histogram", help, { ...ql, le: "+Inf" }, cumulative, "_bucket");
        x.add(name, "histogram", help, ql, (q.latencySumNs ?? 0) / 1e9, "_sum");
        x.add(name, "histogram", help, ql, cumulative, "_count");
      }
    }
  }
  for (const t of s.iothreads) {
    if (t.cpuSeconds === null) continue;
    x.add(
      "dataplane_iothread_busy_seconds_total",
      "counter",
      "CPU time of the IOThread (busy polling included).",
      { iothread: t.id },
      t.cpuSeconds,
    );
  }
  return x.text() + formatNbdMetrics(s.nbdExports ?? []);
}

/**
 * The HTTP endpoint: `GET /metrics` (anything else is 404).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { MetricsServer } from "./metrics.ts";
 * import { StorageDaemon } from "./storage_daemon.ts";
 * const d = new StorageDaemon();
 * const m = await MetricsServer.start(d, "127.0.0.1", 0);
 * const r = await fetch(`http://127.0.0.1:${m.port}/metrics`);
 * assert.equal(r.status, 200);
 * await r.body?.cancel();
 * await m.close();
 * await d.stop();
 * ```
 */
export class MetricsServer {
  readonly port: number;
  readonly #server: Deno.HttpServer<Deno.NetAddr>;

  private constructor(server: Deno.HttpServer<Deno.NetAddr>) {
    this.#server = server;
    this.port = server.addr.port;
  }

  /** Listens on `hostname:port` (port 0: any free one, see `port`). */
  static start(d: StorageDaemon, hostname: string, port: number): Promise<MetricsServer> {
    const listening = Promise.withResolvers<void>();
    const server = Deno.serve({
      hostname,
      port,
      onListen: () => listening.resolve(),
      onError: (e) => new Response(`error: ${(e as Error).message}\n`, { status: 500 }),
    }, async (req) => {
      const url = new URL(req.url);
      if (req.method !== "GET" || url.pathname !== "/metrics") {
        return new Response("not found: try /metrics\n", { status: 404 });
      }
      const text = formatMetrics(await collectMetrics(d));
      return new Response(text, {
        headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8" },
      });
    });
    return listening.promise.then(() => new MetricsServer(server));
  }

  /** Stops listening. */
  async close(): Promise<void> {
    await this.#server.shutdown();
  }
}
