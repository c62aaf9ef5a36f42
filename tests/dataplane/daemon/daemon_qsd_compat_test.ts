// The same qemu-storage-daemon command line, word for word, run by
// qemu-storage-daemon 7.2 and by `deno task host` (only the program
// changes): two exports (a raw window over a file, writable, 2 queues, in
// an IOThread; a read-only null-co with 4 KiB blocks behind a throttle
// group, in the main loop), a
// QMP monitor and a pidfile. The built-in client then sees the same thing
// from both: capacity, block size, queues, read-only, GET_ID, data landing
// at the raw window's offset in the file, errors past the end and on the
// read-only export, the same exports over QMP, the pid in the pidfile.
import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../../client/blk_client.ts";
import { VIRTIO_BLK_S_OK } from "../../../client/virtio_blk_defs.ts";
import { makeScratchDir, ServerProcess } from "../../harness/mod.ts";
import { QmpTestClient } from "./qmp_test_client.ts";

const MiB = 1 << 20;
const MAIN = new URL("../../../dataplane/main.ts", import.meta.url).href;

function qsdArgv(dir: string, image: string): string[] {
  return [
    "--blockdev",
    `driver=file,node-name=f0,filename=${image},cache.direct=off,aio=threads,discard=unmap`,
    "--blockdev",
    "driver=raw,node-name=r0,file=f0,offset=1048576,size=4194304",
    "--blockdev",
    '{"driver": "null-co", "node-name": "n0", "size": 8388608, "read-zeroes": true}',
    "--object",
    "iothread,id=io0,poll-max-ns=0,poll-grow=2,poll-shrink=2,aio-max-batch=8",
    "--object",
    "throttle-group,id=tg0,x-iops-total=100000,limits.bps-total=1073741824",
    "--blockdev",
    "driver=throttle,node-name=t0,throttle-group=tg0,file=n0",
    "--export",
    `type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=${dir}/e0.sock,` +
    "writable=on,num-queues=2,iothread=io0",
    "--export",
    `type=vhost-user-blk,id=e1,node-name=t0,addr.type=unix,addr.path=${dir}/e1.sock,` +
    "logical-block-size=4096",
    "--chardev",
    `socket,id=m0,path=${dir}/qmp.sock,server=on,wait=off`,
    "--monitor",
    "chardev=m0",
    "--pidfile",
    `${dir}/daemon.pid`,
  ];
}

