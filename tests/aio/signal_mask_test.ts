import assert from "node:assert/strict";
import { AioContext, IOThread, ThreadPool } from "../../aio/mod.ts";
import { blockedSignals, SIGINT, SIGTERM, SIGUSR1, threadKill } from "../../sys/mod.ts";

const FNS = new URL("./fixtures/iothread_fns.ts", import.meta.url).href;

/** Thread ids of this process whose mask (SigBlk in /proc) blocks `signal`. */
function threadsBlocking(signal: number): Set<string> {
  const out = new Set<string>();
  for (const t of Deno.readDirSync("/proc/self/task")) {
    let status: string;
    try {
      status = Deno.readTextFileSync(`/proc/self/task/${t.name}/status`);
    } catch {
      continue; // the thread exited since readdir
    }
    const hex = /^SigBlk:\s*([0-9a-f]+)$/m.exec(status)?.[1] ?? "0";
    if ((BigInt(`0x${hex}`) >> BigInt(signal - 1)) & 1n) out.add(t.name);
  }
  return out;
}

Deno.test("signals: an IOThread blocks SIGINT/SIGTERM/SIGUSR1; the main thread does not", async () => {
  const t = await IOThread.start({ name: "sig", modules: [FNS] });
  try {
    const blocked = await t.call<number[]>("blocked");
    for (const s of [SIGINT, SIGTERM, SIGUSR1]) assert.ok(blocked.includes(s), `${s}: ${blocked}`);
    assert.ok(!blockedSignals().includes(SIGUSR1));
  } finally {
    await t.stop();
  }
});

Deno.test("signals: thread-pool Workers block SIGUSR1", async () => {
  // Threads that exist now (earlier tests' Workers may still exit meanwhile).
  const before = new Set([...Deno.readDirSync("/proc/self/task")].map((t) => t.name));
  const ctx = new AioContext();
  const pool = new ThreadPool(ctx, { minThreads: 2, maxThreads: 2 });
  const fresh = () => [...threadsBlocking(SIGUSR1)].filter((tid) => !before.has(tid)).length;
  try {
    const end = Date.now() + 10_000;
    while (fresh() < 2 && Date.now() < end) {
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.ok(fresh() >= 2, `${fresh()} new threads block SIGUSR1`);
  } finally {
    await pool.close();
    ctx.close();
  }
});

// A signal aimed at the IOThread itself (tgkill) is the worst case: a process-
// directed one usually lands on the main thread anyway. Blocked, it stays
// pending and never interrupts the thread's epoll_wait.
Deno.test("signals: SIGUSR1 sent to an IOThread's own thread never interrupts its epoll_wait", async () => {
  const noop = () => {};
  Deno.addSignalListener("SIGUSR1", noop); // a handler, so an unblocked SIGUSR1 would not kill us
  const t = await IOThread.start({ name: "sigstorm", modules: [FNS] });
  try {
    const tid = await t.call<number>("tid");
    for (let i = 0; i < 20; i++) {
      threadKill(tid, SIGUSR1);
      await new Promise((r) => setTimeout(r, 10));
    }
    assert.equal(await t.call<number>("add", { a: 1, b: 1 }), 2); // alive and serving
    assert.equal(await t.call<number>("interruptedWaits"), 0);
  } finally {
    await t.stop();
    Deno.removeSignalListener("SIGUSR1", noop);
  }
});
