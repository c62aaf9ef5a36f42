import assert from "node:assert/strict";
import { AioContext } from "../../aio/mod.ts";
import { BlockBackend, IoVector, parseBlockOptions } from "../../block/mod.ts";
import { runUntil } from "./helpers.ts";

for (const driver of ["null-co", "null-aio"] as const) {
  Deno.test(`${driver}: never completes synchronously; read-zeroes; every op`, async () => {
    const ctx = new AioContext();
    const blk = await BlockBackend.open(ctx, {
      driver,
      size: 1 << 20,
      readZeroes: true,
      discard: "unmap",
    });
    assert.equal(blk.length, 1 << 20);
    assert.equal(blk.requestAlignment, 1);
    const buf = new Uint8Array(4096).fill(9);
    const q = IoVector.fromBuffers([buf]);
    const rets: number[] = [];
    blk.aioPreadv(0, q, (r) => rets.push(r));
    blk.aioPwritev(0, q, (r) => rets.push(r));
    blk.aioFlush((r) => rets.push(r));
    blk.aioPdiscard(0, 4096, (r) => rets.push(r));
    blk.aioPwriteZeroes(0, 4096, true, (r) => rets.push(r));
    assert.equal(rets.length, 0);
    assert.equal(blk.inFlight, 5);
    await runUntil(ctx, blk.waitIdle());
    assert.deepEqual(rets, [0, 0, 0, 0, 0]);
    assert.ok(buf.every((b) => b === 0));
    await runUntil(ctx, blk.close());
    ctx.close();
  });

  Deno.test(`${driver}: resubmitting from the callback does not recurse`, async () => {
    const ctx = new AioContext();
    const blk = await BlockBackend.open(ctx, { driver });
    const q = IoVector.fromBuffers([new Uint8Array(512)]);
    let depth = 0, maxDepth = 0, count = 0;
    const again = (r: number) => {
      assert.equal(r, 0);
      depth++;
      maxDepth = Math.max(maxDepth, depth);
      if (++count < 1000) blk.aioPreadv(0, q, again);
      depth--;
    };
    blk.aioPreadv(0, q, again);
    await runUntil(
      ctx,
      new Promise<void>((res) => {
        const check = () => count >= 1000 ? res() : setTimeout(check, 1);
        check();
      }),
    );
    assert.equal(maxDepth, 1);
    await runUntil(ctx, blk.close());
    ctx.close();
  });
}

Deno.test("read-zeroes=off leaves the buffer alone (QEMU's default)", async () => {
  const ctx = new AioContext();
  const blk = await BlockBackend.open(ctx, parseBlockOptions("driver=null-co,size=1M"));
  const buf = new Uint8Array(16).fill(5);
  assert.equal(await runUntil(ctx, blk.preadv(0, IoVector.fromBuffers([buf]))), 0);
  assert.ok(buf.every((b) => b === 5));
  await runUntil(ctx, blk.close());
  ctx.close();
});

Deno.test("parseBlockOptions: QEMU vocabulary and validation", () => {
  const o = parseBlockOptions(
    "driver=file,filename=/x.img,cache=none,aio=io_uring,read-only=on,discard=unmap,detect-zeroes=unmap,offset=1M,size-limit=4k",
  );
  assert.deepEqual(o, {
    driver: "file",
    filename: "/x.img",
    cache: "none",
    aio: "io_uring",
    readOnly: true,
    discard: "unmap",
    detectZeroes: "unmap",
    offset: 1 << 20,
    sizeLimit: 4096,
  });
  assert.throws(() => parseBlockOptions("driver=file,filename=a,cache=directsync"), TypeError);
  assert.throws(() => parseBlockOptions("driver=file"), TypeError);
  assert.throws(() => parseBlockOptions("driver=null-co,bogus=1"), TypeError);
  assert.throws(() => parseBlockOptions("driver=null-co,size=12x"), TypeError);
});

for (const driver of ["null-co", "null-aio"] as const) {
  Deno.test(`${driver}: a callback that polls nested gets completions queued meanwhile, each once`, async () => {
    const ctx = new AioContext();
    const blk = await BlockBackend.open(ctx, { driver });
    const q = IoVector.fromBuffers([new Uint8Array(512)]);
    const log: string[] = [];
    /** Submits `name` and polls nested (a bounded synchronous wait) until it completes. */
    const waitFor = (name: string, then: () => void) => {
      let done = false;
      blk.aioPreadv(0, q, () => {
        log.push(name);
        done = true;
        then();
      });
      for (let i = 0; i < 100 && !done; i++) ctx.poll(false);
      if (!done) log.push(`${name} not delivered by nested poll`);
    };
    blk.aioPreadv(0, q, () => {
      log.push("a");
      waitFor("x", () => waitFor("y", () => {}));
    });
    blk.aioPreadv(0, q, () => log.push("b"));
    for (let i = 0; i < 10; i++) ctx.poll(false);
    assert.deepEqual(log, ["a", "b", "x", "y"]);
    assert.equal(blk.inFlight, 0);
    await runUntil(ctx, blk.close());
    ctx.close();
  });
}

Deno.test("null-co: many completions queued from inside a batch grow the queue in order", async () => {
  const ctx = new AioContext();
  const blk = await BlockBackend.open(ctx, { driver: "null-co" });
  const q = IoVector.fromBuffers([new Uint8Array(512)]);
  const order: number[] = [];
  for (let i = 0; i < 10; i++) {
    blk.aioPreadv(0, q, () => {
      order.push(i);
      if (i === 5) { for (let k = 10; k < 100; k++) blk.aioPreadv(0, q, () => order.push(k)); }
    });
  }
  ctx.poll(false);
  assert.deepEqual(order, Array.from({ length: 10 }, (_, i) => i), "the batch, not what it queued");
  ctx.poll(false);
  assert.deepEqual(order, Array.from({ length: 100 }, (_, i) => i));
  await runUntil(ctx, blk.close());
  ctx.close();
});

Deno.test("null-co completes inside the submitting call only when the caller allows it; null-aio never", async () => {
  const ctx = new AioContext();
  const co = await BlockBackend.open(ctx, { driver: "null-co", size: 1 << 20 });
  const aio = await BlockBackend.open(ctx, { driver: "null-aio", size: 1 << 20 });
  try {
    const qiov = IoVector.fromBuffers([new Uint8Array(512)]);
    const order: string[] = [];
    co.aioPreadv(0, qiov, (r) => order.push(`default ${r}`));
    order.push("returned");
    assert.equal(co.setInlineCompletion(true), true);
    co.aioPwritev(0, qiov, (r) => order.push(`inline write ${r}`));
    co.aioFlush((r) => order.push(`inline flush ${r}`));
    order.push("returned");
    assert.equal(co.setInlineCompletion(false), false);
    co.aioPreadv(0, qiov, (r) => order.push(`off again ${r}`));
    order.push("returned");
    assert.equal(aio.setInlineCompletion(true), false, "null-aio completes from a BH");
    aio.aioPreadv(0, qiov, (r) => order.push(`null-aio ${r}`));
    order.push("returned");
    while (order.length < 9) ctx.poll(false);
    assert.deepEqual(order, [
      "returned",
      "inline write 0",
      "inline flush 0",
      "returned",
      "returned",
      "returned",
      "default 0",
      "off again 0",
      "null-aio 0",
    ]);
    assert.equal(co.inFlight, 0);
  } finally {
    await co.close();
    await aio.close();
    ctx.close();
  }
});
