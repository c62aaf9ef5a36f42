// A throttle group's members (block/throttle-groups.c): the limit is the
// group's, shared by its members and served round-robin between them; a
// member in another AioContext is woken through its eventfd when the group
// arms its timer; new limits apply at once; a drain releases what a member
// holds; a leaving member passes its armed timer on.
import assert from "node:assert/strict";
import { AioContext } from "../../../aio/mod.ts";
import {
  THROTTLE_GROUP_BYTES,
  THROTTLE_GROUP_MAX_MEMBERS,
  ThrottleGroup,
  ThrottleGroupError,
} from "../../../block/throttle/throttle_group.ts";
import { ThrottleGroupMember } from "../../../block/throttle/throttle_group_member.ts";
import {
  type ThrottleConfig,
  throttleConfigInit,
} from "../../../block/throttle/throttle_config.ts";

function group(ctx: AioContext, edit: (c: ThrottleConfig) => void): ThrottleGroup {
  const g = new ThrottleGroup(new ArrayBuffer(THROTTLE_GROUP_BYTES));
  const c = throttleConfigInit();
  edit(c);
  g.init(c, ctx.now());
  return g;
}

/** Keeps `depth` requests queued on `m` (a request that goes is replaced at once). */
function greedy(m: ThrottleGroupMember, depth: number, counter: { n: number; on: boolean }) {
  const one = () =>
    m.intercept(0, 4096, () => {
      counter.n++;
      if (counter.on) queueMicrotask(one);
    });
  for (let i = 0; i < depth; i++) one();
}

/**
 * Polls the contexts for about `ms`. Returns the seconds that really passed
 * (a loaded machine overshoots) and `stalled`: seconds this process did not
 * poll at all beyond 20 ms at a time (descheduled on a loaded machine), when
 * no timer could release anything. A lower bound on what the group let
 * through must leave that time out: it measures the machine, not the group.
 */
async function pollFor(
  ctxs: AioContext[],
  ms: number,
): Promise<{ seconds: number; stalled: number }> {
  const start = performance.now(), end = start + ms;
  let last = start, stalled = 0;
  for (let now = start; now < end; now = performance.now()) {
    stalled += Math.max(0, now - last - 20);
    last = now;
    for (const c of ctxs) c.poll(false);
    await Promise.resolve(); // run the microtasks that queue the next requests
  }
  return { seconds: (performance.now() - start) / 1000, stalled: stalled / 1000 };
}

Deno.test("throttle group: two members share the limit, round-robin", async () => {
  const ctx = new AioContext();
  const g = group(ctx, (c) => c.buckets["iops-total"].avg = 200);
  const a = new ThrottleGroupMember(ctx, g), b = new ThrottleGroupMember(ctx, g);
  const ca = { n: 0, on: true }, cb = { n: 0, on: true };
  try {
    greedy(a, 4, ca);
    greedy(b, 4, cb);
    const { seconds: s, stalled } = await pollFor([ctx], 1000);
    ca.on = cb.on = false;
    const total = ca.n + cb.n;
    // At most the bucket (20 + 1) and 200/s; not far below on a loaded machine.
    assert(total <= 21 + 200 * s + 1, `total ${total} in ${s} s`);
    assert(total >= 21 + 200 * (0.8 - stalled), `total ${total} (stalled ${stalled} s)`);
    // Round-robin: neither member starves.
    assert(Math.abs(ca.n - cb.n) <= 0.15 * total, `a ${ca.n}, b ${cb.n}`);
  } finally {
    a.close();
    b.close();
    ctx.close();
  }
});

Deno.test("throttle group: round-robin serves members, not requests (8 queued vs 1)", async () => {
  const ctx = new AioContext();
  const g = group(ctx, (c) => c.buckets["iops-total"].avg = 200);
  const a = new ThrottleGroupMember(ctx, g), b = new ThrottleGroupMember(ctx, g);
  const ca = { n: 0, on: true }, cb = { n: 0, on: true };
  try {
    greedy(a, 8, ca);
    greedy(b, 1, cb);
    await pollFor([ctx], 1000);
    ca.on = cb.on = false;
    // In arrival order b would get about 1 in 9; taking turns, about half.
    const total = ca.n + cb.n;
    assert(cb.n >= 0.4 * total, `a ${ca.n}, b ${cb.n}`);
  } finally {
    a.close();
    b.close();
    ctx.close();
  }
});

