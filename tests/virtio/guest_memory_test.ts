import assert from "node:assert/strict";
import {
  close,
  ftruncate,
  memfdCreate,
  MFD_ALLOW_SEALING,
  mmapAnonymous,
  mmapShared,
  O_RDONLY,
  O_RDWR,
  open,
  SysError,
} from "../../sys/mod.ts";
import {
  GuestMemory,
  GuestMemoryError,
  type MemoryRegion,
  Virtqueue,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
} from "../../virtio/mod.ts";
import { TestMemory } from "./guest_driver.ts";

/** Number of mappings of the memfd named `name` in this process. */
function mappingsOf(name: string): number {
  return Deno.readTextFileSync("/proc/self/maps").split("\n")
    .filter((l) => l.includes(`memfd:${name} `)).length;
}

function isKind(kind: string) {
  return (e: unknown) => e instanceof GuestMemoryError && e.kind === kind;
}

Deno.test("map: memfd regions at an offset, guest-physical and frontend-virtual translation", () => {
  const fd = memfdCreate("ram");
  ftruncate(fd, 0x30000);
  const regions: MemoryRegion[] = [
    // a non-page-aligned mmapOffset, given as bigint like a u64 message field
    { guestPhysAddr: 0x100000n, size: 0x8000n, userAddr: 0x7f0000010000n, mmapOffset: 0x1100n, fd },
    { guestPhysAddr: 0x0, size: 0x10000, userAddr: 0x7f0000000000, mmapOffset: 0x20000, fd },
  ];
  const mem = GuestMemory.map(regions);
  const other = mmapShared(fd, 0x30000, 0);
  try {
    assert.equal(mem.regionCount, 2);
    // writes through the guest-physical view land at fd offset mmapOffset + (gpa - base)
    mem.bytes(0x100010, 4)!.set([1, 2, 3, 4]);
    assert.deepEqual([...other.bytes.subarray(0x1110, 0x1114)], [1, 2, 3, 4]);
    mem.bytes(0xfffc, 4)!.set([9, 9, 9, 9]);
    assert.equal(other.bytes[0x2ffff], 9);
    // the same byte through the frontend-virtual address
    const h = mem.hostAddr(0x100010, 4);
    assert.equal(mem.userToHost(0x7f0000010010, 4), h);
    assert.equal(mem.userToGuest(0x7f0000010010, 4), 0x100010);
    assert.equal(mem.userToHost(0x100010, 4), -1, "a guest-physical address is not a user one");
    assert.equal(mem.hostAddr(0x7f0000010010, 4), -1);
    // regions() is sorted by guest-physical address
    assert.deepEqual(mem.regions().map((r) => r.guestPhysAddr), [0, 0x100000]);
  } finally {
    other.unmap();
    mem.close();
    close(fd);
  }
  assert.equal(mem.hostAddr(0x100010, 4), -1, "nothing translates after close");
  assert.equal(mem.regionCount, 0);
  mem.close(); // idempotent
});

