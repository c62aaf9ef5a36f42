import assert from "node:assert/strict";
import { AioContext, IOThread } from "../../aio/mod.ts";
import type { UringReadsResult } from "./fixtures/uring_fns.ts";
import {
  type IoEngine,
  IoUringEngine,
  IoVector,
  LinuxAioEngine,
  ThreadPoolEngine,
} from "../../block/mod.ts";
import {
  close,
  EBADF,
  EEXIST,
  fdatasync,
  IORING_SETUP_COOP_TASKRUN,
  IORING_SETUP_DEFER_TASKRUN,
  IORING_SETUP_SINGLE_ISSUER,
  ioUringEnter,
  O_DIRECT,
  O_RDWR,
  open,
  pipe,
  write,
} from "../../sys/mod.ts";
import { aligned, fillPattern, makeImage, patternByte, pollWhile } from "./helpers.ts";

const BS = 4096;
const URING_FNS = new URL("./fixtures/uring_fns.ts", import.meta.url).href;

/** Reads `n` blocks concurrently (block i from offset i*BS), verifying each. */
async function concurrentReads(ctx: AioContext, e: IoEngine, fd: number, n: number, seed: number) {
  const mem = aligned(n * BS);
  const rets: number[] = [];
  const qs: IoVector[] = [];
  e.plug();
  for (let i = 0; i < n; i++) {
    const q = new IoVector(1);
    q.add(mem.addr + i * BS, BS);
    qs.push(q);
    e.preadv(fd, q, ((i * 7) % n) * BS, (r) => rets.push(r));
  }
  e.unplug();
  await pollWhile(ctx, () => rets.length < n);
  assert.ok(rets.every((r) => r === 0), `rets ${rets}`);
  const b = mem.bytes;
  for (let i = 0; i < n; i++) {
    const off = ((i * 7) % n) * BS;
    for (let k = 0; k < BS; k += 97) assert.equal(b[i * BS + k], patternByte(seed, off + k));
  }
  mem.unmap();
}

Deno.test("native: maxEvents=2 with 32 concurrent requests queues and completes all", async () => {
  const path = makeImage(32 * BS, 4);
  const fd = open(path, O_RDWR | O_DIRECT);
  const ctx = new AioContext();
  const e = new LinuxAioEngine(ctx, { maxEvents: 2 });
  await concurrentReads(ctx, e, fd, 32, 4);
  assert.ok(e.stats.queued > 0);
  assert.ok(e.stats.submitCalls >= 16, `${e.stats.submitCalls} submits`);
  assert.equal(e.stats.completed, 32);
  await e.close();
  ctx.close();
  close(fd);
});

Deno.test("native: real kernel EAGAIN (io_setup nr=2, 512 requests) goes to the pending queue", async () => {
  const n = 512;
  const path = makeImage(n * BS, 6);
  const fd = open(path, O_RDWR | O_DIRECT);
  const ctx = new AioContext();
  const e = new LinuxAioEngine(ctx, { maxEvents: 1024, contextSize: 2, maxBatch: 1024 });
  await concurrentReads(ctx, e, fd, n, 6);
  assert.ok(e.stats.queued > 0, "never blocked");
  assert.ok(e.stats.submitCalls > 1);
  assert.equal(e.stats.completed, n);
  await e.close();
  ctx.close();
  close(fd);
});

Deno.test("native: io_getevents fallback when the ring is not used", async () => {
  const path = makeImage(16 * BS, 8);
  const fd = open(path, O_RDWR | O_DIRECT);
  const ctx = new AioContext();
  const e = new LinuxAioEngine(ctx, { useRing: false });
  assert.equal(e.usesRing, false);
  await concurrentReads(ctx, e, fd, 16, 8);
  await e.close();
  ctx.close();
  close(fd);
});

/** Linux release as [major, minor]. */
function kernelRelease(): [number, number] {
  const [maj, min] = Deno.osRelease().split(".").map((x) => parseInt(x, 10));
  return [maj, min];
}

