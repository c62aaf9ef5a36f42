/**
 * Results of `deno task compare`: one {@link Cell} per backend / pattern /
 * queues / queue depth / INDIRECT with every run of both servers, the
 * medians, the printed table, and the load-generator-bottleneck verdict.
 *
 * @module
 */

import {
  type ComparePattern,
  farPlacement,
  type RunFailure,
  type RunSample,
} from "./compare_client.ts";
import type { BackendName, ServerName } from "./compare_servers.ts";
import type { FioSample } from "./compare_fio.ts";

/** Medians over a server's successful runs of one cell. */
export interface Summary {
  iops: number;
  p50Us: number;
  p99Us: number;
  serverCpuUsPerIo: number;
  clientCpuUsPerIo: number;
  clientBusyUsPerIo: number;
  serverCores: number;
  clientCores: number;
  kicksPerIo: number;
  waitsPerIo: number;
  /** Successful runs the medians are over. */
  runs: number;
  /** Runs that saw the far CPU placement (compare_client.ts farPlacement); absent if not probed. */
  farRuns?: number;
  /** Non-OK request completions over all runs. */
  errors: number;
}

/** One server's runs of a cell, in the order they ran. */
export interface ServerRuns {
  runs: (RunSample | RunFailure)[];
  /** Null when no run succeeded. */
  median: Summary | null;
}

/** One point of the matrix. */
export interface Cell {
  backend: BackendName;
  pattern: ComparePattern;
  queues: number;
  /** blkgen threads driving the queues (1: one loop for all, as a 1-vCPU guest). */
  threads: number;
  /** Requests in flight per queue. */
  qd: number;
  /** One INDIRECT descriptor per request instead of a 3-descriptor chain. */
  indirect: boolean;
  ours: ServerRuns;
  theirs: ServerRuns;
  /**
   * File backends: fio straight on the image with the same workload, each
   * round after the servers (compare_fio.ts): the disk's ceiling.
   */
  fio?: { runs: (FioSample | RunFailure)[]; median: FioSample | null };
}

/**
 * Medians of fio's successful runs (null when none succeeded).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { summarizeFio } from "./compare_report.ts";
 * assert.deepEqual(summarizeFio([{ iops: 3, p99Us: 9 }, { error: "x" }, { iops: 1, p99Us: 7 }]),
 *   { iops: 2, p99Us: 8 });
 * assert.equal(summarizeFio([{ error: "x" }]), null);
 * ```
 */
export function summarizeFio(runs: (FioSample | RunFailure)[]): FioSample | null {
  const ok = runs.filter((r): r is FioSample => !("error" in r));
  if (ok.length === 0) return null;
  return { iops: median(ok.map((r) => r.iops)), p99Us: median(ok.map((r) => r.p99Us)) };
}

/**
 * The median of `xs` (mean of the middle two for an even count; NaN if empty).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { median } from "./compare_report.ts";
 * assert.equal(median([3, 1, 2]), 2);
 * assert.equal(median([4, 1, 2, 3]), 2.5);
 * ```
 */
export function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** True for a run that produced measurements. */
export function isSample(r: RunSample | RunFailure): r is RunSample {
  return !("error" in r);
}

/** Medians of every metric over the successful runs (each metric on its own). */
export function summarize(runs: (RunSample | RunFailure)[]): Summary | null {
  const ok = runs.filter(isSample);
  if (ok.length === 0) return null;
  const m = (f: (s: RunSample) => number) => median(ok.map(f));
  return {
    iops: m((s) => s.iops),
    p50Us: m((s) => s.p50Us),
    p99Us: m((s) => s.p99Us),
    serverCpuUsPerIo: m((s) => s.serverCpuUsPerIo),
    clientCpuUsPerIo: m((s) => s.clientCpuUsPerIo),
    clientBusyUsPerIo: m((s) => s.clientBusyUsPerIo),
    serverCores: m((s) => s.serverCores),
    clientCores: m((s) => s.clientCores),
    kicksPerIo: m((s) => s.kicksPerIo),
    waitsPerIo: m((s) => s.waitsPerIo),
    runs: ok.length,
    errors: ok.reduce((a, s) => a + s.errors, 0),
    ...(ok.some((s) => s.transferNs !== undefined)
      ? { farRuns: ok.filter(farPlacement).length }
      : {}),
  };
}

