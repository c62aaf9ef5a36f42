/**
 * Read-modify-write serialisation across drivers and IOThreads on a 4 KiB-
 * sector loop device under cache=none (issue 9 item 4d): sub-block writes
 * from different drivers of one image, aligned writes overlapping a
 * read-modify-write, sub-block write-zeroes and discard, and a fuzz of all
 * of them from several IOThreads against a byte model.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import { AioContext, IOThread } from "../../aio/mod.ts";
import { BlockBackend, type BlockOptions, IoVector, RangeLockTable } from "../../block/mod.ts";
import { close, mmapAnonymous, O_DIRECT, O_RDONLY, open, pread } from "../../sys/mod.ts";
import { runUntil } from "./helpers.ts";
import { skipWithoutLoop, withLoopDevice } from "./loop_device.ts";
import { ByteModel, fromBase64, opByte, type RmwOp, type RmwResult } from "./rmw_model.ts";

const FIXTURE = new URL("./fixtures/rmw_thread.ts", import.meta.url).href;
const ENGINES = ["threads", "io_uring", "native"] as const;
const NO_LOOP = skipWithoutLoop("rmw_serialisation_test (4 KiB-sector loop device)");

/** The whole device as it is on disk now (O_DIRECT, so no stale page cache). */
function readDevice(device: string, len: number): Uint8Array {
  const fd = open(device, O_RDONLY | O_DIRECT);
  const mem = mmapAnonymous(len);
  try {
    const n = pread(fd, mem.bytes.subarray(0, len), 0);
    assert.equal(n, len);
    return mem.bytes.slice(0, len);
  } finally {
    mem.unmap();
    close(fd);
  }
}

function fileOptions(device: string, aio: BlockOptions["aio"]): BlockOptions {
  return { driver: "file", filename: device, cache: "none", aio, discard: "unmap" };
}

/** A buffer holding opByte(id, offset + k), kept alive by the caller. */
function opBuffer(id: number, offset: number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let k = 0; k < len; k++) b[k] = opByte(id, offset + k);
  return b;
}

