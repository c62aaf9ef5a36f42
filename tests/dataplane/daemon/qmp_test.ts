// QMP on the daemon's monitor socket, with a client over the socket: the
// greeting, capabilities negotiation, every command, QMP error objects for
// bad input (bad JSON, a line over the limit, unknown commands, wrong
// argument types), and the daemon still serving after each.
import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../../client/blk_client.ts";
import { VIRTIO_BLK_S_OK } from "../../../client/virtio_blk_defs.ts";
import { QMP_MAX_LINE } from "../../../dataplane/daemon/qmp_server.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { QmpTestClient } from "./qmp_test_client.ts";

async function withDaemon(fn: (d: StorageDaemon, dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "qmp-" });
  const d = new StorageDaemon();
  try {
    d.chardevAdd({ id: "m0", path: `${dir}/qmp.sock`, wait: false });
    await d.monitorAdd("m0", false);
    await fn(d, dir);
  } finally {
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

function errorOf(r: Record<string, unknown>): { class: string; desc: string } {
  assert("error" in r, `expected an error, got ${JSON.stringify(r)}`);
  return r.error as { class: string; desc: string };
}

Deno.test("QMP: greeting, negotiation, id echo", async () => {
  await withDaemon(async (_d, dir) => {
    const c = await QmpTestClient.connect(`${dir}/qmp.sock`, false);
    try {
      const qmp = c.greeting.QMP as { version: { qemu: { major: number } }; capabilities: [] };
      assert.equal(qmp.version.qemu.major, 7);
      assert.deepEqual(qmp.capabilities, []);
      assert.deepEqual(errorOf(await c.execute("query-version")), {
        class: "CommandNotFound",
        desc: "Expecting capabilities negotiation with 'qmp_capabilities'",
      });
      assert.deepEqual(await c.execute("qmp_capabilities", undefined, "a"), {
        return: {},
        id: "a",
      });
      assert.equal(errorOf(await c.execute("qmp_capabilities")).class, "CommandNotFound");
      const v = await c.execute("query-version", undefined, { n: 7 });
      assert.deepEqual(v.id, { n: 7 });
      assert.equal((v.return as { qemu: { minor: number } }).qemu.minor, 2);
      const cmds = (await c.execute("query-commands")).return as { name: string }[];
      for (
        const name of [
          "qmp_capabilities",
          "query-version",
          "query-named-block-nodes",
          "query-block-exports",
          "blockdev-add",
          "blockdev-del",
          "block-export-add",
          "block-export-del",
          "object-add",
          "object-del",
          "block_resize",
          "quit",
        ]
      ) assert(cmds.some((x) => x.name === name), name);
    } finally {
      c.close();
    }
  });
});

Deno.test("QMP: bad input gets error objects and the monitor keeps serving", async () => {
  await withDaemon(async (_d, dir) => {
    const c = await QmpTestClient.connect(`${dir}/qmp.sock`);
    try {
      const ok = async () =>
        assert.deepEqual(Object.keys(await c.execute("query-block-exports")), ["return"]);
      await c.sendRaw("{bad\n");
      assert.match(errorOf(await c.reply()).desc, /^JSON parse error/);
      await ok();
      await c.sendRaw("[1]\n\n   \n");
      assert.equal(errorOf(await c.reply()).desc, "QMP input must be a JSON object");
      await c.sendRaw('{"foo": 1}\n');
      assert.equal(errorOf(await c.reply()).desc, "QMP input member 'foo' is unexpected");
      await c.sendRaw('{"execute": 1}\n');
      assert.equal(errorOf(await c.reply()).desc, "QMP input member 'execute' must be a string");
      await c.sendRaw('{"execute": "query-version", "arguments": [1]}\n');
      assert.equal(errorOf(await c.reply()).desc, "QMP input member 'arguments' must be an object");
      assert.deepEqual(errorOf(await c.execute("nope", undefined, 3)), {
        class: "CommandNotFound",
        desc: "The command nope has not been found",
      });
      assert.equal(
        errorOf(await c.execute("query-version", { x: 1 })).desc,
        "Parameter 'x' is unexpected",
      );
      assert.equal(
        errorOf(await c.execute("blockdev-add", { driver: "null-co", "node-name": "n", size: "x" }))
          .desc,
        "Invalid parameter type for 'size', expected: integer",
      );
      assert.equal(
        errorOf(await c.execute("blockdev-del", { "node-name": 5 })).desc,
        "Invalid parameter type for 'node-name', expected: string",
      );
      assert.equal(
        errorOf(await c.execute("block-export-del", {})).desc,
        "Parameter 'id' is missing",
      );
      await ok();
      // A line over the limit: one error, the rest of it skipped, the next line served.
      const huge = new Uint8Array(QMP_MAX_LINE + 4096).fill(0x20);
      huge[0] = 0x7b; // "{"
      await c.sendRaw(huge);
      await c.sendRaw("\n");
      assert.match(errorOf(await c.reply()).desc, /longer than/);
      await ok();
      // Half a command, then the rest.
      await c.sendRaw('{"execute": "query-');
      await c.sendRaw('version"}\n');
      assert("return" in await c.reply());
    } finally {
      c.close();
    }
    // A second client after the first left.
    const c2 = await QmpTestClient.connect(`${dir}/qmp.sock`);
    assert("return" in await c2.execute("query-version"));
    c2.close();
  });
});

Deno.test("QMP: blockdev, exports, iothreads added and removed at run time", async () => {
  await withDaemon(async (d, dir) => {
    const c = await QmpTestClient.connect(`${dir}/qmp.sock`);
    try {
      assert.deepEqual(
        await c.execute("object-add", { "qom-type": "iothread", id: "io1", "poll-max-ns": 0 }),
        { return: {} },
      );
      assert.match(
        errorOf(await c.execute("object-add", { "qom-type": "iothread", id: "io1" })).desc,
        /duplicate/,
      );
      assert.equal(
        errorOf(await c.execute("object-add", { "qom-type": "iothread", id: "io2", bogus: 1 }))
          .desc,
        "Parameter 'bogus' is unexpected",
      );
      const threads = (await c.execute("query-iothreads")).return as { id: string }[];
      assert.deepEqual(threads.map((t) => t.id), ["io1"]);

      assert.deepEqual(
        await c.execute("blockdev-add", { driver: "null-co", "node-name": "n1", size: 1 << 20 }),
        { return: {} },
      );
      assert.equal(
        errorOf(await c.execute("blockdev-add", { driver: "null-co", "node-name": "n1" })).desc,
        "Duplicate nodes with node-name='n1'",
      );
      const nodes = (await c.execute("query-named-block-nodes")).return as Record<
        string,
        unknown
      >[];
      assert.equal(nodes[0]["node-name"], "n1");
      assert.equal((nodes[0].image as { "virtual-size": number })["virtual-size"], 1 << 20);

      const exportArgs = {
        type: "vhost-user-blk",
        id: "e1",
        "node-name": "n1",
        addr: { type: "unix", path: `${dir}/e1.sock` },
        writable: true,
        iothread: "io1",
      };
      assert.deepEqual(await c.execute("block-export-add", exportArgs), { return: {} });
      assert.equal(
        errorOf(await c.execute("block-export-add", exportArgs)).desc,
        "Block export id 'e1' is already in use",
      );
      assert.deepEqual((await c.execute("query-block-exports")).return, [
        { id: "e1", type: "vhost-user-blk", "node-name": "n1", "shutting-down": false },
      ]);
      assert.equal(
        errorOf(await c.execute("blockdev-del", { "node-name": "n1" })).desc,
        "Node n1 is in use",
      );
      assert.match(errorOf(await c.execute("object-del", { id: "io1" })).desc, /in use/);

      // The export serves a front-end.
      const blk = await VhostUserBlkClient.connect(`${dir}/e1.sock`);
      assert.equal(await blk.execute(0, (q) => q.write(0, 0, 4096)), VIRTIO_BLK_S_OK);
      // mode=safe refuses while it is connected; hard disconnects it.
      assert.match(errorOf(await c.execute("block-export-del", { id: "e1" })).desc, /in use/);
      assert.deepEqual(await c.execute("block-export-del", { id: "e1", mode: "hard" }), {
        return: {},
      });
      await blk.close().catch(() => {});
      assert.deepEqual(c.events.map((e) => [e.event, e.data]), [
        ["BLOCK_EXPORT_DELETED", { id: "e1" }],
      ]);
      assert(typeof (c.events[0].timestamp as { seconds: number }).seconds === "number");
      assert.equal(d.exports.size, 0);
      assert.throws(() => Deno.lstatSync(`${dir}/e1.sock`), Deno.errors.NotFound);
      assert.equal(
        errorOf(await c.execute("block-export-del", { id: "e1" })).desc,
        "Export 'e1' is not found",
      );
      assert.deepEqual(await c.execute("blockdev-del", { "node-name": "n1" }), { return: {} });
      assert.deepEqual(await c.execute("object-del", { id: "io1" }), { return: {} });
      assert.equal(
        errorOf(await c.execute("object-del", { id: "io1" })).desc,
        "object 'io1' not found",
      );

      // quit answers, then the daemon stops.
      let quit = false;
      void d.quitRequested.then(() => quit = true);
      assert.deepEqual(await c.execute("quit"), { return: {} });
      await new Promise((r) => setTimeout(r, 0));
      assert(quit);
    } finally {
      c.close();
    }
  });
});

Deno.test("QMP: block_resize grows and shrinks a file export; the config and the range check follow", async () => {
  await withDaemon(async (_d, dir) => {
    const image = `${dir}/disk.raw`;
    Deno.writeFileSync(image, new Uint8Array(0));
    Deno.truncateSync(image, 1 << 20);
    const c = await QmpTestClient.connect(`${dir}/qmp.sock`);
    let blk: VhostUserBlkClient | null = null;
    try {
      await c.execute("blockdev-add", { driver: "file", "node-name": "f0", filename: image });
      await c.execute("blockdev-add", { driver: "raw", "node-name": "r0", file: "f0" });
      await c.execute("blockdev-add", { driver: "null-co", "node-name": "n0" });
      assert.deepEqual(
        await c.execute("block-export-add", {
          type: "vhost-user-blk",
          id: "e0",
          "node-name": "r0",
          addr: { type: "unix", path: `${dir}/e0.sock` },
          writable: true,
        }),
        { return: {} },
      );
      blk = await VhostUserBlkClient.connect(`${dir}/e0.sock`);
      assert.equal(blk.config.capacity, 2048);
      assert.notEqual(await blk.execute(0, (q) => q.read(0, 1 << 20, 4096)), VIRTIO_BLK_S_OK);

      assert.deepEqual(await c.execute("block_resize", { "node-name": "r0", size: 2 << 20 }), {
        return: {},
      });
      assert.equal(Deno.statSync(image).size, 2 << 20);
      assert.equal((await blk.readConfig()).capacity, 4096);
      assert.equal(await blk.execute(0, (q) => q.write(0, 1 << 20, 4096)), VIRTIO_BLK_S_OK);

      await c.execute("block_resize", { "node-name": "f0", size: 512 << 10 });
      assert.equal((await blk.readConfig()).capacity, 1024);
      assert.notEqual(await blk.execute(0, (q) => q.read(0, 512 << 10, 4096)), VIRTIO_BLK_S_OK);
      assert.equal(await blk.execute(0, (q) => q.read(0, 0, 4096)), VIRTIO_BLK_S_OK);

      // As qsd 7.2: the null driver cannot be resized; bad arguments are errors.
      assert.equal(
        errorOf(await c.execute("block_resize", { "node-name": "n0", size: 4096 })).desc,
        "Image format driver does not support resize",
      );
      assert.equal(
        errorOf(await c.execute("block_resize", { "node-name": "r0", size: "x" })).desc,
        "Invalid parameter type for 'size', expected: integer",
      );
      assert.equal(
        errorOf(await c.execute("block_resize", { "node-name": "r0" })).desc,
        "Parameter 'size' is missing",
      );
      assert.equal(
        errorOf(await c.execute("block_resize", { "node-name": "zz", size: 0 })).desc,
        "Cannot find device='' nor node-name='zz'",
      );
    } finally {
      await blk?.close();
      c.close();
    }
  });
});
