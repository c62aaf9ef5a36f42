// virtio/ hot path: a 4 KiB read request taken from a split virtqueue, parsed
// and completed (pop + parseBlkRequest + writeStatus + push + notifyNeeded),
// with the guest side reduced to two u16 stores per request; and pop + push
// recording each request in a vhost-user inflight log (INFLIGHT_SHMFD).
//
//   ./deno bench -A bench/virtio_bench.ts
import { mmapAnonymous } from "../sys/mod.ts";
import {
  blkRequestLimits,
  GuestMemory,
  inflightQueueRegionSize,
  parseBlkRequest,
  SplitInflightRegion,
  VirtioBlkRequest,
  Virtqueue,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
} from "../virtio/mod.ts";

const SIZE = 256;
const GPA = 0x40000000;
const m = mmapAnonymous(1 << 20);
const mem = GuestMemory.fromMapped([
  { guestPhysAddr: 0x0, size: 0x10000, userAddr: 0x7e0000000000, hostAddr: m.addr + 0xf0000 },
  { guestPhysAddr: GPA, size: 0xe0000, userAddr: 0x7f0000000000, hostAddr: m.addr },
]);
const dv = new DataView(m.buffer);
const DESC = 0, AVAIL = 0x1000, USED = 0x2000, HDR = 0x4000, DATA = 0x5000, STATUS = 0x6000;
const TABLE = 0x7000;
const AVAIL_I = 0x8000, USED_I = 0x9000; // a second ring, with an inflight log

function desc(off: number, i: number, gpa: number, len: number, flags: number, next: number) {
  const o = off + 16 * i;
  dv.setBigUint64(o, BigInt(gpa), true);
  dv.setUint32(o + 8, len, true);
  dv.setUint16(o + 12, flags, true);
  dv.setUint16(o + 14, next, true);
}

// direct chain: heads 0, 3, 6, ... each header -> 4 KiB data-in -> status
for (let h = 0; h + 2 < SIZE; h += 3) {
  desc(DESC, h, GPA + HDR, 16, VRING_DESC_F_NEXT, h + 1);
  desc(DESC, h + 1, GPA + DATA, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, h + 2);
  desc(DESC, h + 2, GPA + STATUS, 1, VRING_DESC_F_WRITE, 0);
}
// the same request through an indirect table (as Linux sends it with INDIRECT_DESC)
desc(TABLE, 0, GPA + HDR, 16, VRING_DESC_F_NEXT, 1);
desc(TABLE, 1, GPA + DATA, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
desc(TABLE, 2, GPA + STATUS, 1, VRING_DESC_F_WRITE, 0);
dv.setUint32(HDR, 0, true); // VIRTIO_BLK_T_IN, sector 8
dv.setBigUint64(HDR + 8, 8n, true);

function makeQueue(inflight: SplitInflightRegion | null = null): Virtqueue {
  const base = 0x7f0000000000;
  return new Virtqueue({
    mem,
    size: SIZE,
    desc: base + DESC,
    avail: base + (inflight ? AVAIL_I : AVAIL),
    used: base + (inflight ? USED_I : USED),
    eventIdx: true,
    indirectDesc: true,
    inflight,
  });
}

const limits = blkRequestLimits({ capacity: 1 << 21 });
const req = new VirtioBlkRequest(limits);
const availRing = new Uint16Array(m.buffer, AVAIL, 2 + SIZE + 1);
let availIdx = 0;

/** The guest's part: publish one head. */
function offer(head: number): void {
  availRing[2 + (availIdx & (SIZE - 1))] = head;
  availIdx = (availIdx + 1) & 0xffff;
  Atomics.store(availRing, 1, availIdx);
}

const vqA = makeQueue();
let nextHead = 0;
Deno.bench({ name: "pop + push (no parse)", group: "4k-read", baseline: true }, () => {
  offer(nextHead);
  nextHead = (nextHead + 3) % 255;
  const c = vqA.pop()!;
  vqA.push(c.head, 4097);
  vqA.notifyNeeded();
});

Deno.bench({ name: "pop + parse + status + push + notify", group: "4k-read" }, () => {
  offer(nextHead);
  nextHead = (nextHead + 3) % 255;
  const c = vqA.pop()!;
  if (parseBlkRequest(c, mem, limits, req) !== null) throw new Error("parse failed");
  req.writeStatus(0);
  vqA.push(c.head, req.usedLen);
  vqA.notifyNeeded();
});

Deno.bench({ name: "same, indirect descriptor table", group: "4k-read" }, () => {
  desc(DESC, 255, GPA + TABLE, 48, VRING_DESC_F_INDIRECT, 0);
  offer(255);
  const c = vqA.pop()!;
  if (parseBlkRequest(c, mem, limits, req) !== null) throw new Error("parse failed");
  req.writeStatus(0);
  vqA.push(c.head, req.usedLen);
  vqA.notifyNeeded();
});

// INFLIGHT_SHMFD: the same pop + push recording every request in the log.
const logMap = mmapAnonymous(inflightQueueRegionSize(SIZE));
const vqI = makeQueue(SplitInflightRegion.at(logMap.addr, SIZE));
vqI.resumeInflight();
const availRingI = new Uint16Array(m.buffer, AVAIL_I, 2 + SIZE + 1);
let availIdxI = 0;
Deno.bench({ name: "pop + push (no parse), inflight log", group: "4k-read" }, () => {
  availRingI[2 + (availIdxI & (SIZE - 1))] = nextHead;
  availIdxI = (availIdxI + 1) & 0xffff;
  Atomics.store(availRingI, 1, availIdxI);
  nextHead = (nextHead + 3) % 255;
  const c = vqI.pop()!;
  vqI.push(c.head, 4097);
  vqI.notifyNeeded();
});

let g = 0;
Deno.bench({ name: "GuestMemory.hostAddr (alternating regions)", group: "translate" }, () => {
  g ^= 1;
  if (mem.hostAddr(g ? GPA + DATA : 0x100, 4096) < 0) throw new Error("translate");
});