Deno.test("io_uring: rings defer completion task work where the kernel can (6.1+)", async () => {
  const ctx = new AioContext();
  const e = new IoUringEngine(ctx);
  const [maj, min] = kernelRelease();
  if (maj > 6 || (maj === 6 && min >= 1)) {
    assert.equal(e.setupFlags & IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_DEFER_TASKRUN);
    assert.equal(e.setupFlags & IORING_SETUP_SINGLE_ISSUER, IORING_SETUP_SINGLE_ISSUER);
  } else {
    console.warn(`SKIP part: kernel ${Deno.osRelease()} has no IORING_SETUP_DEFER_TASKRUN`);
  }
  const coop = new IoUringEngine(ctx, { taskrun: "coop" });
  assert.equal(coop.setupFlags & IORING_SETUP_DEFER_TASKRUN, 0);
  if (maj > 5 || (maj === 5 && min >= 19)) {
    assert.equal(coop.setupFlags & IORING_SETUP_COOP_TASKRUN, IORING_SETUP_COOP_TASKRUN);
  }
  const plain = new IoUringEngine(ctx, { taskrun: "interrupt" });
  assert.equal(plain.setupFlags & (IORING_SETUP_COOP_TASKRUN | IORING_SETUP_DEFER_TASKRUN), 0);
  await Promise.all([e.close(), coop.close(), plain.close()]);
  ctx.close();
});

// O_DIRECT completions arrive from the disk interrupt as task work for the
// submitting thread. Without flags they wake the thread's epoll_wait with
// EINTR; with DEFER_TASKRUN they signal the eventfd and wait for GETEVENTS.
// Measured in an IOThread, whose signals are blocked: the test runner's main
// thread also gets SIGCHLD from other tests' children.
for (const taskrun of ["defer", "coop", "interrupt"] as const) {
  Deno.test(`io_uring (${taskrun}): O_DIRECT reads in an IOThread, right data`, async () => {
    const n = 256, rounds = 8;
    const path = makeImage(n * BS, 9);
    // Written back first: an O_DIRECT read of dirty page cache cannot be done
    // without blocking, so io_uring would hand it to an io-wq worker, which it
    // starts through task work on this thread (an EINTR no flag avoids).
    const wfd = open(path, O_RDWR);
    fdatasync(wfd);
    close(wfd);
    const t = await IOThread.start({ name: `uring-${taskrun}`, modules: [URING_FNS] });
    try {
      const r = await t.call<UringReadsResult>("uringReads", { path, n, rounds, seed: 9, taskrun });
      assert.equal(r.completed, n * rounds);
      assert.equal(r.errors, 0);
      assert.equal(r.wrongBytes, 0);
      console.log(
        `${taskrun}: ${r.interruptedWaits} epoll_wait EINTR in ${n * rounds} reads, ` +
          `${r.ioWorkers} io-wq workers`,
      );
      if (taskrun === "defer" && r.setupFlags & IORING_SETUP_DEFER_TASKRUN) {
        assert.equal(r.interruptedWaits, 0, `with ${r.ioWorkers} io-wq workers started`);
      }
    } finally {
      await t.stop();
    }
  });
}

Deno.test("io_uring: SQ of 4 entries with 32 concurrent requests uses the overflow queue", async () => {
  const path = makeImage(32 * BS, 5);
  const fd = open(path, O_RDWR | O_DIRECT);
  const ctx = new AioContext();
  const e = new IoUringEngine(ctx, { entries: 4 });
  assert.equal(e.sqEntries, 4);
  await concurrentReads(ctx, e, fd, 32, 5);
  assert.ok(e.stats.queued > 0);
  assert.equal(e.stats.completed, 32);
  await e.close();
  ctx.close();
  close(fd);
});

for (const kind of ["native", "io_uring"] as const) {
  Deno.test(`${kind}: plug/unplug submits N requests with one system call`, async () => {
    const path = makeImage(64 * BS, 2);
    const fd = open(path, O_RDWR | O_DIRECT);
    const ctx = new AioContext();
    const e: IoEngine = kind === "native" ? new LinuxAioEngine(ctx) : new IoUringEngine(ctx);
    const before = e.stats.submitCalls;
    await concurrentReads(ctx, e, fd, 24, 2);
    assert.equal(e.stats.submitCalls - before, 1, "24 requests under one plug");
    // more than the max batch (32): one submit per full batch, plus the rest at unplug
    const mid = e.stats.submitCalls;
    await concurrentReads(ctx, e, fd, 40, 2);
    assert.equal(e.stats.submitCalls - mid, 2, "40 requests: batch of 32 + 8");
    // unplugged: each request goes out at once
    const one = e.stats.submitCalls;
    const q = IoVector.fromBuffers([new Uint8Array(0)]);
    let r = 1;
    const mem = aligned(BS);
    q.reset();
    q.add(mem.addr, BS);
    e.preadv(fd, q, 0, (x) => r = x);
    assert.equal(e.stats.submitCalls - one, 1);
    await pollWhile(ctx, () => r === 1);
    assert.equal(r, 0);
    mem.unmap();
    await e.close();
    ctx.close();
    close(fd);
  });
}

