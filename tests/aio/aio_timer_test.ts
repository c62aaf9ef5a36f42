import assert from "node:assert/strict";
import { AioContext } from "../../aio/mod.ts";
import { clockNs } from "../../sys/mod.ts";

Deno.test("timer: expiry order by deadline then arming order", () => {
  const ctx = new AioContext();
  const log: string[] = [];
  const base = ctx.now() + 3e6;
  const mk = (name: string, d: number) => ctx.timerNew(() => log.push(name)).modNs(base + d);
  mk("c", 2e6);
  mk("a1", 0);
  mk("b", 1e6);
  mk("a2", 0);
  const moved = ctx.timerNew(() => log.push("moved"));
  moved.modNs(base); // then re-armed later: goes after b
  moved.modNs(base + 1e6);
  const gone = ctx.timerNew(() => log.push("gone"));
  gone.modNs(base);
  gone.del();
  while (log.length < 5) ctx.poll(true);
  assert.deepEqual(log, ["a1", "a2", "b", "moved", "c"]);
  assert.equal(ctx.stats.timerRuns, 5);
  ctx.close();
});

Deno.test("timer: never fires early, poll(true) sleeps until the deadline", () => {
  const ctx = new AioContext({ pollMaxNs: 0 });
  for (const delayNs of [1, 300_000, 1_500_000, 7_250_000]) {
    let firedAt = 0;
    const deadline = ctx.now() + delayNs;
    ctx.timerNew(() => firedAt = clockNs()).modNs(deadline);
    let polls = 0;
    while (!firedAt) {
      ctx.poll(true);
      polls++;
    }
    assert.ok(firedAt >= deadline, `fired ${deadline - firedAt} ns early`);
    assert.ok(firedAt - deadline < 50e6, "fired far too late");
    assert.ok(polls <= 3, `took ${polls} polls`);
  }
  ctx.close();
});

Deno.test("timer: a callback re-arming itself for the past runs in the next poll", () => {
  const ctx = new AioContext();
  let n = 0;
  const t = ctx.timerNew(() => {
    if (++n < 3) t.modNs(0);
  });
  t.modNs(0);
  ctx.poll(false);
  assert.equal(n, 1);
  ctx.poll(true);
  ctx.poll(true);
  assert.equal(n, 3);
  assert.equal(t.pending, false);
  assert.throws(() => t.modNs(-1), RangeError);
  ctx.close();
});
