// VhostUserBlkDevice under the VhostUserHandler (the main-thread side of the rings) against a fake
// IOThread whose calls the test completes, so the order of what the device
// does around a slow IOThread call is visible.

import assert from "node:assert/strict";
import type { IOThread } from "../../aio/mod.ts";
import { VhostUserBlkDevice } from "../../dataplane/vhost_user_blk_device.ts";
import { VhostUserHandler } from "../../vhost_user/mod.ts";
import { close, eventfd, ftruncate, isOpen, memfdCreate } from "../../sys/mod.ts";

const RAM = 1 << 20;

/** Records every call; blkStopQueue waits until the test opens `stopGate`. */
class FakeThread {
  readonly name = "fake-iothread";
  readonly calls: string[] = [];
  #open!: () => void;
  readonly stopGate = new Promise<void>((r) => this.#open = r);
  openStop(): void {
    this.#open();
  }
  async call<T>(fn: string, args?: unknown): Promise<T> {
    const a = args as { regions?: unknown } | undefined;
    this.calls.push(fn === "blkSetMemory" && a?.regions === null ? "blkSetMemory(null)" : fn);
    if (fn === "blkStopQueue") {
      await this.stopGate;
      this.calls.push("blkStopQueue done");
      return 7 as T;
    }
    return undefined as T;
  }
}

/** A device with one ring started on the fake thread; returns its fds. */
async function runningRing(t: FakeThread) {
  const dev = new VhostUserHandler(
    new VhostUserBlkDevice({
      device: { capacity: 2048, numQueues: 1 },
      iothreads: [t as unknown as IOThread],
    }),
  );
  const mfd = memfdCreate("dev-test");
  ftruncate(mfd, RAM);
  await dev.setMemTable([{
    guestPhysAddr: 0,
    size: RAM,
    userAddr: 0x10000000,
    mmapOffset: 0,
    fd: mfd,
  }]);
  close(mfd);
  dev.setVringNum(0, 64);
  dev.setVringAddr(0, {
    flags: 0,
    descUserAddr: 0x10000000,
    availUserAddr: 0x10000400,
    usedUserAddr: 0x10001000,
    logGuestAddr: 0,
  });
  const kickFd = eventfd(), callFd = eventfd(), errFd = eventfd();
  await dev.setVringCall(0, callFd);
  await dev.setVringErr(0, errFd);
  await dev.setVringKick(0, kickFd);
  assert.ok(t.calls.includes("blkStartQueue"));
  return { dev, kickFd, callFd, errFd };
}

// Issue 10 item 2a: reset() during a GET_VRING_BASE skipped the ring (already
// marked stopped), closed its call fd while the IOThread still completed the
// ring's requests into it, unmapped memory, and the GET_VRING_BASE closed the
// kick fd a second time when it resumed (a number reused meanwhile).
Deno.test("device: reset during GET_VRING_BASE waits for the stop before closing fds and dropping memory", async () => {
  const t = new FakeThread();
  const { dev, kickFd, callFd, errFd } = await runningRing(t);
  const base = dev.getVringBase(0);
  let resetDone = false;
  const reset = Promise.resolve(dev.reset()).then(() => resetDone = true);
  await new Promise((r) => setTimeout(r, 20));
  assert.ok(isOpen(callFd), "call fd closed while the ring's requests may still complete");
  assert.ok(isOpen(errFd), "err fd closed while the ring is stopping");
  assert.ok(!t.calls.includes("blkSetMemory(null)"), `memory dropped first: ${t.calls}`);
  assert.equal(resetDone, false);
  t.openStop();
  assert.equal(await base, 7);
  await reset;
  assert.ok(t.calls.indexOf("blkStopQueue done") < t.calls.indexOf("blkSetMemory(null)"));
  for (const fd of [kickFd, callFd, errFd]) assert.ok(!isOpen(fd), `fd ${fd} left open`);
  // Fds opened from now on take those numbers; nothing may close them.
  const fresh = [eventfd(), eventfd(), eventfd()];
  await new Promise((r) => setTimeout(r, 10));
  for (const fd of fresh) assert.ok(isOpen(fd), `fd ${fd} closed by a late ring operation`);
  for (const fd of fresh) close(fd);
});
