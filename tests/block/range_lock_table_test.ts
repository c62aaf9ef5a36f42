import assert from "node:assert/strict";
import { AioContext, EventNotifier } from "../../aio/mod.ts";
import { RangeLockTable } from "../../block/mod.ts";
import { RequestSerialiser, type SerialisedRequest } from "../../block/request_serialiser.ts";

Deno.test("a read-modify-write waits for earlier overlapping writes, later ones wait for it", () => {
  const t = RangeLockTable.create({ participants: 2, entries: 8 });
  const a = t.register(-1), b = t.register(-1);
  assert.ok(t.fastBegin(a)); // an aligned write in flight, not in the table
  const rmw = t.enqueue(b, 0, 4096, true);
  assert.ok(!t.granted(rmw), "a fast-path write may overlap it");
  assert.ok(!t.fastBegin(a), "writes take the slow path while a serialising request exists");
  const later = t.enqueue(a, 1024, 2048, false);
  const elsewhere = t.enqueue(a, 8192, 12288, false);
  assert.ok(!t.granted(later), "overlaps the earlier read-modify-write");
  assert.ok(t.granted(elsewhere), "no overlap: runs at once");
  t.fastEnd(a);
  assert.ok(t.retry(b, rmw));
  assert.ok(!t.retry(a, later));
  t.release(rmw);
  assert.equal(t.serialising, 0);
  assert.ok(t.retry(a, later));
  t.release(later);
  t.release(elsewhere);
  assert.equal(t.entriesInUse, 0);
  assert.ok(t.fastBegin(a), "fast path again");
  t.fastEnd(a);
});

Deno.test("two read-modify-writes of one block go in ticket order", () => {
  const t = RangeLockTable.create({ participants: 2, entries: 8 });
  const a = t.register(-1), b = t.register(-1);
  const first = t.enqueue(a, 0, 4096, true), second = t.enqueue(b, 0, 8192, true);
  assert.ok(t.granted(first) && !t.granted(second));
  assert.ok(!t.retry(b, second));
  t.release(first);
  assert.ok(t.retry(b, second));
  t.release(second);
});

Deno.test("a release or a drained fast count wakes the waiting participant's eventfd", () => {
  const t = RangeLockTable.create({ participants: 2, entries: 1 });
  const na = new EventNotifier(), nb = new EventNotifier();
  const a = t.register(na.fd), b = t.register(nb.fd);
  assert.ok(t.fastBegin(a));
  const rmw = t.enqueue(b, 0, 4096, true);
  assert.ok(!t.granted(rmw));
  assert.ok(!nb.testAndClear());
  t.fastEnd(a); // the count b waits for reaches zero
  assert.ok(nb.testAndClear());
  assert.ok(t.retry(b, rmw));
  assert.equal(t.enqueue(a, 0, 512, false), -1, "table full");
  t.release(rmw);
  assert.ok(na.testAndClear(), "woken when an entry frees up");
  assert.ok(!nb.testAndClear(), "b was not waiting");
  t.unregister(a);
  t.unregister(b);
  na.close();
  nb.close();
});

Deno.test("the serialiser queues a conflicting request and resumes it from the event loop", () => {
  const ctx = new AioContext();
  const table = RangeLockTable.create();
  const a = new RequestSerialiser(ctx, table), b = new RequestSerialiser(ctx, table);
  const order: string[] = [];
  const req = (name: string, lo: number, hi: number, serialising: boolean): SerialisedRequest => ({
    lockLo: lo,
    lockHi: hi,
    serialising,
    lockEntry: -1,
    lockGranted: () => order.push(name),
  });
  const w = req("w", 0, 4096, false), rmw = req("rmw", 0, 4096, true);
  const w2 = req("w2", 512, 1024, false);
  assert.ok(a.begin(w)); // fast path
  assert.equal(table.entriesInUse, 0);
  assert.ok(!b.begin(rmw), "waits for the fast-path write");
  assert.ok(!a.begin(w2), "waits for the read-modify-write");
  assert.equal(ctx.poll(false), false);
  a.end(w);
  ctx.poll(false);
  assert.deepEqual(order, ["rmw"]);
  b.end(rmw);
  ctx.poll(false);
  assert.deepEqual(order, ["rmw", "w2"]);
  a.end(w2);
  assert.equal(table.entriesInUse, 0);
  assert.equal(table.serialising, 0);
  a.close();
  b.close();
  ctx.close();
});
