/**
 * A Linux guest (QEMU, TCG) on a vhost-user-blk disk whose block node is
 * our NBD client to qemu-nbd: `--image nbd+unix:///disk?socket=...` with
 * two queues in two IOThreads (one NBD connection each). The guest scenario
 * (pattern write, sync, drop caches, read back, blkdiscard) runs, and the
 * test checks qemu-nbd's image file afterwards; once more with qemu-nbd
 * SIGKILLed as the guest starts writing and started again a second later
 * (reconnect-delay 5: the guest sees no error).
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

async function guestOverNbd(restartServer: boolean): Promise<void> {
  {
    const dir = await makeScratchDir("e2e-nbd");
    const image = `${dir}/disk.img`;
    const socket = `${dir}/vhost.sock`;
    const size = SCENARIO_MIN_IMAGE_SIZE * 2;
    const serial = "dataplane-nbd-serial";
    await prepareScenarioImage(image, size);
    // --discard=unmap: qemu-nbd punches the trimmed range (its default ignores TRIM).
    const serve = () =>
      startQemuNbd(image, { socket: `${dir}/nbd.sock` }, { extra: ["--discard=unmap"] });
    let srv = await serve();
    let restarted: Promise<void> | null = null;
    let console_ = "";
    let writtenDuringOutage = false;
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
        // SIGKILL qemu-nbd as the guest starts writing, serve again a second later.
        onOutput: (text) => {
          console_ += text;
          if (restartServer && restarted === null && console_.includes("E2E-INFO features=")) {
            restarted = (async () => {
              await srv.kill();
              await new Promise((r) => setTimeout(r, 1000));
              writtenDuringOutage = console_.includes("E2E-OK write-buffered");
              srv = await serve();
            })();
          }
        },
      });
      if (restartServer) {
        assert.ok(restarted !== null, "the server was killed during the scenario");
        await restarted;
        // The guest's first write (dd ... conv=fsync) could not finish while nobody served.
        assert.equal(writtenDuringOutage, false, "a write completed while the server was down");
      }
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
  }
}

Deno.test({
  name: "linux guest on our host over an NBD client to qemu-nbd, 2 queues",
  ignore: !have("qemu-nbd"),
  fn: () => guestOverNbd(false),
});

Deno.test({
  name:
    "linux guest over NBD: qemu-nbd SIGKILLed and restarted as the guest writes (reconnect-delay 5)",
  ignore: !have("qemu-nbd"),
  fn: () => guestOverNbd(true),
});