Deno.test("hostAddr: bounds, len 0, bad numbers, region cache", () => {
  const tm = new TestMemory([
    { gpa: 0x1000, size: 0x1000, uva: 0x900000 },
    { gpa: 0x2000, size: 0x2000, uva: 0x800000 }, // adjacent to the first
  ]);
  const { mem } = tm;
  const [r0, r1] = tm.regions;
  try {
    assert.equal(mem.hostAddr(0x1000, 0x1000), r0.host);
    assert.equal(mem.hostAddr(0x1fff, 1), r0.host + 0xfff);
    // hostAddr stays one-region (rings, indirect tables need one host view);
    // a span of adjacent regions is translated piecewise: see "pieceCount" below.
    assert.equal(mem.hostAddr(0x1fff, 2), -1, "straddles two regions");
    assert.equal(mem.hostAddr(0x1000, 0x3000), -1);
    assert.equal(mem.hostAddr(0x2000, 0x2000), r1.host);
    assert.equal(mem.hostAddr(0x3fff, 1), r1.host + 0x1fff);
    assert.equal(mem.hostAddr(0x4000, 1), -1);
    assert.equal(mem.hostAddr(0xfff, 1), -1);
    assert.equal(mem.hostAddr(0xfff, 2), -1);
    // len 0: the address itself must be inside a region
    assert.equal(mem.hostAddr(0x1000, 0), r0.host);
    assert.equal(mem.hostAddr(0x4000, 0), -1);
    for (
      const [g, l] of [
        [NaN, 1],
        [0x1000, NaN],
        [-1, 2],
        [0x1000, -1],
        [4096.5, 1],
        [
          0x1000,
          0.5,
        ],
        [2 ** 64, 1],
        [0x1000, Infinity],
      ]
    ) {
      assert.equal(mem.hostAddr(g, l), -1, `${g} +${l}`);
    }
    // alternate regions so the last-hit cache is both hit and missed
    for (let i = 0; i < 100; i++) {
      assert.equal(mem.hostAddr(0x1000 + i, 4), r0.host + i);
      assert.equal(mem.lastRegion, 0);
      assert.equal(mem.hostAddr(0x3000 + i, 4), r1.host + 0x1000 + i);
      assert.equal(mem.lastRegion, 1);
      assert.equal(mem.hostAddr(0x1ffe + (i % 2), 4), -1);
    }
    assert.equal(mem.userToHost(0x900ffc, 4), r0.host + 0xffc);
    assert.equal(mem.userToHost(0x900ffc, 5), -1);
    assert.equal(mem.userToHost(0x801000, 0x1000), r1.host + 0x1000);
    assert.equal(mem.bytes(0x1ff0, 0x20), null);
    assert.equal(mem.bytes(0x2000, 0x2000)?.length, 0x2000);
  } finally {
    tm.close();
  }
});

Deno.test("pieceCount / hostAddrPrefix: adjacent regions piecewise, holes refused", () => {
  const tm = new TestMemory([
    { gpa: 0x1000, size: 0x1000 },
    { gpa: 0x2000, size: 0x2000 }, // adjacent to the first
    { gpa: 0x4000, size: 0x1000 }, // adjacent to the second
    { gpa: 0x8000, size: 0x1000 }, // after a hole
  ]);
  const { mem } = tm;
  const [r0, r1, r2, r3] = tm.regions;
  try {
    assert.equal(mem.pieceCount(0x1000, 0x1000), 1);
    assert.equal(mem.pieceCount(0x1fff, 2), 2);
    assert.equal(mem.pieceCount(0x1fff, 0x3001), 3, "through all of r1 into r2");
    assert.equal(mem.pieceCount(0x1000, 0x4000), 3);
    assert.equal(mem.pieceCount(0x1000, 0x4001), -1, "r2 ends in a hole");
    assert.equal(mem.pieceCount(0x4fff, 2), -1);
    assert.equal(mem.pieceCount(0x7fff, 2), -1, "starts in the hole");
    assert.equal(mem.pieceCount(0x8000, 0x1000), 1);
    assert.equal(mem.pieceCount(0xfff, 2), -1);
    for (const [g, l] of [[0x1000, 0], [NaN, 1], [0x1000, -1], [-1, 2], [0x1000, 0.5]]) {
      assert.equal(mem.pieceCount(g, l), -1, `${g} +${l}`);
    }
    // the pieces of 0x1ff0 + 0x2020: 16 bytes of r0, all of r1, 16 of r2
    const got: [number, number, number][] = [];
    for (let g = 0x1ff0, left = 0x2020; left > 0;) {
      const h = mem.hostAddrPrefix(g, left);
      got.push([h, mem.prefixLength, mem.lastRegion]);
      g += mem.prefixLength;
      left -= mem.prefixLength;
    }
    assert.deepEqual(got, [[r0.host + 0xff0, 16, 0], [r1.host, 0x2000, 1], [r2.host, 16, 2]]);
    assert.equal(mem.hostAddrPrefix(0x8010, 0x10000), r3.host + 0x10);
    assert.equal(mem.prefixLength, 0x1000 - 0x10);
    assert.equal(mem.hostAddrPrefix(0x5000, 1), -1);
    // pieceCount leaves the hostAddr cache where it was
    mem.hostAddr(0x8000, 1);
    mem.pieceCount(0x1ff0, 32);
    assert.equal(mem.lastRegion, 3);
    mem.close();
    assert.equal(mem.pieceCount(0x1000, 1), -1, "nothing after close");
    assert.equal(mem.hostAddrPrefix(0x1000, 1), -1);
  } finally {
    tm.close();
  }
});

