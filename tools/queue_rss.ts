/**
 * Measures what rings cost the host in resident memory: starts the host
 * (`dataplane/main.ts`, a separate process) with `--queues N --queue-size S`
 * over null-co, reads its VmRSS from /proc before a front-end connects, after
 * the built-in client has started every ring, after a burst of reads on
 * every queue (request slots warm), and after the client reconnects (every
 * ring restarted). Prints one JSON line.
 *
 * `deno run -A tools/queue_rss.ts [--queues 16] [--queue-size 1024] [--iothreads 2]`
 *
 * @module
 */

import { parseArgs } from "node:util";
import { VhostUserBlkClient } from "../client/blk_client.ts";

const a = parseArgs({
  args: Deno.args,
  options: {
    queues: { type: "string", default: "16" },
    "queue-size": { type: "string", default: "1024" },
    iothreads: { type: "string", default: "2" },
  },
}).values;
const queues = Number(a.queues), queueSize = Number(a["queue-size"]);
const dir = Deno.makeTempDirSync({ prefix: "queue-rss-" });
const socket = `${dir}/blk.sock`;
const root = new URL("..", import.meta.url).pathname;

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  if (!m) throw new Error("no VmRSS");
  return Math.round(Number(m[1]) / 102.4) / 10;
}

async function settle(): Promise<void> {
  await new Promise((r) => setTimeout(r, 500));
}

/** Keeps `depth` reads of 4 KiB in flight on every queue until `count` completed on each. */
async function burst(c: VhostUserBlkClient, depth: number, count: number): Promise<void> {
  const done = new Array(c.queues.length).fill(0);
  const sent = new Array(c.queues.length).fill(0);
  c.queues.forEach((q, qi) => {
    q.onComplete = (slot) => {
      done[qi]++;
      if (sent[qi] < count) {
        q.read(slot, 4096 * (sent[qi]++ % 256), 4096);
      }
    };
    for (let s = 0; s < depth; s++) q.read(s, 4096 * s, 4096), sent[qi]++;
    q.notify();
  });
  while (done.some((d) => d < count)) {
    await c.waitAsync();
    for (const q of c.queues) {
      q.reap();
      q.notify();
    }
  }
}

const cmd = new Deno.Command(`${root}/deno`, {
  args: [
    "run",
    "-A",
    "--no-check",
    `${root}/dataplane/main.ts`,
    "--image",
    "null-co:1G",
    "--socket",
    socket,
    "--queues",
    String(queues),
    "--iothreads",
    String(a.iothreads),
    "--queue-size",
    String(queueSize),
  ],
  stderr: "null",
  stdout: "null",
});
const child = cmd.spawn();
try {
  for (let i = 0; i < 200; i++) {
    try {
      Deno.statSync(socket);
      break;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  await settle();
  const idle = rssMiB(child.pid);
  const slots = Math.min(128, Math.floor(queueSize / 3));
  let c = await VhostUserBlkClient.connect(socket, { numQueues: queues, queueSize, slots });
  await settle();
  const started = rssMiB(child.pid);
  await burst(c, slots, 2000);
  await settle();
  const warm = rssMiB(child.pid);
  await c.close();
  c = await VhostUserBlkClient.connect(socket, { numQueues: queues, queueSize, slots });
  await burst(c, slots, 2000);
  await settle();
  const restarted = rssMiB(child.pid);
  await c.close();
  console.log(JSON.stringify({
    queues,
    queueSize,
    iothreads: Number(a.iothreads),
    inFlightPerQueue: slots,
    rssMiB: { idle, started, warm, restarted },
  }));
} finally {
  child.kill("SIGTERM");
  await child.status;
  Deno.removeSync(dir, { recursive: true });
}
