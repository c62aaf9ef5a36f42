import assert from "node:assert/strict";
import fc from "fast-check";
import {
  decodeHeader,
  encodeMessage,
  parseMessage,
  payloadKindOf,
  VHOST_USER_GET_CONFIG,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_MAX_REQUEST,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_VRING_ADDR,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_SET_VRING_NUM,
  VHOST_USER_VERSION,
  VhostUserError,
  type VhostUserErrorKind,
  type VhostUserPayload,
} from "../../vhost_user/mod.ts";

const V = VHOST_USER_VERSION;

function parse(bytes: Uint8Array, fds: number[] = []) {
  return parseMessage(bytes.subarray(0, 12), bytes.subarray(12), fds);
}

function rejects(kind: VhostUserErrorKind, f: () => unknown): void {
  assert.throws(f, (e) => e instanceof VhostUserError && e.kind === kind);
}

function header(request: number, flags: number, size: number): Uint8Array {
  const b = new Uint8Array(12);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, request, true);
  dv.setUint32(4, flags, true);
  dv.setUint32(8, size, true);
  return b;
}

Deno.test("layouts: vring addr is 40 bytes, mem table 8 + 32n, config 12 + size", () => {
  const addr = encodeMessage(VHOST_USER_SET_VRING_ADDR, V, {
    kind: "vringAddr",
    index: 1,
    flags: 0,
    descUserAddr: 0x1000n,
    usedUserAddr: 0x3000n,
    availUserAddr: 0x2000n,
    logGuestAddr: 0n,
  });
  assert.equal(addr.length, 12 + 40);
  // descriptor at +8, used at +16, available at +24 (vhost-user.rst order)
  const dv = new DataView(addr.buffer, 12);
  assert.equal(dv.getBigUint64(8, true), 0x1000n);
  assert.equal(dv.getBigUint64(16, true), 0x3000n);
  assert.equal(dv.getBigUint64(24, true), 0x2000n);
  const region = { guestPhysAddr: 1n, size: 2n, userAddr: 3n, mmapOffset: 4n };
  const mt = encodeMessage(VHOST_USER_SET_MEM_TABLE, V, {
    kind: "memTable",
    regions: [region, region],
  });
  assert.equal(mt.length, 12 + 8 + 64);
  const cfg = encodeMessage(VHOST_USER_GET_CONFIG, V, {
    kind: "config",
    offset: 0,
    flags: 0,
    data: new Uint8Array(60),
  });
  assert.equal(cfg.length, 12 + 12 + 60);
});

Deno.test("strict parsing: each malformed shape has its typed error", () => {
  rejects("Truncated", () => decodeHeader(new Uint8Array(11)));
  rejects("BadVersion", () => decodeHeader(header(1, 0, 0)));
  rejects("Oversized", () => decodeHeader(header(1, V, 4097)));
  rejects("UnknownRequest", () => parse(header(999, V, 0)));
  rejects("UnknownRequest", () => parse(header(0, V, 0)));
  // SET_VRING_NUM with a 4-byte payload: truncated; with 12: too big
  const num = encodeMessage(VHOST_USER_SET_VRING_NUM, V, { kind: "vringState", index: 0, num: 8 });
  rejects(
    "Truncated",
    () => parseMessage(header(VHOST_USER_SET_VRING_NUM, V, 4), num.subarray(12, 16), []),
  );
  rejects(
    "BadSize",
    () => parseMessage(header(VHOST_USER_SET_VRING_NUM, V, 12), new Uint8Array(12), []),
  );
  // header size and payload length disagree
  rejects("Truncated", () => parseMessage(num.subarray(0, 12), num.subarray(12, 15), []));
  // GET_FEATURES carries no payload
  rejects(
    "BadSize",
    () => parseMessage(header(VHOST_USER_GET_FEATURES, V, 8), new Uint8Array(8), []),
  );
  // memory table: 0 or 9 regions, or a size that does not match the count
  const mt = (n: number, size: number) => {
    const p = new Uint8Array(size);
    new DataView(p.buffer).setUint32(0, n, true);
    return () => parseMessage(header(VHOST_USER_SET_MEM_TABLE, V, size), p, Array(n).fill(0));
  };
  rejects("BadValue", mt(0, 8));
  rejects("BadValue", mt(9, 8 + 9 * 32));
  rejects("Truncated", mt(2, 8 + 32));
  rejects("BadSize", mt(1, 8 + 64));
  // memory table fds must match the region count
  const region = { guestPhysAddr: 0n, size: 4096n, userAddr: 0n, mmapOffset: 0n };
  const one = encodeMessage(VHOST_USER_SET_MEM_TABLE, V, { kind: "memTable", regions: [region] });
  rejects("BadFdCount", () => parse(one, []));
  rejects("BadFdCount", () => parse(one, [5, 6]));
  assert.equal(parse(one, [5]).fds[0], 5);
  // kick: one fd unless NOFD; reserved bits rejected
  const kick = (v: bigint) =>
    encodeMessage(VHOST_USER_SET_VRING_KICK, V, { kind: "u64", value: v });
  rejects("BadFdCount", () => parse(kick(0n), []));
  rejects("BadFdCount", () => parse(kick(0x100n), [3]));
  rejects("BadValue", () => parse(kick(0x200n), [3]));
  assert.equal(parse(kick(0x101n), []).payload.kind, "u64");
  // config: size over 256, or header size not matching
  const cfg = new Uint8Array(12 + 300);
  new DataView(cfg.buffer).setUint32(4, 300, true);
  rejects("BadValue", () => parseMessage(header(VHOST_USER_GET_CONFIG, V, cfg.length), cfg, []));
  const cfg2 = new Uint8Array(12 + 8);
  new DataView(cfg2.buffer).setUint32(4, 4, true);
  rejects("BadSize", () => parseMessage(header(VHOST_USER_GET_CONFIG, V, cfg2.length), cfg2, []));
  // fds on a request that carries none
  rejects("BadFdCount", () => parse(num, [1]));
});

