// VirtioBlkDataPlane driven directly on this thread: a memfd-backed guest
// memory whose guest-physical addresses differ from the front-end's virtual
// ones, split rings laid out by the test's guest driver, and a BlockBackend
// over a file whose engine holds completions until the test releases them
// (so "in flight" is a state the test controls). Covers batching with one
// EVENT_IDX notification, drained sections, stopQueue, malformed chains and
// disabled queues.

import assert from "node:assert/strict";
import { AioContext } from "../../aio/mod.ts";
import {
  BlockBackend,
  type BlockCompletion,
  type BlockOptions,
  type IoEngine,
  type IoEngineStats,
  type IoVector,
} from "../../block/mod.ts";
import {
  type DataPlaneQueueSetup,
  VirtioBlkDataPlane,
} from "../../dataplane/virtio_blk_dataplane.ts";
import { deviceModel } from "../../dataplane/host.ts";
import { parseHostArgs } from "../../dataplane/host_options.ts";
import {
  close,
  EIO,
  eventfd,
  eventfdRead,
  eventfdWrite,
  fallocate,
  fdatasync,
  MAP_ANONYMOUS,
  MAP_PRIVATE,
  mmap,
  mmapShared,
  munmap,
  pipe,
  preadvAt,
  PROT_READ,
  PROT_WRITE,
  pwritevAt,
} from "../../sys/mod.ts";
import {
  GuestMemory,
  inflightQueueRegionSize,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  type VirtioBlkOptions,
} from "../../virtio/mod.ts";
import {
  type Buf,
  GuestDriver,
  ringBytes,
  ringLayout,
  TestMemory,
} from "../virtio/guest_driver.ts";

const QSIZE = 64;
/** Linux's UIO_MAXIOV: the most iovecs one preadv/io_submit/io_uring READV takes. */
const IOV_MAX = 1024;
const MAP_FIXED = 0x10;
const IMAGE = 1 << 20;
/** Guest-physical bases: rings + headers low, data above 4 GiB (front-end VAs differ from both). */
const RING_GPA = 0x10000;
const META_GPA = 0x60000;
const DATA_GPA = 0x1_0000_0000;
const DATA_SIZE = 1 << 20;

/**
 * An IoEngine that does the I/O synchronously at submission but delivers
 * completions only when the test calls {@link release} (from a bottom half
 * of the context, as a real engine completes from its event handler).
 */
class HeldEngine implements IoEngine {
  readonly kind = "threads" as const;
  readonly stats: IoEngineStats = { submitCalls: 0, submitted: 0, completed: 0, queued: 0 };
  readonly held: { cb: BlockCompletion; ret: number }[] = [];
  /** Complete immediately (next bottom half) instead of holding. */
  autoRelease = false;
  /** Every operation submitted, in order ("pwritev@4096", "fdatasync"...). */
  readonly ops: string[] = [];
  /** Fault injection: a -errno for an operation ("fallocate@8192") instead of doing it. */
  readonly fail = new Map<string, number>();
  constructor(readonly ctx: AioContext) {}

