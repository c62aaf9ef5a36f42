// The short options as sugar over one daemon export (dataplane/host_export.ts):
// the blockdev chain they become opens what the host always opened, the
// queues are spread over the IOThread objects round-robin, and the
// short-option export and the same export given in qemu-storage-daemon's
// syntax look the same to a front-end.

import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../client/blk_client.ts";
import type { BlockOptions } from "../../block/mod.ts";
import { BlockGraph } from "../../dataplane/daemon/blockdev.ts";
import { StorageDaemon } from "../../dataplane/daemon/storage_daemon.ts";
import { parseKeyval } from "../../dataplane/daemon/keyval.ts";
import { parseExport } from "../../dataplane/daemon/block_export.ts";
import { VhostUserBlkHost } from "../../dataplane/host.ts";
import { HOST_EXPORT_ID, hostDaemonSpecs } from "../../dataplane/host_export.ts";
import { parseHostArgs } from "../../dataplane/host_options.ts";
import { VIRTIO_BLK_S_OK } from "../../virtio/mod.ts";

/** What BlockBackend.open acts on, its defaults filled in. */
function opened(b: BlockOptions): Record<string, unknown> {
  const file = b.driver === "file";
  return {
    driver: b.driver,
    filename: b.filename,
    size: b.size,
    server: b.server,
    rbd: [b.pool, b.image, b.namespace, b.conf, b.user, b.snapshot, b.rbdConf],
    exportName: b.exportName,
    reconnectDelay: b.reconnectDelay ?? 0,
    format: b.format ?? "raw",
    l2CacheSize: b.l2CacheSize,
    // Above a file the cache mode picks O_DIRECT and flushes; above others only flushes.
    cache: file ? b.cache ?? "writeback" : b.cache === "unsafe" ? "unsafe" : "writeback",
    aio: file ? b.aio ?? "threads" : undefined,
    readOnly: b.readOnly ?? false,
    discard: b.discard ?? "ignore",
    readZeroes: b.readZeroes ?? false,
    detectZeroes: b.detectZeroes ?? "off",
    offset: b.offset ?? 0,
    sizeLimit: b.sizeLimit,
  };
}

