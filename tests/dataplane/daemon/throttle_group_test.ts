// Throttle groups through the daemon, in real time, with the built-in
// vhost-user-blk client keeping requests in flight: the IOPS and bandwidth
// measured in a steady window are within 10% of the limit; a burst runs at
// the burst rate for about max-length seconds, then at the average; QMP
// qom-set changes the measured rate at run time; two nodes in one group, on
// two IOThreads, share one limit. Every bound allows for a loaded machine:
// never above what the buckets allow over the time that really passed, and
// not far below. (The arithmetic itself: tests/block/throttle/.)
import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../../client/blk_client.ts";
import { parseDaemonArgs } from "../../../dataplane/daemon/daemon_args.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { QmpTestClient } from "./qmp_test_client.ts";

/**
 * Keeps `depth` reads (or writes) of `bytes` in flight on queue `qi` for
 * `ms`; returns the completion times (seconds from the start) and the
 * seconds that passed.
 */
/**
 * Requests each client keeps queued. Deep enough that the throttle, not the
 * client, sets the pace: the test process also runs the daemon's main loop,
 * and on a loaded machine it can stall for a few hundred ms; 32 requests held
 * at 200 IOPS are 160 ms of work queued in the filter (with 8, a stall showed
 * as 168 of 200 IOPS).
 */
const DEPTH = 32;

async function readFor(
  c: VhostUserBlkClient,
  ms: number,
  depth: number,
  bytes: number,
  op: "read" | "write" = "read",
  qi = 0,
): Promise<{ times: number[]; seconds: number }> {
  const q = c.queues[qi];
  const times: number[] = [];
  let errors = 0, inFlight = 0, running = true;
  const start = performance.now();
  const saved = q.onComplete;
  q.onComplete = (slot, status) => {
    inFlight--;
    if (!running) return;
    times.push((performance.now() - start) / 1000);
    if (status !== 0) errors++;
    q[op](slot, (slot * bytes) % (1 << 20), bytes);
    inFlight++;
  };
  for (let s = 0; s < depth; s++) {
    q[op](s, s * bytes, bytes);
    inFlight++;
  }
  q.notify();
  const end = start + ms;
  while (performance.now() < end) {
    await c.waitAsync(Math.ceil(Math.max(1, Math.min(20, end - performance.now()))));
    q.reap();
    q.notify();
  }
  running = false;
  const seconds = (performance.now() - start) / 1000;
  while (inFlight > 0) {
    await c.waitAsync(1000);
    q.reap();
  }
  q.onComplete = saved;
  assert.equal(errors, 0);
  return { times, seconds };
}

const inWindow = (t: number[], from: number, to: number) =>
  t.filter((x) => x >= from && x < to).length;

function near(measured: number, expected: number, what: string): void {
  if (Deno.env.get("THROTTLE_VERBOSE")) {
    console.log(`${what}: ${measured.toFixed(1)} (limit ${expected})`);
  }
  assert(
    Math.abs(measured - expected) <= 0.1 * expected,
    `${what}: ${measured.toFixed(1)}, expected ${expected} within 10%`,
  );
}

async function daemonWith(
  dir: string,
  argv: string[],
  exports: { id: string; node: string; iothread?: string; writable?: boolean; queues?: number }[],
): Promise<{ d: StorageDaemon; qmp: QmpTestClient; clients: VhostUserBlkClient[] }> {
  const d = new StorageDaemon();
  const args = parseDaemonArgs(argv);
  for (const o of args.options) {
    if (o.kind === "object") await d.objectAdd(o.spec);
    else if (o.kind === "blockdev") d.blockdevAdd(o.obj, o.keyval);
  }
  for (const e of exports) {
    await d.exportAdd({
      id: e.id,
      nodeName: e.node,
      addr: { type: "unix", path: `${dir}/${e.id}.sock` },
      writable: e.writable ?? false,
      writethrough: false,
      numQueues: e.queues ?? 1,
      logicalBlockSize: 512,
      iothread: e.iothread,
    });
  }
  d.chardevAdd({ id: "m0", path: `${dir}/qmp.sock`, wait: false });
  await d.monitorAdd("m0", false);
  const qmp = await QmpTestClient.connect(`${dir}/qmp.sock`);
  const clients: VhostUserBlkClient[] = [];
  for (const e of exports) {
    clients.push(
      await VhostUserBlkClient.connect(`${dir}/${e.id}.sock`, {
        slots: DEPTH,
        numQueues: e.queues ?? 1,
      }),
    );
  }
  return { d, qmp, clients };
}