Deno.test("map rejects bad tables with typed errors and leaves nothing mapped", () => {
  const fd = memfdCreate("leakcheck");
  ftruncate(fd, 0x10000);
  const r = (o: Partial<MemoryRegion>): MemoryRegion => ({
    guestPhysAddr: 0,
    size: 0x1000,
    userAddr: 0x7f0000000000,
    mmapOffset: 0,
    fd,
    ...o,
  });
  GuestMemory.map([{ guestPhysAddr: 0, size: 4096, userAddr: 0, mmapOffset: 0, fd }]).close();
  assert.equal(mappingsOf("leakcheck"), 0);
  const probe = GuestMemory.map([{ guestPhysAddr: 0, size: 4096, userAddr: 0, mmapOffset: 0, fd }]);
  assert.equal(mappingsOf("leakcheck"), 1, "the maps probe sees a live mapping");
  probe.close();
  try {
    assert.throws(() => GuestMemory.map([]), isKind("Empty"));
    assert.throws(() => GuestMemory.map([r({ size: 0 })]), isKind("Empty"));
    assert.throws(
      () => GuestMemory.map([r({}), r({ guestPhysAddr: 0xfff, userAddr: 0 })]),
      isKind("Overlap"),
    );
    assert.throws(
      () =>
        GuestMemory.map([r({ guestPhysAddr: 0x4000, size: 0x4000 }), r({ guestPhysAddr: 0x5000 })]),
      isKind("Overlap"),
    );
    assert.throws(
      () => GuestMemory.map([r({ guestPhysAddr: (1n << 64n) - 0x1000n, size: 0x2000 })]),
      isKind("WrapAround"),
    );
    assert.throws(
      () => GuestMemory.map([r({ userAddr: (1n << 64n) - 0x10n })]),
      isKind("WrapAround"),
    );
    assert.throws(
      () => GuestMemory.map([r({ guestPhysAddr: 2 ** 53 - 0x800 })]),
      isKind("TooLarge"),
    );
    assert.throws(() => GuestMemory.map([r({ guestPhysAddr: 1n << 60n })]), isKind("TooLarge"));
    assert.throws(() => GuestMemory.map([r({ size: -4096 })]), isKind("BadValue"));
    assert.throws(() => GuestMemory.map([r({ size: 4096.5 })]), isKind("BadValue"));
    assert.throws(() => GuestMemory.map([r({ mmapOffset: -1 })]), isKind("BadValue"));
    assert.throws(() => GuestMemory.map([r({ fd: -1 })]), isKind("BadValue"));
    assert.throws(() => GuestMemory.map([r({ guestPhysAddr: 1n << 64n })]), isKind("BadValue"));
    // mmap failure on the second region: the first one is unmapped again
    assert.throws(
      () => GuestMemory.map([r({}), r({ guestPhysAddr: 0x10000, fd: 99999 })]),
      (e: unknown) => e instanceof SysError && e.code === "EBADF",
    );
    assert.equal(mappingsOf("leakcheck"), 0);
    assert.throws(
      () => GuestMemory.fromMapped([{ guestPhysAddr: 0, size: 4096, userAddr: 0, hostAddr: 0 }]),
      isKind("BadValue"),
    );
  } finally {
    close(fd);
  }
});

