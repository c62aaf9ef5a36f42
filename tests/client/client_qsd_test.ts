// Validates the built-in vhost-user-blk client against the reference
// back-end, qemu-storage-daemon: every request type on 2 queues, verify mode,
// and the data checked in the image file afterwards.

import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../client/blk_client.ts";
import { patternWord, runWorkload, verify } from "../../client/workload.ts";
import {
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_RING_F_EVENT_IDX,
} from "../../client/virtio_blk_defs.ts";
import { makeScratchDir, QemuStorageDaemon } from "../harness/mod.ts";

const MiB = 1 << 20;
const IMAGE_SIZE = 64 * MiB;

Deno.test("client vs qemu-storage-daemon: every request type on 2 queues, data in the image", async () => {
  // cache.direct=on needs O_DIRECT: the scratch dir keeps the image off tmpfs.
  const dir = await makeScratchDir("client-qsd");
  const img = `${dir}/disk.raw`;
  const f = Deno.openSync(img, { create: true, write: true });
  f.truncate(IMAGE_SIZE);
  f.close();
  // Throws (the test fails) when qemu-storage-daemon is not installed.
  const qsd = await QemuStorageDaemon.start({
    socket: `${dir}/vhost.sock`,
    blockdev: { driver: "file", filename: img, cacheDirect: true },
    numQueues: 2,
  });
  let client: VhostUserBlkClient | null = null;
  try {
    client = await VhostUserBlkClient.connect(qsd.socket, {
      numQueues: 2,
      queueSize: 128,
      slots: 32,
    });
    assert.equal(client.config.capacity, IMAGE_SIZE / 512);
    assert.equal(client.config.numQueues, 2);
    assert.equal(client.maxQueues, 2);
    assert.ok(client.hasFeature(VIRTIO_RING_F_EVENT_IDX), "EVENT_IDX negotiated");
    assert.ok(client.hasFeature(VIRTIO_BLK_F_FLUSH));
    assert.ok(client.hasFeature(VIRTIO_BLK_F_DISCARD));
    assert.ok(client.hasFeature(VIRTIO_BLK_F_WRITE_ZEROES));
    assert.ok(!client.readOnly);

    const [q0, q1] = client.queues;
    // write through queue 0, read back through queue 1
    q0.data(0).fill(0xab, 0, 8192);
    assert.equal(await client.execute(0, (q) => q.write(0, 1 * MiB, 8192)), VIRTIO_BLK_S_OK);
    q1.data(0).fill(0);
    assert.equal(await client.execute(1, (q) => q.read(0, 1 * MiB, 8192)), VIRTIO_BLK_S_OK);
    assert.ok(q1.data(0).subarray(0, 8192).every((b) => b === 0xab));
    assert.equal(await client.execute(1, (q) => q.flush(0)), VIRTIO_BLK_S_OK);

    // GET_ID
    assert.equal(await client.execute(0, (q) => q.getId(0)), VIRTIO_BLK_S_OK);
    const id = new TextDecoder().decode(q0.data(0).subarray(0, 20)).replace(/\0.*$/, "");
    assert.ok(id.length > 0, "a device id");

    // write-zeroes over part of the 0xab data, discard over another part
    assert.equal(await client.execute(0, (q) => q.writeZeroes(0, 1 * MiB, 4096)), VIRTIO_BLK_S_OK);
    assert.equal(await client.execute(1, (q) => q.read(0, 1 * MiB, 8192)), VIRTIO_BLK_S_OK);
    assert.ok(q1.data(0).subarray(0, 4096).every((b) => b === 0));
    assert.ok(q1.data(0).subarray(4096, 8192).every((b) => b === 0xab));
    assert.equal(await client.execute(1, (q) => q.discard(0, 2 * MiB, 1 * MiB)), VIRTIO_BLK_S_OK);

    // out of range: the device must refuse, not wrap
    assert.equal(await client.execute(0, (q) => q.read(0, IMAGE_SIZE, 4096)), VIRTIO_BLK_S_IOERR);

    // verify mode over 8 MiB at 16 MiB, 2 queues x 16 in flight
    const v = await verify(client, {
      offset: 16 * MiB,
      span: 8 * MiB,
      blockSize: 64 * 1024,
      queueDepth: 16,
      seed: 7,
    });
    assert.deepEqual(v, { blocks: 128, mismatches: 0, errors: 0 });

    // a short timed workload runs and completes everything
    const r = runWorkload(client, {
      pattern: "randrw",
      blockSize: 4096,
      queueDepth: 8,
      ops: 2000,
      span: 1 * MiB,
    });
    assert.equal(r.ops, 2000);
    assert.equal(r.errors, 0);
    await client.close();
    client = null;
  } finally {
    await client?.close();
    await qsd.stop();
  }

  // The image itself holds what the client wrote.
  const data = Deno.readFileSync(img);
  const w = new Uint32Array(data.buffer);
  for (let off = 16 * MiB; off < 24 * MiB; off += 4) {
    if (w[off / 4] !== patternWord(off, 7)) assert.fail(`pattern mismatch at byte ${off}`);
  }
  assert.ok(data.subarray(1 * MiB, 1 * MiB + 4096).every((b) => b === 0), "zeroed");
  assert.ok(data.subarray(1 * MiB + 4096, 1 * MiB + 8192).every((b) => b === 0xab), "written");
  await Deno.remove(dir, { recursive: true });
});