Deno.test("throttle group: IOPS and bandwidth within 10% of the limit; qom-set changes them at run time", async () => {
  const dir = await Deno.makeTempDir({ prefix: "throttle-" });
  const { d, qmp, clients: [c] } = await daemonWith(dir, [
    "--object",
    "iothread,id=io0",
    "--object",
    "throttle-group,id=tg0,x-iops-total=200",
    "--blockdev",
    "driver=null-co,node-name=n0,size=1048576",
    "--blockdev",
    "driver=throttle,node-name=t0,throttle-group=tg0,file=n0",
  ], [{ id: "e0", node: "t0", iothread: "io0" }]);
  try {
    // 200 IOPS: a bucket of 20, then 200 a second.
    const r1 = await readFor(c, 3000, DEPTH, 4096);
    assert(
      r1.times.length <= 21 + 200 * r1.seconds + DEPTH,
      `${r1.times.length} in ${r1.seconds} s`,
    );
    near(inWindow(r1.times, 0.5, 3) / 2.5, 200, "IOPS at x-iops-total=200");

    // qom-set limits: 400 IOPS from now on.
    assert.deepEqual(
      await qmp.execute("qom-set", {
        path: "/objects/tg0",
        property: "limits",
        value: { "iops-total": 400 },
      }),
      { return: {} },
    );
    assert.equal(
      (await qmp.execute("qom-get", { path: "/objects/tg0", property: "x-iops-total" })).return,
      400,
    );
    const r2 = await readFor(c, 2500, DEPTH, 4096);
    near(inWindow(r2.times, 0.5, 2.5) / 2, 400, "IOPS after qom-set iops-total=400");

    // A bandwidth limit instead: 1 MiB/s of 16 KiB reads.
    await qmp.execute("qom-set", {
      path: "/objects/tg0",
      property: "limits",
      value: { "iops-total": 0, "bps-total": 1 << 20 },
    });
    const r3 = await readFor(c, 2500, DEPTH, 16384);
    const bytes = r3.times.length * 16384;
    assert(bytes <= (1 << 20) * (0.1 + r3.seconds) + 9 * 16384, `${bytes} B in ${r3.seconds} s`);
    near(inWindow(r3.times, 0.5, 2.5) * 16384 / 2, 1 << 20, "bytes/s at bps-total=1 MiB/s");

    // The QMP surface, as qemu-storage-daemon 7.2 answers it.
    const limits = (await qmp.execute("qom-get", { path: "tg0", property: "limits" }))
      .return as Record<string, number>;
    assert.equal(limits["bps-total"], 1 << 20);
    assert.equal(limits["iops-total"], 0);
    assert.equal(limits["iops-total-max-length"], 1);
    const err = async (cmd: string, args: Record<string, unknown>) =>
      ((await qmp.execute(cmd, args)).error as { desc: string }).desc;
    assert.equal(
      await err("qom-set", { path: "/objects/tg0", property: "x-iops-total", value: 5 }),
      "Property cannot be set after initialization",
    );
    assert.equal(
      await err("qom-set", {
        path: "/objects/tg0",
        property: "limits",
        value: { "bps-total": 10, "bps-total-max": 5 },
      }),
      "bps_max/iops_max cannot be lower than bps/iops",
    );
    assert.equal(
      (await qmp.execute("qom-get", { path: "tg0", property: "x-bps-total" })).return,
      1 << 20,
      "a refused qom-set changes nothing",
    );
    assert.equal(
      await err("qom-set", { path: "/objects/tg0", property: "limits", value: { nope: 1 } }),
      "Parameter 'limits.nope' is unexpected",
    );
    assert.equal(
      await err("qom-get", { path: "/objects/tg0", property: "x-nope" }),
      "Property 'throttle-group.x-nope' not found",
    );
    assert.equal(
      await err("qom-get", { path: "/objects/nope", property: "limits" }),
      "Device '/objects/nope' not found",
    );
    assert.equal(
      await err("object-del", { id: "tg0" }),
      "object 'tg0' is in use, can not be deleted",
    );
    assert.deepEqual(
      await qmp.execute("object-add", {
        "qom-type": "throttle-group",
        id: "tg1",
        limits: { "iops-read": 10 },
      }),
      { return: {} },
    );
    assert.equal(
      (await qmp.execute("qom-get", { path: "/objects/tg1", property: "x-iops-read" })).return,
      10,
    );
    // A node added over QMP holds the group until it is deleted.
    assert.deepEqual(
      await qmp.execute("blockdev-add", {
        driver: "throttle",
        "node-name": "t9",
        "throttle-group": "tg1",
        file: { driver: "null-co", size: 4096 },
      }),
      { return: {} },
    );
    assert.equal(
      await err("object-del", { id: "tg1" }),
      "object 'tg1' is in use, can not be deleted",
    );
    assert.equal(
      await err("blockdev-add", {
        driver: "throttle",
        "node-name": "t8",
        "throttle-group": "nope",
        file: { driver: "null-co", size: 4096 },
      }),
      "Throttle group 'nope' does not exist",
    );
    assert.deepEqual(await qmp.execute("blockdev-del", { "node-name": "t9" }), { return: {} });
    assert.deepEqual(await qmp.execute("object-del", { id: "tg1" }), { return: {} });
  } finally {
    qmp.close();
    await c.close();
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("throttle group: read and write limits are separate buckets", async () => {
  const dir = await Deno.makeTempDir({ prefix: "throttle-write-" });
  const { d, qmp, clients: [c] } = await daemonWith(dir, [
    "--object",
    "throttle-group,id=tg0,x-bps-write=1048576,x-iops-read=500",
    "--blockdev",
    "driver=null-co,node-name=n0,size=1048576",
    "--blockdev",
    "driver=throttle,node-name=t0,throttle-group=tg0,file=n0",
  ], [{ id: "e0", node: "t0", writable: true, queues: 2 }]);
  try {
    // 1 MiB/s of 16 KiB writes on queue 0 while queue 1 reads at 500/s (one
    // loop reaps both: the client is not made for two loops at once).
    const times: [number[], number[]] = [[], []];
    const ops = ["write", "read"] as const, sizes = [16384, 4096];
    let running = true;
    const start = performance.now();
    c.queues.forEach((q, qi) => {
      q.onComplete = (slot, status) => {
        assert.equal(status, 0);
        if (!running) return;
        times[qi].push((performance.now() - start) / 1000);
        q[ops[qi]](slot, slot * sizes[qi], sizes[qi]);
      };
      for (let s = 0; s < 8; s++) q[ops[qi]](s, s * sizes[qi], sizes[qi]);
      q.notify();
    });
    while (performance.now() - start < 2500) {
      await c.waitAsync(20);
      for (const q of c.queues) {
        q.reap();
        q.notify();
      }
    }
    running = false;
    const seconds = (performance.now() - start) / 1000;
    const [w, r] = times;
    near(inWindow(w, 0.5, 2.5) * 16384 / 2, 1 << 20, "write bytes/s at bps-write=1 MiB/s");
    assert(
      w.length * 16384 <= (1 << 20) * (0.1 + seconds) + 9 * 16384,
      `${w.length} writes in ${seconds} s`,
    );
    // Reads keep to their own limit, whatever the writes do.
    near(inWindow(r, 0.5, 2.5) / 2, 500, "read IOPS at iops-read=500");
  } finally {
    qmp.close();
    await c.close();
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("throttle group: a burst runs at max for about max-length seconds, then at the average", async () => {
  const dir = await Deno.makeTempDir({ prefix: "throttle-burst-" });
  const { d, qmp, clients: [c] } = await daemonWith(dir, [
    "--object",
    "throttle-group,id=tg0,x-iops-total=50,x-iops-total-max=200,x-iops-total-max-length=2",
    "--blockdev",
    "driver=null-co,node-name=n0,size=1048576",
    "--blockdev",
    "driver=throttle,node-name=t0,throttle-group=tg0,file=n0",
  ], [{ id: "e0", node: "t0" }]);
  try {
    const r = await readFor(c, 5000, DEPTH, 4096);
    // The bucket holds max * max-length = 400 and leaks at 50/s; the burst
    // bucket (max / 10) paces it at 200/s: full when 21 + 150 t = 400, at
    // t = 2.53 s. Then 50/s.
    near(inWindow(r.times, 0.2, 1.7) / 1.5, 200, "IOPS during the burst");
    near(inWindow(r.times, 3.2, 5) / 1.8, 50, "IOPS after the burst");
    const most = 21 + 200 * 2.53 + 50 * Math.max(0, r.seconds - 2.53) + DEPTH;
    assert(r.times.length <= most, `${r.times.length} > ${most}`);
  } finally {
    qmp.close();
    await c.close();
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("throttle group: two nodes on two IOThreads share the group's limit, round-robin", async () => {
  const dir = await Deno.makeTempDir({ prefix: "throttle-two-" });
  const { d, qmp, clients: [c0, c1] } = await daemonWith(dir, [
    "--object",
    "iothread,id=io0",
    "--object",
    "iothread,id=io1",
    "--object",
    '{"qom-type": "throttle-group", "id": "tg0", "limits": {"iops-total": 200}}',
    "--blockdev",
    "driver=null-co,node-name=n0,size=1048576",
    "--blockdev",
    "driver=null-co,node-name=n1,size=1048576",
    "--blockdev",
    "driver=throttle,node-name=t0,throttle-group=tg0,file=n0",
    "--blockdev",
    "driver=throttle,node-name=t1,throttle-group=tg0,file=n1",
  ], [{ id: "e0", node: "t0", iothread: "io0" }, { id: "e1", node: "t1", iothread: "io1" }]);
  try {
    const [r0, r1] = await Promise.all([
      readFor(c0, 3000, DEPTH, 4096),
      readFor(c1, 3000, DEPTH, 4096),
    ]);
    const seconds = Math.max(r0.seconds, r1.seconds);
    const total = r0.times.length + r1.times.length;
    assert(total <= 21 + 200 * seconds + 2 * DEPTH, `${total} in ${seconds} s`);
    const w0 = inWindow(r0.times, 0.5, 2.8), w1 = inWindow(r1.times, 0.5, 2.8);
    near((w0 + w1) / 2.3, 200, "IOPS of both nodes together");
    assert(w0 >= 0.3 * (w0 + w1) && w1 >= 0.3 * (w0 + w1), `unfair: ${w0} and ${w1}`);
  } finally {
    qmp.close();
    await c0.close();
    await c1.close();
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("throttle group: deleting an export releases what a low limit holds", async () => {
  const dir = await Deno.makeTempDir({ prefix: "throttle-stop-" });
  const { d, qmp, clients: [c] } = await daemonWith(dir, [
    "--object",
    "throttle-group,id=tg0,x-iops-total=1",
    "--blockdev",
    "driver=null-co,node-name=n0,size=1048576",
    "--blockdev",
    "driver=throttle,node-name=t0,throttle-group=tg0,file=n0",
  ], [{ id: "e0", node: "t0" }]);
  try {
    const q = c.queues[0];
    for (let s = 0; s < 8; s++) q.read(s, 0, 512);
    q.notify();
    await new Promise((r) => setTimeout(r, 200));
    // At 1 IOPS the last of 8 would wait ~7 s; the stop releases them.
    const t0 = performance.now();
    await d.exportDel("e0", true);
    assert(performance.now() - t0 < 3000, `stop took ${performance.now() - t0} ms`);
  } finally {
    qmp.close();
    await c.close().catch(() => {});
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