for (const aio of ENGINES) {
  Deno.test({
    name: `aio=${aio}: two drivers writing different 512-byte sectors of one 4 KiB block both land`,
    ignore: NO_LOOP,
    fn: () =>
      withLoopDevice(1 << 20, async (device) => {
        const ctx = new AioContext();
        const locks = RangeLockTable.create();
        // Two BlockBackends on one image, as two IOThreads open it.
        const a = await BlockBackend.open(ctx, fileOptions(device, aio), { rangeLocks: locks });
        const b = await BlockBackend.open(ctx, fileOptions(device, aio), { rangeLocks: locks });
        assert.equal(a.requestAlignment, 4096);
        const blocks = 32;
        const keep: Uint8Array[] = [];
        const rets: number[] = [];
        for (let blk = 0; blk < blocks; blk++) {
          const sa = blk * 4096 + 512 * (blk % 8), sb = blk * 4096 + 512 * ((blk + 3) % 8);
          const ba = opBuffer(1, sa, 512), bb = opBuffer(2, sb, 512);
          keep.push(ba, bb);
          a.aioPwritev(sa, IoVector.fromBuffers([ba]), (r) => rets.push(r));
          b.aioPwritev(sb, IoVector.fromBuffers([bb]), (r) => rets.push(r));
        }
        await runUntil(ctx, Promise.all([a.waitIdle(), b.waitIdle()]));
        assert.deepEqual(rets, new Array(2 * blocks).fill(0));
        const disk = readDevice(device, blocks * 4096);
        const lost: string[] = [];
        for (let blk = 0; blk < blocks; blk++) {
          const sa = blk * 4096 + 512 * (blk % 8), sb = blk * 4096 + 512 * ((blk + 3) % 8);
          if (disk[sa] !== opByte(1, sa) || disk[sa + 511] !== opByte(1, sa + 511)) {
            lost.push(`block ${blk}: driver A's sector ${sa >> 9}`);
          }
          if (disk[sb] !== opByte(2, sb) || disk[sb + 511] !== opByte(2, sb + 511)) {
            lost.push(`block ${blk}: driver B's sector ${sb >> 9}`);
          }
        }
        assert.deepEqual(lost, [], `lost writes: ${lost.join("; ")}`);
        await runUntil(ctx, Promise.all([a.close(), b.close()]));
        ctx.close();
      }),
  });

  Deno.test({
    name: `aio=${aio}: an aligned write overlapping a read-modify-write is not undone by it`,
    ignore: NO_LOOP,
    fn: () =>
      withLoopDevice(1 << 20, async (device) => {
        const ctx = new AioContext();
        const blk = await BlockBackend.open(ctx, fileOptions(device, aio));
        const blocks = 32;
        const keep: Uint8Array[] = [];
        const rets: number[] = [];
        for (let i = 0; i < blocks; i++) {
          const sub = i * 4096 + 1024;
          const small = opBuffer(3, sub, 512), whole = opBuffer(4, i * 4096, 4096);
          keep.push(small, whole);
          // The read-modify-write first, then the aligned write of the whole block.
          blk.aioPwritev(sub, IoVector.fromBuffers([small]), (r) => rets.push(r));
          blk.aioPwritev(i * 4096, IoVector.fromBuffers([whole]), (r) => rets.push(r));
        }
        await runUntil(ctx, blk.waitIdle());
        assert.deepEqual(rets, new Array(2 * blocks).fill(0));
        const disk = readDevice(device, blocks * 4096);
        const lost: number[] = [];
        for (let i = 0; i < blocks; i++) {
          // Outside sector 2 only the aligned write can be there.
          for (const x of [i * 4096, i * 4096 + 4095]) {
            if (disk[x] !== opByte(4, x)) lost.push(i);
          }
          const x = i * 4096 + 1024;
          if (disk[x] !== opByte(3, x) && disk[x] !== opByte(4, x)) lost.push(i);
        }
        assert.deepEqual(lost, [], `aligned writes undone in blocks ${lost.join(", ")}`);
        await runUntil(ctx, blk.close());
        ctx.close();
      }),
  });

  Deno.test({
    name: `aio=${aio}: sub-block write-zeroes and discard work and keep their neighbours`,
    ignore: NO_LOOP,
    fn: () =>
      withLoopDevice(1 << 20, async (device) => {
        const ctx = new AioContext();
        const blk = await BlockBackend.open(ctx, fileOptions(device, aio));
        const all = opBuffer(5, 0, 64 * 1024);
        assert.equal(await runUntil(ctx, blk.pwritev(0, IoVector.fromBuffers([all]))), 0);
        // zeroes: sectors 3..13 (head in block 0, all of block 1 but a tail in block 1)
        assert.equal(await runUntil(ctx, blk.pwriteZeroes(1536, 5632)), 0);
        // discard a sub-block range and an unaligned range spanning blocks
        assert.equal(await runUntil(ctx, blk.pdiscard(16384 + 512, 1024)), 0);
        assert.equal(await runUntil(ctx, blk.pdiscard(24576 + 3584, 8192)), 0);
        const disk = readDevice(device, 64 * 1024);
        for (let x = 0; x < 16384; x++) {
          const want = x >= 1536 && x < 7168 ? 0 : opByte(5, x);
          if (disk[x] !== want) assert.fail(`byte ${x} is ${disk[x]}, want ${want}`);
        }
        // A discard never touches bytes outside its range.
        for (const [lo, hi] of [[16384, 16896], [17920, 28160], [36352, 65536]]) {
          for (let x = lo; x < hi; x++) {
            if (disk[x] !== opByte(5, x)) assert.fail(`discard changed byte ${x}`);
          }
        }
        await runUntil(ctx, blk.close());
        ctx.close();
      }),
  });
}

/** Starts `n` IOThreads sharing one range-lock table, each with its own BlockBackend. */
async function startThreads(
  device: string,
  engines: readonly BlockOptions["aio"][],
): Promise<IOThread[]> {
  const locks = RangeLockTable.create();
  const threads: IOThread[] = [];
  for (let i = 0; i < engines.length; i++) {
    const t = await IOThread.start({
      name: `rmw${i}`,
      modules: [FIXTURE],
      data: { rangeLocks: locks.shared },
      maxMessageBytes: 1 << 20, // read data comes back as base64
    });
    threads.push(t);
    assert.equal(await t.call("rmwOpen", { options: fileOptions(device, engines[i]) }), 4096);
  }
  return threads;
}

async function stopThreads(threads: IOThread[]): Promise<void> {
  for (const t of threads) {
    await t.call("rmwClose").catch(() => {});
    await t.stop();
  }
}

