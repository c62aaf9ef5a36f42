// driver=qcow2 in the daemon, in --blockdev's JSON form with the file node
// nested: a writable export of a fresh qcow2 image; what the client writes
// is what `qemu-io` reads back, and `qemu-img check` finds the image clean;
// query-named-block-nodes names both nodes.
import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../../client/blk_client.ts";
import { parseDaemonArgs } from "../../../dataplane/daemon/daemon_args.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { QmpCommands } from "../../../dataplane/daemon/qmp_commands.ts";
import { qemuImg, qemuIo } from "../../block/qcow2/qemu_tools.ts";
import { makeScratchDir } from "../../harness/mod.ts";

Deno.test("daemon: a writable qcow2 node (nested JSON --blockdev), checked by qemu-img", async () => {
  const dir = await makeScratchDir("daemon-qcow2");
  const image = `${dir}/disk.qcow2`;
  qemuImg("create", "-q", "-f", "qcow2", image, "16M");
  const d = new StorageDaemon();
  let c: VhostUserBlkClient | null = null;
  try {
    const args = parseDaemonArgs([
      "--blockdev",
      JSON.stringify({
        driver: "qcow2",
        "node-name": "q0",
        file: { driver: "file", filename: image },
      }),
    ]);
    const o = args.options[0];
    assert(o.kind === "blockdev");
    d.blockdevAdd(o.obj, o.keyval);
    await d.exportAdd({
      id: "e0",
      nodeName: "q0",
      addr: { type: "unix", path: `${dir}/e0.sock` },
      writable: true,
      writethrough: false,
      numQueues: 1,
      logicalBlockSize: 512,
    });
    c = await VhostUserBlkClient.connect(`${dir}/e0.sock`);
    assert.equal(c.config.capacity, 16 * 2048);
    c.queues[0].data(0).fill(0x5a, 0, 65536);
    assert.equal(await c.execute(0, (q) => q.write(0, 3 << 20, 65536)), 0);
    assert.equal(await c.execute(0, (q) => q.flush(0)), 0);
    const nodes = await new QmpCommands(d).execute("query-named-block-nodes", {}) as {
      "node-name": string;
      drv: string;
      image: { "virtual-size": number };
    }[];
    const q0 = nodes.find((n) => n["node-name"] === "q0")!;
    assert.equal(q0.drv, "qcow2");
    assert.equal(q0.image["virtual-size"], 16 << 20);
    assert(nodes.some((n) => n.drv === "file"), "the nested file node");
    await c.close();
    c = null;
    // mode=safe once the daemon has seen the front-end go.
    const exp = d.exports.get("e0")!;
    for (let i = 0; i < 200 && exp.server.connection !== null; i++) {
      await new Promise((r) => setTimeout(r, 10));
    }
    await d.exportDel("e0", false);
    // The implicit file node goes with the qcow2 node.
    d.blockdevDel("q0");
    assert.equal(d.graph.nodes.size, 0);
  } finally {
    await c?.close();
    await d.stop();
  }
  qemuImg("check", "-q", image);
  const out = qemuIo(image, "qcow2", "read -P 0x5a 3M 64k", "read -P 0 0 3M");
  assert.doesNotMatch(out, /Pattern verification failed/);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("daemon: a compressed qcow2 read through an IOThread that imports the driver on demand", async () => {
  // The IOThread starts without the qcow2 driver (and node:zlib, which the
  // driver imports): BlockBackend.open imports it when the node opens.
  const dir = await makeScratchDir("daemon-qcow2-compressed");
  const raw = `${dir}/disk.raw`, image = `${dir}/disk.qcow2`;
  qemuImg("create", "-q", "-f", "raw", raw, "4M");
  qemuIo(raw, "raw", "write -P 0x3c 1M 128k");
  qemuImg("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", raw, image);
  const d = new StorageDaemon();
  let c: VhostUserBlkClient | null = null;
  try {
    d.blockdevAdd(
      { driver: "qcow2", "node-name": "q0", file: { driver: "file", filename: image } },
      false,
    );
    await d.exportAdd({
      id: "e0",
      nodeName: "q0",
      addr: { type: "unix", path: `${dir}/e0.sock` },
      writable: false,
      writethrough: false,
      numQueues: 1,
      logicalBlockSize: 512,
    });
    c = await VhostUserBlkClient.connect(`${dir}/e0.sock`);
    const buf = c.queues[0].data(0);
    buf.fill(0xff, 0, 131072);
    assert.equal(await c.execute(0, (q) => q.read(0, 1 << 20, 131072)), 0);
    assert(buf.subarray(0, 131072).every((b) => b === 0x3c), "compressed clusters read back");
    assert.equal(await c.execute(0, (q) => q.read(0, 0, 65536)), 0);
    assert(buf.subarray(0, 65536).every((b) => b === 0), "unallocated clusters read as zeroes");
  } finally {
    await c?.close();
    await d.stop();
  }
  await Deno.remove(dir, { recursive: true });
});

Deno.test("daemon: a qcow2 export added to an IOThread already serving a raw export", async () => {
  // The qcow2 driver is imported into io0 while it serves e0 (its loop
  // waits with pollAsync meanwhile): both exports answer afterwards.
  const dir = await makeScratchDir("daemon-qcow2-hot");
  const raw = `${dir}/a.raw`, image = `${dir}/b.qcow2`;
  qemuImg("create", "-q", "-f", "raw", raw, "4M");
  qemuIo(raw, "raw", "write -P 0x11 0 64k");
  qemuImg("create", "-q", "-f", "qcow2", image, "4M");
  qemuIo(image, "qcow2", "write -P 0x22 0 64k");
  const d = new StorageDaemon();
  const clients: VhostUserBlkClient[] = [];
  const spec = (id: string) => ({
    id,
    nodeName: id,
    addr: { type: "unix" as const, path: `${dir}/${id}.sock` },
    writable: false,
    writethrough: false,
    numQueues: 1,
    logicalBlockSize: 512,
    iothread: "io0",
  });
  try {
    await d.objectAdd({ id: "io0", pollMaxNs: 32768, aioMaxBatch: 4 });
    d.blockdevAdd(
      { driver: "raw", "node-name": "a", file: { driver: "file", filename: raw } },
      false,
    );
    await d.exportAdd(spec("a"));
    const a = await VhostUserBlkClient.connect(`${dir}/a.sock`);
    clients.push(a);
    // Keep io0 busy with reads while the qcow2 node is added.
    let stop = false;
    const busy = (async () => {
      let n = 0;
      while (!stop) {
        assert.equal(await a.execute(0, (q) => q.read(0, 0, 4096)), 0);
        n++;
      }
      return n;
    })();
    d.blockdevAdd(
      { driver: "qcow2", "node-name": "b", file: { driver: "file", filename: image } },
      false,
    );
    await d.exportAdd(spec("b"));
    stop = true;
    assert((await busy) > 0);
    const b = await VhostUserBlkClient.connect(`${dir}/b.sock`);
    clients.push(b);
    assert.equal(await b.execute(0, (q) => q.read(0, 0, 65536)), 0);
    assert(b.queues[0].data(0).subarray(0, 65536).every((x) => x === 0x22));
    assert.equal(await a.execute(0, (q) => q.read(0, 0, 65536)), 0);
    assert(a.queues[0].data(0).subarray(0, 65536).every((x) => x === 0x11));
  } finally {
    for (const c of clients) await c.close();
    await d.stop();
  }
  await Deno.remove(dir, { recursive: true });
});
