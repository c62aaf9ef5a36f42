/**
 * Bad qcow2 images are bad input: a header that breaks the rules is refused
 * with a typed {@link Qcow2Error} naming the problem; a bad L1 or L2 entry
 * fails only the requests that meet it, with -EIO; backing chains that loop,
 * are too deep or miss their format are refused.
 */
import assert from "node:assert/strict";
import { AioContext } from "../../../aio/mod.ts";
import { parseBlockOptions, Qcow2Error } from "../../../block/mod.ts";
import { parseQcow2Header, Qcow2Driver } from "../../../block/qcow2/mod.ts";
import { parseHostArgs } from "../../../dataplane/host_options.ts";
import { EIO } from "../../../sys/mod.ts";
import { runUntil } from "../helpers.ts";
import { openMem, readDriver, sampleImage, u64At, withU32, withU64 } from "./bad_image_util.ts";
import { MemDriver } from "./mem_driver.ts";
import { openQcow2, qemuImg, qemuIo, tempDir } from "./qemu_tools.ts";

const opts = { sanitizeResources: false, sanitizeOps: false };
const KIB64 = 65536;
const img = sampleImage();
const hdr = parseQcow2Header(img, img.length);

async function expectOpenError(bytes: Uint8Array, kind: string, message: RegExp): Promise<void> {
  const ctx = new AioContext();
  try {
    await assert.rejects(openMem(ctx, bytes), (e: unknown) => {
      assert(e instanceof Qcow2Error, `not a Qcow2Error: ${e}`);
      assert.equal(e.kind, kind, e.message);
      assert.match(e.message, message);
      return true;
    });
  } finally {
    ctx.close();
  }
}

Deno.test(
  "qcow2 bad header: unknown incompatible features refuse the image, named",
  opts,
  async () => {
    await expectOpenError(withU32(img, 76, 1 << 7), "Unsupported", /unknown incompatible.*bit 7/);
    await expectOpenError(withU32(img, 72, 1 << 8), "Unsupported", /bit 40/);
    await expectOpenError(withU32(img, 76, 1 << 2), "Unsupported", /external data file/);
    await expectOpenError(withU32(img, 32, 2), "Unsupported", /encrypted/);
    await expectOpenError(withU32(img, 4, 4), "Unsupported", /version 4/);
  },
);

Deno.test("qcow2 bad header: fields out of bounds are Invalid, not a crash", opts, async () => {
  const cases: [Uint8Array, string, RegExp][] = [
    [withU32(img, 0, 0x12345678), "BadMagic", /not a qcow2 image/],
    [img.slice(0, 100), "Invalid", /past the end|truncated/],
    [withU32(img, 20, 8), "Invalid", /cluster_bits 8/],
    [withU32(img, 20, 22), "Unsupported", /cluster_bits 22/],
    [withU32(img, 36, 0xffffffff), "Invalid", /exceeds 32 MiB/],
    [withU32(img, 36, 0), "Invalid", /L1 table has 0 entries/],
    [withU64(img, 24, 0x40000000, 0), "Invalid", /size is too large/],
    [withU64(img, 24, 0, 0x7fffffff), "Invalid", /L1 table has 1 entries/],
    [withU64(img, 40, 0, hdr.l1TableOffset + 512), "Invalid", /not cluster aligned/],
    [withU64(img, 40, 0, 0), "Invalid", /overlaps the header/],
    [withU64(img, 40, 0, 64 * KIB64), "Invalid", /past the end/],
    [withU64(img, 40, 0, hdr.refcountTableOffset), "Invalid", /overlaps the refcount table/],
    [withU32(img, 56, 0), "Invalid", /no refcount table/],
    [withU32(img, 56, 1000), "Invalid", /exceeds 8 MiB/],
    [withU32(img, 100, 1 << 20), "Invalid", /exceeds the cluster size/],
    [withU32(img, 100, 107), "Invalid", /multiple of 8/],
    [withU32(img, 96, 7), "Invalid", /refcount_order 7/],
    [withU32(img, 60, 70000), "Invalid", /snapshots exceed/],
    [withU32(withU64(img, 8, 0, 1024), 16, 2000), "Invalid", /backing file name of 2000/],
    [withU32(withU64(img, 8, 0, 65530), 16, 100), "Invalid", /outside the first cluster/],
    [withU32(withU64(img, 8, 0, 8), 16, 10), "Invalid", /overlaps the header/],
    [withU32(img, 76, 1 << 3), "Invalid", /compression type/],
    [withU32(withU32(img, 76, 1 << 4), 20, 12), "Invalid", /at least 16 KiB/],
    [withU32(withU64(img, 24, 0, 1 << 30), 36, 1), "Invalid", /L1 table has 1 entries; 2/],
  ];
  for (const [bytes, kind, re] of cases) {
    await expectOpenError(bytes, kind, re).catch((e) => {
      throw new Error(`case ${re}: ${e.message}`);
    });
  }
  // A header extension whose length runs past the cluster.
  const ext = hdr.headerLength;
  await expectOpenError(withU32(img, ext + 4, 0xfffffff0), "Invalid", /overflows/);
});

