import assert from "node:assert/strict";
import { AioContext } from "../../aio/mod.ts";

Deno.test("BH: FIFO order, once per schedule, schedule of a scheduled BH is a no-op", () => {
  const ctx = new AioContext();
  const log: string[] = [];
  const a = ctx.bhNew(() => log.push("a"), "a");
  const b = ctx.bhNew(() => log.push("b"), "b");
  const c = ctx.bhNew(() => log.push("c"), "c");
  c.schedule();
  a.schedule();
  b.schedule();
  a.schedule(); // no-op: keeps its place
  assert.ok(ctx.poll(false));
  assert.deepEqual(log, ["c", "a", "b"]);
  assert.equal(ctx.poll(false), false);
  assert.equal(ctx.stats.bhRuns, 3);
  ctx.close();
});

Deno.test("BH: cancel, reschedule after cancel goes to the tail, delete", () => {
  const ctx = new AioContext();
  const log: string[] = [];
  const a = ctx.bhNew(() => log.push("a"));
  const b = ctx.bhNew(() => log.push("b"));
  a.schedule();
  b.schedule();
  a.cancel();
  assert.equal(a.scheduled, false);
  a.schedule(); // now after b
  ctx.poll(false);
  assert.deepEqual(log, ["b", "a"]);
  b.schedule();
  b.delete();
  assert.equal(ctx.poll(false), false);
  assert.deepEqual(log, ["b", "a"]);
  assert.throws(() => b.schedule(), /scheduled after delete/);
  ctx.close();
});

Deno.test("BH: oneshot runs once and is deleted", () => {
  const ctx = new AioContext();
  let n = 0;
  ctx.scheduleOneshot(() => n++);
  ctx.scheduleOneshot(() => n += 10);
  ctx.poll(false);
  ctx.poll(false);
  assert.equal(n, 11);
  ctx.close();
});

Deno.test("BH: a BH scheduled from a BH runs in the next poll, never lost; poll(true) does not block on it", () => {
  const ctx = new AioContext();
  const log: number[] = [];
  let k = 0;
  const self = ctx.bhNew(() => {
    log.push(k);
    if (++k < 3) self.schedule(); // reschedules itself
  });
  const other = ctx.bhNew(() => log.push(100));
  const first = ctx.bhNew(() => {
    log.push(-1);
    other.schedule();
  });
  first.schedule();
  self.schedule();
  ctx.poll(false);
  assert.deepEqual(log, [-1, 0]);
  const t0 = performance.now();
  ctx.poll(true); // must not block: BHs are pending
  ctx.poll(true);
  assert.ok(performance.now() - t0 < 500);
  assert.deepEqual(log, [-1, 0, 100, 1, 2]);
  ctx.close();
});

Deno.test("BH: many BHs grow the queue and keep order", () => {
  const ctx = new AioContext();
  const out: number[] = [];
  const bhs = Array.from({ length: 1000 }, (_, i) => ctx.bhNew(() => out.push(i)));
  for (let i = 999; i >= 0; i--) bhs[i].schedule();
  ctx.poll(false);
  assert.deepEqual(out, Array.from({ length: 1000 }, (_, i) => 999 - i));
  ctx.close();
});

Deno.test("BH: a BH that polls nested runs the rest of the batch inside, none twice or lost (aio_bh_poll is nest-safe)", () => {
  const ctx = new AioContext();
  const log: string[] = [];
  const c = ctx.bhNew(() => log.push("c"), "c");
  const d = ctx.bhNew(() => log.push("d"), "d");
  const late = ctx.bhNew(() => log.push("late"), "late");
  const a = ctx.bhNew(() => {
    log.push("a");
    late.schedule();
    ctx.poll(false); // runs b, c, d (queued before) and late
    log.push("a-end");
  }, "a");
  const b = ctx.bhNew(() => log.push("b"), "b");
  a.schedule();
  b.schedule();
  c.schedule();
  d.schedule();
  assert.ok(ctx.poll(false));
  assert.deepEqual(log, ["a", "b", "c", "d", "late", "a-end"]);
  assert.equal(ctx.poll(false), false);
  assert.equal(ctx.stats.bhRuns, 5);
  ctx.close();
});

Deno.test("BH: the queue grows while a batch runs: the batch keeps its place", () => {
  const ctx = new AioContext();
  let ran = 0;
  // A BH that reschedules itself keeps the queue from emptying, so the ring
  // indexes keep rising instead of going back to 0 after each poll.
  const link = ctx.bhNew(() => {
    ran++;
    link.schedule();
  }, "link");
  const filler = Array.from({ length: 40 }, () => ctx.bhNew(() => ran++, "filler"));
  link.schedule();
  for (let i = 0; i < 100; i++) {
    for (const f of filler) f.schedule();
    ctx.poll(false);
  }
  // A BH late in the batch schedules enough to grow the ring mid-walk.
  const extra = Array.from({ length: 200 }, () => ctx.bhNew(() => ran++, "extra"));
  const grower = ctx.bhNew(() => {
    ran++;
    for (const e of extra) e.schedule();
  }, "grower");
  for (const f of filler) f.schedule();
  grower.schedule();
  let before = ran;
  ctx.poll(false);
  assert.equal(ran - before, 1 + 40 + 1); // link, fillers, grower: what was queued at the start
  before = ran;
  ctx.poll(false);
  assert.equal(ran - before, 1 + 200); // link and the extras
  link.delete();
  assert.equal(ctx.poll(false), false);
  ctx.close();
});
