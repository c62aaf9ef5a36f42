// Property-based tests of the chain walker: arbitrary descriptor tables,
// indirect tables and avail rings in guard-paged guest memory. pop() must never
// throw, every buffer it returns must lie inside one region, a broken ring must
// carry a typed reason, and the result must agree with a simple reference
// walker written independently here. R0 and R1 are adjacent: a buffer that
// spans them is split into one entry per region (issue 10 section 3).
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  blkRequestLimits,
  DescriptorChainError,
  parseBlkRequest,
  REQUEST_BROKEN,
  requestErrorStatus,
  VirtioBlkRequest,
  Virtqueue,
  VirtqueueError,
} from "../../virtio/mod.ts";
import { ringLayout, TestMemory } from "./guest_driver.ts";

const R0 = 0x10000, R1 = 0x20000, R2 = 0x100000000; // R0 and R1 are adjacent
const SIZES = [0x10000, 0x4000, 0x1000];
const BASES = [R0, R1, R2];
const TABLE = 16; // descriptors written to the table (queue size <= 16)
const INDIRECT = R0 + 0x8000; // an area of random indirect descriptors
const INDIRECT_N = 8;

const tm = new TestMemory([
  { gpa: R0, size: SIZES[0], uva: 0x7e0000000000 },
  { gpa: R1, size: SIZES[1], uva: 0x7e0000100000 },
  { gpa: R2, size: SIZES[2], uva: 0x7d0000000000 },
]);
addEventListener("unload", () => tm.close());

const addrArb = fc.oneof(
  fc.tuple(fc.integer({ min: 0, max: 2 }), fc.integer({ min: -48, max: 0x10030 }))
    .map(([r, off]) => BigInt(Math.max(0, BASES[r] + off))),
  fc.integer({ min: 0, max: INDIRECT_N - 1 }).map((k) => BigInt(INDIRECT + 16 * k)),
  fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
);
const lenArb = fc.oneof(
  fc.integer({ min: 0, max: 64 }),
  fc.integer({ min: 0, max: 0x11000 }),
  fc.constantFrom(0, 1, 16, 32, 48, 0xffffffff),
);
const descArb = fc.record({
  addr: addrArb,
  len: lenArb,
  flags: fc.oneof(fc.integer({ min: 0, max: 7 }), fc.integer({ min: 0, max: 0xffff })),
  next: fc.oneof(fc.integer({ min: 0, max: TABLE + 2 }), fc.integer({ min: 0, max: 0xffff })),
});
const caseArb = fc.record({
  sizeLog: fc.integer({ min: 0, max: 4 }),
  table: fc.array(descArb, { minLength: TABLE, maxLength: TABLE }),
  indirect: fc.array(descArb, { minLength: INDIRECT_N, maxLength: INDIRECT_N }),
  ring: fc.array(
    fc.oneof(
      { arbitrary: fc.integer({ min: 0, max: TABLE - 1 }), weight: 4 },
      { arbitrary: fc.integer({ min: 0, max: 0xffff }), weight: 1 },
    ),
    { minLength: TABLE, maxLength: TABLE },
  ),
  lastAvail: fc.oneof(fc.integer({ min: 0, max: 4 }), fc.integer({ min: 0, max: 0xffff })),
  availAhead: fc.oneof(
    { arbitrary: fc.integer({ min: 0, max: 17 }), weight: 4 },
    { arbitrary: fc.integer({ min: 0, max: 0xffff }), weight: 1 },
  ),
  indirectDesc: fc.boolean(),
  maxChain: fc.option(fc.integer({ min: 1, max: 24 }), { nil: undefined }),
  pushEvery: fc.integer({ min: 1, max: 3 }),
});
type Case = typeof caseArb extends fc.Arbitrary<infer T> ? T : never;
type Desc = Case["table"][number];

function writeDesc(gpa: number, d: Desc): void {
  const dv = tm.view(gpa, 16);
  dv.setBigUint64(0, d.addr, true);
  dv.setUint32(8, d.len >>> 0, true);
  dv.setUint16(12, d.flags, true);
  dv.setUint16(14, d.next, true);
}