/** Ours over theirs of the median IOPS (NaN if either has no result). */
export function iopsRatio(c: Cell): number {
  if (!c.ours.median || !c.theirs.median) return NaN;
  return c.ours.median.iops / c.theirs.median.iops;
}

function fmtIops(n: number | undefined): string {
  if (n === undefined || !Number.isFinite(n)) return "-";
  return n >= 100_000
    ? `${(n / 1000).toFixed(0)}k`
    : n >= 10_000
    ? `${(n / 1000).toFixed(1)}k`
    : n.toFixed(0);
}

function fmtUs(n: number | undefined): string {
  if (n === undefined || !Number.isFinite(n)) return "-";
  return n >= 1000 ? n.toFixed(0) : n >= 100 ? n.toFixed(1) : n.toFixed(2);
}

/**
 * "a/b": how many of ours' and theirs' runs saw the far CPU placement
 * (compare_client.ts farPlacement), "-" when not probed.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { farCount, type Summary } from "./compare_report.ts";
 * assert.equal(farCount({ farRuns: 2 } as Summary, { farRuns: 0 } as Summary), "2/0");
 * assert.equal(farCount(undefined, undefined), "-");
 * ```
 */
export function farCount(o: Summary | undefined, t: Summary | undefined): string {
  if (o?.farRuns === undefined && t?.farRuns === undefined) return "-";
  return `${o?.farRuns ?? "-"}/${t?.farRuns ?? "-"}`;
}

/** Whether any cell's runs were probed for CPU placement (pinned CPUs). */
export function anyProbed(cells: Cell[]): boolean {
  return cells.some((c) => c.ours.median?.farRuns !== undefined);
}

/**
 * Removes column `name` from a table's `head` and every row (in place).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { dropColumn } from "./compare_report.ts";
 * const head = ["a", "b", "c"], rows = [["1", "2", "3"]];
 * dropColumn(head, rows, "b");
 * assert.deepEqual([head, rows], [["a", "c"], [["1", "3"]]]);
 * ```
 */
export function dropColumn(head: string[], rows: string[][], name: string): void {
  const i = head.indexOf(name);
  if (i < 0) return;
  head.splice(i, 1);
  for (const r of rows) r.splice(i, 1);
}

function fmtRate(n: number | undefined): string {
  if (n === undefined || !Number.isFinite(n)) return "-";
  return n.toFixed(n >= 1 ? 2 : 3);
}

/**
 * The comparison table: one row per cell, medians of both servers side by
 * side (o = ours, t = theirs, latencies and CPU per request in us; kicks
 * and waits are blkgen's eventfd writes and sleeps per request; "IOPS fio"
 * is fio straight on the image, the disk's ceiling, in file cells; the
 * column is left out when no cell has one).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { formatTable } from "./compare_report.ts";
 * assert.equal(formatTable([]).split("\n").length, 2);
 * ```
 */