for (const kind of ["native", "io_uring"] as const) {
  Deno.test(`${kind}: the context's aio-max-batch caps a plugged batch`, async () => {
    const path = makeImage(64 * BS, 2);
    const fd = open(path, O_RDWR | O_DIRECT);
    const ctx = new AioContext({ aioMaxBatch: 4 });
    const e: IoEngine = kind === "native" ? new LinuxAioEngine(ctx) : new IoUringEngine(ctx);
    const before = e.stats.submitCalls;
    await concurrentReads(ctx, e, fd, 10, 2);
    assert.equal(
      e.stats.submitCalls - before,
      3,
      "10 requests under one plug: 4 + 4 + 2 at unplug",
    );
    await e.close();
    ctx.close();
    close(fd);
  });
}

for (const kind of ["threads", "native", "io_uring"] as const) {
  Deno.test(`${kind}: a read past EOF is padded with zeroes`, async () => {
    const path = makeImage(3 * BS, 9);
    const fd = open(path, O_RDWR | O_DIRECT);
    const ctx = new AioContext();
    const e: IoEngine = kind === "native"
      ? new LinuxAioEngine(ctx)
      : kind === "io_uring"
      ? new IoUringEngine(ctx)
      : new ThreadPoolEngine(ctx);
    const mem = aligned(2 * BS);
    mem.bytes.fill(0xee);
    const q = new IoVector(2);
    q.add(mem.addr, BS);
    q.add(mem.addr + BS, BS);
    let r = 1;
    e.preadv(fd, q, 2 * BS, (x) => r = x);
    await pollWhile(ctx, () => r === 1);
    assert.equal(r, 0);
    const b = mem.bytes;
    assert.deepEqual(b.slice(0, BS), fillPattern(new Uint8Array(BS), 9, 2 * BS));
    assert.ok(b.subarray(BS, 2 * BS).every((x) => x === 0), "tail not zeroed");
    mem.unmap();
    await e.close();
    ctx.close();
    close(fd);
  });
}

Deno.test("io_uring: a short read before EOF is resubmitted for the rest, not zero-padded", async () => {
  // A pipe returns what it holds (a short read) and blocks for the rest:
  // io_uring hands back 1000 of 4096+4096 bytes; the rest must be read, not padded.
  const [rd, wr] = pipe();
  const ctx = new AioContext();
  const e = new IoUringEngine(ctx);
  const mem = aligned(2 * BS);
  const q = new IoVector(2);
  q.add(mem.addr, BS);
  q.add(mem.addr + BS, BS);
  const data = new Uint8Array(2 * BS).map((_, i) => (i * 7 + 3) & 0xff);
  write(wr, data.subarray(0, 1000));
  let r = 1;
  e.preadv(rd, q, 0, (x) => r = x);
  await pollWhile(ctx, () => e.stats.shortReads === undefined && r === 1);
  assert.equal(r, 1, "completed after a short read (zero-padded?)");
  write(wr, data.subarray(1000, 5000));
  write(wr, data.subarray(5000));
  await pollWhile(ctx, () => r === 1);
  assert.equal(r, 0);
  assert.deepEqual(mem.bytes.slice(0, 2 * BS), data);
  assert.ok(e.stats.shortReads! >= 1);
  // EOF after a short read: the rest is zero padding, the request succeeds.
  mem.bytes.fill(0xee);
  write(wr, data.subarray(0, 100));
  r = 1;
  e.preadv(rd, q, 0, (x) => r = x);
  await pollWhile(ctx, () => e.stats.shortReads! < 2);
  close(wr);
  await pollWhile(ctx, () => r === 1);
  assert.equal(r, 0);
  assert.deepEqual(mem.bytes.slice(0, 100), data.slice(0, 100));
  assert.ok(mem.bytes.subarray(100, 2 * BS).every((x) => x === 0), "rest zeroed at EOF");
  mem.unmap();
  await e.close();
  ctx.close();
  close(rd);
});

