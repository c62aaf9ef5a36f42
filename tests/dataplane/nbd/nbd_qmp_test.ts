// QMP for the NBD export: nbd-server-start (SocketAddressLegacy, as QEMU's),
// block-export-add with type nbd, query-block-exports, block-export-del
// (safe mode refuses while a client is connected), nbd-server-stop (removes
// every NBD export, as QEMU's), the events.
import assert from "node:assert/strict";
import { NBD_CMD_READ } from "../../../block/mod.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { makeScratchDir } from "../../harness/mod.ts";
import { QmpTestClient } from "../daemon/qmp_test_client.ts";
import { RawNbdClient } from "./nbd_raw_client.ts";

function errorOf(r: Record<string, unknown>): string {
  assert("error" in r, `expected an error, got ${JSON.stringify(r)}`);
  return (r.error as { desc: string }).desc;
}

Deno.test("NBD over QMP: start the server, add, query, delete, stop", async () => {
  const dir = await makeScratchDir("nbd-qmp");
  const d = new StorageDaemon();
  let c: QmpTestClient | null = null;
  try {
    d.chardevAdd({ id: "m0", path: `${dir}/qmp.sock`, wait: false });
    await d.monitorAdd("m0", false);
    c = await QmpTestClient.connect(`${dir}/qmp.sock`);
    const sock = `${dir}/nbd.sock`;
    assert.deepEqual(
      await c.execute("blockdev-add", { driver: "null-co", "node-name": "n0", size: 65536 }),
      { return: {} },
    );
    assert.equal(
      errorOf(await c.execute("block-export-add", { type: "nbd", id: "e0", "node-name": "n0" })),
      "NBD server not running",
    );
    assert.deepEqual(
      await c.execute("nbd-server-start", { addr: { type: "unix", data: { path: sock } } }),
      { return: {} },
    );
    assert.equal(
      errorOf(
        await c.execute("nbd-server-start", { addr: { type: "unix", data: { path: sock } } }),
      ),
      "NBD server already running",
    );
    assert.deepEqual(
      await c.execute("block-export-add", {
        type: "nbd",
        id: "e0",
        "node-name": "n0",
        name: "disk",
        writable: true,
      }),
      { return: {} },
    );
    assert.deepEqual((await c.execute("query-block-exports")).return, [
      { id: "e0", type: "nbd", "node-name": "n0", "shutting-down": false },
    ]);
    // A client connected: safe mode refuses, hard mode disconnects it.
    const { client, size } = await RawNbdClient.go(sock, "disk");
    assert.equal(size, 65536n);
    await client.write(RawNbdClient.request(NBD_CMD_READ, { cookie: 1n, length: 512 }));
    assert.equal((await client.readReply())?.error, 0);
    assert.match(errorOf(await c.execute("block-export-del", { id: "e0" })), /in use/);
    assert.deepEqual(await c.execute("block-export-del", { id: "e0", mode: "hard" }), {
      return: {},
    });
    assert(await client.closedWithin());
    client.close();
    // Added again, then nbd-server-stop takes it with the server.
    assert.deepEqual(
      await c.execute("block-export-add", { type: "nbd", id: "e1", "node-name": "n0" }),
      { return: {} },
    );
    assert.deepEqual(await c.execute("nbd-server-stop"), { return: {} });
    assert.deepEqual((await c.execute("query-block-exports")).return, []);
    assert.equal(errorOf(await c.execute("nbd-server-stop")), "NBD server not running");
    await assert.rejects(Deno.connect({ transport: "unix", path: sock }));
    assert.deepEqual(c.events.map((e) => [e.event, e.data]), [
      ["BLOCK_EXPORT_DELETED", { id: "e0" }],
      ["BLOCK_EXPORT_DELETED", { id: "e1" }],
    ]);
  } finally {
    c?.close();
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
