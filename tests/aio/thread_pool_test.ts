import assert from "node:assert/strict";
import { AioContext, ThreadPool } from "../../aio/mod.ts";
import { addressOf, close, EBADF, ECANCELED, fstat, O_CREAT, O_RDWR, open } from "../../sys/mod.ts";

/**
 * Runs `fn` with a fresh context, a pool made with `opts` and an empty scratch
 * file, and tears all three down afterwards, also when `fn` throws.
 */
async function withPool(
  opts: ConstructorParameters<typeof ThreadPool>[1],
  fn: (t: { ctx: AioContext; pool: ThreadPool; fd: number }) => Promise<void>,
): Promise<void> {
  const ctx = new AioContext();
  const pool = new ThreadPool(ctx, opts);
  const dir = Deno.makeTempDirSync({ prefix: "aio-tp-" });
  const fd = open(`${dir}/img`, O_RDWR | O_CREAT, 0o600);
  try {
    await fn({ ctx, pool, fd });
  } finally {
    await pool.close();
    ctx.close();
    close(fd);
    Deno.removeSync(dir, { recursive: true });
  }
}

/** Everything whose address a worker may use stays reachable until the test ends. */
const keep: unknown[] = [];

function iovec(bufs: Uint8Array[]): BigUint64Array {
  const iov = new BigUint64Array(bufs.length * 2);
  keep.push(iov, ...bufs);
  bufs.forEach((b, i) => {
    iov[2 * i] = BigInt(addressOf(b));
    iov[2 * i + 1] = BigInt(b.length);
  });
  return iov;
}

async function until(ctx: AioContext, cond: () => boolean): Promise<void> {
  while (!cond()) await ctx.pollAsync();
}

Deno.test("ThreadPool: pwritev then preadv on a real file, completions in the submitting context", () =>
  withPool({ maxThreads: 2 }, async ({ ctx, pool, fd }) => {
    const a = new Uint8Array(4096).map((_, i) => i * 7);
    const b = new Uint8Array(512).map((_, i) => 255 - (i & 0xff));
    const wiov = iovec([a, b]);
    const order: string[] = [];
    let wret = 1;
    pool.submitPwritev(fd, addressOf(wiov), 2, 8192, (r) => {
      wret = r;
      order.push("write");
    });
    await until(ctx, () => wret !== 1);
    assert.equal(wret, 4608);
    assert.equal(fstat(fd).size, 8192 + 4608);

    let sret = 1;
    pool.submitFdatasync(fd, (r) => sret = r);
    await until(ctx, () => sret !== 1);
    assert.equal(sret, 0);

    const ra = new Uint8Array(4096), rb = new Uint8Array(512);
    const riov = iovec([ra, rb]);
    let rret = 1;
    pool.submitPreadv(fd, addressOf(riov), 2, 8192, (r) => rret = r);
    await until(ctx, () => rret !== 1);
    assert.equal(rret, 4608);
    assert.deepEqual(ra, a);
    assert.deepEqual(rb, b);

    let fret = 1;
    pool.submitFallocate(fd, 0, 0, 1 << 20, (r) => fret = r);
    await until(ctx, () => fret !== 1);
    assert.equal(fret, 0);
    assert.equal(fstat(fd).size, 1 << 20);

    // errno mapping: a bad fd gives -EBADF through the callback.
    let bad = 1;
    pool.submitPreadv(-1, addressOf(riov), 1, 0, (r) => bad = r);
    await until(ctx, () => bad !== 1);
    assert.equal(bad, -EBADF);
    assert.equal(pool.inFlight, 0);
    assert.equal(pool.stats.completed, 5);
  }));

Deno.test("ThreadPool: grows on demand up to maxThreads, runs jobs concurrently", () =>
  withPool({ maxThreads: 3, idleTimeoutMs: 60_000 }, async ({ ctx, pool, fd }) => {
    const N = 60;
    const bufs = Array.from({ length: N }, (_, i) => new Uint8Array(4096).fill(i));
    const iovs = bufs.map((b) => iovec([b]));
    const rets: number[] = [];
    for (let i = 0; i < N; i++) {
      pool.submitPwritev(fd, addressOf(iovs[i]), 1, i * 4096, (r) => rets.push(r));
    }
    await until(ctx, () => rets.length === N);
    assert.ok(rets.every((r) => r === 4096));
    assert.ok(pool.stats.spawned >= 1 && pool.stats.spawned <= 3, `spawned ${pool.stats.spawned}`);
    assert.ok(pool.threads <= 3);
    // Every block landed where it belongs.
    const check = new Uint8Array(4096);
    const ciov = iovec([check]);
    for (const i of [0, 17, N - 1]) {
      let r = 1;
      pool.submitPreadv(fd, addressOf(ciov), 1, i * 4096, (x) => r = x);
      await until(ctx, () => r !== 1);
      assert.equal(r, 4096);
      assert.ok(check.every((x) => x === i));
    }
  }));

