// Whole-dataplane fuzz against a model (issue 10 section 4): the real
// VirtioBlkDataPlane on an AioContext, over a byte-array block driver
// (tests/robustness/memory_image_driver.ts), serving descriptor chains a
// generator lays out in memfd guest memory with guard pages. Most chains
// (about 80%) are valid requests that move data (IN/OUT over 1-3 buffers,
// one maybe spanning the two adjacent regions, direct or indirect, header
// split or not, GET_ID, discard, write zeroes, flush); the rest each carry
// one malformation of the hostile catalogue (tests/robustness/
// hostile_requests_test.ts) or a feature the driver did not negotiate. The
// model (tests/robustness/blk_device_model.ts) predicts, from the spec's
// rules, every status byte and used length, whether and why the ring
// breaks, guest memory and the image afterwards. Properties:
// - every chain made available is answered unless the ring broke, and the
//   ring breaks exactly when the model says (err eventfd, reason);
// - the used entries (head, len) and every status byte equal the model's;
// - guest memory is byte-for-byte the model's (everything outside the
//   buffers the device may write is as it was, compared in full, not only
//   guard pages);
// - the image equals the model's image.
// A second test shows each property can fail: mutants of the block driver
// (FLUSH never answered, a read one byte past its buffer, ...) and of the
// request completion (used length off by one, UNSUPP reported as IOERR,
// ...) applied through test hooks, each must be caught within the normal
// run count.

import assert from "node:assert/strict";
import fc from "fast-check";
import { AioContext } from "../../aio/mod.ts";
import { BlockBackend } from "../../block/mod.ts";
import { VirtioBlkDataPlane } from "../../dataplane/virtio_blk_dataplane.ts";
import { close, eventfd, eventfdRead, eventfdWrite } from "../../sys/mod.ts";
import { blkIdBytes, VirtioBlkRequest } from "../../virtio/mod.ts";
import { ringLayout, TestMemory } from "../virtio/guest_driver.ts";
import {
  F_INDIRECT,
  F_NEXT,
  F_WRITE,
  type ModelDesc,
  type ModelFeatures,
  runModel,
} from "./blk_device_model.ts";
import { type DriverMutant, MemoryImageDriver } from "./memory_image_driver.ts";

// Two guest-physically adjacent regions (guard pages between them in the
// host), nothing mapped below R0 or after R1.
const R0 = 0x10000, R0_SIZE = 0x40000;
const R1 = R0 + R0_SIZE, R1_SIZE = 0x4000;
const END = R1 + R1_SIZE;
const RING = R0;
const IND = (k: number) => R0 + 0x1000 + 0x200 * k; // indirect tables (32 entries; nested at +0x100)
const HDR = (k: number) => R0 + 0x3000 + 0x100 * k; // header + discard ranges
const DATA = (k: number) => R0 + 0x4000 + 0x3000 * k; // 12 KiB of data buffers per chain
const SPAN = R1; // one buffer per case may straddle R0's end into R1 (8 KiB each side)
const STATUS = (k: number) => R1 + 0x3000 + 16 * k;
const HOLE_LOW = 0x1000, HOLE_HIGH = END + 0x1000;
const MAX_CHAINS = 12;
const SECTORS = 64; // 32 KiB image
const SERIAL = "model-fuzz-serial-01234";
const T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8, T_DISCARD = 11, T_WRITE_ZEROES = 13;

const tm = new TestMemory([
  { gpa: R0, size: R0_SIZE, uva: 0x7d0000000000 },
  { gpa: R1, size: R1_SIZE, uva: 0x7d0000100000 },
]);
const kickFd = eventfd(), callFd = eventfd(), errFd = eventfd();

/** One malformation per chain, from the hostile catalogue ("none": a valid request). */
const MALFORMATIONS = [
  // answered with a status (IOERR / UNSUPP)
  "dataOutside",
  "headerOutside",
  "wrap64",
  "len4G",
  "straddleEnd",
  "shortHeader",
  "zeroLenData",
  "badOrder",
  "badLength",
  "beyondCapacity",
  "sectorHuge",
  "discardBadSeg",
  "discardUnmap",
  "wzBadFlags",
  "unknownType",
  "tooManySegs",
  "tooLong",
  "indirectDataOutside",
  // no status byte the device may write, or a ring that cannot be followed: broken
  "statusHole",
  "statusWrap",
  "noStatus",
  "statusReadOnly",
  "zeroLenStatus",
  "loop",
  "nextOutOfRange",
  "indirectBadLen",
  "indirectZeroLen",
  "nestedIndirect",
  "indirectWithNext",
  "indirectOutside",
  "indirectNotNegotiated",
  "headOutOfRange",
  "headInUse",
] as const;
type Malformation = typeof MALFORMATIONS[number] | "none";

