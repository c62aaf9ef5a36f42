/**
 * The L2 table cache's two additions for writing: versions (an image
 * written by several threads: a table whose version moved is read again,
 * also when it moved during the read) and pinning (tables with unwritten
 * changes are never evicted).
 */
import assert from "node:assert/strict";
import { L2Cache } from "../../../block/qcow2/l2_cache.ts";

function loaderWith(loads: number[]) {
  return (off: number, bytes: number, cb: (ret: number, t: DataView | null) => void) => {
    loads.push(off);
    queueMicrotask(() => cb(0, new DataView(new ArrayBuffer(bytes))));
  };
}

const tick = () => new Promise((r) => setTimeout(r, 0));

Deno.test("L2Cache: a table whose version moved is a miss and is read again", async () => {
  const loads: number[] = [];
  const versions = new Map<number, number>();
  const cache = new L2Cache(4, 512, loaderWith(loads), (off) => versions.get(off) ?? 0);
  cache.fetch(4096, () => {});
  await tick();
  assert(cache.lookup(4096) !== undefined);
  versions.set(4096, 1); // another thread changed the table
  assert.equal(cache.lookup(4096), undefined);
  // Changed again while being read: the copy read is stale at once.
  cache.fetch(4096, () => {});
  versions.set(4096, 2);
  await tick();
  assert.equal(cache.lookup(4096), undefined);
  cache.fetch(4096, () => {});
  await tick();
  assert(cache.lookup(4096) !== undefined);
  assert.deepEqual(loads, [4096, 4096, 4096]);
  // A table put by its owner after the change is current.
  cache.put(8192, new DataView(new ArrayBuffer(512)));
  versions.set(8192, 0);
  assert(cache.lookup(8192) !== undefined);
});

Deno.test("L2Cache: pinned tables are not evicted until unpinned", async () => {
  const loads: number[] = [];
  const cache = new L2Cache(2, 512, loaderWith(loads));
  cache.put(0x1000, new DataView(new ArrayBuffer(512)));
  cache.pin(0x1000);
  for (const off of [0x2000, 0x3000, 0x4000]) {
    cache.fetch(off, () => {});
    await tick();
  }
  assert(cache.lookup(0x1000) !== undefined, "the pinned table stayed");
  assert.equal(cache.size, 2);
  cache.unpinAll();
  for (const off of [0x5000, 0x6000]) {
    cache.fetch(off, () => {});
    await tick();
  }
  assert.equal(cache.lookup(0x1000), undefined, "evicted once unpinned");
});
