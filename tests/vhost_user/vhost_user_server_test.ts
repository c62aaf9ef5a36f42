import assert from "node:assert/strict";
import {
  encodeMessage,
  VHOST_USER_GET_CONFIG,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_GET_PROTOCOL_FEATURES,
  VHOST_USER_GET_VRING_BASE,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_OWNER,
  VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_SET_VRING_ADDR,
  VHOST_USER_SET_VRING_BASE,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_ERR,
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_SET_VRING_NUM,
  VHOST_USER_VERSION,
  VhostUserServer,
  type VhostUserServerOptions,
} from "../../vhost_user/mod.ts";
import { VhostUserBlkClient } from "../../client/blk_client.ts";
import { FrontendError, VhostUserFrontend } from "../../client/frontend.ts";
import {
  bindUnix,
  close,
  connectUnix,
  eventfd,
  fileStatusFlags,
  listen,
  memfdCreate,
  O_NONBLOCK,
  O_RDWR,
  open,
  pipe,
  sendMsg,
  socketUnix,
  SysError,
} from "../../sys/mod.ts";
import { openFdCount, StubBackend, TestLoop, until } from "./vhost_user_test_util.ts";

const V = VHOST_USER_VERSION;
const NEED = VHOST_USER_NEED_REPLY_MASK;

async function withServer(
  fn: (
    ctx: {
      server: VhostUserServer;
      backend: StubBackend;
      loop: TestLoop;
      path: string;
      errors: Error[];
    },
  ) => Promise<void>,
  opts: VhostUserServerOptions = {},
): Promise<void> {
  const dir = Deno.makeTempDirSync();
  const path = `${dir}/vhost.sock`;
  const backend = new StubBackend();
  const loop = new TestLoop();
  const errors: Error[] = [];
  const server = VhostUserServer.listen(path, backend, loop, {
    onError: (e) => errors.push(e),
    ...opts,
  });
  try {
    await fn({ server, backend, loop, path, errors });
  } finally {
    await server.close();
    await loop.stop();
    Deno.removeSync(dir, { recursive: true });
  }
}

/**
 * Raw front-end. `session`: negotiate REPLY_ACK (so malformed requests get
 * answers) and send SET_OWNER (so the back-end takes session messages);
 * `owner`: SET_OWNER only, no REPLY_ACK.
 */
async function rawFrontend(
  path: string,
  setup: "none" | "owner" | "session" = "none",
): Promise<VhostUserFrontend> {
  const fe = await VhostUserFrontend.connect(path, 2000);
  if (setup === "session") {
    await fe.request(VHOST_USER_GET_FEATURES, { kind: "empty" }, [], "u64");
    await fe.request(VHOST_USER_GET_PROTOCOL_FEATURES, { kind: "empty" }, [], "u64");
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_PROTOCOL_FEATURES, V | NEED, {
        kind: "u64",
        value: 1n << BigInt(VHOST_USER_PROTOCOL_F_REPLY_ACK),
      }),
    );
    assert.equal(await ack(fe, VHOST_USER_SET_PROTOCOL_FEATURES), 0n);
    fe.replyAck = true;
  }
  if (setup !== "none") await fe.request(VHOST_USER_SET_OWNER, { kind: "empty" });
  return fe;
}

async function ack(fe: VhostUserFrontend, request: number): Promise<bigint> {
  const r = await fe.readReply(request, "u64");
  assert.equal(r.payload.kind, "u64");
  return r.payload.kind === "u64" ? r.payload.value : -1n;
}

async function getFeatures(fe: VhostUserFrontend): Promise<bigint> {
  const r = await fe.request(VHOST_USER_GET_FEATURES, { kind: "empty" }, [], "u64");
  return r.payload.kind === "u64" ? r.payload.value : -1n;
}

