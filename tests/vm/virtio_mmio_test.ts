/**
 * The virtio-mmio transport as a hostile guest meets it, driven directly
 * (no KVM): every out-of-order write is ignored, every state the device
 * cannot go on from is DEVICE_NEEDS_RESET with a configuration interrupt,
 * nothing throws; and a random register stream (fast-check) never breaks
 * the status invariants.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK,
  VIRTIO_CONFIG_S_DRIVER as DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK,
  VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
  VIRTIO_MMIO as R,
  VIRTIO_MMIO_INT_CONFIG,
  VIRTIO_MMIO_INT_VRING,
  VIRTIO_MMIO_MAGIC,
  VIRTIO_MMIO_SIZE,
  type VirtioMmioBackend,
  VirtioMmioDevice,
  type VirtioMmioQueue,
} from "../../vm/mod.ts";

const VERSION_1 = 1n << 32n;
const OFFERED = VERSION_1 | (1n << 9n) | (1n << 28n);

class FakeBackend implements VirtioMmioBackend {
  readonly deviceId = 2;
  readonly deviceFeatures = OFFERED;
  readonly numQueues = 2;
  readonly queueNumMax = 256;
  readonly events: string[] = [];
  readonly cfg = new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  /** Makes startQueue throw (a ring outside RAM, as the IOThread refuses it). */
  refuseStart: string | null = null;
  /** Milliseconds stopQueue takes (requests in flight). */
  stopDelayMs = 0;
  started = new Map<number, VirtioMmioQueue>();

  config(): Uint8Array {
    return this.cfg;
  }
  writeConfig(offset: number, data: Uint8Array): void {
    if (offset !== 9 || data.length !== 1) throw new Error("read-only field");
    this.cfg[9] = data[0];
  }
  startQueue(q: VirtioMmioQueue, features: bigint): Promise<void> {
    if (this.refuseStart !== null) return Promise.reject(new Error(this.refuseStart));
    this.events.push(`start ${q.index} features ${features.toString(16)}`);
    this.started.set(q.index, q);
    return Promise.resolve();
  }
  async stopQueue(index: number): Promise<void> {
    this.events.push(`stop ${index} begin`);
    await new Promise((r) => setTimeout(r, this.stopDelayMs));
    this.started.delete(index);
    this.events.push(`stop ${index} end`);
  }
  notify(index: number): void {
    this.events.push(`notify ${index}`);
  }
}

function setup(log: string[] = []) {
  const backend = new FakeBackend();
  const isr = new Int32Array(new SharedArrayBuffer(4));
  let irqs = 0;
  const dev = new VirtioMmioDevice(backend, {
    isr,
    raiseIrq: () => irqs++,
    log: (l) => log.push(l),
  });
  const w = (off: number, v: number | bigint, size = 4) => dev.write(off, size, BigInt(v));
  const r = (off: number, size = 4) => Number(dev.read(off, size));
  return { backend, isr, dev, w, r, irqs: () => irqs, log };
}

async function negotiate(
  w: (o: number, v: number | bigint) => Promise<void>,
  features = VERSION_1,
) {
  await w(R.STATUS, 0);
  await w(R.STATUS, ACK);
  await w(R.STATUS, ACK | DRIVER);
  await w(R.DRIVER_FEATURES_SEL, 0);
  await w(R.DRIVER_FEATURES, Number(features & 0xffffffffn));
  await w(R.DRIVER_FEATURES_SEL, 1);
  await w(R.DRIVER_FEATURES, Number(features >> 32n));
  await w(R.STATUS, ACK | DRIVER | FEATURES_OK);
}

async function setQueue(
  w: (o: number, v: number | bigint) => Promise<void>,
  index: number,
  q = { num: 128, desc: 0x10000, driver: 0x11000, device: 0x12000 },
) {
  await w(R.QUEUE_SEL, index);
  await w(R.QUEUE_NUM, q.num);
  await w(R.QUEUE_DESC_LOW, q.desc);
  await w(R.QUEUE_DESC_HIGH, 0);
  await w(R.QUEUE_DRIVER_LOW, q.driver);
  await w(R.QUEUE_DRIVER_HIGH, 0);
  await w(R.QUEUE_DEVICE_LOW, q.device);
  await w(R.QUEUE_DEVICE_HIGH, 0);
  await w(R.QUEUE_READY, 1);
}

