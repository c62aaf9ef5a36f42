/**
 * The hostile-request catalogue (issues 6 and 10): requests a device must
 * answer with a status (STATUS_CASES) and malformed chains it must answer
 * with IOERR or refuse by breaking the ring (HOSTILE_CASES), each built on a
 * {@link HostileGuest}'s queue. Used by hostile_requests_test.ts against our
 * host and by differential_qsd_test.ts against our host and
 * qemu-storage-daemon side by side.
 *
 * @module
 */

import { GPA_BASE } from "../../client/guest_ram.ts";
import type { GuestBuffer } from "../../client/guest_ram.ts";
import { ECONNRESET, eventfdWrite, SysError } from "../../sys/mod.ts";
import { type HostileGuest, INDIRECT, MiB, type RawDesc, WRITE } from "./robustness_util.ts";

export const T_IN = 0, T_OUT = 1, T_DISCARD = 11, T_WRITE_ZEROES = 13;
export const S_OK = 0, S_IOERR = 1, S_UNSUPP = 2;
/** The catalogue's device size in sectors: a 64 MiB image. */
export const CAPACITY = (64 * MiB) / 512;

/** Readable descriptor of a buffer. */
export const rd = (b: GuestBuffer, len = b.length): RawDesc => ({ addr: b.gpa, len, flags: 0 });
/** Device-writable descriptor of a buffer. */
export const wr = (b: GuestBuffer, len = b.length): RawDesc => ({ addr: b.gpa, len, flags: WRITE });

// ---- requests the device answers with a status --------------------------------------

export interface StatusCase {
  name: string;
  want: number;
  build(g: HostileGuest, qi: number, status: GuestBuffer): number;
}

/** header + optional data (readable for OUT, writable for IN) + status. */
export function io(type: number, sector: bigint, len: number): StatusCase["build"] {
  return (g, qi, st) => {
    const h = g.header(type, sector);
    if (len === 0) return g.chain(qi, [rd(h), wr(st)]);
    const d = g.alloc(len, 512);
    return g.chain(qi, [rd(h), type === T_OUT ? rd(d) : wr(d), wr(st)]);
  };
}

/** discard / write-zeroes with one segment (sector, num sectors, flags); `segBytes` overrides 16. */
export function ranges(
  type: number,
  sector: bigint,
  num: number,
  flags = 0,
  segBytes = 16,
): StatusCase["build"] {
  return (g, qi, st) => {
    const h = g.header(type, 0n, segBytes);
    const dv = new DataView(h.bytes.buffer, h.bytes.byteOffset + 16, segBytes);
    if (segBytes >= 16) {
      dv.setBigUint64(0, BigInt.asUintN(64, sector), true);
      dv.setUint32(8, num, true);
      dv.setUint32(12, flags, true);
    }
    return g.chain(qi, [rd(h, 16 + segBytes), wr(st)]);
  };
}

export const STATUS_CASES: StatusCase[] = [
  { name: "unknown request type", want: S_UNSUPP, build: io(0xdead, 0n, 0) },
  { name: "unknown type with data", want: S_UNSUPP, build: io(7, 0n, 512) },
  { name: "read at capacity", want: S_IOERR, build: io(T_IN, BigInt(CAPACITY), 512) },
  { name: "read crossing capacity", want: S_IOERR, build: io(T_IN, BigInt(CAPACITY - 1), 1024) },
  { name: "last sector (valid)", want: S_OK, build: io(T_IN, BigInt(CAPACITY - 1), 512) },
  { name: "sector 2^64-1", want: S_IOERR, build: io(T_IN, (1n << 64n) - 1n, 512) },
  {
    name: "write at sector 2^55 (bytes overflow 2^64)",
    want: S_IOERR,
    build: io(T_OUT, 1n << 55n, 512),
  },
  { name: "sector 2^53-1", want: S_IOERR, build: io(T_IN, (1n << 53n) - 1n, 512) },
  { name: "read of 511 bytes", want: S_IOERR, build: io(T_IN, 0n, 511) },
  { name: "write of 100 bytes", want: S_IOERR, build: io(T_OUT, 0n, 100) },
  { name: "discard beyond capacity", want: S_IOERR, build: ranges(T_DISCARD, BigInt(CAPACITY), 8) },
  {
    name: "write-zeroes at sector 2^64-8",
    want: S_IOERR,
    build: ranges(T_WRITE_ZEROES, (1n << 64n) - 8n, 8),
  },
  { name: "discard with an 8-byte segment", want: S_IOERR, build: ranges(T_DISCARD, 0n, 8, 0, 8) },
  { name: "discard with UNMAP flag", want: S_UNSUPP, build: ranges(T_DISCARD, 0n, 8, 1) },
  { name: "write-zeroes unknown flags", want: S_UNSUPP, build: ranges(T_WRITE_ZEROES, 0n, 8, 6) },
];

