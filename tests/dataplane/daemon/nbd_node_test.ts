// driver=nbd in the daemon: --blockdev in keyval form (server.type=unix,
// server.path, export, reconnect-delay) and in JSON with server.type=inet;
// an export over it writes through to qemu-nbd's file; query-named-block-nodes
// names the node as QEMU does (nbd+unix:///EXPORT?socket=PATH).
import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../../client/blk_client.ts";
import { parseDaemonArgs } from "../../../dataplane/daemon/daemon_args.ts";
import { BlockGraph } from "../../../dataplane/daemon/blockdev.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { QmpCommands } from "../../../dataplane/daemon/qmp_commands.ts";
import { makeScratchDir } from "../../harness/mod.ts";
import { have, startQemuNbd } from "../../block/nbd/nbd_servers.ts";

Deno.test("daemon: --blockdev driver=nbd parses keyval and JSON forms; bad ones get errors", () => {
  const g = new BlockGraph();
  const kv = parseDaemonArgs([
    "--blockdev",
    "driver=nbd,node-name=n0,server.type=unix,server.path=/tmp/x.sock,export=disk,reconnect-delay=5",
  ]).options[0];
  assert(kv.kind === "blockdev");
  g.add(kv.obj, kv.keyval);
  assert.deepEqual(g.blockOptions("n0"), {
    driver: "nbd",
    server: { type: "unix", path: "/tmp/x.sock" },
    exportName: "disk",
    reconnectDelay: 5,
    readOnly: false,
  });
  g.add({
    driver: "raw",
    "node-name": "r1",
    file: { driver: "nbd", server: { type: "inet", host: "127.0.0.1", port: "10809" } },
  }, false);
  const o = g.blockOptions("r1");
  assert.equal(o.driver, "nbd");
  assert.deepEqual(o.server, { type: "inet", host: "127.0.0.1", port: 10809 });
  assert.throws(() => g.add({ driver: "nbd", "node-name": "x" }, false), /'server' is missing/);
  assert.throws(
    () => g.add({ driver: "nbd", "node-name": "x", server: { type: "inet" } }, false),
    /server.host/,
  );
  assert.throws(
    () =>
      g.add({
        driver: "nbd",
        "node-name": "x",
        server: { type: "inet", host: "h", port: "99999" },
      }, false),
    /server.port/,
  );
  assert.throws(
    () => g.add({ driver: "nbd", "node-name": "x", server: { type: "vsock" } }, false),
    /does not accept value 'vsock'/,
  );
});

Deno.test({
  name: "daemon: an export over an nbd node writes through to qemu-nbd's file",
  ignore: !have("qemu-nbd"),
  async fn() {
    const dir = await makeScratchDir("daemon-nbd");
    const file = `${dir}/disk.img`;
    await Deno.writeFile(file, new Uint8Array(8 << 20));
    const srv = await startQemuNbd(file, { socket: `${dir}/nbd.sock` });
    const d = new StorageDaemon();
    let c: VhostUserBlkClient | null = null;
    try {
      const o = parseDaemonArgs([
        "--blockdev",
        `driver=nbd,node-name=n0,server.type=unix,server.path=${dir}/nbd.sock,export=disk`,
      ]).options[0];
      assert(o.kind === "blockdev");
      d.blockdevAdd(o.obj, o.keyval);
      await d.exportAdd({
        id: "e0",
        nodeName: "n0",
        addr: { type: "unix", path: `${dir}/e0.sock` },
        writable: true,
        writethrough: false,
        numQueues: 1,
        logicalBlockSize: 512,
      });
      c = await VhostUserBlkClient.connect(`${dir}/e0.sock`);
      assert.equal(c.config.capacity, 8 * 2048);
      c.queues[0].data(0).fill(0x6b, 0, 65536);
      assert.equal(await c.execute(0, (q) => q.write(0, 1 << 20, 65536)), 0);
      assert.equal(await c.execute(0, (q) => q.flush(0)), 0);
      const nodes = await new QmpCommands(d).execute("query-named-block-nodes", {}) as {
        "node-name": string;
        drv: string;
        file: string;
        image: { "virtual-size": number };
      }[];
      const n0 = nodes.find((n) => n["node-name"] === "n0")!;
      assert.equal(n0.drv, "nbd");
      assert.equal(n0.file, `nbd+unix:///disk?socket=${dir}/nbd.sock`);
      assert.equal(n0.image["virtual-size"], 8 << 20);
      const onDisk = await Deno.readFile(file);
      assert.ok(onDisk.subarray(1 << 20, (1 << 20) + 65536).every((b) => b === 0x6b));
      assert.ok(onDisk.subarray(0, 1 << 20).every((b) => b === 0));
    } finally {
      await c?.close();
      await d.stop();
      await srv.kill();
    }
    await Deno.remove(dir, { recursive: true });
  },
});

