/**
 * A Debian Linux kernel in QEMU (TCG) on a qcow2 disk served by our host:
 * the qcow2 image is an empty overlay over the raw scenario image, so every
 * guest write allocates clusters with copy on write from the backing file.
 * The guest runs the usual scenario (buffered and O_DIRECT pattern writes,
 * sync, read-back, parallel reads, blkdiscard); then `qemu-img check` finds
 * the overlay clean, its contents (as qemu-img reads them) are what the
 * scenario wrote (the discarded range reads zeroes, not the backing file),
 * and the backing file is untouched.
 */

import assert from "node:assert/strict";
import { formatStats, VhostUserBlkHost } from "../../dataplane/host.ts";
import { parseHostArgs } from "../../dataplane/host_options.ts";
import {
  checkScenarioImage,
  prepareScenarioImage,
  runGuestScenario,
  SCENARIO_FILL_BYTE,
  SCENARIO_MIN_IMAGE_SIZE,
} from "../harness/guest_scenario.ts";
import { makeScratchDir } from "../harness/scratch_dir.ts";
import { assertCheckClean, oracleBytes, qemuImg } from "../block/qcow2/qemu_tools.ts";

Deno.test("linux guest on a qcow2 overlay served by our host (cache=none, io_uring)", async () => {
  const dir = await makeScratchDir("e2e-qcow2");
  const base = `${dir}/base.raw`, image = `${dir}/disk.qcow2`, socket = `${dir}/vhost.sock`;
  const size = SCENARIO_MIN_IMAGE_SIZE * 2;
  await prepareScenarioImage(base, size);
  qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", image);
  const logs: string[] = [];
  const host = await VhostUserBlkHost.start(
    parseHostArgs([
      "--image",
      image,
      "--format",
      "qcow2",
      "--socket",
      socket,
      "--cache",
      "none",
      "--aio",
      "io_uring",
      "--queues",
      "2",
    ]),
    (line) => logs.push(line),
  );
  let stopped = false;
  try {
    const r = await runGuestScenario({ socket, imageSize: size, numQueues: 2, timeoutMs: 90_000 });
    const stats = await host.stop();
    stopped = true;
    console.log(`guest on qcow2: boot ${r.guest.bootMs.toFixed(0)} ms\n${formatStats(stats)}`);
    assert.deepEqual(
      r.failures,
      [],
      `scenario failed:\n${r.failures.join("\n")}\n--- guest console ---\n${r.guest.output}` +
        `\n--- host log ---\n${logs.join("\n")}`,
    );
    const queues = stats.threads.flatMap((t) => t.queues);
    assert.equal(queues.reduce((n, q) => n + q.errors, 0), 0, "no request failed");
    assertCheckClean(image);
    // The discard freed whole clusters: zero clusters over the backing file.
    assert.deepEqual(checkScenarioImage(oracleBytes(image), size, true), []);
    const b = await Deno.readFile(base);
    assert(b.every((x) => x === SCENARIO_FILL_BYTE), "the backing file was written");
  } finally {
    if (!stopped) await host.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
