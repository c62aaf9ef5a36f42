// verify() must catch a device that answers reads OK without transferring
// data (issue 10 section 4). Our host's null-co driver is such a device: it
// completes reads without touching the buffers. With one queue and no more
// blocks than request slots, each slot is read back into the buffer its own
// write left the pattern in, so without poisoning the read buffers every
// block "verified".

import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../client/blk_client.ts";
import { verify } from "../../client/workload.ts";
import { hostScratch, startHost } from "../e2e/host_util.ts";

Deno.test("verify: reads answered OK without data are mismatches (one queue)", async () => {
  const s = await hostScratch("verify-null", 0);
  const { host } = await startHost(["--image", "null-co:1M", "--socket", s.socket]);
  let c: VhostUserBlkClient | null = null;
  try {
    c = await VhostUserBlkClient.connect(s.socket, { numQueues: 1, queueSize: 64, slots: 8 });
    const v = await verify(c, { span: 8 * 4096, blockSize: 4096, queueDepth: 8, seed: 3 });
    assert.equal(v.errors, 0);
    assert.equal(v.blocks, 8);
    assert.equal(v.mismatches, 8, "reads that transferred nothing passed verification");
  } finally {
    await c?.close();
    await host.stop();
    await s.remove();
  }
});
