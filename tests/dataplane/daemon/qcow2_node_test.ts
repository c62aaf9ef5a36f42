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
