import assert from "node:assert/strict";
import {
  DescriptorChainError,
  Virtqueue,
  VirtqueueError,
  type VirtqueueOptions,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_USED_F_NO_NOTIFY,
} from "../../virtio/mod.ts";
import { GuestDriver, ringLayout, TestMemory } from "./guest_driver.ts";

// Three regions: A and B adjacent in guest-physical space, C far away; the
// frontend-virtual bases differ from the guest-physical ones.
const A = 0x100000, B = 0x200000, C = 0x40000000;
const SIZE = 16;

function setup(
  opts: Partial<VirtqueueOptions> & { size?: number } = {},
): { tm: TestMemory; drv: GuestDriver; vq: Virtqueue } {
  const tm = new TestMemory([
    { gpa: A, size: 0x100000, uva: 0x7f1234500000 },
    { gpa: B, size: 0x40000, uva: 0x7f5550000000 },
    { gpa: C, size: 0x10000, uva: 0x7f7770000000 },
  ]);
  const size = opts.size ?? SIZE;
  const layout = ringLayout(A, size);
  const drv = new GuestDriver(tm, size, layout);
  const vq = new Virtqueue({
    mem: tm.mem,
    size,
    desc: tm.uva(layout.desc),
    avail: tm.uva(layout.avail),
    used: tm.uva(layout.used),
    ...opts,
  });
  return { tm, drv, vq };
}

function hostOf(tm: TestMemory, gpa: number): number {
  return tm.mem.hostAddr(gpa, 1);
}

function brokenKind(vq: Virtqueue): string | undefined {
  const r = vq.brokenReason;
  assert.ok(r instanceof DescriptorChainError || r instanceof VirtqueueError || r === null);
  return r?.kind;
}

Deno.test("pop walks a chain into host addresses and push publishes the used element", () => {
  const { tm, drv, vq } = setup();
  try {
    assert.equal(vq.pop(), null);
    const head = drv.add([
      { gpa: A + 0x10000, len: 16 },
      { gpa: B + 0x1000, len: 4096, write: true },
      { gpa: C + 0x20, len: 1, write: true },
    ]);
    assert.ok(vq.availPending());
    const c = vq.pop();
    assert.ok(c);
    assert.equal(c.head, head);
    assert.equal(c.count, 3);
    assert.equal(c.outNum, 1);
    assert.equal(c.inNum, 2);
    assert.equal(c.outLen, 16);
    assert.equal(c.inLen, 4097);
    assert.deepEqual([...c.addr.subarray(0, 3)], [
      hostOf(tm, A + 0x10000),
      hostOf(tm, B + 0x1000),
      hostOf(tm, C + 0x20),
    ]);
    assert.equal(c.region[1], 1);
    assert.equal(c.offset[1], 0x1000);
    assert.ok(!c.isWritable(0) && c.isWritable(1));
    assert.equal(vq.inFlight, 1);
    assert.equal(vq.pop(), null);
    vq.push(head, 4097);
    assert.equal(drv.usedIdx(), 1);
    assert.deepEqual(drv.used(0), { id: head, len: 4097 });
    assert.equal(vq.inFlight, 0);
    assert.equal(vq.notifyNeeded(), true);
    assert.equal(vq.notifyNeeded(), false, "nothing pushed since the last call");
  } finally {
    tm.close();
  }
});

Deno.test("guest-physical ring addresses, and ring layout validation", () => {
  const tm = new TestMemory([{ gpa: A, size: 0x10000, uva: 0x7f0000000000 }]);
  try {
    const l = ringLayout(A, 8);
    const vq = new Virtqueue({ mem: tm.mem, size: 8, ...l, addressSpace: "guest" });
    const drv = new GuestDriver(tm, 8, l);
    drv.add([{ gpa: A + 0x8000, len: 8, write: true }]);
    assert.equal(vq.pop()?.addr[0], hostOf(tm, A + 0x8000));
    const bad = (o: Partial<VirtqueueOptions>, kind: string) =>
      assert.throws(
        () => new Virtqueue({ mem: tm.mem, size: 8, ...l, addressSpace: "guest", ...o }),
        (e: unknown) => e instanceof VirtqueueError && e.kind === kind,
      );
    bad({ size: 12 }, "BadSize");
    bad({ size: 0 }, "BadSize");
    bad({ size: 65536 }, "BadSize");
    bad({ desc: A + 8 }, "Misaligned");
    bad({ used: A + 0x1002 }, "Misaligned");
    bad({ avail: A + 0x1001 }, "Misaligned");
    bad({ desc: A + 0x10000 - 64 }, "RingOutOfRange"); // table runs past the region end
    bad({ used: 0x50 }, "RingOutOfRange");
    // frontend-virtual space: the guest-physical addresses are not valid there
    bad({ addressSpace: "user" }, "RingOutOfRange");
  } finally {
    tm.close();
  }
});

