// The built-in vhost-user-blk client against our host in the same process:
// every request type on 2 queues over 2 IOThreads for each I/O engine, data
// checked through the client and in the image file, verify mode, errors
// (out of range, read-only, 4096-byte blocks), ring restart at the returned
// base, reconnects, and the null drivers under a short workload.
//
// The host's data path runs in its IOThreads; the main thread only serves the
// vhost-user socket, which `client.execute` lets run (it awaits).

import assert from "node:assert/strict";
import { type BlkQueue, VhostUserBlkClient } from "../../client/blk_client.ts";
import { patternWord, runWorkload, verify } from "../../client/workload.ts";
import {
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_RING_F_EVENT_IDX,
} from "../../client/virtio_blk_defs.ts";
import {
  VHOST_USER_SET_VRING_ADDR,
  VHOST_USER_SET_VRING_BASE,
  VHOST_USER_SET_VRING_KICK,
} from "../../vhost_user/mod.ts";
import { fileBytes, firstDifference, hostScratch, randomBytes, startHost } from "./host_util.ts";

const KiB = 1024;
const MiB = 1 << 20;
const IMAGE_SIZE = 16 * MiB;
/** Exactly 20 bytes: GET_ID returns it without a NUL terminator. */
const SERIAL20 = "dataplane-e2e-serial";

/** Asserts that `got` equals `want` byte for byte, naming the first difference. */
function assertBytes(got: Uint8Array, want: Uint8Array, what: string): void {
  const d = firstDifference(got, want);
  if (d >= 0) assert.fail(`${what}: byte ${d} is ${got[d]}, expected ${want[d]}`);
}

/** Reads `len` bytes at `off` through queue `qi` (slot 0, buffer pre-poisoned). */
async function readBack(
  c: VhostUserBlkClient,
  qi: number,
  off: number,
  len: number,
): Promise<Uint8Array> {
  c.queues[qi].data(0).fill(0x5a, 0, len);
  assert.equal(await c.execute(qi, (q) => q.read(0, off, len)), VIRTIO_BLK_S_OK, `read ${off}`);
  return c.queues[qi].data(0).slice(0, len);
}

/** Writes `bytes` at `off` through queue `qi` (slot 0). */
async function writeAt(
  c: VhostUserBlkClient,
  qi: number,
  off: number,
  bytes: Uint8Array,
): Promise<void> {
  c.queues[qi].data(0).set(bytes);
  const st = await c.execute(qi, (q) => q.write(0, off, bytes.length));
  assert.equal(st, VIRTIO_BLK_S_OK, `write ${off}`);
}

/**
 * Stops every ring (GET_VRING_BASE) and starts it again at the returned base
 * in the same connection, as QEMU does around a VM stop: the host must resume
 * at the driver's avail index, not at 0.
 */
async function restartRings(c: VhostUserBlkClient): Promise<void> {
  const bases = await c.stopQueues();
  assert.deepEqual(bases, c.queues.map((q) => q.ring.availIdx), "GET_VRING_BASE = avail idx");
  for (const q of c.queues) {
    await restartRing(c, q, bases[q.index]);
  }
}

async function restartRing(c: VhostUserBlkClient, q: BlkQueue, base: number): Promise<void> {
  const fe = c.frontend;
  const i = q.index;
  await fe.request(VHOST_USER_SET_VRING_BASE, { kind: "vringState", index: i, num: base });
  await fe.request(VHOST_USER_SET_VRING_ADDR, {
    kind: "vringAddr",
    index: i,
    flags: 0,
    descUserAddr: BigInt(q.ring.desc.addr),
    usedUserAddr: BigInt(q.ring.used.addr),
    availUserAddr: BigInt(q.ring.avail.addr),
    logGuestAddr: 0n,
  });
  await fe.request(VHOST_USER_SET_VRING_KICK, { kind: "u64", value: BigInt(i) }, [q.kickFd]);
}

