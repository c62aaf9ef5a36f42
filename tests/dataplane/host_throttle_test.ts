// The short host's `--throttle` (a QEMU throttle group over the whole
// export): the option's parsing and QEMU's checks, then a host with two
// queues on two IOThreads whose requests together keep to the limit.
import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../client/blk_client.ts";
import { VhostUserBlkHost } from "../../dataplane/host.ts";
import { parseHostArgs, UsageError } from "../../dataplane/host_options.ts";

const BASE = ["--image", "null-co:1M", "--socket", "/unused"];

Deno.test("host options: --throttle takes QEMU's limit names and checks", () => {
  const o = parseHostArgs([
    ...BASE,
    "--throttle",
    "iops-total=100,iops-total-max=400,iops-total-max-length=3,bps-read=1048576,iops-size=4096",
  ]);
  assert.deepEqual(o.throttle?.buckets["iops-total"], { avg: 100, max: 400, burstLength: 3 });
  assert.equal(o.throttle?.buckets["bps-read"].avg, 1048576);
  assert.equal(o.throttle?.iopsSize, 4096);
  assert.equal(parseHostArgs(BASE).throttle, undefined);
  const bad: [string, RegExp][] = [
    ["iops-total", /takes NAME=N/],
    ["iops-total=-1", /takes NAME=N/],
    ["iops-totally=1", /unknown limit 'iops-totally'/],
    ["bps-total-max=5", /--throttle: bps_max\/iops_max require corresponding bps\/iops values/],
    ["bps-total=1,bps-write=1", /cannot be used at the same time/],
    ["iops-read=10,iops-read-max-length=2", /burst length set without burst rate/],
  ];
  for (const [text, want] of bad) {
    assert.throws(() => parseHostArgs([...BASE, "--throttle", text]), (e: Error) => {
      assert(e instanceof UsageError, `${text}: ${e}`);
      assert.match(e.message, want);
      return true;
    });
  }
});

Deno.test("host --throttle: two queues on two IOThreads share one limit", async () => {
  const dir = await Deno.makeTempDir({ prefix: "host-throttle-" });
  const host = await VhostUserBlkHost.start(parseHostArgs([
    "--image",
    "null-co:1M",
    "--socket",
    `${dir}/blk.sock`,
    "--queues",
    "2",
    "--iothreads",
    "2",
    "--throttle",
    "iops-total=200",
  ]));
  let c: VhostUserBlkClient | null = null;
  try {
    c = await VhostUserBlkClient.connect(`${dir}/blk.sock`, { numQueues: 2, slots: 4 });
    const counts = [0, 0];
    let running = true;
    c.queues.forEach((q, qi) => {
      q.onComplete = (slot, status) => {
        assert.equal(status, 0);
        if (!running) return;
        counts[qi]++;
        q.read(slot, 0, 4096);
      };
      for (let s = 0; s < 4; s++) q.read(s, 0, 4096);
      q.notify();
    });
    const start = performance.now();
    while (performance.now() - start < 2000) {
      await c.waitAsync(20);
      for (const q of c.queues) {
        q.reap();
        q.notify();
      }
    }
    running = false;
    const seconds = (performance.now() - start) / 1000;
    const total = counts[0] + counts[1];
    // A bucket of 20 (+1), then 200 a second, whatever queue or thread asks.
    assert(total <= 21 + 200 * seconds + 8, `${total} in ${seconds} s`);
    assert(total >= 0.9 * 200 * seconds, `${total} in ${seconds} s`);
    assert(Math.min(...counts) >= 0.3 * total, `unfair: ${counts}`);
  } finally {
    await c?.close();
    await host.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
