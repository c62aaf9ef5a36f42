/**
 * A Linux guest (QEMU, TCG) on a vhost-user-blk disk whose block node is
 * our NBD client to qemu-nbd: `--image nbd+unix:///disk?socket=...` with
 * two queues in two IOThreads (one NBD connection each). The guest scenario
 * (pattern write, sync, drop caches, read back, blkdiscard) runs, and the
 * test checks qemu-nbd's image file afterwards.
 */

import assert from "node:assert/strict";
import { formatStats, VhostUserBlkHost } from "../../dataplane/host.ts";
import { parseHostArgs } from "../../dataplane/host_options.ts";
import {
  prepareScenarioImage,
  runGuestScenario,
  SCENARIO_MIN_IMAGE_SIZE,
} from "../harness/guest_scenario.ts";
import { makeScratchDir } from "../harness/scratch_dir.ts";
import { have, startQemuNbd } from "../block/nbd/nbd_servers.ts";

Deno.test({
  name: "linux guest on our host over an NBD client to qemu-nbd, 2 queues",
  ignore: !have("qemu-nbd"),
  async fn() {
    const dir = await makeScratchDir("e2e-nbd");
    const image = `${dir}/disk.img`;
    const socket = `${dir}/vhost.sock`;
    const size = SCENARIO_MIN_IMAGE_SIZE * 2;
    const serial = "dataplane-nbd-serial";
    await prepareScenarioImage(image, size);
    // --discard=unmap: qemu-nbd punches the trimmed range (its default ignores TRIM).
    const srv = await startQemuNbd(image, { socket: `${dir}/nbd.sock` }, {
      extra: ["--discard=unmap"],
    });
    const logs: string[] = [];
    let host: VhostUserBlkHost | null = null;
    try {
      host = await VhostUserBlkHost.start(
        parseHostArgs([
          "--image",
          `nbd+unix:///disk?socket=${dir}/nbd.sock`,
          "--reconnect-delay",
          "5",
          "--socket",
          socket,
          "--serial",
          serial,
          "--queues",
          "2",
          "--iothreads",
          "2",
        ]),
        (line) => logs.push(line),
      );
      const r = await runGuestScenario({
        socket,
        imagePath: image,
        imageSize: size,
        numQueues: 2,
        serial,
        timeoutMs: 120_000,
      });
      const stats = await host.stop();
      host = null;
      console.log(`guest over nbd: boot ${r.guest.bootMs.toFixed(0)} ms\n${formatStats(stats)}`);
      assert.deepEqual(
        r.failures,
        [],
        `scenario failed:\n${r.failures.join("\n")}\n--- guest console ---\n${r.guest.output}` +
          `\n--- host log ---\n${logs.join("\n")}`,
      );
      const queues = stats.threads.flatMap((t) => t.queues);
      assert.equal(queues.reduce((n, q) => n + q.errors, 0), 0, "no request failed");
      assert.ok(queues.reduce((n, q) => n + q.discards, 0) > 0, "the guest's discard reached us");
      assert.ok(queues.reduce((n, q) => n + q.flushes, 0) > 0, "sync sent a FLUSH");
    } finally {
      if (host) await host.stop();
      await srv.kill();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
