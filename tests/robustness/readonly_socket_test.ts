// Issue 6, robustness: a read-only export refuses every kind of write with
// IOERR (and offers VIRTIO_BLK_F_RO) while reads keep working and the image
// stays unchanged; the socket is created 0600 unless --socket-mode says
// otherwise; a file at the socket path that is not a socket is never removed,
// neither at start nor at stop.

import assert from "node:assert/strict";
import type { BlkQueue } from "../../client/blk_client.ts";
import { VIRTIO_BLK_F_RO } from "../../client/virtio_blk_defs.ts";
import { main } from "../../dataplane/main.ts";
import { VhostUserBlkHost } from "../../dataplane/host.ts";
import { parseHostArgs } from "../../dataplane/host_options.ts";
import { type VhostUserBackend, VhostUserServer } from "../../vhost_user/mod.ts";
import { connect, MiB, scratch, startHost } from "./robustness_util.ts";

const S_OK = 0, S_IOERR = 1;
const DISCARDS: [string, (q: BlkQueue) => void][] = [
  ["discard", (q) => q.discard(0, 0, 4096)],
  ["write-zeroes", (q) => q.writeZeroes(0, 0, 4096)],
  ["write-zeroes unmap", (q) => q.writeZeroes(0, 0, 4096, true)],
];

Deno.test("read-only export: write, discard, write-zeroes get IOERR; reads work; image unchanged", async () => {
  const s = await scratch("robust-ro", 8 * MiB);
  const content = new Uint8Array(64 * 1024).map((_, i) => (i * 7 + 3) & 0xff);
  await Deno.writeFile(s.image, content);
  await Deno.truncate(s.image, 8 * MiB);
  const { host } = await startHost(["--image", s.image, "--socket", s.socket, "--read-only"]);
  try {
    const c = await connect(s.socket);
    try {
      assert.ok(c.readOnly, "VIRTIO_BLK_F_RO not offered");
      assert.ok((c.offeredFeatures & (1n << BigInt(VIRTIO_BLK_F_RO))) !== 0n);
      const q = c.queues[0];
      q.data(0).fill(0xab, 0, 4096);
      assert.equal(await c.execute(0, (q) => q.write(0, 0, 4096)), S_IOERR, "write");
      assert.equal(await c.execute(0, (q) => q.write(0, 8 * MiB - 4096, 4096)), S_IOERR);
      // Discard / write-zeroes stay offered on a read-only export (as in
      // qemu-storage-daemon) and fail with IOERR.
      for (const [what, build] of DISCARDS) {
        assert.equal(await c.execute(0, build), S_IOERR, what);
      }
      // Reads still work and see the original data; flush is harmless.
      q.data(0).fill(0, 0, 4096);
      assert.equal(await c.execute(0, (q) => q.read(0, 0, 4096)), S_OK);
      assert.deepEqual(q.data(0).slice(0, 4096), content.slice(0, 4096));
      assert.equal(await c.execute(0, (q) => q.flush(0)), S_OK);
    } finally {
      await c.close();
    }
    const st = await host.stop();
    const q0 = st.threads[0].queues[0];
    assert.equal(q0.writtenBytes, 0);
    assert.ok(q0.errors >= 2 && q0.errors + q0.unsupported >= 5);
  } finally {
    await host.stop();
    const now = await Deno.readFile(s.image);
    assert.deepEqual(now.slice(0, content.length), content, "read-only image was modified");
    assert.ok(now.slice(content.length).every((b) => b === 0));
    await s.remove();
  }
});

/** A watcher that watches nothing: the server tests below only bind and close. */
const NO_WATCH = { setFdHandler() {} };
const NO_BACKEND = {} as VhostUserBackend;

Deno.test("socket mode: 0600 by default, --socket-mode otherwise", async () => {
  const s = await scratch("robust-mode", 0);
  try {
    for (const [flags, want] of [[[], 0o600], [["--socket-mode", "0660"], 0o660]] as const) {
      const { host } = await startHost(["--image", "null-co:1M", "--socket", s.socket, ...flags]);
      try {
        const st = Deno.lstatSync(s.socket);
        assert.ok(st.isSocket);
        assert.equal(st.mode! & 0o777, want, `mode with ${flags}`);
      } finally {
        await host.stop();
      }
      assert.throws(() => Deno.lstatSync(s.socket), Deno.errors.NotFound, "socket left behind");
    }
    // The option as parsed, straight to the server (no IOThreads needed).
    const o = parseHostArgs([
      "--image",
      "null-co:1M",
      "--socket",
      s.socket,
      "--socket-mode",
      "640",
    ]);
    const server = VhostUserServer.listen(o.socket, NO_BACKEND, NO_WATCH, { mode: o.socketMode });
    assert.equal(Deno.lstatSync(s.socket).mode! & 0o777, 0o640);
    await server.close();
  } finally {
    await s.remove();
  }
});

Deno.test("a non-socket file at the socket path is never removed (start, CLI, stop)", async () => {
  const s = await scratch("robust-nosock", 0);
  const text = "precious data\n";
  const listen = (path: string) => VhostUserServer.listen(path, NO_BACKEND, NO_WATCH);
  try {
    // A regular file: the host refuses to start (library and CLI) and leaves it.
    Deno.writeTextFileSync(s.socket, text);
    await assert.rejects(
      VhostUserBlkHost.start(parseHostArgs(["--image", "null-co:1M", "--socket", s.socket])),
      /not a socket/,
    );
    assert.equal(Deno.readTextFileSync(s.socket), text);
    assert.equal(await main(["--image", "null-co:1M", "--socket", s.socket]), 1);
    assert.equal(Deno.readTextFileSync(s.socket), text);

    // A symlink to a file, and a directory.
    const target = `${s.dir}/target`;
    Deno.writeTextFileSync(target, text);
    const link = `${s.dir}/link.sock`;
    Deno.symlinkSync(target, link);
    assert.throws(() => listen(link), /not a socket/);
    assert.ok(Deno.lstatSync(link).isSymlink);
    assert.equal(Deno.readTextFileSync(target), text);
    const dirPath = `${s.dir}/d.sock`;
    Deno.mkdirSync(dirPath);
    assert.throws(() => listen(dirPath), /not a socket/);
    assert.ok(Deno.statSync(dirPath).isDirectory);

    // A file that replaces the socket while the host runs survives the stop.
    const live = `${s.dir}/live.sock`;
    const { host } = await startHost(["--image", "null-co:1M", "--socket", live]);
    Deno.removeSync(live);
    Deno.writeTextFileSync(live, text);
    await host.stop();
    assert.equal(Deno.readTextFileSync(live), text, "stop removed a file it did not create");

    // A socket bound by someone else at the path after we left is not ours either.
    const other = listen(`${s.dir}/o.sock`);
    const mine = `${s.dir}/m.sock`;
    const srv = listen(mine);
    Deno.removeSync(mine);
    Deno.renameSync(`${s.dir}/o.sock`, mine);
    await srv.close();
    assert.ok(Deno.lstatSync(mine).isSocket, "close removed another server's socket");
    await other.close();

    // A stale socket (no listener) is replaced; a live one is refused.
    const a = listen(`${s.dir}/a.sock`);
    assert.throws(() => listen(`${s.dir}/a.sock`), /in use/);
    await a.close();
  } finally {
    await s.remove();
  }
});
