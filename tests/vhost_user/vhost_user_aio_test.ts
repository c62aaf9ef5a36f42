// The server driven by the real main-thread event loop: aio/'s AioContext
// (setFdHandler + pollAsync), as the host will run it.

import assert from "node:assert/strict";
import { AioContext } from "../../aio/mod.ts";
import { VhostUserServer } from "../../vhost_user/mod.ts";
import { VhostUserBlkClient } from "../../client/blk_client.ts";
import { openFdCount, StubBackend, until } from "./vhost_user_test_util.ts";

Deno.test("server on an AioContext: a client connects, sets up 2 queues, leaves, reconnects", async () => {
  const fds0 = openFdCount();
  const dir = Deno.makeTempDirSync();
  const ctx = new AioContext();
  let running = true;
  const loop = (async () => {
    while (running) await ctx.pollAsync();
  })();
  const backend = new StubBackend();
  const errors: Error[] = [];
  const server = VhostUserServer.listen(`${dir}/s`, backend, ctx, {
    onError: (e) => errors.push(e),
  });
  try {
    for (let round = 1; round <= 2; round++) {
      const client = await VhostUserBlkClient.connect(server.path, { numQueues: 2, queueSize: 64 });
      assert.equal(client.config.capacity, 2048);
      assert.equal(backend.enabled.get(1), true);
      assert.deepEqual(await client.stopQueues(), [0, 0]);
      await client.close();
      await until(() => backend.resets === round && server.connection === null);
    }
    assert.deepEqual(errors, []);
  } finally {
    await server.close();
    running = false;
    ctx.close();
    await loop;
    Deno.removeSync(dir, { recursive: true });
  }
  assert.equal(openFdCount(), fds0);
});
