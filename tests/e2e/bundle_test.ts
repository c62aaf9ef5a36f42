/**
 * tools/build.ts end to end: bundle a small program that starts a Worker,
 * move the bundles somewhere else, and run them with Deno from there.
 */

import assert from "node:assert/strict";
import { buildBundles } from "../../tools/build.ts";
import * as esbuild from "esbuild";

const DENO = new URL("../../deno", import.meta.url).pathname;

async function writeTree(root: string, files: Record<string, string>): Promise<void> {
  for (const [path, text] of Object.entries(files)) {
    const full = `${root}/${path}`;
    await Deno.mkdir(full.slice(0, full.lastIndexOf("/")), { recursive: true });
    await Deno.writeTextFile(full, text);
  }
}

Deno.test("build: an entry and its worker run from the bundle alone", async () => {
  const dir = await Deno.makeTempDir({ prefix: "bundle-" });
  try {
    await writeTree(dir, {
      "src/main.ts": `
import { greet } from "./lib/greet.ts";
import { join } from "node:path";
const w = new Worker(new URL("./lib/square_worker.ts", import.meta.url), { type: "module" });
const r = await new Promise<number>((res) => {
  w.onmessage = (e: MessageEvent<number>) => res(e.data);
  w.postMessage(7);
});
w.terminate();
console.log(greet(Deno.args.join(" ")), r, join("a", "b"));
`,
      "src/lib/greet.ts": `export const greet = (n: string): string => "hello " + n;\n`,
      "src/lib/square_worker.ts": `
import { greet } from "./greet.ts";
const nested = new URL("./missing_file.ts", import.meta.url); // no such file: left alone
self.onmessage = (e: MessageEvent<number>) =>
  self.postMessage(e.data * e.data + greet("").length + (nested.href.endsWith(".ts") ? 0 : 1000));
`,
    });
    const built = await buildBundles({
      entries: [{ entry: `${dir}/src/main.ts`, out: "app.js" }],
      outdir: `${dir}/dist`,
    });
    assert.deepEqual(built.map((b) => b.outfile.slice(dir.length)), [
      "/dist/app.js",
      "/dist/square_worker.js",
    ]);
    const app = await Deno.readTextFile(`${dir}/dist/app.js`);
    assert.match(app, /new URL\("\.\/square_worker\.js", import\.meta\.url\)/);
    assert.doesNotMatch(app, /^import .*\.ts"/m); // sources are inlined
    // The bundles alone, in a directory without the sources or a deno.json.
    await Deno.mkdir(`${dir}/moved`);
    for (const f of ["app.js", "square_worker.js"]) {
      await Deno.copyFile(`${dir}/dist/${f}`, `${dir}/moved/${f}`);
    }
    await Deno.remove(`${dir}/src`, { recursive: true });
    const out = await new Deno.Command(DENO, {
      args: ["run", "-A", "--no-config", `${dir}/moved/app.js`, "--help"],
      cwd: dir,
    }).output();
    const stdout = new TextDecoder().decode(out.stdout);
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    assert.equal(stdout, "hello --help 55 a/b\n"); // 7*7 + "hello ".length
  } finally {
    await esbuild.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("build: two bundles with one name are refused", async () => {
  const dir = await Deno.makeTempDir({ prefix: "bundle-" });
  try {
    await writeTree(dir, {
      "a/x.ts": `console.log(new URL("../b/x.ts", import.meta.url).href);\n`,
      "b/x.ts": `console.log("b");\n`,
    });
    await assert.rejects(
      buildBundles({ entries: [{ entry: `${dir}/a/x.ts` }], outdir: `${dir}/dist` }),
      /would both be x\.js/,
    );
  } finally {
    await esbuild.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("build: dist/host.js serves a disk from the bundle alone", async () => {
  const { VhostUserBlkClient } = await import("../../client/blk_client.ts");
  const dir = await Deno.makeTempDir({ prefix: "bundle-host-" });
  const repo = new URL("../..", import.meta.url).pathname;
  try {
    await buildBundles({
      entries: [{ entry: `${repo}/dataplane/main.ts`, out: "host.js" }],
      workers: [`${repo}/aio/iothread_worker.ts`, `${repo}/aio/thread_pool_worker.ts`],
      outdir: `${dir}/dist`,
      warn: () => {},
    });
    const help = await new Deno.Command(DENO, {
      args: ["run", "-A", "--no-config", `${dir}/dist/host.js`, "--help"],
      cwd: dir,
    }).output();
    assert.equal(help.code, 0);
    assert.match(new TextDecoder().decode(help.stdout), /--image IMAGE/);

    const sock = `${dir}/blk.sock`;
    const child = new Deno.Command(DENO, {
      args: [
        "run",
        "-A",
        "--no-config",
        `${dir}/dist/host.js`,
        "--image",
        "null-co:64M",
        "--socket",
        sock,
      ],
      cwd: dir,
      stderr: "piped",
      stdout: "null",
    }).spawn();
    const stderr = new Response(child.stderr).text();
    for (let i = 0; i < 200; i++) {
      try {
        if (Deno.lstatSync(sock).isSocket) break;
      } catch { /* not yet */ }
      await new Promise((r) => setTimeout(r, 50));
    }
    const client = await VhostUserBlkClient.connect(sock);
    assert.equal(client.config.capacity, (64 << 20) / 512);
    assert.equal(await client.execute(0, (q) => q.read(0, 4096, 4096)), 0);
    await client.close();
    child.kill("SIGTERM");
    const status = await child.status;
    const log = await stderr;
    assert.equal(status.code, 0, log);
    assert.match(log, /stopped cleanly/);
    assert.match(log, /1 requests/);

    // qemu-storage-daemon's command line from the bundle: the daemon's
    // IOThread object loads the same bundled worker module.
    const dsock = `${dir}/daemon.sock`;
    const daemon = new Deno.Command(DENO, {
      args: [
        "run",
        "-A",
        "--no-config",
        `${dir}/dist/host.js`,
        "--blockdev",
        "driver=null-co,node-name=n0,size=1048576",
        "--object",
        "iothread,id=io0",
        "--export",
        `type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=${dsock},iothread=io0`,
      ],
      cwd: dir,
      stderr: "piped",
      stdout: "null",
    }).spawn();
    const dlog = new Response(daemon.stderr).text();
    for (let i = 0; i < 200; i++) {
      try {
        if (Deno.lstatSync(dsock).isSocket) break;
      } catch { /* not yet */ }
      await new Promise((r) => setTimeout(r, 50));
    }
    const dc = await VhostUserBlkClient.connect(dsock);
    assert.equal(dc.config.capacity, 2048);
    assert.equal(await dc.execute(0, (q) => q.read(0, 0, 4096)), 0);
    await dc.close();
    daemon.kill("SIGTERM");
    assert.equal((await daemon.status).code, 0, await dlog);
  } finally {
    await esbuild.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
