// Issue 6, robustness: writes acknowledged before a completed FLUSH survive
// `kill -9` of the host. For cache=writeback and cache=none: write a pattern,
// flush (OK), SIGKILL the host process, start a new host on the same image,
// read everything back through it, and read the image file directly too.

import assert from "node:assert/strict";
import { patternWord } from "../../client/workload.ts";
import { connect, HostProcess, MiB, scratch } from "./robustness_util.ts";

const IMAGE = 32 * MiB;
const BS = 64 * 1024;
const QD = 16;
/** Scattered 64 KiB blocks across the image (both ends included). */
const BLOCKS = Array.from({ length: 96 }, (_, i) => (i * 37) % (IMAGE / BS));

function fillPattern(buf: Uint8Array, off: number, seed: number): void {
  const w = new Uint32Array(buf.buffer, buf.byteOffset, BS / 4);
  for (let i = 0; i < w.length; i++) w[i] = patternWord(off + 4 * i, seed);
}

function firstMismatch(buf: Uint8Array, off: number, seed: number): number {
  const w = new Uint32Array(buf.buffer, buf.byteOffset, BS / 4);
  for (let i = 0; i < w.length; i++) if (w[i] !== patternWord(off + 4 * i, seed)) return 4 * i;
  return -1;
}

for (const cache of ["writeback", "none"]) {
  Deno.test(`flushed writes survive kill -9 of the host (cache=${cache})`, async () => {
    const s = await scratch(`robust-dur-${cache}`, IMAGE);
    const args = ["--image", s.image, "--socket", s.socket, "--cache", cache, "--aio", "threads"];
    const seed = cache === "none" ? 61 : 62;
    let host = new HostProcess(args);
    try {
      await host.ready();
      const c = await connect(s.socket, { queueSize: 64, slots: QD, maxBlockSize: BS });
      // Write every block at QD16, then FLUSH; only then is anything promised.
      const q = c.queues[0];
      let next = 0, done = 0, errors = 0;
      q.onComplete = (slot, st) => {
        done++;
        if (st !== 0) errors++;
        if (next < BLOCKS.length) issue(slot);
      };
      const issue = (slot: number) => {
        const off = BLOCKS[next++] * BS;
        fillPattern(q.data(slot), off, seed);
        q.write(slot, off, BS);
      };
      for (let sl = 0; sl < QD; sl++) issue(sl);
      q.notify();
      while (done < BLOCKS.length) {
        assert.ok(await c.waitAsync(), "writes never completed");
        q.reap();
        q.notify();
      }
      q.onComplete = () => {};
      assert.equal(errors, 0);
      assert.equal(await c.execute(0, (q) => q.flush(0)), 0, "FLUSH failed");
      // kill -9 with the front-end still connected.
      const st = await host.stop("SIGKILL", 15000);
      assert.equal(st.signal, "SIGKILL");
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
      await host.stop("SIGKILL", 15000);
      await s.remove();
    }
  });
}
