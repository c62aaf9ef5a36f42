/**
 * The NBD exports' part of `--metrics`: per export, the clients connected
 * and since the start, requests, errors, bytes and backpressure pauses
 * (from the export's IOThread, `nbdStats`), in Prometheus' text format.
 * metrics.ts appends it to the vhost-user exports' families.
 *
 * @module
 */

import type { StorageDaemon } from "../daemon/storage_daemon.ts";
import type { NbdExportStats } from "./nbd_iothread.ts";

/**
 * One NBD export's sample.
 *
 * @example
 * ```ts
 * import type { NbdExportMetrics } from "./nbd_metrics.ts";
 * const m: NbdExportMetrics = { id: "e0", name: "disk", clients: 0, connections: 0,
 *   stats: { clients: 0, requests: 0, errors: 0, bytesRead: 0, bytesWritten: 0, readPauses: 0, log: [] } };
 * if (m.clients !== 0) throw new Error();
 * ```
 */
export interface NbdExportMetrics {
  id: string;
  /** The NBD export name. */
  name: string;
  clients: number;
  connections: number;
  stats: NbdExportStats;
}

/**
 * Asks every NBD export of `d` for its counters (exports deleted meanwhile are left out).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { collectNbdMetrics } from "./nbd_metrics.ts";
 * import { StorageDaemon } from "../daemon/storage_daemon.ts";
 * const d = new StorageDaemon();
 * assert.deepEqual(await collectNbdMetrics(d), []);
 * await d.stop();
 * ```
 */
export async function collectNbdMetrics(d: StorageDaemon): Promise<NbdExportMetrics[]> {
  const out: NbdExportMetrics[] = [];
  for (const e of [...d.nbdExports.values()]) {
    let stats: NbdExportStats;
    try {
      stats = await e.stats();
    } catch {
      continue;
    }
    out.push({
      id: e.spec.id,
      name: e.spec.name,
      clients: e.clients,
      connections: e.connections,
      stats,
    });
  }
  return out;
}

function esc(v: string): string {
  return v.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n");
}

/**
 * Renders the samples as text-format families (empty for none).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatNbdMetrics } from "./nbd_metrics.ts";
 * const text = formatNbdMetrics([{ id: "e0", name: "disk", clients: 2, connections: 5,
 *   stats: { clients: 2, requests: 9, errors: 1, bytesRead: 512, bytesWritten: 0, readPauses: 0, log: [] } }]);
 * assert.match(text, /^dataplane_nbd_clients\{export="e0",name="disk"\} 2$/m);
 * ```
 */
export function formatNbdMetrics(exports: NbdExportMetrics[]): string {
  if (exports.length === 0) return "";
  const families: [string, string, string, (e: NbdExportMetrics) => [string, number][]][] = [
    [
      "dataplane_nbd_clients",
      "gauge",
      "NBD clients connected to the export.",
      (e) => [["", e.clients]],
    ],
    [
      "dataplane_nbd_connections_total",
      "counter",
      "NBD clients that connected to the export.",
      (e) => [["", e.connections]],
    ],
    [
      "dataplane_nbd_requests_total",
      "counter",
      "NBD requests received (DISC included).",
      (e) => [["", e.stats.requests]],
    ],
    [
      "dataplane_nbd_request_errors_total",
      "counter",
      "NBD requests answered with an error.",
      (e) => [["", e.stats.errors]],
    ],
    [
      "dataplane_nbd_bytes_total",
      "counter",
      "Bytes read and written by NBD requests.",
      (
        e,
      ) => [[',direction="read"', e.stats.bytesRead], [',direction="write"', e.stats.bytesWritten]],
    ],
    [
      "dataplane_nbd_read_pauses_total",
      "counter",
      "Times a connection stopped being read (backpressure).",
      (e) => [["", e.stats.readPauses]],
    ],
  ];
  const lines: string[] = [];
  for (const [name, type, help, values] of families) {
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const e of exports) {
      for (const [extra, v] of values(e)) {
        lines.push(`${name}{export="${esc(e.id)}",name="${esc(e.name)}"${extra}} ${v}`);
      }
    }
  }
  return lines.join("\n") + "\n";
}
