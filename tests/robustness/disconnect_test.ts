// Issue 6, robustness: the front-end disappears (socket closed, no
// GET_VRING_BASE) while 32 requests per queue are in flight on a file image
// with cache=none. The host runs as a separate process so a use of unmapped
// guest memory would show as a SIGSEGV exit status. In-flight requests must
// finish before the memory is unmapped, the next connection must work and
// read back what was written before, and SIGTERM must still stop it cleanly.

import assert from "node:assert/strict";
import type { VhostUserBlkClient } from "../../client/blk_client.ts";
import { verify } from "../../client/workload.ts";
import {
  assertPattern,
  cacheNoneHost,
  connect,
  HostProcess,
  MiB,
  scratch,
  sleep,
} from "./robustness_util.ts";

const IMAGE = 64 * MiB;
const KEPT = 4 * MiB; // written and flushed first, read back at the end
const BS = 128 * 1024;
const QD = 32;
const SEED = 6;

/** Fills every slot of every queue with a 128 KiB request (writes and reads) and kicks. */
function floodAndLeave(c: VhostUserBlkClient, round: number): void {
  let x = round * 7919 + 1;
  for (const q of c.queues) {
    for (let s = 0; s < QD; s++) {
      x = (x * 1103515245 + 12345) >>> 0;
      const off = KEPT + (x % ((IMAGE - KEPT) / BS)) * BS;
      if (s % 3 === 0) q.read(s, off, BS);
      else q.write(s, off, BS);
    }
    q.notify();
  }
}

for (const aio of ["native", "threads"]) {
  Deno.test(`front-end disconnects at QD${QD} with cache=none aio=${aio}: no crash, next connection works`, async () => {
    const s = await scratch(`robust-disc-${aio}`, IMAGE);
    const host = new HostProcess(cacheNoneHost(s, aio, 2));
    try {
      await host.ready();
      const opts = { numQueues: 2, queueSize: 128, slots: QD, maxBlockSize: BS };
      const first = await connect(s.socket, opts);
      const v = await verify(first, { span: KEPT, blockSize: BS, queueDepth: 8, seed: SEED });
      assert.deepEqual(v, { blocks: KEPT / BS, mismatches: 0, errors: 0 });
      await first.close();

      for (let round = 0; round < 6; round++) {
        const c = await connect(s.socket, opts);
        floodAndLeave(c, round);
        if (round % 2 === 1) await sleep(1); // some requests complete, some are in flight
        // Gone without GET_VRING_BASE: the socket closes, then our RAM is unmapped.
        c.frontend.close();
        await c.close();
      }

      const last = await connect(s.socket, opts);
      try {
        await assertPattern(last, 0, KEPT, BS, SEED);
        const v2 = await verify(last, {
          offset: 32 * MiB,
          span: 2 * MiB,
          blockSize: BS,
          queueDepth: 8,
          seed: SEED + 1,
        });
        assert.deepEqual(v2, { blocks: 16, mismatches: 0, errors: 0 });
      } finally {
        await last.close();
      }
      assert.match(host.stderr, /front-end #7 disconnected/);
      await host.stopCleanly();
      assert.doesNotMatch(host.stderr, /ring broken|error:/, host.stderr);
    } finally {
      await host.stop("SIGKILL", 15000);
      await s.remove();
    }
  });
}
