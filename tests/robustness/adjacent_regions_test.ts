// Issue 10 section 3, end to end: a front-end whose memory regions are
// guest-physically adjacent (as memory hotplug makes them) sends requests
// whose header and data buffers span two regions. The host (its IOThread
// rebuilds GuestMemory from the region table and maps each region
// separately) splits each such buffer into one iovec per region, as QEMU's
// virtqueue_map_desc does, and serves it: the bytes land in the image and
// come back, status OK, used length exact. A span that runs on into a hole is
// still IOERR.

import assert from "node:assert/strict";
import { fileBytes, firstDifference, hostScratch, randomBytes } from "../e2e/host_util.ts";
import {
  assertReadWorks,
  HostileGuest,
  MiB,
  type RawDesc,
  startHost,
  WRITE,
} from "./robustness_util.ts";
import type { GuestBuffer } from "../../client/guest_ram.ts";

const T_IN = 0, T_OUT = 1, S_OK = 0, S_IOERR = 1;
const SIZE = 16 * MiB;
const DATA = randomBytes(8192, 11);

const scratch = await hostScratch("robust-adjacent", SIZE);
const { host } = await startHost(["--image", scratch.image, "--socket", scratch.socket]);

const rd = (b: GuestBuffer, len = b.length): RawDesc => ({ addr: b.gpa, len, flags: 0 });
const wr = (b: GuestBuffer, len = b.length): RawDesc => ({ addr: b.gpa, len, flags: WRITE });

/** A header (type, sector) written into `at`, which may span regions. */
function writeHeader(at: GuestBuffer, type: number, sector: number): void {
  const dv = new DataView(at.bytes.buffer, at.bytes.byteOffset, 16);
  dv.setUint32(0, type, true);
  dv.setUint32(4, 0, true);
  dv.setBigUint64(8, BigInt(sector), true);
}

Deno.test("adjacent regions: header and data spanning regions are written and read back", async () => {
  // Three regions, no holes: rings in the first, client slots in the last,
  // the middle one free (the last's first bytes are slot 0's data buffer,
  // idle while these raw chains run).
  const g = await HostileGuest.connect(scratch.socket, 1, { regions: 3, regionGap: 0 });
  try {
    const ram = g.client.ram!;
    const [r0, r1, r2] = ram.regions;
    assert.equal(r1.guestPhysAddr, r0.guestPhysAddr + r0.size, "adjacent");
    const edge = r1.guestPhysAddr, edge2 = r2.guestPhysAddr;
    // OUT: one readable descriptor, header in region 0, data 3 KiB in region 0, 5 KiB in 1
    const out = ram.at(edge - 3072 - 16, 16 + 8192);
    writeHeader(out, T_OUT, 64);
    out.bytes.set(DATA, 16);
    let st = g.statusByte();
    let r = await g.roundTrip(0, g.chain(0, [rd(out), wr(st)]), st);
    assert.equal(r.status, S_OK, "write spanning regions");
    assert.equal(r.usedLen, 1);
    // IN: the header spans regions 1 and 2 (8 + 8 bytes); data and status in one
    // descriptor spanning regions 0 and 1, fenced by bytes that must not change
    const hdr = ram.at(edge2 - 8, 16);
    writeHeader(hdr, T_IN, 64);
    const back = ram.at(edge - 5120, 8193);
    back.bytes.fill(0xee);
    const lo = ram.at(edge - 5121, 1), hi = ram.at(edge - 5120 + 8193, 1);
    lo.bytes[0] = 0x5a;
    hi.bytes[0] = 0xa5;
    r = await g.roundTrip(0, g.chain(0, [rd(hdr), wr(back)]), ram.at(back.gpa + 8192, 1));
    assert.equal(r.status, S_OK, "read spanning regions");
    assert.equal(r.usedLen, 8193);
    assert.equal(firstDifference(back.bytes.subarray(0, 8192), DATA), -1);
    assert.equal(lo.bytes[0], 0x5a, "nothing written before the buffer");
    assert.equal(hi.bytes[0], 0xa5, "nothing written after it");
    // a span from the last region past its end (no memory there): IOERR
    st = g.statusByte();
    const bad: RawDesc = { addr: edge2 + r2.size - 256, len: 512, flags: WRITE };
    r = await g.roundTrip(0, g.chain(0, [rd(g.header(T_IN, 0n)), bad, wr(st)]), st);
    assert.equal(r.status, S_IOERR);
    await assertReadWorks(g.client, 0);
  } finally {
    await g.close();
  }
  await host.stop();
  assert.equal(firstDifference(fileBytes(scratch.image, 64 * 512, 8192), DATA), -1);
  await scratch.remove();
});
