import assert from "node:assert/strict";
import { AioContext } from "../../aio/mod.ts";
import { BlockBackend, type BlockOptions, IoVector } from "../../block/mod.ts";
import { clockNs, EINVAL, EROFS } from "../../sys/mod.ts";
import { SyncTrace, syncTraceUnavailable } from "../harness/sync_trace.ts";
import { aligned, fillPattern, makeImage, onDisk, patternByte, runUntil } from "./helpers.ts";

const MiB = 1 << 20;
const ENGINES = ["threads", "native", "io_uring"] as const;
const CACHES = ["none", "writeback"] as const;

for (const aio of ENGINES) {
  for (const cache of CACHES) {
    if (aio === "native" && cache !== "none") continue; // QEMU refuses it too
    Deno.test(`file aio=${aio} cache=${cache}: every operation, byte for byte`, async () => {
      const path = makeImage(4 * MiB, 3);
      const ctx = new AioContext();
      const opts: BlockOptions = { driver: "file", filename: path, cache, aio, discard: "unmap" };
      const blk = await BlockBackend.open(ctx, opts);
      try {
        assert.equal(blk.length, 4 * MiB);
        if (cache === "none") assert.ok(blk.requestAlignment >= 512);
        const region = aligned(256 * 1024);
        const mem = region.bytes;

        // read: two iovec entries, checked against the image pattern
        const q = new IoVector(4);
        q.add(region.addr, 8192);
        q.add(region.addr + 65536, 4096);
        assert.equal(await runUntil(ctx, blk.preadv(MiB, q)), 0);
        for (let i = 0; i < 8192; i++) assert.equal(mem[i], patternByte(3, MiB + i));
        for (let i = 0; i < 4096; i++) {
          assert.equal(mem[65536 + i], patternByte(3, MiB + 8192 + i));
        }

        // write: 3 entries, then verify with a plain pread on another fd
        fillPattern(mem.subarray(0, 3 * 4096), 9, 0);
        const w = new IoVector(3);
        for (let k = 0; k < 3; k++) w.add(region.addr + k * 4096, 4096);
        assert.equal(await runUntil(ctx, blk.pwritev(2 * MiB, w)), 0);
        assert.equal(await runUntil(ctx, blk.flush()), 0);
        assert.deepEqual(onDisk(path, 2 * MiB, 3 * 4096), mem.slice(0, 3 * 4096));

        // write-zeroes without and with unmap
        assert.equal(await runUntil(ctx, blk.pwriteZeroes(2 * MiB, 4096, false)), 0);
        assert.equal(await runUntil(ctx, blk.pwriteZeroes(2 * MiB + 4096, 4096, true)), 0);
        const z = onDisk(path, 2 * MiB, 3 * 4096);
        assert.ok(z.subarray(0, 8192).every((b) => b === 0));
        assert.deepEqual(z.subarray(8192), mem.slice(8192, 3 * 4096));

        // discard punches a hole: reads back as zeroes on ext4, size unchanged
        assert.equal(await runUntil(ctx, blk.pdiscard(3 * MiB, 65536)), 0);
        assert.ok(onDisk(path, 3 * MiB, 65536).every((b) => b === 0));
        assert.equal(Deno.statSync(path).size, 4 * MiB);

        // read back through the backend what the others wrote
        const r = new IoVector(1);
        r.add(region.addr + 131072, 3 * 4096);
        assert.equal(await runUntil(ctx, blk.preadv(2 * MiB, r)), 0);
        assert.deepEqual(mem.slice(131072, 131072 + 3 * 4096), z);
        region.unmap();
      } finally {
        await runUntil(ctx, blk.close());
        ctx.close();
      }
    });
  }
}

Deno.test("out-of-range requests fail with -EINVAL, asynchronously", async () => {
  const ctx = new AioContext();
  const blk = await BlockBackend.open(ctx, { driver: "null-co", size: MiB });
  const q = IoVector.fromBuffers([new Uint8Array(4096)]);
  const got: number[] = [];
  blk.aioPreadv(MiB - 512, q, (r) => got.push(r));
  blk.aioPwritev(-4096, q, (r) => got.push(r));
  blk.aioPdiscard(MiB, 1, (r) => got.push(r));
  blk.aioPwriteZeroes(0.5, 512, false, (r) => got.push(r));
  assert.equal(got.length, 0, "completed synchronously");
  assert.equal(blk.inFlight, 4);
  await runUntil(ctx, blk.waitIdle());
  assert.deepEqual(got, [-EINVAL, -EINVAL, -EINVAL, -EINVAL]);
  await runUntil(ctx, blk.close());
  ctx.close();
});

