import assert from "node:assert/strict";
import {
  blkIdBytes,
  blkRequestLimits,
  parseBlkRequest,
  REQUEST_BROKEN,
  RequestError,
  requestErrorStatus,
  VIRTIO_BLK_MAX_REQUEST_BYTES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
  type VirtioBlkOptions,
  VirtioBlkRequest,
  Virtqueue,
  writeBlkId,
} from "../../virtio/mod.ts";
import { type Buf, GuestDriver, ringLayout, TestMemory } from "./guest_driver.ts";
import {
  close,
  ftruncate,
  memfdCreate,
  pread,
  preadvAt,
  pwrite,
  pwritevAt,
} from "../../sys/mod.ts";

const A = 0x100000, B = 0x800000;
const HDR = A + 0x10000, DATA = B, STATUS = A + 0x20000, SEGS = A + 0x30000;
const CAPACITY = 2048; // sectors (1 MiB)

interface Ctx {
  tm: TestMemory;
  drv: GuestDriver;
  vq: Virtqueue;
}

type Region = { gpa: number; size: number; uva: number };
const TWO_REGIONS: Region[] = [
  { gpa: A, size: 0x100000, uva: 0x7f4400000000 },
  { gpa: B, size: 0x100000, uva: 0x7f2200000000 },
];

/** A 64-entry queue with its rings at the first region's start. */
function withQueue(
  fn: (c: Ctx) => void,
  regions: Region[] = TWO_REGIONS,
  indirectDesc = true,
): void {
  const tm = new TestMemory(regions);
  try {
    const l = ringLayout(regions[0].gpa, 64);
    const drv = new GuestDriver(tm, 64, l);
    const vq = new Virtqueue({
      mem: tm.mem,
      size: 64,
      desc: tm.uva(l.desc),
      avail: tm.uva(l.avail),
      used: tm.uva(l.used),
      indirectDesc,
    });
    fn({ tm, drv, vq });
  } finally {
    tm.close();
  }
}

function header(c: Ctx, gpa: number, type: number, sector: bigint | number): void {
  const dv = c.tm.view(gpa, 16);
  dv.setUint32(0, type, true);
  dv.setUint32(4, 0, true);
  dv.setBigUint64(8, BigInt(sector), true);
}

function parse(
  c: Ctx,
  bufs: Buf[],
  opts: Partial<VirtioBlkOptions> = {},
): { err: string | null; req: VirtioBlkRequest } {
  const limits = blkRequestLimits({ capacity: CAPACITY, ...opts });
  const req = new VirtioBlkRequest(limits);
  c.drv.add(bufs);
  const chain = c.vq.pop();
  assert.ok(chain, String(c.vq.brokenReason));
  const err = parseBlkRequest(chain, c.tm.mem, limits, req);
  c.vq.push(chain.head, err === null ? req.usedLen : 1);
  return { err, req };
}

const hdr: Buf = { gpa: HDR, len: 16 };
const status: Buf = { gpa: STATUS, len: 1, write: true };

Deno.test("IN: header, data-in and status; writeStatus writes the guest byte", () => {
  withQueue((c) => {
    header(c, HDR, VIRTIO_BLK_T_IN, 8);
    c.tm.view(STATUS, 1).setUint8(0, 0xff);
    const { err, req } = parse(c, [hdr, { gpa: DATA, len: 4096, write: true }, status]);
    assert.equal(err, null);
    assert.equal(req.type, VIRTIO_BLK_T_IN);
    assert.equal(req.sector, 8);
    assert.equal(req.qiov.niov, 1);
    assert.equal(req.qiov.base(0), c.tm.mem.hostAddr(DATA, 4096));
    assert.equal(req.qiov.size, 4096);
    assert.equal(req.inLen, 4096);
    assert.equal(req.usedLen, 4097);
    assert.equal(req.statusAddr, c.tm.mem.hostAddr(STATUS, 1));
    req.writeStatus(VIRTIO_BLK_S_OK);
    assert.equal(c.tm.view(STATUS, 1).getUint8(0), VIRTIO_BLK_S_OK);
    assert.deepEqual(c.drv.used(0), { id: req.head, len: 4097 });
  });
});