Deno.test("chains come out in avail order across the 16-bit index wrap", () => {
  const { tm, drv, vq } = setup({ lastAvailIdx: 65534 });
  try {
    drv.setAvailIdx(65534);
    const heads = [0, 1, 2, 3].map((k) => drv.add([{ gpa: A + 0x20000 + k * 512, len: 512 }]));
    assert.equal(drv.availIdx, 2);
    for (const h of heads) {
      const c = vq.pop();
      assert.equal(c?.head, h);
      vq.push(h, 0);
    }
    assert.equal(vq.pop(), null);
    assert.equal(vq.lastAvailIdx, 2);
    assert.equal(vq.usedIdx, 4);
  } finally {
    tm.close();
  }
});

Deno.test("indirect descriptors: table walked with NEXT inside it", () => {
  const { tm, drv, vq } = setup({ indirectDesc: true });
  try {
    const table = A + 0x30000;
    const head = drv.writeIndirect([
      { gpa: A + 0x40000, len: 16 },
      { gpa: B + 0x10, len: 512, write: true },
      { gpa: C, len: 1, write: true },
    ], table);
    drv.makeAvailable(head);
    const c = vq.pop();
    assert.ok(c);
    assert.equal(c.head, head);
    assert.equal(c.count, 3);
    assert.equal(c.outNum, 1);
    assert.equal(c.addr[2], hostOf(tm, C));
    // NEXT order inside the table need not be sequential
    drv.setDesc(0, A + 0x40000, 16, VRING_DESC_F_NEXT, 2, table);
    drv.setDesc(2, B, 8, VRING_DESC_F_WRITE, 0, table);
    drv.setDesc(1, 0, 0, 0, 0, table);
    const h2 = drv.writeChain([{ gpa: A + 0x50000, len: 32 }]); // a direct descriptor...
    drv.setDesc(h2, A + 0x50000, 32, VRING_DESC_F_NEXT, head, undefined); // ...then the indirect one
    drv.makeAvailable(h2);
    const c2 = vq.pop();
    assert.ok(c2, String(vq.brokenReason));
    assert.equal(c2.count, 3);
    assert.deepEqual([...c2.len.subarray(0, 3)], [32, 16, 8]);
  } finally {
    tm.close();
  }
});

Deno.test("indirect descriptors: tables at 4-byte aligned and odd offsets walk the same", () => {
  // An aligned table is read as words of its region, any other through a DataView.
  for (const offset of [0, 4, 8, 1, 2, 3, 5, 6, 7]) {
    const { tm, drv, vq } = setup({ indirectDesc: true });
    try {
      const head = drv.writeIndirect([
        { gpa: A + 0x40000, len: 16 },
        { gpa: B + 0x10, len: 512, write: true },
        { gpa: C, len: 1, write: true },
      ], A + 0x30000 + offset);
      drv.makeAvailable(head);
      const c = vq.pop();
      assert.ok(c, `offset ${offset}: ${vq.brokenReason}`);
      assert.equal(c.count, 3, `offset ${offset}`);
      assert.equal(c.outNum, 1);
      assert.deepEqual([...c.len.subarray(0, 3)], [16, 512, 1], `offset ${offset}`);
      assert.deepEqual(
        [...c.addr.subarray(0, 3)],
        [hostOf(tm, A + 0x40000), hostOf(tm, B + 0x10), hostOf(tm, C)],
        `offset ${offset}`,
      );
    } finally {
      tm.close();
    }
  }
});

