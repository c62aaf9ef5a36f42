// Property-based tests of the virtio-blk request parser: arbitrary headers,
// payloads and buffer layouts (header split anywhere, buffers at region edges
// next to guard pages, buffers spanning the two adjacent regions). parseBlkRequest
// must never throw, must return the error kind an oracle derives from the
// request (the malformation it holds), and an accepted request must be
// consistent and inside guest memory.
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  blkRequestLimits,
  DescriptorChain,
  parseBlkRequest,
  type RequestErrorKind,
  requestErrorStatus,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VirtioBlkRequest,
} from "../../virtio/mod.ts";
import { TestMemory } from "./guest_driver.ts";

const REGION = 0x10000;
// Adjacent in guest-physical space (not in the host: guard pages between), so a
// buffer may span them; walkChain then hands the parser one entry per region.
const tm = new TestMemory([
  { gpa: 0, size: REGION, uva: 0x7c0000000000 },
  { gpa: REGION, size: REGION, uva: 0x7b0000000000 },
]);
/** Bytes at the start of region 1 kept for the second piece of a spanning buffer. */
const SPAN_ROOM = 0x100;
addEventListener("unload", () => tm.close());

const KINDS: ReadonlySet<string> = new Set<RequestErrorKind>([
  "NoStatus",
  "HeaderTooShort",
  "Unsupported",
  "UnsupportedFlags",
  "BadLength",
  "Unaligned",
  "OutOfRange",
  "TooManySegments",
  "BadSegments",
  "TooLarge",
  "ReadOnly",
]);

const u64 = fc.oneof(
  fc.bigInt({ min: 0n, max: 8200n }),
  fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
  fc.constantFrom((1n << 53n) - 1n, 1n << 53n, (1n << 64n) - 1n, 8191n, 8192n),
);
const segArb = fc.record({
  sector: u64,
  num: fc.oneof(fc.integer({ min: 0, max: 80 }), fc.integer({ min: 0, max: 0xffffffff })),
  flags: fc.oneof(fc.constantFrom(0, 1), fc.integer({ min: 0, max: 0xffffffff })),
});
const bufArb = fc.record({
  region: fc.integer({ min: 0, max: 1 }),
  atEnd: fc.boolean(), // place the buffer flush against the region's end (guard page)
  span: fc.oneof({ arbitrary: fc.constant(false), weight: 3 }, {
    arbitrary: fc.constant(true),
    weight: 1,
  }), // across the end of region 0 into region 1 (once a case)
  len: fc.oneof(
    fc.integer({ min: 1, max: 40 }),
    fc.constantFrom(1, 16, 17, 512, 513, 4096, 4097),
    fc.integer({ min: 1, max: 9000 }),
  ),
  write: fc.boolean(),
});
const caseArb = fc.record({
  type: fc.oneof(
    fc.constantFrom(
      VIRTIO_BLK_T_IN,
      VIRTIO_BLK_T_OUT,
      VIRTIO_BLK_T_FLUSH,
      VIRTIO_BLK_T_GET_ID,
      VIRTIO_BLK_T_DISCARD,
      VIRTIO_BLK_T_WRITE_ZEROES,
    ),
    fc.integer({ min: 0, max: 0xffffffff }),
  ),
  sector: u64,
  segs: fc.array(segArb, { maxLength: 5 }),
  bufs: fc.array(bufArb, { minLength: 1, maxLength: 8 }),
  sortWrites: fc.boolean(), // readable first (what pop() guarantees), mostly
  readOnly: fc.boolean(),
  blkSize: fc.constantFrom(512, 4096),
});
type Case = typeof caseArb extends fc.Arbitrary<infer T> ? T : never;

