/**
 * A Debian Linux kernel in QEMU (TCG) on a vhost-user-blk-pci disk that our
 * host serves from a Ceph RBD image (`--image rbd:POOL/IMAGE:conf=...`), in a
 * one-monitor, one-OSD memstore cluster on this machine: the same scenario as
 * linux_guest_host_test.ts (pattern write/sync/read-back, O_DIRECT, blkdiscard,
 * serial), then the image is checked with `rbd export`. Without Ceph (or
 * without QEMU and the kernel image) the test is skipped with a loud warning.
 */

import assert from "node:assert/strict";
import { VhostUserBlkHost } from "../../dataplane/host.ts";
import { parseHostArgs } from "../../dataplane/host_options.ts";
import { librbdLoadError } from "../../sys/mod.ts";
import {
  CephCluster,
  cephUnavailable,
  checkScenarioImage,
  findKernel,
  makeScratchDir,
  prepareScenarioImage,
  runGuestScenario,
  SCENARIO_MIN_IMAGE_SIZE,
} from "../harness/mod.ts";

function noGuest(): string | null {
  try {
    findKernel();
  } catch (e) {
    return (e as Error).message;
  }
  try {
    Deno.statSync("/usr/bin/qemu-system-x86_64");
  } catch {
    return "qemu-system-x86_64 is not installed";
  }
  return null;
}

const SKIP = librbdLoadError() ?? cephUnavailable() ?? noGuest();
if (SKIP) console.warn(`SKIPPING the Linux guest on an rbd image test: ${SKIP}`);

Deno.test({
  name: "linux guest on our host serving an rbd image",
  ignore: SKIP !== null,
  async fn() {
    const cluster = await CephCluster.start();
    const dir = await makeScratchDir("e2e-rbd-guest");
    try {
      const size = SCENARIO_MIN_IMAGE_SIZE;
      const serial = "dataplane-rbd-serial";
      await prepareScenarioImage(`${dir}/seed.raw`, size);
      const image = `${cluster.pool}/guest`;
      await cluster.rbd("import", `${dir}/seed.raw`, image);
      const socket = `${dir}/vhost.sock`;
      const logs: string[] = [];
      const host = await VhostUserBlkHost.start(
        parseHostArgs([
          "--image",
          `rbd:${image}:conf=${cluster.conf}`,
          "--socket",
          socket,
          "--serial",
          serial,
        ]),
        (line) => logs.push(line),
      );
      let stopped = false;
      try {
        const r = await runGuestScenario({ socket, imageSize: size, serial, timeoutMs: 90_000 });
        const stats = await host.stop();
        stopped = true;
        assert.deepEqual(
          r.failures,
          [],
          `scenario failed:\n${r.failures.join("\n")}\n--- guest console ---\n${r.guest.output}` +
            `\n--- host log ---\n${logs.join("\n")}`,
        );
        const queues = stats.threads.flatMap((t) => t.queues);
        assert.equal(queues.reduce((n, q) => n + q.errors, 0), 0, "no request failed");
        assert.ok(queues.reduce((n, q) => n + q.flushes, 0) > 0, "sync sent a FLUSH");
      } finally {
        if (!stopped) await host.stop();
      }
      await cluster.rbd("export", image, `${dir}/out.raw`);
      assert.deepEqual(checkScenarioImage(await Deno.readFile(`${dir}/out.raw`), size, true), []);
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      await cluster.stop();
    }
  },
});
