// The group's state shared across threads: Workers (as IOThreads are) view
// the same mapped memory by address and count requests in it under the
// group's spin lock; no update is lost (a broken lock loses some of the
// 2 x 200000 read-modify-writes of the bucket level).
import assert from "node:assert/strict";
import { THROTTLE_GROUP_BYTES, throttleConfigInit, ThrottleGroup } from "../../../block/mod.ts";
import { clockNs, mmapAnonymous } from "../../../sys/mod.ts";

Deno.test("throttle group: two threads counting in one group lose no update", async () => {
  const region = mmapAnonymous(THROTTLE_GROUP_BYTES);
  const workers: Worker[] = [];
  try {
    const g = new ThrottleGroup(region.buffer);
    const c = throttleConfigInit();
    c.buckets["bps-total"].avg = 1; // leaks 1 byte a second: nothing to speak of here
    g.init(c, clockNs());
    const rounds = 200_000;
    const done: Promise<unknown>[] = [];
    const barrier = new SharedArrayBuffer(4);
    for (let i = 0; i < 2; i++) {
      const w = new Worker(new URL("./fixtures/group_hammer.ts", import.meta.url), {
        type: "module",
      });
      workers.push(w);
      done.push(
        new Promise((resolve, reject) => {
          w.onmessage = resolve;
          w.onerror = reject;
        }),
      );
      w.postMessage({ addr: region.addr, rounds, barrier, threads: 2 });
    }
    await Promise.all(done);
    // Levels only leak when someone computes a wait: none did.
    assert.equal(g.level("bps-total").level, 2 * rounds * 1000);
    assert.equal(g.members, 0);
  } finally {
    for (const w of workers) w.terminate();
    region.unmap();
  }
});
