// The same qemu-storage-daemon command line with NBD exports run by
// qemu-storage-daemon and by ours: `qemu-nbd --list` (every export's name,
// description, size, transmission flags, block sizes, meta contexts) reads
// the same from both, and `qemu-img compare` finds the same bytes.
import assert from "node:assert/strict";
import { makeScratchDir } from "../../harness/mod.ts";

const MAIN = new URL("../../../dataplane/main.ts", import.meta.url).pathname;

async function available(cmd: string): Promise<boolean> {
  try {
    await new Deno.Command(cmd, { args: ["--version"], stdout: "null", stderr: "null" }).output();
    return true;
  } catch {
    return false;
  }
}

async function waitForSocket(path: string, p: Deno.ChildProcess): Promise<void> {
  const until = Date.now() + 20_000;
  let exited = false;
  p.status.then(() => exited = true);
  for (;;) {
    try {
      if (Deno.statSync(path).isSocket) return;
    } catch { /* not yet */ }
    if (exited) throw new Error(`the daemon exited before listening on ${path}`);
    if (Date.now() > until) throw new Error(`no socket at ${path}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** `qemu-nbd --list` once both exports are there (the socket listens before they are added). */
async function list(sock: string): Promise<string> {
  const until = Date.now() + 20_000;
  for (;;) {
    const r = await new Deno.Command("qemu-nbd", {
      args: ["--list", "-k", sock],
      stdout: "piped",
      stderr: "null",
    }).output();
    const out = new TextDecoder().decode(r.stdout);
    if (r.code === 0 && out.startsWith("exports available: 2")) return out;
    if (Date.now() > until) throw new Error(`qemu-nbd --list: ${out}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

Deno.test("NBD export: qemu-nbd --list reads the same from qemu-storage-daemon and from ours", async () => {
  if (!await available("qemu-storage-daemon")) {
    console.warn("SKIPPED: qemu-storage-daemon is not installed (tools/setup.sh --test)");
    return;
  }
  const dir = await makeScratchDir("nbd-qsd");
  const procs: Deno.ChildProcess[] = [];
  try {
    const img = new Uint8Array(4 << 20);
    crypto.getRandomValues(img.subarray(0, 65536));
    Deno.writeFileSync(`${dir}/a.raw`, img);
    Deno.writeFileSync(`${dir}/b.raw`, img);
    const argv = (file: string, sock: string) => [
      "--blockdev",
      `driver=file,node-name=f,filename=${dir}/${file}`,
      "--blockdev",
      "driver=null-co,node-name=z,size=1048576",
      "--object",
      "iothread,id=io0",
      "--nbd-server",
      `addr.type=unix,addr.path=${sock}`,
      "--export",
      "type=nbd,id=e,node-name=f,name=disk,writable=on,description=the disk,iothread=io0",
      "--export",
      "type=nbd,id=e2,node-name=z",
    ];
    const qsd = new Deno.Command("qemu-storage-daemon", {
      args: argv("a.raw", `${dir}/qsd.sock`),
      stdout: "null",
      stderr: "null",
    }).spawn();
    procs.push(qsd);
    const ours = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--no-check", MAIN, ...argv("b.raw", `${dir}/ours.sock`)],
      stdout: "null",
      stderr: "null",
    }).spawn();
    procs.push(ours);
    await waitForSocket(`${dir}/qsd.sock`, qsd);
    await waitForSocket(`${dir}/ours.sock`, ours);
    const theirs = await list(`${dir}/qsd.sock`);
    assert.match(theirs, /export: 'disk'/);
    assert.equal(await list(`${dir}/ours.sock`), theirs);
    const cmp = await new Deno.Command("qemu-img", {
      args: [
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        `nbd+unix:///disk?socket=${dir}/qsd.sock`,
        `nbd+unix:///disk?socket=${dir}/ours.sock`,
      ],
      stdout: "piped",
    }).output();
    assert.equal(cmp.code, 0, new TextDecoder().decode(cmp.stdout));
  } finally {
    for (const p of procs) {
      try {
        p.kill("SIGTERM");
      } catch { /* gone */ }
      await p.status;
    }
    await Deno.remove(dir, { recursive: true });
  }
});
