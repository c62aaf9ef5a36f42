// Our host serving a Ceph RBD image (`--image rbd:POOL/IMAGE:conf=...`) to the
// built-in vhost-user-blk client, against a one-monitor, one-OSD memstore
// cluster (tests/harness/ceph_cluster.ts): writes, write-zeroes, discard and
// flush through two queues, checked with `rbd export` after the host closed
// the image; data written with QEMU's rbd driver read back through the host;
// a missing image refused at start with a clear error. Without Ceph the test
// is skipped with a loud warning.

import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../client/blk_client.ts";
import {
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
} from "../../client/virtio_blk_defs.ts";
import { librbdLoadError, SysError } from "../../sys/mod.ts";
import { parseHostArgs, UsageError } from "../../dataplane/host_options.ts";
import { StorageDaemon } from "../../dataplane/daemon/storage_daemon.ts";
import { QmpCommands } from "../../dataplane/daemon/qmp_commands.ts";
import {
  CephCluster,
  cephUnavailable,
  makeScratchDir,
  REPO_ROOT,
  ServerProcess,
} from "../harness/mod.ts";
import { firstDifference, randomBytes, startHost } from "./host_util.ts";

const NO_CEPH = librbdLoadError() ?? cephUnavailable();
if (NO_CEPH) console.warn(`SKIPPING the rbd host test (no Ceph here): ${NO_CEPH}`);

const KiB = 1024;
const MiB = 1 << 20;
const IMAGE_SIZE = 16 * MiB;

function assertBytes(got: Uint8Array, want: Uint8Array, what: string): void {
  const d = firstDifference(got, want);
  if (d >= 0) assert.fail(`${what}: byte ${d} is ${got[d]}, expected ${want[d]}`);
}

