// Issue 10 items 2a, 2c, 2d: races and failures between the control plane
// (vhost-user messages on the main thread) and the rings running in an
// IOThread. Each case drives a real host with the built-in front-end.

import assert from "node:assert/strict";
import type { VhostUserBlkClient } from "../../client/blk_client.ts";
import { FrontendError } from "../../client/frontend.ts";
import {
  encodeMessage,
  VHOST_USER_GET_VRING_BASE,
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_VRING_ADDR,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_VERSION,
  VHOST_USER_VRING_NOFD_MASK,
} from "../../vhost_user/mod.ts";
import { close, eventfd } from "../../sys/mod.ts";
import {
  cacheNoneHost,
  connect,
  HostProcess,
  MiB,
  scratch,
  sleep,
  waitFor,
} from "./robustness_util.ts";

const IMAGE = 64 * MiB;
const BS = 1 * MiB;
const QD = 32;

/** Fills every slot of queue 0 with a 1 MiB write and kicks. */
function flood(c: VhostUserBlkClient): void {
  const q = c.queues[0];
  for (let s = 0; s < QD; s++) q.write(s, (s % (IMAGE / BS)) * BS, BS);
  q.notify();
}

// 2a: the front-end sends GET_VRING_BASE while requests are in flight and
// disconnects before the answer. The reset that follows the disconnect must
// wait for that ring's stop: before, it skipped the ring (already marked
// stopped), closed its call fd (the stopping queue's completions then wrote
// a closed or reused fd: EBADF killed the IOThread) and unmapped memory.
Deno.test("front-end disconnects while GET_VRING_BASE waits for in-flight requests: host survives, next connection works", async () => {
  const s = await scratch("robust-gvb-disc", IMAGE);
  const host = new HostProcess(cacheNoneHost(s, "threads", 1));
  try {
    await host.ready();
    const opts = { numQueues: 1, queueSize: 128, slots: QD, maxBlockSize: BS };
    for (let round = 0; round < 8; round++) {
      assert.ok(!host.exited, `host exited before round ${round}:\n${host.stderr}`);
      const c = await connect(s.socket, opts).catch(async (e) => {
        const st = host.exited ? await host.status : null;
        throw new Error(
          `round ${round}: ${e.message}; host ${
            st ? `exited (signal ${st.signal}, code ${st.code})` : "running"
          }:\n${host.stderr}`,
        );
      });
      if (round % 2 === 1) {
        // No call fd (a polling driver): nothing fails early on a closed fd,
        // so a completion into unmapped memory shows as SIGSEGV.
        await c.frontend.request(VHOST_USER_SET_VRING_CALL, {
          kind: "u64",
          value: BigInt(VHOST_USER_VRING_NOFD_MASK),
        });
      }
      flood(c);
      await sleep(1);
      await c.frontend.sendRaw(
        encodeMessage(VHOST_USER_GET_VRING_BASE, VHOST_USER_VERSION, {
          kind: "vringState",
          index: 0,
          num: 0,
        }),
      );
      await sleep(round % 4);
      c.frontend.close(); // gone before the reply
      await c.close();
      assert.ok(!host.exited, `host exited in round ${round}:\n${host.stderr}`);
    }
    const last = await connect(s.socket, opts);
    try {
      assert.equal(await last.execute(0, (q) => q.read(0, 0, 4096), 20000), 0);
    } finally {
      await last.close();
    }
    await host.stopCleanly();
    assert.doesNotMatch(
      host.stderr,
      /event loop died|fatal:|EBADF|EINVAL|ring broken/,
      host.stderr,
    );
  } finally {
    await host.stop("SIGKILL", 15000);
    await s.remove();
  }
});

