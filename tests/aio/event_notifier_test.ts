import assert from "node:assert/strict";
import { AioContext, EventNotifier } from "../../aio/mod.ts";

const WORKER = new URL("./fixtures/notify_worker.ts", import.meta.url);

function startWorker(msg: unknown): Worker {
  const w = new Worker(WORKER, { type: "module" });
  w.postMessage(msg);
  return w;
}

Deno.test("EventNotifier: set / testAndClear / fromFd", () => {
  const n = new EventNotifier();
  assert.equal(n.testAndClear(), false);
  n.set();
  n.set();
  const peer = EventNotifier.fromFd(n.fd);
  assert.equal(peer.fd, n.fd);
  assert.equal(n.testAndClear(), true);
  assert.equal(n.testAndClear(), false);
  peer.close(); // does not close the fd
  n.set();
  assert.equal(n.testAndClear(), true);
  n.close();
});

Deno.test("cross-thread: a Worker writing notifyFd wakes a blocked poll(true)", () => {
  const ctx = new AioContext({ pollMaxNs: 0 });
  const w = startWorker({ kind: "raw", fd: ctx.notifyFd, delayMs: 50 });
  const t0 = performance.now();
  ctx.poll(true); // blocks this thread until the Worker writes
  const dt = performance.now() - t0;
  w.terminate();
  assert.ok(dt >= 30 && dt < 5000, `woke after ${dt} ms`);
  assert.equal(ctx.stats.blockingWaits, 1);
  ctx.close();
});

Deno.test("cross-thread: aioNotify from a Worker wakes poll(true); set() on an EventNotifier runs its handler", () => {
  const ctx = new AioContext({ pollMaxNs: 0 });
  const w = startWorker({ kind: "handle", handle: ctx.notifyHandle, delayMs: 30 });
  const t0 = performance.now();
  ctx.poll(true);
  assert.ok(performance.now() - t0 >= 20);
  w.terminate();

  const n = new EventNotifier();
  let hits = 0;
  ctx.setEventNotifier(n, () => {
    if (n.testAndClear()) hits++;
  });
  const w2 = startWorker({ kind: "raw", fd: n.fd, delayMs: 30 });
  while (hits === 0) ctx.poll(true);
  w2.terminate();
  ctx.setEventNotifier(n, null);
  n.close();
  ctx.close();
});

Deno.test("cross-thread: work published in shared memory + aioNotify is found by a poll callback", () => {
  const ctx = new AioContext({ pollMaxNs: 0 }); // no busy polling: only the notify path
  const work = new SharedArrayBuffer(4);
  const flag = new Int32Array(work);
  const dummy = new EventNotifier(); // never set: the handler lives on its poll callback
  let got = 0;
  ctx.setEventNotifier(dummy, () => dummy.testAndClear(), () => Atomics.load(flag, 0) === 1, () => {
    Atomics.store(flag, 0, 0);
    got++;
  });
  const w = startWorker({ kind: "handle", handle: ctx.notifyHandle, delayMs: 30, work });
  while (got === 0) ctx.poll(true);
  w.terminate();
  assert.equal(got, 1);
  ctx.setEventNotifier(dummy, null);
  dummy.close();
  ctx.close();
});