const chainArb = fc.record({
  mal: fc.oneof(
    { arbitrary: fc.constant<Malformation>("none"), weight: 2 * MALFORMATIONS.length },
    { arbitrary: fc.constantFrom<Malformation>(...MALFORMATIONS), weight: MALFORMATIONS.length },
  ),
  type: fc.constantFrom(
    ...[T_IN, T_IN, T_IN, T_IN, T_IN, T_IN, T_OUT, T_OUT, T_OUT, T_OUT, T_OUT, T_OUT],
    T_GET_ID,
    T_FLUSH,
    T_DISCARD,
    T_WRITE_ZEROES,
  ),
  blocks: fc.integer({ min: 1, max: 16 }),
  sectorSel: fc.nat(),
  cuts: fc.array(fc.nat({ max: 0xffff }), { maxLength: 2 }),
  gaps: fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 4, maxLength: 4 }),
  headerSplit: fc.oneof(
    { arbitrary: fc.constant(0), weight: 4 },
    { arbitrary: fc.integer({ min: 1, max: 15 }), weight: 1 },
  ),
  headerWithData: fc.oneof(
    { arbitrary: fc.constant(false), weight: 5 },
    { arbitrary: fc.constant(true), weight: 1 },
  ),
  statusWithData: fc.boolean(),
  span: fc.oneof(
    { arbitrary: fc.constant(false), weight: 5 },
    { arbitrary: fc.constant(true), weight: 1 },
  ),
  indirect: fc.boolean(),
  idLen: fc.integer({ min: 1, max: 40 }),
  ranges: fc.array(
    fc.record({ sectorSel: fc.nat(), num: fc.nat({ max: 80 }), unmap: fc.boolean() }),
    { minLength: 1, maxLength: 3 },
  ),
  pick: fc.nat({ max: 0xffff }),
});
type ChainKnobs = typeof chainArb extends fc.Arbitrary<infer T> ? T : never;

const featuresArb = fc.record({
  flush: fc.oneof({ arbitrary: fc.constant(true), weight: 4 }, {
    arbitrary: fc.constant(false),
    weight: 1,
  }),
  discard: fc.option(
    fc.record({
      maxSectors: fc.integer({ min: 1, max: 64 }),
      maxSeg: fc.integer({ min: 1, max: 3 }),
    }),
    { freq: 5 }, // offered in 4 cases out of 5
  ),
  writeZeroes: fc.option(
    fc.record({
      maxSectors: fc.integer({ min: 1, max: 64 }),
      maxSeg: fc.integer({ min: 1, max: 3 }),
    }),
    { freq: 5 },
  ),
  readOnly: fc.oneof({ arbitrary: fc.constant(false), weight: 19 }, {
    arbitrary: fc.constant(true),
    weight: 1,
  }),
  blkSize: fc.oneof({ arbitrary: fc.constant(512), weight: 4 }, {
    arbitrary: fc.constant(4096),
    weight: 1,
  }),
  segMax: fc.oneof({ arbitrary: fc.integer({ min: 4, max: 8 }), weight: 4 }, {
    arbitrary: fc.integer({ min: 1, max: 3 }),
    weight: 1,
  }),
  writeback: fc.boolean(),
  eventIdx: fc.boolean(),
  // the block layer completes inside the submission (null-co does) or from a bottom half
  inline: fc.boolean(),
  // a medium error in one case out of five: I/O touching it fails with EIO
  badSector: fc.oneof({ arbitrary: fc.constant(null), weight: 4 }, {
    arbitrary: fc.integer({ min: 0, max: SECTORS - 1 }),
    weight: 1,
  }),
  indirectDesc: fc.oneof({ arbitrary: fc.constant(true), weight: 3 }, {
    arbitrary: fc.constant(false),
    weight: 1,
  }),
});

const caseArb = fc.record({
  sizeLog: fc.oneof(
    { arbitrary: fc.constant(4), weight: 4 },
    { arbitrary: fc.constant(3), weight: 2 },
    { arbitrary: fc.integer({ min: 0, max: 2 }), weight: 1 },
  ),
  chains: fc.array(chainArb, { minLength: 1, maxLength: MAX_CHAINS }),
  lastAvail: fc.oneof(fc.integer({ min: 0, max: 4 }), fc.integer({ min: 0, max: 0xffff })),
  // avail idx more than the ring size ahead: 1 = just one too many
  availJump: fc.oneof(
    { arbitrary: fc.constant(0), weight: 60 },
    { arbitrary: fc.constant(1), weight: 1 },
    { arbitrary: fc.integer({ min: 1, max: 0xff00 }), weight: 1 },
  ),
  features: featuresArb,
  // Malformed chains only in a quarter of the cases (a third of their chains):
  // a broken ring ends its batch, so the others serve real I/O throughout.
  hostile: fc.oneof({ arbitrary: fc.constant(false), weight: 3 }, {
    arbitrary: fc.constant(true),
    weight: 1,
  }),
  seed: fc.integer({ min: 1, max: 0x7fffffff }),
  /** Where the second batch starts (half the cases have one). */
  split: fc.oneof({ arbitrary: fc.constant(0xffff), weight: 1 }, {
    arbitrary: fc.nat({ max: MAX_CHAINS }),
    weight: 1,
  }),
});
type Case = typeof caseArb extends fc.Arbitrary<infer T> ? T : never;