function readDesc(gpa: number): Desc {
  const dv = tm.view(gpa, 16);
  return {
    addr: dv.getBigUint64(0, true),
    len: dv.getUint32(8, true),
    flags: dv.getUint16(12, true),
    next: dv.getUint16(14, true),
  };
}

/** Which region [gpa, gpa+len) lies in, or -1 (len 0 counts as 1). */
function regionOf(gpa: bigint, len: number): number {
  for (let r = 0; r < 3; r++) {
    const s = BigInt(BASES[r]), e = s + BigInt(SIZES[r]);
    if (gpa >= s && gpa < e && gpa + BigInt(len) <= e) return r;
  }
  return -1;
}

type RefBuf = { gpa: bigint; len: number; write: boolean };

/**
 * [gpa, gpa+len) cut at region boundaries, or null when a byte of it is in no
 * region (QEMU's virtqueue_map_desc loop over dma_memory_map).
 */
function piecesOf(gpa: bigint, len: number): { gpa: bigint; len: number }[] | null {
  const out: { gpa: bigint; len: number }[] = [];
  let g = gpa, left = BigInt(len);
  while (left > 0n) {
    const r = regionOf(g, 1);
    if (r < 0) return null;
    const room = BigInt(BASES[r] + SIZES[r]) - g;
    const n = room < left ? room : left;
    out.push({ gpa: g, len: Number(n) });
    g += n;
    left -= n;
  }
  return out;
}

/**
 * What the reference walk found: the buffers, or (a buffer error) the first
 * unusable buffer's kind and the status byte's address when the last
 * descriptor is a valid device-writable buffer.
 */
type RefChain = { bufs: RefBuf[]; error: string | null; status: bigint | null; split: number };

/** Reference walker: the rules of virtio/descriptor_chain.ts, written plainly. */
function referenceWalk(
  head: number,
  size: number,
  indirectOk: boolean,
  cap: number,
): RefChain | string {
  if (head >= size) return "HeadOutOfRange";
  const bufs: RefBuf[] = [];
  let error: string | null = null;
  let split = 0; // descriptors spanning adjacent regions
  let tableGpa = BigInt(tm.regions[0].gpa), tableLen = size, inIndirect = false;
  let i = head, seen = 0;
  while (true) {
    if (i >= tableLen) return "NextOutOfRange";
    if (++seen > tableLen) return "Loop";
    const d = readDesc(Number(tableGpa) + 16 * i);
    if (d.flags & 4) {
      if (inIndirect) return "NestedIndirect";
      if (!indirectOk) return "IndirectNotNegotiated";
      if (d.flags & 1) return "IndirectWithNext";
      if (d.len === 0 || d.len % 16) return "IndirectBadLength";
      if (regionOf(d.addr, d.len) < 0) return "IndirectOutOfRange";
      tableGpa = d.addr;
      tableLen = d.len / 16;
      inIndirect = true;
      i = 0;
      seen = 0;
      continue;
    }
    const write = (d.flags & 2) !== 0;
    const pieces = d.len === 0 ? null : piecesOf(d.addr, d.len);
    if (error === null) {
      if (d.len === 0) error = "ZeroLength";
      else if (pieces === null) error = "OutOfRange";
      else {
        if (pieces.length > 1) split++;
        for (const p of pieces) {
          if (bufs.length >= cap) error = "TooLong";
          else if (!write && bufs.some((b) => b.write)) error = "BadOrder";
          else {
            bufs.push({ gpa: p.gpa, len: p.len, write });
            continue;
          }
          break;
        }
      }
    }
    if (!(d.flags & 1)) {
      if (error === null) return { bufs, error, status: null, split };
      const ok = write && pieces !== null;
      return { bufs, error, status: ok ? d.addr + BigInt(d.len) - 1n : null, split };
    }
    i = d.next;
  }
}

