/**
 * Resident memory per export of the multi-export daemon (issue 15): the
 * same qemu-storage-daemon command line with N null-co exports sharing one
 * `--object iothread` is run by `deno task host` (and by qsd, for
 * reference), for N = 1 and N = 16. For each, VmRSS is read 1 s after
 * every socket exists (idle), then after a front-end (the built-in client,
 * in this process) connected to every export, ran 256 4 KiB reads on it and
 * disconnected (used). Reports each figure and the cost of each export
 * beyond the first: (RSS(16) - RSS(1)) / 15.
 *
 * `flock /tmp/bench.lock ./deno run -A bench/daemon_memory.ts [--counts 1,16] [--no-qsd]`
 *
 * @module
 */

import { HOST_V8_FLAGS_ARG } from "../dataplane/mod.ts";
import { parseArgs } from "node:util";
import { VhostUserBlkClient } from "../client/mod.ts";
import { residentMemory } from "../sys/mod.ts";

const { values: a } = parseArgs({
  options: {
    counts: { type: "string", default: "1,16" },
    "no-qsd": { type: "boolean", default: false },
  },
});
const root = new URL("..", import.meta.url).pathname;

function argv(dir: string, n: number): string[] {
  const out = ["--object", "iothread,id=io0"];
  for (let i = 0; i < n; i++) {
    out.push(
      "--blockdev",
      `driver=null-co,node-name=n${i},size=67108864`,
      "--export",
      `type=vhost-user-blk,id=e${i},node-name=n${i},addr.type=unix,addr.path=${dir}/e${i}.sock,` +
        "writable=on,iothread=io0",
    );
  }
  return out;
}

function command(server: "ours" | "qsd", args: string[]): Deno.Command {
  const opts = { args, stdin: "null", stdout: "null", stderr: "null" } as const;
  if (server === "qsd") return new Deno.Command("qemu-storage-daemon", opts);
  return new Deno.Command(Deno.execPath(), {
    ...opts,
    args: [
      "run",
      "-A",
      HOST_V8_FLAGS_ARG,
      `${root}dataplane/main.ts`,
      ...args,
    ],
  });
}

async function waitForSockets(dir: string, n: number): Promise<void> {
  const end = Date.now() + 60_000;
  for (let i = 0; i < n; i++) {
    for (;;) {
      try {
        if (Deno.lstatSync(`${dir}/e${i}.sock`).isSocket) break;
      } catch { /* not yet */ }
      if (Date.now() > end) throw new Error(`e${i}.sock did not appear`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

async function measure(server: "ours" | "qsd", n: number) {
  const dir = Deno.makeTempDirSync({ prefix: "daemon-memory-" });
  const child = command(server, argv(dir, n)).spawn();
  try {
    await waitForSockets(dir, n);
    await new Promise((r) => setTimeout(r, 1000));
    const idle = residentMemory(child.pid).rssKiB;
    for (let i = 0; i < n; i++) {
      const c = await VhostUserBlkClient.connect(`${dir}/e${i}.sock`, { slots: 8 });
      for (let k = 0; k < 256; k++) {
        await c.execute(0, (q) => q.read(0, (k * 4096) % (1 << 20), 4096));
      }
      await c.close();
    }
    await new Promise((r) => setTimeout(r, 500));
    const used = residentMemory(child.pid).rssKiB;
    return { server, exports: n, idleMiB: idle / 1024, usedMiB: used / 1024 };
  } finally {
    child.kill("SIGTERM");
    await child.status;
    Deno.removeSync(dir, { recursive: true });
  }
}

const counts = a.counts!.split(",").map(Number);
const servers: ("ours" | "qsd")[] = a["no-qsd"] ? ["ours"] : ["ours", "qsd"];
for (const s of servers) {
  const rows = [];
  for (const n of counts) {
    const r = await measure(s, n);
    rows.push(r);
    console.log(JSON.stringify(r));
  }
  const first = rows[0], last = rows[rows.length - 1];
  if (last.exports > first.exports) {
    const per = (k: "idleMiB" | "usedMiB") =>
      ((last[k] - first[k]) / (last.exports - first.exports)).toFixed(2);
    console.log(
      `${s}: per export beyond the first: ${per("idleMiB")} MiB idle, ${per("usedMiB")} MiB used`,
    );
  }
}