// Each chain that cannot be followed breaks the ring with its own typed reason.
const malformed: [string, (drv: GuestDriver) => void, Partial<VirtqueueOptions>?][] = [
  ["Loop", (d) => {
    d.setDesc(0, A + 0x10000, 16, VRING_DESC_F_NEXT, 1);
    d.setDesc(1, A + 0x10000, 16, VRING_DESC_F_NEXT, 0);
    d.makeAvailable(0);
  }],
  ["Loop", (d) => { // a descriptor pointing at itself
    d.setDesc(5, A + 0x10000, 16, VRING_DESC_F_NEXT, 5);
    d.makeAvailable(5);
  }],
  ["NextOutOfRange", (d) => {
    d.setDesc(0, A + 0x10000, 16, VRING_DESC_F_NEXT, SIZE);
    d.makeAvailable(0);
  }],
  ["HeadOutOfRange", (d) => d.makeAvailable(SIZE + 3)],
  ["IndirectNotNegotiated", (d) => {
    d.setDesc(0, A + 0x30000, 16, VRING_DESC_F_INDIRECT, 0);
    d.makeAvailable(0);
  }, { indirectDesc: false }],
  ["IndirectBadLength", (d) => {
    d.setDesc(0, A + 0x30000, 0, VRING_DESC_F_INDIRECT, 0);
    d.makeAvailable(0);
  }],
  ["IndirectBadLength", (d) => {
    d.setDesc(0, A + 0x30000, 24, VRING_DESC_F_INDIRECT, 0);
    d.makeAvailable(0);
  }],
  ["IndirectWithNext", (d) => {
    d.setDesc(0, A + 0x30000, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1);
    d.makeAvailable(0);
  }],
  ["NestedIndirect", (d) => {
    d.setDesc(0, A + 0x31000, 16, VRING_DESC_F_INDIRECT, 0, A + 0x30000);
    d.setDesc(0, A + 0x30000, 16, VRING_DESC_F_INDIRECT, 0);
    d.makeAvailable(0);
  }],
  ["IndirectOutOfRange", (d) => { // indirect table runs past region C
    d.setDesc(0, C + 0x10000 - 16, 32, VRING_DESC_F_INDIRECT, 0);
    d.makeAvailable(0);
  }],
  ["NextOutOfRange", (d) => { // NEXT beyond the indirect table's end
    d.setDesc(0, A + 0x40000, 16, VRING_DESC_F_NEXT, 2, A + 0x30000);
    d.setDesc(0, A + 0x30000, 32, VRING_DESC_F_INDIRECT, 0);
    d.makeAvailable(0);
  }],
  ["Loop", (d) => { // a cycle inside the indirect table
    d.setDesc(0, A + 0x40000, 16, VRING_DESC_F_NEXT, 1, A + 0x30000);
    d.setDesc(1, A + 0x40000, 16, VRING_DESC_F_NEXT, 0, A + 0x30000);
    d.setDesc(0, A + 0x30000, 32, VRING_DESC_F_INDIRECT, 0);
    d.makeAvailable(0);
  }],
  ["AvailIdxJump", (d) => d.setAvailIdx(SIZE + 1)],
  ["AvailIdxJump", (d) => d.setAvailIdx(0xffff)],
];

for (const [kind, build, opts] of malformed) {
  Deno.test(`malformed ring: ${kind} breaks the ring (${build.toString().slice(0, 60)})`, () => {
    const { tm, drv, vq } = setup({ indirectDesc: true, ...opts });
    try {
      build(drv);
      assert.equal(vq.pop(), null);
      assert.ok(vq.broken);
      assert.equal(brokenKind(vq), kind, String(vq.brokenReason));
      // a broken ring stays broken and hands out nothing more
      drv.add([{ gpa: A + 0x10000, len: 16 }]);
      assert.equal(vq.pop(), null);
      assert.equal(vq.availPending(), false);
      assert.equal(vq.notifyNeeded(), false);
      assert.equal(drv.usedIdx(), 0, "no used entry for a broken chain");
    } finally {
      tm.close();
    }
  });
}