function setupCase(c: Case): { vq: Virtqueue; size: number } {
  const size = 1 << c.sizeLog;
  const l = ringLayout(R0, size);
  tm.mem.bytes(R0, 0x9000)!.fill(0);
  c.table.forEach((d, k) => writeDesc(R0 + 16 * k, d));
  c.indirect.forEach((d, k) => writeDesc(INDIRECT + 16 * k, d));
  // the desc table is only `size` long: the avail ring follows it, so rewrite it after
  const avail = tm.view(l.avail, 4 + 2 * size + 2);
  avail.setUint16(2, (c.lastAvail + c.availAhead) & 0xffff, true);
  for (let k = 0; k < size; k++) avail.setUint16(4 + 2 * k, c.ring[k], true);
  tm.view(l.used, 4 + 8 * size + 2).setUint32(0, 0, true);
  const vq = new Virtqueue({
    mem: tm.mem,
    size,
    desc: l.desc,
    avail: l.avail,
    used: l.used,
    addressSpace: "guest",
    indirectDesc: c.indirectDesc,
    lastAvailIdx: c.lastAvail,
    maxChainLength: c.maxChain,
    eventIdx: true,
  });
  return { vq, size };
}

const limits = blkRequestLimits({
  capacity: 4096,
  segMax: 8,
  discard: { maxSectors: 64, maxSeg: 4, sectorAlignment: 1 },
  writeZeroes: { maxSectors: 64, maxSeg: 2, mayUnmap: true },
});
const req = new VirtioBlkRequest(limits);
/** Outcomes seen, so the tests can check the generators reach the interesting cases. */
const seen = new Map<string, number>();
const count = (k: string) => seen.set(k, (seen.get(k) ?? 0) + 1);

function checkCase(c: Case): void {
  const { vq, size } = setupCase(c);
  const l = ringLayout(R0, size);
  const popped = new Set<number>();
  const inFlight: number[] = [];
  let last = c.lastAvail;
  for (let n = 0; n < 40; n++) {
    // what the reference expects for the next entry
    const availIdx = tm.view(l.avail + 2, 2).getUint16(0, true);
    const pending = (availIdx - last) & 0xffff;
    const head = tm.view(l.avail + 4 + 2 * (last % size), 2).getUint16(0, true);
    const ref = pending === 0 || pending > size
      ? null
      : referenceWalk(head, size, c.indirectDesc, c.maxChain ?? size);
    const chain = vq.pop();
    if (chain === null) {
      if (pending === 0) {
        assert.ok(!vq.broken);
        break;
      }
      assert.ok(vq.broken, "null from a non-empty ring means broken");
      const reason = vq.brokenReason;
      assert.ok(reason instanceof DescriptorChainError || reason instanceof VirtqueueError);
      count(reason.kind);
      if (pending > size) assert.equal(reason.kind, "AvailIdxJump");
      else if (typeof ref === "string") assert.equal(reason.kind, ref);
      else assert.equal(reason.kind, "HeadInUse");
      break;
    }
    assert.ok(
      ref !== null && typeof ref === "object",
      `walker accepted what the reference rejects: ${ref}`,
    );
    assert.equal(chain.head, head);
    assert.ok(!inFlight.includes(head));
    assert.equal(chain.error, ref.error);
    if (ref.error !== null) {
      count(ref.error);
      count(ref.status === null ? "error:no-status" : "error:status");
      const want = ref.status === null ? -1 : tm.mem.hostAddr(Number(ref.status), 1);
      assert.equal(chain.statusAddr, want);
      if (want >= 0) {
        assert.ok(tm.containsHost(chain.statusAddr, 1));
        assert.equal(tm.mem.regionHostAddr(chain.statusRegion) + chain.statusOffset, want);
      }
    } else {
      count(chain.count > 1 ? "chain" : "single");
      if (ref.split > 0) count("split");
      assert.equal(chain.count, ref.bufs.length);
    }
    for (let i = 0; i < chain.count; i++) {
      assert.ok(tm.containsHost(chain.addr[i], chain.len[i]), "buffer outside the regions");
      if (ref.error !== null) continue; // the walker stops collecting at the bad buffer
      assert.equal(chain.addr[i], tm.mem.hostAddr(Number(ref.bufs[i].gpa), ref.bufs[i].len));
      assert.equal(chain.len[i], ref.bufs[i].len);
      assert.equal(chain.isWritable(i), ref.bufs[i].write);
      const r: number = chain.region[i];
      assert.equal(tm.mem.regionHostAddr(r) + chain.offset[i], chain.addr[i]);
    }
    // the parser accepts any walked chain without throwing
    const err = parseBlkRequest(chain, tm.mem, limits, req);
    count(`blk:${err}`);
    if (err === null || requestErrorStatus(err) !== REQUEST_BROKEN) {
      assert.ok(tm.containsHost(req.statusAddr, 1));
      req.writeStatus(err === null ? 0 : requestErrorStatus(err));
    }
    for (let i = 0; i < req.qiov.niov; i++) {
      assert.ok(tm.containsHost(req.qiov.base(i), req.qiov.len(i)), "qiov outside regions");
    }
    popped.add(head);
    inFlight.push(head);
    last = (last + 1) & 0xffff;
    if (n % c.pushEvery === 0) vq.push(inFlight.shift()!, req.usedLen);
  }
  // every used entry names a head that was popped
  const usedIdx = tm.view(l.used + 2, 2).getUint16(0, true);
  assert.equal(usedIdx, vq.usedIdx);
  for (let i = 0; i < Math.min(usedIdx, size); i++) {
    assert.ok(popped.has(tm.view(l.used + 4 + 8 * i, 4).getUint32(0, true)));
  }
  for (const h of inFlight) vq.push(h, 0);
  assert.equal(vq.inFlight, 0);
}

