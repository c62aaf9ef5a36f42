/**
 * The rbd driver against a real one-monitor, one-OSD Ceph cluster (memstore,
 * loopback only; tests/harness/ceph_cluster.ts), one cluster for the file.
 * What our driver writes is checked with `rbd export` and QEMU's own rbd
 * driver (`qemu-img convert` from rbd:, qemu-block-extra); what they write is
 * read back through our driver. Without Ceph installed the test is skipped
 * with a loud warning (tools/setup.sh --test installs it).
 */
import assert from "node:assert/strict";
import { AioContext } from "../../aio/mod.ts";
import { BlockBackend, IoVector, parseBlockOptions, RbdDriver } from "../../block/mod.ts";
import { EINVAL, ENOENT, EROFS, ETIMEDOUT, librbdLoadError, SysError } from "../../sys/mod.ts";
import { CephCluster, cephUnavailable } from "../harness/ceph_cluster.ts";
import { fillPattern, runUntil } from "./helpers.ts";

const NO_CEPH = librbdLoadError() ?? cephUnavailable();
if (NO_CEPH) console.warn(`SKIPPING the rbd driver tests (no Ceph here): ${NO_CEPH}`);

const MiB = 1 << 20;
const IMAGE_SIZE = 16 * MiB;

async function exported(cluster: CephCluster, image: string): Promise<Uint8Array> {
  const path = `${cluster.dir}/${image}.export`;
  await Deno.remove(path).catch(() => {});
  await cluster.rbd("export", `${cluster.pool}/${image}`, path);
  return await Deno.readFile(path);
}

