/**
 * VirtioBlkDataPlane in one thread, without sockets or Workers: a test
 * driver fills a split ring in memfd guest memory, kicks, and polls the
 * AioContext until the used ring has caught up. Measures what the dataplane
 * itself costs per request (pop, parse, submit to null-co, complete, push,
 * notify), which bounds the IOPS one IOThread can deliver.
 *
 * `./deno bench -A --no-check bench/dataplane_bench.ts`
 */

import { AioContext } from "../aio/mod.ts";
import { BlockBackend } from "../block/mod.ts";
import { VirtioBlkDataPlane } from "../dataplane/mod.ts";
import { close, eventfd, eventfdRead, eventfdWrite, viewAt } from "../sys/mod.ts";
import { VIRTIO_BLK_T_IN, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from "../virtio/mod.ts";
import { ringLayout, TestMemory } from "../tests/virtio/guest_driver.ts";

const SIZE = 256;
const GPA = 0x4000_0000;
const MiB = 1 << 20;

interface Rig {
  ctx: AioContext;
  blk: BlockBackend;
  dp: VirtioBlkDataPlane;
  tm: TestMemory;
  kick: number;
  call: number;
  avail: Uint16Array;
  used: Uint16Array;
  availIdx: number;
}

async function rig(): Promise<Rig> {
  const tm = new TestMemory([{ gpa: GPA, size: 8 * MiB }]);
  const ctx = new AioContext({ pollMaxNs: 0 });
  const blk = await BlockBackend.open(ctx, { driver: "null-co", size: 1 << 30 });
  const dp = new VirtioBlkDataPlane(ctx, blk, {
    device: { capacity: (1 << 30) / 512, segMax: SIZE - 2 },
    serial: "bench",
    writeback: true,
  });
  await dp.setMemory(tm.mem);
  const l = ringLayout(GPA, SIZE);
  // Requests i = descriptors 3i (header), 3i+1 (4 KiB data), 3i+2 (status).
  const hdr = GPA + 64 * 1024, data = GPA + MiB;
  for (let i = 0; i < Math.floor(SIZE / 3); i++) {
    const h = tm.view(hdr + 32 * i, 16);
    h.setUint32(0, VIRTIO_BLK_T_IN, true);
    h.setUint32(8, i * 8, true);
    const d = (k: number, addr: number, len: number, flags: number) => {
      const v = tm.view(l.desc + 16 * (3 * i + k), 16);
      v.setBigUint64(0, BigInt(addr), true);
      v.setUint32(8, len, true);
      v.setUint16(12, flags, true);
      v.setUint16(14, 3 * i + k + 1, true);
    };
    d(0, hdr + 32 * i, 16, VRING_DESC_F_NEXT);
    d(1, data + 4096 * i, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE);
    d(2, hdr + 32 * i + 16, 1, VRING_DESC_F_WRITE);
  }
  const kick = eventfd(), call = eventfd();
  await dp.startQueue({
    index: 0,
    size: SIZE,
    desc: tm.uva(l.desc),
    avail: tm.uva(l.avail),
    used: tm.uva(l.used),
    base: 0,
    kickFd: kick,
    callFd: call,
    errFd: null,
    eventIdx: true,
    indirectDesc: true,
    enabled: true,
  });
  const avail = new Uint16Array(viewAt(tm.mem.hostAddr(l.avail, 6 + 2 * SIZE), 6 + 2 * SIZE));
  const used = new Uint16Array(viewAt(tm.mem.hostAddr(l.used, 6 + 8 * SIZE), 6 + 8 * SIZE));
  ctx.poll(false);
  return { ctx, blk, dp, tm, kick, call, avail, used, availIdx: 0 };
}

/** Makes `n` requests available, kicks, and polls until all are used. */
function batch(r: Rig, n: number): void {
  for (let i = 0; i < n; i++) {
    r.avail[2 + ((r.availIdx + i) & (SIZE - 1))] = 3 * (i % Math.floor(SIZE / 3));
  }
  r.availIdx = (r.availIdx + n) & 0xffff;
  Atomics.store(r.avail, 1, r.availIdx);
  r.avail[2 + SIZE] = (r.availIdx - 1) & 0xffff; // used_event: one interrupt per batch
  eventfdWrite(r.kick, 1);
  while (Atomics.load(r.used, 1) !== r.availIdx) r.ctx.poll(true);
  eventfdRead(r.call);
}

const r = await rig();

Deno.bench("dataplane: 1 request (kick, null-co, used, notify)", { group: "dataplane" }, () => {
  batch(r, 1);
});

Deno.bench("dataplane: batch of 32 requests", { group: "dataplane", baseline: true }, () => {
  batch(r, 32);
});

Deno.bench("dataplane: batch of 80 requests", { group: "dataplane" }, () => {
  batch(r, 80);
});

globalThis.addEventListener("unload", () => {
  close(r.kick);
  close(r.call);
});
