// Issue 12: a host restart the guest never notices. The built-in client
// plays QEMU with `reconnect=1`: it keeps the inflight region
// (INFLIGHT_SHMFD), and when the host dies it connects again, hands the
// region back (SET_INFLIGHT_FD) and restarts each ring at the used idx (QEMU
// cannot ask a dead back-end for the ring base). The host runs with the
// test-only --test-hold-completions, so every 4th completion waits 300 ms and
// requests complete out of order; it is killed (SIGKILL, once SIGTERM) at
// random points of a write/read workload, some of them chosen so that an
// earlier request is still in flight while a later one is used.
//
// With inflight tracking no request is lost or repeated and every block
// reads back as written, on every engine. Without it (the client does not
// negotiate the feature), one kill in that state loses a request (the guest
// waits forever) and takes a used one again (answered twice, or the ring
// breaks when its head is in flight again): the failure this feature exists for.

import assert from "node:assert/strict";
import type { VhostUserBlkClient } from "../../client/blk_client.ts";
import { patternWord } from "../../client/workload.ts";
import { fileBytes, startHost } from "../e2e/host_util.ts";
import { cacheNoneHost, connect, HostProcess, MiB, scratch } from "./robustness_util.ts";

const IMAGE = 8 * MiB;
const BS = 4096;
const SLOTS = 16;
const HOLD = ["--test-hold-completions", "4:300"];

type Engine = "threads" | "native" | "io_uring";

interface Outcome {
  /** Requests completed exactly once. */
  completed: number;
  /** Completions of a slot with no request in flight (a request answered twice). */
  duplicates: number;
  /** Requests still in flight when completions stopped for good. */
  lost: number;
  /** Reads whose data did not match, or requests that did not complete OK. */
  bad: number;
  /** Blocks whose content in the image file is not what was written. */
  corrupt: number;
  /** Requests the restarted hosts said they took again from the inflight log. */
  resubmitted: number;
  /**
   * Rings a restarted host found broken because a head it took again was
   * already in flight (the driver had reused it): a repeat seen as HeadInUse.
   */
  headInUse: number;
  kills: number;
  /** Reconnects after the host closed the connection on a (test-injected) ring break. */
  breaks: number;
  /** Kills that landed with an earlier request in flight below the used idx. */
  outOfOrderKills: number;
}

function fill(buf: Uint8Array, block: number): void {
  const w = new Uint32Array(buf.buffer, buf.byteOffset, BS / 4);
  for (let i = 0; i < w.length; i++) w[i] = patternWord(block * BS + 4 * i, block + 1);
}

function matches(buf: Uint8Array, block: number): boolean {
  const w = new Uint32Array(buf.buffer, buf.byteOffset, BS / 4);
  for (let i = 0; i < w.length; i++) {
    if (w[i] !== patternWord(block * BS + 4 * i, block + 1)) return false;
  }
  return true;
}