/** Every request type on a 2-queue, 2-IOThread host over a file image with `flags`. */
async function exerciseFileImage(name: string, flags: string[], seed: number): Promise<void> {
  const s = await hostScratch(`e2e-${name}`, IMAGE_SIZE);
  const { host, log } = await startHost([
    "--image",
    s.image,
    "--socket",
    s.socket,
    "--queues",
    "2",
    "--iothreads",
    "2",
    "--queue-size",
    "128",
    "--serial",
    SERIAL20,
    ...flags,
  ]);
  const a = randomBytes(64 * KiB, seed);
  const b = randomBytes(8 * KiB, seed + 100);
  const base = 1 * MiB; // A lives at [1 MiB, 1 MiB + 64 KiB)
  // What [base, base + 64 KiB) must hold at the end.
  const expectA = a.slice();
  let c: VhostUserBlkClient | null = null;
  try {
    c = await VhostUserBlkClient.connect(s.socket, { numQueues: 2, queueSize: 128, slots: 32 });
    assert.equal(c.config.capacity, IMAGE_SIZE / 512);
    assert.equal(c.config.numQueues, 2);
    assert.equal(c.config.blkSize, 512);
    assert.ok(c.hasFeature(VIRTIO_RING_F_EVENT_IDX), "EVENT_IDX negotiated");
    for (const f of [VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]) {
      assert.ok(c.hasFeature(f), `feature ${f}`);
    }
    assert.ok(c.hasFeature(VIRTIO_BLK_F_MQ));
    assert.ok(!c.readOnly);

    // IN/OUT: write on queue 0, read back on queue 1 (the other IOThread) and on 0
    await writeAt(c, 0, base, a);
    assertBytes(await readBack(c, 1, base, a.length), a, "A via queue 1");
    assertBytes(await readBack(c, 0, base, a.length), a, "A via queue 0");
    await writeAt(c, 1, 3 * MiB - 4 * KiB, b);
    assertBytes(await readBack(c, 0, 3 * MiB - 4 * KiB, b.length), b, "B");
    // an unwritten area reads as zeros
    assert.ok((await readBack(c, 1, 5 * MiB, 4 * KiB)).every((x) => x === 0), "hole is zero");

    // FLUSH on both queues
    assert.equal(await c.execute(0, (q) => q.flush(0)), VIRTIO_BLK_S_OK);
    assert.equal(await c.execute(1, (q) => q.flush(0)), VIRTIO_BLK_S_OK);

    // GET_ID: the 20 serial bytes, no NUL terminator, nothing written past them
    for (const qi of [0, 1]) {
      c.queues[qi].data(0).fill(0xee, 0, 64);
      assert.equal(await c.execute(qi, (q) => q.getId(0)), VIRTIO_BLK_S_OK);
      const id = c.queues[qi].data(0).slice(0, 64);
      assertBytes(id.subarray(0, 20), new TextEncoder().encode(SERIAL20), "serial");
      assert.ok(id.subarray(20).every((x) => x === 0xee), "GET_ID wrote past 20 bytes");
    }

    // WRITE_ZEROES without UNMAP, with UNMAP, and DISCARD (punches a hole: zeros)
    let st = await c.execute(0, (q) => q.writeZeroes(0, base + 8 * KiB, 8 * KiB, false));
    assert.equal(st, VIRTIO_BLK_S_OK, "write zeroes");
    expectA.fill(0, 8 * KiB, 16 * KiB);
    st = await c.execute(1, (q) => q.writeZeroes(0, base + 32 * KiB, 12 * KiB, true));
    assert.equal(st, VIRTIO_BLK_S_OK, "write zeroes (unmap)");
    expectA.fill(0, 32 * KiB, 44 * KiB);
    st = await c.execute(0, (q) => q.discard(0, base + 48 * KiB, 8 * KiB));
    assert.equal(st, VIRTIO_BLK_S_OK, "discard");
    expectA.fill(0, 48 * KiB, 56 * KiB);
    assertBytes(await readBack(c, 1, base, 64 * KiB), expectA, "A after zeroing");
    // a sub-block write zeroes (512 B) inside the data
    st = await c.execute(1, (q) => q.writeZeroes(0, base + 60 * KiB + 512, 512));
    assert.equal(st, VIRTIO_BLK_S_OK, "512-byte write zeroes");
    expectA.fill(0, 60 * KiB + 512, 61 * KiB);
    assertBytes(await readBack(c, 0, base, 64 * KiB), expectA, "A after 512 B zeroing");

    // out of range: refused, nothing wraps
    assert.equal(await c.execute(0, (q) => q.read(0, IMAGE_SIZE, 4096)), VIRTIO_BLK_S_IOERR);
    assert.equal(
      await c.execute(1, (q) => q.read(0, IMAGE_SIZE - 4096, 8192)),
      VIRTIO_BLK_S_IOERR,
      "straddling the end",
    );
    assert.equal(await c.execute(0, (q) => q.write(0, IMAGE_SIZE, 512)), VIRTIO_BLK_S_IOERR);
    assert.equal(
      await c.execute(1, (q) => q.discard(0, IMAGE_SIZE - 512, 1024)),
      VIRTIO_BLK_S_IOERR,
    );
    assert.equal(
      await c.execute(0, (q) => q.writeZeroes(0, IMAGE_SIZE, 512)),
      VIRTIO_BLK_S_IOERR,
    );
    // ... and the last sector itself is fine
    assert.equal(await c.execute(1, (q) => q.read(0, IMAGE_SIZE - 512, 512)), VIRTIO_BLK_S_OK);

    // verify mode: 4 MiB at 8 MiB over both queues, 16 in flight each
    const v = await verify(c, {
      offset: 8 * MiB,
      span: 4 * MiB,
      blockSize: 64 * KiB,
      queueDepth: 16,
      seed,
    });
    assert.deepEqual(v, { blocks: 64, mismatches: 0, errors: 0 });

    // stop the rings and resume them at the returned base in the same connection
    await restartRings(c);
    assertBytes(await readBack(c, 0, base, 64 * KiB), expectA, "A after ring restart (q0)");
    assertBytes(await readBack(c, 1, 3 * MiB - 4 * KiB, b.length), b, "B after ring restart");

    // reconnect: a new front-end (rings from 0 again) sees the same data
    await c.close();
    c = await VhostUserBlkClient.connect(s.socket, { numQueues: 2, queueSize: 128, slots: 32 });
    assertBytes(await readBack(c, 1, base, 64 * KiB), expectA, "A after reconnect");
    assertBytes(await readBack(c, 0, 3 * MiB - 4 * KiB, b.length), b, "B after reconnect");
    const r = runWorkload(c, {
      pattern: "randread",
      blockSize: 4096,
      queueDepth: 8,
      ops: 500,
      span: 4 * MiB,
    });
    assert.equal(r.errors, 0);
    await c.close();
    c = null;

    const stats = await host.stats();
    assert.equal(stats.connections, 2);
    assert.deepEqual(stats.threads.map((t) => t.queues.map((q) => q.index)), [[0], [1]]);
    for (const t of stats.threads) {
      assert.deepEqual(t.broken, []);
      for (const q of t.queues) assert.equal(q.broken, null, `queue ${q.index} broken`);
    }
  } finally {
    await c?.close();
    const final = await host.stop();
    const errs = log.filter((l) => l.startsWith("error"));
    assert.deepEqual(errs, [], "host logged errors");
    // the expected IOERRs: 5 out-of-range requests
    const ioerr = final.threads.flatMap((t) => t.queues).reduce((n, q) => n + q.errors, 0);
    assert.equal(ioerr, 5);
  }

  // The image file holds what the client wrote.
  assertBytes(fileBytes(s.image, base, 64 * KiB), expectA, "A in the image");
  assertBytes(fileBytes(s.image, 3 * MiB - 4 * KiB, b.length), b, "B in the image");
  const w = new Uint32Array(fileBytes(s.image, 8 * MiB, 4 * MiB).buffer);
  for (let i = 0; i < w.length; i++) {
    if (w[i] !== patternWord(8 * MiB + 4 * i, seed)) {
      assert.fail(`verify pattern mismatch in the image at byte ${8 * MiB + 4 * i}`);
    }
  }
  assert.equal((await Deno.stat(s.image)).size, IMAGE_SIZE, "image size unchanged");
  await s.remove();
}