Deno.test("IN: data and status in one descriptor; several data descriptors", () => {
  withQueue((c) => {
    header(c, HDR, VIRTIO_BLK_T_IN, 0);
    let r = parse(c, [hdr, { gpa: DATA, len: 1025, write: true }]);
    assert.equal(r.err, null);
    assert.equal(r.req.qiov.size, 1024);
    assert.equal(r.req.statusAddr, c.tm.mem.hostAddr(DATA + 1024, 1));
    r = parse(c, [
      hdr,
      { gpa: DATA, len: 512, write: true },
      { gpa: A + 0x50000, len: 1024, write: true },
      { gpa: DATA + 0x4000, len: 513, write: true },
    ]);
    assert.equal(r.err, null);
    assert.equal(r.req.qiov.niov, 3);
    assert.equal(r.req.qiov.size, 2048);
    assert.equal(r.req.qiov.len(2), 512);
  });
});

Deno.test("OUT: header split over two descriptors, data begins mid-descriptor", () => {
  withQueue((c) => {
    header(c, HDR, VIRTIO_BLK_T_OUT, 0x10);
    // move the second half of the header to the start of a second buffer
    const second = new Uint8Array(c.tm.mem.bytes(HDR + 8, 8)!);
    c.tm.mem.bytes(DATA, 8)!.set(second);
    const { err, req } = parse(c, [
      { gpa: HDR, len: 8 },
      { gpa: DATA, len: 8 + 512 },
      { gpa: DATA + 0x1000, len: 512 },
      status,
    ]);
    assert.equal(err, null);
    assert.equal(req.type, VIRTIO_BLK_T_OUT);
    assert.equal(req.sector, 0x10);
    assert.equal(req.qiov.niov, 2);
    assert.equal(req.qiov.base(0), c.tm.mem.hostAddr(DATA + 8, 1));
    assert.equal(req.qiov.size, 1024);
    assert.equal(req.inLen, 0);
    assert.equal(req.usedLen, 1);
  });
});

Deno.test("a missing status is uncompletable; a short header is answered with IOERR", () => {
  withQueue((c) => {
    header(c, HDR, VIRTIO_BLK_T_IN, 0);
    let r = parse(c, [hdr, { gpa: DATA, len: 512 }]);
    assert.equal(r.err, "NoStatus");
    assert.equal(requestErrorStatus("NoStatus"), REQUEST_BROKEN);
    assert.throws(() => new VirtioBlkRequest(blkRequestLimits({ capacity: 8 })).writeStatus(0));
    r = parse(c, [{ gpa: HDR, len: 15 }, status]);
    assert.equal(r.err, "HeaderTooShort");
    assert.equal(r.req.statusAddr, c.tm.mem.hostAddr(STATUS, 1));
    r = parse(c, [{ gpa: HDR, len: 8 }, { gpa: HDR + 8, len: 7 }, status]);
    assert.equal(r.err, "HeaderTooShort");
    assert.equal(new RequestError("HeaderTooShort", 1).status, VIRTIO_BLK_S_IOERR);
    r.req.writeStatus(VIRTIO_BLK_S_IOERR);
    assert.equal(c.tm.view(STATUS, 1).getUint8(0), VIRTIO_BLK_S_IOERR);
  });
});

Deno.test("a chain with an unusable buffer: IOERR in a writable last byte, else no status", () => {
  withQueue((c) => {
    header(c, HDR, VIRTIO_BLK_T_IN, 0);
    c.tm.view(STATUS, 1).setUint8(0, 0xff);
    // data outside guest memory, status fine: answerable
    let r = parse(c, [hdr, { gpa: 0x1000, len: 512, write: true }, status]);
    assert.equal(r.err, "BadDescriptor");
    assert.equal(requestErrorStatus("BadDescriptor"), VIRTIO_BLK_S_IOERR);
    assert.equal(r.req.statusAddr, c.tm.mem.hostAddr(STATUS, 1));
    r.req.writeStatus(VIRTIO_BLK_S_IOERR);
    assert.equal(c.tm.view(STATUS, 1).getUint8(0), VIRTIO_BLK_S_IOERR);
    // zero-length data, readable after writable: answerable
    r = parse(c, [hdr, { gpa: DATA, len: 0, write: true }, status]);
    assert.equal(r.err, "BadDescriptor");
    r = parse(c, [hdr, { gpa: DATA, len: 512, write: true }, { gpa: DATA, len: 8 }, status]);
    assert.equal(r.err, "BadDescriptor");
    // the status itself unusable: zero length, read-only after writable, outside memory
    r = parse(c, [hdr, { gpa: DATA, len: 512, write: true }, { ...status, len: 0 }]);
    assert.equal(r.err, "NoStatus");
    r = parse(c, [hdr, { gpa: DATA, len: 512, write: true }, { gpa: STATUS, len: 1 }]);
    assert.equal(r.err, "NoStatus");
    r = parse(c, [hdr, { gpa: 0x1000, len: 512, write: true }, {
      gpa: 0x2000,
      len: 1,
      write: true,
    }]);
    assert.equal(r.err, "NoStatus");
  });
});

