// Issue 6, robustness: writes acknowledged before a completed FLUSH survive
// `kill -9` of the host. For each engine and cache mode: write a pattern,
// flush (OK), SIGKILL the host process, start a new host on the same image,
// read everything back through it, and read the image file directly too.
//
// Issue 9: a kill -9 cannot see a missing flush (the page cache survives the
// process), so the kernel is asked too: a private ftrace instance records the
// host's fdatasync/fsync calls and IORING_OP_FSYNC submissions
// (tests/harness/sync_trace.ts). Every FLUSH must be preceded, between its
// submission and its completion, by at least one of them; in writethrough mode
// (WCE=0, set by the client through SET_CONFIG) every write too; under
// cache=unsafe none may reach the kernel at all.

import assert from "node:assert/strict";
import type { BlkQueue, VhostUserBlkClient } from "../../client/blk_client.ts";
import { patternWord } from "../../client/workload.ts";
import { clockNs } from "../../sys/mod.ts";
import { SyncTrace, syncTraceUnavailable } from "../harness/mod.ts";
import { connect, HostProcess, MiB, scratch } from "./robustness_util.ts";

const IMAGE = 32 * MiB;
const BS = 64 * 1024;
const QD = 16;
/** Scattered 64 KiB blocks across the image (both ends included). */
const BLOCKS = Array.from({ length: 96 }, (_, i) => (i * 37) % (IMAGE / BS));
/** The writes go out in this many rounds, each followed by a FLUSH. */
const ROUNDS = 3;

function fillPattern(buf: Uint8Array, off: number, seed: number): void {
  const w = new Uint32Array(buf.buffer, buf.byteOffset, BS / 4);
  for (let i = 0; i < w.length; i++) w[i] = patternWord(off + 4 * i, seed);
}

function firstMismatch(buf: Uint8Array, off: number, seed: number): number {
  const w = new Uint32Array(buf.buffer, buf.byteOffset, BS / 4);
  for (let i = 0; i < w.length; i++) if (w[i] !== patternWord(off + 4 * i, seed)) return 4 * i;
  return -1;
}

/** A cache mode as the guest sees it; writethrough = cache=writeback (or none) with WCE=0. */
type Mode = "writeback" | "none" | "unsafe" | "writethrough";
type Engine = "threads" | "native" | "io_uring";

/** Engine x mode; aio=native needs cache=none (so no unsafe), as in QEMU. */
const CASES: [Engine, Mode][] = [
  ["threads", "writeback"],
  ["threads", "none"],
  ["threads", "unsafe"],
  ["threads", "writethrough"],
  ["native", "none"],
  ["native", "writethrough"],
  ["io_uring", "writeback"],
  ["io_uring", "none"],
  ["io_uring", "unsafe"],
  ["io_uring", "writethrough"],
];

const NO_TRACE = syncTraceUnavailable();
if (NO_TRACE) console.warn(`SKIPPING the kill -9 durability tests (no sync oracle): ${NO_TRACE}`);

/** A request's window: submitted at `from`, its completion seen at `to` (CLOCK_MONOTONIC ns). */
interface Window {
  what: string;
  from: number;
  to: number;
}

/** Writes `blocks` at QD16 (all submitted, then reaped); throws on an error status. */
async function writeBlocks(c: VhostUserBlkClient, blocks: number[], seed: number): Promise<void> {
  const q = c.queues[0];
  let next = 0, done = 0, errors = 0;
  const issue = (slot: number) => {
    const off = blocks[next++] * BS;
    fillPattern(q.data(slot), off, seed);
    q.write(slot, off, BS);
  };
  q.onComplete = (slot, st) => {
    done++;
    if (st !== 0) errors++;
    if (next < blocks.length) issue(slot);
  };
  for (let sl = 0; sl < QD && next < blocks.length; sl++) issue(sl);
  q.notify();
  while (done < blocks.length) {
    assert.ok(await c.waitAsync(), "writes never completed");
    q.reap();
    q.notify();
  }
  q.onComplete = () => {};
  assert.equal(errors, 0);
}

