// The split-ring inflight log (vhost-user.rst "Inflight I/O tracking") as
// a Virtqueue keeps it, and what a restarted Virtqueue makes of it: real
// rings in a memfd-backed guest memory, a crash simulated by dropping the
// Virtqueue and building a new one over the same memory and log.

import assert from "node:assert/strict";
import {
  inflightQueueRegionSize,
  SplitInflightRegion,
  Virtqueue,
  VirtqueueError,
} from "../../virtio/mod.ts";
import { GuestDriver, ringLayout, TestMemory } from "./guest_driver.ts";

const A = 0x100000;
const SIZE = 16;

interface Rig {
  tm: TestMemory;
  drv: GuestDriver;
  log: ArrayBuffer;
  /** A Virtqueue as a (re)started device builds it: base, log, resume. */
  start(base: number, withLog?: boolean): { vq: Virtqueue; resubmitted: number };
}

function rig(size = SIZE): Rig {
  const tm = new TestMemory([{ gpa: A, size: 0x100000, uva: 0x7f1234500000 }]);
  const layout = ringLayout(A, size);
  const drv = new GuestDriver(tm, size, layout);
  const log = new ArrayBuffer(inflightQueueRegionSize(size));
  return {
    tm,
    drv,
    log,
    start(base, withLog = true) {
      const vq = new Virtqueue({
        mem: tm.mem,
        size,
        desc: tm.uva(layout.desc),
        avail: tm.uva(layout.avail),
        used: tm.uva(layout.used),
        lastAvailIdx: base,
        inflight: withLog ? new SplitInflightRegion(log, 0, size) : null,
      });
      return { vq, resubmitted: vq.resumeInflight() };
    },
  };
}

/** Adds `n` one-buffer requests; returns their heads in avail order. */
function addRequests(drv: GuestDriver, n: number): number[] {
  const heads: number[] = [];
  for (let i = 0; i < n; i++) heads.push(drv.add([{ gpa: A + 0x10000 + 512 * i, len: 512 }]));
  return heads;
}

function popAll(vq: Virtqueue): number[] {
  const out: number[] = [];
  for (let c = vq.pop(); c !== null; c = vq.pop()) out.push(c.head);
  return out;
}

Deno.test("inflight: after a crash the requests in flight are taken again, oldest first, exactly once, before new ones", () => {
  const r = rig();
  try {
    const first = r.start(0);
    assert.equal(first.resubmitted, 0, "a fresh log has nothing in flight");
    // 14 requests done first, so the heads below wrap (14, 15, 0, 1, 2):
    // the order taken is not the order of the head numbers.
    addRequests(r.drv, 14);
    for (let i = 0; i < 14; i++) first.vq.push(first.vq.pop()!.head, 1);
    const h = addRequests(r.drv, 5);
    assert.deepEqual(h, [14, 15, 0, 1, 2]);
    assert.deepEqual(popAll(first.vq), h);
    // Completed out of order: the 2nd and 4th only.
    first.vq.push(h[1], 1);
    first.vq.push(h[3], 1);
    assert.equal(r.drv.usedIdx(), 16);
    // The device dies. QEMU cannot get the ring base back and restarts the
    // ring at the used idx (16); the log says where things really are.
    const again = r.start(r.drv.usedIdx());
    assert.equal(again.resubmitted, 3);
    assert.equal(again.vq.lastAvailIdx, 19, "next avail = used idx + in flight");
    const h5 = addRequests(r.drv, 1)[0];
    assert.deepEqual(popAll(again.vq), [h[0], h[2], h[4], h5]);
    for (const x of [h[2], h[0], h5, h[4]]) again.vq.push(x, 1);
    // Every request used exactly once.
    const used = Array.from({ length: r.drv.usedIdx() - 14 }, (_, i) => r.drv.used(14 + i).id);
    assert.deepEqual(used.toSorted(), [...h, h5].toSorted());
    // A third start (clean this time) finds nothing in flight.
    assert.equal(r.start(20).resubmitted, 0);
  } finally {
    r.tm.close();
  }
});

Deno.test("inflight: the same crash without the log loses one request and repeats another", () => {
  const r = rig();
  try {
    const first = r.start(0, false);
    const h = addRequests(r.drv, 3);
    assert.deepEqual(popAll(first.vq), h);
    first.vq.push(h[1], 1);
    // Restarted at used idx 1: avail position 1 (h[1], already used) is taken
    // again, position 0 (h[0], never used) never is.
    const again = r.start(r.drv.usedIdx(), false);
    assert.deepEqual(popAll(again.vq), [h[1], h[2]]);
  } finally {
    r.tm.close();
  }
});

