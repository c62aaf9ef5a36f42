/**
 * reconnect-delay against a real server that dies: qemu-nbd is killed with
 * SIGKILL while 16 writes are in flight and started again on the same
 * socket a second later. With reconnect-delay=5 no request fails and none
 * is lost (the image is compared byte for byte with qemu-img compare);
 * with a server that never comes back, the requests fail with EIO once the
 * delay is over (not before), and later ones fail at once.
 */
import assert from "node:assert/strict";
import { AioContext } from "../../../aio/mod.ts";
import { IoVector } from "../../../block/mod.ts";
import { NbdDriver } from "../../../block/nbd/mod.ts";
import { EIO } from "../../../sys/mod.ts";
import { fillPattern, runUntil } from "../helpers.ts";
import { have, startQemuNbd } from "./nbd_servers.ts";

const MiB = 1 << 20;
const BLOCK = 4096, BLOCKS = 1024, QD = 16;
const skip = !have("qemu-nbd") || !have("qemu-img");
if (skip) console.warn("SKIP nbd reconnect tests: qemu-nbd/qemu-img missing (qemu-utils)");

Deno.test({
  name: "nbd reconnect: qemu-nbd killed and restarted during I/O, reconnect-delay=5: nothing lost",
  ignore: skip,
  async fn() {
    const dir = await Deno.makeTempDir();
    const file = `${dir}/disk.img`, sock = `${dir}/nbd.sock`;
    await Deno.writeFile(file, new Uint8Array(BLOCKS * BLOCK));
    const model = new Uint8Array(BLOCKS * BLOCK);
    let srv = await startQemuNbd(file, { socket: sock });
    const ctx = new AioContext();
    try {
      const d = await runUntil(
        ctx,
        NbdDriver.open(ctx, {
          server: { type: "unix", path: sock },
          exportName: "disk",
          reconnectDelay: 5,
        }),
      );
      const TOTAL = 4000;
      let issued = 0, completed = 0, failed = 0, killedAt = -1;
      const bufs = Array.from({ length: QD }, () => new Uint8Array(BLOCK));
      const done = new Promise<void>((resolve) => {
        const issue = (slot: number) => {
          if (issued === TOTAL) return;
          const n = issued++;
          const blk = n % BLOCKS;
          fillPattern(bufs[slot], n + 1);
          model.set(bufs[slot], blk * BLOCK);
          d.pwritev(blk * BLOCK, IoVector.fromBuffers([bufs[slot]]), (ret) => {
            if (ret !== 0) failed++;
            if (++completed === TOTAL) resolve();
            else issue(slot);
          });
        };
        for (let s = 0; s < QD; s++) issue(s);
      });
      // Kill the server once some writes completed, restart it after a second.
      const chaos = (async () => {
        while (completed < 500) await new Promise((r) => setTimeout(r, 5));
        killedAt = completed;
        await srv.kill();
        await new Promise((r) => setTimeout(r, 1000));
        srv = await startQemuNbd(file, { socket: sock });
      })();
      await runUntil(ctx, Promise.all([done, chaos]));
      assert.ok(killedAt < TOTAL, "the server died while writes were in flight");
      assert.equal(failed, 0, "no request failed inside the reconnect delay");
      assert.equal(d.client.reconnects, 1);
      assert.ok(d.client.resent > 0, "requests in flight were resent");
      assert.equal(await runUntil(ctx, new Promise<number>((r) => d.flush(r))), 0);
      await d.close();
      await Deno.writeFile(`${dir}/model.img`, model);
      const cmp = await new Deno.Command("qemu-img", {
        args: ["compare", "-f", "raw", "-F", "raw", `${dir}/model.img`, file],
      }).output();
      assert.equal(cmp.code, 0, new TextDecoder().decode(cmp.stdout));
    } finally {
      ctx.close();
      await srv.kill();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "nbd reconnect: a server that never comes back: requests fail with EIO after the delay",
  ignore: skip,
  async fn() {
    const dir = await Deno.makeTempDir();
    const file = `${dir}/disk.img`, sock = `${dir}/nbd.sock`;
    await Deno.writeFile(file, fillPattern(new Uint8Array(MiB), 1));
    const srv = await startQemuNbd(file, { socket: sock });
    const ctx = new AioContext();
    try {
      const d = await runUntil(
        ctx,
        NbdDriver.open(ctx, {
          server: { type: "unix", path: sock },
          exportName: "disk",
          reconnectDelay: 2,
        }),
      );
      const q = IoVector.fromBuffers([new Uint8Array(4096)]);
      assert.equal(await runUntil(ctx, new Promise<number>((r) => d.preadv(0, q, r))), 0);
      await srv.kill();
      const t0 = performance.now();
      const rets = await runUntil(
        ctx,
        Promise.all(
          Array.from(
            { length: 8 },
            (_, i) =>
              new Promise<[number, number]>((r) =>
                d.preadv(
                  i * 4096,
                  IoVector.fromBuffers([new Uint8Array(4096)]),
                  (ret) => r([ret, performance.now() - t0]),
                )
              ),
          ),
        ),
      );
      for (const [ret, ms] of rets) {
        assert.equal(ret, -EIO);
        assert.ok(ms >= 1900, `failed after ${ms.toFixed(0)} ms, inside the 2 s delay`);
      }
      assert.equal(d.client.state, "connecting-nowait");
      const t1 = performance.now();
      assert.equal(await runUntil(ctx, new Promise<number>((r) => d.preadv(0, q, r))), -EIO);
      assert.ok(performance.now() - t1 < 1000, "after the delay, requests fail at once");
      await d.close();
    } finally {
      ctx.close();
      await srv.kill();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
