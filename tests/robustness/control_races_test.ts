// Issue 10 items 2a, 2c, 2d: races and failures between the control plane
// (vhost-user messages on the main thread) and the rings running in an
// IOThread. Each case drives a real host with the built-in front-end.

import assert from "node:assert/strict";
import type { VhostUserBlkClient } from "../../client/blk_client.ts";
import {
  encodeMessage,
  VHOST_USER_GET_VRING_BASE,
  VHOST_USER_VERSION,
} from "../../dataplane/vhost_user/mod.ts";
import { cacheNoneHost, connect, HostProcess, MiB, scratch, sleep } from "./robustness_util.ts";

const IMAGE = 64 * MiB;
const BS = 1 * MiB;
const QD = 32;

/** Fills every slot of queue 0 with a 1 MiB write and kicks. */
function flood(c: VhostUserBlkClient): void {
  const q = c.queues[0];
  for (let s = 0; s < QD; s++) q.write(s, (s % (IMAGE / BS)) * BS, BS);
  q.notify();
}

// 2a: the front-end sends GET_VRING_BASE while requests are in flight and
// disconnects before the answer. The reset that follows the disconnect must
// wait for that ring's stop: before, it skipped the ring (already marked
// stopped), closed its call fd (the stopping queue's completions then wrote
// a closed or reused fd: EBADF killed the IOThread) and unmapped memory.
Deno.test("front-end disconnects while GET_VRING_BASE waits for in-flight requests: host survives, next connection works", async () => {
  const s = await scratch("robust-gvb-disc", IMAGE);
  const host = new HostProcess(cacheNoneHost(s, "threads", 1));
  try {
    await host.ready();
    const opts = { numQueues: 1, queueSize: 128, slots: QD, maxBlockSize: BS };
    for (let round = 0; round < 8; round++) {
      assert.ok(!host.exited, `host exited before round ${round}:\n${host.stderr}`);
      const c = await connect(s.socket, opts).catch((e) => {
        throw new Error(`round ${round}: ${e.message}; host:\n${host.stderr}`);
      });
      flood(c);
      await sleep(1);
      await c.frontend.sendRaw(
        encodeMessage(VHOST_USER_GET_VRING_BASE, VHOST_USER_VERSION, {
          kind: "vringState",
          index: 0,
          num: 0,
        }),
      );
      await sleep(round % 4);
      c.frontend.close(); // gone before the reply
      await c.close();
      assert.ok(!host.exited, `host exited in round ${round}:\n${host.stderr}`);
    }
    const last = await connect(s.socket, opts);
    try {
      assert.equal(await last.execute(0, (q) => q.read(0, 0, 4096), 20000), 0);
    } finally {
      await last.close();
    }
    await host.stopCleanly();
    assert.doesNotMatch(
      host.stderr,
      /event loop died|fatal:|EBADF|EINVAL|ring broken/,
      host.stderr,
    );
  } finally {
    await host.stop("SIGKILL", 15000);
    await s.remove();
  }
});