function xorshift(s: number): number {
  s ^= s << 13;
  s ^= s >>> 17;
  s ^= s << 5;
  return s >>> 0;
}

/** Fills `b` with pseudo-random bytes (so a stray write or a skipped read shows). */
function fillRandom(b: Uint8Array, seed: number): void {
  const w = new Uint32Array(b.buffer, b.byteOffset, b.length >>> 2);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < w.length; i++) w[i] = x = xorshift(x);
}

interface Buf {
  addr: bigint;
  len: number;
  write: boolean;
}

/** A chain as laid out: its buffers, how it is linked, and bytes to put in memory. */
interface Built {
  bufs: Buf[];
  indirect: boolean;
  link: "none" | "loop" | "nextOutOfRange";
  top: "none" | "badLen" | "zeroLen" | "nested" | "withNext" | "outside";
  fills: [number, Uint8Array][];
}

/** Splits `total` bytes into 1 + cuts.length non-empty pieces. */
function pieces(total: number, cuts: number[]): number[] {
  const at = [...new Set(cuts.map((c) => 1 + (c % Math.max(1, total - 1))))]
    .filter((c) => c > 0 && c < total).sort((a, b) => a - b);
  const out: number[] = [];
  let prev = 0;
  for (const c of [...at, total]) {
    out.push(c - prev);
    prev = c;
  }
  return out;
}