Deno.test("server: the built-in client sets up a 2-queue device through the protocol", async () => {
  const fds0 = openFdCount();
  await withServer(async ({ server, backend, errors }) => {
    const client = await VhostUserBlkClient.connect(server.path, { numQueues: 2, queueSize: 64 });
    assert.equal(client.config.capacity, 2048);
    assert.equal(client.maxQueues, 2);
    assert.ok(client.frontend.replyAck, "REPLY_ACK negotiated");
    await server.connection!.settled();
    const conn = server.connection!;
    assert.ok(conn.owner);
    assert.equal(conn.ackedFeatures, client.features);
    // memory: the backend mapped both regions; guest addresses differ from user addresses
    assert.equal(backend.maps.length, 2);
    const ram = client.ram!;
    for (const [i, m] of backend.maps.entries()) {
      assert.equal(m.region.guestPhysAddr, ram.regions[i].guestPhysAddr);
      assert.equal(m.region.userAddr, ram.regions[i].userAddr);
      assert.notEqual(m.region.guestPhysAddr, m.region.userAddr);
    }
    // a byte the "guest" writes is visible through the backend's own mapping
    const buf = client.queues[1].data(3);
    buf[0] = 0x5a;
    const r1 = backend.maps[1];
    const off = r1.region.mmapOffset +
      (buf.byteOffset - (r1.region.userAddr - ram.regions[0].userAddr));
    assert.equal(new Uint8Array(r1.map.buffer)[off], 0x5a);
    // rings
    for (const i of [0, 1]) {
      assert.equal(backend.vringNum.get(i), 64);
      assert.equal(backend.vringBase.get(i), 0);
      assert.equal(backend.vringAddr.get(i)!.descUserAddr, client.queues[i].ring.desc.addr);
      assert.equal(backend.vringAddr.get(i)!.usedUserAddr, client.queues[i].ring.used.addr);
      assert.equal(backend.vringAddr.get(i)!.availUserAddr, client.queues[i].ring.avail.addr);
      assert.equal(backend.enabled.get(i), true);
      assert.ok(backend.kick.get(i) != null && backend.call.get(i) != null);
    }
    const order = backend.calls.filter((c) => !c.startsWith("getConfig"));
    assert.deepEqual(order.slice(0, 3), [
      "setProtocolFeatures 209",
      `setFeatures ${client.features.toString(16)}`,
      "setMemTable 2",
    ]);
    // GET_VRING_BASE goes through the async backend path and stops the rings
    assert.deepEqual(await client.stopQueues(), [0, 0]);
    await client.close();
    await until(() => server.connection === null && backend.resets === 1);
    assert.deepEqual(errors, []);
  });
  assert.equal(openFdCount(), fds0, "no fd leaked");
});

Deno.test("server: without protocol features rings start enabled", async () => {
  await withServer(async ({ server, backend }) => {
    backend.featureBits = 1n << 32n;
    const client = await VhostUserBlkClient.connect(server.path, { numQueues: 1, queueSize: 64 });
    // no REPLY_ACK: nothing tells the client when the server is done
    await until(() => backend.calls.filter((c) => c.startsWith("setVringCall")).length === 1);
    await server.connection!.settled();
    assert.equal(client.protocolFeatures, 0n);
    assert.equal(backend.enabled.get(0), true);
    assert.equal(backend.enabled.get(1), true);
    assert.ok(!backend.calls.some((c) => c.startsWith("setProtocolFeatures")));
    await client.close();
  });
});

