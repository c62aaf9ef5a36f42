// NbdHandshake on its own (a socketpair, a bare AioContext): the deadline
// that bounds a client that says nothing, and a client that leaves midway.
// NbdServer: max-connections refuses the connection over the limit.
import assert from "node:assert/strict";
import { AioContext } from "../../../aio/mod.ts";
import { NBD_CMD_READ } from "../../../block/mod.ts";
import { StorageDaemon } from "../../../dataplane/daemon/storage_daemon.ts";
import { NbdHandshake } from "../../../dataplane/nbd/nbd_handshake.ts";
import { close, isOpen, recvInto, sendMsg, SOCK_NONBLOCK, socketpair } from "../../../sys/mod.ts";
import { makeScratchDir } from "../../harness/mod.ts";
import { RawNbdClient } from "./nbd_raw_client.ts";

const NO_EXPORTS = { lookup: () => undefined, list: () => [] };

Deno.test("NBD handshake: a silent client is dropped at the deadline", () => {
  const ctx = new AioContext();
  const [srv, cli] = socketpair(SOCK_NONBLOCK);
  const done: string[] = [];
  new NbdHandshake(ctx, srv, NO_EXPORTS, {
    timeoutMs: 30,
    onDone: (r, reason) => done.push(r === null ? reason : "ok"),
  });
  const t0 = Date.now();
  while (done.length === 0 && Date.now() - t0 < 2000) ctx.poll(true);
  assert.deepEqual(done, ["handshake timed out"]);
  assert(!isOpen(srv), "the server side is closed");
  // The greeting came, then the end of the stream.
  const buf = new Uint8Array(64);
  assert.equal(recvInto(cli, buf, 0, 64), 18);
  assert.equal(recvInto(cli, buf, 0, 64), 0);
  close(cli);
  ctx.close();
});

Deno.test("NBD handshake: a client leaving mid-option is dropped at once", () => {
  const ctx = new AioContext();
  const [srv, cli] = socketpair(SOCK_NONBLOCK);
  const done: string[] = [];
  new NbdHandshake(ctx, srv, NO_EXPORTS, {
    onDone: (r, reason) => done.push(r === null ? reason : "ok"),
  });
  const part = new Uint8Array(4 + 10);
  new DataView(part.buffer).setUint32(0, 3);
  sendMsg(cli, part);
  close(cli);
  const t0 = Date.now();
  while (done.length === 0 && Date.now() - t0 < 2000) ctx.poll(true);
  // (A reset when the greeting was never read, else the end of the stream.)
  assert.equal(done.length, 1);
  assert.match(done[0], /closed the connection during the handshake|ECONNRESET/);
  ctx.close();
});

Deno.test("NBD handshake: a client gone before the greeting is reported later, not from the constructor", () => {
  const ctx = new AioContext();
  const [srv, cli] = socketpair(SOCK_NONBLOCK);
  close(cli); // the greeting's send fails with EPIPE
  const done: string[] = [];
  let constructed = false;
  new NbdHandshake(ctx, srv, NO_EXPORTS, {
    onDone: (r, reason) => {
      assert(constructed, "onDone ran inside the constructor");
      done.push(r === null ? reason : "ok");
    },
  });
  constructed = true;
  const t0 = Date.now();
  while (done.length === 0 && Date.now() - t0 < 2000) ctx.poll(true);
  assert.equal(done.length, 1);
  assert.match(done[0], /EPIPE|ECONNRESET/);
  ctx.close();
});

Deno.test("NBD server: max-connections refuses the client over the limit", async () => {
  const dir = await makeScratchDir("nbd-max");
  const d = new StorageDaemon();
  try {
    const sock = `${dir}/nbd.sock`;
    await d.nbdServerStart({ addr: { type: "unix", path: sock }, maxConnections: 2 });
    d.blockdevAdd({ driver: "null-co", "node-name": "n", size: "65536" }, true);
    await d.nbdExportAdd({ id: "n", nodeName: "n", name: "n", description: "", writable: false });
    const a = (await RawNbdClient.go(sock, "n")).client;
    const b = await RawNbdClient.connect(sock); // in its handshake: counts too
    const c = await RawNbdClient.connect(sock);
    assert(await c.closedWithin(), "the third client is refused");
    c.close();
    b.close();
    // Once one leaves, a new client gets in.
    const until = Date.now() + 5000;
    while (d.nbdServer!.connections > 1 && Date.now() < until) {
      await new Promise((r) => setTimeout(r, 5));
    }
    const e = (await RawNbdClient.go(sock, "n")).client;
    await e.write(RawNbdClient.request(NBD_CMD_READ, { cookie: 3n, length: 512 }));
    assert.equal((await e.readReply())?.error, 0);
    e.close();
    a.close();
  } finally {
    await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