Deno.test("ThreadPool: cancel a queued job (-ECANCELED), not a finished one", () =>
  withPool({ maxThreads: 1, slots: 1 }, async ({ ctx, pool }) => {
    // Slot pressure: 1 slot, so later jobs wait in the JS queue and are surely cancellable.
    const rets = new Map<number, number>();
    const reqs = Array.from(
      { length: 4 },
      (_, i) => pool.submitFdatasync(-1, (r) => rets.set(i, r)),
    );
    assert.equal(pool.cancel(reqs[2]), true);
    assert.equal(pool.cancel(reqs[2]), false);
    ctx.poll(false); // the -ECANCELED callback runs from a BH
    assert.equal(rets.get(2), -ECANCELED);
    await until(ctx, () => rets.size === 4);
    assert.equal(rets.get(0), -EBADF);
    assert.equal(rets.get(3), -EBADF);
    assert.equal(pool.cancel(reqs[0]), false);
    assert.equal(pool.stats.cancelled, 1);
  }));

Deno.test("ThreadPool: cancel of a job in a shared slot before a worker starts it", () =>
  withPool({ maxThreads: 1 }, async ({ ctx, pool }) => {
    // The first worker needs tens of ms to start: jobs submitted now sit in slots.
    const rets: number[] = [];
    const req = pool.submitFdatasync(-1, (r) => rets.push(r));
    assert.equal(pool.cancel(req), true);
    await until(ctx, () => rets.length === 1);
    assert.deepEqual(rets, [-ECANCELED]);
    // The slot is reusable afterwards.
    let r = 1;
    pool.submitFdatasync(-1, (x) => r = x);
    await until(ctx, () => r !== 1);
    assert.equal(r, -EBADF);
  }));

Deno.test("ThreadPool: idle workers exit after idleTimeoutMs", () =>
  withPool({ maxThreads: 2, idleTimeoutMs: 50 }, async ({ ctx, pool }) => {
    let r = 1;
    pool.submitFdatasync(-1, (x) => r = x);
    await until(ctx, () => r !== 1);
    assert.ok(pool.threads >= 1);
    const t0 = Date.now();
    while (pool.threads > 0 && Date.now() - t0 < 5000) {
      await new Promise((res) => setTimeout(res, 20));
    }
    assert.equal(pool.threads, 0);
    // And the pool grows again afterwards.
    r = 1;
    pool.submitFdatasync(-1, (x) => r = x);
    await until(ctx, () => r !== 1);
    assert.equal(r, -EBADF);
  }));

Deno.test("ThreadPool: minThreads start at once and survive the idle timeout; extra ones exit", async () => {
  await withPool({ minThreads: 2, maxThreads: 6, idleTimeoutMs: 50 }, async ({ ctx, pool, fd }) => {
    assert.equal(pool.threads, 2, "started up front");
    // A burst grows the pool beyond the minimum...
    let done = 0;
    for (let i = 0; i < 12; i++) pool.submitFdatasync(fd, () => done++);
    while (done < 12) await ctx.pollAsync();
    const grown = pool.threads;
    // ...and idle Workers exit down to the minimum, never below it.
    const t0 = Date.now();
    while (pool.threads > 2 && Date.now() - t0 < 5000) {
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(pool.threads, 2, `shrank from ${grown} to the minimum`);
    await new Promise((r) => setTimeout(r, 200)); // several idle timeouts
    assert.equal(pool.threads, 2, "the minimum stays");
    done = 0;
    pool.submitFdatasync(fd, () => done++);
    while (done < 1) await ctx.pollAsync();
  });
});

/**
 * Polls `ctx` (without blocking, so a context that busy-polls cannot hang the
 * test) until `cond()` holds or `ms` pass; returns whether it holds.
 */
async function within(ctx: AioContext, ms: number, cond: () => boolean): Promise<boolean> {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) {
    ctx.poll(false);
    await new Promise((r) => setTimeout(r, 2));
  }
  return cond();
}

Deno.test("ThreadPool: a cancelled job's slot is freed when a worker skips it, not at the next completion", () =>
  withPool({ maxThreads: 1, slots: 1 }, async ({ ctx, pool }) => {
    // The first worker needs tens of ms to start: the job is still queued in its slot.
    const rets: number[] = [];
    const a = pool.submitFdatasync(-1, (r) => rets.push(r));
    assert.equal(pool.cancel(a), true);
    let b = 1;
    pool.submitFdatasync(-1, (r) => b = r); // waits in the JS queue for the one slot
    const ran = await within(ctx, 3000, () => b !== 1);
    assert.ok(ran, `the second job never ran; inFlight ${pool.inFlight}`);
    assert.deepEqual(rets, [-ECANCELED]);
    assert.equal(b, -EBADF);
    assert.equal(pool.inFlight, 0);
  }));