Deno.test({
  name: "host serves an rbd image to the built-in client",
  ignore: NO_CEPH !== null,
  async fn() {
    const cluster = await CephCluster.start();
    const dir = await makeScratchDir("e2e-rbd");
    try {
      const image = `${cluster.pool}/disk`;
      await cluster.rbd("create", "--size", `${IMAGE_SIZE / MiB}M`, image);
      // What QEMU's rbd driver writes, the host must read.
      const q = randomBytes(256 * KiB, 7);
      await Deno.writeFile(`${dir}/q.raw`, q);
      const conv = await new Deno.Command("qemu-img", {
        args: [
          "convert",
          "-n",
          "-f",
          "raw",
          "-O",
          "raw",
          `${dir}/q.raw`,
          cluster.qemuFilename("disk"),
        ],
        stderr: "piped",
      }).output();
      assert(conv.success, new TextDecoder().decode(conv.stderr));

      // A missing image: the host refuses to start, naming it.
      await assert.rejects(
        startHost([
          "--image",
          `rbd:${cluster.pool}/nosuch:conf=${cluster.conf}`,
          "--socket",
          `${dir}/x.sock`,
        ]),
        /rbd_open: ENOENT.*nosuch/,
      );

      const socket = `${dir}/blk.sock`;
      const { host, log } = await startHost([
        "--image",
        `rbd:${image}:conf=${cluster.conf}`,
        "--socket",
        socket,
        "--queues",
        "2",
        "--iothreads",
        "2", // two librbd handles on one image: the exclusive lock moves between them
        "--queue-size",
        "128",
      ]);
      const a = randomBytes(64 * KiB, 1);
      const base = 5 * MiB;
      let c: VhostUserBlkClient | null = null;
      try {
        c = await VhostUserBlkClient.connect(socket, {
          numQueues: 2,
          queueSize: 128,
          slots: 8,
          maxBlockSize: 256 * KiB,
        });
        assert.equal(c.config.capacity * 512, IMAGE_SIZE);
        // QEMU's data, through the host.
        assert.equal(await c.execute(1, (qq) => qq.read(0, 0, q.length)), VIRTIO_BLK_S_OK);
        assertBytes(c.queues[1].data(0).slice(0, q.length), q, "qemu-img's data via the host");
        // A write, then zeroes and a discard inside it, and a flush.
        c.queues[0].data(0).set(a);
        assert.equal(await c.execute(0, (qq) => qq.write(0, base, a.length)), VIRTIO_BLK_S_OK);
        let st = await c.execute(1, (qq) => qq.writeZeroes(0, base + 8 * KiB, 8 * KiB, false));
        assert.equal(st, VIRTIO_BLK_S_OK, "write-zeroes");
        st = await c.execute(0, (qq) => qq.discard(0, base + 32 * KiB, 8 * KiB));
        assert.equal(st, VIRTIO_BLK_S_OK, "discard");
        assert.equal(await c.execute(1, (qq) => qq.flush(0)), VIRTIO_BLK_S_OK);
        // Past the end: an error status, and the host goes on.
        st = await c.execute(0, (qq) => qq.read(0, IMAGE_SIZE, 4096));
        assert.equal(st, VIRTIO_BLK_S_IOERR);
        assert.equal(await c.execute(0, (qq) => qq.read(0, base, 4096)), VIRTIO_BLK_S_OK);
        assertBytes(c.queues[0].data(0).slice(0, 4096), a.subarray(0, 4096), "read back");
      } finally {
        await c?.close();
        await host.stop();
      }
      assert.deepEqual(log.filter((l) => l.startsWith("error")), [], "host logged errors");

      await cluster.rbd("export", image, `${dir}/out.raw`);
      const out = await Deno.readFile(`${dir}/out.raw`);
      const want = a.slice();
      want.fill(0, 8 * KiB, 16 * KiB);
      // An 8 KiB discard is below librbd's rbd_discard_granularity_bytes (64 KiB):
      // it may leave the data, as discard may; only check it is zeroes or the data.
      const hole = out.subarray(base + 32 * KiB, base + 40 * KiB);
      if (!hole.every((x) => x === 0)) {
        assertBytes(hole, a.subarray(32 * KiB, 40 * KiB), "a discarded range that kept data");
      }
      want.set(hole, 32 * KiB);
      assertBytes(out.subarray(base, base + a.length), want, "the image after the host");
      assertBytes(out.subarray(0, q.length), q, "qemu-img's data unchanged");

      // A snapshot is served read-only (VIRTIO_BLK_F_RO) with the data it was taken with.
      await cluster.rbd("snap", "create", `${image}@s1`);
      const ssock = `${dir}/s.sock`;
      const snapHost = await startHost([
        "--image",
        `rbd:${image}@s1:conf=${cluster.conf}`,
        "--socket",
        ssock,
      ]);
      let sc: VhostUserBlkClient | null = null;
      try {
        sc = await VhostUserBlkClient.connect(ssock, { numQueues: 1, queueSize: 128 });
        assert(sc.hasFeature(VIRTIO_BLK_F_RO), "a snapshot is VIRTIO_BLK_F_RO");
        assert.equal(await sc.execute(0, (qq) => qq.read(0, base, 4096)), VIRTIO_BLK_S_OK);
        assertBytes(sc.queues[0].data(0).slice(0, 4096), want.subarray(0, 4096), "snapshot data");
        const wst = await sc.execute(0, (qq) => qq.write(0, base, 4096));
        assert.equal(wst, VIRTIO_BLK_S_IOERR, "a write to a snapshot fails");
      } finally {
        await sc?.close();
        await snapHost.host.stop();
      }

      // The daemon's qemu-storage-daemon syntax: --blockdev driver=rbd,... serves the same bytes.
      const dsock = `${dir}/d.sock`;
      const daemon = new ServerProcess(`${REPO_ROOT}/deno`, [
        "run",
        "-A",
        "dataplane/main.ts",
        "--blockdev",
        `driver=rbd,node-name=disk0,pool=${cluster.pool},image=disk,conf=${cluster.conf}`,
        "--export",
        `type=vhost-user-blk,id=e0,node-name=disk0,addr.type=unix,addr.path=${dsock},writable=on`,
      ], { cwd: REPO_ROOT });
      try {
        assert(await daemon.waitForSocket(dsock, 60_000), `daemon: ${daemon.stderr}`);
        // The socket file exists from bind(); listen() follows once the image is open.
        let d: VhostUserBlkClient | null = null;
        for (let i = 0; d === null; i++) {
          try {
            d = await VhostUserBlkClient.connect(dsock, { numQueues: 1, queueSize: 128 });
          } catch (e) {
            if (!(e instanceof SysError && e.code === "ECONNREFUSED") || i >= 100) throw e;
            await new Promise((r) => setTimeout(r, 100));
          }
        }
        try {
          assert.equal(d.config.capacity * 512, IMAGE_SIZE);
          assert.equal(await d.execute(0, (qq) => qq.read(0, base, 4096)), VIRTIO_BLK_S_OK);
          assertBytes(d.queues[0].data(0).slice(0, 4096), want.subarray(0, 4096), "via the daemon");
        } finally {
          await d.close();
        }
      } finally {
        await daemon.stop("SIGTERM", 10_000);
      }

      // QMP block_resize on an rbd node: rbd_resize, and the export's capacity follows.
      const sd = new StorageDaemon(() => {});
      let rc: VhostUserBlkClient | null = null;
      try {
        sd.blockdevAdd({
          driver: "rbd",
          "node-name": "r0",
          pool: cluster.pool,
          image: "disk",
          conf: cluster.conf,
        }, false);
        await sd.exportAdd({
          id: "e1",
          nodeName: "r0",
          addr: { type: "unix", path: `${dir}/r.sock` },
          writable: true,
          writethrough: false,
          numQueues: 1,
          logicalBlockSize: 512,
        });
        rc = await VhostUserBlkClient.connect(`${dir}/r.sock`, { numQueues: 1, queueSize: 128 });
        assert.equal(rc.config.capacity * 512, IMAGE_SIZE);
        await sd.blockResize("r0", 2 * IMAGE_SIZE);
        assert.equal((await rc.readConfig()).capacity * 512, 2 * IMAGE_SIZE);
        // The new end is addressable at once.
        const rst = await rc.execute(0, (qq) => qq.read(0, 2 * IMAGE_SIZE - 4096, 4096));
        assert.equal(rst, VIRTIO_BLK_S_OK);
        const info = await cluster.rbd("info", "--format", "json", image);
        assert.equal(JSON.parse(info).size, 2 * IMAGE_SIZE);
        // A raw window over an rbd node: its size is known once opened (not by stat), so an
        // offset is accepted and query-named-block-nodes shows the exported length.
        sd.blockdevAdd({
          driver: "rbd",
          "node-name": "r1",
          pool: cluster.pool,
          image: "disk",
          conf: cluster.conf,
          "read-only": true,
        }, false);
        sd.blockdevAdd({ driver: "raw", "node-name": "w1", file: "r1", offset: 4096 }, false);
        await sd.exportAdd({
          id: "e2",
          nodeName: "w1",
          addr: { type: "unix", path: `${dir}/w.sock` },
          writable: false,
          writethrough: false,
          numQueues: 1,
          logicalBlockSize: 512,
        });
        const nodes = await new QmpCommands(sd).execute("query-named-block-nodes", {}) as {
          "node-name": string;
          image: { "virtual-size": number };
        }[];
        const w1 = nodes.find((n) => n["node-name"] === "w1")!;
        assert.equal(w1.image["virtual-size"], 2 * IMAGE_SIZE - 4096);
      } finally {
        await rc?.close();
        await sd.stop();
      }
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      await cluster.stop();
    }
  },
});

Deno.test("host --image rbd:POOL/IMAGE[:conf=PATH][:id=USER] (QEMU's legacy syntax)", () => {
  const o = parseHostArgs(["--image", "rbd:p/i:conf=/c:id=u:rbd_cache=false", "--socket", "s"]);
  assert.equal(o.block.driver, "rbd");
  assert.equal(o.block.pool, "p");
  assert.equal(o.block.image, "i");
  assert.equal(o.block.conf, "/c");
  assert.equal(o.block.user, "u");
  assert.deepEqual(o.block.rbdConf, { rbd_cache: "false" });
  assert.equal(o.block.filename, undefined);
  assert.throws(() => parseHostArgs(["--image", "rbd:nopool", "--socket", "s"]), UsageError);
  assert.throws(
    () => parseHostArgs(["--image", "rbd:p/i", "--socket", "s", "--format", "qcow2"]),
    /qcow2/,
  );
});