Deno.test("read-only refuses writes, discards and write-zeroes with -EROFS", async () => {
  const path = makeImage(MiB, 5);
  const ctx = new AioContext();
  const blk = await BlockBackend.open(ctx, {
    driver: "file",
    filename: path,
    readOnly: true,
    discard: "unmap",
  });
  assert.equal(blk.readOnly, true);
  const buf = new Uint8Array(4096);
  const q = IoVector.fromBuffers([buf]);
  assert.equal(await runUntil(ctx, blk.pwritev(0, q)), -EROFS);
  assert.equal(await runUntil(ctx, blk.pdiscard(0, 4096)), -EROFS);
  assert.equal(await runUntil(ctx, blk.pwriteZeroes(0, 4096)), -EROFS);
  assert.equal(await runUntil(ctx, blk.preadv(4096, q)), 0);
  assert.equal(buf[0], patternByte(5, 4096));
  assert.deepEqual(onDisk(path, 0, 16), fillPattern(new Uint8Array(16), 5));
  await runUntil(ctx, blk.close());
  ctx.close();
});

Deno.test("raw offset/size window maps onto the file", async () => {
  const path = makeImage(MiB, 7);
  const ctx = new AioContext();
  const blk = await BlockBackend.open(ctx, {
    driver: "file",
    filename: path,
    offset: 65536,
    sizeLimit: 131072,
    aio: "io_uring",
  });
  assert.equal(blk.length, 131072);
  const buf = new Uint8Array(512);
  const q = IoVector.fromBuffers([buf]);
  assert.equal(await runUntil(ctx, blk.preadv(1024, q)), 0);
  assert.deepEqual(buf, fillPattern(new Uint8Array(512), 7, 65536 + 1024));
  assert.equal(await runUntil(ctx, blk.preadv(131072 - 256, q)), -EINVAL);
  fillPattern(buf, 11);
  assert.equal(await runUntil(ctx, blk.pwritev(0, q)), 0);
  assert.deepEqual(onDisk(path, 65536, 512), buf);
  await runUntil(ctx, blk.close());
  ctx.close();
  await assert.rejects(
    BlockBackend.open(new AioContext(), { driver: "null-co", size: 4096, offset: 8192 }),
    RangeError,
  );
});

const NO_TRACE = syncTraceUnavailable();
if (NO_TRACE) console.warn(`SKIPPING the sync-oracle flush tests: ${NO_TRACE}`);

// Flush reaches the kernel as a sync (fdatasync, or IORING_OP_FSYNC) except under
// cache=unsafe, where none may: seen from the kernel's tracepoints, not from a
// return value a no-op would give too. The cache=writeback/none cases show the
// oracle sees this process's syncs at all.
for (
  const [aio, cache] of [
    ["threads", "unsafe"],
    ["io_uring", "unsafe"],
    ["threads", "writeback"],
    ["io_uring", "writeback"],
    ["native", "none"],
  ] as const
) {
  const what = cache === "unsafe" ? "makes flush a no-op" : "flushes through the kernel";
  Deno.test({
    name: `cache=${cache} aio=${aio} ${what} (sync oracle)`,
    ignore: NO_TRACE !== null,
    fn: async () => {
      const path = makeImage(MiB, 2);
      const ctx = new AioContext();
      const blk = await BlockBackend.open(ctx, { driver: "file", filename: path, cache, aio });
      const trace = SyncTrace.start(Deno.pid);
      const region = aligned(4096);
      try {
        const q = new IoVector(1);
        q.add(region.addr, 4096);
        assert.equal(await runUntil(ctx, blk.pwritev(0, q)), 0);
        const t0 = clockNs();
        assert.equal(await runUntil(ctx, blk.flush()), 0);
        assert.equal(await runUntil(ctx, blk.flush()), 0);
        const syncs = trace.between(t0, clockNs());
        if (cache === "unsafe") assert.deepEqual(syncs, [], "a sync reached the kernel");
        else {assert.ok(
            syncs.length >= 2,
            `2 flushes, ${syncs.length} syncs: ${JSON.stringify(syncs)}`,
          );}
      } finally {
        trace.close();
        region.unmap();
        await runUntil(ctx, blk.close());
        ctx.close();
      }
    },
  });
}

Deno.test("discard=ignore is a successful no-op", async () => {
  const path = makeImage(MiB, 2);
  const ctx = new AioContext();
  const blk = await BlockBackend.open(ctx, { driver: "file", filename: path, cache: "unsafe" });
  assert.equal(await runUntil(ctx, blk.pdiscard(0, 65536)), 0);
  // discard=ignore (the default): the data is still there
  assert.deepEqual(onDisk(path, 0, 64), fillPattern(new Uint8Array(64), 2));
  await runUntil(ctx, blk.close());
  ctx.close();
});

Deno.test("detect-zeroes=unmap turns an all-zero write into a hole", async () => {
  const path = makeImage(MiB, 2);
  const ctx = new AioContext();
  const blk = await BlockBackend.open(ctx, {
    driver: "file",
    filename: path,
    detectZeroes: "unmap",
    discard: "unmap",
  });
  const before = Deno.statSync(path).blocks!;
  const zero = new Uint8Array(256 * 1024);
  assert.equal(await runUntil(ctx, blk.pwritev(0, IoVector.fromBuffers([zero]))), 0);
  assert.ok(onDisk(path, 0, zero.length).every((b) => b === 0));
  assert.ok(Deno.statSync(path).blocks! < before, "no blocks were deallocated");
  await runUntil(ctx, blk.close());
  ctx.close();
});
