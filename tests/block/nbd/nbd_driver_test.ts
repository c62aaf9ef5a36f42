import assert from "node:assert/strict";
import { AioContext } from "../../../aio/mod.ts";
import { IoVector } from "../../../block/mod.ts";
import { NbdDriver } from "../../../block/nbd/mod.ts";
import { fillPattern, runUntil } from "../helpers.ts";
import { have, startQemuNbd } from "./nbd_servers.ts";

const MiB = 1 << 20;
const skip = !have("qemu-nbd");
if (skip) console.warn("SKIP nbd driver tests: qemu-nbd is not installed (qemu-utils)");

function io(run: (cb: (ret: number) => void) => void): Promise<number> {
  return new Promise((resolve) => run(resolve));
}

Deno.test({
  name: "nbd driver: handshake with qemu-nbd over a Unix socket; reads and writes land in the file",
  ignore: skip,
  async fn() {
    const dir = await Deno.makeTempDir();
    const file = `${dir}/disk.img`;
    const image = fillPattern(new Uint8Array(4 * MiB), 3);
    await Deno.writeFile(file, image);
    const srv = await startQemuNbd(file, { socket: `${dir}/nbd.sock` });
    const ctx = new AioContext();
    try {
      const d = await runUntil(
        ctx,
        NbdDriver.open(ctx, { server: { type: "unix", path: srv.socket! }, exportName: "disk" }),
      );
      assert.equal(d.length, 4 * MiB);
      assert.equal(d.readOnly, false);
      assert.ok(d.client.info.structuredReply, "qemu-nbd negotiates structured replies");
      assert.ok(d.canMultiConn, "qemu-nbd -e 8 advertises NBD_FLAG_CAN_MULTI_CONN");
      const buf = new Uint8Array(8192);
      const q = IoVector.fromBuffers([buf.subarray(0, 100), buf.subarray(100)]);
      assert.equal(await runUntil(ctx, io((cb) => d.preadv(MiB + 7, q, cb))), 0);
      assert.deepEqual(buf, image.subarray(MiB + 7, MiB + 7 + 8192));
      // Many requests in flight at once, each checked.
      const bufs = Array.from({ length: 40 }, () => new Uint8Array(4096));
      const rets = await runUntil(
        ctx,
        Promise.all(
          bufs.map((b, i) => io((cb) => d.preadv(i * 65536, IoVector.fromBuffers([b]), cb))),
        ),
      );
      assert.deepEqual(rets, bufs.map(() => 0));
      bufs.forEach((b, i) => assert.deepEqual(b, image.subarray(i * 65536, i * 65536 + 4096)));
      const w = fillPattern(new Uint8Array(3 * MiB + 5), 9);
      assert.equal(
        await runUntil(ctx, io((cb) => d.pwritev(123, IoVector.fromBuffers([w]), cb))),
        0,
      );
      assert.equal(await runUntil(ctx, io((cb) => d.flush(cb))), 0);
      image.set(w, 123);
      assert.deepEqual(await Deno.readFile(file), image);
      await d.close();
    } finally {
      ctx.close();
      await srv.kill();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
