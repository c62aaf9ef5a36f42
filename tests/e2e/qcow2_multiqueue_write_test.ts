// A writable qcow2 served by the host over four queues on four IOThreads
// (one owner of the metadata, the others forwarding their allocating writes:
// docs/design.md "Who owns the metadata"). The built-in client writes random
// sub-cluster patterns on every queue at once, so that the queues allocate
// the same clusters and L2 tables concurrently; every 512-byte unit belongs
// to one queue (no overlapping writes), so the result is known. Then every
// unit is read back through a queue other than its writer's (another
// thread's L2 cache must see the new mapping), and after the host stopped,
// `qemu-img check` must be clean (no leak either) and `qemu-img convert`
// must read exactly the model.

import assert from "node:assert/strict";
import { firstDifference, hostScratch, startHost } from "./host_util.ts";
import { connect } from "../robustness/robustness_util.ts";
import { assertCheckClean, oracleBytes, qemuImg } from "../block/qcow2/qemu_tools.ts";
import type { VhostUserBlkClient } from "../../client/mod.ts";

const QUEUES = 4;
const SIZE = 4 << 20;
const UNIT = 512;
const STRIPE_UNITS = 3; // a stripe (1.5 KiB) belongs to one queue; clusters are 2 KiB
const REQUESTS = 300; // per queue
const DEPTH = 8; // per queue

/** xorshift32 */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}

/** Runs `REQUESTS` random writes / write-zeroes per queue, all queues at once. */
async function concurrentWrites(c: VhostUserBlkClient, model: Uint8Array): Promise<void> {
  const stripes = Math.floor(SIZE / (UNIT * STRIPE_UNITS));
  const left = new Array(QUEUES).fill(REQUESTS);
  const inflight = new Array(QUEUES).fill(0);
  const failures: string[] = [];
  const more: (() => void)[] = [];
  for (let qi = 0; qi < QUEUES; qi++) {
    const q = c.queues[qi], rand = rng(1000 + qi);
    const freeSlots = Array.from({ length: DEPTH }, (_, i) => i);
    const pending = new Map<number, string>();
    q.onComplete = (slot, status) => {
      inflight[qi]--;
      if (status !== 0) failures.push(`queue ${qi}: ${pending.get(slot)} status ${status}`);
      pending.delete(slot);
      freeSlots.push(slot);
    };
    const submitOne = () => {
      const slot = freeSlots.pop()!;
      // A stripe of this queue, then 1..3 of its units.
      const stripe = Math.floor(rand() * stripes / QUEUES) * QUEUES + qi;
      const first = Math.floor(rand() * STRIPE_UNITS);
      const n = 1 + Math.floor(rand() * (STRIPE_UNITS - first));
      const off = (stripe * STRIPE_UNITS + first) * UNIT, len = n * UNIT;
      if (rand() < 0.15) {
        q.writeZeroes(slot, off, len);
        model.fill(0, off, off + len);
        pending.set(slot, `write-zeroes ${off}+${len}`);
      } else {
        const data = q.data(slot).subarray(0, len);
        for (let i = 0; i < len; i++) data[i] = (rand() * 256) | 0;
        model.set(data, off);
        q.write(slot, off, len);
        pending.set(slot, `write ${off}+${len}`);
      }
      inflight[qi]++;
      left[qi]--;
    };
    more.push(() => {
      let n = 0;
      while (left[qi] > 0 && inflight[qi] < DEPTH) {
        submitOne();
        n++;
      }
      if (n > 0) q.notify();
    });
  }
  more.forEach((m) => m());
  while (left.some((n) => n > 0) || inflight.some((n) => n > 0)) {
    if (!await c.waitAsync()) throw new Error(`timeout: in flight ${inflight}, left ${left}`);
    for (let qi = 0; qi < QUEUES; qi++) {
      c.queues[qi].reap();
      more[qi]();
    }
  }
  assert.deepEqual(failures, []);
}

Deno.test("qcow2 export: four IOThreads allocate one image concurrently, qemu-img agrees", async () => {
  const s = await hostScratch("qcow2-mq", 0);
  const img = `${s.dir}/disk.qcow2`;
  // 2 KiB clusters: an L2 table covers 512 KiB, so the disk needs 8 tables
  // (new L1 entries while the queues run) and 2048 clusters.
  qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=2k", img, String(SIZE));
  const { host } = await startHost([
    "--image",
    img,
    "--socket",
    s.socket,
    "--format",
    "qcow2",
    "--queues",
    String(QUEUES),
    "--iothreads",
    String(QUEUES),
  ]);
  const model = new Uint8Array(SIZE);
  try {
    const c = await connect(s.socket, { numQueues: QUEUES, slots: DEPTH });
    try {
      await concurrentWrites(c, model);
      // Read every 64 KiB back through the next queue (another IOThread).
      const chunk = 64 << 10;
      for (let off = 0, i = 0; off < SIZE; off += chunk, i++) {
        const qi = (i + 1) % QUEUES;
        c.queues[qi].onComplete = () => {};
        assert.equal(await c.execute(qi, (q) => q.read(0, off, chunk)), 0, `read ${off}`);
        const diff = firstDifference(
          c.queues[qi].data(0).subarray(0, chunk),
          model.subarray(off, off + chunk),
        );
        assert.equal(diff, -1, `queue ${qi} reads byte ${off + diff} wrong`);
      }
      assert.equal(await c.execute(0, (q) => q.flush(0)), 0);
    } finally {
      await c.close();
    }
  } finally {
    await host.stop();
  }
  try {
    assert.equal(assertCheckClean(img).leaks, 0);
    const got = oracleBytes(img);
    const diff = firstDifference(got, model);
    assert.equal(diff, -1, `qemu-img reads byte ${diff} wrong`);
  } finally {
    await s.remove();
  }
});
