import assert from "node:assert/strict";
import { AioContext, EventNotifier } from "../../aio/mod.ts";
import { close, pipe, read, write } from "../../sys/mod.ts";

Deno.test("AioContext: read and write handlers on a pipe", () => {
  const ctx = new AioContext();
  const [r, w] = pipe();
  const got: number[] = [];
  let writable = 0;
  ctx.setFdHandler(r, {
    read() {
      const b = new Uint8Array(16);
      const n = read(r, b);
      got.push(...b.subarray(0, n));
    },
  });
  ctx.setFdHandler(w, { write: () => writable++ });
  assert.ok(ctx.poll(true)); // the pipe is writable
  assert.equal(writable, 1);
  ctx.setFdHandler(w, null);
  write(w, new Uint8Array([7, 8]));
  assert.ok(ctx.poll(true));
  assert.deepEqual(got, [7, 8]);
  assert.equal(ctx.poll(false), false);
  ctx.setFdHandler(r, null);
  close(r);
  close(w);
  ctx.close();
});

Deno.test("AioContext: removing a handler from its own callback (and another's)", () => {
  const ctx = new AioContext();
  const a = new EventNotifier(), b = new EventNotifier();
  const log: string[] = [];
  ctx.setEventNotifier(a, () => {
    log.push("a");
    ctx.setEventNotifier(a, null); // itself
    ctx.setEventNotifier(b, null); // b's event was collected in the same wait
  });
  ctx.setEventNotifier(b, () => {
    log.push("b");
    ctx.setEventNotifier(b, null);
    ctx.setEventNotifier(a, null);
  });
  a.set();
  b.set();
  ctx.poll(true);
  assert.equal(log.length, 1, `both ran: ${log}`);
  a.set();
  b.set();
  assert.equal(ctx.poll(false), false);
  assert.equal(log.length, 1);
  a.close();
  b.close();
  ctx.close();
});

Deno.test("AioContext: replacing a handler while dispatching; re-adding after removal", () => {
  const ctx = new AioContext();
  const n = new EventNotifier();
  const log: string[] = [];
  const second = () => {
    n.testAndClear();
    log.push("second");
  };
  ctx.setEventNotifier(n, () => {
    n.testAndClear();
    log.push("first");
    ctx.setEventNotifier(n, null);
    ctx.setEventNotifier(n, second);
  });
  n.set();
  ctx.poll(true);
  n.set();
  ctx.poll(true);
  assert.deepEqual(log, ["first", "second"]);
  ctx.setEventNotifier(n, null);
  n.close();
  ctx.close();
});

Deno.test("AioContext: nested poll from inside a handler", () => {
  const ctx = new AioContext();
  const outer = new EventNotifier(), inner = new EventNotifier();
  const log: string[] = [];
  ctx.setEventNotifier(inner, () => {
    inner.testAndClear();
    log.push("inner");
  });
  ctx.setEventNotifier(outer, () => {
    outer.testAndClear();
    log.push("outer-begin");
    inner.set();
    let bhRan = false;
    ctx.scheduleOneshot(() => bhRan = true);
    while (!log.includes("inner") || !bhRan) ctx.poll(true); // nested
    log.push("outer-end");
  });
  outer.set();
  ctx.poll(true);
  assert.deepEqual(log, ["outer-begin", "inner", "outer-end"]);
  for (const x of [outer, inner]) {
    ctx.setEventNotifier(x, null);
    x.close();
  }
  ctx.close();
});

Deno.test("AioContext: handler exceptions propagate and leave the context usable", () => {
  const ctx = new AioContext();
  const n = new EventNotifier();
  ctx.setEventNotifier(n, () => {
    n.testAndClear();
    throw new Error("handler bug");
  });
  n.set();
  assert.throws(() => ctx.poll(true), /handler bug/);
  ctx.setEventNotifier(n, null);
  let ran = false;
  ctx.scheduleOneshot(() => ran = true);
  ctx.poll(false);
  assert.ok(ran);
  n.close();
  ctx.close();
});