// A chain that can be followed to its end but holds an unusable buffer is
// handed out (in flight) with `error` set and, when its last descriptor is a
// valid device-writable buffer, where that buffer's last byte is; the ring
// carries on.
type Buf = { gpa: number; len: number; write?: boolean };
const STATUS: Buf = { gpa: C + 0x20, len: 1, write: true };
const bufferErrors: [string, Buf[]][] = [
  ["OutOfRange", [{ gpa: 0x1000, len: 16 }]], // below every region
  ["OutOfRange", [{ gpa: B + 0x40000 - 8, len: 16 }]], // runs off B into the hole
  // (A buffer straddling the adjacent A and B was OutOfRange here until issue 10
  // section 3: it is split now, as QEMU does; see "adjacent regions" below.)
  ["OutOfRange", [{ gpa: B - 8, len: 0x40000 + 16, write: true }]], // A, all of B, the hole
  ["OutOfRange", [{ gpa: 2 ** 60, len: 16 }]],
  ["OutOfRange", [{ gpa: 2 ** 53 + A, len: 16 }]],
  ["OutOfRange", [{ gpa: C, len: 0xffffffff }]],
  ["ZeroLength", [{ gpa: A + 0x10000, len: 0 }]],
  ["BadOrder", [{ gpa: A, len: 8, write: true }, { gpa: A, len: 8 }]],
  ["TooLong", [1, 2, 3, 4, 5].map((k) => ({ gpa: A + k * 0x1000, len: 64 }))],
];

for (const [kind, bufs] of bufferErrors) {
  for (const withStatus of [false, true]) {
    const what = `${JSON.stringify(bufs).slice(0, 60)}${withStatus ? " + status" : ""}`;
    Deno.test(`unusable buffer: ${kind} is handed out with error set (${what})`, () => {
      const { tm, drv, vq } = setup({ maxChainLength: kind === "TooLong" ? 4 : undefined });
      try {
        const head = drv.add(withStatus ? [...bufs, STATUS] : bufs);
        const chain = vq.pop();
        assert.ok(chain !== null, String(vq.brokenReason));
        assert.equal(chain.head, head);
        assert.equal(chain.error, kind);
        assert.equal(chain.statusAddr, withStatus ? hostOf(tm, STATUS.gpa) : -1);
        if (withStatus) {
          assert.equal(
            tm.mem.regionHostAddr(chain.statusRegion) + chain.statusOffset,
            chain.statusAddr,
          );
        }
        assert.ok(!vq.broken);
        assert.equal(vq.inFlight, 1);
        vq.push(head, 1);
        assert.equal(drv.usedIdx(), 1);
        // the next chain is fine again
        drv.add([{ gpa: A + 0x10000, len: 16 }]);
        assert.equal(vq.pop()?.error, null);
      } finally {
        tm.close();
      }
    });
  }
}

Deno.test("an avail idx exactly queue-size ahead is fine; one more is a jump", () => {
  const { tm, drv, vq } = setup();
  try {
    for (let i = 0; i < SIZE; i++) drv.add([{ gpa: A + 0x10000 + i * 16, len: 16 }]);
    let n = 0;
    while (vq.pop()) n++;
    assert.equal(n, SIZE);
    assert.ok(!vq.broken);
  } finally {
    tm.close();
  }
});

Deno.test("a head made available again while in flight breaks the ring", () => {
  const { tm, drv, vq } = setup();
  try {
    const h = drv.add([{ gpa: A + 0x10000, len: 16 }]);
    assert.equal(vq.pop()?.head, h);
    drv.makeAvailable(h);
    assert.equal(vq.pop(), null);
    assert.equal(brokenKind(vq), "HeadInUse");
    // the legitimately popped request can still be completed (nothing written)
    vq.push(h, 1);
    assert.equal(drv.usedIdx(), 0);
  } finally {
    tm.close();
  }
});

Deno.test("push refuses heads that are not in flight", () => {
  const { tm, drv, vq } = setup();
  try {
    const notInFlight = (f: () => void) =>
      assert.throws(f, (e: unknown) => e instanceof VirtqueueError && e.kind === "NotInFlight");
    notInFlight(() => vq.push(0, 0));
    notInFlight(() => vq.push(-1, 0));
    notInFlight(() => vq.push(SIZE, 0));
    const h = drv.add([{ gpa: A + 0x10000, len: 16 }]);
    vq.pop();
    vq.push(h, 0);
    notInFlight(() => vq.push(h, 0));
    assert.equal(drv.usedIdx(), 1);
  } finally {
    tm.close();
  }
});

