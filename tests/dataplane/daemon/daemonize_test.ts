// `--daemonize` and `--pidfile`, as qemu-storage-daemon: the command returns
// 0 once every option is applied (the exports already listen), the daemon
// goes on in the background with its pid in the pidfile, and removes the
// pidfile when it stops. A command line that fails makes the first process
// exit 1 with the error.
import assert from "node:assert/strict";
import { VhostUserBlkClient } from "../../../client/blk_client.ts";
import { VIRTIO_BLK_S_OK } from "../../../client/virtio_blk_defs.ts";

const MAIN = new URL("../../../dataplane/main.ts", import.meta.url).href;

async function run(args: string[]): Promise<{ code: number; stderr: string }> {
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN, ...args],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).output();
  return { code: r.code, stderr: new TextDecoder().decode(r.stderr) };
}

function alive(pid: number): boolean {
  try {
    return !/^State:\s+Z/m.test(Deno.readTextFileSync(`/proc/${pid}/status`));
  } catch {
    return false;
  }
}

Deno.test("daemon: --daemonize returns once serving; the pidfile names the daemon", async () => {
  const dir = await Deno.makeTempDir({ prefix: "daemonize-" });
  let pid = 0;
  try {
    const r = await run([
      "--daemonize",
      "--pidfile",
      `${dir}/pid`,
      "--blockdev",
      "driver=null-co,node-name=n0,size=1048576",
      "--export",
      `type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=${dir}/e0.sock`,
    ]);
    assert.equal(r.code, 0, r.stderr);
    // Serving already when the command returned.
    assert(Deno.lstatSync(`${dir}/e0.sock`).isSocket);
    pid = Number(Deno.readTextFileSync(`${dir}/pid`).trim());
    assert(pid > 0 && alive(pid));
    const c = await VhostUserBlkClient.connect(`${dir}/e0.sock`);
    assert.equal(await c.execute(0, (q) => q.read(0, 0, 4096)), VIRTIO_BLK_S_OK);
    await c.close();
    Deno.kill(pid, "SIGTERM");
    const end = Date.now() + 20_000;
    while (alive(pid) && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
    assert(!alive(pid), "the daemon stopped on SIGTERM");
    pid = 0;
    assert.throws(() => Deno.lstatSync(`${dir}/pid`), Deno.errors.NotFound);
    assert.throws(() => Deno.lstatSync(`${dir}/e0.sock`), Deno.errors.NotFound);

    const bad = await run([
      "--daemonize",
      "--blockdev",
      "driver=null-co,node-name=n0,size=1048576",
      "--export",
      `type=vhost-user-blk,id=e0,node-name=nope,addr.type=unix,addr.path=${dir}/e0.sock`,
    ]);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /node-name=nope.*: Cannot find device='' nor node-name='nope'/);
  } finally {
    if (pid > 0 && alive(pid)) Deno.kill(pid, "SIGKILL");
    await Deno.remove(dir, { recursive: true });
  }
});