Deno.test("throttle group: a member in another AioContext is woken by its eventfd", async () => {
  const ctxA = new AioContext(), ctxB = new AioContext();
  const g = group(ctxA, (c) => c.buckets["iops-total"].avg = 100);
  const a = new ThrottleGroupMember(ctxA, g), b = new ThrottleGroupMember(ctxB, g);
  const ca = { n: 0, on: true }, cb = { n: 0, on: true };
  try {
    greedy(a, 4, ca);
    greedy(b, 4, cb);
    const { seconds: s, stalled } = await pollFor([ctxA, ctxB], 1000);
    ca.on = cb.on = false;
    const total = ca.n + cb.n;
    assert(total <= 11 + 100 * s + 1, `total ${total} in ${s} s`);
    assert(total >= 11 + 100 * (0.8 - stalled), `total ${total} (stalled ${stalled} s)`);
    assert(cb.n >= 0.35 * total && ca.n >= 0.35 * total, `a ${ca.n}, b ${cb.n}`);
  } finally {
    a.close();
    b.close();
    ctxA.close();
    ctxB.close();
  }
});

Deno.test("throttle group: new limits apply at once (qom-set limits)", async () => {
  const ctx = new AioContext();
  const g = group(ctx, (c) => c.buckets["iops-total"].avg = 2); // one every 0.5 s
  const a = new ThrottleGroupMember(ctx, g);
  const ca = { n: 0, on: true };
  try {
    greedy(a, 4, ca);
    await pollFor([ctx], 300);
    assert(ca.n <= 2, `${ca.n} at 2/s`);
    const c = g.getConfig();
    c.buckets["iops-total"].avg = 500;
    g.config(c, ctx.now());
    const before = ca.n;
    const { seconds: s, stalled } = await pollFor([ctx], 500);
    ca.on = false;
    const n = ca.n - before;
    assert(
      n <= 51 + 500 * s + 1 && n >= 51 + 500 * (0.4 - stalled),
      `${n} in ${s} s at 500/s (stalled ${stalled} s)`,
    );
    assert.throws(() => {
      const bad = g.getConfig();
      bad.buckets["iops-total"].max = 1;
      g.config(bad, 0);
    }, { name: "ThrottleGroupError", message: "bps_max/iops_max cannot be lower than bps/iops" });
    assert.equal(g.getConfig().buckets["iops-total"].avg, 500, "a refused config changes nothing");
  } finally {
    a.close();
    ctx.close();
  }
});

Deno.test("throttle group: releaseAll lets held requests go; a leaving member passes its timer on", async () => {
  const ctx = new AioContext();
  const g = group(ctx, (c) => c.buckets["iops-total"].avg = 1);
  const a = new ThrottleGroupMember(ctx, g), b = new ThrottleGroupMember(ctx, g);
  try {
    let da = 0, db = 0;
    for (let i = 0; i < 5; i++) a.intercept(0, 512, () => da++);
    for (let i = 0; i < 3; i++) b.intercept(1, 512, () => db++);
    // The bucket of 0.1 lets the first one through; the rest wait ~1 s each.
    assert.equal(da, 1);
    assert.equal(a.held + b.held, 7);
    a.releaseAll();
    assert.equal(da, 5);
    assert.equal(g.pending(a.index, 0), 0);
    a.close(); // a's armed read timer (if any) goes to the next member with pending requests
    assert.equal(g.members, 1);
    const c = g.getConfig();
    c.buckets["iops-total"].avg = 1000;
    g.config(c, ctx.now()); // b's armed timer fires now
    await pollFor([ctx], 100);
    assert.equal(db, 3);
  } finally {
    a.close();
    b.close();
    ctx.close();
  }
});

Deno.test("throttle group: at most THROTTLE_GROUP_MAX_MEMBERS members; uninitialised memory refused", () => {
  const ctx = new AioContext();
  const g = group(ctx, (c) => c.buckets["iops-total"].avg = 1);
  const ms: ThrottleGroupMember[] = [];
  try {
    for (let i = 0; i < THROTTLE_GROUP_MAX_MEMBERS; i++) ms.push(new ThrottleGroupMember(ctx, g));
    assert.throws(() => new ThrottleGroupMember(ctx, g), ThrottleGroupError);
    assert.throws(
      () => new ThrottleGroup(new ArrayBuffer(THROTTLE_GROUP_BYTES)).register(-1),
      /not initialised/,
    );
  } finally {
    for (const m of ms) m.close();
    ctx.close();
  }
});