Deno.test("IN/OUT validation: length, alignment, range and overflow, read-only", () => {
  withQueue((c) => {
    const io = (type: number, sector: bigint | number, len: number, o = {}) => {
      header(c, HDR, type, sector);
      const data: Buf = { gpa: DATA, len, write: type === VIRTIO_BLK_T_IN };
      return parse(c, [hdr, data, status], o).err;
    };
    assert.equal(io(VIRTIO_BLK_T_IN, 0, 1000), "BadLength");
    assert.equal(io(VIRTIO_BLK_T_OUT, 0, 513), "BadLength");
    assert.equal(io(VIRTIO_BLK_T_IN, CAPACITY - 2, 1024), null, "ends exactly at capacity");
    assert.equal(io(VIRTIO_BLK_T_IN, CAPACITY - 1, 1024), "OutOfRange");
    assert.equal(io(VIRTIO_BLK_T_OUT, CAPACITY, 512), "OutOfRange");
    assert.equal(io(VIRTIO_BLK_T_IN, 1n << 63n, 512), "OutOfRange");
    assert.equal(io(VIRTIO_BLK_T_IN, (1n << 64n) - 1n, 512), "OutOfRange", "sector + len wraps");
    assert.equal(io(VIRTIO_BLK_T_IN, 2 ** 53 - 1, 512), "OutOfRange");
    const big = { capacity: 2 ** 52 };
    assert.equal(io(VIRTIO_BLK_T_IN, 2 ** 52 - 1, 512, big), null);
    assert.equal(io(VIRTIO_BLK_T_IN, 2 ** 52 - 1, 1024, big), "OutOfRange");
    assert.equal(io(VIRTIO_BLK_T_OUT, 0, 512, { readOnly: true }), "ReadOnly");
    assert.equal(io(VIRTIO_BLK_T_IN, 0, 512, { readOnly: true }), null);
    assert.equal(io(VIRTIO_BLK_T_IN, 1, 4096, { blkSize: 4096 }), "Unaligned");
    assert.equal(io(VIRTIO_BLK_T_IN, 8, 512, { blkSize: 4096 }), "BadLength");
    assert.equal(io(VIRTIO_BLK_T_IN, 8, 8192, { blkSize: 4096 }), null);
    for (const k of ["BadLength", "OutOfRange", "ReadOnly", "Unaligned"] as const) {
      assert.equal(requestErrorStatus(k), VIRTIO_BLK_S_IOERR);
    }
  });
});

Deno.test("seg_max bounds the data segments", () => {
  withQueue((c) => {
    header(c, HDR, VIRTIO_BLK_T_IN, 0);
    const three: Buf[] = [0, 1, 2].map((k) => ({ gpa: DATA + k * 0x1000, len: 512, write: true }));
    assert.equal(parse(c, [hdr, ...three, status], { segMax: 2 }).err, "TooManySegments");
    assert.equal(parse(c, [hdr, ...three, status], { segMax: 3 }).err, null);
    header(c, HDR, VIRTIO_BLK_T_OUT, 0);
    const out: Buf[] = three.map((b) => ({ ...b, write: false }));
    assert.equal(parse(c, [hdr, ...out, status], { segMax: 2 }).err, "TooManySegments");
  });
});

