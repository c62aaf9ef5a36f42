// Issue 9 item 8: error paths with real errors from the kernel, through a
// host process and the built-in client. A full tmpfs gives ENOSPC (for a
// write, and for the write-zeroes fallback that writes zeroes because tmpfs has
// no ZERO_RANGE), ramfs has no fallocate at all (the EOPNOTSUPP fallbacks of
// discard and write-zeroes must still succeed), and a shut-down ext4 gives EIO
// for everything. Each failure must reach the guest as VIRTIO_BLK_S_IOERR with
// used length 1 (the status byte only), and the ring must carry on: the next
// request is answered. Engine-independent paths that need a failure in the
// middle of a request (one range of a multi-range discard, the flush after a
// writethrough write) are in tests/dataplane/virtio_blk_dataplane_test.ts.

import assert from "node:assert/strict";
import type { BlkQueue, VhostUserBlkClient } from "../../client/blk_client.ts";
import { VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK } from "../../client/virtio_blk_defs.ts";
import { connect, HostProcess, MiB } from "./robustness_util.ts";
import {
  mountScratchFs,
  type ScratchFs,
  type ScratchFsKind,
  scratchFsUnavailable,
} from "./scratch_fs.ts";

const BS = 64 * 1024;

/** What the device answered for one request. */
interface Answer {
  status: number;
  usedLen: number;
}

const OK_READ: Answer = { status: VIRTIO_BLK_S_OK, usedLen: BS + 1 };
const OK_NODATA: Answer = { status: VIRTIO_BLK_S_OK, usedLen: 1 };
/** An error carries the status byte only. */
const IOERR: Answer = { status: VIRTIO_BLK_S_IOERR, usedLen: 1 };

/** Runs one request on slot 0 of queue 0 and returns the raw status byte and used length. */
async function answer(c: VhostUserBlkClient, build: (q: BlkQueue) => void): Promise<Answer> {
  const q = c.queues[0];
  let got: Answer | null = null;
  q.onComplete = (_slot, status, usedLen) => got = { status, usedLen };
  build(q);
  q.notify();
  while (got === null) {
    assert.ok(await c.waitAsync(), "no answer from the device");
    q.reap();
  }
  q.onComplete = () => {};
  return got;
}

const fill = (q: BlkQueue, byte: number) => q.data(0).fill(byte);

/** Mounts `kind`, starts a host on an image there, connects, runs `body`, cleans up. */
async function withHost(
  kind: ScratchFsKind,
  fsBytes: number,
  imageBytes: number,
  hostArgs: string[],
  body: (c: VhostUserBlkClient, fs: ScratchFs, host: HostProcess) => Promise<void>,
): Promise<void> {
  const fs = await mountScratchFs(kind, fsBytes, imageBytes);
  const host = new HostProcess(["--image", fs.image, "--socket", fs.socket, ...hostArgs]);
  try {
    await host.ready();
    const c = await connect(fs.socket, { queueSize: 64, slots: 4, maxBlockSize: BS });
    try {
      await body(c, fs, host);
    } finally {
      await c.close();
    }
    await host.stopCleanly();
  } finally {
    await host.stop("SIGKILL", 15000);
    fs.remove();
  }
}

/** Engines and the cache mode each uses (aio=native needs O_DIRECT). */
const ENGINES = [
  ["threads", "writeback"],
  ["io_uring", "writeback"],
  ["native", "none"],
] as const;

for (const kind of ["tmpfs", "ramfs", "ext4"] as const) {
  const why = scratchFsUnavailable(kind);
  if (why) console.warn(`SKIPPING the ${kind} error-path tests: ${why}`);
}