// 2c: a SET_VRING_KICK the host refuses on a running ring changed nothing
// but closed the old kick fd, which the IOThread still polled: the ring then
// never saw another kick (or read an fd number reused meanwhile), and a
// refusal from the IOThread (ring outside memory) had stopped the ring.
Deno.test("a refused SET_VRING_KICK on a running ring leaves it running on its old kick fd", async () => {
  const s = await scratch("robust-kick-refused", IMAGE);
  const host = new HostProcess(cacheNoneHost(s, "threads", 1));
  try {
    await host.ready();
    const c = await connect(s.socket, { numQueues: 1, queueSize: 64, slots: 8 });
    try {
      const fe = c.frontend;
      let served = 0;
      const read = async (what: string) => {
        const st = await c.execute(0, (q) => q.read(0, 0, 4096), 3000).catch((e) => {
          throw new Error(`${what}: ${e.message}\n${host.stderr}`);
        });
        assert.equal(st, 0, what);
        served++;
      };
      await read("before");
      // Refused by the device: NOFD (polling) is not supported.
      await assert.rejects(
        fe.request(VHOST_USER_SET_VRING_KICK, {
          kind: "u64",
          value: BigInt(VHOST_USER_VRING_NOFD_MASK),
        }),
        FrontendError,
      );
      await read("after a refused NOFD kick");
      // Refused by the IOThread: the ring's new addresses are outside guest memory.
      const ring = c.queues[0].ring;
      const addr = (base: bigint) => ({
        kind: "vringAddr" as const,
        index: 0,
        flags: 0,
        descUserAddr: base + BigInt(ring.desc.addr),
        usedUserAddr: base + BigInt(ring.used.addr),
        availUserAddr: base + BigInt(ring.avail.addr),
        logGuestAddr: 0n,
      });
      await fe.request(VHOST_USER_SET_VRING_ADDR, addr(1n << 40n));
      const refused = eventfd();
      await assert.rejects(
        fe.request(VHOST_USER_SET_VRING_KICK, { kind: "u64", value: 0n }, [refused]),
        FrontendError,
      );
      close(refused);
      await read("after a kick the IOThread refused");
      await fe.request(VHOST_USER_SET_VRING_ADDR, addr(0n));
      assert.deepEqual(await c.stopQueues(), [served], "the ring's position is kept");
    } finally {
      await c.close();
    }
    assert.ok(!host.exited, host.stderr);
    await host.stopCleanly();
    assert.doesNotMatch(host.stderr, /event loop died|fatal:|EBADF/, host.stderr);
  } finally {
    await host.stop("SIGKILL", 15000);
    await s.remove();
  }
});

// 2d: a SET_MEM_TABLE an IOThread refused (it does not hold a running ring)
// dropped every IOThread's queues while the rings stayed started; the next
// SET_VRING_KICK then restarted them from avail index 0 and replayed the
// requests already answered (used idx 3 -> 6 with no new request).
Deno.test("a refused SET_MEM_TABLE on running rings changes nothing: no request is replayed", async () => {
  const s = await scratch("robust-memtable-refused", IMAGE);
  const host = new HostProcess(cacheNoneHost(s, "threads", 1));
  try {
    await host.ready();
    const c = await connect(s.socket, { numQueues: 1, queueSize: 64, slots: 8 });
    try {
      const fe = c.frontend;
      const q = c.queues[0];
      const usedIdx = () => {
        const u = q.ring.used.bytes;
        return new DataView(u.buffer, u.byteOffset, 4).getUint16(2, true);
      };
      // Three reads on three slots (three descriptor chains), all answered.
      for (let i = 0; i < 3; i++) q.read(i, 4096 * i, 4096);
      q.notify();
      assert.ok(await waitFor(() => usedIdx() === 3, 5000), "3 reads answered");
      q.reap();
      const ram = c.ram!;
      const table = (rs: typeof ram.regions) => ({
        kind: "memTable" as const,
        regions: rs.map((r) => ({
          guestPhysAddr: BigInt(r.guestPhysAddr),
          size: BigInt(r.size),
          userAddr: BigInt(r.userAddr),
          mmapOffset: BigInt(r.mmapOffset),
        })),
      });
      // Only the data region: the rings (in region 0) are not in it.
      const dataOnly = ram.regions.slice(1);
      await assert.rejects(
        fe.request(VHOST_USER_SET_MEM_TABLE, table(dataOnly), dataOnly.map(() => ram.fd)),
        FrontendError,
      );
      // The same table again, and the same kick eventfd again (no SET_VRING_BASE).
      await fe.request(VHOST_USER_SET_MEM_TABLE, table(ram.regions), ram.regions.map(() => ram.fd));
      await fe.request(VHOST_USER_SET_VRING_KICK, { kind: "u64", value: 0n }, [q.kickFd]);
      q.notify();
      await sleep(300);
      assert.equal(usedIdx(), 3, "requests replayed with no new request");
      assert.equal(await c.execute(0, (q) => q.read(0, 0, 4096), 5000), 0);
      assert.equal(usedIdx(), 4);
      assert.deepEqual(await c.stopQueues(), [4]);
    } finally {
      await c.close();
    }
    await host.stopCleanly();
    assert.doesNotMatch(host.stderr, /event loop died|fatal:/, host.stderr);
  } finally {
    await host.stop("SIGKILL", 15000);
    await s.remove();
  }
});