/** Builds chain `k` of a case from its knobs (valid unless `c.mal` says otherwise). */
function build(
  k: number,
  c: ChainKnobs,
  f: Case["features"],
  spanFree: { free: boolean },
  capacity: number,
): Built {
  const mal = c.mal;
  let type = c.type;
  const forceIn = [
    "dataOutside",
    "wrap64",
    "len4G",
    "straddleEnd",
    "zeroLenData",
    "badOrder",
    "badLength",
    "beyondCapacity",
    "sectorHuge",
    "tooManySegs",
    "indirectDataOutside",
    "statusReadOnly",
  ];
  if (forceIn.includes(mal)) type = T_IN;
  if (mal === "noStatus") type = T_OUT;
  if (mal === "discardBadSeg" || mal === "discardUnmap") type = T_DISCARD;
  if (mal === "wzBadFlags") type = T_WRITE_ZEROES;
  if (mal === "unknownType") type = [2, 3, 5, 6, 7, 9, 10, 12, 14, 0xdead, 0xffffffff][c.pick % 11];
  const bs = f.blkSize;
  let total = Math.min(Math.ceil((c.blocks * 512) / bs) * bs, 8192);
  if (mal === "badLength") total = bs - 1 - (c.pick % 16);
  const nsect = Math.ceil(total / 512);
  const unit = bs / 512;
  const slots = Math.max(1, Math.floor((SECTORS - nsect) / unit) + 1);
  let sector = BigInt((c.sectorSel % slots) * unit);
  if (mal === "beyondCapacity") sector = BigInt(SECTORS - unit + unit * (c.pick % 2));
  if (mal === "beyondCapacity" && sector + BigInt(nsect) <= SECTORS) sector = BigInt(SECTORS);
  if (mal === "sectorHuge") sector = (1n << 64n) - 1n - BigInt(c.pick % 8);

  const fills: [number, Uint8Array][] = [];
  const bufs: Buf[] = [];
  // header (+ discard / write-zeroes ranges)
  const ranges = type === T_DISCARD || type === T_WRITE_ZEROES;
  const lim = type === T_DISCARD ? f.discard : f.writeZeroes;
  // as many ranges as the device takes, but now and then one too many
  const nr = lim && c.pick % 8 !== 0 ? Math.min(c.ranges.length, lim.maxSeg) : c.ranges.length;
  const hdr = new Uint8Array(16 + (ranges ? 16 * nr : 0) + 8);
  const hv = new DataView(hdr.buffer);
  hv.setUint32(0, type, true);
  hv.setBigUint64(8, sector, true);
  if (ranges) {
    c.ranges.slice(0, nr).forEach((r, i) => {
      const s = r.sectorSel % SECTORS;
      const room = Math.min(lim?.maxSectors ?? 64, SECTORS - s);
      hv.setBigUint64(16 + 16 * i, BigInt(s), true);
      hv.setUint32(24 + 16 * i, r.num % (room + 1), true);
      let flags = type === T_WRITE_ZEROES && r.unmap ? 1 : 0;
      if (mal === "discardUnmap" && i === 0) flags = 1;
      if (mal === "wzBadFlags" && i === 0) flags = 2 + (c.pick % 6) * 2;
      hv.setUint32(28 + 16 * i, flags, true);
    });
  }
  let hdrLen = 16 + (ranges ? 16 * nr : 0);
  if (mal === "discardBadSeg") hdrLen = 16 + 8;
  if (mal === "shortHeader") hdrLen = 8 + (c.pick % 8);
  const dataOut = type === T_OUT;
  const dataIn = type === T_IN || type === T_GET_ID || (type !== T_FLUSH && !ranges && !dataOut);
  let cursor = DATA(k);
  const gap = (i: number) => c.gaps[i % c.gaps.length];
  const withData = c.headerWithData && dataOut && c.headerSplit === 0;
  const hdrAt = withData ? cursor : HDR(k);
  fills.push([hdrAt, hdr]);
  if (withData) cursor += 16;
  if (c.headerSplit > 0 && c.headerSplit < hdrLen && mal !== "headerOutside") {
    bufs.push({ addr: BigInt(hdrAt), len: c.headerSplit, write: false });
    bufs.push({ addr: BigInt(hdrAt + c.headerSplit), len: hdrLen - c.headerSplit, write: false });
  } else {
    bufs.push({
      addr: BigInt(mal === "headerOutside" ? 0x2000 : hdrAt),
      len: hdrLen,
      write: false,
    });
  }
  // data
  let lens: number[] = [];
  // as many data buffers as seg_max allows (a spanning one counts twice), now and then more
  const cuts = c.pick % 8 === 0 ? c.cuts : c.cuts.slice(0, Math.max(0, f.segMax - 2));
  if (type === T_IN || type === T_OUT) lens = pieces(total, cuts);
  else if (type === T_GET_ID) lens = pieces(c.idLen, cuts);
  else if (dataIn && mal === "unknownType" && c.pick % 2) lens = [512];
  if (mal === "tooManySegs") {
    lens = [];
    const n = f.segMax + 1;
    for (let i = 0; i < n; i++) lens.push(Math.floor(total / n) + (i < total % n ? 1 : 0));
  }
  if (mal === "tooLong") {
    lens = [];
    for (let i = 0; i < capacity; i++) lens.push(1);
  }
  const firstData = bufs.length;
  lens.forEach((len, i) => {
    if (i === 0 && withData) {
      bufs[0] = { ...bufs[0], len: 16 + len };
      cursor += len + gap(i);
      return;
    }
    if (c.span && spanFree.free && len >= 2 && i === 0) {
      spanFree.free = false;
      bufs.push({ addr: BigInt(SPAN - (len >> 1)), len, write: !dataOut });
      return;
    }
    bufs.push({ addr: BigInt(cursor), len, write: !dataOut });
    cursor += len + gap(i);
  });
  // status
  // The status byte right after the last data-in byte, in one descriptor
  // (the gap after every data buffer keeps that byte free).
  const lastBuf = bufs[bufs.length - 1];
  const statusWithData = c.statusWithData && mal === "none" && bufs.length > firstData &&
    lastBuf.write && lastBuf.addr >= BigInt(DATA(k)) && lastBuf.addr < BigInt(DATA(k + 1));
  if (statusWithData) bufs[bufs.length - 1].len += 1;
  else bufs.push({ addr: BigInt(STATUS(k)), len: 1, write: true });
  // the malformation
  const d = bufs.length > firstData + 1 ? firstData : -1; // the first data buffer, if any
  switch (mal) {
    case "dataOutside":
    case "indirectDataOutside":
      if (d >= 0) bufs[d].addr = BigInt(HOLE_LOW);
      break;
    case "wrap64":
      if (d >= 0) bufs[d] = { ...bufs[d], addr: (1n << 64n) - 256n, len: 512 };
      break;
    case "len4G":
      if (d >= 0) bufs[d].len = 0xffffffff;
      break;
    case "straddleEnd":
      if (d >= 0) bufs[d] = { ...bufs[d], addr: BigInt(END - 256), len: 512 };
      break;
    case "zeroLenData":
      if (d >= 0) bufs[d].len = 0;
      break;
    case "badOrder":
      bufs.splice(bufs.length - 1, 0, { addr: BigInt(DATA(k) + 0x2c00), len: 64, write: false });
      break;
    case "statusHole":
      bufs[bufs.length - 1] = { addr: BigInt(HOLE_HIGH), len: 1, write: true };
      break;
    case "statusWrap":
      bufs[bufs.length - 1] = { addr: (1n << 64n) - 1n, len: 2, write: true };
      break;
    case "noStatus":
      bufs.pop();
      break;
    case "statusReadOnly":
      bufs[bufs.length - 1].write = false;
      break;
    case "zeroLenStatus":
      bufs[bufs.length - 1] = { ...bufs[bufs.length - 1], len: 0 };
      break;
  }
  const forceIndirect = [
    "tooLong",
    "indirectDataOutside",
    "indirectBadLen",
    "indirectZeroLen",
    "nestedIndirect",
    "indirectWithNext",
    "indirectOutside",
    "indirectNotNegotiated",
  ].includes(mal);
  const top: Built["top"] = mal === "indirectBadLen"
    ? "badLen"
    : mal === "indirectZeroLen"
    ? "zeroLen"
    : mal === "nestedIndirect"
    ? "nested"
    : mal === "indirectWithNext"
    ? "withNext"
    : mal === "indirectOutside"
    ? "outside"
    : "none";
  return {
    bufs,
    indirect: forceIndirect || (c.indirect && f.indirectDesc),
    link: mal === "loop" ? "loop" : mal === "nextOutOfRange" ? "nextOutOfRange" : "none",
    top,
    fills,
  };
}