Deno.test("server: malformed messages get error replies and the connection keeps working", async () => {
  const fds0 = openFdCount();
  await withServer(async ({ server, backend, errors }) => {
    const fe = await rawFrontend(server.path, "session");
    const offered = await getFeatures(fe);
    assert.equal(offered, backend.featureBits);

    // unknown request with NEED_REPLY: non-zero ack
    await fe.sendRaw(encodeMessage(99, V | NEED, { kind: "raw", bytes: new Uint8Array(4) }));
    assert.notEqual(await ack(fe, 99), 0n);
    assert.equal(await getFeatures(fe), offered);

    // truncated payload (SET_VRING_NUM with 4 bytes)
    const num = encodeMessage(VHOST_USER_SET_VRING_NUM, V | NEED, {
      kind: "raw",
      bytes: new Uint8Array(4),
    });
    await fe.sendRaw(num);
    assert.notEqual(await ack(fe, VHOST_USER_SET_VRING_NUM), 0n);
    // valid values are accepted, bad ones refused
    const setNum = (index: number, n: number) =>
      encodeMessage(VHOST_USER_SET_VRING_NUM, V | NEED, { kind: "vringState", index, num: n });
    await fe.sendRaw(setNum(0, 128));
    assert.equal(await ack(fe, VHOST_USER_SET_VRING_NUM), 0n);
    await fe.sendRaw(setNum(0, 100)); // not a power of two
    assert.notEqual(await ack(fe, VHOST_USER_SET_VRING_NUM), 0n);
    await fe.sendRaw(setNum(7, 128)); // no such queue
    assert.notEqual(await ack(fe, VHOST_USER_SET_VRING_NUM), 0n);
    assert.equal(backend.vringNum.get(0), 128);

    // wrong fd count: kick without its fd; call with two fds (both closed by the server)
    const e1 = eventfd();
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_VRING_KICK, V | NEED, { kind: "u64", value: 0n }),
    );
    assert.notEqual(await ack(fe, VHOST_USER_SET_VRING_KICK), 0n);
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_VRING_CALL, V | NEED, { kind: "u64", value: 0n }),
      [e1, e1],
    );
    assert.notEqual(await ack(fe, VHOST_USER_SET_VRING_CALL), 0n);
    // kick fd for a ring that does not exist: refused, fd closed
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_VRING_KICK, V | NEED, { kind: "u64", value: 5n }),
      [e1],
    );
    assert.notEqual(await ack(fe, VHOST_USER_SET_VRING_KICK), 0n);
    // NOFD is fine
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_VRING_KICK, V | NEED, { kind: "u64", value: 0x100n }),
    );
    assert.equal(await ack(fe, VHOST_USER_SET_VRING_KICK), 0n);
    assert.equal(backend.kick.get(0), null);

    // SET_MEM_TABLE with a bad fd (a pipe cannot be mmapped): the backend's error comes back
    const [pr, pw] = pipe();
    const region = { guestPhysAddr: 0x1000n, size: 4096n, userAddr: 0x7000_0000n, mmapOffset: 0n };
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_MEM_TABLE, V | NEED, { kind: "memTable", regions: [region] }),
      [pr],
    );
    const code = await ack(fe, VHOST_USER_SET_MEM_TABLE);
    assert.notEqual(code, 0n);
    // regions and fds disagree; a region past 2^53
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_MEM_TABLE, V | NEED, {
        kind: "memTable",
        regions: [region, region],
      }),
      [pw],
    );
    assert.notEqual(await ack(fe, VHOST_USER_SET_MEM_TABLE), 0n);
    const huge = { ...region, guestPhysAddr: 1n << 60n };
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_MEM_TABLE, V | NEED, { kind: "memTable", regions: [huge] }),
      [pw],
    );
    assert.notEqual(await ack(fe, VHOST_USER_SET_MEM_TABLE), 0n);

    // GET_VRING_BASE on a missing ring: an empty reply, which a front-end treats as failure
    const r = await fe.request(
      VHOST_USER_GET_VRING_BASE,
      { kind: "vringState", index: 9, num: 0 },
      [],
      "vringState",
    );
    assert.equal(r.payload.kind, "empty");

    // a message in 1-byte pieces, fds with the first byte
    const e2 = eventfd();
    const kick = encodeMessage(VHOST_USER_SET_VRING_CALL, V | NEED, { kind: "u64", value: 1n });
    for (let i = 0; i < kick.length; i++) {
      await fe.sendRaw(kick.subarray(i, i + 1), i === 0 ? [e2] : []);
      await new Promise((r) => setTimeout(r, 1));
    }
    assert.equal(await ack(fe, VHOST_USER_SET_VRING_CALL), 0n);
    assert.ok(backend.call.get(1) != null);

    assert.equal(await getFeatures(fe), offered, "still talking");
    assert.ok(errors.length >= 10, `errors reported: ${errors.length}`);
    fe.close();
    close(e1);
    close(e2);
    close(pr);
    close(pw);
    await until(() => server.connection === null && backend.resets === 1);
  });
  assert.equal(openFdCount(), fds0, "the server closed every fd it did not keep");
});