Deno.test("FLUSH, GET_ID and unknown types", () => {
  withQueue((c) => {
    header(c, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert.equal(parse(c, [hdr, status]).err, null);
    assert.equal(parse(c, [hdr, status], { flush: false }).err, "Unsupported");
    header(c, HDR, 99, 0);
    assert.equal(parse(c, [hdr, status]).err, "Unsupported");
    assert.equal(requestErrorStatus("Unsupported"), VIRTIO_BLK_S_UNSUPP);
    header(c, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let r = parse(c, [hdr, { gpa: DATA, len: 21, write: true }]);
    assert.equal(r.err, null);
    assert.equal(r.req.inLen, 20);
    assert.equal(writeBlkId(r.req, blkIdBytes("disk-serial")), 20);
    assert.equal(new TextDecoder().decode(c.tm.mem.bytes(DATA, 11)!), "disk-serial");
    r = parse(c, [hdr, { gpa: DATA + 0x100, len: 8, write: true }, status]);
    assert.equal(r.req.inLen, 8);
    assert.equal(writeBlkId(r.req, blkIdBytes("0123456789")), 8);
    assert.equal(new TextDecoder().decode(c.tm.mem.bytes(DATA + 0x100, 9)!), "01234567\0");
  });
});

function segment(c: Ctx, gpa: number, sector: bigint | number, num: number, flags: number): void {
  const dv = c.tm.view(gpa, 16);
  dv.setBigUint64(0, BigInt(sector), true);
  dv.setUint32(8, num, true);
  dv.setUint32(12, flags, true);
}

Deno.test("DISCARD / WRITE_ZEROES segments", () => {
  withQueue((c) => {
    const dz = {
      discard: { maxSectors: 256, maxSeg: 2, sectorAlignment: 1 },
      writeZeroes: { maxSectors: 128, maxSeg: 1, mayUnmap: true },
    };
    header(c, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(c, SEGS, 100, 50, 0);
    segment(c, SEGS + 16, CAPACITY - 256, 256, 0);
    const two: Buf = { gpa: SEGS, len: 32 };
    let r = parse(c, [hdr, two, status], dz);
    assert.equal(r.err, null);
    assert.equal(r.req.rangeCount, 2);
    assert.deepEqual([r.req.rangeSector[0], r.req.rangeSectors[0]], [100, 50]);
    assert.deepEqual([r.req.rangeSector[1], r.req.rangeSectors[1]], [CAPACITY - 256, 256]);
    // a segment split across two descriptors
    r = parse(c, [hdr, { gpa: SEGS, len: 5 }, { gpa: SEGS + 5, len: 27 }, status], dz);
    assert.equal(r.err, null);
    assert.equal(r.req.rangeSectors[1], 256);
    assert.equal(parse(c, [hdr, two, status]).err, "Unsupported", "discard not offered");
    assert.equal(parse(c, [hdr, two, status], { ...dz, readOnly: true }).err, "ReadOnly");
    assert.equal(parse(c, [hdr, { gpa: SEGS, len: 24 }, status], dz).err, "BadSegments");
    assert.equal(parse(c, [hdr, status], dz).err, "BadSegments");
    assert.equal(
      parse(c, [hdr, { gpa: SEGS, len: 48 }, status], dz).err,
      "TooManySegments",
    );
    segment(c, SEGS, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert.equal(parse(c, [hdr, { gpa: SEGS, len: 16 }, status], dz).err, "UnsupportedFlags");
    assert.equal(requestErrorStatus("UnsupportedFlags"), VIRTIO_BLK_S_UNSUPP);
    segment(c, SEGS, 0, 257, 0);
    assert.equal(parse(c, [hdr, { gpa: SEGS, len: 16 }, status], dz).err, "TooLarge");
    segment(c, SEGS, CAPACITY - 1, 2, 0);
    assert.equal(parse(c, [hdr, { gpa: SEGS, len: 16 }, status], dz).err, "OutOfRange");
    segment(c, SEGS, (1n << 64n) - 1n, 2, 0);
    assert.equal(parse(c, [hdr, { gpa: SEGS, len: 16 }, status], dz).err, "OutOfRange");

    header(c, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(c, SEGS, 64, 128, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    r = parse(c, [hdr, { gpa: SEGS, len: 16 }, status], dz);
    assert.equal(r.err, null);
    assert.equal(r.req.rangeUnmap[0], 1);
    assert.equal(parse(c, [hdr, two, status], dz).err, "TooManySegments");
    segment(c, SEGS, 64, 8, 0x2);
    assert.equal(parse(c, [hdr, { gpa: SEGS, len: 16 }, status], dz).err, "UnsupportedFlags");
    assert.equal(parse(c, [hdr, { gpa: SEGS, len: 16 }, status]).err, "Unsupported");
  });
});

Deno.test("a request's I/O vector starts small, grows once to what a request needs, then stays", () => {
  withQueue((c) => {
    const limits = blkRequestLimits({ capacity: CAPACITY, segMax: 1022 });
    const req = new VirtioBlkRequest(limits);
    assert.ok(req.qiov.capacity <= 16, `a fresh slot holds ${req.qiov.capacity} iovecs, not 1022`);
    const run = (n: number) => {
      header(c, HDR, VIRTIO_BLK_T_IN, 0);
      const data: Buf[] = Array.from({ length: n }, (_, k) => ({
        gpa: DATA + 512 * k,
        len: 512,
        write: true,
      }));
      c.drv.add([hdr, ...data, status]);
      const chain = c.vq.pop()!;
      const err = parseBlkRequest(chain, c.tm.mem, limits, req);
      c.vq.push(chain.head, 1);
      return err;
    };
    assert.equal(run(40), null);
    assert.equal(req.qiov.niov, 40);
    assert.equal(req.qiov.size, 40 * 512);
    const grown = req.qiov.capacity, addr = req.qiov.iovAddr;
    assert.ok(grown >= 40 && grown <= 1022);
    assert.equal(run(40), null);
    assert.equal(run(3), null);
    assert.equal(req.qiov.iovAddr, addr, "warm: the same iovec array is reused");
    assert.equal(req.qiov.capacity, grown);
    assert.equal(req.qiov.base(2), c.tm.mem.hostAddr(DATA + 1024, 512));
  });
});

Deno.test("IN/OUT data over VIRTIO_BLK_MAX_REQUEST_BYTES is TooLarge: the used length stays a true u32", () => {
  const GIB = 2 ** 30;
  // A sparse 1 GiB region: nothing here touches the data pages.
  const tm = new TestMemory([
    { gpa: A, size: 0x100000 },
    { gpa: 0x4000_0000, size: GIB },
  ]);
  try {
    const l = ringLayout(A, 64);
    const drv = new GuestDriver(tm, 64, l);
    const vq = new Virtqueue({
      mem: tm.mem,
      size: 64,
      desc: tm.uva(l.desc),
      avail: tm.uva(l.avail),
      used: tm.uva(l.used),
    });
    const c = { tm, drv, vq };
    const big = { capacity: 2 ** 40 };
    const io = (type: number, lens: number[]) => {
      header(c, HDR, type, 0);
      const data = lens.map((len) => ({ gpa: 0x4000_0000, len, write: type === VIRTIO_BLK_T_IN }));
      return parse(c, [hdr, ...data, status], big);
    };
    // Five 1 GiB buffers (u32 lengths each): 5 GiB, whose used length
    // (5 GiB + 1) a 32-bit used element would have truncated to 1 GiB + 1.
    let r = io(VIRTIO_BLK_T_IN, [GIB, GIB, GIB, GIB, GIB]);
    assert.equal(r.err, "TooLarge", `accepted; used len ${drv.used(0).len}`);
    assert.equal(drv.used(0).len, 1);
    assert.equal(requestErrorStatus("TooLarge"), VIRTIO_BLK_S_IOERR);
    r = io(VIRTIO_BLK_T_OUT, [GIB, GIB, GIB]);
    assert.equal(r.err, "TooLarge", "a 3 GiB write would come back short from pwritev");
    // The limit itself is served, one sector more is not.
    const max = VIRTIO_BLK_MAX_REQUEST_BYTES;
    r = io(VIRTIO_BLK_T_IN, [GIB, max - GIB]);
    assert.equal(r.err, null);
    assert.equal(drv.used(2).len, max + 1);
    assert.equal(io(VIRTIO_BLK_T_IN, [GIB, max - GIB + 512]).err, "TooLarge");
    // Lengths past 2^31 and 2^32 are still checked for whole sectors first.
    assert.equal(io(VIRTIO_BLK_T_IN, [GIB, GIB, 101]).err, "BadLength");
    assert.equal(io(VIRTIO_BLK_T_OUT, [GIB, GIB, GIB, GIB, 100]).err, "BadLength");
    assert.equal(io(VIRTIO_BLK_T_OUT, [GIB, GIB, GIB, GIB, 512]).err, "TooLarge");
  } finally {
    tm.close();
  }
});

// ---- buffers spanning guest-physically adjacent regions (issue 10 section 3) ----
//
// Memory hotplug (and a VMM that splits RAM at 4 GiB) gives adjacent regions
// whose host mappings are not adjacent: QEMU's virtqueue_map_desc and
// libvhost-user split a descriptor that spans them into one iovec per region.
// TestMemory puts a PROT_NONE guard page after each region's mapping, so a
// request that ran on from the first region's host address would fault here.

const ADJ_A = 0x100000, ADJ_B = 0x200000, ADJ_C = 0x800000; // A, B adjacent; hole after B

function withAdjacent(fn: (c: Ctx) => void): void {
  withQueue(fn, [
    { gpa: ADJ_A, size: 0x100000, uva: 0x7f4400000000 },
    { gpa: ADJ_B, size: 0x100000, uva: 0x7f2200000000 },
    { gpa: ADJ_C, size: 0x10000, uva: 0x7f3300000000 },
  ], false);
}

/** Guest bytes [gpa, gpa+len) read through each region they lie in (never across). */
function guestBytes(c: Ctx, gpa: number, len: number): Uint8Array {
  const out = new Uint8Array(len);
  for (let done = 0; done < len;) {
    const g = gpa + done;
    const r = c.tm.regions.find((r) => g >= r.gpa && g < r.gpa + r.size)!;
    const n = Math.min(len - done, r.gpa + r.size - g);
    out.set(c.tm.mem.bytes(g, n)!, done);
    done += n;
  }
  return out;
}

function setGuestBytes(c: Ctx, gpa: number, data: Uint8Array): void {
  for (let done = 0; done < data.length;) {
    const g = gpa + done;
    const r = c.tm.regions.find((r) => g >= r.gpa && g < r.gpa + r.size)!;
    const n = Math.min(data.length - done, r.gpa + r.size - g);
    c.tm.mem.bytes(g, n)!.set(data.subarray(done, done + n));
    done += n;
  }
}

function pattern(len: number, seed: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed + (i >> 8)) & 0xff;
  return b;
}

Deno.test("adjacent regions: a data buffer spanning them is split, written and read through both", () => {
  withAdjacent((c) => {
    const img = memfdCreate("image");
    try {
      ftruncate(img, CAPACITY * 512);
      const st = { gpa: ADJ_C + 0x100, len: 1, write: true };
      const hdrAt = ADJ_C;
      const data = ADJ_B - 1024; // 1024 bytes in A, 3072 in B
      // OUT: the guest's bytes, taken from both regions, land in the image
      const out = pattern(4096, 7);
      setGuestBytes(c, data, out);
      header(c, hdrAt, VIRTIO_BLK_T_OUT, 8);
      let r = parse(c, [{ gpa: hdrAt, len: 16 }, { gpa: data, len: 4096 }, st]);
      assert.equal(r.err, null);
      assert.equal(r.req.qiov.niov, 2, "one iovec per region");
      assert.equal(r.req.qiov.base(0), c.tm.mem.hostAddr(data, 1024));
      assert.equal(r.req.qiov.len(0), 1024);
      assert.equal(r.req.qiov.base(1), c.tm.mem.hostAddr(ADJ_B, 3072));
      assert.equal(r.req.qiov.len(1), 3072);
      assert.equal(pwritevAt(img, r.req.qiov.iovAddr, r.req.qiov.niov, 8 * 512), 4096);
      const back = new Uint8Array(4096);
      assert.equal(pread(img, back, 8 * 512), 4096);
      assert.deepEqual(back, out);
      // IN: the image's bytes land in both regions; data and status in one descriptor
      const inp = pattern(4096, 99);
      pwrite(img, inp, 16 * 512);
      setGuestBytes(c, data, new Uint8Array(4097).fill(0xee));
      header(c, hdrAt, VIRTIO_BLK_T_IN, 16);
      r = parse(c, [{ gpa: hdrAt, len: 16 }, { gpa: data, len: 4097, write: true }]);
      assert.equal(r.err, null);
      assert.equal(r.req.qiov.niov, 2);
      assert.equal(r.req.inLen, 4096);
      assert.equal(r.req.statusAddr, c.tm.mem.hostAddr(data + 4096, 1), "status in B");
      assert.equal(preadvAt(img, r.req.qiov.iovAddr, r.req.qiov.niov, 16 * 512), 4096);
      r.req.writeStatus(VIRTIO_BLK_S_OK);
      assert.deepEqual(guestBytes(c, data, 4096), inp);
      assert.equal(guestBytes(c, data + 4096, 1)[0], VIRTIO_BLK_S_OK);
      assert.equal(guestBytes(c, data - 1, 1)[0], 0, "nothing before the buffer");
      assert.equal(guestBytes(c, data + 4097, 1)[0], 0, "nothing after it");
    } finally {
      close(img);
    }
  });
});

Deno.test("adjacent regions: a header spanning them is read piecewise", () => {
  withAdjacent((c) => {
    const hv = new DataView(new ArrayBuffer(16));
    hv.setUint32(0, VIRTIO_BLK_T_IN, true);
    hv.setBigUint64(8, 0x123n, true);
    setGuestBytes(c, ADJ_B - 8, new Uint8Array(hv.buffer)); // type in A, sector in B
    const r = parse(c, [
      { gpa: ADJ_B - 8, len: 16 },
      { gpa: ADJ_A + 0x40000, len: 513, write: true },
    ]);
    assert.equal(r.err, null);
    assert.equal(r.req.type, VIRTIO_BLK_T_IN);
    assert.equal(r.req.sector, 0x123);
    // header and write data in one readable descriptor spanning A and B
    hv.setUint32(0, VIRTIO_BLK_T_OUT, true);
    setGuestBytes(c, ADJ_B - 4, new Uint8Array(hv.buffer));
    const w = parse(c, [
      { gpa: ADJ_B - 4, len: 16 + 512 },
      { gpa: ADJ_C, len: 1, write: true },
    ]);
    assert.equal(w.err, null);
    assert.equal(w.req.type, VIRTIO_BLK_T_OUT);
    assert.equal(w.req.sector, 0x123);
    assert.equal(w.req.qiov.niov, 1, "the data lies in B only");
    assert.equal(w.req.qiov.base(0), c.tm.mem.hostAddr(ADJ_B + 12, 512));
  });
});

Deno.test("adjacent regions: a span that runs on into a hole stays IOERR", () => {
  withAdjacent((c) => {
    header(c, ADJ_C, VIRTIO_BLK_T_IN, 0);
    const st = { gpa: ADJ_C + 0x100, len: 1, write: true };
    c.tm.view(st.gpa, 1).setUint8(0, 0xff);
    // from A through all of B into the hole after B
    const r = parse(c, [{ gpa: ADJ_C, len: 16 }, {
      gpa: ADJ_B - 512,
      len: 512 + 0x100000 + 512,
      write: true,
    }, st]);
    assert.equal(r.err, "BadDescriptor");
    r.req.writeStatus(requestErrorStatus("BadDescriptor"));
    assert.equal(c.tm.view(st.gpa, 1).getUint8(0), VIRTIO_BLK_S_IOERR);
    // a status descriptor running from B into the hole: no status byte
    const n = parse(c, [{ gpa: ADJ_C, len: 16 }, { gpa: ADJ_B + 0x100000 - 512, len: 1024 }]);
    assert.equal(n.err, "NoStatus");
    // an unusable buffer elsewhere, status descriptor spanning A and B: IOERR in B
    const s = parse(c, [{ gpa: 0x1000, len: 16 }, { gpa: ADJ_B - 4, len: 8, write: true }]);
    assert.equal(s.err, "BadDescriptor");
    assert.equal(s.req.statusAddr, c.tm.mem.hostAddr(ADJ_B + 3, 1));
  });
});

Deno.test("adjacent regions: a split beyond seg_max is TooManySegments (IOERR)", () => {
  withAdjacent((c) => {
    header(c, ADJ_C, VIRTIO_BLK_T_IN, 0);
    const st = { gpa: ADJ_C + 0x100, len: 1, write: true };
    const span = { gpa: ADJ_B - 512, len: 1024, write: true };
    // two descriptors' worth of iovecs: fits seg_max 2
    let r = parse(c, [{ gpa: ADJ_C, len: 16 }, span, st], { segMax: 2 });
    assert.equal(r.err, null);
    assert.equal(r.req.qiov.niov, 2);
    // two descriptors, three iovecs: beyond seg_max 2
    r = parse(c, [
      { gpa: ADJ_C, len: 16 },
      span,
      { gpa: ADJ_A + 0x40000, len: 512, write: true },
      st,
    ], {
      segMax: 2,
    });
    assert.equal(r.err, "TooManySegments");
    assert.equal(requestErrorStatus("TooManySegments"), VIRTIO_BLK_S_IOERR);
    assert.equal(r.req.statusAddr, c.tm.mem.hostAddr(st.gpa, 1));
  });
});