for (const [aio, cache] of ENGINES) {
  Deno.test({
    name:
      `ENOSPC from a full tmpfs (aio=${aio}): write and write-zeroes fallback get IOERR, the ring goes on`,
    ignore: scratchFsUnavailable("tmpfs") !== null,
    fn: () =>
      withHost("tmpfs", 1 * MiB, 8 * MiB, ["--cache", cache, "--aio", aio], async (c) => {
        // With room: write-zeroes falls back from ZERO_RANGE (EOPNOTSUPP on tmpfs).
        assert.deepEqual(await answer(c, (q) => (fill(q, 7), q.write(0, 0, BS))), OK_NODATA);
        assert.deepEqual(await answer(c, (q) => q.writeZeroes(0, 0, BS)), OK_NODATA);
        assert.deepEqual(await answer(c, (q) => (fill(q, 9), q.read(0, 0, BS))), OK_READ);
        assert.ok(c.queues[0].data(0).every((b) => b === 0), "write-zeroes fallback: not zero");
        // Fill the file system until a write fails: ENOSPC reaches the guest as IOERR.
        let off = BS, failed: Answer | null = null;
        for (; off < 8 * MiB; off += BS) {
          const a = await answer(c, (q) => (fill(q, 5), q.write(0, off, BS)));
          if (a.status !== VIRTIO_BLK_S_OK) {
            failed = a;
            break;
          }
          assert.deepEqual(a, OK_NODATA);
        }
        assert.ok(off > BS && off <= MiB, `the first failing write was at ${off}`);
        assert.deepEqual(failed, IOERR, "a write to a full file system");
        // The write-zeroes fallback writes zeroes: on a full file system, ENOSPC too.
        assert.deepEqual(await answer(c, (q) => q.writeZeroes(0, 4 * MiB, BS)), IOERR);
        // The ring goes on: reads of what was written, overwrites of allocated blocks.
        assert.deepEqual(await answer(c, (q) => q.read(0, BS, BS)), OK_READ);
        assert.ok(c.queues[0].data(0).every((b) => b === 5));
        assert.deepEqual(await answer(c, (q) => (fill(q, 6), q.write(0, 0, BS))), OK_NODATA);
        assert.deepEqual(await answer(c, (q) => q.flush(0)), OK_NODATA);
        assert.deepEqual(await answer(c, (q) => q.read(0, 0, BS)), OK_READ);
        assert.ok(c.queues[0].data(0).every((b) => b === 6));
      }),
  });

  Deno.test({
    name: `EIO from a shut-down ext4 (aio=${aio}): every I/O gets IOERR, the ring goes on`,
    ignore: scratchFsUnavailable("ext4") !== null,
    fn: () =>
      withHost("ext4", 32 * MiB, 4 * MiB, ["--cache", cache, "--aio", aio], async (c, fs) => {
        assert.deepEqual(await answer(c, (q) => (fill(q, 3), q.write(0, 0, BS))), OK_NODATA);
        assert.deepEqual(await answer(c, (q) => q.flush(0)), OK_NODATA);
        fs.shutdown();
        assert.deepEqual(await answer(c, (q) => q.write(0, BS, BS)), IOERR, "write");
        assert.deepEqual(await answer(c, (q) => q.read(0, 0, BS)), IOERR, "read");
        assert.deepEqual(await answer(c, (q) => q.flush(0)), IOERR, "flush");
        assert.deepEqual(await answer(c, (q) => q.discard(0, 0, BS)), IOERR, "discard");
        assert.deepEqual(await answer(c, (q) => q.writeZeroes(0, 0, BS)), IOERR, "write-zeroes");
        // Still serving: GET_ID needs no I/O.
        const id = await answer(c, (q) => q.getId(0));
        assert.equal(id.status, VIRTIO_BLK_S_OK, "GET_ID after the errors");
      }),
  });
}

for (const aio of ["threads", "io_uring"] as const) {
  Deno.test({
    name: `ramfs has no fallocate (aio=${aio}): discard and write-zeroes fall back and succeed`,
    ignore: scratchFsUnavailable("ramfs") !== null,
    // Each fallback is learnt once per driver (EOPNOTSUPP is remembered), so each
    // order of first use gets a fresh host.
    fn: async () => {
      const args = ["--cache", "writeback", "--aio", aio];
      const zeroes = async (c: VhostUserBlkClient, unmap: boolean) => {
        assert.deepEqual(await answer(c, (q) => (fill(q, 4), q.write(0, 0, BS))), OK_NODATA);
        assert.deepEqual(await answer(c, (q) => q.writeZeroes(0, 0, BS, unmap)), OK_NODATA);
        assert.deepEqual(await answer(c, (q) => (fill(q, 8), q.read(0, 0, BS))), OK_READ);
        assert.ok(c.queues[0].data(0).every((b) => b === 0), `write-zeroes unmap=${unmap}`);
      };
      // Discard first: advisory, so EOPNOTSUPP turns into success (the data may stay).
      await withHost("ramfs", 0, 4 * MiB, args, async (c) => {
        assert.deepEqual(await answer(c, (q) => q.discard(0, 0, BS)), OK_NODATA);
        assert.deepEqual(await answer(c, (q) => q.discard(0, BS, BS)), OK_NODATA);
        await zeroes(c, false);
      });
      // Write-zeroes with unmap first: punch hole, then zero range, then zeroes.
      await withHost("ramfs", 0, 4 * MiB, args, async (c) => {
        await zeroes(c, true);
        await zeroes(c, false);
        assert.deepEqual(await answer(c, (q) => q.discard(0, 0, BS)), OK_NODATA);
      });
    },
  });
}
