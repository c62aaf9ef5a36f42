/**
 * Repair of a dirty image at a writable open (lazy refcounts left stale by
 * a crash), as QEMU's qcow2_do_open does: images left dirty by our own
 * writer (SIGKILL) and by qemu-io (`sigraise 9`) open writable, the dirty
 * bit is cleared, `qemu-img check` finds no corruption and no leaks, every
 * flushed write reads back and further writes work. A dirty image whose
 * metadata is inconsistent is refused with a Qcow2Error and not written;
 * fuzzed dirty images are either repaired or refused without a write.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import { AioContext } from "../../../aio/mod.ts";
import { IoVector, Qcow2Error, type Qcow2Header } from "../../../block/mod.ts";
import { parseQcow2Header, Qcow2Driver } from "../../../block/qcow2/mod.ts";
import { MemDriver } from "./mem_driver.ts";
import { runUntil } from "../helpers.ts";
import {
  assertCheckClean,
  openQcow2,
  oracleBytes,
  qemuImg,
  qemuImgCheck,
  tempDir,
} from "./qemu_tools.ts";
import { SLOT_BYTES, slotTag } from "./fixtures/slot_tag.ts";

const opts = { sanitizeResources: false, sanitizeOps: false };
const WRITER = new URL("./fixtures/qcow2_writer.ts", import.meta.url).pathname;

function header(f: string): Qcow2Header {
  return parseQcow2Header(Deno.readFileSync(f).subarray(0, 4096), Deno.statSync(f).size);
}

/** qemu-img check's corruption count (without asserting anything). */
function corruptions(img: string): number {
  return qemuImgCheck(img).corruptions;
}

/** qemu-io runs CMDS on IMG and raises SIGKILL before closing it (QEMU's iotest 039). */
function qemuIoKilled(img: string, ...cmds: string[]): void {
  const args = ["-f", "qcow2"];
  for (const c of cmds) args.push("-c", c);
  args.push("-c", "sigraise 9", img);
  const out = new Deno.Command("qemu-io", { args, stdout: "null", stderr: "piped" }).outputSync();
  assert.equal(out.signal, "SIGKILL", new TextDecoder().decode(out.stderr));
}

/** Opens `img` writable (repairing it), writes `extra` at `at`, closes. */
async function openWriteClose(img: string, at: number, extra: Uint8Array): Promise<void> {
  const ctx = new AioContext();
  try {
    const blk = await openQcow2(ctx, img, { readOnly: false });
    assert.equal(header(img).dirty, false, "the open repaired the image and cleared the bit");
    assert.equal(await runUntil(ctx, blk.pwritev(at, IoVector.fromBuffers([extra]))), 0);
    assert.equal(await runUntil(ctx, blk.flush()), 0);
    await runUntil(ctx, blk.close());
  } finally {
    ctx.close();
  }
}

