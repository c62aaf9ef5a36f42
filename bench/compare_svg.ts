/**
 * The chart of `deno task compare` as hand-written SVG (no dependencies): one
 * row per backend / pattern / queues, with IOPS against queue depth on the
 * left and p99 latency (log scale) against queue depth on the right, both
 * servers as lines.
 *
 * @module
 */

import type { Cell, Summary } from "./compare_report.ts";

const PANEL_W = 400;
const PANEL_H = 230;
const M = { left: 64, right: 16, top: 28, bottom: 36 };
const COLORS = { ours: "#1f77b4", theirs: "#ff7f0e" } as const;
const HEADER_H = 48;

/** Escapes text for SVG content and attributes. */
function esc(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(
    /"/g,
    "&quot;",
  );
}

/** A round upper bound for a linear axis and its tick step. */
function niceAxis(max: number): { top: number; step: number } {
  if (!(max > 0)) return { top: 1, step: 0.25 };
  const raw = max / 4;
  const p = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * p).find((s) => s >= raw)!;
  return { top: Math.ceil(max / step) * step, step };
}

function fmtTick(v: number): string {
  if (v >= 1e6) return `${+(v / 1e6).toFixed(2)}M`;
  if (v >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
  return `${+v.toFixed(2)}`;
}

type Metric = (s: Summary) => number;

/** One panel at (x0, y0): `metric` of both servers against the group's queue depths. */
function panel(
  cells: Cell[],
  x0: number,
  y0: number,
  title: string,
  metric: Metric,
  log: boolean,
): string {
  const out: string[] = [];
  const w = PANEL_W - M.left - M.right, h = PANEL_H - M.top - M.bottom;
  const px = x0 + M.left, py = y0 + M.top;
  const qds = cells.map((c) => c.qd);
  const xOf = (i: number) => px + (qds.length === 1 ? w / 2 : (i * w) / (qds.length - 1));
  const values = cells.flatMap((c) =>
    [c.ours.median, c.theirs.median].filter((m): m is Summary => m !== null).map(metric)
  ).filter((v) => Number.isFinite(v) && v > 0);
  let yOf: (v: number) => number;
  const ticks: number[] = [];
  if (log) {
    const lo = values.length ? Math.floor(Math.log10(Math.min(...values))) : 0;
    const hi = Math.max(lo + 1, values.length ? Math.ceil(Math.log10(Math.max(...values))) : 1);
    yOf = (v) => py + h - ((Math.log10(v) - lo) / (hi - lo)) * h;
    for (let e = lo; e <= hi; e++) ticks.push(10 ** e);
  } else {
    const { top, step } = niceAxis(values.length ? Math.max(...values) : 0);
    yOf = (v) => py + h - (v / top) * h;
    for (let v = 0; v <= top + step / 2; v += step) ticks.push(v);
  }
  out.push(
    `<text x="${px + w / 2}" y="${y0 + 18}" text-anchor="middle" class="t">${esc(title)}</text>`,
  );
  out.push(`<rect x="${px}" y="${py}" width="${w}" height="${h}" class="frame"/>`);
  for (const t of ticks) {
    const y = yOf(t).toFixed(1);
    out.push(`<line x1="${px}" x2="${px + w}" y1="${y}" y2="${y}" class="grid"/>`);
    out.push(`<text x="${px - 6}" y="${y}" dy="4" text-anchor="end">${fmtTick(t)}</text>`);
  }
  qds.forEach((qd, i) => {
    out.push(
      `<text x="${xOf(i).toFixed(1)}" y="${py + h + 16}" text-anchor="middle">${qd}</text>`,
    );
  });
  out.push(`<text x="${px + w / 2}" y="${py + h + 31}" text-anchor="middle">queue depth</text>`);
  for (const name of ["ours", "theirs"] as const) {
    const pts = cells.map((c, i) => {
      const m = c[name].median;
      const v = m ? metric(m) : NaN;
      return Number.isFinite(v) && (!log || v > 0) ? [xOf(i), yOf(v)] : null;
    }).filter((p): p is number[] => p !== null);
    if (pts.length > 1) {
      const d = pts.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
      out.push(`<polyline points="${d}" fill="none" stroke="${COLORS[name]}" stroke-width="2"/>`);
    }
    for (const [x, y] of pts) {
      out.push(
        `<circle cx="${x.toFixed(1)}" cy="${y.toFixed(1)}" r="3" fill="${COLORS[name]}"/>`,
      );
    }
  }
  return out.join("\n");
}

/**
 * Renders the chart for `cells` (any order; grouped by backend, pattern and
 * queues, each group's points ordered by queue depth).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { renderCompareSvg } from "./compare_svg.ts";
 * const svg = renderCompareSvg([], "empty");
 * assert(svg.startsWith("<svg"));
 * assert(svg.trimEnd().endsWith("</svg>"));
 * ```
 */
export function renderCompareSvg(cells: Cell[], subtitle: string): string {
  const groups = new Map<string, Cell[]>();
  for (const c of cells) {
    const key = `${c.backend} ${c.pattern}, ${c.queues} queue${c.queues > 1 ? "s" : ""}`;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key)!.push(c);
  }
  const width = 2 * PANEL_W;
  const height = HEADER_H + Math.max(1, groups.size) * PANEL_H;
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" ` +
    `viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="11">`,
    "<style>.t{font-size:12px;font-weight:bold}.frame{fill:none;stroke:#888}" +
    ".grid{stroke:#e4e4e4}</style>",
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="12" y="20" class="t">dataplane (ours) vs qemu-storage-daemon (theirs), 4 KiB</text>`,
    `<text x="12" y="38">${esc(subtitle)}</text>`,
  ];
  let lx = width - 200;
  for (const name of ["ours", "theirs"] as const) {
    out.push(
      `<line x1="${lx}" x2="${lx + 24}" y1="16" y2="16" stroke="${
        COLORS[name]
      }" stroke-width="3"/>`,
    );
    out.push(`<text x="${lx + 30}" y="20">${name}</text>`);
    lx += 90;
  }
  let y = HEADER_H;
  for (const [key, group] of groups) {
    group.sort((a, b) => a.qd - b.qd);
    out.push(panel(group, 0, y, `${key}: IOPS`, (s) => s.iops, false));
    out.push(panel(group, PANEL_W, y, `${key}: p99 latency (us)`, (s) => s.p99Us, true));
    y += PANEL_H;
  }
  out.push("</svg>");
  return out.join("\n") + "\n";
}
