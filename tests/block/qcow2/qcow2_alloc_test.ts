/**
 * The qcow2 allocator against QEMU: clusters freed by discard are allocated
 * again (the file stops growing), and a full refcount table grows; after
 * each, `qemu-img check` is clean (no leaks) and `qemu-img convert` reads
 * what was written; a copy taken while lazy refcounts left the image dirty
 * is repaired by a writable open.
 */
import assert from "node:assert/strict";
import { AioContext } from "../../../aio/mod.ts";
import { IoVector } from "../../../block/mod.ts";
import { parseQcow2Header } from "../../../block/qcow2/mod.ts";
import { runUntil } from "../helpers.ts";
import {
  assertCheckClean,
  openQcow2,
  oracleBytes,
  qemuImg,
  qemuImgCheck,
  qemuIo,
  tempDir,
} from "./qemu_tools.ts";

const opts = { sanitizeResources: false, sanitizeOps: false };

Deno.test("qcow2 alloc: discarded clusters are allocated again", opts, async () => {
  const dir = tempDir();
  const img = `${dir}/a.qcow2`;
  const cs = 4096, n = 64;
  qemuImg("create", "-q", "-f", "qcow2", "-o", `cluster_size=${cs}`, img, String(4 * n * cs));
  const ctx = new AioContext();
  const model = new Uint8Array(4 * n * cs);
  try {
    const blk = await openQcow2(ctx, img, { readOnly: false, discard: "unmap" });
    const write = async (cluster: number, byte: number) => {
      const data = new Uint8Array(cs).fill(byte);
      assert.equal(await runUntil(ctx, blk.pwritev(cluster * cs, IoVector.fromBuffers([data]))), 0);
      model.set(data, cluster * cs);
    };
    for (let c = 0; c < n; c++) await write(c, c + 1);
    assert.equal(await runUntil(ctx, blk.flush()), 0);
    const grown = Deno.statSync(img).size;
    // Free every other cluster, then write as many new ones elsewhere.
    for (let c = 0; c < n; c += 2) {
      assert.equal(await runUntil(ctx, blk.pdiscard(c * cs, cs)), 0);
      model.fill(0, c * cs, (c + 1) * cs);
    }
    for (let c = 0; c < n / 2; c++) await write(2 * n + c, 0x80 + c);
    assert.equal(await runUntil(ctx, blk.flush()), 0);
    await runUntil(ctx, blk.close());
    assert.equal(Deno.statSync(img).size, grown, "the new clusters reuse the freed ones");
  } finally {
    ctx.close();
  }
  try {
    assert.equal(assertCheckClean(img).leaks, 0);
    assert.deepEqual(oracleBytes(img), model);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("qcow2 alloc: a full refcount table grows", opts, async () => {
  const dir = tempDir();
  const img = `${dir}/g.qcow2`;
  // 512-byte clusters and 32-bit refcounts: one table cluster (64 entries)
  // of 128-cluster blocks covers 4 MiB of file; qemu-io fills most of it.
  qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=32", img, "8M");
  qemuIo(img, "qcow2", "write -P 0x11 0 3900k");
  const before = parseQcow2Header(Deno.readFileSync(img).subarray(0, 512), Deno.statSync(img).size);
  assert.equal(before.refcountTableClusters, 1);
  const model = oracleBytes(img);
  const ctx = new AioContext();
  try {
    const blk = await openQcow2(ctx, img, { readOnly: false });
    for (let off = 4 << 20; off < (5 << 20); off += 64 << 10) {
      const data = new Uint8Array(64 << 10).fill((off >> 16) & 0xff);
      assert.equal(await runUntil(ctx, blk.pwritev(off, IoVector.fromBuffers([data]))), 0);
      model.set(data, off);
    }
    assert.equal(await runUntil(ctx, blk.flush()), 0);
    await runUntil(ctx, blk.close());
  } finally {
    ctx.close();
  }
  try {
    const after = parseQcow2Header(
      Deno.readFileSync(img).subarray(0, 512),
      Deno.statSync(img).size,
    );
    assert(after.refcountTableClusters >= 2, `table of ${after.refcountTableClusters} clusters`);
    assert.notEqual(after.refcountTableOffset, before.refcountTableOffset);
    assert.equal(assertCheckClean(img).leaks, 0);
    assert.deepEqual(oracleBytes(img), model);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test(
  "qcow2 alloc: lazy refcounts mark the image dirty until a clean close",
  opts,
  async () => {
    const dir = tempDir();
    const img = `${dir}/l.qcow2`, crashed = `${dir}/crashed.qcow2`;
    qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", img, "4M");
    const model = new Uint8Array(4 << 20);
    const ctx = new AioContext();
    const header = (f: string) =>
      parseQcow2Header(Deno.readFileSync(f).subarray(0, 4096), Deno.statSync(f).size);
    try {
      const blk = await openQcow2(ctx, img, { readOnly: false });
      for (let c = 0; c < 40; c++) {
        const data = new Uint8Array(1024).fill(c + 1);
        const off = c * 12288 + 512;
        assert.equal(await runUntil(ctx, blk.pwritev(off, IoVector.fromBuffers([data]))), 0);
        model.set(data, off);
      }
      assert.equal(await runUntil(ctx, blk.flush()), 0);
      // Flushed: the entries are on disk, the refcounts not, the dirty bit set.
      assert.equal(header(img).dirty, true);
      Deno.copyFileSync(img, crashed); // what a crash now would leave
      await runUntil(ctx, blk.close());
    } finally {
      ctx.close();
    }
    try {
      assert.equal(header(img).dirty, false, "a clean close clears the dirty bit");
      assert.equal(assertCheckClean(img).leaks, 0);
      assert.deepEqual(oracleBytes(img), model);
      // The refcounts really were left behind (lazy): qemu-img sees errors.
      assert(qemuImgCheck(crashed).corruptions > 0, "the crashed copy's refcounts were written");
      // The crashed copy opened writable is repaired (as QEMU does): clean,
      // and it holds every flushed write.
      const ctx2 = new AioContext();
      try {
        const blk = await openQcow2(ctx2, crashed, { readOnly: false });
        await runUntil(ctx2, blk.close());
      } finally {
        ctx2.close();
      }
      assert.equal(header(crashed).dirty, false, "the repair cleared the dirty bit");
      assert.equal(assertCheckClean(crashed).leaks, 0);
      assert.deepEqual(oracleBytes(crashed), model);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
);