/** Descriptors for `bufs` linked 0..n-1 through `idx` (a table's indexes). */
function linkDescs(b: Built, idx: number[], tableLen: number, pick: number): ModelDesc[] {
  const n = b.bufs.length;
  return b.bufs.map((x, j) => {
    const last = j === n - 1;
    const d: ModelDesc = {
      addr: x.addr,
      len: x.len,
      flags: (x.write ? F_WRITE : 0) | (last ? 0 : F_NEXT),
      next: last ? 0 : idx[j + 1],
    };
    if (last && b.link === "loop") {
      d.flags |= F_NEXT;
      d.next = idx[0];
    }
    if (last && b.link === "nextOutOfRange") {
      d.flags |= F_NEXT;
      d.next = tableLen + (pick % (0x10000 - tableLen));
    }
    return d;
  });
}

function writeDesc(gpa: number, d: ModelDesc): void {
  const dv = tm.view(gpa, 16);
  dv.setBigUint64(0, BigInt.asUintN(64, d.addr), true);
  dv.setUint32(8, d.len >>> 0, true);
  dv.setUint16(12, d.flags, true);
  dv.setUint16(14, d.next, true);
}

/** Runs the AioContext until nothing is in flight and nothing happens (bounded). */
function settle(ctx: AioContext, dp: VirtioBlkDataPlane): void {
  let idle = 0;
  for (let i = 0; i < 10000 && idle < 3; i++) {
    const progress = ctx.poll(false);
    idle = !progress && dp.inFlight === 0 ? idle + 1 : 0;
  }
}

/** Counts over one fc run, so the bias of the generator is visible. */
interface Tally {
  cases: number;
  chains: number;
  answered: number;
  dataAnswers: number;
  statusAnswers: number;
  brokenCases: number;
  unanswered: number;
  malformed: Map<string, number>;
  outcomes: Map<string, number>;
}

function newTally(): Tally {
  return {
    cases: 0,
    chains: 0,
    answered: 0,
    dataAnswers: 0,
    statusAnswers: 0,
    brokenCases: 0,
    unanswered: 0,
    malformed: new Map(),
    outcomes: new Map(),
  };
}

const bump = (m: Map<string, number>, k: string) => m.set(k, (m.get(k) ?? 0) + 1);

