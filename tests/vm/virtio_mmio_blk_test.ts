/**
 * The virtio-mmio transport in front of real IOThreads (VirtioMmioBlk over
 * startBlkIOThreads, the vhost-user host's own), without KVM: the test plays
 * the guest driver on rings laid out in a GuestRam and kicks the queue's
 * eventfd as KVM_IOEVENTFD would. A ring outside RAM, requests in flight at
 * a reset, and a ring that breaks.
 */
import assert from "node:assert/strict";
import { type BlkThreadStats, parseHostArgs, startBlkIOThreads } from "../../dataplane/mod.ts";
import { close, eventfd, eventfdRead, eventfdWrite } from "../../sys/mod.ts";
import {
  GuestRam,
  VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK,
  VIRTIO_CONFIG_S_DRIVER as DRIVER,
  VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK,
  VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
  VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
  VIRTIO_MMIO as R,
  VIRTIO_MMIO_INT_VRING,
  VirtioMmioBlk,
  VirtioMmioDevice,
} from "../../vm/mod.ts";
import { VIRTIO_BLK_CONFIG } from "../../virtio/mod.ts";

const QSIZE = 128;
const DESC = 0x10000, AVAIL = 0x11000, USED = 0x12000, REQS = 0x20000;

async function machine(image = "null-aio:1M") {
  const ram = GuestRam.create(1 << 20);
  const isr = new SharedArrayBuffer(4);
  const { threads, device } = await startBlkIOThreads(
    parseHostArgs(["--image", image], { socket: false }),
    undefined,
    { isr },
  );
  for (const t of threads) await t.call("blkSetMemory", { regions: ram.regions() });
  const kick = eventfd(), call = eventfd();
  const backend = new VirtioMmioBlk({
    device,
    iothreads: threads,
    kickFds: [kick],
    callFd: call,
    queueNumMax: 256,
  });
  const log: string[] = [];
  const dev = new VirtioMmioDevice(backend, {
    isr: new Int32Array(isr),
    raiseIrq: () => eventfdWrite(call, 1),
    log: (l) => log.push(l),
  });
  const w = (off: number, v: number) => dev.write(off, 4, BigInt(v));
  const dv = new DataView(ram.bytes.buffer, ram.bytes.byteOffset, ram.size);
  let availIdx = 0;
  return {
    ram,
    dev,
    log,
    kick,
    call,
    isr: new Int32Array(isr),
    dv,
    async start(desc = DESC) {
      availIdx = 0;
      ram.bytes.fill(0, DESC, REQS);
      await w(R.STATUS, 0);
      await w(R.STATUS, ACK | DRIVER);
      await w(R.DRIVER_FEATURES_SEL, 1);
      await w(R.DRIVER_FEATURES, 1); // VERSION_1 only
      await w(R.STATUS, ACK | DRIVER | FEATURES_OK);
      await w(R.QUEUE_SEL, 0);
      await w(R.QUEUE_NUM, QSIZE);
      await w(R.QUEUE_DESC_LOW, desc);
      await w(R.QUEUE_DRIVER_LOW, AVAIL);
      await w(R.QUEUE_DEVICE_LOW, USED);
      await w(R.QUEUE_READY, 1);
      await w(R.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    },
    /** A 4 KiB read of `sector` in slot `s` (descriptors 2s, 2s+1). */
    submitRead(s: number, sector: number) {
      const hdr = REQS + s * 0x2000, data = hdr + 0x1000;
      dv.setUint32(hdr, 0, true); // VIRTIO_BLK_T_IN
      dv.setBigUint64(hdr + 8, BigInt(sector), true);
      dv.setUint8(hdr + 16, 0xff); // status, after the header
      const d = (i: number, addr: number, len: number, flags: number, next: number) => {
        dv.setBigUint64(DESC + 16 * i, BigInt(addr), true);
        dv.setUint32(DESC + 16 * i + 8, len, true);
        dv.setUint16(DESC + 16 * i + 12, flags, true);
        dv.setUint16(DESC + 16 * i + 14, next, true);
      };
      d(3 * s, hdr, 16, 1, 3 * s + 1);
      d(3 * s + 1, data, 4096, 3, 3 * s + 2);
      d(3 * s + 2, hdr + 16, 1, 2, 0);
      dv.setUint16(AVAIL + 4 + 2 * (availIdx % QSIZE), 3 * s, true);
      availIdx++;
    },
    publish() {
      dv.setUint16(AVAIL + 2, availIdx & 0xffff, true);
      eventfdWrite(kick, 1);
    },
    status: (s: number) => dv.getUint8(REQS + s * 0x2000 + 16),
    usedIdx: () => dv.getUint16(USED + 2, true),
    usedId: (i: number) => dv.getUint32(USED + 4 + 8 * (i % QSIZE), true),
    async stats(): Promise<BlkThreadStats> {
      return await threads[0].call<BlkThreadStats>("blkStats");
    },
    async close() {
      await dev.reset();
      for (const t of threads) {
        await t.call("blkClose");
        await t.stop();
      }
      close(kick);
      close(call);
      ram.close();
    },
  };
}

async function until(cond: () => boolean, what: string): Promise<void> {
  const end = Date.now() + 5000;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

Deno.test("virtio-mmio + IOThread: requests complete, ISR bit 0 set before the call eventfd", async () => {
  const m = await machine();
  try {
    await m.start();
    m.submitRead(0, 0);
    m.submitRead(1, 8);
    m.publish();
    await until(() => m.usedIdx() === 2, "two completions");
    assert.equal(m.status(0), 0);
    assert.equal(m.status(1), 0);
    await until(() => eventfdRead(m.call) > 0, "the call eventfd");
    assert.equal(Atomics.load(m.isr, 0) & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING);
  } finally {
    await m.close();
  }
});

Deno.test("virtio-mmio + IOThread: a ring outside RAM is refused by the IOThread: NEEDS_RESET", async () => {
  const m = await machine();
  try {
    await m.start(0xfff00000);
    assert.equal(m.dev.status & NEEDS_RESET, NEEDS_RESET);
    assert.ok(!m.dev.queueStarted(0));
    assert.ok(m.log.some((l) => l.includes("cannot start")), m.log.join("\n"));
    // The guest resets and sets up a good ring: the device works again.
    await m.start();
    assert.equal(m.dev.status & NEEDS_RESET, 0);
    m.submitRead(0, 0);
    m.publish();
    await until(() => m.usedIdx() === 1, "a completion after the reset");
  } finally {
    await m.close();
  }
});

Deno.test("virtio-mmio + IOThread: a reset with requests in flight waits for them; every used entry has its status", async () => {
  const m = await machine();
  try {
    for (let round = 0; round < 5; round++) {
      await m.start();
      for (let s = 0; s < 32; s++) m.submitRead(s, s * 8);
      m.publish();
      await m.dev.write(R.STATUS, 4, 0n); // reset at once
      assert.equal(m.dev.status, 0);
      const used = m.usedIdx();
      assert.ok(used <= 32);
      for (let i = 0; i < used; i++) assert.equal(m.status(m.usedId(i) / 3), 0, `entry ${i}`);
      assert.equal((await m.stats()).inFlight, 0, "nothing in flight after the reset");
    }
  } finally {
    await m.close();
  }
});

Deno.test("virtio-mmio + IOThread: a descriptor loop breaks the ring; the device reports NEEDS_RESET", async () => {
  const m = await machine();
  try {
    await m.start();
    m.submitRead(0, 0);
    // descriptor 2 (the status) points back to 0 with NEXT: a loop
    m.dv.setUint16(DESC + 16 * 2 + 12, 3, true);
    m.dv.setUint16(DESC + 16 * 2 + 14, 0, true);
    m.publish();
    let broken: { index: number; reason: string }[] = [];
    const end = Date.now() + 5000;
    while (broken.length === 0 && Date.now() < end) {
      await new Promise((r) => setTimeout(r, 5));
      broken = (await m.stats()).queues.filter((q) => q.broken !== null).map((q) => ({
        index: q.index,
        reason: q.broken!,
      }));
    }
    assert.equal(broken.length, 1, "the ring broke in its IOThread");
    // KvmVm does this on the broken-ring eventfd (blkBrokenQueues).
    await m.dev.deviceError(`queue 0: ${broken[0].reason}`);
    assert.equal(m.dev.status & NEEDS_RESET, NEEDS_RESET);
    await m.start();
    m.submitRead(0, 0);
    m.publish();
    await until(() => m.usedIdx() === 1, "a completion after the reset");
  } finally {
    await m.close();
  }
});

Deno.test("virtio-mmio + IOThread: the guest turns the write cache off through config space; other fields are read-only", async () => {
  const m = await machine();
  try {
    await m.start();
    const wb = R.CONFIG + VIRTIO_BLK_CONFIG.writeback;
    assert.equal(m.dev.read(wb, 1), 1n);
    const gen = m.dev.read(R.CONFIG_GENERATION, 4);
    await m.dev.write(wb, 1, 0n);
    assert.equal(m.dev.read(wb, 1), 0n);
    assert.equal(m.dev.read(R.CONFIG_GENERATION, 4), gen + 1n);
    const errors = m.dev.guestErrors;
    await m.dev.write(R.CONFIG, 4, 0xffffffffn); // capacity
    assert.equal(m.dev.read(R.CONFIG, 4), 2048n);
    assert.equal(m.dev.guestErrors, errors + 1);
    assert.ok(m.log.some((l) => l.includes("read-only field")), m.log.join("\n"));
  } finally {
    await m.close();
  }
});