Deno.test("server: oversized or unversioned headers disconnect; the next front-end is served", async () => {
  await withServer(async ({ server, backend }) => {
    const fe = await rawFrontend(server.path);
    const big = new Uint8Array(12);
    const dv = new DataView(big.buffer);
    dv.setUint32(0, VHOST_USER_GET_FEATURES, true);
    dv.setUint32(4, V, true);
    dv.setUint32(8, 1 << 20, true);
    await fe.sendRaw(big);
    assert.ok(await fe.waitClosed(), "server hung up on an oversized message");
    fe.close();
    await until(() => backend.resets === 1 && server.connection === null);

    const fe2 = await rawFrontend(server.path);
    assert.equal(await getFeatures(fe2), backend.featureBits);
    dv.setUint32(4, 2, true); // version 2
    dv.setUint32(8, 0, true);
    await fe2.sendRaw(big);
    assert.ok(await fe2.waitClosed());
    fe2.close();
    await until(() => backend.resets === 2);

    // EOF in the middle of a message is a clean disconnect too
    const fe3 = await rawFrontend(server.path);
    await fe3.sendRaw(
      encodeMessage(VHOST_USER_SET_VRING_NUM, V, { kind: "vringState", index: 0, num: 8 }).subarray(
        0,
        15,
      ),
    );
    fe3.close();
    await until(() => backend.resets === 3);

    const client = await VhostUserBlkClient.connect(server.path, { numQueues: 1, queueSize: 64 });
    assert.equal(client.config.capacity, 2048);
    await client.close();
  });
});

Deno.test("server: one front-end at a time; the second waits until the first leaves", async () => {
  await withServer(async ({ server, backend }) => {
    const a = await rawFrontend(server.path);
    assert.equal(await getFeatures(a), backend.featureBits);
    const b = await rawFrontend(server.path); // sits in the backlog
    b.timeoutMs = 150;
    await assert.rejects(
      () => getFeatures(b),
      (e) => e instanceof FrontendError && e.kind === "timeout",
    );
    a.close();
    b.timeoutMs = 2000;
    // b's request was queued in the socket: it is answered once b is accepted
    const r = await b.readReply(VHOST_USER_GET_FEATURES, "u64");
    assert.equal(r.payload.kind === "u64" && r.payload.value, backend.featureBits);
    b.close();
  });
});

