/**
 * A model of a virtio-blk device behind a split virtqueue, for the
 * whole-dataplane fuzz: written from the virtio 1.2 rules (2.7.5 descriptor
 * chains, 5.2.6 requests) and docs/design.md's "Malformed chains" table, not
 * from the dataplane's code. Given the descriptors a driver wrote (as plain
 * objects), the avail entries, the negotiated features, the guest memory as
 * bytes and the image as bytes, {@link runModel} predicts every answer
 * (status byte, used length), whether and how the ring breaks, and guest
 * memory and the image afterwards.
 *
 * Guest memory here is one guest-physical range `[base, base + bytes.length)`
 * (the fuzz's regions are adjacent); a buffer crossing `split` (the second
 * region's start) is two chain entries, as a device with per-region iovecs
 * has it.
 *
 * @module
 */

/** One descriptor as the driver wrote it (virtio 1.2 2.7.5). */
export interface ModelDesc {
  addr: bigint;
  len: number;
  flags: number;
  next: number;
}

/** VRING_DESC_F_*. */
export const F_NEXT = 1, F_WRITE = 2, F_INDIRECT = 4;

/** What the driver negotiated and the device offers. */
export interface ModelFeatures {
  capacity: number; // 512-byte sectors
  blkSize: number;
  segMax: number;
  readOnly: boolean;
  flush: boolean;
  discard: { maxSectors: number; maxSeg: number } | null;
  writeZeroes: { maxSectors: number; maxSeg: number } | null;
  indirectDesc: boolean;
  /**
   * The block layer completes inside the submission (null-co's inline
   * completion): a request it serves is answered before the next chain is
   * popped, as a parse error is.
   */
  inline: boolean;
  /** A sector whose reads, writes, discards and write zeroes fail (EIO: IOERR), or null. */
  badSector: number | null;
  /** GET_ID answer (20 bytes, zero padded). */
  id: Uint8Array;
}

/** Guest memory of the model. */
export interface ModelMemory {
  base: number;
  /** Where the second (adjacent) region starts: entries are split there. */
  split: number;
  bytes: Uint8Array;
}

/** The model's answer to one avail entry. */
export interface ModelAnswer {
  head: number;
  status: number;
  usedLen: number;
  /** True when it was answered from the block layer (after the batch), false at once. */
  async: boolean;
  /** OK and moved data (IN/OUT bytes, GET_ID bytes, discard/write-zeroes ranges). */
  carriesData: boolean;
  type: number;
}

/** What the model predicts for a batch. */
export interface ModelResult {
  /** Answers in pop order, including those a broken ring leaves without a used entry. */
  answers: ModelAnswer[];
  /** Used entries the device publishes (head, len), as a multiset. */
  used: { head: number; len: number }[];
  /** Why the ring breaks ("Loop", "NoStatus", "AvailIdxJump", ...), or null. */
  broken: string | null;
  /** Chains that were never answered because the ring broke. */
  unanswered: number;
}

const S_OK = 0, S_IOERR = 1, S_UNSUPP = 2;
const T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8, T_DISCARD = 11, T_WRITE_ZEROES = 13;

interface Entry {
  gpa: number;
  len: number;
  write: boolean;
}

type Walk =
  | { ring: string }
  | { ring: null; entries: Entry[]; bufError: string | null; status: number };

function inMemory(m: ModelMemory, gpa: bigint, len: number): boolean {
  return gpa >= BigInt(m.base) && gpa + BigInt(len) <= BigInt(m.base + m.bytes.length);
}

/**
 * Follows the chain at `head` (2.7.5.3: indirect tables, 2.7.4.2: readable
 * before writable). A link that cannot be followed breaks the ring; an
 * unusable buffer does not, the chain is then answered IOERR in the last
 * byte of its last descriptor if that is a usable writable buffer.
 */