/** One case: lay it out, run the model and the dataplane, compare everything. */
async function checkCase(ctx: AioContext, c: Case, t: Tally, mutant?: DriverMutant): Promise<void> {
  const size = 1 << c.sizeLog;
  const f = c.features;
  const capacity = Math.max(size, f.segMax + 2); // the dataplane's chain bound (seg_max + 2)
  const l = ringLayout(RING, size);
  const r0 = tm.mem.bytes(R0, R0_SIZE)!, r1 = tm.mem.bytes(R1, R1_SIZE)!;
  fillRandom(r0, c.seed);
  fillRandom(r1, c.seed ^ 0x5bd1e995);

  // Lay out the chains: direct ones take table entries from a shuffled pool.
  let x = c.seed;
  const pool = [...Array(size).keys()];
  for (let i = pool.length - 1; i > 0; i--) {
    x = xorshift(x);
    const j = x % (i + 1);
    [pool[i], pool[j]] = [pool[j], pool[i]];
  }
  const table: ModelDesc[] = Array.from({ length: size }, () => ({
    addr: 0n,
    len: 0,
    flags: 0,
    next: 0,
  }));
  const indirect = new Map<bigint, ModelDesc[]>();
  const spanFree = { free: true };
  const heads: number[] = [];
  const placedMal: string[] = [];
  for (let k = 0; k < c.chains.length && heads.length < size; k++) {
    const knobs = c.hostile ? c.chains[k] : { ...c.chains[k], mal: "none" as const };
    if (knobs.mal === "headOutOfRange") {
      heads.push(size + (knobs.pick % (0x10000 - size)));
      placedMal.push(knobs.mal);
      continue;
    }
    if (knobs.mal === "headInUse" && heads.length > 0) {
      heads.push(heads[knobs.pick % heads.length]);
      placedMal.push(knobs.mal);
      continue;
    }
    const b = build(k, knobs, f, spanFree, capacity);
    let useIndirect = b.indirect;
    if (!useIndirect && b.bufs.length > pool.length) {
      if (!f.indirectDesc) continue; // no room for it
      useIndirect = true;
    }
    if (pool.length === 0) break;
    for (const [gpa, bytes] of b.fills) tm.mem.bytes(gpa, bytes.length)!.set(bytes);
    let head: number;
    if (!useIndirect) {
      const idx = pool.splice(0, b.bufs.length);
      const descs = linkDescs(b, idx, size, knobs.pick);
      descs.forEach((d, j) => table[idx[j]] = d);
      head = idx[0];
    } else {
      const idx = b.bufs.map((_, j) => j);
      const descs = linkDescs(b, idx, b.bufs.length, knobs.pick);
      let at = IND(k);
      if (b.top === "nested") {
        const inner = IND(k) + 0x100;
        indirect.set(BigInt(inner), descs);
        descs.forEach((d, j) => writeDesc(inner + 16 * j, d));
        const outer = [{ addr: BigInt(inner), len: 16 * descs.length, flags: F_INDIRECT, next: 0 }];
        indirect.set(BigInt(at), outer);
        writeDesc(at, outer[0]);
      } else {
        indirect.set(BigInt(at), descs);
        descs.forEach((d, j) => writeDesc(at + 16 * j, d));
      }
      let len = 16 * (b.top === "nested" ? 1 : descs.length);
      if (b.top === "badLen") len = len - 8;
      if (b.top === "zeroLen") len = 0;
      if (b.top === "outside") at = HOLE_LOW;
      head = pool.shift()!;
      table[head] = {
        addr: BigInt(at),
        len,
        flags: F_INDIRECT | (b.top === "withNext" ? F_NEXT : 0),
        next: 0,
      };
    }
    heads.push(head);
    placedMal.push(knobs.mal === "headInUse" ? "none" : knobs.mal);
  }
  table.forEach((d, i) => {
    if (d.len !== 0 || d.flags !== 0 || d.addr !== 0n) writeDesc(l.desc + 16 * i, d);
  });
  // Rings: avail entries for the window [lastAvail, availIdx), used idx where a driver has it.
  const avail = tm.view(l.avail, 6 + 2 * size);
  avail.setUint16(0, 0, true); // interrupts wanted
  avail.setUint16(4 + 2 * size, c.lastAvail, true); // used_event: at the first used entry
  heads.forEach((h, j) => avail.setUint16(4 + 2 * ((c.lastAvail + j) & (size - 1)), h, true));
  const pending = c.availJump
    ? size + 1 + ((c.availJump - 1) % (0x10000 - size - 1))
    : heads.length;
  // Two batches in some cases: the first chains before the queue starts,
  // the rest published (and kicked) once the first batch is answered.
  const first = c.availJump || c.split === 0xffff ? heads.length : Math.min(c.split, heads.length);
  const availIdx = (c.lastAvail + (c.availJump ? pending : first)) & 0xffff;
  avail.setUint16(2, availIdx, true);
  const used = tm.view(l.used, 6 + 8 * size);
  used.setUint16(0, 0, true);
  used.setUint16(2, c.lastAvail, true);

  // The model, on copies.
  const image = new Uint8Array(SECTORS * 512);
  fillRandom(image, c.seed ^ 0x27d4eb2f);
  const modelImage = image.slice();
  const before = new Uint8Array(R0_SIZE + R1_SIZE);
  before.set(r0);
  before.set(r1, R0_SIZE);
  const mm = { base: R0, split: R1, bytes: before.slice() };
  const features: ModelFeatures = {
    capacity: SECTORS,
    blkSize: f.blkSize,
    segMax: f.segMax,
    readOnly: f.readOnly,
    flush: f.flush,
    discard: f.discard,
    writeZeroes: f.writeZeroes,
    indirectDesc: f.indirectDesc,
    badSector: f.badSector,
    inline: f.inline,
    id: blkIdBytes(SERIAL),
  };
  const run = (hs: number[] | null) =>
    runModel(features, mm, modelImage, table, indirect, hs, capacity);
  const model = run(c.availJump ? null : heads.slice(0, first));
  if (first < heads.length) {
    if (model.broken === null) {
      const second = run(heads.slice(first));
      model.answers.push(...second.answers);
      model.used.push(...second.used);
      model.broken = second.broken;
      model.unanswered = second.unanswered;
    } else model.unanswered += heads.length - first;
  }

  // The dataplane.
  const driver = new MemoryImageDriver(ctx, image);
  driver.mutant = mutant ?? null;
  driver.badSector = f.badSector;
  driver.inlineAllowed = f.inline;
  const blk = new BlockBackend(ctx, driver, { readOnly: f.readOnly, discard: "unmap" });
  const broken: string[] = [];
  const dp = new VirtioBlkDataPlane(ctx, blk, {
    device: {
      capacity: SECTORS,
      segMax: f.segMax,
      blkSize: f.blkSize === 512 ? undefined : f.blkSize,
      readOnly: f.readOnly,
      flush: f.flush,
      discard: f.discard ? { ...f.discard, sectorAlignment: 1 } : undefined,
      writeZeroes: f.writeZeroes ? { ...f.writeZeroes, mayUnmap: true } : undefined,
    },
    serial: SERIAL,
    writeback: f.writeback,
    onBroken: (_i, reason) => broken.push(reason),
  });
  eventfdRead(errFd);
  eventfdRead(kickFd);
  let hung = 0, calls = 0;
  try {
    await dp.setMemory(tm.mem);
    await dp.startQueue({
      index: 0,
      size,
      desc: tm.uva(l.desc),
      avail: tm.uva(l.avail),
      used: tm.uva(l.used),
      base: c.lastAvail,
      kickFd,
      callFd,
      errFd,
      eventIdx: f.eventIdx,
      indirectDesc: f.indirectDesc,
      enabled: true,
    });
    settle(ctx, dp);
    if (first < heads.length && dp.inFlight === 0) {
      // the driver consumed the first answers: interrupt it for the next ones
      avail.setUint16(4 + 2 * size, (c.lastAvail + first) & 0xffff, true);
      avail.setUint16(2, (c.lastAvail + heads.length) & 0xffff, true);
      // (the driver's own writes: the model's memory has them too)
      for (const o of [l.avail + 2, l.avail + 4 + 2 * size]) {
        mm.bytes.set(tm.mem.bytes(o, 2)!, o - R0);
      }
      eventfdWrite(kickFd, 1);
      settle(ctx, dp);
    }
    hung = dp.inFlight;
  } finally {
    // A request that never completes is a failure below; release what a
    // mutant withheld so the queue can stop. One still stuck after that
    // would make stopQueue wait for ever: that dataplane is abandoned.
    if (dp.inFlight > 0) {
      driver.release();
      settle(ctx, dp);
    }
    if (dp.inFlight === 0) {
      await dp.close();
      await blk.close();
    }
    calls = eventfdRead(callFd);
  }
  const errSignalled = eventfdRead(errFd) > 0;

  t.cases++;
  t.chains += c.availJump ? 0 : heads.length;
  for (const m of placedMal) if (m !== "none") bump(t.malformed, m);
  assert.equal(hung, 0, `${hung} requests never answered (model: ${model.answers.length})`);
  // the ring breaks exactly when (and why) the model says
  if (model.broken === null) {
    assert.deepEqual(broken, [], "ring broken where the model answers everything");
  } else {
    assert.equal(broken.length, 1, `model: broken (${model.broken}); device: not`);
    assert.ok(broken[0].includes(model.broken), `broken: ${broken[0]}; model: ${model.broken}`);
  }
  assert.equal(errSignalled, model.broken !== null, "err eventfd");
  // used entries: every chain answered unless the ring broke, each as the model says
  const usedIdx = used.getUint16(2, true);
  const got: { head: number; len: number }[] = [];
  for (let j = 0; j < ((usedIdx - c.lastAvail) & 0xffff); j++) {
    const slot = (c.lastAvail + j) & (size - 1);
    got.push({ head: used.getUint32(4 + 8 * slot, true), len: used.getUint32(8 + 8 * slot, true) });
  }
  // An answer the guest is not told about is a hang for an interrupt-driven
  // driver (it asked for every one: no NO_INTERRUPT, used_event at the start).
  // A ring broken by its own links publishes nothing more, not even that.
  if (got.length > 0 && (model.broken === null || model.broken === "NoStatus")) {
    assert.ok(calls > 0, `${got.length} used entries and no interrupt`);
  }
  const key = (u: { head: number; len: number }) => `${u.head}:${u.len}`;
  assert.deepEqual(got.map(key).sort(), model.used.map(key).sort(), "used entries (head:len)");
  // guest memory: the model's bytes everywhere except what notification
  // suppression writes (used flags, avail_event) and the used elements just checked
  const after = new Uint8Array(R0_SIZE + R1_SIZE);
  after.set(r0);
  after.set(r1, R0_SIZE);
  const u0 = l.used - R0;
  mm.bytes.set(after.subarray(u0, u0 + 2), u0);
  mm.bytes.set(after.subarray(u0 + 4 + 8 * size, u0 + 6 + 8 * size), u0 + 4 + 8 * size);
  for (let j = 0; j < got.length; j++) {
    const o = u0 + 4 + 8 * ((c.lastAvail + j) & (size - 1));
    mm.bytes.set(after.subarray(o, o + 8), o);
  }
  mm.bytes.set(after.subarray(u0 + 2, u0 + 4), u0 + 2); // used idx, checked above
  const diff = firstDiff(after, mm.bytes);
  if (diff >= 0) {
    assert.fail(
      `guest memory differs from the model at gpa 0x${(R0 + diff).toString(16)}: ` +
        `device ${after[diff]}, model ${mm.bytes[diff]} (was ${before[diff]})`,
    );
  }
  const idiff = firstDiff(image, modelImage);
  if (idiff >= 0) {
    assert.fail(`image differs at byte ${idiff}: ${image[idiff]}, model ${modelImage[idiff]}`);
  }
  if (model.broken !== null) t.brokenCases++;
  t.unanswered += model.unanswered;
  for (const a of model.answers) {
    if (model.broken !== null && a.async && !model.used.some((u) => u.head === a.head)) continue;
    t.answered++;
    if (a.carriesData) t.dataAnswers++;
    else t.statusAnswers++;
    bump(t.outcomes, `type${a.type}:s${a.status}`);
  }
}