Deno.test("server: socket path handling (mode 0600, stale socket, in use, not a socket, too long)", async () => {
  const dir = Deno.makeTempDirSync();
  const path = `${dir}/vhost.sock`;
  const loop = new TestLoop();
  try {
    // stale socket: bound, never listening -> replaced
    const stale = socketUnix();
    bindUnix(stale, path);
    close(stale);
    const s1 = VhostUserServer.listen(path, new StubBackend(), loop);
    assert.equal(Deno.statSync(path).mode! & 0o777, 0o600);
    // in use
    assert.throws(
      () => VhostUserServer.listen(path, new StubBackend(), loop),
      (e) => e instanceof SysError && e.code === "EADDRINUSE" && /in use/.test(e.message),
    );
    await s1.close();
    assert.throws(() => Deno.statSync(path), Deno.errors.NotFound);
    // another process listening also counts as in use
    const other = socketUnix();
    bindUnix(other, path);
    listen(other);
    assert.throws(
      () => VhostUserServer.listen(path, new StubBackend(), loop),
      (e) => e instanceof SysError && e.code === "EADDRINUSE",
    );
    close(other);
    Deno.removeSync(path);
    // a regular file is never removed
    Deno.writeTextFileSync(path, "precious");
    assert.throws(
      () => VhostUserServer.listen(path, new StubBackend(), loop),
      (e) => e instanceof SysError && e.code === "EEXIST" && /not a socket/.test(e.message),
    );
    assert.equal(Deno.readTextFileSync(path), "precious");
    // path too long
    assert.throws(
      () => VhostUserServer.listen(`${dir}/${"x".repeat(120)}`, new StubBackend(), loop),
      (e) => e instanceof SysError && e.code === "ENAMETOOLONG",
    );
    // a custom mode
    Deno.removeSync(path);
    const s2 = VhostUserServer.listen(path, new StubBackend(), loop, { mode: 0o660 });
    assert.equal(Deno.statSync(path).mode! & 0o777, 0o660);
    await s2.close();
    assert.deepEqual(loop.watched, []);
  } finally {
    await loop.stop();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("server: a backend failure without REPLY_ACK is reported, not fatal", async () => {
  await withServer(async ({ server, backend, errors }) => {
    const fe = await rawFrontend(server.path, "owner");
    backend.failNext = new Error("device says no");
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_VRING_NUM, V, { kind: "vringState", index: 0, num: 8 }),
    );
    assert.equal(await getFeatures(fe), backend.featureBits);
    assert.ok(errors.some((e) => e.message === "device says no"));
    fe.close();
  });
});

// Issue 10 item 2a: the EOF path reset the backend while GET_VRING_BASE still
// waited for the ring's in-flight requests (the reset then closed that ring's
// fds and unmapped memory under the requests still running).
Deno.test("server: a front-end that leaves during GET_VRING_BASE is reset only after the handler finishes", async () => {
  await withServer(async ({ server, backend }) => {
    let open!: () => void;
    backend.vringBaseGate = new Promise<void>((r) => open = r);
    const fe = await rawFrontend(server.path, "owner");
    await fe.sendRaw(
      encodeMessage(VHOST_USER_GET_VRING_BASE, V, { kind: "vringState", index: 0, num: 0 }),
    );
    await until(() => backend.calls.includes("getVringBase 0"));
    fe.close();
    await until(() => server.connection === null || server.connection.closed);
    await new Promise((r) => setTimeout(r, 30));
    assert.equal(backend.resets, 0, "reset while GET_VRING_BASE still runs");
    open();
    await until(() => backend.resets === 1);
    const i = backend.calls.indexOf("getVringBase 0 done");
    assert.ok(i >= 0 && i < backend.calls.indexOf("reset"), backend.calls.join(", "));
  });
});

/** Sends one whole message now (synchronously): the socket buffer must take it. */
function sendNow(fe: VhostUserFrontend, bytes: Uint8Array, fds: number[] = []): void {
  assert.equal(sendMsg(fe.fd, bytes, fds), bytes.byteLength);
}

Deno.test("server: a QEMU-like start pipelining 16 queues' ring set-up is served, not disconnected", async () => {
  await withServer(async ({ server, backend, errors }) => {
    backend.queues = 16;
    const fe = await rawFrontend(server.path, "owner"); // no REPLY_ACK: nothing waits
    const fds: number[] = [];
    // All in one turn of this thread's event loop: the server finds 80
    // messages in its socket at once, as when QEMU starts the device.
    for (let i = 0; i < 16; i++) {
      const state = (num: number) => ({ kind: "vringState" as const, index: i, num });
      sendNow(fe, encodeMessage(VHOST_USER_SET_VRING_NUM, V, state(64)));
      sendNow(fe, encodeMessage(VHOST_USER_SET_VRING_BASE, V, state(0)));
      sendNow(
        fe,
        encodeMessage(VHOST_USER_SET_VRING_ADDR, V, {
          kind: "vringAddr",
          index: i,
          flags: 0,
          descUserAddr: 0x1000n,
          usedUserAddr: 0x2000n,
          availUserAddr: 0x3000n,
          logGuestAddr: 0n,
        }),
      );
      for (const req of [VHOST_USER_SET_VRING_KICK, VHOST_USER_SET_VRING_CALL]) {
        const e = eventfd();
        fds.push(e);
        sendNow(fe, encodeMessage(req, V, { kind: "u64", value: BigInt(i) }), [e]);
      }
    }
    for (const fd of fds) close(fd); // the server holds its own copies
    // Answered after everything before it was handled, in order.
    assert.equal(await getFeatures(fe), backend.featureBits);
    for (let i = 0; i < 16; i++) {
      assert.equal(backend.vringNum.get(i), 64);
      assert.ok(backend.kick.get(i) != null && backend.call.get(i) != null, `ring ${i} fds`);
    }
    assert.equal(backend.calls.filter((c) => c.startsWith("setVring")).length, 80);
    assert.deepEqual(errors, []);
    fe.close();
  });
});

Deno.test("server: while a handler waits, reading stops at the queue bound and resumes after", async () => {
  await withServer(async ({ server, backend, loop, errors }) => {
    const fe = await rawFrontend(server.path, "owner");
    let release!: () => void;
    const gate = new Promise<void>((r) => release = r);
    backend.setVringNum = (i: number, n: number) => {
      backend.calls.push(`setVringNum ${i} ${n}`);
      return gate; // a backend that forwards to an IOThread and waits
    };
    sendNow(
      fe,
      encodeMessage(VHOST_USER_SET_VRING_NUM, V, { kind: "vringState", index: 0, num: 8 }),
    );
    for (let i = 0; i < 200; i++) { // fits the socket buffer (~270 such messages)
      sendNow(
        fe,
        encodeMessage(VHOST_USER_SET_VRING_BASE, V, { kind: "vringState", index: 1, num: i }),
      );
    }
    await until(() => server.connection?.readingPaused === true);
    const conn = server.connection!;
    await new Promise((r) => setTimeout(r, 50));
    assert.ok(!conn.closed, "still connected");
    assert.ok(!loop.watched.includes(conn.fd), "the socket is not watched while paused");
    assert.ok(!backend.calls.some((c) => c.startsWith("setVringBase")), "nothing overtook");
    release();
    assert.equal(await getFeatures(fe), backend.featureBits);
    assert.equal(backend.vringBase.get(1), 199);
    assert.equal(backend.calls.filter((c) => c.startsWith("setVringBase")).length, 200);
    assert.ok(loop.watched.includes(conn.fd), "watched again");
    assert.deepEqual(errors, []);
    fe.close();
  });
});

Deno.test("server: NEED_REPLY without REPLY_ACK negotiated gets no ack", async () => {
  await withServer(async ({ server, backend }) => {
    const fe = await rawFrontend(server.path, "owner");
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_VRING_NUM, V | NEED, { kind: "vringState", index: 0, num: 8 }),
    );
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_VRING_NUM, V | NEED, { kind: "raw", bytes: new Uint8Array(4) }),
    );
    // The next reply on the socket is the answer to GET_FEATURES, not an ack.
    assert.equal(await getFeatures(fe), backend.featureBits);
    assert.equal(backend.vringNum.get(0), 8);
    fe.close();
  });
});