export function formatTable(cells: Cell[]): string {
  const head = [
    "backend",
    "pattern",
    "q",
    "QD",
    "ind",
    "IOPS o",
    "IOPS t",
    "o/t",
    "IOPS fio",
    "p50 o",
    "p50 t",
    "p99 o",
    "p99 t",
    "cpu/IO o",
    "cpu/IO t",
    "kick/IO o",
    "kick/IO t",
    "wait/IO o",
    "wait/IO t",
    "far o/t",
  ];
  const rows = cells.map((c) => {
    const o = c.ours.median ?? undefined, t = c.theirs.median ?? undefined;
    const ratio = iopsRatio(c);
    return [
      c.backend,
      c.pattern,
      String(c.queues),
      String(c.qd),
      c.indirect ? "on" : "off",
      fmtIops(o?.iops),
      fmtIops(t?.iops),
      Number.isFinite(ratio) ? ratio.toFixed(2) : "-",
      fmtIops(c.fio?.median?.iops),
      fmtUs(o?.p50Us),
      fmtUs(t?.p50Us),
      fmtUs(o?.p99Us),
      fmtUs(t?.p99Us),
      fmtUs(o?.serverCpuUsPerIo),
      fmtUs(t?.serverCpuUsPerIo),
      fmtRate(o?.kicksPerIo),
      fmtRate(t?.kicksPerIo),
      fmtRate(o?.waitsPerIo),
      fmtRate(t?.waitsPerIo),
      farCount(o, t),
    ];
  });
  // The placement column only when runs were probed (pinned CPUs), the fio
  // column only when some cell has a ceiling (file backends).
  if (!anyProbed(cells)) dropColumn(head, rows, "far o/t");
  if (!cells.some((c) => c.fio !== undefined)) dropColumn(head, rows, "IOPS fio");
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  // Text columns left-aligned, numbers right-aligned.
  const line = (r: string[]) =>
    r.map((x, i) => i < 2 ? x.padEnd(widths[i]) : x.padStart(widths[i])).join("  ").trimEnd();
  return [line(head), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}

/** blkgen's load while driving one server at the check point. */
export interface ClientLoad {
  server: ServerName;
  iops: number;
  /** blkgen's busy time per request (passes with completions, not waiting). */
  clientCpuUsPerIo: number;
  /** clientCpuUsPerIo x IOPS: cores blkgen kept busy. */
  clientCores: number;
  serverCores: number;
}

/** Whether blkgen limited the measurement (null-co, QD128: the fastest cell). */
export interface ClientCheck {
  backend: BackendName;
  pattern: ComparePattern;
  queues: number;
  /** blkgen threads for those queues. */
  threads: number;
  qd: number;
  indirect: boolean;
  loads: ClientLoad[];
  /** Some load had the client at or above {@link CLIENT_BOUND_CORES}. */
  clientBound: boolean;
  /** One line per server and a verdict, as printed. */
  text: string;
}

/** blkgen busy for this share of a core or more: it is (close to) the bottleneck. */
export const CLIENT_BOUND_CORES = 0.8;

/** Builds the load-generator-bottleneck verdict from the check cell's medians. */
export function clientCheck(c: Cell, cores: number): ClientCheck {
  const loads: ClientLoad[] = [];
  for (const name of ["ours", "theirs"] as const) {
    const m = c[name].median;
    if (!m) continue;
    loads.push({
      server: name,
      iops: m.iops,
      clientCpuUsPerIo: m.clientBusyUsPerIo,
      clientCores: (m.clientBusyUsPerIo * m.iops) / 1e6,
      serverCores: (m.serverCpuUsPerIo * m.iops) / 1e6,
    });
  }
  const clientBound = loads.some((l) => l.clientCores >= CLIENT_BOUND_CORES);
  const lines = loads.map((l) =>
    `  vs ${l.server.padEnd(6)}: ${fmtIops(l.iops)} IOPS, blkgen ${
      fmtUs(l.clientCpuUsPerIo)
    } us/IO = ${l.clientCores.toFixed(2)} core, server ${l.serverCores.toFixed(2)} core`
  );
  let verdict: string;
  if (loads.length === 0) {
    verdict = "  no result: cannot tell";
  } else if (clientBound) {
    verdict = `  CLIENT-BOUND: blkgen uses >= ${CLIENT_BOUND_CORES} of a core; ` +
      "results at this rate measure blkgen as much as the server";
  } else if (loads.some((l) => l.clientCores + l.serverCores >= 0.9 * cores)) {
    verdict = `  the ${cores} CPUs are saturated by client + server together; ` +
      "blkgen alone is not the bottleneck";
  } else {
    verdict = "  blkgen is not the bottleneck (well under one core)";
  }
  const text = [
    `client check (${c.backend}, ${c.pattern}, ${c.queues} queue(s), QD${c.qd}` +
    `${c.indirect ? ", INDIRECT" : ""}${c.queues > 1 ? `, ${c.threads} blkgen thread(s)` : ""}):`,
    ...lines,
    verdict,
  ].join("\n");
  return {
    backend: c.backend,
    pattern: c.pattern,
    queues: c.queues,
    threads: c.threads,
    qd: c.qd,
    indirect: c.indirect,
    loads,
    clientBound,
    text,
  };
}
