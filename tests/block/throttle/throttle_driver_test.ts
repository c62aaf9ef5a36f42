// The throttle filter (block/throttle.c) through BlockBackend.open with
// `throttle: { addr }` (a group in mapped memory, as the daemon passes it):
// bandwidth held to the limit, writes / discards / write-zeroes count as
// writes and reads do not see write buckets, flushes pass, and a drained
// section releases what the filter holds.
import assert from "node:assert/strict";
import { AioContext } from "../../../aio/mod.ts";
import {
  BlockBackend,
  IoVector,
  THROTTLE_GROUP_BYTES,
  type ThrottleConfig,
  throttleConfigInit,
  ThrottleGroup,
} from "../../../block/mod.ts";
import { type MappedRegion, mmapAnonymous } from "../../../sys/mod.ts";

/** Awaits `p` while polling `ctx` (completions come from the context). */
async function settle<T>(ctx: AioContext, p: Promise<T>): Promise<T> {
  let done = false;
  p.finally(() => done = true).catch(() => {});
  while (!done) {
    ctx.poll(false);
    await new Promise((r) => setTimeout(r, 0));
  }
  return p;
}

async function open(
  edit: (c: ThrottleConfig) => void,
): Promise<{ ctx: AioContext; blk: BlockBackend; region: MappedRegion; close(): Promise<void> }> {
  const ctx = new AioContext();
  const region = mmapAnonymous(THROTTLE_GROUP_BYTES);
  const c = throttleConfigInit();
  edit(c);
  new ThrottleGroup(region.buffer).init(c, ctx.now());
  const blk = await BlockBackend.open(ctx, {
    driver: "null-co",
    size: 1 << 20,
    throttle: { addr: region.addr },
  });
  return {
    ctx,
    blk,
    region,
    async close() {
      await blk.close();
      ctx.close();
      region.unmap();
    },
  };
}

Deno.test("throttle driver: bps-read holds a greedy reader to the limit", async () => {
  const t = await open((c) => c.buckets["bps-read"].avg = 1 << 20);
  try {
    assert.equal(t.blk.driver.name, "throttle");
    const qiov = IoVector.fromBuffers([new Uint8Array(65536)]);
    let bytes = 0, on = true;
    const one = () =>
      t.blk.aioPreadv(0, qiov, (r) => {
        assert.equal(r, 0);
        if (!on) return;
        bytes += 65536;
        one();
      });
    const start = performance.now();
    for (let i = 0; i < 4; i++) one();
    while (performance.now() - start < 1000) t.ctx.poll(false);
    on = false;
    const s = (performance.now() - start) / 1000;
    // Bucket 0.1 MiB plus one request over it, then 1 MiB/s.
    const max = (1 << 20) / 10 + 65536 + (1 << 20) * s;
    assert(bytes <= max, `${bytes} > ${max}`);
    assert(bytes >= 0.8 * (1 << 20), `${bytes} in ${s} s`);
    t.blk.releaseHeld();
    await settle(t.ctx, t.blk.drain());
  } finally {
    await t.close();
  }
});

Deno.test("throttle driver: writes, discards, write-zeroes count as writes; reads and flushes pass", async () => {
  const t = await open((c) => c.buckets["iops-write"].avg = 10); // bucket 1
  try {
    const qiov = IoVector.fromBuffers([new Uint8Array(512)]);
    const done: string[] = [];
    for (let i = 0; i < 20; i++) t.blk.aioPreadv(0, qiov, () => done.push("r"));
    t.blk.aioPwritev(0, qiov, () => done.push("w"));
    t.blk.aioPwritev(0, qiov, () => done.push("w"));
    t.blk.aioPwriteZeroes(0, 512, false, () => done.push("z"));
    t.blk.aioFlush(() => done.push("f"));
    for (let i = 0; i < 5; i++) t.ctx.poll(false);
    assert.equal(done.filter((x) => x === "r").length, 20, "reads are not limited");
    assert(done.includes("f"), "flush is not throttled");
    assert.equal(done.filter((x) => x === "w").length, 2, "bucket of 1: two writes go");
    assert(!done.includes("z"), "the third write-like request waits");
    const t0 = performance.now();
    while (!done.includes("z")) t.ctx.poll(true);
    assert(performance.now() - t0 >= 50, "write-zeroes waited ~100 ms");
  } finally {
    await t.close();
  }
});

Deno.test("throttle driver: a drained section releases held requests at once", async () => {
  const t = await open((c) => c.buckets["iops-total"].avg = 1); // bucket 0.1: 1 a second
  try {
    const qiov = IoVector.fromBuffers([new Uint8Array(512)]);
    let done = 0;
    for (let i = 0; i < 10; i++) t.blk.aioPreadv(0, qiov, () => done++);
    for (let i = 0; i < 5; i++) t.ctx.poll(false);
    assert(done <= 2, `${done} went`);
    const t0 = performance.now();
    await settle(t.ctx, t.blk.drain()); // drainedBegin releases them; then waits for in-flight ones
    assert.equal(done, 10);
    assert(performance.now() - t0 < 1000, "released, not leaked out at 1/s");
  } finally {
    await t.close();
  }
});