Deno.test("server: session messages before SET_OWNER are refused; negotiation is not", async () => {
  await withServer(async ({ server, backend }) => {
    const fe = await rawFrontend(server.path);
    assert.equal(await getFeatures(fe), backend.featureBits);
    const p = await fe.request(VHOST_USER_GET_PROTOCOL_FEATURES, { kind: "empty" }, [], "u64");
    assert.equal(p.payload.kind === "u64" && p.payload.value, backend.protocolBits);
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_PROTOCOL_FEATURES, V | NEED, {
        kind: "u64",
        value: 1n << BigInt(VHOST_USER_PROTOCOL_F_REPLY_ACK),
      }),
    );
    assert.equal(await ack(fe, VHOST_USER_SET_PROTOCOL_FEATURES), 0n);
    const setNum = encodeMessage(VHOST_USER_SET_VRING_NUM, V | NEED, {
      kind: "vringState",
      index: 0,
      num: 8,
    });
    await fe.sendRaw(setNum);
    assert.notEqual(await ack(fe, VHOST_USER_SET_VRING_NUM), 0n, "refused before SET_OWNER");
    const e = eventfd();
    await fe.sendRaw(
      encodeMessage(VHOST_USER_SET_VRING_KICK, V | NEED, { kind: "u64", value: 0n }),
      [e],
    );
    assert.notEqual(await ack(fe, VHOST_USER_SET_VRING_KICK), 0n);
    close(e);
    const cfg = await fe.request(
      VHOST_USER_GET_CONFIG,
      { kind: "config", offset: 0, flags: 0, data: new Uint8Array(8) },
      [],
      "config",
    );
    assert.equal(cfg.payload.kind, "empty", "GET_CONFIG fails before SET_OWNER");
    assert.equal(backend.vringNum.size, 0);
    assert.equal(backend.kick.size, 0);
    await fe.sendRaw(encodeMessage(VHOST_USER_SET_OWNER, V | NEED, { kind: "empty" }));
    assert.equal(await ack(fe, VHOST_USER_SET_OWNER), 0n);
    await fe.sendRaw(setNum);
    assert.equal(await ack(fe, VHOST_USER_SET_VRING_NUM), 0n);
    assert.equal(backend.vringNum.get(0), 8);
    fe.close();
  });
});

