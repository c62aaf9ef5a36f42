import assert from "node:assert/strict";
import { errnoRace } from "./fixtures/errno_race.ts";

// The race that killed IOThreads ("epoll_wait: EAGAIN"): reading errno through
// a Deno op can wait on a lock another Worker holds, and that futex(2) wait
// overwrites errno. Through the op getter it misread ~3 times a second here;
// lastErrno (a plain load) must never misread. The op getter's count is
// printed to show the contention happened (it is not asserted: it is a race).
Deno.test("errno: lastErrno is never clobbered while other Workers make pointer ops", async () => {
  const r = await errnoRace(3000, 1);
  console.log(
    `errno race: ${r.calls} reads, lastErrno misreads ${r.misreadsLastErrno}, ` +
      `op getter misreads ${r.misreadsOpGetter} ${JSON.stringify(r.wrong)}`,
  );
  assert.ok(r.calls > 100_000, `too few reads to mean anything: ${r.calls}`);
  assert.equal(r.misreadsLastErrno, 0);
});
