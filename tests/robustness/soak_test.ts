// Issue 6, robustness: a bounded soak. Mixed random 4-64 KiB reads and writes
// with a FLUSH between rounds on 2 queues, file image, cache=none
// aio=io_uring, host in its own process. Zero errors; a pattern written
// before the soak (outside the soaked span) is intact after it; a verify pass
// at the end; the host's VmRSS is stable (last quarter within 20% of the
// first); the host's SIGUSR1 dump answers under load. SOAK_SECONDS lengthens it
// (default 25 s of load).

import assert from "node:assert/strict";
import { runWorkload, verify } from "../../client/workload.ts";
import {
  assertPattern,
  cacheNoneHost,
  connect,
  HostProcess,
  MiB,
  scratch,
} from "./robustness_util.ts";

const SECONDS = Number(Deno.env.get("SOAK_SECONDS") ?? 25);
const IMAGE = 128 * MiB;
const SPAN = 96 * MiB; // soaked; [SPAN, IMAGE) keeps the pre-soak pattern
const ROUND_MS = 1000;

Deno.test(`soak: ${SECONDS} s of mixed I/O with flushes, 2 queues, cache=none aio=io_uring`, async () => {
  const s = await scratch("robust-soak", IMAGE);
  const host = new HostProcess(cacheNoneHost(s, "io_uring", 2, 2));
  try {
    await host.ready();
    const c = await connect(s.socket, {
      numQueues: 2,
      queueSize: 128,
      slots: 32,
      maxBlockSize: 64 * 1024,
      // What this test looks for is a request that never completes (a lost
      // kick or interrupt, a dead IOThread), not slow storage: O_DIRECT writes
      // on a shared CI disk can take seconds, so wait a minute before calling
      // it lost. A stall report carries both sides' ring indexes.
      timeoutMs: 60_000,
    });
    try {
      const keep = { offset: SPAN, span: 8 * MiB, blockSize: 64 * 1024, queueDepth: 8, seed: 66 };
      assert.deepEqual(await verify(c, keep), { blocks: 128, mismatches: 0, errors: 0 });
      const rss: number[] = [];
      let ops = 0, errors = 0;
      const end = Date.now() + SECONDS * 1000;
      for (let round = 0; Date.now() < end; round++) {
        let r;
        try {
          r = runWorkload(c, {
            pattern: "randrw",
            blockSize: [4096, 16384, 65536][round % 3],
            queueDepth: round % 2 ? 32 : 8,
            durationMs: ROUND_MS,
            readPercent: 60,
            span: SPAN,
            seed: round + 1,
          });
        } catch (e) {
          // A stall: say what the host's rings looked like.
          throw new Error(`round ${round}: ${(e as Error).message}\n${await host.dumpState()}`);
        }
        ops += r.ops;
        errors += r.errors;
        for (const qi of [0, 1]) assert.equal(await c.execute(qi, (q) => q.flush(0)), 0, "flush");
        rss.push(host.rssKiB());
        if (round === 3) {
          // The SIGUSR1 dump works on a loaded host (and so will on a stall).
          const dump = await host.dumpState();
          for (const qi of [0, 1]) {
            assert.match(dump, new RegExp(`queue ${qi}: \\d+ requests.*\\n {4}ring: avail \\d+`));
          }
        }
      }
      assert.equal(errors, 0, `${errors} of ${ops} requests failed`);
      assert.ok(ops > 1000, `only ${ops} requests in ${SECONDS} s`);
      // RSS: the mean of the last quarter of samples against the first quarter's.
      const k = Math.max(1, Math.floor(rss.length / 4));
      const mean = (a: number[]) => a.reduce((x, y) => x + y, 0) / a.length;
      const first = mean(rss.slice(0, k)), last = mean(rss.slice(-k));
      assert.ok(last < first * 1.2, `host RSS grew from ${first} to ${last} KiB: ${rss}`);
      // The untouched pattern is intact; then a fresh verify pass over the soaked span.
      await assertPattern(c, keep.offset, keep.span, keep.blockSize, keep.seed);
      const v = await verify(c, { span: 16 * MiB, blockSize: 64 * 1024, queueDepth: 16, seed: 67 });
      assert.deepEqual(v, { blocks: 256, mismatches: 0, errors: 0 });
      if (Deno.env.get("SOAK_STATS")) console.log({ ops, rss });
    } finally {
      await c.close();
    }
    await host.stopCleanly();
    assert.match(host.stderr, /0 IOERR/);
  } finally {
    await host.stop("SIGKILL", 15000);
    await s.remove();
  }
});
