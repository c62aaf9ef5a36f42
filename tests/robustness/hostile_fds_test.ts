// Issue 10, 2b and 2e: fds a hostile front-end sends. Ring fds
// (SET_VRING_KICK/CALL/ERR) that are not eventfds, and SET_MEM_TABLE fds
// whose size cannot be checked, used to crash or hang the host: a call fd
// that is a pipe's read end (EBADF at the first completion: the host exits),
// a call or err fd that is a full blocking pipe (the IOThread or the main
// thread blocks in write(2) forever), a kick fd that is a pipe at EOF
// (level-triggered readiness burns a core), a block device as guest memory
// (SIGBUS). The host runs as a separate process, so a crash is an exit
// status and a hang is a request that is never answered. Each case checks
// first what used to break (the host lives, answers, stays idle), then that
// the message was refused, then that the next front-end is served.

import assert from "node:assert/strict";
import type { VhostUserBlkClient } from "../../client/blk_client.ts";
import { FrontendError } from "../../client/frontend.ts";
import { GuestRam } from "../../client/guest_ram.ts";
import {
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_ERR,
  VHOST_USER_SET_VRING_KICK,
} from "../../vhost_user/mod.ts";
import {
  close,
  EAGAIN,
  eventfd,
  O_RDWR,
  open,
  pipe,
  setNonBlocking,
  SysError,
  write,
} from "../../sys/mod.ts";
import { skipWithoutLoop, withLoopDevice } from "../block/loop_device.ts";
import {
  assertReadWorks,
  cacheNoneHost,
  connect,
  HostProcess,
  MiB,
  scratch,
  sleep,
} from "./robustness_util.ts";

const OPTS = { numQueues: 1, queueSize: 64, slots: 8 };
/** How long a request may take before it counts as never answered. */
const ANSWER_MS = 5000;

/** Runs `fn` against a fresh host, then requires that a new front-end is served and SIGTERM works. */
async function withHost(
  name: string,
  fn: (host: HostProcess, socket: string) => Promise<void>,
): Promise<void> {
  const s = await scratch(`robust-fds-${name}`, 16 * MiB);
  const host = new HostProcess(cacheNoneHost(s, "threads", 1));
  try {
    await host.ready();
    await fn(host, s.socket);
    await assertAlive(host);
    const next = await connect(s.socket, OPTS);
    try {
      await assertReadWorks(next, 0);
    } finally {
      await next.close();
    }
    await host.stopCleanly();
  } finally {
    await host.stop("SIGKILL", 15000);
    await s.remove();
  }
}

async function assertAlive(host: HostProcess): Promise<void> {
  if (!host.exited) return;
  const st = await host.status;
  assert.fail(`the host exited (code ${st.code}, signal ${st.signal}):\n${host.stderr}`);
}

/** Sends a one-fd ring message (index 0); resolves with the error it got, or null when acked. */
async function sendRingFd(
  c: VhostUserBlkClient,
  request: number,
  fd: number,
): Promise<FrontendError | null> {
  try {
    await c.frontend.request(request, { kind: "u64", value: 0n }, [fd]);
    return null;
  } catch (e) {
    if (e instanceof FrontendError) return e;
    throw e;
  }
}

function assertRefused(e: FrontendError | null, what: string): void {
  assert(e !== null, `${what} was accepted`);
  assert.equal(e.kind, "nack", `${what}: ${e.message}`);
}

/** A blocking pipe whose buffer is full: [readFd, writeFd]. */
function fullBlockingPipe(): [number, number] {
  const [r, w] = pipe();
  setNonBlocking(w, true);
  const chunk = new Uint8Array(65536);
  for (;;) {
    try {
      write(w, chunk);
    } catch (e) {
      if (e instanceof SysError && e.errno === EAGAIN) break;
      throw e;
    }
  }
  setNonBlocking(w, false);
  return [r, w];
}

/** CPU time (user + system) of process `pid` in seconds. */
function cpuSeconds(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(f[11]) + Number(f[12])) / 100; // utime, stime (fields 14, 15) in USER_HZ
}

Deno.test("hostile fds: a call fd that is a pipe's read end is refused (was: EBADF, host exits)", async () => {
  await withHost("call-pipe", async (host, socket) => {
    const c = await connect(socket, OPTS);
    const [r, w] = pipe();
    try {
      const e = await sendRingFd(c, VHOST_USER_SET_VRING_CALL, r);
      // The first completion signals the call fd.
      await c.execute(0, (q) => q.read(0, 0, 4096), ANSWER_MS).catch(() => {});
      await sleep(300);
      await assertAlive(host);
      assertRefused(e, "SET_VRING_CALL with a pipe");
      await assertReadWorks(c, 0); // the ring still has its eventfd
    } finally {
      await c.close();
      close(r);
      close(w);
    }
  });
});