Deno.test("GuestMemory.map seals sealable memfds against shrinking and counts the others", () => {
  const sealable = memfdCreate("sealable", MFD_ALLOW_SEALING);
  const plain = memfdCreate("plain");
  ftruncate(sealable, 8192);
  ftruncate(plain, 8192);
  const mem = GuestMemory.map([
    { guestPhysAddr: 0, size: 8192, userAddr: 0x10000, mmapOffset: 0, fd: sealable },
    { guestPhysAddr: 0x100000, size: 8192, userAddr: 0x200000, mmapOffset: 0, fd: plain },
  ]);
  try {
    assert.equal(mem.unsealedRegions, 1, "the memfd without MFD_ALLOW_SEALING cannot be sealed");
    // The front-end can no longer pull pages from under the mapping.
    assert.throws(() => ftruncate(sealable, 4096), SysError);
    ftruncate(sealable, 16384); // growing stays allowed
  } finally {
    mem.close();
    close(sealable);
    close(plain);
  }
});

Deno.test("GuestMemory.map accepts only regular files: a device's size cannot be checked", () => {
  // /dev/zero maps fine (MAP_SHARED gives shmem pages) but is a character
  // device; a block device maps too and faults beyond its real size (an
  // unbound loop device: on the first access). Neither has a size fstat
  // reports, so neither is guest memory (tests/robustness/hostile_fds_test.ts
  // runs the block-device case against a host process).
  const dir = Deno.makeTempDirSync();
  const fds = [open("/dev/zero", O_RDWR), open("/dev/null", O_RDWR), open(dir, O_RDONLY)];
  try {
    for (const fd of fds) {
      assert.throws(
        () => GuestMemory.map([{ guestPhysAddr: 0, size: 4096, userAddr: 0, mmapOffset: 0, fd }]),
        (e: unknown) => isKind("BadValue")(e) && /not a regular file/.test((e as Error).message),
      );
    }
  } finally {
    for (const fd of fds) close(fd);
    Deno.removeSync(dir);
  }
});

Deno.test("a region past 4 GiB: regionWords covers it, an indirect table up there is walked", () => {
  // Virtual only: the kernel backs the pages this test touches.
  const size = 2 ** 32 + 0x4000;
  const m = mmapAnonymous(size);
  try {
    const mem = GuestMemory.fromMapped([{ guestPhysAddr: 0, size, userAddr: 0, hostAddr: m.addr }]);
    assert.equal(mem.regionWords(0).length, size / 4);
    const v = new DataView(mem.regionBytes(0).buffer);
    const desc = (at: number, addr: number, len: number, flags: number, next: number) => {
      v.setBigUint64(at, BigInt(addr), true);
      v.setUint32(at + 8, len, true);
      v.setUint16(at + 12, flags, true);
      v.setUint16(at + 14, next, true);
    };
    const table = 2 ** 32 + 0x100, status = 2 ** 32 + 0x2000;
    desc(0, table, 32, VRING_DESC_F_INDIRECT, 0); // ring descriptor 0
    desc(table, 0x3000, 16, VRING_DESC_F_NEXT, 1);
    desc(table + 16, status, 1, VRING_DESC_F_WRITE, 0);
    v.setUint16(0x1000 + 4, 0, true); // avail ring[0] = head 0
    v.setUint16(0x1000 + 2, 1, true); // avail idx 1
    const vq = new Virtqueue({
      mem,
      size: 4,
      desc: 0,
      avail: 0x1000,
      used: 0x2000,
      addressSpace: "guest",
      indirectDesc: true,
    });
    const c = vq.pop();
    assert.ok(c, String(vq.brokenReason));
    assert.equal(c.count, 2);
    assert.deepEqual([...c.len.subarray(0, 2)], [16, 1]);
    assert.deepEqual([...c.addr.subarray(0, 2)], [m.addr + 0x3000, m.addr + status]);
  } finally {
    m.unmap();
  }
});