Deno.test("qcow2 dirty and corrupt bits: the image still opens read-only", opts, async () => {
  for (const bit of [1, 2]) {
    const ctx = new AioContext();
    try {
      const d = await openMem(ctx, withU32(img, 76, bit));
      assert.equal(d.header.dirty, bit === 1);
      assert.equal(d.header.corrupt, bit === 2);
      const [ret, buf] = await readDriver(ctx, d, 0, 4096);
      assert.equal(ret, 0);
      assert.equal(buf[0], 0xa1);
      await d.close();
    } finally {
      ctx.close();
    }
  }
});

Deno.test("qcow2: writable opens refuse what cannot be written safely yet", opts, async () => {
  const cases: [Uint8Array, RegExp][] = [
    [withU32(img, 76, 2), /marked corrupt/],
    [withU32(img, 96, 6), /64-bit refcounts/],
    [sampleImage("extended_l2=on,cluster_size=16k"), /extended L2/],
  ];
  for (const [bytes, re] of cases) {
    const ctx = new AioContext();
    try {
      await assert.rejects(
        runUntil(ctx, Qcow2Driver.open(ctx, new MemDriver(ctx, bytes), { readOnly: false })),
        (e: unknown) => e instanceof Qcow2Error && re.test(e.message),
      );
    } finally {
      ctx.close();
    }
  }
  // A dirty image is repaired at a writable open (its refcounts here are
  // already right): the dirty bit is cleared on disk.
  const ctx = new AioContext();
  try {
    const mem = new MemDriver(ctx, withU32(img, 76, 1), true);
    const d = await runUntil(ctx, Qcow2Driver.open(ctx, mem, { readOnly: false }));
    assert.equal(d.header.dirty, false);
    assert.equal(new DataView(mem.bytes.buffer, mem.bytes.byteOffset).getUint32(76), 0);
    await runUntil(ctx, d.close());
  } finally {
    ctx.close();
  }
  // Several IOThreads may write a qcow2 (one owner of the metadata).
  assert.equal(
    parseHostArgs([
      "--image",
      "x.qcow2",
      "--socket",
      "s",
      "--format",
      "qcow2",
      "--queues",
      "2",
      "--iothreads",
      "2",
    ]).iothreads,
    2,
  );
  assert.equal(
    parseHostArgs(["--image", "x.qcow2", "--socket", "s", "--format", "qcow2", "--queues", "2"])
      .block.format,
    "qcow2",
  );
  const o = parseHostArgs([
    "--image",
    "x.qcow2",
    "--socket",
    "s",
    "--format",
    "qcow2",
    "--read-only",
    "--l2-cache-size",
    "4M",
  ]);
  assert.equal(o.block.format, "qcow2");
  assert.equal(o.block.l2CacheSize, 4 << 20);
  assert.throws(() => parseHostArgs(["--image", "x", "--socket", "s", "--l2-cache-size", "1M"]));
  const b = parseBlockOptions("driver=qcow2,file.driver=file,file.filename=x.qcow2,read-only=on");
  assert.equal(b.format, "qcow2");
  assert.equal(b.driver, "file");
  assert.equal(b.filename, "x.qcow2");
  assert.equal(
    parseBlockOptions("format=qcow2,file=y,readonly=on,l2-cache-size=1M").l2CacheSize,
    1 << 20,
  );
  assert.throws(() => parseBlockOptions("driver=null-co,format=qcow2,read-only=on"), /driver=file/);
});

/** The L2 table of guest cluster 0 and the offset of L2 entry `i` in the file. */
const l2Table = u64At(img, hdr.l1TableOffset) % 2 ** 56 - (u64At(img, hdr.l1TableOffset) % 512);
const l2Entry = (i: number) => l2Table + i * 8;

Deno.test("qcow2 bad L2 entries fail only their own requests with -EIO", opts, async () => {
  assert(l2Table > 0 && l2Table % KIB64 === 0);
  const dataOf0 = u64At(img, l2Entry(0)) % 2 ** 56;
  const bad: [string, Uint8Array][] = [
    ["past EOF", withU64(img, l2Entry(2), 0x80000000, img.length + KIB64)],
    ["far past EOF", withU64(img, l2Entry(2), 0x80fffff0, 0)],
    ["into the header", withU64(img, l2Entry(2), 0x80000000, 0)],
    ["into the refcount table", withU64(img, l2Entry(2), 0x80000000, hdr.refcountTableOffset)],
    ["into the L1 table", withU64(img, l2Entry(2), 0x80000000, hdr.l1TableOffset)],
    ["into an L2 table", withU64(img, l2Entry(2), 0x80000000, l2Table)],
    ["misaligned", withU64(img, l2Entry(2), 0x80000000, dataOf0 + 4096)],
    ["reserved bits", withU64(img, l2Entry(2), 0x81000000, dataOf0)],
    ["COPIED without offset", withU64(img, l2Entry(2), 0x80000000, 0x0)],
    ["compressed garbage", withU64(img, l2Entry(2), 0x40000000, dataOf0)],
    ["compressed past EOF", withU64(img, l2Entry(2), 0x40000000, img.length + 100)],
  ];
  for (const [what, bytes] of bad) {
    const ctx = new AioContext();
    try {
      const d = await openMem(ctx, bytes);
      const [ret] = await readDriver(ctx, d, 2 * KIB64, 4096);
      assert.equal(ret, -EIO, what);
      const [ret3] = await readDriver(ctx, d, 2 * KIB64 - 512, 8192); // spans clusters 1 and 2
      assert.equal(ret3, -EIO, what);
      const [ok, buf] = await readDriver(ctx, d, 0, 4096);
      assert.equal(ok, 0, what);
      assert.equal(buf[100], 0xa1, what);
      await d.close();
    } finally {
      ctx.close();
    }
  }
});