for (const useRing of [false, true]) {
  const how = useRing ? "aio_ring" : "io_getevents";
  Deno.test(`native (${how}): a callback that polls nested reaps later events, none twice or lost`, async () => {
    // Buffered reads complete inside io_submit, so every event is ready at once.
    const path = makeImage(8 * BS, 9);
    const fd = open(path, O_RDWR);
    const ctx = new AioContext();
    const e = new LinuxAioEngine(ctx, { useRing });
    const mem = aligned(8 * BS);
    const qs = Array.from({ length: 5 }, (_, i) => {
      const q = new IoVector(1);
      q.add(mem.addr + i * BS, BS);
      return q;
    });
    const log: string[] = [];
    const read = (i: number, then = () => {}) =>
      e.preadv(fd, qs[i], i * BS, (r) => {
        log.push(`${"abcde"[i]}${r === 0 ? "" : `=${r}`}`);
        then();
      });
    e.plug();
    read(0, () => {
      e.plug();
      read(3);
      read(4);
      e.unplug();
      ctx.poll(false); // reaps nested while the outer reap still holds b and c
    });
    read(1);
    read(2);
    e.unplug();
    await pollWhile(ctx, () => log.length < 5, 3000).catch(() => {});
    assert.deepEqual(log, ["a", "b", "c", "d", "e"]);
    assert.equal(e.inFlight, 0);
    const b = mem.bytes;
    for (let i = 0; i < 5; i++) assert.equal(b[i * BS + 1], patternByte(9, i * BS + 1));
    mem.unmap();
    await e.close();
    ctx.close();
    close(fd);
  });
}

Deno.test("native: an io_submit error completes the request later, never inside preadv/pwritev", async () => {
  const path = makeImage(4 * BS, 10);
  const fd = open(path, O_RDWR);
  const ctx = new AioContext();
  const e = new LinuxAioEngine(ctx);
  const mem = aligned(2 * BS);
  const bad = new IoVector(1), good = new IoVector(1);
  bad.add(mem.addr, BS);
  good.add(mem.addr + BS, BS);
  const rets: string[] = [];
  e.preadv(-1, bad, 0, (r) => rets.push(`read ${r}`)); // io_submit: EBADF
  e.pwritev(-1, bad, 0, (r) => rets.push(`write ${r}`));
  assert.deepEqual([...rets], [], "completed inside the submitting call");
  // Under plug, the failed first request does not hold back the rest of the batch.
  e.plug();
  e.preadv(-1, bad, 0, (r) => rets.push(`plugged ${r}`));
  e.preadv(fd, good, BS, (r) => rets.push(`good ${r}`));
  e.unplug();
  assert.deepEqual([...rets], [], "completed inside unplug");
  await pollWhile(ctx, () => rets.length < 4);
  const want = [`read ${-EBADF}`, `write ${-EBADF}`, `plugged ${-EBADF}`, "good 0"];
  assert.deepEqual([...rets].sort(), want.sort());
  assert.equal(mem.bytes[BS + 7], patternByte(10, BS + 7));
  assert.equal(e.inFlight, 0);
  mem.unmap();
  await e.close();
  ctx.close();
  close(fd);
});

Deno.test("io_uring: an io_uring_enter error fails the unsubmitted requests later, the engine goes on", async () => {
  // Before: anything but EINTR/EAGAIN/EBUSY threw out of preadv (out of the
  // guest's request submission), which killed the IOThread.
  const path = makeImage(8 * BS, 11);
  const fd = open(path, O_RDWR);
  const ctx = new AioContext();
  let refuse = 1;
  const e = new IoUringEngine(ctx, {
    entries: 4, // 6 requests: 4 in the SQ, 2 waiting in the pending queue
    enter: (ringFd, toSubmit, minComplete, flags) =>
      toSubmit > 0 && refuse-- > 0 ? -EEXIST : ioUringEnter(ringFd, toSubmit, minComplete, flags),
  });
  const mem = aligned(8 * BS);
  const rets: number[] = [];
  e.plug();
  for (let i = 0; i < 6; i++) {
    const q = new IoVector(1);
    q.add(mem.addr + i * BS, BS);
    e.preadv(fd, q, i * BS, (r) => rets.push(r));
  }
  e.unplug();
  assert.deepEqual(rets, [], "completed inside the submitting call");
  await pollWhile(ctx, () => rets.length < 6);
  assert.deepEqual(rets, Array(6).fill(-EEXIST));
  assert.equal(e.inFlight, 0);
  // The ring is intact: the SQEs taken back were never consumed.
  const q = new IoVector(1);
  q.add(mem.addr + 7 * BS, BS);
  let r = 1;
  e.preadv(fd, q, 7 * BS, (x) => r = x);
  await pollWhile(ctx, () => r === 1);
  assert.equal(r, 0);
  assert.equal(mem.bytes[7 * BS + 5], patternByte(11, 7 * BS + 5));
  mem.unmap();
  await e.close();
  ctx.close();
  close(fd);
});