/** A small deterministic PRNG (mulberry32): the kill points depend on `seed` only. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

async function crashWorkload(o: {
  aio: Engine;
  inflight: boolean;
  requests: number;
  kills: number;
  seed: number;
  /** Every kill waits for an out-of-order moment (else about half do). */
  alwaysOutOfOrder: boolean;
  /** Index of the kill done with SIGTERM instead of SIGKILL (-1: none). */
  sigtermAt?: number;
  /** Queues, each on its own IOThread (default 1). */
  queues?: number;
  /** The host's --test-break-ring EVERY (the same host goes on; the client reconnects). */
  breakRing?: number;
}): Promise<Outcome> {
  const rand = prng(o.seed);
  const s = await scratch("inflight", IMAGE);
  const nq = o.queues ?? 1;
  const args = [
    ...cacheNoneHost(s, o.aio, nq, nq),
    ...HOLD,
    ...(o.breakRing ? ["--test-break-ring", String(o.breakRing)] : []),
  ];
  let host = new HostProcess(args);
  const logs: string[] = [];
  let c: VhostUserBlkClient | null = null;
  try {
    await host.ready();
    c = await connect(s.socket, {
      numQueues: nq,
      inflight: o.inflight,
      queueSize: 256,
      slots: SLOTS,
      maxBlockSize: BS,
      timeoutMs: 10_000,
    });
    assert.equal(c.inflight !== null, o.inflight, "inflight region negotiated as asked");
    const out: Outcome = {
      completed: 0,
      duplicates: 0,
      lost: 0,
      bad: 0,
      corrupt: 0,
      resubmitted: 0,
      headInUse: 0,
      kills: 0,
      breaks: 0,
      outOfOrderKills: 0,
    };
    const reqBlock: number[] = [];
    const reqRead: boolean[] = [];
    const written: number[] = []; // blocks whose write completed
    let nextId = 0, nextBlock = 0;
    // Per queue: request id per slot (-1: free) and its avail position.
    const queues = c.queues.map((q) => {
      const st = {
        q,
        slotReq: new Int32Array(SLOTS).fill(-1),
        slotPos: new Uint16Array(SLOTS),
        free: Array.from({ length: SLOTS }, (_, i) => i),
      };
      q.onComplete = (slot, status) => {
        const id = st.slotReq[slot];
        if (id < 0) {
          out.duplicates++;
          return;
        }
        st.slotReq[slot] = -1;
        st.free.push(slot);
        out.completed++;
        if (status !== 0) out.bad++;
        else if (reqRead[id] && !matches(q.data(slot), reqBlock[id])) out.bad++;
        else if (!reqRead[id]) written.push(reqBlock[id]);
      };
      return st;
    });
    const refill = () => {
      for (const { q, slotReq, slotPos, free } of queues) {
        while (free.length > 0 && nextId < o.requests) {
          const slot = free.pop()!;
          const id = nextId++;
          const read = id % 4 === 3 && written.length > 0;
          const block = read ? written[Math.floor(rand() * written.length)] : nextBlock++;
          reqBlock[id] = block;
          reqRead[id] = read;
          slotReq[slot] = id;
          slotPos[slot] = q.ring.availIdx;
          if (read) {
            q.read(slot, block * BS, BS);
          } else {
            fill(q.data(slot), block);
            q.write(slot, block * BS, BS);
          }
        }
        q.notify();
      }
    };
    // An earlier request in flight while a later one is used: restarting
    // from the used idx then skips the first and repeats the second.
    const outOfOrder = () =>
      queues.some(({ q, slotReq, slotPos }) => {
        const used = q.ring.usedIdx;
        for (let s = 0; s < SLOTS; s++) {
          if (slotReq[s] < 0) continue;
          const d = (used - slotPos[s]) & 0xffff;
          if (d >= 1 && d <= 256) return true;
        }
        return false;
      });
    const inFlight = () =>
      queues.reduce((n, st) => n + st.slotReq.filter((id) => id >= 0).length, 0);

    refill();
    let sinceKill = 0;
    let killAfter = 8 + Math.floor(rand() * 30);
    let waitOoo = o.alwaysOutOfOrder || rand() < 0.5;
    let oooSince = performance.now();
    let lastProgress = performance.now();
    while (out.completed < o.requests || inFlight() > 0) {
      if (await c.waitAsync(100)) {
        let n = 0;
        for (const st of queues) n += st.q.reap();
        if (n > 0) lastProgress = performance.now();
        sinceKill += n;
        refill();
      }
      if (
        o.breakRing && performance.now() - lastProgress > 100 && await c.frontend.waitClosed(0)
      ) {
        // The host broke a ring and closed the connection: QEMU reconnects.
        await c.reconnect(20_000);
        out.breaks++;
        lastProgress = performance.now();
        refill();
        continue;
      }
      if (performance.now() - lastProgress > 3000) break; // nothing completes any more
      if (out.kills >= o.kills || sinceKill < killAfter) {
        oooSince = performance.now();
        continue;
      }
      const ooo = outOfOrder();
      if (waitOoo && !ooo && performance.now() - oooSince < 5000) continue;
      // Kill now.
      const sig = out.kills === o.sigtermAt ? "SIGTERM" : "SIGKILL";
      if (ooo && sig === "SIGKILL") out.outOfOrderKills++;
      await host.stop(sig, 15_000);
      logs.push(host.stderr);
      out.kills++;
      host = new HostProcess(args);
      await host.ready();
      await c.reconnect(20_000);
      lastProgress = performance.now();
      refill();
      sinceKill = 0;
      killAfter = 8 + Math.floor(rand() * 30);
      waitOoo = o.alwaysOutOfOrder || rand() < 0.5;
    }
    out.lost = inFlight();
    await c.close();
    c = null;
    await host.stopCleanly();
    logs.push(host.stderr);
    for (const log of logs) {
      for (const m of log.matchAll(/(\d+) request\(s\) resubmitted/g)) out.resubmitted += +m[1];
      out.headInUse += log.match(/HeadInUse/g)?.length ?? 0;
    }
    // Every block whose write completed holds what was written.
    for (const b of written) if (!matches(fileBytes(s.image, b * BS, BS), b)) out.corrupt++;
    return out;
  } finally {
    if (c !== null) await c.close().catch(() => {});
    await host.stop("SIGKILL", 5000);
    await s.remove();
  }
}