Deno.test("fuzz: pop() over arbitrary rings never throws and stays inside the regions", () => {
  seen.clear();
  fc.assert(fc.property(caseArb, checkCase), { numRuns: 3000 });
  const want = ["AvailIdxJump", "OutOfRange", "NextOutOfRange", "ZeroLength", "single"];
  // A usable status behind an unusable buffer is rare in arbitrary rings
  // (about 1 run in 3 of 3000 cases had none): the biased test below requires it.
  for (const k of [...want, "error:no-status"]) {
    assert.ok(seen.has(k), `generator never produced ${k}: ${[...seen.keys()]}`);
  }
});

Deno.test("fuzz: mostly well-formed chains (biased to valid addresses and lengths)", () => {
  const goodDesc = fc.record({
    addr: fc.oneof(
      fc.tuple(fc.integer({ min: 0, max: 2 }), fc.integer({ min: 0, max: 0xff0 }))
        .map(([r, off]) => BigInt(BASES[r] + 0xa000 * (r === 0 ? 1 : 0) + off)),
      // the end of R0, so that longer buffers span R0 and R1
      fc.integer({ min: 1, max: 0x400 }).map((k) => BigInt(R1 - k)),
    ),
    len: fc.oneof(fc.integer({ min: 1, max: 16 }), fc.constantFrom(16, 513, 1024, 4097)),
    flags: fc.constantFrom(0, 1, 2, 3, 1, 3),
    next: fc.integer({ min: 0, max: 15 }),
  });
  const arb = caseArb.chain((c) =>
    fc.record({
      table: fc.array(fc.oneof(goodDesc, goodDesc, descArb), {
        minLength: TABLE,
        maxLength: TABLE,
      }),
      indirect: fc.array(goodDesc, { minLength: INDIRECT_N, maxLength: INDIRECT_N }),
    }).map((t) => ({ ...c, ...t, availAhead: c.availAhead % 8 }))
  );
  seen.clear();
  fc.assert(fc.property(arb, checkCase), { numRuns: 3000 });
  if (Deno.env.get("FUZZ_STATS")) console.log(Object.fromEntries(seen));
  const want = ["chain", "Loop", "BadOrder", "HeadOutOfRange", "blk:NoStatus", "error:status"];
  for (const k of [...want, "split"]) {
    assert.ok(seen.has(k), `generator never produced ${k}: ${[...seen.keys()]}`);
  }
});
