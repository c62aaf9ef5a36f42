/**
 * The main job end to end: a Debian Linux kernel in QEMU (TCG) uses a
 * vhost-user-blk-pci disk served by our host (dataplane/host.ts, queues in
 * IOThreads). The guest writes a 4 MiB pattern, syncs, drops caches, reads
 * it back and compares, runs blkdiscard, reads /sys/block/vda/serial; the
 * test then checks the image file. The same scenario runs against
 * qemu-storage-daemon in linux_guest_qsd_test.ts, so a failure here that
 * does not happen there is ours.
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

async function scenarioOnHost(flags: string[], numQueues: number): Promise<void> {
  const dir = await makeScratchDir("e2e-host");
  const image = `${dir}/disk.img`;
  const socket = `${dir}/vhost.sock`;
  const size = SCENARIO_MIN_IMAGE_SIZE * 2;
  const serial = "dataplane-e2e-serial"; // 20 bytes: no NUL terminator on the wire
  await prepareScenarioImage(image, size);
  const logs: string[] = [];
  const host = await VhostUserBlkHost.start(
    parseHostArgs([
      "--image",
      image,
      "--socket",
      socket,
      "--serial",
      serial,
      "--queues",
      String(numQueues),
      "--iothreads",
      String(numQueues),
      ...flags,
    ]),
    (line) => logs.push(line),
  );
  let stopped = false;
  try {
    const t0 = performance.now();
    const r = await runGuestScenario({
      socket,
      imagePath: image,
      imageSize: size,
      numQueues,
      serial,
      timeoutMs: 90_000,
    });
    const stats = await host.stop();
    stopped = true;
    console.log(
      `guest on host ${flags.join(" ")}: boot ${r.guest.bootMs.toFixed(0)} ms, total ${
        (performance.now() - t0).toFixed(0)
      } ms, cache_type ${r.markers.info.get("cache_type")}\n${formatStats(stats)}`,
    );
    assert.deepEqual(
      r.failures,
      [],
      `scenario failed:\n${r.failures.join("\n")}\n--- guest console ---\n${r.guest.output}` +
        `\n--- host log ---\n${logs.join("\n")}`,
    );
    const queues = stats.threads.flatMap((t) => t.queues);
    assert.equal(queues.length, numQueues, "every queue was started");
    assert.equal(queues.reduce((n, q) => n + q.errors, 0), 0, "no request failed");
    assert.ok(queues.every((q) => q.broken === null), "no ring broke");
    assert.ok(queues.reduce((n, q) => n + q.discards, 0) > 0, "the guest's discard reached us");
    assert.ok(queues.reduce((n, q) => n + q.flushes, 0) > 0, "sync sent a FLUSH");
  } finally {
    if (!stopped) await host.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("linux guest on our host: cache=none aio=native, 1 queue", async () => {
  await scenarioOnHost(["--cache", "none", "--aio", "native"], 1);
});

Deno.test("linux guest on our host: cache=writeback aio=threads, 2 queues", async () => {
  await scenarioOnHost(["--cache", "writeback", "--aio", "threads"], 2);
});

Deno.test("linux guest on our host: cache=none aio=io_uring, 2 queues", async () => {
  await scenarioOnHost(["--cache", "none", "--aio", "io_uring"], 2);
});
