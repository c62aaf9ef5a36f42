// QEMU's leaky-bucket arithmetic (util/throttle.c) against hand-computed
// cases, on a virtual clock: bucket sizes, waits, leaks, bursts (max and
// max-length), iops-size, per-direction buckets, and throttle_is_valid.
import assert from "node:assert/strict";
import { ThrottleDirection, ThrottleState } from "../../../block/throttle/throttle_state.ts";
import {
  type ThrottleConfig,
  throttleConfigInit,
  throttleIsValid,
} from "../../../block/throttle/throttle_config.ts";

const READ = ThrottleDirection.Read, WRITE = ThrottleDirection.Write;

function state(edit: (c: ThrottleConfig) => void): ThrottleState {
  const c = throttleConfigInit();
  edit(c);
  assert.equal(throttleIsValid(c), null);
  const ts = new ThrottleState();
  ts.config(c, 0);
  return ts;
}

/**
 * A client that always has a request ready: issues one whenever the wait is
 * 0, else sleeps exactly the wait. Returns the times (ns) requests went.
 */
function greedy(ts: ThrottleState, dir: ThrottleDirection, bytes: number, endNs: number): number[] {
  const went: number[] = [];
  let now = 0;
  while (now < endNs) {
    const wait = ts.computeWaitFor(dir, now);
    if (wait === 0) {
      ts.account(dir, bytes);
      went.push(now);
    } else now += wait;
  }
  return went;
}

const inWindow = (t: number[], from: number, to: number) =>
  t.filter((x) => x >= from * 1e9 && x < to * 1e9).length;

Deno.test("throttle state: avg only, the bucket holds avg / 10 before waits", () => {
  const ts = state((c) => c.buckets["iops-total"].avg = 100);
  // Bucket size 10: 11 requests go at once (the 11th finds level 10, not over).
  for (let i = 0; i < 11; i++) {
    assert.equal(ts.computeWaitFor(READ, 0), 0, `request ${i}`);
    ts.account(READ, 512);
  }
  // Level 11, one over: 1 / 100 s.
  assert.equal(ts.computeWaitFor(READ, 0), 10_000_000);
  assert.equal(ts.computeWaitFor(WRITE, 0), 10_000_000, "iops-total counts both directions");
  // 4 ms leak 0.4: 0.6 over: 6 ms.
  // (whole ns, truncated as QEMU's int64: 5999999.99... -> 5999999).
  assert(Math.abs(ts.computeWaitFor(READ, 4_000_000) - 6_000_000) <= 1);
  assert.equal(ts.computeWaitFor(READ, 10_000_000), 0);
  assert.deepEqual(ts.level("iops-total"), { level: 10, burstLevel: 0 });
  // Never below 0: a long idle time empties it.
  ts.doLeak(60e9);
  assert.deepEqual(ts.level("iops-total"), { level: 0, burstLevel: 0 });
});

Deno.test("throttle state: a greedy client gets avg over 10 s", () => {
  const ts = state((c) => c.buckets["iops-total"].avg = 200);
  const t = greedy(ts, READ, 4096, 10e9);
  // 21 at t=0 (bucket 20, plus the one that finds it full), then 200/s.
  assert.equal(inWindow(t, 0, 1e-9), 21);
  assert(Math.abs(t.length - (21 + 2000)) <= 1, `${t.length}`);
  assert(Math.abs(inWindow(t, 5, 10) - 1000) <= 1);
});

Deno.test("throttle state: bps counts bytes; a big request may take the bucket over", () => {
  const ts = state((c) => c.buckets["bps-total"].avg = 1 << 20); // bucket 104857.6 bytes
  ts.account(WRITE, 1 << 20); // 1 MiB at once: allowed, the bucket was empty
  // Over by 1 MiB - 104857.6 B at 1 MiB/s: 0.9 s.
  assert.equal(ts.computeWaitFor(READ, 0), 900_000_000);
  const t = greedy(ts, READ, 65536, 10e9);
  // After the 0.9 s, 16 x 64 KiB a second.
  assert(Math.abs(inWindow(t, 1, 10) - 9 * 16) <= 1, `${inWindow(t, 1, 10)}`);
});

Deno.test("throttle state: burst at max for max-length, then back to avg", () => {
  const ts = state((c) => c.buckets["iops-total"] = { avg: 10, max: 100, burstLength: 2 });
  // Burst bucket max / 10 = 10: 11 at once, then one every 1 / max s.
  for (let i = 0; i < 11; i++) {
    assert.equal(ts.computeWaitFor(READ, 0), 0);
    ts.account(READ, 512);
  }
  assert.deepEqual(ts.level("iops-total"), { level: 11, burstLevel: 11 });
  assert.equal(ts.computeWaitFor(READ, 0), 10_000_000); // (11 - 10) / 100 s
  const ts2 = state((c) => c.buckets["iops-total"] = { avg: 10, max: 100, burstLength: 2 });
  const t = greedy(ts2, READ, 512, 10e9);
  // The main bucket holds max * max-length = 200 and leaks at 10/s while it
  // fills at 100/s: from 11 at t=0 it is full when 11 + 90 t = 200, t = 2.1 s,
  // after 11 + 100 * 2.1 = 221 requests.
  assert(Math.abs(inWindow(t, 0, 1) - 110) <= 1, `first second: ${inWindow(t, 0, 1)}`);
  assert(Math.abs(inWindow(t, 1, 2) - 100) <= 1, `second second: ${inWindow(t, 1, 2)}`);
  assert(Math.abs(inWindow(t, 0, 2.1) - 221) <= 2, `burst: ${inWindow(t, 0, 2.1)}`);
  assert(Math.abs(inWindow(t, 2.2, 3.2) - 10) <= 1, `just after: ${inWindow(t, 2.2, 3.2)}`);
  // Then avg: 10/s.
  assert(Math.abs(inWindow(t, 3, 10) - 70) <= 1, `after: ${inWindow(t, 3, 10)}`);
});