/** Nearly well-formed requests: header split anywhere, data in 512-byte multiples (mostly). */
const shapedArb: fc.Arbitrary<Case> = fc.record({
  base: caseArb,
  split: fc.integer({ min: 1, max: 16 }),
  data: fc.array(
    fc.record({
      region: fc.integer({ min: 0, max: 1 }),
      atEnd: fc.boolean(),
      span: fc.boolean(),
      len: fc.oneof(
        fc.integer({ min: 1, max: 8 }).map((k) => 512 * k),
        fc.integer({ min: 1, max: 4096 }),
      ),
    }),
    { maxLength: 5 },
  ),
  segSplit: fc.integer({ min: 0, max: 80 }),
  statusWithData: fc.boolean(),
  spanHeader: fc.boolean(),
  sector: fc.oneof(fc.bigInt({ min: 0n, max: 8200n }), u64),
  segs: fc.array(
    fc.record({
      sector: fc.bigInt({ min: 0n, max: 8200n }),
      num: fc.integer({ min: 0, max: 70 }),
      flags: fc.oneof(fc.constantFrom(0, 0, 1), fc.integer({ min: 0, max: 0xffffffff })),
    }),
    { minLength: 1, maxLength: 4 },
  ),
}).map(({ base, split, data, segSplit, statusWithData, spanHeader, sector, segs }) => {
  const write = base.type === VIRTIO_BLK_T_IN || base.type === VIRTIO_BLK_T_GET_ID;
  const ranges = base.type === VIRTIO_BLK_T_DISCARD || base.type === VIRTIO_BLK_T_WRITE_ZEROES;
  const no = { span: false };
  const bufs: Case["bufs"] = [];
  // the header in one buffer spanning the regions (split bytes in region 0), or split in two
  if (spanHeader) bufs.push({ region: 0, atEnd: true, len: 16, write: false, span: true });
  else {
    bufs.push({ region: 0, atEnd: false, len: split, write: false, ...no });
    if (split < 16) bufs.push({ region: 1, atEnd: false, len: 16 - split, write: false, ...no });
  }
  if (ranges) {
    const total = 16 * segs.length, cut = Math.min(segSplit, total);
    if (cut > 0) bufs.push({ region: 0, atEnd: false, len: cut, write: false, ...no });
    if (total > cut) bufs.push({ region: 1, atEnd: true, len: total - cut, write: false, ...no });
  } else {
    for (const d of data) bufs.push({ ...d, write, span: d.span && !spanHeader });
  }
  if (statusWithData && bufs[bufs.length - 1].write) bufs[bufs.length - 1].len += 1;
  else bufs.push({ region: 0, atEnd: true, len: 1, write: true, ...no });
  return { ...base, sector, segs, bufs, sortWrites: true };
});

const CAPACITY = 8192;

/** The status each kind is answered with (virtio 1.2 5.2.6: UNSUPP only for what is not supported). */
const STATUS_OF: Record<RequestErrorKind, number> = {
  NoStatus: -1,
  BadDescriptor: 1,
  HeaderTooShort: 1,
  Unsupported: 2,
  UnsupportedFlags: 2,
  BadLength: 1,
  Unaligned: 1,
  OutOfRange: 1,
  TooManySegments: 1,
  BadSegments: 1,
  TooLarge: 1,
  ReadOnly: 1,
};

/**
 * Oracle: the error kind (or null) for the request laid out as `chain`,
 * whose device-readable bytes are `stream` followed by zeroes. Written from
 * the spec's rules (5.2.6) in the parser's order of checks: status, header,
 * then per type the sector range and sizes, then the segment count.
 */
