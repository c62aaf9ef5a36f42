import assert from "node:assert/strict";
import { AioContext } from "../../../aio/mod.ts";
import {
  BlockBackend,
  IoVector,
  parseBlockOptions,
  parseNbdUri,
  validateBlockOptions,
} from "../../../block/mod.ts";
import { fillPattern, runUntil } from "../helpers.ts";
import { have, startQemuNbd } from "./nbd_servers.ts";

Deno.test("block options: driver=nbd with server.*, export, reconnect-delay", () => {
  const o = parseBlockOptions(
    "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=10810,export=d,reconnect-delay=5",
  );
  assert.equal(o.driver, "nbd");
  assert.deepEqual(o.server, { type: "inet", host: "127.0.0.1", port: 10810 });
  assert.equal(o.exportName, "d");
  assert.equal(o.reconnectDelay, 5);
  const u = parseBlockOptions("driver=nbd,server.type=unix,server.path=/tmp/s");
  assert.deepEqual(u.server, { type: "unix", path: "/tmp/s" });
  assert.throws(() => parseBlockOptions("driver=nbd"), /server is required/);
  assert.throws(() => parseBlockOptions("driver=nbd,server.type=unix"), /server.path/);
  assert.throws(
    () => parseBlockOptions("driver=nbd,server.type=inet,server.host=h,server.port=x"),
    /bad port/,
  );
  assert.throws(() => parseBlockOptions("driver=nbd,server.type=tcp"), /inet\|unix/);
  assert.throws(() => parseBlockOptions("driver=file,filename=x,export=e"), /nbd options/);
  assert.throws(
    () =>
      validateBlockOptions({
        driver: "nbd",
        server: { type: "unix", path: "/s" },
        format: "qcow2",
      }),
    /qcow2/,
  );
});

Deno.test("parseNbdUri: QEMU's forms, percent-decoding, and refusals", () => {
  assert.deepEqual(parseNbdUri("nbd://example.org/a%20b"), {
    server: { type: "inet", host: "example.org", port: 10809 },
    exportName: "a b",
  });
  assert.deepEqual(parseNbdUri("nbd+tcp://h:1/"), {
    server: { type: "inet", host: "h", port: 1 },
    exportName: "",
  });
  for (
    const bad of ["nbd:/x", "nbd://", "nbd+unix://h/e?socket=/s", "nbd://h/e?x=1", "http://h/e"]
  ) {
    assert.throws(() => parseNbdUri(bad), /bad NBD URI/, bad);
  }
});

Deno.test({
  name: "BlockBackend.open driver=nbd: raw over nbd, read-only export makes a read-only backend",
  ignore: !have("qemu-nbd"),
  async fn() {
    const dir = await Deno.makeTempDir();
    const img = fillPattern(new Uint8Array(1 << 20), 6);
    await Deno.writeFile(`${dir}/d.img`, img);
    const srv = await startQemuNbd(`${dir}/d.img`, { socket: `${dir}/s` }, { readOnly: true });
    const ctx = new AioContext();
    try {
      const blk = await runUntil(
        ctx,
        BlockBackend.open(ctx, {
          driver: "nbd",
          server: { type: "unix", path: `${dir}/s` },
          exportName: "disk",
          offset: 4096,
        }),
      );
      assert.equal(blk.readOnly, true);
      assert.equal(blk.length, (1 << 20) - 4096);
      const b = new Uint8Array(512);
      assert.equal(await runUntil(ctx, blk.preadv(0, IoVector.fromBuffers([b]))), 0);
      assert.deepEqual(b, img.subarray(4096, 4096 + 512));
      await runUntil(ctx, blk.close());
    } finally {
      ctx.close();
      await srv.kill();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