for (const [i, aio] of (["threads", "native", "io_uring"] as Engine[]).entries()) {
  Deno.test(`inflight: host killed ${aio === "threads" ? 5 : 4} times under a workload (aio=${aio}): nothing lost, nothing repeated`, async () => {
    const kills = aio === "threads" ? 5 : 4;
    const r = await crashWorkload({
      aio,
      inflight: true,
      requests: 400,
      kills,
      seed: 12 + i,
      alwaysOutOfOrder: false,
      sigtermAt: aio === "threads" ? 2 : -1,
    });
    console.log(`aio=${aio}: ${JSON.stringify(r)}`);
    assert.equal(r.kills, kills);
    assert.equal(r.lost, 0, "requests lost");
    assert.equal(r.duplicates, 0, "requests answered twice");
    assert.equal(r.bad, 0, "failed requests or wrong read data");
    assert.equal(r.corrupt, 0, "blocks not as written");
    assert.equal(r.headInUse, 0, "a restarted host took a request that was in flight");
    assert.equal(r.completed, 400);
    assert.ok(r.outOfOrderKills >= 1, "no kill landed with completions out of order");
    assert.ok(r.resubmitted >= 1, "no restarted host took anything from the inflight log");
  });
}

Deno.test("inflight: 2 queues on 2 IOThreads (aio=io_uring), host killed 3 times: nothing lost, nothing repeated", async () => {
  const r = await crashWorkload({
    aio: "io_uring",
    inflight: true,
    requests: 400,
    kills: 3,
    seed: 21,
    alwaysOutOfOrder: true,
    queues: 2,
  });
  console.log(`2 queues: ${JSON.stringify(r)}`);
  assert.equal(r.kills, 3);
  assert.deepEqual(
    [r.lost, r.duplicates, r.bad, r.corrupt, r.headInUse, r.completed],
    [0, 0, 0, 0, 0, 400],
    "lost, duplicates, bad, corrupt, headInUse, completed",
  );
  assert.ok(r.resubmitted >= 1);
});

Deno.test("inflight: rings the host breaks (test-injected) close the connection; after each reconnect the disk goes on, nothing lost or repeated", async () => {
  const r = await crashWorkload({
    aio: "io_uring",
    inflight: true,
    requests: 400,
    kills: 0,
    seed: 33,
    alwaysOutOfOrder: false,
    breakRing: 61,
  });
  console.log(`ring breaks: ${JSON.stringify(r)}`);
  assert.ok(r.breaks >= 4, `only ${r.breaks} ring breaks and reconnects`);
  assert.deepEqual(
    [r.lost, r.duplicates, r.bad, r.corrupt, r.headInUse, r.completed],
    [0, 0, 0, 0, 0, 400],
    "lost, duplicates, bad, corrupt, headInUse, completed",
  );
  assert.ok(r.resubmitted >= 1, "the request popped at the break was never taken again");
});

Deno.test("inflight: without it, a kill with completions out of order loses a request and repeats another", async () => {
  const r = await crashWorkload({
    aio: "threads",
    inflight: false,
    requests: 200,
    kills: 1,
    seed: 7,
    alwaysOutOfOrder: true,
  });
  console.log(`no inflight tracking: ${JSON.stringify(r)}`);
  assert.equal(r.outOfOrderKills, 1);
  assert.ok(r.lost >= 1, "a request in flight below the used idx is never taken again");
  // A used request above it is taken again: answered twice, or, when the
  // driver had already reused its descriptor head for a request now in
  // flight, the ring breaks on the repeat (HeadInUse) and the host closes
  // the connection.
  assert.ok(r.duplicates + r.headInUse >= 1, "no used request was taken again");
});

// A clean stop (SIGTERM) finishes the requests in flight while the
// front-end is still connected: QEMU, on the disconnect, stops its rings at
// the used idx and drops the call fd, so a completion pushed after the close
// would be repeated by the next host (without inflight tracking) or never
// signalled to a driver that waits for it.
Deno.test("clean stop: requests in flight complete before the connection closes", async () => {
  const s = await scratch("inflight-stop", IMAGE);
  const { host } = await startHost([
    ...cacheNoneHost(s, "threads", 1),
    "--test-hold-completions",
    "1:300",
  ]);
  let c: VhostUserBlkClient | null = null;
  try {
    c = await connect(s.socket, { slots: 4, maxBlockSize: BS });
    const q = c.queues[0];
    fill(q.data(0), 0);
    q.write(0, 0, BS);
    q.notify();
    // The write is held 300 ms in the host; stop meanwhile.
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(q.ring.usedIdx, 0, "still in flight");
    const stopped = host.stop();
    assert.ok(await c.frontend.waitClosed(10_000), "connection closed");
    assert.equal(q.ring.usedIdx, 1, "the write was used before the connection closed");
    await stopped;
  } finally {
    await c?.close();
    await host.stop();
    await s.remove();
  }
});
