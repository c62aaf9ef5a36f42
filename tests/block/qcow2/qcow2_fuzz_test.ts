/**
 * Fuzzing the qcow2 driver's parsers (fast-check): the header parser over
 * random and mutated headers, and whole images with mutated header, L1, L2,
 * refcount tables and compressed data, opened and read through the driver
 * over an in-memory file. Invariants: opening throws only a Qcow2Error or
 * yields a header whose tables lie inside the file; every read completes
 * exactly once, never inside preadv, with 0 or -EIO, within 5 s; the driver
 * never writes and never reads at an offset past the end of the file. Opened
 * writable, mutated images take writes, write-zeroes, discards and reads
 * that each complete once with 0, -EIO or -ENOSPC, and reopen afterwards.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import { AioContext } from "../../../aio/mod.ts";
import { Qcow2Error, type Qcow2Header } from "../../../block/mod.ts";
import { parseQcow2Header } from "../../../block/qcow2/mod.ts";
import { EIO, ENOSPC } from "../../../sys/mod.ts";
import { readDriver, sampleImage } from "./bad_image_util.ts";
import { MemDriver } from "./mem_driver.ts";
import { IoVector } from "../../../block/mod.ts";
import { Qcow2Driver } from "../../../block/qcow2/mod.ts";
import { runUntil } from "../helpers.ts";

const opts = { sanitizeResources: false, sanitizeOps: false };

const samples = [
  sampleImage("", true),
  sampleImage("compat=0.10,cluster_size=4096"),
  sampleImage("extended_l2=on,cluster_size=16k", true),
  sampleImage("cluster_size=512,refcount_bits=1"),
];

/** 32-bit values that sit on the parser's edges. */
const edgeU32 = fc.constantFrom(
  0,
  1,
  7,
  8,
  9,
  21,
  22,
  72,
  104,
  112,
  512,
  4096,
  65536,
  0x10000 + 512,
  0x7fffffff,
  0x80000000,
  0xfffffe00,
  0xffffffff,
);

/** A mutation: overwrite a byte or a big-endian u32 at an offset of a region. */
const mutationArb = fc.record({
  region: fc.constantFrom("header", "l1", "l2", "reftable", "anywhere"),
  at: fc.nat(),
  wide: fc.boolean(),
  value: fc.oneof(edgeU32, fc.integer({ min: 0, max: 0xffffffff })),
});

type Mutation = { region: string; at: number; wide: boolean; value: number };

function regionOf(img: Uint8Array, h: Qcow2Header, region: string): [number, number] {
  const dv = new DataView(img.buffer);
  switch (region) {
    case "header":
      return [0, 112];
    case "l1":
      return [h.l1TableOffset, Math.max(8, h.l1Size * 8)];
    case "l2": {
      const off = dv.getUint32(h.l1TableOffset + 4) & 0xfffffe00;
      return off > 0 ? [off, h.clusterSize] : [0, img.length];
    }
    case "reftable":
      return [h.refcountTableOffset, h.clusterSize];
    default:
      return [0, img.length];
  }
}

function mutate(base: Uint8Array, muts: Mutation[]): Uint8Array {
  const img = base.slice();
  const h = parseQcow2Header(base, base.length);
  const dv = new DataView(img.buffer);
  for (const m of muts) {
    const [start, len] = regionOf(base, h, m.region);
    const off = start + (m.at % Math.max(1, len - 4));
    if (off + 4 > img.length) continue;
    if (m.wide) dv.setUint32(off - (off % 4), m.value >>> 0);
    else img[off] = m.value & 0xff;
  }
  return img;
}

function checkHeader(h: Qcow2Header, fileLength: number): void {
  assert(h.clusterSize >= 512 && h.clusterSize <= 2 << 20);
  assert(Number.isSafeInteger(h.size) && h.size >= 0);
  assert(h.l1Size * h.l2Entries * h.clusterSize >= h.size);
  if (h.l1Size > 0) assert(h.l1TableOffset + h.l1Size * 8 <= fileLength);
  assert(h.refcountTableOffset + h.refcountTableClusters * h.clusterSize <= fileLength);
  assert(h.l1TableOffset % h.clusterSize === 0);
}

