import assert from "node:assert/strict";
import { AioContext } from "../../aio/mod.ts";
import { BlockBackend, FileDriver, IoVector } from "../../block/mod.ts";
import { aligned, fillPattern, makeImage, onDisk, patternByte, runUntil } from "./helpers.ts";

const MiB = 1 << 20;

for (const aio of ["threads", "native", "io_uring"] as const) {
  Deno.test(`cache=none aio=${aio}: unaligned buffers, offsets and lengths bounce`, async () => {
    const path = makeImage(MiB, 12);
    const ctx = new AioContext();
    const blk = await BlockBackend.open(ctx, {
      driver: "file",
      filename: path,
      cache: "none",
      aio,
    });
    const file = (blk.driver as unknown as { child: FileDriver }).child;
    assert.ok(file instanceof FileDriver);
    assert.ok(file.requestAlignment >= 512 && file.memAlignment >= 1);
    const mem = aligned(64 * 1024);
    const b = mem.bytes;

    // aligned offset/length, buffer misaligned by 1 byte (and split in two entries)
    const q = new IoVector(2);
    q.add(mem.addr + 1, 2048);
    q.add(mem.addr + 8192 + 3, 2048);
    assert.equal(await runUntil(ctx, blk.preadv(8192, q)), 0);
    for (let i = 0; i < 2048; i++) assert.equal(b[1 + i], patternByte(12, 8192 + i));
    for (let i = 0; i < 2048; i++) assert.equal(b[8195 + i], patternByte(12, 10240 + i));

    // unaligned offset and length read
    const r = new IoVector(1);
    r.add(mem.addr + 16384, 1000);
    assert.equal(await runUntil(ctx, blk.preadv(4196, r)), 0);
    assert.deepEqual(b.slice(16384, 17384), fillPattern(new Uint8Array(1000), 12, 4196));

    // misaligned buffer write at an aligned offset
    fillPattern(b.subarray(1, 1 + 4096), 40);
    const w1 = new IoVector(1);
    w1.add(mem.addr + 1, 4096);
    assert.equal(await runUntil(ctx, blk.pwritev(65536, w1)), 0);
    assert.deepEqual(onDisk(path, 65536, 4096), b.slice(1, 4097));

    // read-modify-write: unaligned offset and length
    fillPattern(b.subarray(32768, 32768 + 1000), 41);
    const w2 = new IoVector(1);
    w2.add(mem.addr + 32768, 1000);
    assert.equal(await runUntil(ctx, blk.pwritev(131072 + 700, w2)), 0);
    const got = onDisk(path, 131072, 8192);
    assert.deepEqual(got.slice(0, 700), fillPattern(new Uint8Array(700), 12, 131072));
    assert.deepEqual(got.slice(700, 1700), b.slice(32768, 33768));
    assert.deepEqual(got.slice(1700), fillPattern(new Uint8Array(8192 - 1700), 12, 131072 + 1700));
    assert.ok(file.bounced >= 4);

    mem.unmap();
    await runUntil(ctx, blk.close());
    ctx.close();
  });
}

Deno.test("concurrent overlapping read-modify-write cycles do not lose data", async () => {
  const path = makeImage(MiB, 13);
  const ctx = new AioContext();
  const blk = await BlockBackend.open(ctx, {
    driver: "file",
    filename: path,
    cache: "none",
    aio: "io_uring",
  });
  const n = 24, len = 600, base = 200_000 + 37;
  const bufs: Uint8Array[] = [];
  const rets: number[] = [];
  blk.ioPlug();
  for (let i = 0; i < n; i++) {
    const buf = fillPattern(new Uint8Array(len), 50 + i);
    bufs.push(buf);
    blk.aioPwritev(base + i * len, IoVector.fromBuffers([buf]), (r) => rets.push(r));
  }
  blk.ioUnplug();
  await runUntil(ctx, blk.waitIdle());
  assert.deepEqual(rets, new Array(n).fill(0));
  const disk = onDisk(path, base, n * len);
  for (let i = 0; i < n; i++) {
    assert.deepEqual(disk.slice(i * len, (i + 1) * len), bufs[i], `write ${i}`);
  }
  await runUntil(ctx, blk.close());
  ctx.close();
});

Deno.test("drain waits for in-flight requests; drained sections hold new ones", async () => {
  const path = makeImage(MiB, 14);
  const ctx = new AioContext();
  const blk = await BlockBackend.open(ctx, {
    driver: "file",
    filename: path,
    cache: "none",
    aio: "native",
  });
  const events: string[] = [];
  blk.setDevOps({
    drainedBegin: () => events.push("begin"),
    drainedEnd: () => events.push("end"),
  });
  const mem = aligned(32 * 4096);
  let done = 0;
  for (let i = 0; i < 32; i++) {
    const q = new IoVector(1);
    q.add(mem.addr + i * 4096, 4096);
    blk.aioPreadv(i * 4096, q, (r) => {
      assert.equal(r, 0);
      done++;
    });
  }
  assert.equal(blk.inFlight, 32);
  await runUntil(ctx, blk.drain());
  assert.equal(done, 32);
  assert.equal(blk.inFlight, 0);
  assert.deepEqual(events, ["begin", "end"]);

  // a request that arrives inside a drained section waits for drainedEnd
  blk.drainedBegin();
  let late = 1;
  const q = new IoVector(1);
  q.add(mem.addr, 4096);
  blk.aioPreadv(0, q, (r) => late = r);
  for (let i = 0; i < 3; i++) ctx.poll(false);
  assert.equal(late, 1);
  blk.drainedEnd();
  await runUntil(ctx, blk.waitIdle());
  assert.equal(late, 0);
  assert.equal(mem.bytes[0], patternByte(14, 0));
  mem.unmap();
  await runUntil(ctx, blk.close());
  ctx.close();
});

Deno.test("refreshLength reports a resize to the device", async () => {
  const path = makeImage(MiB, 1);
  const ctx = new AioContext();
  const blk = await BlockBackend.open(ctx, { driver: "file", filename: path });
  let resized = 0;
  blk.setDevOps({ resize: () => resized++ });
  Deno.truncateSync(path, 2 * MiB);
  assert.equal(blk.refreshLength(), 2 * MiB);
  assert.equal(blk.length, 2 * MiB);
  assert.equal(resized, 1);
  await runUntil(ctx, blk.close());
  ctx.close();
});
