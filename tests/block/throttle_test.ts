// Throttling: QEMU's leaky buckets (block/throttle_state.ts) on a virtual
// clock, so rates are exact and the test is not timing-sensitive: a greedy
// client gets the average rate over 10 s (within 1 request or byte of the
// bucket), a burst runs at `max` for `max-length` seconds and then falls back
// to the average, reads and writes count in their own and the total buckets,
// new limits take effect at once; and the throttle filter driver on a real
// AioContext holds requests in order and lets them through as the bucket
// leaks.
import assert from "node:assert/strict";
import { AioContext } from "../../aio/mod.ts";
import {
  IoVector,
  noThrottle,
  NullCoDriver,
  THROTTLE_STATE_BYTES,
  type ThrottleConfig,
  throttleConfigError,
  ThrottleDriver,
  ThrottleState,
} from "../../block/mod.ts";

const S = 1e9;

/**
 * A client that issues a request whenever the buckets allow, on a virtual
 * clock advanced to each wait; returns how many requests of `bytes` went in
 * `[from, to)` seconds of the run (which lasts `to` seconds).
 */
function greedy(
  c: ThrottleConfig,
  seconds: number,
  opts: { bytes?: number; write?: (i: number) => boolean } = {},
): { times: number[]; reads: number; writes: number } {
  const s = new ThrottleState(new ArrayBuffer(THROTTLE_STATE_BYTES));
  s.configure(c, 0);
  const times: number[] = [];
  let now = 0, reads = 0, writes = 0;
  for (let i = 0; now < seconds * S; i++) {
    const w = opts.write?.(i) ?? false;
    for (;;) {
      const wait = s.acquire(now, w, opts.bytes ?? 4096);
      if (wait === 0) break;
      now += wait;
    }
    if (now >= seconds * S) break;
    times.push(now / S);
    if (w) writes++;
    else reads++;
  }
  return { times, reads, writes };
}

const inWindow = (t: number[], from: number, to: number) =>
  t.filter((x) => x >= from && x < to).length;

Deno.test("throttle: iops-total, bps-total and iops-size give the average over 10 s", () => {
  const c = noThrottle();
  c.buckets["iops-total"].avg = 500;
  const r = greedy(c, 10);
  // 500/s for 10 s plus the bucket's avg / 10 (+1) at the start.
  assert(Math.abs(r.times.length - 5051) <= 1, `${r.times.length}`);

  const b = noThrottle();
  b.buckets["bps-total"].avg = 1 << 20; // 1 MiB/s of 64 KiB reads: 16/s
  const rb = greedy(b, 10, { bytes: 65536 });
  const bytes = rb.times.length * 65536;
  assert(Math.abs(bytes - 10 * (1 << 20)) <= 0.1 * (1 << 20) + 65536, `${bytes}`);

  const sz = noThrottle();
  sz.buckets["iops-total"].avg = 100;
  sz.iopsSize = 4096; // a 64 KiB request counts as 16 operations
  const rs = greedy(sz, 10, { bytes: 65536 });
  assert(Math.abs(rs.times.length - 1000 / 16) <= 2, `${rs.times.length}`);
});

Deno.test("throttle: a burst at max for max-length seconds, then the average", () => {
  const c = noThrottle();
  c.buckets["iops-total"] = { avg: 100, max: 1000, burstLength: 2 };
  const r = greedy(c, 10);
  // The first 2 s run at about max (the bucket of max * 2 fills at max - avg
  // a second), then the average.
  const first = inWindow(r.times, 0, 2);
  assert(first >= 1900 && first <= 2100, `burst ${first}`);
  for (let s = 4; s < 10; s++) {
    const n = inWindow(r.times, s, s + 1);
    assert(n >= 99 && n <= 101, `second ${s}: ${n}`);
  }
  // max-length 1: a burst of `max` requests at once, then the average.
  const one = noThrottle();
  one.buckets["iops-total"] = { avg: 100, max: 500, burstLength: 1 };
  const r1 = greedy(one, 5);
  assert(inWindow(r1.times, 0, 0.001) >= 500, "an instant burst of max");
  assert(Math.abs(inWindow(r1.times, 2, 5) - 300) <= 2);
});

