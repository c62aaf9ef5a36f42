// `deno task compare` end to end in its quick mode, cut down to null-co
// randread at QD 1 and 32 on one queue: both servers start, blkgen drives
// both, and the table, JSON and SVG come out with positive IOPS, server CPU
// and blkgen's notification counts for each. Not a speed test: nothing here
// compares the two servers.

import assert from "node:assert/strict";
import type { Cell } from "../../bench/compare_report.ts";
import { runFio } from "../../bench/compare_fio.ts";
import { makeScratchDir, REPO_ROOT } from "../harness/mod.ts";

Deno.test("compare --quick: table, JSON and SVG for both servers on null-co", async () => {
  const dir = await makeScratchDir("compare-test");
  try {
    const svg = `${dir}/compare.svg`;
    const json = `${dir}/compare.json`;
    const out = await new Deno.Command(`${REPO_ROOT}/deno`, {
      args: [
        "run",
        "-A",
        "bench/compare.ts",
        "--quick",
        "--backend",
        "null-co",
        "--pattern",
        "randread",
        "--qd",
        "1,32",
        "--indirect-qd",
        "",
        "--queues",
        "1",
        "--duration-ms",
        "200",
        "--warmup-ms",
        "100",
        "--dir",
        dir,
        "--svg",
        svg,
        "--json",
        json,
      ],
      cwd: REPO_ROOT,
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stdout = new TextDecoder().decode(out.stdout);
    const stderr = new TextDecoder().decode(out.stderr);
    assert.ok(out.success, `compare exited with ${out.code}:\n${stdout}\n${stderr}`);

    // The table: a header and one row per cell, both servers' IOPS filled in.
    const rows = stdout.split("\n").filter((l) => /^null-co\s+randread\s+1\s+(1|32)\s/.test(l));
    assert.equal(rows.length, 2, stdout);
    for (const r of rows) assert.doesNotMatch(r, /\s-\s/, `a missing value in: ${r}`);
    assert.match(stdout, /QD\s+ind\s+IOPS o\s+IOPS t\s+o\/t/);
    assert.match(stdout, /kick\/IO o\s+kick\/IO t\s+wait\/IO o\s+wait\/IO t/);
    assert.match(stdout, /client check \(null-co, randread, 1 queue\(s\), QD128\)/);

    // One blkgen thread for all queues when blkgen has one CPU (pinned), else one per queue.
    assert.match(stdout, /one blkgen thread (for all queues|per queue)/);

    const report = JSON.parse(await Deno.readTextFile(json)) as {
      options: { pinned: boolean; clientThreads: string };
      cells: Cell[];
      clientCheck: { loads: { server: string; iops: number }[] };
    };
    assert.deepEqual(report.cells.map((c) => [c.qd, c.indirect]), [[1, false], [32, false]]);
    assert.equal(report.options.clientThreads, report.options.pinned ? "1" : "queues");
    assert.ok(report.cells.every((c) => c.threads === 1), "1 queue: 1 blkgen thread");
    for (const c of report.cells) {
      for (const name of ["ours", "theirs"] as const) {
        const m = c[name].median;
        assert.ok(m && m.iops > 0, `${name} QD${c.qd}: ${JSON.stringify(c[name].runs)}`);
        assert.ok(m.p99Us >= m.p50Us && m.p50Us > 0);
        assert.ok(m.serverCpuUsPerIo > 0 && m.clientCpuUsPerIo > 0);
        assert.ok(m.clientBusyUsPerIo > 0);
        for (const r of c[name].runs) {
          if ("error" in r) continue;
          // blkgen's busy time is wall time of its passes with completions: on a loaded
          // machine a preempted pass makes it exceed its CPU time, but one queue thread can
          // never be busy for longer than the window.
          assert.ok(r.clientCores <= 1.01, `${name} QD${c.qd}: busy ${r.clientCores} cores`);
        }
        assert.ok(m.kicksPerIo >= 0 && m.waitsPerIo >= 0);
        // Pinned: every run timed a cache line between the two CPUs before and after
        // (a transfer takes tens to hundreds of ns; -1 only if a CPU was too busy).
        if (report.options.pinned) {
          assert.equal(m.farRuns !== undefined, true, `${name} QD${c.qd}: not probed`);
          for (const r of c[name].runs) {
            if ("error" in r) continue;
            const t = r.transferNs!;
            for (const ns of [t.before, t.after]) {
              assert.ok(ns === -1 || (ns > 1 && ns < 1e5), `${ns}`);
            }
            assert.ok(t.before > 0 || t.after > 0, `${name} QD${c.qd}: no probe answered`);
          }
        } else {
          assert.equal(m.farRuns, undefined);
        }
      }
    }
    assert.match(stdout, report.options.pinned ? /far o\/t/ : /wait\/IO t\n/);
    assert.deepEqual(report.clientCheck.loads.map((l) => l.server), ["ours", "theirs"]);
    assert.ok(report.clientCheck.loads.every((l) => l.iops > 0));

    const chart = await Deno.readTextFile(svg);
    assert.match(chart, /^<svg xmlns="http:\/\/www.w3.org\/2000\/svg"/);
    assert.match(chart, /null-co randread, 1 queue: IOPS/);
    assert.match(chart, /null-co randread, 1 queue: p99 latency/);
    // Two servers x two panels: a line each.
    assert.equal(chart.match(/<polyline /g)?.length, 4);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("compare's fio ceiling: fio runs the file cell's workload and its report parses", async () => {
  const dir = await makeScratchDir("compare-fio-test");
  try {
    const image = `${dir}/disk.raw`;
    await Deno.writeFile(image, new Uint8Array(8 << 20).fill(0x5a));
    for (const backend of ["native", "io_uring"] as const) {
      for (const pattern of ["randread", "randwrite"] as const) {
        const r = await runFio({
          backend,
          image,
          pattern,
          queues: 2,
          qd: 4,
          durationMs: 200,
          warmupMs: 50,
        });
        assert.ok(!("error" in r), `${backend} ${pattern}: ${JSON.stringify(r)}`);
        assert.ok(r.iops > 0 && r.p99Us > 0, `${backend} ${pattern}: ${JSON.stringify(r)}`);
      }
    }
    // A file fio cannot open is a failure to report, not an exception.
    const bad = await runFio({
      backend: "native",
      image: `${dir}/missing/disk.raw`,
      pattern: "randread",
      queues: 1,
      qd: 1,
      durationMs: 100,
      warmupMs: 0,
    });
    assert.ok("error" in bad, JSON.stringify(bad));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