function firstDiff(a: Uint8Array, b: Uint8Array): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

/** Completion mutants: test hooks on the request class, undone by the returned function. */
type CompletionMutant = "usedLenOffByOne" | "unsuppAsIoerr" | "okStatusNotWritten";

function applyCompletionMutant(m: CompletionMutant): () => void {
  const proto = VirtioBlkRequest.prototype;
  const usedLen = Object.getOwnPropertyDescriptor(proto, "usedLen")!;
  const writeStatus = proto.writeStatus;
  if (m === "usedLenOffByOne") {
    Object.defineProperty(proto, "usedLen", {
      get(this: VirtioBlkRequest) {
        return this.inLen > 0 ? this.inLen : 1; // forgets the status byte of data-in requests
      },
      configurable: true,
    });
  } else {
    proto.writeStatus = function (this: VirtioBlkRequest, status: number) {
      if (m === "okStatusNotWritten" && status === 0) return;
      writeStatus.call(this, m === "unsuppAsIoerr" && status === 2 ? 1 : status);
    };
  }
  return () => {
    Object.defineProperty(proto, "usedLen", usedLen);
    proto.writeStatus = writeStatus;
  };
}

/** Runs per property; FUZZ_RUNS explores further. */
const NUM_RUNS = Number(Deno.env.get("FUZZ_RUNS") ?? 3000);