Deno.test("throttle state: max with max-length 1 is a bigger bucket, no burst limit", () => {
  const ts = state((c) => c.buckets["iops-total"] = { avg: 10, max: 50, burstLength: 1 });
  // Bucket max * 1 = 50: 51 at once (no burst bucket below 2 s).
  const t = greedy(ts, READ, 512, 5e9);
  assert.equal(inWindow(t, 0, 1e-9), 51);
  assert(Math.abs(inWindow(t, 1, 5) - 40) <= 1);
  assert.equal(ts.level("iops-total").burstLevel, 0);
});

Deno.test("throttle state: read and write buckets are separate; totals see both", () => {
  const ts = state((c) => {
    c.buckets["bps-read"].avg = 1000;
    c.buckets["iops-write"].avg = 10;
  });
  ts.account(READ, 1100); // bucket 100: over by 1000 bytes: 1 s
  assert.equal(ts.computeWaitFor(READ, 0), 1e9);
  assert.equal(ts.computeWaitFor(WRITE, 0), 0, "writes do not see bps-read");
  ts.account(WRITE, 1 << 20);
  ts.account(WRITE, 1 << 20); // iops-write bucket 1: level 2, 0.1 s
  assert.equal(ts.computeWaitFor(WRITE, 0), 100_000_000);
  assert.equal(ts.level("bps-read").level, 1100, "writes are not counted in bps-read");
});

Deno.test("throttle state: iops-size counts a big request as several operations", () => {
  const ts = state((c) => {
    c.buckets["iops-total"].avg = 100;
    c.iopsSize = 4096;
  });
  ts.account(READ, 16384); // 4 units
  ts.account(READ, 512); // smaller than iops-size: 1
  ts.account(READ, 6144); // 1.5
  assert.equal(ts.level("iops-total").level, 6.5);
});

Deno.test("throttle state: config empties the buckets and restarts the leak clock", () => {
  const ts = state((c) => c.buckets["iops-total"].avg = 10);
  for (let i = 0; i < 5; i++) ts.account(READ, 512);
  assert(ts.computeWaitFor(READ, 0) > 0);
  const c = ts.getConfig();
  assert.equal(c.buckets["iops-total"].avg, 10);
  c.buckets["iops-total"].avg = 20;
  ts.config(c, 7e9);
  assert.equal(ts.level("iops-total").level, 0);
  assert.equal(ts.computeWaitFor(READ, 7e9), 0);
  assert.equal(ts.getConfig().buckets["iops-total"].avg, 20);
});

Deno.test("throttle config: QEMU's validation messages", () => {
  const cases: [(c: ThrottleConfig) => void, string | null][] = [
    [(c) => c.buckets["iops-total"].avg = 1, null],
    [(c) => {
      c.buckets["bps-total"].avg = 1;
      c.buckets["bps-read"].avg = 1;
    }, "bps/iops/max total values and read/write values cannot be used at the same time"],
    [(c) => {
      c.buckets["iops-total"] = { avg: 1, max: 2, burstLength: 1 };
      c.buckets["iops-write"] = { avg: 0, max: 2, burstLength: 1 };
    }, "bps/iops/max total values and read/write values cannot be used at the same time"],
    [
      (c) => c.buckets["bps-write"].max = 5,
      "bps_max/iops_max require corresponding bps/iops values",
    ],
    [
      (c) => c.buckets["bps-write"] = { avg: 10, max: 5, burstLength: 1 },
      "bps_max/iops_max cannot be lower than bps/iops",
    ],
    [
      (c) => c.buckets["iops-read"] = { avg: 10, max: 0, burstLength: 3 },
      "burst length set without burst rate",
    ],
    [
      (c) => c.buckets["iops-read"] = { avg: 10, max: 20, burstLength: 0 },
      "the burst length cannot be 0",
    ],
    [
      (c) => c.buckets["bps-total"].avg = 1e15 + 1,
      "bps/iops/max values must be within [0, 1000000000000000]",
    ],
    [
      (c) => c.buckets["bps-total"] = { avg: 1e9, max: 1e12, burstLength: 1e4 },
      "burst length too high for this burst rate",
    ],
    [(c) => c.iopsSize = 4096, "iops size requires an iops value to be set"],
    [
      (c) => c.buckets["iops-total"].avg = -1,
      "bps/iops/max values must be within [0, 1000000000000000]",
    ],
  ];
  for (const [edit, want] of cases) {
    const c = throttleConfigInit();
    edit(c);
    assert.equal(throttleIsValid(c), want);
  }
});