Deno.test("hostile fds: a call fd that is a full blocking pipe is refused (was: IOThread blocked)", async () => {
  await withHost("call-full", async (host, socket) => {
    const c = await connect(socket, OPTS);
    c.frontend.timeoutMs = ANSWER_MS;
    const [r, w] = fullBlockingPipe();
    try {
      const e = await sendRingFd(c, VHOST_USER_SET_VRING_CALL, w);
      // The first read completes before the IOThread writes the call fd;
      // a blocked IOThread leaves the second unanswered.
      await c.execute(0, (q) => q.read(0, 0, 4096), ANSWER_MS).catch(() => {});
      const st = await c.execute(0, (q) => q.read(0, 4096, 4096), ANSWER_MS);
      assert.equal(st, 0);
      await assertAlive(host);
      assertRefused(e, "SET_VRING_CALL with a full pipe");
    } finally {
      await c.close();
      close(r);
      close(w);
    }
  });
});

Deno.test("hostile fds: an err fd that is a full blocking pipe is refused (was: main thread blocked)", async () => {
  await withHost("err-full", async (host, socket) => {
    const c = await connect(socket, { ...OPTS, negotiateOnly: true });
    c.frontend.timeoutMs = ANSWER_MS;
    const [r, w] = fullBlockingPipe();
    const kick = eventfd();
    try {
      const e = await sendRingFd(c, VHOST_USER_SET_VRING_ERR, w);
      // A kick before SET_VRING_NUM/ADDR fails, and the failure is signalled
      // on the err fd: from the main thread, which must still answer.
      const k = await sendRingFd(c, VHOST_USER_SET_VRING_KICK, kick);
      assert(k !== null && k.kind === "nack", `SET_VRING_KICK not refused in time: ${k?.message}`);
      await assertAlive(host);
      assertRefused(e, "SET_VRING_ERR with a full pipe");
    } finally {
      await c.close();
      close(r);
      close(w);
    }
  });
});

Deno.test("hostile fds: a kick fd that is a pipe at EOF is refused (was: a core burnt)", async () => {
  await withHost("kick-eof", async (host, socket) => {
    const c = await connect(socket, OPTS);
    const [r, w] = pipe();
    close(w); // readable (EOF) forever
    try {
      const e = await sendRingFd(c, VHOST_USER_SET_VRING_KICK, r);
      await sleep(200);
      const before = cpuSeconds(host.pid);
      await sleep(1000);
      const used = cpuSeconds(host.pid) - before;
      assert(used < 0.3, `the idle host used ${used.toFixed(2)} s of CPU in 1 s`);
      await assertAlive(host);
      assertRefused(e, "SET_VRING_KICK with a pipe");
      await assertReadWorks(c, 0); // the ring still has its eventfd
    } finally {
      await c.close();
      close(r);
    }
  });
});

Deno.test("hostile fds: ring fds that are sockets, memfds or files are refused", async () => {
  await withHost("kinds", async (host, socket) => {
    const c = await connect(socket, OPTS);
    try {
      const candidates: [string, number][] = [
        ["socket", c.frontend.fd],
        ["memfd", c.ram!.fd],
        ["file", open("/dev/null", O_RDWR)],
      ];
      for (const req of [VHOST_USER_SET_VRING_KICK, VHOST_USER_SET_VRING_CALL]) {
        for (const [what, fd] of candidates) {
          assertRefused(await sendRingFd(c, req, fd), `ring fd ${req} that is a ${what}`);
        }
      }
      close(candidates[2][1]);
      await assertReadWorks(c, 0);
      await assertAlive(host);
    } finally {
      await c.close();
    }
  });
});

Deno.test({
  name: "hostile fds: a block device as guest memory is refused (was: SIGBUS)",
  ignore: skipWithoutLoop("hostile fds: block device memory"),
  fn: async () => {
    await withHost("mem-blockdev", async (host, socket) => {
      // An empty loop device: mmap succeeds, every access faults.
      await withLoopDevice(0, async (device) => {
        const c = await connect(socket, { ...OPTS, negotiateOnly: true });
        const dev = open(device, O_RDWR);
        try {
          c.ram = GuestRam.create(4 * MiB, 2);
          const regions = c.ram.regions.map((r) => ({
            guestPhysAddr: BigInt(r.guestPhysAddr),
            size: BigInt(r.size),
            userAddr: BigInt(r.userAddr),
            mmapOffset: BigInt(r.mmapOffset),
          }));
          let err: unknown = null;
          try {
            await c.frontend.request(
              VHOST_USER_SET_MEM_TABLE,
              { kind: "memTable", regions },
              regions.map(() => dev),
            );
            // Accepted: starting a ring reads it from "guest memory".
            await c.setupQueues();
          } catch (e) {
            err = e;
          }
          await sleep(300);
          await assertAlive(host);
          assert(err instanceof FrontendError && err.kind === "nack", `not refused: ${err}`);
          assert.match(host.stderr, /not a regular file or memfd/);
        } finally {
          await c.close();
          close(dev);
        }
      });
    });
  },
});