Deno.test("throttle: read and write buckets; new limits apply at once", () => {
  const c = noThrottle();
  c.buckets["iops-read"].avg = 100;
  c.buckets["iops-write"].avg = 300;
  // Alternating: the reads hold the pace (a write waits behind each read).
  const r = greedy(c, 10, { write: (i) => i % 2 === 1 });
  assert(Math.abs(r.reads - 1010) <= 2, `reads ${r.reads}`);
  assert(Math.abs(r.writes - r.reads) <= 1);
  // Writes only: their own bucket.
  const w = greedy(c, 10, { write: () => true });
  assert(Math.abs(w.writes - 3030) <= 2, `writes ${w.writes}`);

  const s = new ThrottleState(new ArrayBuffer(THROTTLE_STATE_BYTES));
  s.configure(c, 0);
  while (s.acquire(0, false, 512) === 0) { /* empty the read bucket */ }
  const higher = noThrottle();
  higher.buckets["iops-read"].avg = 1e6;
  s.configure(higher, 0);
  assert.equal(s.acquire(0, false, 512), 0, "new limits, empty buckets");
  assert.deepEqual(s.config().buckets["iops-read"], { avg: 1e6, max: 0, burstLength: 1 });
});

Deno.test("throttle: QEMU's configuration checks", () => {
  const c = noThrottle();
  c.buckets["iops-total"].avg = 100;
  c.buckets["iops-read"].avg = 10;
  assert.match(throttleConfigError(c)!, /iops-total cannot be used at the same time/);
  const m = noThrottle();
  m.buckets["bps-write"] = { avg: 0, max: 100, burstLength: 1 };
  assert.match(throttleConfigError(m)!, /bps-write-max requires bps-write/);
  const l = noThrottle();
  l.buckets["bps-read"] = { avg: 10, max: 0, burstLength: 5 };
  assert.match(throttleConfigError(l)!, /max-length requires bps-read-max/);
  assert.equal(throttleConfigError(noThrottle()), null);
});

Deno.test("throttle driver: waiting requests go in order as the bucket leaks", async () => {
  const ctx = new AioContext();
  const state = new ThrottleState(new ArrayBuffer(THROTTLE_STATE_BYTES));
  const c = noThrottle();
  c.buckets["iops-write"].avg = 200; // a bucket of 20 (+1), then one per 5 ms
  state.configure(c, ctx.now());
  const d = new ThrottleDriver(ctx, new NullCoDriver(ctx, { size: 1 << 20 }), state);
  try {
    const qiov = IoVector.fromBuffers([new Uint8Array(512)]);
    const order: number[] = [];
    const t0 = ctx.now();
    for (let i = 0; i < 31; i++) d.pwritev(i * 512, qiov, () => order.push(i));
    // Reads are not held by the write bucket.
    let read = false;
    d.preadv(0, qiov, () => read = true);
    while (!read) ctx.poll(true);
    assert(order.length < 31, "writes still held");
    assert(d.throttled > 0);
    while (order.length < 31) ctx.poll(true);
    assert.deepEqual(order, [...Array(31).keys()], "in order");
    assert(ctx.now() - t0 >= 40e6, `${(ctx.now() - t0) / 1e6} ms`);
    assert.equal(d.throttled, 0);
  } finally {
    await d.close();
    ctx.close();
  }
});

Deno.test("throttle driver: a drained section releases what it holds", async () => {
  const ctx = new AioContext();
  const state = new ThrottleState(new ArrayBuffer(THROTTLE_STATE_BYTES));
  const c = noThrottle();
  c.buckets["iops-total"].avg = 1; // one a second
  state.configure(c, ctx.now());
  const d = new ThrottleDriver(ctx, new NullCoDriver(ctx, { size: 1 << 20 }), state);
  try {
    const qiov = IoVector.fromBuffers([new Uint8Array(512)]);
    let done = 0;
    for (let i = 0; i < 10; i++) d.preadv(0, qiov, () => done++);
    for (let i = 0; i < 5; i++) ctx.poll(false);
    assert(done <= 2, `${done} went`);
    const t0 = ctx.now();
    d.releaseHeld();
    while (done < 10) ctx.poll(true);
    assert(ctx.now() - t0 < 1e9, "released, not leaked out at 1/s");
    assert.equal(d.throttled, 0);
  } finally {
    await d.close();
    ctx.close();
  }
});