Deno.test({
  name: "two IOThreads writing different 512-byte sectors of the same 4 KiB blocks both land",
  ignore: NO_LOOP,
  fn: () =>
    withLoopDevice(1 << 20, async (device) => {
      const threads = await startThreads(device, ["io_uring", "io_uring"]);
      try {
        const blocks = 64;
        for (let round = 0; round < 4; round++) {
          const ops: RmwOp[][] = [[], []];
          for (let b = 0; b < blocks; b++) {
            for (let t = 0; t < 2; t++) {
              const offset = b * 4096 + 512 * ((b + round + 3 * t) % 8);
              ops[t].push({ kind: "write", offset, len: 512, id: 10 * round + t });
            }
          }
          const res = await Promise.all(
            threads.map((t, i) => t.call<RmwResult>("rmwRun", { ops: ops[i] })),
          );
          for (const r of res) assert.ok(r.rets.every((x) => x === 0), `rets ${r.rets}`);
          const disk = readDevice(device, blocks * 4096);
          const lost: string[] = [];
          for (let t = 0; t < 2; t++) {
            for (const o of ops[t]) {
              if (disk[o.offset] !== opByte(o.id, o.offset)) {
                lost.push(`thread ${t} sector ${o.offset >> 9}`);
              }
            }
          }
          assert.deepEqual(lost, [], `round ${round}: ${lost.length} lost writes: ${lost}`);
        }
      } finally {
        await stopThreads(threads);
      }
    }),
});

const IMAGE = 64 * 1024; // 16 blocks of 4 KiB: requests collide often
const SECTORS = IMAGE / 512;

/** A request at 512-byte granularity (a guest's), sometimes 4 KiB-aligned (the fast path). */
function opArb(): fc.Arbitrary<Omit<RmwOp, "id">> {
  const sectorRange = fc.tuple(fc.nat(SECTORS - 1), fc.integer({ min: 1, max: 24 }))
    .map(([s, n]) => ({ offset: s * 512, len: Math.min(n, SECTORS - s) * 512 }));
  const blockRange = fc.tuple(fc.nat(IMAGE / 4096 - 1), fc.integer({ min: 1, max: 3 }))
    .map(([b, n]) => ({ offset: b * 4096, len: Math.min(n, IMAGE / 4096 - b) * 4096 }));
  const range = fc.oneof({ arbitrary: sectorRange, weight: 3 }, {
    arbitrary: blockRange,
    weight: 2,
  });
  return fc.tuple(
    fc.constantFrom("write", "write", "write", "zeroes", "discard", "read", "read"),
    range,
    fc.boolean(),
    fc.constantFrom(0, 0, 0, 1, 512),
  ).map(([kind, r, unmap, misalign]) => ({
    kind: kind as RmwOp["kind"],
    ...r,
    ...(kind === "zeroes" ? { unmap } : {}),
    ...(kind === "write" || kind === "read" ? { misalign } : {}),
  }));
}

Deno.test({
  name: "fuzz: concurrent unaligned/aligned writes, write-zeroes, discards and reads " +
    "from three IOThreads match a byte model",
  ignore: NO_LOOP,
  fn: () =>
    withLoopDevice(IMAGE, async (device) => {
      const threads = await startThreads(device, ["threads", "io_uring", "native"]);
      let nextId = 1;
      try {
        const roundArb = fc.array(fc.array(opArb(), { minLength: 1, maxLength: 12 }), {
          minLength: threads.length,
          maxLength: threads.length,
        });
        await fc.assert(
          fc.asyncProperty(fc.array(roundArb, { minLength: 1, maxLength: 4 }), async (rounds) => {
            const model = new ByteModel(readDevice(device, IMAGE));
            for (const perThread of rounds) {
              const ops = perThread.map((list) => list.map((o) => ({ ...o, id: nextId++ })));
              // allSettled: never start the next round while a thread still has I/O in flight.
              const settled = await Promise.allSettled(
                threads.map((t, i) => t.call<RmwResult>("rmwRun", { ops: ops[i] })),
              );
              const res = settled.map((s) => {
                if (s.status === "rejected") throw s.reason;
                return s.value;
              });
              const flat = ops.flat();
              const rets = res.flatMap((r) => r.rets);
              const reads = res.flatMap((r) =>
                r.reads.map((s) => s === null ? null : fromBase64(s))
              );
              const err = model.round(flat, rets, reads, readDevice(device, IMAGE));
              if (err !== null) {
                console.error(`fuzz round failed: ${err}\n${JSON.stringify(ops)}`);
                throw new Error(err);
              }
            }
          }),
          { numRuns: Number(Deno.env.get("RMW_FUZZ_RUNS") ?? 40) },
        );
      } finally {
        await stopThreads(threads);
      }
    }),
});