Deno.test({
  name:
    "daemon: nbd node with reconnect-delay=5, qemu-nbd killed and restarted under a front-end's writes",
  ignore: !have("qemu-nbd"),
  async fn() {
    const dir = await makeScratchDir("daemon-nbd-reconnect");
    const file = `${dir}/disk.img`, sock = `${dir}/nbd.sock`;
    const BLOCK = 4096, BLOCKS = 256, QD = 8;
    await Deno.writeFile(file, new Uint8Array(BLOCKS * BLOCK));
    let srv = await startQemuNbd(file, { socket: sock });
    const d = new StorageDaemon();
    let c: VhostUserBlkClient | null = null;
    try {
      d.blockdevAdd({
        driver: "nbd",
        "node-name": "n0",
        server: { type: "unix", path: sock },
        export: "disk",
        "reconnect-delay": 5,
      }, false);
      await d.exportAdd({
        id: "e0",
        nodeName: "n0",
        addr: { type: "unix", path: `${dir}/e0.sock` },
        writable: true,
        writethrough: false,
        numQueues: 1,
        logicalBlockSize: 512,
      });
      c = await VhostUserBlkClient.connect(`${dir}/e0.sock`);
      const q = c.queues[0];
      const model = new Uint8Array(BLOCKS * BLOCK);
      let n = 0, completed = 0, bad = 0, stop = false;
      const issue = (slot: number) => {
        const blk = n % BLOCKS, seed = ++n & 0xff;
        q.data(slot).fill(seed, 0, BLOCK);
        model.fill(seed, blk * BLOCK, (blk + 1) * BLOCK);
        q.write(slot, blk * BLOCK, BLOCK);
      };
      q.onComplete = (slot, status) => {
        completed++;
        if (status !== 0) bad++;
        if (!stop) issue(slot);
      };
      for (let s = 0; s < QD; s++) issue(s);
      q.notify();
      const t0 = Date.now();
      let killed = false, restarted = false, atKill = 0;
      while (completed < n) {
        const now = Date.now() - t0;
        if (!killed && now > 300) {
          killed = true;
          atKill = completed;
          await srv.kill();
        }
        if (killed && !restarted && now > 1300) {
          restarted = true;
          srv = await startQemuNbd(file, { socket: sock });
        }
        if (now > 2500) stop = true;
        await c.waitAsync(50);
        q.reap();
        q.notify();
        if (now > 20_000) throw new Error("writes did not finish");
      }
      assert.ok(atKill > 0 && atKill < completed, "writes ran before and after the outage");
      assert.equal(bad, 0, "no write failed inside the reconnect delay");
      assert.equal(await c.execute(0, (qq) => qq.flush(0)), 0);
      assert.deepEqual(await Deno.readFile(file), model);
    } finally {
      await c?.close();
      await d.stop();
      await srv.kill();
    }
    await Deno.remove(dir, { recursive: true });
  },
});
