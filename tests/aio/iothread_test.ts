import assert from "node:assert/strict";
import { AioContext, aioNotify, EventNotifier, IOThread } from "../../aio/mod.ts";
import { EBADF, SysError } from "../../sys/mod.ts";

const FNS = new URL("./fixtures/iothread_fns.ts", import.meta.url).href;

Deno.test("IOThread: start, sync/async calls, errors, stop", async () => {
  const t = await IOThread.start({ name: "t0", modules: [FNS] });
  try {
    console.log(`IOThread startup: ${t.startupMs.toFixed(1)} ms`);
    assert.equal(await t.call<number>("add", { a: 2, b: 40 }), 42);
    assert.equal(await t.call<string>("threadName"), "iothread-t0");
    assert.equal(await t.call<string>("later", { ms: 5 }), "done after true");
    assert.equal(await t.call<number>("chain", { depth: 50 }), 50);
    await assert.rejects(t.call("fail", { msg: "boom" }), /^Error: boom$/);
    await assert.rejects(t.call("rejectLater"), /async boom/);
    await assert.rejects(t.call("nothere"), /no exported function nothere/);
    // Concurrent calls resolve independently.
    const rs = await Promise.all(
      Array.from({ length: 40 }, (_, i) => t.call<number>("add", { a: i, b: 1 })),
    );
    assert.deepEqual(rs, Array.from({ length: 40 }, (_, i) => i + 1));
  } finally {
    await t.stop();
  }
  await assert.rejects(t.call("add", { a: 1, b: 1 }), /stopped/);
});

Deno.test("IOThread: a module imported on demand through ctx.waitEventLoop loads", async () => {
  // The loop waits through pollAsync while the import is pending, so the
  // Deno event loop that settles it runs however many turns loading takes.
  const t = await IOThread.start({ name: "t6", modules: [FNS] });
  try {
    const timeout = new Promise<string>((r) => {
      const id = setTimeout(() => r("timed out"), 5000);
      Deno.unrefTimer(id);
    });
    assert.equal(await Promise.race([t.call<string>("importLater"), timeout]), "loaded on demand");
    assert.equal(await t.call<number>("add", { a: 1, b: 2 }), 3); // the loop carries on
  } finally {
    await t.stop();
  }
});

Deno.test("IOThread: a SysError crosses the thread as a SysError; unknown classes by name", async () => {
  const t = await IOThread.start({ name: "t5", modules: [FNS] });
  try {
    const e = await t.call("closeBadFd", { fd: -1 }).then(() => null, (e: unknown) => e);
    assert(e instanceof SysError, `got ${e}`);
    assert.equal(e.errno, EBADF);
    assert.equal(e.code, "EBADF");
    assert.equal(e.call, "close");
    assert.equal(e.name, "SysError");
    assert.equal(e.message, "close: EBADF (errno 9)");
    assert.match(e.stack ?? "", /closeBadFd/); // the thread's stack
    const u = await t.call("failUnknown").then(() => null, (e: unknown) => e);
    assert(u instanceof Error && !(u instanceof SysError));
    assert.equal(u.message, "FixtureError: odd");
  } finally {
    await t.stop();
  }
});

Deno.test("IOThread: message size is bounded with a clear error", async () => {
  const t = await IOThread.start({ name: "t1", modules: [FNS], maxMessageBytes: 1024 });
  try {
    await assert.rejects(
      t.call("add", { a: "y".repeat(2000), b: 1 }),
      /message of \d+ bytes exceeds the limit of 1024/,
    );
    await assert.rejects(t.call("big", { n: 5000 }), /exceeds the limit of 1024/);
    // An error whose stack does not fit still arrives, without the stack.
    await assert.rejects(t.call("fail", { msg: "x".repeat(800) }), /^Error: x{800}$/);
    assert.equal((await t.call<string>("big", { n: 100 })).length, 100);
  } finally {
    await t.stop();
  }
});

Deno.test("IOThread: a module that fails to load rejects start", async () => {
  await assert.rejects(
    IOThread.start({ name: "bad", modules: ["file:///nonexistent/mod.ts"] }),
    /loading modules/,
  );
});

Deno.test("IOThread: shared-memory + aioNotify ping-pong with busy polling loses no wake-up", async () => {
  for (const pollMaxNs of [0, 32768]) {
    const seqBuf = new SharedArrayBuffer(8);
    const seq = new Int32Array(seqBuf);
    const main = new AioContext({ pollMaxNs });
    const t = await IOThread.start({
      name: `pp${pollMaxNs}`,
      modules: [FNS],
      pollMaxNs,
      data: { seq: seqBuf, main: main.notifyHandle },
    });
    const dummy = new EventNotifier();
    let acks = 0;
    main.setEventNotifier(
      dummy,
      () => dummy.testAndClear(),
      () => acks < Atomics.load(seq, 1),
      () => acks = Atomics.load(seq, 1),
    );
    const guard = main.timerNew(() => {});
    try {
      await t.call("echoShared");
      for (let v = 1; v <= 3000; v++) {
        Atomics.store(seq, 0, v);
        aioNotify(t.notifyHandle);
        const deadline = main.now() + 2e9;
        while (acks < v) {
          guard.modNs(main.now() + 100e6); // a lost wake-up fails instead of hanging
          main.poll(true);
          assert.ok(main.now() < deadline, `ping ${v} lost (pollMaxNs ${pollMaxNs})`);
        }
      }
    } finally {
      guard.del();
      main.setEventNotifier(dummy, null);
      dummy.close();
      await t.stop();
      main.close();
    }
  }
});

Deno.test("IOThread: bursts far beyond the channel's slots all get replies (backlog re-arms WAITING)", async () => {
  // Regression: a backlog flushed only in part, after the peer had consumed
  // WAITING, was never flushed again; ~60% of runs of 40 calls hung.
  const t = await IOThread.start({ name: "burst", modules: [FNS] });
  try {
    for (let round = 0; round < 20; round++) {
      const n = 40 + 23 * round;
      const rs = await Promise.all(
        Array.from({ length: n }, (_, i) => t.call<number>("add", { a: i, b: round })),
      );
      assert.deepEqual(rs, Array.from({ length: n }, (_, i) => i + round));
    }
  } finally {
    await t.stop();
  }
});

Deno.test("IOThread: a handler throwing out of the loop is reported, not a silent hang", async () => {
  const t = await IOThread.start({ name: "crash", modules: [FNS] });
  try {
    // The reply may lose the race with the failure: either way is fine.
    await t.call("crashLoop", { msg: "handler bug" }).catch(() => {});
    const e = await t.failed;
    assert.match(e.message, /IOThread crash: event loop died: Error: handler bug/);
    assert.match(e.message, /iothread_fns\.ts:\d+/, "with the stack");
    await assert.rejects(t.call("add", { a: 1, b: 1 }), /event loop died/);
  } finally {
    await t.stop();
  }
});

Deno.test("IOThread: poll-max-ns and aio-max-batch reach the thread's AioContext", async () => {
  const t = await IOThread.start({ name: "t2", modules: [FNS], pollMaxNs: 1000, aioMaxBatch: 7 });
  try {
    assert.deepEqual(await t.call("contextSettings"), { pollMaxNs: 1000, aioMaxBatch: 7 });
  } finally {
    await t.stop();
  }
  const d = await IOThread.start({ name: "t3", modules: [FNS] });
  try {
    assert.deepEqual(await d.call("contextSettings"), { pollMaxNs: 32768, aioMaxBatch: 0 });
  } finally {
    await d.stop();
  }
});