Deno.test("undoPop gives the last chain back once; lastAvailIdx is refused while busy", () => {
  const { tm, drv, vq } = setup();
  try {
    assert.throws(() => vq.undoPop(), (e: unknown) => e instanceof VirtqueueError);
    const h1 = drv.add([{ gpa: A + 0x10000, len: 16 }]);
    const h2 = drv.add([{ gpa: A + 0x11000, len: 16 }]);
    assert.equal(vq.pop()?.head, h1);
    assert.equal(vq.pop()?.head, h2);
    vq.undoPop();
    assert.equal(vq.inFlight, 1);
    assert.equal(vq.lastAvailIdx, 1);
    assert.throws(() => vq.undoPop(), (e: unknown) => e instanceof VirtqueueError);
    assert.throws(
      () => (vq.lastAvailIdx = 0),
      (e: unknown) => e instanceof VirtqueueError && e.kind === "Busy",
    );
    assert.equal(vq.pop()?.head, h2, "the undone chain comes again, not HeadInUse");
    vq.push(h1, 0);
    vq.push(h2, 0);
    vq.lastAvailIdx = 7;
    assert.equal(vq.lastAvailIdx, 7);
  } finally {
    tm.close();
  }
});

Deno.test("notifyNeeded without EVENT_IDX follows VRING_AVAIL_F_NO_INTERRUPT", () => {
  const { tm, drv, vq } = setup();
  try {
    drv.setAvailFlags(VRING_AVAIL_F_NO_INTERRUPT);
    const h = drv.add([{ gpa: A + 0x10000, len: 16 }]);
    vq.pop();
    vq.push(h, 0);
    assert.equal(vq.notifyNeeded(), false);
    drv.setAvailFlags(0);
    const h2 = drv.add([{ gpa: A + 0x10000, len: 16 }]);
    vq.pop();
    vq.push(h2, 0);
    assert.equal(vq.notifyNeeded(), true);
  } finally {
    tm.close();
  }
});

Deno.test("notifyNeeded with nothing pushed since the queue started is false, with and without EVENT_IDX", () => {
  for (const eventIdx of [false, true]) {
    const { tm, drv, vq } = setup({ eventIdx });
    try {
      assert.equal(vq.notifyNeeded(), false, `eventIdx ${eventIdx}: nothing pushed`);
      cycle(drv, vq);
      assert.equal(vq.notifyNeeded(), true, `eventIdx ${eventIdx}: one pushed`);
    } finally {
      tm.close();
    }
  }
});

function cycle(drv: GuestDriver, vq: Virtqueue): void {
  const h = drv.add([{ gpa: A + 0x10000, len: 16 }]);
  assert.equal(vq.pop()?.head, h);
  vq.push(h, 0);
}

Deno.test("notifyNeeded with EVENT_IDX: vring_need_event against used_event", () => {
  const { tm, drv, vq } = setup({ eventIdx: true });
  try {
    drv.setUsedEvent(0);
    cycle(drv, vq); // used idx 1
    assert.equal(vq.notifyNeeded(), true, "first notification is always sent");
    drv.setUsedEvent(3); // notify once the entry at index 3 is used
    cycle(drv, vq);
    cycle(drv, vq); // used idx 3
    assert.equal(vq.notifyNeeded(), false);
    cycle(drv, vq); // used idx 4: passed 3
    assert.equal(vq.notifyNeeded(), true);
    cycle(drv, vq); // used idx 5, event still 3 (driver not caught up)
    assert.equal(vq.notifyNeeded(), false);
    drv.setUsedEvent(5);
    cycle(drv, vq);
    cycle(drv, vq); // used idx 7: 5 was crossed within this batch
    assert.equal(vq.notifyNeeded(), true);
    assert.equal(vq.notifyNeeded(), false);
  } finally {
    tm.close();
  }
});