Deno.test("AioContext: notify() makes poll(true) return; notification is not progress", () => {
  const ctx = new AioContext();
  ctx.notify();
  const t0 = performance.now();
  assert.equal(ctx.poll(true), false);
  assert.ok(performance.now() - t0 < 500);
  assert.equal(ctx.stats.blockingWaits, 0);
  ctx.close();
  assert.throws(() => ctx.poll(false), /after close/);
});

Deno.test("AioContext: busy polling finds work, calls pollReady, adapts the window", () => {
  // epoll_wait sleeps whole milliseconds, so let the window reach 5 ms.
  const ctx = new AioContext({ pollMaxNs: 5_000_000 });
  const n = new EventNotifier();
  let flag = false, ready = 0, reads = 0;
  ctx.setEventNotifier(
    n,
    () => {
      n.testAndClear();
      reads++;
    },
    () => flag,
    () => {
      flag = false;
      ready++;
    },
  );
  // Short timers: each block is shorter than poll-max-ns, so the window grows
  // from 4 us (doubling) until it covers the 50 us timer. Then that timer's
  // wait is spent polling: no sleep. A round preempted for more than
  // poll-max-ns resets the window (that is the shrink rule, not this check),
  // so such an attempt is tried again, at most 5 times.
  let checked = false;
  for (let attempt = 0; attempt < 5 && !checked; attempt++) {
    for (let i = 0; i < 40 && ctx.pollNs < 64_000; i++) {
      let fired = false;
      ctx.timerNew(() => fired = true).modNs(ctx.now() + 50_000);
      while (!fired) ctx.poll(true);
    }
    assert.ok(ctx.stats.pollGrows >= 3, `grows ${ctx.stats.pollGrows}`);
    assert.ok(ctx.pollNs >= 64_000 && ctx.pollNs <= 5_000_000, `pollNs ${ctx.pollNs}`);
    const waits = ctx.stats.blockingWaits, shrinks = ctx.stats.pollShrinks;
    let fired = false;
    ctx.timerNew(() => fired = true).modNs(ctx.now() + 50_000);
    while (!fired) ctx.poll(true);
    if (ctx.stats.pollShrinks !== shrinks) continue; // preempted: the window was reset
    assert.equal(ctx.stats.blockingWaits, waits);
    checked = true;
  }
  assert.ok(checked, "the polling window was reset by preemption 5 times in a row");
  // Work visible to the poll callback is found without any fd event.
  flag = true;
  assert.ok(ctx.poll(true));
  assert.equal(ready, 1);
  assert.equal(reads, 0);
  assert.ok(ctx.stats.pollSuccesses >= 1);
  // A long block (> poll-max-ns) resets the window (pollShrink 0).
  let fired = false;
  ctx.timerNew(() => fired = true).modNs(ctx.now() + 8_000_000);
  while (!fired) ctx.poll(true);
  assert.equal(ctx.pollNs, 0);
  assert.ok(ctx.stats.pollShrinks >= 1);
  ctx.setEventNotifier(n, null);
  n.close();
  ctx.close();
});

Deno.test("AioContext: pollMaxNs 0 never calls poll callbacks in blocking polls", () => {
  const ctx = new AioContext({ pollMaxNs: 0 });
  const n = new EventNotifier();
  let polls = 0;
  ctx.setEventNotifier(n, () => n.testAndClear(), () => {
    polls++;
    return false;
  });
  for (let i = 0; i < 3; i++) {
    let fired = false;
    ctx.timerNew(() => fired = true).modNs(ctx.now() + 10_000);
    while (!fired) ctx.poll(true);
  }
  assert.equal(polls, 0);
  assert.equal(ctx.pollNs, 0);
  ctx.setEventNotifier(n, null);
  n.close();
  ctx.close();
});