async function waitFor(paths: string[], proc: ServerProcess, ms = 20_000): Promise<void> {
  for (const p of paths) {
    if (!await proc.waitForSocket(p, ms)) throw new Error(`no ${p}: ${proc.stderr}`);
  }
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    try {
      if (Deno.readTextFileSync(paths[0].replace(/e0\.sock$/, "daemon.pid")).trim() !== "") return;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** What a client and a monitor see of the daemon. */
async function observe(dir: string, image: string, pid: number): Promise<Record<string, unknown>> {
  const seen: Record<string, unknown> = {};
  const c0 = await VhostUserBlkClient.connect(`${dir}/e0.sock`, { numQueues: 2, slots: 4 });
  try {
    seen.e0 = {
      capacity: c0.config.capacity,
      numQueues: c0.config.numQueues,
      readOnly: c0.readOnly,
    };
    const q = c0.queues[1];
    q.data(0).fill(0x5a, 0, 8192);
    seen.e0Write = await c0.execute(1, (b) => b.write(0, 4096, 8192));
    seen.e0Flush = await c0.execute(0, (b) => b.flush(0));
    seen.e0PastEnd = await c0.execute(0, (b) => b.read(0, 4 * MiB, 4096));
    seen.e0GetId = await c0.execute(0, (b) => b.getId(0));
    seen.e0Id = new TextDecoder().decode(c0.queues[0].data(0).subarray(0, 20)).replace(/\0.*$/, "");
  } finally {
    await c0.close();
  }
  const file = Deno.readFileSync(image);
  seen.fileWindow = [file[MiB + 4096], file[MiB + 4096 + 8191], file[4096], file[MiB + 4095]];
  const c1 = await VhostUserBlkClient.connect(`${dir}/e1.sock`, { slots: 4 });
  try {
    seen.e1 = {
      capacity: c1.config.capacity,
      blkSize: c1.config.blkSize,
      readOnly: c1.readOnly,
    };
    c1.queues[0].data(0).fill(0xff, 0, 4096);
    seen.e1Read = await c1.execute(0, (b) => b.read(0, 0, 4096));
    seen.e1Zeroes = c1.queues[0].data(0).subarray(0, 4096).every((b) => b === 0);
    seen.e1Write = await c1.execute(0, (b) => b.write(0, 0, 4096));
  } finally {
    await c1.close();
  }
  const qmp = await QmpTestClient.connect(`${dir}/qmp.sock`);
  try {
    const ex = await qmp.execute("query-block-exports");
    seen.exports = (ex.return as { id: string; "node-name": string; type: string }[])
      .map((e) => `${e.id}:${e["node-name"]}:${e.type}`).sort();
    const nodes = await qmp.execute("query-named-block-nodes");
    seen.nodes = (nodes.return as {
      "node-name": string;
      drv: string;
      ro: boolean;
      image: { "virtual-size": number };
    }[]).map((n) => `${n["node-name"]}:${n.drv}:${n.image["virtual-size"]}:${n.ro}`).sort();
    seen.unknown = (await qmp.execute("no-such-command")).error;
    // The throttle group over QOM: its limits, a change, a refused x- property, an in-use object.
    seen.limits = (await qmp.execute("qom-get", { path: "/objects/tg0", property: "limits" }))
      .return;
    seen.qomSet = await qmp.execute("qom-set", {
      path: "/objects/tg0",
      property: "limits",
      value: { "iops-total": 5000, "iops-total-max": 10000, "iops-total-max-length": 5 },
    });
    seen.afterSet = (await qmp.execute("qom-get", { path: "tg0", property: "x-iops-total-max" }))
      .return;
    seen.qomSetX = await qmp.execute("qom-set", {
      path: "/objects/tg0",
      property: "x-iops-total",
      value: 1,
    });
    seen.qomBad = await qmp.execute("qom-set", {
      path: "/objects/tg0",
      property: "limits",
      value: { "bps-total-max": 1 },
    });
    seen.objectDel = await qmp.execute("object-del", { id: "tg0" });
  } finally {
    qmp.close();
  }
  seen.pidfile = Deno.readTextFileSync(`${dir}/daemon.pid`).trim() === String(pid);
  return seen;
}

async function runWith(
  dir: string,
  start: (argv: string[]) => ServerProcess,
): Promise<Record<string, unknown>> {
  const image = `${dir}/disk.raw`;
  Deno.writeFileSync(image, new Uint8Array(0));
  Deno.truncateSync(image, 8 * MiB);
  const proc = start(qsdArgv(dir, image));
  try {
    await waitFor([`${dir}/e0.sock`, `${dir}/e1.sock`, `${dir}/qmp.sock`], proc);
    return await observe(dir, image, proc.pid);
  } finally {
    const status = await proc.stop("SIGTERM", 10_000);
    assert.equal(status.code, 0, proc.stderr);
  }
}

Deno.test("daemon: the same qsd command line, the same behaviour seen by a client", async () => {
  const dir = await makeScratchDir("qsd-compat");
  try {
    let qsd: Record<string, unknown>;
    try {
      qsd = await runWith(dir, (argv) => new ServerProcess("qemu-storage-daemon", argv));
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
      console.warn("SKIPPED: qemu-storage-daemon is not installed (tools/setup.sh --test)");
      return;
    }
    const ours = await runWith(
      dir,
      (argv) => new ServerProcess(Deno.execPath(), ["run", "-A", MAIN, ...argv]),
    );
    assert.deepEqual(ours, qsd);
    // And what both saw is what the command line asked for.
    assert.deepEqual(qsd.e0, { capacity: 8192, numQueues: 2, readOnly: false });
    assert.deepEqual(qsd.e1, { capacity: 16384, blkSize: 4096, readOnly: true });
    assert.deepEqual(qsd.fileWindow, [0x5a, 0x5a, 0, 0]);
    assert.equal(qsd.e0Write, VIRTIO_BLK_S_OK);
    assert.notEqual(qsd.e1Write, VIRTIO_BLK_S_OK);
    assert.equal((qsd.limits as Record<string, number>)["bps-total"], 1073741824);
    assert.equal(qsd.afterSet, 10000);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
