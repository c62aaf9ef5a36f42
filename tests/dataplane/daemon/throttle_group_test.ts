// Throttle groups in the daemon, in real time: `--object throttle-group`
// with `x-iops-total`, a `driver=throttle` node over null-co, exported; a
// front-end keeping 8 reads in flight gets the limit (within 10% over 5 s),
// then QMP qom-set raises it and the next 5 s follow the new limit; a
// bandwidth limit holds the same way. (Bursts and the bucket arithmetic are
// checked on a virtual clock in tests/block/throttle_test.ts.) And the
// group's QMP surface: qom-get, bad values, object-del while in use.
import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../../client/blk_client.ts";
import { parseDaemonArgs } from "../../../dataplane/daemon/daemon_args.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { QmpTestClient } from "./qmp_test_client.ts";
import { noThrottle } from "../../../block/mod.ts";

/** Keeps `depth` reads of `bytes` in flight on queue 0 for `ms`; returns those completed in the window. */
async function readFor(
  c: VhostUserBlkClient,
  ms: number,
  depth: number,
  bytes: number,
): Promise<{ ops: number; errors: number }> {
  const q = c.queues[0];
  let ops = 0, errors = 0, inFlight = 0, running = true;
  const saved = q.onComplete;
  q.onComplete = (slot, status) => {
    inFlight--;
    if (running) {
      ops++;
      if (status !== 0) errors++;
      q.read(slot, (slot * bytes) % (1 << 20), bytes);
      inFlight++;
    }
  };
  for (let s = 0; s < depth; s++) {
    q.read(s, s * bytes, bytes);
    inFlight++;
  }
  q.notify();
  const end = Date.now() + ms;
  while (Date.now() < end) {
    await c.waitAsync(Math.max(1, Math.min(50, end - Date.now())));
    q.reap();
    q.notify();
  }
  running = false;
  while (inFlight > 0) {
    await c.waitAsync(1000);
    q.reap();
  }
  q.onComplete = saved;
  return { ops, errors };
}

Deno.test("throttle group: the limit holds over 5 s, qom-set changes it at run time", async () => {
  const dir = await Deno.makeTempDir({ prefix: "throttle-" });
  const d = new StorageDaemon();
  let c: VhostUserBlkClient | null = null;
  let qmp: QmpTestClient | null = null;
  try {
    // The command line's form, applied as the daemon does.
    const args = parseDaemonArgs([
      "--object",
      "throttle-group,id=tg0,x-iops-total=200",
      "--blockdev",
      "driver=null-co,node-name=n0,size=1048576",
      "--blockdev",
      "driver=throttle,node-name=t0,throttle-group=tg0,file=n0",
    ]);
    for (const o of args.options) {
      if (o.kind === "object") await d.objectAdd(o.spec);
      else if (o.kind === "blockdev") d.blockdevAdd(o.obj, o.keyval);
    }
    await d.exportAdd({
      id: "e0",
      nodeName: "t0",
      addr: { type: "unix", path: `${dir}/e0.sock` },
      writable: false,
      writethrough: false,
      numQueues: 1,
      logicalBlockSize: 512,
    });
    d.chardevAdd({ id: "m0", path: `${dir}/qmp.sock`, wait: false });
    await d.monitorAdd("m0", false);
    qmp = await QmpTestClient.connect(`${dir}/qmp.sock`);
    c = await VhostUserBlkClient.connect(`${dir}/e0.sock`, { slots: 8 });

    const r1 = await readFor(c, 5000, 8, 4096);
    assert.equal(r1.errors, 0);
    // 200/s for 5 s (+ the bucket's 21 at the start).
    assert(Math.abs(r1.ops - 1000) <= 100, `iops 200: ${r1.ops} in 5 s`);

    assert.deepEqual(
      await qmp.execute("qom-set", { path: "tg0", property: "x-iops-total", value: 400 }),
      { return: {} },
    );
    assert.equal(
      (await qmp.execute("qom-get", { path: "/objects/tg0", property: "x-iops-total" })).return,
      400,
    );
    const r2 = await readFor(c, 5000, 8, 4096);
    assert(Math.abs(r2.ops - 2000) <= 200, `iops 400: ${r2.ops} in 5 s`);

    // A bandwidth limit instead: 1 MiB/s of 64 KiB reads, over 4 s.
    assert.deepEqual(
      await qmp.execute("qom-set", {
        path: "tg0",
        property: "limits",
        value: { "iops-total": 0, "bps-total": 1 << 20 },
      }),
      { return: {} },
    );
    const r3 = await readFor(c, 4000, 8, 65536);
    const mib = r3.ops * 65536 / (1 << 20);
    assert(Math.abs(mib - 4) <= 0.4 + 0.2, `1 MiB/s: ${mib.toFixed(2)} MiB in 4 s`);

    // The QMP surface.
    const limits = (await qmp.execute("qom-get", { path: "tg0", property: "limits" }))
      .return as Record<string, number>;
    assert.equal(limits["bps-total"], 1 << 20);
    assert.equal(limits["iops-total"], 0);
    assert.match(
      ((await qmp.execute("qom-set", { path: "tg0", property: "x-iops-total", value: -1 }))
        .error as { desc: string }).desc,
      /must be within/,
    );
    assert.match(
      ((await qmp.execute("qom-set", { path: "tg0", property: "x-nope", value: 1 }))
        .error as { desc: string }).desc,
      /Property 'throttle-group.x-nope' not found/,
    );
    assert.match(
      ((await qmp.execute("qom-get", { path: "nope", property: "limits" }))
        .error as { desc: string }).desc,
      /not found/,
    );
    assert.match(
      ((await qmp.execute("object-del", { id: "tg0" })).error as { desc: string }).desc,
      /in use/,
    );
  } finally {
    qmp?.close();
    await c?.close();
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("throttle group: stopping an export releases the requests a low limit holds", async () => {
  const dir = await Deno.makeTempDir({ prefix: "throttle-stop-" });
  const d = new StorageDaemon();
  let c: VhostUserBlkClient | null = null;
  try {
    await d.objectAdd({ qomType: "throttle-group", id: "tg0", config: oneIops() });
    d.blockdevAdd({ driver: "null-co", "node-name": "n0", size: 1 << 20 }, false);
    d.blockdevAdd(
      { driver: "throttle", "node-name": "t0", "throttle-group": "tg0", file: "n0" },
      false,
    );
    await d.exportAdd({
      id: "e0",
      nodeName: "t0",
      addr: { type: "unix", path: `${dir}/e0.sock` },
      writable: false,
      writethrough: false,
      numQueues: 1,
      logicalBlockSize: 512,
    });
    c = await VhostUserBlkClient.connect(`${dir}/e0.sock`, { slots: 8 });
    const q = c.queues[0];
    for (let s = 0; s < 8; s++) q.read(s, 0, 512);
    q.notify();
    await new Promise((r) => setTimeout(r, 200));
    // At 1 IOPS the last of 8 would wait ~7 s; the stop releases them.
    const t0 = Date.now();
    await d.exportDel("e0", true);
    assert(Date.now() - t0 < 3000, `stop took ${Date.now() - t0} ms`);
  } finally {
    await c?.close().catch(() => {});
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

function oneIops() {
  const c = noThrottle();
  c.buckets["iops-total"].avg = 1;
  return c;
}