Deno.test("ThreadPool: a completion callback that polls nested gets the later completions delivered inside", async () => {
  const ctx = new AioContext();
  const pool = new ThreadPool(ctx, { maxThreads: 1 });
  const order: string[] = [];
  let bDone = false;
  pool.submitFdatasync(-1, (r) => {
    assert.equal(r, -EBADF);
    order.push("a");
    // Wait for the next job in a nested event loop (as a synchronous drain does).
    const end = Date.now() + 3000;
    const guard = ctx.timerNew(() => {}); // bounds each blocking poll if b is lost
    while (!bDone && Date.now() < end) {
      guard.modNs(ctx.now() + 100e6);
      ctx.poll(true);
    }
    guard.del();
    order.push("a-end");
  });
  pool.submitFdatasync(-1, (r) => {
    assert.equal(r, -EBADF);
    bDone = true;
    order.push("b");
  });
  await within(ctx, 5000, () => order.length === 3);
  // Before the fix the nested reap emptied the list the outer one walked: b was
  // lost, done > reaped stayed true and the context busy-polled (close() spun).
  assert.deepEqual(order, ["a", "b", "a-end"], `inFlight ${pool.inFlight}`);
  assert.equal(pool.inFlight, 0);
  assert.equal(ctx.poll(false), false, "nothing left to reap: the context may sleep");
  await pool.close();
  ctx.close();
});

Deno.test("ThreadPool: a job submitted while the last worker decides to exit on idle still runs", () => {
  // The gate stops the worker after it found the queue empty and before it
  // leaves `workers`: the submission then sees no idle worker and no room to
  // spawn one, so only the exiting worker can still notice the job.
  const gateBuf = new SharedArrayBuffer(8);
  const gate = new Int32Array(gateBuf);
  return withPool(
    { maxThreads: 1, idleTimeoutMs: 30, idleExitGate: gateBuf },
    async ({ ctx, pool }) => {
      let first = 1;
      pool.submitFdatasync(-1, (r) => first = r);
      assert.ok(await within(ctx, 5000, () => first !== 1), "the first job ran");
      assert.ok(await within(ctx, 5000, () => Atomics.load(gate, 0) === 1), "worker at the gate");
      assert.equal(pool.threads, 1);
      let second = 1;
      pool.submitFdatasync(-1, (r) => second = r);
      Atomics.store(gate, 1, 1);
      Atomics.notify(gate, 1);
      const ran = await within(ctx, 3000, () => second !== 1);
      assert.ok(ran, `the job was stranded: threads ${pool.threads}, inFlight ${pool.inFlight}`);
      assert.equal(second, -EBADF);
    },
  );
});

Deno.test("ThreadPool: one Worker serves a deep queue (on blocking threads), each job keeps its errno", () =>
  withPool({ maxThreads: 1 }, async ({ ctx, pool, fd }) => {
    // Queued before the Worker starts (that takes ms), every job but the last
    // has others behind it, so the Worker hands them to Deno blocking
    // threads; the failing ones lose errno there and the Worker learns it.
    const N = 48;
    const bufs = Array.from({ length: N }, (_, i) => new Uint8Array(4096).fill(i + 1));
    const rets = new Map<string, number>();
    for (let i = 0; i < N; i++) {
      pool.submitPwritev(fd, addressOf(iovec([bufs[i]])), 1, i * 4096, (r) => rets.set(`w${i}`, r));
      if (i === 10) {
        pool.submitPreadv(-1, addressOf(iovec([bufs[0]])), 1, 0, (r) => rets.set("bad read", r));
      }
      if (i === 20) pool.submitFdatasync(-1, (r) => rets.set("bad sync", r));
      if (i === 30) pool.submitFallocate(-1, 0, 0, 4096, (r) => rets.set("bad fallocate", r));
    }
    pool.submitFdatasync(fd, (r) => rets.set("sync", r));
    await until(ctx, () => rets.size === N + 4);
    for (let i = 0; i < N; i++) assert.equal(rets.get(`w${i}`), 4096, `write ${i}`);
    assert.equal(rets.get("bad read"), -EBADF);
    assert.equal(rets.get("bad sync"), -EBADF);
    assert.equal(rets.get("bad fallocate"), -EBADF);
    assert.equal(rets.get("sync"), 0);
    assert.equal(pool.stats.spawned, 1);
    const back = new Uint8Array(4096);
    let r = 1;
    pool.submitPreadv(fd, addressOf(iovec([back])), 1, 37 * 4096, (x) => r = x);
    await until(ctx, () => r !== 1);
    assert.equal(r, 4096);
    assert.ok(back.every((x) => x === 38));
  }));