function walk(
  f: ModelFeatures,
  m: ModelMemory,
  table: ModelDesc[],
  indirect: Map<bigint, ModelDesc[]>,
  head: number,
  capacity: number,
): Walk {
  const size = table.length;
  if (head >= size) return { ring: "HeadOutOfRange" };
  let descs = table, limit = size, i = head, steps = 0, inIndirect = false;
  const entries: Entry[] = [];
  let bufError: string | null = null;
  for (;;) {
    if (i >= limit) return { ring: "NextOutOfRange" };
    if (++steps > limit) return { ring: "Loop" };
    const d = descs[i];
    if (d.flags & F_INDIRECT) {
      if (inIndirect) return { ring: "NestedIndirect" };
      if (!f.indirectDesc) return { ring: "IndirectNotNegotiated" };
      if (d.flags & F_NEXT) return { ring: "IndirectWithNext" };
      if (d.len === 0 || d.len % 16 !== 0) return { ring: "IndirectBadLength" };
      const t = indirect.get(d.addr);
      // an indirect table must be one region's memory
      const a = Number(d.addr);
      if (!inMemory(m, d.addr, d.len) || (a < m.split && a + d.len > m.split) || !t) {
        return { ring: "IndirectOutOfRange" };
      }
      if (t.length !== d.len / 16) throw new Error("model: indirect table length");
      descs = t;
      limit = t.length;
      i = 0;
      steps = 0;
      inIndirect = true;
      continue;
    }
    const write = (d.flags & F_WRITE) !== 0;
    const last = (d.flags & F_NEXT) === 0;
    if (bufError === null) {
      if (d.len === 0) bufError = "ZeroLength";
      else if (!inMemory(m, d.addr, d.len)) bufError = "OutOfRange";
      else if (!write && entries.some((e) => e.write)) bufError = "BadOrder";
      else {
        const a = Number(d.addr);
        const pieces = a < m.split && a + d.len > m.split
          ? [{ gpa: a, len: m.split - a }, { gpa: m.split, len: a + d.len - m.split }]
          : [{ gpa: a, len: d.len }];
        for (const p of pieces) {
          if (entries.length >= capacity) {
            bufError = "TooLong";
            break;
          }
          entries.push({ ...p, write });
        }
      }
    }
    if (last) {
      let status = -1;
      if (bufError !== null) {
        if (write && d.len > 0 && inMemory(m, d.addr, d.len)) status = Number(d.addr) + d.len - 1;
      } else {
        const w = entries.filter((e) => e.write);
        if (w.length > 0) status = w[w.length - 1].gpa + w[w.length - 1].len - 1;
      }
      return { ring: null, entries, bufError, status };
    }
    i = d.next;
  }
}

function touchesBad(f: ModelFeatures, offset: number, bytes: number): boolean {
  const b = f.badSector;
  return b !== null && offset < (b + 1) * 512 && offset + bytes > b * 512;
}

/** Bytes of `entries` (in order), from model memory. */
function gather(m: ModelMemory, entries: Entry[]): Uint8Array {
  const n = entries.reduce((a, e) => a + e.len, 0);
  const out = new Uint8Array(n);
  let o = 0;
  for (const e of entries) {
    out.set(m.bytes.subarray(e.gpa - m.base, e.gpa - m.base + e.len), o);
    o += e.len;
  }
  return out;
}

/** Writes `data` over `entries` in order (as far as it goes). */
function scatter(m: ModelMemory, entries: Entry[], data: Uint8Array): void {
  let o = 0;
  for (const e of entries) {
    if (o >= data.length) return;
    const n = Math.min(e.len, data.length - o);
    m.bytes.set(data.subarray(o, o + n), e.gpa - m.base);
    o += n;
  }
}

/** The writable entries minus the status byte (the data-in buffers), and their length. */
function dataIn(entries: Entry[]): Entry[] {
  const w = entries.filter((e) => e.write);
  const out = w.map((e) => ({ ...e }));
  out[out.length - 1].len -= 1;
  return out.filter((e) => e.len > 0);
}

