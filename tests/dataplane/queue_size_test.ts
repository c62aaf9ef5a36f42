// Ring sizes as QEMU's: with default options the host takes rings up to
// VIRTQUEUE_MAX_SIZE (1024) entries, offers seg_max = 1022, and refuses a
// larger ring with an error reply.

import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../client/blk_client.ts";
import { VhostUserBlkHost } from "../../dataplane/host.ts";
import { parseHostArgs } from "../../dataplane/host_options.ts";
import { VIRTIO_BLK_S_OK } from "../../virtio/mod.ts";

Deno.test("host with default options: 512- and 1024-entry rings work, 2048 is refused", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "queue-size-" });
  const log: string[] = [];
  const host = await VhostUserBlkHost.start(
    parseHostArgs(["--image", "null-co:1M", "--socket", `${dir}/blk.sock`]),
    (l) => log.push(l),
  );
  try {
    for (const queueSize of [512, 1024]) {
      const c = await VhostUserBlkClient.connect(host.server.path, { queueSize, slots: 128 });
      try {
        assert.equal(c.config.segMax, 1022, "seg_max = VIRTQUEUE_MAX_SIZE - 2");
        assert.equal(await c.execute(0, (q) => q.read(0, 0, 4096)), VIRTIO_BLK_S_OK);
      } finally {
        await c.close();
      }
    }
    await assert.rejects(
      () => VhostUserBlkClient.connect(host.server.path, { queueSize: 2048, slots: 128 }),
    );
    assert.ok(log.some((l) => /size 2048 > --queue-size 1024/.test(l)), log.join("\n"));
  } finally {
    await host.stop();
    Deno.removeSync(dir, { recursive: true });
  }
});
