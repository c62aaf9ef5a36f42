/**
 * The qcow2 write path against QEMU: random writes, write-zeroes and flushes
 * through our BlockBackend (mirrored in a byte model) on images made by
 * qemu-img (v2 and v3, cluster sizes 512 B - 64 KiB, 1- and 16-bit
 * refcounts, raw and qcow2 backing files, compressed and zero clusters to
 * copy on write from); reads along the way match the model; afterwards
 * `qemu-img check` finds no corruption and `qemu-img compare` finds the
 * image equal to the model.
 */
import assert from "node:assert/strict";
import { AioContext } from "../../../aio/mod.ts";
import { type BlockBackend, IoVector } from "../../../block/mod.ts";
import { runUntil } from "../helpers.ts";
import {
  assertCheckClean,
  openQcow2,
  oracleBytes,
  qemuImg,
  qemuIo,
  readAt,
  run,
  tempDir,
} from "./qemu_tools.ts";

const opts = { sanitizeResources: false, sanitizeOps: false };

/** xorshift32: the workload is the same on every run for a seed. */
function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}

async function workload(
  ctx: AioContext,
  blk: BlockBackend,
  model: Uint8Array,
  seed: number,
  ops: number,
  cs: number,
): Promise<void> {
  const rnd = prng(seed);
  const size = model.length;
  for (let i = 0; i < ops; i++) {
    const kind = rnd();
    // Offsets near cluster boundaries half the time, sometimes unaligned.
    let off = Math.floor(rnd() * size);
    if (rnd() < 0.5) off = off - (off % cs) + (rnd() < 0.5 ? 0 : cs - 512);
    if (rnd() < 0.7) off -= off % 512;
    const len = Math.max(1, Math.min(size - off, Math.floor(rnd() * 3 * cs) + 1));
    if (off >= size) continue;
    if (kind < 0.6) {
      const data = new Uint8Array(len);
      for (let j = 0; j < len; j += 4096) data.fill(((seed + i * 13 + j) % 251) + 1, j, j + 4096);
      const ret = await runUntil(ctx, blk.pwritev(off, IoVector.fromBuffers([data])));
      assert.equal(ret, 0, `write ${off}+${len}`);
      model.set(data, off);
    } else if (kind < 0.7) {
      assert.equal(await runUntil(ctx, blk.pwriteZeroes(off, len)), 0, `zeroes ${off}+${len}`);
      model.fill(0, off, off + len);
    } else if (kind < 0.75) {
      assert.equal(await runUntil(ctx, blk.flush()), 0);
    } else if (kind < 0.8) {
      // Discard frees whole clusters it owns: each reads back either as
      // before or as zeroes, nothing else; the model takes what we read.
      assert.equal(await runUntil(ctx, blk.pdiscard(off, len)), 0, `discard ${off}+${len}`);
      for (let c = Math.ceil(off / cs) * cs; c + cs <= Math.min(off + len, size); c += cs) {
        const [ret, got] = await readAt(ctx, blk, c, cs);
        assert.equal(ret, 0);
        const before = model.subarray(c, c + cs);
        const same = got.every((b, j) => b === before[j]);
        assert(same || got.every((b) => b === 0), `discarded cluster ${c} reads garbage`);
        model.set(got, c);
      }
    } else {
      const [ret, got] = await readAt(ctx, blk, off, len);
      assert.equal(ret, 0);
      const want = model.subarray(off, off + len);
      for (let j = 0; j < len; j++) {
        if (got[j] !== want[j]) assert.fail(`op ${i}: read ${off}+${len} differs at +${j}`);
      }
    }
  }
  // A batch of concurrent writes into the same fresh clusters (queued allocations).
  const base = Math.floor(size / 2) - (Math.floor(size / 2) % cs);
  const batch: Promise<number>[] = [];
  for (let k = 0; k < 8 && base + (k + 1) * 1024 <= size; k++) {
    const data = new Uint8Array(1024).fill(200 + k);
    model.set(data, base + k * 1024);
    batch.push(blk.pwritev(base + k * 1024, IoVector.fromBuffers([data])));
  }
  const rets = await runUntil(ctx, Promise.all(batch));
  assert(rets.every((r) => r === 0), `concurrent writes: ${rets}`);
}

/** Runs the workload on `image`, checks it with qemu-img; returns the leaked clusters. */
async function exercise(
  image: string,
  seed: number,
  ops: number,
  cs: number,
  extra = {},
): Promise<number> {
  const model = oracleBytes(image);
  const ctx = new AioContext();
  try {
    const blk = await openQcow2(ctx, image, { readOnly: false, discard: "unmap", ...extra });
    try {
      await workload(ctx, blk, model, seed, ops, cs);
      assert.equal(await runUntil(ctx, blk.flush()), 0);
    } finally {
      await runUntil(ctx, blk.close());
    }
  } finally {
    ctx.close();
  }
  const { leaks } = assertCheckClean(image);
  const raw = `${image}.model.raw`;
  Deno.writeFileSync(raw, model);
  run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", image, raw]);
  Deno.removeSync(raw);
  return leaks;
}

Deno.test("qcow2 write: fresh images, v3 and v2, 512 B to 64 KiB clusters", opts, async () => {
  const d = tempDir();
  try {
    const cases: [string, number][] = [
      ["cluster_size=65536", 65536],
      ["compat=0.10,cluster_size=4096", 4096],
      ["cluster_size=512,refcount_bits=1", 512],
      ["cluster_size=16384,refcount_bits=8", 16384],
    ];
    for (const [o, cs] of cases) {
      const img = `${d}/w-${cs}.qcow2`;
      qemuImg("create", "-q", "-f", "qcow2", "-o", o, img, String(5 * (1 << 20) + 7 * 512));
      // Nothing is shared or compressed here: nothing may leak (a cluster
      // zeroed under the zero flag is written into again, not replaced).
      assert.equal(await exercise(img, cs, 150, cs), 0, `leaks with ${o}`);
    }
  } finally {
    Deno.removeSync(d, { recursive: true });
  }
});

Deno.test(
  "qcow2 write: copy on write from backing, zero and compressed clusters",
  opts,
  async () => {
    const d = tempDir();
    try {
      qemuImg("create", "-q", "-f", "raw", `${d}/base.raw`, "4M");
      qemuIo(`${d}/base.raw`, "raw", "write -P 0x61 0 4M");
      qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", `${d}/mid.qcow2`);
      qemuIo(`${d}/mid.qcow2`, "qcow2", "write -P 0x62 1m 1m", "write -z 2m 128k");
      qemuImg(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        `${d}/top.qcow2`,
        "6M",
      );
      qemuIo(`${d}/top.qcow2`, "qcow2", "write -z 0 64k", "write -c -P 0x63 3m 64k");
      await exercise(`${d}/top.qcow2`, 7, 200, 65536, { cache: "none", aio: "io_uring" });
      // The backing files were not written.
      assertCheckClean(`${d}/mid.qcow2`);
      assert.equal(oracleBytes(`${d}/base.raw`, "raw")[12345], 0x61);

      qemuImg("create", "-q", "-f", "raw", `${d}/src.raw`, "2M");
      qemuIo(`${d}/src.raw`, "raw", "write -P 0x70 0 2M");
      qemuImg("convert", "-c", "-f", "raw", "-O", "qcow2", `${d}/src.raw`, `${d}/c.qcow2`);
      await exercise(`${d}/c.qcow2`, 11, 120, 65536);
    } finally {
      Deno.removeSync(d, { recursive: true });
    }
  },
);