// ---- malformed chains: answered, or the connection closed --------------------------

/**
 * What the host must do with a malformed chain (docs/design.md, "Malformed
 * chains"): "IOERR" = the status byte can be located and written safely, so the
 * request is answered and the queue keeps serving; "close" = the ring cannot be
 * trusted (or the status byte cannot be written): the err eventfd fires and the
 * connection is closed. Either must happen within a second (issue 10).
 */
export type Outcome = "IOERR" | "close";

export interface HostileCase {
  name: string;
  expect: Outcome;
  /** Substring of the broken reason the host reports ("close" cases). */
  reason?: string;
  /** Puts the hostile input on queue 0 and kicks; returns the status byte to check (IOERR). */
  run(g: HostileGuest): GuestBuffer | null;
}

/** The chain `bufs(g, status)` on queue 0, submitted; `status` is the status byte buffer. */
function chainCase(
  name: string,
  expect: Outcome,
  reason: string | undefined,
  bufs: (g: HostileGuest, status: GuestBuffer) => RawDesc[],
): HostileCase {
  return {
    name,
    expect,
    reason,
    run: (g) => {
      const st = g.statusByte();
      g.submit(0, g.chain(0, bufs(g, st)));
      return st;
    },
  };
}

/** Submits one indirect descriptor built by `make` (the table is 8 entries of spare memory). */
function indirectCase(
  name: string,
  reason: string,
  make: (g: HostileGuest, table: GuestBuffer) => RawDesc,
): HostileCase {
  return {
    name,
    expect: "close",
    reason,
    run: (g) => {
      const table = g.alloc(16 * 8, 16);
      g.submit(0, g.chain(0, [make(g, table)]));
      return null;
    },
  };
}

/** Fills an indirect table with a valid read: header, 512 bytes, status. */
function validTable(g: HostileGuest, table: GuestBuffer): void {
  const h = g.header(T_IN, 0n), d = g.alloc(512, 512), st = g.statusByte();
  g.setDesc(0, 0, { ...rd(h), flags: 1, next: 1 }, table.bytes);
  g.setDesc(0, 1, { ...wr(d), flags: 1 | WRITE, next: 2 }, table.bytes);
  g.setDesc(0, 2, wr(st), table.bytes);
}