Deno.test("notifyHint: the unfenced early check leaves a missed crossing to notifyNeeded", () => {
  const { tm, drv, vq } = setup({ eventIdx: true });
  try {
    drv.setUsedEvent(0);
    cycle(drv, vq); // used idx 1
    assert.equal(vq.notifyHint(), true, "nothing signalled yet: notify");
    assert.equal(vq.notifyNeeded(), false, "the hint's notification counts");
    drv.setUsedEvent(9); // the driver is busy: interrupts off for a while
    cycle(drv, vq); // used idx 2
    assert.equal(vq.notifyHint(), false);
    // The driver re-enables for the entry at 1 after the hint looked (as a
    // stale read would also see it): the fenced check must still find it.
    drv.setUsedEvent(1);
    assert.equal(vq.notifyNeeded(), true, "a false hint must not close the window");
    assert.equal(vq.notifyNeeded(), false);
    cycle(drv, vq); // used idx 3
    drv.setUsedEvent(2);
    assert.equal(vq.notifyHint(), true, "crossed 2: the hint notifies at once");
    assert.equal(vq.notifyNeeded(), false, "and the batch's check does not again");
  } finally {
    tm.close();
  }
});

Deno.test("notifyHint is false without EVENT_IDX (the batch's notifyNeeded decides)", () => {
  const { tm, drv, vq } = setup({ eventIdx: false });
  try {
    cycle(drv, vq);
    assert.equal(vq.notifyHint(), false);
    assert.equal(vq.notifyNeeded(), true);
  } finally {
    tm.close();
  }
});

Deno.test("notifyNeeded with EVENT_IDX across the used idx wrap", () => {
  const { tm, drv, vq } = setup({ eventIdx: true, lastAvailIdx: 65533 });
  try {
    drv.setAvailIdx(65533);
    // device used idx starts at what the used ring says (0 here); move it near the wrap
    for (let i = 0; i < 3; i++) cycle(drv, vq);
    assert.equal(vq.notifyNeeded(), true);
    drv.setUsedEvent(0xffff);
    cycle(drv, vq); // used idx 4
    assert.equal(vq.notifyNeeded(), false);
  } finally {
    tm.close();
  }
  const s = setup({ eventIdx: true });
  try {
    // 65535 completions, then cross the wrap with used_event = 0xffff
    for (let i = 0; i < 65535; i++) cycle(s.drv, s.vq);
    assert.equal(s.vq.usedIdx, 65535);
    assert.equal(s.vq.notifyNeeded(), true);
    s.drv.setUsedEvent(0xffff);
    cycle(s.drv, s.vq); // 65535 -> 0: the entry at 0xffff is used
    assert.equal(s.vq.usedIdx, 0);
    assert.equal(s.vq.notifyNeeded(), true);
  } finally {
    s.tm.close();
  }
});

Deno.test("disable/enableNotification without EVENT_IDX toggles VRING_USED_F_NO_NOTIFY", () => {
  const { tm, drv, vq } = setup();
  try {
    assert.equal(drv.usedFlags() & VRING_USED_F_NO_NOTIFY, 0);
    vq.disableNotification();
    assert.equal(drv.usedFlags() & VRING_USED_F_NO_NOTIFY, VRING_USED_F_NO_NOTIFY);
    assert.equal(vq.enableNotification(), false);
    assert.equal(drv.usedFlags() & VRING_USED_F_NO_NOTIFY, 0);
  } finally {
    tm.close();
  }
});

Deno.test("enableNotification re-checks the ring so a request added meanwhile is not lost", () => {
  for (const eventIdx of [false, true]) {
    const { tm, drv, vq } = setup({ eventIdx });
    try {
      // The dataplane loop: disable, pop until empty, enable; if enable reports work, go again.
      drv.add([{ gpa: A + 0x10000, len: 16 }]);
      vq.disableNotification();
      const c = vq.pop();
      assert.ok(c);
      vq.push(c.head, 0);
      assert.equal(vq.pop(), null);
      // the driver adds a chain after the device saw an empty ring but before it re-enabled:
      // it saw notifications disabled and did not kick.
      drv.add([{ gpa: A + 0x11000, len: 16 }]);
      assert.equal(vq.enableNotification(), true, `eventIdx=${eventIdx}`);
      if (eventIdx) assert.equal(drv.availEvent(), 1, "avail_event = last avail idx");
      vq.disableNotification();
      assert.ok(vq.pop());
      assert.equal(vq.enableNotification(), false);
      if (eventIdx) assert.equal(drv.availEvent(), 2);
    } finally {
      tm.close();
    }
  }
});