Deno.test("AioContext: pollAsync keeps the event loop running and survives handler changes", async () => {
  const ctx = new AioContext();
  const a = new EventNotifier(), b = new EventNotifier();
  const log: string[] = [];
  ctx.setEventNotifier(a, () => {
    a.testAndClear();
    log.push("a");
  });
  // While pollAsync waits: a JS timer (event loop alive) removes a, adds b, sets both.
  setTimeout(() => {
    log.push("js-timer");
    ctx.setEventNotifier(a, null);
    ctx.setEventNotifier(b, () => {
      b.testAndClear();
      log.push("b");
    });
    a.set();
    b.set();
  }, 20);
  while (!log.includes("b")) await ctx.pollAsync();
  assert.deepEqual(log, ["js-timer", "b"]);
  // A BH scheduled from JS while pollAsync waits wakes it (aio_notify).
  let bh = false;
  setTimeout(() => ctx.scheduleOneshot(() => bh = true), 10);
  const t0 = performance.now();
  assert.ok(await ctx.pollAsync());
  assert.ok(bh && performance.now() - t0 < 1000);
  ctx.setEventNotifier(b, null);
  a.close();
  b.close();
  ctx.close();
});

Deno.test("AioContext: close() during pollAsync wakes it", async () => {
  const ctx = new AioContext();
  const p = ctx.pollAsync();
  setTimeout(() => ctx.close(), 10);
  assert.equal(await p, false);
});

Deno.test("AioContext: pollBegin before busy polling, pollEnd before blocking, then one more poll", () => {
  const ctx = new AioContext({ pollMaxNs: 200_000 });
  const n = new EventNotifier();
  const calls: string[] = [];
  let work = false;
  ctx.setFdHandler(n.fd, {
    read: () => n.testAndClear(),
    poll: () => work,
    pollReady: () => {
      calls.push("ready");
      work = false;
    },
    pollBegin: () => calls.push("begin"),
    pollEnd: () => {
      calls.push("end");
      work = true; // a request that raced in while notifications were off
    },
  });
  ctx.pollNs = 50_000;
  // Only a bound on the blocking waits should the expected work never show
  // up; far enough out that a preempted test does not see it fire.
  const timer = ctx.timerNew(() => calls.push("timer"));
  timer.modNs(ctx.now() + 10_000_000_000);
  ctx.poll(false); // consumes the wake-up of modNs
  // Polls, finds nothing, leaves poll mode (end), the re-check finds the
  // raced-in work and dispatches it without sleeping.
  const progress = ctx.poll(true);
  assert.deepEqual(calls, ["begin", "end", "ready"]);
  assert.equal(progress, true);
  // A handler removed while polling is told it leaves poll mode.
  calls.length = 0;
  let began = false;
  ctx.setFdHandler(n.fd, {
    read: () => n.testAndClear(),
    poll: () => began,
    pollReady: () => {
      calls.push("ready2");
      ctx.setFdHandler(n.fd, null);
    },
    pollBegin: () => {
      calls.push("begin2");
      began = true;
    },
    pollEnd: () => calls.push("end2"),
  });
  ctx.poll(false); // consumes the wake-up of setFdHandler (poll() is false: not polling yet)
  ctx.poll(true);
  assert.deepEqual(calls, ["begin2", "ready2", "end2"]);
  timer.del();
  n.close();
  ctx.close();
});

Deno.test("AioContext: fd handlers still run while busy polling keeps finding work", () => {
  const ctx = new AioContext({ pollMaxNs: 100_000 });
  ctx.pollNs = 50_000;
  const busy = new EventNotifier();
  let polled = 0;
  ctx.setEventNotifier(busy, () => busy.testAndClear(), () => true, () => polled++);
  const [r, w] = pipe();
  let read_ = 0;
  ctx.setFdHandler(r, {
    read() {
      read(r, new Uint8Array(8));
      read_++;
    },
  });
  write(w, new Uint8Array([1]));
  for (let i = 0; i < 10 && read_ === 0; i++) ctx.poll(true);
  assert.equal(read_, 1, "the pipe handler ran within 10 iterations");
  assert.ok(polled > 0);
  ctx.setFdHandler(r, null);
  ctx.setEventNotifier(busy, null);
  close(r);
  close(w);
  busy.close();
  ctx.close();
});