/** Readable bytes after the 16-byte header, as entries. */
function dataOut(entries: Entry[]): Entry[] {
  const out: Entry[] = [];
  let skip = 16;
  for (const e of entries) {
    if (e.write) break;
    const s = Math.min(skip, e.len);
    skip -= s;
    if (e.len - s > 0) out.push({ gpa: e.gpa + s, len: e.len - s, write: false });
  }
  return out;
}

interface Parsed {
  status: number;
  type: number;
  /** Effects to apply (to the image and guest memory) when answered OK. */
  run?: (image: Uint8Array) => number | null; // bytes written besides the status, null: EIO
  async: boolean;
}

/** 5.2.6: what one walked, usable chain asks for, and what answers it. */
function parse(f: ModelFeatures, m: ModelMemory, entries: Entry[]): Parsed {
  const out = entries.filter((e) => !e.write);
  const outLen = out.reduce((a, e) => a + e.len, 0);
  const inLen = entries.filter((e) => e.write).reduce((a, e) => a + e.len, 0);
  const fail = (status: number, type = -1): Parsed => ({ status, type, async: false });
  if (outLen < 16) return fail(S_IOERR);
  const stream = gather(m, out);
  const dv = new DataView(stream.buffer);
  const type = dv.getUint32(0, true);
  const sector = dv.getBigUint64(8, true);
  const cap = BigInt(f.capacity);
  switch (type) {
    case T_IN:
    case T_OUT: {
      const write = type === T_OUT;
      const len = write ? outLen - 16 : inLen - 1;
      if (sector >= 1n << 53n) return fail(S_IOERR, type);
      if (len % f.blkSize !== 0) return fail(S_IOERR, type);
      if (sector % BigInt(f.blkSize / 512) !== 0n) return fail(S_IOERR, type);
      if (sector + BigInt(len / 512) > cap) return fail(S_IOERR, type);
      if (write && f.readOnly) return fail(S_IOERR, type);
      const bufs = write ? dataOut(entries) : dataIn(entries);
      if (bufs.length > f.segMax) return fail(S_IOERR, type);
      const off = Number(sector) * 512;
      if (touchesBad(f, off, len)) return { status: S_OK, type, async: true, run: () => null };
      return {
        status: S_OK,
        type,
        async: true,
        run: (image) => {
          if (write) image.set(gather(m, bufs), off);
          else scatter(m, bufs, image.subarray(off, off + len));
          return write ? 0 : len;
        },
      };
    }
    case T_FLUSH:
      if (!f.flush) return fail(S_UNSUPP, type);
      return { status: S_OK, type, async: true, run: () => 0 };
    case T_GET_ID: {
      const bufs = dataIn(entries);
      if (bufs.length > f.segMax) return fail(S_IOERR, type);
      const n = Math.min(20, inLen - 1);
      return {
        status: S_OK,
        type,
        async: false,
        run: () => {
          scatter(m, bufs, f.id.subarray(0, n));
          return n;
        },
      };
    }
    case T_DISCARD:
    case T_WRITE_ZEROES: {
      const discard = type === T_DISCARD;
      const lim = discard ? f.discard : f.writeZeroes;
      if (lim === null) return fail(S_UNSUPP, type);
      if (f.readOnly) return fail(S_IOERR, type);
      const len = outLen - 16;
      if (len === 0 || len % 16 !== 0) return fail(S_IOERR, type);
      const n = len / 16;
      if (n > Math.max(1, lim.maxSeg)) return fail(S_IOERR, type);
      const ranges: [number, number][] = [];
      for (let i = 0; i < n; i++) {
        const s = dv.getBigUint64(16 + 16 * i, true);
        const num = dv.getUint32(24 + 16 * i, true);
        const flags = dv.getUint32(28 + 16 * i, true);
        if ((flags & ~1) !== 0 || (discard && flags !== 0)) return fail(S_UNSUPP, type);
        if (num > lim.maxSectors) return fail(S_IOERR, type);
        if (s >= 1n << 53n || s + BigInt(num) > cap) return fail(S_IOERR, type);
        ranges.push([Number(s) * 512, num * 512]);
      }
      return {
        status: S_OK,
        type,
        async: true,
        run: (image) => {
          let failed = false;
          for (const [o, l] of ranges) {
            if (touchesBad(f, o, l)) failed = true;
            else image.fill(0, o, o + l);
          }
          return failed ? null : 0;
        },
      };
    }
    default:
      return fail(S_UNSUPP, type);
  }
}