Deno.test("short options as daemon specs: the blockdev chain opens what the host opened", () => {
  const dir = Deno.makeTempDirSync({ prefix: "host-export-" });
  try {
    const img = `${dir}/disk.img`;
    Deno.writeFileSync(img, new Uint8Array(1 << 20));
    const cases = [
      ["--image", img],
      ["--image", img, "--cache", "none", "--aio", "io_uring", "--discard", "ignore"],
      ["--image", img, "--cache", "unsafe", "--read-only"],
      ["--image", img, "--cache", "none", "--aio", "native"],
      ["--image", img, "--format", "qcow2", "--l2-cache-size", "1M"],
      ["--image", img, "--format", "qcow2", "--read-only", "--cache", "none"],
      ["--image", "null-co:1M"],
      ["--image", "null-aio:4M", "--cache", "unsafe", "--discard", "ignore"],
      ["--image", "nbd://127.0.0.1:10809/exp", "--reconnect-delay", "5"],
      ["--image", "nbd+unix:///exp?socket=/tmp/nbd.sock", "--read-only", "--cache", "unsafe"],
      ["--image", "rbd:pool/ns/img@snap:conf=/etc/c.conf:id=admin:rbd_cache=false:a=b"],
      ["--image", "rbd:pool/img", "--cache", "unsafe", "--discard", "ignore"],
      ["--image", img, "--throttle", "iops-total=100"],
      ["--image", img, "--format", "qcow2", "--throttle", "bps-read=1048576"],
    ];
    for (const args of cases) {
      const o = parseHostArgs([...args, "--socket", `${dir}/s`]);
      const specs = hostDaemonSpecs(o);
      const g = new BlockGraph();
      const groups = new Map(specs.throttleGroups.map((t) => [t.id, t]));
      g.throttleGroups = (id) => groups.has(id) ? { addr: 4096, users: new Set() } : undefined;
      for (const node of specs.blockdevs) g.add(node, false);
      const { throttle, ...graphOpened } = g.blockOptions(specs.export.nodeName);
      assert.deepEqual(opened(graphOpened), opened({ ...o.block }), args.join(" "));
      // --throttle: the filter on top, in a group with the option's limits.
      assert.equal(throttle !== undefined, o.throttle !== undefined, args.join(" "));
      assert.deepEqual(specs.throttleGroups.map((t) => t.config), o.throttle ? [o.throttle] : []);
      assert.equal(specs.export.writable, !o.block.readOnly, args.join(" "));
    }
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("short options as daemon specs: queues, IOThreads and the host-only fields", () => {
  const o = parseHostArgs([
    "--image=null-co:1M",
    "--socket=/tmp/unused.sock",
    "--queues=5",
    "--iothreads=2",
    "--serial=sn1",
    "--queue-size=256",
    "--socket-mode=0660",
    "--poll-max-ns=0",
    "--aio-max-batch=8",
    "--logical-block-size=4096",
    "--test-break-ring=7",
  ]);
  const s = hostDaemonSpecs(o);
  assert.deepEqual(s.iothreads.map((t) => [t.id, t.pollMaxNs, t.aioMaxBatch]), [
    ["iothread0", 0, 8],
    ["iothread1", 0, 8],
  ]);
  // One range-lock table for the image, shared by both threads.
  assert.ok(s.iothreads[0].data?.rangeLocks instanceof SharedArrayBuffer);
  assert.equal(s.iothreads[0].data, s.iothreads[1].data);
  assert.equal(s.iothreads[0].data?.sharedExport, HOST_EXPORT_ID);
  assert.deepEqual(s.export, {
    id: HOST_EXPORT_ID,
    nodeName: HOST_EXPORT_ID,
    addr: { type: "unix", path: "/tmp/unused.sock" },
    writable: true,
    writethrough: false,
    numQueues: 5,
    logicalBlockSize: 4096,
    iothreads: ["iothread0", "iothread1"],
    serial: "sn1",
    maxQueueSize: 256,
    socketMode: 0o660,
    logPrefix: "",
    testBreakRing: 7,
  });
});

Deno.test("host: 4 queues over 2 IOThreads run in one daemon export, round-robin", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "host-export-" });
  const log: string[] = [];
  const host = await VhostUserBlkHost.start(
    parseHostArgs([
      "--image",
      "null-co:1M",
      "--socket",
      `${dir}/blk.sock`,
      "--queues",
      "4",
      "--iothreads",
      "2",
      "--serial",
      "sugar-serial",
      "--queue-size",
      "256",
      "--logical-block-size",
      "4096",
    ]),
    (l) => log.push(l),
  );
  try {
    assert.equal(host.daemon.exports.size, 1);
    assert.deepEqual(host.export.iothreads.map((t) => t.spec.id), ["iothread0", "iothread1"]);
    const c = await VhostUserBlkClient.connect(host.server.path, {
      numQueues: 4,
      queueSize: 256,
      slots: 16,
    });
    try {
      assert.equal(c.config.numQueues, 4);
      assert.equal(c.config.blkSize, 4096);
      assert.equal(c.config.segMax, 254);
      for (let qi = 0; qi < 4; qi++) {
        assert.equal(await c.execute(qi, (q) => q.read(0, 0, 4096)), VIRTIO_BLK_S_OK);
      }
      assert.equal(await c.execute(3, (q) => q.getId(0)), VIRTIO_BLK_S_OK);
      const id = new TextDecoder().decode(c.queues[3].data(0).subarray(0, 12));
      assert.equal(id, "sugar-serial");
      const s = await host.stats();
      assert.deepEqual(s.threads.map((t) => t.queues.map((q) => q.index)), [[0, 2], [1, 3]]);
      assert.deepEqual(s.threads.map((t) => t.queues.map((q) => q.requests)), [[1, 1], [1, 2]]);
    } finally {
      await c.close();
    }
    for (const [q, t] of [[0, 0], [1, 1], [2, 0], [3, 1]]) {
      assert.ok(
        log.some((l) => l.startsWith(`queue ${q}: started on iothread${t} (size 256`)),
        log.join("\n"),
      );
    }
  } finally {
    const st = await host.stop();
    Deno.removeSync(dir, { recursive: true });
    assert.equal(st.connections, 1);
    assert.equal(st.threads.flatMap((t) => t.queues).reduce((n, q) => n + q.requests, 0), 5);
  }
  assert.ok(log.some((l) => /^front-end #1 disconnected: 5 requests/.test(l)), log.join("\n"));
});

Deno.test("host: the short options and the same --export look alike to a front-end", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "host-export-" });
  const host = await VhostUserBlkHost.start(
    parseHostArgs([
      "--image",
      "null-co:4M",
      "--socket",
      `${dir}/short.sock`,
      "--queues",
      "2",
      "--logical-block-size",
      "4096",
    ]),
  );
  const d = new StorageDaemon();
  try {
    d.blockdevAdd(parseKeyval("driver=null-co,node-name=n0,size=4194304,discard=unmap"), true);
    await d.exportAdd(parseExport(
      parseKeyval(
        `type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=${dir}/qsd.sock,` +
          "writable=on,num-queues=2,logical-block-size=4096",
      ),
      true,
    ));
    const seen = [];
    for (const path of [`${dir}/short.sock`, `${dir}/qsd.sock`]) {
      const c = await VhostUserBlkClient.connect(path, { numQueues: 2, slots: 16 });
      try {
        seen.push({ features: c.offeredFeatures, maxQueues: c.maxQueues, config: c.config });
        assert.equal(await c.execute(1, (q) => q.writeZeroes(0, 0, 8192, true)), VIRTIO_BLK_S_OK);
      } finally {
        await c.close();
      }
    }
    assert.deepEqual(seen[0], seen[1]);
  } finally {
    await d.stop();
    await host.stop();
    Deno.removeSync(dir, { recursive: true });
  }
});