function expectedKind(
  chain: DescriptorChain,
  stream: Uint8Array,
  limits: ReturnType<typeof blkRequestLimits>,
): RequestErrorKind | null {
  if (chain.inNum === 0) return "NoStatus";
  if (chain.outLen < 16) return "HeaderTooShort";
  const readable = new Uint8Array(chain.outLen);
  readable.set(stream.subarray(0, chain.outLen));
  const rv = new DataView(readable.buffer);
  const type = rv.getUint32(0, true);
  const sector = rv.getBigUint64(8, true);
  const cap = BigInt(limits.capacity);
  // data entries: readable bytes after the 16-byte header, or writable bytes before the status
  const outEntries = () => {
    let n = 0, skip = 16;
    for (let i = 0; i < chain.outNum; i++) {
      const used = Math.min(skip, chain.len[i]);
      skip -= used;
      if (chain.len[i] - used > 0) n++;
    }
    return n;
  };
  const inEntries = () => {
    let n = 0;
    for (let i = chain.outNum; i < chain.count; i++) {
      if ((i === chain.count - 1 ? chain.len[i] - 1 : chain.len[i]) > 0) n++;
    }
    return n;
  };
  switch (type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT: {
      const write = type === VIRTIO_BLK_T_OUT;
      const dataLen = write ? chain.outLen - 16 : chain.inLen - 1;
      if (sector >= 1n << 53n) return "OutOfRange";
      if (dataLen % limits.blkSize !== 0) return "BadLength";
      if (sector % BigInt(limits.blkSize / 512) !== 0n) return "Unaligned";
      if (sector + BigInt(dataLen / 512) > cap) return "OutOfRange";
      if (write && limits.readOnly) return "ReadOnly";
      if ((write ? outEntries() : inEntries()) > limits.segMax) return "TooManySegments";
      return null;
    }
    case VIRTIO_BLK_T_FLUSH:
      return null;
    case VIRTIO_BLK_T_GET_ID:
      return inEntries() > limits.segMax ? "TooManySegments" : null;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES: {
      const discard = type === VIRTIO_BLK_T_DISCARD;
      if (limits.readOnly) return "ReadOnly";
      const dataLen = chain.outLen - 16;
      if (dataLen === 0 || dataLen % 16 !== 0) return "BadSegments";
      const n = dataLen / 16;
      if (n > (discard ? limits.maxDiscardSeg : limits.maxWriteZeroesSeg)) {
        return "TooManySegments";
      }
      for (let i = 0; i < n; i++) {
        const s = rv.getBigUint64(16 + 16 * i, true);
        const num = rv.getUint32(24 + 16 * i, true);
        const flags = rv.getUint32(28 + 16 * i, true);
        if ((flags & ~1) !== 0 || (discard && flags !== 0)) return "UnsupportedFlags";
        if (num > (discard ? limits.maxDiscardSectors : limits.maxWriteZeroesSectors)) {
          return "TooLarge";
        }
        if (s >= 1n << 53n || s + BigInt(num) > cap) return "OutOfRange";
      }
      return null;
    }
    default:
      return "Unsupported";
  }
}
/** Outcomes seen, so the test can check the generator reaches accepted requests. */
const seen = new Map<string, number>();