  #add(op: string, cb: BlockCompletion, run: () => number): void {
    this.stats.submitted++;
    this.ops.push(op);
    let ret = this.fail.get(op) ?? 0;
    try {
      if (ret === 0) ret = run();
    } catch (e) {
      ret = -((e as { errno?: number }).errno ?? 5);
    }
    this.held.push({ cb, ret });
    if (this.autoRelease) this.release();
  }
  preadv(fd: number, qiov: IoVector, offset: number, cb: BlockCompletion): void {
    this.#add(
      `preadv@${offset}`,
      cb,
      () => preadvAt(fd, qiov.iovAddr, qiov.niov, offset) === qiov.size ? 0 : -5,
    );
  }
  pwritev(fd: number, qiov: IoVector, offset: number, cb: BlockCompletion): void {
    this.#add(
      `pwritev@${offset}`,
      cb,
      () => pwritevAt(fd, qiov.iovAddr, qiov.niov, offset) === qiov.size ? 0 : -28,
    );
  }
  fdatasync(fd: number, cb: BlockCompletion): void {
    this.#add("fdatasync", cb, () => (fdatasync(fd), 0));
  }
  fallocate(fd: number, mode: number, offset: number, len: number, cb: BlockCompletion): void {
    this.#add(`fallocate@${offset}`, cb, () => (fallocate(fd, mode, offset, len), 0));
  }
  plug(): void {}
  unplug(): void {
    this.stats.submitCalls++;
  }
  /** Completes the `n` oldest held requests (default all) in one bottom half of the context. */
  release(n = this.held.length): void {
    const batch = this.held.splice(0, n);
    this.ctx.scheduleOneshot(() => {
      for (const h of batch) {
        this.stats.completed++;
        h.cb(h.ret);
      }
    });
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** Everything one test needs: context, image, dataplane, guest memory and one ring. */
class Rig {
  readonly ctx = new AioContext({ pollMaxNs: 0 });
  readonly engine = new HeldEngine(this.ctx);
  readonly tm = new TestMemory([
    { gpa: RING_GPA, size: 0x40000 },
    { gpa: META_GPA, size: 0x10000 },
    { gpa: DATA_GPA, size: DATA_SIZE },
  ]);
  readonly image: string;
  readonly kickFd = eventfd();
  readonly callFd = eventfd();
  readonly errFd = eventfd();
  readonly broken: string[] = [];
  /** Descriptor head of each slot's chain. */
  readonly heads = new Map<number, number>();
  blk!: BlockBackend;
  dp!: VirtioBlkDataPlane;
  driver!: GuestDriver;
  setup!: DataPlaneQueueSetup;
  #slot = 0;

  constructor(image?: string) {
    this.image = image ?? Deno.makeTempFileSync({ prefix: "dp-test-", suffix: ".raw" });
    Deno.writeFileSync(this.image, new Uint8Array(0), { append: true });
    Deno.truncateSync(this.image, IMAGE);
  }

  /**
   * `image`: serve this file (removed on close) instead of a temporary one;
   * `realEngine`: through the context's thread-pool engine instead of the
   * held one (completions are then not under the test's control).
   */
  static async create(
    opts: {
      eventIdx?: boolean;
      enabled?: boolean;
      device?: Partial<VirtioBlkOptions>;
      image?: string;
      realEngine?: boolean;
      block?: Partial<BlockOptions>;
    } = {},
  ): Promise<Rig> {
    const r = new Rig(opts.image);
    r.blk = await BlockBackend.open(
      r.ctx,
      { driver: "file", filename: r.image, ...opts.block },
      opts.realEngine ? {} : { engine: r.engine },
    );
    r.dp = new VirtioBlkDataPlane(r.ctx, r.blk, {
      device: { capacity: IMAGE / 512, flush: true, ...opts.device },
      serial: "unit-serial",
      writeback: true,
      onBroken: (i, why) => r.broken.push(`${i}: ${why}`),
    });
    await r.dp.setMemory(r.tm.mem);
    const layout = ringLayout(RING_GPA, QSIZE);
    assert.ok(ringBytes(QSIZE) < 0x40000);
    r.driver = new GuestDriver(r.tm, QSIZE, layout);
    r.setup = {
      index: 0,
      size: QSIZE,
      // the dataplane sees front-end virtual addresses (SET_VRING_ADDR)
      desc: r.tm.uva(layout.desc),
      avail: r.tm.uva(layout.avail),
      used: r.tm.uva(layout.used),
      base: 0,
      kickFd: r.kickFd,
      callFd: r.callFd,
      errFd: r.errFd,
      eventIdx: opts.eventIdx ?? true,
      indirectDesc: true,
      enabled: opts.enabled ?? true,
    };
    assert.notEqual(r.setup.desc, layout.desc, "front-end VA differs from guest-physical");
    await r.dp.startQueue(r.setup);
    return r;
  }

  /** Guest-physical address of slot `s`'s 16-byte header (its status byte is at +16). */
  meta(s: number): number {
    return META_GPA + 32 * (s % 512);
  }

  /** Guest-physical address of slot `s`'s 4 KiB data buffer. */
  data(s: number): number {
    return DATA_GPA + 4096 * (s % 256);
  }

  /** Adds a request (header, optional data, status) to the avail ring; returns its slot. */
  request(type: number, sector: number, dataLen: number, deviceWrites: boolean): number {
    const s = this.#slot++;
    const h = this.tm.view(this.meta(s), 17);
    h.setUint32(0, type, true);
    h.setUint32(4, 0, true);
    h.setUint32(8, sector, true);
    h.setUint32(12, 0, true);
    h.setUint8(16, 0xff);
    const bufs: Buf[] = [{ gpa: this.meta(s), len: 16 }];
    if (dataLen > 0) bufs.push({ gpa: this.data(s), len: dataLen, write: deviceWrites });
    bufs.push({ gpa: this.meta(s) + 16, len: 1, write: true });
    this.heads.set(s, this.driver.add(bufs));
    return s;
  }

  /** Adds a raw chain (for malformed requests); returns a fresh slot for its buffers. */
  raw(bufs: (s: number) => Buf[]): number {
    const s = this.#slot++;
    this.tm.view(this.meta(s) + 16, 1).setUint8(0, 0xff);
    this.heads.set(s, this.driver.add(bufs(s)));
    return s;
  }

  status(s: number): number {
    return this.tm.view(this.meta(s) + 16, 1).getUint8(0);
  }

  bytes(s: number, len = 4096): Uint8Array {
    return this.tm.mem.bytes(this.data(s), len)!;
  }

  kick(): void {
    eventfdWrite(this.kickFd, 1);
  }

  /** Runs the context until `cond()` holds. */
  async until(cond: () => boolean, what: string, limitMs = 5000): Promise<void> {
    const end = Date.now() + limitMs;
    while (!cond()) {
      if (Date.now() > end) assert.fail(`timed out: ${what}`);
      this.ctx.poll(false);
      await new Promise((r) => setTimeout(r, 1));
    }
  }

  /**
   * Like {@link until}, but only with blocking polls, as an IOThread runs its
   * context: with polling off (pollMaxNs 0) no poll callback looks at the ring,
   * so only the kick fd, bottom halves and timers can start a request. A 2 ms
   * timer bounds each wait.
   */
  async untilBlocking(cond: () => boolean, what: string, limitMs = 5000): Promise<void> {
    const end = Date.now() + limitMs;
    const guard = this.ctx.timerNew(() => {});
    try {
      while (!cond()) {
        if (Date.now() > end) assert.fail(`timed out: ${what}`);
        guard.modNs(this.ctx.now() + 2e6);
        this.ctx.poll(true);
        await new Promise((r) => setTimeout(r, 0));
      }
    } finally {
      guard.del();
    }
  }

  /** Runs the context for a while without expecting anything (to show nothing happens). */
  async idle(rounds = 20): Promise<void> {
    for (let i = 0; i < rounds; i++) {
      this.ctx.poll(false);
      await new Promise((r) => setTimeout(r, 1));
    }
  }

  async close(): Promise<void> {
    this.engine.autoRelease = true;
    this.engine.release();
    const closing = this.dp.close();
    await this.until(() => this.dp.inFlight === 0, "close");
    await closing;
    let closed = false;
    const blkClosed = this.blk.close().then(() => closed = true);
    await this.until(() => closed, "image closed");
    await blkClosed;
    this.tm.close();
    for (const fd of [this.kickFd, this.callFd, this.errFd]) close(fd);
    this.ctx.close();
    Deno.removeSync(this.image);
  }
}

Deno.test("dataplane: a batch completes with one notification (EVENT_IDX), data in the file", async () => {
  const r = await Rig.create();
  try {
    r.driver.setUsedEvent(0); // "interrupt me after the first used element"
    const slots: number[] = [];
    for (let i = 0; i < 8; i++) {
      const s = r.request(VIRTIO_BLK_T_OUT, 8 * i, 4096, false);
      r.bytes(s).fill(0x10 + i);
      slots.push(s);
    }
    r.kick();
    await r.until(() => r.engine.held.length === 8, "8 writes submitted");
    assert.equal(r.driver.usedIdx(), 0, "nothing completes before the engine does");
    assert.equal(r.dp.inFlight, 8);
    assert.equal(r.driver.availEvent(), 8, "avail_event = next avail index");
    r.engine.release();
    await r.until(() => r.driver.usedIdx() === 8, "8 used");
    await r.idle(3);
    assert.equal(eventfdRead(r.callFd), 1, "exactly one notification for the batch");
    for (let i = 0; i < 8; i++) {
      assert.equal(r.status(slots[i]), VIRTIO_BLK_S_OK);
      assert.equal(r.driver.used(i).id, r.heads.get(slots[i]), "completed in order");
      assert.equal(r.driver.used(i).len, 1, "a write's used length is the status byte");
    }
    const file = Deno.readFileSync(r.image);
    for (let i = 0; i < 8; i++) {
      assert.ok(file.subarray(4096 * i, 4096 * (i + 1)).every((b) => b === 0x10 + i), `block ${i}`);
    }

    // Second batch: reads back. used_event is still 0, so no notification is due.
    const reads: number[] = [];
    for (let i = 0; i < 8; i++) {
      const s = r.request(VIRTIO_BLK_T_IN, 8 * (7 - i), 4096, true);
      r.bytes(s).fill(0xee);
      reads.push(s);
    }
    r.kick();
    await r.until(() => r.engine.held.length === 8, "8 reads submitted");
    r.engine.release();
    await r.until(() => r.driver.usedIdx() === 16, "16 used");
    await r.idle(3);
    assert.equal(eventfdRead(r.callFd), 0, "used_event 0 already passed: no notification");
    for (let i = 0; i < 8; i++) {
      assert.equal(r.status(reads[i]), VIRTIO_BLK_S_OK);
      assert.equal(r.driver.used(8 + i).len, 4097, "data + status");
      assert.ok(r.bytes(reads[i]).every((b) => b === 0x10 + 7 - i), `read ${i}`);
    }

    // Third batch with used_event inside it: one notification again.
    r.driver.setUsedEvent(18);
    for (let i = 0; i < 4; i++) r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.until(() => r.engine.held.length === 4, "4 flushes submitted");
    r.engine.release();
    await r.until(() => r.driver.usedIdx() === 20, "20 used");
    await r.idle(3);
    assert.equal(eventfdRead(r.callFd), 1);
    const st = r.dp.stats()[0];
    assert.equal(st.requests, 20);
    assert.equal(st.writes, 8);
    assert.equal(st.reads, 8);
    assert.equal(st.flushes, 4);
    assert.equal(st.notifies, 2);
    assert.equal(st.writtenBytes, 8 * 4096);
    assert.equal(st.readBytes, 8 * 4096);
    assert.equal(st.errors, 0);
    assert.deepEqual(r.broken, []);
  } finally {
    await r.close();
  }
});

Deno.test("dataplane: without EVENT_IDX, NO_INTERRUPT suppresses notifications", async () => {
  const r = await Rig.create({ eventIdx: false });
  try {
    for (let i = 0; i < 4; i++) r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.until(() => r.engine.held.length === 4, "submitted");
    r.engine.release();
    await r.until(() => r.driver.usedIdx() === 4, "used");
    await r.idle(3);
    assert.equal(eventfdRead(r.callFd), 1, "one notification per batch");
    r.driver.setAvailFlags(1); // VRING_AVAIL_F_NO_INTERRUPT
    r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.until(() => r.engine.held.length === 1, "submitted");
    r.engine.release();
    await r.until(() => r.driver.usedIdx() === 5, "used");
    await r.idle(3);
    assert.equal(eventfdRead(r.callFd), 0, "suppressed");
  } finally {
    await r.close();
  }
});

Deno.test("dataplane: drainedBegin detaches the kick, drainedEnd processes what waited", async () => {
  const r = await Rig.create();
  try {
    r.engine.autoRelease = true;
    r.blk.drainedBegin();
    const s = r.request(VIRTIO_BLK_T_IN, 0, 4096, true);
    r.kick();
    await r.idle();
    assert.equal(r.driver.usedIdx(), 0, "no request taken while drained");
    assert.equal(r.engine.stats.submitted, 0);
    assert.equal(r.dp.inFlight, 0);
    r.blk.drainedEnd();
    await r.until(() => r.driver.usedIdx() === 1, "processed after drainedEnd");
    assert.equal(r.status(s), VIRTIO_BLK_S_OK);

    // Nested sections: only the outermost end resumes.
    r.blk.drainedBegin();
    r.blk.drainedBegin();
    r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    r.blk.drainedEnd();
    await r.idle();
    assert.equal(r.driver.usedIdx(), 1, "still drained");
    r.blk.drainedEnd();
    await r.until(() => r.driver.usedIdx() === 2, "processed after the outer drainedEnd");

    // drain() waits for in-flight requests and the queue keeps working after it.
    r.engine.autoRelease = false;
    r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.until(() => r.engine.held.length === 1, "submitted");
    let drained = false;
    const d = r.blk.drain().then(() => drained = true);
    await r.idle(5);
    assert.equal(drained, false, "drain waits for the in-flight flush");
    r.engine.release();
    await r.until(() => drained, "drained");
    await d;
    assert.equal(r.driver.usedIdx(), 3);
    r.engine.autoRelease = true;
    r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.until(() => r.driver.usedIdx() === 4, "works after drain");
  } finally {
    await r.close();
  }
});

Deno.test("dataplane: stopQueue waits for in-flight requests and returns the next avail index", async () => {
  const r = await Rig.create();
  try {
    for (let i = 0; i < 3; i++) r.request(VIRTIO_BLK_T_IN, 8 * i, 4096, true);
    r.kick();
    await r.until(() => r.engine.held.length === 3, "3 submitted");
    let base = -1;
    const stopping = r.dp.stopQueue(0).then((b) => base = b);
    // A request that arrives while stopping is left in the ring.
    const late = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.idle(5);
    assert.equal(base, -1, "stopQueue waits for the in-flight requests");
    assert.equal(r.driver.usedIdx(), 0);
    r.engine.release();
    await r.until(() => base >= 0, "stopped");
    await stopping;
    assert.equal(base, 3, "the late request was not taken");
    assert.equal(r.driver.usedIdx(), 3);
    assert.equal(eventfdRead(r.callFd), 1, "the completions were notified before returning");
    assert.equal(r.status(late), 0xff);
    assert.deepEqual(r.dp.queueIndexes, []);
    await assert.rejects(() => r.dp.stopQueue(0), /not running/);

    // Restart at the returned base: the late request runs, nothing runs twice.
    r.engine.autoRelease = true;
    await r.dp.startQueue({ ...r.setup, base });
    await r.until(() => r.driver.usedIdx() === 4, "late request done after restart");
    assert.equal(r.status(late), VIRTIO_BLK_S_OK);
    assert.equal(r.driver.used(3).id, r.heads.get(late), "used element 3 is the late request");
    const st = r.dp.stats()[0];
    assert.equal(st.requests, 4, "counters survive the restart");
    assert.equal(st.reads, 3);
  } finally {
    await r.close();
  }
});

Deno.test("dataplane: a restart with base -1 (new kick fd, no SET_VRING_BASE) does not replay", async () => {
  const r = await Rig.create();
  try {
    r.engine.autoRelease = true;
    for (let i = 0; i < 3; i++) r.request(VIRTIO_BLK_T_IN, 8 * i, 4096, true);
    r.kick();
    await r.until(() => r.driver.usedIdx() === 3, "3 done");
    // The queue runs at avail idx 3; restarting it "where it is" keeps that.
    await r.dp.startQueue({ ...r.setup, base: -1 });
    const next = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.until(() => r.driver.usedIdx() === 4, "the new request done");
    await r.idle(5);
    assert.equal(r.driver.usedIdx(), 4, "nothing replayed");
    assert.equal(r.driver.used(3).id, r.heads.get(next));
    assert.equal(r.dp.stats()[0].requests, 4);
  } finally {
    await r.close();
  }
});

Deno.test("dataplane: bad requests get IOERR/UNSUPP, the ring keeps going", async () => {
  const r = await Rig.create({ device: { capacity: 2048 } });
  try {
    r.engine.autoRelease = true;
    const unknown = r.request(99, 0, 0, false);
    const beyond = r.request(VIRTIO_BLK_T_IN, 2048, 512, true);
    const oddLen = r.request(VIRTIO_BLK_T_IN, 0, 100, true);
    const id = r.request(VIRTIO_BLK_T_GET_ID, 0, 20, true);
    r.bytes(id, 20).fill(0xee);
    const ok = r.request(VIRTIO_BLK_T_IN, 2040, 4096, true);
    r.kick();
    await r.until(() => r.driver.usedIdx() === 5, "5 used");
    assert.equal(r.status(unknown), VIRTIO_BLK_S_UNSUPP);
    assert.equal(r.status(beyond), VIRTIO_BLK_S_IOERR);
    assert.equal(r.status(oddLen), VIRTIO_BLK_S_IOERR);
    assert.equal(r.status(id), VIRTIO_BLK_S_OK);
    const want = new Uint8Array(20);
    want.set(new TextEncoder().encode("unit-serial"));
    assert.deepEqual(r.bytes(id, 20), want, "serial, NUL padded");
    assert.equal(r.driver.used(3).len, 21);
    assert.equal(r.status(ok), VIRTIO_BLK_S_OK);
    for (const i of [0, 1, 2]) assert.equal(r.driver.used(i).len, 1, "error: status byte only");
    const st = r.dp.stats()[0];
    assert.equal(st.unsupported, 1);
    assert.equal(st.errors, 2);
    assert.equal(st.getIds, 1);
    assert.equal(eventfdRead(r.errFd), 0, "not broken");
    assert.deepEqual(r.broken, []);
  } finally {
    await r.close();
  }
});

// A discard of several ranges is one submission per range: an error in any of
// them fails the request, which completes once, after the last range, as IOERR
// with the status byte only; the ring goes on.
for (const bad of [0, 1, 2]) {
  Deno.test(`dataplane: a 3-range discard whose range ${bad} fails completes once, IOERR`, async () => {
    const r = await Rig.create({
      device: { discard: { maxSectors: 2048, maxSeg: 4, sectorAlignment: 1 } },
      block: { discard: "unmap" },
    });
    try {
      const ranges = [0, 64, 128]; // sectors, 8 each
      r.engine.fail.set(`fallocate@${ranges[bad] * 512}`, -EIO);
      const s = r.request(VIRTIO_BLK_T_DISCARD, 0, 16 * ranges.length, false);
      const seg = r.tm.view(r.data(s), 16 * ranges.length);
      ranges.forEach((sector, i) => {
        seg.setBigUint64(16 * i, BigInt(sector), true);
        seg.setUint32(16 * i + 8, 8, true);
        seg.setUint32(16 * i + 12, 0, true);
      });
      r.kick();
      await r.until(() => r.engine.held.length === 3, "3 ranges submitted");
      for (let k = 0; k < 2; k++) {
        r.engine.release(1);
        await r.idle(3);
        assert.equal(r.driver.usedIdx(), 0, `completed after ${k + 1} of 3 ranges`);
      }
      r.engine.release(1);
      await r.until(() => r.driver.usedIdx() === 1, "used");
      assert.equal(r.status(s), VIRTIO_BLK_S_IOERR);
      assert.equal(r.driver.used(0).len, 1, "error: status byte only");
      r.engine.autoRelease = true;
      const next = r.request(VIRTIO_BLK_T_IN, 0, 4096, true);
      r.kick();
      await r.until(() => r.driver.usedIdx() === 2, "next request");
      assert.equal(r.status(next), VIRTIO_BLK_S_OK);
      assert.equal(r.dp.stats()[0].errors, 1);
    } finally {
      await r.close();
    }
  });
}

// Writethrough (WCE=0): a write completes only after its flush. A failing flush
// fails the write; a failing write is not followed by a flush. Both reach the
// guest as IOERR with the status byte only, and the ring goes on.
for (const failing of ["fdatasync", "pwritev@8192"]) {
  Deno.test(`dataplane: writethrough, ${failing} fails: the write gets IOERR`, async () => {
    const r = await Rig.create();
    try {
      r.dp.setWriteback(false);
      r.engine.autoRelease = true;
      const good = r.request(VIRTIO_BLK_T_OUT, 0, 4096, false);
      r.kick();
      await r.until(() => r.driver.usedIdx() === 1, "first write");
      assert.equal(r.status(good), VIRTIO_BLK_S_OK);
      assert.deepEqual(r.engine.ops, ["pwritev@0", "fdatasync"], "write, then its flush");
      r.engine.fail.set(failing, -EIO);
      const bad = r.request(VIRTIO_BLK_T_OUT, 16, 4096, false);
      r.kick();
      await r.until(() => r.driver.usedIdx() === 2, "failing write");
      assert.equal(r.status(bad), VIRTIO_BLK_S_IOERR);
      assert.equal(r.driver.used(1).len, 1, "error: status byte only");
      const want = failing === "fdatasync" ? ["pwritev@8192", "fdatasync"] : ["pwritev@8192"];
      assert.deepEqual(r.engine.ops.slice(2), want);
      r.engine.fail.clear();
      const next = r.request(VIRTIO_BLK_T_IN, 0, 4096, true);
      r.kick();
      await r.until(() => r.driver.usedIdx() === 3, "next request");
      assert.equal(r.status(next), VIRTIO_BLK_S_OK);
    } finally {
      await r.close();
    }
  });
}

// Malformed chains whose status byte can be written are answered with IOERR
// and the ring goes on (QEMU would call virtio_error for these; the guest
// would wait forever on a ring nobody serves).
for (
  const [what, chain] of [
    [
      "a header shorter than 16 bytes",
      (r: Rig, s: number): Buf[] => [
        { gpa: r.meta(s), len: 8 },
        { gpa: r.meta(s) + 16, len: 1, write: true },
      ],
    ],
    [
      "a descriptor outside guest memory",
      (r: Rig, s: number): Buf[] => [
        { gpa: 0x7000_0000, len: 16 },
        { gpa: r.meta(s) + 16, len: 1, write: true },
      ],
    ],
    [
      "a descriptor that wraps around the address space",
      (r: Rig, s: number): Buf[] => [
        { gpa: r.meta(s), len: 16 },
        { gpa: Number.MAX_SAFE_INTEGER - 100, len: 4096, write: true },
        { gpa: r.meta(s) + 16, len: 1, write: true },
      ],
    ],
    [
      "a zero-length data descriptor",
      (r: Rig, s: number): Buf[] => [
        { gpa: r.meta(s), len: 16 },
        { gpa: r.data(s), len: 0, write: true },
        { gpa: r.meta(s) + 16, len: 1, write: true },
      ],
    ],
  ] as const
) {
  Deno.test(`dataplane: ${what} gets IOERR, the ring goes on`, async () => {
    const r = await Rig.create();
    try {
      r.engine.autoRelease = true;
      const good = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
      const bad = r.raw((s) => chain(r, s));
      const after = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
      r.kick();
      await r.until(() => r.driver.usedIdx() === 3, "all three answered");
      assert.equal(r.status(good), VIRTIO_BLK_S_OK);
      assert.equal(r.status(bad), VIRTIO_BLK_S_IOERR);
      assert.equal(r.status(after), VIRTIO_BLK_S_OK);
      const u = [0, 1, 2].map((i) => r.driver.used(i)).find((e) => e.id === r.heads.get(bad));
      assert.equal(u?.len, 1, "error: status byte only");
      assert.equal(eventfdRead(r.errFd), 0, "not broken");
      assert.deepEqual(r.broken, []);
      assert.equal(r.dp.stats()[0].errors, 1);
    } finally {
      await r.close();
    }
  });
}

// No status byte the device may write: the ring breaks (virtio_error).
for (
  const [what, chain] of [
    [
      "a chain without a device-writable status byte",
      (r: Rig, s: number): Buf[] => [{ gpa: r.meta(s), len: 16 }, { gpa: r.data(s), len: 512 }],
    ],
    [
      "a status descriptor outside guest memory",
      (r: Rig, s: number): Buf[] => [
        { gpa: r.meta(s), len: 16 },
        { gpa: 0x7000_0000, len: 1, write: true },
      ],
    ],
    [
      "a zero-length status descriptor",
      (r: Rig, s: number): Buf[] => [
        { gpa: r.meta(s), len: 16 },
        { gpa: r.meta(s) + 16, len: 0, write: true },
      ],
    ],
  ] as const
) {
  Deno.test(`dataplane: ${what} breaks the ring (err fd written, no more requests)`, async () => {
    const r = await Rig.create();
    try {
      r.engine.autoRelease = true;
      const good = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
      const bad = r.raw((s) => chain(r, s));
      const after = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
      r.kick();
      await r.until(() => r.broken.length > 0, "broken");
      await r.idle(5);
      assert.equal(eventfdRead(r.errFd), 1, "error eventfd written once");
      assert.equal(r.status(good), VIRTIO_BLK_S_OK, "the request before it completed");
      assert.equal(r.status(bad), 0xff, "no status for the bad chain");
      assert.equal(r.status(after), 0xff, "nothing after it is processed");
      const used = r.driver.usedIdx();
      assert.ok(used <= 1, `used idx ${used}: only the good request may be published`);
      assert.ok(r.dp.stats()[0].broken, "stats say broken");
      assert.deepEqual(r.dp.brokenQueues.map((b) => b.index), [0]);
      // a kick on a broken ring does nothing
      r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
      r.kick();
      await r.idle(5);
      assert.equal(r.driver.usedIdx(), used);
      assert.equal(eventfdRead(r.errFd), 0, "reported once");
      assert.equal(r.broken.length, 1);
    } finally {
      await r.close();
    }
  });
}

Deno.test("dataplane: a broken ring stays broken across setMemory until the front-end restarts it", async () => {
  const r = await Rig.create();
  try {
    r.engine.autoRelease = true;
    r.raw((s) => [{ gpa: r.meta(s), len: 16 }]); // no status byte
    r.kick();
    await r.until(() => r.broken.length > 0, "broken");
    assert.equal(eventfdRead(r.errFd), 1);
    // SET_MEM_TABLE again (same memory): the ring must not run again.
    await r.dp.setMemory(r.tm.mem);
    const pending = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.idle(10);
    assert.equal(r.status(pending), 0xff, "a broken ring served a request after setMemory");
    assert.equal(r.driver.usedIdx(), 0);
    assert.equal(r.broken.length, 1);
    assert.ok(r.dp.stats()[0].ring?.includes("detached"), r.dp.stats()[0].ring ?? "stopped");
    // The front-end resets the ring (GET_VRING_BASE, then SET_VRING_KICK from a new base).
    const base = await r.dp.stopQueue(0);
    assert.deepEqual(r.dp.brokenQueues, []);
    await r.dp.startQueue({ ...r.setup, base });
    await r.until(() => r.driver.usedIdx() === 1, "served after the restart");
    assert.equal(r.status(pending), VIRTIO_BLK_S_OK);
    // A second break detaches it again and is reported again.
    r.raw((s) => [{ gpa: r.meta(s), len: 16 }]);
    const late = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.until(() => r.broken.length === 2, "second break reported");
    await r.idle(10);
    assert.equal(r.status(late), 0xff, "a request after the second break was served");
    assert.equal(eventfdRead(r.errFd), 1);
  } finally {
    await r.close();
  }
});

Deno.test("dataplane: a call fd whose write fails breaks that ring, not the event loop", async () => {
  const r = await Rig.create();
  const [pr, pw] = pipe();
  try {
    r.engine.autoRelease = true;
    r.dp.setCallFd(0, pr); // write(2) on a pipe's read end: EBADF
    const s = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.until(() => r.broken.length > 0, "broken"); // ctx.poll threw EBADF before
    assert.equal(r.status(s), VIRTIO_BLK_S_OK, "answered before the notification failed");
    assert.match(r.broken[0], /call fd .*EBADF/);
    assert.equal(eventfdRead(r.errFd), 1, "the front-end is told through the err fd");
    r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.idle(5);
    assert.equal(r.driver.usedIdx(), 1, "a broken ring takes nothing more");
  } finally {
    await r.close();
    close(pr);
    close(pw);
  }
});

Deno.test("dataplane: a kick fd whose read fails breaks that ring and is detached (no spinning)", async () => {
  const r = await Rig.create();
  const [pr, pw] = pipe();
  close(pr); // the write end now polls EPOLLERR forever; read(2) on it is EBADF
  try {
    r.engine.autoRelease = true;
    await r.dp.startQueue({ ...r.setup, kickFd: pw, base: -1 });
    await r.until(() => r.broken.length > 0, "broken"); // ctx.poll threw EBADF before
    assert.match(r.broken[0], /kick fd .*EBADF/);
    const calls = r.ctx.stats.handlerCalls;
    await r.idle(20);
    assert.ok(r.ctx.stats.handlerCalls - calls < 3, "the failing kick fd is no longer polled");
  } finally {
    await r.close();
    close(pw);
  }
});

Deno.test("dataplane: a disabled queue is not processed until enabled", async () => {
  const r = await Rig.create({ enabled: false });
  try {
    r.engine.autoRelease = true;
    const s = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.idle();
    assert.equal(r.driver.usedIdx(), 0);
    assert.equal(r.engine.stats.submitted, 0);
    r.dp.setEnabled(0, true);
    await r.until(() => r.driver.usedIdx() === 1, "processed once enabled");
    assert.equal(r.status(s), VIRTIO_BLK_S_OK);
    // disabling again stops it
    r.dp.setEnabled(0, false);
    r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.idle();
    assert.equal(r.driver.usedIdx(), 1);
    r.dp.setEnabled(0, true);
    await r.until(() => r.driver.usedIdx() === 2, "processed after re-enable");
  } finally {
    await r.close();
  }
});

Deno.test("dataplane: setMemory waits for in-flight requests, then serves on the new mapping", async () => {
  const r = await Rig.create();
  try {
    const s = r.request(VIRTIO_BLK_T_IN, 0, 4096, true);
    r.kick();
    await r.until(() => r.engine.held.length === 1, "submitted");
    let swapped = false;
    // The same memory again (a real front-end would send a new table): the point is the wait.
    const p = r.dp.setMemory(r.tm.mem).then(() => swapped = true);
    await r.idle(5);
    assert.equal(swapped, false, "setMemory waits for the in-flight read");
    r.engine.release();
    await r.until(() => swapped, "swapped");
    await p;
    assert.equal(r.status(s), VIRTIO_BLK_S_OK);
    r.engine.autoRelease = true;
    r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.until(() => r.driver.usedIdx() === 2, "served after the swap");
  } finally {
    await r.close();
  }
});

/**
 * The guest's memory mapped a second time (the same memfds at new host
 * addresses), as a new SET_MEM_TABLE would give the dataplane; `retireOld()`
 * then puts zero pages over the old host mapping (what unmapping it means to
 * a queue still using it, without a crash), so from then on only the new
 * mapping reaches the guest's memory.
 */
function remapGuest(tm: TestMemory): {
  mem: GuestMemory;
  u16(gpa: number): number;
  u8(gpa: number): number;
  retireOld(): void;
  close(): void;
} {
  const maps = tm.regions.map((r) => mmapShared(r.fd, r.size, 0));
  const mem = GuestMemory.fromMapped(tm.regions.map((r, i) => ({
    guestPhysAddr: r.gpa,
    size: r.size,
    userAddr: r.uva,
    hostAddr: maps[i].addr,
  })));
  const view = (gpa: number, len: number) => {
    const b = mem.bytes(gpa, len)!;
    return new DataView(b.buffer, b.byteOffset, len);
  };
  return {
    mem,
    u16: (gpa) => view(gpa, 2).getUint16(0, true),
    u8: (gpa) => view(gpa, 1).getUint8(0),
    retireOld: () => {
      for (const r of tm.regions) {
        mmap(
          r.size,
          PROT_READ | PROT_WRITE,
          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
          -1,
          0,
          r.host,
        );
      }
    },
    close: () => {
      for (const m of maps) m.unmap();
    },
  };
}

for (
  const [what, meanwhile] of [
    ["a drained section ends", (r: Rig) => {
      r.blk.drainedBegin();
      r.blk.drainedEnd();
    }],
    ["the ring is disabled and enabled again", (r: Rig) => {
      r.dp.setEnabled(0, false);
      r.dp.setEnabled(0, true);
    }],
    ["the ring is restarted (new kick fd)", (r: Rig) => {
      void r.dp.startQueue({ ...r.setup, base: -1 });
    }],
  ] as const
) {
  Deno.test(`dataplane: nothing runs on the old mapping while setMemory waits and ${what}`, async () => {
    const r = await Rig.create();
    const next = remapGuest(r.tm);
    try {
      const a = r.request(VIRTIO_BLK_T_IN, 0, 4096, true);
      r.kick();
      await r.until(() => r.engine.held.length === 1, "first read submitted");
      let swapped = false;
      const p = r.dp.setMemory(next.mem).then(() => swapped = true);
      meanwhile(r);
      const b = r.request(VIRTIO_BLK_T_IN, 8, 4096, true);
      r.kick();
      await r.idle(10);
      assert.equal(r.engine.stats.submitted, 1, "no request taken while the old mapping drains");
      assert.equal(swapped, false);
      r.engine.autoRelease = true;
      r.engine.release();
      await r.until(() => swapped, "swapped");
      await p;
      // The caller unmaps the old memory as soon as setMemory resolves.
      next.retireOld();
      const used = ringLayout(RING_GPA, QSIZE).used;
      await r.until(() => next.u16(used + 2) === 2, "the second read served on the new mapping");
      assert.equal(next.u8(r.meta(a) + 16), VIRTIO_BLK_S_OK);
      assert.equal(next.u8(r.meta(b) + 16), VIRTIO_BLK_S_OK);
      assert.deepEqual(r.broken, []);
    } finally {
      await r.close();
      next.close();
    }
  });
}

Deno.test("dataplane: a queue stopped, started and given new memory while drained waits for drainedEnd", async () => {
  const r = await Rig.create();
  try {
    r.engine.autoRelease = true;
    r.blk.drainedBegin();
    const base = await r.dp.stopQueue(0);
    assert.equal(base, 0);
    await r.dp.startQueue({ ...r.setup, base });
    const s = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.idle();
    assert.equal(r.engine.stats.submitted, 0, "a queue started while drained does not run");
    await r.dp.setMemory(r.tm.mem);
    r.kick();
    await r.idle();
    assert.equal(r.engine.stats.submitted, 0, "nor after setMemory inside the drained section");
    r.dp.setEnabled(0, false);
    r.dp.setEnabled(0, true);
    await r.idle();
    assert.equal(r.engine.stats.submitted, 0, "nor after SET_VRING_ENABLE");
    r.blk.drainedEnd();
    await r.until(() => r.driver.usedIdx() === 1, "served after drainedEnd");
    assert.equal(r.status(s), VIRTIO_BLK_S_OK);
  } finally {
    await r.close();
  }
});

Deno.test("dataplane: drainedEnd finds a request whose kick was consumed meanwhile", async () => {
  const r = await Rig.create();
  try {
    r.engine.autoRelease = true;
    r.blk.drainedBegin();
    const s = r.request(VIRTIO_BLK_T_IN, 0, 4096, true);
    r.kick();
    // The kick eventfd is empty again: only drainedEnd's own ring check can find the request.
    assert.equal(eventfdRead(r.kickFd), 1);
    await r.idle();
    assert.equal(r.engine.stats.submitted, 0);
    r.blk.drainedEnd();
    await r.untilBlocking(() => r.driver.usedIdx() === 1, "found by the check after drainedEnd");
    assert.equal(r.status(s), VIRTIO_BLK_S_OK);
    assert.equal(r.dp.stats()[0].kicks, 0, "no kick was seen");
  } finally {
    await r.close();
  }
});

Deno.test("dataplane: request slots are allocated on demand and reused across restarts", async () => {
  const r = await Rig.create();
  try {
    assert.equal(r.dp.requestSlots, 0, "starting a ring allocates no request slots");
    for (let i = 0; i < 8; i++) r.request(VIRTIO_BLK_T_IN, 8 * i, 4096, true);
    r.kick();
    await r.until(() => r.engine.held.length === 8, "8 submitted");
    assert.equal(r.dp.requestSlots, 8, "one slot per request in flight");
    r.engine.release();
    await r.until(() => r.driver.usedIdx() === 8, "8 used");
    const base = await r.dp.stopQueue(0);
    await r.dp.startQueue({ ...r.setup, base });
    await r.dp.setMemory(r.tm.mem);
    for (let i = 0; i < 8; i++) r.request(VIRTIO_BLK_T_OUT, 8 * i, 4096, false);
    r.kick();
    await r.until(() => r.engine.held.length === 8, "8 more submitted");
    assert.equal(r.dp.requestSlots, 8, "slots survive the restart and the memory swap");
    r.engine.release();
    await r.until(() => r.driver.usedIdx() === 16, "16 used");
  } finally {
    await r.close();
  }
});

Deno.test("dataplane: a request with seg_max segments (as advertised for --queue-size 2048) completes", async () => {
  const device = deviceModel(
    parseHostArgs(["--image", "null-co:1M", "--socket", "/unused", "--queue-size", "2048"]),
    { length: IMAGE, requestAlignment: 1, memAlignment: 1, readOnly: false },
  );
  const segMax = device.segMax!;
  const r = await Rig.create({ device: { segMax } });
  try {
    r.engine.autoRelease = true;
    const pattern = new Uint8Array(512 * segMax).map((_, i) => (i * 7) >> 9);
    const f = Deno.openSync(r.image, { write: true });
    f.writeSync(pattern);
    f.close();
    // One indirect table: header, seg_max 512-byte buffers, status.
    const meta = r.meta(100);
    const h = r.tm.view(meta, 17);
    h.setUint32(0, VIRTIO_BLK_T_IN, true);
    h.setUint8(16, 0xff);
    const bufs: Buf[] = [{ gpa: meta, len: 16 }];
    for (let i = 0; i < segMax; i++) bufs.push({ gpa: DATA_GPA + 512 * i, len: 512, write: true });
    bufs.push({ gpa: meta + 16, len: 1, write: true });
    const head = r.driver.writeIndirect(bufs, RING_GPA + 0x10000);
    r.driver.makeAvailable(head);
    r.kick();
    await r.until(() => r.driver.usedIdx() === 1, "used");
    assert.deepEqual(r.broken, []);
    assert.equal(r.tm.view(meta + 16, 1).getUint8(0), VIRTIO_BLK_S_OK, "a full-size request");
    assert.equal(r.driver.used(0).len, 512 * segMax + 1);
    assert.deepEqual(r.tm.mem.bytes(DATA_GPA, 512 * segMax), pattern);
    assert.ok(segMax <= IOV_MAX - 2, `seg_max ${segMax}: the whole chain fits IOV_MAX`);
  } finally {
    await r.close();
  }
});

/** Mounts a tmpfs of `kib` KiB (root only); returns its path and how to unmount it. */
function tinyFilesystem(kib: number): { dir: string; unmount(): void } {
  const dir = Deno.makeTempDirSync({ prefix: "dp-enospc-" });
  const run = (cmd: string, args: string[]) => {
    const out = new Deno.Command(cmd, { args, stderr: "piped" }).outputSync();
    if (!out.success) throw new Error(`${cmd}: ${new TextDecoder().decode(out.stderr)}`);
  };
  run("mount", ["-t", "tmpfs", "-o", `size=${kib}k`, "tmpfs", dir]);
  return {
    dir,
    unmount: () => {
      run("umount", [dir]);
      Deno.removeSync(dir);
    },
  };
}

Deno.test({
  name: "dataplane: a short write (full filesystem) completes as ENOSPC: IOERR, used length 1",
  ignore: Deno.uid() !== 0, // mounting the tiny tmpfs needs root
  fn: async () => {
    const fs = tinyFilesystem(64);
    const r = await Rig.create({ image: `${fs.dir}/disk.raw`, realEngine: true });
    try {
      // 128 KiB into a sparse image on a 64 KiB filesystem: pwritev stores what fits
      // and returns a short count; the engine completes it as -ENOSPC.
      const s = r.raw((slot) => {
        const h = r.tm.view(r.meta(slot), 16);
        h.setUint32(0, VIRTIO_BLK_T_OUT, true);
        h.setUint32(8, 0, true);
        return [
          { gpa: r.meta(slot), len: 16 },
          { gpa: DATA_GPA, len: 128 * 1024 },
          { gpa: r.meta(slot) + 16, len: 1, write: true },
        ];
      });
      const after = r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
      r.kick();
      await r.until(() => r.driver.usedIdx() === 2, "both requests used");
      assert.equal(r.status(s), VIRTIO_BLK_S_IOERR);
      assert.equal(r.driver.used(0).len, 1, "an error's used length is the status byte");
      assert.ok(Deno.statSync(r.image).blocks! > 0, "part of the write reached the file");
      assert.equal(r.status(after), VIRTIO_BLK_S_OK, "the ring carries on");
      assert.equal(r.dp.stats()[0].errors, 1);
      assert.deepEqual(r.broken, []);
    } finally {
      await r.close();
      fs.unmount();
    }
  },
});

Deno.test("dataplane: drainedBegin returns at once; waitIdle in the section is bdrv_drained_begin's wait", async () => {
  const r = await Rig.create();
  try {
    r.request(VIRTIO_BLK_T_IN, 0, 4096, true);
    r.kick();
    await r.until(() => r.engine.held.length === 1, "submitted");
    r.blk.drainedBegin(); // no nested event loop: returns with the read in flight
    assert.equal(r.blk.inFlight, 1);
    let idle = false;
    const w = r.blk.waitIdle().then(() => idle = true);
    r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.idle(5);
    assert.equal(idle, false, "waits for the in-flight read");
    r.engine.release();
    await r.until(() => idle, "idle");
    await w;
    assert.equal(r.blk.inFlight, 0, "quiescent, as after bdrv_drained_begin");
    assert.equal(r.engine.stats.submitted, 1, "the flush waits for drainedEnd");
    r.engine.autoRelease = true;
    r.blk.drainedEnd();
    await r.until(() => r.driver.usedIdx() === 2, "flush served after drainedEnd");
  } finally {
    await r.close();
  }
});

// Issue 10 item 2c: a restart the dataplane refuses (the new ring is outside
// guest memory) had already stopped the running queue; the main thread, told
// the restart failed, then closed the kick fd the queue was started with.
Deno.test("dataplane: a refused restart leaves the queue running with its old setup and position", async () => {
  const r = await Rig.create();
  try {
    r.engine.autoRelease = true;
    r.request(VIRTIO_BLK_T_IN, 0, 4096, true);
    r.kick();
    await r.until(() => r.driver.usedIdx() === 1, "first read");
    const otherKick = eventfd();
    try {
      await assert.rejects(
        r.dp.startQueue({ ...r.setup, desc: 2 ** 45, kickFd: otherKick, base: -1 }),
        /RingOutOfRange|desc/,
      );
    } finally {
      close(otherKick);
    }
    assert.deepEqual(r.dp.queueIndexes, [0], "the queue still runs");
    r.request(VIRTIO_BLK_T_IN, 8, 4096, true);
    r.kick(); // the old kick fd
    await r.until(() => r.driver.usedIdx() === 2, "served after the refused restart");
    assert.equal(await r.dp.stopQueue(0), 2, "position kept, nothing replayed");
    assert.equal(r.engine.stats.submitted, 2);
  } finally {
    await r.close();
  }
});

// Issue 10 item 2d: setMemory with a mapping that does not hold a running
// ring threw half-way (memory swapped, that queue left on the old mapping and
// detached for good); the main thread then dropped every queue.
Deno.test("dataplane: setMemory refuses a mapping without a running ring and changes nothing", async () => {
  const r = await Rig.create();
  try {
    r.engine.autoRelease = true;
    r.request(VIRTIO_BLK_T_IN, 0, 4096, true);
    r.kick();
    await r.until(() => r.driver.usedIdx() === 1, "first read");
    const noRings = GuestMemory.fromMapped(
      r.tm.regions.slice(1).map((m) => ({
        guestPhysAddr: m.gpa,
        size: m.size,
        userAddr: m.uva,
        hostAddr: m.host,
      })),
    );
    await assert.rejects(r.dp.setMemory(noRings), /RingOutOfRange/);
    assert.deepEqual(r.dp.queueIndexes, [0]);
    r.request(VIRTIO_BLK_T_IN, 8, 4096, true);
    r.kick();
    await r.until(() => r.driver.usedIdx() === 2, "served on the old mapping");
    assert.equal(r.engine.stats.submitted, 2, "nothing replayed");
    assert.deepEqual(r.broken, []);
  } finally {
    await r.close();
  }
});

// Issue 10 item 2a (fixed with the memory-swap change): stopQueue takes the
// queue out of the running set before it waits for its requests; a
// setMemory(null) meanwhile (a reset) must still wait for them, or the main
// thread unmaps memory they complete into.
Deno.test("dataplane: setMemory(null) waits for the requests of a queue being stopped", async () => {
  const r = await Rig.create();
  try {
    r.request(VIRTIO_BLK_T_IN, 0, 4096, true);
    r.kick();
    await r.until(() => r.engine.held.length === 1, "submitted");
    const stopped = r.dp.stopQueue(0);
    let dropped = false;
    const drop = r.dp.setMemory(null).then(() => dropped = true);
    await r.idle(5);
    assert.equal(dropped, false, "memory dropped under a request in flight");
    r.engine.release();
    await r.until(() => dropped, "memory dropped after the request");
    assert.equal(await stopped, 1);
    await drop;
    assert.equal(r.driver.usedIdx(), 1);
  } finally {
    await r.close();
  }
});

// Issue 10 item 2a (fixed with the memory-swap change): a restart waits for
// the running queue to stop; a new mapping installed meanwhile must be the
// one the restarted queue uses, not the map read before the wait.
Deno.test("dataplane: a restart that straddles a memory swap starts on the new mapping", async () => {
  const r = await Rig.create();
  const next = remapGuest(r.tm);
  try {
    r.request(VIRTIO_BLK_T_IN, 0, 4096, true);
    r.kick();
    await r.until(() => r.engine.held.length === 1, "submitted");
    let restarted = false, swapped = false;
    const restart = r.dp.startQueue({ ...r.setup, base: -1 }).then(() => restarted = true);
    const swap = r.dp.setMemory(next.mem).then(() => swapped = true);
    await r.idle(5);
    assert.equal(restarted || swapped, false, "both wait for the request in flight");
    r.engine.autoRelease = true;
    r.engine.release();
    await r.until(() => restarted && swapped, "restarted and swapped");
    await Promise.all([restart, swap]);
    // The guest's next request, then the old mapping is gone (the test's
    // driver writes through it, so before).
    const b = r.request(VIRTIO_BLK_T_IN, 8, 4096, true);
    next.retireOld();
    r.kick();
    const used = ringLayout(RING_GPA, QSIZE).used;
    await r.until(() => next.u16(used + 2) === 2, "served on the new mapping");
    assert.equal(next.u8(r.meta(b) + 16), VIRTIO_BLK_S_OK);
  } finally {
    await r.close();
    next.close();
  }
});

Deno.test("dataplane: with EVENT_IDX the completion that passes used_event notifies at once, not after the batch", async () => {
  const r = await Rig.create();
  try {
    r.driver.setUsedEvent(0); // the driver sleeps: "interrupt me after the first used element"
    for (let i = 0; i < 4; i++) r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.until(() => r.engine.held.length === 4, "4 flushes submitted");
    // Complete them one by one inside one bottom half, looking at the call fd
    // after each: a driver woken by the first answer overlaps with the rest.
    const batch = r.engine.held.splice(0);
    const signalled: number[] = [];
    r.ctx.scheduleOneshot(() => {
      for (const h of batch) {
        h.cb(h.ret);
        signalled.push(eventfdRead(r.callFd));
      }
    });
    await r.until(() => signalled.length === 4, "4 completed");
    await r.idle(3);
    assert.deepEqual(signalled, [1, 0, 0, 0], "signalled at the first completion, once");
    assert.equal(eventfdRead(r.callFd), 0, "and not again at the batch's end");
    assert.equal(r.dp.stats()[0].notifies, 1);
  } finally {
    await r.close();
  }
});

Deno.test("dataplane: null-co completes inside the submission, so one kick's batch needs one request slot", async () => {
  const r = await Rig.create({ block: { driver: "null-co", size: IMAGE } });
  try {
    r.driver.setUsedEvent(0);
    const slots: number[] = [];
    for (let i = 0; i < 8; i++) slots.push(r.request(VIRTIO_BLK_T_IN, 8 * i, 4096, true));
    r.kick();
    await r.until(() => r.driver.usedIdx() === 8, "8 used");
    await r.idle(3);
    for (const s of slots) assert.equal(r.status(s), VIRTIO_BLK_S_OK);
    assert.equal(r.dp.requestSlots, 1, "each request completed before the next was popped");
    assert.equal(eventfdRead(r.callFd), 1, "one notification");
  } finally {
    await r.close();
  }
});

// Issue 12: a dataplane started on an inflight log that a dead one left
// behind submits the requests that were in flight again, in the order they
// were first taken (not by head number), before anything new.
Deno.test("dataplane: a restarted dataplane resubmits from the inflight log in the order taken", async () => {
  const r = await Rig.create();
  const log = mmap(
    inflightQueueRegionSize(QSIZE),
    PROT_READ | PROT_WRITE,
    MAP_PRIVATE | MAP_ANONYMOUS,
    -1,
    0,
  );
  const inflight = { addr: log, queueSize: QSIZE };
  const engine2 = new HeldEngine(r.ctx);
  let blk2: BlockBackend | null = null;
  let dp2: VirtioBlkDataPlane | null = null;
  const kick2 = eventfd();
  try {
    await r.dp.stopQueue(0);
    await r.dp.startQueue({ ...r.setup, inflight });
    // 31 flushes (2 descriptors each) first, so the reads' heads wrap: 62, 1, 4, 7.
    r.engine.autoRelease = true;
    for (let i = 0; i < 31; i++) r.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
    r.kick();
    await r.until(() => r.driver.usedIdx() === 31, "31 flushes");
    r.engine.autoRelease = false;
    const slots = [0, 1, 2, 3].map((i) => r.request(VIRTIO_BLK_T_IN, 8 * i, 4096, true));
    assert.deepEqual(slots.map((s) => r.heads.get(s)), [62, 1, 4, 7]);
    r.kick();
    await r.until(() => r.engine.held.length === 4, "4 reads submitted");
    // The second completes alone (out of order), then the dataplane "dies":
    // its ring is disabled and its engine never completes the rest.
    r.engine.held.unshift(r.engine.held.splice(1, 1)[0]);
    r.engine.release(1);
    await r.until(() => r.driver.usedIdx() === 32, "one read used");
    r.dp.setEnabled(0, false);

    // The restarted host: its own BlockBackend and dataplane on the same
    // guest memory and log; QEMU restarts the ring at the used idx.
    blk2 = await BlockBackend.open(r.ctx, { driver: "file", filename: r.image }, {
      engine: engine2,
    });
    dp2 = new VirtioBlkDataPlane(r.ctx, blk2, {
      device: { capacity: IMAGE / 512, flush: true },
      serial: "unit-serial",
      writeback: true,
    });
    await dp2.setMemory(r.tm.mem);
    const late = r.request(VIRTIO_BLK_T_IN, 64, 4096, true); // offered while it was down
    eventfdRead(r.callFd);
    // QEMU's order: SET_VRING_KICK (the start), then SET_VRING_CALL.
    const restart = { ...r.setup, kickFd: kick2, callFd: null, base: 32, inflight };
    assert.equal(await dp2.startQueue(restart), 3);
    dp2.setCallFd(0, r.callFd);
    // One notification as soon as there is a call fd: the previous
    // back-end's last used entries may never have been signalled.
    assert.equal(eventfdRead(r.callFd), 1);
    await r.until(() => engine2.held.length === 4, "3 resubmitted + 1 new submitted");
    assert.deepEqual(engine2.ops, ["preadv@0", "preadv@8192", "preadv@12288", "preadv@32768"]);
    engine2.release();
    await r.until(() => r.driver.usedIdx() === 36, "all used");
    const used = Array.from({ length: 5 }, (_, i) => r.driver.used(31 + i).id);
    assert.deepEqual(used.toSorted((a, b) => a - b), [1, 4, 7, 10, 62], "each exactly once");
    assert.equal(r.heads.get(late), 10);
    for (const s of [...slots, late]) assert.equal(r.status(s), VIRTIO_BLK_S_OK);
    assert.equal(dp2.stats()[0].resubmitted, 3);
  } finally {
    if (dp2 !== null) {
      await dp2.close();
      const b = blk2!;
      let closed = false;
      const p = b.close().then(() => closed = true);
      await r.until(() => closed, "blk2 closed");
      await p;
    }
    close(kick2);
    // The first dataplane's requests complete now (into a ring nobody reads).
    r.engine.autoRelease = true;
    r.engine.release();
    await r.until(() => r.dp.inFlight === 0, "old dataplane idle");
    await r.close();
    munmap(log, inflightQueueRegionSize(QSIZE));
  }
});