Deno.test("qcow2 bad L1 entries fail only their own requests with -EIO", opts, async () => {
  // A 2 GiB image: two L1 entries in use (a 64 KiB-cluster L2 table maps 512 MiB).
  const d0 = tempDir();
  try {
    const path = `${d0}/l1.qcow2`;
    qemuImg("create", "-q", "-f", "qcow2", path, "2G");
    qemuIo(path, "qcow2", "write -P 0x01 0 4k", "write -P 0x02 512m 4k");
    const base = Deno.readFileSync(path);
    const h = parseQcow2Header(base, base.length);
    const e1 = h.l1TableOffset + 8;
    for (
      const [what, hi, lo] of [
        ["past EOF", 0x80000000, base.length + KIB64],
        ["into the L1 table", 0x80000000, h.l1TableOffset],
        ["into the refcount table", 0x80000000, h.refcountTableOffset],
        ["reserved bits", 0x80000000, 0x1000 | KIB64 * 4],
        ["misaligned", 0x80000000, 0x50000 + 512],
      ] as const
    ) {
      const ctx = new AioContext();
      try {
        const d = await openMem(ctx, withU64(base, e1, hi, lo));
        const [bad] = await readDriver(ctx, d, 512 << 20, 4096);
        assert.equal(bad, -EIO, what);
        const [ok, buf] = await readDriver(ctx, d, 0, 4096);
        assert.equal(ok, 0, what);
        assert.equal(buf[0], 0x01, what);
        await d.close();
      } finally {
        ctx.close();
      }
    }
  } finally {
    Deno.removeSync(d0, { recursive: true });
  }
});

Deno.test(
  "qcow2 backing chains: loops, depth, missing files and formats are refused",
  opts,
  async () => {
    const d = tempDir();
    const ctx = new AioContext();
    try {
      const openErr = async (path: string, re: RegExp) => {
        await assert.rejects(openQcow2(ctx, path), (e: unknown) => {
          assert(e instanceof Qcow2Error, String(e));
          assert.match(e.message, re);
          return true;
        });
      };
      qemuImg("create", "-q", "-f", "qcow2", `${d}/a.qcow2`, "1M");
      qemuImg("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", `${d}/b.qcow2`);
      qemuImg("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", `${d}/a.qcow2`);
      await openErr(`${d}/b.qcow2`, /loops/);
      await openErr(`${d}/a.qcow2`, /loops/);
      qemuImg("create", "-q", "-f", "qcow2", `${d}/self.qcow2`, "1M");
      qemuImg("rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", `${d}/self.qcow2`);
      await openErr(`${d}/self.qcow2`, /loops/);

      qemuImg("create", "-q", "-f", "qcow2", `${d}/c0.qcow2`, "1M");
      for (let i = 1; i <= 34; i++) {
        qemuImg(
          "create",
          "-q",
          "-f",
          "qcow2",
          "-u",
          "-b",
          `c${i - 1}.qcow2`,
          "-F",
          "qcow2",
          `${d}/c${i}.qcow2`,
          "1M",
        );
      }
      await openErr(`${d}/c34.qcow2`, /deeper than 32/);
      const ok = await openQcow2(ctx, `${d}/c20.qcow2`);
      await runUntil(ctx, ok.close());

      qemuImg(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "nothere.raw",
        "-F",
        "raw",
        `${d}/m.qcow2`,
        "1M",
      );
      await openErr(`${d}/m.qcow2`, /cannot open .*nothere\.raw/);

      // The backing format extension renamed to an unknown type: not recorded.
      qemuImg("create", "-q", "-f", "raw", `${d}/base.raw`, "1M");
      qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", `${d}/nf.qcow2`);
      const bytes = Deno.readFileSync(`${d}/nf.qcow2`);
      const dv = new DataView(bytes.buffer);
      let at = parseQcow2Header(bytes, bytes.length).headerLength;
      while (dv.getUint32(at) !== 0xe2792aca) at += 8 + Math.ceil(dv.getUint32(at + 4) / 8) * 8;
      dv.setUint32(at, 0x12345678);
      Deno.writeFileSync(`${d}/nf.qcow2`, bytes);
      await openErr(`${d}/nf.qcow2`, /no recorded format/);
    } finally {
      ctx.close();
      Deno.removeSync(d, { recursive: true });
    }
  },
);