function parseOrTypedError(bytes: Uint8Array, fileLength: number): void {
  let h: Qcow2Header;
  try {
    h = parseQcow2Header(bytes, fileLength);
  } catch (e) {
    if (e instanceof Qcow2Error) return;
    throw e;
  }
  checkHeader(h, fileLength);
}

Deno.test("qcow2 fuzz: the header parser throws only Qcow2Error", opts, () => {
  fc.assert(
    fc.property(
      fc.uint8Array({ minLength: 0, maxLength: 600 }),
      fc.nat({ max: 1 << 24 }),
      (bytes, len) => {
        // Random bytes, and random bytes behind a valid magic and version.
        parseOrTypedError(bytes, len);
        const b = new Uint8Array(Math.max(bytes.length, 112));
        b.set(bytes);
        new DataView(b.buffer).setUint32(0, 0x514649fb);
        new DataView(b.buffer).setUint32(4, 2 + (len & 1));
        parseOrTypedError(b, len);
      },
    ),
    { numRuns: 3000 },
  );
  fc.assert(
    fc.property(
      fc.nat({ max: samples.length - 1 }),
      fc.array(mutationArb, { minLength: 1, maxLength: 6 }),
      fc.nat(),
      (which, muts, cut) => {
        const img = mutate(samples[which], muts.map((m) => ({ ...m, region: "header" })));
        parseOrTypedError(img.subarray(0, 4096), img.length);
        parseOrTypedError(img.subarray(0, 72 + (cut % 4096)), img.length);
        parseOrTypedError(img.subarray(0, 4096), cut % img.length);
      },
    ),
    { numRuns: 4000 },
  );
});

Deno.test("qcow2 fuzz: mutated images open with a typed error or read 0/-EIO", opts, async () => {
  const ctx = new AioContext();
  let opened = 0, eio = 0;
  try {
    await fc.assert(
      fc.asyncProperty(
        fc.nat({ max: samples.length - 1 }),
        fc.array(mutationArb, { minLength: 1, maxLength: 4 }),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 200_000 })), { maxLength: 4 }),
        fc.nat({ max: 3 << 20 }),
        async (which, muts, reads, backingSize) => {
          const img = mutate(samples[which], muts);
          const file = new MemDriver(ctx, img);
          let maxStart = -1;
          const pread = file.preadv.bind(file);
          file.preadv = (off, q, cb) => {
            maxStart = Math.max(maxStart, off);
            pread(off, q, cb);
          };
          const backing = new MemDriver(ctx, new Uint8Array(backingSize).fill(0x42));
          let d: Qcow2Driver;
          try {
            d = await runUntil(
              ctx,
              Qcow2Driver.open(ctx, file, {
                readOnly: true,
                openBacking: () => Promise.resolve(backing),
              }),
            );
          } catch (e) {
            if (e instanceof Qcow2Error) return;
            throw e;
          }
          opened++;
          checkHeader(d.header, img.length);
          const size = d.length;
          const plan: [number, number][] = [];
          for (let off = 0; off < Math.min(size, 1 << 20); off += 65536 + 512) {
            plan.push([off, Math.min(65536 + 512, size - off)]);
          }
          for (const [o, l] of reads) {
            if (size === 0) break;
            const off = o % size;
            plan.push([off, Math.min(l, size - off)]);
          }
          for (const [off, len] of plan) {
            const [ret] = await readDriver(ctx, d, off, len);
            assert(ret === 0 || ret === -EIO, `read ${off}+${len}: ${ret}`);
            if (ret === -EIO) eio++;
          }
          assert.equal(file.writes, 0);
          assert(maxStart < img.length, `read at ${maxStart} past the file (${img.length})`);
          assert.equal(file.inFlight, 0);
          await d.close();
        },
      ),
      { numRuns: 1000 },
    );
  } finally {
    ctx.close();
  }
  console.log(`qcow2 fuzz: ${opened} mutated images opened, ${eio} reads failed with -EIO`);
  // The mutations must reach the read path, not only the header checks.
  assert(opened > 50, `only ${opened} mutated images opened`);
  assert(eio > 0, "no read met a bad entry");
});

