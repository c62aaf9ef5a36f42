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