function run(c: Case): void {
  const limits = blkRequestLimits({
    capacity: CAPACITY,
    segMax: 4,
    readOnly: c.readOnly,
    blkSize: c.blkSize,
    discard: { maxSectors: 64, maxSeg: 3, sectorAlignment: 1 },
    writeZeroes: { maxSectors: 32, maxSeg: 2, mayUnmap: false },
  });
  const req = new VirtioBlkRequest(limits);
  // the device-readable stream: header then discard segments
  const stream = new Uint8Array(16 + 16 * c.segs.length);
  const dv = new DataView(stream.buffer);
  dv.setUint32(0, c.type, true);
  dv.setBigUint64(8, c.sector, true);
  c.segs.forEach((s, i) => {
    dv.setBigUint64(16 + 16 * i, s.sector, true);
    dv.setUint32(24 + 16 * i, s.num, true);
    dv.setUint32(28 + 16 * i, s.flags, true);
  });
  const bufs = c.sortWrites
    ? [...c.bufs.filter((b) => !b.write), ...c.bufs.filter((b) => b.write)]
    : c.bufs;
  const chain = new DescriptorChain(16);
  chain.reset(3);
  let streamOff = 0;
  // buffers never overlap: from 0x100 upwards, or from the region end downwards
  const cursor = [0x100, 0x100];
  const endCursor = [REGION, REGION];
  let spanned = false;
  for (const b of bufs) {
    if (b.span && !spanned && b.len >= 2 && endCursor[0] === REGION) {
      // What walkChain makes of one descriptor across the regions' shared
      // boundary: an entry at the end of region 0, then one at the start of region 1.
      spanned = true;
      const second = Math.min(SPAN_ROOM, b.len >> 1), first = b.len - second;
      if (REGION - first < cursor[0]) continue;
      endCursor[0] = REGION - first;
      const pieces = [[0, REGION - first, first], [1, 0, second]];
      for (const [region, off, len] of pieces) {
        if (!b.write) {
          const part = stream.subarray(streamOff, streamOff + len);
          const dst = tm.mem.bytes(tm.regions[region].gpa + off, len)!;
          dst.fill(0);
          dst.set(part);
          streamOff += part.length;
        }
        if (!chain.add(tm.regions[region].host + off, len, b.write, region, off)) return;
      }
      continue;
    }
    const base = tm.regions[b.region];
    const off = b.atEnd ? endCursor[b.region] - b.len : cursor[b.region];
    if (off < cursor[b.region] || off + b.len > endCursor[b.region]) continue;
    if (b.atEnd) endCursor[b.region] = off;
    else cursor[b.region] += b.len;
    const host = base.host + off;
    if (!b.write) {
      // Past the end of the stream the device reads zeroes (not what an
      // earlier case left in memory): the oracle below assumes so.
      const part = stream.subarray(streamOff, streamOff + b.len);
      const dst = tm.mem.bytes(base.gpa + off, b.len)!;
      dst.fill(0);
      dst.set(part);
      streamOff += part.length;
    }
    if (!chain.add(host, b.len, b.write, b.region, off)) return; // out of order: pop() rejects it
  }
  const err = parseBlkRequest(chain, tm.mem, limits, req);
  assert.ok(err === null || KINDS.has(err), `unknown result ${err}`);
  // The kind must be the one the malformation calls for, not just any error.
  const want = expectedKind(chain, stream, limits);
  assert.equal(err, want, `type ${c.type}: ${err} where the request calls for ${want}`);
  if (want !== null) assert.equal(requestErrorStatus(err!), STATUS_OF[want], `status of ${want}`);
  const key = `${c.type}:${err}`;
  seen.set(key, (seen.get(key) ?? 0) + 1);
  if (spanned) seen.set(`span:${key}`, (seen.get(`span:${key}`) ?? 0) + 1);
  if (chain.inNum === 0) {
    assert.equal(err, "NoStatus");
    return;
  }
  const last = chain.count - 1;
  assert.equal(req.statusAddr, chain.addr[last] + chain.len[last] - 1);
  assert.ok(tm.containsHost(req.statusAddr, 1));
  if (chain.outLen < 16) {
    assert.equal(err, "HeaderTooShort");
    return;
  }
  assert.equal(req.type, c.type);
  req.writeStatus(err === null ? 0 : requestErrorStatus(err));
  for (let i = 0; i < req.qiov.niov; i++) {
    assert.ok(req.qiov.len(i) > 0);
    assert.ok(tm.containsHost(req.qiov.base(i), req.qiov.len(i)), "qiov outside guest memory");
  }
  if (err !== null) {
    assert.ok(requestErrorStatus(err) > 0);
    return;
  }
  const sector = Number(c.sector);
  switch (c.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT: {
      const isWrite = c.type === VIRTIO_BLK_T_OUT;
      const size = isWrite ? chain.outLen - 16 : chain.inLen - 1;
      assert.equal(req.qiov.size, size);
      assert.equal(req.inLen, isWrite ? 0 : size);
      assert.equal(req.sector, sector);
      assert.equal(size % c.blkSize, 0);
      assert.ok(c.sector * 512n + BigInt(size) <= BigInt(CAPACITY) * 512n, "beyond capacity");
      assert.ok(req.qiov.niov <= 4);
      assert.ok(!(isWrite && c.readOnly));
      break;
    }
    case VIRTIO_BLK_T_GET_ID:
      assert.equal(req.inLen, Math.min(20, chain.inLen - 1));
      break;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES: {
      assert.ok(!c.readOnly);
      const discard = c.type === VIRTIO_BLK_T_DISCARD;
      assert.ok(req.rangeCount >= 1 && req.rangeCount <= (discard ? 3 : 2));
      assert.equal(req.rangeCount * 16, chain.outLen - 16);
      for (let i = 0; i < req.rangeCount; i++) {
        const s = c.segs[i] ?? { sector: 0n, num: 0, flags: 0 }; // zeroes past the stream
        assert.equal(req.rangeSector[i], Number(s.sector));
        assert.ok(s.sector + BigInt(s.num) <= BigInt(CAPACITY));
        assert.ok(s.num <= (discard ? 64 : 32));
        assert.equal(s.flags & ~1, 0);
        if (discard) assert.equal(s.flags, 0);
      }
      break;
    }
    case VIRTIO_BLK_T_FLUSH:
      break;
    default:
      assert.fail(`unknown type ${c.type} accepted`);
  }
}