/**
 * Runs one batch through the model: the avail entries `heads` (pop order;
 * null for an avail idx more than the ring size ahead) over descriptor table
 * `table` and `indirect` tables (by guest address). Updates `mem.bytes` and
 * `image` in place. `capacity` is the most entries one chain may have.
 *
 * A chain answered at once (a status from parsing, GET_ID) gets its used
 * entry at once; one the block layer serves gets it when that completes,
 * after the batch. So when a later chain breaks the ring itself (a link
 * that cannot be followed, a head still in flight), the block-layer
 * answers of the batch have their data and status written but no used
 * entry; when the ring breaks for want of a status byte (the ring itself
 * is still sound), every earlier answer is published. With
 * `f.inline` the block layer answers at once too, so nothing waits.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { F_WRITE, runModel } from "./blk_device_model.ts";
 * const mem = { base: 0, split: 4096, bytes: new Uint8Array(4096) };
 * const table = [{ addr: 0x100n, len: 1, flags: F_WRITE, next: 0 }]; // a status byte, no header
 * const f = {
 *   capacity: 8, blkSize: 512, segMax: 4, readOnly: false, flush: true, badSector: null, inline: false,
 *   discard: null, writeZeroes: null, indirectDesc: false, id: new Uint8Array(20),
 * };
 * const r = runModel(f, mem, new Uint8Array(4096), table, new Map(), [0], 4);
 * assert.equal(r.broken, null);
 * assert.deepEqual(r.used, [{ head: 0, len: 1 }]); // IOERR: header too short
 * assert.equal(mem.bytes[0x100], 1);
 * ```
 */
export function runModel(
  f: ModelFeatures,
  mem: ModelMemory,
  image: Uint8Array,
  table: ModelDesc[],
  indirect: Map<bigint, ModelDesc[]>,
  heads: number[] | null,
  capacity: number,
): ModelResult {
  const answers: ModelAnswer[] = [];
  if (heads === null) return { answers, used: [], broken: "AvailIdxJump", unanswered: 0 };
  const inFlight = new Set<number>();
  let broken: string | null = null;
  let ringBroken = false;
  let k = 0;
  for (; k < heads.length; k++) {
    const head = heads[k];
    const w = walk(f, mem, table, indirect, head, capacity);
    if (w.ring !== null) {
      broken = w.ring;
      ringBroken = true;
      break;
    }
    if (inFlight.has(head)) {
      broken = "HeadInUse";
      ringBroken = true;
      break;
    }
    if (w.status < 0 || !w.entries.some((e) => e.write) && w.bufError === null) {
      broken = "NoStatus";
      break;
    }
    let p: Parsed;
    if (w.bufError !== null) p = { status: S_IOERR, type: -1, async: false };
    else p = parse(f, mem, w.entries);
    let inLen: number | null = 0;
    if (p.status === S_OK) inLen = p.run!(image);
    if (inLen === null) p = { ...p, status: S_IOERR }; // the block layer failed it
    mem.bytes[w.status - mem.base] = p.status;
    const async = p.async && !f.inline;
    if (async) inFlight.add(head);
    answers.push({
      head,
      status: p.status,
      usedLen: p.status === S_OK ? inLen! + 1 : 1,
      async,
      carriesData: p.status === S_OK && p.type !== T_FLUSH,
      type: p.type,
    });
  }
  const used = answers.filter((a) => !(ringBroken && a.async)).map((a) => ({
    head: a.head,
    len: a.usedLen,
  }));
  return { answers, used, broken, unanswered: heads.length - k };
}