Deno.test("EVENT_IDX: disableNotification leaves avail_event behind", () => {
  const { tm, drv, vq } = setup({ eventIdx: true });
  try {
    assert.equal(drv.availEvent(), 0);
    vq.disableNotification();
    cycle(drv, vq);
    cycle(drv, vq);
    assert.equal(drv.availEvent(), 0);
    assert.equal(drv.usedFlags(), 0, "NO_NOTIFY is not used with EVENT_IDX");
    vq.enableNotification();
    assert.equal(drv.availEvent(), 2);
  } finally {
    tm.close();
  }
});

// Issue 10 section 3: a buffer spanning guest-physically adjacent regions is
// split into one chain entry per region, as QEMU's virtqueue_map_desc (and
// libvhost-user's virtqueue_map_desc) split it into iovecs. A span that
// touches a hole stays OutOfRange.
Deno.test("adjacent regions: a buffer spanning A and B is one entry per region", () => {
  const { tm, drv, vq } = setup();
  try {
    const head = drv.add([
      { gpa: B - 16, len: 24 }, // 16 bytes in A, 8 in B
      { gpa: B - 0x100, len: 0x200, write: true },
      STATUS,
    ]);
    const c = vq.pop();
    assert.ok(c, String(vq.brokenReason));
    assert.equal(c.head, head);
    assert.equal(c.error, null);
    assert.equal(c.count, 5);
    assert.equal(c.outNum, 2);
    assert.equal(c.outLen, 24);
    assert.equal(c.inLen, 0x201);
    const want = [
      [A + 0x100000 - 16, 16, 0],
      [B, 8, 1],
      [B - 0x100, 0x100, 0],
      [B, 0x100, 1],
      [C + 0x20, 1, 2],
    ];
    want.forEach(([gpa, len, region], i) => {
      assert.equal(c.addr[i], hostOf(tm, gpa), `entry ${i}`);
      assert.equal(c.len[i], len);
      assert.equal(c.region[i], region);
      assert.equal(tm.mem.regionHostAddr(region) + c.offset[i], c.addr[i]);
      assert.ok(tm.containsHost(c.addr[i], c.len[i]));
    });
    vq.push(head, 0x201);
  } finally {
    tm.close();
  }
});

Deno.test("adjacent regions: a split beyond the chain capacity is TooLong", () => {
  const { tm, drv, vq } = setup({ maxChainLength: 3 });
  try {
    // 2 descriptors, 3 entries: fits
    drv.add([{ gpa: B - 8, len: 16 }, STATUS]);
    let c = vq.pop();
    assert.equal(c?.error, null);
    assert.equal(c?.count, 3);
    vq.push(c!.head, 1);
    // 3 descriptors, 4 entries: too many
    drv.add([{ gpa: A + 0x1000, len: 16 }, { gpa: B - 8, len: 16 }, STATUS]);
    c = vq.pop();
    assert.equal(c?.error, "TooLong");
    assert.equal(c?.statusAddr, hostOf(tm, STATUS.gpa));
    vq.push(c!.head, 1);
    assert.ok(!vq.broken);
  } finally {
    tm.close();
  }
});

Deno.test("adjacent regions: a last descriptor spanning A and B still locates the status byte", () => {
  const { tm, drv, vq } = setup();
  try {
    drv.add([{ gpa: 0x1000, len: 16 }, { gpa: B - 8, len: 16, write: true }]);
    const c = vq.pop();
    assert.equal(c?.error, "OutOfRange");
    assert.equal(c?.statusAddr, hostOf(tm, B + 7));
    assert.equal(c?.statusRegion, 1);
    assert.equal(c?.statusOffset, 7);
  } finally {
    tm.close();
  }
});

Deno.test("adjacent regions: an indirect table must still lie in one region", () => {
  const { tm, drv, vq } = setup({ indirectDesc: true });
  try {
    const table = B - 16; // two descriptors: one in A, one in B
    drv.setDesc(0, A + 0x1000, 16, VRING_DESC_F_NEXT, 1, table);
    drv.setDesc(1, C, 1, VRING_DESC_F_WRITE, 0, table);
    drv.setDesc(0, table, 32, VRING_DESC_F_INDIRECT, 0);
    drv.makeAvailable(0);
    assert.equal(vq.pop(), null);
    assert.equal(brokenKind(vq), "IndirectOutOfRange");
  } finally {
    tm.close();
  }
});
