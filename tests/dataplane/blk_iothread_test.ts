// The IOThread side of the virtio-blk host (dataplane/blk_iothread.ts), its
// functions called directly on this thread with a real AioContext, a null
// image and a memfd-backed guest memory.

import assert from "node:assert/strict";
import { AioContext, IOThread } from "../../aio/mod.ts";
import { VirtqueueError } from "../../virtio/mod.ts";
import {
  blkClose,
  blkConfigure,
  blkOpen,
  blkSetMemory,
  blkStartQueue,
  blkStats,
  blkStopQueue,
} from "../../dataplane/blk_iothread.ts";
import { close, eventfd } from "../../sys/mod.ts";
import { GuestDriver, ringLayout, TestMemory } from "../virtio/guest_driver.ts";

const QSIZE = 16;
const RING_GPA = 0x10000;

Deno.test("blk IOThread: broken-ring reports stay bounded however often a broken ring restarts", async () => {
  const ctx = new AioContext({ pollMaxNs: 0 });
  const tm = new TestMemory([{ gpa: RING_GPA, size: 0x10000 }]);
  const fds = [eventfd(), eventfd(), eventfd()];
  try {
    await blkOpen(ctx, { driver: "null-co", size: 1 << 20 });
    blkConfigure(ctx, { device: { capacity: 2048 }, serial: "s", writeback: true });
    await blkSetMemory(ctx, { regions: tm.mem.regions() });
    const layout = ringLayout(RING_GPA, QSIZE);
    const driver = new GuestDriver(tm, QSIZE, layout);
    blkStats(ctx); // start from an empty log
    const restarts = 300;
    for (let i = 0; i < restarts; i++) {
      // The guest's avail idx runs more than a ring ahead: broken at once.
      driver.setAvailIdx(QSIZE + 1);
      await blkStartQueue(ctx, {
        index: 0,
        size: QSIZE,
        desc: tm.uva(layout.desc),
        avail: tm.uva(layout.avail),
        used: tm.uva(layout.used),
        base: 0,
        kickFd: fds[0],
        callFd: fds[1],
        errFd: fds[2],
        eventIdx: true,
        indirectDesc: true,
        enabled: true,
      });
      for (let p = 0; p < 3; p++) ctx.poll(false); // the attach check runs from a BH
      await blkStopQueue(ctx, { index: 0 });
    }
    const s = blkStats(ctx);
    assert.ok(s.broken.length > 1, `reported: ${s.broken.length}`);
    assert.ok(s.broken.length <= 65, `${s.broken.length} reports kept for ${restarts} breaks`);
    assert.match(s.broken[s.broken.length - 1], /more/);
    assert.deepEqual(blkStats(ctx).broken, [], "cleared once read");
  } finally {
    await blkClose(ctx);
    tm.close();
    for (const fd of fds) close(fd);
    ctx.close();
  }
});

Deno.test("blk IOThread: a ring that does not fit arrives from the thread as a VirtqueueError", async () => {
  const tm = new TestMemory([{ gpa: RING_GPA, size: 0x10000 }]);
  const fds = [eventfd(), eventfd(), eventfd()];
  const t = await IOThread.start({
    name: "blk-err",
    modules: [new URL("../../dataplane/blk_iothread.ts", import.meta.url).href],
    pollMaxNs: 0,
  });
  try {
    await t.call("blkOpen", { driver: "null-co", size: 1 << 20 });
    await t.call("blkConfigure", { device: { capacity: 2048 }, serial: "s", writeback: true });
    await t.call("blkSetMemory", { regions: tm.mem.regions() });
    const layout = ringLayout(RING_GPA, QSIZE);
    const e = await t.call("blkStartQueue", {
      index: 0,
      size: QSIZE,
      desc: tm.uva(RING_GPA + 0x10000 - 0x80), // runs past the end of guest memory
      avail: tm.uva(layout.avail),
      used: tm.uva(layout.used),
      base: 0,
      kickFd: fds[0],
      callFd: fds[1],
      errFd: fds[2],
      eventIdx: true,
      indirectDesc: true,
      enabled: true,
    }).then(() => null, (e: unknown) => e);
    assert(e instanceof VirtqueueError, `got ${e}`);
    assert.equal(e.kind, "RingOutOfRange");
    assert.match(e.message, /^virtqueue: RingOutOfRange: desc at \d+ \(\+256\) in user space$/);
  } finally {
    await t.call("blkClose").catch(() => {});
    await t.stop();
    tm.close();
    for (const fd of fds) close(fd);
  }
});