Deno.test("fuzz: parseBlkRequest never throws, and what it accepts is in range", () => {
  seen.clear();
  fc.assert(fc.property(fc.oneof(caseArb, shapedArb), run), { numRuns: 8000 });
  if (Deno.env.get("FUZZ_STATS")) console.log(Object.fromEntries(seen));
  for (const t of [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_GET_ID]) {
    assert.ok(seen.has(`${t}:null`), `no accepted request of type ${t}`);
  }
  for (const t of [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT]) {
    assert.ok(seen.has(`span:${t}:null`), `no accepted type ${t} with a spanning buffer`);
  }
  // every malformation the parser knows (BadDescriptor comes from the walker) was generated
  const reached = new Set([...seen.keys()].map((k) => k.split(":").at(-1)));
  for (const k of KINDS) assert.ok(reached.has(k), `generator never produced ${k}`);
});

Deno.test("fuzz: well-formed IN/OUT requests are accepted", () => {
  const arb = fc.record({
    write: fc.boolean(),
    sectors: fc.integer({ min: 0, max: 16 }),
    sector: fc.integer({ min: 0, max: CAPACITY }),
    split: fc.integer({ min: 1, max: 16 }),
  });
  fc.assert(
    fc.property(arb, ({ write, sectors, sector, split }) => {
      const bytes = sectors * 512;
      const c: Case = {
        type: write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN,
        sector: BigInt(sector),
        segs: [],
        bufs: [
          { region: 0, atEnd: false, len: split, write: false, span: false },
          ...(split < 16
            ? [{ region: 1, atEnd: false, len: 16 - split, write: false, span: false }]
            : []),
          ...(bytes ? [{ region: 1, atEnd: true, len: bytes, write: !write, span: false }] : []),
          { region: 0, atEnd: true, len: 1, write: true, span: false },
        ],
        sortWrites: true,
        readOnly: false,
        blkSize: 512,
      };
      const limits = blkRequestLimits({ capacity: CAPACITY, segMax: 4 });
      run(c); // consistency
      // and the same layout parsed once more must be accepted iff it fits
      const chain = new DescriptorChain(8);
      chain.reset(0);
      const off = [0x100, 0x100];
      for (const b of c.bufs) {
        const o = b.atEnd ? REGION - b.len : (off[b.region] += b.len) - b.len;
        chain.add(tm.regions[b.region].host + o, b.len, b.write, b.region, o);
      }
      const req = new VirtioBlkRequest(limits);
      const err = parseBlkRequest(chain, tm.mem, limits, req);
      assert.equal(err, sector + sectors <= CAPACITY ? null : "OutOfRange");
    }),
    { numRuns: 1000 },
  );
});