Deno.test("virtio-mmio: identification registers and feature words", () => {
  const { r, w } = setup();
  assert.equal(r(R.MAGIC_VALUE), VIRTIO_MMIO_MAGIC);
  assert.equal(r(R.VERSION), 2);
  assert.equal(r(R.DEVICE_ID), 2);
  void w(R.DEVICE_FEATURES_SEL, 1);
  assert.equal(r(R.DEVICE_FEATURES), 1);
  void w(R.DEVICE_FEATURES_SEL, 0);
  assert.equal(r(R.DEVICE_FEATURES), (1 << 9) | (1 << 28));
  void w(R.DEVICE_FEATURES_SEL, 7);
  assert.equal(r(R.DEVICE_FEATURES), 0);
  assert.equal(r(R.SHM_LEN_LOW), 0xffffffff);
});

Deno.test("virtio-mmio: a well-behaved driver starts its queues at DRIVER_OK", async () => {
  const { backend, w, r, dev } = setup();
  await negotiate(w, VERSION_1 | (1n << 9n));
  assert.equal(r(R.STATUS), ACK | DRIVER | FEATURES_OK);
  await setQueue(w, 0);
  assert.equal(r(R.QUEUE_READY), 1);
  assert.deepEqual(backend.events, [], "nothing starts before DRIVER_OK");
  await w(R.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
  assert.deepEqual(backend.events, ["start 0 features 100000200"]);
  assert.deepEqual(backend.started.get(0), {
    index: 0,
    size: 128,
    desc: 0x10000,
    driver: 0x11000,
    device: 0x12000,
  });
  assert.ok(dev.queueStarted(0));
  assert.equal(dev.guestErrors, 0);
});

Deno.test("virtio-mmio: register writes out of order are ignored", async () => {
  const { backend, w, r, dev } = setup();
  // Queue registers before FEATURES_OK.
  await w(R.STATUS, ACK | DRIVER);
  await w(R.QUEUE_SEL, 0);
  await w(R.QUEUE_NUM, 64);
  await w(R.QUEUE_READY, 1);
  assert.equal(r(R.QUEUE_NUM), 0);
  assert.equal(r(R.QUEUE_READY), 0);
  // Features before DRIVER, then after FEATURES_OK.
  await w(R.STATUS, 0);
  await w(R.DRIVER_FEATURES, 1 << 9);
  await negotiate(w);
  await w(R.DRIVER_FEATURES_SEL, 0);
  await w(R.DRIVER_FEATURES, 1 << 9);
  assert.equal(dev.driverFeatures, VERSION_1);
  // A ready queue's registers cannot change.
  await setQueue(w, 0);
  await w(R.QUEUE_DESC_LOW, 0x40000);
  assert.equal(r(R.QUEUE_DESC_LOW), 0x10000);
  // Clearing a status bit other than by reset.
  await w(R.STATUS, ACK | FEATURES_OK);
  assert.equal(r(R.STATUS), ACK | DRIVER | FEATURES_OK);
  // Writing NEEDS_RESET or a read-only register.
  await w(R.STATUS, ACK | DRIVER | FEATURES_OK | NEEDS_RESET);
  assert.equal(r(R.STATUS) & NEEDS_RESET, 0);
  await w(R.MAGIC_VALUE, 0);
  assert.equal(r(R.MAGIC_VALUE), VIRTIO_MMIO_MAGIC);
  assert.deepEqual(backend.events, []);
  assert.ok(dev.guestErrors >= 6, `${dev.guestErrors} guest errors`);
});

Deno.test("virtio-mmio: FEATURES_OK is refused without VERSION_1 or with features not offered", async () => {
  for (const f of [0n, 1n << 9n, VERSION_1 | (1n << 12n), VERSION_1 | (1n << 40n)]) {
    const { w, r } = setup();
    await negotiate(w, f);
    assert.equal(r(R.STATUS), ACK | DRIVER, `features ${f.toString(16)}`);
  }
});

Deno.test("virtio-mmio: DRIVER_OK without FEATURES_OK: NEEDS_RESET and a config interrupt", async () => {
  const { backend, w, r, isr, irqs } = setup();
  await w(R.STATUS, ACK | DRIVER);
  await w(R.STATUS, ACK | DRIVER | DRIVER_OK);
  assert.equal(r(R.STATUS) & NEEDS_RESET, NEEDS_RESET);
  assert.equal(r(R.STATUS) & DRIVER_OK, 0);
  assert.deepEqual(backend.events, []);
  // Without DRIVER_OK no interrupt is due yet; the status says it all.
  assert.equal(irqs(), 0);
  assert.equal(isr[0], 0);
  await w(R.STATUS, 0);
  assert.equal(r(R.STATUS), 0);
});

Deno.test("virtio-mmio: bad queue sizes and misaligned rings leave the queue not ready", async () => {
  const bad = [
    { num: 0, desc: 0x10000, driver: 0x11000, device: 0x12000 },
    { num: 512, desc: 0x10000, driver: 0x11000, device: 0x12000 },
    { num: 100, desc: 0x10000, driver: 0x11000, device: 0x12000 },
    { num: 128, desc: 0x10008, driver: 0x11000, device: 0x12000 },
    { num: 128, desc: 0x10000, driver: 0x11001, device: 0x12000 },
    { num: 128, desc: 0x10000, driver: 0x11000, device: 0x12002 },
  ];
  for (const q of bad) {
    const { backend, w, r, dev } = setup();
    await negotiate(w);
    await setQueue(w, 0, q);
    assert.equal(r(R.QUEUE_READY), 0, JSON.stringify(q));
    await w(R.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert.deepEqual(backend.events, []);
    assert.equal(r(R.STATUS) & NEEDS_RESET, 0);
    assert.ok(dev.guestErrors > 0);
  }
});

Deno.test("virtio-mmio: a ring the backend refuses (outside RAM) sets NEEDS_RESET and raises a config interrupt; a reset recovers", async () => {
  const log: string[] = [];
  const { backend, w, r, isr, irqs, dev } = setup(log);
  await negotiate(w);
  backend.refuseStart = "descriptor table outside guest memory";
  await setQueue(w, 0, { num: 128, desc: 0xfff00000, driver: 0x11000, device: 0x12000 });
  await w(R.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
  assert.equal(r(R.STATUS) & NEEDS_RESET, NEEDS_RESET);
  assert.equal(r(R.INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
  assert.equal(irqs(), 1);
  assert.ok(log.some((l) => l.includes("outside guest memory")), log.join("\n"));
  assert.ok(!dev.queueStarted(0));
  // Queue registers are ignored while the device needs a reset.
  await w(R.QUEUE_SEL, 1);
  await w(R.QUEUE_NUM, 64);
  assert.equal(r(R.QUEUE_NUM), 0);
  await w(R.INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
  assert.equal(isr[0], 0);
  backend.refuseStart = null;
  await negotiate(w); // starts with a reset
  await setQueue(w, 0);
  await w(R.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
  assert.equal(r(R.STATUS), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
  assert.ok(dev.queueStarted(0));
});

Deno.test("virtio-mmio: a ring that breaks in its IOThread puts the device in NEEDS_RESET and stops its queues", async () => {
  const { backend, w, r, irqs, dev } = setup();
  await negotiate(w);
  await setQueue(w, 0);
  await w(R.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
  // What KvmVm calls when blkBrokenQueues reports the ring.
  await dev.deviceError("queue 0: chain loop");
  assert.equal(r(R.STATUS) & NEEDS_RESET, NEEDS_RESET);
  assert.equal(r(R.INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
  assert.equal(irqs(), 1);
  assert.deepEqual(backend.events.slice(-2), ["stop 0 begin", "stop 0 end"]);
  assert.ok(!dev.queueStarted(0));
  // A second error changes nothing more.
  await dev.deviceError("again");
  assert.equal(irqs(), 1);
});

Deno.test("virtio-mmio: QueueNotify for a queue that does not exist or is not running is ignored", async () => {
  const { backend, w, dev } = setup();
  await w(R.QUEUE_NOTIFY, 0);
  await w(R.QUEUE_NOTIFY, 7);
  await w(R.QUEUE_NOTIFY, 0xffffffff);
  assert.deepEqual(backend.events, []);
  assert.equal(dev.guestErrors, 3);
  await negotiate(w);
  await setQueue(w, 0);
  await w(R.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
  await w(R.QUEUE_NOTIFY, 1);
  await w(R.QUEUE_NOTIFY, 0);
  assert.deepEqual(backend.events, ["start 0 features 100000000", "notify 0"]);
});

Deno.test("virtio-mmio: a reset with requests in flight returns only once its queues stopped", async () => {
  const { backend, w, r, isr } = setup();
  backend.stopDelayMs = 30;
  await negotiate(w);
  await setQueue(w, 0);
  await setQueue(w, 1);
  await w(R.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
  Atomics.store(isr, 0, VIRTIO_MMIO_INT_VRING);
  await w(R.STATUS, 0);
  assert.deepEqual(backend.events.slice(2), [
    "stop 0 begin",
    "stop 0 end",
    "stop 1 begin",
    "stop 1 end",
  ]);
  assert.equal(backend.started.size, 0);
  assert.equal(r(R.STATUS), 0);
  assert.equal(r(R.INTERRUPT_STATUS), 0);
  await w(R.QUEUE_SEL, 0);
  assert.equal(r(R.QUEUE_READY), 0);
  assert.equal(r(R.QUEUE_NUM), 0);
});

Deno.test("virtio-mmio: config reads of any width and offset, odd register accesses", async () => {
  const { w, r, backend, dev } = setup();
  assert.equal(r(R.CONFIG, 1), 1);
  assert.equal(r(R.CONFIG + 1, 2), 0x0302);
  assert.equal(r(R.CONFIG + 3, 4), 0x07060504);
  assert.equal(dev.read(R.CONFIG, 8), 0x0807060504030201n);
  assert.equal(dev.read(R.CONFIG + 6, 8), 0x0a090807n, "past the end reads 0");
  assert.equal(r(R.CONFIG + 9, 4), 10);
  assert.equal(dev.read(VIRTIO_MMIO_SIZE - 1, 8), 0n);
  assert.equal(dev.read(0xfff, 4), 0n);
  // Registers are 32-bit only.
  assert.equal(r(R.MAGIC_VALUE, 1), 0);
  assert.equal(r(R.MAGIC_VALUE + 1, 4), 0);
  assert.equal(dev.read(R.MAGIC_VALUE, 8), 0n);
  await w(R.STATUS, 1, 1);
  await w(R.STATUS, 1, 8);
  assert.equal(r(R.STATUS), 0);
  // Config writes: only the one writable byte.
  await w(R.CONFIG + 9, 0, 1);
  assert.equal(backend.cfg[9], 0);
  const gen = r(R.CONFIG_GENERATION);
  await w(R.CONFIG, 0xff, 1);
  assert.equal(backend.cfg[0], 1);
  assert.equal(r(R.CONFIG_GENERATION), gen);
  assert.ok(dev.guestErrors >= 5);
});

Deno.test("virtio-mmio: InterruptACK clears only the acknowledged bits", async () => {
  const { w, r, isr } = setup();
  Atomics.store(isr, 0, VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
  await w(R.INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
  assert.equal(r(R.INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
});

Deno.test("virtio-mmio: random register streams never throw and keep the status invariants", async () => {
  const offsets: number[] = [...Object.values(R), 0x1, 0x3e, 0x1ff, 0x200, 0x104];
  const op = fc.record({
    write: fc.boolean(),
    offset: fc.oneof(fc.constantFrom(...offsets), fc.integer({ min: 0, max: 0x1ff })),
    size: fc.constantFrom(1, 2, 4, 4, 4, 8),
    value: fc.oneof(
      fc.constantFrom(0, 1, 2, 3, 7, 11, 15, 0x4f, 0x80, 128, 256, 0x10000, 0xffffffff),
      fc.integer({ min: 0, max: 0xffffffff }),
    ),
  });
  await fc.assert(
    fc.asyncProperty(fc.array(op, { maxLength: 80 }), fc.boolean(), async (ops, refuse) => {
      const { backend, dev } = setup();
      backend.refuseStart = refuse ? "outside RAM" : null;
      for (const o of ops) {
        if (o.write) await dev.write(o.offset, o.size, BigInt(o.value));
        else dev.read(o.offset, o.size);
        const s = dev.status;
        if (s & FEATURES_OK) assert.ok(dev.driverFeatures & VERSION_1);
        if (s & FEATURES_OK) assert.equal(dev.driverFeatures & ~OFFERED, 0n);
        if (backend.started.size > 0) {
          assert.ok(s & DRIVER_OK && !(s & NEEDS_RESET), `queues run in status ${s}`);
        }
        if (refuse) assert.equal(backend.started.size, 0);
      }
    }),
    { numRuns: 300 },
  );
});