export const HOSTILE_CASES: HostileCase[] = [
  // The chain is well formed as a list and ends in a usable status byte: IOERR.
  chainCase("data buffer outside guest memory", "IOERR", undefined, (g, st) => [
    rd(g.header(T_IN, 0n)),
    { addr: 0x1000, len: 512, flags: WRITE },
    wr(st),
  ]),
  chainCase("header outside guest memory", "IOERR", undefined, (g, st) => [
    { addr: 0x2000, len: 16, flags: 0 },
    wr(g.alloc(512, 512)),
    wr(st),
  ]),
  chainCase("buffer wrapping past 2^64", "IOERR", undefined, (g, st) => [
    rd(g.header(T_IN, 0n)),
    { addr: (1n << 64n) - 256n, len: 512, flags: WRITE },
    wr(st),
  ]),
  chainCase("buffer of length 2^32-1", "IOERR", undefined, (g, st) => [
    rd(g.header(T_IN, 0n)),
    { addr: g.alloc(512, 512).gpa, len: 0xffffffff, flags: WRITE },
    wr(st),
  ]),
  // GuestRam leaves a GPA_GAP hole after every region, so this runs into a
  // hole: still IOERR. (A buffer spanning adjacent regions is split and served,
  // issue 10 section 3: tests/virtio/blk_request_test.ts "adjacent regions".)
  chainCase(
    "buffer straddling the end of a region (into the hole)",
    "IOERR",
    undefined,
    (g, st) => {
      const r = g.client.ram!.regions[0];
      return [rd(g.header(T_IN, 0n)), {
        addr: r.guestPhysAddr + r.size - 256,
        len: 512,
        flags: WRITE,
      }, wr(st)];
    },
  ),
  chainCase("header shorter than 16 bytes", "IOERR", undefined, (g, st) => [
    rd(g.header(T_IN, 0n), 8),
    wr(g.alloc(512, 512)),
    wr(st),
  ]),
  chainCase("zero-length data buffer", "IOERR", undefined, (g, st) => [
    rd(g.header(T_IN, 0n)),
    { ...wr(g.alloc(512)), len: 0 },
    wr(st),
  ]),
  chainCase("readable buffer after a writable one, status last", "IOERR", undefined, (g, st) => [
    rd(g.header(T_IN, 0n)),
    wr(g.alloc(512, 512)),
    rd(g.alloc(512)),
    wr(st),
  ]),
  {
    name: "indirect table with a data buffer outside guest memory",
    expect: "IOERR",
    run: (g) => {
      const t = g.alloc(48, 16), st = g.statusByte();
      g.setDesc(0, 0, { ...rd(g.header(T_IN, 0n)), flags: 1, next: 1 }, t.bytes);
      g.setDesc(0, 1, { addr: 0x1000, len: 512, flags: 1 | WRITE, next: 2 }, t.bytes);
      g.setDesc(0, 2, wr(st), t.bytes);
      g.submit(0, g.chain(0, [{ addr: t.gpa, len: 48, flags: INDIRECT }]));
      return st;
    },
  },
  // No status byte the device may write: the driver is broken.
  chainCase("status in the hole between regions", "close", "OutOfRange", (g) => {
    const r = g.client.ram!.regions[0];
    return [rd(g.header(T_IN, 0n)), {
      addr: r.guestPhysAddr + r.size + 4096,
      len: 1,
      flags: WRITE,
    }];
  }),
  chainCase("status wrapping past 2^64", "close", "OutOfRange", (g) => [
    rd(g.header(T_IN, 0n)),
    { addr: (1n << 64n) - 1n, len: 2, flags: WRITE },
  ]),
  chainCase("missing status descriptor", "close", "NoStatus", (g) => [
    rd(g.header(T_OUT, 0n)),
    rd(g.alloc(512)),
  ]),
  chainCase("status descriptor read-only (no writable buffer)", "close", "NoStatus", (g, st) => [
    rd(g.header(T_OUT, 0n)),
    rd(st),
  ]),
  chainCase("status descriptor read-only after writable data", "close", "BadOrder", (g, st) => [
    rd(g.header(T_IN, 0n)),
    wr(g.alloc(512, 512)),
    rd(st),
  ]),
  chainCase("zero-length status descriptor", "close", "ZeroLength", (g, st) => [
    rd(g.header(T_IN, 0n)),
    wr(g.alloc(512, 512)),
    { ...wr(st), len: 0 },
  ]),
  // The chain itself cannot be followed: the ring cannot be trusted.
  {
    name: "chain loop",
    expect: "close",
    reason: "Loop",
    run: (g) => {
      const [a, b] = g.descs(0, 2);
      g.setDesc(0, a, { ...rd(g.header(T_IN, 0n)), flags: 1, next: b });
      g.setDesc(0, b, { ...rd(g.alloc(512)), flags: 1, next: a });
      g.submit(0, a);
      return null;
    },
  },
  {
    name: "next beyond the table",
    expect: "close",
    reason: "NextOutOfRange",
    run: (g) => {
      g.submit(0, g.chain(0, [{ ...rd(g.header(T_IN, 0n)), flags: 1, next: 4000 }]));
      return null;
    },
  },
  {
    name: "head beyond the queue size",
    expect: "close",
    reason: "HeadOutOfRange",
    run: (g) => {
      g.submit(0, 200);
      return null;
    },
  },
  indirectCase("indirect table length not a multiple of 16", "IndirectBadLength", (g, t) => {
    validTable(g, t);
    return { addr: t.gpa, len: 40, flags: INDIRECT };
  }),
  indirectCase("indirect table of length 0", "IndirectBadLength", (_g, t) => {
    return { addr: t.gpa, len: 0, flags: INDIRECT };
  }),
  indirectCase("nested indirect", "NestedIndirect", (g, t) => {
    const inner = g.alloc(48, 16);
    validTable(g, inner);
    g.setDesc(0, 0, { addr: inner.gpa, len: 48, flags: INDIRECT }, t.bytes);
    return { addr: t.gpa, len: 16, flags: INDIRECT };
  }),
  indirectCase("indirect with NEXT", "IndirectWithNext", (g, t) => {
    validTable(g, t);
    return { addr: t.gpa, len: 48, flags: INDIRECT | 1, next: 0 };
  }),
  indirectCase("indirect table outside memory", "OutOfRange", () => {
    return { addr: GPA_BASE - 4096, len: 48, flags: INDIRECT };
  }),
  {
    name: "avail idx jumps beyond the queue size",
    expect: "close",
    reason: "AvailIdxJump",
    run: (g) => {
      g.setAvailIdx(0, g.client.queues[0].ring.availIdx + 65);
      eventfdWrite(g.client.queues[0].kickFd, 1);
      return null;
    },
  },
  {
    name: "avail idx moves backwards",
    expect: "close",
    reason: "AvailIdxJump",
    run: (g) => {
      g.setAvailIdx(0, g.client.queues[0].ring.availIdx - 1);
      eventfdWrite(g.client.queues[0].kickFd, 1);
      return null;
    },
  },
];

/** Whether the host closes `g`'s connection within `ms` (a reset counts: our bytes were unread). */
export async function closedWithin(g: HostileGuest, ms: number): Promise<boolean> {
  return await g.client.frontend.waitClosed(ms).catch((e) =>
    e instanceof SysError && e.errno === ECONNRESET
  );
}