const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const regionArb = fc.record({ guestPhysAddr: u64, size: u64, userAddr: u64, mmapOffset: u64 })
  .map((r) => ({ ...r }));
const payloadArb: fc.Arbitrary<[number, VhostUserPayload, number]> = fc.oneof(
  fc.constant<[number, VhostUserPayload, number]>([1, { kind: "empty" }, 0]),
  u64.map((value): [number, VhostUserPayload, number] => [2, { kind: "u64", value }, 0]),
  fc.tuple(u32, u32).map(([index, num]): [number, VhostUserPayload, number] => [8, {
    kind: "vringState",
    index,
    num,
  }, 0]),
  fc.tuple(u32, u32, u64, u64, u64, u64).map(([index, flags, d, u, a, l]): [
    number,
    VhostUserPayload,
    number,
  ] => [9, {
    kind: "vringAddr",
    index,
    flags,
    descUserAddr: d,
    usedUserAddr: u,
    availUserAddr: a,
    logGuestAddr: l,
  }, 0]),
  fc.array(regionArb, { minLength: 1, maxLength: 8 }).map((regions): [
    number,
    VhostUserPayload,
    number,
  ] => [5, { kind: "memTable", regions }, regions.length]),
  fc.tuple(u32, u32, fc.uint8Array({ maxLength: 256 })).map(([offset, flags, data]): [
    number,
    VhostUserPayload,
    number,
  ] => [25, { kind: "config", offset, flags, data }, 0]),
);

Deno.test("fuzz: encode -> parse round-trips every modelled payload", () => {
  fc.assert(
    fc.property(payloadArb, fc.boolean(), ([request, payload, nfds], needReply) => {
      const flags = V | (needReply ? VHOST_USER_NEED_REPLY_MASK : 0);
      const bytes = encodeMessage(request, flags, payload);
      const fds = Array.from({ length: nfds }, (_, i) => 100 + i);
      const m = parse(bytes, fds);
      assert.equal(m.request, request);
      assert.equal(m.flags, flags);
      assert.deepEqual(m.payload, payload);
      assert.deepEqual(m.fds, fds);
    }),
    { numRuns: 500 },
  );
});

Deno.test("fuzz: arbitrary bytes and fd counts either parse or throw VhostUserError, nothing else", () => {
  const check = (hdr: Uint8Array, payload: Uint8Array, nfds: number) => {
    try {
      const m = parseMessage(hdr, payload, Array(nfds).fill(7));
      assert.ok(m.request >= 1 && m.request <= VHOST_USER_MAX_REQUEST);
      assert.ok(payloadKindOf(m.request) !== undefined);
    } catch (e) {
      if (!(e instanceof VhostUserError)) throw e;
    }
  };
  // fully random bytes
  fc.assert(
    fc.property(
      fc.uint8Array({ maxLength: 16 }),
      fc.uint8Array({ maxLength: 400 }),
      fc.nat(10),
      check,
    ),
    { numRuns: 2000 },
  );
  // plausible headers: valid version, known-ish request codes, size matching the payload
  fc.assert(
    fc.property(
      fc.integer({ min: 0, max: 45 }),
      fc.integer({ min: 0, max: 15 }),
      fc.uint8Array({ maxLength: 300 }),
      fc.nat(9),
      (req, flags, payload, nfds) =>
        check(header(req, (flags & ~3) | V, payload.length), payload, nfds),
    ),
    { numRuns: 5000 },
  );
});

Deno.test("SET_VRING_CALL with NOFD carries no fd", () => {
  const b = encodeMessage(VHOST_USER_SET_VRING_CALL, V, { kind: "u64", value: 0x103n });
  const m = parse(b, []);
  assert.equal(m.payload.kind, "u64");
});