Deno.test("host e2e: aio=threads cache=writeback, every request type on 2 queues", async () => {
  await exerciseFileImage("threads", ["--aio", "threads"], 1);
});

Deno.test("host e2e: aio=native cache=none, every request type on 2 queues", async () => {
  await exerciseFileImage("native", ["--aio", "native", "--cache", "none"], 2);
});

Deno.test("host e2e: aio=io_uring cache=none, every request type on 2 queues", async () => {
  await exerciseFileImage("uring-direct", ["--aio", "io_uring", "--cache", "none"], 3);
});

Deno.test("host e2e: aio=io_uring cache=writeback, every request type on 2 queues", async () => {
  await exerciseFileImage("uring-wb", ["--aio", "io_uring", "--cache", "writeback"], 4);
});

Deno.test("host e2e: a read-only export refuses writes, discards and write zeroes", async () => {
  const content = randomBytes(256 * KiB, 9);
  const s = await hostScratch("e2e-ro", 4 * MiB, content);
  const { host } = await startHost([
    "--image",
    s.image,
    "--socket",
    s.socket,
    "--read-only",
    "--queues",
    "2",
    "--iothreads",
    "2",
  ]);
  let c: VhostUserBlkClient | null = null;
  try {
    c = await VhostUserBlkClient.connect(s.socket, { numQueues: 2, queueSize: 128, slots: 8 });
    assert.ok(c.hasFeature(VIRTIO_BLK_F_RO), "VIRTIO_BLK_F_RO");
    assert.ok(c.readOnly);
    // DISCARD / WRITE_ZEROES stay offered on a read-only export (as in
    // qemu-storage-daemon) and the requests fail with IOERR.
    assert.ok(c.hasFeature(VIRTIO_BLK_F_DISCARD), "DISCARD offered");
    assert.ok(c.hasFeature(VIRTIO_BLK_F_WRITE_ZEROES), "WRITE_ZEROES offered");
    assertBytes(await readBack(c, 0, 0, 128 * KiB), content.subarray(0, 128 * KiB), "read");
    assertBytes(await readBack(c, 1, 128 * KiB, 128 * KiB), content.subarray(128 * KiB), "read");
    assert.equal(await c.execute(0, (q) => q.flush(0)), VIRTIO_BLK_S_OK, "flush is fine");
    for (const qi of [0, 1]) {
      c.queues[qi].data(0).fill(0x77, 0, 4096);
      assert.equal(await c.execute(qi, (q) => q.write(0, 0, 4096)), VIRTIO_BLK_S_IOERR, "write");
      assert.equal(
        await c.execute(qi, (q) => q.discard(0, 0, 4096)),
        VIRTIO_BLK_S_IOERR,
        "discard",
      );
      assert.equal(
        await c.execute(qi, (q) => q.writeZeroes(0, 0, 4096, false)),
        VIRTIO_BLK_S_IOERR,
        "write zeroes",
      );
      assert.equal(
        await c.execute(qi, (q) => q.writeZeroes(0, 4096, 4096, true)),
        VIRTIO_BLK_S_IOERR,
        "write zeroes (unmap)",
      );
    }
    assertBytes(await readBack(c, 0, 0, 8 * KiB), content.subarray(0, 8 * KiB), "unchanged");
    await c.close();
    c = null;
    const qs = (await host.stats()).threads.flatMap((t) => t.queues);
    assert.deepEqual(qs.map((q) => [q.errors, q.unsupported, q.writes]), [[4, 0, 0], [4, 0, 0]]);
  } finally {
    await c?.close();
    await host.stop();
  }
  assertBytes(fileBytes(s.image, 0, content.length), content, "image unchanged");
  await s.remove();
});