Deno.test("qcow2 fuzz: writes to mutated images complete with 0 or an errno", opts, async () => {
  const ctx = new AioContext();
  let opened = 0, failed = 0;
  const wait = (f: (cb: (r: number) => void) => void) =>
    runUntil(
      ctx,
      new Promise<number>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error("request hung")), 5_000);
        let calls = 0;
        f((r) => {
          if (++calls > 1) reject(new Error("completed twice"));
          clearTimeout(t);
          resolve(r);
        });
      }),
    );
  try {
    await fc.assert(
      fc.asyncProperty(
        fc.nat({ max: samples.length - 1 }),
        fc.array(mutationArb, { minLength: 1, maxLength: 3 }),
        fc.array(
          fc.tuple(fc.nat({ max: 3 }), fc.nat(), fc.integer({ min: 1, max: 100_000 })),
          { minLength: 1, maxLength: 6 },
        ),
        async (which, muts, ops) => {
          const img = mutate(samples[which], muts);
          const file = new MemDriver(ctx, img.slice(), true);
          // Writes stay inside the file or extend it by whole clusters (allocation).
          let maxEnd = 0;
          const pwrite = file.pwritev.bind(file);
          file.pwritev = (off, q, cb) => {
            maxEnd = Math.max(maxEnd, off + q.size);
            pwrite(off, q, cb);
          };
          let d: Qcow2Driver;
          try {
            d = await runUntil(ctx, Qcow2Driver.open(ctx, file, { readOnly: false }));
          } catch (e) {
            if (e instanceof Qcow2Error) return;
            throw e;
          }
          opened++;
          const size = d.length;
          for (const [kind, o, l] of ops) {
            if (size === 0) break;
            const off = o % size, len = Math.min(l, size - off);
            const data = new Uint8Array(len).fill(0x5c);
            const ret = await wait((cb) =>
              kind === 0
                ? d.pwritev(off, IoVector.fromBuffers([data]), cb)
                : kind === 1
                ? d.pwriteZeroes(off, len, false, cb)
                : kind === 2
                ? d.pdiscard(off, len, cb)
                : d.preadv(off, IoVector.fromBuffers([data]), cb)
            );
            assert(
              ret === 0 || ret === -EIO || ret === -ENOSPC,
              `op ${kind} ${off}+${len}: ${ret}`,
            );
            if (ret < 0) failed++;
          }
          assert.equal(await wait((cb) => d.flush(cb)), 0);
          assert.equal(file.inFlight, 0);
          // At most the file plus what the ops could allocate (data, L2
          // tables, refcount blocks): twice their bytes and a few clusters each.
          const cs = d.header.clusterSize;
          const grow = ops.reduce((n, [, , l]) => n + 2 * (l + 4 * cs), 0);
          const limit = Math.ceil(img.length / cs) * cs + grow;
          assert(maxEnd <= limit, `wrote up to ${maxEnd}, file was ${img.length}`);
          await runUntil(ctx, d.close());
          // The result opens again (or is refused with a typed error).
          try {
            const again = await runUntil(
              ctx,
              Qcow2Driver.open(ctx, new MemDriver(ctx, file.bytes), { readOnly: true }),
            );
            await again.close();
          } catch (e) {
            if (!(e instanceof Qcow2Error)) throw e;
          }
        },
      ),
      {
        numRuns: 400,
        // Found by this fuzzer: a refcount table entry pointing far past the
        // end of the file made the allocator write a refcount block there.
        examples: [[0, [
          { region: "reftable", at: 1073741821, wide: false, value: 805889 },
          { region: "header", at: 576731992, wide: false, value: 0 },
        ], [[0, 12950799, 25330]]]],
      },
    );
  } finally {
    ctx.close();
  }
  console.log(`qcow2 write fuzz: ${opened} mutated images opened writable, ${failed} ops failed`);
  assert(opened > 30, `only ${opened} mutated images opened writable`);
});
