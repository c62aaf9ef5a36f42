/**
 * The README's performance tables from a `deno task compare` JSON report:
 * one Markdown row per cell with both servers' medians, the ratio, fio's
 * ceiling where there is one, p99, server CPU per request, and how many runs
 * of each server saw the far CPU placement (compare_client.ts farPlacement).
 *
 * Run: `deno run -A bench/compare_markdown.ts [bench/results/compare.json]`
 *
 * @module
 */

import type { Cell } from "./compare_report.ts";
import { anyProbed, dropColumn, farCount, iopsRatio } from "./compare_report.ts";

function iops(n: number | undefined): string {
  if (n === undefined || !Number.isFinite(n)) return "-";
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(n >= 1e5 ? 0 : 1)}k`;
  return n.toFixed(0);
}

function us(n: number | undefined): string {
  if (n === undefined || !Number.isFinite(n)) return "-";
  return n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2);
}

const BACKEND_NAMES: Record<string, string> = {
  "null-co": "null-co",
  native: "file, native",
  io_uring: "file, io_uring",
};

/**
 * The Markdown table of `cells` (ours = dataplane, qsd = qemu-storage-daemon;
 * latency and CPU in us; CPU is the server's per request; a 2-queue row
 * counts both queues).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { markdownTable } from "./compare_markdown.ts";
 * const m = { iops: 2e6, p50Us: 9, p99Us: 50, serverCpuUsPerIo: 0.3, clientCpuUsPerIo: 0.1,
 *   clientBusyUsPerIo: 0.1, serverCores: 0.6, clientCores: 0.2, kicksPerIo: 0, waitsPerIo: 0,
 *   runs: 5, errors: 0 };
 * const t = markdownTable([{ backend: "null-co", pattern: "randread", queues: 1, threads: 1, qd: 32,
 *   indirect: false, ours: { runs: [], median: m },
 *   theirs: { runs: [], median: { ...m, iops: 1e6 } } }]);
 * assert.match(t, /\| null-co +\| randread +\| 1 +\| 32 +\| 2.00M +\| 1.00M +\| \*\*2.00\*\* +\| - /);
 * ```
 */
export function markdownTable(cells: Cell[]): string {
  const head = [
    "backend",
    "pattern",
    "queues",
    "QD",
    "ours IOPS",
    "qsd IOPS",
    "ours/qsd",
    "fio IOPS",
    "p99 ours",
    "p99 qsd",
    "CPU ours",
    "CPU qsd",
    "far runs",
  ];
  const rows = cells.map((c) => {
    const o = c.ours.median ?? undefined, t = c.theirs.median ?? undefined;
    const r = iopsRatio(c);
    const ratio = Number.isFinite(r) ? (r >= 1.3 ? `**${r.toFixed(2)}**` : r.toFixed(2)) : "-";
    return [
      BACKEND_NAMES[c.backend] ?? c.backend,
      c.pattern,
      String(c.queues),
      `${c.qd}${c.indirect ? " ind." : ""}`,
      iops(o?.iops),
      iops(t?.iops),
      ratio,
      iops(c.fio?.median?.iops),
      us(o?.p99Us),
      us(t?.p99Us),
      us(o?.serverCpuUsPerIo),
      us(t?.serverCpuUsPerIo),
      farCount(o, t),
    ];
  });
  if (!anyProbed(cells)) dropColumn(head, rows, "far runs");
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((x) => x[i].length)));
  const line = (x: string[]) => `| ${x.map((v, i) => v.padEnd(widths[i])).join(" | ")} |`;
  return [line(head), `| ${widths.map((w) => "-".repeat(w)).join(" | ")} |`, ...rows.map(line)]
    .join("\n");
}

if (import.meta.main) {
  const path = Deno.args[0] ?? "bench/results/compare.json";
  const report = JSON.parse(await Deno.readTextFile(path)) as {
    generated: string;
    options: { mode: string; rounds: number; durationMs: number };
    cells: Cell[];
  };
  const o = report.options;
  console.log(
    `<!-- ${path}: ${report.generated}, ${o.mode} mode, medians of ${o.rounds} x ${o.durationMs} ms -->`,
  );
  console.log(markdownTable(report.cells));
}