Deno.test("inflight: a used ring updated without the log's used_idx is repaired (the last batch is not resubmitted)", () => {
  const r = rig();
  try {
    const first = r.start(0);
    const h = addRequests(r.drv, 3);
    popAll(first.vq);
    first.vq.push(h[0], 1);
    first.vq.push(h[2], 1);
    // The crash landed after the used idx store of h[2] but before the log
    // was updated: put its flag and used_idx back as they were then.
    const u8 = new Uint8Array(r.log), u16 = new Uint16Array(r.log);
    u8[16 + 16 * h[2]] = 1;
    u16[7] = 1;
    const again = r.start(r.drv.usedIdx());
    assert.equal(again.resubmitted, 1, "only h[1] is in flight");
    assert.deepEqual(popAll(again.vq), [h[1]]);
    const log = new SplitInflightRegion(r.log, 0, SIZE);
    assert.equal(log.usedIdx, 2, "used_idx caught up with the ring");
    assert.equal(log.inflight(h[2]), false);
  } finally {
    r.tm.close();
  }
});

Deno.test("inflight: a crash between the used element and the used idx store resubmits the request", () => {
  const r = rig();
  try {
    const first = r.start(0);
    const h = addRequests(r.drv, 2);
    popAll(first.vq);
    // Push h[0] only as far as the log's prePut (the used ring's idx was
    // never published): exactly what a kill inside push leaves behind.
    new SplitInflightRegion(r.log, 0, SIZE).prePut(h[0]);
    const again = r.start(r.drv.usedIdx());
    assert.equal(again.resubmitted, 2);
    assert.deepEqual(popAll(again.vq), h);
  } finally {
    r.tm.close();
  }
});

Deno.test("inflight: undoPop gives a head back to the avail ring or to the resubmission list", () => {
  const r = rig();
  try {
    const first = r.start(0);
    const h = addRequests(r.drv, 2);
    assert.equal(first.vq.pop()?.head, h[0]);
    const again = r.start(0);
    assert.equal(again.resubmitted, 1);
    assert.equal(again.vq.pop()?.head, h[0]);
    again.vq.undoPop(); // back on the resubmission list
    assert.equal(again.vq.pop()?.head, h[0]);
    assert.equal(again.vq.pop()?.head, h[1]);
    again.vq.undoPop(); // back to the avail ring, and not in flight in the log
    assert.equal(new SplitInflightRegion(r.log, 0, SIZE).inflight(h[1]), false);
    assert.equal(again.vq.pop()?.head, h[1]);
    assert.equal(again.vq.pop(), null);
  } finally {
    r.tm.close();
  }
});

Deno.test("inflight: a hostile log is bounded (heads past the ring dropped, a looping batch list ends)", () => {
  const r = rig(8);
  try {
    // A log made for 16 entries, used for a ring of 8.
    const log = new ArrayBuffer(inflightQueueRegionSize(16));
    const u8 = new Uint8Array(log), u16 = new Uint16Array(log);
    u16[4] = 1; // version
    u16[6] = 3; // last_batch_head
    u16[7] = 100; // used_idx far from the ring's
    for (const i of [3, 5, 12]) u8[16 + 16 * i] = 1;
    u16[(16 + 16 * 3 + 6) / 2] = 3; // next of 3 is 3: a loop
    const region = new SplitInflightRegion(log, 0, 16);
    assert.equal(region.recover(0, 8), 1, "3 cleared as the last batch, 12 is past the ring");
    assert.equal(region.nextResubmit(), 5);
    assert.equal(region.inflight(12), false);
    assert.throws(() => region.recover(0, 32), RangeError);
    assert.throws(
      () => {
        const layout = ringLayout(A, 8);
        new Virtqueue({
          mem: r.tm.mem,
          size: 8,
          desc: r.tm.uva(layout.desc),
          avail: r.tm.uva(layout.avail),
          used: r.tm.uva(layout.used),
          inflight: new SplitInflightRegion(new ArrayBuffer(inflightQueueRegionSize(4)), 0, 4),
        });
      },
      (e: unknown) => e instanceof VirtqueueError && e.kind === "BadSize",
    );
  } finally {
    r.tm.close();
  }
});