Deno.test("host e2e: 4096-byte logical blocks: config, and 512-byte requests refused", async () => {
  // 8 MiB + 2 KiB: the tail is not a whole 4 KiB block and is not exported.
  const s = await hostScratch("e2e-4k", 8 * MiB + 2048);
  const { host } = await startHost([
    "--image",
    s.image,
    "--socket",
    s.socket,
    "--logical-block-size",
    "4096",
  ]);
  let c: VhostUserBlkClient | null = null;
  try {
    c = await VhostUserBlkClient.connect(s.socket, { numQueues: 1, queueSize: 64, slots: 8 });
    assert.ok(c.hasFeature(VIRTIO_BLK_F_BLK_SIZE));
    assert.equal(c.config.blkSize, 4096);
    assert.equal(c.config.capacity, (8 * MiB) / 512, "capacity in 512-byte sectors, whole blocks");
    const d = randomBytes(8 * KiB, 44);
    await writeAt(c, 0, 4096, d);
    assertBytes(await readBack(c, 0, 4096, d.length), d, "4 KiB-aligned I/O");
    // a 512-byte read, a 4 KiB read at sector 1, a 512-byte write: IOERR
    assert.equal(await c.execute(0, (q) => q.read(0, 0, 512)), VIRTIO_BLK_S_IOERR);
    assert.equal(await c.execute(0, (q) => q.read(0, 512, 4096)), VIRTIO_BLK_S_IOERR);
    assert.equal(await c.execute(0, (q) => q.write(0, 4096, 512)), VIRTIO_BLK_S_IOERR);
    // the last whole block is readable; the partial tail is beyond capacity
    assert.equal(await c.execute(0, (q) => q.read(0, 8 * MiB - 4096, 4096)), VIRTIO_BLK_S_OK);
    assert.equal(await c.execute(0, (q) => q.read(0, 8 * MiB, 4096)), VIRTIO_BLK_S_IOERR);
    assertBytes(await readBack(c, 0, 4096, d.length), d, "data untouched by refused write");
    await c.close();
    c = null;
  } finally {
    await c?.close();
    await host.stop();
  }
  assertBytes(fileBytes(s.image, 4096, 8 * KiB), randomBytes(8 * KiB, 44), "in the image");
  await s.remove();
});