function report(t: Tally): string {
  const pct = (n: number) => `${((100 * n) / Math.max(1, t.chains)).toFixed(0)}%`;
  return `${t.cases} cases, ${t.chains} chains: ${t.answered} answered (${t.dataAnswers} ` +
    `moving data = ${pct(t.dataAnswers)} of chains, ${
      (t.dataAnswers / t.cases).toFixed(1)
    } a case; ` +
    `${t.statusAnswers} status-only), ${t.brokenCases} cases with a broken ring, ` +
    `${t.unanswered} chains after a break, ${
      [...t.malformed.values()].reduce((a, b) => a + b, 0)
    } ` +
    `malformed over ${t.malformed.size} kinds`;
}

Deno.test("fuzz: the dataplane answers as the model does (status, used len, memory, image)", async () => {
  const ctx = new AioContext();
  const t = newTally();
  try {
    await fc.assert(fc.asyncProperty(caseArb, (c) => checkCase(ctx, c, t)), {
      numRuns: NUM_RUNS,
    });
  } finally {
    ctx.close();
  }
  console.log(`model fuzz: ${report(t)}`);
  if (Deno.env.get("FUZZ_STATS")) {
    console.log(Object.fromEntries(t.malformed), Object.fromEntries(t.outcomes));
  }
  // The bias is what makes the properties bite: most chains move data.
  assert.ok(t.dataAnswers >= 0.6 * t.chains, `only ${report(t)}`);
  for (const m of MALFORMATIONS) assert.ok(t.malformed.has(m), `malformation ${m} never generated`);
  for (const o of ["type0:s0", "type1:s0", "type8:s0", "type11:s0", "type13:s0", "type4:s0"]) {
    assert.ok(t.outcomes.has(o), `outcome ${o} never seen`);
  }
});

const MUTANTS: (DriverMutant | CompletionMutant)[] = [
  "flushNeverCompletes",
  "readOneBytePast",
  "readTransfersNothing",
  "writeDropped",
  "writeZeroesIgnored",
  "usedLenOffByOne",
  "unsuppAsIoerr",
  "okStatusNotWritten",
];

Deno.test("fuzz: every property can fail (mutants are caught within the normal run count)", async () => {
  const ctx = new AioContext();
  const caught: string[] = [];
  try {
    for (const m of MUTANTS) {
      const driverMutant = ["usedLenOffByOne", "unsuppAsIoerr", "okStatusNotWritten"].includes(m)
        ? undefined
        : m as DriverMutant;
      const undo = driverMutant ? () => {} : applyCompletionMutant(m as CompletionMutant);
      const r = await fc.check(
        fc.asyncProperty(caseArb, (c) => checkCase(ctx, c, newTally(), driverMutant)),
        { numRuns: NUM_RUNS, endOnFailure: true },
      ).finally(undo);
      assert.ok(r.failed, `mutant ${m} survived ${NUM_RUNS} runs`);
      caught.push(`${m} after ${r.numRuns}`);
    }
  } finally {
    ctx.close();
  }
  console.log(`mutants caught: ${caught.join(", ")}`);
});

Deno.test("fuzz: clean up", () => {
  tm.close();
  for (const fd of [kickFd, callFd, errFd]) close(fd);
});
