// Out of file descriptors (prlimit): the NBD server's accept fails with
// EMFILE; it rests instead of spinning on the readable listener, keeps the
// clients it has, and accepts again once descriptors are free.
import assert from "node:assert/strict";
import { NBD_CMD_READ } from "../../../block/mod.ts";
import { makeScratchDir } from "../../harness/mod.ts";
import { RawNbdClient } from "./nbd_raw_client.ts";

const MAIN = new URL("../../../dataplane/main.ts", import.meta.url).pathname;

function cpuSeconds(pid: number): number {
  const f = Deno.readTextFileSync(`/proc/${pid}/stat`).split(") ")[1].split(" ");
  return (Number(f[11]) + Number(f[12])) / 100;
}

async function haveCommand(cmd: string): Promise<boolean> {
  try {
    await new Deno.Command(cmd, { args: ["--version"], stdout: "null", stderr: "null" }).output();
    return true;
  } catch {
    return false;
  }
}

Deno.test("NBD server: EMFILE on accept neither spins nor stops the server", async () => {
  if (!await haveCommand("prlimit")) {
    console.warn("SKIPPED: prlimit (util-linux) is not installed");
    return;
  }
  const dir = await makeScratchDir("nbd-emfile");
  const sock = `${dir}/nbd.sock`;
  // How many fds the daemon uses when idle, then a limit a few above that.
  const argv = [
    "run",
    "-A",
    "--no-check",
    MAIN,
    "--blockdev",
    "driver=null-co,node-name=n0,size=1048576",
    "--nbd-server",
    `addr.type=unix,addr.path=${sock}`,
    "--export",
    "type=nbd,id=e0,node-name=n0",
  ];
  const start = async (limit: number | null) => {
    const p = new Deno.Command(limit === null ? Deno.execPath() : "prlimit", {
      args: limit === null ? argv : [`--nofile=${limit}`, Deno.execPath(), ...argv],
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const until = Date.now() + 20_000;
    for (;;) {
      try {
        const c = await RawNbdClient.go(sock, "n0");
        c.client.close();
        break;
      } catch {
        if (Date.now() > until) throw new Error("the daemon did not serve");
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    return p;
  };
  const clients: Deno.UnixConn[] = [];
  let p: Deno.ChildProcess | null = null;
  try {
    p = await start(null);
    await new Promise((r) => setTimeout(r, 300));
    const idle = [...Deno.readDirSync(`/proc/${p.pid}/fd`)].length;
    p.kill("SIGKILL");
    await p.status;
    p = await start(idle + 4);
    // More connections than descriptors left: the kernel queues them, accept fails.
    for (let i = 0; i < 16; i++) {
      clients.push(await Deno.connect({ transport: "unix", path: sock }));
    }
    await new Promise((r) => setTimeout(r, 300));
    const before = cpuSeconds(p.pid);
    await new Promise((r) => setTimeout(r, 1000));
    const used = cpuSeconds(p.pid) - before;
    assert(used < 0.5, `the daemon used ${used} s of CPU in 1 s: spinning on accept`);
    for (const c of clients.splice(0)) c.close();
    // Descriptors are free again: a new client is served.
    const until = Date.now() + 10_000;
    for (;;) {
      try {
        const { client } = await RawNbdClient.go(sock, "n0");
        await client.write(RawNbdClient.request(NBD_CMD_READ, { cookie: 1n, length: 512 }));
        assert.equal((await client.readReply())?.error, 0);
        client.close();
        break;
      } catch (e) {
        if (Date.now() > until) throw e;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  } finally {
    for (const c of clients) c.close();
    if (p !== null) {
      try {
        p.kill("SIGKILL");
      } catch { /* gone */ }
      const out = await p.output().catch(() => null);
      void out;
    }
    await Deno.remove(dir, { recursive: true });
  }
});
