// Our NBD client against our NBD export (the daemon's --nbd-server and
// block-export-add type=nbd over a file node): the two sides were each
// tested against QEMU's counterpart; here they meet. Writes, write-zeroes,
// flush and 32 reads in flight over a Unix socket and TCP, then the file is
// compared byte for byte with what was written.
import assert from "node:assert/strict";
import { AioContext } from "../../aio/mod.ts";
import { IoVector, type NbdServerAddress } from "../../block/mod.ts";
import { NbdDriver } from "../../block/nbd/mod.ts";
import { StorageDaemon } from "../../dataplane/daemon/storage_daemon.ts";
import { makeScratchDir } from "../harness/mod.ts";
import { fillPattern, runUntil } from "../block/helpers.ts";

const SIZE = 4 << 20;

function io(run: (cb: (ret: number) => void) => void): Promise<number> {
  return new Promise((resolve) => run(resolve));
}

for (const inet of [false, true]) {
  Deno.test(`our NBD client against our NBD export over ${inet ? "TCP" : "a Unix socket"}`, async () => {
    const dir = await makeScratchDir("nbd-client-export");
    const file = `${dir}/disk.img`;
    await Deno.writeFile(file, new Uint8Array(SIZE));
    const d = new StorageDaemon();
    const ctx = new AioContext();
    try {
      await d.nbdServerStart({
        addr: inet
          ? { type: "inet", host: "127.0.0.1", port: 0 }
          : { type: "unix", path: `${dir}/nbd.sock` },
        maxConnections: 0,
      });
      d.blockdevAdd({ driver: "file", "node-name": "f0", filename: file }, true);
      await d.nbdExportAdd({
        id: "e0",
        nodeName: "f0",
        name: "disk",
        description: "",
        writable: true,
      });
      const server: NbdServerAddress = inet
        ? { type: "inet", host: "127.0.0.1", port: d.nbdServer!.port }
        : { type: "unix", path: `${dir}/nbd.sock` };
      const drv = await runUntil(ctx, NbdDriver.open(ctx, { server, exportName: "disk" }));
      assert.equal(drv.length, SIZE);
      assert.equal(drv.readOnly, false);
      const model = new Uint8Array(SIZE);
      const w = fillPattern(new Uint8Array(SIZE / 2), 21);
      assert.equal(
        await runUntil(ctx, io((cb) => drv.pwritev(4096, IoVector.fromBuffers([w]), cb))),
        0,
      );
      model.set(w, 4096);
      assert.equal(await runUntil(ctx, io((cb) => drv.pwriteZeroes(65536, 8192, false, cb))), 0);
      model.fill(0, 65536, 65536 + 8192);
      assert.equal(await runUntil(ctx, io((cb) => drv.flush(cb))), 0);
      // 32 reads in flight at once.
      const bufs = Array.from({ length: 32 }, () => new Uint8Array(4096));
      const rets = await runUntil(
        ctx,
        Promise.all(
          bufs.map((b, i) => io((cb) => drv.preadv(i * 61440, IoVector.fromBuffers([b]), cb))),
        ),
      );
      assert.deepEqual(rets, bufs.map(() => 0));
      bufs.forEach((b, i) => assert.deepEqual(b, model.subarray(i * 61440, i * 61440 + 4096)));
      await drv.close();
      assert.deepEqual(await Deno.readFile(file), model);
    } finally {
      ctx.close();
      await d.stop();
      await Deno.remove(dir, { recursive: true });
    }
  });
}