Deno.test("server: a front-end that never sends SET_OWNER is disconnected after the handshake timeout", async () => {
  await withServer(async ({ server, backend, errors }) => {
    const idle = await rawFrontend(server.path);
    assert.equal(await getFeatures(idle), backend.featureBits); // then silence
    assert.ok(await idle.waitClosed(2000), "disconnected");
    idle.close();
    assert.ok(errors.some((e) => /SET_OWNER within 100 ms/.test(e.message)));
    // The slot is free; an owner is kept past the timeout.
    const fe = await rawFrontend(server.path, "owner");
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(await getFeatures(fe), backend.featureBits);
    assert.ok(!server.connection!.closed);
    fe.close();
  }, { handshakeTimeoutMs: 100 });
});

Deno.test("server: accept4 failing with EMFILE backs off instead of spinning", async () => {
  await withServer(async ({ server, errors }) => {
    const client = socketUnix(); // before the fd table is full
    const filler: number[] = [];
    try {
      for (;;) filler.push(eventfd());
    } catch (err) {
      assert.ok(err instanceof SysError && err.code === "EMFILE", String(err));
    }
    try {
      connectUnix(client, server.path); // queued in the backlog; accept4 has no fd to give
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(server.connection, null);
      const emfile = errors.filter((e) => e instanceof SysError && e.code === "EMFILE").length;
      assert.ok(emfile >= 1 && emfile <= 10, `accept4 EMFILE reported ${emfile} times in 300 ms`);
    } finally {
      for (const fd of filler) close(fd);
    }
    await until(() => server.connection !== null, 2000);
    close(client);
    await until(() => server.connection === null);
  });
});

Deno.test("server: ring fds must be eventfds; accepted ones are made non-blocking", async () => {
  const fds0 = openFdCount();
  await withServer(async ({ server, backend, errors }) => {
    const fe = await rawFrontend(server.path, "session");
    await getFeatures(fe);
    const send = async (request: number, fd: number): Promise<bigint> => {
      await fe.sendRaw(encodeMessage(request, V | NEED, { kind: "u64", value: 0n }), [fd]);
      return await ack(fe, request);
    };
    // A pipe (either end), a socket, a memfd, a regular file: refused before
    // the backend sees them, and closed.
    const [pr, pw] = pipe();
    const mfd = memfdCreate("not-an-eventfd");
    const file = open("/dev/null", O_RDWR);
    const others = [pr, pw, fe.fd, mfd, file];
    for (
      const req of [VHOST_USER_SET_VRING_KICK, VHOST_USER_SET_VRING_CALL, VHOST_USER_SET_VRING_ERR]
    ) {
      for (const fd of others) assert.notEqual(await send(req, fd), 0n, `request ${req}, fd ${fd}`);
    }
    assert.equal(
      backend.kick.size + backend.call.size + backend.err.size,
      0,
      "backend never saw them",
    );
    assert.ok(errors.some((e) => /not an eventfd \(pipe:\[\d+\]\)/.test(e.message)));
    // A blocking eventfd is accepted, and non-blocking from then on (the
    // open file description is shared with the front-end).
    const blocking = eventfd(0, 0);
    assert.equal(fileStatusFlags(blocking) & O_NONBLOCK, 0);
    assert.equal(await send(VHOST_USER_SET_VRING_CALL, blocking), 0n);
    assert.notEqual(fileStatusFlags(blocking) & O_NONBLOCK, 0);
    assert.ok(backend.call.get(0) != null);
    fe.close();
    for (const fd of [pr, pw, mfd, file, blocking]) close(fd);
    await until(() => server.connection === null && backend.resets === 1);
  });
  assert.equal(openFdCount(), fds0, "the server closed every fd it did not keep");
});