Deno.test("qcow2 repair: our writer killed with lazy refcounts", opts, async () => {
  const dir = tempDir();
  try {
    const base = `${dir}/base.raw`, img = `${dir}/w.qcow2`;
    qemuImg("create", "-q", "-f", "raw", base, "16M");
    qemuImg(
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "lazy_refcounts=on,cluster_size=4k",
      "-b",
      base,
      "-F",
      "raw",
      img,
    );
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--no-check", WRITER, img, "writeback", "threads"],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const out: string[] = [];
    const dec = new TextDecoder();
    const reader = (async () => {
      for await (const chunk of child.stdout) out.push(dec.decode(chunk));
    })();
    const start = Date.now();
    while (!/flushed (\d{3,})/.test(out.join("")) && Date.now() - start < 30_000) {
      await new Promise((r) => setTimeout(r, 10));
    }
    child.kill("SIGKILL");
    await child.status;
    await reader;
    const lines = out.join("").trim().split("\n").filter((l) => l.startsWith("flushed "));
    assert(lines.length > 0, "the writer flushed nothing");
    const flushed = Number(lines[lines.length - 1].split(" ")[1]);
    assert.equal(header(img).dirty, true, "killed before a clean close: dirty");
    assert(corruptions(img) > 0, "the refcounts were left behind (lazy)");

    const extra = new Uint8Array(SLOT_BYTES).fill(0xa5);
    const at = (16 << 20) - SLOT_BYTES;
    await openWriteClose(img, at, extra);
    assert.equal(header(img).dirty, false);
    assert.equal(assertCheckClean(img).leaks, 0);
    const disk = oracleBytes(img);
    const slots = disk.length / SLOT_BYTES;
    for (let k = 0; k < flushed; k++) {
      const s = (k * 2741) % slots;
      if (s * SLOT_BYTES === at) continue;
      assert.deepEqual(
        disk.subarray(s * SLOT_BYTES, (s + 1) * SLOT_BYTES),
        slotTag(k),
        `write ${k}`,
      );
    }
    assert.deepEqual(disk.subarray(at, at + SLOT_BYTES), extra);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("qcow2 repair: an image qemu-io left dirty", opts, async () => {
  const dir = tempDir();
  try {
    const img = `${dir}/q.qcow2`;
    qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", img, "8M");
    qemuIoKilled(
      img,
      // Compressed writes flush QEMU's caches (clean): they go first; two
      // compressed extents share a host cluster (refcount 2).
      "write -c -P 0x33 4M 4k",
      "write -c -P 0x34 4100k 4k",
      "write -z 5M 8k",
      "write -P 0x11 0 64k",
      "write -P 0x22 1M 12k",
      "flush",
    );
    assert.equal(header(img).dirty, true, "qemu-io was killed before a clean close");
    assert(corruptions(img) > 0, "qemu left the refcounts behind (lazy)");
    const model = oracleBytes(img);
    const extra = new Uint8Array(4096).fill(0x44);
    await openWriteClose(img, 6 << 20, extra);
    model.set(extra, 6 << 20);
    assert.equal(assertCheckClean(img).leaks, 0);
    assert.deepEqual(oracleBytes(img), model);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test(
  "qcow2 repair: a dirty image without the lazy_refcounts bit is repaired too (as QEMU)",
  opts,
  async () => {
    const dir = tempDir();
    try {
      const img = `${dir}/n.qcow2`;
      qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", img, "8M");
      qemuIoKilled(img, "write -P 0x11 0 64k", "flush");
      // Clear compatible_features (offset 80): only the dirty bit is left.
      const f = Deno.openSync(img, { read: true, write: true });
      f.seekSync(80, Deno.SeekMode.Start);
      f.writeSync(new Uint8Array(8));
      f.close();
      assert.equal(header(img).lazyRefcounts, false);
      assert.equal(header(img).dirty, true);
      const model = oracleBytes(img);
      await openWriteClose(img, 1 << 20, new Uint8Array(4096).fill(0x55));
      model.fill(0x55, 1 << 20, (1 << 20) + 4096);
      assert.equal(assertCheckClean(img).leaks, 0);
      assert.deepEqual(oracleBytes(img), model);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
);

Deno.test(
  "qcow2 repair: a missing refcount block is added at the end of the file",
  opts,
  async () => {
    const dir = tempDir();
    try {
      // 512-byte clusters, 16-bit refcounts: 256 clusters (128 KiB) per block.
      const img = `${dir}/b.qcow2`;
      qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=512", img, "4M");
      qemuIoKilled(img, "write -P 0x66 0 400k", "flush");
      const h = header(img);
      const bytes = Deno.readFileSync(img);
      const rt = new DataView(bytes.buffer, h.refcountTableOffset, 16);
      assert.notEqual(rt.getUint32(12), 0, "a second refcount block exists");
      // Unlink the second block: the clusters it covered have none now (the
      // block itself becomes a leak).
      rt.setUint32(8, 0);
      rt.setUint32(12, 0);
      Deno.writeFileSync(img, bytes);
      const oldEnd = bytes.length;
      const model = oracleBytes(img);
      await openWriteClose(img, 3 << 20, new Uint8Array(512).fill(0x77));
      const after = Deno.readFileSync(img);
      const rt2 = new DataView(after.buffer, header(img).refcountTableOffset, 16);
      assert(rt2.getUint32(12) >= oldEnd, `the new block lies past the old end ${oldEnd}`);
      model.fill(0x77, 3 << 20, (3 << 20) + 512);
      assert.equal(assertCheckClean(img).leaks, 0);
      assert.deepEqual(oracleBytes(img), model);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
);

/** A dirty image with L2 entry `entry` of the first table rewritten to `target`. */
function corruptL2(img: string, entry: number, target: (h: Qcow2Header, dv: DataView) => number) {
  qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", img, "8M");
  qemuIoKilled(img, "write -P 0x11 0 64k", "flush");
  const h = header(img);
  const bytes = Deno.readFileSync(img);
  const dv = new DataView(bytes.buffer);
  const l2 = Number(dv.getBigUint64(h.l1TableOffset) & 0x00fffffffffffe00n);
  const off = target(h, new DataView(bytes.buffer, l2));
  dv.setBigUint64(l2 + entry * 8, BigInt(off) | (1n << 63n));
  Deno.writeFileSync(img, bytes);
}

async function assertRefused(img: string, message: RegExp): Promise<void> {
  const before = Deno.readFileSync(img);
  const ctx = new AioContext();
  try {
    await assert.rejects(
      () => openQcow2(ctx, img, { readOnly: false }),
      (e: Error) => e.name === "Qcow2Error" && message.test(e.message),
    );
  } finally {
    ctx.close();
  }
  assert.deepEqual(Deno.readFileSync(img), before, "nothing was written");
}

Deno.test(
  "qcow2 repair: an L2 entry on the refcount table is refused, nothing written",
  opts,
  async () => {
    const dir = tempDir();
    try {
      const img = `${dir}/c.qcow2`;
      corruptL2(img, 20, (h) => h.refcountTableOffset);
      await assertRefused(img, /used both by the refcount table and by a data cluster/);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
);

Deno.test(
  "qcow2 repair: two L2 entries on one cluster are refused, nothing written",
  opts,
  async () => {
    const dir = tempDir();
    try {
      const img = `${dir}/d.qcow2`;
      corruptL2(img, 20, (_h, l2) => Number(l2.getBigUint64(3 * 8) & 0x00fffffffffffe00n));
      await assertRefused(img, /used both by a data cluster and by a data cluster/);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
);

Deno.test(
  "qcow2 repair: an L2 entry past the end of the file is refused, nothing written",
  opts,
  async () => {
    const dir = tempDir();
    try {
      const img = `${dir}/e.qcow2`;
      corruptL2(img, 20, () => 1 << 30);
      await assertRefused(img, /past the end of the file/);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
);

Deno.test("qcow2 repair: a refcount table too small for a new block moves", opts, async () => {
  const dir = tempDir();
  try {
    // 512-byte clusters, 32-bit refcounts: a one-cluster table (64 entries
    // of 128-cluster blocks) covers the first 4 MiB of the file.
    const img = `${dir}/t.qcow2`;
    qemuImg(
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "lazy_refcounts=on,cluster_size=512,refcount_bits=32",
      img,
      "8M",
    );
    qemuIoKilled(img, "write -P 0x5c 0 1M", "flush");
    const h = header(img);
    assert.equal(h.refcountTableClusters, 1);
    // Unlink the second block, and put unused space up to 4.5 MiB: the new
    // block goes past what the table covers.
    const f = Deno.openSync(img, { read: true, write: true });
    f.seekSync(h.refcountTableOffset + 8, Deno.SeekMode.Start);
    f.writeSync(new Uint8Array(8));
    f.truncateSync(4608 << 10);
    f.close();
    const model = oracleBytes(img);
    await openWriteClose(img, 6 << 20, new Uint8Array(512).fill(0x78));
    model.fill(0x78, 6 << 20, (6 << 20) + 512);
    const after = header(img);
    assert(after.refcountTableClusters >= 2, `table of ${after.refcountTableClusters} clusters`);
    assert(after.refcountTableOffset >= 4608 << 10, "the new table is past the old end");
    assert.equal(assertCheckClean(img).leaks, 0);
    assert.deepEqual(oracleBytes(img), model);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test(
  "qcow2 repair fuzz: a mutated dirty image is repaired or refused unwritten",
  opts,
  async () => {
    const dir = tempDir();
    let img: Uint8Array;
    try {
      const f = `${dir}/z.qcow2`;
      qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", f, "8M");
      qemuIoKilled(
        f,
        "write -c -P 0x33 4M 4k",
        "write -c -P 0x34 4100k 4k",
        "write -z 5M 8k",
        "write -P 0x11 0 64k",
        "write -P 0x22 1M 12k",
        "flush",
      );
      img = Deno.readFileSync(f);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
    const h = parseQcow2Header(img.subarray(0, 4096), img.length);
    const dv = new DataView(img.buffer);
    const l2 = Number(dv.getBigUint64(h.l1TableOffset) & 0x00fffffffffffe00n);
    const block = Number(dv.getBigUint64(h.refcountTableOffset) & 0x00fffffffffffe00n);
    // Regions the repair reads: L1, an L2 table, the refcount table, a block.
    const regions: [number, number][] = [
      [h.l1TableOffset, h.l1Size * 8],
      [l2, 4096],
      [h.refcountTableOffset, 64],
      [block, 4096],
    ];
    const ctx = new AioContext();
    let repaired = 0, refused = 0;
    try {
      await fc.assert(
        fc.asyncProperty(
          fc.array(
            fc.tuple(fc.nat({ max: regions.length - 1 }), fc.nat(), fc.nat({ max: 0xffffffff })),
            { minLength: 1, maxLength: 3 },
          ),
          async (muts) => {
            const bytes = img.slice();
            const mdv = new DataView(bytes.buffer);
            for (const [r, at, v] of muts) {
              const [off, len] = regions[r];
              mdv.setUint32(off + (at % (len / 4)) * 4, v);
            }
            const file = new MemDriver(ctx, bytes.slice(), true);
            let writes = 0, maxEnd = 0;
            const pwrite = file.pwritev.bind(file);
            file.pwritev = (off, q, cb) => {
              writes++;
              maxEnd = Math.max(maxEnd, off + q.size);
              pwrite(off, q, cb);
            };
            let d: Qcow2Driver;
            try {
              d = await runUntil(ctx, Qcow2Driver.open(ctx, file, { readOnly: false }));
            } catch (e) {
              assert(e instanceof Qcow2Error, String(e));
              assert.equal(writes, 0, `refused (${e.message}) after ${writes} writes`);
              refused++;
              return;
            }
            repaired++;
            assert.equal(d.header.dirty, false);
            // At most the counted clusters plus new blocks and a table.
            assert(maxEnd <= bytes.length + 16 * 4096, `wrote up to ${maxEnd}`);
            await runUntil(ctx, d.close());
            const again = await runUntil(
              ctx,
              Qcow2Driver.open(ctx, new MemDriver(ctx, file.bytes), { readOnly: true }),
            );
            assert.equal(again.header.dirty, false);
            await again.close();
          },
        ),
        { numRuns: 200 },
      );
    } finally {
      ctx.close();
    }
    console.log(`qcow2 repair fuzz: ${repaired} repaired, ${refused} refused`);
    assert(repaired > 0 && refused > 0);
  },
);
