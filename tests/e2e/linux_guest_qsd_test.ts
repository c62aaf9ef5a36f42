/**
 * Proves the real-Linux-guest harness against qemu-storage-daemon: a Debian
 * kernel in QEMU (TCG) drives a vhost-user-blk disk served by qsd, writes and
 * reads a pattern, discards a range, and the image is checked from the host.
 * The same scenario (tests/harness/guest_scenario.ts) runs against the
 * dataplane host in its own test.
 */

import assert from "node:assert/strict";
import {
  prepareScenarioImage,
  runGuestScenario,
  SCENARIO_MIN_IMAGE_SIZE,
} from "../harness/guest_scenario.ts";
import { QemuStorageDaemon, type QsdBlockdev } from "../harness/qsd.ts";
import { makeScratchDir } from "../harness/scratch_dir.ts";

type FileOpts = Omit<Extract<QsdBlockdev, { driver: "file" }>, "driver" | "filename">;

async function scenarioOnQsd(file: FileOpts, numQueues: number): Promise<void> {
  const dir = await makeScratchDir("e2e-qsd");
  const image = `${dir}/disk.img`;
  const socket = `${dir}/vhost.sock`;
  const size = SCENARIO_MIN_IMAGE_SIZE * 2;
  await prepareScenarioImage(image, size);
  const qsd = await QemuStorageDaemon.start({
    socket,
    blockdev: { driver: "file", filename: image, ...file },
    numQueues,
  });
  try {
    const t0 = performance.now();
    const r = await runGuestScenario({ socket, imagePath: image, imageSize: size, numQueues });
    console.log(
      `guest: boot marker ${r.guest.bootMs.toFixed(0)} ms, total ${
        (performance.now() - t0).toFixed(0)
      } ms, serial ${JSON.stringify(r.serial)}, cache_type ${r.markers.info.get("cache_type")}`,
    );
    assert.deepEqual(
      r.failures,
      [],
      `scenario failed:\n${r.failures.join("\n")}\n--- guest console ---\n${r.guest.output}` +
        `\n--- qsd stderr ---\n${qsd.stderr}`,
    );
    assert.equal(qsd.exited, false, "qsd exited during the run");
  } finally {
    await qsd.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("linux guest on qsd: cache.direct=on aio=native, 1 queue", async () => {
  await scenarioOnQsd({ cacheDirect: true, aio: "native" }, 1);
});

Deno.test("linux guest on qsd: cache.direct=off aio=threads, 2 queues", async () => {
  await scenarioOnQsd({ cacheDirect: false, aio: "threads" }, 2);
});
