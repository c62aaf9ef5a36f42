// Many exports in one daemon sharing one IOThread: each on its own socket
// with its own front-end. One export's failures (a ring broken by a chain
// loop, a front-end that vanishes with requests in flight) end only that
// export's session: the other export keeps serving the whole time, and the
// failed one takes its next front-end.
import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../../client/blk_client.ts";
import { VIRTIO_BLK_S_OK } from "../../../client/virtio_blk_defs.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { closedWithin } from "../../robustness/hostile_catalogue.ts";
import { connect, HostileGuest, TIMEOUT_MS } from "../../robustness/robustness_util.ts";

const T_IN = 0;

async function readWorks(c: VhostUserBlkClient): Promise<void> {
  assert.equal(await c.execute(0, (q) => q.read(0, 0, 4096), TIMEOUT_MS), VIRTIO_BLK_S_OK);
}

Deno.test("daemon: one export's broken ring or crashed front-end leaves the others serving", async () => {
  const dir = await Deno.makeTempDir({ prefix: "isolation-" });
  const d = new StorageDaemon();
  try {
    await d.objectAdd({ id: "io0", pollMaxNs: 0, aioMaxBatch: 4 });
    for (const id of ["a", "b", "c"]) {
      d.blockdevAdd({ driver: "null-co", "node-name": `n${id}`, size: 64 << 20 }, false);
      await d.exportAdd({
        id,
        nodeName: `n${id}`,
        addr: { type: "unix", path: `${dir}/${id}.sock` },
        writable: true,
        writethrough: false,
        numQueues: 1,
        logicalBlockSize: 512,
        iothread: "io0",
      });
    }
    const b = await connect(`${dir}/b.sock`);
    const c = await connect(`${dir}/c.sock`);
    await readWorks(b);

    // Export a: a chain loop breaks its ring; the daemon closes a's connection.
    const g = await HostileGuest.connect(`${dir}/a.sock`, 1);
    const [x, y] = g.descs(0, 2);
    const hdr = g.header(T_IN, 0n);
    g.setDesc(0, x, { addr: hdr.gpa, len: 16, flags: 1, next: y });
    g.setDesc(0, y, { addr: g.alloc(512).gpa, len: 512, flags: 1, next: x });
    g.submit(0, x);
    assert(await g.errSignalled(0), "a's err eventfd fired");
    assert(await closedWithin(g, TIMEOUT_MS), "a's connection closed");
    await g.close().catch(() => {});
    // b and c never noticed.
    await readWorks(b);
    await readWorks(c);

    // Export c: the front-end vanishes with requests in flight (its socket
    // closed under it, no GET_VRING_BASE).
    for (let s = 0; s < 4; s++) c.queues[0].read(s, s * 4096, 4096);
    c.queues[0].notify();
    c.frontend.close();
    await c.close().catch(() => {});
    await readWorks(b);

    // a and c take new front-ends; b still serves.
    const a2 = await connect(`${dir}/a.sock`);
    const c2 = await connect(`${dir}/c.sock`);
    await readWorks(a2);
    await readWorks(c2);
    await readWorks(b);
    const stats = await d.exports.get("b")!.stats();
    assert.equal(stats.broken.length, 0);
    assert(stats.queues[0].requests >= 4);
    await a2.close();
    await c2.close();
    await b.close();
  } finally {
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