/** Runs `build` on queue 0 alone and returns its window; the status must be OK. */
async function timed(
  c: VhostUserBlkClient,
  what: string,
  build: (q: BlkQueue) => void,
): Promise<Window> {
  const from = clockNs();
  assert.equal(await c.execute(0, build), 0, `${what} failed`);
  return { what, from, to: clockNs() };
}

/** Windows without a sync request inside, as "what (n syncs in the run)". */
function unsynced(trace: SyncTrace, windows: Window[]): string[] {
  const all = trace.events();
  return windows.filter((w) => !all.some((e) => e.ns >= w.from && e.ns <= w.to))
    .map((w) => `${w.what} (${all.length} syncs in the run)`);
}

for (const [aio, mode] of CASES) {
  Deno.test({
    name: `flushed writes survive kill -9 and reach the kernel as syncs (aio=${aio} ${mode})`,
    ignore: NO_TRACE !== null,
    fn: async () => {
      const cache = mode === "writethrough" ? (aio === "native" ? "none" : "writeback") : mode;
      const s = await scratch(`robust-dur-${aio}-${mode}`, IMAGE);
      const args = ["--image", s.image, "--socket", s.socket, "--cache", cache, "--aio", aio];
      const seed = 61 + CASES.findIndex(([a, m]) => a === aio && m === mode);
      let host = new HostProcess(args);
      let trace: SyncTrace | null = null;
      try {
        await host.ready();
        trace = SyncTrace.start(host.pid);
        const c = await connect(s.socket, { queueSize: 64, slots: QD, maxBlockSize: BS });
        const flushes: Window[] = [], writes: Window[] = [];
        if (mode === "writethrough") await c.setWriteback(false);
        const start = clockNs();
        const per = BLOCKS.length / ROUNDS;
        for (let r = 0; r < ROUNDS; r++) {
          const blocks = BLOCKS.slice(r * per, (r + 1) * per);
          if (mode !== "writethrough") await writeBlocks(c, blocks, seed);
          else {
            // QD1, so each write's window holds only its own sync.
            for (const b of blocks) {
              writes.push(
                await timed(c, `write of block ${b}`, (q) => {
                  fillPattern(q.data(0), b * BS, seed);
                  q.write(0, b * BS, BS);
                }),
              );
            }
          }
          // Nothing is promised before a FLUSH completes.
          flushes.push(await timed(c, `FLUSH ${r}`, (q) => q.flush(0)));
        }
        const syncs = trace.between(start, clockNs());
        if (mode === "unsafe") {
          assert.deepEqual(syncs, [], "cache=unsafe: a sync reached the kernel");
        } else {
          assert.deepEqual(unsynced(trace, flushes), [], "FLUSH completed without a sync");
          assert.deepEqual(unsynced(trace, writes), [], "writethrough: write completed unsynced");
        }
        // kill -9 with the front-end still connected.
        const st = await host.stop("SIGKILL", 15000);
        assert.equal(st.signal, "SIGKILL");
        trace.close();
        c.frontend.close();
        await c.close();

        // The image file itself.
        const f = await Deno.open(s.image, { read: true });
        try {
          const buf = new Uint8Array(BS);
          for (const b of BLOCKS) {
            await f.seek(b * BS, Deno.SeekMode.Start);
            let got = 0;
            while (got < BS) got += (await f.read(buf.subarray(got))) ?? assert.fail("EOF");
            const m = firstMismatch(buf, b * BS, seed);
            assert.equal(m, -1, `image file: block ${b} differs at +${m}`);
          }
        } finally {
          f.close();
        }

        // A new host on the same image (the dead one's socket file is stale).
        host = new HostProcess(args);
        await host.ready();
        const c2 = await connect(s.socket, { queueSize: 64, slots: QD, maxBlockSize: BS });
        try {
          for (const b of BLOCKS) {
            assert.equal(await c2.execute(0, (q) => q.read(0, b * BS, BS)), 0);
            const m = firstMismatch(c2.queues[0].data(0), b * BS, seed);
            assert.equal(m, -1, `after restart: block ${b} differs at +${m}`);
          }
        } finally {
          await c2.close();
        }
        await host.stopCleanly();
      } finally {
        trace?.close();
        await host.stop("SIGKILL", 15000);
        await s.remove();
      }
    },
  });
}