async function qemuImg(...args: string[]): Promise<void> {
  const out = await new Deno.Command("qemu-img", { args, stdout: "piped", stderr: "piped" })
    .output();
  if (!out.success) {
    throw new Error(`qemu-img ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
}

Deno.test({
  name: "rbd driver against a one-node Ceph cluster",
  ignore: NO_CEPH !== null,
  async fn(t) {
    const cluster = await CephCluster.start();
    const ctx = new AioContext();
    try {
      await cluster.rbd("create", "--size", `${IMAGE_SIZE / MiB}M`, `${cluster.pool}/disk`);
      const open = (image = "disk", extra = "") =>
        runUntil(
          ctx,
          BlockBackend.open(
            ctx,
            parseBlockOptions(`file=rbd:${cluster.pool}/${image}:conf=${cluster.conf}${extra}`),
          ),
        );

      await t.step("writes land where rbd export and QEMU's rbd driver see them", async () => {
        const blk = await open();
        assert.equal(blk.length, IMAGE_SIZE);
        assert.equal(blk.driver.name, "raw");
        const a = fillPattern(new Uint8Array(64 * 1024), 1);
        const b1 = fillPattern(new Uint8Array(3000), 2), b2 = fillPattern(new Uint8Array(1096), 3);
        const c = fillPattern(new Uint8Array(4096), 4);
        // In flight together: an aligned write, an unaligned two-buffer one
        // straddling an object boundary (4 MiB objects), one at the very end.
        const rets = await runUntil(
          ctx,
          Promise.all([
            blk.pwritev(0, IoVector.fromBuffers([a])),
            blk.pwritev(4 * MiB - 2048 + 1, IoVector.fromBuffers([b1, b2])),
            blk.pwritev(IMAGE_SIZE - 4096, IoVector.fromBuffers([c])),
          ]),
        );
        assert.deepEqual(rets, [0, 0, 0]);
        assert.equal(await runUntil(ctx, blk.flush()), 0);

        const img = await exported(cluster, "disk");
        assert.equal(img.length, IMAGE_SIZE);
        assert.deepEqual(img.subarray(0, a.length), a);
        const off = 4 * MiB - 2048 + 1;
        assert.deepEqual(img.subarray(off, off + 3000), b1);
        assert.deepEqual(img.subarray(off + 3000, off + 4096), b2);
        assert.deepEqual(img.subarray(IMAGE_SIZE - 4096), c);
        assert(img.subarray(a.length, off).every((x) => x === 0));

        // QEMU's rbd driver reads the same bytes.
        const raw = `${cluster.dir}/disk.qemu.raw`;
        await qemuImg("convert", "-f", "raw", "-O", "raw", cluster.qemuFilename("disk"), raw);
        assert.deepEqual(await Deno.readFile(raw), img);

        // And our reads see them too, into a three-piece vector.
        const r1 = new Uint8Array(1000), r2 = new Uint8Array(3000), r3 = new Uint8Array(96);
        assert.equal(await runUntil(ctx, blk.preadv(off, IoVector.fromBuffers([r1, r2, r3]))), 0);
        assert.deepEqual(r1, b1.subarray(0, 1000));
        assert.deepEqual(r2.subarray(0, 2000), b1.subarray(1000));
        assert.deepEqual(r2.subarray(2000), b2.subarray(0, 1000));
        assert.deepEqual(r3, b2.subarray(1000));
        await runUntil(ctx, blk.close());
      });

      await t.step("reads what QEMU's rbd driver wrote (qemu-img convert to rbd:)", async () => {
        const src = `${cluster.dir}/src.raw`;
        await Deno.writeFile(src, fillPattern(new Uint8Array(2 * MiB), 9));
        await qemuImg("convert", "-n", "-f", "raw", "-O", "raw", src, cluster.qemuFilename("disk"));
        const blk = await open();
        const buf = new Uint8Array(2 * MiB);
        // 32 reads in flight at once, 64 KiB each.
        const rets = await runUntil(
          ctx,
          Promise.all(
            Array.from(
              { length: 32 },
              (_, i) =>
                blk.preadv(
                  i * 65536,
                  IoVector.fromBuffers([buf.subarray(i * 65536, (i + 1) * 65536)]),
                ),
            ),
          ),
        );
        assert(rets.every((r) => r === 0));
        assert.deepEqual(buf, await Deno.readFile(src));
        await runUntil(ctx, blk.close());
      });

      await t.step("discard and write-zeroes read back as zeroes", async () => {
        const blk = await open("disk");
        const ones = new Uint8Array(MiB).fill(0xa5);
        assert.equal(await runUntil(ctx, blk.pwritev(8 * MiB, IoVector.fromBuffers([ones]))), 0);
        // discard=ignore is the BlockBackend default: ask the driver directly.
        const discard = new Promise<number>((r) => blk.driver.pdiscard(8 * MiB, 64 * 1024, r));
        assert.equal(await runUntil(ctx, discard), 0);
        assert.equal(await runUntil(ctx, blk.pwriteZeroes(8 * MiB + 100_000, 5000)), 0);
        assert.equal(await runUntil(ctx, blk.pwriteZeroes(8 * MiB + 512 * 1024, 4096, true)), 0);
        assert.equal(await runUntil(ctx, blk.flush()), 0);
        const img = (await exported(cluster, "disk")).subarray(8 * MiB, 9 * MiB);
        const zero = (from: number, len: number) =>
          img.subarray(from, from + len).every((x) => x === 0);
        assert(zero(0, 64 * 1024), "discarded range reads as zeroes");
        assert.equal(img[64 * 1024], 0xa5);
        assert(zero(100_000, 5000), "write-zeroes range reads as zeroes");
        assert.equal(img[99_999], 0xa5);
        assert.equal(img[105_000], 0xa5);
        assert(zero(512 * 1024, 4096), "write-zeroes with unmap reads as zeroes");
        assert.equal(img[512 * 1024 + 4096], 0xa5);
        await runUntil(ctx, blk.close());
      });

      await t.step("requests past the end fail with EINVAL, in range ones still work", async () => {
        const blk = await open();
        const buf = new Uint8Array(4096);
        assert.equal(
          await runUntil(ctx, blk.preadv(IMAGE_SIZE - 2048, IoVector.fromBuffers([buf]))),
          -EINVAL,
        );
        assert.equal(
          await runUntil(ctx, blk.pwritev(IMAGE_SIZE, IoVector.fromBuffers([buf]))),
          -EINVAL,
        );
        assert.equal(await runUntil(ctx, blk.preadv(0, IoVector.fromBuffers([buf]))), 0);
        await runUntil(ctx, blk.close());
      });

      await t.step("the driver itself passes librbd's errors through", async () => {
        const d = await runUntil(
          ctx,
          RbdDriver.open(ctx, { pool: cluster.pool, image: "disk", conf: cluster.conf }),
        );
        // Past the end, below the BlockBackend's checks: librbd refuses it.
        const ret = await runUntil(
          ctx,
          new Promise<number>((r) =>
            d.preadv(IMAGE_SIZE + 4096, IoVector.fromBuffers([new Uint8Array(512)]), r)
          ),
        );
        assert(ret < 0, `read past the end gave ${ret}`);
        assert.equal(d.inFlight, 0);
        await runUntil(ctx, d.close());
      });

      await t.step("a missing image or pool is a clear ENOENT naming it", async () => {
        await assert.rejects(open("nosuchimage"), (e: unknown) => {
          assert(e instanceof SysError);
          assert.equal(e.errno, ENOENT);
          assert.match(e.message, /rbd_open: ENOENT.*nosuchimage/);
          return true;
        });
        await assert.rejects(
          runUntil(
            ctx,
            BlockBackend.open(
              ctx,
              parseBlockOptions(`driver=rbd,pool=nosuchpool,image=disk,conf=${cluster.conf}`),
            ),
          ),
          (e: unknown) => {
            assert(e instanceof SysError);
            assert.match(e.message, /rados_ioctx_create: ENOENT.*nosuchpool/);
            return true;
          },
        );
        await assert.rejects(open("disk:not_a_ceph_option=1"), /rados_conf_set: ENOENT/);
      });

      await t.step("a snapshot opens read-only with the data it was taken with", async () => {
        const blk = await open();
        const before = fillPattern(new Uint8Array(4096), 21);
        assert.equal(await runUntil(ctx, blk.pwritev(12 * MiB, IoVector.fromBuffers([before]))), 0);
        assert.equal(await runUntil(ctx, blk.flush()), 0);
        await cluster.rbd("snap", "create", `${cluster.pool}/disk@s1`);
        const after = fillPattern(new Uint8Array(4096), 22);
        assert.equal(await runUntil(ctx, blk.pwritev(12 * MiB, IoVector.fromBuffers([after]))), 0);
        await runUntil(ctx, blk.close());
        const snap = await open("disk@s1");
        assert(snap.readOnly, "a snapshot is read-only");
        const buf = new Uint8Array(4096);
        assert.equal(await runUntil(ctx, snap.preadv(12 * MiB, IoVector.fromBuffers([buf]))), 0);
        assert.deepEqual(buf, before);
        assert.equal(
          await runUntil(ctx, snap.pwritev(0, IoVector.fromBuffers([buf]))),
          -EROFS,
        );
        await runUntil(ctx, snap.close());
        await assert.rejects(open("disk@nosnap"), /rbd_open_read_only: ENOENT.*disk@nosnap/);
        await cluster.rbd("snap", "purge", `${cluster.pool}/disk`);
      });

      await t.step("refreshLength follows rbd resize", async () => {
        const blk = await open();
        await cluster.rbd("resize", "--size", "32M", `${cluster.pool}/disk`);
        // librbd learns of the new size from the header's watch notification.
        const end = Date.now() + 10_000;
        while (blk.refreshLength() !== 32 * MiB && Date.now() < end) {
          await new Promise((r) => setTimeout(r, 50));
        }
        assert.equal(blk.length, 32 * MiB);
        await runUntil(ctx, blk.close());
      });
    } finally {
      ctx.close();
      await cluster.stop();
    }
  },
});

Deno.test("rbd block options: blockdev keys and the legacy rbd: filename", () => {
  assert.deepEqual(
    parseBlockOptions("driver=rbd,pool=p,image=i,conf=/c,user=u,read-only=on"),
    { driver: "rbd", pool: "p", image: "i", conf: "/c", user: "u", readOnly: true },
  );
  assert.deepEqual(
    parseBlockOptions("file=rbd:p/ns/i\\:x:id=u:conf=/c:client_mount_timeout=5,cache=none"),
    {
      driver: "rbd",
      pool: "p",
      namespace: "ns",
      image: "i:x",
      user: "u",
      conf: "/c",
      rbdConf: { client_mount_timeout: "5" },
      cache: "none",
    },
  );
  assert.throws(() => parseBlockOptions("driver=rbd,pool=p"), /image is required/);
  assert.deepEqual(parseBlockOptions("file=rbd:p/i@s\\@1"), {
    driver: "rbd",
    pool: "p",
    image: "i",
    snapshot: "s@1",
  });
  assert.throws(() => parseBlockOptions("file=rbd:p/i@a@b"), /IMAGE@SNAP/);
  assert.throws(() => parseBlockOptions("file=rbd:p@x/i"), /outside the image/);
  assert.throws(() => parseBlockOptions("file=rbd:p"), /POOL\/\[NAMESPACE\/\]IMAGE/);
  assert.throws(() => parseBlockOptions("driver=null-co,file=rbd:p/i"), /needs driver=rbd/);
});

Deno.test({
  name: "rbd: no monitor answering is ETIMEDOUT after client_mount_timeout, not a hang",
  ignore: librbdLoadError() !== null,
  async fn() {
    const ctx = new AioContext();
    try {
      // Port 1 on loopback: nothing listens. No conf file: the options say everything.
      const opts = parseBlockOptions(
        "file=rbd:p/i:mon_host=127.0.0.1\\:1:client_mount_timeout=1:auth_client_required=none",
      );
      await assert.rejects(runUntil(ctx, BlockBackend.open(ctx, opts)), (e: unknown) => {
        assert(e instanceof SysError);
        assert.equal(e.errno, ETIMEDOUT);
        assert.match(e.message, /rados_connect: ETIMEDOUT.*rbd image p\/i/);
        return true;
      });
    } finally {
      ctx.close();
    }
  },
});
