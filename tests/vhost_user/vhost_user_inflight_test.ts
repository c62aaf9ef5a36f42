// GET_INFLIGHT_FD / SET_INFLIGHT_FD: the message layout, what VhostUserHandler
// accepts from an untrusted front-end, and which part of the region each ring
// gets.

import assert from "node:assert/strict";
import {
  eventfd,
  fstat,
  ftruncate,
  isOpen,
  memfdCreate,
  mmapShared,
  O_RDONLY,
  open,
} from "../../sys/mod.ts";
import { inflightQueueRegionSize } from "../../virtio/mod.ts";
import {
  encodeMessage,
  parseMessage,
  VHOST_USER_GET_INFLIGHT_FD,
  VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD,
  VHOST_USER_SET_INFLIGHT_FD,
  VHOST_USER_VERSION,
  type VhostUserDevice,
  VhostUserError,
  VhostUserHandler,
  type VringSetup,
} from "../../vhost_user/mod.ts";

const INFLIGHT = 1n << BigInt(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD);

function fakeDevice(started: VringSetup[]): VhostUserDevice {
  return {
    features: () => 1n << 32n,
    protocolFeatures: () => 0n,
    numQueues: () => 2,
    setFeatures() {},
    setProtocolFeatures() {},
    getConfig: (_o, n) => new Uint8Array(n),
    setConfig() {},
    setMemTable() {},
    startQueue: (s) => void started.push(s),
    stopQueue: () => 0,
    updateQueue() {},
    reset() {},
  };
}

Deno.test("inflight description: 24 bytes, round trip, fd count checked", () => {
  const payload = {
    kind: "inflight" as const,
    mmapSize: 8320n,
    mmapOffset: 0n,
    numQueues: 2,
    queueSize: 256,
  };
  const bytes = encodeMessage(VHOST_USER_SET_INFLIGHT_FD, VHOST_USER_VERSION, payload);
  assert.equal(bytes.byteLength, 12 + 24);
  const m = parseMessage(bytes.subarray(0, 12), bytes.subarray(12), [5]);
  assert.deepEqual(m.payload, payload);
  assert.throws(
    () => parseMessage(bytes.subarray(0, 12), bytes.subarray(12), []),
    (e: unknown) => e instanceof VhostUserError && e.kind === "BadFdCount",
  );
  const get = encodeMessage(VHOST_USER_GET_INFLIGHT_FD, VHOST_USER_VERSION, payload);
  assert.equal(parseMessage(get.subarray(0, 12), get.subarray(12), []).payload.kind, "inflight");
  const short = new Uint8Array([...get.subarray(0, 12)]);
  new DataView(short.buffer).setUint32(8, 20, true);
  assert.throws(
    () => parseMessage(short, get.subarray(12, 32), []),
    (e: unknown) => e instanceof VhostUserError && e.kind === "Truncated",
  );
});

Deno.test("handler: the inflight feature is offered, and refused until negotiated", () => {
  const h = new VhostUserHandler(fakeDevice([]));
  assert.equal(h.protocolFeatures() & INFLIGHT, INFLIGHT);
  assert.throws(() => h.getInflightFd(1, 128), /not negotiated/);
  const fd = memfdCreate("x");
  assert.throws(
    () => h.setInflightFd({ fd, mmapSize: 4096, mmapOffset: 0, numQueues: 1, queueSize: 128 }),
    /not negotiated/,
  );
  assert.ok(!isOpen(fd), "a refused SET_INFLIGHT_FD still closes its fd");
});

Deno.test("handler: GET_INFLIGHT_FD gives a zeroed sealed memfd; SET_INFLIGHT_FD maps it and each ring gets its part", async () => {
  const started: VringSetup[] = [];
  const h = new VhostUserHandler(fakeDevice(started));
  await h.setProtocolFeatures(INFLIGHT);
  const r = h.getInflightFd(2, 128);
  assert.equal(r.mmapSize, 2 * inflightQueueRegionSize(128));
  assert.equal(fstat(r.fd).size, r.mmapSize);
  assert.throws(() => ftruncate(r.fd, 64), { code: "EPERM" }, "sealed against shrinking");
  const view = mmapShared(r.fd, r.mmapSize, 0);
  assert.ok(view.bytes.every((b) => b === 0));
  await h.setInflightFd({ ...r });
  assert.ok(!isOpen(r.fd), "the handler closes the fd once mapped");
  for (const i of [0, 1]) {
    await h.setVringNum(i, 128);
    await h.setVringAddr(i, {
      flags: 0,
      descUserAddr: 0,
      availUserAddr: 0,
      usedUserAddr: 0,
      logGuestAddr: 0,
    });
    await h.setVringKick(i, eventfd());
  }
  assert.equal(started.length, 2);
  assert.equal(started[0].inflight?.queueSize, 128);
  assert.equal(started[1].inflight!.addr - started[0].inflight!.addr, inflightQueueRegionSize(128));
  // The handler's mapping and the front-end's are the same memory.
  new Uint8Array(view.buffer)[inflightQueueRegionSize(128) + 9] = 0x5a;
  const ring1 = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(
    Deno.UnsafePointer.create(BigInt(started[1].inflight!.addr))!,
    16,
  ));
  assert.equal(ring1[9], 0x5a);
  // Not while rings run.
  const again = h.getInflightFd(2, 128);
  assert.throws(() => h.setInflightFd({ ...again }), /while rings are running/);
  await h.reset();
  view.unmap();
});

Deno.test("handler: SET_INFLIGHT_FD refuses regions that do not hold what they claim", async () => {
  const h = new VhostUserHandler(fakeDevice([]));
  await h.setProtocolFeatures(INFLIGHT);
  const small = memfdCreate("small");
  ftruncate(small, 4096);
  const cases: [string, () => void][] = [
    [
      "file too small",
      () =>
        h.setInflightFd({ fd: small, mmapSize: 8192, mmapOffset: 0, numQueues: 1, queueSize: 256 }),
    ],
    [
      "size below queues x region",
      () => {
        const fd = memfdCreate("y");
        ftruncate(fd, 1 << 20);
        h.setInflightFd({ fd, mmapSize: 64, mmapOffset: 0, numQueues: 2, queueSize: 256 });
      },
    ],
    [
      "more queues than the device",
      () => {
        const fd = memfdCreate("z");
        ftruncate(fd, 1 << 20);
        h.setInflightFd({ fd, mmapSize: 1 << 20, mmapOffset: 0, numQueues: 3, queueSize: 8 });
      },
    ],
    [
      "not a regular file",
      () => {
        const fd = open("/dev/zero", O_RDONLY);
        h.setInflightFd({ fd, mmapSize: 4096, mmapOffset: 0, numQueues: 1, queueSize: 8 });
      },
    ],
  ];
  for (const [what, f] of cases) assert.throws(f, RangeError, what);
  assert.ok(!isOpen(small));
  // A ring larger than the region's queue size cannot start.
  const fd = memfdCreate("ok");
  ftruncate(fd, inflightQueueRegionSize(64));
  h.setInflightFd({
    fd,
    mmapSize: inflightQueueRegionSize(64),
    mmapOffset: 0,
    numQueues: 1,
    queueSize: 64,
  });
  await h.setVringNum(0, 128);
  await h.setVringAddr(0, {
    flags: 0,
    descUserAddr: 0,
    availUserAddr: 0,
    usedUserAddr: 0,
    logGuestAddr: 0,
  });
  const kick = eventfd();
  await assert.rejects(h.setVringKick(0, kick), /not in the inflight region/);
  assert.ok(!isOpen(kick));
  await h.reset();
});