for (const driver of ["null-co", "null-aio"]) {
  Deno.test(`host e2e: ${driver} under a short mixed workload on 2 queues`, async () => {
    const s = await hostScratch(`e2e-${driver}`, 0);
    const { host } = await startHost([
      "--image",
      `${driver}:64M`,
      "--socket",
      s.socket,
      "--queues",
      "2",
      "--iothreads",
      "2",
    ]);
    let c: VhostUserBlkClient | null = null;
    try {
      c = await VhostUserBlkClient.connect(s.socket, { numQueues: 2, queueSize: 128, slots: 32 });
      assert.equal(c.config.capacity, (64 * MiB) / 512);
      // GET_ID with the default serial: NUL-padded to 20 bytes
      c.queues[0].data(0).fill(0xee, 0, 20);
      assert.equal(await c.execute(0, (q) => q.getId(0)), VIRTIO_BLK_S_OK);
      const id = c.queues[0].data(0).slice(0, 20);
      assertBytes(id.subarray(0, 9), new TextEncoder().encode("dataplane"), "default serial");
      assert.ok(id.subarray(9).every((x) => x === 0), "NUL padded");
      for (const pattern of ["randrw", "write"] as const) {
        const r = runWorkload(c, { pattern, blockSize: 4096, queueDepth: 16, ops: 4000 });
        assert.equal(r.ops, 4000);
        assert.equal(r.errors, 0, `${pattern}: errors`);
      }
      assert.equal(await c.execute(1, (q) => q.flush(0)), VIRTIO_BLK_S_OK);
      assert.equal(await c.execute(1, (q) => q.discard(0, 0, 1 * MiB)), VIRTIO_BLK_S_OK);
      assert.equal(await c.execute(1, (q) => q.read(0, 64 * MiB, 512)), VIRTIO_BLK_S_IOERR);
      await c.close();
      c = null;
      const st = await host.stats();
      const qs = st.threads.flatMap((t) => t.queues);
      assert.equal(qs.length, 2);
      // ops-limited runs need not split evenly between the queues: only that both worked
      assert.ok(
        qs.every((q) => q.requests > 10),
        `both queues did work: ${qs.map((q) => q.requests)}`,
      );
    } finally {
      await c?.close();
      await host.stop();
    }
    await s.remove();
  });
}

Deno.test("client: a signal during a blocking wait (EINTR) is not a timeout", async () => {
  const s = await hostScratch("e2e-eintr", 0);
  try {
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "--no-check",
        new URL("./fixtures/wait_eintr.ts", import.meta.url).pathname,
        s.socket,
      ],
      stderr: "inherit",
    }).output();
    assert.ok(out.success, "fixture exit status");
    const r = JSON.parse(new TextDecoder().decode(out.stdout).trim());
    // Nothing was in flight: the wait lasts its whole timeout despite the signals.
    assert.equal(r.woke, false);
    assert.ok(r.ms >= 590, `wait("block", 600) returned after ${r.ms.toFixed(0)} ms`);
  } finally {
    await s.remove();
  }
});
